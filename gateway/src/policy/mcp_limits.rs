//! Tool-call rate limits (`mcp.tool_limits`): how many `tools/call` requests an agent, group,
//! namespace or everyone may make per window, per tool or shared by a set of tools. Matching
//! (who, which tool, which counter) is done here; counting is the token-limit engine's
//! ([`Limiter::check_calls`]), so these limits live on the same backend as `rate_limits` (this
//! node, or a Redis the fleet shares) with the same windows and `on_redis_error` behaviour.
//!
//! Compiled with the config generation's policies ([`crate::policy::chain::Policies`]); the
//! MCP handler and the federation listener both admit calls through [`ToolLimits::admit`] (or
//! [`ToolLimits::reserve`] for a batch that may still be refused as a whole).

use glob::Pattern;

use crate::capture::Agent;
use crate::config::limits::LimitKeyBy;
use crate::config::mcp::McpConfig;
use crate::policy::limits::{CallLimit, Decision, LimitError, Limiter, RejectReason, Reservation};
use crate::policy::subjects::{globs, namespace, GlobError, Subjects};

/// Counter-key namespace of these limits, so they never share a counter with a token policy.
const FEATURE: &str = "mcp-tools";

/// Why tool-call limits could not be compiled (validation reports the same with a line).
#[derive(Debug, thiserror::Error)]
pub enum ToolLimitError {
    /// A glob does not compile.
    #[error(transparent)]
    Glob(#[from] GlobError),
    /// The limit itself (count, window, algorithm).
    #[error("mcp.tool_limits[{index}].{source}")]
    Limit {
        /// Index of the limit in `mcp.tool_limits`.
        index: usize,
        /// The engine's complaint.
        source: LimitError,
    },
}

/// A refused `tools/call`: what the agent is told (rule and when to retry) and operators see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolLimited {
    /// The tool limit that refused (for `unavailable`: the first limit covering the call).
    pub rule: String,
    /// Whole seconds (at least 1) until the call would fit if nobody else calls meanwhile; for
    /// `unavailable`, when the shared counters are probed again.
    pub retry_after_secs: u64,
    /// The shared counters (Redis) are unreachable and `on_redis_error: fail_closed`: the
    /// call was refused because it could not be counted, not because the budget is spent.
    pub unavailable: bool,
}

impl ToolLimited {
    /// The JSON-RPC error message for a call of `tool` (prefixed `tollgate:` like every refusal
    /// tollgate answers itself).
    pub fn message(&self, tool: &str) -> String {
        let (rule, secs) = (&self.rule, self.retry_after_secs);
        if self.unavailable {
            format!(
                "tollgate: tool {tool} not called: call limit {rule} cannot be checked (shared counters unreachable, \
                 on_redis_error: fail_closed); retry after {secs} s"
            )
        } else {
            format!("tollgate: tool {tool} rate limited by rule {rule}; retry after {secs} s")
        }
    }
}

/// Calls counted but not yet final: [`ToolAdmission::keep`] when the request is sent, or drop
/// it to give them back (a batch refused for another call).
#[derive(Debug, Default)]
pub struct ToolAdmission(Option<Reservation>);

impl ToolAdmission {
    /// The calls count for good (a call counts once, whatever the server answers).
    pub fn keep(self) {
        if let Some(r) = self.0 {
            r.keep();
        }
    }
}

struct Rule {
    subjects: Subjects,
    tools: Vec<Pattern>,
    key: LimitKeyBy,
    per_tool: bool,
    limit: CallLimit,
}

impl Rule {
    /// The counter `tool` called by `agent` draws on, when the rule covers the call (and the
    /// key's identity, a group or namespace, exists).
    fn counter(&self, agent: &Agent, groups: &[String], tool: &str) -> Option<String> {
        if !self.subjects.covers(agent, groups)
            || !(self.tools.is_empty() || self.tools.iter().any(|p| p.matches(tool)))
        {
            return None;
        }
        let who = match self.key {
            LimitKeyBy::Agent => format!("a={}", agent.name),
            LimitKeyBy::Group => format!("g={}", self.subjects.group_of(groups)?),
            LimitKeyBy::Namespace => format!("n={}", namespace(agent)?),
            LimitKeyBy::Global => "*".into(),
        };
        Some(if self.per_tool { format!("{who}|t={tool}") } else { who })
    }
}

/// Compiled `mcp.tool_limits` of one config generation, with the engine that counts them.
#[derive(Default)]
pub struct ToolLimits {
    rules: Vec<Rule>,
    /// Present whenever `rules` is not empty.
    limiter: Option<Limiter>,
}

