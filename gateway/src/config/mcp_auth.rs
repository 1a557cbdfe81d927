//! OAuth for MCP endpoints served by tollgate (`auth:` of an MCP federation): tollgate acts as
//! an OAuth 2.1 protected resource (MCP authorization spec, RFC 9728 metadata, RFC 6750 bearer
//! tokens, RFC 8707 audiences) and may exchange a caller's token for one meant for a
//! downstream server (RFC 8693) instead of passing it through. Kept in its own module so the
//! federation config only embeds [`McpAuthConfig`] and the checks live next to the fields.
//!
//! ```yaml
//! auth:
//!   issuer: https://login.example.com/realms/agents
//!   jwks_url: https://login.example.com/realms/agents/protocol/openid-connect/certs
//!   audience: https://tollgate.example.com/mcp
//!   required_scopes: [mcp]
//!   tool_scopes:
//!     - { scope: weather.read, tools: ["weather__get_*"] }
//!   agent_claim: azp
//!   token_exchange:
//!     endpoint: https://login.example.com/realms/agents/protocol/openid-connect/token
//!     client_id: tollgate
//!     client_secret: { file: /var/run/secrets/tollgate/client-secret }
//! ```

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::governance::{check_globs, check_rule_name};
use super::CredentialSource;

/// Token checks and discovery metadata of one MCP endpoint. One per federation: each endpoint
/// is its own protected resource with its own audience.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct McpAuthConfig {
    /// Authorization server that issues tokens for this endpoint: advertised to clients in the
    /// metadata (`authorization_servers`) so they know where to log in, and required as the
    /// token's `iss` so a token from any other issuer is refused.
    #[schemars(with = "String")]
    pub issuer: url::Url,
    /// Where the issuer publishes its signing keys (JWKS). Tokens are verified locally against
    /// these keys, so no call to the authorization server is made per request.
    #[schemars(with = "String")]
    pub jwks_url: url::Url,
    /// Required `aud` of every token: this endpoint's canonical resource URI (RFC 8707), so a
    /// token minted for another server cannot be replayed here. A token's `aud` may be a
    /// string or an array containing it.
    pub audience: String,
    /// `resource` advertised in the metadata; default: `audience`. Differs only when the
    /// issuer puts a logical name rather than the URI in `aud`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub resource: Option<url::Url>,
    /// Signature algorithms accepted. Asymmetric only: `none` and HMAC (`HS*`) are refused at
    /// load time, since a shared secret would let anyone holding it mint tokens.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<JwtAlgorithm>,
    /// Clock skew tolerated on `exp` and `nbf`, because the issuer's clock and this node's are
    /// never quite equal.
    #[serde(default = "default_leeway", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub leeway: Duration,
    /// How long fetched signing keys are used before they are fetched again, so a key removed
    /// by the issuer stops being trusted within this time.
    #[serde(default = "default_jwks_refresh", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub jwks_refresh: Duration,
    /// A token signed by an unknown key id triggers at most one JWKS refetch per this interval:
    /// key rotation is picked up at once, a flood of forged key ids cannot hammer the issuer.
    #[serde(default = "default_jwks_min_refetch", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub jwks_min_refetch: Duration,
    /// Bound on one JWKS fetch, so a hung issuer fails requests quickly (503) instead of
    /// holding them.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub jwks_timeout: Duration,
    /// Scopes advertised in the metadata (`scopes_supported`), which clients request when the
    /// challenge names none.
    #[serde(default)]
    pub scopes_supported: Vec<String>,
    /// Scopes every token must carry; a token lacking one is refused with 403
    /// `insufficient_scope` naming them, so the client can ask for them.
    #[serde(default)]
    pub required_scopes: Vec<String>,
    /// Scopes mapped to tool ACLs. When non-empty, a tool (as named to the client, e.g.
    /// `weather__get_weather`) is listed and callable only when the token holds a scope whose
    /// globs match it: the issuer decides which tools a client may use.
    #[serde(default)]
    pub tool_scopes: Vec<ToolScope>,
    /// Claim naming the calling agent (e.g. `azp`, `client_id`, `sub`) when the connection has
    /// no kernel identity (a remote client), so policies and metrics still have a name.
    #[serde(default)]
    pub agent_claim: Option<String>,
    /// RFC 8693 token exchange for calls to downstream servers: each gets a token meant for
    /// it, never the caller's token (which the MCP spec forbids passing through).
    #[serde(default)]
    pub token_exchange: Option<TokenExchangeConfig>,
}

