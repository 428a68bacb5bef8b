//! opmesh: an actor-based cluster runtime for operations.
//!
//! This crate is the facade and the binary's wiring. The engine comes from
//! [`opmesh_actors`] (re-exported here, so `opmesh::Node::builder()` is the library entry
//! point) and the cluster layer from [`opmesh_cluster`] (as [`cluster`]). The modules,
//! in the order a started node meets them:
//!
//! - [`cli`]: the command line (`serve`, the client commands, `bench`).
//! - [`config`]: layered settings (defaults, profile, file, environment, flags) checked
//!   into one [`config::Config`].
//! - [`server`]: a `Config` in, a running node out (cluster, engine, HTTP, telemetry),
//!   and the order in which it stops.
//! - [`telemetry`]: OTLP trace export of the engine's span records (its encoder in
//!   `otlp`); [`logging`]: JSON or pretty log lines with trace ids.
//! - [`handlers`]: the built-in handlers (`echo`, `sleep`, `resize`, webhooks).
//! - [`journal`]: accepted operations on disk (`engine.journal`), submitted again after
//!   a restart.
//! - [`api`]: the HTTP api, the live events and the dashboard.
//! - [`tls`]: the api's TLS (a certificate reloaded when its files change, client
//!   certificates) and the CA files the clients trust (`--cacert`, a webhook's
//!   `ca_file`).
//! - [`metrics`]: `GET /metrics`, read from the engine's counters at scrape time.
//! - [`bench`]: the load generator behind `opmesh bench`.

#![forbid(unsafe_code)]

pub use opmesh_actors::*;
/// The cluster layer: codec, links, Raft store, membership, remote execution.
pub use opmesh_cluster as cluster;

pub mod api;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod config;
pub mod handlers;
pub mod journal;
pub mod logging;
pub mod metrics;
mod otlp;
pub mod server;
pub mod telemetry;
pub mod tls;
