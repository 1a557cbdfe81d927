//! L7 without interception: the agent's TLS plaintext, delivered by the uprobes as
//! [`TlsEvent`]s, reassembled per connection into HTTP/1.1 exchanges and fed to the same LLM,
//! MCP and A2A readers and telemetry as intercepted calls, marked `capture = uprobe`.
//!
//! Observation cannot refuse anything, so no policy runs; everything else (route by `Host`,
//! provider kind, usage, estimates, spans, access-log lines) is what the proxy does. One task
//! reads the events (the kernel delivers them in order per connection); memory is bounded per
//! connection and direction and in the number of connections ([`ObservedLimits`]); a connection
//! over a bound loses its L7 state, counted in `tollgate_uprobe_l7_dropped_total{reason}`, and
//! what it had in flight is reported cut with usage flagged estimated.

mod conn;
mod decode;
mod exchange;
mod http1;
mod llm;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_decode;
#[cfg(test)]
mod tests_wire;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::capture::identity::orig_dst;
use crate::capture::uprobe::{ConnId, Direction, TlsEvent};
use crate::capture::{Agent, AgentResolver};
use crate::config::Config;
use crate::protocol::llm::Reporter;
use crate::telemetry::{LlmCall, Telemetry};
use conn::{Conn, Env};

/// Bounds of the observation task. Plain values with defaults; the integrator puts them under
/// the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedLimits {
    /// Connections with L7 state at once; more are not parsed (reason `max_connections`).
    pub max_connections: usize,
    /// Largest message head held, per direction (reason `header_bytes`).
    pub max_head_bytes: usize,
    /// Largest request body held to read its model and flags (reason `body_bytes`); response
    /// bodies are read as the proxy reads them (`limits.max_inspect_bytes`,
    /// `limits.max_sse_event_bytes`).
    pub max_body_bytes: usize,
    /// Requests awaiting their responses on one connection (reason `pipeline`).
    pub max_pipeline: usize,
    /// A connection silent this long loses its state (reason `idle`): its close was missed.
    pub idle_timeout: Duration,
}

impl Default for ObservedLimits {
    /// The config's defaults (`capture.uprobes.l7`).
    fn default() -> Self {
        ObservedLimits::from(&crate::config::ObservedL7Config::default())
    }
}

impl From<&crate::config::ObservedL7Config> for ObservedLimits {
    fn from(c: &crate::config::ObservedL7Config) -> Self {
        ObservedLimits {
            max_connections: c.max_connections,
            max_head_bytes: c.max_head_bytes,
            max_body_bytes: c.max_body_bytes,
            max_pipeline: c.max_pipeline,
            idle_timeout: c.idle_timeout,
        }
    }
}

/// What the observation task needs from the rest of tollgate.
pub struct ObservedDeps {
    /// The current config generation (routes, limits), swapped by reloads.
    pub config: Arc<ArcSwap<Config>>,
    /// Kernel record → agent identity, as the proxy resolves it.
    pub agents: Arc<AgentResolver>,
    /// Where calls are reported.
    pub telemetry: Arc<Telemetry>,
    /// Bounds of the task.
    pub limits: ObservedLimits,
    /// Optional copy of every reported [`LlmCall`] (tests, in-process consumers).
    pub observer: Option<mpsc::Sender<LlmCall>>,
    /// Connections the proxy terminates (under `intercept: auto`): not counted here again.
    pub intercepted: Arc<super::trust::Intercepted>,
}

/// Start the observation task: it reads `rx` until the sender is gone or `shutdown` flips to
/// true, then reports what is in flight as cut.
pub fn spawn(rx: mpsc::Receiver<TlsEvent>, deps: ObservedDeps, shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(run(rx, deps, shutdown))
}

/// A connection's entry: its L7 state, or a tombstone that makes its later bytes ignored.
enum Slot {
    Live(Box<Conn>),
    Dropped(Instant),
}

struct Task {
    deps: ObservedDeps,
    reporter: Arc<Reporter>,
    conns: HashMap<ConnId, Slot>,
    live: usize,
}

