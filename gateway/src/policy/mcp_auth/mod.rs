//! OAuth 2.1 resource-server side of an MCP endpoint served by tollgate (MCP authorization
//! spec 2025-06-18 / 2025-11-25). An [`Authenticator`] holds one endpoint's rules: it answers
//! the RFC 9728 protected resource metadata that clients discover from the 401 challenge,
//! verifies `Authorization: Bearer` JWTs locally against the issuer's cached JWKS (signature,
//! `iss`, `aud` per RFC 8707, `exp`/`nbf`, required scopes), maps scopes to tool ACLs
//! ([`Grant::allows_tool`]), and exchanges the caller's token for downstream tokens (RFC 8693)
//! so the caller's token is never passed through.
//!
//! The listener owns the HTTP plumbing; this module only decides and renders refusals
//! ([`AuthRefusal::response`], [`MissingScope::response`]), so the wire format is tested here.

mod exchange;
mod jwks;
mod refusal;
#[cfg(test)]
mod test_server;
#[cfg(test)]
mod tests;

pub use refusal::{AuthRefusal, MissingScope};

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use crate::config::mcp_auth::{JwtAlgorithm, McpAuthConfig};
use crate::upstream::credentials::CredentialError;
use crate::upstream::{error_chain, Target, Upstream, UpstreamError};
use exchange::Exchanger;
use jwks::Jwks;

/// RFC 9728 §3 well-known path prefix of protected resource metadata.
pub const METADATA_PREFIX: &str = "/.well-known/oauth-protected-resource";

/// Why an [`Authenticator`] could not be built or a token exchange failed. Messages name
/// URLs and OAuth error codes, never a token or a secret.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The config cannot be turned into a working authenticator.
    #[error("MCP auth config: {0}")]
    Config(String),
    /// The token exchange client secret cannot be read.
    #[error("token exchange client secret: {0}")]
    Credential(#[from] CredentialError),
    /// The request could not be sent or no response came.
    #[error("{url}: {}", error_chain(source))]
    Upstream {
        /// URL called.
        url: String,
        /// Connect, TLS or HTTP failure.
        source: UpstreamError,
    },
    /// No complete response within the configured timeout.
    #[error("{url}: no response within {after:?}")]
    Timeout {
        /// URL called.
        url: String,
        /// The timeout.
        after: Duration,
    },
    /// A status without an OAuth error body.
    #[error("{url}: HTTP {status}")]
    Status {
        /// URL called.
        url: String,
        /// HTTP status.
        status: u16,
    },
    /// The response body is unusable (too large, not the expected JSON).
    #[error("{url}: {message}")]
    Body {
        /// URL called.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// The token endpoint refused the exchange with an RFC 6749 §5.2 error.
    #[error("token exchange at {endpoint} refused: {error}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Exchange {
        /// Token endpoint.
        endpoint: String,
        /// OAuth error code (`invalid_grant`, `invalid_target`, ...).
        error: String,
        /// The server's `error_description`, if any.
        description: Option<String>,
    },
}

/// The token checks and metadata of one OAuth-protected MCP endpoint: one per federation per
/// config generation, shared by all its connections (`Send + Sync`; the JWKS cache and the
/// exchange cache live inside).
pub struct Authenticator {
    issuers: Vec<String>,
    audience: String,
    resource: String,
    algorithms: Vec<Algorithm>,
    leeway: u64,
    agent_claim: Option<String>,
    acl: Arc<ToolAcl>,
    metadata: Value,
    jwks: Jwks,
    exchanger: Option<Exchanger>,
}

/// Scope rules a [`Grant`] is checked against.
#[derive(Debug)]
struct ToolAcl {
    /// Scopes every token needs.
    required: Vec<String>,
    /// `(scope, tool globs)`; empty: every tool is allowed.
    tools: Vec<(String, Vec<glob::Pattern>)>,
}

