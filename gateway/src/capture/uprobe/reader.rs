//! The ring buffer reader: kernel events into the contract's [`TlsEvent`]s on a bounded
//! channel. One reader, one ring: a connection's events keep kernel order.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use aya::maps::{MapData, RingBuf};
use bytes::Bytes;
use gateway_common::{
    TlsEventHeader, TLS_CHUNK, TLS_DIR_EGRESS, TLS_DIR_INGRESS, TLS_EV_CLOSE, TLS_EV_DATA, TLS_FLAG_GAP_BEFORE,
    TLS_FLAG_GAP_OTHER,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use super::{ConnId, Direction, TlsEvent};

/// Size of the header that starts every ring buffer record.
const HEADER: usize = std::mem::size_of::<TlsEventHeader>();

/// Counters the reader keeps (the kernel keeps its own).
#[derive(Debug, Default)]
pub struct ReaderStats {
    /// Events dropped because the channel to the L7 side was full.
    pub channel_full: AtomicU64,
    /// Records that did not parse (size or kind out of contract): a loader/object mismatch.
    pub malformed: AtomicU64,
}

/// Turn one ring buffer record into an event; `None` when it does not parse.
pub fn parse(raw: &[u8]) -> Option<TlsEvent> {
    if raw.len() < HEADER {
        return None;
    }
    // SAFETY: `raw` holds at least HEADER bytes; TlsEventHeader is plain data (any bit pattern
    // is valid) and read unaligned, so the record's alignment does not matter.
    let h: TlsEventHeader = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
    let conn = ConnId(h.record.cookie);
    match h.kind {
        TLS_EV_DATA => {
            let len = h.len as usize;
            if len > TLS_CHUNK || raw.len() < HEADER + len {
                return None;
            }
            let direction = match h.direction {
                TLS_DIR_EGRESS => Direction::Egress,
                TLS_DIR_INGRESS => Direction::Ingress,
                _ => return None,
            };
            Some(TlsEvent::Data {
                conn,
                record: h.record,
                direction,
                data: Bytes::copy_from_slice(&raw[HEADER..HEADER + len]),
                gap_before: h.flags & TLS_FLAG_GAP_BEFORE != 0,
                gap_other: h.flags & TLS_FLAG_GAP_OTHER != 0,
            })
        }
        TLS_EV_CLOSE => Some(TlsEvent::Close { conn, record: h.record }),
        _ => None,
    }
}

/// Gaps the channel caused, to report on the next event of that connection and direction.
/// Bounded: past `max` pending marks (connections that never send again nor close) the oldest
/// knowledge is dropped, which can only lose a gap mark of a connection gone quiet.
#[derive(Debug)]
pub struct PendingGaps {
    set: HashSet<(ConnId, Direction)>,
    max: usize,
}

impl PendingGaps {
    /// At most `max` marks.
    pub fn new(max: usize) -> Self {
        PendingGaps { set: HashSet::new(), max: max.max(1) }
    }

    /// `ev` could not be delivered.
    pub fn lost(&mut self, ev: &TlsEvent) {
        if let TlsEvent::Data { conn, direction, .. } = ev {
            if self.set.len() >= self.max {
                self.set.clear();
            }
            self.set.insert((*conn, *direction));
        }
        // A lost CLOSE: the L7 side ends the connection when it goes idle.
    }

    /// Apply a pending mark to `ev` before it is sent (and forget marks of a closed conn); a
    /// mark of the other direction is reported too, and kept for that direction's next event.
    pub fn apply(&mut self, ev: &mut TlsEvent) {
        match ev {
            TlsEvent::Data { conn, direction, gap_before, gap_other, .. } => {
                if self.set.remove(&(*conn, *direction)) {
                    *gap_before = true;
                }
                if self.set.contains(&(*conn, direction.other())) {
                    *gap_other = true;
                }
            }
            TlsEvent::Close { conn, .. } => {
                self.set.remove(&(*conn, Direction::Egress));
                self.set.remove(&(*conn, Direction::Ingress));
            }
        }
    }

    /// Undo [`PendingGaps::apply`] for an event that then could not be sent either.
    fn restore(&mut self, ev: &TlsEvent) {
        self.lost(ev);
    }
}

/// Deliver `ev` or count it and remember the gap. `false`: the receiver is gone.
pub fn deliver(tx: &mpsc::Sender<TlsEvent>, gaps: &mut PendingGaps, stats: &ReaderStats, mut ev: TlsEvent) -> bool {
    gaps.apply(&mut ev);
    match tx.try_send(ev) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(ev)) => {
            stats.channel_full.fetch_add(1, Ordering::Relaxed);
            gaps.restore(&ev);
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// Drain the ring buffer whenever it becomes readable, until the receiver is dropped.
pub async fn run(
    ring: RingBuf<MapData>,
    tx: mpsc::Sender<TlsEvent>,
    stats: Arc<ReaderStats>,
    max_pending_gaps: usize,
) -> Result<(), std::io::Error> {
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged until the ring
    // (moved into the AsyncFd) is dropped together with it.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)? };
    let mut gaps = PendingGaps::new(max_pending_gaps);
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        while let Some(item) = ring.next() {
            match parse(&item) {
                Some(ev) => {
                    if !deliver(&tx, &mut gaps, &stats, ev) {
                        return Ok(());
                    }
                }
                None => {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_common::CaptureRecord;

    fn raw(kind: u8, dir: u8, flags: u8, data: &[u8]) -> Vec<u8> {
        let h = TlsEventHeader {
            record: CaptureRecord { cookie: 77, tgid: 5, orig_dst_port: 443, ..Default::default() },
            len: data.len() as u32,
            call_len: data.len() as u32,
            kind,
            direction: dir,
            flags,
            ..Default::default()
        };
        let mut v = vec![0u8; HEADER];
        // SAFETY: `v` has HEADER bytes; plain data written unaligned.
        unsafe { std::ptr::write_unaligned(v.as_mut_ptr().cast(), h) };
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn records_parse_into_contract_events() {
        match parse(&raw(TLS_EV_DATA, TLS_DIR_EGRESS, TLS_FLAG_GAP_BEFORE, b"GET / HTTP/1.1\r\n")) {
            Some(TlsEvent::Data { conn, record, direction, data, gap_before, gap_other: false }) => {
                assert_eq!((conn, record.tgid, record.orig_dst_port), (ConnId(77), 5, 443));
                assert_eq!(direction, Direction::Egress);
                assert_eq!(&data[..], b"GET / HTTP/1.1\r\n");
                assert!(gap_before);
            }
            other => panic!("{other:?}"),
        }
        match parse(&raw(TLS_EV_DATA, TLS_DIR_INGRESS, 0, b"x")) {
            Some(TlsEvent::Data { direction: Direction::Ingress, gap_before: false, gap_other: false, .. }) => {}
            other => panic!("{other:?}"),
        }
        match parse(&raw(TLS_EV_DATA, TLS_DIR_INGRESS, TLS_FLAG_GAP_OTHER, b"x")) {
            Some(TlsEvent::Data { gap_before: false, gap_other: true, .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse(&raw(TLS_EV_CLOSE, 0, 0, b"")), Some(TlsEvent::Close { conn: ConnId(77), .. })));
        // Truncated, unknown kind, unknown direction, len past the record.
        assert!(parse(&[0u8; 10]).is_none());
        assert!(parse(&raw(9, 0, 0, b"")).is_none());
        assert!(parse(&raw(TLS_EV_DATA, 7, 0, b"x")).is_none());
        let mut short = raw(TLS_EV_DATA, 0, 0, b"abcd");
        short.truncate(HEADER + 2);
        assert!(parse(&short).is_none());
    }

    #[tokio::test]
    async fn full_channel_drops_count_and_mark_the_next_event() {
        let (tx, mut rx) = mpsc::channel(1);
        let stats = ReaderStats::default();
        let mut gaps = PendingGaps::new(16);
        let ev = |b: &'static [u8]| parse(&raw(TLS_EV_DATA, TLS_DIR_INGRESS, 0, b)).expect("parses");
        assert!(deliver(&tx, &mut gaps, &stats, ev(b"1")));
        assert!(deliver(&tx, &mut gaps, &stats, ev(b"2")));
        assert_eq!(stats.channel_full.load(Ordering::Relaxed), 1);
        assert!(matches!(rx.recv().await, Some(TlsEvent::Data { gap_before: false, .. })));
        assert!(deliver(&tx, &mut gaps, &stats, ev(b"3")));
        match rx.recv().await {
            Some(TlsEvent::Data { data, gap_before: true, .. }) => assert_eq!(&data[..], b"3"),
            other => panic!("{other:?}"),
        }
        drop(rx);
        assert!(!deliver(&tx, &mut gaps, &stats, ev(b"4")));
    }

    /// A request chunk the channel dropped is reported on the response events that follow
    /// (`gap_other`, as long as the request side sends nothing) and on the next request chunk.
    #[tokio::test]
    async fn channel_drop_of_a_request_tail_marks_the_response_events() {
        let (tx, mut rx) = mpsc::channel(1);
        let stats = ReaderStats::default();
        let mut gaps = PendingGaps::new(16);
        let ev = |dir: u8, b: &'static [u8]| parse(&raw(TLS_EV_DATA, dir, 0, b)).expect("parses");
        assert!(deliver(&tx, &mut gaps, &stats, ev(TLS_DIR_EGRESS, b"head")));
        assert!(deliver(&tx, &mut gaps, &stats, ev(TLS_DIR_EGRESS, b"tail")));
        assert_eq!(stats.channel_full.load(Ordering::Relaxed), 1);
        assert!(matches!(rx.recv().await, Some(TlsEvent::Data { gap_before: false, gap_other: false, .. })));
        for _ in 0..2 {
            assert!(deliver(&tx, &mut gaps, &stats, ev(TLS_DIR_INGRESS, b"response")));
            match rx.recv().await {
                Some(TlsEvent::Data { direction: Direction::Ingress, gap_before: false, gap_other: true, .. }) => {}
                other => panic!("{other:?}"),
            }
        }
        assert!(deliver(&tx, &mut gaps, &stats, ev(TLS_DIR_EGRESS, b"next")));
        assert!(matches!(rx.recv().await, Some(TlsEvent::Data { gap_before: true, gap_other: false, .. })));
        assert!(deliver(&tx, &mut gaps, &stats, ev(TLS_DIR_INGRESS, b"answer")));
        assert!(matches!(rx.recv().await, Some(TlsEvent::Data { gap_before: false, gap_other: false, .. })));
    }
}
