//! Walking a local tree (blocking; run on the blocking pool) and reading files safely.
//!
//! Symlinks are never followed: the walk uses `lstat`, a symlink is recorded as a link (its
//! text), and files are opened with `O_NOFOLLOW`, so a file swapped for a symlink between the
//! walk and the read is not read through. FIFOs, sockets and device nodes are skipped (and
//! counted): reading a FIFO could block forever, and devices have no content to keep.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::StoreError;
use crate::keys::{validate_rel_path, MAX_REL_PATH};
use crate::manifest::LocalStat;

/// Read buffer for hashing.
const HASH_BUF: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scanned {
    File(LocalStat),
    Symlink { target: String },
    Dir { mode: u32 },
}

#[derive(Debug, Default)]
pub(crate) struct Scan {
    pub entries: BTreeMap<String, Scanned>,
    /// Paths (files or directories) whose current state could not be read: their stored
    /// entries are kept as they are.
    pub unreadable: Vec<String>,
    /// FIFOs, sockets, devices.
    pub skipped_special: u64,
    /// Names that are not UTF-8, or paths too long for a manifest.
    pub skipped_unsupported: u64,
}

pub(crate) fn stat_of(meta: &std::fs::Metadata) -> LocalStat {
    LocalStat {
        size: meta.len(),
        mtime_ns: meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec()),
        ctime_ns: meta.ctime().saturating_mul(1_000_000_000).saturating_add(meta.ctime_nsec()),
        ino: meta.ino(),
        mode: meta.mode() & 0o777,
    }
}

/// Walks `root` (which must be a real directory, not a symlink to one).
pub(crate) fn scan(root: &Path, max_entries: u64) -> Result<Scan, StoreError> {
    match std::fs::symlink_metadata(root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(StoreError::NotADirectory(root.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StoreError::NotADirectory(root.to_owned())),
        Err(e) => return Err(StoreError::local("stat", root, e)),
    }
    let mut out = Scan::default();
    // (relative path, absolute path); the root is "".
    let mut stack: Vec<(String, PathBuf)> = vec![(String::new(), root.to_owned())];
    while let Some((rel, abs)) = stack.pop() {
        let rd = match std::fs::read_dir(&abs) {
            Ok(rd) => rd,
            Err(e) if rel.is_empty() => return Err(StoreError::local("read directory", &abs, e)),
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::debug!(path = %abs.display(), error = %e, "workspace store: unreadable directory kept as stored");
                    out.unreadable.push(rel);
                }
                continue;
            }
        };
        for dent in rd {
            let dent = match dent {
                Ok(d) => d,
                Err(_) => {
                    if !rel.is_empty() {
                        out.unreadable.push(rel.clone());
                    }
                    break;
                }
            };
            let Some(name) = dent.file_name().to_str().map(str::to_owned) else {
                out.skipped_unsupported += 1;
                continue;
            };
            let child_rel = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            if child_rel.len() > MAX_REL_PATH || validate_rel_path(&child_rel).is_err() {
                out.skipped_unsupported += 1;
                continue;
            }
            let child_abs = dent.path();
            let meta = match std::fs::symlink_metadata(&child_abs) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // deleted meanwhile
                Err(_) => {
                    out.unreadable.push(child_rel);
                    continue;
                }
            };
            if out.entries.len() as u64 >= max_entries {
                return Err(StoreError::TooManyEntries { path: root.to_owned(), limit: max_entries });
            }
            let ft = meta.file_type();
            if ft.is_dir() {
                out.entries.insert(child_rel.clone(), Scanned::Dir { mode: meta.mode() & 0o777 });
                stack.push((child_rel, child_abs));
            } else if ft.is_file() {
                out.entries.insert(child_rel, Scanned::File(stat_of(&meta)));
            } else if ft.is_symlink() {
                match std::fs::read_link(&child_abs) {
                    Ok(t) => match t.to_str() {
                        Some(s) if !s.is_empty() && s.len() <= MAX_REL_PATH => {
                            out.entries.insert(child_rel, Scanned::Symlink { target: s.to_owned() });
                        }
                        _ => out.skipped_unsupported += 1,
                    },
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(_) => out.unreadable.push(child_rel),
                }
            } else {
                out.skipped_special += 1;
            }
        }
    }
    Ok(out)
}

