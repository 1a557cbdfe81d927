//! The README's first command must work on a fresh machine: `cargo xtask run` (and `build`,
//! `build-ebpf`) install nightly `rust-src` and `bpf-linker` before they build the eBPF object,
//! instead of failing with ``linker `bpf-linker` not found`` because only `setup`/`test` did.
//!
//! A real install takes minutes and needs the network, so the toolchain is a fake `rustup` on
//! PATH that records every call and behaves like a machine with a bare nightly: no `rust-src`,
//! no `bpf-linker` until `cargo install` makes one. The eBPF build itself is made to fail (its
//! exit code 3 is distinctive): what is checked is that both installs happen, in order, before it.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

const FAKE_RUSTUP: &str = r#"#!/bin/sh
echo "rustup $*" >> "$FAKE_DIR/log"
case "$*" in
  "component list --toolchain nightly --installed")
    [ -f "$FAKE_DIR/rust-src" ] && echo "rust-src (installed)"; exit 0 ;;
  "component add rust-src --toolchain nightly")
    touch "$FAKE_DIR/rust-src"; exit 0 ;;
  "run nightly rustc --print sysroot")
    echo "$FAKE_DIR/sysroot"; exit 0 ;;
  "run nightly cargo install bpf-linker "*)
    mkdir -p "$CARGO_HOME/bin"
    printf '#!/bin/sh\necho "bpf-linker 0.13.1"\n' > "$CARGO_HOME/bin/bpf-linker"
    chmod +x "$CARGO_HOME/bin/bpf-linker"; exit 0 ;;
  "run nightly cargo build --release")
    exit 3 ;;
esac
echo "fake rustup: unexpected call: $*" >&2
exit 1
"#;

/// A fresh machine: a temporary CARGO_HOME, target dir and the fake `rustup` alone on PATH.
struct Fresh {
    dir: PathBuf,
}

impl Fresh {
    fn new(tag: &str) -> Fresh {
        let dir = std::env::temp_dir().join(format!("xtask-fresh-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("rustup"), FAKE_RUSTUP).unwrap();
        std::fs::set_permissions(bin.join("rustup"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let lib = dir.join("sysroot/lib");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join("libLLVM.so.22.1-rust-1.95.0-nightly"), b"").unwrap();
        Fresh { dir }
    }

    /// Run `xtask <args>`; returns the toolchain calls of this run and xtask's stderr.
    fn run(&self, args: &[&str]) -> (Vec<String>, String) {
        let _ = std::fs::remove_file(self.dir.join("log"));
        // Only the fake and the system's own tools on PATH: no ~/.cargo/bin, so the machine's
        // real rustup and bpf-linker are not found.
        let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(args)
            .env("PATH", format!("{}:/usr/bin:/bin", self.dir.join("bin").display()))
            .env("CARGO_HOME", self.dir.join("cargo-home"))
            .env("CARGO_TARGET_DIR", self.dir.join("target"))
            .env("FAKE_DIR", &self.dir)
            .env_remove("RUSTUP_TOOLCHAIN")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "`xtask {args:?}` must stop at the fake eBPF build: {stderr}");
        let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        (log.lines().map(str::to_string).collect(), stderr)
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The index of the first call starting with `prefix`, or a panic showing all calls.
fn position(calls: &[String], prefix: &str, stderr: &str) -> usize {
    calls
        .iter()
        .position(|c| c.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` call among {calls:#?}\nstderr:\n{stderr}"))
}

fn assert_installs_before_build(args: &[&str]) {
    let (calls, stderr) = Fresh::new(&args.join("-")).run(args);
    let src = position(&calls, "rustup component add rust-src --toolchain nightly", &stderr);
    let linker = position(&calls, "rustup run nightly cargo install bpf-linker", &stderr);
    let build = position(&calls, "rustup run nightly cargo build --release", &stderr);
    assert!(src < build && linker < build, "`xtask {args:?}` built before installing: {calls:#?}");
    let install = &calls[linker];
    assert!(install.contains("--features llvm-22"), "bpf-linker not built against the nightly's LLVM: {install}");
    assert!(stderr.contains("exit status: 3"), "the build step's own failure is what stopped it: {stderr}");
}

#[test]
fn run_installs_the_ebpf_toolchain_first() {
    assert_installs_before_build(&["run"]);
}

#[test]
fn build_installs_the_ebpf_toolchain_first() {
    assert_installs_before_build(&["build"]);
}

#[test]
fn build_ebpf_installs_the_ebpf_toolchain_first() {
    assert_installs_before_build(&["build-ebpf"]);
}

/// Once both are there, a build does not reinstall them (the step is a no-op on a set-up machine).
#[test]
fn an_installed_toolchain_is_not_reinstalled() {
    let fresh = Fresh::new("twice");
    let (first, _) = fresh.run(&["build-ebpf"]);
    assert!(first.iter().any(|c| c.contains("cargo install bpf-linker")), "{first:#?}");
    let (second, stderr) = fresh.run(&["build-ebpf"]);
    let reinstalls: Vec<&String> =
        second.iter().filter(|c| c.contains("cargo install") || c.contains("component add")).collect();
    assert!(reinstalls.is_empty(), "reinstalled on a set-up machine: {reinstalls:#?}\n{stderr}");
    assert!(second.iter().any(|c| c.starts_with("rustup run nightly cargo build")), "{second:#?}");
}
