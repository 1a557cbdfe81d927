//! Translation between the OpenAI Chat Completions and Anthropic Messages wire formats, so an
//! agent speaking one protocol can be served by a target speaking the other.
//!
//! Everything here is a pure function of its input (plus the clock for `created` timestamps and
//! a random suffix when an upstream id is missing): requests, non-streamed responses and error
//! bodies are whole JSON documents handled through `serde_json::Value`; streams are converted
//! event by event by a [`StreamTranslator`], which keeps only small per-stream state (ids, the
//! open content block, usage) and never buffers content.
//!
//! Translation is the slow path: clarity wins over speed. Fields without a counterpart that
//! would change the *shape* of the answer (`n > 1`, `logprobs`, audio, legacy `functions`,
//! structured `response_format`, server tools, documents, ...) are rejected with a
//! [`TranslateError`] naming the field, so the caller can answer 400 in the client's error
//! shape; pure sampling hints without a counterpart (penalties, `seed`, `top_k`, `thinking`,
//! `cache_control`, ...) are dropped.
//!
//! Submodules, one per direction:
//! - [`request_to_messages`]: OpenAI chat request → Anthropic messages request.
//! - [`request_to_chat`]: Anthropic messages request → OpenAI chat request.
//! - [`response`]: non-streamed responses, both ways.
//! - [`error_body`]: upstream error bodies, both ways.
//! - [`stream_to_chat`]: Anthropic SSE events → OpenAI `chat.completion.chunk`s.
//! - [`stream_to_messages`]: OpenAI chunks → Anthropic SSE events.

mod common;
mod error_body;
mod request_to_chat;
mod request_to_messages;
mod response;
mod stream_to_chat;
mod stream_to_messages;

#[cfg(test)]
mod tests;

pub use error_body::{anthropic_error_to_openai, openai_error_to_anthropic};
pub use request_to_chat::messages_request_to_chat;
pub use request_to_messages::chat_request_to_messages;
pub use response::{chat_response_to_messages, messages_response_to_chat};
pub use stream_to_chat::MessagesToChatStream;
pub use stream_to_messages::ChatToMessagesStream;

/// Why a request or response could not be translated. Every message starts with the path of the
/// offending field (`messages[2].content[0]: ...`) so the client can fix its request; the caller
/// answers 400 in the client's error shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    /// The body is not JSON at all.
    #[error("body is not valid JSON: {0}")]
    Json(String),
    /// A required field is absent (or null).
    #[error("{field}: required field is missing")]
    Missing {
        /// Path of the field, e.g. `messages[0].role`.
        field: String,
    },
    /// A field has the wrong JSON type.
    #[error("{field}: expected {expected}")]
    WrongType {
        /// Path of the field.
        field: String,
        /// What was expected, e.g. `a string`.
        expected: &'static str,
    },
    /// The field is valid in the source protocol but has no translation to the target one.
    #[error("{field}: unsupported {what}")]
    Unsupported {
        /// Path of the field.
        field: String,
        /// What is unsupported, e.g. ``part type `input_audio` ``.
        what: String,
    },
    /// The field's value is malformed (e.g. tool-call arguments that are not a JSON object).
    #[error("{field}: {reason}")]
    Invalid {
        /// Path of the field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Event-by-event conversion of an upstream SSE stream into the client's protocol. The caller
/// runs its own SSE parser over the upstream bytes and feeds each event's `data:` payload;
/// complete, framed client events are appended to `out`, ready to forward. Implementations keep
/// only small per-stream state, never content.
pub trait StreamTranslator: Send {
    /// Translate one upstream `data:` payload (one whole event) and append the client events it
    /// produces (possibly none) to `out`. Malformed or unknown events are skipped.
    fn event(&mut self, data: &[u8], out: &mut Vec<u8>);

    /// The upstream ended (normally or not): append whatever the client still needs to see a
    /// terminated stream (`data: [DONE]` for OpenAI clients, `message_stop` for Anthropic
    /// ones), exactly once. An upstream that stopped before saying why it finished is reported
    /// as an error event first, so clients do not mistake a truncated answer for a complete one.
    fn finish(&mut self, out: &mut Vec<u8>);
}
