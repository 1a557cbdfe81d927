//! A strict, allocation-free JSON cursor for the few fields tollgate reads from request and
//! response bodies: the fast path in front of `serde_json`.
//!
//! It accepts a subset of what `serde_json::from_slice` into the [`super::openai`] wire structs
//! accepts, and reads the same values from it; anything outside that subset (escapes in a
//! string that is kept, numbers that are not plain `u64`, unexpected types, duplicate fields,
//! non-object forms, very deep nesting) yields [`Defer`], and the caller parses the body with
//! `serde_json` as before. So the result for any input is the one `serde_json` gives; the cursor
//! only makes the common case cheap (string contents are skipped with `memchr`).
//!
//! Skipped values follow `serde_json`'s `ignore_value` exactly: strings may hold any bytes
//! except unescaped control characters, escapes must be valid (`\u` with four hex digits),
//! numbers follow the JSON grammar, no trailing commas.

/// The fast path declines this input: parse it with `serde_json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Defer;

/// Result of the fast path.
pub(crate) type Fast<T> = Result<T, Defer>;

/// Nesting handled while skipping; deeper documents are deferred.
const MAX_DEPTH: usize = 64;

/// A position in a JSON document.
pub(crate) struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `s`.
    pub(crate) fn new(s: &'a [u8]) -> Self {
        Cursor { s, i: 0 }
    }

    /// Skip whitespace; the next byte, not consumed.
    fn peek(&mut self) -> Option<u8> {
        while let Some(&b) = self.s.get(self.i) {
            if !matches!(b, b' ' | b'\n' | b'\t' | b'\r') {
                return Some(b);
            }
            self.i += 1;
        }
        None
    }

    /// Skip whitespace and consume `b`.
    fn eat(&mut self, b: u8) -> Fast<()> {
        if self.peek() == Some(b) {
            self.i += 1;
            Ok(())
        } else {
            Err(Defer)
        }
    }

    /// Only whitespace may follow the document.
    pub(crate) fn end(mut self) -> Fast<()> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(Defer),
        }
    }

    /// Next non-whitespace byte is `{`.
    pub(crate) fn at_object(&mut self) -> bool {
        self.peek() == Some(b'{')
    }

    /// `null` (consumed) is next.
    fn null(&mut self) -> Fast<bool> {
        if self.peek() != Some(b'n') {
            return Ok(false);
        }
        self.literal(b"null")?;
        Ok(true)
    }

    fn literal(&mut self, word: &[u8]) -> Fast<()> {
        if self.s[self.i..].starts_with(word) {
            self.i += word.len();
            Ok(())
        } else {
            Err(Defer)
        }
    }

    /// The members of an object: `member(cursor, key)` must consume each value. Keys are
    /// escape-free ASCII (others defer), handed over as bytes.
    pub(crate) fn object(&mut self, mut member: impl FnMut(&mut Self, &'a [u8]) -> Fast<()>) -> Fast<()> {
        self.eat(b'{')?;
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(());
        }
        loop {
            let key = self.plain_bytes()?;
            if !key.is_ascii() {
                return Err(Defer);
            }
            self.eat(b':')?;
            member(self, key)?;
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(Defer),
            }
        }
    }

    /// The elements of an array: `element(cursor)` must consume each one.
    pub(crate) fn array(&mut self, mut element: impl FnMut(&mut Self) -> Fast<()>) -> Fast<()> {
        self.eat(b'[')?;
        if self.peek() == Some(b']') {
            self.i += 1;
            return Ok(());
        }
        loop {
            element(self)?;
            match self.peek() {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(Defer),
            }
        }
    }

    /// An object (`Some`) or `null` (`None`); anything else defers.
    pub(crate) fn opt_object(&mut self, member: impl FnMut(&mut Self, &'a [u8]) -> Fast<()>) -> Fast<Option<()>> {
        if self.null()? {
            return Ok(None);
        }
        if self.peek() != Some(b'{') {
            return Err(Defer);
        }
        self.object(member).map(Some)
    }

    /// An array (`Some`) or `null` (`None`); anything else defers.
    pub(crate) fn opt_array(&mut self, element: impl FnMut(&mut Self) -> Fast<()>) -> Fast<Option<()>> {
        if self.null()? {
            return Ok(None);
        }
        self.array(element).map(Some)
    }

    /// The raw content of a string without escapes.
    fn plain_bytes(&mut self) -> Fast<&'a [u8]> {
        self.eat(b'"')?;
        let (n, end) = self.scan()?;
        if end != b'"' {
            return Err(Defer);
        }
        let raw = &self.s[self.i..self.i + n];
        self.i += n + 1;
        Ok(raw)
    }

    /// From the cursor: the offset of the first `"` or `\\` and which it is. Unescaped control
    /// characters and unterminated strings defer.
    fn scan(&self) -> Fast<(usize, u8)> {
        /// Bytes looked at eight at a time before switching to `memchr` (long strings).
        const SHORT: usize = 32;
        let rest = &self.s[self.i..];
        let head = &rest[..rest.len().min(SHORT)];
        let mut k = 0;
        for chunk in head.chunks_exact(8) {
            let w =
                u64::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6], chunk[7]]);
            if let Some(p) = first_special(w) {
                k += p;
                break;
            }
            k += 8;
        }
        while let Some(&b) = head.get(k) {
            match b {
                b'"' | b'\\' => return Ok((k, b)),
                0..=0x1f => return Err(Defer),
                _ => k += 1,
            }
        }
        let tail = rest.get(SHORT..).ok_or(Defer)?;
        let n = memchr::memchr2(b'"', b'\\', tail).ok_or(Defer)?;
        if has_control(&tail[..n]) {
            return Err(Defer);
        }
        Ok((SHORT + n, tail[n]))
    }

    /// `null` or an escape-free string.
    pub(crate) fn opt_str(&mut self) -> Fast<Option<&'a str>> {
        if self.null()? {
            return Ok(None);
        }
        std::str::from_utf8(self.plain_bytes()?).map(Some).map_err(|_| Defer)
    }

    /// `null`, `true` or `false`.
    pub(crate) fn opt_bool(&mut self) -> Fast<Option<bool>> {
        match self.peek() {
            Some(b'n') => self.literal(b"null").map(|_| None),
            Some(b't') => self.literal(b"true").map(|_| Some(true)),
            Some(b'f') => self.literal(b"false").map(|_| Some(false)),
            _ => Err(Defer),
        }
    }

    /// `null` or a non-negative integer that fits `u64`, without fraction or exponent.
    pub(crate) fn opt_u64(&mut self) -> Fast<Option<u64>> {
        if self.null()? {
            return Ok(None);
        }
        let digits = self.s[self.i..].iter().take_while(|b| b.is_ascii_digit()).count();
        let raw = &self.s[self.i..self.i + digits];
        let next = self.s.get(self.i + digits).copied();
        if digits == 0 || (digits > 1 && raw[0] == b'0') || matches!(next, Some(b'.' | b'e' | b'E')) {
            return Err(Defer);
        }
        let mut v: u64 = 0;
        for &d in raw {
            v = v.checked_mul(10).and_then(|v| v.checked_add(u64::from(d - b'0'))).ok_or(Defer)?;
        }
        self.i += digits;
        Ok(Some(v))
    }

    /// Skip any value, validating it as `serde_json` does when ignoring one.
    pub(crate) fn skip(&mut self) -> Fast<()> {
        // Open containers, innermost last: b'[' or b'{'.
        let mut stack = [0u8; MAX_DEPTH];
        let mut depth = 0usize;
        loop {
            // A value.
            match self.peek().ok_or(Defer)? {
                b'n' => self.literal(b"null")?,
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'-' => {
                    self.i += 1;
                    self.skip_number()?;
                }
                b'0'..=b'9' => self.skip_number()?,
                b'"' => {
                    self.i += 1;
                    self.skip_str()?;
                }
                open @ (b'[' | b'{') => {
                    self.i += 1;
                    let close = if open == b'[' { b']' } else { b'}' };
                    if self.peek() == Some(close) {
                        self.i += 1;
                    } else {
                        if depth == MAX_DEPTH {
                            return Err(Defer);
                        }
                        stack[depth] = open;
                        depth += 1;
                        if open == b'{' {
                            self.skip_key()?;
                        }
                        continue;
                    }
                }
                _ => return Err(Defer),
            }
            // After a value: a separator or the end of enclosing containers.
            loop {
                if depth == 0 {
                    return Ok(());
                }
                let open = stack[depth - 1];
                let close = if open == b'[' { b']' } else { b'}' };
                match self.peek() {
                    Some(b',') => {
                        self.i += 1;
                        if open == b'{' {
                            self.skip_key()?;
                        }
                        break;
                    }
                    Some(c) if c == close => {
                        self.i += 1;
                        depth -= 1;
                    }
                    _ => return Err(Defer),
                }
            }
        }
    }

    /// `"key":` of a skipped object.
    fn skip_key(&mut self) -> Fast<()> {
        self.eat(b'"')?;
        self.skip_str()?;
        self.eat(b':')
    }

    /// Rest of a string after its opening quote: no unescaped control characters, valid escapes.
    fn skip_str(&mut self) -> Fast<()> {
        loop {
            let (n, end) = self.scan()?;
            self.i += n + 1;
            if end == b'"' {
                return Ok(());
            }
            match self.s.get(self.i).copied().ok_or(Defer)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 1,
                b'u' => {
                    let hex = self.s.get(self.i + 1..self.i + 5).ok_or(Defer)?;
                    if !hex.iter().all(u8::is_ascii_hexdigit) {
                        return Err(Defer);
                    }
                    self.i += 5;
                }
                _ => return Err(Defer),
            }
        }
    }

    /// A number after its optional minus sign (JSON grammar).
    fn skip_number(&mut self) -> Fast<()> {
        let digits = |c: &mut Self| {
            let n = c.s[c.i..].iter().take_while(|b| b.is_ascii_digit()).count();
            c.i += n;
            n
        };
        match self.s.get(self.i).copied() {
            Some(b'0') => {
                self.i += 1;
                if self.s.get(self.i).is_some_and(u8::is_ascii_digit) {
                    return Err(Defer);
                }
            }
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return Err(Defer),
        }
        if self.s.get(self.i) == Some(&b'.') {
            self.i += 1;
            if digits(self) == 0 {
                return Err(Defer);
            }
        }
        if matches!(self.s.get(self.i), Some(b'e' | b'E')) {
            self.i += 1;
            if matches!(self.s.get(self.i), Some(b'+' | b'-')) {
                self.i += 1;
            }
            if digits(self) == 0 {
                return Err(Defer);
            }
        }
        Ok(())
    }
}

