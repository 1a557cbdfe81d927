//! The authenticator against a real (in-process) JWKS and token endpoint: every refusal
//! reason, the exact challenges, key rotation with its refetch rate limit, and the token
//! exchange with its cache.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::{json, Value};

use super::test_server::{Server, TestKey};
use super::*;
use crate::config::mcp_auth::{McpAuthConfig, TokenExchangeConfig, ToolScope};
use crate::config::{Config, CredentialSource};
use crate::upstream::client_tls_config;

const AUD: &str = "https://mcp.example.com/mcp";
const MD_URL: &str = "https://mcp.example.com/.well-known/oauth-protected-resource/mcp";

fn upstream() -> Arc<Upstream> {
    let mut cfg = Config::default();
    cfg.capture.self_mark = 0;
    Arc::new(Upstream::with_tls(&cfg, client_tls_config(&cfg).expect("tls")))
}

fn config(srv: &Server) -> McpAuthConfig {
    let text = format!(
        "issuer: https://as.example.com\njwks_url: {}\naudience: {AUD}\nscopes_supported: [mcp, weather.read]\n",
        srv.url("/jwks.json")
    );
    serde_yaml_ng::from_str(&text).expect("config")
}

fn now() -> u64 {
    exchange::unix_now()
}

fn claims(extra: Value) -> Value {
    let mut c = json!({
        "iss": "https://as.example.com", "aud": AUD, "sub": "user-1", "azp": "agent-7",
        "iat": now(), "exp": now() + 300, "scope": "mcp weather.read",
    });
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            if v.is_null() {
                c.remove(k);
            } else {
                c.insert(k.clone(), v.clone());
            }
        }
    }
    c
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(http::header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}")).expect("header"));
    h
}

