//! Incremental push: walk, hash what changed, upload missing blobs, commit the manifest, clean up.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectStoreExt, WriteMultipart};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::error::{QuotaKind, StoreError};
use crate::io::Op;
use crate::keys::Area;
use crate::manifest::{totals_of, Entry, LocalCache, LocalStat, Manifest, Totals, FORMAT};
use crate::scan::{hash_file, open_checked, read_full, scan, unchanged_since, Scanned};
use crate::ConversationStorage;

/// A file whose ctime is this close to the walk may still be changed within the same clock
/// tick without its stat changing: its stat is not trusted next time (it is hashed again).
const RACY_NS: i64 = 1_000_000_000;

/// What one push did.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    pub area: Area,
    /// A new generation was stored (false: the stored copy already matched the tree).
    pub committed: bool,
    /// The stored generation after the push.
    pub generation: u64,
    pub entries: u64,
    /// Files read to compute their hash (the rest were known unchanged from their stat).
    pub files_hashed: u64,
    pub blobs_uploaded: u64,
    pub bytes_uploaded: u64,
    /// Entries of the previous generation that are gone (deletions propagated).
    pub entries_removed: u64,
    /// Blobs no longer referenced, deleted after the commit.
    pub blobs_deleted: u64,
    /// Files that changed while being pushed: their previous stored version (if any) is kept
    /// in this generation; the next push stores them.
    pub deferred: u64,
    pub skipped_special: u64,
    pub skipped_unsupported: u64,
    /// Paths that could not be read (their stored entries are kept as they were).
    pub unreadable: u64,
    pub stored: Totals,
    pub elapsed_ms: u64,
}

enum Upload {
    Done(u64),
    /// The file no longer has the content that was hashed.
    Changed,
}

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

impl ConversationStorage {
    /// Stores what changed in `local_dir` since the last push as `area`'s next generation.
    /// One attempt; see [`ConversationStorage::push_with_retry`]. Updates the status either way.
    pub async fn push(&self, area: Area, local_dir: &Path) -> Result<PushReport, StoreError> {
        let _op = self.shared.op.lock().await;
        {
            let mut st = self.shared.status.lock().unwrap();
            let a = st.area_mut(area);
            a.pushing = true;
            a.last_attempt_at = Some(OffsetDateTime::now_utc());
        }
        // Clears `pushing` even if this future is dropped mid-way (pusher stopped).
        let _pushing = PushingFlag(self, area);
        let r = self.push_locked(area, local_dir).await;
        let mut st = self.shared.status.lock().unwrap();
        let a = st.area_mut(area);
        match &r {
            Ok(rep) => {
                a.last_success_at = Some(OffsetDateTime::now_utc());
                a.consecutive_failures = 0;
                a.over_quota = false;
                if rep.deferred == 0 {
                    a.pending_bytes = 0;
                    a.pending_entries = 0;
                }
            }
            Err(e) => {
                a.last_error = Some(e.to_string());
                a.last_error_at = Some(OffsetDateTime::now_utc());
                a.consecutive_failures = a.consecutive_failures.saturating_add(1);
                a.over_quota = e.is_quota();
                tracing::warn!(conversation = %self.conversation, user = %self.user, %area, error = %e, "workspace store: push failed");
            }
        }
        r
    }

    /// [`ConversationStorage::push`], retried with backoff (`[workspace_storage.retry]`) while
    /// the error is retriable. Returns the last error when every attempt failed.
    pub async fn push_with_retry(&self, area: Area, local_dir: &Path) -> Result<PushReport, StoreError> {
        self.push_retrying(area, local_dir, None, None).await
    }

