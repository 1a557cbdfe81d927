//! Typed config of the token-limit engine ([`crate::policy::limits`]): which calls a policy
//! applies to, what it counts over which window, and where the counters live (this node or a
//! Redis shared by every node). Modelled on Kong's ai-rate-limiting-advanced so operators can
//! carry their mental model over.
//!
//! ```yaml
//! backend: redis
//! redis: { url: "redis://10.0.0.5:6379", timeout: 50ms, on_redis_error: fail_open }
//! policies:
//!   - name: team-a
//!     match: { group: "team-a", provider: "openai", model: "gpt-4*" }
//!     key: agent
//!     limits:
//!       - { limit: 100000, window: 1m, count: total }
//!       - { limit: 600, window: 1m, count: requests }
//!       - { limit: 25.0, window: day, count: cost, algorithm: fixed }
//! ```

use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The token-limit section. Defaults: local counters, no policies (nothing is limited).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TokenLimitsConfig {
    /// Where counters live: `local` (this node only) or `redis` (shared by all nodes).
    pub backend: LimitBackend,
    /// In-memory counters: the `local` backend, and the fallback of `redis` when it is down.
    pub local: LocalLimitsConfig,
    /// Shared counters, used when `backend: redis`.
    pub redis: RedisLimitsConfig,
    /// Policies; every policy that matches a call applies (all of their limits must admit it).
    pub policies: Vec<LimitPolicyConfig>,
    /// Completion tokens reserved for a call that names no `max_tokens` (or
    /// `max_completion_tokens`, `max_output_tokens`); default 4096. The reservation is settled
    /// to the real usage when the call ends, so this only bounds what one call may hold.
    pub default_max_tokens: Option<u64>,
}

/// Counter store of the engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LimitBackend {
    /// Per-node in-memory counters: limits hold per node, not across the fleet.
    #[default]
    Local,
    /// One Redis shared by all nodes: limits hold across the fleet.
    Redis,
}

/// Bounds of the in-memory counter table, so a flood of distinct agents cannot grow memory
/// without limit.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LocalLimitsConfig {
    /// Most counters kept (one per policy limit and key); past it expired counters are dropped
    /// first, then the ones closest to expiry.
    pub max_keys: usize,
    /// Lock shards; more shards mean less contention between concurrent calls.
    pub shards: usize,
}

impl Default for LocalLimitsConfig {
    fn default() -> Self {
        Self { max_keys: 100_000, shards: 64 }
    }
}

/// What a node does with a call when Redis cannot be reached in time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisError {
    /// Decide with this node's local counters until Redis is back (limits then hold per node).
    #[default]
    FailOpen,
    /// Reject every limited call (the gateway answers 503) until Redis is back.
    FailClosed,
}

/// Shared Redis counters.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RedisLimitsConfig {
    /// `redis://[user:password@]host:port[/db]`; one multiplexed connection per node.
    pub url: String,
    /// Deadline of one Redis call; past it the call counts as a Redis error (`on_redis_error`).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Deadline of one (re)connect attempt.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub connect_timeout: Duration,
    /// Behaviour while Redis is unreachable.
    pub on_redis_error: OnRedisError,
    /// How often a node that lost Redis probes it (PING) to switch back.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub probe_interval: Duration,
    /// Prefix of every counter key, so several deployments can share one Redis.
    pub key_prefix: String,
}

impl Default for RedisLimitsConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            timeout: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(1),
            on_redis_error: OnRedisError::FailOpen,
            probe_interval: Duration::from_secs(1),
            key_prefix: "tollgate:rl:".into(),
        }
    }
}

/// One policy: which calls it covers, whose counter a call draws on, and its limits.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitPolicyConfig {
    /// Unique name; appears in rejections, metrics and counter keys (renaming resets counts).
    pub name: String,
    /// Conditions, all of which must hold; an empty match covers every call.
    #[serde(default, rename = "match")]
    pub matches: LimitMatch,
    /// Whose counter a call draws on.
    #[serde(default)]
    pub key: LimitKeyBy,
    /// Limits; a call is admitted only if every one of them has room for it.
    pub limits: Vec<LimitRuleConfig>,
}

/// AND-combined glob conditions (`*`, `?`, `[..]`) on the call's identity; an absent field
/// matches anything.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LimitMatch {
    /// Agent name.
    pub agent: Option<String>,
    /// Any of the agent's groups.
    pub group: Option<String>,
    /// Kubernetes namespace of the agent (a call without one does not match).
    pub namespace: Option<String>,
    /// Provider name.
    pub provider: Option<String>,
    /// Requested model.
    pub model: Option<String>,
    /// Route name.
    pub route: Option<String>,
}

/// Which identity a policy counts separately.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LimitKeyBy {
    /// One counter per agent.
    #[default]
    Agent,
    /// One counter per group (the first of the agent's groups the policy's `group` matches);
    /// calls of agents without a group are not limited by this policy.
    Group,
    /// One counter per namespace; calls without a namespace are not limited by this policy.
    Namespace,
    /// One counter for every call the policy matches.
    Global,
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CountKind {
    /// Prompt (input) tokens.
    Prompt,
    /// Completion (output) tokens; reserved as the request's max completion tokens.
    Completion,
    /// Prompt + completion tokens.
    #[default]
    Total,
    /// Calls.
    Requests,
    /// Cost in USD (kept as integer micro-dollars).
    Cost,
}

