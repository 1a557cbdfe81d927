//! Request translation, both directions.

use serde_json::{json, Value};

use super::super::{chat_request_to_messages, messages_request_to_chat, TranslateError};
use super::json;

fn dump_request(kind: &str, v: &Value) {
    super::dump(kind, v);
}

fn to_messages(req: &Value) -> Value {
    let out = json(&chat_request_to_messages(req.to_string().as_bytes(), "claude-sonnet-4-5", 4096).unwrap());
    dump_request("anthropic_request", &out);
    out
}

fn to_chat(req: &Value) -> Value {
    let out = json(&messages_request_to_chat(req.to_string().as_bytes(), "gpt-4o").unwrap());
    dump_request("openai_request", &out);
    out
}

fn chat_err(req: Value) -> String {
    chat_request_to_messages(req.to_string().as_bytes(), "m", 1024).unwrap_err().to_string()
}

fn messages_err(req: Value) -> String {
    messages_request_to_chat(req.to_string().as_bytes(), "m").unwrap_err().to_string()
}

/// An agent's OpenAI request with system + developer prompts, images, parallel tool calls and
/// their results.
fn openai_agent_request() -> Value {
    json!({
        "model": "gpt-4o",
        "messages": [
            { "role": "system", "content": "You are a weather bot." },
            { "role": "developer", "content": [{ "type": "text", "text": "Answer in Celsius." }] },
            { "role": "user", "content": [
                { "type": "text", "text": "What's the weather here and in Paris?" },
                { "type": "image_url", "image_url": { "url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high" } },
                { "type": "image_url", "image_url": { "url": "https://example.com/sky.jpg" } }
            ] },
            { "role": "assistant", "content": "Let me check.", "tool_calls": [
                { "id": "call_1", "type": "function", "function": { "name": "get_weather", "arguments": "{\"city\":\"Lyon\"}" } },
                { "id": "call_2", "type": "function", "function": { "name": "get_weather", "arguments": "{\"city\":\"Paris\"}" } }
            ] },
            { "role": "tool", "tool_call_id": "call_1", "content": "18C, sunny" },
            { "role": "tool", "tool_call_id": "call_2", "content": [
                { "type": "text", "text": "21C" }, { "type": "text", "text": "cloudy" }
            ] },
            { "role": "user", "content": "Thanks! Any rain tomorrow?" }
        ],
        "tools": [{ "type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": { "type": "object", "properties": { "city": { "type": "string" } }, "required": ["city"] }
        } }],
        "tool_choice": "required",
        "parallel_tool_calls": false,
        "temperature": 0.3,
        "top_p": 0.9,
        "max_completion_tokens": 512,
        "stop": ["END"],
        "user": "agent-42",
        "stream": true,
        "stream_options": { "include_usage": true },
        "frequency_penalty": 0.5,
        "seed": 7
    })
}

#[test]
fn chat_request_to_messages_full() {
    let out = to_messages(&openai_agent_request());
    let expected = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 512,
        "system": [
            { "type": "text", "text": "You are a weather bot." },
            { "type": "text", "text": "Answer in Celsius." }
        ],
        "messages": [
            { "role": "user", "content": [
                { "type": "text", "text": "What's the weather here and in Paris?" },
                { "type": "image", "source": { "type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo=" } },
                { "type": "image", "source": { "type": "url", "url": "https://example.com/sky.jpg" } }
            ] },
            { "role": "assistant", "content": [
                { "type": "text", "text": "Let me check." },
                { "type": "tool_use", "id": "call_1", "name": "get_weather", "input": { "city": "Lyon" } },
                { "type": "tool_use", "id": "call_2", "name": "get_weather", "input": { "city": "Paris" } }
            ] },
            { "role": "user", "content": [
                { "type": "tool_result", "tool_use_id": "call_1", "content": "18C, sunny" },
                { "type": "tool_result", "tool_use_id": "call_2", "content": [
                    { "type": "text", "text": "21C" }, { "type": "text", "text": "cloudy" }
                ] },
                { "type": "text", "text": "Thanks! Any rain tomorrow?" }
            ] }
        ],
        "tools": [{
            "name": "get_weather",
            "description": "Current weather for a city",
            "input_schema": { "type": "object", "properties": { "city": { "type": "string" } }, "required": ["city"] }
        }],
        "tool_choice": { "type": "any", "disable_parallel_tool_use": true },
        "temperature": 0.3,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "metadata": { "user_id": "agent-42" },
        "stream": true
    });
    assert_eq!(out, expected);
}

