//! The pure half of the webhook guardrail (`kind: webhook`): what tollgate sends to an external
//! checker and how it reads the answer. The HTTP call itself, its deadline and the fail mode
//! live in the request path ([`crate::policy::chain`]); keeping rendering and judging here makes
//! both testable without a network and lets `tollgate check` refuse a template that could never
//! produce JSON.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use serde_json::{json, Map, Value};

use super::walk;
use crate::config::guards::{
    MessageRole, WebhookFailMode, WebhookGuardConfig, WebhookPhase, WebhookRule, WebhookStreams,
};
use crate::protocol::llm::api::Api;

/// A webhook guard's config that cannot work: the field (relative to the guard) and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct WebhookError {
    /// Field below the guard (`url`, `request_template`, `response.pointer`, ...).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// One piece of a parsed request template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Field(Field),
}

/// A placeholder of the request template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Phase,
    Agent,
    Namespace,
    Route,
    Model,
    Text,
    Messages,
}

impl Field {
    fn parse(name: &str) -> Option<Field> {
        Some(match name {
            "phase" => Field::Phase,
            "agent" => Field::Agent,
            "namespace" => Field::Namespace,
            "route" => Field::Route,
            "model" => Field::Model,
            "text" => Field::Text,
            "messages" => Field::Messages,
            _ => return None,
        })
    }
}

/// Who is calling and what, for the template's placeholders.
#[derive(Debug, Clone, Copy)]
pub struct WebhookSubject<'a> {
    /// Agent name.
    pub agent: &'a str,
    /// Kubernetes namespace, when known.
    pub namespace: Option<&'a str>,
    /// Route name.
    pub route: &'a str,
    /// Requested model.
    pub model: Option<&'a str>,
}

/// What the webhook said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judgement {
    /// The call may go on.
    Allow,
    /// The call is refused; the webhook's reason when it gave one.
    Block(Option<String>),
}

/// One compiled webhook guard.
#[derive(Debug)]
pub struct WebhookGuard {
    /// Guard name (verdicts, refusals).
    pub name: Arc<str>,
    /// Absolute endpoint.
    pub uri: Uri,
    /// Input, output or both.
    pub phase: WebhookPhase,
    /// Deadline of one call.
    pub timeout: Duration,
    /// Behaviour when the webhook cannot answer.
    pub on_error: WebhookFailMode,
    /// Extra request headers.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Streamed responses on the output phase: unchecked or refused.
    pub streams: WebhookStreams,
    template: Option<Vec<Piece>>,
    rule: WebhookRule,
    roles: Vec<MessageRole>,
}

