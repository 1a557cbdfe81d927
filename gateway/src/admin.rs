//! Admin listener: Prometheus scrape, liveness and readiness for the DaemonSet probes. Kept off
//! the proxy listeners so a scrape can never be captured or mistaken for agent traffic.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::telemetry::Telemetry;

/// Why the admin listener failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Bind failed (port in use, address not local).
    #[error("admin listener {addr}: {source}")]
    Bind {
        /// Configured address.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
}

/// Shared state the probes report on.
#[derive(Default)]
pub struct Health {
    /// Capture attached and proxy listening; false again while draining.
    pub ready: AtomicBool,
}

/// Bind now (so a port clash fails startup), serve until `shutdown` flips.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, AdminError> {
    TcpListener::bind(addr).await.map_err(|source| AdminError::Bind { addr, source })
}

/// Serve `/metrics`, `/healthz`, `/readyz` until `shutdown` becomes true.
pub async fn serve(
    listener: TcpListener,
    telemetry: Arc<Telemetry>,
    health: Arc<Health>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
            _ = shutdown.wait_for(|v| *v) => return,
        };
        let telemetry = telemetry.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = handle(&req, &telemetry, &health);
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

fn handle(req: &Request<Incoming>, telemetry: &Telemetry, health: &Health) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String, ctype: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(ctype));
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into(), "text/plain");
    }
    match req.uri().path() {
        "/metrics" => text(StatusCode::OK, telemetry.metrics.encode(), "text/plain; version=0.0.4; charset=utf-8"),
        "/healthz" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/readyz" if health.ready.load(Ordering::Relaxed) => text(StatusCode::OK, "ready\n".into(), "text/plain"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into(), "text/plain"),
        _ => text(StatusCode::NOT_FOUND, "try /metrics, /healthz, /readyz\n".into(), "text/plain"),
    }
}
