//! Gateway configuration: the providers tollgate holds keys for, and how a route spreads its
//! calls over them (targets, balancing, failover, circuit breaking). A route without targets
//! stays a transparent observer of the original destination.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::ProviderKind;

/// An upstream AI provider: where it is, which API it speaks and how to authenticate.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Name targets refer to; also the `gen_ai.provider.name` detail in logs.
    pub name: String,
    /// API the provider speaks.
    pub kind: ProviderKind,
    /// Base URL, e.g. `https://api.openai.com` or `http://10.0.0.5:8000/v1` (the path prefix is
    /// kept). Defaults for `openai`, `anthropic` and `gemini`; required for the others.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub base_url: Option<url::Url>,
    /// Where the provider key is read from; absent: the agent's own credentials pass through.
    #[serde(default)]
    pub credentials: Option<CredentialSource>,
    /// Per-provider options.
    #[serde(default)]
    pub options: ProviderOptions,
}

/// Where a provider key lives. Exactly one of `env` and `file`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CredentialSource {
    /// Environment variable holding the key (read at start).
    pub env: Option<String>,
    /// File holding the key (surrounding whitespace ignored); re-read when it changes, so a key
    /// is rotated by rewriting the file (or the mounted Secret) without a restart.
    pub file: Option<PathBuf>,
}

/// Who may call a route's explicit `listener` (a plain-HTTP front door without a kernel record
/// behind it). A listener outside loopback needs `allow_non_loopback`; a listener whose route
/// injects provider keys needs `token` or `allow_cidrs` to identify callers, unless
/// `allow_anonymous` says it may serve anyone who reaches it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerAuthConfig {
    /// Allow a listener address outside loopback (`127.0.0.0/8`, `::1`), such as `0.0.0.0`:
    /// every host that reaches it could call the route.
    pub allow_non_loopback: bool,
    /// Shared token callers present as `Authorization: Bearer <token>` or as their SDK's API
    /// key (`x-api-key`, `api-key`, `x-goog-api-key`); exactly one of `env`, `file` (a file is
    /// re-read when it changes). Compared in constant time and removed before forwarding.
    pub token: Option<CredentialSource>,
    /// Source networks admitted (CIDRs); empty: any source. With `token` too, a caller needs
    /// both.
    #[schemars(with = "Vec<String>")]
    pub allow_cidrs: Vec<ipnet::IpNet>,
    /// Serve callers that neither `token` nor `allow_cidrs` identifies even though the route
    /// injects provider keys (anyone who reaches the listener spends those keys).
    pub allow_anonymous: bool,
}

/// Provider options; every field has a sensible default.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderOptions {
    /// Azure OpenAI `api-version` query value, or the Anthropic `anthropic-version` header.
    /// Defaults: `2024-10-21` (Azure), `2023-06-01` (Anthropic).
    pub api_version: Option<String>,
    /// Offer HTTP/2 (ALPN `h2`) on TLS connections; HTTP/1.1 when the provider declines.
    pub http2: bool,
    /// Extra headers sent on every request to this provider (not secrets: use `credentials`).
    pub headers: BTreeMap<String, String>,
    /// `max_tokens` sent to an Anthropic target when a translated OpenAI request has none
    /// (Anthropic requires it).
    pub default_max_tokens: u32,
    /// Requests in flight to this provider at once; further requests wait for a slot up to the
    /// attempt deadline. Bounds the connection pool.
    pub max_concurrent_requests: usize,
}

impl Default for ProviderOptions {
    fn default() -> Self {
        Self {
            api_version: None,
            http2: true,
            headers: BTreeMap::new(),
            default_max_tokens: 4096,
            max_concurrent_requests: 1024,
        }
    }
}

/// One backend of a route: a provider and the model to ask it for.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Provider name from `providers`.
    pub provider: String,
    /// Model sent to the provider (Azure: the deployment); absent: the agent's `model`.
    #[serde(default)]
    pub model: Option<String>,
    /// Share of calls under `weighted` balancing.
    #[serde(default = "one")]
    pub weight: u32,
    /// Priority group; lower is preferred. A group is used only while every group before it
    /// has no healthy target.
    #[serde(default)]
    pub priority: u32,
    /// A `model` value agents send to pick this target (and its peers with the same alias).
    #[serde(default)]
    pub model_alias: Option<String>,
}

fn one() -> u32 {
    1
}

/// How a route chooses among healthy targets of its best priority group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Each target in turn.
    RoundRobin,
    /// Smooth weighted round-robin by `weight`.
    #[default]
    Weighted,
    /// Fewest requests in flight.
    LeastConnections,
    /// Lowest peak-EWMA latency (`balance.latency`).
    LowestLatency,
    /// Fewest tokens consumed recently (decaying).
    LowestUsage,
    /// Same key, same target (by agent, or by `balance.hash_header`).
    ConsistentHash,
}

/// Which latency `lowest_latency` compares.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LatencyMetric {
    /// Time to first response byte (first token for streams).
    #[default]
    Ttft,
    /// Whole call.
    Total,
}

/// Balancing settings of a route.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct BalanceConfig {
    /// Strategy within a priority group.
    pub strategy: Strategy,
    /// Latency measure for `lowest_latency`.
    pub latency: LatencyMetric,
    /// Decay time of the latency and usage averages.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub decay: Duration,
    /// `consistent_hash` key: this request header; absent: the agent name.
    pub hash_header: Option<String>,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        Self {
            strategy: Strategy::Weighted,
            latency: LatencyMetric::Ttft,
            decay: Duration::from_secs(10),
            hash_header: None,
        }
    }
}

/// A failure class that moves a call to the next target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailoverOn {
    /// TCP connect or TLS handshake failed.
    Connect,
    /// The attempt deadline passed before response headers.
    Timeout,
    /// HTTP 429.
    RateLimited,
    /// HTTP 5xx.
    ServerError,
}

/// Retries on the next target.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// Failures that trigger a retry on the next target.
    pub on: Vec<FailoverOn>,
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Retries allowed as a fraction of first attempts (over `budget_window`), so retries
    /// cannot multiply load during an outage.
    pub retry_budget: f64,
    /// Retries always allowed per second, on top of the ratio (keeps low-traffic routes alive).
    pub min_retries_per_second: u32,
    /// Window over which the budget is computed.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub budget_window: Duration,
    /// Deadline for one attempt to return response headers.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub attempt_timeout: Duration,
    /// Deadline for the whole call until response headers, across attempts.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub request_timeout: Duration,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        Self {
            on: vec![FailoverOn::Connect, FailoverOn::Timeout, FailoverOn::RateLimited, FailoverOn::ServerError],
            max_attempts: 3,
            retry_budget: 0.2,
            min_retries_per_second: 10,
            budget_window: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(180),
        }
    }
}

/// Passive health: eject a target after repeated failures, let it back after probation.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitConfig {
    /// Consecutive failures (as classed by `failover.on`) that open the circuit; 0 disables.
    pub max_fails: u32,
    /// How long an open circuit keeps the target out; then one probe call is let through:
    /// success closes the circuit, failure opens it again.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub fail_timeout: Duration,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        Self { max_fails: 5, fail_timeout: Duration::from_secs(30) }
    }
}
