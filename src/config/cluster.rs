//! `[cluster]`: whether this node runs alone or in a cluster and, in one, how it
//! listens, whom it joins, how it authenticates and its timings, checked into the
//! cluster crate's own [`ClusterConfig`] (its [`Secret`]s, the current one and the
//! previous one of a rotation, never show in an error, a log or `Debug` output). Two fields are known only once the node starts, and
//! [`crate::server`] fills them in: `http_addr` (the bound HTTP address) and, when
//! `serves` is empty, every type the node has a handler for.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::value::Value;
use serde::Deserialize;

use self::ordinal::PodPlace;
use super::check::{is_host_port, is_node_id, Check, GIB, KIB, MIB};
use super::error::ConfigError;
use crate::cluster::{ClusterConfig, Secret, SeedBootstrap, Voters};
use crate::op::validate_type_name;

/// What stands for the cluster secret wherever a value would be shown.
const REDACTED: &str = "<redacted>";

/// The shortest cluster secret accepted, in bytes.
const MIN_SECRET_BYTES: usize = 16;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    addr: String,
    advertise: String,
    join: Vec<String>,
    id: String,
    /// Any type: one of the wrong type is reported by `validate`, redacted, rather than
    /// by figment, whose message would quote it.
    secret: Value,
    /// As `secret`; empty = none.
    previous_secret: Value,
    data_dir: String,
    ephemeral: bool,
    serves: Vec<String>,
    heartbeat_ms: u64,
    down_after_ms: u64,
    write_timeout_ms: u64,
    leave_timeout_ms: u64,
    reply_buffer_bytes: u64,
    audit_entries: u64,
    max_routes: u64,
    election_timeout_ms: u64,
    voters: u64,
    flush_bytes: u64,
    linger_us: u64,
    max_frame_bytes: u64,
    link_buffer_bytes: u64,
    max_pending_handshakes: u64,
    lanes: u64,
    bootstrap: String,
    pod: String,
    namespace: String,
    service: String,
    domain: String,
    seed_ordinals: u64,
    bootstrap_wait_ms: u64,
}

/// Where a cluster node's identity comes from (`cluster.bootstrap`).
enum Identity {
    /// `node.id`, `cluster.advertise` and `cluster.join` as set (`"seeds"`).
    AsSet,
    /// Derived from the StatefulSet pod (`"ordinal"`, see [`ordinal`]).
    Pod(PodPlace),
}

/// `[flow]`: the watermarks of back-pressure between nodes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFlow {
    high: f64,
    low: f64,
}

impl RawFlow {
    /// (high, low), fractions of a queue's capacity with `0 <= low < high <= 1`.
    pub(super) fn validate(self, check: &Check<'_>) -> Result<(f64, f64), ConfigError> {
        let high = check.range("flow.high", self.high, 0.0..=1.0)?;
        let low = check.range("flow.low", self.low, 0.0..=1.0)?;
        if low >= high {
            return Err(check.invalid("flow.low", low, format!("0.0..{high} (below flow.high)")));
        }
        Ok((high, low))
    }
}

impl RawCluster {
    /// `cluster.max_routes`, checked whether or not the node is in a cluster.
    pub(super) fn max_routes(&self, check: &Check<'_>) -> Result<usize, ConfigError> {
        check.count("cluster.max_routes", self.max_routes, 1..=100_000)
    }

    /// `cluster.data_dir`, when set: the Raft store's place in a cluster, and the
    /// journal's on any node.
    pub(super) fn data_dir(&self) -> Option<PathBuf> {
        (!self.data_dir.is_empty()).then(|| PathBuf::from(&self.data_dir))
    }

