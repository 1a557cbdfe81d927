//! A2A JSON-RPC shapes tollgate reads: the request (method, id, skill, task id) and the
//! outcome of a response, whether one JSON body or an SSE stream of JSON-RPC responses. Both
//! protocol generations are understood: v0.3 (`message/send`, `tasks/get`, results tagged with
//! `kind`, lower-case states) and v1.0 (`SendMessage`, `GetTask`, results wrapped as
//! `{"task": ..}` / `{"statusUpdate": ..}`, `TASK_STATE_*` states), since a node runs agents
//! built with either.

use serde_json::Value;

use super::super::llm::sse::{SseEvent, SseParser};

/// JSON-RPC methods of the A2A spec (v0.3 and v1.0 names), the bounded `method` label.
const METHODS: &[&str] = &[
    "message/send",
    "message/stream",
    "tasks/get",
    "tasks/list",
    "tasks/cancel",
    "tasks/resubscribe",
    "tasks/pushNotificationConfig/set",
    "tasks/pushNotificationConfig/get",
    "tasks/pushNotificationConfig/list",
    "tasks/pushNotificationConfig/delete",
    "agent/getAuthenticatedExtendedCard",
    "SendMessage",
    "SendStreamingMessage",
    "GetTask",
    "ListTasks",
    "CancelTask",
    "SubscribeToTask",
    "CreateTaskPushNotificationConfig",
    "GetTaskPushNotificationConfig",
    "ListTaskPushNotificationConfigs",
    "DeleteTaskPushNotificationConfig",
    "GetExtendedAgentCard",
];

/// What tollgate learned from a JSON-RPC request body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RpcRequest {
    /// The method as a bounded label: a spec method name, `other`, or `invalid` (not JSON-RPC).
    pub method: &'static str,
    /// The request id, rendered as JSON (`"abc"` or `7`), so an error reuses it verbatim.
    pub id: Option<String>,
    /// The skill the message names in its metadata (`skill` or `skillId`).
    pub skill: Option<String>,
    /// Task the request is about (`params.id`, `params.taskId`, `params.message.taskId`).
    pub task_id: Option<String>,
}

impl RpcRequest {
    /// Parse a request body; a body that is not a JSON-RPC object gives method `invalid`.
    pub fn parse(body: &[u8]) -> Self {
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return RpcRequest { method: "invalid", ..Default::default() };
        };
        let Some(m) = v.get("method").and_then(Value::as_str) else {
            return RpcRequest { method: "invalid", ..Default::default() };
        };
        let method = METHODS.iter().find(|k| **k == m).copied().unwrap_or("other");
        let id = v.get("id").filter(|i| i.is_string() || i.is_number()).map(Value::to_string);
        let params = v.get("params");
        let msg = params.and_then(|p| p.get("message"));
        let skill_of = |o: Option<&Value>| {
            let md = o.and_then(|o| o.get("metadata"))?;
            md.get("skill").or_else(|| md.get("skillId")).and_then(Value::as_str).map(str::to_string)
        };
        let skill = skill_of(msg).or_else(|| skill_of(params));
        let task_id = params
            .and_then(|p| p.get("taskId").or_else(|| p.get("id")))
            .or_else(|| msg.and_then(|m| m.get("taskId")))
            .and_then(Value::as_str)
            .map(str::to_string);
        RpcRequest { method, id, skill, task_id }
    }

    /// Whether the method sends a message to the agent (skill rules apply to these).
    pub fn is_message(&self) -> bool {
        matches!(self.method, "message/send" | "message/stream" | "SendMessage" | "SendStreamingMessage")
    }
}

/// Where a hop stands after the responses seen so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Bounded outcome label: a task state (`completed`, `failed`, `canceled`, `rejected`,
    /// `input_required`, `auth_required`, `submitted`, `working`, `unknown`), `message` (the
    /// agent answered with a message), `ok` (another result), `error` (JSON-RPC error), or
    /// `None` while nothing was seen.
    pub outcome: Option<&'static str>,
    /// Task id the responses named.
    pub task_id: Option<String>,
    /// Context id the responses named.
    pub context_id: Option<String>,
    /// JSON-RPC error code and message, when the agent answered with an error.
    pub error: Option<(i64, String)>,
}

impl Outcome {
    /// Fold one JSON-RPC response (a whole body or one SSE event's data) into the outcome.
    pub fn observe(&mut self, data: &[u8]) {
        let Ok(v) = serde_json::from_slice::<Value>(data) else { return };
        if let Some(e) = v.get("error") {
            let code = e.get("code").and_then(Value::as_i64).unwrap_or(0);
            let msg = e.get("message").and_then(Value::as_str).unwrap_or("").to_string();
            self.error = Some((code, msg));
            self.outcome = Some("error");
            return;
        }
        let Some(r) = v.get("result") else { return };
        self.result(r);
    }

