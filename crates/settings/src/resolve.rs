//! Turning a create body's agent source into something a downstream can run without
//! nestor's stores (the agent-server's `launch_source` + `resolve`, and what its docker
//! runtime does in `forward_to_runtime`).
//!
//! **Decision: resolve to `agent_settings`, not to a full `agent`.** A downstream accepts a
//! reference-free `agent_settings` dict in `POST /api/conversations` and builds the agent
//! itself (`finalize`: default tool set for *its* runtime, browser availability, skills it
//! discovers, `current_datetime`, ACP skill sourcing). That is exactly how the agent-server's
//! own docker runtime hands a resolved profile to a conversation container, so nestor
//! resolves the references it owns (LLM profile + provider connection, MCP servers, meta
//! profile, critic key, secrets) and leaves the runtime-specific part to the runtime.
//!
//! Gaps, documented: nestor has no skill catalog, so an OpenHands profile resolves with
//! `agent_context.skills: []` plus `load_project_skills: true` (the downstream still loads
//! project skills; user/public skills selected by `disabled_skills`/`public_skills` are not
//! injected); `launched_agent_profile` provenance is returned for the aggregator to record
//! because a downstream that gets `agent_settings` cannot know it.

use serde_json::{json, Map, Value};

use crate::cipher::looks_encrypted;
use crate::error::{Error, Result};
use crate::schema::{self, Expose, Opts};
use crate::service::{ProfileLoadError, SettingsService};

/// Outcome of resolving a profile.
pub(crate) struct Resolved {
    pub settings: Value,
    pub profile: Value,
}

/// Why a profile does not resolve.
pub(crate) struct Unresolved {
    pub problems: Vec<String>,
    pub llm_missing: bool,
    pub dangling_mcp: Vec<String>,
    pub dangling_meta: Option<String>,
    pub dangling_meta_llms: Vec<String>,
}