#[test]
fn chat_request_round_trip() {
    let original = openai_agent_request();
    let back = to_chat(&to_messages(&original));
    let expected = json!({
        "model": "gpt-4o",
        "messages": [
            { "role": "system", "content": "You are a weather bot." },
            { "role": "system", "content": "Answer in Celsius." },
            { "role": "user", "content": [
                { "type": "text", "text": "What's the weather here and in Paris?" },
                { "type": "image_url", "image_url": { "url": "data:image/png;base64,iVBORw0KGgo=" } },
                { "type": "image_url", "image_url": { "url": "https://example.com/sky.jpg" } }
            ] },
            { "role": "assistant", "content": "Let me check.", "tool_calls": [
                { "id": "call_1", "type": "function", "function": { "name": "get_weather", "arguments": "{\"city\":\"Lyon\"}" } },
                { "id": "call_2", "type": "function", "function": { "name": "get_weather", "arguments": "{\"city\":\"Paris\"}" } }
            ] },
            { "role": "tool", "tool_call_id": "call_1", "content": "18C, sunny" },
            { "role": "tool", "tool_call_id": "call_2", "content": [
                { "type": "text", "text": "21C" }, { "type": "text", "text": "cloudy" }
            ] },
            { "role": "user", "content": "Thanks! Any rain tomorrow?" }
        ],
        "tools": original["tools"],
        "tool_choice": "required",
        "parallel_tool_calls": false,
        "temperature": 0.3,
        "top_p": 0.9,
        "max_completion_tokens": 512,
        "stop": ["END"],
        "user": "agent-42",
        "stream": true,
        "stream_options": { "include_usage": true }
    });
    assert_eq!(back, expected);
}

/// An agent's Anthropic request: cached system block, image, thinking + tool use, and a tool
/// result followed by text in the same user turn.
fn anthropic_agent_request() -> Value {
    json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": [{ "type": "text", "text": "You are a helpful assistant.", "cache_control": { "type": "ephemeral" } }],
        "messages": [
            { "role": "user", "content": [
                { "type": "image", "source": { "type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ" } },
                { "type": "text", "text": "Describe this, then check the S&P 500." }
            ] },
            { "role": "assistant", "content": [
                { "type": "thinking", "thinking": "Need the price.", "signature": "c2ln" },
                { "type": "text", "text": "Looking it up." },
                { "type": "tool_use", "id": "toolu_01D7FLrfh4GYq7yT1ULFeyMV", "name": "get_stock_price", "input": { "ticker": "^GSPC" } }
            ] },
            { "role": "user", "content": [
                { "type": "tool_result", "tool_use_id": "toolu_01D7FLrfh4GYq7yT1ULFeyMV", "content": "259.75 USD" },
                { "type": "text", "text": "And the image?" }
            ] }
        ],
        "tools": [{
            "name": "get_stock_price",
            "description": "Get the current stock price for a given ticker symbol.",
            "input_schema": { "type": "object", "properties": { "ticker": { "type": "string" } }, "required": ["ticker"] }
        }],
        "tool_choice": { "type": "tool", "name": "get_stock_price", "disable_parallel_tool_use": true },
        "stop_sequences": ["\n\nHuman:"],
        "temperature": 0.5,
        "top_p": 0.8,
        "top_k": 40,
        "metadata": { "user_id": "u-1" },
        "stream": true
    })
}

