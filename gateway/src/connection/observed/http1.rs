//! Incremental HTTP/1.1 framing of one direction of an observed connection: message heads
//! (parsed by `httparse` once complete, bounded), then bodies by `Content-Length`, chunked
//! transfer coding or read-until-close, handed on as zero-copy slices of the captured chunks.
//!
//! The framer only knows message boundaries; which body a response has depends on its request
//! (`HEAD`, 1xx, 204, 304), so after each head the caller says how the body is framed
//! ([`Framer::set_body`]). After lost bytes ([`Framer::gap`]) it scans for the next plausible
//! message start (a request line, or a status line) and carries on from there.

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

/// Headers read per message; more is not HTTP an agent's SDK sends or gets.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 4096;
/// How a request line starts (methods agents' SDKs use, in origin form).
const REQUEST_STARTS: [&[u8]; 7] = [b"POST /", b"GET /", b"PUT /", b"DELETE /", b"PATCH /", b"HEAD /", b"OPTIONS "];
/// How a status line starts.
const RESPONSE_START: &[u8] = b"HTTP/1.";
/// The HTTP/2 connection preface a client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Which side of the exchange a framer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// What the agent wrote.
    Request,
    /// What the agent read.
    Response,
}

/// Why a direction cannot be framed any further.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// A head outgrew the per-direction bound.
    #[error("message head exceeds {0} bytes")]
    HeadTooLarge(usize),
    /// The connection speaks HTTP/2 (the client preface was seen).
    #[error("HTTP/2 connection preface")]
    Http2,
    /// The bytes are not an HTTP/1.x message head.
    #[error("not HTTP/1.x: {0}")]
    NotHttp(String),
    /// A chunked body is malformed.
    #[error("malformed chunked body")]
    BadChunk,
}

/// A parsed message head.
#[derive(Debug, Clone)]
pub struct Head {
    /// Request method (requests).
    pub method: String,
    /// Request target (requests).
    pub path: String,
    /// Status code (responses).
    pub status: u16,
    /// Header fields (invalid names or values are left out).
    pub headers: HeaderMap,
}

impl Head {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// How the body after this head is framed by its own headers (request bodies, and
    /// responses that may have one): chunked, by length, or (responses only) until close.
    pub fn body_kind(&self, role: Role) -> BodyKind {
        let chunked = self
            .headers
            .get_all(http::header::TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .last()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"));
        if chunked {
            return BodyKind::Chunked;
        }
        match self.header("content-length").and_then(|v| v.trim().parse::<u64>().ok()) {
            Some(n) => BodyKind::Length(n),
            None if role == Role::Response => BodyKind::UntilClose,
            None => BodyKind::None,
        }
    }
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Everything until the connection closes (responses without length).
    UntilClose,
}

/// What the framer found next.
#[derive(Debug)]
pub enum Piece {
    /// A message head; the caller must call [`Framer::set_body`] before feeding on.
    Head(Head),
    /// Body bytes (decoded from chunked coding).
    Body(Bytes),
    /// The message ended.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    /// A head was returned; waiting for [`Framer::set_body`].
    AwaitBody,
    Length(u64),
    ChunkSize,
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    Trailers,
    UntilClose,
    /// The message ends now (returned with the next call).
    EndPending,
    /// After a gap: looking for the next message start.
    Resync,
}

/// The framer of one direction.
#[derive(Debug)]
pub struct Framer {
    role: Role,
    state: State,
    /// A head (or line) in progress, or the bytes scanned while resynchronising.
    buf: BytesMut,
    /// Bytes to read again before new input (what followed a message start found by resync).
    replay: Bytes,
    max_head: usize,
    /// The head being read was found by resynchronising: if it does not parse, scan on.
    after_gap: bool,
}

impl Framer {
    /// A framer for `role`, holding at most `max_head` bytes of one head.
    pub fn new(role: Role, max_head: usize) -> Self {
        Framer {
            role,
            state: State::Head,
            buf: BytesMut::new(),
            replay: Bytes::new(),
            max_head: max_head.max(64),
            after_gap: false,
        }
    }

