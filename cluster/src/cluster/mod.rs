//! One node's membership in a cluster: its links, its Raft replica of the routing table
//! and node registry, the failure detector, and the remote execution of operations.
//!
//! [`Cluster::start`] opens the store, binds the cluster port and starts Raft;
//! [`Cluster::start_node`] then starts the engine [`Node`] on the replicated routing table
//! and the remote forwarder, bootstraps a cluster of one (no `--join`, no state) or joins
//! the seeds, and starts the background duties.
//!
//! The parts, each in its own file:
//!
//! - this module: the [`Cluster`] handle and the state its parts share, and the engine's
//!   two doors into the cluster (the replicated [`RouteStore`] and the [`Forwarder`]);
//! - `inbound`: what each message arriving on a link does (operations to run, replies,
//!   Raft RPCs and remote writes to answer, pings to note);
//! - `writes`: committing through the leader (here or forwarded), admitting, removing
//!   and leaving;
//! - `duties`: the background loops, each run under a supervisor that logs, counts and
//!   restarts a loop that ends or panics: heartbeats, the leader's failure detection and
//!   voter balancing (deciding with [`crate::membership`]), the applied-state watcher,
//!   and counting leader changes;
//! - `status`: what `GET /v1/cluster` shows;
//! - `error`: the errors of the handle's calls.

mod duties;
mod error;
mod inbound;
mod status;
mod writes;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use futures::future::BoxFuture;
use futures::FutureExt;
use opmesh_actors::job::Job;
use opmesh_actors::router::Forwarder;
use opmesh_actors::routing::{validate_route, AuditEntry, RouteResult, RouteStore};
use opmesh_actors::{
    Node, NodeBuilder, NodeId, OpType, Route, RouteError, RoutingTable, StartError,
};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

pub use self::error::{ClusterError, JoinError, JoinFailure, LeaveError};
pub use self::status::{ClusterStatus, NodeStatusView};
pub use crate::config::ClusterConfig;

use self::duties::Duty;
use self::inbound::{Heard, InboundAdapter};
use crate::codec::Message;
use crate::flow::Flow;
use crate::network::{Calls, Links, Network};
use crate::remote::Outbox;
use crate::replies::Ledger;
use crate::store::Store;
use crate::transport::{SendError, Transport, TransportError};
use crate::types::{raft_id, ClusterState, Command, Member, NodeRecord, NodeStatus, Raft, RaftId};

/// How long this node waits for its link back to a node that just said hello (a
/// joiner) before answering or replicating to it anyway.
const LINK_BACK_WAIT: Duration = Duration::from_secs(2);

/// How long a request that arrives while this node starts waits for its Raft (the
/// transport listens, and peers' requests arrive, while Raft opens its log).
const RAFT_START_WAIT: Duration = Duration::from_secs(5);

/// What the parts of a node's cluster share.
struct Inner {
    cfg: ClusterConfig,
    me: NodeRecord,
    transport: OnceLock<Transport>,
    /// Set once Raft has started, a moment after the transport: see [`Inner::started_raft`].
    raft: OnceLock<Raft>,
    /// Woken when `raft` is set.
    raft_started: tokio::sync::Notify,
    node: OnceLock<Node>,
    /// The state machine's latest applied state.
    state: Arc<ArcSwap<ClusterState>>,
    /// The applied state's version, raised with every change.
    versions: tokio::sync::watch::Receiver<u64>,
    /// What the Router reads: the state as a routing table, with the loads last heard.
    table: ArcSwap<RoutingTable>,
    heard: DashMap<NodeId, Heard>,
    /// The watermarks of this node's queues, and the types over them (what heartbeats
    /// tell the others, see [`crate::flow`]).
    flow: Mutex<Flow>,
    overloaded: ArcSwap<Vec<String>>,
    /// The watermarks of this node's links, and the peers over them (congested: see
    /// [`crate::flow::Flow::links`]).
    link_flow: Mutex<Flow>,
    congested: ArcSwap<Vec<String>>,
    /// This node's open circuit breakers (type, open until), as of the last heartbeat.
    open_breakers: Mutex<Vec<(OpType, Instant)>>,
    calls: Calls,
    outbox: Outbox,
    /// For each node that forwarded operations here: the reply batches it has not
    /// acknowledged and its operations running here (at most `cluster.reply_buffer_bytes`
    /// of replies per node).
    ledgers: DashMap<NodeId, Mutex<Ledger>>,
    /// Replies dropped because a node's buffer of unacknowledged replies was full (see
    /// [`Cluster::replies_dropped`]).
    replies_dropped: AtomicU64,
    stop: CancellationToken,
    leaving: AtomicBool,
    /// Times the Raft leader this node knows of changed (see [`Cluster::leader_changes`]).
    leader_changes: Arc<AtomicU64>,
    /// Times a background duty ended or panicked and was restarted (see
    /// [`Cluster::duty_restarts`]).
    duty_restarts: Arc<AtomicU64>,
    /// Messages dropped for naming another node than their link's (see
    /// [`Cluster::messages_refused`]).
    messages_refused: AtomicU64,
}

