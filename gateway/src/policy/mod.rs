//! Routing policy for routes with provider targets: which target a call tries first and which
//! next ([`Balancer`]), when a failing target is taken out of rotation ([`Circuit`]), whether a
//! failed attempt may be retried at all ([`RetryBudget`], [`classify`], [`should_failover`]).
//!
//! Everything here is runtime state for one config generation and is touched on every LLM
//! call, so it is built from atomics and tiny per-target (or per-route) `parking_lot` mutexes
//! that are never held across an `.await`. Time comes from a [`Clock`] so circuits, decaying
//! averages and budget windows can be tested by moving a [`ManualClock`] instead of sleeping.

pub mod a2a_hops;
mod balance;
mod budget;
pub mod chain;
mod circuit;
pub mod guards;
pub mod limits;
pub mod mcp_auth;
pub mod mcp_limits;
pub mod mcp_tools;
pub mod subjects;

pub use balance::{Balancer, InFlight, Outcome, Plan, PlanIntoIter, PlanIter, TargetStatus};
pub use budget::RetryBudget;
pub use circuit::{Admission, Circuit, CircuitState, CircuitStatus};

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::{FailoverConfig, FailoverOn};

/// Monotonic time source of the policy state. It exists so production reads `Instant::now()`
/// while tests drive circuits, decay and budget windows deterministically.
pub trait Clock: Send + Sync + Debug {
    /// Current monotonic time.
    fn now(&self) -> Instant;
}

/// The real monotonic clock; the default of every policy type.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that only moves when told to, so tests (here and in the request path) can open a
/// circuit, let it half-open or let an average decay without sleeping.
#[derive(Debug)]
pub struct ManualClock {
    base: Instant,
    offset_nanos: AtomicU64,
}

impl ManualClock {
    /// A clock frozen at the current instant.
    pub fn new() -> Self {
        Self { base: Instant::now(), offset_nanos: AtomicU64::new(0) }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let nanos = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        self.offset_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.base + Duration::from_nanos(self.offset_nanos.load(Ordering::Relaxed))
    }
}

/// Nanoseconds from `epoch` to `now` (0 if `now` is earlier): the policy types keep times as
/// `u64` offsets so they fit in atomics.
fn nanos_since(epoch: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX)
}

/// Transport-level failure of an attempt that has no HTTP status, as the upstream layer sees
/// it; [`classify`] maps it to the config's [`FailoverOn`] vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureClass {
    /// TCP connect or TLS handshake failed.
    Connect,
    /// The attempt deadline passed before response headers.
    Timeout,
}

/// Which [`FailoverOn`] class an attempt result belongs to, if any: a transport error wins over
/// a status; 429 is `RateLimited`, any 5xx is `ServerError`; everything else (2xx, other 4xx)
/// is not a failover failure and returns `None`. One place for this mapping keeps the retry
/// decision and the circuit breaker's idea of "failure" identical.
pub fn classify(status: Option<u16>, err: Option<FailureClass>) -> Option<FailoverOn> {
    match (err, status) {
        (Some(FailureClass::Connect), _) => Some(FailoverOn::Connect),
        (Some(FailureClass::Timeout), _) => Some(FailoverOn::Timeout),
        (None, Some(429)) => Some(FailoverOn::RateLimited),
        (None, Some(500..=599)) => Some(FailoverOn::ServerError),
        (None, _) => None,
    }
}

/// Whether the route's `failover.on` list asks for a retry on the next target for `class`, so
/// the request path does not re-implement the lookup.
pub fn should_failover(cfg: &FailoverConfig, class: FailoverOn) -> bool {
    cfg.on.contains(&class)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_maps_status_and_errors() {
        assert_eq!(classify(Some(429), None), Some(FailoverOn::RateLimited));
        assert_eq!(classify(Some(500), None), Some(FailoverOn::ServerError));
        assert_eq!(classify(Some(503), None), Some(FailoverOn::ServerError));
        assert_eq!(classify(Some(599), None), Some(FailoverOn::ServerError));
        assert_eq!(classify(Some(200), None), None);
        assert_eq!(classify(Some(400), None), None);
        assert_eq!(classify(Some(404), None), None);
        assert_eq!(classify(None, None), None);
        assert_eq!(classify(None, Some(FailureClass::Connect)), Some(FailoverOn::Connect));
        assert_eq!(classify(Some(502), Some(FailureClass::Timeout)), Some(FailoverOn::Timeout));
    }

    #[test]
    fn should_failover_follows_config() {
        let mut cfg = FailoverConfig::default();
        assert!(should_failover(&cfg, FailoverOn::RateLimited));
        cfg.on = vec![FailoverOn::Connect];
        assert!(should_failover(&cfg, FailoverOn::Connect));
        assert!(!should_failover(&cfg, FailoverOn::ServerError));
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new();
        let t0 = clock.now();
        assert_eq!(clock.now(), t0);
        clock.advance(Duration::from_secs(3));
        assert_eq!(clock.now() - t0, Duration::from_secs(3));
        assert_eq!(nanos_since(t0, clock.now()), 3_000_000_000);
        assert_eq!(nanos_since(clock.now(), t0), 0);
    }
}
