//! Typed handles on the kernel maps, taken out of the loaded `Ebpf` so each can live where it is
//! used (the rule refresher task, the accept path, the heartbeat timer) without sharing one big
//! lock. Map names come from `gateway_common::maps`, the contract with `ebpf/`.

use std::net::{IpAddr, SocketAddr};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray};
use aya::Ebpf;
use gateway_common::{
    maps, CaptureRecord, Cidr4Key, Cidr6Key, FlowKey, RuntimeConfig, AF_INET, AF_INET6, RECORD_REKEYED,
};
use parking_lot::Mutex;

/// Errors touching a map; each names the map.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// The object has no map of that name (object and loader out of sync).
    #[error("eBPF map {0} not found in the object")]
    Missing(&'static str),
    /// The map exists but has another type or key/value size than expected.
    #[error("eBPF map {name} has an unexpected type or layout: {source}")]
    Type {
        /// Map name.
        name: &'static str,
        /// aya's reason (boxed: aya's error is large).
        source: Box<MapError>,
    },
    /// A read or write failed.
    #[error("eBPF map {name}: {op} failed: {source}")]
    Op {
        /// Map name.
        name: &'static str,
        /// What was attempted.
        op: &'static str,
        /// aya's reason (boxed: aya's error is large).
        source: Box<MapError>,
    },
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, MapsError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(MapsError::Missing(name))?;
    T::try_from(map).map_err(|source| MapsError::Type { name, source: Box::new(source) })
}

/// The capture rule maps, owned by whoever keeps the rules in sync (see `rules.rs`).
pub struct RuleMaps {
    /// `TG_PORT_RULES`: port (host order) -> 1.
    pub ports: HashMap<MapData, u16, u8>,
    /// `TG_CIDR4_RULES`.
    pub cidr4: LpmTrie<MapData, Cidr4Key, u8>,
    /// `TG_CIDR6_RULES`.
    pub cidr6: LpmTrie<MapData, Cidr6Key, u8>,
}

/// Every map userspace touches.
pub struct Maps {
    /// `TG_CONFIG`, written at start and on reload; locked because aya's writes take `&mut`.
    pub config: Mutex<Array<MapData, RuntimeConfig>>,
    /// `TG_SCOPE`: config and pod entries, kept in sync by their owners.
    pub scope: super::scope::ScopeTable,
    /// `TG_HEARTBEAT`; behind a lock because aya's writes take `&mut`.
    pub heartbeat: Mutex<Array<MapData, u64>>,
    /// `TG_BY_FLOW`; locked for the get-then-delete in `FlowTable::take`.
    pub by_flow: Mutex<HashMap<MapData, FlowKey, CaptureRecord>>,
    /// `TG_BY_COOKIE`: the slot of every record; freed on take, and reaped when a connect
    /// failed before sock_ops saw it ([`Maps::reap_stale_slots`]).
    pub by_cookie: Mutex<HashMap<MapData, u64, CaptureRecord>>,
    /// `TG_COUNTERS`.
    pub counters: PerCpuArray<MapData, u64>,
    /// Rule maps, handed to the rule synchroniser.
    pub rules: Option<RuleMaps>,
}

