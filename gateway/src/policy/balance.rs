//! Per-route balancing: turns a route's targets, their circuits and their recent latency,
//! load and token usage into an ordered attempt [`Plan`] for one call.
//!
//! Plan order: targets are grouped by `priority` (lower first). The best group that has an
//! available target comes first, ordered by the strategy (its first element is the pick),
//! followed by the other groups, each in strategy order, as failover candidates. Open
//! circuits are left out. A half-open target whose probe slot the plan claimed goes first
//! in its group, so the probe really runs when the group is reached (behind healthy peers it
//! would rarely run and a recovered target would stay out). When every considered target is
//! ejected, the plan still lists them all, soonest circuit expiry first: the call tries
//! rather than fails instantly, and the circuits learn from the outcome.
//!
//! Hot path: one `Vec` per plan (the slots, which double as sort scratch); the pick itself
//! uses atomics, per-target stats mutexes (lowest_latency, lowest_usage) or the per-route
//! smooth-weighted-round-robin mutex (weighted), all held for nanoseconds and never across
//! an `.await`.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use super::circuit::{Admission, Circuit, CircuitState};
use super::{nanos_since, Clock, SystemClock};
use crate::config::{BalanceConfig, CircuitConfig, LatencyMetric, Strategy, TargetConfig};

/// Outcome of one attempt, fed back into circuit, latency and usage state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The target answered (anything not classed as a failover failure).
    Success {
        /// Time to first response byte (first token for streams).
        ttft: Duration,
        /// Whole call (pass `ttft` if recorded before the body ended).
        total: Duration,
        /// Tokens already known; later ones go through [`Balancer::add_tokens`].
        tokens: u64,
    },
    /// A failure classed by `failover.on` (connect, timeout, 429, 5xx).
    Failure,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Probe,
    Ready,
    Out,
}

/// One plan entry; `key`, `tie` and `class` are sort scratch so a plan needs one allocation.
#[derive(Debug, Clone, Copy)]
struct Slot {
    index: usize,
    key: f64,
    priority: u32,
    tie: u32,
    class: Class,
}

/// Ordered target indices (positions in the `targets` slice given to [`Balancer::new`]) to
/// try for one call: the first is the pick, the rest are failover candidates.
#[derive(Debug, Clone)]
pub struct Plan {
    slots: Vec<Slot>,
}

impl Plan {
    /// Number of targets in the plan.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True only for a route without (matching) targets.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The pick.
    pub fn first(&self) -> Option<usize> {
        self.get(0)
    }

    /// The target of attempt `n` (0-based).
    pub fn get(&self, n: usize) -> Option<usize> {
        self.slots.get(n).map(|s| s.index)
    }

    /// Target indices in attempt order.
    pub fn iter(&self) -> PlanIter<'_> {
        PlanIter(self.slots.iter())
    }
}

/// Borrowing iterator over a [`Plan`]'s target indices.
#[derive(Debug, Clone)]
pub struct PlanIter<'a>(std::slice::Iter<'a, Slot>);

impl Iterator for PlanIter<'_> {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        self.0.next().map(|s| s.index)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl ExactSizeIterator for PlanIter<'_> {}

/// Owning iterator over a [`Plan`]'s target indices, for moving a plan into a retry loop.
#[derive(Debug)]
pub struct PlanIntoIter(std::vec::IntoIter<Slot>);

impl Iterator for PlanIntoIter {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        self.0.next().map(|s| s.index)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl ExactSizeIterator for PlanIntoIter {}

impl IntoIterator for Plan {
    type Item = usize;
    type IntoIter = PlanIntoIter;
    fn into_iter(self) -> PlanIntoIter {
        PlanIntoIter(self.slots.into_iter())
    }
}

impl<'a> IntoIterator for &'a Plan {
    type Item = usize;
    type IntoIter = PlanIter<'a>;
    fn into_iter(self) -> PlanIter<'a> {
        self.iter()
    }
}

/// Decayed latency and usage of one target; times are ns offsets from the balancer epoch.
#[derive(Debug, Default)]
struct Stats {
    /// Peak-EWMA latency in ns; `None` until the first sample.
    latency: Option<f64>,
    latency_at: u64,
    usage: f64,
    usage_at: u64,
}

