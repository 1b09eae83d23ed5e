//! Pull: restore a stored tree into a fresh temporary directory, then swap it into place.

use std::collections::BTreeMap;
use std::fs::{FileTimes, OpenOptions, Permissions};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{StreamExt, TryStreamExt};
use object_store::{GetOptions, GetRange, ObjectStore};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;

use crate::error::StoreError;
use crate::io::Op;
use crate::keys::Area;
use crate::manifest::{Entry, LocalCache, LocalStat, Manifest, FORMAT};
use crate::scan::stat_of;
use crate::{split_dir, ConversationStorage};

/// A restored file: its path, local stat and hash.
type RestoredFile = (String, LocalStat, String);

const TMP_MARK: &str = ".nestor-pull-";
const OLD_MARK: &str = ".nestor-old-";

/// What one pull did.
#[derive(Debug, Clone, Serialize)]
pub struct PullReport {
    pub area: Area,
    /// Something was stored. When false the local directory was left as it was (created
    /// empty if it did not exist).
    pub found: bool,
    pub generation: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Bytes actually downloaded (identical files are downloaded once).
    pub bytes_downloaded: u64,
    pub elapsed_ms: u64,
}

impl ConversationStorage {
    /// Makes `local_dir` exactly the stored tree of `area` (whatever it held is replaced), or
    /// leaves it alone if nothing is stored. Run it before the downstream starts: the tree is
    /// restored into a temporary sibling directory and swapped into place at the end, so
    /// nothing ever sees it half restored, and a failed pull leaves `local_dir` untouched.
    pub async fn pull(&self, area: Area, local_dir: &Path) -> Result<PullReport, StoreError> {
        let _op = self.shared.op.lock().await;
        let r = self.pull_locked(area, local_dir).await;
        if r.is_ok() {
            self.shared.status.lock().unwrap().area_mut(area).last_pull_at = Some(OffsetDateTime::now_utc());
        }
        r
    }