fn challenge(r: &http::Response<bytes::Bytes>) -> String {
    r.headers().get(http::header::WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

async fn refused(a: &Authenticator, token: &str) -> AuthRefusal {
    a.authenticate(&bearer(token)).await.expect_err("refused")
}

#[tokio::test]
async fn valid_token_is_granted_and_metadata_is_served() {
    let key = TestKey::new("k1");
    let srv = Server::start(&[&key]).await;
    let mut cfg = config(&srv);
    cfg.agent_claim = Some("azp".into());
    cfg.required_scopes = vec!["mcp".into()];
    let a = Authenticator::new(&cfg, upstream()).expect("authenticator");
    assert_eq!(a.jwks_fetches(), 0, "keys are fetched lazily");
    let g = a.authenticate(&bearer(&key.sign(&claims(json!({}))))).await.expect("granted");
    assert_eq!(g.subject.as_deref(), Some("user-1"));
    assert_eq!(g.agent.as_deref(), Some("agent-7"));
    assert_eq!(g.scopes, vec!["mcp".to_string(), "weather.read".to_string()]);
    assert!(g.expires_at > now());
    assert!(!format!("{g:?}").contains(&key.sign(&claims(json!({})))[..20]));
    // aud as an array, scp instead of scope, issuer with a trailing slash.
    let t = key
        .sign(&claims(json!({"aud": ["other", AUD], "scope": null, "scp": ["mcp"], "iss": "https://as.example.com/"})));
    assert_eq!(a.authenticate(&bearer(&t)).await.expect("array aud").scopes, vec!["mcp".to_string()]);
    assert_eq!(srv.jwks_hits(), 1, "cached");

    assert_eq!(
        a.metadata(),
        json!({
            "resource": AUD,
            "authorization_servers": ["https://as.example.com"],
            "scopes_supported": ["mcp", "weather.read"],
            "bearer_methods_supported": ["header"],
        })
    );
    assert_eq!(a.resource_metadata_url().as_deref(), Some(MD_URL));
    assert!(a.is_metadata_path("/.well-known/oauth-protected-resource/mcp", "/mcp"));
    assert!(a.is_metadata_path("/.well-known/oauth-protected-resource", "/mcp"));
    assert!(!a.is_metadata_path("/.well-known/oauth-protected-resource/other", "/mcp"));
    assert!(!a.is_metadata_path("/mcp", "/mcp"));
    assert_eq!(a.metadata_response().status(), StatusCode::OK);
}

#[tokio::test]
async fn claims_are_checked_with_leeway() {
    let key = TestKey::new("k1");
    let srv = Server::start(&[&key]).await;
    let a = Authenticator::new(&config(&srv), upstream()).expect("authenticator");
    let ok = |extra: Value| key.sign(&claims(extra));
    // Within the 30 s leeway both ways.
    assert!(a.authenticate(&bearer(&ok(json!({"exp": now() - 10})))).await.is_ok());
    assert!(a.authenticate(&bearer(&ok(json!({"nbf": now() + 10})))).await.is_ok());
    let cases = [
        (json!({"exp": now() - 120}), AuthRefusal::Expired, "expired"),
        (json!({"nbf": now() + 120}), AuthRefusal::NotYetValid, "not_yet_valid"),
        (json!({"aud": "https://other.example.com/mcp"}), AuthRefusal::Audience, "audience"),
        (json!({"aud": ["a", "b"]}), AuthRefusal::Audience, "audience"),
        (json!({"aud": null}), AuthRefusal::Audience, "audience"),
        (json!({"iss": "https://evil.example.com"}), AuthRefusal::Issuer, "issuer"),
        (json!({"iss": null}), AuthRefusal::Issuer, "issuer"),
    ];
    for (extra, want, reason) in cases {
        let got = refused(&a, &ok(extra.clone())).await;
        assert_eq!(got, want, "{extra}");
        assert_eq!(got.reason(), reason);
        let r = got.response(MD_URL);
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(challenge(&r).starts_with("Bearer error=\"invalid_token\", error_description=\""), "{}", challenge(&r));
    }
    assert!(matches!(refused(&a, &ok(json!({"exp": null}))).await, AuthRefusal::Malformed(_)));
    // A token signed by a key with the right kid but different material.
    let forged = TestKey::new("k1").sign(&claims(json!({})));
    assert_eq!(refused(&a, &forged).await, AuthRefusal::Signature);
}

#[tokio::test]
async fn challenges_have_exact_formats() {
    let key = TestKey::new("k1");
    let srv = Server::start(&[&key]).await;
    let mut cfg = config(&srv);
    cfg.required_scopes = vec!["mcp".into(), "tools".into()];
    let a = Authenticator::new(&cfg, upstream()).expect("authenticator");

    let none = a.authenticate(&HeaderMap::new()).await.expect_err("no token");
    assert_eq!(none.reason(), "missing");
    let r = none.response(MD_URL);
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(challenge(&r), format!("Bearer resource_metadata=\"{MD_URL}\", scope=\"mcp tools\""));
    let body: Value = serde_json::from_slice(r.body()).expect("json");
    assert_eq!(body["error"], "unauthorized");
    // Another scheme is no bearer token at all.
    let mut basic = HeaderMap::new();
    basic.insert(http::header::AUTHORIZATION, HeaderValue::from_static("Basic dXNlcjpwdw=="));
    assert_eq!(a.authenticate(&basic).await.expect_err("basic").reason(), "missing");
    let plain = AuthRefusal::MissingToken { scope: None }.response(MD_URL);
    assert_eq!(challenge(&plain), format!("Bearer resource_metadata=\"{MD_URL}\""));

    let r = refused(&a, &key.sign(&claims(json!({"exp": now() - 600})))).await.response(MD_URL);
    assert_eq!(
        challenge(&r),
        format!("Bearer error=\"invalid_token\", error_description=\"the token has expired\", resource_metadata=\"{MD_URL}\"")
    );
    let body: Value = serde_json::from_slice(r.body()).expect("json");
    assert_eq!(body, json!({"error": "invalid_token", "error_description": "the token has expired"}));

    let lacking = refused(&a, &key.sign(&claims(json!({"scope": "mcp"})))).await;
    assert_eq!(lacking, AuthRefusal::InsufficientScope { scope: "mcp tools".into() });
    let r = lacking.response(MD_URL);
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        challenge(&r),
        format!("Bearer error=\"insufficient_scope\", scope=\"mcp tools\", resource_metadata=\"{MD_URL}\", error_description=\"the token lacks a required scope\"")
    );
    let body: Value = serde_json::from_slice(r.body()).expect("json");
    assert_eq!(body["error"], "insufficient_scope");

    assert_eq!(refused(&a, "not-a-jwt").await.reason(), "malformed");
    let mut two = bearer("a.b.c");
    two.append(http::header::AUTHORIZATION, HeaderValue::from_static("Bearer x.y.z"));
    assert_eq!(a.authenticate(&two).await.expect_err("two").reason(), "malformed");
}

#[tokio::test]
async fn none_and_hmac_tokens_are_refused() {
    let key = TestKey::new("k1");
    let srv = Server::start(&[&key]).await;
    let a = Authenticator::new(&config(&srv), upstream()).expect("authenticator");
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let unsigned = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&claims(json!({}))));
    assert_eq!(refused(&a, &unsigned).await.reason(), "malformed");
    let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
    h.kid = Some("k1".into());
    let hs = jsonwebtoken::encode(&h, &claims(json!({})), &jsonwebtoken::EncodingKey::from_secret(b"shared"))
        .expect("hs256");
    let got = refused(&a, &hs).await;
    assert_eq!(got, AuthRefusal::Algorithm("HS256".into()));
    assert_eq!(got.response(MD_URL).status(), StatusCode::UNAUTHORIZED);
    // An ES256-only config refuses an RS256 header before looking at keys.
    let mut h = jsonwebtoken::Header::new(Algorithm::RS256);
    h.kid = Some("k1".into());
    let rs = format!("{}.{}.sig", b64(&serde_json::to_value(&h).expect("header")), b64(&claims(json!({}))));
    let mut cfg = config(&srv);
    cfg.algorithms = vec![crate::config::mcp_auth::JwtAlgorithm::ES256];
    let es_only = Authenticator::new(&cfg, upstream()).expect("authenticator");
    assert_eq!(refused(&es_only, &rs).await.reason(), "algorithm");
    assert_eq!(srv.jwks_hits(), 0, "refused before any key fetch");
}

