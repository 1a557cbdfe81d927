//! The kernel scope map as the union of two owners: static `capture.scope` entries (replaced on
//! config reload) and pod entries (replaced by the Kubernetes pod syncer). Each owner hands over
//! its whole desired set; the table diffs against what is installed, so neither can erase the
//! other's entries and a repeated sync writes nothing.

use std::collections::HashMap as StdHashMap;

use aya::maps::{HashMap, MapData};
use gateway_common::{maps, SCOPE_EXCLUDE, SCOPE_INCLUDE};
use parking_lot::Mutex;

/// Include or exclude a cgroup subtree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeEntry {
    /// This cgroup and below are captured (unless excluded deeper).
    Include,
    /// This cgroup and below are never captured.
    Exclude,
}

impl ScopeEntry {
    fn value(self) -> u8 {
        match self {
            ScopeEntry::Include => SCOPE_INCLUDE,
            ScopeEntry::Exclude => SCOPE_EXCLUDE,
        }
    }
}

/// Who owns a set of entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScopeOwner {
    /// `capture.scope` in the config.
    Config,
    /// Pods from the Kubernetes API.
    Pods,
}

/// The operations the table needs from the kernel map; a trait so the sync order can be
/// checked against a map of fixed capacity without loading BPF.
pub trait ScopeMap: Send + 'static {
    /// Insert or overwrite `id`; fails when the map is full and `id` is new.
    fn put(&mut self, id: u64, value: u8) -> Result<(), String>;
    /// Remove `id` (missing is fine).
    fn delete(&mut self, id: u64) -> Result<(), String>;
}

impl ScopeMap for HashMap<MapData, u64, u8> {
    fn put(&mut self, id: u64, value: u8) -> Result<(), String> {
        self.insert(id, value, 0).map_err(|e| e.to_string())
    }

