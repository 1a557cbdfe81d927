//! The mock upstream on its own (no tollgate): the unmodified Python SDKs must parse everything it
//! sends, the numbers they report must equal the mock's own formulas (`tollgate_e2e::{openai,
//! anthropic, gemini}`), and the control API (faults, request log, stats), auth shapes and HTTP/2
//! must behave as the scenarios rely on.
//!
//! No root needed: each test starts its own `mock-llm` on an ephemeral loopback port. The SDK tests
//! need the venv (`cargo xtask setup`).

use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::certs::TestCa;
use tollgate_e2e::client::{curl, python, venv_python, CurlOut};
use tollgate_e2e::mock::MockLlm;
use tollgate_e2e::openai::embeddings::{self as emb, CompletionRequest, EmbeddingsRequest};
use tollgate_e2e::openai::responses::{self, ResponsesRequest};
use tollgate_e2e::openai::{self, ChatRequest};
use tollgate_e2e::{anthropic, bail, ensure, gemini, Context, Result};

const PROMPT: &str = "What is the weather in Paris?";

fn mock(extra: &[&str]) -> Result<MockLlm> {
    let mut args = vec!["--listen".to_string(), "127.0.0.1:0".to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    MockLlm::start(std::path::Path::new(env!("CARGO_BIN_EXE_mock-llm")), &args)
}

fn need_venv() -> Result<()> {
    ensure!(venv_python().exists(), "{} missing: run `cargo xtask setup` first", venv_python().display());
    Ok(())
}

/// Run a client script; its one JSON line, or an error with its stderr.
fn run_client(script: &str, args: &[&str]) -> Result<Value> {
    let out: Output = python(None, None, script, args, &[])?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{script} {args:?} failed: {}\n{text}{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_str(text.trim()).with_context(|| format!("{script} output {text:?}"))
}

/// The body of the last recorded request for `api` (a stats key such as `openai_chat`).
fn last_body(m: &MockLlm, api: &str) -> Result<Value> {
    let reqs = m.requests()?;
    let r = reqs.iter().rev().find(|r| r["api"] == api).with_context(|| format!("no {api} request recorded"))?;
    Ok(r["body_json"].clone())
}

fn post(url: &str, headers: &[&str], body: &Value) -> Result<CurlOut> {
    let data = body.to_string();
    let mut args = vec!["-H", "Content-Type: application/json"];
    for h in headers {
        args.extend(["-H", h]);
    }
    args.extend(["--data-binary", data.as_str(), url]);
    curl(None, None, &args)
}

fn body_json(r: &CurlOut) -> Result<Value> {
    serde_json::from_slice(&r.body).with_context(|| format!("not JSON: {}", r.describe()))
}

// -------------------------------------------------------------------------------------------
// SDKs against the mock
// -------------------------------------------------------------------------------------------

#[test]
fn openai_chat_sdk_tools_text_and_usage() -> Result<()> {
    need_venv()?;
    let m = mock(&[])?;
    let base = format!("http://{}/v1", m.http[0]);
    for stream in [false, true] {
        let s: &[&str] = if stream { &["--stream"] } else { &[] };
        // Tool call, then the tool result echoed back.
        let v = run_client("openai_tools.py", &[&["--base-url", &base, "--roundtrip"], s].concat())?;
        let want = openai::reply_for(&ChatRequest::with_weather_tool("gpt-4o-mini", PROMPT));
        let call = want.tool_call.as_ref().expect("tool call");
        ensure!(v["finish_reason"] == "tool_calls", "stream={stream}: {v}");
        ensure!(
            v["tool_calls"] == json!([{"id": call.id, "name": "get_weather", "arguments": call.arguments}]),
            "stream={stream}: tool_calls {} want {call:?}",
            v["tool_calls"]
        );
        ensure!(v["content"].is_null(), "tool-call content {}", v["content"]);
        check_chat_usage(&v["usage"], &want)?;
        if stream {
            // role chunk + one per argument fragment + finish + usage chunk.
            ensure!(v["chunks"] == json!(call.fragments.len() + 3), "chunks {} for {call:?}", v["chunks"]);
            ensure!(call.fragments.len() >= 3, "arguments must stream in several fragments: {call:?}");
        }
        let f = &v["final"];
        let echo = openai::reply_for(&ChatRequest::from_json(&last_body(&m, "openai_chat")?).map_err(anyhow_msg)?);
        ensure!(f["content"] == json!(echo.content), "echo {} want {:?}", f["content"], echo.content);
        let result = f["tool_result"].as_str().unwrap_or_default();
        ensure!(echo.content == openai::tool_echo_words(result).concat(), "echo text {:?}", echo.content);
        ensure!(f["finish_reason"] == "stop", "final {f}");
        check_chat_usage(&f["usage"], &echo)?;

        // Plain text, no tools.
        let v = run_client("openai_tools.py", &[&["--base-url", &base, "--no-tools"], s].concat())?;
        let want = openai::reply_for(&ChatRequest::simple("gpt-4o-mini", PROMPT));
        ensure!(v["content"] == json!(want.content) && v["finish_reason"] == "stop", "text reply {v}");
        check_chat_usage(&v["usage"], &want)?;
    }
    ensure!(m.counter("openai_chat")? == 6 && m.counter("chat_requests")? == 6, "{}", m.stats(None)?);
    ensure!(m.counter("chat_stream_usage_requests")? == 3, "{}", m.stats(None)?);
    Ok(())
}

fn anyhow_msg(m: String) -> anyhow::Error {
    anyhow::anyhow!(m)
}

fn check_chat_usage(u: &Value, r: &openai::Reply) -> Result<()> {
    let want = json!({
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.total_tokens(),
        "cached": r.cached_tokens,
        "reasoning": r.reasoning_tokens,
    });
    let got = json!({
        "prompt_tokens": u["prompt_tokens"],
        "completion_tokens": u["completion_tokens"],
        "total_tokens": u["total_tokens"],
        "cached": u["prompt_tokens_details"]["cached_tokens"],
        "reasoning": u["completion_tokens_details"]["reasoning_tokens"],
    });
    ensure!(got == want, "usage {got} want {want}");
    Ok(())
}

#[test]
fn openai_chat_sdk_legacy_client_still_works() -> Result<()> {
    need_venv()?;
    let m = mock(&[])?;
    let base = format!("http://{}/v1", m.http[0]);
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "legacy"}]}).to_string();
    let want = openai::reply_for(&ChatRequest::simple("gpt-4o-mini", "legacy"));
    for stream in [false, true] {
        let mut args = vec!["--request", body.as_str()];
        if stream {
            args.push("--stream");
        }
        let out =
            python(None, None, "openai_chat.py", &args, &[("OPENAI_API_KEY", "sk-x"), ("OPENAI_BASE_URL", &base)])?;
        ensure!(out.status.success(), "openai_chat.py: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout)?;
        ensure!(v["content"] == json!(want.content) && v["id"] == json!(want.id), "{v}");
    }
    Ok(())
}

