//! `cargo xtask bench`: tollgate's added latency, time to first token and throughput against a
//! direct connection, nginx and the LiteLLM proxy, measured side by side in one run on loopback.
//!
//! Setup: the mock upstream on 127.0.0.2:<port>, demanding one API key; one tollgate with two
//! routes: `bench` captures that address:port for one cgroup (real eBPF redirect, transparent
//! pass-through: the agent's own key goes through) and `gw` is a gateway listener on 127.0.0.1
//! whose provider is the mock, with the key injected (agents send no key); nginx on
//! 127.0.0.1 proxying to the mock (`proxy_buffering off`); the LiteLLM proxy (from the bench
//! venv) with one `openai/<model>` deployment pointing at the mock.
//!
//! Targets: `direct`, `tollgate-capture` (clients inside the captured cgroup, same URL as direct),
//! `tollgate-gateway`, `nginx`, `litellm`. Each is measured the same way, in three phases:
//! 1. max throughput, non-streamed: wrk (Lua POST script);
//! 2. latency, non-streamed: `loadgen` open loop at one common rate for every target (capped at
//!    half the slowest target's max throughput, so every target runs unsaturated); when it had to
//!    be capped, also at the full `--rate` for the targets whose max is at least twice that;
//! 3. streaming: `loadgen --stream` open loop at a common rate, TTFT and total time.
//!
//! Proof of what went where: tollgate's per-route request counters (only the two tollgate rows,
//! all of their requests) and the mock's own completion counter (every target's requests reached
//! the mock once). A LiteLLM that fails to install, start or serve is reported loudly and the
//! others are still measured.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};
use tollgate_e2e::cgroup::{command_in, Cgroup2, Group};
use tollgate_e2e::mock::MockLlm;
use tollgate_e2e::openai::{self, ChatRequest};
use tollgate_e2e::tollgate::{base_config, ensure_bpffs, Tollgate};
use tollgate_e2e::{free_port, merge, require_root, wait_for};

#[derive(Parser, Debug)]
struct Args {
    /// tollgate binary (release build).
    #[arg(long)]
    tollgate: PathBuf,
    /// mock-llm binary.
    #[arg(long)]
    mock: PathBuf,
    /// loadgen binary.
    #[arg(long)]
    loadgen: PathBuf,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Common request rate for the non-streamed latency runs (lowered to half the slowest
    /// target's max throughput when that is below it).
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Common rate of streamed requests for the TTFT runs (never above the latency rate).
    #[arg(long, default_value_t = 50)]
    stream_rate: u64,
    /// Mock delay between streamed events, in milliseconds.
    #[arg(long, default_value_t = 5)]
    chunk_delay_ms: u64,
    /// `max_tokens` of the streamed requests (one content event per token).
    #[arg(long, default_value_t = 32)]
    stream_max_tokens: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// The `litellm` executable (bench venv); absent: LiteLLM is not measured.
    #[arg(long)]
    litellm: Option<PathBuf>,
    /// Why LiteLLM is not available (printed loudly when --litellm is absent).
    #[arg(long)]
    litellm_unavailable: Option<String>,
    /// LiteLLM worker processes.
    #[arg(long, default_value_t = 2)]
    litellm_workers: u32,
    /// LiteLLM's ASGI server: granian (`--run_granian`), uvicorn (LiteLLM's own default) or
    /// gunicorn. On 2 cores granian with 2 workers served the most requests per second and the
    /// least CPU per request; uvicorn with 2 workers less than with 1.
    #[arg(long, default_value = "granian")]
    litellm_server: String,
    /// Seconds to wait for LiteLLM to become ready.
    #[arg(long, default_value_t = 300)]
    litellm_ready_timeout: u64,
}

/// The key the mock demands; direct/capture/nginx clients send it themselves, tollgate-gateway
/// and LiteLLM inject it.
const UPSTREAM_KEY: &str = "sk-bench-upstream-3c9e1f7a";
/// LiteLLM's master key (it refuses to start without one); LiteLLM clients send it.
const LITELLM_KEY: &str = "sk-litellm-bench-5d2b8e4f0a6c1973";
const MODEL: &str = "gpt-4o-mini";
/// Environment variable tollgate reads the gateway provider's key from.
const KEY_ENV: &str = "TOLLGATE_BENCH_MOCK_KEY";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Direct,
    Capture,
    Gateway,
    Nginx,
    Litellm,
}

