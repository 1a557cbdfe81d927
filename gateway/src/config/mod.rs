//! Typed configuration. Every section rejects unknown fields so a typo is an error with a line
//! and column (see [`load`]) instead of a silently ignored setting on a production node.

pub mod a2a;
pub mod federation;
mod gateway;
pub mod governance;
pub mod guards;
mod intercept;
mod kubernetes;
pub mod limits;
mod load;
pub mod mcp;
pub mod mcp_auth;
pub mod reference;
mod telemetry;
mod uprobes;

pub use gateway::{
    BalanceConfig, CircuitConfig, CredentialSource, FailoverConfig, FailoverOn, LatencyMetric, ListenerAuthConfig,
    ProviderConfig, ProviderOptions, Strategy, TargetConfig,
};
pub use intercept::{AutoInterceptConfig, InterceptMode};
pub use kubernetes::{KubernetesConfig, PodCaptureMode};
pub use load::{from_path, from_str, ConfigError, DEFAULT_CONFIG_YAML};
pub use telemetry::{ModelPrice, OtlpMetricsConfig};
pub use uprobes::{ObservedL7Config, UprobesConfig};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Root of `tollgate.yaml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the transparent proxy listens.
    pub listen: ListenConfig,
    /// Admin listener: `/metrics`, `/healthz`, `/readyz`.
    pub admin: AdminConfig,
    /// What the kernel redirects to the proxy.
    pub capture: CaptureConfig,
    /// AI destinations handled at L7 (everything else captured is spliced).
    pub routes: Vec<RouteConfig>,
    /// Upstream providers that routes' targets name.
    pub providers: Vec<ProviderConfig>,
    /// Interception CA and upstream trust.
    pub tls: TlsConfig,
    /// Named agents; the first matching selector wins.
    pub agents: Vec<AgentConfig>,
    /// Pod identity and pod capture scope from the Kubernetes API.
    pub kubernetes: KubernetesConfig,
    /// Metrics, traces, access log.
    pub telemetry: TelemetryConfig,
    /// Model prices for `tollgate_llm_cost_usd_total`; first matching entry wins, empty: no
    /// cost metric.
    pub pricing: Vec<ModelPrice>,
    /// Bounds on memory and work per connection.
    pub limits: LimitsConfig,
    /// Named groups of agents, for access rules and token limits.
    pub agent_groups: Vec<governance::AgentGroupConfig>,
    /// Which providers, models and routes agents and groups may use (deny wins).
    pub access: Vec<governance::AccessRuleConfig>,
    /// Token, request and cost limits per agent, group, namespace or globally.
    pub rate_limits: limits::TokenLimitsConfig,
    /// Guards run on every LLM call's request (and, for `pii`, its response), in order.
    pub guardrails: Vec<guards::GuardConfig>,
    /// MCP (Model Context Protocol) traffic on `protocol: mcp` routes: tool governance.
    pub mcp: mcp::McpConfig,
    /// Agent-to-agent (A2A) traffic on `protocol: a2a` routes: hop policy.
    pub a2a: a2a::A2aConfig,
}

/// Proxy listener addresses. The eBPF programs rewrite captured connects to these.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// Port of the transparent proxy on every address below.
    pub port: u16,
    /// Address for IPv4 callers in the host netns.
    pub ipv4: Ipv4Addr,
    /// Address for IPv6 callers in the host netns; `null` disables IPv6 capture.
    pub ipv6: Option<Ipv6Addr>,
    /// Node-side IPv4 address reachable from pod netns (node IP, veth end, or a link-local
    /// address owned by tollgate); `null` leaves pod traffic uncaptured.
    pub pod_ipv4: Option<Ipv4Addr>,
    /// Node-side IPv6 address reachable from pod netns.
    pub pod_ipv6: Option<Ipv6Addr>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self { port: 15001, ipv4: Ipv4Addr::LOCALHOST, ipv6: Some(Ipv6Addr::LOCALHOST), pod_ipv4: None, pod_ipv6: None }
    }
}

/// Admin listener.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of `/metrics`, `/healthz`, `/readyz`.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 15000)) }
    }
}

/// Kernel capture: scope (which cgroups) and rules (which destinations).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// Turn the kernel programs off (proxy still runs, e.g. for explicit use).
    pub enabled: bool,
    /// cgroup v2 directory the programs attach to. Default: the cgroup2 mount, mounted at
    /// `/run/tollgate/cgroup2` when none exists.
    pub cgroup_root: Option<PathBuf>,
    /// Cgroup subtrees in scope, as paths relative to the cgroup2 root (`/kubepods.slice`) or
    /// absolute paths under it. Empty: every cgroup.
    pub scope: Vec<String>,
    /// Destination ports captured for any address.
    pub ports: Vec<u16>,
    /// Destination CIDRs (v4 or v6), optionally limited to one port.
    pub destinations: Vec<DestinationRule>,
    /// Hostnames resolved by tollgate (system resolver) into CIDR rules, refreshed periodically.
    pub hosts: Vec<HostRule>,
    /// How often hostnames are re-resolved (the system resolver exposes no TTL).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub resolve_interval: Duration,
    /// Refuse captured connections while the proxy is down instead of letting them through.
    /// Programs stay attached (pinned in bpffs) after tollgate dies so the refusal holds.
    pub fail_closed: bool,
    /// Heartbeat age after which the proxy counts as down.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub heartbeat_timeout: Duration,
    /// SO_MARK set on tollgate's own upstream sockets so they are never redirected.
    pub self_mark: u32,
    /// Capacity of each connection-record map: captured connects not yet accepted by the proxy
    /// (one more goes direct, counted as `skipped_map_full`; none is evicted).
    pub max_records: u32,
    /// Capacity of each CIDR rule trie.
    pub max_rules: u32,
    /// Capacity of the scope map.
    pub max_scope_cgroups: u32,
    /// bpffs directory for pinned links (fail_closed).
    pub bpffs_dir: PathBuf,
    /// TLS plaintext of captured connections from uprobes on OpenSSL (no interception).
    pub uprobes: UprobesConfig,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            cgroup_root: None,
            scope: Vec::new(),
            ports: Vec::new(),
            destinations: Vec::new(),
            hosts: Vec::new(),
            resolve_interval: Duration::from_secs(30),
            fail_closed: false,
            heartbeat_timeout: Duration::from_secs(1),
            self_mark: 0x7467_0001,
            max_records: 65_536,
            max_rules: 4_096,
            max_scope_cgroups: 1_024,
            bpffs_dir: PathBuf::from("/sys/fs/bpf/tollgate"),
            uprobes: UprobesConfig::default(),
        }
    }
}

/// A CIDR capture rule.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DestinationRule {
    /// `10.0.0.0/8`, `2001:db8::/32`, or a bare address (host route).
    #[schemars(with = "String")]
    pub cidr: IpNet,
    /// Only this destination port; absent: every port.
    #[serde(default)]
    pub port: Option<u16>,
}

/// A hostname capture rule.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostRule {
    /// DNS name, e.g. `api.openai.com`.
    pub host: String,
    /// Destination port.
    #[serde(default = "default_https_port")]
    pub port: u16,
}

fn default_https_port() -> u16 {
    443
}

/// Which provider API is spoken; decides how requests are addressed and usage is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// OpenAI.
    #[default]
    Openai,
    /// Azure OpenAI: deployment URLs, `api-version` query, `api-key` header.
    AzureOpenai,
    /// Servers speaking the OpenAI API (vLLM, Ollama, DeepSeek, Mistral, Groq, Together).
    OpenaiCompatible,
    /// Anthropic messages API.
    Anthropic,
    /// Google Gemini (`generateContent`).
    Gemini,
}

impl ProviderKind {
    /// The config spelling (`openai`, `openai_compatible`, `azure_openai`, `anthropic`,
    /// `gemini`): what access rules and token limits match as the provider of a call.
    pub fn config_name(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::OpenaiCompatible => "openai_compatible",
            ProviderKind::AzureOpenai => "azure_openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gemini",
        }
    }

    /// `gen_ai.provider.name` value (OpenTelemetry GenAI semantic conventions).
    pub fn semconv_name(self) -> &'static str {
        match self {
            ProviderKind::Openai | ProviderKind::OpenaiCompatible => "openai",
            ProviderKind::AzureOpenai => "azure.ai.openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Gemini => "gcp.gemini",
        }
    }

    /// Speaks the OpenAI request/response shapes.
    pub fn is_openai_shaped(self) -> bool {
        matches!(self, ProviderKind::Openai | ProviderKind::AzureOpenai | ProviderKind::OpenaiCompatible)
    }
}

/// An AI destination handled at L7.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in logs and metrics.
    pub name: String,
    /// How to recognise the destination of captured connections.
    #[serde(rename = "match", default)]
    pub matcher: RouteMatch,
    /// Plain-HTTP listener for agents configured to use tollgate directly (base URL
    /// `http://<listener>`); such a route needs `targets` or `upstream`.
    #[serde(default)]
    pub listener: Option<SocketAddr>,
    /// Who may call `listener`: loopback-only by default, and a listener that injects provider
    /// keys admits only callers identified by a token or a source CIDR.
    #[serde(default)]
    pub listener_auth: ListenerAuthConfig,
    /// What the destination speaks: LLM provider APIs (default), MCP, or A2A. It decides which
    /// parser and policies see the route's requests.
    #[serde(default)]
    pub protocol: RouteProtocol,
    /// Serve this route with tollgate's own MCP endpoint federating the servers of
    /// `mcp.federations[name]` (needs `protocol: mcp`; nothing is forwarded to the original
    /// destination).
    #[serde(default)]
    pub federation: Option<String>,
    /// API agents speak on this route when the path does not tell; also the provider reported
    /// for calls passed through to the original destination.
    #[serde(default)]
    pub provider: ProviderKind,
    /// TLS to this destination: `true` terminates it with a minted cert for every caller;
    /// `false` splices it (L4 stats, L7 through the TLS uprobes); `auto` (default) terminates it
    /// only for callers whose trust store holds tollgate's CA and splices it for the others.
    #[serde(default)]
    pub intercept: InterceptMode,
    /// Send requests here instead of the original destination (self-hosted models, tests).
    /// Mutually exclusive with `targets`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub upstream: Option<url::Url>,
    /// Providers that serve this route's LLM calls, with credentials injected; empty: calls go
    /// to the original destination (or `upstream`) with the agent's own credentials.
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
    /// Choice among targets.
    #[serde(default)]
    pub balance: BalanceConfig,
    /// Retries on the next target.
    #[serde(default)]
    pub failover: FailoverConfig,
    /// Ejection of failing targets.
    #[serde(default)]
    pub circuit: CircuitConfig,
    /// Ask OpenAI-shaped streams for usage (`stream_options.include_usage`) when the agent did
    /// not, and strip the extra chunk from what the agent sees; off: such streams are estimated.
    #[serde(default = "yes")]
    pub include_usage: bool,
    /// Copy request and response bodies of LLM calls into the access log (off by default:
    /// prompts are sensitive).
    #[serde(default)]
    pub log_payloads: PayloadLogConfig,
}

