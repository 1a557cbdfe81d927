//! The node's pods as tollgate needs them: a bounded store keyed by pod UID (the key the cgroup
//! path yields), with a generation counter so the scope syncer and CA publisher wake on change.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::watch;

use crate::config::{KubernetesConfig, PodCaptureMode};

/// The controller that owns a pod, resolved through ReplicaSet → Deployment and Job → CronJob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, `CronJob`, `ReplicaSet`, or `Pod` for a
    /// bare pod.
    pub kind: String,
    /// Name of the controller (the pod name for a bare pod).
    pub name: String,
}

/// What tollgate knows about one pod on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// `metadata.uid`.
    pub uid: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `spec.serviceAccountName`.
    pub service_account: Option<String>,
    /// Owner workload.
    pub workload: Workload,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
    /// `status.qosClass` (`Guaranteed`, `Burstable`, `BestEffort`).
    pub qos_class: Option<String>,
    /// Captured, per namespace label, pod annotation and mode.
    pub capture: bool,
    /// Agent name: the agent annotation, else `namespace/workload-name`.
    pub agent: Arc<str>,
    /// Pod addresses (`status.podIPs`; empty for host-network pods), so a connection's
    /// destination can name the pod it reaches (the callee of an A2A hop).
    pub ips: Vec<std::net::IpAddr>,
}

/// Pods of this node by UID. Readers (connection identity, scope sync) take a read lock for a
/// map lookup; the watcher replaces whole entries. Bounded by `kubernetes.max_pods`.
pub struct PodStore {
    max: usize,
    pods: RwLock<HashMap<String, Arc<PodInfo>>>,
    /// Bumped on every change; `synced` becomes true after the first complete list.
    generation: watch::Sender<(u64, bool)>,
}

impl PodStore {
    /// An empty store holding at most `max` pods.
    pub fn new(max: usize) -> Self {
        PodStore { max, pods: RwLock::new(HashMap::new()), generation: watch::channel((0, false)).0 }
    }

    /// The pod with this UID (dashes, as in `metadata.uid`).
    pub fn get(&self, uid: &str) -> Option<Arc<PodInfo>> {
        self.pods.read().get(uid).cloned()
    }

    /// The pod of this node that owns address `ip`, if any (a scan: a node runs a few hundred
    /// pods at most, and this runs once per A2A connection, not per request).
    pub fn by_ip(&self, ip: std::net::IpAddr) -> Option<Arc<PodInfo>> {
        self.pods.read().values().find(|p| p.ips.contains(&ip)).cloned()
    }

    /// Every pod, in no particular order.
    pub fn snapshot(&self) -> Vec<Arc<PodInfo>> {
        self.pods.read().values().cloned().collect()
    }

    /// Number of pods held.
    pub fn len(&self) -> usize {
        self.pods.read().len()
    }

    /// True when no pod is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Insert or replace a pod. `false` when the store is full and the pod is new (it stays
    /// unnamed; the caller counts it).
    pub fn upsert(&self, pod: PodInfo) -> bool {
        {
            let mut w = self.pods.write();
            if w.get(&pod.uid).is_some_and(|old| **old == pod) {
                return true;
            }
            if !w.contains_key(&pod.uid) && w.len() >= self.max {
                return false;
            }
            w.insert(pod.uid.clone(), Arc::new(pod));
        }
        self.bump(None);
        true
    }

    /// Drop a deleted pod.
    pub fn remove(&self, uid: &str) {
        if self.pods.write().remove(uid).is_some() {
            self.bump(None);
        }
    }

    /// Replace everything after a (re)list: pods absent from `pods` were deleted while the
    /// watch was down. Marks the store synced.
    pub fn replace_all(&self, pods: Vec<PodInfo>) {
        {
            let mut w = self.pods.write();
            w.clear();
            for p in pods.into_iter().take(self.max) {
                w.insert(p.uid.clone(), Arc::new(p));
            }
        }
        self.bump(Some(true));
    }

    /// Wakes on every change: `(generation, synced)`.
    pub fn subscribe(&self) -> watch::Receiver<(u64, bool)> {
        self.generation.subscribe()
    }

    /// Has the first complete list arrived?
    pub fn synced(&self) -> bool {
        self.generation.borrow().1
    }

    fn bump(&self, synced: Option<bool>) {
        self.generation.send_modify(|(g, s)| {
            *g += 1;
            if let Some(v) = synced {
                *s = v;
            }
        });
    }
}

/// A `"true"`/`"false"`-style switch read from a pod annotation or namespace label. Kept as its
/// own type so the watcher can tell a typo (`Invalid`, logged once) from an absent key, while the
/// capture decision treats both the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Switch {
    /// The key holds the "on" value.
    On,
    /// The key holds the "off" value.
    Off,
    /// The key is not set.
    Absent,
    /// The key holds something else: ignored (as if absent) so a typo never flips capture.
    Invalid,
}