    async fn pull_locked(&self, area: Area, local_dir: &Path) -> Result<PullReport, StoreError> {
        let started = Instant::now();
        let dst = local_dir.to_owned();
        let (parent, name) = split_dir(&dst)?;
        {
            let (parent, name) = (parent.clone(), name.clone());
            tokio::task::spawn_blocking(move || remove_leftovers(&parent, &name)).await.expect("cleanup task")?;
        }
        let Some((manifest, etag)) = self.fetch_manifest(area).await? else {
            let d = dst.clone();
            tokio::task::spawn_blocking(move || std::fs::create_dir_all(&d).map_err(|e| StoreError::local("create", &d, e)))
                .await
                .expect("mkdir task")?;
            self.shared.committed.lock().unwrap().insert(area, Default::default());
            self.ledger_commit(area, Default::default());
            return Ok(PullReport {
                area,
                found: false,
                generation: 0,
                files: 0,
                dirs: 0,
                symlinks: 0,
                bytes: 0,
                bytes_downloaded: 0,
                elapsed_ms: started.elapsed().as_millis() as u64,
            });
        };

        let tmp = parent.join(format!(".{name}{TMP_MARK}{:016x}", rand::random::<u64>()));
        let restored = self.restore_into(area, &manifest, &tmp).await;
        let (stats, downloaded) = match restored {
            Ok(v) => v,
            Err(e) => {
                let t = tmp.clone();
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(t)).await;
                return Err(e);
            }
        };
        {
            let (tmp, dst, parent, name) = (tmp.clone(), dst.clone(), parent.clone(), name.clone());
            tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
                let old = match swap_into_place(&tmp, &dst, &parent, &name) {
                    Ok(old) => old,
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&tmp);
                        return Err(e);
                    }
                };
                if let Some(old) = old {
                    if let Err(e) = std::fs::remove_dir_all(&old) {
                        tracing::warn!(path = %old.display(), error = %e, "workspace store: could not remove the replaced tree");
                    }
                }
                Ok(())
            })
            .await
            .expect("swap task")?;
        }

        // The restored files' stats: the next push reads none of them again.
        let totals = manifest.totals();
        let mut report = PullReport {
            area,
            found: true,
            generation: manifest.generation,
            files: 0,
            dirs: 0,
            symlinks: 0,
            bytes: totals.bytes,
            bytes_downloaded: downloaded,
            elapsed_ms: 0,
        };
        for e in manifest.entries.values() {
            match e {
                Entry::File { .. } => report.files += 1,
                Entry::Dir { .. } => report.dirs += 1,
                Entry::Symlink { .. } => report.symlinks += 1,
            }
        }
        self.set_committed(area, &manifest);
        let cache = LocalCache {
            format: FORMAT,
            base: self.keys.base().to_owned(),
            area,
            etag,
            manifest,
            local_dir: dst,
            stats,
        };
        let path = self.cache_path(area);
        if let Err(e) = tokio::task::spawn_blocking(move || cache.write(&path)).await.expect("cache task") {
            tracing::warn!(conversation = %self.conversation, %area, error = %e, "workspace store: could not write the local manifest");
        }
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        Ok(report)
    }

    /// Restores `manifest` into the new directory `tmp`. Returns the files' local stats (for
    /// the local manifest) and the bytes downloaded.
    async fn restore_into(
        &self,
        area: Area,
        manifest: &Manifest,
        tmp: &Path,
    ) -> Result<(BTreeMap<String, (LocalStat, String)>, u64), StoreError> {
        // Directories first (private while filling; their modes are set at the end).
        let dirs: Vec<String> = manifest
            .entries
            .iter()
            .filter(|(_, e)| matches!(e, Entry::Dir { .. }))
            .map(|(p, _)| p.clone())
            .collect();
        {
            let (tmp, dirs) = (tmp.to_owned(), dirs.clone());
            tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
                use std::os::unix::fs::DirBuilderExt;
                let mut b = std::fs::DirBuilder::new();
                b.mode(0o700);
                b.create(&tmp).map_err(|e| StoreError::local("create", &tmp, e))?;
                // BTreeMap order puts every directory after its parent.
                for d in &dirs {
                    let p = tmp.join(d);
                    b.create(&p).map_err(|e| StoreError::local("create", &p, e))?;
                }
                Ok(())
            })
            .await
            .expect("mkdir task")?;
        }

        // Files, one download per distinct content; copies for the duplicates.
        // Owned keys: the future must be Send for callers that box or spawn it (a borrowed
        // tuple in this closure trips rustc's higher-ranked lifetime inference).
        let mut by_hash: BTreeMap<String, Vec<(String, u64, i64, u32)>> = BTreeMap::new();
        for (p, e) in &manifest.entries {
            if let Entry::File { size, mtime_ns, mode, hash } = e {
                by_hash.entry(hash.clone()).or_default().push((p.clone(), *size, *mtime_ns, *mode));
            }
        }
        let concurrency = self.inner.cfg.concurrency;
        let restored: Vec<(Vec<RestoredFile>, u64)> = futures::stream::iter(by_hash)
            .map(|(hash, paths)| async move {
                let size = paths[0].1;
                let first_abs = tmp.join(&paths[0].0);
                let downloaded = self.download_blob(area, &hash, size, &first_abs).await?;
                let copies: Vec<(PathBuf, i64, u32, String)> =
                    paths.into_iter().map(|(p, _, m, md)| (tmp.join(&p), m, md, p)).collect();
                let stats = tokio::task::spawn_blocking(move || -> Result<Vec<RestoredFile>, StoreError> {
                    let mut out = Vec::with_capacity(copies.len());
                    for (i, (abs, m, md, rel)) in copies.iter().enumerate() {
                        if i > 0 {
                            std::fs::copy(&first_abs, abs).map_err(|e| StoreError::local("copy", abs, e))?;
                        }
                        out.push((rel.clone(), finish_file(abs, *m, *md)?, hash.clone()));
                    }
                    Ok(out)
                })
                .await
                .expect("finish task")?;
                Ok::<_, StoreError>((stats, downloaded))
            })
            .buffer_unordered(concurrency)
            .try_collect()
            .await?;
        let mut stats = BTreeMap::new();
        let mut downloaded = 0;
        for (files, n) in restored {
            downloaded += n;
            for (p, st, h) in files {
                stats.insert(p, (st, h));
            }
        }

        // Symlinks after every file (nothing is written below or through them), then the
        // directories' own modes, deepest first.
        let links: Vec<(String, String)> = manifest
            .entries
            .iter()
            .filter_map(|(p, e)| match e {
                Entry::Symlink { target } => Some((p.clone(), target.clone())),
                _ => None,
            })
            .collect();
        let dir_modes: Vec<(String, u32)> = manifest
            .entries
            .iter()
            .rev()
            .filter_map(|(p, e)| match e {
                Entry::Dir { mode } => Some((p.clone(), *mode)),
                _ => None,
            })
            .collect();
        let tmp2 = tmp.to_owned();
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            for (p, target) in links {
                let abs = tmp2.join(&p);
                std::os::unix::fs::symlink(&target, &abs).map_err(|e| StoreError::local("symlink", &abs, e))?;
            }
            for (p, mode) in dir_modes {
                let abs = tmp2.join(&p);
                std::fs::set_permissions(&abs, Permissions::from_mode(mode)).map_err(|e| StoreError::local("chmod", &abs, e))?;
            }
            std::fs::set_permissions(&tmp2, Permissions::from_mode(0o755)).map_err(|e| StoreError::local("chmod", &tmp2, e))
        })
        .await
        .expect("links task")?;
        Ok((stats, downloaded))
    }

    /// Streams blob `hash` to the new file `dest` in ranged requests, checking size and hash.
    async fn download_blob(&self, area: Area, hash: &str, size: u64, dest: &Path) -> Result<u64, StoreError> {
        let io = &self.inner.io;
        let key = self.keys.blob(area, hash);
        let std_file = {
            let dest = dest.to_owned();
            tokio::task::spawn_blocking(move || {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&dest)
                    .map_err(|e| StoreError::local("create", &dest, e))
            })
            .await
            .expect("open task")?
        };
        let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, tokio::fs::File::from_std(std_file));
        let mut hasher = blake3::Hasher::new();
        let chunk = self.inner.cfg.download_chunk_bytes;
        let mut offset = 0u64;
        // Even an empty blob is fetched once, so a missing one is noticed.
        loop {
            let end = size.min(offset + chunk);
            let opts = GetOptions {
                range: (size > 0).then_some(GetRange::Bounded(offset..end)),
                ..Default::default()
            };
            let got = async {
                let r = io.store.get_opts(&key, opts).await.map_err(|e| StoreError::storage("get", &key, e))?;
                let mut s = r.into_stream();
                let mut n = 0u64;
                while let Some(c) = s.next().await {
                    let c = c.map_err(|e| StoreError::storage("get", &key, e))?;
                    n += c.len() as u64;
                    if offset + n > end {
                        return Err(StoreError::CorruptBlob { key: key.to_string(), reason: "longer than its manifest says".into() });
                    }
                    io.add_downloaded(c.len() as u64);
                    hasher.update(&c);
                    out.write_all(&c).await.map_err(|e| StoreError::local("write", dest, e))?;
                }
                Ok(n)
            };
            io.count(Op::Get);
            let n = match tokio::time::timeout(io.timeout, got).await {
                Ok(r) => r?,
                Err(_) => return Err(StoreError::Timeout { op: "get", key: key.to_string(), after: io.timeout }),
            };
            offset += n;
            if n == 0 || offset >= size {
                break;
            }
        }
        out.flush().await.map_err(|e| StoreError::local("write", dest, e))?;
        if offset != size {
            return Err(StoreError::CorruptBlob {
                key: key.to_string(),
                reason: format!("{offset} bytes where the manifest says {size}"),
            });
        }
        let got = hasher.finalize().to_hex();
        if got.as_str() != hash {
            return Err(StoreError::CorruptBlob { key: key.to_string(), reason: format!("content hashes to {got}") });
        }
        Ok(size)
    }
}

