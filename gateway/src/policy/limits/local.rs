//! In-memory counters: the `local` backend, and what a `redis` backend decides with while
//! Redis is unreachable (fail-open).
//!
//! Counters live in N shards of `parking_lot::Mutex<HashMap>` chosen by key hash, so calls of
//! different agents rarely contend; a call that touches several limits locks their shards in
//! index order (no deadlock) for the few hundred nanoseconds the check-and-add takes, which is
//! what makes a multi-limit reservation all-or-nothing. Never held across an `.await`.
//!
//! Memory is bounded by `max_keys`: inserting into a full shard first drops the shard's
//! expired counters, then the counter closest to expiry (an eviction forgives that counter's
//! usage, counted in [`LocalBackend::evictions`]).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};

use super::rules::{fits, Counts, Slot};

#[derive(Debug, Clone, Copy)]
struct Counter {
    /// Bucket number `cur` belongs to; `prev` is bucket - 1.
    bucket: u64,
    prev: u64,
    cur: u64,
    /// Unix ms after which the counter no longer matters.
    expires_ms: u64,
}

impl Counter {
    /// The counts as seen from `bucket` (rolled forward, not stored).
    fn at(&self, bucket: u64) -> Counts {
        match bucket.checked_sub(self.bucket) {
            Some(0) => Counts { prev: self.prev, cur: self.cur },
            Some(1) => Counts { prev: self.cur, cur: 0 },
            Some(_) => Counts::default(),
            // The wall clock stepped back: keep counting in the newer bucket.
            None => Counts { prev: self.prev, cur: self.cur },
        }
    }

    fn roll(&mut self, bucket: u64) {
        if bucket > self.bucket {
            let c = self.at(bucket);
            *self = Counter { bucket, prev: c.prev, cur: c.cur, expires_ms: self.expires_ms };
        }
    }
}

type Shard = HashMap<String, Counter>;

/// Sharded, bounded in-memory counter table.
pub struct LocalBackend {
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    hasher: RandomState,
    evictions: AtomicU64,
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackend")
            .field("shards", &self.shards.len())
            .field("per_shard", &self.per_shard)
            .finish_non_exhaustive()
    }
}

impl LocalBackend {
    /// A table of at most `max_keys` counters (rounded up to a multiple of `shards`).
    pub fn new(max_keys: usize, shards: usize) -> Self {
        let shards = shards.max(1);
        let per_shard = max_keys.max(1).div_ceil(shards);
        Self {
            shards: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard,
            hasher: RandomState::new(),
            evictions: AtomicU64::new(0),
        }
    }

    /// Counters forgiven because the table was full of live counters; exported as a metric
    /// so an operator sees when `max_keys` is too small.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Counters currently held (all shards; for tests and a gauge).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether no counter is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard_of(&self, key: &str) -> usize {
        (self.hasher.hash_one(key) % self.shards.len() as u64) as usize
    }

    /// Checks every slot and, only if all fit, adds each slot's amount to its current bucket.
    /// Returns whether the call was admitted and each slot's counts (after the add if so).
    pub(super) fn reserve(&self, slots: &[Slot], now_ms: u64) -> (bool, Vec<Counts>) {
        let idx: Vec<usize> = slots.iter().map(|s| self.shard_of(&s.key)).collect();
        let mut order = idx.clone();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<(usize, MutexGuard<'_, Shard>)> =
            order.iter().map(|&i| (i, self.shards[i].lock())).collect();
        let shard = |i: usize| -> usize { guards.binary_search_by_key(&i, |(k, _)| *k).unwrap_or(0) };
        let positions: Vec<usize> = idx.iter().map(|&i| shard(i)).collect();

        let mut counts: Vec<Counts> = slots
            .iter()
            .zip(&positions)
            .map(|(s, &p)| guards[p].1.get(&s.key).map(|c| c.at(s.geom.bucket)).unwrap_or_default())
            .collect();
        let admitted = slots.iter().zip(&counts).all(|(s, c)| fits(s, *c));
        if admitted {
            for ((slot, &p), out) in slots.iter().zip(&positions).zip(counts.iter_mut()) {
                let map = &mut guards[p].1;
                if !map.contains_key(&slot.key) && map.len() >= self.per_shard {
                    self.make_room(map, now_ms);
                }
                let expires_ms = now_ms.saturating_add(slot.ttl_ms(now_ms));
                let c = map.entry(slot.key.clone()).or_insert(Counter {
                    bucket: slot.geom.bucket,
                    prev: 0,
                    cur: 0,
                    expires_ms,
                });
                c.roll(slot.geom.bucket);
                c.cur = c.cur.saturating_add(slot.amount);
                c.expires_ms = c.expires_ms.max(expires_ms);
                *out = c.at(slot.geom.bucket);
            }
        }
        (admitted, counts)
    }

    /// Adds `delta` (negative: gives back) to the bucket a reservation was made in, if the
    /// counter still holds that bucket; counts never go below zero.
    pub(super) fn adjust(&self, key: &str, bucket: u64, delta: i64) {
        if delta == 0 {
            return;
        }
        let mut map = self.shards[self.shard_of(key)].lock();
        let Some(c) = map.get_mut(key) else { return };
        let apply = |v: &mut u64| {
            *v =
                if delta >= 0 { v.saturating_add(delta.unsigned_abs()) } else { v.saturating_sub(delta.unsigned_abs()) }
        };
        if c.bucket == bucket {
            apply(&mut c.cur);
        } else if c.bucket == bucket.wrapping_add(1) {
            apply(&mut c.prev);
        }
    }

    fn make_room(&self, map: &mut Shard, now_ms: u64) {
        map.retain(|_, c| c.expires_ms > now_ms);
        while map.len() >= self.per_shard {
            let Some(victim) = map.iter().min_by_key(|(_, c)| c.expires_ms).map(|(k, _)| k.clone()) else {
                return;
            };
            map.remove(&victim);
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
    }
}
