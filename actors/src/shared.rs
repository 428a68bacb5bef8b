//! [`NodeShared`]: what the [`Node`](crate::Node) handle and its actors share, private
//! to the engine.
//!
//! Actors reach the node's settings, counters and each other through its methods: a
//! message to another actor goes to the actor of the same [shard](crate::shard) through
//! the current ref in a swap cell, so a restarted actor is reached without anyone
//! noticing; the lifecycle (accepting, stopping, stopped)
//! and the wait for an idle node (`drain`) live here too. The hot path reads plain fields
//! through inlined getters: no lock, no extra atomic.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use ractor::{ActorCell, ActorRef};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::cache::{CacheCounters, CacheKey, CacheMsg};
use crate::counter::StripedArc;
use crate::events::EventBus;
use crate::executor::ExecutorMsg;
use crate::handler::{HandlerRegistry, TypeEntry};
use crate::job::{Job, OpStore};
use crate::metrics::NodeMetrics;
use crate::node::EngineConfig;
use crate::op::{NodeId, OpOutcome, OpType};
use crate::router::{Forwarder, RouterMsg};
use crate::routing::RouteStore;
use crate::scheduler::SchedulerMsg;
use crate::shard::{key_shard, split, Shards};
use crate::slots::RunningSlots;
#[cfg(feature = "test-util")]
use crate::supervisor::ChildKind;
use crate::trace::Tracing;

/// Waiters for an idle node (no operation in flight). Whoever finishes the last operation
/// in flight wakes them, and only when there are any: the hot path reads one counter.
#[derive(Default)]
struct Idle {
    waiters: AtomicUsize,
    notify: Notify,
}

/// Counts a waiter of [`Idle`] for as long as it lives.
struct IdleWaiter<'a>(&'a Idle);

impl<'a> IdleWaiter<'a> {
    fn new(idle: &'a Idle) -> Self {
        idle.waiters.fetch_add(1, Ordering::SeqCst);
        IdleWaiter(idle)
    }
}

impl Drop for IdleWaiter<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a [`NodeShared`] is built from: the builder's settings and plug-ins.
pub(crate) struct SharedParts {
    pub node_id: NodeId,
    pub config: EngineConfig,
    pub registry: HandlerRegistry,
    pub routes: Arc<dyn RouteStore>,
    pub forwarder: Option<Arc<dyn Forwarder>>,
    pub tracing: Option<Tracing>,
}

/// State shared by the node handle and its actors.
pub(crate) struct NodeShared {
    node_id: NodeId,
    config: EngineConfig,
    registry: HandlerRegistry,
    metrics: NodeMetrics,
    cache_counters: Arc<CacheCounters>,
    routes: Arc<dyn RouteStore>,
    forwarder: Option<Arc<dyn Forwarder>>,
    /// Sampling and the span sink, when operations are traced.
    tracing: Option<Tracing>,
    /// Live events for watchers.
    events: Arc<EventBus>,
    /// Types this node accepts and forwards but has no handler for (cluster only).
    remote_types: DashMap<OpType, StripedArc<TypeEntry>>,
    store: OpStore,
    /// The copies of the hot path: intakes and actors.
    shards: Shards,
    running: RunningSlots,
    idle: Idle,
    accepting: AtomicBool,
    stopping: AtomicBool,
    /// Cancelled when the grace period is over: running handlers are abandoned.
    stopped: CancellationToken,
    started: Instant,
}

fn send<M: ractor::Message>(cell: &ArcSwapOption<ActorRef<M>>, msg: M) {
    // A failed send drops the message; the jobs in it complete as failed on drop.
    if let Some(r) = cell.load().as_ref() {
        let _ = r.cast(msg);
    }
}

impl NodeShared {
    /// A node of `shards` shards (at least one).
    pub(crate) fn new(parts: SharedParts, shards: usize) -> Self {
        NodeShared {
            store: OpStore::new(crate::job::StoreLimits {
                retention: parts.config.retention,
                max_entries: parts.config.retention_max,
                max_bytes: parts.config.result_store_bytes,
                max_result_bytes: parts.config.max_stored_result_bytes,
            }),
            node_id: parts.node_id,
            config: parts.config,
            registry: parts.registry,
            metrics: NodeMetrics::default(),
            cache_counters: Arc::new(CacheCounters::default()),
            routes: parts.routes,
            forwarder: parts.forwarder,
            tracing: parts.tracing,
            events: Arc::new(EventBus::default()),
            remote_types: DashMap::new(),
            shards: Shards::new(shards),
            running: RunningSlots::new(shards.max(1)),
            idle: Idle::default(),
            accepting: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            stopped: CancellationToken::new(),
            started: Instant::now(),
        }
    }

