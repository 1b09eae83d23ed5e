//! Agent profiles, meta-profiles and provider connections (routes and their rules).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::routes::{blocking, body_object, check_profile_name, new_name_of, parse_body};
use crate::schema::{self, FieldError, Opts};
use crate::service::{canonical, validate_agent_profile, SettingsService, MAX_AGENT_PROFILES, MAX_META_PROFILES, MAX_PROVIDER_CONNECTIONS, SEED_PROFILE_NAME};
use crate::store::{self, Read};
use crate::SettingsUser;

type Svc = Arc<SettingsService>;

impl SettingsService {
    /// Keep `active_agent_profile_id` on a stored profile, seeding `default` from the
    /// settings when needed (the agent-server's `_ensure_active_profile`).
    pub fn ensure_active_agent_profile(&self, user: &str) -> Result<()> {
        let _g = self.locks.lock(&self.dir(user)).map_err(Error::io)?;
        let s = self.load_settings(user)?;
        if let Some(id) = s["active_agent_profile_id"].as_str() {
            if self.agent_profile_name_for_id(user, id).is_some() {
                return Ok(());
            }
        }
        let target = match store::read_json(&self.agent_profile_path(user, SEED_PROFILE_NAME)).map_err(Error::io)? {
            Read::Json(v) => v.get("id").and_then(Value::as_str).map(str::to_owned),
            Read::Corrupt(_) => None,
            Read::Missing => {
                if store::list_named(&self.dir(user).join("agent-profiles")).len() < MAX_AGENT_PROFILES {
                    Some(self.seed_default_profile(user, &s)?)
                } else {
                    None
                }
            }
        };
        let target = target.or_else(|| {
            self.agent_profile_summaries(user)
                .into_iter()
                .find(|p| p["id"].is_string() && p["name"] != SEED_PROFILE_NAME)
                .and_then(|p| p["id"].as_str().map(str::to_owned))
        });
        if let Some(id) = target {
            let conflict = Error::conflict("Settings file is corrupted or encrypted with a different key");
            self.update_settings_locked_pub(user, conflict, |s| {
                s["active_agent_profile_id"] = json!(id);
                Ok(())
            })?;
        }
        Ok(())
    }

    /// `build_seed_profile` + the `default` LLM profile backfill.
    fn seed_default_profile(&self, user: &str, s: &Value) -> Result<String> {
        let a = &s["agent_settings"];
        let mut active_llm = s["active_profile"].as_str().filter(|x| !x.is_empty()).map(str::to_owned);
        let profile = if a["agent_kind"] == "acp" {
            let cmd = a["acp_command"].as_array().map(|c| c.iter().filter_map(Value::as_str).map(shell_quote).collect::<Vec<_>>().join(" ")).filter(|c| !c.is_empty());
            let args = a["acp_args"].as_array().filter(|x| !x.is_empty()).cloned();
            json!({
                "agent_kind": "acp", "name": SEED_PROFILE_NAME,
                "acp_server": a["acp_server"], "acp_model": a["acp_model"], "acp_session_mode": a["acp_session_mode"],
                "acp_prompt_timeout": a["acp_prompt_timeout"], "acp_startup_timeout": a["acp_startup_timeout"],
                "acp_command": cmd, "acp_args": args, "mcp_server_refs": null,
            })
        } else {
            if active_llm.is_none() {
                self.seed_default_llm_profile(user, &a["llm"])?;
                active_llm = Some(SEED_PROFILE_NAME.into());
            }
            let mut verification = a["verification"].clone();
            verification.as_object_mut().map(|m| m.remove("critic_api_key"));
            json!({
                "name": SEED_PROFILE_NAME,
                "llm_profile_ref": active_llm,
                "agent": a["agent"], "tools": a["tools"],
                "disabled_skills": a["agent_context"]["disabled_skills"].as_array().cloned().unwrap_or_default(),
                "persona": a["persona"], "system_message_suffix": a["agent_context"]["system_message_suffix"],
                "condenser": a["condenser"], "verification": verification,
                "enable_classify_and_switch_llm_tool": a["enable_classify_and_switch_llm_tool"],
                "meta_profile_ref": a["active_meta_profile"],
                "tool_concurrency_limit": a["tool_concurrency_limit"],
                "mcp_server_refs": null,
            })
        };
        let mut p = validate_agent_profile(&profile).map_err(|e| Error::internal(format!("seed profile invalid: {}", json!(e))))?;
        let id = uuid::Uuid::new_v4().to_string();
        p["id"] = json!(id);
        store::write_json(&self.agent_profile_path(user, SEED_PROFILE_NAME), &p).map_err(Error::io)?;
        Ok(id)
    }

