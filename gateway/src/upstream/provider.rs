//! A configured provider at run time: where its API lives, how each operation is addressed,
//! and how tollgate authenticates to it on the agent's behalf.
//!
//! Addressing per kind (the `base_url` path is a prefix of all of these):
//! - `openai`, `openai_compatible`: `base_url` includes the version (`https://api.openai.com/v1`,
//!   `http://vllm:8000/v1`); operations are `/chat/completions`, `/responses`, `/embeddings`,
//!   `/completions`. Auth: `Authorization: Bearer`.
//! - `azure_openai`: `/openai/deployments/{model}/chat/completions?api-version=…` (the target
//!   `model` is the deployment); Responses at `/openai/v1/responses`. Auth: `api-key`.
//! - `anthropic`: `/v1/messages`, `/v1/messages/count_tokens`. Auth: `x-api-key`, plus
//!   `anthropic-version` when the agent sent none.
//! - `gemini`: `/v1beta/models/{model}:generateContent` (`:streamGenerateContent?alt=sse`,
//!   `:countTokens`, `:embedContent`). Auth: `key` query parameter.

use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, AUTHORIZATION};
use http::{HeaderMap, HeaderValue, Uri};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::credentials::{Credential, CredentialError};
use super::{Target, UpstreamError};
use crate::config::{ProviderConfig, ProviderKind};
use crate::protocol::llm::api::Api;

/// Why a provider could not be set up, or asked for an operation it does not have.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The key could not be loaded.
    #[error("provider {provider}: credentials: {source}")]
    Credentials {
        /// Provider name.
        provider: String,
        /// Cause (names the source, never the key).
        source: CredentialError,
    },
    /// The base URL is unusable.
    #[error("provider {provider}: base_url: {source}")]
    Url {
        /// Provider name.
        provider: String,
        /// Cause.
        source: UpstreamError,
    },
    /// The provider's API has no equivalent of the agent's operation.
    #[error("provider {provider} ({kind:?}) does not serve {api:?}")]
    Unsupported {
        /// Provider name.
        provider: String,
        /// Provider kind.
        kind: ProviderKind,
        /// Requested operation.
        api: Api,
    },
}

/// Headers that carry an agent's own provider credentials; removed when tollgate injects its
/// key, so a placeholder never reaches the provider next to the real one.
const AGENT_AUTH_HEADERS: [&str; 4] = ["authorization", "x-api-key", "api-key", "x-goog-api-key"];

/// One provider, shared by every route that targets it.
#[derive(Debug)]
pub struct Provider {
    /// Configured name.
    pub name: Arc<str>,
    /// API family.
    pub kind: ProviderKind,
    target: Target,
    credential: Option<Arc<Credential>>,
    api_version: String,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// `max_tokens` for translated OpenAI requests to Anthropic that have none.
    pub default_max_tokens: u32,
    /// Offer HTTP/2 upstream.
    pub http2: bool,
    slots: Arc<Semaphore>,
}

impl Provider {
    /// Build from config, loading the key now (a missing key fails start-up, not the first call).
    pub fn new(cfg: &ProviderConfig) -> Result<Self, ProviderError> {
        let base = match &cfg.base_url {
            Some(u) => u.clone(),
            None => default_base(cfg.kind).and_then(|s| url::Url::parse(s).ok()).ok_or_else(|| ProviderError::Url {
                provider: cfg.name.clone(),
                source: UpstreamError::BadTarget("base_url is required for this kind".into()),
            })?,
        };
        let target =
            Target::from_url(&base).map_err(|source| ProviderError::Url { provider: cfg.name.clone(), source })?;
        let credential = cfg
            .credentials
            .as_ref()
            .map(|c| Credential::load(c, Duration::from_secs(30)))
            .transpose()
            .map_err(|source| ProviderError::Credentials { provider: cfg.name.clone(), source })?;
        let headers = cfg
            .options
            .headers
            .iter()
            .filter_map(|(k, v)| Some((HeaderName::from_bytes(k.as_bytes()).ok()?, HeaderValue::from_str(v).ok()?)))
            .collect();
        let api_version = cfg.options.api_version.clone().unwrap_or_else(|| {
            match cfg.kind {
                ProviderKind::AzureOpenai => "2024-10-21",
                _ => "2023-06-01",
            }
            .to_string()
        });
        Ok(Provider {
            name: Arc::from(cfg.name.as_str()),
            kind: cfg.kind,
            target,
            credential,
            api_version,
            headers,
            default_max_tokens: cfg.options.default_max_tokens,
            http2: cfg.options.http2,
            slots: Arc::new(Semaphore::new(cfg.options.max_concurrent_requests.max(1))),
        })
    }

