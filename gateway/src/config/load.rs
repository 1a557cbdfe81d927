//! Parsing with positions: YAML syntax and type errors carry `file:line:col`, semantic errors
//! name the field path, so an operator can fix a ConfigMap without guessing.

use std::path::Path;

use super::{Config, ProviderKind, RouteConfig};

/// The embedded default used by `tollgate run` without `--config`.
pub const DEFAULT_CONFIG_YAML: &str = include_str!("default.yaml");

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// Path as given.
        file: String,
        /// OS error.
        source: std::io::Error,
    },
    /// Syntax or type error at a position.
    #[error("{file}:{line}:{column}: {message}")]
    Parse {
        /// Path as given.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// Parses, but a value is unusable.
    #[error("{file}{}: {field}: {message}", position.map(|(l, c)| format!(":{l}:{c}")).unwrap_or_default())]
    Invalid {
        /// Path as given.
        file: String,
        /// 1-based line and column of the field (or of its nearest present parent), when the
        /// text is at hand.
        position: Option<(usize, usize)>,
        /// Field path.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// Read and validate a config file.
pub fn from_path(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { file: file.clone(), source })?;
    from_str(&file, &text)
}

/// Parse and validate config text; `file` names it in errors.
pub fn from_str(file: &str, text: &str) -> Result<Config, ConfigError> {
    // An empty document is the all-defaults config, not a type error.
    let cfg = if text.trim().is_empty() {
        Config::default()
    } else {
        serde_yaml_ng::from_str::<Config>(text).map_err(|e| {
            // serde_yaml_ng already prefixes the field path ("capture.ports[1]: ...").
            let (line, column) = e.location().map(|l| (l.line(), l.column())).unwrap_or((1, 1));
            ConfigError::Parse { file: file.to_string(), line, column, message: strip_position(&e.to_string()) }
        })?
    };
    validate(file, &cfg).map_err(|e| match e {
        ConfigError::Invalid { file, field, message, .. } => {
            let position = locate(text, &field);
            ConfigError::Invalid { file, position, field, message }
        }
        other => other,
    })?;
    Ok(cfg)
}

/// Line and column of the value at `field` (`routes[0].targets[1].provider`) in the YAML
/// `text`; when part of the path is absent (a missing field), the nearest present parent.
fn locate(text: &str, field: &str) -> Option<(usize, usize)> {
    let root = marked_yaml::parse_yaml(0, text).ok()?;
    let mut node = &root;
    let mut best = None;
    let mark = |n: &marked_yaml::Node| n.span().start().map(|m| (m.line(), m.column()));
    for seg in field.split('.') {
        let (key, indices) = match seg.find('[') {
            Some(i) => (&seg[..i], &seg[i..]),
            None => (seg, ""),
        };
        if !key.is_empty() {
            match node.as_mapping().and_then(|m| m.get_node(key)) {
                Some(n) => node = n,
                None => return best.or_else(|| mark(node)),
            }
            best = mark(node);
        }
        for idx in indices.split('[').filter_map(|p| p.strip_suffix(']')).filter_map(|p| p.parse::<usize>().ok()) {
            match node.as_sequence().and_then(|s| s.get_node(idx)) {
                Some(n) => node = n,
                None => return best,
            }
            best = mark(node);
        }
    }
    best
}

/// serde_yaml_ng appends " at line X column Y"; we print the position in front instead.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

fn validate(file: &str, c: &Config) -> Result<(), ConfigError> {
    let bad = |field: String, message: String| ConfigError::Invalid {
        file: file.to_string(),
        position: None,
        field,
        message,
    };
    if c.listen.port == 0 {
        return Err(bad("listen.port".into(), "must be 1-65535".into()));
    }
    for (i, p) in c.capture.ports.iter().enumerate() {
        if *p == 0 {
            return Err(bad(format!("capture.ports[{i}]"), "must be 1-65535".into()));
        }
        if *p == c.listen.port {
            return Err(bad(
                format!("capture.ports[{i}]"),
                "equals listen.port: captured traffic would loop into the proxy".into(),
            ));
        }
    }
    for (i, h) in c.capture.hosts.iter().enumerate() {
        if h.host.is_empty() || h.host.contains(['/', ' ', ':']) {
            return Err(bad(format!("capture.hosts[{i}].host"), format!("{:?} is not a hostname", h.host)));
        }
    }
    for (i, s) in c.capture.scope.iter().enumerate() {
        if s.is_empty() || s.split('/').any(|seg| seg == "..") {
            return Err(bad(format!("capture.scope[{i}]"), format!("{s:?} is not a cgroup path")));
        }
    }
    if c.capture.heartbeat_timeout.as_millis() < 100 {
        return Err(bad("capture.heartbeat_timeout".into(), "must be at least 100ms".into()));
    }
    if c.capture.max_records == 0 || c.capture.max_rules == 0 || c.capture.max_scope_cgroups == 0 {
        return Err(bad("capture.max_*".into(), "map capacities must be positive".into()));
    }
    c.capture.uprobes.validate().map_err(|(f, m)| bad(format!("capture.uprobes.{f}"), m))?;
    validate_providers(c).map_err(|(f, m)| bad(f, m))?;
    let mut names = std::collections::HashSet::new();
    let mut listeners = std::collections::HashSet::new();
    for (i, r) in c.routes.iter().enumerate() {
        if r.name.is_empty() || !names.insert(r.name.as_str()) {
            return Err(bad(format!("routes[{i}].name"), format!("{:?} is empty or used twice", r.name)));
        }
        if r.matcher.hosts.is_empty() && r.matcher.addresses.is_empty() && r.listener.is_none() {
            return Err(bad(
                format!("routes[{i}].match"),
                "needs at least one of hosts, addresses (or a listener)".into(),
            ));
        }
        validate_route(c, r).map_err(|(f, m)| bad(format!("routes[{i}].{f}"), m))?;
        if let Some(l) = r.listener {
            if !listeners.insert(l) || c.proxy_addrs().contains(&l) || l == c.admin.listen {
                return Err(bad(format!("routes[{i}].listener"), format!("{l} is already used by another listener")));
            }
        }
        if let Some(u) = &r.upstream {
            if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                return Err(bad(
                    format!("routes[{i}].upstream"),
                    format!("{u} must be an http:// or https:// URL with a host"),
                ));
            }
        }
    }
    for (i, r) in c.tls.extra_roots.iter().enumerate() {
        if let Err(e) = std::fs::metadata(r) {
            return Err(bad(format!("tls.extra_roots[{i}]"), format!("{}: {e}", r.display())));
        }
    }
    let v = c.tls.leaf_validity;
    if v < super::MIN_LEAF_VALIDITY || v > super::MAX_LEAF_VALIDITY {
        return Err(bad(
            "tls.leaf_validity".into(),
            format!(
                "{} is outside 1s..3650d (leaves are re-minted when a quarter of it is left)",
                humantime::format_duration(v)
            ),
        ));
    }
    c.tls.auto.validate().map_err(|(f, m)| bad(f, m))?;
    for (i, a) in c.agents.iter().enumerate() {
        if a.name.is_empty() {
            return Err(bad(format!("agents[{i}].name"), "must not be empty".into()));
        }
        for (field, pat) in [("cgroup", &a.selector.cgroup), ("exe", &a.selector.exe)] {
            if let Some(p) = pat {
                glob::Pattern::new(p).map_err(|e| bad(format!("agents[{i}].match.{field}"), e.to_string()))?;
            }
        }
    }
    if let Some(o) = &c.telemetry.otlp {
        if url::Url::parse(&o.endpoint).is_err() {
            return Err(bad("telemetry.otlp.endpoint".into(), format!("{:?} is not a URL", o.endpoint)));
        }
    }
    c.limits.validate().map_err(|(f, m)| bad(format!("limits.{f}"), m))?;
    if c.telemetry.max_label_values == 0 {
        return Err(bad("telemetry.max_label_values".into(), "must be positive".into()));
    }
    validate_otlp_and_pricing(c).map_err(|(f, m)| bad(f, m))?;
    validate_governance(c).map_err(|(f, m)| bad(f, m))?;
    Ok(())
}

