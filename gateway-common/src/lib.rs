//! Types shared by the kernel programs (`ebpf/`) and the userspace loader (`gateway/`).
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of padding holes the verifier or `Pod` would
//! trip over, because the same bytes are written by one side and read by the other. Addresses are
//! kept as raw network-order bytes (what the kernel hands us) and ports in host order (what
//! userspace compares against), so neither side has to guess which conversion happened.
#![no_std]

/// Names of the maps, shared so the loader cannot drift from the programs.
pub mod maps {
    /// Singleton [`crate::RuntimeConfig`].
    pub const CONFIG: &str = "TG_CONFIG";
    /// Singleton `u64`: CLOCK_MONOTONIC ns at the proxy's last heartbeat.
    pub const HEARTBEAT: &str = "TG_HEARTBEAT";
    /// Destination ports captured for any address: `u16` (host order) -> `u8` (1).
    pub const PORT_RULES: &str = "TG_PORT_RULES";
    /// LPM trie of [`crate::Cidr4Key`] -> `u8` (1).
    pub const CIDR4_RULES: &str = "TG_CIDR4_RULES";
    /// LPM trie of [`crate::Cidr6Key`] -> `u8` (1).
    pub const CIDR6_RULES: &str = "TG_CIDR6_RULES";
    /// Cgroup ids whose subtree is in capture scope: `u64` -> `u8` (1).
    pub const SCOPE: &str = "TG_SCOPE";
    /// Records keyed by socket cookie, written by connect4/6: `u64` -> [`crate::CaptureRecord`].
    /// A plain (non-LRU) hash map: its entry is the connection's slot, held from connect until
    /// the proxy takes the record or the socket closes, so a full map refuses the *new* connect
    /// (which then goes direct) instead of evicting another connection's record.
    pub const BY_COOKIE: &str = "TG_BY_COOKIE";
    /// Records re-keyed by sock_ops: [`crate::FlowKey`] -> [`crate::CaptureRecord`]. Every entry
    /// has a live `TG_BY_COOKIE` entry (its slot), so it never holds more than that map.
    pub const BY_FLOW: &str = "TG_BY_FLOW";
    /// Per-CPU `u64` counters indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "TG_COUNTERS";
    /// TLS uprobe ring buffer of [`crate::TlsEvent`]s (DATA) and [`crate::TlsEventHeader`]s
    /// (CLOSE), sized by `capture.uprobes.ring_buffer_bytes`.
    pub const TLS_EVENTS: &str = "TG_TLS_EVENTS";
    /// Captured connections by `(tgid << 32) | fd`: `u64` -> [`crate::TlsConn`]. Written by
    /// connect4/6 (same thread, inside `connect()`), removed on `close()`. LRU so entries of
    /// processes that exit without closing age out instead of filling it.
    pub const TLS_CONNS: &str = "TG_TLS_CONNS";
    /// Threads inside `connect()`: pid_tgid -> fd (`u32`), from `sys_enter_connect` to
    /// `sys_exit_connect`.
    pub const TLS_CONNECTING: &str = "TG_TLS_CONNECTING";
    /// Threads inside an SSL call: pid_tgid -> [`crate::SslCall`].
    pub const TLS_ACTIVE: &str = "TG_TLS_ACTIVE";
    /// Last fd seen per SSL object: [`crate::SslKey`] -> `u32` (LRU), for calls served from the
    /// library's buffer without a syscall; `u32::MAX` marks an object seen in calls without any
    /// syscall and not bound yet (memory BIO). Dropped on `SSL_free`.
    pub const TLS_SSL_FD: &str = "TG_TLS_SSL_FD";
    /// One-page ring buffer of exec wake-ups (`u32` tgids) from `sched_process_exec`: a new
    /// program may map a TLS library no one mapped before, so userspace rescans early.
    pub const TLS_EXECS: &str = "TG_TLS_EXECS";
    /// Last captured receive per thread: pid_tgid -> [`crate::RecvToken`] (LRU). Memory-BIO
    /// TLS stacks (Node.js, Python asyncio) read the socket and then feed the bytes to OpenSSL
    /// on the same thread, with no syscall inside the SSL call: this is how such an `SSL*` finds
    /// its fd.
    pub const TLS_LAST_RECV: &str = "TG_TLS_LAST_RECV";
    /// Per-CPU `u64` counters indexed by [`crate::TlsCounter`].
    pub const TLS_COUNTERS: &str = "TG_TLS_COUNTERS";
    /// Per-CPU scratch [`crate::TlsConn`] (keeps it off connect4/6's 512-byte stack).
    pub const TLS_SCRATCH: &str = "TG_TLS_SCRATCH";
}

