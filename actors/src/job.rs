//! An accepted operation on its way through the actors ([`Job`]), the handle that
//! completes it exactly once ([`Reply`]), the caller's side of that ([`Ticket`]), and the
//! bounded record of recent operations that `GET /v1/ops/{id}` reads ([`OpStore`]).
//!
//! The guarantee that no accepted operation is silently dropped lives here: a `Reply`
//! that is dropped without having been completed (its actor crashed, the node shut
//! down) completes the operation as failed, with the reason, on its way out.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::cache::CacheKey;
use crate::counter::Anchor;
use crate::events::{now_ms, Event, EventKind};
use crate::handler::TypeEntry;
use crate::op::{Json, NodeId, OpId, OpOutcome, OpStatus, Operation, TraceContext, TraceId};
use crate::shared::NodeShared;
use crate::slots::QueueSlot;
use crate::trace::{CacheVerdict, OpSpans, OpTrace, SpanEvent, SpanRecord, Stage, Stamp};

/// An accepted operation travelling Router → (Cache) → Scheduler → Executor.
pub struct Job {
    pub op: Operation,
    /// The effective deadline (the operation's own or the node default).
    pub deadline: Instant,
    pub reply: Reply,
    /// The [shard](crate::shard) that owns it on this node, picked at the door.
    pub(crate) shard: usize,
}

impl Job {
    /// The [shard](crate::shard) that owns it on this node: every operation with one key
    /// has the same (a cluster link keeps them on one lane, so their order holds).
    pub fn shard(&self) -> usize {
        self.shard
    }
}

/// When an operation reached each stage on this node (unset: it did not). One clock
/// read per actor message stamps a whole batch.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stamps {
    pub routed: Stamp,
    pub routed_end: Stamp,
    pub cache_in: Stamp,
    pub cache_out: Stamp,
    pub queued: Stamp,
    pub started: Stamp,
}

/// Takes the outcomes of operations whose caller does not wait on a [`Ticket`]: the
/// cluster layer, which sends the outcomes of operations another node forwarded here
/// back in batches. `deliver` is called once per operation, on the thread that
/// completes it (an executor's, or whichever drops it): it must not block.
pub trait OutcomeSink: Send + Sync {
    fn deliver(&self, outcome: OpOutcome);

    /// Takes the outcomes of several operations that completed together (see
    /// [`Handoff`]), in the order they completed.
    fn deliver_all(&self, outcomes: Vec<OpOutcome>) {
        for outcome in outcomes {
            self.deliver(outcome);
        }
    }
}

/// Who hears an operation's outcome.
pub(crate) enum Waiter {
    /// The caller, through its [`Ticket`].
    Caller(oneshot::Sender<OpOutcome>),
    Sink(Arc<dyn OutcomeSink>),
    /// The caller of a batch, through its [`BatchOutcomes`]: the operation's place in it.
    Batch(Arc<BatchWait>, u32),
}

/// Completes one operation: answers the waiting caller, updates its tracked record,
/// counters and the result cache, publishes its event and hands its spans to the
/// node's span sink. Completing twice is impossible (it is consumed); dropping it
/// uncompleted fails the operation with a reason.
pub struct Reply {
    id: OpId,
    trace: Option<OpTrace>,
    pub(crate) stamps: Stamps,
    pub(crate) cache_verdict: Option<CacheVerdict>,
    /// The owner, when the Router picked another node and the operation is traced (its
    /// spans name it; nothing else reads it).
    pub(crate) target: Option<NodeId>,
    /// Retries, for the `op.execute` span (allocated only when there is one and the
    /// operation is traced).
    pub(crate) retry_events: Vec<SpanEvent>,
    waiter: Option<Waiter>,
    tracked: Option<Arc<Tracked>>,
    /// The type's queue slot while the operation waits (and the type's entry always).
    pub(crate) slot: QueueSlot,
    /// The node, counted on the accepting thread's stripe.
    pub(crate) shared: Anchor<NodeShared>,
    /// Set for an operation with an idempotency key that runs (is not answered from the
    /// cache): its outcome is stored and handed to operations that joined it. Boxed: most
    /// operations have none, and without its 40 bytes a job fits the allocator's 512-byte
    /// size class instead of the 640-byte one (10,000 operations in flight: 1.3 MB).
    pub(crate) cache_key: Option<Box<CacheKey>>,
    pub(crate) accepted_at: Instant,
    /// Who submitted it ([`Operation::owner`]), for the events it publishes.
    owner: Option<Arc<str>>,
    done: bool,
}

