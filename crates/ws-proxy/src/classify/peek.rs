//! A fast read of a few top-level string fields of a JSON object.
//!
//! Every events-socket frame is peeked at for its `id`, `timestamp`, `kind` and `key`
//! ([`super::event_head`]). A full parse (serde_json, even skipping what it does not keep)
//! walks every byte of the frame through its grammar, and it was the largest user-space cost
//! per frame in the 1,000-pair benchmark. This scanner only finds where each top-level
//! value ends: strings are skipped with `memchr` (to the next quote or backslash), nested
//! values by counting brackets outside strings.
//!
//! It reads the plain case only and says so: a wanted value with an escape, a key with an
//! escape (it could spell a wanted name), a wanted key twice, a wanted value that is neither
//! a string nor `null`, or anything that does not look like an object ends the scan with
//! [`Peek::Unsure`], and the caller parses the frame with serde_json instead. What it
//! skips it does not validate (a malformed number inside a frame is not noticed); frames are
//! forwarded as they are either way, and the agent-server only sends valid JSON.

/// A wanted field as found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field<'a> {
    Absent,
    Null,
    Str(&'a str),
}

impl<'a> Field<'a> {
    /// The value if it is a string.
    pub fn as_str(self) -> Option<&'a str> {
        match self {
            Field::Str(s) => Some(s),
            Field::Absent | Field::Null => None,
        }
    }
}

/// The outcome of a peek.
#[derive(Debug, PartialEq, Eq)]
pub enum Peek<'a, const N: usize> {
    /// The wanted fields, in the order asked for.
    Found([Field<'a>; N]),
    /// Not the plain case: parse it properly.
    Unsure,
}

/// Find the top-level string fields `names` of the JSON object `text`.
pub fn fields<'a, const N: usize>(text: &'a str, names: [&str; N]) -> Peek<'a, N> {
    match scan(text, names) {
        Some(f) => Peek::Found(f),
        None => Peek::Unsure,
    }
}

fn scan<'a, const N: usize>(text: &'a str, names: [&str; N]) -> Option<[Field<'a>; N]> {
    let b = text.as_bytes();
    let mut out = [Field::Absent; N];
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        return (skip_ws(b, i + 1) == b.len()).then_some(out);
    }
    loop {
        // A key, without escapes.
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let (key, after) = plain_string(b, i)?;
        i = skip_ws(b, after);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        match names.iter().position(|n| n.as_bytes() == key) {
            Some(k) => {
                if out[k] != Field::Absent {
                    return None;
                }
                match b.get(i)? {
                    b'"' => {
                        let (v, after) = plain_string(b, i)?;
                        // In bounds and on char boundaries: the quotes are ASCII.
                        out[k] = Field::Str(std::str::from_utf8(v).ok()?);
                        i = after;
                    }
                    b'n' if b[i..].starts_with(b"null") => {
                        out[k] = Field::Null;
                        i += 4;
                    }
                    _ => return None,
                }
            }
            None => i = skip_value(b, i)?,
        }
        i = skip_ws(b, i);
        match b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            b'}' => return (skip_ws(b, i + 1) == b.len()).then_some(out),
            _ => return None,
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// The string starting at the quote `b[i]`, if it has no escape: its bytes and the index
/// after its closing quote.
fn plain_string(b: &[u8], i: usize) -> Option<(&[u8], usize)> {
    let start = i + 1;
    let end = start + memchr::memchr2(b'"', b'\\', &b[start..])?;
    (b[end] == b'"').then(|| (&b[start..end], end + 1))
}

/// The index after the string starting at the quote `b[i]` (escapes allowed).
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        j += memchr::memchr2(b'"', b'\\', b.get(j..)?)?;
        if b[j] == b'"' {
            return Some(j + 1);
        }
        j += 2;
    }
}

