//! opmesh's single-node engine.
//!
//! An operation's path on one node: [`Node::submit`] checks it and hands it to the
//! [`router::Router`] actor, which picks the owner node from the routing table; a local
//! operation with an idempotency key visits the [`cache::Cache`] actor first (a stored
//! result answers at once, a key in flight is joined); the [`scheduler::Scheduler`]
//! queues it per type and hands batches to the [`executor::Executor`], which runs the
//! handler with retries under the deadline. The [`job::Reply`] carried along completes
//! the operation exactly once. All four actors run under one supervisor that restarts
//! any that fails.
//!
//! This crate never talks to the network: the cluster layer plugs in through
//! [`router::Forwarder`] and [`routing::RouteStore`].

#![forbid(unsafe_code)]

pub mod backoff;
pub mod cache;
pub mod events;
pub mod executor;
pub mod handler;
pub mod hash;
pub mod job;
pub mod metrics;
pub mod node;
pub mod op;
pub mod router;
pub mod routing;
pub mod scheduler;
pub mod supervisor;
pub mod trace;

pub use backoff::{Backoff, BackoffSeries, Jitter};
pub use cache::CacheStats;
pub use handler::{
    GiveUpReason, Handler, HandlerError, HandlerRegistry, HandlerResult, RetryDecision, RetryPolicy,
};
pub use hash::{stable_hash, stable_id};
pub use job::{Ticket, Tracked};
pub use node::{CacheConfig, EngineConfig, Node, NodeBuilder, NodeStats, StartError};
pub use op::{
    Json, Limits, NodeId, OpId, OpOutcome, OpStatus, OpType, Operation, SubmitError, TraceContext,
    TraceId,
};
pub use routing::{Route, RouteError, RoutingTable, Strategy};
pub use scheduler::BatchPolicy;
pub use supervisor::ChildKind;
pub use trace::{Sampler, SpanSink, Tracing};