impl WebhookGuard {
    /// Check and compile one `kind: webhook` guard.
    pub fn new(cfg: &WebhookGuardConfig) -> Result<Self, WebhookError> {
        let bad = |field: &str, message: String| WebhookError { field: field.into(), message };
        let uri: Uri = cfg.url.parse().map_err(|e| bad("url", format!("not a URL: {e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.authority().is_none() {
            return Err(bad("url", format!("{:?} must be an absolute http:// or https:// URL", cfg.url)));
        }
        if cfg.timeout.is_zero() {
            return Err(bad("timeout", "must be greater than 0".into()));
        }
        let mut headers = Vec::with_capacity(cfg.headers.len());
        for (k, v) in &cfg.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| bad(&format!("headers.{k}"), "not a valid header name".into()))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| bad(&format!("headers.{k}"), "not a valid header value".into()))?;
            headers.push((name, value));
        }
        let template = match &cfg.request_template {
            None => None,
            Some(t) => Some(parse_template(t).map_err(|m| bad("request_template", m))?),
        };
        let rule = &cfg.response;
        check_pointer(&rule.pointer).map_err(|m| bad("response.pointer", m))?;
        if let Some(p) = &rule.reason_pointer {
            check_pointer(p).map_err(|m| bad("response.reason_pointer", m))?;
        }
        match (rule.allow_if.is_empty(), rule.block_if.is_empty()) {
            (true, true) => return Err(bad("response", "set one of allow_if or block_if".into())),
            (false, false) => return Err(bad("response", "set allow_if or block_if, not both".into())),
            _ => {}
        }
        if cfg.roles.is_empty() {
            return Err(bad("roles", "must name at least one role".into()));
        }
        let guard = WebhookGuard {
            name: Arc::from(cfg.name.as_str()),
            uri,
            phase: cfg.phase,
            timeout: cfg.timeout,
            on_error: cfg.on_error,
            headers,
            streams: cfg.streams,
            template,
            rule: rule.clone(),
            roles: cfg.roles.clone(),
        };
        // Every placeholder is replaced by a JSON value, so a template that is JSON with them
        // set to sample values is JSON for every call.
        let sample = WebhookSubject { agent: "a", namespace: Some("n"), route: "r", model: Some("m") };
        let probe = guard.render_texts(&sample, "input", &[(MessageRole::User, "t".to_string())]);
        if let Err(e) = serde_json::from_slice::<Value>(&probe) {
            return Err(bad("request_template", format!("does not render to JSON: {e}")));
        }
        Ok(guard)
    }

    /// The body to POST for a request of `api` (input phase): the texts of the roles the guard
    /// scans.
    pub fn render_request(&self, subject: &WebhookSubject<'_>, api: Api, body: &Value) -> Vec<u8> {
        let mut texts: Vec<(MessageRole, String)> = Vec::new();
        walk::request(api, body, &mut |_, role, text| {
            if self.roles.contains(&role) {
                texts.push((role, text.to_string()));
            }
        });
        self.render_texts(subject, "input", &texts)
    }

    /// The body to POST for a complete response of `api` (output phase).
    pub fn render_response(&self, subject: &WebhookSubject<'_>, api: Api, body: &Value) -> Vec<u8> {
        let mut texts: Vec<(MessageRole, String)> = Vec::new();
        walk::response(api, body, &mut |_, role, text| texts.push((role, text.to_string())));
        self.render_texts(subject, "output", &texts)
    }

    /// Whether a complete response of `api` has any model text to check.
    pub fn response_has_text(api: Api, body: &Value) -> bool {
        let mut any = false;
        walk::response(api, body, &mut |_, _, text| any |= !text.is_empty());
        any
    }

    fn render_texts(&self, s: &WebhookSubject<'_>, phase: &str, texts: &[(MessageRole, String)]) -> Vec<u8> {
        let value = |f: Field| -> Value {
            match f {
                Field::Phase => Value::from(phase),
                Field::Agent => Value::from(s.agent),
                Field::Namespace => s.namespace.map_or(Value::Null, Value::from),
                Field::Route => Value::from(s.route),
                Field::Model => s.model.map_or(Value::Null, Value::from),
                Field::Text => Value::from(texts.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>().join("\n")),
                Field::Messages => {
                    Value::Array(texts.iter().map(|(r, t)| json!({"role": role_name(*r), "content": t})).collect())
                }
            }
        };
        match &self.template {
            None => {
                let mut m = Map::new();
                for (k, f) in [
                    ("phase", Field::Phase),
                    ("agent", Field::Agent),
                    ("namespace", Field::Namespace),
                    ("route", Field::Route),
                    ("model", Field::Model),
                    ("text", Field::Text),
                    ("messages", Field::Messages),
                ] {
                    m.insert(k.into(), value(f));
                }
                serde_json::to_vec(&Value::Object(m)).unwrap_or_default()
            }
            Some(pieces) => {
                let mut out = Vec::new();
                for p in pieces {
                    match p {
                        Piece::Literal(l) => out.extend_from_slice(l.as_bytes()),
                        Piece::Field(f) => {
                            // Serialising a Value into a Vec cannot fail.
                            let _ = serde_json::to_writer(&mut out, &value(*f));
                        }
                    }
                }
                out
            }
        }
    }

    /// Read the webhook's answer: `Err` (the fail mode decides) for a non-2xx status, a body
    /// that is not JSON, or no value at the rule's pointer.
    pub fn judge(&self, status: u16, answer: &[u8]) -> Result<Judgement, String> {
        if !(200..300).contains(&status) {
            return Err(format!("webhook answered HTTP {status}"));
        }
        let v: Value = serde_json::from_slice(answer).map_err(|e| format!("webhook answer is not JSON: {e}"))?;
        let Some(found) = v.pointer(&self.rule.pointer) else {
            return Err(format!("webhook answer has no value at {}", self.rule.pointer));
        };
        let blocked = if self.rule.block_if.is_empty() {
            !self.rule.allow_if.contains(found)
        } else {
            self.rule.block_if.contains(found)
        };
        if !blocked {
            return Ok(Judgement::Allow);
        }
        let reason = self.rule.reason_pointer.as_deref().and_then(|p| v.pointer(p)).map(|r| match r {
            Value::String(s) => s.chars().take(200).collect(),
            other => other.to_string().chars().take(200).collect(),
        });
        Ok(Judgement::Block(reason))
    }
}

fn role_name(r: MessageRole) -> &'static str {
    match r {
        MessageRole::System => "system",
        MessageRole::User => "user",
        MessageRole::Assistant => "assistant",
        MessageRole::Tool => "tool",
    }
}

fn check_pointer(p: &str) -> Result<(), String> {
    if p.is_empty() || p.starts_with('/') {
        Ok(())
    } else {
        Err(format!("{p:?} is not a JSON pointer (it starts with '/', e.g. /allowed)"))
    }
}

