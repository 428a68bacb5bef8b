//! The load loop: a few driver tasks, each keeping its share of `--concurrency` requests
//! in flight against a [`Load`] (the embedded node or an HTTP target), recording the
//! latency of every succeeded operation in its own HDR histogram.
//!
//! Closed loop: a slot issues its next request as soon as the previous one finished, and
//! latency is measured from the moment a request is sent.
//!
//! Open loop (`--rate`): request `k` of a driver is due at `k / rate` after the phase
//! started ([`Pace`]): the arrival schedule is computed from the clock, never from how
//! often the driver woke, so a driver that stalled issues everything that fell due
//! meanwhile as soon as it runs again. Each time the driver wakes (a completion, or the
//! [`Pacer`]'s tick every [`PACE_TICK`]: tokio's own timer only has 1 ms, which would
//! charge up to a millisecond of the generator's lag to every operation) it issues every
//! request due by now, as long as a slot is free. Latency is measured from each request's
//! **intended** start (its slot in the schedule), not from when it was sent: a stalled
//! generator, the pacer's tick or a full in-flight cap cannot hide the wait they cause
//! (the coordinated-omission
//! error; wrk2 and HdrHistogram's corrected recording measure the same way). The time
//! from send to answer (service time) is recorded beside it in a second histogram, and
//! how late each request was sent (its send lag: the generator's own delay, or a wait for
//! a free slot) in a third, so that a missed latency target can be told apart between
//! the generator and what it drives.
//! Requests that were due while every slot was busy are counted in `delayed`.
//!
//! Only succeeded operations are recorded in the histograms and counted in `ops`; failed
//! ones count in `errors`, with the first few distinct reasons ([`ErrorSamples`]).
//!
//! Drivers share one op counter, claimed in chunks so that they rarely touch it.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::task::AtomicWaker;
use hdrhistogram::Histogram;
use serde::Serialize;

use super::inflight::InFlight;

/// Ops a driver claims from the shared counter at a time (rounded up to whole requests).
const CLAIM_CHUNK: u64 = 64;

/// A run aborts when this many requests failed before any succeeded.
pub(crate) const EARLY_FAILURES: u32 = 100;

/// Distinct error reasons a run keeps (with their counts); later ones are only counted.
pub(crate) const ERROR_SAMPLES: usize = 5;

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
    /// Of `failed`: operations that succeeded, but on another node than the run requires
    /// (`--remote`).
    pub elsewhere: u32,
}

impl Done {
    pub(crate) fn ok(ops: u32) -> Self {
        Done {
            ok: ops,
            failed: 0,
            error: None,
            elsewhere: 0,
        }
    }

    pub(crate) fn failed(ops: u32, error: String) -> Self {
        Done {
            ok: 0,
            failed: ops,
            error: Some(error),
            elsewhere: 0,
        }
    }
}

/// Something the bench drives: issues one request of `ops` operations.
pub(crate) trait Load: Send + Sync + 'static {
    type Fut: Future<Output = Done> + Unpin + Send + 'static;
    fn issue(&self, ops: u32) -> Self::Fut;
    /// Where the drivers run, in turn: the embedded node's shard threads when it has them
    /// (so that each driver submits from a shard's own thread); empty, the bench's runtime.
    fn runtimes(&self) -> &[tokio::runtime::Handle] {
        &[]
    }
}

/// How requests arrive.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arrivals {
    /// Each slot issues again as soon as its request finished.
    Closed,
    /// Requests per second, for one driver.
    Open { per_sec: f64 },
}

/// An open-loop arrival schedule: request `k` (from 0) is due `k / per_sec` seconds after
/// the start. Pure, so that what is due never depends on when the driver happened to run.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pace {
    per_sec: f64,
}

impl Pace {
    pub(crate) fn new(per_sec: f64) -> Self {
        Pace { per_sec }
    }

    /// How many requests are due `elapsed` after the start: the first is due at once.
    pub(crate) fn due_by(&self, elapsed: Duration) -> u64 {
        (elapsed.as_secs_f64() * self.per_sec) as u64 + 1
    }

    /// When request `k` is due, from the start.
    pub(crate) fn intended(&self, k: u64) -> Duration {
        Duration::from_secs_f64(k as f64 / self.per_sec)
    }
}

