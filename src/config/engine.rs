//! `[engine]`, `[cache]` and `[retry]`: the engine's queue, batching, limits, result
//! cache and default retry policy, as the one [`EngineConfig`] a node is built with
//! (whose per-type settings and breaker `types` fills in), and `engine.journal`, which
//! the binary reads (see [`crate::journal`]).

use std::num::NonZeroUsize;
use std::time::Duration;

use serde::Deserialize;

use super::check::{Check, INITIAL_BACKOFF_MS, MAX_ATTEMPTS, MAX_BACKOFF_MS, MIB};
use super::error::ConfigError;
use crate::{BatchPolicy, BreakerPolicy, CacheConfig, EngineConfig, Limits, RetryPolicy};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEngine {
    queue_capacity: u64,
    batch_size: u64,
    batch_flush_ms: u64,
    max_concurrent: u64,
    shards: u64,
    shard_threads: bool,
    max_payload_bytes: u64,
    max_metadata_entries: u64,
    max_metadata_bytes: u64,
    max_key_bytes: u64,
    max_type_len: u64,
    default_deadline_ms: u64,
    max_deadline_ms: u64,
    overload_retry_after_ms: u64,
    result_retention_secs: u64,
    result_retention_max: u64,
    result_store_bytes: u64,
    max_stored_result_bytes: u64,
    journal: bool,
    type_share_percent: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    capacity: u64,
    ttl_secs: u64,
    max_bytes: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    max_attempts: u64,
    initial_backoff_ms: u64,
    max_backoff_ms: u64,
    multiplier: f64,
    jitter: f64,
}

impl RawRetry {
    pub(super) fn validate(self, check: &Check<'_>) -> Result<RetryPolicy, ConfigError> {
        Ok(RetryPolicy {
            max_attempts: check.range("retry.max_attempts", self.max_attempts, MAX_ATTEMPTS)?
                as u32,
            initial_backoff: check.millis(
                "retry.initial_backoff_ms",
                self.initial_backoff_ms,
                INITIAL_BACKOFF_MS,
            )?,
            max_backoff: {
                let max =
                    check.range("retry.max_backoff_ms", self.max_backoff_ms, MAX_BACKOFF_MS)?;
                check.backoff_order("retry", self.initial_backoff_ms, max, true)?;
                Duration::from_millis(max)
            },
            multiplier: check.range("retry.multiplier", self.multiplier, 1.0..=10.0)?,
            jitter: check.range("retry.jitter", self.jitter, 0.0..=1.0)?,
        })
    }
}

impl RawCache {
    fn validate(self, check: &Check<'_>) -> Result<CacheConfig, ConfigError> {
        Ok(CacheConfig {
            capacity: NonZeroUsize::new(check.count(
                "cache.capacity",
                self.capacity,
                1..=10_000_000,
            )?)
            .expect("range starts at 1"),
            ttl: check.secs("cache.ttl_secs", self.ttl_secs, 1..=604_800)?,
            max_bytes: check.count("cache.max_bytes", self.max_bytes, MIB..=4095 * MIB)?,
        })
    }
}

impl RawEngine {
    /// `engine.journal`: whether accepted operations are journaled (the binary's, not
    /// the engine's, so it is not part of [`EngineConfig`]).
    pub(super) fn journal(&self) -> bool {
        self.journal
    }

