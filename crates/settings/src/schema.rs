//! Validation of the agent-server's pydantic models, driven by their JSON schemas.
//!
//! **Why schemas**: agent settings, LLM configs, MCP servers and profiles are large pydantic
//! models (hundreds of fields, unions, bounds). Re-typing them in Rust would drift with every
//! agent-server release. Instead `tools/gen_model_schemas.py` exports their *validation*
//! schemas from the installed agent-server once (`assets/models.json`, with factory defaults
//! filled in), and this module interprets the subset pydantic emits: `$ref`, `type`,
//! `anyOf`/`oneOf` (+ `discriminator`), `const`/`enum`, `properties`/`required`/`default`,
//! `additionalProperties`, `items`, numeric bounds, string lengths and `pattern`. It applies
//! pydantic's lax coercions ("77" → 77, 12 → 12.0, "true" → true), fills defaults, drops
//! unknown keys (or rejects them where the model forbids extras), and reports errors in
//! pydantic's shape (`type`, `loc`, `msg`, `input`, `ctx`).
//!
//! Secret leaves are the schema nodes pydantic marks `format: password` (`SecretStr`). While
//! validating input they follow `validate_secret`: blank or `**********` becomes `null`, a
//! Fernet token is decrypted with the server key. [`serialize`] walks the same schema to
//! redact, encrypt or expose them on the way out.
//!
//! Known gaps against pydantic (documented, not hidden): model validators written in Python
//! (migrations of old settings files, "retired tool switch" rejections) are not replayed, and
//! union errors report only the first branch's errors.

use std::sync::OnceLock;

use regex::Regex;
use serde_json::{json, Map, Value};

use crate::cipher::{looks_encrypted, Cipher};

pub const REDACTED: &str = "**********";

static MODELS: OnceLock<Value> = OnceLock::new();

/// The schema of one exported model (`OpenHandsAgentSettings`, `LLM`, `MCPServer`, …).
pub fn model(name: &str) -> &'static Value {
    let all = MODELS.get_or_init(|| serde_json::from_str(include_str!("../assets/models.json")).expect("models.json"));
    all.get(name).unwrap_or_else(|| panic!("no schema for {name}"))
}

/// One validation error, pydantic style.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub kind: String,
    pub loc: Vec<Value>,
    pub msg: String,
    pub input: Value,
    pub ctx: Option<Value>,
}

impl FieldError {
    pub fn new(kind: &str, loc: &[Value], msg: impl Into<String>, input: &Value) -> Self {
        Self { kind: kind.into(), loc: loc.to_vec(), msg: msg.into(), input: input.clone(), ctx: None }
    }
    pub fn with_ctx(mut self, ctx: Value) -> Self {
        self.ctx = Some(ctx);
        self
    }
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), json!(self.kind));
        m.insert("loc".into(), Value::Array(self.loc.clone()));
        m.insert("msg".into(), json!(self.msg));
        m.insert("input".into(), self.input.clone());
        if let Some(c) = &self.ctx {
            m.insert("ctx".into(), c.clone());
        }
        Value::Object(m)
    }
}

/// How secret leaves are treated while validating.
#[derive(Clone, Copy, Default)]
pub struct Opts<'a> {
    /// Decrypts Fernet tokens found in secret leaves.
    pub cipher: Option<&'a Cipher>,
    /// A token no key decrypts is an error (read-modify-write of stored data) instead of `null`.
    pub strict_decrypt: bool,
}

/// A secret that could not be decrypted with any configured key (strict mode).
#[derive(Debug)]
pub struct Undecryptable;

struct Ctx<'a> {
    root: &'a Value,
    opts: Opts<'a>,
    errors: Vec<FieldError>,
    undecryptable: bool,
}

