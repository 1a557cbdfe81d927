//! Open-loop HTTP load generator: sends POSTs at a fixed rate (not "as fast as responses come
//! back"), measures each latency from the request's *scheduled* send time (so a stall is charged
//! to every request it delayed: no coordinated omission), and prints one JSON line with
//! percentiles from an HDR histogram.
//!
//! With `--stream` the body is sent with `"stream": true` and the SSE response is read as it
//! arrives: besides the total time it records the time to first token (TTFT: until the first
//! `data:` event whose `choices[0].delta.content` is non-empty), also from the scheduled time. A
//! stream that ends without `data: [DONE]` or without any content counts as an error.
//!
//! Used by `cargo xtask bench` for p50/p99 and TTFT at a fixed rate, which wrk cannot do.
//!
//! `https://` URLs go through OpenSSL (the system's shared `libssl.so.3`, via the `openssl` and
//! `hyper-openssl` crates), not rustls: the `direct-tls` and `tollgate-observe` bench targets
//! measure what tollgate's TLS uprobes cost an agent, and those probe OpenSSL only, so a rustls
//! client would be neither observed nor representative of the agents they are for (CPython,
//! curl, Node.js). HTTP/1.1 only (no ALPN offered): the observation side does not parse HTTP/2.
//! Connections are kept alive and reused, as with plain HTTP.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Result};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::{Connect, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

#[derive(Parser, Debug)]
struct Args {
    /// Target URL: `http://`, or `https://` (OpenSSL, HTTP/1.1; see `--ca-file`).
    #[arg(long)]
    url: String,
    /// PEM file of the CA to trust for `https://` URLs (default: the system's trust store).
    #[arg(long)]
    ca_file: Option<std::path::PathBuf>,
    /// File holding the request body.
    #[arg(long)]
    body_file: std::path::PathBuf,
    /// Extra header `Name: value` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    /// Requests per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Measured seconds (after warm-up).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Unmeasured warm-up seconds at the same rate.
    #[arg(long, default_value_t = 1)]
    warmup: u64,
    /// Per-request timeout in milliseconds (counted as an error).
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Requests in flight beyond which new ones are dropped (and counted) instead of sent.
    #[arg(long, default_value_t = 2048)]
    max_inflight: u64,
    /// Streamed chat completions: set `"stream": true` in the (JSON) body and measure TTFT.
    #[arg(long)]
    stream: bool,
}

/// What one successful request measured, in microseconds from its scheduled send time.
struct Done {
    total_us: u64,
    ttft_us: Option<u64>,
    events: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // One thread: the generator must not compete with the system under test for both cores.
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(run(args))
}

async fn run(a: Args) -> Result<()> {
    let mut body = Bytes::from(std::fs::read(&a.body_file)?);
    if a.stream {
        let mut v: serde_json::Value = serde_json::from_slice(&body)?;
        v.as_object_mut()
            .ok_or_else(|| anyhow!("--stream needs a JSON object body"))?
            .insert("stream".into(), true.into());
        body = Bytes::from(serde_json::to_vec(&v)?);
    }
    let uri: http::Uri = a.url.parse()?;
    let mut headers = http::HeaderMap::new();
    headers.insert(http::header::CONTENT_TYPE, "application/json".parse()?);
    for h in &a.headers {
        let (k, v) = h.split_once(':').ok_or_else(|| anyhow!("bad header {h:?}"))?;
        headers.insert(http::HeaderName::from_bytes(k.trim().as_bytes())?, v.trim().parse()?);
    }
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    let builder = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(1024).clone();
    if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
        conn.enforce_http(false);
        let mut ssl = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client())?;
        if let Some(ca) = &a.ca_file {
            ssl.set_ca_file(ca)?;
        }
        let https = hyper_openssl::client::legacy::HttpsConnector::with_connector(conn, ssl)?;
        drive(a, uri, body, headers, builder.build(https)).await
    } else {
        drive(a, uri, body, headers, builder.build(conn)).await
    }
}

