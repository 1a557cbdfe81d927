//! Stream translation, both directions: every produced chunk/event is shape-checked, then the
//! stream is reassembled the way a client would and compared with what the upstream said.

use serde_json::{json, Value};

use super::super::{ChatToMessagesStream, MessagesToChatStream, StreamTranslator};
use super::{anthropic_frames, check_chunk, openai_frames};

/// Feed every payload, then `finish`; returns the client bytes.
fn run(t: &mut dyn StreamTranslator, events: &[Value], finish: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for e in events {
        t.event(e.to_string().as_bytes(), &mut out);
    }
    if finish {
        t.finish(&mut out);
    }
    out
}

/// An Anthropic stream in the shape of the streaming docs: text, then a tool call whose input
/// arrives as JSON fragments, with a ping in between.
fn anthropic_stream() -> Vec<Value> {
    vec![
        json!({ "type": "message_start", "message": {
            "id": "msg_014p7gG3wDgGV9EUtLvnow3U", "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-5-20250929", "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": { "input_tokens": 472, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 100, "output_tokens": 2 }
        } }),
        json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } }),
        json!({ "type": "ping" }),
        json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": "Okay, let me check" } }),
        json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": " the weather in San Francisco." } }),
        json!({ "type": "content_block_stop", "index": 0 }),
        json!({ "type": "content_block_start", "index": 1, "content_block": {
            "type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather", "input": {}
        } }),
        json!({ "type": "content_block_delta", "index": 1, "delta": { "type": "input_json_delta", "partial_json": "" } }),
        json!({ "type": "content_block_delta", "index": 1, "delta": { "type": "input_json_delta", "partial_json": "{\"location\":" } }),
        json!({ "type": "content_block_delta", "index": 1, "delta": { "type": "input_json_delta", "partial_json": " \"San Francisco, CA\", \"unit\": \"fahrenheit\"}" } }),
        json!({ "type": "content_block_stop", "index": 1 }),
        json!({ "type": "message_delta", "delta": { "stop_reason": "tool_use", "stop_sequence": null }, "usage": { "output_tokens": 89 } }),
        json!({ "type": "message_stop" }),
    ]
}

/// What an OpenAI client rebuilds from chunks.
#[derive(Debug, Default)]
struct Assembled {
    content: String,
    /// (id, name, arguments) per tool-call index.
    calls: Vec<(String, String, String)>,
    finish: Option<String>,
    usage: Option<Value>,
    ids: Vec<String>,
}

fn assemble_openai(chunks: &[Value]) -> Assembled {
    let mut a = Assembled::default();
    for c in chunks {
        check_chunk(c);
        a.ids.push(c["id"].as_str().unwrap_or("").to_string());
        if let Some(u) = c.get("usage").filter(|u| !u.is_null()) {
            assert!(c["choices"].as_array().unwrap().is_empty(), "usage chunk has no choices");
            a.usage = Some(u.clone());
        }
        for choice in c["choices"].as_array().into_iter().flatten() {
            let d = &choice["delta"];
            if let Some(t) = d["content"].as_str() {
                a.content.push_str(t);
            }
            for call in d["tool_calls"].as_array().into_iter().flatten() {
                let i = call["index"].as_u64().unwrap() as usize;
                if i == a.calls.len() {
                    a.calls.push(Default::default());
                }
                let slot = &mut a.calls[i];
                if let Some(id) = call["id"].as_str() {
                    slot.0 = id.to_string();
                }
                if let Some(n) = call["function"]["name"].as_str() {
                    slot.1.push_str(n);
                }
                if let Some(args) = call["function"]["arguments"].as_str() {
                    slot.2.push_str(args);
                }
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                assert!(a.finish.is_none(), "finish_reason sent twice");
                a.finish = Some(f.to_string());
            }
        }
    }
    a
}