/// Globals of the object the loader overrides (`EbpfLoader::override_global`).
pub mod globals {
    /// `u32`: plaintext bytes emitted per SSL call at most (`capture.uprobes.max_bytes_per_call`).
    pub const TLS_MAX_CALL_BYTES: &str = "TG_TLS_MAX_CALL_BYTES";
}

/// Program names as they appear in the object file.
pub mod progs {
    /// `cgroup/connect4`.
    pub const CONNECT4: &str = "tg_connect4";
    /// `cgroup/connect6`.
    pub const CONNECT6: &str = "tg_connect6";
    /// `sockops`.
    pub const SOCK_OPS: &str = "tg_sockops";
    /// uprobe on `SSL_write`.
    pub const SSL_WRITE: &str = "tg_ssl_write";
    /// uprobe on `SSL_write_ex`.
    pub const SSL_WRITE_EX: &str = "tg_ssl_write_ex";
    /// uprobe on `SSL_read`.
    pub const SSL_READ: &str = "tg_ssl_read";
    /// uprobe on `SSL_read_ex`.
    pub const SSL_READ_EX: &str = "tg_ssl_read_ex";
    /// uretprobe on all four SSL functions: emits the plaintext.
    pub const SSL_RET: &str = "tg_ssl_ret";
    /// uprobe on `SSL_do_handshake`: binds a memory-BIO `SSL*` to its fd before the first write.
    pub const SSL_HANDSHAKE: &str = "tg_ssl_handshake";
    /// uretprobe on `SSL_do_handshake`.
    pub const SSL_HANDSHAKE_RET: &str = "tg_ssl_handshake_ret";
    /// uprobe on `SSL_free`: forgets the object's fd (its address may be reused for another
    /// connection).
    pub const SSL_FREE: &str = "tg_ssl_free";
    /// Tracepoint attached to `sys_enter_{write,writev,sendto,sendmsg}`: the fd an SSL call uses.
    pub const TLS_SYS_FD: &str = "tg_tls_sys_fd";
    /// Tracepoint attached to `sys_enter_{read,readv,recvfrom,recvmsg}`: the fd an SSL call
    /// uses, and the thread's last captured receive ([`crate::RecvToken`]).
    pub const TLS_RECV_ENTER: &str = "tg_tls_recv_enter";
    /// Tracepoint attached to `sys_exit_{read,readv,recvfrom,recvmsg}`: a receive that brought
    /// no bytes arms no binding.
    pub const TLS_RECV_EXIT: &str = "tg_tls_recv_exit";
    /// Tracepoint `syscalls/sys_enter_connect`.
    pub const TLS_CONNECT_ENTER: &str = "tg_tls_connect_enter";
    /// Tracepoint `syscalls/sys_exit_connect`.
    pub const TLS_CONNECT_EXIT: &str = "tg_tls_connect_exit";
    /// Tracepoint `syscalls/sys_enter_close`.
    pub const TLS_CLOSE: &str = "tg_tls_close";
    /// Tracepoint `sched/sched_process_exec`: wakes the library rescan.
    pub const TLS_EXEC: &str = "tg_tls_exec";
}

/// `AF_INET`, duplicated so the no_std side needs no libc.
pub const AF_INET: u16 = 2;
/// `AF_INET6`.
pub const AF_INET6: u16 = 10;

