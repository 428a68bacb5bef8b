//! Counters and latency histograms the engine records as operations finish.
//!
//! Recording is cheap and lock-light: counters are [striped by thread](crate::counter),
//! and each operation's latency goes into the histogram stripe of the thread that
//! completes it, so two cores rarely share a cache line or a lock. Readers
//! (`/v1/metrics`, the bench) sum and merge the stripes into snapshots.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde::Serialize;

use crate::counter::{add_at, place, stripe, stripes, Counter, Gauge, Padded};
use crate::op::OpStatus;
use crate::supervisor::ChildKind;

/// A latency histogram: 1 µs to 1 hour at 2 significant digits (1 % precision), about
/// 25 KB, so a node with many types and stripes stays small.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("static histogram bounds are valid")
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p95_us: h.value_at_quantile(0.95),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: if h.is_empty() { 0.0 } else { h.mean() },
        }
    }
}

/// A histogram with fixed bucket bounds, as Prometheus exposes them: atomic counts,
/// striped by thread like the latency histograms, merged when read.
pub struct Buckets {
    bounds: &'static [u64],
    stripes: Box<[Padded<BucketStripe>]>,
}

struct BucketStripe {
    /// Per bucket (not cumulative); one more than `bounds` for +Inf.
    counts: Box<[AtomicU64]>,
    sum: AtomicU64,
}

/// A merged view of a [`Buckets`]: cumulative counts per upper bound.
#[derive(Clone, Debug, PartialEq)]
pub struct BucketSnapshot {
    /// `(upper bound, observations <= bound)`, ascending; the total count is `count`.
    pub cumulative: Vec<(u64, u64)>,
    pub count: u64,
    pub sum: u64,
}

/// Stage latency bucket bounds, in nanoseconds: 25 µs to 60 s.
pub const LATENCY_BOUNDS_NS: &[u64] = &[
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
];

/// Batch size bucket bounds.
pub const BATCH_BOUNDS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096];

impl Buckets {
    pub fn new(bounds: &'static [u64]) -> Self {
        Buckets {
            bounds,
            stripes: (0..stripes())
                .map(|_| {
                    Padded(BucketStripe {
                        counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                        sum: AtomicU64::new(0),
                    })
                })
                .collect(),
        }
    }

    pub fn record(&self, value: u64) {
        let i = self.bounds.partition_point(|b| *b < value);
        let p = place();
        let s = &self.stripes[p.index].0;
        add_at(&s.counts[i], p, 1);
        add_at(&s.sum, p, value);
    }

    pub fn snapshot(&self) -> BucketSnapshot {
        let mut per = vec![0u64; self.bounds.len() + 1];
        let mut sum = 0u64;
        for Padded(s) in self.stripes.iter() {
            for (p, c) in per.iter_mut().zip(s.counts.iter()) {
                *p += c.load(Ordering::Relaxed);
            }
            sum = sum.wrapping_add(s.sum.load(Ordering::Relaxed));
        }
        let mut acc = 0;
        let cumulative = self
            .bounds
            .iter()
            .zip(&per)
            .map(|(b, c)| {
                acc += c;
                (*b, acc)
            })
            .collect();
        BucketSnapshot {
            cumulative,
            count: acc + per[self.bounds.len()],
            sum,
        }
    }
}

/// Per-stage latency histograms of one type (nanoseconds): time waiting in the queue,
/// time in the handler, and accepted → finished.
pub struct StageLatency {
    pub queue: Buckets,
    pub execute: Buckets,
    pub total: Buckets,
}

impl Default for StageLatency {
    fn default() -> Self {
        StageLatency {
            queue: Buckets::new(LATENCY_BOUNDS_NS),
            execute: Buckets::new(LATENCY_BOUNDS_NS),
            total: Buckets::new(LATENCY_BOUNDS_NS),
        }
    }
}

/// One thread's stripe of a type's latency histogram, made when its first latency is
/// recorded.
type LatencyStripe = Padded<OnceLock<Mutex<Histogram<u64>>>>;

