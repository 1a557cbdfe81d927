//! Anthropic Messages API wire format: what tollgate reads from a `Message` body, from each
//! streaming event (`message_start`, `content_block_*`, `message_delta`, `message_stop`, `ping`,
//! `error`), from error bodies and from `count_tokens` answers.
//!
//! Streamed usage arrives in parts: `message_start` carries the input side (and an initial
//! `output_tokens`), each `message_delta` the cumulative `output_tokens` (and, in newer API
//! versions, cumulative input and cache counts too). [`UsageParts`] keeps the latest value of
//! each field. How the parts map to [`Usage`] is documented on [`UsageParts::to_usage`].
//!
//! Reading borrows from the payload and skips content without allocating; fields of an
//! unexpected type are not observed rather than failing the payload.

use std::borrow::Cow;

use super::api::{ErrorSeen, Seen};
use super::estimate::{texts, Piece};
use super::json::{Cursor, Fast};
use crate::telemetry::Usage;

/// Anthropic usage fields as last reported; `None` when not reported yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageParts {
    /// `input_tokens`: input after the last cache breakpoint (excludes cache reads and writes).
    pub input: Option<u64>,
    /// `output_tokens` (cumulative in streams; includes thinking).
    pub output: Option<u64>,
    /// `cache_read_input_tokens`.
    pub cache_read: Option<u64>,
    /// `cache_creation_input_tokens`.
    pub cache_creation: Option<u64>,
    /// `output_tokens_details.thinking_tokens`.
    pub thinking: Option<u64>,
}

impl UsageParts {
    /// Take every field `newer` reports (stream counts are cumulative, so the latest wins).
    pub fn merge(&mut self, newer: UsageParts) {
        let take = |old: &mut Option<u64>, new: Option<u64>| {
            if new.is_some() {
                *old = new;
            }
        };
        take(&mut self.input, newer.input);
        take(&mut self.output, newer.output);
        take(&mut self.cache_read, newer.cache_read);
        take(&mut self.cache_creation, newer.cache_creation);
        take(&mut self.thinking, newer.thinking);
    }

    /// Into the telemetry shape. Anthropic's `input_tokens` excludes cached input while
    /// OpenTelemetry's `gen_ai.usage.input_tokens` includes it, so `input` is the sum of
    /// `input_tokens`, `cache_read_input_tokens` and `cache_creation_input_tokens` (Anthropic's
    /// documented total input); `cached_input` is the cache reads; `reasoning` the thinking
    /// tokens, already part of `output_tokens`.
    pub fn to_usage(&self) -> Usage {
        let input = self
            .input
            .unwrap_or(0)
            .saturating_add(self.cache_read.unwrap_or(0))
            .saturating_add(self.cache_creation.unwrap_or(0));
        let output = self.output.unwrap_or(0);
        Usage {
            input,
            output,
            total: input.saturating_add(output),
            cached_input: self.cache_read,
            reasoning: self.thinking,
            estimated: false,
        }
    }
}

/// Fields of a `Message` (the whole body, or `message` of `message_start`).
#[derive(Default)]
struct MessageFields<'a> {
    id: Option<Cow<'a, str>>,
    model: Option<Cow<'a, str>>,
    stop_reason: Option<Cow<'a, str>>,
    usage: Option<UsageParts>,
}

/// Read `key` of a `Message` into `f`; false when it is not one of its fields.
fn message_member<'a>(c: &mut Cursor<'a>, key: &[u8], f: &mut MessageFields<'a>) -> Fast<bool> {
    match key {
        b"id" => f.id = c.lenient_str()?,
        b"model" => f.model = c.lenient_str()?,
        b"stop_reason" => f.stop_reason = c.lenient_str()?,
        b"usage" => f.usage = usage(c)?,
        _ => return Ok(false),
    }
    Ok(true)
}

fn usage(c: &mut Cursor<'_>) -> Fast<Option<UsageParts>> {
    let mut u = UsageParts::default();
    let got = c.lenient_object(|c, k| match k {
        b"input_tokens" => c.lenient_u64().map(|v| u.input = v),
        b"output_tokens" => c.lenient_u64().map(|v| u.output = v),
        b"cache_read_input_tokens" => c.lenient_u64().map(|v| u.cache_read = v),
        b"cache_creation_input_tokens" => c.lenient_u64().map(|v| u.cache_creation = v),
        b"output_tokens_details" => c
            .lenient_object(|c, k| match k {
                b"thinking_tokens" => c.lenient_u64().map(|v| u.thinking = v),
                _ => c.skip(),
            })
            .map(drop),
        _ => c.skip(),
    })?;
    Ok(got.then_some(u))
}

