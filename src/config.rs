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

use std::fmt::Debug;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use figment::error::Kind;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::Deserialize;

use crate::handlers::HttpTarget;
use crate::op::validate_type_name;
use crate::telemetry::{Protocol, TelemetrySettings, TraceSettings};
use crate::{BatchPolicy, CacheConfig, EngineConfig, Limits, RetryPolicy};

/// The workload profiles compiled into the binary, by name.
pub const PROFILES: &[&str] = &[
    "read-heavy",
    "write-heavy",
    "streaming",
    "low-latency",
    "throughput",
];

/// The operation types the binary always registers; an `http` handler may not take them.
const BUILTIN_TYPES: &[&str] = &["echo", "sleep", "resize"];

const DEFAULT_TOML: &str = include_str!("../config/default.toml");

fn profile_toml(name: &str) -> Option<&'static str> {
    Some(match name {
        "read-heavy" => include_str!("../config/read-heavy.toml"),
        "write-heavy" => include_str!("../config/write-heavy.toml"),
        "streaming" => include_str!("../config/streaming.toml"),
        "low-latency" => include_str!("../config/low-latency.toml"),
        "throughput" => include_str!("../config/throughput.toml"),
        _ => return None,
    })
}

/// The environment variable that chooses a profile when no `--profile` flag does.
pub const PROFILE_ENV: &str = "OPMESH_PROFILE";

/// Keys whose value is a string that may look like a number (`node.id = "007"`, a
/// secret of digits). Their environment variables are read as given, not parsed into a
/// TOML value: the short forms first, then the `SECTION__KEY` forms, which win.
const STRING_ENV: &[(&str, &str)] = &[
    ("OPMESH_NODE_ID", "node.id"),
    ("OPMESH_HTTP_ADDR", "http.addr"),
    ("OPMESH_CLUSTER_ADDR", "cluster.addr"),
    ("OPMESH_CLUSTER_SECRET", "cluster.secret"),
    ("OPMESH_DATA_DIR", "cluster.data_dir"),
    ("OPMESH_NODE__ID", "node.id"),
    ("OPMESH_HTTP__ADDR", "http.addr"),
    ("OPMESH_CLUSTER__ADDR", "cluster.addr"),
    ("OPMESH_CLUSTER__ADVERTISE", "cluster.advertise"),
    ("OPMESH_CLUSTER__ID", "cluster.id"),
    ("OPMESH_CLUSTER__SECRET", "cluster.secret"),
    ("OPMESH_CLUSTER__DATA_DIR", "cluster.data_dir"),
];

/// Keys whose value is a list of strings. Their environment variables hold the items
/// comma separated (`OPMESH_JOIN=10.0.0.5:7071,10.0.0.6:7071`), each trimmed and empty
/// ones dropped, so an empty variable sets an empty list. Short form first, as above.
const LIST_ENV: &[(&str, &str)] = &[
    ("OPMESH_JOIN", "cluster.join"),
    ("OPMESH_CLUSTER__JOIN", "cluster.join"),
    ("OPMESH_CLUSTER__SERVES", "cluster.serves"),
];

/// What stands for the cluster secret wherever a value would be shown.
const REDACTED: &str = "<redacted>";

/// The shortest cluster secret accepted, in bytes.
const MIN_SECRET_BYTES: usize = 16;

/// The settings the binary runs with, validated: every value is in its range.
#[derive(Clone, Debug)]
pub struct Config {
    pub node_id: String,
    pub http: HttpConfig,
    pub engine: EngineConfig,
    /// After a shutdown signal, how long in-flight work gets to finish.
    pub shutdown_grace: Duration,
    /// Operation types served by POSTing to a URL, in the order configured.
    pub http_handlers: Vec<HttpTarget>,
    /// The profile that was applied, if any.
    pub profile: Option<String>,
    /// `None` when `cluster.addr` is empty: a single node, with no network beyond HTTP
    /// and nothing on disk.
    pub cluster: Option<ClusterSettings>,
    pub telemetry: TelemetrySettings,
}

/// HTTP server settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpConfig {
    pub addr: SocketAddr,
    /// Worker threads, at least 1 (`workers = 0` resolved to the number of CPU cores).
    pub workers: usize,
    pub max_body_bytes: usize,
    /// Idle keep-alive connections close after this; zero closes after each response.
    pub keep_alive: Duration,
}

/// How this node takes part in a cluster. Every value is in its range, and the
/// relations between them hold (`down_after > 2 * heartbeat`).
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// Where the cluster port listens.
    pub addr: SocketAddr,
    /// `host:port` other nodes dial to reach this node; `addr` when none was set.
    pub advertise: String,
    /// Seed addresses (`host:port`) to join; empty: bootstrap a new cluster when there
    /// is no state.
    pub join: Vec<String>,
    /// The cluster's name; nodes with another are refused.
    pub id: String,
    /// Shared by every node of the cluster; at least 16 bytes.
    pub secret: Secret,
    /// Where the Raft log, vote and snapshots live; `None`: in memory.
    pub data_dir: Option<PathBuf>,
    /// The operation types to advertise, each with a handler on this node, none twice;
    /// empty: every type this node has a handler for.
    pub serves: Vec<String>,
    /// How often cluster links send heartbeats, for the failure detector.
    pub heartbeat: Duration,
    /// Silence after which the leader marks a node down; more than twice `heartbeat`.
    pub down_after: Duration,
    /// How long a route write waits for its commit before failing.
    pub write_timeout: Duration,
    /// Raft's shortest election timeout; the longest is twice it, and Raft heartbeats
    /// go out every third of it.
    pub election_timeout: Duration,
    /// How many nodes vote in Raft: 1, 3 or 5. The others are learners.
    pub voters: usize,
    /// A link writes once this many bytes are buffered.
    pub flush_bytes: usize,
    /// How long a link waits for more to send before writing what it has.
    pub linger: Duration,
    /// Largest frame between nodes, in bytes.
    pub max_frame: usize,
}

/// The shared cluster secret. Its `Debug` shows `"<redacted>"` and it has no `Display`,
/// so printing a [`Config`], a [`LoadOptions`] or a [`ConfigError`] never reveals it.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }

    /// The secret's bytes, for authenticating cluster links; never log or print them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Debug::fmt(REDACTED, f)
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Secret(s.into_bytes())
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
}

/// Why the settings could not be loaded. Each is fatal: the node must not start.
///
/// Messages carry their cause inline (no `source()` chain), so printing the error with
/// `{}` tells the whole story.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown profile `{name}` (known profiles: {})", PROFILES.join(", "))]
    UnknownProfile { name: String },

    #[error("cannot read config file `{}`: {error}", path.display())]
    ReadFile {
        path: PathBuf,
        error: std::io::Error,
    },

    /// A key no section has; `key` is its dotted path, `origin` where it was set.
    #[error("unknown key `{key}` in {origin} (expected one of: {})", expected.join(", "))]
    UnknownKey {
        key: String,
        origin: String,
        expected: Vec<String>,
    },

    /// A value of the wrong type, a missing key, or a file that is not TOML: figment's
    /// message, with the key path and where the value came from.
    #[error("{message}")]
    Parse {
        message: String,
        error: Box<figment::Error>,
    },

    /// A value of the right type outside its allowed range or shape.
    #[error(
        "invalid value for `{key}`: {value} (allowed: {allowed}){}",
        origin.as_deref().map(|o| format!(" in {o}")).unwrap_or_default()
    )]
    Invalid {
        key: String,
        value: String,
        allowed: String,
        origin: Option<String>,
    },

    /// A key left empty that the value of another key requires; `origin` is where that
    /// other key (`needed_by`) was set, `hint` how to set `key`.
    #[error(
        "`{key}` must be set because `{needed_by}` is set{}: {hint}",
        origin.as_deref().map(|o| format!(" in {o}")).unwrap_or_default()
    )]
    Missing {
        key: String,
        needed_by: String,
        origin: Option<String>,
        hint: String,
    },
}

