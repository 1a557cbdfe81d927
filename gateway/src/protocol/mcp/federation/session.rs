//! Client sessions of a federation endpoint: the `Mcp-Session-Id` tollgate minted at
//! `initialize`, whose agent opened it, what the client said about itself, one upstream session
//! slot per HTTP server, and the name routes of the session's latest lists. Bounded by
//! `max_sessions` (least recently used ended first) and `session_idle_timeout`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;

use super::names::Route;
use super::upstream::Slot;

/// Name routes learnt from the session's lists, per kind.
#[derive(Default)]
pub struct Routes {
    /// Exposed tool name to server and original name.
    pub tools: HashMap<String, Route>,
    /// Exposed prompt name to server and original name.
    pub prompts: HashMap<String, Route>,
    /// Resource URI (or template) to server.
    pub resources: HashMap<String, Route>,
    /// When an unknown name last made the session list again, per list kind: at most once a
    /// second, so a client sending unknown names cannot multiply upstream lists.
    relisted: HashMap<&'static str, Instant>,
}

impl Routes {
    /// Whether a list of `kind` may be fetched again to resolve an unknown name (and note it).
    pub fn may_relist(&mut self, kind: &'static str) -> bool {
        let now = Instant::now();
        match self.relisted.get(kind) {
            Some(t) if now.duration_since(*t) < Duration::from_secs(1) => false,
            _ => {
                self.relisted.insert(kind, now);
                true
            }
        }
    }
}

/// One client session.
pub struct Session {
    /// `Mcp-Session-Id`.
    pub id: String,
    /// Agent that opened it: other agents cannot use it.
    pub agent: Arc<str>,
    /// OAuth subject that opened it, when the endpoint checks tokens: other subjects cannot
    /// use it.
    pub owner: Option<String>,
    /// `clientInfo` from the client's `initialize` (sent upstream on HTTP initialisation).
    pub client_info: Value,
    /// `name/version` of the client.
    pub client_label: String,
    /// Protocol version tollgate negotiated with the client.
    pub version: &'static str,
    /// Upstream session per server (index as in the federation).
    pub slots: Vec<Slot>,
    /// Routes of the latest lists.
    pub routes: Mutex<Routes>,
    last_used: Mutex<Instant>,
}

impl Session {
    /// A new session for `agent`.
    pub fn new(
        id: String,
        agent: Arc<str>,
        owner: Option<String>,
        client_info: Value,
        version: &'static str,
        servers: usize,
    ) -> Session {
        let name = client_info.get("name").and_then(Value::as_str).unwrap_or("");
        let ver = client_info.get("version").and_then(Value::as_str).unwrap_or("");
        let client_label = if ver.is_empty() { name.to_string() } else { format!("{name}/{ver}") };
        Session {
            id,
            agent,
            owner,
            client_info,
            client_label,
            version,
            slots: (0..servers).map(|_| Slot::default()).collect(),
            routes: Mutex::new(Routes::default()),
            last_used: Mutex::new(Instant::now()),
        }
    }

    fn touch(&self) {
        *self.last_used.lock() = Instant::now();
    }

    fn idle(&self) -> Duration {
        self.last_used.lock().elapsed()
    }

    fn belongs_to(&self, agent: &str, owner: Option<&str>) -> bool {
        &*self.agent == agent && self.owner.as_deref() == owner
    }
}

/// Why a request names no usable session.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    /// Not initialised: the header is missing.
    #[error("missing Mcp-Session-Id: send initialize first")]
    Missing,
    /// Unknown, expired, ended, or another agent's session.
    #[error("unknown or expired session")]
    Unknown,
}

/// The session table of one federation.
pub struct Sessions {
    map: Mutex<HashMap<String, Arc<Session>>>,
    max: usize,
    idle: Duration,
}

impl Sessions {
    /// An empty table.
    pub fn new(max: usize, idle: Duration) -> Sessions {
        Sessions { map: Mutex::new(HashMap::new()), max: max.max(1), idle }
    }

    /// Add a session; returns the sessions ended to make room or because they idled out
    /// (their upstream sessions are the caller's to close).
    pub fn insert(&self, s: Arc<Session>) -> Vec<Arc<Session>> {
        let mut ended = self.sweep();
        let mut m = self.map.lock();
        while m.len() >= self.max {
            let Some(oldest) = m.values().max_by_key(|v| v.idle()).map(|v| v.id.clone()) else { break };
            if let Some(v) = m.remove(&oldest) {
                ended.push(v);
            }
        }
        m.insert(s.id.clone(), s);
        ended
    }