/// Validate `value` against model `root` (whose `$defs` resolve refs), with `loc` prefixed
/// to error locations. Returns the normalised value (defaults filled, coerced) or the errors.
pub fn validate(root: &Value, value: &Value, loc: &[Value], opts: Opts<'_>) -> Result<Value, Vec<FieldError>> {
    let mut cx = Ctx { root, opts, errors: Vec::new(), undecryptable: false };
    let mut l = loc.to_vec();
    let out = validate_node(&mut cx, root, value, &mut l);
    if cx.undecryptable {
        return Err(vec![FieldError::new("undecryptable", loc, "A stored secret cannot be decrypted with any configured key", &Value::Null)]);
    }
    match out {
        Some(v) if cx.errors.is_empty() => Ok(v),
        _ => Err(cx.errors),
    }
}

/// Like [`validate`] but tells an undecryptable stored secret apart from invalid data.
pub fn validate_stored(root: &Value, value: &Value, opts: Opts<'_>) -> Result<Result<Value, Vec<FieldError>>, Undecryptable> {
    let mut cx = Ctx { root, opts, errors: Vec::new(), undecryptable: false };
    let out = validate_node(&mut cx, root, value, &mut Vec::new());
    if cx.undecryptable {
        return Err(Undecryptable);
    }
    Ok(match out {
        Some(v) if cx.errors.is_empty() => Ok(v),
        _ => Err(cx.errors),
    })
}

fn resolve<'a>(root: &'a Value, schema: &'a Value) -> &'a Value {
    let mut s = schema;
    for _ in 0..16 {
        match s.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let name = r.rsplit('/').next().unwrap_or_default();
                s = match root.get("$defs").and_then(|d| d.get(name)) {
                    Some(d) => d,
                    None => return s,
                };
            }
            None => return s,
        }
    }
    s
}

pub(crate) fn is_secret(schema: &Value) -> bool {
    schema.get("format").and_then(Value::as_str) == Some("password") || schema.get("writeOnly") == Some(&Value::Bool(true))
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Whether a (resolved) branch could take `v` without coercion.
fn exact_match(root: &Value, schema: &Value, v: &Value) -> bool {
    let s = resolve(root, schema);
    if let Some(c) = s.get("const") {
        return c == v;
    }
    match s.get("type").and_then(Value::as_str) {
        Some("integer") => json_type(v) == "integer",
        Some("number") => matches!(json_type(v), "integer" | "number"),
        Some(t) => t == json_type(v),
        None => {
            if s.get("properties").is_some() {
                v.is_object()
            } else if let Some(bs) = s.get("anyOf").or_else(|| s.get("oneOf")).and_then(Value::as_array) {
                bs.iter().any(|b| exact_match(root, b, v))
            } else {
                true
            }
        }
    }
}

/// `str | SecretStr` unions: a string is the secret.
fn secret_branch<'a>(root: &Value, branches: &'a [Value], v: &Value) -> Option<&'a Value> {
    if !v.is_string() {
        return None;
    }
    branches.iter().find(|b| is_secret(resolve(root, b)))
}

fn validate_node(cx: &mut Ctx<'_>, schema: &Value, v: &Value, loc: &mut Vec<Value>) -> Option<Value> {
    let s = resolve(cx.root, schema);
    if let Some(all) = s.get("allOf").and_then(Value::as_array) {
        if all.len() == 1 {
            return validate_node(cx, &all[0], v, loc);
        }
    }
    if let Some(branches) = s.get("oneOf").or_else(|| s.get("anyOf")).and_then(Value::as_array) {
        return validate_union(cx, s, branches, v, loc);
    }
    if is_secret(s) {
        return validate_secret(cx, s, v, loc);
    }
    if let Some(c) = s.get("const") {
        return validate_literal(cx, std::slice::from_ref(c), v, loc);
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        return validate_literal(cx, e, v, loc);
    }
    let ty = s.get("type").and_then(Value::as_str);
    match ty {
        Some("object") | None if s.get("properties").is_some() => validate_model(cx, s, v, loc),
        Some("object") => validate_dict(cx, s, v, loc),
        Some("array") => validate_array(cx, s, v, loc),
        Some("string") => validate_string(cx, s, v, loc),
        Some("integer") => validate_int(cx, s, v, loc),
        Some("number") => validate_float(cx, s, v, loc),
        Some("boolean") => validate_bool(cx, v, loc),
        Some("null") => {
            if v.is_null() {
                Some(Value::Null)
            } else {
                cx.errors.push(FieldError::new("none_required", loc, "Input should be None", v));
                None
            }
        }
        _ => Some(v.clone()),
    }
}

