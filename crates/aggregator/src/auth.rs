//! Client authentication, exactly as the agent-server does it, plus the two things an
//! aggregator adds: users and conversation keys.
//!
//! * REST: header `X-Session-API-Key` must be a valid key, else
//!   `401 {"detail":"Unauthorized"}`. Health and info routes are public. No keys configured
//!   means no authentication. Several keys may be valid at once (rotation).
//! * **Users**: `[[users]] id = "…" session_api_keys = […]` maps keys to users; the
//!   top-level `session_api_keys` belong to the user `default`. Everything a user creates is
//!   theirs; another user's conversation answers exactly like an unknown one.
//! * **Conversation keys**: `POST /api/conversations/{id}/runtime/credentials` mints a key
//!   that opens that one conversation (its routes, its sockets, and the host-global
//!   workspace routes, which it addresses). Only a hash is kept on disk; the key is revoked
//!   when the conversation is deleted.
//!
//! Keys are compared in constant time.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::RwLock;

use http::HeaderMap;
use nestor_core::{ApiError, ConversationId, SessionKey, UserId};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a key grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Everything the user owns.
    User,
    /// One conversation only.
    Conversation(ConversationId),
    /// Only the secret lookups of one conversation (the credential its downstream uses in
    /// the `LookupSecret` URLs nestor hands it).
    Secrets(ConversationId),
    /// Only the VS Code of one conversation (the token in the VS Code URL nestor answers).
    Vscode(ConversationId),
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user: UserId,
    pub scope: Scope,
}

impl Principal {
    /// Access to `id` (owned by `owner`) is allowed.
    pub fn may_access(&self, id: &ConversationId, owner: &UserId) -> bool {
        owner == &self.user
            && match &self.scope {
                Scope::User => true,
                Scope::Conversation(c) => c == id,
                Scope::Secrets(_) | Scope::Vscode(_) => false,
            }
    }

    /// The conversation a conversation key is bound to.
    pub fn conversation(&self) -> Option<ConversationId> {
        match self.scope {
            Scope::Conversation(c) => Some(c),
            Scope::User | Scope::Secrets(_) | Scope::Vscode(_) => None,
        }
    }
}

/// `[[users]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub id: String,
    #[serde(default)]
    pub session_api_keys: Vec<SessionKey>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredConversationKey {
    /// SHA-256 of the key, hex.
    sha256: String,
    conversation: ConversationId,
    user: UserId,
    #[serde(default)]
    kind: KeyKind,
}

/// What a minted key opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
enum KeyKind {
    #[default]
    Conversation,
    Secrets,
    Vscode,
}

#[derive(Debug)]
pub struct Auth {
    keys: Vec<(SessionKey, UserId)>,
    /// sha256(key) → (conversation, user, what it opens).
    conversation_keys: RwLock<HashMap<[u8; 32], (ConversationId, UserId, KeyKind)>>,
    store: Option<PathBuf>,
}

