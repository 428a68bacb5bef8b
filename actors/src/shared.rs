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
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use ractor::{ActorCell, ActorRef};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::breaker::{Admission, BreakerStats, Transition, TypeBreaker};
use crate::cache::{CacheCounters, CacheKey, CacheMsg};
use crate::counter::{stripe, stripes, Padded, StripedArc};
use crate::events::{now_ms, Event, EventBus, EventKind};
use crate::executor::ExecutorMsg;
use crate::handler::{HandlerRegistry, TypeEntry};
use crate::job::{Job, OpStore};
use crate::metrics::NodeMetrics;
use crate::node::EngineConfig;
use crate::op::{NodeId, OpOutcome, OpType, SubmitError};
use crate::router::{Forwarder, RouterMsg};
use crate::routing::RouteStore;
use crate::scheduler::SchedulerMsg;
use crate::shard::{key_shard, split, Shards};
use crate::slots::{take_running, RunningSlots};
#[cfg(feature = "test-util")]
use crate::supervisor::ChildKind;
use crate::trace::Tracing;
use crate::type_limits::{SlotPlan, TypeLimits};

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
    /// The node's name again, one copy per stripe, each allocated by the first thread to
    /// take it (so on a page of that thread's): what every outcome carries as
    /// `executed_by` is cloned and dropped once per operation, and the one `Arc` cloned by
    /// every core was a cache line moved between them each time (a twentieth of the
    /// two-core in-process run, with the route checks that read its bytes).
    names: Box<[Padded<OnceLock<NodeId>>]>,
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
    remote_types: DashMap<OpType, StripedArc<TypeEntry>, foldhash::fast::RandomState>,
    store: OpStore,
    /// The copies of the hot path: intakes and actors.
    shards: Shards,
    /// How the running slots are shared out between types.
    plan: SlotPlan,
    /// The running slots the types without their own share.
    shared_slots: RunningSlots,
    /// Every breaker, once (types of a group share one), by name.
    breakers: Vec<Arc<TypeBreaker>>,
    idle: Idle,
    accepting: AtomicBool,
    stopping: AtomicBool,
    /// Cancelled when the grace period is over: running handlers are abandoned.
    stopped: CancellationToken,
    started: Instant,
}

/// The breakers of a node's types: one per type, except types of one
/// `breaker_group`, which share one named after the group (the first type's policy).
fn make_breakers(config: &EngineConfig, registry: &HandlerRegistry) -> Vec<Arc<TypeBreaker>> {
    let mut groups: Vec<(String, Vec<OpType>, crate::breaker::BreakerPolicy)> = Vec::new();
    for name in registry.type_names() {
        let settings = config.types.get(&*name);
        let Some(policy) = TypeLimits::breaker_policy(config, settings) else {
            continue;
        };
        let group = settings
            .and_then(|s| s.breaker_group.clone())
            .unwrap_or_else(|| name.to_string());
        match groups.iter_mut().find(|(g, _, _)| *g == group) {
            Some((_, types, _)) => types.push(name),
            None => groups.push((group, vec![name], policy)),
        }
    }
    groups
        .into_iter()
        .map(|(name, types, policy)| Arc::new(TypeBreaker::new(name, types, policy)))
        .collect()
}

fn send<M: ractor::Message>(cell: &ArcSwapOption<ActorRef<M>>, msg: M) {
    // A failed send drops the message; the jobs in it complete as failed on drop.
    if let Some(r) = cell.load().as_ref() {
        let _ = r.cast(msg);
    }
}

