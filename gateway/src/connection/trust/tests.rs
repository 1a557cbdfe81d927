//! Trust decisions against made-up `/proc/<pid>` trees (exe, environ, cwd, root).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

fn ca_pem(name: &str) -> (String, Vec<u8>) {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    (cert.pem(), cert.der().to_vec())
}

struct FakeProc {
    dir: tempfile::TempDir,
}

impl FakeProc {
    fn new() -> FakeProc {
        FakeProc { dir: tempfile::tempdir().unwrap() }
    }

    fn proc_root(&self) -> PathBuf {
        self.dir.path().join("proc")
    }

    /// A process `pid` running `exe` with `env`, its root filesystem at `fs/<pid>`.
    fn process(&self, pid: u32, exe: &str, env: &[(&str, &str)]) -> PathBuf {
        let d = self.proc_root().join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        let fs = self.dir.path().join(format!("fs/{pid}"));
        std::fs::create_dir_all(fs.join("etc/ssl/certs")).unwrap();
        std::os::unix::fs::symlink(exe, d.join("exe")).unwrap();
        std::os::unix::fs::symlink("/app", d.join("cwd")).unwrap();
        std::os::unix::fs::symlink(&fs, d.join("root")).unwrap();
        let environ: Vec<u8> =
            env.iter().flat_map(|(k, v)| format!("{k}={v}").into_bytes().into_iter().chain([0u8])).collect();
        std::fs::write(d.join("environ"), environ).unwrap();
        fs
    }
}

fn write(fs: &Path, path: &str, text: &str) {
    let p = fs.join(path.trim_start_matches('/'));
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

fn caller(pid: u32) -> Caller<'static> {
    Caller { agent: "a", pid, cgroup: 7 }
}

fn verdict(intercept: bool, reason: Reason) -> Verdict {
    Verdict { intercept, reason }
}

#[test]
fn python_is_intercepted_only_when_a_trust_variable_names_the_ca() {
    let (ours, der) = ca_pem("tollgate");
    let (other, _) = ca_pem("someone else");
    let p = FakeProc::new();
    let fs = p.process(10, "/usr/bin/python3.13", &[("SSL_CERT_FILE", "/ca/bundle.pem")]);
    write(&fs, "/ca/bundle.pem", &format!("{other}{ours}"));
    let fs2 = p.process(11, "/usr/bin/python3.13", &[("SSL_CERT_FILE", "/ca/bundle.pem")]);
    write(&fs2, "/ca/bundle.pem", &other);
    // The system bundle holds the CA, but Python's clients read certifi's, not it.
    let fs3 = p.process(12, "/usr/bin/python3.13", &[("PATH", "/usr/bin")]);
    write(&fs3, "/etc/ssl/certs/ca-certificates.crt", &ours);
    // A relative path is the process's cwd's.
    let fs4 = p.process(13, "/usr/bin/python3", &[("REQUESTS_CA_BUNDLE", "certs/ca.pem")]);
    write(&fs4, "/app/certs/ca.pem", &ours);
    let t = Trust::with_proc(der, &AutoInterceptConfig::default(), &p.proc_root());
    let d = |pid| t.decide(InterceptMode::Auto, caller(pid), "api.openai.com");
    assert_eq!(d(10), verdict(true, Reason::TrustVariable));
    assert_eq!(d(11), verdict(false, Reason::NotTrusted));
    assert_eq!(d(12), verdict(false, Reason::NotTrusted));
    assert_eq!(d(13), verdict(true, Reason::TrustVariable));
}

#[test]
fn native_clients_read_the_system_bundle_inside_their_root_and_node_only_its_variable() {
    let (ours, der) = ca_pem("tollgate");
    let p = FakeProc::new();
    let fs = p.process(20, "/usr/bin/curl", &[]);
    write(&fs, "/etc/ssl/certs/ca-certificates.crt", &ours);
    // Found through an absolute link, resolved inside the process's root.
    let fs = p.process(21, "/usr/bin/curl", &[]);
    write(&fs, "/etc/pki/real.pem", &ours);
    std::os::unix::fs::symlink("/etc/pki/real.pem", fs.join("etc/ssl/cert.pem")).unwrap();
    let fs = p.process(22, "/usr/local/bin/node", &[("SSL_CERT_FILE", "/ca.pem")]);
    write(&fs, "/ca.pem", &ours);
    write(&fs, "/etc/ssl/certs/ca-certificates.crt", &ours);
    let fs = p.process(23, "/usr/local/bin/node", &[("NODE_EXTRA_CA_CERTS", "/ca.pem")]);
    write(&fs, "/ca.pem", &ours);
    let fs = p.process(24, "/usr/bin/curl", &[("SSL_CERT_DIR", "/none:/certs")]);
    write(&fs, "/certs/a.pem", "not a certificate");
    write(&fs, "/certs/b.pem", &ours);
    let t = Trust::with_proc(der, &AutoInterceptConfig::default(), &p.proc_root());
    let d = |pid| t.decide(InterceptMode::Auto, caller(pid), "api.openai.com");
    assert_eq!(d(20), verdict(true, Reason::SystemBundle));
    assert_eq!(d(21), verdict(true, Reason::SystemBundle));
    assert_eq!(d(22), verdict(false, Reason::NotTrusted));
    assert_eq!(d(23), verdict(true, Reason::TrustVariable));
    assert_eq!(d(24), verdict(true, Reason::TrustVariable));
}

