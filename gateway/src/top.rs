//! `tollgate top`: a live terminal view of agents (requests/s, tokens/min, cost, errors, limit
//! headroom) computed from two scrapes of the admin listener's `/metrics`. Headroom is the
//! latest `tollgate_ratelimit_remaining_ratio` (set when a limited call arrives), not a rate.
//!
//! The view reads the same Prometheus exposition Prometheus does, so it needs no extra admin
//! endpoint and shows exactly what the dashboards would. The exposition parser is written here
//! (about a hundred lines) rather than taken from a crate: tollgate only needs counter samples
//! from its own well-formed output, and the available parser crates bring regex/date
//! dependencies and are thinly maintained.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// Longest a single scrape may take before the admin API counts as unreachable.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Shortest accepted `--interval`: below this, rates are mostly scrape jitter.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Agent names longer than this are cut so the table stays readable on a terminal.
const MAX_AGENT_WIDTH: usize = 32;
/// Clears the screen and homes the cursor before each redraw.
const CLEAR: &str = "\x1b[H\x1b[2J";

/// Why `tollgate top` failed.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    /// The admin listener could not be reached (nothing listening, wrong address, timeout).
    /// (The cause is part of the message, not an error source, so it shows on the redrawn
    /// screen too and is not printed twice by `{:#}`.)
    #[error("cannot reach the tollgate admin API at {addr}: {cause}; is `tollgate run` up, with `admin.listen` at this address?")]
    Unreachable {
        /// Address that was tried.
        addr: String,
        /// What went wrong on the way.
        cause: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The admin listener answered, but not with metrics.
    #[error("tollgate admin API at {addr} answered {status} on /metrics")]
    Status {
        /// Address that was scraped.
        addr: String,
        /// HTTP status received.
        status: u16,
    },
    /// The exposition could not be read.
    #[error("metrics from {addr}: {error}")]
    Exposition {
        /// Address that was scraped.
        addr: String,
        /// Where and why parsing failed.
        error: ParseError,
    },
    /// `--admin` is not `HOST:PORT`.
    #[error("invalid admin address {0:?}: expected HOST:PORT, e.g. 127.0.0.1:15000")]
    Address(String),
    /// `--interval` is not a usable duration.
    #[error("invalid interval {0:?}: expected a duration of at least 100ms, e.g. 2s or 500ms")]
    Interval(String),
    /// Writing to the terminal or starting the runtime failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A line of the exposition that is not valid Prometheus text format.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {msg}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub msg: &'static str,
}

/// Label pairs of a sample, in exposition order (few per sample: a list beats a map).
pub type Labels = Vec<(String, String)>;

/// One sample line (`name{labels} value`), the unit the view aggregates.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Label pairs in exposition order, values unescaped.
    pub labels: Labels,
    /// Sample value.
    pub value: f64,
}

impl Sample {
    /// Value of label `key`, if present: the view groups by `agent` and filters by others.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Parse a Prometheus text exposition (format 0.0.4). Histogram and summary families are
/// dropped: the view only reads counters and gauges, and bucket series would only cost memory.
pub fn parse_exposition(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut skipped: HashSet<&str> = HashSet::new();
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.split_whitespace();
            if parts.next() == Some("TYPE") {
                if let (Some(name), Some("histogram" | "summary")) = (parts.next(), parts.next()) {
                    skipped.insert(name);
                }
            }
            continue;
        }
        let sample = parse_sample(line).map_err(|msg| ParseError { line: i + 1, msg })?;
        if !in_family(&sample.name, &skipped) {
            out.push(sample);
        }
    }
    Ok(out)
}

/// Whether `name` is a series of one of the `families` (itself or its histogram/summary parts).
fn in_family(name: &str, families: &HashSet<&str>) -> bool {
    families.contains(name)
        || ["_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| name.strip_suffix(suffix).is_some_and(|base| families.contains(base)))
}

fn parse_sample(line: &str) -> Result<Sample, &'static str> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace()).ok_or("sample without a value")?;
    let name = &line[..name_end];
    if !is_name(name, true) {
        return Err("invalid metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(r)?;
        labels = parsed;
        rest = after;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("sample without a value")?.parse::<f64>().map_err(|_| "invalid sample value")?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>().map_err(|_| "invalid timestamp")?;
    }
    if fields.next().is_some() {
        return Err("unexpected text after the sample");
    }
    Ok(Sample { name: name.to_string(), labels, value })
}

/// Parse `key="value",...}` (the opening brace already consumed); returns the labels and the
/// text after the closing brace.
fn parse_labels(s: &str) -> Result<(Labels, &str), &'static str> {
    let mut labels = Vec::new();
    let mut rest = s.trim_start();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest.find('=').ok_or("label without '='")?;
        let key = rest[..eq].trim();
        if !is_name(key, false) {
            return Err("invalid label name");
        }
        rest = rest[eq + 1..].trim_start().strip_prefix('"').ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value"),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    // Not an escape the format defines: keep it literally.
                    Some((_, c)) => {
                        value.push('\\');
                        value.push(c);
                    }
                    None => return Err("unterminated label value"),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.push((key.to_string(), value));
        rest = rest[end + 1..].trim_start();
        if let Some(r) = rest.strip_prefix(',') {
            rest = r.trim_start();
        } else if !rest.starts_with('}') {
            return Err("expected ',' or '}' after a label");
        }
    }
}