/// Weight of a value `dt` ns old under exponential decay with time constant `tau` ns.
fn decay_weight(dt: u64, tau: f64) -> f64 {
    if dt == 0 {
        1.0
    } else if tau <= 0.0 {
        0.0
    } else {
        (-(dt as f64) / tau).exp()
    }
}

impl Stats {
    /// Latency estimate at `t`: the stored peak EWMA, decaying towards zero while no samples
    /// arrive, so a target that spiked and lost its traffic is eventually tried again.
    fn latency_at(&self, t: u64, tau: f64) -> Option<f64> {
        self.latency.map(|v| v * decay_weight(t.saturating_sub(self.latency_at), tau))
    }

    /// Peak EWMA: a sample above the estimate replaces it; a lower one is blended in with the
    /// weight of the time since the previous sample.
    fn observe_latency(&mut self, sample: f64, t: u64, tau: f64) {
        let next = match self.latency {
            Some(v) if sample < v => {
                let w = decay_weight(t.saturating_sub(self.latency_at), tau);
                v * w + sample * (1.0 - w)
            }
            _ => sample,
        };
        self.latency = Some(next);
        self.latency_at = self.latency_at.max(t);
    }

    fn usage_at(&self, t: u64, tau: f64) -> f64 {
        self.usage * decay_weight(t.saturating_sub(self.usage_at), tau)
    }

    fn add_usage(&mut self, tokens: f64, t: u64, tau: f64) {
        self.usage = self.usage_at(t, tau) + tokens;
        self.usage_at = self.usage_at.max(t);
    }
}

#[derive(Debug)]
struct TargetState {
    provider: Box<str>,
    model: Option<Box<str>>,
    alias: Option<Box<str>>,
    weight: u32,
    priority: u32,
    /// Rendezvous-hash identity: provider, model and occurrence, so keys stay put when the
    /// target list is reordered or grows.
    seed: u64,
    circuit: Circuit,
    in_flight: AtomicU32,
    stats: Mutex<Stats>,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    bytes.iter().fold(seed, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// 64-bit finaliser (splitmix64 constants) so nearby inputs give unrelated outputs.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Weighted rendezvous score: `w / -ln(u)` with `u` uniform in (0, 1) from key and target;
/// the highest score owns the key, and removing a target only moves the keys it owned.
fn rendezvous_score(key_hash: u64, seed: u64, weight: u32) -> f64 {
    let u = ((mix(key_hash ^ seed) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    f64::from(weight) / -u.ln()
}

/// Rendezvous identity of a target: provider, model and how many identical targets precede it.
fn target_seed(t: &TargetConfig, occurrence: usize) -> u64 {
    let h = fnv1a(t.provider.as_bytes(), FNV_OFFSET);
    let h = fnv1a(t.model.as_deref().unwrap_or("").as_bytes(), h ^ 0xff);
    mix(fnv1a(&(occurrence as u64).to_le_bytes(), h))
}

/// Per-route balancer over its targets; lives as long as the config generation. Indices in
/// every method are positions in the `targets` slice it was built from; out-of-range indices
/// are ignored.
pub struct Balancer {
    targets: Box<[Arc<TargetState>]>,
    /// Target indices sorted by (priority, index): groups are contiguous runs.
    by_priority: Box<[usize]>,
    strategy: Strategy,
    metric: LatencyMetric,
    /// `balance.decay` in ns.
    tau: f64,
    /// Round-robin ticket: rotation of round_robin and tie-breaks of the other strategies.
    ticket: AtomicUsize,
    /// Smooth weighted round-robin current weights, by target index.
    swrr: Mutex<Box<[i64]>>,
    clock: Arc<dyn Clock>,
    epoch: Instant,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("strategy", &self.strategy)
            .field("targets", &self.targets.len())
            .finish_non_exhaustive()
    }
}

/// Marks an attempt in flight on one target (least_connections, lowest_latency penalty) and,
/// for a half-open probe, holds the probe slot; both are released on drop.
#[derive(Debug)]
pub struct InFlight {
    target: Option<Arc<TargetState>>,
    probe: bool,
}

impl InFlight {
    /// True when this attempt is the half-open probe of its target (worth a log line).
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(target) = &self.target {
            target.in_flight.fetch_sub(1, Ordering::Relaxed);
            if self.probe {
                target.circuit.release_probe();
            }
        }
    }
}

/// Per-target state for metrics and `/debug`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetStatus {
    /// Position in the route's `targets`.
    pub index: usize,
    /// Provider name.
    pub provider: String,
    /// Model asked of the provider, if set.
    pub model: Option<String>,
    /// Alias selecting this target, if set.
    pub model_alias: Option<String>,
    /// Priority group.
    pub priority: u32,
    /// Weight.
    pub weight: u32,
    /// Circuit breaker state.
    pub circuit: CircuitState,
    /// Consecutive failures counted by the breaker.
    pub consecutive_failures: u32,
    /// Milliseconds until an open circuit half-opens.
    pub retry_in_ms: Option<u64>,
    /// A probe attempt is running (the target is open or half-open).
    pub probe_in_flight: bool,
    /// Attempts in flight.
    pub in_flight: u32,
    /// Peak-EWMA latency (`balance.latency`) now, in ms; `None` before the first sample.
    pub latency_ewma_ms: Option<f64>,
    /// Decayed token usage now.
    pub usage_tokens: f64,
}

impl Balancer {
    /// Balancer for one route's `targets` on the system clock; build one per config generation
    /// so state (circuits, averages) never leaks across reloads with different targets.
    pub fn new(targets: &[TargetConfig], balance: &BalanceConfig, circuit: &CircuitConfig) -> Self {
        Self::with_clock(targets, balance, circuit, Arc::new(SystemClock))
    }