/// Opens a regular file without following a symlink, and checks it is still the file `want`
/// describes (same inode and size). `Ok(None)`: it changed or vanished since the walk.
pub(crate) fn open_checked(path: &Path, want: &LocalStat) -> Result<Option<File>, StoreError> {
    let f = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path) {
        Ok(f) => f,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound) || e.raw_os_error() == Some(libc::ELOOP) => {
            return Ok(None)
        }
        Err(e) => return Err(StoreError::local("open", path, e)),
    };
    let meta = f.metadata().map_err(|e| StoreError::local("stat", path, e))?;
    if !meta.is_file() || meta.ino() != want.ino || meta.len() != want.size {
        return Ok(None);
    }
    Ok(Some(f))
}

/// Whether the open file still has the stat the walk saw (nothing wrote to it meanwhile).
pub(crate) fn unchanged_since(f: &File, path: &Path, want: &LocalStat) -> Result<bool, StoreError> {
    let meta = f.metadata().map_err(|e| StoreError::local("stat", path, e))?;
    let now = stat_of(&meta);
    Ok(now.size == want.size && now.mtime_ns == want.mtime_ns && now.ctime_ns == want.ctime_ns)
}

/// Reads until `buf` is full or EOF; returns the bytes read.
pub(crate) fn read_full(f: &mut File, buf: &mut [u8], path: &Path) -> Result<usize, StoreError> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StoreError::local("read", path, e)),
        }
    }
    Ok(n)
}

/// The BLAKE3 hash of the file `want` describes, streamed in 256 KiB reads. `Ok(None)`: the
/// file changed while it was read (its hash would describe no consistent content).
pub(crate) fn hash_file(path: &Path, want: &LocalStat) -> Result<Option<String>, StoreError> {
    let Some(mut f) = open_checked(path, want)? else { return Ok(None) };
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; HASH_BUF];
    let mut total = 0u64;
    loop {
        let n = read_full(&mut f, &mut buf, path)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > want.size {
            return Ok(None);
        }
        h.update(&buf[..n]);
    }
    if total != want.size || !unchanged_since(&f, path, want)? {
        return Ok(None);
    }
    Ok(Some(h.finalize().to_hex().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn walks_without_following_symlinks() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("a/b")).unwrap();
        std::fs::create_dir(r.join("empty")).unwrap();
        std::fs::write(r.join("a/b/f.txt"), "hello").unwrap();
        symlink(outside.path(), r.join("out")).unwrap();
        symlink("a/b/f.txt", r.join("rel")).unwrap();
        nix_mkfifo(&r.join("fifo"));
        let s = scan(r, 100).unwrap();
        let keys: Vec<_> = s.entries.keys().cloned().collect();
        assert_eq!(keys, ["a", "a/b", "a/b/f.txt", "empty", "out", "rel"]);
        assert_eq!(s.entries["out"], Scanned::Symlink { target: outside.path().to_str().unwrap().into() });
        assert_eq!(s.skipped_special, 1);
        let Scanned::File(st) = &s.entries["a/b/f.txt"] else { panic!() };
        assert_eq!(st.size, 5);
        assert_eq!(
            hash_file(&r.join("a/b/f.txt"), st).unwrap().unwrap(),
            blake3::hash(b"hello").to_hex().to_string()
        );
        // A file replaced by a symlink after the walk is not read through it.
        std::fs::remove_file(r.join("a/b/f.txt")).unwrap();
        symlink(outside.path().join("secret"), r.join("a/b/f.txt")).unwrap();
        assert_eq!(hash_file(&r.join("a/b/f.txt"), st).unwrap(), None);
        assert!(matches!(scan(r, 3), Err(StoreError::TooManyEntries { .. })));
        assert!(matches!(scan(&r.join("out"), 100), Err(StoreError::NotADirectory(_))));
        assert!(matches!(scan(&r.join("nope"), 100), Err(StoreError::NotADirectory(_))));
    }

    #[test]
    fn non_utf8_names_are_skipped() {
        use std::os::unix::ffi::OsStrExt;
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(std::ffi::OsStr::from_bytes(b"bad\xff")), "x").unwrap();
        std::fs::write(d.path().join("good"), "x").unwrap();
        let s = scan(d.path(), 100).unwrap();
        assert_eq!(s.entries.len(), 1);
        assert_eq!(s.skipped_unsupported, 1);
    }

    fn nix_mkfifo(p: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    }
}
