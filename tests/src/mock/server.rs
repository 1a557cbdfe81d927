//! The mock upstream's HTTP server: listeners (plain, and TLS with ALPN `h2`/`http/1.1` served by
//! hyper-util's auto connection builder), the request pipeline (record → fault → auth → API) and
//! the `/__mock/*` control endpoints. `bin/mock-llm.rs` is a thin CLI over [`run`].

use std::convert::Infallible;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, Context as _, Result};
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Map, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::apis::{self, Auth};
use super::control::{Fault, Faults, Provider, RequestLog, Stats};
use crate::openai;

/// Behaviour fixed at start-up (the CLI flags).
#[derive(Debug, Clone)]
pub struct Config {
    /// Delay between streamed events.
    pub chunk_delay: Duration,
    /// API-key checking.
    pub auth: Auth,
    /// Echoed in `x-mock-name` on every response and in the stats.
    pub name: String,
    /// How many API requests `/__mock/requests` keeps (0: none).
    pub record: usize,
}

/// Where to listen.
#[derive(Debug, Clone, Default)]
pub struct Listeners {
    /// Plain HTTP listeners (HTTP/1.1, and HTTP/2 with prior knowledge).
    pub http: Vec<SocketAddr>,
    /// TLS listeners (ALPN `h2` and `http/1.1`).
    pub https: Vec<SocketAddr>,
    /// PEM certificate chain for the TLS listeners.
    pub cert: Option<PathBuf>,
    /// PEM private key for the TLS listeners.
    pub key: Option<PathBuf>,
}

/// Shared server state.
pub struct State {
    /// Start-up configuration.
    pub cfg: Config,
    /// Counters.
    pub stats: Stats,
    /// Injected fault.
    pub faults: Faults,
    /// Recent API requests.
    pub log: RequestLog<Recorded>,
}

/// One API request as received, rendered for `/__mock/requests` by [`Recorded::to_json`].
pub struct Recorded {
    method: Method,
    uri: http::Uri,
    version: Version,
    headers: http::HeaderMap,
    body: Bytes,
    peer: SocketAddr,
    fault: Option<Fault>,
}

/// Response body type: whole bodies and channel-fed streams alike.
pub type RespBody = BoxBody<Bytes, Infallible>;

/// A body fed by a channel, so streamed events leave as separate frames.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A body whose end is held back `delay` after its last frame (fault `end_delay_ms`): the
/// chunked terminator of a stream arrives that long after its terminal event.
struct DelayEnd {
    inner: RespBody,
    delay: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for DelayEnd {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        loop {
            if let Some(s) = self.sleep.as_mut() {
                return s.as_mut().poll(cx).map(|()| None);
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(None) => {
                    let delay = self.delay;
                    self.sleep = Some(Box::pin(tokio::time::sleep(delay)));
                }
                other => return other,
            }
        }
    }
}

/// A complete body.
pub fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).boxed()
}

/// A streamed response: `events` leave one frame each, `chunk_delay` apart.
pub fn stream_response(
    st: &State,
    b: http::response::Builder,
    content_type: &str,
    events: Vec<String>,
) -> Response<RespBody> {
    st.stats.streams.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    let delay = st.cfg.chunk_delay;
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
    b.header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(BoxBody::new(ChannelBody(rx)))
        .expect("response")
}

fn json_ok(v: &Value) -> Response<RespBody> {
    Response::builder().header(header::CONTENT_TYPE, "application/json").body(full(v.to_string())).expect("response")
}

/// The service error that makes hyper drop the connection without an answer (a `reset` fault).
#[derive(Debug)]
pub struct InjectedReset;

impl std::fmt::Display for InjectedReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset by an injected fault")
    }
}

impl std::error::Error for InjectedReset {}

