//! `cargo xtask test`: setup, build, the unit tests, the real-kernel scenarios (each its own
//! process with a timeout, leftovers cleaned up), the capture and TLS uprobe smoke tests and the fuzz targets,
//! then one summary with `summary: N passed, M failed`.

use super::*;

#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// Run `cmd`, echoing its stdout and stderr, and return (success, combined text).
fn tee(cmd: &mut Command) -> Result<(bool, String)> {
    let mut child =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("spawn {cmd:?}"))?;
    let (tx, rx) = mpsc::channel::<String>();
    let mut handles = Vec::new();
    for (stream, is_err) in [
        (Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>, false),
        (Box::new(child.stderr.take().expect("stderr")) as Box<dyn Read + Send>, true),
    ] {
        let tx = tx.clone();
        handles.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if is_err {
                    eprintln!("{line}");
                } else {
                    println!("{line}");
                }
                let _ = tx.send(line);
            }
        }));
    }
    drop(tx);
    let st = child.wait()?;
    for h in handles {
        let _ = h.join();
    }
    Ok((st.success(), rx.into_iter().collect::<Vec<_>>().join("\n")))
}

/// Sum libtest's `test result:` lines.
fn tally(text: &str) -> Tally {
    let mut t = Tally::default();
    for l in text.lines().filter(|l| l.starts_with("test result:")) {
        let num = |word: &str| -> u64 {
            l.split(';')
                .find_map(|part| {
                    let part = part
                        .trim()
                        .trim_start_matches("test result: ok.")
                        .trim_start_matches("test result: FAILED.")
                        .trim();
                    part.strip_suffix(word).and_then(|n| n.trim().parse().ok())
                })
                .unwrap_or(0)
        };
        t.passed += num("passed");
        t.failed += num("failed");
        t.ignored += num("ignored");
    }
    t
}