/// Merges the layers chosen by `opts` and the environment, and validates the result.
pub fn load(opts: &LoadOptions) -> Result<Config, ConfigError> {
    let profile = opts
        .profile
        .clone()
        .or_else(|| std::env::var(PROFILE_ENV).ok().filter(|p| !p.is_empty()));

    let mut figment = Figment::new().merge(Layer::fixed(
        Toml::string(DEFAULT_TOML),
        "config/default.toml (built in)".into(),
    ));
    if let Some(name) = &profile {
        let toml =
            profile_toml(name).ok_or_else(|| ConfigError::UnknownProfile { name: name.clone() })?;
        figment = figment.merge(Layer::fixed(
            Toml::string(toml),
            format!("profile `{name}` (config/{name}.toml, built in)"),
        ));
    }
    if let Some(path) = &opts.config_file {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::ReadFile {
            path: path.clone(),
            error,
        })?;
        // Parsed here first, not only by figment, whose message would quote the
        // offending line: that line may hold the cluster secret.
        if let Err(e) = Toml::from_str::<Dict>(&text) {
            return Err(ConfigError::syntax(path, &text, &e));
        }
        figment = figment.merge(Layer::fixed(
            Toml::string(&text),
            format!("config file `{}`", path.display()),
        ));
    }

    figment = otel_env(figment)?;
    for &(var, key) in STRING_ENV {
        if let Some(value) = std::env::var_os(var) {
            figment = figment.merge(Layer::fixed(
                Serialized::default(key, value.to_string_lossy().into_owned()),
                format!("environment variable `{var}`"),
            ));
        }
    }
    for &(var, key) in LIST_ENV {
        if let Some(value) = std::env::var_os(var) {
            let items: Vec<String> = value
                .to_string_lossy()
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(str::to_owned)
                .collect();
            figment = figment.merge(Layer::fixed(
                Serialized::default(key, items),
                format!("environment variable `{var}`"),
            ));
        }
    }
    figment = figment.merge(env_layer());

    if let Some(addr) = &opts.http_addr {
        figment = figment.merge(Layer::fixed(
            Serialized::default("http.addr", addr.clone()),
            "flag `--http-addr`".into(),
        ));
    }
    if let Some(id) = &opts.node_id {
        figment = figment.merge(Layer::fixed(
            Serialized::default("node.id", id.clone()),
            "flag `--node-id`".into(),
        ));
    }
    if let Some(addr) = &opts.cluster_addr {
        figment = figment.merge(Layer::fixed(
            Serialized::default("cluster.addr", addr.clone()),
            "flag `--cluster-addr`".into(),
        ));
    }
    if !opts.join.is_empty() {
        figment = figment.merge(Layer::fixed(
            Serialized::default("cluster.join", opts.join.clone()),
            "flag `--join`".into(),
        ));
    }
    if let Some(secret) = &opts.cluster_secret {
        figment = figment.merge(Layer::fixed(
            Serialized::default(
                "cluster.secret",
                String::from_utf8_lossy(secret.expose()).into_owned(),
            ),
            "flag `--cluster-secret`".into(),
        ));
    }
    if let Some(dir) = &opts.data_dir {
        figment = figment.merge(Layer::fixed(
            Serialized::default("cluster.data_dir", dir.to_string_lossy().into_owned()),
            "flag `--data-dir`".into(),
        ));
    }
    if let Some(url) = &opts.otlp_endpoint {
        for (key, value) in [
            ("telemetry.endpoint", Value::from(url.clone())),
            ("telemetry.traces", Value::from(true)),
        ] {
            figment = figment.merge(Layer::fixed(
                Serialized::default(key, value),
                "flag `--otlp-endpoint`".into(),
            ));
        }
    }

    let raw: Raw = figment
        .extract()
        .map_err(|e| ConfigError::from_figment(e, &figment))?;
    raw.validate(&Check { figment: &figment }, profile)
}

/// The OpenTelemetry SDK's standard variables, mapped onto `[telemetry]` keys. They sit
/// above config files and below `OPMESH_` variables and flags. Empty ones are ignored.
fn otel_env(mut figment: Figment) -> Result<Figment, ConfigError> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let set = |figment: Figment, key: &str, value: Value, var: &str| {
        figment.merge(Layer::fixed(
            Serialized::default(key, value),
            format!("environment variable `{var}`"),
        ))
    };
    let first = |names: &[&'static str]| names.iter().find_map(|n| var(n).map(|v| (*n, v)));
    if let Some((name, url)) = first(&[
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]) {
        figment = set(figment, "telemetry.endpoint", Value::from(url), name);
        figment = set(figment, "telemetry.traces", Value::from(true), name);
    }
    if let Some((name, p)) = first(&[
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]) {
        figment = set(figment, "telemetry.protocol", Value::from(p), name);
    }
    if let Some(name) = var("OTEL_SERVICE_NAME") {
        figment = set(
            figment,
            "telemetry.service_name",
            Value::from(name),
            "OTEL_SERVICE_NAME",
        );
    }
    if let Some(sampler) = var("OTEL_TRACES_SAMPLER") {
        let arg = var("OTEL_TRACES_SAMPLER_ARG");
        let ratio = match sampler.trim() {
            "always_on" | "parentbased_always_on" => 1.0,
            "always_off" | "parentbased_always_off" => 0.0,
            "traceidratio" | "parentbased_traceidratio" => match &arg {
                None => 1.0,
                Some(a) => match a.trim().parse::<f64>() {
                    Ok(r) if (0.0..=1.0).contains(&r) => r,
                    _ => {
                        return Err(ConfigError::Invalid {
                            key: "OTEL_TRACES_SAMPLER_ARG".into(),
                            value: format!("{a:?}"),
                            allowed: "a number from 0.0 to 1.0".into(),
                            origin: Some("the environment".into()),
                        })
                    }
                },
            },
            other => {
                return Err(ConfigError::Invalid {
                    key: "OTEL_TRACES_SAMPLER".into(),
                    value: format!("{other:?}"),
                    allowed: "parentbased_traceidratio, traceidratio, always_on, always_off, \
                              parentbased_always_on, parentbased_always_off (sampling is \
                              always parent-based)"
                        .into(),
                    origin: Some("the environment".into()),
                })
            }
        };
        figment = set(
            figment,
            "telemetry.sampling_ratio",
            Value::from(ratio),
            "OTEL_TRACES_SAMPLER",
        );
    }
    if let Some(e) = var("OTEL_TRACES_EXPORTER") {
        match e.trim() {
            "otlp" => {}
            "none" => {
                figment = set(
                    figment,
                    "telemetry.traces",
                    Value::from(false),
                    "OTEL_TRACES_EXPORTER",
                )
            }
            other => {
                return Err(ConfigError::Invalid {
                    key: "OTEL_TRACES_EXPORTER".into(),
                    value: format!("{other:?}"),
                    allowed: "otlp or none".into(),
                    origin: Some("the environment".into()),
                })
            }
        }
    }
    if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        figment = set(
            figment,
            "telemetry.traces",
            Value::from(false),
            "OTEL_SDK_DISABLED",
        );
    }
    Ok(figment)
}

/// `OPMESH_<SECTION>__<KEY>` variables, values parsed like TOML (`512`, `true`, `1.5`),
/// except the string keys in [`STRING_ENV`], which are read as given.
fn env_layer() -> Layer<Env> {
    let env = Env::prefixed("OPMESH_")
        .filter(|key| {
            let key = key.as_str();
            key.contains("__")
                && !STRING_ENV
                    .iter()
                    .chain(LIST_ENV)
                    .any(|(var, _)| var["OPMESH_".len()..].eq_ignore_ascii_case(key))
        })
        .split("__");
    let metadata = Metadata::named("environment variables `OPMESH_<SECTION>__<KEY>`").interpolater(
        |_: &Profile, keys: &[&str]| {
            let var = keys
                .iter()
                .map(|k| k.to_ascii_uppercase())
                .collect::<Vec<_>>()
                .join("__");
            format!("environment variable `OPMESH_{var}`")
        },
    );
    Layer {
        provider: env,
        metadata,
    }
}

/// A provider whose metadata says, for any key, where its value was set: "config file
/// `x.toml`", "environment variable `OPMESH_ENGINE__BATCH_SIZE`", "flag `--node-id`".
struct Layer<P> {
    provider: P,
    metadata: Metadata,
}

impl<P> Layer<P> {
    /// A layer whose every key has the same origin.
    fn fixed(provider: P, origin: String) -> Self {
        let phrase = origin.clone();
        let metadata =
            Metadata::named(origin).interpolater(move |_: &Profile, _: &[&str]| phrase.clone());
        Layer { provider, metadata }
    }
}

impl<P: Provider> Provider for Layer<P> {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        self.provider.data()
    }
}

/// Where the value at `path` was set, as the layer's metadata describes it.
fn origin_of(metadata: &Metadata, path: &[String]) -> String {
    if path.is_empty() {
        metadata.name.to_string()
    } else {
        metadata.interpolate(&Profile::Default, path)
    }
}

impl ConfigError {
    /// A user file that is not TOML: where and why, without the parser's excerpt of the
    /// line.
    fn syntax(path: &std::path::Path, text: &str, error: &<Toml as Format>::Error) -> Self {
        let mut message = format!("config file `{}`: TOML parse error", path.display());
        if let Some(span) = error.span() {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            message.push_str(&format!(" at line {line}, column {column}"));
        }
        message.push_str(&format!(": {}", error.message().trim_end()));
        ConfigError::Parse {
            error: Box::new(figment::Error::from(message.clone())),
            message,
        }
    }

