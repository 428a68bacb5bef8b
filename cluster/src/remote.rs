//! Remote execution: operations whose owner is another node travel there in `OpBatch`
//! frames and their outcomes come back in `ReplyBatch` frames.
//!
//! The origin keeps every operation it forwarded ([`Outbox`]) until its reply comes:
//! when the link to the owner comes back after a break, what is still waiting is sent
//! again; when the owner is marked down, it is routed again to a healthy node; when its
//! deadline passes first, it expires with the reason. The owner runs an operation it
//! receives again only once per run of its process: it keeps reply batches until the
//! origin acknowledges them and knows what is running (see [`crate::replies`]), so a
//! link break neither loses a reply nor runs an operation twice. Only an owner that dies
//! (or is marked down) with operations in flight makes the origin run them again
//! elsewhere: at least once, and an operation with an idempotency key is then answered
//! from the new owner's cache if it had run there, or carries the same `Idempotency-Key`
//! to the handler.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use opmesh_actors::job::{Handoff, Job};
use opmesh_actors::trace::Stage;
use opmesh_actors::{
    Json, NodeId, OpId, OpOutcome, OpStatus, Operation, OutcomeSink, SubmitError, TraceContext,
};
use parking_lot::Mutex;

use crate::codec::{
    EncodedOps, EncodedReplies, OpFields, ReplyFields, WireOp, WireReply, WireTrace,
};
use crate::replies::Ids;

/// An accepted operation's wire form, lent from its job; the deadline travels as time
/// left, the trace context as the origin's `op.route` span (the parent of the owner's
/// spans).
pub fn wire_fields(job: &Job, now: Instant) -> OpFields<'_> {
    let (op, deadline) = (&job.op, job.deadline);
    OpFields {
        id: op.id.0,
        op_type: &op.op_type,
        key: op.key.as_deref(),
        idempotency_key: op.idempotency_key.as_deref(),
        payload: op.payload.as_bytes(),
        metadata: &op.metadata,
        priority: op.priority,
        remaining_us: Some(deadline.saturating_duration_since(now).as_micros() as u64),
        trace: job.reply.trace_context(Stage::Route).map(|t| WireTrace {
            trace_id: t.trace_id,
            span_id: t.span_id,
            flags: t.flags,
        }),
        owner: op.owner.as_deref(),
    }
}

/// Turns a forwarded operation back into an [`Operation`]. The payload is trusted as
/// JSON: it was validated by the origin and came over an authenticated link.
pub fn from_wire(w: WireOp, now: Instant) -> Operation {
    Operation {
        id: OpId(w.id),
        op_type: w.op_type,
        key: w.key,
        payload: Json::from_trusted(w.payload),
        metadata: w.metadata,
        priority: w.priority,
        deadline: w.remaining_us.map(|us| now + Duration::from_micros(us)),
        idempotency_key: w.idempotency_key,
        trace_context: w.trace.map(|t| TraceContext {
            trace_id: t.trace_id,
            span_id: t.span_id,
            flags: t.flags,
        }),
        owner: w.owner,
    }
}

/// The fields of `o`'s reply, lent to the encoder.
pub fn reply_fields(o: &OpOutcome) -> ReplyFields<'_> {
    ReplyFields {
        id: o.id.0,
        status: o.status.to_u8(),
        result: o.result.as_ref().map(|r| r.as_str().as_bytes()),
        error: o.error.as_deref(),
        cached: o.cached,
        attempts: o.attempts,
    }
}

/// The wire form of an outcome.
pub fn reply_to_wire(o: OpOutcome) -> WireReply {
    WireReply {
        id: o.id.0,
        status: o.status.to_u8(),
        result: o.result.map(Json::into_bytes),
        error: o.error,
        cached: o.cached,
        attempts: o.attempts,
    }
}

/// The outcome a reply from `peer` carries. Only final statuses are valid on the wire;
/// anything else fails the operation, naming the fault.
pub fn reply_from_wire(w: WireReply, peer: &NodeId) -> OpOutcome {
    let status = OpStatus::from_u8(w.status);
    let (status, error) = if status.is_final() && w.status <= OpStatus::Expired.to_u8() {
        (status, w.error)
    } else {
        (
            OpStatus::Failed,
            Some(format!(
                "node `{peer}` answered with invalid status {}",
                w.status
            )),
        )
    };
    OpOutcome {
        id: OpId(w.id),
        status,
        result: w.result.map(Json::from_trusted),
        error,
        cached: w.cached,
        executed_by: Some(peer.clone()),
        attempts: w.attempts,
        trace_id: None,
    }
}