/// A JWS signature algorithm name as it appears in a token header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum JwtAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// RSASSA-PSS with SHA-384.
    PS384,
    /// RSASSA-PSS with SHA-512.
    PS512,
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// ECDSA P-384 with SHA-384.
    ES384,
    /// Ed25519.
    EdDSA,
    /// HMAC with SHA-256: parsed only so the loader can say why it is refused.
    HS256,
    /// HMAC with SHA-384: refused, see `HS256`.
    HS384,
    /// HMAC with SHA-512: refused, see `HS256`.
    HS512,
    /// Unsigned tokens: parsed only so the loader can say why it is refused.
    #[serde(rename = "none")]
    None,
}

impl JwtAlgorithm {
    /// Whether the algorithm is symmetric or no signature at all: such tokens are never
    /// accepted by a resource server that does not hold the issuer's secret.
    pub fn is_refused(self) -> bool {
        matches!(self, JwtAlgorithm::HS256 | JwtAlgorithm::HS384 | JwtAlgorithm::HS512 | JwtAlgorithm::None)
    }
}

/// One scope and the tools it grants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolScope {
    /// Scope value as it appears in the token's `scope` claim.
    pub scope: String,
    /// Tool name globs (names as the client sees them) this scope grants.
    pub tools: Vec<String>,
}

/// Where and as whom tollgate exchanges tokens (RFC 8693).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenExchangeConfig {
    /// The authorization server's token endpoint.
    #[schemars(with = "String")]
    pub endpoint: url::Url,
    /// tollgate's client id at that server (the exchange is made as tollgate, on behalf of the
    /// caller).
    pub client_id: String,
    /// tollgate's client secret, from an environment variable or a file (re-read when it
    /// changes, so it can be rotated without a restart); sent as HTTP Basic.
    pub client_secret: CredentialSource,
    /// Bound on one exchange, so a slow token endpoint fails the tool call instead of holding
    /// it.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

