//! PII detectors: each entity's positives and negatives, the checksums, and the replacement
//! rules.

use super::*;
use crate::config::guards::{MessageRole, PiiEntities, PiiGuardConfig, DEFAULT_MAX_HOLDBACK_BYTES};

pub(super) fn cfg_with(entities: PiiEntities) -> PiiGuardConfig {
    PiiGuardConfig {
        name: "pii".into(),
        entities,
        roles: vec![MessageRole::System, MessageRole::User, MessageRole::Assistant, MessageRole::Tool],
        requests: true,
        responses: true,
        max_holdback_bytes: DEFAULT_MAX_HOLDBACK_BYTES,
    }
}

pub(super) fn all(action: GuardAction) -> PiiEntities {
    let a = Some(action);
    PiiEntities {
        email: a,
        phone: a,
        credit_card: a,
        iban: a,
        ssn: a,
        ipv4: a,
        ipv6: a,
        openai_key: a,
        anthropic_key: a,
        aws_access_key: a,
        aws_secret_key: a,
        github_token: a,
        slack_token: a,
        private_key: a,
        bearer_token: a,
    }
}

pub(super) fn scanner(action: GuardAction) -> PiiScanner {
    PiiScanner::new(&cfg_with(all(action))).expect("scanner")
}

fn only(entity: PiiEntity) -> PiiScanner {
    let mut e = PiiEntities::default();
    for x in PiiEntity::ALL {
        if x == entity {
            set(&mut e, x);
        }
    }
    PiiScanner::new(&cfg_with(e)).expect("scanner")
}

fn set(e: &mut PiiEntities, x: PiiEntity) {
    let a = Some(GuardAction::Redact);
    match x {
        PiiEntity::Email => e.email = a,
        PiiEntity::Phone => e.phone = a,
        PiiEntity::CreditCard => e.credit_card = a,
        PiiEntity::Iban => e.iban = a,
        PiiEntity::Ssn => e.ssn = a,
        PiiEntity::Ipv4 => e.ipv4 = a,
        PiiEntity::Ipv6 => e.ipv6 = a,
        PiiEntity::OpenaiKey => e.openai_key = a,
        PiiEntity::AnthropicKey => e.anthropic_key = a,
        PiiEntity::AwsAccessKey => e.aws_access_key = a,
        PiiEntity::AwsSecretKey => e.aws_secret_key = a,
        PiiEntity::GithubToken => e.github_token = a,
        PiiEntity::SlackToken => e.slack_token = a,
        PiiEntity::PrivateKey => e.private_key = a,
        PiiEntity::BearerToken => e.bearer_token = a,
    }
}

/// (entity, matched text) of every finding in `text` with every entity enabled.
fn found(text: &str) -> Vec<(PiiEntity, &str)> {
    scanner(GuardAction::Redact).scan(text).iter().map(|f| (f.entity, &text[f.start..f.end])).collect()
}

/// Exactly one finding of `entity` covering `value`, inside a sentence.
#[track_caller]
fn hit(entity: PiiEntity, value: &str) {
    let text = format!("before {value} after.");
    assert_eq!(found(&text), vec![(entity, value)], "in {text:?}");
    // The entity alone finds it too (no reliance on another detector's priority).
    let alone = only(entity).scan(&text);
    assert_eq!(alone.len(), 1, "{entity:?} alone in {text:?}");
}

/// Nothing at all found in `text`.
#[track_caller]
fn miss(text: &str) {
    assert_eq!(found(text), vec![], "in {text:?}");
}

#[test]
fn email() {
    hit(PiiEntity::Email, "john.doe@example.com");
    hit(PiiEntity::Email, "a+tag@mail.example.co.uk");
    miss("write to john@localhost or @example.com or foo@bar");
}

#[test]
fn phone_positive() {
    for p in [
        "+1 415 555 2671",
        "+44 20 7946 0958",
        "+14155552671",
        "+49 (30) 1234 5678",
        "(415) 555-2671",
        "415-555-2671",
        "1-415-555-2671",
        "415.555.2671",
        "030 12345678",
        "01 23 45 67 89",
        "020 7946 0958",
    ] {
        hit(PiiEntity::Phone, p);
    }
}

#[test]
fn phone_negative() {
    let phone = only(PiiEntity::Phone);
    for t in [
        "card 4111111111111111 here",
        "digits 12345678901234567",
        "+41111111111111111",
        "on 2024-01-15 at 10:30",
        "dated 01.02.2024 and 01/02/2024",
        "call +123",
        "order 1234567",
        "version 1.2.3",
    ] {
        assert_eq!(phone.scan(t), vec![], "in {t:?}");
    }
}

