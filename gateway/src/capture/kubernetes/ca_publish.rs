//! Hands the interception CA to captured namespaces: a ConfigMap (key `ca.crt`) that pods mount
//! to trust tollgate's minted certificates without any image change. Written with server-side
//! apply under field manager `tollgate`, forced, so every node's agent can write the same object
//! concurrently (the CA comes from one cluster-wide Secret: every apply is identical).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::watch::KubeStats;

/// Field manager of every apply (visible in `managedFields`, and what `force` takes over with).
pub const FIELD_MANAGER: &str = "tollgate";
/// Label marking the ConfigMap as tollgate's, so operators can find and clean them up.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "tollgate");
/// Key of the PEM certificate in the ConfigMap's `data`.
pub const CA_KEY: &str = "ca.crt";

const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Why one apply failed; logged and retried with backoff, never fatal.
#[derive(Debug, thiserror::Error)]
pub enum CaPublishError {
    /// The API server refused (403 missing RBAC, 404 namespace gone, ...).
    #[error("applying ConfigMap {namespace}/{name}: {source}")]
    Api {
        /// Target namespace.
        namespace: String,
        /// ConfigMap name.
        name: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// No answer within `kubernetes.request_timeout`.
    #[error("applying ConfigMap {namespace}/{name}: no answer within {timeout:?}")]
    Timeout {
        /// Target namespace.
        namespace: String,
        /// ConfigMap name.
        name: String,
        /// The timeout that passed.
        timeout: Duration,
    },
}

/// The apply body: only the fields tollgate owns, so other managers' fields (e.g. extra keys
/// someone added) are left alone by server-side apply.
pub fn configmap_body(name: &str, namespace: &str, pem: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": { MANAGED_BY.0: MANAGED_BY.1 },
        },
        "data": { CA_KEY: pem },
    })
}

/// Everything the publisher task needs; built by the watcher, which feeds it the set of target
/// namespaces (captured pods' namespaces plus namespaces labelled `enabled`).
pub struct CaPublisher {
    /// API client.
    pub client: Client,
    /// ConfigMap name (`kubernetes.ca_configmap`).
    pub name: String,
    /// PEM of the interception CA certificate.
    pub pem: String,
    /// Timeout of one apply.
    pub timeout: Duration,
    /// Counters `ca_publish_ok` / `ca_publish_errors`.
    pub stats: Arc<KubeStats>,
}

impl CaPublisher {
    /// Run until `targets`' sender is dropped or `shutdown` turns true: apply the ConfigMap once
    /// per namespace per process (a namespace seen again is not re-applied), retrying each
    /// failed namespace with its own exponential backoff so one forbidden namespace does not
    /// delay the others.
    pub fn spawn(
        self,
        mut targets: watch::Receiver<BTreeSet<String>>,
        mut shutdown: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut applied: HashSet<String> = HashSet::new();
            // namespace → (current backoff, earliest next attempt)
            let mut failing: HashMap<String, (Duration, Instant)> = HashMap::new();
            loop {
                if *shutdown.borrow() {
                    return;
                }
                let wanted: Vec<String> =
                    targets.borrow_and_update().iter().filter(|ns| !applied.contains(*ns)).cloned().collect();
                failing.retain(|ns, _| wanted.contains(ns));
                let mut next_retry: Option<Instant> = None;
                for ns in wanted {
                    let now = Instant::now();
                    if let Some(&(_, at)) = failing.get(&ns) {
                        if at > now {
                            next_retry = Some(next_retry.map_or(at, |n| n.min(at)));
                            continue;
                        }
                    }
                    match self.apply(&ns).await {
                        Ok(()) => {
                            self.stats.ca_publish_ok.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(namespace = %ns, configmap = %self.name, "kubernetes: CA published");
                            failing.remove(&ns);
                            applied.insert(ns);
                        }
                        Err(e) => {
                            self.stats.ca_publish_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(error = %e, "kubernetes: CA publish failed; retrying");
                            let backoff = failing.get(&ns).map_or(RETRY_MIN, |&(b, _)| (b * 2).min(RETRY_MAX));
                            let at = Instant::now() + backoff;
                            next_retry = Some(next_retry.map_or(at, |n| n.min(at)));
                            failing.insert(ns, (backoff, at));
                        }
                    }
                }
                let retry = async {
                    match next_retry {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    changed = targets.changed() => if changed.is_err() { return },
                    changed = shutdown.changed() => if changed.is_err() { return },
                    _ = retry => {}
                }
            }
        })
    }

    async fn apply(&self, namespace: &str) -> Result<(), CaPublishError> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let body = configmap_body(&self.name, namespace, &self.pem);
        match tokio::time::timeout(self.timeout, api.patch(&self.name, &params, &Patch::Apply(&body))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(source)) => {
                Err(CaPublishError::Api { namespace: namespace.into(), name: self.name.clone(), source })
            }
            Err(_) => Err(CaPublishError::Timeout {
                namespace: namespace.into(),
                name: self.name.clone(),
                timeout: self.timeout,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_only_owned_fields() {
        let b = configmap_body("tollgate-ca", "apps", "-----BEGIN CERTIFICATE-----\n");
        assert_eq!(b["apiVersion"], "v1");
        assert_eq!(b["kind"], "ConfigMap");
        assert_eq!(b["metadata"]["name"], "tollgate-ca");
        assert_eq!(b["metadata"]["namespace"], "apps");
        assert_eq!(b["metadata"]["labels"]["app.kubernetes.io/managed-by"], "tollgate");
        assert_eq!(b["data"]["ca.crt"], "-----BEGIN CERTIFICATE-----\n");
        assert_eq!(b.as_object().map(|o| o.len()), Some(4));
    }
}
