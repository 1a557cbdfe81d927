//! `cargo xtask bench`: tollgate's added latency and throughput against a direct connection and
//! against nginx as a plain reverse proxy, measured in one run on loopback.
//!
//! Setup: the mock upstream on 127.0.0.2:<port>; tollgate capturing that address:port for one
//! cgroup (real eBPF redirect, plaintext L7 route with token counting); nginx on 127.0.0.1
//! proxying to the mock. For each of direct / tollgate / nginx: max throughput with wrk (Lua POST
//! script) and p50/p99 at a fixed rate with `loadgen` (open loop, HDR histogram). The tollgate
//! runs are made by processes inside the captured cgroup, the others outside it; tollgate's own
//! request counter proves which was which.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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
    /// Fixed request rate for the latency runs.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// wrk connections.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    threads: u32,
}

#[derive(Debug, Default, Clone)]
struct Row {
    name: &'static str,
    rps: f64,
    wrk_requests: u64,
    wrk_errors: String,
    p50: f64,
    p99: f64,
    lat_ok: u64,
    lat_errors: u64,
    via_tollgate: f64,
}

fn main() -> Result<()> {
    let a = Args::parse();
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
    let mut req = ChatRequest::simple("gpt-4o-mini", user.trim_end());
    req.messages.insert(0, ("system".into(), "You are a concise assistant.".into()));
    req.max_tokens = Some(95);
    let body = serde_json::to_vec(&req.to_json())?;
    let resp_len = openai::completion_body(&openai::reply_for(&req)).len();
    let body_path = dir.join("body.json");
    std::fs::write(&body_path, &body)?;
    let lua = dir.join("post.lua");
    std::fs::write(
        &lua,
        format!(
            "local f = io.open({:?}, \"rb\")\nwrk.method = \"POST\"\nwrk.body = f:read(\"*a\")\nf:close()\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.headers[\"Authorization\"] = \"Bearer sk-bench\"\n",
            body_path.display().to_string()
        ),
    )?;

    let cg = Cgroup2::mount()?;
    let agent = cg.group("bench-agent")?;
    let mock_port = free_port("127.0.0.2");
    let mock_addr: SocketAddr = format!("127.0.0.2:{mock_port}").parse()?;
    let mock = MockLlm::start(&a.mock, &["--listen".into(), mock_addr.to_string()])?;

    let tg_dir = Tollgate::scratch()?;
    let mut cfg = base_config(&cg, tg_dir.path());
    merge(
        &mut cfg,
        json!({
            "capture": {
                "scope": [agent.rel()],
                "destinations": [{"cidr": "127.0.0.2/32", "port": mock_port}],
            },
            "routes": [{"name": "bench", "provider": "openai", "match": {"addresses": [mock_addr.to_string()]}}],
            "agents": [{"name": "bench-agent", "match": {"cgroup": agent.rel()}}],
        }),
    );
    let tg = Tollgate::start(&a.tollgate, tg_dir, cfg, None)?;
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss_mb = rss_mb(tg.pid().ok_or_else(|| anyhow!("tollgate not running"))?)?;

    let nginx_port = free_port("127.0.0.1");
    let nginx = Nginx::start(dir, nginx_port, mock_addr)?;

    let url_direct = format!("http://{mock_addr}/v1/chat/completions");
    let url_nginx = format!("http://127.0.0.1:{nginx_port}/v1/chat/completions");
    eprintln!(
        "bench: request {} B, response {} B, {} s per measurement, latency at {} req/s, wrk -t{} -c{}",
        body.len(),
        resp_len,
        a.duration,
        a.rate,
        a.threads,
        a.connections
    );

    let mut rows = Vec::new();
    for (name, url, group) in
        [("direct", &url_direct, None), ("tollgate", &url_direct, Some(&agent)), ("nginx", &url_nginx, None)]
    {
        let before = tollgate_requests(&tg)?;
        let mut row = Row { name, ..Default::default() };
        let (rps, n, errs) = wrk(&a, &lua, url, group)?;
        row.rps = rps;
        row.wrk_requests = n;
        row.wrk_errors = errs;
        let lat = loadgen(&a, &body_path, url, group)?;
        row.p50 = lat["p50_ms"].as_f64().unwrap_or(f64::NAN);
        row.p99 = lat["p99_ms"].as_f64().unwrap_or(f64::NAN);
        row.lat_ok = lat["ok"].as_u64().unwrap_or(0);
        row.lat_errors = lat["errors"].as_u64().unwrap_or(0) + lat["dropped"].as_u64().unwrap_or(0);
        if row.lat_errors > 0 {
            eprintln!("bench: {name}: loadgen errors: {lat}");
        }
        row.via_tollgate = tollgate_requests(&tg)? - before;
        eprintln!("bench: {name}: {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms", row.rps, row.p50, row.p99);
        rows.push(row);
    }
    drop(nginx);

    // Which runs went through tollgate: only the tollgate row, and all of its requests.
    let expect_min = rows[1].wrk_requests + rows[1].lat_ok;
    let mut problems = Vec::new();
    if rows[0].via_tollgate != 0.0 || rows[2].via_tollgate != 0.0 {
        problems.push(format!(
            "direct/nginx runs reached tollgate ({} / {} requests counted)",
            rows[0].via_tollgate, rows[2].via_tollgate
        ));
    }
    if rows[1].via_tollgate < expect_min as f64 {
        problems.push(format!(
            "tollgate counted {} requests but the tollgate run completed {expect_min}: not all were proxied",
            rows[1].via_tollgate
        ));
    }
    for r in &rows {
        if r.lat_errors > 0 || !r.wrk_errors.is_empty() {
            problems.push(format!("{}: errors (wrk: {}; loadgen: {})", r.name, r.wrk_errors, r.lat_errors));
        }
    }

    println!();
    println!(
        "{:<9} {:>12} {:>12} {:>10} {:>10} {:>12} {:>14}",
        "target", "max req/s", "wrk reqs", "p50 ms", "p99 ms", "lat reqs", "via tollgate"
    );
    for r in &rows {
        println!(
            "{:<9} {:>12.0} {:>12} {:>10.3} {:>10.3} {:>12} {:>14}",
            r.name, r.rps, r.wrk_requests, r.p50, r.p99, r.lat_ok, r.via_tollgate
        );
    }
    println!(
        "(request {} B, response {} B; latency open-loop at {} req/s for {} s; throughput wrk -t{} -c{} for {} s; 2 cores shared by client, proxy and mock)",
        body.len(),
        resp_len,
        a.rate,
        a.duration,
        a.threads,
        a.connections,
        a.duration
    );
    for p in &problems {
        println!("WARNING: {p}");
    }
    let (d, t, n) = (&rows[0], &rows[1], &rows[2]);
    println!(
        "bench: p50_added_ms={:.3} p99_added_ms={:.3} tput_vs_direct={:.3} tput_vs_nginx={:.3} idle_rss_mb={:.1}",
        t.p50 - d.p50,
        t.p99 - d.p99,
        t.rps / d.rps,
        t.rps / n.rps,
        idle_rss_mb
    );
    drop(tg);
    drop(mock);
    if !problems.is_empty() {
        bail!("benchmark runs were not valid: {}", problems.join("; "));
    }
    Ok(())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(tool)).find(|p| p.is_file()))
}

fn rss_mb(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for {pid}"))?;
    Ok(kb / 1024.0)
}

fn tollgate_requests(tg: &Tollgate) -> Result<f64> {
    Ok(tg.metrics()?.sum("tollgate_llm_requests_total", &[]))
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

fn loadgen(a: &Args, body: &Path, url: &str, group: Option<&Group>) -> Result<Value> {
    let out = command_in(group, None, &a.loadgen.to_string_lossy())
        .args(["--url", url, "--rate", &a.rate.to_string(), "--duration", &a.duration.to_string()])
        .arg("--body-file")
        .arg(body)
        .args(["--header", "Authorization: Bearer sk-bench"])
        .stdin(Stdio::null())
        .output()
        .context("run loadgen")?;
    if !out.status.success() {
        bail!("loadgen failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
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
