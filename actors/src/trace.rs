//! The spans an operation leaves on this node.
//!
//! The engine does not build OpenTelemetry spans on its hot path. While an operation
//! moves through the actors its [`Reply`](crate::job::Reply) collects timestamps (one
//! clock read per Router drain, per Cache or Scheduler message, two per execution); when
//! the operation finishes, those become one [`OpSpans`] record (`op.submit`, `op.route`,
//! `op.cache`, `op.queue`, `op.execute`), handed to the [`SpanSink`] the embedder
//! installed (the binary's OTLP pipeline). Sampling is parent-based: an operation that
//! arrives with a trace context follows its `sampled` flag, others are sampled by a
//! ratio of their trace id; a failed or expired operation is handed over even when
//! sampled out, so errors are always kept.
//!
//! Across nodes: the operation forwarded to its owner carries the context of the
//! origin's `op.route` span, so the owner's `op.cache`/`op.queue`/`op.execute` are its
//! children and the whole operation is one trace.
//!
//! While a handler runs, [`current`] tells which operation's execution is running on
//! this thread (log lines use it to carry trace and span ids; an HTTP handler passes it
//! on as `traceparent`).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use crate::op::{OpId, OpStatus, TraceContext};

/// A point in time, as nanoseconds since the process's clock anchor: 8 bytes, one
/// monotonic clock read, and convertible to wall-clock time for export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp(u64);

fn anchor() -> &'static (Instant, SystemTime) {
    static ANCHOR: OnceLock<(Instant, SystemTime)> = OnceLock::new();
    ANCHOR.get_or_init(|| (Instant::now(), SystemTime::now()))
}

impl Stamp {
    /// "Not recorded."
    pub const NONE: Stamp = Stamp(0);

    pub fn now() -> Stamp {
        Stamp::from_instant(Instant::now())
    }

    pub fn from_instant(t: Instant) -> Stamp {
        let nanos = t.saturating_duration_since(anchor().0).as_nanos() as u64;
        Stamp(nanos.max(1))
    }

    pub fn is_set(self) -> bool {
        self.0 != 0
    }

    /// The wall-clock time of this stamp.
    pub fn to_system(self) -> SystemTime {
        anchor().1 + Duration::from_nanos(self.0)
    }

    /// The wall-clock time of this stamp as nanoseconds since the Unix epoch (what
    /// OTLP carries).
    pub fn unix_nanos(self) -> u64 {
        static ANCHOR_NANOS: OnceLock<u64> = OnceLock::new();
        let anchor = ANCHOR_NANOS.get_or_init(|| {
            anchor()
                .1
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        anchor + self.0
    }

    /// Time from `earlier` to `self` (zero if `earlier` is later or unset).
    pub fn since(self, earlier: Stamp) -> Duration {
        if earlier.is_set() {
            Duration::from_nanos(self.0.saturating_sub(earlier.0))
        } else {
            Duration::ZERO
        }
    }
}

/// Parent-based ratio sampling, decided once per trace from its id (as OpenTelemetry's
/// `TraceIdRatioBased` does, so every node and SDK agrees on a trace).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampler {
    ratio: f64,
    threshold: u64,
}

impl Sampler {
    /// Samples `ratio` of new traces (clamped to 0..=1).
    pub fn ratio(ratio: f64) -> Self {
        let ratio = if ratio.is_nan() {
            0.0
        } else {
            ratio.clamp(0.0, 1.0)
        };
        Sampler {
            ratio,
            threshold: (ratio * (1u64 << 63) as f64) as u64,
        }
    }