#[test]
fn anthropic_stream_to_openai_chunks() {
    let mut t = MessagesToChatStream::new(Some("gpt-4o".into()), true);
    let out = run(&mut t, &anthropic_stream(), true);
    let (chunks, done) = openai_frames(&out);
    assert!(done);
    let a = assemble_openai(&chunks);
    assert!(a.ids.iter().all(|id| id == "chatcmpl-014p7gG3wDgGV9EUtLvnow3U"));
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({ "role": "assistant", "content": "" }));
    assert!(chunks.iter().all(|c| c["model"] == "gpt-4o" && c.as_object().unwrap().contains_key("usage")));
    assert_eq!(a.content, "Okay, let me check the weather in San Francisco.");
    assert_eq!(a.calls.len(), 1);
    assert_eq!(a.calls[0].0, "toolu_01T1x1fJ34qAmk2tNTrN7Up6");
    assert_eq!(a.calls[0].1, "get_weather");
    let args: Value = serde_json::from_str(&a.calls[0].2).unwrap();
    assert_eq!(args, json!({ "location": "San Francisco, CA", "unit": "fahrenheit" }));
    assert_eq!(a.finish.as_deref(), Some("tool_calls"));
    assert_eq!(
        a.usage.unwrap(),
        json!({ "prompt_tokens": 572, "completion_tokens": 89, "total_tokens": 661,
                "prompt_tokens_details": { "cached_tokens": 100 } })
    );
    // The first tool-call delta carries id, type, name and empty arguments.
    let first_call = chunks.iter().find_map(|c| c["choices"][0]["delta"].get("tool_calls")).unwrap();
    assert_eq!(
        first_call,
        &json!([{ "index": 0, "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "type": "function",
                  "function": { "name": "get_weather", "arguments": "" } }])
    );
    // Nothing more after the end.
    let mut more = Vec::new();
    t.event(br#"{"type":"ping"}"#, &mut more);
    t.finish(&mut more);
    assert!(more.is_empty());
}

#[test]
fn anthropic_stream_without_usage_and_upstream_model() {
    let mut t = MessagesToChatStream::new(None, false);
    let (chunks, done) = openai_frames(&run(&mut t, &anthropic_stream(), false));
    assert!(done, "message_stop alone ends the stream");
    let a = assemble_openai(&chunks);
    assert!(a.usage.is_none());
    assert!(chunks.iter().all(|c| c.get("usage").is_none() && c["model"] == "claude-sonnet-4-5-20250929"));
}

#[test]
fn anthropic_parallel_tool_calls_get_consecutive_indices() {
    let mut events = anthropic_stream();
    events.truncate(11); // up to the first tool's content_block_stop
    events.push(json!({ "type": "content_block_start", "index": 2, "content_block": {
        "type": "tool_use", "id": "toolu_02", "name": "get_time", "input": {} } }));
    events.push(json!({ "type": "content_block_delta", "index": 2, "delta": { "type": "input_json_delta", "partial_json": "{\"tz\":\"PST\"}" } }));
    events.push(json!({ "type": "content_block_stop", "index": 2 }));
    events.push(json!({ "type": "message_delta", "delta": { "stop_reason": "tool_use", "stop_sequence": null }, "usage": { "output_tokens": 120 } }));
    events.push(json!({ "type": "message_stop" }));
    let (chunks, _) = openai_frames(&run(&mut MessagesToChatStream::new(None, true), &events, true));
    let a = assemble_openai(&chunks);
    assert_eq!(a.calls.len(), 2);
    assert_eq!(
        (a.calls[1].0.as_str(), a.calls[1].1.as_str(), a.calls[1].2.as_str()),
        ("toolu_02", "get_time", "{\"tz\":\"PST\"}")
    );
}

#[test]
fn anthropic_stop_reasons_in_stream() {
    for (stop, finish) in
        [("end_turn", "stop"), ("max_tokens", "length"), ("refusal", "content_filter"), ("pause_turn", "stop")]
    {
        let events = [
            anthropic_stream()[0].clone(),
            json!({ "type": "message_delta", "delta": { "stop_reason": stop, "stop_sequence": null }, "usage": { "output_tokens": 1 } }),
            json!({ "type": "message_stop" }),
        ];
        let (chunks, _) = openai_frames(&run(&mut MessagesToChatStream::new(None, false), &events, true));
        assert_eq!(assemble_openai(&chunks).finish.as_deref(), Some(finish), "{stop}");
    }
}

#[test]
fn anthropic_error_event_becomes_error_chunk() {
    let mut events = anthropic_stream();
    events.truncate(4);
    events.push(json!({ "type": "error", "error": { "type": "overloaded_error", "message": "Overloaded" } }));
    events.push(
        json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": "ignored" } }),
    );
    let mut t = MessagesToChatStream::new(None, true);
    let (chunks, done) = openai_frames(&run(&mut t, &events, true));
    assert!(done);
    let last = chunks.last().unwrap();
    check_chunk(last);
    assert_eq!(
        last,
        &json!({ "error": { "message": "Overloaded", "type": "server_error", "param": null, "code": "overloaded_error" } })
    );
    assert!(!chunks.iter().any(|c| c.to_string().contains("ignored")));
}