/// How often the [`Pacer`] wakes the open-loop drivers. The kernel's timer slack (50 µs
/// by default) comes on top.
pub(crate) const PACE_TICK: Duration = Duration::from_micros(50);

/// The open-loop drivers' clock: a thread that wakes every driver each [`PACE_TICK`], so
/// that a driver with nothing finishing still issues its requests within about that of
/// their due time. A thread, not a tokio timer: tokio's timer wheel ticks in whole
/// milliseconds. Stops when dropped.
pub(crate) struct Pacer {
    shared: Arc<PacerShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct PacerShared {
    stop: AtomicBool,
    drivers: Box<[AtomicWaker]>,
}

/// One driver's registration with the [`Pacer`].
pub(crate) struct PaceSlot {
    shared: Arc<PacerShared>,
    index: usize,
}

impl PaceSlot {
    fn register(&self, cx: &Context<'_>) {
        self.shared.drivers[self.index].register(cx.waker());
    }
}

impl Pacer {
    /// Starts the pacer's thread for `drivers` drivers.
    pub(crate) fn start(drivers: usize) -> std::io::Result<Pacer> {
        let shared = Arc::new(PacerShared {
            stop: AtomicBool::new(false),
            drivers: (0..drivers).map(|_| AtomicWaker::new()).collect(),
        });
        let thread = std::thread::Builder::new()
            .name("bench-pacer".into())
            .spawn({
                let shared = shared.clone();
                move || {
                    while !shared.stop.load(Ordering::Acquire) {
                        std::thread::sleep(PACE_TICK);
                        for w in shared.drivers.iter() {
                            w.wake();
                        }
                    }
                }
            })?;
        Ok(Pacer {
            shared,
            thread: Some(thread),
        })
    }

    /// Driver `index`'s registration.
    pub(crate) fn slot(&self, index: usize) -> PaceSlot {
        PaceSlot {
            shared: self.shared.clone(),
            index,
        }
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The first few distinct reasons operations failed for, each with how many operations
/// failed for it; failures for any later reason are only counted in `others`. A request
/// whose operations failed for several reasons (a batch) counts them all under its first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ErrorSamples {
    pub samples: Vec<ErrorSample>,
    pub others: u64,
}

/// One error reason and how many operations failed for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ErrorSample {
    pub reason: String,
    pub count: u64,
}

impl ErrorSamples {
    /// Counts `n` operations failed for `reason`.
    pub(crate) fn add(&mut self, reason: &str, n: u64) {
        if let Some(s) = self.samples.iter_mut().find(|s| s.reason == reason) {
            s.count += n;
        } else if self.samples.len() < ERROR_SAMPLES {
            self.samples.push(ErrorSample {
                reason: reason.to_owned(),
                count: n,
            });
        } else {
            self.others += n;
        }
    }

    /// Adds another driver's samples (its reasons after this one's).
    pub(crate) fn merge(&mut self, other: ErrorSamples) {
        for s in other.samples {
            self.add(&s.reason, s.count);
        }
        self.others += other.others;
    }
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
    /// Operations finished so far (succeeded or not), for the progress bar.
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

