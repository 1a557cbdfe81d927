//! Kubernetes node scenarios without a cluster: a simulated node whose "pods" are network
//! namespaces + veth pairs with processes in cgroups at kubelet paths (systemd and cgroupfs
//! drivers), and a local replay of the Kubernetes API (`MockKube`: list + watch of pods and
//! namespaces, ReplicaSet/Job owners, ConfigMap apply) that tollgate watches.

mod caps;
mod lifecycle;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use tollgate_e2e::client::{curl_in, CurlOut};
use tollgate_e2e::kube::MockKube;
use tollgate_e2e::kube::{replicaset_json, PodFixture};
use tollgate_e2e::netns::Netns;
use tollgate_e2e::openai::{self, ChatRequest};
use tollgate_e2e::prom::Scrape;
use tollgate_e2e::tollgate::Tollgate;
use tollgate_e2e::{bail, ensure, wait_for, Result};

use crate::support::*;

const NODE: &str = "node-1";
/// A 64-hex container ID, as containerd and CRI-O name them.
pub(crate) fn container_id(seed: u8) -> String {
    format!("{:02x}", seed).repeat(32)
}

/// One simulated pod: API object, netns, and the container cgroup its processes run in.
struct SimPod {
    fixture: PodFixture,
    ns: Netns,
    container: PathBuf,
    pod_dir: PathBuf,
}

/// Kubelet layouts: systemd driver (UID with underscores, `cri-containerd-<id>.scope`) or
/// cgroupfs driver (`kubepods/<qos>/pod<uid>/<id>`).
pub(crate) fn kubelet_path(f: &PodFixture, systemd: bool, id: &str) -> (String, String) {
    let qos = f.qos.to_ascii_lowercase();
    if systemd {
        let uid = f.uid.replace('-', "_");
        let pod = if qos == "guaranteed" {
            format!("kubepods.slice/kubepods-pod{uid}.slice")
        } else {
            format!("kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{uid}.slice")
        };
        let c = format!("{pod}/cri-containerd-{id}.scope");
        (pod, c)
    } else {
        let pod =
            if qos == "guaranteed" { format!("kubepods/pod{}", f.uid) } else { format!("kubepods/{qos}/pod{}", f.uid) };
        let c = format!("{pod}/{id}");
        (pod, c)
    }
}

fn sim_pod(
    node: &tollgate_e2e::cgroup::Group,
    f: PodFixture,
    subnet: u8,
    systemd: bool,
    gateway: &str,
) -> Result<SimPod> {
    let (pod_rel, c_rel) = kubelet_path(&f, systemd, &container_id(subnet));
    let container = node.mkdirs(&c_rel)?;
    let pod_dir = node.dir().join(&pod_rel);
    let ns = Netns::create(&format!("k{subnet}"), subnet)?;
    // Pods reach the node IP through their default route, as in a cluster.
    tollgate_e2e::sh("ip", &["-n", ns.name(), "route", "add", "default", "via", &ns.host_addr().to_string()])?;
    ns.set_hosts(&[(gateway.to_string(), "llm.internal")])?;
    Ok(SimPod { fixture: f, ns, container, pod_dir })
}

fn chat(p: &SimPod, port: u16, text: &str) -> Result<CurlOut> {
    let req = ChatRequest::simple(MODEL, text);
    let body = serde_json::to_string(&req.to_json())?;
    let url = format!("http://llm.internal:{port}/v1/chat/completions");
    let r = curl_in(
        &p.container,
        Some(&p.ns),
        &["-H", "Content-Type: application/json", "-H", "Authorization: Bearer sk-pod", "--data-binary", &body, &url],
    )?;
    ensure!(r.exit == 0 && r.http_code == 200, "{}: {}", p.fixture.name, r.describe());
    let got: Value = serde_json::from_slice(&r.body)?;
    ensure!(
        got["choices"][0]["message"]["content"] == json!(openai::reply_for(&req).content),
        "{}: wrong content {got}",
        p.fixture.name
    );
    Ok(r)
}

/// The access-log line of the last LLM call whose agent is `agent`.
fn last_llm_line(t: &Tollgate, agent: &str) -> Option<Value> {
    t.access_log().into_iter().rev().find(|l| l["kind"] == "llm" && l["agent"]["name"] == agent)
}

fn wait_scrape(t: &Tollgate, what: &str, mut ok: impl FnMut(&Scrape) -> bool) -> Result<Scrape> {
    let mut last = Scrape::default();
    match wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
        last = t.metrics().ok()?;
        ok(&last).then(|| last.clone())
    }) {
        Some(s) => Ok(s),
        None => bail!(
            "{what}: not seen\n{}{}\n--- stderr ---\n{}",
            last.dump("tollgate_k8s"),
            last.dump("tollgate_capture_scope"),
            t.stderr_tail(30)
        ),
    }
}

