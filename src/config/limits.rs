//! `[limits]`: how much the api takes in. Operations submitted per second in all
//! (`rate_per_sec`, `burst`) and per client (`client_rate_per_sec`, `client_burst`,
//! tracking at most `max_clients` clients), and operations in flight at most
//! (`max_in_flight`). Every limit is off at 0, the default.

use std::num::NonZeroUsize;

use serde::Deserialize;

use super::check::Check;
use super::error::ConfigError;
use crate::ratelimit::Rate;

/// The largest rate and burst accepted, per second and at once.
const MAX_RATE: u64 = 10_000_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    rate_per_sec: u64,
    burst: u64,
    client_rate_per_sec: u64,
    client_burst: u64,
    max_clients: u64,
    max_in_flight: u64,
}

/// What the api admits (`[limits]`); each limit is `None` when off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Every client together: `limits.rate_per_sec` with `limits.burst`.
    pub global: Option<Rate>,
    /// Each client alone: `limits.client_rate_per_sec` with `limits.client_burst`.
    pub per_client: Option<Rate>,
    /// Clients tracked apart at most (`limits.max_clients`); more share one allowance.
    pub max_clients: usize,
    /// Operations accepted and not finished, at most (`limits.max_in_flight`).
    pub max_in_flight: Option<NonZeroUsize>,
}

impl LimitsConfig {
    /// No limit at all: what the api does without a `[limits]` section.
    pub fn off() -> Self {
        LimitsConfig {
            global: None,
            per_client: None,
            max_clients: 100_000,
            max_in_flight: None,
        }
    }

    /// One line for `serve --check-config`.
    pub fn summary(&self) -> String {
        let rate = |r: Option<Rate>| {
            r.map_or("off".to_owned(), |r| {
                format!("{}/s, burst {}", r.per_sec, r.burst)
            })
        };
        format!(
            "rate {}; per client {} ({} clients tracked at most); in flight {}",
            rate(self.global),
            rate(self.per_client),
            self.max_clients,
            self.max_in_flight
                .map_or("off".to_owned(), |n| format!("at most {n}"))
        )
    }
}

impl RawLimits {
    pub(super) fn validate(self, check: &Check<'_>) -> Result<LimitsConfig, ConfigError> {
        let rate = |key: &str, burst_key: &str, per_sec: u64, burst: u64| {
            let per_sec = check.range(key, per_sec, 0..=MAX_RATE)?;
            let burst = check.range(burst_key, burst, 0..=MAX_RATE)?;
            // Both fit in u32: MAX_RATE is below 2^32.
            Ok::<_, ConfigError>(Rate::new(per_sec as u32, burst as u32))
        };
        Ok(LimitsConfig {
            global: rate(
                "limits.rate_per_sec",
                "limits.burst",
                self.rate_per_sec,
                self.burst,
            )?,
            per_client: rate(
                "limits.client_rate_per_sec",
                "limits.client_burst",
                self.client_rate_per_sec,
                self.client_burst,
            )?,
            max_clients: check.count("limits.max_clients", self.max_clients, 1..=10_000_000)?,
            max_in_flight: NonZeroUsize::new(check.count(
                "limits.max_in_flight",
                self.max_in_flight,
                0..=100_000_000,
            )?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testutil::{load_err, load_ok, user_file, with_file, EnvGuard};
    use crate::config::LoadOptions;

    #[test]
    fn every_limit_is_off_by_default() {
        let _env = EnvGuard::new();
        assert_eq!(load_ok(&LoadOptions::default()).limits, LimitsConfig::off());
    }

    #[test]
    fn limits_load_with_a_burst_of_one_second_unless_given() {
        let mut env = EnvGuard::new();
        let file = user_file(
            "[limits]\nrate_per_sec = 100\nburst = 10\nclient_rate_per_sec = 5\n\
             max_clients = 50\nmax_in_flight = 1000\n",
        );
        let c = load_ok(&with_file(&file)).limits;
        assert_eq!(c.global, Rate::new(100, 10));
        assert_eq!(c.per_client, Rate::new(5, 5));
        assert_eq!(c.max_clients, 50);
        assert_eq!(c.max_in_flight.map(NonZeroUsize::get), Some(1000));
        assert_eq!(
            c.summary(),
            "rate 100/s, burst 10; per client 5/s, burst 5 (50 clients tracked at most); \
             in flight at most 1000"
        );
        // Turned off from the environment, whatever the file's burst says.
        env.set("OPMESH_LIMITS__RATE_PER_SEC", "0");
        assert_eq!(load_ok(&with_file(&file)).limits.global, None);
    }

    #[test]
    fn out_of_range_limits_are_refused_naming_the_key() {
        let _env = EnvGuard::new();
        for (line, expected) in [
            (
                "rate_per_sec = 10000001",
                "`limits.rate_per_sec`: 10000001 (allowed: 0..=10000000)",
            ),
            (
                "client_burst = 10000001",
                "`limits.client_burst`: 10000001 (allowed: 0..=10000000)",
            ),
            (
                "max_clients = 0",
                "`limits.max_clients`: 0 (allowed: 1..=10000000)",
            ),
            (
                "max_in_flight = 100000001",
                "`limits.max_in_flight`: 100000001 (allowed: 0..=100000000)",
            ),
        ] {
            let file = user_file(&format!("[limits]\n{line}\n"));
            let msg = load_err(&with_file(&file)).to_string();
            assert!(msg.contains(expected), "{line}: {msg}");
        }
    }
}
