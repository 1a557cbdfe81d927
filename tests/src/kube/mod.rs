//! An in-process mock of the Kubernetes API server, for testing tollgate's pod watcher without a
//! cluster. It speaks the real wire format of the parts tollgate uses:
//!
//! * lists (`GET /api/v1/pods`, `/api/v1/namespaces`, namespaced forms): `{"kind":"PodList",
//!   "apiVersion":"v1","metadata":{"resourceVersion":..},"items":[..]}`, items without
//!   kind/apiVersion; `limit`/`continue` paging (`remainingItemCount`), `fieldSelector`
//!   (`spec.nodeName`, `metadata.name`, `metadata.namespace`, `status.phase`; others 400);
//! * watches (`?watch=true`): chunked newline-delimited `{"type":..,"object":..}` events,
//!   `ADDED`/`MODIFIED`/`DELETED` replayed from history after the given `resourceVersion`,
//!   synthetic `ADDED`s for `resourceVersion` absent/`0`, `sendInitialEvents` with the
//!   `k8s.io/initial-events-end` bookmark, periodic `BOOKMARK`s with `allowWatchBookmarks`,
//!   `timeoutSeconds`; a resourceVersion older than the last [`MockKube::expire`] gets HTTP 200
//!   and an `ERROR` event carrying a 410 `Expired` Status, as the real watch cache answers;
//! * `GET` of single objects (also `as=PartialObjectMetadata`), 404 `NotFound` Status bodies;
//! * server-side apply of ConfigMaps (`PATCH` `application/apply-patch+yaml`, `fieldManager`
//!   required, 201 on create, 404 when the namespace does not exist).
//!
//! Every object gets a cluster-wide, monotonically increasing `metadata.resourceVersion`.
//! Plain HTTP, no authentication.

mod fixtures;
mod server;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;

pub use fixtures::{fake_uid, job_json, namespace_json, pod_json, replicaset_json, PodFixture};

/// Which collection an object or watch belongs to (the two tollgate watches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Res {
    Pods,
    Namespaces,
}

/// One change, kept so a watch resuming from a resourceVersion gets what it missed.
pub(crate) struct Change {
    pub rv: u64,
    pub res: Res,
    pub typ: &'static str,
    pub object: Value,
}

/// An open watch stream.
pub(crate) struct Sub {
    pub id: u64,
    pub res: Res,
    pub namespace: Option<String>,
    pub selector: server::FieldSelector,
    pub tx: mpsc::UnboundedSender<Bytes>,
}

/// Everything the server holds; one lock, so event order equals resourceVersion order.
pub(crate) struct State {
    pub rv: u64,
    /// Watches from a resourceVersion below this get 410 Expired.
    pub compacted: u64,
    pub pods: BTreeMap<(String, String), Value>,
    pub namespaces: BTreeMap<String, Value>,
    pub replicasets: BTreeMap<(String, String), Value>,
    pub jobs: BTreeMap<(String, String), Value>,
    pub configmaps: BTreeMap<(String, String), Value>,
    pub history: Vec<Change>,
    pub subs: Vec<Sub>,
    pub next_sub: u64,
    pub requests: Vec<String>,
    /// Server-side cap on list page size (real servers may return fewer items than `limit`).
    pub page_limit: Option<usize>,
    /// Continue token → (snapshot resourceVersion, items still to serve).
    pub continues: HashMap<String, (u64, Vec<Value>)>,
    pub next_continue: u64,
    pub bookmark_every: Duration,
    pub paused: bool,
}

impl State {
    fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Record a change and send it to every matching open watch.
    fn emit(&mut self, res: Res, typ: &'static str, object: Value) {
        let rv = self.rv;
        let line = server::event_line(typ, &object);
        self.subs.retain(|s| {
            if s.res != res || !server::sub_matches(s, &object) {
                return true;
            }
            s.tx.send(line.clone()).is_ok()
        });
        self.history.push(Change { rv, res, typ, object });
    }
}

