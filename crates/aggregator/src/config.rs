//! nestor's configuration: a TOML file, overridden by environment, overridden by flags.
//!
//! ```toml
//! bind = "127.0.0.1:8000"
//! session_api_keys = ["secret"]        # none: no auth, and only a loopback bind is allowed
//! state_dir = "/var/lib/nestor"
//! [provisioner]
//! kind = "existing"                    # "process" (default) | "existing" | "docker" | "kubernetes" | "pool"
//! [[provisioner.existing.servers]]
//! url = "http://127.0.0.1:9101"
//! api_key = "k1"
//! [provisioner.process]
//! agent_server = "/path/to/bin/agent-server"
//! [provisioner.docker]                 # see nestor_provisioner::docker for every setting
//! image = "nestor/agent-server:1.58.2"
//! [provisioner.pool]                   # warm servers of `backend` (its settings above); nestor_provisioner::pool
//! backend = "process"                  # "process" | "docker"
//! min_idle = 2
//! max_size = 32
//! max_age_secs = 3600
//! ```
//!
//! Environment: every key as `NESTOR_<KEY>` (nested keys joined by `__`, e.g.
//! `NESTOR_PROVISIONER__KIND=existing`); lists as TOML/JSON (`["a","b"]`) or, for
//! `session_api_keys`, comma-separated. The agent-server's own `SESSION_API_KEY` is honoured
//! as the client key, so a deployment's existing environment keeps working.

use std::net::SocketAddr;
use std::path::PathBuf;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use nestor_core::SessionKey;
use nestor_provisioner::docker::DockerConfig;
use nestor_provisioner::kubernetes::KubernetesConfig;
use nestor_provisioner::existing::ExistingConfig;
use nestor_provisioner::process::ProcessConfig;
use serde::{Deserialize, Deserializer, Serialize};

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub bind: SocketAddr,
    /// Client keys. Absent: nestor generates one (kept in `state_dir`) and prints it once.
    /// Empty: no authentication, and only a loopback bind is allowed.
    #[serde(default, deserialize_with = "keys")]
    pub session_api_keys: Option<Vec<SessionKey>>,
    /// Users and their keys (`[[users]] id = "alice" session_api_keys = ["…"]`); the
    /// top-level `session_api_keys` belong to the user `default`.
    #[serde(default)]
    pub users: Vec<crate::auth::UserConfig>,
    /// nestor's own state (catalog, process downstreams, generated key).
    pub state_dir: PathBuf,
    /// Largest request body accepted, in bytes (413 beyond).
    pub max_body_bytes: u64,
    /// Seconds a proxied request may wait for its downstream's response headers.
    pub upstream_timeout_secs: f64,
    /// Seconds a request waits for its conversation's downstream to become ready.
    pub ready_timeout_secs: f64,
    /// `human` or `json` log lines.
    pub log_format: LogFormat,
    #[serde(default)]
    pub catalog: CatalogSection,
    #[serde(default)]
    pub websocket: WebsocketSection,
    #[serde(default)]
    pub http: HttpSection,
    #[serde(default)]
    pub admission: crate::lifecycle::AdmissionConfig,
    #[serde(default)]
    pub lifecycle: crate::lifecycle::LifecycleConfig,
    /// Browser origins allowed by CORS, besides localhost (like the agent-server's setting).
    #[serde(default)]
    pub allow_cors_origins: Vec<String>,
    /// A regular expression of allowed origins (whole-origin match).
    #[serde(default)]
    pub allow_cors_origin_regex: Option<String>,
    /// Key that encrypts stored secrets at rest (or `NESTOR_SECRET_KEY`). Absent: one is
    /// generated into `state_dir/secret_key` (fine on a laptop; on a server, configure it and
    /// keep it apart from the state). nestor refuses to start if stored secrets exist that no
    /// configured key decrypts.
    #[serde(default)]
    pub secret_key: Option<SessionKey>,
    /// Keys secrets were saved with before a rotation (still read, re-encrypted at start).
    #[serde(default)]
    pub previous_secret_keys: Vec<SessionKey>,
    /// How downstreams reach nestor (secret lookups, webhooks). Default: `http://<bind>`, with
    /// `127.0.0.1` for an unspecified address.
    #[serde(default)]
    pub internal_url: Option<String>,
    /// An extra listener for downstreams only (secret lookups and webhooks; no client API),
    /// e.g. on the Docker bridge (`"172.17.0.1:8000"`) so containers can reach nestor while
    /// `bind` stays on loopback.
    #[serde(default)]
    pub internal_bind: Option<SocketAddr>,
    /// Webhooks nestor re-emits what its downstreams report to (the agent-server's shape).
    #[serde(default)]
    pub webhooks: Vec<crate::webhooks::WebhookSpec>,
    /// Conversations' workspaces and agent-server state kept in S3-compatible object storage
    /// (`[workspace_storage]`, see nestor_workspace_store::config and crate::persistence), so a
    /// conversation resumes on a fresh downstream. Absent: files live on this host only.
    #[serde(default)]
    pub workspace_storage: Option<nestor_workspace_store::WorkspaceStorageConfig>,
    /// Offer every stored secret to new conversations (as lookups, never values).
    #[serde(default = "yes")]
    pub inject_stored_secrets: bool,
    /// Who may read `GET /metrics`: `public` (default; Prometheus style, no secrets in it),
    /// `key` (the session key, like `/api/*`) or `off`.
    #[serde(default)]
    pub metrics: MetricsAccess,
    pub provisioner: ProvisionerSection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogSection {
    /// A downstream's conversation list is re-read on search when older than this.
    #[serde(default = "default_staleness_ms")]
    pub max_staleness_ms: u64,
    /// ... unless the downstream reports changes by webhook: then after this many seconds.
    #[serde(default = "default_webhook_staleness")]
    pub webhook_staleness_secs: f64,
}

