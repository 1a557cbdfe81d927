//! Gemini and Azure OpenAI providers over HTTP/2 with TLS: the provider-specific addressing
//! (model in the Gemini path, Azure deployment and `api-version`), key placement (`key=` query,
//! `api-key` header) and exact usage, through the same captured virtual address scheme as
//! `routing.rs`.

use std::time::Duration;

use serde_json::{json, Value};
use tollgate_e2e::certs::TestCa;
use tollgate_e2e::gemini::{self, GenerateRequest};
use tollgate_e2e::openai::{self, ChatRequest};
use tollgate_e2e::{anyhow, ensure, Result};

use super::routing::*;
use super::{assert_line_tokens, last_request, Gw};

/// The `usageMetadata` of a Gemini response body as the client received it: the JSON object,
/// or the last `data:` chunk of an SSE stream (usage is cumulative); and the number of chunks.
fn gemini_usage(body: &str, sse: bool) -> Result<(Value, usize)> {
    if !sse {
        let v: Value = serde_json::from_str(body).map_err(|e| anyhow!("Gemini body is not JSON ({e}): {body}"))?;
        return Ok((v["usageMetadata"].clone(), 1));
    }
    let chunks: Vec<Value> = body
        .split("\r\n\r\n")
        .flat_map(|ev| ev.split("\n\n"))
        .filter_map(|ev| ev.trim().strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| anyhow!("Gemini SSE chunk is not JSON ({e}): {body}"))?;
    let last = chunks.last().ok_or_else(|| anyhow!("no SSE chunk in {body:?}"))?;
    Ok((last["usageMetadata"].clone(), chunks.len()))
}