impl Reply {
    pub(crate) fn new(
        op: &Operation,
        trace: Option<OpTrace>,
        slot: QueueSlot,
        shared: Anchor<NodeShared>,
        tracked: Option<Arc<Tracked>>,
        accepted_at: Instant,
        waiter: Waiter,
    ) -> Self {
        Reply {
            id: op.id,
            trace,
            stamps: Stamps::default(),
            cache_verdict: None,
            target: None,
            retry_events: Vec::new(),
            waiter: Some(waiter),
            tracked,
            slot,
            shared,
            cache_key: None,
            accepted_at,
            owner: op.owner.clone(),
            done: false,
        }
    }

    /// The operation's type: its handler, retry policy and counters.
    pub(crate) fn entry(&self) -> &Arc<TypeEntry> {
        self.slot.entry()
    }

    /// Marks the operation running since `at` (the Executor reads the clock once per
    /// operation: the end of one that finished at once is the start of the next).
    pub(crate) fn mark_running(&mut self, op_type: &crate::op::OpType, at: Instant) {
        self.stamps.started = Stamp::from_instant(at);
        if let Some(t) = &self.tracked {
            t.status.store(OpStatus::Running.to_u8(), Ordering::Release);
        }
        let shared = &self.shared;
        shared
            .events()
            .publish(EventKind::OperationStarted, || Event::OperationStarted {
                id: self.id,
                node: shared.node_id().clone(),
                op_type: op_type.clone(),
                trace_id: self.trace.as_ref().map(|t| format!("{:032x}", t.trace_id)),
                timestamp: now_ms(),
                owner: self.owner.clone(),
            });
    }

    /// The trace context of `stage`'s span of this operation (the `op.route` context is
    /// what travels to a remote owner), when it is traced.
    pub fn trace_context(&self, stage: Stage) -> Option<TraceContext> {
        self.trace.as_ref().map(|t| t.context(stage))
    }

    /// Whether the operation is traced: only then are its spans recorded.
    pub(crate) fn is_traced(&self) -> bool {
        self.trace.is_some()
    }

    /// The context a handler runs in: its `op.execute` span.
    pub(crate) fn execute_context(&self) -> Option<TraceContext> {
        self.trace_context(Stage::Execute)
    }

    /// Notes a retry on the `op.execute` span.
    pub(crate) fn retrying(&mut self, attempt: u32, at: Stamp, message: String) {
        if self.trace.is_some() {
            self.retry_events.push(SpanEvent {
                at,
                name: "retry",
                attempt,
                message,
            });
        }
    }

    /// Completes the operation with `outcome` (whose id is set to this operation's).
    pub fn finish(self, outcome: OpOutcome) {
        self.finish_at(outcome, Instant::now());
    }

    /// [`finish`](Self::finish), ended at `now` (a clock read the caller already has:
    /// the operations of one batch of replies from another node all ended when it
    /// arrived).
    pub fn finish_at(self, outcome: OpOutcome, now: Instant) {
        self.finish_into(outcome, now, &mut Handoff::default());
    }

    /// [`finish_at`](Self::finish_at), the outcome handed to its waiter through
    /// `handoff`, with the others completed together.
    pub fn finish_into(mut self, outcome: OpOutcome, now: Instant, handoff: &mut Handoff) {
        let outcome = self.stamp(outcome);
        self.complete(outcome, now, handoff);
    }

    /// Completes the operation as failed or expired with `reason`.
    pub fn fail(self, status: OpStatus, reason: impl Into<String>) {
        let id = self.id;
        self.finish(OpOutcome::failure(id, status, reason));
    }

    /// Gives `outcome` this operation's id and, unless it has one, its trace id.
    fn stamp(&self, mut outcome: OpOutcome) -> OpOutcome {
        outcome.id = self.id;
        if outcome.trace_id.is_none() {
            outcome.trace_id = self.trace.as_ref().map(|t| TraceId(t.trace_id));
        }
        outcome
    }

