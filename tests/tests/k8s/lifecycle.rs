//! Node-agent lifecycle: live config reload (a ConfigMap update) and a rolling update
//! (SIGTERM, drain, restart) measured from the agent's side.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::cgroup::Group;
use tollgate_e2e::openai::{self, ChatRequest};
use tollgate_e2e::tollgate::Tollgate;
use tollgate_e2e::{ensure, wait_for, Result};

use crate::support::*;

/// Replace the config file the way the kubelet updates a ConfigMap volume: write a new file,
/// then rename it over the old one.
fn write_config(t: &Tollgate, cfg: &Value) -> Result<()> {
    let tmp = t.config_path.with_extension("yaml.new");
    std::fs::write(&tmp, serde_yaml_ng::to_string(cfg)?)?;
    std::fs::rename(&tmp, &t.config_path)?;
    Ok(())
}

fn stream_request(words: u32, text: &str) -> ChatRequest {
    let mut req = ChatRequest::simple(MODEL, text);
    req.stream = true;
    req.include_usage = true;
    req.max_tokens = Some(words);
    req
}

/// POST the JSON file `body` to `url` with curl from the cgroup directory `cgroup`.
fn post_json(cgroup: &Path, body: &Path, url: &str) -> Result<tollgate_e2e::client::CurlOut> {
    let data = format!("@{}", body.display());
    let args =
        ["-H", "Content-Type: application/json", "-H", "Authorization: Bearer sk-e2e", "--data-binary", &data, url];
    tollgate_e2e::client::curl_in(cgroup, None, &args)
}

/// Start a streamed chat through curl in `g` on a thread; the handle yields curl's result.
fn spawn_stream(
    e: &Env,
    g: &Group,
    url: String,
    req: ChatRequest,
) -> Result<std::thread::JoinHandle<Result<tollgate_e2e::client::CurlOut>>> {
    let body = e.path(&format!("stream-{}.json", req.max_tokens.unwrap_or(0)));
    std::fs::write(&body, serde_json::to_vec(&req.to_json())?)?;
    let dir = g.dir().to_path_buf();
    Ok(std::thread::spawn(move || post_json(&dir, &body, &url)))
}

fn route(name: &str, addrs: &[SocketAddr]) -> Value {
    json!([{"name": name, "provider": "openai", "match": {"addresses": addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>()}}])
}

fn rule(addr: SocketAddr) -> Value {
    json!({"cidr": format!("{}/32", addr.ip()), "port": addr.port()})
}