    /// `cancel` ends the retries (and the push in flight); `interrupt` only ends a backoff pause.
    pub(crate) async fn push_retrying(
        &self,
        area: Area,
        local_dir: &Path,
        cancel: Option<&CancellationToken>,
        interrupt: Option<&Notify>,
    ) -> Result<PushReport, StoreError> {
        let retry = self.inner.cfg.retry;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let r = match cancel {
                Some(c) => tokio::select! {
                    r = self.push(area, local_dir) => r,
                    _ = c.cancelled() => return Err(StoreError::Cancelled),
                },
                None => self.push(area, local_dir).await,
            };
            match r {
                Ok(rep) => return Ok(rep),
                Err(e) if !e.is_retriable() || attempt >= retry.max_attempts => return Err(e),
                Err(e) => {
                    let pause = retry.backoff(attempt);
                    tracing::info!(conversation = %self.conversation, %area, attempt, ?pause, error = %e, "workspace store: push will be retried");
                    let never = Notify::new();
                    let interrupt = interrupt.unwrap_or(&never);
                    let stopped = CancellationToken::new();
                    let cancel = cancel.unwrap_or(&stopped);
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = interrupt.notified() => return Err(e),
                        _ = cancel.cancelled() => return Err(e),
                    }
                }
            }
        }
    }

    async fn push_locked(&self, area: Area, local_dir: &Path) -> Result<PushReport, StoreError> {
        let started = Instant::now();
        let cfg = &self.inner.cfg;
        let io = &self.inner.io;
        let dir = local_dir.to_owned();

        // 1. What is here.
        let cache_path = self.cache_path(area);
        let base_key = self.keys.base().to_owned();
        let (cache, walked, scan_started) = {
            let dir = dir.clone();
            let max = cfg.max_entries;
            tokio::task::spawn_blocking(move || {
                let cache = LocalCache::read(&cache_path, &base_key, area);
                let t = now_ns();
                scan(&dir, max).map(|s| (cache, s, t))
            })
            .await
            .expect("scan task")?
        };

        let (cached_manifest, cached_etag, known) = match cache {
            Some(c) => {
                let stats = if c.local_dir == dir { c.stats } else { BTreeMap::new() };
                (Some(c.manifest), c.etag, stats)
            }
            None => (None, None, BTreeMap::new()),
        };

        // 2. The new tree: known hashes from unchanged stats, the rest hashed.
        let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
        let mut to_hash: Vec<(String, LocalStat)> = Vec::new();
        let mut fresh: HashMap<String, LocalStat> = HashMap::new();
        let mut new_stats: BTreeMap<String, (LocalStat, String)> = BTreeMap::new();
        for (p, s) in walked.entries {
            match s {
                Scanned::Dir { mode } => {
                    entries.insert(p, Entry::Dir { mode });
                }
                Scanned::Symlink { target } => {
                    entries.insert(p, Entry::Symlink { target });
                }
                Scanned::File(st) => match known.get(&p) {
                    Some((old, h)) if *old == st => {
                        new_stats.insert(p.clone(), (st, h.clone()));
                        entries.insert(p, file_entry(&st, h.clone()));
                    }
                    _ => to_hash.push((p, st)),
                },
            }
        }
        let files_hashed = to_hash.len() as u64;
        let mut deferred: Vec<String> = Vec::new();
        let hashed: Vec<(String, LocalStat, Option<String>)> = futures::stream::iter(to_hash)
            .map(|(p, st)| {
                let abs = dir.join(&p);
                async move {
                    let r = tokio::task::spawn_blocking(move || hash_file(&abs, &st)).await.expect("hash task");
                    let h = match r {
                        Ok(h) => h,
                        Err(e) => {
                            tracing::debug!(path = %p, error = %e, "workspace store: unreadable file kept as stored");
                            None
                        }
                    };
                    (p, st, h)
                }
            })
            .buffer_unordered(cfg.concurrency)
            .collect()
            .await;
        for (p, st, h) in hashed {
            match h {
                Some(h) => {
                    entries.insert(p.clone(), file_entry(&st, h.clone()));
                    if st.ctime_ns < scan_started - RACY_NS {
                        new_stats.insert(p.clone(), (st, h));
                    }
                    fresh.insert(p, st);
                }
                None => deferred.push(p),
            }
        }
        // What is pending, as far as this host knows, even if the bucket cannot be reached.
        {
            let empty = Manifest::empty();
            let mut provisional = entries.clone();
            for p in &deferred {
                keep_stored(&mut provisional, cached_manifest.as_ref().unwrap_or(&empty), p);
            }
            self.set_pending(area, cached_manifest.as_ref().unwrap_or(&empty), &provisional);
        }

        // 3. What is stored: trust the local copy of the manifest only if the bucket still has
        //    exactly the manifest it describes.
        let mkey = self.keys.manifest(area);
        let remote_etag = io.head_etag(&mkey).await?;
        let (base, base_etag, sweep) = match (cached_manifest, &remote_etag) {
            (Some(m), Some(e)) if cached_etag.as_deref() == Some(e.as_str()) => (m, Some(e.clone()), false),
            (_, None) => (Manifest::empty(), None, true),
            (_, Some(_)) => {
                if cached_etag.is_some() {
                    tracing::warn!(conversation = %self.conversation, %area, "workspace store: the stored manifest changed behind this nestor's back; re-reading it");
                }
                match self.fetch_manifest(area).await? {
                    Some((m, etag)) => (m, etag, true),
                    None => (Manifest::empty(), None, true),
                }
            }
        };
        for p in &deferred {
            keep_stored(&mut entries, &base, p);
        }
        // Unreadable paths keep what is stored at and below them.
        let unreadable = walked.unreadable.len() as u64;
        for u in &walked.unreadable {
            let below = format!("{u}/");
            for (p, e) in base.entries.range(u.clone()..) {
                if p != u && !p.starts_with(&below) {
                    break;
                }
                entries.entry(p.clone()).or_insert_with(|| e.clone());
            }
        }

        let removed = base.entries.keys().filter(|p| !entries.contains_key(*p)).count() as u64;
        self.set_pending(area, &base, &entries);
        let mut report = PushReport {
            area,
            committed: false,
            generation: base.generation,
            entries: entries.len() as u64,
            files_hashed,
            blobs_uploaded: 0,
            bytes_uploaded: 0,
            entries_removed: 0,
            blobs_deleted: 0,
            deferred: deferred.len() as u64,
            skipped_special: walked.skipped_special,
            skipped_unsupported: walked.skipped_unsupported,
            unreadable,
            stored: base.totals(),
            elapsed_ms: 0,
        };

        if entries == base.entries {
            // Nothing to store. Keep the refreshed stats (and the re-read manifest) locally.
            self.write_cache(area, &dir, base_etag.clone(), &base, new_stats).await;
            self.set_committed(area, &base);
            if sweep && base_etag.is_some() {
                report.blobs_deleted = self.sweep_orphans(area, &base).await;
            }
            report.elapsed_ms = started.elapsed().as_millis() as u64;
            return Ok(report);
        }

        // 4. Quotas, before anything is uploaded.
        let new_totals = totals_of(&entries);
        self.check_quota(area, base.totals(), new_totals).await?;
        let mut user_reservation = None;
        self.check_user_quota(area, base.totals(), new_totals, &mut user_reservation).await?;

        // 5. Upload the blobs the stored copy lacks.
        let stored_blobs: HashSet<String> = base.blobs().into_iter().map(str::to_owned).collect();
        let mut wanted: BTreeMap<String, (String, LocalStat)> = BTreeMap::new();
        for (p, e) in &entries {
            if let Entry::File { hash, .. } = e {
                if !stored_blobs.contains(hash) && !wanted.contains_key(hash) {
                    if let Some(st) = fresh.get(p).or_else(|| known.get(p).map(|(s, _)| s)) {
                        wanted.insert(hash.clone(), (p.clone(), *st));
                    }
                }
            }
        }
        let results: Vec<(String, Upload)> = futures::stream::iter(wanted)
            .map(|(hash, (p, st))| {
                let abs = dir.join(&p);
                async move { self.upload_blob(area, &hash, abs, st).await.map(|u| (hash, u)) }
            })
            .buffer_unordered(cfg.concurrency)
            .try_collect()
            .await?;
        let mut uploaded: Vec<String> = Vec::new();
        let mut changed: HashSet<String> = HashSet::new();
        for (hash, u) in results {
            match u {
                Upload::Done(n) => {
                    report.blobs_uploaded += 1;
                    report.bytes_uploaded += n;
                    uploaded.push(hash);
                }
                Upload::Changed => {
                    changed.insert(hash);
                }
            }
        }
        if !changed.is_empty() {
            let affected: Vec<String> = entries
                .iter()
                .filter(|(_, e)| matches!(e, Entry::File { hash, .. } if changed.contains(hash)))
                .map(|(p, _)| p.clone())
                .collect();
            for p in affected {
                keep_stored(&mut entries, &base, &p);
                new_stats.remove(&p);
                report.deferred += 1;
            }
            // Entries that now point at blobs neither stored nor uploaded cannot be: every
            // path of a changed hash was reverted above.
            let final_totals = totals_of(&entries);
            let checked = match self.check_quota(area, base.totals(), final_totals).await {
                Ok(()) => self.check_user_quota(area, base.totals(), final_totals, &mut user_reservation).await,
                Err(e) => Err(e),
            };
            if let Err(e) = checked {
                let keys = uploaded.iter().map(|h| self.keys.blob(area, h)).collect();
                let _ = io.delete_many(keys).await;
                return Err(e);
            }
            if entries == base.entries {
                self.write_cache(area, &dir, base_etag.clone(), &base, new_stats).await;
                report.elapsed_ms = started.elapsed().as_millis() as u64;
                return Ok(report);
            }
        }

        // 6. Commit: one PUT of the new manifest.
        let manifest = Manifest {
            format: FORMAT,
            hash: crate::manifest::HASH_ALG.into(),
            generation: base.generation + 1,
            pushed_at: OffsetDateTime::now_utc(),
            entries,
        };
        let json = Bytes::from(serde_json::to_vec(&manifest).expect("serializable"));
        let etag = match io.put(&mkey, json).await? {
            Some(e) => Some(e),
            None => io.head_etag(&mkey).await.ok().flatten(),
        };
        self.set_committed(area, &manifest);
        new_stats.retain(|p, (_, h)| matches!(manifest.entries.get(p), Some(Entry::File { hash, .. }) if hash == h));
        self.write_cache(area, &dir, etag, &manifest, new_stats).await;
        report.committed = true;
        report.generation = manifest.generation;
        report.entries = manifest.entries.len() as u64;
        report.entries_removed = removed;
        report.stored = manifest.totals();

        // 7. Clean up blobs nothing refers to any more (failures only leave garbage).
        let now_blobs = manifest.blobs();
        let gone: Vec<_> = stored_blobs
            .iter()
            .filter(|h| !now_blobs.contains(h.as_str()))
            .map(|h| self.keys.blob(area, h))
            .collect();
        if !gone.is_empty() {
            match io.delete_many(gone).await {
                Ok(n) => report.blobs_deleted += n,
                Err(e) => tracing::warn!(conversation = %self.conversation, %area, error = %e, "workspace store: could not delete unreferenced blobs (a later push sweeps them)"),
            }
        }
        if sweep {
            report.blobs_deleted += self.sweep_orphans(area, &manifest).await;
        }
        report.elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::debug!(conversation = %self.conversation, %area, generation = report.generation, uploaded = report.bytes_uploaded, "workspace store: pushed");
        Ok(report)
    }

    fn set_pending(&self, area: Area, base: &Manifest, entries: &BTreeMap<String, Entry>) {
        let (bytes, n) = pending(base, entries);
        let mut st = self.shared.status.lock().unwrap();
        let a = st.area_mut(area);
        a.pending_bytes = bytes;
        a.pending_entries = n;
    }

    async fn check_quota(&self, area: Area, before: Totals, after: Totals) -> Result<(), StoreError> {
        let q = self.inner.cfg.quota;
        if q.max_bytes.is_none() && q.max_files.is_none() {
            return Ok(());
        }
        let other = self.other_area_totals(area).await?;
        let (now, would) = (before + other, after + other);
        if let Some(limit) = q.max_bytes {
            if would.bytes > limit && would.bytes > now.bytes {
                return Err(StoreError::QuotaExceeded { kind: QuotaKind::Bytes, limit, would_be: would.bytes });
            }
        }
        if let Some(limit) = q.max_files {
            if would.files > limit && would.files > now.files {
                return Err(StoreError::QuotaExceeded { kind: QuotaKind::Files, limit, would_be: would.files });
            }
        }
        Ok(())
    }

    async fn write_cache(
        &self,
        area: Area,
        dir: &Path,
        etag: Option<String>,
        manifest: &Manifest,
        stats: BTreeMap<String, (LocalStat, String)>,
    ) {
        let cache = LocalCache {
            format: FORMAT,
            base: self.keys.base().to_owned(),
            area,
            etag,
            manifest: manifest.clone(),
            local_dir: dir.to_owned(),
            stats,
        };
        let path = self.cache_path(area);
        let r = tokio::task::spawn_blocking(move || cache.write(&path)).await.expect("cache task");
        if let Err(e) = r {
            // Only costs re-hashing next time: the ETag check catches a stale copy.
            tracing::warn!(conversation = %self.conversation, %area, error = %e, "workspace store: could not write the local manifest");
        }
    }

    /// Deletes blobs of `area` that `manifest` does not refer to (left by an interrupted push,
    /// or by a manifest replaced behind our back). Best effort: returns how many went.
    async fn sweep_orphans(&self, area: Area, manifest: &Manifest) -> u64 {
        let io = &self.inner.io;
        let limit = self.inner.cfg.max_entries.saturating_add(1000);
        let keys = match io.list_all(&self.keys.blobs_prefix(area), limit).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(conversation = %self.conversation, %area, error = %e, "workspace store: orphan sweep could not list");
                return 0;
            }
        };
        let live = manifest.blobs();
        let orphans: Vec<_> = keys
            .into_iter()
            .filter(|k| self.keys.hash_of_blob(area, k).is_none_or(|h| !live.contains(h.as_str())))
            .collect();
        if orphans.is_empty() {
            return 0;
        }
        io.delete_many(orphans).await.unwrap_or_else(|e| {
            tracing::warn!(conversation = %self.conversation, %area, error = %e, "workspace store: orphan sweep could not delete");
            0
        })
    }

    /// Uploads the content of `abs` as blob `hash`, checking that what is sent has that hash.
    async fn upload_blob(&self, area: Area, hash: &str, abs: PathBuf, st: LocalStat) -> Result<Upload, StoreError> {
        let cfg = &self.inner.cfg;
        let io = &self.inner.io;
        let key = self.keys.blob(area, hash);
        if st.size <= cfg.part_size_bytes {
            let _mem = io.reserve(st.size).await;
            let want = hash.to_owned();
            let content = tokio::task::spawn_blocking(move || -> Result<Option<Vec<u8>>, StoreError> {
                let Some(mut f) = open_checked(&abs, &st)? else { return Ok(None) };
                let mut buf = vec![0u8; st.size as usize + 1];
                let n = read_full(&mut f, &mut buf, &abs)?;
                if n as u64 != st.size || !unchanged_since(&f, &abs, &st)? {
                    return Ok(None);
                }
                buf.truncate(n);
                Ok((blake3::hash(&buf).to_hex().as_str() == want).then_some(buf))
            })
            .await
            .expect("read task")?;
            let Some(content) = content else { return Ok(Upload::Changed) };
            io.put(&key, Bytes::from(content)).await?;
            return Ok(Upload::Done(st.size));
        }

        // Large: multipart, `part_size` at a time, at most `parts_in_flight` parts in flight.
        let part = cfg.part_size_bytes as usize;
        let in_flight = cfg.parts_in_flight;
        let _mem = io.reserve(cfg.part_size_bytes * (in_flight as u64 + 1)).await;
        let opened = {
            let abs = abs.clone();
            tokio::task::spawn_blocking(move || open_checked(&abs, &st)).await.expect("open task")?
        };
        let Some(mut file) = opened else { return Ok(Upload::Changed) };
        let upload = io.call(Op::Put, "create multipart upload", &key, io.store.put_multipart(&key)).await?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, part);
        let mut hasher = blake3::Hasher::new();
        let mut total = 0u64;
        let outcome: Result<bool, StoreError> = async {
            loop {
                io.wait("upload part", &key, w.wait_for_capacity(in_flight)).await?;
                let abs2 = abs.clone();
                let (f, h, buf) = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
                    let mut buf = vec![0u8; part];
                    let n = read_full(&mut file, &mut buf, &abs2)?;
                    buf.truncate(n);
                    hasher.update(&buf);
                    Ok((file, hasher, buf))
                })
                .await
                .expect("read task")?;
                file = f;
                hasher = h;
                let n = buf.len();
                if n == 0 {
                    break;
                }
                total += n as u64;
                if total > st.size {
                    return Ok(false);
                }
                io.count(Op::Put);
                io.add_uploaded(n as u64);
                w.put(Bytes::from(buf));
                if n < part {
                    break;
                }
            }
            Ok(total == st.size && unchanged_since(&file, &abs, &st)? && hasher.finalize().to_hex().as_str() == hash)
        }
        .await;
        match outcome {
            Ok(true) => {
                io.call(Op::Put, "complete multipart upload", &key, w.finish()).await?;
                Ok(Upload::Done(st.size))
            }
            Ok(false) => {
                let _ = io.wait("abort multipart upload", &key, w.abort()).await;
                Ok(Upload::Changed)
            }
            Err(e) => {
                let _ = io.wait("abort multipart upload", &key, w.abort()).await;
                Err(e)
            }
        }
    }
}

