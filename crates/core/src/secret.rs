//! Session keys: compared in constant time, never printed.

use std::fmt;

use rand::Rng;
use subtle::ConstantTimeEq;

/// A session API key (a client's, or a downstream's own).
///
/// `Debug` and `Display` print a fixed mask, so a key cannot reach a log line by accident.
/// Generated keys use only URL-safe alphanumerics, so they read the same raw, JSON-escaped,
/// percent-encoded or in a header — which is what lets the leak guard find them anywhere.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SessionKey(String);

impl SessionKey {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// A fresh random key: 43 alphanumerics (~256 bits).
    pub fn random() -> Self {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let mut rng = rand::thread_rng();
        let s: String = (0..43)
            .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
            .collect();
        Self(s)
    }

    /// The raw key. Call sites are the few places a key legitimately leaves nestor
    /// (a header to a downstream, a child process environment).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Constant-time comparison with a presented key.
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(presented).into()
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(**********)")
    }
}

impl fmt::Display for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("**********")
    }
}

impl<'de> serde::Deserialize<'de> for SessionKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(SessionKey)
    }
}

impl serde::Serialize for SessionKey {
    /// Serialises the raw value: only used for nestor's own private state files.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints() {
        let k = SessionKey::new("hunter2");
        assert!(!format!("{k:?} {k}").contains("hunter2"));
    }

    #[test]
    fn random_keys_are_url_safe_and_distinct() {
        let a = SessionKey::random();
        let b = SessionKey::random();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 43);
        assert!(a.expose().bytes().all(|c| c.is_ascii_alphanumeric()));
        assert!(a.matches(a.expose().as_bytes()));
        assert!(!a.matches(b.expose().as_bytes()));
    }
}
