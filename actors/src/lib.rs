//! opmesh's single-node engine.
//!
//! An operation's path on one node: [`Node::submit`] checks it at the door and takes a
//! slot of its type's queue, then hands it to the [`router::Router`] actor, which picks
//! the owner node from the routing table; a local operation with an idempotency key
//! visits the [`cache::Cache`] actor first (a stored result answers at once, a key in
//! flight is joined); the [`scheduler::Scheduler`] queues it per type and hands batches to
//! the [`executor::Executor`], which runs the handler with retries under the deadline. The
//! [`job::Reply`] carried along completes the operation exactly once. A node runs
//! several copies of these four actors, one [`shard`] per core by default, each owning a
//! share of the operations; all run under one supervisor that restarts any that fails.
//!
//! This crate never talks to the network: the cluster layer plugs in through
//! [`router::Forwarder`] and [`routing::RouteStore`].
//!
//! The modules, in the order an operation meets them:
//!
//! - [`op`]: the [`Operation`] a caller builds, its limits, and the [`OpOutcome`] it ends in.
//! - [`node`]: the [`Node`] handle and its builder, where operations are submitted.
//! - `admit`: the door, which accepts an operation (taking a queue slot) or refuses it.
//! - [`slots`]: queue slots and running slots per type (and the shared ones), given
//!   back on drop.
//! - [`job`]: the accepted [`job::Job`] and the [`job::Reply`] that completes it once.
//! - [`router`]: the Router actor, which picks each operation's owner node.
//! - [`routing`]: the routing table and the pure pick (round robin, hash, pinned...).
//! - [`hash`]: the stable hash that every node computes alike (consistent hashing, ids).
//! - [`cache`]: the Cache actor: results by idempotency key, single-flight for keys.
//! - [`scheduler`]: the Scheduler actor: per-type queues, priorities, batches.
//! - [`executor`]: the Executor actor: runs handlers under deadline and retry policy.
//! - [`handler`]: handlers, their registry, and the pure retry decision.
//! - [`type_limits`]: per-type settings (`[types.<type>]`): bulkheads, queues, deadline
//!   caps, rate limits, and how the running slots are shared out between types.
//! - [`breaker`]: circuit breakers, the pure state machine and the shared handle.
//! - [`backoff`]: exponential backoff with jitter, the randomness passed in.
//! - [`trace`]: stage stamps and the spans a finished operation leaves.
//! - [`events`]: live events for watchers (`/v1/events`).
//! - [`ratelimit`]: rate limits with a burst (governor's GCRA), one or one per key.
//! - [`metrics`]: counters and latency histograms, read when scraped.
//! - [`counter`]: counters striped by thread, so cores do not share their lines.
//! - [`shard`]: the copies of the hot path, and which one an operation belongs to.
//! - `shared`: the state the node handle and its actors share, private to the engine.
//! - [`supervisor`]: starts the four actors and restarts any that fails.

#![forbid(unsafe_code)]

mod admit;
pub mod backoff;
pub mod breaker;
pub mod cache;
pub mod counter;
pub mod events;
pub mod executor;
pub mod handler;
pub mod hash;
pub mod job;
pub mod metrics;
pub mod node;
pub mod op;
pub mod ratelimit;
pub mod router;
pub mod routing;
pub mod scheduler;
pub mod shard;
mod shared;
pub mod slots;
pub mod supervisor;
pub mod trace;
pub mod type_limits;

pub use backoff::{Backoff, BackoffSeries, Jitter};
pub use breaker::{BreakerPolicy, BreakerState, BreakerStats};
pub use cache::CacheStats;
pub use handler::{
    GiveUpReason, Handler, HandlerError, HandlerRegistry, HandlerResult, RetryDecision, RetryPolicy,
};
pub use hash::{stable_hash, stable_id};
pub use job::{BatchOutcomes, Handoff, OutcomeSink, Ticket, Tracked};
pub use node::{CacheConfig, EngineConfig, Node, NodeBuilder, NodeStats, StartError};
pub use op::{
    Json, Limits, NodeId, OpId, OpOutcome, OpStatus, OpType, Operation, SubmitError, TraceContext,
    TraceId, TypeNames,
};
pub use routing::{Route, RouteError, RoutingTable, Strategy};
pub use scheduler::BatchPolicy;
pub use supervisor::ChildKind;
pub use trace::{Sampler, SpanSink, Tracing};
pub use type_limits::{BreakerSetting, RateLimit, SlotPlan, TypeSettings};
