//! The [`Node`]: the handle a library user embeds and the binary serves.
//!
//! `Node::builder()` registers handlers and settings, `start()` spawns the supervised
//! actors, and `submit` / `enqueue` admit operations: checked against the limits, the
//! handler registry and the type's queue capacity, then handed to the Router's intake.
//! From there the actors own them until the [`Reply`](crate::job::Reply) completes them.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use parking_lot::Mutex;
use ractor::{Actor, ActorRef};
use serde::Serialize;

use crate::cache::{CacheCounters, CacheKey, CacheMsg, CacheStats};
use crate::events::EventBus;
use crate::executor::ExecutorMsg;
use crate::handler::{
    Handler, HandlerKind, HandlerRegistry, HandlerResult, RetryPolicy, TypeEntry,
};
use crate::job::{Job, OpStore, Reply, Ticket, Tracked};
use crate::metrics::{Latency, NodeMetrics, TypeStats};
use crate::op::{Limits, NodeId, OpId, OpOutcome, OpType, Operation, SubmitError};
use crate::router::{dispatch_local, Forwarder, Intake, RouterMsg};
use crate::routing::{LocalRoutes, NodeView, Route, RouteError, RouteStore, RoutingTable};
use crate::scheduler::{BatchPolicy, SchedulerMsg};
#[cfg(feature = "test-util")]
use crate::supervisor::ChildKind;
use crate::supervisor::NodeSupervisor;
use crate::trace::{OpTrace, Stage, Tracing};

/// Result-cache settings.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub capacity: NonZeroUsize,
    pub ttl: Duration,
}

/// Everything the engine needs to know, validated by the caller (the binary's config
/// layer, or the defaults).
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub batch: BatchPolicy,
    /// Waiting operations allowed per type before submissions are refused.
    pub queue_capacity: usize,
    /// What a refused submission is told to wait before trying again.
    pub overload_retry_after: Duration,
    pub limits: Limits,
    pub cache: CacheConfig,
    /// How long a finished tracked operation stays readable.
    pub retention: Duration,
    /// How many tracked operations are kept at most.
    pub retention_max: usize,
    /// The retry policy of handlers registered without one.
    pub retry: RetryPolicy,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            batch: BatchPolicy {
                batch_size: 256,
                batch_flush: Duration::ZERO,
                max_concurrent: 16_384,
            },
            queue_capacity: 100_000,
            overload_retry_after: Duration::from_secs(1),
            limits: Limits::default(),
            cache: CacheConfig {
                capacity: NonZeroUsize::new(100_000).expect("non-zero"),
                ttl: Duration::from_secs(300),
            },
            retention: Duration::from_secs(300),
            retention_max: 100_000,
            retry: RetryPolicy::default(),
        }
    }
}

#[derive(Default)]
pub(crate) struct Refs {
    pub router: ArcSwapOption<ActorRef<RouterMsg>>,
    pub cache: ArcSwapOption<ActorRef<CacheMsg>>,
    pub scheduler: ArcSwapOption<ActorRef<SchedulerMsg>>,
    pub executor: ArcSwapOption<ActorRef<ExecutorMsg>>,
}

/// State shared by the node handle and its actors.
pub struct NodeShared {
    pub node_id: NodeId,
    pub config: EngineConfig,
    pub registry: HandlerRegistry,
    pub metrics: NodeMetrics,
    pub cache_counters: Arc<CacheCounters>,
    pub routes: Arc<dyn RouteStore>,
    pub forwarder: Option<Arc<dyn Forwarder>>,
    /// Sampling and the span sink, when operations are traced.
    pub tracing: Option<Tracing>,
    /// Live events for watchers.
    pub events: Arc<EventBus>,
    /// Types this node accepts and forwards but has no handler for (cluster only).
    pub(crate) remote_types: DashMap<OpType, Arc<TypeEntry>>,
    pub store: OpStore,
    pub(crate) intake: Intake,
    /// The Scheduler waits for a running slot; the next finished operation wakes it.
    pub(crate) slots_wanted: AtomicBool,
    pub(crate) refs: Refs,
    accepting: AtomicBool,
    stopping: AtomicBool,
    /// Cancelled when the grace period is over: running handlers are abandoned.
    pub(crate) stopped: tokio_util::sync::CancellationToken,
    started: Instant,
}

