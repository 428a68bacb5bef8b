//! One node's membership in a cluster: its links, its Raft replica of the routing table
//! and node registry, the failure detector, and the remote execution of operations.
//!
//! [`Cluster::start`] opens the store, binds the cluster port and starts Raft;
//! [`Cluster::start_node`] then starts the engine [`Node`] on the replicated routing table
//! and the remote forwarder, bootstraps a cluster of one (no `--join`, no state) or joins
//! the seeds, and starts the background duties:
//!
//! - every heartbeat, each node pings every other (the `Ping` carries its load);
//! - the leader marks a node down when it has not heard from it for `down_after`, and up
//!   again when it hears from it, so every node agrees who is healthy; it also keeps three
//!   or five voters, promoting learners to replace voters that are down;
//! - every applied change swaps a new routing table in, connects links to new nodes, and
//!   routes again the operations waiting on a node now marked down.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use futures::future::BoxFuture;
use futures::FutureExt;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use opmesh_actors::job::Job;
use opmesh_actors::router::Forwarder;
use opmesh_actors::routing::{validate_route, RouteResult, RouteStore};
use opmesh_actors::{
    Node, NodeBuilder, NodeId, OpType, Route, RouteError, RoutingTable, StartError,
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::codec::{Message, Rpc, RpcReply, WireReply, WriteRefused};
use crate::network::{Calls, Links, Network};
use crate::remote::{collect_replies, from_wire, refused_reply, Outbox};
use crate::store::{routing_table, Store};
use crate::transport::{Inbound, LinkStats, Transport, TransportConfig};
use crate::types::{
    raft_id, ClusterState, Command, CommandResult, Member, NodeRecord, NodeStatus, Raft, RaftId,
};

/// Everything a node needs to take part in a cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// This node's name (`--node-id`).
    pub node: String,
    pub cluster_id: String,
    pub secret: Vec<u8>,
    /// Where the cluster port listens.
    pub listen: SocketAddr,
    /// The address other nodes dial; empty = the bound listen address.
    pub advertise: String,
    /// This node's HTTP api, as other nodes and users should reach it.
    pub http_addr: String,
    /// Seed cluster addresses; empty = bootstrap a cluster of one when there is no state.
    pub join: Vec<String>,
    /// Raft log, vote and snapshots; `None` = in memory.
    pub data_dir: Option<PathBuf>,
    /// The operation types this node serves.
    pub serves: Vec<OpType>,
    pub heartbeat: Duration,
    pub down_after: Duration,
    pub write_timeout: Duration,
    pub election_timeout: Duration,
    /// 1, 3 or 5.
    pub voters: usize,
    pub flush_bytes: usize,
    pub linger: Duration,
    pub max_frame: usize,
}

impl ClusterConfig {
    /// Defaults for tests and embedders: loopback, port 0, in memory.
    pub fn new(node: &str, secret: &[u8]) -> Self {
        ClusterConfig {
            node: node.to_owned(),
            cluster_id: "opmesh".into(),
            secret: secret.to_vec(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: String::new(),
            http_addr: String::new(),
            join: Vec::new(),
            data_dir: None,
            serves: Vec::new(),
            heartbeat: Duration::from_millis(100),
            down_after: Duration::from_millis(1000),
            write_timeout: Duration::from_secs(3),
            election_timeout: Duration::from_millis(200),
            voters: 3,
            flush_bytes: 64 * 1024,
            linger: Duration::ZERO,
            max_frame: 16 * 1024 * 1024,
        }
    }
}

/// Why a cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot open the Raft store: {0}")]
    Store(String),
    #[error("cannot listen on the cluster address {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot start Raft: {0}")]
    Raft(String),
}

/// Why `join` did not happen.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    AlreadyMember(String),
    #[error("{0}")]
    Failed(String),
}

/// What one node heard last from another.
#[derive(Clone, Copy)]
struct Heard {
    /// The last answer (`Pong`); `None` before the first.
    at: Option<Instant>,
    load: u64,
}

