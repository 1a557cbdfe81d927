//! A guardrail webhook for the scenarios: an HTTP/1.1 server on a loopback port that records
//! every JSON body POSTed to it and answers with what the test's `decide` function returns
//! (status, JSON, delay), the way NeMo Guardrails or a moderation service would. One thread per
//! connection and `Connection: close`, so a slow answer never holds up another check. Stops
//! when dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::{Context, Result};

/// What the webhook answers to one request.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: Value,
    /// Wait this long before answering (a slow or hung checker).
    pub delay: Duration,
}

impl Answer {
    /// 200 with `body`, at once.
    pub fn ok(body: Value) -> Self {
        Answer { status: 200, body, delay: Duration::ZERO }
    }
}

type Decide = dyn Fn(&Value) -> Answer + Send + Sync;

/// RAII guard of the webhook server.
pub struct Webhook {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
}

impl Webhook {
    /// Listen on `127.0.0.1:0` and answer each POST with `decide(body)`.
    pub fn start(decide: impl Fn(&Value) -> Answer + Send + Sync + 'static) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind webhook")?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let decide: Arc<Decide> = Arc::new(decide);
        let (s, st) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (s, d) = (s.clone(), decide.clone());
                        std::thread::spawn(move || {
                            let _ = serve(conn, &s, &*d);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Webhook { addr, seen, stop })
    }

    /// `http://127.0.0.1:PORT/check`.
    pub fn url(&self) -> String {
        format!("http://{}/check", self.addr)
    }

    /// Every body received so far, in order.
    pub fn seen(&self) -> Vec<Value> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(conn: TcpStream, seen: &Mutex<Vec<Value>>, decide: &Decide) -> Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Ok(mut s) = seen.lock() {
        s.push(v.clone());
    }
    let answer = decide(&v);
    std::thread::sleep(answer.delay);
    let out = answer.body.to_string();
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 {} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{out}",
        answer.status,
        out.len()
    )?;
    conn.flush()?;
    Ok(())
}
