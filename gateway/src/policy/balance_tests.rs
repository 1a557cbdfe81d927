//! Unit tests of [`super::Balancer`]: strategies, priority groups, aliases and circuits, all on
//! a [`ManualClock`] so nothing sleeps.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::policy::ManualClock;

fn target(provider: &str, weight: u32, priority: u32, alias: Option<&str>) -> TargetConfig {
    TargetConfig {
        provider: provider.to_owned(),
        model: Some(format!("{provider}-model")),
        weight,
        priority,
        model_alias: alias.map(str::to_owned),
    }
}

fn plain(n: usize) -> Vec<TargetConfig> {
    (0..n).map(|i| target(&format!("p{i}"), 1, 0, None)).collect()
}

fn balancer(targets: &[TargetConfig], strategy: Strategy, max_fails: u32) -> (Balancer, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new());
    let balance =
        BalanceConfig { strategy, latency: LatencyMetric::Ttft, decay: Duration::from_secs(10), hash_header: None };
    let circuit = CircuitConfig { max_fails, fail_timeout: Duration::from_secs(10) };
    (Balancer::with_clock(targets, &balance, &circuit, clock.clone()), clock)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn success_ttft(ttft: Duration) -> Outcome {
    Outcome::Success { ttft, total: ttft * 2, tokens: 0 }
}

fn firsts(b: &Balancer, n: usize) -> Vec<usize> {
    let mut counts = vec![0; b.len()];
    for _ in 0..n {
        if let Some(i) = b.plan(None, b"").first() {
            counts[i] += 1;
        }
    }
    counts
}

fn indices(plan: &Plan) -> Vec<usize> {
    plan.iter().collect()
}

#[test]
fn weighted_smooth_wrr_is_exact() {
    let (b, _clock) = balancer(&[target("a", 1, 0, None), target("b", 3, 0, None)], Strategy::Weighted, 5);
    assert_eq!(firsts(&b, 1000), vec![250, 750]);
    // smooth: every cycle of 4 holds exactly one `a`, and every plan lists both targets
    let picks: Vec<usize> = (0..8).filter_map(|_| b.plan(None, b"").first()).collect();
    assert_eq!(picks.chunks(4).map(|c| c.iter().filter(|&&i| i == 0).count()).collect::<Vec<_>>(), vec![1, 1]);
    assert_eq!(b.plan(None, b"").len(), 2);
}

#[test]
fn weighted_zero_weight_is_standby() {
    let (b, _clock) = balancer(&[target("a", 0, 0, None), target("b", 2, 0, None)], Strategy::Weighted, 1);
    for _ in 0..10 {
        assert_eq!(indices(&b.plan(None, b"")), vec![1, 0]);
    }
    b.record(1, Outcome::Failure);
    assert_eq!(indices(&b.plan(None, b"")), vec![0], "the standby serves when it is the only option");
}

#[test]
fn round_robin_is_even_and_rotates() {
    let (b, _clock) = balancer(&plain(3), Strategy::RoundRobin, 5);
    assert_eq!(firsts(&b, 300), vec![100, 100, 100]);
    let plan = b.plan(None, b"");
    let first = plan.first().unwrap_or(usize::MAX);
    assert_eq!(indices(&plan), vec![first, (first + 1) % 3, (first + 2) % 3]);
}

#[test]
fn least_connections_prefers_idle_target() {
    let (b, _clock) = balancer(&plain(2), Strategy::LeastConnections, 5);
    assert_eq!(firsts(&b, 10), vec![5, 5], "ties alternate");
    let busy = b.start(0);
    assert_eq!(firsts(&b, 10), vec![0, 10]);
    assert_eq!(indices(&b.plan(None, b"")), vec![1, 0]);
    let other = b.start(1);
    let another = b.start(1);
    assert_eq!(firsts(&b, 10), vec![10, 0]);
    drop((busy, other, another));
    assert_eq!(firsts(&b, 10), vec![5, 5], "guards released the counts");
}

