//! The queue from a pair's task to its client writer task, with its byte count.
//!
//! Why not `tokio::sync::mpsc::unbounded_channel`: it allocates its first block of 32
//! message slots (~2 KiB with tungstenite's `Message`) when it is created and keeps it for
//! the channel's life, so every idle pair paid for it (issue 4 sets 16 KiB per idle pair).
//! This queue is a `VecDeque` behind a mutex: its buffer is allocated by the first message
//! and released whenever the writer finds it empty and goes to sleep, so an idle pair holds
//! only the shared header. One producer (the pair) and one consumer (the writer), so the
//! mutex is uncontended but for the moments both touch the queue.
//!
//! The byte count is what makes a slow consumer detectable: a message counts from
//! [`Outbox::send`] until the writer has handed it to the socket ([`Inbox::done`]).
//! [`Outbox::backlog`] leaves out the oldest message, the one the writer is on or takes
//! next: a single message larger than the limit says nothing about the client's speed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Wakes the receiver (a permit is stored when it is not waiting yet).
    wake: Notify,
    /// Bytes sent and not yet [`Inbox::done`].
    pending: AtomicUsize,
    /// Of those, bytes the receiver has taken and not yet [`Inbox::done`].
    taken: AtomicUsize,
}

struct State<T> {
    /// Items with their byte counts.
    items: VecDeque<(T, usize)>,
    sender_alive: bool,
    receiver_alive: bool,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding the lock leaves a valid queue (every operation is a single
        // push/pop), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The oldest item, counted as taken while the queue's lock (`s`) is held: `backlog`
    /// never sees an item gone from the queue and not yet taken.
    fn take(&self, s: &mut State<T>) -> Option<T> {
        let (item, n) = s.items.pop_front()?;
        self.taken.fetch_add(n, Ordering::Relaxed);
        Some(item)
    }
}

/// The sending end (the pair's task).
pub struct Outbox<T> {
    shared: Arc<Shared<T>>,
}

/// The receiving end (the writer task).
pub struct Inbox<T> {
    shared: Arc<Shared<T>>,
}

/// A new queue.
pub fn outbox<T>() -> (Outbox<T>, Inbox<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State { items: VecDeque::new(), sender_alive: true, receiver_alive: true }),
        wake: Notify::new(),
        pending: AtomicUsize::new(0),
        taken: AtomicUsize::new(0),
    });
    (Outbox { shared: shared.clone() }, Inbox { shared })
}

impl<T> Outbox<T> {
    /// Queue `item` (counting `bytes`). False if the receiver is gone (the item is dropped).
    pub fn send(&self, item: T, bytes: usize) -> bool {
        {
            let mut s = self.shared.lock();
            if !s.receiver_alive {
                return false;
            }
            s.items.push_back((item, bytes));
        }
        self.shared.pending.fetch_add(bytes, Ordering::Relaxed);
        self.shared.wake.notify_one();
        true
    }

    /// Bytes queued and not yet handed to the socket.
    pub fn pending(&self) -> usize {
        self.shared.pending.load(Ordering::Relaxed)
    }

    /// [`Outbox::pending`] without the oldest message (the one the receiver is handing to
    /// the socket, or takes next): what waits behind it. Takes the queue's lock; check
    /// `pending` first.
    pub fn backlog(&self) -> usize {
        let s = self.shared.lock();
        // Acquire pairs with `done`'s release: a `taken` already lowered comes with the
        // `pending` lowered before it (the estimate errs low, never high).
        let taken = self.shared.taken.load(Ordering::Acquire);
        let oldest = if taken > 0 { taken } else { s.items.front().map_or(0, |(_, n)| *n) };
        self.shared.pending.load(Ordering::Relaxed).saturating_sub(oldest)
    }
}

impl<T> Drop for Outbox<T> {
    fn drop(&mut self) {
        self.shared.lock().sender_alive = false;
        self.shared.wake.notify_one();
    }
}

