//! `Content-Encoding` of observed bodies, decoded as the bytes arrive: agents negotiate
//! compression themselves (httpx asks for gzip and deflate, undici for br too) and tollgate,
//! outside the TLS path, cannot ask for identity as the proxy does. The decoder sits between
//! the de-chunking and the readers: each piece of compressed bytes yields the plaintext it
//! completes, so SSE events are still read as they arrive and no stream is held whole.
//!
//! Memory is bounded: compressed input is fed in small slices and the plaintext one slice
//! yields must fit `at_once` bytes (a decompression bomb gives up the body, it does not
//! allocate); a body read whole (JSON) must also fit `at_once` in all. The zstd window is
//! capped at 8 MiB, what HTTP's zstd coding allows (RFC 9659).

use std::io::{self, Write};

use bytes::Bytes;
use flate2::write::{DeflateDecoder, MultiGzDecoder, ZlibDecoder};
use zstd::stream::raw::{DParameter, Decoder as ZstdDecoder, InBuffer, Operation, OutBuffer};

/// Compressed bytes fed to a stage at once: with deflate's ~1000:1 ceiling, a slice yields
/// at most about 1 MiB, so a legitimate body stays far under the bound.
const SLICE: usize = 1024;

/// Codings stacked in one header at most (`gzip, br`): more is no real agent's.
const MAX_STAGES: usize = 3;

/// zstd window, as a power of two: 8 MiB, the most RFC 9659 lets a sender require.
const ZSTD_WINDOW_LOG: u32 = 23;

/// Brotli's internal buffer (its own default size).
const BROTLI_BUFFER: usize = 4096;

/// Why a body could not be decoded; the body is then not read, its usage estimated, flagged.
#[derive(Debug, thiserror::Error)]
pub(super) enum DecodeError {
    /// A coding tollgate does not decode (compress, or too many stacked).
    #[error("content-encoding {0:?} is not decoded")]
    Unsupported(String),
    /// The bytes are not what the coding says.
    #[error("{coding} body does not decode: {source}")]
    Corrupt {
        /// The coding.
        coding: &'static str,
        /// What the decoder said.
        source: io::Error,
    },
    /// The body ended inside a compressed stream.
    #[error("{0} body ended before its compressed stream did")]
    Truncated(&'static str),
    /// Plaintext over the bound (a decompression bomb, or a body too large to read).
    #[error("decoded body over {0} bytes")]
    TooLarge(usize),
}

impl DecodeError {
    /// The reason counted in `tollgate_uprobe_l7_dropped_total`.
    pub(super) fn reason(&self) -> &'static str {
        match self {
            DecodeError::Unsupported(_) => "encoding",
            DecodeError::Corrupt { .. } | DecodeError::Truncated(_) => "decode_error",
            DecodeError::TooLarge(_) => "decoded_bytes",
        }
    }
}

