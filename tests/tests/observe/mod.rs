//! Observability scenarios: the bundled Grafana dashboards (`dashboards/*.json`) proven against a
//! real Prometheus scraping a real tollgate.
//!
//! Two agents (two cgroups) call a gateway route through interception (streamed and plain chat
//! on two models, a failover, a call every target fails, a circuit that opens), meet every
//! governance policy (a model an access rule denies, a prompt a guardrail blocks, an email it
//! redacts, a token limit that admits one call and refuses the next) and open a TLS connection
//! tollgate splices. Prometheus (the Debian package's server, private TSDB, 1 s
//! scrapes of tollgate's admin `/metrics`) records all of it. Then every query of every board
//! (template variables included) is evaluated through Prometheus' HTTP API, as Grafana would,
//! and must return series with finite values.
//!
//! The node is also a simulated Kubernetes node ([`k8s`]): pods from an API replay, kubelet-style
//! cgroups, one pod calling the gateway, and a config reload, for the Kubernetes board.

mod k8s;
mod spans;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use tollgate_e2e::certs::TestCa;
use tollgate_e2e::cgroup::Group;
use tollgate_e2e::client::{curl, CurlOut};
use tollgate_e2e::mock::MockLlm;
use tollgate_e2e::openai::{self, ChatRequest};
use tollgate_e2e::prometheus::{prometheus_bin, Prometheus, Series};
use tollgate_e2e::tollgate::Tollgate;
use tollgate_e2e::{anyhow, bail, ensure, repo_root, Context, Result};

use crate::gateway::Gw;
use crate::support::{assert_completion, assert_proxied, chat_curl, wait_metric};

const ALPHA: &str = "obs-alpha";
const BETA: &str = "obs-beta";
const MODELS: [&str; 2] = ["gpt-4o-mini", "gpt-4o"];
const ORIGIN_HOST: &str = "origin.test";
/// Where o1's MCP server listens (captured).
const MCP_IP: &str = "127.0.0.2";
/// Card name of the A2A agent both agents call.
const A2A_CALLEE: &str = "obs-booking-agent";
/// Models of the governance calls; they sort after [`MODELS`], so the Latency board's first
/// `model` value stays a served one.
const FORBIDDEN_MODEL: &str = "obs-forbidden";
const LIMITED_MODEL: &str = "obs-limited";
/// Completion tokens the limit on [`LIMITED_MODEL`] allows per agent and hour: a call asking 10
/// fits (the mock then produces 10), one asking the whole limit never fits after it.
const LIMIT: u32 = 100;
const EMAIL: &str = "jane.doe@example.com";
/// LLM calls per agent and round (see [`Traffic::round`]).
const CALLS_PER_ROUND: u32 = 12;

/// What Grafana would put for its built-in interval variables (Prometheus scrapes every second
/// here, and all traffic happens within the last minute).
const BUILTINS: [(&str, &str); 3] = [("__rate_interval", "1m"), ("__interval", "15s"), ("__range", "1h")];

