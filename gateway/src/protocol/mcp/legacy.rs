//! The legacy HTTP+SSE transport (protocol 2024-11-05): the agent opens `GET /sse`, the server's
//! first event (`endpoint`) names the URL to POST messages to (`/messages?session_id=...`), and
//! every answer travels on that GET stream while each POST gets `202 Accepted`. Governing it
//! links the two: the GET stream registers itself under its session id, POSTs of the session
//! tell it which `tools/list` answers to filter, and a denied call's JSON-RPC error is injected
//! into the stream as the server would send it.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::mpsc;

/// Legacy streams tracked at most (a GET stream unregisters when it ends).
const MAX_STREAMS: usize = 4096;
/// Most `tools/list` ids a legacy stream waits for at once.
pub(super) const MAX_PENDING_LISTS: usize = 256;

/// One agent's open legacy GET stream, as the POSTs of its session see it.
pub struct LegacyStream {
    /// The agent that opened the stream: only its own POSTs may use it.
    pub agent: Arc<str>,
    /// Ids (JSON text) of `tools/list` requests whose answers must be filtered on the stream.
    pub list_ids: Mutex<Vec<String>>,
    /// Events to write into the stream (tollgate's own answers), bounded by
    /// `mcp.legacy_queue_len`: the stream's body takes them only as fast as the agent reads.
    pub inject: mpsc::Sender<Bytes>,
}

/// Why answers could not be queued on a legacy stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    /// The agent has not read the events queued before (`mcp.legacy_queue_len` of them).
    #[error("the legacy stream's queue is full (mcp.legacy_queue_len)")]
    Full,
    /// The stream ended.
    #[error("the legacy stream is closed")]
    Closed,
}

impl LegacyStream {
    /// A stream whose queue holds at most `queue_len` events (at least 1), and the receiver
    /// its body polls for injected events.
    pub fn new(agent: Arc<str>, queue_len: usize) -> (Arc<Self>, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(queue_len.max(1));
        (Arc::new(LegacyStream { agent, list_ids: Mutex::new(Vec::new()), inject: tx }), rx)
    }

    /// Queue JSON-RPC messages as SSE `message` events, all or none (a batch's answers are
    /// never split, so the agent gets every answer or an error for the POST).
    pub fn send_messages(&self, jsons: &[Vec<u8>]) -> Result<(), InjectError> {
        if jsons.is_empty() {
            return Ok(());
        }
        let permits = self.inject.try_reserve_many(jsons.len()).map_err(|e| match e {
            mpsc::error::TrySendError::Full(()) => InjectError::Full,
            mpsc::error::TrySendError::Closed(()) => InjectError::Closed,
        })?;
        for (permit, json) in permits.zip(jsons) {
            let mut ev = Vec::with_capacity(json.len() + 24);
            ev.extend_from_slice(b"event: message\r\ndata: ");
            ev.extend_from_slice(json);
            ev.extend_from_slice(b"\r\n\r\n");
            permit.send(Bytes::from(ev));
        }
        Ok(())
    }

    /// Queue one JSON-RPC message as an SSE `message` event.
    pub fn send_message(&self, json: &[u8]) -> Result<(), InjectError> {
        self.send_messages(&[json.to_vec()])
    }
}

fn table() -> &'static Mutex<HashMap<String, Arc<LegacyStream>>> {
    static T: OnceLock<Mutex<HashMap<String, Arc<LegacyStream>>>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The stream of session `id` is open.
pub fn register(id: &str, s: Arc<LegacyStream>) {
    let mut t = table().lock();
    if t.len() >= MAX_STREAMS && !t.contains_key(id) {
        // Streams whose body is gone first; only then an arbitrary live one.
        t.retain(|_, s| !s.inject.is_closed());
        if t.len() >= MAX_STREAMS {
            if let Some(k) = t.keys().next().cloned() {
                t.remove(&k);
            }
        }
    }
    t.insert(id.to_string(), s);
}

/// The open stream of session `id`, when `agent` opened it (a session id learnt by another
/// agent gives no access to the stream).
pub fn lookup(id: &str, agent: &str) -> Option<Arc<LegacyStream>> {
    table().lock().get(id).filter(|s| &*s.agent == agent).cloned()
}

/// The stream of session `id` ended.
pub fn unregister(id: &str) {
    table().lock().remove(id);
}

/// The session id in a query string (`session_id=` as the Python SDK names it, `sessionId=` as
/// the TypeScript SDK does).
pub fn session_of_query(q: &str) -> Option<&str> {
    let mut ids =
        q.split('&').filter_map(|kv| kv.strip_prefix("session_id=").or_else(|| kv.strip_prefix("sessionId=")));
    let first = ids.next()?;
    // Servers disagree on which of repeated parameters wins: such a query names no stream.
    ids.next().is_none().then_some(first)
}

/// The session id of an `endpoint` event's data (a path or URL with the session in its query).
pub fn session_of_endpoint(data: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(data).ok()?.trim();
    if s.starts_with('{') {
        return None;
    }
    let q = s.split_once('?')?.1;
    session_of_query(q).filter(|id| !id.is_empty()).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_from_endpoint_and_query() {
        assert_eq!(session_of_endpoint(b"/messages/?session_id=ab12").as_deref(), Some("ab12"));
        assert_eq!(session_of_endpoint(b"http://h/m?x=1&sessionId=z").as_deref(), Some("z"));
        assert_eq!(session_of_endpoint(b"{\"jsonrpc\":\"2.0\"}"), None);
        assert_eq!(session_of_endpoint(b"/messages/"), None);
        assert_eq!(session_of_query("session_id=q"), Some("q"));
        assert_eq!(session_of_query("session_id=bogus&session_id=q"), None, "ambiguous");
    }

    #[test]
    fn injected_events_reach_the_receiver_until_dropped() {
        let (s, mut rx) = LegacyStream::new(Arc::from("agent-a"), 4);
        register("leg-1", s.clone());
        assert!(lookup("leg-1", "agent-b").is_none(), "another agent's stream");
        assert!(lookup("leg-1", "agent-a").is_some_and(|l| l.send_message(b"{}").is_ok()));
        assert_eq!(rx.try_recv().ok().as_deref(), Some(&b"event: message\r\ndata: {}\r\n\r\n"[..]));
        unregister("leg-1");
        assert!(lookup("leg-1", "agent-a").is_none());
        drop(rx);
        assert_eq!(s.send_message(b"{}"), Err(InjectError::Closed));
    }

    /// An agent that stops reading its stream fills the queue; answers past it are refused
    /// whole (never half a batch) until the agent reads again.
    #[test]
    fn the_queue_is_bounded_and_refuses_whole_batches() {
        let (s, mut rx) = LegacyStream::new(Arc::from("agent-a"), 3);
        assert_eq!(s.send_messages(&[b"1".to_vec(), b"2".to_vec()]), Ok(()));
        assert_eq!(s.send_messages(&[b"3".to_vec(), b"4".to_vec()]), Err(InjectError::Full));
        assert_eq!(s.send_message(b"3"), Ok(()));
        assert_eq!(s.send_message(b"5"), Err(InjectError::Full));
        let mut got = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            got.push(ev);
        }
        assert_eq!(got.len(), 3, "nothing of the refused batch was queued");
        assert!(got[2].ends_with(b"data: 3\r\n\r\n"));
        assert_eq!(s.send_message(b"6"), Ok(()), "room again once read");
    }
}
