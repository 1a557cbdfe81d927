//! Who made a captured connection. The kernel record is the seed; `/proc` and the cgroup tree add
//! the exe and cgroup path; config selectors turn it into a bounded-cardinality agent *name* that
//! metrics, traces and (later) policies key on. Kubernetes pod identity slots in as another
//! optional layer ([`Agent::k8s`]) without changing callers.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use gateway_common::{CaptureRecord, AF_INET6};
use parking_lot::Mutex;

use crate::config::AgentConfig;

/// Kubernetes facts about the agent's pod: from the kubelet cgroup path (pod UID, container)
/// and, when the pod is in the store, from the API (names, workload, service account).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct K8sIdentity {
    /// Pod UID from the cgroup path.
    pub pod_uid: String,
    /// Container ID from the cgroup path, when the process is in a container cgroup.
    pub container_id: Option<String>,
    /// The pod as the API describes it; `None` until the watcher has seen it.
    pub pod: Option<Arc<crate::capture::kubernetes::PodInfo>>,
}

/// The identity of the process behind one captured connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// Bounded-cardinality name: the metric label and policy key.
    pub name: Arc<str>,
    /// Thread group id (what users call the pid).
    pub pid: u32,
    /// Thread that called connect().
    pub tid: u32,
    /// Real uid of the caller.
    pub uid: u32,
    /// Real gid of the caller.
    pub gid: u32,
    /// Kernel `comm` of the calling thread.
    pub comm: String,
    /// `/proc/<pid>/exe`, when the process still exists and is visible.
    pub exe: Option<String>,
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// cgroup path relative to the cgroup2 root (`/kubepods.slice/...`), when resolvable.
    pub cgroup_path: Option<String>,
    /// Netns cookie of the caller's socket (distinguishes pods).
    pub netns_cookie: u64,
    /// Kubernetes identity, when known.
    pub k8s: Option<K8sIdentity>,
}

impl Agent {
    /// An agent for tests and for connections known not to come from the kernel.
    pub fn unknown(name: &str) -> Self {
        Agent {
            name: Arc::from(name),
            pid: 0,
            tid: 0,
            uid: 0,
            gid: 0,
            comm: String::new(),
            exe: None,
            cgroup_id: 0,
            cgroup_path: None,
            netns_cookie: 0,
            k8s: None,
        }
    }
}

/// Original destination of a record as a socket address.
pub fn orig_dst(rec: &CaptureRecord) -> SocketAddr {
    let ip = if rec.family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(rec.orig_dst_addr))
    } else {
        let a = &rec.orig_dst_addr;
        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
    };
    SocketAddr::new(ip, rec.orig_dst_port)
}

/// `comm` bytes up to the first NUL, lossy UTF-8.
pub fn comm_str(rec: &CaptureRecord) -> String {
    let end = rec.comm.iter().position(|b| *b == 0).unwrap_or(rec.comm.len());
    String::from_utf8_lossy(&rec.comm[..end]).into_owned()
}

/// Turns kernel records into [`Agent`]s. Cgroup id → path lookups walk the cgroup tree, so
/// results are cached (bounded LRU).
pub struct AgentResolver {
    selectors: Vec<CompiledSelector>,
    pods: Option<Arc<crate::capture::kubernetes::PodStore>>,
    cgroup_root: Option<PathBuf>,
    proc_root: PathBuf,
    cgroup_paths: Mutex<lru::LruCache<u64, Option<String>>>,
}

struct CompiledSelector {
    name: Arc<str>,
    cgroup: Option<glob::Pattern>,
    comm: Option<String>,
    exe: Option<glob::Pattern>,
    uid: Option<u32>,
    namespace: Option<String>,
    workload: Option<String>,
    service_account: Option<String>,
    labels: Vec<(String, String)>,
}

/// Cgroup id → path cache size: one entry per live container is plenty.
const CGROUP_CACHE: usize = 4096;

