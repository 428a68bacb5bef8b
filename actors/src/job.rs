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
use std::sync::atomic::{AtomicU8, Ordering};
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
use crate::op::{NodeId, OpId, OpOutcome, OpStatus, Operation, TraceContext, TraceId};
use crate::shared::NodeShared;
use crate::slots::QueueSlot;
use crate::trace::{CacheVerdict, OpSpans, OpTrace, SpanEvent, Stage, Stamp};

/// An accepted operation travelling Router → (Cache) → Scheduler → Executor.
pub struct Job {
    pub op: Operation,
    /// The effective deadline (the operation's own or the node default).
    pub deadline: Instant,
    pub reply: Reply,
    /// The [shard](crate::shard) that owns it on this node, picked at the door.
    pub(crate) shard: usize,
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

/// Completes one operation: answers the waiting caller, updates its tracked record,
/// counters and the result cache, publishes its event and hands its spans to the
/// node's span sink. Completing twice is impossible (it is consumed); dropping it
/// uncompleted fails the operation with a reason.
pub struct Reply {
    id: OpId,
    trace: Option<OpTrace>,
    pub(crate) stamps: Stamps,
    pub(crate) cache_verdict: Option<CacheVerdict>,
    /// The owner, when the Router picked another node.
    pub(crate) target: Option<NodeId>,
    /// Retries, for the `op.execute` span (allocated only when there is one and the
    /// operation is traced).
    pub(crate) retry_events: Vec<SpanEvent>,
    tx: Option<oneshot::Sender<OpOutcome>>,
    tracked: Option<Arc<Tracked>>,
    /// The type's queue slot while the operation waits (and the type's entry always).
    pub(crate) slot: QueueSlot,
    /// The node, counted on the accepting thread's stripe.
    pub(crate) shared: Anchor<NodeShared>,
    /// Set for an operation with an idempotency key that runs (is not answered from the
    /// cache): its outcome is stored and handed to operations that joined it.
    pub(crate) cache_key: Option<CacheKey>,
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
    ) -> (Self, oneshot::Receiver<OpOutcome>) {
        let (tx, rx) = oneshot::channel();
        let reply = Reply {
            id: op.id,
            trace,
            stamps: Stamps::default(),
            cache_verdict: None,
            target: None,
            retry_events: Vec::new(),
            tx: Some(tx),
            tracked,
            slot,
            shared,
            cache_key: None,
            accepted_at,
            owner: op.owner.clone(),
            done: false,
        };
        (reply, rx)
    }

    /// The operation's type: its handler, retry policy and counters.
    pub(crate) fn entry(&self) -> &Arc<TypeEntry> {
        self.slot.entry()
    }

    pub(crate) fn mark_running(&mut self, op_type: &crate::op::OpType) {
        self.stamps.started = Stamp::now();
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
    pub fn finish(mut self, outcome: OpOutcome) {
        let outcome = self.stamp(outcome);
        self.complete(outcome);
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

    fn complete(&mut self, outcome: OpOutcome) {
        if self.done {
            return;
        }
        self.done = true;
        self.slot.release();
        let now = Instant::now();
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
        let keep = self
            .trace
            .as_ref()
            .is_some_and(|tr| tr.sampled || outcome.status != OpStatus::Succeeded);
        if keep {
            let events = std::mem::take(&mut self.retry_events);
            if let Some(t) = self.shared.tracing() {
                t.sink.record(self.spans(&outcome, end, events));
            }
        }
        self.shared.metrics().completed(outcome.status);
        if let Some(key) = self.cache_key.take() {
            self.shared.cache_completed(key, outcome.clone());
        }
        if let Some(t) = self.tracked.take() {
            t.finish(outcome.clone());
        }
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(outcome);
        }
        self.shared.op_finished();
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

    /// The spans this operation left on this node, ending at `end`.
    fn spans(&self, outcome: &OpOutcome, end: Stamp, events: Vec<SpanEvent>) -> OpSpans {
        let tr = self.trace.as_ref().expect("called for traced operations");
        let st = self.stamps;
        let mut spans = Vec::with_capacity(5);
        if tr.origin {
            spans.push(tr.span(Stage::Submit, Stamp::from_instant(self.accepted_at), end));
            // Only a route to another node is a span (it lasts until the owner's answer
            // came back, and the owner's spans hang under it); a local route takes a
            // few hundred nanoseconds, which ride on `op.submit`.
            if st.routed.is_set() && self.target.is_some() {
                spans.push(tr.span(Stage::Route, st.routed, end));
            }
        }
        if st.cache_in.is_set() {
            let out = if st.cache_out.is_set() {
                st.cache_out
            } else {
                end
            };
            spans.push(tr.span(Stage::Cache, st.cache_in, out));
        }
        if st.queued.is_set() {
            let out = if st.started.is_set() { st.started } else { end };
            spans.push(tr.span(Stage::Queue, st.queued, out));
        }
        if st.started.is_set() {
            spans.push(tr.span(Stage::Execute, st.started, end));
        }
        OpSpans {
            trace_id: tr.trace_id,
            sampled: tr.sampled,
            op_id: self.id,
            op_type: self.entry().name.clone(),
            node: self.shared.node_id().clone(),
            target: self.target.clone(),
            status: outcome.status,
            error: outcome.error.clone(),
            cache: self.cache_verdict,
            attempts: outcome.attempts,
            spans,
            events,
        }
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
            self.complete(outcome);
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

/// Recent tracked operations by id: every one in flight, and finished ones for
/// `retention` or until `max_finished` newer ones push them out.
pub struct OpStore {
    map: DashMap<OpId, Arc<Tracked>>,
    order: Mutex<VecDeque<Arc<Tracked>>>,
    retention: Duration,
    max_entries: usize,
}

impl OpStore {
    pub fn new(retention: Duration, max_entries: usize) -> Self {
        OpStore {
            map: DashMap::new(),
            order: Mutex::new(VecDeque::new()),
            retention,
            max_entries: max_entries.max(1),
        }
    }

    pub(crate) fn insert(&self, t: Arc<Tracked>) {
        self.map.insert(t.id, t.clone());
        let mut order = self.order.lock();
        order.push_back(t);
        self.evict(&mut order, Instant::now());
    }

    /// Drops finished records that are too old, or too many. Records in flight are kept:
    /// they are bounded by the queue capacity.
    fn evict(&self, order: &mut VecDeque<Arc<Tracked>>, now: Instant) {
        let cutoff = now.checked_sub(self.retention).unwrap_or(now);
        // Look at a bounded number of records per call so inserts stay cheap.
        for _ in 0..8 {
            let Some(front) = order.front() else { break };
            let over = order.len() > self.max_entries;
            if front.finished_before(cutoff) || (over && front.status().is_final()) {
                let t = order.pop_front().expect("front exists");
                self.map.remove(&t.id);
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
