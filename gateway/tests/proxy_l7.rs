//! In-process end-to-end test of the proxy: `serve` with a fake flow table, a mock OpenAI
//! upstream (TLS and plaintext, JSON and SSE in the real wire format), and clients talking to
//! the proxy as captured agents would. Loopback only.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tollgate::capture::{AgentResolver, CaptureRecord, FlowTable};
use tollgate::connection::tls::CertAuthority;
use tollgate::connection::{serve, ProxyDeps};
use tollgate::telemetry::{LlmCall, Telemetry};

// ---------------------------------------------------------------------------------------------
// Fake kernel: records keyed by the agent-side address of the connection.

#[derive(Default)]
struct FakeFlows(Mutex<HashMap<SocketAddr, CaptureRecord>>);

impl FlowTable for FakeFlows {
    fn take(&self, peer: SocketAddr, _local: SocketAddr) -> Option<CaptureRecord> {
        self.0.lock().remove(&peer)
    }
}

fn record(orig: SocketAddr) -> CaptureRecord {
    let mut r = CaptureRecord { orig_dst_port: orig.port(), family: gateway_common::AF_INET, ..Default::default() };
    if let std::net::IpAddr::V4(v4) = orig.ip() {
        r.orig_dst_addr[..4].copy_from_slice(&v4.octets());
    }
    r.comm[..7].copy_from_slice(b"python3");
    r
}

/// Connect to the proxy as an agent whose original destination was `orig` (None: no record).
async fn agent_connect(proxy: SocketAddr, flows: &FakeFlows, orig: Option<SocketAddr>) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let local = sock.local_addr().unwrap();
    if let Some(o) = orig {
        flows.0.lock().insert(local, record(o));
    }
    sock.connect(proxy).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// Mock OpenAI upstream.

const MODEL: &str = "gpt-4o-mini-2024-07-18";

fn json_completion() -> Bytes {
    Bytes::from(format!(
        r#"{{"id":"chatcmpl-J1","object":"chat.completion","created":1700000000,"model":"{MODEL}","choices":[{{"index":0,"message":{{"role":"assistant","content":"Hello!","refusal":null}},"logprobs":null,"finish_reason":"stop"}}],"usage":{{"prompt_tokens":1200,"completion_tokens":30,"total_tokens":1230,"prompt_tokens_details":{{"cached_tokens":1024,"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":16,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}},"service_tier":"default","system_fingerprint":"fp_0ba0d124f1"}}"#
    ))
}

/// SSE events exactly as OpenAI sends them; the usage chunk only when asked for.
fn sse_events(include_usage: bool) -> Vec<String> {
    let u = if include_usage { r#","usage":null"# } else { "" };
    let head = format!(
        r#""id":"chatcmpl-S1","object":"chat.completion.chunk","created":1700000000,"model":"{MODEL}","system_fingerprint":"fp_0ba0d124f1""#
    );
    let mut v = vec![
        format!(
            r#"data: {{{head},"choices":[{{"index":0,"delta":{{"role":"assistant","content":"","refusal":null}},"logprobs":null,"finish_reason":null}}]{u}}}"#
        ),
        format!(
            r#"data: {{{head},"choices":[{{"index":0,"delta":{{"content":"Hel"}},"logprobs":null,"finish_reason":null}}]{u}}}"#
        ),
        format!(
            r#"data: {{{head},"choices":[{{"index":0,"delta":{{"content":"lo"}},"logprobs":null,"finish_reason":null}}]{u}}}"#
        ),
        format!(r#"data: {{{head},"choices":[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"stop"}}]{u}}}"#),
    ];
    if include_usage {
        v.push(format!(
            r#"data: {{{head},"choices":[],"usage":{{"prompt_tokens":19,"completion_tokens":2,"total_tokens":21,"prompt_tokens_details":{{"cached_tokens":0,"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}}}}"#
        ));
    }
    v.push("data: [DONE]".into());
    v.into_iter().map(|e| e + "\n\n").collect()
}

struct ChanBody(mpsc::Receiver<Bytes>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

#[derive(Debug, Clone)]
struct Seen {
    path: String,
    host: String,
    accept_encoding: bool,
    body: serde_json::Value,
}

#[derive(Default)]
struct Mock {
    seen: Mutex<Vec<Seen>>,
    /// When set, the SSE stream pauses after its first event until notified.
    gate: Mutex<Option<Arc<Notify>>>,
}

type MockBody = Either<Full<Bytes>, ChanBody>;

async fn mock_handle(mock: Arc<Mock>, mut req: Request<Incoming>) -> Result<Response<MockBody>, Infallible> {
    if req.headers().contains_key(http::header::UPGRADE) {
        // WebSocket-style upgrade: echo whatever arrives on the upgraded connection.
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(Either::Left(Full::default()))
            .unwrap());
    }
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    mock.seen.lock().push(Seen {
        path: parts.uri.path().to_string(),
        host: parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("").to_string(),
        accept_encoding: parts.headers.contains_key(http::header::ACCEPT_ENCODING),
        body: json.clone(),
    });
    if parts.uri.path() == "/v1/models" {
        let b = Full::new(Bytes::from_static(br#"{"object":"list","data":[]}"#));
        return Ok(Response::builder().header("content-type", "application/json").body(Either::Left(b)).unwrap());
    }
    if json["stream"] == true {
        let include_usage = json["stream_options"]["include_usage"] == true;
        let events = sse_events(include_usage);
        let gate = mock.gate.lock().take();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            for (i, e) in events.into_iter().enumerate() {
                if i == 1 {
                    if let Some(g) = &gate {
                        g.notified().await;
                    }
                }
                // Split every event across two writes so the proxy sees partial events.
                let (a, b) = e.split_at(e.len() / 2);
                let _ = tx.send(Bytes::from(a.to_string())).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
                let _ = tx.send(Bytes::from(b.to_string())).await;
            }
        });
        return Ok(Response::builder()
            .header("content-type", "text/event-stream; charset=utf-8")
            .header("openai-processing-ms", "42")
            .body(Either::Right(ChanBody(rx)))
            .unwrap());
    }
    Ok(Response::builder()
        .header("content-type", "application/json")
        .header("openai-processing-ms", "42")
        .body(Either::Left(Full::new(json_completion())))
        .unwrap())
}

/// Run the mock on `listener`, over TLS when `tls` is given.
fn spawn_mock(mock: Arc<Mock>, listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>) {
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            let mock = mock.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |r| mock_handle(mock.clone(), r));
                let b = hyper::server::conn::http1::Builder::new();
                match tls {
                    Some(a) => {
                        if let Ok(t) = a.accept(s).await {
                            let _ = b.serve_connection(TokioIo::new(t), svc).with_upgrades().await;
                        }
                    }
                    None => {
                        let _ = b.serve_connection(TokioIo::new(s), svc).with_upgrades().await;
                    }
                }
            });
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Agent-side HTTP client.

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn http_client<S>(io: S) -> Sender
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.unwrap();
    tokio::spawn(conn.with_upgrades());
    sender
}

