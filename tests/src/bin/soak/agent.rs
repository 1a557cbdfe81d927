//! The soak's agents: each runs as its own process inside its own cgroup (so the kernel names it
//! to tollgate), sends traffic until a deadline and writes what it saw as one JSON file.
//!
//! Kinds: `plain` (captured plaintext, keep-alive, streamed and not), `tls` (intercepted TLS to
//! `api.openai.com` trusting tollgate's CA), `cut` (streams it abandons after the first chunk, or
//! right after sending), `mcp` (Streamable HTTP JSON-RPC sessions: initialize, tools/list,
//! tools/call, DELETE) and `idle` (many keep-alive connections, one call each, then held open).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tollgate_e2e::openai::{self, ChatRequest};

/// The model every LLM agent asks for.
pub const MODEL: &str = "gpt-4o-mini";

/// What an agent process is told (its command line).
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// plain | tls | cut | mcp | idle
    #[arg(long)]
    pub kind: String,
    /// Address to connect to (captured by tollgate).
    #[arg(long)]
    pub target: SocketAddr,
    /// Host header (and TLS server name for `tls`).
    #[arg(long)]
    pub host: String,
    /// PEM trust root for `tls` (tollgate's CA).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Stop sending at this Unix time (milliseconds).
    #[arg(long)]
    pub until_ms: u64,
    /// Where to write the JSON tally.
    #[arg(long)]
    pub out: PathBuf,
    /// Pause between calls, milliseconds.
    #[arg(long, default_value_t = 100)]
    pub pause_ms: u64,
    /// `idle`: connections to open and hold.
    #[arg(long, default_value_t = 0)]
    pub conns: usize,
    /// `idle`: hold the connections this long once all are open (and write `<out>.ready`),
    /// instead of until `--until-ms`.
    #[arg(long, default_value_t = 0)]
    pub hold_ms: u64,
    /// Distinguishes prompts of agents of the same kind.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// What one agent saw; the driver checks these against the mock and tollgate.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Tally {
    /// Agent kind.
    pub kind: String,
    /// Calls (or JSON-RPC messages) sent.
    pub calls: u64,
    /// Calls answered 200 whose body was complete and what the mock computes for the request.
    pub complete: u64,
    /// ... of which streamed.
    pub complete_streams: u64,
    /// Answers by HTTP status (every answer with a status line, complete or not).
    pub status: BTreeMap<u16, u64>,
    /// Calls that got no status line (connection refused, reset, timeout).
    pub transport_errors: u64,
    /// Calls the agent abandoned on purpose (`cut`): after the first chunk, or before any answer.
    pub cut_after_chunk: u64,
    /// ... before the answer.
    pub cut_before_answer: u64,
    /// 200 answers whose content or usage differed from the mock's formulas (must be 0).
    pub wrong: u64,
    /// Usage prompt tokens of the complete calls (as the agent received them).
    pub prompt_tokens: u64,
    /// Usage completion tokens of the complete calls.
    pub completion_tokens: u64,
    /// First few unexpected outcomes, for the report.
    pub samples: Vec<String>,
}

impl Tally {
    fn note(&mut self, s: String) {
        if self.samples.len() < 8 {
            self.samples.push(s);
        }
    }

    /// Calls that got an answer with a status line.
    pub fn answered(&self) -> u64 {
        self.status.values().sum()
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Entry point of `soak agent`.
pub fn main(a: AgentArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let tally = rt.block_on(run(&a))?;
    std::fs::write(&a.out, serde_json::to_vec_pretty(&tally)?).with_context(|| format!("write {}", a.out.display()))
}

async fn run(a: &AgentArgs) -> Result<Tally> {
    let mut t = Tally { kind: a.kind.clone(), ..Tally::default() };
    let tls = match a.kind.as_str() {
        "tls" => Some(tls_connector(a.ca.as_ref().ok_or_else(|| anyhow!("--kind tls needs --ca"))?)?),
        _ => None,
    };
    match a.kind.as_str() {
        "plain" | "tls" => llm_loop(a, tls.as_ref(), &mut t).await,
        "cut" => cut_loop(a, &mut t).await,
        "mcp" => mcp_loop(a, &mut t).await,
        "idle" => idle(a, &mut t).await,
        k => bail!("unknown agent kind {k:?}"),
    }
    Ok(t)
}

fn tls_connector(ca: &PathBuf) -> Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(ca)?)) {
        roots.add(c?)?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// A keep-alive HTTP/1.1 connection; its driver task is aborted on drop (closing the socket).
struct Conn {
    send: SendRequest<Full<Bytes>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect(a: &AgentArgs, tls: Option<&tokio_rustls::TlsConnector>) -> Result<Conn> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(a.target)).await??;
    tcp.set_nodelay(true)?;
    let (send, task) = match tls {
        None => {
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            (send, tokio::spawn(async move { drop(conn.await) }))
        }
        Some(c) => {
            let name = rustls::pki_types::ServerName::try_from(a.host.clone())?;
            let s = tokio::time::timeout(Duration::from_secs(5), c.connect(name, tcp)).await??;
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
            (send, tokio::spawn(async move { drop(conn.await) }))
        }
    };
    Ok(Conn { send, task })
}