/// The index after the value starting at `b[i]`.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        // A number or a literal: up to the next delimiter.
        _ => {
            let n = b[i..].iter().position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')).unwrap_or(b.len() - i);
            (n > 0).then_some(i + n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    const NAMES: [&str; 4] = ["id", "timestamp", "kind", "key"];

    /// What serde_json reads for the same fields (None: not an object of string/null fields).
    fn by_serde(text: &str) -> Option<[Option<String>; 4]> {
        #[derive(serde::Deserialize)]
        struct Raw {
            id: Option<String>,
            timestamp: Option<String>,
            kind: Option<String>,
            key: Option<String>,
        }
        let r: Raw = serde_json::from_str(text).ok()?;
        Some([r.id, r.timestamp, r.kind, r.key])
    }

    fn as_options(f: [Field<'_>; 4]) -> [Option<String>; 4] {
        f.map(|f| match f {
            Field::Str(s) => Some(s.to_owned()),
            Field::Absent | Field::Null => None,
        })
    }

    #[test]
    fn reads_plain_events_and_defers_the_rest() {
        let t = r#" { "id" : "a", "n": -1.5e3, "v": {"id": "inner", "s": "x\"}y", "l": [1, {"k": []}]}, "timestamp": "t", "kind": null } "#;
        assert_eq!(fields(t, NAMES), Peek::Found([Field::Str("a"), Field::Str("t"), Field::Null, Field::Absent]));
        assert_eq!(fields("{}", NAMES), Peek::Found([Field::Absent; 4]));
        for unsure in [
            r#"{"id":"a\"b"}"#,
            r#"{"\u0069d":"x"}"#,
            r#"{"id":"a","id":"b"}"#,
            r#"{"id":7}"#,
            r#"{"id":"a"} x"#,
            r#"["id","a"]"#,
            r#"{"id":"a""#,
            r#"{"x":"#,
            "",
            "nul",
        ] {
            assert_eq!(fields(unsure, NAMES), Peek::Unsure, "{unsure}");
        }
    }

    #[test]
    fn reads_every_captured_frame_as_serde_does() {
        for f in ["events-socket-plain.json", "events-socket-streaming.json", "events-socket-resend-all-while-running.json"] {
            let path = format!("{}/../../tests/fixtures/frames/{f}", env!("CARGO_MANIFEST_DIR"));
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            let frames: Vec<Value> = serde_json::from_str(&text).unwrap();
            for fr in frames {
                for s in [fr["frame"].to_string(), serde_json::to_string_pretty(&fr["frame"]).unwrap()] {
                    match fields(&s, NAMES) {
                        Peek::Found(got) => assert_eq!(Some(as_options(got)), by_serde(&s), "{s}"),
                        Peek::Unsure => {}
                    }
                }
            }
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            (-1e6f64..1e6).prop_map(|f| json!(f)),
            "[a-z\"\\\\{}\\[\\]:, é\\n]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("(id|kind|key|timestamp|[a-z\"\\\\]{1,6})", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whenever the scanner answers, it answers what serde_json reads; on frames shaped
        /// like events (string fields, nothing escaped) it always answers.
        #[test]
        fn agrees_with_serde(v in json_value(), pretty in any::<bool>()) {
            let s = if pretty { serde_json::to_string_pretty(&v).unwrap() } else { v.to_string() };
            if let Peek::Found(got) = fields(&s, NAMES) {
                prop_assert_eq!(Some(as_options(got)), by_serde(&s), "{}", s);
            }
        }

        #[test]
        fn answers_for_plain_events(id in "[a-f0-9-]{1,36}", ts in "[0-9T:.-]{0,26}", pad in "[a-z \"\\\\{}]{0,200}", kind in "[A-Za-z]{1,30}") {
            let s = json!({"id": id, "timestamp": ts, "pad": pad, "nested": {"id": 1, "l": [pad.clone()]}, "kind": kind}).to_string();
            prop_assert_eq!(fields(&s, NAMES), Peek::Found([Field::Str(&id), Field::Str(&ts), Field::Str(&kind), Field::Absent]));
        }

        #[test]
        fn never_panics(t in "\\PC{0,64}") {
            let _ = fields(&t, NAMES);
        }
    }
}
