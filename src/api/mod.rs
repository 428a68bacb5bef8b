//! The HTTP api (actix-web): turns requests into operations for the [`Node`] and answers
//! in the shapes other tools code against (see DESIGN.md, "What a user sees").
//!
//! Every handler validates its input and answers bad input with
//! `{"error": "<code>", "message": "<names the field>"}` and the right status; nothing a
//! client sends can panic the node.
//!
//! One module per concern, in the order a request meets them:
//!
//! - [`model`]: request and answer bodies.
//! - [`errors`]: [`ApiError`], how the engine's errors map onto statuses, body reading.
//! - [`ops`]: submit, batch, read an operation.
//! - [`routes`]: the routing table.
//! - [`cluster`]: cluster status, join, leave.
//! - [`probes`]: `/healthz`, `/readyz`, JSON and OpenMetrics figures.
//! - [`events`]: live events (SSE) and recent failures.
//! - [`dashboard`]: the page at `/`.
//! - [`openapi`]: the OpenAPI document.
//!
//! This module binds them into one server ([`start`]); the process's shutdown order lives
//! in [`crate::server`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use opmesh_actors::Node;
use opmesh_cluster::Cluster;

use crate::telemetry::Telemetry;
use dashboard::Dashboard;
use events::Live;

pub mod cluster;
pub mod dashboard;
pub mod errors;
pub mod events;
pub mod model;
pub mod openapi;
pub mod ops;
pub mod probes;
pub mod routes;

pub use errors::{ApiError, ErrorBody};
pub use model::{
    BatchAnswer, BatchItem, BatchRequest, OpAnswer, OpRequest, RouteAnswer, RouteRequest,
    RouteView, RoutesAnswer, WaitQuery,
};
pub use openapi::{openapi, ApiDoc};

/// How the HTTP server runs.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    pub addr: SocketAddr,
    pub workers: usize,
    /// Largest request body accepted (a batch included).
    pub max_body_bytes: usize,
    pub keep_alive: Duration,
    /// How long in-flight operations get to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// The trace pipeline's counters and the dashboard's Jaeger link.
    pub telemetry: Telemetry,
}

/// Most operations one batch request may carry.
pub const MAX_BATCH: usize = 100_000;

pub(crate) struct AppState {
    node: Node,
    cluster: Option<Cluster>,
    max_body_bytes: usize,
    shutdown_grace: Duration,
    /// Fired when the node has left its cluster (`POST /v1/cluster/leave`): the process
    /// then shuts down.
    left: Arc<tokio::sync::Notify>,
    telemetry: Telemetry,
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    let status = StatusCode::NOT_FOUND;
    HttpResponse::build(status).json(ErrorBody {
        error: "not_found".into(),
        message: format!("no endpoint {} {}", req.method(), req.path()),
    })
}

/// Adds opmesh's routes to an actix-web service config.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/ops", web::post().to(ops::submit))
        .route("/v1/ops/batch", web::post().to(ops::submit_batch))
        .route("/v1/ops/{id}", web::get().to(ops::get_op))
        .route("/v1/routes", web::get().to(routes::list_routes))
        .route("/v1/routes/{type}", web::get().to(routes::get_route))
        .route("/v1/routes/{type}", web::put().to(routes::put_route))
        .route("/v1/routes/{type}", web::delete().to(routes::delete_route))
        .route("/v1/health", web::get().to(probes::health))
        .route("/v1/metrics", web::get().to(probes::metrics))
        .route("/metrics", web::get().to(probes::prometheus_metrics))
        .route("/healthz", web::get().to(probes::healthz))
        .route("/readyz", web::get().to(probes::readyz))
        .route("/v1/cluster", web::get().to(cluster::cluster_status))
        .route("/v1/cluster/leave", web::post().to(cluster::cluster_leave))
        .route("/v1/cluster/join", web::post().to(cluster::cluster_join))
        .route("/v1/bench/hello", web::post().to(probes::hello))
        .route("/openapi.json", web::get().to(openapi::openapi_json))
        .route("/v1/events", web::get().to(events::events))
        .route("/v1/failures", web::get().to(events::failures))
        .route("/v1/dashboard/config", web::get().to(dashboard::config))
        .route("/", web::get().to(dashboard::index))
        .route("/dashboard/app.js", web::get().to(dashboard::app_js))
        .route("/dashboard/style.css", web::get().to(dashboard::style_css));
}

fn query_error(e: actix_web::error::QueryPayloadError, _: &HttpRequest) -> actix_web::Error {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_field",
        format!("query string: {e}"),
    )
    .into()
}

fn path_error(e: actix_web::error::PathError, _: &HttpRequest) -> actix_web::Error {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_field",
        format!("path: {e}"),
    )
    .into()
}

/// A bound, running HTTP server.
pub struct Server {
    pub addr: SocketAddr,
    cluster: Option<Cluster>,
    left: Arc<tokio::sync::Notify>,
    handle: actix_web::dev::ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The event streams and their background tasks.
    live: Live,
}

/// Binds the api for `node` and starts serving, over https when `listener` brings a TLS
/// config (a plain `TcpListener` serves http). The caller decides when to stop (see
/// [`crate::server::run_until`]).
pub fn start(
    node: Node,
    cluster: Option<Cluster>,
    listener: impl Into<crate::tls::Listener>,
    settings: &ApiSettings,
) -> std::io::Result<Server> {
    let listener = listener.into();
    let left = Arc::new(tokio::sync::Notify::new());
    let state = web::Data::new(AppState {
        node,
        cluster: cluster.clone(),
        max_body_bytes: settings.max_body_bytes,
        shutdown_grace: settings.shutdown_grace,
        left: left.clone(),
        telemetry: settings.telemetry.clone(),
    });
    let live = web::Data::new(Live::start(state.node.clone(), cluster.clone()));
    let dashboard = web::Data::new(Dashboard {
        node: state.node.id().to_string(),
        telemetry: settings.telemetry.clone(),
    });
    let live_state = live.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(live_state.clone())
            .app_data(dashboard.clone())
            .app_data(web::QueryConfig::default().error_handler(query_error))
            .app_data(web::PathConfig::default().error_handler(path_error))
            .configure(configure)
            .default_service(web::to(not_found))
    })
    .workers(settings.workers.max(1))
    .keep_alive(settings.keep_alive)
    .disable_signals()
    .shutdown_timeout(settings.shutdown_grace.as_secs().max(1));
    let server = match listener.tls {
        None => server.listen(listener.tcp)?,
        Some(tls) => server.listen_rustls_0_23(listener.tcp, tls)?,
    };
    let addr = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| std::io::Error::other("the server bound no address"))?;
    let server = server.run();
    let handle = server.handle();
    let task = tokio::spawn(server);
    Ok(Server {
        addr,
        handle,
        task,
        cluster,
        left,
        live: Live::clone(&live),
    })
}

impl Server {
    /// The cluster this node's api speaks for, if any.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// Completes when a client has made this node leave its cluster
    /// (`POST /v1/cluster/leave`): the process then shuts down.
    pub async fn left_cluster(&self) {
        self.left.notified().await
    }

    /// Ends the event streams first (they never finish by themselves, and the graceful
    /// stop would wait its whole timeout for them), then lets open requests finish and
    /// stops serving.
    pub async fn stop(self) -> std::io::Result<()> {
        self.live.shutdown();
        self.handle.stop(true).await;
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}