#[test]
fn messages_request_to_chat_full() {
    let out = to_chat(&anthropic_agent_request());
    let expected = json!({
        "model": "gpt-4o",
        "messages": [
            { "role": "system", "content": "You are a helpful assistant." },
            { "role": "user", "content": [
                { "type": "image_url", "image_url": { "url": "data:image/jpeg;base64,/9j/4AAQ" } },
                { "type": "text", "text": "Describe this, then check the S&P 500." }
            ] },
            { "role": "assistant", "content": "Looking it up.", "tool_calls": [{
                "id": "toolu_01D7FLrfh4GYq7yT1ULFeyMV", "type": "function",
                "function": { "name": "get_stock_price", "arguments": "{\"ticker\":\"^GSPC\"}" }
            }] },
            { "role": "tool", "tool_call_id": "toolu_01D7FLrfh4GYq7yT1ULFeyMV", "content": "259.75 USD" },
            { "role": "user", "content": "And the image?" }
        ],
        "tools": [{ "type": "function", "function": {
            "name": "get_stock_price",
            "description": "Get the current stock price for a given ticker symbol.",
            "parameters": { "type": "object", "properties": { "ticker": { "type": "string" } }, "required": ["ticker"] }
        } }],
        "tool_choice": { "type": "function", "function": { "name": "get_stock_price" } },
        "parallel_tool_calls": false,
        "max_completion_tokens": 1024,
        "stop": ["\n\nHuman:"],
        "temperature": 0.5,
        "top_p": 0.8,
        "user": "u-1",
        "stream": true,
        "stream_options": { "include_usage": true }
    });
    assert_eq!(out, expected);
}

#[test]
fn messages_request_round_trip() {
    let original = anthropic_agent_request();
    let mut back = to_messages(&to_chat(&original));
    back["model"] = original["model"].clone();
    let expected = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        // One system block becomes a string; cache_control has no OpenAI counterpart.
        "system": "You are a helpful assistant.",
        "messages": [
            original["messages"][0],
            // Thinking is dropped (OpenAI has no input for it).
            { "role": "assistant", "content": [
                { "type": "text", "text": "Looking it up." },
                { "type": "tool_use", "id": "toolu_01D7FLrfh4GYq7yT1ULFeyMV", "name": "get_stock_price", "input": { "ticker": "^GSPC" } }
            ] },
            original["messages"][2]
        ],
        "tools": original["tools"],
        "tool_choice": original["tool_choice"],
        "stop_sequences": ["\n\nHuman:"],
        "temperature": 0.5,
        "top_p": 0.8,
        "metadata": { "user_id": "u-1" },
        "stream": true
    });
    assert_eq!(back, expected);
}

#[test]
fn max_tokens_default_and_precedence() {
    let base = json!({ "model": "x", "messages": [{ "role": "user", "content": "hi" }] });
    assert_eq!(to_messages(&base)["max_tokens"], 4096);
    let mut r = base.clone();
    r["max_tokens"] = json!(100);
    assert_eq!(to_messages(&r)["max_tokens"], 100);
    r["max_completion_tokens"] = json!(200);
    assert_eq!(to_messages(&r)["max_tokens"], 200);
    r["max_completion_tokens"] = Value::Null;
    assert_eq!(to_messages(&r)["max_tokens"], 100);
}

#[test]
fn simple_text_stays_string_and_same_roles_merge() {
    let req = json!({ "model": "x", "messages": [
        { "role": "user", "content": "one" },
        { "role": "user", "content": [{ "type": "text", "text": "two" }] },
        { "role": "assistant", "content": "" },
        { "role": "assistant", "content": "three" },
        { "role": "user", "content": "four" }
    ], "stop": "STOP", "temperature": 1.7 });
    let out = to_messages(&req);
    assert_eq!(
        out["messages"],
        json!([
            { "role": "user", "content": [{ "type": "text", "text": "one" }, { "type": "text", "text": "two" }] },
            { "role": "assistant", "content": "three" },
            { "role": "user", "content": "four" }
        ])
    );
    assert_eq!(out["stop_sequences"], json!(["STOP"]));
    assert_eq!(out["temperature"], 1.0, "OpenAI's 0..2 range is clamped to Anthropic's 0..1");
    assert!(out.get("system").is_none() && out.get("tools").is_none() && out.get("stream").is_none());
}

