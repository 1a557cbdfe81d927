//! The unmodified SDKs through the gateway: same-API targets for every OpenAI and Anthropic
//! operation, and translation both ways, streaming and not, with tools. Each agent sends a
//! placeholder key; the mock provider accepts only the real key tollgate injects.

use serde_json::{json, Value};
use tollgate_e2e::anthropic::{self as ant, MessagesRequest};
use tollgate_e2e::mock::MockLlm;
use tollgate_e2e::openai::embeddings::{completion_reply, embeddings_usage, CompletionRequest, EmbeddingsRequest};
use tollgate_e2e::openai::responses::{self, ResponsesRequest};
use tollgate_e2e::openai::{self as oa, ChatRequest};
use tollgate_e2e::{anyhow, ensure, Result};

use super::{assert_line_tokens, last_request, llm_lines, Gw};
use crate::support::wait_metric;

/// Expected `(input, output)` for the mock's last recorded request, recomputed with the mock's
/// formulas from the body it received.
fn expected(m: &MockLlm) -> Result<(u64, u64, Value)> {
    let req = last_request(m)?;
    let body = &req["body_json"];
    let api = req["api"].as_str().unwrap_or_default().to_string();
    let bad = |e: String| anyhow!("recorded {api} body does not parse: {e}: {body}");
    let (i, o) = match api.as_str() {
        "openai_chat" | "azure_chat" => {
            let r = oa::reply_for(&ChatRequest::from_json(body).map_err(bad)?);
            (r.prompt_tokens, r.completion_tokens)
        }
        "openai_responses" => {
            let r = responses::reply_for(&ResponsesRequest::from_json(body).map_err(bad)?);
            (r.input_tokens, r.output_tokens)
        }
        "openai_embeddings" => (embeddings_usage(&EmbeddingsRequest::from_json(body).map_err(bad)?), 0),
        "openai_completions" => {
            let r = completion_reply(&CompletionRequest::from_json(body).map_err(bad)?);
            (r.prompt_tokens, r.completion_tokens)
        }
        "anthropic_messages" => {
            let r = ant::reply_for(&MessagesRequest::from_json(body, false).map_err(bad)?);
            (r.input_tokens + r.cache_read_input_tokens + r.cache_creation_input_tokens, r.output_tokens)
        }
        "anthropic_count_tokens" => (MessagesRequest::from_json(body, true).map_err(bad)?.input_total(), 0),
        other => return Err(anyhow!("no formula for recorded api {other:?}: {req}")),
    };
    Ok((i, o, req))
}

/// The mock saw tollgate's key, not the agent's placeholder.
fn assert_injected(req: &Value, header: &str, key: &str) -> Result<()> {
    let got = req["headers"][header].as_str().unwrap_or_default();
    ensure!(got.contains(key), "provider saw {header}: {got:?}, want the injected key");
    ensure!(!req.to_string().contains("placeholder"), "the agent's placeholder key reached the provider: {req}");
    Ok(())
}

