//! `cargo xtask bench`: tollgate's added latency, time to first token and throughput against a
//! direct connection, nginx and the LiteLLM proxy, measured side by side in one run on loopback.
//!
//! Setup: the mock upstream on 127.0.0.2:<port>, demanding one API key; one tollgate with two
//! routes: `bench` captures that address:port for one cgroup (real eBPF redirect, transparent
//! pass-through: the agent's own key goes through) and `gw` is a gateway listener on 127.0.0.1
//! whose provider is the mock, with the key injected (agents send no key); a second tollgate
//! (capture off) with the same gateway route `gwr` under a Redis-backed global token limit far
//! too high to refuse, on a `redis-server` the bench starts (a second process, so the first
//! one's routes run no policy at all); nginx on 127.0.0.1 proxying to the mock
//! (`proxy_buffering off`); the LiteLLM proxy (from the bench venv) with one `openai/<model>`
//! deployment pointing at the mock. The mock also listens for HTTPS on 127.0.0.2:<port2> (a
//! certificate of its own CA), which a third tollgate (`observer`, running only during
//! `tollgate-observe`'s runs) captures for a cgroup of its own with a spliced route `observe`,
//! its TLS uprobes probing the clients' `libssl.so.3`; the first tollgate runs without uprobes.
//!
//! Targets: `direct`, `tollgate-capture` (clients inside the captured cgroup, same URL as direct),
//! `tollgate-gateway`, `tollgate-gw-redis`, `nginx`, `direct-tls` (HTTPS through OpenSSL straight
//! to the mock, no probe attached anywhere), `tollgate-observe` (the same, from the observer's
//! captured cgroup: spliced and observed through the uprobes), `litellm`. Each is measured the same way, in three phases:
//! 1. max throughput, non-streamed: wrk (Lua POST script);
//! 2. latency, non-streamed: `loadgen` open loop at one common rate for every target (capped at
//!    half the slowest target's max throughput, so every target runs unsaturated); when it had to
//!    be capped, also at the full `--rate` for the targets whose max is at least twice that;
//! 3. streaming: `loadgen --stream` open loop at a common rate, TTFT and total time.
//!
//! Proof of what went where: tollgate's per-route request counters (only the tollgate rows, all
//! of their requests) and the mock's own completion counter (every target's requests reached
//! the mock once); for `tollgate-gw-redis`, counters in Redis and no Redis error or fallback;
//! for `tollgate-observe`, exactly its completed calls counted with `capture="uprobe"`. A LiteLLM that fails to install, start or serve is reported loudly and the
//! others are still measured.
//!
//! Layout: this file holds the arguments and the run itself (setup, the three phases, the final
//! report); `targets` starts nginx and LiteLLM and describes each target, `measure` runs wrk and
//! `loadgen` and parses them, `procfs` reads CPU and memory from `/proc`, `report` checks validity
//! and prints the tables and the `bench:` summary line.

mod measure;
mod observer;
mod procfs;
mod report;
mod targets;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::Parser;
use serde_json::json;
use tollgate_e2e::certs::TestCa;
use tollgate_e2e::cgroup::Cgroup2;
use tollgate_e2e::mock::MockLlm;
use tollgate_e2e::openai::{self, ChatRequest};
use tollgate_e2e::redis::RedisServer;
use tollgate_e2e::tollgate::{base_config, ensure_bpffs, Tollgate};
use tollgate_e2e::{free_port, merge, require_root, wait_for};

use measure::{behind, capped_rate, loadgen, wrk, Lat};
use observer::Observer;
use procfs::{clk_tck, cpu_ticks, descendants, libssl_of, tree_rss_mb, which};
use report::{loud, print_tables, summary, Mem, Row};
use targets::{Kind, LiteLlm, Nginx, Target};

// Command line, as `cargo xtask bench` passes it (binaries it built, durations, rates, LiteLLM).
// A plain comment on purpose: clap would turn a doc comment into the `--help` about text.
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
/// The model name every request asks for (and LiteLLM's one deployment is named).
const MODEL: &str = "gpt-4o-mini";
/// Environment variable tollgate reads the gateway provider's key from.
const KEY_ENV: &str = "TOLLGATE_BENCH_MOCK_KEY";
/// Prefix of the Redis-backed limit's counters (proof the `tollgate-gw-redis` calls were counted
/// in Redis).
const REDIS_PREFIX: &str = "bench:";

