//! Conversation operations shared by the REST routes, the sockets and the direct-seeding
//! API: create, message, scripted run, pause/interrupt, fork, children, delete, and the
//! crash recovery that runs on `restart`.
//!
//! ## The scripted run
//!
//! The fake has no LLM. A run replays the *shape* of a real successful run (see
//! `frames/events-socket-plain.json`): `execution_status=running`, then for each of
//! `FakeConfig::run_steps` steps an `ActionEvent` + `ObservationEvent` pair (a `terminal`
//! call for every step but the last, a `finish` call for the last), then
//! `execution_status=finished` and a transient `full_state` snapshot — the signal the SDK
//! treats as "run complete". Each event is preceded by `FakeConfig::step_delay`. If the last
//! user message has a line `RUN: <cmd>` (the convention of nestor's e2e fake LLM) that command
//! is what the terminal action "runs".
//!
//! Like the real server, the first message or run of a conversation lazily writes a
//! `SystemPromptEvent` (abbreviated), a user message also persists a
//! `last_user_message_id` state update, and a message sent with `run` while a run is in
//! progress is picked up by a re-run when the current one finishes.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use uuid::Uuid;

use super::clock;
use super::shapes;
use super::store::{Conv, ConvState, Meta, Parent, RunHandle, Status};
use super::{FakeConfig, Inner};

/// What a create request (or a direct seed) asks for, after validation.
pub(crate) struct CreateSpec {
    pub id: Option<Uuid>,
    pub agent: Value,
    pub workspace: Value,
    pub max_iterations: Value,
    pub stuck_detection: bool,
    pub confirmation_policy: Value,
    pub security_analyzer: Value,
    pub hook_config: Value,
    pub client_tools: Value,
    pub tool_module_qualnames: Value,
    pub tags: Value,
    pub title: Option<String>,
    pub parent: Option<Uuid>,
    pub initial_message: Option<Vec<Value>>,
}

impl CreateSpec {
    /// Read a (validated, or trusted seeding) `StartConversationRequest`, filling defaults.
    pub fn from_body(id: Option<Uuid>, body: &Value) -> Self {
        let get = |k: &str| body.get(k).filter(|v| !v.is_null());
        let agent = match get("agent") {
            Some(a) => shapes::normalize_agent(a),
            None => shapes::agent_from_settings(get("agent_settings")),
        };
        let mut workspace = Map::new();
        match get("workspace") {
            Some(Value::Object(w)) => {
                workspace.insert(
                    "working_dir".into(),
                    w.get("working_dir")
                        .cloned()
                        .unwrap_or(json!("workspace/project")),
                );
                for (k, v) in w {
                    workspace.insert(k.clone(), v.clone());
                }
            }
            _ => {
                workspace.insert("working_dir".into(), json!("workspace/project"));
            }
        }
        if !workspace.contains_key("kind") {
            workspace.insert("kind".into(), json!("LocalWorkspace"));
        }
        let id = id.or_else(|| {
            get("conversation_id")
                .and_then(Value::as_str)
                .and_then(|s| Uuid::parse_str(s).ok())
        });
        CreateSpec {
            id,
            tool_module_qualnames: shapes::tool_module_qualnames(
                &agent,
                get("tool_module_qualnames"),
            ),
            agent,
            workspace: Value::Object(workspace),
            max_iterations: get("max_iterations").cloned().unwrap_or(json!(500)),
            stuck_detection: get("stuck_detection")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            confirmation_policy: get("confirmation_policy")
                .cloned()
                .unwrap_or(json!({"kind": "NeverConfirm"})),
            security_analyzer: get("security_analyzer").cloned().unwrap_or(Value::Null),
            hook_config: get("hook_config").cloned().unwrap_or(Value::Null),
            client_tools: get("client_tools").cloned().unwrap_or(json!([])),
            tags: get("tags").cloned().unwrap_or(json!({})),
            title: None,
            parent: get("parent_conversation_id")
                .and_then(Value::as_str)
                .and_then(|s| Uuid::parse_str(s).ok()),
            initial_message: get("initial_message").map(|m| {
                m.get("content")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default()
            }),
        }
    }
}

