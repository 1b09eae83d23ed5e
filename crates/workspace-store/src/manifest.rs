//! The manifest: the one object that says what a stored tree is.
//!
//! ```json
//! {
//!   "format": 1,
//!   "hash": "blake3",
//!   "generation": 7,
//!   "pushed_at": "2026-11-02T10:00:00Z",
//!   "entries": {
//!     "src":         {"t": "dir", "mode": 493},
//!     "src/main.rs": {"t": "file", "size": 1234, "mtime_ns": 1762077600123456789, "mode": 420,
//!                     "hash": "9f2c…64 hex digits…"},
//!     "latest":      {"t": "symlink", "target": "src/main.rs"}
//!   }
//! }
//! ```
//!
//! A file's content is the blob named by its hash (`…/blobs/9f/9f2c…`). Every directory is
//! listed (so empty ones survive) and every entry's parent is a `dir` entry: no stored entry
//! can sit below a file or a symlink, which is what makes restoring safe.
//!
//! The same manifest, with the local `stat` of every file beside it, is kept on the local disk
//! as the [`LocalCache`]: the next push compares a fresh `stat` with it and hashes only files
//! whose size, mtime, ctime, inode or mode changed.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::StoreError;
use crate::keys::{is_hash, parent, validate_rel_path, Area, MAX_REL_PATH};

pub const FORMAT: u32 = 1;
pub const HASH_ALG: &str = "blake3";

/// A stored tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub hash: String,
    /// 1 for the first push, +1 for every push that changed something.
    pub generation: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub pushed_at: OffsetDateTime,
    pub entries: BTreeMap<String, Entry>,
}

/// One path of a stored tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case", deny_unknown_fields)]
pub enum Entry {
    File {
        size: u64,
        /// Modification time, ns since the epoch (restored on pull).
        mtime_ns: i64,
        /// Permission bits (`0o777`; setuid/setgid/sticky are not kept).
        mode: u32,
        hash: String,
    },
    Symlink {
        /// The link's text, stored as is and never followed.
        target: String,
    },
    Dir {
        mode: u32,
    },
}

/// What a tree counts against the quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Files and symlinks.
    pub files: u64,
    /// Bytes of regular files.
    pub bytes: u64,
}

impl std::ops::Add for Totals {
    type Output = Totals;
    fn add(self, o: Totals) -> Totals {
        Totals { files: self.files + o.files, bytes: self.bytes + o.bytes }
    }
}

impl Manifest {
    pub fn empty() -> Self {
        Self {
            format: FORMAT,
            hash: HASH_ALG.into(),
            generation: 0,
            pushed_at: OffsetDateTime::UNIX_EPOCH,
            entries: BTreeMap::new(),
        }
    }

    pub fn totals(&self) -> Totals {
        totals_of(&self.entries)
    }