impl CountKind {
    /// Lower-case config name, used in rule names and counter keys.
    pub fn as_str(self) -> &'static str {
        match self {
            CountKind::Prompt => "prompt",
            CountKind::Completion => "completion",
            CountKind::Total => "total",
            CountKind::Requests => "requests",
            CountKind::Cost => "cost",
        }
    }
}

/// How a window moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LimitAlgorithm {
    /// Weighted two-bucket sliding window: no burst of twice the limit at a window edge.
    Sliding,
    /// Windows aligned to the Unix epoch (UTC), or calendar days/months: the whole limit is
    /// available again at each window start. Suits budgets.
    Fixed,
}

/// Length of a limit's window: a duration (`30s`, `1m`, `24h`) or a UTC calendar period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[schemars(with = "String")]
pub enum LimitWindow {
    /// A duration (humantime syntax).
    Duration(Duration),
    /// The UTC calendar day (fixed algorithm only).
    Day,
    /// The UTC calendar month (fixed algorithm only).
    Month,
}

impl fmt::Display for LimitWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitWindow::Duration(d) => write!(f, "{}", humantime::format_duration(*d)),
            LimitWindow::Day => f.write_str("day"),
            LimitWindow::Month => f.write_str("month"),
        }
    }
}

impl Serialize for LimitWindow {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LimitWindow {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.trim() {
            "day" => Ok(LimitWindow::Day),
            "month" => Ok(LimitWindow::Month),
            other => humantime::parse_duration(other).map(LimitWindow::Duration).map_err(|e| {
                serde::de::Error::custom(format!("window {other:?}: {e} (want a duration like 1m, or day, month)"))
            }),
        }
    }
}

/// One limit of a policy.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitRuleConfig {
    /// Most allowed per window: a whole number of tokens or requests, or USD for `cost`.
    pub limit: f64,
    /// Window length, or `day` / `month` (UTC calendar, fixed algorithm).
    pub window: LimitWindow,
    /// What is counted.
    #[serde(default)]
    pub count: CountKind,
    /// Window algorithm; default `sliding` for durations, `fixed` for `day` / `month`.
    #[serde(default)]
    pub algorithm: Option<LimitAlgorithm>,
}

impl LimitRuleConfig {
    /// The algorithm in effect (the default depends on the window kind).
    pub fn effective_algorithm(&self) -> LimitAlgorithm {
        match (self.algorithm, self.window) {
            (Some(a), _) => a,
            (None, LimitWindow::Duration(_)) => LimitAlgorithm::Sliding,
            (None, _) => LimitAlgorithm::Fixed,
        }
    }
}

/// Shortest window accepted: shorter ones would mostly measure clock skew between nodes.
pub const MIN_LIMIT_WINDOW: Duration = Duration::from_secs(1);

impl TokenLimitsConfig {
    /// Semantic checks serde cannot express; the error is `(field path, message)` like the
    /// rest of the config validation, so the loader can point at the line.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.local.max_keys == 0 {
            return Err(("local.max_keys".into(), "must be at least 1".into()));
        }
        if self.local.shards == 0 || self.local.shards > 4096 {
            return Err(("local.shards".into(), "must be between 1 and 4096".into()));
        }
        if self.backend == LimitBackend::Redis {
            let r = &self.redis;
            if r.url.trim().is_empty() {
                return Err(("redis.url".into(), "must be set for backend: redis".into()));
            }
            for (field, d) in [("timeout", r.timeout), ("connect_timeout", r.connect_timeout)] {
                if d.is_zero() {
                    return Err((format!("redis.{field}"), "must be positive".into()));
                }
            }
            if r.probe_interval < Duration::from_millis(10) {
                return Err(("redis.probe_interval".into(), "must be at least 10ms".into()));
            }
        }
        let mut names = HashSet::new();
        for (i, p) in self.policies.iter().enumerate() {
            let at = format!("policies[{i}]");
            if p.name.trim().is_empty() {
                return Err((format!("{at}.name"), "must not be empty".into()));
            }
            if !names.insert(p.name.as_str()) {
                return Err((format!("{at}.name"), format!("duplicate policy name {:?}", p.name)));
            }
            validate_match(&p.matches).map_err(|(f, m)| (format!("{at}.match.{f}"), m))?;
            if p.limits.is_empty() {
                return Err((format!("{at}.limits"), "needs at least one limit".into()));
            }
            for (j, l) in p.limits.iter().enumerate() {
                l.validate().map_err(|(f, m)| (format!("{at}.limits[{j}].{f}"), m))?;
            }
        }
        Ok(())
    }
}