#[tokio::test]
async fn unknown_kid_refetches_once_per_interval() {
    let old = TestKey::new("old");
    let srv = Server::start(&[&old]).await;
    let mut cfg = config(&srv);
    cfg.jwks_min_refetch = Duration::from_millis(1000);
    let a = Authenticator::new(&cfg, upstream()).expect("authenticator");
    assert!(a.authenticate(&bearer(&old.sign(&claims(json!({}))))).await.is_ok());
    assert_eq!(srv.jwks_hits(), 1);

    // Rotation: the issuer publishes a new key; a token naming it triggers one refetch.
    let new = TestKey::new("new");
    srv.state.publish(&[&new]);
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert!(a.authenticate(&bearer(&new.sign(&claims(json!({}))))).await.is_ok(), "accepted after rotation");
    assert_eq!(srv.jwks_hits(), 2);
    // The old key is gone from the refreshed set.
    assert_eq!(refused(&a, &old.sign(&claims(json!({})))).await, AuthRefusal::UnknownKey);
    assert_eq!(srv.jwks_hits(), 2, "within min_refetch: no refetch");

    // After the interval: one refetch for a forged kid, none for the next one.
    tokio::time::sleep(Duration::from_millis(1050)).await;
    let forged = TestKey::new("forged-1");
    let r = refused(&a, &forged.sign(&claims(json!({})))).await;
    assert_eq!(r.reason(), "unknown_key");
    assert_eq!(srv.jwks_hits(), 3);
    let forged2 = TestKey::new("forged-2");
    assert_eq!(refused(&a, &forged2.sign(&claims(json!({})))).await, AuthRefusal::UnknownKey);
    assert_eq!(srv.jwks_hits(), 3, "second unknown kid within min_refetch does not refetch");
    assert_eq!(a.jwks_fetches(), 3);
}

