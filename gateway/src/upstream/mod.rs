//! Connections from tollgate to the real destination. Two rules matter more than anything else
//! here: every socket carries `SO_MARK = capture.self_mark` *before* `connect()` (otherwise the
//! eBPF program would capture tollgate's own connection and loop it back into the proxy), and
//! intercepted traffic goes to the address the agent originally dialled, with the agent's SNI —
//! tollgate never re-resolves a captured name behind the agent's back.
//!
//! HTTP requests use a pooled hyper client. The pool is keyed by scheme and authority, so the
//! [`Target`] encodes "connect to this address, speak TLS with this name" in the authority as
//! `https://<sni>@<ip>:<port>`: the userinfo part never goes on the wire (requests are sent in
//! origin form with an explicit `Host`), it only tells [`Connector`] which name to verify.

pub mod credentials;
pub mod provider;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{Config, RouteConfig};

/// Request body sent upstream: the client's body streamed through untouched, or a buffered
/// (possibly rewritten) body for inspected LLM requests.
pub type ReqBody = Either<Incoming, Full<Bytes>>;

/// Why an upstream connection or request failed. The protocol layer maps these to the
/// OpenAI-shaped 502/504 responses agents see.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// TCP connect plus TLS handshake took longer than `limits.connect_timeout`.
    #[error("upstream connect timed out after {0:?}")]
    Timeout(Duration),
    /// The TCP connection could not be made (refused, unreachable, SO_MARK denied).
    #[error("connect to {addr}: {source}")]
    Connect {
        /// Destination as dialled.
        addr: String,
        /// OS error.
        source: io::Error,
    },
    /// DNS resolution of an upstream override host failed.
    #[error("resolve {host}: {source}")]
    Resolve {
        /// Host name from the route's `upstream` URL.
        host: String,
        /// Resolver error.
        source: io::Error,
    },
    /// The TLS handshake with the destination failed (untrusted certificate, protocol error).
    #[error("TLS handshake with {name}: {source}")]
    Handshake {
        /// Name verified against the certificate.
        name: String,
        /// rustls error as surfaced by tokio-rustls.
        source: io::Error,
    },
    /// The destination could not be expressed as a connectable target (bad URL, bad SNI).
    #[error("invalid upstream target: {0}")]
    BadTarget(String),
    /// Trust roots for upstream TLS could not be assembled.
    #[error("upstream trust roots: {0}")]
    Roots(String),
    /// The pooled client failed after (or while) connecting.
    #[error("upstream request: {}", error_chain(.0))]
    Request(#[source] hyper_util::client::legacy::Error),
}

/// Coarse failure class, so callers can choose 504 vs 502 without matching on hyper internals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Connect timed out.
    Timeout,
    /// Could not connect (refused, TLS failure, DNS).
    Connect,
    /// The connection broke during the exchange.
    Other,
}

impl UpstreamError {
    /// Classify, looking through the pooled client's wrapping for the connector's own error.
    pub fn kind(&self) -> FailureKind {
        match self {
            UpstreamError::Timeout(_) => FailureKind::Timeout,
            UpstreamError::Request(e) => {
                let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
                while let Some(s) = src {
                    if let Some(u) = s.downcast_ref::<UpstreamError>() {
                        return u.kind();
                    }
                    src = s.source();
                }
                if e.is_connect() {
                    FailureKind::Connect
                } else {
                    FailureKind::Other
                }
            }
            _ => FailureKind::Connect,
        }
    }
}

/// `a: b: c` for an error and its sources; hyper's own messages are too terse alone.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

/// Where the requests of one L7 connection go: scheme, address, TLS name, `Host` and path
/// prefix. Built once per connection; [`Target::uri_for`] is the only per-request work.
#[derive(Debug, Clone)]
pub struct Target {
    /// `scheme://[sni@]host:port`, the pool key and connector instructions.
    base: String,
    /// `base` parsed once, so a request URI is assembled from parts instead of re-parsed;
    /// `None` when it does not parse (each request then fails as before).
    parsed: Option<(Scheme, Authority)>,
    /// Path prefix from the route's `upstream` URL, without trailing slash.
    prefix: String,
    /// `Host` to send; `None` keeps the client's.
    host: Option<HeaderValue>,
    /// `server.address` for telemetry.
    pub server_address: String,
    /// `server.port` for telemetry.
    pub server_port: u16,
}

