//! Persisting catalog entries off the request path: in order, coalesced, by one writer.
//!
//! Every catalog file write is an atomic replace with two fsyncs (file and directory). The
//! catalog changes far more often than it needs to be written: a refresh of a busy
//! downstream changes hundreds of infos, and every state update seen on a proxied socket or
//! a webhook changes one. Writing each change from its caller had two costs, both seen in
//! the soak benchmark: a search waited for the fsyncs of every entry its refresh changed
//! (its p99 grew with the disk's backlog), and fire-and-forget writes from state updates
//! piled up in the blocking pool (threads, memory, and no order: an older info could land
//! after a newer one).
//!
//! So the catalog hands writes to a [`Writer`]: one pending operation per conversation
//! (the latest save or removal replaces an earlier one not yet written) and one worker that
//! writes the pending set in a blocking task, batch after batch, in order. Callers that need
//! durability before they answer (a create registering a route, a delete) wait for their
//! operation ([`Writer::save_durable`], [`Writer::remove_durable`]); cache refreshes do not.
//! Memory is bounded by the number of conversations; at shutdown [`Writer::flush`] waits
//! (bounded) for what is queued.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nestor_core::ConversationId;
use tokio::sync::{oneshot, Notify};

use crate::store::{Store, StoredEntry};

/// How often an idle worker checks whether its catalog is gone.
const IDLE_CHECK: Duration = Duration::from_secs(5);

enum Op {
    Save(Box<StoredEntry>),
    Remove,
}

struct Pending {
    op: Op,
    /// Callers waiting for this conversation's next write (carried over when a newer
    /// operation replaces the pending one: theirs is superseded, not lost).
    waiters: Vec<oneshot::Sender<Result<(), String>>>,
}

#[derive(Default)]
struct State {
    pending: HashMap<ConversationId, Pending>,
    /// A worker task exists.
    worker: bool,
    /// The worker is writing a batch.
    busy: bool,
}

struct Inner {
    store: Store,
    state: Mutex<State>,
    wake: Notify,
}

/// The catalog's single, coalescing writer (see the module docs).
pub struct Writer {
    inner: Arc<Inner>,
}

impl Writer {
    pub fn new(store: Store) -> Writer {
        Writer { inner: Arc::new(Inner { store, state: Mutex::new(State::default()), wake: Notify::new() }) }
    }

    /// Queue a save; returns at once.
    pub fn save(&self, e: StoredEntry) {
        let id = e.id;
        self.enqueue(id, Op::Save(Box::new(e)), None);
    }

    /// Queue a removal; returns at once.
    #[cfg(test)]
    pub fn remove(&self, id: ConversationId) {
        self.enqueue(id, Op::Remove, None);
    }

    /// Queue a save and wait until it (or a later operation on the same conversation) is
    /// written.
    pub async fn save_durable(&self, e: StoredEntry) -> std::io::Result<()> {
        let id = e.id;
        let (tx, rx) = oneshot::channel();
        self.enqueue(id, Op::Save(Box::new(e)), Some(tx));
        wait(rx).await
    }

    /// Queue a removal and wait until it is written.
    pub async fn remove_durable(&self, id: ConversationId) -> std::io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(id, Op::Remove, Some(tx));
        wait(rx).await
    }

    /// Operations queued and not written yet.
    pub fn backlog(&self) -> usize {
        let st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        st.pending.len() + usize::from(st.busy)
    }

    /// Wait until everything queued so far is written, up to `within`. Returns whether it was.
    pub async fn flush(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if self.backlog() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                tracing::warn!(backlog = self.backlog(), "catalog writes still queued after {within:?}");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn enqueue(&self, id: ConversationId, op: Op, waiter: Option<oneshot::Sender<Result<(), String>>>) {
        let start_worker = {
            let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
            match st.pending.entry(id) {
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    // The newer operation supersedes the pending one; its waiters wait for it.
                    let p = o.get_mut();
                    p.op = op;
                    p.waiters.extend(waiter);
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(Pending { op, waiters: waiter.into_iter().collect() });
                }
            }
            !std::mem::replace(&mut st.worker, true)
        };
        if start_worker {
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn(worker(Arc::downgrade(&self.inner)));
                }
                Err(_) => {
                    // No runtime (a synchronous caller, tests): write in place.
                    let batch = {
                        let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
                        st.worker = false;
                        std::mem::take(&mut st.pending)
                    };
                    finish(write_batch(&self.inner.store, batch));
                    return;
                }
            }
        }
        self.inner.wake.notify_one();
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // What is still queued is written here (the catalog is going away: process exit or a
        // test); the worker holds only a weak reference and ends when woken.
        let batch = std::mem::take(&mut self.inner.state.lock().unwrap_or_else(|p| p.into_inner()).pending);
        if !batch.is_empty() {
            finish(write_batch(&self.inner.store, batch));
        }
        self.inner.wake.notify_one();
    }
}

