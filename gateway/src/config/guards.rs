//! Guardrails configuration: a list of named guards, each one check (or rewrite) applied to LLM
//! requests and responses by [`crate::policy::guards`]. Everything here is plain data; regexes
//! are compiled, and every value checked, when the engine is built from it, so a bad pattern is
//! refused at config load with the field path that holds it (`guardrails[2].deny[0]: ...`).
//!
//! ```yaml
//! guardrails:
//!   - kind: limits
//!     name: size
//!     max_request_bytes: 1048576
//!     max_prompt_tokens: 32000
//!   - kind: regex
//!     name: jailbreak
//!     deny: ["(?i)ignore (all )?previous instructions"]
//!     roles: [user]
//!   - kind: pii
//!     name: pii
//!     entities: { email: mask, credit_card: redact, aws_access_key: block }
//!   - kind: decorate
//!     name: house-rules
//!     prepend: [{ role: system, content: "Answer in English." }]
//!   - kind: webhook
//!     name: nemo
//!     url: http://guardrails.internal:8000/v1/check
//!     phase: both
//!     timeout: 500ms
//!     on_error: fail_closed
//!     response: { pointer: /flagged, block_if: [true], reason_pointer: /reason }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One guard. Guards run in list order on every request (and, for `pii`, on responses); the
/// first blocking verdict stops the request, so put cheap checks (`limits`) first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GuardConfig {
    /// Allow and deny lists of regexes over prompt messages.
    Regex(RegexGuardConfig),
    /// PII and secret detection with a per-entity action.
    Pii(PiiGuardConfig),
    /// Messages added before or after the caller's prompt.
    Decorate(DecorateGuardConfig),
    /// Request body size and prompt token limits.
    Limits(LimitsGuardConfig),
    /// An external guardrail service (NeMo Guardrails, a moderation endpoint, an in-house
    /// classifier) asked over HTTP for a verdict on the prompt and/or the response.
    Webhook(WebhookGuardConfig),
}

impl GuardConfig {
    /// The guard's configured name (verdicts, metrics and span events carry it).
    pub fn name(&self) -> &str {
        match self {
            GuardConfig::Regex(c) => &c.name,
            GuardConfig::Pii(c) => &c.name,
            GuardConfig::Decorate(c) => &c.name,
            GuardConfig::Limits(c) => &c.name,
            GuardConfig::Webhook(c) => &c.name,
        }
    }
}

/// What a guard does with what it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum GuardAction {
    /// Refuse the request (or cut the response stream).
    Block,
    /// Replace the value with `[REDACTED:<ENTITY>]`.
    Redact,
    /// Hide the value but keep its last 4 characters (emails: first character and domain).
    Mask,
    /// Only report it (verdict, metric, span event); the text is unchanged.
    Log,
}

impl GuardAction {
    /// Label value for metrics and span events.
    pub fn as_str(self) -> &'static str {
        match self {
            GuardAction::Block => "block",
            GuardAction::Redact => "redact",
            GuardAction::Mask => "mask",
            GuardAction::Log => "log",
        }
    }
}

/// Who wrote a message, normalised across APIs (OpenAI `developer` is `system`, Gemini `model`
/// is `assistant`, tool results are `tool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MessageRole {
    /// System prompt, developer message, instructions.
    System,
    /// The end user.
    User,
    /// The model (earlier turns in the request, the reply in a response).
    Assistant,
    /// Tool and function results.
    Tool,
}

/// Allow and deny lists of regexes (Rust `regex` syntax) over the text of prompt messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegexGuardConfig {
    /// Name reported in verdicts; unique among guards.
    pub name: String,
    /// A message text matching any of these fails the guard.
    #[serde(default)]
    pub deny: Vec<String>,
    /// When non-empty, every scanned message must match at least one of these (one of its text
    /// parts does), else the guard fails.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Roles whose messages are scanned.
    #[serde(default = "default_regex_roles")]
    pub roles: Vec<MessageRole>,
    /// Scan only the last user message (the new turn), whatever `roles` says.
    #[serde(default)]
    pub last_user_only: bool,
    /// `block` refuses the request; `log` only reports (shadow mode). Other actions are invalid.
    #[serde(default = "default_block")]
    pub action: GuardAction,
}

fn default_regex_roles() -> Vec<MessageRole> {
    vec![MessageRole::User]
}

fn default_block() -> GuardAction {
    GuardAction::Block
}