/// Redirect only when the heartbeat is fresh; when stale, refuse (`fail_closed`) instead of
/// letting the connection through.
pub const FLAG_FAIL_CLOSED: u32 = 1;
/// Capture scope is every cgroup (the `TG_SCOPE` map is ignored).
pub const FLAG_SCOPE_ALL: u32 = 1 << 1;
/// `pod_proxy_v4` is set: processes in other netns are sent there.
pub const FLAG_POD_V4: u32 = 1 << 2;
/// `pod_proxy_v6` is set.
pub const FLAG_POD_V6: u32 = 1 << 3;
/// TLS uprobes are on: connect4/6 also records captured connections by (tgid, fd) in
/// `TG_TLS_CONNS`. Off, the connect path does not touch the TLS maps at all.
pub const FLAG_UPROBES: u32 = 1 << 4;

/// Scope map value: this cgroup and its descendants are in scope.
pub const SCOPE_INCLUDE: u8 = 1;
/// Scope map value: this cgroup and its descendants are out of scope, whatever an ancestor says
/// (a pod opted out below an included tree).
pub const SCOPE_EXCLUDE: u8 = 2;

/// How deep the capture-scope ancestor walk goes. Kubernetes pod cgroups sit at depth 4-6; 16
/// leaves room for nested runtimes while keeping the unrolled loop small for the verifier.
pub const MAX_CGROUP_DEPTH: u32 = 16;

/// Knobs the kernel programs read on every connect; written once by the loader (and again on
/// reload) so the programs carry no compiled-in policy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Proxy address for callers in the host netns (usually 127.0.0.1), network order.
    pub proxy_v4: [u8; 4],
    /// Proxy address for callers in other netns (pods), network order.
    pub pod_proxy_v4: [u8; 4],
    /// Proxy address for IPv6 callers in the host netns (usually ::1), network order.
    pub proxy_v6: [u8; 16],
    /// Proxy address for IPv6 callers in other netns, network order.
    pub pod_proxy_v6: [u8; 16],
    /// Proxy port, host order.
    pub proxy_port: u16,
    /// Explicit padding (always 0) so every byte is initialised.
    pub _pad0: u16,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Netns cookie of the netns the proxy listens in (the host netns).
    pub host_netns_cookie: u64,
    /// Heartbeat older than this means the proxy is down.
    pub heartbeat_timeout_ns: u64,
    /// SO_MARK value tollgate sets on its own upstream sockets; never redirected.
    pub self_mark: u32,
    /// tollgate's own tgid; never redirected.
    pub self_tgid: u32,
}

/// Key of the IPv4 LPM trie: destination port (big-endian, 0 = any port) then address. The
/// port comes first so one trie answers "CIDR with port" and "CIDR any port" with two lookups,
/// and the LPM prefix length is `16 + cidr_len` (or `cidr_len` bits of the address after a fully
/// specified port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr4Key {
    /// Port in network order, 0 for any.
    pub port_be: [u8; 2],
    /// Address, network order.
    pub addr: [u8; 4],
}

/// IPv6 counterpart of [`Cidr4Key`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cidr6Key {
    /// Port in network order, 0 for any.
    pub port_be: [u8; 2],
    /// Address, network order.
    pub addr: [u8; 16],
}

/// The connection as the proxy sees it on accept: `src` is the agent's local address
/// (`peer_addr()`), `dst` the proxy address it was rewritten to (`local_addr()`). Unique across
/// pods because the pod's source address is part of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Network order; IPv4 in the first 4 bytes, rest zero.
    pub src_addr: [u8; 16],
    /// Network order; IPv4 in the first 4 bytes, rest zero.
    pub dst_addr: [u8; 16],
    /// Host order.
    pub src_port: u16,
    /// Host order.
    pub dst_port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// Explicit padding (always 0).
    pub _pad: u16,
}

