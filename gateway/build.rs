//! Embeds the eBPF object built by `cargo xtask build` (`ebpf/`, nightly, bpfel-unknown-none).
//!
//! The object is copied into `OUT_DIR` and included with `include_bytes!` by the capture loader.
//! When it has not been built, an empty file is written instead so `cargo build` / `cargo test`
//! of the gateway work without the BPF toolchain; the loader then fails at runtime with
//! "eBPF object not embedded: run `cargo xtask build`".

use std::env;
use std::fs;
use std::path::PathBuf;

const OBJECT_ENV: &str = "TOLLGATE_EBPF_OBJECT";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));

    let object = match env::var_os(OBJECT_ENV) {
        Some(p) => PathBuf::from(p),
        None => manifest_dir.join("../ebpf/target/bpfel-unknown-none/release/tollgate-ebpf"),
    };
    println!("cargo:rerun-if-env-changed={OBJECT_ENV}");
    // Cargo re-runs the script when the file appears, changes or disappears.
    println!("cargo:rerun-if-changed={}", object.display());

    let dest = out_dir.join("tollgate-ebpf.o");
    let bytes = match fs::read(&object) {
        Ok(b) => b,
        Err(e) => {
            println!(
                "cargo:warning=eBPF object {} not found ({e}); embedding an empty object. Run `cargo xtask build` for a working capture.",
                object.display()
            );
            Vec::new()
        }
    };
    if let Err(e) = fs::write(&dest, &bytes) {
        panic!("cannot write {}: {e}", dest.display());
    }
}