fn validate_match(m: &LimitMatch) -> Result<(), (String, String)> {
    let fields = [
        ("agent", &m.agent),
        ("group", &m.group),
        ("namespace", &m.namespace),
        ("provider", &m.provider),
        ("model", &m.model),
        ("route", &m.route),
    ];
    for (name, value) in fields {
        if let Some(v) = value {
            glob::Pattern::new(v).map_err(|e| (name.to_string(), format!("bad glob {v:?}: {e}")))?;
        }
    }
    Ok(())
}

impl LimitRuleConfig {
    /// Checks of one limit (whole positive counts, windows of at least a second, calendar
    /// windows fixed); the error names the field below the limit. Public because MCP tool-call
    /// limits are limits of this engine too and must be held to the same rules.
    pub fn validate(&self) -> Result<(), (String, String)> {
        validate_rule(self)
    }
}

fn validate_rule(l: &LimitRuleConfig) -> Result<(), (String, String)> {
    if !l.limit.is_finite() || l.limit <= 0.0 {
        return Err(("limit".into(), "must be a positive number".into()));
    }
    if l.count == CountKind::Cost {
        // Stored as micro-dollars; keep well inside the 2^53 range of Lua numbers.
        if l.limit > 1e9 {
            return Err(("limit".into(), "cost limits above 1e9 USD are not supported".into()));
        }
    } else if l.limit.fract() != 0.0 || l.limit > 1e15 {
        return Err(("limit".into(), "must be a whole number up to 1e15 for tokens and requests".into()));
    }
    match (l.window, l.effective_algorithm()) {
        (LimitWindow::Duration(d), _) if d < MIN_LIMIT_WINDOW => {
            Err(("window".into(), format!("must be at least {}", humantime::format_duration(MIN_LIMIT_WINDOW))))
        }
        (LimitWindow::Day | LimitWindow::Month, LimitAlgorithm::Sliding) => {
            Err(("algorithm".into(), "calendar windows (day, month) need algorithm: fixed".into()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
backend: redis
redis: { url: "redis://10.0.0.5:6379", timeout: 50ms, on_redis_error: fail_closed }
policies:
  - name: team-a
    match: { group: "team-a", provider: "openai", model: "gpt-4*" }
    key: group
    limits:
      - { limit: 100000, window: 1m, count: total }
      - { limit: 600, window: 1m, count: requests, algorithm: fixed }
      - { limit: 25.5, window: day, count: cost }
      - { limit: 500, window: month, count: cost }
"#;

    #[test]
    fn example_parses_and_validates() {
        let c: TokenLimitsConfig = serde_yaml_ng::from_str(EXAMPLE).expect("parse");
        c.validate().expect("valid");
        assert_eq!(c.backend, LimitBackend::Redis);
        assert_eq!(c.redis.on_redis_error, OnRedisError::FailClosed);
        assert_eq!(c.redis.timeout, Duration::from_millis(50));
        let p = &c.policies[0];
        assert_eq!(p.key, LimitKeyBy::Group);
        assert_eq!(p.matches.model.as_deref(), Some("gpt-4*"));
        assert_eq!(p.limits[0].window, LimitWindow::Duration(Duration::from_secs(60)));
        assert_eq!(p.limits[0].effective_algorithm(), LimitAlgorithm::Sliding);
        assert_eq!(p.limits[1].effective_algorithm(), LimitAlgorithm::Fixed);
        assert_eq!(p.limits[2].window, LimitWindow::Day);
        assert_eq!(p.limits[2].effective_algorithm(), LimitAlgorithm::Fixed);
        assert_eq!(p.limits[3].window.to_string(), "month");
    }

    #[test]
    fn rejects_bad_values() {
        let bad = |yaml: &str| {
            let c: TokenLimitsConfig = serde_yaml_ng::from_str(yaml).expect("parse");
            c.validate().expect_err("invalid").0
        };
        let field = bad("policies: [{name: a, limits: [{limit: 1.5, window: 1m}]}]");
        assert_eq!(field, "policies[0].limits[0].limit");
        let field = bad("policies: [{name: a, limits: [{limit: 5, window: day, algorithm: sliding}]}]");
        assert_eq!(field, "policies[0].limits[0].algorithm");
        let field = bad("policies: [{name: a, limits: [{limit: 5, window: 10ms}]}]");
        assert_eq!(field, "policies[0].limits[0].window");
        let field = bad("policies: [{name: a, limits: []}]");
        assert_eq!(field, "policies[0].limits");
        let field =
            bad("policies: [{name: a, limits: [{limit: 1, window: 1s}]}, {name: a, limits: [{limit: 1, window: 1s}]}]");
        assert_eq!(field, "policies[1].name");
        let field = bad("policies: [{name: a, match: {model: '[x'}, limits: [{limit: 1, window: 1s}]}]");
        assert_eq!(field, "policies[0].match.model");
        assert!(serde_yaml_ng::from_str::<TokenLimitsConfig>("policies: [{name: a, limits: [], typo: 1}]").is_err());
        assert!(serde_yaml_ng::from_str::<TokenLimitsConfig>(
            "policies: [{name: a, limits: [{limit: 1, window: fortnight}]}]"
        )
        .is_err());
    }
}
