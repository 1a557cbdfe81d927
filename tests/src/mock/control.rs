//! The mock's observable and steerable state: per-API counters (`GET /__mock/stats`), the log of
//! recent API requests (`/__mock/requests`) and injected faults (`/__mock/fault`).
//!
//! One mock process serves a whole scenario, so tests change its behaviour mid-run through this
//! control API instead of restarting it with other flags.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{json, Map, Value};

/// Which provider's conventions (auth header, error shape) a path follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// OpenAI and OpenAI-compatible (`Authorization: Bearer`).
    OpenAi,
    /// Azure OpenAI (`api-key`, `?api-version=`).
    Azure,
    /// Anthropic (`x-api-key`, `anthropic-version`).
    Anthropic,
    /// Gemini (`x-goog-api-key` or `?key=`).
    Gemini,
}

impl Provider {
    /// The provider whose shape a path's errors take (also for unknown paths).
    pub fn for_path(path: &str) -> Provider {
        if path.starts_with("/openai/") {
            Provider::Azure
        } else if path.starts_with("/v1/messages") {
            Provider::Anthropic
        } else if path.starts_with("/v1beta/") || (path.starts_with("/v1/models/") && path.contains(':')) {
            Provider::Gemini
        } else {
            Provider::OpenAi
        }
    }
}

/// Every API the mock serves; the stats key of each is [`Api::key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/chat/completions`.
    OpenAiChat,
    /// `POST /v1/responses`.
    OpenAiResponses,
    /// `POST /v1/embeddings`.
    OpenAiEmbeddings,
    /// `POST /v1/completions`.
    OpenAiCompletions,
    /// `POST /openai/deployments/{dep}/chat/completions?api-version=`.
    AzureChat,
    /// `POST /openai/deployments/{dep}/embeddings?api-version=`.
    AzureEmbeddings,
    /// `POST /v1/messages`.
    AnthropicMessages,
    /// `POST /v1/messages/count_tokens`.
    AnthropicCountTokens,
    /// `POST /v1beta/models/{m}:generateContent`.
    GeminiGenerate,
    /// `POST /v1beta/models/{m}:streamGenerateContent`.
    GeminiStream,
    /// `POST /v1beta/models/{m}:countTokens`.
    GeminiCountTokens,
}

impl Api {
    /// All APIs, in stats order.
    pub const ALL: [Api; 11] = [
        Api::OpenAiChat,
        Api::OpenAiResponses,
        Api::OpenAiEmbeddings,
        Api::OpenAiCompletions,
        Api::AzureChat,
        Api::AzureEmbeddings,
        Api::AnthropicMessages,
        Api::AnthropicCountTokens,
        Api::GeminiGenerate,
        Api::GeminiStream,
        Api::GeminiCountTokens,
    ];

    /// Key of this API's counter in `/__mock/stats`.
    pub fn key(self) -> &'static str {
        match self {
            Api::OpenAiChat => "openai_chat",
            Api::OpenAiResponses => "openai_responses",
            Api::OpenAiEmbeddings => "openai_embeddings",
            Api::OpenAiCompletions => "openai_completions",
            Api::AzureChat => "azure_chat",
            Api::AzureEmbeddings => "azure_embeddings",
            Api::AnthropicMessages => "anthropic_messages",
            Api::AnthropicCountTokens => "anthropic_count_tokens",
            Api::GeminiGenerate => "gemini_generate",
            Api::GeminiStream => "gemini_stream",
            Api::GeminiCountTokens => "gemini_count_tokens",
        }
    }

    fn index(self) -> usize {
        Api::ALL.iter().position(|a| *a == self).expect("listed")
    }
}

/// Request counters.
#[derive(Default)]
pub struct Stats {
    /// Successful `/v1/chat/completions` (historical key `chat_requests`).
    pub chat: AtomicU64,
    /// ... of which streamed.
    pub chat_stream: AtomicU64,
    /// ... of which asked for the usage chunk.
    pub chat_stream_usage: AtomicU64,
    /// `GET /`.
    pub origin: AtomicU64,
    /// Responses with status >= 400 (API and control).
    pub errors: AtomicU64,
    /// API requests received (every non-control request except `GET /`).
    pub total: AtomicU64,
    /// API requests answered by an injected fault status.
    pub faults: AtomicU64,
    /// API requests delayed by an injected fault.
    pub delayed: AtomicU64,
    /// API requests rejected with 401.
    pub unauthorized: AtomicU64,
    /// API requests that arrived over HTTP/2.
    pub http2: AtomicU64,
    /// Successful streamed responses of any API.
    pub streams: AtomicU64,
    /// API requests whose connection was reset by an injected fault.
    pub resets: AtomicU64,
    /// Prompt tokens in the usage of the chat completions served (OpenAI and Azure; streams
    /// count when they carry the usage chunk): what tollgate must count, measured at the source.
    pub usage_prompt_tokens: AtomicU64,
    /// Completion tokens, likewise.
    pub usage_completion_tokens: AtomicU64,
    per_api: [AtomicU64; 11],
}

