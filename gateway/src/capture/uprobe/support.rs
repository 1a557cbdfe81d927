//! What this host offers the TLS uprobes, read without loading anything: `tollgate check` prints
//! it so an operator learns before deploying that a node will observe TLS at L4 only, and why.
//!
//! Everything is read below a root directory (`/` in production) so the verdicts can be tested
//! against made-up `/sys` and `/proc` trees.

use std::path::{Path, PathBuf};

/// `CAP_SYS_ADMIN` bit in `/proc/self/status` `CapEff`: this kernel needs it for
/// `perf_event_open` of a uprobe (README), and it implies what `CAP_BPF` and `CAP_PERFMON` grant.
const CAP_SYS_ADMIN: u32 = 21;

/// One requirement of the TLS uprobes and whether this host meets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    /// Short name shown to the operator (`uprobe PMU`, `tracefs`, `capabilities`).
    pub what: &'static str,
    /// Met or not.
    pub met: bool,
    /// The evidence, or what is missing and what it means.
    pub detail: String,
}

/// The verdict for one host: every requirement with its evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Support {
    /// In the order they are checked.
    pub requirements: Vec<Requirement>,
}

impl Support {
    /// Reads the requirements below `root` (`/` in production).
    pub fn probe(root: &Path) -> Support {
        Support { requirements: vec![pmu(root), tracefs(root), capabilities(root)] }
    }

    /// True when `tollgate run` can attach the TLS uprobes here.
    pub fn supported(&self) -> bool {
        self.requirements.iter().all(|r| r.met)
    }

    /// Human-readable lines for `tollgate check` (one per requirement, then the verdict).
    pub fn report(&self, enabled: bool) -> Vec<String> {
        let mut out: Vec<String> = self
            .requirements
            .iter()
            .map(|r| format!("uprobes: {} {}: {}", if r.met { "ok" } else { "MISSING" }, r.what, r.detail))
            .collect();
        out.push(match (enabled, self.supported()) {
            (false, _) => "uprobes: disabled in config (capture.uprobes.enabled: false): TLS that is not \
                           intercepted is observed at L4 only"
                .to_owned(),
            (true, true) => "uprobes: supported: TLS plaintext of captured connections is observed without \
                             interception (tollgate_uprobe_available 1)"
                .to_owned(),
            (true, false) => "uprobes: NOT supported on this host: `tollgate run` starts without them and \
                              observes TLS that is not intercepted at L4 only (tollgate_uprobe_available 0)"
                .to_owned(),
        });
        out
    }
}