/// A node's handle on its cluster. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl Links for Inner {
    fn transport(&self) -> Option<&Transport> {
        self.transport.get()
    }
    fn calls(&self) -> &Calls {
        &self.calls
    }
}

impl Cluster {
    /// Opens the store, binds the cluster port and starts this node's Raft.
    pub async fn start(mut cfg: ClusterConfig) -> Result<Cluster, ClusterError> {
        let (log, sm) = Store::open(cfg.data_dir.as_deref())?;
        let sm = sm.with_audit_limit(cfg.audit_entries);
        // Port 0 (tests) or no advertise address: others dial the address actually bound.
        if cfg.advertise.ends_with(":0") {
            cfg.advertise.clear();
        }
        let inbound = Arc::new(InboundAdapter::default());
        let transport = Transport::start(&cfg, inbound.clone())
            .await
            .map_err(|e| match e {
                TransportError::Config(e) => ClusterError::Config(e),
                TransportError::Listen(error) => ClusterError::Listen {
                    addr: cfg.listen,
                    error,
                },
            })?;
        if cfg.advertise.is_empty() {
            cfg.advertise = transport.local_addr().to_string();
        }
        let me = NodeRecord {
            name: cfg.node.as_str().into(),
            raft_id: raft_id(&cfg.node),
            cluster_addr: cfg.advertise.clone(),
            http_addr: cfg.http_addr.clone(),
            serves: cfg.serves.clone(),
            status: NodeStatus::Up,
        };
        let inner = Arc::new(Inner {
            me,
            transport: OnceLock::from(transport),
            raft: OnceLock::new(),
            raft_started: tokio::sync::Notify::new(),
            node: OnceLock::new(),
            table: ArcSwap::from_pointee(RoutingTable::default()),
            state: sm.state(),
            versions: sm.version_watch(),
            heard: DashMap::new(),
            flow: Mutex::new(Flow::new(cfg.flow_high, cfg.flow_low)),
            overloaded: ArcSwap::from_pointee(Vec::new()),
            link_flow: Mutex::new(Flow::links(cfg.flow_high, cfg.flow_low)),
            congested: ArcSwap::from_pointee(Vec::new()),
            open_breakers: Mutex::default(),
            calls: Calls::default(),
            outbox: Outbox::default(),
            ledgers: DashMap::new(),
            stop: CancellationToken::new(),
            leaving: AtomicBool::new(false),
            leader_changes: Arc::default(),
            duty_restarts: Arc::default(),
            messages_refused: AtomicU64::new(0),
            replies_dropped: AtomicU64::new(0),
            cfg,
        });
        inbound.attach(&inner);
        let et = inner.cfg.election_timeout.as_millis().max(10) as u64;
        let config = openraft::Config {
            cluster_name: inner.cfg.cluster_id.clone(),
            election_timeout_min: et,
            election_timeout_max: et * 2,
            heartbeat_interval: (et / 3).max(5),
            install_snapshot_timeout: 2_000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(5_000),
            max_in_snapshot_log_to_keep: 1_000,
            ..Default::default()
        }
        .validate()?;
        let network = Network {
            links: Arc::downgrade(&inner),
        };
        let raft = Raft::new(inner.me.raft_id, Arc::new(config), network, log, sm).await?;
        let _ = inner.raft.set(raft);
        inner.raft_started.notify_waiters();
        duties::count_leader_changes(&inner);
        Ok(Cluster { inner })
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.inner.cfg.node
    }

    /// The address other nodes dial for this node.
    pub fn cluster_addr(&self) -> &str {
        &self.inner.me.cluster_addr
    }

    /// Starts the engine built by `builder` on this cluster's replicated routing table
    /// and remote forwarder, and starts taking part: bootstraps a cluster of one (no
    /// seeds, no state) or joins the seeds, then runs the background duties.
    pub async fn start_node(&self, builder: NodeBuilder) -> Result<Node, StartError> {
        let node = builder
            .route_store(Arc::new(ClusterRoutes(self.inner.clone())))
            .forwarder(Arc::new(ClusterForwarder(self.inner.clone())))
            .start()
            .await?;
        self.attach(node.clone());
        Ok(node)
    }