/// The open-loop run itself, the same for plain HTTP and OpenSSL connections.
async fn drive<C>(
    a: Args,
    uri: http::Uri,
    body: Bytes,
    headers: http::HeaderMap,
    client: Client<C, Full<Bytes>>,
) -> Result<()>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
    let ttft = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?));
    let events = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    // Successes including the warm-up's: what a proxy or observer in the path must have counted.
    let all_ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let inflight = Arc::new(AtomicU64::new(0));
    let mut dropped = 0u64;
    let mut sent = 0u64;
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();

    let interval = Duration::from_nanos(1_000_000_000 / a.rate.max(1));
    let start = std::time::Instant::now() + Duration::from_millis(50);
    let measure_from = start + Duration::from_secs(a.warmup);
    let end = measure_from + Duration::from_secs(a.duration);
    let timeout = Duration::from_millis(a.timeout_ms);
    // Pacing runs on its own OS thread with nanosleep precision (tokio's timer wheel has 1 ms
    // granularity, which would add up to a millisecond to every latency measured from the
    // scheduled time); the runtime only sends.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    std::thread::spawn(move || {
        for i in 0u32.. {
            let scheduled = start + interval * i;
            if scheduled >= end {
                break;
            }
            let now = std::time::Instant::now();
            if scheduled > now {
                std::thread::sleep(scheduled - now);
            }
            if tx.send(Instant::from_std(scheduled)).is_err() {
                break;
            }
        }
    });
    let measure_from = Instant::from_std(measure_from);
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(scheduled) = rx.recv().await {
        let measured = scheduled >= measure_from;
        if inflight.load(Ordering::Relaxed) >= a.max_inflight {
            if measured {
                dropped += 1;
            }
            continue;
        }
        if measured {
            sent += 1;
        }
        let mut req = http::Request::post(uri.clone()).body(Full::new(body.clone()))?;
        *req.headers_mut() = headers.clone();
        let (client, hist, ttft, events, ok, all_ok, errors, inflight, first_error) = (
            client.clone(),
            hist.clone(),
            ttft.clone(),
            events.clone(),
            ok.clone(),
            all_ok.clone(),
            errors.clone(),
            inflight.clone(),
            first_error.clone(),
        );
        let stream = a.stream;
        inflight.fetch_add(1, Ordering::Relaxed);
        tasks.spawn(async move {
            let res = tokio::time::timeout(timeout, async {
                let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
                let status = resp.status();
                if !status.is_success() {
                    let body = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                    let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                    return Err(format!("HTTP {status}: {text}"));
                }
                if stream {
                    read_stream(resp.into_body(), scheduled).await
                } else {
                    resp.into_body().collect().await.map_err(|e| e.to_string())?;
                    Ok(Done { total_us: us_since(scheduled), ttft_us: None, events: 0 })
                }
            })
            .await
            .unwrap_or_else(|_| Err("timeout".into()));
            inflight.fetch_sub(1, Ordering::Relaxed);
            if res.is_ok() {
                all_ok.fetch_add(1, Ordering::Relaxed);
            }
            if !measured {
                return;
            }
            match res {
                Ok(d) => {
                    hist.lock().expect("lock").saturating_record(d.total_us.max(1));
                    if let Some(t) = d.ttft_us {
                        ttft.lock().expect("lock").saturating_record(t.max(1));
                    }
                    events.fetch_add(d.events, Ordering::Relaxed);
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                    first_error.lock().expect("lock").get_or_insert(e);
                }
            }
        });
        // Reap finished tasks so the set stays small.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let h = hist.lock().expect("lock");
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let t = ttft.lock().expect("lock");
    let tms = |q: f64| t.value_at_quantile(q) as f64 / 1000.0;
    let n_ok = ok.load(Ordering::Relaxed);
    let mut out = serde_json::json!({
        "rate": a.rate,
        "duration_s": a.duration,
        "sent": sent,
        "ok": ok.load(Ordering::Relaxed),
        "ok_with_warmup": all_ok.load(Ordering::Relaxed),
        "errors": errors.load(Ordering::Relaxed),
        "dropped": dropped,
        "first_error": *first_error.lock().expect("lock"),
        "p50_ms": ms(0.50),
        "p90_ms": ms(0.90),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
        "max_ms": h.max() as f64 / 1000.0,
        "mean_ms": h.mean() / 1000.0,
    });
    if a.stream {
        merge_into(
            &mut out,
            serde_json::json!({
                "stream": true,
                "ttft_p50_ms": tms(0.50),
                "ttft_p90_ms": tms(0.90),
                "ttft_p99_ms": tms(0.99),
                "ttft_max_ms": t.max() as f64 / 1000.0,
                "ttft_mean_ms": t.mean() / 1000.0,
                "events_per_stream": events.load(Ordering::Relaxed) as f64 / n_ok.max(1) as f64,
            }),
        );
    }
    println!("{out}");
    Ok(())
}

fn merge_into(out: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(o), serde_json::Value::Object(e)) = (out.as_object_mut(), extra) {
        o.extend(e);
    }
}

fn us_since(t: Instant) -> u64 {
    t.elapsed().as_micros() as u64
}

/// Read an SSE body as it arrives: TTFT at the first `data:` event with non-empty
/// `choices[0].delta.content`, total at the end of the body; `[DONE]` and content are required.
async fn read_stream(mut body: hyper::body::Incoming, scheduled: Instant) -> Result<Done, String> {
    let mut buf: Vec<u8> = Vec::new();
    let (mut ttft_us, mut events, mut done) = (None, 0u64, false);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        let Ok(data) = frame.into_data() else { continue };
        buf.extend_from_slice(&data);
        // Complete lines only; a partial line waits for the next frame.
        let Some(last_nl) = buf.iter().rposition(|&b| b == b'\n') else { continue };
        for line in buf[..last_nl].split(|&b| b == b'\n') {
            let Some(payload) = line.strip_prefix(b"data:") else { continue };
            let payload = payload.trim_ascii();
            events += 1;
            if payload == b"[DONE]" {
                done = true;
            } else if ttft_us.is_none() && has_content(payload) {
                ttft_us = Some(us_since(scheduled));
            }
        }
        buf.drain(..=last_nl);
    }
    let total_us = us_since(scheduled);
    match (done, ttft_us) {
        (true, Some(_)) => Ok(Done { total_us, ttft_us, events }),
        (false, _) => Err(format!("stream ended without [DONE] after {events} events")),
        (true, None) => Err(format!("stream of {events} events had no content")),
    }
}

fn has_content(payload: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| v["choices"][0]["delta"]["content"].as_str().map(|c| !c.is_empty()))
        .unwrap_or(false)
}