// ---------------------------------------------------------------------------------------------
// The scenario
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, BPF, built binaries and prometheus: run via `cargo xtask test`"]
fn o1_every_dashboard_query_returns_data() -> Result<()> {
    // Structure first: a malformed board fails fast, before any process starts.
    let boards = load_boards()?;
    for b in &boards {
        check_structure(b).with_context(|| format!("dashboard {}", b.file))?;
    }

    let gw = Gw::new(ALPHA, 8121)?;
    let beta = gw.e.cg.group(BETA)?;
    let (key_a, key_b) = ("sk-obs-provider-a", "sk-obs-provider-b");
    let a = gw.mock("a", &[key_a], &["--chunk-delay-ms", "5"])?;
    let b = gw.mock("b", &[key_b], &["--chunk-delay-ms", "5"])?;
    let (ka, kb) = (gw.key_file("a", key_a)?, gw.key_file("b", key_b)?);
    let origin_ca = TestCa::new(gw.e.scratch.path(), "origin", "tollgate e2e origin CA")?;
    let cert = origin_ca.issue(gw.e.scratch.path(), "origin", &[ORIGIN_HOST])?;
    let origin = gw.e.mock_tls("127.0.0.3:0", &cert, &[])?;
    let origin_addr = origin.https[0];
    let node = k8s::Node::new(&gw)?;
    // A real MCP server (the `mcp` SDK) for the MCP panels: both agents list and call tools,
    // one call allowed and one denied per round.
    let mcp_port = tollgate_e2e::free_port(MCP_IP);
    let mcp_addr = format!("{MCP_IP}:{mcp_port}");
    let _mcp = crate::mcp::McpServer::start(&gw.e, MCP_IP, mcp_port, "streamable-http")?;
    // A federation in front of it on a captured address (nothing listens there): its panels.
    let fed_addr = format!("{MCP_IP}:{}", tollgate_e2e::free_port(MCP_IP));
    // A real a2a-sdk agent for the A2A panels: both agents call it once a round. Its own LLM
    // calls go to a mock of its own, outside the capture scope, so they leave the LLM figures
    // of the two agents alone.
    let a2a_port = tollgate_e2e::free_port(MCP_IP);
    let a2a_addr = format!("{MCP_IP}:{a2a_port}");
    let booking_llm = gw.e.mock(&["--listen", "127.0.0.1:0"])?;
    let booking_g = gw.e.cg.group("obs-booking")?;
    let booking_url = format!("http://{}/v1/chat/completions", booking_llm.http[0]);
    let _booking = crate::a2a::Agent::start_with_llm(&booking_g, A2A_CALLEE, &a2a_addr, &booking_url)?;

    let provider = |name: &str, m: &MockLlm, key: &PathBuf| {
        let base = format!("http://{}/v1", m.http[0]);
        json!({"name": name, "kind": "openai", "base_url": base, "credentials": {"file": key}})
    };
    let t = gw.e.tollgate(
        json!({
            "capture": {
                "scope": [gw.g.rel(), beta.rel()],
                "destinations": [
                    {"cidr": format!("{}/32", gw.vip.ip()), "port": gw.vip.port()},
                    {"cidr": format!("{}/32", origin_addr.ip()), "port": origin_addr.port()},
                    {"cidr": format!("{MCP_IP}/32"), "port": mcp_port},
                    {"cidr": format!("{MCP_IP}/32"), "port": a2a_port},
                    {"cidr": format!("{MCP_IP}/32"), "port": fed_addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok())},
                ],
            },
            "providers": [provider("a", &a, &ka), provider("b", &b, &kb)],
            "routes": [{
                "name": "gw",
                "match": {"addresses": [gw.vip.to_string()]},
                "targets": [{"provider": "a", "priority": 0}, {"provider": "b", "priority": 1}],
                "failover": {"on": ["server_error"], "max_attempts": 2},
                // Four consecutive failures open A's circuit: each agent's round ends with three,
                // the last step adds the fourth. Open long enough to still be open when queried.
                "circuit": {"max_fails": 4, "fail_timeout": "10m"},
            }, {"name": "obs-mcp", "protocol": "mcp", "match": {"addresses": [mcp_addr]}},
               {"name": "obs-a2a", "protocol": "a2a", "match": {"addresses": [a2a_addr]}},
               {"name": "obs-fed", "protocol": "mcp", "federation": "obs-fed", "match": {"addresses": [fed_addr]}}],
            "mcp": {
                "tools": [{"name": "obs-no-delete", "deny": ["*delete_*"]}],
                "federations": [{"name": "obs-fed", "servers": [{"name": "web", "url": format!("http://{mcp_addr}/mcp")}]}],
            },
            "agents": [
                {"name": ALPHA, "match": {"cgroup": gw.g.rel()}},
                {"name": BETA, "match": {"cgroup": beta.rel()}},
            ],
            // Per million tokens; `gpt-4o-mini*` must win over `gpt-4o*` for the mini model.
            "pricing": [
                {"model": "gpt-4o-mini*", "input_per_mtok": 0.15, "output_per_mtok": 0.6},
                {"model": "gpt-4o*", "input_per_mtok": 2.5, "output_per_mtok": 10.0},
            ],
            "kubernetes": node.config(),
            // Governance, one of each so its panels have data: an access deny, a token limit
            // on one model, a guardrail that blocks and one that redacts.
            "access": [{"name": "obs-no-forbidden", "deny": {"models": [format!("{FORBIDDEN_MODEL}*")]}}],
            "rate_limits": {"policies": [{
                "name": "obs-completion",
                "match": {"model": LIMITED_MODEL},
                "limits": [{"limit": LIMIT, "window": "1h", "count": "completion"}],
            }]},
            "guardrails": [
                {"kind": "regex", "name": "obs-jailbreak", "deny": ["(?i)ignore (all )?previous instructions"]},
                {"kind": "pii", "name": "obs-pii", "roles": ["user"], "entities": {"email": "redact"}},
            ],
        }),
        None,
    )?;

    // Prometheus first, so it sees every series before and after the traffic that moves it:
    // rate() of a series needs two samples that differ.
    let prom = Prometheus::start(&prometheus_bin(), "tollgate", &[t.admin], Duration::from_secs(1))?;
    prom.wait_scraped_after(SystemTime::now(), Duration::from_secs(15))?;
    node.wait_ready(&t)?;
    k8s::reload_unchanged(&t)?;

    let ctx = Traffic { gw: &gw, a: &a, b: &b, origin_ca: &origin_ca, origin: origin_addr };
    for round in 1..=2u32 {
        for (agent, g) in [(ALPHA, &gw.g), (BETA, &beta)] {
            ctx.round(agent, g, round)?;
            let url = format!("http://{mcp_addr}/mcp");
            let calls = [("get_weather", json!({"city": "Oslo"})), ("delete_file", json!({"path": "/tmp/obs"}))];
            let out = crate::mcp::client(g, &url, "auto", &calls, None)?;
            ensure!(out["calls"][0]["ok"] == true && out["calls"][1]["ok"] == false, "{agent} MCP calls: {out}");
            let fed = crate::mcp::client(g, &format!("http://{fed_addr}/mcp"), "legacy", &[], None)?;
            ensure!(fed["tools"].as_array().is_some_and(|t| t.len() == 2), "{agent} federated list: {fed}");
            let v = crate::a2a::orchestrate(g, None, &format!("http://{a2a_addr}"), "Book a table for two", &[])?;
            ensure!(v["ok"] == true && v["card_name"] == A2A_CALLEE, "{agent} A2A call: {v}");
        }
        // Every call of the round is in tollgate's metrics, and Prometheus scraped them.
        for agent in [ALPHA, BETA] {
            let n = f64::from(round);
            wait_metric(&t, "tollgate_llm_requests_total", &[("agent", agent)], f64::from(CALLS_PER_ROUND) * n)?;
            wait_metric(&t, "tollgate_policy_denials_total", &[("agent", agent)], 4.0 * n)?;
            wait_metric(&t, "tollgate_ratelimit_rejections_total", &[("agent", agent)], n)?;
            wait_metric(&t, "tollgate_guardrail_verdicts_total", &[("agent", agent), ("action", "redact")], n)?;
            wait_metric(&t, "tollgate_mcp_tool_calls_total", &[("agent", agent)], 2.0 * n)?;
            wait_metric(&t, "tollgate_a2a_hops_total", &[("source", agent), ("target", A2A_CALLEE)], n)?;
        }
        wait_synced(&t, &prom)?;
    }

    // A goes down for good: its fourth consecutive failure opens the circuit; B serves the call.
    a.set_fault(json!({"status": 503}))?;
    let r = ctx.chat(&gw.g, MODELS[0], "obs circuit opener", false)?;
    a.clear_fault()?;
    ensure!(r.http_code == 200 && r.header("x-mock-name") == Some("b"), "B did not serve: {}", r.describe());
    wait_metric(&t, "tollgate_upstream_circuit_state", &[("route", "gw"), ("target", "a")], 2.0)?;
    wait_metric(&t, "tollgate_upstream_circuit_state", &[("route", "gw"), ("target", "b")], 0.0)?;
    // Per agent and round: A ok 6, A server_error 3, B ok 1, B server_error 2; plus the opener.
    for (target, outcome, n) in
        [("a", "ok", 24.0), ("a", "server_error", 13.0), ("b", "ok", 5.0), ("b", "server_error", 8.0)]
    {
        wait_metric(
            &t,
            "tollgate_upstream_attempts_total",
            &[("route", "gw"), ("target", target), ("outcome", outcome)],
            n,
        )?;
    }
    wait_metric(&t, "tollgate_llm_requests_total", &[("status", "200")], 29.0)?;
    wait_metric(&t, "tollgate_llm_requests_total", &[("status", "503")], 8.0)?;
    for status in ["403", "400", "429"] {
        wait_metric(&t, "tollgate_llm_requests_total", &[("status", status)], 4.0)?;
    }
    // The Deployment's pod calls too (B serves: A's circuit is open).
    node.traffic(&gw, &t, &prom)?;
    wait_synced(&t, &prom)?;

    // Every query of every board.
    let mut report = Report::default();
    for b in &boards {
        evaluate_board(&prom, b, &mut report).with_context(|| format!("dashboard {}", b.file))?;
    }
    println!("{}", report.table());
    let targets: usize =
        boards.iter().map(|b| panels(&b.json).iter().map(|p| targets_of(p).len()).sum::<usize>()).sum();
    let boards_with_queries: BTreeSet<&str> = report.rows.iter().map(|r| r.board.as_str()).collect();
    println!(
        "o1: {targets} panel queries evaluated {} times (per agent and with All) plus {} variable queries, \
         on {} of {} boards ({}); {} failed",
        report.rows.len(),
        report.var_queries,
        boards_with_queries.len(),
        boards.len(),
        boards_with_queries.iter().copied().collect::<Vec<_>>().join(", "),
        report.failures().len()
    );
    let failures = report.failures();
    if !failures.is_empty() {
        let mut msg = String::new();
        for r in failures {
            let _ =
                writeln!(msg, "- {} / {} [{}] ({}): {}\n    {}", r.board, r.panel, r.ref_id, r.mode, r.outcome, r.expr);
        }
        bail!("dashboard queries without data:\n{msg}--- tollgate metrics ---\n{}", t.metrics()?.dump("tollgate_"));
    }
    ensure!(report.rows.len() >= 40, "only {} query evaluations: were the boards emptied?", report.rows.len());
    Ok(())
}

