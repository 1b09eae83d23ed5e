//! The periodic pusher: one task per running conversation.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::StoreError;
use crate::keys::Area;
use crate::push::PushReport;
use crate::status::SyncStatus;
use crate::ConversationStorage;

/// One tree the pusher keeps stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeSpec {
    pub area: Area,
    pub dir: PathBuf,
}

impl TreeSpec {
    pub fn new(area: Area, dir: impl Into<PathBuf>) -> Self {
        Self { area, dir: dir.into() }
    }
}

type Reply = oneshot::Sender<Result<Vec<PushReport>, StoreError>>;

enum Command {
    PushNow(Reply),
    Finish(Reply),
}

/// Controls a conversation's periodic pusher. Dropping it stops the pusher after the push in
/// flight (if any), without a final push.
pub struct PusherHandle {
    storage: ConversationStorage,
    tx: mpsc::Sender<Command>,
    /// Ends a retry pause of a periodic push so a command is served at once.
    wake: Arc<Notify>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for PusherHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PusherHandle").field("storage", &self.storage).finish()
    }
}

impl ConversationStorage {
    /// Starts pushing `trees` every `interval` (the first push one interval from now). Each
    /// periodic push is retried per `[workspace_storage.retry]`; a push that still fails is
    /// reported in the status and tried again at the next tick.
    pub fn spawn_pusher(&self, trees: Vec<TreeSpec>, interval: Duration) -> PusherHandle {
        let (tx, rx) = mpsc::channel(4);
        let wake = Arc::new(Notify::new());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(self.clone(), trees, interval.max(Duration::from_millis(10)), rx, wake.clone(), cancel.clone()));
        PusherHandle { storage: self.clone(), tx, wake, cancel, task }
    }
}

impl PusherHandle {
    pub fn status(&self) -> SyncStatus {
        self.storage.status()
    }

    pub fn storage(&self) -> &ConversationStorage {
        &self.storage
    }

    /// Pushes every tree now (with retries) and returns the reports; the periodic pushes go on.
    pub async fn push_now(&self) -> Result<Vec<PushReport>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::PushNow(reply)).await.map_err(|_| StoreError::Cancelled)?;
        self.wake.notify_one();
        rx.await.map_err(|_| StoreError::Cancelled)?
    }

    /// The final push (idle stop, delete with keep, shutdown): pushes every tree (with
    /// retries), then stops. Bounded by `timeout`; on time-out the push in flight is abandoned
    /// (the stored copy stays at its last generation) and the error says so.
    pub async fn finish(self, timeout: Duration) -> Result<Vec<PushReport>, StoreError> {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Finish(reply)).await.is_err() {
            return Err(StoreError::Cancelled);
        }
        self.wake.notify_one();
        let r = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(StoreError::Cancelled),
            Err(_) => {
                self.cancel.cancel();
                Err(StoreError::Timeout {
                    op: "final push",
                    key: self.storage.key_prefix().to_owned(),
                    after: timeout,
                })
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        r
    }

    /// Stops without a final push (delete with purge): a push in flight is abandoned, which is
    /// safe (see the crate docs on consistency).
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

async fn run(
    storage: ConversationStorage,
    trees: Vec<TreeSpec>,
    interval: Duration,
    mut rx: mpsc::Receiver<Command>,
    wake: Arc<Notify>,
    cancel: CancellationToken,
) {
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            cmd = rx.recv() => match cmd {
                None => break,
                Some(Command::PushNow(reply)) => {
                    let r = round(&storage, &trees, &cancel, None).await;
                    let _ = reply.send(r);
                }
                Some(Command::Finish(reply)) => {
                    let r = round(&storage, &trees, &cancel, None).await;
                    let _ = reply.send(r);
                    break;
                }
            },
            _ = ticker.tick() => {
                // Errors are in the status (and the log); the next tick tries again.
                let _ = round(&storage, &trees, &cancel, Some(&wake)).await;
            }
        }
    }
    tracing::debug!(conversation = %storage.conversation(), "workspace store: pusher stopped");
}

/// Pushes every tree; all are attempted even if one fails. The first error is returned.
async fn round(
    storage: &ConversationStorage,
    trees: &[TreeSpec],
    cancel: &CancellationToken,
    interrupt: Option<&Notify>,
) -> Result<Vec<PushReport>, StoreError> {
    let mut reports = Vec::with_capacity(trees.len());
    let mut first_err = None;
    for t in trees {
        if cancel.is_cancelled() {
            return Err(StoreError::Cancelled);
        }
        match storage.push_retrying(t.area, &t.dir, Some(cancel), interrupt).await {
            Ok(r) => reports.push(r),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(reports),
    }
}