impl<T> Inbox<T> {
    /// The next item, waiting for one; `None` once the sender is gone and the queue is empty.
    /// Before it waits, the queue's buffer is released (an idle pair keeps none).
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            {
                let mut s = self.shared.lock();
                if let Some(item) = self.shared.take(&mut s) {
                    return Some(item);
                }
                if !s.sender_alive {
                    return None;
                }
                if s.items.capacity() > 0 {
                    s.items = VecDeque::new();
                }
            }
            self.shared.wake.notified().await;
        }
    }

    /// The next item if one is queued.
    pub fn try_recv(&mut self) -> Option<T> {
        self.shared.take(&mut self.shared.lock())
    }

    /// `bytes` of what was received are now the socket's.
    pub fn done(&self, bytes: usize) {
        // `pending` first, `taken` after it with release: in between, `backlog` reads low
        // (lenient), never high.
        self.shared.pending.fetch_sub(bytes, Ordering::Relaxed);
        self.shared.taken.fetch_sub(bytes, Ordering::Release);
    }

    /// Bytes of queue buffer held now (for tests).
    pub fn held_capacity(&self) -> usize {
        self.shared.lock().items.capacity() * std::mem::size_of::<(T, usize)>()
    }
}

impl<T> Drop for Inbox<T> {
    fn drop(&mut self) {
        let items = {
            let mut s = self.shared.lock();
            s.receiver_alive = false;
            std::mem::take(&mut s.items)
        };
        // Dropped outside the lock.
        drop(items);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn delivers_in_order_and_counts_bytes() {
        let (tx, mut rx) = outbox::<u32>();
        assert!(tx.send(1, 10));
        assert!(tx.send(2, 5));
        assert_eq!(tx.pending(), 15);
        assert_eq!(rx.recv().await, Some(1));
        rx.done(10);
        assert_eq!(rx.try_recv(), Some(2));
        rx.done(5);
        assert_eq!(tx.pending(), 0);
        assert_eq!(rx.try_recv(), None);
    }

    #[tokio::test]
    async fn the_backlog_leaves_out_the_oldest_message() {
        let (tx, mut rx) = outbox::<u32>();
        assert!(tx.send(1, 100));
        assert_eq!((tx.pending(), tx.backlog()), (100, 0), "queued alone: no backlog");
        assert!(tx.send(2, 5));
        assert_eq!(tx.backlog(), 5);
        assert_eq!(rx.recv().await, Some(1));
        assert_eq!(tx.backlog(), 5, "taken and being written: still the oldest");
        rx.done(100);
        assert_eq!((tx.pending(), tx.backlog()), (5, 0));
        assert_eq!(rx.try_recv(), Some(2));
        rx.done(5);
        assert_eq!((tx.pending(), tx.backlog()), (0, 0));
    }

    #[tokio::test]
    async fn wakes_a_waiting_receiver_and_ends_when_the_sender_is_gone() {
        let (tx, mut rx) = outbox::<u32>();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(v) = rx.recv().await {
                got.push(v);
            }
            got
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(tx.send(7, 1));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(tx.send(8, 1));
        drop(tx);
        let got = tokio::time::timeout(Duration::from_secs(5), reader).await.expect("the receiver ended").unwrap();
        assert_eq!(got, vec![7, 8]);
    }

    #[tokio::test]
    async fn send_fails_once_the_receiver_is_gone() {
        let (tx, rx) = outbox::<u32>();
        drop(rx);
        assert!(!tx.send(1, 1));
        assert_eq!(tx.pending(), 0);
    }

    #[tokio::test]
    async fn an_idle_queue_holds_no_buffer() {
        let (tx, mut rx) = outbox::<[u8; 64]>();
        for _ in 0..100 {
            tx.send([0; 64], 64);
        }
        assert!(rx.held_capacity() >= 100 * 64);
        while rx.try_recv().is_some() {}
        // The writer drained it and waits: the buffer goes.
        let waiting = tokio::time::timeout(Duration::from_millis(20), rx.recv()).await;
        assert!(waiting.is_err(), "nothing was queued");
        assert_eq!(rx.held_capacity(), 0);
    }
}