#[test]
fn openai_responses_embeddings_completions_sdk() -> Result<()> {
    need_venv()?;
    let m = mock(&[])?;
    let base = format!("http://{}/v1", m.http[0]);
    for stream in [false, true] {
        let s: &[&str] = if stream { &["--stream"] } else { &[] };
        let v =
            run_client("openai_tools.py", &[&["--base-url", &base, "--api", "responses", "--roundtrip"], s].concat())?;
        let tools =
            json!([{"type": "function", "name": "get_weather", "parameters": openai::Tool::get_weather().parameters}]);
        let q = ResponsesRequest::from_json(
            &json!({"model": "gpt-4o-mini", "input": [{"role": "user", "content": PROMPT}], "tools": tools}),
        )
        .map_err(anyhow_msg)?;
        let want = responses::reply_for(&q);
        let call = want.tool_call.as_ref().expect("call");
        ensure!(v["tool_calls"] == json!([{"id": call.id, "name": "get_weather", "arguments": call.arguments}]), "{v}");
        check_responses_usage(&v["usage"], &want)?;
        let echo = responses::reply_for(
            &ResponsesRequest::from_json(&last_body(&m, "openai_responses")?).map_err(anyhow_msg)?,
        );
        ensure!(v["final"]["content"] == json!(echo.text), "final {} want {:?}", v["final"], echo.text);
        check_responses_usage(&v["final"]["usage"], &echo)?;

        let v =
            run_client("openai_tools.py", &[&["--base-url", &base, "--api", "responses", "--no-tools"], s].concat())?;
        let want = responses::reply_for(
            &ResponsesRequest::from_json(&last_body(&m, "openai_responses")?).map_err(anyhow_msg)?,
        );
        ensure!(
            v["content"] == json!(want.text) && v["id"] == json!(want.id) && v["finish_reason"] == "completed",
            "{v}"
        );
        check_responses_usage(&v["usage"], &want)?;
        if stream {
            let ev = &v["events"];
            ensure!(
                ev["response.output_text.delta"] == json!(want.words.len()) && ev["response.completed"] == 1,
                "{ev}"
            );
        }

        let v = run_client(
            "openai_tools.py",
            &[&["--base-url", &base, "--api", "completions", "--max-tokens", "6"], s].concat(),
        )?;
        let want = emb::completion_reply(
            &CompletionRequest::from_json(&last_body(&m, "openai_completions")?).map_err(anyhow_msg)?,
        );
        ensure!(v["content"] == json!(want.text) && want.words.len() == 6, "{v}");
        let u = &v["usage"];
        ensure!(u["prompt_tokens"] == json!(want.prompt_tokens) && u["completion_tokens"] == 6, "{u}");
    }
    let mut vectors = Vec::new();
    for enc in ["float", "base64"] {
        let v = run_client("openai_tools.py", &["--base-url", &base, "--api", "embeddings", "--encoding", enc])?;
        let q = EmbeddingsRequest::from_json(&last_body(&m, "openai_embeddings")?).map_err(anyhow_msg)?;
        ensure!(v["usage"]["prompt_tokens"] == json!(emb::embeddings_usage(&q)), "{v}");
        let want: Vec<f64> = emb::embedding_vector(&q, 1).into_iter().map(f64::from).collect();
        ensure!(v["vectors"][1] == json!(want), "{enc}: {} want {want:?}", v["vectors"][1]);
        vectors.push(v["vectors"].clone());
    }
    ensure!(vectors[0] == vectors[1], "float and base64 embeddings differ");
    Ok(())
}

