//! A2A scenarios (issue 7): the real `a2a-sdk` client in an orchestrator "pod" (netns + cgroup)
//! calls real `a2a-sdk` agents on captured addresses; the booking agent, in its own cgroup,
//! calls the mock LLM and forwards the `traceparent` it was called with. tollgate knows both
//! callers from the kernel, so the orchestrator's `invoke_agent` span and the booking agent's
//! LLM span land in one trace, the hop is counted per (source, target card name), and a rule
//! refuses hops to another agent and to a denied skill before they reach any server.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::cgroup::Group;
use tollgate_e2e::client::{client_script, curl, python, venv_python};
use tollgate_e2e::netns::Netns;
use tollgate_e2e::otlp::{OtlpReceiver, ReceivedSpan};
use tollgate_e2e::{anyhow, bail, ensure, Result};

use crate::support::{env, wait_metric, MODEL};

const ORCH: &str = "orchestrator";
const BOOKING: &str = "booking";
const BOOKING_CARD: &str = "booking-agent";
const PAYMENTS_CARD: &str = "payments-agent";
const LLM: &str = "127.0.0.2:8000";
const TRACE: &str = "5a2a0000000000000000000000000a2a";
const PARENT: &str = "0a2a00000000000b";

/// An `a2a_booking.py` server; killed on drop.
pub(crate) struct Agent {
    child: Child,
}

impl Agent {
    /// Start an a2a-sdk agent named `name` on `listen` in `group`, answering with the mock LLM.
    fn start(group: &Group, name: &str, listen: &str) -> Result<Self> {
        Self::start_with_llm(group, name, listen, &format!("http://{LLM}/v1/chat/completions"))
    }

    /// Like [`Agent::start`], answering with the chat completions endpoint at `llm`.
    pub(crate) fn start_with_llm(group: &Group, name: &str, listen: &str, llm: &str) -> Result<Self> {
        Self::start_serving(group, name, listen, &format!("http://{listen}/"), llm, &[], &[])
    }

