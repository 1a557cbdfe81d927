//! What tollgate learnt about each Streamable HTTP session (`Mcp-Session-Id`): the client and
//! server implementations and the protocol version `initialize` negotiated, so every later
//! request of the session is logged with them. Bounded: past [`MAX_SESSIONS`] an arbitrary
//! entry is forgotten (sessions whose DELETE never came would otherwise accumulate).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

/// Sessions remembered at most.
const MAX_SESSIONS: usize = 4096;

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
    let mut t = table().lock();
    if t.len() >= MAX_SESSIONS && !t.contains_key(id) {
        if let Some(k) = t.keys().next().cloned() {
            t.remove(&k);
        }
    }
    t.insert(id.to_string(), Arc::new(info));
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
        for i in 0..MAX_SESSIONS + 10 {
            record(&format!("s-bound-{i}"), SessionInfo::default());
        }
        assert!(table().lock().len() <= MAX_SESSIONS);
    }
}
