//! A small OTLP/HTTP trace receiver: accepts `POST /v1/traces` with a protobuf
//! `ExportTraceServiceRequest` (what an OpenTelemetry collector receives) and keeps the decoded
//! spans for a test to poll.
//!
//! It runs its own tokio runtime on a private thread pool; dropping the receiver shuts that
//! runtime down, which closes the listener and every open connection, so later exports to its
//! address are refused (a collector that went away).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::AnyValue as AnyValueMsg;
use prost::Message;

/// One received span, ids in lower-case hex (empty parent: a root span).
#[derive(Debug, Clone, PartialEq)]
pub struct ReceivedSpan {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    /// Span attributes rendered as strings (ints in decimal, arrays as `[a,b]`).
    pub attributes: BTreeMap<String, String>,
    /// Resource attributes of the batch the span came in.
    pub resource: BTreeMap<String, String>,
}

impl ReceivedSpan {
    /// Attribute `key`, if present.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

#[derive(Default)]
struct State {
    spans: Vec<ReceivedSpan>,
    /// Requests refused (wrong method/path, undecodable body), described.
    rejected: Vec<String>,
    /// Export requests accepted.
    exports: u64,
}

/// The running receiver; drop it to take the collector down.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl OtlpReceiver {
    /// Listen on `127.0.0.1:<free port>`.
    pub fn start() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("otlp-receiver")
            .enable_all()
            .build()
            .context("otlp receiver runtime")?;
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind otlp receiver")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let listener = {
            let _g = rt.enter();
            tokio::net::TcpListener::from_std(std_listener)?
        };
        let st = state.clone();
        rt.spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else { continue };
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                        .await;
                });
            }
        });
        Ok(OtlpReceiver { addr, state, rt: Some(rt) })
    }

    /// The base endpoint to configure an OTLP/HTTP exporter with (`/v1/traces` is appended by
    /// the exporter).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.state.lock().expect("otlp state").spans.clone()
    }

    /// Requests the receiver refused, described (should stay empty).
    pub fn rejected(&self) -> Vec<String> {
        self.state.lock().expect("otlp state").rejected.clone()
    }

    /// Number of export requests accepted.
    pub fn exports(&self) -> u64 {
        self.state.lock().expect("otlp state").exports
    }

    /// Poll until `pred` holds for the received spans; returns them, or `None` after `timeout`.
    pub fn wait_spans(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&[ReceivedSpan]) -> bool,
    ) -> Option<Vec<ReceivedSpan>> {
        crate::wait_for(timeout, Duration::from_millis(50), || {
            let s = self.spans();
            pred(&s).then_some(s)
        })
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // Drops the accept loop (closing the listener) and every connection task.
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

async fn handle(st: Arc<Mutex<State>>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let ctype = req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(reject(&st, StatusCode::BAD_REQUEST, format!("{method} {path}: body: {e}"))),
    };
    if method != hyper::Method::POST || path != "/v1/traces" {
        return Ok(reject(&st, StatusCode::NOT_FOUND, format!("{method} {path}")));
    }
    if ctype != "application/x-protobuf" {
        return Ok(reject(&st, StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("content-type {ctype:?}")));
    }
    let msg = match ExportTraceServiceRequest::decode(body) {
        Ok(m) => m,
        Err(e) => return Ok(reject(&st, StatusCode::BAD_REQUEST, format!("decode: {e}"))),
    };
    let mut got = Vec::new();
    for rs in msg.resource_spans {
        let resource = rs.resource.map(|r| attrs(&r.attributes)).unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                got.push(ReceivedSpan {
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    attributes: attrs(&s.attributes),
                    resource: resource.clone(),
                });
            }
        }
    }
    {
        let mut g = st.lock().expect("otlp state");
        g.exports += 1;
        g.spans.extend(got);
    }
    let body = ExportTraceServiceResponse::default().encode_to_vec();
    let resp = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-protobuf")
        .body(Full::new(Bytes::from(body)))
        .expect("response");
    Ok(resp)
}

fn reject(st: &Mutex<State>, status: StatusCode, why: String) -> Response<Full<Bytes>> {
    st.lock().expect("otlp state").rejected.push(why);
    Response::builder().status(status).body(Full::new(Bytes::new())).expect("response")
}

fn attrs(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> BTreeMap<String, String> {
    kvs.iter().map(|kv| (kv.key.clone(), kv.value.as_ref().map(render).unwrap_or_default())).collect()
}

fn render(v: &AnyValueMsg) -> String {
    match &v.value {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(AnyValue::BytesValue(b)) => hex(b),
        Some(AnyValue::ArrayValue(a)) => {
            format!("[{}]", a.values.iter().map(render).collect::<Vec<_>>().join(","))
        }
        Some(AnyValue::KvlistValue(l)) => format!("{:?}", attrs(&l.values)),
        None => String::new(),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
