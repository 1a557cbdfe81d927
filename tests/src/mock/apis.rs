//! Routing, authentication and the per-API handlers of the mock upstream.
//!
//! Each provider is answered in its own conventions (auth header, error shape, response headers,
//! SSE framing) so that the real SDKs, and tollgate's protocol handling, see what they would see
//! from the real service. The bodies come from the wire modules ([`crate::openai`],
//! [`crate::anthropic`], [`crate::gemini`]).

use http::request::Parts;
use http::{header, HeaderMap, Method, Response, StatusCode};
use serde_json::{json, Value};

use super::control::{Api, Provider};
use super::server::{full, stream_response, RespBody, State};
use crate::openai::embeddings::{self as emb, CompletionRequest, EmbeddingsRequest};
use crate::openai::responses::{self, ResponsesRequest};
use crate::openai::{self, ChatRequest};
use crate::{anthropic, gemini};

/// How the mock checks API keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// Accept requests without credentials (`--no-auth`).
    Off,
    /// Require the provider's credential header with any non-empty value (the default).
    AnyKey,
    /// Require one of these keys (`--require-key`, repeatable).
    Keys(Vec<String>),
}

/// Which API a request is for, and the model or deployment named in its path.
pub fn classify(method: &Method, path: &str) -> Option<(Api, Option<String>)> {
    if method != Method::POST {
        return None;
    }
    let fixed = match path {
        "/v1/chat/completions" => Some(Api::OpenAiChat),
        "/v1/responses" => Some(Api::OpenAiResponses),
        "/v1/embeddings" => Some(Api::OpenAiEmbeddings),
        "/v1/completions" => Some(Api::OpenAiCompletions),
        "/v1/messages" => Some(Api::AnthropicMessages),
        "/v1/messages/count_tokens" => Some(Api::AnthropicCountTokens),
        _ => None,
    };
    if let Some(a) = fixed {
        return Some((a, None));
    }
    if let Some(rest) = path.strip_prefix("/openai/deployments/") {
        let (dep, op) = rest.split_once('/')?;
        let api = match op {
            "chat/completions" => Api::AzureChat,
            "embeddings" => Api::AzureEmbeddings,
            _ => return None,
        };
        return (!dep.is_empty()).then(|| (api, Some(dep.to_string())));
    }
    let rest = path.strip_prefix("/v1beta/models/").or_else(|| path.strip_prefix("/v1/models/"))?;
    let (model, op) = rest.rsplit_once(':')?;
    let api = match op {
        "generateContent" => Api::GeminiGenerate,
        "streamGenerateContent" => Api::GeminiStream,
        "countTokens" => Api::GeminiCountTokens,
        _ => return None,
    };
    (!model.is_empty() && !model.contains('/')).then(|| (api, Some(model.to_string())))
}

/// Value of query parameter `name` (percent-decoded), if present.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn json_response(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<RespBody> {
    Response::builder().status(status).header(header::CONTENT_TYPE, content_type).body(full(body)).expect("response")
}

/// An error response in `provider`'s shape. OpenAI errors get `type`/`code` from the status
/// unless `openai_code` overrides the code.
pub fn error(provider: Provider, status: StatusCode, message: &str, openai_code: Option<&str>) -> Response<RespBody> {
    let s = status.as_u16();
    let (ct, body) = match provider {
        Provider::OpenAi => {
            let (kind, code) = match s {
                429 => ("requests", Some("rate_limit_exceeded")),
                500..=599 => ("server_error", None),
                _ => ("invalid_request_error", None),
            };
            ("application/json", openai::error_body(message, kind, openai_code.or(code)))
        }
        Provider::Azure => (
            "application/json",
            serde_json::to_vec(&json!({"error": {"code": s.to_string(), "message": message}})).expect("json"),
        ),
        Provider::Anthropic => ("application/json", anthropic::error_body(anthropic::error_type(s), message)),
        Provider::Gemini => ("application/json; charset=UTF-8", gemini::error_body(s, message)),
    };
    let mut r = json_response(status, ct, body);
    if s == 429 {
        r.headers_mut().insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    }
    r
}

