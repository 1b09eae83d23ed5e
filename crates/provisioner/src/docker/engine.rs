//! The Docker engine, as the docker backend uses it: every call bounded by a timeout, the API
//! version negotiated once (bollard speaks 1.53 by default; dockerd 20.10 only 1.41), and
//! errors turned into messages that name the engine's address.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, ContainerInspectResponse, ContainerSummary, Volume, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, InspectContainerOptions, ListContainersOptions, ListVolumesOptions, LogsOptions,
    RemoveContainerOptions, RemoveVolumeOptions, StopContainerOptions,
};
use bollard::Docker;
use futures::StreamExt;
use tokio::sync::OnceCell;

/// How a Docker call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The engine could not be reached (socket missing, connection refused, timeout).
    #[error("the Docker engine at {host} is not reachable: {detail}")]
    Unreachable { host: String, detail: String },
    #[error("Docker {what} timed out after {after:?} (engine at {host})")]
    Timeout { what: String, host: String, after: Duration },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("Docker {what} failed: {detail}")]
    Api { what: String, status: u16, detail: String },
}

impl EngineError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, EngineError::NotFound(_))
    }
}

/// The error and its causes, joined (bollard's own text is often just "client error (Connect)").
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// A connection to one Docker engine.
#[derive(Clone)]
pub struct Engine {
    host: String,
    timeout: Duration,
    /// The client, once connected and negotiated, and the engine's version.
    conn: std::sync::Arc<OnceCell<(Docker, String)>>,
}

impl Engine {
    /// No I/O happens here (a socket that does not exist yet is fine): the first call
    /// connects and negotiates the API version.
    pub fn new(host: &str, timeout: Duration) -> Result<Self, String> {
        if !(host.starts_with("unix://") || host.starts_with("tcp://") || host.starts_with("http://")) {
            return Err(format!("unsupported Docker host {host:?} (use unix:// or tcp://)"));
        }
        Ok(Self { host: host.to_owned(), timeout, conn: Default::default() })
    }

