//! The running nestor: its shared state and how it is put together at start.
//!
//! Start order matters for restart safety: the provisioner recovers first (adopting what a
//! previous nestor left running), then the catalog loads its persisted routes against those
//! downstreams, then every running downstream is asked what it holds. Only then does nestor
//! accept requests, so the first request after a restart already routes correctly.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use nestor_conversation_service::{Catalog, CatalogConfig};
use nestor_core::{ConversationId, DownstreamClient, SessionKey};
use nestor_provisioner::docker::DockerProvisioner;
use nestor_provisioner::existing::ExistingProvisioner;
use nestor_provisioner::process::ProcessProvisioner;
use nestor_provisioner::Provisioner;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::config::{Config, ProvisionerKind};
use crate::fleet::Fleet;

/// Everything a request handler needs. Cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub cfg: Config,
    pub auth: Arc<Auth>,
    pub provisioner: Arc<dyn Provisioner>,
    /// The process backend when that is the kind in use (for its extra operations).
    pub process: Option<ProcessProvisioner>,
    pub catalog: Arc<Catalog>,
    pub client: DownstreamClient,
    pub fleet: Fleet,
    /// One lock per conversation id being created: concurrent creates provision once.
    pub creating: DashMap<ConversationId, Arc<Mutex<()>>>,
    pub ready_timeout: Duration,
    pub cors: crate::cors::CorsPolicy,
    /// Settings, secrets and profiles (nestor's own store).
    pub settings: Arc<nestor_settings::SettingsService>,
    /// How downstreams reach nestor (no trailing slash).
    pub internal_url: String,
    /// Where each conversation's VS Code answers (learned from its downstream).
    pub vscode: DashMap<ConversationId, crate::routes::vscode::VscodeTarget>,
    /// Webhooks received from downstreams and re-emitted.
    pub webhooks: crate::webhooks::Webhooks,
    /// WebSocket proxy settings.
    pub ws: Arc<nestor_ws_proxy::ProxyConfig>,
    pub upstream_timeout: Duration,
    pub started: std::time::Instant,
    pub shutdown: CancellationToken,
    /// The warm pool when the provisioner kind is `pool` (its counters, for tests and tools).
    pub pool: Option<nestor_provisioner::pool::PoolProvisioner>,
    /// Workspace persistence (`[workspace_storage]`), when configured.
    pub persistence: Option<Arc<crate::persistence::Persistence>>,
    /// Proxied WebSocket pairs and spliced upgrades: axum's graceful shutdown does not see
    /// upgraded connections, so they are tracked here, closed (1012) when `shutdown` is
    /// cancelled and waited for (bounded) before nestor exits (crate::server).
    pub sockets: tokio_util::task::TaskTracker,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// The session key used when none is configured: generated once, kept in `state_dir`.
/// Returns the key and whether it was just generated (so it is printed once).
fn generated_key(state_dir: &std::path::Path) -> anyhow::Result<(SessionKey, bool)> {
    std::fs::create_dir_all(state_dir)
        .map_err(|e| anyhow::anyhow!("cannot create state_dir {}: {e}", state_dir.display()))?;
    let path = state_dir.join("session_api_key");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok((SessionKey::new(s.trim()), false)),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
    }
    let key = SessionKey::random();
    nestor_core::fs::write_atomic(&path, key.expose().as_bytes())
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok((key, true))
}

/// Resolve client keys: configured ones (possibly none: no authentication), or nestor's
/// generated one when the configuration does not mention keys at all.
pub fn resolve_keys(cfg: &Config) -> anyhow::Result<Vec<SessionKey>> {
    if cfg.session_api_keys.is_none() && !cfg.users.is_empty() {
        return Ok(Vec::new()); // keys come from [[users]]
    }
    if let Some(keys) = &cfg.session_api_keys {
        if keys.is_empty() && cfg.users.is_empty() {
            tracing::warn!("session_api_keys is empty: nestor accepts requests without authentication");
        }
        return Ok(keys.clone());
    }
    let (key, fresh) = generated_key(&cfg.state_dir)?;
    if fresh {
        // Printed once, on the terminal of the operator who started nestor.
        #[allow(clippy::print_stdout)]
        {
            println!(
                "nestor: generated session API key {} (stored in {}); clients send it as X-Session-API-Key",
                key.expose(),
                cfg.state_dir.join("session_api_key").display()
            );
        }
    } else {
        tracing::info!(path = %cfg.state_dir.join("session_api_key").display(), "using the stored session API key");
    }
    Ok(vec![key])
}

