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

/// `TG_SCOPE` plus the desired sets of its owners.
pub struct ScopeTable {
    inner: Mutex<Inner>,
}

struct Inner {
    map: HashMap<MapData, u64, u8>,
    owners: StdHashMap<ScopeOwner, StdHashMap<u64, ScopeEntry>>,
    installed: StdHashMap<u64, u8>,
}

impl ScopeTable {
    /// Wrap the (empty) scope map.
    pub fn new(map: HashMap<MapData, u64, u8>) -> Self {
        ScopeTable { inner: Mutex::new(Inner { map, owners: StdHashMap::new(), installed: StdHashMap::new() }) }
    }

    /// Replace `owner`'s entries (cgroup id → entry) and sync the map. On an id claimed by both
    /// owners, exclude wins. Returns the number of entries that could not be inserted (map
    /// full: `capture.max_scope_cgroups`); those are retried on the next sync.
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
        let mut failed = 0;
        for (id, v) in &want {
            if installed.get(id) == Some(v) {
                continue;
            }
            match map.insert(*id, *v, 0) {
                Ok(()) => {
                    installed.insert(*id, *v);
                }
                Err(e) => {
                    failed += 1;
                    tracing::warn!(map = maps::SCOPE, cgroup_id = id, error = %e, "scope entry not installed");
                }
            }
        }
        let gone: Vec<u64> = installed.keys().filter(|id| !want.contains_key(id)).copied().collect();
        for id in gone {
            if let Err(e) = map.remove(&id) {
                tracing::warn!(map = maps::SCOPE, cgroup_id = id, error = %e, "scope entry removal failed");
            }
            installed.remove(&id);
        }
        failed
    }

    /// Entries currently in the kernel map.
    pub fn installed(&self) -> StdHashMap<u64, u8> {
        self.inner.lock().installed.clone()
    }
}
