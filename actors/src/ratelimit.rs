//! Rate limits: how many operations may be submitted per second, with a burst, as GCRA
//! limiters from the `governor` crate (the algorithm is governor's; this module sizes and
//! bounds it and says what a refusal means).
//!
//! - [`Limiter`]: one limit (the api's global `limits.rate_per_sec`, or one type's).
//! - [`KeyedLimiter`]: one limit per key (the api's per-client limit), in a store that
//!   holds at most `max_keys` keys: past that, keys it does not know share one state,
//!   so clients that keep changing their name cannot grow memory without bound. Call
//!   [`KeyedLimiter::sweep`] periodically: it forgets keys whose allowance is full again.
//! - [`retry_after_secs`]: the `Retry-After` a refusal answers with, rounded up to whole
//!   seconds and jittered, the randomness passed in.
//!
//! A check is one clock read and a compare-and-swap (75-95 ns on the 2-core VM of
//! BENCHMARKS.md), plus a map lookup per key (140-210 ns); where no limit is configured
//! the caller holds no limiter at all and pays nothing.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use governor::clock::{Clock, MonotonicClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{InsufficientCapacity, NotUntil, Quota, RateLimiter};

/// A rate: `per_sec` on average, up to `burst` at once (the allowance refills at
/// `per_sec` up to `burst`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub per_sec: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Rate {
    /// `per_sec` a second with a burst of `burst`; `None` when `per_sec` is 0 (no limit).
    /// A `burst` of 0 is one second's worth (`per_sec`).
    pub fn new(per_sec: u32, burst: u32) -> Option<Rate> {
        let per_sec = NonZeroU32::new(per_sec)?;
        Some(Rate {
            per_sec,
            burst: NonZeroU32::new(burst).unwrap_or(per_sec),
        })
    }

    fn quota(self) -> Quota {
        Quota::per_second(self.per_sec).allow_burst(self.burst)
    }
}

/// Why a check did not pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Over the rate now: the same check could pass after this wait (unless others use
    /// the allowance first).
    Wait(Duration),
    /// More at once than the burst: such a check can never pass.
    OverBurst { burst: u32 },
}

/// What a check answers: `Ok` (counted) or why not (nothing counted).
pub type Checked = Result<(), Refusal>;

fn outcome<I: governor::clock::Reference>(
    r: Result<Result<(), NotUntil<I>>, InsufficientCapacity>,
    now: impl FnOnce() -> I,
    burst: NonZeroU32,
) -> Checked {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(not_until)) => Err(Refusal::Wait(not_until.wait_time_from(now()))),
        Err(InsufficientCapacity(_)) => Err(Refusal::OverBurst { burst: burst.get() }),
    }
}

/// `n` as governor counts cells: `None` for 0 (nothing to count); past `u32::MAX` it is
/// over any burst anyway.
fn cells(n: usize) -> Option<NonZeroU32> {
    NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX))
}

/// One rate limit, shared by every caller.
pub struct Limiter<C: Clock = MonotonicClock> {
    inner: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    rate: Rate,
}

impl Limiter {
    pub fn new(rate: Rate) -> Self {
        Self::with_clock(rate, MonotonicClock)
    }
}

impl<C: Clock> Limiter<C> {
    /// A limiter reading `clock` (a fake one in tests).
    pub fn with_clock(rate: Rate, clock: C) -> Self {
        Limiter {
            inner: RateLimiter::direct_with_clock(rate.quota(), clock),
            rate,
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes `n` from the allowance, all or nothing.
    pub fn check_n(&self, n: usize) -> Checked {
        let Some(n) = cells(n) else { return Ok(()) };
        outcome(
            self.inner.check_n(n),
            || self.inner.clock().now(),
            self.rate.burst,
        )
    }
}

/// The keyed store: governor's per-key state in a [`DashMap`], at most `max` keys. When it
/// is full, keys it does not hold share one state (limited together), until a
/// [`sweep`](ShrinkableKeyedStateStore::retain_recent) makes room.
struct BoundedStore<K: Hash + Eq> {
    map: DashMap<K, InMemoryState>,
    /// The map's length as of the last insert or sweep (reading `DashMap::len` locks every
    /// shard, which a check must not do).
    len: AtomicUsize,
    max: usize,
    shared: InMemoryState,
}

impl<K: Hash + Eq + Clone> StateStore for BoundedStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(state) = self.map.get(key) {
            return state.measure_and_replace(&NotKeyed::NonKey, f);
        }
        if self.len.load(Ordering::Relaxed) >= self.max {
            return self.shared.measure_and_replace(&NotKeyed::NonKey, f);
        }
        let state = match self.map.entry(key.clone()) {
            Entry::Occupied(e) => e.into_ref(),
            Entry::Vacant(e) => {
                self.len.fetch_add(1, Ordering::Relaxed);
                e.insert(InMemoryState::default())
            }
        };
        state.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for BoundedStore<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        ShrinkableKeyedStateStore::retain_recent(&self.map, drop_below);
        self.len.store(self.map.len(), Ordering::Relaxed);
    }

