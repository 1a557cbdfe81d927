//! Non-streamed responses and error bodies, both directions.

use serde_json::{json, Value};

use super::super::common::{finish_reason_from_stop_reason, stop_reason_from_finish_reason};
use super::super::{
    anthropic_error_to_openai, chat_response_to_messages, messages_response_to_chat, openai_error_to_anthropic,
};
use super::{check_anthropic_error, check_completion, check_message, check_openai_error, json};

fn to_chat(v: &Value, model: Option<&str>) -> Value {
    let out = json(&messages_response_to_chat(v.to_string().as_bytes(), model).unwrap());
    check_completion(&out);
    out
}

fn to_messages(v: &Value, model: Option<&str>) -> Value {
    let out = json(&chat_response_to_messages(v.to_string().as_bytes(), model).unwrap());
    check_message(&out, false);
    out
}

fn anthropic_tool_message() -> Value {
    json!({
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [
            { "type": "thinking", "thinking": "The user wants weather.", "signature": "c2ln" },
            { "type": "text", "text": "I'll check the weather " },
            { "type": "text", "text": "in San Francisco." },
            { "type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
              "input": { "location": "San Francisco, CA", "unit": "celsius" } }
        ],
        "stop_reason": "tool_use",
        "stop_sequence": null,
        "usage": { "input_tokens": 120, "cache_creation_input_tokens": 30, "cache_read_input_tokens": 2000, "output_tokens": 55 }
    })
}

#[test]
fn messages_response_to_chat_with_tools_and_cache() {
    let out = to_chat(&anthropic_tool_message(), Some("gpt-4o"));
    assert_eq!(out["id"], "chatcmpl-01XFDUDYJgAACzvnptvVoYEL");
    assert_eq!(out["model"], "gpt-4o");
    let choice = &out["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], "I'll check the weather in San Francisco.");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["id"], "toolu_01A09q90qw90lq917835lq9");
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({ "location": "San Francisco, CA", "unit": "celsius" }));
    assert_eq!(
        out["usage"],
        json!({
            "prompt_tokens": 2150, "completion_tokens": 55, "total_tokens": 2205,
            "prompt_tokens_details": { "cached_tokens": 2000, "cache_write_tokens": 30 }
        })
    );
    // Upstream model kept when the client model is not given.
    assert_eq!(to_chat(&anthropic_tool_message(), None)["model"], "claude-sonnet-4-5-20250929");
}

#[test]
fn non_streamed_response_round_trip() {
    let original = anthropic_tool_message();
    let back = to_messages(&to_chat(&original, Some("gpt-4o")), Some("claude-sonnet-4-5-20250929"));
    assert_eq!(back["id"], original["id"]);
    assert_eq!(back["stop_reason"], "tool_use");
    assert_eq!(
        back["content"],
        json!([
            { "type": "text", "text": "I'll check the weather in San Francisco." },
            original["content"][3]
        ])
    );
    assert_eq!(
        back["usage"],
        json!({ "input_tokens": 120, "output_tokens": 55, "cache_creation_input_tokens": 30, "cache_read_input_tokens": 2000 })
    );
}

#[test]
fn chat_response_to_messages_text_and_usage() {
    let completion = json!({
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        "object": "chat.completion",
        "created": 1741570283,
        "model": "gpt-4o-2024-08-06",
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": "Hello there!", "refusal": null, "annotations": [] },
            "logprobs": null,
            "finish_reason": "length"
        }],
        "usage": {
            "prompt_tokens": 1117, "completion_tokens": 46, "total_tokens": 1163,
            "prompt_tokens_details": { "cached_tokens": 1024, "audio_tokens": 0 },
            "completion_tokens_details": { "reasoning_tokens": 0 }
        },
        "service_tier": "default",
        "system_fingerprint": "fp_fc9f1d7035"
    });
    let out = to_messages(&completion, None);
    assert_eq!(out["id"], "msg_B9MHDbslfkBeAs8l4bebGdFOJ6PeG");
    assert_eq!(out["model"], "gpt-4o-2024-08-06");
    assert_eq!(out["content"], json!([{ "type": "text", "text": "Hello there!" }]));
    assert_eq!(out["stop_reason"], "max_tokens");
    assert!(out["stop_sequence"].is_null());
    assert_eq!(
        out["usage"],
        json!({ "input_tokens": 93, "output_tokens": 46, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1024 })
    );
}

