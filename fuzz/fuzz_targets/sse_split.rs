//! SSE parser: any split of the same bytes yields the same events at the same offsets.
//!
//! Input layout: byte 0 picks the event bound (`max_event_bytes`, small so oversized events are
//! reached), byte 1 how many cut points follow (each one byte, an offset into the stream taken
//! modulo its length), then the stream itself. The events of the whole stream fed at once are
//! the reference; feeding it cut into pieces (and byte by byte) must give the same events with
//! the same absolute end offsets (the callback's offset is relative to the chunk it ran in), and
//! the same events from `finish`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::protocol::llm::sse::{SseEvent, SseParser};

#[derive(Debug, PartialEq)]
enum Ev {
    Data(Vec<u8>),
    NoData,
    Oversized,
}

fn conv(e: SseEvent<'_>) -> Ev {
    match e {
        SseEvent::Data(d) => Ev::Data(d.to_vec()),
        SseEvent::NoData => Ev::NoData,
        SseEvent::Oversized => Ev::Oversized,
    }
}

/// Events with absolute end offsets (`None` for those `finish` reported) for `input` fed in the
/// pieces ending at `cuts` (sorted, in range).
fn run(input: &[u8], cuts: &[usize], max: usize) -> Vec<(Option<usize>, Ev)> {
    let mut p = SseParser::new(max);
    let mut out = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&input.len())) {
        let base = start;
        p.feed(&input[start..end], |off, e| {
            assert!(off <= end - base, "offset {off} past the chunk of {} bytes", end - base);
            out.push((Some(base + off), conv(e)));
        });
        start = end;
    }
    p.finish(|_, e| out.push((None, conv(e))));
    assert!(p.is_idle(), "parser not idle after finish");
    out
}

fuzz_target!(|data: &[u8]| {
    let [m, n, rest @ ..] = data else { return };
    let max = 1 + usize::from(*m) % 64;
    let n = usize::from(*n) % 8;
    if rest.len() < n {
        return;
    }
    let (cut_bytes, input) = rest.split_at(n);
    let whole = run(input, &[], max);
    if input.is_empty() {
        return;
    }
    let mut cuts: Vec<usize> = cut_bytes.iter().map(|&b| usize::from(b) % input.len()).collect();
    cuts.sort_unstable();
    cuts.dedup();
    assert_eq!(run(input, &cuts, max), whole, "split at {cuts:?}");
    if input.len() <= 512 {
        let bytewise: Vec<usize> = (1..input.len()).collect();
        assert_eq!(run(input, &bytewise, max), whole, "byte by byte");
    }
});
