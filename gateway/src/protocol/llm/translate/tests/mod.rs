//! Unit tests for the translators, plus shape checks of every produced document against the
//! required fields of the OpenAI and Anthropic SDK types (`ChatCompletion`,
//! `ChatCompletionChunk`, `Message`, `RawMessageStreamEvent`, error responses).
//!
//! Setting `TRANSLATE_DUMP=<file>` appends every checked document as `kind<TAB>json` lines, so
//! they can also be validated with the Python SDKs' pydantic models.

mod requests;
mod responses;
mod streams;

use std::io::Write;
use std::sync::Mutex;

use serde_json::Value;

static DUMP: Mutex<()> = Mutex::new(());

fn dump(kind: &str, v: &Value) {
    let Ok(path) = std::env::var("TRANSLATE_DUMP") else { return };
    let _guard = DUMP.lock().unwrap();
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
    writeln!(f, "{kind}\t{v}").unwrap();
}

/// Parse a produced body.
pub(super) fn json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|e| panic!("invalid JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

/// Split OpenAI SSE output into chunks; asserts the framing and that `[DONE]` comes last, once.
pub(super) fn openai_frames(out: &[u8]) -> (Vec<Value>, bool) {
    let text = std::str::from_utf8(out).unwrap();
    assert!(text.is_empty() || text.ends_with("\n\n"), "unterminated event in {text:?}");
    let mut chunks = Vec::new();
    let mut done = false;
    for frame in text.split("\n\n").filter(|f| !f.is_empty()) {
        let data = frame.strip_prefix("data: ").unwrap_or_else(|| panic!("bad frame {frame:?}"));
        assert!(!data.contains('\n'), "multi-line frame {frame:?}");
        assert!(!done, "event after [DONE]: {frame:?}");
        if data == "[DONE]" {
            done = true;
        } else {
            chunks.push(json(data.as_bytes()));
        }
    }
    (chunks, done)
}

/// Split Anthropic SSE output into events; asserts `event:` matches the payload's `type`.
pub(super) fn anthropic_frames(out: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(out).unwrap();
    assert!(text.is_empty() || text.ends_with("\n\n"), "unterminated event in {text:?}");
    text.split("\n\n")
        .filter(|f| !f.is_empty())
        .map(|frame| {
            let (event, data) = frame.split_once('\n').unwrap_or_else(|| panic!("bad frame {frame:?}"));
            let name = event.strip_prefix("event: ").unwrap();
            let v = json(data.strip_prefix("data: ").unwrap().as_bytes());
            assert_eq!(v["type"], name, "event name mismatch in {frame:?}");
            check_anthropic_event(&v);
            v
        })
        .collect()
}

fn is_int(v: &Value) -> bool {
    v.as_u64().is_some()
}

fn is_str(v: &Value) -> bool {
    v.is_string()
}

const FINISH_REASONS: [&str; 5] = ["stop", "length", "tool_calls", "content_filter", "function_call"];
const STOP_REASONS: [&str; 7] =
    ["end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal", "model_context_window_exceeded"];
const ANTHROPIC_ERROR_TYPES: [&str; 9] = [
    "invalid_request_error",
    "authentication_error",
    "billing_error",
    "permission_error",
    "not_found_error",
    "rate_limit_error",
    "timeout_error",
    "api_error",
    "overloaded_error",
];

fn check_completion_usage(u: &Value) {
    for k in ["completion_tokens", "prompt_tokens", "total_tokens"] {
        assert!(is_int(&u[k]), "usage.{k} in {u}");
    }
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
}

/// `openai.types.chat.ChatCompletionChunk` required fields (or an error chunk).
pub(super) fn check_chunk(c: &Value) {
    dump("chunk", c);
    if c.get("error").is_some() {
        assert!(is_str(&c["error"]["message"]) && is_str(&c["error"]["type"]), "error chunk {c}");
        return;
    }
    assert!(is_str(&c["id"]) && c["id"].as_str().unwrap().starts_with("chatcmpl-"), "id in {c}");
    assert_eq!(c["object"], "chat.completion.chunk");
    assert!(is_int(&c["created"]) && is_str(&c["model"]), "created/model in {c}");
    for choice in c["choices"].as_array().unwrap() {
        assert!(is_int(&choice["index"]) && choice["delta"].is_object(), "choice in {c}");
        let f = &choice["finish_reason"];
        assert!(f.is_null() || FINISH_REASONS.contains(&f.as_str().unwrap()), "finish_reason in {c}");
        let d = &choice["delta"];
        if let Some(calls) = d.get("tool_calls") {
            for call in calls.as_array().unwrap() {
                assert!(is_int(&call["index"]), "tool_call index in {c}");
                assert!(call.get("type").is_none_or(|t| t == "function"));
                assert!(call.get("id").is_none_or(is_str));
                let f = &call["function"];
                assert!(f.get("name").is_none_or(is_str) && f.get("arguments").is_none_or(is_str));
            }
        }
    }
    if let Some(u) = c.get("usage").filter(|u| !u.is_null()) {
        check_completion_usage(u);
    }
}

/// `openai.types.chat.ChatCompletion` required fields.
pub(super) fn check_completion(c: &Value) {
    dump("completion", c);
    assert!(is_str(&c["id"]) && c["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(c["object"], "chat.completion");
    assert!(is_int(&c["created"]) && is_str(&c["model"]));
    for choice in c["choices"].as_array().unwrap() {
        assert!(is_int(&choice["index"]));
        assert!(FINISH_REASONS.contains(&choice["finish_reason"].as_str().unwrap()));
        let m = &choice["message"];
        assert_eq!(m["role"], "assistant");
        assert!(m["content"].is_null() || m["content"].is_string());
        for call in m.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            assert!(is_str(&call["id"]) && call["type"] == "function");
            assert!(is_str(&call["function"]["name"]) && is_str(&call["function"]["arguments"]));
        }
    }
    check_completion_usage(&c["usage"]);
}

fn check_content_block(b: &Value, streaming_start: bool) {
    match b["type"].as_str().unwrap() {
        "text" => assert!(is_str(&b["text"])),
        "tool_use" => {
            assert!(is_str(&b["id"]) && is_str(&b["name"]) && b["input"].is_object());
            if streaming_start {
                assert_eq!(b["input"], serde_json::json!({}));
            }
        }
        other => panic!("unexpected block type {other}"),
    }
}

/// `anthropic.types.Message` required fields.
pub(super) fn check_message(m: &Value, streaming: bool) {
    dump(if streaming { "message_start_message" } else { "message" }, m);
    assert!(is_str(&m["id"]) && m["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    assert!(is_str(&m["model"]));
    for b in m["content"].as_array().unwrap() {
        check_content_block(b, false);
    }
    if streaming {
        assert!(m["content"].as_array().unwrap().is_empty());
        assert!(m["stop_reason"].is_null());
    } else {
        assert!(STOP_REASONS.contains(&m["stop_reason"].as_str().unwrap()));
    }
    assert!(m.as_object().unwrap().contains_key("stop_sequence"));
    assert!(is_int(&m["usage"]["input_tokens"]) && is_int(&m["usage"]["output_tokens"]));
}

/// `anthropic.types.RawMessageStreamEvent` (or stream `error` event) required fields.
pub(super) fn check_anthropic_event(v: &Value) {
    dump("event", v);
    match v["type"].as_str().unwrap() {
        "message_start" => check_message(&v["message"], true),
        "content_block_start" => {
            assert!(is_int(&v["index"]));
            check_content_block(&v["content_block"], true);
        }
        "content_block_delta" => {
            assert!(is_int(&v["index"]));
            let d = &v["delta"];
            match d["type"].as_str().unwrap() {
                "text_delta" => assert!(is_str(&d["text"])),
                "input_json_delta" => assert!(is_str(&d["partial_json"])),
                other => panic!("unexpected delta {other}"),
            }
        }
        "content_block_stop" => assert!(is_int(&v["index"])),
        "message_delta" => {
            let r = &v["delta"]["stop_reason"];
            assert!(r.is_null() || STOP_REASONS.contains(&r.as_str().unwrap()));
            assert!(is_int(&v["usage"]["output_tokens"]));
        }
        "message_stop" => {}
        "error" => check_anthropic_error(v),
        other => panic!("unexpected event {other}"),
    }
}

/// `anthropic.types.ErrorResponse` required fields.
pub(super) fn check_anthropic_error(v: &Value) {
    dump("anthropic_error", v);
    assert_eq!(v["type"], "error");
    assert!(ANTHROPIC_ERROR_TYPES.contains(&v["error"]["type"].as_str().unwrap()), "error type in {v}");
    assert!(is_str(&v["error"]["message"]));
}

/// OpenAI error body (`{"error": ErrorObject}`) required fields.
pub(super) fn check_openai_error(v: &Value) {
    dump("openai_error", v);
    let e = &v["error"];
    assert!(is_str(&e["message"]) && is_str(&e["type"]), "error object in {v}");
    assert!(e["code"].is_null() || e["code"].is_string());
}
