//! The request body one attempt sends: the agent's bytes when nothing must change, the target's
//! model swapped in, usage asked for on OpenAI-shaped streams, or the whole request translated
//! when agent and provider speak different APIs.

use bytes::Bytes;

use super::super::api::{Api, RequestFacts, Shape};
use super::super::{openai, translate};
use crate::protocol::ProtocolError;

/// Body of one attempt.
pub(crate) struct Prepared {
    /// Bytes to send.
    pub(crate) body: Bytes,
    /// tollgate added `stream_options.include_usage`: the usage-only chunk is not the agent's.
    pub(crate) injected_usage: bool,
}

/// Build the body for `up_api` from the agent's request in `api`.
pub(crate) fn prepare(
    api: Api,
    up_api: Api,
    bytes: &Bytes,
    facts: &RequestFacts,
    model: Option<&str>,
    default_max_tokens: u32,
    include_usage: bool,
) -> Result<Prepared, ProtocolError> {
    let bad = |e: translate::TranslateError| ProtocolError::BadRequest(e.to_string());
    if api.shape() != up_api.shape() {
        let model = model.unwrap_or_default();
        return match (api.shape(), up_api.shape()) {
            (Shape::OpenAi, Shape::Anthropic) => Ok(Prepared {
                body: Bytes::from(translate::chat_request_to_messages(bytes, model, default_max_tokens).map_err(bad)?),
                injected_usage: false,
            }),
            (Shape::Anthropic, Shape::OpenAi) => Ok(Prepared {
                // The translation itself asks streams for usage; the stream translator turns the
                // usage chunk into `message_delta` usage, which Anthropic clients expect.
                body: Bytes::from(translate::messages_request_to_chat(bytes, model).map_err(bad)?),
                injected_usage: false,
            }),
            _ => Err(ProtocolError::BadRequest(format!("cannot translate {api:?} to {up_api:?}"))),
        };
    }
    let mut body = bytes.clone();
    let model_differs = match (model, facts.model.as_deref()) {
        (Some(m), Some(asked)) => m != asked,
        (Some(_), None) => up_api.shape() != Shape::Gemini,
        _ => false,
    };
    if model_differs && up_api.shape() != Shape::Gemini {
        // Gemini names the model in the URL; the others in the body.
        body = set_model(&body, model.unwrap_or_default())?;
    }
    let mut injected_usage = false;
    if include_usage
        && matches!(up_api, Api::OpenAiChat | Api::OpenAiCompletions)
        && facts.stream
        && !facts.include_usage
    {
        let info = openai::RequestInfo {
            model: None,
            stream: true,
            include_usage: false,
            has_stream_options: facts.has_stream_options,
        };
        match openai::inject_include_usage(&body, &info) {
            Ok(b) => {
                body = b;
                injected_usage = true;
            }
            Err(e) => tracing::debug!(error = %e, "not adding stream_options.include_usage"),
        }
    }
    Ok(Prepared { body, injected_usage })
}

/// The body with its top-level `model` replaced (re-serialised: only on the path where a
/// target overrides the agent's model).
fn set_model(body: &[u8], model: &str) -> Result<Bytes, ProtocolError> {
    let mut v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ProtocolError::BadRequest(format!("request body is not JSON: {e}")))?;
    let obj = v.as_object_mut().ok_or_else(|| ProtocolError::BadRequest("request body is not a JSON object".into()))?;
    obj.insert("model".into(), serde_json::Value::String(model.to_string()));
    serde_json::to_vec(&v).map(Bytes::from).map_err(|e| ProtocolError::BadRequest(e.to_string()))
}