    fn seed_default_llm_profile(&self, user: &str, llm: &Value) -> Result<()> {
        let path = self.dir(user).join("profiles").join(format!("{SEED_PROFILE_NAME}.json"));
        if path.exists() {
            return Ok(());
        }
        let real = llm["api_key"].as_str().is_some_and(|k| !k.trim().is_empty())
            || llm["is_subscription"] == true
            || llm["auth_type"] == "subscription"
            || llm["base_url"].as_str().is_some_and(|b| !b.trim().is_empty());
        if !real || store::list_named(&self.dir(user).join("profiles")).len() >= crate::service::MAX_PROFILES {
            return Ok(());
        }
        let m = schema::model("LLM");
        let disk = match &self.cipher {
            Some(c) => schema::serialize(m, llm, schema::Expose::Encrypt(c)),
            None if schema::secret_leaves(m, llm).is_empty() => llm.clone(),
            None => return Ok(()),
        };
        store::write_json(&path, &disk).map_err(Error::io)
    }

    pub(crate) fn update_settings_locked_pub<T>(&self, user: &str, conflict: Error, f: impl FnOnce(&mut Value) -> Result<T>) -> Result<(Value, T)> {
        // The caller holds the user's lock.
        let mut s = self.load_settings(user)?;
        let path = self.dir(user).join("settings.json");
        if path.exists() {
            // Refuse to overwrite an unreadable file.
            if let Ok(Read::Corrupt(_)) = store::read_json(&path) {
                return Err(conflict);
            }
        }
        let t = f(&mut s)?;
        let mut out = s.clone();
        let agent = &s["agent_settings"];
        let model = if agent["agent_kind"] == "acp" { schema::model("ACPAgentSettings") } else { schema::model("OpenHandsAgentSettings") };
        out["agent_settings"] = match &self.cipher {
            Some(c) => schema::serialize(model, agent, schema::Expose::Encrypt(c)),
            None if schema::secret_leaves(model, agent).is_empty() => agent.clone(),
            None => return Err(Error::no_key()),
        };
        store::write_json(&path, &out).map_err(Error::io)?;
        Ok((s, t))
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"@%+=:,./-_".contains(&b)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\"'\"'"))
    }
}

// ── agent profiles ────────────────────────────────────────────────────────

pub(crate) async fn list_agent_profiles(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>) -> Result<Json<Value>> {
    blocking(move || {
        let u = user.0.as_str();
        svc.ensure_active_agent_profile(u)?;
        let s = svc.load_settings(u)?;
        Ok(Json(json!({"profiles": svc.agent_profile_summaries(u), "active_agent_profile_id": s["active_agent_profile_id"]})))
    })
    .await
}

pub(crate) async fn get_agent_profile(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(name): Path<String>) -> Result<Json<Value>> {
    check_profile_name(&name)?;
    blocking(move || {
        let p = svc.load_agent_profile(user.0.as_str(), &name)?;
        Ok(Json(json!({"name": name, "profile": p})))
    })
    .await
}

