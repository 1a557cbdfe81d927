//! Capture safety under pressure (issue 13, items 7 and 8): a busy proxy keeps capture on while
//! it accepts and a frozen one is bypassed within the heartbeat timeout; a full record map sends
//! the *new* connect direct and never breaks a connection already captured.

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::cgroup::Group;
use tollgate_e2e::client::{curl, CurlOut};
use tollgate_e2e::tollgate::Tollgate;
use tollgate_e2e::{bail, ensure, merge, wait_for, Context, Result};

use crate::support::{env, plaintext_route, wait_metric, Env};

const URL: &str = "http://127.0.0.2:8000/v1/chat/completions";

/// Opens captured connections and reports, per connection, its local address, the HTTP status
/// and the `x-mock-peer` the mock saw. Sequence: `A` is served (and stays open, holding the
/// proxy's only connection permit); `held` more connect and wait in the proxy's accept queue
/// with their kernel records; `C` connects and is served; `A` closes and every held one is
/// served in turn.
const HOLD: &str = r#"
import json, socket, sys
host, port, held = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "held"}]}).encode()
head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
        "Authorization: Bearer sk-test-e2e\r\nContent-Length: %d\r\n\r\n" % (host, port, len(body))).encode()
def conn():
    s = socket.create_connection((host, port), timeout=20)
    return s
def call(s):
    out = {"local": "%s:%d" % s.getsockname()[:2], "status": 0, "peer": None}
    try:
        s.sendall(head + body)
        f = s.makefile("rb")
        line = f.readline()
        if not line:
            out["error"] = "closed without a response"
            return out
        out["status"] = int(line.split()[1])
        h = {}
        while True:
            l = f.readline()
            if l in (b"\r\n", b""):
                break
            k, v = l.decode().split(":", 1)
            h[k.strip().lower()] = v.strip()
        out["peer"] = h.get("x-mock-peer")
        if h.get("transfer-encoding", "").lower() == "chunked":
            while True:
                n = int(f.readline().split(b";")[0], 16)
                f.read(n + 2)
                if n == 0:
                    break
        else:
            f.read(int(h.get("content-length", "0")))
    except Exception as e:
        out["error"] = repr(e)
    return out
a = conn()
ra = call(a)
bs = [conn() for _ in range(held)]
c = conn()
rc = call(c)
c.close()
a.close()
rb = []
for b in bs:
    rb.append(call(b))
    b.close()
print(json.dumps({"a": ra, "c": rc, "held": rb}))
"#;

/// True when the mock saw the client's own socket (no proxy in between).
fn direct(r: &Value) -> bool {
    r["status"] == 200 && r["peer"].is_string() && r["peer"] == r["local"]
}

