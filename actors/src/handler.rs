//! Handlers: the code an operation type runs, and the registry that maps a type to its
//! handler, retry policy and per-type counters.
//!
//! The Executor looks a type up here; the node's submit path looks it up too, to refuse
//! an unknown type or a full queue before the operation is accepted. A type's
//! [`RetryPolicy`] holds the pure retry decision ([`RetryPolicy::decide`]): the Executor
//! only runs, waits and counts.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::backoff::{Backoff, Jitter};
use crate::breaker::TypeBreaker;
use crate::counter::{stripe, stripes, Padded, StripedArc};
use crate::metrics::TypeMetrics;
use crate::op::{Json, OpType, Operation, TypeMap};
use crate::type_limits::TypeLimits;

/// Why a handler did not produce a result.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    pub message: String,
    /// Whether running the operation again may succeed. Only retryable errors are retried.
    pub retryable: bool,
}

impl HandlerError {
    /// An error worth retrying (a timeout, an unavailable dependency).
    pub fn retryable(message: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
            retryable: true,
        }
    }

    /// An error that running again will not fix (bad payload).
    pub fn fatal(message: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
            retryable: false,
        }
    }
}

/// What a handler returns.
pub type HandlerResult = Result<Json, HandlerError>;

/// The boxed future an async handler returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send + 'static>>;

/// Runs operations of one type. Implemented for any
/// `Fn(Operation) -> impl Future<Output = HandlerResult>`.
///
/// A handler must not block its thread: register blocking work with
/// [`HandlerRegistry::register_blocking`] (or the node builder's `blocking_handler`), which
/// runs it on the blocking pool.
pub trait Handler: Send + Sync + 'static {
    fn call(&self, op: Operation) -> HandlerFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(Operation) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn call(&self, op: Operation) -> HandlerFuture {
        Box::pin((self)(op))
    }
}

/// A handler that blocks (CPU-heavy work, blocking I/O); run on the blocking pool.
pub type BlockingFn = dyn Fn(Operation) -> HandlerResult + Send + Sync + 'static;

/// How a type's handler runs.
#[derive(Clone)]
pub enum HandlerKind {
    Async(Arc<dyn Handler>),
    Blocking(Arc<BlockingFn>),
    /// No handler here: the type runs on other nodes of the cluster, and this entry only
    /// bounds and measures the operations this node forwards.
    Remote,
}

/// Exponential backoff with jitter for one operation type.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Total runs, the first included (1 = no retry).
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub multiplier: f64,
    /// Fraction (0..=1) of the backoff that is randomised: the wait is drawn uniformly from
    /// `[backoff * (1 - jitter), backoff]`.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

/// What [`RetryPolicy::decide`] says after a run of an operation failed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RetryDecision {
    /// Run it again after waiting `after` (less than the time left to the deadline).
    Retry { after: Duration },
    /// Stop here: the operation fails.
    GiveUp { reason: GiveUpReason },
}

/// Why [`RetryPolicy::decide`] gave up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GiveUpReason {
    /// The error says that running again will not help.
    NotRetryable,
    /// The policy's `max_attempts` runs were made.
    OutOfAttempts,
    /// The wait before the next run would reach the deadline.
    NoTimeLeft,
}

impl RetryPolicy {
    /// The backoff this policy waits with: from `initial_backoff`, growing by
    /// `multiplier`, up to `max_backoff`, jittered down by up to `jitter`.
    pub fn backoff_shape(&self) -> Backoff {
        Backoff {
            initial: self.initial_backoff,
            max: self.max_backoff,
            multiplier: self.multiplier,
            jitter: Jitter::Down(self.jitter),
        }
    }

    /// The wait before run number `attempt + 1`, after `attempt` failed runs (1-based).
    /// `unit` is a uniform random number in `[0, 1)`, passed in so the decision is pure.
    pub fn backoff(&self, attempt: u32, unit: f64) -> Duration {
        self.backoff_shape().delay(attempt, unit)
    }

    /// Whether another run is allowed after `attempt` failed runs.
    pub fn should_retry(&self, attempt: u32, err: &HandlerError) -> bool {
        err.retryable && attempt < self.max_attempts
    }

