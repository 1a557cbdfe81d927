//! Starting the TLS uprobes on a running capture: load and attach, then the ring buffer reader
//! and the periodic library rescan. [`start`] is the one entry point.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use aya::maps::{MapData, PerCpuArray, RingBuf};
use aya::programs::ProgramError;
use gateway_common::{maps, TlsCounter, TLS_COUNTER_SLOTS};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::discover::{file_key, Candidate, FileKind, Scanner};
use super::reader::{self, ReaderStats};
use super::{attach, TlsEvent};
use crate::capture::Capture;
use crate::config::UprobesConfig;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::uprobe_metrics::UprobeSnapshot;

/// Where the kernel lists the uprobe PMU; without it there is no uprobe support.
pub const UPROBE_PMU: &str = "/sys/bus/event_source/devices/uprobe";

/// Why the uprobes did not start. tollgate keeps running without them (L4 only).
#[derive(Debug, thiserror::Error)]
pub enum UprobeError {
    /// `capture.uprobes.enabled` is false.
    #[error("TLS uprobes are disabled in config (capture.uprobes.enabled: false)")]
    Disabled,
    /// The kernel has no uprobe PMU.
    #[error("the kernel lacks uprobe support ({UPROBE_PMU} missing): TLS plaintext is not observed, L4 only")]
    Unsupported,
    /// Capture was shut down before the uprobes started.
    #[error("kernel capture is not running")]
    CaptureGone,
    /// The object lacks a TLS program (object and loader out of sync).
    #[error("eBPF program {0} not found in the object")]
    MissingProgram(&'static str),
    /// The verifier rejected a program, or it has another type.
    #[error("eBPF program {name} failed to load: {source}")]
    Load {
        /// Program name.
        name: &'static str,
        /// aya's reason, with the verifier log.
        source: ProgramError,
    },
    /// A map is missing or has another layout.
    #[error("eBPF map {name}: {reason}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What went wrong.
        reason: String,
    },
    /// tracefs could not be mounted or read.
    #[error("tracefs: {0}")]
    Tracefs(String),
    /// A syscall tracepoint could not be attached.
    #[error("cannot attach tracepoint syscalls/{event}: {source}")]
    AttachTracepoint {
        /// Tracepoint name.
        event: String,
        /// aya's reason.
        source: ProgramError,
    },
    /// A library file could not be probed.
    #[error("cannot probe {symbol} in {path}: {source}")]
    AttachFile {
        /// File.
        path: PathBuf,
        /// Symbol.
        symbol: &'static str,
        /// aya's reason.
        source: ProgramError,
    },
}

/// Wait after an exec before rescanning (the new program maps its libraries meanwhile); also the
/// shortest gap between exec-triggered scans.
const EXEC_SETTLE: Duration = Duration::from_millis(250);

/// Does this kernel support uprobes?
pub fn kernel_supports_uprobes() -> bool {
    Path::new(UPROBE_PMU).exists()
}

/// State shared by the tasks and the metrics source.
struct Shared {
    counters: PerCpuArray<MapData, u64>,
    stats: Arc<ReaderStats>,
    shared_files: AtomicU64,
    static_files: AtomicU64,
}

impl Shared {
    fn snapshot(&self) -> UprobeSnapshot {
        let mut k = [0u64; TLS_COUNTER_SLOTS as usize];
        for (i, slot) in k.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(i as u32), 0) {
                *slot = values.iter().fold(0u64, |a, v| a.wrapping_add(*v));
            }
        }
        let mut dropped: Vec<(&'static str, u64)> =
            TlsCounter::ALL.iter().filter_map(|c| c.drop_reason().map(|r| (r, k[*c as usize]))).collect();
        dropped.push(("channel_full", self.stats.channel_full.load(Ordering::Relaxed)));
        UprobeSnapshot {
            available: true,
            events: vec![("data", k[TlsCounter::Events as usize]), ("close", k[TlsCounter::Closes as usize])],
            bytes: k[TlsCounter::Bytes as usize],
            dropped,
            not_captured: k[TlsCounter::NotCaptured as usize],
            attached_files: vec![
                ("shared", self.shared_files.load(Ordering::Relaxed)),
                ("static", self.static_files.load(Ordering::Relaxed)),
            ],
        }
    }
}

/// The running uprobes: reader and rescan tasks, and a view of the counters. The probes
/// themselves belong to the capture's programs and detach with them; dropping the handle stops
/// the tasks (no more events, no new libraries).
pub struct UprobeHandle {
    shared: Arc<Shared>,
    prober: TlsProber,
    tasks: Vec<JoinHandle<()>>,
}

impl UprobeHandle {
    /// The counters as the metrics export them (for tests and `tollgate check`).
    pub fn snapshot(&self) -> UprobeSnapshot {
        self.shared.snapshot()
    }

    /// The on-demand probe of one process's TLS libraries, for the proxy (see [`TlsProber`]).
    pub fn prober(&self) -> TlsProber {
        self.prober.clone()
    }
}

