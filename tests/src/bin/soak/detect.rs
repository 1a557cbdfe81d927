//! "Grows without bound", defined so a soak of minutes can decide it.
//!
//! A series (samples after the warm-up) grows without bound when both hold:
//! 1. the median of its last third lies above the median of its first third by more than the
//!    slack (`max(abs, rel × first-third median)`): the level moved up, not just a spike (a
//!    median ignores bursts); and
//! 2. the least-squares slope over its second half, times that half's length, exceeds half the
//!    slack: it is still climbing at the end by a material amount, so it is not a warm-up that
//!    settled late.
//!
//! A cache filling to its bound, a sawtooth of bursts and noise pass; a steady leak whose growth
//! over the judged span exceeds about 1.5 × the slack, or a step that keeps rising, fails. The
//! slack is what a run of this length cannot tell from noise; a smaller leak needs a longer run
//! (a 30-minute run sees ten times smaller per-minute leaks than a 3-minute one).

/// Thresholds for one series.
#[derive(Debug, Clone, Copy)]
pub struct Slack {
    /// Absolute slack, in the series' unit.
    pub abs: f64,
    /// Relative slack, as a share of the first third's maximum.
    pub rel: f64,
}

/// The verdict on one series.
#[derive(Debug, Clone)]
pub struct Verdict {
    /// Median of the first third.
    pub first_median: f64,
    /// Median of the last third.
    pub last_median: f64,
    /// Maximum of the last third.
    pub last_max: f64,
    /// Least-squares slope over the second half, per minute.
    pub slope_per_min: f64,
    /// Allowed rise of the level.
    pub allowed: f64,
    /// Whether the series grows without bound by the definition above.
    pub grows: bool,
    /// Points analysed (after the warm-up).
    pub points: usize,
}

/// Least-squares slope of `pts` (`(seconds, value)`), per second.
pub fn slope(pts: &[(f64, f64)]) -> f64 {
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return 0.0;
    }
    let (mt, mv) = (pts.iter().map(|p| p.0).sum::<f64>() / n, pts.iter().map(|p| p.1).sum::<f64>() / n);
    let (mut num, mut den) = (0.0, 0.0);
    for (t, v) in pts {
        num += (t - mt) * (v - mv);
        den += (t - mt) * (t - mt);
    }
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        0.0
    } else if s.len() % 2 == 1 {
        s[s.len() / 2]
    } else {
        (s[s.len() / 2 - 1] + s[s.len() / 2]) / 2.0
    }
}

/// Judge `pts` (`(seconds since start, value)`, in time order), ignoring points before
/// `warmup_s`. Fewer than 9 points after the warm-up are too few to judge: never "grows".
pub fn judge(pts: &[(f64, f64)], warmup_s: f64, slack: Slack) -> Verdict {
    let pts: Vec<(f64, f64)> = pts.iter().copied().filter(|(t, _)| *t >= warmup_s).collect();
    let n = pts.len();
    let third = n / 3;
    let vals = |s: &[(f64, f64)]| s.iter().map(|p| p.1).collect::<Vec<_>>();
    let max = |v: &[f64]| v.iter().copied().fold(f64::MIN, f64::max);
    if n < 9 {
        return Verdict {
            first_median: 0.0,
            last_median: 0.0,
            last_max: 0.0,
            slope_per_min: 0.0,
            allowed: 0.0,
            grows: false,
            points: n,
        };
    }
    let first = vals(&pts[..third]);
    let last = vals(&pts[n - third..]);
    let first_median = median(&first);
    let last_median = median(&last);
    let allowed = slack.abs.max(slack.rel * first_median.abs());
    let half = &pts[n / 2..];
    let per_s = slope(half);
    let half_rise = per_s * (half[half.len() - 1].0 - half[0].0);
    let grows = last_median - first_median > allowed && half_rise > allowed / 2.0;
    Verdict { first_median, last_median, last_max: max(&last), slope_per_min: per_s * 60.0, allowed, grows, points: n }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLACK: Slack = Slack { abs: 8.0, rel: 0.05 };

    /// A deterministic wobble in -1..1, so the tests need no random generator.
    fn noise(i: usize) -> f64 {
        ((i * 7919 % 200) as f64 / 100.0) - 1.0
    }

    fn series(n: usize, f: impl Fn(usize) -> f64) -> Vec<(f64, f64)> {
        (0..n).map(|i| (i as f64 * 5.0, f(i))).collect()
    }

    #[test]
    fn a_steady_leak_is_caught() {
        // 100 MB base, +0.5 MB per 5 s sample (6 MB/min): 36 samples = 3 minutes.
        let s = series(36, |i| 100.0 + 0.5 * i as f64 + 2.0 * noise(i));
        let v = judge(&s, 30.0, SLACK);
        assert!(v.grows, "{v:?}");
        assert!(v.slope_per_min > 4.0 && v.slope_per_min < 8.0, "{v:?}");
    }

    #[test]
    fn a_leak_with_bursts_on_top_is_caught() {
        // Sawtooth of bursts (every 6 samples, +20) on a slow leak: the level still rises.
        let s = series(72, |i| 200.0 + 0.6 * i as f64 + if i % 6 < 2 { 20.0 } else { 0.0 });
        assert!(judge(&s, 30.0, SLACK).grows);
    }

    #[test]
    fn flat_noise_passes() {
        let s = series(36, |i| 100.0 + 3.0 * noise(i));
        let v = judge(&s, 30.0, SLACK);
        assert!(!v.grows, "{v:?}");
    }

    #[test]
    fn warm_up_then_plateau_passes() {
        // Rises for the first minute (cache, arenas, pools), flat after.
        let s = series(72, |i| if i < 12 { 50.0 + 5.0 * i as f64 } else { 110.0 + noise(i) });
        let v = judge(&s, 30.0, SLACK);
        assert!(!v.grows, "{v:?}");
    }

    #[test]
    fn a_bounded_sawtooth_passes() {
        // Idle-connection bursts: fds jump by 300 and come back, forever.
        let s = series(72, |i| if i % 12 < 3 { 350.0 } else { 50.0 });
        let v = judge(&s, 30.0, Slack { abs: 20.0, rel: 0.25 });
        assert!(!v.grows, "{v:?}");
    }

    #[test]
    fn a_late_step_that_keeps_climbing_fails_and_one_that_settles_passes() {
        let climbing = series(60, |i| if i < 40 { 100.0 } else { 100.0 + 2.0 * (i - 40) as f64 });
        assert!(judge(&climbing, 0.0, SLACK).grows);
        let settled = series(60, |i| if i < 30 { 100.0 } else { 104.0 });
        assert!(!judge(&settled, 0.0, SLACK).grows, "a rise inside the slack is not growth");
    }

    #[test]
    fn too_few_points_are_not_judged() {
        let s = series(8, |i| i as f64 * 100.0);
        assert!(!judge(&s, 0.0, SLACK).grows);
    }

    #[test]
    fn slope_of_a_line() {
        let s = series(10, |i| 3.0 + 2.0 * i as f64);
        assert!((slope(&s) - 0.4).abs() < 1e-9);
    }
}