pub(crate) async fn save_agent_profile(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(name): Path<String>, body: Bytes) -> Result<Response> {
    check_profile_name(&name)?;
    let v = parse_body(&body, true)?.unwrap_or(Value::Null);
    let mut m = body_object(&v)?.clone();
    m.insert("name".into(), json!(canonical(&name)));
    let profile = validate_agent_profile(&Value::Object(m)).map_err(Error::validation_raw)?;
    let n = name.clone();
    blocking(move || {
        let u = user.0.as_str();
        let _g = svc.locks.lock(&svc.dir(u)).map_err(Error::io)?;
        let path = svc.agent_profile_path(u, &n);
        let existing = svc.agent_profile_summaries(u).into_iter().find(|s| s["name"] == canonical(&n));
        let mut profile = profile;
        match existing.as_ref().and_then(|e| e["id"].as_str().and_then(|i| uuid::Uuid::parse_str(i).ok()).map(|id| (id, e["revision"].as_i64().unwrap_or(0)))) {
            Some((id, rev)) => {
                profile["id"] = json!(id.to_string());
                profile["revision"] = json!(rev + 1);
            }
            None => {
                if !path.exists() && store::list_named(&svc.dir(u).join("agent-profiles")).len() >= MAX_AGENT_PROFILES {
                    return Err(Error::conflict(format!("Agent profile limit reached ({MAX_AGENT_PROFILES}). Delete a profile before saving a new one.")));
                }
                profile["id"] = json!(uuid::Uuid::new_v4().to_string());
            }
        }
        store::write_json(&path, &profile).map_err(Error::io)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(json!({"name": name, "message": format!("Agent profile '{name}' saved")}))).into_response())
}

pub(crate) async fn delete_agent_profile(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(name): Path<String>) -> Result<Json<Value>> {
    check_profile_name(&name)?;
    let n = name.clone();
    blocking(move || {
        let u = user.0.as_str();
        let deleted_id = {
            let _g = svc.locks.lock(&svc.dir(u)).map_err(Error::io)?;
            let id = svc.agent_profile_summaries(u).into_iter().find(|s| s["name"] == canonical(&n)).and_then(|s| s["id"].as_str().map(str::to_owned));
            let path = svc.agent_profile_path(u, &n);
            if path.exists() {
                std::fs::remove_file(&path).map_err(Error::io)?;
                crate::service::fsync_dir(path.parent());
            }
            if let Some(id) = &id {
                let s = svc.load_settings(u)?;
                if s["active_agent_profile_id"].as_str() == Some(id.as_str()) {
                    svc.update_settings_locked_pub(u, Error::conflict("Settings file is corrupted or encrypted with a different key"), |s| {
                        s["active_agent_profile_id"] = Value::Null;
                        if s["agent_settings"]["agent_kind"] != "openhands" {
                            let mcp = s["agent_settings"]["mcp_config"].clone();
                            s["agent_settings"] = crate::service::validate_agent_settings(&json!({"mcp_config": mcp}), Opts::default()).map_err(|_| Error::internal("reset failed"))?;
                        }
                        Ok(())
                    })?;
                }
            }
            id
        };
        if deleted_id.is_some() {
            svc.ensure_active_agent_profile(u)?;
        }
        Ok(())
    })
    .await?;
    Ok(Json(json!({"name": name, "message": format!("Agent profile '{name}' deleted")})))
}

pub(crate) async fn rename_agent_profile(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(name): Path<String>, body: Bytes) -> Result<Json<Value>> {
    check_profile_name(&name)?;
    let v = parse_body(&body, true)?.unwrap_or(Value::Null);
    let new_name = new_name_of(&v)?;
    let (o, n) = (name.clone(), new_name.clone());
    blocking(move || {
        let u = user.0.as_str();
        let _g = svc.locks.lock(&svc.dir(u)).map_err(Error::io)?;
        let (op, np) = (svc.agent_profile_path(u, &o), svc.agent_profile_path(u, &n));
        if !op.exists() {
            return Err(Error::not_found(format!("Agent profile '{o}' not found")));
        }
        if op == np {
            return Ok(());
        }
        if np.exists() {
            return Err(Error::conflict(format!("Agent profile '{n}' already exists")));
        }
        let Ok(Read::Json(mut d)) = store::read_json(&op) else { return Err(Error::bad_request(format!("Failed to load profile `{o}`"))) };
        d["name"] = json!(canonical(&n));
        store::write_json(&np, &d).map_err(Error::io)?;
        std::fs::remove_file(&op).map_err(Error::io)?;
        crate::service::fsync_dir(op.parent());
        Ok(())
    })
    .await?;
    let message = if name == new_name { format!("Agent profile '{name}' unchanged (same name)") } else { format!("Agent profile '{name}' renamed to '{new_name}'") };
    Ok(Json(json!({"name": new_name, "message": message})))
}