    // Settings and plug-ins.

    pub(crate) fn node_id(&self) -> &NodeId {
        &self.node_id
    }
    pub(crate) fn config(&self) -> &EngineConfig {
        &self.config
    }
    pub(crate) fn registry(&self) -> &HandlerRegistry {
        &self.registry
    }
    pub(crate) fn routes(&self) -> &Arc<dyn RouteStore> {
        &self.routes
    }
    pub(crate) fn forwarder(&self) -> Option<&Arc<dyn Forwarder>> {
        self.forwarder.as_ref()
    }
    pub(crate) fn tracing(&self) -> Option<&Tracing> {
        self.tracing.as_ref()
    }

    // Counters and records.

    pub(crate) fn metrics(&self) -> &NodeMetrics {
        &self.metrics
    }
    pub(crate) fn cache_counters(&self) -> &Arc<CacheCounters> {
        &self.cache_counters
    }
    pub(crate) fn events(&self) -> &Arc<EventBus> {
        &self.events
    }
    pub(crate) fn store(&self) -> &OpStore {
        &self.store
    }
    pub(crate) fn remote_types(&self) -> &DashMap<OpType, StripedArc<TypeEntry>> {
        &self.remote_types
    }
    /// The node's running slots (the Scheduler takes them).
    pub(crate) fn running(&self) -> &RunningSlots {
        &self.running
    }

    // Shards and messages to their actors.

    pub(crate) fn shards(&self) -> &Shards {
        &self.shards
    }

    /// Adds accepted jobs to their shards' intakes, waking each Router that was idle.
    pub(crate) fn hand_to_router(&self, jobs: Vec<Box<Job>>) {
        split(self.shards.len(), jobs, |s, jobs| self.push_intake(s, jobs));
    }
    /// [`hand_to_router`](Self::hand_to_router) for one job, without a buffer.
    pub(crate) fn hand_one_to_router(&self, job: Box<Job>) {
        self.push_intake(job.shard, [job]);
    }
    fn push_intake(&self, s: usize, jobs: impl IntoIterator<Item = Box<Job>>) {
        let shard = self.shards.get(s);
        if shard.intake.push(jobs) {
            send(&shard.refs.router, RouterMsg::Drain);
        }
    }
    pub(crate) fn send_scheduler(&self, shard: usize, msg: SchedulerMsg) {
        send(&self.shards.get(shard).refs.scheduler, msg)
    }
    pub(crate) fn send_executor(&self, shard: usize, msg: ExecutorMsg) {
        send(&self.shards.get(shard).refs.executor, msg)
    }
    pub(crate) fn send_cache(&self, shard: usize, msg: CacheMsg) {
        send(&self.shards.get(shard).refs.cache, msg)
    }
    /// A keyed operation finished: tells the Cache of its key's shard.
    pub(crate) fn cache_completed(&self, key: CacheKey, outcome: OpOutcome) {
        let shard = key_shard(self.shards.len(), &key.op_type, &key.key);
        self.send_cache(shard, CacheMsg::Completed { key, outcome })
    }
    /// Running operations finished: give their slots back and wake the Schedulers that
    /// wait for one.
    pub(crate) fn running_slots_freed(&self, n: usize) {
        self.running.give_back(n, |shard| {
            self.send_scheduler(shard, SchedulerMsg::SlotsFreed)
        });
    }

    // The actors themselves (the supervisor installs them).

