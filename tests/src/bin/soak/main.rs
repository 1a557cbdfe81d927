//! `tollgate-soak`: a long run of mixed traffic against the real tollgate (real eBPF capture in a
//! private cgroup2 mount, mock upstreams, a real redis-server and the real MCP SDK server) while
//! faults are injected on a schedule, sampling the tollgate process from outside. It fails when a
//! sampled series grows without bound (see `detect`) or when a call is lost or double-counted
//! (see `report`). `cargo xtask soak` builds the binaries and runs `tollgate-soak run`.
//!
//! Subcommands: `run` (the soak), `idle` (idle-connection RSS probe for the allocator
//! investigation) and `agent` (one agent process; the driver starts these inside cgroups).

mod agent;
mod detect;
mod report;
mod sample;
mod setup;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Soak run of tollgate under mixed traffic and injected faults")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The soak: traffic, faults, samples, verdict.
    Run(RunArgs),
    /// Idle-connection RSS probe: open N keep-alive connections (one call each), hold, close;
    /// RSS before, while held and after, for several rounds.
    Idle(IdleArgs),
    /// One agent process (started by `run` inside its cgroup).
    Agent(agent::AgentArgs),
}

/// Options shared by `run` and `idle`.
#[derive(clap::Args, Clone)]
pub struct Common {
    /// The tollgate binary.
    #[arg(long)]
    pub tollgate: PathBuf,
    /// The mock-llm binary.
    #[arg(long)]
    pub mock: PathBuf,
    /// Where the CSV and summary go.
    #[arg(long, default_value = "target/soak")]
    pub out: PathBuf,
    /// Environment for tollgate, `NAME=VALUE` (repeatable), e.g. `MALLOC_ARENA_MAX=2`.
    #[arg(long = "tollgate-env")]
    pub tollgate_env: Vec<String>,
    /// No token limits (no Redis-backed policy, so no prompt estimate and no tokenizer).
    #[arg(long)]
    pub no_limits: bool,
    /// Build profile of the binaries, for the report (`debug` or `release`).
    #[arg(long, default_value = "debug")]
    pub profile: String,
}

/// Options of `run`.
#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: Common,
    /// Length of the run.
    #[arg(long, default_value_t = 5.0)]
    pub minutes: f64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 5)]
    pub sample_secs: u64,
    /// Seconds between injected faults.
    #[arg(long, default_value_t = 15)]
    pub fault_secs: u64,
    /// Connections the idle-connection fault opens and holds.
    #[arg(long, default_value_t = 300)]
    pub idle_conns: usize,
}