/// OpenAI SDK → `openai` provider (base URL override): chat with tools streamed and not (with
/// the tool round trip), Responses streamed and not, embeddings, legacy completions. Every call's
/// tokens in tollgate's access log equal the mock's; totals reach the metrics.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn g1_openai_sdk_all_apis_through_gateway() -> crate::Result<()> {
    let gw = Gw::new("g1-agent", 8101)?;
    let m = gw.mock("openai-mock", &["sk-g1-real"], &["--chunk-delay-ms", "2"])?;
    let key = gw.key_file("g1", "sk-g1-real")?;
    let t = gw.tollgate(
        json!([{"name": "openai", "kind": "openai", "base_url": format!("http://{}/v1", m.http[0]), "credentials": {"file": key}}]),
        json!({"targets": [{"provider": "openai"}]}),
    )?;
    let base = gw.url("/v1");
    let runs: &[&[&str]] = &[
        &["--api", "chat", "--roundtrip"],
        &["--api", "chat", "--roundtrip", "--stream"],
        &["--api", "responses", "--roundtrip"],
        &["--api", "responses", "--stream"],
        &["--api", "embeddings", "--model", "text-embedding-3-small"],
        &["--api", "completions", "--model", "gpt-3.5-turbo-instruct", "--max-tokens", "7"],
        &["--api", "completions", "--model", "gpt-3.5-turbo-instruct", "--stream"],
    ];
    let (mut calls, mut input_sum, mut output_sum) = (0usize, 0u64, 0u64);
    for args in runs {
        let mut a = vec!["--base-url", base.as_str()];
        a.extend_from_slice(args);
        let v = gw.client("openai_tools.py", &a)?;
        // A round trip is two calls; check the mock's last one against tollgate's last line.
        calls += if v.get("final").is_some() { 2 } else { 1 };
        let (i, o, req) = expected(&m)?;
        assert_injected(&req, "authorization", "Bearer sk-g1-real")?;
        let lines = llm_lines(&t, calls)?;
        let line = &lines[calls - 1];
        assert_line_tokens(line, i, o)?;
        ensure!(line["target"] == json!("openai") && line["status"] == json!(200), "access log: {line}");
        ensure!(line.get("request_body").is_none(), "payloads logged without opting in: {line}");
        let last = v.get("final").unwrap_or(&v);
        let u = &last["usage"];
        let sdk_in = u.get("prompt_tokens").or(u.get("input_tokens")).cloned().unwrap_or(Value::Null);
        ensure!(sdk_in == json!(i), "{args:?}: SDK saw usage {u}, mock computed input {i}");
        if args.contains(&"chat") {
            ensure!(v["tool_calls"][0]["name"] == json!("get_weather"), "{args:?}: no tool call: {v}");
            ensure!(v["finish_reason"] == json!("tool_calls"), "{args:?}: {v}");
            let a: Value =
                serde_json::from_str(v["tool_calls"][0]["arguments"].as_str().unwrap_or("")).unwrap_or_default();
            ensure!(a["city"].is_string() && a["unit"].is_string(), "{args:?}: tool arguments {v}");
            ensure!(last["content"].as_str().is_some_and(|c| c.contains("The tool returned")), "{args:?}: {last}");
        }
        for l in &lines[lines.len() - if v.get("final").is_some() { 2 } else { 1 }..] {
            input_sum += l["input_tokens"].as_u64().unwrap_or(0);
            output_sum += l["output_tokens"].as_u64().unwrap_or(0);
        }
    }
    let who = [("agent", "g1-agent"), ("route", "gw")];
    wait_metric(&t, "tollgate_llm_tokens_total", &[&who[..], &[("token_type", "input")]].concat(), input_sum as f64)?;
    wait_metric(&t, "tollgate_llm_tokens_total", &[&who[..], &[("token_type", "output")]].concat(), output_sum as f64)?;
    wait_metric(
        &t,
        "tollgate_upstream_attempts_total",
        &[("route", "gw"), ("target", "openai"), ("outcome", "ok")],
        calls as f64,
    )?;
    Ok(())
}

/// Anthropic SDK → `anthropic` provider: messages with tools streamed and not (round trip), and
/// `count_tokens`. Cached input (reads and writes) is part of tollgate's input count.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn g2_anthropic_sdk_through_gateway() -> crate::Result<()> {
    let gw = Gw::new("g2-agent", 8102)?;
    let m = gw.mock("anthropic-mock", &["sk-ant-g2-real"], &["--chunk-delay-ms", "2"])?;
    let key = gw.key_file("g2", "sk-ant-g2-real")?;
    let t = gw.tollgate(
        json!([{"name": "claude", "kind": "anthropic", "base_url": format!("http://{}", m.http[0]), "credentials": {"file": key}}]),
        json!({"targets": [{"provider": "claude"}]}),
    )?;
    let base = gw.url("");
    let mut calls = anthropic_tool_roundtrips(&gw, &m, &t, &base, ("x-api-key", "sk-ant-g2-real"), None)?;
    let v = gw.client("anthropic_messages.py", &["--base-url", &base, "--count-tokens"])?;
    calls += 2;
    let (i, _, _) = expected(&m)?;
    ensure!(v["count_tokens"] == json!(i), "count_tokens {} vs mock {i}", v["count_tokens"]);
    let lines = llm_lines(&t, calls)?;
    let ct = &lines[calls - 1];
    ensure!(ct["operation"] == json!("count_tokens") && ct["input_tokens"] == json!(i), "count_tokens line {ct}");
    Ok(())
}

