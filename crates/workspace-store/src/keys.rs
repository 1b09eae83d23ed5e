//! Object keys and relative paths: the only places where names become keys or local paths.
//!
//! Every object key is built here from validated parts, so no user id, prefix or file name can
//! reach outside `{prefix}/{user}/{conversation}/`:
//!
//! ```text
//! {prefix}/{user}/{conversation-hex}/workspace/manifest.json
//! {prefix}/{user}/{conversation-hex}/workspace/blobs/{h[0..2]}/{h}     h = BLAKE3 of the content
//! {prefix}/{user}/{conversation-hex}/state/manifest.json
//! {prefix}/{user}/{conversation-hex}/state/blobs/{h[0..2]}/{h}
//! ```
//!
//! File names never become keys (blobs are named by their hash), so keys have no length or
//! character problems whatever the tree holds. File names only live inside manifests, as
//! [`RelPath`]s, which are checked again whenever a manifest is read back from the bucket.

use std::fmt;

use nestor_core::{ConversationId, UserId};
use object_store::path::Path as ObjectPath;
use serde::{Deserialize, Serialize};

use crate::error::StoreError;

/// Which of a conversation's two trees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Area {
    /// The agent's working directory (the user's files).
    Workspace,
    /// The downstream agent-server's own state for the conversation (events, bash history,
    /// persistence dir), so the conversation resumes on a fresh downstream.
    State,
}

impl Area {
    pub const ALL: [Area; 2] = [Area::Workspace, Area::State];

    pub fn as_str(self) -> &'static str {
        match self {
            Area::Workspace => "workspace",
            Area::State => "state",
        }
    }
}

impl fmt::Display for Area {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Longest user id or prefix segment accepted as a key segment.
pub const MAX_SEGMENT: usize = 128;

/// Checks one key segment (a user id, or one `/`-separated part of the prefix): 1 to 128
/// characters from `A-Z a-z 0-9 . _ - @ + =`, not starting with a dot (so never `.` or `..`).
/// These are safe in S3 keys, URLs and file systems without any encoding.
pub fn validate_segment(what: &str, s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if s.len() > MAX_SEGMENT {
        return Err(format!("{what} {s:?} is longer than {MAX_SEGMENT} characters"));
    }
    if s.starts_with('.') {
        return Err(format!("{what} {s:?} starts with a dot"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | '+' | '=')))
    {
        return Err(format!(
            "{what} {s:?} contains {c:?}; allowed are letters, digits and . _ - @ + ="
        ));
    }
    Ok(())
}

/// Checks a key prefix: empty, or `/`-separated valid segments (no leading, trailing or
/// doubled slash).
pub fn validate_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Ok(());
    }
    for seg in prefix.split('/') {
        validate_segment("prefix segment", seg).map_err(|e| format!("prefix {prefix:?}: {e}"))?;
    }
    Ok(())
}

/// The keys of one conversation.
#[derive(Debug, Clone)]
pub(crate) struct ConversationKeys {
    /// `{prefix}/{user}/{conversation-hex}`
    base: String,
}

impl ConversationKeys {
    pub(crate) fn new(prefix: &str, user: &UserId, conversation: ConversationId) -> Result<Self, StoreError> {
        validate_prefix(prefix).map_err(StoreError::Config)?;
        validate_segment("user id", user.as_str()).map_err(StoreError::InvalidId)?;
        let conv = conversation.hex();
        let base = if prefix.is_empty() {
            format!("{}/{conv}", user.as_str())
        } else {
            format!("{prefix}/{}/{conv}", user.as_str())
        };
        Ok(Self { base })
    }

    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    pub(crate) fn conversation_prefix(&self) -> ObjectPath {
        parse(&self.base)
    }

    pub(crate) fn manifest(&self, area: Area) -> ObjectPath {
        parse(&format!("{}/{}/manifest.json", self.base, area.as_str()))
    }

    pub(crate) fn blobs_prefix(&self, area: Area) -> ObjectPath {
        parse(&format!("{}/{}/blobs", self.base, area.as_str()))
    }

    /// `hash` must be a validated hash ([`is_hash`]).
    pub(crate) fn blob(&self, area: Area, hash: &str) -> ObjectPath {
        debug_assert!(is_hash(hash));
        parse(&format!("{}/{}/blobs/{}/{hash}", self.base, area.as_str(), &hash[..2]))
    }

