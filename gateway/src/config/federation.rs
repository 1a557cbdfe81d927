//! MCP federation config (`mcp.federations`): one MCP endpoint, served by tollgate itself, that
//! offers the tools, prompts and resources of several upstream MCP servers (reached over
//! Streamable HTTP, or spawned and supervised as stdio processes). A route serves a federation
//! with `protocol: mcp` and `federation: <name>`, on its explicit `listener` or on a captured
//! address, so agents get one server to configure while every tool stays governed.
//!
//! ```yaml
//! mcp:
//!   federations:
//!     - name: tools
//!       tool_names: prefix        # weather__get_weather, files__read
//!       servers:
//!         - name: weather
//!           url: http://10.0.0.7:8000/mcp
//!         - name: files
//!           command: ["/usr/bin/python3", "files_server.py"]
//! routes:
//!   - { name: tools, protocol: mcp, federation: tools, listener: "127.0.0.1:15010" }
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::mcp_auth::McpAuthConfig;

/// One federation: the servers it fronts and how their names are exposed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// Unique name; routes name it in `federation`, metrics carry it.
    pub name: String,
    /// HTTP path of the MCP endpoint (Streamable HTTP); other paths get 404.
    #[serde(default = "default_path")]
    pub path: String,
    /// How upstream tool and prompt names become the names clients see.
    #[serde(default)]
    pub tool_names: ToolNaming,
    /// Between the server name and the tool name in prefixed names (`weather__get_weather`).
    /// Server names must not contain it, so a prefixed name always maps back to one server.
    #[serde(default = "default_separator")]
    pub separator: String,
    /// The upstream MCP servers, in priority order (the first wins a name under `tool_names:
    /// never`).
    pub servers: Vec<FederatedServer>,
    /// Deadline of one upstream request (initialize, list, call).
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub request_timeout: Duration,
    /// Client sessions kept at most; past it the least recently used session is ended.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// A session unused this long is ended (its upstream HTTP sessions are deleted).
    #[serde(default = "default_session_idle", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub session_idle_timeout: Duration,
    /// Browser origins allowed to call the endpoint (`https://app.example.com`). Agents send no
    /// `Origin`; a request carrying one not listed here is refused with 403, as the transport
    /// spec asks against DNS rebinding (a web page reaching a local endpoint).
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// OAuth 2.1 resource-server checks on the endpoint (MCP authorization spec); absent: no
    /// bearer token is asked for.
    #[serde(default)]
    pub auth: Option<McpAuthConfig>,
}

/// How federated names are formed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ToolNaming {
    /// Every name is `<server><separator><name>`: stable whatever the servers add later.
    #[default]
    Prefix,
    /// Names stay bare unless two servers offer the same one; then each of those is prefixed.
    OnCollision,
    /// Names stay bare; on a collision the server listed first keeps the name and the others'
    /// entries are hidden (logged, and counted in `tollgate_mcp_federation_collisions_total`).
    Never,
}

/// One upstream MCP server: exactly one of `url` (Streamable HTTP) and `command` (stdio).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FederatedServer {
    /// Short unique name: the prefix of its names and the `server` metric label.
    pub name: String,
    /// Streamable HTTP endpoint, e.g. `http://10.0.0.7:8000/mcp`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub url: Option<url::Url>,
    /// Program and arguments of a stdio server, spawned by tollgate and restarted when it exits.
    #[serde(default)]
    pub command: Vec<String>,
    /// Extra environment of the stdio process (tollgate's own environment is not passed on,
    /// except `PATH`, `HOME` and `LANG`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory of the stdio process.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Headers sent on every request to an HTTP server (not for secrets a client should see).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// First restart delay of a stdio process that exited; doubles up to `max_backoff`, and is
    /// reset once the process stayed up for a minute.
    #[serde(default = "default_min_backoff", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub min_backoff: Duration,
    /// Longest restart delay.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_backoff: Duration,
    /// Audience of the token tollgate obtains for this server by RFC 8693 token exchange (needs
    /// `auth.token_exchange`); absent: no token is sent (the client's token is never passed
    /// through, as the MCP authorization spec requires).
    #[serde(default)]
    pub token_audience: Option<String>,
    /// Scope asked for in that exchange (downscoping).
    #[serde(default)]
    pub token_scope: Option<String>,
}

