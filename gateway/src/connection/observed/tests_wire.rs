//! Wire fixtures of the observation tests, as real servers send them (OpenAI, Anthropic, the
//! MCP Python SDK's streamable HTTP server, an a2a-sdk server), and the check that an
//! intercepted call and the same call observed give the same metric series but for `capture`.

/// Body-carrying request with `Content-Length` (what httpx and undici send).
pub(super) fn post(host: &str, path: &str, extra: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nAccept-Encoding: identity\r\nConnection: keep-alive\r\n\
         Accept: application/json\r\nContent-Type: application/json\r\nUser-Agent: OpenAI/Python 1.99.9\r\n\
         {extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A response with `Content-Length`.
pub(super) fn resp_len(ctype: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nDate: Mon, 07 Dec 2026 19:00:00 GMT\r\nContent-Type: {ctype}\r\n\
         Content-Length: {}\r\nConnection: keep-alive\r\nx-request-id: req_1\r\n\r\n{body}",
        body.len()
    )
}

/// A chunked response whose body is sent in the given chunks (as servers flush events).
pub(super) fn resp_chunked(ctype: &str, chunks: &[&str]) -> String {
    let mut s = format!(
        "HTTP/1.1 200 OK\r\nDate: Mon, 07 Dec 2026 19:00:00 GMT\r\nContent-Type: {ctype}\r\n\
         Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
    );
    for c in chunks {
        s.push_str(&format!("{:x}\r\n{c}\r\n", c.len()));
    }
    s.push_str("0\r\n\r\n");
    s
}

pub(super) const OPENAI_CHAT_REQ: &str =
    r#"{"messages":[{"role":"user","content":"Say hello"}],"model":"gpt-4o-mini"}"#;

pub(super) const OPENAI_CHAT_RESP: &str = r#"{
  "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
  "object": "chat.completion",
  "created": 1741569952,
  "model": "gpt-4o-mini-2024-07-18",
  "choices": [
    {
      "index": 0,
      "message": {"role": "assistant", "content": "Hello! How can I assist you today?", "refusal": null, "annotations": []},
      "logprobs": null,
      "finish_reason": "stop"
    }
  ],
  "usage": {
    "prompt_tokens": 19,
    "completion_tokens": 10,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
  },
  "service_tier": "default",
  "system_fingerprint": "fp_06737a9306"
}
"#;

pub(super) const OPENAI_STREAM_REQ: &str = r#"{"messages":[{"role":"user","content":"Count to 3"}],"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true}}"#;

/// OpenAI's SSE events with `include_usage`: `"usage":null` on every chunk, then the usage-only
/// chunk and `[DONE]`, each event flushed as one HTTP chunk.
pub(super) const OPENAI_STREAM_EVENTS: [&str; 6] = [
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-mini-2024-07-18\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_06737a9306\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-mini-2024-07-18\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_06737a9306\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"1, 2\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-mini-2024-07-18\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_06737a9306\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\", 3\"},\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-mini-2024-07-18\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_06737a9306\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
    "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"gpt-4o-mini-2024-07-18\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_06737a9306\",\"choices\":[],\"usage\":{\"prompt_tokens\":13,\"completion_tokens\":7,\"total_tokens\":20,\"prompt_tokens_details\":{\"cached_tokens\":0,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}}}\n\n",
    "data: [DONE]\n\n",
];

pub(super) const ANTHROPIC_REQ: &str = r#"{"max_tokens":1024,"messages":[{"role":"user","content":"What is the weather in San Francisco?"}],"model":"claude-sonnet-4-5","stream":true,"tools":[{"name":"get_weather","description":"Get the current weather","input_schema":{"type":"object","properties":{"location":{"type":"string"}},"required":["location"]}}]}"#;

/// Anthropic's `event:`-framed stream of a text block then a `tool_use` block.
pub(super) const ANTHROPIC_EVENTS: [&str; 11] = [
    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_014p7gG3wDgGV9EUtLvnow3U\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5-20250929\",\"stop_sequence\":null,\"usage\":{\"input_tokens\":472,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":2},\"content\":[],\"stop_reason\":null}}\n\n",
    "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    "event: ping\ndata: {\"type\": \"ping\"}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Okay, let me check the weather\"}}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_01T1x1fJ34qAmk2tNTrN7Up6\",\"name\":\"get_weather\",\"input\":{}}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"location\\\":\"}}\n\n",
    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\" \\\"San Francisco, CA\\\"}\"}}\n\n",
    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":89}}\n\n",
    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
];

