//! Incremental Server-Sent Events parser over raw bytes.
//!
//! It never owns the stream: the caller forwards bytes as they arrive and feeds the same chunks
//! here to *observe* events. For each event the callback gets the event's end offset within the
//! current chunk (so a caller that must hold back or drop whole events knows where they end) and
//! the joined `data:` payload. Line splitting uses memchr; partial lines and the data of the
//! event in progress are kept in reused buffers, bounded by `max_event_bytes` (an oversized event
//! still ends correctly, it is just reported without data; an event is oversized when its data
//! is, whatever the chunking, and a long non-data line is skipped without touching it).
//!
//! Follows the WHATWG parsing rules: lines end in CRLF, LF or CR; a blank line ends an event;
//! `data` lines are joined with `\n`; one space after the colon is dropped; `:` lines are
//! comments.

use memchr::memchr2;

/// The longest a `data` line is beyond its value (`data: `).
const DATA_PREFIX: &[u8] = b"data: ";

/// What an event carried, as seen by the callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseEvent<'a> {
    /// The joined `data:` payload.
    Data(&'a [u8]),
    /// An event (or stray blank line) without data lines.
    NoData,
    /// The event exceeded the size bound; its data was not kept.
    Oversized,
}

/// Parser state carried between chunks.
#[derive(Debug)]
pub struct SseParser {
    max: usize,
    /// The current line when it spans chunks.
    line: Vec<u8>,
    /// The current line was too long and is being skipped.
    line_overflow: bool,
    /// `data` of the current event.
    data: Vec<u8>,
    has_data: bool,
    /// The current event exceeded `max`.
    overflow: bool,
    /// The last byte seen ended a line with CR: a following LF belongs to that line ending.
    last_cr: bool,
    /// A blank line ended with CR at a chunk end; dispatch waits to see if LF follows, so the
    /// event's end offset includes it.
    pending_dispatch: bool,
}

impl SseParser {
    /// A parser holding at most `max_event_bytes` of one event's data (and of one line, plus
    /// the `data: ` prefix).
    pub fn new(max_event_bytes: usize) -> Self {
        SseParser {
            max: max_event_bytes,
            line: Vec::new(),
            line_overflow: false,
            data: Vec::new(),
            has_data: false,
            overflow: false,
            last_cr: false,
            pending_dispatch: false,
        }
    }

    /// True when no event is in progress (nothing buffered, no partial line).
    pub fn is_idle(&self) -> bool {
        !self.has_data && !self.overflow && self.line.is_empty() && !self.line_overflow && !self.pending_dispatch
    }

    /// Feed the next chunk. `on_event(end, event)` runs for every event completed in it; `end`
    /// is the offset in `chunk` just past the event's terminating blank line (0 when the event
    /// ended exactly at the previous chunk's end).
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(usize, SseEvent<'_>)) {
        if chunk.is_empty() {
            return;
        }
        let mut i = 0;
        if self.pending_dispatch {
            self.pending_dispatch = false;
            self.last_cr = false;
            if chunk.first() == Some(&b'\n') {
                i = 1;
            }
            self.dispatch(i, &mut on_event);
        }
        while i < chunk.len() {
            let Some(off) = memchr2(b'\r', b'\n', &chunk[i..]) else {
                self.push_partial(&chunk[i..]);
                self.last_cr = false;
                break;
            };
            let pos = i + off;
            let b = chunk[pos];
            if off == 0 && b == b'\n' && self.last_cr {
                // Second half of a CRLF whose CR ended the previous line.
                self.last_cr = false;
                i = pos + 1;
                continue;
            }
            self.last_cr = b == b'\r';
            let blank = off == 0 && self.line.is_empty() && !self.line_overflow;
            if blank {
                if b == b'\r' {
                    match chunk.get(pos + 1) {
                        None => {
                            self.pending_dispatch = true;
                            return;
                        }
                        Some(b'\n') => {
                            self.last_cr = false;
                            i = pos + 2;
                        }
                        Some(_) => i = pos + 1,
                    }
                } else {
                    i = pos + 1;
                }
                self.dispatch(i, &mut on_event);
                continue;
            }
            if self.line.is_empty() && !self.line_overflow {
                self.process_line(&chunk[i..pos]);
            } else {
                self.push_partial(&chunk[i..pos]);
                if !self.line_overflow {
                    let line = std::mem::take(&mut self.line);
                    self.process_line(&line);
                    self.line = line;
                }
                self.line.clear();
                self.line_overflow = false;
            }
            i = pos + 1;
        }
    }

