//! The pod watch: keeps [`PodStore`] equal to the API server's view of this node's pods, with
//! workload, agent name and capture decision filled in.
//!
//! Two kube-runtime watchers run in one task: this node's pods (`fieldSelector
//! spec.nodeName=<node>`) and all namespaces (their capture label decides scope). The watchers do
//! list + watch, bookmarks, relist on 410 Gone; a backoff spaces retries after errors, which are
//! counted and logged but never end the task. The store is replaced whole after every complete
//! (re)list, so pods deleted while the watch was down disappear, and is edited in place for
//! single events. Nothing reaches the store until both initial lists are complete, so a pod is
//! never briefly captured under a namespace label that has not been read yet.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::Api;
use kube::runtime::watcher::{self, watcher, Event};
use kube::runtime::WatchStreamExt;
use kube::Client;
use tokio::sync::watch as tokio_watch;
use tokio::task::JoinHandle;

use super::ca_publish::CaPublisher;
use super::owners::{ControllerRef, OwnerResolver};
use super::pods::{agent_name, capture_decision, PodInfo, PodStore, Switch, Workload};
use crate::config::KubernetesConfig;

/// Server-side timeout of one watch request (`timeoutSeconds`); the watcher renews it.
const WATCH_TIMEOUT_SECS: u32 = 290;
/// Owner lookups in flight at once during a (re)list: bounded so a node's worth of pods does
/// not burst the API server, parallel so one slow GET does not serialise a whole relist.
const LOOKUP_CONCURRENCY: usize = 8;
/// Distinct invalid-value warnings remembered before the memory is reset.
const WARNED_MAX: usize = 4096;
/// Label carrying a Deployment pod's template hash (suffix of its ReplicaSet's name).
const TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// Counters of the watch, exported as metrics so a stuck or half-working integration (RBAC,
/// network, full store) is visible without reading logs.
#[derive(Debug, Default)]
pub struct KubeStats {
    /// Failed list/watch requests and watch error events (each retried with backoff).
    pub watch_errors: AtomicU64,
    /// Relists started after the first complete one (410 Gone, or a list retried after an
    /// error): frequent relists mean the watch cannot keep up or keeps failing.
    pub relists: AtomicU64,
    /// Times a pod could not be stored because `kubernetes.max_pods` was reached (it stays
    /// unnamed; counted per list or event, so it grows while the node stays over the limit).
    pub pods_over_limit: AtomicU64,
    /// CA ConfigMaps applied.
    pub ca_publish_ok: AtomicU64,
    /// CA ConfigMap applies that failed (retried).
    pub ca_publish_errors: AtomicU64,
    /// ReplicaSet/Job reads that failed (the workload name then is a fallback guess).
    pub owner_lookups_failed: AtomicU64,
}

