//! What tollgate learnt about each Streamable HTTP session (`Mcp-Session-Id`): the client and
//! server implementations and the protocol version `initialize` negotiated, so every later
//! request of the session is logged with them. Bounded by `mcp.max_sessions` ([`set_max`]):
//! past it an arbitrary entry is forgotten (sessions whose DELETE never came would otherwise
//! accumulate).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

use crate::config::mcp::DEFAULT_MAX_SESSIONS;

/// Sessions remembered at most (`mcp.max_sessions` of the current config generation).
static MAX_SESSIONS: AtomicUsize = AtomicUsize::new(DEFAULT_MAX_SESSIONS);

/// Bound the table at `n` sessions (at least 1): `mcp.max_sessions`, applied by every config
/// generation. The table is process-wide (sessions outlive a reload), so the bound is too; a
/// lower bound trims the table at the next session recorded.
pub fn set_max(n: usize) {
    MAX_SESSIONS.store(n.max(1), Ordering::Relaxed);
}

/// Facts of one session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionInfo {
    /// Client `name/version`.
    pub client: Option<String>,
    /// Server `name/version`.
    pub server: Option<String>,
    /// Negotiated protocol version.
    pub protocol_version: Option<String>,
}

fn table() -> &'static Mutex<HashMap<String, Arc<SessionInfo>>> {
    static T: OnceLock<Mutex<HashMap<String, Arc<SessionInfo>>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Remember `info` for session `id` (the answer to its `initialize`).
pub fn record(id: &str, info: SessionInfo) {
    insert_bounded(&mut table().lock(), MAX_SESSIONS.load(Ordering::Relaxed), id, Arc::new(info));
}

/// Insert `v` under `k`, first forgetting arbitrary other entries until a new one fits `max`.
fn insert_bounded<V>(t: &mut HashMap<String, V>, max: usize, k: &str, v: V) {
    if !t.contains_key(k) {
        while t.len() >= max.max(1) {
            let Some(victim) = t.keys().next().cloned() else { break };
            t.remove(&victim);
        }
    }
    t.insert(k.to_string(), v);
}

/// What is known of session `id`.
pub fn get(id: &str) -> Option<Arc<SessionInfo>> {
    table().lock().get(id).cloned()
}

/// The session ended (DELETE).
pub fn forget(id: &str) {
    table().lock().remove(id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_until_forgotten_and_bounded() {
        let info = SessionInfo { client: Some("c/1".into()), ..Default::default() };
        record("s-test-1", info.clone());
        assert_eq!(get("s-test-1").as_deref(), Some(&info));
        forget("s-test-1");
        assert!(get("s-test-1").is_none());
        let max = MAX_SESSIONS.load(Ordering::Relaxed);
        for i in 0..max + 10 {
            record(&format!("s-bound-{i}"), SessionInfo::default());
        }
        assert!(table().lock().len() <= max);
    }

    #[test]
    fn a_lower_bound_trims_at_the_next_insert() {
        let mut t = HashMap::new();
        for i in 0..10 {
            insert_bounded(&mut t, 10, &i.to_string(), i);
        }
        assert_eq!(t.len(), 10);
        insert_bounded(&mut t, 10, "3", 33);
        assert_eq!((t.len(), t.get("3")), (10, Some(&33)), "replacing needs no room");
        insert_bounded(&mut t, 4, "new", 1);
        assert_eq!(t.len(), 4);
        assert!(t.contains_key("new"));
        insert_bounded(&mut t, 0, "one", 1);
        assert_eq!(t.len(), 1, "a bound of 0 keeps one");
    }
}
