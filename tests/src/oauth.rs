//! An OAuth authorization-server stand-in for the MCP OAuth scenarios: it signs access tokens
//! with an ES256 (P-256) key, publishes its keys as a JWKS, answers RFC 8414 metadata, and
//! implements RFC 8693 token exchange at `/token`, so tollgate's resource-server checks and its
//! downstream exchanges meet a real issuer over HTTP.
//!
//! Endpoints on the address it was started on (issuer `http://ADDR`):
//! * `GET /jwks.json` — the published keys (counted: [`AuthServer::jwks_fetches`]).
//! * `GET /.well-known/oauth-authorization-server` — `issuer`, `token_endpoint`, `jwks_uri`.
//! * `POST /token` — token exchange: HTTP Basic client auth, a subject token this server
//!   signed and that has not expired, `audience` and/or `resource`; mints a token for that
//!   audience with the requested scopes (a subset of the subject's) and records the request
//!   ([`AuthServer::exchanges`]).
//!
//! The server runs its own runtime on its own thread, so sync scenarios and `#[tokio::test]`s
//! alike can use it; it stops when dropped.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{json, Value};

use crate::{anyhow, Context, Result};

/// RFC 8693 grant type.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693 access token type.
pub const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// Lifetime of tokens minted by `/token`.
const EXCHANGED_TTL_SECS: u64 = 300;

/// One `/token` request as received, whether it succeeded or not.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// Client id from the Basic header (`None`: missing or undecodable).
    pub client_id: Option<String>,
    /// Whether the client id and secret matched.
    pub client_authenticated: bool,
    /// Every form field, in order.
    pub form: Vec<(String, String)>,
    /// The minted token, when the exchange succeeded.
    pub issued: Option<String>,
    /// HTTP status answered.
    pub status: u16,
}

impl Exchange {
    /// The first value of form field `name`.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A P-256 signing key with its kid.
struct SigningKey {
    kid: String,
    enc: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    fn generate(kid: String) -> Result<SigningKey> {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generate P-256 key")?;
        let point = kp.public_key_raw();
        if point.len() != 65 || point[0] != 4 {
            return Err(anyhow!("unexpected P-256 public key encoding ({} bytes)", point.len()));
        }
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": b64(&point[1..33]), "y": b64(&point[33..]),
        });
        Ok(SigningKey { enc: EncodingKey::from_ec_der(&kp.serialize_der()), kid, jwk })
    }
}

struct Keys {
    /// Signs new tokens; always published.
    current: SigningKey,
    /// Older keys still published (rotation with overlap).
    previous: Vec<SigningKey>,
    generation: usize,
}

struct State {
    issuer: String,
    client_id: String,
    client_secret: String,
    keys: Mutex<Keys>,
    jwks_fetches: AtomicUsize,
    exchanges: Mutex<Vec<Exchange>>,
}