/// Why the watch could not start. Only configuration problems: API errors after start are
/// retried, because the API server being briefly away must not take the node agent down.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// Neither the config nor the downward API names this node.
    #[error("kubernetes.node_name is not set and the NODE_NAME environment variable is empty")]
    NoNodeName,
    /// `kubernetes.api_server` is not a usable http(s) URL.
    #[error("kubernetes.api_server {url:?}: {reason}")]
    ApiServerUrl {
        /// The configured URL.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The in-cluster service account or kubeconfig could not be read.
    #[error("kubernetes: no usable API server configuration (in-cluster service account or kubeconfig): {0}")]
    Config(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The client could not be built from an otherwise valid configuration (TLS material).
    #[error("kubernetes: building the API client: {0}")]
    Client(#[source] kube::Error),
}

/// Start watching this node's pods into `store`; with `ca_pem` and `kubernetes.ca_configmap`
/// set, also publish the CA to captured namespaces. Returns once the client is built (not once
/// the first list arrived: see [`PodStore::synced`]); the task ends when `shutdown` turns true
/// or its sender is dropped.
pub async fn start(
    cfg: &KubernetesConfig,
    store: Arc<PodStore>,
    ca_pem: Option<String>,
    stats: Arc<KubeStats>,
    shutdown: tokio_watch::Receiver<bool>,
) -> Result<JoinHandle<()>, KubeError> {
    let node = node_name(cfg.node_name.as_deref(), std::env::var("NODE_NAME").ok())?;
    let client = build_client(cfg).await?;

    let ca_targets = match (cfg.ca_configmap.clone(), ca_pem) {
        (Some(name), Some(pem)) => {
            let (tx, rx) = tokio_watch::channel(BTreeSet::new());
            let publisher =
                CaPublisher { client: client.clone(), name, pem, timeout: cfg.request_timeout, stats: stats.clone() };
            publisher.spawn(rx, shutdown.clone());
            Some(tx)
        }
        _ => None,
    };

    let resolver = OwnerResolver::new(client.clone(), cfg.request_timeout, stats.clone());
    let state = State {
        cfg: cfg.clone(),
        store,
        stats,
        resolver,
        pods: HashMap::new(),
        pods_pending: None,
        pods_synced: false,
        ns_labels: HashMap::new(),
        ns_pending: None,
        ns_synced: false,
        warned: HashSet::new(),
        ca_targets,
    };
    tracing::info!(node = %node, "kubernetes: watching this node's pods");
    Ok(tokio::spawn(run(client, node, state, shutdown)))
}

/// The node whose pods are watched: config first, then the downward-API environment variable.
fn node_name(configured: Option<&str>, env: Option<String>) -> Result<String, KubeError> {
    configured
        .map(str::to_string)
        .or(env)
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .ok_or(KubeError::NoNodeName)
}

/// The client: an explicit `api_server` (plain http allowed, no credentials: tests and local
/// proxies such as `kubectl proxy`), else the in-cluster service account when running in a pod,
/// else kubeconfig.
async fn build_client(cfg: &KubernetesConfig) -> Result<Client, KubeError> {
    let mut config = match &cfg.api_server {
        Some(url) => {
            let bad = |reason: &str| KubeError::ApiServerUrl { url: url.to_string(), reason: reason.into() };
            if !matches!(url.scheme(), "http" | "https") {
                return Err(bad("scheme must be http or https"));
            }
            if url.host_str().is_none_or(str::is_empty) {
                return Err(bad("no host"));
            }
            let uri: http::Uri = url.as_str().trim_end_matches('/').parse().map_err(|e| bad(&format!("{e}")))?;
            kube::Config::new(uri)
        }
        None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
            kube::Config::incluster().map_err(|e| KubeError::Config(Box::new(e)))?
        }
        None => kube::Config::infer().await.map_err(|e| KubeError::Config(Box::new(e)))?,
    };
    config.connect_timeout = Some(cfg.request_timeout);
    // Watches are long polls the server ends after WATCH_TIMEOUT_SECS and feeds with bookmarks
    // meanwhile; a read silent for longer than that means a dead connection (also bounds a hung
    // list). Single GETs/PATCHes carry their own `request_timeout`.
    config.read_timeout = Some(Duration::from_secs(u64::from(WATCH_TIMEOUT_SECS) + 30));
    config.reset_reader_on_write = true;
    Client::try_from(config).map_err(KubeError::Client)
}

async fn run(client: Client, node: String, mut state: State, mut shutdown: tokio_watch::Receiver<bool>) {
    let pod_cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}")).timeout(WATCH_TIMEOUT_SECS);
    let ns_cfg = watcher::Config::default().timeout(WATCH_TIMEOUT_SECS);
    let pods = watcher(Api::<Pod>::all(client.clone()), pod_cfg).default_backoff();
    let namespaces = watcher(Api::<Namespace>::all(client), ns_cfg).default_backoff();
    let mut pods = std::pin::pin!(pods);
    let mut namespaces = std::pin::pin!(namespaces);
    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            biased;
            changed = shutdown.changed() => if changed.is_err() { break },
            Some(ev) = namespaces.next() => state.on_namespace(ev).await,
            Some(ev) = pods.next() => state.on_pod(ev).await,
        }
    }
    tracing::info!("kubernetes: pod watch stopped");
}