/// The traffic of one agent: clients in its cgroup calling the captured gateway address and a
/// spliced TLS origin.
struct Traffic<'a> {
    gw: &'a Gw,
    a: &'a MockLlm,
    b: &'a MockLlm,
    origin_ca: &'a TestCa,
    origin: std::net::SocketAddr,
}

impl Traffic<'_> {
    fn chat(&self, g: &Group, model: &str, prompt: &str, stream: bool) -> Result<CurlOut> {
        let mut req = ChatRequest::simple(model, prompt);
        if stream {
            req.stream = true;
            // Several output tokens, so time per output token is defined.
            req.max_tokens = Some(12);
        }
        chat_curl(&self.gw.e, Some(g), &self.gw.url("/v1/chat/completions"), &req)
    }

    /// Per round: the governance calls ([`Traffic::governed`]: 3 refused, 2 served by A),
    /// plain and streamed chat on both models (A serves), a 503 from A that B serves, a call on
    /// each model that both targets fail (the agent gets 503), and one spliced HTTPS request.
    /// The governed calls come first: the round must end with A's three consecutive failures
    /// (see the circuit).
    fn round(&self, agent: &str, g: &Group, round: u32) -> Result<()> {
        let who = |what: &str| format!("{agent} round {round}: {what}");
        self.governed(agent, g, round)?;
        for model in MODELS {
            let req = ChatRequest::simple(model, &format!("{agent} asks {model} in round {round}"));
            let r = chat_curl(&self.gw.e, Some(g), &self.gw.url("/v1/chat/completions"), &req)?;
            assert_completion(&r, &openai::reply_for(&req)).with_context(|| who("plain chat"))?;
            ensure!(r.header("x-mock-name") == Some("a"), "{}: {}", who("plain chat not served by A"), r.describe());
            let r = self.chat(g, model, &format!("{agent} streams {model} in round {round}"), true)?;
            ensure!(
                r.exit == 0 && r.http_code == 200 && r.text().contains("data: [DONE]"),
                "{}: {}",
                who("streamed chat"),
                r.describe()
            );
        }
        self.a.set_fault(json!({"status": 503, "count": 1}))?;
        let r = self.chat(g, MODELS[0], &format!("{agent} fails over in round {round}"), false)?;
        ensure!(r.http_code == 200 && r.header("x-mock-name") == Some("b"), "{}: {}", who("failover"), r.describe());
        for model in MODELS {
            self.a.set_fault(json!({"status": 503, "count": 1}))?;
            self.b.set_fault(json!({"status": 503, "count": 1}))?;
            let r = self.chat(g, model, &format!("{agent} hits two outages on {model} in round {round}"), false)?;
            ensure!(r.http_code == 503, "{}: {}", who("all targets failing"), r.describe());
        }

        let cacert = self.origin_ca.cert_path.to_string_lossy().into_owned();
        let resolve = format!("{ORIGIN_HOST}:{}:{}", self.origin.port(), self.origin.ip());
        let url = format!("https://{ORIGIN_HOST}:{}/", self.origin.port());
        let r = curl(Some(g), None, &["--cacert", &cacert, "--resolve", &resolve, &url])?;
        ensure!(
            r.exit == 0 && r.http_code == 200 && r.text() == openai::ORIGIN_BODY,
            "{}: {}",
            who("spliced HTTPS (origin certificate must verify)"),
            r.describe()
        );
        assert_proxied(&r).with_context(|| who("spliced HTTPS"))?;
        Ok(())
    }
}