/// The protocol of a route's destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RouteProtocol {
    /// LLM provider APIs (OpenAI, Anthropic, Gemini, ...).
    #[default]
    Llm,
    /// Model Context Protocol servers (Streamable HTTP and legacy HTTP+SSE transports).
    Mcp,
    /// Agent-to-agent protocol (JSON-RPC over HTTP, agent cards).
    A2a,
}

/// Opt-in payload logging of one route.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PayloadLogConfig {
    /// Log bodies for this route.
    pub enabled: bool,
    /// Bytes kept of each body (request, response); the rest is cut and the line says so. At
    /// most [`MAX_PAYLOAD_LOG_BYTES`] (1 MiB): the prefixes are held in memory for the whole call.
    pub max_bytes: usize,
}

/// Largest `routes[].log_payloads.max_bytes` accepted: each logged call holds up to twice this
/// in memory until it ends, and access-log lines beyond it are of no use to a reader.
pub const MAX_PAYLOAD_LOG_BYTES: usize = 1 << 20;

impl Default for PayloadLogConfig {
    fn default() -> Self {
        Self { enabled: false, max_bytes: 4096 }
    }
}

fn yes() -> bool {
    true
}

/// Matches a destination by name (TLS SNI or HTTP Host) or by original address.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RouteMatch {
    /// Hostnames (exact, or `*.example.com`).
    pub hosts: Vec<String>,
    /// Original destination `ip:port`.
    pub addresses: Vec<SocketAddr>,
    /// Request path prefixes (`/v1/`), or exact paths; empty: every path. Requests on a
    /// matched connection whose path matches none are passed through to the destination.
    pub paths: Vec<String>,
}

