//! Streaming redaction: output over any chunking equals the whole-text redaction, the holdback
//! bound holds, blocks stop the stream.

use std::sync::Arc;

use super::pii_tests::{all, cfg_with, scanner};
use super::*;
use crate::config::guards::PiiEntities;

const SENTENCE: &str = "Hi, pay with 4111 1111 1111 1111 and write to jane.doe@example.com; \
                        the key is AKIAIOSFODNN7EXAMPLE, thanks — café ☕ 10.0.0.1 (415) 555-2671.";

/// The whole-text result the stream must reproduce.
fn expected(s: &PiiScanner, text: &str) -> String {
    s.apply(text, &s.scan(text)).unwrap_or_else(|| text.to_string())
}

/// Feed `pieces` one by one; the concatenated output.
fn run(s: &Arc<PiiScanner>, pieces: &[&str]) -> String {
    let mut r = StreamRedactor::new(s.clone());
    let mut out = String::new();
    for p in pieces {
        out.push_str(r.push(p));
        assert!(r.held() <= s.max_holdback, "held {} > bound", r.held());
    }
    out.push_str(r.finish());
    assert_eq!(r.held(), 0);
    out
}

fn boundaries(text: &str) -> impl Iterator<Item = usize> + '_ {
    (0..=text.len()).filter(|&i| text.is_char_boundary(i))
}

#[test]
fn every_split_point_matches_whole_text() {
    for action in [GuardAction::Redact, GuardAction::Mask, GuardAction::Log] {
        let s = Arc::new(scanner(action));
        let want = expected(&s, SENTENCE);
        if action != GuardAction::Log {
            assert!(!want.contains("4111 1111 1111 1111") && !want.contains("AKIAIOSFODNN7EXAMPLE"), "{want}");
            assert!(!want.contains("jane.doe@"), "{want}");
        }
        for at in boundaries(SENTENCE) {
            let got = run(&s, &[&SENTENCE[..at], &SENTENCE[at..]]);
            assert_eq!(got, want, "{action:?} split at {at}: {:?} | {:?}", &SENTENCE[..at], &SENTENCE[at..]);
        }
    }
}

#[test]
fn every_pair_of_split_points_matches_whole_text() {
    let s = Arc::new(scanner(GuardAction::Redact));
    let text = "card 4111 1111 1111 1111, mail a.b@example.org, AKIAIOSFODNN7EXAMPLE.";
    let want = expected(&s, text);
    for i in boundaries(text) {
        for j in boundaries(text).filter(|&j| j >= i) {
            let got = run(&s, &[&text[..i], &text[i..j], &text[j..]]);
            assert_eq!(got, want, "splits at {i}, {j}");
        }
    }
}

#[test]
fn char_by_char_matches_whole_text() {
    for action in [GuardAction::Redact, GuardAction::Mask] {
        let s = Arc::new(scanner(action));
        let pieces: Vec<&str> = SENTENCE.char_indices().map(|(i, c)| &SENTENCE[i..i + c.len_utf8()]).collect();
        assert_eq!(run(&s, &pieces), expected(&s, SENTENCE));
    }
}

#[test]
fn pseudo_random_chunkings_match_whole_text() {
    let s = Arc::new(scanner(GuardAction::Mask));
    let text = format!(
        "{SENTENCE} Also DE89 3704 0044 0532 0130 00, ssn 123-45-6789, sk-proj-A1b2C3d4E5f6G7h8I9j0K1l2 \
         and Bearer abcdefghijklmnopqrstuvwxyz012345 plus +44 20 7946 0958 at 2001:db8::1."
    );
    let want = expected(&s, &text);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..300 {
        let mut pieces = Vec::new();
        let mut at = 0;
        while at < text.len() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut end = (at + 1 + (seed % 12) as usize).min(text.len());
            while !text.is_char_boundary(end) {
                end += 1;
            }
            pieces.push(&text[at..end]);
            at = end;
        }
        assert_eq!(run(&s, &pieces), want, "pieces {pieces:?}");
    }
}

#[test]
fn split_card_is_held_then_redacted() {
    let s = Arc::new(scanner(GuardAction::Redact));
    let mut r = StreamRedactor::new(s);
    let first = r.push("card 4111 1111").to_string();
    assert_eq!(first, "card ");
    let second = r.push(" 1111 1111").to_string();
    let rest = r.finish().to_string();
    assert_eq!(format!("{first}{second}{rest}"), "card [REDACTED:CREDIT_CARD]");
    assert_eq!(r.findings().len(), 1);
    assert_eq!((r.findings()[0].start, r.findings()[0].end), (5, 24));
    assert_eq!(r.verdicts().len(), 1);
    assert_eq!(r.verdicts()[0].kind, VerdictKind::Pii(crate::config::guards::PiiEntity::CreditCard));
}