fn send<M: ractor::Message>(cell: &ArcSwapOption<ActorRef<M>>, msg: M) {
    // A failed send drops the message; the jobs in it complete as failed on drop.
    if let Some(r) = cell.load().as_ref() {
        let _ = r.cast(msg);
    }
}

impl NodeShared {
    pub(crate) fn send_scheduler(&self, msg: SchedulerMsg) {
        send(&self.refs.scheduler, msg)
    }
    pub(crate) fn send_executor(&self, msg: ExecutorMsg) {
        send(&self.refs.executor, msg)
    }
    pub(crate) fn send_cache(&self, msg: CacheMsg) {
        send(&self.refs.cache, msg)
    }
    pub(crate) fn cache_completed(&self, key: CacheKey, outcome: OpOutcome) {
        self.send_cache(CacheMsg::Completed { key, outcome })
    }
    /// A running operation finished: free its slot and wake the Scheduler if it waits.
    pub(crate) fn slot_freed(&self) {
        self.metrics.running.fetch_sub(1, Ordering::AcqRel);
        if self.slots_wanted.swap(false, Ordering::AcqRel) {
            self.send_scheduler(SchedulerMsg::SlotsFreed);
        }
    }
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}

/// Whether an operation may be routed to another node, or must run here.
#[derive(Clone, Copy)]
enum Admit {
    Routed,
    Here,
}

/// Builds a [`Node`].
pub struct NodeBuilder {
    node_id: NodeId,
    config: EngineConfig,
    registry: HandlerRegistry,
    routes: Option<Arc<dyn RouteStore>>,
    forwarder: Option<Arc<dyn Forwarder>>,
    tracing: Option<Tracing>,
}

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not start the engine actors: {0}")]
    Spawn(String),
}

impl NodeBuilder {
    /// The node's id (default `node-1`).
    pub fn node_id(mut self, id: impl Into<NodeId>) -> Self {
        self.node_id = id.into();
        self
    }

    pub fn config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }

    /// Registers an async handler for `op_type` with the node's default retry policy.
    pub fn handler(mut self, op_type: &str, handler: impl Handler) -> Self {
        let retry = self.config.retry.clone();
        self.registry.register(op_type, handler, retry);
        self
    }

    /// Registers an async handler with its own retry policy.
    pub fn handler_with_retry(
        mut self,
        op_type: &str,
        handler: impl Handler,
        retry: RetryPolicy,
    ) -> Self {
        self.registry.register(op_type, handler, retry);
        self
    }

    /// Registers a blocking handler, run on the blocking thread pool.
    pub fn blocking_handler<F>(mut self, op_type: &str, f: F) -> Self
    where
        F: Fn(Operation) -> HandlerResult + Send + Sync + 'static,
    {
        let retry = self.config.retry.clone();
        self.registry.register_blocking(op_type, f, retry);
        self
    }

    /// The operation types registered so far.
    pub fn handler_types(&self) -> Vec<OpType> {
        self.registry.type_names()
    }

    /// Uses `routes` as the routing table (the cluster's replicated one) instead of the
    /// in-memory table of a lone node.
    pub fn route_store(mut self, routes: Arc<dyn RouteStore>) -> Self {
        self.routes = Some(routes);
        self
    }

    /// Sends operations owned by other nodes through `forwarder`.
    pub fn forwarder(mut self, forwarder: Arc<dyn Forwarder>) -> Self {
        self.forwarder = Some(forwarder);
        self
    }

    /// Traces operations: each leaves its spans in `tracing.sink` when sampled (or when
    /// it fails). Without this, only operations that arrive with a trace context get
    /// trace ids, and no spans are recorded.
    pub fn tracing(mut self, tracing: Tracing) -> Self {
        self.tracing = Some(tracing);
        self
    }

    /// Spawns the supervised actors and returns the running node. Must be called inside
    /// a tokio runtime.
    pub async fn start(self) -> Result<Node, StartError> {
        let routes = self.routes.unwrap_or_else(|| {
            Arc::new(LocalRoutes::new(RoutingTable {
                version: 1,
                routes: BTreeMap::new(),
                nodes: vec![NodeView {
                    id: self.node_id.clone(),
                    healthy: true,
                    serves: self.registry.type_names(),
                    load: 0,
                }],
            }))
        });
        let shared = Arc::new(NodeShared {
            store: OpStore::new(self.config.retention, self.config.retention_max),
            node_id: self.node_id,
            config: self.config,
            registry: self.registry,
            metrics: NodeMetrics::default(),
            cache_counters: Arc::new(CacheCounters::default()),
            routes,
            forwarder: self.forwarder,
            tracing: self.tracing,
            events: Arc::new(EventBus::default()),
            remote_types: DashMap::new(),
            intake: Intake::default(),
            slots_wanted: AtomicBool::new(false),
            refs: Refs::default(),
            accepting: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            stopped: tokio_util::sync::CancellationToken::new(),
            started: Instant::now(),
        });
        let (sup, join) = Actor::spawn(None, NodeSupervisor, shared.clone())
            .await
            .map_err(|e| StartError::Spawn(e.to_string()))?;
        Ok(Node {
            shared,
            supervisor: sup,
            join: Arc::new(Mutex::new(Some(join))),
        })
    }
}

