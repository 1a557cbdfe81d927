//! Deterministic building blocks shared by the mock's provider wire formats (`openai`,
//! `anthropic`, `gemini`).
//!
//! Every mock reply is a pure function of the request's meaning, so a test can recompute exactly
//! what the mock sent. These helpers are that function's pieces: a stable hash, a word sequence
//! drawn from it, tool-call arguments derived from a tool's JSON schema, fragmenting for streamed
//! deltas, and whitespace word counts used by the token formulas.

use serde_json::{json, Map, Value};

/// The words replies are made of (one "token" each in the usage formulas).
pub const WORDS: [&str; 32] = [
    "gateway", "token", "kernel", "cgroup", "socket", "stream", "agent", "budget", "latency", "proxy", "model",
    "prompt", "answer", "trace", "metric", "splice", "cipher", "route", "packet", "buffer", "replay", "signal",
    "vector", "cache", "quota", "ledger", "beacon", "harbor", "lantern", "meadow", "orbit", "summit",
];

/// FNV-1a 64-bit offset basis: the starting value of [`Hasher`].
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A stable 64-bit FNV-1a hash (Rust's `DefaultHasher` may change between releases, and the
/// tests compare against values computed in another process).
#[derive(Debug, Clone, Copy)]
pub struct Hasher(pub u64);

impl Default for Hasher {
    fn default() -> Self {
        Hasher(FNV_OFFSET)
    }
}

impl Hasher {
    /// A hasher pre-seeded with `salt`, so providers draw different words for the same prompt.
    pub fn salted(salt: &str) -> Self {
        let mut h = Hasher::default();
        h.bytes(salt.as_bytes());
        h
    }

    /// Feed raw bytes.
    pub fn bytes(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// Feed a NUL-separated `(role, text)` pair, the unit every provider hashes per message.
    pub fn message(&mut self, role: &str, text: &str) {
        self.bytes(&[0]);
        self.bytes(role.as_bytes());
        self.bytes(&[0]);
        self.bytes(text.as_bytes());
    }

    /// The hash value.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// `n` words drawn from `seed` by xorshift64, the first bare and the rest with a leading space, so
/// the words concatenate into the reply text and each can be streamed as one delta.
pub fn words(seed: u64, n: u64) -> Vec<String> {
    let mut x = seed;
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = WORDS[(x % WORDS.len() as u64) as usize];
        out.push(if i == 0 { w.to_string() } else { format!(" {w}") });
    }
    out
}

/// The default reply length for a hash: 8 to 16 words.
pub fn natural_len(h: u64) -> u64 {
    8 + h % 9
}

/// Whitespace-separated word count: the mock's notion of "tokens" in a text.
pub fn count_words(s: &str) -> u64 {
    s.split_whitespace().count() as u64
}

/// `text` re-split into streamable words (first bare, rest with a leading space); whitespace runs
/// collapse to one space, so `concat()` of the result is the canonical reply text.
pub fn split_words(text: &str) -> Vec<String> {
    text.split_whitespace().enumerate().map(|(i, w)| if i == 0 { w.to_string() } else { format!(" {w}") }).collect()
}

/// Split `s` into pieces of at most `max` characters (on char boundaries), the fragments a
/// streamed tool-call argument string is sent in. Empty input gives no fragments.
pub fn fragments(s: &str, max: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    chars.chunks(max.max(1)).map(|c| c.iter().collect()).collect()
}

/// Deterministic tool-call arguments for a JSON schema: one value per declared property (enum:
/// its first value; string: a word; integer: `seed % 100`; number: `(seed % 1000) / 10`;
/// boolean: `seed` even; array: `[]`; object: `{}`; otherwise `null`).
pub fn args_for_schema(schema: Option<&Value>, seed: u64) -> Value {
    let mut out = Map::new();
    let props = schema.and_then(|s| s.get("properties")).and_then(Value::as_object);
    for (i, (name, prop)) in props.into_iter().flatten().enumerate() {
        let s = seed.wrapping_add(i as u64 * 7919);
        let v = if let Some(first) = prop.get("enum").and_then(Value::as_array).and_then(|e| e.first()) {
            first.clone()
        } else {
            let ty = match prop.get("type") {
                Some(Value::String(t)) => t.as_str(),
                // e.g. ["string", "null"]: the first non-null type.
                Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).find(|t| *t != "null").unwrap_or("null"),
                _ => "",
            };
            match ty.to_ascii_lowercase().as_str() {
                "string" => json!(WORDS[(s % WORDS.len() as u64) as usize]),
                "integer" => json!(s % 100),
                "number" => json!((s % 1000) as f64 / 10.0),
                "boolean" => json!(s.is_multiple_of(2)),
                "array" => json!([]),
                "object" => json!({}),
                _ => Value::Null,
            }
        };
        out.insert(name.clone(), v);
    }
    Value::Object(out)
}

/// Output "tokens" the formulas charge for a tool call with `arguments` (compact JSON):
/// `10 + len(arguments) / 4`.
pub fn tool_call_tokens(arguments: &str) -> u64 {
    10 + arguments.len() as u64 / 4
}

/// Standard base64 (with padding), for `encoding_format: "base64"` embeddings.
pub fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= c.len() { A[((n >> shift) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

/// Text of a content value that is either a string or an array of parts carrying `text`
/// (joined with newlines); anything else is empty.
pub fn text_of(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("\n")
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foobar", "Zm9vYmFy")] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }

    #[test]
    fn fragments_and_words() {
        assert_eq!(fragments("abcdefg", 3), vec!["abc", "def", "g"]);
        assert!(fragments("", 3).is_empty());
        assert_eq!(split_words(" a  b\nc "), vec!["a", " b", " c"]);
        assert_eq!(words(42, 3).len(), 3);
    }

    #[test]
    fn schema_args_are_deterministic() {
        let s = json!({"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}, "days": {"type": "integer"}
        }});
        let a = args_for_schema(Some(&s), 7);
        assert_eq!(a, args_for_schema(Some(&s), 7));
        assert_eq!(a["unit"], "c");
        assert!(a["city"].is_string() && a["days"].is_u64());
        assert_eq!(args_for_schema(None, 1), json!({}));
    }
}
