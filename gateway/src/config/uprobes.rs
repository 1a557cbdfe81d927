//! `capture.uprobes`: TLS plaintext from uprobes on OpenSSL (see `capture::uprobe`), the L7
//! view of spliced connections with no CA trust anywhere.

use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Smallest ring buffer accepted: one page cannot hold one 16 KiB event.
const MIN_RING_BYTES: u64 = 64 << 10;
/// Largest ring buffer accepted (kernel memory, locked).
const MAX_RING_BYTES: u64 = 1 << 30;
/// Bound of the tracked-connection map and the per-thread maps sized like it.
const MAX_CONNECTIONS_CAP: u32 = 1 << 22;
/// Bound of the reader's channel to the L7 side.
const MAX_CHANNEL_CAP: usize = 1 << 20;

/// TLS uprobes: which libraries are probed and how much plaintext may be in flight.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UprobesConfig {
    /// Observe captured TLS connections through uprobes on OpenSSL when the kernel supports
    /// them (otherwise tollgate logs it and runs L4 only).
    pub enabled: bool,
    /// Kernel ring buffer between the probes and tollgate, in bytes: a power of two, at least
    /// 64 KiB. Each event takes 16 KiB of it; when it is full events are dropped and counted
    /// (`ring_full`) and the connection is marked with a gap.
    pub ring_buffer_bytes: u64,
    /// Plaintext bytes emitted per SSL call at most (1 to 262144, 256 KiB); the rest of a larger call
    /// is dropped, counted (`per_call_cap`) and marked as a gap.
    pub max_bytes_per_call: u32,
    /// Captured connections (and threads inside an SSL call) the kernel tracks at once; the
    /// least recently used entry makes room for a new one.
    pub max_connections: u32,
    /// Events queued from the ring buffer reader to the L7 side; when full, events are dropped
    /// and counted (`channel_full`) and the connection is marked with a gap.
    pub channel_capacity: usize,
    /// How often `/proc/*/maps` is scanned for new TLS libraries and executables. A process's
    /// calls before its library file is attached are not seen (its own TLS libraries are also
    /// checked before each of its captured TLS connections is spliced).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub rescan_interval: Duration,
    /// Also rescan soon after any program starts (`sched_process_exec`, at most every 250ms),
    /// so a new library file is probed before the next periodic scan.
    pub rescan_on_exec: bool,
    /// Probe shared `libssl.so*` files found mapped by running processes (curl, CPython's
    /// `_ssl`, Ruby, PHP, Debian's nodejs).
    pub shared_libraries: bool,
    /// Probe executables of running processes that export `SSL_write` themselves (OpenSSL
    /// linked statically, e.g. official Node.js builds).
    pub static_executables: bool,
    /// Library or executable files probed at start whether or not a process maps them yet, so
    /// processes started later are observed from their first call (e.g. `/usr/bin/node`,
    /// `/usr/lib/x86_64-linux-gnu/libssl.so.3`). Missing files are logged and skipped.
    pub paths: Vec<PathBuf>,
    /// Bounds of the userspace HTTP/1.1 reassembly of observed plaintext.
    pub l7: ObservedL7Config,
}

/// `capture.uprobes.l7`: memory bounds of reassembling observed plaintext into HTTP exchanges.
/// A connection over a bound loses its L7 state (counted in
/// `tollgate_uprobe_l7_dropped_total{reason}`); what it had in flight is reported cut.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ObservedL7Config {
    /// Observed connections with L7 state at once (1 to 1048576); more are not parsed
    /// (reason `max_connections`).
    pub max_connections: usize,
    /// Largest HTTP message head held per direction, in bytes (1 KiB to 1 MiB; reason
    /// `header_bytes`).
    pub max_head_bytes: usize,
    /// Largest request body held to read its model and flags, in bytes (1 KiB to 256 MiB;
    /// reason `body_bytes`).
    pub max_body_bytes: usize,
    /// Requests awaiting their responses on one connection (1 to 1024; reason `pipeline`).
    pub max_pipeline: usize,
    /// A connection silent this long loses its state (reason `idle`): its close was missed.
    /// At least 1s.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub idle_timeout: Duration,
}

impl Default for ObservedL7Config {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_head_bytes: 64 << 10,
            max_body_bytes: 8 << 20,
            max_pipeline: 64,
            idle_timeout: Duration::from_secs(600),
        }
    }
}

impl Default for UprobesConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ring_buffer_bytes: 8 << 20,
            max_bytes_per_call: 256 << 10,
            max_connections: 65_536,
            channel_capacity: 4_096,
            rescan_interval: Duration::from_secs(2),
            rescan_on_exec: true,
            shared_libraries: true,
            static_executables: true,
            paths: Vec::new(),
            l7: ObservedL7Config::default(),
        }
    }
}

impl UprobesConfig {
    /// Bounds serde cannot express. Errors are `(field below capture.uprobes, message)` so the
    /// loader can point at the line.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let r = self.ring_buffer_bytes;
        if !r.is_power_of_two() || !(MIN_RING_BYTES..=MAX_RING_BYTES).contains(&r) {
            return Err((
                "ring_buffer_bytes".into(),
                format!("{r} must be a power of two between {MIN_RING_BYTES} (64 KiB) and {MAX_RING_BYTES} (1 GiB)"),
            ));
        }
        let cap = gateway_common::TLS_MAX_CALL_BYTES_LIMIT;
        if !(1..=cap).contains(&self.max_bytes_per_call) {
            return Err(("max_bytes_per_call".into(), format!("must be between 1 and {cap}")));
        }
        if !(1..=MAX_CONNECTIONS_CAP).contains(&self.max_connections) {
            return Err(("max_connections".into(), format!("must be between 1 and {MAX_CONNECTIONS_CAP}")));
        }
        if !(1..=MAX_CHANNEL_CAP).contains(&self.channel_capacity) {
            return Err(("channel_capacity".into(), format!("must be between 1 and {MAX_CHANNEL_CAP}")));
        }
        if self.rescan_interval < Duration::from_millis(100) {
            return Err(("rescan_interval".into(), "must be at least 100ms".into()));
        }
        let l = &self.l7;
        let bounds: [(&str, usize, usize, usize); 4] = [
            ("l7.max_connections", l.max_connections, 1, 1 << 20),
            ("l7.max_head_bytes", l.max_head_bytes, 1 << 10, 1 << 20),
            ("l7.max_body_bytes", l.max_body_bytes, 1 << 10, 256 << 20),
            ("l7.max_pipeline", l.max_pipeline, 1, 1024),
        ];
        for (field, v, lo, hi) in bounds {
            if !(lo..=hi).contains(&v) {
                return Err((field.into(), format!("{v} must be between {lo} and {hi}")));
            }
        }
        if l.idle_timeout < Duration::from_secs(1) {
            return Err(("l7.idle_timeout".into(), "must be at least 1s".into()));
        }
        Ok(())
    }
}
