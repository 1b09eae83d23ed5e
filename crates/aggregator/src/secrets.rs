//! Secrets live on nestor; downstreams fetch them, one at a time, when they need them.
//!
//! A conversation's downstream never receives a secret's value in its create body or its
//! environment. Instead nestor hands it `LookupSecret`s pointing back at nestor:
//!
//! ```json
//! {"kind": "LookupSecret", "url": "<internal_url>/nestor/secrets/<conversation>/<NAME>",
//!  "headers": {"X-Session-API-Key": "<credential of that conversation>"}}
//! ```
//!
//! The credential opens only that conversation's lookups (not its routes, not the client's
//! key) and is revoked when the conversation is deleted. The downstream resolves the URL
//! lazily (when the agent's bash first needs `$NAME`), and stores the header encrypted and
//! redacted, like any secret-looking header.
//!
//! Which secrets: every `LookupSecret` a client sends that points at
//! `/api/settings/secrets/NAME` (relative, as the frontend builds them, or absolute on
//! nestor) is rewritten this way — the downstream would otherwise resolve it against
//! itself — and, with `inject_stored_secrets` (default), every secret the user stored is
//! offered to new conversations the same way (limited to the launched agent profile's
//! `secret_refs` when a profile is used).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::Response;
use http::{header, HeaderValue, Request, StatusCode};
use nestor_core::{ApiError, ConversationId, UserId};
use serde_json::{json, Map, Value};

use crate::app::AppState;
use crate::auth::Scope;
use crate::errors::HttpResult;

/// The path of a stored secret on an agent-server (and on nestor).
const SETTINGS_SECRET_PREFIX: &str = "/api/settings/secrets/";

/// `NAME` when `url` is a settings-secret URL (relative, or absolute on any host).
pub fn settings_secret_name(url: &str) -> Option<&str> {
    let path = match url.find("://") {
        Some(i) => {
            let rest = &url[i + 3..];
            &rest[rest.find('/')?..]
        }
        None => url,
    };
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let name = path.strip_prefix(SETTINGS_SECRET_PREFIX)?;
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

/// The `LookupSecret` a downstream gets for `name`.
fn lookup_secret(state: &AppState, conversation: &ConversationId, name: &str, credential: &str, description: Option<&Value>) -> Value {
    let mut v = json!({
        "kind": "LookupSecret",
        "url": format!("{}/nestor/secrets/{}/{}", state.internal_url, conversation, name),
        "headers": { "X-Session-API-Key": credential },
    });
    if let Some(d) = description.filter(|d| !d.is_null()) {
        v["description"] = d.clone();
    }
    v
}

/// The conversation's lookup credential, minted on first use.
struct Credential<'a> {
    state: &'a AppState,
    conversation: ConversationId,
    user: &'a UserId,
    key: Option<String>,
}

impl Credential<'_> {
    fn get(&mut self) -> String {
        let (state, conversation, user) = (self.state, self.conversation, self.user);
        self.key
            .get_or_insert_with(|| state.auth.mint_secrets_credential(conversation, user.clone()).expose().to_owned())
            .clone()
    }
}

/// Rewrite `secrets` (a create body's or a `POST /{id}/secrets` body's) so every
/// settings-secret lookup points at nestor (before any profile resolution, which would
/// otherwise turn them into values).
pub fn rewrite(state: &AppState, conversation: ConversationId, user: &UserId, secrets: &mut Map<String, Value>) {
    let mut cred = Credential { state, conversation, user, key: None };
    rewrite_with(state, conversation, secrets, &mut cred);
}

fn rewrite_with(state: &AppState, conversation: ConversationId, secrets: &mut Map<String, Value>, cred: &mut Credential<'_>) {
    for (_, v) in secrets.iter_mut() {
        let is_lookup = v.get("kind").and_then(Value::as_str) == Some("LookupSecret");
        let name = is_lookup.then(|| v.get("url").and_then(Value::as_str).and_then(settings_secret_name).map(str::to_owned)).flatten();
        if let Some(name) = name {
            let c = cred.get();
            *v = lookup_secret(state, &conversation, &name, &c, v.get("description"));
        }
    }
}

/// Offer the user's stored secrets to a new conversation as lookups (those not already in
/// `secrets`; only `allowed` names when a launched profile restricts them).
pub async fn inject(
    state: &AppState,
    conversation: ConversationId,
    user: &UserId,
    secrets: &mut Map<String, Value>,
    allowed: Option<&[String]>,
) {
    let mut cred = Credential { state, conversation, user, key: None };
    // Reuse the credential already handed out by `rewrite`, if any: one per conversation.
    for v in secrets.values() {
        if let Some(k) = v.get("url").and_then(Value::as_str).filter(|u| u.starts_with(&state.internal_url)).and(v["headers"]["X-Session-API-Key"].as_str()) {
            cred.key = Some(k.to_owned());
            break;
        }
    }
    for (name, description) in state.settings.secret_names(user).await {
        if secrets.contains_key(&name) || allowed.is_some_and(|a| !a.iter().any(|x| x == &name)) {
            continue;
        }
        let c = cred.get();
        let v = lookup_secret(state, &conversation, &name, &c, description.as_ref());
        secrets.insert(name, v);
    }
}

/// `GET /nestor/secrets/{conversation}/{name}`: the value, as `text/plain`, for the
/// conversation's downstream presenting that conversation's credential.
pub async fn lookup(State(state): State<AppState>, Path((conv, name)): Path<(String, String)>, req: Request<Body>) -> HttpResult {
    let who = state.auth.check_headers(req.headers())?;
    let conversation = ConversationId::parse(&conv).map_err(|_| ApiError::Unauthorized)?;
    if who.scope != Scope::Secrets(conversation) || state.catalog.route(&conversation).is_none() {
        return Err(ApiError::Unauthorized.into());
    }
    match state.settings.secret(&who.user, &name).await {
        Some(value) => {
            metrics::counter!("nestor_secret_lookups_total", "result" => "ok").increment(1);
            let mut r = Response::new(Body::from(value));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            *r.status_mut() = StatusCode::OK;
            Ok(r)
        }
        None => {
            metrics::counter!("nestor_secret_lookups_total", "result" => "not_found").increment(1);
            Err(ApiError::NotFound("Secret not found".into()).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_settings_secret_urls() {
        assert_eq!(settings_secret_name("/api/settings/secrets/GH"), Some("GH"));
        assert_eq!(settings_secret_name("http://127.0.0.1:8000/api/settings/secrets/GH"), Some("GH"));
        assert_eq!(settings_secret_name("/api/settings/secrets/a/b"), None);
        assert_eq!(settings_secret_name("https://vault.example/x"), None);
    }
}
