//! Compressed bodies, as agents negotiate them (httpx: gzip, deflate, br, zstd; undici: gzip,
//! deflate, br) and providers send them (gzip JSON, gzip-flushed SSE): read exactly, in any
//! split of the byte stream, and given up (counted, usage estimated and flagged) when corrupt
//! or over the bound.

use std::io::Write;

use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
use flate2::Compression;

use super::tests::*;
use super::tests_wire::*;
use super::*;
use Direction::{Egress, Ingress};

/// Bytes in (`true`: the last), compressed bytes out so far.
type Encode = Box<dyn FnMut(&[u8], bool) -> Vec<u8>>;

/// A streaming encoder: each `flush` ends what was written so far (how servers send SSE).
fn encoder(coding: &str) -> Encode {
    fn run<W: Write + 'static>(w: W, take: fn(&mut W) -> Vec<u8>, end: fn(W) -> Vec<u8>) -> Encode {
        let mut w = Some(w);
        Box::new(move |b, last| {
            let Some(mut e) = w.take() else { return Vec::new() };
            e.write_all(b).expect("encode");
            e.flush().expect("flush");
            if last {
                return end(e);
            }
            let out = take(&mut e);
            w = Some(e);
            out
        })
    }
    let level = Compression::default();
    match coding {
        "gzip" => run(GzEncoder::new(Vec::new(), level), |e| std::mem::take(e.get_mut()), |e| e.finish().expect("gz")),
        "zlib" => {
            run(ZlibEncoder::new(Vec::new(), level), |e| std::mem::take(e.get_mut()), |e| e.finish().expect("zl"))
        }
        "raw" => {
            run(DeflateEncoder::new(Vec::new(), level), |e| std::mem::take(e.get_mut()), |e| e.finish().expect("df"))
        }
        "br" => run(
            brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22),
            |e| std::mem::take(e.get_mut()),
            |e| e.into_inner(),
        ),
        "zstd" => run(
            zstd::stream::write::Encoder::new(Vec::new(), 3).expect("zstd"),
            |e| std::mem::take(e.get_mut()),
            |e| e.finish().expect("zstd"),
        ),
        other => panic!("no encoder {other}"),
    }
}

/// `body` compressed whole.
fn compress(coding: &str, body: &[u8]) -> Vec<u8> {
    encoder(coding)(body, true)
}

/// The header value of a test coding.
fn header(coding: &str) -> &str {
    match coding {
        "zlib" | "raw" => "deflate",
        other => other,
    }
}

fn resp_len_enc(ctype: &str, coding: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Encoding: {}\r\nContent-Length: {}\r\n\
         Connection: keep-alive\r\n\r\n",
        header(coding),
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// A chunked SSE response, each event compressed and flushed as one chunk.
fn sse_enc(coding: &str, events: &[&str]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nContent-Encoding: {}\r\n\
         Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
        header(coding)
    )
    .into_bytes();
    let mut enc = encoder(coding);
    for (i, ev) in events.iter().enumerate() {
        let c = enc(ev.as_bytes(), i + 1 == events.len());
        if !c.is_empty() {
            r.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            r.extend_from_slice(&c);
            r.extend_from_slice(b"\r\n");
        }
    }
    r.extend_from_slice(b"0\r\n\r\n");
    r
}

const ACCEPT: &str = "Accept-Encoding: gzip, deflate, br, zstd\r\n";

/// A JSON call then a streamed one, both compressed with `coding`, on one connection.
async fn openai_compressed(coding: &str, split: Split) -> (String, Vec<LlmCall>) {
    let mut h = Harness::start(ObservedLimits::default());
    let c = TestConn::new(70, "billing-bot", [162, 159, 140, 245]);
    h.send(&c, Egress, &post("api.openai.com", "/v1/chat/completions", ACCEPT, OPENAI_CHAT_REQ), split).await;
    let json = compress(coding, OPENAI_CHAT_RESP.as_bytes());
    h.send_bytes(&c, Ingress, &resp_len_enc("application/json", coding, &json), split).await;
    h.send(&c, Egress, &post("api.openai.com", "/v1/chat/completions", ACCEPT, OPENAI_STREAM_REQ), split).await;
    h.send_bytes(&c, Ingress, &sse_enc(coding, &OPENAI_STREAM_EVENTS), split).await;
    let calls = h.llm_calls(2).await;
    h.event(c.close()).await;
    (h.finish().await, calls)
}

