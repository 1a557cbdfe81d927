//! Tests of the OpenAI request and response readers (split from `openai.rs`).
use super::*;

/// Counts near `u64::MAX` (a broken or hostile upstream) saturate instead of overflowing
/// (a panic with overflow checks, a wrapped total without): found writing the `json_cursor`
/// fuzz target's reference.
#[test]
fn huge_usage_counts_saturate() {
    let body = br#"{"choices":[],"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":2}}"#;
    let u = parse_response(body).and_then(|r| r.usage).map(|u| u.to_usage()).expect("usage");
    assert_eq!((u.input, u.output, u.total), (u64::MAX, 2, u64::MAX));
}

#[test]
fn recognises_chat_paths() {
    let post = http::Method::POST;
    assert!(is_chat_completions(&post, "/v1/chat/completions"));
    assert!(is_chat_completions(&post, "/openai/deployments/x/chat/completions"));
    assert!(!is_chat_completions(&http::Method::GET, "/v1/chat/completions"));
    assert!(!is_chat_completions(&post, "/v1/completions"));
}

#[test]
fn include_usage_added_only_when_needed() {
    let plain = br#"{"model":"gpt-4o","messages":[]}"#;
    let i = inspect_request(plain).unwrap();
    assert_eq!(i.model.as_deref(), Some("gpt-4o"));
    assert!(!needs_usage_injection(&i));

    let asked = br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
    assert!(!needs_usage_injection(&inspect_request(asked).unwrap()));

    let stream = br#"  {"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let i = inspect_request(stream).unwrap();
    assert!(needs_usage_injection(&i));
    let out = inject_include_usage(stream, &i).unwrap();
    assert_eq!(
        &out[..],
        &br#"  {"stream_options":{"include_usage":true},"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#[..]
    );
    assert!(inspect_request(&out).unwrap().include_usage);

    let off = br#"{"stream":true,"stream_options":{"include_usage":false,"x":1}}"#;
    let i = inspect_request(off).unwrap();
    assert!(i.has_stream_options && needs_usage_injection(&i));
    let out: serde_json::Value = serde_json::from_slice(&inject_include_usage(off, &i).unwrap()).unwrap();
    assert_eq!(out["stream_options"], serde_json::json!({"include_usage": true, "x": 1}));

    let null = br#"{"stream":true,"stream_options":null}"#;
    let i = inspect_request(null).unwrap();
    let out: serde_json::Value = serde_json::from_slice(&inject_include_usage(null, &i).unwrap()).unwrap();
    assert_eq!(out["stream_options"]["include_usage"], true);

    assert!(inspect_request(b"[1,2]").is_none());
}

#[test]
fn usage_with_cached_and_reasoning_tokens() {
    let body = br#"{"id":"chatcmpl-1","object":"chat.completion","model":"o3-mini-2025-01-31",
        "choices":[{"index":0,"message":{"role":"assistant","content":"x"},"finish_reason":"stop"}],
        "usage":{"prompt_tokens":1200,"completion_tokens":300,"total_tokens":1500,
          "prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},
          "completion_tokens_details":{"reasoning_tokens":256,"audio_tokens":0}}}"#;
    let r = parse_response(body).unwrap();
    assert_eq!(r.id.as_deref(), Some("chatcmpl-1"));
    assert_eq!(r.model.as_deref(), Some("o3-mini-2025-01-31"));
    assert_eq!(r.choices.as_ref().unwrap().finish_reasons, vec!["stop"]);
    assert!(!r.is_usage_only());
    let u = r.usage.unwrap().to_usage();
    assert_eq!(
        u,
        Usage {
            input: 1200,
            output: 300,
            total: 1500,
            cached_input: Some(1024),
            reasoning: Some(256),
            estimated: false
        }
    );
    // Minimal servers: no total, no details.
    let r = parse_response(br#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}"#).unwrap();
    assert!(r.is_usage_only());
    let u = r.usage.unwrap().to_usage();
    assert_eq!((u.total, u.cached_input, u.reasoning), (7, None, None));
}

#[test]
fn usage_only_chunk_detection() {
    let usage_only = br#"{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":1}}"#;
    assert!(parse_response(usage_only).unwrap().is_usage_only());
    let with_choice = br#"{"choices":[{"delta":{"content":"a\"b"},"finish_reason":null}],"usage":null}"#;
    let r = parse_response(with_choice).unwrap();
    assert!(!r.is_usage_only());
    assert_eq!(r.choices.unwrap().len, 1);
    assert!(parse_response(b"[DONE]").is_none());
}

