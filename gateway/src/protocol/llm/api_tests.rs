//! Tests of API detection, request facts and response observation across providers.

use super::test_support::{call, run_json, run_sse, run_sse_every_split};
use super::*;

fn det(hint: ProviderKind, path: &str) -> Option<(Api, Option<String>)> {
    detect(hint, &http::Method::POST, path).map(|d| (d.api, d.path_model))
}

#[test]
fn detects_every_api_by_path() {
    use Api::*;
    let oa = ProviderKind::Openai;
    let cases: &[(&str, Api, Option<&str>)] = &[
        ("/v1/chat/completions", OpenAiChat, None),
        ("/chat/completions", OpenAiChat, None),
        ("/openai/v1/chat/completions", OpenAiChat, None),
        ("/api/v1/chat/completions?x=1", OpenAiChat, None),
        ("/v1beta/openai/chat/completions", OpenAiChat, None),
        ("/v1/responses", OpenAiResponses, None),
        ("/openai/v1/responses", OpenAiResponses, None),
        ("/openai/responses", OpenAiResponses, None),
        ("/v1/embeddings", OpenAiEmbeddings, None),
        ("/embeddings", OpenAiEmbeddings, None),
        ("/v1/completions", OpenAiCompletions, None),
        ("/openai/deployments/gpt-4o-prod/chat/completions?api-version=2024-10-21", OpenAiChat, Some("gpt-4o-prod")),
        ("/openai/deployments/inst/completions", OpenAiCompletions, Some("inst")),
        ("/openai/deployments/emb-3/embeddings", OpenAiEmbeddings, Some("emb-3")),
        ("/v1/messages", AnthropicMessages, None),
        ("/v1/messages/count_tokens", AnthropicCountTokens, None),
        ("/v1beta/models/gemini-2.5-flash:generateContent", GeminiGenerate, Some("gemini-2.5-flash")),
        (
            "/v1beta/models/gemini-2.0-flash-001:streamGenerateContent?alt=sse",
            GeminiStreamGenerate,
            Some("gemini-2.0-flash-001"),
        ),
        ("/v1/models/gemini-1.5-pro:countTokens", GeminiCountTokens, Some("gemini-1.5-pro")),
        ("/v1beta/models/text-embedding-004:embedContent", GeminiEmbed, Some("text-embedding-004")),
        ("/v1beta/models/gemini-2.5-pro%3AgenerateContent", GeminiGenerate, Some("gemini-2.5-pro")),
        (
            "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.0-flash:generateContent",
            GeminiGenerate,
            Some("gemini-2.0-flash"),
        ),
    ];
    for (path, api, model) in cases {
        assert_eq!(det(oa, path), Some((*api, model.map(str::to_string))), "{path}");
    }
    // Ambiguous alone: the route's provider decides.
    assert_eq!(det(ProviderKind::Anthropic, "/messages").map(|d| d.0), Some(AnthropicMessages));
    assert_eq!(
        det(ProviderKind::Anthropic, "/anthropic/messages/count_tokens").map(|d| d.0),
        Some(AnthropicCountTokens)
    );
    assert_eq!(det(oa, "/messages"), None);
    assert_eq!(det(ProviderKind::OpenaiCompatible, "/responses").map(|d| d.0), Some(OpenAiResponses));
    assert_eq!(det(ProviderKind::Anthropic, "/responses"), None);
    // Not calls.
    assert_eq!(detect(oa, &http::Method::GET, "/v1/chat/completions"), None);
    for path in ["/v1/models", "/v1/responses/resp_1/cancel", "/v1beta/models/x:batchEmbedContents", "/v1/files", "/"] {
        assert_eq!(det(oa, path), None, "{path}");
    }
}

#[test]
fn api_properties() {
    assert_eq!(Api::OpenAiResponses.operation(), "chat");
    assert_eq!(Api::GeminiStreamGenerate.operation(), "generate_content");
    assert_eq!(Api::OpenAiCompletions.operation(), "text_completion");
    assert_eq!(Api::GeminiEmbed.operation(), "embeddings");
    assert_eq!(Api::AnthropicCountTokens.operation(), "count_tokens");
    assert_eq!(Api::GeminiCountTokens.shape(), Shape::Gemini);
    assert!(Api::AnthropicMessages.is_generation() && !Api::OpenAiEmbeddings.is_generation());
    assert!(!Api::GeminiCountTokens.is_generation() && !Api::GeminiCountTokens.is_embedding());
}