/// OpenAI SDK served by an Anthropic target: tools, streaming (every chunk parsed by the SDK's
/// stream helper), finish reasons and usage mapped; tollgate counts the provider's own usage.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn g3_openai_client_anthropic_target() -> crate::Result<()> {
    let gw = Gw::new("g3-agent", 8103)?;
    let m = gw.mock("anthropic-mock", &["sk-ant-g3-real"], &["--chunk-delay-ms", "2"])?;
    let key = gw.key_file("g3", "sk-ant-g3-real")?;
    let t = gw.tollgate(
        json!([{"name": "claude", "kind": "anthropic", "base_url": format!("http://{}", m.http[0]), "credentials": {"file": key}}]),
        json!({"targets": [{"provider": "claude", "model": "claude-sonnet-4-5"}]}),
    )?;
    let base = gw.url("/v1");
    let mut calls = 0;
    for stream in [false, true] {
        let mut a = vec!["--base-url", base.as_str(), "--api", "chat", "--roundtrip"];
        if stream {
            a.push("--stream");
        }
        let v = gw.client("openai_tools.py", &a)?;
        calls += 2;
        ensure!(v["finish_reason"] == json!("tool_calls") && v["tool_calls"][0]["name"] == json!("get_weather"), "{v}");
        let args: Value =
            serde_json::from_str(v["tool_calls"][0]["arguments"].as_str().unwrap_or("")).unwrap_or_default();
        ensure!(args["city"].is_string(), "tool arguments did not survive translation: {v}");
        let fin = &v["final"];
        ensure!(fin["finish_reason"] == json!("stop"), "{fin}");
        ensure!(fin["content"].as_str().is_some_and(|c| c.contains("The tool returned")), "{fin}");
        let (i, o, req) = expected(&m)?;
        ensure!(
            req["body_json"]["model"] == json!("claude-sonnet-4-5"),
            "upstream model {}",
            req["body_json"]["model"]
        );
        ensure!(req["body_json"]["messages"][1]["content"][0]["type"] == json!("tool_use"), "tool history: {req}");
        assert_injected(&req, "x-api-key", "sk-ant-g3-real")?;
        let lines = llm_lines(&t, calls)?;
        assert_line_tokens(&lines[calls - 1], i, o)?;
        let u = &fin["usage"];
        ensure!(
            u["prompt_tokens"] == json!(i) && u["completion_tokens"] == json!(o) && u["total_tokens"] == json!(i + o),
            "translated usage {u}, provider input {i} output {o}"
        );
        if stream {
            ensure!(v["chunks"].as_u64().unwrap_or(0) > 3, "stream had {} chunks", v["chunks"]);
        }
    }
    Ok(())
}

/// Anthropic SDK served by an OpenAI-compatible target, streamed and not, with tools: the
/// SDK's stream accumulator validates every translated event.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn g4_anthropic_client_openai_target() -> crate::Result<()> {
    let gw = Gw::new("g4-agent", 8104)?;
    let m = gw.mock("vllm-mock", &["sk-g4-real"], &["--chunk-delay-ms", "2"])?;
    let key = gw.key_file("g4", "sk-g4-real")?;
    let t = gw.tollgate(
        json!([{"name": "vllm", "kind": "openai_compatible", "base_url": format!("http://{}/v1", m.http[0]), "credentials": {"file": key}}]),
        json!({"targets": [{"provider": "vllm", "model": "llama-3.1-8b"}]}),
    )?;
    anthropic_tool_roundtrips(&gw, &m, &t, &gw.url(""), ("authorization", "Bearer sk-g4-real"), Some("llama-3.1-8b"))?;
    Ok(())
}

