//! Start nestor in-process for integration tests, in front of fake agent-servers.
#![allow(dead_code)]

use std::path::Path;

use nestor_aggregator::config::{Config, Overrides};
use nestor_aggregator::{app, server, AppState};
use nestor_test_support::fake_server::{FakeAgentServer, FakeConfig};

pub const CLIENT_KEY: &str = "client-key-0123456789";

pub struct TestNestor {
    pub url: String,
    pub state: AppState,
    pub dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl TestNestor {
    pub fn client(&self) -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().unwrap()
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client().get(format!("{}{path}", self.url)).header("X-Session-API-Key", CLIENT_KEY)
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client().post(format!("{}{path}", self.url)).header("X-Session-API-Key", CLIENT_KEY)
    }

    pub fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.client().delete(format!("{}{path}", self.url)).header("X-Session-API-Key", CLIENT_KEY)
    }

    pub fn patch(&self, path: &str) -> reqwest::RequestBuilder {
        self.client().patch(format!("{}{path}", self.url)).header("X-Session-API-Key", CLIENT_KEY)
    }

    /// Vanish like a nestor killed with SIGKILL: stop serving, skip every shutdown step.
    pub fn kill(self) -> tempfile::TempDir {
        self.task.abort();
        self.dir
    }

    /// Stop serving (graceful).
    pub async fn stop(self) -> tempfile::TempDir {
        self.state.shutdown.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(30), self.task).await;
        self.dir
    }
}

/// A fake agent-server with its own key.
pub async fn fake(n: usize) -> FakeAgentServer {
    FakeAgentServer::start(FakeConfig::with_key(format!("downstream-key-{n}-abcdefgh")))
        .await
        .expect("fake agent-server starts")
}

/// The `[[provisioner.existing.servers]]` entries for `fakes`.
pub fn existing_entries(fakes: &[&FakeAgentServer]) -> String {
    fakes
        .iter()
        .map(|f| {
            format!(
                "[[provisioner.existing.servers]]\nurl = \"{}\"\napi_key = \"{}\"\n",
                f.url(),
                f.config().session_api_key.clone().unwrap_or_default()
            )
        })
        .collect()
}

/// nestor on the `existing` provisioner over `fakes`, with `extra` top-level TOML.
pub async fn nestor_existing(fakes: &[&FakeAgentServer], extra: &str) -> TestNestor {
    let dir = tempfile::tempdir().unwrap();
    start_in(dir, fakes, extra).await
}

/// Start (again) with the state in `dir`.
pub async fn start_in(dir: tempfile::TempDir, fakes: &[&FakeAgentServer], extra: &str) -> TestNestor {
    let toml = format!(
        "bind = \"127.0.0.1:0\"\nsession_api_keys = [\"{CLIENT_KEY}\"]\nstate_dir = \"{}\"\n{extra}\n[provisioner]\nkind = \"existing\"\n[provisioner.existing]\nhealth_interval_secs = 0.2\n{}",
        dir.path().join("state").display(),
        existing_entries(fakes)
    );
    start_with_toml(dir, &toml).await
}

pub async fn start_with_toml(dir: tempfile::TempDir, toml: &str) -> TestNestor {
    // Listen first, so the configuration names the real port (downstreams call back there).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let url = format!("http://{addr}");
    let toml = toml.replace("bind = \"127.0.0.1:0\"", &format!("bind = \"{addr}\""));
    let path = dir.path().join("nestor.toml");
    std::fs::write(&path, toml).unwrap();
    let cfg = Config::load(Some(Path::new(&path)), &Overrides::default()).expect("config loads");
    let keys = app::resolve_keys(&cfg).unwrap();
    let state = AppState::start(cfg, keys).await.expect("nestor starts");
    let s2 = state.clone();
    let task = tokio::spawn(async move {
        let _ = server::serve(s2, listener).await;
    });
    TestNestor { url, state, dir, task }
}

/// A minimal valid create body.
pub fn create_body(id: Option<&str>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "agent": {"kind": "Agent", "llm": {"usage_id": "agent", "model": "openai/fake", "base_url": "http://127.0.0.1:9/v1", "api_key": "x"}, "tools": [{"name": "terminal"}]},
        "workspace": {"kind": "LocalWorkspace", "working_dir": "/tmp/w"},
        "autotitle": false
    });
    if let Some(id) = id {
        v["conversation_id"] = serde_json::Value::String(id.into());
    }
    v
}

/// The fake agent-server binary, next to the test executables (`cargo test --workspace`
/// builds it; a test run of this crate alone builds it here, once). It takes the real
/// server's `--host/--port` flags, `SESSION_API_KEY` and `OH_CONVERSATIONS_PATH`, so the
/// process provisioner runs it as a child.
pub fn fake_bin() -> std::path::PathBuf {
    static BUILD: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join("nestor-fake-agent-server");
    if !p.exists() {
        BUILD.call_once(|| {
            let status = std::process::Command::new(env!("CARGO"))
                .args(["build", "-q", "-p", "nestor-test-support", "--bin", "nestor-fake-agent-server"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("cargo runs");
            assert!(status.success(), "building nestor-fake-agent-server failed");
        });
    }
    assert!(p.exists(), "{} not built: run `cargo build -p nestor-test-support`", p.display());
    p
}

/// Processes whose working directory is under `dir` (the process provisioner runs each child
/// in its conversation's directory).
pub fn pids_under(dir: &std::path::Path) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) {
            if cwd.starts_with(dir) {
                out.push(pid);
            }
        }
    }
    out
}