impl Target {
    /// Target for a connection matched to `route`. `name` is the SNI (intercepted TLS) or the
    /// client's Host (plaintext); `tls` says whether the agent spoke TLS, which decides the
    /// upstream scheme when the route has no `upstream` override.
    pub fn new(route: &RouteConfig, orig: SocketAddr, name: Option<&str>, tls: bool) -> Result<Target, UpstreamError> {
        if let Some(url) = &route.upstream {
            return Target::from_url(url);
        }
        let default_port = if tls { 443 } else { 80 };
        match (tls, name) {
            (true, Some(n)) => {
                let host_header =
                    if orig.port() == default_port { n.to_string() } else { format!("{n}:{}", orig.port()) };
                Ok(Target::with_parsed(Target {
                    base: format!("https://{n}@{orig}"),
                    parsed: None,
                    prefix: String::new(),
                    host: Some(header_value(&host_header)?),
                    server_address: n.to_string(),
                    server_port: orig.port(),
                }))
            }
            (true, None) => Err(UpstreamError::BadTarget("TLS target without a server name".into())),
            (false, name) => Ok(Target::with_parsed(Target {
                base: format!("http://{orig}"),
                parsed: None,
                prefix: String::new(),
                host: None,
                server_address: name.map_or_else(|| orig.ip().to_string(), str::to_string),
                server_port: orig.port(),
            })),
        }
    }

    /// Target for a configured URL (route `upstream`, provider `base_url`): the host is
    /// resolved at connect time and its path becomes a prefix of every request path.
    pub fn from_url(url: &url::Url) -> Result<Target, UpstreamError> {
        let scheme = url.scheme();
        if scheme != "http" && scheme != "https" {
            return Err(UpstreamError::BadTarget(format!("{url}: scheme must be http or https")));
        }
        let host = url.host_str().ok_or_else(|| UpstreamError::BadTarget(format!("{url}: no host")))?;
        let port = url.port_or_known_default().ok_or_else(|| UpstreamError::BadTarget(format!("{url}: no port")))?;
        let host_header = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        Ok(Target::with_parsed(Target {
            base: format!("{scheme}://{host}:{port}"),
            parsed: None,
            prefix: url.path().trim_end_matches('/').to_string(),
            host: Some(header_value(&host_header)?),
            server_address: host.trim_start_matches('[').trim_end_matches(']').to_string(),
            server_port: port,
        }))
    }

    /// A target that is never dialled: routes on an explicit listener without `upstream` have
    /// no original destination (their LLM calls go to providers, anything else gets a 404).
    pub fn none() -> Target {
        Target {
            base: String::new(),
            parsed: None,
            prefix: String::new(),
            host: None,
            server_address: String::new(),
            server_port: 0,
        }
    }

    fn with_parsed(mut self) -> Self {
        self.parsed = self.base.parse::<Uri>().ok().and_then(|u| {
            let p = u.into_parts();
            Some((p.scheme?, p.authority?))
        });
        self
    }

    /// Absolute URI for a request whose origin-form path and query is `pq`.
    pub fn uri_for(&self, pq: &str) -> Result<Uri, UpstreamError> {
        let pq = if pq.is_empty() { "/" } else { pq };
        if pq.starts_with('/') {
            let path = if self.prefix.is_empty() {
                PathAndQuery::try_from(pq)
            } else {
                PathAndQuery::try_from([self.prefix.as_str(), pq].concat())
            };
            if let Some(u) = path.ok().and_then(|p| self.assemble(p)) {
                return Ok(u);
            }
        }
        self.parse_uri(pq)
    }

