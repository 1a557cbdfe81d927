//! o1's Kubernetes part: a simulated node, so the `tollgate / Kubernetes` board (pods, watcher
//! events, config reloads, LLM metrics joined to `tollgate_k8s_pod_info` on `agent`) has real
//! data behind every panel.
//!
//! As in k1, pods are kubelet-style cgroups (systemd and cgroupfs drivers) below a test group and
//! their metadata comes from the `MockKube` replay of the API server. One namespace holds a
//! Deployment with two replicas (one agent name, two pods: what the board's join must not count
//! twice or refuse as many-to-many) and an opted-out StatefulSet pod. Calls are made by curl in
//! the first replica's container cgroup; in the host network namespace, which is enough here:
//! the pod is known by its cgroup, and the pod-network path is k1's subject.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use tollgate_e2e::cgroup::Group;
use tollgate_e2e::client::curl_in;
use tollgate_e2e::kube::{replicaset_json, MockKube, PodFixture};
use tollgate_e2e::openai::{self, ChatRequest};
use tollgate_e2e::prometheus::Prometheus;
use tollgate_e2e::tollgate::Tollgate;
use tollgate_e2e::{ensure, Context, Result};

use crate::gateway::Gw;
use crate::k8s::{container_id, kubelet_path};
use crate::support::{assert_completion, assert_proxied, wait_metric};

const NODE: &str = "obs-node";
const NAMESPACE: &str = "obs-apps";
const REPLICASET: &str = "chat-6c9f8d7b5";
const TEMPLATE_HASH: &str = "6c9f8d7b5";
/// The Deployment's agent (default name `namespace/workload`), carried by both replicas.
const CHAT_AGENT: &str = "obs-apps/chat";
/// The opted-out pod's agent name: it is listed, never captured.
const REPORT_AGENT: &str = "obs-apps/report";
/// Every agent name a pod of the node has: all that a query over `tollgate_k8s_pod_info` may
/// show.
pub(super) const POD_AGENTS: [&str; 2] = [CHAT_AGENT, REPORT_AGENT];

/// The simulated node: API replay and kubelet cgroups (removed on drop, after tollgate, which
/// is created later).
pub(super) struct Node {
    kube: MockKube,
    /// Container cgroup of the Deployment's first replica: where the pod's calls run.
    chat: PathBuf,
    _cgroups: Group,
}

impl Node {
    /// API objects and cgroups of the node's pods, before tollgate starts (as on a node where
    /// the agent is rolled out after the workloads).
    pub(super) fn new(gw: &Gw) -> Result<Node> {
        let cgroups = gw.e.cg.group(NODE)?;
        let kube = MockKube::start();
        kube.add_namespace(NAMESPACE, &[]);
        kube.add_replicaset(replicaset_json(NAMESPACE, REPLICASET, Some("chat"), TEMPLATE_HASH));
        let replica = |suffix: &str| {
            PodFixture::new(NAMESPACE, &format!("{REPLICASET}-{suffix}"), NODE)
                .owner("ReplicaSet", REPLICASET)
                .label("pod-template-hash", TEMPLATE_HASH)
                .qos("Burstable")
        };
        let report = PodFixture::new(NAMESPACE, "report-0", NODE)
            .owner("StatefulSet", "report")
            .annotation("tollgate.io/capture", "false");
        // (pod, systemd cgroup driver, container id seed)
        let pods = [(replica("q4w2e"), true, 71u8), (replica("z7k3m"), false, 72), (report, true, 73)];
        let mut containers = Vec::new();
        for (pod, systemd, seed) in &pods {
            let (_, container) = kubelet_path(pod, *systemd, &container_id(*seed));
            containers.push(cgroups.mkdirs(&container)?);
            kube.add_pod(pod.json());
        }
        Ok(Node { kube, chat: containers.swap_remove(0), _cgroups: cgroups })
    }

    /// The `kubernetes:` section of tollgate's config.
    pub(super) fn config(&self) -> Value {
        json!({"enabled": true, "node_name": NODE, "api_server": self.kube.url(), "resync_interval": "500ms"})
    }