fn new_meta(cfg: &FakeConfig, id: Uuid, spec: &CreateSpec) -> Meta {
    let now = clock::now_utc();
    let base = match &cfg.persist_dir {
        Some(d) => d.to_string_lossy().into_owned(),
        None => cfg.conversations_path.clone(),
    };
    Meta {
        agent: spec.agent.clone(),
        workspace: spec.workspace.clone(),
        persistence_dir: format!("{}/{}", base.trim_end_matches('/'), id.simple()),
        max_iterations: spec.max_iterations.clone(),
        stuck_detection: spec.stuck_detection,
        confirmation_policy: spec.confirmation_policy.clone(),
        security_analyzer: spec.security_analyzer.clone(),
        hook_config: spec.hook_config.clone(),
        client_tools: spec.client_tools.clone(),
        tool_module_qualnames: spec.tool_module_qualnames.clone(),
        title: spec.title.clone(),
        tags: spec.tags.clone(),
        created_at: now,
        updated_at: now,
        forked_from_conversation_id: None,
        forked_from_event_id: None,
        parent_conversation_id: spec.parent,
        sub_conversation_ids: Vec::new(),
    }
}

/// Create (or find, for an existing id) a conversation. Returns it and whether it is new.
/// An initial message is appended and run, like the real server does regardless of its
/// `run` flag.
pub(crate) fn create(inner: &Arc<Inner>, spec: CreateSpec) -> (Arc<Conv>, bool) {
    let id = spec.id.unwrap_or_else(Uuid::new_v4);
    if let Some(existing) = inner.store.get(&id) {
        return (existing, false);
    }
    let conv = Conv::new(
        id,
        inner.store.next_serial(),
        new_meta(&inner.cfg, id, &spec),
    );
    let (conv, is_new) = inner.store.insert_new(conv);
    if !is_new {
        return (conv, false);
    }
    persist_meta(inner, &conv);
    if let Some(parent) = spec.parent.and_then(|p| inner.store.get(&p)) {
        let mut pst = parent.lock();
        pst.meta.sub_conversation_ids.push(id);
        pst.invalidate();
    }
    if let Some(content) = spec.initial_message {
        send_message(inner, &conv, &content, true);
    }
    (conv, true)
}

fn ensure_system_prompt(cfg: &FakeConfig, st: &mut ConvState) {
    if cfg.system_prompt_event && !st.has_system_prompt {
        let fields = shapes::system_prompt_fields(&st.meta.agent);
        let ev = st.build(cfg, "SystemPromptEvent", "agent", Parent::Leaf, fields);
        st.append(cfg, ev);
    }
}

/// Append a user `MessageEvent` (+ `last_user_message_id` update); optionally start a run.
/// Returns the message's event id.
pub(crate) fn send_message(
    inner: &Arc<Inner>,
    conv: &Arc<Conv>,
    content: &[Value],
    run: bool,
) -> String {
    let cfg = &inner.cfg;
    let mut st = conv.lock();
    ensure_system_prompt(cfg, &mut st);
    if matches!(st.status, Status::Finished | Status::Stuck) {
        st.set_status(cfg, Status::Idle);
    }
    let llm_message =
        json!({"role": "user", "content": shapes::llm_content(content), "thinking_blocks": []});
    let ev = st.build(
        cfg,
        "MessageEvent",
        "user",
        Parent::LeafOrRoot,
        vec![
            ("llm_message", llm_message),
            ("activated_skills", json!([])),
            ("extended_content", json!([])),
        ],
    );
    let msg = st.append(cfg, ev);
    st.state_update(cfg, "last_user_message_id", json!(msg.id));
    if run {
        if st.status == Status::Running {
            st.rerun_requested = true;
        } else {
            let _ = start_run_locked(inner, conv, &mut st);
        }
    }
    msg.id.clone()
}

pub(crate) struct AlreadyRunning;

/// `POST /run`: 409 when a run is in progress.
pub(crate) fn start_run(inner: &Arc<Inner>, conv: &Arc<Conv>) -> Result<(), AlreadyRunning> {
    let mut st = conv.lock();
    start_run_locked(inner, conv, &mut st)
}