    /// Whether a new trace with this id is sampled.
    pub fn samples(&self, trace_id: u128) -> bool {
        if self.ratio >= 1.0 {
            return true;
        }
        // The low 8 bytes of the id, as OpenTelemetry's SDK reads them.
        let low = (trace_id as u64) >> 1;
        low < self.threshold
    }
}

/// One stage of an operation's path, and the span it leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Accepted → finished, on the node that took the submission.
    Submit,
    /// The Router's pick; for a remote owner, until its reply came back.
    Route,
    /// The result cache's verdict (operations with an idempotency key).
    Cache,
    /// Waiting in the Scheduler until the Executor started it.
    Queue,
    /// The handler, retries included (each retry is an event).
    Execute,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Submit,
        Stage::Route,
        Stage::Cache,
        Stage::Queue,
        Stage::Execute,
    ];

    /// The span name.
    pub fn span_name(self) -> &'static str {
        match self {
            Stage::Submit => "op.submit",
            Stage::Route => "op.route",
            Stage::Cache => "op.cache",
            Stage::Queue => "op.queue",
            Stage::Execute => "op.execute",
        }
    }
}

/// The span id of `stage` for an operation whose spans derive from `base`: distinct,
/// non-zero, and known to every part of the node without being stored.
pub fn span_id(base: u64, stage: Stage) -> u64 {
    let mut z = base.wrapping_add((stage as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)).max(1)
}

/// What the result cache did with an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheVerdict {
    /// Answered from a stored result.
    Hit,
    /// Joined a run of the same key already in flight.
    Joined,
    /// Not stored: it runs.
    Miss,
    /// The key was used with another payload: refused.
    Reused,
}

impl CacheVerdict {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheVerdict::Hit => "hit",
            CacheVerdict::Joined => "joined",
            CacheVerdict::Miss => "miss",
            CacheVerdict::Reused => "reused",
        }
    }
}

/// A moment inside a span (a retry).
#[derive(Clone, Debug)]
pub struct SpanEvent {
    pub at: Stamp,
    pub name: &'static str,
    pub attempt: u32,
    pub message: String,
}

/// One finished span.
#[derive(Clone, Copy, Debug)]
pub struct SpanRecord {
    pub stage: Stage,
    pub span_id: u64,
    pub parent_span_id: u64,
    /// Whether the parent lives in another process (the caller, or the origin node).
    pub parent_is_remote: bool,
    pub start: Stamp,
    pub end: Stamp,
}

impl SpanRecord {
    /// A placeholder, for fixed-size lists of spans.
    pub const EMPTY: SpanRecord = SpanRecord {
        stage: Stage::Submit,
        span_id: 0,
        parent_span_id: 0,
        parent_is_remote: false,
        start: Stamp::NONE,
        end: Stamp::NONE,
    };
}

/// The spans one operation left on this node, lent to the [`SpanSink`] when it
/// finished. Everything is borrowed from the operation's own record: handing spans over
/// allocates nothing and touches no shared reference count.
#[derive(Clone, Copy, Debug)]
pub struct OpSpans<'a> {
    pub trace_id: u128,
    /// Sampled by the trace's decision (false: kept only because it failed).
    pub sampled: bool,
    pub op_id: OpId,
    pub op_type: &'a str,
    /// This node.
    pub node: &'a str,
    /// The node the Router picked, when it is another one.
    pub target: Option<&'a str>,
    pub status: OpStatus,
    pub error: Option<&'a str>,
    pub cache: Option<CacheVerdict>,
    pub attempts: u32,
    /// At most one per [`Stage`].
    pub spans: &'a [SpanRecord],
    /// Retries, on the `op.execute` span.
    pub events: &'a [SpanEvent],
}

/// Receives finished operations' spans. Called on the thread that completed the
/// operation, with the spans lent for the call: it must not block (encode or copy what
/// it keeps, and return).
pub trait SpanSink: Send + Sync + 'static {
    fn record(&self, spans: &OpSpans<'_>);
}

/// Tracing settings of a node: which operations are sampled, and where their spans go.
#[derive(Clone)]
pub struct Tracing {
    pub sampler: Sampler,
    pub sink: Arc<dyn SpanSink>,
}