/// PII and secret detection. Only entities given an action are detected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PiiGuardConfig {
    /// Name reported in verdicts; unique among guards.
    pub name: String,
    /// Action per entity; an entity left out is not detected.
    #[serde(default)]
    pub entities: PiiEntities,
    /// Roles whose request messages are scanned. Responses are not filtered by role: with
    /// `responses: true` every response text is scanned, whether `assistant` is listed or not.
    #[serde(default = "all_roles")]
    pub roles: Vec<MessageRole>,
    /// Scan requests.
    #[serde(default = "yes")]
    pub requests: bool,
    /// Scan responses, streamed ones included.
    #[serde(default = "yes")]
    pub responses: bool,
    /// Most bytes of a streamed response held back because they could still become part of a
    /// match; a value longer than this (a whole PEM key) may reach the client unredacted when
    /// streamed.
    #[serde(default = "default_holdback")]
    pub max_holdback_bytes: usize,
}

fn all_roles() -> Vec<MessageRole> {
    vec![MessageRole::System, MessageRole::User, MessageRole::Assistant, MessageRole::Tool]
}

fn yes() -> bool {
    true
}

/// Default of [`PiiGuardConfig::max_holdback_bytes`].
pub const DEFAULT_MAX_HOLDBACK_BYTES: usize = 256;

fn default_holdback() -> usize {
    DEFAULT_MAX_HOLDBACK_BYTES
}

/// A kind of sensitive value the PII guard recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PiiEntity {
    /// Email address.
    Email,
    /// Phone number: `+` international, US `(555) 123-4567`, European national `030 1234567`.
    Phone,
    /// Payment card number, 13 to 19 digits, Luhn checked.
    CreditCard,
    /// IBAN, mod-97 checked.
    Iban,
    /// US social security number `AAA-GG-SSSS`, invalid ranges excluded.
    Ssn,
    /// IPv4 address.
    Ipv4,
    /// IPv6 address.
    Ipv6,
    /// OpenAI API key (`sk-`, `sk-proj-`).
    OpenaiKey,
    /// Anthropic API key (`sk-ant-`).
    AnthropicKey,
    /// AWS access key id (`AKIA`/`ASIA`).
    AwsAccessKey,
    /// AWS secret access key, when labelled as one.
    AwsSecretKey,
    /// GitHub token (`ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_`, `github_pat_`).
    GithubToken,
    /// Slack token (`xoxb-`, `xoxp-`, ..., `xapp-`).
    SlackToken,
    /// PEM private key block.
    PrivateKey,
    /// `Bearer` token.
    BearerToken,
}

impl PiiEntity {
    /// Every entity, in the order of [`PiiEntities`].
    pub const ALL: [PiiEntity; 15] = [
        PiiEntity::Email,
        PiiEntity::Phone,
        PiiEntity::CreditCard,
        PiiEntity::Iban,
        PiiEntity::Ssn,
        PiiEntity::Ipv4,
        PiiEntity::Ipv6,
        PiiEntity::OpenaiKey,
        PiiEntity::AnthropicKey,
        PiiEntity::AwsAccessKey,
        PiiEntity::AwsSecretKey,
        PiiEntity::GithubToken,
        PiiEntity::SlackToken,
        PiiEntity::PrivateKey,
        PiiEntity::BearerToken,
    ];

    /// Lower-case label (metrics, config key).
    pub fn as_str(self) -> &'static str {
        match self {
            PiiEntity::Email => "email",
            PiiEntity::Phone => "phone",
            PiiEntity::CreditCard => "credit_card",
            PiiEntity::Iban => "iban",
            PiiEntity::Ssn => "ssn",
            PiiEntity::Ipv4 => "ipv4",
            PiiEntity::Ipv6 => "ipv6",
            PiiEntity::OpenaiKey => "openai_key",
            PiiEntity::AnthropicKey => "anthropic_key",
            PiiEntity::AwsAccessKey => "aws_access_key",
            PiiEntity::AwsSecretKey => "aws_secret_key",
            PiiEntity::GithubToken => "github_token",
            PiiEntity::SlackToken => "slack_token",
            PiiEntity::PrivateKey => "private_key",
            PiiEntity::BearerToken => "bearer_token",
        }
    }

    /// Upper-case tag used in `[REDACTED:<TAG>]`.
    pub fn tag(self) -> &'static str {
        match self {
            PiiEntity::Email => "EMAIL",
            PiiEntity::Phone => "PHONE",
            PiiEntity::CreditCard => "CREDIT_CARD",
            PiiEntity::Iban => "IBAN",
            PiiEntity::Ssn => "SSN",
            PiiEntity::Ipv4 => "IPV4",
            PiiEntity::Ipv6 => "IPV6",
            PiiEntity::OpenaiKey => "OPENAI_KEY",
            PiiEntity::AnthropicKey => "ANTHROPIC_KEY",
            PiiEntity::AwsAccessKey => "AWS_ACCESS_KEY",
            PiiEntity::AwsSecretKey => "AWS_SECRET_KEY",
            PiiEntity::GithubToken => "GITHUB_TOKEN",
            PiiEntity::SlackToken => "SLACK_TOKEN",
            PiiEntity::PrivateKey => "PRIVATE_KEY",
            PiiEntity::BearerToken => "BEARER_TOKEN",
        }
    }
}