fn digest(k: &[u8]) -> [u8; 32] {
    Sha256::digest(k).into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

impl Auth {
    /// Keys of the `default` user only (no `[[users]]`, no conversation keys store).
    pub fn new(keys: Vec<SessionKey>) -> Self {
        Self::with_users(keys, &[], None)
    }

    /// Top-level keys (user `default`), `[[users]]`, and where conversation keys persist.
    pub fn with_users(default_keys: Vec<SessionKey>, users: &[UserConfig], store: Option<PathBuf>) -> Self {
        let mut keys: Vec<(SessionKey, UserId)> =
            default_keys.into_iter().map(|k| (k, UserId::default_user())).collect();
        for u in users {
            for k in &u.session_api_keys {
                keys.push((k.clone(), UserId::new(u.id.as_str())));
            }
        }
        let mut conversation_keys = HashMap::new();
        if let Some(p) = &store {
            if let Ok(bytes) = std::fs::read(p) {
                match serde_json::from_slice::<Vec<StoredConversationKey>>(&bytes) {
                    Ok(v) => {
                        for s in v {
                            if let Some(h) = unhex(&s.sha256) {
                                conversation_keys.insert(h, (s.conversation, s.user, s.kind));
                            }
                        }
                    }
                    Err(e) => tracing::warn!(file = %p.display(), "ignoring unreadable conversation keys: {e}"),
                }
            }
        }
        Self { keys, conversation_keys: RwLock::new(conversation_keys), store }
    }

    /// True when no key is configured (open server).
    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whose conversations a user-scoped caller lists (None: an open server lists all).
    pub fn listing_scope(&self, user: &UserId) -> Option<UserId> {
        (!self.is_open()).then(|| user.clone())
    }

    /// Who a presented key belongs to, if anyone.
    pub fn principal_for_key(&self, presented: &[u8]) -> Option<Principal> {
        if self.is_open() {
            return Some(Principal { user: UserId::default_user(), scope: Scope::User });
        }
        // Check every key (no early exit) so timing does not reveal which one matched.
        let mut found: Option<&UserId> = None;
        for (k, u) in &self.keys {
            if k.matches(presented) {
                found = Some(u);
            }
        }
        if let Some(u) = found {
            return Some(Principal { user: u.clone(), scope: Scope::User });
        }
        let map = self.conversation_keys.read().unwrap();
        if map.is_empty() || presented.is_empty() {
            return None;
        }
        map.get(&digest(presented)).map(|(c, u, kind)| Principal {
            user: u.clone(),
            scope: match kind {
                KeyKind::Conversation => Scope::Conversation(*c),
                KeyKind::Secrets => Scope::Secrets(*c),
                KeyKind::Vscode => Scope::Vscode(*c),
            },
        })
    }

    /// The user a presented key belongs to (any scope).
    pub fn user_for_key(&self, presented: &[u8]) -> Option<UserId> {
        self.principal_for_key(presented).map(|p| p.user)
    }

    /// Authenticate a REST request by its `X-Session-API-Key` header.
    pub fn check_headers(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        let presented = headers.get(nestor_core::SESSION_KEY_HEADER).map(|v| v.as_bytes()).unwrap_or(b"");
        self.principal_for_key(presented).ok_or(ApiError::Unauthorized)
    }

    /// Authenticate and require a user key (not a conversation key): for routes that are
    /// not about one conversation (create, search, settings, …).
    pub fn check_user(&self, headers: &HeaderMap) -> Result<UserId, ApiError> {
        match self.check_headers(headers)? {
            Principal { user, scope: Scope::User } => Ok(user),
            _ => Err(ApiError::Unauthorized),
        }
    }

    /// Authenticate and reject secrets-only credentials (they open nothing but lookups).
    pub fn check_client(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        match self.check_headers(headers)? {
            Principal { scope: Scope::Secrets(_) | Scope::Vscode(_), .. } => Err(ApiError::Unauthorized),
            p => Ok(p),
        }
    }

    /// Mint a key for one conversation. Returned once; only its hash is kept.
    pub fn mint_conversation_key(&self, conversation: ConversationId, user: UserId) -> SessionKey {
        self.mint(conversation, user, KeyKind::Conversation)
    }

    /// Mint the token of a conversation's VS Code URL (opens only that VS Code).
    pub fn mint_vscode_token(&self, conversation: ConversationId, user: UserId) -> SessionKey {
        self.mint(conversation, user, KeyKind::Vscode)
    }

    /// Mint the credential a conversation's downstream presents when it looks up one of
    /// the user's secrets at nestor. It opens nothing else.
    pub fn mint_secrets_credential(&self, conversation: ConversationId, user: UserId) -> SessionKey {
        self.mint(conversation, user, KeyKind::Secrets)
    }

    fn mint(&self, conversation: ConversationId, user: UserId, kind: KeyKind) -> SessionKey {
        let key = SessionKey::random();
        self.conversation_keys.write().unwrap().insert(digest(key.expose().as_bytes()), (conversation, user, kind));
        self.persist();
        key
    }

    /// Revoke every key of `conversation` (it was deleted).
    pub fn revoke_conversation(&self, conversation: &ConversationId) {
        let removed = {
            let mut m = self.conversation_keys.write().unwrap();
            let before = m.len();
            m.retain(|_, (c, _, _)| c != conversation);
            before != m.len()
        };
        if removed {
            self.persist();
        }
    }

    fn persist(&self) {
        let Some(p) = &self.store else { return };
        let v: Vec<StoredConversationKey> = self
            .conversation_keys
            .read()
            .unwrap()
            .iter()
            .map(|(h, (c, u, k))| StoredConversationKey { sha256: hex(h), conversation: *c, user: u.clone(), kind: *k })
            .collect();
        match serde_json::to_vec(&v) {
            Ok(bytes) => {
                if let Err(e) = nestor_core::fs::write_atomic(p, &bytes) {
                    tracing::error!(file = %p.display(), "cannot persist conversation keys: {e}");
                }
            }
            Err(e) => tracing::error!("cannot serialise conversation keys: {e}"),
        }
    }

    /// The first configured key of the default user (what nestor puts on its own outgoing
    /// webhooks, like an agent-server puts its first key).
    pub fn first_key(&self) -> Option<&SessionKey> {
        self.keys.first().map(|(k, _)| k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(k: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-session-api-key", k.parse().unwrap());
        h
    }

    #[test]
    fn rotation_and_missing_keys() {
        let a = Auth::new(vec![SessionKey::new("old"), SessionKey::new("new")]);
        assert!(matches!(a.check_headers(&HeaderMap::new()), Err(ApiError::Unauthorized)));
        assert!(a.check_headers(&h("new")).is_ok());
        assert!(a.check_headers(&h("old")).is_ok());
        assert!(a.check_headers(&h("nope")).is_err());
        assert!(Auth::new(vec![]).check_headers(&HeaderMap::new()).is_ok());
    }

    #[test]
    fn users_and_conversation_keys() {
        let users = vec![UserConfig { id: "alice".into(), session_api_keys: vec![SessionKey::new("a1")] }];
        let dir = std::env::temp_dir().join(format!("nestor-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = dir.join("keys.json");
        let a = Auth::with_users(vec![SessionKey::new("d")], &users, Some(store.clone()));
        assert_eq!(a.check_user(&h("a1")).unwrap(), UserId::new("alice"));
        assert_eq!(a.check_user(&h("d")).unwrap(), UserId::default_user());
        let c = ConversationId::new_random();
        let k = a.mint_conversation_key(c, UserId::new("alice"));
        let p = a.check_headers(&h(k.expose())).unwrap();
        assert_eq!(p.conversation(), Some(c));
        assert!(p.may_access(&c, &UserId::new("alice")));
        assert!(!p.may_access(&ConversationId::new_random(), &UserId::new("alice")));
        assert!(a.check_user(&h(k.expose())).is_err(), "a conversation key is not a user key");
        // Persisted (hashed) and reloaded; revoked on delete.
        assert!(!std::fs::read_to_string(&store).unwrap().contains(k.expose()));
        let b = Auth::with_users(vec![SessionKey::new("d")], &users, Some(store.clone()));
        assert!(b.check_headers(&h(k.expose())).is_ok());
        b.revoke_conversation(&c);
        assert!(b.check_headers(&h(k.expose())).is_err());
        let alice = a.check_headers(&h("a1")).unwrap();
        assert!(!alice.may_access(&c, &UserId::default_user()), "another user's conversation");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