impl Default for CatalogSection {
    fn default() -> Self {
        Self { max_staleness_ms: default_staleness_ms(), webhook_staleness_secs: default_webhook_staleness() }
    }
}

fn default_webhook_staleness() -> f64 {
    60.0
}

fn yes() -> bool {
    true
}

fn default_staleness_ms() -> u64 {
    1000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MetricsAccess {
    #[default]
    Public,
    Key,
    Off,
}

/// `[http]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Forward plain conversation requests on the fast path (crate::fastpath): nestor's own
    /// HTTP/1 reading and writing, no router. Off: every request goes through the router.
    #[serde(default = "default_true")]
    pub fast_path: bool,
    /// Threads that serve client connections on the fast path, each with an event loop of
    /// its own (crate::io_threads). Unset: one per CPU. 0: serve them on the shared runtime.
    #[serde(default)]
    pub io_threads: Option<usize>,
    /// Longest time (µs) an I/O thread keeps checking its sockets after activity before it
    /// sleeps (crate::io_threads::BusyPoll: adaptive, it polls only while that pays, and
    /// pauses while the thread is busy). 0: never.
    #[serde(default = "default_busy_poll_us")]
    pub busy_poll_us: u64,
}

fn default_busy_poll_us() -> u64 {
    100
}

impl HttpSection {
    /// The longest busy-poll window of an I/O thread.
    pub fn busy_poll(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.busy_poll_us)
    }

    /// The number of I/O threads to start (0: none).
    pub fn io_thread_count(&self) -> usize {
        if !self.fast_path {
            return 0;
        }
        self.io_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_AUTO_IO_THREADS))
    }
}

/// Most I/O threads started when `[http] io_threads` is unset (a large machine's hundred
/// cores are better spent on the rest of nestor and its downstreams).
const MAX_AUTO_IO_THREADS: usize = 8;

impl Default for HttpSection {
    fn default() -> Self {
        Self { fast_path: true, io_threads: None, busy_poll_us: default_busy_poll_us() }
    }
}