pub(super) const MCP_CALL: &str =
    r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"get_weather","arguments":{"city":"Paris"}}}"#;
pub(super) const MCP_RESULT: &str =
    r#"{"jsonrpc":"2.0","id":3,"result":{"content":[{"type":"text","text":"Sunny, 21C"}],"isError":false}}"#;
pub(super) const MCP_CALL_2: &str =
    r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"search_docs","arguments":{"q":"tls"}}}"#;
pub(super) const MCP_RESULT_2: &str =
    r#"{"jsonrpc":"2.0","id":4,"result":{"content":[{"type":"text","text":"3 hits"}],"isError":false}}"#;

pub(super) const A2A_SEND: &str = r#"{"id":"5e4a1c2b","jsonrpc":"2.0","method":"message/send","params":{"message":{"kind":"message","messageId":"9b1f","parts":[{"kind":"text","text":"Book a table for two"}],"role":"user"}}}"#;
pub(super) const A2A_TASK: &str = r#"{"id":"5e4a1c2b","jsonrpc":"2.0","result":{"artifacts":[{"artifactId":"a1","parts":[{"kind":"text","text":"Booked"}]}],"contextId":"ctx-7","history":[],"id":"task-42","kind":"task","status":{"state":"completed","timestamp":"2026-12-07T19:00:00Z"}}}"#;
pub(super) const A2A_CARD: &str = r#"{"name":"booking-agent","description":"Books tables","url":"https://booking.internal/","version":"1.0.0","capabilities":{"streaming":true},"defaultInputModes":["text"],"defaultOutputModes":["text"],"skills":[{"id":"book","name":"Book","description":"Book a table","tags":[]}],"protocolVersion":"0.3.0"}"#;

mod intercept_vs_observed {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::super::http1::{Framer, Piece, Role};
    use super::super::tests::{value, Harness, Split, TestConn, CONFIG};
    use super::super::ObservedLimits;
    use super::*;
    use crate::capture::uprobe::Direction;
    use crate::capture::AgentResolver;
    use crate::config::TelemetryConfig;
    use crate::protocol::llm::Reporter;
    use crate::protocol::L7Context;
    use crate::telemetry::Telemetry;
    use crate::upstream::{Target, Upstream};