/// Probes the TLS libraries of one process on demand. The proxy runs it before it splices a
/// captured TLS connection: the agent's request (its first `SSL_write`) comes only after the
/// handshake, which waits for the splice, so a library the process loaded since the last
/// rescan is probed before any plaintext goes through it. Without this, a library loaded after
/// exec (CPython's `_ssl`, a `dlopen` the exec wake-up does not see) waited for the periodic
/// rescan, and the calls made meanwhile were missed. Cheap to clone.
#[derive(Clone)]
pub struct TlsProber {
    capture: Arc<Capture>,
    shared: Arc<Shared>,
    scanner: Arc<Mutex<Scanner>>,
    shared_libraries: bool,
    static_executables: bool,
}

impl TlsProber {
    /// Probe every OpenSSL file process `tgid` maps (and its executable, when it exports
    /// OpenSSL) that is not probed yet; returns how many files were new. Blocking (reads
    /// `/proc/<tgid>/maps`, and an executable's symbol tables the first time it is seen, and
    /// waits for a rescan in progress): call it off the async workers.
    pub fn probe_process(&self, tgid: u32) -> usize {
        let mut s = lock(&self.scanner);
        let found = s.scan_pid(Path::new("/proc"), tgid, self.shared_libraries, self.static_executables);
        for c in &found {
            attach_candidate(&self.capture, &self.shared, &mut s, c);
        }
        found.len()
    }
}

/// The scanner, also after a panic in another holder (its sets stay consistent: a panic can
/// at worst leave a file marked known without probes, as a failed attach does).
fn lock(m: &Mutex<Scanner>) -> MutexGuard<'_, Scanner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for UprobeHandle {
    fn drop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

/// Start observing captured TLS connections: load and attach the TLS programs into `capture`'s
/// object, attach to `cfg.paths` and to every OpenSSL file running processes map now, rescan
/// every `cfg.rescan_interval`, and read the ring buffer into the returned bounded channel.
///
/// With `metrics`, the `tollgate_uprobe_*` families are exported from now on, including
/// `tollgate_uprobe_available 0` when this fails. Needs a tokio runtime. On error nothing keeps
/// running: TLS programs loaded or attached before the error are unloaded again.
pub fn start(
    capture: &Arc<Capture>,
    cfg: &UprobesConfig,
    metrics: Option<&Metrics>,
) -> Result<(UprobeHandle, mpsc::Receiver<TlsEvent>), UprobeError> {
    let unavailable = || {
        if let Some(m) = metrics {
            m.set_uprobe_source(Box::new(UprobeSnapshot::default));
        }
    };
    if !cfg.enabled {
        return Err(UprobeError::Disabled);
    }
    if !kernel_supports_uprobes() {
        unavailable();
        tracing::warn!(pmu = UPROBE_PMU, "kernel lacks uprobe support: TLS plaintext is not observed, L4 only");
        return Err(UprobeError::Unsupported);
    }
    let setup = capture.with_ebpf(|ebpf| {
        let r = (|| -> Result<_, UprobeError> {
            attach::load_programs(ebpf)?;
            let ring = take_map::<RingBuf<MapData>>(ebpf, maps::TLS_EVENTS)?;
            let counters = take_map::<PerCpuArray<MapData, u64>>(ebpf, maps::TLS_COUNTERS)?;
            let execs = match cfg.rescan_on_exec {
                true => Some(take_map::<RingBuf<MapData>>(ebpf, maps::TLS_EXECS)?),
                false => None,
            };
            attach::attach_tracepoints(ebpf, cfg.rescan_on_exec)?;
            Ok((ring, counters, execs))
        })();
        if r.is_err() {
            attach::unload_all(ebpf);
        }
        r
    });
    let (ring, counters, execs) = match setup {
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            unavailable();
            return Err(e);
        }
        None => {
            unavailable();
            return Err(UprobeError::CaptureGone);
        }
    };
    let stats = Arc::new(ReaderStats::default());
    let shared = Arc::new(Shared {
        counters,
        stats: stats.clone(),
        shared_files: AtomicU64::new(0),
        static_files: AtomicU64::new(0),
    });

    let scanner = Arc::new(Mutex::new(Scanner::default()));
    let mut first = lock(&scanner);
    for p in &cfg.paths {
        let kind = if p.file_name().and_then(|n| n.to_str()).is_some_and(super::discover::is_libssl) {
            FileKind::Shared
        } else {
            FileKind::Static
        };
        match file_key(p) {
            Some(key) => attach_candidate(capture, &shared, &mut first, &Candidate { key, path: p.clone(), kind }),
            None => tracing::warn!(path = %p.display(), "capture.uprobes.paths: file not found, not probed"),
        }
    }
    drop(first);
    rescan(capture, &shared, &scanner, cfg);
    let prober = TlsProber {
        capture: capture.clone(),
        shared: shared.clone(),
        scanner: scanner.clone(),
        shared_libraries: cfg.shared_libraries,
        static_executables: cfg.static_executables,
    };

    let (tx, rx) = mpsc::channel(cfg.channel_capacity);
    let max_gaps = usize::try_from(cfg.max_connections).unwrap_or(usize::MAX);
    let reader = tokio::spawn(async move {
        if let Err(e) = reader::run(ring, tx, stats, max_gaps).await {
            tracing::warn!(error = %e, "TLS ring buffer reader stopped");
        }
    });
    let interval = cfg.rescan_interval;
    let (cap, sh, c) = (capture.clone(), shared.clone(), cfg.clone());
    let mut execs = match execs {
        // SAFETY: the ring owns its map fd, open and unchanged until the ring (moved into the
        // AsyncFd) is dropped with it.
        Some(r) => match unsafe { AsyncFd::register_with_interest(r, Interest::READABLE) } {
            Ok(fd) => Some(fd),
            Err(e) => {
                let e: std::io::Error = e.into();
                tracing::warn!(error = %e, "cannot poll exec wake-ups; periodic rescans only");
                None
            }
        },
        None => None,
    };
    let rescanner = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            match execs.as_mut() {
                Some(fd) => {
                    tokio::select! {
                        _ = tick.tick() => {}
                        r = fd.readable_mut() => match r {
                            Ok(mut guard) => {
                                while guard.get_inner_mut().next().is_some() {}
                                guard.clear_ready();
                                drop(guard);
                                // Let the new program map its libraries; bounds the scan rate.
                                tokio::time::sleep(EXEC_SETTLE).await;
                                while fd.get_mut().next().is_some() {}
                                tick.reset();
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "exec wake-ups stopped; periodic rescans go on");
                                execs = None;
                                continue;
                            }
                        },
                    }
                }
                None => {
                    tick.tick().await;
                }
            }
            let (cap2, sh2, c2) = (cap.clone(), sh.clone(), c.clone());
            // /proc walks and ELF reads block: off the async workers. The scanner (its memory
            // of checked files) is shared with the pre-splice probe of one process.
            let sc = scanner.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || rescan(&cap2, &sh2, &sc, &c2)).await {
                tracing::warn!(error = %e, "TLS library rescan failed");
            }
        }
    });
    if let Some(m) = metrics {
        let sh = shared.clone();
        m.set_uprobe_source(Box::new(move || sh.snapshot()));
    }
    tracing::info!(
        shared = shared.shared_files.load(Ordering::Relaxed),
        r#static = shared.static_files.load(Ordering::Relaxed),
        ring_buffer_bytes = cfg.ring_buffer_bytes,
        "TLS uprobes attached"
    );
    Ok((UprobeHandle { shared, prober, tasks: vec![reader, rescanner] }, rx))
}

