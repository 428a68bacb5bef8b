//! The door: where a submitted operation is accepted or refused, before any actor sees it.
//!
//! [`NodeShared::admit`] checks the operation against the node's state (accepting?), the
//! limits, and the handler registry (or, for a type this node forwards, the cluster's
//! routes), then against its type's limits (see [`crate::type_limits`]): the type's
//! deadline cap (400), its circuit breaker ([`SubmitError::CircuitOpen`], a 503), a
//! [`QueueSlot`] of its queue (full: [`SubmitError::Overloaded`], a 429) and, for an
//! operation a client submitted here, its rate limit ([`SubmitError::RateLimited`], a
//! 429). Each refusal that passes says when to try again. An accepted operation becomes a
//! boxed [`Job`] whose [`Reply`] holds the slot, and a [`Ticket`] for the caller. Refusals
//! are counted; nothing refused ever reaches an actor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::counter::{Anchor, StripedArc};
use crate::handler::{HandlerKind, TypeEntry};
use crate::job::{Job, Reply, Ticket, Tracked, Waiter};
use crate::op::{OpType, Operation, SubmitError, TraceContext};
use crate::ratelimit::Refusal;
use crate::routing::affinity;
use crate::shared::NodeShared;
use crate::slots::QueueSlot;
use crate::trace::{OpTrace, Stage};

/// Whether an operation may be routed to another node, or must run here.
#[derive(Clone, Copy)]
pub(crate) enum Admit {
    /// Submitted to this node: the Router picks its owner.
    Routed,
    /// Routed here by another node: runs here or is refused.
    Here,
}

impl NodeShared {
    /// The door for operations arriving at `now`, `how`; `node` is this node's striped
    /// handle: each accepted operation holds a reference to it taken on the calling
    /// thread's stripe.
    pub(crate) fn door<'a>(
        &'a self,
        node: &'a StripedArc<NodeShared>,
        how: Admit,
        now: Instant,
    ) -> Door<'a> {
        Door {
            shared: self,
            node,
            how,
            now,
            seen: None,
        }
    }

    /// Accepts `op` (tracked in the store when `track`), or says why not: the job and
    /// the caller's [`Ticket`].
    pub(crate) fn admit(
        &self,
        node: &StripedArc<NodeShared>,
        op: Operation,
        track: bool,
        how: Admit,
        now: Instant,
    ) -> Result<(Box<Job>, Ticket), SubmitError> {
        self.door(node, how, now).admit(op, track)
    }
}

/// The door of one batch: its operations are admitted at one instant, and what it looks
/// up for an operation's type (its registry entry, whether the node the routes send it to
/// takes it) is kept for the next operation of that type. Most batches are of one type:
/// those are read once per batch instead of once per operation. Every operation still
/// passes its own checks (its fields, the type's breaker, a slot of its queue, its rate).
pub(crate) struct Door<'a> {
    shared: &'a NodeShared,
    node: &'a StripedArc<NodeShared>,
    how: Admit,
    now: Instant,
    seen: Option<Seen>,
}

/// The type of the operation before, as the door found it.
struct Seen {
    op_type: OpType,
    entry: Anchor<TypeEntry>,
    /// The node its route sends an operation without an idempotency key to takes it
    /// (checked once; one with a key goes where its key is placed, checked each time).
    owner_takes: bool,
}

