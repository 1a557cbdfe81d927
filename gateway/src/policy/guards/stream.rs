//! PII redaction of streamed text, safe across chunk boundaries.
//!
//! A value can arrive split over deltas (`"card 4111 1111"` + `" 1111 1111"`), so text cannot
//! be forwarded as it comes. The redactor holds back only what could still be part of a
//! match: the suffix starting at the earliest position from which the detectors' lazy DFA is
//! still alive at the end of the received text (a card number in progress, the word that may
//! become an email's local part). Everything before it is scanned with the same candidate
//! steps as a whole-text scan ([`PiiScanner::scan`]), so the concatenated output equals
//! [`PiiScanner::apply`] of the whole text, provided no value is longer than the holdback
//! bound.
//!
//! Contract for the caller (one redactor per response stream and text channel):
//! - Feed each text delta, in order, to [`StreamRedactor::push`]; put the returned text (which
//!   may be empty, shorter or longer than the delta) into the next outgoing event in place of
//!   the delta. The remainder comes out of later pushes or of [`StreamRedactor::finish`].
//! - At the end of the stream call `finish` and send what it returns (in the last text event,
//!   or an extra one) before the terminating event.
//! - After each call check [`StreamRedactor::blocked`]: once a `block` value was seen, the
//!   text before it has been returned, nothing after it ever is, and the caller should end the
//!   stream (e.g. with an error event).
//! - At most `max_holdback_bytes` bytes are held between calls. A value longer than that (a
//!   whole PEM key) is released unredacted when the bound forces it out;
//!   [`StreamRedactor::holdback_overflows`] counts those events.

use std::sync::Arc;

use regex_automata::hybrid::dfa::Cache as DfaCache;

use super::pii::{ceil_char, replace_into, Finding, PiiScanner};
use super::{tally, Verdict, VerdictKind};
use crate::config::guards::GuardAction;

/// Findings kept per stream for inspection; verdict counts go on past it.
const MAX_FINDINGS: usize = 256;

/// Redacts one stream of text deltas with one PII guard (see the module docs).
#[derive(Debug)]
pub struct StreamRedactor {
    scanner: Arc<PiiScanner>,
    cache: DfaCache,
    /// One char of already processed text (look-behind context), then unprocessed text.
    buf: String,
    /// First unprocessed byte of `buf`.
    pos: usize,
    /// Stream offset of `buf[0]`.
    base: usize,
    out: String,
    findings: Vec<Finding>,
    verdicts: Vec<Verdict>,
    blocked: Option<Finding>,
    overflows: u64,
}

impl StreamRedactor {
    /// A redactor for one stream.
    pub fn new(scanner: Arc<PiiScanner>) -> Self {
        let cache = scanner.dfa_cache();
        StreamRedactor {
            scanner,
            cache,
            buf: String::new(),
            pos: 0,
            base: 0,
            out: String::new(),
            findings: Vec::new(),
            verdicts: Vec::new(),
            blocked: None,
            overflows: 0,
        }
    }

    /// Take the next delta; returns the text that is now safe to forward.
    pub fn push(&mut self, delta: &str) -> &str {
        self.out.clear();
        if self.blocked.is_none() {
            self.buf.push_str(delta);
            self.advance(false);
        }
        &self.out
    }

    /// End of stream: returns everything still held, scanned and rewritten.
    pub fn finish(&mut self) -> &str {
        self.out.clear();
        if self.blocked.is_none() {
            self.advance(true);
        }
        &self.out
    }

    /// The `block` value that stopped the stream, if any.
    pub fn blocked(&self) -> Option<&Finding> {
        self.blocked.as_ref()
    }

    /// Values found so far (the first [`MAX_FINDINGS`]), spans in bytes of the input stream.
    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    /// One verdict per entity and action seen so far, with counts.
    pub fn verdicts(&self) -> &[Verdict] {
        &self.verdicts
    }

