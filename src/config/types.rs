//! `[breaker]` and `[types.<type>]`: the circuit breaker every operation type gets, and
//! each type's own settings (its running slots, queue, deadline cap, rate limit and
//! breaker), checked into [`EngineConfig::breaker`] and [`EngineConfig::types`]. What
//! they mean on the hot path lives in the engine (`opmesh_actors::type_limits`).
//!
//! Webhook types (`[[handlers.http]]`) that POST to one target share one breaker, named
//! after the target's URL as errors show it (no credentials): when it is down, every
//! type that calls it learns at once. Such types must then not ask for different
//! breakers.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::Duration;

use serde::Deserialize;

use super::check::Check;
use super::error::ConfigError;
use crate::handlers::{redact_url, HttpTarget};
use crate::op::validate_type_name;
use crate::{BreakerPolicy, BreakerSetting, EngineConfig, RateLimit, TypeSettings};

/// `[breaker]`, as written.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreaker {
    failures: u64,
    window_secs: u64,
    open_secs: u64,
    half_open_calls: u64,
}

/// A `[types.<type>.breaker]` table: each key falls back to `[breaker]`'s.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreakerOverride {
    failures: Option<u64>,
    window_secs: Option<u64>,
    open_secs: Option<u64>,
    half_open_calls: Option<u64>,
}

/// A `[types.<type>]` table, as written: every key optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawType {
    max_concurrent: Option<u64>,
    queue_capacity: Option<u64>,
    max_deadline_ms: Option<u64>,
    rate_per_sec: Option<u64>,
    burst: Option<u64>,
    breaker: Option<RawBreakerOverride>,
}

const FAILURES: std::ops::RangeInclusive<u64> = 0..=1_000_000;
const WINDOW_SECS: std::ops::RangeInclusive<u64> = 1..=86_400;
const OPEN_SECS: std::ops::RangeInclusive<u64> = 1..=86_400;
const HALF_OPEN_CALLS: std::ops::RangeInclusive<u64> = 1..=1_000;
const RATE: std::ops::RangeInclusive<u64> = 1..=1_000_000;

impl RawBreaker {
    /// The node's breaker: `None` when `failures = 0`.
    pub(super) fn validate(self, check: &Check<'_>) -> Result<Option<BreakerPolicy>, ConfigError> {
        policy(
            check,
            "breaker",
            self.failures,
            self.window_secs,
            self.open_secs,
            self.half_open_calls,
        )
    }
}

/// A breaker's keys checked (under `prefix`): `None` when `failures` is 0.
fn policy(
    check: &Check<'_>,
    prefix: &str,
    failures: u64,
    window_secs: u64,
    open_secs: u64,
    half_open_calls: u64,
) -> Result<Option<BreakerPolicy>, ConfigError> {
    let key = |k: &str| format!("{prefix}.{k}");
    let failures = check.range(&key("failures"), failures, FAILURES)?;
    let window = check.secs(&key("window_secs"), window_secs, WINDOW_SECS)?;
    let open_for = check.secs(&key("open_secs"), open_secs, OPEN_SECS)?;
    let calls = check.range(&key("half_open_calls"), half_open_calls, HALF_OPEN_CALLS)?;
    Ok((failures > 0).then_some(BreakerPolicy {
        failures: failures as u32,
        window,
        open_for,
        half_open_calls: calls as u32,
    }))
}

