//! The environment every containerised agent-server gets (docker containers and kubernetes
//! pods alike): one definition, so the two backends (and the benchmarks that start the image
//! the plain way) cannot drift apart.

/// Environment of every containerised agent-server (running.md): state under the volume at
/// `/workspace`, no browser or VS Code, the local LiteLLM cost map (else +7-10 s offline),
/// UTC timestamps.
///
/// `OH_LEASE_TTL_SECONDS=0`: no conversation ownership leases. A lease guards against two
/// agent-servers sharing one conversation store; here one volume belongs to one container or
/// pod, ever. With leases on, a container that died (`docker kill`, OOM, a pod's container
/// restart) and is started again cannot recover its interrupted run for the lease's 45 s:
/// the lease names the same host (the container's hostname) and the same pid (a fresh pid
/// namespace numbers the same way), which the agent-server takes for itself, alive — the run
/// stayed `running` and the client waited (tests/e2e/test_docker_lifecycle.py,
/// `test_docker_kill_mid_run`).
pub const BASE_ENV: &[(&str, &str)] = &[
    ("HOME", "/workspace"),
    ("OH_CONVERSATIONS_PATH", "/workspace/conversations"),
    ("OH_BASH_EVENTS_DIR", "/workspace/bash_events"),
    ("OH_PERSISTENCE_DIR", "/workspace/.openhands"),
    ("OH_WORKSPACE_PATH", WORKSPACE_DIR),
    ("LITELLM_LOCAL_MODEL_COST_MAP", "True"),
    ("OH_PRELOAD_TOOLS", "false"),
    ("OH_ENABLE_BROWSER", "false"),
    ("OH_ENABLE_VSCODE", "false"),
    ("OH_ENABLE_VNC", "false"),
    ("OPENHANDS_SUPPRESS_BANNER", "1"),
    ("PYTHONUNBUFFERED", "1"),
    ("TZ", "UTC"),
    ("OH_LEASE_TTL_SECONDS", "0"),
];

/// The conversation's working directory inside its container or pod.
pub const WORKSPACE_DIR: &str = "/workspace/project";

/// Where the agent-server keeps its state when the conversation is persisted
/// (`[workspace_storage]`): one tree, `/workspace/state`, beside the project, so the two
/// persisted trees are sibling directories of the volume (a restore swaps a directory; the
/// volume's root is a mount point and cannot be swapped). `HOME` stays `/workspace` and is
/// not persisted. Used by the docker (bind-mounted data) and kubernetes (pod volume) backends.
pub const PERSISTED_STATE_ENV: &[(&str, &str)] = &[
    ("OH_CONVERSATIONS_PATH", "/workspace/state/conversations"),
    ("OH_BASH_EVENTS_DIR", "/workspace/state/bash_events"),
    ("OH_PERSISTENCE_DIR", "/workspace/state/persistence"),
];
/// The persisted trees under the volume: the agent-server's state and the project.
pub const PERSISTED_STATE_DIR: &str = "state";
pub const PERSISTED_PROJECT_DIR: &str = "project";
/// Created in a fresh (or restored) state tree before the agent-server starts.
pub const PERSISTED_STATE_SUBDIRS: [&str; 3] = ["conversations", "bash_events", "persistence"];