/// The status of a reply that says the owner refused the operation for now (its queue of
/// the type was full, or it is starting and its engine is not up yet): the origin routes
/// it again to another node of the route, or fails it naming the owner when there is
/// none.
pub const REFUSED_OVERLOADED: u8 = 0xF0;

/// The answer to a submission the owner refused at its door (full queue, no handler,
/// shutting down): the operation fails with the owner's reason, or, for a full queue, is
/// routed again by the origin ([`REFUSED_OVERLOADED`]).
pub fn refused_reply(id: u128, peer: &NodeId, e: &SubmitError) -> WireReply {
    let mut r = reply_to_wire(OpOutcome::failure(
        OpId(id),
        OpStatus::Failed,
        format!("node `{peer}` refused the operation: {e}"),
    ));
    if matches!(e, SubmitError::Overloaded { .. }) {
        r.status = REFUSED_OVERLOADED;
    }
    r
}

/// What the origin forwarded and waits to hear about, by owner.
#[derive(Default)]
pub struct Outbox {
    by_peer: DashMap<NodeId, Mutex<Ids<Box<Job>>>>,
}

impl Outbox {
    /// Keeps `jobs` until `peer` answers them; returns them encoded (once, here: no
    /// wire value per operation).
    pub fn hold(&self, peer: &NodeId, jobs: Vec<Box<Job>>) -> EncodedOps {
        let now = Instant::now();
        let wire = EncodedOps::new(jobs.iter().map(|j| wire_fields(j, now)));
        let slot = self.by_peer.entry(peer.clone()).or_default();
        let mut held = slot.lock();
        for j in jobs {
            held.insert(j.op.id.0, j);
        }
        wire
    }

    /// Completes the operations `peer` answered, all ended as the replies arrived (one
    /// clock read for the batch). Replies to unknown ids (answered already: a repeat
    /// after a re-send) are ignored. Answers the operations `peer`
    /// refused because its queue was full ([`REFUSED_OVERLOADED`]), with its reason,
    /// for the caller to route again or fail.
    pub fn complete(&self, peer: &NodeId, replies: Vec<WireReply>) -> Vec<(Box<Job>, String)> {
        let Some(slot) = self.by_peer.get(peer) else {
            return Vec::new();
        };
        // Only the jobs are gathered under the lock (a pointer each, in reply order);
        // the replies stay where they are.
        let jobs: Vec<Option<Box<Job>>> = {
            let mut held = slot.lock();
            replies.iter().map(|r| held.remove(&r.id)).collect()
        };
        drop(slot);
        let arrived = Instant::now();
        let mut refused = Vec::new();
        // Their callers hear them together (one lock per caller's batch).
        let mut handoff = Handoff::with_capacity(jobs.len());
        for (job, reply) in jobs.into_iter().zip(replies) {
            let Some(job) = job else {
                continue;
            };
            if reply.status == REFUSED_OVERLOADED {
                refused.push((job, reply.error.unwrap_or_default()));
                continue;
            }
            let Job { reply: done, .. } = *job;
            done.finish_into(reply_from_wire(reply, peer), arrived, &mut handoff);
        }
        refused
    }

    /// Hands `send` the wire form of everything still waiting on `peer` (to send again
    /// after the link came back), holding the peer's lock while it runs: a reply that
    /// completes one of them meanwhile is processed, and acknowledged, only after `send`
    /// has queued the repeat. Both go on lane 0 (see [`crate::transport`]), so the owner
    /// reads the repeat before the acknowledgement that lets it forget the operation, and
    /// never runs it again. Returns how many were handed over.
    pub fn send_waiting(&self, peer: &NodeId, send: impl FnOnce(EncodedOps)) -> usize {
        let now = Instant::now();
        let Some(slot) = self.by_peer.get(peer) else {
            return 0;
        };
        let held = slot.lock();
        if held.is_empty() {
            return 0;
        }
        let wire = EncodedOps::new(held.values().map(|j| wire_fields(j, now)));
        let n = wire.len();
        send(wire);
        n
    }