    fn complete(&mut self, outcome: OpOutcome, now: Instant, handoff: &mut Handoff) {
        if self.done {
            return;
        }
        self.done = true;
        self.slot.release();
        let end = Stamp::from_instant(now);
        let latency = now.saturating_duration_since(self.accepted_at);
        let tm = &self.entry().metrics;
        tm.count(outcome.status);
        tm.record_latency(latency.as_micros() as u64);
        tm.stages.total.record(latency.as_nanos() as u64);
        let st = self.stamps;
        if st.started.is_set() {
            tm.stages
                .execute
                .record(end.since(st.started).as_nanos() as u64);
            if st.queued.is_set() {
                tm.stages
                    .queue
                    .record(st.started.since(st.queued).as_nanos() as u64);
            }
        }
        self.publish_finished(&outcome, latency);
        if let Some(tr) = &self.trace {
            if tr.sampled || outcome.status != OpStatus::Succeeded {
                self.record_spans(tr, &outcome, end);
            }
        }
        self.shared.metrics().completed(outcome.status);
        if let Some(key) = self.cache_key.take() {
            self.shared.cache_completed(*key, outcome.clone());
        }
        if let Some(t) = self.tracked.take() {
            self.shared.store().finished(&t, outcome.clone());
        }
        handoff.hand(self.waiter.take(), outcome, &self.shared);
    }
}

impl Reply {
    fn publish_finished(&self, outcome: &OpOutcome, latency: std::time::Duration) {
        let kind = if outcome.status == OpStatus::Succeeded {
            EventKind::OperationSuccess
        } else {
            EventKind::OperationFailure
        };
        let shared = &self.shared;
        shared.events().publish(kind, || Event::OperationFinished {
            id: self.id,
            node: shared.node_id().clone(),
            op_type: self.entry().name.clone(),
            status: outcome.status,
            error: outcome.error.clone(),
            cached: outcome.cached,
            attempts: outcome.attempts,
            executed_by: outcome.executed_by.clone(),
            duration_us: latency.as_micros() as u64,
            trace_id: outcome.trace_id.map(|t| t.to_string()),
            timestamp: now_ms(),
            owner: self.owner.clone(),
        });
    }

    /// Lends this operation's spans, ending at `end`, to the node's span sink.
    fn record_spans(&self, tr: &OpTrace, outcome: &OpOutcome, end: Stamp) {
        let Some(t) = self.shared.tracing() else {
            return;
        };
        let mut spans = [SpanRecord::EMPTY; Stage::ALL.len()];
        let n = self.spans(tr, end, &mut spans);
        t.sink.record(&OpSpans {
            trace_id: tr.trace_id,
            sampled: tr.sampled,
            op_id: self.id,
            op_type: &self.entry().name,
            node: self.shared.node_id(),
            target: self.target.as_deref(),
            status: outcome.status,
            error: outcome.error.as_deref(),
            cache: self.cache_verdict,
            attempts: outcome.attempts,
            spans: &spans[..n],
            events: &self.retry_events,
        });
    }

    /// Writes the spans this operation left on this node, ending at `end`, into `out`;
    /// answers how many.
    fn spans(&self, tr: &OpTrace, end: Stamp, out: &mut [SpanRecord; Stage::ALL.len()]) -> usize {
        let st = self.stamps;
        let mut n = 0;
        let mut push = |span| {
            out[n] = span;
            n += 1;
        };
        if tr.origin {
            push(tr.span(Stage::Submit, Stamp::from_instant(self.accepted_at), end));
            // Only a route to another node is a span (it lasts until the owner's answer
            // came back, and the owner's spans hang under it); a local route takes a
            // few hundred nanoseconds, which ride on `op.submit`.
            if st.routed.is_set() && self.target.is_some() {
                push(tr.span(Stage::Route, st.routed, end));
            }
        }
        if st.cache_in.is_set() {
            let out = if st.cache_out.is_set() {
                st.cache_out
            } else {
                end
            };
            push(tr.span(Stage::Cache, st.cache_in, out));
        }
        if st.queued.is_set() {
            let out = if st.started.is_set() { st.started } else { end };
            push(tr.span(Stage::Queue, st.queued, out));
        }
        if st.started.is_set() {
            push(tr.span(Stage::Execute, st.started, end));
        }
        n
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if !self.done {
            let reason = if self.shared.is_stopping() {
                "node shut down before the operation finished"
            } else {
                "operation lost: the engine actor holding it stopped (it was restarted)"
            };
            let outcome = self.stamp(OpOutcome::failure(self.id, OpStatus::Failed, reason));
            tracing::warn!(op.id = %self.id, reason, "operation failed on drop");
            self.complete(outcome, Instant::now(), &mut Handoff::default());
        }
    }
}