/// Checks `[types.*]` against the engine settings already checked (`engine`, whose
/// `breaker` is `[breaker]`'s) and fills in `engine.types`. `handled` are the types
/// this node has a handler for; `http` its webhook targets, whose types share a breaker
/// per target.
pub(super) fn validate(
    check: &Check<'_>,
    raw: BTreeMap<String, RawType>,
    defaults: &RawBreaker,
    engine: &mut EngineConfig,
    handled: &[&str],
    http: &[HttpTarget],
) -> Result<(), ConfigError> {
    let max_concurrent = engine.batch.max_concurrent;
    let node_deadline = engine.limits.max_deadline.as_millis() as u64;
    let mut types = BTreeMap::new();
    let mut own_total = 0usize;
    for (name, t) in raw {
        let key = |k: &str| format!("types.{name}.{k}");
        if validate_type_name(&name, engine.limits.max_type_len).is_err() {
            return Err(check.invalid(
                &format!("types.{name}"),
                &name,
                format!(
                    "a table named after an operation type: 1 to engine.max_type_len ({}) \
                     characters from A-Z a-z 0-9 _ - . : / (quote a name with . : or /)",
                    engine.limits.max_type_len
                ),
            ));
        }
        let own = match t.max_concurrent {
            Some(n) => {
                let n = check.count(&key("max_concurrent"), n, 1..=max_concurrent as u64)?;
                own_total += n;
                if own_total > max_concurrent {
                    return Err(check.invalid(
                        &key("max_concurrent"),
                        n,
                        format!(
                            "1..={}: the types' own max_concurrent add up to {own_total}, \
                             over engine.max_concurrent ({max_concurrent})",
                            n - (own_total - max_concurrent)
                        ),
                    ));
                }
                Some(n)
            }
            None => None,
        };
        let queue_capacity = t
            .queue_capacity
            .map(|n| check.count(&key("queue_capacity"), n, 1..=10_000_000))
            .transpose()?;
        let max_deadline = t
            .max_deadline_ms
            .map(|ms| {
                check
                    .range(&key("max_deadline_ms"), ms, 1..=node_deadline)
                    .map_err(|_| {
                        check.invalid(
                            &key("max_deadline_ms"),
                            ms,
                            format!("1..={node_deadline}, at most engine.max_deadline_ms"),
                        )
                    })
            })
            .transpose()?
            .map(Duration::from_millis);
        let rate = match (t.rate_per_sec, t.burst) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(check.missing(
                    &key("rate_per_sec"),
                    &key("burst"),
                    "a burst is of a rate limit: set rate_per_sec too",
                ))
            }
            (Some(r), burst) => {
                let per_sec = check.range(&key("rate_per_sec"), r, RATE)?;
                // One second's worth at once unless told otherwise.
                let burst = check.range(&key("burst"), burst.unwrap_or(per_sec), RATE)?;
                Some(RateLimit {
                    per_sec: NonZeroU32::new(per_sec as u32).expect("range starts at 1"),
                    burst: NonZeroU32::new(burst as u32).expect("range starts at 1"),
                })
            }
        };
        let breaker = match t.breaker {
            None => BreakerSetting::Inherit,
            Some(b) => match policy(
                check,
                &format!("types.{name}.breaker"),
                b.failures.unwrap_or(defaults.failures),
                b.window_secs.unwrap_or(defaults.window_secs),
                b.open_secs.unwrap_or(defaults.open_secs),
                b.half_open_calls.unwrap_or(defaults.half_open_calls),
            )? {
                Some(p) => BreakerSetting::Enabled(p),
                None => BreakerSetting::Disabled,
            },
        };
        types.insert(
            name,
            TypeSettings {
                max_concurrent: own,
                queue_capacity,
                max_deadline,
                rate,
                breaker,
                breaker_group: None,
            },
        );
    }
    // Every type this node runs needs slots: its own, or some shared ones left.
    if own_total == max_concurrent {
        if let Some(t) = handled.iter().find(|t| {
            types
                .get(**t)
                .is_none_or(|s: &TypeSettings| s.max_concurrent.is_none())
        }) {
            return Err(check.invalid(
                "engine.max_concurrent",
                max_concurrent,
                format!(
                    "more than the types' own max_concurrent ({own_total}): `{t}` has no \
                     types.{t}.max_concurrent and would never run"
                ),
            ));
        }
    }
    // Webhook types share a breaker per target.
    let mut first_of_target: Vec<(String, &str)> = Vec::new();
    for h in http {
        let target = redact_url(&h.url);
        let policy_of = |t: &str| match types.get(t).map(|s: &TypeSettings| &s.breaker) {
            None | Some(BreakerSetting::Inherit) => engine.breaker.clone(),
            Some(BreakerSetting::Disabled) => None,
            Some(BreakerSetting::Enabled(p)) => Some(p.clone()),
        };
        if let Some((_, first)) = first_of_target.iter().find(|(u, _)| *u == target) {
            if policy_of(first) != policy_of(&h.op_type) {
                return Err(check.invalid(
                    &format!("types.{}.breaker", h.op_type),
                    policy_of(&h.op_type),
                    format!(
                        "the same breaker as types.{first}.breaker: both POST to {target}, \
                         whose breaker they share"
                    ),
                ));
            }
        } else {
            first_of_target.push((target.clone(), &h.op_type));
        }
        types.entry(h.op_type.clone()).or_default().breaker_group = Some(target);
    }
    engine.types = types;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::config::testutil::{load_err, load_ok, user_file, with_file, EnvGuard};
    use crate::config::LoadOptions;
    use crate::{BreakerPolicy, BreakerSetting};

    #[test]
    fn types_load_with_their_own_settings_and_the_breaker_defaults() {
        let mut env = EnvGuard::new();
        let file = user_file(
            r#"
            [breaker]
            window_secs = 120

            [types.sleep]
            max_concurrent = 100
            queue_capacity = 1000
            max_deadline_ms = 60000
            rate_per_sec = 50
            burst = 10

            [types.sleep.breaker]
            failures = 3
            open_secs = 1

            [types.echo]
            rate_per_sec = 7

            [types.resize.breaker]
            failures = 0
            "#,
        );
        let c = load_ok(&with_file(&file));
        let e = &c.engine;
        let node = BreakerPolicy {
            failures: 5,
            window: Duration::from_secs(120),
            open_for: Duration::from_secs(30),
            half_open_calls: 3,
        };
        assert_eq!(e.breaker, Some(node.clone()));
        let sleep = &e.types["sleep"];
        assert_eq!(sleep.max_concurrent, Some(100));
        assert_eq!(sleep.queue_capacity, Some(1000));
        assert_eq!(sleep.max_deadline, Some(Duration::from_secs(60)));
        let rate = sleep.rate.unwrap();
        assert_eq!((rate.per_sec.get(), rate.burst.get()), (50, 10));
        assert_eq!(
            sleep.breaker,
            BreakerSetting::Enabled(BreakerPolicy {
                failures: 3,
                open_for: Duration::from_secs(1),
                ..node
            }),
            "its keys over [breaker]'s, one by one"
        );
        let echo = &e.types["echo"];
        assert_eq!(echo.rate.unwrap().burst.get(), 7, "a second's worth");
        assert_eq!(echo.breaker, BreakerSetting::Inherit);
        assert_eq!(echo.max_concurrent, None);
        assert_eq!(e.types["resize"].breaker, BreakerSetting::Disabled);
        assert_eq!(e.type_share_percent, 50);

        // The environment too, for a type name a variable can spell.
        drop(env);
        env = EnvGuard::new();
        env.set("OPMESH_TYPES__SLEEP__MAX_CONCURRENT", "9");
        env.set("OPMESH_BREAKER__FAILURES", "0");
        let c = load_ok(&LoadOptions::default());
        assert_eq!(c.engine.types["sleep"].max_concurrent, Some(9));
        assert_eq!(c.engine.breaker, None);
        drop(env);
    }

    #[test]
    fn bad_type_settings_name_the_key_and_the_range() {
        let _env = EnvGuard::new();
        for (toml, expected) in [
            (
                "[types.sleep]\nmax_concurrent = 0\n",
                "`types.sleep.max_concurrent`: 0 (allowed: 1..=16384)",
            ),
            (
                "[types.sleep]\nqueue_capacity = 0\n",
                "`types.sleep.queue_capacity`: 0 (allowed: 1..=10000000)",
            ),
            (
                "[types.sleep]\nmax_deadline_ms = 3600001\n",
                "`types.sleep.max_deadline_ms`: 3600001 (allowed: 1..=3600000, at most \
                 engine.max_deadline_ms)",
            ),
            (
                "[types.sleep]\nrate_per_sec = 0\n",
                "`types.sleep.rate_per_sec`: 0 (allowed: 1..=1000000)",
            ),
            (
                "[types.sleep]\nrate_per_sec = 5\nburst = 0\n",
                "`types.sleep.burst`: 0 (allowed: 1..=1000000)",
            ),
            (
                "[types.sleep]\nburst = 5\n",
                "`types.sleep.rate_per_sec` must be set because `types.sleep.burst` is set",
            ),
            (
                "[types.sleep.breaker]\nopen_secs = 0\n",
                "`types.sleep.breaker.open_secs`: 0 (allowed: 1..=86400)",
            ),
            (
                "[types.sleep.breaker]\nhalf_open_calls = 0\n",
                "`types.sleep.breaker.half_open_calls`: 0 (allowed: 1..=1000)",
            ),
            (
                "[breaker]\nwindow_secs = 0\n",
                "`breaker.window_secs`: 0 (allowed: 1..=86400)",
            ),
            (
                "[types.\"bad type\"]\nmax_concurrent = 1\n",
                "`types.bad type`: \"bad type\" (allowed: a table named after an operation type",
            ),
            (
                "[engine]\nmax_concurrent = 10\n[types.a]\nmax_concurrent = 6\n\
                 [types.b]\nmax_concurrent = 5\n",
                "`types.b.max_concurrent`: 5 (allowed: 1..=4: the types' own max_concurrent \
                 add up to 11, over engine.max_concurrent (10))",
            ),
            (
                "[engine]\nmax_concurrent = 10\n[types.sleep]\nmax_concurrent = 10\n",
                "`engine.max_concurrent`: 10 (allowed: more than the types' own \
                 max_concurrent (10): `echo` has no types.echo.max_concurrent",
            ),
            (
                "[engine]\ntype_share_percent = 0\n",
                "`engine.type_share_percent`: 0 (allowed: 1..=100)",
            ),
        ] {
            let file = user_file(toml);
            let msg = load_err(&with_file(&file)).to_string();
            assert!(msg.contains(expected), "{toml}\n{msg}");
        }
    }

    #[test]
    fn unknown_keys_in_a_type_table_are_errors() {
        let _env = EnvGuard::new();
        let file = user_file("[types.sleep]\nmax_concurency = 3\n");
        let msg = load_err(&with_file(&file)).to_string();
        assert!(
            msg.starts_with("unknown key `types.sleep.max_concurency`"),
            "{msg}"
        );
        let file = user_file("[types.sleep.breaker]\nthreshold = 3\n");
        let msg = load_err(&with_file(&file)).to_string();
        assert!(
            msg.starts_with("unknown key `types.sleep.breaker.threshold`"),
            "{msg}"
        );
    }

    #[test]
    fn webhook_types_of_one_target_share_a_breaker() {
        let _env = EnvGuard::new();
        let hooks = r#"
            [[handlers.http]]
            type = "a"
            url = "http://user:pw@127.0.0.1:9/hook?token=s"
            timeout_ms = 100

            [[handlers.http]]
            type = "b"
            url = "http://127.0.0.1:9/hook"
            timeout_ms = 100

            [[handlers.http]]
            type = "c"
            url = "http://127.0.0.1:9/other"
            timeout_ms = 100
        "#;
        let c = load_ok(&with_file(&user_file(hooks)));
        let group = |t: &str| c.engine.types[t].breaker_group.clone();
        assert_eq!(group("a").as_deref(), Some("http://127.0.0.1:9/hook"));
        assert_eq!(group("b"), group("a"), "one target, no credentials shown");
        assert_eq!(group("c").as_deref(), Some("http://127.0.0.1:9/other"));
        assert!(!c.engine.types.contains_key("echo"));

        let file = user_file(&format!("{hooks}\n[types.b.breaker]\nfailures = 2\n"));
        let msg = load_err(&with_file(&file)).to_string();
        assert!(
            msg.contains("`types.b.breaker`")
                && msg.contains(
                    "the same breaker as types.a.breaker: both POST to http://127.0.0.1:9/hook"
                ),
            "{msg}"
        );
    }
}