    /// The hash a blob key names, if `key` is a blob of `area` (for the orphan sweep).
    pub(crate) fn hash_of_blob(&self, area: Area, key: &ObjectPath) -> Option<String> {
        let k = key.as_ref();
        let rest = k.strip_prefix(&format!("{}/{}/blobs/", self.base, area.as_str()))?;
        let (dir, hash) = rest.split_once('/')?;
        (is_hash(hash) && dir == &hash[..2]).then(|| hash.to_owned())
    }
}

fn parse(s: &str) -> ObjectPath {
    // Built only from validated segments, hex and fixed words: always a valid path.
    ObjectPath::parse(s).expect("validated key")
}

/// A BLAKE3 hash in lower-case hex (64 digits).
pub fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Longest relative path accepted in a manifest (Linux PATH_MAX).
pub const MAX_REL_PATH: usize = 4096;
/// Longest single name (Linux NAME_MAX).
pub const MAX_NAME: usize = 255;

/// A path inside a tree, as stored in a manifest: `/`-separated UTF-8 names, relative, with
/// no empty, `.` or `..` component and no NUL. Joining a valid `RelPath` to a directory can
/// only name something inside that directory (symlinks aside: see the crate docs for why no
/// restored entry ever has a symlink as an ancestor).
pub fn validate_rel_path(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("empty path".into());
    }
    if p.len() > MAX_REL_PATH {
        return Err(format!("path longer than {MAX_REL_PATH} bytes"));
    }
    if p.contains('\0') {
        return Err(format!("path {p:?} contains NUL"));
    }
    for c in p.split('/') {
        if c.is_empty() {
            return Err(format!("path {p:?} is absolute or has an empty component"));
        }
        if c == "." || c == ".." {
            return Err(format!("path {p:?} has a {c:?} component"));
        }
        if c.len() > MAX_NAME {
            return Err(format!("path {p:?} has a name longer than {MAX_NAME} bytes"));
        }
    }
    Ok(())
}

/// The parent of a relative path (`None` at the top).
pub(crate) fn parent(p: &str) -> Option<&str> {
    p.rsplit_once('/').map(|(a, _)| a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments() {
        for ok in ["default", "alice@example.com", "u-1_2.3+x=y", "A"] {
            validate_segment("user id", ok).unwrap();
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "ä", "a\0", &"x".repeat(129), "a\\b", "%2e%2e"] {
            assert!(validate_segment("user id", bad).is_err(), "{bad:?}");
        }
        validate_prefix("").unwrap();
        validate_prefix("nestor/prod").unwrap();
        for bad in ["/nestor", "nestor/", "a//b", "a/../b", "a/./b"] {
            assert!(validate_prefix(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn layout() {
        let c = ConversationId::parse("0a8b12be-0792-4413-8dd9-066610cb0473").unwrap();
        let k = ConversationKeys::new("p/q", &UserId::new("alice"), c).unwrap();
        assert_eq!(k.manifest(Area::Workspace).as_ref(), "p/q/alice/0a8b12be079244138dd9066610cb0473/workspace/manifest.json");
        let h = "ab".repeat(32);
        let blob = k.blob(Area::State, &h);
        assert_eq!(blob.as_ref(), format!("p/q/alice/0a8b12be079244138dd9066610cb0473/state/blobs/ab/{h}"));
        assert_eq!(k.hash_of_blob(Area::State, &blob), Some(h.clone()));
        assert_eq!(k.hash_of_blob(Area::Workspace, &blob), None);
        let k2 = ConversationKeys::new("", &UserId::new("bob"), c).unwrap();
        assert_eq!(k2.conversation_prefix().as_ref(), "bob/0a8b12be079244138dd9066610cb0473");
        assert!(matches!(ConversationKeys::new("", &UserId::new("../bob"), c), Err(StoreError::InvalidId(_))));
    }

    #[test]
    fn rel_paths() {
        for ok in ["a", "a/b/c", "with space/ünïcode", "..a", "a..", ".git/config", "-x"] {
            validate_rel_path(ok).unwrap();
        }
        for bad in ["", "/a", "a/", "a//b", "..", "../a", "a/../b", "./a", "a/.", "a\0b", &"x".repeat(256)] {
            assert!(validate_rel_path(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parent("a/b/c"), Some("a/b"));
        assert_eq!(parent("a"), None);
    }

    #[test]
    fn hashes() {
        assert!(is_hash(&"0f".repeat(32)));
        assert!(!is_hash(&"0F".repeat(32)));
        assert!(!is_hash("../../etc"));
        assert!(!is_hash(&"0".repeat(63)));
    }
}
