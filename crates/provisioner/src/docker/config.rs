//! `[provisioner.docker]`: the settings as written, and their validated form.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::ProvisionError;

/// What to do with running containers when nestor exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnShutdown {
    /// Leave them running; the next nestor re-adopts them without a restart (default: a
    /// nestor upgrade or crash costs the conversations nothing, and the idle policy of the
    /// next nestor stops what nobody uses).
    #[default]
    Keep,
    /// Stop them (their volumes are kept; the next request starts them again).
    Stop,
}

/// A size in bytes, as a number or a docker-style string (`"4g"`, `"512m"`, `"0"` = no limit).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum ByteSize {
    Bytes(u64),
    Text(String),
}

/// `[provisioner.docker]` as written.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DockerConfig {
    /// The agent-server image (required), e.g. the tag `scripts/build-agent-server-image.sh`
    /// prints (`nestor/agent-server:1.58.2`) or the upstream image.
    #[serde(default)]
    pub image: Option<String>,
    /// The engine: `unix:///path` or `tcp://host:port` (plain TCP; TLS engines are not
    /// supported). Default: `$DOCKER_HOST`, else
    /// `unix:///var/run/docker.sock`.
    #[serde(default)]
    pub docker_host: Option<String>,
    /// A user-defined network to attach containers to; nestor then reaches each container at
    /// its address on that network. Default: the default bridge, with port 8000 published on
    /// 127.0.0.1 only (random host port).
    #[serde(default)]
    pub network: Option<String>,
    /// Memory limit (default `"4g"`; `"0"` = none).
    #[serde(default)]
    pub memory: Option<ByteSize>,
    /// CPU limit in cores (default 2; 0 = none).
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Process limit (default 512; 0 = none).
    #[serde(default)]
    pub pids_limit: Option<i64>,
    /// OCI runtime (e.g. `runsc`, `kata-runtime`) when the engine has it. Default: the engine's.
    #[serde(default)]
    pub runtime: Option<String>,
    /// The user the agent-server runs as (default `10001:10001`, the image's `openhands`).
    /// Root (`0`, `root`) is refused.
    #[serde(default)]
    pub user: Option<String>,
    /// Capabilities to add back after `cap-drop ALL` (default none: the agent-server, its
    /// terminal tool and tmux need none as a non-root user).
    #[serde(default)]
    pub cap_add: Vec<String>,
    /// `host:address` entries for `/etc/hosts`. Default `["host.docker.internal:host-gateway"]`
    /// (lets a container reach a service on the host, e.g. a local LLM, via the bridge).
    #[serde(default)]
    pub extra_hosts: Option<Vec<String>>,
    /// Override the image's entrypoint. Default: the image's, which must start the
    /// agent-server on 0.0.0.0:8000 (ours does).
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Arguments after the entrypoint (e.g. `["--host", "0.0.0.0", "--port", "8000"]` for an
    /// image whose entrypoint is the bare agent-server CLI). Default: the image's.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Extra environment for every container (e.g. LLM settings).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Extra labels for every container and volume.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Seconds a container may take from start to its first `/alive` (default 120).
    #[serde(default)]
    pub startup_timeout_secs: Option<f64>,
    /// Seconds between SIGTERM and SIGKILL when stopping a container (default 10).
    #[serde(default)]
    pub stop_timeout_secs: Option<f64>,
    /// Seconds any single Docker API call may take (default 30).
    #[serde(default)]
    pub api_timeout_secs: Option<f64>,
    #[serde(default)]
    pub on_shutdown: OnShutdown,
    /// What this nestor's containers and volumes are labelled with (`[a-z0-9-]`, at most 32).
    /// Default: derived from the state directory, so two nestors sharing an engine never
    /// touch each other's containers and a restarted nestor finds its own.
    #[serde(default)]
    pub instance_id: Option<String>,
    /// Seconds between reconciliation sweeps (default 60).
    #[serde(default)]
    pub sweep_interval_secs: Option<f64>,
    /// A container whose conversation was never created is removed after this many seconds
    /// (default 300).
    #[serde(default)]
    pub provisioning_grace_secs: Option<f64>,
}

/// Environment nestor sets itself; configuring it would break authentication or storage.
const RESERVED_ENV: &[&str] = &[
    "SESSION_API_KEY",
    "OH_SECRET_KEY",
    "OH_CONVERSATIONS_PATH",
    "OH_BASH_EVENTS_DIR",
    "OH_PERSISTENCE_DIR",
    "OH_WORKSPACE_PATH",
    "HOME",
];

