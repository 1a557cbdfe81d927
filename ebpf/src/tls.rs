//! TLS plaintext without interception: uprobes on OpenSSL's `SSL_write`/`SSL_read` (and their
//! `_ex` forms) joined to the connection connect4/6 captured.
//!
//! How a chunk finds its connection:
//! * `sys_enter_connect` stashes the fd of the thread's `connect()`; connect4/6 (same thread,
//!   inside that syscall) reads it when it captures the connection and records
//!   `(tgid << 32 | fd) -> TlsConn` ([`on_captured_connect`]); `sys_exit_connect` forgets the
//!   stash and drops the entry again when the connect failed outright.
//! * An SSL call's entry probe saves its buffer in `TG_TLS_ACTIVE` (per thread); the
//!   read/write-family syscall the library makes meanwhile on that thread tells the fd; the
//!   return probe looks the connection up by (tgid, fd) and copies the plaintext straight from
//!   user memory into ring buffer reservations. A call the library serves from its own buffer
//!   (no syscall) uses the last fd seen for that `SSL*`.
//! * Memory-BIO stacks (Node.js, Python asyncio) never make a syscall inside an SSL call: a read
//!   on a captured fd leaves a per-thread receive token ([`tg_tls_recv_enter`],
//!   [`tg_tls_recv_exit`]) that the next SSL call on the thread consumes, binding its `SSL*`
//!   under the rules of [`bind_at_entry`].
//! * Only calls whose (tgid, fd) is a captured connection emit anything: the plaintext of any
//!   other TLS connection never leaves the kernel (counted as `NotCaptured`).
//! * `sys_enter_close` emits CLOSE for a captured fd and forgets it.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user, generated},
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use gateway_common::{
    CaptureRecord, RecvToken, SslCall, SslKey, TlsConn, TlsCounter, TlsEvent, TlsEventHeader, TLS_CHUNK, TLS_COUNTER_SLOTS,
    TLS_DIR_EGRESS, TLS_DIR_INGRESS, TLS_EV_CLOSE, TLS_EV_DATA, TLS_FLAG_GAP_BEFORE, TLS_FLAG_GAP_OTHER, TLS_MAX_CALL_CHUNKS, RECV_PENDING, RECV_READY, TLS_BIND_WINDOW_NS, TLS_DIR_HANDSHAKE,
};

// Defaults only; the loader sizes every map from `capture.uprobes`.
const DEFAULT_RING_BYTES: u32 = 1 << 20;
const DEFAULT_CONNS: u32 = 16_384;

/// Offset of the first syscall argument (and of `ret` in `sys_exit_*`) in a syscalls
/// tracepoint record: 8 bytes of common fields, then `__syscall_nr` padded to 8. The loader
/// checks the `format` files say so before attaching.
const SYSCALL_ARG0: usize = 16;
/// `-EINPROGRESS`: a non-blocking connect that is under way (still a connection).
const EINPROGRESS_NEG: i64 = -115;

/// Overridden by the loader with `capture.uprobes.max_bytes_per_call`. Mutable (in `.data`, not
/// the frozen `.rodata`) on purpose: the verifier then cannot see the value and verifies the
/// chunk loop for any cap, so no config value can make loading fail.
#[unsafe(no_mangle)]
static mut TG_TLS_MAX_CALL_BYTES: u32 = 256 * 1024;

#[map]
static TG_TLS_EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BYTES, 0);
#[map]
static TG_TLS_CONNS: LruHashMap<u64, TlsConn> = LruHashMap::with_max_entries(DEFAULT_CONNS, 0);
#[map]
static TG_TLS_CONNECTING: LruHashMap<u64, u32> = LruHashMap::with_max_entries(DEFAULT_CONNS, 0);
#[map]
static TG_TLS_ACTIVE: LruHashMap<u64, SslCall> = LruHashMap::with_max_entries(DEFAULT_CONNS, 0);
#[map]
static TG_TLS_SSL_FD: LruHashMap<SslKey, u32> = LruHashMap::with_max_entries(DEFAULT_CONNS, 0);
#[map]
static TG_TLS_LAST_RECV: LruHashMap<u64, RecvToken> = LruHashMap::with_max_entries(DEFAULT_CONNS, 0);
#[map]
static TG_TLS_EXECS: RingBuf = RingBuf::with_byte_size(4096, 0);
#[map]
static TG_TLS_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(TLS_COUNTER_SLOTS, 0);
#[map]
static TG_TLS_SCRATCH: PerCpuArray<TlsConn> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn add(c: TlsCounter, n: u64) {
    if let Some(p) = TG_TLS_COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: this CPU's slot of a per-CPU array value, valid for the program run and
        // written by no other CPU.
        unsafe { *p += n };
    }
}

