//! OpenAI <-> Anthropic translators: requests, whole responses, error bodies and streams never
//! panic, and what they produce is well-formed for the client that reads it.
//!
//! Input: byte 0 picks the translator, the rest is its input. Streams are given as raw SSE
//! bytes (split into events by tollgate's own SSE parser, as the proxy does) and must produce:
//! - Anthropic client (`ChatToMessagesStream`): `event:`/`data:` pairs whose data is a JSON
//!   object whose `type` is the event name; at most one `message_start`, before any block;
//!   content blocks opened, written and closed in order without interleaving; exactly one
//!   `message_stop`, last;
//! - OpenAI client (`MessagesToChatStream`): JSON objects, then exactly one `[DONE]`, last.
//! A second `finish` appends nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tollgate::protocol::llm::sse::{SseEvent, SseParser};
use tollgate::protocol::llm::translate::{
    anthropic_error_to_openai, chat_request_to_messages, chat_response_to_messages, messages_request_to_chat,
    messages_response_to_chat, openai_error_to_anthropic, ChatToMessagesStream, MessagesToChatStream, StreamTranslator,
};

/// `(event name, data)` of every event of an SSE text.
fn events(sse: &[u8]) -> Vec<(Option<String>, Vec<u8>)> {
    let mut p = SseParser::new(usize::MAX);
    let mut data = Vec::new();
    p.feed(sse, |_, e| match e {
        SseEvent::Data(d) => data.push(d.to_vec()),
        SseEvent::NoData | SseEvent::Oversized => panic!("translator wrote an event without data"),
    });
    p.finish(|_, _| panic!("translator left an event unterminated"));
    // Names: the `event:` line preceding each data line (the parser reports data only).
    let names = sse
        .split(|&b| b == b'\n')
        .filter_map(|l| l.strip_prefix(b"event: ").map(|n| String::from_utf8_lossy(n).into_owned()));
    let names: Vec<String> = names.collect();
    let named = !names.is_empty();
    if named {
        assert_eq!(names.len(), data.len(), "every Anthropic event is named");
    }
    let mut names = names.into_iter();
    data.into_iter().map(|d| (if named { names.next() } else { None }, d)).collect()
}

fn upstream_events(input: &[u8], mut each: impl FnMut(&[u8])) {
    let mut p = SseParser::new(1 << 16);
    p.feed(input, |_, e| {
        if let SseEvent::Data(d) = e {
            each(d);
        }
    });
    p.finish(|_, e| {
        if let SseEvent::Data(d) = e {
            each(d);
        }
    });
}

fn json_object(b: &[u8], what: &str) -> serde_json::Map<String, Value> {
    match serde_json::from_slice::<Value>(b) {
        Ok(Value::Object(m)) => m,
        other => panic!("{what} is not a JSON object: {other:?}"),
    }
}

fn check_anthropic_stream(out: &[u8]) {
    let evs = events(out);
    let (mut started, mut stopped, mut open): (bool, bool, Option<u64>) = (false, false, None);
    let mut next_index = 0u64;
    for (name, data) in &evs {
        assert!(!stopped, "event after message_stop");
        let m = json_object(data, "Anthropic event");
        let ty = m.get("type").and_then(Value::as_str).expect("event type");
        assert_eq!(name.as_deref(), Some(ty), "event name differs from its type");
        let index = m.get("index").and_then(Value::as_u64);
        match ty {
            "message_start" => {
                assert!(!started, "second message_start");
                started = true;
            }
            "content_block_start" => {
                assert!(started, "block before message_start");
                assert_eq!(open, None, "block opened while another is open");
                assert_eq!(index, Some(next_index), "blocks are numbered in order");
                open = index;
                next_index += 1;
            }
            "content_block_delta" => assert!(open.is_some() && open == index, "delta outside its block"),
            "content_block_stop" => {
                assert!(open.is_some() && open == index, "stop of a block that is not open");
                open = None;
            }
            "message_delta" => assert_eq!(open, None, "message_delta with a block open"),
            "message_stop" => {
                assert_eq!(open, None, "message_stop with a block open");
                stopped = true;
            }
            "error" | "ping" => {}
            other => panic!("unknown event type {other}"),
        }
    }
    assert!(stopped, "stream not terminated by message_stop");
}

fn check_openai_stream(out: &[u8]) {
    let evs = events(out);
    let (last, rest) = evs.split_last().expect("at least [DONE]");
    assert_eq!(last.1, b"[DONE]", "stream not terminated by [DONE]");
    for (_, d) in rest {
        json_object(d, "chunk");
    }
}

fn stream(input: &[u8], t: &mut dyn StreamTranslator, check: fn(&[u8])) {
    let mut out = Vec::new();
    upstream_events(input, |d| t.event(d, &mut out));
    t.finish(&mut out);
    let n = out.len();
    t.finish(&mut out);
    assert_eq!(out.len(), n, "second finish wrote more");
    check(&out);
}

fuzz_target!(|data: &[u8]| {
    let [mode, input @ ..] = data else { return };
    match mode % 8 {
        0 => {
            if let Ok(out) = chat_request_to_messages(input, "claude-target", 1024) {
                let m = json_object(&out, "translated request");
                assert_eq!(m.get("model").and_then(Value::as_str), Some("claude-target"));
                assert!(m.get("max_tokens").and_then(Value::as_u64).is_some(), "max_tokens missing");
                assert!(m.get("messages").is_some_and(Value::is_array), "messages missing");
            }
        }
        1 => {
            if let Ok(out) = messages_request_to_chat(input, "gpt-target") {
                let m = json_object(&out, "translated request");
                assert_eq!(m.get("model").and_then(Value::as_str), Some("gpt-target"));
                assert!(m.get("messages").is_some_and(Value::is_array), "messages missing");
            }
        }
        2 => {
            if let Ok(out) = chat_response_to_messages(input, Some("claude-x")) {
                json_object(&out, "translated response");
            }
        }
        3 => {
            if let Ok(out) = messages_response_to_chat(input, None) {
                json_object(&out, "translated response");
            }
        }
        4 => {
            json_object(&anthropic_error_to_openai(429, input), "translated error");
            json_object(&openai_error_to_anthropic(400, input), "translated error");
        }
        5 => stream(input, &mut ChatToMessagesStream::new(None), check_anthropic_stream),
        6 => stream(input, &mut MessagesToChatStream::new(Some("gpt-4o".into()), true), check_openai_stream),
        _ => stream(input, &mut MessagesToChatStream::new(None, false), check_openai_stream),
    }
});
