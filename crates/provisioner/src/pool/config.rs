//! `[provisioner.pool]`: the settings as written, and their validated form.

use std::time::Duration;

use serde::Deserialize;

use crate::ProvisionError;

/// Which backend starts the pool's agent-servers (its own settings stay in
/// `[provisioner.process]` / `[provisioner.docker]` / `[provisioner.kubernetes]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PoolBackend {
    #[default]
    Process,
    Docker,
    Kubernetes,
}

/// `[provisioner.pool]` as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    #[serde(default)]
    pub backend: PoolBackend,
    /// Dormant agent-servers kept ready to be claimed (default 2; 0 = none, every create is
    /// a cold start).
    #[serde(default = "d_min_idle")]
    pub min_idle: usize,
    /// Most agent-servers of this provisioner alive at once: idle and booting warm ones plus
    /// the running servers of conversations (the home server aside). Refill stops there; a
    /// create that finds no idle server and the cap reached is refused (429, Retry-After).
    /// Default 32.
    #[serde(default = "d_max_size")]
    pub max_size: usize,
    /// A warm server idle this long is replaced by a fresh one (default 3600).
    #[serde(default = "d_max_age")]
    pub max_age_secs: f64,
    /// Seconds `POST /api/init` may take when a server is claimed (default 30).
    #[serde(default)]
    pub init_timeout_secs: Option<f64>,
}

fn d_min_idle() -> usize {
    2
}
fn d_max_size() -> usize {
    32
}
fn d_max_age() -> f64 {
    3600.0
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            backend: PoolBackend::default(),
            min_idle: d_min_idle(),
            max_size: d_max_size(),
            max_age_secs: d_max_age(),
            init_timeout_secs: None,
        }
    }
}

/// Validated pool settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub min_idle: usize,
    pub max_size: usize,
    pub max_age: Duration,
    pub init_timeout: Duration,
}

impl PoolConfig {
    pub fn validate(&self) -> Result<Settings, ProvisionError> {
        let bad = |m: String| Err(ProvisionError::Config(format!("provisioner.pool.{m}")));
        if self.max_size == 0 {
            return bad("max_size must be at least 1".into());
        }
        if self.min_idle > self.max_size {
            return bad(format!("min_idle ({}) must not exceed max_size ({})", self.min_idle, self.max_size));
        }
        let secs = |v: f64, what: &str| -> Result<Duration, ProvisionError> {
            // Bounded: `Duration::from_secs_f64` panics past ~1.8e19 s (found while fuzzing the config).
            if v.is_finite() && v > 0.0 && v <= 1e9 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(ProvisionError::Config(format!("provisioner.pool.{what} must be a positive number of seconds")))
            }
        };
        Ok(Settings {
            min_idle: self.min_idle,
            max_size: self.max_size,
            max_age: secs(self.max_age_secs, "max_age_secs")?,
            init_timeout: secs(self.init_timeout_secs.unwrap_or(30.0), "init_timeout_secs")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_limits() {
        let s = PoolConfig::default().validate().unwrap();
        assert_eq!((s.min_idle, s.max_size), (2, 32));
        assert_eq!(s.max_age, Duration::from_secs(3600));
        let c: PoolConfig =
            serde_json::from_str(r#"{"backend": "docker", "min_idle": 3, "max_size": 5, "max_age_secs": 60}"#).unwrap();
        assert_eq!(c.backend, PoolBackend::Docker);
        assert_eq!(c.validate().unwrap().max_age, Duration::from_secs(60));
        for bad in [
            r#"{"min_idle": 6, "max_size": 5}"#,
            r#"{"max_size": 0, "min_idle": 0}"#,
            r#"{"max_age_secs": 0}"#,
            r#"{"init_timeout_secs": -1}"#,
        ] {
            let c: PoolConfig = serde_json::from_str(bad).unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
        let c: PoolConfig = serde_json::from_str(r#"{"backend": "kubernetes"}"#).unwrap();
        assert_eq!(c.backend, PoolBackend::Kubernetes);
        assert!(serde_json::from_str::<PoolConfig>(r#"{"backend": "ec2"}"#).is_err());
        assert!(serde_json::from_str::<PoolConfig>(r#"{"min_idel": 1}"#).is_err());
    }
}