pub(crate) async fn activate_agent_profile(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(id): Path<String>) -> Result<Json<Value>> {
    if id.is_empty() || id.chars().count() > 128 {
        return Err(Error::validation(&[FieldError::new("string_too_long", &[json!("path"), json!("profile_id")], "String should have at most 128 characters", &json!(id))
            .with_ctx(json!({"max_length": 128}))]));
    }
    let i = id.clone();
    blocking(move || {
        let u = user.0.as_str();
        if svc.agent_profile_name_for_id(u, &i).is_none() {
            return Err(Error::not_found(format!("Agent profile with id '{i}' not found")));
        }
        svc.update_settings_with(u, Error::internal("Failed to activate agent profile"), |s| {
            s["active_agent_profile_id"] = json!(i);
            Ok(())
        })?;
        Ok(())
    })
    .await?;
    Ok(Json(json!({"id": id, "message": format!("Agent profile '{id}' activated"), "agent_settings_applied": false})))
}

pub(crate) async fn materialize_agent_profile(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(name): Path<String>, body: Bytes) -> Result<Json<Value>> {
    check_profile_name(&name)?;
    let draft = match parse_body(&body, false)? {
        None | Some(Value::Null) => None,
        Some(v) => {
            let m = body_object(&v)?;
            if let Some(k) = m.keys().find(|k| k.as_str() != "profile") {
                return Err(Error::validation(&[FieldError::new("extra_forbidden", &[json!("body"), json!(k)], "Extra inputs are not permitted", &m[k])]));
            }
            match m.get("profile") {
                None | Some(Value::Null) => None,
                Some(Value::Object(p)) => {
                    let mut p = p.clone();
                    p.insert("name".into(), json!(canonical(&name)));
                    Some(validate_agent_profile(&Value::Object(p)).map_err(Error::validation_raw)?)
                }
                Some(other) => return Err(Error::value_error(vec![json!("body"), json!("profile")], "profile must be an object", other)),
            }
        }
    };
    blocking(move || {
        let u = user.0.as_str();
        let profile = match draft {
            Some(p) => p,
            None => svc.load_agent_profile(u, &name)?,
        };
        Ok(Json(crate::resolve::diagnostics(&svc, u, &profile)?))
    })
    .await
}

// ── meta-profiles ─────────────────────────────────────────────────────────

pub(crate) async fn list_meta_profiles(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>) -> Result<Json<Value>> {
    blocking(move || {
        let u = user.0.as_str();
        let list: Vec<Value> = store::list_named(&svc.dir(u).join("meta-profiles"))
            .into_iter()
            .filter_map(|(name, path)| {
                let Ok(Read::Json(d)) = store::read_json(&path) else { return None };
                d.as_object()?;
                let n = d["classes"].as_array().map(Vec::len).unwrap_or(0);
                Some(json!({"name": name, "classifier_model": d.get("classifier_model").cloned().unwrap_or(Value::Null), "num_classes": n}))
            })
            .collect();
        let s = svc.load_settings(u)?;
        Ok(Json(json!({"meta_profiles": list, "active_meta_profile": s["active_meta_profile"]})))
    })
    .await
}