    /// Remove the sessions idle past the timeout; returns them.
    pub fn sweep(&self) -> Vec<Arc<Session>> {
        let mut ended = Vec::new();
        let idle = self.idle;
        self.map.lock().retain(|_, v| {
            let keep = v.idle() < idle;
            if !keep {
                ended.push(v.clone());
            }
            keep
        });
        ended
    }

    /// The session a request names, if it belongs to `agent` (and token subject `owner`).
    pub fn get(&self, id: Option<&str>, agent: &str, owner: Option<&str>) -> Result<Arc<Session>, SessionError> {
        let id = id.ok_or(SessionError::Missing)?;
        let m = self.map.lock();
        let s =
            m.get(id).filter(|s| s.belongs_to(agent, owner) && s.idle() < self.idle).ok_or(SessionError::Unknown)?;
        s.touch();
        Ok(s.clone())
    }

    /// End a session (DELETE); returns it so its upstream sessions can be closed.
    pub fn remove(&self, id: &str, agent: &str, owner: Option<&str>) -> Option<Arc<Session>> {
        let mut m = self.map.lock();
        if m.get(id).is_some_and(|s| s.belongs_to(agent, owner)) {
            return m.remove(id);
        }
        None
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Whether there are no sessions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A fresh unguessable session id (128 random bits, hex; visible ASCII as the spec requires).
pub fn new_id() -> String {
    let n: u128 = rand::random();
    format!("{n:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: &str, agent: &str) -> Arc<Session> {
        Arc::new(Session::new(
            id.into(),
            Arc::from(agent),
            None,
            serde_json::json!({"name": "c", "version": "1"}),
            "2025-06-18",
            2,
        ))
    }

    #[test]
    fn sessions_belong_to_their_agent_and_are_bounded() {
        let t = Sessions::new(2, Duration::from_secs(60));
        assert!(t.insert(s("a", "bot")).is_empty());
        assert_eq!(t.get(Some("a"), "bot", None).unwrap().client_label, "c/1");
        assert_eq!(t.get(Some("a"), "other", None).err(), Some(SessionError::Unknown));
        assert_eq!(t.get(None, "bot", None).err(), Some(SessionError::Missing));
        t.insert(s("b", "bot"));
        std::thread::sleep(Duration::from_millis(5));
        t.get(Some("a"), "bot", None).unwrap();
        let ended = t.insert(s("c", "bot"));
        assert_eq!(ended.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["b"], "least recently used goes");
        assert!(t.remove("a", "other", None).is_none());
        assert!(t.remove("a", "bot", None).is_some());
        assert_eq!(t.len(), 1);
        assert_ne!(new_id(), new_id());
        assert_eq!(new_id().len(), 32);
    }

    #[test]
    fn sessions_belong_to_their_token_subject() {
        let t = Sessions::new(4, Duration::from_secs(60));
        let owned =
            Session::new("o".into(), Arc::from("bot"), Some("alice".into()), serde_json::json!({}), "2025-06-18", 1);
        t.insert(Arc::new(owned));
        assert!(t.get(Some("o"), "bot", Some("alice")).is_ok());
        assert_eq!(t.get(Some("o"), "bot", Some("mallory")).err(), Some(SessionError::Unknown));
        assert_eq!(t.get(Some("o"), "bot", None).err(), Some(SessionError::Unknown));
        assert!(t.remove("o", "bot", Some("mallory")).is_none());
    }

    #[test]
    fn unknown_names_relist_at_most_once_a_second() {
        let mut r = Routes::default();
        assert!(r.may_relist("tools"));
        assert!(!r.may_relist("tools"));
        assert!(r.may_relist("prompts"), "kinds are separate");
    }

    #[test]
    fn idle_sessions_expire() {
        let t = Sessions::new(10, Duration::from_millis(1));
        t.insert(s("a", "bot"));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(t.get(Some("a"), "bot", None).err(), Some(SessionError::Unknown));
        assert_eq!(t.insert(s("b", "bot")).len(), 1);
    }
}
