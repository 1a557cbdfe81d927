//! `kubernetes:` section: how the node agent learns pod identity from the API server and which
//! pods it captures. Off by default so a plain Linux host never needs a cluster.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Pod identity and capture scope from the Kubernetes API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// Watch this node's pods and map connections to them.
    pub enabled: bool,
    /// Node whose pods are watched (`spec.nodeName`); absent: the `NODE_NAME` environment
    /// variable (set from the downward API in the DaemonSet).
    pub node_name: Option<String>,
    /// API server URL; absent: in-cluster service account, then `KUBECONFIG`/`~/.kube/config`.
    /// Tests point it at a local replay server.
    #[schemars(with = "Option<String>")]
    pub api_server: Option<url::Url>,
    /// Which pods are captured: every pod except opted-out ones (`all`), or only pods in
    /// labelled namespaces and pods annotated in (`opt_in`).
    pub capture: PodCaptureMode,
    /// Namespace label whose value `enabled`/`disabled` sets the scope of its pods.
    pub namespace_label: String,
    /// Namespaces never captured in `all` mode unless labelled `enabled` (system pods).
    pub exclude_namespaces: Vec<String>,
    /// Pod annotation `"true"`/`"false"` that opts one pod in or out, overriding its namespace.
    pub capture_annotation: String,
    /// Pod annotation naming the agent (default name: `namespace/workload`).
    pub agent_annotation: String,
    /// ConfigMap (key `ca.crt`) the interception CA certificate is published to in every
    /// captured namespace; `null`: not published.
    pub ca_configmap: Option<String>,
    /// How often the cgroup tree is rescanned for pods whose cgroup appeared after their watch
    /// event (pod scope is also resynced on every event).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub resync_interval: Duration,
    /// Pods kept in the local store (a node runs ~110; beyond this, new pods are not named).
    pub max_pods: usize,
    /// Timeout of one API request (list, get, patch); watches are long-polls renewed by the
    /// client.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub request_timeout: Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            node_name: None,
            api_server: None,
            capture: PodCaptureMode::All,
            namespace_label: "tollgate.io/capture".into(),
            exclude_namespaces: vec!["kube-system".into(), "kube-public".into(), "kube-node-lease".into()],
            capture_annotation: "tollgate.io/capture".into(),
            agent_annotation: "tollgate.io/agent".into(),
            ca_configmap: Some("tollgate-ca".into()),
            resync_interval: Duration::from_secs(2),
            max_pods: 1024,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Default pod scope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PodCaptureMode {
    /// Every pod, except excluded namespaces, namespaces labelled `disabled` and pods annotated
    /// `"false"`.
    #[default]
    All,
    /// Only pods in namespaces labelled `enabled` and pods annotated `"true"`.
    OptIn,
}
