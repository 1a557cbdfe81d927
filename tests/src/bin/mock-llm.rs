//! Mock OpenAI-compatible upstream for tollgate's end-to-end tests and benchmark.
//!
//! Speaks the real wire format of `POST /v1/chat/completions` (non-streaming `chat.completion`
//! and streaming `chat.completion.chunk` server-sent events with the usage chunk and `[DONE]`),
//! with content derived deterministically from the request (see `tollgate_e2e::openai`). Every
//! response carries `x-mock-peer: ip:port`, the TCP peer the mock saw, so a test can tell a direct
//! connection from a proxied one. `GET /` answers a fixed text (an ordinary HTTPS origin for
//! splice tests); `GET /__mock/stats` returns request counters.
//!
//! Prints one `listening http|https ADDR` line per listener once all are bound, then serves
//! until killed.

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use bytes::Bytes;
use clap::Parser;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tollgate_e2e::openai::{self, ChatRequest};

#[derive(Parser, Debug)]
#[command(about = "Mock OpenAI-compatible upstream")]
struct Args {
    /// Plain HTTP listener (repeatable), e.g. 127.0.0.2:8000 or [::1]:8000; port 0 picks one.
    #[arg(long = "listen")]
    listen: Vec<SocketAddr>,
    /// HTTPS listener (repeatable); needs --cert and --key.
    #[arg(long = "tls-listen")]
    tls_listen: Vec<SocketAddr>,
    /// PEM certificate chain for HTTPS listeners.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// PEM private key for HTTPS listeners.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Delay between streamed events, in milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Accept chat requests without `Authorization: Bearer ...`.
    #[arg(long)]
    no_auth: bool,
    /// Tokio worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    workers: usize,
}

#[derive(Default)]
struct Stats {
    chat: AtomicU64,
    chat_stream: AtomicU64,
    /// Streaming requests that asked for the usage chunk.
    chat_stream_usage: AtomicU64,
    origin: AtomicU64,
    errors: AtomicU64,
}

struct State {
    chunk_delay: Duration,
    require_auth: bool,
    stats: Stats,
}

type RespBody = BoxBody<Bytes, Infallible>;

/// A body fed by a channel, so streamed events leave as separate frames.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).boxed()
}

fn error(status: StatusCode, msg: &str, kind: &str, code: Option<&str>) -> Response<RespBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(openai::error_body(msg, kind, code)))
        .expect("response")
}

async fn handle(req: Request<Incoming>, peer: SocketAddr, st: Arc<State>) -> Result<Response<RespBody>, Infallible> {
    let mut resp = route(req, &st).await;
    if resp.status().as_u16() >= 400 {
        st.stats.errors.fetch_add(1, Ordering::Relaxed);
    }
    resp.headers_mut().insert("x-mock-peer", peer.to_string().parse().expect("header"));
    Ok(resp)
}

async fn route(req: Request<Incoming>, st: &State) -> Response<RespBody> {
    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::POST, "/v1/chat/completions") => chat(req, st).await,
        (Method::GET, "/") => {
            st.stats.origin.fetch_add(1, Ordering::Relaxed);
            Response::builder()
                .header(header::CONTENT_TYPE, "text/plain")
                .body(full(openai::ORIGIN_BODY))
                .expect("response")
        }
        (Method::GET, "/__mock/stats") => {
            let s = &st.stats;
            let v = serde_json::json!({
                "chat_requests": s.chat.load(Ordering::Relaxed),
                "chat_stream_requests": s.chat_stream.load(Ordering::Relaxed),
                "chat_stream_usage_requests": s.chat_stream_usage.load(Ordering::Relaxed),
                "origin_requests": s.origin.load(Ordering::Relaxed),
                "errors": s.errors.load(Ordering::Relaxed),
            });
            Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(full(v.to_string()))
                .expect("response")
        }
        _ => error(
            StatusCode::NOT_FOUND,
            &format!("Unknown request URL: {} {path}", req.method()),
            "invalid_request_error",
            Some("unknown_url"),
        ),
    }
}

