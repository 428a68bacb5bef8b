//! `[cluster]`: whether this node runs alone or in a cluster and, in one, how it
//! listens, whom it joins, how it authenticates and its timings, checked into the
//! cluster crate's own [`ClusterConfig`] (its [`Secret`] never shows in an error, a log
//! or `Debug` output). Two fields are known only once the node starts, and
//! [`crate::server`] fills them in: `http_addr` (the bound HTTP address) and, when
//! `serves` is empty, every type the node has a handler for.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use figment::value::Value;
use serde::Deserialize;

use super::check::{is_host_port, is_node_id, Check, GIB, KIB, MIB};
use super::error::ConfigError;
use crate::cluster::{ClusterConfig, Secret, Voters};
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

impl RawCluster {
    /// `handled`: the types this node has a handler for, which `serves` may name.
    pub(super) fn validate(
        self,
        check: &Check<'_>,
        node_id: &str,
        max_type_len: usize,
        handled: &[&str],
    ) -> Result<Option<ClusterConfig>, ConfigError> {
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
        let voters = usize::try_from(self.voters)
            .ok()
            .and_then(|n| Voters::try_from(n).ok())
            .ok_or_else(|| check.invalid("cluster.voters", self.voters, "1, 3 or 5"))?;

        Ok(Some(ClusterConfig {
            node: node_id.to_owned(),
            cluster_id: self.id,
            secret,
            listen: addr,
            advertise,
            // The bound HTTP address, filled in when the node starts.
            http_addr: String::new(),
            join: self.join,
            data_dir: (!self.data_dir.is_empty()).then(|| PathBuf::from(self.data_dir)),
            serves: self.serves.iter().map(|t| t.as_str().into()).collect(),
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
            reconnect_min: ClusterConfig::DEFAULT_RECONNECT_MIN,
            reconnect_max: ClusterConfig::DEFAULT_RECONNECT_MAX,
            handshake_timeout: ClusterConfig::DEFAULT_HANDSHAKE_TIMEOUT,
        }))
    }
}

#[cfg(test)]
mod tests;