    /// [`Target::uri_for`] for a request's already parsed path and query: without a path
    /// prefix it is reused as is.
    pub fn uri_for_path(&self, pq: Option<&PathAndQuery>) -> Result<Uri, UpstreamError> {
        match pq {
            Some(p) if self.prefix.is_empty() && p.as_str().starts_with('/') => {
                self.assemble(p.clone()).map_or_else(|| self.parse_uri(p.as_str()), Ok)
            }
            _ => self.uri_for(pq.map_or("/", PathAndQuery::as_str)),
        }
    }

    /// `scheme://authority` + `path`, from the parsed base.
    fn assemble(&self, path: PathAndQuery) -> Option<Uri> {
        let (scheme, authority) = self.parsed.as_ref()?;
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(scheme.clone());
        parts.authority = Some(authority.clone());
        parts.path_and_query = Some(path);
        Uri::from_parts(parts).ok()
    }

    /// The URI by parsing the whole string (fallback, and the error message).
    fn parse_uri(&self, pq: &str) -> Result<Uri, UpstreamError> {
        let mut s = String::with_capacity(self.base.len() + self.prefix.len() + pq.len());
        s.push_str(&self.base);
        s.push_str(&self.prefix);
        s.push_str(pq);
        s.parse::<Uri>().map_err(|e| {
            // The query may carry a provider key (Gemini `key=`): never echo it.
            let shown = s.split('?').next().unwrap_or_default();
            UpstreamError::BadTarget(format!("{shown}: {e}"))
        })
    }

    /// `Host` to send upstream, when tollgate must set it (intercepted name or override).
    pub fn host_header(&self) -> Option<&HeaderValue> {
        self.host.as_ref()
    }
}

fn header_value(s: &str) -> Result<HeaderValue, UpstreamError> {
    HeaderValue::from_str(s).map_err(|_| UpstreamError::BadTarget(format!("{s}: not a valid Host")))
}

/// Upstream TLS trust: system roots (webpki-roots when the system has none) plus
/// `tls.extra_roots`. ALPN is http/1.1 only: transparently intercepted HTTP/1.1 (upgrades
/// included) is forwarded as HTTP/1.1; [`Upstream`] derives an `h2` variant for providers.
pub fn client_tls_config(config: &Config) -> Result<Arc<ClientConfig>, UpstreamError> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(native.certs);
    if added == 0 {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    for path in &config.tls.extra_roots {
        let pem = std::fs::read(path).map_err(|e| UpstreamError::Roots(format!("{}: {e}", path.display())))?;
        let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
            .collect::<Result<_, _>>()
            .map_err(|e| UpstreamError::Roots(format!("{}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(UpstreamError::Roots(format!("{}: no PEM certificates", path.display())));
        }
        for c in certs {
            roots.add(c).map_err(|e| UpstreamError::Roots(format!("{}: {e}", path.display())))?;
        }
    }
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::Roots(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Open a TCP connection with `SO_MARK` set before `connect()`, so the kernel programs let it
/// through. A mark of 0 skips the option (tests, capture disabled).
pub async fn connect_marked(addr: SocketAddr, mark: u32) -> io::Result<TcpStream> {
    let sock =
        socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if mark != 0 {
        sock.set_mark(mark)?;
    }
    sock.set_nonblocking(true)?;
    sock.set_nodelay(true)?;
    let std_stream: std::net::TcpStream = sock.into();
    tokio::net::TcpSocket::from_std_stream(std_stream).connect(addr).await
}

/// A connection to the destination, plain or TLS.
pub enum UpstreamStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        match self {
            UpstreamStream::Tls(s) if s.get_ref().1.alpn_protocol() == Some(b"h2") => Connected::new().negotiated_h2(),
            _ => Connected::new(),
        }
    }
}

/// hyper connector: decodes a [`Target`] authority, dials with `SO_MARK`, and does TLS.
#[derive(Clone)]
pub struct Connector {
    inner: Arc<ConnectorInner>,
}

struct ConnectorInner {
    tls: tokio_rustls::TlsConnector,
    mark: u32,
    timeout: Duration,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<UpstreamStream>;
    type Error = UpstreamError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, UpstreamError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let timeout = inner.timeout;
            match tokio::time::timeout(timeout, inner.connect(&dst)).await {
                Ok(r) => r.map(TokioIo::new),
                Err(_) => Err(UpstreamError::Timeout(timeout)),
            }
        })
    }
}

