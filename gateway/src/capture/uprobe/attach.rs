//! Loading the TLS programs and attaching them: the syscall tracepoints once, the uprobes once
//! per library file. The links are owned by the programs inside the capture's `Ebpf`, so they
//! go when capture shuts down (or this process dies).

use std::path::{Path, PathBuf};

use aya::programs::uprobe::UProbeScope;
use aya::programs::{ProgramError, TracePoint, UProbe};
use aya::Ebpf;
use gateway_common::progs;

use super::discover::Candidate;
use super::UprobeError;

/// Where tracefs is expected (aya looks here first).
const TRACEFS: &str = "/sys/kernel/tracing";

/// Send syscalls: their entry tells the fd an SSL call uses.
const SEND_SYSCALLS: [&str; 4] = ["write", "writev", "sendto", "sendmsg"];
/// Receive syscalls: their entry tells the fd an SSL call uses and, with their exit, arms the
/// thread's receive token (how memory-BIO stacks' `SSL*`s find their fd).
const RECV_SYSCALLS: [&str; 4] = ["read", "readv", "recvfrom", "recvmsg"];

/// Probes with their own return program, optional: (symbol, entry, return or none). The
/// handshake binds memory-BIO `SSL*`s early; `SSL_free` forgets a freed object's fd.
const EXTRA_PROBES: [(&str, &str, Option<&str>); 2] =
    [("SSL_do_handshake", progs::SSL_HANDSHAKE, Some(progs::SSL_HANDSHAKE_RET)), ("SSL_free", progs::SSL_FREE, None)];

/// Entry probes by symbol, and whether the symbol is required (OpenSSL < 1.1.1 has no `_ex`).
const ENTRY_PROBES: [(&str, &str, bool); 4] = [
    ("SSL_write", progs::SSL_WRITE, true),
    ("SSL_read", progs::SSL_READ, true),
    ("SSL_write_ex", progs::SSL_WRITE_EX, false),
    ("SSL_read_ex", progs::SSL_READ_EX, false),
];

/// The tracepoint programs.
const TRACEPOINT_PROGRAMS: [&str; 7] = [
    progs::TLS_SYS_FD,
    progs::TLS_RECV_ENTER,
    progs::TLS_RECV_EXIT,
    progs::TLS_CONNECT_ENTER,
    progs::TLS_CONNECT_EXIT,
    progs::TLS_CLOSE,
    progs::TLS_EXEC,
];

/// Every uprobe program: the entry probes, their shared return, the extra probes.
fn uprobe_programs() -> impl Iterator<Item = &'static str> {
    ENTRY_PROBES
        .iter()
        .map(|(_, n, _)| *n)
        .chain([progs::SSL_RET])
        .chain(EXTRA_PROBES.iter().flat_map(|(_, e, r)| std::iter::once(*e).chain(*r)))
}

/// Offset the kernel programs read the first syscall argument (or `ret`) at.
const ARG0_OFFSET: usize = 16;

/// Load every TLS program into the kernel (the verifier runs here).
pub fn load_programs(ebpf: &mut Ebpf) -> Result<(), UprobeError> {
    for name in uprobe_programs() {
        uprobe(ebpf, name)?.load().map_err(|source| UprobeError::Load { name, source })?;
    }
    for name in TRACEPOINT_PROGRAMS {
        tracepoint(ebpf, name)?.load().map_err(|source| UprobeError::Load { name, source })?;
    }
    Ok(())
}