/// Check the provider's credential; `Err` is the provider-shaped 401.
pub fn check_auth(provider: Provider, auth: &Auth, parts: &Parts) -> Result<(), Box<Response<RespBody>>> {
    if *auth == Auth::Off {
        return Ok(());
    }
    let h = &parts.headers;
    let presented: Option<String> = match provider {
        Provider::OpenAi => header_str(h, "authorization").and_then(|v| v.strip_prefix("Bearer ")).map(str::to_string),
        Provider::Azure => header_str(h, "api-key").map(str::to_string),
        // The documented header is `x-api-key`; the pinned Python SDK (anthropic 2.12) sends its
        // API key as `Authorization: Bearer`, and the API accepts both.
        Provider::Anthropic => header_str(h, "x-api-key")
            .or_else(|| header_str(h, "authorization").and_then(|v| v.strip_prefix("Bearer ")))
            .map(str::to_string),
        Provider::Gemini => {
            header_str(h, "x-goog-api-key").map(str::to_string).or_else(|| query_param(parts.uri.query(), "key"))
        }
    };
    let presented = presented.map(|k| k.trim().to_string()).filter(|k| !k.is_empty());
    let ok = match (auth, &presented) {
        (_, None) => false,
        (Auth::Keys(keys), Some(k)) => keys.iter().any(|x| x == k),
        _ => true,
    };
    if ok {
        return Ok(());
    }
    let missing = presented.is_none();
    let msg = match provider {
        Provider::OpenAi if missing => concat!(
            "You didn't provide an API key. You need to provide your API key in an Authorization header ",
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
        .to_string(),
        Provider::OpenAi => format!(
            "Incorrect API key provided: {}. {}",
            redact(presented.as_deref().unwrap_or("")),
            "You can find your API key at https://platform.openai.com/account/api-keys."
        ),
        Provider::Azure => concat!(
            "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid ",
            "key for an active subscription and use a correct regional API endpoint for your resource."
        )
        .into(),
        Provider::Anthropic if missing => "x-api-key header is required".into(),
        Provider::Anthropic => "invalid x-api-key".into(),
        Provider::Gemini if missing => concat!(
            "Method doesn't allow unregistered callers (callers without established identity). ",
            "Please use API Key or other form of API consumer identity to call this API."
        )
        .into(),
        Provider::Gemini => "API key not valid. Please pass a valid API key.".into(),
    };
    Err(Box::new(error(provider, StatusCode::UNAUTHORIZED, &msg, Some("invalid_api_key"))))
}

/// `sk-te***2e`-style redaction, as OpenAI echoes a wrong key.
fn redact(k: &str) -> String {
    let c: Vec<char> = k.chars().collect();
    if c.len() <= 8 {
        return "***".into();
    }
    format!("{}***{}", c[..5].iter().collect::<String>(), c[c.len() - 2..].iter().collect::<String>())
}

/// Answer an API request whose body parsed as `body` (JSON) and passed auth and fault checks.
pub fn dispatch(st: &State, api: Api, arg: Option<String>, parts: &Parts, body: Value) -> Response<RespBody> {
    let provider = Provider::for_path(parts.uri.path());
    let bad = |m: &str| error(provider, StatusCode::BAD_REQUEST, m, None);
    let resp = match api {
        Api::OpenAiChat | Api::AzureChat => {
            let mut body = body;
            if let (Some(dep), Some(o)) = (&arg, body.as_object_mut()) {
                o.entry("model").or_insert_with(|| json!(dep));
            }
            match ChatRequest::from_json(&body) {
                Ok(r) => chat(st, api, &r),
                Err(m) => bad(&m),
            }
        }
        Api::OpenAiResponses => match ResponsesRequest::from_json(&body) {
            Ok(r) => responses(st, &r),
            Err(m) => bad(&m),
        },
        Api::OpenAiEmbeddings | Api::AzureEmbeddings => {
            let mut body = body;
            if let (Some(dep), Some(o)) = (&arg, body.as_object_mut()) {
                o.entry("model").or_insert_with(|| json!(dep));
            }
            match EmbeddingsRequest::from_json(&body) {
                Ok(r) => openai_headers(Response::builder(), "emb")
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(full(emb::embeddings_body(&r)))
                    .expect("response"),
                Err(m) => bad(&m),
            }
        }
        Api::OpenAiCompletions => match CompletionRequest::from_json(&body) {
            Ok(r) => completions(st, &r),
            Err(m) => bad(&m),
        },
        Api::AnthropicMessages | Api::AnthropicCountTokens => {
            if header_str(&parts.headers, "anthropic-version").is_none_or(|v| v.trim().is_empty()) {
                return bad("anthropic-version: header is required");
            }
            match anthropic::MessagesRequest::from_json(&body, api == Api::AnthropicCountTokens) {
                Ok(r) if api == Api::AnthropicCountTokens => {
                    json_response(StatusCode::OK, "application/json", anthropic::count_tokens_body(&r))
                }
                Ok(r) => messages(st, &r),
                Err(m) => bad(&m),
            }
        }
        Api::GeminiGenerate | Api::GeminiStream | Api::GeminiCountTokens => {
            let model = arg.unwrap_or_default();
            match gemini::GenerateRequest::from_json(&model, &body) {
                Ok(r) if api == Api::GeminiCountTokens => {
                    json_response(StatusCode::OK, "application/json; charset=UTF-8", gemini::count_tokens_body(&r))
                }
                Ok(r) => generate(st, api == Api::GeminiStream, query_param(parts.uri.query(), "alt"), &r),
                Err(m) => bad(&m),
            }
        }
    };
    if resp.status().is_success() {
        st.stats.served(api);
    }
    resp
}

fn openai_headers(b: http::response::Builder, id: &str) -> http::response::Builder {
    b.header("x-request-id", format!("req_{id}"))
        .header("openai-version", "2020-10-01")
        .header("openai-processing-ms", "1")
}

fn chat(st: &State, api: Api, creq: &ChatRequest) -> Response<RespBody> {
    use std::sync::atomic::Ordering::Relaxed;
    if api == Api::OpenAiChat {
        st.stats.chat.fetch_add(1, Relaxed);
    }
    let reply = openai::reply_for(creq);
    if !creq.stream || creq.include_usage {
        st.stats.usage_prompt_tokens.fetch_add(reply.prompt_tokens, Relaxed);
        st.stats.usage_completion_tokens.fetch_add(reply.completion_tokens, Relaxed);
    }
    let mut b = openai_headers(Response::builder(), &reply.id["chatcmpl-".len()..]);
    if api == Api::AzureChat {
        b = b.header("apim-request-id", format!("mock-{}", &reply.id["chatcmpl-".len()..]));
    }
    if !creq.stream {
        return b
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(openai::completion_body(&reply)))
            .expect("response");
    }
    if api == Api::OpenAiChat {
        st.stats.chat_stream.fetch_add(1, Relaxed);
        if creq.include_usage {
            st.stats.chat_stream_usage.fetch_add(1, Relaxed);
        }
    }
    stream_response(st, b, "text/event-stream; charset=utf-8", openai::stream_events(&reply, creq.include_usage))
}