async fn wait(rx: oneshot::Receiver<Result<(), String>>) -> std::io::Result<()> {
    match rx.await {
        Ok(r) => r.map_err(std::io::Error::other),
        Err(_) => Err(std::io::Error::other("the catalog writer stopped before writing")),
    }
}

/// Write queued batches until the catalog is dropped.
async fn worker(inner: Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let batch = {
            let mut st = strong.state.lock().unwrap_or_else(|p| p.into_inner());
            st.busy = !st.pending.is_empty();
            std::mem::take(&mut st.pending)
        };
        if batch.is_empty() {
            // Wait for work without keeping the catalog alive.
            let notified = {
                let s = strong.clone();
                async move { tokio::time::timeout(IDLE_CHECK, s.wake.notified()).await }
            };
            drop(strong);
            let _ = notified.await;
            continue;
        }
        let store = strong.store.clone();
        let done = tokio::task::spawn_blocking(move || write_batch(&store, batch)).await;
        match done {
            Ok(done) => finish(done),
            Err(e) => tracing::error!("catalog writer task failed: {e}"),
        }
        strong.state.lock().unwrap_or_else(|p| p.into_inner()).busy = false;
    }
}

type Done = Vec<(ConversationId, Result<(), String>, Vec<oneshot::Sender<Result<(), String>>>)>;

fn write_batch(store: &Store, batch: HashMap<ConversationId, Pending>) -> Done {
    batch
        .into_iter()
        .map(|(id, p)| {
            let r = match &p.op {
                Op::Save(e) => store.save(e),
                Op::Remove => store.remove(&id),
            };
            if let Err(e) = &r {
                tracing::error!(conversation = %id, "could not persist catalog entry: {e}");
            }
            (id, r.map_err(|e| e.to_string()), p.waiters)
        })
        .collect()
}

fn finish(done: Done) {
    for (_, r, waiters) in done {
        for w in waiters {
            let _ = w.send(r.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nestor_core::{DownstreamId, UserId};
    use serde_json::json;

    fn entry(id: ConversationId, title: &str) -> StoredEntry {
        StoredEntry { version: 1, id, downstream: DownstreamId::new("d"), owner: UserId::default_user(), info: std::sync::Arc::new(json!({"id": id.to_string(), "title": title})) }
    }

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("nestor-writer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[tokio::test]
    async fn the_latest_operation_wins_and_durable_calls_wait_for_it() {
        let d = dir("latest");
        let store = Store::open(&d).unwrap();
        let w = Writer::new(store.clone());
        let a = ConversationId::new_random();
        let b = ConversationId::new_random();
        for i in 0..200 {
            w.save(entry(a, &format!("a{i}")));
        }
        w.save(entry(b, "b"));
        w.remove(b);
        w.save_durable(entry(a, "last")).await.unwrap();
        assert!(w.flush(Duration::from_secs(10)).await);
        let all = store.load_all();
        assert_eq!(all.len(), 1, "b was removed after its save");
        assert_eq!(all[0].info["title"], "last");
        w.remove_durable(a).await.unwrap();
        assert!(store.load_all().is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn without_a_runtime_it_writes_in_place() {
        let d = dir("sync");
        let store = Store::open(&d).unwrap();
        let w = Writer::new(store.clone());
        let a = ConversationId::new_random();
        w.save(entry(a, "x"));
        assert_eq!(store.load_all().len(), 1);
        assert_eq!(w.backlog(), 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn a_failed_write_is_reported_to_the_waiter() {
        let d = dir("fail");
        let store = Store::open(&d).unwrap();
        let w = Writer::new(store);
        std::fs::remove_dir_all(&d).unwrap();
        let a = ConversationId::new_random();
        assert!(w.save_durable(entry(a, "x")).await.is_err());
    }
}
