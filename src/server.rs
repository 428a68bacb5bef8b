//! One node as a process: a validated [`Config`] in, a running node out, and the order
//! in which it stops.
//!
//! [`start`] builds the node from the configuration, edge first: it binds the HTTP port
//! (the cluster registry carries its real address) and loads its TLS certificate when
//! `http.tls_cert` is set (a task reloads it when its files change), starts trace export
//! and logging,
//! registers the built-in handlers, starts the cluster layer when `cluster.addr` is set,
//! then the engine on it, then opens the journal when `engine.journal` is on (submitting
//! again what it holds), then the HTTP api. [`Running::run_until`] serves until a
//! shutdown signal (or `POST /v1/cluster/leave`) and stops the node in the one order
//! that loses nothing it can keep (see [`run_until`]), then flushes the last spans.
//!
//! Nothing here decides anything a test would need: the decisions live in the engine,
//! the cluster crate, the config and the api; this module wires them.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use opmesh_actors::{Node, NodeBuilder, OpType, StartError};
use opmesh_cluster::{Cluster, ClusterConfig, ClusterError};

use crate::api::{self, ApiSettings};
use crate::config::Config;
use crate::journal::{Journal, JournalError};
use crate::telemetry::{Telemetry, TelemetryError};
use crate::tls::{Listener, Reloader, ServerTls, TlsError};
use crate::{handlers, logging};

/// How long the last spans get to reach the receiver once the node has stopped.
const TRACE_FLUSH: Duration = Duration::from_secs(5);

/// Why a node did not start. Each is fatal; [`ServeError::exit_code`] tells the process's
/// exit status (2 for a configuration the node cannot run with, 1 for anything else).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },
    /// The api's certificate, key or client CA file cannot be used.
    #[error("configuration error: TLS for the api: {0}")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    /// `cluster.serves` names a type the engine has no handler for.
    #[error(
        "configuration error: cluster.serves lists `{op_type}`, which has no handler on this \
         node (handlers: {})", handlers.join(", ")
    )]
    Serves {
        op_type: String,
        handlers: Vec<String>,
    },
    #[error("cannot start the cluster layer: {0}")]
    Cluster(Box<ClusterError>),
    #[error(transparent)]
    Engine(#[from] StartError),
    /// The journal (`engine.journal`) cannot be opened or read.
    #[error("{0}")]
    Journal(#[from] JournalError),
    /// The HTTP server failed while the node was stopping.
    #[error("{0}")]
    Stop(std::io::Error),
}

impl From<ClusterError> for ServeError {
    fn from(e: ClusterError) -> Self {
        ServeError::Cluster(Box::new(e))
    }
}

impl ServeError {
    /// The process's exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            ServeError::Serves { .. } | ServeError::Tls(_) => 2,
            _ => 1,
        }
    }
}

/// How a node stopped: what was cut short. A clean stop has neither.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stopped {
    /// Operations still unfinished when the grace period ended (they failed with a
    /// reason).
    pub unfinished: usize,
    /// Why the hand-off to the cluster did not complete, when it did not.
    pub handoff: Option<String>,
}

impl Stopped {
    /// Whether everything finished: the process then exits 0, else 1.
    pub fn is_clean(&self) -> bool {
        self.unfinished == 0 && self.handoff.is_none()
    }
}

/// Starts the node `cfg` describes, says where it listens on stdout (tests and scripts
/// read these lines), serves until SIGINT or SIGTERM and stops: the hand-off, the drain
/// and the exit are each bounded, so a node always exits. Returns what was cut short.
pub async fn serve(cfg: &Config) -> Result<Stopped, ServeError> {
    // Before anything says the node is up: a signal from then on starts a drain.
    let signal = shutdown_signal();
    let running = start(cfg).await?;
    if let Some(c) = running.cluster() {
        println!("opmesh cluster port {}", c.cluster_addr());
    }
    let scheme = if cfg.http.tls.is_some() {
        "https"
    } else {
        "http"
    };
    println!("opmesh listening on {scheme}://{}", running.http_addr());
    tracing::info!(node = %cfg.node_id, addr = %running.http_addr(), profile = ?cfg.profile, "serving");
    running.run_until(signal).await.map_err(ServeError::Stop)
}

/// A node that serves: its engine, its cluster membership (if any), its HTTP api and its
/// trace pipeline.
pub struct Running {
    pub node: Node,
    /// The HTTP api; it also holds the node's cluster handle (see [`Running::cluster`]).
    pub http: api::Server,
    pub telemetry: Telemetry,
    grace: Duration,
    /// Reloads the api's certificate while the node runs (https only).
    _tls_reload: Option<Reloader>,
}

