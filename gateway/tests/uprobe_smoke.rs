//! End-to-end check of the TLS uprobes on the real kernel: real OpenSSL clients (curl, CPython)
//! in a scoped cgroup talk HTTPS to a local server that trusts nothing of tollgate's, and the
//! plaintext arrives as contract `TlsEvent`s joined to the connect-time record. Needs root, the
//! eBPF object embedded (`cargo xtask build-ebpf`), curl and python3:
//!
//! ```sh
//! cargo xtask build-ebpf
//! sudo flock /tmp/tollgate-scenarios.lock cargo test -p tollgate --test uprobe_smoke -- --ignored --nocapture --test-threads 1
//! ```
//!
//! The server listens on the proxy port (captured connects are redirected there, spliced as
//! today's observe path would be) and on a non-captured port; observation does not depend on
//! who terminates TLS, only on the client's OpenSSL.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tollgate::capture::uprobe::{self, Direction, TlsEvent};
use tollgate::capture::{cgroup, Capture};
use tollgate::config::{Config, DestinationRule};

/// A CPython client: joins the cgroup, then one HTTPS request over `http.client` + `ssl`
/// (OpenSSL through `_ssl`). Mode `get`, or `big N`: a POST whose body is one N-byte write, then,
/// once the response is in (so the ring buffer has long been drained), a 4-byte write `tail`.
const PY_CLIENT: &str = r#"
import os, sys, ssl, http.client
cg, ca, host, port, mode, size = sys.argv[1:7]
with open(cg, 'w') as f:
    f.write(str(os.getpid()))
ctx = ssl.create_default_context(cafile=ca)
c = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
if mode == 'get':
    c.request('GET', '/hello-python')
else:
    big = b'x' * int(size)
    c.putrequest('POST', '/big')
    c.putheader('Content-Length', str(len(big)))
    c.endheaders()
    c.send(big)
r = c.getresponse()
print(r.read().decode())
if mode == 'big':
    c.sock.sendall(b'tail')
c.close()
"#;

/// A Node.js client (official build: OpenSSL linked statically into `/usr/bin/node`, memory
/// BIOs): joins the cgroup, then `fetch`es every URL concurrently (one event-loop thread),
/// trusting the CA through NODE_EXTRA_CA_CERTS; prints the bodies, one a line.
const NODE_CLIENT: &str = r#"
const fs = require('fs');
const [cg, ...urls] = process.argv.slice(1);
fs.writeFileSync(cg, String(process.pid));
Promise.all(urls.map(u => fetch(u).then(r => r.text())))
  .then(ts => { console.log(ts.join('\n')); process.exit(0); },
        e => { console.error(String(e)); process.exit(1); });
"#;

/// A CPython asyncio client (`ssl.SSLObject` over a `MemoryBIO`, as httpx/anyio and so the
/// OpenAI, Anthropic, MCP and A2A async SDKs use it): joins the cgroup, then one HTTP/1.1 GET per
/// `port:path` argument, all concurrently on the event-loop thread; prints the bodies.
const PY_ASYNC_CLIENT: &str = r#"
import asyncio, os, ssl, sys
cg, ca, host = sys.argv[1:4]
with open(cg, 'w') as f:
    f.write(str(os.getpid()))
ctx = ssl.create_default_context(cafile=ca)
async def get(port, path):
    r, w = await asyncio.open_connection(host, int(port), ssl=ctx)
    w.write(f'GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n'.encode())
    await w.drain()
    data = await r.read()
    w.close()
    await w.wait_closed()
    return data.split(b'\r\n\r\n', 1)[1].decode()
async def main():
    jobs = [get(*a.split(':', 1)) for a in sys.argv[4:]]
    print('\n'.join(await asyncio.gather(*jobs)))
asyncio.run(main())
"#;

