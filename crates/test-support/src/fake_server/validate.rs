//! FastAPI/pydantic-shaped errors and request parsing.
//!
//! The fake deliberately does **not** reuse `nestor-core`'s error types: it stands in for the
//! real server in tests of nestor, so sharing code with the system under test would let one
//! bug hide on both sides. Texts here were captured from a running agent-server 1.58.2.
//!
//! FastAPI's order of checks is reproduced because clients can observe it:
//! 1. route match (404 / 405) — before auth;
//! 2. JSON decoding of a non-empty body (422 `json_invalid`) — before auth;
//! 3. the session-key dependency (401);
//! 4. path, query and body validation, all errors collected into one 422 list in that order.

// Handlers return early with a ready `Response`; boxing it would only add an allocation.
#![allow(clippy::result_large_err)]

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::{json, Map, Value};
use uuid::Uuid;

/// One 422 `detail` item: `{"type","loc","msg","input"[, "ctx"]}` in that key order.
pub(crate) fn item(
    kind: &str,
    loc: Vec<Value>,
    msg: impl Into<String>,
    input: Value,
    ctx: Option<Value>,
) -> Value {
    let mut m = Map::new();
    m.insert("type".into(), Value::String(kind.into()));
    m.insert("loc".into(), Value::Array(loc));
    m.insert("msg".into(), Value::String(msg.into()));
    m.insert("input".into(), input);
    if let Some(c) = ctx {
        m.insert("ctx".into(), c);
    }
    Value::Object(m)
}

pub(crate) fn missing(loc: Vec<Value>, input: Value) -> Value {
    item("missing", loc, "Field required", input, None)
}

pub(crate) fn uuid_error(loc: Vec<Value>, input: &str, err: &str) -> Value {
    item(
        "uuid_parsing",
        loc,
        format!("Input should be a valid UUID, {err}"),
        Value::String(input.into()),
        Some(json!({ "error": err })),
    )
}

/// Parse a UUID the way pydantic-core does (it uses the `uuid` crate, so the messages match).
pub(crate) fn parse_uuid(s: &str) -> Result<Uuid, String> {
    Uuid::parse_str(s).map_err(|e| e.to_string())
}

/// Validate a UUID path parameter, collecting the error.
pub(crate) fn path_uuid(s: &str, name: &str, errors: &mut Vec<Value>) -> Option<Uuid> {
    match parse_uuid(s) {
        Ok(u) => Some(u),
        Err(e) => {
            errors.push(uuid_error(vec![json!("path"), json!(name)], s, &e));
            None
        }
    }
}

/// pydantic's "'A', 'B' or 'C'".
pub(crate) fn quote_choices(choices: &[&str]) -> String {
    let q: Vec<String> = choices.iter().map(|c| format!("'{c}'")).collect();
    match q.len() {
        0 => String::new(),
        1 => q[0].clone(),
        n => format!("{} or {}", q[..n - 1].join(", "), q[n - 1]),
    }
}

pub(crate) fn enum_error(loc: Vec<Value>, input: &str, choices: &[&str]) -> Value {
    let expected = quote_choices(choices);
    item(
        "enum",
        loc,
        format!("Input should be {expected}"),
        json!(input),
        Some(json!({ "expected": expected })),
    )
}

pub(crate) fn literal_error(loc: Vec<Value>, input: Value, choices: &[&str]) -> Value {
    let expected = quote_choices(choices);
    item(
        "literal_error",
        loc,
        format!("Input should be {expected}"),
        input,
        Some(json!({ "expected": expected })),
    )
}

/// The query string as ordered pairs.
pub(crate) struct Query(Vec<(String, String)>);