#[tokio::test]
async fn jwks_down_fails_closed_with_503() {
    let key = TestKey::new("k1");
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
    let text = format!("issuer: https://as.example.com\njwks_url: http://{dead}/jwks.json\naudience: {AUD}\n");
    let cfg: McpAuthConfig = serde_yaml_ng::from_str(&text).expect("config");
    let a = Authenticator::new(&cfg, upstream()).expect("authenticator");
    let got = refused(&a, &key.sign(&claims(json!({})))).await;
    assert_eq!(got.reason(), "jwks_unavailable");
    assert!(got.to_string().contains(&dead.to_string()), "{got}");
    let r = got.response(MD_URL);
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.headers().get(http::header::WWW_AUTHENTICATE).is_none());
    let body: Value = serde_json::from_slice(r.body()).expect("json");
    assert_eq!(body["error"], "temporarily_unavailable");
    assert!(!body.to_string().contains("127.0.0.1"), "internal errors are not echoed: {body}");
    // A second request within min_refetch does not hammer the dead issuer.
    assert_eq!(refused(&a, &key.sign(&claims(json!({})))).await.reason(), "jwks_unavailable");
    assert_eq!(a.jwks_fetches(), 1);
}

#[tokio::test]
async fn tool_scopes_gate_tools() {
    let key = TestKey::new("k1");
    let srv = Server::start(&[&key]).await;
    let mut cfg = config(&srv);
    cfg.required_scopes = vec!["mcp".into()];
    cfg.tool_scopes = vec![
        ToolScope { scope: "weather.read".into(), tools: vec!["weather__get_*".into()] },
        ToolScope { scope: "weather.admin".into(), tools: vec!["weather__*".into()] },
    ];
    let a = Authenticator::new(&cfg, upstream()).expect("authenticator");
    let g = a.authenticate(&bearer(&key.sign(&claims(json!({}))))).await.expect("granted");
    assert!(g.allows_tool("weather__get_weather").is_ok());
    let miss = g.allows_tool("weather__set_alert").expect_err("needs admin");
    assert_eq!(miss.scopes, vec!["weather.admin".to_string()]);
    let r = miss.response(MD_URL);
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        challenge(&r),
        format!("Bearer error=\"insufficient_scope\", scope=\"mcp weather.admin\", resource_metadata=\"{MD_URL}\", error_description=\"the token lacks a scope that grants this tool\"")
    );
    let none = g.allows_tool("files__read").expect_err("no scope grants it");
    assert!(none.scopes.is_empty());
    assert!(challenge(&none.response(MD_URL)).contains("error_description=\"no scope grants this tool\""));
    // Without tool_scopes every tool is allowed.
    let open = Authenticator::new(&config(&srv), upstream()).expect("authenticator");
    let g = open.authenticate(&bearer(&key.sign(&claims(json!({"scope": ""}))))).await.expect("granted");
    assert!(g.allows_tool("anything").is_ok());
}

fn exchange_config(srv: &Server, var: &str) -> McpAuthConfig {
    let mut cfg = config(srv);
    cfg.token_exchange = Some(TokenExchangeConfig {
        endpoint: srv.url("/token"),
        client_id: "tollgate gw".into(),
        client_secret: CredentialSource { env: Some(var.into()), file: None },
        timeout: Duration::from_secs(2),
    });
    cfg
}