fn check_responses_usage(u: &Value, r: &responses::ResponsesReply) -> Result<()> {
    let want = json!({
        "input_tokens": r.input_tokens,
        "input_tokens_details": {
            "cached_tokens": r.cached_tokens,
            "cache_write_tokens": 0,
            "cache_write_tokens_details": null
        },
        "output_tokens": r.output_tokens,
        "output_tokens_details": {"reasoning_tokens": r.reasoning_tokens},
        "total_tokens": r.total_tokens(),
    });
    ensure!(*u == want, "responses usage {u} want {want}");
    Ok(())
}

#[test]
fn anthropic_sdk_messages_tools_stream_and_count() -> Result<()> {
    need_venv()?;
    let m = mock(&["--require-key", "sk-ant-good"])?;
    let base = format!("http://{}", m.http[0]);
    let common = ["--base-url", base.as_str(), "--api-key", "sk-ant-good"];
    for stream in [false, true] {
        let s: &[&str] = if stream { &["--stream"] } else { &[] };
        let v = run_client(
            "anthropic_messages.py",
            &[&common[..], &["--tools", "--roundtrip", "--count-tokens"], s].concat(),
        )?;
        let first = m.requests()?.into_iter().find(|r| r["api"] == "anthropic_messages").context("no request")?;
        let q = anthropic::MessagesRequest::from_json(&first["body_json"], false).map_err(anyhow_msg)?;
        let want = anthropic::reply_for(&q);
        let tu = want.tool_use.as_ref().expect("tool_use");
        ensure!(v["tool_use"] == json!([{"id": tu.id, "name": "get_weather", "input": tu.input}]), "{v}");
        ensure!(v["stop_reason"] == "tool_use" && v["text"] == "", "{v}");
        check_anthropic(&v, &want, stream)?;
        ensure!(
            v["count_tokens"] == json!(q.input_total()),
            "count_tokens {} want {}",
            v["count_tokens"],
            q.input_total()
        );
        let f = &v["final"];
        let echo = anthropic::reply_for(
            &anthropic::MessagesRequest::from_json(&last_body(&m, "anthropic_messages")?, false).map_err(anyhow_msg)?,
        );
        ensure!(f["text"] == json!(echo.text) && f["stop_reason"] == "end_turn", "final {f}");
        ensure!(
            echo.text == openai::tool_echo_words(f["tool_result"].as_str().unwrap_or("")).concat(),
            "{}",
            echo.text
        );
        check_anthropic(f, &echo, stream)?;

        let v = run_client("anthropic_messages.py", &[&common[..], &["--prompt", "hello there"], s].concat())?;
        let want = anthropic::reply_for(&anthropic::MessagesRequest::simple("claude-sonnet-4-6", "hello there", 1024));
        ensure!(v["text"] == json!(want.text) && v["id"] == json!(want.id) && v["stop_reason"] == "end_turn", "{v}");
        check_anthropic(&v, &want, stream)?;
        m.clear_requests()?;
    }
    // The SDK sent its key as it does (Bearer in anthropic 2.12), and it was accepted.
    ensure!(m.counter("unauthorized")? == 0 && m.counter("anthropic_count_tokens")? == 2, "{}", m.stats(None)?);
    let bad = python(None, None, "anthropic_messages.py", &["--base-url", &base, "--api-key", "sk-ant-bad"], &[])?;
    let err = String::from_utf8_lossy(&bad.stderr);
    ensure!(
        !bad.status.success() && err.contains("AuthenticationError") && err.contains("authentication_error"),
        "{err}"
    );
    Ok(())
}