async fn handle(req: Request<Incoming>, peer: SocketAddr, st: Arc<State>) -> Result<Response<RespBody>, InjectedReset> {
    let mut resp = route(req, peer, &st).await?;
    if resp.status().as_u16() >= 400 {
        st.stats.errors.fetch_add(1, Ordering::Relaxed);
    }
    let h = resp.headers_mut();
    h.insert("x-mock-peer", peer.to_string().parse().expect("header"));
    if let Ok(v) = HeaderValue::from_str(&st.cfg.name) {
        h.insert("x-mock-name", v);
    }
    Ok(resp)
}

async fn route(req: Request<Incoming>, peer: SocketAddr, st: &State) -> Result<Response<RespBody>, InjectedReset> {
    let path = req.uri().path().to_string();
    if path.starts_with("/__mock/") {
        return Ok(control(req, st).await);
    }
    if req.method() == Method::GET && path == "/" {
        st.stats.origin.fetch_add(1, Ordering::Relaxed);
        return Ok(Response::builder()
            .header(header::CONTENT_TYPE, "text/plain")
            .body(full(openai::ORIGIN_BODY))
            .expect("response"));
    }
    api_route(req, peer, st, &path).await
}

async fn api_route(
    req: Request<Incoming>,
    peer: SocketAddr,
    st: &State,
    path: &str,
) -> Result<Response<RespBody>, InjectedReset> {
    let path = path.to_string();
    let (parts, body) = req.into_parts();
    let provider = Provider::for_path(&path);
    let body = match Limited::new(body, 16 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(apis::error(provider, StatusCode::BAD_REQUEST, &format!("could not read body: {e}"), None))
        }
    };
    let fault = st.faults.take(&path);
    st.stats.total.fetch_add(1, Ordering::Relaxed);
    if parts.version == Version::HTTP_2 {
        st.stats.http2.fetch_add(1, Ordering::Relaxed);
    }
    if st.log.enabled() {
        st.log.push(Recorded {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body: body.clone(),
            peer,
            fault: fault.clone(),
        });
    }
    if let Some(f) = &fault {
        if !f.delay.is_zero() {
            st.stats.delayed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(f.delay).await;
        }
        if f.reset {
            st.stats.resets.fetch_add(1, Ordering::Relaxed);
            return Err(InjectedReset);
        }
        if let Some(s) = f.status {
            st.stats.faults.fetch_add(1, Ordering::Relaxed);
            let status = StatusCode::from_u16(s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return Ok(apis::error(provider, status, &format!("Mock fault injected: HTTP {s}"), None));
        }
    }
    let resp = answer(st, provider, &parts, &body, &path);
    Ok(match fault.filter(|f| !f.end_delay.is_zero()) {
        Some(f) => resp.map(|inner| BoxBody::new(DelayEnd { inner, delay: f.end_delay, sleep: None })),
        None => resp,
    })
}

/// Answer an API request that no fault intercepted.
fn answer(
    st: &State,
    provider: Provider,
    parts: &http::request::Parts,
    body: &Bytes,
    path: &str,
) -> Response<RespBody> {
    let Some((api, arg)) = apis::classify(&parts.method, path) else {
        return apis::error(
            provider,
            StatusCode::NOT_FOUND,
            &format!("Unknown request URL: {} {path}", parts.method),
            Some("unknown_url"),
        );
    };
    if provider == Provider::Azure
        && apis::query_param(parts.uri.query(), "api-version").is_none_or(|v| v.trim().is_empty())
    {
        return apis::error(provider, StatusCode::NOT_FOUND, "Resource not found", None);
    }
    if let Err(r) = apis::check_auth(provider, &st.cfg.auth, parts) {
        st.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
        return *r;
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => apis::dispatch(st, api, arg, parts, v),
        Err(_) => apis::error(
            provider,
            StatusCode::BAD_REQUEST,
            concat!(
                "We could not parse the JSON body of your request. ",
                "(HINT: This likely means you aren't using your HTTP library correctly.)"
            ),
            None,
        ),
    }
}