    /// Balancer on an explicit clock, so tests (with a [`super::ManualClock`]) can open
    /// circuits and decay averages without sleeping.
    pub fn with_clock(
        targets: &[TargetConfig],
        balance: &BalanceConfig,
        circuit: &CircuitConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let epoch = clock.now();
        let states: Box<[Arc<TargetState>]> = targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let occurrence = targets[..i].iter().filter(|o| o.provider == t.provider && o.model == t.model).count();
                Arc::new(TargetState {
                    provider: t.provider.as_str().into(),
                    model: t.model.as_deref().map(Into::into),
                    alias: t.model_alias.as_deref().map(Into::into),
                    weight: t.weight,
                    priority: t.priority,
                    seed: target_seed(t, occurrence),
                    circuit: Circuit::new(circuit, epoch),
                    in_flight: AtomicU32::new(0),
                    stats: Mutex::new(Stats::default()),
                })
            })
            .collect();
        let mut by_priority: Vec<usize> = (0..states.len()).collect();
        by_priority.sort_by_key(|&i| (states[i].priority, i));
        Self {
            swrr: Mutex::new(vec![0; states.len()].into_boxed_slice()),
            targets: states,
            by_priority: by_priority.into_boxed_slice(),
            strategy: balance.strategy,
            metric: balance.latency,
            tau: balance.decay.as_nanos() as f64,
            ticket: AtomicUsize::new(0),
            clock,
            epoch,
        }
    }

    /// Number of targets.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// True for a balancer without targets (every plan is empty).
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// Ordered attempt plan for one call (see the module docs for the order). `alias`: when
    /// some target has `model_alias == alias`, only those are considered; otherwise all are.
    /// `hash_key` feeds consistent_hash (agent name or header value) and is ignored otherwise.
    pub fn plan(&self, alias: Option<&str>, hash_key: &[u8]) -> Plan {
        let now = self.clock.now();
        let alias = alias.filter(|a| self.targets.iter().any(|t| t.alias.as_deref() == Some(*a)));
        let mut slots = Vec::with_capacity(self.targets.len());
        let mut available = false;
        for &index in self.by_priority.iter() {
            let Some(target) = self.targets.get(index) else { continue };
            if alias.is_some() && target.alias.as_deref() != alias {
                continue;
            }
            let (class, key) = match target.circuit.admit(now) {
                Admission::Closed => (Class::Ready, 0.0),
                Admission::Probe => (Class::Probe, 0.0),
                Admission::Rejected { retry_in } => (Class::Out, retry_in.as_secs_f64()),
            };
            available |= class != Class::Out;
            slots.push(Slot { index, key, priority: target.priority, tie: 0, class });
        }
        if !available {
            slots.sort_unstable_by(|a, b| {
                a.key.total_cmp(&b.key).then(a.priority.cmp(&b.priority)).then(a.index.cmp(&b.index))
            });
            return Plan { slots };
        }
        slots.retain(|s| s.class != Class::Out);
        let ticket = self.ticket.fetch_add(1, Ordering::Relaxed);
        let key_hash = if self.strategy == Strategy::ConsistentHash { fnv1a(hash_key, FNV_OFFSET) } else { 0 };
        let t = nanos_since(self.epoch, now);
        let mut start = 0;
        let mut lead = true;
        while let Some(rest) = slots.get_mut(start..).filter(|r| !r.is_empty()) {
            let priority = rest[0].priority;
            let len = rest.iter().take_while(|s| s.priority == priority).count();
            self.order_group(&mut rest[..len], lead, ticket, key_hash, t);
            lead = false;
            start += len;
        }
        Plan { slots }
    }

    /// Sorts one priority group: probes first, then by strategy key, ties by rotation.
    /// `lead`: this group holds the pick, so stateful strategies (weighted) advance.
    fn order_group(&self, group: &mut [Slot], lead: bool, ticket: usize, key_hash: u64, t: u64) {
        let len = group.len();
        let offset = ticket % len;
        for (p, s) in group.iter_mut().enumerate() {
            s.tie = ((p + len - offset) % len) as u32;
        }
        match self.strategy {
            Strategy::RoundRobin => {}
            Strategy::LeastConnections => {
                for s in group.iter_mut() {
                    s.key = f64::from(self.targets[s.index].in_flight.load(Ordering::Relaxed));
                }
            }
            Strategy::LowestLatency => self.latency_keys(group, t),
            Strategy::LowestUsage => {
                for s in group.iter_mut() {
                    s.key = self.targets[s.index].stats.lock().usage_at(t, self.tau);
                }
            }
            Strategy::ConsistentHash => {
                let any_weight = group.iter().any(|s| self.targets[s.index].weight > 0);
                for (p, s) in group.iter_mut().enumerate() {
                    let target = &self.targets[s.index];
                    let weight = if any_weight { target.weight } else { 1 };
                    s.key = -rendezvous_score(key_hash, target.seed, weight);
                    s.tie = p as u32;
                }
            }
            Strategy::Weighted => {
                let has_probe = group.iter().any(|s| s.class == Class::Probe);
                if lead && !has_probe {
                    self.swrr_keys(group);
                } else {
                    let any_weight = group.iter().any(|s| self.targets[s.index].weight > 0);
                    for s in group.iter_mut() {
                        let weight = if any_weight { self.targets[s.index].weight } else { 1 };
                        s.key = if weight == 0 { f64::INFINITY } else { -f64::from(weight) };
                    }
                }
            }
        }
        for s in group.iter_mut().filter(|s| s.class == Class::Probe) {
            s.key = f64::NEG_INFINITY;
        }
        group.sort_unstable_by(|a, b| a.key.total_cmp(&b.key).then(a.tie.cmp(&b.tie)));
    }

    /// Smooth weighted round-robin step (as in nginx): every positive-weight member gains its
    /// weight, the largest current wins and pays back the total. Exact proportions over each
    /// cycle, interleaved. Weight 0 means standby: picked only when every available member of
    /// the group has weight 0 (then they share equally), otherwise placed after the others.
    fn swrr_keys(&self, group: &mut [Slot]) {
        let any_weight = group.iter().any(|s| self.targets[s.index].weight > 0);
        let weight_of = |s: &Slot| if any_weight { i64::from(self.targets[s.index].weight) } else { 1 };
        let mut current = self.swrr.lock();
        let mut total = 0i64;
        let mut best: Option<(usize, i64)> = None;
        for (p, s) in group.iter().enumerate() {
            let weight = weight_of(s);
            if weight == 0 {
                continue;
            }
            current[s.index] += weight;
            total += weight;
            if best.is_none_or(|(_, c)| current[s.index] > c) {
                best = Some((p, current[s.index]));
            }
        }
        if let Some((p, _)) = best {
            current[group[p].index] -= total;
        }
        for (p, s) in group.iter_mut().enumerate() {
            s.key = if best.is_some_and(|(b, _)| b == p) {
                f64::MIN
            } else if weight_of(s) == 0 {
                f64::INFINITY
            } else {
                -(current[s.index] as f64)
            };
        }
    }

    /// lowest_latency cost, linkerd style: estimate × (in flight + 1). An unmeasured target
    /// with nothing in flight costs 0 (it gets a chance first); with calls in flight it is
    /// priced at the worst measured estimate so a cold start does not flood it.
    fn latency_keys(&self, group: &mut [Slot], t: u64) {
        let mut worst = 0.0f64;
        for s in group.iter_mut() {
            let estimate = self.targets[s.index].stats.lock().latency_at(t, self.tau);
            s.key = estimate.unwrap_or(-1.0);
            worst = worst.max(s.key);
        }
        if worst <= 0.0 {
            worst = 1.0;
        }
        for s in group.iter_mut() {
            let in_flight = f64::from(self.targets[s.index].in_flight.load(Ordering::Relaxed));
            s.key = match s.key {
                k if k >= 0.0 => k * (in_flight + 1.0),
                _ if in_flight == 0.0 => 0.0,
                _ => worst * (in_flight + 1.0),
            };
        }
    }

    /// Call when an attempt starts on target `i`; the guard decrements in-flight on drop
    /// (least_connections, lowest_latency) and frees a half-open probe slot.
    pub fn start(&self, i: usize) -> InFlight {
        let Some(target) = self.targets.get(i) else { return InFlight { target: None, probe: false } };
        target.in_flight.fetch_add(1, Ordering::Relaxed);
        let probe = target.circuit.on_start();
        InFlight { target: Some(Arc::clone(target)), probe }
    }

    /// Records the outcome of an attempt on target `i`: circuit (failures open it, a success
    /// closes a half-open one), peak-EWMA latency and decayed token usage.
    pub fn record(&self, i: usize, outcome: Outcome) {
        let Some(target) = self.targets.get(i) else { return };
        let now = self.clock.now();
        match outcome {
            Outcome::Failure => target.circuit.on_failure(now),
            Outcome::Success { ttft, total, tokens } => {
                target.circuit.on_success(now);
                let sample = match self.metric {
                    LatencyMetric::Ttft => ttft,
                    LatencyMetric::Total => total,
                };
                let t = nanos_since(self.epoch, now);
                let mut stats = target.stats.lock();
                stats.observe_latency(sample.as_nanos() as f64, t, self.tau);
                if tokens > 0 {
                    stats.add_usage(tokens as f64, t, self.tau);
                }
            }
        }
    }

    /// Tokens counted after the response ended (lowest_usage): usage is known only at the
    /// end of a stream, after [`Balancer::record`].
    pub fn add_tokens(&self, i: usize, tokens: u64) {
        let Some(target) = self.targets.get(i) else { return };
        let t = nanos_since(self.epoch, self.clock.now());
        target.stats.lock().add_usage(tokens as f64, t, self.tau);
    }

    /// Per-target state (circuit, in flight, averages) for metrics and `/debug`.
    pub fn snapshot(&self) -> Vec<TargetStatus> {
        let now = self.clock.now();
        let t = nanos_since(self.epoch, now);
        self.targets
            .iter()
            .enumerate()
            .map(|(index, target)| {
                let circuit = target.circuit.status(now);
                let (latency, usage) = {
                    let stats = target.stats.lock();
                    (stats.latency_at(t, self.tau), stats.usage_at(t, self.tau))
                };
                TargetStatus {
                    index,
                    provider: target.provider.to_string(),
                    model: target.model.as_deref().map(str::to_owned),
                    model_alias: target.alias.as_deref().map(str::to_owned),
                    priority: target.priority,
                    weight: target.weight,
                    circuit: circuit.state,
                    consecutive_failures: circuit.consecutive_failures,
                    retry_in_ms: circuit.retry_in.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    probe_in_flight: circuit.probe_in_flight,
                    in_flight: target.in_flight.load(Ordering::Relaxed),
                    latency_ewma_ms: latency.map(|ns| ns / 1e6),
                    usage_tokens: usage,
                }
            })
            .collect()
    }
}

#[cfg(test)]
#[path = "balance_tests.rs"]
mod tests;
