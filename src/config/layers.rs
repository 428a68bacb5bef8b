//! Where each value comes from: the built-in defaults and profiles, the user file, the
//! environment (`OPMESH_*` and the OpenTelemetry SDK's `OTEL_*` variables) and the
//! flags, merged in that order by [`merge`], later wins. Every layer is a [`Layer`],
//! whose metadata names the origin of each key, so that an error can say where a bad
//! value was set ([`origin_of`]).

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};

use super::error::ConfigError;
use super::LoadOptions;

/// The workload profiles compiled into the binary, by name.
pub const PROFILES: &[&str] = &[
    "read-heavy",
    "write-heavy",
    "streaming",
    "low-latency",
    "throughput",
];

const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

fn profile_toml(name: &str) -> Option<&'static str> {
    Some(match name {
        "read-heavy" => include_str!("../../config/read-heavy.toml"),
        "write-heavy" => include_str!("../../config/write-heavy.toml"),
        "streaming" => include_str!("../../config/streaming.toml"),
        "low-latency" => include_str!("../../config/low-latency.toml"),
        "throughput" => include_str!("../../config/throughput.toml"),
        _ => return None,
    })
}

/// The environment variable that chooses a profile when no `--profile` flag does.
pub const PROFILE_ENV: &str = "OPMESH_PROFILE";

/// Keys whose value is a string that may look like a number (`node.id = "007"`, a
/// secret of digits). Their environment variables are read as given, not parsed into a
/// TOML value: the short forms first, then the `SECTION__KEY` forms, which win.
///
/// `POD_NAME` and `POD_NAMESPACE` are what a Kubernetes pod spec sets from the downward
/// API; only `cluster.bootstrap = "ordinal"` reads them.
const STRING_ENV: &[(&str, &str)] = &[
    ("POD_NAME", "cluster.pod"),
    ("POD_NAMESPACE", "cluster.namespace"),
    ("OPMESH_NODE_ID", "node.id"),
    ("OPMESH_HTTP_ADDR", "http.addr"),
    ("OPMESH_CLUSTER_ADDR", "cluster.addr"),
    ("OPMESH_CLUSTER_SECRET", "cluster.secret"),
    ("OPMESH_DATA_DIR", "cluster.data_dir"),
    ("OPMESH_NODE__ID", "node.id"),
    ("OPMESH_HTTP__ADDR", "http.addr"),
    ("OPMESH_HTTP__TLS_CERT", "http.tls_cert"),
    ("OPMESH_HTTP__TLS_KEY", "http.tls_key"),
    ("OPMESH_HTTP__TLS_CLIENT_CA", "http.tls_client_ca"),
    ("OPMESH_CLUSTER__ADDR", "cluster.addr"),
    ("OPMESH_CLUSTER__ADVERTISE", "cluster.advertise"),
    ("OPMESH_CLUSTER__ID", "cluster.id"),
    ("OPMESH_CLUSTER__SECRET", "cluster.secret"),
    ("OPMESH_CLUSTER__PREVIOUS_SECRET", "cluster.previous_secret"),
    ("OPMESH_CLUSTER__DATA_DIR", "cluster.data_dir"),
    ("OPMESH_CLUSTER__POD", "cluster.pod"),
    ("OPMESH_CLUSTER__NAMESPACE", "cluster.namespace"),
    ("OPMESH_CLUSTER__SERVICE", "cluster.service"),
    ("OPMESH_AUTH__TOKENS_FILE", "auth.tokens_file"),
];

/// Keys whose value is a list of strings. Their environment variables hold the items
/// comma separated (`OPMESH_JOIN=10.0.0.5:7071,10.0.0.6:7071`), each trimmed and empty
/// ones dropped, so an empty variable sets an empty list. Short form first, as above.
const LIST_ENV: &[(&str, &str)] = &[
    ("OPMESH_JOIN", "cluster.join"),
    ("OPMESH_CLUSTER__JOIN", "cluster.join"),
    ("OPMESH_CLUSTER__SERVES", "cluster.serves"),
    ("OPMESH_HANDLERS__BUILTIN", "handlers.builtin"),
];

/// The profile to apply: `--profile`, else `OPMESH_PROFILE` when set and not empty.
pub(super) fn chosen_profile(opts: &LoadOptions) -> Option<String> {
    opts.profile
        .clone()
        .or_else(|| std::env::var(PROFILE_ENV).ok().filter(|p| !p.is_empty()))
}

/// Every layer `opts`, `profile` and the environment choose, merged in order, later
/// wins. Fails on an unknown profile, a user file that cannot be read or is not TOML,
/// and a bad `OTEL_*` variable; the keys themselves are checked when the result is
/// extracted.
pub(super) fn merge(opts: &LoadOptions, profile: Option<&str>) -> Result<Figment, ConfigError> {
    let mut figment = Figment::new().merge(Layer::fixed(
        Toml::string(DEFAULT_TOML),
        "config/default.toml (built in)".into(),
    ));
    if let Some(name) = profile {
        let toml = profile_toml(name).ok_or_else(|| ConfigError::UnknownProfile {
            name: name.to_owned(),
        })?;
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
    for (flag, key, path) in [
        ("--tls-cert", "http.tls_cert", &opts.tls_cert),
        ("--tls-key", "http.tls_key", &opts.tls_key),
    ] {
        if let Some(path) = path {
            figment = figment.merge(Layer::fixed(
                Serialized::default(key, path.to_string_lossy().into_owned()),
                format!("flag `{flag}`"),
            ));
        }
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
    if opts.ephemeral {
        figment = figment.merge(Layer::fixed(
            Serialized::default("cluster.ephemeral", true),
            "flag `--ephemeral`".into(),
        ));
    }
    if opts.bootstrap_from_ordinal {
        figment = figment.merge(Layer::fixed(
            Serialized::default("cluster.bootstrap", "ordinal"),
            "flag `--bootstrap-from-ordinal`".into(),
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
    Ok(figment)
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
pub(super) struct Layer<P> {
    provider: P,
    metadata: Metadata,
}

impl<P> Layer<P> {
    /// A layer whose every key has the same origin.
    pub(super) fn fixed(provider: P, origin: String) -> Self {
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
pub(super) fn origin_of(metadata: &Metadata, path: &[String]) -> String {
    if path.is_empty() {
        metadata.name.to_string()
    } else {
        metadata.interpolate(&Profile::Default, path)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use super::*;
    use crate::config::testutil::{load_err, load_ok, profile, user_file, with_file, EnvGuard};
    use crate::config::LoadOptions;

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
            keys, 99,
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
        env.set("OPMESH_AUTH__ANONYMOUS", "true");
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
        env.set("OPMESH_AUTH__ANONYMOUS", "true");
        let c = load_ok(&LoadOptions::default());
        assert_eq!(c.node_id, "007");
        assert_eq!(c.http.addr, "[::]:7070".parse::<SocketAddr>().unwrap());
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
}