fn check_anthropic(v: &Value, r: &anthropic::Reply, stream: bool) -> Result<()> {
    let want = json!({
        "input_tokens": r.input_tokens,
        "output_tokens": r.output_tokens,
        "cache_read_input_tokens": r.cache_read_input_tokens,
        "cache_creation_input_tokens": r.cache_creation_input_tokens,
    });
    ensure!(v["usage"] == want, "usage {} want {want}", v["usage"]);
    if stream {
        let deltas = r.tool_use.as_ref().map(|t| t.fragments.len()).unwrap_or(r.words.len());
        let ev = &v["events"];
        for (k, n) in [("message_start", 1), ("content_block_start", 1), ("content_block_delta", deltas)] {
            ensure!(ev[k] == json!(n), "events {ev}: want {k}={n}");
        }
        for k in ["content_block_stop", "message_delta", "message_stop"] {
            ensure!(ev[k] == 1, "events {ev}: want {k}=1");
        }
    }
    Ok(())
}

// -------------------------------------------------------------------------------------------
// Wire-level checks (curl)
// -------------------------------------------------------------------------------------------

/// `data:` payloads of an SSE body, whatever the line ending; with `event:` names when present.
fn sse(body: &[u8]) -> Vec<(Option<String>, Value)> {
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .filter_map(|b| {
            let ev = b.lines().find_map(|l| l.strip_prefix("event: ")).map(str::to_string);
            let data = b.lines().find_map(|l| l.strip_prefix("data: "))?;
            serde_json::from_str(data).ok().map(|d| (ev, d))
        })
        .collect()
}