struct PushingFlag<'a>(&'a ConversationStorage, Area);

impl Drop for PushingFlag<'_> {
    fn drop(&mut self) {
        if let Ok(mut st) = self.0.shared.status.lock() {
            st.area_mut(self.1).pushing = false;
        }
    }
}

fn file_entry(st: &LocalStat, hash: String) -> Entry {
    Entry::File { size: st.size, mtime_ns: st.mtime_ns, mode: st.mode, hash }
}

/// Puts back what is stored for `p` (or drops `p` if nothing is).
fn keep_stored(entries: &mut BTreeMap<String, Entry>, base: &Manifest, p: &str) {
    match base.entries.get(p) {
        // A stored directory at a path that is now a file: its stored children were dropped
        // by the walk (the path is a file now), so keeping the bare directory is consistent.
        Some(e) => {
            entries.insert(p.to_owned(), e.clone());
        }
        None => {
            entries.remove(p);
        }
    }
}

/// Bytes of new or changed files, and entries added, changed or removed.
fn pending(base: &Manifest, entries: &BTreeMap<String, Entry>) -> (u64, u64) {
    let mut bytes = 0;
    let mut n = 0;
    for (p, e) in entries {
        if base.entries.get(p) != Some(e) {
            n += 1;
            if let Entry::File { size, .. } = e {
                bytes += size;
            }
        }
    }
    n += base.entries.keys().filter(|p| !entries.contains_key(*p)).count() as u64;
    (bytes, n)
}