/// What the watcher keeps per pod: the facts read from the Pod object plus its resolved
/// workload, so a namespace relabel re-decides capture without any API call.
struct PodFacts {
    uid: String,
    namespace: String,
    name: String,
    service_account: Option<String>,
    owner: Option<ControllerRef>,
    template_hash: Option<String>,
    workload: Workload,
    /// False when the workload is a fallback guess (owner lookup failed): retried on the next
    /// event of this pod.
    workload_ok: bool,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    qos_class: Option<String>,
    host_network: bool,
    /// `status.podIPs` (none for host-network pods: they share the node's address).
    ips: Vec<std::net::IpAddr>,
}

/// The Pod fields tollgate needs, before owner resolution.
fn pod_fields(pod: Pod) -> Option<PodFacts> {
    let meta = pod.metadata;
    let uid = meta.uid.filter(|u| !u.is_empty())?;
    let namespace = meta.namespace.unwrap_or_default();
    let name = meta.name.unwrap_or_default();
    let labels = meta.labels.unwrap_or_default();
    let owner = ControllerRef::from_owner_refs(meta.owner_references.as_deref());
    let template_hash = labels.get(TEMPLATE_HASH_LABEL).cloned();
    let spec = pod.spec.unwrap_or_default();
    let host_network = spec.host_network.unwrap_or(false);
    let status = pod.status.unwrap_or_default();
    let mut ips: Vec<std::net::IpAddr> =
        status.pod_ips.unwrap_or_default().iter().filter_map(|p| p.ip.parse().ok()).collect();
    if let Some(ip) = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok()) {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    if host_network {
        ips.clear();
    }
    Some(PodFacts {
        uid,
        workload: Workload { kind: "Pod".into(), name: name.clone() },
        namespace,
        name,
        service_account: spec.service_account_name.filter(|s| !s.is_empty()),
        owner,
        template_hash,
        workload_ok: false,
        labels,
        annotations: meta.annotations.unwrap_or_default(),
        qos_class: status.qos_class,
        host_network,
        ips,
    })
}

/// The store entry for `f` under the current namespace labels; invalid annotation/label values
/// are warned about once (remembered in `warned`).
fn pod_info(
    cfg: &KubernetesConfig,
    ns_labels: &HashMap<String, Option<String>>,
    warned: &mut HashSet<String>,
    f: &PodFacts,
) -> PodInfo {
    let annotation_value = f.annotations.get(&cfg.capture_annotation).map(String::as_str);
    let annotation = Switch::annotation(annotation_value);
    let label_value = ns_labels.get(&f.namespace).and_then(|l| l.as_deref());
    let label = Switch::namespace_label(label_value);
    let capture = capture_decision(cfg, &f.namespace, label, annotation, f.host_network);
    let agent = agent_name(&cfg.agent_annotation, &f.annotations, &f.namespace, &f.workload);
    if annotation == Switch::Invalid
        && warn_once(warned, format!("pod\0{}\0{}", f.uid, annotation_value.unwrap_or_default()))
    {
        tracing::warn!(
            pod = %format_args!("{}/{}", f.namespace, f.name),
            annotation = %cfg.capture_annotation,
            value = annotation_value.unwrap_or_default(),
            "kubernetes: capture annotation must be \"true\" or \"false\"; ignored"
        );
    }
    if label == Switch::Invalid
        && warn_once(warned, format!("ns\0{}\0{}", f.namespace, label_value.unwrap_or_default()))
    {
        tracing::warn!(
            namespace = %f.namespace,
            label = %cfg.namespace_label,
            value = label_value.unwrap_or_default(),
            "kubernetes: namespace capture label must be \"enabled\" or \"disabled\"; ignored"
        );
    }
    PodInfo {
        uid: f.uid.clone(),
        namespace: f.namespace.clone(),
        name: f.name.clone(),
        service_account: f.service_account.clone(),
        workload: f.workload.clone(),
        labels: f.labels.clone(),
        annotations: f.annotations.clone(),
        qos_class: f.qos_class.clone(),
        capture,
        agent,
        ips: f.ips.clone(),
    }
}

fn warn_once(warned: &mut HashSet<String>, key: String) -> bool {
    if warned.len() >= WARNED_MAX {
        warned.clear();
    }
    warned.insert(key)
}