#[test]
fn gemini_generate_stream_and_count_tokens() -> Result<()> {
    let m = mock(&["--require-key", "g-key"])?;
    let base = format!("http://{}/v1beta/models/gemini-2.5-flash", m.http[0]);
    let body = json!({"contents": [{"role": "user", "parts": [{"text": "Tell me about gateways"}]}],
        "systemInstruction": {"parts": [{"text": "Be brief"}]}});
    let q = gemini::GenerateRequest::from_json("gemini-2.5-flash", &body).map_err(anyhow_msg)?;
    let want = gemini::reply_for(&q);
    let usage = json!({
        "promptTokenCount": want.prompt_tokens, "candidatesTokenCount": want.candidates_tokens,
        "totalTokenCount": want.total_tokens(), "cachedContentTokenCount": want.cached_tokens,
        "thoughtsTokenCount": want.thoughts_tokens,
    });
    let pick = |u: &Value| {
        json!({"promptTokenCount": u["promptTokenCount"], "candidatesTokenCount": u["candidatesTokenCount"],
            "totalTokenCount": u["totalTokenCount"], "cachedContentTokenCount": u["cachedContentTokenCount"],
            "thoughtsTokenCount": u["thoughtsTokenCount"]})
    };

    let r = post(&format!("{base}:generateContent"), &["x-goog-api-key: g-key"], &body)?;
    ensure!(r.http_code == 200, "{}", r.describe());
    let v = body_json(&r)?;
    ensure!(v["candidates"][0]["content"]["parts"][0]["text"] == json!(want.text), "{v}");
    ensure!(v["candidates"][0]["finishReason"] == "STOP" && pick(&v["usageMetadata"]) == usage, "{v}");

    // SSE via ?key= auth: CRLF-framed data-only events, cumulative usage, the last one final.
    let r = post(&format!("{base}:streamGenerateContent?alt=sse&key=g-key"), &[], &body)?;
    ensure!(r.http_code == 200 && r.header("content-type") == Some("text/event-stream"), "{}", r.describe());
    ensure!(r.text().contains("\r\n\r\n") && !r.text().contains("event:"), "framing: {:?}", r.text());
    let chunks = sse(&r.body);
    ensure!(chunks.len() == want.words.len() && chunks.len() > 1, "{} chunks", chunks.len());
    let text: String =
        chunks.iter().map(|(_, c)| c["candidates"][0]["content"]["parts"][0]["text"].as_str().unwrap_or("")).collect();
    ensure!(text == want.text, "streamed text {text:?} want {:?}", want.text);
    let last = &chunks.last().expect("chunk").1;
    ensure!(pick(&last["usageMetadata"]) == usage && last["candidates"][0]["finishReason"] == "STOP", "{last}");
    ensure!(chunks[0].1["usageMetadata"]["candidatesTokenCount"] == 1, "first chunk {}", chunks[0].1);

    // Without alt=sse: one JSON array.
    let r = post(&format!("{base}:streamGenerateContent"), &["x-goog-api-key: g-key"], &body)?;
    let arr = body_json(&r)?;
    ensure!(arr.as_array().map(Vec::len) == Some(want.words.len()), "array {arr}");

    let r = post(&format!("{base}:countTokens"), &["x-goog-api-key: g-key"], &body)?;
    ensure!(body_json(&r)?["totalTokens"] == json!(q.prompt_tokens()), "{}", r.describe());
    for (k, n) in [("gemini_generate", 1), ("gemini_stream", 2), ("gemini_count_tokens", 1), ("streams", 2)] {
        ensure!(m.counter(k)? == n, "{k}: {}", m.stats(None)?);
    }
    Ok(())
}

#[test]
fn responses_sse_wire_format() -> Result<()> {
    let m = mock(&[])?;
    let body = json!({"model": "gpt-4.1", "input": "stream please", "stream": true, "instructions": "terse"});
    let r = post(&format!("http://{}/v1/responses", m.http[0]), &["Authorization: Bearer sk-1"], &body)?;
    ensure!(r.http_code == 200, "{}", r.describe());
    let want = responses::reply_for(&ResponsesRequest::from_json(&body).map_err(anyhow_msg)?);
    let ev = sse(&r.body);
    let types: Vec<&str> = ev.iter().map(|(_, d)| d["type"].as_str().unwrap_or("")).collect();
    let mut expect =
        vec!["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"];
    expect.extend(std::iter::repeat_n("response.output_text.delta", want.words.len()));
    expect.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    ensure!(types == expect, "event types {types:?}");
    for (i, (name, d)) in ev.iter().enumerate() {
        ensure!(name.as_deref() == d["type"].as_str(), "event line {name:?} vs type {}", d["type"]);
        ensure!(d["sequence_number"] == json!(i), "sequence_number {} at {i}", d["sequence_number"]);
    }
    let done = &ev.last().expect("event").1["response"];
    ensure!(done["status"] == "completed" && done["output"][0]["content"][0]["text"] == json!(want.text), "{done}");
    let u = &done["usage"];
    ensure!(
        u["input_tokens"] == json!(want.input_tokens)
            && u["input_tokens_details"]["cached_tokens"] == json!(want.cached_tokens)
            && u["output_tokens_details"]["reasoning_tokens"] == json!(want.reasoning_tokens)
            && u["total_tokens"] == json!(want.total_tokens()),
        "{u}"
    );
    ensure!(ev[0].1["response"]["usage"].is_null() && ev[0].1["response"]["status"] == "in_progress", "{}", ev[0].1);
    Ok(())
}