fn validate_union(cx: &mut Ctx<'_>, s: &Value, branches: &[Value], v: &Value, loc: &mut Vec<Value>) -> Option<Value> {
    if let Some(d) = s.get("discriminator") {
        let prop = d.get("propertyName").and_then(Value::as_str).unwrap_or_default();
        let Some(obj) = v.as_object() else {
            cx.errors.push(FieldError::new("model_attributes_type", loc, "Input should be a valid dictionary or object to extract fields from", v));
            return None;
        };
        let mapping = d.get("mapping").and_then(Value::as_object);
        let tags: Vec<String> = mapping.map(|m| m.keys().map(|k| format!("'{k}'")).collect()).unwrap_or_default();
        let Some(tag) = obj.get(prop).and_then(Value::as_str) else {
            cx.errors.push(
                FieldError::new("union_tag_not_found", loc, format!("Unable to extract tag using discriminator '{prop}'"), v)
                    .with_ctx(json!({"discriminator": format!("'{prop}'")})),
            );
            return None;
        };
        let Some(target) = mapping.and_then(|m| m.get(tag)) else {
            cx.errors.push(
                FieldError::new(
                    "union_tag_invalid",
                    loc,
                    format!("Input tag '{tag}' found using '{prop}' does not match any of the expected tags: {}", tags.join(", ")),
                    v,
                )
                .with_ctx(json!({"discriminator": format!("'{prop}'"), "tag": tag, "expected_tags": tags.join(", ")})),
            );
            return None;
        };
        loc.push(json!(tag));
        let r = validate_node(cx, &json!({"$ref": target}), v, loc);
        loc.pop();
        return r;
    }
    // Null goes to a null branch when there is one.
    if v.is_null() && branches.iter().any(|b| resolve(cx.root, b).get("type").and_then(Value::as_str) == Some("null")) {
        return Some(Value::Null);
    }
    // Smart-mode approximation: branches that take the value as is first, then lax ones.
    let mut order: Vec<&Value> = secret_branch(cx.root, branches, v).into_iter().collect();
    order.extend(branches.iter().filter(|b| exact_match(cx.root, b, v)));
    order.extend(branches.iter().filter(|b| !exact_match(cx.root, b, v)));
    let mut first_errors: Option<Vec<FieldError>> = None;
    for b in order {
        if !v.is_null() && resolve(cx.root, b).get("type").and_then(Value::as_str) == Some("null") {
            continue;
        }
        let saved = std::mem::take(&mut cx.errors);
        let r = validate_node(cx, b, v, loc);
        let errs = std::mem::replace(&mut cx.errors, saved);
        if let (Some(out), true) = (r, errs.is_empty()) {
            return Some(out);
        }
        if first_errors.is_none() {
            first_errors = Some(errs);
        }
    }
    cx.errors.extend(first_errors.unwrap_or_default());
    None
}

fn validate_secret(cx: &mut Ctx<'_>, s: &Value, v: &Value, loc: &mut Vec<Value>) -> Option<Value> {
    let Some(raw) = v.as_str() else {
        if v.is_null() {
            return Some(Value::Null);
        }
        cx.errors.push(FieldError::new("string_type", loc, "Input should be a valid string", v));
        return None;
    };
    if raw.trim().is_empty() || raw == REDACTED {
        return Some(Value::Null);
    }
    if let (Some(c), true) = (cx.opts.cipher, looks_encrypted(raw)) {
        return match c.decrypt(raw) {
            Some(p) => Some(Value::String(p)),
            None => {
                if cx.opts.strict_decrypt {
                    cx.undecryptable = true;
                }
                Some(Value::Null)
            }
        };
    }
    let _ = s;
    Some(Value::String(raw.to_owned()))
}