impl Door<'_> {
    /// Accepts `op` (tracked in the store when `track`), or says why not: the job and
    /// the caller's [`Ticket`].
    pub(crate) fn admit(
        &mut self,
        op: Operation,
        track: bool,
    ) -> Result<(Box<Job>, Ticket), SubmitError> {
        let id = op.id;
        let mut rx = None;
        let (job, submit_ctx) = self.admit_to(op, track, || {
            let (tx, r) = oneshot::channel();
            rx = Some(r);
            Waiter::Caller(tx)
        })?;
        let rx = rx.expect("the waiter is made for every accepted operation");
        Ok((job, Ticket::new(id, submit_ctx, rx)))
    }

    /// Accepts `op` like [`admit`](Self::admit), its outcome going to whoever `waiter`
    /// makes (called once it is accepted); answers the job and the context of its
    /// `op.submit` span, when it is traced here as the origin.
    pub(crate) fn admit_to(
        &mut self,
        op: Operation,
        track: bool,
        waiter: impl FnOnce() -> Waiter,
    ) -> Result<(Box<Job>, Option<TraceContext>), SubmitError> {
        let shared = self.shared;
        let (slot, shard) = match self.check(&op) {
            Ok(checked) => checked,
            Err(e) => {
                shared.metrics().rejected.inc();
                return Err(e);
            }
        };
        shared.op_accepted();
        let origin = matches!(self.how, Admit::Routed);
        let tracing = shared.tracing();
        let trace = (tracing.is_some() || op.trace_context.is_some())
            .then(|| OpTrace::begin(op.trace_context, tracing.map(|t| &t.sampler), origin));
        let tracked = track.then(|| {
            let t = Arc::new(Tracked::new(&op, trace.as_ref().map(|t| t.trace_id)));
            shared.store().insert(t.clone());
            t
        });
        let submit_ctx = trace
            .as_ref()
            .filter(|t| t.origin)
            .map(|t| t.context(Stage::Submit));
        let now = self.now;
        let deadline = op
            .deadline
            .unwrap_or(now + slot.entry().limits.default_deadline);
        let reply = Reply::new(&op, trace, slot, self.node.anchor(), tracked, now, waiter());
        Ok((
            Box::new(Job {
                op,
                deadline,
                reply,
                shard,
            }),
            submit_ctx,
        ))
    }

    /// Checks `op`, picks its shard and takes a slot of its type's queue there.
    fn check(&mut self, op: &Operation) -> Result<(QueueSlot, usize), SubmitError> {
        let (shared, how, now) = (self.shared, self.how, self.now);
        if !shared.is_accepting() {
            return Err(SubmitError::ShuttingDown);
        }
        let config = shared.config();
        config.limits.check(op, now)?;
        let seen = match self.seen.take() {
            Some(seen) if seen.op_type == op.op_type => seen,
            _ => Seen {
                op_type: op.op_type.clone(),
                entry: shared.entry_of(&op.op_type, how)?,
                owner_takes: false,
            },
        };
        let seen = self.seen.insert(seen);
        if matches!(how, Admit::Routed) && shared.forwarder().is_some() {
            let placed = op.idempotency_key.is_some();
            if placed || !seen.owner_takes {
                shared.check_owner(op, config.overload_retry_after, now)?;
                seen.owner_takes = !placed;
            }
        }
        let entry = seen.entry.clone();
        if let (Some(max), Some(d)) = (entry.limits.max_deadline, op.deadline) {
            let asked = d.saturating_duration_since(now);
            if asked > max {
                return Err(SubmitError::Invalid {
                    field: "deadline_ms",
                    reason: format!(
                        "is {} ms, over the limit of {} ms for type `{}` \
                         (types.{}.max_deadline_ms)",
                        asked.as_millis(),
                        max.as_millis(),
                        op.op_type,
                        op.op_type
                    ),
                });
            }
        }
        shared.breaker_admits(&entry, now)?;
        let shard = shared.shards().of().op(op);
        let capacity = entry.limits.queue_capacity;
        let slot = QueueSlot::try_take(entry, capacity).ok_or_else(|| SubmitError::Overloaded {
            op_type: op.op_type.to_string(),
            capacity,
            retry_after: config.overload_retry_after,
        })?;
        let rate = match how {
            Admit::Routed => slot.entry().limits.rate.as_ref(),
            // Another node admitted it, under its own rate limit.
            Admit::Here => None,
        };
        if let Some((limit, limiter)) = rate {
            // After the queue slot, so that a submission refused for a full queue spends
            // no token; refused here, the slot goes back as it drops.
            if let Err(refusal) = limiter.check_n(1) {
                let wait = match refusal {
                    Refusal::Wait(wait) => wait,
                    // One operation is never over a burst of at least one.
                    Refusal::OverBurst { .. } => Duration::from_secs(1),
                };
                return Err(SubmitError::RateLimited {
                    op_type: op.op_type.to_string(),
                    per_sec: limit.per_sec.get(),
                    burst: limit.burst.get(),
                    retry_after: wait,
                });
            }
        }
        Ok((slot, shard))
    }
}

impl NodeShared {
    /// The entry of `op_type`: its handler's here, else (for an operation submitted
    /// here) the one of a type the cluster routes elsewhere.
    fn entry_of(&self, op_type: &OpType, how: Admit) -> Result<Anchor<TypeEntry>, SubmitError> {
        match (self.registry().striped(op_type), how) {
            (Some(e), _) => Ok(e.anchor()),
            (None, Admit::Routed) => self.remote_entry(op_type),
            (None, Admit::Here) => Err(SubmitError::NoRoute {
                op_type: op_type.to_string(),
            }),
        }
    }

    /// Refuses `op` when the node it would go to has its breaker of the type open (503)
    /// or is overloaded with the type (429), and no other node of its route can take it
    /// (see [`RoutingTable::open_breaker`](crate::routing::RoutingTable::open_breaker)
    /// and [`RoutingTable::overloaded_owner`](crate::routing::RoutingTable::overloaded_owner)).
    fn check_owner(
        &self,
        op: &Operation,
        retry_after: Duration,
        now: Instant,
    ) -> Result<(), SubmitError> {
        let table = self.routes().load();
        let placed = op
            .idempotency_key
            .as_deref()
            .map(|k| affinity(op.owner.as_deref(), k));
        if let Some((node, open_for)) = table.open_breaker(&op.op_type, placed, now) {
            return Err(SubmitError::OwnerCircuitOpen {
                op_type: op.op_type.to_string(),
                node: node.to_string(),
                retry_after: open_for,
            });
        }
        match table.overloaded_owner(&op.op_type, placed) {
            Some(node) => Err(SubmitError::OwnerOverloaded {
                op_type: op.op_type.to_string(),
                node: node.id.to_string(),
                why: if node.congested {
                    "this node's link to it holds more than flow.high of \
                     cluster.link_buffer_bytes unsent"
                } else {
                    "its queue of the type is over flow.high"
                },
                retry_after,
            }),
            None => Ok(()),
        }
    }

    /// The entry of a type this node has no handler for, if the cluster routes it
    /// somewhere: an explicit route, or a node that serves it.
    fn remote_entry(&self, op_type: &OpType) -> Result<Anchor<TypeEntry>, SubmitError> {
        let remote = self.remote_types();
        if let Some(e) = remote.get(op_type) {
            return Ok(e.anchor());
        }
        if self.forwarder().is_none() || !self.routes().snapshot().routes_type(op_type) {
            return Err(SubmitError::NoRoute {
                op_type: op_type.to_string(),
            });
        }
        let entry = remote.entry(op_type.clone()).or_insert_with(|| {
            StripedArc::new(Arc::new(TypeEntry::with_limits(
                op_type.clone(),
                HandlerKind::Remote,
                self.config().retry.clone(),
                self.limits_of(op_type),
            )))
        });
        Ok(entry.anchor())
    }
}