    /// Like [`Agent::start_with_llm`], announcing `url` in its card, with more `a2a_booking.py`
    /// arguments (e.g. its own TLS certificate, for the uprobe scenarios) and environment
    /// variables (e.g. `SSL_CERT_FILE` for an HTTPS LLM).
    pub(crate) fn start_serving(
        group: &Group,
        name: &str,
        listen: &str,
        url: &str,
        llm: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let py = venv_python();
        let mut cmd = group.command(&py.to_string_lossy(), None);
        cmd.arg(client_script("a2a_booking.py"))
            .args(["--listen", listen, "--name", name, "--url", url, "--llm", llm, "--model", MODEL])
            .args(extra)
            .env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", std::env::temp_dir())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn()?;
        let out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let agent = Agent { child };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.trim() == "ready" => Ok(agent),
            other => bail!("agent {name} on {listen} did not start: {other:?}"),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Run the a2a-sdk orchestrator client in the pod against `url`.
pub(crate) fn orchestrate(g: &Group, ns: Option<&Netns>, url: &str, text: &str, extra: &[&str]) -> Result<Value> {
    let tp = format!("00-{TRACE}-{PARENT}-01");
    let args = [&["--url", url, "--text", text, "--traceparent", &tp][..], extra].concat();
    let out = python(Some(g), ns, "a2a_orchestrator.py", &args, &[])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).map_err(|e| {
        anyhow!("orchestrator output not JSON ({e}): {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr))
    })
}

/// a1: orchestrator pod → booking agent (card name `booking-agent`) → mock LLM, one trace; a
/// second agent and a denied skill are refused with tollgate's JSON-RPC error.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn a1_a2a_hops_traced_counted_and_authorized() -> Result<()> {
    let e = env()?;
    let orch = e.cg.group("a1-orch")?;
    let booking_g = e.cg.group("a1-booking")?;
    let ns = Netns::create("a1-orch", 41)?;
    let host = ns.host_addr().to_string();
    let (booking_addr, payments_addr) = (format!("{host}:9101"), format!("{host}:9102"));
    let rx = OtlpReceiver::start()?;
    let mock = e.mock(&["--listen", LLM])?;
    let t = e.tollgate(
        json!({
            "listen": {"pod_ipv4": host},
            "capture": {
                "scope": [orch.rel(), booking_g.rel()],
                "destinations": [
                    {"cidr": format!("{host}/32"), "port": 9101},
                    {"cidr": format!("{host}/32"), "port": 9102},
                    {"cidr": "127.0.0.2/32", "port": 8000},
                ],
            },
            "routes": [
                {"name": "booking", "protocol": "a2a", "match": {"addresses": [booking_addr]}},
                {"name": "payments", "protocol": "a2a", "match": {"addresses": [payments_addr]}},
                {"name": "local-llm", "provider": "openai", "match": {"addresses": [LLM]}},
            ],
            "agents": [
                {"name": ORCH, "match": {"cgroup": orch.rel()}},
                {"name": BOOKING, "match": {"cgroup": booking_g.rel()}},
            ],
            "a2a": {"rules": [{
                "name": "orchestrator-books-only",
                "match": {"agent": ORCH},
                "allow": {"targets": ["booking-*"]},
                "deny": {"skills": ["refund"]},
            }]},
            "telemetry": {"otlp": {"endpoint": rx.endpoint(), "protocol": "http_protobuf", "traces": true}},
        }),
        None,
    )?;
    // Both agents run in the booking cgroup (on the host side of the pod's veth).
    let _booking = Agent::start(&booking_g, BOOKING_CARD, &booking_addr)?;
    let _payments = Agent::start(&booking_g, PAYMENTS_CARD, &payments_addr)?;

    // Allowed: streamed and not, with an allowed skill and none.
    let mut served = 0;
    for extra in [&["--stream", "--skill", "book-flight"][..], &[][..]] {
        let started = Instant::now();
        let v = orchestrate(&orch, Some(&ns), &format!("http://{booking_addr}"), "Book a flight to Lisbon", extra)?;
        ensure!(v["ok"] == true, "allowed hop failed ({extra:?}): {v}\n{}", t.stderr_tail(30));
        ensure!(v["card_name"] == BOOKING_CARD, "card: {v}");
        ensure!(v["state"] == "TASK_STATE_COMPLETED" && v["answer"].is_string(), "task: {v}");
        served += 1;
        ensure!(mock.chat_requests()? == served, "booking agent did not call the LLM: {}", mock.chat_requests()?);
        eprintln!("a1: hop {extra:?} took {:?}: {v}", started.elapsed());
    }

    // Denied skill on the allowed agent, then any hop to the other agent.
    for (url, extra, rule_text) in [
        (format!("http://{booking_addr}"), &["--skill", "refund"][..], "skill \\\"refund\\\" is denied"),
        (format!("http://{payments_addr}"), &["--stream"][..], "target \\\"payments-agent\\\" is not allowed"),
    ] {
        let v = orchestrate(&orch, Some(&ns), &url, "Refund my last trip", extra)?;
        ensure!(v["ok"] == false, "denied hop succeeded: {v}");
        let err = v["error"].as_str().unwrap_or("");
        ensure!(
            v["error_type"] == "A2AClientError"
                && err.contains("JSON-RPC Error -32050")
                && err.contains("tollgate: a2a hop")
                && err.contains("orchestrator-books-only"),
            "denied hop error: {v}"
        );
        ensure!(err.contains(&rule_text.replace("\\\"", "\"")), "denial reason: {err}");
    }
    ensure!(mock.chat_requests()? == served, "a denied hop reached an agent (LLM calls {})", mock.chat_requests()?);

    // Metrics: hops by source and callee card name; denials by rule.
    let hops = "tollgate_a2a_hops_total";
    wait_metric(&t, hops, &[("source", ORCH), ("target", BOOKING_CARD), ("outcome", "completed")], 2.0)?;
    wait_metric(
        &t,
        hops,
        &[("source", ORCH), ("target", BOOKING_CARD), ("method", "SendStreamingMessage"), ("outcome", "completed")],
        1.0,
    )?;
    wait_metric(&t, hops, &[("source", ORCH), ("target", BOOKING_CARD), ("outcome", "denied")], 1.0)?;
    wait_metric(&t, hops, &[("source", ORCH), ("target", PAYMENTS_CARD), ("outcome", "denied")], 1.0)?;
    wait_metric(
        &t,
        "tollgate_policy_denials_total",
        &[("agent", ORCH), ("policy", "a2a"), ("rule", "orchestrator-books-only")],
        2.0,
    )?;
    wait_metric(&t, "tollgate_a2a_hop_duration_seconds_count", &[("source", ORCH)], 4.0)?;
    ensure!(t.stderr_tail(300).contains("a2a hop denied"), "no audit line for the denied hops");
    let lines = t.access_log();
    let a2a: Vec<&Value> = lines.iter().filter(|l| l["kind"] == "a2a").collect();
    ensure!(a2a.len() == 4, "want 4 a2a access-log lines, got {}: {a2a:#?}", a2a.len());
    ensure!(
        a2a.iter().all(|l| l["agent"]["name"] == ORCH) && a2a.iter().any(|l| l["rule"] == "orchestrator-books-only"),
        "a2a lines: {a2a:#?}"
    );

    // One trace: orchestrator's span → invoke_agent (tollgate) → booking's LLM call (tollgate).
    let spans = rx
        .wait_spans(Duration::from_secs(15), |s| {
            s.iter().filter(|x| x.trace_id == TRACE && x.name == "invoke_agent booking-agent").count() >= 3
                && s.iter().filter(|x| x.trace_id == TRACE && x.name.starts_with("chat ")).count() >= 2
                // The denied hop's span may come in a later export batch than the others.
                && s.iter().any(|x| x.trace_id == TRACE && x.name == "invoke_agent payments-agent")
        })
        .ok_or_else(|| anyhow!("spans did not arrive: {:#?}\nrejected: {:?}", rx.spans(), rx.rejected()))?;
    let mine: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.trace_id == TRACE).collect();
    let invokes: Vec<&&ReceivedSpan> = mine.iter().filter(|s| s.name.starts_with("invoke_agent ")).collect();
    for s in &invokes {
        ensure!(
            s.parent_span_id == PARENT,
            "invoke_agent parent {:?}, want the orchestrator's {PARENT}",
            s.parent_span_id
        );
        ensure!(s.attr("gen_ai.operation.name") == Some("invoke_agent"), "{s:#?}");
        ensure!(s.attr("tollgate.a2a.caller") == Some(ORCH), "{s:#?}");
        ensure!(s.attr("process.executable.name").is_some_and(|c| c.starts_with("python")), "caller identity: {s:#?}");
    }
    let completed: Vec<&&&ReceivedSpan> =
        invokes.iter().filter(|s| s.attr("tollgate.a2a.outcome") == Some("completed")).collect();
    ensure!(completed.len() == 2, "completed invoke_agent spans: {invokes:#?}");
    ensure!(
        completed
            .iter()
            .all(|s| s.attr("gen_ai.agent.name") == Some(BOOKING_CARD) && s.attr("tollgate.a2a.task_id").is_some()),
        "{completed:#?}"
    );
    let chats: Vec<&&ReceivedSpan> = mine.iter().filter(|s| s.name.starts_with("chat ")).collect();
    ensure!(chats.len() == 2, "booking's LLM spans in the trace: {chats:#?}");
    for c in &chats {
        ensure!(c.attr("gen_ai.agent.name") == Some(BOOKING), "LLM span caller: {c:#?}");
        ensure!(
            completed.iter().any(|s| s.span_id == c.parent_span_id),
            "LLM span parent {} is no invoke_agent span of the trace: {invokes:#?}",
            c.parent_span_id
        );
    }
    let denied = invokes.iter().filter(|s| s.attr("tollgate.a2a.outcome") == Some("denied")).count();
    let denied_payments = mine.iter().filter(|s| s.name == "invoke_agent payments-agent").count();
    ensure!(denied == 2 && denied_payments == 1, "denied spans (skill, other agent): {mine:#?}");