// ---------------------------------------------------------------------------------------------
// k2. Live reload: an in-flight stream completes on the old rules, the next connection gets the
//     new ones (route and kernel rules), an invalid file is refused and the last good one stays.
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn k2_config_reload_keeps_streams_and_refuses_bad_files() -> Result<()> {
    let e = env()?;
    let g = e.cg.group("k2-agent")?;
    let mock = e.mock(&["--listen", "127.0.0.2:0", "--listen", "127.0.0.2:0", "--chunk-delay-ms", "100"])?;
    let (p1, p2) = (mock.http[0], mock.http[1]);
    let mut t = e.tollgate(
        json!({
            "capture": {"scope": [g.rel()], "destinations": [rule(p1)]},
            "routes": route("llm-v1", &[p1]),
            "agents": [{"name": "k2", "match": {"cgroup": g.rel()}}],
        }),
        None,
    )?;

    // A 20-event stream (~2 s) starts on generation 1.
    let req = stream_request(20, "stream across a reload");
    let stream = spawn_stream(&e, &g, format!("http://{p1}/v1/chat/completions"), req.clone())?;
    wait_for(Duration::from_secs(5), Duration::from_millis(20), || (mock.chat_requests().ok()? >= 1).then_some(()))
        .ok_or_else(|| tollgate_e2e::anyhow!("stream never reached the mock"))?;

    // Generation 2: route renamed, second destination captured.
    let mut cfg = t.config.clone();
    cfg["routes"] = route("llm-v2", &[p1, p2]);
    cfg["capture"]["destinations"] = json!([rule(p1), rule(p2)]);
    write_config(&t, &cfg)?;
    wait_metric(&t, "tollgate_config_reloads_total", &[("result", "success")], 1.0)?;

    let r = stream.join().map_err(|_| tollgate_e2e::anyhow!("stream thread panicked"))??;
    ensure!(r.exit == 0 && r.http_code == 200, "stream across reload failed: {}", r.describe());
    assert_proxied(&r)?;
    let want = openai::stream_body(&openai::reply_for(&req), true);
    ensure!(r.body == want, "stream across reload differs from the mock's events:\n{}", r.text());
    wait_metric(&t, "tollgate_llm_requests_total", &[("route", "llm-v1")], 1.0)?;

    // Next connections: new route name, and the new kernel rule captures p2.
    for addr in [p1, p2] {
        let r = chat_curl(
            &e,
            Some(&g),
            &format!("http://{addr}/v1/chat/completions"),
            &ChatRequest::simple(MODEL, "after reload"),
        )?;
        ensure!(r.http_code == 200, "{}", r.describe());
        assert_proxied(&r)?;
    }
    wait_metric(&t, "tollgate_llm_requests_total", &[("route", "llm-v2")], 2.0)?;

    // An invalid file (unknown field) is refused with its position; rules stay.
    std::fs::write(t.config_path.with_extension("bad"), "routes:\n  - name: x\n    provder: openai\n")?;
    std::fs::rename(t.config_path.with_extension("bad"), &t.config_path)?;
    wait_metric(&t, "tollgate_config_reloads_total", &[("result", "failure")], 1.0)?;
    let err = wait_for(Duration::from_secs(5), Duration::from_millis(100), || {
        let s = t.stderr_tail(40);
        s.lines().find(|l| l.contains("config reload refused")).map(str::to_string)
    })
    .ok_or_else(|| tollgate_e2e::anyhow!("no refusal logged:\n{}", t.stderr_tail(40)))?;
    let pos = format!("{}:3:5", t.config_path.display());
    ensure!(err.contains(&pos) && err.contains("provder"), "refusal lacks file:line:col ({pos}): {err}");
    let r =
        chat_curl(&e, Some(&g), &format!("http://{p2}/v1/chat/completions"), &ChatRequest::simple(MODEL, "still v2"))?;
    assert_proxied(&r)?;
    wait_metric(&t, "tollgate_llm_requests_total", &[("route", "llm-v2")], 3.0)?;
    ensure!(t.metrics()?.sum("tollgate_config_restart_required", &[]) == 0.0, "restart_required set without cause");

    // A change that needs a restart is applied except for that setting, and says so.
    let mut cfg2 = cfg.clone();
    cfg2["telemetry"]["max_label_values"] = json!(7);
    write_config(&t, &cfg2)?;
    wait_metric(&t, "tollgate_config_reloads_total", &[("result", "success")], 2.0)?;
    wait_metric(&t, "tollgate_config_restart_required", &[], 1.0)?;
    ensure!(t.terminate().is_some_and(|s| s.success()), "tollgate did not exit cleanly");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// k3. Rolling update as the DaemonSet does it (maxUnavailable 1: old pod ends, new one starts):
//     SIGTERM detaches capture at once (new connects go direct, none fail), the in-flight stream
//     drains to its end, the new instance captures again. Prints the measured window.
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn k3_rolling_update_drains_and_fails_open() -> Result<()> {
    let e = env()?;
    let g = e.cg.group("k3-agent")?;
    let mock = e.mock(&["--listen", "127.0.0.2:0", "--chunk-delay-ms", "50"])?;
    let addr = mock.http[0];
    let mut t = e.tollgate(plaintext_route(addr, &[&g], "k3", &g), None)?;
    let url = format!("http://{addr}/v1/chat/completions");

    let req = stream_request(40, "stream through a rolling update"); // ~2 s
    let stream = spawn_stream(&e, &g, url.clone(), req.clone())?;
    wait_for(Duration::from_secs(5), Duration::from_millis(20), || (mock.chat_requests().ok()? >= 1).then_some(()))
        .ok_or_else(|| tollgate_e2e::anyhow!("stream never reached the mock"))?;

    // Agents keep opening new connections throughout.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t0 = Instant::now();
    let looper = {
        let (stop, done, procs_dir, url, body) =
            (stop.clone(), done.clone(), g.dir().to_path_buf(), url.clone(), e.path("k3-loop.json"));
        std::fs::write(&body, serde_json::to_vec(&ChatRequest::simple(MODEL, "loop").to_json())?)?;
        std::thread::spawn(move || {
            let mut out = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let at = t0.elapsed();
                let r = post_json(&procs_dir, &body, &url);
                out.push((at, t0.elapsed(), r));
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                // An agent opening a new connection every ~25 ms.
                std::thread::sleep(Duration::from_millis(20));
            }
            out
        })
    };
    // Requests completed by the looper so far; waits until `n` more than `from` are done.
    let completed = |from: usize, n: usize| {
        wait_for(Duration::from_secs(10), Duration::from_millis(10), || {
            (done.load(std::sync::atomic::Ordering::Relaxed) >= from + n).then_some(())
        })
        .ok_or_else(|| {
            tollgate_e2e::anyhow!(
                "the agent loop stalled ({} requests)",
                done.load(std::sync::atomic::Ordering::Relaxed)
            )
        })
    };
    // Some traffic through the old instance before the update.
    completed(0, 5)?;
    let term_at = t0.elapsed();
    let status = t.terminate();
    let exited_at = t0.elapsed();
    ensure!(status.is_some_and(|s| s.success()), "old tollgate did not exit cleanly: {status:?}");
    let r = stream.join().map_err(|_| tollgate_e2e::anyhow!("stream thread panicked"))??;
    ensure!(r.exit == 0 && r.http_code == 200, "in-flight stream cut by the update: {}", r.describe());
    ensure!(r.body == openai::stream_body(&openai::reply_for(&req), true), "drained stream differs:\n{}", r.text());
    t.restart()?;
    let ready_at = t0.elapsed();
    // And through the new one after it is ready.
    completed(done.load(std::sync::atomic::Ordering::Relaxed), 20)?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = looper.join().map_err(|_| tollgate_e2e::anyhow!("loop thread panicked"))?;

    let (mut failed, mut direct, mut proxied_before, mut proxied_after) = (0, 0, 0, 0);
    let (mut first_direct, mut last_direct) = (None, None);
    let mut outside = Vec::new();
    for (at, end, r) in &results {
        match r {
            Ok(r) if r.exit == 0 && r.http_code == 200 => {
                if r.was_direct() {
                    direct += 1;
                    // Started before SIGTERM is fine (curl connects a few ms after it starts);
                    // a direct request must overlap [SIGTERM, new instance ready].
                    if *end < term_at || *at > ready_at {
                        outside.push((*at, *end));
                    }
                    first_direct.get_or_insert(*at);
                    last_direct = Some(*at);
                } else if *at < term_at {
                    proxied_before += 1;
                } else {
                    proxied_after += 1;
                }
            }
            other => {
                if failed == 0 {
                    match other {
                        Ok(r) => eprintln!("k3 first failure at {at:?}: {}", r.describe()),
                        Err(e) => eprintln!("k3 first failure at {at:?}: {e:#}"),
                    }
                }
                failed += 1;
            }
        }
    }
    let window = first_direct.zip(last_direct).map(|(a, b)| b.saturating_sub(a));
    eprintln!(
        "k3 figures: {} requests; failed {failed}; direct {direct} (window {:?}); proxied before SIGTERM {proxied_before}, after restart {proxied_after}; drain took {:?}; restart ready after {:?}",
        results.len(),
        window,
        exited_at - term_at,
        ready_at - exited_at
    );
    ensure!(failed == 0, "{failed} agent requests failed during the rolling update");
    ensure!(proxied_before > 0 && proxied_after > 0 && direct > 0, "loop did not span the update");
    ensure!(outside.is_empty(), "direct requests outside [SIGTERM {term_at:?}, ready {ready_at:?}]: {outside:?}");
    let last = results.last().and_then(|(_, _, r)| r.as_ref().ok()).map(|r| !r.was_direct());
    ensure!(last == Some(true), "requests after the restart are not captured again");
    Ok(())
}
