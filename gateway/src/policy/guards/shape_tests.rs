//! Request shapes: which text fields each API's walker visits (with role and location), PII
//! rewriting in place for every shape, and the decorator for every shape.

use serde_json::{json, Value};

use super::engine_tests::guards;
use super::walk;
use super::*;
use crate::config::guards::{DecorateGuardConfig, DecorationMessage, DecorationRole, MessageRole};

/// (location, role, text) of every text field of a request.
fn texts(api: Api, body: &Value) -> Vec<(String, MessageRole, String)> {
    let mut v = Vec::new();
    walk::request(api, body, &mut |at, role, text| v.push((at.to_string(), role, text.to_string())));
    v
}

fn t(loc: &str, role: MessageRole, text: &str) -> (String, MessageRole, String) {
    (loc.to_string(), role, text.to_string())
}

use MessageRole::{Assistant as A, System as S, Tool as T, User as U};

#[test]
fn openai_chat_fields() {
    let body = json!({"messages": [
        {"role": "developer", "content": "dev"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": null, "tool_calls": [{"function": {"arguments": "{}"}}]},
        {"role": "tool", "content": "result"},
    ]});
    assert_eq!(
        texts(Api::OpenAiChat, &body),
        vec![
            t("messages[0].content", S, "dev"),
            t("messages[1].content[0].text", U, "hi"),
            t("messages[3].content", T, "result")
        ]
    );
}

#[test]
fn openai_responses_fields() {
    let body = json!({"instructions": "be nice", "input": [
        {"role": "user", "content": "plain"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "earlier"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "parts"}, {"type": "input_image"}]},
        {"type": "function_call", "arguments": "{}"},
        {"type": "function_call_output", "output": "tool says"},
    ]});
    assert_eq!(
        texts(Api::OpenAiResponses, &body),
        vec![
            t("instructions", S, "be nice"),
            t("input[0].content", U, "plain"),
            t("input[1].content[0].text", A, "earlier"),
            t("input[2].content[0].text", U, "parts"),
            t("input[4].output", T, "tool says"),
        ]
    );
    assert_eq!(texts(Api::OpenAiResponses, &json!({"input": "just text"})), vec![t("input", U, "just text")]);
}

#[test]
fn anthropic_fields() {
    let body = json!({
        "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "tool_use", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "content": "r1"},
                {"type": "tool_result", "content": [{"type": "text", "text": "r2"}]},
                {"type": "text", "text": "q2"},
            ]},
        ]
    });
    assert_eq!(
        texts(Api::AnthropicMessages, &body),
        vec![
            t("system[0].text", S, "sys"),
            t("messages[0].content", U, "q"),
            t("messages[1].content[0].text", A, "a"),
            t("messages[2].content[0].content", T, "r1"),
            t("messages[2].content[1].content[0].text", T, "r2"),
            t("messages[2].content[2].text", U, "q2"),
        ]
    );
    assert_eq!(texts(Api::AnthropicCountTokens, &json!({"system": "s"})), vec![t("system", S, "s")]);
}

#[test]
fn gemini_fields() {
    let body = json!({
        "systemInstruction": {"parts": [{"text": "sys"}]},
        "contents": [
            {"role": "user", "parts": [{"text": "q"}, {"inlineData": {}}]},
            {"role": "model", "parts": [{"text": "a"}]},
            {"parts": [{"text": "no role"}]},
        ]
    });
    assert_eq!(
        texts(Api::GeminiGenerate, &body),
        vec![
            t("systemInstruction.parts[0].text", S, "sys"),
            t("contents[0].parts[0].text", U, "q"),
            t("contents[1].parts[0].text", A, "a"),
            t("contents[2].parts[0].text", U, "no role"),
        ]
    );
    let snake = json!({"system_instruction": {"parts": [{"text": "s"}]}});
    assert_eq!(texts(Api::GeminiStreamGenerate, &snake), vec![t("system_instruction.parts[0].text", S, "s")]);
    assert_eq!(
        texts(Api::GeminiEmbed, &json!({"content": {"parts": [{"text": "e"}]}})),
        vec![t("content.parts[0].text", U, "e")]
    );
}