/// Metric names may contain `:`, label names may not; neither may start with a digit.
fn is_name(s: &str, metric: bool) -> bool {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || (metric && c == ':');
    s.chars().next().is_some_and(|c| !c.is_ascii_digit()) && s.chars().all(ok)
}

/// Cumulative counters of one agent at one scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentTotals {
    /// LLM calls (`tollgate_llm_requests_total`).
    pub requests: f64,
    /// Calls that failed: status ≥ 400, no status (0), or an `error` label.
    pub errors: f64,
    /// Tokens (`tollgate_llm_tokens_total{token_type="total"}`).
    pub tokens: f64,
    /// Spend in USD (`tollgate_llm_cost_usd_total`); `None` while tollgate exports no cost.
    pub cost_usd: Option<f64>,
    /// Least remaining share (0..1) over the agent's token limits
    /// (`tollgate_ratelimit_remaining_ratio`), so the limit closest to refusing shows; `None`
    /// while no limit has seen a call of the agent.
    pub headroom: Option<f64>,
}

/// Per-agent counters at one instant: two of them give the rates the table shows.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// When the scrape completed.
    pub at: Instant,
    /// Counters by agent name.
    pub agents: BTreeMap<String, AgentTotals>,
}

impl Snapshot {
    /// Sum the counter samples the view needs per agent, ignoring every other family.
    pub fn from_samples(at: Instant, samples: &[Sample]) -> Snapshot {
        let mut agents: BTreeMap<String, AgentTotals> = BTreeMap::new();
        for s in samples {
            let entry = || s.label("agent").unwrap_or("unknown").to_string();
            match s.name.as_str() {
                "tollgate_llm_requests_total" => {
                    let t = agents.entry(entry()).or_default();
                    t.requests += s.value;
                    if is_error(s) {
                        t.errors += s.value;
                    }
                }
                "tollgate_llm_tokens_total" if s.label("token_type") == Some("total") => {
                    agents.entry(entry()).or_default().tokens += s.value;
                }
                "tollgate_llm_cost_usd_total" => {
                    let t = agents.entry(entry()).or_default();
                    t.cost_usd = Some(t.cost_usd.unwrap_or(0.0) + s.value);
                }
                "tollgate_ratelimit_remaining_ratio" if s.value.is_finite() => {
                    let t = agents.entry(entry()).or_default();
                    t.headroom = Some(t.headroom.map_or(s.value, |h| h.min(s.value)));
                }
                _ => {}
            }
        }
        Snapshot { at, agents }
    }
}

fn is_error(s: &Sample) -> bool {
    let status_error = match s.label("status") {
        Some(v) => v.parse::<u16>().map_or(true, |code| code == 0 || code >= 400),
        None => false,
    };
    status_error || s.label("error").is_some_and(|e| !e.is_empty() && e != "false")
}

/// One line of the table: an agent's rates between two snapshots.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Agent name as tollgate labels it.
    pub agent: String,
    /// LLM calls per second.
    pub requests_per_s: f64,
    /// Tokens per minute.
    pub tokens_per_min: f64,
    /// Failed calls per second.
    pub errors_per_s: f64,
    /// Spend so far in USD, if tollgate exports cost.
    pub cost_usd: Option<f64>,
    /// Spend per minute in USD, if tollgate exports cost.
    pub cost_per_min: Option<f64>,
    /// Least remaining share (0..1) of the agent's token limits at the latest scrape, if any
    /// limit applies to it: a gauge, so it is read from `cur`, not differenced.
    pub headroom: Option<f64>,
}