impl NodeShared {
    /// A node of `shards` shards (at least one), whose running slots are shared out by
    /// `plan` (checked by the caller: [`SlotPlan::of`]).
    /// `runtimes`: each shard's own runtime (`engine.shard_threads`), or none.
    pub(crate) fn new(
        mut parts: SharedParts,
        shards: usize,
        runtimes: Vec<tokio::runtime::Handle>,
        plan: SlotPlan,
    ) -> Self {
        let shards = shards.max(1);
        let breakers = make_breakers(&parts.config, &parts.registry);
        let config = &parts.config;
        parts.registry.bind(|name| {
            let breaker = breakers.iter().find(|b| b.types.contains(name)).cloned();
            TypeLimits::resolve(config, config.types.get(&**name), plan, shards, breaker)
        });
        NodeShared {
            store: OpStore::new(crate::job::StoreLimits {
                retention: parts.config.retention,
                max_entries: parts.config.retention_max,
                max_bytes: parts.config.result_store_bytes,
                max_result_bytes: parts.config.max_stored_result_bytes,
            }),
            node_id: parts.node_id,
            names: (0..stripes()).map(|_| Padded::default()).collect(),
            config: parts.config,
            registry: parts.registry,
            metrics: NodeMetrics::default(),
            cache_counters: Arc::new(CacheCounters::default()),
            routes: parts.routes,
            forwarder: parts.forwarder,
            tracing: parts.tracing,
            events: Arc::new(EventBus::default()),
            remote_types: DashMap::default(),
            shards: Shards::new(shards, runtimes),
            plan,
            shared_slots: RunningSlots::new(shards, plan.shared),
            breakers,
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

    /// This node's name, for an outcome to carry: a reference counted on the calling
    /// thread's stripe, not on [`node_id`](Self::node_id)'s.
    pub(crate) fn node_name(&self) -> NodeId {
        self.names[stripe()]
            .get_or_init(|| NodeId::from(&*self.node_id))
            .clone()
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
    pub(crate) fn remote_types(
        &self,
    ) -> &DashMap<OpType, StripedArc<TypeEntry>, foldhash::fast::RandomState> {
        &self.remote_types
    }
    /// Operations running now, all types: those on the shared slots, and those of each
    /// type with slots of its own.
    pub(crate) fn running(&self) -> usize {
        self.shared_slots.count()
            + self
                .registry
                .types()
                .filter(|e| e.has_own_slots())
                .map(|e| e.running())
                .sum::<usize>()
    }

    /// How the running slots are shared out, and the shared ones.
    pub(crate) fn slot_plan(&self) -> (SlotPlan, &RunningSlots) {
        (self.plan, &self.shared_slots)
    }

    /// The limits of a type this node learns of as it runs (one it forwards).
    pub(crate) fn limits_of(&self, op_type: &OpType) -> TypeLimits {
        let c = &self.config;
        TypeLimits::resolve(
            c,
            c.types.get(&**op_type),
            self.plan,
            self.shards.len(),
            None,
        )
    }

    /// Every breaker of the node, once each.
    pub(crate) fn breakers(&self) -> &[Arc<TypeBreaker>] {
        &self.breakers
    }

    /// Refuses an operation of `entry`'s type submitted at `now` while its breaker is
    /// open.
    #[inline]
    pub(crate) fn breaker_admits(
        &self,
        entry: &TypeEntry,
        now: Instant,
    ) -> Result<(), SubmitError> {
        let Some(b) = entry.breaker() else {
            return Ok(());
        };
        let (admission, moved) = b.admit(now);
        if let Some(t) = moved {
            self.breaker_moved(b, t);
        }
        match admission {
            Admission::Admit => Ok(()),
            Admission::Refuse { retry_after } => Err(SubmitError::CircuitOpen {
                op_type: entry.name.to_string(),
                breaker: (b.types.len() > 1 || *b.name != *entry.name).then(|| b.name.clone()),
                retry_after,
            }),
        }
    }

    /// An operation of `entry`'s type ran: `ok`, or failed in a way that counts against
    /// its breaker (see [`crate::breaker`]).
    #[inline]
    pub(crate) fn breaker_record(&self, entry: &TypeEntry, ok: bool) {
        let Some(b) = entry.breaker() else { return };
        if ok && b.is_closed() {
            return;
        }
        if let Some(t) = b.record(Instant::now(), ok) {
            self.breaker_moved(b, t);
        }
    }

    /// Logs a breaker's change of state and publishes it (`breaker:opened`,
    /// `breaker:closed`).
    #[cold]
    fn breaker_moved(&self, b: &TypeBreaker, t: Transition) {
        let (kind, state, failures, retry_at) = match t {
            Transition::Opened { failures, until } => {
                let secs = until
                    .saturating_duration_since(Instant::now())
                    .as_secs_f64();
                tracing::warn!(breaker = %b.name, types = ?b.types, failures, "circuit breaker opened: submissions refused for {secs:.1} s");
                let at = now_ms() + (secs * 1000.0) as u64;
                (
                    EventKind::BreakerOpened,
                    crate::breaker::BreakerState::Open,
                    Some(failures),
                    Some(at),
                )
            }
            Transition::HalfOpened => {
                tracing::info!(breaker = %b.name, "circuit breaker half-open: trial operations go through");
                return;
            }
            Transition::Closed => {
                tracing::info!(breaker = %b.name, "circuit breaker closed: the trial operations succeeded");
                (
                    EventKind::BreakerClosed,
                    crate::breaker::BreakerState::Closed,
                    None,
                    None,
                )
            }
        };
        self.events.publish(kind, || Event::Breaker {
            node: self.node_id.clone(),
            breaker: b.name.clone(),
            types: b.types.clone(),
            state,
            failures,
            retry_at,
            timestamp: now_ms(),
        });
    }

    /// The node's breakers as `/v1/metrics` shows them.
    pub(crate) fn breaker_stats(&self) -> Vec<BreakerStats> {
        let now = Instant::now();
        self.breakers.iter().map(|b| b.stats(now)).collect()
    }

    /// Takes up to `n` running slots for operations of `entry`'s type, for the Scheduler
    /// of `shard`, which is woken when one it lacked comes back (see
    /// [`RunningSlots`]).
    pub(crate) fn take_running(&self, entry: &TypeEntry, n: usize, shard: usize) -> usize {
        let shared = entry.limits.shares.then_some(&self.shared_slots);
        take_running(&entry.limits.slots, shared, n, shard, |s| {
            self.send_scheduler(s, SchedulerMsg::SlotsFreed)
        })
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
    /// `n` running operations of `entry`'s type finished: give their slots back and wake
    /// the Schedulers that wait for one.
    pub(crate) fn running_slots_freed(&self, entry: &TypeEntry, n: usize) {
        let wake = |shard| self.send_scheduler(shard, SchedulerMsg::SlotsFreed);
        entry.limits.slots.give_back(n, wake);
        if entry.limits.shares {
            self.shared_slots.give_back(n, wake);
        }
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

    /// `n` accepted operations have completed; wakes [`wait_idle`](Self::wait_idle)
    /// when someone waits and none is left in flight.
    pub(crate) fn ops_finished(&self, n: usize) {
        // SeqCst with `wait_idle`: either it sees this count, or this sees its waiter.
        // The in-flight count is striped: of two last operations finishing at once, the
        // later one in that order sees both gone.
        self.metrics.in_flight.add(-(n as i64), Ordering::SeqCst);
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