impl AgentResolver {
    /// Build from the `agents:` section. `cgroup_root` is the cgroup2 mount used for id → path.
    /// Patterns were validated at config load; an invalid one here is skipped, never a panic.
    pub fn new(agents: &[AgentConfig], cgroup_root: Option<PathBuf>) -> Self {
        let selectors = agents
            .iter()
            .map(|a| CompiledSelector {
                name: Arc::from(a.name.as_str()),
                cgroup: a.selector.cgroup.as_deref().and_then(|p| glob::Pattern::new(p).ok()),
                comm: a.selector.comm.clone(),
                exe: a.selector.exe.as_deref().and_then(|p| glob::Pattern::new(p).ok()),
                uid: a.selector.uid,
                namespace: a.selector.namespace.clone(),
                workload: a.selector.workload.clone(),
                service_account: a.selector.service_account.clone(),
                labels: a.selector.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            })
            .collect();
        AgentResolver {
            selectors,
            pods: None,
            cgroup_root,
            proc_root: PathBuf::from("/proc"),
            cgroup_paths: Mutex::new(lru::LruCache::new(NonZeroUsize::new(CGROUP_CACHE).unwrap_or(NonZeroUsize::MIN))),
        }
    }

    /// Name callers in pods from the Kubernetes pod store.
    pub fn with_pods(mut self, pods: Option<Arc<crate::capture::kubernetes::PodStore>>) -> Self {
        self.pods = pods;
        self
    }

    /// The agent name of the pod (of this node) that owns `ip`: names the callee of a hop to
    /// another agent when its card does not.
    pub fn pod_agent_at(&self, ip: std::net::IpAddr) -> Option<Arc<str>> {
        self.pods.as_ref()?.by_ip(ip).map(|p| p.agent.clone())
    }