impl Query {
    pub fn parse(raw: Option<&str>) -> Self {
        Query(
            raw.map(|r| {
                form_urlencoded::parse(r.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default(),
        )
    }
    /// All pairs, in order.
    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }
    /// Starlette's `query_params[name]`: the last occurrence wins.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// An integer query parameter with pydantic's int parsing and `gt`/`le` bounds.
pub(crate) fn query_int(
    q: &Query,
    name: &str,
    default: i64,
    gt: Option<i64>,
    le: Option<i64>,
    errors: &mut Vec<Value>,
) -> i64 {
    let Some(raw) = q.get(name) else {
        return default;
    };
    let loc = vec![json!("query"), json!(name)];
    let Some(v) = parse_py_int(raw) else {
        errors.push(item(
            "int_parsing",
            loc,
            "Input should be a valid integer, unable to parse string as an integer",
            json!(raw),
            None,
        ));
        return default;
    };
    if let Some(g) = gt {
        if v <= g {
            errors.push(item(
                "greater_than",
                loc,
                format!("Input should be greater than {g}"),
                json!(raw),
                Some(json!({ "gt": g })),
            ));
            return default;
        }
    }
    if let Some(l) = le {
        if v > l {
            errors.push(item(
                "less_than_equal",
                loc,
                format!("Input should be less than or equal to {l}"),
                json!(raw),
                Some(json!({ "le": l })),
            ));
            return default;
        }
    }
    v
}

pub(crate) fn parse_py_int(raw: &str) -> Option<i64> {
    let t = raw.trim();
    let t = t.strip_prefix('+').unwrap_or(t);
    if t.is_empty() {
        return None;
    }
    let cleaned: String = t.chars().filter(|c| *c != '_').collect();
    if cleaned.starts_with('_') || t.ends_with('_') || t.contains("__") {
        return None;
    }
    cleaned.parse::<i64>().ok()
}

/// pydantic's lax boolean parsing of strings.
pub(crate) fn parse_py_bool(raw: &str) -> Option<bool> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "1" | "on" | "t" | "true" | "y" | "yes" => Some(true),
        "0" | "off" | "f" | "false" | "n" | "no" => Some(false),
        _ => None,
    }
}

pub(crate) fn query_bool(q: &Query, name: &str, default: bool, errors: &mut Vec<Value>) -> bool {
    let Some(raw) = q.get(name) else {
        return default;
    };
    match parse_py_bool(raw) {
        Some(b) => b,
        None => {
            errors.push(item(
                "bool_parsing",
                vec![json!("query"), json!(name)],
                "Input should be a valid boolean, unable to interpret input",
                json!(raw),
                None,
            ));
            default
        }
    }
}

/// A boolean inside a JSON body (pydantic lax mode: bools, 0/1, and the usual strings).
pub(crate) fn body_bool(v: &Value, loc: Vec<Value>, errors: &mut Vec<Value>) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) if n.as_i64() == Some(0) || n.as_i64() == Some(1) => n.as_i64() == Some(1),
        Value::String(s) => match parse_py_bool(s) {
            Some(b) => b,
            None => {
                errors.push(item(
                    "bool_parsing",
                    loc,
                    "Input should be a valid boolean, unable to interpret input",
                    v.clone(),
                    None,
                ));
                false
            }
        },
        _ => {
            errors.push(item(
                "bool_type",
                loc,
                "Input should be a valid boolean",
                v.clone(),
                None,
            ));
            false
        }
    }
}

/// pydantic's `sanitize_dict`: values of secret-looking keys become `"<redacted>"` in 422
/// `input`s (the real server never echoes an API key back in a validation error).
pub(crate) fn redact(v: &Value) -> Value {
    const PATTERNS: [&str; 8] = [
        "AUTHORIZATION",
        "COOKIE",
        "CREDENTIAL",
        "KEY",
        "PASSWORD",
        "SECRET",
        "SESSION",
        "TOKEN",
    ];
    fn all(v: &Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), all(v))).collect()),
            Value::Array(a) => Value::Array(a.iter().map(all).collect()),
            _ => json!("<redacted>"),
        }
    }
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let lower = k.to_ascii_lowercase();
                    let upper = k.to_ascii_uppercase();
                    let nv = if matches!(lower.as_str(), "environment" | "env" | "headers") {
                        all(v)
                    } else if PATTERNS.iter().any(|p| upper.contains(p)) {
                        json!("<redacted>")
                    } else {
                        redact(v)
                    };
                    (k.clone(), nv)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(redact).collect()),
        other => other.clone(),
    }
}

