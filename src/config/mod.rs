//! Configuration: where the binary's settings come from and the one validated
//! [`Config`] it builds a node from.
//!
//! Settings are layered, later wins: the built-in `config/default.toml`, then a
//! workload profile (built in too, chosen by `--profile` or `OPMESH_PROFILE`), then an
//! optional user file (`--config`), then `OPMESH_<SECTION>__<KEY>` environment
//! variables (plus short forms such as `OPMESH_NODE_ID` and `OPMESH_CLUSTER_ADDR`), then
//! flags. [`load`] merges them, rejects unknown keys, checks every value against its
//! range and converts it to a type with its unit (`Duration`, `NonZeroUsize`,
//! `SocketAddr`). Nothing downstream checks these values again. Every error names the
//! key, the value and where it was set, so a bad setting stops start-up with a message a
//! reader can act on; the one exception is the cluster secret, which no error, log or
//! `Debug` output ever shows.
//!
//! Each section of the file has its own module, which owns its raw struct (the keys as
//! written), its validation and its tests: `node` (`[node]`, `[http]`, `[shutdown]`),
//! `engine` (`[engine]`, `[cache]`, `[retry]`), `limits` (`[limits]`: rate limits and the
//! in-flight cap), `handlers` (`[handlers]`: the built-in handlers on, and
//! `[[handlers.http]]`),
//! `cluster` (`[cluster]`, checked into the cluster crate's `ClusterConfig`), `types`
//! (`[breaker]` and `[types.<type>]`: per-type limits and circuit breakers) and
//! `telemetry` (`[telemetry]`). Beside
//! them, `layers` builds the merged layers and knows where each value was set, `error`
//! holds [`ConfigError`] and its mapping from figment's errors, and `check` the range
//! and shape checks every section uses.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::handlers::{Builtin, HttpTarget};
use crate::telemetry::TelemetrySettings;
use crate::EngineConfig;

use self::auth::RawAuth;
use self::check::Check;
use self::cluster::{RawCluster, RawFlow};
use self::engine::{RawCache, RawEngine, RawRetry};
use self::handlers::RawHandlers;
use self::limits::RawLimits;
use self::node::{RawEvents, RawHttp, RawNode, RawShutdown};
use self::telemetry::RawTelemetry;
use self::types::{RawBreaker, RawType};

pub use self::auth::AuthConfig;
pub use self::check::is_token_name;
pub use self::error::ConfigError;
pub use self::layers::{PROFILES, PROFILE_ENV};
pub use self::limits::LimitsConfig;
pub use self::node::HttpConfig;
/// The cluster secret: its `Debug` shows `"<redacted>"`, so printing a [`Config`], a
/// [`LoadOptions`] or a [`ConfigError`] never reveals it.
pub use crate::cluster::Secret;

mod auth;
mod check;
mod cluster;
mod engine;
mod error;
mod handlers;
mod layers;
mod limits;
mod node;
mod telemetry;
#[cfg(test)]
pub(crate) mod testutil;
mod types;

/// The settings the binary runs with, validated: every value is in its range.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_id: String,
    pub http: HttpConfig,
    /// Who may call the api (`[auth]`).
    pub auth: AuthConfig,
    pub engine: EngineConfig,
    /// After a shutdown signal, how long in-flight work gets to finish.
    pub shutdown_grace: Duration,
    /// Event streams (`GET /v1/events`) open at once at most (`events.max_subscribers`).
    pub max_subscribers: usize,
    /// What the api admits: rate limits and the in-flight cap (`[limits]`).
    pub limits: LimitsConfig,
    /// The built-in handlers this node registers (`handlers.builtin`), each once.
    pub builtin_handlers: Vec<Builtin>,
    /// Operation types served by POSTing to a URL, in the order configured.
    pub http_handlers: Vec<HttpTarget>,
    /// The profile that was applied, if any.
    pub profile: Option<String>,
    /// `None` when `cluster.addr` is empty: a single node, with no network beyond HTTP
    /// and nothing on disk but its journal (if on). Every value is in its range and the relations between them
    /// hold (`down_after > 2 * heartbeat`); `http_addr` is left empty for the server to
    /// fill in, and an empty `serves` means every type this node has a handler for.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    pub telemetry: TelemetrySettings,
    /// `Some` when `engine.journal = true`: accepted operations are journaled in the data
    /// dir (`cluster.data_dir`, which a single node may set too).
    pub journal: Option<crate::journal::JournalConfig>,
}