    fn delete(&mut self, id: u64) -> Result<(), String> {
        match self.remove(&id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// `TG_SCOPE` plus the desired sets of its owners.
pub struct ScopeTable {
    inner: Mutex<Inner>,
}

struct Inner {
    map: Box<dyn ScopeMap>,
    owners: StdHashMap<ScopeOwner, StdHashMap<u64, ScopeEntry>>,
    installed: StdHashMap<u64, u8>,
}

impl ScopeTable {
    /// Wrap the (empty) scope map.
    pub fn new(map: impl ScopeMap) -> Self {
        ScopeTable {
            inner: Mutex::new(Inner { map: Box::new(map), owners: StdHashMap::new(), installed: StdHashMap::new() }),
        }
    }

    /// Replace `owner`'s entries (cgroup id → entry) and sync the map. On an id claimed by both
    /// owners, exclude wins. Returns the number of entries that could not be inserted (map
    /// full: `capture.max_scope_cgroups`); those are retried on the next sync.
    ///
    /// Near capacity the order decides what is captured, so it always errs towards "not
    /// captured": entries no longer wanted are removed first (freeing their room), then
    /// excludes are written (an exclude that finds the map full evicts an include: an opted-out
    /// pod must never be captured because its exclude did not fit), and includes last.
    pub fn set(&self, owner: ScopeOwner, entries: StdHashMap<u64, ScopeEntry>) -> usize {
        let mut g = self.inner.lock();
        g.owners.insert(owner, entries);
        let mut want: StdHashMap<u64, u8> = StdHashMap::new();
        for set in g.owners.values() {
            for (id, e) in set {
                let v = want.entry(*id).or_insert(e.value());
                if *e == ScopeEntry::Exclude {
                    *v = SCOPE_EXCLUDE;
                }
            }
        }
        let Inner { map, installed, .. } = &mut *g;
        let gone: Vec<u64> = installed.keys().filter(|id| !want.contains_key(id)).copied().collect();
        for id in gone {
            if let Err(e) = map.delete(id) {
                tracing::warn!(map = maps::SCOPE, cgroup_id = id, error = %e, "scope entry removal failed");
                continue;
            }
            installed.remove(&id);
        }
        for value in [SCOPE_EXCLUDE, SCOPE_INCLUDE] {
            for (id, v) in want.iter().filter(|(_, v)| **v == value) {
                if installed.get(id) == Some(v) {
                    continue;
                }
                let mut r = map.put(*id, *v);
                if r.is_err() && *v == SCOPE_EXCLUDE && !installed.contains_key(id) {
                    // Make room by dropping an include: that subtree is then not captured.
                    let victim = installed.iter().find(|(_, v)| **v == SCOPE_INCLUDE).map(|(id, _)| *id);
                    if let Some(victim) = victim {
                        if map.delete(victim).is_ok() {
                            installed.remove(&victim);
                            tracing::warn!(
                                map = maps::SCOPE,
                                cgroup_id = victim,
                                "scope include dropped to fit an exclude"
                            );
                            r = map.put(*id, *v);
                        }
                    }
                }
                match r {
                    Ok(()) => {
                        installed.insert(*id, *v);
                    }
                    Err(e) => {
                        tracing::warn!(map = maps::SCOPE, cgroup_id = id, error = %e, "scope entry not installed");
                    }
                }
            }
        }
        // Failed inserts, and includes dropped to fit an exclude.
        want.iter().filter(|(id, v)| installed.get(id) != Some(v)).count()
    }

    /// Entries currently in the kernel map.
    pub fn installed(&self) -> StdHashMap<u64, u8> {
        self.inner.lock().installed.clone()
    }

    /// How many entries of each kind the kernel map holds, for the scope gauge: the capture
    /// scope in force, which can lag the owners' wishes (a full map) or the pod store (the
    /// syncer runs after a store change).
    pub fn counts(&self) -> [(&'static str, u64); 2] {
        let g = self.inner.lock();
        let n = |value: u8| g.installed.values().filter(|v| **v == value).count() as u64;
        [("include", n(SCOPE_INCLUDE)), ("exclude", n(SCOPE_EXCLUDE))]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Map contents and the operations log.
    type State = (StdHashMap<u64, u8>, Vec<String>);

    /// A map of fixed capacity that logs every operation, shared with the test.
    #[derive(Clone, Default)]
    struct Fake {
        cap: usize,
        state: Arc<Mutex<State>>,
    }

    impl ScopeMap for Fake {
        fn put(&mut self, id: u64, value: u8) -> Result<(), String> {
            let mut g = self.state.lock();
            if !g.0.contains_key(&id) && g.0.len() >= self.cap {
                g.1.push(format!("put {id} E2BIG"));
                return Err("E2BIG".into());
            }
            g.0.insert(id, value);
            g.1.push(format!("put {id}"));
            Ok(())
        }

        fn delete(&mut self, id: u64) -> Result<(), String> {
            let mut g = self.state.lock();
            g.0.remove(&id);
            g.1.push(format!("delete {id}"));
            Ok(())
        }
    }

    fn table(cap: usize) -> (ScopeTable, Fake) {
        let f = Fake { cap, ..Fake::default() };
        (ScopeTable::new(f.clone()), f)
    }

    #[test]
    fn replaced_pod_entries_are_removed_before_new_ones_are_inserted_at_capacity() {
        let (t, f) = table(3);
        assert_eq!(t.set(ScopeOwner::Config, [(1, ScopeEntry::Include)].into()), 0);
        let pods = [(10, ScopeEntry::Include), (11, ScopeEntry::Exclude)];
        assert_eq!(t.set(ScopeOwner::Pods, pods.into()), 0);
        assert_eq!(f.state.lock().0.len(), 3, "map at capacity");
        f.state.lock().1.clear();
        // Pod 11 is gone and pod 12 opted out: its exclude fits only after 11 is removed.
        let pods = [(10, ScopeEntry::Include), (12, ScopeEntry::Exclude)];
        assert_eq!(t.set(ScopeOwner::Pods, pods.into()), 0);
        let (map, log) = f.state.lock().clone();
        assert_eq!(map, [(1, SCOPE_INCLUDE), (10, SCOPE_INCLUDE), (12, SCOPE_EXCLUDE)].into());
        assert_eq!(log, ["delete 11", "put 12"]);
    }

    #[test]
    fn an_exclude_that_does_not_fit_evicts_an_include_never_the_reverse() {
        let (t, f) = table(2);
        assert_eq!(t.set(ScopeOwner::Config, [(1, ScopeEntry::Include)].into()), 0);
        assert_eq!(t.set(ScopeOwner::Pods, [(10, ScopeEntry::Include)].into()), 0);
        // A pod opts out below the included root: the map is full of includes.
        let failed = t.set(ScopeOwner::Pods, [(10, ScopeEntry::Include), (11, ScopeEntry::Exclude)].into());
        assert_eq!(failed, 1, "one include could not stay");
        let map = f.state.lock().0.clone();
        assert_eq!(map.get(&11), Some(&SCOPE_EXCLUDE), "the opt-out is in the map: {map:?}");
        assert_eq!(map.len(), 2);
        assert_eq!(t.installed(), map);
        assert_eq!(t.counts(), [("include", 1), ("exclude", 1)], "the gauge shows what is in force");
        // The pod goes away: the dropped include comes back on the next sync.
        let failed = t.set(ScopeOwner::Pods, [(10, ScopeEntry::Include)].into());
        assert_eq!(failed, 0);
        assert_eq!(f.state.lock().0, [(1, SCOPE_INCLUDE), (10, SCOPE_INCLUDE)].into());
    }
}