#[test]
fn credit_card() {
    hit(PiiEntity::CreditCard, "4111 1111 1111 1111");
    hit(PiiEntity::CreditCard, "4111-1111-1111-1111");
    hit(PiiEntity::CreditCard, "4111111111111111");
    hit(PiiEntity::CreditCard, "5500 0000 0000 0004");
    hit(PiiEntity::CreditCard, "378282246310005");
    // A CVV after the number is not part of it.
    assert_eq!(found("pay 4111 1111 1111 1111 123 now"), vec![(PiiEntity::CreditCard, "4111 1111 1111 1111")]);
    let card = only(PiiEntity::CreditCard);
    for t in ["4111 1111 1111 1112", "4111 1111 1111", "0000 0000 0000 0000", "41111111111111111111111"] {
        assert_eq!(card.scan(t), vec![], "in {t:?}");
    }
}

#[test]
fn luhn() {
    assert!(luhn_valid("79927398713"));
    assert!(luhn_valid("4111-1111-1111-1111"));
    assert!(!luhn_valid("79927398710"));
    assert!(!luhn_valid(""));
}

#[test]
fn iban() {
    hit(PiiEntity::Iban, "DE89 3704 0044 0532 0130 00");
    hit(PiiEntity::Iban, "DE89370400440532013000");
    hit(PiiEntity::Iban, "GB82WEST12345698765432");
    hit(PiiEntity::Iban, "FR14 2004 1010 0505 0001 3M02 606");
    // Followed by an upper-case word the pattern runs into.
    assert_eq!(
        found("IBAN DE89 3704 0044 0532 0130 00 THANKS"),
        vec![(PiiEntity::Iban, "DE89 3704 0044 0532 0130 00")]
    );
    let iban = only(PiiEntity::Iban);
    for t in ["DE89 3704 0044 0532 0130 01", "DE88370400440532013000", "XX00 TEST CODE NAME HERE"] {
        assert_eq!(iban.scan(t), vec![], "in {t:?}");
    }
    assert!(iban_valid("GB82 WEST 1234 5698 7654 32"));
    assert!(!iban_valid("GB83 WEST 1234 5698 7654 32"));
    assert!(!iban_valid("GB82"));
}

#[test]
fn ssn() {
    hit(PiiEntity::Ssn, "123-45-6789");
    hit(PiiEntity::Ssn, "078-05-1120");
    for bad in ["000-12-3456", "666-12-3456", "900-12-3456", "999-12-3456", "123-00-4567", "123-45-0000"] {
        assert!(!ssn_valid(bad), "{bad}");
        miss(&format!("ssn {bad} here"));
    }
    assert!(!ssn_valid("12-345-6789"));
}

#[test]
fn ip_addresses() {
    hit(PiiEntity::Ipv4, "192.168.1.10");
    hit(PiiEntity::Ipv4, "8.8.8.8");
    hit(PiiEntity::Ipv4, "255.255.255.255");
    let v4 = only(PiiEntity::Ipv4);
    for t in ["256.1.1.1", "1.2.3", "10.0.0.999"] {
        assert_eq!(v4.scan(t), vec![], "in {t:?}");
    }
    hit(PiiEntity::Ipv6, "2001:db8::1");
    hit(PiiEntity::Ipv6, "fe80::1ff:fe23:4567:890a");
    hit(PiiEntity::Ipv6, "2001:0db8:85a3:0000:0000:8a2e:0370:7334");
    assert_eq!(found("localhost is ::1 here"), vec![(PiiEntity::Ipv6, "::1")]);
    assert_eq!(found("connect to [2001:db8::7]:443"), vec![(PiiEntity::Ipv6, "2001:db8::7")]);
    for t in ["at 12:30:45 UTC", "std::vector<int>", "a::b", "cafe::babe", "Note: see: below"] {
        miss(t);
    }
}

const AWS_SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