    fn result(&mut self, r: &Value) {
        let kind = r.get("kind").and_then(Value::as_str);
        // v1.0 wraps the payload in a one-key object; v0.3 tags it with `kind`.
        let (inner, is_message) = if let Some(t) = r.get("task").or_else(|| r.get("statusUpdate")) {
            (t, false)
        } else if let Some(a) = r.get("artifactUpdate") {
            (a, false)
        } else if r.get("message").is_some() && r.get("status").is_none() || kind == Some("message") {
            (r, true)
        } else {
            (r, false)
        };
        if is_message {
            // A message ends the exchange unless a task was already under way.
            if self.outcome.is_none() || self.outcome == Some("ok") {
                self.outcome = Some("message");
            }
            return;
        }
        let id = inner.get("taskId").or_else(|| if inner.get("status").is_some() { inner.get("id") } else { None });
        if let Some(id) = id.and_then(Value::as_str) {
            if self.task_id.as_deref() != Some(id) {
                self.task_id = Some(id.to_string());
            }
        }
        if self.context_id.is_none() {
            self.context_id = inner.get("contextId").and_then(Value::as_str).map(str::to_string);
        }
        match inner.pointer("/status/state").and_then(Value::as_str) {
            Some(s) => self.outcome = Some(state_label(s)),
            None if self.outcome.is_none() => self.outcome = Some("ok"),
            None => {}
        }
    }
}

/// A task state of either generation as a bounded label.
fn state_label(s: &str) -> &'static str {
    let s = s.strip_prefix("TASK_STATE_").unwrap_or(s);
    const STATES: &[(&str, &str)] = &[
        ("completed", "completed"),
        ("failed", "failed"),
        ("canceled", "canceled"),
        ("cancelled", "canceled"),
        ("rejected", "rejected"),
        ("input-required", "input_required"),
        ("input_required", "input_required"),
        ("auth-required", "auth_required"),
        ("auth_required", "auth_required"),
        ("submitted", "submitted"),
        ("working", "working"),
    ];
    STATES.iter().find(|(k, _)| k.eq_ignore_ascii_case(s)).map_or("unknown", |(_, v)| v)
}

/// Incremental reader of an A2A response body: JSON (held up to a bound, parsed at the end) or
/// SSE (each event parsed as it completes; nothing but the event in progress is held).
#[derive(Debug)]
pub struct ResponseReader {
    sse: Option<SseParser>,
    json: Vec<u8>,
    max: usize,
    overflow: bool,
    /// What the body said so far.
    pub outcome: Outcome,
    /// SSE events seen.
    pub events: u64,
}

impl ResponseReader {
    /// A reader for an SSE (`sse`) or JSON body; `max` bounds one event or the JSON body.
    pub fn new(sse: bool, max: usize) -> Self {
        ResponseReader {
            sse: sse.then(|| SseParser::new(max)),
            json: Vec::new(),
            max,
            overflow: false,
            outcome: Outcome::default(),
            events: 0,
        }
    }

    /// Feed the next body chunk.
    pub fn feed(&mut self, chunk: &[u8]) {
        let (outcome, events) = (&mut self.outcome, &mut self.events);
        match &mut self.sse {
            Some(p) => p.feed(chunk, |_, ev| {
                if let SseEvent::Data(d) = ev {
                    *events += 1;
                    outcome.observe(d);
                }
            }),
            None if self.overflow => {}
            None if self.json.len() + chunk.len() > self.max => {
                self.overflow = true;
                self.json = Vec::new();
            }
            None => self.json.extend_from_slice(chunk),
        }
    }

    /// The body ended: parse what was held.
    pub fn finish(&mut self) {
        let (outcome, events) = (&mut self.outcome, &mut self.events);
        match &mut self.sse {
            Some(p) => p.finish(|_, ev| {
                if let SseEvent::Data(d) = ev {
                    *events += 1;
                    outcome.observe(d);
                }
            }),
            None => {
                let body = std::mem::take(&mut self.json);
                outcome.observe(&body);
            }
        }
    }
}

/// Agent-card facts tollgate keeps per destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardInfo {
    /// The card's `name`: the callee of later hops.
    pub name: String,
    /// Skill ids the card advertises.
    pub skills: Vec<String>,
}

/// Read an agent card (v0.3 or v1.0: both carry `name` and `skills[].id`).
pub fn parse_card(body: &[u8]) -> Option<CardInfo> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let name = v.get("name")?.as_str()?.trim();
    if name.is_empty() {
        return None;
    }
    let skills = v
        .get("skills")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|s| s.get("id").and_then(Value::as_str)).map(str::to_string).collect())
        .unwrap_or_default();
    Some(CardInfo { name: name.to_string(), skills })
}