#[test]
fn null_usage_is_removed_byte_exactly() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{"id":"c","choices":[{"delta":{"content":"usage"}}],"usage":null}"#,
            r#"{"id":"c","choices":[{"delta":{"content":"usage"}}]}"#,
        ),
        (r#"{"usage":null,"id":"c"}"#, r#"{"id":"c"}"#),
        (r#"{ "usage" : null , "id":"c"}"#, r#"{ "id":"c"}"#),
        (r#"{"id":"c", "usage": null, "model":"m"}"#, r#"{"id":"c", "model":"m"}"#),
        (r#"{"usage":null}"#, r#"{}"#),
    ];
    for (input, want) in cases {
        let got = without_null_usage(input.as_bytes()).unwrap_or_else(|| panic!("not stripped: {input}"));
        assert_eq!(String::from_utf8(got).unwrap(), *want);
        serde_json::from_str::<serde_json::Value>(want).unwrap();
    }
    for kept in [
        r#"{"id":"c","choices":[],"usage":{"prompt_tokens":1}}"#,
        r#"{"id":"c","choices":[{"delta":{"usage":null}}]}"#,
        r#"{"id":"c","choices":[{"delta":{"content":"\"usage\":null"}}]}"#,
        r#"{"id":"c"}"#,
        "[DONE]",
    ] {
        assert_eq!(without_null_usage(kept.as_bytes()), None, "{kept}");
    }
}

/// Bodies of the usual shapes: all must take the fast path.
const RESPONSES: &[&str] = &[
    r#"{"choices":[{"finish_reason":"stop","index":0,"logprobs":null,"message":{"annotations":[],"content":"socket orbit \"lantern\"\nsplice","refusal":null,"role":"assistant"}}],"created":1704748068,"id":"chatcmpl-mock3ad7","model":"gpt-4o-mini","object":"chat.completion","service_tier":"default","system_fingerprint":"fp_mock0001","usage":{"completion_tokens":95,"completion_tokens_details":{"accepted_prediction_tokens":0,"audio_tokens":0,"reasoning_tokens":23,"rejected_prediction_tokens":0},"prompt_tokens":156,"prompt_tokens_details":{"audio_tokens":0,"cached_tokens":52},"total_tokens":251}}"#,
    r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"Hi \u00e9\t"},"logprobs":null,"finish_reason":null}]}"#,
    r#"{"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11,"prompt_tokens_details":null}}"#,
    r#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
    "{\n  \"id\" : \"x\" ,\r\n\t\"choices\" : [ { \"finish_reason\" : \"length\" } , { } ] ,\n  \"model\" : null\n}\n",
    r#"{"choices":null,"usage":null,"id":null,"model":null,"error":null}"#,
    r#"{"created":-1.5e+10,"x":[true,false,null,0,{"a":{}},[]],"usage":{"prompt_tokens":0,"completion_tokens_details":{"reasoning_tokens":18446744073709551615}}}"#,
    "{\"choices\":[{\"message\":{\"content\":\"h\u{e9}llo \u{1f600}\"},\"finish_reason\":\"length\"},{\"finish_reason\":\"stop\"}],\"model\":\"m\u{e9}\"}",
    "{}",
];

const REQUESTS: &[&str] = &[
    r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are a concise assistant."},{"role":"user","content":"Summarize the \"notes\"\n"}],"max_tokens":95}"#,
    r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":false,"x":1},"messages":[{"role":"user","content":"hi"}]}"#,
    r#"{"stream":true,"stream_options":null}"#,
    "  {\"model\":\"m\",\"messages\":[],\"stream\":false,\"temperature\":0.2,\"tools\":[{\"type\":\"function\",\"function\":{\"name\":\"f\",\"parameters\":{\"type\":\"object\"}}}]}  ",
    r#"{"stream_options":{"include_usage":true},"stream":null,"model":null}"#,
];

/// Deterministic xorshift.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// `doc` with one to three random edits drawn from bytes that matter to JSON.
fn mutate(doc: &[u8], rng: &mut Rng) -> Vec<u8> {
    const PALETTE: &[u8] = b"\"\\{}[],:01-.eE+nultrfasu9 \n\x01\x1f\x7f\xc3\xa9\xff/bA";
    let mut m = doc.to_vec();
    for _ in 0..=rng.below(3) {
        let at = rng.below(m.len() + 1);
        let b = PALETTE[rng.below(PALETTE.len())];
        match rng.below(4) {
            0 if at < m.len() => m[at] = b,
            1 if at < m.len() => {
                m.remove(at);
            }
            2 => m.insert(at, b),
            _ => {
                let end = (at + rng.below(8)).min(m.len());
                let dup = m[at..end].to_vec();
                m.splice(at..at, dup);
            }
        }
    }
    m
}

#[test]
fn fast_paths_take_the_usual_shapes() {
    for doc in RESPONSES {
        let fast = fast_response(doc.as_bytes()).unwrap_or_else(|_| panic!("deferred: {doc}"));
        let serde: ResponseSummary<'_> = serde_json::from_slice(doc.as_bytes()).unwrap();
        assert_eq!(format!("{fast:?}"), format!("{serde:?}"));
    }
    for doc in REQUESTS {
        let fast = fast_request(doc.as_bytes()).unwrap_or_else(|_| panic!("deferred: {doc}"));
        let serde: RequestWire<'_> = serde_json::from_slice(doc.as_bytes()).unwrap();
        assert_eq!(request_info(fast), request_info(serde));
    }
}

/// Whatever the fast path accepts, serde_json accepts with the same result (it defers the
/// rest to serde_json, so overall behaviour is serde_json's).
#[test]
fn fast_paths_agree_with_serde_on_mutated_bodies() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut accepted, mut deferred) = (0, 0);
    for _ in 0..4000 {
        for doc in RESPONSES {
            let m = mutate(doc.as_bytes(), &mut rng);
            let Ok(fast) = fast_response(&m) else {
                deferred += 1;
                continue;
            };
            accepted += 1;
            let serde: ResponseSummary<'_> = serde_json::from_slice(&m)
                .unwrap_or_else(|e| panic!("fast path accepted {:?}; serde: {e}", String::from_utf8_lossy(&m)));
            assert_eq!(format!("{fast:?}"), format!("{serde:?}"), "{}", String::from_utf8_lossy(&m));
        }
        for doc in REQUESTS {
            let m = mutate(doc.as_bytes(), &mut rng);
            let Ok(fast) = fast_request(&m) else {
                deferred += 1;
                continue;
            };
            accepted += 1;
            let serde: RequestWire<'_> = serde_json::from_slice(&m)
                .unwrap_or_else(|e| panic!("fast path accepted {:?}; serde: {e}", String::from_utf8_lossy(&m)));
            assert_eq!(request_info(fast), request_info(serde), "{}", String::from_utf8_lossy(&m));
        }
    }
    // Both outcomes are exercised.
    assert!(accepted > 5000 && deferred > 5000, "accepted {accepted}, deferred {deferred}");
}