impl Switch {
    /// Read `value` against the two accepted spellings (exact match, as Kubernetes users write
    /// them; no case folding so `"True"` is reported rather than silently accepted).
    pub fn parse(value: Option<&str>, on: &str, off: &str) -> Switch {
        match value {
            None => Switch::Absent,
            Some(v) if v == on => Switch::On,
            Some(v) if v == off => Switch::Off,
            Some(_) => Switch::Invalid,
        }
    }

    /// The pod annotation form: `"true"` / `"false"`.
    pub fn annotation(value: Option<&str>) -> Switch {
        Switch::parse(value, "true", "false")
    }

    /// The namespace label form: `enabled` / `disabled`.
    pub fn namespace_label(value: Option<&str>) -> Switch {
        Switch::parse(value, "enabled", "disabled")
    }

    fn decided(self) -> Option<bool> {
        match self {
            Switch::On => Some(true),
            Switch::Off => Some(false),
            Switch::Absent | Switch::Invalid => None,
        }
    }
}

/// Whether a pod is captured. One pure function so every path (initial list, pod event,
/// namespace relabel) decides identically, in this order:
///
/// 1. Host-network pods (`spec.hostNetwork: true`) never are: they share the node's network
///    namespace, so capturing them by pod scope would redirect node traffic; the node's own
///    cgroup rules govern them instead.
/// 2. The pod annotation (`"true"`/`"false"`) wins.
/// 3. Else the namespace label (`enabled`/`disabled`) wins.
/// 4. Else `all` mode captures unless the namespace is in `exclude_namespaces`; `opt_in` mode
///    does not capture.
///
/// Invalid annotation/label values count as absent.
pub fn capture_decision(
    cfg: &KubernetesConfig,
    namespace: &str,
    namespace_label: Switch,
    pod_annotation: Switch,
    host_network: bool,
) -> bool {
    if host_network {
        return false;
    }
    if let Some(v) = pod_annotation.decided() {
        return v;
    }
    if let Some(v) = namespace_label.decided() {
        return v;
    }
    match cfg.capture {
        PodCaptureMode::All => !cfg.exclude_namespaces.iter().any(|n| n == namespace),
        PodCaptureMode::OptIn => false,
    }
}

/// The agent name a pod's connections are reported under: the agent annotation when set (so
/// teams can name an agent independently of its Deployment), else `namespace/workload` — stable
/// across pod restarts and rollouts, unlike the pod name.
pub fn agent_name(
    agent_annotation: &str,
    annotations: &BTreeMap<String, String>,
    namespace: &str,
    workload: &Workload,
) -> Arc<str> {
    match annotations.get(agent_annotation).map(|v| v.trim()) {
        Some(v) if !v.is_empty() => Arc::from(v),
        _ => Arc::from(format!("{namespace}/{}", workload.name)),
    }
}