    pub(crate) fn install_router(&self, shard: usize, r: ActorRef<RouterMsg>) {
        self.shards.get(shard).refs.router.store(Some(Arc::new(r)));
    }
    pub(crate) fn install_cache(&self, shard: usize, r: ActorRef<CacheMsg>) {
        self.shards.get(shard).refs.cache.store(Some(Arc::new(r)));
    }
    pub(crate) fn install_scheduler(&self, shard: usize, r: ActorRef<SchedulerMsg>) {
        self.shards
            .get(shard)
            .refs
            .scheduler
            .store(Some(Arc::new(r)));
    }
    pub(crate) fn install_executor(&self, shard: usize, r: ActorRef<ExecutorMsg>) {
        self.shards
            .get(shard)
            .refs
            .executor
            .store(Some(Arc::new(r)));
    }

    /// The current actor of `kind` in `shard`, if it runs.
    #[cfg(feature = "test-util")]
    pub(crate) fn actor(&self, shard: usize, kind: ChildKind) -> Option<ActorCell> {
        (shard < self.shards.len()).then(|| self.shards.get(shard).refs.cell(kind))?
    }

    /// Forgets every actor of every shard (at shutdown); returns those that ran, to be
    /// stopped.
    pub(crate) fn take_actors(&self) -> Vec<ActorCell> {
        self.shards.iter().flat_map(|s| s.refs.take()).collect()
    }

    // Lifecycle.

    pub(crate) fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
    }
    pub(crate) fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Release);
    }
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
    /// The grace period is over: supervision stops restarting, running handlers are
    /// abandoned.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stopped.cancel();
    }
    /// Cancelled by [`stop`](Self::stop).
    pub(crate) fn stopped(&self) -> &CancellationToken {
        &self.stopped
    }
    pub(crate) fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    // Operations in flight.

    /// An operation was accepted.
    pub(crate) fn op_accepted(&self) {
        self.metrics.accepted.inc();
        self.metrics.in_flight.add(1, Ordering::SeqCst);
    }

    /// An accepted operation has completed; wakes [`wait_idle`](Self::wait_idle) when
    /// someone waits and none is left in flight.
    pub(crate) fn op_finished(&self) {
        // SeqCst with `wait_idle`: either it sees this count, or this sees its waiter.
        // The in-flight count is striped: of two last operations finishing at once, the
        // later one in that order sees both gone.
        self.metrics.in_flight.add(-1, Ordering::SeqCst);
        if self.idle.waiters.load(Ordering::SeqCst) > 0
            && self.metrics.in_flight.get(Ordering::SeqCst) == 0
        {
            self.idle.notify.notify_waiters();
        }
    }

    /// Operations accepted and not yet completed.
    pub(crate) fn in_flight(&self) -> usize {
        self.metrics.in_flight()
    }

    /// Waits until no operation is in flight, or `until`. Returns whether the node is
    /// idle. Woken by the last completion, never by polling. While the node still
    /// accepts, "idle" is a moment: an operation accepted meanwhile may or may not count.
    pub(crate) async fn wait_idle(&self, until: Instant) -> bool {
        let _waiter = IdleWaiter::new(&self.idle);
        loop {
            let notified = self.idle.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a completion after it wakes this one.
            notified.as_mut().enable();
            if self.metrics.in_flight.get(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(until.into(), notified)
                .await
                .is_err()
            {
                return self.in_flight() == 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crate::{Json, Node, Operation};

    async fn sleepy(op: Operation) -> crate::HandlerResult {
        let ms: u64 = op.payload.decode().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(Json::null())
    }

    #[tokio::test]
    async fn drain_wakes_when_the_last_operation_finishes() {
        let node = Node::builder().handler("s", sleepy).start().await.unwrap();
        assert!(node.drain(Duration::ZERO).await, "idle at once");
        let ms = |v: u64| Json::encode(&v).unwrap();
        let long = node.enqueue(Operation::new("s", ms(300))).unwrap();
        let t0 = Instant::now();
        assert!(
            !node.drain(Duration::from_millis(30)).await,
            "still running"
        );
        assert!(t0.elapsed() >= Duration::from_millis(30));
        // Several waiters at once, all woken by the one completion.
        let (a, b) = tokio::join!(
            node.drain(Duration::from_secs(10)),
            node.drain(Duration::from_secs(10))
        );
        assert!(a && b);
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(long.await.status.is_final());
        assert_eq!(node.in_flight(), 0);
        node.shutdown(Duration::from_secs(1)).await;
    }
}
