//! Samples, the books (what the agents saw, what the mocks served, what tollgate counted), the
//! verdicts, the summary table and the CSV.
//!
//! Accounting rules:
//! * Complete calls (plain, TLS, idle agents; mock A): tokens the mock served = tokens tollgate
//!   counted (`tollgate_llm_tokens_total`, input and output, per agent) = tokens in the usage the
//!   agents received, exactly. Calls failed by a fault carry no usage.
//! * Every call that got an answer (any status) is counted once in
//!   `tollgate_llm_requests_total`; one that got none (reset, refused) at most once: answered <=
//!   counted <= answered + no-answer.
//! * Cut calls (mock B, agent `soak-cut`): the agent drops the connection after the first chunk
//!   or before the answer, so there is no usage to compare: each call is counted at most once
//!   (answered <= counted <= calls) and the tokens tollgate settled them with (estimated, flagged
//!   in `tollgate_llm_estimated_tokens_total`) are reported, never compared.
//! * MCP: every HTTP request of a session is counted once in `tollgate_mcp_requests_total`
//!   (answered <= counted <= answered + no-answer), and tool results are what the server computes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;

use crate::agent::Tally;
use crate::detect::{self, Slack};
use crate::setup::Soak;
use crate::RunArgs;

/// One sample.
#[derive(Debug, Clone)]
pub struct Row {
    /// Seconds since the traffic started.
    pub t: f64,
    /// Process figures.
    pub p: crate::sample::Proc,
    /// `sum(tollgate_llm_requests_total)`.
    pub llm_requests: f64,
    /// `sum(tollgate_mcp_requests_total)`.
    pub mcp_requests: f64,
    /// `tollgate_runtime_tasks` (NaN when tollgate does not export it).
    pub tasks: f64,
    /// Faults injected since the previous sample.
    pub events: Vec<String>,
}

impl Row {
    /// Sample tollgate now.
    pub fn take(t: f64, s: &Soak, events: Vec<String>) -> Result<Row> {
        let pid = s.pid()?;
        let p = crate::sample::proc(pid).ok_or_else(|| anyhow::anyhow!("tollgate (pid {pid}) is gone"))?;
        let m = s.t.metrics().ok();
        let sum = |n: &str| m.as_ref().map(|m| m.sum(n, &[])).unwrap_or(f64::NAN);
        let tasks = match &m {
            Some(m) if m.has("tollgate_runtime_tasks") => m.sum("tollgate_runtime_tasks", &[]),
            _ => f64::NAN,
        };
        Ok(Row {
            t,
            p,
            llm_requests: sum("tollgate_llm_requests_total"),
            mcp_requests: sum("tollgate_mcp_requests_total"),
            tasks,
            events,
        })
    }

    /// One line for the progress log.
    pub fn brief(&self) -> String {
        format!(
            "t={:.0}s rss={:.1}MB fds={} threads={} tasks={} maps={:?} llm={} mcp={}",
            self.t,
            self.p.rss_kb as f64 / 1024.0,
            self.p.fds,
            self.p.threads,
            self.tasks,
            self.p.maps,
            self.llm_requests,
            self.mcp_requests
        )
    }
}

/// The outcome of a run.
pub struct Report {
    text: String,
    csv: String,
    /// Failed checks (empty: passed).
    pub failures: Vec<String>,
    stamp: u64,
    profile: String,
}

/// Series judged for growth: name, unit slack, and how to read it from a row.
type Series = (String, Slack, Box<dyn Fn(&Row) -> f64>);

