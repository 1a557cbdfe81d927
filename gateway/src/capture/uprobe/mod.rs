//! TLS plaintext without interception: uprobes on the TLS libraries agents use (OpenSSL's
//! `SSL_write`/`SSL_read` and their `_ex` forms, in shared `libssl.so.*` and in executables that
//! link OpenSSL statically), joined in the kernel to the connection connect4/6 recorded.
//!
//! This module is the contract between the kernel side (the eBPF programs, attaching, the ring
//! buffer reader: [`TlsEvent`]s out) and the L7 side (`connection::observed`: HTTP/1.1
//! reassembly feeding the same LLM, MCP and A2A observers as interception).
//!
//! Wiring (the integrator's part, in `main.rs` after `Capture::start`):
//!
//! ```ignore
//! match capture::uprobe::start(&capture, &cfg.capture.uprobes, Some(&metrics)) {
//!     Ok((handle, events)) => { /* keep `handle` alive; feed `events` to the L7 side */ }
//!     // Disabled, or no kernel support (already logged): keep running, L4 only.
//!     Err(e) => tracing::warn!(error = %e, "TLS uprobes not started"),
//! }
//! ```
//!
//! Submodules: [`discover`] (which files to probe), `attach` (programs and links), `reader`
//! (ring buffer to channel), `runtime` ([`start`], [`UprobeHandle`], [`UprobeError`]),
//! [`support`] (what this host offers them, for `tollgate check`).

mod attach;
pub mod discover;
mod reader;
mod runtime;
pub mod support;

pub use attach::field_offset;
pub use runtime::{
    attach_delay_bound, kernel_supports_uprobes, start, TlsProber, UprobeError, UprobeHandle, UPROBE_PMU,
};

use bytes::Bytes;
use gateway_common::CaptureRecord;

/// Which way plaintext went, seen from the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The agent wrote it (`SSL_write*`): requests.
    Egress,
    /// The agent read it (`SSL_read*`): responses.
    Ingress,
}

impl Direction {
    /// The opposite side of the same connection (where a `gap_other` loss happened).
    pub fn other(self) -> Direction {
        match self {
            Direction::Egress => Direction::Ingress,
            Direction::Ingress => Direction::Egress,
        }
    }
}

/// One connection as the kernel identifies it: the socket cookie of the agent's socket, unique
/// for the kernel's uptime (fds and ports are reused, cookies are not).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// What the reader hands the L7 side, per connection in kernel order (one ring buffer, one
/// reader: events of one connection are never reordered).
#[derive(Clone, Debug)]
pub enum TlsEvent {
    /// Plaintext of one `SSL_write*`/`SSL_read*` call, or a piece of a large one.
    Data {
        /// The connection it belongs to (`record.cookie`).
        conn: ConnId,
        /// Who connected and where to, as connect4/6 recorded it.
        record: CaptureRecord,
        /// Request or response side.
        direction: Direction,
        /// The plaintext.
        data: Bytes,
        /// Bytes of this direction were lost before this chunk (ring buffer full, per-call
        /// cap): the parser must resynchronise and usage of the call in flight becomes an
        /// estimate.
        gap_before: bool,
        /// Bytes of the other direction were lost and it has had no event since (a request
        /// that lost its tail is answered before its side reports `gap_before`): the exchange
        /// in flight on that side is not exact.
        gap_other: bool,
    },
    /// The agent closed the socket: finish what is in flight (a response read to EOF ends).
    Close {
        /// The connection.
        conn: ConnId,
        /// Who connected and where to.
        record: CaptureRecord,
    },
}

impl TlsEvent {
    /// The connection the event belongs to.
    pub fn conn(&self) -> ConnId {
        match self {
            TlsEvent::Data { conn, .. } | TlsEvent::Close { conn, .. } => *conn,
        }
    }
}