#[tokio::test]
async fn token_exchange_round_trip_cache_and_errors() {
    let key = TestKey::new("k1");
    let srv = Server::start(&[&key]).await;
    std::env::set_var("TG_MCP_AUTH_TEST_SECRET", "s3cr:et");
    let a = Authenticator::new(&exchange_config(&srv, "TG_MCP_AUTH_TEST_SECRET"), upstream()).expect("authenticator");
    *srv.state.token_reply.lock() = (
        200,
        json!({"access_token": "downstream-1", "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
               "token_type": "Bearer", "expires_in": 120}),
    );
    let subject = key.sign(&claims(json!({})));
    let g = a.authenticate(&bearer(&subject)).await.expect("granted");
    let aud = "https://weather.example.com/mcp";
    assert_eq!(a.exchange(&g, aud, Some("weather.read")).await.expect("exchange").as_deref(), Some("downstream-1"));
    {
        let seen = srv.state.token_requests.lock();
        assert_eq!(seen.len(), 1);
        let (auth, form) = &seen[0];
        let want = base64::engine::general_purpose::STANDARD.encode("tollgate+gw:s3cr%3Aet");
        assert_eq!(auth.as_deref(), Some(format!("Basic {want}").as_str()));
        let field = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(field("grant_type"), Some("urn:ietf:params:oauth:grant-type:token-exchange"));
        assert_eq!(field("subject_token"), Some(subject.as_str()));
        assert_eq!(field("subject_token_type"), Some("urn:ietf:params:oauth:token-type:access_token"));
        assert_eq!(field("audience"), Some(aud));
        assert_eq!(field("resource"), Some(aud));
        assert_eq!(field("scope"), Some("weather.read"));
    }
    // Cache hit: same token, audience and scope; a different scope is a new exchange.
    assert_eq!(a.exchange(&g, aud, Some("weather.read")).await.expect("cached").as_deref(), Some("downstream-1"));
    assert_eq!(srv.state.token_requests.lock().len(), 1);
    assert_eq!(a.exchange(&g, aud, None).await.expect("other scope").as_deref(), Some("downstream-1"));
    assert_eq!(srv.state.token_requests.lock().len(), 2);
    assert_eq!(a.exchange_requests(), 2);

    // OAuth error JSON names the endpoint and the code.
    *srv.state.token_reply.lock() = (400, json!({"error": "invalid_target", "error_description": "unknown audience"}));
    let e = a.exchange(&g, "urn:other", None).await.expect_err("refused");
    assert!(matches!(&e, AuthError::Exchange { error, .. } if error == "invalid_target"), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(&srv.url("/token").to_string()) && msg.contains("invalid_target (unknown audience)"), "{msg}");
    assert!(!msg.contains(&subject), "no token in errors");
    assert!(srv.state.token_requests.lock()[2].1.iter().all(|(k, _)| k != "resource"), "urn audience: no resource");
    *srv.state.token_reply.lock() = (502, json!("bad gateway"));
    let e = a.exchange(&g, "urn:third", None).await.expect_err("502");
    assert!(matches!(e, AuthError::Status { status: 502, .. }), "{e}");

    // Not configured: no exchange.
    let plain = Authenticator::new(&config(&srv), upstream()).expect("authenticator");
    assert_eq!(plain.exchange(&g, aud, None).await.expect("none"), None);
}

#[tokio::test]
async fn exchange_without_expiry_is_not_cached_and_missing_secret_fails_build() {
    let key = TestKey::new("k1");
    let srv = Server::start(&[&key]).await;
    assert!(matches!(
        Authenticator::new(&exchange_config(&srv, "TG_MCP_AUTH_TEST_UNSET"), upstream()),
        Err(AuthError::Credential(_))
    ));
    std::env::set_var("TG_MCP_AUTH_TEST_SECRET2", "x");
    let a = Authenticator::new(&exchange_config(&srv, "TG_MCP_AUTH_TEST_SECRET2"), upstream()).expect("authenticator");
    *srv.state.token_reply.lock() = (200, json!({"access_token": "t", "token_type": "Bearer"}));
    let g = a.authenticate(&bearer(&key.sign(&claims(json!({}))))).await.expect("granted");
    for _ in 0..2 {
        assert_eq!(a.exchange(&g, "urn:d", None).await.expect("ok").as_deref(), Some("t"));
    }
    assert_eq!(a.exchange_requests(), 2);
}

/// The listener shares one authenticator across connections and awaits it inside spawned
/// tasks: the type must be shareable and its futures `Send` (no lock held across an await).
#[allow(dead_code)]
fn authenticator_is_shareable_and_futures_are_send(a: &Authenticator, h: &HeaderMap, g: &Grant) {
    fn shared<T: Send + Sync>(_: &T) {}
    fn send<F: Send>(_: F) {}
    shared(a);
    shared(g);
    send(a.authenticate(h));
    send(a.exchange(g, "urn:x", None));
}