fn default_algorithms() -> Vec<JwtAlgorithm> {
    vec![JwtAlgorithm::RS256, JwtAlgorithm::ES256]
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

fn default_jwks_refresh() -> Duration {
    Duration::from_secs(300)
}

fn default_jwks_min_refetch() -> Duration {
    Duration::from_secs(10)
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

impl McpAuthConfig {
    /// The `resource` advertised in the metadata: `resource` when set, else the audience.
    pub fn resource_uri(&self) -> String {
        self.resource.as_ref().map_or_else(|| self.audience.clone(), |u| u.to_string())
    }

    /// Checks serde cannot express. Errors are `(field path below auth, message)` like
    /// [`super::mcp::McpConfig::validate`], so the loader can point at the line.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (f, u) in [("issuer", &self.issuer), ("jwks_url", &self.jwks_url)] {
            check_http_url(f, u)?;
        }
        if self.audience.trim().is_empty() {
            return Err(("audience".into(), "must not be empty: it is the token's required aud".into()));
        }
        match &self.resource {
            Some(r) => check_http_url("resource", r)?,
            None => {
                // RFC 9728: the advertised resource is a URL; a logical audience needs `resource`.
                let ok = url::Url::parse(&self.audience).is_ok_and(|u| check_http_url("", &u).is_ok());
                if !ok {
                    return Err((
                        "audience".into(),
                        "is not an http(s) URL: set `resource` to the endpoint's URL".into(),
                    ));
                }
            }
        }
        if self.algorithms.is_empty() {
            return Err(("algorithms".into(), "needs at least one algorithm".into()));
        }
        if let Some((i, a)) = self.algorithms.iter().enumerate().find(|(_, a)| a.is_refused()) {
            return Err((
                format!("algorithms[{i}]"),
                format!("{a:?} is refused: only asymmetric signatures can be verified without the issuer's secret"),
            ));
        }
        if self.jwks_refresh < Duration::from_secs(1) {
            return Err(("jwks_refresh".into(), "must be at least 1s".into()));
        }
        if self.jwks_min_refetch < Duration::from_secs(1) {
            // Otherwise every forged key id would be one more fetch from the issuer.
            return Err(("jwks_min_refetch".into(), "must be at least 1s".into()));
        }
        for (f, d) in [("jwks_timeout", self.jwks_timeout)] {
            if d.is_zero() {
                return Err((f.into(), "must be positive".into()));
            }
        }
        for (list, items) in [("scopes_supported", &self.scopes_supported), ("required_scopes", &self.required_scopes)]
        {
            if let Some(j) = items.iter().position(|s| !is_scope_token(s)) {
                return Err((format!("{list}[{j}]"), format!("{:?} is not a scope (RFC 6749 scope-token)", items[j])));
            }
        }
        for (i, t) in self.tool_scopes.iter().enumerate() {
            let at = format!("tool_scopes[{i}]");
            if !is_scope_token(&t.scope) {
                return Err((format!("{at}.scope"), format!("{:?} is not a scope (RFC 6749 scope-token)", t.scope)));
            }
            check_rule_name(&at, &t.scope, self.tool_scopes[..i].iter().map(|o| o.scope.as_str()))
                .map_err(|_| (format!("{at}.scope"), format!("{:?} is listed twice", t.scope)))?;
            if t.tools.is_empty() {
                return Err((format!("{at}.tools"), "needs at least one tool name or glob".into()));
            }
            check_globs(&format!("{at}.tools"), &t.tools)?;
        }
        if self.agent_claim.as_deref().is_some_and(|c| c.trim().is_empty()) {
            return Err(("agent_claim".into(), "must not be empty".into()));
        }
        if let Some(x) = &self.token_exchange {
            check_http_url("token_exchange.endpoint", &x.endpoint)?;
            if x.client_id.is_empty() || x.client_id.chars().any(char::is_control) {
                return Err(("token_exchange.client_id".into(), "must be non-empty printable text".into()));
            }
            match (&x.client_secret.env, &x.client_secret.file) {
                (Some(e), None) if !e.is_empty() => {}
                (None, Some(_)) => {}
                _ => return Err(("token_exchange.client_secret".into(), "set exactly one of env, file".into())),
            }
            if x.timeout.is_zero() {
                return Err(("token_exchange.timeout".into(), "must be positive".into()));
            }
        }
        Ok(())
    }

    /// [`McpAuthConfig::validate`] with every field path prefixed by `prefix` (e.g.
    /// `mcp.federations[0].auth`), the form the loader reports.
    pub fn validate_at(&self, prefix: &str) -> Result<(), (String, String)> {
        self.validate().map_err(|(f, m)| (format!("{prefix}.{f}"), m))
    }
}

/// An `http`/`https` URL with a host, without which nothing can be fetched or advertised.
fn check_http_url(field: &str, u: &url::Url) -> Result<(), (String, String)> {
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err((field.into(), format!("{u} must be an http:// or https:// URL with a host")));
    }
    Ok(())
}

