//! The node's pods as tollgate needs them: a bounded store keyed by pod UID (the key the cgroup
//! path yields), with a generation counter so the scope syncer and CA publisher wake on change.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::watch;

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
