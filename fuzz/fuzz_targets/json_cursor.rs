//! Differential: tollgate's borrowing JSON cursor against `serde_json` on the same bytes.
//!
//! `openai::inspect_request` and `openai::parse_response` read with the cursor first and fall
//! back to `serde_json` only when the cursor declines (`Defer`). Their documented contract is
//! that the result for ANY input is the one `serde_json` gives for the wire structs. The
//! reference below is that serde parse, written out here independently of the crate.
//!
//! When they must agree, exactly:
//! - on every input `serde_json` accepts as a JSON object, the cursor either declines or reads
//!   the same values: request `model`, `stream`, `stream_options.include_usage` and whether
//!   `stream_options` is present; response `id`, `model`, the number of `choices` and their
//!   `finish_reason`s, `usage` (prompt, completion, total, cached, reasoning tokens) and
//!   `error.message`. A document serde refuses for the typed struct (a duplicate known field,
//!   a known field of the wrong type, a number that is not a u64) must give `None`.
//! - on every input serde rejects (not JSON, trailing bytes, trailing commas, NaN, bad
//!   escapes...), the cursor must not accept it: the result is `None`.
//! So the assertion is plain equality with the reference on every input.
//!
//! `max_tokens` is not read by the cursor (the completion cap is read with serde only, in
//! `policy::chain::rate`), so there is nothing of it to compare.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{Deserialize, Deserializer};
use tollgate::protocol::llm::openai;
use tollgate::telemetry::Usage;

#[derive(Deserialize)]
struct Request {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    stream_options: Option<Option<StreamOptions>>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// `"stream_options": null` is present (Some(None)), an absent member is None.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct Response {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Option<Vec<Choice>>,
    #[serde(default)]
    usage: Option<UsageRef>,
    #[serde(default)]
    error: Option<ErrorRef>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct UsageRef {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<Cached>,
    #[serde(default)]
    completion_tokens_details: Option<Reasoning>,
}

#[derive(Deserialize)]
struct Cached {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct Reasoning {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorRef {
    #[serde(default)]
    message: Option<String>,
}

/// What tollgate keeps of a response, comparable across both readers.
#[derive(Debug, PartialEq)]
struct Seen {
    id: Option<String>,
    model: Option<String>,
    choices: Option<(usize, Vec<String>)>,
    usage: Option<Usage>,
    error: Option<Option<String>>,
}

fn reference_usage(u: &UsageRef) -> Usage {
    let input = u.prompt_tokens.unwrap_or(0);
    let output = u.completion_tokens.unwrap_or(0);
    Usage {
        input,
        output,
        // A missing total is input + output (saturating: counts near u64::MAX are garbage in,
        // but must not wrap or panic).
        total: u.total_tokens.unwrap_or(input.saturating_add(output)),
        cached_input: u.prompt_tokens_details.as_ref().and_then(|d| d.cached_tokens),
        reasoning: u.completion_tokens_details.as_ref().and_then(|d| d.reasoning_tokens),
        estimated: false,
    }
}

fn check_request(data: &[u8]) {
    let got = openai::inspect_request(data);
    let want = serde_json::from_slice::<Request>(data).ok().map(|r| {
        let so = r.stream_options;
        openai::RequestInfo {
            model: r.model,
            stream: r.stream.unwrap_or(false),
            include_usage: so.as_ref().and_then(|o| o.as_ref()).and_then(|o| o.include_usage).unwrap_or(false),
            has_stream_options: so.is_some(),
        }
    });
    assert_eq!(got, want, "request facts differ from serde_json's");
}

fn check_response(data: &[u8]) {
    let got = openai::parse_response(data).map(|r| Seen {
        id: r.id.map(|s| s.into_owned()),
        model: r.model.map(|s| s.into_owned()),
        choices: r.choices.map(|c| (c.len, c.finish_reasons.into_iter().map(|s| s.into_owned()).collect())),
        usage: r.usage.map(|u| u.to_usage()),
        error: r.error.map(|e| e.message.map(|s| s.into_owned())),
    });
    let want = serde_json::from_slice::<Response>(data).ok().map(|r| Seen {
        id: r.id,
        model: r.model,
        choices: r.choices.map(|c| (c.len(), c.into_iter().filter_map(|c| c.finish_reason).collect())),
        usage: r.usage.as_ref().map(reference_usage),
        error: r.error.map(|e| e.message),
    });
    assert_eq!(got, want, "response summary differs from serde_json's");
}

fuzz_target!(|data: &[u8]| {
    check_request(data);
    check_response(data);
});
