//! Process accounting for the bench, read straight from `/proc`: which processes make up a proxy
//! (nginx and LiteLLM fork workers), how much CPU they used and how much memory they hold, so the
//! tables can charge each proxy its own cost without any extra tooling.

use std::path::PathBuf;

/// The first `tool` on `PATH`, so missing prerequisites (wrk, nginx) fail before anything starts.
pub(crate) fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(tool)).find(|p| p.is_file()))
}

/// `pid` and all its descendants (alive now).
pub(crate) fn descendants(pid: u32) -> Vec<u32> {
    let mut parent: Vec<(u32, u32)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Some(pp) = stat_fields(p).and_then(|f| f.get(1).and_then(|v| v.parse().ok())) {
                parent.push((p, pp));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(parent.iter().filter(|(_, pp)| *pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    out
}

/// Fields of `/proc/<pid>/stat` after the command name (index 0 is the state).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// utime + stime of `pids`, in clock ticks.
pub(crate) fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| stat_fields(*p))
        .map(|f| {
            f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        })
        .sum()
}

/// Clock ticks per second, to turn `cpu_ticks` into time (100 when sysconf cannot tell).
pub(crate) fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Sum of VmRSS of `pids`, in MB.
pub(crate) fn tree_rss_mb(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .sum::<f64>()
        / 1024.0
}

/// utime + stime of every child the bench has waited for so far (`RUSAGE_CHILDREN`), in
/// microseconds: the difference around one wrk or `loadgen` run is that client's own CPU time,
/// including what the TLS uprobes cost it (a uprobe runs in the probed process's context).
pub(crate) fn children_cpu_us() -> f64 {
    // SAFETY: getrusage(2) fills the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return f64::NAN;
    }
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

/// The shared `libssl.so*` files `bin` is linked against (from `ldd`), for
/// `capture.uprobes.paths`: probed from tollgate's start, a client's first call is observed too.
pub(crate) fn libssl_of(bin: &std::path::Path) -> Vec<String> {
    let Ok(out) = std::process::Command::new("ldd").arg(bin).output() else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with("libssl.so"))
        .filter_map(|l| l.split("=>").nth(1)?.split_whitespace().next().map(str::to_string))
        .collect()
}