fn default_path() -> String {
    "/mcp".into()
}
fn default_separator() -> String {
    "__".into()
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_sessions() -> usize {
    4096
}
fn default_session_idle() -> Duration {
    Duration::from_secs(3600)
}
fn default_min_backoff() -> Duration {
    Duration::from_millis(200)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

/// Check the federations; errors are `(field path below mcp, message)`.
pub fn validate(feds: &[FederationConfig]) -> Result<(), (String, String)> {
    for (i, f) in feds.iter().enumerate() {
        let at = |s: &str| format!("federations[{i}].{s}");
        if f.name.is_empty() || feds[..i].iter().any(|o| o.name == f.name) {
            return Err((at("name"), format!("{:?} is empty or used twice", f.name)));
        }
        if !f.path.starts_with('/') || f.path.contains(['?', '#']) {
            return Err((at("path"), format!("{:?} must be a path starting with /", f.path)));
        }
        if f.separator.is_empty() || f.separator.contains(char::is_whitespace) {
            return Err((at("separator"), "must be non-empty, without whitespace".into()));
        }
        if f.servers.is_empty() {
            return Err((at("servers"), "needs at least one server".into()));
        }
        if f.request_timeout.is_zero() || f.session_idle_timeout.is_zero() || f.max_sessions == 0 {
            return Err((at("request_timeout"), "timeouts and max_sessions must be positive".into()));
        }
        for (j, s) in f.servers.iter().enumerate() {
            let at = |x: &str| format!("federations[{i}].servers[{j}].{x}");
            validate_server(f, j, s).map_err(|(x, m)| (at(&x), m))?;
        }
        if let Some(a) = &f.auth {
            a.validate().map_err(|(x, m)| (at(&format!("auth.{x}")), m))?;
        }
    }
    Ok(())
}

fn validate_server(f: &FederationConfig, j: usize, s: &FederatedServer) -> Result<(), (String, String)> {
    let name_ok = !s.name.is_empty() && s.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !name_ok || f.servers[..j].iter().any(|o| o.name == s.name) {
        return Err(("name".into(), format!("{:?} must be unique and made of [A-Za-z0-9_-]", s.name)));
    }
    if s.name.contains(f.separator.as_str()) {
        return Err(("name".into(), format!("must not contain the separator {:?}", f.separator)));
    }
    match (&s.url, s.command.is_empty()) {
        (Some(_), false) | (None, true) => return Err(("url".into(), "set exactly one of url, command".into())),
        (Some(u), true) if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() => {
            return Err(("url".into(), format!("{u} must be an http:// or https:// URL with a host")));
        }
        _ => {}
    }
    if s.command.first().is_some_and(|c| c.is_empty()) {
        return Err(("command[0]".into(), "program must not be empty".into()));
    }
    for (k, v) in &s.headers {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err() || http::HeaderValue::from_str(v).is_err() {
            return Err((format!("headers.{k}"), "not a valid header name and value".into()));
        }
    }
    if s.min_backoff.is_zero() || s.max_backoff < s.min_backoff {
        return Err(("min_backoff".into(), "must be positive and at most max_backoff".into()));
    }
    if (s.token_audience.is_some() || s.token_scope.is_some()) && s.url.is_none() {
        return Err(("token_audience".into(), "token exchange applies to url servers only".into()));
    }
    let exchanges = f.auth.as_ref().is_some_and(|a| a.token_exchange.is_some());
    if s.token_audience.is_some() && !exchanges {
        return Err(("token_audience".into(), "needs auth.token_exchange in the federation".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::load::from_str;

    #[test]
    fn servers_need_one_transport_and_clean_names() {
        let base = "mcp:\n  federations:\n  - name: f\n    servers:\n";
        let ok = format!(
            "{base}    - {{name: a, url: 'http://127.0.0.1:1/mcp'}}\n    - {{name: b, command: [python3, s.py]}}\n"
        );
        let c = from_str("f.yaml", &ok).expect("valid");
        assert_eq!(c.mcp.federations[0].servers.len(), 2);
        let both = format!("{base}    - {{name: a, url: 'http://h/mcp', command: [x]}}\n");
        let e = from_str("f.yaml", &both).unwrap_err().to_string();
        assert!(e.starts_with("f.yaml:5:22: mcp.federations[0].servers[0].url: set exactly one"), "{e}");
        let sep = format!("{base}    - {{name: a__b, url: 'http://h/mcp'}}\n");
        let e = from_str("f.yaml", &sep).unwrap_err().to_string();
        assert!(e.contains("mcp.federations[0].servers[0].name: must not contain the separator"), "{e}");
        let dup = format!("{base}    - {{name: a, url: 'http://h/mcp'}}\n    - {{name: a, command: [x]}}\n");
        assert!(from_str("f.yaml", &dup).unwrap_err().to_string().contains("servers[1].name"));
    }

    #[test]
    fn auth_errors_point_into_the_federation() {
        let text = "mcp:\n  federations:\n  - name: f\n    servers: [{name: a, url: 'http://h/mcp'}]\n    auth:\n      issuer: https://idp.example\n      jwks_url: https://idp.example/jwks\n      audience: https://tg.example/mcp\n      algorithms: [RS256, HS256]\n";
        let e = from_str("f.yaml", text).unwrap_err().to_string();
        assert!(e.starts_with("f.yaml:9:") && e.contains("mcp.federations[0].auth.algorithms"), "{e}");
        let ok = text.replace(", HS256", "");
        from_str("f.yaml", &ok).expect("valid auth");
        let storm = format!("{ok}      jwks_min_refetch: 0s\n");
        let e = from_str("f.yaml", &storm).unwrap_err().to_string();
        assert!(e.contains("auth.jwks_min_refetch: must be at least 1s"), "{e}");
        let exch = format!("{ok}    servers: []\n");
        assert!(from_str("f.yaml", &exch).is_err(), "duplicate key");
        let aud = ok.replace(
            "servers: [{name: a, url: 'http://h/mcp'}]",
            "servers: [{name: a, url: 'http://h/mcp', token_audience: up}]",
        );
        let e = from_str("f.yaml", &aud).unwrap_err().to_string();
        assert!(e.contains("servers[0].token_audience: needs auth.token_exchange"), "{e}");
    }

    #[test]
    fn routes_must_name_a_known_federation() {
        let text = "mcp: {federations: [{name: f, servers: [{name: a, command: [x]}]}]}\nroutes:\n- {name: r, protocol: mcp, federation: g, listener: '127.0.0.1:15999'}\n";
        let e = from_str("f.yaml", text).unwrap_err().to_string();
        assert!(e.contains("routes[0].federation: no federation named \"g\""), "{e}");
        let text = text.replace("federation: g", "federation: f");
        from_str("f.yaml", &text).expect("a federation route needs no upstream");
        let llm = text.replace("protocol: mcp", "protocol: llm");
        assert!(from_str("f.yaml", &llm).unwrap_err().to_string().contains("protocol: mcp"));
    }
}