impl Stats {
    /// Count one successful (2xx) answer of `api`.
    pub fn served(&self, api: Api) {
        self.per_api[api.index()].fetch_add(1, Ordering::Relaxed);
    }

    fn all(&self) -> Vec<(&'static str, &AtomicU64)> {
        let mut v = vec![
            ("chat_requests", &self.chat),
            ("chat_stream_requests", &self.chat_stream),
            ("chat_stream_usage_requests", &self.chat_stream_usage),
            ("origin_requests", &self.origin),
            ("errors", &self.errors),
            ("total", &self.total),
            ("faults", &self.faults),
            ("delayed", &self.delayed),
            ("unauthorized", &self.unauthorized),
            ("http2_requests", &self.http2),
            ("streams", &self.streams),
            ("resets", &self.resets),
            ("usage_prompt_tokens", &self.usage_prompt_tokens),
            ("usage_completion_tokens", &self.usage_completion_tokens),
        ];
        v.extend(Api::ALL.iter().map(|a| (a.key(), &self.per_api[a.index()])));
        v
    }

    /// The `/__mock/stats` document.
    pub fn to_json(&self, name: &str) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), json!(name));
        for (k, v) in self.all() {
            m.insert(k.into(), json!(v.load(Ordering::Relaxed)));
        }
        Value::Object(m)
    }

    /// Zero every counter (`DELETE /__mock/stats`).
    pub fn reset(&self) {
        for (_, v) in self.all() {
            v.store(0, Ordering::Relaxed);
        }
    }
}

/// An injected fault: answer `status` (provider-shaped error), or reset the connection without
/// an answer (`reset`), and/or wait `delay` before the response headers, and/or hold the body's
/// end (the chunked terminator, after a stream's last event) back by `end_delay`, for the next
/// `remaining` matching API requests (`None`: until cleared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// Error status to answer with, if any (400..=599).
    pub status: Option<u16>,
    /// Delay before the response headers.
    pub delay: Duration,
    /// Close the connection instead of answering (an upstream that resets mid-request).
    pub reset: bool,
    /// Requests left; `None` = unlimited.
    pub remaining: Option<u64>,
    /// Only requests whose path contains this.
    pub path_contains: Option<String>,
    /// Delay between the last body frame and the body's end (SDKs that stop reading at the
    /// terminal event close before it arrives).
    pub end_delay: Duration,
}

impl Fault {
    /// Parse `POST /__mock/fault` JSON: `{"status"?, "reset"?, "delay_ms"?, "end_delay_ms"?,
    /// "count"?,
    /// "path_contains"?}`.
    pub fn from_json(v: &Value) -> Result<Fault, String> {
        let obj = v.as_object().ok_or("fault must be a JSON object")?;
        for k in obj.keys() {
            if !["status", "reset", "delay_ms", "end_delay_ms", "count", "path_contains"].contains(&k.as_str()) {
                return Err(format!("unknown fault field {k:?}"));
            }
        }
        let status = match v.get("status") {
            None | Some(Value::Null) => None,
            Some(s) => match s.as_u64() {
                Some(n @ 400..=599) => Some(n as u16),
                _ => return Err("status must be an integer in 400..=599".into()),
            },
        };
        let delay_ms = match v.get("delay_ms") {
            None | Some(Value::Null) => 0,
            Some(d) => d.as_u64().ok_or("delay_ms must be a non-negative integer")?,
        };
        let reset = match v.get("reset") {
            None | Some(Value::Null) => false,
            Some(r) => r.as_bool().ok_or("reset must be a boolean")?,
        };
        if reset && status.is_some() {
            return Err("a fault either answers a status or resets, not both".into());
        }
        let end_delay_ms = match v.get("end_delay_ms") {
            None | Some(Value::Null) => 0,
            Some(d) => d.as_u64().ok_or("end_delay_ms must be a non-negative integer")?,
        };
        if status.is_none() && !reset && delay_ms == 0 && end_delay_ms == 0 {
            return Err("a fault needs status, reset, delay_ms and/or end_delay_ms".into());
        }
        let remaining = match v.get("count") {
            None | Some(Value::Null) => None,
            Some(c) => Some(c.as_u64().filter(|n| *n > 0).ok_or("count must be a positive integer")?),
        };
        let path_contains = v.get("path_contains").and_then(Value::as_str).map(str::to_string);
        Ok(Fault {
            status,
            delay: Duration::from_millis(delay_ms),
            reset,
            remaining,
            path_contains,
            end_delay: Duration::from_millis(end_delay_ms),
        })
    }