    /// Whether to run an operation again after its run number `attempt` (1-based) failed
    /// with an error that is `retryable` or not, with `time_left` before its deadline.
    /// `unit`, a uniform random number in `[0, 1)`, picks the jitter. Pure: the Executor
    /// does the waiting.
    ///
    /// Never retries a non-retryable error, never allows more than `max_attempts` runs,
    /// and never waits until the deadline (a run must have time to start).
    pub fn decide(
        &self,
        attempt: u32,
        retryable: bool,
        time_left: Duration,
        unit: f64,
    ) -> RetryDecision {
        let reason = if !retryable {
            GiveUpReason::NotRetryable
        } else if attempt >= self.max_attempts {
            GiveUpReason::OutOfAttempts
        } else {
            let after = self.backoff(attempt, unit);
            if after < time_left {
                return RetryDecision::Retry { after };
            }
            GiveUpReason::NoTimeLeft
        };
        RetryDecision::GiveUp { reason }
    }
}

/// Everything the engine knows about one local operation type.
pub struct TypeEntry {
    pub name: OpType,
    pub handler: HandlerKind,
    pub retry: RetryPolicy,
    /// Queue slots taken: the type's [`QueueSlot`](crate::slots::QueueSlot)s (operations
    /// accepted and not yet handed to an executor) and the slots leased to threads
    /// (`leased`). One count for the whole node, so the limit is exact; on a line of its
    /// own, so the counting does not slow down readers of the fields above.
    taken: Padded<AtomicUsize>,
    /// Slots taken from `taken` ahead of need, by stripe: a thread admits from its own
    /// stripe's lease and goes to the shared count once per [`LEASE`] operations, not
    /// once per operation (with every core admitting, the shared count's cache line was
    /// a twentieth of the two-core in-process run). A thread that finds the count full
    /// takes a slot another one leased and has not used before it refuses, so a type is
    /// refused only when `capacity` operations really wait.
    leased: Box<[Padded<AtomicUsize>]>,
    pub metrics: TypeMetrics,
    /// Its bulkhead, queue, deadline cap, rate limit and breaker (`[types.<type>]`).
    pub(crate) limits: TypeLimits,
}

impl TypeEntry {
    pub(crate) fn new(name: OpType, handler: HandlerKind, retry: RetryPolicy) -> Self {
        Self::with_limits(name, handler, retry, TypeLimits::unbound())
    }

    pub(crate) fn with_limits(
        name: OpType,
        handler: HandlerKind,
        retry: RetryPolicy,
        limits: TypeLimits,
    ) -> Self {
        TypeEntry {
            name,
            handler,
            retry,
            taken: Padded::default(),
            leased: (0..stripes()).map(|_| Padded::default()).collect(),
            metrics: TypeMetrics::default(),
            limits,
        }
    }

    /// How many operations of this type run now (or are on their way to the Executor).
    pub fn running(&self) -> usize {
        self.limits.slots.count()
    }

    /// The most operations of this type that may run at once: its own slots, or its
    /// share of the shared ones.
    pub fn max_concurrent(&self) -> usize {
        self.limits.slots.max()
    }

    /// Whether its running slots are its own (`types.<type>.max_concurrent`), kept for
    /// it alone, rather than a share of the slots the other types share.
    pub fn has_own_slots(&self) -> bool {
        !self.limits.shares
    }

    /// Operations of this type allowed to wait.
    pub fn queue_capacity(&self) -> usize {
        self.limits.queue_capacity
    }

    /// The type's circuit breaker, if it has one (perhaps shared with other types).
    pub fn breaker(&self) -> Option<&Arc<TypeBreaker>> {
        self.limits.breaker.as_ref()
    }

    /// How many operations of this type wait in the scheduler's queue.
    pub fn queued(&self) -> usize {
        let leased: usize = self
            .leased
            .iter()
            .map(|l| l.0.load(Ordering::Acquire))
            .sum();
        self.taken.0.load(Ordering::Acquire).saturating_sub(leased)
    }