    /// `server.address` / `server.port` of the provider.
    pub fn server(&self) -> (&str, u16) {
        (&self.target.server_address, self.target.server_port)
    }

    /// The operation this provider serves for an agent's `api`: the same one when the shapes
    /// agree, the translated one for chat between OpenAI and Anthropic, else unsupported.
    pub fn upstream_api(&self, api: Api) -> Result<Api, ProviderError> {
        use Api::*;
        let ok = match (self.kind, api) {
            (
                ProviderKind::Openai | ProviderKind::OpenaiCompatible,
                OpenAiChat | OpenAiResponses | OpenAiEmbeddings | OpenAiCompletions,
            ) => Some(api),
            (ProviderKind::AzureOpenai, OpenAiChat | OpenAiResponses | OpenAiEmbeddings | OpenAiCompletions) => {
                Some(api)
            }
            (ProviderKind::Openai | ProviderKind::OpenaiCompatible | ProviderKind::AzureOpenai, AnthropicMessages) => {
                Some(OpenAiChat)
            }
            (ProviderKind::Anthropic, AnthropicMessages | AnthropicCountTokens) => Some(api),
            (ProviderKind::Anthropic, OpenAiChat) => Some(AnthropicMessages),
            (ProviderKind::Gemini, GeminiGenerate | GeminiStreamGenerate | GeminiCountTokens | GeminiEmbed) => {
                Some(api)
            }
            _ => None,
        };
        ok.ok_or(ProviderError::Unsupported { provider: self.name.to_string(), kind: self.kind, api })
    }

    /// Absolute URI of `api` for `model`; `client_query` is the agent's query string, kept for
    /// same-shape calls (minus any `key` / `api-version`, which tollgate sets).
    pub fn uri(&self, api: Api, model: &str, client_query: Option<&str>) -> Result<Uri, UpstreamError> {
        let mut pq = String::with_capacity(96);
        match self.kind {
            ProviderKind::Openai | ProviderKind::OpenaiCompatible => pq.push_str(openai_op(api)),
            ProviderKind::AzureOpenai => {
                if api == Api::OpenAiResponses {
                    pq.push_str("/openai/v1/responses");
                } else {
                    pq.push_str("/openai/deployments/");
                    push_segment(&mut pq, model);
                    pq.push_str(openai_op(api));
                }
            }
            ProviderKind::Anthropic => pq.push_str(match api {
                Api::AnthropicCountTokens => "/v1/messages/count_tokens",
                _ => "/v1/messages",
            }),
            ProviderKind::Gemini => {
                pq.push_str("/v1beta/models/");
                push_segment(&mut pq, model);
                pq.push_str(match api {
                    Api::GeminiStreamGenerate => ":streamGenerateContent",
                    Api::GeminiCountTokens => ":countTokens",
                    Api::GeminiEmbed => ":embedContent",
                    _ => ":generateContent",
                });
            }
        }
        let mut sep = '?';
        let mut push = |pq: &mut String, kv: &str| {
            pq.push(sep);
            pq.push_str(kv);
            sep = '&';
        };
        for kv in client_query.unwrap_or("").split('&').filter(|kv| !kv.is_empty()) {
            let k = kv.split('=').next().unwrap_or("");
            if k != "key" && k != "api-version" {
                push(&mut pq, kv);
            }
        }
        if self.kind == ProviderKind::AzureOpenai && api != Api::OpenAiResponses {
            push(&mut pq, &format!("api-version={}", self.api_version));
        }
        if self.kind == ProviderKind::Gemini && api == Api::GeminiStreamGenerate && !pq.contains("alt=") {
            push(&mut pq, "alt=sse");
        }
        if self.kind == ProviderKind::Gemini {
            if let Some(c) = &self.credential {
                push(&mut pq, &format!("key={}", url_escape(c.get().expose())));
            }
        }
        self.target.uri_for(&pq)
    }

    /// Set `Host`, provider headers and (when tollgate holds a key) the provider's auth header,
    /// removing whatever credentials the agent sent.
    pub fn authorize(&self, h: &mut HeaderMap) {
        if let Some(host) = self.target.host_header() {
            h.insert(http::header::HOST, host.clone());
        }
        for (k, v) in &self.headers {
            h.insert(k.clone(), v.clone());
        }
        if self.kind == ProviderKind::Anthropic && !h.contains_key("anthropic-version") {
            if let Ok(v) = HeaderValue::from_str(&self.api_version) {
                h.insert("anthropic-version", v);
            }
        }
        let Some(c) = &self.credential else { return };
        for n in AGENT_AUTH_HEADERS {
            h.remove(n);
        }
        match self.kind {
            ProviderKind::Openai | ProviderKind::OpenaiCompatible => {
                if let Some(v) = c.header("Bearer") {
                    h.insert(AUTHORIZATION, v);
                }
            }
            ProviderKind::AzureOpenai => {
                if let Some(v) = c.header("") {
                    h.insert("api-key", v);
                }
            }
            ProviderKind::Anthropic => {
                if let Some(v) = c.header("") {
                    h.insert("x-api-key", v);
                }
            }
            // In the query (see `uri`).
            ProviderKind::Gemini => {}
        }
    }