async fn run(mut rx: mpsc::Receiver<TlsEvent>, deps: ObservedDeps, mut shutdown: watch::Receiver<bool>) {
    let reporter = Arc::new(Reporter::new(deps.telemetry.clone(), deps.observer.clone()));
    let period = (deps.limits.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(5));
    let mut t = Task { deps, reporter, conns: HashMap::new(), live: 0 };
    let mut sweep = tokio::time::interval(period);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = super::shutdown_requested(&mut shutdown) => break,
            ev = rx.recv() => match ev {
                Some(ev) => t.event(ev).await,
                None => break,
            },
            _ = sweep.tick() => t.sweep(),
        }
    }
    for (_, slot) in t.conns.drain() {
        if let Slot::Live(c) = slot {
            t.deps.telemetry.observed.dropped("shutdown");
            c.drop_state("shutdown");
        }
    }
    t.deps.telemetry.observed.connections.set(0);
}

impl Task {
    async fn event(&mut self, ev: TlsEvent) {
        let id = ev.conn();
        let (record, data) = match ev {
            TlsEvent::Close { conn, .. } => {
                match self.conns.remove(&conn) {
                    Some(Slot::Live(c)) => {
                        self.live -= 1;
                        c.close();
                    }
                    Some(Slot::Dropped(_)) | None => {}
                }
                self.gauge();
                return;
            }
            TlsEvent::Data { record, direction, data, gap_before, gap_other, .. } => {
                (record, (direction, data, gap_before, gap_other))
            }
        };
        if !self.conns.contains_key(&id) {
            if self.live >= self.deps.limits.max_connections {
                self.deps.telemetry.observed.dropped("max_connections");
                // Tombstones are bounded too: past them, a refused connection counts again.
                if self.conns.len() < self.deps.limits.max_connections.saturating_mul(4) {
                    self.conns.insert(id, Slot::Dropped(Instant::now()));
                }
                return;
            }
            let agent = self.resolve(record).await;
            let mut c = Conn::new(agent, orig_dst(&record), &self.deps.limits);
            // Marked by the proxy before its handshake, so before any plaintext exists.
            c.intercepted = self.deps.intercepted.contains(record.cookie);
            self.conns.insert(id, Slot::Live(Box::new(c)));
            self.live += 1;
            self.gauge();
        }
        let Some(Slot::Live(c)) = self.conns.get_mut(&id) else { return };
        let config = self.deps.config.load();
        let env =
            Env { config: &config, agents: &self.deps.agents, reporter: &self.reporter, limits: &self.deps.limits };
        let (direction, data, gap, gap_other) = data;
        let r = match direction {
            Direction::Egress => c.egress(&env, data, gap),
            Direction::Ingress => {
                // Response bytes while request bytes are missing: the request those bytes
                // belonged to cannot be exact (lost response bytes need no such signal: the
                // response cannot end without them, so its next event or the close reports it).
                if gap_other {
                    c.egress_lost();
                }
                c.ingress(data, gap)
            }
        };
        if let Err(why) = r {
            self.drop_conn(id, why);
        }
    }

    /// Who the record names, resolved as the proxy does (small blocking reads, off the task).
    async fn resolve(&self, record: gateway_common::CaptureRecord) -> Arc<Agent> {
        let resolver = self.deps.agents.clone();
        match tokio::task::spawn_blocking(move || resolver.resolve(&record)).await {
            Ok(a) => Arc::new(a),
            Err(_) => Arc::new(Agent::unknown("unknown")),
        }
    }

    fn drop_conn(&mut self, id: ConnId, why: &'static str) {
        if let Some(Slot::Live(c)) = self.conns.insert(id, Slot::Dropped(Instant::now())) {
            self.live -= 1;
            tracing::debug!(agent = %c.agent().name, reason = why, "observed connection dropped");
            self.deps.telemetry.observed.dropped(why);
            c.drop_state(why);
        }
        self.gauge();
    }

    /// Drop connections silent past the idle timeout (their close was missed), and old
    /// tombstones.
    fn sweep(&mut self) {
        let timeout = self.deps.limits.idle_timeout;
        let now = Instant::now();
        let stale: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, s)| match s {
                Slot::Live(c) => now.duration_since(c.last) >= timeout,
                Slot::Dropped(at) => now.duration_since(*at) >= timeout,
            })
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            match self.conns.remove(&id) {
                Some(Slot::Live(c)) => {
                    self.live -= 1;
                    self.deps.telemetry.observed.dropped("idle");
                    c.drop_state("idle");
                }
                Some(Slot::Dropped(_)) | None => {}
            }
        }
        self.gauge();
    }

    fn gauge(&self) {
        self.deps.telemetry.observed.connections.set(self.live as i64);
    }
}
