//! `cargo xtask soak`: build (debug, or release with `--release`), then run `tollgate-soak run`
//! for `--minutes`. Not part of CI: it takes minutes and needs root, BPF, redis-server and the
//! Python venv (the MCP SDK server). The CSV and summary go under target/soak/.

use super::*;

/// Options of `cargo xtask soak`, as parsed by the CLI.
pub(crate) struct SoakOpts {
    pub(crate) minutes: f64,
    pub(crate) release: bool,
    pub(crate) skip_setup: bool,
    pub(crate) extra: Vec<String>,
}

pub(crate) fn soak(o: &SoakOpts) -> Result<()> {
    if !o.skip_setup {
        setup()?;
    }
    build(o.release)?;
    let dir = profile_dir(o.release);
    let profile = if o.release { "release" } else { "debug" };
    step(&format!("soak: {} min of mixed traffic and faults against the {profile} tollgate", o.minutes));
    let mut c = Command::new(dir.join("tollgate-soak"));
    c.arg("run")
        .arg("--tollgate")
        .arg(dir.join("tollgate"))
        .arg("--mock")
        .arg(dir.join("mock-llm"))
        .args(["--profile", profile, "--minutes", &o.minutes.to_string()])
        .arg("--out")
        .arg(root().join("target/soak"))
        .args(&o.extra)
        .current_dir(root());
    run_cmd(&mut c)
}
