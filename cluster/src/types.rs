//! The Raft type configuration and the state it replicates: the routing table (per
//! operation type, a strategy and the nodes that may run it) and the node registry (id,
//! addresses, the types a node serves, up/down/leaving).

use std::collections::{BTreeMap, VecDeque};
use std::io::Cursor;
use std::sync::Arc;

pub use opmesh_actors::routing::AuditEntry;
use opmesh_actors::{stable_id, NodeId, OpType, Route};
use serde::{Deserialize, Serialize};

/// Raft's numeric node id: a stable 64-bit hash of the node's name (see [`raft_id`]).
pub type RaftId = u64;

/// What openraft stores of each member: the addresses to reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's name (`--node-id`), as users and the routing table know it.
    pub name: String,
    /// Where its cluster port listens (`--cluster-addr`).
    pub cluster_addr: String,
    /// Where its HTTP API listens.
    pub http_addr: String,
}

impl std::fmt::Display for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {}", self.name, self.cluster_addr)
    }
}

openraft::declare_raft_types!(
    /// opmesh's Raft: commands change the routing table and the node registry.
    pub TypeConfig:
        D = Request,
        R = CommandResult,
        NodeId = RaftId,
        Node = Member,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<RaftId>;
pub type Vote = openraft::Vote<RaftId>;
pub type StoredMembership = openraft::StoredMembership<RaftId, Member>;
pub type SnapshotMeta = openraft::SnapshotMeta<RaftId, Member>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type SnapshotData = Cursor<Vec<u8>>;

/// The Raft id of the node named `name`: the engine's [`stable_id`] (FNV-1a of its
/// bytes, folded). Stable across processes and versions, so every node computes the same
/// id; a join whose id collides with another name's is refused.
pub fn raft_id(name: &str) -> RaftId {
    stable_id(name)
}

/// Whether a node may be routed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Up,
    /// The leader's failure detector has not heard from it.
    Down,
    /// It is handing off and leaving the cluster.
    Leaving,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Up => "up",
            NodeStatus::Down => "down",
            NodeStatus::Leaving => "leaving",
        }
    }
}

/// One node of the registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: NodeId,
    pub raft_id: RaftId,
    pub cluster_addr: String,
    pub http_addr: String,
    /// The operation types it has handlers for; a type with no explicit route goes to
    /// the nodes that serve it.
    pub serves: Vec<OpType>,
    pub status: NodeStatus,
}

/// The replicated state: what every node routes by.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Raises with every applied change (route or registry); the routing table's version.
    pub version: u64,
    pub routes: BTreeMap<OpType, Route>,
    /// By node name.
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    /// The last committed changes, oldest first, with who made them and when (at most
    /// `cluster.audit_entries`). Shared, so publishing the state does not copy it.
    #[serde(default)]
    pub audit: Arc<VecDeque<AuditEntry>>,
}

/// A command with who asked for it and when: the `D` of the Raft log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
    /// See [`AuditEntry::by`].
    pub by: String,
    pub at_ms: u64,
}

impl Request {
    /// `command`, asked for by `by` now.
    pub fn new(command: Command, by: impl Into<String>) -> Request {
        Request {
            command,
            by: by.into(),
            at_ms: opmesh_actors::routing::now_ms(),
        }
    }
}

/// A change to the replicated state (the Raft log carries it in a [`Request`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Sets the route of a type. Refused if it names a node the registry does not know.
    SetRoute { op_type: OpType, route: Route },
    /// Removes the route of a type. Refused if there is none.
    RemoveRoute { op_type: OpType },
    /// Adds a node to the registry, or updates its addresses and types (a restart), as up.
    NodeJoined(NodeRecord),
    /// Marks a node up, down or leaving.
    SetStatus { name: NodeId, status: NodeStatus },
    /// Removes a node from the registry (it left).
    NodeLeft { name: NodeId },
}

/// What applying a command gave: the state's version after it, or why it was refused
/// (the state is unchanged then).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub version: u64,
    pub error: Option<String>,
}