/// Python's `json.loads` error for a body serde_json refused: `(char position, message)`.
/// Messages are mapped from serde's categories, positions from its line/column; close to,
/// but not always identical with, CPython's.
pub(crate) fn python_json_error(body: &[u8], e: &serde_json::Error) -> (usize, &'static str) {
    let text = e.to_string();
    let msg = if text.contains("key must be a string") {
        "Expecting property name enclosed in double quotes"
    } else if text.contains("trailing characters") {
        "Extra data"
    } else if text.contains("expected `:`") {
        "Expecting ':' delimiter"
    } else if text.contains("expected `,` or `}`") || text.contains("expected `,` or `]`") {
        "Expecting ',' delimiter"
    } else if text.contains("control character") {
        "Invalid control character at"
    } else if text.contains("escape") {
        "Invalid \\escape"
    } else {
        "Expecting value"
    };
    let s = String::from_utf8_lossy(body);
    let (line, col) = (e.line().max(1), e.column());
    let mut pos = 0usize;
    for (i, l) in s.split('\n').enumerate() {
        if i + 1 == line {
            pos += col.saturating_sub(1).min(l.chars().count());
            break;
        }
        pos += l.chars().count() + 1;
    }
    if e.is_eof() {
        pos = s.chars().count();
    }
    if text.contains("expected ident") {
        // serde read into `true`/`false`/`null`; Python reports where the value started.
        let chars: Vec<char> = s.chars().collect();
        while pos > 0 && chars.get(pos - 1).is_some_and(char::is_ascii_alphabetic) {
            pos -= 1;
        }
    }
    (pos, msg)
}

/// A parsed JSON body, or the 422 FastAPI answers *before* authentication.
pub(crate) enum BodyJson {
    Empty,
    Value(Value),
}

pub(crate) fn parse_body(bytes: &[u8]) -> Result<BodyJson, Response> {
    if bytes.is_empty() {
        return Ok(BodyJson::Empty);
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v) => Ok(BodyJson::Value(v)),
        Err(e) => {
            let (pos, msg) = python_json_error(bytes, &e);
            Err(validation(vec![item(
                "json_invalid",
                vec![json!("body"), json!(pos)],
                "JSON decode error",
                json!({}),
                Some(json!({ "error": msg })),
            )]))
        }
    }
}

pub(crate) fn json_bytes(status: StatusCode, body: Vec<u8>) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub(crate) fn json_response(status: StatusCode, v: &Value) -> Response {
    json_bytes(status, serde_json::to_vec(v).unwrap_or_default())
}

pub(crate) fn detail(status: StatusCode, text: &str) -> Response {
    json_response(status, &json!({ "detail": text }))
}

pub(crate) fn validation(items: Vec<Value>) -> Response {
    json_response(
        StatusCode::UNPROCESSABLE_ENTITY,
        &json!({ "detail": items }),
    )
}

pub(crate) fn unauthorized() -> Response {
    detail(StatusCode::UNAUTHORIZED, "Unauthorized")
}

pub(crate) fn not_found() -> Response {
    detail(StatusCode::NOT_FOUND, "Not Found")
}

pub(crate) fn success() -> Response {
    json_bytes(StatusCode::OK, br#"{"success":true}"#.to_vec())
}

/// An unhandled-exception 500, FastAPI style.
pub(crate) fn internal_error(exception: &str) -> Response {
    json_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        &json!({
            "detail": "Internal Server Error",
            "exception": exception,
            "error_id": Uuid::new_v4().simple().to_string(),
        }),
    )
}

/// Python `repr`-ish rendering used inside pydantic error texts on the sockets.
pub(crate) fn py_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("'{s}'"),
        Value::Array(a) => format!("[{}]", a.iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("'{k}': {}", py_repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub(crate) fn py_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "NoneType",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::String(_) => "str",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_errors_like_python() {
        let body = b"{bad";
        let e = serde_json::from_slice::<Value>(body).unwrap_err();
        assert_eq!(
            python_json_error(body, &e),
            (1, "Expecting property name enclosed in double quotes")
        );
    }

    #[test]
    fn redaction_matches_sanitize_dict() {
        let v = json!({"agent": {"llm": {"api_key": "x", "model": "m"}}, "headers": {"a": "b"}, "author": "me"});
        assert_eq!(
            redact(&v),
            json!({"agent": {"llm": {"api_key": "<redacted>", "model": "m"}}, "headers": {"a": "<redacted>"}, "author": "me"})
        );
    }

    #[test]
    fn uuid_messages_match_pydantic() {
        assert_eq!(
            parse_uuid("xyz").unwrap_err(),
            "invalid character: found `x` at 0"
        );
        assert_eq!(parse_uuid("abc").unwrap_err(), "invalid length: found 3");
        assert_eq!(parse_uuid("").unwrap_err(), "invalid length: found 0");
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn json_error_mapping_never_panics(s in ".{0,40}") {
            if let Err(e) = serde_json::from_slice::<Value>(s.as_bytes()) {
                let (pos, _) = python_json_error(s.as_bytes(), &e);
                prop_assert!(pos <= s.chars().count());
            }
        }
    }
}