fn split_command(s: &str) -> Vec<String> {
    // Minimal shlex: whitespace separated, single/double quotes group.
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

impl SettingsService {
    /// `resolve(profile, stores)`: every reference copied in, plaintext secrets.
    pub(crate) fn resolve_profile(&self, user: &str, profile: &Value, llm_override: Option<&str>) -> Result<std::result::Result<Resolved, Unresolved>> {
        let settings = self.load_settings(user)?;
        let all_mcp = settings["agent_settings"]["mcp_config"].as_object().cloned().unwrap_or_default();
        let (mcp, dangling_mcp) = match profile["mcp_server_refs"].as_array() {
            None => (all_mcp.clone(), Vec::new()),
            Some(refs) => {
                let mut m = Map::new();
                let mut d = Vec::new();
                for r in refs.iter().filter_map(Value::as_str) {
                    match all_mcp.get(r) {
                        Some(s) => {
                            m.insert(r.into(), s.clone());
                        }
                        None if !d.contains(&r.to_owned()) => d.push(r.to_owned()),
                        None => {}
                    }
                }
                (m, d)
            }
        };
        let provenance = json!({
            "agent_profile_id": profile["id"], "revision": profile["revision"],
            "secret_refs": profile["secret_refs"], "llm_profile_ref": llm_override,
        });
        if profile["agent_kind"] == "acp" {
            if !dangling_mcp.is_empty() {
                return Ok(Err(Unresolved { problems: vec![format!("MCP server(s) not configured: {}", dangling_mcp.join(", "))], llm_missing: false, dangling_mcp, dangling_meta: None, dangling_meta_llms: vec![] }));
            }
            let command = profile["acp_command"].as_str().map(split_command).unwrap_or_default();
            if profile["acp_server"] == "custom" && command.is_empty() {
                return Err(Error::unprocessable("acp_command is required when acp_server='custom' — there is no default launch command to fall back to"));
            }
            let payload = json!({
                "agent_kind": "acp", "acp_server": profile["acp_server"], "acp_model": profile["acp_model"],
                "acp_session_mode": profile["acp_session_mode"], "acp_prompt_timeout": profile["acp_prompt_timeout"],
                "acp_startup_timeout": profile["acp_startup_timeout"], "acp_command": command,
                "acp_args": profile["acp_args"].as_array().cloned().unwrap_or_default(), "mcp_config": mcp,
                "agent_context": {"skills": [], "current_datetime": null, "load_project_skills": false},
            });
            let s = crate::service::validate_agent_settings(&payload, Opts::default()).map_err(|e| Error::unprocessable(format!("Failed to build agent settings: {:?}", e.first().map(|x| &x.msg))))?;
            return Ok(Ok(Resolved { settings: s, profile: provenance }));
        }
        let llm_ref = llm_override.map(str::to_owned).or_else(|| profile["llm_profile_ref"].as_str().map(str::to_owned)).unwrap_or_default();
        let llm = match self.load_llm_profile(user, &llm_ref, true) {
            Ok(l) => Some(l),
            Err(ProfileLoadError::NotFound) => None,
            Err(ProfileLoadError::Other(e)) if e.status == http::StatusCode::UNPROCESSABLE_ENTITY => {
                return Err(Error::unprocessable(format!("LLM profile '{llm_ref}': {}", e.body["detail"].as_str().unwrap_or_default())))
            }
            Err(ProfileLoadError::Other(e)) => return Err(e),
        };
        let (mut meta, mut meta_llms, mut dangling_meta, mut dangling_meta_llms) = (Value::Null, Map::new(), None, Vec::new());
        if profile["enable_classify_and_switch_llm_tool"] == true {
            if let Some(name) = profile["meta_profile_ref"].as_str() {
                match self.load_meta_profile(user, name)? {
                    None => dangling_meta = Some(name.to_owned()),
                    Some(mp) => {
                        let mut refs = vec![mp["classifier_model"].as_str().unwrap_or_default().to_owned()];
                        refs.extend(mp["classes"].as_array().into_iter().flatten().filter_map(|c| c["model"].as_str().map(str::to_owned)));
                        for r in refs {
                            if meta_llms.contains_key(&r) || dangling_meta_llms.contains(&r) {
                                continue;
                            }
                            match self.load_llm_profile(user, &r, true) {
                                Ok(l) => {
                                    meta_llms.insert(r, l);
                                }
                                Err(_) => dangling_meta_llms.push(r),
                            }
                        }
                        if !mp["prompt_template"].is_null() {
                            for (n, _) in crate::store::list_named(&self.dir(user).join("profiles")) {
                                if !meta_llms.contains_key(&n) {
                                    if let Ok(l) = self.load_llm_profile(user, &n, true) {
                                        meta_llms.insert(n, l);
                                    }
                                }
                            }
                        }
                        meta = mp;
                    }
                }
            }
        }
        if llm.is_none() || !dangling_mcp.is_empty() || dangling_meta.is_some() || !dangling_meta_llms.is_empty() {
            let mut problems = Vec::new();
            if llm.is_none() {
                problems.push(format!("LLM profile '{llm_ref}' not found"));
            }
            if !dangling_mcp.is_empty() {
                problems.push(format!("MCP server(s) not configured: {}", dangling_mcp.join(", ")));
            }
            if let Some(m) = &dangling_meta {
                problems.push(format!("Meta-profile '{m}' not found"));
            }
            if !dangling_meta_llms.is_empty() {
                problems.push(format!("LLM profile(s) routed to by the meta-profile not found: {}", dangling_meta_llms.join(", ")));
            }
            return Ok(Err(Unresolved { problems, llm_missing: llm.is_none(), dangling_mcp, dangling_meta, dangling_meta_llms }));
        }
        let mut llm = llm.unwrap_or_default();
        llm["stream"] = json!(true);
        let mut verification = profile["verification"].clone();
        verification["critic_api_key"] = settings["agent_settings"]["verification"]["critic_api_key"].clone();
        let payload = json!({
            "agent_kind": "openhands", "agent": profile["agent"], "llm": llm, "mcp_config": mcp,
            "tools": profile["tools"], "persona": profile["persona"],
            "agent_context": {
                "skills": [], "system_message_suffix": profile["system_message_suffix"],
                "load_project_skills": true, "disabled_skills": profile["disabled_skills"],
            },
            "condenser": profile["condenser"], "verification": verification,
            "enable_classify_and_switch_llm_tool": profile["enable_classify_and_switch_llm_tool"],
            "active_meta_profile": profile["meta_profile_ref"], "meta_profile": meta,
            "meta_profile_llms": meta_llms, "tool_concurrency_limit": profile["tool_concurrency_limit"],
        });
        let s = crate::service::validate_agent_settings(&payload, Opts::default())
            .map_err(|e| Error::unprocessable(format!("Failed to build agent settings: {}", e.first().map(|x| x.msg.clone()).unwrap_or_default())))?;
        Ok(Ok(Resolved { settings: s, profile: provenance }))
    }
}

/// `POST /api/agent-profiles/{name}/materialize` (without runtime probing: `unusable_tools`
/// is empty and `resolved_skills` lists nothing, nestor having no tool registry or skill
/// catalog; see module docs).
pub(crate) fn diagnostics(svc: &SettingsService, user: &str, profile: &Value) -> Result<Value> {
    let settings = svc.load_settings(user)?;
    let all_mcp = settings["agent_settings"]["mcp_config"].as_object().cloned().unwrap_or_default();
    let resolved_keys: Vec<Value> = match profile["mcp_server_refs"].as_array() {
        None => all_mcp.keys().map(|k| json!(k)).collect(),
        Some(r) => r.iter().filter(|x| x.as_str().is_some_and(|k| all_mcp.contains_key(k))).cloned().collect(),
    };
    let oh = profile["agent_kind"] != "acp";
    let mut d = json!({
        "agent_kind": profile["agent_kind"], "valid": false, "errors": [], "unusable_tools": [],
        "llm_profile_ref": if oh { profile["llm_profile_ref"].clone() } else { Value::Null },
        "llm_profile_resolved": false, "llm_api_key_set": false,
        "mcp_server_refs": profile["mcp_server_refs"], "resolved_mcp_config_keys": resolved_keys,
        "dangling_mcp_server_refs": [],
        "disabled_skills": if oh { profile["disabled_skills"].clone() } else { json!([]) },
        "public_skills": if oh { profile["public_skills"].clone() } else { Value::Null },
        "resolved_skills": [], "secret_refs": profile["secret_refs"],
        "acp_api_key_secret_name": null, "acp_base_url_secret_name": null, "acp_file_secret_names": [],
        "meta_profile_ref": if oh { profile["meta_profile_ref"].clone() } else { Value::Null },
        "dangling_meta_profile_ref": null, "dangling_meta_profile_llm_refs": [], "resolved_settings": null,
    });
    match svc.resolve_profile(user, profile, None) {
        Ok(Ok(r)) => {
            if oh {
                d["llm_profile_resolved"] = json!(true);
                d["llm_api_key_set"] = json!(r.settings["llm"]["api_key"].as_str().is_some_and(|k| !k.trim().is_empty()));
            }
            let model = if oh { schema::model("OpenHandsAgentSettings") } else { schema::model("ACPAgentSettings") };
            d["resolved_settings"] = schema::serialize(model, &r.settings, Expose::Redact);
            d["valid"] = json!(true);
        }
        Ok(Err(u)) => {
            d["errors"] = json!(u.problems);
            d["dangling_mcp_server_refs"] = json!(u.dangling_mcp);
            d["dangling_meta_profile_ref"] = json!(u.dangling_meta);
            d["dangling_meta_profile_llm_refs"] = json!(u.dangling_meta_llms);
            if oh && !u.llm_missing {
                d["llm_profile_resolved"] = json!(true);
                if let Some(r) = profile["llm_profile_ref"].as_str() {
                    if let Ok(l) = svc.load_llm_profile(user, r, true) {
                        d["llm_api_key_set"] = json!(l["api_key"].as_str().is_some_and(|k| !k.trim().is_empty()));
                    }
                }
            }
        }
        Err(e) => {
            d["errors"] = json!([format!("Failed to build agent settings: {}", e.body["detail"].as_str().unwrap_or_default())]);
        }
    }
    Ok(d)
}

/// What [`SettingsService::resolve_create`] produced.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedCreate {
    /// The body to forward: no `agent_profile_id`, no nestor cipher text, no
    /// `LookupSecret` pointing at nestor's own secrets.
    pub body: Value,
    /// `LaunchedAgentProfile` JSON when a profile was resolved (record it as the
    /// conversation's `launched_agent_profile`; the downstream cannot know it).
    pub launched_agent_profile: Option<Value>,
}

