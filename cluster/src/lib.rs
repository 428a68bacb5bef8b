//! opmesh across nodes.
//!
//! - [`codec`]: the versioned envelope every frame on a link carries, and its one
//!   `encode`/`decode` (wincode for opmesh's own frames, postcard inside for openraft's
//!   RPC types).
//! - [`transport`]: length-prefixed frames over TCP, one writer task per peer that
//!   coalesces and reconnects, links that open only after an authenticated `Hello`.
//! - [`types`]: the Raft type configuration and the replicated state: the routing table
//!   and the node registry.
//! - [`store`]: the Raft log, vote and snapshots in redb (on disk under the data dir, in
//!   memory without one) and the state machine that applies commands.

#![forbid(unsafe_code)]

pub mod cluster;
pub mod codec;
pub mod network;
pub mod remote;
pub mod store;
pub mod transport;
pub mod types;

pub use cluster::{Cluster, ClusterConfig, ClusterError, ClusterStatus, JoinError};