/// Builds and starts the node `cfg` describes. Sets up the process's logging (once its
/// trace export is known), so call it once per process.
pub async fn start(cfg: &Config) -> Result<Running, ServeError> {
    let listen = |addr: SocketAddr| move |error: std::io::Error| ServeError::Listen { addr, error };
    let listener = std::net::TcpListener::bind(cfg.http.addr).map_err(listen(cfg.http.addr))?;
    let http_addr = listener.local_addr().map_err(listen(cfg.http.addr))?;
    let (listener, tls_reload) = with_tls(listener, cfg)?;
    let telemetry = Telemetry::start(&cfg.telemetry, &cfg.node_id)?;
    logging::init(telemetry.otel_layer());
    if let Some(t) = &cfg.telemetry.traces {
        tracing::info!(endpoint = %t.endpoint, protocol = t.protocol.as_str(), sampling_ratio = t.sampling_ratio, "exporting traces");
    }

    let settings = ApiSettings {
        addr: cfg.http.addr,
        workers: cfg.http.workers,
        max_body_bytes: cfg.http.max_body_bytes,
        max_batch_ops: cfg.http.max_batch_ops,
        max_subscribers: cfg.max_subscribers,
        keep_alive: cfg.http.keep_alive,
        shutdown_grace: cfg.shutdown_grace,
        telemetry: telemetry.clone(),
        tokens: cfg
            .auth
            .tokens
            .as_ref()
            .map(|(path, set)| crate::auth::Tokens::new(path.clone(), set.clone())),
        protect_metrics: cfg.auth.protect_metrics,
        limits: cfg.limits.clone(),
        journal: None,
    };
    // The api's workers start first and wait for the node: with `engine.shard_threads`
    // the shards run on them, so that a request's operations stay on its worker's thread.
    let mut http = api::bind(listener, &settings).map_err(listen(cfg.http.addr))?;
    let runtimes = match cfg.engine.shard_threads {
        true => http
            .worker_runtimes()
            .await
            .map_err(listen(cfg.http.addr))?,
        false => Vec::new(),
    };
    let builder = Node::builder()
        .node_id(cfg.node_id.as_str())
        .config(cfg.engine.clone())
        .shard_runtimes(runtimes.clone())
        .tracing(telemetry.tracing());
    let builder = handlers::register(builder, &cfg.builtin_handlers, &cfg.http_handlers);
    let cluster = match &cfg.cluster {
        None => None,
        // The links on the workers too: what a peer sends is handled on the thread of
        // the shard it goes to.
        Some(c) => Some(start_cluster(c, http_addr, &builder, runtimes).await?),
    };
    let node = match &cluster {
        Some(c) => c.start_node(builder).await?,
        None => builder.start().await?,
    };
    let journal = match &cfg.journal {
        None => None,
        Some(j) => Some(open_journal(j, &node)?),
    };

    let http = http.serve(node.clone(), cluster, journal);
    Ok(Running {
        node,
        http,
        telemetry,
        grace: cfg.shutdown_grace,
        _tls_reload: tls_reload,
    })
}

/// Opens the journal and submits again what it holds, before the api serves (so
/// `/readyz` answers only once they are tracked), and says what it found.
fn open_journal(cfg: &crate::journal::JournalConfig, node: &Node) -> Result<Journal, ServeError> {
    let (journal, found) = Journal::open(cfg, node.clone())?;
    if found.total() > 0 {
        tracing::info!(
            path = %cfg.path.display(),
            resubmitted = found.resubmitted,
            expired = found.expired,
            refused = found.refused,
            "recovered {} accepted operations from the journal",
            found.total()
        );
    } else {
        tracing::info!(path = %cfg.path.display(), "journal open: nothing to recover");
    }
    Ok(journal)
}

/// The api's socket with its TLS config when `http.tls_cert` is set, and the task that
/// reloads the certificate when its files change.
fn with_tls(
    tcp: std::net::TcpListener,
    cfg: &Config,
) -> Result<(Listener, Option<Reloader>), ServeError> {
    let Some(files) = &cfg.http.tls else {
        return Ok((tcp.into(), None));
    };
    let tls = ServerTls::load(files)?;
    let listener = Listener {
        tcp,
        tls: Some(tls.server_config()),
    };
    Ok((listener, Some(tls.watch())))
}

/// Starts the cluster layer the configuration describes, once the values only a running
/// node knows are in: its bound HTTP address and the types it has handlers for.
async fn start_cluster(
    cfg: &ClusterConfig,
    http_addr: SocketAddr,
    builder: &NodeBuilder,
    link_runtimes: Vec<tokio::runtime::Handle>,
) -> Result<Cluster, ServeError> {
    let cfg = ClusterConfig {
        // Set when the configuration knows a better name (a pod's DNS name).
        http_addr: if cfg.http_addr.is_empty() {
            http_addr.to_string()
        } else {
            cfg.http_addr.clone()
        },
        serves: serves(&cfg.serves, builder.handler_types())?,
        link_runtimes,
        ..cfg.clone()
    };
    Ok(Cluster::start(cfg).await?)
}

