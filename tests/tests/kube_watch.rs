//! tollgate's Kubernetes pod watcher against the in-process mock API server
//! (`tollgate_e2e::kube::MockKube`): workload resolution, capture decisions, agent names, the
//! node field selector, live events, namespace relabels, watch reconnects, 410 relists and the CA
//! ConfigMap. No root, no cluster: `cargo test -p tollgate-e2e --test kube_watch`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tollgate::capture::kubernetes::watch::{start, KubeStats};
use tollgate::capture::kubernetes::PodStore;
use tollgate::config::KubernetesConfig;
use tollgate_e2e::kube::{job_json, replicaset_json, MockKube, PodFixture};
use tollgate_e2e::wait_for;

const NODE: &str = "node-a";
const CA_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIBdzCCAR2gAwIBAgIUTollgateTestCa\n-----END CERTIFICATE-----\n";
const WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

/// What the test checks per pod: workload kind/name, captured, agent, service account, QoS.
type Row = (String, String, bool, String, Option<String>, Option<String>);

fn view(store: &PodStore) -> BTreeMap<String, Row> {
    store
        .snapshot()
        .into_iter()
        .map(|p| {
            (
                format!("{}/{}", p.namespace, p.name),
                (
                    p.workload.kind.clone(),
                    p.workload.name.clone(),
                    p.capture,
                    p.agent.to_string(),
                    p.service_account.clone(),
                    p.qos_class.clone(),
                ),
            )
        })
        .collect()
}

fn row(kind: &str, name: &str, capture: bool, agent: &str, sa: &str, qos: &str) -> Row {
    (kind.into(), name.into(), capture, agent.into(), Some(sa.into()), Some(qos.into()))
}

fn config(mock: &MockKube, extra: serde_json::Value) -> KubernetesConfig {
    let mut v = json!({
        "enabled": true,
        "node_name": NODE,
        "api_server": mock.url(),
        "request_timeout": "2s",
    });
    if let (Some(base), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
        base.extend(extra.clone());
    }
    serde_json::from_value(v).expect("kubernetes config")
}

/// A running watcher: its runtime, store, stats and shutdown switch.
struct Watcher {
    rt: tokio::runtime::Runtime,
    store: Arc<PodStore>,
    stats: Arc<KubeStats>,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Watcher {
    fn start(cfg: &KubernetesConfig, ca: Option<&str>) -> Watcher {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        let store = Arc::new(PodStore::new(cfg.max_pods));
        let stats = Arc::new(KubeStats::default());
        let (shutdown, rx) = tokio::sync::watch::channel(false);
        let task =
            rt.block_on(start(cfg, store.clone(), ca.map(str::to_string), stats.clone(), rx)).expect("watcher starts");
        Watcher { rt, store, stats, shutdown, task: Some(task) }
    }

    /// Wait until the store equals `want` (after the first complete list).
    fn wait_view(&self, want: &BTreeMap<String, Row>, what: &str) {
        let ok = wait_for(WAIT, POLL, || (self.store.synced() && view(&self.store) == *want).then_some(()));
        if ok.is_none() {
            let got = view(&self.store);
            let missing: Vec<_> = want.iter().filter(|(k, v)| got.get(*k) != Some(v)).collect();
            let extra: Vec<_> = got.iter().filter(|(k, v)| want.get(*k) != Some(v)).collect();
            panic!("{what}: store never matched (synced={})\n want-but-not-got: {missing:#?}\n got-but-not-wanted: {extra:#?}", self.store.synced());
        }
    }

    fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let done = self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), task).await });
            assert!(matches!(done, Ok(Ok(()))), "watch task did not end on shutdown: {done:?}");
        }
    }
}

fn count(reqs: &[String], prefix: &str) -> usize {
    reqs.iter().filter(|r| r.starts_with(prefix)).count()
}