/// What the kernel knew at connect time: the original destination and who asked for it. This is
/// the seed of the proxy's agent identity; the kernel is the only party that cannot be lied to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureRecord {
    /// Original destination, network order; IPv4 in the first 4 bytes.
    pub orig_dst_addr: [u8; 16],
    /// Original destination port, host order.
    pub orig_dst_port: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// Process id (thread group id) of the caller.
    pub tgid: u32,
    /// Thread id of the caller.
    pub pid: u32,
    /// Real uid of the caller (init user namespace).
    pub uid: u32,
    /// Real gid of the caller.
    pub gid: u32,
    /// `RECORD_*` bits (kernel bookkeeping).
    pub flags: u32,
    /// `comm` of the calling thread, NUL padded.
    pub comm: [u8; 16],
    /// cgroup v2 id (inode of the cgroup directory).
    pub cgroup_id: u64,
    /// Netns cookie of the caller's socket.
    pub netns_cookie: u64,
    /// CLOCK_MONOTONIC ns at connect.
    pub captured_at_ns: u64,
    /// Socket cookie of the caller's socket: the `TG_BY_COOKIE` key holding this record's slot,
    /// which whoever takes the `TG_BY_FLOW` record removes too.
    pub cookie: u64,
}

/// [`CaptureRecord::flags`]: sock_ops has copied the record to `TG_BY_FLOW`. A cookie entry
/// without it that is older than one `connect()` call belongs to a connect that failed before
/// the SYN (no sock_ops callback ever fires for it), and userspace reaps it.
pub const RECORD_REKEYED: u32 = 1;

/// Plaintext bytes per TLS uprobe event. Fixed because a BPF ring buffer reservation must be
/// sized at verification time; a larger SSL call is split into several events.
pub const TLS_CHUNK: usize = 16 * 1024;
/// `TlsEventHeader::kind`: plaintext of one SSL_write/SSL_read call (or a piece of it).
pub const TLS_EV_DATA: u8 = 1;
/// `TlsEventHeader::kind`: the agent closed the fd; no more data for this connection.
pub const TLS_EV_CLOSE: u8 = 2;
/// `TlsEventHeader::direction`: the agent wrote it (requests).
pub const TLS_DIR_EGRESS: u8 = 0;
/// `TlsEventHeader::direction`: the agent read it (responses).
pub const TLS_DIR_INGRESS: u8 = 1;
/// `TlsEventHeader::flags`: bytes of this direction were lost before this event (ring buffer
/// full, per-call cap); the stream cannot be parsed exactly across the gap.
pub const TLS_FLAG_GAP_BEFORE: u8 = 1;
/// `TlsEventHeader::flags`: bytes of the *other* direction were lost and that direction has
/// emitted nothing since. Set on every event until it does, because the loss may be the tail of
/// a request whose next event in its own direction comes only after the response (or never):
/// without it, a response to a request that lost its last bytes would look exact.
pub const TLS_FLAG_GAP_OTHER: u8 = 2;
/// `SslCall::direction` of `SSL_do_handshake`: binds, never emits.
pub const TLS_DIR_HANDSHAKE: u8 = 2;
/// How long after a captured receive returned bytes an fd-less SSL call on the same thread may
/// take that receive's fd (50 ms). Memory-BIO stacks call OpenSSL in the same callback that read
/// the socket (microseconds later); the slack covers preemption and GC pauses on a busy node,
/// while [`RecvToken`] rules (first SSL call after the receive, no other read in between) keep
/// a stale receive from binding anything.
pub const TLS_BIND_WINDOW_NS: u64 = 50_000_000;
/// [`RecvToken::state`]: `read()` entered on a captured fd, bytes not yet confirmed.
pub const RECV_PENDING: u32 = 1;
/// [`RecvToken::state`]: that read returned bytes: the next SSL call may bind to `fd`.
pub const RECV_READY: u32 = 2;

/// Value of `TG_TLS_LAST_RECV`: the thread's last receive on a captured connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecvToken {
    /// The captured connection's fd.
    pub fd: u32,
    /// [`RECV_PENDING`] or [`RECV_READY`].
    pub state: u32,
    /// `bpf_ktime_get_ns()` when the read returned bytes (entered, while pending).
    pub ts_ns: u64,
}