#[test]
fn lowest_latency_prefers_fast_then_peaks_away_and_decays_back() {
    let (b, clock) = balancer(&plain(2), Strategy::LowestLatency, 5);
    b.record(0, success_ttft(ms(100)));
    b.record(1, success_ttft(ms(300)));
    assert_eq!(firsts(&b, 10), vec![10, 0]);
    // a spike replaces the average at once
    b.record(0, success_ttft(ms(2000)));
    assert_eq!(firsts(&b, 10), vec![0, 10]);
    clock.advance(Duration::from_secs(1));
    b.record(1, success_ttft(ms(300)));
    assert_eq!(firsts(&b, 10), vec![0, 10], "one second is not enough to forget a peak");
    // three decay constants later the idle spike has faded (2000 ms × e^-3 ≈ 100 ms)
    clock.advance(Duration::from_secs(30));
    b.record(1, success_ttft(ms(300)));
    assert_eq!(b.plan(None, b"").first(), Some(0));
    // and a fast sample is blended in: ≈ 195 ms < 300 ms
    b.record(0, success_ttft(ms(100)));
    assert_eq!(firsts(&b, 10), vec![10, 0]);
    let ewma = b.snapshot()[0].latency_ewma_ms.unwrap_or(0.0);
    assert!((150.0..250.0).contains(&ewma), "ewma {ewma}");
}

#[test]
fn lowest_latency_tries_unmeasured_first_and_penalises_in_flight() {
    let (b, _clock) = balancer(&plain(3), Strategy::LowestLatency, 5);
    b.record(0, success_ttft(ms(100)));
    b.record(1, success_ttft(ms(150)));
    assert_eq!(b.plan(None, b"").first(), Some(2), "unmeasured gets a chance first");
    let cold = b.start(2);
    assert_eq!(indices(&b.plan(None, b"")), vec![0, 1, 2], "in flight on a cold target: priced at the worst");
    let busy = b.start(0);
    assert_eq!(b.plan(None, b"").first(), Some(1), "100 ms × 2 in flight > 150 ms");
    drop((cold, busy));
}

#[test]
fn latency_metric_total_uses_whole_call() {
    let clock = Arc::new(ManualClock::new());
    let balance = BalanceConfig {
        strategy: Strategy::LowestLatency,
        latency: LatencyMetric::Total,
        decay: Duration::from_secs(10),
        hash_header: None,
    };
    let b = Balancer::with_clock(&plain(2), &balance, &CircuitConfig::default(), clock);
    b.record(0, Outcome::Success { ttft: ms(10), total: ms(900), tokens: 0 });
    b.record(1, Outcome::Success { ttft: ms(50), total: ms(200), tokens: 0 });
    assert_eq!(b.plan(None, b"").first(), Some(1));
}

#[test]
fn lowest_usage_prefers_fewest_tokens_and_decays() {
    let (b, clock) = balancer(&plain(2), Strategy::LowestUsage, 5);
    assert_eq!(firsts(&b, 10), vec![5, 5], "ties round-robin");
    b.add_tokens(0, 1000);
    assert_eq!(firsts(&b, 10), vec![0, 10]);
    b.record(1, Outcome::Success { ttft: ms(1), total: ms(1), tokens: 500 });
    b.add_tokens(1, 2500);
    assert_eq!(firsts(&b, 10), vec![10, 0]);
    clock.advance(Duration::from_secs(10));
    let usage = b.snapshot()[1].usage_tokens;
    assert!((usage - 3000.0 / std::f64::consts::E).abs() < 1.0, "usage {usage}");
    b.add_tokens(0, 1000);
    assert_eq!(b.plan(None, b"").first(), Some(1), "old usage decayed: 368 + 1000 > 1104");
}

fn hash_firsts(b: &Balancer, keys: usize) -> Vec<usize> {
    (0..keys).filter_map(|k| b.plan(None, format!("agent-{k}").as_bytes()).first()).collect()
}

#[test]
fn consistent_hash_is_stable_and_ejection_moves_only_its_keys() {
    let (b, _clock) = balancer(&plain(4), Strategy::ConsistentHash, 1);
    let before = hash_firsts(&b, 2000);
    assert_eq!(before.len(), 2000);
    assert_eq!(before, hash_firsts(&b, 2000), "same key, same target");
    for i in 0..4 {
        let share = before.iter().filter(|&&t| t == i).count();
        assert!((350..650).contains(&share), "target {i} owns {share} of 2000 keys");
    }
    b.record(2, Outcome::Failure);
    let after = hash_firsts(&b, 2000);
    for (old, new) in before.iter().zip(&after) {
        if *old == 2 {
            assert_ne!(*new, 2);
        } else {
            assert_eq!(old, new, "only the ejected target's keys move");
        }
    }
    // the failover order is the rendezvous order: the second choice before ejection is the
    // first choice after it
    let (fresh, _clock) = balancer(&plain(4), Strategy::ConsistentHash, 1);
    for k in 0..200 {
        let key = format!("agent-{k}");
        let plan = fresh.plan(None, key.as_bytes());
        if plan.first() == Some(2) {
            assert_eq!(plan.get(1), b.plan(None, key.as_bytes()).first());
        }
    }
}

