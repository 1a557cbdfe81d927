//! The OAuth authorization-server stand-in on its own (no tollgate, no root): tokens it mints
//! verify against the JWKS it serves, rotation changes what is served, RFC 8414 metadata names
//! its endpoints, and `/token` performs RFC 8693 exchanges (client auth, downscoping, errors)
//! and records them.

use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};
use tollgate_e2e::oauth::{AuthServer, ACCESS_TOKEN_TYPE, TOKEN_EXCHANGE_GRANT};
use tollgate_e2e::{ensure, http_request, Context, Result};

const T: Duration = Duration::from_secs(5);

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn get_json(srv: &AuthServer, path: &str) -> Result<Value> {
    let (st, _, body) = http_request(srv.addr(), "GET", path, &[], None, T)?;
    ensure!(st == 200, "GET {path}: HTTP {st}: {body}");
    serde_json::from_str(&body).with_context(|| format!("GET {path}: {body}"))
}

/// Claims of `token` checked against the JWKS the server serves now, or why not.
fn verify(srv: &AuthServer, token: &str, aud: &str) -> Result<serde_json::Map<String, Value>> {
    let jwks: JwkSet = serde_json::from_value(get_json(srv, "/jwks.json")?)?;
    let kid = jsonwebtoken::decode_header(token)?.kid.context("no kid")?;
    let jwk = jwks.find(&kid).with_context(|| format!("kid {kid} not served"))?;
    let mut v = Validation::new(Algorithm::ES256);
    v.set_issuer(&[srv.issuer()]);
    v.set_audience(&[aud]);
    Ok(jsonwebtoken::decode(token, &DecodingKey::from_jwk(jwk)?, &v)?.claims)
}

fn basic(id: &str, secret: &str) -> String {
    use base64::Engine as _;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}")))
}

fn token_request(srv: &AuthServer, auth: &str, form: &[(&str, &str)]) -> Result<(u16, Value)> {
    let body = url::form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish();
    let (st, _, text) =
        http_request(srv.addr(), "POST", "/token", &[("Authorization", auth)], Some(body.as_bytes()), T)?;
    Ok((st, serde_json::from_str(&text).with_context(|| format!("/token: {text}"))?))
}

#[test]
fn minted_tokens_verify_against_served_jwks_and_rotation_changes_it() -> Result<()> {
    let srv = AuthServer::start("127.0.0.1:0".parse()?, "tollgate", "s3cret")?;
    let md = get_json(&srv, "/.well-known/oauth-authorization-server")?;
    ensure!(md["issuer"] == srv.issuer() && md["token_endpoint"] == srv.token_url(), "{md}");
    ensure!(md["jwks_uri"] == srv.jwks_url(), "{md}");

    let t1 = srv.mint(json!({"aud": "https://mcp/mcp", "exp": now() + 60, "sub": "u1", "scope": "mcp"}));
    let c = verify(&srv, &t1, "https://mcp/mcp")?;
    ensure!(c["iss"] == srv.issuer() && c["sub"] == "u1" && c["iat"].is_u64(), "{c:?}");
    ensure!(verify(&srv, &t1, "https://other/mcp").is_err(), "wrong audience must not verify");
    let expired = srv.mint(json!({"aud": "a", "exp": now() - 600}));
    ensure!(verify(&srv, &expired, "a").is_err(), "expired token must not verify");
    ensure!(srv.jwks_fetches() == 3, "fetches: {}", srv.jwks_fetches());

    let k1 = srv.current_kid();
    srv.rotate(true)?;
    let k2 = srv.current_kid();
    ensure!(k1 != k2, "rotation keeps the kid");
    let t2 = srv.mint(json!({"aud": "a", "exp": now() + 60}));
    ensure!(jsonwebtoken::decode_header(&t2)?.kid.as_deref() == Some(k2.as_str()), "new tokens use the new key");
    ensure!(srv.jwks()["keys"].as_array().map(Vec::len) == Some(2), "overlap serves both keys");
    verify(&srv, &t1, "https://mcp/mcp").context("old token during overlap")?;
    srv.rotate(false)?;
    ensure!(srv.jwks()["keys"].as_array().map(Vec::len) == Some(1), "only the newest key");
    ensure!(verify(&srv, &t1, "https://mcp/mcp").is_err(), "the old key is no longer served");
    Ok(())
}

#[test]
fn token_endpoint_exchanges_downscopes_and_records() -> Result<()> {
    let srv = AuthServer::start("127.0.0.1:0".parse()?, "tollgate gw", "s3:cret")?;
    let subject =
        srv.mint(json!({"aud": "https://tg/mcp", "exp": now() + 60, "sub": "u1", "scope": "mcp weather.read"}));
    // RFC 6749 §2.3.1: id and secret form-encoded before base64.
    let auth = basic("tollgate+gw", "s3%3Acret");
    let form = [
        ("grant_type", TOKEN_EXCHANGE_GRANT),
        ("subject_token", subject.as_str()),
        ("subject_token_type", ACCESS_TOKEN_TYPE),
        ("audience", "https://weather/mcp"),
        ("scope", "weather.read admin"),
    ];
    let (st, body) = token_request(&srv, &auth, &form)?;
    ensure!(st == 200, "{st}: {body}");
    ensure!(body["issued_token_type"] == ACCESS_TOKEN_TYPE && body["expires_in"].as_u64() > Some(0), "{body}");
    ensure!(body["scope"] == "weather.read", "downscoped to what the subject holds: {body}");
    let issued = body["access_token"].as_str().context("access_token")?;
    let c = verify(&srv, issued, "https://weather/mcp")?;
    ensure!(c["sub"] == "u1" && c["scope"] == "weather.read" && c["act"]["sub"] == "tollgate gw", "{c:?}");

    let (st, body) = token_request(&srv, &basic("tollgate+gw", "wrong"), &form)?;
    ensure!(st == 401 && body["error"] == "invalid_client", "{st}: {body}");
    let mut bad_subject = form;
    bad_subject[1].1 = "not-a-token";
    let (st, body) = token_request(&srv, &auth, &bad_subject)?;
    ensure!(st == 400 && body["error"] == "invalid_grant", "{st}: {body}");
    let mut no_scope = form;
    no_scope[4].1 = "admin";
    let (st, body) = token_request(&srv, &auth, &no_scope)?;
    ensure!(st == 400 && body["error"] == "invalid_scope", "{st}: {body}");

    let seen = srv.exchanges();
    ensure!(seen.len() == 4, "{seen:?}");
    ensure!(seen[0].client_authenticated && seen[0].client_id.as_deref() == Some("tollgate gw"), "{:?}", seen[0]);
    ensure!(seen[0].field("audience") == Some("https://weather/mcp") && seen[0].issued.as_deref() == Some(issued));
    ensure!(!seen[1].client_authenticated && seen[1].status == 401, "{:?}", seen[1]);
    ensure!(seen[2].status == 400 && seen[3].issued.is_none(), "{seen:?}");
    Ok(())
}
