//! `cargo xtask fuzz`: the cargo-fuzz targets of `fuzz/` (nightly, libFuzzer), each for a
//! fixed time on its committed corpus, with per-target runs, crashes and coverage; and the
//! short run `cargo xtask test` makes of every target.
//!
//! The committed seeds (`fuzz/corpus/<target>/`) are only read: libFuzzer writes what it finds
//! to a working corpus under `fuzz/target/corpus/<target>/` (kept between runs, not committed),
//! crash inputs to `fuzz/artifacts/<target>/`, and its log to `fuzz/target/logs/<target>.log`.
//! Targets are built without a sanitizer (the parsers are safe Rust; ASan would only slow them)
//! but with debug assertions, so arithmetic overflow is a crash too.

use super::*;

/// Every fuzz target (`fuzz/fuzz_targets/<name>.rs`), in the order they are run.
pub(crate) const TARGETS: &[&str] = &["json_cursor", "sse_split", "sniff", "jsonrpc", "translate", "config_load"];

/// Seconds per target in `cargo xtask test`.
pub(crate) const TEST_SECONDS: u64 = 5;

/// Longest a single input may run before libFuzzer reports it as a timeout (a crash here).
const INPUT_TIMEOUT_SECS: u64 = 10;

/// Flags shared by the build and the runs, so `run` finds the build it expects.
const BUILD_FLAGS: &[&str] = &["--sanitizer", "none", "--debug-assertions"];

/// What one target's run did.
pub(crate) struct Outcome {
    pub(crate) target: String,
    /// Seconds libFuzzer reports it ran.
    pub(crate) seconds: u64,
    /// Inputs executed.
    pub(crate) runs: u64,
    /// Crash, timeout and out-of-memory inputs it wrote (libFuzzer stops at the first).
    pub(crate) crashes: u64,
    /// Coverage (edges) and features of the last status line.
    pub(crate) cov: Option<u64>,
    pub(crate) ft: Option<u64>,
    /// Why the run failed, when it did.
    pub(crate) error: Option<String>,
}

impl Outcome {
    /// A target that could not run at all (install, build or start failed).
    fn failed(target: &str, e: &anyhow::Error) -> Outcome {
        Outcome {
            target: target.to_string(),
            seconds: 0,
            runs: 0,
            crashes: 0,
            cov: None,
            ft: None,
            error: Some(format!("{e:#}")),
        }
    }

    pub(crate) fn ok(&self) -> bool {
        self.crashes == 0 && self.error.is_none()
    }

    pub(crate) fn line(&self) -> String {
        let opt = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
        let mut s = format!(
            "{:<12} {:>5} s  {:>10} runs  {} crash(es)  cov {}  ft {}",
            self.target,
            self.seconds,
            self.runs,
            self.crashes,
            opt(self.cov),
            opt(self.ft)
        );
        if let Some(e) = &self.error {
            s.push_str(&format!("  FAILED: {e}"));
        }
        s
    }
}

fn fuzz_dir() -> PathBuf {
    root().join("fuzz")
}

