//! Client authentication, exactly as the agent-server does it.
//!
//! REST: header `X-Session-API-Key` must equal one of the configured keys (several may be
//! valid at once, for rotation), else `401 {"detail":"Unauthorized"}`. Health and info
//! routes are public. No keys configured means no authentication. Keys are compared in
//! constant time.

use http::HeaderMap;
use nestor_core::{ApiError, SessionKey, UserId};

#[derive(Debug, Clone)]
pub struct Auth {
    keys: Vec<SessionKey>,
}

impl Auth {
    pub fn new(keys: Vec<SessionKey>) -> Self {
        Self { keys }
    }

    /// True when no key is configured (open server).
    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// The user a presented key belongs to, if it is valid.
    pub fn user_for_key(&self, presented: &[u8]) -> Option<UserId> {
        if self.is_open() {
            return Some(UserId::default_user());
        }
        // Check every key (no early exit) so timing does not reveal which one matched.
        let mut ok = false;
        for k in &self.keys {
            ok |= k.matches(presented);
        }
        ok.then(UserId::default_user)
    }

    /// Authenticate a REST request by its `X-Session-API-Key` header.
    pub fn check_headers(&self, headers: &HeaderMap) -> Result<UserId, ApiError> {
        if self.is_open() {
            return Ok(UserId::default_user());
        }
        let presented = headers.get(nestor_core::SESSION_KEY_HEADER).map(|v| v.as_bytes()).unwrap_or(b"");
        self.user_for_key(presented).ok_or(ApiError::Unauthorized)
    }

    pub fn keys(&self) -> &[SessionKey] {
        &self.keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_and_missing_keys() {
        let a = Auth::new(vec![SessionKey::new("old"), SessionKey::new("new")]);
        let mut h = HeaderMap::new();
        assert!(matches!(a.check_headers(&h), Err(ApiError::Unauthorized)));
        h.insert("x-session-api-key", "new".parse().unwrap());
        assert!(a.check_headers(&h).is_ok());
        h.insert("x-session-api-key", "old".parse().unwrap());
        assert!(a.check_headers(&h).is_ok());
        h.insert("x-session-api-key", "nope".parse().unwrap());
        assert!(a.check_headers(&h).is_err());
        assert!(Auth::new(vec![]).check_headers(&HeaderMap::new()).is_ok());
    }
}