fn chat_request(host: &str, body: &str) -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .header("host", host)
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-test")
        .header("accept-encoding", "gzip, deflate")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn send(c: &mut Sender, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, hyper::Error> {
    c.ready().await?;
    c.send_request(req).await
}

async fn next_call(rx: &mut mpsc::Receiver<LlmCall>) -> LlmCall {
    tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("LlmCall reported").expect("channel open")
}

fn mark_usable(mark: u32) -> bool {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.set_mark(mark).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_end_to_end() {
    let dir = tempfile::tempdir().unwrap();

    // Mock upstream "api.openai.com" with its own CA, trusted by tollgate via extra_roots.
    let upstream_ca =
        Arc::new(CertAuthority::load_or_create(&dir.path().join("upstream-ca"), Duration::from_secs(3600), 8).unwrap());
    let mock = Arc::new(Mock::default());
    let tls_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let plain_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_addr = tls_l.local_addr().unwrap();
    let plain_addr = plain_l.local_addr().unwrap();
    spawn_mock(mock.clone(), tls_l, Some(tokio_rustls::TlsAcceptor::from(upstream_ca.server_config().unwrap())));
    spawn_mock(mock.clone(), plain_l, None);
    // A closed port, for upstream failures.
    let dead_addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    // Echo server, for spliced connections.
    let echo_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo_l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo_l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });

    let mark = if mark_usable(0x7467_0001) { 0x7467_0001 } else { 0 };
    let yaml = format!(
        r#"
capture: {{ self_mark: {mark} }}
routes:
  - name: openai
    provider: openai
    intercept: true
    match: {{ hosts: [api.openai.com] }}
  - name: local
    provider: openai
    match: {{ addresses: ["{plain_addr}", "{dead_addr}"] }}
tls:
  ca_dir: {ca}
  extra_roots: ["{roots}"]
limits: {{ max_request_body_bytes: 4096, sniff_timeout: 2s, connect_timeout: 2s }}
telemetry: {{ access_log: "off" }}
"#,
        ca = dir.path().join("ca").display(),
        roots = upstream_ca.cert_path().display(),
    );
    let config = Arc::new(tollgate::config::from_str("test.yaml", &yaml).unwrap());
    let ca = Arc::new(CertAuthority::load_or_create(&config.tls.ca_dir, config.tls.leaf_validity, 16).unwrap());
    let flows = Arc::new(FakeFlows::default());
    let telemetry = Arc::new(Telemetry::new(&config.telemetry).unwrap());
    let (obs_tx, mut calls) = mpsc::channel(64);
    let deps = ProxyDeps {
        config: config.clone(),
        flows: flows.clone(),
        agents: Arc::new(AgentResolver::new(&config.agents, None)),
        telemetry,
        ca: ca.clone(),
        observer: Some(obs_tx),
        intercepted: Default::default(),
        tls_prober: None,
    };
    let proxy_l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = proxy_l.local_addr().unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(serve(deps, vec![proxy_l], stop_rx));

    // Agent-side TLS trusting tollgate's CA.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert_der().clone()).unwrap();
    let ccfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(ccfg));
    let sni = rustls::pki_types::ServerName::try_from("api.openai.com").unwrap();

    // 1. Intercepted TLS, non-streaming JSON.
    let tcp = agent_connect(proxy, &flows, Some(tls_addr)).await;
    let tls = connector.connect(sni.clone(), tcp).await.unwrap();
    let mut c = http_client(tls).await;
    let resp = send(
        &mut c,
        chat_request("api.openai.com", r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["openai-processing-ms"], "42");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, json_completion());
    let call = next_call(&mut calls).await;
    assert_eq!(&*call.agent.name, "python3");
    assert_eq!(&*call.route, "openai");
    assert_eq!((call.operation, call.status, call.stream), ("chat", 200, false));
    assert_eq!(call.request_model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(call.response_model.as_deref(), Some(MODEL));
    assert_eq!(call.response_id.as_deref(), Some("chatcmpl-J1"));
    let u = call.usage.expect("usage");
    assert_eq!((u.input, u.output, u.total, u.cached_input, u.reasoning), (1200, 30, 1230, Some(1024), Some(16)));
    assert_eq!(call.finish_reasons, vec!["stop"]);
    assert_eq!(call.server_address.as_deref(), Some("api.openai.com"));
    assert_eq!(call.traceparent.as_deref(), Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
    assert!(call.ttft.is_some() && call.error.is_none());
    assert_eq!((call.method.as_str(), call.path.as_str()), ("POST", "/v1/chat/completions"));
    {
        let seen = mock.seen.lock().last().cloned().unwrap();
        // Host is the intercepted name (with the port, as the agent dialled a non-default one).
        assert_eq!(seen.host, format!("api.openai.com:{}", tls_addr.port()));
        assert!(!seen.accept_encoding, "accept-encoding dropped so usage is readable");
        assert!(seen.body.get("stream_options").is_none(), "non-streaming requests are not rewritten");
    }

    // 2. Same connection (keep-alive), streaming without include_usage: injected upstream, the
    //    usage-only chunk dropped, events delivered as they arrive.
    let gate = Arc::new(Notify::new());
    *mock.gate.lock() = Some(gate.clone());
    let resp = send(
        &mut c,
        chat_request(
            "api.openai.com",
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        ),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("content-length").is_none());
    let mut body = resp.into_body();
    // The agent gets what the provider sends a client that did not ask for usage: no
    // `"usage":null` in the chunks, no usage-only chunk (tollgate strips what it injected).
    let agent_events = sse_events(false);
    let mut got = Vec::new();
    // The first event reaches the agent while the upstream is still holding the rest.
    while got.len() < agent_events[0].len() {
        let f = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("first event streamed")
            .unwrap()
            .unwrap();
        got.extend_from_slice(&f.into_data().unwrap());
    }
    assert_eq!(got, agent_events[0].as_bytes());
    gate.notify_one();
    got.extend_from_slice(&body.collect().await.unwrap().to_bytes());
    assert_eq!(String::from_utf8(got).unwrap(), agent_events.concat());
    let call = next_call(&mut calls).await;
    assert!(call.stream);
    assert_eq!(call.usage.map(|u| (u.input, u.output, u.total)), Some((19, 2, 21)));
    assert_eq!(call.finish_reasons, vec!["stop"]);
    assert_eq!(call.response_id.as_deref(), Some("chatcmpl-S1"));
    assert!(call.error.is_none() && call.ttft.is_some() && call.ttft <= Some(call.duration));
    assert_eq!(mock.seen.lock().last().unwrap().body["stream_options"]["include_usage"], true);

    // 3. Streaming with include_usage asked by the client: every byte kept.
    let resp = send(
        &mut c,
        chat_request(
            "api.openai.com",
            r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
        ),
    )
    .await
    .unwrap();
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8(got.to_vec()).unwrap(), sse_events(true).concat());
    let call = next_call(&mut calls).await;
    assert_eq!(call.usage.map(|u| u.total), Some(21));

    // 4. Non-LLM path on an L7 route: proxied, not reported.
    let resp = send(&mut c, Request::get("/v1/models").header("host", "api.openai.com").body(Full::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(&resp.into_body().collect().await.unwrap().to_bytes()[..], br#"{"object":"list","data":[]}"#);
    assert_eq!(mock.seen.lock().last().unwrap().path, "/v1/models");

    // 4b. Upgrade (Realtime API over WebSocket): tunnelled end to end.
    let resp = send(
        &mut c,
        Request::get("/v1/realtime?model=gpt-4o-realtime-preview")
            .header("host", "api.openai.com")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .body(Full::default())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let up = hyper::upgrade::on(resp).await.unwrap();
    let mut up = TokioIo::new(up);
    up.write_all(b"\x81\x05hello").await.unwrap();
    let mut echo = [0u8; 7];
    up.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"\x81\x05hello");
    drop(up);

    // Back on a fresh intercepted connection (the upgraded one is now a tunnel).
    let tcp = agent_connect(proxy, &flows, Some(tls_addr)).await;
    let tls = connector.connect(sni.clone(), tcp).await.unwrap();
    let mut c = http_client(tls).await;

    // 5. Body over max_request_body_bytes: 413, OpenAI-shaped, reported with an error.
    let big = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(5000));
    let resp = send(&mut c, chat_request("api.openai.com", &big)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v: serde_json::Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["error"]["code"], "request_too_large");
    let call = next_call(&mut calls).await;
    assert_eq!(call.status, 413);
    assert!(call.error.is_some());
    drop(c);

    // 6. Plaintext HTTP to a route matched by address: JSON and SSE.
    let tcp = agent_connect(proxy, &flows, Some(plain_addr)).await;
    let mut c = http_client(tcp).await;
    let host = plain_addr.to_string();
    let resp = send(&mut c, chat_request(&host, r#"{"model":"llama3","messages":[]}"#)).await.unwrap();
    assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), json_completion());
    let call = next_call(&mut calls).await;
    assert_eq!((&*call.route, call.request_model.as_deref()), ("local", Some("llama3")));
    assert_eq!(call.usage.map(|u| u.total), Some(1230));
    assert_eq!(mock.seen.lock().last().unwrap().host, host, "client's Host kept on plaintext");
    let resp = send(&mut c, chat_request(&host, r#"{"model":"llama3","stream":true,"messages":[]}"#)).await.unwrap();
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(String::from_utf8(got.to_vec()).unwrap(), sse_events(false).concat());
    assert_eq!(next_call(&mut calls).await.usage.map(|u| u.output), Some(2));
    drop(c);

    // 6b. Client goes away mid-stream: the call is still reported, with an error.
    let tcp = agent_connect(proxy, &flows, Some(plain_addr)).await;
    let mut c = http_client(tcp).await;
    let gate = Arc::new(Notify::new());
    *mock.gate.lock() = Some(gate.clone());
    let resp = send(&mut c, chat_request(&host, r#"{"model":"llama3","stream":true,"messages":[]}"#)).await.unwrap();
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame()).await.unwrap();
    assert!(first.is_some());
    drop(body);
    drop(c);
    gate.notify_one();
    let call = next_call(&mut calls).await;
    assert!(call.error.as_deref().is_some_and(|e| e.contains("client disconnected")), "{:?}", call.error);
    assert!(call.ttft.is_some());

    // 7. Upstream down: 502 in OpenAI shape, reported.
    let tcp = agent_connect(proxy, &flows, Some(dead_addr)).await;
    let mut c = http_client(tcp).await;
    let resp = send(&mut c, chat_request(&dead_addr.to_string(), r#"{"model":"m","messages":[]}"#)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let v: serde_json::Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["error"]["type"], "upstream_error");
    assert_eq!(v["error"]["code"], "upstream_connect_failed");
    let call = next_call(&mut calls).await;
    assert_eq!(call.status, 502);
    assert!(call.error.as_deref().is_some_and(|e| e.contains("onnect")), "{:?}", call.error);
    drop(c);

    // 8. TLS to a host without a route: spliced untouched to the original destination.
    let mut tcp = agent_connect(proxy, &flows, Some(echo_addr)).await;
    let hello = client_hello("example.com");
    tcp.write_all(&hello).await.unwrap();
    let mut back = vec![0u8; hello.len()];
    tcp.read_exact(&mut back).await.unwrap();
    assert_eq!(back, hello);
    drop(tcp);
    // Non-HTTP plaintext is spliced too.
    let mut tcp = agent_connect(proxy, &flows, Some(echo_addr)).await;
    tcp.write_all(b"\x00hello").await.unwrap();
    let mut back = [0u8; 6];
    tcp.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"\x00hello");
    drop(tcp);

    // 9. No kernel record: closed without a byte.
    let mut tcp = agent_connect(proxy, &flows, None).await;
    let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0);

    // Shutdown: stop accepting, drain, return.
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("serve returns after shutdown")
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(proxy).await.is_err(), "listener closed");
}

fn client_hello(sni: &str) -> Vec<u8> {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}