/// Agent groups, access rules, token limits and guardrails: the same checks the engines make
/// when they are built, run here so `tollgate check` points at the line.
fn validate_governance(c: &Config) -> Result<(), (String, String)> {
    super::governance::validate(&c.agent_groups, &c.access)?;
    c.rate_limits.validate().map_err(|(f, m)| (format!("rate_limits.{f}"), m))?;
    crate::policy::guards::Guardrails::compile(&c.guardrails).map_err(|e| (e.field, e.message))?;
    super::a2a::validate(&c.a2a)?;
    c.mcp.validate().map_err(|(f, m)| (format!("mcp.{f}"), m))?;
    Ok(())
}

/// OTLP metric push timing and the price table: globs compile, prices are finite and not
/// negative (a negative price would make the cost counter decrease).
fn validate_otlp_and_pricing(c: &Config) -> Result<(), (String, String)> {
    if let Some(o) = &c.telemetry.otlp {
        let m = &o.metrics;
        if m.interval < std::time::Duration::from_secs(1) {
            return Err(("telemetry.otlp.metrics.interval".into(), "must be at least 1s".into()));
        }
        if m.timeout.is_zero() {
            return Err(("telemetry.otlp.metrics.timeout".into(), "must be positive".into()));
        }
    }
    for (i, p) in c.pricing.iter().enumerate() {
        let f = |s: &str| format!("pricing[{i}].{s}");
        if p.model.is_empty() {
            return Err((f("model"), "must not be empty".into()));
        }
        glob::Pattern::new(&p.model).map_err(|e| (f("model"), e.to_string()))?;
        let prices = [
            ("input_per_mtok", Some(p.input_per_mtok)),
            ("output_per_mtok", Some(p.output_per_mtok)),
            ("cached_input_per_mtok", p.cached_input_per_mtok),
        ];
        for (name, v) in prices {
            if let Some(v) = v.filter(|v| !v.is_finite() || *v < 0.0) {
                return Err((f(name), format!("{v} is not a price (finite, at least 0)")));
            }
        }
    }
    Ok(())
}