pub(crate) async fn get_meta_profile(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(name): Path<String>) -> Result<Json<Value>> {
    check_profile_name(&name)?;
    blocking(move || match svc.load_meta_profile(user.0.as_str(), &name)? {
        Some(c) => Ok(Json(json!({"name": name, "config": c}))),
        None => Err(Error::not_found(format!("Meta-profile '{name}' not found"))),
    })
    .await
}

/// `MetaProfile` + its model validator + the router's "routable" check.
pub fn validate_meta_profile(v: &Value) -> Result<Value> {
    let mp = schema::validate(schema::model("MetaProfile"), v, &[json!("body")], Opts::default()).map_err(|e| Error::validation(&e))?;
    let classes = mp["classes"].as_array().map(Vec::len).unwrap_or(0);
    if let Some(t) = mp["prompt_template"].as_str() {
        let re = regex::Regex::new(r"\{\{\s*instance_text\s*\}\}").expect("static regex");
        if !re.is_match(t) {
            return Err(Error::value_error(vec![json!("body")], "Direct-routing meta-profiles must include {{ instance_text }} in prompt_template.", v));
        }
        if classes > 0 {
            return Err(Error::value_error(vec![json!("body")], "Direct-routing meta-profiles cannot also define classes.", v));
        }
    } else if classes == 0 {
        return Err(Error::value_error(vec![json!("body")], "A meta-profile needs either classes or a prompt_template to route.", v));
    }
    Ok(mp)
}

pub(crate) async fn save_meta_profile(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(name): Path<String>, body: Bytes) -> Result<Response> {
    check_profile_name(&name)?;
    let v = parse_body(&body, true)?.unwrap_or(Value::Null);
    let mp = validate_meta_profile(&v)?;
    let n = name.clone();
    blocking(move || {
        let u = user.0.as_str();
        let _g = svc.locks.lock(&svc.dir(u)).map_err(Error::io)?;
        let path = svc.meta_path(u, &n);
        if !path.exists() && store::list_named(&svc.dir(u).join("meta-profiles")).len() >= MAX_META_PROFILES {
            return Err(Error::conflict(format!("Meta-profile limit reached ({MAX_META_PROFILES}). Delete a meta-profile before saving a new one.")));
        }
        store::write_json(&path, &mp).map_err(Error::io)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(json!({"name": name, "message": format!("Meta-profile '{name}' saved")}))).into_response())
}

pub(crate) async fn delete_meta_profile(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(name): Path<String>) -> Result<Json<Value>> {
    check_profile_name(&name)?;
    let n = name.clone();
    blocking(move || {
        let u = user.0.as_str();
        let _g = svc.locks.lock(&svc.dir(u)).map_err(Error::io)?;
        let path = svc.meta_path(u, &n);
        if path.exists() {
            std::fs::remove_file(&path).map_err(Error::io)?;
            crate::service::fsync_dir(path.parent());
        }
        let s = svc.load_settings(u)?;
        if s["active_meta_profile"].as_str() == Some(n.as_str()) {
            svc.update_settings_locked_pub(u, Error::conflict("Settings file is corrupted or encrypted with a different key"), |s| {
                crate::service::apply_update(s, &json!({"active_meta_profile": null, "agent_settings_diff": {"meta_profile": null}}), Opts::default())
                    .map_err(|_| Error::unprocessable("Settings validation failed"))
            })?;
        }
        Ok(())
    })
    .await?;
    Ok(Json(json!({"name": name, "message": format!("Meta-profile '{name}' deleted")})))
}