struct Inner {
    cfg: ClusterConfig,
    me: NodeRecord,
    transport: OnceLock<Transport>,
    raft: OnceLock<Raft>,
    node: OnceLock<Node>,
    /// The state machine's latest applied state.
    state: Arc<ArcSwap<ClusterState>>,
    /// The applied state's version, raised with every change.
    versions: tokio::sync::watch::Receiver<u64>,
    /// What the Router reads: the state as a routing table, with the loads last heard.
    table: ArcSwap<RoutingTable>,
    heard: DashMap<NodeId, Heard>,
    calls: Calls,
    outbox: Outbox,
    /// Replies that could not be sent (the link back was down), sent when it comes back.
    unsent: DashMap<NodeId, Vec<WireReply>>,
    stop: CancellationToken,
    leaving: AtomicBool,
    /// Times the Raft leader this node knows of changed (see [`Cluster::leader_changes`]).
    leader_changes: Arc<AtomicU64>,
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

/// Most unsent replies kept per peer while its link is down.
const MAX_UNSENT: usize = 100_000;

impl Cluster {
    /// Opens the store, binds the cluster port and starts this node's Raft.
    pub async fn start(mut cfg: ClusterConfig) -> Result<Cluster, ClusterError> {
        let (log, sm) =
            Store::open(cfg.data_dir.as_deref()).map_err(|e| ClusterError::Store(e.to_string()))?;
        // Port 0 (tests) or no advertise address: others dial the address actually bound.
        if cfg.advertise.ends_with(":0") {
            cfg.advertise.clear();
        }
        let inbound = Arc::new(InboundAdapter(OnceLock::new()));
        let transport = Transport::start(
            TransportConfig {
                node: cfg.node.clone(),
                cluster_id: cfg.cluster_id.clone(),
                secret: cfg.secret.clone(),
                listen: cfg.listen,
                advertise: cfg.advertise.clone(),
                max_frame: cfg.max_frame,
                flush_bytes: cfg.flush_bytes,
                linger: cfg.linger,
                reconnect_min: Duration::from_millis(50),
                reconnect_max: Duration::from_secs(1),
                handshake_timeout: Duration::from_secs(2),
            },
            inbound.clone(),
        )
        .await
        .map_err(|error| ClusterError::Listen {
            addr: cfg.listen,
            error,
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
            node: OnceLock::new(),
            table: ArcSwap::from_pointee(RoutingTable::default()),
            state: sm.state(),
            versions: sm.version_watch(),
            heard: DashMap::new(),
            calls: Calls::default(),
            outbox: Outbox::default(),
            unsent: DashMap::new(),
            stop: CancellationToken::new(),
            leaving: AtomicBool::new(false),
            leader_changes: Arc::default(),
            cfg,
        });
        let _ = inbound.0.set(Arc::downgrade(&inner));
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
        .validate()
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let network = Network {
            links: Arc::downgrade(&inner),
        };
        let raft = Raft::new(inner.me.raft_id, Arc::new(config), network, log, sm)
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let _ = inner.raft.set(raft);
        tokio::spawn(count_leader_changes(
            inner.raft().metrics(),
            inner.leader_changes.clone(),
            inner.stop.clone(),
        ));
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
        let inner = self.inner.clone();
        tokio::spawn(async move { inner.watch_state().await });
        let inner = self.inner.clone();
        tokio::spawn(async move { inner.heartbeats().await });
        let inner = self.inner.clone();
        tokio::spawn(async move { inner.leader_duties().await });
        let inner = self.inner.clone();
        tokio::spawn(async move { inner.bootstrap_or_join().await });
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
    pub async fn leave(&self, grace: Duration) -> Result<(), String> {
        self.inner.leave(grace).await
    }

    /// Joins the cluster `seed` belongs to. Only a node that belongs to no cluster yet
    /// can: a node that bootstrapped its own holds a log that cannot merge into another.
    pub async fn join(&self, seed: &str) -> Result<(), JoinError> {
        if self.inner.raft().is_initialized().await.unwrap_or(true) {
            return Err(JoinError::AlreadyMember(format!(
                "node `{}` already belongs to a cluster; to add a node to another cluster, start it with --join and no state",
                self.inner.me.name
            )));
        }
        self.inner.join_via(seed).await.map_err(JoinError::Failed)
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

/// The answer of `GET /v1/cluster`.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterStatus {
    pub cluster_id: String,
    /// The node that answered.
    pub node: String,
    pub leader: Option<String>,
    pub term: u64,
    pub last_applied_index: Option<u64>,
    pub last_log_index: Option<u64>,
    /// The routing table's version.
    pub version: u64,
    /// This node's Raft state: leader, follower, candidate or learner.
    pub raft_state: String,
    pub nodes: Vec<NodeStatusView>,
    /// Operations this node forwarded and waits to hear about.
    pub forwarded_waiting: usize,
    pub links: Vec<LinkStats>,
}

/// One node in `GET /v1/cluster`.
#[derive(Clone, Debug, Serialize)]
pub struct NodeStatusView {
    pub id: String,
    pub http_addr: String,
    pub cluster_addr: String,
    /// up, down or leaving.
    pub status: String,
    /// voter, learner, or none (registered, not yet a Raft member).
    pub role: String,
    pub serves: Vec<String>,
    /// Operations in flight there, as last heard.
    pub load: u64,
    /// self, connected or disconnected: this node's link to it.
    pub link: String,
    /// Milliseconds since this node last heard from it.
    pub last_heard_ms: Option<u64>,
}

fn refused(message: impl Into<String>, leader: Option<Member>) -> WriteRefused {
    WriteRefused {
        message: message.into(),
        leader,
    }
}

impl Inner {
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

    // -------------------------------------------------------------------------------
    // Writes

    /// Commits `cmd` through the leader: here if this node leads, forwarded otherwise.
    /// Fails with a clear reason within the write timeout instead of hanging.
    async fn write(&self, cmd: Command) -> Result<CommandResult, WriteRefused> {
        let timeout = self.cfg.write_timeout;
        let no_quorum = || {
            refused(
                format!(
                    "the change was not committed within {timeout:?}: node `{}` cannot reach a quorum of the cluster (if one comes back in time it may still be applied; read the route to know)",
                    self.me.name
                ),
                None,
            )
        };
        let r = tokio::time::timeout(timeout, self.raft().client_write(cmd.clone())).await;
        match r {
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                match f.leader_node {
                    Some(leader) if leader.name != self.cfg.node => {
                        self.transport()
                            .add_peer(&leader.name, &leader.cluster_addr);
                        match self
                            .calls
                            .call(self.transport(), &leader.name, Rpc::ClientWrite(cmd), timeout)
                            .await
                        {
                            Ok(RpcReply::Written(r)) => r,
                            Ok(other) => Err(refused(
                                format!("leader is {leader}: unexpected answer {other:?}"),
                                Some(leader),
                            )),
                            Err(e) => Err(refused(
                                format!("leader is {leader}, and it cannot be reached from node `{}`: {e}", self.me.name),
                                Some(leader),
                            )),
                        }
                    }
                    _ => Err(refused(
                        format!(
                            "no leader is known to node `{}`: the cluster has no quorum reachable from here",
                            self.me.name
                        ),
                        None,
                    )),
                }
            }
            Ok(Err(e)) => Err(refused(e.to_string(), None)),
            Err(_) => Err(no_quorum()),
        }
    }

    /// Waits (briefly) until this node has applied `version`, so a write is visible here
    /// when it returns.
    async fn applied(&self, version: u64) {
        let mut versions = self.versions.clone();
        let _ = tokio::time::timeout(self.cfg.write_timeout, versions.wait_for(|v| *v >= version))
            .await;
    }

    async fn route_write(&self, cmd: Command) -> RouteResult {
        match self.write(cmd).await {
            Ok(CommandResult { error: Some(e), .. }) => Err(RouteError::Unavailable(e)),
            Ok(r) => {
                self.applied(r.version).await;
                Ok(r.version)
            }
            Err(r) => Err(RouteError::NoQuorum { message: r.message }),
        }
    }

    /// Sends `rpc` to the leader and returns its answer; `None` when this node leads.
    async fn to_leader(&self, rpc: Rpc) -> Option<Result<RpcReply, WriteRefused>> {
        let (id, node) = self.leader();
        if id == Some(self.me.raft_id) {
            return None;
        }
        let Some(leader) = node else {
            return Some(Err(refused(
                format!("no leader is known to node `{}`", self.me.name),
                None,
            )));
        };
        self.transport()
            .add_peer(&leader.name, &leader.cluster_addr);
        Some(
            self.calls
                .call(
                    self.transport(),
                    &leader.name,
                    rpc,
                    self.cfg.write_timeout * 3,
                )
                .await
                .map_err(|e| refused(format!("leader is {leader}: {e}"), Some(leader))),
        )
    }

    // -------------------------------------------------------------------------------
    // Membership

    async fn bootstrap_or_join(self: Arc<Self>) {
        let raft = self.raft();
        let initialized = raft.is_initialized().await.unwrap_or(false);
        if !initialized && self.cfg.join.is_empty() {
            let mut members = BTreeMap::new();
            members.insert(self.me.raft_id, Self::member(&self.me));
            match raft.initialize(members).await {
                Ok(()) => tracing::info!(node = %self.me.name, "bootstrapped a new cluster"),
                Err(e) => tracing::warn!("bootstrap refused: {e}"),
            }
            // The leader duties register this node once it leads.
            return;
        }
        if self.cfg.join.is_empty() {
            tracing::info!(node = %self.me.name, "rejoining with the state in the data dir");
            return;
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            for seed in &self.cfg.join {
                match self.join_via(seed).await {
                    Ok(()) => {
                        tracing::info!(node = %self.me.name, %seed, "joined the cluster");
                        return;
                    }
                    Err(e) => tracing::warn!(%seed, "join failed, will retry: {e}"),
                }
                if self.stop.is_cancelled() {
                    return;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.stop.cancelled() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Asks the node at `seed` to admit this one (it forwards to the leader).
    async fn join_via(&self, seed: &str) -> Result<(), String> {
        let peer = format!("seed@{seed}");
        let t = self.transport();
        t.add_peer(&peer, seed);
        let until = Instant::now() + Duration::from_secs(2);
        while !t.is_connected(&peer) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let r = self
            .calls
            .call(
                t,
                &peer,
                Rpc::Join(self.me.clone()),
                self.cfg.write_timeout * 4,
            )
            .await;
        t.remove_peer(&peer);
        match r {
            Ok(RpcReply::Joined(Ok(()))) => Ok(()),
            Ok(RpcReply::Joined(Err(e))) => Err(e.message),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// On the leader: adds `rec` as a learner (waiting until it has caught up) and to
    /// the registry.
    async fn admit(&self, rec: NodeRecord) -> Result<(), WriteRefused> {
        if rec.raft_id != raft_id(&rec.name) {
            return Err(refused(
                format!("node `{}` sent a wrong Raft id", rec.name),
                None,
            ));
        }
        if let Some(other) = self
            .state
            .load()
            .nodes
            .values()
            .find(|n| n.raft_id == rec.raft_id && n.name != rec.name)
        {
            return Err(refused(
                format!(
                    "node name `{}` collides with node `{}` (same Raft id); choose another --node-id",
                    rec.name, other.name
                ),
                None,
            ));
        }
        let (known, voters) = {
            let m = self.raft().metrics();
            let m = m.borrow();
            let mem = m.membership_config.membership();
            let voters: BTreeSet<RaftId> = mem.voter_ids().collect();
            (mem.get_node(&rec.raft_id).cloned(), voters)
        };
        let member = Self::member(&rec);
        let raft = self.raft();
        let demoted = known.is_some() && voters.contains(&rec.raft_id) && voters.len() > 1;
        if demoted {
            // A voter that comes back may have lost its log (no data dir). Until it has
            // caught up it must not count towards a quorum, or an entry committed with
            // its old acknowledgement could be lost: it rejoins as a learner, and the
            // voter upkeep promotes it again once it is up.
            let rest: BTreeSet<RaftId> = voters
                .iter()
                .copied()
                .filter(|v| *v != rec.raft_id)
                .collect();
            tracing::info!(node = %rec.name, "a voter rejoins: demoted to learner until it has caught up");
            if let Err(e) = raft.change_membership(rest, true).await {
                return Err(refused(
                    format!("cannot readmit voter `{}`: {e}", rec.name),
                    None,
                ));
            }
        }
        let change: Option<BoxFuture<'_, _>> = match known {
            None => Some(raft.add_learner(rec.raft_id, member, true).boxed()),
            // A restart on new addresses: update them.
            Some(m) if m != member => {
                let mut nodes = BTreeMap::new();
                nodes.insert(rec.raft_id, member);
                Some(
                    raft.change_membership(ChangeMembers::SetNodes(nodes), true)
                        .boxed(),
                )
            }
            Some(_) => None,
        };
        if let Some(change) = change {
            match tokio::time::timeout(self.cfg.write_timeout * 3, change).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return Err(refused(
                        format!("cannot add node `{}`: {e}", rec.name),
                        None,
                    ))
                }
                Err(_) => {
                    return Err(refused(
                        format!("node `{}` did not catch up with the log in time", rec.name),
                        None,
                    ))
                }
            }
        }
        let id = rec.raft_id;
        if let CommandResult { error: Some(e), .. } = self.write(Command::NodeJoined(rec)).await? {
            return Err(refused(e, None));
        }
        if demoted {
            // Give the voter back its vote as soon as it has caught up, so the cluster
            // tolerates a failure again before the join is answered.
            let mut metrics = raft.metrics();
            let until = Instant::now() + self.cfg.write_timeout * 3;
            while Instant::now() < until {
                if self.up_learners().contains(&id) {
                    self.balance_voters().await;
                    break;
                }
                let _ = tokio::time::timeout_at(until.into(), metrics.changed()).await;
            }
        }
        Ok(())
    }

    /// On the leader: removes `name` from the registry and from the Raft group.
    async fn remove(&self, name: &str) -> Result<(), WriteRefused> {
        if let CommandResult { error: Some(e), .. } =
            self.write(Command::NodeLeft { name: name.into() }).await?
        {
            tracing::warn!(node = name, "registry removal: {e}");
        }
        let id = raft_id(name);
        let voters: BTreeSet<RaftId> = {
            let m = self.raft().metrics();
            let m = m.borrow();
            m.membership_config.membership().voter_ids().collect()
        };
        let raft = self.raft();
        if voters.contains(&id) {
            let mut rest: BTreeSet<RaftId> = voters.iter().copied().filter(|v| *v != id).collect();
            // Keep the voter count: promote a learner in its place when there is one.
            if let Some(l) = self.up_learners().into_iter().find(|l| *l != id) {
                rest.insert(l);
            }
            raft.change_membership(rest, false)
                .await
                .map_err(|e| refused(format!("cannot remove voter `{name}`: {e}"), None))?;
        } else {
            let mut gone = BTreeSet::new();
            gone.insert(id);
            raft.change_membership(ChangeMembers::RemoveNodes(gone), false)
                .await
                .map_err(|e| refused(format!("cannot remove learner `{name}`: {e}"), None))?;
        }
        Ok(())
    }

    async fn leave(&self, grace: Duration) -> Result<(), String> {
        if self.leaving.swap(true, Ordering::AcqRel) {
            return Err("this node is already leaving".into());
        }
        let name: NodeId = self.me.name.clone();
        let alone = {
            let m = self.raft().metrics();
            let m = m.borrow();
            let alone = m
                .membership_config
                .membership()
                .nodes()
                .all(|(id, _)| *id == self.me.raft_id);
            alone
        };
        if alone {
            // The last node keeps its cluster (and, with a data dir, its state) to restart.
            tracing::info!(node = %name, "last node of the cluster: not leaving it");
            return Ok(());
        }
        tracing::info!(node = %name, "leaving the cluster: handing off");
        let marked = self
            .write(Command::SetStatus {
                name: name.clone(),
                status: NodeStatus::Leaving,
            })
            .await;
        if let Err(e) = &marked {
            self.leaving.store(false, Ordering::Release);
            return Err(format!("cannot mark this node leaving: {}", e.message));
        }
        // Operations routed here before the change finish; forwarded ones come back.
        let until = Instant::now() + grace;
        while Instant::now() < until && (self.in_flight() > 0 || !self.outbox.is_empty()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let r = match self
            .to_leader(Rpc::Leave {
                name: name.to_string(),
            })
            .await
        {
            None => self.remove(&name).await,
            Some(Ok(RpcReply::Left(r))) => r,
            Some(Ok(other)) => Err(refused(format!("unexpected answer {other:?}"), None)),
            Some(Err(e)) => Err(e),
        };
        r.map_err(|e| e.message)?;
        tracing::info!(node = %name, "left the cluster");
        Ok(())
    }

    fn up_learners(&self) -> Vec<RaftId> {
        let state = self.state.load();
        let m = self.raft().metrics();
        let m = m.borrow();
        let up: BTreeSet<RaftId> = state
            .nodes
            .values()
            .filter(|n| n.status == NodeStatus::Up)
            .map(|n| n.raft_id)
            .collect();
        // Only learners that have caught up with the log (as far as this leader has
        // replicated to them) may become voters.
        let last = m.last_log_index;
        let caught_up = |id: &RaftId| {
            m.replication.as_ref().is_some_and(|r| {
                r.get(id).copied().flatten().map(|l| l.index) >= last.map(|l| l.saturating_sub(16))
            })
        };
        m.membership_config
            .membership()
            .learner_ids()
            .filter(|l| up.contains(l) && caught_up(l))
            .collect()
    }

    /// On the leader: promotes up, caught-up learners while there are fewer voters than
    /// wanted, and replaces voters that are down by such learners.
    async fn balance_voters(&self) {
        let state = self.state.load_full();
        let (voters, members) = {
            let m = self.raft().metrics();
            let m = m.borrow();
            let mem = m.membership_config.membership();
            let voters: BTreeSet<RaftId> = mem.voter_ids().collect();
            (voters, mem.nodes().count())
        };
        let mut target = self.cfg.voters.min(members).max(1);
        if target % 2 == 0 {
            target -= 1;
        }
        let status = |id: RaftId| {
            state
                .nodes
                .values()
                .find(|n| n.raft_id == id)
                .map(|n| n.status)
        };
        let mut learners = self.up_learners().into_iter();
        let mut next: BTreeSet<RaftId> = voters.clone();
        for v in &voters {
            if matches!(
                status(*v),
                Some(NodeStatus::Down) | Some(NodeStatus::Leaving)
            ) {
                if let Some(l) = learners.next() {
                    next.remove(v);
                    next.insert(l);
                }
            }
        }
        while next.len() < target {
            match learners.next() {
                Some(l) => {
                    next.insert(l);
                }
                None => break,
            }
        }
        if next != voters && next.len() % 2 == 1 {
            tracing::info!(?voters, ?next, "changing the voters");
            if let Err(e) = self.raft().change_membership(next, true).await {
                tracing::warn!("voter change failed: {e}");
            }
        }
    }

    // -------------------------------------------------------------------------------
    // Background duties

    /// Rebuilds the routing table on every applied change (and with fresh loads every
    /// heartbeat), keeps links to every registered node, and routes again what waits on
    /// a node that is no longer up.
    async fn watch_state(self: Arc<Self>) {
        let mut versions = self.versions.clone();
        let mut tick = tokio::time::interval(self.cfg.heartbeat);
        let mut seen_version = u64::MAX;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                r = versions.changed() => if r.is_err() { return },
                _ = tick.tick() => {}
            }
            let state = self.state.load_full();
            self.publish(&state);
            if state.version != seen_version {
                seen_version = state.version;
                let t = self.transport();
                for n in state.nodes.values() {
                    if n.name != self.me.name {
                        t.add_peer(&n.name, &n.cluster_addr);
                    }
                }
            }
            for peer in self.outbox.peers() {
                let up = state
                    .nodes
                    .get(&peer)
                    .is_some_and(|n| n.status == NodeStatus::Up);
                if !up {
                    let jobs = self.outbox.take(&peer);
                    if !jobs.is_empty() {
                        tracing::warn!(node = %peer, count = jobs.len(), "node is not up: routing its operations again");
                        if let Some(node) = self.node.get() {
                            node.reroute(jobs);
                        }
                    }
                }
            }
            self.outbox.expire(Instant::now());
        }
    }

    /// Swaps in the routing table for `state`.
    fn publish(&self, state: &ClusterState) {
        let mut table = routing_table(state);
        for n in &mut table.nodes {
            n.load = if n.id == self.me.name {
                self.in_flight()
            } else {
                self.heard.get(&n.id).map_or(0, |h| h.load)
            };
        }
        self.table.store(Arc::new(table));
    }

    async fn heartbeats(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.cfg.heartbeat);
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            seq += 1;
            let load = self.in_flight();
            let state = self.state.load();
            for n in state.nodes.keys() {
                if *n != self.me.name {
                    let _ = self.transport().send(n, Message::Ping { seq, load });
                }
            }
        }
    }

    /// The leader's failure detector, registration of itself and voter upkeep.
    async fn leader_duties(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.cfg.heartbeat);
        let mut leading_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let leads = {
                let m = self.raft().metrics();
                let m = m.borrow();
                m.state == ServerState::Leader && m.current_leader == Some(self.me.raft_id)
            };
            if !leads {
                leading_since = None;
                continue;
            }
            let since = *leading_since.get_or_insert_with(Instant::now);
            let state = self.state.load_full();
            let now = Instant::now();
            match state.nodes.get(self.me.name.as_ref()) {
                None if !self.leaving.load(Ordering::Acquire) => {
                    if let Err(e) = self.write(Command::NodeJoined(self.me.clone())).await {
                        tracing::warn!("cannot register this node: {}", e.message);
                    }
                }
                Some(r) if r.status == NodeStatus::Down => {
                    let _ = self
                        .write(Command::SetStatus {
                            name: self.me.name.clone(),
                            status: NodeStatus::Up,
                        })
                        .await;
                }
                _ => {}
            }
            for n in state.nodes.values() {
                if n.name == self.me.name {
                    continue;
                }
                // Every node pings every other, so a new leader already knows when it last
                // heard from each: a node that died with the old leader is marked down
                // `down_after` after its last answer, not after the election. A node never
                // heard from gets `down_after` from the start of this leadership.
                let heard = self.heard.get(&n.name).and_then(|h| h.at).unwrap_or(since);
                let silent = now.saturating_duration_since(heard);
                let next = match n.status {
                    NodeStatus::Up if silent > self.cfg.down_after => Some(NodeStatus::Down),
                    NodeStatus::Down if silent < self.cfg.down_after && heard > since => {
                        Some(NodeStatus::Up)
                    }
                    _ => None,
                };
                if let Some(status) = next {
                    tracing::warn!(node = %n.name, status = status.as_str(), silent_ms = silent.as_millis() as u64, "marking node");
                    if let Err(e) = self
                        .write(Command::SetStatus {
                            name: n.name.clone(),
                            status,
                        })
                        .await
                    {
                        tracing::warn!("cannot mark node `{}`: {}", n.name, e.message);
                    }
                }
            }
            self.balance_voters().await;
        }
    }