impl ConnectorInner {
    async fn connect(&self, dst: &Uri) -> Result<UpstreamStream, UpstreamError> {
        let auth = dst.authority().ok_or_else(|| UpstreamError::BadTarget(dst.to_string()))?;
        let tls = dst.scheme_str() == Some("https");
        let host = auth.host().trim_start_matches('[').trim_end_matches(']');
        let port = auth.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let sni = auth.as_str().rsplit_once('@').map_or(host, |(user, _)| user);
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|source| UpstreamError::Resolve { host: host.to_string(), source })?
                .collect(),
        };
        let tcp = self.dial(&addrs).await?;
        if !tls {
            return Ok(UpstreamStream::Plain(tcp));
        }
        let name = ServerName::try_from(sni.to_string())
            .map_err(|_| UpstreamError::BadTarget(format!("bad TLS name {sni}")))?;
        let s = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|source| UpstreamError::Handshake { name: sni.to_string(), source })?;
        Ok(UpstreamStream::Tls(Box::new(s)))
    }

    async fn dial(&self, addrs: &[SocketAddr]) -> Result<TcpStream, UpstreamError> {
        let mut last = UpstreamError::BadTarget("no address".into());
        for &a in addrs {
            match connect_marked(a, self.mark).await {
                Ok(s) => return Ok(s),
                Err(source) => last = UpstreamError::Connect { addr: a.to_string(), source },
            }
        }
        Err(last)
    }
}

/// The shared upstream side of the proxy: one connection pool for all L7 traffic, plus marked
/// raw connects for spliced traffic.
pub struct Upstream {
    client: Client<Connector, ReqBody>,
    /// Offers `h2` in ALPN; one multiplexed connection per provider when accepted.
    client_h2: Client<Connector, ReqBody>,
    mark: u32,
    connect_timeout: Duration,
}

impl Upstream {
    /// Build from config: trust roots, pool bounds, connect timeout and socket mark.
    pub fn new(config: &Config) -> Result<Self, UpstreamError> {
        Ok(Self::with_tls(config, client_tls_config(config)?))
    }

    /// Like [`Upstream::new`] with a caller-supplied TLS client config.
    pub fn with_tls(config: &Config, tls: Arc<ClientConfig>) -> Self {
        let mut h2 = (*tls).clone();
        h2.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let build = |tls: Arc<ClientConfig>| {
            let connector = Connector {
                inner: Arc::new(ConnectorInner {
                    tls: tokio_rustls::TlsConnector::from(tls),
                    mark: config.capture.self_mark,
                    timeout: config.limits.connect_timeout,
                }),
            };
            Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(config.limits.pool_max_idle_per_host)
                .pool_idle_timeout(Duration::from_secs(90))
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .http2_keep_alive_interval(Duration::from_secs(30))
                .build(connector)
        };
        Upstream {
            client: build(tls),
            client_h2: build(Arc::new(h2)),
            mark: config.capture.self_mark,
            connect_timeout: config.limits.connect_timeout,
        }
    }

    /// [`Upstream::send`] over the client that offers HTTP/2 (provider targets that allow it).
    pub async fn send_h2(&self, req: Request<ReqBody>) -> Result<Response<Incoming>, UpstreamError> {
        self.client_h2.request(req).await.map_err(UpstreamError::Request)
    }

