//! Classify a captured connection from its first bytes without consuming them: the bytes stay
//! in the socket, so a spliced connection forwards them untouched and an intercepted one hands
//! them to the TLS acceptor / HTTP server as if nothing had looked.
//!
//! TLS ClientHellos are parsed by rustls itself (`Acceptor` fed a copy of the peeked bytes), not
//! by a hand-written parser; HTTP/1.x request heads by `httparse`.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// Most bytes peeked: one maximal TLS record (a ClientHello practically always fits) or an HTTP
/// request head. Larger heads are classified with what fits.
pub const SNIFF_MAX: usize = 16 * 1024 + 5;
/// Request headers parsed by httparse before falling back to a line scan for `Host`.
const MAX_HEADERS: usize = 64;
/// Upper bound of the wait between peeks while a client trickles its first bytes.
const MAX_BACKOFF: Duration = Duration::from_millis(25);

/// What the first bytes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// TLS; the ClientHello's server name when it had one (and parsed).
    Tls {
        /// SNI host name.
        sni: Option<String>,
    },
    /// HTTP/1.x request; the `Host` header without port, when present.
    Http {
        /// Host name (or address) from the `Host` header.
        host: Option<String>,
    },
    /// Anything else: spliced.
    Other,
}

/// Why sniffing gave up; the connection is closed (the agent retries on a fresh one).
#[derive(Debug, thiserror::Error)]
pub enum SniffError {
    /// Reading the socket failed.
    #[error("peek: {0}")]
    Io(#[from] io::Error),
    /// The client closed before sending anything.
    #[error("closed before sending data")]
    Closed,
    /// Not enough bytes to classify within `limits.sniff_timeout` (includes idle pre-connects).
    #[error("no classifiable data within {0:?}")]
    Timeout(Duration),
}

/// Result of looking at a prefix.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Classified.
    Done(Sniffed),
    /// Could be TLS or HTTP but the prefix is incomplete.
    NeedMore,
}

/// Peek at `stream` until [`classify`] decides or `timeout` passes.
pub async fn sniff(stream: &TcpStream, timeout: Duration) -> Result<Sniffed, SniffError> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; SNIFF_MAX];
    let mut last = 0usize;
    let mut backoff = Duration::from_millis(1);
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Err(_) => return Err(SniffError::Timeout(timeout)),
            Ok(r) => r?,
        };
        if n == 0 {
            return Err(SniffError::Closed);
        }
        if let Verdict::Done(s) = classify(&buf[..n], n == buf.len()) {
            return Ok(s);
        }
        // peek() returns at once while any data is queued, so wait before looking again.
        if n > last {
            backoff = Duration::from_millis(1);
        } else {
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        last = n;
        if Instant::now() + backoff >= deadline {
            return Err(SniffError::Timeout(timeout));
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Classify a prefix. `full` says no more bytes will be looked at (buffer exhausted), so an
/// incomplete but plausible prefix is classified with what is known.
pub fn classify(buf: &[u8], full: bool) -> Verdict {
    match buf.first() {
        None => Verdict::NeedMore,
        Some(0x16) => classify_tls(buf, full),
        Some(b) if b.is_ascii_uppercase() => classify_http(buf, full),
        Some(_) => Verdict::Done(Sniffed::Other),
    }
}

fn classify_tls(buf: &[u8], full: bool) -> Verdict {
    // Record header: type 0x16, legacy version 3.x, length.
    if buf.len() >= 2 && buf[1] != 3 {
        return Verdict::Done(Sniffed::Other);
    }
    if buf.len() < 5 {
        return if full { Verdict::Done(Sniffed::Tls { sni: None }) } else { Verdict::NeedMore };
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = buf;
    while !rd.is_empty() {
        match acceptor.read_tls(&mut rd) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            let sni = accepted.client_hello().server_name().map(str::to_owned);
            Verdict::Done(Sniffed::Tls { sni })
        }
        Ok(None) if !full => Verdict::NeedMore,
        Ok(None) | Err(_) => Verdict::Done(Sniffed::Tls { sni: None }),
    }
}

fn classify_http(buf: &[u8], full: bool) -> Verdict {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {
            if !matches!(req.version, Some(0 | 1)) {
                return Verdict::Done(Sniffed::Other);
            }
            let host = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .and_then(host_without_port);
            Verdict::Done(Sniffed::Http { host })
        }
        Ok(httparse::Status::Partial) if !full => Verdict::NeedMore,
        // More headers than httparse takes: the Host line may still be on its way, so wait for
        // the end of the head (or a full buffer) before scanning for it; deciding on a prefix
        // would let a client that trickles many headers before `Host` skip host routing.
        Err(httparse::Error::TooManyHeaders) if !full && !head_complete(buf) => Verdict::NeedMore,
        // A head larger than the buffer, or more headers than parsed: still HTTP.
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) if looks_like_request_line(buf) => {
            Verdict::Done(Sniffed::Http { host: scan_host(buf) })
        }
        _ => Verdict::Done(Sniffed::Other),
    }
}

/// The buffer holds the whole request head (its blank line).
fn head_complete(buf: &[u8]) -> bool {
    memchr::memmem::find(buf, b"\r\n\r\n").is_some() || memchr::memmem::find(buf, b"\n\n").is_some()
}