    // -------------------------------------------------------------------------------
    // Inbound

    fn on_message(self: &Arc<Self>, from: &str, msg: Message) {
        match msg {
            Message::OpBatch(ops) => self.run_forwarded(from, ops),
            Message::ReplyBatch(replies) => self.outbox.complete(&NodeId::from(from), replies),
            Message::Request { id, body } => {
                let inner = self.clone();
                let from = from.to_owned();
                tokio::spawn(async move {
                    let reply = inner.answer(body).await;
                    // A node that just said hello (a joiner) may not have a link back yet.
                    let t = inner.transport();
                    let until = Instant::now() + Duration::from_secs(2);
                    while !t.is_connected(&from) && Instant::now() < until {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    let _ = t.send(&from, Message::Response { id, body: reply });
                });
            }
            Message::Response { id, body } => self.calls.answer(id, body),
            Message::Ping { seq, load } => {
                self.heard(from, load, false);
                let _ = self.transport().send(
                    from,
                    Message::Pong {
                        seq,
                        load: self.in_flight(),
                    },
                );
            }
            Message::Pong { load, .. } => self.heard(from, load, true),
        }
    }

    /// Notes a peer's load. Only a `Pong` (`answered`) counts as hearing from it: it
    /// proves the links both ways work, where a `Ping` that arrives proves only one.
    fn heard(&self, from: &str, load: u64, answered: bool) {
        let now = Instant::now();
        self.heard
            .entry(from.into())
            .and_modify(|h| {
                h.load = load;
                if answered {
                    h.at = Some(now);
                }
            })
            .or_insert(Heard {
                at: answered.then_some(now),
                load,
            });
    }

    fn on_link(&self, peer: &str, up: bool) {
        if !up {
            return;
        }
        let peer: NodeId = peer.into();
        let waiting = self.outbox.waiting_on(&peer);
        if !waiting.is_empty() {
            tracing::info!(node = %peer, count = waiting.len(), "link is back: sending waiting operations again");
            let _ = self.transport().send(&peer, Message::OpBatch(waiting));
        }
        if let Some((_, replies)) = self.unsent.remove(&peer) {
            let _ = self.transport().send(&peer, Message::ReplyBatch(replies));
        }
    }

    /// Runs operations another node forwarded here and sends their outcomes back.
    fn run_forwarded(self: &Arc<Self>, from: &str, ops: Vec<crate::codec::WireOp>) {
        let peer: NodeId = from.into();
        let me = self.me.name.clone();
        let Some(node) = self.node.get() else {
            let replies = ops
                .iter()
                .map(|o| refused_reply(o.id, &me, &opmesh_actors::SubmitError::ShuttingDown))
                .collect();
            self.send_replies(&peer, replies);
            return;
        };
        let now = Instant::now();
        let ids: Vec<u128> = ops.iter().map(|o| o.id).collect();
        let ops = ops.into_iter().map(|w| from_wire(w, now)).collect();
        let mut tickets = Vec::new();
        let mut refusals = Vec::new();
        for (id, r) in ids.into_iter().zip(node.enqueue_forwarded(ops)) {
            match r {
                Ok(t) => tickets.push(t),
                Err(e) => refusals.push(refused_reply(id, &me, &e)),
            }
        }
        let inner = self.clone();
        tokio::spawn(async move {
            collect_replies(tickets, refusals, |batch| inner.send_replies(&peer, batch)).await
        });
    }

    fn send_replies(&self, peer: &NodeId, replies: Vec<WireReply>) {
        if self
            .transport()
            .send(peer, Message::ReplyBatch(replies.clone()))
            .is_err()
        {
            let mut kept = self.unsent.entry(peer.clone()).or_default();
            if kept.len() + replies.len() <= MAX_UNSENT {
                kept.extend(replies);
            } else {
                tracing::warn!(node = %peer, count = replies.len(), "link down and too many replies kept: dropping (the origin sends the operations again when the link is back)");
            }
        }
    }

    async fn answer(&self, body: Rpc) -> RpcReply {
        let raft = self.raft();
        match body {
            Rpc::AppendEntries(r) => match raft.append_entries(r).await {
                Ok(r) => RpcReply::AppendEntries(r),
                Err(e) => RpcReply::Error(e.to_string()),
            },
            Rpc::Vote(r) => match raft.vote(r).await {
                Ok(r) => RpcReply::Vote(r),
                Err(e) => RpcReply::Error(e.to_string()),
            },
            Rpc::InstallSnapshot(r) => {
                RpcReply::InstallSnapshot(raft.install_snapshot(r).await.map_err(|e| e.to_string()))
            }
            Rpc::ClientWrite(cmd) => RpcReply::Written(self.write(cmd).await),
            Rpc::Join(rec) => match self.to_leader(Rpc::Join(rec.clone())).await {
                None => {
                    let r = self.admit(rec).await;
                    if r.is_ok() {
                        self.balance_voters().await;
                    }
                    RpcReply::Joined(r)
                }
                Some(Ok(reply)) => reply,
                Some(Err(e)) => RpcReply::Joined(Err(e)),
            },
            Rpc::Leave { name } => match self.to_leader(Rpc::Leave { name: name.clone() }).await {
                None => RpcReply::Left(self.remove(&name).await),
                Some(Ok(reply)) => reply,
                Some(Err(e)) => RpcReply::Left(Err(e)),
            },
        }
    }

    fn status(&self) -> ClusterStatus {
        let m = self.raft().metrics().borrow().clone();
        let state = self.state.load_full();
        let mem = m.membership_config.membership();
        let voters: BTreeSet<RaftId> = mem.voter_ids().collect();
        let leader = m
            .current_leader
            .and_then(|id| mem.get_node(&id).map(|n| n.name.clone()));
        let t = self.transport();
        let now = Instant::now();
        let nodes = state
            .nodes
            .values()
            .map(|n| {
                let is_me = n.name == self.me.name;
                let heard = self.heard.get(&n.name).map(|h| *h);
                NodeStatusView {
                    id: n.name.to_string(),
                    http_addr: n.http_addr.clone(),
                    cluster_addr: n.cluster_addr.clone(),
                    status: n.status.as_str().into(),
                    role: if voters.contains(&n.raft_id) {
                        "voter"
                    } else if mem.get_node(&n.raft_id).is_some() {
                        "learner"
                    } else {
                        "none"
                    }
                    .into(),
                    serves: n.serves.iter().map(|s| s.to_string()).collect(),
                    load: if is_me {
                        self.in_flight()
                    } else {
                        heard.map_or(0, |h| h.load)
                    },
                    link: if is_me {
                        "self"
                    } else if t.is_connected(&n.name) {
                        "connected"
                    } else {
                        "disconnected"
                    }
                    .into(),
                    last_heard_ms: if is_me {
                        Some(0)
                    } else {
                        heard
                            .and_then(|h| h.at)
                            .map(|at| now.saturating_duration_since(at).as_millis() as u64)
                    },
                }
            })
            .collect();
        ClusterStatus {
            cluster_id: self.cfg.cluster_id.clone(),
            node: self.me.name.to_string(),
            leader,
            term: m.current_term,
            last_applied_index: m.last_applied.map(|l| l.index),
            last_log_index: m.last_log_index,
            version: state.version,
            raft_state: format!("{:?}", m.state).to_lowercase(),
            nodes,
            forwarded_waiting: self.outbox.len(),
            links: t.links(),
        }
    }
}

/// Counts changes of the leader named in a node's Raft metrics into `changes`, until the
/// cluster stops (or Raft does). Holds only what it reads and writes, so it keeps nothing
/// else of the cluster alive.
async fn count_leader_changes(
    mut metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<RaftId, Member>>,
    changes: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let mut last: Option<RaftId> = None;
    loop {
        let leader = metrics.borrow_and_update().current_leader;
        if leader.is_some() && leader != last {
            last = leader;
            changes.fetch_add(1, Ordering::Relaxed);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = metrics.changed() => if r.is_err() { return },
        }
    }
}

/// Frames arriving on links, handed to the cluster (once it is built, while it runs).
struct InboundAdapter(OnceLock<Weak<Inner>>);

impl InboundAdapter {
    fn inner(&self) -> Option<Arc<Inner>> {
        self.0.get().and_then(Weak::upgrade)
    }
}

impl Inbound for InboundAdapter {
    fn on_message(&self, from: &str, msg: Message) {
        if let Some(inner) = self.inner() {
            inner.on_message(from, msg);
        }
    }

