//! The stores and their rules: what each route does, independent of HTTP.
//!
//! Every method is synchronous (small files, `fsync`s): routes run them on the blocking pool.
//! Methods that change files take the user's write lock for the whole read-modify-write.

use std::path::{Path, PathBuf};

use http::StatusCode;
use serde_json::{json, Map, Value};

use crate::cipher::Cipher;
use crate::error::{Error, Result};
use crate::schema::{self, Expose, FieldError, Opts};
use crate::store::{self, Locks, Read};

pub const PERSISTED_SETTINGS_SCHEMA_VERSION: i64 = 6;
pub const MAX_PROFILES: usize = 50;
pub const MAX_AGENT_PROFILES: usize = 50;
pub const MAX_META_PROFILES: usize = 50;
pub const MAX_PROVIDER_CONNECTIONS: usize = 64;
pub const SEED_PROFILE_NAME: &str = "default";
pub const PROFILE_NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$";
pub const SECRET_NAME_ERROR: &str = "Invalid secret name format. Must start with a letter, contain only letters, numbers, and underscores, and be 1-64 characters long.";
const KEY_HINT: &str = "Settings file is corrupted or encrypted with a different key: restore that key as OH_SECRET_KEY or add it to OH_PREVIOUS_SECRET_KEYS";
const SECRETS_CORRUPT: &str = "Secrets file is corrupted or encrypted with a different key: restore that key as OH_SECRET_KEY or add it to OH_PREVIOUS_SECRET_KEYS";

/// `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`
pub fn valid_profile_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// `^[A-Za-z][A-Za-z0-9_]{0,63}$`
pub fn valid_secret_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty() && b.len() <= 64 && b[0].is_ascii_alphabetic() && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// `foo.json` addresses profile `foo`.
pub fn canonical(name: &str) -> &str {
    name.strip_suffix(".json").unwrap_or(name)
}