    /// Reserves a queue slot, failing when `capacity` are taken. Only
    /// [`QueueSlot`](crate::slots::QueueSlot) calls this (and the tests below): the slot
    /// gives it back exactly once.
    pub(crate) fn try_reserve(&self, capacity: usize) -> bool {
        let mine = &self.leased[stripe()].0;
        if take_one(mine) {
            return true;
        }
        let taken = &self.taken.0;
        // A lease, while the queue has room for many: one slot for this operation, the
        // rest for this thread's next ones. Taken only if it fits (never added and taken
        // back: another thread would see the queue over-full for that moment and refuse).
        if capacity >= LEASE * 8 {
            let mut now = taken.load(Ordering::Relaxed);
            while now + LEASE <= capacity {
                match taken.compare_exchange_weak(
                    now,
                    now + LEASE,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        mine.fetch_add(LEASE - 1, Ordering::AcqRel);
                        return true;
                    }
                    Err(seen) => now = seen,
                }
            }
        }
        let before = taken.fetch_add(1, Ordering::AcqRel);
        if before < capacity {
            return true;
        }
        taken.fetch_sub(1, Ordering::AcqRel);
        // Full: a slot some thread leased and has not used yet.
        self.leased.iter().any(|l| take_one(&l.0))
    }

    /// Gives back `n` reserved slots; only [`QueueSlot`](crate::slots::QueueSlot) calls it.
    /// They go to the releasing thread's lease (the thread that dispatches a shard's
    /// operations is the one that admits them, with shard threads), and what is over two
    /// leases back to the shared count.
    pub(crate) fn release(&self, n: usize) {
        let mine = &self.leased[stripe()].0;
        let now = mine.fetch_add(n, Ordering::AcqRel) + n;
        if now > 2 * LEASE
            && mine
                .compare_exchange(now, LEASE, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.taken.0.fetch_sub(now - LEASE, Ordering::AcqRel);
        }
    }
}

/// Queue slots a thread takes from its type's shared count at a time.
const LEASE: usize = 32;

/// Takes one slot of a lease, if it holds any.
fn take_one(lease: &AtomicUsize) -> bool {
    let mut n = lease.load(Ordering::Relaxed);
    while n > 0 {
        match lease.compare_exchange_weak(n, n - 1, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(now) => n = now,
        }
    }
    false
}

/// The handlers of a node by type. Built once, before the node starts; read without locks.
#[derive(Clone, Default)]
pub struct HandlerRegistry {
    /// Each entry striped: every operation holds its type's entry (see `QueueSlot`).
    types: TypeMap<StripedArc<TypeEntry>>,
}