impl Recorded {
    /// The `/__mock/requests` entry: `{method, path, query, version, headers (lower-cased names,
    /// repeated ones joined with ", "), body_json (null when not JSON), body_len, peer, api, fault}`.
    pub fn to_json(&self) -> Value {
        let mut headers = Map::new();
        for (k, v) in &self.headers {
            let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
            match headers.get_mut(k.as_str()) {
                Some(Value::String(prev)) => {
                    prev.push_str(", ");
                    prev.push_str(&v);
                }
                _ => {
                    headers.insert(k.as_str().to_string(), json!(v));
                }
            }
        }
        json!({
            "method": self.method.as_str(),
            "path": self.uri.path(),
            "query": self.uri.query(),
            "version": format!("{:?}", self.version),
            "headers": headers,
            "body_json": serde_json::from_slice::<Value>(&self.body).ok(),
            "body_len": self.body.len(),
            "peer": self.peer.to_string(),
            "api": apis::classify(&self.method, self.uri.path()).map(|(a, _)| a.key()),
            "fault": self.fault.as_ref().map(Fault::to_json),
        })
    }
}

async fn control(req: Request<Incoming>, st: &State) -> Response<RespBody> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let not_found = || {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(json!({"error": format!("no control endpoint {method} {path}")}).to_string()))
            .expect("response")
    };
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/__mock/stats") => json_ok(&st.stats.to_json(&st.cfg.name)),
        (Method::DELETE, "/__mock/stats") => {
            st.stats.reset();
            json_ok(&st.stats.to_json(&st.cfg.name))
        }
        (Method::GET, "/__mock/requests") => json_ok(&st.log.to_json(Recorded::to_json)),
        (Method::DELETE, "/__mock/requests") => {
            st.log.clear();
            json_ok(&json!([]))
        }
        (Method::GET, "/__mock/fault") => json_ok(&st.faults.current().map(|f| f.to_json()).unwrap_or(Value::Null)),
        (Method::DELETE, "/__mock/fault") => {
            st.faults.clear();
            json_ok(&Value::Null)
        }
        (Method::POST, "/__mock/fault") => {
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let parsed =
                serde_json::from_slice::<Value>(&body).map_err(|e| e.to_string()).and_then(|v| Fault::from_json(&v));
            match parsed {
                Ok(f) => {
                    let v = f.to_json();
                    st.faults.set(f);
                    json_ok(&v)
                }
                Err(e) => Response::builder()
                    .status(StatusCode::BAD_REQUEST)
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(full(json!({"error": e}).to_string()))
                    .expect("response"),
            }
        }
        _ => not_found(),
    }
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
    // auto: HTTP/1.1, or HTTP/2 when the connection opens with the h2 preface (which a client
    // sends after negotiating ALPN `h2`, or with prior knowledge on a plain listener).
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

/// Bind every listener, print one `listening http|https ADDR` line per listener (once all are
/// bound), then serve until the process is killed.
pub async fn run(cfg: Config, l: Listeners) -> Result<()> {
    if l.http.is_empty() && l.https.is_empty() {
        return Err(anyhow!("give at least one --listen or --tls-listen"));
    }
    let record = cfg.record;
    let st = Arc::new(State { cfg, stats: Stats::default(), faults: Faults::default(), log: RequestLog::new(record) });
    let tls = if l.https.is_empty() {
        None
    } else {
        let (c, k) =
            l.cert.as_ref().zip(l.key.as_ref()).ok_or_else(|| anyhow!("--tls-listen needs --cert and --key"))?;
        Some(tokio_rustls::TlsAcceptor::from(tls_config(c, k)?))
    };
    let mut lines = Vec::new();
    let mut tasks = Vec::new();
    for (addrs, scheme) in [(&l.http, "http"), (&l.https, "https")] {
        for a in addrs {
            let lis = TcpListener::bind(a).await.with_context(|| format!("bind {a}"))?;
            lines.push(format!("listening {scheme} {}", lis.local_addr()?));
            let acc = if scheme == "https" { tls.clone() } else { None };
            tasks.push(tokio::spawn(accept_loop(lis, acc, st.clone())));
        }
    }
    {
        let mut out = std::io::stdout().lock();
        for line in lines {
            writeln!(out, "{line}")?;
        }
        out.flush()?;
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}