/// The Anthropic SDK's tool round trip (tool_use, then tool_result → text), unstreamed then
/// streamed; each call's tokens in tollgate's log and in what the SDK saw equal the provider's.
/// `auth`: header and value the provider must have seen; `model`: the target's model override.
/// Returns the number of calls made.
fn anthropic_tool_roundtrips(
    gw: &Gw,
    m: &MockLlm,
    t: &tollgate_e2e::tollgate::Tollgate,
    base: &str,
    auth: (&str, &str),
    model: Option<&str>,
) -> Result<usize> {
    let mut calls = 0;
    for stream in [false, true] {
        let mut a = vec!["--base-url", base, "--tools", "--roundtrip"];
        if stream {
            a.push("--stream");
        }
        let v = gw.client("anthropic_messages.py", &a)?;
        calls += 2;
        ensure!(v["stop_reason"] == json!("tool_use") && v["tool_use"][0]["name"] == json!("get_weather"), "{v}");
        ensure!(v["tool_use"][0]["input"]["city"].is_string(), "tool input {v}");
        let fin = &v["final"];
        ensure!(
            fin["stop_reason"] == json!("end_turn") && fin["text"].as_str().is_some_and(|s| !s.is_empty()),
            "{fin}"
        );
        let (i, o, req) = expected(m)?;
        if let Some(model) = model {
            ensure!(req["body_json"]["model"] == json!(model), "upstream model {}", req["body_json"]["model"]);
        }
        assert_injected(&req, auth.0, auth.1)?;
        let lines = llm_lines(t, calls)?;
        assert_line_tokens(&lines[calls - 1], i, o)?;
        let u = &fin["usage"];
        let sdk_in = u["input_tokens"].as_u64().unwrap_or(0)
            + u["cache_read_input_tokens"].as_u64().unwrap_or(0)
            + u["cache_creation_input_tokens"].as_u64().unwrap_or(0);
        ensure!(sdk_in == i && u["output_tokens"] == json!(o), "SDK usage {u}, provider input {i} output {o}");
        if stream {
            let ev = &v["events"];
            ensure!(ev["message_start"] == json!(1) && ev["message_stop"] == json!(1), "stream events {ev}");
        }
    }
    Ok(calls)
}

/// An agent configured with tollgate as its base URL (route `listener`, no capture): served by
/// the route's target with the injected key; a path that is no LLM operation gets a 404 in the
/// agent's API shape (Anthropic here), since such a route has no original destination.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn g9_explicit_listener_route() -> crate::Result<()> {
    let gw = Gw::new("g9-agent", 8105)?;
    let m = gw.mock("anthropic-mock", &["sk-ant-g9-real"], &[])?;
    let key = gw.key_file("g9", "sk-ant-g9-real")?;
    let listener = format!("127.0.0.1:{}", tollgate_e2e::free_port("127.0.0.1"));
    let t = gw.e.tollgate(
        json!({
            "providers": [{"name": "claude", "kind": "anthropic", "base_url": format!("http://{}", m.http[0]), "credentials": {"file": key}}],
            // The route injects a key: its listener admits only the agent's (loopback) address.
            "routes": [{"name": "gw", "provider": "anthropic", "listener": listener, "targets": [{"provider": "claude"}],
                "listener_auth": {"allow_cidrs": ["127.0.0.1/32"]}}],
        }),
        None,
    )?;
    let base = format!("http://{listener}");
    let v = gw.client("anthropic_messages.py", &["--base-url", &base, "--stream"])?;
    ensure!(v["stop_reason"] == json!("end_turn"), "{v}");
    let (i, o, req) = expected(&m)?;
    assert_injected(&req, "x-api-key", "sk-ant-g9-real")?;
    let lines = llm_lines(&t, 1)?;
    assert_line_tokens(&lines[0], i, o)?;
    ensure!(lines[0]["agent"]["name"] == json!("direct"), "agent on an explicit listener: {}", lines[0]);
    let r = tollgate_e2e::client::curl(None, None, &["-H", "x-api-key: placeholder", &format!("{base}/v1/models")])?;
    ensure!(r.http_code == 404, "GET /v1/models on a listener route: {}", r.describe());
    let body: Value = serde_json::from_slice(&r.body)?;
    ensure!(
        body["type"] == json!("error")
            && body["error"]["type"] == json!("not_found_error")
            && body["error"]["message"].as_str().is_some_and(|s| s.starts_with("tollgate: ")),
        "404 body is not an Anthropic error: {body}"
    );
    Ok(())
}

