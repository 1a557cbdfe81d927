//! Keeps the kernel scope map in step with the pod store: which pod cgroups are captured.
//!
//! - `capture: all`: every kubepods root is included, so a pod is captured from its first
//!   connect even before its watch event arrives (fail toward visibility); pods decided
//!   not-captured (opt-out annotation, disabled or excluded namespace, host network) get an
//!   exclude entry on their pod cgroup, which the programs honour below any include.
//! - `capture: opt_in`: only pods decided captured get an include entry; a new pod is captured
//!   once both its watch event and its cgroup directory have been seen (the syncer runs on every
//!   store change and every `resync_interval`, so the window is bounded by that interval).
//!
//! Pod cgroup directories are found by walking the cgroup tree (bounded depth) and parsing
//! names with [`super::cgroup_path`]; the directory inode is the kernel's cgroup id.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::cgroup_path;
use super::PodStore;
use crate::capture::scope::ScopeEntry;
use crate::config::PodCaptureMode;

/// Deepest directory (below the cgroup root) searched for kubepods roots and pod cgroups:
/// nested roots (kind, `/system.slice/...`) put pods at depth 6-8.
const MAX_WALK_DEPTH: usize = 10;
/// Most directories visited per walk, so a huge tree cannot stall the syncer.
const MAX_WALK_DIRS: usize = 200_000;

/// The kubelet's cgroups as found on disk.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KubeCgroups {
    /// cgroup ids of kubepods roots (`kubepods.slice`, `kubepods`).
    pub roots: Vec<u64>,
    /// Pod UID → cgroup id of the pod-level directory.
    pub pods: HashMap<String, u64>,
}

/// Walk `root` for kubepods roots and pod cgroups. Container directories are not descended
/// into: a pod's directory is all the scope map needs.
pub fn scan(root: &Path) -> KubeCgroups {
    let mut out = KubeCgroups::default();
    let mut stack: Vec<(PathBuf, usize, bool)> = vec![(root.to_path_buf(), 0, false)];
    let mut visited = 0usize;
    while let Some((dir, depth, under_kubepods)) = stack.pop() {
        visited += 1;
        if visited > MAX_WALK_DIRS {
            tracing::warn!(root = %root.display(), "cgroup walk stopped after {MAX_WALK_DIRS} directories");
            break;
        }
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        for e in rd.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = e.path();
            let rel = match path.strip_prefix(root) {
                Ok(r) => format!("/{}", r.display()),
                Err(_) => continue,
            };
            let name = e.file_name();
            let name = name.to_string_lossy();
            let is_root = !under_kubepods && is_kubepods_root(&name);
            if is_root {
                if let Ok(md) = e.metadata() {
                    out.roots.push(md.ino());
                }
            }
            if under_kubepods {
                if let Some(p) = cgroup_path::parse(&rel) {
                    if p.pod_path == rel {
                        if let Ok(md) = e.metadata() {
                            out.pods.insert(p.pod_uid, md.ino());
                        }
                    }
                    continue; // pod (or container) found: nothing deeper matters
                }
            }
            if depth + 1 < MAX_WALK_DEPTH {
                stack.push((path, depth + 1, under_kubepods || is_root));
            }
        }
    }
    out
}

fn is_kubepods_root(name: &str) -> bool {
    let n = name.strip_suffix(".slice").unwrap_or(name);
    n == "kubepods" || n.ends_with("-kubepods")
}

/// The scope entries pods need, given what is on disk and what the store decided.
pub fn entries(mode: PodCaptureMode, found: &KubeCgroups, store: &PodStore) -> HashMap<u64, ScopeEntry> {
    let mut out = HashMap::new();
    if mode == PodCaptureMode::All {
        for id in &found.roots {
            out.insert(*id, ScopeEntry::Include);
        }
    }
    for (uid, id) in &found.pods {
        match (store.get(uid).map(|p| p.capture), mode) {
            (Some(true), PodCaptureMode::OptIn) => {
                out.insert(*id, ScopeEntry::Include);
            }
            (Some(false), PodCaptureMode::All) => {
                out.insert(*id, ScopeEntry::Exclude);
            }
            _ => {}
        }
    }
    out
}