/// Nightly and cargo-fuzz, installed when missing (a check first, so this is quick when they
/// are there).
fn setup_cargo_fuzz() -> Result<()> {
    if nightly_sysroot().is_err() {
        step("fuzz: installing the nightly toolchain");
        run_cmd(Command::new(rustup()).args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    if output(nightly("cargo").args(["fuzz", "--version"])).is_some() {
        return Ok(());
    }
    step("fuzz: installing cargo-fuzz (cargo +nightly install cargo-fuzz --locked)");
    run_cmd(nightly("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

/// Install what is needed and build the targets (all at once, so the runs do not rebuild).
fn build_targets() -> Result<()> {
    setup_cargo_fuzz()?;
    step("fuzz: building the fuzz targets (nightly, libFuzzer)");
    let mut c = nightly("cargo");
    c.current_dir(root()).args(["fuzz", "build"]).args(BUILD_FLAGS);
    run_cmd(&mut c)
}

/// Files in `dir` (none when it does not exist).
fn files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default()
}

/// Run one built target for `seconds` on its committed corpus.
fn run_target(target: &str, seconds: u64) -> Result<Outcome> {
    let dir = fuzz_dir();
    let seeds = dir.join("corpus").join(target);
    let work = dir.join("target/corpus").join(target);
    let artifacts = dir.join("artifacts").join(target);
    let logs = dir.join("target/logs");
    for d in [&work, &artifacts, &logs] {
        std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    if files(&seeds).is_empty() {
        bail!("no committed corpus in {}", seeds.display());
    }
    let before = files(&artifacts);
    let log_path = logs.join(format!("{target}.log"));
    let log = std::fs::File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
    step(&format!("fuzz: {target} for {seconds} s (log {})", log_path.display()));
    let mut prefix = artifacts.into_os_string();
    prefix.push("/");
    let mut c = nightly("cargo");
    c.current_dir(root())
        .args(["fuzz", "run"])
        .args(BUILD_FLAGS)
        .arg(target)
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg("-print_final_stats=1")
        .arg({
            let mut a = OsString::from("-artifact_prefix=");
            a.push(&prefix);
            a
        })
        .stdout(log.try_clone()?)
        .stderr(log);
    let t0 = Instant::now();
    let status = c.status().with_context(|| format!("spawn {c:?}"))?;
    let wall = t0.elapsed().as_secs();
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let new: Vec<PathBuf> = files(&dir.join("artifacts").join(target))
        .into_iter()
        .filter(|p| !before.contains(p))
        .filter(|p| {
            let n = p.file_name().unwrap_or_default().to_string_lossy();
            ["crash-", "timeout-", "oom-", "leak-"].iter().any(|k| n.starts_with(k))
        })
        .collect();
    let mut o = parse_log(target, &text);
    if o.seconds == 0 {
        // No `Done` line (it stopped at a crash): the wall time, start-up included.
        o.seconds = wall;
    }
    o.crashes = new.len() as u64;
    for p in &new {
        eprintln!("xtask: fuzz: {target}: crash input {}", p.display());
    }
    if !status.success() && o.crashes == 0 {
        o.error = Some(format!("libFuzzer exited with {status} without a crash input; see {}", log_path.display()));
    } else if o.crashes > 0 {
        o.error =
            Some(format!("reproduce: cargo +nightly fuzz run {} {target} {}", BUILD_FLAGS.join(" "), new[0].display()));
    }
    Ok(o)
}

/// Runs, seconds and coverage from libFuzzer's output: the last `#N ... cov: C ft: F` status
/// line and the final `Done N runs in S second(s)`.
fn parse_log(target: &str, text: &str) -> Outcome {
    let mut o =
        Outcome { target: target.to_string(), seconds: 0, runs: 0, crashes: 0, cov: None, ft: None, error: None };
    let field = |line: &str, key: &str| -> Option<u64> {
        let mut it = line.split_whitespace();
        it.by_ref().find(|w| *w == key)?;
        it.next()?.parse().ok()
    };
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix('#') {
            if let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse().ok()) {
                o.runs = n;
            }
            if let Some(c) = field(line, "cov:") {
                o.cov = Some(c);
            }
            if let Some(f) = field(line, "ft:") {
                o.ft = Some(f);
            }
        } else if let Some(rest) = line.strip_prefix("Done ") {
            // "Done 123 runs in 60 second(s)"
            let w: Vec<&str> = rest.split_whitespace().collect();
            if let (Some(runs), Some(secs)) =
                (w.first().and_then(|n| n.parse().ok()), w.get(3).and_then(|n| n.parse().ok()))
            {
                o.runs = runs;
                o.seconds = secs;
            }
        } else if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            if let Ok(n) = n.trim().parse() {
                o.runs = n;
            }
        }
    }
    o
}

/// Build, then run `targets` for `seconds` each; one outcome per target (a target that could
/// not run is an outcome with an error).
pub(crate) fn run_all(targets: &[&str], seconds: u64) -> Result<Vec<Outcome>> {
    build_targets()?;
    Ok(targets.iter().map(|t| run_target(t, seconds).unwrap_or_else(|e| Outcome::failed(t, &e))).collect())
}

/// `cargo xtask fuzz [--seconds N] [--target NAME]`.
pub(crate) fn fuzz(seconds: u64, target: Option<&str>) -> Result<()> {
    let targets: Vec<&str> = match target {
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("no fuzz target {t}; targets: {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    let outcomes = run_all(&targets, seconds)?;
    println!("==================== tollgate fuzz summary ====================");
    for o in &outcomes {
        println!("{}", o.line());
    }
    let failed = outcomes.iter().filter(|o| !o.ok()).count();
    if failed > 0 {
        bail!("{failed} fuzz target(s) failed");
    }
    Ok(())
}

/// The step `cargo xtask test` runs: every target for [`TEST_SECONDS`]. A target that crashed
/// or could not run (including a failed build or install) is a failed step.
pub(crate) fn test_step() -> Vec<Outcome> {
    step(&format!("test: fuzz targets, {TEST_SECONDS} s each (cargo xtask fuzz)"));
    run_all(TARGETS, TEST_SECONDS).unwrap_or_else(|e| vec![Outcome::failed("(build)", &e)])
}