fn assert_exact(coding: &str, split: Split, text: &str, calls: &[LlmCall]) {
    assert_eq!(tokens(text, "billing", "input"), 19.0 + 13.0, "{coding} {split:?}\n{text}");
    assert_eq!(tokens(text, "billing", "output"), 10.0 + 7.0, "{coding} {split:?}");
    assert_eq!(value(text, "tollgate_llm_estimated_tokens_total", &[]), 0.0, "{coding} {split:?}");
    assert_eq!(value(text, "tollgate_uprobe_l7_dropped_total", &[]), 0.0, "{coding} {split:?}\n{text}");
    assert!(calls.iter().all(|c| c.usage.is_some_and(|u| !u.estimated) && c.error.is_none()), "{calls:?}");
    assert_eq!(calls[1].finish_reasons, vec!["stop"], "{coding} {split:?}");
}

/// What OpenAI sends an httpx agent: gzip JSON, gzip-flushed chunked SSE; exact in any split,
/// one byte at a time included.
#[tokio::test]
async fn gzip_json_and_stream_exact_in_any_split() {
    for split in SPLITS {
        let (text, calls) = openai_compressed("gzip", split).await;
        assert_exact("gzip", split, &text, &calls);
    }
}

/// Every other coding an agent may ask for, zlib and raw deflate both accepted as `deflate`.
#[tokio::test]
async fn brotli_zstd_and_deflate_exact() {
    for coding in ["br", "zstd", "zlib", "raw"] {
        for split in [Split::Whole, Split::Every(1), Split::Random(5)] {
            let (text, calls) = openai_compressed(coding, split).await;
            assert_exact(coding, split, &text, &calls);
        }
    }
}

/// SSE events come out as their compressed chunks arrive, not at the body's end: the
/// first-token time is taken before the stream ends.
#[tokio::test]
async fn stream_is_read_as_it_arrives() {
    let mut h = Harness::start(ObservedLimits::default());
    let c = TestConn::new(71, "billing-bot", [162, 159, 140, 245]);
    h.send(&c, Egress, &post("api.openai.com", "/v1/chat/completions", ACCEPT, OPENAI_STREAM_REQ), Split::Whole).await;
    let stream = sse_enc("gzip", &OPENAI_STREAM_EVENTS);
    // All but the last chunk's bytes: the usage event is already decoded and read.
    let cut = stream.len() - 20;
    h.send_bytes(&c, Ingress, &stream[..cut], Split::Every(3)).await;
    h.event(c.close()).await;
    let calls = h.llm_calls(1).await;
    h.finish().await;
    assert_eq!(calls[0].usage.map(|u| (u.input, u.output, u.estimated)), Some((13, 7, false)), "{calls:?}");
}

/// Stacked codings are undone right to left; a compressed request body is read too.
#[tokio::test]
async fn stacked_codings_and_compressed_request() {
    let mut h = Harness::start(ObservedLimits::default());
    let c = TestConn::new(72, "billing-bot", [162, 159, 140, 245]);
    let body = compress("gzip", OPENAI_CHAT_REQ.as_bytes());
    let mut req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Type: application/json\r\n\
         Content-Encoding: gzip\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    h.send_bytes(&c, Egress, &req, Split::Every(5)).await;
    let json = compress("br", &compress("gzip", OPENAI_CHAT_RESP.as_bytes()));
    let resp = resp_len_enc("application/json", "gzip, br", &json);
    h.send_bytes(&c, Ingress, &resp, Split::Every(5)).await;
    let calls = h.llm_calls(1).await;
    h.finish().await;
    assert_eq!(calls[0].usage.map(|u| (u.input, u.output, u.estimated)), Some((19, 10, false)), "{calls:?}");
    assert_eq!(calls[0].request_model.as_deref(), Some("gpt-4o-mini"));
}