    /// Identity of the caller behind `rec`. Does blocking filesystem reads (small, cached): call
    /// it from `spawn_blocking` or accept the few microseconds on the connection task.
    pub fn resolve(&self, rec: &CaptureRecord) -> Agent {
        let comm = comm_str(rec);
        let exe = std::fs::read_link(self.proc_root.join(rec.tgid.to_string()).join("exe"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned());
        let cgroup_path = self.cgroup_path(rec.cgroup_id, rec.tgid);
        let mut agent = Agent {
            name: Arc::from(""),
            pid: rec.tgid,
            tid: rec.pid,
            uid: rec.uid,
            gid: rec.gid,
            comm,
            exe,
            cgroup_id: rec.cgroup_id,
            cgroup_path,
            netns_cookie: rec.netns_cookie,
            k8s: None,
        };
        agent.k8s = self.k8s_identity(agent.cgroup_path.as_deref());
        agent.name = self.name_for(&agent);
        agent
    }

    /// Pod identity from a kubelet cgroup path, enriched from the store when the pod is known.
    fn k8s_identity(&self, cgroup_path: Option<&str>) -> Option<K8sIdentity> {
        let parsed = crate::capture::kubernetes::cgroup_path::parse(cgroup_path?)?;
        let pod = self.pods.as_ref().and_then(|s| s.get(&parsed.pod_uid));
        Some(K8sIdentity { pod_uid: parsed.pod_uid, container_id: parsed.container_id, pod })
    }

    /// First matching selector, else the pod's agent name (annotation or namespace/workload),
    /// else the cgroup leaf (a container or service name), else comm. Never the pid: names are
    /// metric labels and must stay bounded.
    pub fn name_for(&self, a: &Agent) -> Arc<str> {
        let pod = a.k8s.as_ref().and_then(|k| k.pod.as_deref());
        for s in &self.selectors {
            let cg_ok = s.cgroup.as_ref().is_none_or(|p| a.cgroup_path.as_deref().is_some_and(|c| p.matches(c)));
            let comm_ok = s.comm.as_ref().is_none_or(|c| *c == a.comm);
            let exe_ok = s.exe.as_ref().is_none_or(|p| a.exe.as_deref().is_some_and(|e| p.matches(e)));
            let uid_ok = s.uid.is_none_or(|u| u == a.uid);
            let ns_ok = s.namespace.as_ref().is_none_or(|n| pod.is_some_and(|p| p.namespace == *n));
            let wl_ok = s.workload.as_ref().is_none_or(|w| pod.is_some_and(|p| p.workload.name == *w));
            let sa_ok =
                s.service_account.as_ref().is_none_or(|w| pod.is_some_and(|p| p.service_account.as_ref() == Some(w)));
            let labels_ok = s.labels.iter().all(|(k, v)| pod.is_some_and(|p| p.labels.get(k) == Some(v)));
            if cg_ok && comm_ok && exe_ok && uid_ok && ns_ok && wl_ok && sa_ok && labels_ok {
                return s.name.clone();
            }
        }
        if let Some(p) = pod {
            return p.agent.clone();
        }
        let leaf = a.cgroup_path.as_deref().and_then(|p| p.rsplit('/').find(|s| !s.is_empty()));
        match leaf {
            Some(l) => Arc::from(l),
            None if !a.comm.is_empty() => Arc::from(a.comm.as_str()),
            None => Arc::from("unknown"),
        }
    }

    fn cgroup_path(&self, id: u64, tgid: u32) -> Option<String> {
        if id == 0 {
            return None;
        }
        if let Some(hit) = self.cgroup_paths.lock().get(&id) {
            return hit.clone();
        }
        let found = self.proc_cgroup_path(tgid, id).or_else(|| self.walk_for_id(id));
        self.cgroup_paths.lock().put(id, found.clone());
        found
    }

    /// Fast path: `/proc/<pid>/cgroup` line `0::/path`, confirmed by the directory's inode
    /// (the cgroup id) so a recycled pid cannot mislabel a connection.
    fn proc_cgroup_path(&self, tgid: u32, id: u64) -> Option<String> {
        let root = self.cgroup_root.as_ref()?;
        let text = std::fs::read_to_string(self.proc_root.join(tgid.to_string()).join("cgroup")).ok()?;
        let path = text.lines().find_map(|l| l.strip_prefix("0::"))?.to_string();
        let ino = std::fs::metadata(root.join(path.trim_start_matches('/'))).ok()?.ino();
        (ino == id).then_some(path)
    }

    /// Slow path for processes already gone: the cgroup id is the inode of its directory.
    fn walk_for_id(&self, id: u64) -> Option<String> {
        let root = self.cgroup_root.as_ref()?;
        let mut stack = vec![root.clone()];
        let mut visited = 0usize;
        while let Some(dir) = stack.pop() {
            visited += 1;
            if visited > 100_000 {
                return None;
            }
            let Ok(md) = std::fs::metadata(&dir) else { continue };
            if md.ino() == id {
                return Some(relative_cgroup_path(root, &dir));
            }
            let Ok(rd) = std::fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        None
    }
}

fn relative_cgroup_path(root: &Path, dir: &Path) -> String {
    match dir.strip_prefix(root) {
        Ok(rel) if rel.as_os_str().is_empty() => "/".to_string(),
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => dir.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AgentSelector;

    fn agent(cg: Option<&str>, comm: &str) -> Agent {
        let mut a = Agent::unknown("");
        a.cgroup_path = cg.map(String::from);
        a.comm = comm.into();
        a.uid = 1000;
        a
    }

    #[test]
    fn selectors_then_leaf_then_comm() {
        let r = AgentResolver::new(
            &[AgentConfig {
                name: "billing".into(),
                selector: AgentSelector {
                    cgroup: Some("/agents/billing/**".into()),
                    uid: Some(1000),
                    ..Default::default()
                },
            }],
            None,
        );
        assert_eq!(&*r.name_for(&agent(Some("/agents/billing/worker-1"), "python3")), "billing");
        assert_eq!(&*r.name_for(&agent(Some("/agents/search"), "python3")), "search");
        assert_eq!(&*r.name_for(&agent(Some("/"), "curl")), "curl");
        assert_eq!(&*r.name_for(&agent(None, "")), "unknown");
    }

    #[test]
    fn pods_are_named_by_selector_then_pod_agent() {
        use crate::capture::kubernetes::{PodInfo, PodStore, Workload};
        let uid = "0d5bd5f4-2b5e-4e3a-9c1f-3b2a1d0e9f87";
        let store = Arc::new(PodStore::new(4));
        store.upsert(PodInfo {
            uid: uid.into(),
            namespace: "team-a".into(),
            name: "chat-1".into(),
            service_account: Some("chat-sa".into()),
            workload: Workload { kind: "Deployment".into(), name: "chat".into() },
            labels: [("tier".to_string(), "gold".to_string())].into(),
            annotations: Default::default(),
            qos_class: None,
            capture: true,
            agent: Arc::from("team-a/chat"),
            ips: vec![std::net::IpAddr::from([10, 244, 1, 7])],
        });
        // A connection to the pod's address names it (the callee of an A2A hop).
        let by_ip = AgentResolver::new(&[], None).with_pods(Some(store.clone()));
        assert_eq!(by_ip.pod_agent_at([10, 244, 1, 7].into()).as_deref(), Some("team-a/chat"));
        assert!(by_ip.pod_agent_at([10, 244, 1, 8].into()).is_none());
        assert!(AgentResolver::new(&[], None).pod_agent_at([10, 244, 1, 7].into()).is_none(), "no pod store");
        let sel = |name: &str, s: AgentSelector| AgentConfig { name: name.into(), selector: s };
        let path = format!(
            "/kubepods.slice/kubepods-pod{}.slice/cri-containerd-{}.scope",
            uid.replace('-', "_"),
            "ab".repeat(32)
        );
        let resolve = |agents: &[AgentConfig]| {
            let r = AgentResolver::new(agents, None).with_pods(Some(store.clone()));
            let mut a = agent(Some(&path), "python3");
            a.k8s = r.k8s_identity(a.cgroup_path.as_deref());
            (r.name_for(&a), a)
        };
        let (name, a) = resolve(&[]);
        assert_eq!(&*name, "team-a/chat");
        let k = a.k8s.unwrap();
        assert_eq!((k.pod_uid.as_str(), k.container_id.as_deref()), (uid, Some("ab".repeat(32).as_str())));
        let gold = AgentSelector {
            namespace: Some("team-a".into()),
            workload: Some("chat".into()),
            service_account: Some("chat-sa".into()),
            labels: [("tier".to_string(), "gold".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(&*resolve(&[sel("gold-chat", gold.clone())]).0, "gold-chat");
        let other_ns = AgentSelector { namespace: Some("team-b".into()), ..gold.clone() };
        assert_eq!(&*resolve(&[sel("x", other_ns)]).0, "team-a/chat");
        let other_label = AgentSelector { labels: [("tier".to_string(), "free".to_string())].into(), ..gold };
        assert_eq!(&*resolve(&[sel("x", other_label)]).0, "team-a/chat");
        // A Kubernetes selector never matches a host process.
        let r = AgentResolver::new(
            &[sel("x", AgentSelector { namespace: Some("team-a".into()), ..Default::default() })],
            None,
        );
        assert_eq!(&*r.name_for(&agent(Some("/agents/a"), "curl")), "a");
    }

    #[test]
    fn walk_finds_cgroup_by_inode() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        let ino = std::fs::metadata(d.path().join("a/b")).unwrap().ino();
        let r = AgentResolver::new(&[], Some(d.path().to_path_buf()));
        assert_eq!(r.cgroup_path(ino, u32::MAX).as_deref(), Some("/a/b"));
        assert_eq!(r.cgroup_path(1, u32::MAX), None);
    }

    #[test]
    fn orig_dst_v4_and_v6() {
        let mut rec = CaptureRecord { orig_dst_port: 443, family: gateway_common::AF_INET, ..Default::default() };
        rec.orig_dst_addr[..4].copy_from_slice(&[10, 1, 2, 3]);
        assert_eq!(orig_dst(&rec), "10.1.2.3:443".parse().unwrap());
        rec.family = AF_INET6;
        rec.orig_dst_addr = Ipv6Addr::LOCALHOST.octets();
        assert_eq!(orig_dst(&rec), "[::1]:443".parse().unwrap());
    }
}