impl AppState {
    /// Build and recover everything (see the module docs for the order).
    pub async fn start(cfg: Config, keys: Vec<SessionKey>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(|e| anyhow::anyhow!("cannot create state_dir {}: {e}", cfg.state_dir.display()))?;
        crate::observability::install();
        let client = DownstreamClient::new(Duration::from_secs(5));
        let internal_url = match &cfg.internal_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None if cfg.provisioner.runs_docker() => {
                // Containers reach the host by this name (the docker provisioner adds it).
                let port = cfg.internal_bind.map(|a| a.port()).unwrap_or(cfg.bind.port());
                if cfg.internal_bind.is_none() {
                    tracing::warn!("docker provisioner without internal_bind: containers reach nestor only if it listens on an address they can reach (e.g. internal_bind = \"172.17.0.1:{port}\")");
                }
                format!("http://host.docker.internal:{port}")
            }
            None => {
                let addr = cfg.internal_bind.unwrap_or(cfg.bind);
                let ip = if addr.ip().is_unspecified() { "127.0.0.1".to_owned() } else { addr.ip().to_string() };
                let ip = if ip.contains(':') { format!("[{ip}]") } else { ip };
                format!("http://{ip}:{}", addr.port())
            }
        };
        // Every downstream nestor starts posts its webhooks back here.
        let mut cfg = cfg;
        for (k, v) in crate::webhooks::downstream_env(&internal_url) {
            cfg.provisioner.process.env.entry(k.clone()).or_insert_with(|| v.clone());
            cfg.provisioner.docker.env.entry(k.clone()).or_insert_with(|| v.clone());
            cfg.provisioner.kubernetes.env.entry(k).or_insert(v);
        }