    // v0.3 wire names from the same pod (curl, raw JSON-RPC): `message/stream`, then `tasks/get`
    // of the task it created; both read to their final state.
    let url = format!("http://{booking_addr}/");
    let stream = json!({"jsonrpc": "2.0", "id": "s1", "method": "message/stream", "params": {"message":
        {"messageId": "m-v03", "role": "user", "kind": "message", "parts": [{"kind": "text", "text": "Book a bus"}]}}});
    let r =
        curl(Some(&orch), Some(&ns), &["-N", "-H", "content-type: application/json", "-d", &stream.to_string(), &url])?;
    ensure!(r.exit == 0 && r.http_code == 200 && r.text().contains("\"final\":true"), "v0.3 stream: {}", r.describe());
    let task = r
        .text()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| {
            v.pointer("/result/taskId").or_else(|| v.pointer("/result/id")).and_then(Value::as_str).map(str::to_string)
        })
        .ok_or_else(|| anyhow!("no task id in {}", r.text()))?;
    let get = json!({"jsonrpc": "2.0", "id": 2, "method": "tasks/get", "params": {"id": task}});
    let r = curl(Some(&orch), Some(&ns), &["-H", "content-type: application/json", "-d", &get.to_string(), &url])?;
    ensure!(r.exit == 0 && r.http_code == 200 && r.text().contains("\"completed\""), "tasks/get: {}", r.describe());
    for method in ["message/stream", "tasks/get"] {
        wait_metric(
            &t,
            hops,
            &[("source", ORCH), ("target", BOOKING_CARD), ("method", method), ("outcome", "completed")],
            1.0,
        )?;
    }
    let lines = t.access_log();
    let got = lines.iter().find(|l| l["kind"] == "a2a" && l["method"] == "tasks/get");
    ensure!(got.is_some_and(|l| l["task_id"] == task.as_str() && l["id"] == "2"), "tasks/get line: {got:?}");
    Ok(())
}