impl Config {
    /// What the node would run as, one `name: value` per line, for `serve
    /// --check-config` (never the secret).
    pub fn summary(&self) -> String {
        let mut lines = vec![
            "configuration: ok".to_owned(),
            format!("node: {}", self.node_id),
            format!("http: {}", self.http.addr),
            format!(
                "auth: {}",
                match &self.auth.tokens {
                    Some((path, set)) => format!("{} tokens from {}", set.len(), path.display()),
                    None if self.auth.anonymous => "none (anonymous: open to anyone)".into(),
                    None => "none (open on loopback only)".into(),
                }
            ),
            format!(
                "tls: {}",
                self.http.tls.as_ref().map_or("off".to_owned(), |t| format!(
                    "{} (key {}, client certificates: {})",
                    t.cert.display(),
                    t.key.display(),
                    t.client_ca
                        .as_ref()
                        .map_or("not asked for".to_owned(), |ca| format!(
                            "required, CA {}",
                            ca.display()
                        ))
                ))
            ),
            format!(
                "handlers: {}",
                self.builtin_handlers
                    .iter()
                    .map(|b| b.name())
                    .chain(self.http_handlers.iter().map(|h| h.op_type.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            format!("shutdown_grace_secs: {}", self.shutdown_grace.as_secs()),
            format!("limits: {}", self.limits.summary()),
            format!(
                "journal: {}",
                self.journal
                    .as_ref()
                    .map_or("off".to_owned(), |j| j.path.display().to_string())
            ),
        ];
        match &self.cluster {
            None => lines.push("cluster: none".into()),
            Some(c) => {
                use crate::cluster::SeedBootstrap;
                lines.push(format!("cluster: {}", c.listen));
                lines.push(format!("advertise: {}", c.advertise));
                if !c.http_addr.is_empty() {
                    lines.push(format!("http_advertise: {}", c.http_addr));
                }
                lines.push(format!("join: {}", c.join.join(",")));
                lines.push(format!(
                    "previous_secret: {}",
                    if c.previous_secret.is_some() {
                        "set (accepted from other nodes, dialed with when refused)"
                    } else {
                        "none"
                    }
                ));
                lines.push(format!(
                    "bootstrap: {}",
                    match (c.join.is_empty(), c.bootstrap) {
                        (true, _) => "alone when the data dir holds no state".to_owned(),
                        (false, SeedBootstrap::Never) => "never (join only)".to_owned(),
                        (false, SeedBootstrap::WhenNoSeedHasACluster { wait }) => format!(
                            "when no seed belongs to a cluster (waiting up to {}s for \
                             unreachable seeds)",
                            wait.as_secs()
                        ),
                    }
                ));
                lines.push(format!(
                    "data_dir: {}",
                    c.data_dir
                        .as_ref()
                        .map_or("(in memory)".into(), |d| d.display().to_string())
                ));
                lines.push(format!("write_timeout_ms: {}", c.write_timeout.as_millis()));
            }
        }
        lines.push(format!(
            "traces: {}",
            self.telemetry
                .traces
                .as_ref()
                .map_or("off".to_owned(), |t| format!(
                    "{} ({})",
                    t.endpoint,
                    t.protocol.as_str()
                ))
        ));
        lines.join("\n")
    }
}

/// What the command line contributes: the profile, the user file and the flags that
/// override single keys. All `None` or empty (the default) loads the built-in defaults
/// and the environment.
#[derive(Default, Clone, Debug)]
pub struct LoadOptions {
    /// A name from [`PROFILES`]; `None` falls back to `OPMESH_PROFILE`.
    pub profile: Option<String>,
    /// A TOML file with the keys to change; it must exist.
    pub config_file: Option<PathBuf>,
    /// `--http-addr`: overrides `http.addr`.
    pub http_addr: Option<String>,
    /// `--node-id`: overrides `node.id`.
    pub node_id: Option<String>,
    /// `--cluster-addr`: overrides `cluster.addr`.
    pub cluster_addr: Option<String>,
    /// `--join`: overrides `cluster.join` unless empty.
    pub join: Vec<String>,
    /// `--cluster-secret`: overrides `cluster.secret`.
    pub cluster_secret: Option<Secret>,
    /// `--data-dir`: overrides `cluster.data_dir`.
    pub data_dir: Option<PathBuf>,
    /// `--otlp-endpoint`: sets `telemetry.endpoint` and turns traces on.
    pub otlp_endpoint: Option<String>,
    /// `--bootstrap-from-ordinal`: sets `cluster.bootstrap = "ordinal"`.
    pub bootstrap_from_ordinal: bool,
    /// `--ephemeral`: sets `cluster.ephemeral = true`.
    pub ephemeral: bool,
    /// `--tls-cert`: overrides `http.tls_cert`.
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`: overrides `http.tls_key`.
    pub tls_key: Option<PathBuf>,
}

/// Merges the layers chosen by `opts` and the environment, and validates the result.
pub fn load(opts: &LoadOptions) -> Result<Config, ConfigError> {
    let profile = layers::chosen_profile(opts);
    let figment = layers::merge(opts, profile.as_deref())?;
    let raw: Raw = figment
        .extract()
        .map_err(|e| ConfigError::from_figment(e, &figment))?;
    raw.validate(&Check { figment: &figment }, profile)
}

// The raw layers, as written: plain numbers and strings, checked and converted by
// `Raw::validate`. Every field is required because config/default.toml sets them all.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    node: RawNode,
    http: RawHttp,
    auth: RawAuth,
    engine: RawEngine,
    cache: RawCache,
    retry: RawRetry,
    shutdown: RawShutdown,
    events: RawEvents,
    limits: RawLimits,
    cluster: RawCluster,
    flow: RawFlow,
    telemetry: RawTelemetry,
    handlers: RawHandlers,
    breaker: RawBreaker,
    /// `[types.<type>]` tables: none by default.
    #[serde(default)]
    types: std::collections::BTreeMap<String, RawType>,
}

impl Raw {
    /// Each section checks its own keys, in this order, which is the order errors are
    /// found in. Later sections read what earlier ones settled: `[[handlers.http]]` takes
    /// `engine.max_type_len` and the `[retry]` defaults, `[types.<type>]` the engine's
    /// limits, `[breaker]` and the types that have a handler (and webhook targets),
    /// `cluster.serves` the types that have a handler.
    fn validate(self, check: &Check<'_>, profile: Option<String>) -> Result<Config, ConfigError> {
        let node_id = self.node.validate(check)?;
        let http = self.http.validate(check)?;
        let auth = self.auth.validate(check, http.addr)?;
        let retry = self.retry.validate(check)?;
        let journal = journal(check, &self.engine, &self.cluster)?;
        let breaker_keys = self.breaker;
        let breaker = RawBreaker::validate(breaker_keys.clone(), check)?;
        let mut engine = self.engine.validate(check, self.cache, retry, breaker)?;
        // With their own threads the shards run on the api's workers, one each.
        if engine.shard_threads && engine.shards != 0 && engine.shards != http.workers {
            return Err(check.invalid(
                "engine.shards",
                engine.shards,
                format!(
                    "0 or http.workers ({}): with engine.shard_threads each shard runs on \
                     an HTTP worker's thread",
                    http.workers
                ),
            ));
        }
        let shutdown_grace = self.shutdown.validate(check)?;
        let max_subscribers = self.events.validate(check)?;
        let limits = self.limits.validate(check)?;
        // A node alone has a routing table too: the bound holds with or without a cluster.
        engine.max_routes = self.cluster.max_routes(check)?;
        let max_type_len = engine.limits.max_type_len;
        let (builtin_handlers, http_handlers) =
            self.handlers.validate(check, max_type_len, &engine.retry)?;
        let handled = handlers::handled_types(&builtin_handlers, &http_handlers);
        types::validate(
            check,
            self.types,
            &breaker_keys,
            &mut engine,
            &handled,
            &http_handlers,
        )?;
        let flow = self.flow.validate(check)?;
        let cluster = self
            .cluster
            .validate(check, &node_id, http.addr.port(), max_type_len, &handled)?
            .map(|mut c| {
                (c.flow_high, c.flow_low) = flow;
                c
            });
        // A pod that takes its place from its ordinal is named after the pod.
        let node_id = cluster.as_ref().map_or(node_id, |c| c.node.clone());
        let telemetry = self.telemetry.validate(check)?;

        Ok(Config {
            node_id,
            http,
            auth,
            engine,
            shutdown_grace,
            max_subscribers,
            limits,
            builtin_handlers,
            http_handlers,
            profile,
            cluster,
            telemetry,
            journal,
        })
    }
}

/// `engine.journal`: on, it needs a data dir, where its file goes.
fn journal(
    check: &Check<'_>,
    engine: &RawEngine,
    cluster: &RawCluster,
) -> Result<Option<crate::journal::JournalConfig>, ConfigError> {
    if !engine.journal() {
        return Ok(None);
    }
    let Some(dir) = cluster.data_dir() else {
        return Err(check.missing(
            "cluster.data_dir",
            "engine.journal",
            format!(
                "the journal of accepted operations is the file {} in the data dir; set it \
                 with --data-dir DIR or OPMESH_DATA_DIR (a single node may have one), or set \
                 engine.journal = false",
                crate::journal::FILE
            ),
        ));
    };
    Ok(Some(crate::journal::JournalConfig {
        path: dir.join(crate::journal::FILE),
    }))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::testutil::{load_ok, EnvGuard};
    use super::*;
    use crate::RetryPolicy;

    #[test]
    fn defaults_load_and_equal_the_documented_values() {
        let _env = EnvGuard::new();
        let c = load_ok(&LoadOptions::default());

        assert_eq!(c.node_id, "node-1");
        assert_eq!(c.profile, None);
        assert_eq!(c.http.addr, "127.0.0.1:7070".parse::<SocketAddr>().unwrap());
        assert!(c.http.workers >= 1);
        assert_eq!(c.http.max_body_bytes, 16 * 1024 * 1024);
        assert_eq!(c.http.keep_alive, Duration::from_secs(75));

        let e = &c.engine;
        assert_eq!(e.queue_capacity, 100_000);
        assert_eq!(e.batch.batch_size, 256);
        assert_eq!(e.batch.batch_flush, Duration::ZERO);
        assert_eq!(e.batch.max_concurrent, 16_384);
        assert_eq!(e.limits.max_payload_bytes, 1024 * 1024);
        assert_eq!(e.limits.max_metadata_entries, 32);
        assert_eq!(e.limits.max_metadata_bytes, 8192);
        assert_eq!(e.limits.max_key_len, 512);
        assert_eq!(e.limits.max_type_len, 128);
        assert_eq!(e.limits.default_deadline, Duration::from_secs(30));
        assert_eq!(e.overload_retry_after, Duration::from_secs(1));
        assert_eq!(e.retention, Duration::from_secs(300));
        assert_eq!(e.retention_max, 100_000);
        assert_eq!(e.result_store_bytes, 64 * 1024 * 1024);
        assert_eq!(e.max_stored_result_bytes, 1024 * 1024);
        assert_eq!(e.cache.capacity.get(), 100_000);
        assert_eq!(e.cache.ttl, Duration::from_secs(300));
        assert_eq!(
            e.retry,
            RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_secs(1),
                multiplier: 2.0,
                jitter: 0.2,
            }
        );
        assert_eq!(c.shutdown_grace, Duration::from_secs(30));
        assert!(c.http_handlers.is_empty());
        assert_eq!(
            c.builtin_handlers,
            [Builtin::Echo, Builtin::Resize, Builtin::Sleep]
        );
        assert_eq!(e.max_routes, 1000);
        assert!(c.cluster.is_none(), "a single node by default");
    }
}
