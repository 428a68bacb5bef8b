//! `[node]`, `[http]` and `[shutdown]`: the node's name, its HTTP server (with TLS when
//! `tls_cert` and `tls_key` are set) and how long it drains after a shutdown signal.
//!
//! The TLS files are read here, not only when the server starts: a file that is
//! missing or does not parse fails `serve --check-config` too, naming the key and the
//! file.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::check::{is_node_id, Check, KIB, MIB};
use super::error::ConfigError;
use crate::tls::{self, TlsConfig, TlsError};

/// HTTP server settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpConfig {
    pub addr: SocketAddr,
    /// Worker threads, at least 1 (`workers = 0` resolved to the number of CPU cores).
    pub workers: usize,
    pub max_body_bytes: usize,
    /// Most operations one batch request may carry (`http.max_batch_ops`).
    pub max_batch_ops: usize,
    /// Idle keep-alive connections close after this; zero closes after each response.
    pub keep_alive: Duration,
    /// `None`: plain HTTP. Otherwise https with these files, reloaded when they change.
    pub tls: Option<TlsConfig>,
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
    max_batch_ops: u64,
    keep_alive_secs: u64,
    tls_cert: String,
    tls_key: String,
    tls_client_ca: String,
    tls_reload_secs: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShutdown {
    grace_secs: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEvents {
    max_subscribers: u64,
}

impl RawEvents {
    /// Event streams (`GET /v1/events`) open at once at most.
    pub(super) fn validate(self, check: &Check<'_>) -> Result<usize, ConfigError> {
        check.count("events.max_subscribers", self.max_subscribers, 1..=65_536)
    }
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
            max_batch_ops: check.count("http.max_batch_ops", self.max_batch_ops, 1..=1_000_000)?,
            keep_alive: check.secs("http.keep_alive_secs", self.keep_alive_secs, 0..=3600)?,
            tls: self.tls(check)?,
        })
    }

    /// `tls_cert` and `tls_key` both set (https) or both empty (http); `tls_client_ca`
    /// only with them. Every file named must hold what its key needs.
    fn tls(&self, check: &Check<'_>) -> Result<Option<TlsConfig>, ConfigError> {
        let reload_every = check.secs("http.tls_reload_secs", self.tls_reload_secs, 1..=3600)?;
        let path = |s: &str| (!s.is_empty()).then(|| PathBuf::from(s));
        let (cert, key) = match (path(&self.tls_cert), path(&self.tls_key)) {
            (None, None) if self.tls_client_ca.is_empty() => return Ok(None),
            (None, None) => {
                return Err(check.missing(
                    "http.tls_cert",
                    "http.tls_client_ca",
                    "client certificates need TLS: set http.tls_cert and http.tls_key",
                ))
            }
            (Some(_), None) => {
                return Err(check.missing(
                    "http.tls_key",
                    "http.tls_cert",
                    "the PEM private key of the certificate (--tls-key, OPMESH_HTTP__TLS_KEY)",
                ))
            }
            (None, Some(_)) => {
                return Err(check.missing(
                    "http.tls_cert",
                    "http.tls_key",
                    "the PEM certificate chain of the key (--tls-cert, OPMESH_HTTP__TLS_CERT)",
                ))
            }
            (Some(c), Some(k)) => (c, k),
        };
        if let Err(e) = tls::load_pair(&cert, &key) {
            let which = match &e {
                TlsError::NoKey { .. } | TlsError::Key { .. } => "http.tls_key",
                // The certificate is read first: a path that is both is the cert's.
                e if e.path() == cert => "http.tls_cert",
                _ => "http.tls_key",
            };
            return Err(check.file(which, e));
        }
        let client_ca = path(&self.tls_client_ca);
        if let Some(ca) = &client_ca {
            tls::read_ca_file(ca).map_err(|e| check.file("http.tls_client_ca", e))?;
        }
        Ok(Some(TlsConfig {
            cert,
            key,
            client_ca,
            reload_every,
        }))
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

    mod tls {
        use std::path::Path;
        use std::time::Duration;

        use crate::config::testutil::{load_err, load_ok, user_file, with_file, EnvGuard};
        use crate::config::{ConfigError, LoadOptions};
        use crate::tls::testutil::{write, Ca};

        fn flags(cert: &Path, key: &Path) -> LoadOptions {
            LoadOptions {
                tls_cert: Some(cert.to_owned()),
                tls_key: Some(key.to_owned()),
                ..LoadOptions::default()
            }
        }

        #[test]
        fn a_cert_and_its_key_turn_tls_on_from_flags_or_environment() {
            let mut env = EnvGuard::new();
            assert_eq!(load_ok(&LoadOptions::default()).http.tls, None);

            let dir = tempfile::tempdir().unwrap();
            let ca = Ca::new("test ca");
            let (cert, key) = ca.leaf("node");
            let cert = write(dir.path(), "tls.crt", &cert);
            let key = write(dir.path(), "tls.key", &key);
            let tls = load_ok(&flags(&cert, &key)).http.tls.expect("tls on");
            assert_eq!((tls.cert, tls.key), (cert.clone(), key.clone()));
            assert_eq!(tls.client_ca, None);
            assert_eq!(tls.reload_every, Duration::from_secs(5));

            let ca_file = write(dir.path(), "ca.pem", &ca.cert.pem());
            env.set("OPMESH_HTTP__TLS_CERT", cert.to_str().unwrap());
            env.set("OPMESH_HTTP__TLS_KEY", key.to_str().unwrap());
            env.set("OPMESH_HTTP__TLS_CLIENT_CA", ca_file.to_str().unwrap());
            env.set("OPMESH_HTTP__TLS_RELOAD_SECS", "1");
            let tls = load_ok(&LoadOptions::default()).http.tls.expect("tls on");
            assert_eq!(tls.client_ca, Some(ca_file));
            assert_eq!(tls.reload_every, Duration::from_secs(1));
        }

        #[test]
        fn cert_and_key_go_together_and_the_client_ca_needs_them() {
            let _env = EnvGuard::new();
            let file = user_file("[http]\ntls_cert = \"/etc/opmesh/tls/tls.crt\"\n");
            let err = load_err(&with_file(&file));
            assert!(
                matches!(err, ConfigError::Missing { ref key, ref needed_by, .. }
                    if key == "http.tls_key" && needed_by == "http.tls_cert"),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains("in config file `"), "{msg}");

            let msg = load_err(&LoadOptions {
                tls_key: Some("/k.pem".into()),
                ..LoadOptions::default()
            })
            .to_string();
            assert!(
                msg.starts_with(
                    "`http.tls_cert` must be set because `http.tls_key` is set in flag `--tls-key`"
                ),
                "{msg}"
            );

            let file = user_file("[http]\ntls_client_ca = \"/ca.pem\"\n");
            let msg = load_err(&with_file(&file)).to_string();
            assert!(
                msg.starts_with("`http.tls_cert` must be set because `http.tls_client_ca` is set"),
                "{msg}"
            );
        }

        #[test]
        fn files_that_are_missing_or_do_not_fit_are_named_with_their_key() {
            let _env = EnvGuard::new();
            let dir = tempfile::tempdir().unwrap();
            let ca = Ca::new("test ca");
            let (cert, key) = ca.leaf("node");
            let cert = write(dir.path(), "tls.crt", &cert);
            let key = write(dir.path(), "tls.key", &key);

            let absent = dir.path().join("absent.crt");
            let msg = load_err(&flags(&absent, &key)).to_string();
            assert!(
                msg.starts_with(
                    "invalid value for `http.tls_cert` in flag `--tls-cert`: cannot read `"
                ),
                "{msg}"
            );
            assert!(msg.contains(&absent.display().to_string()), "{msg}");

            let (_, other_key) = ca.leaf("other");
            let other = write(dir.path(), "other.key", &other_key);
            let msg = load_err(&flags(&cert, &other)).to_string();
            assert!(msg.starts_with("invalid value for `http.tls_key`"), "{msg}");
            assert!(msg.contains("other.key"), "{msg}");

            let msg = load_err(&flags(&cert, &cert)).to_string();
            assert!(msg.starts_with("invalid value for `http.tls_key`"), "{msg}");
            assert!(msg.contains("holds no PEM private key"), "{msg}");

            let not_ca = write(dir.path(), "not-ca.pem", "hello\n");
            let file = user_file(&format!(
                "[http]\ntls_cert = {:?}\ntls_key = {:?}\ntls_client_ca = {:?}\n",
                cert, key, not_ca
            ));
            let msg = load_err(&with_file(&file)).to_string();
            assert!(
                msg.starts_with("invalid value for `http.tls_client_ca` in config file"),
                "{msg}"
            );
            assert!(
                msg.contains("not-ca.pem` holds no PEM certificate"),
                "{msg}"
            );
        }

        #[test]
        fn the_reload_interval_is_checked_even_without_tls() {
            let mut env = EnvGuard::new();
            env.set("OPMESH_HTTP__TLS_RELOAD_SECS", "0");
            let msg = load_err(&LoadOptions::default()).to_string();
            assert_eq!(
                msg,
                "invalid value for `http.tls_reload_secs`: 0 (allowed: 1..=3600) in \
                 environment variable `OPMESH_HTTP__TLS_RELOAD_SECS`"
            );
        }
    }
}
