//! Why a request to an OAuth-protected MCP endpoint is refused, and the exact HTTP answer: RFC
//! 6750 §3 `WWW-Authenticate: Bearer` challenges carrying the RFC 9728 `resource_metadata`
//! URL, which is how an MCP client discovers where to get a token. Kept apart from the checks
//! so the wire format lives in one place.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// Why a bearer token was not accepted. Messages never carry the token itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthRefusal {
    /// No `Authorization: Bearer` header: the client has not logged in yet. `scope` is the
    /// space-separated scope list to ask for (MCP 2025-11-25: the challenge SHOULD name it).
    #[error("no bearer token")]
    MissingToken {
        /// Scopes the client should request, when the config requires some.
        scope: Option<String>,
    },
    /// Not a well-formed JWT (or a `none`-signed one, whose header does not parse).
    #[error("malformed token: {0}")]
    Malformed(String),
    /// Signed with an algorithm the config does not accept (e.g. HS256).
    #[error("token algorithm {0} is not accepted")]
    Algorithm(String),
    /// The signature does not verify with the issuer's key.
    #[error("bad token signature")]
    Signature,
    /// The key id is not in the issuer's JWKS (even after a refetch).
    #[error("token signed by an unknown key")]
    UnknownKey,
    /// `exp` is in the past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `aud` does not name this endpoint.
    #[error("token audience is not this resource")]
    Audience,
    /// `iss` is not the configured issuer.
    #[error("token issuer is not trusted")]
    Issuer,
    /// Valid token lacking required scopes; `scope` is what the client should request.
    #[error("token lacks scope {scope}")]
    InsufficientScope {
        /// Space-separated scopes that would be accepted.
        scope: String,
    },
    /// The issuer's keys cannot be fetched, so no token can be verified: fail closed.
    #[error("signing keys unavailable: {0}")]
    JwksUnavailable(String),
}

impl AuthRefusal {
    /// The HTTP answer: 401 with a `Bearer` challenge (`error="invalid_token"` and a
    /// description when a token was sent), 403 `insufficient_scope` with `scope`, or 503 when
    /// the keys cannot be fetched. `resource_metadata_url` is where the endpoint's RFC 9728
    /// document is served. Body: `{"error": .., "error_description": ..}`.
    pub fn response(&self, resource_metadata_url: &str) -> Response<Bytes> {
        let md = format!("resource_metadata=\"{}\"", quote(resource_metadata_url));
        match self {
            AuthRefusal::MissingToken { scope } => {
                let challenge = match scope {
                    Some(s) => format!("Bearer {md}, scope=\"{}\"", quote(s)),
                    None => format!("Bearer {md}"),
                };
                reply(StatusCode::UNAUTHORIZED, Some(challenge), "unauthorized", "a bearer token is required")
            }
            AuthRefusal::InsufficientScope { scope } => {
                insufficient_scope(resource_metadata_url, scope, "the token lacks a required scope")
            }
            AuthRefusal::JwksUnavailable(_) => {
                let mut r = reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    None,
                    "temporarily_unavailable",
                    "tokens cannot be verified now: the issuer's signing keys are unavailable",
                );
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
                r
            }
            other => {
                let desc = other.description();
                let challenge = format!("Bearer error=\"invalid_token\", error_description=\"{desc}\", {md}");
                reply(StatusCode::UNAUTHORIZED, Some(challenge), "invalid_token", desc)
            }
        }
    }

    /// Short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthRefusal::MissingToken { .. } => "missing",
            AuthRefusal::Malformed(_) => "malformed",
            AuthRefusal::Algorithm(_) => "algorithm",
            AuthRefusal::Signature => "signature",
            AuthRefusal::UnknownKey => "unknown_key",
            AuthRefusal::Expired => "expired",
            AuthRefusal::NotYetValid => "not_yet_valid",
            AuthRefusal::Audience => "audience",
            AuthRefusal::Issuer => "issuer",
            AuthRefusal::InsufficientScope { .. } => "insufficient_scope",
            AuthRefusal::JwksUnavailable(_) => "jwks_unavailable",
        }
    }

    /// Fixed `error_description` text: fixed strings so nothing from the token or from an
    /// internal error is echoed to the client.
    fn description(&self) -> &'static str {
        match self {
            AuthRefusal::MissingToken { .. } => "a bearer token is required",
            AuthRefusal::Malformed(_) => "the token is not a well-formed signed JWT",
            AuthRefusal::Algorithm(_) => "the token signature algorithm is not accepted",
            AuthRefusal::Signature => "the token signature does not verify",
            AuthRefusal::UnknownKey => "the token is signed by an unknown key",
            AuthRefusal::Expired => "the token has expired",
            AuthRefusal::NotYetValid => "the token is not yet valid",
            AuthRefusal::Audience => "the token is not meant for this resource",
            AuthRefusal::Issuer => "the token issuer is not trusted",
            AuthRefusal::InsufficientScope { .. } => "the token lacks a required scope",
            AuthRefusal::JwksUnavailable(_) => "tokens cannot be verified now",
        }
    }
}

/// A valid token that does not grant one tool: the scopes that would (empty when no scope
/// does). Returned by [`super::Grant::allows_tool`] so the listener can hide the tool from
/// `tools/list` or refuse the call with a challenge the client can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tool {tool} needs one of the scopes [{}]", scopes.join(" "))]
pub struct MissingScope {
    /// The tool asked for.
    pub tool: String,
    /// Scopes any one of which would allow it.
    pub scopes: Vec<String>,
    /// Scopes every token needs anyway, repeated in the challenge so a client that
    /// re-authorizes with the challenge's scopes keeps access to the endpoint.
    pub(crate) required: Vec<String>,
}

impl MissingScope {
    /// 403 `insufficient_scope` whose `scope` lists the required scopes and those that would
    /// allow the tool (MCP 2025-11-25 step-up authorization).
    pub fn response(&self, resource_metadata_url: &str) -> Response<Bytes> {
        let mut scopes = self.required.clone();
        scopes.extend(self.scopes.iter().filter(|s| !self.required.contains(s)).cloned());
        let desc = if self.scopes.is_empty() {
            "no scope grants this tool"
        } else {
            "the token lacks a scope that grants this tool"
        };
        insufficient_scope(resource_metadata_url, &scopes.join(" "), desc)
    }
}

fn insufficient_scope(md_url: &str, scope: &str, desc: &str) -> Response<Bytes> {
    let challenge = format!(
        "Bearer error=\"insufficient_scope\", scope=\"{}\", resource_metadata=\"{}\", error_description=\"{desc}\"",
        quote(scope),
        quote(md_url)
    );
    reply(StatusCode::FORBIDDEN, Some(challenge), "insufficient_scope", desc)
}

/// JSON error response with an optional `WWW-Authenticate` challenge.
fn reply(status: StatusCode, challenge: Option<String>, error: &str, desc: &str) -> Response<Bytes> {
    let body = serde_json::json!({ "error": error, "error_description": desc }).to_string();
    let mut r = Response::new(Bytes::from(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(c) = challenge {
        // Every part is a fixed string, a config value or quoted; a value a header cannot
        // carry (control characters in a config URL) drops the challenge rather than panic.
        if let Ok(v) = HeaderValue::from_str(&c) {
            h.insert(header::WWW_AUTHENTICATE, v);
        }
    }
    r
}

/// A value fit for an RFC 7230 quoted-string: `"` and `\` escaped, control characters dropped.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars().filter(|c| !c.is_control()) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
