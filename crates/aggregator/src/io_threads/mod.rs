//! I/O threads: client connections served nginx-style, each on one thread with an event
//! loop of its own.
//!
//! Why: on the shared work-stealing runtime a fast-path exchange crosses threads. One worker
//! owns the epoll driver; a worker with nothing to do parks on a futex and must be woken
//! when the driver finds it work. In a closed loop of 64 connections this left ~10 % of the
//! machine idle (78 of 800 scheduler ticks, against 16 for nginx, whose workers are
//! single-threaded event loops) and held throughput at 0.93× nginx's, with the same CPU per
//! request (docs/performance.md, the results of commit 09f640d: I/O threads). A `current_thread` runtime
//! per thread waits in its own epoll and runs what it finds there, with no hand-over.
//!
//! What runs here: the fast path only (crate::fastpath). The first request of a connection
//! that the fast path does not take moves the connection to the main runtime, where the
//! router, WebSockets and all background work live ([`crate::fastpath::Serving`]). The
//! acceptor gives each new connection to the thread serving the fewest, so a burst of
//! connections spreads evenly.
//!
//! Shutdown: the threads stop when [`IoThreads`] is dropped. crate::server drops it only
//! after every connection has finished (its task tracker), so no connection is cut by it.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::fastpath::Pool;

mod busy_poll;

pub use busy_poll::BusyPoll;

/// The running I/O threads.
pub struct IoThreads {
    threads: Vec<IoThread>,
    stop: CancellationToken,
}

struct IoThread {
    handle: Handle,
    /// Connections this thread serves now.
    open: Arc<AtomicUsize>,
    local: Local,
}

/// What a connection shares with the others on its thread.
#[derive(Clone)]
pub struct Local {
    /// The fast path's idle downstream connections, registered with this thread's loop.
    pub pool: Arc<Pool>,
    /// Shutdown, as this thread's own child of `AppState::shutdown`.
    pub stop: CancellationToken,
    /// The thread's activity, for its poller.
    pub busy: Arc<BusyPoll>,
}

impl IoThreads {
    /// Start `count` threads (at least one), each polling up to `busy_poll` after activity
    /// ([`BusyPoll`]; zero: never). `shutdown`: cancelled when connections should close.
    pub fn start(count: usize, busy_poll: std::time::Duration, shutdown: &CancellationToken) -> std::io::Result<Self> {
        // Built up in place: if a thread cannot start, dropping `this` stops those that did.
        let mut this = Self { threads: Vec::with_capacity(count.max(1)), stop: CancellationToken::new() };
        for i in 0..count.max(1) {
            // The runtime is built and dropped on its own thread (dropping one inside the
            // caller's runtime would panic); its handle comes back once it exists.
            let (handle_tx, handle_rx) = std::sync::mpsc::sync_channel(1);
            let stopped = this.stop.clone();
            std::thread::Builder::new().name(format!("nestor-io-{i}")).spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                // Tasks spawned here run while this is driven. When it returns, what is left
                // (nothing, after a graceful shutdown) is dropped with the runtime.
                rt.block_on(stopped.cancelled());
            })?;
            // A thread starting: microseconds, once, at start.
            let handle = handle_rx.recv().map_err(|_| std::io::Error::other("an I/O thread ended while starting"))??;
            let busy = BusyPoll::new(busy_poll);
            handle.spawn(busy.clone().run());
            this.threads.push(IoThread { handle, open: Arc::default(), local: Local { pool: Arc::default(), stop: shutdown.child_token(), busy } });
        }
        tracing::debug!(threads = this.threads.len(), "I/O threads started");
        Ok(this)
    }

    /// Connections each thread serves now.
    #[cfg(test)]
    fn open_per_thread(&self) -> Vec<usize> {
        self.threads.iter().map(|t| t.open.load(Ordering::Relaxed)).collect()
    }

    /// Serve the accepted `tcp` on the thread serving the fewest connections:
    /// `serve(connection, what it shares with the thread's others)` runs there.
    pub fn serve<F, Fut>(&self, tcp: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream, Local) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(thread) = self.threads.iter().min_by_key(|t| t.open.load(Ordering::Relaxed)) else { return };
        // Leave this runtime's event loop; join the thread's inside its task.
        let tcp = match tcp.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("cannot move an accepted connection to an I/O thread: {e}");
                return;
            }
        };
        let open = Open::count(&thread.open);
        let local = thread.local.clone();
        thread.handle.spawn(async move {
            let _open = open;
            match TcpStream::from_std(tcp) {
                Ok(tcp) => serve(tcp, local).await,
                Err(e) => tracing::debug!("cannot register a connection on an I/O thread: {e}"),
            }
        });
    }
}

impl Drop for IoThreads {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One connection counted as open on a thread until dropped.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn count(open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self(open.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections go to the least busy thread, and each is served on an I/O thread.
    #[tokio::test]
    async fn spreads_connections_evenly() {
        let threads = IoThreads::start(3, std::time::Duration::ZERO, &CancellationToken::new()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (names_tx, mut names_rx) = tokio::sync::mpsc::unbounded_channel();
        let release = CancellationToken::new();
        let mut clients = Vec::new();
        for _ in 0..9 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            let (tcp, _) = listener.accept().await.unwrap();
            let (names, release) = (names_tx.clone(), release.clone());
            threads.serve(tcp, move |_tcp, _local| async move {
                let _ = names.send(std::thread::current().name().map(str::to_owned));
                release.cancelled().await;
            });
        }
        let mut names = Vec::new();
        for _ in 0..9 {
            let name = tokio::time::timeout(std::time::Duration::from_secs(10), names_rx.recv()).await.unwrap().unwrap();
            names.push(name.unwrap_or_default());
        }
        assert!(names.iter().all(|n| n.starts_with("nestor-io-")), "{names:?}");
        assert_eq!(threads.open_per_thread(), vec![3, 3, 3]);
        release.cancel();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while threads.open_per_thread().iter().sum::<usize>() > 0 {
            assert!(std::time::Instant::now() < deadline, "connections still counted open");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
}