#[test]
fn tool_choice_mapping() {
    let tools = json!([{ "type": "function", "function": { "name": "f" } }]);
    let with = |choice: Value, parallel: Option<bool>| {
        let mut r = json!({ "model": "x", "messages": [{ "role": "user", "content": "hi" }], "tools": tools });
        r["tool_choice"] = choice;
        if let Some(p) = parallel {
            r["parallel_tool_calls"] = json!(p);
        }
        to_messages(&r)
    };
    assert_eq!(with(json!("auto"), None)["tool_choice"], json!({ "type": "auto" }));
    assert_eq!(with(json!("none"), Some(false))["tool_choice"], json!({ "type": "none" }));
    assert_eq!(with(json!("required"), Some(true))["tool_choice"], json!({ "type": "any" }));
    assert_eq!(
        with(json!({ "type": "function", "function": { "name": "f" } }), None)["tool_choice"],
        json!({ "type": "tool", "name": "f" })
    );
    assert_eq!(
        with(Value::Null, Some(false))["tool_choice"],
        json!({ "type": "auto", "disable_parallel_tool_use": true })
    );
    // No parameters: an empty object schema.
    assert_eq!(
        with(Value::Null, None)["tools"],
        json!([{ "name": "f", "input_schema": { "type": "object", "properties": {} } }])
    );

    let back = |choice: Value| {
        let r = json!({ "model": "x", "max_tokens": 5, "messages": [{ "role": "user", "content": "hi" }],
            "tools": [{ "name": "f", "input_schema": { "type": "object" } }], "tool_choice": choice });
        to_chat(&r)
    };
    assert_eq!(back(json!({ "type": "auto" }))["tool_choice"], "auto");
    assert_eq!(back(json!({ "type": "any" }))["tool_choice"], "required");
    assert_eq!(back(json!({ "type": "none" }))["tool_choice"], "none");
    let auto_single = back(json!({ "type": "auto", "disable_parallel_tool_use": true }));
    assert_eq!(auto_single["parallel_tool_calls"], false);
    assert!(back(json!({ "type": "auto" })).get("parallel_tool_calls").is_none());
}

#[test]
fn tool_choice_dropped_without_tools() {
    let r = json!({ "model": "x", "messages": [{ "role": "user", "content": "hi" }], "tool_choice": "none",
        "parallel_tool_calls": false });
    let out = to_messages(&r);
    assert!(out.get("tool_choice").is_none() && out.get("tools").is_none());
    let r = json!({ "model": "x", "max_tokens": 5, "messages": [{ "role": "user", "content": "hi" }],
        "tool_choice": { "type": "auto", "disable_parallel_tool_use": true } });
    let out = to_chat(&r);
    assert!(out.get("tool_choice").is_none() && out.get("parallel_tool_calls").is_none());
}

#[test]
fn non_streaming_requests_carry_no_stream_options() {
    let r =
        json!({ "model": "x", "max_tokens": 5, "messages": [{ "role": "user", "content": "hi" }], "stream": false });
    let out = to_chat(&r);
    assert!(out.get("stream").is_none() && out.get("stream_options").is_none());
    assert_eq!(out["messages"], json!([{ "role": "user", "content": "hi" }]));
}