#[test]
fn completions_and_embeddings_fields() {
    assert_eq!(texts(Api::OpenAiCompletions, &json!({"prompt": "p"})), vec![t("prompt", U, "p")]);
    assert_eq!(
        texts(Api::OpenAiEmbeddings, &json!({"input": ["a", 1, "b"]})),
        vec![t("input[0]", U, "a"), t("input[2]", U, "b")]
    );
    assert_eq!(texts(Api::OpenAiEmbeddings, &json!({"input": [1, 2, 3]})), vec![]);
    assert_eq!(texts(Api::OpenAiChat, &json!("not an object")), vec![]);
}

#[test]
fn pii_rewrites_every_request_shape_in_place() {
    let g = guards("- kind: pii\n  name: p\n  entities: { email: redact }\n");
    let e = "mail a@example.com";
    let r = "mail [REDACTED:EMAIL]";
    let cases = [
        (
            Api::OpenAiChat,
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": e}]}]}),
            "/messages/0/content/0/text",
        ),
        (Api::OpenAiResponses, json!({"input": e}), "/input"),
        (
            Api::OpenAiResponses,
            json!({"input": [{"role": "user", "content": [{"type": "input_text", "text": e}]}]}),
            "/input/0/content/0/text",
        ),
        (Api::AnthropicMessages, json!({"system": e, "messages": []}), "/system"),
        (
            Api::AnthropicMessages,
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": e}]}]}),
            "/messages/0/content/0/text",
        ),
        (Api::GeminiGenerate, json!({"contents": [{"parts": [{"text": e}]}]}), "/contents/0/parts/0/text"),
        (
            Api::GeminiGenerate,
            json!({"systemInstruction": {"parts": [{"text": e}]}}),
            "/systemInstruction/parts/0/text",
        ),
        (Api::OpenAiCompletions, json!({"prompt": [e]}), "/prompt/0"),
    ];
    for (api, mut body, ptr) in cases {
        let len = body.to_string().len() as u64;
        let out = g.check_request_with(api, len, &mut body, &mut || None);
        assert!(out.modified, "{api:?} {body}");
        assert_eq!(body.pointer(ptr), Some(&json!(r)), "{api:?} {body}");
        assert_eq!(out.findings[0].location.pointer(), ptr);
    }
}

fn decorator(prepend: &[(DecorationRole, &str)], append: &[(DecorationRole, &str)]) -> Decorator {
    let list = |l: &[(DecorationRole, &str)]| {
        l.iter().map(|(role, c)| DecorationMessage { role: *role, content: c.to_string() }).collect()
    };
    Decorator::new(&DecorateGuardConfig { name: "d".into(), prepend: list(prepend), append: list(append) })
        .expect("decorator")
}

fn both() -> Decorator {
    use DecorationRole::*;
    decorator(&[(System, "S1"), (User, "U1")], &[(Assistant, "A9"), (System, "S9")])
}

#[test]
fn decorate_openai_chat() {
    let mut body = json!({"messages": [{"role": "user", "content": "q"}]});
    assert_eq!(both().apply(Api::OpenAiChat, &mut body), Ok(true));
    assert_eq!(
        body["messages"],
        json!([
            {"role": "system", "content": "S1"},
            {"role": "user", "content": "U1"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "A9"},
            {"role": "system", "content": "S9"},
        ])
    );
}

#[test]
fn decorate_openai_responses() {
    let mut body = json!({"input": "q"});
    assert_eq!(both().apply(Api::OpenAiResponses, &mut body), Ok(true));
    let roles: Vec<_> =
        body["input"].as_array().expect("array").iter().map(|m| (m["role"].clone(), m["content"].clone())).collect();
    assert_eq!(
        roles,
        vec![
            (json!("system"), json!("S1")),
            (json!("user"), json!("U1")),
            (json!("user"), json!("q")),
            (json!("assistant"), json!("A9")),
            (json!("system"), json!("S9")),
        ]
    );
}

