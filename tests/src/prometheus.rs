//! A real Prometheus server (the Debian `prometheus` package's `/usr/bin/prometheus`) for the
//! scenarios: scrapes the given targets every second into a temporary TSDB, listens on a free
//! loopback port (never the packaged service's :9090), answers PromQL through its HTTP API, and
//! is killed on drop.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// Where the Debian package installs the server; `$PROMETHEUS_BIN` overrides it.
pub const DEFAULT_BIN: &str = "/usr/bin/prometheus";

/// One series of an instant query result.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Labels (with `__name__` when the expression keeps it).
    pub labels: BTreeMap<String, String>,
    /// The value at the evaluation time (NaN and ±Inf as Prometheus reports them).
    pub value: f64,
}

impl Series {
    /// `{k="v", ...}` for tables and failure messages.
    pub fn labels_text(&self) -> String {
        let inner: Vec<String> = self.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        format!("{{{}}}", inner.join(", "))
    }
}

/// A running Prometheus.
pub struct Prometheus {
    child: Child,
    /// Config, TSDB and log.
    dir: tempfile::TempDir,
    /// The HTTP API / UI listener.
    pub addr: SocketAddr,
    /// The scrape job name of the targets.
    pub job: String,
}

/// Path of the server binary: `$PROMETHEUS_BIN` or [`DEFAULT_BIN`].
pub fn prometheus_bin() -> PathBuf {
    std::env::var_os("PROMETHEUS_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_BIN))
}

impl Prometheus {
    /// Start Prometheus scraping `targets` (`host:port`, path `/metrics`) every `interval` as job
    /// `job`, and wait until `/-/ready` answers 200.
    pub fn start(bin: &Path, job: &str, targets: &[SocketAddr], interval: Duration) -> Result<Self> {
        if !bin.exists() {
            bail!(
                "{} not found: install the Debian package (`cargo xtask setup` or `apt-get install prometheus`)",
                bin.display()
            );
        }
        let dir = tempfile::Builder::new().prefix(&format!("{}-prometheus-", crate::run_tag())).tempdir()?;
        let secs = format!("{}ms", interval.as_millis().max(1));
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = format!(
            "global:\n  scrape_interval: {secs}\n  scrape_timeout: {secs}\n  evaluation_interval: {secs}\n\
             scrape_configs:\n  - job_name: {job}\n    metrics_path: /metrics\n    static_configs:\n      \
             - targets: [{}]\n",
            targets.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, &config)?;
        let addr: SocketAddr = format!("127.0.0.1:{}", crate::free_port("127.0.0.1")).parse()?;
        let log_path = dir.path().join("prometheus.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let mut p = Prometheus { child, dir, addr, job: job.to_string() };
        p.wait_ready(Duration::from_secs(30))?;
        Ok(p)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                bail!("prometheus exited before it was ready ({st}):\n{}", self.log_tail(40));
            }
            if let Ok((200, _)) = crate::http_get(self.addr, "/-/ready", Duration::from_secs(2)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("prometheus on {} not ready after {timeout:?}:\n{}", self.addr, self.log_tail(40));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last `n` lines of the server's log.
    pub fn log_tail(&self, n: usize) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("prometheus.log")) {
            let _ = f.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// GET an API path; the `data` member of a `"status": "success"` answer, or an error with
    /// Prometheus' own `errorType`/`error`.
    pub fn api(&self, path_and_query: &str) -> Result<Value> {
        let (status, body) = crate::http_get(self.addr, path_and_query, Duration::from_secs(10))
            .with_context(|| format!("prometheus GET {path_and_query}"))?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("prometheus GET {path_and_query}: HTTP {status}, not JSON: {body:?}"))?;
        if v["status"] != "success" {
            bail!("prometheus: HTTP {status}, {}: {}", v["errorType"], v["error"]);
        }
        Ok(v["data"].clone())
    }

    /// Instant query of `expr` at the current time (`/api/v1/query`).
    pub fn query(&self, expr: &str) -> Result<Vec<Series>> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
        let data = self.api(&format!("/api/v1/query?query={}&time={now:.3}", encode(expr)))?;
        parse_result(&data).with_context(|| format!("result of {expr}"))
    }

    /// Values of label `label` on the series `selector` matches (`/api/v1/label/../values`), as
    /// Grafana's `label_values(selector, label)` variables read them; `None` for every series.
    pub fn label_values(&self, label: &str, selector: Option<&str>) -> Result<Vec<String>> {
        let mut path = format!("/api/v1/label/{}/values", encode(label));
        if let Some(s) = selector {
            path.push_str(&format!("?match[]={}", encode(s)));
        }
        let data = self.api(&path)?;
        let arr = data.as_array().ok_or_else(|| anyhow!("label values of {label}: not an array: {data}"))?;
        Ok(arr.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
    }

    /// The single value of a scalar-valued `expr` (e.g. `sum(...)`), `None` when it has no
    /// series.
    pub fn value(&self, expr: &str) -> Result<Option<f64>> {
        let r = self.query(expr)?;
        match r.as_slice() {
            [] => Ok(None),
            [s] => Ok(Some(s.value)),
            _ => bail!("{expr}: {} series, want one", r.len()),
        }
    }

    /// Wait until Prometheus has scraped every target of its job successfully at least once
    /// after `after` (wall clock), i.e. holds what the targets exposed at that time.
    pub fn wait_scraped_after(&self, after: SystemTime, timeout: Duration) -> Result<()> {
        let after = after.duration_since(UNIX_EPOCH)?.as_secs_f64();
        // timestamp() of a plain selector is the time of the last scrape (sample), not the
        // evaluation time.
        let expr = format!("min(timestamp(up{{job=\"{}\"}}))", self.job);
        let up = format!("min(up{{job=\"{}\"}})", self.job);
        let deadline = Instant::now() + timeout;
        loop {
            let ts = self.value(&expr);
            let healthy = self.value(&up);
            if let (Ok(Some(ts)), Ok(Some(h))) = (&ts, &healthy) {
                if *ts > after && *h == 1.0 {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                let targets = self.api("/api/v1/targets").map(|v| v.to_string()).unwrap_or_else(|e| e.to_string());
                bail!(
                    "prometheus did not scrape job {} successfully after {after:.3} within {timeout:?} \
                     (last {expr} = {ts:?}, {up} = {healthy:?}); targets: {targets}\n{}",
                    self.job,
                    self.log_tail(20)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `data` of an instant query: a vector or a scalar (as one unlabelled series).
fn parse_result(data: &Value) -> Result<Vec<Series>> {
    let num = |v: &Value| -> Result<f64> {
        let s = v[1].as_str().ok_or_else(|| anyhow!("sample without a string value: {v}"))?;
        s.parse::<f64>().map_err(|e| anyhow!("sample value {s:?}: {e}"))
    };
    match data["resultType"].as_str() {
        Some("vector") => {
            let arr = data["result"].as_array().ok_or_else(|| anyhow!("vector without result: {data}"))?;
            arr.iter()
                .map(|s| {
                    let labels = s["metric"]
                        .as_object()
                        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string())).collect())
                        .unwrap_or_default();
                    Ok(Series { labels, value: num(&s["value"])? })
                })
                .collect()
        }
        Some("scalar") => Ok(vec![Series { labels: BTreeMap::new(), value: num(&data["result"])? }]),
        other => bail!("unexpected result type {other:?} for an instant query: {data}"),
    }
}

/// Percent-encode everything but RFC 3986 unreserved characters (query parameter values).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn encodes_promql() {
        assert_eq!(encode(r#"sum(x{a=~"b|c"}[1m])"#), "sum%28x%7Ba%3D~%22b%7Cc%22%7D%5B1m%5D%29");
    }

    #[test]
    fn parses_vectors_and_scalars() {
        let v = json!({"resultType": "vector", "result": [
            {"metric": {"agent": "a"}, "value": [1.5, "2"]},
            {"metric": {}, "value": [1.5, "NaN"]},
        ]});
        let r = parse_result(&v).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].labels["agent"], "a");
        assert_eq!(r[0].value, 2.0);
        assert!(r[1].value.is_nan());
        let s = parse_result(&json!({"resultType": "scalar", "result": [1.5, "0.25"]})).unwrap();
        assert_eq!(s[0].value, 0.25);
        assert!(parse_result(&json!({"resultType": "matrix", "result": []})).is_err());
    }
}
