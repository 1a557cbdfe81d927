//! What tollgate answers itself for a POSTed body it refuses (a `tools/call` denied by a tool
//! rule or over a tool-call limit), and the counting that decides the latter. Kept apart from
//! the transport so the decisions can be tested without a connection.

use serde_json::Value;

use super::jsonrpc::{self, RequestFacts};
use crate::capture::Agent;
use crate::policy::mcp_limits::{ToolAdmission, ToolLimited, ToolLimits};
use crate::telemetry::mcp::{McpCall, McpVerdict};

/// Count every `tools/call` of a body against the tool-call limits, all before any is kept:
/// the first one over its limit gets the `rate_limited` verdict and is returned with its index,
/// and the counts of the others are given back (the body is refused whole, nothing is sent).
/// `None`: every call was counted for good and the body may be sent.
pub(super) async fn count_calls(
    limits: &ToolLimits,
    agent: &Agent,
    groups: &[String],
    calls: &mut [(McpCall, bool)],
) -> Option<(usize, ToolLimited)> {
    let mut held = Vec::new();
    for (i, (c, _)) in calls.iter_mut().enumerate().filter(|(_, (c, _))| c.method == "tools/call") {
        match limits.reserve(agent, groups, c.tool.as_deref().unwrap_or("")).await {
            Ok(a) => held.push(a),
            Err(l) => {
                c.verdict = McpVerdict::RateLimited(l.rule.clone());
                return Some((i, l));
            }
        }
    }
    held.into_iter().for_each(ToolAdmission::keep);
    None
}

