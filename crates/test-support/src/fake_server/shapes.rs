//! JSON shapes copied from a running agent-server 1.58.2 (field names *and* key order — the
//! workspace enables serde_json's `preserve_order`, and byte-level comparisons in nestor's
//! tests would otherwise be meaningless).
//!
//! Agents are normalized the way pydantic fills defaults: every LLM and agent field of the
//! real `ConversationInfo` is present, in declaration order, with the client's values laid
//! over the defaults. Secret LLM fields are stored as `"**********"` when set: REST
//! (`ConversationInfo`) shows them as `null`, the `full_state` snapshot as `"**********"`,
//! exactly like the real server without `X-Expose-Secrets`.

use std::sync::OnceLock;

use serde_json::{json, Map, Value};

pub(crate) const REDACTED: &str = "**********";
pub(crate) const LLM_SECRET_FIELDS: [&str; 4] = [
    "api_key",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
];

/// The LLM fields of a real `ConversationInfo.agent.llm`, in order, with their defaults.
const LLM_DEFAULTS: &str = r#"{
    "model": "claude-sonnet-4-20250514", "api_key": null, "provider_connection_id": null,
    "auth_type": "api_key", "subscription_vendor": null, "base_url": null, "api_version": null,
    "aws_access_key_id": null, "aws_secret_access_key": null, "aws_session_token": null,
    "aws_region_name": null, "aws_profile_name": null, "aws_role_name": null,
    "aws_session_name": null, "aws_bedrock_runtime_endpoint": null,
    "openrouter_site_url": "https://docs.all-hands.dev/", "openrouter_app_name": "OpenHands",
    "num_retries": 5, "retry_multiplier": 8.0, "retry_min_wait": 8, "retry_max_wait": 64,
    "timeout": 300, "stream_idle_timeout": 300.0, "max_message_chars": 30000,
    "temperature": null, "top_p": null, "top_k": null, "max_input_tokens": null,
    "max_output_tokens": null, "model_canonical_name": null, "api_mode": "auto",
    "capability_overrides": {}, "extra_headers": null, "input_cost_per_token": null,
    "output_cost_per_token": null, "ollama_base_url": null, "stream": false,
    "drop_params": true, "disable_vision": null, "disable_stop_word": false,
    "caching_prompt": true, "log_completions": false,
    "log_completions_folder": "logs/completions", "custom_tokenizer": null,
    "native_tool_calling": true, "force_string_serializer": null, "inline_image_urls": null,
    "reasoning_effort": "high", "reasoning_summary": null, "enable_encrypted_reasoning": true,
    "prompt_cache_retention": "24h", "extended_thinking_budget": 200000, "seed": null,
    "usage_id": "default", "litellm_extra_body": {}, "is_subscription": false
}"#;

/// The agent fields of a real `ConversationInfo.agent` (kind `Agent`), in order.
const AGENT_DEFAULTS: &str = r#"{
    "llm": {}, "tools": [], "mcp_config": {}, "filter_tools_regex": null,
    "include_default_tools": ["FinishTool", "ThinkTool"], "agent_context": null,
    "system_prompt": null, "system_prompt_filename": "system_prompt.j2",
    "security_policy_filename": "security_policy.j2",
    "system_prompt_kwargs": {"llm_security_analyzer": true}, "condenser": null,
    "critic": null, "tool_concurrency_limit": 1, "persona": null, "kind": "Agent"
}"#;

fn parsed(cell: &'static OnceLock<Map<String, Value>>, text: &str) -> Map<String, Value> {
    cell.get_or_init(|| serde_json::from_str(text).unwrap_or_default())
        .clone()
}

fn llm_defaults() -> Map<String, Value> {
    static CELL: OnceLock<Map<String, Value>> = OnceLock::new();
    parsed(&CELL, LLM_DEFAULTS)
}

fn agent_defaults() -> Map<String, Value> {
    static CELL: OnceLock<Map<String, Value>> = OnceLock::new();
    parsed(&CELL, AGENT_DEFAULTS)
}

/// Overlay `given` on `defaults`, keeping the defaults' order and appending unknown keys.
fn overlay(mut defaults: Map<String, Value>, given: &Map<String, Value>) -> Map<String, Value> {
    for (k, v) in given {
        defaults.insert(k.clone(), v.clone());
    }
    defaults
}

pub(crate) fn normalize_llm(given: &Value) -> Value {
    let empty = Map::new();
    let g = given.as_object().unwrap_or(&empty);
    let mut m = overlay(llm_defaults(), g);
    for f in LLM_SECRET_FIELDS {
        if let Some(v) = m.get_mut(f) {
            if !v.is_null() {
                *v = json!(REDACTED);
            }
        }
    }
    Value::Object(m)
}