/// The workload of a pod whose controller is a ReplicaSet that could not be read (404, 403,
/// timeout): a Deployment's ReplicaSet is named `<deployment>-<pod-template-hash>` and the pod
/// carries that hash as a label, so stripping it names the Deployment without an API call. A
/// ReplicaSet without the matching suffix is reported as itself.
pub fn replicaset_fallback(replicaset: &str, pod_template_hash: Option<&str>) -> Workload {
    if let Some(hash) = pod_template_hash.filter(|h| !h.is_empty()) {
        if let Some(base) = replicaset.strip_suffix(hash).and_then(|s| s.strip_suffix('-')) {
            if !base.is_empty() {
                return Workload { kind: "Deployment".into(), name: base.to_string() };
            }
        }
    }
    Workload { kind: "ReplicaSet".into(), name: replicaset.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: PodCaptureMode) -> KubernetesConfig {
        KubernetesConfig { capture: mode, ..KubernetesConfig::default() }
    }

    #[test]
    fn switch_parsing() {
        assert_eq!(Switch::annotation(Some("true")), Switch::On);
        assert_eq!(Switch::annotation(Some("false")), Switch::Off);
        assert_eq!(Switch::annotation(None), Switch::Absent);
        assert_eq!(Switch::annotation(Some("True")), Switch::Invalid);
        assert_eq!(Switch::annotation(Some("")), Switch::Invalid);
        assert_eq!(Switch::namespace_label(Some("enabled")), Switch::On);
        assert_eq!(Switch::namespace_label(Some("disabled")), Switch::Off);
        assert_eq!(Switch::namespace_label(Some("true")), Switch::Invalid);
    }

    #[test]
    fn capture_decision_table() {
        use PodCaptureMode::{All, OptIn};
        use Switch::{Absent, Invalid, Off, On};
        // (mode, namespace, namespace label, pod annotation, host network, expected)
        let cases: &[(PodCaptureMode, &str, Switch, Switch, bool, bool)] = &[
            (All, "apps", Absent, Absent, false, true),
            (All, "kube-system", Absent, Absent, false, false),
            (All, "kube-system", On, Absent, false, true),
            (All, "kube-system", Absent, On, false, true),
            (All, "apps", Off, Absent, false, false),
            (All, "apps", Off, On, false, true),
            (All, "apps", On, Off, false, false),
            (All, "apps", Absent, Off, false, false),
            (All, "apps", Invalid, Absent, false, true),
            (All, "apps", Off, Invalid, false, false),
            (All, "apps", Absent, Absent, true, false),
            (All, "apps", On, On, true, false),
            (OptIn, "apps", Absent, Absent, false, false),
            (OptIn, "apps", On, Absent, false, true),
            (OptIn, "apps", Absent, On, false, true),
            (OptIn, "apps", On, Off, false, false),
            (OptIn, "apps", Invalid, Invalid, false, false),
            (OptIn, "kube-system", On, Absent, false, true),
            (OptIn, "apps", On, On, true, false),
        ];
        for (i, &(mode, ns, label, ann, host, want)) in cases.iter().enumerate() {
            assert_eq!(capture_decision(&cfg(mode), ns, label, ann, host), want, "case {i}: {:?}", cases[i]);
        }
    }

    #[test]
    fn agent_names() {
        let deploy = Workload { kind: "Deployment".into(), name: "chat".into() };
        let bare = Workload { kind: "Pod".into(), name: "debug-shell".into() };
        let ann = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let key = "tollgate.io/agent";
        let cases: &[(BTreeMap<String, String>, &str, &Workload, &str)] = &[
            (ann(&[]), "apps", &deploy, "apps/chat"),
            (ann(&[(key, "billing-bot")]), "apps", &deploy, "billing-bot"),
            (ann(&[(key, "  billing-bot ")]), "apps", &deploy, "billing-bot"),
            (ann(&[(key, "")]), "apps", &deploy, "apps/chat"),
            (ann(&[(key, "   ")]), "apps", &deploy, "apps/chat"),
            (ann(&[("other/agent", "x")]), "team-a", &bare, "team-a/debug-shell"),
        ];
        for (annotations, ns, wl, want) in cases {
            assert_eq!(&*agent_name(key, annotations, ns, wl), *want);
        }
    }

    #[test]
    fn replicaset_fallbacks() {
        let w = |k: &str, n: &str| Workload { kind: k.into(), name: n.into() };
        assert_eq!(replicaset_fallback("chat-7d9f8c6b5d", Some("7d9f8c6b5d")), w("Deployment", "chat"));
        assert_eq!(replicaset_fallback("my-app-v2-5f6d", Some("5f6d")), w("Deployment", "my-app-v2"));
        assert_eq!(replicaset_fallback("chat-7d9f8c6b5d", None), w("ReplicaSet", "chat-7d9f8c6b5d"));
        assert_eq!(replicaset_fallback("chat-7d9f8c6b5d", Some("abc")), w("ReplicaSet", "chat-7d9f8c6b5d"));
        assert_eq!(replicaset_fallback("chat7d9f", Some("7d9f")), w("ReplicaSet", "chat7d9f"));
        assert_eq!(replicaset_fallback("-7d9f", Some("7d9f")), w("ReplicaSet", "-7d9f"));
        assert_eq!(replicaset_fallback("chat-", Some("")), w("ReplicaSet", "chat-"));
    }

    #[test]
    fn store_bounds_and_replace() {
        let store = PodStore::new(1);
        let pod = |uid: &str| PodInfo {
            uid: uid.into(),
            namespace: "ns".into(),
            name: uid.into(),
            service_account: None,
            workload: Workload { kind: "Pod".into(), name: uid.into() },
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            qos_class: None,
            capture: true,
            agent: Arc::from("ns/x"),
            ips: vec![std::net::IpAddr::from([10, 0, 0, uid.len() as u8])],
        };
        assert!(!store.synced());
        assert!(store.upsert(pod("a")));
        assert!(!store.upsert(pod("b")));
        assert!(store.upsert(pod("a")));
        store.replace_all(vec![pod("c")]);
        assert!(store.synced());
        assert!(store.get("a").is_none());
        assert!(store.get("c").is_some());
        assert_eq!(store.by_ip([10, 0, 0, 1].into()).map(|p| p.uid.clone()).as_deref(), Some("c"));
        assert!(store.by_ip([10, 0, 0, 9].into()).is_none());
        store.remove("c");
        assert!(store.is_empty());
    }
}