/// The types a node advertises: those `cluster.serves` lists, each with a handler, or
/// every type it has a handler for when the list is empty.
fn serves(listed: &[OpType], handlers: Vec<OpType>) -> Result<Vec<OpType>, ServeError> {
    if listed.is_empty() {
        return Ok(handlers);
    }
    if let Some(t) = listed.iter().find(|t| !handlers.contains(t)) {
        return Err(ServeError::Serves {
            op_type: t.to_string(),
            handlers: handlers.iter().map(|h| h.to_string()).collect(),
        });
    }
    Ok(listed.to_vec())
}

impl Running {
    /// Where the HTTP api listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http.addr
    }

    /// The node's cluster, when it runs in one.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.http.cluster()
    }

    /// Serves until `signal` completes (or a client makes the node leave its cluster),
    /// stops the node (see [`run_until`]) and flushes the last spans, the drain's
    /// failures among them. Returns what was cut short.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> std::io::Result<Stopped> {
        let left = run_until(self.node, self.http, self.grace, signal).await;
        let t = self.telemetry;
        let _ = tokio::task::spawn_blocking(move || t.shutdown(TRACE_FLUSH)).await;
        left
    }
}

/// Serves until `signal` completes, then shuts down gracefully: a node still in a
/// cluster hands its work off and leaves it (each cluster step within
/// `cluster.leave_timeout_ms`, whatever the cluster's state), readiness turns false and
/// new submissions are refused (503), accepted operations get `grace` to finish, the
/// journal (if on) records which finished and closes, the HTTP server finishes its open
/// requests, then the engine and the cluster layer stop.
/// Returns what was cut short: operations still unfinished when the grace period ended
/// (they fail with a reason), and a hand-off that did not complete.
pub async fn run_until(
    node: Node,
    server: api::Server,
    grace: Duration,
    signal: impl Future<Output = ()>,
) -> std::io::Result<Stopped> {
    let left_cluster = tokio::select! {
        _ = signal => false,
        _ = server.left_cluster() => true,
    };
    let cluster = server.cluster().cloned();
    let mut handoff = None;
    if let (Some(c), false) = (&cluster, left_cluster) {
        // A clean exit hands this node's work off first.
        if let Err(e) = c.leave(grace).await {
            tracing::warn!("could not leave the cluster cleanly, stopping anyway: {e}");
            handoff = Some(e.to_string());
        }
    }
    tracing::info!(?grace, "shutting down: draining accepted operations");
    node.stop_accepting();
    let drained = node.drain(grace).await;
    if !drained {
        tracing::warn!(
            left = node.in_flight(),
            "grace period over with operations unfinished"
        );
    }
    if let Some(j) = server.journal() {
        // Before the engine stops: what it fails now keeps its entry, to run again after
        // a restart.
        j.close().await;
    }
    // The engine before the api's workers: with `engine.shard_threads` its shards run on
    // them. Requests that come meanwhile are refused (503), as during the drain.
    let left = node.shutdown(Duration::ZERO).await;
    let served = server.stop().await;
    if let Some(c) = &cluster {
        c.shutdown().await;
    }
    served?;
    tracing::info!(left, "stopped");
    Ok(Stopped {
        unfinished: left,
        handoff,
    })
}

