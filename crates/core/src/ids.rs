//! Typed identifiers.
//!
//! A conversation id is a UUID. The agent-server writes it with dashes in URLs and bodies and
//! as 32 hex digits (no dashes) on disk, in webhook URLs and in search page tokens. It accepts
//! every form the `uuid` crate parses (that is what pydantic-core uses), so nestor does too,
//! and reports a bad id with exactly the agent-server's words.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A conversation's id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ConversationId(Uuid);

/// Why a string is not a conversation id. The message is the one the agent-server puts in its
/// 422 `uuid_parsing` error (e.g. "invalid character: found `x` at 0").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct IdParseError(pub String);

impl ConversationId {
    /// A fresh random (v4) id, as the agent-server mints them.
    pub fn new_random() -> Self {
        Self(Uuid::new_v4())
    }

    pub fn from_uuid(u: Uuid) -> Self {
        Self(u)
    }

    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }

    /// The 32-hex-digit form used on disk, in webhook URLs and page tokens.
    pub fn hex(&self) -> String {
        self.0.simple().to_string()
    }

    /// Parse any form the agent-server accepts (dashed, simple, braced, urn).
    pub fn parse(s: &str) -> Result<Self, IdParseError> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|e| IdParseError(e.to_string()))
    }
}

impl FromStr for ConversationId {
    type Err = IdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for ConversationId {
    /// The dashed form used in URLs and JSON bodies.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl fmt::Debug for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConversationId({})", self.0.hyphenated())
    }
}

/// A downstream agent-server's id, unique within one nestor: `<provisioner>-<name>`
/// (e.g. `process-3f2a…`, `existing-0`). Never shown to clients as an address.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DownstreamId(std::sync::Arc<str>);

impl DownstreamId {
    pub fn new(s: impl Into<std::sync::Arc<str>>) -> Self {
        Self(s.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DownstreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DownstreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DownstreamId({})", self.0)
    }
}

/// The user a client key belongs to. Single-user deployments use [`UserId::default_user`].
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserId(std::sync::Arc<str>);

impl UserId {
    pub fn new(s: impl Into<std::sync::Arc<str>>) -> Self {
        Self(s.into())
    }
    /// The owner of everything when no `[[users]]` are configured.
    pub fn default_user() -> Self {
        Self::new("default")
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UserId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_every_form_the_agent_server_accepts() {
        let dashed = "0a8b12be-0792-4413-8dd9-066610cb0473";
        let id = ConversationId::parse(dashed).unwrap();
        assert_eq!(id.to_string(), dashed);
        assert_eq!(id.hex(), "0a8b12be079244138dd9066610cb0473");
        for form in [
            "0a8b12be079244138dd9066610cb0473",
            "{0a8b12be-0792-4413-8dd9-066610cb0473}",
            "urn:uuid:0a8b12be-0792-4413-8dd9-066610cb0473",
            "0A8B12BE-0792-4413-8DD9-066610CB0473",
        ] {
            assert_eq!(ConversationId::parse(form).unwrap(), id, "{form}");
        }
    }

    #[test]
    fn rejects_with_the_agent_servers_words() {
        // Messages captured from a real agent-server 1.58.2.
        let cases = [
            ("xyz", "invalid character: found `x` at 0"),
            ("00000000-0000-0000-0000-00000000000", "invalid group length in group 4: expected 12, found 11"),
            ("0000-0000", "invalid group count: expected 5, found 2"),
            ("00000000000000000000000000000000000", "invalid length: found 35"),
            ("00000000-0000-0000-0000_000000000001", "invalid character: found `_` at 23"),
            ("ÄÖ", "invalid character: found `Ä` at 0"),
        ];
        for (input, msg) in cases {
            assert_eq!(ConversationId::parse(input).unwrap_err().0, msg, "{input}");
        }
    }

    proptest! {
        #[test]
        fn display_and_hex_round_trip(bytes in any::<[u8; 16]>()) {
            let id = ConversationId::from_uuid(Uuid::from_bytes(bytes));
            prop_assert_eq!(ConversationId::parse(&id.to_string()).unwrap(), id);
            prop_assert_eq!(ConversationId::parse(&id.hex()).unwrap(), id);
        }

        #[test]
        fn parse_never_panics(s in ".{0,64}") {
            let _ = ConversationId::parse(&s);
        }
    }
}