/// Read one Messages API body or streaming event payload. Returns what it said, and the usage
/// fields it reported (to merge into the call's [`UsageParts`]). With `counting`, output text
/// (text, thinking and tool-input deltas, or `content` of a whole message) is collected.
pub(crate) fn parse(json: &[u8], counting: bool) -> Fast<(Seen<'_>, Option<UsageParts>)> {
    let mut c = Cursor::new(json);
    let (mut top, mut message) = (MessageFields::default(), MessageFields::default());
    let (mut kind, mut error, mut delta_stop, mut input_tokens) = (None, None, None, None);
    let mut text = Vec::new();
    c.object(|c, key| match key {
        b"type" => c.lenient_str().map(|v| kind = v),
        b"message" => c
            .lenient_object(|c, k| match message_member(c, k, &mut message)? {
                true => Ok(()),
                false => c.skip(),
            })
            .map(drop),
        b"delta" => c
            .lenient_object(|c, k| match k {
                b"stop_reason" => c.lenient_str().map(|v| delta_stop = v),
                b"text" | b"thinking" | b"partial_json" if counting => texts(c, 1, &mut |p| text.push(p)),
                _ => c.skip(),
            })
            .map(drop),
        b"error" => {
            let (mut kind, mut msg) = (None, None);
            let got = c.lenient_object(|c, k| match k {
                b"type" => c.lenient_str().map(|v| kind = v),
                b"message" => c.lenient_str().map(|v| msg = v),
                _ => c.skip(),
            })?;
            error = got.then_some(ErrorSeen { kind, message: msg });
            Ok(())
        }
        b"content" if counting => texts(c, 0, &mut |p: Piece<'_>| text.push(p)),
        // `count_tokens` answers `{"input_tokens": N}`.
        b"input_tokens" => c.lenient_u64().map(|v| input_tokens = v),
        _ => match message_member(c, key, &mut top)? {
            true => Ok(()),
            false => c.skip(),
        },
    })?;
    c.end()?;

    if error.is_none() && kind.as_deref() == Some("error") {
        error = Some(ErrorSeen::default());
    }
    let mut usage = top.usage.or(message.usage);
    if let Some(n) = input_tokens {
        usage.get_or_insert_with(UsageParts::default).input = Some(n);
    }
    let finish = top.stop_reason.or(message.stop_reason).or(delta_stop);
    // `message_stop` ends a stream; so does an `error` event.
    let terminal = matches!(kind.as_deref(), Some("message_stop" | "error"));
    let seen = Seen {
        id: message.id.or(top.id),
        model: message.model.or(top.model),
        finish: finish.into_iter().collect(),
        error,
        usage: None,
        text,
        terminal,
    };
    Ok((seen, usage))
}

#[cfg(test)]
mod tests {
    use super::super::api::test_support::{call, run_json, run_sse_every_split};
    use super::super::api::Api;
    use super::*;

    /// Counts near `u64::MAX` saturate instead of overflowing (see `openai`'s test).
    #[test]
    fn huge_usage_counts_saturate() {
        let parts = UsageParts {
            input: Some(u64::MAX),
            output: Some(1),
            cache_read: Some(2),
            cache_creation: Some(3),
            thinking: None,
        };
        let u = parts.to_usage();
        assert_eq!((u.input, u.output, u.total), (u64::MAX, 1, u64::MAX));
    }

    #[test]
    fn whole_message_with_cache_and_thinking() {
        let body = br#"{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929",
            "content":[{"type":"thinking","thinking":"Let me think","signature":"sig"},{"type":"text","text":"Hi! My name is Claude."}],
            "stop_reason":"end_turn","stop_sequence":null,
            "usage":{"input_tokens":12,"cache_creation_input_tokens":200,"cache_read_input_tokens":1800,"output_tokens":45,
              "output_tokens_details":{"thinking_tokens":30},"service_tier":"standard","server_tool_use":null}}"#;
        let c = run_json(Api::AnthropicMessages, body, 200, false);
        assert_eq!(c.response_id.as_deref(), Some("msg_01XFDUDYJgAACzvnptvVoYEL"));
        assert_eq!(c.response_model.as_deref(), Some("claude-sonnet-4-5-20250929"));
        assert_eq!(c.finish_reasons, vec!["end_turn"]);
        assert_eq!(
            c.usage,
            Some(Usage {
                input: 2012,
                output: 45,
                total: 2057,
                cached_input: Some(1800),
                reasoning: Some(30),
                estimated: false
            })
        );
        assert_eq!(c.error, None);
    }

    const STREAM: &str = concat!(
        "event: message_start\n",
        r#"data: {"type":"message_start","message":{"id":"msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY","type":"message","role":"assistant","content":[],"model":"claude-opus-4-1-20250805","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":1024,"output_tokens":1}}}"#,
        "\n\nevent: content_block_start\n",
        r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        "\n\nevent: ping\ndata: {\"type\": \"ping\"}\n\nevent: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
        "\n\nevent: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":" world \"quoted\" \u00e9"}}"#,
        "\n\nevent: content_block_stop\n",
        r#"data: {"type":"content_block_stop","index":0}"#,
        "\n\nevent: message_delta\n",
        r#"data: {"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"input_tokens":25,"cache_creation_input_tokens":0,"cache_read_input_tokens":1024,"output_tokens":15}}"#,
        "\n\nevent: message_stop\n",
        r#"data: {"type":"message_stop"}"#,
        "\n\n"
    );

    #[test]
    fn stream_any_chunking() {
        let want =
            Usage { input: 1049, output: 15, total: 1064, cached_input: Some(1024), reasoning: None, estimated: false };
        run_sse_every_split(Api::AnthropicMessages, STREAM.as_bytes(), |c| {
            assert_eq!(c.response_id.as_deref(), Some("msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"));
            assert_eq!(c.response_model.as_deref(), Some("claude-opus-4-1-20250805"));
            assert_eq!(c.finish_reasons, vec!["end_turn"]);
            assert_eq!(c.usage, Some(want));
            assert_eq!(c.error, None);
        });
    }

    #[test]
    fn stream_usage_from_parts_when_delta_has_only_output() {
        let mut c = call(200);
        let mut o = super::super::api::Observer::new(Api::AnthropicMessages, Default::default(), false);
        o.observe(
            &mut c,
            br#"{"type":"message_start","message":{"id":"m","model":"claude-3-5-haiku-20241022","usage":{"input_tokens":472,"output_tokens":2}}}"#,
        );
        assert_eq!(c.usage.map(|u| (u.input, u.output)), Some((472, 2)));
        o.observe(
            &mut c,
            br#"{"type":"message_delta","delta":{"stop_reason":"max_tokens"},"usage":{"output_tokens":89}}"#,
        );
        o.finish(&mut c);
        let u = c.usage.unwrap();
        assert_eq!((u.input, u.output, u.total, u.cached_input, u.estimated), (472, 89, 561, None, false));
        assert_eq!(c.finish_reasons, vec!["max_tokens"]);
    }

    #[test]
    fn errors_in_bodies_and_streams() {
        let body = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"},"request_id":"req_011CSHoEeqs5C35K2UUqR7Fy"}"#;
        let c = run_json(Api::AnthropicMessages, body, 529, false);
        assert_eq!(c.error.as_deref(), Some("overloaded_error: Overloaded"));
        assert_eq!(c.usage, None, "no estimate for failed calls");

        let s = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n\
                 event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"Internal server error\"}}\n\n";
        run_sse_every_split(Api::AnthropicMessages, s.as_bytes(), |c| {
            assert_eq!(c.error.as_deref(), Some("api_error: Internal server error"));
            assert_eq!(c.usage.map(|u| u.input), Some(3));
        });
    }

    #[test]
    fn count_tokens_answer_is_input_usage() {
        let c = run_json(Api::AnthropicCountTokens, br#"{"input_tokens":2095}"#, 200, false);
        let u = c.usage.unwrap();
        assert_eq!((u.input, u.output, u.total, u.estimated), (2095, 0, 2095, false));
        assert!(c.finish_reasons.is_empty());
    }

    #[test]
    fn output_counted_from_deltas_only_when_asked() {
        // A stream cut before `message_start` usage: nothing reported, so the estimate is used.
        let s = "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello world\"}}\n\n\
                 data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\" Hello world\"}}\n\n";
        let request =
            br#"{"model":"claude-sonnet-4-5","max_tokens":64,"messages":[{"role":"user","content":"Hello world"}]}"#;
        let mut o = super::super::api::Observer::new(Api::AnthropicMessages, bytes::Bytes::from_static(request), true);
        let mut c = call(200);
        let mut p = super::super::sse::SseParser::new(1 << 16);
        p.feed(s.as_bytes(), |_, ev| {
            if let super::super::sse::SseEvent::Data(d) = ev {
                o.observe(&mut c, d);
            }
        });
        o.finish(&mut c);
        let u = c.usage.unwrap();
        assert!(u.estimated);
        assert_eq!(u.output, 4, "\"Hello world\" + \" Hello world\"");
        assert_eq!(u.input, super::super::estimate::count("Hello world") + 6);
    }
}
