//! Settings, secrets and profiles, served by nestor itself (issue 6).
//!
//! An agent-server keeps settings, secrets, LLM/agent/meta profiles and provider connections
//! in its own persistence directory. Behind nestor every conversation has its own downstream,
//! so those stores cannot live on any one of them: a secret saved through one would be
//! invisible to the next conversation's server. This crate implements the routes on nestor,
//! with the agent-server 1.58.2 routes, shapes, validation and status codes, per user, and
//! gives the aggregator what it needs to start conversations from them.
//!
//! # Contract with the aggregator
//!
//! * Build once: [`SettingsService::open`]`(dir, keys)` with `dir = state_dir/settings` and
//!   the configured [`SecretKeys`] (or `None`). It **refuses to start** when stored data holds
//!   encrypted secrets and no key (or no configured key) can read them
//!   ([`StartupError`]), and re-encrypts values saved under a previous key.
//! * Mount [`router`]`(svc)` (a `Router<S>` for any state) *before* the home fallback. It
//!   does no authentication: the aggregator authenticates first and inserts the caller's
//!   [`SettingsUser`] as a request extension (`req.extensions_mut().insert(SettingsUser(user))`
//!   in its auth middleware; single-user deployments use `UserId::default_user()`). A request
//!   without the extension is a bug in the mounting and answers 500.
//! * Delegated routes (not in [`router`]; forward them to any healthy downstream, they touch
//!   no store): `POST /api/profiles/{name}/validate` (fires a one-token completion),
//!   `/api/llm/subscription/openai/*` (ChatGPT device login; the credential stays on that
//!   downstream), `POST /api/acp/models` (spawns an ACP CLI). [`DELEGATED_ROUTES`] lists them.
//!   A `/validate` body whose `llm` names a `provider_connection_id` should first go through
//!   [`SettingsService::resolve_llm_for_validation`] so the downstream sees the connection's key.
//! * Creates: [`SettingsService::resolve_create`] rewrites a `POST /api/conversations` body
//!   (profile → `agent_settings`, nestor cipher text decrypted, `LookupSecret`s to nestor's
//!   secrets made static) — see [`resolve`] for the decisions and gaps.
//! * `LookupSecret` target: [`SettingsService::secret`] reads one secret's plaintext.
//!
//! # Decisions
//!
//! * Encryption at rest: Fernet, compatible with the agent-server's cipher — see [`cipher`].
//!   Without a key nestor never writes a secret in plaintext: such writes answer 503.
//! * Static LLM catalogs and settings form schemas are embedded — see [`catalog`].
//! * Storage layout, atomic writes, per-user write serialization — see [`store`].
//! * Model validation is driven by the agent-server's exported JSON schemas — see [`schema`].

// `loc` vectors are threaded through recursive validators (push/pop); errors carry full
// HTTP bodies by design; the secrets reader returns a tuple list.
#![allow(clippy::ptr_arg, clippy::result_large_err, clippy::type_complexity)]

pub mod catalog;
pub mod cipher;
pub mod error;
mod profiles;
pub mod resolve;
mod routes;
pub mod schema;
pub mod service;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

pub use cipher::{Cipher, SecretKeys};
pub use routes::json_decode_error;
pub use error::Error;
pub use resolve::ResolvedCreate;
pub use service::{ExposeMode, SettingsService};

use nestor_core::UserId;

/// The authenticated caller, put into request extensions by the aggregator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsUser(pub UserId);

/// The settings routes (see the crate docs for the mounting contract).
pub fn router<S: Clone + Send + Sync + 'static>(svc: Arc<SettingsService>) -> axum::Router<S> {
    routes::router(svc)
}

/// Routes that need an LLM call, an OAuth device flow or a subprocess: forward them to any
/// downstream (method, path pattern).
pub const DELEGATED_ROUTES: &[(&str, &str)] = &[
    ("POST", "/api/profiles/{name}/validate"),
    ("GET", "/api/llm/subscription/openai/models"),
    ("GET", "/api/llm/subscription/openai/status"),
    ("POST", "/api/llm/subscription/openai/device/start"),
    ("POST", "/api/llm/subscription/openai/device/poll"),
    ("POST", "/api/llm/subscription/openai/logout"),
    ("POST", "/api/acp/models"),
];

/// Why the store cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(
        "{path} holds encrypted secrets but no secret key is configured: set the key they were saved with (nestor refuses to start rather than lose or expose them)"
    )]
    MissingKey { path: PathBuf },
    #[error(
        "{path} holds secrets that no configured key can decrypt: configure the key they were saved with, or add it to the previous keys to rotate"
    )]
    WrongKey { path: PathBuf },
    #[error("cannot read the settings directory {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn collect_tokens(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) if cipher::looks_encrypted(s) => out.push(s.clone()),
        Value::Object(m) => m.values().for_each(|x| collect_tokens(x, out)),
        Value::Array(a) => a.iter().for_each(|x| collect_tokens(x, out)),
        _ => {}
    }
}

fn json_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_dir() {
            json_files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "json") && !e.file_name().to_string_lossy().starts_with('.') {
            out.push(p);
        }
    }
    Ok(())
}