/// The trace of one accepted operation on this node, kept in its `Reply`.
#[derive(Clone, Debug)]
pub struct OpTrace {
    pub trace_id: u128,
    /// The span this node's first span hangs under (0: a new trace).
    pub parent: u64,
    /// Span ids derive from this (see [`span_id`]).
    pub base: u64,
    pub sampled: bool,
    /// This node took the submission: it records `op.submit` and `op.route`.
    pub origin: bool,
}

impl OpTrace {
    /// The trace of an operation accepted here, continuing `parent` if it has one.
    pub fn begin(parent: Option<TraceContext>, sampler: Option<&Sampler>, origin: bool) -> Self {
        let base = ids::next_u64();
        match parent {
            Some(p) => OpTrace {
                trace_id: p.trace_id,
                parent: p.span_id,
                base,
                sampled: p.flags & 1 == 1,
                origin,
            },
            None => {
                let trace_id = ids::next_u128().max(1);
                OpTrace {
                    trace_id,
                    parent: 0,
                    base,
                    sampled: sampler.is_none_or(|s| s.samples(trace_id)),
                    origin,
                }
            }
        }
    }

    pub fn flags(&self) -> u8 {
        u8::from(self.sampled)
    }

    /// The context of `stage`'s span: what a child (or the caller) links to.
    pub fn context(&self, stage: Stage) -> TraceContext {
        TraceContext {
            trace_id: self.trace_id,
            span_id: span_id(self.base, stage),
            flags: self.flags(),
        }
    }

    /// The span the owner-side stages (cache, queue, execute) hang under: `op.submit`
    /// on the origin, the origin's `op.route` (the parent) on an owner.
    fn stage_parent(&self) -> (u64, bool) {
        if self.origin {
            (span_id(self.base, Stage::Submit), false)
        } else {
            (self.parent, true)
        }
    }

    /// A span of `stage` in this trace, parented as the stages are.
    pub fn span(&self, stage: Stage, start: Stamp, end: Stamp) -> SpanRecord {
        let (parent_span_id, parent_is_remote) = match stage {
            Stage::Submit => (self.parent, self.parent != 0),
            Stage::Route => (span_id(self.base, Stage::Submit), false),
            _ => self.stage_parent(),
        };
        SpanRecord {
            stage,
            span_id: span_id(self.base, stage),
            parent_span_id,
            parent_is_remote,
            start,
            end: end.max(start),
        }
    }
}

/// Trace and span ids: random, as W3C Trace Context asks, drawn from a small fast
/// generator per thread (xoshiro, seeded from the OS through `rand`'s thread generator).
/// They need to be unique and unguessable enough not to collide, not secret: ChaCha,
/// `rand`'s default, cost a tenth of a traced operation's remaining overhead at 1 %
/// sampling.
mod ids {
    use std::cell::RefCell;

    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    thread_local! {
        static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
    }

    pub(super) fn next_u64() -> u64 {
        RNG.with(|r| r.borrow_mut().random())
    }

    pub(super) fn next_u128() -> u128 {
        RNG.with(|r| r.borrow_mut().random())
    }
}

thread_local! {
    static CURRENT: Cell<Option<TraceContext>> = const { Cell::new(None) };
}

/// The trace context of the operation whose handler runs on this thread now (its
/// `op.execute` span), if any.
pub fn current() -> Option<TraceContext> {
    CURRENT.with(|c| c.get())
}

/// Runs `f` with `ctx` as the [`current`] operation.
pub fn in_context<R>(ctx: Option<TraceContext>, f: impl FnOnce() -> R) -> R {
    let prev = CURRENT.with(|c| c.replace(ctx));
    let r = f();
    CURRENT.with(|c| c.set(prev));
    r
}

/// A future that is the [`current`] operation whenever it is polled.
pub struct InContext<F> {
    ctx: Option<TraceContext>,
    inner: F,
}

impl<F: Future + Unpin> InContext<F> {
    pub fn new(ctx: Option<TraceContext>, inner: F) -> Self {
        InContext { ctx, inner }
    }
}