#[test]
fn secrets() {
    let body = "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8S9t0";
    hit(PiiEntity::OpenaiKey, &format!("sk-proj-{body}"));
    hit(PiiEntity::OpenaiKey, &format!("sk-{body}"));
    hit(PiiEntity::AnthropicKey, &format!("sk-ant-api03-{body}-x_Y"));
    hit(PiiEntity::AwsAccessKey, "AKIAIOSFODNN7EXAMPLE");
    hit(PiiEntity::AwsAccessKey, "ASIAIOSFODNN7EXAMPLE");
    hit(PiiEntity::GithubToken, &format!("ghp_{body}abcd"));
    hit(PiiEntity::GithubToken, "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz");
    hit(PiiEntity::SlackToken, "xoxb-1234567890-abcdefghijkl");
    hit(PiiEntity::SlackToken, "xapp-1-A0123456789-abcdef");
    for t in
        ["sk-short", "task-force-one-two-three-four-five", "AKIA1234", "ghp_short", "xoxb-1", "AKIAIOSFODNN7EXAMPLEX"]
    {
        miss(t);
    }
}

#[test]
fn aws_secret_only_the_value() {
    for text in [
        format!("aws_secret_access_key = {AWS_SECRET}\n"),
        format!("AWS_SECRET_ACCESS_KEY={AWS_SECRET}"),
        format!("{{\"aws_secret_key\": \"{AWS_SECRET}\"}}"),
    ] {
        assert_eq!(found(&text), vec![(PiiEntity::AwsSecretKey, AWS_SECRET)], "in {text:?}");
    }
    // Unlabelled 40-character strings are not secrets.
    miss(&format!("hash {AWS_SECRET} here"));
    miss(&format!("aws_secret_access_key = {AWS_SECRET}XYZ"));
}

#[test]
fn bearer_and_pem() {
    let t = "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc-_DEF";
    assert_eq!(found(t), vec![(PiiEntity::BearerToken, "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.abc-_DEF")]);
    miss("he was the bearer of bad news");
    let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAx4+abc/def=\nQWERTY123\n-----END RSA PRIVATE KEY-----";
    assert_eq!(found(&format!("key:\n{pem}\nend")), vec![(PiiEntity::PrivateKey, pem)]);
    let pk8 = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----";
    assert_eq!(found(pk8), vec![(PiiEntity::PrivateKey, pk8)]);
    miss("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----");
}

#[test]
fn several_in_one_text_in_order() {
    let t = "mail bob@example.com, card 4111111111111111, ip 10.1.2.3";
    let got: Vec<_> = found(t).into_iter().map(|(e, _)| e).collect();
    assert_eq!(got, vec![PiiEntity::Email, PiiEntity::CreditCard, PiiEntity::Ipv4]);
}

#[test]
fn redact_and_mask() {
    let text = "card 4111-1111-1111-1111 mail john@example.com ok";
    let r = scanner(GuardAction::Redact);
    assert_eq!(r.apply(text, &r.scan(text)).as_deref(), Some("card [REDACTED:CREDIT_CARD] mail [REDACTED:EMAIL] ok"));
    let m = scanner(GuardAction::Mask);
    assert_eq!(m.apply(text, &m.scan(text)).as_deref(), Some("card ****-****-****-1111 mail j***@example.com ok"));
    let mut s = String::new();
    mask_into(&mut s, PiiEntity::Ipv6, "::1");
    assert_eq!(s, "::*");
    s.clear();
    mask_into(&mut s, PiiEntity::AwsAccessKey, "AKIAIOSFODNN7EXAMPLE");
    assert_eq!(s, "****************MPLE");
}

#[test]
fn log_and_block_do_not_rewrite() {
    let text = "mail john@example.com";
    for a in [GuardAction::Log, GuardAction::Block] {
        let s = scanner(a);
        let f = s.scan(text);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].action, a);
        assert_eq!(s.apply(text, &f), None);
    }
}

#[test]
fn disabled_entities_and_clean_text() {
    let s = only(PiiEntity::Email);
    assert_eq!(s.scan("card 4111111111111111 ip 10.0.0.1").len(), 0);
    assert!(scanner(GuardAction::Redact).scan("Just a normal question about Rust lifetimes?").is_empty());
    let none = PiiScanner::new(&cfg_with(PiiEntities::default())).expect("empty");
    assert!(!none.is_active());
    assert!(none.scan("john@example.com").is_empty());
}

#[test]
fn finding_spans_and_rules() {
    let text = "é mail john@example.com";
    let f = scanner(GuardAction::Log).scan(text);
    assert_eq!(f.len(), 1);
    assert_eq!(&text[f[0].start..f[0].end], "john@example.com");
    assert_eq!(f[0].rule, "email");
}

#[test]
fn holdback_bound_checked() {
    let mut c = cfg_with(all(GuardAction::Redact));
    c.max_holdback_bytes = 4;
    assert!(matches!(PiiScanner::new(&c), Err(PiiError::Holdback { min: MIN_HOLDBACK, got: 4 })));
}