    fn from_figment(error: figment::Error, figment: &Figment) -> Self {
        if let Kind::UnknownField(field, expected) = &error.kind {
            let mut path = error.path.clone();
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            let key = path.join(".");
            // The error carries the metadata of the enclosing table, which may come from
            // another layer than the stray key; ask for the key itself.
            let origin = figment
                .find_metadata(&key)
                .or(error.metadata.as_ref())
                .map_or_else(|| "the configuration".into(), |md| origin_of(md, &path));
            return ConfigError::UnknownKey {
                key,
                origin,
                expected: expected.iter().map(|s| s.to_string()).collect(),
            };
        }
        let message = error
            .clone()
            .into_iter()
            .map(|e| {
                let kind = e.kind.to_string();
                let kind = kind.trim_end();
                let origin = e.metadata.as_ref().map(|md| origin_of(md, &e.path));
                match (e.path.is_empty(), origin) {
                    // A whole layer failed (a TOML syntax error): say which, then why.
                    (true, Some(origin)) => format!("{origin}: {kind}"),
                    (true, None) => kind.to_owned(),
                    (false, origin) => {
                        let mut line = format!("{kind} for key `{}`", e.path.join("."));
                        if let Some(origin) = origin {
                            line.push_str(&format!(" in {origin}"));
                        }
                        line
                    }
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        ConfigError::Parse {
            message,
            error: Box::new(error),
        }
    }
}

// The raw layers, as written: plain numbers and strings, checked and converted by
// `Raw::validate`. Every field is required because config/default.toml sets them all.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    node: RawNode,
    http: RawHttp,
    engine: RawEngine,
    cache: RawCache,
    retry: RawRetry,
    shutdown: RawShutdown,
    cluster: RawCluster,
    telemetry: RawTelemetry,
    #[serde(default)]
    handlers: RawHandlers,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    traces: bool,
    endpoint: String,
    protocol: String,
    service_name: String,
    sampling_ratio: f64,
    queue_ops: u64,
    batch_spans: u64,
    export_interval_ms: u64,
    export_timeout_ms: u64,
    jaeger_ui_url: String,
}

impl RawTelemetry {
    fn validate(self, check: &Check<'_>) -> Result<TelemetrySettings, ConfigError> {
        let jaeger_ui_url = match self.jaeger_ui_url.trim() {
            "" => None,
            url if is_http_url(url) => Some(url.trim_end_matches('/').to_string()),
            url => {
                return Err(check.invalid(
                    "telemetry.jaeger_ui_url",
                    url,
                    "empty or an http:// or https:// URL, such as http://127.0.0.1:16686",
                ))
            }
        };
        if !is_http_url(&self.endpoint) {
            return Err(check.invalid(
                "telemetry.endpoint",
                &self.endpoint,
                "an http:// or https:// URL, such as http://127.0.0.1:4317",
            ));
        }
        let protocol = Protocol::parse(self.protocol.trim()).ok_or_else(|| {
            check.invalid(
                "telemetry.protocol",
                &self.protocol,
                "grpc or http/protobuf",
            )
        })?;
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(check.invalid(
                "telemetry.sampling_ratio",
                self.sampling_ratio,
                "0.0..=1.0",
            ));
        }
        let name = self.service_name.trim();
        if name.is_empty() || name.len() > 255 {
            return Err(check.invalid(
                "telemetry.service_name",
                &self.service_name,
                "1 to 255 characters",
            ));
        }
        let traces = TraceSettings {
            endpoint: self.endpoint.trim_end_matches('/').to_string(),
            protocol,
            service_name: name.to_string(),
            sampling_ratio: self.sampling_ratio,
            queue_ops: check.range("telemetry.queue_ops", self.queue_ops, 1..=10_000_000)? as usize,
            batch_spans: check.range("telemetry.batch_spans", self.batch_spans, 1..=100_000)?
                as usize,
            export_interval: Duration::from_millis(check.range(
                "telemetry.export_interval_ms",
                self.export_interval_ms,
                1..=60_000,
            )?),
            export_timeout: Duration::from_millis(check.range(
                "telemetry.export_timeout_ms",
                self.export_timeout_ms,
                100..=600_000,
            )?),
        };
        Ok(TelemetrySettings {
            traces: self.traces.then_some(traces),
            jaeger_ui_url,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    addr: String,
    workers: u64,
    max_body_bytes: u64,
    keep_alive_secs: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    queue_capacity: u64,
    batch_size: u64,
    batch_flush_ms: u64,
    max_concurrent: u64,
    max_payload_bytes: u64,
    max_metadata_entries: u64,
    max_metadata_bytes: u64,
    max_key_bytes: u64,
    max_type_len: u64,
    default_deadline_ms: u64,
    overload_retry_after_ms: u64,
    result_retention_secs: u64,
    result_retention_max: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCache {
    capacity: u64,
    ttl_secs: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: u64,
    initial_backoff_ms: u64,
    max_backoff_ms: u64,
    multiplier: f64,
    jitter: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    grace_secs: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    addr: String,
    advertise: String,
    join: Vec<String>,
    id: String,
    /// Any type: one of the wrong type is reported by `validate`, redacted, rather than
    /// by figment, whose message would quote it.
    secret: Value,
    data_dir: String,
    serves: Vec<String>,
    heartbeat_ms: u64,
    down_after_ms: u64,
    write_timeout_ms: u64,
    election_timeout_ms: u64,
    voters: u64,
    flush_bytes: u64,
    linger_us: u64,
    max_frame_bytes: u64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHandlers {
    #[serde(default)]
    http: Vec<RawHttpTarget>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpTarget {
    #[serde(rename = "type")]
    op_type: String,
    url: String,
    timeout_ms: u64,
    max_attempts: Option<u64>,
    initial_backoff_ms: Option<u64>,
    max_backoff_ms: Option<u64>,
}

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

const WORKERS: RangeInclusive<u64> = 1..=256;
const MAX_ATTEMPTS: RangeInclusive<u64> = 1..=100;
const INITIAL_BACKOFF_MS: RangeInclusive<u64> = 0..=60_000;
const MAX_BACKOFF_MS: RangeInclusive<u64> = 0..=3_600_000;

/// Checks values against their ranges and names where a bad one was set.
struct Check<'a> {
    figment: &'a Figment,
}

impl Check<'_> {
    fn invalid(&self, key: &str, value: impl Debug, allowed: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.to_owned(),
            value: format!("{value:?}"),
            allowed: allowed.into(),
            origin: self.origin(key),
        }
    }

    /// Where `key` was set.
    fn origin(&self, key: &str) -> Option<String> {
        // `handlers.http[0].url` was set by whoever set the `handlers.http` array.
        let lookup = key.split('[').next().unwrap_or(key);
        let path: Vec<String> = lookup.split('.').map(str::to_owned).collect();
        self.figment
            .find_metadata(lookup)
            .map(|md| origin_of(md, &path))
    }

    /// `key` must be set because `needed_by` is.
    fn missing(&self, key: &str, needed_by: &str, hint: impl Into<String>) -> ConfigError {
        ConfigError::Missing {
            key: key.to_owned(),
            needed_by: needed_by.to_owned(),
            origin: self.origin(needed_by),
            hint: hint.into(),
        }
    }

    fn range<T: PartialOrd + Debug + Copy>(
        &self,
        key: &str,
        value: T,
        range: RangeInclusive<T>,
    ) -> Result<T, ConfigError> {
        if range.contains(&value) {
            Ok(value)
        } else {
            Err(self.invalid(
                key,
                value,
                format!("{:?}..={:?}", range.start(), range.end()),
            ))
        }
    }

    fn count(
        &self,
        key: &str,
        value: u64,
        range: RangeInclusive<u64>,
    ) -> Result<usize, ConfigError> {
        let value = self.range(key, value, range)?;
        // Every range here ends below 2^32, so this holds on any target.
        Ok(usize::try_from(value).expect("checked range fits in usize"))
    }

    fn millis(
        &self,
        key: &str,
        value: u64,
        range: RangeInclusive<u64>,
    ) -> Result<Duration, ConfigError> {
        self.range(key, value, range).map(Duration::from_millis)
    }

    fn secs(
        &self,
        key: &str,
        value: u64,
        range: RangeInclusive<u64>,
    ) -> Result<Duration, ConfigError> {
        self.range(key, value, range).map(Duration::from_secs)
    }

    /// `max_backoff >= initial_backoff`, reported on whichever of the two `prefix`
    /// set itself (`max_key_set`), so the message points at a key the user wrote.
    fn backoff_order(
        &self,
        prefix: &str,
        initial: u64,
        max: u64,
        max_key_set: bool,
    ) -> Result<(), ConfigError> {
        if max >= initial {
            return Ok(());
        }
        Err(if max_key_set {
            self.invalid(
                &format!("{prefix}.max_backoff_ms"),
                max,
                format!(
                    "{initial}..={}, at least initial_backoff_ms",
                    MAX_BACKOFF_MS.end()
                ),
            )
        } else {
            self.invalid(
                &format!("{prefix}.initial_backoff_ms"),
                initial,
                format!("0..={max}, at most max_backoff_ms"),
            )
        })
    }
}

fn is_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `host:port` another node can dial: an IP address and port (`10.0.0.5:7071`,
/// `[fd00::5]:7071`) or a DNS name and port (`opmesh-0.opmesh:7071`). Port 0 is not one.
fn is_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let port_ok = !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p != 0);
    port_ok && (s.parse::<SocketAddr>().is_ok() || is_dns_name(host))
}

fn is_dns_name(host: &str) -> bool {
    (1..=253).contains(&host.len())
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

fn is_http_url(url: &str) -> bool {
    let rest = ["http://", "https://"].iter().find_map(|scheme| {
        url.get(..scheme.len())
            .filter(|s| s.eq_ignore_ascii_case(scheme))
            .map(|_| &url[scheme.len()..])
    });
    matches!(rest, Some(r) if !r.is_empty()
        && !r.starts_with('/')
        && !r.chars().any(|c| c.is_whitespace() || c.is_control()))
}

impl Raw {
    fn validate(self, check: &Check<'_>, profile: Option<String>) -> Result<Config, ConfigError> {
        let Raw {
            node,
            http,
            engine: e,
            cache,
            retry,
            shutdown,
            cluster,
            telemetry,
            handlers,
        } = self;

        if !is_node_id(&node.id) {
            return Err(check.invalid(
                "node.id",
                &node.id,
                "1 to 64 characters from A-Z a-z 0-9 _ . -",
            ));
        }

        let addr: SocketAddr = http.addr.parse().map_err(|_| {
            check.invalid(
                "http.addr",
                &http.addr,
                "an IP address and port, such as 127.0.0.1:7070 or [::]:7070",
            )
        })?;
        let workers = match http.workers {
            0 => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
            n if WORKERS.contains(&n) => n as usize,
            n => return Err(check.invalid("http.workers", n, "0..=256 (0 = one per CPU core)")),
        };
        let http = HttpConfig {
            addr,
            workers,
            max_body_bytes: check.count(
                "http.max_body_bytes",
                http.max_body_bytes,
                KIB..=256 * MIB,
            )?,
            keep_alive: check.secs("http.keep_alive_secs", http.keep_alive_secs, 0..=3600)?,
        };

        let retry = RetryPolicy {
            max_attempts: check.range("retry.max_attempts", retry.max_attempts, MAX_ATTEMPTS)?
                as u32,
            initial_backoff: check.millis(
                "retry.initial_backoff_ms",
                retry.initial_backoff_ms,
                INITIAL_BACKOFF_MS,
            )?,
            max_backoff: {
                let max =
                    check.range("retry.max_backoff_ms", retry.max_backoff_ms, MAX_BACKOFF_MS)?;
                check.backoff_order("retry", retry.initial_backoff_ms, max, true)?;
                Duration::from_millis(max)
            },
            multiplier: check.range("retry.multiplier", retry.multiplier, 1.0..=10.0)?,
            jitter: check.range("retry.jitter", retry.jitter, 0.0..=1.0)?,
        };

        let max_type_len = check.count("engine.max_type_len", e.max_type_len, 1..=1024)?;
        let engine = EngineConfig {
            batch: BatchPolicy {
                batch_size: check.count("engine.batch_size", e.batch_size, 1..=65_536)?,
                batch_flush: check.millis("engine.batch_flush_ms", e.batch_flush_ms, 0..=1000)?,
                max_concurrent: check.count(
                    "engine.max_concurrent",
                    e.max_concurrent,
                    1..=1_000_000,
                )?,
            },
            queue_capacity: check.count(
                "engine.queue_capacity",
                e.queue_capacity,
                1..=10_000_000,
            )?,
            overload_retry_after: check.millis(
                "engine.overload_retry_after_ms",
                e.overload_retry_after_ms,
                1..=3_600_000,
            )?,
            limits: Limits {
                max_type_len,
                max_payload_bytes: check.count(
                    "engine.max_payload_bytes",
                    e.max_payload_bytes,
                    1..=64 * MIB,
                )?,
                max_metadata_entries: check.count(
                    "engine.max_metadata_entries",
                    e.max_metadata_entries,
                    0..=1024,
                )?,
                max_metadata_bytes: check.count(
                    "engine.max_metadata_bytes",
                    e.max_metadata_bytes,
                    0..=MIB,
                )?,
                max_key_len: check.count("engine.max_key_bytes", e.max_key_bytes, 1..=65_536)?,
                default_deadline: check.millis(
                    "engine.default_deadline_ms",
                    e.default_deadline_ms,
                    1..=86_400_000,
                )?,
            },
            cache: CacheConfig {
                capacity: NonZeroUsize::new(check.count(
                    "cache.capacity",
                    cache.capacity,
                    1..=10_000_000,
                )?)
                .expect("range starts at 1"),
                ttl: check.secs("cache.ttl_secs", cache.ttl_secs, 1..=604_800)?,
            },
            retention: check.secs(
                "engine.result_retention_secs",
                e.result_retention_secs,
                1..=604_800,
            )?,
            retention_max: check.count(
                "engine.result_retention_max",
                e.result_retention_max,
                1..=10_000_000,
            )?,
            retry: retry.clone(),
        };

        let shutdown_grace = check.secs("shutdown.grace_secs", shutdown.grace_secs, 0..=3600)?;

        let mut http_handlers: Vec<HttpTarget> = Vec::with_capacity(handlers.http.len());
        for (i, t) in handlers.http.into_iter().enumerate() {
            let prefix = format!("handlers.http[{i}]");
            let key = |name: &str| format!("{prefix}.{name}");

            let type_ok = validate_type_name(&t.op_type, max_type_len).is_ok();
            if !type_ok {
                return Err(check.invalid(
                    &key("type"),
                    &t.op_type,
                    format!(
                        "1 to engine.max_type_len ({max_type_len}) characters from \
                         A-Z a-z 0-9 _ - . : /"
                    ),
                ));
            }
            if BUILTIN_TYPES.contains(&t.op_type.as_str())
                || http_handlers.iter().any(|h| h.op_type == t.op_type)
            {
                return Err(check.invalid(
                    &key("type"),
                    &t.op_type,
                    "a type no other handler has (built in: echo, sleep, resize)",
                ));
            }
            if !is_http_url(&t.url) {
                return Err(check.invalid(
                    &key("url"),
                    &t.url,
                    "an http:// or https:// URL with a host",
                ));
            }
            let timeout = check.millis(&key("timeout_ms"), t.timeout_ms, 1..=600_000)?;

            let max_attempts = match t.max_attempts {
                Some(n) => check.range(&key("max_attempts"), n, MAX_ATTEMPTS)? as u32,
                None => retry.max_attempts,
            };
            let initial_ms = match t.initial_backoff_ms {
                Some(ms) => check.range(&key("initial_backoff_ms"), ms, INITIAL_BACKOFF_MS)?,
                None => retry.initial_backoff.as_millis() as u64,
            };
            let max_ms = match t.max_backoff_ms {
                Some(ms) => check.range(&key("max_backoff_ms"), ms, MAX_BACKOFF_MS)?,
                None => retry.max_backoff.as_millis() as u64,
            };
            check.backoff_order(&prefix, initial_ms, max_ms, t.max_backoff_ms.is_some())?;

            http_handlers.push(HttpTarget {
                op_type: t.op_type,
                url: t.url,
                timeout,
                retry: RetryPolicy {
                    max_attempts,
                    initial_backoff: Duration::from_millis(initial_ms),
                    max_backoff: Duration::from_millis(max_ms),
                    ..retry.clone()
                },
            });
        }

        let handled: Vec<&str> = BUILTIN_TYPES
            .iter()
            .copied()
            .chain(http_handlers.iter().map(|h| h.op_type.as_str()))
            .collect();
        let cluster = cluster.validate(check, max_type_len, &handled)?;
        let telemetry = telemetry.validate(check)?;

        Ok(Config {
            node_id: node.id,
            http,
            engine,
            shutdown_grace,
            http_handlers,
            profile,
            cluster,
            telemetry,
        })
    }
}

impl RawCluster {
    /// `handled`: the types this node has a handler for, which `serves` may name.
    fn validate(
        self,
        check: &Check<'_>,
        max_type_len: usize,
        handled: &[&str],
    ) -> Result<Option<ClusterSettings>, ConfigError> {
        if self.addr.is_empty() {
            if !self.join.is_empty() {
                return Err(check.missing(
                    "cluster.addr",
                    "cluster.join",
                    "--join needs --cluster-addr (or OPMESH_CLUSTER_ADDR), the address this \
                     node listens on for the cluster",
                ));
            }
            return Ok(None);
        }

        let addr: SocketAddr = self.addr.parse().map_err(|_| {
            check.invalid(
                "cluster.addr",
                &self.addr,
                "empty (no cluster) or an IP address and port, such as 10.0.0.5:7071 or \
                 [::]:7071",
            )
        })?;

        let secret = match self.secret {
            Value::String(_, s) if s.is_empty() => {
                return Err(check.missing(
                    "cluster.secret",
                    "cluster.addr",
                    format!(
                        "every node of a cluster needs the same secret, at least \
                         {MIN_SECRET_BYTES} bytes; pass it with --cluster-secret or the \
                         environment variable OPMESH_CLUSTER_SECRET"
                    ),
                ))
            }
            Value::String(_, s) if s.len() >= MIN_SECRET_BYTES => Secret::from(s),
            Value::String(_, s) => {
                return Err(check.invalid(
                    "cluster.secret",
                    REDACTED,
                    format!(
                        "at least {MIN_SECRET_BYTES} bytes; this one has {}",
                        s.len()
                    ),
                ))
            }
            _ => {
                return Err(check.invalid(
                    "cluster.secret",
                    REDACTED,
                    format!("a string of at least {MIN_SECRET_BYTES} bytes"),
                ))
            }
        };

        let advertise = if self.advertise.is_empty() {
            if addr.ip().is_unspecified() {
                return Err(check.invalid(
                    "cluster.advertise",
                    &self.advertise,
                    format!(
                        "host:port other nodes can dial; required because cluster.addr \
                         ({addr}) listens on every interface"
                    ),
                ));
            }
            addr.to_string()
        } else if is_host_port(&self.advertise) {
            self.advertise
        } else {
            return Err(check.invalid(
                "cluster.advertise",
                &self.advertise,
                "empty (cluster.addr) or host:port, such as 10.0.0.5:7071 or \
                 opmesh-0.opmesh:7071",
            ));
        };

        for (i, seed) in self.join.iter().enumerate() {
            if !is_host_port(seed) {
                return Err(check.invalid(
                    &format!("cluster.join[{i}]"),
                    seed,
                    "host:port, such as 10.0.0.5:7071 or opmesh-0.opmesh:7071",
                ));
            }
        }

        if !is_node_id(&self.id) {
            return Err(check.invalid(
                "cluster.id",
                &self.id,
                "1 to 64 characters from A-Z a-z 0-9 _ . -",
            ));
        }

        for (i, op_type) in self.serves.iter().enumerate() {
            let key = format!("cluster.serves[{i}]");
            if validate_type_name(op_type, max_type_len).is_err() {
                return Err(check.invalid(
                    &key,
                    op_type,
                    format!(
                        "1 to engine.max_type_len ({max_type_len}) characters from \
                         A-Z a-z 0-9 _ - . : /"
                    ),
                ));
            }
            if !handled.contains(&op_type.as_str()) || self.serves[..i].contains(op_type) {
                return Err(check.invalid(
                    &key,
                    op_type,
                    format!(
                        "a type this node has a handler for, listed once: {}",
                        handled.join(", ")
                    ),
                ));
            }
        }

        let heartbeat_ms = check.range("cluster.heartbeat_ms", self.heartbeat_ms, 10..=10_000)?;
        let down_after_ms =
            check.range("cluster.down_after_ms", self.down_after_ms, 50..=600_000)?;
        if down_after_ms <= 2 * heartbeat_ms {
            return Err(check.invalid(
                "cluster.down_after_ms",
                down_after_ms,
                format!(
                    "{}..=600000, more than twice cluster.heartbeat_ms ({heartbeat_ms})",
                    2 * heartbeat_ms + 1
                ),
            ));
        }
        let voters = match self.voters {
            n @ (1 | 3 | 5) => n as usize,
            n => return Err(check.invalid("cluster.voters", n, "1, 3 or 5")),
        };

        Ok(Some(ClusterSettings {
            addr,
            advertise,
            join: self.join,
            id: self.id,
            secret,
            data_dir: (!self.data_dir.is_empty()).then(|| PathBuf::from(self.data_dir)),
            serves: self.serves,
            heartbeat: Duration::from_millis(heartbeat_ms),
            down_after: Duration::from_millis(down_after_ms),
            write_timeout: check.millis(
                "cluster.write_timeout_ms",
                self.write_timeout_ms,
                100..=600_000,
            )?,
            election_timeout: check.millis(
                "cluster.election_timeout_ms",
                self.election_timeout_ms,
                50..=60_000,
            )?,
            voters,
            flush_bytes: check.count("cluster.flush_bytes", self.flush_bytes, KIB..=16 * MIB)?,
            linger: check
                .range("cluster.linger_us", self.linger_us, 0..=100_000)
                .map(Duration::from_micros)?,
            max_frame: check.count(
                "cluster.max_frame_bytes",
                self.max_frame_bytes,
                64 * KIB..=GIB,
            )?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;
    use std::io::Write;
    use std::sync::{Mutex, MutexGuard, PoisonError};

    use super::*;

    /// Serializes every test that reads or writes the process environment, and restores
    /// it afterwards. On creation it removes every `OPMESH_*` variable, so a developer's
    /// shell cannot change what the tests see.
    struct EnvGuard {
        saved: Vec<(OsString, Option<OsString>)>,
        _lock: MutexGuard<'static, ()>,
    }

    static ENV_LOCK: Mutex<()> = Mutex::new(());

    impl EnvGuard {
        fn new() -> Self {
            let lock = ENV_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
            let mut guard = EnvGuard {
                saved: Vec::new(),
                _lock: lock,
            };
            for (name, _) in std::env::vars_os() {
                if name.to_string_lossy().starts_with("OPMESH_") {
                    guard.save(&name);
                    std::env::remove_var(&name);
                }
            }
            guard
        }

        fn save(&mut self, name: &OsString) {
            if !self.saved.iter().any(|(n, _)| n == name) {
                self.saved.push((name.clone(), std::env::var_os(name)));
            }
        }

        fn set(&mut self, name: &str, value: &str) {
            self.save(&name.into());
            std::env::set_var(name, value);
        }
    }

    impl Drop for EnvGuard {
        fn drop(&mut self) {
            for (name, value) in self.saved.drain(..).rev() {
                match value {
                    Some(v) => std::env::set_var(&name, v),
                    None => std::env::remove_var(&name),
                }
            }
        }
    }

    fn user_file(contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("temp file");
        f.write_all(contents.as_bytes()).expect("write temp file");
        f
    }

    fn with_file(file: &tempfile::NamedTempFile) -> LoadOptions {
        LoadOptions {
            config_file: Some(file.path().to_owned()),
            ..LoadOptions::default()
        }
    }

    fn load_ok(opts: &LoadOptions) -> Config {
        load(opts).unwrap_or_else(|e| panic!("config should load: {e}"))
    }

    fn load_err(opts: &LoadOptions) -> ConfigError {
        match load(opts) {
            Ok(c) => panic!("config should be rejected, got {c:?}"),
            Err(e) => e,
        }
    }

    fn profile(name: &str) -> LoadOptions {
        LoadOptions {
            profile: Some(name.into()),
            ..LoadOptions::default()
        }
    }

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
        assert!(c.cluster.is_none(), "a single node by default");
    }

    #[test]
    fn defaults_agree_with_the_engine_defaults() {
        // A library user gets `EngineConfig::default()`, the binary gets default.toml:
        // the two must describe the same engine.
        let _env = EnvGuard::new();
        let c = load_ok(&LoadOptions::default());
        assert_eq!(
            format!("{:?}", c.engine),
            format!("{:?}", EngineConfig::default())
        );
    }

    #[test]
    fn every_key_in_default_toml_is_documented() {
        let mut previous = "";
        let mut keys = 0;
        for line in DEFAULT_TOML.lines().map(str::trim) {
            if !line.is_empty() && !line.starts_with('#') && !line.starts_with('[') {
                keys += 1;
                assert!(
                    previous.starts_with('#'),
                    "`{line}` in config/default.toml has no comment above it"
                );
            }
            previous = line;
        }
        assert_eq!(
            keys, 51,
            "a key was added or removed: document it and update this count"
        );
    }

    /// A profile's keys as (dotted key, value), to compare with the defaults.
    fn flat(toml: &str) -> Vec<(String, figment::value::Value)> {
        let dict: Dict = Toml::from_str(toml).expect("valid TOML");
        let mut out = Vec::new();
        for (section, table) in dict {
            for (key, value) in table.into_dict().expect("a table") {
                out.push((format!("{section}.{key}"), value));
            }
        }
        out
    }

    #[test]
    fn every_profile_loads_validates_and_changes_only_what_it_must() {
        let _env = EnvGuard::new();
        let defaults = flat(DEFAULT_TOML);
        for &name in PROFILES {
            let toml = profile_toml(name).unwrap_or_else(|| panic!("`{name}` is not built in"));
            assert!(
                toml.starts_with("# Profile `"),
                "config/{name}.toml must open with a comment saying who it is for"
            );
            let c = load_ok(&profile(name));
            assert_eq!(c.profile.as_deref(), Some(name));

            let keys = flat(toml);
            assert!(!keys.is_empty(), "profile `{name}` changes nothing");
            for (key, value) in keys {
                let default = defaults
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v)
                    .unwrap_or_else(|| panic!("`{key}` in `{name}` is not a default key"));
                assert_ne!(
                    &value, default,
                    "`{key}` in profile `{name}` repeats the default value"
                );
            }
        }
    }

    #[test]
    fn profiles_fit_their_workloads() {
        let _env = EnvGuard::new();
        let d = load_ok(&LoadOptions::default()).engine;

        let e = load_ok(&profile("read-heavy")).engine;
        assert!(e.cache.capacity > d.cache.capacity && e.cache.ttl > d.cache.ttl);

        let e = load_ok(&profile("write-heavy")).engine;
        assert!(e.cache.capacity < d.cache.capacity && e.cache.ttl < d.cache.ttl);
        assert!(e.queue_capacity > d.queue_capacity);
        assert!(e.batch.batch_size > d.batch.batch_size);

        let e = load_ok(&profile("streaming")).engine;
        assert!(e.batch.batch_size < d.batch.batch_size);
        assert_eq!(e.batch.batch_flush, Duration::ZERO);
        assert!(e.batch.max_concurrent > d.batch.max_concurrent);
        assert!(e.retention < d.retention);

        let e = load_ok(&profile("low-latency")).engine;
        assert!(e.batch.batch_size < d.batch.batch_size);
        assert_eq!(e.batch.batch_flush, Duration::ZERO);
        assert!(e.queue_capacity < d.queue_capacity);
        assert!(e.limits.default_deadline < d.limits.default_deadline);
        assert_eq!(e.retry.max_attempts, 2);
        assert!(e.retry.max_backoff < d.retry.max_backoff);

        let e = load_ok(&profile("throughput")).engine;
        assert!(e.batch.batch_size > d.batch.batch_size);
        assert_eq!(e.batch.batch_flush, Duration::from_millis(1));
        assert!(e.queue_capacity > d.queue_capacity);
        assert!(e.batch.max_concurrent > d.batch.max_concurrent);
    }

    #[test]
    fn profile_comes_from_the_environment_unless_a_flag_names_one() {
        let mut env = EnvGuard::new();
        env.set(PROFILE_ENV, "streaming");
        let c = load_ok(&LoadOptions::default());
        assert_eq!(c.profile.as_deref(), Some("streaming"));
        assert_eq!(c.engine.batch.batch_size, 32);

        let c = load_ok(&profile("throughput"));
        assert_eq!(c.profile.as_deref(), Some("throughput"));
        assert_eq!(c.engine.batch.batch_size, 4096);
    }

    #[test]
    fn later_layers_win_default_profile_file_env_flags() {
        let mut env = EnvGuard::new();
        // `engine.batch_size`: default < profile < user file < environment.
        let file = user_file("[engine]\nbatch_size = 777\n[http]\naddr = \"127.0.0.2:1\"\n");
        let mut opts = profile("throughput");
        assert_eq!(
            load_ok(&LoadOptions::default()).engine.batch.batch_size,
            256
        );
        assert_eq!(load_ok(&opts).engine.batch.batch_size, 4096);
        opts.config_file = Some(file.path().to_owned());
        assert_eq!(load_ok(&opts).engine.batch.batch_size, 777);
        env.set("OPMESH_ENGINE__BATCH_SIZE", "888");
        assert_eq!(load_ok(&opts).engine.batch.batch_size, 888);

        // `http.addr`, which flags can set: user file < short env < env < flag.
        let addr = |opts: &LoadOptions| load_ok(opts).http.addr.to_string();
        assert_eq!(addr(&opts), "127.0.0.2:1");
        env.set("OPMESH_HTTP_ADDR", "127.0.0.3:1");
        assert_eq!(addr(&opts), "127.0.0.3:1");
        env.set("OPMESH_HTTP__ADDR", "127.0.0.4:1");
        assert_eq!(addr(&opts), "127.0.0.4:1");
        opts.http_addr = Some("127.0.0.5:1".into());
        assert_eq!(addr(&opts), "127.0.0.5:1");

        // The profile still applies where nothing later set a key.
        assert_eq!(
            load_ok(&opts).engine.batch.batch_flush,
            Duration::from_millis(1)
        );
    }

    #[test]
    fn short_env_aliases_set_node_id_and_http_addr() {
        let mut env = EnvGuard::new();
        env.set("OPMESH_HTTP_ADDR", "0.0.0.0:7171");
        env.set("OPMESH_NODE_ID", "edge-7");
        let c = load_ok(&LoadOptions::default());
        assert_eq!(c.http.addr, "0.0.0.0:7171".parse::<SocketAddr>().unwrap());
        assert_eq!(c.node_id, "edge-7");

        let c = load_ok(&LoadOptions {
            node_id: Some("from-flag".into()),
            ..LoadOptions::default()
        });
        assert_eq!(c.node_id, "from-flag");
    }

    #[test]
    fn string_env_values_are_taken_as_written() {
        // Parsed as TOML, `007` would become the number 7 and `[::]:7070` an error.
        let mut env = EnvGuard::new();
        env.set("OPMESH_NODE__ID", "007");
        env.set("OPMESH_HTTP__ADDR", "[::]:7070");
        let c = load_ok(&LoadOptions::default());
        assert_eq!(c.node_id, "007");
        assert_eq!(c.http.addr, "[::]:7070".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn out_of_range_value_names_key_value_range_and_origin() {
        let mut env = EnvGuard::new();
        env.set("OPMESH_ENGINE__BATCH_SIZE", "0");
        let err = load_err(&LoadOptions::default());
        assert_eq!(
            err.to_string(),
            "invalid value for `engine.batch_size`: 0 (allowed: 1..=65536) \
             in environment variable `OPMESH_ENGINE__BATCH_SIZE`"
        );
        assert!(matches!(
            err,
            ConfigError::Invalid { ref key, ref value, ref allowed, .. }
                if key == "engine.batch_size" && value == "0" && allowed == "1..=65536"
        ));

        let file = user_file("[retry]\njitter = 1.5\n");
        let msg = load_err(&with_file(&file)).to_string();
        assert!(
            msg.starts_with(
                "invalid value for `retry.jitter`: 1.5 (allowed: 0.0..=1.0) in config file `"
            ),
            "{msg}"
        );
        assert!(msg.contains(&file.path().display().to_string()), "{msg}");

        let file = user_file("[http]\nmax_body_bytes = 1023\n");
        let msg = load_err(&with_file(&file)).to_string();
        assert!(
            msg.contains("`http.max_body_bytes`: 1023 (allowed: 1024..=268435456)"),
            "{msg}"
        );
    }

    #[test]
    fn max_backoff_below_initial_backoff_is_rejected() {
        let _env = EnvGuard::new();
        let file = user_file("[retry]\ninitial_backoff_ms = 500\nmax_backoff_ms = 100\n");
        let msg = load_err(&with_file(&file)).to_string();
        assert!(
            msg.starts_with(
                "invalid value for `retry.max_backoff_ms`: 100 (allowed: 500..=3600000"
            ),
            "{msg}"
        );
    }

    #[test]
    fn invalid_node_id_and_address_are_rejected_naming_the_key() {
        let mut env = EnvGuard::new();
        let msg = load_err(&LoadOptions {
            http_addr: Some("localhost:7070".into()),
            ..LoadOptions::default()
        })
        .to_string();
        assert!(
            msg.starts_with("invalid value for `http.addr`: \"localhost:7070\""),
            "{msg}"
        );
        assert!(msg.ends_with("in flag `--http-addr`"), "{msg}");

        env.set("OPMESH_NODE_ID", "has space");
        let msg = load_err(&LoadOptions::default()).to_string();
        assert!(
            msg.starts_with("invalid value for `node.id`: \"has space\""),
            "{msg}"
        );
        assert!(
            msg.ends_with("in environment variable `OPMESH_NODE_ID`"),
            "{msg}"
        );
    }

    #[test]
    fn value_of_the_wrong_type_names_key_and_variable() {
        let mut env = EnvGuard::new();
        env.set("OPMESH_ENGINE__QUEUE_CAPACITY", "lots");
        let err = load_err(&LoadOptions::default());
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("for key `engine.queue_capacity`"), "{msg}");
        assert!(
            msg.contains("environment variable `OPMESH_ENGINE__QUEUE_CAPACITY`"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_key_is_rejected_naming_it_and_its_origin() {
        let mut env = EnvGuard::new();
        let file = user_file("[engine]\nbatchsize = 3\n");
        let err = load_err(&with_file(&file));
        let msg = err.to_string();
        assert!(
            matches!(err, ConfigError::UnknownKey { ref key, .. } if key == "engine.batchsize"),
            "{err:?}"
        );
        assert!(msg.contains(&file.path().display().to_string()), "{msg}");
        assert!(
            msg.contains("batch_size"),
            "the message lists the known keys: {msg}"
        );

        let file = user_file("[engin]\nbatch_size = 3\n");
        let msg = load_err(&with_file(&file)).to_string();
        assert!(
            msg.starts_with("unknown key `engin` in config file"),
            "{msg}"
        );

        env.set("OPMESH_CACHE__TTL", "5");
        let msg = load_err(&LoadOptions::default()).to_string();
        assert!(
            msg.starts_with("unknown key `cache.ttl` in environment variable `OPMESH_CACHE__TTL`"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_profile_lists_the_known_ones() {
        let mut env = EnvGuard::new();
        let msg = load_err(&profile("fast")).to_string();
        assert_eq!(
            msg,
            "unknown profile `fast` (known profiles: read-heavy, write-heavy, streaming, \
             low-latency, throughput)"
        );
        env.set(PROFILE_ENV, "fast");
        assert!(matches!(
            load_err(&LoadOptions::default()),
            ConfigError::UnknownProfile { ref name } if name == "fast"
        ));
    }

    #[test]
    fn workers_zero_resolves_to_at_least_one() {
        let mut env = EnvGuard::new();
        env.set("OPMESH_HTTP__WORKERS", "0");
        assert!(load_ok(&LoadOptions::default()).http.workers >= 1);
        env.set("OPMESH_HTTP__WORKERS", "4");
        assert_eq!(load_ok(&LoadOptions::default()).http.workers, 4);
        env.set("OPMESH_HTTP__WORKERS", "257");
        let msg = load_err(&LoadOptions::default()).to_string();
        assert!(
            msg.contains("`http.workers`: 257 (allowed: 0..=256"),
            "{msg}"
        );
    }

    #[test]
    fn missing_or_malformed_user_file_is_an_error() {
        let _env = EnvGuard::new();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("absent.toml");
        let err = load_err(&LoadOptions {
            config_file: Some(path.clone()),
            ..LoadOptions::default()
        });
        assert!(matches!(err, ConfigError::ReadFile { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()));

        let file = user_file("[engine\nbatch_size = 3\n");
        let msg = load_err(&with_file(&file)).to_string();
        assert!(msg.starts_with("config file `"), "{msg}");
        assert!(msg.contains("line 1"), "{msg}");
    }

    #[test]
    fn http_handlers_load_with_their_own_or_the_default_retry() {
        let _env = EnvGuard::new();
        let file = user_file(
            r#"
            [retry]
            max_attempts = 4

            [[handlers.http]]
            type = "webhook"
            url = "https://hooks.example.com/in"
            timeout_ms = 2500

            [[handlers.http]]
            type = "audit.log"
            url = "http://127.0.0.1:9000/audit"
            timeout_ms = 100
            max_attempts = 1
            max_backoff_ms = 50
            "#,
        );
        let c = load_ok(&with_file(&file));
        let [a, b] = &c.http_handlers[..] else {
            panic!("two handlers expected: {:?}", c.http_handlers)
        };
        assert_eq!(a.op_type, "webhook");
        assert_eq!(a.url, "https://hooks.example.com/in");
        assert_eq!(a.timeout, Duration::from_millis(2500));
        assert_eq!(a.retry, c.engine.retry);
        assert_eq!(a.retry.max_attempts, 4);

        assert_eq!(b.op_type, "audit.log");
        assert_eq!(b.retry.max_attempts, 1);
        assert_eq!(b.retry.initial_backoff, Duration::from_millis(10));
        assert_eq!(b.retry.max_backoff, Duration::from_millis(50));
        assert_eq!(b.retry.multiplier, c.engine.retry.multiplier);
    }

    #[test]
    fn bad_http_handlers_are_rejected_naming_the_entry() {
        let _env = EnvGuard::new();
        let cases = [
            (
                "type = \"a\"\nurl = \"ftp://x\"\ntimeout_ms = 1",
                "`handlers.http[0].url`: \"ftp://x\"",
            ),
            (
                "type = \"echo\"\nurl = \"http://x\"\ntimeout_ms = 1",
                "`handlers.http[0].type`: \"echo\"",
            ),
            (
                "type = \"a b\"\nurl = \"http://x\"\ntimeout_ms = 1",
                "`handlers.http[0].type`: \"a b\"",
            ),
            (
                "type = \"a\"\nurl = \"http://x\"\ntimeout_ms = 0",
                "`handlers.http[0].timeout_ms`: 0 (allowed: 1..=600000)",
            ),
            (
                "type = \"a\"\nurl = \"http://x\"\ntimeout_ms = 1\ninitial_backoff_ms = 5000",
                "`handlers.http[0].initial_backoff_ms`: 5000 (allowed: 0..=1000",
            ),
        ];
        for (entry, expected) in cases {
            let file = user_file(&format!("[[handlers.http]]\n{entry}\n"));
            let msg = load_err(&with_file(&file)).to_string();
            assert!(msg.contains(expected), "{entry:?}: {msg}");
        }

        let dup = "[[handlers.http]]\ntype = \"a\"\nurl = \"http://x\"\ntimeout_ms = 1\n";
        let file = user_file(&format!("{dup}{dup}"));
        let msg = load_err(&with_file(&file)).to_string();
        assert!(msg.contains("`handlers.http[1].type`: \"a\""), "{msg}");

        let file = user_file("[[handlers.http]]\ntype = \"a\"\ntimeout_ms = 1\n");
        let msg = load_err(&with_file(&file)).to_string();
        assert!(msg.contains("missing field `url`"), "{msg}");
    }
    const SECRET: &str = "correct-horse-battery-staple";

    fn cluster_flags() -> LoadOptions {
        LoadOptions {
            cluster_addr: Some("127.0.0.1:7071".into()),
            cluster_secret: Some(Secret::from(SECRET.to_owned())),
            ..LoadOptions::default()
        }
    }

    fn cluster_of(opts: &LoadOptions) -> ClusterSettings {
        load_ok(opts).cluster.expect("a cluster")
    }

    #[test]
    fn cluster_flags_set_a_cluster_with_the_documented_defaults() {
        let _env = EnvGuard::new();
        let c = cluster_of(&cluster_flags());
        assert_eq!(c.addr, "127.0.0.1:7071".parse::<SocketAddr>().unwrap());
        assert_eq!(c.advertise, "127.0.0.1:7071");
        assert!(c.join.is_empty());
        assert_eq!(c.id, "opmesh");
        assert_eq!(c.secret.expose(), SECRET.as_bytes());
        assert_eq!(c.data_dir, None);
        assert!(c.serves.is_empty());
        assert_eq!(c.heartbeat, Duration::from_millis(100));
        assert_eq!(c.down_after, Duration::from_secs(1));
        assert_eq!(c.write_timeout, Duration::from_secs(3));
        assert_eq!(c.election_timeout, Duration::from_millis(200));
        assert_eq!(c.voters, 3);
        assert_eq!(c.flush_bytes, 64 * 1024);
        assert_eq!(c.linger, Duration::ZERO);
        assert_eq!(c.max_frame, 16 * 1024 * 1024);

        let c = cluster_of(&LoadOptions {
            join: vec!["10.0.0.5:7071".into(), "opmesh-0.opmesh.svc:7071".into()],
            data_dir: Some("/var/lib/opmesh".into()),
            ..cluster_flags()
        });
        assert_eq!(c.join, ["10.0.0.5:7071", "opmesh-0.opmesh.svc:7071"]);
        assert_eq!(c.data_dir, Some(PathBuf::from("/var/lib/opmesh")));
    }

    #[test]
    fn cluster_keys_load_from_a_file() {
        let _env = EnvGuard::new();
        let file = user_file(&format!(
            r#"
            [cluster]
            addr = "0.0.0.0:7071"
            advertise = "opmesh-1.opmesh.default.svc.cluster.local:7071"
            join = ["[fd00::5]:7071"]
            id = "prod.eu-1"
            secret = "{SECRET}"
            data_dir = "data"
            serves = ["echo"]
            heartbeat_ms = 50
            down_after_ms = 101
            write_timeout_ms = 100
            election_timeout_ms = 1000
            voters = 5
            flush_bytes = 1024
            linger_us = 250
            max_frame_bytes = 65536
            "#
        ));
        let c = cluster_of(&with_file(&file));
        assert_eq!(c.addr, "0.0.0.0:7071".parse::<SocketAddr>().unwrap());
        assert_eq!(
            c.advertise,
            "opmesh-1.opmesh.default.svc.cluster.local:7071"
        );
        assert_eq!(c.join, ["[fd00::5]:7071"]);
        assert_eq!(c.id, "prod.eu-1");
        assert_eq!(c.data_dir, Some(PathBuf::from("data")));
        assert_eq!(c.serves, ["echo"]);
        assert_eq!(c.heartbeat, Duration::from_millis(50));
        assert_eq!(c.down_after, Duration::from_millis(101));
        assert_eq!(c.write_timeout, Duration::from_millis(100));
        assert_eq!(c.election_timeout, Duration::from_secs(1));
        assert_eq!(c.voters, 5);
        assert_eq!(c.flush_bytes, 1024);
        assert_eq!(c.linger, Duration::from_micros(250));
        assert_eq!(c.max_frame, 65536);
    }

    #[test]
    fn cluster_keys_other_than_addr_are_ignored_without_a_cluster() {
        let _env = EnvGuard::new();
        let file = user_file("[cluster]\nvoters = 4\nsecret = \"short\"\n");
        assert!(load_ok(&with_file(&file)).cluster.is_none());
    }

    #[test]
    fn cluster_short_env_forms_are_read_as_written() {
        let mut env = EnvGuard::new();
        env.set("OPMESH_CLUSTER_ADDR", "[::1]:7071");
        // Digits only: parsed as TOML it would be a number.
        env.set("OPMESH_CLUSTER_SECRET", "1234567890123456789");
        env.set("OPMESH_DATA_DIR", "/data/007");
        env.set("OPMESH_JOIN", " 10.0.0.5:7071, opmesh-0.opmesh:7071 ,");
        let c = cluster_of(&LoadOptions::default());
        assert_eq!(c.addr, "[::1]:7071".parse::<SocketAddr>().unwrap());
        assert_eq!(c.advertise, "[::1]:7071");
        assert_eq!(c.secret.expose(), b"1234567890123456789");
        assert_eq!(c.data_dir, Some(PathBuf::from("/data/007")));
        assert_eq!(c.join, ["10.0.0.5:7071", "opmesh-0.opmesh:7071"]);

        // The two-underscore forms win; lists are comma separated there too.
        env.set("OPMESH_CLUSTER__JOIN", "10.0.0.6:7071");
        env.set("OPMESH_CLUSTER__ID", "42");
        env.set("OPMESH_CLUSTER__SERVES", "echo,sleep");
        let c = cluster_of(&LoadOptions::default());
        assert_eq!(c.join, ["10.0.0.6:7071"]);
        assert_eq!(c.id, "42");
        assert_eq!(c.serves, ["echo", "sleep"]);

        // An empty list variable clears the list; flags win over the environment.
        env.set("OPMESH_CLUSTER__JOIN", "");
        assert!(cluster_of(&LoadOptions::default()).join.is_empty());
        let c = cluster_of(&LoadOptions {
            join: vec!["10.0.0.7:7071".into()],
            cluster_addr: Some("127.0.0.1:9000".into()),
            ..LoadOptions::default()
        });
        assert_eq!(c.join, ["10.0.0.7:7071"]);
        assert_eq!(c.addr.port(), 9000);
    }

    #[test]
    fn cluster_without_a_secret_names_cluster_secret_and_how_to_set_it() {
        let _env = EnvGuard::new();
        let err = load_err(&LoadOptions {
            cluster_addr: Some("127.0.0.1:7071".into()),
            ..LoadOptions::default()
        });
        assert!(
            matches!(err, ConfigError::Missing { ref key, .. } if key == "cluster.secret"),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "`cluster.secret` must be set because `cluster.addr` is set in flag \
                 `--cluster-addr`"
            ),
            "{msg}"
        );
        assert!(msg.contains("--cluster-secret"), "{msg}");
        assert!(msg.contains("OPMESH_CLUSTER_SECRET"), "{msg}");
    }

    #[test]
    fn short_secret_is_rejected() {
        let mut env = EnvGuard::new();
        env.set("OPMESH_CLUSTER_SECRET", "fifteen-bytes!!");
        let msg = load_err(&LoadOptions {
            cluster_addr: Some("127.0.0.1:7071".into()),
            ..LoadOptions::default()
        })
        .to_string();
        assert_eq!(
            msg,
            "invalid value for `cluster.secret`: \"<redacted>\" (allowed: at least 16 bytes; \
             this one has 15) in environment variable `OPMESH_CLUSTER_SECRET`"
        );
    }

    #[test]
    fn voters_must_be_one_three_or_five() {
        let mut env = EnvGuard::new();
        for ok in [1, 3, 5] {
            env.set("OPMESH_CLUSTER__VOTERS", &ok.to_string());
            assert_eq!(cluster_of(&cluster_flags()).voters, ok);
        }
        for bad in [0, 2, 4, 7] {
            env.set("OPMESH_CLUSTER__VOTERS", &bad.to_string());
            let msg = load_err(&cluster_flags()).to_string();
            assert_eq!(
                msg,
                format!(
                    "invalid value for `cluster.voters`: {bad} (allowed: 1, 3 or 5) in \
                     environment variable `OPMESH_CLUSTER__VOTERS`"
                )
            );
        }
    }

    #[test]
    fn join_without_cluster_addr_is_rejected() {
        let mut env = EnvGuard::new();
        let err = load_err(&LoadOptions {
            join: vec!["10.0.0.5:7071".into()],
            ..LoadOptions::default()
        });
        assert!(
            matches!(err, ConfigError::Missing { ref key, .. } if key == "cluster.addr"),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("set in flag `--join`"), "{msg}");
        assert!(msg.contains("--join needs --cluster-addr"), "{msg}");

        env.set("OPMESH_JOIN", "10.0.0.5:7071");
        let msg = load_err(&LoadOptions::default()).to_string();
        assert!(
            msg.contains("in environment variable `OPMESH_JOIN`"),
            "{msg}"
        );
    }

    #[test]
    fn down_after_must_exceed_twice_the_heartbeat() {
        let mut env = EnvGuard::new();
        env.set("OPMESH_CLUSTER__HEARTBEAT_MS", "500");
        let msg = load_err(&cluster_flags()).to_string();
        assert!(
            msg.starts_with(
                "invalid value for `cluster.down_after_ms`: 1000 (allowed: 1001..=600000, \
                 more than twice cluster.heartbeat_ms (500))"
            ),
            "{msg}"
        );
        env.set("OPMESH_CLUSTER__DOWN_AFTER_MS", "1001");
        assert_eq!(
            cluster_of(&cluster_flags()).down_after,
            Duration::from_millis(1001)
        );
    }

    #[test]
    fn bad_cluster_values_are_rejected_naming_the_key() {
        let _env = EnvGuard::new();
        let cases = [
            (
                "addr = \"opmesh-0:7071\"",
                "`cluster.addr`: \"opmesh-0:7071\"",
            ),
            (
                "addr = \"0.0.0.0:7071\"",
                "`cluster.advertise`: \"\" (allowed: host:port other nodes can dial",
            ),
            (
                "advertise = \"opmesh-0\"",
                "`cluster.advertise`: \"opmesh-0\"",
            ),
            (
                "advertise = \"-bad-:7071\"",
                "`cluster.advertise`: \"-bad-:7071\"",
            ),
            ("join = [\"a:1\", \"a:0\"]", "`cluster.join[1]`: \"a:0\""),
            ("join = [\"::1:7071\"]", "`cluster.join[0]`: \"::1:7071\""),
            ("id = \"\"", "`cluster.id`: \"\""),
            ("serves = [\"a b\"]", "`cluster.serves[0]`: \"a b\""),
            ("serves = [\"webhook\"]", "`cluster.serves[0]`: \"webhook\""),
            (
                "serves = [\"echo\", \"echo\"]",
                "`cluster.serves[1]`: \"echo\" (allowed: a type this node has a handler \
                 for, listed once: echo, sleep, resize)",
            ),
            (
                "heartbeat_ms = 9",
                "`cluster.heartbeat_ms`: 9 (allowed: 10..=10000)",
            ),
            (
                "write_timeout_ms = 99",
                "`cluster.write_timeout_ms`: 99 (allowed: 100..=600000)",
            ),
            (
                "election_timeout_ms = 60001",
                "`cluster.election_timeout_ms`: 60001 (allowed: 50..=60000)",
            ),
            (
                "flush_bytes = 1023",
                "`cluster.flush_bytes`: 1023 (allowed: 1024..=16777216)",
            ),
            (
                "linger_us = 100001",
                "`cluster.linger_us`: 100001 (allowed: 0..=100000)",
            ),
            (
                "max_frame_bytes = 65535",
                "`cluster.max_frame_bytes`: 65535 (allowed: 65536..=1073741824)",
            ),
        ];
        for (line, expected) in cases {
            // A valid cluster, the case's line replacing the key it names.
            let key = line.split(' ').next().unwrap_or_default();
            let mut lines = vec![
                "addr = \"127.0.0.1:7071\"".to_owned(),
                format!("secret = \"{SECRET}\""),
            ];
            lines.retain(|l| !l.starts_with(&format!("{key} ")));
            lines.push(line.to_owned());
            let file = user_file(&format!("[cluster]\n{}\n", lines.join("\n")));
            let msg = load_err(&with_file(&file)).to_string();
            assert!(msg.contains(expected), "{line:?}: {msg}");
        }
    }

    #[test]
    fn secret_never_shows_in_debug_output_or_error_messages() {
        let _env = EnvGuard::new();
        let opts = LoadOptions {
            join: vec!["10.0.0.5:7071".into()],
            ..cluster_flags()
        };
        assert!(!format!("{opts:?}").contains(SECRET), "{opts:?}");
        let c = load_ok(&opts);
        let shown = format!("{c:?}");
        assert!(!shown.contains(SECRET), "{shown}");
        assert!(shown.contains("secret: \"<redacted>\""), "{shown}");

        // Errors while a secret is set, or about the secret itself.
        let mut errors = vec![
            load_err(&LoadOptions {
                cluster_secret: Some(Secret::from("correct-horse".to_owned())),
                ..opts.clone()
            }),
            load_err(&LoadOptions {
                cluster_addr: None,
                ..opts.clone()
            }),
            load_err(&LoadOptions {
                cluster_addr: Some("127.0.0.1".into()),
                ..opts.clone()
            }),
        ];
        for contents in [
            // Of the wrong type: figment would quote the value.
            "[cluster]\naddr = \"127.0.0.1:7071\"\nsecret = 1234567890123456789\n".to_owned(),
            format!("[cluster]\nsecret = [\"{SECRET}\"]\naddr = \"127.0.0.1:7071\"\n"),
            // Not TOML, on the secret's line: the parser would quote the line.
            format!("[cluster]\nsecret = \"{SECRET}\n"),
            format!("[cluster]\nsecret = {SECRET}\n"),
            format!("[cluster]\nsecret = \"{SECRET}\"\nsecret = \"{SECRET}\"\n"),
            // Another key wrong beside it.
            format!("[cluster]\naddr = \"127.0.0.1:7071\"\nsecret = \"{SECRET}\"\nvoters = 2\n"),
        ] {
            let file = user_file(&contents);
            errors.push(load_err(&with_file(&file)));
        }
        let digits = "1234567890123456789";
        for err in errors {
            for shown in [err.to_string(), format!("{err:?}")] {
                assert!(
                    !shown.contains(SECRET)
                        && !shown.contains(digits)
                        && !shown.contains("correct-horse"),
                    "{shown}"
                );
            }
        }
    }

    #[test]
    fn malformed_user_file_reports_line_and_column_without_quoting_it() {
        let _env = EnvGuard::new();
        let file = user_file("[engine]\nbatch_size = 3\nqueue_capacity = = 4\n");
        let err = load_err(&with_file(&file));
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.starts_with("config file `"), "{msg}");
        assert!(
            msg.contains("TOML parse error at line 3, column 18: "),
            "{msg}"
        );
        assert!(!msg.contains("queue_capacity"), "{msg}");
    }
}