    /// The fault as `GET /__mock/fault` shows it.
    pub fn to_json(&self) -> Value {
        json!({
            "status": self.status,
            "reset": self.reset,
            "delay_ms": self.delay.as_millis() as u64,
            "count": self.remaining,
            "path_contains": self.path_contains,
            "end_delay_ms": self.end_delay.as_millis() as u64,
        })
    }
}

/// The current fault (one at a time: a new `POST` replaces it).
#[derive(Default)]
pub struct Faults(Mutex<Option<Fault>>);

impl Faults {
    /// Install `f`, replacing any current fault.
    pub fn set(&self, f: Fault) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// Remove the current fault.
    pub fn clear(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The current fault, if any.
    pub fn current(&self) -> Option<Fault> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Consume one use of the fault for a request to `path`, if it matches.
    pub fn take(&self, path: &str) -> Option<Fault> {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let f = g.as_mut()?;
        if f.path_contains.as_deref().is_some_and(|p| !path.contains(p)) {
            return None;
        }
        let out = f.clone();
        if let Some(n) = f.remaining.as_mut() {
            *n -= 1;
            if *n == 0 {
                *g = None;
            }
        }
        Some(out)
    }
}

/// The last `cap` API requests, oldest first. Entries are stored raw and rendered only when read,
/// so recording stays cheap under benchmark load.
pub struct RequestLog<T> {
    cap: usize,
    entries: Mutex<VecDeque<T>>,
}

impl<T> RequestLog<T> {
    /// A log keeping `cap` entries (0 keeps none).
    pub fn new(cap: usize) -> Self {
        RequestLog { cap, entries: Mutex::new(VecDeque::with_capacity(cap.min(1024))) }
    }

    /// Whether requests are recorded at all.
    pub fn enabled(&self) -> bool {
        self.cap > 0
    }

    /// Append an entry, dropping the oldest beyond the cap.
    pub fn push(&self, entry: T) {
        if self.cap == 0 {
            return;
        }
        let mut g = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if g.len() == self.cap {
            g.pop_front();
        }
        g.push_back(entry);
    }

    /// All entries, rendered by `render`, as a JSON array.
    pub fn to_json(&self, render: impl Fn(&T) -> Value) -> Value {
        Value::Array(self.entries.lock().unwrap_or_else(|e| e.into_inner()).iter().map(render).collect())
    }

    /// Forget every entry.
    pub fn clear(&self) {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_counts_down_and_filters() {
        let f = Faults::default();
        f.set(Fault::from_json(&json!({"status": 503, "count": 2, "path_contains": "/v1/chat"})).unwrap());
        assert!(f.take("/v1/messages").is_none());
        assert_eq!(f.take("/v1/chat/completions").unwrap().status, Some(503));
        assert!(f.take("/v1/chat/completions").is_some());
        assert!(f.take("/v1/chat/completions").is_none());
        assert!(Fault::from_json(&json!({"count": 1})).is_err());
        assert!(Fault::from_json(&json!({"status": 200})).is_err());
        assert!(Fault::from_json(&json!({"delay_ms": 5})).unwrap().remaining.is_none());
        assert!(Fault::from_json(&json!({"reset": true, "count": 1})).unwrap().reset);
        assert!(Fault::from_json(&json!({"reset": true, "status": 503})).is_err());
        let end = Fault::from_json(&json!({"end_delay_ms": 100})).unwrap();
        assert_eq!((end.end_delay, end.delay, end.status), (Duration::from_millis(100), Duration::ZERO, None));
    }

    #[test]
    fn log_is_bounded() {
        let l = RequestLog::new(2);
        for i in 0..3 {
            l.push(json!(i));
        }
        assert_eq!(l.to_json(Value::clone), json!([1, 2]));
        assert_eq!(Provider::for_path("/v1beta/models/g:generateContent"), Provider::Gemini);
        assert_eq!(Provider::for_path("/openai/deployments/d/chat/completions"), Provider::Azure);
    }
}
