//! Pod → workload resolution. A pod names only its direct controller; the workload people know
//! (Deployment, CronJob) sits one level up, behind a ReplicaSet or Job. Those intermediate
//! objects are read once (metadata only) and remembered in a bounded LRU, so re-evaluating pods
//! (namespace relabel, resync, pod status churn) never costs another API call.

use std::num::NonZeroUsize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, PartialObjectMeta};
use kube::Client;
use lru::LruCache;
use parking_lot::Mutex;

use super::pods::{replicaset_fallback, Workload};
use super::watch::KubeStats;

/// Owner lookups remembered (a node runs ~110 pods of far fewer controllers).
const CACHE_SIZE: usize = 512;

/// Why one owner lookup failed. Never fatal: the caller falls back to a name-based guess and
/// retries on the pod's next event.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    /// The API server answered with an error (404 owner already gone, 403 missing RBAC, ...).
    #[error("reading {kind} {namespace}/{name}: {source}")]
    Api {
        /// `ReplicaSet` or `Job`.
        kind: &'static str,
        /// Namespace of the object.
        namespace: String,
        /// Name of the object.
        name: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
    /// No answer within `kubernetes.request_timeout`.
    #[error("reading {kind} {namespace}/{name}: no answer within {timeout:?}")]
    Timeout {
        /// `ReplicaSet` or `Job`.
        kind: &'static str,
        /// Namespace of the object.
        namespace: String,
        /// Name of the object.
        name: String,
        /// The timeout that passed.
        timeout: Duration,
    },
}

/// The controller reference of a pod (`ownerReferences[controller=true]`): what resolution
/// starts from, and what the watcher compares to decide whether a pod's workload can be kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerRef {
    /// `kind` of the owner (`ReplicaSet`, `Job`, `StatefulSet`, ...).
    pub kind: String,
    /// `name` of the owner.
    pub name: String,
}

impl ControllerRef {
    /// The controller among `refs`, if any (a pod has at most one with `controller: true`).
    pub fn from_owner_refs(refs: Option<&[OwnerReference]>) -> Option<ControllerRef> {
        refs?
            .iter()
            .find(|r| r.controller == Some(true))
            .map(|r| ControllerRef { kind: r.kind.clone(), name: r.name.clone() })
    }
}

type CacheKey = (String, &'static str, String);

/// Resolves controller references to workloads, caching ReplicaSet/Job owners per
/// `(namespace, kind, name)`. Shared by reference between concurrent lookups.
pub struct OwnerResolver {
    client: Client,
    timeout: Duration,
    /// Value: the controller of the cached object (`None`: it has none, e.g. a bare ReplicaSet).
    cache: Mutex<LruCache<CacheKey, Option<ControllerRef>>>,
    stats: Arc<KubeStats>,
}

impl OwnerResolver {
    /// A resolver using `client`, with `timeout` per GET; failures are counted in
    /// `stats.owner_lookups_failed` (so missing RBAC for replicasets/jobs is visible).
    pub fn new(client: Client, timeout: Duration, stats: Arc<KubeStats>) -> Self {
        let cap = NonZeroUsize::new(CACHE_SIZE).unwrap_or(NonZeroUsize::MIN);
        OwnerResolver { client, timeout, cache: Mutex::new(LruCache::new(cap)), stats }
    }

    /// The workload of a pod in `namespace` named `pod_name` with controller `owner` and
    /// `pod-template-hash` label `template_hash`. The flag is false when a lookup failed and the
    /// result is a fallback guess, so the caller knows to try again later.
    pub async fn resolve(
        &self,
        namespace: &str,
        pod_name: &str,
        owner: Option<&ControllerRef>,
        template_hash: Option<&str>,
    ) -> (Workload, bool) {
        let Some(owner) = owner else {
            return (Workload { kind: "Pod".into(), name: pod_name.to_string() }, true);
        };
        match owner.kind.as_str() {
            "ReplicaSet" => match self.controller_of("ReplicaSet", namespace, &owner.name).await {
                // Usually a Deployment; any other controller (e.g. an Argo Rollout) is named as
                // it is. A ReplicaSet without a controller is itself the workload.
                Ok(Some(up)) => (Workload { kind: up.kind, name: up.name }, true),
                Ok(None) => (Workload { kind: "ReplicaSet".into(), name: owner.name.clone() }, true),
                Err(e) => {
                    self.failed(&e);
                    (replicaset_fallback(&owner.name, template_hash), false)
                }
            },
            "Job" => match self.controller_of("Job", namespace, &owner.name).await {
                Ok(Some(up)) => (Workload { kind: up.kind, name: up.name }, true),
                Ok(None) => (Workload { kind: "Job".into(), name: owner.name.clone() }, true),
                Err(e) => {
                    self.failed(&e);
                    (Workload { kind: "Job".into(), name: owner.name.clone() }, false)
                }
            },
            // StatefulSet, DaemonSet and any custom controller own their pods directly.
            _ => (Workload { kind: owner.kind.clone(), name: owner.name.clone() }, true),
        }
    }

    fn failed(&self, e: &OwnerError) {
        self.stats.owner_lookups_failed.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "kubernetes: owner lookup failed; using the name-based fallback");
    }

    /// The controller of the `kind` object `namespace/name`, from the cache or one metadata GET.
    async fn controller_of(
        &self,
        kind: &'static str,
        namespace: &str,
        name: &str,
    ) -> Result<Option<ControllerRef>, OwnerError> {
        let key: CacheKey = (namespace.to_string(), kind, name.to_string());
        if let Some(hit) = self.cache.lock().get(&key) {
            return Ok(hit.clone());
        }
        let get = async {
            match kind {
                "Job" => Api::<Job>::namespaced(self.client.clone(), namespace)
                    .get_metadata(name)
                    .await
                    .map(|m: PartialObjectMeta<Job>| m.metadata.owner_references),
                _ => Api::<ReplicaSet>::namespaced(self.client.clone(), namespace)
                    .get_metadata(name)
                    .await
                    .map(|m: PartialObjectMeta<ReplicaSet>| m.metadata.owner_references),
            }
        };
        let refs = match tokio::time::timeout(self.timeout, get).await {
            Ok(Ok(refs)) => refs,
            Ok(Err(source)) => {
                return Err(OwnerError::Api { kind, namespace: namespace.into(), name: name.into(), source })
            }
            Err(_) => {
                return Err(OwnerError::Timeout {
                    kind,
                    namespace: namespace.into(),
                    name: name.into(),
                    timeout: self.timeout,
                })
            }
        };
        let up = ControllerRef::from_owner_refs(refs.as_deref());
        self.cache.lock().put(key, up.clone());
        Ok(up)
    }
}