/// Detach and unload every TLS program (a start that failed half-way leaves nothing running:
/// tracepoints on every read/write syscall would cost without any probe to serve).
pub fn unload_all(ebpf: &mut Ebpf) {
    for name in uprobe_programs() {
        if let Ok(p) = uprobe(ebpf, name) {
            let _ = p.unload();
        }
    }
    for name in TRACEPOINT_PROGRAMS {
        if let Ok(p) = tracepoint(ebpf, name) {
            let _ = p.unload();
        }
    }
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut UProbe, UprobeError> {
    let p = ebpf.program_mut(name).ok_or(UprobeError::MissingProgram(name))?;
    p.try_into().map_err(|source| UprobeError::Load { name, source })
}

fn tracepoint<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut TracePoint, UprobeError> {
    let p = ebpf.program_mut(name).ok_or(UprobeError::MissingProgram(name))?;
    p.try_into().map_err(|source| UprobeError::Load { name, source })
}

/// Mounts tracefs for the time the tracepoints are attached when it is not mounted (aya reads
/// the tracepoint ids there; the attached links do not need it afterwards), and unmounts what
/// it mounted.
struct TracefsMount {
    mounted_here: bool,
}

impl TracefsMount {
    fn ensure() -> Result<Self, UprobeError> {
        let dir = Path::new(TRACEFS);
        let populated = std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false);
        if populated {
            return Ok(TracefsMount { mounted_here: false });
        }
        nix::mount::mount(Some("nodev"), dir, Some("tracefs"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(|e| UprobeError::Tracefs(format!("mount -t tracefs nodev {TRACEFS}: {e}")))?;
        Ok(TracefsMount { mounted_here: true })
    }
}

impl Drop for TracefsMount {
    fn drop(&mut self) {
        if self.mounted_here {
            if let Err(e) = nix::mount::umount(TRACEFS) {
                tracing::debug!(error = %e, "cannot unmount tracefs mounted for the TLS tracepoints");
            }
        }
    }
}

/// The offset of `field` in a tracepoint `format` file, if it is listed.
pub fn field_offset(format: &str, field: &str) -> Option<usize> {
    format.lines().find_map(|l| {
        let l = l.trim();
        let decl = l.strip_prefix("field:")?.split(';').next()?;
        let name = decl.rsplit(' ').next()?;
        if name != field {
            return None;
        }
        let off = l.split(';').find_map(|p| p.trim().strip_prefix("offset:"))?;
        off.trim().parse().ok()
    })
}

fn check_offset(event: &str, field: &str) -> Result<(), UprobeError> {
    let path = PathBuf::from(TRACEFS).join("events/syscalls").join(event).join("format");
    let text = std::fs::read_to_string(&path).map_err(|e| UprobeError::Tracefs(format!("{}: {e}", path.display())))?;
    match field_offset(&text, field) {
        Some(ARG0_OFFSET) => Ok(()),
        other => Err(UprobeError::Tracefs(format!(
            "{}: field {field} at {other:?}, the programs read offset {ARG0_OFFSET}",
            path.display()
        ))),
    }
}

/// Attach the syscall tracepoints (connect enter/exit, close, the read/write family), and with
/// `exec_wake` the exec tracepoint that wakes the rescan.
pub fn attach_tracepoints(ebpf: &mut Ebpf, exec_wake: bool) -> Result<(), UprobeError> {
    let _mount = TracefsMount::ensure()?;
    let mut plan: Vec<(&'static str, String, &'static str)> = vec![
        (progs::TLS_CONNECT_ENTER, "sys_enter_connect".into(), "fd"),
        (progs::TLS_CONNECT_EXIT, "sys_exit_connect".into(), "ret"),
        (progs::TLS_CLOSE, "sys_enter_close".into(), "fd"),
    ];
    plan.extend(SEND_SYSCALLS.iter().map(|s| (progs::TLS_SYS_FD, format!("sys_enter_{s}"), "fd")));
    plan.extend(RECV_SYSCALLS.iter().map(|s| (progs::TLS_RECV_ENTER, format!("sys_enter_{s}"), "fd")));
    plan.extend(RECV_SYSCALLS.iter().map(|s| (progs::TLS_RECV_EXIT, format!("sys_exit_{s}"), "ret")));
    for (name, event, field) in plan {
        check_offset(&event, field)?;
        tracepoint(ebpf, name)?
            .attach("syscalls", &event)
            .map_err(|source| UprobeError::AttachTracepoint { event: event.clone(), source })?;
    }
    if exec_wake {
        tracepoint(ebpf, progs::TLS_EXEC)?
            .attach("sched", "sched_process_exec")
            .map_err(|source| UprobeError::AttachTracepoint { event: "sched/sched_process_exec".into(), source })?;
    }
    Ok(())
}

/// Attach the entry and return probes to one library or executable. `Ok(n)`: symbols probed.
pub fn attach_file(ebpf: &mut Ebpf, c: &Candidate) -> Result<usize, UprobeError> {
    let mut n = 0;
    for (symbol, name, required) in ENTRY_PROBES {
        let entry = attach_one(uprobe(ebpf, name)?, symbol, &c.path);
        match entry {
            Ok(()) => {}
            Err(e) if !required => {
                tracing::debug!(file = %c.path.display(), symbol, error = %e, "optional TLS symbol not probed");
                continue;
            }
            Err(source) => {
                return Err(UprobeError::AttachFile { path: c.path.clone(), symbol, source });
            }
        }
        attach_one(uprobe(ebpf, progs::SSL_RET)?, symbol, &c.path).map_err(|source| UprobeError::AttachFile {
            path: c.path.clone(),
            symbol,
            source,
        })?;
        n += 1;
    }
    for (symbol, entry, ret) in EXTRA_PROBES {
        // Optional: without them memory-BIO stacks bind later (first data call) or not at all.
        if let Err(e) = attach_one(uprobe(ebpf, entry)?, symbol, &c.path) {
            tracing::debug!(file = %c.path.display(), symbol, error = %e, "optional TLS symbol not probed");
            continue;
        }
        if let Some(ret) = ret {
            attach_one(uprobe(ebpf, ret)?, symbol, &c.path).map_err(|source| UprobeError::AttachFile {
                path: c.path.clone(),
                symbol,
                source,
            })?;
        }
    }
    Ok(n)
}

fn attach_one(p: &mut UProbe, symbol: &str, path: &Path) -> Result<(), ProgramError> {
    p.attach(symbol, path, UProbeScope::AllProcesses).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONNECT: &str = "name: sys_enter_connect\nID: 1\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:int __syscall_nr;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:int fd;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:struct sockaddr * uservaddr;\toffset:24;\tsize:8;\tsigned:0;\n";

    #[test]
    fn every_program_loaded_once() {
        let all: Vec<_> = uprobe_programs().chain(TRACEPOINT_PROGRAMS).collect();
        let unique: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(all.len(), unique.len(), "{all:?}");
        for p in [progs::SSL_HANDSHAKE, progs::SSL_HANDSHAKE_RET, progs::SSL_FREE, progs::SSL_RET] {
            assert!(all.contains(&p), "{p} not loaded");
        }
        assert!(
            TRACEPOINT_PROGRAMS.contains(&progs::TLS_RECV_ENTER) && TRACEPOINT_PROGRAMS.contains(&progs::TLS_RECV_EXIT)
        );
    }

    #[test]
    fn format_offsets() {
        assert_eq!(field_offset(CONNECT, "fd"), Some(16));
        assert_eq!(field_offset(CONNECT, "uservaddr"), Some(24));
        assert_eq!(field_offset(CONNECT, "__syscall_nr"), Some(8));
        assert_eq!(field_offset(CONNECT, "ret"), None);
        assert_eq!(field_offset("\tfield:long ret;\toffset:16;\tsize:8;\tsigned:1;\n", "ret"), Some(16));
    }
}