/// Normalize a client-supplied agent (`kind` `Agent`); other kinds are kept as given.
pub(crate) fn normalize_agent(given: &Value) -> Value {
    let Some(g) = given.as_object() else {
        return given.clone();
    };
    if g.get("kind")
        .and_then(Value::as_str)
        .is_some_and(|k| k != "Agent")
    {
        return given.clone();
    }
    let mut m = overlay(agent_defaults(), g);
    let llm = normalize_llm(g.get("llm").unwrap_or(&Value::Null));
    m.insert("llm".into(), llm);
    if let Some(Value::Array(tools)) = g.get("tools") {
        let tools = tools
            .iter()
            .map(|t| match t {
                Value::Object(tm) => {
                    let mut n = Map::new();
                    n.insert(
                        "name".into(),
                        tm.get("name").cloned().unwrap_or(Value::Null),
                    );
                    n.insert(
                        "params".into(),
                        tm.get("params").cloned().unwrap_or(json!({})),
                    );
                    for (k, v) in tm {
                        n.insert(k.clone(), v.clone());
                    }
                    Value::Object(n)
                }
                other => other.clone(),
            })
            .collect();
        m.insert("tools".into(), Value::Array(tools));
    }
    Value::Object(m)
}

/// An agent built from `agent_settings` (or the default agent when only a profile id is
/// given): the settings' LLM and the server's default tool set.
pub(crate) fn agent_from_settings(settings: Option<&Value>) -> Value {
    let llm = settings
        .and_then(|s| s.get("llm"))
        .cloned()
        .unwrap_or_else(|| json!({"model": "openai/fake", "usage_id": "agent"}));
    let tools = settings
        .and_then(|s| s.get("tools"))
        .cloned()
        .unwrap_or_else(
            || json!([{"name": "terminal"}, {"name": "file_editor"}, {"name": "task_tracker"}]),
        );
    normalize_agent(&json!({"kind": "Agent", "llm": llm, "tools": tools}))
}

/// `tool_module_qualnames` the real server derives from the agent's tools.
pub(crate) fn tool_module_qualnames(agent: &Value, given: Option<&Value>) -> Value {
    let mut m = Map::new();
    if let Some(Value::Array(tools)) = agent.get("tools") {
        for t in tools {
            if let Some(name) = t.get("name").and_then(Value::as_str) {
                let module = match name {
                    "terminal" => Some("openhands.tools.terminal.definition"),
                    "file_editor" => Some("openhands.tools.file_editor.definition"),
                    "task_tracker" => Some("openhands.tools.task_tracker.definition"),
                    "browser_tool_set" => Some("openhands.tools.browser_use.definition"),
                    "planning_file_editor" => {
                        Some("openhands.tools.planning_file_editor.definition")
                    }
                    _ => None,
                };
                if let Some(module) = module {
                    m.insert(name.into(), json!(module));
                }
            }
        }
    }
    if let Some(Value::Object(g)) = given {
        for (k, v) in g {
            m.insert(k.clone(), v.clone());
        }
    }
    Value::Object(m)
}

/// REST view of a stored agent: secrets become `null`.
pub(crate) fn agent_rest(agent: &Value) -> Value {
    let mut a = agent.clone();
    if let Some(Value::Object(llm)) = a.get_mut("llm") {
        for f in LLM_SECRET_FIELDS {
            if let Some(v) = llm.get_mut(f) {
                *v = Value::Null;
            }
        }
    }
    a
}

/// Drop `null` members recursively (pydantic `exclude_none` on nested models).
pub(crate) fn strip_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_nulls).collect()),
        other => other.clone(),
    }
}

/// Drop top-level `null` members (events are dumped with `exclude_none`).
pub(crate) fn strip_top_nulls(m: &mut Map<String, Value>) {
    m.retain(|_, v| !v.is_null());
}