/// Removes the test cgroups and moves this process back, even when an assertion fails.
struct CgroupGuard {
    dir: PathBuf,
    home: PathBuf,
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let _ = std::fs::write(self.home.join("cgroup.procs"), std::process::id().to_string());
        let _ = std::fs::remove_dir(self.dir.join("scope"));
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A CA and a server certificate for 127.0.0.2 signed by it; the CA's PEM goes to `ca_path`.
fn tls_acceptor(ca_path: &Path) -> tokio_rustls::TlsAcceptor {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name.push(DnType::CommonName, "tollgate uprobe smoke CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    std::fs::write(ca_path, ca.pem()).expect("write ca");
    let leaf_key = KeyPair::generate().expect("leaf key");
    let leaf_params = CertificateParams::new(vec!["127.0.0.2".to_string(), "localhost".to_string()]).expect("params");
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).expect("leaf");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .expect("server config");
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

/// HTTPS server: reads one request (head and Content-Length body), answers `resp-for:<path>`
/// and closes; after a POST it keeps the connection (reading and ignoring) until the client
/// closes it. A POST is answered only once `post_gate` hands out a permit, so a test can hold a
/// response back until the ring buffer has drained.
async fn serve_https(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, post_gate: Arc<Semaphore>) {
    loop {
        let Ok((s, _)) = listener.accept().await else { return };
        let acceptor = acceptor.clone();
        let post_gate = post_gate.clone();
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(s).await else { return };
            let mut buf = Vec::new();
            let mut tmp = vec![0u8; 64 << 10];
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                match tls.read(&mut tmp).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < head_end + len {
                match tls.read(&mut tmp).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            }
            let path = head.split_whitespace().nth(1).unwrap_or("?").to_owned();
            let body = format!("resp-for:{path}");
            let post = head.starts_with("POST");
            if post {
                match post_gate.acquire().await {
                    Ok(p) => p.forget(),
                    Err(_) => return,
                }
            }
            let close = if post { "" } else { "Connection: close\r\n" };
            let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{close}\r\n{body}", body.len());
            let _ = tls.write_all(resp.as_bytes()).await;
            if post {
                while let Ok(n) = tls.read(&mut tmp).await {
                    if n == 0 {
                        break;
                    }
                }
            }
            let _ = tls.shutdown().await;
        });
    }
}

/// Events until the CLOSE of a connection of `pid` (10 s at most, then the test fails).
async fn until_close(rx: &mut mpsc::Receiver<TlsEvent>, pid: u32) -> Vec<TlsEvent> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ev)) => {
                let done = matches!(&ev, TlsEvent::Close { record, .. } if record.tgid == pid);
                out.push(ev);
                if done {
                    return out;
                }
            }
            Ok(None) => panic!("event channel closed"),
            Err(_) => panic!("no CLOSE for pid {pid} within 10 s; got {out:#?}"),
        }
    }
}