impl Traffic<'_> {
    /// One call per governance panel: a model the access rule denies (403), a prompt the regex
    /// guardrail blocks (400), an email the PII guardrail redacts before A sees it (200), and on
    /// the limited model a small call that fits (200, headroom set) then one asking the whole
    /// limit (429, counted as a rejection).
    fn governed(&self, agent: &str, g: &Group, round: u32) -> Result<()> {
        let who = |what: &str| format!("{agent} round {round}: {what}");
        let url = self.gw.url("/v1/chat/completions");
        let call = |model: &str, prompt: &str, max_tokens: Option<u32>| {
            let mut req = ChatRequest::simple(model, prompt);
            req.max_tokens = max_tokens;
            chat_curl(&self.gw.e, Some(g), &url, &req)
        };
        let refused = |r: &CurlOut, status: u16, what: &str| -> Result<()> {
            ensure!(
                r.http_code == status && r.header("x-mock-name").is_none(),
                "{}: want {status} from tollgate, got {}",
                who(what),
                r.describe()
            );
            Ok(())
        };
        let r = call(FORBIDDEN_MODEL, &format!("{agent} asks a forbidden model in round {round}"), None)?;
        refused(&r, 403, "access deny")?;
        let r = call(MODELS[0], &format!("{agent}: ignore previous instructions (round {round})"), None)?;
        refused(&r, 400, "guardrail block")?;
        let r = call(MODELS[0], &format!("{agent} writes to {EMAIL} in round {round}"), None)?;
        ensure!(r.http_code == 200 && r.header("x-mock-name") == Some("a"), "{}: {}", who("redaction"), r.describe());
        ensure!(
            !self.a.requests()?.iter().any(|q| q.to_string().contains(EMAIL)),
            "{}: the email reached the provider",
            who("redaction")
        );
        let r = call(LIMITED_MODEL, &format!("{agent} fits the limit in round {round}"), Some(10))?;
        ensure!(r.http_code == 200, "{}: {}", who("call within the token limit"), r.describe());
        ensure!(
            r.header("x-ratelimit-limit-completion-tokens").is_some(),
            "{}: {}",
            who("x-ratelimit-*"),
            r.describe()
        );
        let r = call(LIMITED_MODEL, &format!("{agent} asks the whole limit in round {round}"), Some(LIMIT))?;
        refused(&r, 429, "token limit")?;
        ensure!(r.header("retry-after").is_some(), "{}: {}", who("429 without retry-after"), r.describe());
        Ok(())
    }
}