/// The running authorization server; stops on drop.
pub struct AuthServer {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl AuthServer {
    /// Listen on `addr` (port 0: any) with one current key; `/token` accepts only the client
    /// `client_id` / `client_secret` (HTTP Basic).
    pub fn start(addr: SocketAddr, client_id: &str, client_secret: &str) -> Result<AuthServer> {
        let listener = std::net::TcpListener::bind(addr).with_context(|| format!("bind auth server on {addr}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            issuer: format!("http://{addr}"),
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
            keys: Mutex::new(Keys {
                current: SigningKey::generate("key-1".into())?,
                previous: Vec::new(),
                generation: 1,
            }),
            jwks_fetches: AtomicUsize::new(0),
            exchanges: Mutex::new(Vec::new()),
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("auth server runtime")?;
        let st = state.clone();
        let thread = std::thread::Builder::new().name("auth-server".into()).spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
                let accept = async {
                    while let Ok((tcp, _)) = listener.accept().await {
                        let st = st.clone();
                        tokio::spawn(async move {
                            let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(tcp), svc)
                                .await;
                        });
                    }
                };
                tokio::select! {
                    _ = accept => {}
                    _ = stopped => {}
                }
            });
        })?;
        Ok(AuthServer { addr, state, stop: Some(stop), thread: Some(thread) })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`: the `iss` of every token and the RFC 8414 issuer.
    pub fn issuer(&self) -> String {
        self.state.issuer.clone()
    }

    /// `http://ADDR/jwks.json`.
    pub fn jwks_url(&self) -> String {
        format!("{}/jwks.json", self.state.issuer)
    }

    /// `http://ADDR/token`.
    pub fn token_url(&self) -> String {
        format!("{}/token", self.state.issuer)
    }

    /// Key id of the key that signs now.
    pub fn current_kid(&self) -> String {
        lock(&self.state.keys).current.kid.clone()
    }

    /// `claims` signed with the current key (header `kid` set). `iss` and `iat` are filled
    /// in unless given; the caller supplies `aud`, `exp`, `scope`, `sub`, `azp`, ...
    pub fn mint(&self, claims: Value) -> String {
        self.state.mint(claims)
    }

    /// A new current key. `keep_old`: the previous keys stay published (overlap, as issuers
    /// rotate); otherwise the JWKS serves only the new key from now on.
    pub fn rotate(&self, keep_old: bool) -> Result<()> {
        let mut k = lock(&self.state.keys);
        k.generation += 1;
        let new = SigningKey::generate(format!("key-{}", k.generation))?;
        let old = std::mem::replace(&mut k.current, new);
        if keep_old {
            k.previous.push(old);
        } else {
            k.previous.clear();
        }
        Ok(())
    }

    /// The JWKS as served now.
    pub fn jwks(&self) -> Value {
        self.state.jwks()
    }

    /// `GET /jwks.json` requests served so far.
    pub fn jwks_fetches(&self) -> usize {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Every `/token` request so far, oldest first.
    pub fn exchanges(&self) -> Vec<Exchange> {
        lock(&self.state.exchanges).clone()
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl State {
    fn mint(&self, mut claims: Value) -> String {
        if let Some(c) = claims.as_object_mut() {
            c.entry("iss").or_insert_with(|| json!(self.issuer));
            c.entry("iat").or_insert_with(|| json!(now()));
        }
        let k = lock(&self.keys);
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(k.current.kid.clone());
        h.typ = Some("at+jwt".into());
        // Signing a JSON object with a valid P-256 key does not fail; an empty token would
        // simply be refused by whoever checks it.
        jsonwebtoken::encode(&h, &claims, &k.current.enc).unwrap_or_default()
    }

    fn jwks(&self) -> Value {
        let k = lock(&self.keys);
        let keys: Vec<Value> = std::iter::once(&k.current).chain(&k.previous).map(|s| s.jwk.clone()).collect();
        json!({ "keys": keys })
    }

    /// Claims of a token this server signed with a published key, not expired.
    fn verify(&self, token: &str) -> Option<serde_json::Map<String, Value>> {
        let kid = jsonwebtoken::decode_header(token).ok()?.kid?;
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(self.jwks()).ok()?;
        let key = DecodingKey::from_jwk(jwks.find(&kid)?).ok()?;
        let mut v = Validation::new(Algorithm::ES256);
        v.set_issuer(&[&self.issuer]);
        v.validate_aud = false;
        jsonwebtoken::decode(token, &key, &v).ok().map(|d| d.claims)
    }

    /// Client id of the Basic header and whether it and the secret match (RFC 6749 §2.3.1:
    /// both form-encoded before base64).
    fn client(&self, auth: Option<&str>) -> (Option<String>, bool) {
        let decoded = auth
            .and_then(|a| a.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok())
            .and_then(|b| String::from_utf8(b).ok());
        let Some((id, secret)) = decoded.as_deref().and_then(|d| d.split_once(':')) else { return (None, false) };
        let dec =
            |s: &str| url::form_urlencoded::parse(format!("x={s}").as_bytes()).next().map(|(_, v)| v.into_owned());
        let (id, secret) = (dec(id).unwrap_or_default(), dec(secret).unwrap_or_default());
        let ok = id == self.client_id && secret == self.client_secret;
        (Some(id), ok)
    }

    /// RFC 8693 token exchange: `(status, JSON body, minted token)`.
    fn exchange(&self, form: &HashMap<String, String>) -> (u16, Value, Option<String>) {
        let err = |code: &str, desc: &str| (400, json!({"error": code, "error_description": desc}), None);
        if form.get("grant_type").map(String::as_str) != Some(TOKEN_EXCHANGE_GRANT) {
            return err("unsupported_grant_type", "only token exchange is supported");
        }
        if form.get("subject_token_type").map(String::as_str) != Some(ACCESS_TOKEN_TYPE) {
            return err("invalid_request", "subject_token_type must be an access token");
        }
        let Some(subject) = form.get("subject_token").and_then(|t| self.verify(t)) else {
            return err("invalid_grant", "subject token is invalid or expired");
        };
        let Some(audience) = form.get("audience").or_else(|| form.get("resource")) else {
            return err("invalid_target", "audience or resource is required");
        };
        let held: Vec<&str> = subject.get("scope").and_then(Value::as_str).unwrap_or("").split_whitespace().collect();
        let scope = match form.get("scope") {
            Some(req) => {
                let granted: Vec<&str> = req.split_whitespace().filter(|s| held.contains(s)).collect();
                if granted.is_empty() && !req.trim().is_empty() {
                    return err("invalid_scope", "none of the requested scopes is held by the subject");
                }
                granted.join(" ")
            }
            None => held.join(" "),
        };
        let exp = now() + EXCHANGED_TTL_SECS;
        let token = self.mint(json!({
            "sub": subject.get("sub").cloned().unwrap_or(Value::Null),
            "aud": audience,
            "scope": scope,
            "exp": exp,
            "client_id": self.client_id,
            "act": { "sub": self.client_id },
        }));
        let body = json!({
            "access_token": token,
            "issued_token_type": ACCESS_TOKEN_TYPE,
            "token_type": "Bearer",
            "expires_in": EXCHANGED_TTL_SECS,
            "scope": scope,
        });
        (200, body, Some(token))
    }
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> std::result::Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: u16, body: &Value| {
        let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        r.headers_mut().insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
        Ok(r)
    };
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/jwks.json") => {
            st.jwks_fetches.fetch_add(1, Ordering::SeqCst);
            reply(200, &st.jwks())
        }
        ("GET", "/.well-known/oauth-authorization-server") => reply(
            200,
            &json!({
                "issuer": st.issuer,
                "token_endpoint": format!("{}/token", st.issuer),
                "jwks_uri": format!("{}/jwks.json", st.issuer),
                "grant_types_supported": [TOKEN_EXCHANGE_GRANT],
                "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            }),
        ),
        ("POST", "/token") => {
            let auth = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let form: Vec<(String, String)> = url::form_urlencoded::parse(&body).into_owned().collect();
            let (client_id, client_authenticated) = st.client(auth.as_deref());
            let (status, answer, issued) = if client_authenticated {
                st.exchange(&form.iter().cloned().collect())
            } else {
                (401, json!({"error": "invalid_client", "error_description": "client authentication failed"}), None)
            };
            lock(&st.exchanges).push(Exchange { client_id, client_authenticated, form, issued, status });
            let mut r = reply(status, &answer);
            if status == 401 {
                if let Ok(r) = r.as_mut() {
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Basic"));
                }
            }
            r
        }
        _ => reply(404, &json!({"error": "not_found"})),
    }
}