    fn note(&self, done: &Done) {
        if done.failed == 0 {
            if done.ok > 0 && !self.any_success.load(Ordering::Relaxed) {
                self.any_success.store(true, Ordering::Release);
            }
            return;
        }
        if self.first_error.get().is_none() {
            let _ = self.first_error.set(reason(done).to_owned());
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

/// The reason a request's failures are counted under.
fn reason(done: &Done) -> &str {
    done.error.as_deref().unwrap_or("failed (no reason given)")
}

/// What one driver measured.
pub(crate) struct DriverOut {
    /// Latency of succeeded operations: from the intended start in an open loop, from
    /// the send in a closed one.
    pub hist: Histogram<u64>,
    /// Open loop: latency of succeeded operations from the send (service time).
    pub service: Option<Histogram<u64>>,
    /// Open loop: how late succeeded operations were sent, after their intended start.
    pub lag: Option<Histogram<u64>>,
    /// Succeeded operations.
    pub ops: u64,
    /// Failed operations.
    pub errors: u64,
    pub error_samples: ErrorSamples,
    /// Of `errors`: operations that ran on another node than the run requires.
    pub elsewhere: u64,
    pub requests: u64,
    /// Requests that were due (open loop) but had to wait for a free slot.
    pub delayed_requests: u64,
}

struct Schedule {
    pace: Pace,
    start: Instant,
    tick: PaceSlot,
    /// Requests issued so far.
    issued: u64,
    /// Requests already counted as delayed are those before this index.
    delayed_upto: u64,
}

/// When a slot's request was sent, and when it was due (the same in a closed loop).
#[derive(Clone, Copy)]
struct Sent {
    at: Instant,
    due: Instant,
}

/// One driver task: keeps up to `slots` requests of `load` in flight until the phase's
/// operations are all claimed and finished. Closed loop when `open` is `None`; else open
/// loop on this driver's schedule, woken by its registration with the phase's [`Pacer`].
pub(crate) async fn drive<L: Load>(
    load: Arc<L>,
    shared: Arc<PhaseShared>,
    slots: usize,
    open: Option<(Pace, PaceSlot)>,
) -> DriverOut {
    let mut inflight: InFlight<L::Fut> = InFlight::new(slots);
    let now = Instant::now();
    let mut sent = vec![Sent { at: now, due: now }; slots];
    let mut out = DriverOut {
        hist: new_histogram(),
        service: open.is_some().then(new_histogram),
        lag: open.is_some().then(new_histogram),
        ops: 0,
        errors: 0,
        error_samples: ErrorSamples::default(),
        elsewhere: 0,
        requests: 0,
        delayed_requests: 0,
    };
    let mut left = 0u64;
    let mut exhausted = false;
    let mut schedule = open.map(|(pace, tick)| Schedule {
        pace,
        start: Instant::now(),
        tick,
        issued: 0,
        delayed_upto: 0,
    });

    std::future::poll_fn(|cx: &mut Context<'_>| {
        // Requests this driver may issue now: all that the schedule says are due by now,
        // however long it has been since the driver last ran.
        let mut due = match schedule.as_mut() {
            None => u64::MAX,
            Some(s) => {
                if !exhausted {
                    s.tick.register(cx);
                }
                s.pace.due_by(s.start.elapsed()).saturating_sub(s.issued)
            }
        };
        let mut finished = 0u64;
        // The next request, and when it was due: its slot in the schedule (open loop) or
        // `now` (closed loop).
        let mut issue = |left: &mut u64,
                         exhausted: &mut bool,
                         due: &mut u64,
                         room: usize,
                         now: Instant|
         -> Option<(L::Fut, Instant)> {
            if *exhausted || *due == 0 {
                return None;
            }
            let n = shared.claim(left, (*due).min(room as u64));
            if n == 0 {
                *exhausted = true;
                return None;
            }
            *due -= 1;
            let due_at = match schedule.as_mut() {
                Some(s) => {
                    let at = s.start + s.pace.intended(s.issued);
                    s.issued += 1;
                    at
                }
                None => now,
            };
            Some((load.issue(n), due_at))
        };
        loop {
            let whole = inflight.poll_ready(cx, |idx, done| {
                let now = Instant::now();
                let from_sent = now.saturating_duration_since(sent[idx].at).as_micros() as u64;
                let from_due = now.saturating_duration_since(sent[idx].due).as_micros() as u64;
                if done.ok > 0 {
                    let ok = u64::from(done.ok);
                    out.hist.saturating_record_n(from_due.max(1), ok);
                    if let Some(service) = out.service.as_mut() {
                        service.saturating_record_n(from_sent.max(1), ok);
                    }
                    if let Some(lag) = out.lag.as_mut() {
                        let late = sent[idx].at.saturating_duration_since(sent[idx].due);
                        lag.saturating_record_n((late.as_micros() as u64).max(1), ok);
                    }
                    out.ops += ok;
                }
                if done.failed > 0 {
                    let failed = u64::from(done.failed);
                    out.errors += failed;
                    out.elsewhere += u64::from(done.elsewhere);
                    out.error_samples.add(reason(&done), failed);
                }
                out.requests += 1;
                finished += u64::from(done.ok + done.failed);
                shared.note(&done);
                let (next, due_at) = issue(&mut left, &mut exhausted, &mut due, usize::MAX, now)?;
                sent[idx] = Sent {
                    at: now,
                    due: due_at,
                };
                Some(next)
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
                let now = Instant::now();
                match issue(&mut left, &mut exhausted, &mut due, room, now) {
                    Some((fut, due_at)) => {
                        sent[idx] = Sent {
                            at: now,
                            due: due_at,
                        };
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