/// Called by connect4/6 once a connection is captured (record stored): remember it by
/// (tgid, fd) when this thread's `connect()` fd was stashed. Out of line and stack-free (the
/// value is built in per-CPU scratch) so connect's 512-byte frame does not grow.
#[inline(never)]
pub fn on_captured_connect(rec: &CaptureRecord) {
    let id = bpf_get_current_pid_tgid();
    let Some(fd) = TG_TLS_CONNECTING.get_ptr(&id) else {
        return;
    };
    // SAFETY: value pointer of a live map entry, plain data.
    let fd = unsafe { *fd };
    let Some(scratch) = TG_TLS_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot, valid for the program run; plain data.
    unsafe {
        (*scratch).record = *rec;
        (*scratch).gap = [0, 0];
        (*scratch)._pad = [0; 6];
    }
    let key = (id & 0xffff_ffff_0000_0000) | u64::from(fd);
    // SAFETY: `scratch` is a valid map value pointer (see above), read by the helper.
    let _ = TG_TLS_CONNS.insert(&key, unsafe { &*scratch }, BPF_ANY as u64);
}

/// `sys_enter_connect`: stash the fd so connect4/6 can key the capture record by it.
#[tracepoint]
pub fn tg_tls_connect_enter(ctx: TracePointContext) -> u32 {
    // SAFETY: offset of `fd` in the sys_enter_connect record (checked by the loader).
    let Ok(fd) = (unsafe { ctx.read_at::<u64>(SYSCALL_ARG0) }) else {
        return 0;
    };
    let id = bpf_get_current_pid_tgid();
    let _ = TG_TLS_CONNECTING.insert(&id, &(fd as u32), BPF_ANY as u64);
    0
}

/// `sys_exit_connect`: forget the stash; a connect that failed outright leaves no connection.
#[tracepoint]
pub fn tg_tls_connect_exit(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let Some(fd) = TG_TLS_CONNECTING.get_ptr(&id) else {
        return 0;
    };
    // SAFETY: value pointer of a live map entry, plain data.
    let fd = unsafe { *fd };
    let _ = TG_TLS_CONNECTING.remove(&id);
    // SAFETY: offset of `ret` in the sys_exit_connect record (checked by the loader).
    let ret = unsafe { ctx.read_at::<i64>(SYSCALL_ARG0) }.unwrap_or(0);
    if ret < 0 && ret != EINPROGRESS_NEG {
        let key = (id & 0xffff_ffff_0000_0000) | u64::from(fd);
        let _ = TG_TLS_CONNS.remove(&key);
    }
    0
}

/// `sys_enter_{write,writev,sendto,sendmsg}`: the fd of a thread inside an SSL call.
#[tracepoint]
pub fn tg_tls_sys_fd(ctx: TracePointContext) -> u32 {
    // SAFETY: offset of `fd` in these records (checked by the loader).
    let Ok(fd) = (unsafe { ctx.read_at::<u64>(SYSCALL_ARG0) }) else {
        return 0;
    };
    note_call_fd(bpf_get_current_pid_tgid(), fd);
    0
}

/// The fd a thread inside an SSL call uses is the call's socket (the first one, or a captured
/// one seen later: a call can read a file before the socket, e.g. the time zone while checking
/// a certificate).
#[inline(always)]
fn note_call_fd(id: u64, fd: u64) {
    let Some(call) = TG_TLS_ACTIVE.get_ptr_mut(&id) else {
        return;
    };
    let key = (id & 0xffff_ffff_0000_0000) | (fd & 0xffff_ffff);
    // SAFETY: value pointer of a live map entry owned by this thread; a 4-byte field.
    unsafe {
        if (*call).fd < 0 || TG_TLS_CONNS.get_ptr(&key).is_some() {
            (*call).fd = fd as i32;
        }
    }
}

