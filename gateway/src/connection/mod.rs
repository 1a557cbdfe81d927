//! The transparent proxy's front door: accept captured connections, learn from the kernel who
//! made them and where they were going, sniff the first bytes, then either terminate TLS and
//! handle HTTP at L7 (AI routes) or splice bytes untouched to the original destination.
//!
//! A connection without a kernel record is closed at once: tollgate is never an open proxy.

pub mod sniff;
pub mod splice;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;

use crate::capture::{identity::orig_dst, Agent, AgentResolver, FlowTable};
use crate::config::{Config, RouteConfig};
use crate::policy::CircuitState;
use crate::protocol::llm::dispatch::{Gateway, GatewayError};
use crate::protocol::llm::Reporter;
use crate::protocol::L7Context;
use crate::telemetry::{ConnKind, LlmCall, Telemetry};
use crate::upstream::{Target, Upstream, UpstreamError};
use sniff::Sniffed;

/// What the proxy needs from the rest of tollgate.
pub struct ProxyDeps {
    /// Routes, limits, TLS and capture settings.
    pub config: Arc<Config>,
    /// Kernel records of captured connections.
    pub flows: Arc<dyn FlowTable>,
    /// Record → agent identity.
    pub agents: Arc<AgentResolver>,
    /// Where connection and call facts go.
    pub telemetry: Arc<Telemetry>,
    /// Interception CA (leaf certificates for intercepted SNIs).
    pub ca: Arc<tls::CertAuthority>,
    /// Optional copy of every reported [`LlmCall`] (tests, in-process consumers); `None` in
    /// production.
    pub observer: Option<mpsc::Sender<LlmCall>>,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The upstream client (trust roots) could not be built.
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamError),
    /// The interception TLS config could not be built.
    #[error("interception TLS: {0}")]
    Tls(#[from] tls::TlsError),
    /// Providers could not be set up (key source, base URL).
    #[error("gateway: {0}")]
    Gateway(#[from] GatewayError),
    /// A route's explicit listener could not be bound.
    #[error("routes[{route}].listener {addr}: {source}")]
    Bind {
        /// Route name.
        route: String,
        /// Address.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
}

/// State shared by every connection task.
struct Shared {
    deps: ProxyDeps,
    upstream: Arc<Upstream>,
    tls_server: Arc<ServerConfig>,
    reporter: Arc<Reporter>,
    permits: Arc<Semaphore>,
    gateway: Arc<Gateway>,
}

/// Serve until `shutdown` flips to true; then stop accepting and let in-flight connections finish.
/// L7 connections finish their current request and close; spliced connections run to their end,
/// so callers wanting a hard stop bound this future with a timeout. A dropped `shutdown` sender
/// counts as shutdown.
pub async fn serve(
    deps: ProxyDeps,
    listeners: Vec<TcpListener>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ProxyError> {
    let upstream = Arc::new(Upstream::new(&deps.config)?);
    let tls_server = deps.ca.server_config()?;
    let reporter = Arc::new(Reporter::new(deps.telemetry.clone(), deps.observer.clone()));
    let max = deps.config.limits.max_connections.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let permits = Arc::new(Semaphore::new(max));
    let gateway = Arc::new(Gateway::new(&deps.config)?);
    let weak = Arc::downgrade(&gateway);
    deps.telemetry.metrics.set_circuit_source(Box::new(move || {
        let Some(g) = weak.upgrade() else { return Vec::new() };
        let mut out = Vec::new();
        for r in g.routes() {
            for t in r.balancer.snapshot() {
                let state = match t.circuit {
                    CircuitState::Closed => 0,
                    CircuitState::HalfOpen => 1,
                    CircuitState::Open => 2,
                };
                out.push((r.name.to_string(), t.provider.clone(), state));
            }
        }
        out
    }));
    let mut direct = Vec::new();
    for (i, r) in deps.config.routes.iter().enumerate() {
        if let Some(addr) = r.listener {
            let l = TcpListener::bind(addr).await.map_err(|source| ProxyError::Bind {
                route: r.name.clone(),
                addr,
                source,
            })?;
            direct.push((i, l));
        }
    }
    let shared = Arc::new(Shared { deps, upstream, tls_server, reporter, permits, gateway });

    let mut accepts = JoinSet::new();
    for l in listeners {
        accepts.spawn(accept_loop(shared.clone(), l, Entry::Captured, shutdown.clone()));
    }
    for (i, l) in direct {
        accepts.spawn(accept_loop(shared.clone(), l, Entry::Direct(i), shutdown.clone()));
    }
    while accepts.join_next().await.is_some() {}
    // Every connection task holds a permit: all permits back means all connections done.
    let _all = shared.permits.acquire_many(max as u32).await;
    Ok(())
}

/// Resolves once shutdown is requested (or can no longer be requested).
async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// What a listener's connections are.
#[derive(Clone, Copy)]
enum Entry {
    /// Captured connections (a kernel record says who and where to).
    Captured,
    /// A route's explicit listener (index into `config.routes`).
    Direct(usize),
}

/// Accept until shutdown, one task per connection, bounded by `limits.max_connections`.
async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, entry: Entry, mut shutdown: watch::Receiver<bool>) {
    loop {
        let permit = tokio::select! {
            biased;
            _ = shutdown_requested(&mut shutdown) => return,
            p = shared.permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            biased;
            _ = shutdown_requested(&mut shutdown) => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            match entry {
                Entry::Captured => {
                    if let Ok(local) = stream.local_addr() {
                        handle(&shared, stream, peer, local, shutdown).await;
                    }
                }
                Entry::Direct(route) => handle_direct(&shared, stream, peer, route, shutdown).await,
            }
            drop(permit);
        });
    }
}

/// A connection on a route's explicit listener: agents configured with tollgate as their base
/// URL. No kernel record exists for these connections; the caller is named `direct`.
async fn handle_direct(
    shared: &Shared,
    stream: TcpStream,
    peer: SocketAddr,
    route: usize,
    shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let agent = Arc::new(Agent::unknown("direct"));
    let Some(r) = shared.deps.config.routes.get(route) else { return };
    if let Some(ctx) = l7_context(shared, &agent, r, peer, None, false) {
        shared.deps.telemetry.connection(Some(&agent), ConnKind::Http);
        serve_http(stream, ctx, shutdown).await;
    }
}

async fn handle(
    shared: &Shared,
    stream: TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let deps = &shared.deps;
    // Streamed events are small writes: without this, Nagle + delayed ACK hold them ~40 ms.
    let _ = stream.set_nodelay(true);
    let Some(rec) = deps.flows.take(peer, local) else {
        tracing::debug!(%peer, %local, "no capture record; closing");
        deps.telemetry.connection(None, ConnKind::NoRecord);
        return;
    };
    let orig = orig_dst(&rec);
    let resolver = deps.agents.clone();
    let agent = match tokio::task::spawn_blocking(move || resolver.resolve(&rec)).await {
        Ok(a) => Arc::new(a),
        Err(_) => Arc::new(Agent::unknown("unknown")),
    };
    let cfg = &deps.config;
    let sniffed = match sniff::sniff(&stream, cfg.limits.sniff_timeout).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, %orig, error = %e, "sniff failed; closing");
            deps.telemetry.connection(Some(&agent), ConnKind::SniffFailed);
            return;
        }
    };
    match sniffed {
        Sniffed::Tls { sni: Some(name) } => match cfg.route_for(Some(&name), Some(orig)).filter(|r| r.intercept) {
            Some(route) => intercept(shared, stream, agent, orig, route, name, shutdown).await,
            None => do_splice(shared, stream, agent, orig, Some(name)).await,
        },
        Sniffed::Tls { sni: None } | Sniffed::Other => do_splice(shared, stream, agent, orig, None).await,
        Sniffed::Http { host } => match cfg.route_for(host.as_deref(), Some(orig)) {
            Some(route) => {
                let Some(ctx) = l7_context(shared, &agent, route, orig, host.as_deref(), false) else {
                    return;
                };
                deps.telemetry.connection(Some(&agent), ConnKind::Http);
                serve_http(stream, ctx, shutdown).await;
            }
            None => do_splice(shared, stream, agent, orig, None).await,
        },
    }
}

