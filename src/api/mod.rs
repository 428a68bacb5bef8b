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

#[derive(Clone)]
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
    /// What the server's thread ended with.
    task: tokio::sync::oneshot::Receiver<std::io::Result<()>>,
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
    Ok(bind(listener, settings)?.serve(node, cluster, settings.journal.clone()))
}

/// The api bound to its address, its workers starting: each waits for the node before it
/// serves ([`Bound::serve`]). Until then the node can be started on the workers' own
/// runtimes ([`Bound::worker_runtimes`]). Dropped without serving, the workers stop.
pub struct Bound {
    addr: SocketAddr,
    handle: actix_web::dev::ServerHandle,
    /// What the server's thread ended with.
    task: tokio::sync::oneshot::Receiver<std::io::Result<()>>,
    ready: tokio::sync::watch::Sender<Option<Ready>>,
    /// Each worker's runtime as the worker starts, with the number of the home shard
    /// its thread took.
    workers: tokio::sync::mpsc::UnboundedReceiver<(usize, tokio::runtime::Handle)>,
    worker_count: usize,
    left: Arc<tokio::sync::Notify>,
    traffic: web::Data<traffic::HttpMetrics>,
    settings: ApiSettings,
}

/// What the workers wait for: the state of the handlers, once the node runs.
#[derive(Clone)]
struct Ready {
    state: AppState,
    live: Live,
    dashboard: Dashboard,
}

/// A data factory for a worker's App: the part of [`Ready`] that `part` picks, once it
/// is there, so the worker starts serving only then. It fails the worker's start when
/// the api is dropped without serving.
fn when_ready<T: 'static>(
    ready: &tokio::sync::watch::Receiver<Option<Ready>>,
    part: fn(&Ready) -> T,
) -> impl Fn() -> futures::future::LocalBoxFuture<'static, Result<T, &'static str>> {
    let ready = ready.clone();
    move || {
        let mut ready = ready.clone();
        Box::pin(async move {
            let got = ready
                .wait_for(Option::is_some)
                .await
                .map_err(|_| "the api was dropped before its node started")?;
            Ok(part(got.as_ref().expect("waited for")))
        })
    }
}

/// Binds the api and starts its workers (see [`Bound`]).
pub fn bind(
    listener: impl Into<crate::tls::Listener>,
    settings: &ApiSettings,
) -> std::io::Result<Bound> {
    let listener = listener.into();
    let left = Arc::new(tokio::sync::Notify::new());
    let traffic = web::Data::new(traffic::HttpMetrics::default());
    let guard = web::Data::new(auth::Guard {
        tokens: settings.tokens.clone(),
        protect_metrics: settings.protect_metrics,
    });
    let (ready, ready_rx) = tokio::sync::watch::channel(None::<Ready>);
    let (worker_tx, workers) = tokio::sync::mpsc::unbounded_channel();
    let worker_count = settings.workers.max(1);
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app_traffic = traffic.clone();
    // Called once on each worker's thread, in its runtime, as the worker starts. (Actix
    // also calls it on the thread of a worker it starts anew after one died: that thread
    // takes a home shard too, but the actors of the dead worker's shard died with its
    // runtime and are not moved there. Actix keeps a worker alive when a handler panics,
    // only the connection's task ends, so this takes a fault in actix itself.)
    let server = HttpServer::new(move || {
        let n = started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        opmesh_actors::shard::make_home(n);
        let _ = worker_tx.send((n, tokio::runtime::Handle::current()));
        App::new()
            .wrap(actix_web::middleware::from_fn(auth::authorize))
            // Outermost: refusals are counted too.
            .wrap(actix_web::middleware::from_fn(traffic::measure))
            .app_data(app_traffic.clone())
            .app_data(guard.clone())
            .data_factory(when_ready(&ready_rx, |r| r.state.clone()))
            .data_factory(when_ready(&ready_rx, |r| r.live.clone()))
            .data_factory(when_ready(&ready_rx, |r| r.dashboard.clone()))
            .app_data(web::QueryConfig::default().error_handler(query_error))
            .app_data(web::PathConfig::default().error_handler(path_error))
            .configure(configure)
            .default_service(web::to(not_found))
    })
    .workers(worker_count)
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
    // The server's first poll starts the workers and blocks until each has started,
    // which is after the node runs: so it is driven from a thread of its own (not one of
    // the runtime's blocking pool: a runtime that shuts down waits for those, and would
    // wait for a server nobody stopped forever).
    let rt = tokio::runtime::Handle::current();
    let (done, task) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("opmesh-http".into())
        .spawn(move || {
            let _ = done.send(rt.block_on(server));
        })?;
    Ok(Bound {
        addr,
        handle,
        task,
        ready,
        workers,
        worker_count,
        left,
        traffic,
        settings: settings.clone(),
    })
}

impl Bound {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The runtime of each worker, once all have started, in the order of the home
    /// shards their threads took: the thread of the `i`th has made shard `i` its home
    /// ([`opmesh_actors::shard::make_home`]). Fails when the server stopped first.
    pub async fn worker_runtimes(&mut self) -> std::io::Result<Vec<tokio::runtime::Handle>> {
        // Placed by the number each took, not by arrival: two workers starting at once
        // may report in the other order, and shard `i` must run on the thread whose home
        // it is.
        let mut runtimes: Vec<Option<tokio::runtime::Handle>> = vec![None; self.worker_count];
        while runtimes.iter().any(Option::is_none) {
            match self.workers.recv().await {
                Some((n, rt)) => {
                    if let Some(slot) = runtimes.get_mut(n) {
                        *slot = Some(rt);
                    }
                }
                None => {
                    return Err(std::io::Error::other(
                        "the HTTP server stopped before its workers started",
                    ))
                }
            }
        }
        Ok(runtimes.into_iter().flatten().collect())
    }

    /// Serves `node` (and `cluster`, and `journal`): the workers start answering.
    pub fn serve(
        self,
        node: Node,
        cluster: Option<Cluster>,
        journal: Option<crate::journal::Journal>,
    ) -> Server {
        let settings = &self.settings;
        let watching = tokio_util::sync::CancellationToken::new();
        if let Some(tokens) = &settings.tokens {
            tokio::spawn(tokens.clone().watch(watching.clone()));
        }
        let admission = Arc::new(limits::Admission::new(
            &settings.limits,
            node.config().overload_retry_after,
        ));
        tokio::spawn(admission.clone().sweep(watching.clone()));
        let live = Live::with_max_streams(node.clone(), cluster.clone(), settings.max_subscribers);
        let dashboard = Dashboard {
            node: node.id().to_string(),
            telemetry: settings.telemetry.clone(),
        };
        let state = AppState {
            admission,
            traffic: self.traffic.clone(),
            node,
            cluster: cluster.clone(),
            max_body_bytes: settings.max_body_bytes,
            max_batch_ops: settings.max_batch_ops,
            shutdown_grace: settings.shutdown_grace,
            left: self.left.clone(),
            telemetry: settings.telemetry.clone(),
            journal: journal.clone(),
        };
        self.ready.send_replace(Some(Ready {
            state,
            live: live.clone(),
            dashboard,
        }));
        Server {
            addr: self.addr,
            handle: self.handle,
            task: self.task,
            cluster,
            left: self.left,
            live,
            watching,
            journal,
        }
    }
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
            Err(_) => Err(std::io::Error::other(
                "the HTTP server's thread ended without a result",
            )),
        }
    }
}
