//! The kubelet encodes pod UID, QoS class and container ID in cgroup paths. Reading them from the
//! connecting process's cgroup is what ties a kernel record to a pod without asking the runtime:
//! it works for every CRI (containerd, CRI-O, Docker via cri-dockerd) and both cgroup drivers.
//!
//! Shapes handled (the kubepods component may sit below a prefix, e.g. `kubelet-kubepods` of
//! kind or a nested `/system.slice/...` root):
//! - systemd driver: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<UID_>.slice/cri-containerd-<ID>.scope`
//!   (UID dashes become underscores; `crio-<ID>.scope`, `docker-<ID>.scope`);
//! - cgroupfs driver: `/kubepods/burstable/pod<UID>/<ID>` (or `crio-<ID>`), Guaranteed pods
//!   directly below `/kubepods`.

/// Pod QoS class, as the kubelet's cgroup tier shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    /// Directly below the kubepods root.
    Guaranteed,
    /// Below the `burstable` tier.
    Burstable,
    /// Below the `besteffort` tier.
    BestEffort,
}

impl QosClass {
    /// The `status.qosClass` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "Guaranteed",
            QosClass::Burstable => "Burstable",
            QosClass::BestEffort => "BestEffort",
        }
    }
}

/// Container runtime, from the container cgroup's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// `cri-containerd-<id>.scope`.
    Containerd,
    /// `crio-<id>.scope` / `crio-<id>`.
    CriO,
    /// `docker-<id>.scope`.
    Docker,
    /// A bare ID (cgroupfs driver with containerd or Docker): runtime not encoded.
    Unknown,
}

/// What a kubelet cgroup path says about the process inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCgroup {
    /// Pod UID with dashes, as in `metadata.uid`.
    pub pod_uid: String,
    /// QoS tier.
    pub qos: QosClass,
    /// Path of the pod-level cgroup (prefix of the input up to the pod component): the cgroup
    /// the scope map keys the pod on.
    pub pod_path: String,
    /// Container ID, when the path reaches a container cgroup.
    pub container_id: Option<String>,
    /// Runtime encoded in the container cgroup's name.
    pub runtime: Option<Runtime>,
}

/// Parse a cgroup path (relative to the cgroup2 root, leading `/`) laid out by the kubelet.
/// `None` for anything else (host services, non-Kubernetes containers).
pub fn parse(path: &str) -> Option<PodCgroup> {
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let root = comps.iter().position(|c| is_kubepods_root(c))?;
    let mut qos = QosClass::Guaranteed;
    for (i, comp) in comps.iter().enumerate().skip(root + 1) {
        let name = comp.strip_suffix(".slice").unwrap_or(comp);
        if let Some(uid) = pod_uid(name) {
            let pod_path = format!("/{}", comps[..=i].join("/"));
            let (container_id, runtime) = match comps.get(i + 1).and_then(|c| container(c)) {
                Some((id, rt)) => (Some(id), Some(rt)),
                None => (None, None),
            };
            return Some(PodCgroup { pod_uid: uid, qos, pod_path, container_id, runtime });
        }
        // A QoS tier: `burstable`, `kubepods-burstable`, `kubelet-kubepods-besteffort`.
        if name.ends_with("burstable") {
            qos = QosClass::Burstable;
        } else if name.ends_with("besteffort") {
            qos = QosClass::BestEffort;
        } else {
            return None;
        }
    }
    None
}

/// `kubepods`, `kubepods.slice`, `kubelet-kubepods.slice` (kind, `--cgroup-root=/kubelet`).
fn is_kubepods_root(c: &str) -> bool {
    let name = c.strip_suffix(".slice").unwrap_or(c);
    name == "kubepods" || name.ends_with("-kubepods")
}

/// `pod<uid>` at the end of a component (`kubepods-burstable-pod<uid_>` or `pod<uid>`), UID
/// normalised to dashes and checked for the 8-4-4-4-12 hex shape.
fn pod_uid(name: &str) -> Option<String> {
    let at = name.rfind("pod")?;
    if at > 0 && !name[..at].ends_with('-') {
        return None;
    }
    let raw = &name[at + 3..];
    let uid: String = raw.chars().map(|c| if c == '_' { '-' } else { c }).collect();
    let groups: Vec<&str> = uid.split('-').collect();
    let shape = [8, 4, 4, 4, 12];
    let ok = groups.len() == shape.len()
        && groups.iter().zip(shape).all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then(|| uid.to_ascii_lowercase())
}

