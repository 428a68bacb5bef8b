//! Per-type limits (`[types.<type>]`): the bulkhead, queue, deadline cap, rate limit and
//! circuit breaker of each operation type, and how a node's running slots are shared out
//! between types.
//!
//! [`TypeSettings`] is what a caller configures; a type with none gets the node's
//! defaults. When the node starts, each type's settings are resolved into the
//! [`TypeLimits`] its [`TypeEntry`](crate::handler::TypeEntry) carries, so the door and
//! the Scheduler read plain fields, never a map.
//!
//! **Running slots** ([`SlotPlan`]): a type with its own `max_concurrent` keeps that many
//! slots for itself alone, out of `engine.max_concurrent`: no other type can take them,
//! and it cannot take others'. What is left (the *shared* slots) serves every type
//! without its own, each of which may hold at most `type_share_percent` of them, so one
//! slow type (a hanging webhook, long `sleep`s) leaves the rest to the others. The node
//! never runs more than `engine.max_concurrent` operations at once. Each count is one
//! atomic shared by every shard's Scheduler, so the limits hold across shards.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use crate::breaker::{BreakerPolicy, TypeBreaker};
use crate::counter::Padded;
use crate::node::EngineConfig;
use crate::ratelimit::{Limiter, Rate};
use crate::slots::RunningSlots;

/// A type's own settings; every `None` falls back to the node's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TypeSettings {
    /// Running slots kept for this type alone, out of `engine.max_concurrent`. `None`: a
    /// share of the slots the types without their own share (`type_share_percent`).
    pub max_concurrent: Option<usize>,
    /// Operations allowed to wait; `None`: `EngineConfig::queue_capacity`.
    pub queue_capacity: Option<usize>,
    /// The latest deadline an operation of this type may ask for, at most the node's
    /// `Limits::max_deadline` (it also caps the default deadline). `None`: the node's.
    pub max_deadline: Option<Duration>,
    /// Submissions accepted per second at most, on each node, with a burst. `None`: no
    /// limit.
    pub rate: Option<RateLimit>,
    /// The type's circuit breaker.
    pub breaker: BreakerSetting,
    /// Types with the same group share one breaker, named after the group: they open and
    /// close together (the binary groups webhook types by their target URL). `None`: a
    /// breaker of its own, named after the type.
    pub breaker_group: Option<String>,
}

/// A rate limit: `per_sec` submissions a second on average, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub per_sec: NonZeroU32,
    pub burst: NonZeroU32,
}

/// A type's circuit breaker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BreakerSetting {
    /// The node's (`EngineConfig::breaker`).
    #[default]
    Inherit,
    /// None: failures never refuse the type.
    Disabled,
    Enabled(BreakerPolicy),
}

/// How the node's running slots are shared out (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotPlan {
    /// The slots types without their own share: `max_concurrent` less every type's own.
    pub shared: usize,
    /// How many of those one type may hold at once.
    pub per_type: usize,
}

impl SlotPlan {
    /// The plan for `config`; an error names what does not fit.
    pub fn of(config: &EngineConfig) -> Result<SlotPlan, String> {
        let max = config.batch.max_concurrent;
        let own: usize = config.types.values().filter_map(|t| t.max_concurrent).sum();
        if own > max {
            return Err(format!(
                "the types' own max_concurrent add up to {own}, over max_concurrent ({max})"
            ));
        }
        let shared = max - own;
        let pct = config.type_share_percent.clamp(1, 100) as usize;
        let per_type = if shared == 0 {
            0
        } else {
            shared.saturating_mul(pct).div_ceil(100).max(1)
        };
        Ok(SlotPlan { shared, per_type })
    }
}

/// A type's settings, resolved: what the door and the Scheduler read.
pub struct TypeLimits {
    /// Operations allowed to wait.
    pub queue_capacity: usize,
    /// The type's deadline cap, when it is below the node's (the node checks its own).
    pub max_deadline: Option<Duration>,
    /// The deadline of an operation that brings none.
    pub default_deadline: Duration,
    /// The limiter's state changes with every submission: on a line of its own.
    pub rate: Option<(RateLimit, Padded<Limiter>)>,
    pub breaker: Option<Arc<TypeBreaker>>,
    /// The type's running slots: its own, or its share of the shared slots.
    pub(crate) slots: RunningSlots,
    /// Whether its slots come out of the node's shared slots too (no own
    /// `max_concurrent`).
    pub(crate) shares: bool,
}

impl TypeLimits {
    /// The limits of a type configured with `settings` (`None`: the node's defaults) on a
    /// node of `shards` shards whose slots are shared out by `plan`. `breaker` is the
    /// type's breaker, already made (types of one group share it).
    pub(crate) fn resolve(
        config: &EngineConfig,
        settings: Option<&TypeSettings>,
        plan: SlotPlan,
        shards: usize,
        breaker: Option<Arc<TypeBreaker>>,
    ) -> TypeLimits {
        let s = settings.cloned().unwrap_or_default();
        let node_max = config.limits.max_deadline;
        let max_deadline = s.max_deadline.filter(|d| *d < node_max);
        let default_deadline = match max_deadline {
            Some(m) => config.limits.default_deadline.min(m),
            None => config.limits.default_deadline,
        };
        let (own, shares) = match s.max_concurrent {
            Some(n) => (n, false),
            None => (plan.per_type, true),
        };
        TypeLimits {
            queue_capacity: s.queue_capacity.unwrap_or(config.queue_capacity),
            max_deadline,
            default_deadline,
            rate: s.rate.map(|r| {
                let rate = Rate {
                    per_sec: r.per_sec,
                    burst: r.burst,
                };
                (r, Padded(Limiter::new(rate)))
            }),
            breaker,
            slots: RunningSlots::new(shards, own),
            shares,
        }
    }