/// The cluster of the main scenario: namespaces `apps` (unlabelled), `quiet` (capture disabled),
/// `kube-system` (excluded by default); pods of every workload kind on this node, one on
/// another node.
fn populate(mock: &MockKube) {
    mock.add_namespace("apps", &[("team", "ai")]);
    mock.add_namespace("quiet", &[("tollgate.io/capture", "disabled")]);
    mock.add_namespace("kube-system", &[]);
    mock.add_replicaset(replicaset_json("apps", "chat-7d9f8c6b5d", Some("chat"), "7d9f8c6b5d"));
    mock.add_replicaset(replicaset_json("apps", "billing-6b7c8d9f5", Some("billing"), "6b7c8d9f5"));
    mock.add_job(job_json("apps", "report-29450000", Some("report")));
    let pods = [
        PodFixture::new("apps", "chat-7d9f8c6b5d-x2x9q", NODE)
            .owner("ReplicaSet", "chat-7d9f8c6b5d")
            .label("app", "chat")
            .label("pod-template-hash", "7d9f8c6b5d")
            .service_account("chat-sa")
            .qos("Burstable"),
        // Its ReplicaSet is not in the API (GET 404): the name comes from the template hash.
        PodFixture::new("apps", "search-5c8d7f9b4-h7k2m", NODE)
            .owner("ReplicaSet", "search-5c8d7f9b4")
            .label("pod-template-hash", "5c8d7f9b4"),
        PodFixture::new("apps", "vectordb-0", NODE).owner("StatefulSet", "vectordb").qos("Guaranteed"),
        PodFixture::new("kube-system", "log-agent-q8z7x", NODE).owner("DaemonSet", "log-agent"),
        PodFixture::new("apps", "report-29450000-5tq4w", NODE).owner("Job", "report-29450000"),
        PodFixture::new("apps", "debug-shell", NODE),
        PodFixture::new("apps", "legacy-batch", NODE).annotation("tollgate.io/capture", "false"),
        PodFixture::new("apps", "billing-6b7c8d9f5-m4n8p", NODE)
            .owner("ReplicaSet", "billing-6b7c8d9f5")
            .label("pod-template-hash", "6b7c8d9f5")
            .annotation("tollgate.io/agent", "billing-bot")
            .service_account("billing"),
        PodFixture::new("apps", "typo", NODE).annotation("tollgate.io/capture", "yes"),
        PodFixture::new("apps", "elsewhere", "node-b"),
        PodFixture::new("apps", "netmon-7xk2p", NODE).owner("DaemonSet", "netmon").host_network(true),
        PodFixture::new("quiet", "worker-0", NODE).owner("StatefulSet", "worker"),
        PodFixture::new("quiet", "forced", NODE).annotation("tollgate.io/capture", "true"),
    ];
    for p in pods {
        mock.add_pod(p.json());
    }
}