/// Sets a restored file's mode and mtime; returns its stat.
fn finish_file(abs: &Path, mtime_ns: i64, mode: u32) -> Result<LocalStat, StoreError> {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(abs)
        .map_err(|e| StoreError::local("open", abs, e))?;
    f.set_permissions(Permissions::from_mode(mode & 0o777)).map_err(|e| StoreError::local("chmod", abs, e))?;
    let t = if mtime_ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(mtime_ns as u64)
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_nanos(mtime_ns.unsigned_abs())).unwrap_or(UNIX_EPOCH)
    };
    f.set_times(FileTimes::new().set_modified(t).set_accessed(SystemTime::now()))
        .map_err(|e| StoreError::local("set times", abs, e))?;
    let meta = f.metadata().map_err(|e| StoreError::local("stat", abs, e))?;
    Ok(stat_of(&meta))
}

/// Removes temporary directories an interrupted pull of `name` left in `parent`.
fn remove_leftovers(parent: &Path, name: &str) -> Result<(), StoreError> {
    std::fs::create_dir_all(parent).map_err(|e| StoreError::local("create", parent, e))?;
    let rd = std::fs::read_dir(parent).map_err(|e| StoreError::local("read directory", parent, e))?;
    let tmp_prefix = format!(".{name}{TMP_MARK}");
    let old_prefix = format!(".{name}{OLD_MARK}");
    for dent in rd.flatten() {
        let n = dent.file_name();
        let Some(n) = n.to_str() else { continue };
        if n.starts_with(&tmp_prefix) || n.starts_with(&old_prefix) {
            let p = dent.path();
            tracing::info!(path = %p.display(), "workspace store: removing what an interrupted pull left");
            let _ = std::fs::remove_dir_all(&p);
        }
    }
    Ok(())
}