    fn attach(&self, node: Node) {
        let _ = self.inner.node.set(node);
        for duty in [
            Duty::WatchState,
            Duty::Heartbeats,
            Duty::LeaderDuties,
            Duty::BootstrapOrJoin,
        ] {
            duties::start(&self.inner, duty);
        }
    }

    /// Whether this node is a member that can route: registered, up, a leader known.
    pub fn is_ready(&self) -> bool {
        let s = self.inner.state.load();
        let registered = s
            .nodes
            .get(self.inner.me.name.as_ref())
            .is_some_and(|r| r.status == NodeStatus::Up);
        registered
            && self
                .inner
                .raft()
                .metrics()
                .borrow()
                .current_leader
                .is_some()
    }

    /// What `GET /v1/cluster` shows.
    pub fn status(&self) -> ClusterStatus {
        self.inner.status()
    }

    /// Hands off and leaves: this node is marked leaving (routes move away), its
    /// operations finish (up to `grace`), then it is removed from the registry and from
    /// the Raft group.
    pub async fn leave(&self, grace: Duration) -> Result<(), LeaveError> {
        self.inner.leave(grace, &self.inner.by_me()).await
    }

    /// [`leave`](Self::leave), asked for by `by` (an API token's name), as the audit
    /// trail records it.
    pub async fn leave_as(&self, grace: Duration, by: &str) -> Result<(), LeaveError> {
        self.inner.leave(grace, by).await
    }

    /// Joins the cluster `seed` belongs to. Only a node that belongs to no cluster yet
    /// can: a node that bootstrapped its own holds a log that cannot merge into another.
    pub async fn join(&self, seed: &str) -> Result<(), JoinError> {
        self.join_as(seed, &self.inner.by_me()).await
    }

    /// [`join`](Self::join), asked for by `by` (an API token's name).
    pub async fn join_as(&self, seed: &str, by: &str) -> Result<(), JoinError> {
        if self.inner.raft().is_initialized().await.unwrap_or(true) {
            return Err(JoinError::AlreadyMember {
                node: self.inner.me.name.to_string(),
            });
        }
        self.inner
            .join_via(seed, by)
            .await
            .map_err(|cause| JoinError::Failed {
                seed: seed.to_owned(),
                cause,
            })
    }

    /// Stops Raft, the links and the background duties.
    pub async fn shutdown(&self) {
        self.inner.stop.cancel();
        let _ = self.inner.raft().shutdown().await;
        if let Some(t) = self.inner.transport.get() {
            t.shutdown().await;
        }
    }

    /// The Raft handle (tests and tools).
    pub fn raft(&self) -> &Raft {
        self.inner.raft()
    }

    /// The latest applied cluster state.
    pub fn state(&self) -> Arc<ClusterState> {
        self.inner.state.load_full()
    }

    /// How many times the Raft leader this node knows of changed since it started: each
    /// time openraft's metrics name a leader other than the last one named (the first
    /// leader it learns of counts; an election with no leader yet does not).
    pub fn leader_changes(&self) -> u64 {
        self.inner.leader_changes.load(Ordering::Relaxed)
    }

    /// How many times a background duty (heartbeats, the leader's failure detection and
    /// voter upkeep, the applied-state watcher, bootstrap or join, counting leader
    /// changes) ended unexpectedly or panicked and was restarted since this node started.
    /// Zero on a healthy node; each restart is also logged with its cause.
    pub fn duty_restarts(&self) -> u64 {
        self.inner.duty_restarts.load(Ordering::Relaxed)
    }

    /// How many messages from other nodes this node dropped since it started because
    /// they named another node than the one their link proved it is: a vote request for
    /// another candidate, entries or a snapshot from another leader, a `Leave` for
    /// another node, a `Join` for another node from a non-member, an answer to a request
    /// sent to another node. Each is also logged.
    pub fn messages_refused(&self) -> u64 {
        self.inner.messages_refused.load(Ordering::Relaxed)
    }

    /// How many replies to operations other nodes forwarded here were dropped since this
    /// node started because that node's buffer of unacknowledged replies
    /// (`cluster.reply_buffer_bytes`) was full: the link back was down, or the node did
    /// not acknowledge, for too long. A repeat of such an operation is answered from the
    /// idempotency cache when it has a key, else fails saying its reply was dropped; each
    /// drop is also logged.
    pub fn replies_dropped(&self) -> u64 {
        self.inner.replies_dropped.load(Ordering::Relaxed)
    }

