//! `routes[].intercept` (`true`, `false` or `"auto"`) and `tls.auto`, the bounds of the trust
//! decisions `auto` makes. Separate from the route type so the tri-state's parsing, schema and
//! defaults live in one place.

use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How tollgate treats TLS to a route's destinations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum InterceptMode {
    /// `false`: splice the TLS untouched (L4 stats; L7 through the TLS uprobes where the agent's
    /// library is covered).
    Splice,
    /// `true`: always terminate TLS with tollgate's CA (strict: an agent that does not trust
    /// the CA fails its handshake).
    Always,
    /// `"auto"`: terminate TLS only for processes whose trust store holds tollgate's CA, splice
    /// the others so they keep working; a failed interception handshake teaches tollgate to
    /// splice that agent and SNI from then on.
    #[default]
    Auto,
}

impl InterceptMode {
    /// True when tollgate may terminate TLS for this route (always or after a trust decision).
    pub fn may_intercept(self) -> bool {
        !matches!(self, InterceptMode::Splice)
    }
}

impl Serialize for InterceptMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            InterceptMode::Splice => s.serialize_bool(false),
            InterceptMode::Always => s.serialize_bool(true),
            InterceptMode::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for InterceptMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = InterceptMode;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("true, false or \"auto\"")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<InterceptMode, E> {
                Ok(if v { InterceptMode::Always } else { InterceptMode::Splice })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<InterceptMode, E> {
                match v {
                    "auto" => Ok(InterceptMode::Auto),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for InterceptMode {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "InterceptMode".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "enum": [true, false, "auto"] })
    }
    fn inline_schema() -> bool {
        true
    }
}

/// Bounds of what `intercept: auto` remembers (`tls.auto`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AutoInterceptConfig {
    /// Trust decisions cached, keyed by executable, cgroup and trust-store file identity (1 to
    /// 1048576); the least recently used makes room.
    pub max_decisions: usize,
    /// How long a cached decision holds before the process's trust store is read again.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub decision_ttl: Duration,
    /// (agent, SNI) pairs remembered as "splice" after a failed interception handshake (1 to
    /// 1048576); the least recently used makes room.
    pub max_learned: usize,
    /// How long a learned "splice" holds (then tollgate tries interception again if the trust
    /// store says so).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub learned_ttl: Duration,
    /// System trust bundles, as paths inside the process's root filesystem, read for clients
    /// other than Node.js and Python when no trust variable is set (first existing file wins;
    /// default: the Debian, RHEL, Alpine and SUSE paths).
    pub system_bundles: Vec<String>,
    /// Largest trust-store file read, in bytes (1 KiB to 64 MiB): a larger one counts as not
    /// trusting tollgate.
    pub max_bundle_bytes: u64,
}

impl Default for AutoInterceptConfig {
    fn default() -> Self {
        Self {
            max_decisions: 4096,
            decision_ttl: Duration::from_secs(60),
            max_learned: 4096,
            learned_ttl: Duration::from_secs(3600),
            system_bundles: [
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
                "/etc/ssl/cert.pem",
                "/etc/ssl/ca-bundle.pem",
            ]
            .map(str::to_owned)
            .to_vec(),
            max_bundle_bytes: 4 << 20,
        }
    }
}

impl AutoInterceptConfig {
    /// Range checks, as (field, message) for the loader's `file:line:col` errors.
    pub(crate) fn validate(&self) -> Result<(), (String, String)> {
        let bad = |f: &str, m: &str| Err((format!("tls.auto.{f}"), m.to_owned()));
        if !(1..=1 << 20).contains(&self.max_decisions) {
            return bad("max_decisions", "must be between 1 and 1048576");
        }
        if !(1..=1 << 20).contains(&self.max_learned) {
            return bad("max_learned", "must be between 1 and 1048576");
        }
        if !(1024..=64 << 20).contains(&self.max_bundle_bytes) {
            return bad("max_bundle_bytes", "must be between 1024 and 67108864");
        }
        if self.decision_ttl.is_zero() {
            return bad("decision_ttl", "must be more than 0");
        }
        if self.learned_ttl.is_zero() {
            return bad("learned_ttl", "must be more than 0");
        }
        if let Some(p) = self.system_bundles.iter().find(|p| !p.starts_with('/')) {
            return bad("system_bundles", &format!("{p:?} is not an absolute path"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct R {
        intercept: InterceptMode,
    }

    #[test]
    fn true_false_and_auto_parse_and_anything_else_is_named() {
        let p = |s: &str| serde_yaml_ng::from_str::<R>(s).map(|r| r.intercept);
        assert_eq!(p("intercept: true").unwrap(), InterceptMode::Always);
        assert_eq!(p("intercept: false").unwrap(), InterceptMode::Splice);
        assert_eq!(p("intercept: auto").unwrap(), InterceptMode::Auto);
        let e = p("intercept: sometimes").unwrap_err().to_string();
        assert!(e.contains("true, false or \"auto\"") && e.contains("sometimes"), "{e}");
        assert!(p("intercept: 1").is_err());
    }

    #[test]
    fn serialises_back_to_what_it_read() {
        for (m, s) in [(InterceptMode::Always, "true"), (InterceptMode::Splice, "false"), (InterceptMode::Auto, "auto")]
        {
            assert_eq!(serde_yaml_ng::to_string(&m).unwrap().trim(), s);
        }
    }
}