/// `[websocket]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebsocketSection {
    /// Seconds a lost downstream socket may take to come back while the client waits
    /// (then the client is closed with 1012, which clients retry).
    #[serde(default = "default_resume_deadline")]
    pub resume_deadline_secs: f64,
    /// Bytes queued for one client before it is dropped as a slow consumer (behind the
    /// message being written: a single larger frame is still delivered).
    #[serde(default = "default_max_pending")]
    pub max_pending_bytes: usize,
    /// Read buffer of the downstream leg of a proxied socket (where events stream in),
    /// bytes. Larger frames are still read whole, in several reads. (The client leg, where
    /// clients send little, reads with 512 bytes.)
    #[serde(default = "default_read_buffer")]
    pub read_buffer_bytes: usize,
    /// Accept permessage-deflate from clients that offer it (browsers always do). Default
    /// on: events are JSON that compresses well, and an idle deflate socket costs little.
    #[serde(default = "default_true")]
    pub permessage_deflate: bool,
    /// Offer permessage-deflate to downstreams. Default off: downstream hops are local,
    /// where compressing costs CPU on both ends and saves nothing that matters.
    #[serde(default)]
    pub downstream_permessage_deflate: bool,
}

impl Default for WebsocketSection {
    fn default() -> Self {
        Self {
            resume_deadline_secs: default_resume_deadline(),
            max_pending_bytes: default_max_pending(),
            read_buffer_bytes: default_read_buffer(),
            permessage_deflate: true,
            downstream_permessage_deflate: false,
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_read_buffer() -> usize {
    nestor_ws_proxy::ProxyConfig::default().read_buffer_size
}

fn default_resume_deadline() -> f64 {
    120.0
}

fn default_max_pending() -> usize {
    16 << 20
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProvisionerKind {
    #[default]
    Process,
    Existing,
    Docker,
    Kubernetes,
    Pool,
}

impl std::str::FromStr for ProvisionerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "process" => Ok(Self::Process),
            "existing" => Ok(Self::Existing),
            "docker" => Ok(Self::Docker),
            "kubernetes" => Ok(Self::Kubernetes),
            "pool" => Ok(Self::Pool),
            other => Err(format!(
                "unknown provisioner kind {other:?} (expected \"process\", \"existing\", \"docker\", \"kubernetes\" or \"pool\")"
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionerSection {
    pub kind: ProvisionerKind,
    #[serde(default)]
    pub existing: ExistingConfig,
    #[serde(default)]
    pub process: ProcessConfig,
    #[serde(default)]
    pub docker: DockerConfig,
    /// `[provisioner.kubernetes]`: see nestor_provisioner::kubernetes and deploy/kubernetes.
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    /// `[provisioner.pool]`: warm servers of the `process`, `docker` or `kubernetes` backend.
    #[serde(default)]
    pub pool: nestor_provisioner::pool::PoolConfig,
}

impl ProvisionerSection {
    /// Whether downstreams are Docker containers (they reach nestor through the bridge).
    pub fn runs_docker(&self) -> bool {
        match self.kind {
            ProvisionerKind::Docker => true,
            ProvisionerKind::Pool => self.pool.backend == nestor_provisioner::pool::PoolBackend::Docker,
            _ => false,
        }
    }
}

/// `session_api_keys` as a list, or one comma-separated string (handy in an environment).
fn keys<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<SessionKey>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Keys {
        One(String),
        Many(Vec<String>),
    }
    let raw = match Keys::deserialize(d)? {
        Keys::One(s) => s.split(',').map(|k| k.trim().to_owned()).collect(),
        Keys::Many(v) => v,
    };
    Ok(Some(raw.into_iter().filter(|k| !k.is_empty()).map(SessionKey::new).collect()))
}

/// Top-level keys of [`Config`] (what `NESTOR_<KEY>` may set).
const TOP_LEVEL_KEYS: &[&str] = &[
    "bind",
    "session_api_keys",
    "users",
    "state_dir",
    "max_body_bytes",
    "upstream_timeout_secs",
    "ready_timeout_secs",
    "log_format",
    "catalog",
    "websocket",
    "http",
    "admission",
    "lifecycle",
    "metrics",
    "allow_cors_origins",
    "allow_cors_origin_regex",
    "secret_key",
    "previous_secret_keys",
    "internal_url",
    "inject_stored_secrets",
    "internal_bind",
    "webhooks",
    "workspace_storage",
    "provisioner",
];

/// Where nestor keeps state without a configured `state_dir`.
pub fn default_state_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("nestor");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/state/nestor")
}

/// The agent-server `scripts/setup-agent-server.sh` installs (same cache rule as the script).
pub fn default_agent_server() -> PathBuf {
    let cache = std::env::var_os("NESTOR_CACHE_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()).map(|x| PathBuf::from(x).join("nestor")))
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
            home.join(".cache/nestor")
        });
    cache.join(format!("agent-server-{}/venv/bin/agent-server", nestor_core::AGENT_SERVER_API_VERSION))
}

/// Command-line overrides (highest precedence).
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_api_keys: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provisioner: Option<ProvisionerOverride>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct ProvisionerOverride {
    pub kind: ProvisionerKind,
}

#[derive(Serialize)]
struct Defaults {
    bind: &'static str,
    state_dir: PathBuf,
    max_body_bytes: u64,
    upstream_timeout_secs: f64,
    ready_timeout_secs: f64,
    log_format: LogFormat,
    provisioner: DefaultProvisioner,
}

#[derive(Serialize)]
struct DefaultProvisioner {
    kind: ProvisionerKind,
}

/// The largest number of seconds a setting may hold (~31 years): anything larger (or
/// infinite) would panic where it becomes a `Duration` or a deadline.
pub const MAX_CONFIG_SECS: f64 = 1e9;

/// A configuration error, for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Load: defaults < `file` < environment (`NESTOR_*`, `SESSION_API_KEY`) < `overrides`.
    pub fn load(file: Option<&std::path::Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Defaults {
            bind: "127.0.0.1:8000",
            state_dir: default_state_dir(),
            max_body_bytes: 100 << 20,
            upstream_timeout_secs: 660.0,
            ready_timeout_secs: 120.0,
            log_format: LogFormat::Human,
            provisioner: DefaultProvisioner { kind: ProvisionerKind::Process },
        }));
        if let Some(f) = file {
            if !f.is_file() {
                return Err(ConfigError::Invalid(format!("config file {} does not exist", f.display())));
            }
            fig = fig.merge(Toml::file_exact(f));
        }
        // The agent-server's own variable, below nestor's explicit ones.
        if let Ok(k) = std::env::var("SESSION_API_KEY") {
            if !k.is_empty() {
                fig = fig.merge(Serialized::default("session_api_keys", vec![k]));
            }
        }
        fig = fig
            .merge(
                // Only configuration keys: other NESTOR_* variables belong to tools and scripts
                // (NESTOR_LOG, NESTOR_CACHE_DIR, …).
                Env::prefixed("NESTOR_")
                    .filter(|k| {
                        let top = k.as_str().split("__").next().unwrap_or("").to_ascii_lowercase();
                        TOP_LEVEL_KEYS.contains(&top.as_str())
                    })
                    .split("__"),
            )
            .merge(Serialized::defaults(overrides));
        let cfg: Config = fig.extract().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut ids = std::collections::HashSet::new();
        for u in &self.users {
            if u.id.is_empty() || !u.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(ConfigError::Invalid(format!("users: id {:?} must be non-empty letters, digits, '-' or '_'", u.id)));
            }
            if !ids.insert(u.id.clone()) {
                return Err(ConfigError::Invalid(format!("users: {:?} is listed twice", u.id)));
            }
            if u.session_api_keys.is_empty() {
                return Err(ConfigError::Invalid(format!("users: {:?} has no session_api_keys", u.id)));
            }
        }
        let open = self.session_api_keys.as_ref().is_some_and(|k| k.is_empty()) && self.users.is_empty();
        if open && !self.bind.ip().is_loopback() {
            return Err(ConfigError::Invalid(format!(
                "refusing to listen on {} with an empty session_api_keys (no authentication): set a key (session_api_keys, NESTOR_SESSION_API_KEYS, SESSION_API_KEY or --session-api-key) or bind to a loopback address",
                self.bind
            )));
        }
        for (what, v) in [
            ("upstream_timeout_secs", self.upstream_timeout_secs),
            ("ready_timeout_secs", self.ready_timeout_secs),
            ("websocket.resume_deadline_secs", self.websocket.resume_deadline_secs),
        ] {
            if !(v > 0.0 && v <= MAX_CONFIG_SECS) {
                return Err(ConfigError::Invalid(format!("{what} must be a positive number of seconds")));
            }
        }
        // Seconds that may be 0 (or absent, or negative: read as 0), but must make a usable
        // `Duration`: building one from infinity or past ~1.8e19 s panics, and so does adding
        // one past ~9.2e18 s to an `Instant` (found by tests/fuzz.rs: a
        // `webhook_staleness_secs = inf` made every search request panic).
        let mut optional = vec![("catalog.webhook_staleness_secs", self.catalog.webhook_staleness_secs)];
        optional.extend(self.lifecycle.idle_stop_secs.map(|v| ("lifecycle.idle_stop_secs", v)));
        for w in &self.webhooks {
            optional.push(("webhooks.flush_delay", w.flush_delay));
            optional.push(("webhooks.retry_delay", w.retry_delay));
        }
        for (what, v) in optional {
            if v.max(0.0) > MAX_CONFIG_SECS {
                return Err(ConfigError::Invalid(format!("{what} must be a number of seconds, not {v}")));
            }
        }
        if let Some(u) = &self.internal_url {
            nestor_core::Endpoint::parse(u, None).map_err(|e| ConfigError::Invalid(format!("internal_url: {e}")))?;
        }
        if let Some(r) = &self.allow_cors_origin_regex {
            regex::Regex::new(r).map_err(|e| ConfigError::Invalid(format!("allow_cors_origin_regex: {e}")))?;
        }
        if self.max_body_bytes == 0 {
            return Err(ConfigError::Invalid("max_body_bytes must be positive".into()));
        }
        if let Some(ws) = &self.workspace_storage {
            ws.validate().map_err(|e| ConfigError::Invalid(e.to_string()))?;
            if !matches!(self.provisioner.kind, ProvisionerKind::Process | ProvisionerKind::Docker | ProvisionerKind::Kubernetes) {
                return Err(ConfigError::Invalid(format!(
                    "workspace_storage works with the process, docker and kubernetes provisioners, not {:?} (nestor, or the pod's sync containers, must reach the conversations' files)",
                    self.provisioner.kind
                )));
            }
            if self.provisioner.kind == ProvisionerKind::Kubernetes {
                // Checked here too (not only at start) so a bad section fails `nestor serve`
                // before any API call.
                let k = self.provisioner.kubernetes.validate().map_err(|e| ConfigError::Invalid(e.to_string()))?;
                k.workspace_sync.validate(&k, ws).map_err(|e| ConfigError::Invalid(e.to_string()))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
// figment::Jail's closures return figment::Error, whatever its size.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use std::io::Write;

    // figment's Jail isolates environment changes between tests.
    #[test]
    fn the_documented_keys_work_exactly_as_written() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            let mut f = std::fs::File::create(jail.directory().join("nestor.toml")).unwrap();
            f.write_all(
                br#"
bind = "127.0.0.1:8000"
session_api_keys = ["secret"]
state_dir = "/var/lib/nestor"
[provisioner]
kind = "existing"
[[provisioner.existing.servers]]
url = "http://127.0.0.1:9101"
api_key = "k1"
[provisioner.process]
agent_server = "/path/to/bin/agent-server"
"#,
            )
            .unwrap();
            let c = Config::load(Some(&jail.directory().join("nestor.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.bind.to_string(), "127.0.0.1:8000");
            assert_eq!(c.session_api_keys, Some(vec![SessionKey::new("secret")]));
            assert_eq!(c.state_dir, PathBuf::from("/var/lib/nestor"));
            assert_eq!(c.provisioner.kind, ProvisionerKind::Existing);
            assert_eq!(c.provisioner.existing.servers[0].url, "http://127.0.0.1:9101");
            assert_eq!(c.provisioner.existing.servers[0].api_key, Some(SessionKey::new("k1")));
            assert_eq!(c.provisioner.process.agent_server, Some(PathBuf::from("/path/to/bin/agent-server")));
            Ok(())
        });
    }

    #[test]
    fn kubernetes_section_and_kind() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "k.toml",
                "[provisioner]\nkind = \"kubernetes\"\n[provisioner.kubernetes]\nimage = \"nestor/agent-server:1.58.2\"\nnamespace = \"nestor-agents\"\nstorage_class = \"fast\"\nruntime_class_name = \"gvisor\"\n",
            )?;
            let c = Config::load(Some(&jail.directory().join("k.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.provisioner.kind, ProvisionerKind::Kubernetes);
            let k = &c.provisioner.kubernetes;
            assert_eq!(k.namespace.as_deref(), Some("nestor-agents"));
            assert_eq!(k.runtime_class_name.as_deref(), Some("gvisor"));
            assert_eq!("kubernetes".parse::<ProvisionerKind>(), Ok(ProvisionerKind::Kubernetes));
            jail.set_env("NESTOR_PROVISIONER__KUBERNETES__INSTANCE", "prod");
            let c = Config::load(Some(&jail.directory().join("k.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.provisioner.kubernetes.instance.as_deref(), Some("prod"));
            Ok(())
        });
    }

    #[test]
    fn docker_section_and_kind() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "d.toml",
                "[provisioner]\nkind = \"docker\"\n[provisioner.docker]\nimage = \"nestor/agent-server:1.58.2\"\nmemory = \"2g\"\ncpus = 1.5\n[provisioner.docker.env]\nLLM_MODEL = \"x\"\n",
            )?;
            jail.set_env("NESTOR_PROVISIONER__DOCKER__PIDS_LIMIT", "256");
            let c = Config::load(Some(&jail.directory().join("d.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.provisioner.kind, ProvisionerKind::Docker);
            let d = &c.provisioner.docker;
            assert_eq!(d.image.as_deref(), Some("nestor/agent-server:1.58.2"));
            assert_eq!(d.pids_limit, Some(256));
            let s = d.validate(None).unwrap();
            assert_eq!((s.memory, s.nano_cpus), (Some(2 << 30), Some(1_500_000_000)));
            assert_eq!("docker".parse::<ProvisionerKind>(), Ok(ProvisionerKind::Docker));
            Ok(())
        });
    }

    #[test]
    fn workspace_storage_section() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "w.toml",
                "[workspace_storage]\nbucket = \"nestor-ws\"\nendpoint = \"http://127.0.0.1:9000\"\non_delete = \"purge\"\n[workspace_storage.user_quota]\nmax_bytes = 1000\n[admission]\nmax_running_per_user = 2\n",
            )?;
            jail.set_env("NESTOR_WORKSPACE_STORAGE__PUSH_INTERVAL_SECS", "5");
            let c = Config::load(Some(&jail.directory().join("w.toml")), &Overrides::default()).unwrap();
            let ws = c.workspace_storage.as_ref().unwrap();
            assert_eq!(ws.bucket, "nestor-ws");
            assert_eq!(ws.push_interval_secs, 5);
            assert_eq!(ws.on_delete, nestor_workspace_store::OnDelete::Purge);
            assert_eq!(ws.user_quota.max_bytes, Some(1000));
            assert_eq!(c.admission.max_running_per_user, Some(2));
            jail.create_file("bad.toml", "[workspace_storage]\nbucket = \"Bad_Bucket\"\n")?;
            let e = Config::load(Some(&jail.directory().join("bad.toml")), &Overrides::default()).unwrap_err().to_string();
            assert!(e.contains("workspace_storage.bucket"), "{e}");
            jail.create_file("ex.toml", "[workspace_storage]\nbucket = \"b-1\"\n[provisioner]\nkind = \"existing\"\n")?;
            let e = Config::load(Some(&jail.directory().join("ex.toml")), &Overrides::default()).unwrap_err().to_string();
            assert!(e.contains("process, docker and kubernetes"), "{e}");
            jail.create_file(
                "k.toml",
                "[workspace_storage]\nbucket = \"b-1\"\n[provisioner]\nkind = \"kubernetes\"\n[provisioner.kubernetes]\nimage = \"img:1\"\n[provisioner.kubernetes.workspace_sync]\nport = 8000\n",
            )?;
            let e = Config::load(Some(&jail.directory().join("k.toml")), &Overrides::default()).unwrap_err().to_string();
            assert!(e.contains("workspace_sync.port"), "{e}");
            jail.create_file(
                "k2.toml",
                "[workspace_storage]\nbucket = \"b-1\"\n[provisioner]\nkind = \"kubernetes\"\n[provisioner.kubernetes]\nimage = \"img:1\"\n[provisioner.kubernetes.workspace_sync]\nimage = \"nestor:1\"\ncredentials_secret = \"s3\"\n",
            )?;
            let c = Config::load(Some(&jail.directory().join("k2.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.provisioner.kubernetes.workspace_sync.credentials_secret.as_deref(), Some("s3"));
            Ok(())
        });
    }

    #[test]
    fn pool_section_and_kind() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file(
                "p.toml",
                "[provisioner]\nkind = \"pool\"\n[provisioner.pool]\nbackend = \"docker\"\nmin_idle = 4\nmax_size = 10\nmax_age_secs = 600\n[provisioner.docker]\nimage = \"nestor/agent-server:1.58.2\"\n",
            )?;
            jail.set_env("NESTOR_PROVISIONER__POOL__MIN_IDLE", "3");
            let c = Config::load(Some(&jail.directory().join("p.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.provisioner.kind, ProvisionerKind::Pool);
            let p = &c.provisioner.pool;
            assert_eq!((p.backend, p.min_idle, p.max_size), (nestor_provisioner::pool::PoolBackend::Docker, 3, 10));
            assert_eq!(p.max_age_secs, 600.0);
            assert!(c.provisioner.runs_docker());
            assert_eq!("pool".parse::<ProvisionerKind>(), Ok(ProvisionerKind::Pool));
            jail.create_file("d.toml", "[provisioner]\nkind = \"pool\"\n")?;
            let c = Config::load(Some(&jail.directory().join("d.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.provisioner.pool.backend, nestor_provisioner::pool::PoolBackend::Process);
            assert!(!c.provisioner.runs_docker());
            Ok(())
        });
    }

    #[test]
    fn defaults_without_any_config() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            let c = Config::load(None, &Overrides::default()).unwrap();
            assert_eq!(c.bind.to_string(), "127.0.0.1:8000");
            assert_eq!(c.provisioner.kind, ProvisionerKind::Process);
            assert!(c.session_api_keys.is_none());
            Ok(())
        });
    }

    #[test]
    fn environment_overrides_file_and_flags_override_environment() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.create_file("n.toml", "bind = \"127.0.0.1:1\"\n[provisioner]\nkind = \"process\"\n")?;
            jail.set_env("NESTOR_BIND", "127.0.0.1:2");
            jail.set_env("NESTOR_PROVISIONER__KIND", "existing");
            jail.set_env("NESTOR_SESSION_API_KEYS", "a, b");
            jail.set_env("NESTOR_PROVISIONER__EXISTING__SERVERS", r#"[{url="http://127.0.0.1:5"}]"#);
            jail.set_env("NESTOR_LOG", "debug");
            jail.set_env("NESTOR_AGENT_SERVER_BIN", "/x");
            let c = Config::load(Some(&jail.directory().join("n.toml")), &Overrides::default()).unwrap();
            assert_eq!(c.bind.port(), 2);
            assert_eq!(c.provisioner.kind, ProvisionerKind::Existing);
            assert_eq!(c.session_api_keys, Some(vec![SessionKey::new("a"), SessionKey::new("b")]));
            assert_eq!(c.provisioner.existing.servers.len(), 1);
            let o = Overrides {
                bind: Some("127.0.0.1:3".into()),
                session_api_keys: Some(vec!["c".into()]),
                provisioner: Some(ProvisionerOverride { kind: ProvisionerKind::Process }),
                ..Default::default()
            };
            let c = Config::load(Some(&jail.directory().join("n.toml")), &o).unwrap();
            assert_eq!(c.bind.port(), 3);
            assert_eq!(c.session_api_keys, Some(vec![SessionKey::new("c")]));
            assert_eq!(c.provisioner.kind, ProvisionerKind::Process);
            Ok(())
        });
    }