/// Decrypt every string of `v` that nestor's key decrypts.
fn decrypt_all(v: &Value, c: Option<&crate::cipher::Cipher>) -> Value {
    match v {
        Value::String(s) if looks_encrypted(s) => c.and_then(|c| c.decrypt(s)).map(Value::String).unwrap_or_else(|| v.clone()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, x)| (k.clone(), decrypt_all(x, c))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(|x| decrypt_all(x, c)).collect()),
        _ => v.clone(),
    }
}

/// The secret name when `url` points at `/api/settings/secrets/{name}` (relative or absolute).
pub fn own_secret_name(url: &str) -> Option<&str> {
    let path = match url.find("://") {
        Some(i) => {
            let rest = &url[i + 3..];
            &rest[rest.find('/')?..]
        }
        None => url,
    };
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let name = path.strip_prefix("/api/settings/secrets/")?;
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

impl SettingsService {
    /// Prepare a `POST /api/conversations` body for a downstream (the agent-server's
    /// `launch_source` + docker-mode `forward_to_runtime`):
    ///
    /// * `agent_profile_id` → resolved `agent_settings` (404 unknown id; 422 with the
    ///   agent-server's `problems` text for dangling references); `agent_launch_additions.
    ///   llm_profile_ref` is applied and removed; request `secrets` are limited to the
    ///   profile's `secret_refs`;
    /// * with `secrets_encrypted: true`, tokens made with nestor's key (from
    ///   `X-Expose-Secrets: encrypted`) are decrypted and the flag is cleared, since the
    ///   downstream does not share nestor's key;
    /// * `LookupSecret`s in `secrets` that point at `/api/settings/secrets/{name}` become
    ///   `StaticSecret`s with this user's value (a downstream would resolve such a URL
    ///   against itself);
    /// * a body with `agent` or `agent_settings` otherwise passes unchanged; a body with no
    ///   agent source is left for the downstream to refuse (422), as the agent-server does.
    pub fn resolve_create_blocking(&self, user: &str, body: &Value) -> Result<ResolvedCreate> {
        let mut b = body.as_object().cloned().unwrap_or_default();
        if b.get("secrets_encrypted") == Some(&Value::Bool(true)) {
            let Some(c) = self.cipher.as_ref() else {
                return Err(Error::unprocessable("Cannot decrypt secrets: cipher not configured. Set OH_SECRET_KEY environment variable."));
            };
            for k in ["agent", "agent_settings", "secrets"] {
                if let Some(v) = b.get(k) {
                    let d = decrypt_all(v, Some(c));
                    b.insert(k.into(), d);
                }
            }
            b.insert("secrets_encrypted".into(), json!(false));
        }
        let mut launched = None;
        if let Some(id) = b.get("agent_profile_id").filter(|v| !v.is_null()).cloned() {
            let id_s = id.as_str().unwrap_or_default().to_owned();
            let name = self.agent_profile_name_for_id(user, &id_s).ok_or_else(|| Error::not_found(format!("Agent profile with id '{id_s}' not found")))?;
            let profile = self.load_agent_profile(user, &name)?;
            let mut additions = b.get("agent_launch_additions").and_then(Value::as_object).cloned().unwrap_or_default();
            let llm_override = additions.remove("llm_profile_ref").and_then(|v| v.as_str().map(str::to_owned));
            if llm_override.is_some() && profile["agent_kind"] != "openhands" {
                return Err(Error::unprocessable("agent_launch_additions.llm_profile_ref applies only to an OpenHands Agent Profile"));
            }
            let r = match self.resolve_profile(user, &profile, llm_override.as_deref())? {
                Ok(r) => r,
                Err(u) => return Err(Error::unprocessable(u.problems.join("; "))),
            };
            b.remove("agent_profile_id");
            b.remove("agent");
            b.insert("agent_settings".into(), r.settings);
            b.insert("agent_launch_additions".into(), if additions.is_empty() { Value::Null } else { Value::Object(additions) });
            if let (Some(refs), Some(Value::Object(secrets))) = (r.profile["secret_refs"].as_array(), b.get_mut("secrets")) {
                secrets.retain(|k, _| refs.iter().any(|r| r.as_str() == Some(k)));
            }
            launched = Some(r.profile);
        }
        if let Some(Value::Object(secrets)) = b.get_mut("secrets") {
            for (_, v) in secrets.iter_mut() {
                let name = (v["kind"] == "LookupSecret").then(|| v["url"].as_str().and_then(own_secret_name).map(str::to_owned)).flatten();
                if let Some(n) = name {
                    if let Some(val) = self.secret_value(user, &n) {
                        *v = json!({"kind": "StaticSecret", "value": val, "description": v.get("description").cloned().unwrap_or(Value::Null)});
                    }
                }
            }
        }
        Ok(ResolvedCreate { body: Value::Object(b), launched_agent_profile: launched })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_own_secret_urls() {
        assert_eq!(own_secret_name("/api/settings/secrets/GH"), Some("GH"));
        assert_eq!(own_secret_name("http://127.0.0.1:8000/api/settings/secrets/GH?x=1"), Some("GH"));
        assert_eq!(own_secret_name("/api/settings/secrets/a/b"), None);
        assert_eq!(own_secret_name("https://vault.example/x"), None);
        assert_eq!(split_command("npx -y 'a b' \"c\""), vec!["npx", "-y", "a b", "c"]);
    }
}
