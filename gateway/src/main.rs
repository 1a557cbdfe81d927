//! `tollgate` command line: run the node agent, check a config, print the interception CA,
//! watch a running agent (`top`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tokio::sync::watch;

use tollgate::admin::{self, Health};
use tollgate::capture::heartbeat::{AcceptProgress, Heartbeat};
use tollgate::capture::kubernetes::{self, watch::KubeStats, PodStore};
use tollgate::capture::scope::ScopeOwner;
use tollgate::capture::{AgentResolver, Capture, FlowTable};
use tollgate::config::{self, Config};
use tollgate::connection::{self, tls::CertAuthority, ProxyDeps};
use tollgate::reload::{Overrides, Reloader};
use tollgate::telemetry::Telemetry;

/// The heap allocator. With glibc's malloc, memory freed after a burst (thousands of idle
/// connections, a wave of streams) stays in its per-thread arenas and the RSS keeps the peak
/// for good; jemalloc's background thread returns freed pages to the OS within seconds, so a
/// long-running node agent's RSS follows its load (figures: README, Development).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Transparent capture and governance of AI traffic on a Linux node.
#[derive(Parser)]
#[command(name = "tollgate", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log format on stderr.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Load the eBPF programs and run the proxy (needs root). Without --config, runs the
    /// embedded default: capture well-known AI provider hosts, splice them, record L4 stats.
    Run {
        /// YAML config file; watched and reloaded live when it changes (also on SIGHUP).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Override `listen.pod_ipv4` (the DaemonSet passes the node IP from the downward API).
        #[arg(long)]
        pod_ipv4: Option<std::net::Ipv4Addr>,
    },
    /// Validate a config file; errors are printed as `file:line:col: message`.
    Check {
        /// YAML config file.
        file: PathBuf,
    },
    /// Print the interception CA certificate (path, then PEM), creating the CA if missing.
    Ca {
        /// YAML config file (for `tls.ca_dir`).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// CA directory instead of the config's `tls.ca_dir` (e.g. to create the cluster CA
        /// that becomes the `tollgate-ca` Secret).
        #[arg(long, conflicts_with = "config")]
        dir: Option<PathBuf>,
    },
    /// Print the config's JSON schema.
    Schema {
        /// Print the README's configuration reference table (markdown) instead.
        #[arg(long)]
        markdown: bool,
    },
    /// Live per-agent view read from a running tollgate's admin API (`/metrics`): requests/s,
    /// tokens/min, cost (total and per minute), errors/s (status >= 400 or transport errors) and
    /// limit headroom, busiest agent first.
    ///
    /// COST shows "-" while tollgate exports no `tollgate_llm_cost_usd_total`; HEADROOM shows "-"
    /// until per-agent limits are implemented.
    Top {
        /// Admin listener of the tollgate to watch (`admin.listen`), HOST:PORT.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: String,
        /// Time between scrapes: the window rates are averaged over (e.g. 2s, 500ms).
        #[arg(long, default_value = "2s", value_parser = tollgate::top::parse_interval)]
        interval: Duration,
        /// Take two samples `interval` apart, print one plain-text table and exit.
        #[arg(long)]
        once: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let result = match cli.cmd {
        Cmd::Check { file } => return check(&file),
        Cmd::Schema { markdown } => schema(markdown),
        Cmd::Ca { config, dir } => ca(config.as_deref(), dir),
        Cmd::Run { config, pod_ipv4 } => run(config.as_deref(), Overrides { pod_ipv4 }),
        Cmd::Top { admin, interval, once } => {
            tollgate::top::run(&tollgate::top::Options { admin, interval, once }).map_err(Into::into)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: logs collected into files or by a container
    // runtime must be plain text (and `NO_COLOR` is honoured).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

fn load(path: Option<&Path>) -> Result<Config> {
    Ok(match path {
        Some(p) => config::from_path(p)?,
        None => config::from_str("<embedded default>", config::DEFAULT_CONFIG_YAML)?,
    })
}

fn check(file: &Path) -> ExitCode {
    match config::from_path(file) {
        Ok(cfg) => {
            println!("{}: ok", file.display());
            // The config is valid either way; this says what `tollgate run` will get from this
            // host's kernel for TLS that is not intercepted.
            let support = tollgate::capture::uprobe::support::Support::probe(Path::new("/"));
            for line in support.report(cfg.capture.uprobes.enabled) {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn schema(markdown: bool) -> Result<()> {
    let text = if markdown {
        config::reference::markdown()
    } else {
        serde_json::to_string_pretty(&schemars::schema_for!(Config))? + "\n"
    };
    // `tollgate schema | head` closes the pipe early: that is not an error worth a panic.
    match std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn ca(path: Option<&Path>, dir: Option<PathBuf>) -> Result<()> {
    let mut cfg = load(path)?;
    if let Some(d) = dir {
        cfg.tls.ca_dir = d;
    }
    let ca = CertAuthority::load_or_create(&cfg.tls.ca_dir, cfg.tls.leaf_validity, cfg.limits.cert_cache_size)?;
    println!("{}", ca.cert_path().display());
    print!("{}", ca.cert_pem());
    Ok(())
}

fn run(path: Option<&Path>, overrides: Overrides) -> Result<()> {
    let mut cfg = load(path)?;
    overrides.apply(&mut cfg);
    let cfg = Arc::new(cfg);
    if !nix::unistd::geteuid().is_root() {
        bail!("`tollgate run` needs root (it loads eBPF programs and attaches them to cgroups)");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("tollgate").build()?;
    rt.block_on(serve(cfg, path.map(Path::to_path_buf), overrides))
}

async fn serve(mut cfg: Arc<Config>, path: Option<PathBuf>, overrides: Overrides) -> Result<()> {
    let telemetry = Arc::new(Telemetry::from_config(&cfg)?);
    let ca = Arc::new(
        CertAuthority::load_or_create(&cfg.tls.ca_dir, cfg.tls.leaf_validity, cfg.limits.cert_cache_size)
            .context("interception CA")?,
    );
    let health = Arc::new(Health::default());
    let admin_listener = admin::bind(cfg.admin.listen).await?;

    // Listeners first: once capture is attached, redirected connects must find a socket.
    let mut listeners = Vec::new();
    for addr in cfg.proxy_addrs() {
        match bind_proxy(addr) {
            Ok(l) => listeners.push(l),
            // Hosts and containers with IPv6 disabled have no ::1: run IPv4-only rather than
            // refuse to start (the programs then leave IPv6 connects alone).
            Err(e) if Some(addr.ip()) == cfg.listen.ipv6.map(Into::into) => {
                tracing::warn!(%addr, error = %e, "IPv6 proxy address unavailable: IPv6 capture disabled");
                Arc::make_mut(&mut cfg).listen.ipv6 = None;
            }
            Err(e) => return Err(e).with_context(|| format!("proxy listener {addr}")),
        }
    }

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let capture = if cfg.capture.enabled { Some(Arc::new(Capture::start(&cfg).await?)) } else { None };
    let (flows, cgroup_root): (Arc<dyn FlowTable>, _) = match &capture {
        Some(c) => {
            let src = c.clone();
            telemetry.metrics.set_capture_source(Box::new(move || {
                let v = src.counters().ok()?;
                Some(gateway_common::Counter::ALL.iter().map(|c| (c.label(), v[*c as usize])).collect())
            }));
            let src = c.clone();
            telemetry.metrics.set_scope_source(Box::new(move || src.scope().counts().to_vec()));
            (c.clone(), Some(c.cgroup_root().to_path_buf()))
        }
        None => (Arc::new(NoCapture), None),
    };
    // From here on the heartbeat thread stamps while the captured listeners are accepted from.
    let progress = Arc::new(AcceptProgress::default());
    let heartbeat = match &capture {
        Some(c) => Some(start_heartbeat(c, &progress, &listeners, cfg.capture.heartbeat_timeout)?),
        None => None,
    };
    let pods = if cfg.kubernetes.enabled {
        Some(start_kubernetes(&cfg, &ca, &capture, &telemetry, &shutdown_rx).await?)
    } else {
        None
    };
    let agents = Arc::new(AgentResolver::new(&cfg.agents, cgroup_root.clone()).with_pods(pods.clone()));
    // TLS plaintext from uprobes, reassembled and reported like intercepted calls.
    let observed_config = Arc::new(arc_swap::ArcSwap::new(cfg.clone()));
    let intercepted = Arc::new(connection::trust::Intercepted::default());
    let (_uprobes, observed_task) = match &capture {
        Some(c) => {
            let shared = Observing {
                config: &observed_config,
                agents: &agents,
                telemetry: &telemetry,
                intercepted: &intercepted,
            };
            start_uprobes(c, &cfg, &shared, &shutdown_rx)
        }
        None => (None, None),
    };
    let tls_prober = _uprobes.as_ref().map(|u| u.prober());
    let deps = ProxyDeps {
        config: cfg.clone(),
        flows,
        agents,
        telemetry: telemetry.clone(),
        ca,
        observer: None,
        intercepted,
        tls_prober,
    };
    let proxy_server = connection::Proxy::new(deps).await?;
    let proxy_server = proxy_server.with_accept_progress(progress);
    let handle = proxy_server.handle();
    let mut proxy = tokio::spawn(proxy_server.serve(listeners, shutdown_rx.clone()));
    let admin_task = tokio::spawn(admin::serve(admin_listener, telemetry.clone(), health.clone(), shutdown_rx.clone()));
    if let Some(path) = path {
        let reloader = Reloader {
            path,
            current: cfg.clone(),
            overrides,
            proxy: handle.clone(),
            capture: capture.clone(),
            cgroup_root,
            pods,
            telemetry: telemetry.clone(),
            observed: observed_task.as_ref().map(|_| observed_config.clone()),
        };
        reloader.spawn(Duration::from_secs(10), shutdown_rx.clone())?;
    }
    health.ready.store(true, Ordering::Relaxed);
    tracing::info!(
        proxy = ?cfg.proxy_addrs(),
        admin = %cfg.admin.listen,
        capture = capture.is_some(),
        "tollgate ready"
    );

    // If the proxy dies, the kernel must stop sending connections to it at once: detach and
    // exit non-zero (the supervisor restarts us) instead of redirecting into a dead listener.
    let proxy_died = tokio::select! {
        r = wait_for_signal() => { r?; None }
        r = &mut proxy => Some(match r {
            Ok(Ok(())) => anyhow::anyhow!("proxy stopped unexpectedly"),
            Ok(Err(e)) => anyhow::Error::new(e).context("proxy failed"),
            Err(e) => anyhow::Error::new(e).context("proxy task panicked"),
        }),
    };
    if let Some(err) = proxy_died {
        health.ready.store(false, Ordering::Relaxed);
        if let Some(c) = &capture {
            c.shutdown();
        }
        drop(heartbeat);
        let _ = shutdown_tx.send(true);
        telemetry.shutdown().await;
        return Err(err);
    }
    health.ready.store(false, Ordering::Relaxed);
    // Detach first: from here new connects go direct (fail-open) instead of meeting a closed
    // listener, while the connections already accepted drain on the proxy.
    let draining = handle.in_flight();
    tracing::info!(in_flight = draining, grace = ?cfg.limits.drain_timeout, "shutting down: capture detached, draining connections");
    if let Some(c) = &capture {
        c.shutdown();
    }
    drop(heartbeat);
    let _ = shutdown_tx.send(true);
    let started = std::time::Instant::now();
    match tokio::time::timeout(cfg.limits.drain_timeout, proxy).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "proxy ended with error"),
        Err(_) => tracing::warn!(
            timeout = ?cfg.limits.drain_timeout,
            remaining = handle.in_flight(),
            "drain timeout: closing remaining connections"
        ),
        _ => tracing::info!(drained = draining, took_ms = started.elapsed().as_millis() as u64, "drained"),
    }
    // Observed calls still in flight are reported (cut) before the last export.
    if let Some(t) = observed_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    admin_task.abort();
    telemetry.shutdown().await;
    Ok(())
}

/// The TLS uprobes and the task that turns their plaintext into calls. Neither is fatal: a
/// kernel without uprobes, or `capture.uprobes.enabled: false`, leaves tollgate L4-only for
/// spliced routes (logged, and `tollgate_uprobe_available` is 0).
/// What the uprobe observation task shares with the proxy.
struct Observing<'a> {
    config: &'a Arc<arc_swap::ArcSwap<Config>>,
    agents: &'a Arc<AgentResolver>,
    telemetry: &'a Arc<Telemetry>,
    intercepted: &'a Arc<connection::trust::Intercepted>,
}

fn start_uprobes(
    capture: &Arc<Capture>,
    cfg: &Config,
    shared: &Observing<'_>,
    shutdown: &watch::Receiver<bool>,
) -> (Option<tollgate::capture::uprobe::UprobeHandle>, Option<tokio::task::JoinHandle<()>>) {
    use tollgate::capture::uprobe;
    use tollgate::connection::observed::{self, ObservedDeps, ObservedLimits};
    match uprobe::start(capture, &cfg.capture.uprobes, Some(&shared.telemetry.metrics)) {
        Ok((handle, events)) => {
            let deps = ObservedDeps {
                config: shared.config.clone(),
                agents: shared.agents.clone(),
                telemetry: shared.telemetry.clone(),
                limits: ObservedLimits::from(&cfg.capture.uprobes.l7),
                observer: None,
                intercepted: shared.intercepted.clone(),
            };
            (Some(handle), Some(observed::spawn(events, deps, shutdown.clone())))
        }
        Err(uprobe::UprobeError::Disabled) => {
            tracing::info!("TLS uprobes disabled (capture.uprobes.enabled: false): spliced routes are L4 only");
            (None, None)
        }
        Err(e) => {
            tracing::warn!(error = %e, "TLS uprobes not started: spliced routes are L4 only");
            (None, None)
        }
    }
}

/// The capture heartbeat on its own thread, watching the captured listeners' backlogs and
/// accept loops (not the Tokio workers, which a CPU burst can hold up).
fn start_heartbeat(
    capture: &Arc<Capture>,
    progress: &Arc<AcceptProgress>,
    listeners: &[tokio::net::TcpListener],
    timeout: Duration,
) -> Result<Heartbeat> {
    use std::os::fd::AsFd;
    let fds = listeners
        .iter()
        .map(|l| l.as_fd().try_clone_to_owned())
        .collect::<std::io::Result<Vec<_>>>()
        .context("duplicating the proxy listeners for the heartbeat")?;
    Heartbeat::start(capture.clone(), progress.clone(), fds, timeout).context("starting the heartbeat thread")
}

/// Pod identity: the pod watcher (store + CA publishing), the pod scope syncer and the pod
/// metrics. Fails only on configuration problems (no node name, no API server config).
/// Longest start-up wait for the first pod scope sync.
const FIRST_SCOPE_SYNC: Duration = Duration::from_secs(10);

async fn start_kubernetes(
    cfg: &Config,
    ca: &CertAuthority,
    capture: &Option<Arc<Capture>>,
    telemetry: &Arc<Telemetry>,
    shutdown: &watch::Receiver<bool>,
) -> Result<Arc<PodStore>> {
    let k = &cfg.kubernetes;
    let store = Arc::new(PodStore::new(k.max_pods));
    let stats = Arc::new(KubeStats::default());
    kubernetes::watch::start(k, store.clone(), Some(ca.cert_pem().to_string()), stats.clone(), shutdown.clone())
        .await
        .context("kubernetes")?;
    if let Some(c) = capture {
        let c = c.clone();
        let sink: kubernetes::scope::ScopeSink = Arc::new(move |e| c.scope().set(ScopeOwner::Pods, e));
        let (_, first) = kubernetes::scope::spawn(
            c_root(capture),
            k.capture,
            k.resync_interval,
            store.clone(),
            sink,
            shutdown.clone(),
        );
        // Ready only once the pods known at start are in capture scope: a rolling update's new
        // instance must not report ready while its pods' connects still go direct.
        if tokio::time::timeout(FIRST_SCOPE_SYNC, first).await.is_err() {
            tracing::warn!(timeout = ?FIRST_SCOPE_SYNC, "first pod scope sync still running; starting anyway");
        }
    }
    let src = store.clone();
    telemetry.node.set_pod_source(Box::new(move || {
        let rows = src
            .snapshot()
            .iter()
            .map(|p| {
                let wl = format!("{}/{}", p.workload.kind, p.workload.name);
                (p.namespace.clone(), p.name.clone(), wl, p.agent.to_string(), p.capture)
            })
            .collect();
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let events = vec![
            ("watch_errors", n(&stats.watch_errors)),
            ("relists", n(&stats.relists)),
            ("pods_over_limit", n(&stats.pods_over_limit)),
            ("ca_published", n(&stats.ca_publish_ok)),
            ("ca_publish_errors", n(&stats.ca_publish_errors)),
            ("owner_lookups_failed", n(&stats.owner_lookups_failed)),
        ];
        (rows, events)
    }));
    Ok(store)
}

fn c_root(capture: &Option<Arc<Capture>>) -> PathBuf {
    capture.as_ref().map(|c| c.cgroup_root().to_path_buf()).unwrap_or_default()
}

/// A proxy listener with a deep backlog; IPv6 sockets are v6-only so the IPv4 listener on the
/// same port can coexist.
fn bind_proxy(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    // Pod-facing addresses may be assigned after start (veth created later); allow the bind.
    s.set_freebind(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(tokio::net::TcpListener::from_std(s.into())?)
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}

/// Capture disabled: nothing is ever a captured connection, so every accept is closed.
struct NoCapture;

impl FlowTable for NoCapture {
    fn take(&self, _: std::net::SocketAddr, _: std::net::SocketAddr) -> Option<tollgate::capture::CaptureRecord> {
        None
    }
}