/// Rates of every agent in `cur`, busiest (tokens/min) first. A counter lower than before means
/// tollgate restarted, so the new value is the whole increase; agents absent from `prev`
/// started from zero.
pub fn rates(prev: &Snapshot, cur: &Snapshot) -> Vec<Row> {
    let secs = cur.at.saturating_duration_since(prev.at).as_secs_f64();
    let per_s = |delta: f64| if secs > 0.0 { delta / secs } else { 0.0 };
    let delta = |before: f64, now: f64| if now >= before { now - before } else { now };
    let zero = AgentTotals::default();
    let mut rows: Vec<Row> = cur
        .agents
        .iter()
        .map(|(agent, now)| {
            let before = prev.agents.get(agent).unwrap_or(&zero);
            Row {
                agent: agent.clone(),
                requests_per_s: per_s(delta(before.requests, now.requests)),
                tokens_per_min: per_s(delta(before.tokens, now.tokens)) * 60.0,
                errors_per_s: per_s(delta(before.errors, now.errors)),
                cost_usd: now.cost_usd,
                cost_per_min: now.cost_usd.map(|c| per_s(delta(before.cost_usd.unwrap_or(0.0), c)) * 60.0),
                headroom: now.headroom,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        b.tokens_per_min
            .total_cmp(&a.tokens_per_min)
            .then(b.requests_per_s.total_cmp(&a.requests_per_s))
            .then_with(|| a.agent.cmp(&b.agent))
    });
    rows
}

/// Plain-text table of `rows` under a header naming the source, so a pasted snapshot says where
/// and over what window it was taken.
pub fn render(admin: &str, window: Duration, rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "tollgate top  {admin}  window {}  {} agent{}",
        humantime::format_duration(window),
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    );
    if rows.is_empty() {
        out.push_str("\nno LLM calls recorded yet\n");
        return out;
    }
    let header = ["AGENT", "REQ/S", "TOK/MIN", "ERR/S", "COST $", "$/MIN", "HEADROOM"];
    let mut lines: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            [
                clip(&r.agent),
                rate(r.requests_per_s),
                rate(r.tokens_per_min),
                rate(r.errors_per_s),
                r.cost_usd.map_or_else(|| "-".into(), usd),
                r.cost_per_min.map_or_else(|| "-".into(), usd),
                r.headroom.map_or_else(|| "-".into(), percent),
            ]
        })
        .collect();
    if rows.len() > 1 {
        let sum = |f: fn(&Row) -> f64| rows.iter().map(f).sum::<f64>();
        let sum_opt = |f: fn(&Row) -> Option<f64>| rows.iter().filter_map(f).reduce(|a, b| a + b);
        lines.push([
            "TOTAL".into(),
            rate(sum(|r| r.requests_per_s)),
            rate(sum(|r| r.tokens_per_min)),
            rate(sum(|r| r.errors_per_s)),
            sum_opt(|r| r.cost_usd).map_or_else(|| "-".into(), usd),
            sum_opt(|r| r.cost_per_min).map_or_else(|| "-".into(), usd),
            // The tightest limit of any agent: what is about to refuse somebody.
            rows.iter().filter_map(|r| r.headroom).reduce(f64::min).map_or_else(|| "-".into(), percent),
        ]);
    }
    let mut widths = header.map(|h| h.chars().count());
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    out.push('\n');
    push_line(&mut out, &header.map(String::from), &widths);
    for (i, line) in lines.iter().enumerate() {
        if i == rows.len() {
            let rule: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            out.push_str(&"-".repeat(rule));
            out.push('\n');
        }
        push_line(&mut out, line, &widths);
    }
    out
}

/// Agent name left-aligned, numbers right-aligned, two spaces between columns.
fn push_line(out: &mut String, cells: &[String; 7], widths: &[usize; 7]) {
    let mut line = String::new();
    for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
        let pad = w.saturating_sub(cell.chars().count());
        if i == 0 {
            line.push_str(cell);
            line.push_str(&" ".repeat(pad));
        } else {
            line.push_str("  ");
            line.push_str(&" ".repeat(pad));
            line.push_str(cell);
        }
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

fn clip(agent: &str) -> String {
    if agent.chars().count() <= MAX_AGENT_WIDTH {
        return agent.to_string();
    }
    let mut s: String = agent.chars().take(MAX_AGENT_WIDTH - 1).collect();
    s.push('…');
    s
}

/// Fewer decimals as numbers grow: small rates need precision, large ones need width.
fn rate(v: f64) -> String {
    match v.abs() {
        0.0 => "0".into(),
        a if a < 10.0 => format!("{v:.2}"),
        a if a < 10_000.0 => format!("{v:.1}"),
        _ => format!("{v:.0}"),
    }
}

/// A 0..1 share as a percentage, one decimal below 10 % where it matters most; rounded down,
/// so headroom is never shown larger than it is (99.9 % left is not "100%").
fn percent(ratio: f64) -> String {
    let p = ratio * 100.0;
    if p < 10.0 {
        format!("{:.1}%", (p * 10.0).floor() / 10.0)
    } else {
        format!("{:.0}%", p.floor())
    }
}

fn usd(v: f64) -> String {
    if v.abs() < 1.0 {
        format!("{v:.4}")
    } else {
        format!("{v:.2}")
    }
}

/// Parse `--interval`: a humantime duration (`2s`, `500ms`) or bare seconds (`2`), at least
/// 100ms so rates are not dominated by scrape jitter.
pub fn parse_interval(s: &str) -> Result<Duration, TopError> {
    let d = match s.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Duration::from_secs_f64(secs),
        Ok(_) => return Err(TopError::Interval(s.to_string())),
        Err(_) => humantime::parse_duration(s.trim()).map_err(|_| TopError::Interval(s.to_string()))?,
    };
    if d < MIN_INTERVAL {
        return Err(TopError::Interval(s.to_string()));
    }
    Ok(d)
}

