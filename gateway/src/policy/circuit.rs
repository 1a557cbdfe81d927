//! Passive health of one target: a circuit breaker that takes the target out of rotation after
//! `max_fails` consecutive failures, keeps it out for `fail_timeout`, then lets a single probe
//! call through (half-open): the probe's success closes the circuit, its failure re-opens it.
//!
//! Reads (done for every target on every plan) are lock-free atomics; state transitions
//! (done once per attempt outcome) are serialised by a tiny per-target mutex so the failure
//! counter and the open deadline move together.
//!
//! The probe slot is per target, not per call: a plan that finds the circuit half-open
//! *claims* the slot (so concurrent plans leave the target out), [`Circuit::on_start`] turns the
//! claim into a running probe, and the outcome or the attempt guard frees it. A plan may end
//! before reaching its claimed probe (an earlier target answered), so an unstarted claim lapses
//! after `fail_timeout` (at least one second) and another plan may claim it. An attempt that
//! starts while the circuit is still open (the balancer's all-ejected fallback) also becomes
//! the probe, so its success brings the target back at once. A success of an attempt that
//! started before the ejection ("late" success, no probe running) does not close the circuit:
//! long streams finishing on a target that now answers 429 must not cut its ejection short.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use super::nanos_since;
use crate::config::CircuitConfig;

/// `probe` value: no claim and no probe running.
const FREE: u64 = 0;
/// `probe` value: a probe attempt is running. Any other value is "claimed at (value - 1) ns".
const RUNNING: u64 = u64::MAX;
/// Shortest time an unstarted probe claim blocks other plans.
const MIN_CLAIM_LEASE: Duration = Duration::from_secs(1);

/// Coarse breaker state, for metrics and `/debug`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    /// Target in rotation.
    Closed,
    /// Target ejected until its `fail_timeout` elapses.
    Open,
    /// `fail_timeout` elapsed; the next call may probe the target.
    HalfOpen,
}

/// What the breaker lets a new call plan do with its target; the balancer's only question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Use the target normally.
    Closed,
    /// The circuit is half-open and this plan now holds the probe slot: include the target.
    Probe,
    /// Leave the target out; `retry_in` is how long until it half-opens (zero when it is
    /// half-open but another call holds the probe slot). Used to order an all-ejected plan.
    Rejected {
        /// Time until the circuit half-opens.
        retry_in: Duration,
    },
}

/// Point-in-time view of one breaker, for metrics and `/debug`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitStatus {
    /// Coarse state.
    pub state: CircuitState,
    /// Consecutive failures counted so far (kept while open, reset by a success).
    pub consecutive_failures: u32,
    /// Time until an open circuit half-opens.
    pub retry_in: Option<Duration>,
    /// A probe attempt is running against the target.
    pub probe_in_flight: bool,
}

/// Circuit breaker of one target. Exists so a dead or overloaded provider stops receiving
/// first attempts (and the retry budget is not spent on it) until it has had time to recover.
#[derive(Debug)]
pub struct Circuit {
    max_fails: u32,
    fail_timeout: u64,
    claim_lease: u64,
    epoch: Instant,
    failures: AtomicU32,
    /// 0: closed; otherwise the ns offset from `epoch` at which the circuit half-opens.
    open_until: AtomicU64,
    /// [`FREE`], [`RUNNING`] or a claim time + 1.
    probe: AtomicU64,
    transition: Mutex<()>,
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Circuit {
    /// A closed breaker; times are kept relative to `epoch` (any instant not after the first
    /// `now` passed in).
    pub fn new(cfg: &CircuitConfig, epoch: Instant) -> Self {
        Self {
            max_fails: cfg.max_fails,
            fail_timeout: duration_nanos(cfg.fail_timeout),
            claim_lease: duration_nanos(cfg.fail_timeout.max(MIN_CLAIM_LEASE)),
            epoch,
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            probe: AtomicU64::new(FREE),
            transition: Mutex::new(()),
        }
    }

    fn at(&self, now: Instant) -> u64 {
        nanos_since(self.epoch, now)
    }

    /// Whether a plan made at `now` may include the target; claims the probe slot when the
    /// circuit is half-open and the slot is free (or its claim lapsed).
    pub fn admit(&self, now: Instant) -> Admission {
        if self.max_fails == 0 {
            return Admission::Closed;
        }
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Admission::Closed;
        }
        let t = self.at(now);
        if t < until {
            return Admission::Rejected { retry_in: Duration::from_nanos(until - t) };
        }
        if self.try_claim(t) {
            Admission::Probe
        } else {
            Admission::Rejected { retry_in: Duration::ZERO }
        }
    }