pub(crate) struct Shared {
    pub state: Mutex<State>,
    /// Flipped by [`MockKube::pause_watches`]; held watch requests wait on it.
    pub paused: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running mock (its own thread and tokio runtime, so sync tests can drive it). Stops on
/// drop.
pub struct MockKube {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MockKube {
    /// Start on a free port of 127.0.0.1.
    pub fn start() -> MockKube {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 100,
                compacted: 0,
                pods: BTreeMap::new(),
                namespaces: BTreeMap::new(),
                replicasets: BTreeMap::new(),
                jobs: BTreeMap::new(),
                configmaps: BTreeMap::new(),
                history: Vec::new(),
                subs: Vec::new(),
                next_sub: 1,
                requests: Vec::new(),
                page_limit: None,
                continues: HashMap::new(),
                next_continue: 1,
                bookmark_every: Duration::from_secs(1),
                paused: false,
            }),
            paused: tokio::sync::watch::channel(false).0,
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind mock kube");
        let addr = listener.local_addr().expect("local addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("mock-kube".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("mock kube runtime");
                rt.block_on(server::serve(listener, sh, stopped));
            })
            .expect("spawn mock kube");
        MockKube { addr, shared, stop: Some(stop), thread: Some(thread) }
    }

    /// Base URL (`http://127.0.0.1:PORT`) for `kubernetes.api_server`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// Create a pod (as produced by [`pod_json`]); `metadata.resourceVersion` and, when absent,
    /// `uid`/`creationTimestamp` are set as the server would. Emits `ADDED`.
    pub fn add_pod(&self, mut pod: Value) {
        let mut st = self.shared.lock();
        let rv = st.bump();
        let key = obj_key(&pod);
        stamp(&mut pod, rv, "Pod", "v1");
        st.pods.insert(key, pod.clone());
        st.emit(Res::Pods, "ADDED", pod);
    }

    /// Replace an existing pod (same namespace/name; uid kept). Emits `MODIFIED`.
    pub fn update_pod(&self, mut pod: Value) {
        let mut st = self.shared.lock();
        let key = obj_key(&pod);
        let Some(old) = st.pods.get(&key) else { panic!("update_pod: no pod {}/{}", key.0, key.1) };
        let uid = old["metadata"]["uid"].clone();
        let created = old["metadata"]["creationTimestamp"].clone();
        pod["metadata"]["uid"] = uid;
        pod["metadata"]["creationTimestamp"] = created;
        let rv = st.bump();
        stamp(&mut pod, rv, "Pod", "v1");
        st.pods.insert(key, pod.clone());
        st.emit(Res::Pods, "MODIFIED", pod);
    }

    /// Delete a pod. Emits `DELETED` with its last state at a new resourceVersion.
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let mut st = self.shared.lock();
        let Some(mut pod) = st.pods.remove(&(namespace.to_string(), name.to_string())) else {
            panic!("delete_pod: no pod {namespace}/{name}")
        };
        let rv = st.bump();
        stamp(&mut pod, rv, "Pod", "v1");
        st.emit(Res::Pods, "DELETED", pod);
    }

    /// Create a namespace with `labels` (plus `kubernetes.io/metadata.name`, as the real server
    /// adds). Emits `ADDED`.
    pub fn add_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let mut st = self.shared.lock();
        let rv = st.bump();
        let mut ns = namespace_json(name, labels);
        stamp(&mut ns, rv, "Namespace", "v1");
        st.namespaces.insert(name.to_string(), ns.clone());
        st.emit(Res::Namespaces, "ADDED", ns);
    }

    /// Replace a namespace's labels (`kubernetes.io/metadata.name` kept). Emits `MODIFIED`.
    pub fn set_namespace_labels(&self, name: &str, labels: &[(&str, &str)]) {
        let mut st = self.shared.lock();
        let Some(old) = st.namespaces.get(name).cloned() else { panic!("set_namespace_labels: no namespace {name}") };
        let mut ns = namespace_json(name, labels);
        ns["metadata"]["uid"] = old["metadata"]["uid"].clone();
        ns["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"].clone();
        let rv = st.bump();
        stamp(&mut ns, rv, "Namespace", "v1");
        st.namespaces.insert(name.to_string(), ns.clone());
        st.emit(Res::Namespaces, "MODIFIED", ns);
    }

    /// Store a ReplicaSet (from [`replicaset_json`]) for `GET .../replicasets/{name}`.
    pub fn add_replicaset(&self, mut rs: Value) {
        let mut st = self.shared.lock();
        let rv = st.bump();
        let key = obj_key(&rs);
        stamp(&mut rs, rv, "ReplicaSet", "apps/v1");
        st.replicasets.insert(key, rs);
    }

    /// Store a Job (from [`job_json`]) for `GET .../jobs/{name}`.
    pub fn add_job(&self, mut job: Value) {
        let mut st = self.shared.lock();
        let rv = st.bump();
        let key = obj_key(&job);
        stamp(&mut job, rv, "Job", "batch/v1");
        st.jobs.insert(key, job);
    }

    /// Every ConfigMap applied so far: `(namespace, name, object)`, sorted.
    pub fn configmaps(&self) -> Vec<(String, String, Value)> {
        self.shared.lock().configmaps.iter().map(|((ns, n), v)| (ns.clone(), n.clone(), v.clone())).collect()
    }

    /// Every request received, as `METHOD path?query`, in arrival order.
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// Number of watch streams currently open.
    pub fn open_watches(&self) -> usize {
        let mut st = self.shared.lock();
        st.subs.retain(|s| !s.tx.is_closed());
        st.subs.len()
    }

    /// Close every open watch stream (the client sees a clean end of stream and re-watches from
    /// its last resourceVersion).
    pub fn drop_watches(&self) {
        self.shared.lock().subs.clear();
    }

    /// Close every open watch and hold new watch requests (not lists or gets) until
    /// [`resume_watches`](Self::resume_watches): the client is disconnected while the test
    /// changes things.
    pub fn pause_watches(&self) {
        let mut st = self.shared.lock();
        st.paused = true;
        st.subs.clear();
        self.shared.paused.send_replace(true);
    }

    /// Let held and new watch requests through.
    pub fn resume_watches(&self) {
        self.shared.lock().paused = false;
        self.shared.paused.send_replace(false);
    }

    /// Compact history: a watch from any resourceVersion older than the current one gets an
    /// `ERROR` event with a 410 `Expired` Status (the client must relist). Open watches are
    /// closed so clients that are behind find out.
    pub fn expire(&self) {
        let mut st = self.shared.lock();
        st.compacted = st.rv;
        st.history.clear();
        st.continues.clear();
        st.subs.clear();
    }

    /// Cap list pages at `n` items whatever `limit` the client asks (exercises `continue`).
    pub fn set_page_limit(&self, n: Option<usize>) {
        self.shared.lock().page_limit = n;
    }

    /// How often open watches with `allowWatchBookmarks=true` get a `BOOKMARK` (default 1 s).
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.shared.lock().bookmark_every = every;
    }
}

impl Drop for MockKube {
    fn drop(&mut self) {
        self.shared.lock().subs.clear();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `(namespace, name)` of an object.
fn obj_key(obj: &Value) -> (String, String) {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (s(&obj["metadata"]["namespace"]), s(&obj["metadata"]["name"]))
}

/// Set what the server owns: kind/apiVersion, resourceVersion, and uid/creationTimestamp when
/// the fixture left them out.
fn stamp(obj: &mut Value, rv: u64, kind: &str, api_version: &str) {
    obj["kind"] = json!(kind);
    obj["apiVersion"] = json!(api_version);
    let meta = &mut obj["metadata"];
    meta["resourceVersion"] = json!(rv.to_string());
    if meta["uid"].as_str().is_none_or(str::is_empty) {
        let seed =
            format!("{kind}/{}/{}", meta["namespace"].as_str().unwrap_or(""), meta["name"].as_str().unwrap_or(""));
        meta["uid"] = json!(fake_uid(&seed));
    }
    if meta["creationTimestamp"].is_null() {
        meta["creationTimestamp"] = json!("2026-01-05T09:30:00Z");
    }
}
