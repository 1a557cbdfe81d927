//! MCP JSON-RPC reader: never panics on any body, and what it reads is consistent:
//! - a body read as requests (or responses) is one message unless it is a batch, a batch is
//!   never empty, and `is_batch` agrees with the shape;
//! - a request id's text is the JSON of the id as sent, and an error reply tollgate builds for
//!   that id (`tool_denied`) reads back as a response to the same id with the denied code;
//! - `filter_tools_list` keeps a body JSON, never removes a tool it allows, and reports exactly
//!   how many tools it removed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tollgate::protocol::mcp::jsonrpc::{
    filter_tools_list, is_batch, parse_request, parse_response, tool_denied, TOOL_DENIED_CODE,
};

fn tools_count(v: &Value) -> usize {
    let one = |m: &Value| m.pointer("/result/tools").and_then(Value::as_array).map_or(0, Vec::len);
    match v {
        Value::Array(a) => a.iter().map(one).sum(),
        m => one(m),
    }
}

fuzz_target!(|data: &[u8]| {
    let batch = is_batch(data);
    if let Ok(reqs) = parse_request(data, tollgate::config::mcp::DEFAULT_MAX_BATCH_LEN) {
        assert!(!reqs.is_empty(), "an empty batch was accepted");
        if !batch {
            assert_eq!(reqs.len(), 1, "a single message read as several");
        }
        for r in &reqs {
            let raw = r.raw_id.as_ref().filter(|v| !v.is_null());
            assert_eq!(r.id, raw.map(Value::to_string), "id text is not the id's JSON");
            let reply = serde_json::to_vec(&tool_denied(r.raw_id.as_ref(), "t", "r", "a")).expect("serialise");
            let back = parse_response(&reply).expect("tollgate's own error reply must parse");
            assert_eq!(back.len(), 1);
            assert_eq!(back[0].id, r.id, "the error reply answers another id");
            assert_eq!(back[0].error.as_ref().map(|e| e.0), Some(TOOL_DENIED_CODE));
        }
    }
    if let Ok(resps) = parse_response(data) {
        assert!(!resps.is_empty(), "an empty batch was accepted");
        if !batch {
            assert_eq!(resps.len(), 1, "a single message read as several");
        }
        for r in &resps {
            assert!(r.id.is_none() || r.method.is_none(), "a notification carries a response id");
        }
    }
    // Allow tools whose name has an even length; ids of the form the proxy tracks.
    let allowed = |name: &str| name.len() % 2 == 0;
    match filter_tools_list(data, &["1", "\"a\""], &allowed) {
        Ok(Some((out, removed))) => {
            let before: Value = serde_json::from_slice(data).expect("input was JSON");
            let after: Value = serde_json::from_slice(&out).expect("filtered body is JSON");
            assert!(removed > 0, "a rewrite that removed nothing");
            assert_eq!(tools_count(&before) - tools_count(&after), removed as usize, "removed count is wrong");
        }
        Ok(None) | Err(_) => {}
    }
});
