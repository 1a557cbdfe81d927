//! Realistic Kubernetes objects for [`MockKube`](super::MockKube), shaped like
//! `kubectl get -o json` output of a kubelet-managed pod (server-set fields included), so the
//! client under test parses what it would parse in a cluster.

use serde_json::{json, Map, Value};

/// A stable UUID-shaped id derived from `seed` (so tests can compute the uid of any object).
pub fn fake_uid(seed: &str) -> String {
    let h = hex_digest(seed, 32);
    format!("{}-{}-4{}-a{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

/// `len` hex digits derived from `seed` (FNV-1a rounds; not cryptographic, just stable).
fn hex_digest(seed: &str, len: usize) -> String {
    let mut out = String::with_capacity(len + 16);
    let mut round: u64 = 0;
    while out.len() < len {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ round;
        for b in seed.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        out.push_str(&format!("{h:016x}"));
        round += 1;
    }
    out.truncate(len);
    out
}

fn string_map(pairs: &[(&str, &str)]) -> Value {
    Value::Object(pairs.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<Map<String, Value>>())
}

fn owner_api_version(kind: &str) -> &'static str {
    match kind {
        "Job" | "CronJob" => "batch/v1",
        "Node" => "v1",
        _ => "apps/v1",
    }
}

/// An `ownerReferences` entry for the controller `kind/name` (uid derived from namespace, kind
/// and name, matching what [`replicaset_json`]/[`job_json`] give that owner).
pub fn owner_ref(namespace: &str, kind: &str, name: &str) -> Value {
    json!({
        "apiVersion": owner_api_version(kind),
        "kind": kind,
        "name": name,
        "uid": fake_uid(&format!("{kind}/{namespace}/{name}")),
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

/// Builder of a Pod object; [`PodFixture::json`] renders it. Defaults: service account
/// `default`, QoS `BestEffort`, pod network, Running.
#[derive(Debug, Clone)]
pub struct PodFixture {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid` (default derived from namespace/name).
    pub uid: String,
    /// `spec.nodeName`.
    pub node: String,
    /// Controller `(kind, name)`.
    pub owner: Option<(String, String)>,
    /// `metadata.labels`.
    pub labels: Vec<(String, String)>,
    /// `metadata.annotations`.
    pub annotations: Vec<(String, String)>,
    /// `status.qosClass`.
    pub qos: String,
    /// `spec.hostNetwork`.
    pub host_network: bool,
    /// `spec.serviceAccountName`.
    pub service_account: String,
}

impl PodFixture {
    /// A bare pod `namespace/name` on `node`.
    pub fn new(namespace: &str, name: &str, node: &str) -> PodFixture {
        PodFixture {
            namespace: namespace.into(),
            name: name.into(),
            uid: fake_uid(&format!("Pod/{namespace}/{name}")),
            node: node.into(),
            owner: None,
            labels: Vec::new(),
            annotations: Vec::new(),
            qos: "BestEffort".into(),
            host_network: false,
            service_account: "default".into(),
        }
    }

    /// Set `metadata.uid`.
    pub fn uid(mut self, uid: &str) -> Self {
        self.uid = uid.into();
        self
    }

    /// Owned by controller `kind/name`.
    pub fn owner(mut self, kind: &str, name: &str) -> Self {
        self.owner = Some((kind.into(), name.into()));
        self
    }

    /// Add a label.
    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.push((k.into(), v.into()));
        self
    }

    /// Add an annotation.
    pub fn annotation(mut self, k: &str, v: &str) -> Self {
        self.annotations.push((k.into(), v.into()));
        self
    }

    /// Set `status.qosClass` (resources are set to match it).
    pub fn qos(mut self, qos: &str) -> Self {
        self.qos = qos.into();
        self
    }

    /// Run in the node's network namespace.
    pub fn host_network(mut self, on: bool) -> Self {
        self.host_network = on;
        self
    }

    /// Set `spec.serviceAccountName`.
    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = sa.into();
        self
    }

    /// The Pod object.
    pub fn json(&self) -> Value {
        let (ns, name) = (self.namespace.as_str(), self.name.as_str());
        let resources = match self.qos.as_str() {
            "Guaranteed" => {
                json!({"limits": {"cpu": "500m", "memory": "256Mi"}, "requests": {"cpu": "500m", "memory": "256Mi"}})
            }
            "Burstable" => json!({"limits": {"memory": "512Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}}),
            _ => json!({}),
        };
        let node_octet = hex_digest(&self.node, 2);
        let host_ip = format!("10.0.0.{}", u8::from_str_radix(&node_octet, 16).unwrap_or(1) / 2 + 10);
        let pod_ip = if self.host_network {
            host_ip.clone()
        } else {
            let h = hex_digest(&self.uid, 4);
            format!(
                "10.244.{}.{}",
                u8::from_str_radix(&h[0..2], 16).unwrap_or(0),
                u8::from_str_radix(&h[2..4], 16).unwrap_or(0) | 1
            )
        };
        let token_volume = format!("kube-api-access-{}", &hex_digest(&format!("vol/{}", self.uid), 5));
        let mut metadata = json!({
            "name": name,
            "namespace": ns,
            "uid": self.uid,
            "creationTimestamp": "2026-01-05T09:30:00Z",
            "labels": string_map(&self.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>()),
        });
        if !self.annotations.is_empty() {
            metadata["annotations"] =
                string_map(&self.annotations.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>());
        }
        if let Some((kind, owner)) = &self.owner {
            metadata["ownerReferences"] = json!([owner_ref(ns, kind, owner)]);
            metadata["generateName"] = json!(format!("{owner}-"));
        }
        let mut spec = json!({
            "containers": [{
                "name": "app",
                "image": "registry.example.com/team/agent:1.4.2",
                "imagePullPolicy": "IfNotPresent",
                "resources": resources,
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "volumeMounts": [{
                    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                    "name": token_volume,
                    "readOnly": true
                }]
            }],
            "dnsPolicy": if self.host_network { "ClusterFirstWithHostNet" } else { "ClusterFirst" },
            "enableServiceLinks": true,
            "nodeName": self.node,
            "preemptionPolicy": "PreemptLowerPriority",
            "priority": 0,
            "restartPolicy": "Always",
            "schedulerName": "default-scheduler",
            "securityContext": {},
            "serviceAccount": self.service_account,
            "serviceAccountName": self.service_account,
            "terminationGracePeriodSeconds": 30,
            "tolerations": [
                {"effect": "NoExecute", "key": "node.kubernetes.io/not-ready", "operator": "Exists", "tolerationSeconds": 300},
                {"effect": "NoExecute", "key": "node.kubernetes.io/unreachable", "operator": "Exists", "tolerationSeconds": 300}
            ],
            "volumes": [{
                "name": token_volume,
                "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"items": [{"key": "ca.crt", "path": "ca.crt"}], "name": "kube-root-ca.crt"}},
                    {"downwardAPI": {"items": [{"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}, "path": "namespace"}]}}
                ]}
            }]
        });
        if self.host_network {
            spec["hostNetwork"] = json!(true);
        }
        let container_id = format!("containerd://{}", hex_digest(&format!("ctr/{}", self.uid), 64));
        let image_id = format!("registry.example.com/team/agent@sha256:{}", hex_digest("image", 64));
        let cond = |t: &str| json!({"lastProbeTime": null, "lastTransitionTime": "2026-01-05T09:30:02Z", "status": "True", "type": t});
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": spec,
            "status": {
                "conditions": [cond("PodReadyToStartContainers"), cond("Initialized"), cond("Ready"), cond("ContainersReady"), cond("PodScheduled")],
                "containerStatuses": [{
                    "containerID": container_id,
                    "image": "registry.example.com/team/agent:1.4.2",
                    "imageID": image_id,
                    "lastState": {},
                    "name": "app",
                    "ready": true,
                    "restartCount": 0,
                    "started": true,
                    "state": {"running": {"startedAt": "2026-01-05T09:30:01Z"}}
                }],
                "hostIP": host_ip,
                "hostIPs": [{"ip": host_ip}],
                "phase": "Running",
                "podIP": pod_ip,
                "podIPs": [{"ip": pod_ip}],
                "qosClass": self.qos,
                "startTime": "2026-01-05T09:30:00Z"
            }
        })
    }
}

/// A Pod object: `owner` is the controller `(kind, name)`; labels/annotations as given; `qos`
/// the `status.qosClass`; service account `default`.
#[allow(clippy::too_many_arguments)]
pub fn pod_json(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    owner: Option<(&str, &str)>,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
    qos: &str,
    host_network: bool,
) -> Value {
    let mut p = PodFixture::new(namespace, name, node).uid(uid).qos(qos).host_network(host_network);
    if let Some((kind, owner)) = owner {
        p = p.owner(kind, owner);
    }
    for (k, v) in labels {
        p = p.label(k, v);
    }
    for (k, v) in annotations {
        p = p.annotation(k, v);
    }
    p.json()
}

/// A ReplicaSet owned by Deployment `deployment` (when given), with the `pod-template-hash`
/// label and selector a Deployment controller sets.
pub fn replicaset_json(namespace: &str, name: &str, deployment: Option<&str>, template_hash: &str) -> Value {
    let mut metadata = json!({
        "name": name,
        "namespace": namespace,
        "uid": fake_uid(&format!("ReplicaSet/{namespace}/{name}")),
        "creationTimestamp": "2026-01-05T09:29:58Z",
        "generation": 1,
        "labels": {"pod-template-hash": template_hash},
        "annotations": {"deployment.kubernetes.io/desired-replicas": "1", "deployment.kubernetes.io/max-replicas": "2", "deployment.kubernetes.io/revision": "1"},
    });
    if let Some(d) = deployment {
        metadata["ownerReferences"] = json!([owner_ref(namespace, "Deployment", d)]);
        metadata["labels"]["app"] = json!(d);
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": metadata,
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"pod-template-hash": template_hash}},
            "template": {
                "metadata": {"labels": {"pod-template-hash": template_hash}},
                "spec": {"containers": [{"name": "app", "image": "registry.example.com/team/agent:1.4.2"}]}
            }
        },
        "status": {"availableReplicas": 1, "fullyLabeledReplicas": 1, "observedGeneration": 1, "readyReplicas": 1, "replicas": 1}
    })
}

/// A Job, owned by CronJob `cronjob` when given.
pub fn job_json(namespace: &str, name: &str, cronjob: Option<&str>) -> Value {
    let uid = fake_uid(&format!("Job/{namespace}/{name}"));
    let mut metadata = json!({
        "name": name,
        "namespace": namespace,
        "uid": uid,
        "creationTimestamp": "2026-01-05T09:00:00Z",
        "generation": 1,
        "labels": {"batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": name},
    });
    if let Some(c) = cronjob {
        metadata["ownerReferences"] = json!([owner_ref(namespace, "CronJob", c)]);
        metadata["annotations"] = json!({"batch.kubernetes.io/cronjob-scheduled-timestamp": "2026-01-05T09:00:00Z"});
    }
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {"backoffLimit": 6, "completionMode": "NonIndexed", "completions": 1, "parallelism": 1,
                 "template": {"spec": {"containers": [{"name": "app", "image": "registry.example.com/team/batch:2.0"}], "restartPolicy": "OnFailure"}}},
        "status": {"active": 1, "startTime": "2026-01-05T09:00:00Z"}
    })
}

/// A Namespace with `labels` plus the `kubernetes.io/metadata.name` label the API server adds.
pub fn namespace_json(name: &str, labels: &[(&str, &str)]) -> Value {
    let mut l = string_map(labels);
    l["kubernetes.io/metadata.name"] = json!(name);
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "uid": fake_uid(&format!("Namespace/{name}")),
            "creationTimestamp": "2026-01-05T09:00:00Z",
            "labels": l,
        },
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_stable_and_uuid_shaped() {
        let a = fake_uid("x");
        assert_eq!(a, fake_uid("x"));
        assert_ne!(a, fake_uid("y"));
        let parts: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(parts, [8, 4, 4, 4, 12], "{a}");
    }

    #[test]
    fn pod_shape() {
        let p = PodFixture::new("apps", "chat-7d9f8c6b5d-x2x9q", "node-a")
            .owner("ReplicaSet", "chat-7d9f8c6b5d")
            .label("pod-template-hash", "7d9f8c6b5d")
            .qos("Burstable")
            .json();
        assert_eq!(p["spec"]["nodeName"], "node-a");
        assert_eq!(p["metadata"]["ownerReferences"][0]["apiVersion"], "apps/v1");
        assert_eq!(p["metadata"]["ownerReferences"][0]["uid"], fake_uid("ReplicaSet/apps/chat-7d9f8c6b5d"));
        assert_eq!(p["status"]["qosClass"], "Burstable");
        let cid = p["status"]["containerStatuses"][0]["containerID"].as_str().unwrap_or_default();
        assert_eq!(cid.len(), "containerd://".len() + 64, "{cid}");
        assert!(p["spec"].get("hostNetwork").is_none());
    }
}