/// Point the interface URLs of an agent card (`url`, `supportedInterfaces[].url`,
/// `additionalInterfaces[].url`) at `front` (tollgate's listener, `host:port`), keeping each
/// path, so a caller that discovered the agent through tollgate keeps calling through it.
/// `None` when the body is not a JSON object.
pub fn rewrite_card(body: &[u8], front: &str) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    let obj = v.as_object_mut()?;
    let point = |u: &mut Value| {
        let Some(s) = u.as_str() else { return };
        if let Ok(mut url) = url::Url::parse(s) {
            let fronted = format!("http://{front}");
            if let Ok(base) = url::Url::parse(&fronted) {
                let _ = url.set_scheme(base.scheme());
                let _ = url.set_host(base.host_str());
                let _ = url.set_port(base.port());
                *u = Value::String(url.to_string());
            }
        }
    };
    if let Some(u) = obj.get_mut("url") {
        point(u);
    }
    for key in ["supportedInterfaces", "additionalInterfaces"] {
        if let Some(list) = obj.get_mut(key).and_then(Value::as_array_mut) {
            for i in list {
                if let Some(u) = i.get_mut("url") {
                    point(u);
                }
            }
        }
    }
    serde_json::to_vec(&v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_of_both_generations() {
        let r = RpcRequest::parse(
            br#"{"jsonrpc":"2.0","id":"7","method":"SendStreamingMessage","params":{"message":{"messageId":"m","role":"ROLE_USER","parts":[{"text":"hi"}],"metadata":{"skill":"refund"}}}}"#,
        );
        assert_eq!(
            (r.method, r.id.as_deref(), r.skill.as_deref()),
            ("SendStreamingMessage", Some("\"7\""), Some("refund"))
        );
        assert!(r.is_message());
        let r = RpcRequest::parse(br#"{"jsonrpc":"2.0","id":3,"method":"tasks/get","params":{"id":"t1"}}"#);
        assert_eq!((r.method, r.id.as_deref(), r.task_id.as_deref()), ("tasks/get", Some("3"), Some("t1")));
        assert!(!r.is_message());
        let r = RpcRequest::parse(br#"{"jsonrpc":"2.0","id":1,"method":"message/send","params":{"metadata":{"skillId":"s"},"message":{"taskId":"t9"}}}"#);
        assert_eq!((r.skill.as_deref(), r.task_id.as_deref()), (Some("s"), Some("t9")));
        assert_eq!(RpcRequest::parse(br#"{"method":"x/y","id":null}"#).method, "other");
        assert_eq!(RpcRequest::parse(b"not json").method, "invalid");
        assert_eq!(RpcRequest::parse(br#"[{"method":"SendMessage"}]"#).method, "invalid");
    }

    #[test]
    fn outcomes_of_json_results() {
        let mut o = Outcome::default();
        o.observe(br#"{"result":{"task":{"id":"t1","contextId":"c1","status":{"state":"TASK_STATE_COMPLETED"}}},"id":8,"jsonrpc":"2.0"}"#);
        assert_eq!(
            (o.outcome, o.task_id.as_deref(), o.context_id.as_deref()),
            (Some("completed"), Some("t1"), Some("c1"))
        );
        let mut o = Outcome::default();
        o.observe(
            br#"{"jsonrpc":"2.0","id":1,"result":{"kind":"task","id":"t2","status":{"state":"input-required"}}}"#,
        );
        assert_eq!((o.outcome, o.task_id.as_deref()), (Some("input_required"), Some("t2")));
        let mut o = Outcome::default();
        o.observe(br#"{"jsonrpc":"2.0","id":1,"result":{"kind":"message","messageId":"m","parts":[]}}"#);
        assert_eq!(o.outcome, Some("message"));
        let mut o = Outcome::default();
        o.observe(br#"{"jsonrpc":"2.0","id":1,"result":{"message":{"messageId":"m","parts":[]}}}"#);
        assert_eq!(o.outcome, Some("message"));
        let mut o = Outcome::default();
        o.observe(br#"{"error":{"code":-32001,"message":"Task not found"},"id":1,"jsonrpc":"2.0"}"#);
        assert_eq!((o.outcome, o.error), (Some("error"), Some((-32001, "Task not found".to_string()))));
        let mut o = Outcome::default();
        o.observe(br#"{"jsonrpc":"2.0","id":1,"result":{"taskId":"t","pushNotificationConfig":{"url":"u"}}}"#);
        assert_eq!(o.outcome, Some("ok"));
    }

    /// What an a2a-sdk 1.x server streams for `SendStreamingMessage` (captured from one).
    const STREAM: &[u8] = b"data: {\"result\": {\"task\": {\"id\": \"d2ae\", \"contextId\": \"0293\", \"status\": {\"state\": \"TASK_STATE_SUBMITTED\"}}}, \"id\": \"7\", \"jsonrpc\": \"2.0\"}\r\n\r\n\
data: {\"result\": {\"statusUpdate\": {\"taskId\": \"d2ae\", \"contextId\": \"0293\", \"status\": {\"state\": \"TASK_STATE_WORKING\"}}}, \"id\": \"7\", \"jsonrpc\": \"2.0\"}\r\n\r\n\
: ping\r\n\r\n\
data: {\"result\": {\"artifactUpdate\": {\"taskId\": \"d2ae\", \"artifact\": {\"parts\": [{\"text\": \"a\"}]}}}, \"id\": \"7\", \"jsonrpc\": \"2.0\"}\r\n\r\n\
data: {\"result\": {\"statusUpdate\": {\"taskId\": \"d2ae\", \"contextId\": \"0293\", \"status\": {\"state\": \"TASK_STATE_COMPLETED\", \"message\": {\"messageId\": \"4148\", \"role\": \"ROLE_AGENT\", \"parts\": [{\"text\": \"ledger cache\"}]}}}}, \"id\": \"7\", \"jsonrpc\": \"2.0\"}\r\n\r\n";

    fn read(chunks: &[&[u8]], sse: bool, max: usize) -> (Outcome, u64) {
        let mut r = ResponseReader::new(sse, max);
        for c in chunks {
            r.feed(c);
        }
        r.finish();
        (r.outcome, r.events)
    }

    #[test]
    fn stream_outcome_at_every_split() {
        let whole = read(&[STREAM], true, 1 << 16);
        assert_eq!(whole.0.outcome, Some("completed"));
        assert_eq!(whole.0.task_id.as_deref(), Some("d2ae"));
        assert_eq!(whole.1, 4);
        for cut in 1..STREAM.len() {
            assert_eq!(read(&[&STREAM[..cut], &STREAM[cut..]], true, 1 << 16), whole, "split at {cut}");
        }
        let bytes: Vec<&[u8]> = STREAM.chunks(1).collect();
        assert_eq!(read(&bytes, true, 1 << 16), whole, "byte by byte");
        // Cut short before the final event: the last state seen stands.
        let cut = read(&[&STREAM[..STREAM.len() / 2]], true, 1 << 16);
        assert_eq!(cut.0.outcome, Some("working"));
        // v0.3 stream ending in a failed status update.
        let v03 = b"data: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"kind\":\"status-update\",\"taskId\":\"t\",\"status\":{\"state\":\"failed\"},\"final\":true}}\n\n";
        assert_eq!(read(&[v03], true, 1 << 16).0.outcome, Some("failed"));
    }

    #[test]
    fn json_body_split_and_bounded() {
        let body =
            br#"{"result":{"task":{"id":"t1","status":{"state":"TASK_STATE_REJECTED"}}},"id":8,"jsonrpc":"2.0"}"#;
        for cut in 1..body.len() {
            assert_eq!(read(&[&body[..cut], &body[cut..]], false, 4096).0.outcome, Some("rejected"));
        }
        assert_eq!(read(&[body], false, 16).0.outcome, None, "over the bound: not parsed");
    }

    #[test]
    fn cards() {
        let c = parse_card(
            br#"{"name":"booking-agent","skills":[{"id":"book-flight"},{"id":"refund"}],"supportedInterfaces":[]}"#,
        );
        assert_eq!(
            c,
            Some(CardInfo { name: "booking-agent".into(), skills: vec!["book-flight".into(), "refund".into()] })
        );
        assert_eq!(parse_card(br#"{"name":"  "}"#), None);
        let card = br#"{"name":"b","url":"https://10.1.1.1:9101/a2a","supportedInterfaces":[{"url":"http://agent.internal/rpc?x=1","protocolBinding":"JSONRPC"}],"additionalInterfaces":[{"url":"grpc://10.1.1.1:50051"}]}"#;
        let out: Value = serde_json::from_slice(&rewrite_card(card, "127.0.0.1:4100").expect("object")).expect("json");
        assert_eq!(out["url"], "http://127.0.0.1:4100/a2a");
        assert_eq!(out["supportedInterfaces"][0]["url"], "http://127.0.0.1:4100/rpc?x=1");
        assert_eq!(out["supportedInterfaces"][0]["protocolBinding"], "JSONRPC");
        assert_eq!(out["name"], "b");
        assert_eq!(rewrite_card(b"[1]", "127.0.0.1:1"), None);
        assert_eq!(parse_card(b"<html>"), None);
    }
}