async fn do_splice(shared: &Shared, stream: TcpStream, agent: Arc<Agent>, orig: SocketAddr, sni: Option<String>) {
    shared.deps.telemetry.connection(Some(&agent), ConnKind::Spliced);
    splice::splice(stream, orig, sni, agent, &shared.upstream, &shared.deps.telemetry).await;
}

async fn intercept(
    shared: &Shared,
    stream: TcpStream,
    agent: Arc<Agent>,
    orig: SocketAddr,
    route: &RouteConfig,
    name: String,
    shutdown: watch::Receiver<bool>,
) {
    let Some(ctx) = l7_context(shared, &agent, route, orig, Some(&name), true) else {
        return;
    };
    shared.deps.telemetry.connection(Some(&agent), ConnKind::Intercepted);
    let acceptor = tokio_rustls::TlsAcceptor::from(shared.tls_server.clone());
    let handshake = tokio::time::timeout(shared.deps.config.limits.sniff_timeout, acceptor.accept(stream)).await;
    match handshake {
        Ok(Ok(tls)) => serve_http(tls, ctx, shutdown).await,
        Ok(Err(e)) => {
            // Usually the agent does not trust the interception CA.
            tracing::warn!(sni = %name, agent = %agent.name, error = %e, "interception handshake failed");
        }
        Err(_) => tracing::debug!(sni = %name, "interception handshake timed out"),
    }
}

fn l7_context(
    shared: &Shared,
    agent: &Arc<Agent>,
    route: &RouteConfig,
    orig: SocketAddr,
    name: Option<&str>,
    tls: bool,
) -> Option<Arc<L7Context>> {
    let direct = route.listener.is_some() && route.matcher.hosts.is_empty() && route.matcher.addresses.is_empty();
    let has_origin = !direct || route.upstream.is_some();
    let target = if has_origin { Target::new(route, orig, name, tls) } else { Ok(Target::none()) };
    match target {
        Ok(target) => Some(Arc::new(L7Context {
            agent: agent.clone(),
            route: Arc::from(route.name.as_str()),
            provider: route.provider,
            target,
            upstream: shared.upstream.clone(),
            config: shared.deps.config.clone(),
            reporter: shared.reporter.clone(),
            gateway: shared.gateway.route(&route.name),
            include_usage: route.include_usage,
            log_payloads: route.log_payloads.enabled.then_some(route.log_payloads.max_bytes),
            paths: Arc::from(route.matcher.paths.as_slice()),
            has_origin,
        })),
        Err(e) => {
            tracing::warn!(route = %route.name, error = %e, "cannot build upstream target; closing");
            None
        }
    }
}

/// HTTP/1.1 server on one agent connection; on shutdown, finish the request in flight and close.
async fn serve_http<S>(io: S, ctx: Arc<L7Context>, mut shutdown: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| crate::protocol::handle(ctx.clone(), req));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "L7 connection ended with error");
            }
        }
        _ = shutdown_requested(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