fn series(rows: &[Row]) -> Vec<Series> {
    let mut v: Vec<Series> = vec![
        ("rss_mb".into(), Slack { abs: 8.0, rel: 0.05 }, Box::new(|r: &Row| r.p.rss_kb as f64 / 1024.0)),
        ("rss_anon_mb".into(), Slack { abs: 8.0, rel: 0.05 }, Box::new(|r: &Row| r.p.rss_anon_kb as f64 / 1024.0)),
        ("fds".into(), Slack { abs: 24.0, rel: 0.25 }, Box::new(|r: &Row| r.p.fds as f64)),
        ("threads".into(), Slack { abs: 4.0, rel: 0.25 }, Box::new(|r: &Row| r.p.threads as f64)),
    ];
    if rows.iter().any(|r| !r.tasks.is_nan()) {
        v.push(("runtime_tasks".into(), Slack { abs: 32.0, rel: 0.25 }, Box::new(|r: &Row| r.tasks)));
    }
    let names: std::collections::BTreeSet<String> = rows.iter().flat_map(|r| r.p.maps.keys().cloned()).collect();
    for n in names {
        let key = n.clone();
        v.push((
            format!("map:{n}"),
            Slack { abs: 64.0, rel: 0.25 },
            Box::new(move |r: &Row| r.p.maps.get(&key).copied().unwrap_or(0) as f64),
        ));
    }
    v
}

fn metric(s: &Soak, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.t.metrics().map(|m| m.sum(name, labels)).unwrap_or(f64::NAN)
}

