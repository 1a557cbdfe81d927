//! End-to-end check of the kernel capture on the real kernel. Needs root, a kernel with BTF and
//! cgroup2 support, python3, and the eBPF object embedded:
//!
//! ```sh
//! (cd ebpf && cargo +nightly build --release)
//! sudo cargo test -p tollgate --test capture_smoke -- --ignored --nocapture --test-threads 1
//! ```
//!
//! It creates its own cgroup2 directory (`tollgate-smoke-<pid>` under the cgroup2 mount, mounting
//! one if the host has none), attaches there, and only uses loopback addresses. Child processes
//! move themselves into the scope or out-of-scope cgroup before connecting, so what is checked
//! is the kernel's decision for a real `connect()`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gateway_common::{Counter, AF_INET, AF_INET6, COUNTER_SLOTS};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tollgate::capture::{cgroup, loader, Capture, CaptureRecord, FlowTable};
use tollgate::config::{Config, DestinationRule, HostRule};

/// A child that optionally moves itself into a cgroup, optionally sets SO_MARK, connects, and
/// prints what the server it reached said, its pid and its local port (or EPERM).
const CHILD: &str = r#"
import os, socket, sys
cg, fam, host, port, mark = sys.argv[1:6]
if cg != '-':
    with open(cg, 'w') as f:
        f.write(str(os.getpid()))
s = socket.socket(socket.AF_INET6 if fam == '6' else socket.AF_INET, socket.SOCK_STREAM)
if int(mark):
    s.setsockopt(socket.SOL_SOCKET, 36, int(mark))
s.settimeout(5)
try:
    s.connect((host, int(port)))
except PermissionError:
    print('EPERM', os.getpid(), 0)
    sys.exit(0)
except OSError as e:
    print('ERR', os.getpid(), 0, e)
    sys.exit(0)
print(s.recv(64).decode().strip(), os.getpid(), s.getsockname()[1])
"#;