/// Where a streaming decoder writes its plaintext: refuses to hold more than its bound.
struct Sink {
    buf: Vec<u8>,
    cap: usize,
    over: bool,
}

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.buf.len() + b.len() > self.cap {
            self.over = true;
            return Err(io::Error::other("decoded output over the bound"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One coding's decoder.
enum Stage {
    Gzip(Box<MultiGzDecoder<Sink>>),
    /// `deflate` before its first two bytes tell zlib from raw deflate.
    Sniff(Vec<u8>, usize),
    Zlib(Box<ZlibDecoder<Sink>>),
    Raw(Box<DeflateDecoder<Sink>>),
    Br(Box<brotli_decompressor::DecompressorWriter<Sink>>),
    /// The decoder and the last hint (0: at a frame's end).
    Zstd(Box<ZstdDecoder<'static>>, usize, usize),
}

fn sink(cap: usize) -> Sink {
    Sink { buf: Vec::new(), cap, over: false }
}

/// A zlib header (RFC 1950): method 8, window ≤ 32 KiB, check bits.
fn is_zlib(b0: u8, b1: u8) -> bool {
    b0 & 0x0f == 8 && b0 >> 4 <= 7 && (u16::from(b0) << 8 | u16::from(b1)) % 31 == 0
}

impl Stage {
    fn new(coding: &str, cap: usize) -> Result<Stage, DecodeError> {
        Ok(match coding.to_ascii_lowercase().as_str() {
            "gzip" | "x-gzip" => Stage::Gzip(Box::new(MultiGzDecoder::new(sink(cap)))),
            "deflate" => Stage::Sniff(Vec::new(), cap),
            "br" => Stage::Br(Box::new(brotli_decompressor::DecompressorWriter::new(sink(cap), BROTLI_BUFFER))),
            "zstd" => {
                let corrupt = |source| DecodeError::Corrupt { coding: "zstd", source };
                let mut d = ZstdDecoder::new().map_err(corrupt)?;
                d.set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG)).map_err(corrupt)?;
                Stage::Zstd(Box::new(d), 0, cap)
            }
            other => return Err(DecodeError::Unsupported(other.to_string())),
        })
    }

    fn coding(&self) -> &'static str {
        match self {
            Stage::Gzip(_) => "gzip",
            Stage::Sniff(..) | Stage::Zlib(_) | Stage::Raw(_) => "deflate",
            Stage::Br(_) => "br",
            Stage::Zstd(..) => "zstd",
        }
    }

    /// Feed compressed bytes; the plaintext they complete.
    fn write(&mut self, b: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let coding = self.coding();
        let r = match self {
            Stage::Sniff(held, cap) => {
                held.extend_from_slice(b);
                if held.len() < 2 {
                    return Ok(Vec::new());
                }
                let held = std::mem::take(held);
                *self = if is_zlib(held[0], held[1]) {
                    Stage::Zlib(Box::new(ZlibDecoder::new(sink(*cap))))
                } else {
                    Stage::Raw(Box::new(DeflateDecoder::new(sink(*cap))))
                };
                return self.write(&held);
            }
            Stage::Gzip(d) => d.write_all(b).and_then(|()| d.flush()),
            Stage::Zlib(d) => d.write_all(b).and_then(|()| d.flush()),
            Stage::Raw(d) => d.write_all(b).and_then(|()| d.flush()),
            Stage::Br(d) => d.write_all(b).and_then(|()| d.flush()),
            Stage::Zstd(d, hint, cap) => return zstd_run(d, hint, *cap, b),
        };
        self.take(r, coding)
    }

    /// The body ended: the stream must have too.
    fn finish(&mut self) -> Result<Vec<u8>, DecodeError> {
        let coding = self.coding();
        let r = match self {
            Stage::Sniff(held, _) if held.is_empty() => return Ok(Vec::new()),
            Stage::Sniff(..) => return Err(DecodeError::Truncated(coding)),
            Stage::Gzip(d) => d.try_finish(),
            Stage::Zlib(d) => d.try_finish(),
            Stage::Raw(d) => d.try_finish(),
            Stage::Br(d) => d.close(),
            Stage::Zstd(_, hint, _) if *hint != 0 => return Err(DecodeError::Truncated(coding)),
            Stage::Zstd(..) => return Ok(Vec::new()),
        };
        self.take(r, coding)
    }

    /// The sink's plaintext, or why there is none.
    fn take(&mut self, r: io::Result<()>, coding: &'static str) -> Result<Vec<u8>, DecodeError> {
        let s = match self {
            Stage::Gzip(d) => d.get_mut(),
            Stage::Zlib(d) => d.get_mut(),
            Stage::Raw(d) => d.get_mut(),
            Stage::Br(d) => d.get_mut(),
            Stage::Sniff(..) | Stage::Zstd(..) => {
                return r.map(|()| Vec::new()).map_err(|source| corrupt(coding, source))
            }
        };
        if s.over {
            return Err(DecodeError::TooLarge(s.cap));
        }
        match r {
            Ok(()) => Ok(std::mem::take(&mut s.buf)),
            Err(source) => Err(corrupt(coding, source)),
        }
    }
}

fn corrupt(coding: &'static str, source: io::Error) -> DecodeError {
    DecodeError::Corrupt { coding, source }
}

fn zstd_run(d: &mut ZstdDecoder<'static>, hint: &mut usize, cap: usize, b: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut input = InBuffer::around(b);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let mut o = OutBuffer::around(&mut buf[..]);
        *hint = d.run(&mut input, &mut o).map_err(|source| corrupt("zstd", source))?;
        let n = o.pos();
        if out.len() + n > cap {
            return Err(DecodeError::TooLarge(cap));
        }
        out.extend_from_slice(&buf[..n]);
        // Done when the input is used up and the output had room to spare (nothing pending).
        if input.pos() == b.len() && n < buf.len() {
            return Ok(out);
        }
    }
}

/// The decoder of one body: its codings, undone right to left.
pub(super) struct Decoder {
    /// Last applied first: the order bytes go through.
    stages: Vec<Stage>,
    at_once: usize,
    /// Plaintext still allowed in all (bodies read whole).
    left: Option<usize>,
    /// Bytes were fed: a body of none (`HEAD`, 204) is empty, not a truncated stream.
    fed: bool,
}