        let mut docker = None;
        let mut pool = None;
        // Before the provisioner recovers: re-adopted running conversations resume pushing.
        let persistence = match &cfg.workspace_storage {
            Some(ws) => Some(crate::persistence::Persistence::start(ws, cfg.state_dir.join("workspace-store")).await?),
            None => None,
        };
        let sync = persistence.as_ref().map(|p| p.hooks());
        let (provisioner, process): (Arc<dyn Provisioner>, Option<ProcessProvisioner>) = match cfg.provisioner.kind {
            ProvisionerKind::Existing => {
                let p = ExistingProvisioner::new(&cfg.provisioner.existing, client.clone())?;
                p.spawn_health_loop();
                (p, None)
            }
            ProvisionerKind::Process => {
                let p = ProcessProvisioner::new(
                    &cfg.provisioner.process,
                    cfg.state_dir.join("process"),
                    crate::config::default_agent_server(),
                    client.clone(),
                )?;
                let p = match &sync {
                    Some(s) => p.with_workspace_sync(s.clone()),
                    None => p,
                };
                (Arc::new(p.clone()), Some(p))
            }
            ProvisionerKind::Docker => {
                let p = DockerProvisioner::new(&cfg.provisioner.docker, cfg.state_dir.join("docker"), client.clone())?;
                let p = match &sync {
                    Some(s) => p.with_workspace_sync(s.clone())?,
                    None => p,
                };
                docker = Some(p.clone());
                (Arc::new(p), None)
            }
            ProvisionerKind::Pool => {
                use nestor_provisioner::pool::{PoolBackend, PoolProvisioner, WarmBackend};
                let backend: Arc<dyn WarmBackend> = match cfg.provisioner.pool.backend {
                    PoolBackend::Process => {
                        let p = ProcessProvisioner::new(
                            &cfg.provisioner.process,
                            cfg.state_dir.join("process"),
                            crate::config::default_agent_server(),
                            client.clone(),
                        )?;
                        Arc::new(match &sync {
                            Some(s) => p.with_workspace_sync(s.clone()),
                            None => p,
                        })
                    }
                    PoolBackend::Docker => {
                        let p = DockerProvisioner::new(&cfg.provisioner.docker, cfg.state_dir.join("docker"), client.clone())?;
                        let p = match &sync {
                            Some(s) => p.with_workspace_sync(s.clone())?,
                            None => p,
                        };
                        docker = Some(p.clone());
                        Arc::new(p)
                    }
                    PoolBackend::Kubernetes => {
                        Arc::new(nestor_provisioner::kubernetes::KubernetesProvisioner::new(&cfg.provisioner.kubernetes).await?)
                    }
                };
                let p = PoolProvisioner::new(&cfg.provisioner.pool, backend, client.clone())?;
                pool = Some(p.clone());
                (Arc::new(p), None)
            }
            ProvisionerKind::Kubernetes => {
                let p = nestor_provisioner::kubernetes::KubernetesProvisioner::new(&cfg.provisioner.kubernetes).await?;
                // Each pod restores and pushes its own files (its sync containers); nestor
                // keeps the bucket-side work: quotas at create, purge on delete.
                let p = match (&sync, &cfg.workspace_storage) {
                    (Some(s), Some(ws)) => p.with_workspace_sync(ws, s.clone())?,
                    _ => p,
                };
                (Arc::new(p), None)
            }
        };
        let downstreams = provisioner.recover().await?;
        let catalog_cfg = CatalogConfig {
            max_staleness: Duration::from_millis(cfg.catalog.max_staleness_ms),
            ..CatalogConfig::default()
        };
        let prov = provisioner.clone();
        let catalog = Catalog::open(&cfg.state_dir.join("catalog"), client.clone(), catalog_cfg, move |id| prov.get(id))?;
        let catalog = Arc::new(catalog);
        // Adopt what running downstreams hold (bounded: the catalog's refresh timeout).
        catalog.refresh_stale(downstreams.clone()).await;
        if let Some(d) = &docker {
            // Removes orphaned and half-created containers; the catalog says what exists.
            let c = catalog.clone();
            d.spawn_sweeper(move |id| c.get(id).is_some());
        }
        let fleet = Fleet::open(cfg.state_dir.join("server_info.json"));
        let ws = Arc::new(nestor_ws_proxy::ProxyConfig {
            ready_timeout: Duration::from_secs_f64(cfg.ready_timeout_secs),
            resume_deadline: Duration::from_secs_f64(cfg.websocket.resume_deadline_secs),
            max_pending_bytes: cfg.websocket.max_pending_bytes,
            read_buffer_size: cfg.websocket.read_buffer_bytes.clamp(256, 1 << 20),
            permessage_deflate: cfg.websocket.permessage_deflate,
            downstream_permessage_deflate: cfg.websocket.downstream_permessage_deflate,
            ..Default::default()
        });
        let cors = crate::cors::CorsPolicy::new(cfg.allow_cors_origins.clone(), cfg.allow_cors_origin_regex.as_deref())?;
        let secret_keys = match &cfg.secret_key {
            Some(k) => nestor_settings::SecretKeys::new(k.expose().to_owned()),
            None => nestor_settings::SecretKeys::load_or_generate(&cfg.state_dir.join("secret_key"))
                .map_err(|e| anyhow::anyhow!("cannot read or create {}: {e}", cfg.state_dir.join("secret_key").display()))?,
        }
        .with_previous(cfg.previous_secret_keys.iter().map(|k| k.expose().to_owned()).collect::<Vec<_>>());
        let settings = nestor_settings::SettingsService::open(cfg.state_dir.join("settings"), Some(secret_keys))?;
        let http = reqwest::Client::builder().no_proxy().build().map_err(|e| anyhow::anyhow!("http client: {e}"))?;
        let webhooks = crate::webhooks::Webhooks::start(&cfg.webhooks, keys.first().map(|k| k.expose().to_owned()), http);
        let state = AppState(Arc::new(Inner {
            cors,
            settings,
            internal_url,
            webhooks,
            vscode: DashMap::new(),
            ws,
            ready_timeout: Duration::from_secs_f64(cfg.ready_timeout_secs),
            upstream_timeout: Duration::from_secs_f64(cfg.upstream_timeout_secs),
            auth: Arc::new(Auth::with_users(keys, &cfg.users, Some(cfg.state_dir.join("conversation_keys.json")))),
            provisioner,
            process,
            catalog,
            client,
            fleet,
            creating: DashMap::new(),
            started: std::time::Instant::now(),
            shutdown: CancellationToken::new(),
            pool,
            persistence,
            sockets: tokio_util::task::TaskTracker::new(),
            cfg,
        }));
        for ds in downstreams {
            if ds.state() == nestor_core::DownstreamState::Ready {
                state.fleet.learn(&state.client, &ds).await;
            }
        }
        crate::lifecycle::spawn_idle_reaper(&state);
        tracing::info!(
            provisioner = state.provisioner.kind(),
            conversations = state.catalog.len(),
            "nestor ready"
        );
        Ok(state)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.cfg.state_dir.clone()
    }
}
