//! The transparent proxy's front door: accept captured connections, learn from the kernel who
//! made them and where they were going, sniff the first bytes, then either terminate TLS and
//! handle HTTP at L7 (AI routes) or splice bytes untouched to the original destination.
//!
//! A connection without a kernel record is closed at once: tollgate is never an open proxy.

pub mod listener;
pub mod observed;
pub mod sniff;
pub mod splice;
pub mod tls;
pub mod trust;

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

use arc_swap::ArcSwap;

use crate::capture::heartbeat::AcceptProgress;
use crate::capture::uprobe::TlsProber;
use crate::capture::{identity::orig_dst, Agent, AgentResolver, FlowTable};
use crate::config::{Config, InterceptMode, RouteConfig};
use crate::policy::chain::{Policies, PolicyError};
use crate::policy::limits::BackendState;
use crate::policy::CircuitState;
use crate::protocol::llm::dispatch::{Gateway, GatewayError};
use crate::protocol::llm::Reporter;
use crate::protocol::mcp::federation::{FederationError, Federations};
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
    /// Connections the proxy terminates now, shared with the uprobe observer so it does not
    /// count their calls again.
    pub intercepted: Arc<trust::Intercepted>,
    /// With the TLS uprobes running: probes the agent's TLS library before its TLS connection
    /// is spliced, so a library loaded since the last rescan misses no plaintext.
    pub tls_prober: Option<TlsProber>,
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
    /// Governance policies could not be built (limiter, guardrails).
    #[error("policies: {0}")]
    Policies(#[from] PolicyError),
    /// An MCP federation could not be set up.
    #[error("federation: {0}")]
    Federation(#[from] FederationError),
    /// A route's listener token could not be read.
    #[error("routes[{route}].listener_auth.token: {source}")]
    ListenerToken {
        /// Route name.
        route: String,
        /// Why.
        source: crate::upstream::credentials::CredentialError,
    },
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

/// What one config generation needs at run time. A connection takes the generation current at
/// accept and keeps its routes, targets, upstream client and kernel decision to its end; each
/// request on it is judged by the policies of the generation current when the request starts
/// (see [`PerRequest`]), so a reload never changes rules under an in-flight stream yet reaches
/// keep-alive connections at their next request.
struct Generation {
    config: Arc<Config>,
    agents: Arc<AgentResolver>,
    upstream: Arc<Upstream>,
    gateway: Arc<Gateway>,
    /// Access rules, guardrails and token limits of this generation (token counters live in
    /// its limiter: a reload starts local counters afresh; Redis counters carry on).
    policies: Arc<Policies>,
    /// Process-unique id of this generation's limiter, for the exported error counter.
    limiter_id: u64,
    /// MCP federation endpoints (their stdio servers run while a generation holds them).
    federations: Arc<Federations>,
    /// Admission checks of explicit listeners, by route name (routes without one admit all).
    gates: std::collections::HashMap<String, Arc<listener::ListenerGate>>,
}

impl Generation {
    async fn build(
        config: Arc<Config>,
        agents: Arc<AgentResolver>,
        telemetry: &Arc<Telemetry>,
        previous: Option<&Generation>,
    ) -> Result<Generation, ProxyError> {
        let upstream = Arc::new(Upstream::new(&config)?);
        let gateway = Arc::new(Gateway::new(&config)?);
        let policies = Arc::new(Policies::build(&config, telemetry).await?);
        let limiter_id = crate::telemetry::governance::next_limiter_id();
        // Process-wide tables (they outlive a generation) take this generation's bounds.
        crate::protocol::mcp::session::set_max(config.mcp.max_sessions);
        crate::protocol::a2a::set_max_cards(config.a2a.max_cards);
        crate::protocol::bounded::budget().set_capacity(config.limits.max_buffered_body_bytes);
        let kept = previous.map(|p| &*p.federations);
        let federations = Arc::new(Federations::build(&config, &upstream, telemetry, kept)?);
        let mut gates = std::collections::HashMap::new();
        for r in config.routes.iter().filter(|r| r.listener.is_some()) {
            let gate = listener::ListenerGate::build(r)
                .map_err(|source| ProxyError::ListenerToken { route: r.name.clone(), source })?;
            if let Some(g) = gate {
                gates.insert(r.name.clone(), Arc::new(g));
            }
        }
        Ok(Generation { config, agents, upstream, gateway, policies, limiter_id, federations, gates })
    }
}

/// State shared by every connection task.
struct Shared {
    flows: Arc<dyn FlowTable>,
    tls_prober: Option<TlsProber>,
    telemetry: Arc<Telemetry>,
    current: ArcSwap<Generation>,
    tls_server: Arc<ServerConfig>,
    /// `intercept: auto` decisions and learned splices.
    trust: Arc<trust::Trust>,
    intercepted: Arc<trust::Intercepted>,
    reporter: Arc<Reporter>,
    permits: Arc<Semaphore>,
    max: usize,
}

/// The proxy before it serves: generation 0 built, explicit route listeners bound.
pub struct Proxy {
    shared: Arc<Shared>,
    direct: Vec<(String, TcpListener)>,
    /// Progress of the captured listeners' accept loops, for the capture heartbeat.
    progress: Arc<AcceptProgress>,
}

/// Swaps in new config generations while the proxy runs (cheap to clone).
#[derive(Clone)]
pub struct ProxyHandle(Arc<Shared>);

/// A built but not yet serving generation: lets a reload fail on providers or keys before
/// anything else (capture rules) changes.
pub struct Prepared(Generation);

impl ProxyHandle {
    /// Build a generation from `config` (providers, keys, upstream client). Explicit route
    /// listeners are bound once: a changed `routes[].listener` needs a restart (the caller
    /// reports it).
    pub async fn prepare(&self, config: Arc<Config>, agents: Arc<AgentResolver>) -> Result<Prepared, ProxyError> {
        let previous = self.0.current.load_full();
        Ok(Prepared(Generation::build(config, agents, &self.0.telemetry, Some(&previous)).await?))
    }

    /// Make a prepared generation the current one: new connections take it whole; connections
    /// already accepted keep their route and upstream but judge their next request by its
    /// policies.
    pub fn commit(&self, next: Prepared) {
        self.0.current.store(Arc::new(next.0));
    }

    /// Connections being served now.
    pub fn in_flight(&self) -> usize {
        self.0.max - self.0.permits.available_permits()
    }
}

impl Proxy {
    /// Build the first generation and bind every route's explicit listener.
    pub async fn new(deps: ProxyDeps) -> Result<Proxy, ProxyError> {
        let tls_server = deps.ca.server_config()?;
        let trust = Arc::new(trust::Trust::new(deps.ca.cert_der().to_vec(), &deps.config.tls.auto));
        let reporter = Arc::new(Reporter::new(deps.telemetry.clone(), deps.observer.clone()));
        let max = deps.config.limits.max_connections.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
        let permits = Arc::new(Semaphore::new(max));
        let first = Generation::build(deps.config.clone(), deps.agents.clone(), &deps.telemetry, None).await?;
        let mut direct = Vec::new();
        for r in &deps.config.routes {
            if let Some(addr) = r.listener {
                let l = TcpListener::bind(addr).await.map_err(|source| ProxyError::Bind {
                    route: r.name.clone(),
                    addr,
                    source,
                })?;
                direct.push((r.name.clone(), l));
            }
        }
        let shared = Arc::new(Shared {
            flows: deps.flows,
            tls_prober: deps.tls_prober,
            telemetry: deps.telemetry,
            current: ArcSwap::from_pointee(first),
            tls_server,
            trust,
            intercepted: deps.intercepted,
            reporter,
            permits,
            max,
        });
        let weak = Arc::downgrade(&shared);
        shared.telemetry.governance.set_limiter_source(Box::new(move || {
            let s = weak.upgrade()?;
            let g = s.current.load();
            let l = g.policies.limiter()?;
            let state = match l.backend_state() {
                BackendState::Redis => 0,
                BackendState::LocalFallback => 1,
                BackendState::Down => 2,
            };
            Some((state, l.stats().redis_errors.load(std::sync::atomic::Ordering::Relaxed), g.limiter_id))
        }));
        let weak = Arc::downgrade(&shared);
        shared.telemetry.metrics.set_circuit_source(Box::new(move || {
            let Some(s) = weak.upgrade() else { return Vec::new() };
            let g = s.current.load();
            let mut out = Vec::new();
            for r in g.gateway.routes() {
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
        Ok(Proxy { shared, direct, progress: Arc::default() })
    }

    /// Report the captured listeners' accept progress to `progress`: the capture heartbeat
    /// stamps only while they accept (see [`crate::capture::heartbeat`]).
    pub fn with_accept_progress(mut self, progress: Arc<AcceptProgress>) -> Self {
        self.progress = progress;
        self
    }

    /// A handle for reloads.
    pub fn handle(&self) -> ProxyHandle {
        ProxyHandle(self.shared.clone())
    }

    /// Serve until `shutdown` flips to true; then stop accepting and let in-flight connections
    /// finish. L7 connections finish their current request and close; spliced connections run
    /// to their end, so callers wanting a hard stop bound this future with a timeout. A dropped
    /// `shutdown` sender counts as shutdown.
    pub async fn serve(self, listeners: Vec<TcpListener>, shutdown: watch::Receiver<bool>) -> Result<(), ProxyError> {
        let shared = self.shared;
        let mut accepts = JoinSet::new();
        for l in listeners {
            let progress = Some(self.progress.clone());
            accepts.spawn(accept_loop(shared.clone(), l, Entry::Captured, progress, shutdown.clone()));
        }
        for (name, l) in self.direct {
            accepts.spawn(accept_loop(shared.clone(), l, Entry::Direct(Arc::from(name)), None, shutdown.clone()));
        }
        while accepts.join_next().await.is_some() {}
        // Every connection task holds a permit: all permits back means all connections done.
        let _all = shared.permits.acquire_many(shared.max as u32).await;
        Ok(())
    }
}

/// [`Proxy::new`] then [`Proxy::serve`], for callers that never reload.
pub async fn serve(
    deps: ProxyDeps,
    listeners: Vec<TcpListener>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ProxyError> {
    Proxy::new(deps).await?.serve(listeners, shutdown).await
}

/// Resolves once shutdown is requested (or can no longer be requested).
pub async fn shutdown_requested(rx: &mut watch::Receiver<bool>) {
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
#[derive(Clone)]
enum Entry {
    /// Captured connections (a kernel record says who and where to).
    Captured,
    /// A route's explicit listener (route name, looked up in the current generation).
    Direct(Arc<str>),
}

/// Accept until shutdown, one task per connection, bounded by `limits.max_connections`.
/// `progress` (captured listeners) learns of every accept and every wait for a permit.
async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    entry: Entry,
    progress: Option<Arc<AcceptProgress>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        // Accept first, then wait for a permit: a listener waiting for a permit holds at most
        // the one connection it accepted, never a permit it has no connection for (which with
        // a small `limits.max_connections` would starve the other listeners, e.g. IPv6 or a
        // route's own listener, while this one sits in accept()).
        let accepted = tokio::select! {
            biased;
            _ = shutdown_requested(&mut shutdown) => return,
            r = listener.accept() => r,
        };
        if let Some(p) = &progress {
            p.accepted();
        }
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match shared.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let _held_back = progress.as_ref().map(|p| p.waiting_for_permit());
                tokio::select! {
                    biased;
                    _ = shutdown_requested(&mut shutdown) => return,
                    p = shared.permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                }
            }
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let entry = entry.clone();
        tokio::spawn(async move {
            let generation = shared.current.load_full();
            let conn = Conn { shared: &shared, generation: &generation };
            match entry {
                Entry::Captured => {
                    if let Ok(local) = stream.local_addr() {
                        handle(&conn, stream, peer, local, shutdown).await;
                    }
                }
                Entry::Direct(route) => handle_direct(&conn, stream, peer, &route, shutdown).await,
            }
            drop(permit);
        });
    }
}

/// One connection's view: the shared state and the generation it was accepted under.
struct Conn<'a> {
    shared: &'a Arc<Shared>,
    generation: &'a Generation,
}

/// A connection on a route's explicit listener: agents configured with tollgate as their base
/// URL. No kernel record exists for these connections; the caller is named `direct`.
async fn handle_direct(
    c: &Conn<'_>,
    stream: TcpStream,
    peer: SocketAddr,
    route: &str,
    shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let agent = Arc::new(Agent::unknown("direct"));
    // A route removed by a reload keeps its listener until restart; its connections are closed.
    let Some(r) = c.generation.config.routes.iter().find(|r| r.name == route) else { return };
    // No original destination: `peer` only stands in for it.
    if let Some(ctx) = l7_context(c, &agent, r, Dest { addr: peer, captured: false }, None, false) {
        c.shared.telemetry.connection(Some(&agent), ConnKind::Http);
        serve_http(stream, PerRequest::new(c, ctx, Some(peer.ip())), shutdown).await;
    }
}

async fn handle(c: &Conn<'_>, stream: TcpStream, peer: SocketAddr, local: SocketAddr, shutdown: watch::Receiver<bool>) {
    let shared = c.shared;
    // Streamed events are small writes: without this, Nagle + delayed ACK hold them ~40 ms.
    let _ = stream.set_nodelay(true);
    let Some(rec) = shared.flows.take(peer, local) else {
        tracing::debug!(%peer, %local, "no capture record; closing");
        shared.telemetry.connection(None, ConnKind::NoRecord);
        return;
    };
    let orig = orig_dst(&rec);
    let caller = (rec.tgid, rec.cgroup_id, rec.cookie);
    let resolver = c.generation.agents.clone();
    let agent = match tokio::task::spawn_blocking(move || resolver.resolve(&rec)).await {
        Ok(a) => Arc::new(a),
        Err(_) => Arc::new(Agent::unknown("unknown")),
    };
    let cfg = &c.generation.config;
    let sniffed = match sniff::sniff(&stream, cfg.limits.sniff_timeout).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, %orig, error = %e, "sniff failed; closing");
            shared.telemetry.connection(Some(&agent), ConnKind::SniffFailed);
            return;
        }
    };
    match sniffed {
        Sniffed::Tls { sni: Some(name) } => {
            let (pid, cgroup, cookie) = caller;
            match cfg.route_for(Some(&name), Some(orig)).filter(|r| r.intercept.may_intercept()) {
                Some(route) if decide(c, route.intercept, &agent, pid, cgroup, &name).await => {
                    let _mark = shared.intercepted.mark(cookie);
                    intercept(c, stream, agent, orig, route, name, shutdown).await;
                }
                _ => {
                    probe_tls_library(shared, pid).await;
                    do_splice(c, stream, agent, orig, Some(name)).await;
                }
            }
        }
        Sniffed::Tls { sni: None } => {
            probe_tls_library(shared, caller.0).await;
            do_splice(c, stream, agent, orig, None).await
        }
        Sniffed::Other => do_splice(c, stream, agent, orig, None).await,
        Sniffed::Http { host } => match cfg.route_for(host.as_deref(), Some(orig)) {
            Some(route) => {
                let dest = Dest { addr: orig, captured: true };
                let Some(ctx) = l7_context(c, &agent, route, dest, host.as_deref(), false) else {
                    return;
                };
                shared.telemetry.connection(Some(&agent), ConnKind::Http);
                serve_http(stream, PerRequest::new(c, ctx, None), shutdown).await;
            }
            None => do_splice(c, stream, agent, orig, None).await,
        },
    }
}

/// Whether to terminate this TLS connection (see [`trust`]), counted by agent and reason.
async fn decide(c: &Conn<'_>, mode: InterceptMode, agent: &Arc<Agent>, pid: u32, cgroup: u64, sni: &str) -> bool {
    let trust = c.shared.trust.clone();
    let (name, sni_owned) = (agent.name.clone(), sni.to_owned());
    let verdict = match mode {
        InterceptMode::Always => trust.decide(mode, trust::Caller { agent: &name, pid, cgroup }, sni),
        _ => tokio::task::spawn_blocking(move || {
            trust.decide(mode, trust::Caller { agent: &name, pid, cgroup }, &sni_owned)
        })
        .await
        .unwrap_or(trust::Verdict { intercept: false, reason: trust::Reason::Unreadable }),
    };
    let label = c.shared.telemetry.metrics.agent_label(&agent.name);
    c.shared.telemetry.intercept.decision(&label, verdict.intercept, verdict.reason.as_str());
    verdict.intercept
}

/// Longest a splice waits for the probe of the agent's TLS library (a rescan of all processes
/// in progress holds the scanner); past it the connection goes on, as it would without uprobes.
const TLS_PROBE_WAIT: Duration = Duration::from_millis(500);

/// Before a captured TLS connection is spliced, probe the TLS library of the process that made
/// it if it is not probed yet (see [`TlsProber`]): the agent's first request is written only
/// after the handshake, and the handshake waits for the splice.
async fn probe_tls_library(shared: &Shared, tgid: u32) {
    let Some(p) = shared.tls_prober.clone() else {
        return;
    };
    let job = tokio::task::spawn_blocking(move || p.probe_process(tgid));
    if tokio::time::timeout(TLS_PROBE_WAIT, job).await.is_err() {
        tracing::debug!(tgid, "TLS library probe still running at splice time");
    }
}

async fn do_splice(c: &Conn<'_>, stream: TcpStream, agent: Arc<Agent>, orig: SocketAddr, sni: Option<String>) {
    c.shared.telemetry.connection(Some(&agent), ConnKind::Spliced);
    splice::splice(stream, orig, sni, agent, &c.generation.upstream, &c.shared.telemetry).await;
}

async fn intercept(
    c: &Conn<'_>,
    stream: TcpStream,
    agent: Arc<Agent>,
    orig: SocketAddr,
    route: &RouteConfig,
    name: String,
    shutdown: watch::Receiver<bool>,
) {
    let Some(ctx) = l7_context(c, &agent, route, Dest { addr: orig, captured: true }, Some(&name), true) else {
        return;
    };
    c.shared.telemetry.connection(Some(&agent), ConnKind::Intercepted);
    let acceptor = tokio_rustls::TlsAcceptor::from(c.shared.tls_server.clone());
    let handshake = tokio::time::timeout(c.generation.config.limits.sniff_timeout, acceptor.accept(stream)).await;
    let failure = match handshake {
        Ok(Ok(tls)) => return serve_http(tls, PerRequest::new(c, ctx, None), shutdown).await,
        Ok(Err(e)) => (trust::HandshakeFailure::of(&e), e.to_string()),
        Err(_) => (trust::HandshakeFailure::Timeout, "timed out".to_owned()),
    };
    let (why, error) = failure;
    let label = c.shared.telemetry.metrics.agent_label(&agent.name);
    c.shared.telemetry.intercept.failure(&label, why.as_str());
    // Under `auto`, a client that rejected tollgate's certificate is spliced from its next
    // connection on: it fails this once. `intercept: true` stays strict.
    let learned = route.intercept == InterceptMode::Auto && why.teaches_splice();
    if learned {
        c.shared.trust.learn_failure(&agent.name, &name);
    }
    tracing::warn!(
        sni = %name,
        agent = %agent.name,
        reason = why.as_str(),
        error = %error,
        spliced_from_now_on = learned,
        "interception handshake failed"
    );
}

/// Where a connection was going: the kernel's original destination for captured connections;
/// for explicit listeners (no original destination) the peer stands in.
struct Dest {
    addr: SocketAddr,
    captured: bool,
}

fn l7_context(
    c: &Conn<'_>,
    agent: &Arc<Agent>,
    route: &RouteConfig,
    dest: Dest,
    name: Option<&str>,
    tls: bool,
) -> Option<Arc<L7Context>> {
    let orig = dest.addr;
    let direct = route.listener.is_some() && route.matcher.hosts.is_empty() && route.matcher.addresses.is_empty();
    let has_origin = !direct || route.upstream.is_some();
    let target = if has_origin { Target::new(route, orig, name, tls) } else { Ok(Target::none()) };
    match target {
        Ok(target) => Some(Arc::new(L7Context {
            agent: agent.clone(),
            route: Arc::from(route.name.as_str()),
            protocol: route.protocol,
            provider: route.provider,
            target,
            upstream: c.generation.upstream.clone(),
            config: c.generation.config.clone(),
            reporter: c.shared.reporter.clone(),
            gateway: c.generation.gateway.route(&route.name),
            include_usage: route.include_usage,
            log_payloads: route.log_payloads.enabled.then_some(route.log_payloads.max_bytes),
            paths: Arc::from(route.matcher.paths.as_slice()),
            has_origin,
            policies: c.generation.policies.clone(),
            groups: c.generation.policies.groups_of(&agent.name),
            federation: route.federation.as_deref().and_then(|f| c.generation.federations.get(f)),
            callee_pod: (route.protocol == crate::config::RouteProtocol::A2a && dest.captured)
                .then(|| c.generation.agents.pod_agent_at(orig.ip()))
                .flatten(),
        })),
        Err(e) => {
            tracing::warn!(route = %route.name, error = %e, "cannot build upstream target; closing");
            None
        }
    }
}

/// The context of each request on one L7 connection: the connection's own, with the policies of
/// the newest config generation (and, on an explicit listener, that generation's admission
/// check). Rebuilt only when a reload replaced them (one atomic load and a pointer compare per
/// request otherwise).
struct PerRequest {
    shared: Arc<Shared>,
    current: parking_lot::Mutex<(Arc<L7Context>, Option<Arc<listener::ListenerGate>>)>,
    /// The caller's address, on explicit listeners (whose requests pass the route's gate).
    listener_peer: Option<std::net::IpAddr>,
}

impl PerRequest {
    fn new(c: &Conn<'_>, ctx: Arc<L7Context>, listener_peer: Option<std::net::IpAddr>) -> PerRequest {
        let gate = listener_peer.and_then(|_| c.generation.gates.get(&*ctx.route).cloned());
        PerRequest { shared: c.shared.clone(), current: parking_lot::Mutex::new((ctx, gate)), listener_peer }
    }

    /// The context for a request starting now, and the listener gate it must pass.
    fn current(&self) -> (Arc<L7Context>, Option<Arc<listener::ListenerGate>>) {
        let generation = self.shared.current.load();
        let mut cur = self.current.lock();
        if !Arc::ptr_eq(&cur.0.policies, &generation.policies) {
            let ctx = Arc::new(cur.0.with_policies(generation.policies.clone()));
            let gate = self.listener_peer.and_then(|_| generation.gates.get(&*ctx.route).cloned());
            *cur = (ctx, gate);
        }
        cur.clone()
    }

    /// Serve one request: refused in the route's API shape when the listener gate says so.
    async fn serve(
        self: Arc<Self>,
        mut req: http::Request<hyper::body::Incoming>,
    ) -> Result<http::Response<crate::protocol::http::ProxyBody>, std::convert::Infallible> {
        let (ctx, gate) = self.current();
        if let (Some(gate), Some(peer)) = (gate, self.listener_peer) {
            if let Err(why) = gate.admit(peer, req.headers_mut()) {
                self.shared.telemetry.node.listener_refused(&ctx.route, why.label());
                tracing::debug!(route = %ctx.route, %peer, reason = why.label(), "listener caller refused");
                return Ok(listener::refusal(&ctx.route, ctx.provider, why));
            }
        }
        crate::protocol::handle(ctx, req).await
    }
}

/// HTTP/1.1 server on one agent connection; on shutdown, finish the request in flight and close.
async fn serve_http<S>(io: S, per_request: PerRequest, mut shutdown: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let per_request = Arc::new(per_request);
    let svc = service_fn(move |req| per_request.clone().serve(req));
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