/// Action per PII entity; `null` (or absent) turns the entity's detection off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PiiEntities {
    /// Email addresses.
    pub email: Option<GuardAction>,
    /// Phone numbers.
    pub phone: Option<GuardAction>,
    /// Payment card numbers (Luhn checked).
    pub credit_card: Option<GuardAction>,
    /// IBANs (mod-97 checked).
    pub iban: Option<GuardAction>,
    /// US social security numbers.
    pub ssn: Option<GuardAction>,
    /// IPv4 addresses.
    pub ipv4: Option<GuardAction>,
    /// IPv6 addresses.
    pub ipv6: Option<GuardAction>,
    /// OpenAI API keys.
    pub openai_key: Option<GuardAction>,
    /// Anthropic API keys.
    pub anthropic_key: Option<GuardAction>,
    /// AWS access key ids.
    pub aws_access_key: Option<GuardAction>,
    /// Labelled AWS secret access keys.
    pub aws_secret_key: Option<GuardAction>,
    /// GitHub tokens.
    pub github_token: Option<GuardAction>,
    /// Slack tokens.
    pub slack_token: Option<GuardAction>,
    /// PEM private key blocks.
    pub private_key: Option<GuardAction>,
    /// `Bearer` tokens.
    pub bearer_token: Option<GuardAction>,
}

impl PiiEntities {
    /// The action configured for `entity`, if it is detected at all.
    pub fn get(&self, entity: PiiEntity) -> Option<GuardAction> {
        match entity {
            PiiEntity::Email => self.email,
            PiiEntity::Phone => self.phone,
            PiiEntity::CreditCard => self.credit_card,
            PiiEntity::Iban => self.iban,
            PiiEntity::Ssn => self.ssn,
            PiiEntity::Ipv4 => self.ipv4,
            PiiEntity::Ipv6 => self.ipv6,
            PiiEntity::OpenaiKey => self.openai_key,
            PiiEntity::AnthropicKey => self.anthropic_key,
            PiiEntity::AwsAccessKey => self.aws_access_key,
            PiiEntity::AwsSecretKey => self.aws_secret_key,
            PiiEntity::GithubToken => self.github_token,
            PiiEntity::SlackToken => self.slack_token,
            PiiEntity::PrivateKey => self.private_key,
            PiiEntity::BearerToken => self.bearer_token,
        }
    }
}

/// Messages added to every request, in the caller's API shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DecorateGuardConfig {
    /// Name reported when decorating fails; unique among guards.
    pub name: String,
    /// Added before the caller's messages, in this order.
    #[serde(default)]
    pub prepend: Vec<DecorationMessage>,
    /// Added after the caller's messages, in this order.
    #[serde(default)]
    pub append: Vec<DecorationMessage>,
}

/// One added message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DecorationMessage {
    /// `system` goes to the API's system prompt (Anthropic `system`, Gemini
    /// `systemInstruction`); `user` and `assistant` become turns.
    pub role: DecorationRole,
    /// Text of the message.
    pub content: String,
}

/// Role of an added message (tool results cannot be invented).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DecorationRole {
    /// System prompt.
    System,
    /// A user turn.
    User,
    /// A model turn.
    Assistant,
}

/// Size limits on requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsGuardConfig {
    /// Name reported in verdicts; unique among guards.
    pub name: String,
    /// Largest request body, in bytes.
    #[serde(default)]
    pub max_request_bytes: Option<u64>,
    /// Most prompt tokens (`o200k_base` estimate of the request's text).
    #[serde(default)]
    pub max_prompt_tokens: Option<u64>,
}