impl RecvToken {
    /// The fd an SSL call that saw no syscall and whose `SSL*` has no fd yet may bind to at
    /// `now_ns`: only a receive that returned bytes at most `window_ns` earlier. Shared by the
    /// kernel (which consumes the token on every SSL call, so only the first call after the
    /// receive can bind) and the tests.
    #[inline(always)]
    pub fn bindable_fd(&self, now_ns: u64, window_ns: u64) -> Option<u32> {
        if self.state == RECV_READY && now_ns >= self.ts_ns && now_ns - self.ts_ns <= window_ns {
            Some(self.fd)
        } else {
            None
        }
    }
}

/// Most [`TLS_CHUNK`] events one SSL call emits: bounds the kernel's loop for the verifier, and
/// so `capture.uprobes.max_bytes_per_call` (256 KiB at most).
pub const TLS_MAX_CALL_CHUNKS: u32 = 16;
/// Upper bound of `capture.uprobes.max_bytes_per_call`.
pub const TLS_MAX_CALL_BYTES_LIMIT: u32 = TLS_MAX_CALL_CHUNKS * TLS_CHUNK as u32;

/// Value of `TG_TLS_CONNS`: the connection's capture record plus the per-direction "bytes were
/// lost" marks the next event of that direction reports as [`TLS_FLAG_GAP_BEFORE`] (and events
/// of the other direction, until then, as [`TLS_FLAG_GAP_OTHER`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsConn {
    /// What connect4/6 recorded.
    pub record: CaptureRecord,
    /// Indexed by direction ([`TLS_DIR_EGRESS`], [`TLS_DIR_INGRESS`]): 1 = gap pending.
    pub gap: [u8; 2],
    /// Explicit padding (always 0).
    pub _pad: [u8; 6],
}

/// Value of `TG_TLS_ACTIVE`: an SSL call in flight on a thread, saved at entry for its return.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SslCall {
    /// The `SSL*`.
    pub ssl: u64,
    /// The plaintext buffer.
    pub buf: u64,
    /// `_ex` forms: where the library stores the byte count (`size_t *`); 0 otherwise.
    pub len_ptr: u64,
    /// fd the call used in a syscall, -1 until one is seen: the first one, or a captured
    /// connection's (a call may read a file first, e.g. the time zone during certificate checks).
    pub fd: i32,
    /// [`TLS_DIR_EGRESS`], [`TLS_DIR_INGRESS`] or [`TLS_DIR_HANDSHAKE`].
    pub direction: u8,
    /// 1 when the entry bound the `SSL*` to `token_fd` (a memory-BIO object's first call after
    /// a captured receive): files the call reads then do not rebind it.
    pub bound_by_token: u8,
    /// Explicit padding (always 0).
    pub _pad: [u8; 2],
}

/// Key of `TG_TLS_SSL_FD`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SslKey {
    /// Process (thread group) id, as a u64 so the struct has no padding.
    pub tgid: u64,
    /// The `SSL*`.
    pub ssl: u64,
}

/// Per-CPU counters of the TLS uprobe programs (`TG_TLS_COUNTERS`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsCounter {
    /// DATA events written to the ring buffer.
    Events = 0,
    /// Plaintext bytes in those events.
    Bytes = 1,
    /// CLOSE events written.
    Closes = 2,
    /// Chunks (DATA) or CLOSE events lost because the ring buffer was full.
    DropRingFull = 3,
    /// SSL calls cut at `max_bytes_per_call` (the rest of the call is not emitted).
    DropPerCallCap = 4,
    /// SSL calls on a captured process whose fd was never learnt (no syscall in the call and no
    /// earlier call on the same SSL object): nothing emitted.
    DropNoFd = 5,
    /// SSL calls on a connection that is not captured: nothing leaves the kernel. Not a drop.
    NotCaptured = 6,
    /// Chunks whose user memory could not be read (paged out): nothing emitted for them.
    DropReadFailed = 7,
}

/// Number of [`TlsCounter`] slots.
pub const TLS_COUNTER_SLOTS: u32 = 8;