#[test]
fn chat_response_refusal_and_tool_calls() {
    let refusal = json!({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": null, "refusal": "I can't help with that." },
            "finish_reason": "stop", "logprobs": null }]
    });
    let out = to_messages(&refusal, Some("claude"));
    assert_eq!(out["stop_reason"], "refusal");
    assert_eq!(out["content"], json!([{ "type": "text", "text": "I can't help with that." }]));
    assert_eq!(out["usage"]["input_tokens"], 0);

    let tools = json!({
        "id": "chatcmpl-2", "object": "chat.completion", "created": 1, "model": "gpt-4o",
        "choices": [{ "index": 0, "finish_reason": "tool_calls", "message": { "role": "assistant", "content": null,
            "tool_calls": [
                { "id": "call_a", "type": "function", "function": { "name": "f", "arguments": "{\"x\":1}" } },
                { "id": "call_b", "type": "function", "function": { "name": "g", "arguments": "" } }
            ] } }],
        "usage": { "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15 }
    });
    let out = to_messages(&tools, None);
    assert_eq!(out["stop_reason"], "tool_use");
    assert_eq!(
        out["content"],
        json!([
            { "type": "tool_use", "id": "call_a", "name": "f", "input": { "x": 1 } },
            { "type": "tool_use", "id": "call_b", "name": "g", "input": {} }
        ])
    );

    let mut broken = tools.clone();
    broken["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] = json!("{\"x\":");
    let err = chat_response_to_messages(broken.to_string().as_bytes(), None).unwrap_err();
    assert!(err.to_string().starts_with("choices[0].message.tool_calls[0].function.arguments: not valid JSON"));
}

#[test]
fn empty_and_odd_responses() {
    let empty = json!({ "id": "msg_1", "type": "message", "role": "assistant", "model": "c", "content": [],
        "stop_reason": "end_turn", "stop_sequence": null, "usage": { "input_tokens": 3, "output_tokens": 1 } });
    let out = to_chat(&empty, None);
    assert_eq!(out["choices"][0]["message"]["content"], "");
    assert!(out["choices"][0]["message"].get("tool_calls").is_none());

    let no_choices =
        json!({ "id": "chatcmpl-3", "object": "chat.completion", "created": 1, "model": "m", "choices": [] });
    let out = to_messages(&no_choices, None);
    assert_eq!(out["content"], json!([]));
    assert_eq!(out["stop_reason"], "end_turn");

    let error = json!({ "type": "error", "error": { "type": "api_error", "message": "boom" } });
    let err = messages_response_to_chat(error.to_string().as_bytes(), None).unwrap_err();
    assert_eq!(err.to_string(), "type: expected `message`, got `error`");
    assert!(chat_response_to_messages(b"{}", None).is_err());
}

#[test]
fn stop_reason_mapping_both_ways() {
    let table = [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ];
    for (anthropic, openai) in table {
        assert_eq!(finish_reason_from_stop_reason(Some(anthropic)), openai, "{anthropic}");
    }
    assert_eq!(finish_reason_from_stop_reason(None), "stop");
    let reverse = [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("function_call", "tool_use"),
        ("content_filter", "refusal"),
    ];
    for (openai, anthropic) in reverse {
        assert_eq!(stop_reason_from_finish_reason(Some(openai)), anthropic, "{openai}");
    }
}

#[test]
fn anthropic_errors_to_openai() {
    let body = br#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"},"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}"#;
    let out = json(&anthropic_error_to_openai(429, body));
    check_openai_error(&out);
    assert_eq!(
        out,
        json!({ "error": {
            "message": "Number of request tokens has exceeded your per-minute rate limit",
            "type": "rate_limit_error", "param": null, "code": "rate_limit_error"
        } })
    );
    let overloaded = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
    let out = json(&anthropic_error_to_openai(529, overloaded));
    assert_eq!(out["error"]["type"], "server_error");
    assert_eq!(out["error"]["code"], "overloaded_error");

    let out = json(&anthropic_error_to_openai(502, b"<html>Bad Gateway</html>"));
    check_openai_error(&out);
    assert_eq!(out["error"]["message"], "upstream returned HTTP 502: <html>Bad Gateway</html>");
    assert_eq!(out["error"]["type"], "server_error");
    let out = json(&anthropic_error_to_openai(401, b""));
    assert_eq!(out["error"]["message"], "upstream returned HTTP 401");
    assert_eq!(out["error"]["type"], "authentication_error");
    let out = json(&anthropic_error_to_openai(400, &[0xff, 0xfe]));
    assert_eq!(out["error"]["message"], "upstream returned HTTP 400");
    assert_eq!(out["error"]["type"], "invalid_request_error");
    let long = "x".repeat(2000);
    let out = json(&anthropic_error_to_openai(500, long.as_bytes()));
    assert!(out["error"]["message"].as_str().unwrap().len() < 600);
}

#[test]
fn openai_errors_to_anthropic() {
    let body = br#"{"error":{"message":"Incorrect API key provided: sk-abc.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}}"#;
    let out = json(&openai_error_to_anthropic(401, body));
    check_anthropic_error(&out);
    assert_eq!(
        out,
        json!({ "type": "error", "error": { "type": "authentication_error", "message": "Incorrect API key provided: sk-abc." } })
    );
    let cases: [(u16, &[u8], &str, &str); 6] = [
        (
            429,
            br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
            "rate_limit_error",
            "Rate limit reached",
        ),
        (404, br#"{"detail":"Not Found"}"#, "not_found_error", "Not Found"),
        (400, br#"{"error":"bad things"}"#, "invalid_request_error", "bad things"),
        (503, b"", "overloaded_error", "upstream returned HTTP 503"),
        (500, b"oops", "api_error", "upstream returned HTTP 500: oops"),
        (413, br#"{"message":"too big"}"#, "invalid_request_error", "too big"),
    ];
    for (status, body, kind, message) in cases {
        let out = json(&openai_error_to_anthropic(status, body));
        check_anthropic_error(&out);
        assert_eq!(out["error"]["type"], kind, "status {status}");
        assert_eq!(out["error"]["message"], message, "status {status}");
    }
    // Non-error status: the OpenAI type decides.
    let out = json(&openai_error_to_anthropic(200, br#"{"error":{"message":"m","type":"server_error"}}"#));
    assert_eq!(out["error"]["type"], "api_error");
}

#[test]
fn error_bodies_round_trip() {
    let anthropic =
        br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"}}"#;
    let openai = anthropic_error_to_openai(400, anthropic);
    let back = json(&openai_error_to_anthropic(400, &openai));
    assert_eq!(
        back,
        json!({ "type": "error", "error": { "type": "invalid_request_error", "message": "max_tokens: Field required" } })
    );
}
