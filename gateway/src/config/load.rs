//! Parsing with positions: YAML syntax and type errors carry `file:line:col`, semantic errors
//! name the field path, so an operator can fix a ConfigMap without guessing.

use std::path::Path;

use super::Config;

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
    #[error("{file}: {field}: {message}")]
    Invalid {
        /// Path as given.
        file: String,
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
    validate(file, &cfg)?;
    Ok(cfg)
}

/// serde_yaml_ng appends " at line X column Y"; we print the position in front instead.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

fn validate(file: &str, c: &Config) -> Result<(), ConfigError> {
    let bad = |field: String, message: String| ConfigError::Invalid { file: file.to_string(), field, message };
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
    let mut names = std::collections::HashSet::new();
    for (i, r) in c.routes.iter().enumerate() {
        if r.name.is_empty() || !names.insert(r.name.as_str()) {
            return Err(bad(format!("routes[{i}].name"), format!("{:?} is empty or used twice", r.name)));
        }
        if r.matcher.hosts.is_empty() && r.matcher.addresses.is_empty() {
            return Err(bad(format!("routes[{i}].match"), "needs at least one of hosts, addresses".into()));
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
    if c.telemetry.max_label_values == 0 {
        return Err(bad("telemetry.max_label_values".into(), "must be positive".into()));
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
        assert!(c.routes.iter().all(|r| !r.intercept));
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
        assert_eq!(err, "c.yaml: routes[0].match: needs at least one of hosts, addresses");
    }

    #[test]
    fn missing_extra_root_is_named() {
        let err = from_str("c.yaml", "tls:\n  extra_roots: [/nonexistent/ca.pem]\n").unwrap_err().to_string();
        assert!(err.starts_with("c.yaml: tls.extra_roots[0]: /nonexistent/ca.pem: No such file"), "{err}");
    }

    #[test]
    fn empty_file_is_defaults() {
        let c = from_str("e.yaml", "\n").unwrap();
        assert_eq!(c.listen.port, 15001);
    }
}