/// `sys_enter_{read,readv,recvfrom,recvmsg}`: as [`tg_tls_sys_fd`], and the thread's receive
/// token: a read on a captured fd arms it (pending until the exit shows bytes), any other read
/// disarms it, so a token always names the socket the thread read last.
#[tracepoint]
pub fn tg_tls_recv_enter(ctx: TracePointContext) -> u32 {
    // SAFETY: offset of `fd` in these records (checked by the loader).
    let Ok(fd) = (unsafe { ctx.read_at::<u64>(SYSCALL_ARG0) }) else {
        return 0;
    };
    let id = bpf_get_current_pid_tgid();
    note_call_fd(id, fd);
    let key = (id & 0xffff_ffff_0000_0000) | (fd & 0xffff_ffff);
    if TG_TLS_CONNS.get_ptr(&key).is_some() {
        // SAFETY: argument-less helper.
        let ts_ns = unsafe { bpf_ktime_get_ns() };
        let t = RecvToken { fd: fd as u32, state: RECV_PENDING, ts_ns };
        let _ = TG_TLS_LAST_RECV.insert(&id, &t, BPF_ANY as u64);
    } else if TG_TLS_LAST_RECV.get_ptr(&id).is_some() {
        let _ = TG_TLS_LAST_RECV.remove(&id);
    }
    0
}

/// `sys_exit_{read,readv,recvfrom,recvmsg}`: a pending token becomes bindable when the read
/// returned bytes (EAGAIN, EOF and errors fed OpenSSL nothing), and is dropped otherwise.
#[tracepoint]
pub fn tg_tls_recv_exit(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let Some(t) = TG_TLS_LAST_RECV.get_ptr_mut(&id) else {
        return 0;
    };
    // SAFETY: value pointer of a live map entry owned by this thread; plain data.
    if unsafe { (*t).state } != RECV_PENDING {
        return 0;
    }
    // SAFETY: offset of `ret` in the sys_exit_* record (checked by the loader).
    let ret = unsafe { ctx.read_at::<i64>(SYSCALL_ARG0) }.unwrap_or(0);
    if ret > 0 {
        // SAFETY: as above; argument-less helper.
        unsafe {
            (*t).state = RECV_READY;
            (*t).ts_ns = bpf_ktime_get_ns();
        }
    } else {
        let _ = TG_TLS_LAST_RECV.remove(&id);
    }
    0
}

/// `sched_process_exec`: a new program runs; wake the library rescan (a full ring means a wake
/// is already pending, so the error is ignored).
#[tracepoint]
pub fn tg_tls_exec(_ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let _ = TG_TLS_EXECS.output::<u32>(&tgid, 0);
    0
}

/// `sys_enter_close`: a captured fd closes: CLOSE event, forget the connection.
#[tracepoint]
pub fn tg_tls_close(ctx: TracePointContext) -> u32 {
    // SAFETY: offset of `fd` in the sys_enter_close record (checked by the loader).
    let Ok(fd) = (unsafe { ctx.read_at::<u64>(SYSCALL_ARG0) }) else {
        return 0;
    };
    let id = bpf_get_current_pid_tgid();
    let key = (id & 0xffff_ffff_0000_0000) | (fd & 0xffff_ffff);
    let Some(conn) = TG_TLS_CONNS.get_ptr(&key) else {
        return 0;
    };
    match TG_TLS_EVENTS.reserve::<TlsEventHeader>(0) {
        Some(mut e) => {
            // SAFETY: `conn` is a live map value; `e` a reservation sized for the header.
            unsafe {
                e.as_mut_ptr().write(TlsEventHeader {
                    record: (*conn).record,
                    ts_ns: bpf_ktime_get_ns(),
                    fd: fd as u32,
                    kind: TLS_EV_CLOSE,
                    ..TlsEventHeader::default()
                });
            }
            e.submit(0);
            add(TlsCounter::Closes, 1);
        }
        None => add(TlsCounter::DropRingFull, 1),
    }
    let _ = TG_TLS_CONNS.remove(&key);
    0
}