fn chat_request(a: &AgentArgs, i: u64, stream: bool) -> ChatRequest {
    let mut r = ChatRequest::simple(
        MODEL,
        &format!("soak {} {} call {i}: write a short note about the weather", a.kind, a.seed),
    );
    r.stream = stream;
    r.include_usage = stream;
    r
}

fn http_post(a: &AgentArgs, path: &str, body: Vec<u8>, extra: &[(&str, &str)]) -> Result<http::Request<Full<Bytes>>> {
    let mut b = http::Request::post(path)
        .header(http::header::HOST, &a.host)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::AUTHORIZATION, "Bearer sk-soak-agent");
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    Ok(b.body(Full::new(Bytes::from(body)))?)
}

/// Outcome of one LLM call.
enum Outcome {
    /// 200 with a complete body: `(prompt, completion)` usage as received.
    Complete(u64, u64),
    /// Any other answer (status, body excerpt).
    Status(u16, String),
    /// 200 whose body differed from what the mock computes.
    Wrong(String),
    /// No status line.
    Transport(String),
}

async fn llm_call(conn: &mut Conn, a: &AgentArgs, req: &ChatRequest) -> Outcome {
    let body = serde_json::to_vec(&req.to_json()).unwrap_or_default();
    let http_req = match http_post(a, "/v1/chat/completions", body, &[]) {
        Ok(r) => r,
        Err(e) => return Outcome::Transport(e.to_string()),
    };
    let fut = async {
        let resp = conn.send.send_request(http_req).await.map_err(|e| Outcome::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let bytes = match resp.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            // A status line arrived: an answer, even if its body broke.
            Err(e) => return Err(Outcome::Status(status, format!("body error: {e}"))),
        };
        Ok((status, bytes))
    };
    let (status, bytes) = match tokio::time::timeout(Duration::from_secs(30), fut).await {
        Err(_) => return Outcome::Transport("timeout".into()),
        Ok(Err(o)) => return o,
        Ok(Ok(x)) => x,
    };
    let text = String::from_utf8_lossy(&bytes);
    if status != 200 {
        return Outcome::Status(status, text.chars().take(200).collect());
    }
    let want = openai::reply_for(req);
    let (content, usage) = if req.stream { parse_sse(&text) } else { parse_json(&text) };
    let (p, c) = usage.unwrap_or((u64::MAX, u64::MAX));
    if content.as_deref() != Some(want.content.as_str()) || p != want.prompt_tokens || c != want.completion_tokens {
        return Outcome::Wrong(format!(
            "stream={} content {:?} usage ({p},{c}); mock computes {:?} ({},{}): {}",
            req.stream,
            content,
            want.content,
            want.prompt_tokens,
            want.completion_tokens,
            text.chars().take(300).collect::<String>()
        ));
    }
    Outcome::Complete(p, c)
}

fn usage_of(v: &Value) -> Option<(u64, u64)> {
    Some((v["usage"]["prompt_tokens"].as_u64()?, v["usage"]["completion_tokens"].as_u64()?))
}

fn parse_json(text: &str) -> (Option<String>, Option<(u64, u64)>) {
    let Ok(v) = serde_json::from_str::<Value>(text) else { return (None, None) };
    (v["choices"][0]["message"]["content"].as_str().map(str::to_string), usage_of(&v))
}

/// Content and usage of an SSE body; `None` content when `[DONE]` is missing.
fn parse_sse(text: &str) -> (Option<String>, Option<(u64, u64)>) {
    let (mut content, mut usage, mut done) = (String::new(), None, false);
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data:") else { continue };
        let data = data.trim();
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
        if let Some(s) = v["choices"][0]["delta"]["content"].as_str() {
            content.push_str(s);
        }
        if let Some(u) = usage_of(&v) {
            usage = Some(u);
        }
    }
    (done.then_some(content), usage)
}

async fn pause(a: &AgentArgs, i: u64) {
    // Some jitter so the agents do not march in step.
    let jitter = (i.wrapping_mul(2654435761) ^ a.seed) % (a.pause_ms / 2 + 1);
    tokio::time::sleep(Duration::from_millis(a.pause_ms / 2 + jitter)).await;
}