fn proxied(r: &Value) -> bool {
    r["status"] == 200 && r["peer"].is_string() && r["peer"] != r["local"]
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn cs1_full_record_map_sends_the_new_connect_direct_and_keeps_held_ones() -> Result<()> {
    let e = env()?;
    let g = e.cg.group("cs1-agent")?;
    let mock = e.mock(&["--listen", "127.0.0.2:8000"])?;
    let mut patch = plaintext_route(mock.http[0], &[&g], "cs1-agent", &g);
    // Four record slots; one connection served at a time, so the rest wait in the accept queue
    // with their records in the map.
    // The IPv6 listener stays on: its idle accept loop must not sit on the only permit (it did
    // when loops took a permit before accepting, and then nothing on IPv4 was ever served).
    merge(&mut patch, json!({"capture": {"max_records": 4}, "limits": {"max_connections": 1}}));
    let t = e.tollgate(patch, None)?;

    let out = g
        .command("python3", None)
        .args(["-c", HOLD, "127.0.0.2", "8000", "4"])
        .stdin(Stdio::null())
        .output()
        .context("spawn the holding client")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "holding client failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(stdout.trim()).with_context(|| format!("client output {stdout:?}"))?;
    ensure!(proxied(&v["a"]), "first connection not served by tollgate: {}", v["a"]);
    ensure!(direct(&v["c"]), "the connect that found the map full was not sent direct: {}", v["c"]);
    let held = v["held"].as_array().cloned().unwrap_or_default();
    ensure!(held.len() == 4, "held results: {held:?}");
    for (i, r) in held.iter().enumerate() {
        ensure!(
            proxied(r),
            "held connection {i} was broken or bypassed when the map was full: {r}\n{}",
            t.stderr_tail(20)
        );
    }
    wait_metric(&t, "tollgate_capture_total", &[("event", "skipped_map_full")], 1.0)?;
    wait_metric(&t, "tollgate_capture_total", &[("event", "record_failed")], 0.0)?;
    // Every slot came back: a connect now is captured again.
    let r = probe(&g, "5")?;
    ensure!(served_by_tollgate(&r), "after the burst: {}", r.describe());
    Ok(())
}

/// Concurrent large prompts that are expensive to tokenize, for the token-limited `heavy`
/// agent, on fresh connections, until `stop` exists.
const LOAD: &str = r#"
import json, os, random, socket, sys, threading
host, port, stop, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def worker(seed):
    rnd = random.Random(seed)
    while not os.path.exists(stop):
        # Long runs of letters: each is one pre-token, whose BPE cost grows with its square.
        text = " ".join("".join(rnd.choices("abcdefghijklmnopqrstuvwxyz", k=2000)) for _ in range(120))
        body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 1, "messages": [{"role": "user", "content": text}]}).encode()
        try:
            s = socket.create_connection((host, port), timeout=60)
            s.sendall(("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       "Authorization: Bearer sk-test-e2e\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)).encode() + body)
            while s.recv(65536):
                pass
            s.close()
        except OSError:
            pass
ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
for t in ts: t.start()
print("started", flush=True)
for t in ts: t.join()
"#;

/// CPU seconds (user + system) `pid` has used.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command name.
    let ticks: f64 =
        f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0) + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// A small chat call from `g`, given up after `max_time` seconds.
fn probe(g: &Group, max_time: &str) -> Result<CurlOut> {
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "probe"}]}).to_string();
    let args =
        ["--max-time", max_time, "-H", "Content-Type: application/json", "-H", "Authorization: Bearer sk-test-e2e"];
    curl(Some(g), None, &[&args[..], &["--data-binary", &body, URL]].concat())
}

fn served_by_tollgate(r: &CurlOut) -> bool {
    r.http_code == 200 && r.mock_peer().is_some() && !r.was_direct()
}

fn signal(t: &Tollgate, sig: i32) -> Result<()> {
    let pid = t.pid().context("tollgate not running")?;
    // SAFETY: kill(2) on our own child process.
    ensure!(unsafe { libc::kill(pid as i32, sig) } == 0, "kill({pid}, {sig}) failed");
    Ok(())
}

struct Load {
    child: Child,
    stop: std::path::PathBuf,
}

impl Load {
    fn start(e: &Env, g: &Group) -> Result<Load> {
        let stop = e.path("cs2-stop");
        let mut child = g
            .command("python3", None)
            .args(["-c", LOAD, "127.0.0.2", "8000", &stop.to_string_lossy(), "8"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawn the load")?;
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().context("stdout")?), &mut line)?;
        ensure!(line.trim() == "started", "load did not start: {line:?}");
        Ok(Load { child, stop })
    }