    /// `handled`: the types this node has a handler for, which `serves` may name. In
    /// ordinal mode the returned config's `node` is the pod name, which then is the
    /// node's id everywhere.
    pub(super) fn validate(
        self,
        check: &Check<'_>,
        node_id: &str,
        http_port: u16,
        max_type_len: usize,
        handled: &[&str],
    ) -> Result<Option<ClusterConfig>, ConfigError> {
        if self.addr.is_empty() {
            if self.bootstrap == "ordinal" {
                return Err(check.missing(
                    "cluster.addr",
                    "cluster.bootstrap",
                    "a pod that takes its place in the cluster from its ordinal listens on \
                     the cluster port: set cluster.addr (or OPMESH_CLUSTER_ADDR), such as \
                     0.0.0.0:7071",
                ));
            }
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

        let identity = self.identity(check, node_id, addr)?;

        let secret = match secret_key(check, "cluster.secret", &self.secret)? {
            Some(secret) => secret,
            None => {
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
        };
        let previous_secret = secret_key(check, "cluster.previous_secret", &self.previous_secret)?;

        let advertise = if let Identity::Pod(p) = &identity {
            format!("{}:{}", p.host, addr.port())
        } else if self.advertise.is_empty() {
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
        if self.data_dir.is_empty() && !self.ephemeral {
            return Err(check.missing(
                "cluster.data_dir",
                "cluster.addr",
                "a node of a cluster keeps its Raft log and vote there (--data-dir DIR, \
                 OPMESH_DATA_DIR); a voter that restarts empty can elect a leader without a \
                 committed change. To run in memory anyway, set cluster.ephemeral = true \
                 (--ephemeral)",
            ));
        }
        let voters = usize::try_from(self.voters)
            .ok()
            .and_then(|n| Voters::try_from(n).ok())
            .ok_or_else(|| check.invalid("cluster.voters", self.voters, "1, 3 or 5"))?;

        let (node, join, bootstrap, http_addr) = match identity {
            Identity::AsSet => (
                node_id.to_owned(),
                self.join,
                SeedBootstrap::Never,
                String::new(),
            ),
            Identity::Pod(p) => {
                let bootstrap = if p.first {
                    SeedBootstrap::WhenNoSeedHasACluster {
                        wait: check.millis(
                            "cluster.bootstrap_wait_ms",
                            self.bootstrap_wait_ms,
                            0..=3_600_000,
                        )?,
                    }
                } else {
                    SeedBootstrap::Never
                };
                // Other nodes and the dashboard reach this pod's api by its DNS name; a
                // port 0 is known only once bound, and then the server fills it in.
                let http_addr = match http_port {
                    0 => String::new(),
                    port => format!("{}:{port}", p.host),
                };
                (p.node, p.seeds, bootstrap, http_addr)
            }
        };

        Ok(Some(ClusterConfig {
            node,
            cluster_id: self.id,
            secret,
            previous_secret,
            listen: addr,
            advertise,
            // Empty: the bound HTTP address, filled in when the node starts.
            http_addr,
            join,
            bootstrap,
            data_dir: (!self.data_dir.is_empty()).then(|| PathBuf::from(self.data_dir)),
            serves: self.serves.iter().map(|t| t.as_str().into()).collect(),
            heartbeat: Duration::from_millis(heartbeat_ms),
            down_after: Duration::from_millis(down_after_ms),
            write_timeout: check.millis(
                "cluster.write_timeout_ms",
                self.write_timeout_ms,
                100..=600_000,
            )?,
            leave_timeout: check.millis(
                "cluster.leave_timeout_ms",
                self.leave_timeout_ms,
                100..=600_000,
            )?,
            reply_buffer_bytes: check.count(
                "cluster.reply_buffer_bytes",
                self.reply_buffer_bytes,
                KIB..=4095 * MIB,
            )?,
            // Set from `[flow]` by the caller.
            flow_high: 0.8,
            flow_low: 0.2,
            audit_entries: check.count(
                "cluster.audit_entries",
                self.audit_entries,
                1..=1_000_000,
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
            link_buffer_bytes: check.count(
                "cluster.link_buffer_bytes",
                self.link_buffer_bytes,
                64 * KIB..=4095 * MIB,
            )?,
            reconnect_min: ClusterConfig::DEFAULT_RECONNECT_MIN,
            // A link that breaks redials within a quarter of down_after, so a peer that is
            // back (a restart, a healed partition) is linked again before the failure
            // detector could take its silence for a death.
            reconnect_max: ClusterConfig::DEFAULT_RECONNECT_MAX
                .min(Duration::from_millis(down_after_ms / 4))
                .max(ClusterConfig::DEFAULT_RECONNECT_MIN),
            handshake_timeout: ClusterConfig::DEFAULT_HANDSHAKE_TIMEOUT,
            max_pending_handshakes: check.count(
                "cluster.max_pending_handshakes",
                self.max_pending_handshakes,
                1..=4096,
            )?,
            // The api's workers, given when the node starts (src/server.rs).
            link_runtimes: Vec::new(),
            lanes: check.count(
                "cluster.lanes",
                self.lanes,
                0..=ClusterConfig::MAX_LANES as u64,
            )?,
        }))
    }
}

impl RawCluster {
    /// Checks `cluster.bootstrap` and, for `"ordinal"`, the pod's identity keys, and
    /// derives the pod's place from them.
    fn identity(
        &self,
        check: &Check<'_>,
        node_id: &str,
        addr: SocketAddr,
    ) -> Result<Identity, ConfigError> {
        match self.bootstrap.as_str() {
            "seeds" => return Ok(Identity::AsSet),
            "ordinal" => {}
            other => {
                return Err(check.invalid(
                    "cluster.bootstrap",
                    other,
                    "\"seeds\" (join cluster.join, or bootstrap when it is empty) or \
                     \"ordinal\" (a StatefulSet pod: everything from POD_NAME)",
                ))
            }
        }
        for (key, set) in [
            ("cluster.join", !self.join.is_empty()),
            ("cluster.advertise", !self.advertise.is_empty()),
        ] {
            if set {
                return Err(check.invalid(
                    key,
                    if key == "cluster.join" {
                        self.join.join(",")
                    } else {
                        self.advertise.clone()
                    },
                    "empty when cluster.bootstrap = \"ordinal\", which derives it from \
                     the pod's name",
                ));
            }
        }
        if self.pod.is_empty() {
            return Err(check.missing(
                "cluster.pod",
                "cluster.bootstrap",
                "set POD_NAME from the downward API (fieldRef metadata.name), or \
                 OPMESH_CLUSTER__POD",
            ));
        }
        if !is_node_id(&self.pod) || ordinal::split_pod_name(&self.pod).is_none() {
            return Err(check.invalid(
                "cluster.pod",
                &self.pod,
                "a StatefulSet pod name, <set>-<ordinal> such as opmesh-0, at most 64 \
                 characters from a-z 0-9 . -",
            ));
        }
        let from_file = check
            .figment
            .find_metadata("node.id")
            .is_some_and(|md| md.name.starts_with("config/default.toml"));
        if !from_file && node_id != self.pod {
            return Err(check.invalid(
                "node.id",
                node_id,
                format!(
                    "unset, or the pod name ({}): with cluster.bootstrap = \"ordinal\" the \
                     node id is the pod name",
                    self.pod
                ),
            ));
        }
        if self.namespace.is_empty() {
            return Err(check.missing(
                "cluster.namespace",
                "cluster.bootstrap",
                "set POD_NAMESPACE from the downward API (fieldRef metadata.namespace), \
                 or OPMESH_CLUSTER__NAMESPACE",
            ));
        }
        for (key, value) in [
            ("cluster.namespace", &self.namespace),
            ("cluster.service", &self.service),
        ] {
            if !is_dns_label(value) {
                return Err(check.invalid(
                    key,
                    value,
                    "a DNS label: 1 to 63 characters from a-z 0-9 -, starting and ending \
                     with a letter or digit",
                ));
            }
        }
        if !self.domain.split('.').all(is_dns_label) {
            return Err(check.invalid(
                "cluster.domain",
                &self.domain,
                "the cluster's DNS domain, such as cluster.local",
            ));
        }
        let seed_ordinals = check.range("cluster.seed_ordinals", self.seed_ordinals, 1..=64)?;
        let place = ordinal::place(
            &self.pod,
            &self.service,
            &self.namespace,
            &self.domain,
            addr.port(),
            seed_ordinals as u32,
        )
        .expect("the pod name was checked");
        if addr.port() == 0 {
            return Err(check.invalid(
                "cluster.addr",
                addr,
                "a fixed port when cluster.bootstrap = \"ordinal\": the other pods dial it",
            ));
        }
        if place.host.len() > 253 {
            return Err(check.invalid(
                "cluster.pod",
                &self.pod,
                format!(
                    "a name that keeps the pod's DNS name ({}) within 253 characters",
                    place.host
                ),
            ));
        }
        Ok(Identity::Pod(place))
    }
}

/// A secret key's value: `None` when empty, else a string of at least
/// [`MIN_SECRET_BYTES`]. An error shows it redacted, whatever its type.
fn secret_key(check: &Check<'_>, key: &str, value: &Value) -> Result<Option<Secret>, ConfigError> {
    match value {
        Value::String(_, s) if s.is_empty() => Ok(None),
        Value::String(_, s) if s.len() >= MIN_SECRET_BYTES => Ok(Some(Secret::from(s.clone()))),
        Value::String(_, s) => Err(check.invalid(
            key,
            REDACTED,
            format!(
                "at least {MIN_SECRET_BYTES} bytes; this one has {}",
                s.len()
            ),
        )),
        _ => Err(check.invalid(
            key,
            REDACTED,
            format!("a string of at least {MIN_SECRET_BYTES} bytes"),
        )),
    }
}

/// A Kubernetes DNS label (RFC 1123): what a namespace or a Service may be named.
fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

mod ordinal;
#[cfg(test)]
mod tests;