#[test]
fn anthropic_finish_without_message_stop() {
    // Ended after message_delta: complete, only the terminator is missing.
    let mut events = anthropic_stream();
    events.pop();
    let mut t = MessagesToChatStream::new(None, true);
    let (chunks, done) = openai_frames(&run(&mut t, &events, true));
    assert!(done);
    let a = assemble_openai(&chunks);
    assert_eq!(a.finish.as_deref(), Some("tool_calls"));
    assert_eq!(a.usage.unwrap()["completion_tokens"], 89);

    // Cut mid-answer: an error chunk so the client does not take it as complete, then [DONE].
    let mut events = anthropic_stream();
    events.truncate(5);
    let (chunks, done) = openai_frames(&run(&mut MessagesToChatStream::new(None, true), &events, true));
    assert!(done);
    let last = chunks.last().unwrap();
    check_chunk(last);
    assert_eq!(last["error"]["type"], "server_error");
    assert!(assemble_openai(&chunks[..chunks.len() - 1]).finish.is_none());

    // Nothing at all.
    let (chunks, done) = openai_frames(&run(&mut MessagesToChatStream::new(None, false), &[], true));
    assert!(done && chunks.len() == 1 && chunks[0].get("error").is_some());
}

#[test]
fn anthropic_garbage_events_are_skipped() {
    let mut t = MessagesToChatStream::new(None, false);
    let mut out = Vec::new();
    t.event(b"not json", &mut out);
    t.event(b"[1,2]", &mut out);
    t.event(
        br#"{"type":"content_block_delta","index":7,"delta":{"type":"input_json_delta","partial_json":"{}"}}"#,
        &mut out,
    );
    t.event(
        br#"{"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"hmm"}}"#,
        &mut out,
    );
    assert!(out.is_empty());
}