fn start_run_locked(
    inner: &Arc<Inner>,
    conv: &Arc<Conv>,
    st: &mut ConvState,
) -> Result<(), AlreadyRunning> {
    if st.status == Status::Running {
        return Err(AlreadyRunning);
    }
    let cfg = &inner.cfg;
    ensure_system_prompt(cfg, st);
    st.set_status(cfg, Status::Running);
    let run_id = inner.next_run_id();
    // With the server stopped there is nobody to run it: the status stays `running`, which
    // `restart` then recovers as `error`, like a real server killed mid-run.
    let abort = inner.generation().map(|g| {
        let (inner2, conv2, token) = (inner.clone(), conv.clone(), g.token.clone());
        g.tracker
            .spawn(async move {
                tokio::select! {
                    _ = token.cancelled() => {}
                    _ = run_task(inner2, conv2, run_id) => {}
                }
            })
            .abort_handle()
    });
    st.run = Some(RunHandle { id: run_id, abort });
    Ok(())
}

fn is_current(st: &ConvState, run_id: u64) -> bool {
    !st.deleted && st.status == Status::Running && st.run.as_ref().is_some_and(|r| r.id == run_id)
}

fn py_json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

fn call_id() -> String {
    format!("call_{}", &Uuid::new_v4().simple().to_string()[..12])
}

fn response_id() -> String {
    format!("chatcmpl-{}", Uuid::new_v4().simple())
}

/// The command of the last user message's `RUN: <cmd>` line, if any.
fn requested_command(st: &ConvState) -> Option<String> {
    let id = st.last_user_message_id.as_ref()?;
    let idx = *st.index.get(id)?;
    let ev = &st.events[idx].value;
    let content = ev.get("llm_message")?.get("content")?.as_array()?;
    content
        .iter()
        .filter_map(|c| c.get("text").and_then(Value::as_str))
        .flat_map(str::lines)
        .find_map(|l| l.trim().strip_prefix("RUN:").map(|c| c.trim().to_owned()))
}

async fn run_task(inner: Arc<Inner>, conv: Arc<Conv>, run_id: u64) {
    let cfg = &inner.cfg;
    let delay = cfg.step_delay;
    let requested = requested_command(&conv.lock());
    let mut last_output = String::new();
    for step in 0..cfg.run_steps {
        let last = step + 1 == cfg.run_steps;
        pause(delay).await;
        let call = call_id();
        let (action_id, command, message) = {
            let mut st = conv.lock();
            if !is_current(&st, run_id) {
                return;
            }
            if !last {
                let command = requested
                    .clone()
                    .unwrap_or_else(|| format!("echo fake-step-{step}"));
                let summary = "run the requested command";
                let arguments = format!(
                    "{{\"command\": {}, \"summary\": {}}}",
                    py_json_str(&command),
                    py_json_str(summary)
                );
                let ev = st.build(
                    cfg,
                    "ActionEvent",
                    "agent",
                    Parent::LeafOrRoot,
                    vec![
                        ("thought", json!([])),
                        ("thinking_blocks", json!([])),
                        ("action", json!({"command": command, "is_input": false, "reset": false, "kind": "TerminalAction"})),
                        ("tool_name", json!("terminal")),
                        ("tool_call_id", json!(call)),
                        ("tool_call", json!({"id": call, "name": "terminal", "arguments": arguments, "origin": "completion"})),
                        ("llm_response_id", json!(response_id())),
                        ("security_risk", json!("UNKNOWN")),
                        ("summary", json!(summary)),
                    ],
                );
                (st.append(cfg, ev).id.clone(), Some(command), None)
            } else {
                let message = if last_output.is_empty() {
                    "Done.".to_owned()
                } else {
                    format!("Done. The command printed: {}", last_output.trim_end())
                };
                let arguments = format!("{{\"message\": {}}}", py_json_str(&message));
                let ev = st.build(
                    cfg,
                    "ActionEvent",
                    "agent",
                    Parent::LeafOrRoot,
                    vec![
                        ("thought", json!([])),
                        ("thinking_blocks", json!([])),
                        ("action", json!({"message": message, "kind": "FinishAction"})),
                        ("tool_name", json!("finish")),
                        ("tool_call_id", json!(call)),
                        ("tool_call", json!({"id": call, "name": "finish", "arguments": arguments, "origin": "completion"})),
                        ("llm_response_id", json!(response_id())),
                        ("security_risk", json!("UNKNOWN")),
                        ("summary", json!(format!("finish: {arguments}"))),
                    ],
                );
                (st.append(cfg, ev).id.clone(), None, Some(message))
            }
        };
        pause(delay).await;
        let mut st = conv.lock();
        if !is_current(&st, run_id) {
            return;
        }
        let observation = match (&command, &message) {
            (Some(cmd), _) => {
                let output = cmd
                    .strip_prefix("echo ")
                    .filter(|r| !r.contains('>'))
                    .map(|r| format!("{r}\n"))
                    .unwrap_or_default();
                last_output = output.clone();
                let wd = st
                    .meta
                    .workspace
                    .get("working_dir")
                    .cloned()
                    .unwrap_or(json!("/workspace"));
                json!({
                    "content": [{"cache_prompt": false, "type": "text", "text": output}],
                    "is_error": false, "command": cmd, "exit_code": 0, "timeout": false,
                    "metadata": {"exit_code": 0, "pid": -1, "username": "openhands", "hostname": "fake-agent-server",
                        "working_dir": wd, "py_interpreter_path": "/usr/bin/python3", "prefix": "",
                        "suffix": "\n[The command completed with exit code 0.]"},
                    "kind": "TerminalObservation"
                })
            }
            (None, msg) => json!({
                "content": [{"cache_prompt": false, "type": "text", "text": msg.clone().unwrap_or_default()}],
                "is_error": false, "kind": "FinishObservation"
            }),
        };
        let tool = if command.is_some() {
            "terminal"
        } else {
            "finish"
        };
        let ev = st.build(
            cfg,
            "ObservationEvent",
            "environment",
            Parent::Id(action_id.clone()),
            vec![
                ("tool_name", json!(tool)),
                ("tool_call_id", json!(call)),
                ("observation", observation),
                ("action_id", json!(action_id)),
                ("extended_content", json!([])),
            ],
        );
        st.append(cfg, ev);
    }
    if cfg.run_steps == 0 {
        pause(delay).await;
    }
    let mut st = conv.lock();
    if !is_current(&st, run_id) {
        return;
    }
    st.run = None;
    st.set_status(cfg, Status::Finished);
    st.publish_full_state(cfg, conv.id);
    if std::mem::take(&mut st.rerun_requested) {
        let _ = start_run_locked(&inner, &conv, &mut st);
    }
}