/// The JSON-RPC answers to a refused body, one per message with an id, in order: the refused
/// call gets the error naming its rule (and for a limit, when to retry), the other requests an
/// error saying they were not sent, with the code of the refusal's kind so a client knows
/// whether retrying can help. Marks every message answered with `status` (the HTTP status the
/// agent gets).
pub(super) fn answers(
    agent: &str,
    msgs: &[RequestFacts],
    calls: &mut [(McpCall, bool)],
    limited: Option<&(usize, ToolLimited)>,
    status: u16,
) -> Vec<Value> {
    let (others_code, others) = match limited {
        Some(_) => (jsonrpc::TOOL_RATE_LIMITED_CODE, "a rate-limited"),
        None => (jsonrpc::TOOL_DENIED_CODE, "a denied"),
    };
    let mut out = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        if let Some(id) = &m.raw_id {
            let verdict = calls.get(i).map(|(c, _)| (&c.verdict, c.tool.as_deref().unwrap_or("")));
            out.push(match (verdict, limited) {
                (Some((McpVerdict::Denied(rule), tool)), _) => jsonrpc::tool_denied(Some(id), tool, rule, agent),
                (Some((McpVerdict::RateLimited(_), tool)), Some((at, l))) if *at == i => {
                    jsonrpc::tool_rate_limited(Some(id), tool, agent, l)
                }
                _ => {
                    let message = format!("tollgate: not sent: the batch contains {others} tool call");
                    jsonrpc::error_message(Some(id), others_code, &message, Value::Null)
                }
            });
        }
        if let Some((c, answered)) = calls.get_mut(i) {
            *answered |= m.raw_id.is_some();
            if !c.verdict.refused() && m.raw_id.is_some() {
                c.error = Some(format!("not sent: batch with {others} tool call"));
            }
        }
    }
    for (c, _) in calls.iter_mut() {
        c.status = status;
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::limits::TokenLimitsConfig;
    use crate::policy::limits::Limiter;

    async fn limits(yaml: &str) -> ToolLimits {
        let cfg = serde_yaml_ng::from_str(yaml).expect("yaml");
        let limiter = Limiter::new(&TokenLimitsConfig::default()).await.expect("limiter");
        ToolLimits::new(&cfg, limiter).expect("compile")
    }

    fn calls(agent: &Arc<Agent>, body: &str) -> (Vec<RequestFacts>, Vec<(McpCall, bool)>) {
        let msgs = jsonrpc::parse_request(body.as_bytes(), 64).expect("json-rpc");
        let calls = msgs
            .iter()
            .map(|m| {
                let method = m.method.clone().unwrap_or_default();
                let mut c = McpCall::new(agent.clone(), Arc::from("r"), "POST", "/mcp", method);
                c.request_id.clone_from(&m.id);
                c.tool.clone_from(&m.name);
                c.verdict = if c.method == "tools/call" { McpVerdict::Allowed } else { McpVerdict::None };
                (c, false)
            })
            .collect();
        (msgs, calls)
    }

    const CALL: &str = r#"{"jsonrpc":"2.0","id":ID,"method":"tools/call","params":{"name":"TOOL"}}"#;

    fn call(id: u32, tool: &str) -> String {
        CALL.replace("ID", &id.to_string()).replace("TOOL", tool)
    }

    /// A batch with one call over its limit is refused whole: that call gets -32029 naming the
    /// rule and the retry time, the others "not sent" with the same code, and the counts of
    /// the calls before it are given back.
    #[tokio::test]
    async fn a_batch_over_a_limit_is_refused_whole_and_gives_its_counts_back() {
        let l = limits(
            "tool_limits: [{name: search, tools: [search], limit: 1, window: 1m},
                           {name: all, limit: 3, window: 1m}]",
        )
        .await;
        let agent = Arc::new(Agent::unknown("bot"));
        let batch = format!(
            "[{},{},{},{{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}}]",
            call(1, "add"),
            call(2, "search"),
            call(3, "search")
        );
        let (msgs, mut cs) = calls(&agent, &batch);
        let (at, why) = count_calls(&l, &agent, &[], &mut cs).await.expect("over the limit");
        assert_eq!((at, why.rule.as_str()), (2, "search"));
        assert_eq!(cs[2].0.verdict, McpVerdict::RateLimited("search".into()));
        let out = answers("bot", &msgs, &mut cs, Some(&(at, why)), 200);
        assert_eq!(out.len(), 3, "one answer per request, none for the notification");
        let codes: Vec<i64> = out.iter().filter_map(|a| a["error"]["code"].as_i64()).collect();
        assert_eq!(codes, [jsonrpc::TOOL_RATE_LIMITED_CODE; 3]);
        assert_eq!(out[2]["id"], 3);
        assert_eq!(out[2]["error"]["data"]["rule"], "search");
        assert_eq!(out[2]["error"]["data"]["agent"], "bot");
        assert!(out[2]["error"]["data"]["retry_after_secs"].as_u64().is_some_and(|s| s >= 1));
        assert_eq!(out[0]["error"]["message"], "tollgate: not sent: the batch contains a rate-limited tool call");
        assert!(cs[..3].iter().all(|(c, answered)| *answered && c.status == 200));
        assert!(!cs[3].1, "a notification is not answered");
        assert_eq!(cs[0].0.error.as_deref(), Some("not sent: batch with a rate-limited tool call"));

        // Nothing of the refused batch was kept: `add`, `search` and one more fit `all` (3).
        let (_, mut cs) = calls(&agent, &format!("[{},{},{}]", call(4, "add"), call(5, "search"), call(6, "x")));
        assert!(count_calls(&l, &agent, &[], &mut cs).await.is_none());
        assert!(cs.iter().all(|(c, _)| c.verdict == McpVerdict::Allowed));
        let (_, mut cs) = calls(&agent, &call(7, "y"));
        assert_eq!(count_calls(&l, &agent, &[], &mut cs).await.map(|(_, w)| w.rule), Some("all".into()));
    }

    #[test]
    fn a_denied_call_keeps_the_denial_answers() {
        let agent = Arc::new(Agent::unknown("bot"));
        let (msgs, mut cs) = calls(&agent, &format!("[{},{}]", call(1, "delete_file"), call(2, "add")));
        cs[0].0.verdict = McpVerdict::Denied("no-delete".into());
        let out = answers("bot", &msgs, &mut cs, None, 200);
        assert_eq!(out[0]["error"]["message"], "tollgate: tool delete_file denied by rule no-delete");
        assert_eq!(out[1]["error"]["code"], jsonrpc::TOOL_DENIED_CODE);
        assert_eq!(out[1]["error"]["message"], "tollgate: not sent: the batch contains a denied tool call");
    }
}