fn obj(v: &Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

/// RFC 7386 merge patch (agent settings): `null` deletes at any depth.
pub fn merge_patch(base: &Value, diff: &Value) -> Value {
    let mut out = obj(base);
    if let Some(d) = diff.as_object() {
        for (k, v) in d {
            if v.is_null() {
                out.remove(k);
            } else if let (Some(_), Some(b)) = (v.as_object(), out.get(k).filter(|b| b.is_object())) {
                let merged = merge_patch(b, v);
                out.insert(k.clone(), merged);
            } else {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(out)
}

/// The agent-server's `_deep_merge` (conversation and misc settings): nested maps merge, a
/// `null` *inside* a nested map deletes that entry, a top-level `null` is kept (and then
/// validated), lists and scalars are replaced.
pub fn deep_merge(base: &Value, overlay: &Value, unset_nulls: bool) -> Value {
    let mut out = obj(base);
    if let Some(o) = overlay.as_object() {
        for (k, v) in o {
            if v.is_null() && unset_nulls {
                out.remove(k);
            } else if let (Some(_), Some(b)) = (v.as_object(), out.get(k).filter(|b| b.is_object())) {
                let merged = deep_merge(b, v, true);
                out.insert(k.clone(), merged);
            } else {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    Value::Object(out)
}

/// The settings model of an `agent_kind` (`llm` is the old name of `openhands`).
fn agent_model(v: &Value) -> std::result::Result<(&'static Value, &'static str), FieldError> {
    match v.get("agent_kind").and_then(Value::as_str).unwrap_or("openhands") {
        "openhands" | "llm" => Ok((schema::model("OpenHandsAgentSettings"), "openhands")),
        "acp" => Ok((schema::model("ACPAgentSettings"), "acp")),
        other => Err(FieldError::new(
            "union_tag_invalid",
            &[],
            format!("Input tag '{other}' found using _agent_settings_discriminator() does not match any of the expected tags: 'openhands', 'llm', 'acp'"),
            v,
        )),
    }
}

/// Validate an agent-settings payload (either variant) into its canonical plaintext form.
pub fn validate_agent_settings(v: &Value, opts: Opts<'_>) -> std::result::Result<Value, Vec<FieldError>> {
    let (model, kind) = agent_model(v).map_err(|e| vec![e])?;
    let mut payload = obj(v);
    payload.insert("agent_kind".into(), json!(kind));
    payload.insert("schema_version".into(), json!(9));
    schema::validate(model, &Value::Object(payload), &[], opts)
}

fn agent_schema_of(agent: &Value) -> &'static Value {
    agent_model(agent).map(|(m, _)| m).unwrap_or_else(|_| schema::model("OpenHandsAgentSettings"))
}

fn keep_dump_keys(model: &Value, v: Value) -> Value {
    match (model.get("x-dump-keys").and_then(Value::as_array), v) {
        (Some(keys), Value::Object(m)) => {
            let keys: Vec<&str> = keys.iter().filter_map(Value::as_str).collect();
            Value::Object(m.into_iter().filter(|(k, _)| keys.contains(&k.as_str())).collect())
        }
        (_, v) => v,
    }
}

fn validate_conversation_settings(v: &Value) -> std::result::Result<Value, Vec<FieldError>> {
    let m = schema::model("ConversationSettings");
    schema::validate(m, v, &[], Opts::default()).map(|x| keep_dump_keys(m, x))
}

/// `X-Expose-Secrets` modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExposeMode {
    Redacted,
    Encrypted,
    Plaintext,
}

impl ExposeMode {
    /// Parse the header value like the agent-server (`true` is the legacy alias of `encrypted`).
    pub fn parse(h: Option<&str>) -> Result<Self> {
        let v = h.unwrap_or_default().trim().to_ascii_lowercase();
        match v.as_str() {
            "" => Ok(Self::Redacted),
            "true" | "encrypted" => Ok(Self::Encrypted),
            "plaintext" => Ok(Self::Plaintext),
            other => Err(Error::bad_request(format!(
                "Invalid X-Expose-Secrets header value: '{other}'. Valid values are: 'encrypted', 'plaintext'."
            ))),
        }
    }
}

/// Settings, secrets and profiles for every user, under one directory.
pub struct SettingsService {
    pub(crate) base: PathBuf,
    pub(crate) cipher: Option<Cipher>,
    pub(crate) locks: Locks,
}

enum Loaded {
    Missing,
    Bad,
    Undecryptable,
    Ok(Value),
}

impl SettingsService {
    pub(crate) fn dir(&self, user: &str) -> PathBuf {
        store::user_dir(&self.base, user)
    }

    fn opts(&self, strict: bool) -> Opts<'_> {
        Opts { cipher: self.cipher.as_ref(), strict_decrypt: strict }
    }

    fn expose(&self, mode: ExposeMode, root: &Value, v: &Value) -> Result<Value> {
        Ok(match mode {
            ExposeMode::Redacted => schema::serialize(root, v, Expose::Redact),
            ExposeMode::Plaintext => v.clone(),
            ExposeMode::Encrypted => match &self.cipher {
                Some(c) => schema::serialize(root, v, Expose::Encrypt(c)),
                None if schema::secret_leaves(root, v).is_empty() => v.clone(),
                None => {
                    return Err(Error::detail(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Encryption not available: OH_SECRET_KEY is not configured. Cannot return encrypted secrets.",
                    ))
                }
            },
        })
    }

    /// Serialize for disk: secrets as tokens; without a key, refuse to write any secret.
    fn at_rest(&self, root: &Value, v: &Value) -> Result<Value> {
        match &self.cipher {
            Some(c) => Ok(schema::serialize(root, v, Expose::Encrypt(c))),
            None if schema::secret_leaves(root, v).is_empty() => Ok(v.clone()),
            None => Err(Error::no_key()),
        }
    }

    // ── settings ──────────────────────────────────────────────────────────

    pub fn default_settings(&self) -> Value {
        let agent = validate_agent_settings(&json!({}), Opts::default()).expect("default agent settings");
        let conv = validate_conversation_settings(&json!({})).expect("default conversation settings");
        json!({
            "schema_version": PERSISTED_SETTINGS_SCHEMA_VERSION,
            "agent_settings": agent,
            "conversation_settings": conv,
            "active_profile": null,
            "active_agent_profile_id": null,
            "active_meta_profile": null,
            "misc_settings": {},
        })
    }

    fn parse_settings(&self, data: &Value, strict: bool) -> Loaded {
        let Some(m) = data.as_object() else { return Loaded::Bad };
        let version = m.get("schema_version").cloned().unwrap_or(json!(0));
        match version.as_i64() {
            Some(v) if v <= PERSISTED_SETTINGS_SCHEMA_VERSION && !version.is_f64() => {}
            _ => return Loaded::Bad,
        }
        let mut out = self.default_settings();
        let agent_in = m.get("agent_settings").cloned().unwrap_or(json!({}));
        let model = agent_schema_of(&agent_in);
        let mut agent_payload = obj(&agent_in);
        if agent_payload.get("agent_kind").and_then(Value::as_str) == Some("llm") {
            agent_payload.insert("agent_kind".into(), json!("openhands"));
        }
        match schema::validate_stored(model, &Value::Object(agent_payload), self.opts(strict)) {
            Err(_) => return Loaded::Undecryptable,
            Ok(Err(_)) => return Loaded::Bad,
            Ok(Ok(a)) => out["agent_settings"] = a,
        }
        if let Some(c) = m.get("conversation_settings") {
            match validate_conversation_settings(c) {
                Ok(c) => out["conversation_settings"] = c,
                Err(_) => return Loaded::Bad,
            }
        }
        for k in ["active_profile", "active_agent_profile_id", "active_meta_profile"] {
            if let Some(v) = m.get(k) {
                if !(v.is_null() || v.is_string()) {
                    return Loaded::Bad;
                }
                out[k] = v.clone();
            }
        }
        if let Some(misc) = m.get("misc_settings") {
            if !misc.is_object() {
                return Loaded::Bad;
            }
            out["misc_settings"] = misc.clone();
        }
        Loaded::Ok(out)
    }

    fn load_settings_raw(&self, user: &str, strict: bool) -> Result<Loaded> {
        match store::read_json(&self.dir(user).join("settings.json")).map_err(Error::io)? {
            Read::Missing => Ok(Loaded::Missing),
            Read::Corrupt(e) => {
                tracing::error!(user, error = %e, "settings file is corrupted");
                Ok(Loaded::Bad)
            }
            Read::Json(v) => Ok(self.parse_settings(&v, strict)),
        }
    }

    /// Current settings (plaintext, in memory). An unreadable file reads as defaults, like
    /// the agent-server; writes refuse to overwrite it ([`Self::update_settings_with`]).
    pub fn load_settings(&self, user: &str) -> Result<Value> {
        Ok(match self.load_settings_raw(user, false)? {
            Loaded::Ok(v) => v,
            _ => self.default_settings(),
        })
    }

    fn save_settings(&self, user: &str, s: &Value) -> Result<()> {
        let mut out = s.clone();
        out["agent_settings"] = self.at_rest(agent_schema_of(&s["agent_settings"]), &s["agent_settings"])?;
        store::write_json(&self.dir(user).join("settings.json"), &out).map_err(Error::io)
    }

    /// Read-modify-write of the settings file under the user's lock. `conflict` is the
    /// answer when the stored file cannot be read (corrupt / other key): never overwritten.
    pub(crate) fn update_settings_with<T>(
        &self,
        user: &str,
        conflict: Error,
        f: impl FnOnce(&mut Value) -> Result<T>,
    ) -> Result<(Value, T)> {
        let _g = self.locks.lock(&self.dir(user)).map_err(Error::io)?;
        self.update_settings_locked(user, conflict, f)
    }

    fn update_settings_locked<T>(&self, user: &str, conflict: Error, f: impl FnOnce(&mut Value) -> Result<T>) -> Result<(Value, T)> {
        let mut s = match self.load_settings_raw(user, true)? {
            Loaded::Ok(v) => v,
            Loaded::Missing => self.default_settings(),
            Loaded::Bad | Loaded::Undecryptable => return Err(conflict),
        };
        let t = f(&mut s)?;
        self.save_settings(user, &s)?;
        Ok((s, t))
    }

    /// `SettingsResponse` for `s` with secrets shown per `mode`.
    pub fn settings_response(&self, s: &Value, mode: ExposeMode) -> Result<Value> {
        let agent = &s["agent_settings"];
        let exposed = self.expose(mode, agent_schema_of(agent), agent)?;
        Ok(json!({
            "agent_settings": exposed,
            "conversation_settings": s["conversation_settings"],
            "llm_api_key_is_set": llm_api_key_is_set(s),
            "active_profile": s["active_profile"],
            "active_agent_profile_id": s["active_agent_profile_id"],
            "active_meta_profile": s["active_meta_profile"],
            "misc_settings": s["misc_settings"],
        }))
    }

    /// `PATCH /api/settings` after request validation. `payload` holds only the keys the
    /// client sent (pointers may be `null` = clear).
    pub fn patch_settings(&self, user: &str, payload: Map<String, Value>) -> Result<Value> {
        let mut update = Map::new();
        for k in ["agent_settings_diff", "conversation_settings_diff", "misc_settings_diff"] {
            if let Some(v) = payload.get(k).filter(|v| !v.is_null()) {
                update.insert(k.into(), v.clone());
            }
        }
        for k in ["active_profile", "active_agent_profile_id", "active_meta_profile"] {
            if let Some(v) = payload.get(k) {
                update.insert(k.into(), v.clone());
            }
        }
        if update.is_empty() {
            return Err(Error::bad_request("At least one of agent_settings_diff, conversation_settings_diff, misc_settings_diff, active_profile, active_agent_profile_id, or active_meta_profile must be provided"));
        }
        if let Some(id) = update.get("active_agent_profile_id").and_then(Value::as_str) {
            if self.agent_profile_name_for_id(user, id).is_none() {
                return Err(Error::not_found(format!("Agent profile with id '{id}' not found")));
            }
        }
        if let Some(name) = update.get("active_meta_profile").and_then(Value::as_str) {
            if !valid_profile_name(canonical(name)) || !self.meta_path(user, name).exists() {
                return Err(Error::not_found(format!("Meta-profile '{name}' not found")));
            }
        }
        self.apply_settings_update(user, Value::Object(update), |_| Ok(())).map(|(s, _)| s)
    }

    /// `_apply_settings_update`: fold the active profile's LLM in, merge, validate, save.
    pub(crate) fn apply_settings_update(
        &self,
        user: &str,
        update: Value,
        before: impl FnOnce(&Value) -> Result<()>,
    ) -> Result<(Value, ())> {
        let profile_llm = match update.get("active_profile").and_then(Value::as_str) {
            Some(name) if update.get("agent_settings_diff").and_then(|d| d.get("llm")).is_none() => {
                Some(self.load_llm_profile(user, name, true).map_err(|e| match e {
                    ProfileLoadError::NotFound => Error::not_found(format!("Profile '{name}' not found")),
                    ProfileLoadError::Other(e) => e,
                })?)
            }
            _ => None,
        };
        let conflict = Error::conflict(KEY_HINT);
        self.update_settings_with(user, conflict, |s| {
            before(s)?;
            let mut update = update;
            if let Some(llm) = profile_llm {
                let mut diff = update.get("agent_settings_diff").cloned().filter(Value::is_object).unwrap_or(json!({}));
                let kind = diff.get("agent_kind").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| s["agent_settings"]["agent_kind"].as_str().unwrap_or("openhands").to_owned());
                if kind != "acp" {
                    diff["llm"] = llm;
                    update["agent_settings_diff"] = diff;
                }
            }
            apply_update(s, &update, self.opts(false)).map_err(|_| Error::unprocessable("Settings validation failed"))
        })
    }
}

/// `PersistedSettings.update`: validate every part first, then apply them together.
pub(crate) fn apply_update(s: &mut Value, update: &Value, opts: Opts<'_>) -> std::result::Result<(), Vec<FieldError>> {
    let mut new_agent = None;
    if let Some(diff) = update.get("agent_settings_diff").filter(|d| d.is_object()) {
        let base = &s["agent_settings"];
        let base_kind = base["agent_kind"].as_str().unwrap_or("openhands");
        let merged = match diff.get("agent_kind").and_then(Value::as_str) {
            Some(k) if !k.is_empty() && k != base_kind => merge_patch(&json!({"agent_kind": k}), diff),
            _ => merge_patch(base, diff),
        };
        new_agent = Some(validate_agent_settings(&merged, opts)?);
    }
    let mut new_conv = None;
    if let Some(diff) = update.get("conversation_settings_diff").filter(|d| d.is_object()) {
        let merged = deep_merge(&s["conversation_settings"], diff, false);
        new_conv = Some(validate_conversation_settings(&merged)?);
    }
    let new_misc = update.get("misc_settings_diff").filter(|d| d.is_object()).map(|d| deep_merge(&s["misc_settings"], d, false));
    if let Some(a) = new_agent {
        s["agent_settings"] = a;
    }
    if let Some(c) = new_conv {
        s["conversation_settings"] = c;
    }
    if let Some(m) = new_misc {
        s["misc_settings"] = m;
    }
    for k in ["active_profile", "active_agent_profile_id"] {
        if let Some(v) = update.get(k) {
            s[k] = v.clone();
        }
    }
    let routes = |s: &Value| s["agent_settings"]["agent_kind"].as_str() == Some("openhands");
    if let Some(v) = update.get("active_meta_profile") {
        if routes(s) {
            s["active_meta_profile"] = v.clone();
            s["agent_settings"]["active_meta_profile"] = v.clone();
            s["agent_settings"]["enable_classify_and_switch_llm_tool"] = json!(!v.is_null());
        } else {
            s["active_meta_profile"] = Value::Null;
        }
    }
    if !routes(s) && !s["active_meta_profile"].is_null() {
        s["active_meta_profile"] = Value::Null;
    }
    Ok(())
}

/// `llm_api_key_is_set`: an OpenHands agent whose LLM has a non-blank key.
pub fn llm_api_key_is_set(s: &Value) -> bool {
    let a = &s["agent_settings"];
    a["agent_kind"].as_str() == Some("openhands") && a["llm"]["api_key"].as_str().is_some_and(|k| !k.trim().is_empty())
}

pub(crate) enum ProfileLoadError {
    NotFound,
    Other(Error),
}

impl SettingsService {
    // ── secrets ───────────────────────────────────────────────────────────

    fn secrets_path(&self, user: &str) -> PathBuf {
        self.dir(user).join("secrets.json")
    }

    /// `(name, plaintext or None, description)` in stored order; `Err` when unreadable.
    fn read_secrets(&self, user: &str, strict: bool) -> std::result::Result<Option<(Vec<(String, Option<String>, Value)>, Value)>, ()> {
        let data = match store::read_json(&self.secrets_path(user)) {
            Ok(Read::Missing) => return Ok(None),
            Ok(Read::Json(v)) => v,
            _ => return Err(()),
        };
        let mut out = Vec::new();
        let Some(map) = data.get("custom_secrets").and_then(Value::as_object) else {
            return if data.is_object() { Ok(Some((out, data))) } else { Err(()) };
        };
        for (name, entry) in map {
            let (raw, desc) = match entry {
                Value::String(s) => (Some(s.clone()), Value::Null),
                Value::Object(o) => (o.get("secret").and_then(Value::as_str).map(str::to_owned), o.get("description").cloned().unwrap_or(Value::Null)),
                _ => continue,
            };
            let value = match raw {
                Some(r) if crate::cipher::looks_encrypted(&r) => match self.cipher.as_ref().and_then(|c| c.decrypt(&r)) {
                    Some(p) => Some(p),
                    None if strict => return Err(()),
                    None => None,
                },
                Some(r) if r.trim().is_empty() || r == schema::REDACTED => None,
                other => other,
            };
            out.push((name.clone(), value, desc));
        }
        Ok(Some((out, data)))
    }

    fn write_secrets(&self, user: &str, items: &[(String, Option<String>, Value)], previous: &Value) -> Result<()> {
        let mut map = Map::new();
        for (name, value, desc) in items {
            let secret = match (value, &self.cipher) {
                (None, _) => Value::Null,
                (Some(v), Some(c)) => json!(c.encrypt(v)),
                (Some(_), None) => return Err(Error::no_key()),
            };
            map.insert(name.clone(), json!({"name": name, "secret": secret, "description": desc}));
        }
        let mut data = json!({ "custom_secrets": map });
        // Credential-binding generations are kept (and dropped with their secret).
        if let Some(v) = previous.get("_credential_versions").and_then(Value::as_object) {
            let kept: Map<String, Value> = v.iter().filter(|(k, _)| items.iter().any(|(n, val, _)| n == *k && val.is_some())).map(|(k, v)| (k.clone(), v.clone())).collect();
            if !kept.is_empty() {
                data["_credential_versions"] = Value::Object(kept);
            }
        }
        store::write_json(&self.secrets_path(user), &data).map_err(Error::io)
    }

    /// Names and descriptions, optionally limited to an agent profile's `secret_refs`.
    pub fn list_secrets(&self, user: &str, agent_profile_id: Option<&str>) -> Result<Value> {
        let allowed: Option<Vec<String>> = match agent_profile_id {
            None => None,
            Some(id) => {
                let name = self.agent_profile_name_for_id(user, id).ok_or_else(|| Error::not_found("Agent profile not found"))?;
                let p = self.load_agent_profile(user, &name)?;
                p.get("secret_refs").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
            }
        };
        let items = self.read_secrets(user, false).ok().flatten().map(|(i, _)| i).unwrap_or_default();
        let list: Vec<Value> = items
            .into_iter()
            .filter(|(n, _, _)| allowed.as_ref().is_none_or(|a| a.contains(n)))
            .map(|(n, _, d)| json!({"name": n, "description": d}))
            .collect();
        Ok(json!({ "secrets": list }))
    }

    /// A secret's plaintext (the `LookupSecret` target). `None`: no such secret.
    pub fn secret_value(&self, user: &str, name: &str) -> Option<String> {
        let (items, _) = self.read_secrets(user, false).ok().flatten()?;
        items.into_iter().find(|(n, _, _)| n == name).and_then(|(_, v, _)| v)
    }

    /// Upsert (name and value already validated by the route).
    pub fn set_secret(&self, user: &str, name: &str, value: &str, description: Option<&str>) -> Result<()> {
        let _g = self.locks.lock(&self.dir(user)).map_err(Error::io)?;
        let (mut items, prev) = match self.read_secrets(user, true) {
            Ok(Some(x)) => x,
            Ok(None) => (Vec::new(), json!({})),
            Err(()) => return Err(Error::internal(SECRETS_CORRUPT)),
        };
        let desc = description.map(|d| json!(d)).unwrap_or(Value::Null);
        match items.iter_mut().find(|(n, _, _)| n == name) {
            Some(e) => {
                e.1 = Some(value.to_owned());
                e.2 = desc;
            }
            None => items.push((name.to_owned(), Some(value.to_owned()), desc)),
        }
        self.write_secrets(user, &items, &prev)
    }

    /// `true` when it existed.
    pub fn delete_secret(&self, user: &str, name: &str) -> Result<bool> {
        let _g = self.locks.lock(&self.dir(user)).map_err(Error::io)?;
        let (mut items, prev) = match self.read_secrets(user, true) {
            Ok(Some(x)) => x,
            Ok(None) => return Ok(false),
            Err(()) => return Err(Error::internal(SECRETS_CORRUPT)),
        };
        let before = items.len();
        items.retain(|(n, _, _)| n != name);
        if items.len() == before {
            return Ok(false);
        }
        self.write_secrets(user, &items, &prev)?;
        Ok(true)
    }

    // ── LLM profiles ──────────────────────────────────────────────────────

    fn profile_path(&self, user: &str, name: &str) -> PathBuf {
        self.dir(user).join("profiles").join(format!("{}.json", canonical(name)))
    }

    pub(crate) fn load_llm_profile(&self, user: &str, name: &str, resolve_provider: bool) -> std::result::Result<Value, ProfileLoadError> {
        let data = match store::read_json(&self.profile_path(user, name)) {
            Ok(Read::Missing) => return Err(ProfileLoadError::NotFound),
            Ok(Read::Json(v)) => v,
            Ok(Read::Corrupt(e)) => return Err(ProfileLoadError::Other(Error::bad_request(format!("Failed to load profile `{name}`: {e}")))),
            Err(e) => return Err(ProfileLoadError::Other(Error::io(e))),
        };
        let llm = schema::validate(schema::model("LLM"), &data, &[], self.opts(false))
            .map_err(|_| ProfileLoadError::Other(Error::bad_request(format!("Failed to load profile `{name}`: invalid LLM configuration"))))?;
        if resolve_provider {
            return self.resolve_provider_connection(user, Some(name), llm).map_err(ProfileLoadError::Other);
        }
        Ok(llm)
    }

    /// Apply a linked provider connection's key and base URL (read at use).
    pub(crate) fn resolve_provider_connection(&self, user: &str, profile: Option<&str>, mut llm: Value) -> Result<Value> {
        let Some(id) = llm.get("provider_connection_id").and_then(Value::as_str).map(str::to_owned) else { return Ok(llm) };
        match self.provider_connection(user, &id)? {
            Some(c) => {
                llm["base_url"] = c["base_url"].clone();
                if let Some(k) = c["api_key"].as_str().filter(|k| !k.trim().is_empty()) {
                    llm["api_key"] = json!(k);
                }
                Ok(llm)
            }
            None if llm["api_key"].as_str().is_some_and(|k| !k.trim().is_empty() && k != schema::REDACTED) => Ok(llm),
            None => {
                let owner = profile.map(|p| format!("Profile '{p}'")).unwrap_or_else(|| "LLM config".into());
                Err(Error::unprocessable(format!(
                    "{owner} references provider connection '{id}', which does not exist. Update the profile or recreate the connection."
                )))
            }
        }
    }

    /// Save an (already validated, plaintext) LLM as profile `name`.
    pub fn save_llm_profile(&self, user: &str, name: &str, mut llm: Value, include_secrets: bool) -> Result<()> {
        let _g = self.locks.lock(&self.dir(user)).map_err(Error::io)?;
        let path = self.profile_path(user, name);
        if !path.exists() && store::list_named(&self.dir(user).join("profiles")).len() >= MAX_PROFILES {
            return Err(Error::conflict(format!("Profile limit reached ({MAX_PROFILES}). Delete a profile before saving a new one.")));
        }
        if llm.get("provider_connection_id").and_then(Value::as_str).is_some_and(|s| !s.is_empty()) {
            llm["api_key"] = Value::Null;
            llm["base_url"] = Value::Null;
        }
        let m = schema::model("LLM");
        if !include_secrets {
            llm = strip_secrets(m, &llm);
        }
        let disk = self.at_rest(m, &llm)?;
        store::write_json(&path, &disk).map_err(Error::io)
    }

    pub fn llm_profile_summaries(&self, user: &str) -> Vec<Value> {
        let conns = self.provider_connections_raw(user).unwrap_or_default();
        store::list_named(&self.dir(user).join("profiles"))
            .into_iter()
            .filter_map(|(name, path)| {
                let Ok(Read::Json(data)) = store::read_json(&path) else { return None };
                data.as_object()?;
                let mut api_key_set = data["api_key"].as_str().is_some_and(|k| !k.trim().is_empty() && k != schema::REDACTED);
                let cid = data.get("provider_connection_id").cloned().unwrap_or(Value::Null);
                let mut broken = false;
                if let Some(id) = cid.as_str() {
                    match conns.iter().find(|c| c["id"].as_str() == Some(id)) {
                        None => broken = true,
                        Some(c) if !api_key_set => api_key_set = c["api_key"].as_str().is_some_and(|k| !k.trim().is_empty()),
                        _ => {}
                    }
                }
                Some(json!({
                    "name": name,
                    "model": data.get("model").cloned().unwrap_or(Value::Null),
                    "base_url": data.get("base_url").cloned().unwrap_or(Value::Null),
                    "provider_connection_id": cid,
                    "provider_connection_broken": broken,
                    "api_key_set": api_key_set,
                }))
            })
            .collect()
    }

    /// Effective key presence: the profile's own key, or its provider connection's.
    pub(crate) fn profile_api_key_set(&self, user: &str, llm: &Value) -> Result<bool> {
        if llm["api_key"].as_str().is_some_and(|k| !k.trim().is_empty()) {
            return Ok(true);
        }
        let Some(id) = llm["provider_connection_id"].as_str() else { return Ok(false) };
        Ok(self.provider_connection(user, id)?.is_some_and(|c| c["api_key"].as_str().is_some_and(|k| !k.trim().is_empty())))
    }

    pub(crate) fn llm_expose(&self, llm: &Value, mode: ExposeMode) -> Result<Value> {
        self.expose(mode, schema::model("LLM"), llm)
    }

    /// Repoint `active_profile` when it names `old` (rename / delete).
    fn repoint_active_profile(&self, user: &str, old: &str, new: Option<&str>) -> Result<()> {
        let s = self.load_settings(user)?;
        match s["active_profile"].as_str() {
            Some(a) if canonical(a) == canonical(old) => {}
            _ => return Ok(()),
        }
        self.update_settings_locked(user, Error::conflict(KEY_HINT), |s| {
            s["active_profile"] = new.map(|n| json!(canonical(n))).unwrap_or(Value::Null);
            Ok(())
        })?;
        Ok(())
    }

    pub fn delete_llm_profile(&self, user: &str, name: &str) -> Result<()> {
        let _g = self.locks.lock(&self.dir(user)).map_err(Error::io)?;
        let referrers = self.llm_profile_referrers(user, name);
        if !referrers.is_empty() {
            return Err(Error::conflict(format!(
                "LLM profile is referenced by {} agent profile(s): {}",
                referrers.len(),
                referrers.join(", ")
            )));
        }
        let p = self.profile_path(user, name);
        if p.exists() {
            std::fs::remove_file(&p).map_err(Error::io)?;
            fsync_dir(p.parent());
        }
        self.repoint_active_profile(user, name, None)
    }

    pub fn rename_llm_profile(&self, user: &str, old: &str, new: &str) -> Result<()> {
        let _g = self.locks.lock(&self.dir(user)).map_err(Error::io)?;
        let (op, np) = (self.profile_path(user, old), self.profile_path(user, new));
        if !op.exists() {
            return Err(Error::not_found(format!("Profile '{old}' not found")));
        }
        if op == np {
            return Ok(());
        }
        if np.exists() {
            return Err(Error::conflict(format!("Profile '{new}' already exists")));
        }
        std::fs::rename(&op, &np).map_err(Error::io)?;
        fsync_dir(np.parent());
        for n in self.llm_profile_referrers(user, old) {
            let path = self.agent_profile_path(user, &n);
            if let Ok(Read::Json(mut d)) = store::read_json(&path) {
                d["llm_profile_ref"] = json!(canonical(new));
                store::write_json(&path, &d).map_err(Error::io)?;
            }
        }
        if old != new {
            self.repoint_active_profile(user, old, Some(new))?;
        }
        Ok(())
    }

    fn llm_profile_referrers(&self, user: &str, llm_name: &str) -> Vec<String> {
        self.agent_profile_summaries(user)
            .into_iter()
            .filter(|s| s["agent_kind"] == "openhands" && s["llm_profile_ref"].as_str().is_some_and(|r| canonical(r) == canonical(llm_name)))
            .filter_map(|s| s["name"].as_str().map(str::to_owned))
            .collect()
    }

    /// `POST /api/profiles/{name}/activate`: apply the LLM to the settings, remember the name.
    pub fn activate_llm_profile(&self, user: &str, name: &str) -> Result<bool> {
        let llm = self.load_llm_profile(user, name, true).map_err(|e| match e {
            ProfileLoadError::NotFound => Error::not_found(format!("Profile '{name}' not found")),
            ProfileLoadError::Other(e) => e,
        })?;
        let (_, applied) = self.update_settings_with(user, Error::conflict(KEY_HINT), |s| {
            let mut applied = false;
            if s["agent_settings"]["agent_kind"] == "openhands" {
                s["agent_settings"]["llm"] = llm;
                applied = true;
            }
            s["active_profile"] = json!(canonical(name));
            Ok(applied)
        })?;
        Ok(applied)
    }

    // ── provider connections ──────────────────────────────────────────────

    fn connections_path(&self, user: &str) -> PathBuf {
        self.dir(user).join("provider-connections").join("provider_connections.json")
    }

    /// Stored connections with `api_key` decrypted.
    pub(crate) fn provider_connections_raw(&self, user: &str) -> Result<Vec<Value>> {
        let data = match store::read_json(&self.connections_path(user)).map_err(Error::io)? {
            Read::Missing => return Ok(Vec::new()),
            Read::Corrupt(e) => return Err(Error::bad_request(format!("Provider connections file is unreadable: {e}"))),
            Read::Json(v) => v,
        };
        let list = data.get("connections").and_then(Value::as_array).cloned().unwrap_or_default();
        list.into_iter()
            .map(|mut c| {
                if let Some(k) = c["api_key"].as_str().map(str::to_owned) {
                    if crate::cipher::looks_encrypted(&k) {
                        match self.cipher.as_ref().and_then(|ci| ci.decrypt(&k)) {
                            Some(p) => c["api_key"] = json!(p),
                            None => {
                                return Err(Error::bad_request(
                                    "api_key is encrypted but cannot be decrypted with the current cipher. Verify that OH_SECRET_KEY matches the key used when this connection was saved.",
                                ))
                            }
                        }
                    }
                }
                Ok(c)
            })
            .collect()
    }

    pub(crate) fn provider_connection(&self, user: &str, id: &str) -> Result<Option<Value>> {
        Ok(self.provider_connections_raw(user)?.into_iter().find(|c| c["id"].as_str() == Some(id)))
    }

    pub(crate) fn write_provider_connections(&self, user: &str, list: &[Value]) -> Result<()> {
        let mut out = Vec::new();
        for c in list {
            let mut c = c.clone();
            if let Some(k) = c["api_key"].as_str() {
                c["api_key"] = match &self.cipher {
                    Some(ci) => json!(ci.encrypt(k)),
                    None => return Err(Error::no_key()),
                };
            }
            out.push(c);
        }
        store::write_json(&self.connections_path(user), &json!({"schema_version": 1, "connections": out})).map_err(Error::io)
    }

    // ── meta-profiles ─────────────────────────────────────────────────────

    pub(crate) fn meta_path(&self, user: &str, name: &str) -> PathBuf {
        self.dir(user).join("meta-profiles").join(format!("{}.json", canonical(name)))
    }

    pub(crate) fn load_meta_profile(&self, user: &str, name: &str) -> Result<Option<Value>> {
        match store::read_json(&self.meta_path(user, name)).map_err(Error::io)? {
            Read::Missing => Ok(None),
            Read::Corrupt(e) => Err(Error::bad_request(format!("Failed to load meta-profile `{name}`: {e}"))),
            Read::Json(v) => schema::validate(schema::model("MetaProfile"), &v, &[], Opts::default())
                .map(Some)
                .map_err(|_| Error::bad_request(format!("Failed to load meta-profile `{name}`: invalid meta-profile"))),
        }
    }

    // ── agent profiles ────────────────────────────────────────────────────

    pub(crate) fn agent_profile_path(&self, user: &str, name: &str) -> PathBuf {
        self.dir(user).join("agent-profiles").join(format!("{}.json", canonical(name)))
    }

    pub fn agent_profile_summaries(&self, user: &str) -> Vec<Value> {
        store::list_named(&self.dir(user).join("agent-profiles"))
            .into_iter()
            .filter_map(|(name, path)| {
                let Ok(Read::Json(d)) = store::read_json(&path) else { return None };
                d.as_object()?;
                let kind = d.get("agent_kind").and_then(Value::as_str).unwrap_or("openhands").to_owned();
                Some(json!({
                    "id": d.get("id").cloned().unwrap_or(Value::Null),
                    "name": name,
                    "agent_kind": kind,
                    "revision": d.get("revision").cloned().unwrap_or(Value::Null),
                    "llm_profile_ref": if kind == "openhands" { d.get("llm_profile_ref").cloned().unwrap_or(Value::Null) } else { Value::Null },
                    "mcp_server_refs": d.get("mcp_server_refs").cloned().unwrap_or(Value::Null),
                }))
            })
            .collect()
    }

    pub fn agent_profile_name_for_id(&self, user: &str, id: &str) -> Option<String> {
        self.agent_profile_summaries(user).into_iter().find(|s| s["id"].as_str() == Some(id)).and_then(|s| s["name"].as_str().map(str::to_owned))
    }

    /// A stored agent profile, validated. 404 when absent, 400 when unreadable.
    pub fn load_agent_profile(&self, user: &str, name: &str) -> Result<Value> {
        match store::read_json(&self.agent_profile_path(user, name)).map_err(Error::io)? {
            Read::Missing => Err(Error::not_found(format!("Agent profile '{name}' not found"))),
            Read::Corrupt(e) => Err(Error::bad_request(format!("Failed to load profile `{name}`: {e}"))),
            Read::Json(v) => validate_agent_profile(&v).map_err(|_| Error::bad_request(format!("Failed to load profile `{name}`: invalid profile"))),
        }
    }
}

/// Validate an agent profile payload (either variant). Errors are shaped like
/// `safe_validation_error_detail`: `loc` starts with the variant tag, no `input`.
pub fn validate_agent_profile(v: &Value) -> std::result::Result<Value, Vec<Value>> {
    let Some(m) = v.as_object() else {
        return Err(vec![json!({"loc": [], "type": "model_attributes_type", "msg": "Input should be a valid dictionary or object to extract fields from"})]);
    };
    let mut payload = m.clone();
    match payload.get("schema_version") {
        None | Some(Value::Null) => {
            payload.insert("schema_version".into(), json!(4));
        }
        Some(x) if x.as_i64().is_some_and(|n| (1..=4).contains(&n)) => {
            // v1-v3 only dropped retired fields; they are not in the v4 model anyway.
            payload.remove("skills");
            payload.remove("enable_sub_agents");
            payload.remove("enable_switch_llm_tool");
            payload.insert("schema_version".into(), json!(4));
        }
        Some(_) => return Err(vec![json!({"loc": [], "type": "value_error", "msg": "Value error, AgentProfile schema_version is not supported"})]),
    }
    let tag = payload.get("agent_kind").and_then(Value::as_str).unwrap_or("openhands").to_owned();
    let model = match tag.as_str() {
        "openhands" => schema::model("OpenHandsAgentProfile"),
        "acp" => schema::model("ACPAgentProfile"),
        other => {
            return Err(vec![json!({
                "loc": [],
                "type": "union_tag_invalid",
                "msg": format!("Input tag '{other}' found using _agent_profile_discriminator() does not match any of the expected tags: 'openhands', 'acp'"),
            })])
        }
    };
    schema::validate(model, &Value::Object(payload), &[json!(tag)], Opts::default())
        .map_err(|errs| errs.iter().map(|e| json!({"loc": e.loc, "type": e.kind, "msg": e.msg})).collect())
}

/// Every secret leaf set to `null` (a profile saved with `include_secrets: false`).
fn strip_secrets(root: &Value, v: &Value) -> Value {
    // Serialize to a marker, then map markers to null.
    let marked = schema::serialize(root, v, Expose::Redact);
    fn unmark(orig: &Value, marked: &Value) -> Value {
        match (orig, marked) {
            (Value::Object(o), Value::Object(m)) => Value::Object(o.iter().map(|(k, x)| (k.clone(), m.get(k).map(|y| unmark(x, y)).unwrap_or_else(|| x.clone()))).collect()),
            (Value::Array(o), Value::Array(m)) => Value::Array(o.iter().zip(m).map(|(x, y)| unmark(x, y)).collect()),
            (Value::String(a), Value::String(b)) if b == schema::REDACTED && a != schema::REDACTED => Value::Null,
            (x, _) => x.clone(),
        }
    }
    unmark(v, &marked)
}

/// Best effort ([`nestor_core::fs::sync_dir`]): the change itself already stands.
pub(crate) fn fsync_dir(dir: Option<&Path>) {
    if let Some(d) = dir {
        let _ = nestor_core::fs::sync_dir(d);
    }
}