/// `/server_info` (also `GET /`), copied from a real 1.58.2 with browser and VS Code off.
pub(crate) fn server_info(version: &str, uptime: f64, idle_time: f64) -> Value {
    json!({
        "uptime": uptime,
        "idle_time": idle_time,
        "title": "OpenHands Agent Server",
        "version": version,
        "sdk_version": version,
        "tools_version": version,
        "workspace_version": version,
        "build_git_sha": "unknown",
        "build_git_ref": "unknown",
        "python_version": "3.12.1 (main, May  9 2026, 07:36:11) [GCC 12.2.0]",
        "usable_tools": [
            "ClassifyAndSwitchLLMTool", "ask_oracle", "file_editor", "task_tool_set", "task",
            "task_tracker", "terminal", "workflow_tool_set", "workflow", "start_child_conversation",
            "edit", "list_directory", "read_file", "write_file", "glob", "grep", "planning_file_editor"
        ],
        "runtime_idle_timeout_seconds": null,
        "conversation_runtime": "local",
        "available_conversation_runtimes": [],
        "capabilities": [
            "conversation_runtime_routes_v1", "profile_secret_scope_v1", "profile_persona_v1",
            "credential_binding_v1", "credential_binding_readiness_probe_v1",
            "credential_binding_activation_guard_v1", "idempotent_conversation_create_v1",
            "tool_catalog_v1", "agent_profile_draft_materialize_v1", "agent_launch_pipeline_v1",
            "profile_public_skills_v1", "skill_catalog_v1"
        ],
        "app_backend_ingress_url": null,
        "max_foreground_terminal_timeout_seconds": null,
        "docs": "/docs",
        "redoc": "/redoc"
    })
}

/// A short `SystemPromptEvent` body (`system_prompt` + `tools`); the real prompt is ~20 KB.
pub(crate) fn system_prompt_fields(agent: &Value) -> Vec<(&'static str, Value)> {
    let mut tools = Vec::new();
    if let Some(Value::Array(ts)) = agent.get("tools") {
        for t in ts {
            if t.get("name").and_then(Value::as_str) == Some("terminal") {
                tools.push(json!({
                    "description": "Execute a shell command in the terminal within a persistent shell session.",
                    "action_type": "TerminalAction", "observation_type": "TerminalObservation",
                    "annotations": {"title": "terminal", "readOnlyHint": false, "destructiveHint": true, "idempotentHint": false, "openWorldHint": true},
                    "kind": "TerminalTool", "title": "terminal"
                }));
            }
        }
    }
    tools.push(json!({
        "description": "Signals the completion of the current task or conversation.",
        "action_type": "FinishAction", "observation_type": "FinishObservation",
        "annotations": {"title": "finish", "readOnlyHint": true, "destructiveHint": false, "idempotentHint": true, "openWorldHint": false},
        "kind": "FinishTool", "title": "finish"
    }));
    tools.push(json!({
        "description": "Use the tool to think about something.",
        "action_type": "ThinkAction", "observation_type": "ThinkObservation",
        "annotations": {"readOnlyHint": true, "destructiveHint": false, "idempotentHint": true, "openWorldHint": false},
        "kind": "ThinkTool", "title": "think"
    }));
    vec![
        (
            "system_prompt",
            json!({"cache_prompt": false, "type": "text", "text": "<SOUL>\nYou are OpenHands agent, a helpful AI assistant that can interact with a computer to solve tasks.\n</SOUL>\n(fake agent-server: prompt abbreviated)"}),
        ),
        ("tools", Value::Array(tools)),
    ]
}

/// Content items of a `MessageEvent.llm_message` from a `SendMessageRequest` content list.
pub(crate) fn llm_content(content: &[Value]) -> Value {
    Value::Array(
        content
            .iter()
            .map(|c| {
                let mut m = Map::new();
                m.insert("cache_prompt".into(), json!(false));
                if c.get("type").and_then(Value::as_str) == Some("image") {
                    m.insert("type".into(), json!("image"));
                    m.insert(
                        "image_urls".into(),
                        c.get("image_urls").cloned().unwrap_or(json!([])),
                    );
                } else {
                    m.insert("type".into(), json!("text"));
                    m.insert("text".into(), c.get("text").cloned().unwrap_or(json!("")));
                }
                Value::Object(m)
            })
            .collect(),
    )
}

/// Lower-cased text of a `MessageEvent`, for the `body` filter of event search.
pub(crate) fn message_search_text(ev: &Map<String, Value>) -> Option<String> {
    if ev.get("kind").and_then(Value::as_str) != Some("MessageEvent") {
        return None;
    }
    let mut parts: Vec<String> = Vec::new();
    let mut texts = |v: Option<&Value>| {
        if let Some(Value::Array(items)) = v {
            for it in items {
                if let Some(t) = it.get("text").and_then(Value::as_str) {
                    parts.push(t.to_owned());
                }
            }
        }
    };
    texts(ev.get("llm_message").and_then(|m| m.get("content")));
    texts(ev.get("extended_content"));
    if let Some(r) = ev.get("reasoning_content").and_then(Value::as_str) {
        parts.push(r.to_owned());
    }
    Some(parts.join(" ").to_lowercase())
}