/// Counters of one operation type.
pub struct TypeMetrics {
    pub succeeded: Counter,
    pub failed: Counter,
    pub expired: Counter,
    pub retries: Counter,
    /// Striped by thread, so executors on different cores rarely share a lock; each
    /// stripe on cache lines of its own (the lock word of one thread's stripe next to
    /// another's made every record bounce a line between cores: a tenth of completing an
    /// operation with two shard threads).
    latency: Box<[LatencyStripe]>,
    pub stages: StageLatency,
}

impl Default for TypeMetrics {
    fn default() -> Self {
        TypeMetrics {
            succeeded: Counter::default(),
            failed: Counter::default(),
            expired: Counter::default(),
            retries: Counter::default(),
            latency: (0..stripes()).map(|_| Padded(OnceLock::new())).collect(),
            stages: StageLatency::default(),
        }
    }
}

/// A point-in-time view of one type's counters and limits.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TypeStats {
    pub succeeded: u64,
    pub failed: u64,
    pub expired: u64,
    pub retries: u64,
    pub queued: usize,
    pub latency: Latency,
    /// Operations of the type running now.
    pub running: usize,
    /// The most that may run at once: its own slots, or its share of the shared ones.
    pub max_concurrent: usize,
    /// Whether those slots are its own (`types.<type>.max_concurrent`).
    pub own_slots: bool,
    /// Operations allowed to wait.
    pub queue_capacity: usize,
    /// Its circuit breaker's state, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker: Option<crate::breaker::BreakerState>,
}

impl TypeStats {
    /// The figures of `entry`'s type at `now`.
    pub fn of(entry: &crate::handler::TypeEntry, now: Instant) -> TypeStats {
        let mut s = entry.metrics.snapshot(entry.queued());
        s.running = entry.running();
        s.max_concurrent = entry.max_concurrent();
        s.own_slots = entry.has_own_slots();
        s.queue_capacity = entry.queue_capacity();
        s.breaker = entry.breaker().map(|b| b.state(now));
        s
    }
}

impl TypeMetrics {
    pub(crate) fn count(&self, status: OpStatus) {
        let c = match status {
            OpStatus::Succeeded => &self.succeeded,
            OpStatus::Failed => &self.failed,
            OpStatus::Expired => &self.expired,
            _ => return,
        };
        c.inc();
    }

    pub(crate) fn record_latency(&self, micros: u64) {
        self.latency[stripe()]
            .get_or_init(|| Mutex::new(new_histogram()))
            .lock()
            .saturating_record(micros.max(1));
    }

    pub fn snapshot(&self, queued: usize) -> TypeStats {
        TypeStats {
            succeeded: self.succeeded.get(),
            failed: self.failed.get(),
            expired: self.expired.get(),
            retries: self.retries.get(),
            queued,
            latency: {
                let mut all = new_histogram();
                self.merge_latency_into(&mut all);
                Latency::of(&all)
            },
            running: 0,
            max_concurrent: 0,
            own_slots: false,
            queue_capacity: 0,
            breaker: None,
        }
    }

    pub(crate) fn merge_latency_into(&self, into: &mut Histogram<u64>) {
        for h in self.latency.iter().filter_map(|s| s.get()) {
            let _ = into.add(&*h.lock());
        }
    }
}

/// Node-wide counters. How many operations run now is the Scheduler's count, not a
/// counter here: see [`RunningSlots`](crate::slots::RunningSlots) and `Node::running`.
pub struct NodeMetrics {
    pub accepted: Counter,
    pub rejected: Counter,
    pub completed: Counter,
    pub succeeded: Counter,
    pub failed: Counter,
    pub expired: Counter,
    /// Operations accepted and not yet completed: see [`in_flight`](Self::in_flight).
    pub(crate) in_flight: Gauge,
    /// Engine actors restarted, all kinds together.
    pub actor_restarts: AtomicU64,
    /// Engine actors restarted, per [`ChildKind::index`].
    restarts_by_kind: [AtomicU64; 4],
    pub batches: AtomicU64,
    /// Operations per batch the Scheduler handed to the Executor.
    pub batch_sizes: Buckets,
    throughput: Mutex<ThroughputWindow>,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        NodeMetrics {
            accepted: Counter::default(),
            rejected: Counter::default(),
            completed: Counter::default(),
            succeeded: Counter::default(),
            failed: Counter::default(),
            expired: Counter::default(),
            in_flight: Gauge::default(),
            actor_restarts: AtomicU64::new(0),
            restarts_by_kind: Default::default(),
            batches: AtomicU64::new(0),
            batch_sizes: Buckets::new(BATCH_BOUNDS),
            throughput: Mutex::new(ThroughputWindow::new(Instant::now())),
        }
    }
}