impl Report {
    /// Settle the books, judge the series, render the table and CSV.
    pub fn new(
        a: &RunArgs,
        s: &Soak,
        rows: Vec<Row>,
        tallies: Vec<(String, Tally)>,
        faults: Vec<String>,
        started: std::time::SystemTime,
    ) -> Result<Report> {
        let mut failures = Vec::new();
        let mut text = String::new();
        let mut by_kind: BTreeMap<String, Tally> = BTreeMap::new();
        for (k, t) in &tallies {
            let e = by_kind.entry(k.clone()).or_default();
            e.kind = k.clone();
            e.calls += t.calls;
            e.complete += t.complete;
            e.complete_streams += t.complete_streams;
            for (st, n) in &t.status {
                *e.status.entry(*st).or_default() += n;
            }
            e.transport_errors += t.transport_errors;
            e.cut_after_chunk += t.cut_after_chunk;
            e.cut_before_answer += t.cut_before_answer;
            e.wrong += t.wrong;
            e.prompt_tokens += t.prompt_tokens;
            e.completion_tokens += t.completion_tokens;
            e.samples.extend(t.samples.iter().take(3).cloned());
        }
        let _ = writeln!(
            text,
            "tollgate soak: {} min, {} build ({}), {} samples every {} s, faults every {} s\n",
            a.minutes,
            a.common.profile,
            a.common.tollgate.display(),
            rows.len(),
            a.sample_secs,
            a.fault_secs
        );

        // --- the books, after tollgate settled (settles land after the response) ---
        let complete_kinds = ["plain", "tls", "idle"];
        let want_tokens = |ty: &str| -> f64 {
            complete_kinds
                .iter()
                .filter_map(|k| by_kind.get(*k))
                .map(|t| if ty == "input" { t.prompt_tokens } else { t.completion_tokens })
                .sum::<u64>() as f64
        };
        let counted = |ty: &str| -> f64 {
            complete_kinds
                .iter()
                .map(|k| metric(s, "tollgate_llm_tokens_total", &[("agent", &format!("soak-{k}")), ("token_type", ty)]))
                .sum()
        };
        let settled = tollgate_e2e::wait_for(Duration::from_secs(15), Duration::from_millis(250), || {
            (counted("input") == want_tokens("input") && counted("output") == want_tokens("output")).then_some(())
        });
        let stats = s.mock_a.stats(None)?;
        let stats_b = s.mock_b.stats(None)?;
        let served_p = stats["usage_prompt_tokens"].as_u64().unwrap_or(0) as f64;
        let served_c = stats["usage_completion_tokens"].as_u64().unwrap_or(0) as f64;
        let _ = writeln!(text, "tokens (complete calls)   mock A served   tollgate counted   agents received");
        for (ty, served) in [("input", served_p), ("output", served_c)] {
            let (c, w) = (counted(ty), want_tokens(ty));
            let _ = writeln!(text, "  {ty:<24}{served:>14}{c:>19}{w:>18}");
            if !(served == c && c == w) {
                failures.push(format!("{ty} tokens: mock served {served}, tollgate counted {c}, agents received {w}"));
            }
        }
        if settled.is_none() {
            failures.push("tollgate's token counters did not settle to the agents' books within 15 s".into());
        }
        let _ = writeln!(
            text,
            "\nagent        calls  complete  statuses                      no-answer  cut(chunk/before)  wrong  tollgate-counted"
        );
        for (k, t) in &by_kind {
            let agent = format!("soak-{k}");
            let (counted, family) = if k == "mcp" {
                (metric(s, "tollgate_mcp_requests_total", &[("agent", &agent)]), "mcp")
            } else {
                (metric(s, "tollgate_llm_requests_total", &[("agent", &agent)]), "llm")
            };
            let statuses = t.status.iter().map(|(s, n)| format!("{s}:{n}")).collect::<Vec<_>>().join(" ");
            let _ = writeln!(
                text,
                "{agent:<12}{:>6}{:>10}  {statuses:<30}{:>9}  {:>8}/{:<8}{:>7}  {counted} ({family})",
                t.calls, t.complete, t.transport_errors, t.cut_after_chunk, t.cut_before_answer, t.wrong
            );
            let answered = t.answered() as f64;
            let upper = answered + t.transport_errors as f64 + t.cut_before_answer as f64;
            if !(counted >= answered && counted <= upper) {
                failures.push(format!(
                    "{agent}: tollgate counted {counted} {family} requests; the agent got {answered} answers and \
                     {} calls without one (lost or double-counted)",
                    upper - answered
                ));
            }
            if t.wrong > 0 {
                failures.push(format!("{agent}: {} answers differed from the mock's: {:?}", t.wrong, t.samples));
            }
            if t.calls == 0 {
                failures.push(format!("{agent}: sent nothing"));
            }
        }
        let cut = "soak-cut";
        let _ = writeln!(
            text,
            "\ncut streams: tollgate settled input {} / output {} tokens (estimated output {}); mock B computed usage \
             for {} streams it began ({} prompt / {} completion tokens)",
            metric(s, "tollgate_llm_tokens_total", &[("agent", cut), ("token_type", "input")]),
            metric(s, "tollgate_llm_tokens_total", &[("agent", cut), ("token_type", "output")]),
            metric(s, "tollgate_llm_estimated_tokens_total", &[("agent", cut), ("token_type", "output")]),
            stats_b["streams"],
            stats_b["usage_prompt_tokens"],
            stats_b["usage_completion_tokens"],
        );
        let (good, bad) = s.reloads;
        let (rs, rf) = (
            metric(s, "tollgate_config_reloads_total", &[("result", "success")]),
            metric(s, "tollgate_config_reloads_total", &[("result", "failure")]),
        );
        let _ = writeln!(
            text,
            "reloads: {good} good sent / {rs} counted success, {bad} bad sent / {rf} counted failure; mock A faults: \
             {} 5xx, {} resets",
            stats["faults"], stats["resets"]
        );
        // Each write is seen by the file watcher and by SIGHUP, so one write may count twice.
        if rs < good as f64 || rf < bad as f64 {
            failures.push(format!("reloads: sent {good} good and {bad} bad, tollgate counted {rs} and {rf}"));
        }

        // --- growth ---
        let warmup = (a.minutes * 60.0 * 0.15).clamp(20.0, 120.0);
        let _ = writeln!(
            text,
            "\ngrowth (after {warmup:.0} s warm-up; grows = last-third median - first-third median > slack \
             AND second-half rise > slack/2)"
        );
        let _ = writeln!(text, "series               first-median last-median   last-max  slope/min    slack  verdict");
        // The final row is taken after the traffic stopped: judged series end with the traffic.
        let judged = &rows[..rows.len().saturating_sub(1)];
        for (name, slack, f) in series(&rows) {
            let pts: Vec<(f64, f64)> = judged.iter().map(|r| (r.t, f(r))).collect();
            let v = detect::judge(&pts, warmup, slack);
            let verdict = if v.points < 9 {
                "too short"
            } else if v.grows {
                "GROWS"
            } else {
                "bounded"
            };
            let _ = writeln!(
                text,
                "{name:<22}{:>10.1}{:>13.1}{:>11.1}{:>11.2}{:>9.1}  {verdict}",
                v.first_median, v.last_median, v.last_max, v.slope_per_min, v.allowed
            );
            if v.grows {
                failures.push(format!("{name} grows without bound: {v:?}"));
            }
        }
        if let Some(last) = rows.last() {
            let _ = writeln!(text, "after the traffic stopped: {}", last.brief());
        }

        // --- the table and the CSV ---
        let map_names: Vec<String> = rows
            .iter()
            .flat_map(|r| r.p.maps.keys().cloned())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut csv = format!(
            "t_s,rss_kb,rss_anon_kb,rss_file_kb,fds,threads,runtime_tasks,{}llm_requests,mcp_requests,events\n",
            { map_names.iter().map(|n| format!("map_{n},")).collect::<String>() }
        );
        for r in &rows {
            let maps: String =
                map_names.iter().map(|n| format!("{},", r.p.maps.get(n).copied().unwrap_or(0))).collect();
            let _ = writeln!(
                csv,
                "{:.1},{},{},{},{},{},{},{maps}{},{},\"{}\"",
                r.t,
                r.p.rss_kb,
                r.p.rss_anon_kb,
                r.p.rss_file_kb,
                r.p.fds,
                r.p.threads,
                r.tasks,
                r.llm_requests,
                r.mcp_requests,
                r.events.join("; ")
            );
        }
        let _ = writeln!(text, "\nsamples (every {}th of {}; all in the CSV)", (rows.len() / 30).max(1), rows.len());
        let _ = writeln!(
            text,
            "{:>7} {:>8} {:>5} {:>7} {:>6} {} {:>8} {:>7}  events",
            "t_s",
            "rss_MB",
            "fds",
            "threads",
            "tasks",
            map_names.iter().map(|n| format!("{n:>13}")).collect::<Vec<_>>().join(" "),
            "llm_req",
            "mcp_req"
        );
        let step = (rows.len() / 30).max(1);
        for (i, r) in rows.iter().enumerate() {
            if i % step != 0 && i != rows.len() - 1 {
                continue;
            }
            let _ = writeln!(
                text,
                "{:>7.0} {:>8.1} {:>5} {:>7} {:>6} {} {:>8} {:>7}  {}",
                r.t,
                r.p.rss_kb as f64 / 1024.0,
                r.p.fds,
                r.p.threads,
                r.tasks,
                map_names
                    .iter()
                    .map(|n| format!("{:>13}", r.p.maps.get(n).copied().unwrap_or(0)))
                    .collect::<Vec<_>>()
                    .join(" "),
                r.llm_requests,
                r.mcp_requests,
                r.events.join(", ")
            );
        }
        let _ = writeln!(text, "\nfault log:\n  {}", faults.join("\n  "));
        for (k, t) in &by_kind {
            if !t.samples.is_empty() {
                let _ = writeln!(text, "first unexpected outcomes of soak-{k}:\n  {}", t.samples.join("\n  "));
            }
        }
        let stamp = started.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Ok(Report { text, csv, failures, stamp, profile: a.common.profile.clone() })
    }

    /// Print the summary and write `soak-<profile>-<unix>.csv` and `.txt` under `dir`.
    pub fn print_and_write(&self, dir: &Path) -> Result<()> {
        println!("{}", self.text);
        std::fs::create_dir_all(dir)?;
        let base = dir.join(format!("soak-{}-{}", self.profile, self.stamp));
        std::fs::write(base.with_extension("csv"), &self.csv)?;
        let mut text = self.text.clone();
        if !self.failures.is_empty() {
            let _ = writeln!(text, "\nFAILED:\n  {}", self.failures.join("\n  "));
        }
        std::fs::write(base.with_extension("txt"), text)?;
        println!(
            "samples: {}\nsummary: {}",
            base.with_extension("csv").display(),
            base.with_extension("txt").display()
        );
        Ok(())
    }
}
