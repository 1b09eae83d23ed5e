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
//! A busy thread stands aside. A polling round is quick (~1–2 µs) on a thread that has
//! nothing else to do; it is slow when the thread runs other work between rounds or waits
//! for a CPU that other threads hold. When [`SAMPLE_ROUNDS`] rounds take longer than
//! [`BUSY_ROUND`] each on average, twice in a row, polling saves no wake-up (the thread
//! seldom sleeps) and spends a CPU the machine's other threads want: it trades one
//! `epoll_wait` that finds many sockets ready for several that find one or two. The poller
//! then pauses ([`Backoff`]: 1 ms, doubling to [`BACKOFF_MAX`] while the thread stays busy;
//! tokio's timer rounds up to the next millisecond) and the runtime sleeps in `epoll_wait`
//! as it does with polling off. Serving one client, 64 rounds take ~100 µs (~40 rounds per
//! request); serving 32 connections of a saturated 2-CPU machine, a round takes ~300 µs
//! (docs/performance.md, "Busy polling stands aside").
//!
//! Cost: a thread serving back-to-back requests of one client polls between them, so it
//! stays on a CPU (as haltpoll's does). `[http] busy_poll_us = 0` turns it off, e.g. where
//! CPU time is metered or capped (a Kubernetes CPU limit).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Smallest window after growing from none (haltpoll's `guest_halt_poll_grow_start`).
const GROW_START: Duration = Duration::from_micros(10);

/// Rounds of polling between offers of the CPU to other threads (`sched_yield`). A
/// `sched_yield` costs about as much as the rest of a round, and a slower round is a slower
/// reaction to what arrives: every eighth round keeps the offer frequent (every few µs).
const YIELD_EVERY: u32 = 8;

/// [`BusyPoll::state`]: waiting for activity.
const ASLEEP: u8 = 0;
/// [`BusyPoll::state`]: polling.
const POLLING: u8 = 1;
/// [`BusyPoll::state`]: pausing, its thread busy.
const PAUSED: u8 = 2;

/// Polling rounds in one sample of how busy the thread is.
const SAMPLE_ROUNDS: u32 = 64;

/// A sample whose rounds take longer than this on average is busy (decided as soon as the
/// sample has taken `SAMPLE_ROUNDS` times this).
const BUSY_ROUND: Duration = Duration::from_micros(10);

/// First pause of a poller whose thread is busy; it doubles while the thread stays busy.
const BACKOFF_START: Duration = Duration::from_millis(1);

/// Longest pause: a thread that stops being busy polls again within this.
const BACKOFF_MAX: Duration = Duration::from_millis(32);

/// Activity of one I/O thread, and its poller.
pub struct BusyPoll {
    /// Longest window.
    max: Duration,
    /// Bumped on each activity (no clock read on the request path: the poller reads it).
    activity: AtomicU64,
    /// What the poller is doing: [`ASLEEP`] (waiting for activity), [`POLLING`] or
    /// [`PAUSED`] (its thread is busy; see [`Backoff`]).
    state: AtomicU8,
    wake: Notify,
}

impl BusyPoll {
    /// `max`: the longest poll window (zero: never poll).
    pub fn new(max: Duration) -> Arc<Self> {
        Arc::new(Self { max, activity: AtomicU64::new(0), state: AtomicU8::new(ASLEEP), wake: Notify::new() })
    }