fn quote(v: &Value) -> String {
    match v {
        Value::String(s) => format!("'{s}'"),
        other => other.to_string(),
    }
}

fn validate_literal(cx: &mut Ctx<'_>, choices: &[Value], v: &Value, loc: &mut Vec<Value>) -> Option<Value> {
    if choices.contains(v) {
        return Some(v.clone());
    }
    let q: Vec<String> = choices.iter().map(quote).collect();
    let expected = match q.len() {
        0 => String::new(),
        1 => q[0].clone(),
        n => format!("{} or {}", q[..n - 1].join(", "), q[n - 1]),
    };
    cx.errors.push(FieldError::new("literal_error", loc, format!("Input should be {expected}"), v).with_ctx(json!({"expected": expected})));
    None
}

fn fill_default(d: &Value) -> Value {
    match d {
        Value::String(s) if s == "__now__" => json!(now_iso()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), fill_default(v))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(fill_default).collect()),
        other => other.clone(),
    }
}

/// `datetime.now(timezone.utc)` as pydantic prints it: `2026-01-02T03:04:05.123456Z`.
pub fn now_iso() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.microsecond()
    )
}

fn validate_model(cx: &mut Ctx<'_>, s: &Value, v: &Value, loc: &mut Vec<Value>) -> Option<Value> {
    let Some(obj) = v.as_object() else {
        cx.errors.push(FieldError::new("model_attributes_type", loc, "Input should be a valid dictionary or object to extract fields from", v));
        return None;
    };
    let props = s.get("properties").and_then(Value::as_object).cloned().unwrap_or_default();
    let required: Vec<&str> = s.get("required").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
    let mut out = Map::new();
    let mut ok = true;
    for (name, ps) in &props {
        loc.push(json!(name));
        match obj.get(name) {
            Some(val) => match validate_node(cx, ps, val, loc) {
                Some(x) => {
                    out.insert(name.clone(), x);
                }
                None => ok = false,
            },
            None => {
                if let Some(d) = ps.get("default") {
                    out.insert(name.clone(), fill_default(d));
                } else if required.contains(&name.as_str()) {
                    cx.errors.push(FieldError::new("missing", loc, "Field required", v));
                    ok = false;
                }
            }
        }
        loc.pop();
    }
    match s.get("additionalProperties") {
        Some(Value::Bool(false)) => {
            for (k, val) in obj {
                if !props.contains_key(k) {
                    loc.push(json!(k));
                    cx.errors.push(FieldError::new("extra_forbidden", loc, "Extra inputs are not permitted", val));
                    loc.pop();
                    ok = false;
                }
            }
        }
        Some(extra @ Value::Object(_)) => {
            for (k, val) in obj {
                if !props.contains_key(k) {
                    loc.push(json!(k));
                    match validate_node(cx, extra, val, loc) {
                        Some(x) => {
                            out.insert(k.clone(), x);
                        }
                        None => ok = false,
                    }
                    loc.pop();
                }
            }
        }
        Some(Value::Bool(true)) => {
            for (k, val) in obj {
                if !props.contains_key(k) {
                    out.insert(k.clone(), val.clone());
                }
            }
        }
        _ => {}
    }
    if !ok {
        return None;
    }
    if let Some(keys) = s.get("x-dump-keys").and_then(Value::as_array) {
        // Fields excluded from dumps go; computed ones (serialized properties) come.
        let mut dumped = Map::new();
        for k in keys.iter().filter_map(Value::as_str) {
            if dumped.contains_key(k) {
                continue;
            }
            match out.remove(k) {
                Some(x) => {
                    dumped.insert(k.to_owned(), x);
                }
                None if k == "is_subscription" => {
                    let sub = dumped.get("auth_type").and_then(Value::as_str) == Some("subscription");
                    dumped.insert(k.to_owned(), json!(sub));
                }
                None => {}
            }
        }
        out = dumped;
    }
    if s.get("x-compact") == Some(&Value::Bool(true)) {
        out.retain(|_, x| !(x.is_null() || x.as_object().is_some_and(Map::is_empty)));
    }
    Some(Value::Object(out))
}

