//! Busy polling: an I/O thread that just saw activity keeps checking its sockets for a few
//! tens of microseconds before it sleeps.
//!
//! Why: every request through nestor wakes nestor twice (the request from the client, the
//! answer from the downstream). A thread that went to sleep in `epoll_wait` takes ~10–20 µs
//! to come back on a virtual machine (a virtual CPU that halted is woken through the
//! hypervisor), which made nestor's added latency that of a byte relay (+42–46 µs here)
//! however little work it did. Polling for a bounded time after activity catches the answer
//! of a quick downstream and the next request of a busy client without that wake-up. It is
//! what Linux's `cpuidle-haltpoll` does for virtual CPUs, and `SO_BUSY_POLL` for sockets.
//!
//! Bounds: the poll window adapts as haltpoll's does. It grows (to at most
//! `[http] busy_poll_us`) while the next activity arrives within the longest window, where
//! polling longer would have caught it; it shrinks (to none) while activity comes later
//! than that, where polling was wasted. A thread with no activity never polls, and one with
//! sparse activity soon stops. While polling, the thread offers the CPU to any other
//! runnable thread every few rounds (`sched_yield`).
//!
//! Cost: a thread serving back-to-back requests of one client polls between them, so it
//! stays on a CPU (as haltpoll's does); on a saturated machine polling costs ~1–2 % of
//! throughput (docs/performance.md). `[http] busy_poll_us = 0` turns it off, e.g. where CPU
//! time is metered or capped (a Kubernetes CPU limit).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Smallest window after growing from none (haltpoll's `guest_halt_poll_grow_start`).
const GROW_START: Duration = Duration::from_micros(10);

/// Rounds of polling between offers of the CPU to other threads (`sched_yield`). A
/// `sched_yield` costs about as much as the rest of a round, and a slower round is a slower
/// reaction to what arrives: every eighth round keeps the offer frequent (every few µs).
const YIELD_EVERY: u32 = 8;

/// Activity of one I/O thread, and its poller.
pub struct BusyPoll {
    /// Longest window.
    max: Duration,
    /// Bumped on each activity (no clock read on the request path: the poller reads it).
    activity: AtomicU64,
    /// The poller is asleep (waiting for activity).
    asleep: AtomicBool,
    wake: Notify,
}

impl BusyPoll {
    /// `max`: the longest poll window (zero: never poll).
    pub fn new(max: Duration) -> Arc<Self> {
        Arc::new(Self { max, activity: AtomicU64::new(0), asleep: AtomicBool::new(true), wake: Notify::new() })
    }

    /// Something happened on this thread (a request arrived or was answered).
    pub fn touch(&self) {
        if self.max.is_zero() {
            return;
        }
        // One writer per thread: a plain increment is enough (a lost count is harmless).
        self.activity.store(self.activity.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        if self.asleep.load(Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }

    /// The poller: spawned on its I/O thread for the thread's life.
    // `%`, not `is_multiple_of`: the workspace's rust-version is 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    pub async fn run(self: Arc<Self>) {
        if self.max.is_zero() {
            return;
        }
        let max = self.max;
        let mut window = Duration::ZERO;
        let mut last_activity = Instant::now();
        loop {
            self.asleep.store(true, Ordering::Relaxed);
            self.wake.notified().await;
            self.asleep.store(false, Ordering::Relaxed);
            // How long the thread went without activity: if within the longest window,
            // polling longer would have caught what came.
            let now = Instant::now();
            window = adapt(window, now.duration_since(last_activity), max);
            last_activity = now;
            // Poll until `window` passes with no activity. Each round hands the thread to
            // the runtime, which checks the sockets without blocking and runs what is ready.
            let mut seen = self.activity.load(Ordering::Relaxed);
            let mut round = 0u32;
            loop {
                tokio::task::yield_now().await;
                let now = Instant::now();
                let current = self.activity.load(Ordering::Relaxed);
                if current != seen {
                    (seen, last_activity) = (current, now);
                } else if now.duration_since(last_activity) >= window {
                    break;
                }
                round = round.wrapping_add(1);
                if round % YIELD_EVERY == 0 {
                    std::thread::yield_now();
                }
            }
        }
    }
}

/// The next window after `gap` without activity, with the longest window `max` (haltpoll's
/// rule: double when polling longer would have helped, else halve).
fn adapt(window: Duration, gap: Duration, max: Duration) -> Duration {
    if gap <= max {
        (window * 2).max(GROW_START).min(max)
    } else if window / 2 < GROW_START {
        Duration::ZERO
    } else {
        window / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// The window stays within [0, max]; it never shrinks after a short gap nor grows
        /// after a long one.
        #[test]
        fn window_stays_bounded(gaps in proptest::collection::vec(0u64..1_000_000, 1..200), max_us in 1u64..500) {
            let max = Duration::from_micros(max_us);
            let mut w = Duration::ZERO;
            for g in gaps.into_iter().map(Duration::from_nanos) {
                let next = adapt(w, g, max);
                proptest::prop_assert!(next <= max);
                if g <= max {
                    proptest::prop_assert!(next >= w);
                } else {
                    proptest::prop_assert!(next <= w);
                }
                w = next;
            }
        }
    }

    #[test]
    fn long_gaps_stop_polling_and_short_ones_start_it() {
        let max = Duration::from_micros(100);
        let mut w = max;
        for _ in 0..16 {
            w = adapt(w, 10 * max, max);
        }
        assert_eq!(w, Duration::ZERO);
        assert_eq!(adapt(Duration::ZERO, Duration::from_micros(20), max), GROW_START);
    }

    /// Activity wakes the poller, which polls for a while and then sleeps again.
    #[tokio::test(flavor = "current_thread")]
    async fn polls_after_activity_then_sleeps() {
        let busy = BusyPoll::new(Duration::from_micros(200));
        let poller = tokio::spawn(busy.clone().run());
        tokio::task::yield_now().await;
        assert!(busy.asleep.load(Ordering::Relaxed));
        busy.touch();
        tokio::task::yield_now().await;
        assert!(!busy.asleep.load(Ordering::Relaxed), "woken by activity");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !busy.asleep.load(Ordering::Relaxed) {
            assert!(Instant::now() < deadline, "still polling long after the last activity");
            tokio::task::yield_now().await;
        }
        poller.abort();
    }
}
