//! tollgate's kernel side.
//!
//! * `tg_connect4` / `tg_connect6` (`cgroup/connect4`, `cgroup/connect6`): decide whether a TCP
//!   `connect()` is in scope and matches a capture rule; if so, remember who made it and where it
//!   was going (keyed by socket cookie) and rewrite the destination to the local proxy.
//! * `tg_sockops` (`sockops`): at `BPF_SOCK_OPS_TCP_CONNECT_CB` the local port is bound but no
//!   SYN has left yet, so the record is moved from the cookie key to the 4-tuple key the proxy
//!   sees on `accept()` before the proxy can possibly accept the connection.
//!
//! * `tls` (uprobes on OpenSSL, syscall tracepoints): plaintext of captured TLS connections into
//!   a ring buffer, see that module.
//!
//! Policy lives in maps written by userspace (`gateway-common` is the contract); nothing here is
//! compiled in except safe map-size defaults, which the loader overrides from config.
#![no_std]
#![no_main]
// Map keys/values are passed by reference on purpose: by value they would be copied into yet
// another stack slot of the 512-byte BPF stack before the helper call.
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, BPF_ANY, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
        },
    },
    macros::{cgroup_sock_addr, map, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::debug;

mod tls;
use gateway_common::{
    CaptureRecord, Cidr4Key, Cidr6Key, Counter, FlowKey, RuntimeConfig, AF_INET, AF_INET6, COUNTER_SLOTS,
    FLAG_FAIL_CLOSED, FLAG_POD_V4, FLAG_POD_V6, FLAG_SCOPE_ALL, FLAG_UPROBES, MAX_CGROUP_DEPTH, RECORD_REKEYED,
    SCOPE_EXCLUDE,
};

/// `SOCK_STREAM`.
const SOCK_STREAM: u32 = 1;
/// `IPPROTO_TCP`.
const IPPROTO_TCP: u32 = 6;
/// Return value of a cgroup sock_addr program that lets the call proceed.
const ALLOW: i32 = 1;
/// Return value that makes `connect()` fail with `EPERM`.
const REJECT: i32 = 0;

// Defaults only; the loader sizes every map from config with `EbpfLoader::set_max_entries`.
const DEFAULT_MAX_RECORDS: u32 = 65_536;
const DEFAULT_MAX_RULES: u32 = 4_096;
const DEFAULT_MAX_SCOPE: u32 = 1_024;

#[map]
static TG_CONFIG: Array<RuntimeConfig> = Array::with_max_entries(1, 0);
#[map]
static TG_HEARTBEAT: Array<u64> = Array::with_max_entries(1, 0);
#[map]
static TG_PORT_RULES: HashMap<u16, u8> = HashMap::with_max_entries(DEFAULT_MAX_RULES, 0);
#[map]
static TG_CIDR4_RULES: LpmTrie<Cidr4Key, u8> = LpmTrie::with_max_entries(DEFAULT_MAX_RULES, 0);
#[map]
static TG_CIDR6_RULES: LpmTrie<Cidr6Key, u8> = LpmTrie::with_max_entries(DEFAULT_MAX_RULES, 0);
#[map]
static TG_SCOPE: HashMap<u64, u8> = HashMap::with_max_entries(DEFAULT_MAX_SCOPE, 0);
// Plain hash maps, not LRU: an LRU map makes room for a new connect by evicting the record of
// another connection still waiting in the proxy's accept queue, which the proxy then has to
// close. A full plain map refuses the insert and the new connect goes direct instead. The cookie
// entry is the connection's slot until the proxy takes the record or the socket closes; the flow
// entry always has a slot behind it, so the flow map can never fill before the cookie map.
#[map]
static TG_BY_COOKIE: HashMap<u64, CaptureRecord> = HashMap::with_max_entries(DEFAULT_MAX_RECORDS, 0);
#[map]
static TG_BY_FLOW: HashMap<FlowKey, CaptureRecord> = HashMap::with_max_entries(DEFAULT_MAX_RECORDS, 0);
#[map]
static TG_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[inline(always)]
fn count(c: Counter) {
    if let Some(p) = TG_COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: `p` points at this CPU's slot of a per-CPU array value, valid for the whole
        // program run; per-CPU storage means no other CPU writes it concurrently.
        unsafe { *p += 1 };
    }
}

/// The original destination of a connect, in the families' key formats.
#[derive(Clone, Copy)]
enum Dest {
    V4 { addr: [u8; 4], port: u16 },
    V6 { addr: [u8; 16], port: u16 },
}

