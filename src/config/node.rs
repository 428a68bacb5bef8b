//! `[node]`, `[http]` and `[shutdown]`: the node's name, its HTTP server and how long
//! it drains after a shutdown signal.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::ops::RangeInclusive;
use std::time::Duration;

use serde::Deserialize;

use super::check::{is_node_id, Check, KIB, MIB};
use super::error::ConfigError;

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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    addr: String,
    workers: u64,
    max_body_bytes: u64,
    keep_alive_secs: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShutdown {
    grace_secs: u64,
}

const WORKERS: RangeInclusive<u64> = 1..=256;

impl RawNode {
    pub(super) fn validate(self, check: &Check<'_>) -> Result<String, ConfigError> {
        if !is_node_id(&self.id) {
            return Err(check.invalid(
                "node.id",
                &self.id,
                "1 to 64 characters from A-Z a-z 0-9 _ . -",
            ));
        }
        Ok(self.id)
    }
}

impl RawHttp {
    pub(super) fn validate(self, check: &Check<'_>) -> Result<HttpConfig, ConfigError> {
        let addr: SocketAddr = self.addr.parse().map_err(|_| {
            check.invalid(
                "http.addr",
                &self.addr,
                "an IP address and port, such as 127.0.0.1:7070 or [::]:7070",
            )
        })?;
        let workers = match self.workers {
            0 => std::thread::available_parallelism().map_or(1, NonZeroUsize::get),
            n if WORKERS.contains(&n) => n as usize,
            n => return Err(check.invalid("http.workers", n, "0..=256 (0 = one per CPU core)")),
        };
        Ok(HttpConfig {
            addr,
            workers,
            max_body_bytes: check.count(
                "http.max_body_bytes",
                self.max_body_bytes,
                KIB..=256 * MIB,
            )?,
            keep_alive: check.secs("http.keep_alive_secs", self.keep_alive_secs, 0..=3600)?,
        })
    }
}

impl RawShutdown {
    /// The grace period after a shutdown signal.
    pub(super) fn validate(self, check: &Check<'_>) -> Result<Duration, ConfigError> {
        check.secs("shutdown.grace_secs", self.grace_secs, 0..=3600)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testutil::{load_err, load_ok, EnvGuard};
    use crate::config::LoadOptions;

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
}