#[inline(always)]
fn ssl_enter(ctx: &ProbeContext, direction: u8, ex: bool) -> u32 {
    let ssl: u64 = ctx.arg(0).unwrap_or(0);
    let buf: u64 = ctx.arg(1).unwrap_or(0);
    let len_ptr: u64 = if ex { ctx.arg(3).unwrap_or(0) } else { 0 };
    let id = bpf_get_current_pid_tgid();
    let bound_by_token = bind_at_entry(id, ssl);
    let call = SslCall { ssl, buf, len_ptr, fd: -1, direction, bound_by_token, _pad: [0; 2] };
    let _ = TG_TLS_ACTIVE.insert(&id, &call, BPF_ANY as u64);
    0
}

/// Consume the thread's receive token: the fd it names if bindable now, else -1. Every SSL
/// call's entry consumes it, so only the first SSL call after a receive can bind by it.
#[inline(always)]
fn take_token(id: u64) -> i32 {
    let Some(t) = TG_TLS_LAST_RECV.get_ptr(&id) else {
        return -1;
    };
    // SAFETY: value pointer of a live map entry, plain data, copied before the delete.
    let t: RecvToken = unsafe { *t };
    let _ = TG_TLS_LAST_RECV.remove(&id);
    // SAFETY: argument-less helper.
    let now = unsafe { bpf_ktime_get_ns() };
    match t.bindable_fd(now, TLS_BIND_WINDOW_NS) {
        Some(fd) => fd as i32,
        None => -1,
    }
}

/// `SSL_write(ssl, buf, num)`.
#[uprobe]
pub fn tg_ssl_write(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, TLS_DIR_EGRESS, false)
}

/// `SSL_write_ex(ssl, buf, num, *written)`.
#[uprobe]
pub fn tg_ssl_write_ex(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, TLS_DIR_EGRESS, true)
}

/// `SSL_read(ssl, buf, num)`.
#[uprobe]
pub fn tg_ssl_read(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, TLS_DIR_INGRESS, false)
}

/// `SSL_read_ex(ssl, buf, num, *readbytes)`.
#[uprobe]
pub fn tg_ssl_read_ex(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, TLS_DIR_INGRESS, true)
}

/// `SSL_do_handshake(ssl)`: no data, but its return can bind the `SSL*` to its fd. Nested in
/// another probed call (OpenSSL may call it from `SSL_connect` or internally) it leaves that
/// call's state alone.
#[uprobe]
pub fn tg_ssl_handshake(ctx: ProbeContext) -> u32 {
    let ssl: u64 = ctx.arg(0).unwrap_or(0);
    let id = bpf_get_current_pid_tgid();
    if TG_TLS_ACTIVE.get_ptr(&id).is_some() {
        return 0;
    }
    let bound_by_token = bind_at_entry(id, ssl);
    let call = SslCall {
        ssl,
        buf: 0,
        len_ptr: 0,
        fd: -1,
        direction: TLS_DIR_HANDSHAKE,
        bound_by_token,
        _pad: [0; 2],
    };
    let _ = TG_TLS_ACTIVE.insert(&id, &call, BPF_NOEXIST as u64);
    0
}

/// Return of `SSL_do_handshake`: learn the fd (in-call syscall or receive token), emit nothing.
#[uretprobe]
pub fn tg_ssl_handshake_ret(_ctx: RetProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let Some(p) = TG_TLS_ACTIVE.get_ptr(&id) else {
        return 0;
    };
    // SAFETY: value pointer of a live map entry, plain data, copied out before the delete.
    let call: SslCall = unsafe { *p };
    if call.direction != TLS_DIR_HANDSHAKE {
        return 0;
    }
    let _ = TG_TLS_ACTIVE.remove(&id);
    let _ = call_fd(id, &call);
    0
}

/// `SSL_free(ssl)`: forget the object's fd; the allocator may hand its address to a connection
/// that must not inherit it.
#[uprobe]
pub fn tg_ssl_free(ctx: ProbeContext) -> u32 {
    let ssl: u64 = ctx.arg(0).unwrap_or(0);
    let skey = SslKey { tgid: bpf_get_current_pid_tgid() >> 32, ssl };
    let _ = TG_TLS_SSL_FD.remove(&skey);
    0
}

/// `TG_TLS_SSL_FD` value of an `SSL*` seen in a call but not tied to any fd yet.
const SSL_SEEN_NO_FD: u32 = u32::MAX;

