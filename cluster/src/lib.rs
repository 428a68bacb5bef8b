//! opmesh across nodes.
//!
//! The modules, in the order a cluster event or a remote operation meets them:
//!
//! - [`config`]: [`ClusterConfig`], the one configuration of the cluster layer (identity,
//!   addresses, failure detection, [`Voters`], link settings), checked before anything
//!   binds.
//! - [`secret`]: [`Secret`], the shared key links are authenticated with (and the
//!   previous one, during a rotation); never printed.
//! - [`cluster`]: the [`Cluster`] handle a node holds: start, join and leave, the engine's
//!   routing table and forwarder, what each arriving message does, writes through the
//!   Raft leader, and the supervised background duties.
//! - [`flow`]: back-pressure: which types this node tells the others it is overloaded
//!   with (queues over `flow.high` until under `flow.low`).
//! - [`membership`]: the pure decisions behind those duties: which nodes the leader marks
//!   down or up, which learners may vote, the next voter set.
//! - [`formation`]: the pure decision of a node with no state between joining a cluster
//!   one of its seeds belongs to and bootstrapping one.
//! - [`remote`]: operations forwarded to their owner and their replies: the origin's
//!   outbox (re-sent, re-routed, expired) and the wire form of an operation.
//! - [`replies`]: the owner's ledger of each origin's reply batches until acknowledged
//!   and of its operations running here, so each runs once and each outcome arrives.
//! - [`network`]: Raft's RPCs as request/response frames on the same links, with the
//!   calls waiting for their answers.
//! - [`transport`]: length-prefixed frames over TCP, links that open only after a mutual
//!   handshake (both ends prove the secret over both nonces and names) and then carry
//!   records authenticated under a key of that connection, one writer task per peer
//!   that coalesces and reconnects, and readers that hand messages to the cluster.
//! - [`codec`]: the versioned envelope every frame on a link carries, and its one
//!   `encode`/`decode` (wincode for opmesh's own frames, postcard inside for openraft's
//!   RPC types).
//! - [`types`]: the Raft type configuration and the replicated state: the routing table
//!   and the node registry.
//! - [`store`]: the Raft log, vote and snapshots in redb (on disk under the data dir, in
//!   memory without one) and the state machine that applies commands.

#![forbid(unsafe_code)]

pub mod cluster;
pub mod codec;
pub mod config;
pub mod flow;
pub mod formation;
pub mod membership;
pub mod network;
mod notified;
pub mod remote;
pub mod replies;
pub mod secret;
pub mod store;
pub mod transport;
pub mod types;

pub use cluster::{
    Cluster, ClusterError, ClusterStatus, JoinError, JoinFailure, LeaveError, NodeStatusView,
};
pub use config::{ClusterConfig, LinkConfigError, Voters, VotersError};
pub use formation::SeedBootstrap;
pub use secret::Secret;
