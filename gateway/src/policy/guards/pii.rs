//! PII and secret detection over plain text.
//!
//! All enabled detectors are compiled into one multi-pattern regex (leftmost-first, detectors
//! earlier in [`DETECTORS`] win at the same start), so a clean text costs one pass whatever
//! the number of entities. A regex match is only a *candidate*: its detector's check then
//! accepts it, narrows it (the token after `Bearer`, a card number without a trailing CVV), or
//! rejects it (bad Luhn or mod-97 checksum, SSN in an invalid range). Scanning resumes after a
//! candidate either way, so the result is a pure function of the text; the streaming redactor
//! relies on that to reproduce it exactly ([`super::stream`]).
//!
//! Patterns are ASCII only (ASCII word boundaries, `[0-9]` not `\d`) so the same patterns can
//! run in the lazy DFA the streaming redactor uses to see how much of a text could still grow
//! into a match.
//!
//! Replacement rules:
//! - `redact`: `[REDACTED:<TAG>]`, e.g. `[REDACTED:CREDIT_CARD]`.
//! - `mask`, emails: first character of the local part, `***`, then `@domain` unchanged
//!   (`john.doe@example.com` → `j***@example.com`).
//! - `mask`, everything else: every ASCII letter or digit except the last 4 becomes `*`; other
//!   characters (spaces, dashes, dots, colons) stay, so the shape is kept
//!   (`4111-1111-1111-1111` → `****-****-****-1111`). A value with 4 or fewer letters and digits
//!   is masked entirely.

use std::sync::Arc;

use regex_automata::hybrid::dfa::{Cache as DfaCache, DFA};
use regex_automata::meta::Regex;
use regex_automata::{Anchored, Input, MatchKind};

use crate::config::guards::{GuardAction, MessageRole, PiiEntity, PiiGuardConfig};

/// Why a PII guard could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PiiError {
    /// The combined detector regex did not compile (a bug in [`DETECTORS`], not in config).
    #[error("building detectors: {0}")]
    Build(String),
    /// `max_holdback_bytes` is too small to hold any useful match.
    #[error("must be at least {min}, got {got}")]
    Holdback {
        /// Smallest accepted value.
        min: usize,
        /// Configured value.
        got: usize,
    },
}

/// Smallest accepted `max_holdback_bytes`: shorter would cut most keys and card numbers.
pub const MIN_HOLDBACK: usize = 32;

/// Narrows or rejects a candidate: `Some((start, end))` relative to the candidate text.
type Check = fn(&str) -> Option<(usize, usize)>;

/// One detector: a regex and the check its candidates must pass.
struct Detector {
    entity: PiiEntity,
    rule: &'static str,
    pattern: &'static str,
    check: Check,
}