impl TlsCounter {
    /// Every counter, in slot order.
    pub const ALL: [TlsCounter; TLS_COUNTER_SLOTS as usize] = [
        TlsCounter::Events,
        TlsCounter::Bytes,
        TlsCounter::Closes,
        TlsCounter::DropRingFull,
        TlsCounter::DropPerCallCap,
        TlsCounter::DropNoFd,
        TlsCounter::NotCaptured,
        TlsCounter::DropReadFailed,
    ];

    /// The `reason` label when the counter is a drop, `None` otherwise.
    pub const fn drop_reason(self) -> Option<&'static str> {
        match self {
            TlsCounter::DropRingFull => Some("ring_full"),
            TlsCounter::DropPerCallCap => Some("per_call_cap"),
            TlsCounter::DropNoFd => Some("no_fd"),
            TlsCounter::DropReadFailed => Some("read_failed"),
            _ => None,
        }
    }
}

/// Header of one TLS uprobe event in the ring buffer, followed by `TLS_CHUNK` bytes of which
/// the first `len` are plaintext. It carries the whole capture record of the connection (who
/// connected, where to) so userspace needs no second lookup that could race the close.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsEventHeader {
    /// The connection's capture record (connect4/6); `record.cookie` identifies it.
    pub record: CaptureRecord,
    /// CLOCK_MONOTONIC ns when the event was written.
    pub ts_ns: u64,
    /// The agent's socket fd.
    pub fd: u32,
    /// Plaintext bytes that follow the header (at most [`TLS_CHUNK`]; 0 for CLOSE).
    pub len: u32,
    /// Bytes the whole SSL call moved (before the per-call cap).
    pub call_len: u32,
    /// Where this chunk starts inside the call.
    pub offset: u32,
    /// [`TLS_EV_DATA`] or [`TLS_EV_CLOSE`].
    pub kind: u8,
    /// [`TLS_DIR_EGRESS`] or [`TLS_DIR_INGRESS`].
    pub direction: u8,
    /// `TLS_FLAG_*` bits.
    pub flags: u8,
    /// Explicit padding (always 0).
    pub _pad: u8,
    /// Explicit padding (always 0).
    pub _pad2: u32,
}

/// One ring buffer event: header plus a fixed-size data area.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsEvent {
    /// What and whose.
    pub header: TlsEventHeader,
    /// Plaintext; only the first `header.len` bytes are meaningful.
    pub data: [u8; TLS_CHUNK],
}

/// Per-CPU counters, so the hot path never contends on a shared cache line.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Every connect4/6 call on a TCP socket.
    Seen = 0,
    /// Rewritten to the proxy.
    Redirected = 1,
    /// tollgate's own socket (mark or tgid).
    SkipSelf = 2,
    /// Caller's cgroup is outside the capture scope.
    SkipScope = 3,
    /// Destination matches no capture rule.
    SkipNoRule = 4,
    /// Proxy heartbeat stale: let through (fail-open).
    SkipProxyDown = 5,
    /// Proxy heartbeat stale: refused (fail-closed).
    RejectProxyDown = 6,
    /// Caller in another netns but no pod-side proxy address configured for the family.
    SkipNoPodAddress = 7,
    /// sock_ops could not copy a record to the flow map (should not happen: its entries are
    /// bounded by the cookie map's).
    RecordFailed = 8,
    /// sock_ops moved a record from cookie to 4-tuple.
    Rekeyed = 9,
    /// Non-TCP socket (connected UDP).
    SkipNotTcp = 10,
    /// Caller in another netns connecting to its own loopback: not the node's to proxy.
    SkipPodLoopback = 11,
    /// A record the proxy never took was dropped when its socket closed.
    ExpiredOnClose = 12,
    /// The record map was full (`capture.max_records` connections not yet taken by the proxy):
    /// the connect went direct, and no other connection's record was touched.
    SkipMapFull = 13,
}

/// Number of [`Counter`] slots.
pub const COUNTER_SLOTS: u32 = 14;