#[test]
fn faults_then_recovery_and_request_log() -> Result<()> {
    let m = mock(&["--name", "primary"])?;
    let a = m.http[0];
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let url = format!("http://{a}/v1/chat/completions");
    let auth = "Authorization: Bearer sk-1";

    m.set_fault(json!({"status": 503, "count": 2}))?;
    for _ in 0..2 {
        let r = post(&url, &[auth], &chat)?;
        let v = body_json(&r)?;
        ensure!(r.http_code == 503 && v["error"]["type"] == "server_error", "{}", r.describe());
        ensure!(r.header("x-mock-name") == Some("primary"), "{}", r.describe());
    }
    let r = post(&url, &[auth], &chat)?;
    ensure!(r.http_code == 200, "did not recover after count ran out: {}", r.describe());
    ensure!(m.control("GET", "/__mock/fault", None)?.1.is_null(), "fault still installed");

    // 429 in each provider's shape, with retry-after.
    m.set_fault(json!({"status": 429}))?;
    let cases = [
        ("/v1/messages", "x-api-key: k", "/error/type", "rate_limit_error"),
        ("/v1beta/models/g:generateContent", "x-goog-api-key: k", "/error/status", "RESOURCE_EXHAUSTED"),
        ("/openai/deployments/d/chat/completions?api-version=2024-10-21", "api-key: k", "/error/code", "429"),
        ("/v1/chat/completions", auth, "/error/code", "rate_limit_exceeded"),
    ];
    for (path, h, ptr, want) in cases {
        let r = post(&format!("http://{a}{path}"), &[h], &chat)?;
        let v = body_json(&r)?;
        ensure!(r.http_code == 429 && v.pointer(ptr) == Some(&json!(want)), "{path}: {}", r.describe());
        ensure!(r.header("retry-after") == Some("1"), "{path}: no retry-after: {}", r.describe());
    }
    ensure!(
        body_json(&post(&format!("http://{a}/v1/messages"), &["x-api-key: k"], &chat)?)?["type"] == "error",
        "anthropic shape"
    );
    m.clear_fault()?;

    // Delay before the headers: a client timeout fires, the next request is prompt again.
    m.set_fault(json!({"delay_ms": 3000, "count": 1, "path_contains": "/chat/"}))?;
    let t = Instant::now();
    let r = curl(None, None, &["-m", "1", "-H", auth, "--data-binary", &chat.to_string(), &url])?;
    ensure!(r.exit == 28 && t.elapsed() < Duration::from_millis(2500), "expected a curl timeout: {}", r.describe());
    let t = Instant::now();
    let r = post(&url, &[auth], &chat)?;
    ensure!(r.http_code == 200 && t.elapsed() < Duration::from_secs(2), "{}", r.describe());

    let stats = m.stats(None)?;
    ensure!(stats["faults"] == 7 && stats["delayed"] == 1 && stats["name"] == "primary", "{stats}");
    // The timed-out request may or may not have been answered after its delay.
    ensure!(stats["total"] == 10 && stats["openai_chat"].as_u64().is_some_and(|n| n >= 2), "{stats}");

    // The log: lower-cased headers, parsed body, query, protocol, applied fault.
    m.clear_requests()?;
    let r = post(
        &format!("http://{a}/openai/deployments/dep1/chat/completions?api-version=2024-10-21"),
        &["api-key: k", "X-Custom: Yes"],
        &json!({"messages": [{"role": "user", "content": "az"}]}),
    )?;
    ensure!(r.http_code == 200 && body_json(&r)?["model"] == "dep1", "{}", r.describe());
    let log = m.requests()?;
    ensure!(log.len() == 1, "{log:?}");
    let e = &log[0];
    ensure!(e["method"] == "POST" && e["path"] == "/openai/deployments/dep1/chat/completions", "{e}");
    ensure!(e["query"] == "api-version=2024-10-21" && e["version"] == "HTTP/1.1" && e["api"] == "azure_chat", "{e}");
    ensure!(e["headers"]["x-custom"] == "Yes" && e["headers"]["api-key"] == "k", "{e}");
    ensure!(e["body_json"]["messages"][0]["content"] == "az" && e["fault"].is_null(), "{e}");
    Ok(())
}