struct Target<'a> {
    kind: Kind,
    name: &'static str,
    url: String,
    group: Option<&'a Group>,
    headers: Vec<String>,
    lua: PathBuf,
    /// Processes whose CPU time is the proxy's (empty for direct).
    proxy_pids: Box<dyn Fn() -> Vec<u32> + 'a>,
}

#[derive(Debug, Default, Clone)]
struct Lat {
    p50: f64,
    p99: f64,
    ttft_p50: f64,
    ttft_p99: f64,
    ok: u64,
    errors: u64,
    events: f64,
    first_error: String,
}

#[derive(Debug, Default, Clone)]
struct Row {
    name: &'static str,
    rps: f64,
    wrk_requests: u64,
    wrk_errors: String,
    cpu_us_per_req: Option<f64>,
    lat: Lat,
    /// Latency at the full `--rate`, when the common rate had to be lower and this target
    /// sustains it.
    full: Option<Lat>,
    st: Lat,
    /// tollgate requests counted during this target's runs, by route.
    via: BTreeMap<&'static str, f64>,
    /// Chat completions the mock served during this target's runs.
    at_mock: u64,
}

fn main() -> Result<()> {
    let a = Args::parse();
    // The gateway provider's key comes from the environment (set before any thread starts), not
    // from a file: a `credentials.file` watcher currently re-triggers itself on its own reads
    // (open/close events in the watched directory) and would keep a core busy during the runs.
    std::env::set_var(KEY_ENV, UPSTREAM_KEY);
    require_root()?;
    for tool in ["wrk", "nginx"] {
        if which(tool).is_none() {
            bail!("{tool} not found: run `cargo xtask setup`");
        }
    }
    ensure_bpffs()?;
    let scratch = tempfile::Builder::new().prefix("tollgate-bench-").tempdir()?;
    let dir = scratch.path();

    // ~1 KB request body, ~1 KB response body.
    let filler = "Summarize the following operational notes for the on-call engineer and list the \
                  three most urgent actions with owners and deadlines.";
    let mut user = String::new();
    while user.len() < 860 {
        user.push_str(filler);
        user.push(' ');
    }
    let mut req = ChatRequest::simple(MODEL, user.trim_end());
    req.messages.insert(0, ("system".into(), "You are a concise assistant.".into()));
    req.max_tokens = Some(95);
    let body = serde_json::to_vec(&req.to_json())?;
    let resp_len = openai::completion_body(&openai::reply_for(&req)).len();
    let body_path = dir.join("body.json");
    std::fs::write(&body_path, &body)?;
    // Streamed: same prompt, fewer tokens (one event each); loadgen adds `"stream": true`.
    req.max_tokens = Some(a.stream_max_tokens);
    let stream_body_path = dir.join("stream-body.json");
    std::fs::write(&stream_body_path, serde_json::to_vec(&req.to_json())?)?;

    let mock_port = free_port("127.0.0.2");
    let mock_addr: SocketAddr = format!("127.0.0.2:{mock_port}").parse()?;

    // LiteLLM takes tens of seconds to import and boot its workers: start it first.
    let mut litellm_missing = a.litellm_unavailable.clone();
    let mut litellm = match &a.litellm {
        Some(bin) => match LiteLlm::spawn(bin, dir, mock_addr, &a) {
            Ok(l) => Some(l),
            Err(e) => {
                litellm_missing = Some(format!("could not start LiteLLM: {e:#}"));
                None
            }
        },
        None => {
            litellm_missing.get_or_insert_with(|| "no --litellm given".into());
            None
        }
    };

    let cg = Cgroup2::mount()?;
    let agent = cg.group("bench-agent")?;
    let mock = MockLlm::start(
        &a.mock,
        &[
            "--listen".into(),
            mock_addr.to_string(),
            "--require-key".into(),
            UPSTREAM_KEY.into(),
            "--chunk-delay-ms".into(),
            a.chunk_delay_ms.to_string(),
            "--record-requests".into(),
            "0".into(),
        ],
    )?;

    let tg_dir = Tollgate::scratch()?;
    let gw_port = free_port("127.0.0.1");
    let mut cfg = base_config(&cg, tg_dir.path());
    merge(
        &mut cfg,
        json!({
            "capture": {
                "scope": [agent.rel()],
                "destinations": [{"cidr": "127.0.0.2/32", "port": mock_port}],
            },
            "providers": [{
                "name": "mock",
                "kind": "openai_compatible",
                "base_url": format!("http://{mock_addr}/v1"),
                "credentials": {"env": KEY_ENV},
            }],
            "routes": [
                {"name": "bench", "provider": "openai", "match": {"addresses": [mock_addr.to_string()]}},
                {"name": "gw", "listener": format!("127.0.0.1:{gw_port}"), "targets": [{"provider": "mock"}]},
            ],
            "agents": [{"name": "bench-agent", "match": {"cgroup": agent.rel()}}],
        }),
    );
    let tg = Tollgate::start(&a.tollgate, tg_dir, cfg, None)?;
    let tg_pid = tg.pid().ok_or_else(|| anyhow!("tollgate not running"))?;

    let nginx_port = free_port("127.0.0.1");
    let nginx = Nginx::start(dir, nginx_port, mock_addr)?;
    let nginx_pid = nginx.child.id();

    let url_direct = format!("http://{mock_addr}/v1/chat/completions");
    if let Some(l) = litellm.as_mut() {
        eprintln!("bench: waiting for LiteLLM ({} workers, {}) to become ready", a.litellm_workers, a.litellm_server);
        if let Err(e) = l.wait_ready(Duration::from_secs(a.litellm_ready_timeout), &body) {
            litellm_missing = Some(format!("LiteLLM did not become ready: {e:#}"));
            litellm = None;
        }
    }
    if let Some(why) = &litellm_missing {
        loud(&format!("LiteLLM is NOT measured: {why}"));
    }
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss_mb = tree_rss_mb(&[tg_pid]);
    let litellm_root = litellm.as_ref().map(|l| l.child.id());
    let litellm_idle_rss_mb = litellm_root.map(|p| tree_rss_mb(&descendants(p)));

    // Peak RSS of tollgate and of LiteLLM's process tree while the load runs.
    let peaks = Arc::new(Mutex::new((0.0f64, 0.0f64)));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peaks, stop) = (peaks.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let t = tree_rss_mb(&[tg_pid]);
                let l = litellm_root.map(|p| tree_rss_mb(&descendants(p))).unwrap_or(0.0);
                let mut pk = peaks.lock().expect("lock");
                pk.0 = pk.0.max(t);
                pk.1 = pk.1.max(l);
                drop(pk);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let lua = |name: &str, headers: &[String]| -> Result<PathBuf> {
        let p = dir.join(format!("{name}.lua"));
        let mut s = format!(
            "local f = io.open({:?}, \"rb\")\nwrk.method = \"POST\"\nwrk.body = f:read(\"*a\")\nf:close()\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\n",
            body_path.display().to_string()
        );
        for h in headers {
            let (k, v) = h.split_once(':').expect("Name: value");
            s.push_str(&format!("wrk.headers[{:?}] = {:?}\n", k.trim(), v.trim()));
        }
        std::fs::write(&p, s)?;
        Ok(p)
    };
    let own_key = vec![format!("Authorization: Bearer {UPSTREAM_KEY}")];
    let mut targets = vec![
        Target {
            kind: Kind::Direct,
            name: "direct",
            url: url_direct.clone(),
            group: None,
            lua: lua("direct", &own_key)?,
            headers: own_key.clone(),
            proxy_pids: Box::new(Vec::new),
        },
        Target {
            kind: Kind::Capture,
            name: "tollgate-capture",
            url: url_direct.clone(),
            group: Some(&agent),
            lua: lua("capture", &own_key)?,
            headers: own_key.clone(),
            proxy_pids: Box::new(move || vec![tg_pid]),
        },
        Target {
            kind: Kind::Gateway,
            name: "tollgate-gateway",
            url: format!("http://127.0.0.1:{gw_port}/v1/chat/completions"),
            group: None,
            lua: lua("gateway", &[])?,
            headers: Vec::new(),
            proxy_pids: Box::new(move || vec![tg_pid]),
        },
        Target {
            kind: Kind::Nginx,
            name: "nginx",
            url: format!("http://127.0.0.1:{nginx_port}/v1/chat/completions"),
            group: None,
            lua: lua("nginx", &own_key)?,
            headers: own_key.clone(),
            proxy_pids: Box::new(move || descendants(nginx_pid)),
        },
    ];
    if let (Some(l), Some(root_pid)) = (&litellm, litellm_root) {
        let h = vec![format!("Authorization: Bearer {LITELLM_KEY}")];
        targets.push(Target {
            kind: Kind::Litellm,
            name: "litellm",
            url: format!("http://127.0.0.1:{}/v1/chat/completions", l.port),
            group: None,
            lua: lua("litellm", &h)?,
            headers: h,
            proxy_pids: Box::new(move || descendants(root_pid)),
        });
    }

    eprintln!(
        "bench: request {} B, response {} B, {} s per measurement, wrk -t{} -c{}; targets: {}",
        body.len(),
        resp_len,
        a.duration,
        a.threads,
        a.connections,
        targets.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
    );

    let mut rows: Vec<Row> = targets.iter().map(|t| Row { name: t.name, ..Default::default() }).collect();
    let counted = |tg: &Tollgate| -> Result<BTreeMap<&'static str, f64>> {
        let m = tg.metrics()?;
        Ok(["bench", "gw"].into_iter().map(|r| (r, m.sum("tollgate_llm_requests_total", &[("route", r)]))).collect())
    };
    // Runs `f` for target `i`, charging tollgate's and the mock's counters to its row.
    let account = |rows: &mut Vec<Row>, i: usize, f: &mut dyn FnMut(&mut Row) -> Result<()>| -> Result<()> {
        let (before, mock_before) = (counted(&tg)?, mock.chat_requests()?);
        f(&mut rows[i])?;
        let after = counted(&tg)?;
        for (r, v) in after {
            *rows[i].via.entry(r).or_default() += v - before.get(r).copied().unwrap_or(0.0);
        }
        rows[i].at_mock += mock.chat_requests()? - mock_before;
        Ok(())
    };

    // Phase 1: max throughput.
    for (i, t) in targets.iter().enumerate() {
        account(&mut rows, i, &mut |row| {
            let cpu0 = cpu_ticks(&(t.proxy_pids)());
            let (rps, n, errs) = wrk(&a, &t.lua, &t.url, t.group)?;
            let cpu1 = cpu_ticks(&(t.proxy_pids)());
            (row.rps, row.wrk_requests, row.wrk_errors) = (rps, n, errs);
            if t.kind != Kind::Direct && n > 0 {
                row.cpu_us_per_req = Some((cpu1.saturating_sub(cpu0)) as f64 * 1e6 / clk_tck() / n as f64);
            }
            eprintln!("bench: {}: {:.0} req/s max ({} requests)", t.name, rps, n);
            Ok(())
        })?;
    }
    let slowest = rows.iter().map(|r| r.rps).fold(f64::INFINITY, f64::min);
    let rate = capped_rate(a.rate, slowest);
    let mut stream_rate = a.stream_rate.min(rate);
    if rate < a.rate {
        loud(&format!(
            "latency rate lowered from {} to {rate} req/s: the slowest target's max is {slowest:.0} req/s, and \
             a common rate must leave every target unsaturated (half its max)",
            a.rate
        ));
    }

    // Phase 2: latency at a common rate, non-streamed.
    for (i, t) in targets.iter().enumerate() {
        account(&mut rows, i, &mut |row| {
            row.lat = loadgen(&a, &body_path, t, rate, false)?;
            eprintln!("bench: {}: at {rate} req/s p50 {:.3} ms, p99 {:.3} ms", t.name, row.lat.p50, row.lat.p99);
            Ok(())
        })?;
    }
    // Phase 2b: when the common rate had to be lowered, the full rate too, for the targets whose
    // max is at least twice it (so direct, tollgate and nginx are compared under real load).
    if rate < a.rate {
        for (i, t) in targets.iter().enumerate() {
            if rows[i].rps < 2.0 * a.rate as f64 {
                eprintln!("bench: {}: not run at {} req/s (max {:.0} req/s)", t.name, a.rate, rows[i].rps);
                continue;
            }
            account(&mut rows, i, &mut |row| {
                let l = loadgen(&a, &body_path, t, a.rate, false)?;
                eprintln!("bench: {}: at {} req/s p50 {:.3} ms, p99 {:.3} ms", t.name, a.rate, l.p50, l.p99);
                row.full = Some(l);
                Ok(())
            })?;
        }
    }
    // Phase 3: streaming at a common rate. Streams cost a proxy per event, so the rate every
    // target sustains is found on the slowest one (by max throughput) first: halved while it
    // falls behind (see `behind`), with direct re-measured at each rate as the reference.
    let stream_run = |rows: &mut Vec<Row>, i: usize, r: u64| -> Result<Lat> {
        let t = &targets[i];
        account(rows, i, &mut |row| {
            row.st = loadgen(&a, &stream_body_path, t, r, true)?;
            eprintln!(
                "bench: {}: {r} streams/s TTFT p50 {:.3} ms, p99 {:.3} ms; total p50 {:.3} ms",
                t.name, row.st.ttft_p50, row.st.ttft_p99, row.st.p50
            );
            Ok(())
        })?;
        Ok(rows[i].st.clone())
    };
    let slowest_i = (0..rows.len()).min_by(|x, y| rows[*x].rps.total_cmp(&rows[*y].rps)).unwrap_or(0);
    let mut d = stream_run(&mut rows, 0, stream_rate)?;
    if slowest_i != 0 {
        for attempt in 1.. {
            let sl = stream_run(&mut rows, slowest_i, stream_rate)?;
            let Some(why) = behind(&sl, &d) else { break };
            if stream_rate <= 1 || attempt >= 5 {
                loud(&format!("{} falls behind even at {stream_rate} streams/s: {why}", targets[slowest_i].name));
                break;
            }
            let lower = (stream_rate / 2).max(1);
            loud(&format!(
                "streaming rate lowered from {stream_rate} to {lower}/s: {} falls behind at {stream_rate}/s ({why})",
                targets[slowest_i].name
            ));
            stream_rate = lower;
            d = stream_run(&mut rows, 0, stream_rate)?;
        }
    }
    for i in (1..rows.len()).filter(|i| *i != slowest_i) {
        stream_run(&mut rows, i, stream_rate)?;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let (load_rss_mb, litellm_load_rss_mb) = *peaks.lock().expect("lock");
    drop(nginx);

    // Validity: which runs went through tollgate, and which reached the mock.
    let mut problems: Vec<(Kind, String)> = Vec::new();
    for (t, r) in targets.iter().zip(&rows) {
        let full = r.full.as_ref();
        let done = r.wrk_requests + r.lat.ok + r.st.ok + full.map(|l| l.ok).unwrap_or(0);
        let want = match t.kind {
            Kind::Capture => Some("bench"),
            Kind::Gateway => Some("gw"),
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
            problems.push((t.kind, format!("{}: {} errors at {} req/s: {}", t.name, l.errors, a.rate, l.first_error)));
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

    print_tables(&a, &rows, rate, stream_rate, body.len(), resp_len);
    println!();
    println!(
        "memory: tollgate idle {idle_rss_mb:.1} MB, peak under load {load_rss_mb:.1} MB (one process); LiteLLM {}",
        match litellm_idle_rss_mb {
            Some(i) => format!(
                "idle {i:.1} MB, peak under load {litellm_load_rss_mb:.1} MB (sum of its {} processes)",
                litellm_root.map(|p| descendants(p).len()).unwrap_or(0)
            ),
            None => "not measured".into(),
        }
    );
    if let Some(l) = &litellm {
        println!("litellm: {}", l.describe(&a));
    }
    for (k, p) in &problems {
        println!("WARNING: {p}{}", if *k == Kind::Litellm { " (LiteLLM: reported, not fatal)" } else { "" });
    }
    if let Some(why) = &litellm_missing {
        loud(&format!("LiteLLM was NOT measured: {why}"));
    }
    println!(
        "{}",
        summary(
            &rows,
            &Mem { idle_rss_mb, load_rss_mb, litellm_idle: litellm_idle_rss_mb, litellm_load: litellm_load_rss_mb },
            rate,
            a.rate,
            stream_rate
        )
    );
    drop(litellm);
    drop(tg);
    drop(mock);
    let fatal: Vec<&str> = problems.iter().filter(|(k, _)| *k != Kind::Litellm).map(|(_, p)| p.as_str()).collect();
    if !fatal.is_empty() {
        bail!("benchmark runs were not valid: {}", fatal.join("; "));
    }
    Ok(())
}

/// Why a streaming run `s` did not keep up with its rate, judged against direct's `d` at the same
/// rate: errors or drops, a median stream 1.5 times as long, or a TTFT p99 a second later.
fn behind(s: &Lat, d: &Lat) -> Option<String> {
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
fn capped_rate(wanted: u64, slowest_rps: f64) -> u64 {
    if !slowest_rps.is_finite() || slowest_rps / 2.0 >= wanted as f64 {
        return wanted;
    }
    let half = (slowest_rps / 2.0) as u64;
    let round = if half >= 100 { half / 10 * 10 } else { half };
    round.max(1)
}

fn loud(msg: &str) {
    let bar = "!".repeat(100);
    eprintln!("\n{bar}\n!!! {msg}\n{bar}\n");
    println!("!!! {msg}");
}

fn print_tables(a: &Args, rows: &[Row], rate: u64, stream_rate: u64, req_len: usize, resp_len: usize) {
    let direct = &rows[0];
    let na = |v: Option<f64>, prec: usize| v.map(|v| format!("{v:.prec$}")).unwrap_or_else(|| "-".into());
    println!();
    println!(
        "Throughput, non-streamed (wrk -t{} -c{}, {} s; request {req_len} B, response {resp_len} B)",
        a.threads, a.connections, a.duration
    );
    println!(
        "{:<17} {:>10} {:>10} {:>10} {:>16} {:>10} {:>10} {:>12}",
        "target", "max req/s", "vs direct", "wrk reqs", "proxy CPU us/req", "via bench", "via gw", "at mock"
    );
    for r in rows {
        println!(
            "{:<17} {:>10.0} {:>10.3} {:>10} {:>16} {:>10} {:>10} {:>12}",
            r.name,
            r.rps,
            r.rps / direct.rps,
            r.wrk_requests,
            na(r.cpu_us_per_req, 0),
            r.via.get("bench").copied().unwrap_or(0.0),
            r.via.get("gw").copied().unwrap_or(0.0),
            r.at_mock
        );
    }
    println!(
        "(via bench / via gw / at mock: requests tollgate's routes counted and the mock served over all three phases)"
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

/// Resident memory, MB.
#[derive(Clone, Copy)]
struct Mem {
    idle_rss_mb: f64,
    load_rss_mb: f64,
    litellm_idle: Option<f64>,
    litellm_load: f64,
}

/// The machine-readable last line. Unprefixed ratios are tollgate-gateway's (LiteLLM's peer).
fn summary(rows: &[Row], mem: &Mem, rate: u64, full_rate: u64, stream_rate: u64) -> String {
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
    s
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(tool)).find(|p| p.is_file()))
}

/// `pid` and all its descendants (alive now).
fn descendants(pid: u32) -> Vec<u32> {
    let mut parent: Vec<(u32, u32)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Some(pp) = stat_fields(p).and_then(|f| f.get(1).and_then(|v| v.parse().ok())) {
                parent.push((p, pp));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(parent.iter().filter(|(_, pp)| *pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    out
}

/// Fields of `/proc/<pid>/stat` after the command name (index 0 is the state).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// utime + stime of `pids`, in clock ticks.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| stat_fields(*p))
        .map(|f| {
            f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        })
        .sum()
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Sum of VmRSS of `pids`, in MB.
fn tree_rss_mb(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .sum::<f64>()
        / 1024.0
}

fn wrk(a: &Args, lua: &Path, url: &str, group: Option<&Group>) -> Result<(f64, u64, String)> {
    let out = command_in(group, None, "wrk")
        .args(["-t", &a.threads.to_string(), "-c", &a.connections.to_string()])
        .args(["-d", &format!("{}s", a.duration), "--timeout", "5s", "-s"])
        .arg(lua)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .context("run wrk")?;
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
    Ok((rps, n, errs.join("; ")))
}

fn loadgen(a: &Args, body: &Path, t: &Target, rate: u64, stream: bool) -> Result<Lat> {
    let mut c = command_in(t.group, None, &a.loadgen.to_string_lossy());
    c.args(["--url", &t.url, "--rate", &rate.to_string(), "--duration", &a.duration.to_string()])
        .args(["--timeout-ms", "10000"])
        .arg("--body-file")
        .arg(body);
    for h in &t.headers {
        c.args(["--header", h]);
    }
    if stream {
        c.arg("--stream");
    }
    let out = c.stdin(Stdio::null()).output().context("run loadgen")?;
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
        errors: v["errors"].as_u64().unwrap_or(0) + v["dropped"].as_u64().unwrap_or(0),
        events: num("events_per_stream"),
        first_error: v["first_error"].as_str().unwrap_or("").chars().take(200).collect(),
    };
    if lat.errors > 0 {
        eprintln!("bench: {}: loadgen errors: {v}", t.name);
    }
    Ok(lat)
}

/// The LiteLLM proxy, in its own process group (killed with all its workers on drop).
struct LiteLlm {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl LiteLlm {
    fn spawn(bin: &Path, dir: &Path, mock: SocketAddr, a: &Args) -> Result<Self> {
        let p = dir.join("litellm");
        std::fs::create_dir_all(&p)?;
        let port = free_port("127.0.0.1");
        // One OpenAI-compatible deployment on the mock; no database, no callbacks, no retries,
        // no message logging; the master key only because LiteLLM refuses to start without one.
        let conf = json!({
            "model_list": [{
                "model_name": MODEL,
                "litellm_params": {
                    "model": format!("openai/{MODEL}"),
                    "api_base": format!("http://{mock}/v1"),
                    "api_key": UPSTREAM_KEY,
                },
            }],
            "litellm_settings": {
                "telemetry": false,
                "set_verbose": false,
                "turn_off_message_logging": true,
                "drop_params": true,
                "num_retries": 0,
                "request_timeout": 30,
                "callbacks": [],
                "success_callback": [],
                "failure_callback": [],
            },
            "general_settings": {
                "master_key": LITELLM_KEY,
                "disable_spend_logs": true,
                "disable_error_logs": true,
            },
        });
        let conf_path = p.join("config.yaml");
        std::fs::write(&conf_path, serde_yaml_ng::to_string(&conf)?)?;
        let log = p.join("litellm.log");
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(&conf_path)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--num_workers", &a.litellm_workers.to_string()]);
        match a.litellm_server.as_str() {
            "uvicorn" => {}
            "gunicorn" => {
                cmd.arg("--run_gunicorn");
            }
            "granian" => {
                cmd.arg("--run_granian");
            }
            other => bail!("unknown --litellm-server {other:?} (uvicorn, gunicorn, granian)"),
        }
        // Offline and quiet: the bundled model cost map instead of a download, errors-only
        // logging (this also turns off uvicorn's access log), no .env files, no database.
        cmd.env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            .env("LITELLM_LOG", "ERROR")
            .env("LITELLM_MODE", "PRODUCTION")
            .env_remove("DATABASE_URL")
            .env_remove("LITELLM_MASTER_KEY")
            .current_dir(&p)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out));
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().with_context(|| format!("spawn {}", bin.display()))?;
        Ok(LiteLlm { child, port, log })
    }

    /// Poll `/health/readiness`, then make one real completion through it.
    fn wait_ready(&mut self, timeout: Duration, body: &[u8]) -> Result<()> {
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse()?;
        let t0 = Instant::now();
        let deadline = t0 + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                bail!("litellm exited during startup ({st}); log tail:\n{}", self.log_tail(40));
            }
            if let Ok((200, _)) = tollgate_e2e::http_get(addr, "/health/readiness", Duration::from_secs(5)) {
                break;
            }
            if Instant::now() >= deadline {
                bail!("no 200 from /health/readiness after {timeout:?}; log tail:\n{}", self.log_tail(40));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        eprintln!("bench: LiteLLM ready after {:.1} s", t0.elapsed().as_secs_f64());
        // Every worker imports lazily on its first requests: warm each of them up.
        for _ in 0..20 {
            let (st, text) = post(addr, "/v1/chat/completions", LITELLM_KEY, body)?;
            if st != 200 || !text.contains("\"choices\"") {
                bail!("completion through LiteLLM: HTTP {st}: {}", text.chars().take(500).collect::<String>());
            }
        }
        Ok(())
    }

    fn log_tail(&self, n: usize) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn describe(&self, a: &Args) -> String {
        format!(
            "{} (server {}, {} workers, master key set, no DB, no callbacks, LITELLM_LOG=ERROR, local cost map)",
            version_of_litellm(a).unwrap_or_else(|| "version unknown".into()),
            a.litellm_server,
            a.litellm_workers
        )
    }
}

fn version_of_litellm(a: &Args) -> Option<String> {
    let py = a.litellm.as_ref()?.parent()?.join("python");
    let out = Command::new(py)
        .args(["-c", "import importlib.metadata as m; print('litellm ' + m.version('litellm'))"])
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Drop for LiteLlm {
    fn drop(&mut self) {
        let pg = self.child.id() as i32;
        // SAFETY: kill(2) on the process group we created for our own child.
        unsafe { libc::kill(-pg, libc::SIGTERM) };
        for _ in 0..150 {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above; whatever of the group is left (workers) goes too.
        unsafe { libc::kill(-pg, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Minimal blocking HTTP/1.1 POST with a JSON body: `(status, body)`.
fn post(addr: SocketAddr, path: &str, key: &str, body: &[u8]) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAuthorization: Bearer {key}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no HTTP header: {text:?}"))?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, rest.to_string()))
}

struct Nginx {
    child: Child,
}

impl Nginx {
    fn start(dir: &Path, port: u16, upstream: SocketAddr) -> Result<Self> {
        let p = dir.join("nginx");
        for sub in ["", "logs", "tmp"] {
            std::fs::create_dir_all(p.join(sub))?;
        }
        // `proxy_buffering off`: streamed events go to the client as they arrive.
        let conf = format!(
            r#"worker_processes auto;
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {p}/logs/access.log;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    upstream mock {{
        server {upstream};
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"#,
            p = p.display()
        );
        let conf_path = p.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let mut child = Command::new("nginx")
            .arg("-p")
            .arg(&p)
            .arg("-e")
            .arg(p.join("logs/error.log"))
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn nginx")?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        if wait_for(Duration::from_secs(10), Duration::from_millis(50), || TcpStream::connect(addr).ok()).is_none() {
            let _ = child.kill();
            let err = child
                .stderr
                .take()
                .map(|e| BufReader::new(e).lines().map_while(Result::ok).collect::<Vec<_>>().join("\n"));
            bail!("nginx did not listen on {addr}: {err:?}");
        }
        Ok(Nginx { child })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child; SIGQUIT is nginx's graceful stop.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGQUIT) };
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