    fn stop(&mut self) -> Result<()> {
        std::fs::write(&self.stop, b"")?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.stop, b"");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn cs2_estimate_burst_keeps_capture_on_and_a_frozen_proxy_fails_open() -> Result<()> {
    let e = env()?;
    let heavy = e.cg.group("cs2-heavy")?;
    let probe_g = e.cg.group("cs2-probe")?;
    let mock = e.mock(&["--listen", "127.0.0.2:8000"])?;
    let mut patch = plaintext_route(mock.http[0], &[&heavy, &probe_g], "cs2-probe", &probe_g);
    merge(
        &mut patch,
        json!({
            "agents": [
                {"name": "cs2-heavy", "match": {"cgroup": heavy.rel()}},
                {"name": "cs2-probe", "match": {"cgroup": probe_g.rel()}},
            ],
            // Every heavy prompt is tokenized to be judged (and refused: it exceeds the limit).
            "rate_limits": {"policies": [{"name": "tpm", "match": {"agent": "cs2-heavy"},
                "limits": [{"limit": 10, "window": "60s", "count": "total"}]}]},
        }),
    );
    let mut t = e.tollgate(patch, None)?;
    let pid = t.pid().context("tollgate pid")?;
    let r = probe(&probe_g, "5")?;
    ensure!(served_by_tollgate(&r), "probe before load: {}", r.describe());

    // Saturate: wait until tollgate is burning CPU on the prompts.
    let mut load = Load::start(&e, &heavy)?;
    let cpu0 = cpu_seconds(pid)?;
    ensure!(
        wait_for(Duration::from_secs(20), Duration::from_millis(100), || (cpu_seconds(pid).ok()? - cpu0 > 1.0)
            .then_some(()))
        .is_some(),
        "tollgate never got busy with the load"
    );
    // For 5 s of that load, captured connects from another agent keep going through tollgate.
    let (cpu_start, started) = (cpu_seconds(pid)?, Instant::now());
    let mut probes = Vec::new();
    while started.elapsed() < Duration::from_secs(5) {
        let r = probe(&probe_g, "3")?;
        let ok = served_by_tollgate(&r);
        probes.push(format!(
            "{:>5} ms: {}",
            started.elapsed().as_millis(),
            if ok { "proxied".into() } else { r.describe() }
        ));
        if r.was_direct() {
            bail!("a captured connect went direct while tollgate was accepting:\n{}", probes.join("\n"));
        }
    }
    let busy = (cpu_seconds(pid)? - cpu_start) / started.elapsed().as_secs_f64();
    let served = probes.iter().filter(|p| p.ends_with("proxied")).count();
    eprintln!("cs2: {served}/{} probes proxied, tollgate busy {:.0}% of a CPU", probes.len(), busy * 100.0);
    // Precondition, not the property: the prompts really are being tokenized. Fixed, that is one
    // estimate thread on a 2-CPU machine (whatever share of a CPU the host leaves it); the
    // unfixed proxy tokenized on both async workers and let this probe loop go direct.
    ensure!(busy > 0.25, "the load kept tollgate only {:.0}% busy: not a saturation test", busy * 100.0);
    ensure!(served >= 3, "too few probes served under load:\n{}", probes.join("\n"));
    for event in ["skipped_proxy_down", "rejected_proxy_down"] {
        wait_metric(&t, "tollgate_capture_total", &[("event", event)], 0.0)?;
    }
    load.stop()?;

    // Frozen: a connect goes direct once the heartbeat is older than heartbeat_timeout (1 s).
    signal(&t, libc::SIGSTOP)?;
    let stopped = Instant::now();
    let mut attempts = Vec::new();
    let first_direct = wait_for(Duration::from_secs(5), Duration::from_millis(20), || {
        let at = stopped.elapsed();
        let r = probe(&probe_g, "0.5").ok()?;
        attempts.push(format!("{:>5} ms: {}", at.as_millis(), r.describe()));
        r.was_direct().then_some(at)
    });
    let resumed = signal(&t, libc::SIGCONT);
    let Some(at) = first_direct else {
        bail!("captured connects never went direct while tollgate was stopped:\n{}", attempts.join("\n"));
    };
    resumed?;
    eprintln!("cs2: first direct connect started {} ms after SIGSTOP", at.as_millis());
    // The timeout, plus one 200 ms stamp interval and one probe that hung on the frozen proxy.
    ensure!(
        at <= Duration::from_millis(1700),
        "bypass only {} ms after SIGSTOP:\n{}",
        at.as_millis(),
        attempts.join("\n")
    );

    // Resumed: captured again.
    let back = wait_for(Duration::from_secs(5), Duration::from_millis(50), || {
        let r = probe(&probe_g, "2").ok()?;
        served_by_tollgate(&r).then_some(())
    });
    ensure!(back.is_some(), "capture did not resume after SIGCONT:\n{}", t.stderr_tail(20));
    t.terminate();
    Ok(())
}
