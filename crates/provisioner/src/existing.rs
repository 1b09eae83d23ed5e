//! `existing`: a fixed set of agent-servers someone else runs.
//!
//! For a platform that already has agent-servers (a pool behind a Service, a few VMs), nestor
//! only places conversations: a new conversation goes to the healthy server holding the
//! fewest conversations. A background health loop probes every server's `/alive` so an
//! unhealthy one is skipped without costing a client request. Nothing is started or stopped;
//! on start nestor adopts whatever conversations the servers already hold (the catalog asks
//! them), so a restart of nestor loses no routes.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use nestor_core::downstream::Endpoint;
use nestor_core::{ConversationId, Downstream, DownstreamClient, DownstreamId, DownstreamState, SessionKey};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::util::stable_hash;
use crate::{ProvisionError, ProvisionRequest, Provisioner};

/// One configured server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// `http://host:port[/prefix]`.
    pub url: String,
    /// Its session key (sent as `X-Session-API-Key`), if it has one.
    #[serde(default)]
    pub api_key: Option<SessionKey>,
    /// A stable name for routes; default: derived from the URL.
    #[serde(default)]
    pub name: Option<String>,
}

/// `[provisioner.existing]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExistingConfig {
    #[serde(default)]
    pub servers: Vec<ServerConfig>,
    /// Seconds between health probes.
    #[serde(default = "default_health_interval")]
    pub health_interval_secs: f64,
    /// Seconds one probe may take.
    #[serde(default = "default_health_timeout")]
    pub health_timeout_secs: f64,
}

fn default_health_interval() -> f64 {
    5.0
}
fn default_health_timeout() -> f64 {
    2.0
}

impl Default for ExistingConfig {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            health_interval_secs: default_health_interval(),
            health_timeout_secs: default_health_timeout(),
        }
    }
}

/// The `existing` backend.
pub struct ExistingProvisioner {
    servers: Vec<Arc<Downstream>>,
    client: DownstreamClient,
    interval: Duration,
    probe_timeout: Duration,
    stop: CancellationToken,
}

impl ExistingProvisioner {
    pub fn new(cfg: &ExistingConfig, client: DownstreamClient) -> Result<Arc<Self>, ProvisionError> {
        if cfg.servers.is_empty() {
            return Err(ProvisionError::Config(
                "provisioner \"existing\" needs at least one [[provisioner.existing.servers]] entry with a url"
                    .into(),
            ));
        }
        let mut servers = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for s in &cfg.servers {
            let ep = Endpoint::parse(&s.url, s.api_key.clone())
                .map_err(|e| ProvisionError::Config(format!("provisioner.existing.servers: {e}")))?;
            let name = match &s.name {
                Some(n) => n.clone(),
                None => format!("{:012x}", stable_hash(s.url.trim_end_matches('/')) & 0xffff_ffff_ffff),
            };
            let id = DownstreamId::new(format!("existing-{name}"));
            if !seen.insert(id.clone()) {
                return Err(ProvisionError::Config(format!(
                    "provisioner.existing.servers: {} is listed twice",
                    s.url
                )));
            }
            servers.push(Downstream::new(id, "existing", None, None, Some(ep), DownstreamState::Starting));
        }
        let secs = |v: f64, what: &str| {
            // Bounded: `Duration::from_secs_f64` panics past ~1.8e19 s (found while fuzzing the config).
            if v.is_finite() && v > 0.0 && v <= 1e9 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(ProvisionError::Config(format!("provisioner.existing.{what} must be a positive number")))
            }
        };
        Ok(Arc::new(Self {
            servers,
            client,
            interval: secs(cfg.health_interval_secs, "health_interval_secs")?,
            probe_timeout: secs(cfg.health_timeout_secs, "health_timeout_secs")?,
            stop: CancellationToken::new(),
        }))
    }

    /// Probe one server and record the result.
    async fn probe(&self, ds: &Downstream) -> bool {
        let Some(ep) = ds.endpoint() else { return false };
        let ok = self.client.is_alive(&ep, self.probe_timeout).await;
        let was = ds.state();
        if ok {
            ds.set_state(DownstreamState::Ready);
            if was != DownstreamState::Ready {
                tracing::info!(downstream = %ds.id(), "agent-server healthy");
            }
        } else {
            if was == DownstreamState::Ready || was == DownstreamState::Starting {
                tracing::warn!(downstream = %ds.id(), "agent-server unhealthy: /alive did not answer 200");
            }
            ds.set_state(DownstreamState::Failed("the agent-server is not answering its health check".into()));
        }
        ok
    }

    async fn probe_all(&self) {
        futures::future::join_all(self.servers.iter().map(|s| self.probe(s))).await;
    }

    /// Start the background health loop (idempotent per instance: call once).
    pub fn spawn_health_loop(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = me.stop.cancelled() => break,
                    _ = tokio::time::sleep(me.interval) => me.probe_all().await,
                }
            }
        });
    }
}