async fn pause(d: Duration) {
    if d.is_zero() {
        tokio::task::yield_now().await;
    } else {
        tokio::time::sleep(d).await;
    }
}

fn stop_run(st: &mut ConvState) {
    if let Some(r) = st.run.take() {
        if let Some(a) = r.abort {
            a.abort();
        }
    }
    st.rerun_requested = false;
}

/// `POST /pause`: status `paused` and a `PauseEvent`, whatever the state was.
pub(crate) fn pause_conversation(inner: &Arc<Inner>, conv: &Arc<Conv>) {
    let cfg = &inner.cfg;
    let mut st = conv.lock();
    stop_run(&mut st);
    st.set_status(cfg, Status::Paused);
    let ev = st.build(cfg, "PauseEvent", "user", Parent::LeafOrRoot, vec![]);
    st.append(cfg, ev);
    st.publish_full_state(cfg, conv.id);
}

/// `POST /interrupt`: a running conversation ends `paused` with an `InterruptEvent`; an idle
/// one is paused; an already paused one is left alone (all as observed on 1.58.2).
pub(crate) fn interrupt_conversation(inner: &Arc<Inner>, conv: &Arc<Conv>) {
    let cfg = &inner.cfg;
    let mut st = conv.lock();
    match st.status {
        Status::Paused => {}
        Status::Running => {
            stop_run(&mut st);
            st.set_status(cfg, Status::Paused);
            let ev = st.build(cfg, "InterruptEvent", "user", Parent::LeafOrRoot, vec![]);
            st.append(cfg, ev);
            st.publish_full_state(cfg, conv.id);
        }
        _ => {
            drop(st);
            pause_conversation(inner, conv);
        }
    }
}