/// The caller's handle on an accepted operation: a future of its outcome.
pub struct Ticket {
    pub id: OpId,
    /// The operation's `op.submit` span (what a response's `traceparent` names), when
    /// it is traced.
    pub trace: Option<TraceContext>,
    rx: oneshot::Receiver<OpOutcome>,
}

impl Ticket {
    pub(crate) fn new(
        id: OpId,
        trace: Option<TraceContext>,
        rx: oneshot::Receiver<OpOutcome>,
    ) -> Self {
        Ticket { id, trace, rx }
    }
}

impl Future for Ticket {
    type Output = OpOutcome;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<OpOutcome> {
        let id = self.id;
        Pin::new(&mut self.rx).poll(cx).map(|r| {
            r.unwrap_or_else(|_| {
                OpOutcome::failure(
                    id,
                    OpStatus::Failed,
                    "operation lost: its reply channel closed",
                )
            })
        })
    }
}

/// The outcomes of a batch of operations whose caller waits for all of them (`POST
/// /v1/ops/batch?wait=true`): one record the operations fill as they end and one wake
/// when the last has, instead of a channel, a send and a wake per operation. A future of
/// the outcomes in the batch's order, `None` where an operation was not accepted.
pub struct BatchOutcomes {
    wait: Arc<BatchWait>,
    /// Its places (one per operation). Only the thread admitting the batch changes it
    /// (atomic so that the future stays `Sync`).
    places: AtomicUsize,
}

pub(crate) struct BatchWait {
    outcomes: Mutex<Vec<Option<OpOutcome>>>,
    /// Accepted operations not ended yet.
    left: AtomicUsize,
    waker: futures::task::AtomicWaker,
}

impl BatchOutcomes {
    /// For a batch of `n` operations, none accepted yet.
    pub(crate) fn new(n: usize) -> BatchOutcomes {
        BatchOutcomes {
            wait: Arc::new(BatchWait {
                outcomes: Mutex::new((0..n).map(|_| None).collect()),
                left: AtomicUsize::new(0),
                waker: futures::task::AtomicWaker::new(),
            }),
            places: AtomicUsize::new(n),
        }
    }

    /// The waiter of operation `index`, which was accepted: the batch now waits for it.
    /// (Called before any operation of the batch starts; a place past those the batch was
    /// made with is added.)
    pub(crate) fn waiter(&self, index: usize) -> Waiter {
        self.wait.left.fetch_add(1, Ordering::AcqRel);
        let index = u32::try_from(index).expect("a batch holds fewer than 2^32 operations");
        if index as usize >= self.places.load(Ordering::Relaxed) {
            self.fit(index as usize + 1);
        }
        Waiter::Batch(Arc::clone(&self.wait), index)
    }

    /// Makes the batch `n` places long: a place added has no operation, and one taken
    /// away must have had none (no waiter was made for it).
    pub(crate) fn fit(&self, n: usize) {
        self.wait.outcomes.lock().resize_with(n, || None);
        self.places.store(n, Ordering::Relaxed);
    }
}

impl BatchWait {
    fn deliver(&self, delivered: impl ExactSizeIterator<Item = (u32, OpOutcome)>) {
        let n = delivered.len();
        {
            let mut outcomes = self.outcomes.lock();
            for (index, outcome) in delivered {
                outcomes[index as usize] = Some(outcome);
            }
        }
        if self.left.fetch_sub(n, Ordering::AcqRel) == n {
            self.waker.wake();
        }
    }
}

/// Outcomes of operations completed together (the replies of one batch from another
/// node, the operations one executor task ran at once), handed to their waiters as it is
/// dropped: the outcomes of one [batch](BatchOutcomes) (or of one [`OutcomeSink`]) in a
/// row go in under one lock, and the node counts them finished at once, after they are
/// delivered (as each operation alone: whoever waits for the node to be idle sees every
/// outcome delivered). A caller's own [`Ticket`] is answered at once.
#[derive(Default)]
pub struct Handoff {
    batch: Option<ForBatch>,
    sink: Option<ForSink>,
    /// The node of the operations handed so far, and how many.
    finished: Option<(Anchor<NodeShared>, usize)>,
    /// Room a list of outcomes starts with.
    room: usize,
}