fn looks_like_request_line(buf: &[u8]) -> bool {
    let line_end = memchr::memchr(b'\n', buf).unwrap_or(buf.len());
    let line = &buf[..line_end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0")
}

/// `Host` by line scan, for heads httparse could not finish; only the head's lines (a body
/// that follows is not headers).
fn scan_host(buf: &[u8]) -> Option<String> {
    let head_end = [&b"\r\n\r\n"[..], &b"\n\n"[..]].iter().filter_map(|sep| memchr::memmem::find(buf, sep)).min();
    let head = &buf[..head_end.unwrap_or(buf.len())];
    head.split(|b| *b == b'\n').skip(1).find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = memchr::memchr(b':', line)?;
        if !line[..colon].eq_ignore_ascii_case(b"host") {
            return None;
        }
        std::str::from_utf8(&line[colon + 1..]).ok().and_then(host_without_port)
    })
}

/// `api.openai.com:443` → `api.openai.com`; `[::1]:80` → `::1`.
fn host_without_port(v: &str) -> Option<String> {
    let v = v.trim();
    if v.is_empty() {
        return None;
    }
    let host = if let Some(rest) = v.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        match v.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => v,
        }
    };
    Some(host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A real ClientHello, as a rustls client writes it.
    fn client_hello(sni: &str) -> Vec<u8> {
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    /// Found by the `sniff` fuzz target: a head with more headers than httparse takes was
    /// classified on its first bytes, before its `Host` line arrived.
    #[test]
    fn many_headers_wait_for_the_host_line() {
        let mut head = b"POST /v1/chat/completions HTTP/1.1\r\n".to_vec();
        for i in 0..70 {
            head.extend_from_slice(format!("x-junk-{i}: 1\r\n").as_bytes());
        }
        let before_host = head.len();
        head.extend_from_slice(b"Host: api.openai.com\r\n\r\n");
        assert_eq!(classify(&head[..before_host], false), Verdict::NeedMore);
        let want = Verdict::Done(Sniffed::Http { host: Some("api.openai.com".into()) });
        assert_eq!(classify(&head, false), want);
        // A full buffer still decides on what it holds.
        assert_eq!(classify(&head[..before_host], true), Verdict::Done(Sniffed::Http { host: None }));
        // A body after the head is not scanned for headers.
        let mut no_host = head[..before_host].to_vec();
        no_host.extend_from_slice(b"\r\nhost: body.example\r\n");
        assert_eq!(classify(&no_host, false), Verdict::Done(Sniffed::Http { host: None }));
    }

    #[test]
    fn sni_from_real_client_hello() {
        let hello = client_hello("api.openai.com");
        assert_eq!(classify(&hello, false), Verdict::Done(Sniffed::Tls { sni: Some("api.openai.com".into()) }));
        // Every strict prefix needs more bytes, and is "TLS without SNI" once the buffer is full.
        for cut in [1, 4, 5, 40, hello.len() - 1] {
            assert_eq!(classify(&hello[..cut], false), Verdict::NeedMore, "cut {cut}");
        }
        assert_eq!(classify(&hello[..40], true), Verdict::Done(Sniffed::Tls { sni: None }));
    }

    #[test]
    fn http_host_sniffing() {
        let req =
            b"POST /v1/chat/completions HTTP/1.1\r\nContent-Type: application/json\r\nHOST: localhost:11434\r\n\r\n{}";
        assert_eq!(classify(req, false), Verdict::Done(Sniffed::Http { host: Some("localhost".into()) }));
        assert_eq!(classify(&req[..30], false), Verdict::NeedMore);
        let v6 = b"GET / HTTP/1.0\r\nHost: [::1]:8080\r\n\r\n";
        assert_eq!(classify(v6, false), Verdict::Done(Sniffed::Http { host: Some("::1".into()) }));
        let no_host = b"GET / HTTP/1.0\r\n\r\n";
        assert_eq!(classify(no_host, false), Verdict::Done(Sniffed::Http { host: None }));
        // A head that does not fit the buffer is still HTTP, Host found by scanning.
        let big = b"GET / HTTP/1.1\r\nHost: example.com\r\nX-Big: aaaaaaaa";
        assert_eq!(classify(big, true), Verdict::Done(Sniffed::Http { host: Some("example.com".into()) }));
    }

    #[test]
    fn other_protocols_are_not_http() {
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.6\r\n", false), Verdict::Done(Sniffed::Other));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", false), Verdict::Done(Sniffed::Other));
        assert_eq!(classify(&[0x00, 0x01], false), Verdict::Done(Sniffed::Other));
        assert_eq!(classify(&[0x16, 0x01, 0x00], false), Verdict::Done(Sniffed::Other));
    }

    #[tokio::test]
    async fn sniff_peeks_without_consuming() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let hello = client_hello("api.openai.com");
        let h2 = hello.clone();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            // Trickle the hello in two writes.
            c.write_all(&h2[..10]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            c.write_all(&h2[10..]).await.unwrap();
            c
        });
        let (mut s, _) = l.accept().await.unwrap();
        let got = sniff(&s, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got, Sniffed::Tls { sni: Some("api.openai.com".into()) });
        let mut all = vec![0u8; hello.len()];
        s.read_exact(&mut all).await.unwrap();
        assert_eq!(all, hello);
        let _c = client.await.unwrap();
        // An idle client times out.
        let _idle = TcpStream::connect(addr).await.unwrap();
        let (s2, _) = l.accept().await.unwrap();
        assert!(matches!(sniff(&s2, Duration::from_millis(50)).await, Err(SniffError::Timeout(_))));
    }
}
