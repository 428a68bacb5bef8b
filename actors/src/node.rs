//! The [`Node`]: the handle a library user embeds and the binary serves.
//!
//! `Node::builder()` registers handlers and settings, `start()` spawns the supervised
//! actors, and `submit` / `enqueue` admit operations: checked against the limits, the
//! handler registry and the type's queue capacity, then handed to the Router's intake.
//! From there the actors own them until the [`Reply`](crate::job::Reply) completes them.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use ractor::{Actor, ActorRef};
use serde::Serialize;

use crate::admit::Admit;
use crate::breaker::{BreakerPolicy, BreakerStats};
use crate::cache::CacheStats;
use crate::counter::StripedArc;
use crate::events::EventBus;
use crate::handler::{Handler, HandlerRegistry, HandlerResult, RetryPolicy, TypeEntry};
use crate::job::{BatchOutcomes, Job, OutcomeSink, Ticket, Tracked, Waiter};
use crate::metrics::{Latency, NodeMetrics, TypeStats};
use crate::op::{Limits, NodeId, OpId, OpOutcome, OpType, Operation, SubmitError};
use crate::router::{dispatch_local, Forwarder};
use crate::routing::{
    check_route_write, LocalRoutes, NodeView, Route, RouteError, RouteStore, RoutingTable,
};
use crate::scheduler::BatchPolicy;
use crate::shard::{shard_count, ShardThreads};
use crate::shared::{NodeShared, SharedParts};
#[cfg(feature = "test-util")]
use crate::supervisor::ChildKind;
use crate::supervisor::NodeSupervisor;
use crate::trace::Tracing;
use crate::type_limits::{SlotPlan, TypeSettings};

/// Result-cache settings.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub capacity: NonZeroUsize,
    pub ttl: Duration,
    /// Bytes of stored results (keys and results) at most, shared out between the
    /// shards' caches like `capacity`; past it the least recently used go.
    pub max_bytes: usize,
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
    /// Bytes of results (and errors) of finished tracked operations kept at most; the
    /// oldest go first.
    pub result_store_bytes: usize,
    /// A larger result is not kept for `GET /v1/ops/{id}`: its record says it was too
    /// large to store (the submitter waiting for it still gets it).
    pub max_stored_result_bytes: usize,
    /// The retry policy of handlers registered without one.
    pub retry: RetryPolicy,
    /// Most routes the routing table may hold (`cluster.max_routes`): a route for a new
    /// type past it is refused.
    pub max_routes: usize,
    /// Copies of the hot path (Router, Cache, Scheduler, Executor), each owning a share
    /// of the operations; 0 = one per runtime worker thread. See [`crate::shard`].
    pub shards: usize,
    /// Whether each shard's actors run on a thread of their own (a current-thread
    /// runtime), so that an operation submitted on that thread stays on it from the door
    /// to its outcome; otherwise they are tasks of the runtime that starts the node. See
    /// [`crate::shard`].
    pub shard_threads: bool,
    /// Per-type settings (`[types.<type>]`); a type not listed gets the node's defaults.
    /// See [`crate::type_limits`].
    pub types: BTreeMap<String, TypeSettings>,
    /// The share (percent, 1..=100) of the shared running slots that one type without
    /// slots of its own may hold: what keeps one slow type from starving the others.
    pub type_share_percent: u8,
    /// The circuit breaker of every type that sets none of its own (`[breaker]`);
    /// `None`: no breaker.
    pub breaker: Option<BreakerPolicy>,
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
                max_bytes: 64 << 20,
            },
            retention: Duration::from_secs(300),
            retention_max: 100_000,
            result_store_bytes: 64 << 20,
            max_stored_result_bytes: 1 << 20,
            retry: RetryPolicy::default(),
            max_routes: 1_000,
            shards: 0,
            shard_threads: false,
            types: BTreeMap::new(),
            type_share_percent: 50,
            breaker: Some(BreakerPolicy::default()),
        }
    }
}