    /// Limits for a type before its node binds it (only the registry's own tests and
    /// the entries they make see these): the engine defaults, no breaker, slots of its
    /// own up to the node's maximum.
    pub(crate) fn unbound() -> TypeLimits {
        let config = EngineConfig::default();
        TypeLimits {
            queue_capacity: config.queue_capacity,
            max_deadline: None,
            default_deadline: config.limits.default_deadline,
            rate: None,
            breaker: None,
            slots: RunningSlots::new(1, config.batch.max_concurrent),
            shares: false,
        }
    }

    /// The policy of the breaker `settings` ask for, on a node whose default is
    /// `config.breaker`.
    pub(crate) fn breaker_policy(
        config: &EngineConfig,
        settings: Option<&TypeSettings>,
    ) -> Option<BreakerPolicy> {
        match settings.map_or(&BreakerSetting::Inherit, |s| &s.breaker) {
            BreakerSetting::Inherit => config.breaker.clone(),
            BreakerSetting::Disabled => None,
            BreakerSetting::Enabled(p) => Some(p.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max: usize, pct: u8, own: &[(&str, usize)]) -> EngineConfig {
        let mut c = EngineConfig::default();
        c.batch.max_concurrent = max;
        c.type_share_percent = pct;
        for (t, n) in own {
            c.types.insert(
                (*t).into(),
                TypeSettings {
                    max_concurrent: Some(*n),
                    ..TypeSettings::default()
                },
            );
        }
        c
    }

    #[test]
    fn own_slots_are_kept_out_of_the_shared_ones() {
        let p = SlotPlan::of(&config(100, 50, &[("hook", 10), ("slow", 30)])).unwrap();
        assert_eq!(
            p,
            SlotPlan {
                shared: 60,
                per_type: 30
            }
        );
        let p = SlotPlan::of(&config(16_384, 50, &[])).unwrap();
        assert_eq!(p.per_type, 8_192);
        // Rounded up, never zero while anything is shared.
        assert_eq!(SlotPlan::of(&config(3, 50, &[])).unwrap().per_type, 2);
        assert_eq!(SlotPlan::of(&config(1, 1, &[])).unwrap().per_type, 1);
        assert_eq!(SlotPlan::of(&config(4, 100, &[])).unwrap().per_type, 4);
        let p = SlotPlan::of(&config(10, 50, &[("a", 10)])).unwrap();
        assert_eq!(
            p,
            SlotPlan {
                shared: 0,
                per_type: 0
            }
        );
        let e = SlotPlan::of(&config(10, 50, &[("a", 6), ("b", 5)])).unwrap_err();
        assert!(e.contains("11") && e.contains("(10)"), "{e}");
    }

    #[test]
    fn a_type_deadline_caps_the_default_deadline_too() {
        let mut c = EngineConfig::default();
        let plan = SlotPlan::of(&c).unwrap();
        let s = TypeSettings {
            max_deadline: Some(Duration::from_secs(5)),
            ..TypeSettings::default()
        };
        c.types.insert("t".into(), s.clone());
        let l = TypeLimits::resolve(&c, Some(&s), plan, 1, None);
        assert_eq!(l.max_deadline, Some(Duration::from_secs(5)));
        assert_eq!(l.default_deadline, Duration::from_secs(5));
        // Not below the node's: nothing of its own to check.
        let s = TypeSettings {
            max_deadline: Some(c.limits.max_deadline),
            ..TypeSettings::default()
        };
        let l = TypeLimits::resolve(&c, Some(&s), plan, 1, None);
        assert_eq!(l.max_deadline, None);
        assert_eq!(l.default_deadline, c.limits.default_deadline);
    }

    #[test]
    fn the_breaker_falls_back_to_the_node_default() {
        let mut c = EngineConfig::default();
        assert_eq!(
            TypeLimits::breaker_policy(&c, None),
            Some(BreakerPolicy::default())
        );
        let off = TypeSettings {
            breaker: BreakerSetting::Disabled,
            ..TypeSettings::default()
        };
        assert_eq!(TypeLimits::breaker_policy(&c, Some(&off)), None);
        c.breaker = None;
        let mine = BreakerPolicy {
            failures: 2,
            ..BreakerPolicy::default()
        };
        let on = TypeSettings {
            breaker: BreakerSetting::Enabled(mine.clone()),
            ..TypeSettings::default()
        };
        assert_eq!(TypeLimits::breaker_policy(&c, Some(&on)), Some(mine));
        assert_eq!(
            TypeLimits::breaker_policy(&c, Some(&TypeSettings::default())),
            None
        );
    }
}