    /// Bytes received but not yet returned.
    pub fn held(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// How often the holdback bound forced out text that could still have become a match.
    pub fn holdback_overflows(&self) -> u64 {
        self.overflows
    }

    fn advance(&mut self, last: bool) {
        let len = self.buf.len();
        let force = match last {
            true => len,
            false => ceil_char(&self.buf, len.saturating_sub(self.scanner.max_holdback)),
        };
        let mut counted_overflow = false;
        loop {
            let step = self.scanner.step(&self.buf, self.pos);
            if !last {
                // Candidates (and live starts) up to here are final; the first live start
                // at or after `force` ends what can be released now.
                let upto = step.map_or(len, |s| s.cand_start + 1);
                if !counted_overflow && force > self.pos && self.earliest_live(self.pos, force.min(upto)).is_some() {
                    self.overflows += 1;
                    counted_overflow = true;
                }
                if let Some(l) = self.earliest_live(self.pos.max(force), upto) {
                    self.emit_raw(l);
                    break;
                }
            }
            let Some(step) = step else {
                self.emit_raw(len);
                break;
            };
            match step.finding {
                Some(f) => {
                    self.emit_raw(f.start);
                    self.record(f);
                    if f.action == GuardAction::Block {
                        self.buf.clear();
                        self.pos = 0;
                        return;
                    }
                    replace_into(&mut self.out, &f, &self.buf[f.start..f.end]);
                    self.pos = f.end;
                }
                None => self.emit_raw(step.next),
            }
            self.pos = self.pos.max(step.next);
        }
        // Keep one char before `pos` as look-behind context for the next search.
        let keep = self.buf[..self.pos].char_indices().next_back().map_or(self.pos, |(i, _)| i);
        self.buf.drain(..keep);
        self.base += keep;
        self.pos -= keep;
    }

    /// Copy `buf[pos..to]` unchanged to the output.
    fn emit_raw(&mut self, to: usize) {
        if to > self.pos {
            self.out.push_str(&self.buf[self.pos..to]);
            self.pos = to;
        }
    }

    /// First char boundary in `from..to` where a match could still start or grow.
    fn earliest_live(&mut self, from: usize, to: usize) -> Option<usize> {
        let to = to.min(self.buf.len());
        (from..to)
            .filter(|&s| self.buf.is_char_boundary(s))
            .find(|&s| self.scanner.live_at(&mut self.cache, &self.buf, s))
    }

    fn record(&mut self, f: Finding) {
        let f = Finding { start: f.start + self.base, end: f.end + self.base, ..f };
        if self.findings.len() < MAX_FINDINGS {
            self.findings.push(f);
        }
        tally(&mut self.verdicts, &self.scanner.name, VerdictKind::Pii(f.entity), f.action, None);
        if f.action == GuardAction::Block {
            self.blocked = Some(f);
        }
    }
}

/// Several PII guards over one stream, chained: each guard's output is the next one's input,
/// so each keeps its own holdback and the total held is at most the sum of their bounds.
#[derive(Debug)]
pub struct ResponseStream {
    stages: Vec<StreamRedactor>,
    a: String,
    b: String,
}

impl ResponseStream {
    /// A chain of redactors (in guard order).
    pub fn new(stages: Vec<StreamRedactor>) -> Self {
        ResponseStream { stages, a: String::new(), b: String::new() }
    }

    /// See [`StreamRedactor::push`].
    pub fn push(&mut self, delta: &str) -> &str {
        self.run(Some(delta))
    }

    /// See [`StreamRedactor::finish`].
    pub fn finish(&mut self) -> &str {
        self.run(None)
    }

    /// The verdict of the guard that blocked the stream, if one did.
    pub fn blocked(&self) -> Option<Verdict> {
        self.stages.iter().find_map(|s| {
            s.blocked().map(|f| Verdict {
                guard: s.scanner.name.clone(),
                action: GuardAction::Block,
                kind: VerdictKind::Pii(f.entity),
                count: 1,
                detail: None,
            })
        })
    }

    /// Every stage's verdicts.
    pub fn verdicts(&self) -> impl Iterator<Item = &Verdict> {
        self.stages.iter().flat_map(|s| s.verdicts().iter())
    }

    /// The redactors, in order (findings, overflow counts).
    pub fn stages(&self) -> &[StreamRedactor] {
        &self.stages
    }

    fn run(&mut self, delta: Option<&str>) -> &str {
        let ResponseStream { stages, a, b } = self;
        a.clear();
        a.push_str(delta.unwrap_or_default());
        for r in stages.iter_mut() {
            b.clear();
            if !a.is_empty() {
                b.push_str(r.push(a));
            }
            if delta.is_none() {
                b.push_str(r.finish());
            }
            std::mem::swap(a, b);
        }
        a
    }
}