/// A running node. Cheap to clone; every clone drives the same engine.
#[derive(Clone)]
pub struct Node {
    shared: Arc<NodeShared>,
    supervisor: ActorRef<()>,
    join: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

/// Node-wide figures, as `/v1/metrics` and `/v1/health` show them.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeStats {
    pub node_id: String,
    pub is_running: bool,
    pub is_accepting: bool,
    /// Operations whose handler runs now.
    pub active_operations: usize,
    /// Operations accepted and waiting to run.
    pub queued_operations: usize,
    /// Operations accepted and not yet finished (queued, running, or being answered).
    pub in_flight_operations: usize,
    pub completed_operations: u64,
    pub total_processed: u64,
    /// Operations accepted since start.
    pub total_operations: u64,
    pub succeeded_operations: u64,
    pub failed_operations: u64,
    pub expired_operations: u64,
    /// Submissions refused (bad input, no route, full queue, shutting down).
    pub rejected_operations: u64,
    /// Succeeded over finished, 1.0 before anything finished.
    pub success_rate: f64,
    /// Finished operations per second, recent.
    pub throughput: f64,
    /// End-to-end latency (accepted → finished), all types.
    pub latency: Latency,
    pub per_type: BTreeMap<String, TypeStats>,
    pub cache_stats: CacheStats,
    pub cache_hit_rate: f64,
    pub actor_restarts: u64,
    pub batches: u64,
    pub uptime_seconds: f64,
    /// Milliseconds since the Unix epoch.
    pub timestamp: u64,
}

impl Node {
    pub fn builder() -> NodeBuilder {
        let config = EngineConfig::default();
        NodeBuilder {
            node_id: "node-1".into(),
            config,
            registry: HandlerRegistry::new(),
            routes: None,
            forwarder: None,
            tracing: None,
        }
    }

