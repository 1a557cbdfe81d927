//! Tests of the Prometheus families: label bounds, series caching, cost, TPOT, and that the
//! bundled dashboards query only emitted metrics.

use super::*;
use crate::config::ProviderKind;
use crate::telemetry::Usage;
use std::time::Duration;

/// A streamed chat call with usage (12 input of which 2 cached, 5 output), TTFT 30ms and
/// duration 120ms: the fixture of every telemetry test.
pub(crate) fn call(agent: &str, model: &str) -> LlmCall {
    let mut c = LlmCall::new(Arc::new(Agent::unknown(agent)), Arc::from("openai"), ProviderKind::Openai, "chat");
    c.request_model = Some(model.into());
    c.response_model = Some(format!("{model}-2024"));
    c.response_id = Some("chatcmpl-1".into());
    c.stream = true;
    c.status = 200;
    c.usage = Some(Usage { input: 12, output: 5, total: 17, cached_input: Some(2), reasoning: None, estimated: false });
    c.finish_reasons = vec!["stop".into()];
    c.server_address = Some("api.openai.com".into());
    c.server_port = Some(443);
    c.method = "POST".into();
    c.path = "/v1/chat/completions".into();
    c.ttft = Some(Duration::from_millis(30));
    c.duration = Duration::from_millis(120);
    c
}

