//! The HTTP api (actix-web): turns requests into operations for the [`Node`] and answers
//! in the shapes other tools code against (see DESIGN.md, "What a user sees").
//!
//! Every handler validates its input and answers bad input with
//! `{"error": "<code>", "message": "<names the field>"}` and the right status; nothing a
//! client sends can panic the node.
//!
//! One module per concern, in the order a request meets them:
//!
//! - [`auth`]: every endpoint and who may call it; the token check before each handler.
//! - [`limits`]: what the api admits: rate limits (global, per client), the in-flight cap.
//! - [`model`]: request and answer bodies.
//! - [`answer`]: answers about operations, written straight into the body.
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

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use opmesh_actors::Node;
use opmesh_cluster::Cluster;

use crate::telemetry::Telemetry;
use dashboard::Dashboard;
use events::Live;

pub mod answer;
pub mod auth;
pub mod cluster;
pub mod dashboard;
pub mod errors;
pub mod events;
pub mod limits;
pub mod model;
pub mod openapi;
pub mod ops;
pub mod probes;
pub mod routes;
pub mod traffic;

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
    /// Most operations one batch request may carry (`http.max_batch_ops`).
    pub max_batch_ops: usize,
    /// Event streams open at once at most (`events.max_subscribers`).
    pub max_subscribers: usize,
    pub keep_alive: Duration,
    /// How long in-flight operations get to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// The trace pipeline's counters and the dashboard's Jaeger link.
    pub telemetry: Telemetry,
    /// The api's tokens (`None`: open) and whether `/metrics` needs one.
    pub tokens: Option<Arc<crate::auth::Tokens>>,
    pub protect_metrics: bool,
    /// Rate limits and the in-flight cap of submissions (`[limits]`).
    pub limits: crate::config::LimitsConfig,
    /// The journal of accepted operations (`engine.journal`): 202 answers wait for it.
    pub journal: Option<crate::journal::Journal>,
}

pub(crate) struct AppState {
    node: Node,
    cluster: Option<Cluster>,
    max_body_bytes: usize,
    max_batch_ops: usize,
    shutdown_grace: Duration,
    /// Fired when the node has left its cluster (`POST /v1/cluster/leave`): the process
    /// then shuts down.
    left: Arc<tokio::sync::Notify>,
    telemetry: Telemetry,
    /// Requests by endpoint and status, for `GET /metrics`.
    traffic: web::Data<traffic::HttpMetrics>,
    /// The limits submissions pass before the node sees them.
    admission: Arc<limits::Admission>,
    /// Where operations answered 202 are written first, when `engine.journal` is on.
    journal: Option<crate::journal::Journal>,
}

/// What answers a request no endpoint takes: 405 with `Allow` when the path is an
/// endpoint's with another method, else 404.
async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let allowed = auth::allowed_methods(req.path());
    if allowed.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no endpoint {} {}", req.method(), req.path()),
        ));
    }
    let allow = allowed.join(", ");
    Err(ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} {} is not allowed; allowed: {allow}",
            req.method(),
            req.path()
        ),
    )
    .with_header(
        header::ALLOW,
        HeaderValue::from_str(&allow).expect("method names are header-safe"),
    ))
}

/// Adds opmesh's routes to an actix-web service config: every row of
/// [`auth::ENDPOINTS`], and nothing else. The endpoints of one path are one resource,
/// which answers a method it does not have with 405 (a request never falls through to
/// another pattern: `GET /v1/ops/batch` is not read as the operation `batch`).
pub fn configure(cfg: &mut web::ServiceConfig) {
    let mut paths: Vec<&'static str> = Vec::new();
    for e in auth::ENDPOINTS {
        if !paths.contains(&e.path) {
            paths.push(e.path);
        }
    }
    for path in paths {
        let mut resource = web::resource(path).default_service(web::to(not_found));
        for e in auth::ENDPOINTS.iter().filter(|e| e.path == path) {
            resource = resource.route(e.route());
        }
        cfg.service(resource);
    }
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
    /// Stops the background tasks: the tokens file's watcher, the client limits' sweep.
    watching: tokio_util::sync::CancellationToken,
    journal: Option<crate::journal::Journal>,
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
    let traffic = web::Data::new(traffic::HttpMetrics::default());
    let admission = Arc::new(limits::Admission::new(
        &settings.limits,
        node.config().overload_retry_after,
    ));
    let state = web::Data::new(AppState {
        admission: admission.clone(),
        traffic: traffic.clone(),
        node,
        cluster: cluster.clone(),
        max_body_bytes: settings.max_body_bytes,
        max_batch_ops: settings.max_batch_ops,
        shutdown_grace: settings.shutdown_grace,
        left: left.clone(),
        telemetry: settings.telemetry.clone(),
        journal: settings.journal.clone(),
    });
    let live = web::Data::new(Live::with_max_streams(
        state.node.clone(),
        cluster.clone(),
        settings.max_subscribers,
    ));
    let dashboard = web::Data::new(Dashboard {
        node: state.node.id().to_string(),
        telemetry: settings.telemetry.clone(),
    });
    let guard = web::Data::new(auth::Guard {
        tokens: settings.tokens.clone(),
        protect_metrics: settings.protect_metrics,
    });
    let watching = tokio_util::sync::CancellationToken::new();
    if let Some(tokens) = &settings.tokens {
        tokio::spawn(tokens.clone().watch(watching.clone()));
    }
    tokio::spawn(admission.sweep(watching.clone()));
    let live_state = live.clone();
    let server = HttpServer::new(move || {
        App::new()
            .wrap(actix_web::middleware::from_fn(auth::authorize))
            // Outermost: refusals are counted too.
            .wrap(actix_web::middleware::from_fn(traffic::measure))
            .app_data(traffic.clone())
            .app_data(guard.clone())
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
        watching,
        journal: settings.journal.clone(),
    })
}

impl Server {
    /// The cluster this node's api speaks for, if any.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// The journal of accepted operations, when `engine.journal` is on.
    pub fn journal(&self) -> Option<&crate::journal::Journal> {
        self.journal.as_ref()
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
        self.watching.cancel();
        self.handle.stop(true).await;
        match self.task.await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}