/// Every detector, in priority order (see the module docs).
const DETECTORS: &[Detector] = &[
    Detector {
        entity: PiiEntity::PrivateKey,
        rule: "pem_private_key",
        pattern: r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[A-Za-z0-9+/=:,\- \t\r\n]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----",
        check: whole,
    },
    Detector {
        entity: PiiEntity::AnthropicKey,
        rule: "anthropic_key",
        pattern: r"(?-u:\b)sk-ant-[A-Za-z0-9_\-]{20,}",
        check: whole,
    },
    Detector {
        entity: PiiEntity::OpenaiKey,
        rule: "openai_key",
        pattern: r"(?-u:\b)sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}",
        check: whole,
    },
    Detector {
        entity: PiiEntity::AwsAccessKey,
        rule: "aws_access_key_id",
        pattern: r"(?-u:\b)(?:AKIA|ASIA)[A-Z0-9]{16}(?-u:\b)",
        check: whole,
    },
    Detector {
        entity: PiiEntity::AwsSecretKey,
        rule: "aws_secret_key_labelled",
        pattern: r#"(?i:aws_?secret_?(?:access_?)?key)["']?[ \t]*[:=][ \t]*["']?[A-Za-z0-9/+]{40}(?:[^A-Za-z0-9/+=]|$)"#,
        check: aws_secret,
    },
    Detector {
        entity: PiiEntity::GithubToken,
        rule: "github_token",
        pattern: r"(?-u:\b)(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})",
        check: whole,
    },
    Detector {
        entity: PiiEntity::SlackToken,
        rule: "slack_token",
        pattern: r"(?-u:\b)(?:xox[abposr]-[A-Za-z0-9\-]{10,}|xapp-[0-9]-[A-Za-z0-9\-]{10,})",
        check: whole,
    },
    Detector {
        entity: PiiEntity::BearerToken,
        rule: "bearer_token",
        pattern: r"(?-u:\b)[Bb]earer[ \t]+[A-Za-z0-9\-._~+/]{16,}=*",
        check: bearer,
    },
    Detector {
        entity: PiiEntity::Email,
        rule: "email",
        pattern: r"(?-u:\b)[A-Za-z0-9._%+\-]+@(?:[A-Za-z0-9\-]+\.)+[A-Za-z]{2,}(?-u:\b)",
        check: whole,
    },
    Detector {
        entity: PiiEntity::Iban,
        rule: "iban_mod97",
        pattern: r"(?-u:\b)[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}(?-u:\b)",
        check: iban,
    },
    Detector {
        entity: PiiEntity::CreditCard,
        rule: "card_luhn",
        pattern: r"(?-u:\b)[0-9](?:[ \-]?[0-9]){12,18}(?-u:\b)",
        check: card,
    },
    Detector {
        entity: PiiEntity::Ssn,
        rule: "us_ssn",
        pattern: r"(?-u:\b)[0-9]{3}-[0-9]{2}-[0-9]{4}(?-u:\b)",
        check: ssn,
    },
    Detector {
        entity: PiiEntity::Ipv6,
        rule: "ipv6",
        pattern: r"(?:(?-u:\b)[0-9A-Fa-f]{1,4})?(?::[0-9A-Fa-f]{0,4}){2,7}",
        check: ipv6,
    },
    Detector {
        entity: PiiEntity::Ipv4,
        rule: "ipv4",
        pattern: r"(?-u:\b)(?:(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(?-u:\b)",
        check: whole,
    },
    Detector {
        entity: PiiEntity::Phone,
        rule: "phone_international",
        pattern: r"\+[1-9][0-9]{0,2}(?:[ .\-]?\(?[0-9]{1,5}\)?){1,6}(?-u:\b)",
        check: phone_international,
    },
    Detector {
        entity: PiiEntity::Phone,
        rule: "phone_us",
        pattern: r"(?:(?-u:\b)(?:1[ .\-])?[2-9][0-9]{2}[ .\-]|\([2-9][0-9]{2}\) ?)[2-9][0-9]{2}[ .\-][0-9]{4}(?-u:\b)",
        check: whole,
    },
    Detector {
        entity: PiiEntity::Phone,
        rule: "phone_national",
        pattern: r"(?-u:\b)0[1-9][0-9]{0,4}(?:[ /.\-][0-9]{2,8}){1,4}(?-u:\b)",
        check: phone_national,
    },
];

/// One sensitive value found in a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    /// What it is.
    pub entity: PiiEntity,
    /// What the guard does with it.
    pub action: GuardAction,
    /// Byte offset of its first byte (in the scanned text, or in the whole stream).
    pub start: usize,
    /// Byte offset just past it.
    pub end: usize,
    /// Detector that found it (`card_luhn`, `phone_us`, ...), for debugging false positives.
    pub rule: &'static str,
}

/// One step of a scan: the next regex candidate at or after a position and what its check
/// made of it. Shared by whole-text and streaming scans so both see exactly the same values.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Step {
    /// Start of the regex candidate.
    pub cand_start: usize,
    /// Where scanning resumes.
    pub next: usize,
    /// The accepted value, if the check accepted the candidate.
    pub finding: Option<Finding>,
}