    /// How many connections to this node's cluster port were refused since it started:
    /// a failed or unfinished handshake (a wrong secret, another cluster, a timeout), or
    /// one beyond `max_pending_handshakes`.
    pub fn handshakes_refused(&self) -> u64 {
        self.inner.transport().handshakes_refused()
    }

    /// The index of the last Raft log entry this node knows is committed, asked of the
    /// Raft core (openraft 0.9's metrics do not carry it). `None` before anything is
    /// committed, or when Raft has stopped.
    pub async fn committed_index(&self) -> Option<u64> {
        self.inner
            .raft()
            .with_raft_state(|st| st.committed.map(|l| l.index))
            .await
            .ok()
            .flatten()
    }
}

impl Inner {
    /// Raft, waiting for it when a peer's request arrives while this node starts: the
    /// transport (and so peers' messages) comes up a moment before Raft does. `None`
    /// when it is still not up after [`RAFT_START_WAIT`].
    async fn started_raft(&self) -> Option<&Raft> {
        crate::notified::until(&self.raft_started, RAFT_START_WAIT, || self.raft.get()).await
    }

    fn raft(&self) -> &Raft {
        self.raft
            .get()
            .expect("raft starts before the cluster is handed out")
    }

    fn transport(&self) -> &Transport {
        self.transport
            .get()
            .expect("the transport starts before the cluster is handed out")
    }

    fn in_flight(&self) -> u64 {
        self.node.get().map_or(0, |n| n.in_flight() as u64)
    }

    fn member(rec: &NodeRecord) -> Member {
        Member {
            name: rec.name.to_string(),
            cluster_addr: rec.cluster_addr.clone(),
            http_addr: rec.http_addr.clone(),
        }
    }

    fn leader(&self) -> (Option<RaftId>, Option<Member>) {
        let m = self.raft().metrics();
        let m = m.borrow();
        let id = m.current_leader;
        let node = id.and_then(|id| m.membership_config.membership().get_node(&id).cloned());
        (id, node)
    }
}

/// The replicated routing table, as the engine's [`RouteStore`].
struct ClusterRoutes(Arc<Inner>);

impl RouteStore for ClusterRoutes {
    fn snapshot(&self) -> Arc<RoutingTable> {
        self.0.table.load_full()
    }

    fn load(&self) -> arc_swap::Guard<Arc<RoutingTable>> {
        self.0.table.load()
    }

    fn set_route(
        &self,
        op_type: OpType,
        route: Route,
        by: Arc<str>,
    ) -> BoxFuture<'static, RouteResult> {
        let inner = self.0.clone();
        async move {
            validate_route(&inner.table.load(), &route)?;
            inner
                .route_write(Command::SetRoute { op_type, route }, &by)
                .await
        }
        .boxed()
    }

    fn remove_route(&self, op_type: OpType, by: Arc<str>) -> BoxFuture<'static, RouteResult> {
        let inner = self.0.clone();
        async move {
            if !inner.table.load().routes.contains_key(&op_type) {
                return Err(RouteError::NotFound(op_type.to_string()));
            }
            inner
                .route_write(Command::RemoveRoute { op_type }, &by)
                .await
        }
        .boxed()
    }

    fn audit(&self, limit: usize) -> Vec<AuditEntry> {
        self.0
            .state
            .load()
            .audit
            .iter()
            .rev()
            .take(limit)
            .cloned()
            .collect()
    }
}

/// Sends operations to their owners, as the engine's [`Forwarder`].
struct ClusterForwarder(Arc<Inner>);

impl Forwarder for ClusterForwarder {
    fn forward(&self, node: &NodeId, jobs: Vec<Box<Job>>) {
        // A forwarding shard's operations travel on its lane (see the transport): one
        // key's operations are one shard's, so they stay in order.
        let lane = jobs.first().map_or(0, |j| j.shard());
        let wire = self.0.outbox.hold(node, jobs);
        // Not connected: the operations wait in the outbox, sent when the link comes
        // back, routed again if the node is marked down, expired at their deadline.
        // The link full: they go to another node of their route, or fail naming it.
        let refused = self
            .0
            .transport()
            .try_send_on(node, lane, Message::EncodedOps(wire));
        if let Err(refused) = refused {
            let (SendError::Full { queued }, Message::EncodedOps(wire)) = *refused else {
                return;
            };
            let why = format!(
                "the link to node `{node}` holds {queued} bytes unsent, the most \
                 cluster.link_buffer_bytes allows"
            );
            let refused = self.0.outbox.release(node, wire.ids().iter().copied());
            self.0.link_full(node);
            self.0.route_again(
                node,
                refused.into_iter().map(|j| (j, why.clone())).collect(),
            );
        }
    }
}
