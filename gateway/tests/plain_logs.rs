//! Logs written to a file (a container runtime's log, a CI artifact) must be plain text: the real
//! binary runs with its stderr redirected to a file, and no ANSI escape may appear in it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// `GET /readyz` on the admin listener answers 200.
fn ready(admin: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(admin) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

fn run_and_collect_stderr(format: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = format!("127.0.0.1:{}", free_port());
    let config = format!(
        "listen: {{ port: {}, ipv4: 127.0.0.1, ipv6: null }}\nadmin: {{ listen: \"{admin}\" }}\n\
         capture: {{ enabled: false }}\ntls: {{ ca_dir: {} }}\ntelemetry: {{ access_log: \"off\" }}\n",
        free_port(),
        dir.path().join("ca").display()
    );
    let cfg = dir.path().join("tollgate.yaml");
    std::fs::write(&cfg, config).expect("write config");
    let err_path = dir.path().join("stderr.log");
    let err = std::fs::File::create(&err_path).expect("stderr file");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["--log-format", format, "run", "--config"])
        .arg(&cfg)
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("spawn tollgate");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready(&admin) {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("tollgate exited early ({st}): {}", std::fs::read_to_string(&err_path).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "tollgate not ready within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    std::fs::read(&err_path).expect("read stderr")
}

#[test]
fn logs_to_a_file_carry_no_ansi_escapes() {
    for format in ["text", "json"] {
        let log = run_and_collect_stderr(format);
        let text = String::from_utf8_lossy(&log);
        assert!(text.contains("INFO"), "{format}: expected info lines on stderr, got {text:?}");
        assert!(!log.contains(&0x1b), "{format}: ANSI escape in a log written to a file: {text:?}");
    }
}
