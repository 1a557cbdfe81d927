//! Metrics of MCP federations: whether each upstream server is up, how often stdio servers
//! were restarted and HTTP sessions re-initialised, name collisions, and live client sessions.
//! Their labels are config names (federation, server), so they need no cardinality bound.

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

/// The federation metric families (see the README's metrics table).
pub struct FederationMetrics {
    up: IntGaugeVec,
    restarts: IntCounterVec,
    reinits: IntCounterVec,
    collisions: IntCounterVec,
    sessions: IntGaugeVec,
    auth_refusals: IntCounterVec,
}

impl FederationMetrics {
    /// Register every family on `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let up = IntGaugeVec::new(
            Opts::new(
                "tollgate_mcp_upstream_up",
                "1 while a federated MCP server answers (stdio: process running and initialised), by federation and server",
            ),
            &["federation", "server"],
        )?;
        let restarts = IntCounterVec::new(
            Opts::new(
                "tollgate_mcp_upstream_restarts_total",
                "Restarts of supervised stdio MCP servers after they exited",
            ),
            &["federation", "server"],
        )?;
        let reinits = IntCounterVec::new(
            Opts::new(
                "tollgate_mcp_upstream_reinitializations_total",
                "Upstream MCP sessions initialised again because the server lost them (HTTP 404, e.g. after a restart)",
            ),
            &["federation", "server"],
        )?;
        let collisions = IntCounterVec::new(
            Opts::new(
                "tollgate_mcp_federation_collisions_total",
                "Entries hidden from a federated list because another server owns the name (tool_names: never, or URIs)",
            ),
            &["federation"],
        )?;
        let sessions = IntGaugeVec::new(
            Opts::new("tollgate_mcp_federation_sessions", "Client sessions open on a federation endpoint"),
            &["federation"],
        )?;
        let auth_refusals = IntCounterVec::new(
            Opts::new(
                "tollgate_mcp_auth_refusals_total",
                "Requests a federation endpoint refused for their bearer token (401/403/503), by reason",
            ),
            &["federation", "reason"],
        )?;
        registry.register(Box::new(auth_refusals.clone()))?;
        registry.register(Box::new(up.clone()))?;
        registry.register(Box::new(restarts.clone()))?;
        registry.register(Box::new(reinits.clone()))?;
        registry.register(Box::new(collisions.clone()))?;
        registry.register(Box::new(sessions.clone()))?;
        Ok(FederationMetrics { up, restarts, reinits, collisions, sessions, auth_refusals })
    }

    /// An upstream became reachable (or not).
    pub fn set_up(&self, federation: &str, server: &str, up: bool) {
        self.up.with_label_values(&[federation, server]).set(i64::from(up));
    }

    /// A stdio server is being started again.
    pub fn restarted(&self, federation: &str, server: &str) {
        self.restarts.with_label_values(&[federation, server]).inc();
    }

    /// An HTTP upstream session was initialised again.
    pub fn reinitialized(&self, federation: &str, server: &str) {
        self.reinits.with_label_values(&[federation, server]).inc();
    }

    /// `n` entries were hidden by collisions.
    pub fn collided(&self, federation: &str, n: usize) {
        if n > 0 {
            self.collisions.with_label_values(&[federation]).inc_by(n as u64);
        }
    }

    /// A request was refused for its token (`reason`: a fixed set of labels).
    pub fn auth_refused(&self, federation: &str, reason: &str) {
        self.auth_refusals.with_label_values(&[federation, reason]).inc();
    }

    /// Live client sessions of a federation.
    pub fn set_sessions(&self, federation: &str, n: usize) {
        self.sessions.with_label_values(&[federation]).set(n as i64);
    }
}