impl Maps {
    /// Take every map out of a freshly loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Maps, MapsError> {
        Ok(Maps {
            config: Mutex::new(take(ebpf, maps::CONFIG)?),
            scope: super::scope::ScopeTable::new(take::<HashMap<MapData, u64, u8>>(ebpf, maps::SCOPE)?),
            heartbeat: Mutex::new(take(ebpf, maps::HEARTBEAT)?),
            by_flow: Mutex::new(take(ebpf, maps::BY_FLOW)?),
            by_cookie: Mutex::new(take(ebpf, maps::BY_COOKIE)?),
            counters: take(ebpf, maps::COUNTERS)?,
            rules: Some(RuleMaps {
                ports: take(ebpf, maps::PORT_RULES)?,
                cidr4: take(ebpf, maps::CIDR4_RULES)?,
                cidr6: take(ebpf, maps::CIDR6_RULES)?,
            }),
        })
    }

    /// Write the singleton runtime config (at start, and on reload when it changed).
    pub fn set_config(&self, cfg: &RuntimeConfig) -> Result<(), MapsError> {
        self.config.lock().set(0, cfg, 0).map_err(|source| MapsError::Op {
            name: maps::CONFIG,
            op: "update",
            source: Box::new(source),
        })
    }

    /// Stamp the heartbeat with CLOCK_MONOTONIC now (the clock `bpf_ktime_get_ns` reads).
    pub fn stamp_heartbeat(&self) -> Result<(), MapsError> {
        let now = monotonic_ns();
        self.heartbeat.lock().set(0, now, 0).map_err(|source| MapsError::Op {
            name: maps::HEARTBEAT,
            op: "update",
            source: Box::new(source),
        })
    }

    /// Per-CPU counters summed, indexed like `Counter::ALL`.
    pub fn counters(&self) -> Result<[u64; gateway_common::COUNTER_SLOTS as usize], MapsError> {
        let mut out = [0u64; gateway_common::COUNTER_SLOTS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = self.counters.get(&(i as u32), 0).map_err(|source| MapsError::Op {
                name: maps::COUNTERS,
                op: "lookup",
                source: Box::new(source),
            })?;
            *slot = values.iter().fold(0u64, |a, v| a.wrapping_add(*v));
        }
        Ok(out)
    }

    /// Remove and return the record of the flow `peer` (agent side) -> `local` (proxy side).
    pub fn take_flow(&self, peer: SocketAddr, local: SocketAddr) -> Option<CaptureRecord> {
        let key = flow_key(peer, local)?;
        let mut map = self.by_flow.lock();
        let rec = match map.get(&key, 0) {
            Ok(r) => r,
            Err(MapError::KeyNotFound) => return None,
            Err(e) => {
                tracing::warn!(map = maps::BY_FLOW, error = %e, "flow lookup failed");
                return None;
            }
        };
        if let Err(e) = map.remove(&key) {
            // Removed concurrently by the close callback; anything else the close callback
            // cleans up when the agent's socket closes.
            tracing::debug!(map = maps::BY_FLOW, error = %e, "flow delete failed");
        }
        drop(map);
        // Free the connection's slot, so a held connection does not count against
        // `capture.max_records`.
        match self.by_cookie.lock().remove(&rec.cookie) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => tracing::debug!(map = maps::BY_COOKIE, error = %e, "slot delete failed"),
        }
        Some(rec)
    }

    /// Remove cookie slots that sock_ops never re-keyed and that are older than `max_age`:
    /// their `connect()` failed before the SYN (no source port, no route), so no callback will
    /// ever free them. A connect re-keys within its own system call, so any age of a second or
    /// more is safe. Returns how many were removed.
    pub fn reap_stale_slots(&self, max_age: std::time::Duration) -> usize {
        let now = monotonic_ns();
        let max_age = u64::try_from(max_age.as_nanos()).unwrap_or(u64::MAX);
        let mut map = self.by_cookie.lock();
        let stale: Vec<u64> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, r)| r.flags & RECORD_REKEYED == 0 && now.saturating_sub(r.captured_at_ns) > max_age)
            .map(|(k, _)| k)
            .collect();
        stale.iter().filter(|k| map.remove(k).is_ok()).count()
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(ts.tv_nsec as u64)
}

/// An address as the kernel keys it: IPv4 (also IPv4-mapped IPv6, which is how a dual-stack
/// listener reports IPv4 peers) in the first 4 bytes, or IPv6.
fn addr_bytes(ip: IpAddr) -> (u16, [u8; 16]) {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            (AF_INET, b)
        }
        IpAddr::V6(v6) => (AF_INET6, v6.octets()),
    }
}

/// The `TG_BY_FLOW` key for a connection accepted by the proxy; `None` for mixed families.
pub fn flow_key(peer: SocketAddr, local: SocketAddr) -> Option<FlowKey> {
    let (fam_src, src_addr) = addr_bytes(peer.ip());
    let (fam_dst, dst_addr) = addr_bytes(local.ip());
    if fam_src != fam_dst {
        return None;
    }
    Some(FlowKey { src_addr, dst_addr, src_port: peer.port(), dst_port: local.port(), family: fam_src, _pad: 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_key_unmaps_v4_mapped_peers() {
        let a = flow_key("127.0.0.1:40000".parse().unwrap(), "127.0.0.1:15001".parse().unwrap());
        let b = flow_key("[::ffff:127.0.0.1]:40000".parse().unwrap(), "[::ffff:127.0.0.1]:15001".parse().unwrap());
        assert_eq!(a, b);
        let a = a.unwrap();
        assert_eq!(a.family, AF_INET);
        assert_eq!(&a.src_addr[..4], &[127, 0, 0, 1]);
        assert_eq!(a.src_port, 40000);
        assert_eq!(a.dst_port, 15001);
        let v6 = flow_key("[::1]:1".parse().unwrap(), "[::1]:2".parse().unwrap()).unwrap();
        assert_eq!(v6.family, AF_INET6);
        assert_eq!(v6.src_addr[15], 1);
        assert!(flow_key("[::1]:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap()).is_none());
    }

    #[test]
    fn monotonic_clock_moves() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }
}