/// Shortest `tls.leaf_validity`: shorter leaves would be re-minted on nearly every handshake
/// (and `0s` would mint leaves that are already expired).
pub const MIN_LEAF_VALIDITY: Duration = Duration::from_secs(1);
/// Longest `tls.leaf_validity`: the validity of a generated CA.
pub const MAX_LEAF_VALIDITY: Duration = Duration::from_secs(3650 * 24 * 3600);

/// Interception CA and upstream trust.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Directory holding `ca.pem` and `ca.key` (created on first start, key mode 0600).
    pub ca_dir: PathBuf,
    /// PEM files trusted for upstream connections in addition to the system roots.
    pub extra_roots: Vec<PathBuf>,
    /// Validity of minted leaf certificates (1s to 3650d); a cached leaf is re-minted when less
    /// than a quarter of it is left.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub leaf_validity: Duration,
    /// What `routes[].intercept: auto` remembers: trust decisions and learned splices.
    pub auto: AutoInterceptConfig,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            ca_dir: PathBuf::from("/var/lib/tollgate/ca"),
            extra_roots: Vec::new(),
            leaf_validity: Duration::from_secs(7 * 24 * 3600),
            auto: AutoInterceptConfig::default(),
        }
    }
}

/// A named agent. All given selector fields must match (AND); absent fields match anything.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Name used as the `agent` label. Keep the set small: it is a metric dimension.
    pub name: String,
    /// Selector.
    #[serde(rename = "match")]
    pub selector: AgentSelector,
}