impl HandlerRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers an async handler for `op_type` with `retry`. A second registration of
    /// the same type replaces the first.
    pub fn register(&mut self, op_type: &str, handler: impl Handler, retry: RetryPolicy) {
        self.insert(op_type, HandlerKind::Async(Arc::new(handler)), retry);
    }

    /// Registers a blocking handler, run on the blocking thread pool.
    pub fn register_blocking<F>(&mut self, op_type: &str, f: F, retry: RetryPolicy)
    where
        F: Fn(Operation) -> HandlerResult + Send + Sync + 'static,
    {
        self.insert(op_type, HandlerKind::Blocking(Arc::new(f)), retry);
    }

    fn insert(&mut self, op_type: &str, handler: HandlerKind, retry: RetryPolicy) {
        let entry = TypeEntry::new(op_type.into(), handler, retry);
        self.types
            .insert(entry.name.clone(), StripedArc::new(Arc::new(entry)));
    }

    pub fn get(&self, op_type: &str) -> Option<&Arc<TypeEntry>> {
        self.types.get(op_type).map(StripedArc::get)
    }

    /// The entry of `op_type`, to take references from (one per operation).
    pub(crate) fn striped(&self, op_type: &str) -> Option<&StripedArc<TypeEntry>> {
        self.types.get(op_type)
    }

    pub fn types(&self) -> impl Iterator<Item = &Arc<TypeEntry>> {
        self.types.values().map(StripedArc::get)
    }

    pub fn type_names(&self) -> Vec<OpType> {
        let mut v: Vec<OpType> = self.types.keys().cloned().collect();
        v.sort();
        v
    }

    /// Gives every type the limits `limits` resolves for it: done once, by the node as it
    /// starts, before any operation holds an entry.
    pub(crate) fn bind(&mut self, mut limits: impl FnMut(&OpType) -> TypeLimits) {
        for (name, striped) in self.types.iter_mut() {
            let old = striped.get();
            let entry = TypeEntry::with_limits(
                name.clone(),
                old.handler.clone(),
                old.retry.clone(),
                limits(name),
            );
            *striped = StripedArc::new(Arc::new(entry));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn backoff_grows_then_caps() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            multiplier: 2.0,
            jitter: 0.0,
        };
        assert_eq!(p.backoff(1, 0.5), Duration::from_millis(10));
        assert_eq!(p.backoff(2, 0.5), Duration::from_millis(20));
        assert_eq!(p.backoff(3, 0.5), Duration::from_millis(40));
        assert_eq!(p.backoff(4, 0.5), Duration::from_millis(50));
        assert_eq!(p.backoff(30, 0.5), Duration::from_millis(50));
    }

    #[test]
    fn only_retryable_errors_within_attempts_are_retried() {
        let p = RetryPolicy::default();
        assert!(p.should_retry(1, &HandlerError::retryable("x")));
        assert!(!p.should_retry(3, &HandlerError::retryable("x")));
        assert!(!p.should_retry(1, &HandlerError::fatal("x")));
    }

    #[test]
    fn decide_names_why_it_gives_up() {
        let p = RetryPolicy::default();
        let long = Duration::from_secs(60);
        assert_eq!(
            p.decide(1, true, long, 0.0),
            RetryDecision::Retry {
                after: Duration::from_millis(10)
            }
        );
        let give_up = |reason| RetryDecision::GiveUp { reason };
        assert_eq!(
            p.decide(1, false, long, 0.0),
            give_up(GiveUpReason::NotRetryable)
        );
        assert_eq!(
            p.decide(3, true, long, 0.0),
            give_up(GiveUpReason::OutOfAttempts)
        );
        let tight = Duration::from_millis(10);
        assert_eq!(
            p.decide(1, true, tight, 0.0),
            give_up(GiveUpReason::NoTimeLeft)
        );
        assert_eq!(
            p.decide(1, true, Duration::ZERO, 0.0),
            give_up(GiveUpReason::NoTimeLeft)
        );
    }

    proptest! {
        #[test]
        fn decide_keeps_its_promises(
            attempt in 1u32..20,
            max_attempts in 1u32..10,
            retryable in any::<bool>(),
            left_ms in 0u64..3_000,
            unit in 0.0f64..1.0,
            jitter in 0.0f64..=1.0,
            initial_ms in 0u64..500,
            mult in 1.0f64..4.0,
        ) {
            let p = RetryPolicy {
                max_attempts,
                initial_backoff: Duration::from_millis(initial_ms),
                max_backoff: Duration::from_secs(1),
                multiplier: mult,
                jitter,
            };
            let left = Duration::from_millis(left_ms);
            match p.decide(attempt, retryable, left, unit) {
                RetryDecision::Retry { after } => {
                    prop_assert!(retryable, "never retries a non-retryable error");
                    prop_assert!(attempt < max_attempts, "never past max_attempts");
                    prop_assert!(after < left, "never sleeps past the deadline");
                    let nominal = p.backoff(attempt, 0.0);
                    prop_assert!(after <= nominal);
                    prop_assert!(after.as_secs_f64() >= nominal.as_secs_f64() * (1.0 - jitter) - 1e-9);
                }
                RetryDecision::GiveUp { reason } => match reason {
                    GiveUpReason::NotRetryable => prop_assert!(!retryable),
                    GiveUpReason::OutOfAttempts => {
                        prop_assert!(retryable && attempt >= max_attempts)
                    }
                    GiveUpReason::NoTimeLeft => prop_assert!(
                        retryable && attempt < max_attempts && p.backoff(attempt, unit) >= left
                    ),
                },
            }
        }

        #[test]
        fn backoff_stays_within_jitter_bounds(
            attempt in 1u32..40,
            unit in 0.0f64..1.0,
            jitter in 0.0f64..1.0,
            initial_ms in 1u64..1000,
            mult in 1.0f64..4.0,
        ) {
            let p = RetryPolicy {
                max_attempts: 50,
                initial_backoff: Duration::from_millis(initial_ms),
                max_backoff: Duration::from_secs(5),
                multiplier: mult,
                jitter,
            };
            let nominal = p.backoff(attempt, 0.0);
            let got = p.backoff(attempt, unit);
            prop_assert!(got <= nominal);
            prop_assert!(got.as_secs_f64() >= nominal.as_secs_f64() * (1.0 - jitter) - 1e-9);
            prop_assert!(nominal <= p.max_backoff);
            // Never shrinks as attempts grow.
            prop_assert!(p.backoff(attempt + 1, 0.0) >= nominal);
        }

        #[test]
        fn queue_reservations_never_exceed_capacity(cap in 0usize..50, tries in 0usize..100) {
            let mut reg = HandlerRegistry::new();
            reg.register("t", |_op: Operation| async { Ok(Json::null()) }, RetryPolicy::default());
            let e = reg.get("t").unwrap();
            let ok = (0..tries).filter(|_| e.try_reserve(cap)).count();
            prop_assert_eq!(ok, tries.min(cap));
            prop_assert_eq!(e.queued(), tries.min(cap));
        }
    }
}
