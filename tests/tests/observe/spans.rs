//! Traces end to end: an agent in a captured cgroup calls a gateway route with a W3C
//! `traceparent`; tollgate's OTLP/HTTP exporter delivers one `chat <model>` span per call to a
//! real receiver, as a child of the agent's span, and the upstream request carries tollgate's
//! span as its parent. With the collector gone, traffic is unaffected and the lost spans are
//! counted.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_e2e::client::{curl, CurlOut};
use tollgate_e2e::openai::{self, ChatRequest, Reply};
use tollgate_e2e::otlp::{OtlpReceiver, ReceivedSpan};
use tollgate_e2e::tollgate::Tollgate;
use tollgate_e2e::{anyhow, bail, ensure, wait_for, Result};

use crate::gateway::{last_request, Gw};

const AGENT: &str = "o2-agent";
const MODEL: &str = "gpt-4o-mini";
const SPAN_NAME: &str = "chat gpt-4o-mini";
const KEY: &str = "sk-o2-provider";
/// The agent's own trace context, one per call.
const PLAIN_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PLAIN_PARENT: &str = "00f067aa0ba902b7";
const STREAM_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const STREAM_PARENT: &str = "b7ad6b7169203331";
const DROPPED: &str = "tollgate_telemetry_dropped_total";

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn o2_llm_spans_reach_otlp_and_continue_the_agents_trace() -> Result<()> {
    let gw = Gw::new(AGENT, 8121)?;
    let rx = OtlpReceiver::start()?;
    let m = gw.mock("o2-mock", &[KEY], &[])?;
    let key = gw.key_file("o2", KEY)?;
    let t = gw.e.tollgate(
        json!({
            "capture": {
                "scope": [gw.g.rel()],
                "destinations": [{"cidr": format!("{}/32", gw.vip.ip()), "port": gw.vip.port()}],
            },
            "providers": [{"name": "oa", "kind": "openai", "base_url": format!("http://{}/v1", m.http[0]),
                "credentials": {"file": key}}],
            "routes": [{"name": "gw", "match": {"addresses": [gw.vip.to_string()]}, "targets": [{"provider": "oa"}]}],
            "agents": [{"name": AGENT, "match": {"cgroup": gw.g.rel()}}],
            "telemetry": {"otlp": {"endpoint": rx.endpoint(), "protocol": "http_protobuf", "max_queue": 64, "traces": true}},
        }),
        None,
    )?;

    // One plain and one streamed call, each continuing its own agent trace.
    let mut upstream = Vec::new();
    for (trace, parent, stream) in [(PLAIN_TRACE, PLAIN_PARENT, false), (STREAM_TRACE, STREAM_PARENT, true)] {
        let tp = format!("00-{trace}-{parent}-01");
        let r = chat(
            &gw,
            &format!("o2 {} call: tell me about tracing", if stream { "streamed" } else { "plain" }),
            stream,
            Some(&tp),
        )?;
        ensure!(r.exit == 0 && r.http_code == 200, "call with traceparent {tp}: {}", r.describe());
        let rec = last_request(&m)?;
        let want = openai::reply_for(&ChatRequest::from_json(&rec["body_json"]).map_err(|e| anyhow!(e))?);
        check_client_reply(&r, &want, stream)?;
        let sent = rec["headers"]["traceparent"]
            .as_str()
            .ok_or_else(|| anyhow!("the upstream request carried no traceparent: {rec}"))?
            .to_string();
        upstream.push((trace, parent, stream, want, sent));
    }

    // Both spans reach the collector (batched: the SDK exports every few seconds).
    let spans = rx
        .wait_spans(Duration::from_secs(15), |s| {
            [PLAIN_TRACE, STREAM_TRACE].iter().all(|tr| s.iter().any(|x| x.trace_id == *tr && x.name == SPAN_NAME))
        })
        .ok_or_else(|| {
            anyhow!(
                "spans of both calls did not reach the receiver in 15 s; got {:#?}\nrejected: {:?}\ntollgate stderr:\n{}",
                rx.spans(),
                rx.rejected(),
                t.stderr_tail(30)
            )
        })?;
    ensure!(rx.rejected().is_empty(), "the receiver refused exports: {:?}", rx.rejected());
    for (trace, parent, stream, want, sent) in &upstream {
        let mine: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.trace_id == *trace).collect();
        ensure!(mine.len() == 1, "want exactly one span in trace {trace}, got {mine:#?}");
        let s = mine[0];
        ensure!(s.name == SPAN_NAME, "span name {:?}, want {SPAN_NAME:?}", s.name);
        ensure!(
            s.parent_span_id == *parent,
            "span of trace {trace} has parent {:?}, the agent's span is {parent}",
            s.parent_span_id
        );
        ensure!(
            s.span_id.len() == 16 && s.span_id != *parent && s.span_id != "0000000000000000",
            "span id {:?}",
            s.span_id
        );
        let want_attrs = [
            ("gen_ai.agent.name", AGENT.to_string()),
            ("gen_ai.operation.name", "chat".to_string()),
            ("gen_ai.provider.name", "openai".to_string()),
            ("gen_ai.request.model", MODEL.to_string()),
            ("gen_ai.usage.input_tokens", want.prompt_tokens.to_string()),
            ("gen_ai.usage.output_tokens", want.completion_tokens.to_string()),
            ("tollgate.usage.estimated", "false".to_string()),
            ("tollgate.stream", stream.to_string()),
            ("tollgate.route", "gw".to_string()),
            ("tollgate.target", "oa".to_string()),
            ("http.response.status_code", "200".to_string()),
        ];
        for (k, v) in want_attrs {
            ensure!(s.attr(k) == Some(v.as_str()), "span attribute {k} = {:?}, want {v:?}; span: {s:#?}", s.attr(k));
        }
        ensure!(s.resource.get("service.name").map(String::as_str) == Some("tollgate"), "resource: {:?}", s.resource);
        // The upstream request is a child of tollgate's span, in the agent's trace.
        let parts: Vec<&str> = sent.split('-').collect();
        ensure!(
            parts.len() == 4 && parts[0] == "00" && parts[1] == *trace && parts[2] == s.span_id && parts[3] == "01",
            "upstream traceparent {sent:?}: want 00-{trace}-{}-01 (tollgate's span as parent)",
            s.span_id
        );
    }
    let d = t.metrics()?.sum(DROPPED, &[("sink", "otlp_spans")]);
    ensure!(d == 0.0, "spans counted dropped although the collector took them: {d}");

    // The collector goes away: traffic does not notice, the lost spans are counted.
    let port = rx.addr;
    drop(rx);
    ensure!(
        std::net::TcpStream::connect_timeout(&port, Duration::from_secs(1)).is_err(),
        "receiver {port} still accepts"
    );
    for i in 0..20 {
        let tp = format!("00-{:032x}-{:016x}-01", 0x5eed_0000u128 + i, 0xab00u64 + i as u64);
        let start = Instant::now();
        let r = chat(&gw, &format!("o2 call {i} with the collector down"), i % 2 == 1, Some(&tp))?;
        let took = start.elapsed();
        ensure!(r.exit == 0 && r.http_code == 200, "call {i} with the collector down: {}", r.describe());
        ensure!(took < Duration::from_secs(1), "call {i} with the collector down took {took:?}");
    }
    let mut last = 0.0;
    let rose = wait_for(Duration::from_secs(10), Duration::from_millis(200), || {
        last = t.metrics().ok()?.sum(DROPPED, &[("sink", "otlp_spans")]);
        (last >= 1.0).then_some(())
    });
    if rose.is_none() {
        bail!(
            "{DROPPED}{{sink=\"otlp_spans\"}} stayed at {last} 10 s after 20 calls with the collector down\n{}\ntollgate stderr:\n{}",
            t.metrics()?.dump("tollgate_telemetry"),
            t.stderr_tail(30)
        );
    }
    ensure!(last <= 20.0, "{last} spans counted dropped, only 20 were made with the collector down");
    check_alive(&t)?;
    Ok(())
}