fn responses(st: &State, req: &ResponsesRequest) -> Response<RespBody> {
    let reply = responses::reply_for(req);
    let b = openai_headers(Response::builder(), &reply.id["resp_".len()..]);
    if !req.stream {
        return b
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(responses::response_body(&reply)))
            .expect("response");
    }
    stream_response(st, b, "text/event-stream; charset=utf-8", responses::stream_events(&reply))
}

fn completions(st: &State, req: &CompletionRequest) -> Response<RespBody> {
    let reply = emb::completion_reply(req);
    let b = openai_headers(Response::builder(), &reply.id["cmpl-".len()..]);
    if !req.stream {
        return b
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(emb::completion_body(&reply)))
            .expect("response");
    }
    stream_response(st, b, "text/event-stream; charset=utf-8", emb::completion_stream_events(&reply, req.include_usage))
}

fn messages(st: &State, req: &anthropic::MessagesRequest) -> Response<RespBody> {
    let reply = anthropic::reply_for(req);
    let b = Response::builder().header("request-id", format!("req_{}", &reply.id["msg_".len()..]));
    if !req.stream {
        return b
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(anthropic::message_body(&reply)))
            .expect("response");
    }
    stream_response(st, b, "text/event-stream; charset=utf-8", anthropic::stream_events(&reply))
}

fn generate(st: &State, stream: bool, alt: Option<String>, req: &gemini::GenerateRequest) -> Response<RespBody> {
    let reply = gemini::reply_for(req);
    let b = Response::builder()
        .header("server", "scaffolding on HTTPServer2")
        .header("x-goog-mock-response-id", &reply.response_id);
    if !stream {
        return b
            .header(header::CONTENT_TYPE, "application/json; charset=UTF-8")
            .body(full(gemini::generate_body(&reply)))
            .expect("response");
    }
    if alt.as_deref() == Some("sse") {
        stream_response(st, b, "text/event-stream", gemini::sse_events(&reply))
    } else {
        stream_response(st, b, "application/json; charset=UTF-8", gemini::json_array_pieces(&reply))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let p = Method::POST;
        assert_eq!(classify(&p, "/v1/chat/completions"), Some((Api::OpenAiChat, None)));
        assert_eq!(
            classify(&p, "/openai/deployments/gpt4o/chat/completions"),
            Some((Api::AzureChat, Some("gpt4o".into())))
        );
        assert_eq!(
            classify(&p, "/v1beta/models/gemini-2.5-flash:streamGenerateContent"),
            Some((Api::GeminiStream, Some("gemini-2.5-flash".into())))
        );
        assert_eq!(classify(&p, "/v1beta/models/x:nope"), None);
        assert_eq!(classify(&Method::GET, "/v1/chat/completions"), None);
        assert_eq!(query_param(Some("alt=sse&key=a%2Bb+c"), "key").as_deref(), Some("a+b c"));
        assert_eq!(query_param(Some("api-version"), "api-version").as_deref(), Some(""));
        assert_eq!(redact("sk-test-e2e-key"), "sk-te***ey");
    }
}