fn validate_dict(cx: &mut Ctx<'_>, s: &Value, v: &Value, loc: &mut Vec<Value>) -> Option<Value> {
    let Some(obj) = v.as_object() else {
        cx.errors.push(FieldError::new("dict_type", loc, "Input should be a valid dictionary", v));
        return None;
    };
    let item = s.get("additionalProperties").filter(|a| a.is_object());
    let Some(item) = item else { return Some(v.clone()) };
    // A map of bare secrets (MCP env/headers) drops entries that validate to None.
    let secret_map = is_secret(resolve(cx.root, item));
    let mut out = Map::new();
    let mut ok = true;
    for (k, val) in obj {
        loc.push(json!(k));
        match validate_node(cx, item, val, loc) {
            Some(Value::Null) if secret_map => {}
            Some(x) => {
                out.insert(k.clone(), x);
            }
            None => ok = false,
        }
        loc.pop();
    }
    ok.then_some(Value::Object(out))
}

fn validate_array(cx: &mut Ctx<'_>, s: &Value, v: &Value, loc: &mut Vec<Value>) -> Option<Value> {
    let Some(arr) = v.as_array() else {
        cx.errors.push(FieldError::new("list_type", loc, "Input should be a valid list", v));
        return None;
    };
    let mut out = Vec::with_capacity(arr.len());
    let mut ok = true;
    for (i, item) in arr.iter().enumerate() {
        loc.push(json!(i));
        match s.get("items") {
            Some(is) => match validate_node(cx, is, item, loc) {
                Some(x) => out.push(x),
                None => ok = false,
            },
            None => out.push(item.clone()),
        }
        loc.pop();
    }
    if let Some(min) = s.get("minItems").and_then(Value::as_u64) {
        if (out.len() as u64) < min && ok {
            cx.errors.push(
                FieldError::new("too_short", loc, format!("List should have at least {min} item{} after validation, not {}", if min == 1 { "" } else { "s" }, out.len()), v)
                    .with_ctx(json!({"field_type": "List", "min_length": min, "actual_length": out.len()})),
            );
            return None;
        }
    }
    ok.then_some(Value::Array(out))
}

fn regex_cached(p: &str) -> Option<Regex> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static CACHE: OnceLock<Mutex<HashMap<String, Option<Regex>>>> = OnceLock::new();
    let m = CACHE.get_or_init(Default::default);
    let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
    g.entry(p.to_owned()).or_insert_with(|| Regex::new(p).ok()).clone()
}