    /// Send one request (absolute URI from [`Target::uri_for`]; `Host` already set or left to
    /// the client's value) over a pooled connection.
    pub async fn send(&self, mut req: Request<ReqBody>) -> Result<Response<Incoming>, UpstreamError> {
        if !req.headers().contains_key(HOST) {
            // Plaintext HTTP/1.0 without Host: name the original address rather than nothing.
            if let Some(a) = req.uri().authority() {
                if let Ok(v) = HeaderValue::from_str(a.as_str().rsplit('@').next().unwrap_or(a.as_str())) {
                    req.headers_mut().insert(HOST, v);
                }
            }
        }
        self.client.request(req).await.map_err(UpstreamError::Request)
    }

    /// Raw marked TCP connection for splicing, bounded by `connect_timeout`.
    pub async fn connect_tcp(&self, addr: SocketAddr) -> Result<TcpStream, UpstreamError> {
        match tokio::time::timeout(self.connect_timeout, connect_marked(addr, self.mark)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(source)) => Err(UpstreamError::Connect { addr: addr.to_string(), source }),
            Err(_) => Err(UpstreamError::Timeout(self.connect_timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ProviderKind, RouteMatch};

    fn route(upstream: Option<&str>) -> RouteConfig {
        RouteConfig {
            name: "r".into(),
            matcher: RouteMatch::default(),
            protocol: Default::default(),
            federation: None,
            provider: ProviderKind::Openai,
            intercept: crate::config::InterceptMode::Always,
            upstream: upstream.map(|u| url::Url::parse(u).unwrap()),
            listener: None,
            listener_auth: Default::default(),
            targets: Vec::new(),
            balance: Default::default(),
            failover: Default::default(),
            circuit: Default::default(),
            include_usage: true,
            log_payloads: Default::default(),
        }
    }

    #[test]
    fn intercepted_target_keeps_address_and_name() {
        let t = Target::new(&route(None), "10.0.0.1:443".parse().unwrap(), Some("api.openai.com"), true).unwrap();
        let u = t.uri_for("/v1/chat/completions?x=1").unwrap();
        assert_eq!(u.scheme_str(), Some("https"));
        assert_eq!(u.host(), Some("10.0.0.1"));
        assert_eq!(u.authority().unwrap().as_str(), "api.openai.com@10.0.0.1:443");
        assert_eq!(u.path_and_query().unwrap().as_str(), "/v1/chat/completions?x=1");
        assert_eq!(t.host_header().unwrap(), "api.openai.com");
    }

    #[test]
    fn override_target_uses_url_and_prefix() {
        let t =
            Target::new(&route(Some("http://127.0.0.1:9000/proxy/")), "10.0.0.1:443".parse().unwrap(), Some("x"), true)
                .unwrap();
        let u = t.uri_for("/v1/models").unwrap();
        assert_eq!(u.to_string(), "http://127.0.0.1:9000/proxy/v1/models");
        assert_eq!(t.host_header().unwrap(), "127.0.0.1:9000");
    }

    #[test]
    fn plaintext_target_keeps_client_host() {
        let t = Target::new(&route(None), "[::1]:11434".parse().unwrap(), Some("localhost"), false).unwrap();
        assert_eq!(t.uri_for("/api").unwrap().to_string(), "http://[::1]:11434/api");
        assert!(t.host_header().is_none());
    }

    #[tokio::test]
    async fn stalled_handshake_is_a_timeout_and_refused_is_connect() {
        let mut cfg = Config::default();
        cfg.capture.self_mark = 0;
        cfg.limits.connect_timeout = Duration::from_millis(200);
        let up = Upstream::with_tls(&cfg, client_tls_config(&cfg).unwrap());
        // Accepts TCP, never answers the ClientHello.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _hold = tokio::spawn(async move {
            let _s = l.accept().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let req = |uri: String| Request::post(uri).body(Either::Right(Full::new(Bytes::new()))).unwrap();
        let e = up.send(req(format!("https://api.openai.com@{addr}/v1/chat/completions"))).await.unwrap_err();
        assert_eq!(e.kind(), FailureKind::Timeout, "{e}");
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let e = up.send(req(format!("http://{dead}/"))).await.unwrap_err();
        assert_eq!(e.kind(), FailureKind::Connect, "{e}");
        assert!(e.to_string().contains("refused"), "{e}");
    }
}