#[test]
fn consistent_hash_follows_weights_and_ignores_list_order() {
    let targets = [target("a", 1, 0, None), target("b", 3, 0, None)];
    let (b, _clock) = balancer(&targets, Strategy::ConsistentHash, 1);
    let picks = hash_firsts(&b, 4000);
    let share_b = picks.iter().filter(|&&t| t == 1).count();
    assert!((2800..3200).contains(&share_b), "weight 3 of 4 got {share_b} of 4000");
    let swapped = [targets[1].clone(), targets[0].clone()];
    let (s, _clock) = balancer(&swapped, Strategy::ConsistentHash, 1);
    let swapped_picks = hash_firsts(&s, 4000);
    assert!(picks.iter().zip(&swapped_picks).all(|(a, b)| *a == 1 - *b), "keys follow the target, not its index");
}

#[test]
fn priority_groups_fall_back_only_when_group_is_ejected() {
    let targets = [target("a", 1, 0, None), target("b", 1, 0, None), target("c", 1, 1, None)];
    let (b, clock) = balancer(&targets, Strategy::RoundRobin, 1);
    for _ in 0..10 {
        let plan = indices(&b.plan(None, b""));
        assert_eq!(plan.len(), 3);
        assert!(plan[0] < 2 && plan[1] < 2 && plan[2] == 2, "plan {plan:?}");
    }
    b.record(0, Outcome::Failure);
    assert_eq!(indices(&b.plan(None, b"")), vec![1, 2]);
    clock.advance(Duration::from_secs(1));
    b.record(1, Outcome::Failure);
    assert_eq!(indices(&b.plan(None, b"")), vec![2], "group 1 only once group 0 is all open");
    clock.advance(Duration::from_secs(1));
    b.record(2, Outcome::Failure);
    assert_eq!(indices(&b.plan(None, b"")), vec![0, 1, 2], "all ejected: soonest expiry first");
    // a's fail_timeout elapses: it is probed first, alone among the healthy
    clock.advance(Duration::from_secs(8));
    assert_eq!(indices(&b.plan(None, b"")), vec![0]);
    // the probe slot is taken, everything else is open again: soonest expiry first
    assert_eq!(indices(&b.plan(None, b"")), vec![0, 1, 2]);
}

#[test]
fn half_open_target_is_probed_once_then_rejoins() {
    let (b, clock) = balancer(&plain(2), Strategy::RoundRobin, 2);
    b.record(0, Outcome::Failure);
    assert_eq!(firsts(&b, 10), vec![5, 5], "below max_fails");
    b.record(0, Outcome::Failure);
    assert_eq!(firsts(&b, 10), vec![0, 10]);
    assert_eq!(b.snapshot()[0].circuit, CircuitState::Open);
    clock.advance(Duration::from_secs(10));
    assert_eq!(indices(&b.plan(None, b"")), vec![0, 1], "the probe goes first");
    assert_eq!(indices(&b.plan(None, b"")), vec![1], "one probe at a time");
    let probe = b.start(0);
    assert!(probe.is_probe());
    assert!(b.snapshot()[0].probe_in_flight);
    assert_eq!(indices(&b.plan(None, b"")), vec![1]);
    b.record(0, success_ttft(ms(10)));
    drop(probe);
    assert_eq!(b.snapshot()[0].circuit, CircuitState::Closed);
    assert_eq!(firsts(&b, 10), vec![5, 5]);
}

#[test]
fn failed_probe_reopens() {
    let (b, clock) = balancer(&plain(2), Strategy::Weighted, 1);
    b.record(0, Outcome::Failure);
    clock.advance(Duration::from_secs(10));
    assert_eq!(b.plan(None, b"").first(), Some(0));
    let probe = b.start(0);
    b.record(0, Outcome::Failure);
    drop(probe);
    assert_eq!(indices(&b.plan(None, b"")), vec![1]);
    let status = &b.snapshot()[0];
    assert_eq!((status.circuit, status.retry_in_ms), (CircuitState::Open, Some(10_000)));
}

#[test]
fn cancelled_probe_frees_the_slot() {
    let (b, clock) = balancer(&plain(2), Strategy::RoundRobin, 1);
    b.record(0, Outcome::Failure);
    clock.advance(Duration::from_secs(10));
    assert_eq!(b.plan(None, b"").first(), Some(0));
    drop(b.start(0));
    assert_eq!(b.plan(None, b"").first(), Some(0), "a new plan may probe again");
}

