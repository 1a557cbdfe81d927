//! The README's access-log field table must list exactly the fields tollgate writes: one line of
//! each kind (`llm`, `l4`, `mcp`, `a2a`) with every optional field set goes through the real
//! sink into a file, and the keys found (nested ones as `agent.k8s.pod_uid`) are compared with
//! the table's rows for that kind.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::a2a::A2aHop;
use super::mcp::{McpCall, McpVerdict};
use super::{L4Conn, LlmCall, Payload, SpanIds, Telemetry, Usage};
use crate::capture::identity::K8sIdentity;
use crate::capture::kubernetes::{PodInfo, Workload};
use crate::capture::Agent;
use crate::config::{ProviderKind, TelemetryConfig};

fn agent() -> Arc<Agent> {
    let mut a = Agent::unknown("billing");
    a.pid = 42;
    a.comm = "python3".into();
    a.exe = Some("/usr/bin/python3.11".into());
    a.cgroup_path = Some("/kubepods/pod1/c1".into());
    a.k8s = Some(K8sIdentity {
        pod_uid: "0d5bd5f4".into(),
        container_id: Some("c1".into()),
        pod: Some(Arc::new(PodInfo {
            uid: "0d5bd5f4".into(),
            namespace: "team-a".into(),
            name: "chat-1".into(),
            service_account: None,
            workload: Workload { kind: "Deployment".into(), name: "chat".into() },
            labels: Default::default(),
            annotations: Default::default(),
            qos_class: None,
            capture: true,
            agent: Arc::from("team-a/chat"),
            ips: Vec::new(),
        })),
    });
    Arc::new(a)
}

fn ids() -> Option<SpanIds> {
    Some(SpanIds { trace_id: [1; 16], span_id: [2; 8], sampled: true })
}

/// One line of every kind, with every optional field present.
async fn lines() -> Vec<Value> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("access.log");
    let cfg = TelemetryConfig { access_log: path.display().to_string(), ..Default::default() };
    let t = Telemetry::new(&cfg).expect("telemetry");
    let a = agent();

    let mut llm = LlmCall::new(a.clone(), Arc::from("openai"), ProviderKind::Openai, "chat");
    llm.status = 200;
    llm.stream = true;
    llm.method = "POST".into();
    llm.path = "/v1/chat/completions".into();
    llm.request_model = Some("gpt-4o".into());
    llm.response_model = Some("gpt-4o-2024-08-06".into());
    llm.usage = Some(Usage { input: 10, output: 5, total: 15, ..Default::default() });
    llm.ttft = Some(Duration::from_millis(20));
    llm.duration = Duration::from_millis(80);
    llm.error = Some("upstream reset".into());
    llm.target = Some(Arc::from("openai-eu"));
    llm.attempts = 2;
    let mut payload = Payload::new(16, b"{\"model\":\"gpt-4o\"}");
    payload.push_response(b"{}");
    llm.payload = Some(Box::new(payload));
    t.llm_call(&llm);

    t.l4_done(&L4Conn {
        agent: a.clone(),
        sni: Some("api.openai.com".into()),
        dst: "10.0.0.1:443".parse().expect("addr"),
        bytes_up: 1,
        bytes_down: 2,
        duration: Duration::from_millis(3),
        error: Some("reset".into()),
    });

    t.mcp_call(&McpCall {
        agent: a.clone(),
        route: Arc::from("mcp"),
        http_method: "POST",
        path: "/mcp".into(),
        method: "tools/call".into(),
        request_id: Some("7".into()),
        tool: Some("get_weather".into()),
        target: None,
        session_id: Some("s1".into()),
        protocol_version: Some("2025-06-18".into()),
        client: Some("mcp-client 1.0".into()),
        server: Some("weather 1.0".into()),
        verdict: McpVerdict::Denied("no-delete".into()),
        status: 200,
        error_code: Some(-32602),
        error: Some("denied".into()),
        tools_hidden: 1,
        notifications: 2,
        start: SystemTime::now(),
        duration: Duration::from_millis(4),
        traceparent: None,
        span_ids: ids(),
        server_address: None,
        capture: crate::telemetry::Capture::Intercept,
    });

    t.a2a_hop(&A2aHop {
        agent: a,
        route: Arc::from("a2a"),
        target: Arc::from("booking"),
        method: "message/send",
        request_id: Some("1".into()),
        skill: Some("book".into()),
        task_id: Some("t1".into()),
        context_id: Some("c1".into()),
        outcome: "denied",
        denied_by: Some("no-pay".into()),
        error_code: Some(-32001),
        error: Some("denied".into()),
        status: 200,
        stream: true,
        events: 3,
        start: SystemTime::now(),
        duration: Duration::from_millis(5),
        traceparent: None,
        span_ids: ids(),
        server_address: None,
        capture: crate::telemetry::Capture::Intercept,
    });

    t.access.flush().await;
    let text = std::fs::read_to_string(&path).expect("read access log");
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

/// Key paths of a JSON object, nested objects joined with `.`.
fn keys(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let Value::Object(m) = v {
        for (k, v) in m {
            let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            if v.is_object() {
                keys(v, &path, out);
            } else {
                out.insert(path);
            }
        }
    }
}

/// The README's access-log table: `| field | kinds | meaning |` rows under "### Access log".
fn documented(kind: &str) -> BTreeSet<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&path).expect("README");
    let section = readme.split("\n### Access log\n").nth(1).expect("README has an `### Access log` section");
    let section = section.split("\n#").next().unwrap_or(section);
    let mut out = BTreeSet::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let kinds: Vec<&str> = cells.get(1).map(|k| k.split(',').map(str::trim).collect()).unwrap_or_default();
        if kinds.contains(&kind) || kinds.contains(&"all") {
            // `a` / `b` rows name several fields.
            out.extend(cells[0].split('/').map(|f| f.trim().trim_matches('`').to_string()));
        }
    }
    out
}

#[tokio::test]
async fn readme_lists_exactly_the_fields_of_each_line_kind() {
    let lines = lines().await;
    assert_eq!(lines.len(), 4, "{lines:?}");
    for line in &lines {
        let kind = line["kind"].as_str().expect("kind");
        let mut written = BTreeSet::new();
        keys(line, "", &mut written);
        let doc = documented(kind);
        let undocumented: Vec<_> = written.difference(&doc).collect();
        let absent: Vec<_> = doc.difference(&written).collect();
        assert!(undocumented.is_empty(), "{kind} lines carry fields the README does not list: {undocumented:?}");
        assert!(absent.is_empty(), "the README lists {kind} fields tollgate does not write: {absent:?}");
    }
}