/// (url, request headers, body, wanted status, JSON pointer into the answer, wanted value there)
type AuthCase<'a> = (String, Vec<&'a str>, &'a Value, u16, &'a str, Value);

#[test]
fn auth_shapes_and_required_headers() -> Result<()> {
    let m = mock(&["--require-key", "k1", "--require-key", "k2", "--name", "authy"])?;
    let a = m.http[0];
    let chat = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let anth = json!({"model": "claude-sonnet-4-6", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]});
    let gem = json!({"contents": [{"parts": [{"text": "hi"}]}]});
    let az = format!("http://{a}/openai/deployments/d/chat/completions?api-version=2024-10-21");
    let oa = format!("http://{a}/v1/chat/completions");
    let an = format!("http://{a}/v1/messages");
    let ge = format!("http://{a}/v1beta/models/gemini-2.5-flash:generateContent");
    let av = "anthropic-version: 2023-06-01";
    let cases: Vec<AuthCase> = vec![
        (oa.clone(), vec![], &chat, 401, "/error/code", json!("invalid_api_key")),
        (oa.clone(), vec!["Authorization: Bearer nope"], &chat, 401, "/error/type", json!("invalid_request_error")),
        (oa.clone(), vec!["Authorization: Bearer k2"], &chat, 200, "/object", json!("chat.completion")),
        (az.clone(), vec!["api-key: nope"], &chat, 401, "/error/code", json!("401")),
        (az.clone(), vec!["Authorization: Bearer k1"], &chat, 401, "/error/code", json!("401")),
        (az.clone(), vec!["api-key: k1"], &chat, 200, "/object", json!("chat.completion")),
        (
            az.replace("?api-version=2024-10-21", ""),
            vec!["api-key: k1"],
            &chat,
            404,
            "/error/message",
            json!("Resource not found"),
        ),
        (an.clone(), vec![av], &anth, 401, "/error/type", json!("authentication_error")),
        (an.clone(), vec![av, "x-api-key: nope"], &anth, 401, "/type", json!("error")),
        (
            an.clone(),
            vec!["x-api-key: k1"],
            &anth,
            400,
            "/error/message",
            json!("anthropic-version: header is required"),
        ),
        (an.clone(), vec![av, "x-api-key: k1"], &anth, 200, "/type", json!("message")),
        (an.clone(), vec![av, "Authorization: Bearer k2"], &anth, 200, "/type", json!("message")),
        (ge.clone(), vec![], &gem, 401, "/error/status", json!("UNAUTHENTICATED")),
        (ge.clone(), vec!["x-goog-api-key: nope"], &gem, 401, "/error/code", json!(401)),
        (format!("{ge}?key=k2"), vec![], &gem, 200, "/candidates/0/index", json!(0)),
        (ge.clone(), vec!["x-goog-api-key: k1"], &gem, 200, "/modelVersion", json!("gemini-2.5-flash")),
    ];
    for (url, hdrs, body, st, ptr, want) in &cases {
        let r = post(url, hdrs, body)?;
        let v = body_json(&r)?;
        ensure!(
            r.http_code == *st && v.pointer(ptr) == Some(want),
            "{url} {hdrs:?}: want {st} {ptr}={want}: {}",
            r.describe()
        );
        ensure!(r.header("x-mock-name") == Some("authy"), "no x-mock-name: {}", r.describe());
    }
    ensure!(m.counter("unauthorized")? == 8, "{}", m.stats(None)?);
    Ok(())
}

