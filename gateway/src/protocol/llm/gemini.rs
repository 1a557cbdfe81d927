//! Gemini API wire format: what tollgate reads from `GenerateContentResponse` bodies and stream
//! chunks (SSE with `alt=sse`, or one JSON array of responses without it), `countTokens` and
//! `embedContent` answers, and error bodies (`{"error":{"code","message","status"}}`).
//!
//! Every streamed chunk may carry `usageMetadata`; counts are running totals, so the last one
//! wins. How they map to [`Usage`] is documented on [`UsageMetadata::to_usage`]. The model is
//! named by the request path; responses report the exact `modelVersion`.
//!
//! Reading borrows from the payload and skips content without allocating; fields of an
//! unexpected type are not observed rather than failing the payload.

use super::api::{ErrorSeen, Seen};
use super::estimate::texts;
use super::json::{Cursor, Fast};
use crate::telemetry::Usage;

/// `usageMetadata` fields tollgate reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageMetadata {
    /// `promptTokenCount` (includes cached content).
    pub prompt: Option<u64>,
    /// `candidatesTokenCount` (excludes thoughts).
    pub candidates: Option<u64>,
    /// `totalTokenCount`.
    pub total: Option<u64>,
    /// `cachedContentTokenCount`.
    pub cached: Option<u64>,
    /// `thoughtsTokenCount`.
    pub thoughts: Option<u64>,
    /// `toolUsePromptTokenCount` (tool results fed back to the model).
    pub tool_use_prompt: Option<u64>,
}

impl UsageMetadata {
    /// Into the telemetry shape: `input = promptTokenCount + toolUsePromptTokenCount` (both are
    /// prompt the model read; the total counts both), `cached_input = cachedContentTokenCount`
    /// (already inside the prompt count), `output = candidatesTokenCount + thoughtsTokenCount`
    /// so output includes reasoning as OpenAI's does, `reasoning = thoughtsTokenCount`. Should a
    /// reported total show the thoughts already inside the candidates count, they are not
    /// added twice.
    pub fn to_usage(&self) -> Usage {
        let input = self.prompt.unwrap_or(0) + self.tool_use_prompt.unwrap_or(0);
        let candidates = self.candidates.unwrap_or(0);
        let thoughts = self.thoughts.unwrap_or(0);
        let output = match self.total {
            Some(t) if thoughts > 0 && input + candidates == t => candidates,
            _ => candidates + thoughts,
        };
        Usage {
            input,
            output,
            total: self.total.unwrap_or(input + output),
            cached_input: self.cached,
            reasoning: self.thoughts,
            estimated: false,
        }
    }
}

fn usage_metadata(c: &mut Cursor<'_>) -> Fast<Option<UsageMetadata>> {
    let mut u = UsageMetadata::default();
    let got = c.lenient_object(|c, k| {
        let field = match k {
            b"promptTokenCount" | b"prompt_token_count" => &mut u.prompt,
            b"candidatesTokenCount" | b"candidates_token_count" => &mut u.candidates,
            b"totalTokenCount" | b"total_token_count" => &mut u.total,
            b"cachedContentTokenCount" | b"cached_content_token_count" => &mut u.cached,
            b"thoughtsTokenCount" | b"thoughts_token_count" => &mut u.thoughts,
            b"toolUsePromptTokenCount" | b"tool_use_prompt_token_count" => &mut u.tool_use_prompt,
            _ => return c.skip(),
        };
        *field = c.lenient_u64()?;
        Ok(())
    })?;
    Ok(got.then_some(u))
}

/// Read one Gemini body or stream chunk; a JSON array (non-SSE `streamGenerateContent`) is read
/// element by element into one result: first id and model, every finish reason, the last
/// usage, the first error. With `counting`, candidate text is collected.
pub(crate) fn parse(json: &[u8], counting: bool) -> Fast<Seen<'_>> {
    let mut c = Cursor::new(json);
    let mut seen = Seen::default();
    if c.peek_byte() == Some(b'[') {
        c.array(|c| response(c, &mut seen, counting))?;
    } else {
        response(&mut c, &mut seen, counting)?;
    }
    c.end()?;
    Ok(seen)
}