/// With `FakeConfig::persist_dir`: write the conversation's `meta.json` (what a create
/// fixed) and persist its events from now on.
fn persist_meta(inner: &Arc<Inner>, conv: &Arc<Conv>) {
    let Some(root) = &inner.cfg.persist_dir else { return };
    let dir = root.join(conv.id.simple().to_string());
    let mut st = conv.lock();
    let m = &st.meta;
    let meta = json!({
        "id": conv.id.to_string(),
        "agent": m.agent, "workspace": m.workspace, "max_iterations": m.max_iterations,
        "stuck_detection": m.stuck_detection, "confirmation_policy": m.confirmation_policy,
        "security_analyzer": m.security_analyzer, "hook_config": m.hook_config,
        "client_tools": m.client_tools, "tool_module_qualnames": m.tool_module_qualnames,
        "tags": m.tags,
        "parent_conversation_id": m.parent_conversation_id.map(|p| p.to_string()),
        "created_at": clock::utc_iso_z(m.created_at),
    });
    if std::fs::create_dir_all(&dir).is_ok() {
        let tmp = dir.join("meta.json.tmp");
        if std::fs::write(&tmp, meta.to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, dir.join("meta.json"));
        }
        st.persist = Some(dir);
    }
}

/// Load what `persist_dir` holds (at start, before serving).
pub(crate) fn load_persisted(inner: &Arc<Inner>, root: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    let mut loaded: Vec<(time::OffsetDateTime, std::path::PathBuf, Value)> = Vec::new();
    for e in entries.flatten() {
        let dir = e.path();
        let Some(meta) = std::fs::read(dir.join("meta.json")).ok().and_then(|b| serde_json::from_slice::<Value>(&b).ok()) else {
            continue;
        };
        let created = meta
            .get("created_at")
            .and_then(Value::as_str)
            .and_then(|s| time::OffsetDateTime::parse(s, &time::format_description::well_known::Iso8601::DEFAULT).ok())
            .unwrap_or_else(clock::now_utc);
        loaded.push((created, dir, meta));
    }
    // Creation order is the sorts' tie-breaker.
    loaded.sort_by_key(|(c, _, _)| *c);
    for (created, dir, meta) in loaded {
        let Some(id) = meta.get("id").and_then(Value::as_str).and_then(|s| Uuid::parse_str(s).ok()) else { continue };
        let spec = CreateSpec::from_body(Some(id), &meta);
        let mut m = new_meta(&inner.cfg, id, &spec);
        m.created_at = created;
        let (conv, _) = inner.store.insert_new(Conv::new(id, inner.store.next_serial(), m));
        let mut st = conv.lock();
        if let Ok(text) = std::fs::read_to_string(dir.join("events.jsonl")) {
            for line in text.lines() {
                if let Ok(Value::Object(ev)) = serde_json::from_str::<Value>(line) {
                    st.append(&inner.cfg, ev);
                }
            }
        }
        st.persist = Some(dir);
    }
}

/// `DELETE /api/conversations/{id}`. Open sockets stay open (and silent), like the real one.
pub(crate) fn delete(inner: &Arc<Inner>, id: &Uuid) -> bool {
    let Some(conv) = inner.store.remove(id) else {
        return false;
    };
    let parent = {
        let mut st = conv.lock();
        st.deleted = true;
        stop_run(&mut st);
        if let Some(dir) = st.persist.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
        st.meta.parent_conversation_id
    };
    if let Some(p) = parent.and_then(|p| inner.store.get(&p)) {
        let mut pst = p.lock();
        pst.meta.sub_conversation_ids.retain(|c| c != id);
        pst.invalidate();
    }
    true
}

pub(crate) enum ForkError {
    Conflict(String),
    UnknownEvent(String),
}