/// What a verified token grants: who the caller is and which scopes it holds. The token itself
/// is kept (private, redacted in `Debug`) only so it can be exchanged.
#[derive(Clone)]
pub struct Grant {
    /// `sub` claim.
    pub subject: Option<String>,
    /// Value of the configured `agent_claim`, naming a caller without a kernel identity.
    pub agent: Option<String>,
    /// Scopes from `scope` (space-separated) or `scp` (array or string).
    pub scopes: Vec<String>,
    /// `exp`, seconds since the Unix epoch.
    pub expires_at: u64,
    token: Arc<str>,
    acl: Arc<ToolAcl>,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("subject", &self.subject)
            .field("agent", &self.agent)
            .field("scopes", &self.scopes)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl Grant {
    /// Whether the token's scopes allow `tool` (the name the client sees). Without
    /// `tool_scopes` every tool is allowed; otherwise some held scope's globs must match it.
    /// The error names the scopes that would, for hiding the tool or a 403 step-up challenge.
    pub fn allows_tool(&self, tool: &str) -> Result<(), MissingScope> {
        if self.acl.tools.is_empty() {
            return Ok(());
        }
        let granting = self.acl.tools.iter().filter(|(_, globs)| globs.iter().any(|g| g.matches(tool)));
        let mut would = Vec::new();
        for (scope, _) in granting {
            if self.scopes.iter().any(|s| s == scope) {
                return Ok(());
            }
            would.push(scope.clone());
        }
        Err(MissingScope { tool: tool.to_string(), scopes: would, required: self.acl.required.clone() })
    }
}

impl Authenticator {
    /// Build from a validated config; `http` is the node's upstream client, used for the JWKS
    /// and the token endpoint. Nothing is fetched yet: keys are fetched on first use.
    pub fn new(cfg: &McpAuthConfig, http: Arc<Upstream>) -> Result<Self, AuthError> {
        cfg.validate().map_err(|(f, m)| AuthError::Config(format!("{f}: {m}")))?;
        let algorithms = cfg.algorithms.iter().filter_map(|a| to_jwt_alg(*a)).collect();
        let mut tools = Vec::with_capacity(cfg.tool_scopes.len());
        for t in &cfg.tool_scopes {
            let globs = t
                .tools
                .iter()
                .map(|g| glob::Pattern::new(g).map_err(|e| AuthError::Config(format!("tool_scopes glob {g:?}: {e}"))))
                .collect::<Result<Vec<_>, _>>()?;
            tools.push((t.scope.clone(), globs));
        }
        let issuer = cfg.issuer.as_str();
        let shown_issuer = if cfg.issuer.path() == "/" && cfg.issuer.query().is_none() {
            issuer.trim_end_matches('/')
        } else {
            issuer
        };
        let mut issuers = vec![issuer.to_string()];
        if shown_issuer != issuer {
            issuers.push(shown_issuer.to_string());
        }
        let resource = cfg.resource_uri();
        let mut metadata = serde_json::json!({
            "resource": resource,
            "authorization_servers": [shown_issuer],
            "bearer_methods_supported": ["header"],
        });
        if !cfg.scopes_supported.is_empty() {
            metadata["scopes_supported"] = serde_json::json!(cfg.scopes_supported);
        }
        let exchanger = cfg.token_exchange.as_ref().map(|x| Exchanger::new(x, http.clone())).transpose()?;
        Ok(Authenticator {
            issuers,
            audience: cfg.audience.clone(),
            resource,
            algorithms,
            leeway: cfg.leeway.as_secs(),
            agent_claim: cfg.agent_claim.clone(),
            acl: Arc::new(ToolAcl { required: cfg.required_scopes.clone(), tools }),
            metadata,
            jwks: Jwks::new(cfg.jwks_url.clone(), http, cfg.jwks_timeout, cfg.jwks_refresh, cfg.jwks_min_refetch),
            exchanger,
        })
    }

    /// Whether `path` is where this endpoint's metadata is served, for an MCP endpoint at
    /// `mcp_path`: the path-specific form of RFC 9728 §3.1 (`/.well-known/oauth-protected-
    /// resource/mcp`) and the root form, which clients fall back to.
    pub fn is_metadata_path(&self, path: &str, mcp_path: &str) -> bool {
        let Some(rest) = path.strip_prefix(METADATA_PREFIX) else { return false };
        let rest = rest.trim_end_matches('/');
        rest.is_empty() || rest == mcp_path.trim_end_matches('/')
    }

    /// The RFC 9728 protected resource metadata document: `resource`, `authorization_servers`,
    /// `scopes_supported` (when configured) and `bearer_methods_supported: ["header"]`.
    pub fn metadata(&self) -> Value {
        self.metadata.clone()
    }