    /// Every blob hash the manifest refers to.
    pub fn blobs(&self) -> HashSet<&str> {
        self.entries
            .values()
            .filter_map(|e| match e {
                Entry::File { hash, .. } => Some(hash.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Checks a manifest read back from the bucket (which is not trusted: anyone with write
    /// access to it could have put anything there). Nothing of a manifest that fails is used.
    pub fn validate(&self, key: &str, max_entries: u64) -> Result<(), StoreError> {
        let bad = |reason: String| Err(StoreError::CorruptManifest { key: key.to_owned(), reason });
        if self.format != FORMAT {
            return bad(format!("unknown format {} (this nestor reads {FORMAT})", self.format));
        }
        if self.hash != HASH_ALG {
            return bad(format!("unknown hash {:?}", self.hash));
        }
        if self.entries.len() as u64 > max_entries {
            return bad(format!("{} entries, more than max_entries = {max_entries}", self.entries.len()));
        }
        for (path, entry) in &self.entries {
            if let Err(e) = validate_rel_path(path) {
                return bad(e);
            }
            if let Some(p) = parent(path) {
                if !matches!(self.entries.get(p), Some(Entry::Dir { .. })) {
                    return bad(format!("{path:?} is not inside a stored directory"));
                }
            }
            match entry {
                Entry::File { hash, mode, .. } => {
                    if !is_hash(hash) {
                        return bad(format!("{path:?} has a malformed hash"));
                    }
                    if *mode > 0o777 {
                        return bad(format!("{path:?} has mode {mode:o}"));
                    }
                }
                Entry::Dir { mode } => {
                    if *mode > 0o777 {
                        return bad(format!("{path:?} has mode {mode:o}"));
                    }
                }
                Entry::Symlink { target } => {
                    if target.is_empty() || target.len() > MAX_REL_PATH || target.contains('\0') {
                        return bad(format!("{path:?} has an unusable symlink target"));
                    }
                }
            }
        }
        Ok(())
    }
}

pub(crate) fn totals_of(entries: &BTreeMap<String, Entry>) -> Totals {
    let mut t = Totals::default();
    for e in entries.values() {
        match e {
            Entry::File { size, .. } => {
                t.files += 1;
                t.bytes += size;
            }
            Entry::Symlink { .. } => t.files += 1,
            Entry::Dir { .. } => {}
        }
    }
    t
}

/// What `stat` said about a local file when its hash was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LocalStat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub mode: u32,
}

/// The local copy of the stored manifest, plus the local stat of each file whose hash is known.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LocalCache {
    pub format: u32,
    /// The conversation's key prefix, so a cache is never used for another conversation.
    pub base: String,
    pub area: Area,
    /// The stored manifest's ETag when this cache was written.
    pub etag: Option<String>,
    pub manifest: Manifest,
    /// The directory the stats describe.
    pub local_dir: PathBuf,
    /// path → (stat, hash of the content that stat described).
    pub stats: BTreeMap<String, (LocalStat, String)>,
}

impl LocalCache {
    pub(crate) fn read(path: &Path, base: &str, area: Area) -> Option<LocalCache> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "workspace store: unreadable local manifest, ignoring it");
                return None;
            }
        };
        match serde_json::from_slice::<LocalCache>(&bytes) {
            Ok(c) if c.format == FORMAT && c.base == base && c.area == area => Some(c),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "workspace store: corrupt local manifest, ignoring it");
                None
            }
        }
    }

    /// Written to a temporary file and renamed over the old one: never half-written.
    pub(crate) fn write(&self, path: &Path) -> Result<(), StoreError> {
        let dir = path.parent().expect("cache path has a parent");
        std::fs::create_dir_all(dir).map_err(|e| StoreError::local("create", dir, e))?;
        let tmp = dir.join(format!(".{}.tmp-{:016x}", self.area, rand::random::<u64>()));
        let bytes = serde_json::to_vec(self).expect("serializable");
        std::fs::write(&tmp, bytes).map_err(|e| StoreError::local("write", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            StoreError::local("rename", path, e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(hash: &str) -> Entry {
        Entry::File { size: 3, mtime_ns: 1, mode: 0o644, hash: hash.into() }
    }

    fn manifest(entries: &[(&str, Entry)]) -> Manifest {
        let mut m = Manifest::empty();
        m.generation = 1;
        for (p, e) in entries {
            m.entries.insert((*p).into(), e.clone());
        }
        m
    }

    #[test]
    fn json_shape_round_trips() {
        let h = "a".repeat(64);
        let m = manifest(&[
            ("d", Entry::Dir { mode: 0o755 }),
            ("d/f", file(&h)),
            ("l", Entry::Symlink { target: "/etc/passwd".into() }),
        ]);
        let j = serde_json::to_value(&m).unwrap();
        assert_eq!(j["entries"]["d/f"]["t"], "file");
        assert_eq!(j["entries"]["l"]["target"], "/etc/passwd");
        assert_eq!(j["pushed_at"], "1970-01-01T00:00:00Z");
        let back: Manifest = serde_json::from_value(j).unwrap();
        assert_eq!(back, m);
        m.validate("k", 10).unwrap();
        assert_eq!(m.totals(), Totals { files: 2, bytes: 3 });
        assert_eq!(m.blobs().len(), 1);
    }

    #[test]
    fn unsafe_manifests_are_refused() {
        let h = "b".repeat(64);
        let cases = vec![
            manifest(&[("../x", file(&h))]),
            manifest(&[("/etc/x", file(&h))]),
            manifest(&[("a/../../x", file(&h))]),
            // Below a file or a symlink, or in a directory that is not stored.
            manifest(&[("a", file(&h)), ("a/b", file(&h))]),
            manifest(&[("a", Entry::Symlink { target: "/etc".into() }), ("a/passwd", file(&h))]),
            manifest(&[("a/b", file(&h))]),
            manifest(&[("a", file("../../../../etc/passwd"))]),
            manifest(&[("a", Entry::File { size: 1, mtime_ns: 0, mode: 0o4755, hash: h.clone() })]),
            manifest(&[("a", Entry::Symlink { target: String::new() })]),
        ];
        for m in cases {
            let r = m.validate("k", 100);
            assert!(matches!(r, Err(StoreError::CorruptManifest { .. })), "{m:?} → {r:?}");
        }
        let mut m = manifest(&[]);
        m.format = 2;
        assert!(m.validate("k", 100).is_err());
        let many = manifest(&[("a", file(&h)), ("b", file(&h))]);
        assert!(many.validate("k", 1).is_err());
        let r: Result<Manifest, _> = serde_json::from_str(r#"{"format":1,"hash":"blake3","generation":1,"pushed_at":"1970-01-01T00:00:00Z","entries":{"a":{"t":"fifo"}}}"#);
        assert!(r.is_err());
    }
}