    pub fn id(&self) -> &NodeId {
        &self.shared.node_id
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// The operation types this node has handlers for.
    pub fn handler_types(&self) -> Vec<String> {
        self.shared
            .registry
            .type_names()
            .iter()
            .map(|t| t.to_string())
            .collect()
    }

    /// Submits `op` and waits for its outcome. `Err` means it was not accepted; an
    /// accepted operation always ends in an outcome (succeeded, failed or expired).
    pub async fn submit(&self, op: Operation) -> Result<OpOutcome, SubmitError> {
        Ok(self.enqueue(op)?.await)
    }

    /// Accepts `op` and returns a ticket to await its outcome.
    pub fn enqueue(&self, op: Operation) -> Result<Ticket, SubmitError> {
        self.enqueue_one(op, false)
    }

    /// Like [`enqueue`](Self::enqueue), and keeps the operation readable through
    /// [`status`](Self::status) while it runs and for the retention period after.
    pub fn enqueue_tracked(&self, op: Operation) -> Result<Ticket, SubmitError> {
        self.enqueue_one(op, true)
    }

    fn enqueue_one(&self, op: Operation, track: bool) -> Result<Ticket, SubmitError> {
        let (job, ticket) = self.admit(op, track, Admit::Routed, Instant::now())?;
        self.hand_to_router([job]);
        Ok(ticket)
    }

    /// Accepts many operations at once (one trip to the Router). Each is accepted or
    /// refused on its own; the answers are in the same order.
    pub fn enqueue_batch(
        &self,
        ops: Vec<Operation>,
        track: bool,
    ) -> Vec<Result<Ticket, SubmitError>> {
        let now = Instant::now();
        let mut jobs = Vec::with_capacity(ops.len());
        let tickets = ops
            .into_iter()
            .map(|op| {
                self.admit(op, track, Admit::Routed, now).map(|(job, t)| {
                    jobs.push(job);
                    t
                })
            })
            .collect();
        if !jobs.is_empty() {
            self.hand_to_router(jobs);
        }
        tickets
    }

    /// Runs operations that another node routed here: they are checked against this
    /// node's handlers and queues and go straight to its Cache/Scheduler, never routed
    /// again (the origin already chose this node). Answers in the same order.
    pub fn enqueue_forwarded(&self, ops: Vec<Operation>) -> Vec<Result<Ticket, SubmitError>> {
        let now = Instant::now();
        let mut jobs = Vec::with_capacity(ops.len());
        let tickets = ops
            .into_iter()
            .map(|op| {
                self.admit(op, false, Admit::Here, now).map(|(job, t)| {
                    jobs.push(job);
                    t
                })
            })
            .collect();
        dispatch_local(&self.shared, jobs);
        tickets
    }

    /// Routes accepted operations again: the cluster layer hands back what it had
    /// forwarded to a node that went down. They keep their ids, deadlines and waiters.
    pub fn reroute(&self, jobs: Vec<Box<Job>>) {
        if !jobs.is_empty() {
            self.hand_to_router(jobs);
        }
    }

    fn admit(
        &self,
        op: Operation,
        track: bool,
        how: Admit,
        now: Instant,
    ) -> Result<(Box<Job>, Ticket), SubmitError> {
        let s = &self.shared;
        let r = self.check(&op, how, now);
        let entry = match r {
            Ok(e) => e,
            Err(e) => {
                s.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        s.metrics.accepted.fetch_add(1, Ordering::Relaxed);
        s.metrics.in_flight.fetch_add(1, Ordering::AcqRel);
        let origin = matches!(how, Admit::Routed);
        let trace = (s.tracing.is_some() || op.trace_context.is_some()).then(|| {
            OpTrace::begin(
                op.trace_context,
                s.tracing.as_ref().map(|t| &t.sampler),
                origin,
            )
        });
        let tracked = track.then(|| {
            let t = Arc::new(Tracked::new(&op, trace.as_ref().map(|t| t.trace_id)));
            s.store.insert(t.clone());
            t
        });
        let submit_ctx = trace
            .as_ref()
            .filter(|t| t.origin)
            .map(|t| t.context(Stage::Submit));
        let (reply, rx) = Reply::new(&op, trace, entry, s.clone(), tracked, now);
        let deadline = op
            .deadline
            .unwrap_or(now + s.config.limits.default_deadline);
        let ticket = Ticket::new(op.id, submit_ctx, rx);
        Ok((
            Box::new(Job {
                op,
                deadline,
                reply,
            }),
            ticket,
        ))
    }

    fn check(
        &self,
        op: &Operation,
        how: Admit,
        now: Instant,
    ) -> Result<Arc<TypeEntry>, SubmitError> {
        let s = &self.shared;
        if !s.accepting.load(Ordering::Acquire) {
            return Err(SubmitError::ShuttingDown);
        }
        s.config.limits.check(op, now)?;
        let entry = match (s.registry.get(&op.op_type), how) {
            (Some(e), _) => e.clone(),
            (None, Admit::Routed) => self.remote_entry(&op.op_type)?,
            (None, Admit::Here) => {
                return Err(SubmitError::NoRoute {
                    op_type: op.op_type.to_string(),
                })
            }
        };
        if !entry.try_reserve(s.config.queue_capacity) {
            return Err(SubmitError::Overloaded {
                op_type: op.op_type.to_string(),
                capacity: s.config.queue_capacity,
                retry_after: s.config.overload_retry_after,
            });
        }
        Ok(entry)
    }

    /// The entry of a type this node has no handler for, if the cluster routes it
    /// somewhere: an explicit route, or a node that serves it.
    fn remote_entry(&self, op_type: &OpType) -> Result<Arc<TypeEntry>, SubmitError> {
        let s = &self.shared;
        if let Some(e) = s.remote_types.get(op_type) {
            return Ok(e.clone());
        }
        let table = s.routes.snapshot();
        let routed =
            table.routes.contains_key(op_type) || table.nodes.iter().any(|n| n.serves(op_type));
        if s.forwarder.is_none() || !routed {
            return Err(SubmitError::NoRoute {
                op_type: op_type.to_string(),
            });
        }
        let entry = s.remote_types.entry(op_type.clone()).or_insert_with(|| {
            Arc::new(TypeEntry::new(
                op_type.clone(),
                HandlerKind::Remote,
                s.config.retry.clone(),
            ))
        });
        Ok(entry.clone())
    }

    fn hand_to_router(&self, jobs: impl IntoIterator<Item = Box<Job>>) {
        if self.shared.intake.push(jobs) {
            send(&self.shared.refs.router, RouterMsg::Drain);
        }
    }

    /// The record of a tracked operation, while it runs and for the retention period.
    pub fn status(&self, id: &OpId) -> Option<Arc<Tracked>> {
        self.shared.store.get(id)
    }

    /// The current routing table.
    pub fn routes(&self) -> Arc<RoutingTable> {
        self.shared.routes.snapshot()
    }

    /// Sets the route of `op_type`. In a cluster this waits until Raft commits it.
    pub async fn set_route(&self, op_type: &str, route: Route) -> Result<u64, RouteError> {
        crate::op::validate_type_name(op_type, self.shared.config.limits.max_type_len).map_err(
            |e| RouteError::Invalid {
                field: "type",
                reason: match e {
                    SubmitError::Invalid { reason, .. } => reason,
                    other => other.to_string(),
                },
            },
        )?;
        self.shared.routes.set_route(op_type.into(), route).await
    }

    /// Removes the route of `op_type`. In a cluster this waits until Raft commits it.
    pub async fn remove_route(&self, op_type: &str) -> Result<u64, RouteError> {
        self.shared.routes.remove_route(op_type.into()).await
    }

    /// The node's live events.
    pub fn events(&self) -> &Arc<EventBus> {
        &self.shared.events
    }

    /// The node's tracing settings, when operations are traced.
    pub fn tracing(&self) -> Option<&Tracing> {
        self.shared.tracing.as_ref()
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.shared.cache_counters.snapshot()
    }

    /// The node-wide counters, live. For exporters (`/metrics`) that read them when
    /// scraped; the engine alone writes them.
    pub fn metrics(&self) -> &NodeMetrics {
        &self.shared.metrics
    }

    /// Every operation type this node counts, sorted by name: those it has handlers for,
    /// and those it forwards to other nodes of the cluster. Each entry's counters,
    /// latency buckets and queue depth are live, for exporters to read when scraped.
    pub fn type_entries(&self) -> Vec<Arc<TypeEntry>> {
        let s = &self.shared;
        let mut v: Vec<Arc<TypeEntry>> = s
            .registry
            .types()
            .cloned()
            .chain(s.remote_types.iter().map(|e| e.value().clone()))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// How long ago the node started.
    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// Whether the node accepts new operations (false once draining).
    pub fn is_accepting(&self) -> bool {
        self.shared.accepting.load(Ordering::Acquire)
    }

    /// Operations accepted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.shared.metrics.in_flight.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> NodeStats {
        let s = &self.shared;
        let m = &s.metrics;
        let now = Instant::now();
        let mut overall = crate::metrics::new_histogram();
        let mut per_type = BTreeMap::new();
        let mut queued = 0;
        let remote: Vec<Arc<TypeEntry>> =
            s.remote_types.iter().map(|e| e.value().clone()).collect();
        for e in s.registry.types().chain(remote.iter()) {
            e.metrics.merge_latency_into(&mut overall);
            queued += e.queued();
            per_type.insert(e.name.to_string(), e.metrics.snapshot(e.queued()));
        }
        let succeeded = m.succeeded.load(Ordering::Relaxed);
        let completed = m.completed.load(Ordering::Relaxed);
        let cache_stats = s.cache_counters.snapshot();
        NodeStats {
            node_id: s.node_id.to_string(),
            is_running: !s.is_stopping(),
            is_accepting: self.is_accepting(),
            active_operations: m.running.load(Ordering::Relaxed),
            queued_operations: queued,
            in_flight_operations: m.in_flight.load(Ordering::Relaxed),
            completed_operations: completed,
            total_processed: completed,
            total_operations: m.accepted.load(Ordering::Relaxed),
            succeeded_operations: succeeded,
            failed_operations: m.failed.load(Ordering::Relaxed),
            expired_operations: m.expired.load(Ordering::Relaxed),
            rejected_operations: m.rejected.load(Ordering::Relaxed),
            success_rate: if completed == 0 {
                1.0
            } else {
                succeeded as f64 / completed as f64
            },
            throughput: m.throughput(now),
            latency: Latency::of(&overall),
            per_type,
            cache_hit_rate: cache_stats.hit_rate,
            cache_stats,
            actor_restarts: m.actor_restarts.load(Ordering::Acquire),
            batches: m.batches.load(Ordering::Relaxed),
            uptime_seconds: s.started.elapsed().as_secs_f64(),
            timestamp: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }

    /// Stops accepting operations: submissions are refused with
    /// [`SubmitError::ShuttingDown`]; accepted ones go on.
    pub fn stop_accepting(&self) {
        self.shared.accepting.store(false, Ordering::Release);
    }

    /// Waits until every accepted operation has finished, or `grace` has passed.
    /// Returns whether the node is idle.
    pub async fn drain(&self, grace: Duration) -> bool {
        let until = Instant::now() + grace;
        loop {
            if self.in_flight() == 0 {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Drains for up to `grace`, then stops the actors. Operations still unfinished
    /// after the grace period complete as failed ("node shut down"). Returns how many.
    pub async fn shutdown(&self, grace: Duration) -> usize {
        self.stop_accepting();
        self.drain(grace).await;
        let left = self.in_flight();
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.stopped.cancel();
        self.supervisor.stop(Some("node shutdown".into()));
        let join = self.join.lock().take();
        if let Some(j) = join {
            let _ = j.await;
        }
        for cell in [
            self.shared.refs.router.swap(None).map(|r| r.get_cell()),
            self.shared.refs.cache.swap(None).map(|r| r.get_cell()),
            self.shared.refs.scheduler.swap(None).map(|r| r.get_cell()),
            self.shared.refs.executor.swap(None).map(|r| r.get_cell()),
        ]
        .into_iter()
        .flatten()
        {
            cell.stop(Some("node shutdown".into()));
        }
        // Whatever never reached an actor fails here, with the reason, on drop.
        drop(self.shared.intake.take(Vec::new()));
        left
    }

    /// Kills one engine actor, as a crash would; its supervisor restarts it. For tests
    /// and fault drills: only with the `test-util` feature.
    #[cfg(feature = "test-util")]
    pub fn kill_actor(&self, kind: ChildKind) {
        let r = &self.shared.refs;
        let cell = match kind {
            ChildKind::Router => r.router.load().as_ref().map(|a| a.get_cell()),
            ChildKind::Cache => r.cache.load().as_ref().map(|a| a.get_cell()),
            ChildKind::Scheduler => r.scheduler.load().as_ref().map(|a| a.get_cell()),
            ChildKind::Executor => r.executor.load().as_ref().map(|a| a.get_cell()),
        };
        if let Some(c) = cell {
            c.kill();
        }
    }
}