/// Outcomes held for a batch's caller, each with its place in the batch.
type ForBatch = (Arc<BatchWait>, Vec<(u32, OpOutcome)>);
/// Outcomes held for a sink.
type ForSink = (Arc<dyn OutcomeSink>, Vec<OpOutcome>);

impl Handoff {
    /// For about `n` operations (its lists start with room for them).
    pub fn with_capacity(n: usize) -> Handoff {
        let mut handoff = Handoff::default();
        handoff.room = n;
        handoff
    }

    fn list<T>(&self, first: T) -> Vec<T> {
        let mut list = Vec::with_capacity(self.room.max(1));
        list.push(first);
        list
    }

    fn hand(&mut self, waiter: Option<Waiter>, outcome: OpOutcome, node: &Anchor<NodeShared>) {
        if !matches!(&self.finished, Some((n, _)) if Arc::ptr_eq(&n.0, &node.0)) {
            self.flush();
            self.finished = Some((node.clone(), 0));
        }
        match waiter {
            Some(Waiter::Caller(tx)) => {
                let _ = tx.send(outcome);
            }
            Some(Waiter::Sink(sink)) => match &mut self.sink {
                Some((to, list)) if std::ptr::addr_eq(Arc::as_ptr(to), Arc::as_ptr(&sink)) => {
                    list.push(outcome)
                }
                _ => {
                    let list = self.list(outcome);
                    if let Some((to, list)) = self.sink.replace((sink, list)) {
                        to.deliver_all(list);
                    }
                }
            },
            Some(Waiter::Batch(wait, index)) => match &mut self.batch {
                Some((to, list)) if Arc::ptr_eq(to, &wait) => list.push((index, outcome)),
                _ => {
                    let list = self.list((index, outcome));
                    if let Some((to, list)) = self.batch.replace((wait, list)) {
                        to.deliver(list.into_iter());
                    }
                }
            },
            None => {}
        }
        if let Some((_, n)) = &mut self.finished {
            *n += 1;
        }
    }

    /// Delivers what it holds, then counts its operations finished.
    fn flush(&mut self) {
        if let Some((to, list)) = self.batch.take() {
            to.deliver(list.into_iter());
        }
        if let Some((to, list)) = self.sink.take() {
            to.deliver_all(list);
        }
        if let Some((node, n)) = self.finished.take() {
            node.ops_finished(n);
        }
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        self.flush();
    }
}

impl Future for BatchOutcomes {
    type Output = Vec<Option<OpOutcome>>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let done = |w: &BatchWait| w.left.load(Ordering::Acquire) == 0;
        if !done(&self.wait) {
            self.wait.waker.register(cx.waker());
            // The last may have ended between the check and the registration.
            if !done(&self.wait) {
                return Poll::Pending;
            }
        }
        Poll::Ready(std::mem::take(&mut *self.wait.outcomes.lock()))
    }
}

/// The live record of a tracked operation, readable while it runs and for a while after.
pub struct Tracked {
    pub id: OpId,
    pub op_type: Arc<str>,
    /// The operation's trace id, when it carries a trace context.
    pub trace_id: Option<u128>,
    /// Who submitted it ([`Operation::owner`]).
    pub owner: Option<Arc<str>>,
    status: AtomicU8,
    outcome: OnceLock<OpOutcome>,
    finished_at: OnceLock<Instant>,
    /// The bytes of its outcome the store counts (result and error), once finished.
    stored: AtomicUsize,
}

impl Tracked {
    pub(crate) fn new(op: &Operation, trace_id: Option<u128>) -> Self {
        Tracked {
            id: op.id,
            op_type: op.op_type.clone(),
            trace_id,
            owner: op.owner.clone(),
            status: AtomicU8::new(OpStatus::Queued.to_u8()),
            outcome: OnceLock::new(),
            finished_at: OnceLock::new(),
            stored: AtomicUsize::new(0),
        }
    }