/// `POST /fork`: a copy of the log (same event ids and timestamps) in a new, idle
/// conversation on this server.
pub(crate) fn fork(
    inner: &Arc<Inner>,
    src: &Arc<Conv>,
    fork_id: Option<Uuid>,
    title: Option<String>,
    tags: Option<Value>,
    from_event_id: Option<String>,
) -> Result<Value, ForkError> {
    let cfg = &inner.cfg;
    let id = fork_id.unwrap_or_else(Uuid::new_v4);
    if inner.store.get(&id).is_some() {
        return Err(ForkError::Conflict(format!(
            "Conversation with id {id} already exists"
        )));
    }
    let (spec, events) = {
        let st = src.lock();
        let upto = match &from_event_id {
            Some(e) => match st.index.get(e) {
                Some(i) => i + 1,
                None => {
                    return Err(ForkError::UnknownEvent(format!(
                        "Unknown from_event_id: {e}"
                    )))
                }
            },
            None => st.events.len(),
        };
        let m = &st.meta;
        let spec = CreateSpec {
            id: Some(id),
            agent: m.agent.clone(),
            workspace: m.workspace.clone(),
            max_iterations: m.max_iterations.clone(),
            stuck_detection: m.stuck_detection,
            confirmation_policy: m.confirmation_policy.clone(),
            security_analyzer: m.security_analyzer.clone(),
            hook_config: m.hook_config.clone(),
            client_tools: m.client_tools.clone(),
            tool_module_qualnames: m.tool_module_qualnames.clone(),
            tags: tags.unwrap_or(json!({})),
            title,
            parent: None,
            initial_message: None,
        };
        (
            spec,
            st.events[..upto]
                .iter()
                .map(|e| e.value.clone())
                .collect::<Vec<_>>(),
        )
    };
    let mut meta = new_meta(cfg, id, &spec);
    meta.forked_from_conversation_id = Some(src.id);
    meta.forked_from_event_id = from_event_id;
    let conv = Conv::new(id, inner.store.next_serial(), meta);
    {
        let mut st = conv.lock();
        for ev in events {
            if let Value::Object(m) = ev {
                st.append(cfg, m);
            }
        }
        st.status = Status::Idle;
        st.last_user_message_id = None;
        st.pending_action = None;
    }
    let (conv, is_new) = inner.store.insert_new(conv);
    if !is_new {
        return Err(ForkError::Conflict(format!(
            "Conversation with id {id} already exists"
        )));
    }
    let info = conv.lock().info(id, false);
    Ok(info)
}

/// `POST /children`: a child conversation with the parent's configuration whose first user
/// message is `task` (and runs). The response is built before the run starts (`"idle"`).
pub(crate) fn start_child(
    inner: &Arc<Inner>,
    parent: &Arc<Conv>,
    task: &str,
    title: Option<String>,
    isolation: &str,
) -> Value {
    let spec = {
        let st = parent.lock();
        let m = &st.meta;
        CreateSpec {
            id: None,
            agent: m.agent.clone(),
            workspace: m.workspace.clone(),
            max_iterations: m.max_iterations.clone(),
            stuck_detection: m.stuck_detection,
            confirmation_policy: m.confirmation_policy.clone(),
            security_analyzer: m.security_analyzer.clone(),
            hook_config: m.hook_config.clone(),
            client_tools: m.client_tools.clone(),
            tool_module_qualnames: m.tool_module_qualnames.clone(),
            tags: json!({}),
            title: title.clone(),
            parent: Some(parent.id),
            initial_message: None,
        }
    };
    let workspace = spec
        .workspace
        .get("working_dir")
        .cloned()
        .unwrap_or(Value::Null);
    let (child, _) = create(inner, spec);
    let response = json!({
        "conversation_id": child.id.to_string(),
        "parent_conversation_id": parent.id.to_string(),
        "status": "idle",
        "title": title,
        "url": null,
        "workspace": workspace,
        "isolation": isolation,
    });
    send_message(
        inner,
        &child,
        &[json!({"type": "text", "text": task})],
        true,
    );
    response
}

/// What a real server does at startup with conversations persisted as `running`: they were
/// interrupted by the crash, so they become `error`, and a tool call left without a result
/// gets an `AgentErrorEvent`.
pub(crate) fn recover_after_restart(inner: &Arc<Inner>) {
    let cfg = &inner.cfg;
    for conv in inner.store.all() {
        let mut st = conv.lock();
        if st.status != Status::Running {
            continue;
        }
        st.run = None;
        st.rerun_requested = false;
        st.set_status(cfg, Status::Error);
        if let Some((action_id, tool, call)) = st.pending_action.clone() {
            let ev = st.build(
                cfg,
                "AgentErrorEvent",
                "agent",
                Parent::Id(action_id),
                vec![
                    ("tool_name", json!(tool)),
                    ("tool_call_id", json!(call)),
                    ("error", json!("A restart occurred while this tool was in progress. This may indicate a fatal memory error or system crash. The tool execution was interrupted and did not complete.")),
                    ("classification", json!({"kind": "internal", "retryable": false, "user_action": "none"})),
                ],
            );
            st.append(cfg, ev);
        }
    }
}