/// Index of the first byte of `w` (little-endian) that is `"`, `\\` or a control character
/// (the same test `serde_json` uses; borrows only ever flag bytes after a real match).
fn first_special(w: u64) -> Option<usize> {
    const ONES: u64 = u64::MAX / 255;
    let ctrl = w.wrapping_sub(ONES * 0x20) & !w;
    let q = w ^ (ONES * u64::from(b'"'));
    let quote = q.wrapping_sub(ONES) & !q;
    let b = w ^ (ONES * u64::from(b'\\'));
    let backslash = b.wrapping_sub(ONES) & !b;
    let m = (ctrl | quote | backslash) & (ONES << 7);
    (m != 0).then(|| m.trailing_zeros() as usize / 8)
}

fn has_control(s: &[u8]) -> bool {
    s.iter().fold(false, |acc, &b| acc | (b < 0x20))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skips(s: &str) -> bool {
        let mut c = Cursor::new(s.as_bytes());
        c.skip().is_ok() && c.end().is_ok()
    }

    #[test]
    fn skip_accepts_only_what_serde_accepts() {
        let cases = [
            "null",
            "true",
            "false",
            "0",
            "-0",
            "1.5e-3",
            "12E+2",
            "\"a\\u00e9\\n\\\"\"",
            "[]",
            "{}",
            "[1,[2,{\"a\":[{}]}],\"x\"]",
            " { \"k\" : [ 1 , 2 ] , \"\\u0041\" : null } ",
            "01",
            "1.",
            "1e",
            "-",
            "+1",
            "[1,]",
            "{\"a\":1,}",
            "{\"a\"}",
            "{1:2}",
            "[1 2]",
            "\"\\x\"",
            "\"\\u12G4\"",
            "\"a\u{1}\"",
            "nul",
            "[",
            "{\"a\":",
            "\"abc",
            "[]]",
            "tru",
            "\"\\u12\"",
            "1 2",
            "\"\u{7f}\u{80}\"",
        ];
        for s in cases {
            let serde_ok = serde_json::from_str::<serde::de::IgnoredAny>(s).is_ok();
            assert!(!skips(s) || serde_ok, "fast path accepted {s:?}, serde rejects it");
            assert_eq!(skips(s), serde_ok, "{s:?}");
        }
        // Deep nesting is left to serde_json.
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 2), "]".repeat(MAX_DEPTH + 2));
        assert!(!skips(&deep));
    }

    #[test]
    fn typed_reads() {
        let u = |s: &str| Cursor::new(s.as_bytes()).opt_u64();
        assert_eq!(u("null"), Ok(None));
        assert_eq!(u("0"), Ok(Some(0)));
        assert_eq!(u("18446744073709551615"), Ok(Some(u64::MAX)));
        for s in ["18446744073709551616", "01", "1.0", "1e3", "-1", "-0", "true", "\"1\""] {
            assert_eq!(u(s), Err(Defer), "{s}");
        }
        let b = |s: &str| Cursor::new(s.as_bytes()).opt_bool();
        assert_eq!((b("true"), b("false"), b("null"), b("1")), (Ok(Some(true)), Ok(Some(false)), Ok(None), Err(Defer)));
        let mut c = Cursor::new(br#""plain" "esc\"aped""#);
        assert_eq!(c.opt_str(), Ok(Some("plain")));
        assert_eq!(c.opt_str(), Err(Defer));
    }
}
