//! The load loop: a few driver tasks, each keeping its share of `--concurrency` requests
//! in flight against a [`Load`] (the embedded node or an HTTP target), recording every
//! request's latency in its own HDR histogram.
//!
//! Closed loop: a slot issues its next request as soon as the previous one finished.
//! Open loop (`--rate`): requests are due at a fixed arrival rate; each time the driver
//! wakes (a completion, or its 1 ms timer tick, tokio's timer resolution) it issues every
//! request due by now, as long as a slot is free. Latency is measured from the moment a
//! request is issued, so a request that waited for a free slot does not count that wait:
//! such requests are counted in `delayed` instead, which is how a saturated open-loop run
//! shows itself.
//!
//! Drivers share one op counter, claimed in chunks so that they rarely touch it.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::time::{Interval, MissedTickBehavior};

use super::inflight::InFlight;

/// Ops a driver claims from the shared counter at a time (rounded up to whole requests).
const CLAIM_CHUNK: u64 = 64;

/// A run aborts when this many requests failed before any succeeded.
pub(crate) const EARLY_FAILURES: u32 = 100;

/// The latency histogram every driver records into: 1 µs to 1 hour, 3 significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid")
}

/// The end of one request of `ops` operations.
#[derive(Debug)]
pub(crate) struct Done {
    pub ok: u32,
    pub failed: u32,
    /// Why (some of) the operations failed.
    pub error: Option<String>,
}

impl Done {
    pub(crate) fn ok(ops: u32) -> Self {
        Done {
            ok: ops,
            failed: 0,
            error: None,
        }
    }

    pub(crate) fn failed(ops: u32, error: String) -> Self {
        Done {
            ok: 0,
            failed: ops,
            error: Some(error),
        }
    }
}

/// Something the bench drives: issues one request of `ops` operations.
pub(crate) trait Load: Send + Sync + 'static {
    type Fut: Future<Output = Done> + Unpin + Send + 'static;
    fn issue(&self, ops: u32) -> Self::Fut;
}

/// How requests arrive.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arrivals {
    /// Each slot issues again as soon as its request finished.
    Closed,
    /// Requests per second, for one driver.
    Open { per_sec: f64 },
}

/// What the drivers of one phase share.
pub(crate) struct PhaseShared {
    total: u64,
    /// Operations per request (`--batch`, else 1).
    per_request: u32,
    next: AtomicU64,
    abort: AtomicBool,
    any_success: AtomicBool,
    early_failures: AtomicU32,
    first_error: OnceLock<String>,
    /// Operations finished so far, for the progress bar.
    pub(crate) finished: AtomicU64,
}

impl PhaseShared {
    pub(crate) fn new(total: u64, per_request: u32) -> Self {
        PhaseShared {
            total,
            per_request: per_request.max(1),
            next: AtomicU64::new(0),
            abort: AtomicBool::new(false),
            any_success: AtomicBool::new(false),
            early_failures: AtomicU32::new(0),
            first_error: OnceLock::new(),
            finished: AtomicU64::new(0),
        }
    }

    /// Whether the phase stopped because its first requests all failed.
    pub(crate) fn aborted(&self) -> bool {
        self.abort.load(Ordering::Acquire)
    }

    pub(crate) fn any_success(&self) -> bool {
        self.any_success.load(Ordering::Acquire)
    }

    pub(crate) fn first_error(&self) -> Option<&String> {
        self.first_error.get()
    }

    /// The operation count of this driver's next request, 0 when there is none left.
    /// `room` is how many requests the driver could issue right now: it claims no more
    /// than that from the shared counter, so that no driver sits on operations that
    /// another one, with free slots, could start (think 10,000 two-second sleeps split
    /// between two drivers).
    fn claim(&self, left: &mut u64, room: u64) -> u32 {
        if self.abort.load(Ordering::Relaxed) {
            return 0;
        }
        let want = u64::from(self.per_request);
        if *left == 0 {
            let chunk = CLAIM_CHUNK.div_ceil(want).min(room.max(1)) * want;
            let start = self.next.fetch_add(chunk, Ordering::Relaxed);
            if start >= self.total {
                return 0;
            }
            *left = chunk.min(self.total - start);
        }
        let n = (*left).min(want);
        *left -= n;
        n as u32
    }