    /// End of stream: an event left without its blank line is still reported (with end 0), so
    /// a provider that omits the final terminator does not lose its usage.
    pub fn finish(&mut self, mut on_event: impl FnMut(usize, SseEvent<'_>)) {
        if !self.line.is_empty() && !self.line_overflow {
            let line = std::mem::take(&mut self.line);
            self.process_line(&line);
        }
        self.line.clear();
        self.line_overflow = false;
        if self.pending_dispatch || self.has_data || self.overflow {
            self.pending_dispatch = false;
            self.dispatch(0, &mut on_event);
        }
    }

    fn push_partial(&mut self, bytes: &[u8]) {
        if self.line_overflow || bytes.is_empty() {
            return;
        }
        if self.line.len() + bytes.len() > self.max + DATA_PREFIX.len() {
            // Too long to keep. Only a `data` line makes its event oversized (its value is then
            // longer than the bound, as `process_line` would find on the whole line); other
            // lines are skipped. So the verdict does not depend on where the chunks were cut.
            let starts = |p: &[u8]| {
                let n = self.line.len().min(p.len());
                self.line[..n] == p[..n] && bytes.starts_with(&p[n..])
            };
            if starts(b"data:") {
                self.overflow = true;
            }
            self.line.clear();
            self.line_overflow = true;
            return;
        }
        self.line.extend_from_slice(bytes);
    }

    fn process_line(&mut self, line: &[u8]) {
        if line.first() == Some(&b':') {
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(c) => {
                let v = &line[c + 1..];
                (&line[..c], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        if field != b"data" || self.overflow {
            return;
        }
        let extra = usize::from(self.has_data);
        if self.data.len() + extra + value.len() > self.max {
            self.overflow = true;
            self.data.clear();
            return;
        }
        if self.has_data {
            self.data.push(b'\n');
        }
        self.data.extend_from_slice(value);
        self.has_data = true;
    }

    fn dispatch(&mut self, end: usize, on_event: &mut impl FnMut(usize, SseEvent<'_>)) {
        let ev = if self.overflow {
            SseEvent::Oversized
        } else if self.has_data {
            SseEvent::Data(&self.data)
        } else {
            SseEvent::NoData
        };
        on_event(end, ev);
        self.data.clear();
        self.has_data = false;
        self.overflow = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    enum Ev {
        Data(String),
        NoData,
        Oversized,
    }

    /// Events and their absolute end offsets when `input` is fed in the given pieces.
    fn run(input: &[u8], cuts: &[usize], max: usize) -> Vec<(usize, Ev)> {
        let mut p = SseParser::new(max);
        let mut out = Vec::new();
        let mut start = 0;
        let mut bounds: Vec<usize> = cuts.to_vec();
        bounds.push(input.len());
        for end in bounds {
            let base = start;
            p.feed(&input[start..end], |off, e| out.push((base + off, conv(e))));
            start = end;
        }
        p.finish(|_, e| out.push((usize::MAX, conv(e))));
        out
    }

    fn conv(e: SseEvent<'_>) -> Ev {
        match e {
            SseEvent::Data(d) => Ev::Data(String::from_utf8(d.to_vec()).unwrap()),
            SseEvent::NoData => Ev::NoData,
            SseEvent::Oversized => Ev::Oversized,
        }
    }

    fn every_split(input: &[u8], max: usize) {
        let whole = run(input, &[], max);
        let bytewise: Vec<usize> = (1..input.len()).collect();
        assert_eq!(run(input, &bytewise, max), whole, "byte by byte");
        for cut in 1..input.len() {
            assert_eq!(run(input, &[cut], max), whole, "split at {cut}");
        }
    }

    #[test]
    fn openai_stream_any_chunking() {
        let s = b"data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\
                  data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":3}}\n\n\
                  data: [DONE]\n\n";
        let whole = run(s, &[], 1 << 20);
        assert_eq!(whole.len(), 3);
        assert_eq!(whole[2], (s.len(), Ev::Data("[DONE]".into())));
        assert!(matches!(&whole[1].1, Ev::Data(d) if d.contains("usage")));
        every_split(s, 1 << 20);
    }

    #[test]
    fn line_endings_comments_and_multiline_data() {
        let s = b": keepalive\r\n\r\nevent: x\r\ndata:a\r\ndata: b\r\n\r\ndata: c\r\rdata: d\n\ndata: e\r\n\r\n";
        let got = run(s, &[], 1 << 20);
        let offs = [15usize, 44, 53, 62, s.len()];
        let want = vec![
            (offs[0], Ev::NoData),
            (offs[1], Ev::Data("a\nb".into())),
            (offs[2], Ev::Data("c".into())),
            (offs[3], Ev::Data("d".into())),
            (offs[4], Ev::Data("e".into())),
        ];
        assert_eq!(got, want);
        every_split(s, 1 << 20);
    }

    #[test]
    fn oversized_event_is_bounded_but_framed() {
        let s = b"data: 0123456789abcdef\n\ndata: ok\n\n";
        let got = run(s, &[], 8);
        assert_eq!(got, vec![(24, Ev::Oversized), (s.len(), Ev::Data("ok".into()))]);
        every_split(s, 8);
    }

    /// Found by the `sse_split` fuzz target: a line longer than the bound that spans chunks made
    /// the event oversized even when its data fit (or when it was not a data line at all), while
    /// the same line inside one chunk did not, so the events depended on how the bytes arrived.
    #[test]
    fn long_line_across_chunks_is_judged_like_a_whole_one() {
        // Data of 7 bytes fits a bound of 8; the line (with `data: `) does not.
        let s = b"data: 0123456\n\n";
        assert_eq!(run(s, &[], 8), vec![(s.len(), Ev::Data("0123456".into()))]);
        every_split(s, 8);
        // A comment or another field longer than the bound does not touch the event's data.
        let s = b": a comment longer than the bound\nevent: a-long-event-name\ndata: ok\n\n";
        assert_eq!(run(s, &[], 8), vec![(s.len(), Ev::Data("ok".into()))]);
        every_split(s, 8);
        // A data line longer than the bound still makes its event oversized, however it is cut.
        let s = b"data: 0123456789\n\ndata: ok\n\n";
        assert_eq!(run(s, &[], 8), vec![(18, Ev::Oversized), (s.len(), Ev::Data("ok".into()))]);
        every_split(s, 8);
    }

    #[test]
    fn unterminated_final_event_reported_at_finish() {
        let got = run(b"data: {\"usage\":1}\n", &[], 64);
        assert_eq!(got, vec![(usize::MAX, Ev::Data("{\"usage\":1}".into()))]);
        let got = run(b"data: x", &[3], 64);
        assert_eq!(got, vec![(usize::MAX, Ev::Data("x".into()))]);
    }
}