/// A guardrail served by someone else's HTTP endpoint, so teams can plug in the checker they
/// already run. tollgate POSTs a JSON document built from `request_template` and reads one
/// value of the JSON answer (`response`) to decide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookGuardConfig {
    /// Name reported in verdicts; unique among guards.
    pub name: String,
    /// `http://` or `https://` endpoint (TLS trusts the same roots as upstream providers).
    pub url: String,
    /// What is sent for checking: the prompt, the response, or both.
    #[serde(default)]
    pub phase: WebhookPhase,
    /// Deadline of one webhook call (connect included); past it `on_error` decides.
    #[serde(default = "default_webhook_timeout", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// What happens when the webhook cannot be asked or its answer cannot be read.
    #[serde(default)]
    pub on_error: WebhookFailMode,
    /// Extra request headers (e.g. `Authorization`).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// JSON body sent to the webhook. Placeholders, each replaced by a JSON value:
    /// `{{phase}}` (`"input"`/`"output"`), `{{agent}}`, `{{namespace}}`, `{{route}}`,
    /// `{{model}}`, `{{text}}` (the scanned texts joined by newlines), `{{messages}}`
    /// (`[{"role": ..., "content": ...}]`). Absent: every placeholder as one object.
    #[serde(default)]
    pub request_template: Option<String>,
    /// How the webhook's JSON answer is read. Absent: `{pointer: /allowed, allow_if: [true]}`.
    #[serde(default)]
    pub response: WebhookRule,
    /// Roles of the request messages sent on the input phase (responses are `assistant`).
    #[serde(default = "all_roles")]
    pub roles: Vec<MessageRole>,
    /// Streamed responses on the output phase: a stream cannot be held for a check without
    /// losing streaming, so either let it pass unchecked (counted) or refuse streaming calls.
    #[serde(default)]
    pub streams: WebhookStreams,
}

/// What an output-phase webhook does about calls that ask for a streamed response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WebhookStreams {
    /// Stream it unchecked (verdict `action="unchecked"`).
    #[default]
    Unchecked,
    /// Refuse the call with a 400 naming the guard, before anything is sent: agents must ask
    /// for non-streamed responses, which are checked.
    Refuse,
}

fn default_webhook_timeout() -> Duration {
    Duration::from_secs(1)
}

/// When the webhook is asked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WebhookPhase {
    /// The prompt, before the call is sent (a block never reaches the provider).
    #[default]
    Input,
    /// The provider's non-streamed response, before the agent sees it.
    Output,
    /// Both.
    Both,
}

impl WebhookPhase {
    /// Whether prompts are checked.
    pub fn input(self) -> bool {
        matches!(self, WebhookPhase::Input | WebhookPhase::Both)
    }

    /// Whether responses are checked.
    pub fn output(self) -> bool {
        matches!(self, WebhookPhase::Output | WebhookPhase::Both)
    }
}

/// Behaviour when the webhook times out, is unreachable, answers non-2xx or unreadable JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFailMode {
    /// Let the call through (the failure is still a verdict `action="error"` and a span event).
    FailOpen,
    /// Refuse the call: a guardrail that cannot answer is treated as a block.
    #[default]
    FailClosed,
}

/// Reads the verdict from the webhook's answer: the value at `pointer` (RFC 6901) blocks when
/// it is one of `block_if`, or when `allow_if` is given and it is none of them. Exactly one of
/// the two lists is set. A missing value is an error (`on_error`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookRule {
    /// JSON pointer of the verdict value (`/allowed`, `/results/0/flagged`).
    pub pointer: String,
    /// Values that let the call through.
    #[serde(default)]
    pub allow_if: Vec<serde_json::Value>,
    /// Values that block the call.
    #[serde(default)]
    pub block_if: Vec<serde_json::Value>,
    /// JSON pointer of a reason string quoted in the refusal, when the webhook gives one.
    #[serde(default)]
    pub reason_pointer: Option<String>,
}

impl Default for WebhookRule {
    fn default() -> Self {
        WebhookRule {
            pointer: "/allowed".into(),
            allow_if: vec![serde_json::Value::Bool(true)],
            block_if: Vec::new(),
            reason_pointer: None,
        }
    }
}