    /// Takes back the operations `ids` waiting on `peer` (they were never sent).
    pub fn release(&self, peer: &NodeId, ids: impl Iterator<Item = u128>) -> Vec<Box<Job>> {
        match self.by_peer.get(peer) {
            Some(slot) => {
                let mut held = slot.lock();
                ids.filter_map(|id| held.remove(&id)).collect()
            }
            None => Vec::new(),
        }
    }

    /// Takes back everything waiting on `peer` (it is down: route them again).
    pub fn take(&self, peer: &NodeId) -> Vec<Box<Job>> {
        match self.by_peer.get(peer) {
            Some(slot) => slot.lock().drain().map(|(_, j)| j).collect(),
            None => Vec::new(),
        }
    }

    /// The peers something is waiting on.
    pub fn peers(&self) -> Vec<NodeId> {
        self.by_peer
            .iter()
            .filter(|e| !e.value().lock().is_empty())
            .map(|e| e.key().clone())
            .collect()
    }

    /// How many operations wait for a reply.
    pub fn len(&self) -> usize {
        self.by_peer.iter().map(|e| e.value().lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Expires what waited past its deadline, with the reason.
    pub fn expire(&self, now: Instant) {
        for e in self.by_peer.iter() {
            let overdue: Vec<Box<Job>> = {
                let mut held = e.value().lock();
                let ids: Vec<u128> = held
                    .iter()
                    .filter(|(_, j)| j.deadline <= now)
                    .map(|(id, _)| *id)
                    .collect();
                ids.into_iter().filter_map(|id| held.remove(&id)).collect()
            };
            for job in overdue {
                let Job { reply, .. } = *job;
                reply.fail(
                    OpStatus::Expired,
                    format!("deadline passed before node `{}` answered", e.key()),
                );
            }
        }
    }
}

/// Gathers the outcomes of operations run here for another node (the engine delivers
/// each as it completes: an [`OutcomeSink`]) and hands them to `send` in batches: what
/// completed before the flush task ran goes in one `ReplyBatch`. Each is encoded as it
/// arrives, into the batch's records: no wire value, ticket or future per operation.
pub struct ReplyCollector {
    me: Weak<ReplyCollector>,
    pending: Mutex<EncodedReplies>,
    runtime: tokio::runtime::Handle,
    send: Box<dyn Fn(EncodedReplies) + Send + Sync>,
}

impl ReplyCollector {
    /// A collector whose flushes run on the runtime of the thread that completes an
    /// operation (a shard's own thread, with `engine.shard_threads`: waking another
    /// thread for each flush costs more than the flush), or else on the current one.
    pub fn new(send: impl Fn(EncodedReplies) + Send + Sync + 'static) -> Arc<ReplyCollector> {
        Arc::new_cyclic(|me| ReplyCollector {
            me: me.clone(),
            pending: Mutex::new(EncodedReplies::default()),
            runtime: tokio::runtime::Handle::current(),
            send: Box::new(send),
        })
    }

    fn flush(&self) {
        // The next batch starts with room for as many as this one: no regrowing copies
        // of the list while it fills again.
        let batch = {
            let mut pending = self.pending.lock();
            let room = EncodedReplies::with_capacity(pending.len(), pending.bytes());
            std::mem::replace(&mut *pending, room)
        };
        if !batch.is_empty() {
            (self.send)(batch);
        }
    }

    /// Encodes `outcomes` into the pending batch. The first outcome since the last flush
    /// schedules the next one, after the completing task yields: the rest of its batch
    /// of outcomes joins it.
    fn take(&self, outcomes: &[OpOutcome]) {
        let first = {
            let mut pending = self.pending.lock();
            let was_empty = pending.is_empty();
            for outcome in outcomes {
                pending.push(&reply_fields(outcome));
            }
            was_empty && !pending.is_empty()
        };
        if first {
            if let Some(me) = self.me.upgrade() {
                let flush = async move {
                    tokio::task::yield_now().await;
                    me.flush();
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(here) => here.spawn(flush),
                    Err(_) => self.runtime.spawn(flush),
                };
            }
        }
    }
}

// The outcomes' results and errors are dropped here, after `take` let the lock go.
impl OutcomeSink for ReplyCollector {
    fn deliver(&self, outcome: OpOutcome) {
        self.take(std::slice::from_ref(&outcome));
    }

    fn deliver_all(&self, outcomes: Vec<OpOutcome>) {
        self.take(&outcomes);
    }
}
