//! Kubernetes pod identity for captured connections: the kubelet's cgroup layout names the pod
//! (UID) and container of a connecting process ([`cgroup_path`]); a watch on this node's pods
//! from the API server adds namespace, workload, service account, labels and the capture
//! decision ([`pods`], [`watch`]); [`scope`] keeps the kernel's scope map in step with that
//! decision; [`ca_publish`] hands the interception CA to captured namespaces.

pub mod ca_publish;
pub mod cgroup_path;
pub mod owners;
pub mod pods;
pub mod scope;
pub mod watch;

pub use pods::{PodInfo, PodStore, Workload};
