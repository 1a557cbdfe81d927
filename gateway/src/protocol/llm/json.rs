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

use std::borrow::Cow;

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
    #[inline]
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
    #[inline]
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

    /// Offset of the next byte to read (after any whitespace skipped so far).
    pub(crate) fn pos(&self) -> usize {
        self.i
    }

    /// `null` is next: consumed, true. Anything else is left for the caller.
    pub(crate) fn take_null(&mut self) -> Fast<bool> {
        self.null()
    }

    /// Next non-whitespace byte is `{`.
    pub(crate) fn at_object(&mut self) -> bool {
        self.peek() == Some(b'{')
    }

    /// `null` (consumed) is next.
    #[inline]
    fn null(&mut self) -> Fast<bool> {
        if self.peek() != Some(b'n') {
            return Ok(false);
        }
        self.literal(b"null")?;
        Ok(true)
    }

    #[inline]
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
    #[inline]
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

    /// `null` or a string of any content, unescaped: borrowed when it holds no escape (the usual
    /// case), one allocation otherwise. Unlike [`Self::opt_str`] escapes never defer, so the
    /// provider readers can take message text, error messages and ids as they come. Unpaired
    /// surrogate escapes become U+FFFD.
    pub(crate) fn opt_string(&mut self) -> Fast<Option<Cow<'a, str>>> {
        if self.null()? {
            return Ok(None);
        }
        self.eat(b'"')?;
        let (n, end) = self.scan()?;
        let first = std::str::from_utf8(&self.s[self.i..self.i + n]).map_err(|_| Defer)?;
        self.i += n + 1;
        if end == b'"' {
            return Ok(Some(Cow::Borrowed(first)));
        }
        let mut out = String::with_capacity(n + 16);
        out.push_str(first);
        loop {
            let e = self.s.get(self.i).copied().ok_or(Defer)?;
            self.i += 1;
            let ch = match e {
                b'"' => '"',
                b'\\' => '\\',
                b'/' => '/',
                b'b' => '\u{8}',
                b'f' => '\u{c}',
                b'n' => '\n',
                b'r' => '\r',
                b't' => '\t',
                b'u' => self.unicode_escape()?,
                _ => return Err(Defer),
            };
            out.push(ch);
            // Runs end at an ASCII quote or backslash, so each is whole UTF-8.
            let (n, end) = self.scan()?;
            out.push_str(std::str::from_utf8(&self.s[self.i..self.i + n]).map_err(|_| Defer)?);
            self.i += n + 1;
            if end == b'"' {
                return Ok(Some(Cow::Owned(out)));
            }
        }
    }

    /// The character of a `\u` escape whose `u` was consumed, joining a surrogate pair.
    fn unicode_escape(&mut self) -> Fast<char> {
        let hi = self.hex4()?;
        if !(0xD800..0xDC00).contains(&hi) {
            return Ok(char::from_u32(hi).unwrap_or('\u{fffd}'));
        }
        if self.s.get(self.i..self.i + 2) == Some(&b"\\u"[..]) {
            let at = self.i;
            self.i += 2;
            let lo = self.hex4()?;
            if (0xDC00..0xE000).contains(&lo) {
                return Ok(char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)).unwrap_or('\u{fffd}'));
            }
            // Not a low surrogate: it is an escape of its own.
            self.i = at;
        }
        Ok('\u{fffd}')
    }

    /// Four hex digits.
    fn hex4(&mut self) -> Fast<u32> {
        let hex = self.s.get(self.i..self.i + 4).ok_or(Defer)?;
        let mut v = 0u32;
        for &h in hex {
            v = v * 16 + char::from(h).to_digit(16).ok_or(Defer)?;
        }
        self.i += 4;
        Ok(v)
    }

    /// A string; any other value is skipped and reads as `None`. The provider readers are
    /// lenient about types: a field of an unexpected type is simply not observed.
    pub(crate) fn lenient_str(&mut self) -> Fast<Option<Cow<'a, str>>> {
        if self.peek() == Some(b'"') {
            self.opt_string()
        } else {
            self.skip().map(|()| None)
        }
    }

    /// A non-negative integer, as a number or as a string of digits (how protobuf JSON writes
    /// 64-bit integers); any other value is skipped and reads as `None`.
    pub(crate) fn lenient_u64(&mut self) -> Fast<Option<u64>> {
        match self.peek() {
            Some(b'0'..=b'9') => match self.opt_u64() {
                Ok(v) => Ok(v),
                // `opt_u64` consumed nothing: skip (validating) the number it declined.
                Err(Defer) => self.skip().map(|()| None),
            },
            Some(b'"') => Ok(self.opt_string()?.and_then(|s| s.parse().ok())),
            _ => self.skip().map(|()| None),
        }
    }

    /// The members of an object (true); any other value is skipped (false).
    pub(crate) fn lenient_object(&mut self, member: impl FnMut(&mut Self, &'a [u8]) -> Fast<()>) -> Fast<bool> {
        if self.peek() == Some(b'{') {
            self.object(member).map(|()| true)
        } else {
            self.skip().map(|()| false)
        }
    }

    /// The elements of an array (true); any other value is skipped (false).
    pub(crate) fn lenient_array(&mut self, element: impl FnMut(&mut Self) -> Fast<()>) -> Fast<bool> {
        if self.peek() == Some(b'[') {
            self.array(element).map(|()| true)
        } else {
            self.skip().map(|()| false)
        }
    }

    /// The next non-whitespace byte, not consumed: lets a reader pick how to read a value.
    pub(crate) fn peek_byte(&mut self) -> Option<u8> {
        self.peek()
    }

    /// Skip a value and return its raw JSON text (tool arguments counted as written).
    pub(crate) fn skip_raw(&mut self) -> Fast<&'a [u8]> {
        self.peek();
        let start = self.i;
        self.skip()?;
        Ok(&self.s[start..self.i])
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
#[inline]
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

    #[test]
    fn strings_unescaped_like_serde() {
        let cases = [
            r#""plain""#,
            r#""""#,
            r#""a\"b\\c\/d\b\f\n\r\t""#,
            r#""\u00e9\u4e2d \ud83d\ude00 end""#,
            "\"h\u{e9}llo \\n w\u{f6}rld 0123456789012345678901234567890123456789\"",
            r#""\\""#,
        ];
        for s in cases {
            let want: String = serde_json::from_str(s).unwrap();
            let got = Cursor::new(s.as_bytes()).opt_string().unwrap().unwrap();
            assert_eq!(got, want, "{s}");
            assert_eq!(matches!(got, Cow::Borrowed(_)), !s.contains('\\'), "{s}");
        }
        // Unpaired surrogates are replaced, invalid input is declined.
        let lone = Cursor::new(br#""a\ud800b\udc00\ud800\u0041""#).opt_string().unwrap().unwrap();
        assert_eq!(lone, "a\u{fffd}b\u{fffd}\u{fffd}A");
        for bad in [&br#""\x""#[..], br#""\u12""#, b"\"a\x01\"", br#""abc"#, b"\"\xff\""] {
            assert_eq!(Cursor::new(bad).opt_string(), Err(Defer), "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(Cursor::new(b"null").opt_string(), Ok(None));
    }

    #[test]
    fn lenient_reads_skip_other_types() {
        let doc =
            br#"{"n":12,"f":1.5,"big":18446744073709551616,"s":"34","o":{"x":[1,{"y":null}]},"a":[true],"t":"txt"}"#;
        let mut c = Cursor::new(doc);
        let mut got = Vec::new();
        c.object(|c, k| {
            let v = match k {
                b"n" | b"f" | b"big" | b"s" => format!("{:?}", c.lenient_u64()?),
                b"o" => format!("{:?}", std::str::from_utf8(c.skip_raw()?).unwrap()),
                b"a" => format!("{:?}", c.lenient_object(|c, _| c.skip())?),
                _ => format!("{:?}", c.lenient_str()?),
            };
            got.push(v);
            Ok(())
        })
        .unwrap();
        c.end().unwrap();
        assert_eq!(
            got,
            ["Some(12)", "None", "None", "Some(34)", r#""{\"x\":[1,{\"y\":null}]}""#, "false", r#"Some("txt")"#]
        );
        // Malformed values are still declined.
        assert_eq!(Cursor::new(b"01").lenient_u64(), Err(Defer));
        assert_eq!(Cursor::new(b"[1,]").lenient_str(), Err(Defer));
        assert_eq!(Cursor::new(b"7").lenient_array(|c| c.skip()), Ok(false));
    }
}