    /// `[cache]` is checked after the engine's limits and before its retention, the order
    /// of the fields of [`EngineConfig`]; `retry` is `[retry]`, already checked.
    pub(super) fn validate(
        self,
        check: &Check<'_>,
        cache: RawCache,
        retry: RetryPolicy,
        breaker: Option<BreakerPolicy>,
    ) -> Result<EngineConfig, ConfigError> {
        let max_type_len = check.count("engine.max_type_len", self.max_type_len, 1..=1024)?;
        Ok(EngineConfig {
            batch: BatchPolicy {
                batch_size: check.count("engine.batch_size", self.batch_size, 1..=65_536)?,
                batch_flush: check.millis(
                    "engine.batch_flush_ms",
                    self.batch_flush_ms,
                    0..=1000,
                )?,
                max_concurrent: check.count(
                    "engine.max_concurrent",
                    self.max_concurrent,
                    1..=1_000_000,
                )?,
            },
            queue_capacity: check.count(
                "engine.queue_capacity",
                self.queue_capacity,
                1..=10_000_000,
            )?,
            overload_retry_after: check.millis(
                "engine.overload_retry_after_ms",
                self.overload_retry_after_ms,
                1..=3_600_000,
            )?,
            limits: Limits {
                max_type_len,
                max_payload_bytes: check.count(
                    "engine.max_payload_bytes",
                    self.max_payload_bytes,
                    1..=64 * MIB,
                )?,
                max_metadata_entries: check.count(
                    "engine.max_metadata_entries",
                    self.max_metadata_entries,
                    0..=1024,
                )?,
                max_metadata_bytes: check.count(
                    "engine.max_metadata_bytes",
                    self.max_metadata_bytes,
                    0..=MIB,
                )?,
                max_key_len: check.count("engine.max_key_bytes", self.max_key_bytes, 1..=65_536)?,
                default_deadline: check.millis(
                    "engine.default_deadline_ms",
                    self.default_deadline_ms,
                    1..=self.max_deadline_ms.min(86_400_000),
                )?,
                max_deadline: check.millis(
                    "engine.max_deadline_ms",
                    self.max_deadline_ms,
                    1..=604_800_000,
                )?,
            },
            cache: cache.validate(check)?,
            retention: check.secs(
                "engine.result_retention_secs",
                self.result_retention_secs,
                1..=604_800,
            )?,
            shards: check.count("engine.shards", self.shards, 0..=1024)?,
            shard_threads: self.shard_threads,
            retention_max: check.count(
                "engine.result_retention_max",
                self.result_retention_max,
                1..=10_000_000,
            )?,
            result_store_bytes: check.count(
                "engine.result_store_bytes",
                self.result_store_bytes,
                MIB..=4095 * MIB,
            )?,
            max_stored_result_bytes: {
                let store = self.result_store_bytes;
                if self.max_stored_result_bytes > store {
                    return Err(check.invalid(
                        "engine.max_stored_result_bytes",
                        self.max_stored_result_bytes,
                        format!("0..={store}, at most engine.result_store_bytes"),
                    ));
                }
                self.max_stored_result_bytes as usize
            },
            retry,
            types: Default::default(),
            type_share_percent: check.range(
                "engine.type_share_percent",
                self.type_share_percent,
                1..=100,
            )? as u8,
            breaker,
            // `cluster.max_routes`: [`super::Raw::validate`] sets it.
            max_routes: EngineConfig::default().max_routes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testutil::{load_err, load_ok, user_file, with_file, EnvGuard};
    use crate::config::LoadOptions;

    #[test]
    fn defaults_agree_with_the_engine_defaults() {
        // A library user gets `EngineConfig::default()`, the binary gets default.toml:
        // the two must describe the same engine.
        let _env = EnvGuard::new();
        let c = load_ok(&LoadOptions::default());
        // Save one: the binary runs its shards on the api's workers, threads it has
        // anyway; a library user's node would start threads of its own for them, which
        // pay only for what is submitted there.
        assert!(c.engine.shard_threads && !EngineConfig::default().shard_threads);
        let engine = EngineConfig {
            shard_threads: true,
            ..EngineConfig::default()
        };
        assert_eq!(format!("{:?}", c.engine), format!("{engine:?}"));
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
    fn result_store_budgets_are_checked_against_each_other() {
        let _env = EnvGuard::new();
        let file = user_file(
            "[engine]\nresult_store_bytes = 2097152\nmax_stored_result_bytes = 2097153\n",
        );
        let msg = load_err(&with_file(&file)).to_string();
        assert!(
            msg.starts_with("invalid value for `engine.max_stored_result_bytes`: 2097153")
                && msg.contains("at most engine.result_store_bytes"),
            "{msg}"
        );
        let file = user_file("[engine]\nresult_store_bytes = 1000\n");
        let msg = load_err(&with_file(&file)).to_string();
        assert!(
            msg.contains("`engine.result_store_bytes`: 1000 (allowed: 1048576..="),
            "{msg}"
        );
    }

    #[test]
    fn with_shard_threads_the_shards_are_the_http_workers() {
        let _env = EnvGuard::new();
        let file = user_file("[engine]\nshard_threads = true\nshards = 3\n[http]\nworkers = 2\n");
        let msg = load_err(&with_file(&file)).to_string();
        assert!(
            msg.starts_with("invalid value for `engine.shards`: 3 (allowed: 0 or http.workers (2)"),
            "{msg}"
        );
        let file = user_file("[engine]\nshard_threads = true\nshards = 2\n[http]\nworkers = 2\n");
        assert_eq!(load_ok(&with_file(&file)).engine.shards, 2);
        let file = user_file("[engine]\nshard_threads = false\nshards = 3\n[http]\nworkers = 2\n");
        assert_eq!(
            load_ok(&with_file(&file)).engine.shards,
            3,
            "without shard threads any count"
        );
    }

    #[test]
    fn the_journal_needs_a_data_dir_and_lives_in_it() {
        let mut env = EnvGuard::new();
        assert_eq!(
            load_ok(&LoadOptions::default()).journal,
            None,
            "off by default"
        );

        env.set("OPMESH_ENGINE__JOURNAL", "true");
        let msg = load_err(&LoadOptions::default()).to_string();
        assert!(
            msg.starts_with("`cluster.data_dir` must be set because `engine.journal` is set")
                && msg.contains("OPMESH_ENGINE__JOURNAL")
                && msg.contains("--data-dir"),
            "{msg}"
        );

        // A single node (no cluster) with a data dir: the journal goes there.
        let opts = LoadOptions {
            data_dir: Some("/var/lib/opmesh".into()),
            ..LoadOptions::default()
        };
        let c = load_ok(&opts);
        assert!(c.cluster.is_none());
        assert_eq!(
            c.journal.map(|j| j.path),
            Some(std::path::PathBuf::from("/var/lib/opmesh/journal.redb"))
        );
        assert!(load_ok(&opts)
            .summary()
            .contains("journal: /var/lib/opmesh/journal.redb"));
    }
}