/// Providers: unique names, a base URL where no default exists, one credential source.
fn validate_providers(c: &Config) -> Result<(), (String, String)> {
    let mut names = std::collections::HashSet::new();
    for (i, p) in c.providers.iter().enumerate() {
        let f = |s: &str| format!("providers[{i}].{s}");
        if p.name.is_empty() || !names.insert(p.name.as_str()) {
            return Err((f("name"), format!("{:?} is empty or used twice", p.name)));
        }
        match &p.base_url {
            Some(u) if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() => {
                return Err((f("base_url"), format!("{u} must be an http:// or https:// URL with a host")));
            }
            None if matches!(p.kind, ProviderKind::AzureOpenai | ProviderKind::OpenaiCompatible) => {
                return Err((f("base_url"), format!("required for kind {:?}", p.kind)));
            }
            _ => {}
        }
        if let Some(cr) = &p.credentials {
            match (&cr.env, &cr.file) {
                (Some(e), None) if !e.is_empty() => {}
                (None, Some(_)) => {}
                _ => return Err((f("credentials"), "set exactly one of env, file".into())),
            }
        }
        for (k, v) in &p.options.headers {
            if http::HeaderName::from_bytes(k.as_bytes()).is_err() || http::HeaderValue::from_str(v).is_err() {
                return Err((f(&format!("options.headers.{k}")), "not a valid header name and value".into()));
            }
        }
        if p.options.max_concurrent_requests == 0 {
            return Err((f("options.max_concurrent_requests"), "must be positive".into()));
        }
    }
    Ok(())
}