#[test]
fn assistant_tool_calls_without_text_and_empty_arguments() {
    let r = json!({ "model": "x", "messages": [
        { "role": "user", "content": "time?" },
        { "role": "assistant", "content": null, "tool_calls": [
            { "id": "call_9", "type": "function", "function": { "name": "now", "arguments": "" } }
        ] },
        { "role": "tool", "tool_call_id": "call_9", "content": "" }
    ] });
    let out = to_messages(&r);
    assert_eq!(
        out["messages"][1]["content"],
        json!([{ "type": "tool_use", "id": "call_9", "name": "now", "input": {} }])
    );
    assert_eq!(out["messages"][2]["content"], json!([{ "type": "tool_result", "tool_use_id": "call_9" }]));
    let back = to_chat(&out);
    assert_eq!(back["messages"][1]["content"], Value::Null);
    assert_eq!(back["messages"][1]["tool_calls"][0]["function"]["arguments"], "{}");
    assert_eq!(back["messages"][2], json!({ "role": "tool", "tool_call_id": "call_9", "content": "" }));
}

#[test]
fn image_media_types() {
    let with_url = |url: &str| {
        let r = json!({ "model": "x", "messages": [{ "role": "user", "content": [
            { "type": "image_url", "image_url": { "url": url } }
        ] }] });
        chat_request_to_messages(r.to_string().as_bytes(), "m", 10).map(|b| json(&b))
    };
    let out = with_url("data:image/jpg;base64,AAAA").unwrap();
    assert_eq!(out["messages"][0]["content"][0]["source"]["media_type"], "image/jpeg");
    let err = with_url("data:image/svg+xml;base64,AAAA").unwrap_err();
    assert_eq!(err.to_string(), "messages[0].content[0].image_url.url: unsupported image media type `image/svg+xml`");
    assert!(matches!(with_url("data:image/png,rawbytes"), Err(TranslateError::Unsupported { .. })));
    assert!(matches!(with_url("data:image/png;base64"), Err(TranslateError::Invalid { .. })));
    assert!(matches!(with_url("ftp://example.com/a.png"), Err(TranslateError::Unsupported { .. })));
    assert!(with_url("HTTPS://example.com/a.png").is_ok());
}

#[test]
fn unsupported_openai_inputs_name_the_field() {
    let user = |content: Value| {
        json!({ "model": "x", "messages": [
        { "role": "system", "content": "s" },
        { "role": "user", "content": "hi" },
        { "role": "user", "content": content }
    ] })
    };
    assert_eq!(
        chat_err(user(json!([{ "type": "input_audio", "input_audio": { "data": "AAAA", "format": "wav" } }]))),
        "messages[2].content[0]: unsupported part type `input_audio`"
    );
    assert_eq!(
        chat_err(user(json!([{ "type": "text", "text": "a" }, { "type": "file", "file": { "file_id": "f" } }]))),
        "messages[2].content[1]: unsupported part type `file`"
    );
    let base = || json!({ "model": "x", "messages": [{ "role": "user", "content": "hi" }] });
    let with = |k: &str, v: Value| {
        let mut r = base();
        r[k] = v;
        chat_err(r)
    };
    assert_eq!(with("n", json!(2)), "n: unsupported value `2` (only one choice can be translated)");
    assert!(with("logprobs", json!(true)).starts_with("logprobs: unsupported"));
    assert!(with("top_logprobs", json!(3)).starts_with("top_logprobs: unsupported"));
    assert!(with("audio", json!({ "voice": "alloy", "format": "mp3" })).starts_with("audio: unsupported"));
    assert!(with("modalities", json!(["text", "audio"])).starts_with("modalities: unsupported"));
    assert!(with("functions", json!([{ "name": "f" }])).starts_with("functions: unsupported"));
    assert_eq!(
        with("response_format", json!({ "type": "json_schema", "json_schema": { "name": "x" } })),
        "response_format.type: unsupported value `json_schema`"
    );
    assert!(with("tools", json!([{ "type": "custom", "custom": { "name": "c" } }]))
        .starts_with("tools[0].type: unsupported"));
    assert_eq!(with("messages", json!("hi")), "messages: expected an array");
    // Fine: n = 1, logprobs false, text response format.
    let mut ok = base();
    ok["n"] = json!(1);
    ok["logprobs"] = json!(false);
    ok["response_format"] = json!({ "type": "text" });
    assert!(chat_request_to_messages(ok.to_string().as_bytes(), "m", 1).is_ok());
}