/// The validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub image: String,
    pub docker_host: String,
    /// A user network (None: default bridge with a loopback-published port).
    pub network: Option<String>,
    pub memory: Option<i64>,
    pub nano_cpus: Option<i64>,
    pub pids_limit: Option<i64>,
    pub runtime: Option<String>,
    pub user: String,
    pub cap_add: Vec<String>,
    pub extra_hosts: Vec<String>,
    pub entrypoint: Option<Vec<String>>,
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub startup_timeout: Duration,
    pub stop_timeout: Duration,
    pub api_timeout: Duration,
    pub on_shutdown: OnShutdown,
    pub instance_id: Option<String>,
    pub sweep_interval: Duration,
    pub provisioning_grace: Duration,
}

pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";

fn cfg_err(msg: impl Into<String>) -> ProvisionError {
    ProvisionError::Config(msg.into())
}

fn secs(v: Option<f64>, def: f64, what: &str) -> Result<Duration, ProvisionError> {
    let v = v.unwrap_or(def);
    if v.is_finite() && v > 0.0 && v < 1e7 {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(cfg_err(format!("provisioner.docker.{what} must be a positive number of seconds")))
    }
}

/// `"4g"`, `"512m"`, `"1.5g"`, `"100000"`, `"0"` → bytes (docker's units: powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let mut t = s.trim().to_ascii_lowercase();
    if t.len() > 1 && t.ends_with('b') {
        t.pop(); // "512mb" = "512m", "100b" = "100"
    }
    let t = t.as_str();
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("{s:?} is not a size (e.g. \"4g\", \"512m\")"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("{s:?} is not a size (e.g. \"4g\", \"512m\")"));
    }
    Ok((n * mult as f64).round() as u64)
}

/// Docker object names: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
fn valid_instance_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
}