fn validate_string(cx: &mut Ctx<'_>, s: &Value, v: &Value, loc: &mut Vec<Value>) -> Option<Value> {
    let Some(st) = v.as_str() else {
        cx.errors.push(FieldError::new("string_type", loc, "Input should be a valid string", v));
        return None;
    };
    let n = st.chars().count() as u64;
    if let Some(min) = s.get("minLength").and_then(Value::as_u64) {
        if n < min {
            cx.errors.push(
                FieldError::new("string_too_short", loc, format!("String should have at least {min} character{}", if min == 1 { "" } else { "s" }), v)
                    .with_ctx(json!({"min_length": min})),
            );
            return None;
        }
    }
    if let Some(max) = s.get("maxLength").and_then(Value::as_u64) {
        if n > max {
            cx.errors.push(
                FieldError::new("string_too_long", loc, format!("String should have at most {max} character{}", if max == 1 { "" } else { "s" }), v)
                    .with_ctx(json!({"max_length": max})),
            );
            return None;
        }
    }
    if let Some(p) = s.get("pattern").and_then(Value::as_str) {
        if let Some(re) = regex_cached(p) {
            if !re.is_match(st) {
                cx.errors.push(FieldError::new("string_pattern_mismatch", loc, format!("String should match pattern '{p}'"), v).with_ctx(json!({"pattern": p})));
                return None;
            }
        }
    }
    if s.get("format").and_then(Value::as_str) == Some("uuid") {
        return match uuid::Uuid::parse_str(st) {
            Ok(u) => Some(json!(u.to_string())),
            Err(e) => {
                cx.errors.push(FieldError::new("uuid_parsing", loc, format!("Input should be a valid UUID, {e}"), v).with_ctx(json!({"error": e.to_string()})));
                None
            }
        };
    }
    Some(v.clone())
}

fn check_bounds(cx: &mut Ctx<'_>, s: &Value, x: f64, loc: &[Value], v: &Value) -> bool {
    let checks: [(&str, &str, &str, fn(f64, f64) -> bool); 4] = [
        ("minimum", "greater_than_equal", "ge", |x, b| x >= b),
        ("exclusiveMinimum", "greater_than", "gt", |x, b| x > b),
        ("maximum", "less_than_equal", "le", |x, b| x <= b),
        ("exclusiveMaximum", "less_than", "lt", |x, b| x < b),
    ];
    for (key, kind, ck, ok) in checks {
        if let Some(b) = s.get(key) {
            let bf = b.as_f64().unwrap_or(0.0);
            if !ok(x, bf) {
                let words = match kind {
                    "greater_than_equal" => "greater than or equal to",
                    "greater_than" => "greater than",
                    "less_than_equal" => "less than or equal to",
                    _ => "less than",
                };
                cx.errors.push(FieldError::new(kind, loc, format!("Input should be {words} {b}"), v).with_ctx(json!({ ck: b })));
                return false;
            }
        }
    }
    true
}

fn validate_int(cx: &mut Ctx<'_>, s: &Value, v: &Value, loc: &mut Vec<Value>) -> Option<Value> {
    let n: Option<i64> = match v {
        Value::Number(n) if n.is_i64() => n.as_i64(),
        Value::Number(n) if n.is_u64() => n.as_u64().map(|u| u as i64),
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() == 0.0 && f.is_finite() {
                Some(f as i64)
            } else {
                cx.errors.push(FieldError::new("int_from_float", loc, "Input should be a valid integer, got a number with a fractional part", v));
                return None;
            }
        }
        Value::Bool(b) => Some(i64::from(*b)),
        Value::String(st) => match st.trim().parse::<i64>() {
            Ok(i) => Some(i),
            Err(_) => {
                cx.errors.push(FieldError::new("int_parsing", loc, "Input should be a valid integer, unable to parse string as an integer", v));
                return None;
            }
        },
        _ => {
            cx.errors.push(FieldError::new("int_type", loc, "Input should be a valid integer", v));
            return None;
        }
    };
    let n = n?;
    check_bounds(cx, s, n as f64, loc, v).then(|| json!(n))
}

fn validate_float(cx: &mut Ctx<'_>, s: &Value, v: &Value, loc: &mut Vec<Value>) -> Option<Value> {
    let f = match v {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        Value::String(st) => match st.trim().parse::<f64>() {
            Ok(f) => Some(f),
            Err(_) => {
                cx.errors.push(FieldError::new("float_parsing", loc, "Input should be a valid number, unable to parse string as a number", v));
                return None;
            }
        },
        _ => {
            cx.errors.push(FieldError::new("float_type", loc, "Input should be a valid number", v));
            return None;
        }
    }?;
    if !check_bounds(cx, s, f, loc, v) {
        return None;
    }
    serde_json::Number::from_f64(f).map(Value::Number).or(Some(Value::Null))
}