#[test]
fn malformed_openai_inputs_name_the_field() {
    let call = |args: &str| {
        json!({ "model": "x", "messages": [
        { "role": "user", "content": "hi" },
        { "role": "assistant", "tool_calls": [{ "id": "c", "type": "function", "function": { "name": "f", "arguments": args } }] }
    ] })
    };
    assert!(chat_err(call("{\"a\":")).starts_with("messages[1].tool_calls[0].function.arguments: not valid JSON"));
    assert_eq!(chat_err(call("[1]")), "messages[1].tool_calls[0].function.arguments: not a JSON object");
    assert_eq!(chat_err(json!({ "model": "x" })), "messages: required field is missing");
    assert_eq!(
        chat_err(json!({ "model": "x", "messages": [{ "content": "hi" }] })),
        "messages[0].role: required field is missing"
    );
    assert_eq!(
        chat_err(json!({ "model": "x", "messages": [{ "role": "wizard", "content": "hi" }] })),
        "messages[0].role: unknown role `wizard`"
    );
    assert_eq!(
        chat_err(json!({ "model": "x", "messages": [{ "role": "function", "name": "f", "content": "1" }] })),
        "messages[0].role: unsupported role `function` (use tools)"
    );
    assert_eq!(
        chat_err(json!({ "model": "x", "messages": [{ "role": "tool", "content": "1" }] })),
        "messages[0].tool_call_id: required field is missing"
    );
    assert_eq!(
        chat_err(json!({ "model": "x", "max_tokens": -1, "messages": [] })),
        "max_tokens: expected a non-negative integer"
    );
    assert!(matches!(chat_request_to_messages(b"not json", "m", 1), Err(TranslateError::Json(_))));
    assert_eq!(chat_request_to_messages(b"[]", "m", 1).unwrap_err().to_string(), "body: expected a JSON object");
}

#[test]
fn unsupported_anthropic_inputs_name_the_field() {
    let user =
        |content: Value| json!({ "model": "x", "max_tokens": 5, "messages": [{ "role": "user", "content": content }] });
    assert_eq!(
        messages_err(user(
            json!([{ "type": "document", "source": { "type": "base64", "media_type": "application/pdf", "data": "JVBE" } }])
        )),
        "messages[0].content[0]: unsupported block type `document`"
    );
    assert_eq!(
        messages_err(user(json!([{ "type": "tool_result", "tool_use_id": "t", "content": [
            { "type": "image", "source": { "type": "url", "url": "https://x/y.png" } }
        ] }]))),
        "messages[0].content[0].content[0]: unsupported block type `image`"
    );
    assert_eq!(
        messages_err(user(json!([{ "type": "image", "source": { "type": "file", "file_id": "file_1" } }]))),
        "messages[0].content[0].source.type: unsupported image source type `file`"
    );
    let mut r = user(json!("hi"));
    r["tools"] = json!([{ "type": "web_search_20250305", "name": "web_search" }]);
    assert_eq!(messages_err(r), "tools[0].type: unsupported tool type `web_search_20250305`");
    let mut r = user(json!("hi"));
    r["mcp_servers"] = json!([{ "type": "url", "url": "https://mcp", "name": "m" }]);
    assert_eq!(messages_err(r), "mcp_servers: unsupported field");
    assert_eq!(
        messages_err(json!({ "model": "x", "max_tokens": 5, "messages": [{ "role": "assistant", "content": [
            { "type": "tool_use", "id": "t", "name": "f", "input": "nope" }
        ] }] })),
        "messages[0].content[0].input: expected an object"
    );
    assert_eq!(
        messages_err(json!({ "model": "x", "max_tokens": 5, "system": [{ "type": "image" }], "messages": [] })),
        "system[0]: unsupported block type `image`"
    );
}