impl Decoder {
    /// The decoder a `Content-Encoding` value needs; `Ok(None)` for none or identity.
    /// `at_once` bounds the plaintext held at a time; `whole` also bounds the body's plaintext
    /// in all by it (a body read whole, not a stream).
    pub(super) fn new(header: &str, at_once: usize, whole: bool) -> Result<Option<Decoder>, DecodeError> {
        let codings: Vec<&str> =
            header.split(',').map(str::trim).filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity")).collect();
        if codings.is_empty() {
            return Ok(None);
        }
        if codings.len() > MAX_STAGES {
            return Err(DecodeError::Unsupported(header.trim().to_string()));
        }
        let stages = codings.iter().rev().map(|c| Stage::new(c, at_once)).collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Decoder { stages, at_once, left: whole.then_some(at_once), fed: false }))
    }

    /// Compressed bytes in; each piece of plaintext they complete goes to `out`.
    pub(super) fn feed(&mut self, b: &[u8], mut out: impl FnMut(&Bytes)) -> Result<(), DecodeError> {
        self.fed |= !b.is_empty();
        for slice in b.chunks(SLICE) {
            let plain = self.through(0, slice.to_vec(), false)?;
            self.emit(plain, &mut out)?;
        }
        Ok(())
    }

    /// The body ended: what the decoders still hold goes to `out`, and each stream must have
    /// ended too.
    pub(super) fn finish(&mut self, mut out: impl FnMut(&Bytes)) -> Result<(), DecodeError> {
        if !self.fed {
            return Ok(());
        }
        let plain = self.through(0, Vec::new(), true)?;
        self.emit(plain, &mut out)
    }

    /// `b` through stages `from..`; at the end, each stage is finished after its input.
    fn through(&mut self, from: usize, mut b: Vec<u8>, end: bool) -> Result<Vec<u8>, DecodeError> {
        for stage in &mut self.stages[from..] {
            let mut plain = if b.is_empty() { Vec::new() } else { stage.write(&b)? };
            if end {
                plain.extend(stage.finish()?);
            }
            // Each stage holds at most `at_once` (its sink, or `zstd_run`).
            b = plain;
        }
        Ok(b)
    }

    fn emit(&mut self, plain: Vec<u8>, out: &mut impl FnMut(&Bytes)) -> Result<(), DecodeError> {
        if let Some(left) = self.left.as_mut() {
            *left = left.checked_sub(plain.len()).ok_or(DecodeError::TooLarge(self.at_once))?;
        }
        if !plain.is_empty() {
            out(&Bytes::from(plain));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
    use flate2::Compression;

    fn gzip(b: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(b).expect("gzip");
        e.finish().expect("gzip")
    }

    fn decode(header: &str, b: &[u8], piece: usize) -> Result<Vec<u8>, DecodeError> {
        let mut d = Decoder::new(header, 1 << 20, false)?.expect("a decoder");
        let mut out = Vec::new();
        for p in b.chunks(piece) {
            d.feed(p, |b| out.extend_from_slice(b))?;
        }
        d.finish(|b| out.extend_from_slice(b))?;
        Ok(out)
    }

    const TEXT: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"hello\"}}]}\n\n";

    #[test]
    fn every_coding_round_trips_in_any_pieces() {
        let mut z = ZlibEncoder::new(Vec::new(), Compression::default());
        z.write_all(TEXT).expect("zlib");
        let mut r = DeflateEncoder::new(Vec::new(), Compression::default());
        r.write_all(TEXT).expect("deflate");
        let mut br = Vec::new();
        brotli::BrotliCompress(&mut &TEXT[..], &mut br, &Default::default()).expect("br");
        let zs = zstd::encode_all(TEXT, 3).expect("zstd");
        let stacked = gzip(&br);
        let cases = [
            ("gzip", gzip(TEXT)),
            ("X-Gzip", gzip(TEXT)),
            ("deflate", z.finish().expect("zlib")),
            ("deflate", r.finish().expect("deflate")),
            ("br", br),
            ("zstd", zs),
            ("br, gzip", stacked),
        ];
        for (header, body) in cases {
            for piece in [1, 2, 5, body.len()] {
                assert_eq!(decode(header, &body, piece).expect(header), TEXT, "{header} by {piece}");
            }
        }
    }

    #[test]
    fn truncated_corrupt_and_unknown_are_errors() {
        let gz = gzip(TEXT);
        assert!(matches!(
            decode("gzip", &gz[..gz.len() - 4], 3),
            Err(DecodeError::Truncated(_) | DecodeError::Corrupt { .. })
        ));
        assert!(matches!(decode("gzip", TEXT, 3), Err(DecodeError::Corrupt { .. })));
        let long = super::super::tests_wire::OPENAI_CHAT_RESP.as_bytes();
        let mut bad = gzip(long);
        let mid = bad.len() / 2;
        bad[mid] ^= 0x55;
        bad[mid + 1] ^= 0xaa;
        let r = decode("gzip", &bad, 7);
        assert!(r.is_err(), "{:?}", r.map(String::from_utf8));
        let zs = zstd::encode_all(TEXT, 3).expect("zstd");
        assert!(matches!(decode("zstd", &zs[..zs.len() - 3], 2), Err(DecodeError::Truncated(_))));
        assert!(matches!(Decoder::new("compress", 10, false), Err(DecodeError::Unsupported(_))));
        assert!(matches!(Decoder::new("identity", 10, false), Ok(None)));
    }

    #[test]
    fn a_bomb_is_refused_not_held() {
        let bomb = gzip(&vec![b' '; 8 << 20]);
        let mut d = Decoder::new("gzip", 64 * 1024, false).expect("gzip").expect("a decoder");
        let mut held = 0;
        let r = d.feed(&bomb, |b| held = held.max(b.len()));
        assert!(matches!(r, Err(DecodeError::TooLarge(_))), "{r:?}");
        assert!(held <= 64 * 1024);
    }
}