fn validate_bool(cx: &mut Ctx<'_>, v: &Value, loc: &mut Vec<Value>) -> Option<Value> {
    match v {
        Value::Bool(b) => Some(json!(b)),
        Value::Number(n) if n.as_i64() == Some(0) || n.as_i64() == Some(1) => Some(json!(n.as_i64() == Some(1))),
        Value::String(st) => match st.to_ascii_lowercase().as_str() {
            "0" | "off" | "f" | "false" | "n" | "no" => Some(json!(false)),
            "1" | "on" | "t" | "true" | "y" | "yes" => Some(json!(true)),
            _ => {
                cx.errors.push(FieldError::new("bool_parsing", loc, "Input should be a valid boolean, unable to interpret input", v));
                None
            }
        },
        _ => {
            cx.errors.push(FieldError::new("bool_type", loc, "Input should be a valid boolean", v));
            None
        }
    }
}

/// How secret leaves leave the process.
#[derive(Clone, Copy)]
pub enum Expose<'a> {
    /// `**********` (pydantic's default JSON dump of a `SecretStr`).
    Redact,
    /// Fernet tokens under the current key (already-encrypted values are rotated, not re-wrapped).
    Encrypt(&'a Cipher),
    /// The raw value.
    Plain,
}

/// Transform every secret leaf of `value` (a validated instance of `root`).
pub fn serialize(root: &Value, value: &Value, mode: Expose<'_>) -> Value {
    ser_node(root, root, value, mode)
}

fn ser_node(root: &Value, schema: &Value, v: &Value, mode: Expose<'_>) -> Value {
    let s = resolve(root, schema);
    if let Some(all) = s.get("allOf").and_then(Value::as_array) {
        if all.len() == 1 {
            return ser_node(root, &all[0], v, mode);
        }
    }
    if let Some(branches) = s.get("oneOf").or_else(|| s.get("anyOf")).and_then(Value::as_array) {
        if v.is_null() {
            return Value::Null;
        }
        if let (Some(d), Some(obj)) = (s.get("discriminator"), v.as_object()) {
            let prop = d.get("propertyName").and_then(Value::as_str).unwrap_or_default();
            if let Some(target) = obj.get(prop).and_then(Value::as_str).and_then(|t| d.get("mapping").and_then(|m| m.get(t))) {
                return ser_node(root, &json!({"$ref": target}), v, mode);
            }
        }
        // The branch the value was validated into: a secret one for strings, else the first
        // whose shape takes it.
        let pick = secret_branch(root, branches, v).or_else(|| branches.iter().find(|b| exact_match(root, b, v) && branch_accepts(root, b, v)).or_else(|| branches.iter().find(|b| exact_match(root, b, v))));
        return match pick {
            Some(b) => ser_node(root, b, v, mode),
            None => v.clone(),
        };
    }
    if is_secret(s) {
        return match (v, mode) {
            (Value::String(_), Expose::Redact) => json!(REDACTED),
            (Value::String(p), Expose::Encrypt(c)) => {
                if looks_encrypted(p) && c.decrypt(p).is_some() {
                    json!(c.rotate(p).unwrap_or_else(|| p.clone()))
                } else {
                    json!(c.encrypt(p))
                }
            }
            _ => v.clone(),
        };
    }
    match v {
        Value::Object(obj) => {
            let props = s.get("properties").and_then(Value::as_object);
            let extra = s.get("additionalProperties").filter(|a| a.is_object());
            Value::Object(
                obj.iter()
                    .map(|(k, x)| {
                        let sub = props.and_then(|p| p.get(k)).or(extra);
                        (k.clone(), sub.map(|ss| ser_node(root, ss, x, mode)).unwrap_or_else(|| x.clone()))
                    })
                    .collect(),
            )
        }
        Value::Array(arr) => match s.get("items") {
            Some(is) => Value::Array(arr.iter().map(|x| ser_node(root, is, x, mode)).collect()),
            None => v.clone(),
        },
        _ => v.clone(),
    }
}

