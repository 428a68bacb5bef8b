//! opmesh: an actor-based cluster runtime for operations.
//!
//! This crate is the facade and the binary's wiring: the engine comes from
//! [`opmesh_actors`] (re-exported here, so `opmesh::Node::builder()` is the library
//! entry point); [`config`] loads and validates settings; [`api`] serves HTTP;
//! [`handlers`] holds the built-in handlers; [`metrics`] serves `GET /metrics`; [`bench`] is the load generator; [`cli`]
//! parses commands.

#![forbid(unsafe_code)]

pub use opmesh_actors::*;
/// The cluster layer: codec, links, Raft store, membership, remote execution.
pub use opmesh_cluster as cluster;

pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod events_api;
pub mod handlers;
pub mod logging;
pub mod metrics;
mod otlp;
pub mod telemetry;