async fn llm_loop(a: &AgentArgs, tls: Option<&tokio_rustls::TlsConnector>, t: &mut Tally) {
    let mut conn: Option<Conn> = None;
    let mut i = 0u64;
    while now_ms() < a.until_ms {
        i += 1;
        // Reconnect now and then, as pools do, besides after every failure.
        if i.is_multiple_of(25) {
            conn = None;
        }
        let c = match conn.as_mut() {
            Some(c) if !c.send.is_closed() => c,
            _ => match connect(a, tls).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    t.transport_errors += 1;
                    t.note(format!("connect: {e:#}"));
                    conn = None;
                    pause(a, i).await;
                    continue;
                }
            },
        };
        let stream = i.is_multiple_of(2);
        let req = chat_request(a, i, stream);
        t.calls += 1;
        match llm_call(c, a, &req).await {
            Outcome::Complete(p, c) => {
                *t.status.entry(200).or_default() += 1;
                t.complete += 1;
                t.complete_streams += stream as u64;
                t.prompt_tokens += p;
                t.completion_tokens += c;
            }
            Outcome::Status(s, why) => {
                *t.status.entry(s).or_default() += 1;
                t.note(format!("HTTP {s}: {why}"));
                conn = None;
            }
            Outcome::Wrong(why) => {
                *t.status.entry(200).or_default() += 1;
                t.wrong += 1;
                t.note(format!("wrong: {why}"));
                conn = None;
            }
            Outcome::Transport(why) => {
                t.transport_errors += 1;
                t.note(format!("transport: {why}"));
                conn = None;
            }
        }
        pause(a, i).await;
    }
}

/// Streams abandoned mid-way: three of four after the first body chunk, one of four right after
/// the request left (before any answer). Every call uses a fresh connection, closed by the cut.
async fn cut_loop(a: &AgentArgs, t: &mut Tally) {
    let mut i = 0u64;
    while now_ms() < a.until_ms {
        i += 1;
        let mut conn = match connect(a, None).await {
            Ok(c) => c,
            Err(e) => {
                t.transport_errors += 1;
                t.note(format!("connect: {e:#}"));
                pause(a, i).await;
                continue;
            }
        };
        let req = chat_request(a, i, true);
        let Ok(http_req) =
            http_post(a, "/v1/chat/completions", serde_json::to_vec(&req.to_json()).unwrap_or_default(), &[])
        else {
            continue;
        };
        t.calls += 1;
        if i.is_multiple_of(4) {
            // Give the request time to leave, then drop the connection before the answer.
            let _ = tokio::time::timeout(Duration::from_millis(5), conn.send.send_request(http_req)).await;
            t.cut_before_answer += 1;
        } else {
            match tokio::time::timeout(Duration::from_secs(30), conn.send.send_request(http_req)).await {
                Ok(Ok(resp)) => {
                    let status = resp.status().as_u16();
                    *t.status.entry(status).or_default() += 1;
                    let mut body = resp.into_body();
                    if status == 200 {
                        let _ = tokio::time::timeout(Duration::from_secs(10), body.frame()).await;
                        t.cut_after_chunk += 1;
                    } else {
                        let _ = body.collect().await;
                    }
                }
                Ok(Err(e)) => {
                    t.transport_errors += 1;
                    t.note(format!("transport: {e}"));
                }
                Err(_) => {
                    t.transport_errors += 1;
                    t.note("timeout".into());
                }
            }
        }
        drop(conn);
        pause(a, i).await;
    }
}

/// One JSON-RPC POST; `(status, session id header, JSON body)`.
async fn mcp_post(
    conn: &mut Conn,
    a: &AgentArgs,
    session: Option<&str>,
    msg: &Value,
) -> std::result::Result<(u16, Option<String>, Value), String> {
    let mut h = vec![("accept", "application/json, text/event-stream"), ("mcp-protocol-version", "2025-06-18")];
    if let Some(s) = session {
        h.push(("mcp-session-id", s));
    }
    let req = http_post(a, "/mcp", serde_json::to_vec(msg).unwrap_or_default(), &h).map_err(|e| e.to_string())?;
    let fut = async {
        let resp = conn.send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let sid = resp.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>((status, sid, serde_json::from_slice(&body).unwrap_or(Value::Null)))
    };
    tokio::time::timeout(Duration::from_secs(30), fut).await.map_err(|_| "timeout".to_string())?
}

async fn mcp_delete(conn: &mut Conn, a: &AgentArgs, session: &str) -> std::result::Result<u16, String> {
    let req = http::Request::delete("/mcp")
        .header(http::header::HOST, &a.host)
        .header("mcp-session-id", session)
        .header("mcp-protocol-version", "2025-06-18")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = conn.send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Ok(status)
}