    /// [`Authenticator::metadata`] as a ready 200 response (JSON, cacheable for an hour).
    pub fn metadata_response(&self) -> http::Response<Bytes> {
        let mut r = http::Response::new(Bytes::from(self.metadata.to_string()));
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        r.headers_mut().insert(http::header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
        r
    }

    /// Where the metadata of the configured `resource` lives (RFC 9728 §3.1: the well-known
    /// prefix inserted between host and path), the value for the challenges'
    /// `resource_metadata`. `None` when the resource is not an http(s) URL.
    pub fn resource_metadata_url(&self) -> Option<String> {
        let u = url::Url::parse(&self.resource).ok().filter(|u| matches!(u.scheme(), "http" | "https"))?;
        let path = u.path().trim_end_matches('/');
        Some(format!("{}{METADATA_PREFIX}{path}", u.origin().ascii_serialization()))
    }

    /// Check the request's `Authorization: Bearer` token: signature against the issuer's JWKS
    /// (fetched lazily, cached, refreshed every `jwks_refresh`, refetched at most once per
    /// `jwks_min_refetch` for an unknown key id), then `iss`, `aud`, `exp`, `nbf` and the
    /// required scopes.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Grant, AuthRefusal> {
        let token = self.bearer(headers)?;
        let header = jsonwebtoken::decode_header(token).map_err(|e| AuthRefusal::Malformed(e.to_string()))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthRefusal::Algorithm(format!("{:?}", header.alg)));
        }
        let keys = self.jwks.keys_for(header.kid.as_deref(), header.alg).await?;
        let mut v = Validation::new(header.alg);
        v.leeway = self.leeway;
        v.validate_nbf = true;
        v.set_issuer(&self.issuers);
        v.set_audience(&[&self.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let mut refusal = AuthRefusal::Signature;
        for k in keys {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &k.key, &v) {
                Ok(data) => return self.grant(token, data.claims),
                Err(e) => match map_jwt_error(e.kind()) {
                    // Another key with the same kid (or no kid) may still verify it.
                    AuthRefusal::Signature => {}
                    other => {
                        refusal = other;
                        break;
                    }
                },
            }
        }
        Err(refusal)
    }

    /// RFC 8693 exchange of the grant's token for one meant for `audience` (with `scope`, if
    /// given), cached per (token, audience, scope) until it expires (and never past the
    /// grant's own expiry). `None` when `token_exchange` is not configured.
    pub async fn exchange(
        &self,
        grant: &Grant,
        audience: &str,
        scope: Option<&str>,
    ) -> Result<Option<String>, AuthError> {
        match &self.exchanger {
            None => Ok(None),
            Some(x) => x.exchange(&grant.token, grant.expires_at, audience, scope).await.map(Some),
        }
    }

    /// JWKS fetch attempts so far, for a metric or a test.
    pub fn jwks_fetches(&self) -> u64 {
        self.jwks.fetches()
    }

    /// Requests sent to the token endpoint so far (cache misses), for a metric or a test.
    pub fn exchange_requests(&self) -> u64 {
        self.exchanger.as_ref().map_or(0, Exchanger::requests)
    }

    /// The bearer token of the only `Authorization` header. Another scheme counts as no
    /// token (RFC 6750 §3.1: no error code then); two headers or an empty token are malformed.
    fn bearer<'h>(&self, headers: &'h HeaderMap) -> Result<&'h str, AuthRefusal> {
        let missing = || AuthRefusal::MissingToken {
            scope: (!self.acl.required.is_empty()).then(|| self.acl.required.join(" ")),
        };
        let mut all = headers.get_all(AUTHORIZATION).iter();
        let Some(h) = all.next() else { return Err(missing()) };
        if all.next().is_some() {
            return Err(AuthRefusal::Malformed("more than one Authorization header".into()));
        }
        let h = h.to_str().map_err(|_| AuthRefusal::Malformed("Authorization is not text".into()))?;
        let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(missing());
        }
        let token = rest.trim();
        if token.is_empty() || token.contains(' ') {
            return Err(AuthRefusal::Malformed("no single bearer token".into()));
        }
        Ok(token)
    }

    /// The grant of a verified token, once its scopes cover the required ones.
    fn grant(&self, token: &str, claims: Map<String, Value>) -> Result<Grant, AuthRefusal> {
        let scopes = scopes_of(&claims);
        if self.acl.required.iter().any(|r| !scopes.contains(r)) {
            return Err(AuthRefusal::InsufficientScope { scope: self.acl.required.join(" ") });
        }
        let text = |name: &str| match claims.get(name) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        Ok(Grant {
            subject: text("sub"),
            agent: self.agent_claim.as_deref().and_then(text),
            scopes,
            expires_at: claims.get("exp").and_then(Value::as_u64).unwrap_or(0),
            token: Arc::from(token),
            acl: self.acl.clone(),
        })
    }
}