/// The syncer's output: replaces the pod-owned scope entries, returns how many did not fit.
pub type ScopeSink = Arc<dyn Fn(HashMap<u64, ScopeEntry>) -> usize + Send + Sync>;

/// Run the syncer until `shutdown`: on every store change and every `interval`. The returned
/// receiver fires once the first pass has written its entries, so start-up can report ready only
/// when the pods known at start are in (or out of) capture scope.
pub fn spawn(
    cgroup_root: PathBuf,
    mode: PodCaptureMode,
    interval: Duration,
    store: Arc<PodStore>,
    scope: ScopeSink,
    mut shutdown: watch::Receiver<bool>,
) -> (tokio::task::JoinHandle<()>, tokio::sync::oneshot::Receiver<()>) {
    let mut changes = store.subscribe();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let mut first = Some(first_tx);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last: Option<HashMap<u64, ScopeEntry>> = None;
        loop {
            let root = cgroup_root.clone();
            // A failed scan (panicked walk) keeps the installed entries rather than emptying them.
            let found = tokio::task::spawn_blocking(move || scan(&root)).await.ok();
            let want = found.as_ref().map(|f| entries(mode, f, &store));
            if let Some(want) = want.filter(|w| last.as_ref() != Some(w)) {
                let failed = scope(want.clone());
                if failed > 0 {
                    tracing::warn!(failed, "pod scope entries did not fit capture.max_scope_cgroups");
                } else {
                    tracing::debug!(entries = want.len(), "pod scope synced");
                    last = Some(want);
                }
            }
            if let Some(tx) = first.take() {
                let _ = tx.send(());
            }
            tokio::select! {
                _ = crate::connection::shutdown_requested(&mut shutdown) => return,
                r = changes.changed() => if r.is_err() { return },
                _ = tick.tick() => {}
            }
        }
    });
    (task, first_rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::kubernetes::{PodInfo, Workload};

    const UID_A: &str = "0d5bd5f4-2b5e-4e3a-9c1f-3b2a1d0e9f87";
    const UID_B: &str = "11111111-2222-3333-4444-555555555555";

    fn pod(uid: &str, capture: bool) -> PodInfo {
        PodInfo {
            uid: uid.into(),
            namespace: "ns".into(),
            name: "p".into(),
            service_account: None,
            workload: Workload { kind: "Pod".into(), name: "p".into() },
            labels: Default::default(),
            annotations: Default::default(),
            qos_class: None,
            capture,
            agent: Arc::from("ns/p"),
            ips: Vec::new(),
        }
    }

    #[test]
    fn scan_finds_roots_and_pods_in_both_layouts() {
        let d = tempfile::tempdir().unwrap();
        let a =
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice", UID_A.replace('-', "_"));
        let b = format!("nested/kubepods/besteffort/pod{UID_B}");
        std::fs::create_dir_all(d.path().join(&a).join("cri-containerd-4f1c2d3e5a6b.scope")).unwrap();
        std::fs::create_dir_all(d.path().join(&b).join("4f1c2d3e5a6b7c8d")).unwrap();
        std::fs::create_dir_all(d.path().join("system.slice/sshd.service")).unwrap();
        let ino = |p: &str| std::fs::metadata(d.path().join(p)).unwrap().ino();
        let found = scan(d.path());
        let mut roots = found.roots.clone();
        roots.sort();
        let mut want = vec![ino("kubepods.slice"), ino("nested/kubepods")];
        want.sort();
        assert_eq!(roots, want);
        assert_eq!(found.pods.len(), 2);
        assert_eq!(found.pods[UID_A], ino(&a));
        assert_eq!(found.pods[UID_B], ino(&b));
    }

    #[test]
    fn entries_follow_mode_and_decisions() {
        let store = PodStore::new(8);
        store.upsert(pod(UID_A, false));
        store.upsert(pod(UID_B, true));
        let found = KubeCgroups {
            roots: vec![1],
            pods: [(UID_A.to_string(), 10), (UID_B.to_string(), 11), ("unknown".into(), 12)].into(),
        };
        let all = entries(PodCaptureMode::All, &found, &store);
        assert_eq!(all, [(1, ScopeEntry::Include), (10, ScopeEntry::Exclude)].into());
        let opt = entries(PodCaptureMode::OptIn, &found, &store);
        assert_eq!(opt, [(11, ScopeEntry::Include)].into());
    }
}