/// Builds a [`Node`].
pub struct NodeBuilder {
    node_id: NodeId,
    config: EngineConfig,
    registry: HandlerRegistry,
    routes: Option<Arc<dyn RouteStore>>,
    forwarder: Option<Arc<dyn Forwarder>>,
    tracing: Option<Tracing>,
    /// Runtimes the caller owns, one per shard (see [`NodeBuilder::shard_runtimes`]).
    runtimes: Vec<tokio::runtime::Handle>,
}

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("could not start the engine actors: {0}")]
    Spawn(String),
    /// The settings do not fit together (the types' own running slots add up to more
    /// than `max_concurrent`, or leave none for a type that has none of its own).
    #[error("invalid engine settings: {0}")]
    Config(String),
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

    /// Runs the shards' actors on these runtimes, one shard per runtime, instead of on
    /// threads the node starts (`engine.shard_threads`) or on the runtime that starts it:
    /// the binary passes its HTTP workers' runtimes, so that a request's operations stay
    /// on the worker's thread from the door to the answer. Each runtime's thread should
    /// make its shard its home ([`crate::shard::make_home`]). The caller keeps the
    /// runtimes running until the node has shut down; `engine.shards` must be 0 or their
    /// number.
    pub fn shard_runtimes(mut self, runtimes: Vec<tokio::runtime::Handle>) -> Self {
        self.runtimes = runtimes;
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
                    overloaded: Vec::new(),
                    congested: false,
                    open_breakers: Vec::new(),
                }],
            }))
        });
        let adopted = !self.runtimes.is_empty();
        let shards = match (adopted, self.config.shards) {
            (false, n) => shard_count(n),
            (true, 0) => self.runtimes.len(),
            (true, n) if n == self.runtimes.len() => n,
            (true, n) => {
                return Err(StartError::Config(format!(
                    "engine.shards is {n}, but the shards are given {} runtimes to run on \
                     (one shard each)",
                    self.runtimes.len()
                )))
            }
        };
        let plan = SlotPlan::of(&self.config).map_err(StartError::Config)?;
        if plan.shared == 0 {
            let config = &self.config;
            if let Some(t) = self.registry.type_names().into_iter().find(|t| {
                config
                    .types
                    .get(&**t)
                    .is_none_or(|s| s.max_concurrent.is_none())
            }) {
                return Err(StartError::Config(format!(
                    "type `{t}` has no running slots of its own, and the types' own take \
                     all of max_concurrent ({})",
                    config.batch.max_concurrent
                )));
            }
        }
        let threads = match self.config.shard_threads && !adopted {
            true => Some(Arc::new(
                ShardThreads::start(shards).map_err(|e| StartError::Spawn(e.to_string()))?,
            )),
            false => None,
        };
        let runtimes = match &threads {
            Some(t) => t.handles().to_vec(),
            None => self.runtimes,
        };
        let shared = Arc::new(NodeShared::new(
            SharedParts {
                node_id: self.node_id,
                config: self.config,
                registry: self.registry,
                routes,
                forwarder: self.forwarder,
                tracing: self.tracing,
            },
            shards,
            runtimes,
            plan,
        ));
        let (sup, join) = Actor::spawn(None, NodeSupervisor, shared.clone())
            .await
            .map_err(|e| StartError::Spawn(e.to_string()))?;
        tokio::spawn(sweep_store(Arc::downgrade(&shared)));
        Ok(Node {
            anchors: StripedArc::new(shared.clone()),
            shared,
            supervisor: sup,
            join: Arc::new(Mutex::new(Some(join))),
            _threads: threads,
        })
    }
}

/// How often finished records that are too old or over the store's budgets are dropped
/// when nothing else makes the store evict.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Sweeps the node's store every [`SWEEP_EVERY`] until the node stops (or is dropped),
/// and forgets the types the routing table stopped routing when it has changed.
async fn sweep_store(shared: std::sync::Weak<NodeShared>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut version = None;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.stopped().is_cancelled() {
            return;
        }
        shared.store().sweep();
        let now = shared.routes().snapshot().version;
        if version != Some(now) {
            version = Some(now);
            forget_unrouted_types(&shared);
        }
    }
}

/// Drops the entries (counters, latency histograms: a label set each in `/metrics`) of
/// the types this node forwards and the routing table no longer routes: no route and no
/// node that serves them. So the types a cluster ever saw do not pile up; a type routed
/// again later starts a new entry. Operations of the type still in flight finish
/// uncounted.
fn forget_unrouted_types(shared: &NodeShared) {
    let table = shared.routes().snapshot();
    shared.remote_types().retain(|t, _| table.routes_type(t));
}

