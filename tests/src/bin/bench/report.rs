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
    /// The client's (wrk's) own CPU time per request in the max-throughput run.
    pub(crate) client_cpu_us_per_req: Option<f64>,
    /// The proxy's CPU time per call in the latency run at the common rate.
    pub(crate) lat_cpu_us_per_req: Option<f64>,
    pub(crate) lat: Lat,
    /// Latency at the full `--rate`, when the common rate had to be lower and this target
    /// sustains it.
    pub(crate) full: Option<Lat>,
    pub(crate) st: Lat,
    /// tollgate requests counted during this target's runs, by route (and under `uprobe`, the
    /// calls observed through the TLS uprobes).
    pub(crate) via: BTreeMap<&'static str, f64>,
    /// Chat completions the mock served during this target's runs.
    pub(crate) at_mock: u64,
    /// Range the uprobe-observed count must fall in (`tollgate-observe`): the calls its clients
    /// completed, and those plus wrk's requests in flight when it stopped.
    pub(crate) uprobe_want: (u64, u64),
    /// Why this target could not be measured (its runs were skipped).
    pub(crate) failed: Option<String>,
}

/// Why a run is not valid, per target: requests that went through the wrong tollgate route, did
/// not all reach the mock, or failed. LiteLLM's entries are reported but not fatal.
pub(crate) fn problems(targets: &[Target], rows: &[Row], full_rate: u64) -> Vec<(Kind, String)> {
    let mut problems: Vec<(Kind, String)> = Vec::new();
    for (t, r) in targets.iter().zip(rows) {
        if let Some(why) = &r.failed {
            problems.push((t.kind, format!("{}: not measured: {why}", t.name)));
        }
        let full = r.full.as_ref();
        let done = r.wrk_requests + r.lat.ok + r.st.ok + full.map(|l| l.ok).unwrap_or(0);
        let want = match t.kind {
            Kind::Capture => Some("bench"),
            Kind::Gateway => Some("gw"),
            Kind::GatewayRedis => Some("gwr"),
            Kind::Observe => Some("observe"),
            _ => None,
        };
        let observed = r.via.get("uprobe").copied().unwrap_or(0.0);
        let (lo, hi) = if t.kind == Kind::Observe { r.uprobe_want } else { (0, 0) };
        if observed < lo as f64 || observed > hi as f64 {
            problems.push((
                t.kind,
                format!(
                    "{}: tollgate observed {observed} calls through the TLS uprobes, want {}",
                    t.name,
                    if lo == hi { lo.to_string() } else { format!("{lo} to {hi} (wrk's in-flight requests)") }
                ),
            ));
        }
        for (route, n) in r.via.iter().filter(|(k, _)| **k != "uprobe") {
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
        "{:<17} {:>10} {:>10} {:>10} {:>16} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12}",
        "target",
        "max req/s",
        "vs direct",
        "wrk reqs",
        "proxy CPU us/req",
        "wrk us/req",
        "via bench",
        "via gw",
        "via gwr",
        "uprobe",
        "at mock"
    );
    for r in rows {
        println!(
            "{:<17} {:>10.0} {:>10.3} {:>10} {:>16} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12}",
            r.name,
            r.rps,
            r.rps / direct.rps,
            r.wrk_requests,
            na(r.cpu_us_per_req, 0),
            na(r.client_cpu_us_per_req, 1),
            r.via.get("bench").copied().unwrap_or(0.0),
            r.via.get("gw").copied().unwrap_or(0.0),
            r.via.get("gwr").copied().unwrap_or(0.0),
            r.via.get("uprobe").copied().unwrap_or(0.0),
            r.at_mock
        );
    }
    println!(
        "(via bench / gw / gwr / uprobe / at mock: requests tollgate's routes counted, calls it observed through the \
         TLS uprobes, and completions the mock served, over all three phases; wrk us/req: wrk's own CPU)"
    );
    println!();
    println!("Latency, non-streamed (open loop at {rate} req/s for every target, {} s)", a.duration);
    println!(
        "{:<17} {:>10} {:>10} {:>12} {:>12} {:>10} {:>8}",
        "target", "p50 ms", "p99 ms", "p50 added", "p99 added", "ok", "errors"
    );
    for r in rows {
        let d = reference(rows, r);
        println!(
            "{:<17} {:>10.3} {:>10.3} {:>12.3} {:>12.3} {:>10} {:>8}",
            r.name,
            r.lat.p50,
            r.lat.p99,
            r.lat.p50 - d.lat.p50,
            r.lat.p99 - d.lat.p99,
            r.lat.ok,
            r.lat.errors
        );
    }
    println!("(added: against direct; for tollgate-observe against direct-tls, the same HTTPS calls outside tollgate)");
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
        for r in rows {
            let d = reference(rows, r).full.clone().unwrap_or_default();
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
        let d = reference(rows, r);
        println!(
            "{:<17} {:>9.3} {:>9.3} {:>11.3} {:>11.3} {:>10.3} {:>10.3} {:>8.1} {:>8} {:>7}",
            r.name,
            r.st.ttft_p50,
            r.st.ttft_p99,
            r.st.ttft_p50 - d.st.ttft_p50,
            r.st.ttft_p99 - d.st.ttft_p99,
            r.st.p50,
            r.st.p99,
            r.st.events,
            r.st.ok,
            r.st.errors
        );
    }
    println!("(all times in ms from each request's scheduled send time; 2 cores shared by clients, proxy and mock)");
    if let Some(o) = observe(rows) {
        println!();
        println!(
            "TLS observation through uprobes (tollgate-observe minus direct-tls, {rate} req/s): p50 {:+.3} ms, p99 \
             {:+.3} ms (target p50 <= {OBSERVE_P50_TARGET_MS} ms: {})",
            o.p50_added,
            o.p99_added,
            met(o.p50_added <= OBSERVE_P50_TARGET_MS)
        );
        println!(
            "  CPU per call {:.1} us = tollgate {:.1} us (utime+stime, max-throughput run) + client extra {:.1} us (wrk's \
             CPU per request vs direct-tls, floored at 0; measured {:+.1} us) (target <= {OBSERVE_CPU_TARGET_US} us: {})",
            o.cpu_us,
            o.tollgate_cpu_us,
            o.client_extra_us.max(0.0),
            o.client_extra_us,
            met(o.cpu_us <= OBSERVE_CPU_TARGET_US)
        );
        println!(
            "  at {rate} req/s: tollgate {:.1} us per call (idle work included; tollgate-capture's plain HTTP: {}), \
             loadgen {:+.1} us per call vs direct-tls",
            o.lat_tollgate_cpu_us,
            na(get(rows, "tollgate-capture").and_then(|r| r.lat_cpu_us_per_req), 1),
            o.lat_client_extra_us
        );
        println!(
            "  (direct-tls runs with no probe attached anywhere: the observing tollgate runs only during \
             tollgate-observe's runs. The added time and CPU include the capture redirect and splice hop through \
             tollgate's proxy and the TLS syscall tracepoints, not only the OpenSSL probes)"
        );
    }
}

/// Issue 14's target for uprobe observation: added p50 latency, ms (reported, not enforced).
const OBSERVE_P50_TARGET_MS: f64 = 0.02;
/// Issue 14's target for uprobe observation: CPU per call, us (reported, not enforced).
const OBSERVE_CPU_TARGET_US: f64 = 10.0;

/// How a target is reported: met or, loudly, not.
fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

/// The row a target's added latency is measured against: direct-tls for the TLS targets (same
/// HTTPS calls, no tollgate), direct for the others.
fn reference<'a>(rows: &'a [Row], r: &Row) -> &'a Row {
    match r.name {
        "direct-tls" | "tollgate-observe" => get(rows, "direct-tls").unwrap_or(&rows[0]),
        _ => &rows[0],
    }
}