    /// Wait until tollgate's pod store holds the node's pods as the API names them.
    pub(super) fn wait_ready(&self, t: &Tollgate) -> Result<()> {
        wait_metric(t, "tollgate_k8s_pods", &[("captured", "true")], 2.0)?;
        wait_metric(t, "tollgate_k8s_pods", &[("captured", "false")], 1.0)?;
        let chat = [("k8s_namespace", NAMESPACE), ("k8s_workload", "Deployment/chat"), ("agent", CHAT_AGENT)];
        wait_metric(t, "tollgate_k8s_pod_info", &chat, 2.0)?;
        wait_metric(t, "tollgate_k8s_pod_info", &[("agent", REPORT_AGENT), ("captured", "false")], 1.0)?;
        // The scope syncer runs on the store change just seen and every resync_interval: two
        // periods and the pods' cgroups are in the kernel's scope map.
        std::thread::sleep(Duration::from_millis(1000));
        Ok(())
    }

    /// Two calls from the Deployment's pod through the captured gateway address, each scraped
    /// by Prometheus (rates need two differing samples), then the board's join checked against
    /// tollgate's own numbers.
    pub(super) fn traffic(&self, gw: &Gw, t: &Tollgate, prom: &Prometheus) -> Result<()> {
        for i in 1..=2u32 {
            let req = ChatRequest::simple(super::MODELS[0], &format!("pod {CHAT_AGENT} asks, call {i}"));
            let body = serde_json::to_string(&req.to_json())?;
            let url = gw.url("/v1/chat/completions");
            let r = curl_in(
                &self.chat,
                None,
                &[
                    "-H",
                    "Content-Type: application/json",
                    "-H",
                    "Authorization: Bearer sk-test-e2e",
                    "--data-binary",
                    &body,
                    &url,
                ],
            )?;
            assert_completion(&r, &openai::reply_for(&req)).with_context(|| format!("pod call {i}"))?;
            assert_proxied(&r).with_context(|| format!("pod call {i}"))?;
            wait_metric(t, "tollgate_llm_requests_total", &[("agent", CHAT_AGENT)], f64::from(i))?;
            prom.wait_scraped_after(SystemTime::now(), Duration::from_secs(15))?;
        }

        // Two pods carry CHAT_AGENT: joining on the raw pod series is many-to-many...
        let naive = "tollgate_llm_tokens_total * on(agent) group_left(k8s_namespace) tollgate_k8s_pod_info";
        ensure!(prom.query(naive).is_err(), "{naive} did not fail: are two pods sharing an agent any more?");
        // ...the board's join (one row per agent) attributes the agent's tokens to its
        // namespace exactly once.
        let join = format!(
            r#"sum(tollgate_llm_tokens_total{{token_type="total"}} * on(agent) group_left(k8s_namespace) topk by (agent) (1, max by (agent, k8s_namespace) (tollgate_k8s_pod_info{{k8s_namespace="{NAMESPACE}"}})))"#
        );
        let want = t.metrics()?.sum("tollgate_llm_tokens_total", &[("agent", CHAT_AGENT), ("token_type", "total")]);
        let got = prom.value(&join)?;
        ensure!(want > 0.0 && got == Some(want), "{join}: {got:?}, tollgate counted {want} tokens for {CHAT_AGENT}");
        Ok(())
    }
}

/// Replace the config file the way the kubelet updates a ConfigMap volume (write a new file,
/// rename it over the old one) with the same settings behind a comment: a successful reload that
/// changes nothing and requires no restart.
pub(super) fn reload_unchanged(t: &Tollgate) -> Result<()> {
    let reloads = |m: &tollgate_e2e::prom::Scrape| m.sum("tollgate_config_reloads_total", &[("result", "success")]);
    let before = reloads(&t.metrics()?);
    let tmp = t.config_path.with_extension("yaml.new");
    std::fs::write(&tmp, format!("# o1: rewritten, same settings\n{}", serde_yaml_ng::to_string(&t.config)?))?;
    std::fs::rename(&tmp, &t.config_path)?;
    wait_metric(t, "tollgate_config_reloads_total", &[("result", "success")], before + 1.0)?;
    wait_metric(t, "tollgate_config_reloads_total", &[("result", "failure")], 0.0)?;
    wait_metric(t, "tollgate_config_restart_required", &[], 0.0)
}