impl ToolLimits {
    /// Compile `mcp.tool_limits`, counting through `limiter` (the generation's engine, so the
    /// `rate_limits` backend and Redis connection are shared).
    pub fn new(cfg: &McpConfig, limiter: Limiter) -> Result<Self, ToolLimitError> {
        let mut rules = Vec::with_capacity(cfg.tool_limits.len());
        for (i, l) in cfg.tool_limits.iter().enumerate() {
            let at = format!("mcp.tool_limits[{i}]");
            let limit = CallLimit::new(FEATURE, &l.name, &l.as_limit())
                .map_err(|source| ToolLimitError::Limit { index: i, source })?;
            rules.push(Rule {
                subjects: Subjects::compile(&at, &l.subjects)?,
                tools: globs(&format!("{at}.tools"), &l.tools)?,
                key: l.key,
                per_tool: l.per_tool,
                limit,
            });
        }
        Ok(ToolLimits { rules, limiter: Some(limiter) })
    }

    /// No tool limit configured.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether some limit covers the agent, so its requests must be read and counted (a body
    /// tollgate cannot parse is refused for such an agent, as for one under tool rules).
    pub fn applies(&self, agent: &Agent, groups: &[String]) -> bool {
        self.rules.iter().any(|r| r.subjects.covers(agent, groups))
    }

    /// Count one call of `tool` by `agent` in every limit covering it, all or none. The counts
    /// are final: the call must be sent (or answered) now.
    pub async fn admit(&self, agent: &Agent, groups: &[String], tool: &str) -> Result<(), ToolLimited> {
        self.reserve(agent, groups, tool).await.map(ToolAdmission::keep)
    }

