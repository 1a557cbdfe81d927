//! The end of an observed response over a real hyper connection: a stream whose terminal event
//! was handed to the agent is complete even when the agent closes before the chunked body's
//! end arrives, and a stream cut before its usage settles with the output it delivered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use super::super::api::{test_support::sample_request, Api, Observer};
use super::super::Reporter;
use super::{Mode, Observation, ObservedBody};
use crate::config::TelemetryConfig;
use crate::telemetry::{LlmCall, Telemetry};

const OPENAI: &[&str] = &[
    "data: {\"id\":\"c1\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"c1\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello there, lantern\"},\"finish_reason\":null}]}\n\n",
    "data: {\"id\":\"c1\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" orbit\"},\"finish_reason\":\"stop\"}]}\n\n",
    "data: [DONE]\n\n",
];

const ANTHROPIC: &[&str] = &[
    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude-x\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello there, lantern meadow orbit summit\"}}\n\n",
    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":9}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
];

const GEMINI: &[&str] = &[
    "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"Hello there\"}],\"role\":\"model\"}}],\"modelVersion\":\"gemini-x\"}\r\n\r\n",
    "data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\", lantern\"}],\"role\":\"model\"},\"finishReason\":\"STOP\"}],\"usageMetadata\":{\"promptTokenCount\":4,\"candidatesTokenCount\":4,\"totalTokenCount\":8}}\r\n\r\n",
];

const RESPONSES: &[&str] = &[
    "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hello there\"}\n\n",
    "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"status\":\"completed\",\"usage\":{\"input_tokens\":5,\"output_tokens\":3,\"total_tokens\":8}}}\n\n",
];

/// A response whose body is fed by the returned server half: head sent, no chunk yet.
async fn response() -> (Incoming, DuplexStream) {
    let (client, mut server) = tokio::io::duplex(1 << 16);
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client)).await.expect("handshake");
    tokio::spawn(conn);
    let req = http::Request::post("/v1/x").body(Empty::<Bytes>::new()).expect("request");
    let resp = tokio::spawn(async move { send.send_request(req).await });
    let mut buf = [0u8; 4096];
    let _ = server.read(&mut buf).await.expect("request read");
    server
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .expect("head");
    let resp = resp.await.expect("join").expect("response");
    (resp.into_body(), server)
}

async fn chunk(server: &mut DuplexStream, data: &str) {
    server.write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes()).await.expect("chunk");
}

fn reporter() -> (Arc<Reporter>, mpsc::Receiver<LlmCall>) {
    let t = Telemetry::new(&TelemetryConfig { access_log: "off".into(), ..Default::default() }).expect("telemetry");
    let (tx, rx) = mpsc::channel(4);
    (Arc::new(Reporter::new(Arc::new(t), Some(tx))), rx)
}

/// Send `events[..sent]`, read them as the agent does, then close (drop the body) without
/// the body's end ever arriving. Returns what the agent got and the reported call.
async fn close_after(api: Api, events: &[&str], sent: usize) -> (String, LlmCall) {
    let (body, mut server) = response().await;
    let (reporter, mut rx) = reporter();
    let mut call = super::super::api::test_support::call(200);
    call.stream = true;
    let observer = Observer::new(api, Bytes::from_static(sample_request(api)), false);
    let mut observed = ObservedBody::new(
        body,
        Mode::sse(1 << 16, false),
        Box::new(call),
        Instant::now(),
        reporter,
        Observation::plain(observer),
    );
    let want: String = events[..sent].concat();
    let mut got = String::new();
    for e in &events[..sent] {
        chunk(&mut server, e).await;
    }
    while got.len() < want.len() {
        let f = tokio::time::timeout(Duration::from_secs(5), observed.frame()).await.expect("frame in time");
        let data = f.expect("a frame").expect("no error").into_data().expect("data");
        got.push_str(std::str::from_utf8(&data).expect("utf-8"));
    }
    drop(observed);
    let call = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("reported").expect("a call");
    drop(server);
    (got, call)
}

#[tokio::test]
async fn closed_after_the_terminal_event_is_complete() {
    for (api, events) in [
        (Api::OpenAiChat, OPENAI),
        (Api::AnthropicMessages, ANTHROPIC),
        (Api::GeminiStreamGenerate, GEMINI),
        (Api::OpenAiResponses, RESPONSES),
    ] {
        let (got, call) = close_after(api, events, events.len()).await;
        assert_eq!(got, events.concat());
        assert_eq!(call.error, None, "{api:?}: a delivered terminal event completes the stream");
        assert!(call.usage.is_some(), "{api:?}");
        // One event short of the terminal one: the agent really went away early.
        let (_, call) = close_after(api, events, events.len() - 1).await;
        assert_eq!(
            call.error.as_deref(),
            Some("client disconnected before the response ended"),
            "{api:?}: closed before the terminal event"
        );
    }
}

/// Closing after the first text delta still counts that delta's tokens (not 0), flagged as an
/// estimate; provider usage of a complete stream is kept as reported.
#[tokio::test]
async fn closed_early_settles_with_the_output_delivered() {
    let text = "Hello there, lantern";
    let want = crate::protocol::llm::estimate::count(text);
    assert!(want >= 4, "{want}");
    let (_, call) = close_after(Api::OpenAiChat, OPENAI, 2).await;
    let u = call.usage.expect("estimated usage");
    assert_eq!((u.output, u.estimated), (want, true), "{u:?}");
    assert!(u.input > 0 && u.total == u.input + u.output, "{u:?}");

    // Anthropic reported `output_tokens: 1` in `message_start`: the delivered delta is more.
    let (_, call) = close_after(Api::AnthropicMessages, ANTHROPIC, 2).await;
    let u = call.usage.expect("usage");
    let want = crate::protocol::llm::estimate::count("Hello there, lantern meadow orbit summit");
    assert_eq!((u.input, u.output, u.total, u.estimated), (25, want, 25 + want, true), "{u:?}");

    let (_, call) = close_after(Api::AnthropicMessages, ANTHROPIC, ANTHROPIC.len()).await;
    let u = call.usage.expect("usage");
    assert_eq!((u.input, u.output, u.estimated), (25, 9, false), "{u:?}");
}