/// At an SSL call's entry: consume the thread's receive token and bind the `SSL*` to it when
/// the object is a memory-BIO one so far (seen before, only in calls without any syscall) and
/// has no fd yet. Returns 1 when it bound.
///
/// Binding at entry, not return: Node.js calls back into JavaScript from inside `SSL_read`
/// when the handshake completes, and the request's `SSL_write` runs nested in it. A fresh
/// object only gets marked seen ([`SSL_SEEN_NO_FD`]): a client's first call writes its
/// ClientHello before anything was received on its socket, so a token then can only be another
/// connection's.
#[inline(always)]
fn bind_at_entry(id: u64, ssl: u64) -> u8 {
    let token = take_token(id);
    let skey = SslKey { tgid: id >> 32, ssl };
    match TG_TLS_SSL_FD.get_ptr(&skey) {
        None => {
            let _ = TG_TLS_SSL_FD.insert(&skey, &SSL_SEEN_NO_FD, BPF_ANY as u64);
            0
        }
        // SAFETY: value pointer of a live map entry, plain data.
        Some(f) if unsafe { *f } == SSL_SEEN_NO_FD && token >= 0 => {
            let _ = TG_TLS_SSL_FD.insert(&skey, &(token as u32), BPF_ANY as u64);
            1
        }
        Some(_) => 0,
    }
}

/// The fd of the call's `SSL*` at its return, updating the binding:
/// * a captured connection's fd used in a syscall inside the call binds (overwriting any
///   binding, the token's included);
/// * another fd used inside the call binds too (a socket-BIO object's own socket, uncaptured,
///   or a file it read first), unless the entry bound by token: a memory-BIO call does no
///   socket I/O, so what it read was a file (the time zone during certificate checks);
/// * otherwise the binding, if it is a real fd (not [`SSL_SEEN_NO_FD`]).
///
/// Out of line: its paths join at the return, so the verifier walks the data return's chunk
/// loop once per length path rather than once per binding path.
#[inline(never)]
fn call_fd(id: u64, call: &SslCall) -> Option<u32> {
    let skey = SslKey { tgid: id >> 32, ssl: call.ssl };
    if call.fd >= 0 {
        let fd = call.fd as u32;
        let key = (id & 0xffff_ffff_0000_0000) | u64::from(fd);
        if call.bound_by_token == 0 || TG_TLS_CONNS.get_ptr(&key).is_some() {
            let _ = TG_TLS_SSL_FD.insert(&skey, &fd, BPF_ANY as u64);
            return Some(fd);
        }
    }
    match TG_TLS_SSL_FD.get_ptr(&skey) {
        // SAFETY: value pointer of a live map entry, plain data.
        Some(f) if unsafe { *f } != SSL_SEEN_NO_FD => Some(unsafe { *f }),
        _ => None,
    }
}

/// Return of any of the four: emit the bytes the call moved, if its connection is captured.
#[uretprobe]
pub fn tg_ssl_ret(ctx: RetProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let Some(p) = TG_TLS_ACTIVE.get_ptr(&id) else {
        return 0;
    };
    // SAFETY: value pointer of a live map entry, plain data, copied out before the delete.
    let call: SslCall = unsafe { *p };
    if call.direction == TLS_DIR_HANDSHAKE {
        // A handshake's entry without its return (cannot nest inside a data call, see
        // `tg_ssl_handshake`): stale, and this return is not its.
        let _ = TG_TLS_ACTIVE.remove(&id);
        return 0;
    }
    let _ = TG_TLS_ACTIVE.remove(&id);
    // Bind first, whatever the call returned: a memory-BIO `SSL_read` returning WANT_READ
    // during the handshake is how Node.js's `SSL*` finds its fd before its first write.
    let fd = call_fd(id, &call);

    let ret: i64 = i64::from(ctx.ret::<i32>());
    let len: u64 = if call.len_ptr != 0 {
        if ret != 1 {
            return 0;
        }
        // SAFETY: user pointer the library wrote the count to; the helper faults safely.
        match unsafe { bpf_probe_read_user(call.len_ptr as *const u64) } {
            Ok(n) => n,
            Err(_) => return 0,
        }
    } else if ret > 0 {
        ret as u64
    } else {
        return 0;
    };

    let Some(fd) = fd else {
        // Counted for every process (telling captured processes apart would need a per-tgid
        // index): data on an `SSL*` whose fd is unknown.
        add(TlsCounter::DropNoFd, 1);
        return 0;
    };
    let key = (id & 0xffff_ffff_0000_0000) | u64::from(fd);
    let Some(conn) = TG_TLS_CONNS.get_ptr_mut(&key) else {
        add(TlsCounter::NotCaptured, 1);
        return 0;
    };
    emit(conn, call.buf, len, fd, call.direction);
    0
}