/// What observing through uprobes costs, from the `tollgate-observe` and `direct-tls` rows.
struct Observe {
    p50_added: f64,
    p99_added: f64,
    tollgate_cpu_us: f64,
    client_extra_us: f64,
    /// tollgate's CPU plus the client's extra (when positive), per call.
    cpu_us: f64,
    lat_tollgate_cpu_us: f64,
    lat_client_extra_us: f64,
}

/// `None` unless both TLS targets were measured.
fn observe(rows: &[Row]) -> Option<Observe> {
    let (o, d) = (get(rows, "tollgate-observe")?, get(rows, "direct-tls")?);
    if o.failed.is_some() {
        return None;
    }
    let tollgate_cpu_us = o.cpu_us_per_req.unwrap_or(f64::NAN);
    let client_extra_us = o.client_cpu_us_per_req.unwrap_or(f64::NAN) - d.client_cpu_us_per_req.unwrap_or(f64::NAN);
    Some(Observe {
        p50_added: o.lat.p50 - d.lat.p50,
        p99_added: o.lat.p99 - d.lat.p99,
        tollgate_cpu_us,
        client_extra_us,
        cpu_us: tollgate_cpu_us + client_extra_us.max(0.0),
        lat_tollgate_cpu_us: o.lat_cpu_us_per_req.unwrap_or(f64::NAN),
        lat_client_extra_us: o.lat.client_cpu_us - d.lat.client_cpu_us,
    })
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
    // TLS observation through uprobes (issue 14), appended likewise.
    let o = observe(rows);
    s.push_str(&format!(
        " observe_p50_added_ms={} observe_p99_added_ms={} observe_cpu_us_per_req={} observe_cpu_tollgate_us_per_req={} \
         observe_cpu_client_us_per_req={} max_rps_direct_tls={} max_rps_observe={}",
        f(o.as_ref().map(|o| o.p50_added)),
        f(o.as_ref().map(|o| o.p99_added)),
        f(o.as_ref().map(|o| o.cpu_us)),
        f(o.as_ref().map(|o| o.tollgate_cpu_us)),
        f(o.as_ref().map(|o| o.client_extra_us)),
        get("direct-tls").map(|r| format!("{:.0}", r.rps)).unwrap_or_else(|| "na".into()),
        get("tollgate-observe").map(|r| format!("{:.0}", r.rps)).unwrap_or_else(|| "na".into()),
    ));
    s
}