/// Entries of kind `entry` in the kernel scope map (config and pods).
fn scope_entries(s: &Scrape, entry: &str) -> f64 {
    s.sum("tollgate_capture_scope_cgroups", &[("entry", entry)])
}

fn pod_info(s: &Scrape, pod: &str) -> f64 {
    s.sum("tollgate_k8s_pod_info", &[("k8s_pod", pod)])
}

// ---------------------------------------------------------------------------------------------
// k1. A simulated node: pods in netns + kubelet cgroups, metadata from the API replay.
// ---------------------------------------------------------------------------------------------

#[test]
#[ignore = "needs root, BPF and built binaries: run via `cargo xtask test`"]
fn k1_pods_are_captured_and_named_from_the_api() -> Result<()> {
    let e = env()?;
    let node = e.cg.group("node")?;
    let kube = MockKube::start();
    kube.add_namespace("team-a", &[]);
    kube.add_namespace("team-b", &[]);
    let mock = e.mock(&["--listen", "0.0.0.0:0"])?;
    let port = mock.http[0].port();

    // The "node IP": the first pod's host-side veth address; every pod routes to it.
    let chat_a = PodFixture::new("team-a", "chat-7d9c5b6f4-x2x9k", NODE)
        .owner("ReplicaSet", "chat-7d9c5b6f4")
        .label("pod-template-hash", "7d9c5b6f4")
        .qos("Burstable")
        .service_account("chat-sa");
    let node_ip = "10.213.61.1";
    let a = sim_pod(&node, chat_a, 61, true, node_ip)?;
    let b = sim_pod(
        &node,
        PodFixture::new("team-b", "rag-0", NODE).owner("StatefulSet", "rag").annotation("tollgate.io/agent", "rag-bot"),
        62,
        false,
        node_ip,
    )?;
    let c = sim_pod(
        &node,
        PodFixture::new("team-a", "batch-1", NODE).annotation("tollgate.io/capture", "false").qos("Guaranteed"),
        63,
        true,
        node_ip,
    )?;
    kube.add_replicaset(replicaset_json("team-a", "chat-7d9c5b6f4", Some("chat"), "7d9c5b6f4"));
    for p in [&a, &b, &c] {
        kube.add_pod(p.fixture.json());
    }
    // A pod on another node must never show up.
    kube.add_pod(PodFixture::new("team-a", "elsewhere", "node-2").json());

    // The cluster CA, made once with `tollgate ca --dir` and mounted read-only like the
    // `tollgate-ca` Secret: every node loads it instead of minting its own.
    let ca_dir = e.path("cluster-ca");
    let out = std::process::Command::new(&e.tg_bin).arg("ca").arg("--dir").arg(&ca_dir).output()?;
    ensure!(out.status.success(), "tollgate ca --dir: {}", String::from_utf8_lossy(&out.stderr));
    let pem = std::fs::read_to_string(ca_dir.join("ca.pem"))?;
    ensure!(String::from_utf8_lossy(&out.stdout).contains(pem.trim()), "tollgate ca --dir printed another PEM");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(ca_dir.join("ca.key"), std::fs::Permissions::from_mode(0o400))?;
    std::fs::set_permissions(&ca_dir, std::fs::Permissions::from_mode(0o500))?;
    let t = e.tollgate(
        json!({
            "tls": {"ca_dir": ca_dir},
            "listen": {"pod_ipv4": node_ip},
            "capture": {"ports": [port]},
            "routes": [{"name": "llm", "provider": "openai", "match": {"hosts": ["llm.internal"]}}],
            "kubernetes": {"enabled": true, "node_name": NODE, "api_server": kube.url(), "resync_interval": "500ms"},
        }),
        None,
    )?;
    wait_scrape(&t, "three pods of node-1 in the store", |s| s.sum("tollgate_k8s_pods", &[]) == 3.0)?;
    let s = t.metrics()?;
    ensure!(pod_info(&s, "elsewhere") == 0.0, "a pod of another node was stored");
    ensure!(
        s.sum(
            "tollgate_k8s_pod_info",
            &[
                ("k8s_pod", "chat-7d9c5b6f4-x2x9k"),
                ("k8s_workload", "Deployment/chat"),
                ("agent", "team-a/chat"),
                ("captured", "true")
            ]
        ) == 1.0,
        "chat pod row wrong:\n{}",
        s.dump("tollgate_k8s_pod_info")
    );
    ensure!(
        kube.requests()
            .iter()
            .any(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-1")
                || r.contains("fieldSelector=spec.nodeName=node-1")),
        "no node field selector: {:?}",
        kube.requests()
    );

    // Deployment pod (systemd driver): captured, named namespace/workload, pod facts logged.
    let r = chat(&a, port, "from chat")?;
    assert_proxied(&r)?;
    wait_metric(&t, "tollgate_llm_requests_total", &[("agent", "team-a/chat")], 1.0)?;
    let line = wait_for(Duration::from_secs(5), Duration::from_millis(100), || last_llm_line(&t, "team-a/chat"))
        .ok_or_else(|| tollgate_e2e::anyhow!("no access-log line for team-a/chat"))?;
    let k = &line["agent"]["k8s"];
    ensure!(
        k["namespace"] == "team-a" && k["pod"] == "chat-7d9c5b6f4-x2x9k" && k["workload"] == "Deployment/chat",
        "k8s fields {k}"
    );
    ensure!(k["pod_uid"] == json!(a.fixture.uid) && k["container_id"] == json!(container_id(61)), "ids {k}");

    // StatefulSet pod (cgroupfs driver), named by annotation.
    let r = chat(&b, port, "from rag")?;
    assert_proxied(&r)?;
    wait_metric(&t, "tollgate_llm_requests_total", &[("agent", "rag-bot")], 1.0)?;
    let line = wait_for(Duration::from_secs(5), Duration::from_millis(100), || last_llm_line(&t, "rag-bot"))
        .ok_or_else(|| tollgate_e2e::anyhow!("no access-log line for rag-bot"))?;
    ensure!(line["agent"]["k8s"]["workload"] == "StatefulSet/rag", "{line}");

    // Opted-out pod: goes direct (excluded below the included kubepods root), nothing counted.
    // The scope syncer runs after the store change just seen: wait until its exclude is in force.
    wait_scrape(&t, "batch-1's exclude in the scope map", |s| scope_entries(s, "exclude") == 1.0)?;
    let before = t.metrics()?.sum("tollgate_capture_total", &[("event", "skipped_scope")]);
    let r = chat(&c, port, "from batch")?;
    assert_direct(&r)?;
    let after = t.metrics()?.sum("tollgate_capture_total", &[("event", "skipped_scope")]);
    ensure!(after > before, "opted-out connect not counted as out of scope ({before} -> {after})");
    ensure!(
        t.metrics()?.sum("tollgate_llm_requests_total", &[("agent", "team-a/batch-1")]) == 0.0,
        "opted-out pod counted"
    );

    // A pod created after start: cgroup first (kubelet), then the API object.
    let d = sim_pod(
        &node,
        PodFixture::new("team-a", "late-5f6b7c8d9-abcde", NODE)
            .owner("ReplicaSet", "late-5f6b7c8d9")
            .label("pod-template-hash", "5f6b7c8d9"),
        64,
        true,
        node_ip,
    )?;
    kube.add_pod(d.fixture.json());
    wait_scrape(&t, "late pod stored", |s| pod_info(s, "late-5f6b7c8d9-abcde") == 1.0)?;
    let r = chat(&d, port, "from late")?;
    assert_proxied(&r)?;
    // Its ReplicaSet is not in the API: the workload falls back to the pod-template-hash rule.
    wait_metric(&t, "tollgate_llm_requests_total", &[("agent", "team-a/late")], 1.0)?;

    // Deleting a pod drops it from the store and the metrics; a deleted opted-out pod's exclude
    // entry goes too (its cgroup is gone with it).
    kube.delete_pod("team-a", "batch-1");
    node.remove_nested(&c.pod_dir)?;
    wait_scrape(&t, "batch-1 gone", |s| pod_info(s, "batch-1") == 0.0 && s.sum("tollgate_k8s_pods", &[]) == 3.0)?;
    wait_scrape(&t, "batch-1's exclude removed", |s| scope_entries(s, "exclude") == 0.0)?;

    // The CA was published to the namespaces with captured pods.
    let cms: Vec<(String, String)> = kube.configmaps().into_iter().map(|(ns, name, _)| (ns, name)).collect();
    for ns in ["team-a", "team-b"] {
        ensure!(cms.contains(&(ns.to_string(), "tollgate-ca".to_string())), "no CA ConfigMap in {ns}: {cms:?}");
    }
    ensure!(!t.dir.path().join("ca").exists(), "tollgate minted its own CA instead of the cluster's");
    let (_, _, cm) = kube.configmaps().into_iter().find(|(ns, _, _)| ns == "team-a").expect("checked above");
    ensure!(cm["data"]["ca.crt"] == json!(pem), "published CA differs from the cluster CA");
    drop(t);
    Ok(())
}
