//! [`Check`], which holds a value against its range and, when it is out, makes the
//! [`ConfigError::Invalid`] that names the key, the value, what is allowed and where it
//! was set; and the shape checks the sections share (node ids, `host:port`, URLs).

use std::fmt::Debug;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use figment::Figment;

use super::error::ConfigError;
use super::layers::origin_of;

pub(super) const KIB: u64 = 1 << 10;
pub(super) const MIB: u64 = 1 << 20;
pub(super) const GIB: u64 = 1 << 30;

// `[retry]` and every `[[handlers.http]]` entry take the same ranges.
pub(super) const MAX_ATTEMPTS: RangeInclusive<u64> = 1..=100;
pub(super) const INITIAL_BACKOFF_MS: RangeInclusive<u64> = 0..=60_000;
pub(super) const MAX_BACKOFF_MS: RangeInclusive<u64> = 0..=3_600_000;

/// Checks values against their ranges and names where a bad one was set.
pub(super) struct Check<'a> {
    pub(super) figment: &'a Figment,
}

impl Check<'_> {
    pub(super) fn invalid(
        &self,
        key: &str,
        value: impl Debug,
        allowed: impl Into<String>,
    ) -> ConfigError {
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

    /// The file `key` names cannot be used; `error` says why and names the file.
    pub(super) fn file(&self, key: &str, error: impl std::fmt::Display) -> ConfigError {
        ConfigError::File {
            key: key.to_owned(),
            error: error.to_string(),
            origin: self.origin(key),
        }
    }

    /// `key` must be set because `needed_by` is.
    pub(super) fn missing(
        &self,
        key: &str,
        needed_by: &str,
        hint: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Missing {
            key: key.to_owned(),
            needed_by: needed_by.to_owned(),
            origin: self.origin(needed_by),
            hint: hint.into(),
        }
    }

    pub(super) fn range<T: PartialOrd + Debug + Copy>(
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

    pub(super) fn count(
        &self,
        key: &str,
        value: u64,
        range: RangeInclusive<u64>,
    ) -> Result<usize, ConfigError> {
        let value = self.range(key, value, range)?;
        // Every range here ends below 2^32, so this holds on any target.
        Ok(usize::try_from(value).expect("checked range fits in usize"))
    }

    pub(super) fn millis(
        &self,
        key: &str,
        value: u64,
        range: RangeInclusive<u64>,
    ) -> Result<Duration, ConfigError> {
        self.range(key, value, range).map(Duration::from_millis)
    }

    pub(super) fn secs(
        &self,
        key: &str,
        value: u64,
        range: RangeInclusive<u64>,
    ) -> Result<Duration, ConfigError> {
        self.range(key, value, range).map(Duration::from_secs)
    }

    /// `max_backoff >= initial_backoff`, reported on whichever of the two `prefix`
    /// set itself (`max_key_set`), so the message points at a key the user wrote.
    pub(super) fn backoff_order(
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

pub(super) fn is_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// An API token's name, as the audit trail and logs show it.
pub fn is_token_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'@'))
}

/// `host:port` another node can dial: an IP address and port (`10.0.0.5:7071`,
/// `[fd00::5]:7071`) or a DNS name and port (`opmesh-0.opmesh:7071`). Port 0 is not one.
pub(super) fn is_host_port(s: &str) -> bool {
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

pub(super) fn is_http_url(url: &str) -> bool {
    let rest = ["http://", "https://"].iter().find_map(|scheme| {
        url.get(..scheme.len())
            .filter(|s| s.eq_ignore_ascii_case(scheme))
            .map(|_| &url[scheme.len()..])
    });
    matches!(rest, Some(r) if !r.is_empty()
        && !r.starts_with('/')
        && !r.chars().any(|c| c.is_whitespace() || c.is_control()))
}

#[cfg(test)]
mod tests {
    use crate::config::testutil::{load_err, user_file, with_file, EnvGuard};
    use crate::config::{ConfigError, LoadOptions};

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
    fn flow_watermarks_are_fractions_with_low_below_high() {
        let _env = EnvGuard::new();
        let file = user_file("[flow]\nhigh = 1.5\n");
        let msg = load_err(&with_file(&file)).to_string();
        assert!(
            msg.contains("`flow.high`: 1.5 (allowed: 0.0..=1.0)"),
            "{msg}"
        );
        let file = user_file("[flow]\nhigh = 0.5\nlow = 0.5\n");
        let msg = load_err(&with_file(&file)).to_string();
        assert!(
            msg.contains("`flow.low`: 0.5 (allowed: 0.0..0.5 (below flow.high))"),
            "{msg}"
        );
    }

    #[test]
    fn links_redial_within_a_quarter_of_down_after() {
        let _env = EnvGuard::new();
        let cluster = |extra: &str| {
            let file = user_file(&format!(
                "[cluster]\naddr = \"127.0.0.1:0\"\nsecret = \"a-test-secret-of-enough-length\"\n\
                 ephemeral = true\n{extra}"
            ));
            crate::config::testutil::load_ok(&with_file(&file))
                .cluster
                .expect("a cluster node")
        };
        let c = cluster("");
        assert_eq!(c.reconnect_max, c.down_after / 4);
        let c = cluster("down_after_ms = 400\nheartbeat_ms = 100\n");
        assert_eq!(c.reconnect_max, std::time::Duration::from_millis(100));
        let c = cluster("down_after_ms = 60000\nheartbeat_ms = 1000\n");
        assert_eq!(
            c.reconnect_max,
            std::time::Duration::from_secs(1),
            "at most the default"
        );
    }
}