    /// Read one whole HTTP/1.1 message of `role` from `s`.
    async fn read_message(s: &mut TcpStream, role: Role) -> Vec<u8> {
        let mut f = Framer::new(role, 1 << 16);
        let mut raw = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            let n = s.read(&mut buf).await.expect("read");
            assert!(n > 0, "peer closed mid-message: {}", String::from_utf8_lossy(&raw));
            raw.extend_from_slice(&buf[..n]);
            let mut b = Bytes::copy_from_slice(&buf[..n]);
            while let Some(p) = f.next(&mut b).expect("HTTP/1.1") {
                match p {
                    Piece::Head(h) => f.set_body(h.body_kind(role)),
                    Piece::Body(_) => {}
                    Piece::End => return raw,
                }
            }
        }
    }

    /// A provider on loopback answering each request with the canned OpenAI response.
    async fn provider() -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    loop {
                        let req = read_message(&mut s, Role::Request).await;
                        let stream = String::from_utf8_lossy(&req).contains("\"stream\":true");
                        let resp = match stream {
                            true => resp_chunked("text/event-stream; charset=utf-8", &OPENAI_STREAM_EVENTS),
                            false => resp_len("application/json", OPENAI_CHAT_RESP),
                        };
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    /// The two calls through tollgate's interception path (L7 handler behind an HTTP/1.1
    /// server, as for a terminated TLS connection).
    async fn intercepted(conn: &TestConn, requests: &[String]) -> String {
        let cfg = Arc::new(crate::config::from_str("t.yaml", CONFIG).expect("config"));
        let tcfg = TelemetryConfig { access_log: "off".into(), ..Default::default() };
        let telemetry = Arc::new(Telemetry::new(&tcfg).expect("telemetry"));
        let agent = Arc::new(AgentResolver::new(&cfg.agents, None).resolve(&conn.record));
        let route = cfg.routes.iter().find(|r| r.name == "openai").expect("route");
        let policies = Arc::new(crate::policy::chain::Policies::build(&cfg, &telemetry).await.expect("policies"));
        let ctx = Arc::new(L7Context {
            agent: agent.clone(),
            route: Arc::from("openai"),
            protocol: route.protocol,
            provider: route.provider,
            target: Target::new(route, provider().await, Some("api.openai.com"), false).expect("target"),
            upstream: Arc::new(Upstream::new(&cfg).expect("upstream")),
            config: cfg.clone(),
            reporter: Arc::new(Reporter::new(telemetry.clone(), None)),
            gateway: None,
            include_usage: route.include_usage,
            log_payloads: None,
            paths: Arc::from(route.matcher.paths.as_slice()),
            has_origin: true,
            groups: policies.groups_of(&agent.name),
            policies,
            callee_pod: None,
            federation: None,
        });
        let front = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let front_addr = front.local_addr().expect("addr");
        tokio::spawn(async move {
            let (s, _) = front.accept().await.expect("accept");
            let svc = service_fn(move |req| crate::protocol::handle(ctx.clone(), req));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
        });
        let mut client = TcpStream::connect(front_addr).await.expect("connect");
        for r in requests {
            client.write_all(r.as_bytes()).await.expect("write");
            read_message(&mut client, Role::Response).await;
        }
        drop(client);
        for _ in 0..500 {
            let text = telemetry.metrics.encode();
            if value(&text, "tollgate_llm_requests_total", &[]) >= requests.len() as f64 {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("intercepted calls not reported: {}", telemetry.metrics.encode());
    }

    /// The LLM series (timing-free values: counters and counts) with `capture` removed.
    fn series(text: &str, capture: &str) -> Vec<String> {
        let families = [
            "tollgate_llm_requests_total{",
            "tollgate_llm_tokens_total{",
            "tollgate_llm_estimated_tokens_total{",
            "gen_ai_client_token_usage_sum{",
            "gen_ai_client_token_usage_count{",
            "gen_ai_client_operation_duration_seconds_count{",
            "gen_ai_server_time_to_first_token_seconds_count{",
        ];
        let tag = format!("capture=\"{capture}\"");
        let mut out: Vec<String> = text
            .lines()
            .filter(|l| families.iter().any(|f| l.starts_with(f)))
            .inspect(|l| assert!(l.contains(&tag), "{l}"))
            .map(|l| l.replace(&format!("{tag},"), "").replace(&format!(",{tag}"), ""))
            .collect();
        out.sort();
        out
    }

    #[tokio::test]
    async fn intercepted_and_observed_calls_give_the_same_series() {
        let conn = TestConn::new(40, "billing-bot", [127, 0, 0, 1]);
        let auth = "Authorization: Bearer sk-test\r\n";
        let requests = [
            post("api.openai.com", "/v1/chat/completions", auth, OPENAI_CHAT_REQ),
            post("api.openai.com", "/v1/chat/completions", auth, OPENAI_STREAM_REQ),
        ];
        let via_proxy = intercepted(&conn, &requests).await;

        let mut h = Harness::start(ObservedLimits::default());
        h.send(&conn, Direction::Egress, &requests[0], Split::Every(13)).await;
        h.send(&conn, Direction::Ingress, &resp_len("application/json", OPENAI_CHAT_RESP), Split::Every(13)).await;
        h.send(&conn, Direction::Egress, &requests[1], Split::Every(13)).await;
        let stream = resp_chunked("text/event-stream; charset=utf-8", &OPENAI_STREAM_EVENTS);
        h.send(&conn, Direction::Ingress, &stream, Split::Every(13)).await;
        h.llm_calls(2).await;
        let observed = h.finish().await;

        let (a, b) = (series(&via_proxy, "intercept"), series(&observed, "uprobe"));
        assert!(a.len() > 10, "{a:?}");
        assert_eq!(a, b);
    }
}