#[test]
fn a_failed_handshake_splices_the_agent_and_sni_until_the_learned_ttl() {
    let (ours, der) = ca_pem("tollgate");
    let p = FakeProc::new();
    let fs = p.process(30, "/usr/bin/python3", &[("SSL_CERT_FILE", "/ca.pem")]);
    write(&fs, "/ca.pem", &ours);
    let cfg = AutoInterceptConfig { learned_ttl: Duration::from_millis(200), ..Default::default() };
    let t = Trust::with_proc(der, &cfg, &p.proc_root());
    assert!(t.decide(InterceptMode::Auto, caller(30), "api.openai.com").intercept);
    t.learn_failure("a", "API.openai.com");
    assert_eq!(t.decide(InterceptMode::Auto, caller(30), "api.openai.com"), verdict(false, Reason::Learned));
    // Another SNI, another agent: not affected. `intercept: true` never learns.
    assert!(t.decide(InterceptMode::Auto, caller(30), "api.anthropic.com").intercept);
    let b = Caller { agent: "b", ..caller(30) };
    assert!(t.decide(InterceptMode::Auto, b, "api.openai.com").intercept);
    assert_eq!(t.decide(InterceptMode::Always, caller(30), "api.openai.com"), verdict(true, Reason::Forced));
    std::thread::sleep(Duration::from_millis(250));
    assert!(t.decide(InterceptMode::Auto, caller(30), "api.openai.com").intercept);
}

#[test]
fn decisions_are_cached_by_trust_store_identity_and_bounded() {
    let (ours, der) = ca_pem("tollgate");
    let p = FakeProc::new();
    let fs = p.process(40, "/usr/bin/python3", &[("SSL_CERT_FILE", "/ca.pem")]);
    write(&fs, "/ca.pem", "empty for now\n");
    let cfg = AutoInterceptConfig { max_decisions: 2, ..Default::default() };
    let t = Trust::with_proc(der, &cfg, &p.proc_root());
    assert!(!t.decide(InterceptMode::Auto, caller(40), "h").intercept);
    // The bundle changes (size and mtime): read again, now trusted.
    write(&fs, "/ca.pem", &ours);
    assert_eq!(t.decide(InterceptMode::Auto, caller(40), "h"), verdict(true, Reason::TrustVariable));
    for cg in 1..5 {
        t.decide(InterceptMode::Auto, Caller { cgroup: cg, ..caller(40) }, "h");
    }
    assert_eq!(t.sizes().0, 2, "the decision cache holds max_decisions");
    for i in 0..10 {
        t.learn_failure(&format!("agent{i}"), "h");
    }
    assert_eq!(t.sizes().1, cfg.max_learned.min(10));
}

#[test]
fn an_unreadable_process_is_spliced() {
    let (_, der) = ca_pem("tollgate");
    let p = FakeProc::new();
    let t = Trust::with_proc(der, &AutoInterceptConfig::default(), &p.proc_root());
    assert_eq!(t.decide(InterceptMode::Auto, caller(99), "h"), verdict(false, Reason::Unreadable));
}

#[test]
fn handshake_failures_are_classified_and_only_rejections_teach() {
    let alert = |a| std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::AlertReceived(a));
    use rustls::AlertDescription as A;
    assert_eq!(HandshakeFailure::of(&alert(A::UnknownCA)), HandshakeFailure::UnknownCa);
    assert_eq!(HandshakeFailure::of(&alert(A::BadCertificate)), HandshakeFailure::BadCertificate);
    assert_eq!(HandshakeFailure::of(&alert(A::CertificateUnknown)), HandshakeFailure::CertificateUnknown);
    assert_eq!(HandshakeFailure::of(&alert(A::ProtocolVersion)), HandshakeFailure::Other);
    let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
    assert_eq!(HandshakeFailure::of(&eof), HandshakeFailure::Closed);
    assert!(HandshakeFailure::UnknownCa.teaches_splice() && HandshakeFailure::Closed.teaches_splice());
    assert!(!HandshakeFailure::Other.teaches_splice() && !HandshakeFailure::Timeout.teaches_splice());
}

#[test]
fn intercepted_connections_are_marked_while_their_guard_lives() {
    let set = std::sync::Arc::new(Intercepted::default());
    let g = set.mark(5);
    assert!(set.contains(5) && !set.contains(6));
    drop(g);
    assert!(set.is_empty());
}
