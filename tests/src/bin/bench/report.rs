//! What the bench prints: the per-target result rows, the validity checks on them, the
//! human-readable tables and the machine-readable `bench:` summary line (its format is what
//! scripts parse, so it stays exactly as it is).

use std::collections::BTreeMap;

use crate::measure::Lat;
use crate::targets::{Kind, Target};
use crate::Args;

/// Everything measured for one target over all phases: one line in each table.
#[derive(Debug, Default, Clone)]
pub(crate) struct Row {
    pub(crate) name: &'static str,
    pub(crate) rps: f64,
    pub(crate) wrk_requests: u64,
    pub(crate) wrk_errors: String,
    pub(crate) cpu_us_per_req: Option<f64>,
    pub(crate) lat: Lat,
    /// Latency at the full `--rate`, when the common rate had to be lower and this target
    /// sustains it.
    pub(crate) full: Option<Lat>,
    pub(crate) st: Lat,
    /// tollgate requests counted during this target's runs, by route.
    pub(crate) via: BTreeMap<&'static str, f64>,
    /// Chat completions the mock served during this target's runs.
    pub(crate) at_mock: u64,
}

/// Why a run is not valid, per target: requests that went through the wrong tollgate route, did
/// not all reach the mock, or failed. LiteLLM's entries are reported but not fatal.
pub(crate) fn problems(targets: &[Target], rows: &[Row], full_rate: u64) -> Vec<(Kind, String)> {
    let mut problems: Vec<(Kind, String)> = Vec::new();
    for (t, r) in targets.iter().zip(rows) {
        let full = r.full.as_ref();
        let done = r.wrk_requests + r.lat.ok + r.st.ok + full.map(|l| l.ok).unwrap_or(0);
        let want = match t.kind {
            Kind::Capture => Some("bench"),
            Kind::Gateway => Some("gw"),
            Kind::GatewayRedis => Some("gwr"),
            _ => None,
        };
        for (route, n) in &r.via {
            if Some(*route) == want {
                if *n < done as f64 {
                    problems.push((
                        t.kind,
                        format!("{}: tollgate route {route} counted {n} requests but {done} completed", t.name),
                    ));
                }
            } else if *n != 0.0 {
                problems.push((t.kind, format!("{}: reached tollgate route {route} ({n} requests)", t.name)));
            }
        }
        if r.at_mock < done {
            problems.push((t.kind, format!("{}: the mock served {} completions, {done} completed", t.name, r.at_mock)));
        }
        if let Some(l) = full.filter(|l| l.errors > 0) {
            problems
                .push((t.kind, format!("{}: {} errors at {} req/s: {}", t.name, l.errors, full_rate, l.first_error)));
        }
        if !r.wrk_errors.is_empty() || r.lat.errors > 0 || r.st.errors > 0 {
            problems.push((
                t.kind,
                format!(
                    "{}: errors (wrk: {}; latency: {} {}; streaming: {} {})",
                    t.name, r.wrk_errors, r.lat.errors, r.lat.first_error, r.st.errors, r.st.first_error
                ),
            ));
        }
    }
    problems
}

/// A message nobody can miss on stderr, and one line of it in the stdout report.
pub(crate) fn loud(msg: &str) {
    let bar = "!".repeat(100);
    eprintln!("\n{bar}\n!!! {msg}\n{bar}\n");
    println!("!!! {msg}");
}

