//! What the [`Cluster`](super::Cluster) handle's fallible calls answer when they fail:
//! starting ([`ClusterError`], fatal: the node cannot take part), joining
//! ([`JoinError`]) and leaving ([`LeaveError`]), both per request: answer and go on.

use std::net::SocketAddr;

use crate::config::LinkConfigError;
use crate::network::CallError;
use crate::store::StoreError;
use crate::types::{Member, RaftId};

/// Why a cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot open the Raft store: {0}")]
    Store(#[from] StoreError),
    /// A link setting is out of its range.
    #[error("invalid cluster link settings: {0}")]
    Config(#[from] LinkConfigError),
    #[error("cannot listen on the cluster address {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    /// openraft refused the Raft settings derived from the configuration.
    #[error("cannot start Raft: {0}")]
    RaftConfig(#[from] openraft::ConfigError),
    #[error("cannot start Raft: {0}")]
    Raft(#[from] openraft::error::Fatal<RaftId>),
}

/// Why `join` did not happen.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// This node belongs to a cluster already (it bootstrapped one, or joined one); its
    /// log cannot merge into another. Start it with `--join` and no state instead.
    #[error("node `{node}` already belongs to a cluster; to add a node to another cluster, start it with --join and no state")]
    AlreadyMember { node: String },
    /// Asking `seed` (or the leader it forwarded to) to admit this node failed.
    #[error("{cause}")]
    Failed {
        seed: String,
        #[source]
        cause: JoinFailure,
    },
}

/// Why a seed did not admit this node.
#[derive(Debug, thiserror::Error)]
pub enum JoinFailure {
    /// The leader, or the seed on its behalf, refused; `leader` is who leads when known.
    #[error("{message}")]
    Refused {
        message: String,
        leader: Option<Member>,
    },
    /// The seed could not be reached, or did not answer in time.
    #[error(transparent)]
    Unreachable(#[from] CallError),
    /// The seed answered something other than a join answer (a node of another version).
    #[error("unexpected answer {0}")]
    Unexpected(String),
}

/// Why `leave` did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaveError {
    /// A leave is already under way on this node.
    #[error("this node is already leaving")]
    AlreadyLeaving,
    /// The cluster did not take the mark that routes move away from this node; nothing
    /// changed and the node may try again.
    #[error("cannot mark this node leaving: {message}")]
    NotMarked {
        message: String,
        leader: Option<Member>,
    },
    /// The node is marked leaving (routes moved away) but the leader did not remove it
    /// from the registry or the Raft group.
    #[error("{message}")]
    NotRemoved {
        message: String,
        leader: Option<Member>,
    },
}