/// Concatenated plaintext of `pid` in `dir`, and whether any of its chunks had a gap.
fn stream(evs: &[TlsEvent], pid: u32, dir: Direction) -> (Vec<u8>, Vec<(Vec<u8>, bool)>) {
    let mut all = Vec::new();
    let mut chunks = Vec::new();
    for ev in evs {
        if let TlsEvent::Data { record, direction, data, gap_before, .. } = ev {
            if record.tgid == pid && *direction == dir {
                all.extend_from_slice(data);
                chunks.push((data.to_vec(), *gap_before));
            }
        }
    }
    (all, chunks)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

struct Env {
    scope_procs: String,
    ca: String,
    python: String,
    target_port: u16,
}

async fn py_client(env: &Env, port: u16, mode: &str, size: usize) -> u32 {
    let mut child = tokio::process::Command::new(&env.python)
        .args(["-c", PY_CLIENT, &env.scope_procs, &env.ca, "127.0.0.2", &port.to_string(), mode, &size.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn python");
    let pid = child.id().expect("pid");
    let mut out = String::new();
    child.stdout.take().expect("stdout").read_to_string(&mut out).await.expect("read");
    assert!(child.wait().await.expect("wait").success(), "python client failed: {out}");
    assert!(out.starts_with("resp-for:"), "python got {out:?}");
    pid
}

/// Runs a memory-BIO client (`program` and its arguments) to completion; its stdout must list
/// `resp-for:<path>` for every path. Returns its pid.
async fn mem_bio_client(program: &str, args: &[String], env: &Env, paths: &[&str]) -> u32 {
    let child = tokio::process::Command::new(program)
        .args(args)
        .env("NODE_EXTRA_CA_CERTS", &env.ca)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn memory-BIO client");
    let pid = child.id().expect("pid");
    let out = child.wait_with_output().await.expect("client");
    assert!(out.status.success(), "{program} failed: {}", String::from_utf8_lossy(&out.stderr));
    let got = String::from_utf8_lossy(&out.stdout).into_owned();
    for p in paths {
        assert!(got.contains(&format!("resp-for:{p}")), "{program} got {got:?}");
    }
    pid
}

async fn py_async(env: &Env, targets: &[(u16, &str)]) -> u32 {
    let mut args = vec!["-c".to_owned(), PY_ASYNC_CLIENT.to_owned(), env.scope_procs.clone(), env.ca.clone()];
    args.push("127.0.0.2".to_owned());
    args.extend(targets.iter().map(|(port, path)| format!("{port}:{path}")));
    let paths: Vec<_> = targets.iter().map(|(_, p)| *p).collect();
    mem_bio_client(&env.python, &args, env, &paths).await
}

async fn node_fetch(env: &Env, targets: &[(u16, &str)]) -> u32 {
    let mut args = vec!["-e".to_owned(), NODE_CLIENT.to_owned(), env.scope_procs.clone()];
    args.extend(targets.iter().map(|(port, path)| format!("https://127.0.0.2:{port}{path}")));
    let paths: Vec<_> = targets.iter().map(|(_, p)| *p).collect();
    mem_bio_client("/usr/bin/node", &args, env, &paths).await
}

/// A memory-BIO client stack (no syscall inside its SSL calls).
#[derive(Clone, Copy)]
enum MemBio {
    PyAsync,
    Node,
}

impl MemBio {
    fn name(self) -> &'static str {
        match self {
            MemBio::PyAsync => "asyncio",
            MemBio::Node => "node",
        }
    }

    async fn run(self, env: &Env, targets: &[(u16, &str)]) -> u32 {
        match self {
            MemBio::PyAsync => py_async(env, targets).await,
            MemBio::Node => node_fetch(env, targets).await,
        }
    }
}

/// The safety of joining memory-BIO calls to sockets: a captured and an uncaptured connection
/// on the same thread emit only the captured one's plaintext, and an uncaptured connection
/// alone emits nothing; the uncaptured calls reach the probes and are held back.
async fn memory_bio_safety(
    client: MemBio,
    rx: &mut mpsc::Receiver<TlsEvent>,
    env: &Env,
    handle: &uprobe::UprobeHandle,
    target_port: u16,
    other_port: u16,
) {
    let n = client.name();
    let (captured, uncaptured) = (format!("/{n}-captured"), format!("/{n}-uncaptured"));
    let before = handle.snapshot();
    let pid = client.run(env, &[(target_port, &captured), (other_port, &uncaptured)]).await;
    let evs = events_of(rx, env, pid, &format!("/after-{n}-mixed")).await;
    let after = handle.snapshot();
    assert_joined(&evs, pid, env, &captured, Some(&uncaptured));
    let held = held_back(&before, &after);
    assert!(held >= 2, "{n}: the uncaptured connection's write and read must be held back: {before:?} -> {after:?}");
    println!("{n} mixed ok: {held} calls held back");

    let before = handle.snapshot();
    let pid = client.run(env, &[(other_port, &format!("/{n}-only-uncaptured"))]).await;
    let evs = events_of(rx, env, pid, &format!("/after-{n}-uncaptured")).await;
    let after = handle.snapshot();
    assert!(evs.is_empty(), "uncaptured {n} connection leaked: {evs:#?}");
    assert!(held_back(&before, &after) >= 2, "uncaptured {n} calls reach the probes: {before:?} -> {after:?}");
    println!("{n} uncaptured ok");
}

/// Every event up to a later curl's CLOSE: one ring buffer, one reader, so whatever a client
/// that finished before produced (its connections may end by exit, without `close()`) is in.
async fn events_of(rx: &mut mpsc::Receiver<TlsEvent>, env: &Env, pid: u32, marker: &str) -> Vec<TlsEvent> {
    let curl_pid = curl(env, marker).await;
    until_close(rx, curl_pid)
        .await
        .into_iter()
        .filter(|e| match e {
            TlsEvent::Data { record, .. } | TlsEvent::Close { record, .. } => record.tgid == pid,
        })
        .collect()
}

/// A memory-BIO client joined: the captured request line out, its response in, every event of
/// the pid on the captured connection (`orig_dst` the captured target), and nothing of
/// `uncaptured_path` (a connection of the same thread to a port no rule captures).
fn assert_joined(evs: &[TlsEvent], pid: u32, env: &Env, path: &str, uncaptured_path: Option<&str>) {
    let (out, _) = stream(evs, pid, Direction::Egress);
    let (inb, _) = stream(evs, pid, Direction::Ingress);
    let line = format!("GET {path} HTTP/1.1\r\n");
    assert!(contains(&out, line.as_bytes()), "{path} egress: {:?}", String::from_utf8_lossy(&out));
    assert!(
        contains(&inb, format!("resp-for:{path}").as_bytes()),
        "{path} ingress: {:?}",
        String::from_utf8_lossy(&inb)
    );
    for e in evs {
        let TlsEvent::Data { record, .. } = e else { continue };
        assert_eq!(record.tgid, pid);
        assert_eq!(
            tollgate::capture::identity::orig_dst(record),
            std::net::SocketAddr::from(([127, 0, 0, 2], env.target_port)),
            "data joined to a connection other than the captured one"
        );
    }
    if let Some(u) = uncaptured_path {
        assert!(!contains(&out, u.as_bytes()), "uncaptured request leaked: {:?}", String::from_utf8_lossy(&out));
        assert!(!contains(&inb, u.as_bytes()), "uncaptured response leaked: {:?}", String::from_utf8_lossy(&inb));
    }
}

async fn curl(env: &Env, path: &str) -> u32 {
    // `exec` keeps the pid: the shell joins the cgroup, curl inherits it.
    let script = format!(
        "echo $$ > {} && exec curl -sS --max-time 10 --cacert {} https://127.0.0.2:{}{path}",
        env.scope_procs, env.ca, env.target_port
    );
    let child = tokio::process::Command::new("sh")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn curl");
    let pid = child.id().expect("pid");
    let out = child.wait_with_output().await.expect("curl");
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "curl failed: {body}");
    assert_eq!(body, format!("resp-for:{path}"));
    pid
}

/// Mean cost of a 1-byte `read()` from /dev/zero on this thread (median of 5 runs of 100k), to
/// report what the receive tracepoints add to every read syscall on the node.
fn read_syscall_ns() -> f64 {
    use std::io::Read;
    let mut f = std::fs::File::open("/dev/zero").expect("/dev/zero");
    let mut b = [0u8; 1];
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let t = std::time::Instant::now();
            for _ in 0..100_000 {
                f.read_exact(&mut b).expect("read");
            }
            t.elapsed().as_nanos() as f64 / 100_000.0
        })
        .collect();
    runs.sort_by(|a, b| a.total_cmp(b));
    runs[2]
}