impl DockerConfig {
    /// Check everything and fill in defaults. `env_docker_host` is `$DOCKER_HOST`.
    pub fn validate(&self, env_docker_host: Option<String>) -> Result<Settings, ProvisionError> {
        let image = self.image.clone().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).ok_or_else(|| {
            cfg_err(
                "provisioner.docker.image is required (e.g. the tag scripts/build-agent-server-image.sh prints, nestor/agent-server:1.58.2)",
            )
        })?;
        let docker_host = self
            .docker_host
            .clone()
            .or(env_docker_host)
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_owned());
        if !(docker_host.starts_with("unix://") || docker_host.starts_with("tcp://") || docker_host.starts_with("http://")) {
            return Err(cfg_err(format!(
                "provisioner.docker.docker_host (or DOCKER_HOST) {docker_host:?} must start with unix://, tcp:// or http://"
            )));
        }
        let network = match self.network.as_deref().map(str::trim) {
            None | Some("") | Some("bridge") | Some("default") => None,
            Some("host") => {
                return Err(cfg_err(
                    "provisioner.docker.network = \"host\" is not supported: every container would share the host's network and port 8000 (and reach every loopback service); use the default bridge or a user network",
                ))
            }
            Some("none") => {
                return Err(cfg_err("provisioner.docker.network = \"none\" leaves nestor no way to reach the agent-server"))
            }
            Some(n) if n.starts_with("container:") => {
                return Err(cfg_err("provisioner.docker.network must be a network name, not container:<id>"))
            }
            Some(n) => Some(n.to_owned()),
        };
        let memory = match &self.memory {
            None => Some(4i64 << 30),
            Some(ByteSize::Bytes(b)) => Some(*b as i64),
            Some(ByteSize::Text(t)) => {
                Some(parse_bytes(t).map_err(|e| cfg_err(format!("provisioner.docker.memory: {e}")))? as i64)
            }
        }
        .filter(|b| *b != 0);
        if memory.is_some_and(|m| m < 64 << 20) {
            return Err(cfg_err("provisioner.docker.memory must be at least 64m (or 0 for no limit)"));
        }
        let cpus = self.cpus.unwrap_or(2.0);
        if !cpus.is_finite() || cpus < 0.0 {
            return Err(cfg_err("provisioner.docker.cpus must be a non-negative number"));
        }
        let nano_cpus = Some((cpus * 1e9).round() as i64).filter(|n| *n != 0);
        let pids_limit = self.pids_limit.unwrap_or(512);
        if pids_limit < 0 {
            return Err(cfg_err("provisioner.docker.pids_limit must be positive (or 0 for no limit)"));
        }
        let user = self.user.clone().map(|u| u.trim().to_owned()).unwrap_or_else(|| "10001:10001".to_owned());
        let uid = user.split(':').next().unwrap_or("");
        if uid.is_empty() || uid == "0" || uid == "root" {
            return Err(cfg_err(format!(
                "provisioner.docker.user {user:?}: the agent-server must not run as root in its container"
            )));
        }
        for cap in &self.cap_add {
            let c = cap.trim().to_ascii_uppercase();
            let c = c.strip_prefix("CAP_").unwrap_or(&c);
            if matches!(c, "ALL" | "SYS_ADMIN" | "SYS_PTRACE" | "SYS_MODULE" | "NET_ADMIN" | "SYS_RAWIO" | "DAC_READ_SEARCH") {
                return Err(cfg_err(format!(
                    "provisioner.docker.cap_add: {cap} would let the agent escape or control the host; it is refused"
                )));
            }
        }
        for k in self.env.keys() {
            if RESERVED_ENV.contains(&k.as_str()) || k.starts_with("OH_SESSION_API_KEYS") {
                return Err(cfg_err(format!("provisioner.docker.env: {k} is set by nestor and cannot be configured")));
            }
        }
        for k in self.labels.keys() {
            if k.starts_with(super::labels::PREFIX) {
                return Err(cfg_err(format!(
                    "provisioner.docker.labels: {k} uses nestor's own prefix {}",
                    super::labels::PREFIX
                )));
            }
        }
        if let Some(id) = &self.instance_id {
            if !valid_instance_id(id) {
                return Err(cfg_err(format!(
                    "provisioner.docker.instance_id {id:?} must be 1-32 characters of a-z, 0-9 and -"
                )));
            }
        }
        if self.entrypoint.as_ref().is_some_and(|e| e.is_empty()) {
            return Err(cfg_err("provisioner.docker.entrypoint must not be empty (leave it out for the image's)"));
        }
        if let Some(rt) = &self.runtime {
            if rt.trim().is_empty() {
                return Err(cfg_err("provisioner.docker.runtime must not be empty (leave it out for the engine's default)"));
            }
        }
        Ok(Settings {
            image,
            docker_host,
            network,
            memory,
            nano_cpus,
            pids_limit: Some(pids_limit).filter(|p| *p != 0),
            runtime: self.runtime.clone(),
            user,
            cap_add: self.cap_add.iter().map(|c| c.trim().to_ascii_uppercase()).collect(),
            extra_hosts: self
                .extra_hosts
                .clone()
                .unwrap_or_else(|| vec!["host.docker.internal:host-gateway".to_owned()]),
            entrypoint: self.entrypoint.clone(),
            command: self.command.clone(),
            env: self.env.clone(),
            labels: self.labels.clone(),
            startup_timeout: secs(self.startup_timeout_secs, 120.0, "startup_timeout_secs")?,
            stop_timeout: secs(self.stop_timeout_secs, 10.0, "stop_timeout_secs")?,
            api_timeout: secs(self.api_timeout_secs, 30.0, "api_timeout_secs")?,
            on_shutdown: self.on_shutdown,
            instance_id: self.instance_id.clone(),
            sweep_interval: secs(self.sweep_interval_secs, 60.0, "sweep_interval_secs")?.min(Duration::from_secs(3600)),
            provisioning_grace: secs(self.provisioning_grace_secs, 300.0, "provisioning_grace_secs")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> DockerConfig {
        DockerConfig { image: Some("nestor/agent-server:1.58.2".into()), ..Default::default() }
    }

    #[test]
    fn defaults_match_upstream_limits() {
        let s = base().validate(None).unwrap();
        assert_eq!(s.docker_host, DEFAULT_DOCKER_HOST);
        assert_eq!(s.memory, Some(4 << 30));
        assert_eq!(s.nano_cpus, Some(2_000_000_000));
        assert_eq!(s.pids_limit, Some(512));
        assert_eq!(s.user, "10001:10001");
        assert!(s.cap_add.is_empty());
        assert_eq!(s.extra_hosts, vec!["host.docker.internal:host-gateway"]);
        assert_eq!(s.on_shutdown, OnShutdown::Keep);
        assert_eq!(s.network, None);
        assert_eq!(s.startup_timeout, Duration::from_secs(120));
    }

    #[test]
    fn docker_host_precedence() {
        let s = base().validate(Some("tcp://10.0.0.1:2375".into())).unwrap();
        assert_eq!(s.docker_host, "tcp://10.0.0.1:2375");
        let mut c = base();
        c.docker_host = Some("unix:///run/x.sock".into());
        assert_eq!(c.validate(Some("tcp://h:1".into())).unwrap().docker_host, "unix:///run/x.sock");
        c.docker_host = Some("ssh://h".into());
        assert!(c.validate(None).unwrap_err().to_string().contains("ssh://h"));
    }

    #[test]
    fn image_is_required() {
        let e = DockerConfig::default().validate(None).unwrap_err().to_string();
        assert!(e.contains("provisioner.docker.image is required"), "{e}");
        let c = DockerConfig { image: Some("  ".into()), ..Default::default() };
        assert!(c.validate(None).is_err());
    }

    #[test]
    fn sizes_parse_like_docker() {
        assert_eq!(parse_bytes("4g").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("4G").unwrap(), 4 << 30);
        assert_eq!(parse_bytes("512m").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("512mb").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("100000").unwrap(), 100000);
        assert_eq!(parse_bytes("0").unwrap(), 0);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("-1g").is_err());
        let mut c = base();
        c.memory = Some(ByteSize::Text("0".into()));
        c.cpus = Some(0.0);
        c.pids_limit = Some(0);
        let s = c.validate(None).unwrap();
        assert_eq!((s.memory, s.nano_cpus, s.pids_limit), (None, None, None));
        c.memory = Some(ByteSize::Bytes(1 << 20));
        assert!(c.validate(None).unwrap_err().to_string().contains("at least 64m"));
        c.memory = Some(ByteSize::Text("2g".into()));
        c.cpus = Some(0.5);
        let s = c.validate(None).unwrap();
        assert_eq!((s.memory, s.nano_cpus), (Some(2 << 30), Some(500_000_000)));
    }

    #[test]
    fn refuses_unsafe_or_broken_settings() {
        let mut c = base();
        c.network = Some("host".into());
        assert!(c.validate(None).unwrap_err().to_string().contains("\"host\" is not supported"));
        c.network = Some("none".into());
        assert!(c.validate(None).is_err());
        c.network = Some("bridge".into());
        assert_eq!(c.validate(None).unwrap().network, None);
        c.network = Some("nestor-net".into());
        assert_eq!(c.validate(None).unwrap().network.as_deref(), Some("nestor-net"));

        let mut c = base();
        c.user = Some("0:0".into());
        assert!(c.validate(None).unwrap_err().to_string().contains("must not run as root"));
        c.user = Some("root".into());
        assert!(c.validate(None).is_err());

        let mut c = base();
        c.cap_add = vec!["cap_sys_admin".into()];
        assert!(c.validate(None).unwrap_err().to_string().contains("refused"));
        c.cap_add = vec!["chown".into()];
        assert_eq!(c.validate(None).unwrap().cap_add, vec!["CHOWN"]);

        let mut c = base();
        c.env.insert("OH_SESSION_API_KEYS_0".into(), "x".into());
        assert!(c.validate(None).unwrap_err().to_string().contains("set by nestor"));
        let mut c = base();
        c.env.insert("LLM_MODEL".into(), "x".into());
        assert!(c.validate(None).is_ok());

        let mut c = base();
        c.labels.insert("org.nestor.instance".into(), "x".into());
        assert!(c.validate(None).unwrap_err().to_string().contains("prefix"));

        let mut c = base();
        c.instance_id = Some("Bad_Id".into());
        assert!(c.validate(None).is_err());
        c.instance_id = Some("e2e-1234".into());
        assert!(c.validate(None).is_ok());

        let mut c = base();
        c.startup_timeout_secs = Some(0.0);
        assert!(c.validate(None).unwrap_err().to_string().contains("startup_timeout_secs"));
    }

    #[test]
    fn deserializes_from_toml_shapes() {
        let v = serde_json::json!({
            "image": "img", "memory": "2g", "cpus": 1, "pids_limit": 100,
            "env": {"A": "b"}, "labels": {"team": "x"}, "on_shutdown": "stop", "runtime": "runsc"
        });
        let c: DockerConfig = serde_json::from_value(v).unwrap();
        let s = c.validate(None).unwrap();
        assert_eq!(s.memory, Some(2 << 30));
        assert_eq!(s.on_shutdown, OnShutdown::Stop);
        assert_eq!(s.runtime.as_deref(), Some("runsc"));
        let c: DockerConfig = serde_json::from_value(serde_json::json!({"image": "i", "memory": 1073741824u64})).unwrap();
        assert_eq!(c.validate(None).unwrap().memory, Some(1 << 30));
        assert!(serde_json::from_value::<DockerConfig>(serde_json::json!({"imgae": "x"})).is_err());
    }
}