/// What `tollgate top` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Admin listener, `HOST:PORT` (an `http://` prefix is tolerated).
    pub admin: String,
    /// Time between scrapes, i.e. the window rates are averaged over.
    pub interval: Duration,
    /// Print one table (two scrapes `interval` apart) and exit, instead of redrawing.
    pub once: bool,
}

/// Run the view until interrupted (or once). Fails with [`TopError::Unreachable`] when the
/// first scrape cannot reach the admin API; later failures are shown and retried, so a
/// tollgate restart does not end the view.
pub fn run(opts: &Options) -> Result<(), TopError> {
    let admin = normalize_admin(&opts.admin)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut prev = scrape(&admin).await?;
        let mut stdout = std::io::stdout();
        if opts.once {
            tokio::time::sleep(opts.interval).await;
            let cur = scrape(&admin).await?;
            stdout.write_all(render(&admin, window(&prev, &cur), &rates(&prev, &cur)).as_bytes())?;
            return Ok(());
        }
        writeln!(stdout, "{CLEAR}tollgate top  {admin}  first sample taken, next in {:?}…", opts.interval)?;
        stdout.flush()?;
        let mut tick = tokio::time::interval(opts.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let frame = match scrape(&admin).await {
                Ok(cur) => {
                    let frame = render(&admin, window(&prev, &cur), &rates(&prev, &cur));
                    prev = cur;
                    frame
                }
                Err(e) => format!("tollgate top  {admin}\n\n{e}\nretrying every {:?}\n", opts.interval),
            };
            write!(stdout, "{CLEAR}{frame}")?;
            stdout.flush()?;
        }
    })
}

fn window(prev: &Snapshot, cur: &Snapshot) -> Duration {
    // Millisecond resolution is what the header can usefully show.
    let d = cur.at.saturating_duration_since(prev.at);
    Duration::from_millis(d.as_millis().try_into().unwrap_or(u64::MAX))
}

/// `HOST:PORT` from what the user typed, so messages name the address that was really tried.
fn normalize_admin(s: &str) -> Result<String, TopError> {
    let trimmed = s.trim();
    let bare = trimmed.strip_prefix("http://").unwrap_or(trimmed).trim_end_matches('/');
    match bare.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() && !bare.contains('/') => {
            Ok(bare.to_string())
        }
        _ => Err(TopError::Address(s.to_string())),
    }
}

/// Scrape `/metrics` once and aggregate it.
async fn scrape(admin: &str) -> Result<Snapshot, TopError> {
    let text = fetch(admin).await?;
    let samples = parse_exposition(&text).map_err(|error| TopError::Exposition { addr: admin.to_string(), error })?;
    Ok(Snapshot::from_samples(Instant::now(), &samples))
}

async fn fetch(admin: &str) -> Result<String, TopError> {
    let unreachable =
        |cause: Box<dyn std::error::Error + Send + Sync>| TopError::Unreachable { addr: admin.to_string(), cause };
    let get = async {
        let stream = tokio::net::TcpStream::connect(admin).await.map_err(|e| unreachable(e.into()))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| unreachable(e.into()))?;
        tokio::spawn(conn);
        let req = http::Request::get("/metrics")
            .header(http::header::HOST, admin)
            .body(Empty::<Bytes>::new())
            .map_err(|e| unreachable(e.into()))?;
        let resp = sender.send_request(req).await.map_err(|e| unreachable(e.into()))?;
        if resp.status() != http::StatusCode::OK {
            return Err(TopError::Status { addr: admin.to_string(), status: resp.status().as_u16() });
        }
        let body = resp.into_body().collect().await.map_err(|e| unreachable(e.into()))?.to_bytes();
        String::from_utf8(body.to_vec()).map_err(|_| TopError::Exposition {
            addr: admin.to_string(),
            error: ParseError { line: 0, msg: "body is not UTF-8" },
        })
    };
    match tokio::time::timeout(FETCH_TIMEOUT, get).await {
        Ok(r) => r,
        Err(_) => Err(unreachable(format!("no answer within {FETCH_TIMEOUT:?}").into())),
    }
}

#[cfg(test)]
#[path = "top_tests.rs"]
mod tests;