#[test]
fn llm_call_counts_tokens_per_agent() {
    let m = Metrics::new(8).unwrap();
    m.llm_call(&call("billing", "gpt-4o"));
    m.llm_call(&call("billing", "gpt-4o"));
    let text = m.encode();
    assert!(text.contains(r#"tollgate_llm_tokens_total{agent="billing",capture="intercept",model="gpt-4o-2024",provider="openai",route="openai",token_type="input"} 24"#), "{text}");
    assert!(text.contains(r#"token_type="cached_input"} 4"#));
    assert!(text.contains(r#"tollgate_llm_requests_total{agent="billing",capture="intercept",model="gpt-4o-2024",provider="openai",route="openai",status="200"} 2"#));
    assert!(text.contains(r#"gen_ai_client_token_usage_sum{agent="billing",capture="intercept",gen_ai_operation_name="chat",gen_ai_provider_name="openai",gen_ai_request_model="gpt-4o",gen_ai_token_type="output"} 10"#));
    assert!(text.contains("gen_ai_server_time_to_first_token_seconds_count"));
}

#[test]
fn model_labels_are_bounded() {
    let m = Metrics::new(2).unwrap();
    for i in 0..5 {
        m.llm_call(&call("a", &format!("m{i}")));
    }
    let text = m.encode();
    assert!(text.contains(r#"model="other""#));
    assert_eq!(text.matches("tollgate_llm_requests_total{").count(), 2, "{text}");
}

#[test]
fn cached_series_appear_as_calls_need_them() {
    let m = Metrics::new(4096).unwrap();
    let mut c = call("a", "m");
    c.usage = Some(Usage { input: 1, output: 2, total: 3, cached_input: None, reasoning: None, estimated: false });
    m.llm_call(&c);
    let text = m.encode();
    assert!(!text.contains(r#"token_type="cached_input""#) && !text.contains(r#"token_type="reasoning""#), "{text}");
    c.usage = c.usage.map(|u| Usage { reasoning: Some(5), ..u });
    m.llm_call(&c);
    assert!(m.encode().contains(r#"route="openai",token_type="reasoning"} 5"#));
    c.status = 429;
    c.usage = None;
    c.error = Some("rate limited".into());
    m.llm_call(&c);
    c.status = 200;
    c.error = Some("boom".into());
    m.llm_call(&c);
    let text = m.encode();
    assert!(text.contains(r#"duration_seconds_count{agent="a",capture="intercept",error_type="429","#), "{text}");
    assert!(text.contains(r#"duration_seconds_count{agent="a",capture="intercept",error_type="transport","#), "{text}");
    assert!(text.contains(r#"status="429"} 1"#), "{text}");
    // Past the cache bound, calls are still counted.
    for i in 0..MAX_CACHED_SERIES + 10 {
        m.llm_call(&call("b", &format!("x{i}")));
    }
    let last = format!("x{}", MAX_CACHED_SERIES + 9);
    m.llm_call(&call("b", &last));
    let want = format!(
        r#"tollgate_llm_requests_total{{agent="b",capture="intercept",model="{last}-2024",provider="openai",route="openai",status="200"}} 2"#
    );
    assert!(m.encode().contains(&want));
}

#[test]
fn cost_counted_at_cached_rate_per_model() {
    use crate::config::ModelPrice;
    let mp = |model: &str, i: f64, o: f64, c: Option<f64>| ModelPrice {
        model: model.into(),
        input_per_mtok: i,
        output_per_mtok: o,
        cached_input_per_mtok: c,
    };
    let prices =
        PriceTable::new(&[mp("gpt-4o-mini*", 0.15, 0.6, Some(0.075)), mp("gpt-4o*", 2.5, 10.0, None)]).unwrap();
    let m = Metrics::with_pricing(8, prices).unwrap();
    // Usage of `call`: 12 input of which 2 cached, 5 output.
    m.llm_call(&call("a", "gpt-4o-mini"));
    m.llm_call(&call("a", "gpt-4o-mini"));
    let mut est = call("a", "gpt-4o");
    est.usage = est.usage.map(|u| Usage { estimated: true, cached_input: None, ..u });
    m.llm_call(&est);
    m.llm_call(&call("a", "o3"));
    let get = |model: &str| m.cost.with_label_values(&["a", "openai", "openai", model, "intercept"]).get();
    let mini = (10.0 * 0.15 + 2.0 * 0.075 + 5.0 * 0.6) / 1e6;
    assert!((get("gpt-4o-mini-2024") - 2.0 * mini).abs() < 1e-15, "{}", get("gpt-4o-mini-2024"));
    assert!((get("gpt-4o-2024") - (12.0 * 2.5 + 5.0 * 10.0) / 1e6).abs() < 1e-15);
    let text = m.encode();
    assert!(
        !text.contains(r#"tollgate_llm_cost_usd_total{agent="a",capture="intercept",model="o3"#),
        "unpriced model: {text}"
    );
    assert!(text.contains(
        r#"tollgate_llm_cost_usd_total{agent="a",capture="intercept",model="gpt-4o-mini-2024",provider="openai",route="openai"}"#
    ));
    // Without prices the family is empty.
    let bare = Metrics::new(8).unwrap();
    bare.llm_call(&call("a", "gpt-4o"));
    assert!(!bare.encode().contains("tollgate_llm_cost_usd_total{"));
}

#[test]
fn tpot_only_for_successful_streams_with_several_output_tokens() {
    let m = Metrics::new(8).unwrap();
    // `call`: streamed, ttft 30ms, duration 120ms, 5 output tokens: 90ms / 4.
    let c = call("a", "m");
    assert_eq!(time_per_output_token(&c), Some(0.0225));
    m.llm_call(&c);
    let mut not_stream = call("a", "m");
    not_stream.stream = false;
    let mut one_token = call("a", "m");
    one_token.usage = one_token.usage.map(|u| Usage { output: 1, ..u });
    let mut no_usage = call("a", "m");
    no_usage.usage = None;
    let mut failed = call("a", "m");
    failed.status = 500;
    let mut broken = call("a", "m");
    broken.error = Some("reset".into());
    for c in [not_stream, one_token, no_usage, failed, broken] {
        assert_eq!(time_per_output_token(&c), None, "{c:?}");
        m.llm_call(&c);
    }
    let h = m.tpot.with_label_values(&["a", "chat", "openai", "m", "intercept"]);
    assert_eq!(h.get_sample_count(), 1);
    assert!((h.get_sample_sum() - 0.0225).abs() < 1e-12);
    let text = m.encode();
    assert!(text.contains(r#"gen_ai_server_time_per_output_token_seconds_bucket{agent="a",capture="intercept",gen_ai_operation_name="chat",gen_ai_provider_name="openai",gen_ai_request_model="m",le="0.025"} 1"#), "{text}");
}

#[test]
fn capture_counters_exported_from_source() {
    let m = Metrics::new(8).unwrap();
    assert!(!m.encode().contains("tollgate_capture_total"));
    m.set_capture_source(Box::new(|| Some(vec![("seen", 7), ("redirected", 3)])));
    let text = m.encode();
    assert!(text.contains(r#"tollgate_capture_total{event="redirected"} 3"#), "{text}");
    assert!(!text.contains("tollgate_capture_scope_cgroups"), "{text}");
    m.set_scope_source(Box::new(|| vec![("include", 2), ("exclude", 1)]));
    let text = m.encode();
    assert!(text.contains(r#"tollgate_capture_scope_cgroups{entry="exclude"} 1"#), "{text}");
    assert!(text.contains(r#"tollgate_capture_scope_cgroups{entry="include"} 2"#), "{text}");
    assert!(text.contains(r#"tollgate_capture_total{event="redirected"} 3"#), "{text}");
}

/// Every metric a bundled dashboard queries must be one tollgate emits; a panel over a
/// metric that does not exist is a broken product.
#[test]
fn dashboards_query_only_emitted_metrics() {
    let any = crate::config::ModelPrice {
        model: "*".into(),
        input_per_mtok: 1.0,
        output_per_mtok: 1.0,
        cached_input_per_mtok: None,
    };
    let m = Metrics::with_pricing(8, PriceTable::new(&[any]).unwrap()).unwrap();
    m.llm_call(&call("a", "m"));
    m.upstream_attempt("a", "r", "t", "ok");
    m.set_circuit_source(Box::new(|| vec![("r".into(), "t".into(), 0)]));
    m.connection(None, ConnKind::Spliced);
    m.l4_done(&L4Conn {
        agent: Arc::new(Agent::unknown("a")),
        sni: Some("x".into()),
        dst: "127.0.0.1:1".parse().unwrap(),
        bytes_up: 1,
        bytes_down: 1,
        duration: Duration::from_millis(1),
        error: None,
    });
    m.set_capture_source(Box::new(|| Some(vec![("seen", 1)])));
    // The node agent's families (config reloads, Kubernetes pods), which `Telemetry` registers
    // in the same registry.
    let node = crate::telemetry::node::NodeMetrics::register(&m.registry).unwrap();
    node.set_pod_source(Box::new(|| {
        (vec![("ns".into(), "pod".into(), "Deployment/w".into(), "ns/w".into(), true)], vec![("relists", 0)])
    }));
    // The governance families (access, token limits, guardrails), likewise in the same registry.
    let gov = crate::telemetry::governance::GovernanceMetrics::register(&m.registry).unwrap();
    gov.denial("a", "access", "no-o1");
    gov.rate_rejection("a", "p", "total");
    gov.remaining("a", "p", "total", 0.5);
    gov.verdict("a", "pii", "redact", "email", 1);
    gov.set_limiter_source(Box::new(|| Some((0, 0, 1))));
    // The MCP families.
    let mcp = crate::telemetry::mcp::McpMetrics::register(&m.registry, 8).unwrap();
    let mut c = crate::telemetry::mcp::McpCall::new(
        Arc::new(Agent::unknown("a")),
        "r".into(),
        "POST",
        "/",
        "tools/call".into(),
    );
    c.tool = Some("t".into());
    mcp.record("a", &c);
    // The A2A families.
    let a2a = crate::telemetry::a2a::A2aMetrics::register(&m.registry, 8).unwrap();
    a2a.record(
        "a",
        &crate::telemetry::a2a::A2aHop {
            agent: Arc::new(Agent::unknown("a")),
            route: "r".into(),
            target: "b".into(),
            method: "message/send",
            request_id: None,
            skill: None,
            task_id: None,
            context_id: None,
            outcome: "completed",
            denied_by: None,
            error_code: None,
            error: None,
            status: 200,
            stream: false,
            events: 0,
            start: std::time::SystemTime::now(),
            duration: Duration::from_millis(1),
            traceparent: None,
            span_ids: None,
            server_address: None,
            capture: crate::telemetry::Capture::Intercept,
        },
    );
    let exposed = m.encode();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for name in metric_names_in(&text) {
            assert!(
                exposed.contains(&format!("\n{name}")),
                "{}: queries {name}, which tollgate does not emit",
                path.display()
            );
            checked += 1;
        }
    }
    assert!(checked >= 5, "no dashboard queries found in {}", dir.display());
}

/// Metric identifiers in PromQL expressions: `tollgate_*` and `gen_ai_*` names.
fn metric_names_in(json: &str) -> Vec<String> {
    let mut out = Vec::new();
    for prefix in ["tollgate_", "gen_ai_"] {
        let mut rest = json;
        while let Some(i) = rest.find(prefix) {
            let tail = &rest[i..];
            let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            let name = &tail[..end];
            // A series name is followed by a selector or a range; label names (in `by (...)`
            // or matchers) are followed by `,`, `)` or `=`.
            if matches!(tail[end..].chars().next(), Some('{') | Some('[')) {
                out.push(name.to_string());
            }
            rest = &tail[end..];
        }
    }
    out
}