    /// Like [`Self::admit`], but the counts are given back when the returned admission is
    /// dropped rather than kept: for a batch, where a later call may still refuse the whole.
    pub async fn reserve(&self, agent: &Agent, groups: &[String], tool: &str) -> Result<ToolAdmission, ToolLimited> {
        let Some(limiter) = &self.limiter else { return Ok(ToolAdmission::default()) };
        let hits: Vec<(&CallLimit, String)> =
            self.rules.iter().filter_map(|r| r.counter(agent, groups, tool).map(|k| (&r.limit, k))).collect();
        let Some(first) = hits.first().map(|(l, _)| l.name().to_string()) else {
            return Ok(ToolAdmission::default());
        };
        match limiter.check_calls(&hits).await {
            Decision::Admit(a) => Ok(ToolAdmission(Some(a.reservation))),
            Decision::Reject(r) => {
                let unavailable = r.reason == RejectReason::BackendDown;
                Err(ToolLimited {
                    rule: if unavailable { first } else { r.rule.to_string() },
                    retry_after_secs: r.retry_after_secs(),
                    unavailable,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config::limits::TokenLimitsConfig;
    use crate::policy::limits::TimeSource;
    use crate::policy::ManualClock;

    /// 2023-11-14T00:00:00Z, a multiple of every test window.
    const T0: u64 = 1_699_920_000_000;

    async fn limits(yaml: &str) -> (ToolLimits, Arc<ManualClock>) {
        let cfg: McpConfig = serde_yaml_ng::from_str(yaml).expect("yaml");
        cfg.validate().expect("valid");
        let clock = Arc::new(ManualClock::new());
        let time = TimeSource::manual(clock.clone(), T0);
        let limiter = Limiter::with_time(&TokenLimitsConfig::default(), time).await.expect("limiter");
        (ToolLimits::new(&cfg, limiter).expect("compile"), clock)
    }

    const NONE: &[String] = &[];

    async fn ok(l: &ToolLimits, agent: &str, groups: &[String], tool: &str) -> bool {
        l.admit(&Agent::unknown(agent), groups, tool).await.is_ok()
    }

    #[tokio::test]
    async fn per_tool_counters_are_separate_and_shared_ones_are_not() {
        let (l, _) = limits(
            "tool_limits:
  - {name: per-tool, match: {agent: bot}, tools: ['search_*'], per_tool: true, limit: 2, window: 1m}
  - {name: shared, match: {agent: other}, tools: ['search_*', get_weather], limit: 2, window: 1m}",
        )
        .await;
        for _ in 0..2 {
            assert!(ok(&l, "bot", NONE, "search_web").await);
        }
        let r = l.admit(&Agent::unknown("bot"), NONE, "search_web").await.expect_err("third call");
        assert_eq!((r.rule.as_str(), r.unavailable), ("per-tool", false));
        // Sliding window: the two calls weigh on the next minute until half of it has passed.
        assert_eq!(r.retry_after_secs, 90, "{r:?}");
        assert!(r.message("search_web").starts_with("tollgate: tool search_web rate limited by rule per-tool"));
        assert!(ok(&l, "bot", NONE, "search_docs").await, "another tool has its own counter");
        assert!(ok(&l, "bot", NONE, "delete_file").await, "tools outside the globs are not counted");
        assert!(ok(&l, "bot2", NONE, "search_web").await, "agents outside the match are not counted");
        assert!(ok(&l, "other", NONE, "search_web").await && ok(&l, "other", NONE, "get_weather").await);
        assert!(!ok(&l, "other", NONE, "search_docs").await, "one counter for every matching tool");
    }

    #[tokio::test]
    async fn group_namespace_and_global_keys() {
        let (l, _) = limits(
            "tool_limits:
  - {name: team, match: {group: 'team-*'}, key: group, limit: 1, window: 10s}
  - {name: all, tools: [rare], key: global, limit: 1, window: 10s}
  - {name: ns, key: namespace, limit: 1, window: 10s}",
        )
        .await;
        let a = ["x".to_string(), "team-a".to_string()];
        let b = ["team-a".to_string()];
        assert!(ok(&l, "a1", &a, "t").await);
        assert!(!ok(&l, "a2", &b, "t").await, "same group counter");
        assert!(ok(&l, "a3", &["team-b".to_string()], "t").await);
        assert!(ok(&l, "n1", NONE, "rare").await);
        assert!(!ok(&l, "n2", NONE, "rare").await, "global counter");
        // No namespace outside Kubernetes: the namespace limit does not apply.
        assert!(ok(&l, "n3", NONE, "t").await && ok(&l, "n3", NONE, "t").await);
        assert!(l.applies(&Agent::unknown("anyone"), NONE));
    }

    #[tokio::test]
    async fn window_rolls_over_on_the_engine_clock() {
        let (l, clock) = limits("tool_limits: [{name: w, limit: 2, window: 10s, algorithm: fixed}]").await;
        assert!(ok(&l, "a", NONE, "t").await && ok(&l, "a", NONE, "t").await);
        let r = l.admit(&Agent::unknown("a"), NONE, "t").await.expect_err("full");
        assert_eq!(r.retry_after_secs, 10);
        clock.advance(Duration::from_millis(9_999));
        assert!(!ok(&l, "a", NONE, "t").await);
        clock.advance(Duration::from_millis(1));
        assert!(ok(&l, "a", NONE, "t").await && ok(&l, "a", NONE, "t").await, "a new window");
        assert!(!ok(&l, "a", NONE, "t").await);

        // Sliding: right after the edge the previous window still weighs almost fully.
        let (l, clock) = limits("tool_limits: [{name: s, limit: 2, window: 10s}]").await;
        assert!(ok(&l, "a", NONE, "t").await && ok(&l, "a", NONE, "t").await);
        clock.advance(Duration::from_secs(10));
        assert!(!ok(&l, "a", NONE, "t").await);
        clock.advance(Duration::from_secs(5));
        assert!(ok(&l, "a", NONE, "t").await, "half the previous window left it");
    }

    #[tokio::test]
    async fn dropped_reservations_give_the_calls_back() {
        let (l, _) = limits("tool_limits: [{name: r, limit: 1, window: 1m}]").await;
        let agent = Agent::unknown("a");
        let held = l.reserve(&agent, NONE, "t").await.expect("room");
        assert!(l.reserve(&agent, NONE, "t").await.is_err());
        drop(held);
        l.reserve(&agent, NONE, "t").await.expect("given back").keep();
        assert!(l.admit(&agent, NONE, "t").await.is_err(), "kept");
        assert!(ToolLimits::default().admit(&agent, NONE, "t").await.is_ok(), "nothing configured");
    }

    #[tokio::test]
    async fn fail_closed_refuses_with_the_rule_and_a_retry_time() {
        let cfg: TokenLimitsConfig = serde_yaml_ng::from_str(
            "{backend: redis, redis: {url: 'redis://127.0.0.1:1', timeout: 50ms, connect_timeout: 50ms, \
             on_redis_error: fail_closed, probe_interval: 2s}}",
        )
        .expect("yaml");
        let mcp: McpConfig = serde_yaml_ng::from_str("tool_limits: [{name: r, limit: 5, window: 1m}]").expect("yaml");
        let l = ToolLimits::new(&mcp, Limiter::new(&cfg).await.expect("limiter")).expect("compile");
        let r = l.admit(&Agent::unknown("a"), NONE, "t").await.expect_err("redis down");
        assert_eq!((r.rule.as_str(), r.unavailable, r.retry_after_secs), ("r", true, 2));
        assert!(r.message("t").contains("cannot be checked"), "{}", r.message("t"));
    }
}