/// A stream without usage (route `include_usage: false`, agent did not ask): tollgate counts
/// with its tokenizer and marks the figures estimated, in the access log and the metrics.
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn g10_estimated_usage_when_provider_reports_none() -> crate::Result<()> {
    let gw = Gw::new("g10-agent", 8106)?;
    let m = gw.mock("vllm-mock", &["sk-g10-real"], &[])?;
    let key = gw.key_file("g10", "sk-g10-real")?;
    let t = gw.tollgate(
        json!([{"name": "vllm", "kind": "openai_compatible", "base_url": format!("http://{}/v1", m.http[0]), "credentials": {"file": key}}]),
        json!({"targets": [{"provider": "vllm"}], "include_usage": false, "log_payloads": {"enabled": true, "max_bytes": 48}}),
    )?;
    let req = json!({"model": "llama-3.1-8b", "stream": true,
        "messages": [{"role": "user", "content": "Count the tokens of this sentence without any help from the server."}]});
    let body = gw.e.path("g10.json");
    std::fs::write(&body, req.to_string())?;
    let r = tollgate_e2e::client::curl(
        Some(&gw.g),
        None,
        &[
            "-H",
            "content-type: application/json",
            "--data-binary",
            &format!("@{}", body.display()),
            &gw.url("/v1/chat/completions"),
        ],
    )?;
    ensure!(r.exit == 0 && r.http_code == 200, "{}", r.describe());
    ensure!(!r.text().contains("\"usage\""), "the provider reported usage; nothing to estimate: {}", r.text());
    let rec = last_request(&m)?;
    ensure!(
        rec["body_json"].get("stream_options").is_none(),
        "tollgate asked for usage although the route says not to"
    );
    let want = oa::reply_for(&ChatRequest::from_json(&rec["body_json"]).map_err(|e| anyhow!(e))?);
    let line = &llm_lines(&t, 1)?[0];
    ensure!(line["tokens_estimated"] == json!(true), "not marked estimated: {line}");
    // Payload logging (opted in on this route): the first 48 bytes of each body, cut and flagged.
    let sent = std::fs::read_to_string(&body)?;
    ensure!(
        line["request_body"] == json!(sent[..48]),
        "request_body {} vs sent {:?}",
        line["request_body"],
        &sent[..48]
    );
    let got = r.text();
    ensure!(
        line["response_body"] == json!(got[..48]),
        "response_body {} vs received {:?}",
        line["response_body"],
        &got[..48]
    );
    ensure!(line["payload_truncated"] == json!(true), "{line}");
    let (ei, eo) = (line["input_tokens"].as_u64().unwrap_or(0), line["output_tokens"].as_u64().unwrap_or(0));
    // o200k: the prompt's 15 words are about 15 tokens plus message overhead; the mock's words
    // are one token each.
    ensure!((12..=30).contains(&ei), "estimated input {ei} for a 15-word prompt: {line}");
    let words = want.completion_tokens;
    ensure!(eo.abs_diff(words) <= 2, "estimated output {eo}, the stream carried {words} words: {line}");
    let labels = [("agent", "g10-agent"), ("route", "gw"), ("token_type", "output")];
    wait_metric(&t, "tollgate_llm_estimated_tokens_total", &labels, eo as f64)?;
    Ok(())
}