/// POST a chat completion from the agent's cgroup, with a `traceparent` when given.
fn chat(gw: &Gw, prompt: &str, stream: bool, traceparent: Option<&str>) -> Result<CurlOut> {
    let body = gw.e.path("o2-req.json");
    let req = json!({"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": prompt}]});
    std::fs::write(&body, req.to_string())?;
    let data = format!("@{}", body.display());
    let tp = traceparent.map(|t| format!("traceparent: {t}"));
    let mut args = vec!["-H", "content-type: application/json", "-H", "authorization: Bearer sk-placeholder"];
    if let Some(tp) = &tp {
        args.extend(["-H", tp.as_str()]);
    }
    let url = gw.url("/v1/chat/completions");
    args.extend(["--data-binary", &data, &url]);
    curl(Some(&gw.g), None, &args)
}

/// The client got the mock's answer: JSON with its usage, or an SSE stream ending in `[DONE]`
/// (the stream's token counts are checked on the span).
fn check_client_reply(r: &CurlOut, want: &Reply, stream: bool) -> Result<()> {
    if stream {
        let text = r.text();
        ensure!(text.trim_end().ends_with("data: [DONE]"), "stream did not end with [DONE]: {}", r.describe());
        return Ok(());
    }
    let v: Value = serde_json::from_slice(&r.body)?;
    ensure!(
        v["usage"]["prompt_tokens"] == json!(want.prompt_tokens)
            && v["usage"]["completion_tokens"] == json!(want.completion_tokens),
        "client usage {}, mock computes {}/{}",
        v["usage"],
        want.prompt_tokens,
        want.completion_tokens
    );
    Ok(())
}

/// tollgate still serves its admin endpoint after the exporter failures.
fn check_alive(t: &Tollgate) -> Result<()> {
    let (st, _) = tollgate_e2e::http_get(t.admin, "/readyz", Duration::from_secs(2))?;
    ensure!(st == 200, "/readyz answered {st} after the collector went away");
    Ok(())
}