/// MCP sessions of 20 tool calls each: initialize, initialized, tools/list, tools/call ×20,
/// DELETE. `calls` counts HTTP requests; `complete` those answered as the protocol says.
async fn mcp_loop(a: &AgentArgs, t: &mut Tally) {
    let mut i = 0u64;
    while now_ms() < a.until_ms {
        i += 1;
        let mut conn = match connect(a, None).await {
            Ok(c) => c,
            Err(e) => {
                t.transport_errors += 1;
                t.note(format!("connect: {e:#}"));
                pause(a, i).await;
                continue;
            }
        };
        if let Err(e) = mcp_session(&mut conn, a, i, t).await {
            t.note(e);
        }
        pause(a, i).await;
    }
}

async fn mcp_session(conn: &mut Conn, a: &AgentArgs, i: u64, t: &mut Tally) -> std::result::Result<(), String> {
    let record = |t: &mut Tally, r: &std::result::Result<(u16, Option<String>, Value), String>, ok: bool| match r {
        Ok((s, _, _)) => {
            *t.status.entry(*s).or_default() += 1;
            t.complete += ok as u64;
        }
        Err(_) => t.transport_errors += 1,
    };
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "soak", "version": "1"}}});
    t.calls += 1;
    let r = mcp_post(conn, a, None, &init).await;
    let sid =
        r.as_ref().ok().and_then(|(s, sid, v)| (*s == 200 && v["result"].is_object()).then(|| sid.clone())).flatten();
    record(t, &r, sid.is_some());
    let sid = sid.ok_or_else(|| format!("initialize: {r:?}"))?;
    t.calls += 1;
    let r = mcp_post(conn, a, Some(&sid), &json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await;
    let ok = matches!(r, Ok((202, _, _)));
    record(t, &r, ok);
    t.calls += 1;
    let r = mcp_post(conn, a, Some(&sid), &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})).await;
    let ok = matches!(&r, Ok((200, _, v)) if v["result"]["tools"].as_array().is_some_and(|t| !t.is_empty()));
    record(t, &r, ok);
    for k in 0..20u64 {
        let (x, y) = ((i * 31 + k) % 1000, (a.seed + k) % 1000);
        let call = json!({"jsonrpc": "2.0", "id": 2 + k, "method": "tools/call",
            "params": {"name": "add", "arguments": {"a": x, "b": y}}});
        t.calls += 1;
        let r = mcp_post(conn, a, Some(&sid), &call).await;
        let sum = (x + y).to_string();
        let ok = matches!(&r, Ok((200, _, v)) if v["result"]["content"][0]["text"].as_str() == Some(sum.as_str()));
        if !ok {
            t.wrong += matches!(r, Ok((200, _, _))) as u64;
            t.note(format!("tools/call add({x},{y}): {r:?}"));
        }
        record(t, &r, ok);
        if r.is_err() {
            return Err("transport error mid-session".into());
        }
        tokio::time::sleep(Duration::from_millis(a.pause_ms / 8)).await;
    }
    t.calls += 1;
    match mcp_delete(conn, a, &sid).await {
        Ok(s) => {
            *t.status.entry(s).or_default() += 1;
            t.complete += (s == 200 || s == 204) as u64;
        }
        Err(_) => t.transport_errors += 1,
    }
    Ok(())
}

/// `conns` keep-alive connections, one non-streamed call on each, then all held open (idle)
/// until the deadline and closed together.
async fn idle(a: &AgentArgs, t: &mut Tally) {
    let mut held = Vec::with_capacity(a.conns);
    for i in 0..a.conns as u64 {
        let mut c = match connect(a, None).await {
            Ok(c) => c,
            Err(e) => {
                t.transport_errors += 1;
                t.note(format!("connect: {e:#}"));
                continue;
            }
        };
        let req = chat_request(a, i, false);
        t.calls += 1;
        match llm_call(&mut c, a, &req).await {
            Outcome::Complete(p, cmp) => {
                *t.status.entry(200).or_default() += 1;
                t.complete += 1;
                t.prompt_tokens += p;
                t.completion_tokens += cmp;
                held.push(c);
            }
            Outcome::Status(s, why) => {
                *t.status.entry(s).or_default() += 1;
                t.note(format!("HTTP {s}: {why}"));
            }
            Outcome::Wrong(why) => {
                *t.status.entry(200).or_default() += 1;
                t.wrong += 1;
                t.note(why);
            }
            Outcome::Transport(why) => {
                t.transport_errors += 1;
                t.note(why);
            }
        }
    }
    let left = if a.hold_ms > 0 {
        let _ = std::fs::write(a.out.with_extension("ready"), held.len().to_string());
        a.hold_ms
    } else {
        a.until_ms.saturating_sub(now_ms())
    };
    tokio::time::sleep(Duration::from_millis(left)).await;
    drop(held);
}