    fn shrink_to_fit(&self) {
        self.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// One rate limit per key (a client, a type), each key with the same [`Rate`]. Holds at
/// most `max_keys` keys; see the module's doc.
pub struct KeyedLimiter<K: Hash + Eq + Clone, C: Clock = MonotonicClock> {
    inner: RateLimiter<K, BoundedStore<K>, C, NoOpMiddleware<C::Instant>>,
    rate: Rate,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self::with_clock(rate, max_keys, MonotonicClock)
    }
}

impl<K: Hash + Eq + Clone, C: Clock> KeyedLimiter<K, C> {
    /// A limiter reading `clock` (a fake one in tests).
    pub fn with_clock(rate: Rate, max_keys: usize, clock: C) -> Self {
        let store = BoundedStore {
            map: DashMap::new(),
            len: AtomicUsize::new(0),
            max: max_keys,
            shared: InMemoryState::default(),
        };
        KeyedLimiter {
            inner: RateLimiter::new(rate.quota(), store, clock),
            rate,
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes `n` from `key`'s allowance, all or nothing.
    pub fn check_n(&self, key: &K, n: usize) -> Checked {
        let Some(n) = cells(n) else { return Ok(()) };
        outcome(
            self.inner.check_key_n(key, n),
            || self.inner.clock().now(),
            self.rate.burst,
        )
    }

    /// Forgets the keys whose allowance is full again (they would start where a new key
    /// starts) and gives back the memory. Call it periodically; it locks each shard of the
    /// store in turn.
    pub fn sweep(&self) {
        self.inner.retain_recent();
        self.inner.shrink_to_fit();
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.inner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

/// How much later than needed a refused caller is told to come back, at most: a share of
/// the wait, so callers refused together do not all come back at the same second.
pub const RETRY_JITTER: f64 = 0.5;

/// The `Retry-After` of a refusal that could pass after `wait`: whole seconds, rounded
/// up, at least 1, stretched by up to [`RETRY_JITTER`] of the wait. `draw` is a random
/// number in `[0, 1)` (passed in, so this stays a plain function).
pub fn retry_after_secs(wait: Duration, draw: f64) -> u64 {
    let stretched = wait.as_secs_f64() * (1.0 + RETRY_JITTER * draw.clamp(0.0, 1.0));
    (stretched.ceil() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn rate(per_sec: u32, burst: u32) -> Rate {
        Rate::new(per_sec, burst).unwrap()
    }

    #[test]
    fn a_rate_of_zero_is_no_limit_and_a_burst_of_zero_is_one_second() {
        assert_eq!(Rate::new(0, 5), None);
        assert_eq!(Rate::new(7, 0).unwrap().burst.get(), 7);
        assert_eq!(Rate::new(7, 3).unwrap().burst.get(), 3);
    }

    #[test]
    fn the_burst_passes_then_the_rate() {
        let clock = FakeRelativeClock::default();
        let l = Limiter::with_clock(rate(1, 3), clock.clone());
        for _ in 0..3 {
            assert_eq!(l.check_n(1), Ok(()));
        }
        assert_eq!(l.check_n(1), Err(Refusal::Wait(Duration::from_secs(1))));
        clock.advance(Duration::from_millis(400));
        assert_eq!(l.check_n(1), Err(Refusal::Wait(Duration::from_millis(600))));
        clock.advance(Duration::from_millis(600));
        assert_eq!(l.check_n(1), Ok(()));
        assert!(l.check_n(1).is_err());
    }

    #[test]
    fn n_at_once_is_all_or_nothing_and_never_past_the_burst() {
        let clock = FakeRelativeClock::default();
        let l = Limiter::with_clock(rate(10, 5), clock.clone());
        assert_eq!(l.check_n(6), Err(Refusal::OverBurst { burst: 5 }));
        assert_eq!(l.check_n(0), Ok(()));
        assert_eq!(l.check_n(4), Ok(()));
        // One left: two at once wait for the second (100 ms at 10/s), and take nothing.
        assert_eq!(l.check_n(2), Err(Refusal::Wait(Duration::from_millis(100))));
        assert_eq!(l.check_n(1), Ok(()));
        assert_eq!(l.check_n(usize::MAX), Err(Refusal::OverBurst { burst: 5 }));
    }

    #[test]
    fn keys_are_limited_apart() {
        let clock = FakeRelativeClock::default();
        let l = KeyedLimiter::with_clock(rate(1, 2), 100, clock.clone());
        assert_eq!(l.check_n(&"a", 2), Ok(()));
        assert!(matches!(l.check_n(&"a", 1), Err(Refusal::Wait(_))));
        assert_eq!(l.check_n(&"b", 2), Ok(()));
        assert_eq!(l.len(), 2);
        clock.advance(Duration::from_secs(1));
        assert_eq!(l.check_n(&"a", 1), Ok(()));
        assert_eq!(l.check_n(&"b", 3), Err(Refusal::OverBurst { burst: 2 }));
    }

    #[test]
    fn past_max_keys_new_keys_share_one_state_until_a_sweep_makes_room() {
        let clock = FakeRelativeClock::default();
        let l = KeyedLimiter::with_clock(rate(1, 1), 2, clock.clone());
        assert_eq!(l.check_n(&"a", 1), Ok(()));
        assert_eq!(l.check_n(&"b", 1), Ok(()));
        // Full: c and d are limited together, a and b keep their own.
        assert_eq!(l.check_n(&"c", 1), Ok(()));
        assert!(l.check_n(&"d", 1).is_err());
        assert!(l.check_n(&"a", 1).is_err());
        assert_eq!(l.len(), 2);
        // Once a and b are full again, the sweep forgets them and makes room.
        clock.advance(Duration::from_secs(2));
        l.sweep();
        assert!(l.is_empty());
        assert_eq!(l.check_n(&"d", 1), Ok(()));
        assert_eq!(l.check_n(&"e", 1), Ok(()));
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn a_sweep_keeps_keys_that_used_their_allowance_recently() {
        let clock = FakeRelativeClock::default();
        let l = KeyedLimiter::with_clock(rate(1, 2), 10, clock.clone());
        l.check_n(&"early", 1).unwrap();
        clock.advance(Duration::from_secs(1));
        l.check_n(&"late", 1).unwrap();
        // governor forgets a key once its state is a refill interval (here 1 s) older
        // than a fresh key's: `early` now, `late` not yet.
        clock.advance(Duration::from_secs(1));
        l.sweep();
        assert_eq!(l.len(), 1);
        clock.advance(Duration::from_secs(1));
        l.sweep();
        assert!(l.is_empty());
    }

    #[test]
    fn retry_after_rounds_up_and_stretches_by_the_draw() {
        let ms = Duration::from_millis;
        assert_eq!(retry_after_secs(Duration::ZERO, 0.0), 1);
        assert_eq!(retry_after_secs(ms(300), 0.99), 1);
        assert_eq!(retry_after_secs(ms(1000), 0.0), 1);
        assert_eq!(retry_after_secs(ms(1001), 0.0), 2);
        assert_eq!(retry_after_secs(ms(4000), 0.0), 4);
        assert_eq!(retry_after_secs(ms(4000), 0.5), 5);
        assert_eq!(retry_after_secs(ms(4000), 0.999), 6);
        // Out-of-range draws are clamped, never more than RETRY_JITTER of the wait.
        assert_eq!(retry_after_secs(ms(4000), 7.0), 6);
        assert_eq!(retry_after_secs(ms(4000), -1.0), 4);
    }
}