/// Split `len` bytes at `buf` into [`TLS_CHUNK`] events, up to the per-call cap. Lost bytes
/// (cap, full ring, unreadable memory) mark the direction so its next event reports the gap.
#[inline(always)]
fn emit(conn: *mut TlsConn, buf: u64, len: u64, fd: u32, direction: u8) {
    // SAFETY: a global only the loader writes (before load); volatile so the compiler does not
    // fold the default in.
    let cap = u64::from(unsafe { core::ptr::read_volatile(core::ptr::addr_of!(TG_TLS_MAX_CALL_BYTES)) });
    let take = if len > cap { cap } else { len };
    let dir = (direction & 1) as usize;
    // SAFETY: argument-less helper.
    let now = unsafe { bpf_ktime_get_ns() };
    // The chunk offset derives from the loop counter alone, and every path through the body
    // leaves the same registers live at the loop head, so the verifier prunes each iteration
    // down to one state: verification cost is linear in TLS_MAX_CALL_CHUNKS and independent of
    // the configured cap (which it cannot see, see TG_TLS_MAX_CALL_BYTES).
    let mut i = 0u32;
    while i < TLS_MAX_CALL_CHUNKS {
        let off = u64::from(i) * TLS_CHUNK as u64;
        if off >= take {
            break;
        }
        let rem = take - off;
        // Two shapes the verifier can bound: a full chunk (a constant) or the last, shorter one
        // (masked, which is a no-op since it is below TLS_CHUNK).
        let n: u32 = if rem >= TLS_CHUNK as u64 { TLS_CHUNK as u32 } else { (rem as u32) & (TLS_CHUNK as u32 - 1) };
        match TG_TLS_EVENTS.reserve::<TlsEvent>(0) {
            None => {
                add(TlsCounter::DropRingFull, 1);
                // SAFETY: live map value; one byte.
                unsafe { (*conn).gap[dir] = 1 };
            }
            Some(mut e) => {
                let ev: *mut TlsEvent = e.as_mut_ptr();
                // SAFETY: `ev` is a reservation of size_of::<TlsEvent>(); `n <= TLS_CHUNK` bytes
                // go to its data area; the source is user memory the helper reads fault-safely.
                let rc = unsafe {
                    generated::bpf_probe_read_user(
                        core::ptr::addr_of_mut!((*ev).data).cast(),
                        n,
                        (buf.wrapping_add(off)) as *const core::ffi::c_void,
                    )
                };
                if rc != 0 {
                    e.discard(0);
                    add(TlsCounter::DropReadFailed, 1);
                    // SAFETY: live map value; one byte.
                    unsafe { (*conn).gap[dir] = 1 };
                } else {
                    // SAFETY: `conn` is a live map value (RCU-protected for this run); header
                    // write into the reservation. `gap` is 0 or 1 = TLS_FLAG_GAP_BEFORE; the other
                    // direction's pending mark is reported, not cleared (its own next event
                    // still reports it as GAP_BEFORE).
                    unsafe {
                        let other = if (*conn).gap[dir ^ 1] != 0 { TLS_FLAG_GAP_OTHER } else { 0 };
                        let gap = ((*conn).gap[dir] & TLS_FLAG_GAP_BEFORE) | other;
                        (*conn).gap[dir] = 0;
                        core::ptr::addr_of_mut!((*ev).header).write(TlsEventHeader {
                            record: (*conn).record,
                            ts_ns: now,
                            fd,
                            len: n,
                            call_len: len as u32,
                            offset: off as u32,
                            kind: TLS_EV_DATA,
                            direction,
                            flags: gap,
                            _pad: 0,
                            _pad2: 0,
                        });
                    }
                    e.submit(0);
                    add(TlsCounter::Events, 1);
                    add(TlsCounter::Bytes, u64::from(n));
                }
            }
        }
        i += 1;
    }
    if len > take {
        add(TlsCounter::DropPerCallCap, 1);
        // SAFETY: live map value; one byte.
        unsafe { (*conn).gap[dir] = 1 };
    }
}