    fn try_claim(&self, t: u64) -> bool {
        let mut cur = self.probe.load(Ordering::Acquire);
        loop {
            let free = cur == FREE || (cur != RUNNING && t >= (cur - 1).saturating_add(self.claim_lease));
            if !free {
                return false;
            }
            let claim = t.saturating_add(1).min(RUNNING - 1);
            match self.probe.compare_exchange_weak(cur, claim, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// An attempt starts. Returns true when it is the probe (the caller must then call
    /// [`Circuit::release_probe`] if the attempt ends without an outcome): any attempt on an
    /// open or half-open target becomes the probe unless one is running, so a claim taken by
    /// another plan is honoured by whichever attempt starts first.
    pub fn on_start(&self) -> bool {
        if self.max_fails == 0 || self.open_until.load(Ordering::Acquire) == 0 {
            return false;
        }
        let mut cur = self.probe.load(Ordering::Acquire);
        loop {
            if cur == RUNNING {
                return false;
            }
            match self.probe.compare_exchange_weak(cur, RUNNING, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Frees the probe slot of a probe that ended without an outcome (cancelled call), so the
    /// next plan can probe again instead of waiting for the claim lease.
    pub fn release_probe(&self) {
        let _ = self.probe.compare_exchange(RUNNING, FREE, Ordering::AcqRel, Ordering::Acquire);
    }

    /// A call on the target succeeded: resets the failure count and closes a half-open
    /// circuit, or an open one whose probe is running. Otherwise a success that lands while
    /// the circuit is still open (a call started before the ejection) is ignored.
    pub fn on_success(&self, now: Instant) {
        if self.max_fails == 0 {
            return;
        }
        if self.open_until.load(Ordering::Acquire) == 0 && self.failures.load(Ordering::Relaxed) == 0 {
            return;
        }
        let _guard = self.transition.lock();
        let until = self.open_until.load(Ordering::Acquire);
        if until != 0 && self.at(now) < until && self.probe.load(Ordering::Acquire) != RUNNING {
            return;
        }
        self.failures.store(0, Ordering::Relaxed);
        self.probe.store(FREE, Ordering::Release);
        self.open_until.store(0, Ordering::Release);
    }

    /// A call on the target failed (as classed by `failover.on`): counts towards `max_fails`
    /// while closed; re-opens a half-open circuit (or an open one whose probe is running) for
    /// another `fail_timeout`; otherwise ignored while open.
    pub fn on_failure(&self, now: Instant) {
        if self.max_fails == 0 {
            return;
        }
        let _guard = self.transition.lock();
        let t = self.at(now);
        let until = self.open_until.load(Ordering::Acquire);
        if until != 0 {
            if t >= until || self.probe.load(Ordering::Acquire) == RUNNING {
                self.open(t);
            }
            return;
        }
        let failures = self.failures.load(Ordering::Relaxed).saturating_add(1);
        self.failures.store(failures, Ordering::Relaxed);
        if failures >= self.max_fails {
            self.open(t);
        }
    }

    fn open(&self, t: u64) {
        self.probe.store(FREE, Ordering::Release);
        self.open_until.store(t.saturating_add(self.fail_timeout).max(1), Ordering::Release);
    }

    /// State at `now` for observability; does not claim anything.
    pub fn status(&self, now: Instant) -> CircuitStatus {
        let until = self.open_until.load(Ordering::Acquire);
        let t = self.at(now);
        let (state, retry_in) = match until {
            0 => (CircuitState::Closed, None),
            u if t < u => (CircuitState::Open, Some(Duration::from_nanos(u - t))),
            _ => (CircuitState::HalfOpen, None),
        };
        CircuitStatus {
            state,
            consecutive_failures: self.failures.load(Ordering::Relaxed),
            retry_in,
            probe_in_flight: state != CircuitState::Closed && self.probe.load(Ordering::Acquire) == RUNNING,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn circuit(max_fails: u32) -> (Circuit, Instant) {
        let t0 = Instant::now();
        (Circuit::new(&CircuitConfig { max_fails, fail_timeout: Duration::from_secs(10) }, t0), t0)
    }

    #[test]
    fn opens_after_max_consecutive_failures() {
        let (c, t0) = circuit(3);
        c.on_failure(t0);
        c.on_failure(t0);
        assert_eq!(c.admit(t0), Admission::Closed);
        c.on_success(t0);
        c.on_failure(t0);
        c.on_failure(t0);
        assert_eq!(c.admit(t0), Admission::Closed, "success resets the consecutive count");
        c.on_failure(t0);
        assert_eq!(c.admit(t0), Admission::Rejected { retry_in: Duration::from_secs(10) });
        let st = c.status(t0 + Duration::from_secs(4));
        assert_eq!(st.state, CircuitState::Open);
        assert_eq!(st.retry_in, Some(Duration::from_secs(6)));
        assert_eq!(st.consecutive_failures, 3);
    }

    #[test]
    fn half_open_allows_exactly_one_probe_and_success_closes() {
        let (c, t0) = circuit(2);
        c.on_failure(t0);
        c.on_failure(t0);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(c.status(later).state, CircuitState::HalfOpen);
        assert_eq!(c.admit(later), Admission::Probe);
        assert_eq!(c.admit(later), Admission::Rejected { retry_in: Duration::ZERO });
        assert!(c.on_start(), "the claimed probe starts");
        assert!(!c.on_start(), "a second attempt is not a probe");
        assert!(c.status(later).probe_in_flight);
        assert_eq!(c.admit(later), Admission::Rejected { retry_in: Duration::ZERO });
        c.on_success(later);
        assert_eq!(c.status(later).state, CircuitState::Closed);
        assert_eq!(c.status(later).consecutive_failures, 0);
        assert_eq!(c.admit(later), Admission::Closed);
    }

    #[test]
    fn probe_failure_reopens_for_another_timeout() {
        let (c, t0) = circuit(1);
        c.on_failure(t0);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(c.admit(later), Admission::Probe);
        assert!(c.on_start());
        let t = later + Duration::from_secs(1);
        c.on_failure(t);
        assert_eq!(c.admit(t), Admission::Rejected { retry_in: Duration::from_secs(10) });
        let again = t + Duration::from_secs(10);
        assert_eq!(c.admit(again), Admission::Probe, "a new probe after the new timeout");
    }

    #[test]
    fn failures_while_open_do_not_extend_and_late_success_does_not_close() {
        let (c, t0) = circuit(1);
        c.on_failure(t0);
        c.on_failure(t0 + Duration::from_secs(5));
        c.on_success(t0 + Duration::from_secs(6));
        assert_eq!(c.admit(t0 + Duration::from_secs(6)), Admission::Rejected { retry_in: Duration::from_secs(4) });
    }

    #[test]
    fn attempt_forced_on_open_circuit_is_the_probe() {
        let (c, t0) = circuit(1);
        c.on_failure(t0);
        let t = t0 + Duration::from_secs(3);
        assert!(c.on_start(), "an attempt on an open circuit (all targets ejected) probes");
        assert!(!c.on_start());
        assert!(c.status(t).probe_in_flight);
        c.on_failure(t);
        assert_eq!(c.admit(t), Admission::Rejected { retry_in: Duration::from_secs(10) }, "re-opened from now");
        assert!(c.on_start());
        c.on_success(t);
        assert_eq!(c.admit(t), Admission::Closed, "its success closes at once");
    }

    #[test]
    fn unstarted_claim_lapses_and_cancelled_probe_is_released() {
        let (c, t0) = circuit(1);
        c.on_failure(t0);
        let half = t0 + Duration::from_secs(10);
        assert_eq!(c.admit(half), Admission::Probe);
        assert_eq!(c.admit(half + Duration::from_secs(9)), Admission::Rejected { retry_in: Duration::ZERO });
        let lapsed = half + Duration::from_secs(10);
        assert_eq!(c.admit(lapsed), Admission::Probe, "claim lease is fail_timeout");
        assert!(c.on_start());
        c.release_probe();
        assert_eq!(c.admit(lapsed), Admission::Probe, "cancelled probe frees the slot at once");
    }

    #[test]
    fn max_fails_zero_disables() {
        let (c, t0) = circuit(0);
        for _ in 0..100 {
            c.on_failure(t0);
        }
        assert_eq!(c.admit(t0), Admission::Closed);
        assert!(!c.on_start());
        assert_eq!(c.status(t0).state, CircuitState::Closed);
    }
}
