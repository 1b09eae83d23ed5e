//! Crash-safe file writes for nestor's own state.

use std::io::Write;
use std::path::Path;

/// Write `bytes` to `path` atomically: temp file in the same directory, fsync, rename,
/// fsync the directory. A crash leaves either the old or the new file, never half of one.
///
/// Concurrent writers of one path each get their own temp file (pid + a process-wide
/// sequence number): with one temp name per process, two writes at once (the catalog saves
/// an entry from a create and from a state update in parallel) truncated and wrote the same
/// inode — the file could end up as one write's bytes over the other's tail — and the second
/// rename failed with "No such file or directory". Now the last rename wins, whole.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{seq}", std::process::id()));
    {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        }
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // Best effort: the new file is whole either way.
    let _ = sync_dir(dir);
    Ok(())
}

/// Make `dir`'s entries durable (a rename, a new file or a removal in it): until its
/// directory is synced, such a change may sit in the page cache only. A directory that no
/// longer exists holds nothing to bring back, so that is not an error; where directories
/// cannot be opened (not Unix) there is nothing to do.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    match std::fs::File::open(dir) {
        Ok(d) => d.sync_all()?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces() {
        let d = std::env::temp_dir().join(format!("nestor-fs-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("f.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn concurrent_writes_of_one_path_never_mix_or_fail() {
        let d = std::env::temp_dir().join(format!("nestor-fs-test-concurrent-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join("f.json");
        let contents: Vec<Vec<u8>> = (0..8u8).map(|i| vec![b'a' + i; 4096 + 512 * i as usize]).collect();
        for _ in 0..50 {
            std::thread::scope(|s| {
                for c in &contents {
                    let p = &p;
                    s.spawn(move || write_atomic(p, c).expect("every write succeeds"));
                }
            });
            let got = std::fs::read(&p).unwrap();
            assert!(contents.contains(&got), "mixed content: {} bytes", got.len());
        }
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1, "temp files left");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