/// Gemini (`kind: gemini`) and Azure OpenAI (`kind: azure_openai`) providers behind TLS mocks
/// that tollgate trusts through `tls.extra_roots`, reached over HTTP/2. With curl from the
/// agent's cgroup and placeholder credentials:
/// * Gemini `generateContent` and `streamGenerateContent?alt=sse`: the provider sees HTTP/2.0,
///   tollgate's key as `?key=` (no placeholder, no `x-goog-api-key`), and the access log's tokens
///   equal the `usageMetadata` the client received (prompt; candidates + thoughts) and the
///   mock's formula for the recorded request;
/// * Azure chat completions at `/openai/deployments/whatever/...`: the provider sees the target's
///   deployment `prod-deploy`, `api-key` = tollgate's key, `api-version`, HTTP/2.0, and the
///   usage is exact.
///
/// Neither key appears in tollgate's stdout, stderr or `/metrics` (the Gemini key travels in a
/// URL, where it is easily logged).
#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn g8_gemini_azure_over_http2() -> Result<()> {
    let gw = Gw::new("g8-agent", 8117)?;
    let az_vip = vip(8118);
    let tag = random_hex();
    let (gem_key, az_key) = (format!("AIza-g8-{tag}"), format!("az-g8-{tag}"));
    let ca = TestCa::new(gw.e.scratch.path(), "g8", "tollgate e2e g8 provider CA")?;
    let cert = ca.issue(gw.e.scratch.path(), "g8-provider", &["localhost", "127.0.0.1"])?;
    let (cert_path, key_path) = (cert.cert_path.to_string_lossy(), cert.key_path.to_string_lossy());
    let tls = |name: &str, key: &str| {
        gw.mock(name, &[key], &["--tls-listen", "127.0.0.1:0", "--cert", &cert_path, "--key", &key_path])
    };
    let gm = tls("gemini", &gem_key)?;
    let am = tls("azure", &az_key)?;
    let (kg, ka) = (gw.key_file("gemini", &gem_key)?, gw.key_file("azure", &az_key)?);
    let t = gateway(
        &gw,
        json!([
            {"name": "gemini", "kind": "gemini", "base_url": format!("https://127.0.0.1:{}", gm.https[0].port()),
             "credentials": {"file": kg}},
            {"name": "azure", "kind": "azure_openai", "base_url": format!("https://127.0.0.1:{}", am.https[0].port()),
             "credentials": {"file": ka}},
        ]),
        &[
            ("gem", gw.vip, json!({"targets": [{"provider": "gemini"}]})),
            ("az", az_vip, json!({"targets": [{"provider": "azure", "model": "prod-deploy"}]})),
        ],
        json!({"tls": {"extra_roots": [ca.cert_path]}}),
    )?;

    // --- Gemini, whole and streamed.
    let model = "gemini-2.0-flash";
    let req = json!({
        "systemInstruction": {"parts": [{"text": "You answer briefly."}]},
        "contents": [{"role": "user", "parts": [{"text": "Name three rivers of Europe."}]}],
        "generationConfig": {"maxOutputTokens": 64},
    });
    for (i, (method, query, sse)) in
        [("generateContent", "", false), ("streamGenerateContent", "?alt=sse", true)].into_iter().enumerate()
    {
        let url = gw.url(&format!("/v1beta/models/{model}:{method}{query}"));
        let r = curl_post(&gw, &url, &["x-goog-api-key: placeholder"], &req)?;
        ensure!(r.exit == 0 && r.http_code == 200, "Gemini {method}: {}", r.describe());
        let rec = last_request(&gm)?;
        ensure!(
            rec["path"] == json!(format!("/v1beta/models/{model}:{method}")),
            "Gemini {method}: provider path {rec}"
        );
        ensure!(rec["version"] == json!("HTTP/2.0"), "Gemini {method}: provider saw {}, want HTTP/2.0", rec["version"]);
        let q = rec["query"].as_str().unwrap_or("");
        let params: Vec<&str> = q.split('&').collect();
        ensure!(
            params.contains(&format!("key={gem_key}").as_str()),
            "Gemini {method}: query {q:?} lacks tollgate's key"
        );
        ensure!(!sse || params.contains(&"alt=sse"), "Gemini {method}: query {q:?} lost alt=sse");
        ensure!(
            !rec.to_string().contains("placeholder") && rec["headers"].get("x-goog-api-key").is_none(),
            "Gemini {method}: the agent's placeholder reached the provider: {rec}"
        );
        let parsed = GenerateRequest::from_json(model, &rec["body_json"]).map_err(|e| anyhow!("{e}: {rec}"))?;
        let reply = gemini::reply_for(&parsed);
        let (usage, chunks) = gemini_usage(&r.text(), sse)?;
        let (prompt, candidates, thoughts) = (
            usage["promptTokenCount"].as_u64().unwrap_or(u64::MAX),
            usage["candidatesTokenCount"].as_u64().unwrap_or(u64::MAX),
            usage["thoughtsTokenCount"].as_u64().unwrap_or(u64::MAX),
        );
        ensure!(
            (prompt, candidates, thoughts) == (reply.prompt_tokens, reply.candidates_tokens, reply.thoughts_tokens),
            "Gemini {method}: client got usageMetadata {usage}, the mock's formula gives prompt={} candidates={} thoughts={}",
            reply.prompt_tokens,
            reply.candidates_tokens,
            reply.thoughts_tokens
        );
        if sse {
            ensure!(
                chunks == reply.words.len(),
                "Gemini stream: client got {chunks} chunks, the mock sent {}",
                reply.words.len()
            );
        }
        let line = nth_line(&t, "gem", i + 1)?;
        assert_served(&line, "gemini", 1, 200)?;
        assert_line_tokens(&line, prompt, candidates + thoughts)?;
        ensure!(line["stream"] == json!(sse), "Gemini {method}: access log stream flag: {line}");
    }
    ensure!(
        (gm.counter("gemini_generate")?, gm.counter("gemini_stream")?, gm.counter("http2_requests")?) == (1, 1, 2),
        "Gemini mock stats: {}",
        gm.stats(None)?
    );

    // --- Azure OpenAI: the deployment is the target's model.
    let body =
        json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello Azure"}]});
    let url = format!("http://{az_vip}/openai/deployments/whatever/chat/completions?api-version=2024-10-21");
    let r = curl_post(&gw, &url, &["api-key: placeholder"], &body)?;
    ensure!(r.exit == 0 && r.http_code == 200, "Azure chat: {}", r.describe());
    let rec = last_request(&am)?;
    ensure!(
        rec["path"] == json!("/openai/deployments/prod-deploy/chat/completions"),
        "Azure: provider path {}, want the target's deployment prod-deploy",
        rec["path"]
    );
    ensure!(rec["version"] == json!("HTTP/2.0"), "Azure: provider saw {}, want HTTP/2.0", rec["version"]);
    ensure!(rec["headers"]["api-key"] == json!(az_key), "Azure: provider saw api-key {}", rec["headers"]["api-key"]);
    ensure!(!rec.to_string().contains("placeholder"), "Azure: the agent's placeholder reached the provider: {rec}");
    let q = rec["query"].as_str().unwrap_or("");
    ensure!(q.split('&').any(|p| p == "api-version=2024-10-21"), "Azure: query {q:?} lacks api-version");
    let mut sent = rec["body_json"].clone();
    if sent.get("model").is_none() {
        // The mock answers for the deployment when the body names no model.
        sent["model"] = json!("prod-deploy");
    }
    let reply = openai::reply_for(&ChatRequest::from_json(&sent).map_err(|e| anyhow!("{e}: {rec}"))?);
    let got: Value =
        serde_json::from_slice(&r.body).map_err(|e| anyhow!("Azure body is not JSON ({e}): {}", r.text()))?;
    ensure!(
        got["usage"]["prompt_tokens"] == json!(reply.prompt_tokens)
            && got["usage"]["completion_tokens"] == json!(reply.completion_tokens)
            && got["choices"][0]["message"]["content"] == json!(reply.content),
        "Azure: client got {got}, the mock's formula gives prompt={} completion={}",
        reply.prompt_tokens,
        reply.completion_tokens
    );
    let line = nth_line(&t, "az", 1)?;
    assert_served(&line, "azure", 1, 200)?;
    assert_line_tokens(&line, reply.prompt_tokens, reply.completion_tokens)?;
    ensure!(am.counter("azure_chat")? == 1, "Azure mock stats: {}", am.stats(None)?);

    // --- No key in what tollgate writes.
    let (st, metrics) = tollgate_e2e::http_get(t.admin, "/metrics", Duration::from_secs(5))?;
    ensure!(st == 200, "/metrics: HTTP {st}");
    for (what, text) in
        [("stdout", t.stdout_lines().join("\n")), ("stderr", t.stderr_tail(1_000_000)), ("/metrics", metrics)]
    {
        ensure!(!text.contains(&tag), "tollgate's {what} contains a provider key:\n{text}");
    }
    Ok(())
}
