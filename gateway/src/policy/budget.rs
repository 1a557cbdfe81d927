//! Retry budget of a route: retries may be at most `retry_budget` × first attempts over the
//! last `budget_window`, plus `min_retries_per_second` × window seconds. Without it, a
//! provider outage turns every call into `max_attempts` calls and the failover itself
//! multiplies the load on whatever is still healthy.
//!
//! The window slides in [`BUCKETS`] time buckets behind one small mutex: each operation
//! touches a ten-entry array for a few nanoseconds, never across an `.await`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{nanos_since, Clock, SystemClock};
use crate::config::FailoverConfig;

/// Buckets per window: the window slides in steps of a tenth of its length.
const BUCKETS: usize = 10;
/// Shortest usable window; a zero `budget_window` is treated as this.
const MIN_WINDOW: Duration = Duration::from_millis(10);
/// Largest ratio honoured; keeps the arithmetic finite for absurd configs.
const MAX_RATIO: f64 = 1e6;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Absolute bucket number (time / bucket length) the counts belong to.
    slot: u64,
    first: u64,
    retries: u64,
}

/// Sliding-window retry budget shared by all calls of one route (one config generation).
pub struct RetryBudget {
    ratio: f64,
    floor: f64,
    bucket_nanos: u64,
    epoch: Instant,
    clock: Arc<dyn Clock>,
    ring: Mutex<[Bucket; BUCKETS]>,
}

impl std::fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ratio", &self.ratio)
            .field("floor", &self.floor)
            .field("bucket_nanos", &self.bucket_nanos)
            .finish_non_exhaustive()
    }
}

impl RetryBudget {
    /// Budget from the route's failover settings, on the system clock.
    pub fn new(cfg: &FailoverConfig) -> Self {
        Self::with_clock(cfg, Arc::new(SystemClock))
    }

    /// Budget on an explicit clock (tests use a [`super::ManualClock`]). A NaN or negative
    /// `retry_budget` counts as 0; a window shorter than 10 ms counts as 10 ms.
    pub fn with_clock(cfg: &FailoverConfig, clock: Arc<dyn Clock>) -> Self {
        let window = cfg.budget_window.max(MIN_WINDOW);
        let ratio = if cfg.retry_budget.is_nan() { 0.0 } else { cfg.retry_budget.clamp(0.0, MAX_RATIO) };
        let bucket_nanos = u64::try_from(window.as_nanos() / BUCKETS as u128).unwrap_or(u64::MAX).max(1);
        Self {
            ratio,
            floor: f64::from(cfg.min_retries_per_second) * window.as_secs_f64(),
            bucket_nanos,
            epoch: clock.now(),
            clock,
            ring: Mutex::new([Bucket::default(); BUCKETS]),
        }
    }

    /// Counts a first attempt (each call deposits once, before its first attempt).
    pub fn deposit(&self) {
        let slot = self.slot_now();
        let mut ring = self.ring.lock();
        current(&mut ring, slot).first += 1;
    }

    /// Asks for one retry; true (and counted) while the retries in the window, this one
    /// included, stay within `ratio × first attempts + floor`.
    pub fn try_withdraw(&self) -> bool {
        let slot = self.slot_now();
        let mut ring = self.ring.lock();
        let (first, retries) = ring
            .iter()
            .filter(|b| b.slot <= slot && slot - b.slot < BUCKETS as u64)
            .fold((0u64, 0u64), |(f, r), b| (f + b.first, r + b.retries));
        let allowed = self.ratio * first as f64 + self.floor;
        if (retries + 1) as f64 > allowed {
            return false;
        }
        current(&mut ring, slot).retries += 1;
        true
    }

    fn slot_now(&self) -> u64 {
        nanos_since(self.epoch, self.clock.now()) / self.bucket_nanos
    }
}

/// The bucket for `slot`, reset if it still holds counts of an older slot.
fn current(ring: &mut [Bucket; BUCKETS], slot: u64) -> &mut Bucket {
    let bucket = &mut ring[(slot % BUCKETS as u64) as usize];
    if bucket.slot != slot {
        *bucket = Bucket { slot, first: 0, retries: 0 };
    }
    bucket
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ManualClock;

    fn budget(ratio: f64, min_rps: u32) -> (RetryBudget, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new());
        let cfg = FailoverConfig {
            retry_budget: ratio,
            min_retries_per_second: min_rps,
            budget_window: Duration::from_secs(10),
            ..FailoverConfig::default()
        };
        (RetryBudget::with_clock(&cfg, clock.clone()), clock)
    }

    #[test]
    fn allows_min_retries_then_ratio_then_refuses() {
        let (b, _clock) = budget(0.2, 1);
        // floor: 1/s × 10 s = 10 retries with no traffic at all
        for i in 0..10 {
            assert!(b.try_withdraw(), "floor retry {i}");
        }
        assert!(!b.try_withdraw());
        for _ in 0..50 {
            b.deposit();
        }
        // + 0.2 × 50 = 10 more
        for i in 0..10 {
            assert!(b.try_withdraw(), "ratio retry {i}");
        }
        assert!(!b.try_withdraw());
        assert!(!b.try_withdraw());
    }

    #[test]
    fn window_slides() {
        let (b, clock) = budget(0.0, 1);
        for _ in 0..10 {
            assert!(b.try_withdraw());
        }
        assert!(!b.try_withdraw());
        clock.advance(Duration::from_secs(5));
        assert!(!b.try_withdraw(), "the retries are still in the window");
        clock.advance(Duration::from_secs(5));
        assert!(b.try_withdraw(), "the first bucket left the window");
        clock.advance(Duration::from_secs(30));
        for _ in 0..10 {
            assert!(b.try_withdraw());
        }
        assert!(!b.try_withdraw());
    }

    #[test]
    fn zero_budget_and_floor_refuses_every_retry() {
        let (b, _clock) = budget(0.0, 0);
        for _ in 0..100 {
            b.deposit();
        }
        assert!(!b.try_withdraw());
        let (nan, _clock) = budget(f64::NAN, 0);
        nan.deposit();
        assert!(!nan.try_withdraw());
    }
}