/// The three human-readable tables (throughput, latency, streaming), deltas against direct.
pub(crate) fn print_tables(a: &Args, rows: &[Row], rate: u64, stream_rate: u64, req_len: usize, resp_len: usize) {
    let direct = &rows[0];
    let na = |v: Option<f64>, prec: usize| v.map(|v| format!("{v:.prec$}")).unwrap_or_else(|| "-".into());
    println!();
    println!(
        "Throughput, non-streamed (wrk -t{} -c{}, {} s; request {req_len} B, response {resp_len} B)",
        a.threads, a.connections, a.duration
    );
    println!(
        "{:<17} {:>10} {:>10} {:>10} {:>16} {:>10} {:>10} {:>10} {:>12}",
        "target", "max req/s", "vs direct", "wrk reqs", "proxy CPU us/req", "via bench", "via gw", "via gwr", "at mock"
    );
    for r in rows {
        println!(
            "{:<17} {:>10.0} {:>10.3} {:>10} {:>16} {:>10} {:>10} {:>10} {:>12}",
            r.name,
            r.rps,
            r.rps / direct.rps,
            r.wrk_requests,
            na(r.cpu_us_per_req, 0),
            r.via.get("bench").copied().unwrap_or(0.0),
            r.via.get("gw").copied().unwrap_or(0.0),
            r.via.get("gwr").copied().unwrap_or(0.0),
            r.at_mock
        );
    }
    println!(
        "(via bench / gw / gwr / at mock: requests tollgate's routes counted and the mock served over all three phases)"
    );
    println!();
    println!("Latency, non-streamed (open loop at {rate} req/s for every target, {} s)", a.duration);
    println!(
        "{:<17} {:>10} {:>10} {:>12} {:>12} {:>10} {:>8}",
        "target", "p50 ms", "p99 ms", "p50 added", "p99 added", "ok", "errors"
    );
    for r in rows {
        println!(
            "{:<17} {:>10.3} {:>10.3} {:>12.3} {:>12.3} {:>10} {:>8}",
            r.name,
            r.lat.p50,
            r.lat.p99,
            r.lat.p50 - direct.lat.p50,
            r.lat.p99 - direct.lat.p99,
            r.lat.ok,
            r.lat.errors
        );
    }
    if let (Some(g), Some(r)) = (get(rows, "tollgate-gateway"), get(rows, "tollgate-gw-redis")) {
        println!(
            "Redis-backed token limit (tollgate-gw-redis minus tollgate-gateway: prompt estimate, reserve and settle \
             in Redis): p50 {:+.3} ms, p99 {:+.3} ms",
            r.lat.p50 - g.lat.p50,
            r.lat.p99 - g.lat.p99
        );
    }
    if rows.iter().any(|r| r.full.is_some()) {
        println!();
        println!(
            "Latency, non-streamed, at the full {} req/s (targets whose max is at least twice that, {} s)",
            a.rate, a.duration
        );
        println!(
            "{:<17} {:>10} {:>10} {:>12} {:>12} {:>10} {:>8}",
            "target", "p50 ms", "p99 ms", "p50 added", "p99 added", "ok", "errors"
        );
        let d = direct.full.clone().unwrap_or_default();
        for r in rows {
            if let Some(l) = &r.full {
                println!(
                    "{:<17} {:>10.3} {:>10.3} {:>12.3} {:>12.3} {:>10} {:>8}",
                    r.name,
                    l.p50,
                    l.p99,
                    l.p50 - d.p50,
                    l.p99 - d.p99,
                    l.ok,
                    l.errors
                );
            }
        }
    }
    println!();
    println!(
        "Streaming (open loop at {stream_rate} streams/s, {} s; {} tokens, mock event every {} ms; TTFT = first non-empty delta)",
        a.duration, a.stream_max_tokens, a.chunk_delay_ms
    );
    println!(
        "{:<17} {:>9} {:>9} {:>11} {:>11} {:>10} {:>10} {:>8} {:>8} {:>7}",
        "target", "TTFT p50", "TTFT p99", "p50 added", "p99 added", "total p50", "total p99", "events", "ok", "errors"
    );
    for r in rows {
        println!(
            "{:<17} {:>9.3} {:>9.3} {:>11.3} {:>11.3} {:>10.3} {:>10.3} {:>8.1} {:>8} {:>7}",
            r.name,
            r.st.ttft_p50,
            r.st.ttft_p99,
            r.st.ttft_p50 - direct.st.ttft_p50,
            r.st.ttft_p99 - direct.st.ttft_p99,
            r.st.p50,
            r.st.p99,
            r.st.events,
            r.st.ok,
            r.st.errors
        );
    }
    println!("(all times in ms from each request's scheduled send time; 2 cores shared by clients, proxy and mock)");
}

/// The row of target `name`, if it was measured.
fn get<'a>(rows: &'a [Row], name: &str) -> Option<&'a Row> {
    rows.iter().find(|r| r.name == name)
}

/// Resident memory, MB.
#[derive(Clone, Copy)]
pub(crate) struct Mem {
    pub(crate) idle_rss_mb: f64,
    pub(crate) load_rss_mb: f64,
    pub(crate) litellm_idle: Option<f64>,
    pub(crate) litellm_load: f64,
}