/// One `GenerateContentResponse`, `CountTokensResponse`, `EmbedContentResponse` or error.
fn response<'a>(c: &mut Cursor<'a>, seen: &mut Seen<'a>, counting: bool) -> Fast<()> {
    let (mut total_tokens, mut cached) = (None, None);
    let mut block_reason = None;
    let mut finished = false;
    c.object(|c, key| match key {
        b"candidates" => c
            .lenient_array(|c| {
                c.lenient_object(|c, k| match k {
                    b"finishReason" | b"finish_reason" => {
                        if let Some(r) = c.lenient_str()? {
                            finished = true;
                            seen.finish.push(r);
                        }
                        Ok(())
                    }
                    b"content" if counting => texts(c, 1, &mut |p| seen.text.push(p)),
                    _ => c.skip(),
                })
                .map(drop)
            })
            .map(drop),
        b"usageMetadata" | b"usage_metadata" => {
            if let Some(u) = usage_metadata(c)? {
                seen.usage = Some(u.to_usage());
            }
            Ok(())
        }
        b"modelVersion" | b"model_version" => first(c, &mut seen.model),
        b"responseId" | b"response_id" => first(c, &mut seen.id),
        b"promptFeedback" | b"prompt_feedback" => c
            .lenient_object(|c, k| match k {
                b"blockReason" | b"block_reason" => c.lenient_str().map(|v| block_reason = v),
                _ => c.skip(),
            })
            .map(drop),
        b"error" => {
            let (mut status, mut message) = (None, None);
            let got = c.lenient_object(|c, k| match k {
                b"status" => c.lenient_str().map(|v| status = v),
                b"message" => c.lenient_str().map(|v| message = v),
                _ => c.skip(),
            })?;
            if got && seen.error.is_none() {
                seen.error = Some(ErrorSeen { kind: status, message });
            }
            Ok(())
        }
        // `countTokens` answers.
        b"totalTokens" | b"total_tokens" => c.lenient_u64().map(|v| total_tokens = v),
        b"cachedContentTokenCount" | b"cached_content_token_count" => c.lenient_u64().map(|v| cached = v),
        _ => c.skip(),
    })?;
    // A blocked prompt has no candidates: its block reason is why generation finished.
    if let (Some(r), false) = (block_reason, finished) {
        seen.finish.push(r);
    }
    if let Some(n) = total_tokens {
        seen.usage =
            Some(Usage { input: n, output: 0, total: n, cached_input: cached, reasoning: None, estimated: false });
    }
    Ok(())
}