async fn chat(req: Request<Incoming>, st: &State) -> Response<RespBody> {
    if st.require_auth {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.strip_prefix("Bearer ").is_some_and(|k| !k.trim().is_empty()));
        if !ok {
            return error(
                StatusCode::UNAUTHORIZED,
                "You didn't provide an API key.",
                "invalid_request_error",
                Some("invalid_api_key"),
            );
        }
    }
    let body = match Limited::new(req.into_body(), 16 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error(StatusCode::BAD_REQUEST, &format!("could not read body: {e}"), "invalid_request_error", None)
        }
    };
    let json: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("We could not parse the JSON body of your request: {e}"),
                "invalid_request_error",
                None,
            )
        }
    };
    let creq = match ChatRequest::from_json(&json) {
        Ok(r) => r,
        Err(m) => return error(StatusCode::BAD_REQUEST, &m, "invalid_request_error", None),
    };
    st.stats.chat.fetch_add(1, Ordering::Relaxed);
    let reply = openai::reply_for(&creq);
    let b = Response::builder()
        .header("x-request-id", format!("req_{}", &reply.id["chatcmpl-".len()..]))
        .header("openai-version", "2020-10-01")
        .header("openai-processing-ms", "1");
    if !creq.stream {
        return b
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(openai::completion_body(&reply)))
            .expect("response");
    }
    st.stats.chat_stream.fetch_add(1, Ordering::Relaxed);
    if creq.include_usage {
        st.stats.chat_stream_usage.fetch_add(1, Ordering::Relaxed);
    }
    let events = openai::stream_events(&reply, creq.include_usage);
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let delay = st.chunk_delay;
    tokio::spawn(async move {
        for ev in events {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if tx.send(Bytes::from(ev)).await.is_err() {
                return;
            }
        }
    });
    b.header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(BoxBody::new(ChannelBody(rx)))
        .expect("response")
}

fn tls_config(cert: &PathBuf, key: &PathBuf) -> Result<Arc<rustls::ServerConfig>> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert).with_context(|| format!("{}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("{}", key.display()))?,
    ))?
    .ok_or_else(|| anyhow!("no private key in {}", key.display()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

async fn serve_conn<S>(io: S, peer: SocketAddr, st: Arc<State>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| handle(req, peer, st.clone()));
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

async fn accept_loop(l: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>, st: Arc<State>) {
    loop {
        let (s, peer): (TcpStream, SocketAddr) = match l.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("mock-llm: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        let st = st.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_conn(s, peer, st).await,
                Some(acc) => match acc.accept(s).await {
                    Ok(t) => serve_conn(t, peer, st).await,
                    Err(e) => eprintln!("mock-llm: TLS handshake from {peer}: {e}"),
                },
            }
        });
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.listen.is_empty() && args.tls_listen.is_empty() {
        return Err(anyhow!("give at least one --listen or --tls-listen"));
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if args.workers > 0 {
        rt.worker_threads(args.workers);
    }
    rt.build()?.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let st = Arc::new(State {
        chunk_delay: Duration::from_millis(args.chunk_delay_ms),
        require_auth: !args.no_auth,
        stats: Stats::default(),
    });
    let tls = if args.tls_listen.is_empty() {
        None
    } else {
        let (c, k) =
            args.cert.as_ref().zip(args.key.as_ref()).ok_or_else(|| anyhow!("--tls-listen needs --cert and --key"))?;
        Some(tokio_rustls::TlsAcceptor::from(tls_config(c, k)?))
    };
    let mut lines = Vec::new();
    let mut tasks = Vec::new();
    for (addrs, scheme) in [(&args.listen, "http"), (&args.tls_listen, "https")] {
        for a in addrs {
            let l = TcpListener::bind(a).await.with_context(|| format!("bind {a}"))?;
            lines.push(format!("listening {scheme} {}", l.local_addr()?));
            let acc = if scheme == "https" { tls.clone() } else { None };
            tasks.push(tokio::spawn(accept_loop(l, acc, st.clone())));
        }
    }
    {
        let mut out = std::io::stdout().lock();
        for l in lines {
            writeln!(out, "{l}")?;
        }
        out.flush()?;
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}
