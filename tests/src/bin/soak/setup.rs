//! The soak's world: a private cgroup2 mount with one group per agent kind, two mock upstreams
//! (A answers the complete agents, plaintext and TLS; B answers the streams that are cut, so its
//! books stay apart), a real redis-server behind the token limits, the real MCP SDK server, and
//! tollgate capturing all of it. Addresses are in 127.0.77.0/24 with free ports, so the soak
//! shares nothing with the scenarios' fixed addresses.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use tollgate_e2e::certs::TestCa;
use tollgate_e2e::cgroup::{Cgroup2, Group};
use tollgate_e2e::client::{client_script, venv_python};
use tollgate_e2e::mock::MockLlm;
use tollgate_e2e::redis::RedisServer;
use tollgate_e2e::tollgate::{self as tg, base_config, ensure_bpffs, Tollgate};
use tollgate_e2e::{free_port, merge, require_root, wait_for};

use crate::agent::Tally;
use crate::Common;

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Agent kinds with a group (and agent name `soak-<kind>`) each; `plain` runs two processes.
pub const KINDS: [&str; 5] = ["plain", "tls", "cut", "mcp", "idle"];

const IP_A: &str = "127.0.77.2";
const IP_B: &str = "127.0.77.3";
const IP_TLS: &str = "127.0.77.4";
const IP_MCP: &str = "127.0.77.5";
const TLS_HOST: &str = "api.openai.com";

/// Everything a soak run holds; dropped in field order (tollgate first, the cgroup mount last).
pub struct Soak {
    /// tollgate under test.
    pub t: Tollgate,
    agents: Vec<(String, Child, PathBuf)>,
    idle: Vec<(Child, PathBuf)>,
    /// Tallies of idle agents that already finished.
    pub idle_done: Vec<Tally>,
    /// Mock for the complete agents (plaintext listener captured, TLS listener the intercept
    /// route's upstream).
    pub mock_a: MockLlm,
    /// Mock for the cut streams.
    pub mock_b: MockLlm,
    /// redis-server behind the token limits.
    pub redis: RedisServer,
    mcp: Child,
    /// tollgate's CA (trust root of the TLS agent).
    pub ca: PathBuf,
    addr_a: String,
    addr_b: String,
    addr_mcp: String,
    /// Reloads: (good sent, bad sent).
    pub reloads: (u64, u64),
    limit_toggle: bool,
    good_config: Value,
    groups: Vec<Group>,
    _cg: Cgroup2,
    /// Scratch dir (agent tallies, MCP call log, certificates).
    pub scratch: tempfile::TempDir,
}

fn group_of<'a>(groups: &'a [Group], kind: &str) -> &'a Group {
    &groups[KINDS.iter().position(|k| *k == kind).expect("kind")]
}

impl Soak {
    /// Start mocks, Redis, the MCP server and tollgate; no traffic yet.
    pub fn start(c: &Common) -> Result<Soak> {
        require_root()?;
        ensure_bpffs()?;
        for kv in &c.tollgate_env {
            let (k, v) = kv.split_once('=').ok_or_else(|| anyhow!("--tollgate-env {kv:?}: want NAME=VALUE"))?;
            // Single-threaded here; every child (tollgate included) inherits it.
            std::env::set_var(k, v);
        }
        let scratch = tempfile::Builder::new().prefix("tollgate-soak-").tempdir()?;
        let cg = Cgroup2::mount()?;
        let groups = KINDS.iter().map(|k| cg.group(&format!("soak-{k}"))).collect::<Result<Vec<_>>>()?;
        let mock_ca = TestCa::new(scratch.path(), "soak-mock", "tollgate soak mock CA")?;
        let cert = mock_ca.issue(scratch.path(), "soak-mock-upstream", &["localhost", "127.0.0.1"])?;
        let addr_a = format!("{IP_A}:{}", free_port(IP_A));
        let addr_b = format!("{IP_B}:{}", free_port(IP_B));
        let addr_mcp = format!("{IP_MCP}:{}", free_port(IP_MCP));
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (cp, kp) = (cert.cert_path.to_string_lossy().into_owned(), cert.key_path.to_string_lossy().into_owned());
        let mock_a = MockLlm::start(
            &c.mock,
            &args(&[
                "--listen",
                &addr_a,
                "--tls-listen",
                "127.0.0.1:0",
                "--cert",
                &cp,
                "--key",
                &kp,
                "--chunk-delay-ms",
                "2",
                "--record-requests",
                "0",
                "--name",
                "soak-a",
            ]),
        )?;
        let mock_b = MockLlm::start(
            &c.mock,
            &args(&["--listen", &addr_b, "--chunk-delay-ms", "20", "--record-requests", "0", "--name", "soak-b"]),
        )?;
        let redis = RedisServer::start()?;
        let mcp = start_mcp(&addr_mcp, &scratch.path().join("mcp-calls.jsonl"))?;
        let dir = Tollgate::scratch()?;
        let mut cfg = base_config(&cg, dir.path());
        let dest = |a: &str| -> Value {
            let (ip, port) = a.split_once(':').expect("ip:port");
            json!({"cidr": format!("{ip}/32"), "port": port.parse::<u16>().expect("port")})
        };
        merge(
            &mut cfg,
            json!({
                "capture": {
                    "scope": groups.iter().map(Group::rel).collect::<Vec<_>>(),
                    "destinations": [dest(&addr_a), dest(&addr_b), dest(&format!("{IP_TLS}:443")), dest(&addr_mcp)],
                },
                "routes": [
                    {"name": "plain-llm", "provider": "openai", "match": {"addresses": [addr_a]}},
                    {"name": "cut-llm", "provider": "openai", "match": {"addresses": [addr_b]}},
                    {"name": "tls-llm", "provider": "openai", "intercept": true, "match": {"hosts": [TLS_HOST]},
                     "upstream": format!("https://127.0.0.1:{}", mock_a.https[0].port())},
                    {"name": "mcp", "protocol": "mcp", "match": {"addresses": [addr_mcp]}},
                ],
                "tls": {"extra_roots": [mock_ca.cert_path]},
                "agents": KINDS.iter().zip(&groups)
                    .map(|(k, g)| json!({"name": format!("soak-{k}"), "match": {"cgroup": g.rel()}}))
                    .collect::<Vec<_>>(),
                "rate_limits": limits(&redis, false),
            }),
        );
        if c.no_limits {
            cfg.as_object_mut().map(|o| o.remove("rate_limits"));
        }
        let good_config = cfg.clone();
        let t = Tollgate::start(&c.tollgate, dir, cfg, None)?;
        let (ca, _) = tg::ca(&c.tollgate, &t.config_path)?;
        Ok(Soak {
            t,
            agents: Vec::new(),
            idle: Vec::new(),
            idle_done: Vec::new(),
            mock_a,
            mock_b,
            redis,
            mcp,
            ca,
            addr_a,
            addr_b,
            addr_mcp,
            reloads: (0, 0),
            limit_toggle: false,
            good_config,
            groups,
            _cg: cg,
            scratch,
        })
    }