/// Data calls that reached the probes and emitted nothing between two snapshots: unbound
/// (`no_fd`: never tied to a socket) or bound to a connection no rule captured (`not_captured`,
/// e.g. an `SSL*` bound to a file the handshake read, or a blocking call's own socket).
fn held_back(
    before: &tollgate::telemetry::uprobe_metrics::UprobeSnapshot,
    after: &tollgate::telemetry::uprobe_metrics::UprobeSnapshot,
) -> u64 {
    let no_fd = snapshot_value(&after.dropped, "no_fd") - snapshot_value(&before.dropped, "no_fd");
    no_fd + after.not_captured - before.not_captured
}

fn snapshot_value(v: &[(&'static str, u64)], key: &str) -> u64 {
    v.iter().find(|(k, _)| *k == key).map_or(0, |(_, n)| *n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, uprobes and the built eBPF object"]
async fn uprobes_observe_captured_tls() {
    assert!(nix::unistd::geteuid().is_root(), "run as root");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    assert!(uprobe::kernel_supports_uprobes(), "kernel without uprobe PMU");
    let py = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3");
    let python = String::from_utf8_lossy(&py.stdout).trim().to_owned();

    let mount = cgroup::ensure_cgroup_root(None).expect("cgroup2 mount");
    let self_cg = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    let home_rel =
        self_cg.lines().find_map(|l| l.strip_prefix("0::")).unwrap_or("/").trim_start_matches('/').to_owned();
    let dir = mount.join(format!("tollgate-uprobe-smoke-{}", std::process::id()));
    let _guard = CgroupGuard { dir: dir.clone(), home: mount.join(home_rel) };
    std::fs::create_dir_all(dir.join("scope")).expect("mkdir test cgroup");
    let tmp = tempfile::tempdir().expect("tmp");
    let ca_path = tmp.path().join("ca.pem");
    let acceptor = tls_acceptor(&ca_path);

    // The proxy port (captured connects land here) and a port no rule captures, both HTTPS.
    let proxy = TcpListener::bind(("127.0.0.1", 0)).await.expect("bind proxy");
    let proxy_port = proxy.local_addr().expect("addr").port();
    let other = TcpListener::bind(("127.0.0.2", 0)).await.expect("bind other");
    let other_port = other.local_addr().expect("addr").port();
    // The captured destination: nothing listens there, connects are redirected to the proxy.
    let target_port = {
        let l = std::net::TcpListener::bind(("127.0.0.2", 0)).expect("probe port");
        l.local_addr().expect("addr").port()
    };
    let post_gate = Arc::new(Semaphore::new(0));
    tokio::spawn(serve_https(proxy, acceptor.clone(), post_gate.clone()));
    tokio::spawn(serve_https(other, acceptor, post_gate.clone()));

    // A process that maps the system libssl before tollgate starts: the initial scan must find
    // and probe it (curl and CPython use that same file).
    let mut holder = tokio::process::Command::new(&python)
        .args(["-c", "import ssl, sys; print('ready', flush=True); sys.stdin.read()"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn libssl holder");
    let mut ready = [0u8; 6];
    holder.stdout.as_mut().expect("stdout").read_exact(&mut ready).await.expect("holder ready");

    let mut cfg = Config::default();
    cfg.listen.port = proxy_port;
    cfg.capture.cgroup_root = Some(dir.clone());
    cfg.capture.scope = vec!["/scope".to_owned()];
    cfg.capture.destinations = vec![DestinationRule { cidr: "127.0.0.2/32".parse().unwrap(), port: Some(target_port) }];
    cfg.capture.heartbeat_timeout = Duration::from_secs(2);
    cfg.capture.bpffs_dir = PathBuf::from(format!("/sys/fs/bpf/tollgate-uprobe-smoke-{}", std::process::id()));
    cfg.capture.uprobes.max_bytes_per_call = 64 << 10;
    cfg.capture.uprobes.static_executables = false;
    let node = Path::new("/usr/bin/node");
    if node.exists() {
        // Attached at start through `paths` (the scan would find it only while a node runs).
        cfg.capture.uprobes.paths = vec![node.to_path_buf()];
    }
    let env = Env {
        scope_procs: dir.join("scope/cgroup.procs").display().to_string(),
        ca: ca_path.display().to_string(),
        python: python.clone(),
        target_port,
    };

    // Phase 1: default-sized ring, 64 KiB per call.
    let capture = Arc::new(Capture::start(&cfg).await.expect("Capture::start"));
    let beat = {
        let c = capture.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_millis(200));
            loop {
                t.tick().await;
                c.heartbeat();
            }
        })
    };
    let read_ns_before = read_syscall_ns();
    let (handle, mut rx) = uprobe::start(&capture, &cfg.capture.uprobes, None).expect("uprobe::start");
    let read_ns_after = read_syscall_ns();
    println!("read(2) of 1 byte: {read_ns_before:.0} ns without the TLS tracepoints, {read_ns_after:.0} ns with them");
    // What the verifier accepted: every TLS program's verified instruction count.
    for p in aya::programs::loaded_programs().flatten() {
        let name = p.name_as_str().unwrap_or("").to_owned();
        if name.starts_with("tg_ssl") || name.starts_with("tg_tls") {
            println!("verified {name}: {:?} insns", p.verified_instruction_count());
        }
    }
    let s = handle.snapshot();
    assert!(s.available);
    assert!(snapshot_value(&s.attached_files, "shared") >= 1, "libssl not probed: {s:?}");

    // curl (libssl directly): request line out, response body in, record of curl's pid.
    let pid = curl(&env, "/hello-curl").await;
    let evs = until_close(&mut rx, pid).await;
    let (out, _) = stream(&evs, pid, Direction::Egress);
    let (inb, _) = stream(&evs, pid, Direction::Ingress);
    assert!(contains(&out, b"GET /hello-curl HTTP/1.1\r\n"), "curl egress: {:?}", String::from_utf8_lossy(&out));
    assert!(contains(&inb, b"resp-for:/hello-curl"), "curl ingress: {:?}", String::from_utf8_lossy(&inb));
    let rec = evs
        .iter()
        .find_map(|e| match e {
            TlsEvent::Data { record, .. } if record.tgid == pid => Some(*record),
            _ => None,
        })
        .expect("a curl data event");
    assert_eq!(tollgate::capture::identity::orig_dst(&rec), std::net::SocketAddr::from(([127, 0, 0, 2], target_port)));
    assert!(
        evs.iter()
            .filter(|e| matches!(e, TlsEvent::Data { record, .. } if record.tgid == pid))
            .all(|e| e.conn().0 == rec.cookie),
        "one connection, one cookie"
    );
    println!("curl ok: {} bytes out, {} in", out.len(), inb.len());

    // CPython (_ssl, SSL_write_ex/SSL_read_ex).
    let pid = py_client(&env, target_port, "get", 0).await;
    let evs = until_close(&mut rx, pid).await;
    let (out, _) = stream(&evs, pid, Direction::Egress);
    let (inb, _) = stream(&evs, pid, Direction::Ingress);
    assert!(contains(&out, b"GET /hello-python HTTP/1.1\r\n"), "python egress: {:?}", String::from_utf8_lossy(&out));
    assert!(contains(&inb, b"resp-for:/hello-python"), "python ingress");
    println!("python ok");

    // Memory-BIO stacks make no syscall inside SSL_read/SSL_write: their `SSL*` is bound to the
    // fd the thread last received on (captured, bytes, first SSL call after it, within 50 ms).
    // CPython asyncio (ssl.SSLObject + MemoryBIO): one captured connection.
    let pid = py_async(&env, &[(target_port, "/hello-asyncio")]).await;
    let evs = events_of(&mut rx, &env, pid, "/after-asyncio").await;
    assert_joined(&evs, pid, &env, "/hello-asyncio", None);
    println!("python asyncio ok");

    // Same thread, a captured and a non-captured connection interleaved: only the captured
    // one's plaintext leaves the kernel; the other's calls reach the probes and stay unbound.
    memory_bio_safety(MemBio::PyAsync, &mut rx, &env, &handle, target_port, other_port).await;

    // Node.js fetch: static OpenSSL in /usr/bin/node, probed through `paths`, memory BIOs.
    if node.exists() {
        assert!(snapshot_value(&handle.snapshot().attached_files, "static") >= 1, "node not probed");
        let pid = node_fetch(&env, &[(target_port, "/hello-node")]).await;
        let evs = events_of(&mut rx, &env, pid, "/after-node").await;
        assert_joined(&evs, pid, &env, "/hello-node", None);
        println!("node ok");

        memory_bio_safety(MemBio::Node, &mut rx, &env, &handle, target_port, other_port).await;
    }

    // Per-call cap: a 200 KiB write is cut at 64 KiB; the next write (`tail`) carries the gap.
    let before = handle.snapshot();
    post_gate.add_permits(1);
    let pid = py_client(&env, target_port, "big", 200 << 10).await;
    let evs = until_close(&mut rx, pid).await;
    let (out, chunks) = stream(&evs, pid, Direction::Egress);
    let after = handle.snapshot();
    assert_eq!(
        snapshot_value(&after.dropped, "per_call_cap") - snapshot_value(&before.dropped, "per_call_cap"),
        1,
        "{after:?}"
    );
    assert!(chunks.iter().take_while(|(d, _)| d != b"tail").all(|(_, gap)| !gap), "no gap before the cut");
    let tail = chunks.iter().find(|(d, _)| d == b"tail").expect("tail chunk");
    assert!(tail.1, "the write after the cut must carry GAP_BEFORE");
    let xs = out.iter().filter(|b| **b == b'x').count();
    assert_eq!(xs, 64 << 10, "exactly the per-call cap of the big write is emitted");
    println!("per-call cap ok");

    // Not captured: TLS to a port no rule matches emits nothing and is counted.
    let before = handle.snapshot();
    let other_pid = py_client(&env, other_port, "get", 0).await;
    let after = handle.snapshot();
    assert!(after.not_captured >= before.not_captured + 2, "not_captured {before:?} -> {after:?}");
    // Kernel order: anything the uncaptured client had emitted would precede this CLOSE.
    let pid = curl(&env, "/after-uncaptured").await;
    let evs = until_close(&mut rx, pid).await;
    assert!(
        evs.iter().all(
            |e| !matches!(e, TlsEvent::Data { record, .. } | TlsEvent::Close { record, .. } if record.tgid == other_pid)
        ),
        "uncaptured connection leaked events"
    );
    println!("not captured ok");

    drop(handle);
    drop(rx);
    beat.abort();
    capture.shutdown();
    drop(capture);

    // Phase 2: the smallest ring, 256 KiB per call: a 256 KiB write overflows it.
    let mut cfg2 = cfg.clone();
    cfg2.capture.uprobes.ring_buffer_bytes = 64 << 10;
    cfg2.capture.uprobes.max_bytes_per_call = 256 << 10;
    // The exec wake-up (not the periodic scan: a minute away) finds static OpenSSL executables
    // of processes started later.
    cfg2.capture.uprobes.paths = Vec::new();
    cfg2.capture.uprobes.static_executables = true;
    cfg2.capture.uprobes.rescan_interval = Duration::from_secs(60);
    cfg2.capture.uprobes.rescan_on_exec = true;
    let capture = Arc::new(Capture::start(&cfg2).await.expect("Capture::start (small ring)"));
    let beat = {
        let c = capture.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_millis(200));
            loop {
                t.tick().await;
                c.heartbeat();
            }
        })
    };
    let (handle, mut rx) = uprobe::start(&capture, &cfg2.capture.uprobes, None).expect("uprobe::start (small ring)");
    while rx.try_recv().is_ok() {}
    let before = handle.snapshot();
    // The server holds its answer until the overflow has happened and every event the kernel
    // did emit has come through the reader (the ring is empty again): the response must then be
    // observed whatever the load on the machine.
    let (pid, mut evs) = tokio::join!(py_client(&env, target_port, "big", 256 << 10), async {
        let mut early = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let now = handle.snapshot();
            let emitted = snapshot_value(&now.events, "data") - snapshot_value(&before.events, "data");
            let ring_full = snapshot_value(&now.dropped, "ring_full") - snapshot_value(&before.dropped, "ring_full");
            let received = early.iter().filter(|e| matches!(e, TlsEvent::Data { .. })).count() as u64;
            if ring_full > 0 && emitted > 0 && received >= emitted {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "no overflow, or the ring never drained: {now:?}");
            if let Ok(Some(ev)) = tokio::time::timeout(Duration::from_millis(20), rx.recv()).await {
                early.push(ev);
            }
        }
        post_gate.add_permits(1);
        early
    });
    evs.extend(until_close(&mut rx, pid).await);
    let after = handle.snapshot();
    let ring_full = snapshot_value(&after.dropped, "ring_full") - snapshot_value(&before.dropped, "ring_full");
    assert!(ring_full > 0, "a 256 KiB call into a 64 KiB ring must drop: {after:?}");
    let (_, chunks) = stream(&evs, pid, Direction::Egress);
    assert!(!chunks[0].1, "the request head precedes any loss");
    assert!(chunks.iter().any(|(_, gap)| *gap), "an event after the loss must carry GAP_BEFORE");
    let (inb, _) = stream(&evs, pid, Direction::Ingress);
    assert!(contains(&inb, b"resp-for:/big"), "response still observed after the overflow");
    println!("ring overflow ok: {ring_full} chunks dropped");

    // A process started now from an executable no one ran before (a copy of node: a new inode)
    // is found by the exec-triggered rescan and probed within the documented bound.
    if node.exists() {
        let copy = tmp.path().join("node-copy");
        std::fs::copy(node, &copy).expect("copy node");
        let static_before = snapshot_value(&handle.snapshot().attached_files, "static");
        let mut idle = tokio::process::Command::new(&copy)
            .args(["-e", "setInterval(() => {}, 1000)"])
            .kill_on_drop(true)
            .spawn()
            .expect("spawn node copy");
        let started = std::time::Instant::now();
        let bound = uprobe::attach_delay_bound(&cfg2.capture.uprobes) + Duration::from_secs(5);
        loop {
            if snapshot_value(&handle.snapshot().attached_files, "static") > static_before {
                break;
            }
            assert!(started.elapsed() < bound, "new static OpenSSL executable not probed within {bound:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!("rescan ok: new executable probed after {:?}", started.elapsed());
        let _ = idle.kill().await;
    }

    drop(handle);
    beat.abort();
    capture.shutdown();
    let _ = holder.kill().await;
}