    /// Something happened on this thread (a request arrived or was answered).
    pub fn touch(&self) {
        if self.max.is_zero() {
            return;
        }
        // One writer per thread: a plain increment is enough (a lost count is harmless).
        self.activity.store(self.activity.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
        if self.state.load(Ordering::Relaxed) == ASLEEP {
            // Marked before the poller runs, so more activity until then stores no second
            // wake-up (which would start a needless round of polling later).
            self.state.store(POLLING, Ordering::Relaxed);
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
        let mut backoff = Backoff::default();
        loop {
            self.state.store(ASLEEP, Ordering::Relaxed);
            self.wake.notified().await;
            self.state.store(POLLING, Ordering::Relaxed);
            // How long the thread went without activity: if within the longest window,
            // polling longer would have caught what came.
            let now = Instant::now();
            window = adapt(window, now.duration_since(last_activity), max);
            last_activity = now;
            // Poll until `window` passes with no activity. Each round hands the thread to
            // the runtime, which checks the sockets without blocking and runs what is ready.
            let mut seen = self.activity.load(Ordering::Relaxed);
            let mut round = 0u32;
            let mut sample = Sample::start(now);
            loop {
                tokio::task::yield_now().await;
                let mut now = Instant::now();
                let current = self.activity.load(Ordering::Relaxed);
                if current != seen {
                    (seen, last_activity) = (current, now);
                } else if now.duration_since(last_activity) >= window {
                    // Quiet long enough: whatever busy spell there was has ended.
                    backoff = Backoff::default();
                    break;
                }
                round = round.wrapping_add(1);
                if let Some(busy) = sample.round(now) {
                    if let Some(pause) = backoff.after_sample(busy) {
                        // Not asleep for `touch` (no wake-ups while paused): the runtime
                        // sleeps in `epoll_wait` until the pause ends.
                        self.state.store(PAUSED, Ordering::Relaxed);
                        metrics::counter!("nestor_busy_poll_pauses_total").increment(1);
                        tokio::time::sleep(pause).await;
                        self.state.store(POLLING, Ordering::Relaxed);
                        now = Instant::now();
                        let current = self.activity.load(Ordering::Relaxed);
                        if current != seen {
                            (seen, last_activity) = (current, now);
                        }
                    }
                    sample = Sample::start(now);
                }
                if round % YIELD_EVERY == 0 {
                    std::thread::yield_now();
                }
            }
        }
    }
}

/// Polling rounds counted against the time they take.
#[derive(Debug)]
struct Sample {
    start: Instant,
    rounds: u32,
}

impl Sample {
    fn start(now: Instant) -> Self {
        Self { start: now, rounds: 0 }
    }

    /// A round ended at `now`: whether the thread is busy, once that is decided.
    fn round(&mut self, now: Instant) -> Option<bool> {
        self.rounds += 1;
        if now.duration_since(self.start) > BUSY_ROUND * SAMPLE_ROUNDS {
            Some(true)
        } else if self.rounds >= SAMPLE_ROUNDS {
            Some(false)
        } else {
            None
        }
    }
}

/// How long a poller whose thread is busy pauses. Two busy samples in a row start it (one
/// slow sample can be a single preemption: a neighbour's time slice after `sched_yield`, a
/// hypervisor's steal); then [`BACKOFF_START`], doubling while samples stay busy (to
/// [`BACKOFF_MAX`]), halving while they do not (to none). The poller forgets it when its
/// thread goes quiet.
#[derive(Debug, Default)]
struct Backoff {
    pause: Duration,
    /// The last sample was busy (and no pause was taken for it).
    armed: bool,
}

impl Backoff {
    /// After a sample: the pause to take now, if the thread is busy.
    fn after_sample(&mut self, busy: bool) -> Option<Duration> {
        if !busy {
            self.armed = false;
            self.pause = if self.pause / 2 < BACKOFF_START { Duration::ZERO } else { self.pause / 2 };
            return None;
        }
        if self.pause.is_zero() && !self.armed {
            self.armed = true;
            return None;
        }
        self.armed = false;
        self.pause = (self.pause * 2).clamp(BACKOFF_START, BACKOFF_MAX);
        Some(self.pause)
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

    #[test]
    fn a_busy_thread_pauses_longer_each_busy_sample_and_polls_again_once_it_is_not() {
        let mut b = Backoff::default();
        assert_eq!(b.after_sample(false), None);
        assert_eq!(b.after_sample(true), None, "one busy sample alone (a preemption) pauses nothing");
        assert_eq!(b.after_sample(false), None);
        assert_eq!(b.after_sample(true), None);
        let pauses: Vec<_> = (0..8).map(|_| b.after_sample(true).unwrap()).collect();
        assert_eq!(pauses[0], BACKOFF_START);
        assert!(pauses.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*pauses.last().unwrap(), BACKOFF_MAX);
        for _ in 0..16 {
            assert_eq!(b.after_sample(false), None);
        }
        assert_eq!(b.after_sample(true), None, "quiet samples forget the busy spell");
        assert_eq!(b.after_sample(true), Some(BACKOFF_START));
    }

    #[test]
    fn slow_rounds_make_a_busy_sample_and_quick_ones_a_quiet_one() {
        let t0 = Instant::now();
        let mut quick = Sample::start(t0);
        let verdicts: Vec<_> = (1..=SAMPLE_ROUNDS).map(|i| quick.round(t0 + i * Duration::from_micros(2))).collect();
        assert!(verdicts[..verdicts.len() - 1].iter().all(Option::is_none));
        assert_eq!(verdicts.last(), Some(&Some(false)));
        let mut slow = Sample::start(t0);
        assert_eq!(slow.round(t0 + Duration::from_micros(300)), None);
        assert_eq!(slow.round(t0 + BUSY_ROUND * SAMPLE_ROUNDS + Duration::from_micros(1)), Some(true), "decided before the sample's last round");
    }

    /// Slow polling rounds (a thread busy with other work) pause the poller, and it polls
    /// again after the pause.
    #[tokio::test(flavor = "current_thread")]
    async fn a_poller_whose_rounds_are_slow_pauses() {
        let busy = BusyPoll::new(Duration::from_millis(100));
        let poller = tokio::spawn(busy.clone().run());
        tokio::task::yield_now().await;
        // Activity, and other work (here: the thread blocked), before every round.
        let mut paused = false;
        for _ in 0..(SAMPLE_ROUNDS * 4) {
            busy.touch();
            std::thread::sleep(BUSY_ROUND * 2);
            tokio::task::yield_now().await;
            if busy.state.load(Ordering::Relaxed) == PAUSED {
                paused = true;
                break;
            }
        }
        assert!(paused, "a poller whose rounds were slow did not pause");
        let deadline = Instant::now() + Duration::from_secs(5);
        while busy.state.load(Ordering::Relaxed) == PAUSED {
            assert!(Instant::now() < deadline, "still paused long after the pause");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        poller.abort();
    }

    /// Activity wakes the poller, which polls for a while and then sleeps again.
    #[tokio::test(flavor = "current_thread")]
    async fn polls_after_activity_then_sleeps() {
        let busy = BusyPoll::new(Duration::from_micros(200));
        let poller = tokio::spawn(busy.clone().run());
        tokio::task::yield_now().await;
        assert_eq!(busy.state.load(Ordering::Relaxed), ASLEEP);
        busy.touch();
        tokio::task::yield_now().await;
        assert_eq!(busy.state.load(Ordering::Relaxed), POLLING, "woken by activity");
        let deadline = Instant::now() + Duration::from_secs(5);
        while busy.state.load(Ordering::Relaxed) != ASLEEP {
            assert!(Instant::now() < deadline, "still polling long after the last activity");
            tokio::task::yield_now().await;
        }
        poller.abort();
    }
}