#[test]
fn decorate_anthropic() {
    let mut body = json!({"system": "orig", "messages": [{"role": "user", "content": "q"}]});
    assert_eq!(both().apply(Api::AnthropicMessages, &mut body), Ok(true));
    assert_eq!(
        body["system"],
        json!([{"type": "text", "text": "S1"}, {"type": "text", "text": "orig"}, {"type": "text", "text": "S9"}])
    );
    assert_eq!(
        body["messages"],
        json!([{"role": "user", "content": "U1"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "A9"}])
    );
    let mut bare = json!({"messages": []});
    decorator(&[(DecorationRole::System, "S")], &[]).apply(Api::AnthropicMessages, &mut bare).expect("ok");
    assert_eq!(bare["system"], json!("S"));
    let mut blocks = json!({"system": [{"type": "text", "text": "x"}], "messages": []});
    decorator(&[], &[(DecorationRole::System, "S")]).apply(Api::AnthropicMessages, &mut blocks).expect("ok");
    assert_eq!(blocks["system"], json!([{"type": "text", "text": "x"}, {"type": "text", "text": "S"}]));
}

#[test]
fn decorate_gemini() {
    let mut body = json!({"contents": [{"role": "user", "parts": [{"text": "q"}]}]});
    assert_eq!(both().apply(Api::GeminiGenerate, &mut body), Ok(true));
    assert_eq!(body["systemInstruction"], json!({"parts": [{"text": "S1"}, {"text": "S9"}]}));
    assert_eq!(
        body["contents"],
        json!([
            {"role": "user", "parts": [{"text": "U1"}]},
            {"role": "user", "parts": [{"text": "q"}]},
            {"role": "model", "parts": [{"text": "A9"}]},
        ])
    );
    let mut snake = json!({"system_instruction": {"parts": [{"text": "x"}]}, "contents": []});
    decorator(&[(DecorationRole::System, "S")], &[]).apply(Api::GeminiStreamGenerate, &mut snake).expect("ok");
    assert_eq!(snake["system_instruction"], json!({"parts": [{"text": "S"}, {"text": "x"}]}));
    assert!(snake.get("systemInstruction").is_none());
}

#[test]
fn decorate_errors_leave_body_unchanged() {
    let d = both();
    for (api, body, field) in [
        (Api::OpenAiChat, json!({"messages": "nope"}), "messages"),
        (Api::AnthropicMessages, json!({"system": 3, "messages": []}), "system"),
        (Api::GeminiGenerate, json!({"systemInstruction": "s"}), "systemInstruction"),
        (Api::OpenAiResponses, json!({"input": 5}), "input"),
    ] {
        let mut b = body.clone();
        let e = d.apply(api, &mut b).expect_err("bad shape");
        assert!(matches!(e, DecorateError::Field { field: f, .. } if f == field), "{api:?}: {e}");
        assert_eq!(b, body);
    }
    assert_eq!(d.apply(Api::OpenAiChat, &mut json!([1])), Err(DecorateError::NotAnObject));
    let mut emb = json!({"input": "x"});
    assert_eq!(d.apply(Api::OpenAiEmbeddings, &mut emb), Ok(false));
    assert_eq!(emb, json!({"input": "x"}));
}

#[test]
fn decorate_error_is_reported_by_the_pipeline() {
    let g = guards("- kind: decorate\n  name: d\n  append: [{ role: user, content: x }]\n");
    let mut body = json!({"messages": {}});
    let out = g.check_request_with(Api::OpenAiChat, 10, &mut body, &mut || None);
    assert!(!out.modified && out.blocked.is_none());
    assert_eq!(out.decorate_errors.len(), 1);
    assert_eq!(out.decorate_errors[0].0.as_ref(), "d");
}