impl<F: Future + Unpin> Future for InContext<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let ctx = self.ctx;
        let inner = Pin::new(&mut self.inner);
        in_context(ctx, || inner.poll(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_do_not_repeat_within_or_across_threads() {
        let draw = || (0..10_000).map(|_| ids::next_u128()).collect::<Vec<_>>();
        let mut all = draw();
        all.extend(std::thread::spawn(draw).join().unwrap());
        all.extend(std::thread::spawn(draw).join().unwrap());
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "every thread's generator is seeded apart");
        // Every bit is used (not a counter in disguise).
        let or = all.iter().fold(0u128, |a, b| a | b);
        let and = all.iter().fold(u128::MAX, |a, b| a & b);
        assert_eq!((or, and), (u128::MAX, 0));
        assert_ne!(ids::next_u64(), ids::next_u64());
    }

    #[test]
    fn span_ids_are_distinct_and_stable() {
        for base in [0u64, 1, 42, u64::MAX] {
            let ids: Vec<u64> = Stage::ALL.iter().map(|s| span_id(base, *s)).collect();
            let mut sorted = ids.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), ids.len(), "{ids:?}");
            assert!(ids.iter().all(|i| *i != 0));
            assert_eq!(span_id(base, Stage::Route), ids[1]);
        }
    }

    #[test]
    fn ratio_sampling_follows_the_ratio_and_the_extremes() {
        let ids: Vec<u128> = (0..20_000).map(|_| rand::random::<u128>()).collect();
        let count = |s: Sampler| ids.iter().filter(|i| s.samples(**i)).count();
        assert_eq!(count(Sampler::ratio(1.0)), ids.len());
        assert_eq!(count(Sampler::ratio(0.0)), 0);
        let tenth = count(Sampler::ratio(0.1));
        assert!((1_600..2_400).contains(&tenth), "{tenth}");
        // The decision is a function of the id.
        let s = Sampler::ratio(0.5);
        assert!(ids.iter().all(|i| s.samples(*i) == s.samples(*i)));
    }

    #[test]
    fn parent_decides_sampling_and_parentage() {
        let parent = TraceContext {
            trace_id: 7,
            span_id: 9,
            flags: 0,
        };
        let t = OpTrace::begin(Some(parent), Some(&Sampler::ratio(1.0)), true);
        assert_eq!(t.trace_id, 7);
        assert!(!t.sampled, "the parent's flag wins over the ratio");
        let submit = t.span(Stage::Submit, Stamp(5), Stamp(9));
        assert_eq!((submit.parent_span_id, submit.parent_is_remote), (9, true));
        let route = t.span(Stage::Route, Stamp(6), Stamp(7));
        assert_eq!(route.parent_span_id, submit.span_id);
        let exec = t.span(Stage::Execute, Stamp(7), Stamp(8));
        assert_eq!(exec.parent_span_id, submit.span_id);

        // On the owner, the stages hang under the origin's route span.
        let fwd = t.context(Stage::Route);
        let owner = OpTrace::begin(Some(fwd), None, false);
        let q = owner.span(Stage::Queue, Stamp(1), Stamp(2));
        assert_eq!(
            (q.parent_span_id, q.parent_is_remote),
            (route.span_id, true)
        );
        assert_eq!(owner.trace_id, 7);

        let root = OpTrace::begin(None, Some(&Sampler::ratio(0.0)), true);
        assert!(!root.sampled);
        assert_eq!(
            root.span(Stage::Submit, Stamp(1), Stamp(2)).parent_span_id,
            0
        );
    }

    #[test]
    fn current_context_follows_the_polled_future() {
        let ctx = TraceContext {
            trace_id: 1,
            span_id: 2,
            flags: 1,
        };
        let seen =
            futures::executor::block_on(InContext::new(Some(ctx), Box::pin(async { current() })));
        assert_eq!(seen, Some(ctx));
        assert_eq!(current(), None);
    }
}