/// Moves `tmp` to `dst`. If `dst` exists (a real directory) the two are exchanged atomically
/// where the kernel can (`renameat2(RENAME_EXCHANGE)`); returns the directory now holding the
/// old tree, to be removed.
fn swap_into_place(tmp: &Path, dst: &Path, parent: &Path, name: &str) -> Result<Option<PathBuf>, StoreError> {
    match std::fs::symlink_metadata(dst) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::rename(tmp, dst).map_err(|e| StoreError::local("rename", dst, e))?;
            Ok(None)
        }
        Err(e) => Err(StoreError::local("stat", dst, e)),
        Ok(m) if !m.is_dir() => Err(StoreError::NotADirectory(dst.to_owned())),
        Ok(_) => match rename_exchange(tmp, dst) {
            Ok(()) => Ok(Some(tmp.to_owned())),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) => {
                let old = parent.join(format!(".{name}{OLD_MARK}{:016x}", rand::random::<u64>()));
                std::fs::rename(dst, &old).map_err(|e| StoreError::local("rename", dst, e))?;
                if let Err(e) = std::fs::rename(tmp, dst) {
                    let _ = std::fs::rename(&old, dst);
                    return Err(StoreError::local("rename", dst, e));
                }
                Ok(Some(old))
            }
            Err(e) => Err(StoreError::local("rename", dst, e)),
        },
    }
}

fn rename_exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let ca = std::ffi::CString::new(a.as_os_str().as_bytes()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let cb = std::ffi::CString::new(b.as_os_str().as_bytes()).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: two valid NUL-terminated paths; renameat2 only reads them.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swap_replaces_an_existing_tree_whole() {
        let d = tempfile::tempdir().unwrap();
        let dst = d.path().join("ws");
        let tmp = d.path().join(".ws.nestor-pull-1");
        std::fs::create_dir(&dst).unwrap();
        std::fs::write(dst.join("old"), "o").unwrap();
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("new"), "n").unwrap();
        let old = swap_into_place(&tmp, &dst, d.path(), "ws").unwrap().unwrap();
        assert!(dst.join("new").exists() && !dst.join("old").exists());
        assert!(old.join("old").exists());
        // A leftover is cleaned by the next pull.
        remove_leftovers(d.path(), "ws").unwrap();
        assert!(!old.exists());
        assert!(dst.exists());
        // Into a missing directory: a plain rename.
        let tmp2 = d.path().join(".x.nestor-pull-2");
        std::fs::create_dir(&tmp2).unwrap();
        assert_eq!(swap_into_place(&tmp2, &d.path().join("x"), d.path(), "x").unwrap(), None);
        // Never over a symlink.
        let tmp3 = d.path().join(".l.nestor-pull-3");
        std::fs::create_dir(&tmp3).unwrap();
        std::os::unix::fs::symlink(&dst, d.path().join("l")).unwrap();
        assert!(matches!(swap_into_place(&tmp3, &d.path().join("l"), d.path(), "l"), Err(StoreError::NotADirectory(_))));
    }
}