#[test]
fn tls_listener_negotiates_h2_and_http11() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new(dir.path(), "wire", "mock wire CA")?;
    let cert = ca.issue(dir.path(), "mock", &["localhost", "127.0.0.1"])?;
    let (c, k) = (cert.cert_path.to_string_lossy().into_owned(), cert.key_path.to_string_lossy().into_owned());
    let m = mock(&["--tls-listen", "127.0.0.1:0", "--cert", &c, "--key", &k])?;
    let url = format!("https://127.0.0.1:{}/v1/chat/completions", m.https[0].port());
    let data = json!({"model": "m", "messages": [{"role": "user", "content": "h2?"}], "stream": true}).to_string();
    let cacert = ca.cert_path.to_string_lossy().into_owned();
    for (flag, want) in [("--http2", "HTTP/2.0"), ("--http1.1", "HTTP/1.1")] {
        m.clear_requests()?;
        let r = curl(
            None,
            None,
            &[flag, "--cacert", &cacert, "-H", "Authorization: Bearer x", "--data-binary", &data, &url],
        )?;
        ensure!(r.exit == 0 && r.http_code == 200, "{flag}: {}", r.describe());
        let events = sse(&r.body);
        ensure!(!events.is_empty() && r.text().ends_with("data: [DONE]\n\n"), "{flag}: {}", r.describe());
        let log = m.requests()?;
        ensure!(log.len() == 1 && log[0]["version"] == want, "{flag}: logged {log:?}");
    }
    // h2 with prior knowledge on a plain listener too (h2c), and the counter.
    let m2 = mock(&[])?;
    let plain = format!("http://{}/v1/chat/completions", m2.http[0]);
    let r = curl(
        None,
        None,
        &["--http2-prior-knowledge", "-H", "Authorization: Bearer x", "--data-binary", &data, &plain],
    )?;
    ensure!(r.http_code == 200 && m2.counter("http2_requests")? == 1, "{}", r.describe());
    ensure!(m.counter("http2_requests")? == 1, "{}", m.stats(None)?);
    Ok(())
}

/// The soak's upstream faults and books: a `reset` fault closes the connection without an answer
/// (and counts in `resets`), and the usage of every chat completion served (not the faulted
/// ones) adds up in `usage_prompt_tokens`/`usage_completion_tokens`, streams with the usage
/// chunk included and streams without it left out.
#[test]
fn reset_fault_and_served_usage() -> Result<()> {
    let m = mock(&[])?;
    let url = format!("http://{}/v1/chat/completions", m.http[0]);
    let auth = "Authorization: Bearer sk-1";
    let plain = ChatRequest::simple("gpt-4o-mini", "count my tokens");
    let mut usage_stream = ChatRequest::simple("gpt-4o-mini", "count my streamed tokens");
    usage_stream.stream = true;
    usage_stream.include_usage = true;
    let mut bare_stream = ChatRequest::simple("gpt-4o-mini", "no usage asked");
    bare_stream.stream = true;

    m.set_fault(json!({"reset": true, "count": 1}))?;
    let r = post(&url, &[auth], &plain.to_json())?;
    // curl 52: the server closed the connection without sending anything.
    ensure!(r.exit == 52 && r.http_code == 0, "reset fault answered: {}", r.describe());
    for req in [&plain, &usage_stream, &bare_stream] {
        let r = post(&url, &[auth], &req.to_json())?;
        ensure!(r.exit == 0 && r.http_code == 200, "{}", r.describe());
    }
    let (p, c) = [&plain, &usage_stream]
        .iter()
        .map(|q| openai::reply_for(q))
        .fold((0, 0), |(p, c), r| (p + r.prompt_tokens, c + r.completion_tokens));
    let s = m.stats(None)?;
    ensure!(s["resets"] == 1 && s["chat_requests"] == 3, "{s}");
    ensure!(s["usage_prompt_tokens"] == p && s["usage_completion_tokens"] == c, "want {p}/{c}: {s}");
    ensure!(m.set_fault(json!({"reset": true, "status": 503})).is_err(), "reset with a status accepted");
    Ok(())
}
