//! OTLP resource attributes shared by spans and pushed metrics, so a backend can tell which
//! node (and, under Kubernetes, which DaemonSet pod) reported them. The Kubernetes names come
//! from the downward API environment variables the DaemonSet sets.
//!
//! `service.instance.id` matters for pushed metrics: Prometheus' OTLP ingestion turns it into
//! the `instance` label, and without it the identical series of every node would collide.

/// `service.name` of everything tollgate exports.
pub const SERVICE_NAME: &str = "tollgate";

/// Environment variables read for Kubernetes attributes: `(attribute, variable)`.
const K8S_ENV: [(&str, &str); 3] =
    [("k8s.node.name", "NODE_NAME"), ("k8s.pod.name", "POD_NAME"), ("k8s.namespace.name", "POD_NAMESPACE")];

/// Resource attributes of this process: `service.name`, `service.version`,
/// `service.instance.id` (pod name, else node name, else host name), `host.name`, and the
/// `k8s.*` names whose variables are set.
pub fn attributes() -> Vec<(&'static str, String)> {
    let host = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
    attributes_from(&host, |k| std::env::var(k).ok())
}

fn attributes_from(host: &str, env: impl Fn(&str) -> Option<String>) -> Vec<(&'static str, String)> {
    let mut v =
        vec![("service.name", SERVICE_NAME.to_string()), ("service.version", env!("CARGO_PKG_VERSION").to_string())];
    let k8s: Vec<(&'static str, String)> =
        K8S_ENV.iter().filter_map(|(attr, var)| env(var).filter(|s| !s.is_empty()).map(|val| (*attr, val))).collect();
    let get = |attr: &str| k8s.iter().find(|(a, _)| *a == attr).map(|(_, v)| v.clone());
    let instance = get("k8s.pod.name").or_else(|| get("k8s.node.name")).unwrap_or_else(|| host.to_string());
    if !instance.is_empty() {
        v.push(("service.instance.id", instance));
    }
    if !host.is_empty() {
        v.push(("host.name", host.to_string()));
    }
    v.extend(k8s);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_names_from_downward_api_env() {
        let env = |k: &str| match k {
            "NODE_NAME" => Some("node-a".to_string()),
            "POD_NAMESPACE" => Some("tollgate-system".to_string()),
            "POD_NAME" => Some(String::new()),
            _ => None,
        };
        let attrs = attributes_from("host-1", env);
        let get = |k: &str| attrs.iter().find(|(a, _)| *a == k).map(|(_, v)| v.as_str());
        assert_eq!(get("service.name"), Some("tollgate"));
        assert_eq!(get("host.name"), Some("host-1"));
        assert_eq!(get("k8s.node.name"), Some("node-a"));
        assert_eq!(get("k8s.namespace.name"), Some("tollgate-system"));
        assert_eq!(get("k8s.pod.name"), None, "empty variables are not attributes");
        assert_eq!(get("service.instance.id"), Some("node-a"));
        let pod = attributes_from("h", |k| (k == "POD_NAME").then(|| "tollgate-x7".to_string()));
        assert!(pod.contains(&("service.instance.id", "tollgate-x7".to_string())), "{pod:?}");
        let host = attributes_from("h", |_| None);
        assert!(host.contains(&("service.instance.id", "h".to_string())), "{host:?}");
        let bare = attributes_from("", |_| None);
        assert_eq!(bare.len(), 2, "{bare:?}");
    }
}