#[test]
fn clean_text_is_released_promptly() {
    let s = Arc::new(scanner(GuardAction::Redact));
    let mut r = StreamRedactor::new(s);
    assert_eq!(r.push("Hello there, how are you? "), "Hello there, how are you? ");
    assert_eq!(r.held(), 0);
    // A trailing word could still become an email's local part: held until it ends.
    assert_eq!(r.push("I am"), "I ");
    // "fine." could still be "fine.x@example.com".
    assert_eq!(r.push(" fine."), "am ");
    assert_eq!(r.push(" Bye"), "fine. ");
    assert_eq!(r.finish(), "Bye");
}

#[test]
fn holdback_bound_is_respected() {
    let mut c = cfg_with(all(GuardAction::Redact));
    c.max_holdback_bytes = 64;
    let s = Arc::new(PiiScanner::new(&c).expect("scanner"));
    let mut r = StreamRedactor::new(s);
    let word = "a".repeat(1000);
    let mut out = String::new();
    for chunk in word.as_bytes().chunks(7) {
        out.push_str(r.push(std::str::from_utf8(chunk).expect("ascii")));
        assert!(r.held() <= 64, "held {}", r.held());
    }
    assert!(r.holdback_overflows() > 0);
    out.push_str(r.finish());
    assert_eq!(out, word);
}

#[test]
fn block_stops_the_stream() {
    let mut e = PiiEntities { aws_access_key: Some(GuardAction::Block), ..PiiEntities::default() };
    e.email = Some(GuardAction::Redact);
    let s = Arc::new(PiiScanner::new(&cfg_with(e)).expect("scanner"));
    let mut r = StreamRedactor::new(s);
    let mut out = r.push("mail x@example.com, key AKIAIOSF").to_string();
    assert!(r.blocked().is_none());
    out.push_str(r.push("ODNN7EXAMPLE and more"));
    assert!(r.blocked().is_some());
    out.push_str(r.push(" even more"));
    out.push_str(r.finish());
    assert_eq!(out, "mail [REDACTED:EMAIL], key ");
    let blocked = r.blocked().expect("blocked");
    assert_eq!(blocked.entity, crate::config::guards::PiiEntity::AwsAccessKey);
    assert_eq!(blocked.start, 24);
}

#[test]
fn chained_guards_stream() {
    let mut first = cfg_with(PiiEntities { email: Some(GuardAction::Mask), ..PiiEntities::default() });
    first.name = "emails".into();
    let mut second = cfg_with(PiiEntities { credit_card: Some(GuardAction::Redact), ..PiiEntities::default() });
    second.name = "cards".into();
    let a = Arc::new(PiiScanner::new(&first).expect("a"));
    let b = Arc::new(PiiScanner::new(&second).expect("b"));
    let text = "to bob@example.com card 4111111111111111 done";
    let want = {
        let once = expected(&a, text);
        expected(&b, &once)
    };
    assert_eq!(want, "to b***@example.com card [REDACTED:CREDIT_CARD] done");
    for at in boundaries(text) {
        let mut chain = ResponseStream::new(vec![StreamRedactor::new(a.clone()), StreamRedactor::new(b.clone())]);
        let mut out = chain.push(&text[..at]).to_string();
        out.push_str(chain.push(&text[at..]));
        out.push_str(chain.finish());
        assert_eq!(out, want, "split at {at}");
        assert_eq!(chain.verdicts().count(), 2);
        assert!(chain.blocked().is_none());
    }
}

#[test]
fn finish_on_empty_stream() {
    let s = Arc::new(scanner(GuardAction::Redact));
    let mut r = StreamRedactor::new(s);
    assert_eq!(r.push(""), "");
    assert_eq!(r.finish(), "");
}

#[test]
fn every_split_point_for_long_secrets() {
    let s = Arc::new(scanner(GuardAction::Redact));
    let text = "cfg:\naws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n\
                -----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBnVJk5oPh8mPP+Sne9\n\
                -----END EC PRIVATE KEY-----\nAuthorization: Bearer abcdefghijklmnopqrstuvwxyz012345\n";
    let want = expected(&s, text);
    assert_eq!(
        want,
        "cfg:\naws_secret_access_key = [REDACTED:AWS_SECRET_KEY]\n[REDACTED:PRIVATE_KEY]\n\
         Authorization: Bearer [REDACTED:BEARER_TOKEN]\n"
    );
    for at in boundaries(text) {
        assert_eq!(run(&s, &[&text[..at], &text[at..]]), want, "split at {at}");
    }
}

#[test]
fn multibyte_context_before_a_value() {
    let s = Arc::new(scanner(GuardAction::Mask));
    let text = "é€x@example.com ☕4111111111111111";
    let want = expected(&s, text);
    for at in boundaries(text) {
        assert_eq!(run(&s, &[&text[..at], &text[at..]]), want, "split at {at}");
    }
}