    fn finish(&self, outcome: OpOutcome) {
        self.status.store(outcome.status.to_u8(), Ordering::Release);
        let _ = self.outcome.set(outcome);
        let _ = self.finished_at.set(Instant::now());
    }

    pub fn status(&self) -> OpStatus {
        OpStatus::from_u8(self.status.load(Ordering::Acquire))
    }

    /// The outcome, once the operation has finished.
    pub fn outcome(&self) -> Option<&OpOutcome> {
        self.outcome.get()
    }

    fn finished_before(&self, t: Instant) -> bool {
        self.finished_at.get().is_some_and(|f| *f < t)
    }
}

/// How the error of an operation whose result was too large to keep begins.
pub const TOO_LARGE: &str = "result too large to store";

/// What the store keeps of finished operations: for how long, how many, how many bytes
/// of results in all, and the largest result it keeps.
#[derive(Clone, Copy, Debug)]
pub struct StoreLimits {
    pub retention: Duration,
    pub max_entries: usize,
    /// Results and errors of finished operations together, at most.
    pub max_bytes: usize,
    /// A larger result is not kept: the record says it was too large to store.
    pub max_result_bytes: usize,
}

/// Recent tracked operations by id: every one in flight, and finished ones for
/// `retention`, until `max_entries` newer ones push them out, or until their results
/// take more than `max_bytes` (oldest first). Eviction runs when a record is added, when
/// one finishes, and on [`sweep`](Self::sweep), which the node calls every second, so
/// old results go even when nothing new arrives.
pub struct OpStore {
    map: DashMap<OpId, Arc<Tracked>>,
    order: Mutex<VecDeque<Arc<Tracked>>>,
    limits: StoreLimits,
    /// The bytes of results and errors of the finished records held.
    bytes: AtomicUsize,
}

impl OpStore {
    pub fn new(limits: StoreLimits) -> Self {
        OpStore {
            map: DashMap::new(),
            order: Mutex::new(VecDeque::new()),
            limits: StoreLimits {
                max_entries: limits.max_entries.max(1),
                ..limits
            },
            bytes: AtomicUsize::new(0),
        }
    }

    pub(crate) fn insert(&self, t: Arc<Tracked>) {
        self.map.insert(t.id, t.clone());
        let mut order = self.order.lock();
        order.push_back(t);
        self.evict(&mut order, Instant::now());
    }