    fn on_link(&self, peer: &str, up: bool) {
        if let Some(inner) = self.inner() {
            inner.on_link(peer, up);
        }
    }
}

/// The replicated routing table, as the engine's [`RouteStore`].
struct ClusterRoutes(Arc<Inner>);

impl RouteStore for ClusterRoutes {
    fn snapshot(&self) -> Arc<RoutingTable> {
        self.0.table.load_full()
    }

    fn set_route(&self, op_type: OpType, route: Route) -> BoxFuture<'static, RouteResult> {
        let inner = self.0.clone();
        async move {
            validate_route(&inner.table.load(), &route)?;
            inner
                .route_write(Command::SetRoute { op_type, route })
                .await
        }
        .boxed()
    }

    fn remove_route(&self, op_type: OpType) -> BoxFuture<'static, RouteResult> {
        let inner = self.0.clone();
        async move {
            if !inner.table.load().routes.contains_key(&op_type) {
                return Err(RouteError::NotFound(op_type.to_string()));
            }
            inner.route_write(Command::RemoveRoute { op_type }).await
        }
        .boxed()
    }
}

/// Sends operations to their owners, as the engine's [`Forwarder`].
struct ClusterForwarder(Arc<Inner>);

impl Forwarder for ClusterForwarder {
    fn forward(&self, node: &NodeId, jobs: Vec<Box<Job>>) {
        let wire = self.0.outbox.hold(node, jobs);
        // Not connected: the operations wait in the outbox, sent when the link comes
        // back, routed again if the node is marked down, expired at their deadline.
        let _ = self.0.transport().send(node, Message::OpBatch(wire));
    }
}