fn under(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

fn pmu(root: &Path) -> Requirement {
    let p = under(root, super::UPROBE_PMU);
    let met = p.is_dir();
    let detail = if met {
        format!("{} present", super::UPROBE_PMU)
    } else {
        format!("{} missing: the kernel was built without CONFIG_UPROBE_EVENTS", super::UPROBE_PMU)
    };
    Requirement { what: "uprobe PMU", met, detail }
}

/// tracefs gives the syscall tracepoints' ids (the fd of each SSL call). tollgate mounts it when
/// it is not mounted, so what matters is that the kernel has it.
fn tracefs(root: &Path) -> Requirement {
    let mounted = std::fs::read_dir(under(root, "/sys/kernel/tracing/events/syscalls"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if mounted {
        return Requirement {
            what: "tracefs",
            met: true,
            detail: "mounted at /sys/kernel/tracing with syscall tracepoints".to_owned(),
        };
    }
    let known = std::fs::read_to_string(under(root, "/proc/filesystems"))
        .map(|s| s.lines().any(|l| l.split_whitespace().last() == Some("tracefs")))
        .unwrap_or(false);
    if known {
        Requirement {
            what: "tracefs",
            met: true,
            detail: "not mounted; `tollgate run` mounts it at /sys/kernel/tracing (the DaemonSet mounts the \
                     host's)"
                .to_owned(),
        }
    } else {
        Requirement {
            what: "tracefs",
            met: false,
            detail: "the kernel has no tracefs (/proc/filesystems): the syscall tracepoints that tie TLS calls \
                     to sockets cannot be attached"
                .to_owned(),
        }
    }
}

/// Effective capabilities of this process, as `tollgate run` started the same way would have.
fn capabilities(root: &Path) -> Requirement {
    let status = std::fs::read_to_string(under(root, "/proc/self/status")).unwrap_or_default();
    let eff =
        status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    let Some(eff) = eff else {
        return Requirement {
            what: "capabilities",
            met: false,
            detail: "cannot read CapEff from /proc/self/status".to_owned(),
        };
    };
    if eff & (1u64 << CAP_SYS_ADMIN) != 0 {
        Requirement { what: "capabilities", met: true, detail: "CAP_SYS_ADMIN effective".to_owned() }
    } else {
        Requirement {
            what: "capabilities",
            met: false,
            detail: "this process lacks CAP_SYS_ADMIN, which attaching a uprobe needs (run as root or with the \
                     DaemonSet's capabilities)"
                .to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(pmu: bool, tracefs_mounted: bool, tracefs_known: bool, cap_eff: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let mk = |p: &str| std::fs::create_dir_all(under(d.path(), p)).unwrap();
        if pmu {
            mk("/sys/bus/event_source/devices/uprobe");
        }
        if tracefs_mounted {
            mk("/sys/kernel/tracing/events/syscalls/sys_enter_read");
        }
        mk("/proc/self");
        let fs = if tracefs_known { "nodev\tsysfs\nnodev\ttracefs\n\text4\n" } else { "nodev\tsysfs\n\text4\n" };
        std::fs::write(under(d.path(), "/proc/filesystems"), fs).unwrap();
        std::fs::write(under(d.path(), "/proc/self/status"), format!("Name:\ttollgate\nCapEff:\t{cap_eff}\n")).unwrap();
        d
    }

    const ALL_CAPS: &str = "000001ffffffffff";

    #[test]
    fn a_kernel_with_everything_is_supported() {
        let d = tree(true, true, true, ALL_CAPS);
        let s = Support::probe(d.path());
        assert!(s.supported(), "{s:?}");
        let r = s.report(true);
        assert!(r.last().unwrap().starts_with("uprobes: supported"), "{r:?}");
    }

    #[test]
    fn a_kernel_without_the_uprobe_pmu_is_reported_as_l4_only() {
        let d = tree(false, true, true, ALL_CAPS);
        let s = Support::probe(d.path());
        assert!(!s.supported());
        let r = s.report(true);
        assert!(r.iter().any(|l| l.contains("MISSING uprobe PMU") && l.contains("CONFIG_UPROBE_EVENTS")), "{r:?}");
        assert!(r.last().unwrap().contains("NOT supported") && r.last().unwrap().contains("L4 only"), "{r:?}");
    }

    #[test]
    fn unmounted_tracefs_is_fine_when_the_kernel_has_it() {
        let s = Support::probe(tree(true, false, true, ALL_CAPS).path());
        assert!(s.supported(), "{s:?}");
        let s = Support::probe(tree(true, false, false, ALL_CAPS).path());
        assert!(!s.supported());
        assert!(s.requirements[1].detail.contains("no tracefs"), "{s:?}");
    }

    #[test]
    fn missing_capabilities_are_named() {
        // Everything but CAP_SYS_ADMIN (bit 21).
        let eff = format!("{:016x}", 0x1ff_ffff_ffffu64 & !(1 << 21));
        let s = Support::probe(tree(true, true, true, &eff).path());
        assert!(!s.supported());
        assert!(s.requirements[2].detail.contains("lacks CAP_SYS_ADMIN"), "{s:?}");
        // CAP_SYS_ADMIN alone is enough.
        let s = Support::probe(tree(true, true, true, &format!("{:016x}", 1u64 << 21)).path());
        assert!(s.supported(), "{s:?}");
    }

    #[test]
    fn disabled_in_config_says_so_whatever_the_kernel() {
        let s = Support::probe(tree(false, false, false, "0").path());
        assert!(s.report(false).last().unwrap().contains("disabled in config"));
    }
}