/// A string kept only if none was seen before (array elements repeat id and model).
fn first<'a>(c: &mut Cursor<'a>, slot: &mut Option<std::borrow::Cow<'a, str>>) -> Fast<()> {
    let v = c.lenient_str()?;
    if slot.is_none() {
        *slot = v;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::api::test_support::{run_json, run_sse_every_split};
    use super::super::api::Api;
    use super::*;

    #[test]
    fn generate_content_with_thoughts_and_cache() {
        let body = br#"{
          "candidates": [{"content": {"parts": [{"text": "The sky is blue because of Rayleigh scattering."}], "role": "model"},
                          "finishReason": "STOP", "index": 0}],
          "usageMetadata": {"promptTokenCount": 2100, "candidatesTokenCount": 12, "totalTokenCount": 2510,
                            "cachedContentTokenCount": 2048, "thoughtsTokenCount": 398,
                            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 2100}]},
          "modelVersion": "gemini-2.5-flash",
          "responseId": "mfRgaJ2cMJ2d1dkP-ZGNqAs"
        }"#;
        let c = run_json(Api::GeminiGenerate, body, 200, false);
        assert_eq!(c.response_id.as_deref(), Some("mfRgaJ2cMJ2d1dkP-ZGNqAs"));
        assert_eq!(c.response_model.as_deref(), Some("gemini-2.5-flash"));
        assert_eq!(c.finish_reasons, vec!["STOP"]);
        assert_eq!(
            c.usage,
            Some(Usage {
                input: 2100,
                output: 410,
                total: 2510,
                cached_input: Some(2048),
                reasoning: Some(398),
                estimated: false
            })
        );
    }

    #[test]
    fn thoughts_not_added_twice_and_tool_prompt_is_input() {
        let inside = UsageMetadata {
            prompt: Some(10),
            candidates: Some(50),
            total: Some(60),
            thoughts: Some(40),
            ..Default::default()
        };
        assert_eq!((inside.to_usage().output, inside.to_usage().reasoning), (50, Some(40)));
        let tool = UsageMetadata {
            prompt: Some(10),
            tool_use_prompt: Some(300),
            candidates: Some(5),
            total: Some(315),
            ..Default::default()
        };
        let u = tool.to_usage();
        assert_eq!((u.input, u.output, u.total), (310, 5, 315));
    }

    const STREAM: &str = concat!(
        r#"data: {"candidates": [{"content": {"parts": [{"text": "Hello"}],"role": "model"},"index": 0}],"usageMetadata": {"promptTokenCount": 8,"totalTokenCount": 8,"promptTokensDetails": [{"modality": "TEXT","tokenCount": 8}]},"modelVersion": "gemini-2.0-flash","responseId": "r-1"}"#,
        "\r\n\r\n",
        r#"data: {"candidates": [{"content": {"parts": [{"text": " world, \"hi\"\n"}],"role": "model"},"finishReason": "STOP","index": 0}],"usageMetadata": {"promptTokenCount": 8,"candidatesTokenCount": 6,"totalTokenCount": 14},"modelVersion": "gemini-2.0-flash","responseId": "r-1"}"#,
        "\r\n\r\n"
    );

    #[test]
    fn sse_stream_last_usage_wins_any_chunking() {
        run_sse_every_split(Api::GeminiStreamGenerate, STREAM.as_bytes(), |c| {
            assert_eq!(c.response_id.as_deref(), Some("r-1"));
            assert_eq!(c.response_model.as_deref(), Some("gemini-2.0-flash"));
            assert_eq!(c.finish_reasons, vec!["STOP"]);
            let u = c.usage.unwrap();
            assert_eq!((u.input, u.output, u.total, u.cached_input, u.reasoning), (8, 6, 14, None, None));
        });
    }

    #[test]
    fn json_array_stream_read_whole() {
        let body = br#"[{"candidates":[{"content":{"parts":[{"text":"Hi"}],"role":"model"},"index":0}],"usageMetadata":{"promptTokenCount":4,"totalTokenCount":4},"modelVersion":"gemini-2.5-pro","responseId":"a"},
            {"candidates":[{"content":{"parts":[{"text":"!"}],"role":"model"},"finishReason":"MAX_TOKENS","index":0}],"usageMetadata":{"promptTokenCount":4,"candidatesTokenCount":2,"totalTokenCount":26,"thoughtsTokenCount":20},"modelVersion":"gemini-2.5-pro","responseId":"a"}]"#;
        let c = run_json(Api::GeminiStreamGenerate, body, 200, false);
        assert_eq!(c.response_id.as_deref(), Some("a"));
        assert_eq!(c.finish_reasons, vec!["MAX_TOKENS"]);
        let u = c.usage.unwrap();
        assert_eq!((u.input, u.output, u.total, u.reasoning), (4, 22, 26, Some(20)));
    }

    #[test]
    fn errors_blocks_count_tokens_and_embeddings() {
        let err = br#"{"error": {"code": 429, "message": "Resource has been exhausted (e.g. check quota).", "status": "RESOURCE_EXHAUSTED"}}"#;
        let c = run_json(Api::GeminiGenerate, err, 429, false);
        assert_eq!(c.error.as_deref(), Some("RESOURCE_EXHAUSTED: Resource has been exhausted (e.g. check quota)."));
        assert_eq!(c.usage, None);
        let c = run_json(Api::GeminiStreamGenerate, &[b"[", &err[..], b"]"].concat(), 400, false);
        assert!(c.error.unwrap().starts_with("RESOURCE_EXHAUSTED"));

        let blocked = br#"{"promptFeedback":{"blockReason":"SAFETY","safetyRatings":[]},"usageMetadata":{"promptTokenCount":7,"totalTokenCount":7},"modelVersion":"gemini-2.0-flash"}"#;
        let c = run_json(Api::GeminiGenerate, blocked, 200, false);
        assert_eq!(c.finish_reasons, vec!["SAFETY"]);
        assert_eq!(c.usage.map(|u| (u.input, u.output)), Some((7, 0)));

        let c = run_json(Api::GeminiCountTokens, br#"{"totalTokens": 31, "cachedContentTokenCount": 10, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 31}]}"#, 200, false);
        let u = c.usage.unwrap();
        assert_eq!((u.input, u.output, u.total, u.cached_input), (31, 0, 31, Some(10)));

        // `embedContent` reports no usage: estimated from the request's text.
        let c = run_json(
            Api::GeminiEmbed,
            br#"{"embedding": {"values": [0.013168523, -0.008711934, -0.046782676]}}"#,
            200,
            false,
        );
        let u = c.usage.unwrap();
        assert!(u.estimated && u.input == super::super::estimate::count("Hello world") && u.output == 0);
    }
}