/// An OpenAI stream (include_usage) with text then two parallel tool calls.
fn openai_stream() -> Vec<Value> {
    let chunk = |delta: Value, finish: Value| {
        json!({ "id": "chatcmpl-AbC123", "object": "chat.completion.chunk", "created": 1727000000,
                "model": "gpt-4o-2024-08-06", "system_fingerprint": "fp_1", "usage": null,
                "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }] })
    };
    let call = |index: u64, id: Option<&str>, name: Option<&str>, args: &str| {
        let mut c = json!({ "index": index, "function": { "arguments": args } });
        if let Some(id) = id {
            c["id"] = json!(id);
            c["type"] = json!("function");
        }
        if let Some(name) = name {
            c["function"]["name"] = json!(name);
        }
        json!({ "tool_calls": [c] })
    };
    vec![
        chunk(json!({ "role": "assistant", "content": "", "refusal": null }), Value::Null),
        chunk(json!({ "content": "Checking " }), Value::Null),
        chunk(json!({ "content": "both cities." }), Value::Null),
        chunk(call(0, Some("call_Lyon"), Some("get_weather"), ""), Value::Null),
        chunk(call(0, None, None, "{\"city\""), Value::Null),
        chunk(call(0, None, None, ":\"Lyon\"}"), Value::Null),
        chunk(call(1, Some("call_Paris"), Some("get_weather"), ""), Value::Null),
        chunk(call(1, None, None, "{\"city\":\"Paris\"}"), Value::Null),
        chunk(json!({}), json!("tool_calls")),
        json!({ "id": "chatcmpl-AbC123", "object": "chat.completion.chunk", "created": 1727000000,
                "model": "gpt-4o-2024-08-06", "choices": [],
                "usage": { "prompt_tokens": 300, "completion_tokens": 40, "total_tokens": 340,
                           "prompt_tokens_details": { "cached_tokens": 256 } } }),
    ]
}

/// What an Anthropic client rebuilds from events; also checks the event grammar.
#[derive(Debug, Default)]
struct Rebuilt {
    blocks: Vec<Value>,
    stop_reason: Option<String>,
    usage: Option<Value>,
    message: Option<Value>,
    stopped: bool,
    error: Option<Value>,
}

fn assemble_anthropic(events: &[Value]) -> Rebuilt {
    let mut r = Rebuilt::default();
    let mut open: Option<(u64, String)> = None;
    for (n, e) in events.iter().enumerate() {
        assert!(!r.stopped, "event after message_stop: {e}");
        match e["type"].as_str().unwrap() {
            "message_start" => {
                assert_eq!(n, 0, "message_start first");
                r.message = Some(e["message"].clone());
            }
            "content_block_start" => {
                assert!(open.is_none(), "blocks never overlap");
                let i = e["index"].as_u64().unwrap();
                assert_eq!(i as usize, r.blocks.len(), "block indices are consecutive");
                r.blocks.push(e["content_block"].clone());
                open = Some((i, String::new()));
            }
            "content_block_delta" => {
                let (i, json_buf) = open.as_mut().expect("delta inside a block");
                assert_eq!(e["index"].as_u64().unwrap(), *i);
                let block = &mut r.blocks[*i as usize];
                match e["delta"]["type"].as_str().unwrap() {
                    "text_delta" => {
                        let t = format!("{}{}", block["text"].as_str().unwrap(), e["delta"]["text"].as_str().unwrap());
                        block["text"] = json!(t);
                    }
                    _ => json_buf.push_str(e["delta"]["partial_json"].as_str().unwrap()),
                }
            }
            "content_block_stop" => {
                let (i, json_buf) = open.take().expect("stop inside a block");
                assert_eq!(e["index"].as_u64().unwrap(), i);
                if !json_buf.is_empty() {
                    // A truncated stream leaves partial JSON: keep it raw.
                    let input = serde_json::from_str(&json_buf).unwrap_or(Value::String(json_buf));
                    r.blocks[i as usize]["input"] = input;
                }
            }
            "message_delta" => {
                assert!(open.is_none(), "message_delta after the last block closed");
                r.stop_reason = e["delta"]["stop_reason"].as_str().map(str::to_string);
                r.usage = Some(e["usage"].clone());
            }
            "message_stop" => r.stopped = true,
            "error" => r.error = Some(e["error"].clone()),
            other => panic!("unexpected {other}"),
        }
    }
    r
}

#[test]
fn openai_stream_to_anthropic_events() {
    let mut t = ChatToMessagesStream::new(Some("claude-sonnet-4-5".into()));
    let mut out = run(&mut t, &openai_stream(), false);
    t.event(b"[DONE]", &mut out);
    t.finish(&mut out);
    let frames = anthropic_frames(&out);
    let r = assemble_anthropic(&frames);
    let message = r.message.unwrap();
    assert_eq!(message["id"], "msg_AbC123");
    assert_eq!(message["model"], "claude-sonnet-4-5");
    assert_eq!(
        r.blocks,
        vec![
            json!({ "type": "text", "text": "Checking both cities." }),
            json!({ "type": "tool_use", "id": "call_Lyon", "name": "get_weather", "input": { "city": "Lyon" } }),
            json!({ "type": "tool_use", "id": "call_Paris", "name": "get_weather", "input": { "city": "Paris" } }),
        ]
    );
    assert_eq!(r.stop_reason.as_deref(), Some("tool_use"));
    assert_eq!(
        r.usage.unwrap(),
        json!({ "input_tokens": 44, "output_tokens": 40, "cache_read_input_tokens": 256, "cache_creation_input_tokens": 0 })
    );
    assert!(r.stopped && r.error.is_none());
    assert_eq!(frames.iter().filter(|f| f["type"] == "message_stop").count(), 1);
}

#[test]
fn openai_text_after_tool_call_opens_a_new_block() {
    let chunk = |delta: Value| {
        json!({ "id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{ "index": 0, "delta": delta, "finish_reason": null }] })
    };
    let events = vec![
        chunk(
            json!({ "tool_calls": [{ "index": 0, "id": "call_1", "type": "function", "function": { "name": "f", "arguments": "{}" } }] }),
        ),
        chunk(json!({ "content": "done" })),
        // A late fragment of the closed call cannot be placed: dropped.
        chunk(json!({ "tool_calls": [{ "index": 0, "function": { "arguments": "x" } }] })),
        json!({ "id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{ "index": 0, "delta": {}, "finish_reason": "stop" }],
                "usage": { "prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7 } }),
    ];
    let r = assemble_anthropic(&anthropic_frames(&run(&mut ChatToMessagesStream::new(None), &events, true)));
    assert_eq!(
        r.blocks,
        vec![
            json!({ "type": "tool_use", "id": "call_1", "name": "f", "input": {} }),
            json!({ "type": "text", "text": "done" }),
        ]
    );
    assert_eq!(r.message.unwrap()["model"], "m");
    assert_eq!(r.stop_reason.as_deref(), Some("end_turn"));
    assert_eq!(r.usage.unwrap()["input_tokens"], 5);
    assert!(r.stopped);
}

#[test]
fn openai_finish_without_done() {
    // Finish reason and usage seen: the message already ended at the usage chunk.
    let out = run(&mut ChatToMessagesStream::new(None), &openai_stream(), true);
    let r = assemble_anthropic(&anthropic_frames(&out));
    assert!(r.stopped && r.error.is_none());

    // Finish reason without a usage chunk (upstream not asked for usage): ended by `finish`.
    let mut events = openai_stream();
    events.pop();
    let mut t = ChatToMessagesStream::new(None);
    let before = run(&mut t, &events, false);
    assert!(!assemble_anthropic(&anthropic_frames(&before)).stopped, "held until usage or the end");
    let mut out = before;
    t.finish(&mut out);
    let r = assemble_anthropic(&anthropic_frames(&out));
    assert!(r.stopped && r.error.is_none());
    assert_eq!(r.stop_reason.as_deref(), Some("tool_use"));
    assert_eq!(r.usage.unwrap()["output_tokens"], 0);

    // Cut mid-answer: the open block is closed, an error event, then message_stop.
    let mut events = openai_stream();
    events.truncate(5);
    let r = assemble_anthropic(&anthropic_frames(&run(&mut ChatToMessagesStream::new(None), &events, true)));
    assert!(r.stopped);
    assert_eq!(r.error.unwrap()["type"], "api_error");
    assert!(r.stop_reason.is_none());

    // Nothing at all.
    let frames = anthropic_frames(&run(&mut ChatToMessagesStream::new(None), &[], true));
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[1]["type"], "message_stop");
}

#[test]
fn openai_done_without_finish_reason_ends_normally() {
    let mut events = openai_stream();
    events.truncate(3);
    let mut t = ChatToMessagesStream::new(None);
    let mut out = run(&mut t, &events, false);
    t.event(b" [DONE] ", &mut out);
    t.finish(&mut out);
    let r = assemble_anthropic(&anthropic_frames(&out));
    assert!(r.stopped && r.error.is_none());
    assert_eq!(r.stop_reason.as_deref(), Some("end_turn"));
}

#[test]
fn openai_error_chunk_becomes_error_event() {
    let mut events = openai_stream();
    events.truncate(2);
    events.push(json!({ "error": { "message": "The server had an error while processing your request.", "type": "server_error", "param": null, "code": null } }));
    events.push(json!({ "id": "chatcmpl-AbC123", "choices": [{ "index": 0, "delta": { "content": "ignored" } }] }));
    let mut t = ChatToMessagesStream::new(None);
    let out = run(&mut t, &events, true);
    let frames = anthropic_frames(&out);
    let r = assemble_anthropic(&frames);
    assert_eq!(
        r.error.unwrap(),
        json!({ "type": "api_error", "message": "The server had an error while processing your request." })
    );
    assert!(r.stopped);
    assert!(!String::from_utf8(out).unwrap().contains("ignored"));

    let rate = [json!({ "error": { "message": "slow down", "type": "requests", "code": "rate_limit_exceeded" } })];
    let r = assemble_anthropic(&anthropic_frames(&run(&mut ChatToMessagesStream::new(None), &rate, true)));
    assert_eq!(r.error.unwrap()["type"], "rate_limit_error");
}

#[test]
fn openai_usage_on_finish_chunk_ends_immediately() {
    let events = [json!({ "id": "chatcmpl-z", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{ "index": 0, "delta": { "content": "hi" }, "finish_reason": "length" }],
        "usage": { "prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4 } })];
    let r = assemble_anthropic(&anthropic_frames(&run(&mut ChatToMessagesStream::new(None), &events, false)));
    assert!(r.stopped);
    assert_eq!(r.stop_reason.as_deref(), Some("max_tokens"));
    assert_eq!(r.blocks, vec![json!({ "type": "text", "text": "hi" })]);
}

#[test]
fn stream_translators_are_send_trait_objects() {
    fn assert_send<T: Send>(_: &T) {}
    let a: Box<dyn StreamTranslator> = Box::new(MessagesToChatStream::new(None, false));
    let b: Box<dyn StreamTranslator> = Box::new(ChatToMessagesStream::new(None));
    assert_send(&a);
    assert_send(&b);
}
