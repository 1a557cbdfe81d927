//! Developer and CI tasks for tollgate: `cargo xtask <setup|build-ebpf|build|run|test|bench|fuzz>`.
//!
//! Everything a fresh machine lacks is installed by `setup` (idempotent; a no-op taking well
//! under a second when all is present), which `test` and `bench` run first, so `.ci/run` is just
//! `cargo xtask test`.

mod bench;
mod fuzz;
mod soak;
mod suite;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "tollgate build, test and benchmark tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what builds and tests need (nightly rust-src, bpf-linker, Debian tools, Python venv).
    Setup,
    /// Build the eBPF object (nightly, bpfel-unknown-none).
    BuildEbpf,
    /// Build the eBPF object, tollgate and the test binaries.
    Build {
        /// Release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build, then `tollgate run` with the embedded default config (needs root).
    Run {
        /// Release profile.
        #[arg(long)]
        release: bool,
        /// Arguments after `run` (e.g. `-- --config tollgate.yaml`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, build, unit tests, then the real-kernel end-to-end scenarios (needs root).
    Test {
        /// Only scenarios whose name contains this.
        #[arg(long)]
        filter: Option<String>,
        /// Skip `setup` (when you know everything is installed).
        #[arg(long)]
        skip_setup: bool,
        /// Skip the unit tests.
        #[arg(long)]
        skip_unit: bool,
        /// Seconds before a scenario is killed and counted as failed.
        #[arg(long, default_value_t = 240)]
        scenario_timeout: u64,
    },
    /// Regenerate the README's configuration reference from the config schema.
    Docs,
    /// Latency, TTFT and throughput of tollgate (capture, gateway, and HTTPS observed through its
    /// TLS uprobes) vs direct vs nginx vs the LiteLLM proxy on loopback (release build, needs root).
    Bench {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Common request rate for the non-streamed latency measurements (lowered to half the
        /// slowest target's max throughput when that is below it).
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// Common rate of streamed requests for the TTFT measurements.
        #[arg(long, default_value_t = 50)]
        stream_rate: u64,
        /// Do not install or measure the LiteLLM proxy.
        #[arg(long)]
        no_litellm: bool,
        /// LiteLLM worker processes.
        #[arg(long, default_value_t = 2)]
        litellm_workers: u32,
        /// LiteLLM's ASGI server: granian (fastest measured on 2 cores), uvicorn or gunicorn.
        #[arg(long, default_value = "granian")]
        litellm_server: String,
        /// Skip `setup`.
        #[arg(long)]
        skip_setup: bool,
    },
    /// Run the cargo-fuzz targets of `fuzz/` (nightly; installs cargo-fuzz) on their corpus.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
    },
    /// Mixed traffic and injected faults for N minutes against the real tollgate, sampling its
    /// memory, fds, threads, tasks and eBPF maps; fails on growth or lost/double-counted calls
    /// (needs root; not in CI).
    Soak {
        /// Length of the run.
        #[arg(long, default_value_t = 5.0)]
        minutes: f64,
        /// Release build (default: debug).
        #[arg(long)]
        release: bool,
        /// Skip `setup`.
        #[arg(long)]
        skip_setup: bool,
        /// More arguments for `tollgate-soak run` (e.g. `-- --fault-secs 10`).
        #[arg(last = true)]
        extra: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Docs => docs(),
        Cmd::BuildEbpf => build_ebpf(),
        Cmd::Build { release } => build(release),
        Cmd::Run { release, args } => run(release, &args),
        Cmd::Test { filter, skip_setup, skip_unit, scenario_timeout } => {
            suite::test(filter.as_deref(), skip_setup, skip_unit, Duration::from_secs(scenario_timeout))
        }
        Cmd::Bench { duration, rate, stream_rate, no_litellm, litellm_workers, litellm_server, skip_setup } => {
            bench::bench(&bench::BenchOpts {
                duration,
                rate,
                stream_rate,
                no_litellm,
                litellm_workers,
                litellm_server,
                skip_setup,
            })
        }
        Cmd::Fuzz { seconds, target } => fuzz::fuzz(seconds, target.as_deref()),
        Cmd::Soak { minutes, release, skip_setup, extra } => {
            soak::soak(&soak::SoakOpts { minutes, release, skip_setup, extra })
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn step(msg: &str) {
    // Bold only on a terminal: CI logs and files stay plain text.
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none() {
        eprintln!("\x1b[1mxtask: {msg}\x1b[0m");
    } else {
        eprintln!("xtask: {msg}");
    }
}

/// Run to completion with inherited stdio; error on non-zero exit.
fn run_cmd(cmd: &mut Command) -> Result<()> {
    let desc = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("spawn {desc}"))?;
    if !st.success() {
        bail!("{desc}: {st}");
    }
    Ok(())
}

/// Run and capture stdout (stderr inherited); `None` if it could not run or failed.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"))
}

fn rustup() -> PathBuf {
    which("rustup").unwrap_or_else(|| cargo_home().join("bin/rustup"))
}

/// Stable cargo (the one running us), with the workspace root as cwd.
fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// `rustup run nightly <prog>` with a clean toolchain environment.
fn nightly(prog: &str) -> Command {
    let mut c = Command::new(rustup());
    c.args(["run", "nightly", prog]).env_remove("RUSTUP_TOOLCHAIN").env_remove("RUSTC").env_remove("RUSTDOC");
    c
}

fn nightly_sysroot() -> Result<PathBuf> {
    let s = output(nightly("rustc").args(["--print", "sysroot"]))
        .ok_or_else(|| anyhow!("no nightly toolchain (`rustup toolchain install nightly`)"))?;
    Ok(PathBuf::from(s.trim()))
}

/// The nightly's LLVM shared library (`libLLVM.so.<major>.<minor>-rust-...`) and its major.
fn nightly_llvm() -> Result<(PathBuf, u32)> {
    let lib = nightly_sysroot()?.join("lib");
    for e in std::fs::read_dir(&lib).with_context(|| format!("read {}", lib.display()))? {
        let p = e?.path();
        let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if let Some(v) = name.strip_prefix("libLLVM.so.") {
            if name.contains("-rust-") {
                let major = v.split('.').next().and_then(|m| m.parse().ok()).ok_or_else(|| anyhow!("bad {name}"))?;
                return Ok((p, major));
            }
        }
    }
    bail!("no libLLVM.so.*-rust-* in {}", lib.display())
}

/// PATH and LD_LIBRARY_PATH under which bpf-linker (dynamically linked against the nightly's
/// LLVM) runs.
fn bpf_env(cmd: &mut Command) -> Result<()> {
    let lib = nightly_sysroot()?.join("lib");
    let mut ld = OsString::from(lib);
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        ld.push(":");
        ld.push(old);
    }
    let mut path = OsString::from(cargo_home().join("bin"));
    path.push(":");
    path.push(std::env::var_os("PATH").unwrap_or_default());
    cmd.env("LD_LIBRARY_PATH", ld).env("PATH", path);
    Ok(())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

// ---------------------------------------------------------------------------------------------
// setup
// ---------------------------------------------------------------------------------------------

const BPF_LINKER_REQ: &str = "^0.13";
/// Debian packages by the binary (or, for an absolute path, the file) the tests or the bench
/// need from them.
const DEBIAN: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    // loadgen's OpenSSL client (`openssl-sys` builds against the system's libssl).
    ("pkg-config", "pkg-config"),
    ("/usr/include/openssl/ssl.h", "libssl-dev"),
    ("curl", "curl"),
    ("nginx", "nginx"),
    ("wrk", "wrk"),
    ("prometheus", "prometheus"),
    ("redis-server", "redis-server"),
    ("kubectl", "kubectl"),
];

fn setup() -> Result<()> {
    let t0 = Instant::now();
    setup_build_toolchain()?;
    setup_debian()?;
    setup_venv()?;
    step(&format!("setup: done in {:.1} s", t0.elapsed().as_secs_f64()));
    Ok(())
}

/// The part of `setup` that building needs (nightly `rust-src` and `bpf-linker`): every task
/// that builds the eBPF object runs it first, so `cargo xtask run` works on a fresh machine
/// without `setup` or `test` having run. A no-op when both are present.
fn setup_build_toolchain() -> Result<()> {
    setup_rust_src()?;
    setup_bpf_linker()
}

fn setup_rust_src() -> Result<()> {
    let installed = output(Command::new(rustup()).args(["component", "list", "--toolchain", "nightly", "--installed"]))
        .unwrap_or_default();
    if installed.lines().any(|l| l.trim().starts_with("rust-src")) {
        return Ok(());
    }
    step("setup: adding rust-src to the nightly toolchain");
    run_cmd(Command::new(rustup()).args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn bpf_linker_version() -> Option<String> {
    let bin = which("bpf-linker").unwrap_or_else(|| cargo_home().join("bin/bpf-linker"));
    let mut c = Command::new(bin);
    c.arg("--version");
    bpf_env(&mut c).ok()?;
    output(&mut c)
}

fn setup_bpf_linker() -> Result<()> {
    if bpf_linker_version().is_some_and(|v| v.contains(" 0.13")) {
        return Ok(());
    }
    let (llvm, major) = nightly_llvm()?;
    step(&format!(
        "setup: building bpf-linker {BPF_LINKER_REQ} against the nightly's LLVM {major} (takes a few minutes)"
    ));
    // bpf-linker links `-lLLVM` from $LLVM_PREFIX/lib: point that at the nightly's own LLVM.
    let prefix = target_dir().join("xtask/llvm-prefix");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    let soname = llvm.file_name().expect("file name");
    for link in [OsString::from("libLLVM.so"), soname.to_os_string()] {
        let p = lib.join(&link);
        let _ = std::fs::remove_file(&p);
        std::os::unix::fs::symlink(&llvm, &p)?;
    }
    // Find the LLVM at run time without LD_LIBRARY_PATH.
    let rpath = format!("-C link-arg=-Wl,-rpath,{}", llvm.parent().expect("dir").display());
    let install = |locked: bool| {
        let mut c = nightly("cargo");
        c.args(["install", "bpf-linker", "--force", "--version", BPF_LINKER_REQ, "--no-default-features"])
            .args(["--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix)
            .env("RUSTFLAGS", &rpath);
        if locked {
            c.arg("--locked");
        }
        run_cmd(&mut c)
    };
    // --locked reproduces the release's own lock file; if a pinned dependency is refused by
    // this nightly, resolve afresh.
    if install(true).is_err() {
        install(false)?;
    }
    let v = bpf_linker_version().ok_or_else(|| anyhow!("bpf-linker installed but `bpf-linker --version` fails"))?;
    step(&format!("setup: {}", v.trim()));
    Ok(())
}

fn setup_debian() -> Result<()> {
    let present = |bin: &str| if bin.starts_with('/') { Path::new(bin).exists() } else { which(bin).is_some() };
    let missing: Vec<&str> = DEBIAN.iter().filter(|(bin, _)| !present(bin)).map(|(_, pkg)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}; install them (apt-get install {}) or run as root",
            missing.join(" ")
        );
    }
    step(&format!("setup: apt-get install {}", missing.join(" ")));
    run_cmd(Command::new("apt-get").arg("update").arg("-q"))?;
    // Keep package scripts from starting services (nginx would bind :80 in the background).
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let made_policy = !policy.exists();
    if made_policy {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
    }
    let r = run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    );
    if made_policy {
        let _ = std::fs::remove_file(policy);
    }
    r
}

fn setup_venv() -> Result<()> {
    let venv = root().join(".venv");
    let req = root().join("tests/clients/requirements.txt");
    let want = std::fs::read_to_string(&req).with_context(|| format!("read {}", req.display()))?;
    let stamp = venv.join(".tollgate-requirements");
    let py = venv.join("bin/python");
    // Cheap check (importing the SDKs takes seconds): the stamp matches the requirements and
    // the pinned distributions are installed.
    let pins: Vec<&str> = want.lines().filter(|l| l.starts_with("openai==") || l.starts_with("anthropic==")).collect();
    let probe =
        "import importlib.metadata as m; print(' '.join(f'{d}=={m.version(d)}' for d in ('anthropic', 'openai')))";
    let installed = output(Command::new(&py).args(["-c", probe])).unwrap_or_default();
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str())
        && pins.len() == 2
        && pins.iter().all(|p| installed.split_whitespace().any(|i| i == *p))
    {
        return Ok(());
    }
    step("setup: creating the Python venv (.venv) with the pinned SDKs");
    if !py.exists() {
        let python = which("python3").ok_or_else(|| anyhow!("python3 not found"))?;
        if run_cmd(Command::new(&python).args(["-m", "venv"]).arg(&venv)).is_err() {
            // Debian's python3 keeps venv/ensurepip in a separate package.
            run_cmd(
                Command::new("apt-get")
                    .args(["install", "-y", "-q", "python3-venv"])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
            let _ = std::fs::remove_dir_all(&venv);
            run_cmd(Command::new(&python).args(["-m", "venv"]).arg(&venv))?;
        }
    }
    run_cmd(Command::new(venv.join("bin/pip")).args(["install", "-q", "--disable-pip-version-check", "-r"]).arg(&req))?;
    std::fs::write(&stamp, want)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// build / run
// ---------------------------------------------------------------------------------------------

fn build_ebpf() -> Result<()> {
    let dir = root().join("ebpf");
    if !dir.join("Cargo.toml").exists() {
        bail!("{} has no Cargo.toml yet: the eBPF crate is not there", dir.display());
    }
    setup_build_toolchain()?;
    step("build-ebpf: cargo +nightly build --release (ebpf/)");
    let mut c = nightly("cargo");
    c.args(["build", "--release"]).current_dir(&dir);
    bpf_env(&mut c)?;
    run_cmd(&mut c)?;
    let obj = dir.join("target/bpfel-unknown-none/release/tollgate-ebpf");
    if !obj.exists() {
        bail!("eBPF build succeeded but {} is missing", obj.display());
    }
    Ok(())
}

/// Cargo's target directory (`CARGO_TARGET_DIR` when set): build outputs and xtask's own state.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"))
}

fn profile_dir(release: bool) -> PathBuf {
    target_dir().join(if release { "release" } else { "debug" })
}

fn build(release: bool) -> Result<()> {
    build_ebpf()?;
    step(&format!("build: tollgate and test binaries ({})", if release { "release" } else { "debug" }));
    // `--workspace` everywhere (build, test, --no-run): one feature resolution, so the test
    // steps reuse what this built instead of recompiling shared dependencies.
    let mut c = cargo();
    c.args(["build", "--workspace", "--exclude", "xtask", "--bins"]);
    if release {
        c.arg("--release");
    }
    run_cmd(&mut c)
}

fn run(release: bool, args: &[String]) -> Result<()> {
    build(release)?;
    let bin = profile_dir(release).join("tollgate");
    step(&format!("run: {} run {}", bin.display(), args.join(" ")));
    let st = Command::new(&bin).arg("run").args(args).status()?;
    if !st.success() {
        bail!("tollgate exited with {st}");
    }
    Ok(())
}

/// Rewrite the README's generated configuration reference: the gateway's own check of it, run
/// in update mode (one place knows the markers and the table format).
fn docs() -> Result<()> {
    step("docs: regenerating the README's configuration reference from the schema");
    run_cmd(cargo().env("TOLLGATE_UPDATE_README", "1").args([
        "test",
        "-p",
        "tollgate",
        "--lib",
        "--",
        "--exact",
        "config::reference::tests::readme_config_reference_is_generated_from_the_schema",
    ]))
}
