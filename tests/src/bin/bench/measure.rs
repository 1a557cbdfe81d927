//! Measurement runs and their parsing: wrk for max throughput, `loadgen` open loop for latency
//! and streaming, plus the rules that pick the common rates (`capped_rate`, `behind`), kept apart
//! from target setup so every target is measured by exactly the same code.

use std::path::Path;
use std::process::Stdio;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tollgate_e2e::cgroup::{command_in, Group};

use crate::procfs::children_cpu_us;
use crate::targets::Target;
use crate::Args;

/// One `loadgen` run's result (times in ms), the unit every latency and streaming table row is
/// made of.
#[derive(Debug, Default, Clone)]
pub(crate) struct Lat {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) ttft_p50: f64,
    pub(crate) ttft_p99: f64,
    pub(crate) ok: u64,
    /// Successes including the warm-up's (every call a proxy or observer in the path saw).
    pub(crate) ok_all: u64,
    /// The client's own CPU time per successful call (warm-up included), microseconds.
    pub(crate) client_cpu_us: f64,
    pub(crate) errors: u64,
    pub(crate) events: f64,
    pub(crate) first_error: String,
}

/// What one wrk run measured.
pub(crate) struct Wrk {
    pub(crate) rps: f64,
    pub(crate) requests: u64,
    /// Non-2xx and socket error lines (empty: none).
    pub(crate) errors: String,
    /// wrk's own CPU time per request, microseconds.
    pub(crate) client_cpu_us: f64,
}

/// Max throughput of one target with wrk; run inside the target's cgroup when it has one, so
/// captured traffic really is captured. wrk speaks `https://` through the system's OpenSSL (it
/// does not check the certificate).
pub(crate) fn wrk(a: &Args, lua: &Path, url: &str, group: Option<&Group>) -> Result<Wrk> {
    let cpu0 = children_cpu_us();
    let out = command_in(group, None, "wrk")
        .args(["-t", &a.threads.to_string(), "-c", &a.connections.to_string()])
        .args(["-d", &format!("{}s", a.duration), "--timeout", "5s", "-s"])
        .arg(lua)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .context("run wrk")?;
    let cpu = children_cpu_us() - cpu0;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed: {}\n{text}{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let rps: f64 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("no Requests/sec in wrk output:\n{text}"))?;
    let n: u64 = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no request count in wrk output:\n{text}"))?;
    let errs: Vec<String> = text
        .lines()
        .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
        .map(|l| l.trim().to_string())
        .collect();
    Ok(Wrk { rps, requests: n, errors: errs.join("; "), client_cpu_us: cpu / n.max(1) as f64 })
}

/// One open-loop `loadgen` run at `rate` (streamed or not) against a target, parsed from its JSON
/// report; inside the target's cgroup when it has one.
pub(crate) fn loadgen(a: &Args, body: &Path, t: &Target, rate: u64, stream: bool) -> Result<Lat> {
    let mut c = command_in(t.group, None, &a.loadgen.to_string_lossy());
    c.args(["--url", &t.url, "--rate", &rate.to_string(), "--duration", &a.duration.to_string()])
        .args(["--timeout-ms", "10000"])
        .arg("--body-file")
        .arg(body);
    for h in &t.headers {
        c.args(["--header", h]);
    }
    if let Some(ca) = &t.ca {
        c.arg("--ca-file").arg(ca);
    }
    if stream {
        c.arg("--stream");
    }
    let cpu0 = children_cpu_us();
    let out = c.stdin(Stdio::null()).output().context("run loadgen")?;
    let cpu = children_cpu_us() - cpu0;
    if !out.status.success() {
        bail!("loadgen failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let num = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let lat = Lat {
        p50: num("p50_ms"),
        p99: num("p99_ms"),
        ttft_p50: num("ttft_p50_ms"),
        ttft_p99: num("ttft_p99_ms"),
        ok: v["ok"].as_u64().unwrap_or(0),
        ok_all: v["ok_with_warmup"].as_u64().unwrap_or(0),
        client_cpu_us: cpu / v["ok_with_warmup"].as_u64().unwrap_or(0).max(1) as f64,
        errors: v["errors"].as_u64().unwrap_or(0) + v["dropped"].as_u64().unwrap_or(0),
        events: num("events_per_stream"),
        first_error: v["first_error"].as_str().unwrap_or("").chars().take(200).collect(),
    };
    if lat.errors > 0 {
        eprintln!("bench: {}: loadgen errors: {v}", t.name);
    }
    Ok(lat)
}

/// Why a streaming run `s` did not keep up with its rate, judged against direct's `d` at the same
/// rate: errors or drops, a median stream 1.5 times as long, or a TTFT p99 a second later.
pub(crate) fn behind(s: &Lat, d: &Lat) -> Option<String> {
    if s.errors > 0 {
        Some(format!("{} errors: {}", s.errors, s.first_error))
    } else if s.p50 > 1.5 * d.p50 {
        Some(format!("median stream {:.0} ms vs {:.0} ms direct", s.p50, d.p50))
    } else if s.ttft_p99 > d.ttft_p99 + 1000.0 {
        Some(format!("TTFT p99 {:.0} ms vs {:.0} ms direct", s.ttft_p99, d.ttft_p99))
    } else {
        None
    }
}

/// Half the slowest target's max throughput (to a round number), when that is below `wanted`.
pub(crate) fn capped_rate(wanted: u64, slowest_rps: f64) -> u64 {
    if !slowest_rps.is_finite() || slowest_rps / 2.0 >= wanted as f64 {
        return wanted;
    }
    let half = (slowest_rps / 2.0) as u64;
    let round = if half >= 100 { half / 10 * 10 } else { half };
    round.max(1)
}