    /// Whether tollgate injects a key for this provider.
    pub fn holds_key(&self) -> bool {
        self.credential.is_some()
    }

    /// Wait for an in-flight slot (bounds concurrent requests, hence pooled connections).
    pub async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().acquire_owned().await.ok()
    }
}

fn default_base(kind: ProviderKind) -> Option<&'static str> {
    match kind {
        ProviderKind::Openai => Some("https://api.openai.com/v1"),
        ProviderKind::Anthropic => Some("https://api.anthropic.com"),
        ProviderKind::Gemini => Some("https://generativelanguage.googleapis.com"),
        ProviderKind::AzureOpenai | ProviderKind::OpenaiCompatible => None,
    }
}

fn openai_op(api: Api) -> &'static str {
    match api {
        Api::OpenAiResponses => "/responses",
        Api::OpenAiEmbeddings => "/embeddings",
        Api::OpenAiCompletions => "/completions",
        _ => "/chat/completions",
    }
}

/// A path segment (model, deployment) with anything outside the unreserved set escaped.
fn push_segment(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

fn url_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    push_segment(&mut o, s);
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CredentialSource, ProviderOptions};

    fn provider(kind: ProviderKind, base: Option<&str>, key_env: Option<&str>) -> Provider {
        Provider::new(&ProviderConfig {
            name: "p".into(),
            kind,
            base_url: base.map(|b| url::Url::parse(b).unwrap()),
            credentials: key_env.map(|e| CredentialSource { env: Some(e.into()), file: None }),
            options: ProviderOptions::default(),
        })
        .unwrap()
    }

    #[test]
    fn addressing_per_kind() {
        std::env::set_var("TOLLGATE_TEST_KEY_A", "sk-test-a");
        let o = provider(ProviderKind::Openai, None, None);
        assert_eq!(
            o.uri(Api::OpenAiChat, "m", None).unwrap().to_string(),
            "https://api.openai.com:443/v1/chat/completions"
        );
        let v = provider(ProviderKind::OpenaiCompatible, Some("http://10.0.0.5:8000/v1/"), None);
        assert_eq!(
            v.uri(Api::OpenAiEmbeddings, "m", Some("x=1")).unwrap().to_string(),
            "http://10.0.0.5:8000/v1/embeddings?x=1"
        );
        let a = provider(ProviderKind::AzureOpenai, Some("https://r.openai.azure.com"), None);
        assert_eq!(
            a.uri(Api::OpenAiChat, "gpt 4o", Some("api-version=1&y=2")).unwrap().to_string(),
            "https://r.openai.azure.com:443/openai/deployments/gpt%204o/chat/completions?y=2&api-version=2024-10-21"
        );
        let g = provider(ProviderKind::Gemini, None, Some("TOLLGATE_TEST_KEY_A"));
        assert_eq!(
            g.uri(Api::GeminiStreamGenerate, "gemini-2.0-flash", Some("key=placeholder")).unwrap().to_string(),
            "https://generativelanguage.googleapis.com:443/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&key=sk-test-a"
        );
        assert_eq!(o.upstream_api(Api::AnthropicMessages).unwrap(), Api::OpenAiChat);
        assert!(g.upstream_api(Api::OpenAiChat).is_err());
    }

    #[test]
    fn injected_key_replaces_agent_credentials() {
        std::env::set_var("TOLLGATE_TEST_KEY_B", "sk-ant-real");
        let p = provider(ProviderKind::Anthropic, None, Some("TOLLGATE_TEST_KEY_B"));
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer placeholder"));
        h.insert("x-api-key", HeaderValue::from_static("placeholder"));
        p.authorize(&mut h);
        assert!(h.get(AUTHORIZATION).is_none());
        assert_eq!(h.get("x-api-key").unwrap(), "sk-ant-real");
        assert_eq!(h.get("anthropic-version").unwrap(), "2023-06-01");
        assert_eq!(h.get("host").unwrap(), "api.anthropic.com");
        // Without a key the agent's own credentials pass.
        let open = provider(ProviderKind::Openai, None, None);
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer agent"));
        open.authorize(&mut h);
        assert_eq!(h.get(AUTHORIZATION).unwrap(), "Bearer agent");
    }
}