/// Whether a branch's validation accepts `v` (cheap check: validate without secrets handling).
fn branch_accepts(root: &Value, b: &Value, v: &Value) -> bool {
    let mut cx = Ctx { root, opts: Opts::default(), errors: Vec::new(), undecryptable: false };
    validate_node(&mut cx, b, v, &mut Vec::new()).is_some() && cx.errors.is_empty()
}

/// Every secret leaf value of `value` (for "does this hold a secret" and startup checks).
pub fn secret_leaves(root: &Value, value: &Value) -> Vec<String> {
    let mut out = Vec::new();
    collect(root, root, value, &mut out);
    out
}

fn collect(root: &Value, schema: &Value, v: &Value, out: &mut Vec<String>) {
    // Reuse the serializer walk: mark leaves by serializing in "plain" and diffing is costly;
    // walk directly instead.
    let s = resolve(root, schema);
    if let Some(branches) = s.get("oneOf").or_else(|| s.get("anyOf")).and_then(Value::as_array) {
        if v.is_null() {
            return;
        }
        if let (Some(d), Some(obj)) = (s.get("discriminator"), v.as_object()) {
            let prop = d.get("propertyName").and_then(Value::as_str).unwrap_or_default();
            if let Some(target) = obj.get(prop).and_then(Value::as_str).and_then(|t| d.get("mapping").and_then(|m| m.get(t))) {
                return collect(root, &json!({"$ref": target}), v, out);
            }
        }
        if let Some(b) = secret_branch(root, branches, v).or_else(|| branches.iter().find(|b| exact_match(root, b, v))) {
            collect(root, b, v, out);
        }
        return;
    }
    if is_secret(s) {
        if let Value::String(p) = v {
            out.push(p.clone());
        }
        return;
    }
    match v {
        Value::Object(obj) => {
            let props = s.get("properties").and_then(Value::as_object);
            let extra = s.get("additionalProperties").filter(|a| a.is_object());
            for (k, x) in obj {
                if let Some(sub) = props.and_then(|p| p.get(k)).or(extra) {
                    collect(root, sub, x, out);
                }
            }
        }
        Value::Array(arr) => {
            if let Some(is) = s.get("items") {
                for x in arr {
                    collect(root, is, x, out);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_defaults_and_coerces() {
        let m = model("ConversationSettings");
        let v = validate(m, &json!({"max_iterations": "77"}), &[], Opts::default()).unwrap();
        assert_eq!(v["max_iterations"], json!(77));
        assert_eq!(v["confirmation_mode"], json!(false));
        let e = validate(m, &json!({"max_iterations": "abc"}), &[json!("body")], Opts::default()).unwrap_err();
        assert_eq!(e[0].kind, "int_parsing");
        assert_eq!(e[0].loc, vec![json!("body"), json!("max_iterations")]);
    }

    #[test]
    fn secrets_are_found_redacted_and_dropped() {
        let m = model("MCPServer");
        let v = validate(m, &json!({"command": "npx", "env": {"A": "x", "B": "", "C": "**********"}}), &[], Opts::default()).unwrap();
        assert_eq!(v, json!({"command": "npx", "env": {"A": "x"}, "enabled": true}));
        assert_eq!(serialize(m, &v, Expose::Redact)["env"]["A"], json!(REDACTED));
        assert_eq!(secret_leaves(m, &v), vec!["x".to_string()]);
        let e = validate(m, &json!({"command": "x", "bogus": 1}), &[json!("body")], Opts::default()).unwrap_err();
        assert_eq!(e[0].to_json(), json!({"type": "extra_forbidden", "loc": ["body", "bogus"], "msg": "Extra inputs are not permitted", "input": 1}));
    }
}