/// Container cgroup name → (ID, runtime). Conmon (`crio-conmon-<id>`) is CRI-O's monitor, not a
/// container: not reported.
fn container(c: &str) -> Option<(String, Runtime)> {
    let name = c.strip_suffix(".scope").unwrap_or(c);
    let (id, rt) = if let Some(id) = name.strip_prefix("cri-containerd-") {
        (id, Runtime::Containerd)
    } else if name.starts_with("crio-conmon-") {
        return None;
    } else if let Some(id) = name.strip_prefix("crio-") {
        (id, Runtime::CriO)
    } else if let Some(id) = name.strip_prefix("docker-") {
        (id, Runtime::Docker)
    } else {
        (name, Runtime::Unknown)
    };
    let valid = id.len() >= 12 && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then(|| (id.to_ascii_lowercase(), rt))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0d5bd5f4-2b5e-4e3a-9c1f-3b2a1d0e9f87";
    const UID_: &str = "0d5bd5f4_2b5e_4e3a_9c1f_3b2a1d0e9f87";
    const ID: &str = "4f1c2d3e5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d";

    fn p(path: &str) -> Option<PodCgroup> {
        parse(path)
    }

    #[test]
    fn systemd_driver_all_runtimes_and_tiers() {
        let cases = [
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"), QosClass::Burstable, Runtime::Containerd),
            (format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope"), QosClass::BestEffort, Runtime::CriO),
            (format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-{ID}.scope"), QosClass::Guaranteed, Runtime::Docker),
        ];
        for (path, qos, rt) in cases {
            let got = p(&path).unwrap_or_else(|| panic!("{path}"));
            assert_eq!(got.pod_uid, UID, "{path}");
            assert_eq!(got.qos, qos, "{path}");
            assert_eq!(got.runtime, Some(rt), "{path}");
            assert_eq!(got.container_id.as_deref(), Some(ID), "{path}");
            let pod_path = path.rsplit_once('/').unwrap().0;
            assert_eq!(got.pod_path, pod_path);
        }
    }

    #[test]
    fn cgroupfs_driver() {
        let got = p(&format!("/kubepods/burstable/pod{UID}/{ID}")).unwrap();
        assert_eq!(
            (got.qos, got.runtime, got.container_id.as_deref()),
            (QosClass::Burstable, Some(Runtime::Unknown), Some(ID))
        );
        assert_eq!(got.pod_path, format!("/kubepods/burstable/pod{UID}"));
        let got = p(&format!("/kubepods/pod{UID}/crio-{ID}")).unwrap();
        assert_eq!((got.qos, got.runtime), (QosClass::Guaranteed, Some(Runtime::CriO)));
        let got = p(&format!("/kubepods/besteffort/pod{UID}")).unwrap();
        assert_eq!((got.qos, got.container_id, got.runtime), (QosClass::BestEffort, None, None));
    }

    #[test]
    fn nested_roots_of_kind_and_system_slices() {
        let kind = format!(
            "/system.slice/docker-{ID}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        let got = p(&kind).unwrap();
        assert_eq!((got.pod_uid.as_str(), got.qos), (UID, QosClass::Burstable));
        assert!(got.pod_path.ends_with(&format!("kubelet-kubepods-burstable-pod{UID_}.slice")));
        // Sub-cgroups inside a container still name the container.
        let deep = format!("/kubepods/pod{UID}/{ID}/inner");
        assert_eq!(p(&deep).unwrap().container_id.as_deref(), Some(ID));
    }

    #[test]
    fn rejects_non_kubelet_paths() {
        for path in [
            "/",
            "/system.slice/sshd.service",
            "/user.slice/user-1000.slice/session-1.scope",
            "/agents/billing",
            "/kubepods.slice/kubepods-burstable.slice/not-a-pod.slice",
            "/kubepods/burstable/podnot-a-uid/abc",
            "/kubepods/weird/pod0d5bd5f4-2b5e-4e3a-9c1f-3b2a1d0e9f87",
            "/kubepodsx/pod0d5bd5f4-2b5e-4e3a-9c1f-3b2a1d0e9f87",
        ] {
            assert_eq!(p(path), None, "{path}");
        }
        // conmon and non-hex container names: pod known, no container.
        let got = p(&format!("/kubepods/pod{UID}/crio-conmon-{ID}")).unwrap();
        assert_eq!(got.container_id, None);
        let got = p(&format!("/kubepods/pod{UID}/not-hex")).unwrap();
        assert_eq!(got.container_id, None);
    }
}
