//! RFC 8693 token exchange: the caller's token is traded at the authorization server for one
//! meant for a downstream MCP server, because the MCP spec forbids passing a client's token
//! through to another resource. tollgate authenticates as its own client (HTTP Basic, RFC 6749
//! §2.3.1) and caches each issued token per (caller token, audience, scope) until it expires,
//! so a chatty session costs one exchange, not one per tool call.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http::HeaderValue;
use parking_lot::Mutex;

use super::{fetch, AuthError};
use crate::config::mcp_auth::TokenExchangeConfig;
use crate::upstream::credentials::Credential;
use crate::upstream::Upstream;

/// Issued tokens kept at once; the least recently used goes first.
const CACHE_ENTRIES: usize = 10_000;
/// Largest token endpoint answer read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// A cached token is dropped this long before it expires, so it is not sent just as it dies.
const EXPIRY_MARGIN_SECS: u64 = 10;
/// RFC 8693 grant type.
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693 token type of both the subject token and the wanted token.
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// SHA-256 of the caller's token, audience and scope: the cache never holds the caller's token
/// and distinct requests cannot collide in practice.
type CacheKey = [u8; 32];

/// Token exchange client of one federation.
pub(super) struct Exchanger {
    endpoint: url::Url,
    http: Arc<Upstream>,
    client_id: String,
    secret: Arc<Credential>,
    timeout: Duration,
    cache: Mutex<lru::LruCache<CacheKey, (Arc<str>, u64)>>,
    requests: AtomicU64,
}

#[derive(serde::Deserialize)]
struct Issued {
    access_token: String,
    #[serde(default)]
    issued_token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(serde::Deserialize)]
struct OAuthError {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

impl Exchanger {
    pub(super) fn new(cfg: &TokenExchangeConfig, http: Arc<Upstream>) -> Result<Self, AuthError> {
        let secret = Credential::load(&cfg.client_secret, Duration::from_secs(10))?;
        let cap = NonZeroUsize::new(CACHE_ENTRIES).unwrap_or(NonZeroUsize::MIN);
        Ok(Exchanger {
            endpoint: cfg.endpoint.clone(),
            http,
            client_id: cfg.client_id.clone(),
            secret,
            timeout: cfg.timeout,
            cache: Mutex::new(lru::LruCache::new(cap)),
            requests: AtomicU64::new(0),
        })
    }

    /// Requests sent to the token endpoint so far (tests and debugging).
    pub(super) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// A token for `audience` in exchange for `subject` (valid until `subject_exp`), from the
    /// cache when one is still valid.
    pub(super) async fn exchange(
        &self,
        subject: &str,
        subject_exp: u64,
        audience: &str,
        scope: Option<&str>,
    ) -> Result<String, AuthError> {
        let key = cache_key(subject, audience, scope);
        let now = unix_now();
        // The guard must be gone before the await below (its future is spawned on any thread).
        let cached = self.cache.lock().get(&key).cloned();
        if let Some((tok, _)) = cached.filter(|(_, until)| *until > now) {
            return Ok(tok.to_string());
        }
        let issued = self.request(subject, audience, scope).await?;
        if let Some(ttl) = issued.expires_in {
            // Never beyond the caller's own token: the grant it stands for ends then.
            let until = now.saturating_add(ttl).min(subject_exp).saturating_sub(EXPIRY_MARGIN_SECS);
            if until > now {
                self.cache.lock().put(key, (Arc::from(issued.access_token.as_str()), until));
            }
        }
        Ok(issued.access_token)
    }

    async fn request(&self, subject: &str, audience: &str, scope: Option<&str>) -> Result<Issued, AuthError> {
        let body = exchange_form(subject, audience, scope);
        self.requests.fetch_add(1, Ordering::Relaxed);
        let auth = self.basic_auth()?;
        let endpoint = self.endpoint.to_string();
        let (status, reply) = fetch(
            &self.http,
            http::Method::POST,
            &self.endpoint,
            Some(auth),
            Some(body),
            self.timeout,
            MAX_RESPONSE_BYTES,
        )
        .await?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<OAuthError>(&reply) {
                Ok(e) => AuthError::Exchange { endpoint, error: e.error, description: e.error_description },
                Err(_) => AuthError::Status { url: endpoint, status: status.as_u16() },
            });
        }
        let issued: Issued = serde_json::from_slice(&reply)
            .map_err(|e| AuthError::Body { url: endpoint.clone(), message: format!("not a token response: {e}") })?;
        if issued.access_token.is_empty() {
            return Err(AuthError::Body { url: endpoint, message: "empty access_token".into() });
        }
        if let Some(t) = issued.issued_token_type.as_deref().filter(|t| *t != ACCESS_TOKEN_TYPE) {
            // A JWT or ID token type is still a bearer credential; note it without failing.
            tracing::debug!(endpoint = %endpoint, issued_token_type = t, "MCP auth: token exchange issued another token type");
        }
        Ok(issued)
    }

    /// `Authorization: Basic` with the client id and secret form-encoded first (RFC 6749
    /// §2.3.1), marked sensitive so it is never logged.
    fn basic_auth(&self) -> Result<HeaderValue, AuthError> {
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let secret = self.secret.get();
        let raw = format!("{}:{}", enc(&self.client_id), enc(secret.expose()));
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        let mut v = HeaderValue::from_str(&format!("Basic {b64}"))
            .map_err(|_| AuthError::Config("token_exchange client credentials are not header-safe".into()))?;
        v.set_sensitive(true);
        Ok(v)
    }
}

/// The RFC 8693 request body. Built in a plain function: the form serializer is not `Send`
/// and must not live in the exchange's future.
fn exchange_form(subject: &str, audience: &str, scope: Option<&str>) -> String {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", GRANT_TYPE)
        .append_pair("subject_token", subject)
        .append_pair("subject_token_type", ACCESS_TOKEN_TYPE)
        .append_pair("requested_token_type", ACCESS_TOKEN_TYPE)
        .append_pair("audience", audience);
    // An audience that is a URL is also the target's resource indicator (RFC 8707).
    if url::Url::parse(audience).is_ok_and(|u| matches!(u.scheme(), "http" | "https")) {
        form.append_pair("resource", audience);
    }
    if let Some(s) = scope.filter(|s| !s.is_empty()) {
        form.append_pair("scope", s);
    }
    form.finish()
}

fn cache_key(subject: &str, audience: &str, scope: Option<&str>) -> CacheKey {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [subject, audience, scope.unwrap_or("")] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part.as_bytes());
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Seconds since the Unix epoch (JWT time).
pub(super) fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