    fn note(&self, done: &mut Done) {
        if done.failed == 0 {
            if done.ok > 0 && !self.any_success.load(Ordering::Relaxed) {
                self.any_success.store(true, Ordering::Release);
            }
            return;
        }
        if let Some(e) = done.error.take() {
            let _ = self.first_error.set(e);
        }
        if done.ok > 0 {
            self.any_success.store(true, Ordering::Release);
        } else if !self.any_success.load(Ordering::Acquire)
            && self.early_failures.fetch_add(1, Ordering::AcqRel) + 1 >= EARLY_FAILURES
        {
            self.abort.store(true, Ordering::Release);
        }
    }
}

/// What one driver measured.
pub(crate) struct DriverOut {
    pub hist: Histogram<u64>,
    pub ops: u64,
    pub errors: u64,
    pub requests: u64,
    /// Requests that were due (open loop) but had to wait for a free slot.
    pub delayed_requests: u64,
}

struct Schedule {
    per_sec: f64,
    start: Instant,
    tick: Interval,
    /// Requests issued so far.
    issued: u64,
    /// Requests already counted as delayed are those before this index.
    delayed_upto: u64,
}

/// One driver task: keeps up to `slots` requests of `load` in flight until the phase's
/// operations are all claimed and finished.
pub(crate) async fn drive<L: Load>(
    load: Arc<L>,
    shared: Arc<PhaseShared>,
    slots: usize,
    arrivals: Arrivals,
) -> DriverOut {
    let mut inflight: InFlight<L::Fut> = InFlight::new(slots);
    let mut issued_at = vec![Instant::now(); slots];
    let mut out = DriverOut {
        hist: new_histogram(),
        ops: 0,
        errors: 0,
        requests: 0,
        delayed_requests: 0,
    };
    let mut left = 0u64;
    let mut exhausted = false;
    let mut schedule = match arrivals {
        Arrivals::Closed => None,
        Arrivals::Open { per_sec } => {
            let mut tick = tokio::time::interval(Duration::from_millis(1));
            tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
            Some(Schedule {
                per_sec,
                start: Instant::now(),
                tick,
                issued: 0,
                delayed_upto: 0,
            })
        }
    };

    std::future::poll_fn(|cx: &mut Context<'_>| {
        // Requests this driver may issue now.
        let mut due = match schedule.as_mut() {
            None => u64::MAX,
            Some(s) => {
                if !exhausted {
                    while s.tick.poll_tick(cx).is_ready() {}
                }
                let by_now = (s.start.elapsed().as_secs_f64() * s.per_sec) as u64 + 1;
                by_now.saturating_sub(s.issued)
            }
        };
        let mut finished = 0u64;
        let mut issue =
            |left: &mut u64, exhausted: &mut bool, due: &mut u64, room: usize| -> Option<L::Fut> {
                if *exhausted || *due == 0 {
                    return None;
                }
                let n = shared.claim(left, (*due).min(room as u64));
                if n == 0 {
                    *exhausted = true;
                    return None;
                }
                *due -= 1;
                if let Some(s) = schedule.as_mut() {
                    s.issued += 1;
                }
                Some(load.issue(n))
            };
        loop {
            let whole = inflight.poll_ready(cx, |idx, mut done| {
                let now = Instant::now();
                let us = now.saturating_duration_since(issued_at[idx]).as_micros() as u64;
                let n = u64::from(done.ok + done.failed);
                out.hist.saturating_record_n(us.max(1), n.max(1));
                out.ops += n;
                out.errors += u64::from(done.failed);
                out.requests += 1;
                finished += n;
                shared.note(&mut done);
                let next = issue(&mut left, &mut exhausted, &mut due, usize::MAX);
                if next.is_some() {
                    issued_at[idx] = now;
                }
                next
            });
            if !whole {
                // Out of budget: the task is woken to go on later.
                break;
            }
            let mut put = false;
            while due > 0 && !exhausted {
                let room = inflight.free_len();
                let Some(idx) = inflight.take_free() else {
                    break;
                };
                match issue(&mut left, &mut exhausted, &mut due, room) {
                    Some(fut) => {
                        issued_at[idx] = Instant::now();
                        inflight.put(idx, fut);
                        put = true;
                    }
                    None => inflight.put_back_free(idx),
                }
            }
            if !put {
                break;
            }
        }
        if let Some(s) = schedule.as_mut() {
            if due > 0 && !exhausted && inflight.free_len() == 0 {
                // Due, but every slot is busy: the in-flight cap holds them back.
                let due_upto = s.issued + due;
                out.delayed_requests += due_upto - s.delayed_upto.max(s.issued);
                s.delayed_upto = due_upto;
            }
        }
        if finished > 0 {
            shared.finished.fetch_add(finished, Ordering::Relaxed);
        }
        if exhausted && inflight.active() == 0 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    out
}