/// A compiled PII guard: detectors of the enabled entities, and where it applies.
#[derive(Debug)]
pub struct PiiScanner {
    pub(crate) name: Arc<str>,
    regex: Regex,
    dfa: DFA,
    /// Detector index (into [`DETECTORS`]) and action, by pattern id.
    enabled: Vec<(usize, GuardAction)>,
    pub(crate) roles: Vec<MessageRole>,
    pub(crate) requests: bool,
    pub(crate) responses: bool,
    pub(crate) max_holdback: usize,
}

impl PiiScanner {
    /// Compile the detectors of the entities `cfg` gives an action. Done once per config load:
    /// building the regex costs milliseconds, scanning with it microseconds.
    pub fn new(cfg: &PiiGuardConfig) -> Result<Self, PiiError> {
        if cfg.max_holdback_bytes < MIN_HOLDBACK {
            return Err(PiiError::Holdback { min: MIN_HOLDBACK, got: cfg.max_holdback_bytes });
        }
        let mut enabled = Vec::new();
        let mut patterns = Vec::new();
        for (i, d) in DETECTORS.iter().enumerate() {
            if let Some(action) = cfg.entities.get(d.entity) {
                enabled.push((i, action));
                patterns.push(d.pattern);
            }
        }
        let regex = Regex::builder()
            .configure(Regex::config().match_kind(MatchKind::LeftmostFirst))
            .build_many(&patterns)
            .map_err(|e| PiiError::Build(e.to_string()))?;
        let dfa = DFA::builder()
            .configure(DFA::config().match_kind(MatchKind::LeftmostFirst))
            .build_many(&patterns)
            .map_err(|e| PiiError::Build(e.to_string()))?;
        Ok(PiiScanner {
            name: Arc::from(cfg.name.as_str()),
            regex,
            dfa,
            enabled,
            roles: cfg.roles.clone(),
            requests: cfg.requests,
            responses: cfg.responses,
            max_holdback: cfg.max_holdback_bytes,
        })
    }

    /// The guard's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether any entity is enabled (an empty guard scans nothing).
    pub fn is_active(&self) -> bool {
        !self.enabled.is_empty()
    }

    /// Every value in `text`, in order, without overlaps. Allocates only when something is
    /// found.
    pub fn scan(&self, text: &str) -> Vec<Finding> {
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some(step) = self.step(text, pos) {
            out.extend(step.finding);
            pos = step.next;
        }
        out
    }