fn take_map<T>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<T, UprobeError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(UprobeError::Map { name, reason: "not found in the object".into() })?;
    T::try_from(map).map_err(|e| UprobeError::Map { name, reason: e.to_string() })
}

/// One pass over running processes: attach every new OpenSSL file.
/// The scanner is locked per process, not for the whole walk, so the check before a splice
/// waits for one process's scan at most.
fn rescan(capture: &Capture, shared: &Shared, scanner: &Mutex<Scanner>, cfg: &UprobesConfig) {
    let proc_root = Path::new("/proc");
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return;
    };
    let me = std::process::id();
    let pids = dir.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()));
    for pid in pids.filter(|p| *p != me) {
        let mut s = lock(scanner);
        for c in s.scan_pid(proc_root, pid, cfg.shared_libraries, cfg.static_executables) {
            attach_candidate(capture, shared, &mut s, &c);
        }
    }
}

fn attach_candidate(capture: &Capture, shared: &Shared, scanner: &mut Scanner, c: &Candidate) {
    if !scanner.known.insert(c.key) {
        return;
    }
    // A file that fails (no symbols, stripped) is not retried: it would fail again.
    match capture.with_ebpf(|ebpf| attach::attach_file(ebpf, c)) {
        Some(Ok(n)) => {
            let counter = match c.kind {
                FileKind::Shared => &shared.shared_files,
                FileKind::Static => &shared.static_files,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            tracing::info!(file = %c.path.display(), kind = c.kind.as_str(), symbols = n, "TLS library probed");
        }
        Some(Err(e)) => tracing::warn!(error = %e, "TLS library not probed"),
        None => {}
    }
}

/// How long after a new library file appears its processes are observed, about: the exec
/// settle time (with `rescan_on_exec`) or the rescan period, plus one scan (taken as as long
/// again). Documented, and what tests wait for.
pub fn attach_delay_bound(cfg: &UprobesConfig) -> Duration {
    if cfg.rescan_on_exec {
        EXEC_SETTLE * 2
    } else {
        cfg.rescan_interval * 2
    }
}