pub(crate) async fn activate_meta_profile(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(name): Path<String>) -> Result<Json<Value>> {
    check_profile_name(&name)?;
    let n = name.clone();
    let applied = blocking(move || {
        let u = user.0.as_str();
        let mp = svc.load_meta_profile(u, &n)?.ok_or_else(|| Error::not_found(format!("Meta-profile '{n}' not found")))?;
        let (s, _) = svc.update_settings_with(u, Error::conflict("Settings file is corrupted or encrypted with a different key"), |s| {
            crate::service::apply_update(s, &json!({"active_meta_profile": n, "agent_settings_diff": {"meta_profile": mp}}), Opts::default())
                .map_err(|_| Error::unprocessable("Settings validation failed"))
        })?;
        Ok(s["active_meta_profile"].as_str() == Some(n.as_str()))
    })
    .await?;
    Ok(Json(if applied {
        json!({"name": name, "message": format!("Meta-profile '{name}' activated"), "applied": true})
    } else {
        json!({"name": name, "message": format!("Meta-profile '{name}' not activated: the current agent settings cannot route between models"), "applied": false})
    }))
}

// ── provider connections ──────────────────────────────────────────────────

fn connection_response(c: &Value, key_set: Option<bool>) -> Value {
    let set = key_set.unwrap_or_else(|| c["api_key"].as_str().is_some_and(|k| !k.trim().is_empty()));
    json!({
        "id": c["id"], "display_name": c["display_name"], "provider": c["provider"],
        "base_url": c.get("base_url").cloned().unwrap_or(Value::Null),
        "created_at": c["created_at"], "updated_at": c["updated_at"], "api_key_set": set,
    })
}

fn now_secs() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Field checks of the create/update request models (`extra="forbid"`).
fn check_connection_body(m: &Map<String, Value>, create: bool) -> Result<()> {
    let mut errs = Vec::new();
    let input = Value::Object(m.clone());
    for k in m.keys() {
        if !matches!(k.as_str(), "display_name" | "provider" | "api_key" | "base_url") {
            errs.push(FieldError::new("extra_forbidden", &[json!("body"), json!(k)], "Extra inputs are not permitted", &m[k]));
        }
    }
    for (k, min, max, nullable) in [("display_name", 1, 128, !create), ("provider", 1, 128, true), ("base_url", 0, 2048, true), ("api_key", 1, usize::MAX, !create)] {
        let loc = [json!("body"), json!(k)];
        match m.get(k) {
            None if create && (k == "display_name" || k == "api_key") => errs.push(FieldError::new("missing", &loc, "Field required", &input)),
            None => {}
            Some(Value::Null) if nullable || (k == "provider" && !create) => {}
            Some(Value::String(s)) => {
                let n = s.chars().count();
                if n < min {
                    errs.push(FieldError::new("string_too_short", &loc, "String should have at least 1 character", &json!(s)).with_ctx(json!({"min_length": min})));
                } else if n > max {
                    errs.push(FieldError::new("string_too_long", &loc, format!("String should have at most {max} characters"), &json!(s)).with_ctx(json!({"max_length": max})));
                } else if k == "api_key" && (s.trim().is_empty() || s == schema::REDACTED) {
                    let msg = "api_key must be a real key, not blank or redacted";
                    errs.push(FieldError::new("value_error", &loc, format!("Value error, {msg}"), &json!(s)).with_ctx(json!({"error": msg})));
                }
            }
            Some(other) => errs.push(FieldError::new("string_type", &loc, "Input should be a valid string", other)),
        }
    }
    if !errs.is_empty() {
        return Err(Error::validation(&errs));
    }
    if !create {
        for f in ["display_name", "provider"] {
            if m.get(f) == Some(&Value::Null) {
                return Err(Error::value_error(vec![json!("body")], &format!("{f} cannot be set to null"), &input));
            }
        }
    }
    Ok(())
}

pub(crate) async fn list_connections(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>) -> Result<Json<Value>> {
    blocking(move || Ok(Json(Value::Array(svc.provider_connections_raw(user.0.as_str())?.iter().map(|c| connection_response(c, None)).collect())))).await
}