/// A future that completes on SIGINT or SIGTERM (what Kubernetes sends a pod it stops).
///
/// The handlers are installed when this is called, not when the future is first polled:
/// a signal that arrives between the two (say, right after the node printed that it
/// listens) is kept, rather than ending the process with the default action.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).ok();
        let mut int = signal(SignalKind::interrupt()).ok();
        async move {
            // A handler that could not be installed never fires.
            async fn recv(s: Option<&mut tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                _ = recv(int.as_mut()) => tracing::info!("received SIGINT"),
                _ = recv(term.as_mut()) => tracing::info!("received SIGTERM"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("received Ctrl-C");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With `engine.shard_threads` the binary runs each shard on one of the api's
    /// workers: an operation a request submits is admitted, run and answered on the
    /// worker's thread. The node serves, and stops (the engine before the workers it runs
    /// on) without leaving anything behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_shard_threads_the_shards_run_on_the_api_workers() {
        let mut cfg = {
            let _env = crate::config::testutil::EnvGuard::new();
            crate::config::testutil::load_ok(&crate::config::LoadOptions {
                http_addr: Some("127.0.0.1:0".into()),
                ..Default::default()
            })
        };
        cfg.engine.shard_threads = true;
        cfg.http.workers = 3;
        let running = start(&cfg).await.unwrap();
        assert_eq!(running.node.shards(), 3, "one shard per worker");
        let mut threads = std::collections::HashSet::new();
        for rt in running.node.shard_runtimes() {
            let t = rt
                .spawn(async { std::thread::current().id() })
                .await
                .unwrap();
            let name = rt
                .spawn(async { std::thread::current().name().map(str::to_owned) })
                .await
                .unwrap();
            assert!(
                name.as_deref()
                    .is_some_and(|n| n.starts_with("actix-server worker")),
                "{name:?}"
            );
            threads.insert(t);
        }
        assert_eq!(threads.len(), 3, "each shard on a worker of its own");
        // Each shard's thread has that shard as its home: what it submits stays there.
        for (i, rt) in running.node.shard_runtimes().iter().enumerate() {
            let before = running.node.shard_operations();
            let node = running.node.clone();
            let op = opmesh_actors::Operation::new("echo", opmesh_actors::Json::null());
            let outcome = rt
                .spawn(async move { node.submit(op).await })
                .await
                .unwrap();
            assert!(outcome.is_ok(), "{outcome:?}");
            let after = running.node.shard_operations();
            let took: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
            assert_eq!(
                took[i], 1,
                "shard {i}'s thread submits to shard {i}: {took:?}"
            );
        }

        // One connection is served by one worker: its operations (no keys) all go to
        // that worker's shard, and are answered. The requests go over one TCP
        // connection written by hand: a pooling client may open a second one when the
        // next request races the return of the first connection to its pool.
        let ops: Vec<_> = (0..300)
            .map(|i| serde_json::json!({"type": "echo", "payload": i}))
            .collect();
        let body = serde_json::json!({ "ops": ops }).to_string();
        let mut conn = tokio::net::TcpStream::connect(running.http_addr())
            .await
            .unwrap();
        let base = running.node.shard_operations();
        for _ in 0..3 {
            let answer = http_post_on(&mut conn, "/v1/ops/batch?wait=true", &body).await;
            let results = answer["results"].as_array().unwrap();
            assert_eq!(results.len(), 300);
            for (i, r) in results.iter().enumerate() {
                assert_eq!(r["status"], "succeeded", "{r}");
                assert_eq!(r["result"], i, "{r}");
            }
        }
        drop(conn);
        let took: Vec<u64> = running
            .node
            .shard_operations()
            .iter()
            .zip(&base)
            .map(|(a, b)| a - b)
            .collect();
        assert_eq!(took.iter().sum::<u64>(), 900, "{took:?}");
        assert_eq!(took.iter().filter(|&&n| n > 0).count(), 1, "{took:?}");

        let stopped = tokio::time::timeout(
            Duration::from_secs(20),
            running.run_until(std::future::ready(())),
        )
        .await
        .expect("stops within 20 s")
        .unwrap();
        assert!(stopped.is_clean(), "{stopped:?}");
    }

    /// POSTs `body` as JSON on an open HTTP/1.1 connection (kept alive) and reads the
    /// answer, which must be 200 with a `content-length`.
    async fn http_post_on(
        conn: &mut tokio::net::TcpStream,
        path: &str,
        body: &str,
    ) -> serde_json::Value {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: opmesh\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        let head_end = loop {
            if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed before the answer's head");
            got.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .expect("a content-length")
            .trim()
            .parse()
            .unwrap();
        while got.len() < head_end + length {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed inside the answer's body");
            got.extend_from_slice(&buf[..n]);
        }
        serde_json::from_slice(&got[head_end..head_end + length]).unwrap()
    }

    fn types(names: &[&str]) -> Vec<OpType> {
        names.iter().map(|n| (*n).into()).collect()
    }

    #[test]
    fn serves_defaults_to_every_handler() {
        let got = serves(&[], types(&["echo", "sleep"])).unwrap();
        assert_eq!(got, types(&["echo", "sleep"]));
    }

    #[test]
    fn serves_keeps_the_listed_types_in_their_order() {
        let listed = types(&["sleep", "echo"]);
        let got = serves(&listed, types(&["echo", "sleep", "resize"])).unwrap();
        assert_eq!(got, types(&["sleep", "echo"]));
    }

    #[test]
    fn serves_refuses_a_type_without_a_handler_naming_it_and_the_handlers() {
        let listed = types(&["echo", "thumbnail"]);
        let e = serves(&listed, types(&["echo", "sleep"])).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert_eq!(
            e.to_string(),
            "configuration error: cluster.serves lists `thumbnail`, which has no handler on \
             this node (handlers: echo, sleep)"
        );
    }
}
