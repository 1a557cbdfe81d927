//! Who may use a route's explicit `listener`. Such a listener is a plain-HTTP front door with no
//! kernel record behind it: unless the route's `listener_auth` says otherwise, a caller of a
//! route that injects provider keys must be identified by a shared token or a source-address
//! allow-list before anything is forwarded, so the listener is never an open key-injecting proxy.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, AUTHORIZATION};
use http::{HeaderMap, Response, StatusCode};
use ipnet::IpNet;
use subtle::ConstantTimeEq;

use crate::config::{ProviderKind, RouteConfig};
use crate::protocol::errors::{shaped_error, ErrorClass};
use crate::protocol::http::{shape_of, ProxyBody};
use crate::upstream::credentials::{Credential, CredentialError};

/// Headers a caller may carry the listener token in besides `Authorization: Bearer`: the API-key
/// headers of the SDKs (Anthropic, Azure OpenAI, Gemini), so an unmodified SDK authenticates by
/// setting its API key to the token.
const KEY_HEADERS: [&str; 3] = ["x-api-key", "api-key", "x-goog-api-key"];

/// How often a token file is polled besides the file watcher.
const TOKEN_POLL: Duration = Duration::from_secs(30);

/// Why a caller was refused (the `reason` label of `tollgate_listener_refusals_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source address is outside `listener_auth.allow_cidrs` (403).
    Source,
    /// No token, or the wrong one (401).
    Token,
}

impl Refusal {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Source => "source",
            Refusal::Token => "token",
        }
    }
}

/// The admission check of one listener route, built per config generation.
pub struct ListenerGate {
    token: Option<Arc<Credential>>,
    cidrs: Vec<IpNet>,
}

impl ListenerGate {
    /// The gate of `route`, `None` when its `listener_auth` asks for no check (validation
    /// already refused key-injecting listeners without one, unless `allow_anonymous`).
    pub fn build(route: &RouteConfig) -> Result<Option<ListenerGate>, CredentialError> {
        let auth = &route.listener_auth;
        let token = auth.token.as_ref().map(|t| Credential::load(t, TOKEN_POLL)).transpose()?;
        if token.is_none() && auth.allow_cidrs.is_empty() {
            return Ok(None);
        }
        Ok(Some(ListenerGate { token, cidrs: auth.allow_cidrs.clone() }))
    }

    /// Admit a request from `peer`: the source must be in the allow-list (when one is set) and
    /// the request must carry the token (when one is set). The header that carried the token is
    /// removed, so it never reaches a provider.
    pub fn admit(&self, peer: IpAddr, headers: &mut HeaderMap) -> Result<(), Refusal> {
        let peer = peer.to_canonical();
        if !self.cidrs.is_empty() && !self.cidrs.iter().any(|c| c.contains(&peer)) {
            return Err(Refusal::Source);
        }
        let Some(token) = &self.token else { return Ok(()) };
        let want = token.get();
        let want = want.expose().as_bytes();
        let carrier = presented(headers).find(|(_, v)| bool::from(v.ct_eq(want))).map(|(n, _)| n);
        match carrier {
            Some(name) => {
                headers.remove(name);
                Ok(())
            }
            None => Err(Refusal::Token),
        }
    }
}

/// Every token candidate a request presents: `(header, value)`.
fn presented(headers: &HeaderMap) -> impl Iterator<Item = (HeaderName, &[u8])> {
    let bearer = headers.get_all(AUTHORIZATION).iter().filter_map(|v| {
        let v = v.as_bytes();
        (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| (AUTHORIZATION, v[7..].trim_ascii()))
    });
    let keys = KEY_HEADERS.iter().flat_map(move |n| {
        headers.get_all(*n).iter().map(move |v| (HeaderName::from_static(n), v.as_bytes().trim_ascii()))
    });
    bearer.chain(keys)
}