    /// `text` with `findings` (from [`PiiScanner::scan`] of that text) applied: `None` when no
    /// finding asks for a rewrite (only `log`/`block` ones), so a clean text is never copied.
    pub fn apply(&self, text: &str, findings: &[Finding]) -> Option<String> {
        if !findings.iter().any(|f| rewrites(f.action)) {
            return None;
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for f in findings.iter().filter(|f| rewrites(f.action)) {
            out.push_str(&text[at..f.start]);
            replace_into(&mut out, f, &text[f.start..f.end]);
            at = f.end;
        }
        out.push_str(&text[at..]);
        Some(out)
    }

    /// The next candidate at or after `from` in `hay` (bytes before `from` serve as look-behind
    /// context only).
    pub(crate) fn step(&self, hay: &str, from: usize) -> Option<Step> {
        if self.enabled.is_empty() || from >= hay.len() {
            return None;
        }
        let m = self.regex.search(&Input::new(hay).range(from..))?;
        let (idx, action) = *self.enabled.get(m.pattern().as_usize())?;
        let d = DETECTORS.get(idx)?;
        let (start, end) = (m.start(), m.end().max(m.start() + 1));
        let finding = (d.check)(&hay[start..m.end()]).map(|(s, e)| Finding {
            entity: d.entity,
            action,
            start: start + s,
            end: start + e,
            rule: d.rule,
        });
        let next = finding.map_or(end, |f| f.end.max(start + 1));
        Some(Step { cand_start: start, next: ceil_char(hay, next), finding })
    }

    /// A lazy-DFA cache for [`PiiScanner::live_at`]; one per stream.
    pub(crate) fn dfa_cache(&self) -> DfaCache {
        self.dfa.create_cache()
    }

    /// Whether a match starting at `s` could still appear or grow if more text followed
    /// `hay`: the anchored DFA started at `s` has not died by the end of `hay`. Errors (a cache
    /// that gave up) count as live, the safe answer.
    pub(crate) fn live_at(&self, cache: &mut DfaCache, hay: &str, s: usize) -> bool {
        let input = Input::new(hay).range(s..).anchored(Anchored::Yes);
        let Ok(mut sid) = self.dfa.start_state_forward(cache, &input) else { return true };
        for &b in &hay.as_bytes()[s..] {
            if sid.is_dead() {
                return false;
            }
            sid = match self.dfa.next_state(cache, sid, b) {
                Ok(sid) => sid,
                Err(_) => return true,
            };
        }
        !sid.is_dead()
    }
}

/// Whether `action` changes the text.
pub(crate) fn rewrites(action: GuardAction) -> bool {
    matches!(action, GuardAction::Redact | GuardAction::Mask)
}

/// Append the replacement of `value` (the text of `f`) to `out`, per the module docs.
pub(crate) fn replace_into(out: &mut String, f: &Finding, value: &str) {
    match f.action {
        GuardAction::Redact => {
            out.push_str("[REDACTED:");
            out.push_str(f.entity.tag());
            out.push(']');
        }
        GuardAction::Mask => mask_into(out, f.entity, value),
        GuardAction::Block | GuardAction::Log => out.push_str(value),
    }
}

/// The `mask` rule of the module docs.
pub fn mask_into(out: &mut String, entity: PiiEntity, value: &str) {
    if entity == PiiEntity::Email {
        if let (Some(first), Some(at)) = (value.chars().next(), value.find('@')) {
            out.push(first);
            out.push_str("***");
            out.push_str(&value[at..]);
            return;
        }
    }
    let alnum = value.bytes().filter(u8::is_ascii_alphanumeric).count();
    let mut to_mask = if alnum > 4 { alnum - 4 } else { alnum };
    for c in value.chars() {
        if c.is_ascii_alphanumeric() {
            if to_mask == 0 {
                out.push(c);
            } else {
                out.push('*');
                to_mask -= 1;
            }
        } else {
            out.push(c);
        }
    }
}

/// Smallest char boundary of `s` at or after `i` (capped at its length).
pub(crate) fn ceil_char(s: &str, mut i: usize) -> usize {
    while i < s.len() && !s.is_char_boundary(i) {
        i += 1;
    }
    i.min(s.len())
}

fn whole(s: &str) -> Option<(usize, usize)> {
    Some((0, s.len()))
}

/// The token after `Bearer` and its blanks.
fn bearer(s: &str) -> Option<(usize, usize)> {
    let at = s.find([' ', '\t'])?;
    let tok = at + s[at..].len() - s[at..].trim_start().len();
    Some((tok, s.len()))
}

/// The 40-character value at the end, without the delimiter the pattern consumed after it.
fn aws_secret(s: &str) -> Option<(usize, usize)> {
    let is_b64 = |c: char| c.is_ascii_alphanumeric() || c == '/' || c == '+';
    let end = match s.chars().last() {
        Some(c) if !is_b64(c) => s.len() - c.len_utf8(),
        _ => s.len(),
    };
    Some((end.checked_sub(40)?, end))
}

/// Luhn checksum of ASCII digits (other bytes ignored).
pub fn luhn_valid(s: &str) -> bool {
    let mut sum = 0u32;
    let mut n = 0;
    for b in s.bytes().rev().filter(u8::is_ascii_digit) {
        let mut d = u32::from(b - b'0');
        if n % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
        n += 1;
    }
    n > 0 && sum.is_multiple_of(10)
}

/// The longest prefix ending at a digit group (the whole candidate, or just before a
/// separator) with 13–19 digits, not all zero, that passes Luhn: a card number followed by a
/// CVV or an expiry is still found.
fn card(s: &str) -> Option<(usize, usize)> {
    let b = s.as_bytes();
    let ends = (1..=b.len()).rev().filter(|&e| e == b.len() || !b[e].is_ascii_digit());
    for e in ends {
        let digits = b[..e].iter().filter(|c| c.is_ascii_digit()).count();
        if !(13..=19).contains(&digits) {
            continue;
        }
        if b[..e].iter().any(|&c| c.is_ascii_digit() && c != b'0') && luhn_valid(&s[..e]) {
            return Some((0, e));
        }
    }
    None
}

/// ISO 13616 check: move the first four characters to the end, letters become 10..35, the
/// number mod 97 must be 1. Spaces are ignored.
pub fn iban_valid(s: &str) -> bool {
    let chars: Vec<u8> = s.bytes().filter(|b| *b != b' ').collect();
    if !(15..=34).contains(&chars.len())
        || !chars[..2].iter().all(u8::is_ascii_uppercase)
        || !chars[2..4].iter().all(u8::is_ascii_digit)
    {
        return false;
    }
    let mut r: u32 = 0;
    for &c in chars[4..].iter().chain(&chars[..4]) {
        r = match c {
            b'0'..=b'9' => (r * 10 + u32::from(c - b'0')) % 97,
            b'A'..=b'Z' => (r * 100 + u32::from(c - b'A') + 10) % 97,
            _ => return false,
        };
    }
    r == 1
}

/// The longest prefix ending at the candidate's end or before a space that is a valid IBAN
/// (the pattern may run into a following upper-case word).
fn iban(s: &str) -> Option<(usize, usize)> {
    let b = s.as_bytes();
    let ends = (1..=b.len()).rev().filter(|&e| e == b.len() || b[e] == b' ');
    ends.into_iter().find(|&e| iban_valid(&s[..e])).map(|e| (0, e))
}

/// `AAA-GG-SSSS` outside the never-issued ranges: area 000, 666 or 900–999, group 00, serial
/// 0000.
pub fn ssn_valid(s: &str) -> bool {
    let mut parts = s.split('-');
    let (Some(a), Some(g), Some(n), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let all_digits = |p: &str, len| p.len() == len && p.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(a, 3) || !all_digits(g, 2) || !all_digits(n, 4) {
        return false;
    }
    a != "000" && a != "666" && !a.starts_with('9') && g != "00" && n != "0000"
}

fn ssn(s: &str) -> Option<(usize, usize)> {
    ssn_valid(s).then_some((0, s.len()))
}

/// A parseable IPv6 address with at least one digit (so `a::b` in code is not one); a
/// trailing `:` the pattern took is dropped.
fn ipv6(s: &str) -> Option<(usize, usize)> {
    let mut t = s;
    for _ in 0..2 {
        if t.parse::<std::net::Ipv6Addr>().is_ok() && t != "::" && t.bytes().any(|b| b.is_ascii_digit()) {
            return Some((0, t.len()));
        }
        t = t.strip_suffix(':')?;
    }
    None
}

fn digits(s: &str) -> usize {
    s.bytes().filter(u8::is_ascii_digit).count()
}

/// E.164 allows at most 15 digits; fewer than 8 is not a reachable number.
fn phone_international(s: &str) -> Option<(usize, usize)> {
    (8..=15).contains(&digits(s)).then_some((0, s.len()))
}

/// European national numbers with a trunk `0`: 9 to 12 digits (dates have 8).
fn phone_national(s: &str) -> Option<(usize, usize)> {
    (9..=12).contains(&digits(s)).then_some((0, s.len()))
}