/// Agent selector on host facts (cgroup, comm, exe, uid) and, for pods, Kubernetes facts.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSelector {
    /// Pod namespace (needs `kubernetes.enabled`).
    pub namespace: Option<String>,
    /// Owner workload name (Deployment, StatefulSet, DaemonSet, CronJob/Job, or bare pod).
    pub workload: Option<String>,
    /// Pod service account.
    pub service_account: Option<String>,
    /// Pod labels that must all be present with these values.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Glob on the cgroup path relative to the cgroup2 root, e.g. `/agents/billing/**`.
    pub cgroup: Option<String>,
    /// Exact `comm` (15 chars max, as the kernel truncates it).
    pub comm: Option<String>,
    /// Glob on the executable path.
    pub exe: Option<String>,
    /// Exact uid.
    pub uid: Option<u32>,
}

/// Telemetry sinks.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP trace export; absent: no export.
    pub otlp: Option<OtlpConfig>,
    /// Where JSON access-log lines go: `stdout`, `off`, or a file path.
    pub access_log: String,
    /// Distinct values kept per free-form label (model, SNI, agent) before folding into `other`.
    pub max_label_values: usize,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { otlp: None, access_log: "stdout".into(), max_label_values: 256 }
    }
}

/// OTLP exporter settings.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// Collector endpoint, e.g. `http://127.0.0.1:4317` (grpc) or `http://127.0.0.1:4318` (http).
    pub endpoint: String,
    /// Wire protocol.
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// Spans buffered before new ones are dropped (export never blocks traffic).
    #[serde(default = "default_otlp_queue")]
    pub max_queue: usize,
    /// Export one span per LLM call (off: only metrics, when `metrics.enabled`).
    #[serde(default = "yes")]
    pub traces: bool,
    /// Periodic push of the metrics to the same collector.
    #[serde(default)]
    pub metrics: OtlpMetricsConfig,
}

fn default_otlp_queue() -> usize {
    4096
}

/// OTLP transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    /// OTLP/gRPC.
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies.
    HttpProtobuf,
}