    fn client(&self) -> Result<Docker, EngineError> {
        let secs = self.timeout.as_secs().max(1);
        let v = bollard::API_DEFAULT_VERSION;
        let r = if self.host.starts_with("unix://") {
            Docker::connect_with_unix(&self.host, secs, v)
        } else {
            Docker::connect_with_http(&self.host, secs, v)
        };
        r.map_err(|e| EngineError::Unreachable { host: self.host.clone(), detail: describe(&e) })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    fn map(&self, what: &str, e: BollardError) -> EngineError {
        match e {
            BollardError::DockerResponseServerError { status_code: 404, message } => EngineError::NotFound(message),
            BollardError::DockerResponseServerError { status_code: 409, message } => EngineError::Conflict(message),
            BollardError::DockerResponseServerError { status_code, message } => {
                EngineError::Api { what: what.to_owned(), status: status_code, detail: message }
            }
            BollardError::RequestTimeoutError => {
                EngineError::Timeout { what: what.to_owned(), host: self.host.clone(), after: self.timeout }
            }
            e @ (BollardError::HyperLegacyError { .. }
            | BollardError::IOError { .. }
            | BollardError::HyperResponseError { .. }
            | BollardError::SocketNotFoundError(_)) => {
                EngineError::Unreachable { host: self.host.clone(), detail: describe(&e) }
            }
            e => EngineError::Api { what: what.to_owned(), status: 0, detail: describe(&e) },
        }
    }

    /// Connect once: negotiate the API version (bounded). Returns the engine's version.
    pub async fn connect(&self) -> Result<String, EngineError> {
        self.docker().await.map(|(_, v)| v)
    }

    async fn docker(&self) -> Result<(Docker, String), EngineError> {
        self.conn
            .get_or_try_init(|| async {
                let d = self.client()?;
                let v = tokio::time::timeout(self.timeout, async move {
                    let d = d.negotiate_version().await?;
                    let v = d.version().await?;
                    Ok::<_, BollardError>((d, v))
                })
                .await
                .map_err(|_| EngineError::Unreachable {
                    host: self.host.clone(),
                    detail: format!("no answer within {:?}", self.timeout),
                })?
                .map_err(|e| match self.map("version", e) {
                    // A server error here still means "no usable engine at this address".
                    EngineError::Api { detail, .. } => EngineError::Unreachable { host: self.host.clone(), detail },
                    other => other,
                })?;
                let (d, info) = v;
                let version = format!("{} (API {})", info.version.unwrap_or_default(), d.client_version());
                Ok((d, version))
            })
            .await
            .cloned()
    }

    /// Run one call: connected first, bounded by `bound` (default: the API timeout).
    async fn call<T, F, Fut>(&self, what: &str, bound: Option<Duration>, f: F) -> Result<T, EngineError>
    where
        F: FnOnce(Docker) -> Fut,
        Fut: Future<Output = Result<T, BollardError>>,
    {
        let (d, _) = self.docker().await?;
        let after = bound.unwrap_or(self.timeout);
        match tokio::time::timeout(after, f(d)).await {
            Ok(r) => r.map_err(|e| self.map(what, e)),
            Err(_) => Err(EngineError::Timeout { what: what.to_owned(), host: self.host.clone(), after }),
        }
    }

    pub async fn list_containers(&self, filters: HashMap<String, Vec<String>>) -> Result<Vec<ContainerSummary>, EngineError> {
        let opts = ListContainersOptions { all: true, filters: Some(filters), ..Default::default() };
        self.call("container list", None, |d| async move { d.list_containers(Some(opts)).await }).await
    }

    pub async fn list_volumes(&self, filters: HashMap<String, Vec<String>>) -> Result<Vec<Volume>, EngineError> {
        let opts = ListVolumesOptions { filters: Some(filters) };
        let r = self.call("volume list", None, |d| async move { d.list_volumes(Some(opts)).await }).await?;
        Ok(r.volumes.unwrap_or_default())
    }

    pub async fn inspect_container(&self, name: &str) -> Result<ContainerInspectResponse, EngineError> {
        self.call("container inspect", None, |d| async move {
            d.inspect_container(name, None::<InspectContainerOptions>).await
        })
        .await
    }

    pub async fn image_exists(&self, image: &str) -> Result<bool, EngineError> {
        match self.call("image inspect", None, |d| async move { d.inspect_image(image).await }).await {
            Ok(_) => Ok(true),
            Err(EngineError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn create_volume(&self, name: &str, labels: HashMap<String, String>) -> Result<(), EngineError> {
        let req = VolumeCreateRequest { name: Some(name.to_owned()), labels: Some(labels), ..Default::default() };
        self.call("volume create", None, |d| async move { d.create_volume(req).await }).await.map(|_| ())
    }

    pub async fn remove_volume(&self, name: &str) -> Result<(), EngineError> {
        let r = self
            .call("volume remove", None, |d| async move {
                d.remove_volume(name, Some(RemoveVolumeOptions { force: true })).await
            })
            .await;
        match r {
            Err(EngineError::NotFound(_)) => Ok(()),
            r => r,
        }
    }

    pub async fn create_container(&self, name: &str, body: ContainerCreateBody) -> Result<String, EngineError> {
        let opts = CreateContainerOptions { name: Some(name.to_owned()), ..Default::default() };
        self.call("container create", None, |d| async move { d.create_container(Some(opts), body).await })
            .await
            .map(|r| r.id)
    }

    pub async fn start_container(&self, name: &str) -> Result<(), EngineError> {
        self.call("container start", None, |d| async move { d.start_container(name, None).await }).await
    }

    /// SIGTERM, SIGKILL after `grace` (the engine does both); bounded by `grace` + the API timeout.
    pub async fn stop_container(&self, name: &str, grace: Duration) -> Result<(), EngineError> {
        let opts = StopContainerOptions { t: Some(grace.as_secs().max(1) as i32), signal: None };
        let r = self
            .call("container stop", Some(grace + self.timeout), |d| async move { d.stop_container(name, Some(opts)).await })
            .await;
        match r {
            Err(EngineError::NotFound(_)) => Ok(()),
            r => r,
        }
    }

    /// Remove (killing it if it runs). Absent is fine.
    pub async fn remove_container(&self, name: &str) -> Result<(), EngineError> {
        let opts = RemoveContainerOptions { force: true, v: false, link: false };
        match self.call("container remove", None, |d| async move { d.remove_container(name, Some(opts)).await }).await {
            Err(EngineError::NotFound(_)) => Ok(()),
            r => r,
        }
    }

    /// The last `lines` lines of the container's output (empty when unavailable).
    pub async fn log_tail(&self, name: &str, lines: usize) -> String {
        let Ok((docker, _)) = self.docker().await else { return String::new() };
        let opts = LogsOptions { stdout: true, stderr: true, tail: lines.to_string(), ..Default::default() };
        let name = name.to_owned();
        let collect = async move {
            let mut out = String::new();
            let mut s = docker.logs(&name, Some(opts));
            while let Some(Ok(chunk)) = s.next().await {
                out.push_str(&chunk.to_string());
                if out.len() > 64 << 10 {
                    break;
                }
            }
            out
        };
        tokio::time::timeout(Duration::from_secs(5).min(self.timeout), collect).await.unwrap_or_default()
    }

    /// The engine's events for `filters`: a long-lived stream (its start is bounded by the API
    /// timeout), ended by dropping it.
    pub async fn events(
        &self,
        filters: HashMap<String, Vec<String>>,
    ) -> Result<impl futures::Stream<Item = Result<bollard::models::EventMessage, EngineError>> + '_, EngineError> {
        let (docker, _) = self.docker().await?;
        let opts = bollard::query_parameters::EventsOptions { filters: Some(filters), ..Default::default() };
        Ok(docker.events(Some(opts)).map(move |r| r.map_err(|e| self.map("events", e))))
    }
}