/// a2: an agent tollgate fronts on an explicit listener: the card the SDK fetches through the
/// listener names the listener (not the agent's own address), so the SDK's message goes through
/// tollgate too and is counted as a hop of the `direct` caller to the card's name.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn a2_fronted_agent_card_points_at_tollgate() -> Result<()> {
    let e = env()?;
    let g = e.cg.group("a2-booking")?;
    let (agent_addr, front) = ("127.0.0.1:9111", "127.0.0.1:9112");
    let _mock = e.mock(&["--listen", LLM])?;
    let t = e.tollgate(
        json!({"routes": [{
            "name": "booking-front",
            "protocol": "a2a",
            "listener": front,
            "upstream": format!("http://{agent_addr}"),
        }]}),
        None,
    )?;
    let _booking = Agent::start(&g, BOOKING_CARD, agent_addr)?;
    let tp = format!("00-{TRACE}-{PARENT}-01");
    let out = python(
        None,
        None,
        "a2a_orchestrator.py",
        &["--url", &format!("http://{front}"), "--text", "Book a train", "--traceparent", &tp],
        &[],
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.trim()).map_err(|err| anyhow!("{err}: {stdout}"))?;
    ensure!(v["ok"] == true && v["state"] == "TASK_STATE_COMPLETED", "fronted hop: {v}\n{}", t.stderr_tail(30));
    ensure!(v["card_urls"] == json!([format!("http://{front}/")]), "card not rewritten to the listener: {v}");
    wait_metric(
        &t,
        "tollgate_a2a_hops_total",
        &[("source", "direct"), ("target", BOOKING_CARD), ("outcome", "completed")],
        1.0,
    )?;
    Ok(())
}