/// The refusal in the route's API shape.
pub fn refusal(route: &str, provider: ProviderKind, why: Refusal) -> Response<ProxyBody> {
    let shape = shape_of(provider);
    match why {
        Refusal::Source => shaped_error(
            shape,
            StatusCode::FORBIDDEN,
            ErrorClass::Permission,
            "listener_source_refused",
            &format!("route {}: this address may not use the listener", route),
        ),
        Refusal::Token => shaped_error(
            shape,
            StatusCode::UNAUTHORIZED,
            ErrorClass::Authentication,
            "listener_token_required",
            &format!("route {}: the listener requires its token (Authorization: Bearer, or the API key)", route),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn route(yaml: &str) -> RouteConfig {
        let text = format!(
            "providers: [{{name: p, kind: openai, credentials: {{env: PATH}}}}]\nroutes:\n- name: gw\n  listener: 127.0.0.1:4000\n  targets: [{{provider: p}}]\n  listener_auth: {yaml}\n"
        );
        crate::config::from_str("t.yaml", &text).unwrap().routes.remove(0)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn token_in_bearer_or_api_key_admits_and_is_stripped() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("token");
        std::fs::write(&file, "s3cret-listener\n").unwrap();
        let gate = ListenerGate::build(&route(&format!("{{token: {{file: {}}}}}", file.display()))).unwrap().unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();

        let mut h = headers(&[("authorization", "Bearer s3cret-listener"), ("x-other", "1")]);
        assert_eq!(gate.admit(ip, &mut h), Ok(()));
        assert!(h.get(AUTHORIZATION).is_none(), "token forwarded");
        assert!(h.contains_key("x-other"));

        // Anthropic-style SDK: the token is its API key; the bearer header of someone else stays.
        let mut h = headers(&[("x-api-key", "s3cret-listener"), ("authorization", "Bearer other")]);
        assert_eq!(gate.admit(ip, &mut h), Ok(()));
        assert!(h.get("x-api-key").is_none());
        assert_eq!(h.get(AUTHORIZATION).unwrap(), "Bearer other");

        for bad in [
            headers(&[]),
            headers(&[("authorization", "Bearer s3cret-listene")]),
            headers(&[("authorization", "Bearer s3cret-listener2")]),
            headers(&[("authorization", "Basic s3cret-listener")]),
            headers(&[("x-goog-api-key", "nope")]),
        ] {
            let mut h = bad.clone();
            assert_eq!(gate.admit(ip, &mut h), Err(Refusal::Token), "{bad:?}");
            assert_eq!(h, bad, "a refused request is left as it was");
        }
    }

    #[test]
    fn source_allow_list_and_both_checks() {
        let gate = ListenerGate::build(&route("{allow_cidrs: [10.1.0.0/16, '::1/128']}")).unwrap().unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(gate.admit("10.1.2.3".parse().unwrap(), &mut h), Ok(()));
        assert_eq!(gate.admit("::1".parse().unwrap(), &mut h), Ok(()));
        assert_eq!(gate.admit("::ffff:10.1.9.9".parse().unwrap(), &mut h), Ok(()), "v4-mapped peer");
        assert_eq!(gate.admit("10.2.0.1".parse().unwrap(), &mut h), Err(Refusal::Source));
        assert_eq!(gate.admit("127.0.0.1".parse().unwrap(), &mut h), Err(Refusal::Source));

        std::env::set_var("TOLLGATE_TEST_LISTENER_TOKEN", "tok");
        let both =
            ListenerGate::build(&route("{allow_cidrs: [10.1.0.0/16], token: {env: TOLLGATE_TEST_LISTENER_TOKEN}}"))
                .unwrap()
                .unwrap();
        let ok = || headers(&[("authorization", "Bearer tok")]);
        assert_eq!(both.admit("10.1.0.1".parse().unwrap(), &mut ok()), Ok(()));
        assert_eq!(both.admit("10.9.0.1".parse().unwrap(), &mut ok()), Err(Refusal::Source));
        assert_eq!(both.admit("10.1.0.1".parse().unwrap(), &mut HeaderMap::new()), Err(Refusal::Token));
        assert!(ListenerGate::build(&route("{allow_anonymous: true}")).unwrap().is_none());
    }

    #[tokio::test]
    async fn refusals_in_the_route_shape() {
        use http_body_util::BodyExt;
        let r = refusal("gw", ProviderKind::Anthropic, Refusal::Token);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let v: serde_json::Value = serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "authentication_error");
        let r = refusal("gw", ProviderKind::Openai, Refusal::Source);
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let v: serde_json::Value = serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(v["error"]["code"], "listener_source_refused");
        assert!(v["error"]["message"].as_str().unwrap().starts_with("tollgate: route gw:"));
    }
}