/// Removes the test cgroups (children have exited, so they are empty) and moves this process
/// back to its original cgroup, even when an assertion fails.
struct CgroupGuard {
    dir: PathBuf,
    home: PathBuf,
    /// Fail-closed pins survive a panic by design; remove them here.
    bpffs_dir: PathBuf,
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if cgroup::is_bpffs(&self.bpffs_dir) {
            let _ = loader::remove_stale_pins(&self.bpffs_dir);
            let _ = std::fs::remove_dir(&self.bpffs_dir);
        }
        let _ = std::fs::write(self.home.join("cgroup.procs"), std::process::id().to_string());
        for sub in ["scope/deeper", "scope", "out", "self"] {
            let _ = std::fs::remove_dir(self.dir.join(sub));
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// What the fake proxy saw for one accepted connection.
#[derive(Debug)]
struct Accepted {
    peer: SocketAddr,
    local: SocketAddr,
    record: Option<CaptureRecord>,
    second_take: Option<CaptureRecord>,
}

struct Env {
    python: String,
    dir: PathBuf,
    target_port: u16,
    other_port: u16,
}

#[derive(Debug, PartialEq)]
struct ChildOutcome {
    reached: String,
    pid: u32,
    local_port: u16,
}

async fn run_child(env: &Env, cgroup: Option<&str>, fam: &str, host: &str, port: u16, mark: u32) -> ChildOutcome {
    run_child_wrapped(env, &[], cgroup, fam, host, port, mark).await
}

/// `wrapper` runs before python (e.g. `unshare -n` for a fresh netns).
async fn run_child_wrapped(
    env: &Env,
    wrapper: &[&str],
    cgroup: Option<&str>,
    fam: &str,
    host: &str,
    port: u16,
    mark: u32,
) -> ChildOutcome {
    let cg = match cgroup {
        Some(sub) => env.dir.join(sub).join("cgroup.procs").display().to_string(),
        None => "-".to_owned(),
    };
    let mut argv: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
    argv.push(env.python.clone());
    argv.extend(["-c", CHILD, &cg, fam, host, &port.to_string(), &mark.to_string()].map(String::from));
    let out = tokio::process::Command::new(&argv[0]).args(&argv[1..]).output().await.expect("spawn child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    let mut it = stdout.split_whitespace();
    ChildOutcome {
        reached: it.next().unwrap_or_default().to_owned(),
        pid: it.next().and_then(|p| p.parse().ok()).unwrap_or(0),
        local_port: it.next().and_then(|p| p.parse().ok()).unwrap_or(0),
    }
}

/// The capture the fake proxy asks for records; swappable so the test can shut one capture
/// down (which needs ownership) and start another behind the same listeners.
type Slot = Arc<std::sync::Mutex<Option<Arc<Capture>>>>;

/// Forget connections the proxy listeners accepted from probes that were still redirected.
fn drain(rx: &mut mpsc::UnboundedReceiver<Accepted>) {
    while rx.try_recv().is_ok() {}
}

/// Connect from the in-scope cgroup until the kernel's answer is `want` (at most 6 s: the 2 s
/// heartbeat timeout and margin), instead of sleeping past the timeout; the last outcome.
async fn probe_until(env: &Env, want: &str, rx: &mut mpsc::UnboundedReceiver<Accepted>) -> ChildOutcome {
    let deadline = std::time::Instant::now() + Duration::from_secs(6);
    loop {
        let out = run_child(env, Some("scope"), "4", "127.0.0.2", env.target_port, 0).await;
        drain(rx);
        if out.reached == want || std::time::Instant::now() > deadline {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Listeners answering with a fixed word, so a child can tell whom it reached.
async fn serve(listener: TcpListener, word: &'static str, capture: Option<(Slot, mpsc::UnboundedSender<Accepted>)>) {
    loop {
        let Ok((mut s, peer)) = listener.accept().await else { return };
        let local = s.local_addr().expect("local addr");
        if let Some((slot, tx)) = &capture {
            let cap = slot.lock().unwrap().clone();
            if let Some(cap) = cap {
                let record = cap.take(peer, local);
                let second_take = cap.take(peer, local);
                let _ = tx.send(Accepted { peer, local, record, second_take });
            }
        }
        let _ = s.write_all(format!("{word}\n").as_bytes()).await;
    }
}

fn take_slot(slot: &Slot) -> Capture {
    let cap = slot.lock().unwrap().take().expect("capture in slot");
    Arc::try_unwrap(cap).unwrap_or_else(|_| panic!("capture still shared"))
}

fn delta(before: &[u64; COUNTER_SLOTS as usize], after: &[u64; COUNTER_SLOTS as usize]) -> Vec<(&'static str, u64)> {
    Counter::ALL
        .iter()
        .map(|c| (c.label(), after[*c as usize] - before[*c as usize]))
        .filter(|(_, d)| *d != 0)
        .collect()
}

fn orig(rec: &CaptureRecord) -> SocketAddr {
    tollgate::capture::identity::orig_dst(rec)
}

fn comm(rec: &CaptureRecord) -> String {
    let end = rec.comm.iter().position(|b| *b == 0).unwrap_or(rec.comm.len());
    String::from_utf8_lossy(&rec.comm[..end]).into_owned()
}

fn ino(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).expect("stat cgroup").ino()
}

/// Two listeners (127.0.0.1 and ::1) on one free port: the proxy.
async fn bind_pair(v4: &str, v6: &str) -> (TcpListener, TcpListener, u16) {
    for _ in 0..50 {
        let a = TcpListener::bind((v4, 0)).await.expect("bind v4");
        let port = a.local_addr().expect("addr").port();
        if let Ok(b) = TcpListener::bind((v6, port)).await {
            return (a, b, port);
        }
    }
    panic!("no port free on both {v4} and {v6}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, BPF and the built eBPF object"]
async fn capture_redirects_scoped_connects() {
    assert!(nix::unistd::geteuid().is_root(), "run as root");
    // RUST_LOG=debug shows the kernel's aya-log records (forwarded through `log` into tracing).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let python = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3");
    let python = String::from_utf8_lossy(&python.stdout).trim().to_owned();
    let expected_comm: String = Path::new(&python).file_name().unwrap().to_string_lossy().chars().take(15).collect();

    // A dedicated cgroup subtree: <mount>/tollgate-smoke-<pid>/{scope/deeper,out,self}.
    let mount = cgroup::ensure_cgroup_root(None).expect("cgroup2 mount");
    let self_cg = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    let home_rel =
        self_cg.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/").trim_start_matches('/').to_owned();
    let dir = mount.join(format!("tollgate-smoke-{}", std::process::id()));
    let bpffs_dir = PathBuf::from(format!("/sys/fs/bpf/tollgate-smoke-{}", std::process::id()));
    let guard = CgroupGuard { dir: dir.clone(), home: mount.join(home_rel), bpffs_dir: bpffs_dir.clone() };
    for sub in ["scope/deeper", "out", "self"] {
        std::fs::create_dir_all(dir.join(sub)).expect("mkdir test cgroup");
    }

    // Real servers on the original destinations (reached only when not redirected).
    let (t4, t6, target_port) = bind_pair("127.0.0.2", "::1").await;
    let other = TcpListener::bind(("127.0.0.2", 0)).await.expect("bind other");
    let other_port = other.local_addr().unwrap().port();
    let (p4, p6, proxy_port) = bind_pair("127.0.0.1", "::1").await;

    let mut cfg = Config::default();
    cfg.listen.port = proxy_port;
    cfg.capture.cgroup_root = Some(dir.clone());
    cfg.capture.scope = vec!["/scope".to_owned()];
    cfg.capture.destinations = vec![
        DestinationRule { cidr: "127.0.0.2/32".parse().unwrap(), port: Some(target_port) },
        DestinationRule { cidr: "::1/128".parse().unwrap(), port: Some(target_port) },
    ];
    cfg.capture.heartbeat_timeout = Duration::from_secs(2);
    cfg.capture.bpffs_dir = bpffs_dir;

    let capture = Arc::new(Capture::start(&cfg).await.expect("Capture::start"));
    assert_eq!(capture.cgroup_root(), dir.as_path());
    let slot: Slot = Arc::new(std::sync::Mutex::new(Some(capture.clone())));
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(serve(p4, "proxy", Some((slot.clone(), tx.clone()))));
    tokio::spawn(serve(p6, "proxy", Some((slot.clone(), tx))));
    tokio::spawn(serve(t4, "target", None));
    tokio::spawn(serve(t6, "target", None));
    tokio::spawn(serve(other, "other", None));
    let env = Env { python, dir: dir.clone(), target_port, other_port };
    let netns_cookie = loader::own_netns_cookie().expect("netns cookie");
    let scope_id = ino(&dir.join("scope/deeper"));

    // 1. In scope (a cgroup below the scope entry), IPv4: redirected, record complete.
    capture.heartbeat();
    let before = capture.counters().unwrap();
    let out = run_child(&env, Some("scope/deeper"), "4", "127.0.0.2", target_port, 0).await;
    assert_eq!(out.reached, "proxy", "in-scope IPv4 connect must reach the proxy");
    let acc = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("accept").expect("chan");
    let rec = acc.record.unwrap_or_else(|| panic!("no flow record for {acc:?}"));
    assert_eq!(acc.peer, SocketAddr::from(([127, 0, 0, 1], out.local_port)));
    assert_eq!(acc.local, SocketAddr::from(([127, 0, 0, 1], proxy_port)));
    assert_eq!(orig(&rec), SocketAddr::from(([127, 0, 0, 2], target_port)));
    assert_eq!(rec.family, AF_INET);
    assert_eq!(rec.tgid, out.pid);
    assert_eq!(rec.pid, out.pid, "single-threaded child: tid == tgid");
    assert_eq!((rec.uid, rec.gid), (0, 0));
    assert_eq!(comm(&rec), expected_comm);
    assert_eq!(rec.cgroup_id, scope_id);
    assert_eq!(rec.netns_cookie, netns_cookie);
    assert!(rec.captured_at_ns > 0 && rec.captured_at_ns <= tollgate::capture::maps::monotonic_ns());
    assert!(acc.second_take.is_none(), "take() must delete the record");
    let d = delta(&before, &capture.counters().unwrap());
    assert_eq!(d, vec![("seen", 1), ("redirected", 1), ("rekeyed", 1)], "counters after redirect");
    println!("ipv4 redirect ok: {rec:?}");

    // 2. IPv6 in scope.
    capture.heartbeat();
    let before = capture.counters().unwrap();
    let out = run_child(&env, Some("scope"), "6", "::1", target_port, 0).await;
    assert_eq!(out.reached, "proxy", "in-scope IPv6 connect must reach the proxy");
    let acc = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("accept").expect("chan");
    let rec = acc.record.unwrap_or_else(|| panic!("no flow record for {acc:?}"));
    assert_eq!(acc.local.port(), proxy_port);
    assert_eq!(acc.local.ip(), IpAddr::from(std::net::Ipv6Addr::LOCALHOST));
    assert_eq!(acc.peer.port(), out.local_port);
    assert_eq!(orig(&rec), SocketAddr::new("::1".parse().unwrap(), target_port));
    assert_eq!(rec.family, AF_INET6);
    assert_eq!(rec.tgid, out.pid);
    assert_eq!(rec.cgroup_id, ino(&dir.join("scope")));
    let d = delta(&before, &capture.counters().unwrap());
    assert_eq!(d, vec![("seen", 1), ("redirected", 1), ("rekeyed", 1)], "counters after IPv6 redirect");
    println!("ipv6 redirect ok: {rec:?}");

    // 3. IPv4-mapped destination on an AF_INET6 socket (Java's default).
    capture.heartbeat();
    let out = run_child(&env, Some("scope"), "6", "::ffff:127.0.0.2", target_port, 0).await;
    assert_eq!(out.reached, "proxy", "v4-mapped connect must reach the IPv4 proxy");
    let acc = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("accept").expect("chan");
    let rec = acc.record.unwrap_or_else(|| panic!("no flow record for {acc:?}"));
    assert_eq!(acc.local, SocketAddr::from(([127, 0, 0, 1], proxy_port)));
    assert_eq!(orig(&rec), SocketAddr::from(([127, 0, 0, 2], target_port)));
    assert_eq!(rec.family, AF_INET);
    println!("v4-mapped redirect ok");

    // 4. Outside the scope: not redirected.
    capture.heartbeat();
    let before = capture.counters().unwrap();
    let out = run_child(&env, Some("out"), "4", "127.0.0.2", target_port, 0).await;
    assert_eq!(out.reached, "target", "out-of-scope connect must not be redirected");
    assert_eq!(delta(&before, &capture.counters().unwrap()), vec![("seen", 1), ("skipped_scope", 1)]);

    // 5. In scope but no rule for the port.
    let before = capture.counters().unwrap();
    let out = run_child(&env, Some("scope"), "4", "127.0.0.2", env.other_port, 0).await;
    assert_eq!(out.reached, "other");
    assert_eq!(delta(&before, &capture.counters().unwrap()), vec![("seen", 1), ("skipped_no_rule", 1)]);

    // 6. In scope, but the socket carries tollgate's SO_MARK.
    let before = capture.counters().unwrap();
    let out = run_child(&env, Some("scope"), "4", "127.0.0.2", target_port, cfg.capture.self_mark).await;
    assert_eq!(out.reached, "target", "marked socket must not be redirected");
    assert_eq!(delta(&before, &capture.counters().unwrap()), vec![("seen", 1), ("skipped_self", 1)]);

    // 7. tollgate's own process (tgid), moved into the scope for the occasion.
    std::fs::write(dir.join("scope/cgroup.procs"), std::process::id().to_string()).expect("move self");
    let before = capture.counters().unwrap();
    let mut s = tokio::net::TcpStream::connect(("127.0.0.2", target_port)).await.expect("self connect");
    let mut buf = [0u8; 7];
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut buf).await.expect("read");
    assert_eq!(&buf, b"target\n", "tollgate's own connects must not be redirected");
    assert_eq!(delta(&before, &capture.counters().unwrap()), vec![("seen", 1), ("skipped_self", 1)]);
    std::fs::write(guard.home.join("cgroup.procs"), std::process::id().to_string()).expect("move back");

    // 8. A caller in another netns (one we create) connecting to its own loopback: that is not
    //    the node's loopback, so it is never redirected (checked before the pod address).
    capture.heartbeat();
    let before = capture.counters().unwrap();
    let out = run_child_wrapped(&env, &["unshare", "-n"], Some("scope"), "4", "127.0.0.2", target_port, 0).await;
    assert_eq!(out.reached, "ERR", "in a fresh netns (lo down) the connect is left alone and fails");
    assert_eq!(delta(&before, &capture.counters().unwrap()), vec![("seen", 1), ("skipped_pod_loopback", 1)]);

    // 8b. Heartbeat stale (no stamp for longer than the 2 s timeout): fail-open lets the connect
    //     through to the original destination. Probe until the kernel says so; the counters are
    //     compared around the probe that went through. The clock starts before a fresh stamp,
    //     so the kernel's stamp is never earlier than it (an earlier step's stamp could be
    //     hundreds of ms older under load and make a correct fail-open look premature).
    let stamped = std::time::Instant::now();
    capture.heartbeat();
    let (out, before) = loop {
        let before = capture.counters().unwrap();
        let out = run_child(&env, Some("scope"), "4", "127.0.0.2", target_port, 0).await;
        if out.reached == "target" || stamped.elapsed() > Duration::from_secs(6) {
            break (out, before);
        }
        drain(&mut rx);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(out.reached, "target", "stale heartbeat must fail open");
    assert!(stamped.elapsed() >= Duration::from_secs(2), "failed open before the heartbeat timeout");
    assert_eq!(delta(&before, &capture.counters().unwrap()), vec![("seen", 1), ("skipped_proxy_down", 1)]);
    drain(&mut rx);
    println!("scope / rule / self / fail-open checks ok");

    // 9. Detach (SIGTERM path): nothing is counted or redirected any more.
    drop(capture);
    let capture = take_slot(&slot);
    let counters_before = capture.counters().unwrap();
    capture.shutdown();
    let out = run_child(&env, Some("scope"), "4", "127.0.0.2", target_port, 0).await;
    assert_eq!(out.reached, "target", "after shutdown connects go direct");
    assert!(counters_before[Counter::Redirected as usize] >= 3);

    scope_all_phase(&env, &cfg, &slot, &mut rx).await;
    fail_closed_phase(&env, &cfg, &slot, &mut rx).await;
    drop(guard);
}

/// Empty scope (every cgroup under the root), a port rule and a hostname rule.
async fn scope_all_phase(env: &Env, base: &Config, slot: &Slot, rx: &mut mpsc::UnboundedReceiver<Accepted>) {
    let mut cfg = base.clone();
    cfg.capture.scope = Vec::new();
    cfg.capture.destinations = Vec::new();
    cfg.capture.ports = vec![env.other_port];
    cfg.capture.hosts = vec![HostRule { host: "localhost".to_owned(), port: env.target_port }];
    let cap = Arc::new(Capture::start(&cfg).await.expect("scope-all start"));
    *slot.lock().unwrap() = Some(cap.clone());
    cap.heartbeat();

    // Port rule, from a cgroup that was out of scope before.
    let out = run_child(env, Some("out"), "4", "127.0.0.2", env.other_port, 0).await;
    assert_eq!(out.reached, "proxy", "port rule with empty scope must capture every cgroup");
    let acc = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("accept").expect("chan");
    let rec = acc.record.expect("record for port rule");
    assert_eq!(orig(&rec), SocketAddr::from(([127, 0, 0, 2], env.other_port)));
    assert_eq!(rec.tgid, out.pid);

    // Hostname rule: localhost resolved to 127.0.0.1 (nothing listens there on target_port, so
    // only a redirect can succeed).
    let out = run_child(env, Some("self"), "4", "127.0.0.1", env.target_port, 0).await;
    assert_eq!(out.reached, "proxy", "hostname rule must capture the resolved address");
    let acc = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("accept").expect("chan");
    assert_eq!(acc.record.map(|r| orig(&r)), Some(SocketAddr::from(([127, 0, 0, 1], env.target_port))));

    // Same port, other address: no rule.
    let out = run_child(env, Some("self"), "4", "127.0.0.2", env.target_port, 0).await;
    assert_eq!(out.reached, "target");
    drop(cap);
    take_slot(slot).shutdown();
    println!("scope-all / port rule / hostname rule checks ok");
}

/// Fail-closed: links pinned, stale heartbeat refuses connects, the refusal survives the
/// process's handle being dropped (kill -9), a restart replaces the pins, shutdown removes them.
async fn fail_closed_phase(env: &Env, base: &Config, slot: &Slot, rx: &mut mpsc::UnboundedReceiver<Accepted>) {
    let mut cfg = base.clone();
    cfg.capture.fail_closed = true;
    let pins: Vec<PathBuf> = ["tg_sockops", "tg_connect4", "tg_connect6"]
        .iter()
        .map(|n| loader::pin_path(&cfg.capture.bpffs_dir, n))
        .collect();

    let first = Arc::new(Capture::start(&cfg).await.expect("fail-closed start"));
    for p in &pins {
        assert!(p.exists(), "pinned link {} missing", p.display());
    }
    *slot.lock().unwrap() = Some(first.clone());
    first.heartbeat();
    let out = run_child(env, Some("scope"), "4", "127.0.0.2", env.target_port, 0).await;
    assert_eq!(out.reached, "proxy", "fail-closed with fresh heartbeat still redirects");
    let acc = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("accept").expect("chan");
    assert_eq!(acc.record.map(|r| r.tgid), Some(out.pid), "record via pinned programs");
    // Simulate kill -9: the handle goes away without shutdown(); the pins keep the programs.
    drop(first);
    drop(take_slot(slot));
    let out = probe_until(env, "EPERM", rx).await;
    assert_eq!(out.reached, "EPERM", "stale heartbeat with pinned programs must refuse");
    let out = run_child(env, Some("out"), "4", "127.0.0.2", env.target_port, 0).await;
    assert_eq!(out.reached, "target", "out-of-scope connects are unaffected");

    // Restart: stale pins removed, fresh programs attached and pinned.
    let second = Capture::start(&cfg).await.expect("fail-closed restart");
    second.heartbeat();
    let before = second.counters().unwrap();
    let out = run_child(env, Some("scope"), "4", "127.0.0.2", env.target_port, 0).await;
    assert_eq!(out.reached, "proxy", "after restart the old refusing programs must be gone");
    // Nobody takes this record (the acceptor's slot is empty): once the child's socket closes,
    // sock_ops must drop it so it cannot be inherited by a later flow on the same 4-tuple.
    let want = vec![("seen", 1), ("redirected", 1), ("rekeyed", 1), ("expired_on_close", 1)];
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while delta(&before, &second.counters().unwrap()) != want && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(delta(&before, &second.counters().unwrap()), want);
    second.shutdown();
    for p in &pins {
        assert!(!p.exists(), "shutdown must remove {}", p.display());
    }
    let out = probe_until(env, "target", rx).await;
    assert_eq!(out.reached, "target", "after shutdown nothing is refused or redirected");
    let _ = std::fs::remove_dir(&cfg.capture.bpffs_dir);
    println!("fail-closed pin / refuse / restart / shutdown checks ok");
}