impl NodeMetrics {
    pub(crate) fn completed(&self, status: OpStatus) {
        self.completed.inc();
        let c = match status {
            OpStatus::Succeeded => &self.succeeded,
            OpStatus::Failed => &self.failed,
            _ => &self.expired,
        };
        c.inc();
    }

    /// Operations accepted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.get(Ordering::Acquire).max(0) as usize
    }

    /// The supervisor restarted an actor of `kind`.
    pub(crate) fn actor_restarted(&self, kind: ChildKind) {
        // Per kind first: whoever sees the total move sees the kind's count too.
        self.restarts_by_kind[kind.index()].fetch_add(1, Ordering::Release);
        self.actor_restarts.fetch_add(1, Ordering::Release);
    }

    /// How many times an actor of `kind` was restarted since the node started.
    pub fn actor_restarts_of(&self, kind: ChildKind) -> u64 {
        self.restarts_by_kind[kind.index()].load(Ordering::Acquire)
    }

    /// Completions per second over the recent window (about the last ten seconds).
    pub fn throughput(&self, now: Instant) -> f64 {
        let total = self.completed.get();
        self.throughput.lock().observe(now, total)
    }
}

/// Completions per second, from samples of the completion counter taken when asked.
/// Keeps the samples of the last `WINDOW`, so the rate follows the recent load.
struct ThroughputWindow {
    samples: std::collections::VecDeque<(Instant, u64)>,
}

const WINDOW: Duration = Duration::from_secs(10);

impl ThroughputWindow {
    fn new(now: Instant) -> Self {
        let mut samples = std::collections::VecDeque::new();
        samples.push_back((now, 0));
        ThroughputWindow { samples }
    }

    fn observe(&mut self, now: Instant, total: u64) -> f64 {
        self.samples.push_back((now, total));
        while self.samples.len() > 2 && now.duration_since(self.samples[1].0) >= WINDOW {
            self.samples.pop_front();
        }
        let (t0, c0) = self.samples[0];
        let secs = now.duration_since(t0).as_secs_f64();
        if secs <= 0.0 {
            0.0
        } else {
            (total.saturating_sub(c0)) as f64 / secs
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_follows_the_recent_window() {
        let t0 = Instant::now();
        let mut w = ThroughputWindow::new(t0);
        assert_eq!(w.observe(t0 + Duration::from_secs(1), 100), 100.0);
        assert_eq!(w.observe(t0 + Duration::from_secs(2), 300), 150.0);
        // Long after, only the recent samples count.
        let r = w.observe(t0 + Duration::from_secs(30), 300);
        assert!(r < 20.0, "{r}");
        let r = w.observe(t0 + Duration::from_secs(31), 1300);
        assert!(r > 0.0);
    }

    #[test]
    fn buckets_count_cumulatively() {
        let b = Buckets::new(&[10, 100]);
        for v in [1, 10, 11, 100, 5_000] {
            b.record(v);
        }
        let s = b.snapshot();
        assert_eq!(s.cumulative, vec![(10, 2), (100, 4)]);
        assert_eq!(s.count, 5);
        assert_eq!(s.sum, 5_122);
    }

    #[test]
    fn latency_percentiles_come_from_recorded_values() {
        let m = TypeMetrics::default();
        let values: Vec<u64> = (1..=1000).collect();
        for v in values {
            m.record_latency(v);
        }
        let s = m.snapshot(0).latency;
        assert_eq!(s.count, 1000);
        // Within the histogram's 1 % precision.
        assert!((495..=505).contains(&s.p50_us), "{s:?}");
        assert!((980..=1000).contains(&s.p99_us), "{s:?}");
        assert!((1000..=1010).contains(&s.max_us), "{s:?}");
    }
}