impl Counter {
    /// Every counter, in slot order, so userspace can name them without repeating the list.
    pub const ALL: [Counter; COUNTER_SLOTS as usize] = [
        Counter::Seen,
        Counter::Redirected,
        Counter::SkipSelf,
        Counter::SkipScope,
        Counter::SkipNoRule,
        Counter::SkipProxyDown,
        Counter::RejectProxyDown,
        Counter::SkipNoPodAddress,
        Counter::RecordFailed,
        Counter::Rekeyed,
        Counter::SkipNotTcp,
        Counter::SkipPodLoopback,
        Counter::ExpiredOnClose,
        Counter::SkipMapFull,
    ];

    /// Metric label for the counter.
    pub const fn label(self) -> &'static str {
        match self {
            Counter::Seen => "seen",
            Counter::Redirected => "redirected",
            Counter::SkipSelf => "skipped_self",
            Counter::SkipScope => "skipped_scope",
            Counter::SkipNoRule => "skipped_no_rule",
            Counter::SkipProxyDown => "skipped_proxy_down",
            Counter::RejectProxyDown => "rejected_proxy_down",
            Counter::SkipNoPodAddress => "skipped_no_pod_address",
            Counter::RecordFailed => "record_failed",
            Counter::Rekeyed => "rekeyed",
            Counter::SkipNotTcp => "skipped_not_tcp",
            Counter::SkipPodLoopback => "skipped_pod_loopback",
            Counter::ExpiredOnClose => "expired_on_close",
            Counter::SkipMapFull => "skipped_map_full",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all types are #[repr(C)], contain only integers/byte arrays, have explicit padding
    // fields so every byte is initialised, and any bit pattern is a valid value.
    unsafe impl aya::Pod for RuntimeConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Cidr4Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Cidr6Key {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CaptureRecord {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TlsEventHeader {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TlsConn {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SslCall {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SslKey {}
    // SAFETY: repr(C), plain integers, no padding (4 + 4 + 8).
    unsafe impl aya::Pod for RecvToken {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn recv_token_binds_only_a_recent_receive_that_returned_bytes() {
        let w = TLS_BIND_WINDOW_NS;
        let ready = RecvToken { fd: 7, state: RECV_READY, ts_ns: 1_000 };
        assert_eq!(ready.bindable_fd(1_000, w), Some(7));
        assert_eq!(ready.bindable_fd(1_000 + w, w), Some(7));
        assert_eq!(ready.bindable_fd(1_001 + w, w), None, "outside the window");
        assert_eq!(ready.bindable_fd(999, w), None, "clock before the receive");
        let pending = RecvToken { state: RECV_PENDING, ..ready };
        assert_eq!(pending.bindable_fd(1_000, w), None, "a read that brought nothing");
        assert_eq!(RecvToken::default().bindable_fd(0, w), None);
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<RuntimeConfig>(), 4 + 4 + 16 + 16 + 2 + 2 + 4 + 8 + 8 + 4 + 4);
        assert_eq!(size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 2 + 2);
        assert_eq!(size_of::<CaptureRecord>(), 16 + 2 + 2 + 4 * 5 + 16 + 8 * 4);
        assert_eq!(size_of::<TlsEventHeader>(), size_of::<CaptureRecord>() + 8 + 4 * 4 + 4 + 4);
        assert_eq!(size_of::<TlsEvent>(), size_of::<TlsEventHeader>() + TLS_CHUNK);
        assert_eq!(size_of::<TlsConn>(), size_of::<CaptureRecord>() + 8);
        assert_eq!(size_of::<SslCall>(), 8 * 3 + 4 + 4);
        assert_eq!(size_of::<SslKey>(), 16);
        assert_eq!(size_of::<RecvToken>(), 16);
        assert_eq!(core::mem::align_of::<TlsEvent>(), 8);
        assert_eq!(size_of::<Cidr4Key>(), 6);
        assert_eq!(size_of::<Cidr6Key>(), 18);
    }

    #[test]
    fn counters_are_in_slot_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
        for (i, c) in TlsCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