    /// The body after the head just returned is framed as `kind`.
    pub fn set_body(&mut self, kind: BodyKind) {
        self.state = match kind {
            BodyKind::None | BodyKind::Length(0) => State::EndPending,
            BodyKind::Length(n) => State::Length(n),
            BodyKind::Chunked => State::ChunkSize,
            BodyKind::UntilClose => State::UntilClose,
        };
    }

    /// Bytes were lost before the next input: drop what is held and look for the next message.
    pub fn gap(&mut self) {
        self.buf.clear();
        self.replay = Bytes::new();
        self.state = State::Resync;
    }

    /// The connection closed: true when this ends a read-until-close body (the message is
    /// complete), false when a message was cut or none was in progress.
    pub fn close(&mut self) -> bool {
        let ended = self.state == State::UntilClose;
        self.state = State::Head;
        self.buf.clear();
        self.replay = Bytes::new();
        ended
    }

    /// The next piece from what is held and `input` (consumed as read); `None` when more
    /// input is needed.
    pub fn next(&mut self, input: &mut Bytes) -> Result<Option<Piece>, FrameError> {
        loop {
            if self.state == State::EndPending {
                self.state = State::Head;
                return Ok(Some(Piece::End));
            }
            if self.state == State::AwaitBody {
                return Ok(None);
            }
            let from_replay = !self.replay.is_empty();
            let mut src = if from_replay { std::mem::take(&mut self.replay) } else { std::mem::take(input) };
            if src.is_empty() {
                return Ok(None);
            }
            let piece = self.step(&mut src);
            if !src.is_empty() {
                if from_replay {
                    self.replay = src;
                } else {
                    *input = src;
                }
            }
            match piece {
                Ok(Some(p)) => return Ok(Some(p)),
                Ok(None) => {}
                // A false start found after a gap (body text that looks like a message start).
                Err(FrameError::NotHttp(_)) if self.after_gap => {
                    if !input.is_empty() {
                        let mut rest = BytesMut::from(&self.replay[..]);
                        rest.extend_from_slice(input);
                        self.replay = rest.freeze();
                        *input = Bytes::new();
                    }
                    self.rescan();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One step on non-empty `src`: a piece, or progress (bytes consumed or state changed).
    fn step(&mut self, src: &mut Bytes) -> Result<Option<Piece>, FrameError> {
        match self.state {
            State::Head => self.head(src),
            State::Length(n) => {
                let k = n.min(src.len() as u64) as usize;
                let body = src.split_to(k);
                let left = n - k as u64;
                self.state = if left == 0 { State::EndPending } else { State::Length(left) };
                Ok(Some(Piece::Body(body)))
            }
            State::ChunkSize => {
                let Some(line) = self.line(src)? else { return Ok(None) };
                let digits = line.split(|b| *b == b';').next().unwrap_or_default().trim_ascii();
                let text = std::str::from_utf8(digits).map_err(|_| FrameError::BadChunk)?;
                let size = u64::from_str_radix(text, 16).map_err(|_| FrameError::BadChunk)?;
                self.state = if size == 0 { State::Trailers } else { State::ChunkData(size) };
                Ok(None)
            }
            State::ChunkData(n) => {
                let k = n.min(src.len() as u64) as usize;
                let body = src.split_to(k);
                let left = n - k as u64;
                self.state = if left == 0 { State::ChunkEnd } else { State::ChunkData(left) };
                Ok(Some(Piece::Body(body)))
            }
            State::ChunkEnd => {
                let Some(line) = self.line(src)? else { return Ok(None) };
                if !line.trim_ascii().is_empty() {
                    return Err(FrameError::BadChunk);
                }
                self.state = State::ChunkSize;
                Ok(None)
            }
            State::Trailers => {
                let Some(line) = self.line(src)? else { return Ok(None) };
                if line.trim_ascii().is_empty() {
                    self.state = State::EndPending;
                }
                Ok(None)
            }
            State::UntilClose => Ok(Some(Piece::Body(std::mem::take(src)))),
            State::Resync => {
                self.resync(src);
                Ok(None)
            }
            State::EndPending | State::AwaitBody => Ok(None),
        }
    }

    /// One CRLF- (or LF-) terminated line, once complete.
    fn line(&mut self, src: &mut Bytes) -> Result<Option<Bytes>, FrameError> {
        match memchr::memchr(b'\n', src) {
            Some(i) => {
                let part = src.split_to(i + 1);
                if self.buf.is_empty() {
                    return Ok(Some(part));
                }
                self.buf.extend_from_slice(&part);
                Ok(Some(self.buf.split().freeze()))
            }
            None => {
                if self.buf.len() + src.len() > MAX_LINE {
                    return Err(FrameError::BadChunk);
                }
                self.buf.extend_from_slice(&std::mem::take(src));
                Ok(None)
            }
        }
    }

    fn head(&mut self, src: &mut Bytes) -> Result<Option<Piece>, FrameError> {
        if self.buf.is_empty() {
            // Stray line ends between messages are allowed (RFC 9112 §2.2).
            let skip = src.iter().take_while(|b| **b == b'\r' || **b == b'\n').count();
            let _ = src.split_to(skip);
            if src.is_empty() {
                return Ok(None);
            }
        }
        let old = self.buf.len();
        let take = src.len().min(self.max_head + 1 - old.min(self.max_head));
        let new = src.split_to(take);
        self.buf.extend_from_slice(&new);
        if self.role == Role::Request {
            let n = self.buf.len().min(H2_PREFACE.len());
            if self.buf[..n] == H2_PREFACE[..n] && n == H2_PREFACE.len() {
                return Err(FrameError::Http2);
            }
        }
        if memchr::memchr(b'\n', &new).is_none() {
            return self.partial_head(src);
        }
        match parse_head(self.role, &self.buf)? {
            Some((n, head)) => {
                self.after_gap = false;
                // What followed the head in this input goes back to the source.
                let rest = self.buf.split_off(n).freeze();
                self.buf.clear();
                if !rest.is_empty() {
                    let mut joined = BytesMut::with_capacity(rest.len() + src.len());
                    joined.extend_from_slice(&rest);
                    joined.extend_from_slice(src);
                    *src = joined.freeze();
                }
                self.state = State::AwaitBody;
                Ok(Some(Piece::Head(head)))
            }
            None => self.partial_head(src),
        }
    }

    fn partial_head(&mut self, src: &mut Bytes) -> Result<Option<Piece>, FrameError> {
        if self.buf.len() > self.max_head {
            return Err(FrameError::HeadTooLarge(self.max_head));
        }
        // Only reached with all of `src` taken (a short take means the head is too large).
        debug_assert!(src.is_empty());
        Ok(None)
    }

    /// Scan for the next message start; from there, read as a head again.
    fn resync(&mut self, src: &mut Bytes) {
        self.buf.extend_from_slice(&std::mem::take(src));
        let at = match self.role {
            Role::Response => memchr::memmem::find(&self.buf, RESPONSE_START),
            Role::Request => REQUEST_STARTS.iter().filter_map(|p| memchr::memmem::find(&self.buf, p)).min(),
        };
        match at {
            Some(i) => {
                let _ = self.buf.split_to(i);
                self.replay = self.buf.split().freeze();
                self.state = State::Head;
                self.after_gap = true;
            }
            None => {
                // Keep what could be the beginning of a start split across chunks.
                let keep = 8.min(self.buf.len());
                let _ = self.buf.split_to(self.buf.len() - keep);
            }
        }
    }

    /// After a resynchronised head failed to parse: skip its first byte and scan on.
    pub fn rescan(&mut self) {
        let mut held = std::mem::take(&mut self.buf);
        held.extend_from_slice(&std::mem::take(&mut self.replay));
        if !held.is_empty() {
            let _ = held.split_to(1);
        }
        self.state = State::Resync;
        let mut src = held.freeze();
        self.resync(&mut src);
    }
}

/// `Some((head length, head))` once `buf` holds a whole head.
fn parse_head(role: Role, buf: &[u8]) -> Result<Option<(usize, Head)>, FrameError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let not_http = |e: httparse::Error| FrameError::NotHttp(e.to_string());
    let (n, method, path, status, fields) = match role {
        Role::Request => {
            let mut req = httparse::Request::new(&mut fields);
            match req.parse(buf).map_err(not_http)? {
                httparse::Status::Partial => return Ok(None),
                httparse::Status::Complete(n) => (
                    n,
                    req.method.unwrap_or_default().to_string(),
                    req.path.unwrap_or_default().to_string(),
                    0,
                    req.headers,
                ),
            }
        }
        Role::Response => {
            let mut resp = httparse::Response::new(&mut fields);
            match resp.parse(buf).map_err(not_http)? {
                httparse::Status::Partial => return Ok(None),
                httparse::Status::Complete(n) => {
                    (n, String::new(), String::new(), resp.code.unwrap_or(0), resp.headers)
                }
            }
        }
    };
    let mut headers = HeaderMap::with_capacity(fields.len());
    for f in fields.iter() {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(f.name.as_bytes()), HeaderValue::from_bytes(f.value)) {
            headers.append(k, v);
        }
    }
    Ok(Some((n, Head { method, path, status, headers })))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every piece of `input` fed in chunks of `size`, bodies framed by their own headers.
    fn frame(role: Role, input: &[u8], size: usize) -> Vec<String> {
        let mut f = Framer::new(role, 4096);
        let mut out = Vec::new();
        let mut body = Vec::new();
        for c in input.chunks(size) {
            let mut b = Bytes::copy_from_slice(c);
            while let Some(p) = f.next(&mut b).expect("frames") {
                match p {
                    Piece::Head(h) => {
                        out.push(format!("head {} {} {}", h.method, h.path, h.status));
                        f.set_body(h.body_kind(role));
                    }
                    Piece::Body(b) => body.extend_from_slice(&b),
                    Piece::End => out.push(format!("end {}", String::from_utf8_lossy(&std::mem::take(&mut body)))),
                }
            }
        }
        if f.close() {
            out.push(format!("closed {}", String::from_utf8_lossy(&body)));
        }
        out
    }

    #[test]
    fn length_chunked_and_until_close_in_any_chunking() {
        let wire = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello\
HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n2\r\nde\r\nC\r\n, hello you!\r\n0\r\nX-T: 1\r\n\r\n\
HTTP/1.1 200 OK\r\n\r\ntail bytes";
        let want =
            vec!["head   200", "end hello", "head   200", "end abcde, hello you!", "head   200", "closed tail bytes"];
        for size in [1, 2, 3, 7, 16, wire.len()] {
            assert_eq!(frame(Role::Response, wire, size), want, "chunks of {size}");
        }
    }

    #[test]
    fn h2_preface_and_garbage_are_errors() {
        let mut f = Framer::new(Role::Request, 4096);
        let mut b = Bytes::from_static(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert_eq!(f.next(&mut b).unwrap_err(), FrameError::Http2);
        let mut f = Framer::new(Role::Response, 4096);
        let mut b = Bytes::from_static(b"\x00\x00\x12\x04\x00\x00\x00\x00\x00\n");
        assert!(matches!(f.next(&mut b), Err(FrameError::NotHttp(_))));
        let mut f = Framer::new(Role::Request, 64);
        let mut b = Bytes::from(format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(100)));
        assert_eq!(f.next(&mut b).unwrap_err(), FrameError::HeadTooLarge(64));
    }

    #[test]
    fn resync_finds_the_next_message() {
        let mut f = Framer::new(Role::Response, 4096);
        f.gap();
        let mut b = Bytes::from_static(b"t\":1}}\n\nHTTP/1.1 204 No Content\r\n\r\n");
        match f.next(&mut b).unwrap() {
            Some(Piece::Head(h)) => assert_eq!(h.status, 204),
            other => panic!("{other:?}"),
        }
    }
}