#[async_trait]
impl Provisioner for ExistingProvisioner {
    fn kind(&self) -> &'static str {
        "existing"
    }

    async fn recover(&self) -> Result<Vec<Arc<Downstream>>, ProvisionError> {
        self.probe_all().await;
        Ok(self.servers.clone())
    }

    async fn provision(&self, _req: ProvisionRequest) -> Result<Arc<Downstream>, ProvisionError> {
        let pick = self
            .servers
            .iter()
            .filter(|s| s.state() == DownstreamState::Ready)
            .min_by_key(|s| s.conversation_count());
        match pick {
            Some(s) => Ok(s.clone()),
            None => Err(ProvisionError::Unavailable {
                detail: "no healthy agent-server is available to host a new conversation".into(),
                retry_after: Some(self.interval),
            }),
        }
    }

    async fn home(&self) -> Result<Arc<Downstream>, ProvisionError> {
        // The first healthy server, in configured order: stable, so settings written
        // through nestor are read back from the same place.
        self.servers.iter().find(|s| s.state() == DownstreamState::Ready).cloned().ok_or_else(|| {
            ProvisionError::Unavailable {
                detail: "no healthy agent-server is available".into(),
                retry_after: Some(self.interval),
            }
        })
    }

    fn get(&self, id: &DownstreamId) -> Option<Arc<Downstream>> {
        self.servers.iter().find(|s| s.id() == id).cloned()
    }

    fn list(&self) -> Vec<Arc<Downstream>> {
        self.servers.clone()
    }

    async fn ensure_ready(&self, ds: &Arc<Downstream>, timeout: Duration) -> Result<(), ProvisionError> {
        if ds.state() == DownstreamState::Ready {
            return Ok(());
        }
        // Someone else's server: we cannot start it, only see whether it is back.
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.probe(ds).await {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(ProvisionError::Unavailable {
                    detail: "it is not answering its health check".into(),
                    retry_after: Some(self.interval),
                });
            }
            tokio::time::sleep((deadline - now).min(Duration::from_millis(250))).await;
        }
    }

    async fn release(&self, _ds: &Arc<Downstream>, _c: ConversationId, _remaining: usize) -> Result<(), ProvisionError> {
        Ok(())
    }

    async fn shutdown(&self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(urls: &[&str]) -> ExistingConfig {
        ExistingConfig {
            servers: urls
                .iter()
                .map(|u| ServerConfig { url: u.to_string(), api_key: Some(SessionKey::new("k")), name: None })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn rejects_bad_config() {
        let c = DownstreamClient::default();
        assert!(ExistingProvisioner::new(&cfg(&[]), c.clone()).is_err());
        assert!(ExistingProvisioner::new(&cfg(&["nonsense"]), c.clone()).is_err());
        assert!(ExistingProvisioner::new(&cfg(&["http://a:1", "http://a:1/"]), c).is_err());
    }

    #[test]
    fn ids_are_stable_across_reordering() {
        let c = DownstreamClient::default();
        let a = ExistingProvisioner::new(&cfg(&["http://a:1", "http://b:2"]), c.clone()).unwrap();
        let b = ExistingProvisioner::new(&cfg(&["http://b:2", "http://a:1"]), c).unwrap();
        assert_eq!(a.servers[0].id(), b.servers[1].id());
    }

    #[tokio::test]
    async fn places_on_least_loaded_healthy_server() {
        let p = ExistingProvisioner::new(&cfg(&["http://a:1", "http://b:2", "http://c:3"]), DownstreamClient::default())
            .unwrap();
        for s in &p.servers {
            s.set_state(DownstreamState::Ready);
        }
        p.servers[0].set_conversation_count(5);
        p.servers[1].set_conversation_count(1);
        p.servers[2].set_conversation_count(0);
        p.servers[2].set_state(DownstreamState::Failed("down".into()));
        let req = ProvisionRequest { conversation: ConversationId::new_random(), owner: nestor_core::UserId::default_user() };
        assert_eq!(p.provision(req.clone()).await.unwrap().id(), p.servers[1].id());
        for s in &p.servers {
            s.set_state(DownstreamState::Failed("down".into()));
        }
        assert!(matches!(p.provision(req).await, Err(ProvisionError::Unavailable { .. })));
    }
}