/// A route's explicit listener: loopback unless opted out, and callers identified when the route
/// injects provider keys (else the listener is an open proxy spending them).
fn validate_listener(c: &Config, r: &RouteConfig) -> Result<(), (String, String)> {
    let a = &r.listener_auth;
    let Some(l) = r.listener else {
        if *a != super::ListenerAuthConfig::default() {
            return Err(("listener_auth".into(), "set only on a route with a listener".into()));
        }
        return Ok(());
    };
    if let Some(t) = &a.token {
        match (&t.env, &t.file) {
            (Some(e), None) if !e.is_empty() => {}
            (None, Some(_)) => {}
            _ => return Err(("listener_auth.token".into(), "set exactly one of env, file".into())),
        }
    }
    if !l.ip().to_canonical().is_loopback() && !a.allow_non_loopback {
        return Err((
            "listener".into(),
            format!(
                "{l} is not a loopback address: every host that reaches it could call this route; \
                 set listener_auth.allow_non_loopback: true (with a token or allow_cidrs)"
            ),
        ));
    }
    let injects = r.targets.iter().any(|t| c.providers.iter().any(|p| p.name == t.provider && p.credentials.is_some()));
    if injects && a.token.is_none() && a.allow_cidrs.is_empty() && !a.allow_anonymous {
        return Err((
            "listener".into(),
            "this listener injects provider keys but cannot identify its callers: set listener_auth.token \
             (a shared token from env or file) or listener_auth.allow_cidrs, or allow_anonymous: true"
                .into(),
        ));
    }
    Ok(())
}