fn initial_view() -> BTreeMap<String, Row> {
    [
        ("apps/chat-7d9f8c6b5d-x2x9q", row("Deployment", "chat", true, "apps/chat", "chat-sa", "Burstable")),
        ("apps/search-5c8d7f9b4-h7k2m", row("Deployment", "search", true, "apps/search", "default", "BestEffort")),
        ("apps/vectordb-0", row("StatefulSet", "vectordb", true, "apps/vectordb", "default", "Guaranteed")),
        (
            "kube-system/log-agent-q8z7x",
            row("DaemonSet", "log-agent", false, "kube-system/log-agent", "default", "BestEffort"),
        ),
        ("apps/report-29450000-5tq4w", row("CronJob", "report", true, "apps/report", "default", "BestEffort")),
        ("apps/debug-shell", row("Pod", "debug-shell", true, "apps/debug-shell", "default", "BestEffort")),
        ("apps/legacy-batch", row("Pod", "legacy-batch", false, "apps/legacy-batch", "default", "BestEffort")),
        ("apps/billing-6b7c8d9f5-m4n8p", row("Deployment", "billing", true, "billing-bot", "billing", "BestEffort")),
        ("apps/typo", row("Pod", "typo", true, "apps/typo", "default", "BestEffort")),
        ("apps/netmon-7xk2p", row("DaemonSet", "netmon", false, "apps/netmon", "default", "BestEffort")),
        ("quiet/worker-0", row("StatefulSet", "worker", false, "quiet/worker", "default", "BestEffort")),
        ("quiet/forced", row("Pod", "forced", true, "quiet/forced", "default", "BestEffort")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn wait_configmaps(mock: &MockKube, want: &[&str]) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let got = wait_for(WAIT, POLL, || {
        let have: BTreeSet<String> = mock.configmaps().into_iter().map(|(ns, _, _)| ns).collect();
        (have == want).then_some(())
    });
    let have: Vec<_> = mock.configmaps().into_iter().map(|(ns, n, _)| format!("{ns}/{n}")).collect();
    assert!(got.is_some(), "CA ConfigMaps: want namespaces {want:?}, have {have:?}");
}

#[test]
fn pod_watch_end_to_end() {
    let mock = MockKube::start();
    mock.set_page_limit(Some(4));
    mock.set_bookmark_interval(Duration::from_millis(200));
    populate(&mock);
    let cfg = config(&mock, json!({}));
    let w = Watcher::start(&cfg, Some(CA_PEM));
    let mut want = initial_view();
    w.wait_view(&want, "initial list");

    // Pod addresses name the pod a connection goes to (A2A callees); host-network pods share
    // the node's address and name nobody.
    for p in w.store.snapshot() {
        if p.name == "netmon-7xk2p" {
            assert!(p.ips.is_empty(), "host-network pod has no address of its own: {:?}", p.ips);
            continue;
        }
        assert_eq!(p.ips.len(), 1, "{}: {:?}", p.name, p.ips);
        let found = w.store.by_ip(p.ips[0]).map(|q| q.uid.clone());
        assert_eq!(found.as_deref(), Some(p.uid.as_str()), "{} by its address", p.name);
    }

    // Only this node's pods were asked for, over paged lists and a bookmarked watch.
    let reqs = mock.requests();
    let pod_lists: Vec<&String> =
        reqs.iter().filter(|r| r.starts_with("GET /api/v1/pods?") && !r.contains("watch=true")).collect();
    assert!(!pod_lists.is_empty(), "no pod list in {reqs:#?}");
    for r in &pod_lists {
        assert!(r.contains("fieldSelector=spec.nodeName%3Dnode-a"), "pod list without the node selector: {r}");
    }
    assert!(pod_lists.iter().any(|r| r.contains("continue=")), "12 pods in pages of 4 need continue: {pod_lists:#?}");
    assert!(
        wait_for(WAIT, POLL, || mock
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /api/v1/pods?")
                && r.contains("watch=true")
                && r.contains("allowWatchBookmarks=true")
                && r.contains("fieldSelector=spec.nodeName%3Dnode-a"))
            .then_some(()))
        .is_some(),
        "no pod watch with the node selector and bookmarks: {:#?}",
        mock.requests()
    );
    // Each owner read once: the RS that exists, the one that 404s, the Job.
    let rs_chat = "GET /apis/apps/v1/namespaces/apps/replicasets/chat-7d9f8c6b5d";
    let job = "GET /apis/batch/v1/namespaces/apps/jobs/report-29450000";
    assert_eq!(count(&reqs, rs_chat), 1, "{reqs:#?}");
    assert_eq!(count(&reqs, job), 1, "{reqs:#?}");
    assert_eq!(count(&reqs, "GET /apis/apps/v1/namespaces/apps/replicasets/search-5c8d7f9b4"), 1);
    assert_eq!(count(&reqs, "GET /apis/apps/v1/namespaces/apps/replicasets/"), 3);
    assert_eq!(w.stats.owner_lookups_failed.load(Ordering::Relaxed), 1);

    // CA: exactly the namespaces with a captured pod (quiet has `forced`), PEM and label.
    wait_configmaps(&mock, &["apps", "quiet"]);
    for (ns, name, cm) in mock.configmaps() {
        assert_eq!(name, "tollgate-ca", "{ns}");
        assert_eq!(cm["data"]["ca.crt"], CA_PEM, "{ns}");
        assert_eq!(cm["metadata"]["labels"]["app.kubernetes.io/managed-by"], "tollgate", "{ns}");
    }
    let patches: Vec<String> = mock.requests().into_iter().filter(|r| r.starts_with("PATCH ")).collect();
    assert_eq!(patches.len(), 2, "{patches:#?}");
    for p in &patches {
        assert!(p.contains("fieldManager=tollgate") && p.contains("force=true"), "{p}");
    }

    // A pod added after start appears.
    mock.add_pod(
        PodFixture::new("apps", "new-agent", NODE)
            .owner("ReplicaSet", "chat-7d9f8c6b5d")
            .label("pod-template-hash", "7d9f8c6b5d")
            .json(),
    );
    want.insert("apps/new-agent".into(), row("Deployment", "chat", true, "apps/chat", "default", "BestEffort"));
    w.wait_view(&want, "pod added");
    // ... and a pod on another node still does not.
    mock.add_pod(PodFixture::new("apps", "elsewhere-2", "node-b").json());

    // A pod opting out by annotation update flips capture.
    mock.update_pod(PodFixture::new("apps", "debug-shell", NODE).annotation("tollgate.io/capture", "false").json());
    want.get_mut("apps/debug-shell").expect("row").2 = false;
    w.wait_view(&want, "annotation update");

    // Delete → gone.
    mock.delete_pod("apps", "debug-shell");
    want.remove("apps/debug-shell");
    w.wait_view(&want, "pod deleted");

    // Namespace relabels re-decide capture (without reading owners again).
    mock.set_namespace_labels("quiet", &[]);
    want.get_mut("quiet/worker-0").expect("row").2 = true;
    mock.set_namespace_labels("apps", &[("tollgate.io/capture", "disabled")]);
    for (k, v) in want.iter_mut() {
        if k.starts_with("apps/") && k != "apps/netmon-7xk2p" && k != "apps/legacy-batch" {
            v.2 = false;
        }
    }
    mock.set_namespace_labels("kube-system", &[("tollgate.io/capture", "enabled")]);
    want.get_mut("kube-system/log-agent-q8z7x").expect("row").2 = true;
    w.wait_view(&want, "namespace relabels");
    wait_configmaps(&mock, &["apps", "quiet", "kube-system"]);
    mock.set_namespace_labels("apps", &[("team", "ai")]);
    for (k, v) in want.iter_mut() {
        if k.starts_with("apps/") && k != "apps/netmon-7xk2p" && k != "apps/legacy-batch" {
            v.2 = true;
        }
    }
    w.wait_view(&want, "apps label removed");
    let reqs = mock.requests();
    assert_eq!(count(&reqs, rs_chat), 1, "re-evaluation must not refetch owners: {reqs:#?}");
    assert_eq!(count(&reqs, job), 1);

    // Closed watches are resumed from the last resourceVersion: no relist.
    let watches_before = count(&mock.requests(), "GET /api/v1/pods?");
    mock.drop_watches();
    assert!(
        wait_for(WAIT, POLL, || (count(&mock.requests(), "GET /api/v1/pods?") > watches_before
            && mock.open_watches() == 2)
            .then_some(()))
        .is_some(),
        "pod watch not re-opened: {:#?}",
        mock.requests()
    );
    mock.add_pod(PodFixture::new("apps", "after-reconnect", NODE).json());
    want.insert(
        "apps/after-reconnect".into(),
        row("Pod", "after-reconnect", true, "apps/after-reconnect", "default", "BestEffort"),
    );
    w.wait_view(&want, "pod added after reconnect");
    assert_eq!(w.stats.relists.load(Ordering::Relaxed), 0, "a clean watch end must not relist");
    let resumed = mock.requests().into_iter().rfind(|r| r.starts_with("GET /api/v1/pods?") && r.contains("watch=true"));
    assert!(
        resumed.as_deref().is_some_and(|r| r.contains("resourceVersion=") && !r.contains("resourceVersion=0&")),
        "resume must carry the last resourceVersion: {resumed:?}"
    );

    // Disconnected while things change and history is compacted: 410 → relist; a pod deleted
    // meanwhile disappears, one added meanwhile appears.
    mock.pause_watches();
    mock.delete_pod("apps", "vectordb-0");
    mock.add_pod(PodFixture::new("apps", "during-outage", NODE).owner("StatefulSet", "outage").json());
    mock.expire();
    mock.resume_watches();
    want.remove("apps/vectordb-0");
    want.insert(
        "apps/during-outage".into(),
        row("StatefulSet", "outage", true, "apps/outage", "default", "BestEffort"),
    );
    w.wait_view(&want, "relist after 410");
    assert!(w.stats.relists.load(Ordering::Relaxed) >= 1, "410 must relist");
    assert!(w.stats.watch_errors.load(Ordering::Relaxed) >= 1, "the 410 ERROR event is counted");
    // Still one owner read per object, and the CA was applied once per namespace.
    let reqs = mock.requests();
    assert_eq!(count(&reqs, rs_chat), 1, "relist must use the owner cache: {reqs:#?}");
    assert_eq!(count(&reqs, "PATCH "), 3, "{reqs:#?}");
    assert_eq!(w.stats.ca_publish_ok.load(Ordering::Relaxed), 3);
    assert_eq!(w.stats.ca_publish_errors.load(Ordering::Relaxed), 0);
    assert_eq!(w.stats.pods_over_limit.load(Ordering::Relaxed), 0);

    w.stop();
    // After shutdown nothing watches any more.
    assert!(
        wait_for(WAIT, POLL, || (mock.open_watches() == 0).then_some(())).is_some(),
        "watches left open after shutdown"
    );
}

#[test]
fn opt_in_mode_store_limit_and_no_ca() {
    let mock = MockKube::start();
    mock.add_namespace("apps", &[]);
    mock.add_namespace("ai", &[("tollgate.io/capture", "enabled")]);
    mock.add_pod(PodFixture::new("apps", "plain", NODE).json());
    mock.add_pod(PodFixture::new("apps", "opted-in", NODE).annotation("tollgate.io/capture", "true").json());
    mock.add_pod(PodFixture::new("ai", "agent", NODE).annotation("tollgate.io/agent", "").json());
    let cfg = config(&mock, json!({ "capture": "opt_in", "max_pods": 2 }));
    let w = Watcher::start(&cfg, None);
    assert!(wait_for(WAIT, POLL, || (w.store.synced()).then_some(())).is_some(), "never synced");
    // Three pods, room for two: one stays unnamed and is counted.
    assert_eq!(w.store.len(), 2);
    assert_eq!(w.stats.pods_over_limit.load(Ordering::Relaxed), 1);
    for p in w.store.snapshot() {
        let want = match p.name.as_str() {
            "plain" => false,
            "opted-in" | "agent" => true,
            other => panic!("unexpected pod {other}"),
        };
        assert_eq!(p.capture, want, "{}", p.name);
        assert_eq!(&*p.agent, format!("{}/{}", p.namespace, p.name), "empty agent annotation falls back");
    }
    // No PEM given: nothing published.
    std::thread::sleep(Duration::from_millis(300));
    assert!(mock.configmaps().is_empty());
    assert_eq!(count(&mock.requests(), "PATCH "), 0);
    w.stop();
}

#[test]
fn config_errors_fail_fast() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let store = Arc::new(PodStore::new(8));
    let stats = Arc::new(KubeStats::default());
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let run = |cfg: KubernetesConfig| {
        rt.block_on(start(&cfg, store.clone(), None, stats.clone(), rx.clone())).map(|_| ()).map_err(|e| e.to_string())
    };
    if std::env::var_os("NODE_NAME").is_none() {
        let cfg: KubernetesConfig =
            serde_json::from_value(json!({"enabled": true, "api_server": "http://127.0.0.1:1"})).expect("config");
        let err = run(cfg).expect_err("no node name must fail");
        assert!(err.contains("kubernetes.node_name"), "{err}");
    }
    let cfg: KubernetesConfig =
        serde_json::from_value(json!({"enabled": true, "node_name": NODE, "api_server": "ftp://127.0.0.1/"}))
            .expect("config");
    let err = run(cfg).expect_err("ftp must fail");
    assert!(err.contains("kubernetes.api_server"), "{err}");
    // An unreachable server is not a config problem: start succeeds, errors are retried.
    let cfg: KubernetesConfig =
        serde_json::from_value(json!({"enabled": true, "node_name": NODE, "api_server": "http://127.0.0.1:1"}))
            .expect("config");
    assert_eq!(run(cfg), Ok(()));
}