/// Bounds that keep one misbehaving client from exhausting the node.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Concurrent proxied connections; further accepts wait.
    pub max_connections: usize,
    /// Largest request body read for inspection (requests are buffered to read `model`).
    pub max_request_body_bytes: usize,
    /// Largest non-streamed response prefix kept for reading usage; the body itself is always
    /// forwarded as it arrives.
    pub max_inspect_bytes: usize,
    /// Largest single SSE event held while waiting for its end.
    pub max_sse_event_bytes: usize,
    /// Minted leaf certificates cached (LRU).
    pub cert_cache_size: usize,
    /// Time to read the first bytes (sniff) of a captured connection.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub sniff_timeout: Duration,
    /// Time to connect upstream.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub connect_timeout: Duration,
    /// Idle upstream connections kept per host.
    pub pool_max_idle_per_host: usize,
    /// On SIGTERM, how long in-flight connections may finish after capture is detached.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub drain_timeout: Duration,
    /// Time to receive the whole body of a request tollgate reads before forwarding (LLM calls,
    /// MCP and A2A messages), counted from when its headers were read. A slower upload is
    /// answered 408 in the caller's API shape and nothing is sent upstream, so a client that
    /// trickles bytes cannot hold a buffer and a task for ever.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub body_read_timeout: Duration,
    /// Bytes of bodies buffered at once by the whole process (request bodies read before
    /// forwarding, held responses), shared by every connection: each body takes its bytes from
    /// this budget before it is buffered and gives them back when it is dropped. A request
    /// that finds no room is answered 503 with `retry-after` in the caller's API shape, before
    /// anything is sent upstream. Bounds memory by bytes, whatever the number of connections;
    /// must be at least `max_request_body_bytes`.
    pub max_buffered_body_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_request_body_bytes: 8 << 20,
            max_inspect_bytes: 4 << 20,
            max_sse_event_bytes: 1 << 20,
            cert_cache_size: 1_024,
            sniff_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            pool_max_idle_per_host: 64,
            drain_timeout: Duration::from_secs(20),
            body_read_timeout: Duration::from_secs(30),
            max_buffered_body_bytes: 256 << 20,
        }
    }
}

impl LimitsConfig {
    /// Checks serde cannot express; the error is `(field below limits, message)` so the loader
    /// can point at the line.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.body_read_timeout.is_zero() {
            return Err(("body_read_timeout".into(), "must be positive".into()));
        }
        if self.max_buffered_body_bytes < self.max_request_body_bytes {
            return Err((
                "max_buffered_body_bytes".into(),
                format!(
                    "{} is below max_request_body_bytes ({}): a body of the allowed size could never be read",
                    self.max_buffered_body_bytes, self.max_request_body_bytes
                ),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// The route for a destination, by name (SNI / Host without port) or original address.
    pub fn route_for(&self, name: Option<&str>, orig: Option<SocketAddr>) -> Option<&RouteConfig> {
        self.routes.iter().find(|r| {
            name.is_some_and(|n| r.matcher.hosts.iter().any(|h| host_matches(h, n)))
                || orig.is_some_and(|a| r.matcher.addresses.contains(&a))
        })
    }

    /// Addresses the proxy listens on (host netns and pod-facing).
    pub fn proxy_addrs(&self) -> Vec<SocketAddr> {
        let l = &self.listen;
        let mut v = vec![SocketAddr::from((l.ipv4, l.port))];
        let extra: [Option<IpAddr>; 3] =
            [l.ipv6.map(Into::into), l.pod_ipv4.map(Into::into), l.pod_ipv6.map(Into::into)];
        for ip in extra.into_iter().flatten() {
            let a = SocketAddr::new(ip, l.port);
            if !v.contains(&a) {
                v.push(a);
            }
        }
        v
    }
}

/// Exact or `*.suffix` hostname match, case-insensitive, ignoring a trailing dot.
pub fn host_matches(pattern: &str, name: &str) -> bool {
    let name = name.trim_end_matches('.');
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            name.len() > suffix.len() + 1
                && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
        }
        None => pattern.eq_ignore_ascii_case(name),
    }
}

#[cfg(test)]
mod bounds_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_host_match() {
        assert!(host_matches("*.openai.azure.com", "x.openai.azure.com"));
        assert!(!host_matches("*.openai.azure.com", "openai.azure.com"));
        assert!(!host_matches("*.openai.azure.com", "xopenai.azure.com"));
        assert!(host_matches("api.openai.com", "API.openai.com."));
    }

    #[test]
    fn route_by_name_or_address() {
        let c = from_str(
            "t.yaml",
            "routes:\n- name: a\n  provider: openai\n  match: {hosts: [api.openai.com]}\n- name: b\n  provider: openai\n  match: {addresses: ['127.0.0.2:8000']}\n",
        )
        .unwrap();
        assert_eq!(c.route_for(Some("api.openai.com"), None).unwrap().name, "a");
        assert_eq!(c.route_for(None, Some("127.0.0.2:8000".parse().unwrap())).unwrap().name, "b");
        assert!(c.route_for(Some("example.com"), Some("127.0.0.2:80".parse().unwrap())).is_none());
    }
}