    /// Records `t`'s outcome: counted against the byte budget, or, for a result over
    /// `max_result_bytes`, kept without its result and with an error that says why.
    pub(crate) fn finished(&self, t: &Tracked, mut outcome: OpOutcome) {
        let size = outcome.result.as_ref().map_or(0, Json::len);
        if size > self.limits.max_result_bytes {
            outcome.result = None;
            outcome.error = Some(format!(
                "{TOO_LARGE}: {size} bytes, over engine.max_stored_result_bytes ({})",
                self.limits.max_result_bytes
            ));
        }
        // Kept for long: a copy of its own, not a slice that holds a larger buffer.
        outcome.result = outcome.result.as_ref().map(Json::detached);
        let bytes = outcome.result.as_ref().map_or(0, Json::len)
            + outcome.error.as_ref().map_or(0, String::len);
        t.stored.store(bytes, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        t.finish(outcome);
        if self.bytes.load(Ordering::Relaxed) > self.limits.max_bytes {
            let mut order = self.order.lock();
            self.evict(&mut order, Instant::now());
        }
    }

    /// Evicts what is too old or over the budgets, without waiting for new records.
    pub fn sweep(&self) {
        let mut order = self.order.lock();
        self.evict(&mut order, Instant::now());
    }

    /// The bytes of results and errors held.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    fn remove(&self, t: &Tracked) {
        self.map.remove(&t.id);
        self.bytes
            .fetch_sub(t.stored.swap(0, Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Drops finished records that are too old, too many, or over the byte budget,
    /// oldest first. Records in flight are kept: they are bounded by the queue capacity.
    fn evict(&self, order: &mut VecDeque<Arc<Tracked>>, now: Instant) {
        let cutoff = now.checked_sub(self.limits.retention).unwrap_or(now);
        // Look at a bounded number of records per call so inserts stay cheap; a record
        // over the byte budget is rare and large, and each eviction frees much.
        for _ in 0..64 {
            let Some(front) = order.front() else { break };
            let over = order.len() > self.limits.max_entries
                || self.bytes.load(Ordering::Relaxed) > self.limits.max_bytes;
            if front.finished_before(cutoff) || (over && front.status().is_final()) {
                let t = order.pop_front().expect("front exists");
                self.remove(&t);
            } else if over && !front.status().is_final() {
                // Still running: move it behind the others and look further.
                let t = order.pop_front().expect("front exists");
                order.push_back(t);
            } else {
                break;
            }
        }
    }

    pub fn get(&self, id: &OpId) -> Option<Arc<Tracked>> {
        self.map.get(id).map(|e| e.clone())
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation in flight holds its boxed job: past 512 bytes it takes the
    /// allocator's next size class, 640 bytes (BENCHMARKS.md, "Memory").
    #[test]
    fn a_job_fits_in_512_bytes() {
        assert!(
            std::mem::size_of::<Job>() <= 512,
            "{}",
            std::mem::size_of::<Job>()
        );
    }

    fn store(max_bytes: usize, max_result_bytes: usize, retention_ms: u64) -> OpStore {
        OpStore::new(StoreLimits {
            retention: Duration::from_millis(retention_ms),
            max_entries: 1000,
            max_bytes,
            max_result_bytes,
        })
    }

    /// A tracked operation, inserted, finished with a result of `size` bytes.
    fn finish(s: &OpStore, size: usize) -> OpId {
        let op = Operation::new("t", Json::null());
        let t = Arc::new(Tracked::new(&op, None));
        s.insert(t.clone());
        let mut o = OpOutcome::new(op.id, OpStatus::Succeeded);
        o.result = Some(Json::from_trusted(bytes::Bytes::from(vec![b'1'; size])));
        s.finished(&t, o);
        op.id
    }

    #[test]
    fn results_over_the_byte_budget_push_out_the_oldest() {
        let s = store(10_000, 10_000, 60_000);
        let ids: Vec<OpId> = (0..5).map(|_| finish(&s, 3_000)).collect();
        // 15,000 bytes asked, 10,000 allowed: the two oldest went.
        assert!(s.bytes() <= 10_000, "{}", s.bytes());
        assert_eq!(s.bytes(), 9_000);
        assert!(s.get(&ids[0]).is_none() && s.get(&ids[1]).is_none());
        for id in &ids[2..] {
            assert!(s.get(id).is_some());
        }
    }

    #[test]
    fn a_result_over_the_cap_is_kept_as_too_large_to_store() {
        let s = store(10_000, 1_000, 60_000);
        let id = finish(&s, 5_000);
        let t = s.get(&id).expect("the record stays");
        let o = t.outcome().unwrap();
        assert_eq!(o.status, OpStatus::Succeeded);
        assert!(o.result.is_none());
        let e = o.error.as_deref().unwrap();
        assert!(e.starts_with(TOO_LARGE) && e.contains("5000 bytes"), "{e}");
        assert_eq!(s.bytes(), e.len(), "only the error is held");
    }

    /// A result that is a slice of a larger buffer (a forwarded batch's block) is kept
    /// as a copy of its own: the store counts what it holds.
    #[test]
    fn a_stored_result_holds_no_part_of_a_larger_buffer() {
        let s = store(1 << 20, 1 << 20, 60_000);
        let block = bytes::Bytes::from(vec![b'7'; 4096]);
        let op = Operation::new("t", Json::null());
        let t = Arc::new(Tracked::new(&op, None));
        s.insert(t.clone());
        let mut o = OpOutcome::new(op.id, OpStatus::Succeeded);
        o.result = Some(Json::from_trusted(block.slice(100..102)));
        s.finished(&t, o);
        let kept = s.get(&op.id).unwrap();
        let kept = kept.outcome().unwrap().result.as_ref().unwrap();
        crate::op::assert_detached(kept, "77", &block);
        assert_eq!(s.bytes(), 2);
    }

    #[test]
    fn a_sweep_drops_old_results_without_anything_new() {
        let s = store(1 << 20, 1 << 20, 20);
        let id = finish(&s, 100);
        assert!(s.get(&id).is_some());
        std::thread::sleep(Duration::from_millis(30));
        s.sweep();
        assert!(s.get(&id).is_none());
        assert_eq!(s.bytes(), 0);
    }
}