/// `connect()` on an IPv4 socket: redirect captured TCP destinations to the proxy.
#[cgroup_sock_addr(connect4)]
pub fn tg_connect4(ctx: SockAddrContext) -> i32 {
    connect(&ctx, false)
}

/// `connect()` on an IPv6 socket (including IPv4-mapped destinations on dual-stack sockets).
#[cgroup_sock_addr(connect6)]
pub fn tg_connect6(ctx: SockAddrContext) -> i32 {
    connect(&ctx, true)
}

#[inline(always)]
fn connect(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sa` is the program context handed in by the kernel; the verifier checks every
    // field access against `bpf_sock_addr` and rewrites it to the real socket fields.
    let (ty, proto) = unsafe { ((*sa).type_, (*sa).protocol) };
    // Only plain TCP: connected UDP has no accept() to hand the record to, and SCTP/MPTCP would
    // not be re-keyed by sock_ops on the socket that connect() ran on.
    if ty != SOCK_STREAM || proto != IPPROTO_TCP {
        count(Counter::SkipNotTcp);
        return ALLOW;
    }
    count(Counter::Seen);

    let Some(cfg_ptr) = TG_CONFIG.get_ptr(0) else {
        return ALLOW;
    };
    // SAFETY: array lookups at index 0 of a 1-entry array return a pointer to the value that
    // stays valid for the whole program run; the value is plain data (any bit pattern valid).
    // Borrowed, not copied: the stack budget is 512 bytes.
    let cfg: &RuntimeConfig = unsafe { &*cfg_ptr };

    // Loop safety. The tgid check catches every socket of tollgate's own process (upstream
    // connections, DNS over TCP, OTLP export) without any cooperation from the code that opens
    // them. It is not sufficient on its own: `bpf_get_current_pid_tgid()` reports the tgid in the
    // initial pid namespace, while tollgate learns its own pid with getpid(), which differs when
    // it runs in a container's pid namespace; and helper processes tollgate spawns have another
    // tgid. The SO_MARK tollgate sets on its upstream sockets survives both (and a helper can
    // set it too), so either match means "never redirect".
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: `sk` in a sock_addr context is a non-null PTR_TO_SOCKET; the verifier allows a
    // 4-byte read of `bpf_sock.mark` and rewrites it to `sk->sk_mark`.
    let mark = unsafe { (*(*sa).__bindgen_anon_1.sk).mark };
    if tgid == cfg.self_tgid || (cfg.self_mark != 0 && mark == cfg.self_mark) {
        count(Counter::SkipSelf);
        return ALLOW;
    }

    if !in_scope(cfg.flags & FLAG_SCOPE_ALL != 0) {
        count(Counter::SkipScope);
        return ALLOW;
    }

    // SAFETY: context field reads, checked by the verifier as above. `user_port` carries the
    // port in network order in its low 16 bits.
    let port = u16::from_be(unsafe { (*sa).user_port } as u16);
    let dest = if v6 {
        // SAFETY: as above; `user_ip6` is readable in 4-byte words.
        let w = unsafe { (*sa).user_ip6 };
        let addr = words_to_bytes(w);
        if is_v4_mapped(&addr) {
            // A dual-stack socket (Java does this by default) connecting to an IPv4 address.
            // The kernel runs only connect6 for it, so match the IPv4 rules here and rewrite to
            // the IPv4 proxy in mapped form; sock_ops reports it as an IPv4 flow.
            Dest::V4 { addr: [addr[12], addr[13], addr[14], addr[15]], port }
        } else {
            Dest::V6 { addr, port }
        }
    } else {
        // SAFETY: as above.
        let w = unsafe { (*sa).user_ip4 };
        Dest::V4 { addr: w.to_ne_bytes(), port }
    };

    if !rule_matches(&dest) {
        count(Counter::SkipNoRule);
        return ALLOW;
    }

    // SAFETY: `ctx` is a sock_addr context, for which bpf_get_netns_cookie is available and
    // returns the cookie of the socket's netns.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let host = netns_cookie == cfg.host_netns_cookie;
    // A pod's loopback is its own: the proxy would dial the node's loopback instead, reaching
    // node-only services with the node's identity. Leave such connects alone.
    if !host && is_loopback(&dest) {
        count(Counter::SkipPodLoopback);
        return ALLOW;
    }
    let (proxy4, proxy6) = match dest {
        Dest::V4 { .. } if host => (cfg.proxy_v4, [0u8; 16]),
        Dest::V4 { .. } if cfg.flags & FLAG_POD_V4 != 0 => (cfg.pod_proxy_v4, [0u8; 16]),
        // `listen.ipv6: null` leaves proxy_v6 unspecified: IPv6 capture is off, so no rule
        // applies (rewriting to `::` would connect the caller to whatever listens locally).
        Dest::V6 { .. } if host && is_zero16(&cfg.proxy_v6) => {
            count(Counter::SkipNoRule);
            return ALLOW;
        }
        Dest::V6 { .. } if host => ([0u8; 4], cfg.proxy_v6),
        Dest::V6 { .. } if cfg.flags & FLAG_POD_V6 != 0 => ([0u8; 4], cfg.pod_proxy_v6),
        _ => {
            count(Counter::SkipNoPodAddress);
            return ALLOW;
        }
    };

    // SAFETY: argument-less helper reading CLOCK_MONOTONIC; always available.
    let now = unsafe { bpf_ktime_get_ns() };
    let beat = match TG_HEARTBEAT.get_ptr(0) {
        // SAFETY: valid pointer into a 1-entry array of u64 (see TG_CONFIG above).
        Some(p) => unsafe { *p },
        None => 0,
    };
    if now.wrapping_sub(beat) > cfg.heartbeat_timeout_ns {
        if cfg.flags & FLAG_FAIL_CLOSED != 0 {
            count(Counter::RejectProxyDown);
            return REJECT;
        }
        count(Counter::SkipProxyDown);
        return ALLOW;
    }

    // SAFETY: `ctx` is a socket context, for which bpf_get_socket_cookie returns the cookie of
    // the socket being connected (allocating it on first use).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let uid_gid = bpf_get_current_uid_gid();
    let (family, orig_dst_addr, orig_dst_port) = match dest {
        Dest::V4 { addr, port } => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&addr);
            (AF_INET, a, port)
        }
        Dest::V6 { addr, port } => (AF_INET6, addr, port),
    };
    let rec = CaptureRecord {
        orig_dst_addr,
        orig_dst_port,
        family,
        tgid,
        pid: bpf_get_current_pid_tgid() as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        flags: 0,
        comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
        // SAFETY: helper without arguments, available to cgroup sock_addr programs.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        netns_cookie,
        captured_at_ns: now,
        cookie,
    };
    // BPF_ANY: a socket connecting again after a failed connect reuses its own slot. A full map
    // (E2BIG) refuses only new keys: this connect goes direct, every held record stays.
    if TG_BY_COOKIE.insert(&cookie, &rec, BPF_ANY as u64).is_err() {
        count(Counter::SkipMapFull);
        return ALLOW;
    }
    if cfg.flags & FLAG_UPROBES != 0 {
        tls::on_captured_connect(&rec);
    }

    let proxy_port_be = u32::from(cfg.proxy_port.to_be());
    // SAFETY: writes to `user_ip4`/`user_ip6` (4-byte words) and `user_port` are permitted for
    // connect4/connect6 programs; the kernel then connects to the rewritten address.
    unsafe {
        match dest {
            Dest::V4 { .. } if v6 => {
                // ::ffff:a.b.c.d — keeps the dual-stack socket on its IPv4-mapped path.
                (*sa).user_ip6[0] = 0;
                (*sa).user_ip6[1] = 0;
                (*sa).user_ip6[2] = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
                (*sa).user_ip6[3] = u32::from_ne_bytes(proxy4);
            }
            Dest::V4 { .. } => (*sa).user_ip4 = u32::from_ne_bytes(proxy4),
            Dest::V6 { .. } => {
                let w = bytes_to_words(proxy6);
                (*sa).user_ip6[0] = w[0];
                (*sa).user_ip6[1] = w[1];
                (*sa).user_ip6[2] = w[2];
                (*sa).user_ip6[3] = w[3];
            }
        }
        (*sa).user_port = proxy_port_be;
    }
    count(Counter::Redirected);
    log_redirect(ctx, tgid, orig_dst_port);
    ALLOW
}

/// Kept out of line: the log record is assembled on the stack and would push `connect` over
/// the 512-byte BPF stack limit if inlined.
#[inline(never)]
fn log_redirect(ctx: &SockAddrContext, tgid: u32, port: u16) {
    debug!(ctx, "redirected connect of tgid {} to port {}", tgid, port);
}

/// Is the calling task in scope? Walks every ancestor: an [`SCOPE_EXCLUDE`] entry at any depth
/// wins (a pod opted out below an included `kubepods` tree), otherwise an [`SCOPE_INCLUDE`]
/// entry, otherwise `scope_all` decides.
///
/// Out of line (a BPF subprogram with its own frame) so the 16 unrolled lookups do not each
/// claim a slot in the connect programs' 512-byte stack.
#[inline(never)]
fn in_scope(scope_all: bool) -> bool {
    let mut included = scope_all;
    let mut level = 0u32;
    while level < MAX_CGROUP_DEPTH {
        // SAFETY: helper taking a plain integer; returns 0 when `level` is deeper than the
        // task's cgroup, which ends the walk.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            break;
        }
        // SAFETY: the pointer is only dereferenced for a one-byte read while the entry exists;
        // a concurrent delete leaves the old value readable (hash maps free under RCU).
        if let Some(v) = TG_SCOPE.get_ptr(&id).map(|p| unsafe { *p }) {
            if v == SCOPE_EXCLUDE {
                return false;
            }
            included = true;
        }
        level += 1;
    }
    included
}

/// Port rule, then the port-specific CIDR entry, then the any-port CIDR entry. Out of line for
/// the same stack reason as [`in_scope`].
#[inline(never)]
fn rule_matches(dest: &Dest) -> bool {
    let dest = *dest;
    let port = match dest {
        Dest::V4 { port, .. } | Dest::V6 { port, .. } => port,
    };
    if TG_PORT_RULES.get_ptr(&port).is_some() {
        return true;
    }
    match dest {
        Dest::V4 { addr, port } => {
            let full = 16 + 32;
            TG_CIDR4_RULES.get(Key::new(full, Cidr4Key { port_be: port.to_be_bytes(), addr })).is_some()
                || TG_CIDR4_RULES.get(Key::new(full, Cidr4Key { port_be: [0, 0], addr })).is_some()
        }
        Dest::V6 { addr, port } => {
            let full = 16 + 128;
            TG_CIDR6_RULES.get(Key::new(full, Cidr6Key { port_be: port.to_be_bytes(), addr })).is_some()
                || TG_CIDR6_RULES.get(Key::new(full, Cidr6Key { port_be: [0, 0], addr })).is_some()
        }
    }
}

#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&w[0].to_ne_bytes());
    b[4..8].copy_from_slice(&w[1].to_ne_bytes());
    b[8..12].copy_from_slice(&w[2].to_ne_bytes());
    b[12..16].copy_from_slice(&w[3].to_ne_bytes());
    b
}

#[inline(always)]
fn bytes_to_words(b: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// Word-wise, so no `memcmp` call is emitted (BPF has no libc).
#[inline(always)]
fn is_zero16(a: &[u8; 16]) -> bool {
    let w = bytes_to_words(*a);
    (w[0] | w[1] | w[2] | w[3]) == 0
}

#[inline(always)]
fn is_loopback(d: &Dest) -> bool {
    match d {
        Dest::V4 { addr, .. } => addr[0] == 127,
        Dest::V6 { addr, .. } => {
            let w = bytes_to_words(*addr);
            (w[0] | w[1] | w[2]) == 0 && w[3] == u32::from_ne_bytes([0, 0, 0, 1])
        }
    }
}

#[inline(always)]
fn is_v4_mapped(a: &[u8; 16]) -> bool {
    let w = bytes_to_words(*a);
    (w[0] | w[1]) == 0 && w[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// TCP socket events: `TCP_CONNECT_CB` re-keys records by 4-tuple; `STATE_CB` (enabled only
/// on captured sockets) drops a record the proxy never took once its socket closes, so a
/// connect that failed or was never accepted cannot lend its identity to a later flow that
/// reuses the 4-tuple.
#[sock_ops]
pub fn tg_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        rekey(&ctx);
    } else if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE {
        let key = flow_key(&ctx);
        if TG_BY_FLOW.remove(&key).is_ok() {
            count(Counter::ExpiredOnClose);
        }
        // The slot, whether or not the proxy took the record (a take removes it too).
        // SAFETY: sock_ops contexts support bpf_get_socket_cookie.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = TG_BY_COOKIE.remove(&cookie);
    }
    // The return value of sock_ops is only consulted for ops that ask for a reply.
    1
}

/// Move the connect-time record from the cookie key to the 4-tuple the proxy will see.
#[inline(always)]
fn rekey(ctx: &SockOpsContext) {
    // SAFETY: sock_ops contexts support bpf_get_socket_cookie (the same cookie connect4/6 saw).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(p) = TG_BY_COOKIE.get_ptr_mut(&cookie) else {
        return;
    };
    // SAFETY: non-null value pointer from a map lookup, plain data, copied out immediately.
    let mut rec: CaptureRecord = unsafe { *p };
    rec.flags |= RECORD_REKEYED;

    let key = flow_key(ctx);
    if TG_BY_FLOW.insert(&key, &rec, BPF_ANY as u64).is_err() {
        // Cannot happen while every flow entry has a cookie slot; drop the slot so it does
        // not leak (the proxy closes this one connection, which has no record).
        let _ = TG_BY_COOKIE.remove(&cookie);
        count(Counter::RecordFailed);
        return;
    }
    // Keep the cookie entry as the connection's slot, marked so userspace does not reap it;
    // the proxy's take or the close callback removes it.
    // SAFETY: `p` still points at the live map value (hash values are freed under RCU, and
    // this program runs inside an RCU read section); a 4-byte field write.
    unsafe { (*p).flags |= RECORD_REKEYED };
    // Ask for state callbacks on this socket only, to clean up if the proxy never takes it.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    count(Counter::Rekeyed);
}

/// The connection as the proxy sees it: local side = agent, remote side = proxy.
#[inline(always)]
fn flow_key(ctx: &SockOpsContext) -> FlowKey {
    let ops = ctx.ops;
    // Every context field is read with one volatile 4-byte load at a constant offset: the
    // verifier rejects loads through a ctx pointer LLVM has offset (which it does when it fuses
    // a field read into a byte-wise copy).
    let rd = |p: *const u32| -> u32 {
        // SAFETY: `p` points at a 4-byte field of the live sock_ops context; reads of these
        // fields are allowed for sock_ops programs.
        unsafe { core::ptr::read_volatile(p) }
    };
    // SAFETY (all `addr_of!` below): field addresses of the context, not dereferenced here.
    let (family, rport, lport, rip4, lip4) = unsafe {
        (
            rd(core::ptr::addr_of!((*ops).family)),
            rd(core::ptr::addr_of!((*ops).remote_port)),
            rd(core::ptr::addr_of!((*ops).local_port)),
            rd(core::ptr::addr_of!((*ops).remote_ip4)),
            rd(core::ptr::addr_of!((*ops).local_ip4)),
        )
    };
    // SAFETY: as above.
    let rip6 = unsafe {
        [
            rd(core::ptr::addr_of!((*ops).remote_ip6[0])),
            rd(core::ptr::addr_of!((*ops).remote_ip6[1])),
            rd(core::ptr::addr_of!((*ops).remote_ip6[2])),
            rd(core::ptr::addr_of!((*ops).remote_ip6[3])),
        ]
    };
    // `remote_port` holds the network-order port in a u32: in the upper half on current kernels
    // (little-endian), in the lower half on old ones. `local_port` is host order.
    let rp = if rport >> 16 != 0 { rport >> 16 } else { rport };
    let mut key = FlowKey { src_port: lport as u16, dst_port: u16::from_be(rp as u16), ..FlowKey::default() };
    let remote6 = words_to_bytes(rip6);
    if family == u32::from(AF_INET) || is_v4_mapped(&remote6) {
        // For IPv4-mapped flows on an AF_INET6 socket the IPv4 fields are the valid ones at
        // connect time (the v6 source is only filled in after tcp_v4_connect returns).
        key.family = AF_INET;
        key.src_addr[..4].copy_from_slice(&lip4.to_ne_bytes());
        key.dst_addr[..4].copy_from_slice(&rip4.to_ne_bytes());
    } else {
        // SAFETY: as above.
        let lip6 = unsafe {
            [
                rd(core::ptr::addr_of!((*ops).local_ip6[0])),
                rd(core::ptr::addr_of!((*ops).local_ip6[1])),
                rd(core::ptr::addr_of!((*ops).local_ip6[2])),
                rd(core::ptr::addr_of!((*ops).local_ip6[3])),
            ]
        };
        key.family = AF_INET6;
        key.src_addr = words_to_bytes(lip6);
        key.dst_addr = remote6;
    }
    key
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Dual licensed (see Cargo.toml); the kernel gets the GPL side.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