/// The machine-readable last line. Unprefixed ratios are tollgate-gateway's (LiteLLM's peer).
pub(crate) fn summary(rows: &[Row], mem: &Mem, rate: u64, full_rate: u64, stream_rate: u64) -> String {
    let Mem { idle_rss_mb, load_rss_mb, litellm_idle, litellm_load } = *mem;
    let get = |n: &str| rows.iter().find(|r| r.name == n);
    let d = &rows[0];
    let f = |v: Option<f64>| v.filter(|v| v.is_finite()).map(|v| format!("{v:.3}")).unwrap_or_else(|| "na".into());
    let ratio = |a: &str, b: &str| f(get(a).zip(get(b)).map(|(a, b)| a.rps / b.rps));
    let mut s = format!(
        "bench: tput_vs_direct={} tput_vs_nginx={} tput_vs_litellm={} capture_tput_vs_direct={} capture_tput_vs_nginx={} \
         capture_tput_vs_litellm={}",
        ratio("tollgate-gateway", "direct"),
        ratio("tollgate-gateway", "nginx"),
        ratio("tollgate-gateway", "litellm"),
        ratio("tollgate-capture", "direct"),
        ratio("tollgate-capture", "nginx"),
        ratio("tollgate-capture", "litellm"),
    );
    for (key, name) in
        [("gateway", "tollgate-gateway"), ("capture", "tollgate-capture"), ("nginx", "nginx"), ("litellm", "litellm")]
    {
        let r = get(name);
        s.push_str(&format!(
            " {key}_p50_added_ms={} {key}_p99_added_ms={} {key}_ttft_added_p50_ms={} {key}_ttft_added_p99_ms={}",
            f(r.map(|r| r.lat.p50 - d.lat.p50)),
            f(r.map(|r| r.lat.p99 - d.lat.p99)),
            f(r.map(|r| r.st.ttft_p50 - d.st.ttft_p50)),
            f(r.map(|r| r.st.ttft_p99 - d.st.ttft_p99)),
        ));
    }
    let full = |r: Option<&Row>, q: fn(&Lat) -> f64| {
        f(r.and_then(|r| r.full.as_ref()).zip(d.full.as_ref()).map(|(l, dl)| q(l) - q(dl)))
    };
    for (key, name) in [("gateway", "tollgate-gateway"), ("capture", "tollgate-capture"), ("nginx", "nginx")] {
        s.push_str(&format!(
            " {key}_p50_added_ms_full={} {key}_p99_added_ms_full={}",
            full(get(name), |l| l.p50),
            full(get(name), |l| l.p99)
        ));
    }
    s.push_str(&format!(
        " max_rps_direct={:.0} max_rps_gateway={:.0} max_rps_capture={:.0} max_rps_nginx={:.0} max_rps_litellm={}",
        d.rps,
        get("tollgate-gateway").map(|r| r.rps).unwrap_or(f64::NAN),
        get("tollgate-capture").map(|r| r.rps).unwrap_or(f64::NAN),
        get("nginx").map(|r| r.rps).unwrap_or(f64::NAN),
        get("litellm").map(|r| format!("{:.0}", r.rps)).unwrap_or_else(|| "na".into()),
    ));
    s.push_str(&format!(
        " idle_rss_mb={idle_rss_mb:.1} load_rss_mb={load_rss_mb:.1} litellm_idle_rss_mb={} litellm_load_rss_mb={} \
         rate={rate} full_rate={} stream_rate={stream_rate}",
        litellm_idle.map(|v| format!("{v:.1}")).unwrap_or_else(|| "na".into()),
        litellm_idle.map(|_| format!("{litellm_load:.1}")).unwrap_or_else(|| "na".into()),
        if d.full.is_some() { full_rate.to_string() } else { "na".into() },
    ));
    // What the Redis-backed token limit adds to the same gateway route (appended, so the keys
    // before it keep their places).
    let (g, r) = (get("tollgate-gateway"), get("tollgate-gw-redis"));
    let both = g.zip(r);
    s.push_str(&format!(
        " redis_p50_added_ms={} redis_p99_added_ms={} redis_ttft_added_p99_ms={} max_rps_gateway_redis={}",
        f(both.map(|(g, r)| r.lat.p50 - g.lat.p50)),
        f(both.map(|(g, r)| r.lat.p99 - g.lat.p99)),
        f(both.map(|(g, r)| r.st.ttft_p99 - g.st.ttft_p99)),
        r.map(|r| format!("{:.0}", r.rps)).unwrap_or_else(|| "na".into()),
    ));
    s
}