#[test]
fn request_facts_per_api() {
    let chat = br#"{"model":"gpt-4o","stream":true,"messages":[]}"#;
    let f = inspect_request(Api::OpenAiChat, chat).unwrap();
    assert_eq!((f.model.as_deref(), f.stream, f.include_usage), (Some("gpt-4o"), true, false));
    assert!(needs_usage_injection(Api::OpenAiChat, &f));
    let out = inject_include_usage(chat, &f).unwrap();
    assert!(inspect_request(Api::OpenAiChat, &out).unwrap().include_usage);

    // Responses and Anthropic always report usage and reject unknown options.
    let f = inspect_request(Api::OpenAiResponses, br#"{"model":"o4-mini","input":"hi","stream":true}"#).unwrap();
    assert!(f.stream && f.include_usage && !needs_usage_injection(Api::OpenAiResponses, &f));
    let f = inspect_request(Api::AnthropicMessages, br#"{"model":"claude-opus-4-1","max_tokens":5,"stream":true}"#)
        .unwrap();
    assert_eq!((f.model.as_deref(), f.stream), (Some("claude-opus-4-1"), true));
    assert!(!needs_usage_injection(Api::AnthropicMessages, &f));

    let f = inspect_request(Api::GeminiStreamGenerate, br#" {"contents":[]}"#).unwrap();
    assert_eq!((f.model, f.stream), (None, true));
    assert!(!inspect_request(Api::GeminiGenerate, b"{}").unwrap().stream);
    assert_eq!(inspect_request(Api::GeminiGenerate, b"[]"), None);
    assert_eq!(inspect_request(Api::OpenAiChat, b"nope"), None);
}

#[test]
fn chat_usage_only_chunk_and_completions_and_embeddings() {
    let mut o = Observer::new(Api::OpenAiChat, Bytes::new(), false);
    let mut c = call(200);
    assert!(!o.observe(&mut c, br#"{"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":"stop"}]}"#));
    assert!(o.observe(&mut c, br#"{"id":"chatcmpl-1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11,"prompt_tokens_details":{"cached_tokens":0}}}"#));
    assert!(!o.observe(&mut c, b"[DONE]"));
    o.finish(&mut c);
    assert_eq!(
        (c.response_id.as_deref(), c.finish_reasons.as_slice()),
        (Some("chatcmpl-1"), &["stop".to_string()][..])
    );
    let u = c.usage.unwrap();
    assert_eq!((u.input, u.output, u.total, u.cached_input, u.estimated), (9, 2, 11, Some(0), false));

    let body = br#"{"id":"cmpl-9","object":"text_completion","created":1,"model":"gpt-3.5-turbo-instruct",
        "choices":[{"text":"\n\nThis is a test.","index":0,"logprobs":null,"finish_reason":"length"}],
        "usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
    let c = run_json(Api::OpenAiCompletions, body, 200, false);
    assert_eq!(c.finish_reasons, vec!["length"]);
    assert_eq!(c.usage.map(|u| (u.input, u.output, u.total)), Some((5, 7, 12)));

    let body = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0023064255,-0.009327292,-0.0028842222]}],
        "model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
    let c = run_json(Api::OpenAiEmbeddings, body, 200, false);
    assert_eq!(c.response_model.as_deref(), Some("text-embedding-3-small"));
    let u = c.usage.unwrap();
    assert_eq!((u.input, u.output, u.total, u.estimated), (8, 0, 8, false));

    let c = run_json(
        Api::OpenAiChat,
        br#"{"error":{"message":"Rate limit reached","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#,
        429,
        false,
    );
    assert_eq!((c.error.as_deref(), c.usage), (Some("Rate limit reached"), None));
}

const RESPONSES_STREAM: &str = concat!(
    "event: response.created\n",
    r#"data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","created_at":1741290958,"status":"in_progress","error":null,"incomplete_details":null,"model":"gpt-4.1-2025-04-14","output":[],"usage":null}}"#,
    "\n\nevent: response.in_progress\n",
    r#"data: {"type":"response.in_progress","sequence_number":1,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","status":"in_progress","model":"gpt-4.1-2025-04-14","output":[],"usage":null}}"#,
    "\n\nevent: response.output_text.delta\n",
    r#"data: {"type":"response.output_text.delta","sequence_number":4,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hello","logprobs":[]}"#,
    "\n\nevent: response.output_text.delta\n",
    r#"data: {"type":"response.output_text.delta","sequence_number":5,"item_id":"msg_1","output_index":0,"content_index":0,"delta":" world","logprobs":[]}"#,
    "\n\nevent: response.output_text.done\n",
    r#"data: {"type":"response.output_text.done","sequence_number":6,"item_id":"msg_1","output_index":0,"content_index":0,"text":"Hello world","logprobs":[]}"#,
    "\n\nevent: response.completed\n",
    r#"data: {"type":"response.completed","sequence_number":9,"response":{"id":"resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654","object":"response","status":"completed","error":null,"incomplete_details":null,"model":"gpt-4.1-2025-04-14","output":[{"type":"message","id":"msg_1","status":"completed","role":"assistant","content":[{"type":"output_text","text":"Hello world","annotations":[]}]}],"usage":{"input_tokens":1337,"input_tokens_details":{"cached_tokens":1152},"output_tokens":302,"output_tokens_details":{"reasoning_tokens":256},"total_tokens":1639}}}"#,
    "\n\n"
);

#[test]
fn responses_stream_any_chunking() {
    run_sse_every_split(Api::OpenAiResponses, RESPONSES_STREAM.as_bytes(), |c| {
        assert_eq!(c.response_id.as_deref(), Some("resp_67c9fdcecf488190bdd9a0409de3a1ec07b8b0ad4e5eb654"));
        assert_eq!(c.response_model.as_deref(), Some("gpt-4.1-2025-04-14"));
        assert_eq!(c.finish_reasons, vec!["completed"]);
        assert_eq!(
            c.usage,
            Some(Usage {
                input: 1337,
                output: 302,
                total: 1639,
                cached_input: Some(1152),
                reasoning: Some(256),
                estimated: false
            })
        );
        assert_eq!(c.error, None);
    });
}

#[test]
fn responses_bodies_incomplete_failed_and_errors() {
    let body = br#"{"id":"resp_1","object":"response","created_at":1,"status":"incomplete","error":null,
        "incomplete_details":{"reason":"max_output_tokens"},"model":"o4-mini-2025-04-16",
        "output":[{"type":"reasoning","id":"rs_1","summary":[]}],
        "usage":{"input_tokens":20,"input_tokens_details":{"cached_tokens":0},"output_tokens":16,"output_tokens_details":{"reasoning_tokens":16},"total_tokens":36}}"#;
    let c = run_json(Api::OpenAiResponses, body, 200, false);
    assert_eq!(
        (c.response_id.as_deref(), c.finish_reasons.as_slice()),
        (Some("resp_1"), &["max_output_tokens".to_string()][..])
    );
    assert_eq!(c.usage.map(|u| (u.input, u.output, u.reasoning)), Some((20, 16, Some(16))));

    let failed = "data: {\"type\":\"response.failed\",\"sequence_number\":3,\"response\":{\"id\":\"resp_2\",\"status\":\"failed\",\"model\":\"gpt-4.1\",\"error\":{\"code\":\"server_error\",\"message\":\"The model failed to generate a response.\"},\"usage\":null}}\n\n";
    let c = run_sse(Api::OpenAiResponses, failed.as_bytes(), &[], false);
    assert_eq!(c.error.as_deref(), Some("server_error: The model failed to generate a response."));
    assert_eq!(c.finish_reasons, vec!["failed"]);

    let ev = "event: error\ndata: {\"type\":\"error\",\"code\":\"ERR_SOMETHING\",\"message\":\"Something went wrong\",\"param\":null,\"sequence_number\":1}\n\n";
    let c = run_sse(Api::OpenAiResponses, ev.as_bytes(), &[], false);
    assert_eq!(c.error.as_deref(), Some("ERR_SOMETHING: Something went wrong"));

    let http = br#"{"error":{"message":"The model `gpt-9` does not exist or you do not have access to it.","type":"invalid_request_error","param":null,"code":"model_not_found"}}"#;
    let c = run_json(Api::OpenAiResponses, http, 404, false);
    assert_eq!(
        c.error.as_deref(),
        Some("model_not_found: The model `gpt-9` does not exist or you do not have access to it.")
    );
}

#[test]
fn unusual_payloads_still_read() {
    // Tool input nested deeper than the cursor skips, and an escaped member name.
    let deep = format!(
        r#"{{"id":"msg_d","type":"message","model":"claude-haiku-4-5","content":[{{"type":"tool_use","id":"t","name":"f","input":{{"a":{}1{}}}}}],"stop_reason":"tool_use","\u0075sage":{{"input_tokens":10,"output_tokens":20}}}}"#,
        "[".repeat(100),
        "]".repeat(100)
    );
    let c = run_json(Api::AnthropicMessages, deep.as_bytes(), 200, false);
    assert_eq!((c.response_id.as_deref(), c.finish_reasons.as_slice()), (Some("msg_d"), &["tool_use".to_string()][..]));
    assert_eq!(c.usage.map(|u| (u.input, u.output, u.estimated)), Some((10, 20, false)));

    // Garbage is ignored; an over-long error message is bounded.
    let mut c = call(200);
    let mut o = Observer::new(Api::GeminiGenerate, Bytes::new(), false);
    o.observe(&mut c, b"{not json");
    o.observe(&mut c, b"\"text\"");
    assert!(c.usage.is_none() && c.error.is_none());
    let long = format!(r#"{{"error":{{"code":500,"message":"{}","status":"INTERNAL"}}}}"#, "é".repeat(2000));
    o.observe(&mut c, long.as_bytes());
    let e = c.error.unwrap();
    assert!(e.starts_with("INTERNAL: éé") && e.len() <= MAX_ERROR_BYTES + 3, "{}", e.len());
}

#[test]
fn finish_reasons_are_bounded() {
    let choices: Vec<String> = (0..100).map(|i| format!(r#"{{"index":{i},"finish_reason":"stop"}}"#)).collect();
    let body = format!(r#"{{"choices":[{}]}}"#, choices.join(","));
    assert_eq!(run_json(Api::OpenAiChat, body.as_bytes(), 200, false).finish_reasons.len(), MAX_FINISH_REASONS);
}

#[test]
fn unreadable_request_bodies_name_the_reason() {
    use super::unreadable_request;
    let ok = br#"{"model":"m","stream":true,"messages":[]}"#;
    assert_eq!(unreadable_request(Api::OpenAiChat, ok), None);
    assert_eq!(unreadable_request(Api::AnthropicMessages, ok), None);
    assert_eq!(unreadable_request(Api::GeminiGenerate, br#" {"contents":[]}"#), None);
    let trailing = br#"{"contents":[{},],"messages":[]}"#;
    for api in [Api::OpenAiChat, Api::OpenAiResponses, Api::AnthropicMessages, Api::GeminiStreamGenerate] {
        let why = unreadable_request(api, trailing).expect("trailing comma");
        assert!(why.contains("expected value at line 1 column 17"), "{api:?}: {why}");
        let why = unreadable_request(api, br#"{"contents":[],}"#).expect("trailing comma in an object");
        assert!(why.contains("key must be a string"), "{api:?}: {why}");
        let why = unreadable_request(api, b"\xef\xbb\xbf{}").expect("BOM");
        assert!(why.contains("expected value"), "{api:?}: {why}");
        let why = unreadable_request(api, br#"{"temperature":NaN}"#).expect("NaN");
        assert!(why.contains("expected value"), "{api:?}: {why}");
        assert_eq!(unreadable_request(api, b"[1]").as_deref(), Some("not a JSON object"));
    }
    let why = unreadable_request(Api::OpenAiChat, br#"{"stream":"yes"}"#).expect("wrong type");
    assert!(why.contains("unexpected type"), "{why}");
}

/// The terminal event of each streaming API marks the stream complete; nothing before it does.
#[test]
fn terminal_events_complete_the_stream() {
    let cases: &[(Api, &[&str], &str)] = &[
        (Api::OpenAiChat, &[r#"{"choices":[{"delta":{"content":"a"},"finish_reason":"stop"}]}"#], "[DONE]"),
        (
            Api::AnthropicMessages,
            &[r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":3}}"#],
            r#"{"type":"message_stop"}"#,
        ),
        (
            Api::GeminiStreamGenerate,
            &[r#"{"candidates":[{"content":{"parts":[{"text":"a"}]}}]}"#],
            r#"{"candidates":[{"content":{"parts":[{"text":"b"}]},"finishReason":"STOP"}]}"#,
        ),
        (
            Api::OpenAiResponses,
            &[r#"{"type":"response.output_text.delta","delta":"a"}"#, r#"{"type":"response.in_progress"}"#],
            r#"{"type":"response.completed","response":{"status":"completed"}}"#,
        ),
    ];
    for (api, before, last) in cases {
        let mut o = Observer::new(*api, Bytes::new(), false);
        o.streaming();
        let mut c = call(200);
        for d in *before {
            o.observe(&mut c, d.as_bytes());
            assert!(!o.complete(), "{api:?}: {d}");
        }
        o.observe(&mut c, last.as_bytes());
        assert!(o.complete(), "{api:?}: {last}");
    }
}