    /// tollgate's pid.
    pub fn pid(&self) -> Result<u32> {
        self.t.pid().ok_or_else(|| anyhow!("tollgate is not running"))
    }

    fn agent_cmd(&self, kind: &str, target: &str, host: &str, until_ms: u64, out: &PathBuf) -> Command {
        let exe = std::env::current_exe().expect("own path");
        let mut cmd = group_of(&self.groups, kind).command(&exe.to_string_lossy(), None);
        cmd.args(["agent", "--kind", kind, "--target", target, "--host", host])
            .args(["--until-ms", &until_ms.to_string()])
            .arg("--out")
            .arg(out)
            .stdin(Stdio::null());
        cmd
    }

    /// Start the steady agents: two plaintext, one TLS, one cutting, one MCP; all stop at
    /// `until_ms`.
    pub fn spawn_traffic(&mut self, until_ms: u64) -> Result<()> {
        let tls_target = format!("{IP_TLS}:443");
        let plan: Vec<(&str, String, String, Vec<String>)> = vec![
            ("plain", self.addr_a.clone(), self.addr_a.clone(), vec!["--seed".into(), "1".into()]),
            ("plain", self.addr_a.clone(), self.addr_a.clone(), vec!["--seed".into(), "2".into()]),
            ("tls", tls_target, TLS_HOST.into(), vec!["--ca".into(), self.ca.to_string_lossy().into_owned()]),
            ("cut", self.addr_b.clone(), self.addr_b.clone(), vec!["--pause-ms".into(), "150".into()]),
            ("mcp", self.addr_mcp.clone(), self.addr_mcp.clone(), vec!["--pause-ms".into(), "200".into()]),
        ];
        for (i, (kind, target, host, extra)) in plan.into_iter().enumerate() {
            let out = self.scratch.path().join(format!("agent-{i}-{kind}.json"));
            let child = self.agent_cmd(kind, &target, &host, until_ms, &out).args(&extra).spawn()?;
            self.agents.push((kind.to_string(), child, out));
        }
        Ok(())
    }

    /// Start an idle agent: `conns` keep-alive connections held until `until_ms`, or for
    /// `hold_ms` once all are open (then `<out>.ready` appears; the path is returned).
    pub fn spawn_idle(&mut self, conns: usize, until_ms: u64, hold_ms: u64) -> Result<PathBuf> {
        self.reap_idle(false)?;
        let out = self.scratch.path().join(format!("idle-{}.json", unix_ms()));
        let seed = (self.idle.len() + self.idle_done.len()).to_string();
        let child = self
            .agent_cmd("idle", &self.addr_a.clone(), &self.addr_a.clone(), until_ms, &out)
            .args(["--conns", &conns.to_string(), "--seed", &seed, "--hold-ms", &hold_ms.to_string()])
            .spawn()?;
        self.idle.push((child, out.clone()));
        Ok(out.with_extension("ready"))
    }

