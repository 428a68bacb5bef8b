//! Configuration: where the binary's settings come from and the one validated
//! [`Config`] it builds a node from.
//!
//! Settings are layered, later wins: the built-in `config/default.toml`, then a
//! workload profile (built in too, chosen by `--profile` or `OPMESH_PROFILE`), then an
//! optional user file (`--config`), then `OPMESH_<SECTION>__<KEY>` environment
//! variables (plus the short forms `OPMESH_NODE_ID` and `OPMESH_HTTP_ADDR`), then flags.
//! [`load`] merges them, rejects unknown keys, checks every value against its range and
//! converts it to a type with its unit (`Duration`, `NonZeroUsize`, `SocketAddr`).
//! Nothing downstream checks these values again. Every error names the key, the value
//! and where it was set, so a bad setting stops start-up with a message a reader can act
//! on.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use figment::error::Kind;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};
use serde::Deserialize;

use crate::handlers::HttpTarget;
use crate::op::validate_type_name;
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
const BUILTIN_TYPES: &[&str] = &["echo", "sleep"];

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

/// Keys whose value is a string that may look like a number (`node.id = "007"`). Their
/// environment variables are read as given, not parsed into a TOML value: the short
/// forms first, then the `SECTION__KEY` forms, which win.
const STRING_ENV: &[(&str, &str)] = &[
    ("OPMESH_NODE_ID", "node.id"),
    ("OPMESH_HTTP_ADDR", "http.addr"),
    ("OPMESH_NODE__ID", "node.id"),
    ("OPMESH_HTTP__ADDR", "http.addr"),
];

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

/// What the command line contributes: the profile, the user file and the flags that
/// override single keys. All `None` (the default) loads the built-in defaults and the
/// environment.
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
        figment = figment.merge(Layer::fixed(
            Toml::string(&text),
            format!("config file `{}`", path.display()),
        ));
    }

    for &(var, key) in STRING_ENV {
        if let Some(value) = std::env::var_os(var) {
            figment = figment.merge(Layer::fixed(
                Serialized::default(key, value.to_string_lossy().into_owned()),
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

    let raw: Raw = figment
        .extract()
        .map_err(|e| ConfigError::from_figment(e, &figment))?;
    raw.validate(&Check { figment: &figment }, profile)
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
    #[serde(default)]
    handlers: RawHandlers,
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
        // `handlers.http[0].url` was set by whoever set the `handlers.http` array.
        let lookup = key.split('[').next().unwrap_or(key);
        let path: Vec<String> = lookup.split('.').map(str::to_owned).collect();
        let origin = self
            .figment
            .find_metadata(lookup)
            .map(|md| origin_of(md, &path));
        ConfigError::Invalid {
            key: key.to_owned(),
            value: format!("{value:?}"),
            allowed: allowed.into(),
            origin,
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
                    "a type no other handler has (built in: echo, sleep)",
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

        Ok(Config {
            node_id: node.id,
            http,
            engine,
            shutdown_grace,
            http_handlers,
            profile,
        })
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
            keys, 26,
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
}