/// RFC 6749 §3.3 scope-token: printable ASCII except space, `"` and `\`, so it can be
/// joined with spaces and quoted in a `WWW-Authenticate` header.
fn is_scope_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "issuer: https://as.example.com\njwks_url: https://as.example.com/jwks\naudience: https://mcp.example.com/mcp\n";

    fn parse(extra: &str) -> McpAuthConfig {
        serde_yaml_ng::from_str(&format!("{BASE}{extra}")).expect("parse")
    }

    #[test]
    fn defaults_are_filled() {
        let c = parse("");
        assert_eq!(c.algorithms, vec![JwtAlgorithm::RS256, JwtAlgorithm::ES256]);
        assert_eq!(c.leeway, Duration::from_secs(30));
        assert_eq!(c.jwks_refresh, Duration::from_secs(300));
        assert_eq!(c.jwks_min_refetch, Duration::from_secs(10));
        assert_eq!(c.jwks_timeout, Duration::from_secs(5));
        assert_eq!(c.resource_uri(), "https://mcp.example.com/mcp");
        assert!(c.validate().is_ok());
        let c = parse(
            "token_exchange: {endpoint: 'https://as.example.com/token', client_id: tg, client_secret: {env: S}}\n",
        );
        assert_eq!(c.token_exchange.as_ref().map(|x| x.timeout), Some(Duration::from_secs(5)));
        assert!(c.validate().is_ok());
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            ("algorithms: [ES256, HS256]\n", "algorithms[1]"),
            ("algorithms: [none]\n", "algorithms[0]"),
            ("algorithms: []\n", "algorithms"),
            ("tool_scopes: [{scope: w, tools: ['ok', '[']}]\n", "tool_scopes[0].tools[1]"),
            ("tool_scopes: [{scope: w, tools: [a]}, {scope: w, tools: [b]}]\n", "tool_scopes[1].scope"),
            ("tool_scopes: [{scope: 'a b', tools: [x]}]\n", "tool_scopes[0].scope"),
            ("tool_scopes: [{scope: w, tools: []}]\n", "tool_scopes[0].tools"),
            ("required_scopes: [ok, 'sp ace']\n", "required_scopes[1]"),
            ("resource: 'urn:x:y'\n", "resource"),
            ("agent_claim: ''\n", "agent_claim"),
            ("jwks_timeout: 0s\n", "jwks_timeout"),
            (
                "token_exchange: {endpoint: 'https://as/t', client_id: tg, client_secret: {env: S, file: /s}}\n",
                "token_exchange.client_secret",
            ),
            (
                "token_exchange: {endpoint: 'https://as/t', client_id: tg, client_secret: {}}\n",
                "token_exchange.client_secret",
            ),
            (
                "token_exchange: {endpoint: 'ftp://as/t', client_id: tg, client_secret: {env: S}}\n",
                "token_exchange.endpoint",
            ),
        ];
        for (extra, field) in cases {
            let err = parse(extra).validate().unwrap_err();
            assert_eq!(err.0, field, "{extra}: {err:?}");
        }
        let mut c = parse("");
        c.audience = " ".into();
        assert_eq!(c.validate().unwrap_err().0, "audience");
        c.audience = "mcp-api".into();
        assert_eq!(c.validate().unwrap_err().0, "audience");
        c.resource = Some(url::Url::parse("https://mcp.example.com/mcp").expect("url"));
        assert!(c.validate().is_ok());
        assert_eq!(c.resource_uri(), "https://mcp.example.com/mcp");
        let err = parse("algorithms: [HS256]\n").validate_at("mcp.federations[2].auth").unwrap_err();
        assert_eq!(err.0, "mcp.federations[2].auth.algorithms[0]");
        assert!(err.1.contains("HS256 is refused"), "{}", err.1);
    }

    #[test]
    fn unknown_fields_and_algorithms_are_parse_errors() {
        assert!(serde_yaml_ng::from_str::<McpAuthConfig>(&format!("{BASE}audiense: x\n")).is_err());
        assert!(serde_yaml_ng::from_str::<McpAuthConfig>(&format!("{BASE}algorithms: [XS1]\n")).is_err());
        assert!(serde_yaml_ng::from_str::<McpAuthConfig>("issuer: https://a\njwks_url: https://a/k\n").is_err());
    }
}