/// One route's gateway fields; the error names the field relative to the route.
fn validate_route(c: &Config, r: &RouteConfig) -> Result<(), (String, String)> {
    if r.upstream.is_some() && !r.targets.is_empty() {
        return Err(("upstream".into(), "use either upstream or targets, not both".into()));
    }
    if let Some(f) = &r.federation {
        if r.protocol != super::RouteProtocol::Mcp {
            return Err(("federation".into(), "a federation route needs protocol: mcp".into()));
        }
        if r.upstream.is_some() || !r.targets.is_empty() {
            return Err(("federation".into(), "a federation route has no upstream or targets".into()));
        }
        if !c.mcp.federations.iter().any(|x| &x.name == f) {
            return Err(("federation".into(), format!("no federation named {f:?} in mcp.federations")));
        }
    } else if r.listener.is_some() && r.upstream.is_none() && r.targets.is_empty() {
        return Err((
            "listener".into(),
            "a listener route has no original destination: give targets or upstream".into(),
        ));
    }
    validate_listener(c, r)?;
    for (j, p) in r.matcher.paths.iter().enumerate() {
        if !p.starts_with('/') {
            return Err((format!("match.paths[{j}]"), format!("{p:?} must start with /")));
        }
    }
    for (j, t) in r.targets.iter().enumerate() {
        if !c.providers.iter().any(|p| p.name == t.provider) {
            return Err((format!("targets[{j}].provider"), format!("no provider named {:?}", t.provider)));
        }
        if t.model.as_deref().is_some_and(str::is_empty) || t.model_alias.as_deref().is_some_and(str::is_empty) {
            return Err((format!("targets[{j}]"), "model and model_alias must not be empty".into()));
        }
    }
    if !r.targets.is_empty() && r.targets.iter().all(|t| t.weight == 0) {
        return Err(("targets".into(), "at least one target needs a positive weight".into()));
    }
    let fo = &r.failover;
    if fo.max_attempts == 0 {
        return Err(("failover.max_attempts".into(), "must be at least 1".into()));
    }
    if !(0.0..=10.0).contains(&fo.retry_budget) {
        return Err(("failover.retry_budget".into(), "must be between 0 and 10".into()));
    }
    for (name, d) in [
        ("failover.attempt_timeout", fo.attempt_timeout),
        ("failover.request_timeout", fo.request_timeout),
        ("failover.budget_window", fo.budget_window),
        ("balance.decay", r.balance.decay),
    ] {
        if d.is_zero() {
            return Err((name.into(), "must be positive".into()));
        }
    }
    if let Some(h) = &r.balance.hash_header {
        if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
            return Err(("balance.hash_header".into(), format!("{h:?} is not a header name")));
        }
    }
    if r.log_payloads.max_bytes > super::MAX_PAYLOAD_LOG_BYTES {
        return Err((
            "log_payloads.max_bytes".into(),
            format!(
                "{} is above the most accepted, {} (1 MiB)",
                r.log_payloads.max_bytes,
                super::MAX_PAYLOAD_LOG_BYTES
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid() {
        let c = from_str("<default>", DEFAULT_CONFIG_YAML).unwrap();
        assert!(c.capture.hosts.iter().any(|h| h.host == "api.openai.com" && h.port == 443));
        assert!(c.routes.iter().all(|r| r.intercept == crate::config::InterceptMode::Auto));
    }

    #[test]
    fn typo_reports_line_and_column() {
        let text = "listen:\n  port: 15001\ncapture:\n  portz: [443]\n";
        let err = from_str("cfg.yaml", text).unwrap_err().to_string();
        assert!(err.starts_with("cfg.yaml:4:3: capture: unknown field `portz`, expected one of"), "{err}");
    }

    #[test]
    fn wrong_type_reports_position_and_path() {
        let err = from_str("c.yaml", "capture:\n  ports: [443, eighty]\n").unwrap_err().to_string();
        assert!(err.starts_with("c.yaml:2:16: capture.ports[1]: invalid type"), "{err}");
    }

    #[test]
    fn semantic_error_names_field() {
        let err = from_str("c.yaml", "routes:\n- name: x\n  provider: openai\n  match: {}\n").unwrap_err().to_string();
        assert_eq!(err, "c.yaml:4:10: routes[0].match: needs at least one of hosts, addresses (or a listener)");
    }

    #[test]
    fn missing_extra_root_is_named() {
        let err = from_str("c.yaml", "tls:\n  extra_roots: [/nonexistent/ca.pem]\n").unwrap_err().to_string();
        assert!(err.starts_with("c.yaml:2:17: tls.extra_roots[0]: /nonexistent/ca.pem: No such file"), "{err}");
    }

    #[test]
    fn governance_errors_report_line_and_column() {
        let text = "guardrails:\n- kind: regex\n  name: jb\n  deny: [\"(unclosed\"]\n";
        let err = from_str("g.yaml", text).unwrap_err().to_string();
        assert!(err.starts_with("g.yaml:4:10: guardrails[0].deny[0]:"), "{err}");
        let text = "rate_limits:\n  policies:\n  - name: p\n    limits: [{limit: 1.5, window: 1m}]\n";
        let err = from_str("g.yaml", text).unwrap_err().to_string();
        assert!(err.starts_with("g.yaml:4:22: rate_limits.policies[0].limits[0].limit:"), "{err}");
        let text = "access:\n- name: a\n  deny: {models: [\"[x\"]}\n";
        let err = from_str("g.yaml", text).unwrap_err().to_string();
        assert!(err.starts_with("g.yaml:3:19: access[0].deny.models[0]:"), "{err}");
        let ok = "agent_groups: [{name: t, members: [\"a*\"]}]\naccess: [{name: a, match: {group: t}, allow: {models: [\"m*\"]}}]\nrate_limits: {policies: [{name: p, limits: [{limit: 10, window: 2s}]}]}\nguardrails: [{kind: pii, name: pii, entities: {email: redact}}]\n";
        let c = from_str("g.yaml", ok).unwrap();
        assert_eq!(c.access[0].allow.models, vec!["m*".to_string()]);
        assert_eq!(c.rate_limits.policies[0].limits[0].limit, 10.0);
    }

    #[test]
    fn gateway_route_errors_name_fields() {
        // `listener_auth`: the route injects keys, so its listener must identify callers.
        let base = "providers:\n- name: oa\n  kind: openai\n  credentials: {env: K}\nroutes:\n- name: r\n  listener: 127.0.0.1:4000\n  listener_auth: {allow_cidrs: [127.0.0.1/32]}\n";
        let ok = format!("{base}  targets: [{{provider: oa, model: m, weight: 2, model_alias: fast}}]\n");
        let c = from_str("g.yaml", &ok).unwrap();
        assert_eq!(c.routes[0].targets[0].weight, 2);
        let err = from_str("g.yaml", &format!("{base}  targets: [{{provider: nope}}]\n")).unwrap_err().to_string();
        assert_eq!(err, "g.yaml:9:24: routes[0].targets[0].provider: no provider named \"nope\"");
        let err = from_str("g.yaml", base).unwrap_err().to_string();
        assert!(
            err.starts_with("g.yaml:7:13: routes[0].listener: a listener route has no original destination"),
            "{err}"
        );
        let err = from_str("g.yaml", "providers:\n- name: az\n  kind: azure_openai\n").unwrap_err().to_string();
        assert_eq!(err, "g.yaml:2:7: providers[0].base_url: required for kind AzureOpenai");
        let err = from_str("g.yaml", "providers:\n- name: a\n  kind: anthropic\n  credentials: {env: A, file: /k}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "g.yaml:4:16: providers[0].credentials: set exactly one of env, file");
        let err =
            from_str("g.yaml", &format!("{base}  targets: [{{provider: oa}}]\n  failover: {{max_attempts: 0}}\n"))
                .unwrap_err()
                .to_string();
        assert_eq!(err, "g.yaml:10:28: routes[0].failover.max_attempts: must be at least 1");
        let err =
            from_str("g.yaml", &format!("{base}  targets: [{{provider: oa}}]\n  balance: {{strategy: fastest}}\n"))
                .unwrap_err()
                .to_string();
        assert!(err.starts_with("g.yaml:10:23: routes[0].balance.strategy: unknown variant `fastest`"), "{err}");
    }

    #[test]
    fn pricing_and_otlp_metrics_parse_and_validate() {
        let text = "pricing:\n- {model: 'gpt-4o-mini*', input_per_mtok: 0.15, output_per_mtok: 0.6, cached_input_per_mtok: 0.075}\n- {model: 'claude-*', input_per_mtok: 3, output_per_mtok: 15}\ntelemetry:\n  otlp:\n    endpoint: http://127.0.0.1:4318\n    protocol: http_protobuf\n    metrics: {enabled: true, interval: 30s}\n";
        let c = from_str("p.yaml", text).unwrap();
        assert_eq!(c.pricing.len(), 2);
        assert_eq!(c.pricing[0].cached_input_per_mtok, Some(0.075));
        assert_eq!(c.pricing[1].cached_input_per_mtok, None);
        let o = c.telemetry.otlp.unwrap();
        assert!(o.traces && o.metrics.enabled);
        assert_eq!(o.metrics.interval, std::time::Duration::from_secs(30));
        assert_eq!(o.metrics.timeout, std::time::Duration::from_secs(10));
        assert!(
            !from_str("d.yaml", "telemetry: {otlp: {endpoint: 'http://c:4317'}}\n")
                .unwrap()
                .telemetry
                .otlp
                .unwrap()
                .metrics
                .enabled
        );

        let err = from_str("p.yaml", "pricing:\n- {model: m, input_per_mtok: 1, output_per_mtok: -2}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "p.yaml:2:50: pricing[0].output_per_mtok: -2 is not a price (finite, at least 0)");
        let err = from_str("p.yaml", "pricing:\n- {model: 'a[', input_per_mtok: 1, output_per_mtok: 2}\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("p.yaml:2:11: pricing[0].model: "), "{err}");
        let err = from_str("p.yaml", "pricing:\n- {model: m, input: 1, output_per_mtok: 2}\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `input`"), "{err}");
        let err = from_str("p.yaml", "pricing:\n- {model: m, output_per_mtok: 2}\n").unwrap_err().to_string();
        assert!(err.contains("missing field `input_per_mtok`"), "{err}");
        let err = from_str(
            "p.yaml",
            "telemetry:\n  otlp:\n    endpoint: http://c:4317\n    metrics: {enabled: true, interval: 10ms}\n",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(err, "p.yaml:4:40: telemetry.otlp.metrics.interval: must be at least 1s");
        let err =
            from_str("p.yaml", "telemetry:\n  otlp:\n    endpoint: http://c:4317\n    metrics: {intervall: 1s}\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("unknown field `intervall`"), "{err}");
    }

    #[test]
    fn listener_exposure_and_anonymous_key_use_are_refused() {
        let head = "providers:\n- name: oa\n  kind: openai\n  credentials: {env: K}\n- name: open\n  kind: openai\nroutes:\n- name: r\n";
        let route = |listener: &str, provider: &str, auth: &str| {
            format!("{head}  listener: {listener}\n  targets: [{{provider: {provider}}}]\n{auth}")
        };
        // Outside loopback without the opt-in: named at the listener's line and column.
        let err = from_str("l.yaml", &route("0.0.0.0:4000", "open", "")).unwrap_err().to_string();
        assert!(
            err.starts_with("l.yaml:9:13: routes[0].listener: 0.0.0.0:4000 is not a loopback address")
                && err.contains("listener_auth.allow_non_loopback: true"),
            "{err}"
        );
        let err = from_str("l.yaml", &route("'[::]:4000'", "open", "")).unwrap_err().to_string();
        assert!(err.contains("is not a loopback address"), "{err}");
        // A key-injecting listener that cannot identify callers, even on loopback.
        let err = from_str("l.yaml", &route("127.0.0.1:4000", "oa", "")).unwrap_err().to_string();
        assert!(
            err.starts_with(
                "l.yaml:9:13: routes[0].listener: this listener injects provider keys but cannot identify its callers"
            ),
            "{err}"
        );
        let opt_in = "  listener_auth: {allow_non_loopback: true}\n";
        let err = from_str("l.yaml", &route("0.0.0.0:4000", "oa", opt_in)).unwrap_err().to_string();
        assert!(err.contains("injects provider keys"), "{err}");
        // Each documented way out is accepted.
        from_str("l.yaml", &route("127.0.0.1:4000", "open", "")).unwrap();
        from_str("l.yaml", &route("0.0.0.0:4000", "open", opt_in)).unwrap();
        for auth in [
            "  listener_auth: {token: {env: T}}\n",
            "  listener_auth: {token: {file: /run/t}}\n",
            "  listener_auth: {allow_cidrs: [127.0.0.1/32]}\n",
            "  listener_auth: {allow_anonymous: true}\n",
        ] {
            from_str("l.yaml", &route("127.0.0.1:4000", "oa", auth)).unwrap();
        }
        let c = from_str(
            "l.yaml",
            &route("0.0.0.0:4000", "oa", "  listener_auth: {allow_non_loopback: true, allow_cidrs: [10.0.0.0/8]}\n"),
        )
        .unwrap();
        assert_eq!(c.routes[0].listener_auth.allow_cidrs, vec!["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]);
        // Malformed settings are named.
        let err = from_str("l.yaml", &route("127.0.0.1:4000", "oa", "  listener_auth: {token: {env: T, file: /t}}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("l.yaml:11:26: routes[0].listener_auth.token: set exactly one of env, file"), "{err}");
        let err = from_str("l.yaml", &route("127.0.0.1:4000", "oa", "  listener_auth: {allow_cidrs: [10.0.0.0/33]}\n"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("l.yaml:11:33: routes[0].listener_auth.allow_cidrs[0]: "), "{err}");
        let err = from_str(
            "l.yaml",
            &format!("{head}  match: {{hosts: [a.b]}}\n  listener_auth: {{allow_anonymous: true}}\n"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("l.yaml:10:18: routes[0].listener_auth: set only on a route with a listener"), "{err}");
    }

    #[test]
    fn absurd_leaf_validity_is_refused() {
        for v in ["0s", "500ms", "4000d"] {
            let err = from_str("t.yaml", &format!("tls:\n  leaf_validity: {v}\n")).unwrap_err().to_string();
            assert!(err.starts_with("t.yaml:2:18: tls.leaf_validity: "), "{v}: {err}");
            assert!(err.contains("outside 1s..3650d"), "{err}");
        }
        let c = from_str("t.yaml", "tls:\n  leaf_validity: 2s\n").unwrap();
        assert_eq!(c.tls.leaf_validity, std::time::Duration::from_secs(2));
    }

    #[test]
    fn empty_file_is_defaults() {
        let c = from_str("e.yaml", "\n").unwrap();
        assert_eq!(c.listen.port, 15001);
    }
}