#[test]
fn alias_filters_targets_when_it_matches() {
    let targets = [
        target("a", 1, 0, Some("fast")),
        target("b", 1, 0, Some("fast")),
        target("c", 1, 0, Some("big")),
        target("d", 1, 0, None),
    ];
    let (b, _clock) = balancer(&targets, Strategy::RoundRobin, 1);
    for _ in 0..4 {
        let mut fast = indices(&b.plan(Some("fast"), b""));
        fast.sort_unstable();
        assert_eq!(fast, vec![0, 1]);
    }
    assert_eq!(indices(&b.plan(Some("big"), b"")), vec![2]);
    assert_eq!(b.plan(Some("gpt-4o"), b"").len(), 4, "unknown alias: model passed as is, all targets");
    assert_eq!(b.plan(None, b"").len(), 4);
    b.record(2, Outcome::Failure);
    assert_eq!(indices(&b.plan(Some("big"), b"")), vec![2], "all matching targets ejected: still tried");
}

#[test]
fn in_flight_and_out_of_range_indices() {
    let (b, _clock) = balancer(&plain(2), Strategy::LeastConnections, 1);
    let guard = b.start(1);
    assert!(!guard.is_probe());
    assert_eq!(b.snapshot()[1].in_flight, 1);
    drop(guard);
    assert_eq!(b.snapshot()[1].in_flight, 0);
    drop(b.start(7));
    b.record(7, Outcome::Failure);
    b.add_tokens(7, 10);
    assert_eq!(b.snapshot().len(), 2);
    let (empty, _clock) = balancer(&[], Strategy::Weighted, 1);
    assert!(empty.is_empty());
    assert!(empty.plan(Some("x"), b"k").is_empty());
}

#[test]
fn snapshot_reports_state() {
    let (b, _clock) = balancer(&[target("a", 2, 1, Some("fast"))], Strategy::Weighted, 3);
    b.record(0, Outcome::Failure);
    b.record(0, Outcome::Success { ttft: ms(40), total: ms(90), tokens: 12 });
    b.add_tokens(0, 30);
    let s = &b.snapshot()[0];
    assert_eq!(s.provider, "a");
    assert_eq!(s.model.as_deref(), Some("a-model"));
    assert_eq!(s.model_alias.as_deref(), Some("fast"));
    assert_eq!((s.priority, s.weight), (1, 2));
    assert_eq!((s.circuit, s.consecutive_failures, s.retry_in_ms), (CircuitState::Closed, 0, None));
    assert_eq!(s.latency_ewma_ms, Some(40.0));
    assert_eq!(s.usage_tokens, 42.0);
    assert_eq!(b.plan(None, b"").into_iter().collect::<Vec<_>>(), vec![0]);
}

#[test]
fn decay_helpers() {
    assert_eq!(decay_weight(0, 0.0), 1.0);
    assert_eq!(decay_weight(5, 0.0), 0.0);
    assert!((decay_weight(10, 10.0) - (-1.0f64).exp()).abs() < 1e-12);
    let mut stats = Stats::default();
    stats.observe_latency(100.0, 0, 10.0);
    stats.observe_latency(50.0, 10, 10.0);
    let w = (-1.0f64).exp();
    assert!((stats.latency.unwrap_or(0.0) - (100.0 * w + 50.0 * (1.0 - w))).abs() < 1e-9);
    stats.observe_latency(500.0, 10, 10.0);
    assert_eq!(stats.latency, Some(500.0), "peak replaces");
}

#[test]
fn all_ejected_attempt_probes_and_its_success_restores_the_target() {
    let (b, clock) = balancer(&plain(2), Strategy::RoundRobin, 1);
    b.record(1, Outcome::Failure);
    clock.advance(Duration::from_secs(2));
    b.record(0, Outcome::Failure);
    assert_eq!(indices(&b.plan(None, b"")), vec![1, 0], "soonest expiry first");
    let attempt = b.start(1);
    assert!(attempt.is_probe());
    let second = b.start(1);
    assert!(!second.is_probe(), "one probe at a time");
    b.record(1, success_ttft(ms(20)));
    drop((attempt, second));
    assert_eq!(b.snapshot()[1].circuit, CircuitState::Closed);
    assert_eq!(indices(&b.plan(None, b"")), vec![1]);
}