/// Sets everything up, runs the three phases on every target, prints the report, and fails when a
/// non-LiteLLM run was not valid.
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
    // The mock's HTTPS listener, with a certificate of its own CA (the TLS clients trust only
    // that CA: tollgate splices, it could not intercept these connections if it tried).
    let tls_port = free_port("127.0.0.2");
    let tls_addr: SocketAddr = format!("127.0.0.2:{tls_port}").parse()?;
    let mock_ca = TestCa::new(dir, "mock", "tollgate bench mock CA")?;
    let mock_cert = mock_ca.issue(dir, "mock", &["127.0.0.2"])?;

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
    let observed_agent = cg.group("bench-observed")?;
    let mock = MockLlm::start(
        &a.mock,
        &[
            "--listen".into(),
            mock_addr.to_string(),
            "--tls-listen".into(),
            tls_addr.to_string(),
            "--cert".into(),
            mock_cert.cert_path.display().to_string(),
            "--key".into(),
            mock_cert.key_path.display().to_string(),
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
    // The OpenSSL the TLS clients load, probed from the observer's start (so a client's first
    // call is observed, not only those after a rescan found its library mapped).
    let mut ssl_paths: Vec<String> =
        [a.loadgen.clone(), which("wrk").unwrap_or_default()].iter().flat_map(|b| libssl_of(b)).collect();
    ssl_paths.sort();
    ssl_paths.dedup();
    merge(
        &mut cfg,
        json!({
            "capture": {
                "scope": [agent.rel()],
                "destinations": [{"cidr": "127.0.0.2/32", "port": mock_port}],
                // The probes belong to the observer alone (see `observer`).
                "uprobes": {"enabled": false},
            },
            "providers": [{
                "name": "mock",
                "kind": "openai_compatible",
                "base_url": format!("http://{mock_addr}/v1"),
                "credentials": {"env": KEY_ENV},
            }],
            "routes": [
                {"name": "bench", "provider": "openai", "match": {"addresses": [mock_addr.to_string()]}},
                {"name": "gw", "listener": format!("127.0.0.1:{gw_port}"), "targets": [{"provider": "mock"}],
                    "listener_auth": {"allow_cidrs": ["127.0.0.1/32"]}},
            ],
            "agents": [{"name": "bench-agent", "match": {"cgroup": agent.rel()}}],
        }),
    );
    let tg = Tollgate::start(&a.tollgate, tg_dir, cfg, None)?;
    let tg_pid = tg.pid().ok_or_else(|| anyhow!("tollgate not running"))?;
    // The observing tollgate (only while tollgate-observe runs): the mock's HTTPS address
    // captured for its own cgroup, a route that is not intercepted (spliced, observed through
    // the TLS uprobes).
    let observer = Observer::new(
        &a.tollgate,
        Box::new(|dir: &std::path::Path| {
            let mut cfg = base_config(&cg, dir);
            merge(
                &mut cfg,
                json!({
                    "capture": {
                        "scope": [observed_agent.rel()],
                        "destinations": [{"cidr": "127.0.0.2/32", "port": tls_port}],
                        "uprobes": {"enabled": true, "paths": ssl_paths},
                    },
                    "routes": [
                        {"name": "observe", "provider": "openai", "match": {"addresses": [tls_addr.to_string()]}},
                    ],
                    "agents": [{"name": "bench-observed", "match": {"cgroup": observed_agent.rel()}}],
                }),
            );
            cfg
        }),
    );
    let observer_pid = observer.pid.clone();

    // The same gateway route with a Redis-backed global token limit that never refuses: every
    // call estimates its prompt, reserves in Redis (one Lua script) and settles after the
    // response. The timeout is generous so a saturated 2-core machine measures Redis, not the
    // local fallback (any Redis error makes the run invalid, see below).
    let redis = RedisServer::start()?;
    let gwr_port = free_port("127.0.0.1");
    let tgr_dir = Tollgate::scratch()?;
    let mut cfg = base_config(&cg, tgr_dir.path());
    merge(
        &mut cfg,
        json!({
            "capture": {"enabled": false},
            "providers": [{
                "name": "mock",
                "kind": "openai_compatible",
                "base_url": format!("http://{mock_addr}/v1"),
                "credentials": {"env": KEY_ENV},
            }],
            "routes": [{"name": "gwr", "listener": format!("127.0.0.1:{gwr_port}"), "targets": [{"provider": "mock"}],
                "listener_auth": {"allow_cidrs": ["127.0.0.1/32"]}}],
            "rate_limits": {
                "backend": "redis",
                "redis": {"url": redis.url(), "timeout": "1s", "key_prefix": REDIS_PREFIX},
                "policies": [{"name": "bench", "key": "global",
                    "limits": [{"limit": 1_000_000_000_000u64, "window": "1m", "count": "total"}]}],
            },
        }),
    );
    let tgr = Tollgate::start(&a.tollgate, tgr_dir, cfg, None)?;
    let tgr_pid = tgr.pid().ok_or_else(|| anyhow!("tollgate (redis) not running"))?;

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
            ca: None,
            proxy_pids: Box::new(Vec::new),
        },
        Target {
            kind: Kind::Capture,
            name: "tollgate-capture",
            url: url_direct.clone(),
            group: Some(&agent),
            lua: lua("capture", &own_key)?,
            headers: own_key.clone(),
            ca: None,
            proxy_pids: Box::new(move || vec![tg_pid]),
        },
        Target {
            kind: Kind::Gateway,
            name: "tollgate-gateway",
            url: format!("http://127.0.0.1:{gw_port}/v1/chat/completions"),
            group: None,
            lua: lua("gateway", &[])?,
            headers: Vec::new(),
            ca: None,
            proxy_pids: Box::new(move || vec![tg_pid]),
        },
        Target {
            kind: Kind::GatewayRedis,
            name: "tollgate-gw-redis",
            url: format!("http://127.0.0.1:{gwr_port}/v1/chat/completions"),
            group: None,
            lua: lua("gateway-redis", &[])?,
            headers: Vec::new(),
            ca: None,
            proxy_pids: Box::new(move || vec![tgr_pid]),
        },
        Target {
            kind: Kind::Nginx,
            name: "nginx",
            url: format!("http://127.0.0.1:{nginx_port}/v1/chat/completions"),
            group: None,
            lua: lua("nginx", &own_key)?,
            headers: own_key.clone(),
            ca: None,
            proxy_pids: Box::new(move || descendants(nginx_pid)),
        },
        Target {
            kind: Kind::DirectTls,
            name: "direct-tls",
            url: format!("https://{tls_addr}/v1/chat/completions"),
            group: None,
            lua: lua("direct-tls", &own_key)?,
            headers: own_key.clone(),
            ca: Some(mock_ca.cert_path.clone()),
            proxy_pids: Box::new(Vec::new),
        },
        Target {
            kind: Kind::Observe,
            name: "tollgate-observe",
            url: format!("https://{tls_addr}/v1/chat/completions"),
            group: Some(&observed_agent),
            lua: lua("observe", &own_key)?,
            headers: own_key.clone(),
            ca: Some(mock_ca.cert_path.clone()),
            proxy_pids: Box::new(move || vec![observer_pid.load(Ordering::Relaxed)]),
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
            ca: None,
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
    // Requests each tollgate route counted (`gwr` lives in the second tollgate, `observe` in
    // the observer while it runs), and under `uprobe` the calls observed through the TLS uprobes
    // (any tollgate, any route).
    let counted = || -> Result<BTreeMap<&'static str, f64>> {
        let (m, mr) = (tg.metrics()?, tgr.metrics()?);
        let mut c = BTreeMap::new();
        for r in ["bench", "gw", "gwr", "observe"] {
            let l = [("route", r)];
            let n = m.sum("tollgate_llm_requests_total", &l)
                + mr.sum("tollgate_llm_requests_total", &l)
                + observer.sum("tollgate_llm_requests_total", &l)?;
            c.insert(r, n);
        }
        let l = [("capture", "uprobe")];
        let n = m.sum("tollgate_llm_requests_total", &l) + observer.sum("tollgate_llm_requests_total", &l)?;
        c.insert("uprobe", n);
        Ok(c)
    };
    // Runs `f` for target `i`, charging tollgate's and the mock's counters to its row. `f`
    // returns the calls its client completed and how many more may have been sent (wrk's
    // requests in flight when it stops); for `tollgate-observe` the uprobe count must land in
    // that range, so the accounting waits (bounded) for the observer to catch up and for every
    // observed connection to be closed.
    let account = |rows: &mut Vec<Row>, i: usize, f: &mut dyn FnMut(&mut Row) -> Result<(u64, u64)>| -> Result<()> {
        let observing = targets[i].kind == Kind::Observe;
        if observing {
            // No observer (e.g. a kernel without uprobes): this target fails, the others go on.
            if let Err(e) = observer.start() {
                eprintln!("bench: {}: not run: {e:#}", targets[i].name);
                rows[i].failed.get_or_insert(format!("{e:#}"));
                return Ok(());
            }
        }
        let (before, mock_before) = (counted()?, mock.chat_requests()?);
        let (done, slack) = f(&mut rows[i])?;
        if observing {
            rows[i].uprobe_want.0 += done;
            rows[i].uprobe_want.1 += done + slack;
            let b = before.get("uprobe").copied().unwrap_or(0.0);
            wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
                let seen = observer.sum("tollgate_llm_requests_total", &[("capture", "uprobe")]).ok()? - b;
                (seen >= done as f64).then_some(())
            });
            // loadgen closes its connections, so their calls cut short (if any) are counted now;
            // wrk exits without close(2), its connections stay until `l7.idle_timeout`.
            wait_for(Duration::from_secs(2), Duration::from_millis(50), || {
                (observer.sum("tollgate_uprobe_l7_connections", &[]).ok()? == 0.0).then_some(())
            });
        }
        let after = counted()?;
        if observing {
            observer.stop();
        }
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
            let w = wrk(&a, &t.lua, &t.url, t.group)?;
            let cpu1 = cpu_ticks(&(t.proxy_pids)());
            let n = w.requests;
            (row.rps, row.wrk_requests, row.wrk_errors) = (w.rps, n, w.errors);
            row.client_cpu_us_per_req = Some(w.client_cpu_us);
            if !matches!(t.kind, Kind::Direct | Kind::DirectTls) && n > 0 {
                row.cpu_us_per_req = Some((cpu1.saturating_sub(cpu0)) as f64 * 1e6 / clk_tck() / n as f64);
            }
            eprintln!("bench: {}: {:.0} req/s max ({} requests)", t.name, w.rps, n);
            Ok((n, u64::from(a.connections)))
        })?;
    }
    // Targets that could not be measured (no observer) do not set the common rates.
    let slowest = rows.iter().filter(|r| r.failed.is_none()).map(|r| r.rps).fold(f64::INFINITY, f64::min);
    let rate = capped_rate(a.rate, slowest);
    let mut stream_rate = a.stream_rate.min(rate);
    if rate < a.rate {
        loud(&format!(
            "latency rate lowered from {} to {rate} req/s: the slowest target's max is {slowest:.0} req/s, and \
             a common rate must leave every target unsaturated (half its max)",
            a.rate
        ));
    }

    // Phase 2: latency at a common rate, non-streamed (with the proxy's CPU per call at that
    // rate, idle work such as tollgate's library rescans included).
    for (i, t) in targets.iter().enumerate() {
        account(&mut rows, i, &mut |row| {
            let cpu0 = cpu_ticks(&(t.proxy_pids)());
            row.lat = loadgen(&a, &body_path, t, rate, false)?;
            let cpu1 = cpu_ticks(&(t.proxy_pids)());
            if !matches!(t.kind, Kind::Direct | Kind::DirectTls) && row.lat.ok_all > 0 {
                row.lat_cpu_us_per_req =
                    Some((cpu1.saturating_sub(cpu0)) as f64 * 1e6 / clk_tck() / row.lat.ok_all as f64);
            }
            eprintln!("bench: {}: at {rate} req/s p50 {:.3} ms, p99 {:.3} ms", t.name, row.lat.p50, row.lat.p99);
            Ok((row.lat.ok_all, 0))
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
                let n = l.ok_all;
                row.full = Some(l);
                Ok((n, 0))
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
            Ok((row.st.ok_all, 0))
        })?;
        Ok(rows[i].st.clone())
    };
    let slowest_i = (0..rows.len())
        .filter(|i| rows[*i].failed.is_none())
        .min_by(|x, y| rows[*x].rps.total_cmp(&rows[*y].rps))
        .unwrap_or(0);
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

    // Validity: which runs went through tollgate, and which reached the mock; the Redis-backed
    // limit decided in Redis (counters there, no error, no fallback).
    let mut problems = report::problems(&targets, &rows, a.rate);
    let mr = tgr.metrics()?;
    let (redis_errors, redis_state) =
        (mr.sum("tollgate_ratelimit_redis_errors_total", &[]), mr.sum("tollgate_ratelimit_backend_state", &[]));
    let redis_keys = redis.command(&["KEYS", &format!("{REDIS_PREFIX}*")])?.as_strings().len();
    if redis_errors != 0.0 || redis_state != 0.0 || redis_keys == 0 {
        problems.push((
            Kind::GatewayRedis,
            format!(
                "tollgate-gw-redis: {redis_errors} Redis errors, backend state {redis_state}, {redis_keys} counters \
                 in Redis (want 0, 0 and some)"
            ),
        ));
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
    drop(tgr);
    drop(redis);
    drop(tg);
    drop(mock);
    let fatal: Vec<&str> = problems.iter().filter(|(k, _)| *k != Kind::Litellm).map(|(_, p)| p.as_str()).collect();
    if !fatal.is_empty() {
        bail!("benchmark runs were not valid: {}", fatal.join("; "));
    }
    Ok(())
}