/// A corrupt body is not read: usage estimated and flagged, counted; the next exchange on the
/// connection is exact again.
#[tokio::test]
async fn corrupt_gzip_is_estimated_and_counted() {
    let mut h = Harness::start(ObservedLimits::default());
    let c = TestConn::new(73, "billing-bot", [162, 159, 140, 245]);
    let req = post("api.openai.com", "/v1/chat/completions", ACCEPT, OPENAI_CHAT_REQ);
    let mut json = compress("gzip", OPENAI_CHAT_RESP.as_bytes());
    let mid = json.len() / 2;
    json[mid] ^= 0x55;
    json[mid + 1] ^= 0xaa;
    h.send(&c, Egress, &req, Split::Whole).await;
    h.send_bytes(&c, Ingress, &resp_len_enc("application/json", "gzip", &json), Split::Every(7)).await;
    // Truncated: the stream ends inside the compressed data.
    let whole = compress("gzip", OPENAI_CHAT_RESP.as_bytes());
    h.send(&c, Egress, &req, Split::Whole).await;
    h.send_bytes(&c, Ingress, &resp_len_enc("application/json", "gzip", &whole[..whole.len() - 6]), Split::Whole).await;
    h.send(&c, Egress, &req, Split::Whole).await;
    h.send_bytes(&c, Ingress, &resp_len_enc("application/json", "gzip", &whole), Split::Whole).await;
    let calls = h.llm_calls(3).await;
    let text = h.finish().await;
    // Estimates are reported after a tokenizer ran: they may come last.
    let (exact, estimated): (Vec<_>, Vec<_>) = calls.iter().partition(|c| c.usage.is_some_and(|u| !u.estimated));
    assert_eq!(exact.len(), 1, "{calls:?}");
    assert_eq!(exact[0].usage.map(|u| (u.input, u.output)), Some((19, 10)), "{calls:?}");
    for call in estimated {
        let u = call.usage.expect("estimated usage");
        assert!(u.input > 0 && u.input != 19, "{u:?}");
        assert_eq!(call.status, 200);
    }
    assert_eq!(value(&text, "tollgate_uprobe_l7_dropped_total", &[("reason", "decode_error")]), 2.0, "{text}");
}

/// A decompression bomb is given up, not held: a JSON body over the read bound in all, and a
/// stream whose one piece decodes to more than the bound at once. Both counted and estimated.
#[tokio::test]
async fn bomb_is_dropped_counted_and_estimated() {
    let mut h = Harness::start(ObservedLimits::default());
    let c = TestConn::new(74, "billing-bot", [162, 159, 140, 245]);
    h.send(&c, Egress, &post("api.openai.com", "/v1/chat/completions", ACCEPT, OPENAI_CHAT_REQ), Split::Whole).await;
    let mut json = OPENAI_CHAT_RESP.as_bytes().to_vec();
    json.splice(1..1, std::iter::repeat_n(b' ', 6 << 20));
    let bomb = compress("gzip", &json);
    assert!(bomb.len() < 64 * 1024);
    h.send_bytes(&c, Ingress, &resp_len_enc("application/json", "gzip", &bomb), Split::Every(16 * 1024)).await;
    h.send(&c, Egress, &post("api.openai.com", "/v1/chat/completions", ACCEPT, OPENAI_STREAM_REQ), Split::Whole).await;
    let mut events: Vec<String> = OPENAI_STREAM_EVENTS.iter().map(|e| e.to_string()).collect();
    events.insert(1, format!(": {}\n\n", " ".repeat(16 << 20)));
    let events: Vec<&str> = events.iter().map(String::as_str).collect();
    h.send_bytes(&c, Ingress, &sse_enc("br", &events), Split::Whole).await;
    let calls = h.llm_calls(2).await;
    let text = h.finish().await;
    for call in &calls {
        assert!(call.usage.is_some_and(|u| u.estimated), "{call:?}");
    }
    assert_eq!(value(&text, "tollgate_uprobe_l7_dropped_total", &[("reason", "decoded_bytes")]), 2.0, "{text}");
}

/// Bodies no reader needs are not decoded (a call on no route), nor counted when corrupt.
#[tokio::test]
async fn unrouted_bodies_are_not_decoded() {
    let h = Harness::start(ObservedLimits::default());
    let c = TestConn::new(75, "billing-bot", [10, 9, 9, 9]);
    h.send(&c, Egress, &post("files.internal", "/upload", ACCEPT, "{}"), Split::Whole).await;
    h.send_bytes(&c, Ingress, &resp_len_enc("application/json", "gzip", b"not gzip at all"), Split::Whole).await;
    h.event(c.close()).await;
    let text = h.finish().await;
    assert_eq!(value(&text, "tollgate_uprobe_l7_dropped_total", &[]), 0.0, "{text}");
}