/// A running node. Cheap to clone; every clone drives the same engine.
#[derive(Clone)]
pub struct Node {
    shared: Arc<NodeShared>,
    /// What each accepted operation holds on to (see [`StripedArc`]).
    anchors: StripedArc<NodeShared>,
    supervisor: ActorRef<()>,
    join: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
    /// The shards' own threads (`engine.shard_threads`), stopped with the last handle.
    _threads: Option<Arc<ShardThreads>>,
}

/// How a node's running slots are shared out (see [`crate::type_limits`]).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SlotStats {
    /// `max_concurrent`: operations running at once at most, all types.
    pub max_concurrent: usize,
    /// Slots the types without their own share (`max_concurrent` less the types' own).
    pub shared: usize,
    /// Of those, taken now.
    pub shared_running: usize,
    /// Of those, one type may hold at most (`type_share_percent`).
    pub per_type: usize,
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
    /// Operations each shard of the hot path took, in shard order: how evenly the work
    /// spreads over the cores.
    pub shard_operations: Vec<u64>,
    /// Bytes of results (and errors) of finished operations kept for
    /// `GET /v1/ops/{id}` (at most `result_store_bytes`).
    pub result_store_bytes: usize,
    /// How the running slots are shared out between types.
    pub slots: SlotStats,
    /// Every circuit breaker, once (types that share one appear in its `types`).
    pub breakers: Vec<BreakerStats>,
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
            runtimes: Vec::new(),
        }
    }

    pub fn id(&self) -> &NodeId {
        self.shared.node_id()
    }

    /// The runtimes of the shards' own threads (`engine.shard_threads`; empty without).
    /// A caller that submits from one of them (spawned there with
    /// [`Handle::spawn`](tokio::runtime::Handle::spawn)) has its operations stay on that
    /// thread from the door to their outcome: the in-process bench spreads its drivers
    /// over them.
    pub fn shard_runtimes(&self) -> &[tokio::runtime::Handle] {
        self.shared.shards().runtimes()
    }

    pub fn config(&self) -> &EngineConfig {
        self.shared.config()
    }

    /// The operation types this node has handlers for.
    pub fn handler_types(&self) -> Vec<String> {
        self.shared
            .registry()
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
        let (job, ticket) =
            self.shared
                .admit(&self.anchors, op, track, Admit::Routed, Instant::now())?;
        self.shared.hand_one_to_router(job);
        Ok(ticket)
    }

    /// Accepts many operations at once (one trip to the Router). Each is accepted or
    /// refused on its own; the answers are in the same order.
    pub fn enqueue_batch(
        &self,
        ops: Vec<Operation>,
        track: bool,
    ) -> Vec<Result<Ticket, SubmitError>> {
        let mut door = self
            .shared
            .door(&self.anchors, Admit::Routed, Instant::now());
        self.start_batch(ops, |_, op| door.admit(op, track))
    }

    /// Accepts a batch like [`enqueue_batch`](Self::enqueue_batch) (untracked) for a
    /// caller that waits for all of it: answers whether each was accepted, in order, and
    /// a future of the outcomes, in the same order (`None` for those refused). Cheaper
    /// per operation than a [`Ticket`] each.
    ///
    /// `ops` may build each operation as it is taken (the api reads each from its entry
    /// as the door takes it); its size hint's upper bound, when it has one, sizes the lists.
    pub fn enqueue_batch_waited(
        &self,
        ops: impl IntoIterator<Item = Operation>,
    ) -> (Vec<Result<(), SubmitError>>, BatchOutcomes) {
        let ops = ops.into_iter();
        let mut door = self
            .shared
            .door(&self.anchors, Admit::Routed, Instant::now());
        let outcomes = BatchOutcomes::new(bound(&ops));
        let accepted = self.start_batch(ops, |i, op| {
            door.admit_to(op, false, || outcomes.waiter(i))
                .map(|(job, _)| (job, ()))
        });
        outcomes.fit(accepted.len());
        (accepted, outcomes)
    }

    /// Admits each of `ops` with `admit` (given its index) and hands the accepted ones to
    /// the Router in one trip; answers what `admit` gave for each, in order.
    fn start_batch<T>(
        &self,
        ops: impl IntoIterator<Item = Operation>,
        mut admit: impl FnMut(usize, Operation) -> Result<(Box<Job>, T), SubmitError>,
    ) -> Vec<Result<T, SubmitError>> {
        let ops = ops.into_iter();
        let mut jobs = Vec::with_capacity(bound(&ops));
        let answers = ops
            .enumerate()
            .map(|(i, op)| {
                admit(i, op).map(|(job, t)| {
                    jobs.push(job);
                    t
                })
            })
            .collect();
        if !jobs.is_empty() {
            self.shared.hand_to_router(jobs);
        }
        answers
    }

    /// Accepts operations like [`enqueue_batch`](Self::enqueue_batch) (tracked when
    /// `track`), but hands the accepted ones back instead of starting them: the caller
    /// does what must come before they run (the binary writes them to its journal), then
    /// starts them with [`dispatch`](Self::dispatch). Each holds its queue slot and counts
    /// in flight meanwhile. A job the caller cannot start must be completed, say with
    /// `job.reply.fail(..)`: one merely dropped fails as lost. Answers in the same order.
    pub fn admit_batch(
        &self,
        ops: Vec<Operation>,
        track: bool,
    ) -> Vec<Result<(Box<Job>, Ticket), SubmitError>> {
        let mut door = self
            .shared
            .door(&self.anchors, Admit::Routed, Instant::now());
        ops.into_iter().map(|op| door.admit(op, track)).collect()
    }

    /// Starts operations accepted by [`admit_batch`](Self::admit_batch): hands them to
    /// the Router, which picks their owner.
    pub fn dispatch(&self, jobs: Vec<Box<Job>>) {
        if !jobs.is_empty() {
            self.shared.hand_to_router(jobs);
        }
    }

    /// Keeps `outcome` readable through [`status`](Self::status) as the end of `op`,
    /// which never ran on this node: an operation accepted before a restart (the
    /// binary's journal) that can no longer run, its deadline passed or its type gone.
    /// Counts nowhere else: the operation was counted by the node that accepted it.
    pub fn record_outcome(&self, op: &Operation, outcome: OpOutcome) {
        let t = Arc::new(Tracked::new(op, op.trace_context.map(|c| c.trace_id)));
        self.shared.store().insert(t.clone());
        let outcome = OpOutcome {
            id: op.id,
            ..outcome
        };
        self.shared.store().finished(&t, outcome);
    }

    /// Runs operations that another node routed here: they are checked against this
    /// node's handlers and queues and go straight to its Cache/Scheduler, never routed
    /// again (the origin already chose this node). The outcome of each accepted one goes
    /// to `sink` (no ticket per operation); answers whether each was accepted, in the
    /// same order. `ops` is taken as an iterator so that each operation is built (from
    /// its wire form) straight into its place, not first into a list.
    pub fn enqueue_forwarded(
        &self,
        ops: impl ExactSizeIterator<Item = Operation>,
        sink: &Arc<dyn OutcomeSink>,
    ) -> Vec<Result<(), SubmitError>> {
        let mut door = self.shared.door(&self.anchors, Admit::Here, Instant::now());
        let mut jobs = Vec::with_capacity(ops.len());
        let accepted = ops
            .map(|op| {
                door.admit_to(op, false, || Waiter::Sink(Arc::clone(sink)))
                    .map(|(job, _)| jobs.push(job))
            })
            .collect();
        dispatch_local(&self.shared, jobs);
        accepted
    }

    /// Routes accepted operations again: the cluster layer hands back what it had
    /// forwarded to a node that went down. They keep their ids, deadlines and waiters.
    pub fn reroute(&self, jobs: Vec<Box<Job>>) {
        if !jobs.is_empty() {
            self.shared.hand_to_router(jobs);
        }
    }

    /// Bytes of results (and errors) of finished operations kept for `status`.
    pub fn result_store_bytes(&self) -> usize {
        self.shared.store().bytes()
    }

    /// The record of a tracked operation, while it runs and for the retention period.
    pub fn status(&self, id: &OpId) -> Option<Arc<Tracked>> {
        self.shared.store().get(id)
    }

    /// The current routing table.
    pub fn routes(&self) -> Arc<RoutingTable> {
        self.shared.routes().snapshot()
    }

    /// Sets the route of `op_type`. In a cluster this waits until Raft commits it. The
    /// audit trail records it as this node's own change (`node:<id>`). Refused when no
    /// node serves the type ([`RouteError::NoRoute`]) and, for a type without a route,
    /// when the table holds `max_routes` routes ([`RouteError::TooManyRoutes`]).
    pub async fn set_route(&self, op_type: &str, route: Route) -> Result<u64, RouteError> {
        self.set_route_as(op_type, route, &self.by_me()).await
    }

    /// Who this node is in the audit trail.
    fn by_me(&self) -> String {
        format!("node:{}", self.id())
    }

    /// [`set_route`](Self::set_route), asked for by `by` (an API token's name), as the
    /// audit trail records it.
    pub async fn set_route_as(
        &self,
        op_type: &str,
        route: Route,
        by: &str,
    ) -> Result<u64, RouteError> {
        crate::op::validate_type_name(op_type, self.shared.config().limits.max_type_len).map_err(
            |e| RouteError::Invalid {
                field: "type",
                reason: match e {
                    SubmitError::Invalid { reason, .. } => reason,
                    other => other.to_string(),
                },
            },
        )?;
        check_route_write(
            &self.shared.routes().snapshot(),
            op_type,
            self.shared.config().max_routes,
        )?;
        self.shared
            .routes()
            .set_route(op_type.into(), route, by.into())
            .await
    }

    /// Removes the route of `op_type`. In a cluster this waits until Raft commits it.
    pub async fn remove_route(&self, op_type: &str) -> Result<u64, RouteError> {
        self.remove_route_as(op_type, &self.by_me()).await
    }

    /// [`remove_route`](Self::remove_route), asked for by `by`. A type this node forwards
    /// and nothing routes any more loses its metrics entry (on other nodes of a cluster,
    /// within a second of applying the change).
    pub async fn remove_route_as(&self, op_type: &str, by: &str) -> Result<u64, RouteError> {
        let version = self
            .shared
            .routes()
            .remove_route(op_type.into(), by.into())
            .await?;
        forget_unrouted_types(&self.shared);
        Ok(version)
    }

    /// The newest `limit` changes of the routing table (and, in a cluster, of the node
    /// registry), newest first, with who made them and when.
    pub fn audit(&self, limit: usize) -> Vec<crate::routing::AuditEntry> {
        self.shared.routes().audit(limit)
    }

    /// The node's live events.
    pub fn events(&self) -> &Arc<EventBus> {
        self.shared.events()
    }

    /// The node's tracing settings, when operations are traced.
    pub fn tracing(&self) -> Option<&Tracing> {
        self.shared.tracing()
    }

    pub fn cache_stats(&self) -> CacheStats {
        self.shared.cache_counters().snapshot()
    }

    /// The node-wide counters, live. For exporters (`/metrics`) that read them when
    /// scraped; the engine alone writes them.
    pub fn metrics(&self) -> &NodeMetrics {
        self.shared.metrics()
    }

    /// Operations whose handler runs now: the running slots the Schedulers took, all
    /// types, at most `max_concurrent`. Live, for exporters to read when scraped.
    pub fn running(&self) -> usize {
        self.shared.running()
    }

    /// Every circuit breaker of the node, once each (types that share one are in its
    /// `types`). Live, for exporters.
    pub fn breakers(&self) -> Vec<Arc<crate::breaker::TypeBreaker>> {
        self.shared.breakers().to_vec()
    }

    /// How the running slots are shared out: the plan, and the shared slots taken now.
    pub fn slot_stats(&self) -> SlotStats {
        let (plan, shared) = self.shared.slot_plan();
        SlotStats {
            max_concurrent: self.config().batch.max_concurrent,
            shared: plan.shared,
            shared_running: shared.count(),
            per_type: plan.per_type,
        }
    }

    /// Every operation type this node counts, sorted by name: those it has handlers for,
    /// and those it forwards to other nodes of the cluster. Each entry's counters,
    /// latency buckets and queue depth are live, for exporters to read when scraped.
    pub fn type_entries(&self) -> Vec<Arc<TypeEntry>> {
        let s = &self.shared;
        let mut v: Vec<Arc<TypeEntry>> = s
            .registry()
            .types()
            .cloned()
            .chain(s.remote_types().iter().map(|e| e.value().get().clone()))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// How many shards the hot path runs in (`EngineConfig::shards`, resolved).
    pub fn shards(&self) -> usize {
        self.shared.shards().len()
    }

    /// Operations each shard took so far, in shard order. Live, for exporters.
    pub fn shard_operations(&self) -> Vec<u64> {
        self.shared.shards().took()
    }

    /// How long ago the node started.
    pub fn uptime(&self) -> Duration {
        self.shared.uptime()
    }

    /// Whether the node accepts new operations (false once draining).
    pub fn is_accepting(&self) -> bool {
        self.shared.is_accepting()
    }

    /// Operations accepted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight()
    }

    pub fn stats(&self) -> NodeStats {
        let s = &self.shared;
        let m = s.metrics();
        let now = Instant::now();
        let mut overall = crate::metrics::new_histogram();
        let mut per_type = BTreeMap::new();
        let mut queued = 0;
        let remote: Vec<Arc<TypeEntry>> = s
            .remote_types()
            .iter()
            .map(|e| e.value().get().clone())
            .collect();
        for e in s.registry().types().chain(remote.iter()) {
            e.metrics.merge_latency_into(&mut overall);
            queued += e.queued();
            per_type.insert(e.name.to_string(), TypeStats::of(e, now));
        }
        let succeeded = m.succeeded.get();
        let completed = m.completed.get();
        let cache_stats = s.cache_counters().snapshot();
        NodeStats {
            node_id: s.node_id().to_string(),
            is_running: !s.is_stopping(),
            is_accepting: self.is_accepting(),
            active_operations: s.running(),
            queued_operations: queued,
            in_flight_operations: m.in_flight(),
            completed_operations: completed,
            total_processed: completed,
            total_operations: m.accepted.get(),
            succeeded_operations: succeeded,
            failed_operations: m.failed.get(),
            expired_operations: m.expired.get(),
            rejected_operations: m.rejected.get(),
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
            shard_operations: s.shards().took(),
            result_store_bytes: s.store().bytes(),
            slots: self.slot_stats(),
            breakers: s.breaker_stats(),
            uptime_seconds: s.uptime().as_secs_f64(),
            timestamp: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }

    /// Stops accepting operations: submissions are refused with
    /// [`SubmitError::ShuttingDown`]; accepted ones go on.
    pub fn stop_accepting(&self) {
        self.shared.stop_accepting();
    }

    /// Waits until every accepted operation has finished, or `grace` has passed.
    /// Returns whether the node is idle. Woken by the last operation to finish, not by
    /// polling.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.shared.wait_idle(Instant::now() + grace).await
    }

    /// Drains for up to `grace`, then stops the actors. Operations still unfinished
    /// after the grace period complete as failed ("node shut down"). Returns how many.
    pub async fn shutdown(&self, grace: Duration) -> usize {
        self.stop_accepting();
        self.drain(grace).await;
        let left = self.in_flight();
        self.shared.stop();
        self.supervisor.stop(Some("node shutdown".into()));
        let join = self.join.lock().take();
        if let Some(j) = join {
            let _ = j.await;
        }
        for cell in self.shared.take_actors() {
            cell.stop(Some("node shutdown".into()));
        }
        // Whatever never reached an actor fails here, with the reason, on drop.
        for shard in self.shared.shards().iter() {
            drop(shard.intake.take(Vec::new()));
        }
        left
    }

    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<NodeShared> {
        &self.shared
    }

    /// Admits `op` as if another node had routed it here, and returns the job instead of
    /// handing it to an actor: for unit tests that drive one step by hand.
    #[cfg(test)]
    pub(crate) fn admit_for_test(&self, op: Operation) -> Box<Job> {
        let admitted = self
            .shared
            .admit(&self.anchors, op, false, Admit::Here, Instant::now());
        admitted.map(|(job, _)| job).expect("admitted")
    }

    /// Kills the engine actor of `kind` in the first shard, as a crash would; its
    /// supervisor restarts it. For tests and fault drills: only with the `test-util`
    /// feature.
    #[cfg(feature = "test-util")]
    pub fn kill_actor(&self, kind: ChildKind) {
        self.kill_shard_actor(0, kind);
    }

    /// Kills the engine actor of `kind` in `shard` (nothing when there is no such
    /// shard), as a crash would. Only with the `test-util` feature.
    #[cfg(feature = "test-util")]
    pub fn kill_shard_actor(&self, shard: usize, kind: ChildKind) {
        if let Some(c) = self.shared.actor(shard, kind) {
            c.kill();
        }
    }
}

/// How many items `it` yields at most, as far as its size hint tells (else at least).
fn bound(it: &impl Iterator) -> usize {
    let (low, high) = it.size_hint();
    high.unwrap_or(low)
}