pub(crate) async fn create_connection(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, body: Bytes) -> Result<Response> {
    let v = parse_body(&body, true)?.unwrap_or(Value::Null);
    let m = body_object(&v)?.clone();
    check_connection_body(&m, true)?;
    let out = blocking(move || {
        let u = user.0.as_str();
        let _g = svc.locks.lock(&svc.dir(u)).map_err(Error::io)?;
        let mut list = svc.provider_connections_raw(u)?;
        if list.len() >= MAX_PROVIDER_CONNECTIONS {
            return Err(Error::conflict(format!("Provider connection limit reached ({MAX_PROVIDER_CONNECTIONS}). Delete one before adding another.")));
        }
        let now = now_secs();
        let c = json!({
            "id": uuid::Uuid::new_v4().simple().to_string(),
            "display_name": m["display_name"],
            "provider": m.get("provider").filter(|p| !p.is_null()).cloned().unwrap_or(json!("custom")),
            "api_key": m["api_key"],
            "base_url": m.get("base_url").cloned().unwrap_or(Value::Null),
            "created_at": now, "updated_at": now,
        });
        list.push(c.clone());
        svc.write_provider_connections(u, &list)?;
        Ok(connection_response(&c, None))
    })
    .await?;
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

pub(crate) async fn patch_connection(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(id): Path<String>, body: Bytes) -> Result<Json<Value>> {
    let v = parse_body(&body, true)?.unwrap_or(Value::Null);
    let m = body_object(&v)?.clone();
    check_connection_body(&m, false)?;
    if m.is_empty() {
        return Err(Error::unprocessable("Provide at least one provider connection field to update"));
    }
    blocking(move || {
        let u = user.0.as_str();
        let _g = svc.locks.lock(&svc.dir(u)).map_err(Error::io)?;
        let mut list = svc.provider_connections_raw(u)?;
        let Some(c) = list.iter_mut().find(|c| c["id"].as_str() == Some(id.as_str())) else {
            return Err(Error::not_found(format!("Provider connection '{id}' not found")));
        };
        if m.get("api_key") == Some(&Value::Null) {
            return Err(Error::unprocessable("api_key cannot be cleared; provide a new key to rotate it"));
        }
        for f in ["display_name", "provider", "base_url", "api_key"] {
            if let Some(x) = m.get(f) {
                c[f] = x.clone();
            }
        }
        c["updated_at"] = json!(now_secs());
        let out = connection_response(c, None);
        svc.write_provider_connections(u, &list)?;
        Ok(Json(out))
    })
    .await
}

pub(crate) async fn delete_connection(State(svc): State<Svc>, Extension(user): Extension<SettingsUser>, Path(id): Path<String>) -> Result<Json<Value>> {
    blocking(move || {
        let u = user.0.as_str();
        let _g = svc.locks.lock(&svc.dir(u)).map_err(Error::io)?;
        let mut list = svc.provider_connections_raw(u)?;
        let Some(c) = list.iter().find(|c| c["id"].as_str() == Some(id.as_str())).cloned() else {
            return Err(Error::not_found(format!("Provider connection '{id}' not found")));
        };
        let profiles: Vec<String> =
            svc.llm_profile_summaries(u).into_iter().filter(|s| s["provider_connection_id"].as_str() == Some(id.as_str())).filter_map(|s| s["name"].as_str().map(str::to_owned)).collect();
        let s = svc.load_settings(u)?;
        let active = s["agent_settings"]["agent_kind"] == "openhands" && s["agent_settings"]["llm"]["provider_connection_id"].as_str() == Some(id.as_str());
        if !profiles.is_empty() || active {
            let mut reasons = Vec::new();
            if !profiles.is_empty() {
                reasons.push(format!("referenced by LLM profile(s): {}", profiles.join(", ")));
            }
            if active {
                reasons.push("referenced by the active agent settings".to_owned());
            }
            return Err(Error::conflict(format!(
                "Provider connection cannot be deleted while it is {}. Update those references before deleting it.",
                reasons.join(" and ")
            )));
        }
        list.retain(|c| c["id"].as_str() != Some(id.as_str()));
        svc.write_provider_connections(u, &list)?;
        Ok(Json(connection_response(&c, Some(false))))
    })
    .await
}