/// Options of `idle`.
#[derive(clap::Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections per round.
    #[arg(long, default_value_t = 2000)]
    pub conns: usize,
    /// Rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds the connections stay open.
    #[arg(long, default_value_t = 10)]
    pub hold_secs: u64,
    /// Seconds to wait after the connections closed before reading RSS (allocators that purge
    /// on a timer return memory after some seconds).
    #[arg(long, default_value_t = 3)]
    pub settle_secs: u64,
    /// Seconds to keep tollgate running after the last round (to inspect it, e.g. with gdb),
    /// then one more RSS line.
    #[arg(long, default_value_t = 0)]
    pub linger_secs: u64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Agent(a) => agent::main(a),
        Cmd::Run(a) => run(a),
        Cmd::Idle(a) => idle(a),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("soak: FAILED: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The fault schedule, one step every `--fault-secs`, in this order, round and round.
const FAULTS: [&str; 6] = ["upstream-5xx", "upstream-reset", "redis-kill", "reload-good", "reload-bad", "idle-burst"];

fn run(a: RunArgs) -> Result<()> {
    let started_at = std::time::SystemTime::now();
    let mut s = setup::Soak::start(&a.common)?;
    let total = Duration::from_secs_f64(a.minutes * 60.0);
    let until_ms = setup::unix_ms() + total.as_millis() as u64;
    s.spawn_traffic(until_ms)?;
    eprintln!(
        "soak: {} min against {} ({} build), tollgate pid {}, sampling every {} s, a fault every {} s",
        a.minutes,
        a.common.tollgate.display(),
        a.common.profile,
        s.pid()?,
        a.sample_secs,
        a.fault_secs
    );
    let start = Instant::now();
    let mut samples: Vec<report::Row> = Vec::new();
    let mut events: Vec<String> = Vec::new();
    let mut next_sample = start;
    let mut next_fault = start + Duration::from_secs(a.fault_secs);
    let mut fault_i = 0usize;
    let mut redis_back_at: Option<Instant> = None;
    let mut log = Vec::new();
    while start.elapsed() < total {
        let now = Instant::now();
        if let Some(t) = redis_back_at.filter(|t| now >= *t) {
            let _ = t;
            s.redis.restart()?;
            redis_back_at = None;
            events.push("redis-restart".into());
        }
        // Faults stop 10 s before the end so the last calls run clean.
        if now >= next_fault && start.elapsed() + Duration::from_secs(10) < total {
            let f = FAULTS[fault_i % FAULTS.len()];
            fault_i += 1;
            let outcome = match f {
                "redis-kill" => {
                    s.redis.kill();
                    redis_back_at = Some(now + Duration::from_secs(8));
                    Ok(())
                }
                "idle-burst" => {
                    let hold = setup::unix_ms() + a.fault_secs * 600;
                    s.spawn_idle(a.idle_conns, hold.min(until_ms), 0).map(drop)
                }
                other => s.fault(other),
            };
            let line = match &outcome {
                Ok(()) => f.to_string(),
                Err(e) => format!("{f} FAILED: {e:#}"),
            };
            log.push(format!("{:>7.1}s {line}", start.elapsed().as_secs_f64()));
            events.push(line);
            next_fault += Duration::from_secs(a.fault_secs);
        }
        if now >= next_sample {
            let row = report::Row::take(start.elapsed().as_secs_f64(), &s, std::mem::take(&mut events))?;
            if samples.len().is_multiple_of(6) {
                eprintln!("soak: {}", row.brief());
            }
            samples.push(row);
            next_sample += Duration::from_secs(a.sample_secs);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if redis_back_at.is_some() {
        s.redis.restart()?;
    }
    let tallies = s.join_agents()?;
    // One last sample after the traffic stopped and every agent connection closed.
    samples.push(report::Row::take(start.elapsed().as_secs_f64(), &s, vec!["end".into()])?);
    let r = report::Report::new(&a, &s, samples, tallies, log, started_at)?;
    r.print_and_write(&a.common.out)?;
    if !r.failures.is_empty() {
        bail!("{} check(s) failed:\n  {}", r.failures.len(), r.failures.join("\n  "));
    }
    eprintln!("soak: PASSED");
    Ok(())
}

fn idle(a: IdleArgs) -> Result<()> {
    let mut s = setup::Soak::start(&a.common)?;
    let pid = s.pid()?;
    let mb = |kb: u64| kb as f64 / 1024.0;
    let rss = |_: &setup::Soak| {
        sample::proc(pid)
            .map(|p| {
                (
                    mb(p.rss_kb),
                    format!("fds {:5}  anon {:7.1} MB  file {:6.1} MB", p.fds, mb(p.rss_anon_kb), mb(p.rss_file_kb)),
                )
            })
            .unwrap_or_default()
    };
    let env = if a.common.tollgate_env.is_empty() { "-".to_string() } else { a.common.tollgate_env.join(" ") };
    let settle = |s: &setup::Soak| {
        std::thread::sleep(Duration::from_secs(a.settle_secs));
        rss(s)
    };
    let mut lines = vec![format!(
        "idle probe: {} ({} build), env {env}, {} connections x {} rounds",
        a.common.tollgate.display(),
        a.common.profile,
        a.conns,
        a.rounds
    )];
    let (base, f) = settle(&s);
    lines.push(format!("start            rss {base:7.1} MB  {f}"));
    // One call first: what the first call loads once (tokenizer, TLS and HTTP machinery) is not
    // per-connection memory.
    let ready = s.spawn_idle(1, u64::MAX, 1)?;
    tollgate_e2e::wait_for(Duration::from_secs(60), Duration::from_millis(100), || {
        std::fs::read_to_string(&ready).ok()
    })
    .ok_or_else(|| anyhow::anyhow!("first call did not finish within 60 s"))?;
    s.join_idle()?;
    let (one, f) = settle(&s);
    lines.push(format!("after one call   rss {one:7.1} MB  {f}"));
    for round in 1..=a.rounds {
        let ready = s.spawn_idle(a.conns, u64::MAX, a.hold_secs * 1000)?;
        // Wait until the agent has opened every connection, then read RSS while they are held.
        let open = tollgate_e2e::wait_for(Duration::from_secs(300), Duration::from_millis(100), || {
            std::fs::read_to_string(&ready).ok()
        })
        .ok_or_else(|| anyhow::anyhow!("idle agent did not open its connections within 300 s"))?;
        std::thread::sleep(Duration::from_secs(1));
        let held = rss(&s);
        lines.push(format!(
            "round {round} held     rss {:7.1} MB  {}  ({} connections open)",
            held.0,
            held.1,
            open.trim()
        ));
        s.join_idle()?;
        let (after, f) = settle(&s);
        lines.push(format!("round {round} closed   rss {after:7.1} MB  {f}"));
    }
    if a.linger_secs > 0 {
        eprintln!("idle probe: tollgate pid {pid} lingers {} s (log: {})", a.linger_secs, s.t.dir.path().display());
        std::thread::sleep(Duration::from_secs(a.linger_secs));
        let (r, f) = rss(&s);
        lines.push(format!("after lingering  rss {r:7.1} MB  {f}"));
    }
    let text = lines.join("\n");
    println!("{text}");
    std::fs::create_dir_all(&a.common.out)?;
    let name = format!("idle-{}-{}.txt", a.common.profile, setup::unix_ms() / 1000);
    std::fs::write(a.common.out.join(name), text + "\n")?;
    Ok(())
}