    fn reap_idle(&mut self, wait: bool) -> Result<()> {
        let mut keep = Vec::new();
        for (mut c, out) in std::mem::take(&mut self.idle) {
            let done = if wait { Some(c.wait()?) } else { c.try_wait()? };
            match done {
                Some(st) => self.idle_done.push(read_tally(&out, st)?),
                None => keep.push((c, out)),
            }
        }
        self.idle = keep;
        Ok(())
    }

    /// Wait for every idle agent to finish.
    pub fn join_idle(&mut self) -> Result<()> {
        self.reap_idle(true)
    }

    /// Wait for every agent (they stop by themselves at their deadline); `(kind, tally)`.
    pub fn join_agents(&mut self) -> Result<Vec<(String, Tally)>> {
        self.join_idle()?;
        let mut out = Vec::new();
        for (kind, mut c, path) in std::mem::take(&mut self.agents) {
            let st = c.wait()?;
            out.push((kind, read_tally(&path, st)?));
        }
        out.extend(self.idle_done.drain(..).map(|t| ("idle".to_string(), t)));
        Ok(out)
    }

    /// Inject one named fault (upstream and reload kinds).
    pub fn fault(&mut self, name: &str) -> Result<()> {
        match name {
            "upstream-5xx" => self.mock_a.set_fault(json!({"status": 503, "count": 4})),
            "upstream-reset" => self.mock_a.set_fault(json!({"reset": true, "count": 4})),
            "reload-good" => {
                self.limit_toggle = !self.limit_toggle;
                let mut cfg = self.good_config.clone();
                merge(&mut cfg, json!({"rate_limits": limits(&self.redis, self.limit_toggle)}));
                self.good_config = cfg.clone();
                self.reload(&cfg, "success")
            }
            "reload-bad" => {
                let mut bad = self.good_config.clone();
                merge(&mut bad, json!({"rate_limits": {"soak_not_a_key": true}}));
                self.reload(&bad, "failure")?;
                let good = self.good_config.clone();
                self.reload(&good, "success")
            }
            other => bail!("unknown fault {other}"),
        }
    }

    /// Write `cfg`, send SIGHUP and wait until `tollgate_config_reloads_total{result}` moves.
    fn reload(&mut self, cfg: &Value, result: &str) -> Result<()> {
        let count = |t: &Tollgate| t.metrics().map(|m| m.sum("tollgate_config_reloads_total", &[("result", result)]));
        let before = count(&self.t)?;
        std::fs::write(&self.t.config_path, serde_yaml_ng::to_string(cfg)?)?;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.pid()? as i32, libc::SIGHUP) };
        match result {
            "success" => self.reloads.0 += 1,
            _ => self.reloads.1 += 1,
        }
        let moved = wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            count(&self.t).ok().filter(|n| *n > before)
        });
        ensure!(moved.is_some(), "reload ({result} expected) not counted within 15 s");
        Ok(())
    }
}

impl Drop for Soak {
    fn drop(&mut self) {
        for (_, c, _) in &mut self.agents {
            let _ = c.kill();
            let _ = c.wait();
        }
        for (c, _) in &mut self.idle {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.mcp.kill();
        let _ = self.mcp.wait();
        self.t.terminate();
    }
}

fn read_tally(path: &PathBuf, st: std::process::ExitStatus) -> Result<Tally> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("agent exited {st} without {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// `rate_limits` on Redis: a per-agent token limit far above what the soak sends (it must never
/// refuse; it makes every LLM call reserve and settle through Redis). `alt` changes the limit,
/// so a good reload really changes the policy.
fn limits(redis: &RedisServer, alt: bool) -> Value {
    json!({
        "backend": "redis",
        "redis": {"url": redis.url(), "on_redis_error": "fail_open", "timeout": "200ms", "probe_interval": "500ms"},
        "policies": [{"name": "soak", "key": "agent",
                      "limits": [{"limit": if alt { 2_000_000_000u64 } else { 1_000_000_000u64 }, "window": "1h", "count": "total"}]}],
    })
}

fn start_mcp(addr: &str, log: &std::path::Path) -> Result<Child> {
    let (ip, port) = addr.split_once(':').expect("ip:port");
    let py = venv_python();
    ensure!(py.exists(), "{} missing: run `cargo xtask setup`", py.display());
    let child = Command::new(py)
        .arg(client_script("mcp_server.py"))
        .args(["--host", ip, "--port", port, "--json-response", "--log"])
        .arg(log)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", std::env::temp_dir())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn mcp_server.py")?;
    let sock: std::net::SocketAddr = addr.parse()?;
    let up = wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        std::net::TcpStream::connect_timeout(&sock, Duration::from_millis(200)).ok()
    });
    ensure!(up.is_some(), "mcp_server.py did not listen on {addr} within 30 s");
    Ok(child)
}