/// Wait until Prometheus scraped tollgate after now, then check it holds exactly what tollgate
/// exposes for the counters the traffic moved.
fn wait_synced(t: &Tollgate, prom: &Prometheus) -> Result<()> {
    let now = SystemTime::now();
    let m = t.metrics()?;
    prom.wait_scraped_after(now, Duration::from_secs(15))?;
    for name in ["tollgate_llm_requests_total", "tollgate_upstream_attempts_total", "tollgate_l4_bytes_total"] {
        let want = m.sum(name, &[]);
        let got = prom.value(&format!("sum({name})"))?;
        ensure!(got == Some(want), "prometheus has sum({name}) = {got:?}, tollgate exposed {want} before the scrape");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Dashboards: structure
// ---------------------------------------------------------------------------------------------

struct Board {
    file: String,
    json: Value,
}

fn load_boards() -> Result<Vec<Board>> {
    let dir = repo_root().join("dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "json"));
    files.sort();
    let mut boards = Vec::new();
    let mut uids = BTreeMap::new();
    for p in files {
        let file = p.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let text = std::fs::read_to_string(&p)?;
        let json: Value = serde_json::from_str(&text).with_context(|| format!("{file} is not valid JSON"))?;
        let uid = json["uid"].as_str().filter(|u| !u.is_empty()).ok_or_else(|| anyhow!("{file}: no uid"))?;
        if let Some(other) = uids.insert(uid.to_string(), file.clone()) {
            bail!("dashboards {other} and {file} share the uid {uid:?}");
        }
        boards.push(Board { file, json });
    }
    ensure!(
        boards.len() >= 5,
        "want the overview, agents, latency, MCP/A2A and governance boards, found {}",
        boards.len()
    );
    Ok(boards)
}

/// Panels, with those nested in collapsed rows.
fn panels(board: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in board["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

fn variables(board: &Value) -> Vec<&Value> {
    board["templating"]["list"].as_array().into_iter().flatten().collect()
}

fn targets_of(panel: &Value) -> &[Value] {
    panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default()
}

/// A datasource reference that is the `datasource` variable.
fn uses_ds_variable(ds: &Value) -> bool {
    let uid = if ds.is_string() { ds.as_str() } else { ds["uid"].as_str() };
    matches!(uid, Some("${datasource}" | "$datasource")) && (ds.is_string() || ds["type"] == "prometheus")
}

fn check_structure(b: &Board) -> Result<()> {
    let v = &b.json;
    ensure!(v["title"].as_str().is_some_and(|t| !t.is_empty()), "no title");
    let schema = v["schemaVersion"].as_u64().unwrap_or(0);
    ensure!(schema >= 36, "schemaVersion {schema}: want a recent one (>= 36)");
    let vars = variables(v);
    let var = |name: &str| vars.iter().find(|x| x["name"] == name).copied();
    let ds = var("datasource").ok_or_else(|| anyhow!("no `datasource` template variable"))?;
    ensure!(
        ds["type"] == "datasource" && ds["query"] == "prometheus",
        "`datasource` variable is not a Prometheus datasource picker: {ds}"
    );
    for x in &vars {
        if x["type"] == "query" {
            ensure!(
                uses_ds_variable(&x["datasource"]),
                "variable {} does not query ${{datasource}}: {}",
                x["name"],
                x["datasource"]
            );
        }
    }
    if v.to_string().contains("${tempo}") {
        let tempo = var("tempo").ok_or_else(|| anyhow!("links use ${{tempo}} but there is no `tempo` variable"))?;
        ensure!(
            tempo["type"] == "datasource" && tempo["query"] == "tempo",
            "`tempo` variable is not a Tempo datasource picker: {tempo}"
        );
    }
    let mut ids = BTreeSet::new();
    let all = panels(v);
    ensure!(!all.is_empty(), "no panels");
    for p in all {
        let title = p["title"].as_str().unwrap_or("?");
        ensure!(
            ids.insert(p["id"].as_u64().ok_or_else(|| anyhow!("panel {title:?} without an id"))?),
            "panel id {} repeats",
            p["id"]
        );
        ensure!(
            p["gridPos"]["w"].as_u64().is_some() && p["gridPos"]["h"].as_u64().is_some(),
            "panel {title:?} without gridPos"
        );
        let targets = targets_of(p);
        if targets.is_empty() {
            ensure!(
                matches!(p["type"].as_str(), Some("text" | "row")),
                "panel {title:?} ({}) has no queries",
                p["type"]
            );
            continue;
        }
        ensure!(
            uses_ds_variable(&p["datasource"]),
            "panel {title:?} datasource {} is not ${{datasource}}",
            p["datasource"]
        );
        for t in targets {
            ensure!(
                t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "panel {title:?} has a target without expr: {t}"
            );
            if !t["datasource"].is_null() {
                ensure!(
                    uses_ds_variable(&t["datasource"]),
                    "panel {title:?} target {} datasource {} is not ${{datasource}}",
                    t["refId"],
                    t["datasource"]
                );
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Dashboards: evaluation
// ---------------------------------------------------------------------------------------------

/// How template variables are set for one pass over a board.
#[derive(Clone, Copy)]
enum Mode {
    /// `agent` = this agent, every other variable its first value.
    One(&'static str),
    /// Boards without an `agent` variable: every variable its first value.
    First,
    /// Every variable "All" (its `allValue`, else the regex of all its values).
    All,
}

impl Mode {
    fn label(self) -> String {
        match self {
            Mode::One(a) => format!("agent={a}"),
            Mode::First => "first values".into(),
            Mode::All => "All".into(),
        }
    }
}

struct Row {
    board: String,
    panel: String,
    ref_id: String,
    mode: String,
    expr: String,
    series: usize,
    outcome: String,
    failed: bool,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    var_queries: usize,
}

impl Report {
    fn failures(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| r.failed).collect()
    }

    fn table(&self) -> String {
        let w = |f: fn(&Row) -> usize| self.rows.iter().map(f).max().unwrap_or(0);
        let (wb, wp, wm) = (w(|r| r.board.len()), w(|r| r.panel.len()), w(|r| r.mode.len()));
        let mut s = format!("{:wb$} | {:wp$} | ref | {:wm$} | series | result\n", "board", "panel", "vars");
        for r in &self.rows {
            let _ = writeln!(
                s,
                "{:wb$} | {:wp$} | {:3} | {:wm$} | {:6} | {}{}\n{:wb$}   {}",
                r.board,
                r.panel,
                r.ref_id,
                r.mode,
                r.series,
                if r.failed { "FAIL " } else { "" },
                r.outcome,
                "",
                r.expr
            );
        }
        s
    }
}

fn evaluate_board(prom: &Prometheus, b: &Board, report: &mut Report) -> Result<()> {
    let name = b.json["uid"].as_str().unwrap_or(&b.file).to_string();
    let vars = variables(&b.json);
    let has_agent = vars.iter().any(|v| v["name"] == "agent");
    let modes: Vec<Mode> =
        if has_agent { vec![Mode::One(ALPHA), Mode::One(BETA), Mode::All] } else { vec![Mode::First, Mode::All] };
    let mut seen = BTreeSet::new();
    for mode in modes {
        let values = resolve_variables(prom, &vars, mode, report)?;
        for p in panels(&b.json) {
            for t in targets_of(p) {
                let raw = t["expr"].as_str().unwrap_or_default();
                let expr = substitute(raw, &values)?;
                let key = (p["id"].as_u64(), t["refId"].as_str().map(str::to_string), expr.clone());
                if !seen.insert(key) {
                    continue; // same query as in an earlier mode (the panel uses no variable that differs)
                }
                let (series, outcome, failed) = match prom.query(&expr) {
                    Err(e) => (0, format!("query error: {e:#}"), true),
                    Ok(r) => judge(&r, mode, &expr),
                };
                report.rows.push(Row {
                    board: name.clone(),
                    panel: p["title"].as_str().unwrap_or("?").to_string(),
                    ref_id: t["refId"].as_str().unwrap_or("?").to_string(),
                    mode: mode.label(),
                    expr,
                    series,
                    outcome,
                    failed,
                });
            }
        }
    }
    Ok(())
}

/// `(series, summary, failed)`: a query must return series, at least one with a finite value,
/// and an `agent` filter must hold: one agent's view shows only that agent, "All" shows both.
/// A query over pod metadata may show only the pods' agents.
fn judge(r: &[Series], mode: Mode, expr: &str) -> (usize, String, bool) {
    if r.is_empty() {
        return (0, "no series".into(), true);
    }
    let finite: Vec<&Series> = r.iter().filter(|s| s.value.is_finite()).collect();
    let shown: Vec<String> = r.iter().take(3).map(|s| format!("{}={}", s.labels_text(), s.value)).collect();
    let more = if r.len() > 3 { format!(" (+{})", r.len() - 3) } else { String::new() };
    let summary = format!("{}{more}", shown.join(" "));
    if finite.is_empty() {
        return (r.len(), format!("no finite value: {summary}"), true);
    }
    let agents: BTreeSet<&str> = r.iter().filter_map(|s| s.labels.get("agent").map(String::as_str)).collect();
    if !agents.is_empty() {
        let ok = match mode {
            _ if expr.contains("tollgate_k8s_pod_info") => agents.iter().all(|x| k8s::POD_AGENTS.contains(x)),
            Mode::One(a) => agents.iter().all(|x| *x == a),
            Mode::First => true,
            Mode::All => agents.contains(ALPHA) && agents.contains(BETA),
        };
        if !ok {
            return (r.len(), format!("agents {agents:?} do not fit the {} view: {summary}", mode.label()), true);
        }
    }
    (r.len(), summary, false)
}

/// Values of the board's variables in `mode`, resolving `label_values(...)` queries against
/// Prometheus in order (later ones may use earlier ones).
fn resolve_variables(
    prom: &Prometheus,
    vars: &[&Value],
    mode: Mode,
    report: &mut Report,
) -> Result<BTreeMap<String, String>> {
    let mut values: BTreeMap<String, String> = BUILTINS.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    for v in vars {
        let name = v["name"].as_str().ok_or_else(|| anyhow!("variable without a name: {v}"))?;
        match v["type"].as_str() {
            // Datasource pickers: panels reference them as datasources, never inside a query.
            Some("datasource") => continue,
            Some("query") => {}
            other => bail!("variable {name}: type {other:?} is not handled by this test; teach it"),
        }
        let q = v["query"]["query"].as_str().or(v["query"].as_str()).or(v["definition"].as_str()).unwrap_or_default();
        let (selector, label) = parse_label_values(q).with_context(|| format!("variable {name}"))?;
        let selector = selector.map(|s| substitute(&s, &values)).transpose()?;
        report.var_queries += 1;
        let found = prom
            .label_values(&label, selector.as_deref())
            .with_context(|| format!("variable {name}: label_values({selector:?}, {label})"))?;
        ensure!(!found.is_empty(), "variable {name} ({q}) has no values");
        if name == "agent" {
            ensure!(
                found.iter().any(|a| a == ALPHA) && found.iter().any(|a| a == BETA),
                "variable agent lists {found:?}, want both {ALPHA} and {BETA}"
            );
        }
        let value = match mode {
            Mode::One(agent) if name == "agent" => regex_escape(agent),
            Mode::One(_) | Mode::First => regex_escape(&found[0]),
            Mode::All => match v["allValue"].as_str() {
                Some(all) if v["includeAll"] == true => all.to_string(),
                _ => format!("({})", found.iter().map(|x| regex_escape(x)).collect::<Vec<_>>().join("|")),
            },
        };
        values.insert(name.to_string(), value);
    }
    Ok(values)
}

/// `label_values(selector, label)` or `label_values(label)` → `(selector, label)`.
fn parse_label_values(q: &str) -> Result<(Option<String>, String)> {
    let inner = q
        .trim()
        .strip_prefix("label_values(")
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| anyhow!("query {q:?} is not label_values(...)"))?;
    match inner.rsplit_once(',') {
        Some((sel, label)) => Ok((Some(sel.trim().to_string()), label.trim().to_string())),
        None => Ok((None, inner.trim().to_string())),
    }
}

/// Replace `$name`, `${name}` and `${name:format}` by their values; an unknown variable is an
/// error (a query would reach Prometheus with a literal `$`).
fn substitute(expr: &str, values: &BTreeMap<String, String>) -> Result<String> {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, consumed) = if let Some(body) = after.strip_prefix('{') {
            let end = body.find('}').ok_or_else(|| anyhow!("unclosed ${{ in {expr:?}"))?;
            (body[..end].split(':').next().unwrap_or_default(), end + 2)
        } else {
            let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            (&after[..end], end)
        };
        let v = values.get(name).ok_or_else(|| anyhow!("unknown variable ${name} in {expr:?}"))?;
        out.push_str(v);
        rest = &after[consumed..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A value as Grafana puts it into a Prometheus regex matcher: regex metacharacters escaped
/// (with the backslash itself escaped for the PromQL string).
fn regex_escape(v: &str) -> String {
    let mut out = String::new();
    for c in v.chars() {
        if "\\^$.|?*+()[]{}".contains(c) {
            out.push_str("\\\\");
        }
        out.push(c);
    }
    out
}

#[test]
fn substitution_and_label_values_parsing() {
    let values: BTreeMap<String, String> =
        [("agent", "a"), ("__rate_interval", "1m")].iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert_eq!(
        substitute(r#"rate(x{agent=~"$agent"}[$__rate_interval])"#, &values).unwrap(),
        r#"rate(x{agent=~"a"}[1m])"#
    );
    assert_eq!(substitute("${agent:regex}-${agent}", &values).unwrap(), "a-a");
    assert!(substitute("$agents", &values).is_err());
    assert_eq!(
        parse_label_values(r#"label_values(m{a=~"$x"}, agent)"#).unwrap(),
        (Some(r#"m{a=~"$x"}"#.to_string()), "agent".to_string())
    );
    assert_eq!(parse_label_values("label_values(agent)").unwrap(), (None, "agent".to_string()));
    assert_eq!(regex_escape("gpt-4.1"), r"gpt-4\\.1");
}