/// Scopes from `scope` (RFC 8693 / RFC 9068: space-separated string) or, for issuers that use
/// it, `scp` (array or string).
fn scopes_of(claims: &Map<String, Value>) -> Vec<String> {
    let split = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    match (claims.get("scope"), claims.get("scp")) {
        (Some(Value::String(s)), _) => split(s),
        (_, Some(Value::String(s))) => split(s),
        (_, Some(Value::Array(a))) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

/// The refusal for a jsonwebtoken error (signature failures first: decoding checks the
/// signature before any claim).
fn map_jwt_error(kind: &ErrorKind) -> AuthRefusal {
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::Crypto(_)
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidRsaKey(_) => AuthRefusal::Signature,
        ErrorKind::ExpiredSignature => AuthRefusal::Expired,
        ErrorKind::ImmatureSignature => AuthRefusal::NotYetValid,
        ErrorKind::InvalidAudience => AuthRefusal::Audience,
        ErrorKind::InvalidIssuer => AuthRefusal::Issuer,
        ErrorKind::MissingRequiredClaim(c) if c == "aud" => AuthRefusal::Audience,
        ErrorKind::MissingRequiredClaim(c) if c == "iss" => AuthRefusal::Issuer,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => AuthRefusal::Algorithm("mismatch".into()),
        other => AuthRefusal::Malformed(format!("{other:?}")),
    }
}

/// The jsonwebtoken algorithm of an accepted config algorithm (refused ones have none).
fn to_jwt_alg(a: JwtAlgorithm) -> Option<Algorithm> {
    use JwtAlgorithm as J;
    Some(match a {
        J::RS256 => Algorithm::RS256,
        J::RS384 => Algorithm::RS384,
        J::RS512 => Algorithm::RS512,
        J::PS256 => Algorithm::PS256,
        J::PS384 => Algorithm::PS384,
        J::PS512 => Algorithm::PS512,
        J::ES256 => Algorithm::ES256,
        J::ES384 => Algorithm::ES384,
        J::EdDSA => Algorithm::EdDSA,
        J::HS256 | J::HS384 | J::HS512 | J::None => return None,
    })
}

/// One request to the issuer (JWKS, token endpoint) over the node's upstream client: `GET`
/// without a body or `POST` of a form, the whole exchange bounded by `timeout` and the body by
/// `limit` bytes.
async fn fetch(
    http: &Upstream,
    method: Method,
    url: &url::Url,
    authorization: Option<HeaderValue>,
    form: Option<String>,
    timeout: Duration,
    limit: usize,
) -> Result<(StatusCode, Bytes), AuthError> {
    let shown = url.to_string();
    let mut origin = url.clone();
    origin.set_path("/");
    origin.set_query(None);
    origin.set_fragment(None);
    let target = Target::from_url(&origin).map_err(|source| AuthError::Upstream { url: shown.clone(), source })?;
    let uri = target
        .uri_for(&url[url::Position::BeforePath..url::Position::AfterQuery])
        .map_err(|source| AuthError::Upstream { url: shown.clone(), source })?;
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(h) = target.host_header() {
        req = req.header(HOST, h.clone());
    }
    req = req.header(ACCEPT, "application/json").header(USER_AGENT, "tollgate");
    if let Some(a) = authorization {
        req = req.header(AUTHORIZATION, a);
    }
    if form.is_some() {
        req = req.header(CONTENT_TYPE, "application/x-www-form-urlencoded");
    }
    let req = req
        .body(Either::Right(Full::new(Bytes::from(form.unwrap_or_default()))))
        .map_err(|e| AuthError::Body { url: shown.clone(), message: format!("request: {e}") })?;
    let call = async {
        let resp = http.send(req).await.map_err(|source| AuthError::Upstream { url: shown.clone(), source })?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| AuthError::Body { url: shown.clone(), message: format!("reading the response: {e}") })?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, call).await.map_err(|_| AuthError::Timeout { url: shown.clone(), after: timeout })?
}