/// Path of the compiled `scenarios` test binary (builds it).
fn scenarios_binary() -> Result<PathBuf> {
    let out = cargo()
        .args(["test", "--workspace", "--exclude", "xtask", "--no-run", "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("building the scenarios failed");
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        if v["reason"] == "compiler-artifact" && v["target"]["name"] == "scenarios" && v["target"]["kind"][0] == "test"
        {
            if let Some(exe) = v["executable"].as_str() {
                return Ok(PathBuf::from(exe));
            }
        }
    }
    bail!("cargo did not report the scenarios executable")
}

enum Outcome {
    Passed(Duration),
    Failed(Duration, String),
    TimedOut(Duration),
}

fn run_scenario(exe: &Path, name: &str, timeout: Duration, env: &[(&str, OsString)]) -> Result<Outcome> {
    let start = Instant::now();
    let mut c = Command::new(exe);
    c.args(["--ignored", "--exact", name, "--test-threads=1"]).current_dir(root());
    for (k, v) in env {
        c.env(k, v);
    }
    // Own process group, so a timeout can stop the scenario's helpers (tollgate, mock, clients).
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    let mut child = c.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel::<String>();
    let mut handles = Vec::new();
    for stream in [
        Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().expect("stderr")) as Box<dyn Read + Send>,
    ] {
        let tx = tx.clone();
        handles.push(std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                println!("    {line}");
                let _ = tx.send(line);
            }
        }));
    }
    drop(tx);
    loop {
        if let Some(st) = child.try_wait()? {
            // Anything of the scenario's still alive (a leaked helper holding our pipes) goes too.
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).stderr(Stdio::null()).status();
            for h in handles {
                let _ = h.join();
            }
            let text: Vec<String> = rx.into_iter().collect();
            let text = text.join("\n");
            let ok = st.success() && text.contains(&format!("test {name} ... ok"));
            return Ok(if ok {
                Passed(start.elapsed())
            } else {
                Failed(start.elapsed(), first_error(&text).unwrap_or_else(|| format!("exit {st}")))
            });
        }
        if start.elapsed() > timeout {
            // The group id is the child's pid (process_group(0)); kill the whole group.
            let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
            let _ = child.wait();
            cleanup_leftovers(Some(&format!("tge{pid}")));
            return Ok(TimedOut(start.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
use Outcome::{Failed, Passed, TimedOut};

/// Remove what scenarios leave behind when they are killed before their guards run: network
/// namespaces, cgroup2 mounts and groups, bpffs pins, all named `tge<pid>-...` by the test
/// support library. `only`: that tag; otherwise every tag whose process is gone.
fn cleanup_leftovers(only: Option<&str>) {
    let stale = |name: &str| -> Option<String> {
        let rest = name.strip_prefix("tge")?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if digits.is_empty() || !rest[digits.len()..].starts_with('-') {
            return None;
        }
        let tag = format!("tge{digits}");
        let dead = !Path::new("/proc").join(&digits).exists();
        match only {
            Some(t) => (t == tag).then_some(tag),
            None => dead.then_some(tag),
        }
    };
    let mut cleaned = Vec::new();
    for line in output(Command::new("ip").args(["netns", "list"])).unwrap_or_default().lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if stale(name).is_some() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
            cleaned.push(format!("netns {name}"));
        }
    }
    if let Ok(rd) = std::fs::read_dir("/etc/netns") {
        for e in rd.flatten() {
            if stale(&e.file_name().to_string_lossy()).is_some() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for m in mounts.lines() {
        let f: Vec<&str> = m.split_whitespace().collect();
        if f.len() < 3 || f[2] != "cgroup2" {
            continue;
        }
        let mnt = Path::new(f[1]);
        let base = mnt.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let ours = stale(&base).is_some() && base.contains("-cgroup2-");
        // Groups are visible through any cgroup2 mount.
        if let Ok(rd) = std::fs::read_dir(mnt) {
            for e in rd.flatten() {
                if e.path().is_dir() && stale(&e.file_name().to_string_lossy()).is_some() {
                    let procs = std::fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
                    for pid in procs.lines() {
                        let _ = std::fs::write(mnt.join("cgroup.procs"), pid);
                    }
                    if std::fs::remove_dir(e.path()).is_ok() {
                        cleaned.push(format!("cgroup {}", e.path().display()));
                    }
                }
            }
        }
        if ours {
            let _ = Command::new("umount").arg("-l").arg(mnt).status();
            let _ = std::fs::remove_dir(mnt);
            cleaned.push(format!("mount {}", mnt.display()));
        }
    }
    if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains("-tollgate-") && stale(&name).is_some() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf") {
        for e in rd.flatten() {
            if stale(&e.file_name().to_string_lossy()).is_some() {
                let _ = std::fs::remove_dir_all(e.path());
                cleaned.push(format!("pins {}", e.path().display()));
            }
        }
    }
    if !cleaned.is_empty() {
        step(&format!("cleaned up after earlier scenarios: {}", cleaned.join(", ")));
    }
}

/// The first line of a failed scenario's error (anyhow's `Error: ...`) or panic message.
fn first_error(text: &str) -> Option<String> {
    let mut lines = text.lines();
    while let Some(l) = lines.next() {
        let t = l.trim();
        if let Some(rest) = t.strip_prefix("Error: ") {
            return Some(rest.chars().take(300).collect());
        }
        if t.contains("panicked at") {
            return lines.next().map(|m| m.trim().chars().take(300).collect());
        }
    }
    None
}

pub(crate) fn test(filter: Option<&str>, skip_setup: bool, skip_unit: bool, timeout: Duration) -> Result<()> {
    let t0 = Instant::now();
    if !skip_setup {
        setup()?;
    }
    build(false)?;

    let mut unit = Tally::default();
    let mut unit_ok = true;
    if !skip_unit {
        step("test: unit tests (cargo test --workspace)");
        let (ok, text) = tee(cargo().args(["test", "--workspace", "--exclude", "xtask"]))?;
        unit = tally(&text);
        unit_ok = ok;
        // xtask's own tests (a fresh machine's toolchain install, with a fake rustup): a
        // separate run so the workspace run above keeps one feature resolution.
        step("test: xtask tests (cargo test -p xtask)");
        let (ok, text) = tee(cargo().args(["test", "-p", "xtask"]))?;
        let x = tally(&text);
        unit.passed += x.passed;
        unit.failed += x.failed;
        unit.ignored += x.ignored;
        unit_ok &= ok;
    }

    step("test: end-to-end scenarios (serial, real kernel)");
    if !is_root() {
        bail!("the end-to-end scenarios need root");
    }
    cleanup_leftovers(None);
    let exe = scenarios_binary()?;
    let list = output(Command::new(&exe).args(["--ignored", "--list", "--format=terse"]))
        .ok_or_else(|| anyhow!("cannot list scenarios"))?;
    let names: Vec<String> = list
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .filter(|n| filter.is_none_or(|f| n.contains(f)))
        .map(str::to_string)
        .collect();
    if names.is_empty() {
        bail!("no scenarios matched");
    }
    let env = [
        ("TOLLGATE_BIN", profile_dir(false).join("tollgate").into_os_string()),
        ("TOLLGATE_E2E_PYTHON", root().join(".venv/bin/python").into_os_string()),
    ];
    let mut results: BTreeMap<String, Outcome> = BTreeMap::new();
    for n in &names {
        step(&format!("scenario {n}"));
        let o = run_scenario(&exe, n, timeout, &env)?;
        results.insert(n.clone(), o);
    }

    // The loader's and the TLS uprobes' own kernel tests (exact counter deltas, IPv4-mapped,
    // pod-without-address, fail-closed pins; the probes' joins, caps and ring overflow):
    // root-only like the scenarios, so they run here.
    let mut smoke = Tally::default();
    let mut smoke_ok = true;
    if filter.is_none() {
        for (name, what) in [("capture_smoke", "capture"), ("uprobe_smoke", "TLS uprobe")] {
            step(&format!("test: {what} smoke test (gateway/tests/{name}.rs, real kernel)"));
            let (ok, text) =
                tee(cargo().args(["test", "-p", "tollgate", "--test", name, "--", "--ignored", "--test-threads=1"]))?;
            let t = tally(&text);
            smoke_ok &= ok && t.passed > 0;
            smoke.passed += t.passed;
            smoke.failed += t.failed;
            smoke.ignored += t.ignored;
        }
    }
    // Every fuzz target for a few seconds on its committed corpus (a crash fails the run).
    let fuzzed = if filter.is_none() { fuzz::test_step() } else { Vec::new() };

    let (mut e2e_pass, mut e2e_fail) = (0u64, 0u64);
    println!();
    println!("==================== tollgate test summary ====================");
    if skip_unit {
        println!("unit tests: skipped");
    } else {
        println!(
            "unit tests: {} passed, {} failed, {} ignored{}",
            unit.passed,
            unit.failed,
            unit.ignored,
            if unit_ok { "" } else { "  (cargo test FAILED)" }
        );
    }
    if filter.is_none() {
        println!(
            "kernel smoke tests (capture, TLS uprobe): {} passed, {} failed{}",
            smoke.passed,
            smoke.failed,
            if smoke_ok { "" } else { "  (FAILED)" }
        );
    }
    e2e_pass += smoke.passed;
    e2e_fail += smoke.failed + u64::from(!smoke_ok && smoke.failed == 0);
    if filter.is_none() {
        println!("fuzz targets ({} s each):", fuzz::TEST_SECONDS);
    }
    for o in &fuzzed {
        println!("  {}  {}", if o.ok() { "PASS" } else { "FAIL" }, o.line());
        if o.ok() {
            e2e_pass += 1;
        } else {
            e2e_fail += 1;
        }
    }
    println!("end-to-end scenarios:");
    for (n, o) in &results {
        match o {
            Passed(d) => {
                e2e_pass += 1;
                println!("  PASS  {n}  ({:.1} s)", d.as_secs_f64());
            }
            Failed(d, why) => {
                e2e_fail += 1;
                println!("  FAIL  {n}  ({:.1} s): {why}", d.as_secs_f64());
            }
            TimedOut(d) => {
                e2e_fail += 1;
                println!("  FAIL  {n}  (killed after {:.0} s timeout)", d.as_secs_f64());
            }
        }
    }
    println!("total time {:.0} s", t0.elapsed().as_secs_f64());
    let unit_failed = unit.failed + u64::from(!unit_ok && unit.failed == 0);
    println!("summary: {} passed, {} failed", unit.passed + e2e_pass, unit_failed + e2e_fail);
    if unit_failed + e2e_fail > 0 {
        bail!("{} unit test(s) and {e2e_fail} scenario(s) failed", unit_failed);
    }
    Ok(())
}