impl SettingsService {
    /// Open the store under `dir` (created if absent). Checks every stored cipher text: with
    /// no key, any token is [`StartupError::MissingKey`]; with keys, a token none of them
    /// decrypts is [`StartupError::WrongKey`]. Tokens under a previous key are re-encrypted
    /// under the current one.
    pub fn open(dir: impl Into<PathBuf>, keys: Option<SecretKeys>) -> Result<Arc<Self>, StartupError> {
        let base = dir.into();
        store::ensure_dir(&base).map_err(|source| StartupError::Io { path: base.clone(), source })?;
        let cipher = keys.as_ref().map(Cipher::new);
        let mut files = Vec::new();
        json_files(&base.join("users"), &mut files).map_err(|source| StartupError::Io { path: base.clone(), source })?;
        let mut stale = Vec::new();
        for f in &files {
            let Ok(store::Read::Json(v)) = store::read_json(f) else { continue };
            let mut tokens = Vec::new();
            collect_tokens(&v, &mut tokens);
            if tokens.is_empty() {
                continue;
            }
            let Some(c) = &cipher else { return Err(StartupError::MissingKey { path: f.clone() }) };
            if tokens.iter().any(|t| c.decrypt(t).is_none()) {
                return Err(StartupError::WrongKey { path: f.clone() });
            }
            if tokens.iter().any(|t| !c.is_current(t)) {
                stale.push((f.clone(), v));
            }
        }
        if let Some(c) = &cipher {
            for (f, v) in stale {
                let rotated = rotate_all(&v, c);
                if let Err(e) = store::write_json(&f, &rotated) {
                    tracing::error!(path = %f.display(), error = %e, "could not re-encrypt under the current key");
                } else {
                    tracing::info!(path = %f.display(), "re-encrypted under the current key");
                }
            }
        }
        Ok(Arc::new(Self { base, cipher, locks: store::Locks::default() }))
    }

    /// A secret's plaintext for `user` (the `LookupSecret` endpoint), `None` if absent.
    pub async fn secret(self: &Arc<Self>, user: &UserId, name: &str) -> Option<String> {
        if !service::valid_secret_name(name) {
            return None;
        }
        let (svc, u, n) = (self.clone(), user.clone(), name.to_owned());
        tokio::task::spawn_blocking(move || svc.secret_value(u.as_str(), &n)).await.ok().flatten()
    }

    /// The default agent source for a create that names none: the active agent profile's
    /// id if the user activated one, else the stored `agent_settings` (with plaintext
    /// secrets, for the downstream to build the agent from).
    pub async fn default_agent_source(self: &Arc<Self>, user: &UserId) -> Result<(String, Value), Error> {
        let (svc, u) = (self.clone(), user.clone());
        routes::blocking(move || {
            let s = svc.load_settings(u.as_str())?;
            if let Some(id) = s["active_agent_profile_id"].as_str().filter(|i| !i.is_empty()) {
                return Ok(("agent_profile_id".to_owned(), Value::String(id.to_owned())));
            }
            Ok(("agent_settings".to_owned(), s["agent_settings"].clone()))
        })
        .await
    }

    /// The names (and descriptions) of `user`'s stored secrets; empty when none or unreadable.
    pub async fn secret_names(self: &Arc<Self>, user: &UserId) -> Vec<(String, Option<Value>)> {
        let (svc, u) = (self.clone(), user.clone());
        let listed = tokio::task::spawn_blocking(move || svc.list_secrets(u.as_str(), None)).await;
        let Ok(Ok(v)) = listed else { return Vec::new() };
        v["secrets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| Some((s["name"].as_str()?.to_owned(), s.get("description").filter(|d| !d.is_null()).cloned())))
            .collect()
    }

    /// Rewrite a create body for a downstream (see [`resolve`]).
    pub async fn resolve_create(self: &Arc<Self>, user: &UserId, body: Value) -> Result<ResolvedCreate, Error> {
        let (svc, u) = (self.clone(), user.clone());
        routes::blocking(move || svc.resolve_create_blocking(u.as_str(), &body)).await
    }

    /// The user's stored agent settings with plaintext secrets (a reference-free
    /// `agent_settings` for a create body that names no agent source, if the aggregator
    /// chooses to default to them).
    pub async fn stored_agent_settings(self: &Arc<Self>, user: &UserId) -> Result<Value, Error> {
        let (svc, u) = (self.clone(), user.clone());
        routes::blocking(move || Ok(svc.load_settings(u.as_str())?["agent_settings"].clone())).await
    }

    /// For the delegated `/validate`: apply a linked provider connection to a draft `llm`
    /// and decrypt nestor cipher text, so the downstream tests the real credentials.
    pub async fn resolve_llm_for_validation(self: &Arc<Self>, user: &UserId, llm: Value) -> Result<Value, Error> {
        let (svc, u) = (self.clone(), user.clone());
        routes::blocking(move || {
            let v = schema::validate(schema::model("LLM"), &llm, &[serde_json::json!("body"), serde_json::json!("llm")], schema::Opts { cipher: svc.cipher.as_ref(), strict_decrypt: false })
                .map_err(|e| Error::validation(&e))?;
            svc.resolve_provider_connection(u.as_str(), None, v)
        })
        .await
    }

    /// The directory this store lives in.
    pub fn dir_path(&self) -> &Path {
        &self.base
    }
}

fn rotate_all(v: &Value, c: &Cipher) -> Value {
    match v {
        Value::String(s) if cipher::looks_encrypted(s) => Value::String(c.rotate(s).unwrap_or_else(|| s.clone())),
        Value::Object(m) => Value::Object(m.iter().map(|(k, x)| (k.clone(), rotate_all(x, c))).collect()),
        Value::Array(a) => Value::Array(a.iter().map(|x| rotate_all(x, c)).collect()),
        _ => v.clone(),
    }
}
