//! Every request to the object store goes through here: bounded by a timeout, counted.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::StoreError;

/// Request and byte counters of one [`crate::WorkspaceStore`] (all conversations), since it
/// was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct IoStats {
    pub requests: u64,
    pub gets: u64,
    pub puts: u64,
    pub heads: u64,
    pub lists: u64,
    pub deletes: u64,
    pub bytes_uploaded: u64,
    pub bytes_downloaded: u64,
    /// Most file content held in memory for uploads at once.
    pub peak_buffered_bytes: u64,
}

impl IoStats {
    /// `self - earlier`, for the counters (the peak is kept as is).
    pub fn since(&self, earlier: &IoStats) -> IoStats {
        IoStats {
            requests: self.requests - earlier.requests,
            gets: self.gets - earlier.gets,
            puts: self.puts - earlier.puts,
            heads: self.heads - earlier.heads,
            lists: self.lists - earlier.lists,
            deletes: self.deletes - earlier.deletes,
            bytes_uploaded: self.bytes_uploaded - earlier.bytes_uploaded,
            bytes_downloaded: self.bytes_downloaded - earlier.bytes_downloaded,
            peak_buffered_bytes: self.peak_buffered_bytes,
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    gets: AtomicU64,
    puts: AtomicU64,
    heads: AtomicU64,
    lists: AtomicU64,
    deletes: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    buffered: AtomicU64,
    buffered_peak: AtomicU64,
}

#[derive(Clone, Copy)]
pub(crate) enum Op {
    Get,
    Put,
    Head,
    List,
    Delete,
}

/// The object store, with the timeout, the counters and the upload buffer budget.
#[derive(Debug, Clone)]
pub(crate) struct Io {
    pub store: Arc<dyn ObjectStore>,
    pub timeout: Duration,
    counters: Arc<Counters>,
    /// Permits are KiB of file content held in memory for uploads.
    budget: Arc<Semaphore>,
    budget_kib: u32,
}

/// Memory reserved from the upload budget; released on drop.
pub(crate) struct Reservation {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
    counters: Arc<Counters>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.counters.buffered.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl Io {
    pub(crate) fn new(store: Arc<dyn ObjectStore>, timeout: Duration, budget_bytes: u64) -> Self {
        let budget_kib = (budget_bytes / 1024).clamp(1, u32::MAX as u64) as u32;
        Self {
            store,
            timeout,
            counters: Arc::default(),
            budget: Arc::new(Semaphore::new(budget_kib as usize)),
            budget_kib,
        }
    }

    pub(crate) fn stats(&self) -> IoStats {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (gets, puts, heads, lists, deletes) = (l(&c.gets), l(&c.puts), l(&c.heads), l(&c.lists), l(&c.deletes));
        IoStats {
            requests: gets + puts + heads + lists + deletes,
            gets,
            puts,
            heads,
            lists,
            deletes,
            bytes_uploaded: l(&c.bytes_up),
            bytes_downloaded: l(&c.bytes_down),
            peak_buffered_bytes: l(&c.buffered_peak),
        }
    }

    pub(crate) fn count(&self, op: Op) {
        let c = &self.counters;
        match op {
            Op::Get => &c.gets,
            Op::Put => &c.puts,
            Op::Head => &c.heads,
            Op::List => &c.lists,
            Op::Delete => &c.deletes,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_uploaded(&self, n: u64) {
        self.counters.bytes_up.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn add_downloaded(&self, n: u64) {
        self.counters.bytes_down.fetch_add(n, Ordering::Relaxed);
    }

    /// Waits until `bytes` of file content may be held in memory (bounded by the budget: a
    /// request above it takes the whole budget).
    pub(crate) async fn reserve(&self, bytes: u64) -> Reservation {
        let kib = bytes.div_ceil(1024).clamp(1, self.budget_kib as u64) as u32;
        let permit = self.budget.clone().acquire_many_owned(kib).await.expect("budget semaphore never closed");
        let now = self.counters.buffered.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.counters.buffered_peak.fetch_max(now, Ordering::Relaxed);
        Reservation { _permit: permit, bytes, counters: self.counters.clone() }
    }

    /// Runs one request with the timeout.
    pub(crate) async fn call<T>(
        &self,
        op: Op,
        what: &'static str,
        key: &ObjectPath,
        fut: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T, StoreError> {
        self.count(op);
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::storage(what, key, e)),
            Err(_) => Err(StoreError::Timeout { op: what, key: key.to_string(), after: self.timeout }),
        }
    }

    /// Waits for something already counted (a multipart part) with the timeout.
    pub(crate) async fn wait<T>(
        &self,
        what: &'static str,
        key: &ObjectPath,
        fut: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::storage(what, key, e)),
            Err(_) => Err(StoreError::Timeout { op: what, key: key.to_string(), after: self.timeout }),
        }
    }

    /// The ETag of an object, `None` when it does not exist.
    pub(crate) async fn head_etag(&self, key: &ObjectPath) -> Result<Option<String>, StoreError> {
        match self.call(Op::Head, "head", key, self.store.head(key)).await {
            Ok(meta) => Ok(Some(meta.e_tag.unwrap_or_default())),
            Err(StoreError::Storage { source: object_store::Error::NotFound { .. }, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A small object whole (at most `limit` bytes), with its ETag; `None` when it does not exist.
    pub(crate) async fn get_small(&self, key: &ObjectPath, limit: u64) -> Result<Option<(bytes::Bytes, Option<String>)>, StoreError> {
        let fut = async {
            let r = self.store.get(key).await?;
            if r.meta.size > limit {
                return Ok(Err(r.meta.size));
            }
            let etag = r.meta.e_tag.clone();
            Ok(Ok((r.bytes().await?, etag)))
        };
        match self.call(Op::Get, "get", key, fut).await {
            Ok(Ok((b, etag))) => {
                self.add_downloaded(b.len() as u64);
                Ok(Some((b, etag)))
            }
            Ok(Err(size)) => Err(StoreError::CorruptManifest {
                key: key.to_string(),
                reason: format!("{size} bytes, more than the {limit} bytes a manifest may have"),
            }),
            Err(StoreError::Storage { source: object_store::Error::NotFound { .. }, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Uploads a small object in one request; returns its ETag.
    pub(crate) async fn put(&self, key: &ObjectPath, payload: bytes::Bytes) -> Result<Option<String>, StoreError> {
        let n = payload.len() as u64;
        let r = self.call(Op::Put, "put", key, self.store.put(key, PutPayload::from_bytes(payload))).await?;
        self.add_uploaded(n);
        Ok(r.e_tag)
    }

    /// Deletes objects (bulk requests where the store has them); missing ones are fine.
    /// Returns how many were deleted.
    pub(crate) async fn delete_many(&self, keys: Vec<ObjectPath>) -> Result<u64, StoreError> {
        let mut deleted = 0;
        // S3's bulk delete takes 1000 keys per request.
        for batch in keys.chunks(1000) {
            let first = batch[0].clone();
            let stream = futures::stream::iter(batch.iter().cloned().map(Ok).collect::<Vec<_>>()).boxed();
            let fut = async {
                let mut results = self.store.delete_stream(stream);
                let mut n = 0u64;
                while let Some(r) = results.next().await {
                    match r {
                        Ok(_) | Err(object_store::Error::NotFound { .. }) => n += 1,
                        Err(e) => return Err(e),
                    }
                }
                Ok(n)
            };
            deleted += self.call(Op::Delete, "delete", &first, fut).await?;
        }
        Ok(deleted)
    }

    /// Every key under `prefix`, at most `limit` of them (each page bounded by the timeout).
    pub(crate) async fn list_all(&self, prefix: &ObjectPath, limit: u64) -> Result<Vec<ObjectPath>, StoreError> {
        let mut out = Vec::new();
        let mut s = self.store.list(Some(prefix));
        // One request per page of (at most) 1000 keys; each page bounded by the timeout.
        self.count(Op::List);
        loop {
            let next = match tokio::time::timeout(self.timeout, s.next()).await {
                Ok(n) => n,
                Err(_) => return Err(StoreError::Timeout { op: "list", key: prefix.to_string(), after: self.timeout }),
            };
            match next {
                None => break,
                Some(Ok(meta)) => {
                    if out.len() as u64 >= limit {
                        return Err(StoreError::TooManyEntries { path: prefix.to_string().into(), limit });
                    }
                    out.push(meta.location);
                    if out.len() % 1000 == 0 {
                        self.count(Op::List);
                    }
                }
                Some(Err(e)) => return Err(StoreError::storage("list", prefix, e)),
            }
        }
        Ok(out)
    }
}