struct State {
    cfg: KubernetesConfig,
    store: Arc<PodStore>,
    stats: Arc<KubeStats>,
    resolver: OwnerResolver,
    /// Every pod of this node by UID (the store may hold fewer: `max_pods`).
    pods: HashMap<String, PodFacts>,
    /// Pods of a (re)list in progress (between `Init` and `InitDone`).
    pods_pending: Option<Vec<Pod>>,
    pods_synced: bool,
    /// Namespace → value of `namespace_label` (None: unlabelled).
    ns_labels: HashMap<String, Option<String>>,
    ns_pending: Option<HashMap<String, Option<String>>>,
    ns_synced: bool,
    /// Invalid annotation/label values already warned about.
    warned: HashSet<String>,
    ca_targets: Option<tokio_watch::Sender<BTreeSet<String>>>,
}

impl State {
    fn ready(&self) -> bool {
        self.pods_synced && self.ns_synced
    }

    async fn on_pod(&mut self, ev: Result<Event<Pod>, watcher::Error>) {
        match ev {
            Err(e) => self.watch_error("pods", &e),
            Ok(Event::Init) => {
                if self.pods_synced {
                    self.stats.relists.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("kubernetes: relisting pods");
                }
                self.pods_pending = Some(Vec::new());
            }
            Ok(Event::InitApply(pod)) => self.pods_pending.get_or_insert_with(Vec::new).push(pod),
            Ok(Event::InitDone) => {
                let listed = self.pods_pending.take().unwrap_or_default();
                let facts = stream::iter(listed.into_iter().filter_map(pod_fields))
                    .map(|f| self.resolve(f))
                    .buffer_unordered(LOOKUP_CONCURRENCY)
                    .collect::<Vec<_>>()
                    .await;
                self.pods = facts.into_iter().map(|f| (f.uid.clone(), f)).collect();
                self.pods_synced = true;
                tracing::info!(pods = self.pods.len(), "kubernetes: pod list complete");
                self.publish_all();
            }
            Ok(Event::Apply(pod)) => {
                let Some(facts) = pod_fields(pod) else { return };
                let facts = self.resolve(facts).await;
                let uid = facts.uid.clone();
                self.pods.insert(uid.clone(), facts);
                if self.ready() {
                    if let Some(f) = self.pods.get(&uid) {
                        let info = pod_info(&self.cfg, &self.ns_labels, &mut self.warned, f);
                        if !self.store.upsert(info) {
                            self.stats.pods_over_limit.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    self.update_ca_targets();
                }
            }
            Ok(Event::Delete(pod)) => {
                let Some(uid) = pod.metadata.uid else { return };
                self.pods.remove(&uid);
                if self.ready() {
                    self.store.remove(&uid);
                    self.update_ca_targets();
                }
            }
        }
    }

    async fn on_namespace(&mut self, ev: Result<Event<Namespace>, watcher::Error>) {
        let label_of = |ns: &Namespace, key: &str| -> Option<(String, Option<String>)> {
            let name = ns.metadata.name.clone()?;
            Some((name, ns.metadata.labels.as_ref().and_then(|l| l.get(key).cloned())))
        };
        match ev {
            Err(e) => self.watch_error("namespaces", &e),
            Ok(Event::Init) => {
                if self.ns_synced {
                    self.stats.relists.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("kubernetes: relisting namespaces");
                }
                self.ns_pending = Some(HashMap::new());
            }
            Ok(Event::InitApply(ns)) => {
                if let Some((name, label)) = label_of(&ns, &self.cfg.namespace_label) {
                    self.ns_pending.get_or_insert_with(HashMap::new).insert(name, label);
                }
            }
            Ok(Event::InitDone) => {
                self.ns_labels = self.ns_pending.take().unwrap_or_default();
                self.ns_synced = true;
                self.publish_all();
            }
            Ok(Event::Apply(ns)) => {
                let Some((name, label)) = label_of(&ns, &self.cfg.namespace_label) else { return };
                if self.ns_labels.get(&name) != Some(&label) {
                    self.ns_labels.insert(name.clone(), label);
                    self.reevaluate(&name);
                }
            }
            Ok(Event::Delete(ns)) => {
                if let Some(name) = ns.metadata.name {
                    if self.ns_labels.remove(&name).is_some() {
                        self.reevaluate(&name);
                    }
                }
            }
        }
    }

    fn watch_error(&self, what: &str, e: &watcher::Error) {
        self.stats.watch_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "kubernetes: {what} watch error; retrying with backoff");
    }

    /// Fill in the workload: kept from the previous version of the pod when its controller is
    /// unchanged and was resolved, else looked up (owner cache first).
    async fn resolve(&self, mut facts: PodFacts) -> PodFacts {
        if let Some(old) = self.pods.get(&facts.uid) {
            if old.workload_ok && old.owner == facts.owner {
                facts.workload = old.workload.clone();
                facts.workload_ok = true;
                return facts;
            }
        }
        let (workload, ok) = self
            .resolver
            .resolve(&facts.namespace, &facts.name, facts.owner.as_ref(), facts.template_hash.as_deref())
            .await;
        facts.workload = workload;
        facts.workload_ok = ok;
        facts
    }

    /// Replace the store with every pod (after a complete pod or namespace list).
    fn publish_all(&mut self) {
        if !self.ready() {
            return;
        }
        let infos: Vec<PodInfo> =
            self.pods.values().map(|f| pod_info(&self.cfg, &self.ns_labels, &mut self.warned, f)).collect();
        let over = infos.len().saturating_sub(self.cfg.max_pods);
        if over > 0 {
            self.stats.pods_over_limit.fetch_add(over as u64, Ordering::Relaxed);
            tracing::warn!(max = self.cfg.max_pods, over, "kubernetes: more pods than kubernetes.max_pods");
        }
        self.store.replace_all(infos);
        self.update_ca_targets();
    }

    /// Re-decide capture for the pods of one namespace (its label changed).
    fn reevaluate(&mut self, namespace: &str) {
        if !self.ready() {
            return;
        }
        for f in self.pods.values().filter(|f| f.namespace == namespace) {
            let info = pod_info(&self.cfg, &self.ns_labels, &mut self.warned, f);
            if !self.store.upsert(info) {
                self.stats.pods_over_limit.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.update_ca_targets();
    }

    /// Namespaces that get the CA: those with a captured pod on this node, and those labelled
    /// `enabled` (so a pod starting there finds the ConfigMap already present).
    fn update_ca_targets(&self) {
        let Some(tx) = &self.ca_targets else { return };
        let mut wanted: BTreeSet<String> = self
            .ns_labels
            .iter()
            .filter(|(_, l)| Switch::namespace_label(l.as_deref()) == Switch::On)
            .map(|(n, _)| n.clone())
            .collect();
        for p in self.store.snapshot() {
            if p.capture && !wanted.contains(&p.namespace) {
                wanted.insert(p.namespace.clone());
            }
        }
        tx.send_if_modified(|cur| {
            if *cur == wanted {
                false
            } else {
                *cur = wanted;
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_name_sources() {
        assert_eq!(node_name(Some("n1"), Some("n2".into())).ok(), Some("n1".into()));
        assert_eq!(node_name(None, Some("n2".into())).ok(), Some("n2".into()));
        assert!(matches!(node_name(None, None), Err(KubeError::NoNodeName)));
        assert!(matches!(node_name(None, Some("  ".into())), Err(KubeError::NoNodeName)));
        let msg = KubeError::NoNodeName.to_string();
        assert!(msg.contains("kubernetes.node_name"), "{msg}");
    }

    #[tokio::test]
    async fn bad_api_server_urls_fail_fast() {
        for url in ["ftp://example.com", "unix:/var/run/k8s.sock"] {
            let cfg = KubernetesConfig {
                api_server: Some(url::Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))),
                ..KubernetesConfig::default()
            };
            let err = build_client(&cfg).await.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("kubernetes.api_server"), "{url}: {err}");
        }
        let cfg = KubernetesConfig {
            api_server: Some(url::Url::parse("http://127.0.0.1:1").unwrap_or_else(|e| panic!("{e}"))),
            ..KubernetesConfig::default()
        };
        assert!(build_client(&cfg).await.is_ok());
    }
}