/// Split a template at `{{name}}` placeholders; unknown names are refused.
fn parse_template(t: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut rest = t;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let end = after.find("}}").ok_or_else(|| "unclosed {{ placeholder".to_string())?;
        let name = after[..end].trim();
        let field = Field::parse(name).ok_or_else(|| {
            format!("unknown placeholder {{{{{name}}}}} (known: phase, agent, namespace, route, model, text, messages)")
        })?;
        if start > 0 {
            pieces.push(Piece::Literal(rest[..start].to_string()));
        }
        pieces.push(Piece::Field(field));
        rest = &after[end + 2..];
    }
    if !rest.is_empty() {
        pieces.push(Piece::Literal(rest.to_string()));
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> WebhookGuardConfig {
        serde_yaml_ng::from_str(yaml).expect("webhook config")
    }

    const SUBJECT: WebhookSubject<'static> =
        WebhookSubject { agent: "team/bot", namespace: Some("team"), route: "openai", model: Some("gpt-4o") };

    #[test]
    fn default_body_carries_every_field_and_only_the_scanned_roles() {
        let g = WebhookGuard::new(&cfg("{name: w, url: 'http://127.0.0.1:9/check', roles: [user]}")).unwrap();
        let body = json!({"model": "gpt-4o", "messages": [
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "hello \"there\""}
        ]});
        let sent: Value = serde_json::from_slice(&g.render_request(&SUBJECT, Api::OpenAiChat, &body)).unwrap();
        assert_eq!(
            sent,
            json!({"phase": "input", "agent": "team/bot", "namespace": "team", "route": "openai",
                   "model": "gpt-4o", "text": "hello \"there\"",
                   "messages": [{"role": "user", "content": "hello \"there\""}]})
        );
    }

    #[test]
    fn template_placeholders_are_json_values() {
        let g = WebhookGuard::new(&cfg(
            r#"{name: w, url: "https://guard.example/v1", request_template: '{"input": {{ text }}, "who": {{agent}}, "ns": {{namespace}}}'}"#,
        ))
        .unwrap();
        let body = json!({"choices": [{"message": {"role": "assistant", "content": "line1\nline2"}}]});
        let sent: Value = serde_json::from_slice(&g.render_response(&SUBJECT, Api::OpenAiChat, &body)).unwrap();
        assert_eq!(sent, json!({"input": "line1\nline2", "who": "team/bot", "ns": "team"}));
        let anon = WebhookSubject { namespace: None, model: None, ..SUBJECT };
        let sent: Value = serde_json::from_slice(&g.render_response(&anon, Api::OpenAiChat, &body)).unwrap();
        assert_eq!(sent["ns"], Value::Null);
    }

    #[test]
    fn rules_allow_block_and_fail() {
        let allow = WebhookGuard::new(&cfg("{name: w, url: 'http://h/c'}")).unwrap();
        assert_eq!(allow.judge(200, br#"{"allowed": true}"#), Ok(Judgement::Allow));
        assert_eq!(allow.judge(200, br#"{"allowed": false}"#), Ok(Judgement::Block(None)));
        assert_eq!(allow.judge(200, br#"{"allowed": "yes"}"#), Ok(Judgement::Block(None)));
        assert!(allow.judge(200, br#"{"other": true}"#).unwrap_err().contains("no value at /allowed"));
        assert!(allow.judge(500, br#"{"allowed": true}"#).unwrap_err().contains("HTTP 500"));
        assert!(allow.judge(200, b"<html>").unwrap_err().contains("not JSON"));

        let block = WebhookGuard::new(&cfg(
            "{name: w, url: 'http://h/c', response: {pointer: /results/0/flagged, block_if: [true], reason_pointer: /results/0/reason}}",
        ))
        .unwrap();
        assert_eq!(block.judge(200, br#"{"results": [{"flagged": false}]}"#), Ok(Judgement::Allow));
        assert_eq!(
            block.judge(200, br#"{"results": [{"flagged": true, "reason": "self-harm"}]}"#),
            Ok(Judgement::Block(Some("self-harm".into())))
        );
    }

    #[test]
    fn bad_configs_name_the_field() {
        let err = |y: &str| WebhookGuard::new(&cfg(y)).unwrap_err();
        assert_eq!(err("{name: w, url: 'ftp://h/c'}").field, "url");
        assert_eq!(err("{name: w, url: '/relative'}").field, "url");
        assert_eq!(err("{name: w, url: 'http://h/c', timeout: 0s}").field, "timeout");
        assert_eq!(
            err("{name: w, url: 'http://h/c', request_template: '{\"a\": {{nope}}}'}").field,
            "request_template"
        );
        let e = err("{name: w, url: 'http://h/c', request_template: '{\"a\": {{text}}'}");
        assert!(e.message.contains("does not render to JSON"), "{e}");
        assert_eq!(
            err("{name: w, url: 'http://h/c', response: {pointer: allowed, allow_if: [true]}}").field,
            "response.pointer"
        );
        assert_eq!(err("{name: w, url: 'http://h/c', response: {pointer: /a}}").field, "response");
        assert_eq!(
            err("{name: w, url: 'http://h/c', response: {pointer: /a, allow_if: [1], block_if: [2]}}").field,
            "response"
        );
        assert_eq!(err("{name: w, url: 'http://h/c', headers: {'bad header': x}}").field, "headers.bad header");
        assert!(serde_yaml_ng::from_str::<WebhookGuardConfig>("{name: w, url: 'http://h/c', phase: sideways}").is_err());
    }
}
