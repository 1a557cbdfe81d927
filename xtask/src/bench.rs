//! `cargo xtask bench`: release build, the bench venv with LiteLLM, then `tollgate-bench`.

use super::*;

// ---------------------------------------------------------------------------------------------
// bench
// ---------------------------------------------------------------------------------------------

/// Options of `cargo xtask bench`, as parsed by the CLI.
pub(crate) struct BenchOpts {
    pub(crate) duration: u64,
    pub(crate) rate: u64,
    pub(crate) stream_rate: u64,
    pub(crate) no_litellm: bool,
    pub(crate) litellm_workers: u32,
    pub(crate) litellm_server: String,
    pub(crate) skip_setup: bool,
}

pub(crate) fn bench(o: &BenchOpts) -> Result<()> {
    if !o.skip_setup {
        setup()?;
    }
    // LiteLLM is the bench's own peer, not a build or test need: a failure to install it is
    // reported loudly and the other targets are still measured.
    let litellm = if o.no_litellm { Err(anyhow!("skipped on request (--no-litellm)")) } else { setup_bench_venv() };
    if let Err(e) = &litellm {
        let bar = "!".repeat(100);
        eprintln!("\n{bar}\n!!! bench: LiteLLM is NOT available, it will not be measured: {e:#}\n{bar}\n");
    }
    build(true)?;
    let dir = profile_dir(true);
    step("bench: direct vs tollgate (capture, gateway, TLS observed by uprobes) vs nginx vs LiteLLM (loopback)");
    let mut c = Command::new(dir.join("tollgate-bench"));
    c.arg("--tollgate")
        .arg(dir.join("tollgate"))
        .arg("--mock")
        .arg(dir.join("mock-llm"))
        .arg("--loadgen")
        .arg(dir.join("loadgen"))
        .args(["--duration", &o.duration.to_string(), "--rate", &o.rate.to_string()])
        .args(["--stream-rate", &o.stream_rate.to_string()])
        .args(["--litellm-workers", &o.litellm_workers.to_string(), "--litellm-server", &o.litellm_server])
        .current_dir(root());
    match &litellm {
        Ok(bin) => c.arg("--litellm").arg(bin),
        // `=`: the reason is the value even if it starts with a dash.
        Err(e) => c.arg(format!("--litellm-unavailable={e:#}")),
    };
    run_cmd(&mut c)
}

/// The LiteLLM proxy for `cargo xtask bench` (only the bench installs it), in a venv of its own
/// under target/: litellm requires openai<3, the scenarios' SDK venv pins openai 3.x. Returns the
/// `litellm` executable.
fn setup_bench_venv() -> Result<PathBuf> {
    let venv = root().join("target/xtask/bench-venv");
    let req = root().join("tests/clients/requirements-bench.txt");
    let want = std::fs::read_to_string(&req).with_context(|| format!("read {}", req.display()))?;
    let stamp = venv.join(".tollgate-requirements");
    let bin = venv.join("bin/litellm");
    if bin.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return Ok(bin);
    }
    step("bench: installing the LiteLLM proxy into target/xtask/bench-venv (requirements-bench.txt, about a minute)");
    let _ = std::fs::remove_file(&stamp);
    if !venv.join("bin/python").exists() {
        let python = which("python3").ok_or_else(|| anyhow!("python3 not found"))?;
        run_cmd(Command::new(&python).args(["-m", "venv"]).arg(&venv))?;
    }
    run_cmd(Command::new(venv.join("bin/pip")).args(["install", "-q", "--disable-pip-version-check", "-r"]).arg(&req))?;
    if !bin.is_file() {
        bail!("pip installed {} but there is no {}", req.display(), bin.display());
    }
    std::fs::write(&stamp, want)?;
    Ok(bin)
}