    #[test]
    fn io_threads_and_busy_polling_are_configurable() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            let c = Config::load(None, &Overrides::default()).unwrap();
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            assert_eq!(c.http.io_thread_count(), cpus.min(MAX_AUTO_IO_THREADS));
            assert_eq!(c.http.busy_poll(), std::time::Duration::from_micros(100));
            jail.set_env("NESTOR_HTTP__IO_THREADS", "3");
            jail.set_env("NESTOR_HTTP__BUSY_POLL_US", "0");
            let c = Config::load(None, &Overrides::default()).unwrap();
            assert_eq!((c.http.io_thread_count(), c.http.busy_poll()), (3, std::time::Duration::ZERO));
            // Without the fast path there is nothing for I/O threads to serve.
            jail.set_env("NESTOR_HTTP__FAST_PATH", "false");
            assert_eq!(Config::load(None, &Overrides::default()).unwrap().http.io_thread_count(), 0);
            Ok(())
        });
    }

    #[test]
    fn agent_server_session_api_key_is_honoured() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            jail.set_env("SESSION_API_KEY", "legacy");
            let c = Config::load(None, &Overrides::default()).unwrap();
            assert_eq!(c.session_api_keys, Some(vec![SessionKey::new("legacy")]));
            jail.set_env("NESTOR_SESSION_API_KEYS", r#"["explicit"]"#);
            let c = Config::load(None, &Overrides::default()).unwrap();
            assert_eq!(c.session_api_keys, Some(vec![SessionKey::new("explicit")]));
            Ok(())
        });
    }

    #[test]
    fn refuses_open_non_loopback_bind_and_bad_values() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            let o = Overrides { bind: Some("0.0.0.0:8000".into()), session_api_keys: Some(vec![]), ..Default::default() };
            let e = Config::load(None, &o).unwrap_err().to_string();
            assert!(e.contains("refusing to listen on 0.0.0.0:8000"), "{e}");
            let o = Overrides { bind: Some("0.0.0.0:8000".into()), session_api_keys: Some(vec!["k".into()]), ..Default::default() };
            assert!(Config::load(None, &o).is_ok());
            jail.create_file("bad.toml", "bnid = \"x\"\n")?;
            let e = Config::load(Some(&jail.directory().join("bad.toml")), &Overrides::default()).unwrap_err().to_string();
            assert!(e.contains("bnid"), "{e}");
            assert!(Config::load(Some(std::path::Path::new("/nonexistent.toml")), &Overrides::default()).is_err());
            Ok(())
        });
    }

    #[test]
    fn refuses_seconds_no_duration_can_hold() {
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            for (file, text) in [
                ("a.toml", "ready_timeout_secs = 1e300\n"),
                ("b.toml", "upstream_timeout_secs = inf\n"),
                ("c.toml", "[catalog]\nwebhook_staleness_secs = inf\n"),
                ("d.toml", "[lifecycle]\nidle_stop_secs = 2e19\n"),
                ("e.toml", "[[webhooks]]\nbase_url = \"http://127.0.0.1:9\"\nretry_delay = 1e20\n"),
            ] {
                jail.create_file(file, text)?;
                let e = Config::load(Some(&jail.directory().join(file)), &Overrides::default()).unwrap_err().to_string();
                assert!(e.contains("seconds"), "{text}: {e}");
            }
            jail.create_file("ok.toml", "ready_timeout_secs = 0.5\n[catalog]\nwebhook_staleness_secs = 0\n[lifecycle]\nidle_stop_secs = 86400\n")?;
            assert!(Config::load(Some(&jail.directory().join("ok.toml")), &Overrides::default()).is_ok());
            Ok(())
        });
    }
}
