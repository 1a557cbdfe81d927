//! Test-only stand-in for an authorization server: ES256 keys that sign tokens, and an
//! in-process HTTP server on `127.0.0.1:0` serving `GET /jwks.json` (whatever keys the test
//! publishes) and `POST /token` (a canned token-exchange answer), counting and recording
//! every request so tests can assert how often the authenticator called out.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::Mutex;
use serde_json::{json, Value};

/// An ES256 signing key and its public JWK.
pub struct TestKey {
    pub kid: String,
    enc: EncodingKey,
    pub jwk: Value,
}

impl TestKey {
    /// A fresh P-256 key named `kid`.
    pub fn new(kid: &str) -> TestKey {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
        let enc = EncodingKey::from_ec_der(&kp.serialize_der());
        let point = kp.public_key_raw();
        assert_eq!(point.len(), 65, "uncompressed P-256 point");
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwk = json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": b64(&point[1..33]), "y": b64(&point[33..]),
        });
        TestKey { kid: kid.to_string(), enc, jwk }
    }

    /// `claims` signed with this key (header `alg: ES256`, `kid`).
    pub fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, claims, &self.enc).expect("sign")
    }
}

/// One `/token` request: its Authorization header and its form fields.
pub type TokenRequest = (Option<String>, Vec<(String, String)>);

/// What the fake server does and saw.
#[derive(Default)]
pub struct ServerState {
    /// JWKS served at `/jwks.json`.
    pub jwks: Mutex<Value>,
    /// `(status, body)` answered at `/token`.
    pub token_reply: Mutex<(u16, Value)>,
    /// `(Authorization header, form fields)` of every `/token` request.
    pub token_requests: Mutex<Vec<TokenRequest>>,
    pub jwks_hits: AtomicUsize,
}

/// The running fake server; aborted on drop.
pub struct Server {
    pub addr: SocketAddr,
    pub state: Arc<ServerState>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Bind `127.0.0.1:0` and serve `keys` as the JWKS.
    pub async fn start(keys: &[&TestKey]) -> Server {
        let state = Arc::new(ServerState::default());
        state.publish(keys);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
                });
            }
        });
        Server { addr, state, task }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> url::Url {
        url::Url::parse(&format!("http://{}{path}", self.addr)).expect("url")
    }

    /// JWKS requests served so far.
    pub fn jwks_hits(&self) -> usize {
        self.state.jwks_hits.load(Ordering::SeqCst)
    }
}

impl ServerState {
    /// Serve exactly `keys` from now on.
    pub fn publish(&self, keys: &[&TestKey]) {
        *self.jwks.lock() = json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() });
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(st: Arc<ServerState>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: u16, body: &Value| {
        let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        Ok(r)
    };
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/jwks.json") => {
            st.jwks_hits.fetch_add(1, Ordering::SeqCst);
            let body = st.jwks.lock().clone();
            reply(200, &body)
        }
        ("POST", "/token") => {
            let auth = req.headers().get(http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let form = url::form_urlencoded::parse(&body).into_owned().collect();
            st.token_requests.lock().push((auth, form));
            let (status, body) = st.token_reply.lock().clone();
            reply(status, &body)
        }
        _ => reply(404, &json!({"error": "not_found"})),
    }
}
