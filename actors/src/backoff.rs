//! Exponential backoff with jitter, pure: the randomness is an argument.
//!
//! The Executor waits between the runs of an operation whose handler failed with a
//! retryable error ([`RetryPolicy::backoff`](crate::RetryPolicy::backoff) builds a
//! [`Backoff`] from the type's policy); a loop that retries until it succeeds (a link
//! redialing its peer) keeps a [`BackoffSeries`], which counts the attempts and starts over
//! on `reset`. Both shapes of jitter in use live in [`Jitter`], so a caller keeps the exact
//! waits it had when it moves to this type.

use std::time::Duration;

/// How the wait is drawn around the nominal backoff `d` of an attempt.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Jitter {
    /// Uniform in `[d * (1 - f), d]` for the fraction `f` (clamped to `0..=1`): a unit of
    /// 0 waits the full `d`, a unit of 1 waits `d * (1 - f)`. `Down(0.0)` is no jitter.
    /// Computed in seconds as `f64` (the retry policy's shape).
    Down(f64),
    /// Uniform in `[d / 2, d]`, and never below `initial`: a unit of 0 waits `d / 2`, a
    /// unit of 1 waits `d`. Computed on [`Duration`]s (a transport's redial shape: nodes
    /// that lost the same peer do not redial in lockstep).
    Half,
}

/// Exponential backoff: the nominal wait of attempt `n` (1-based) is
/// `initial * multiplier^(n - 1)`, capped at `max`, then jittered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// Growth per attempt; below 1 counts as 1 (never shrinks).
    pub multiplier: f64,
    pub jitter: Jitter,
}

impl Backoff {
    /// Doubling from `initial` to `max`.
    pub fn doubling(initial: Duration, max: Duration, jitter: Jitter) -> Self {
        Backoff {
            initial,
            max,
            multiplier: 2.0,
            jitter,
        }
    }

    /// The nominal wait of `attempt` (1-based) in seconds, before jitter.
    fn nominal_secs(&self, attempt: u32) -> f64 {
        let exp = attempt.saturating_sub(1).min(i32::MAX as u32) as i32;
        let grown = self.initial.as_secs_f64() * self.multiplier.max(1.0).powi(exp);
        grown.min(self.max.as_secs_f64())
    }

    /// The wait after failed attempt number `attempt` (1-based). `unit` is a uniform
    /// random number in `[0, 1]` (clamped), passed in so the function is pure.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.nominal_secs(attempt);
        let unit = unit.clamp(0.0, 1.0);
        match self.jitter {
            Jitter::Down(fraction) => {
                let wait = base * (1.0 - fraction.clamp(0.0, 1.0) * unit);
                Duration::from_secs_f64(wait.max(0.0))
            }
            Jitter::Half => {
                let d = Duration::from_secs_f64(base.max(0.0));
                (d / 2 + (d / 2).mul_f64(unit)).max(self.initial)
            }
        }
    }

    /// A series of waits for a loop that retries until it succeeds.
    pub fn series(self) -> BackoffSeries {
        BackoffSeries {
            backoff: self,
            attempt: 0,
        }
    }
}

/// A [`Backoff`] and the attempts made so far: each [`next_wait`](Self::next_wait) is the
/// wait after one more failure; [`reset`](Self::reset) starts over after a success.
#[derive(Clone, Debug)]
pub struct BackoffSeries {
    backoff: Backoff,
    attempt: u32,
}

impl BackoffSeries {
    /// The wait before the next attempt; `unit` in `[0, 1]` is the jitter's pick.
    pub fn next_wait(&mut self, unit: f64) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        self.backoff.delay(self.attempt, unit)
    }

    /// Starts over from `initial` (the last attempt succeeded).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn down_jitter_grows_then_caps() {
        let b = Backoff {
            initial: ms(10),
            max: ms(50),
            multiplier: 2.0,
            jitter: Jitter::Down(0.0),
        };
        let waits: Vec<_> = [1, 2, 3, 4, 30].iter().map(|a| b.delay(*a, 0.5)).collect();
        assert_eq!(waits, [ms(10), ms(20), ms(40), ms(50), ms(50)]);
        let j = Backoff {
            jitter: Jitter::Down(0.5),
            ..b
        };
        assert_eq!(j.delay(2, 0.0), ms(20));
        assert_eq!(j.delay(2, 1.0), ms(10));
    }

    /// The waits of the cluster transport's redial backoff, value for value: the figures
    /// its own hand-written backoff had, before it moved to this type.
    #[test]
    fn half_jitter_series_matches_the_transport_redial_waits() {
        let (min, max) = (ms(50), Duration::from_secs(2));
        let mut b = Backoff::doubling(min, max, Jitter::Half).series();
        let full: Vec<_> = (0..8).map(|_| b.next_wait(1.0).as_millis()).collect();
        assert_eq!(full, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        let mut b = Backoff::doubling(min, max, Jitter::Half).series();
        let low: Vec<_> = (0..8).map(|_| b.next_wait(0.0).as_millis()).collect();
        assert_eq!(low, [50, 50, 100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_wait(0.5), min);
    }

    /// The transport's redial backoff as the cluster crate had it before it moved to this
    /// type (state that doubles): the reference the property below holds it to.
    struct TransportBackoff {
        min: Duration,
        max: Duration,
        next: Duration,
    }

    impl TransportBackoff {
        fn next_wait(&mut self, fraction: f64) -> Duration {
            let d = self.next;
            self.next = (d * 2).min(self.max);
            (d / 2 + (d / 2).mul_f64(fraction.clamp(0.0, 1.0))).max(self.min)
        }
    }

    proptest! {
        #[test]
        fn half_jitter_is_the_transport_backoff_exactly(
            min_ms in 1u64..5_000,
            max_ms in 1u64..60_000,
            units in proptest::collection::vec(0.0f64..=1.0, 1..40),
        ) {
            let (min, max) = (ms(min_ms), ms(max_ms));
            let mut theirs = TransportBackoff { min, max, next: min };
            let mut ours = Backoff::doubling(min, max, Jitter::Half).series();
            for u in units {
                prop_assert_eq!(ours.next_wait(u), theirs.next_wait(u));
            }
        }

        #[test]
        fn waits_stay_within_their_jitter_bounds(
            attempt in 1u32..64,
            unit in 0.0f64..=1.0,
            fraction in 0.0f64..=1.0,
            initial_ms in 1u64..1_000,
            max_ms in 1u64..10_000,
            multiplier in 1.0f64..4.0,
        ) {
            let down = Backoff {
                initial: ms(initial_ms),
                max: ms(max_ms),
                multiplier,
                jitter: Jitter::Down(fraction),
            };
            let nominal = down.delay(attempt, 0.0);
            let got = down.delay(attempt, unit);
            prop_assert!(nominal <= down.max);
            prop_assert!(got <= nominal);
            prop_assert!(got.as_secs_f64() >= nominal.as_secs_f64() * (1.0 - fraction) - 1e-9);
            prop_assert!(down.delay(attempt + 1, 0.0) >= nominal, "never shrinks");

            let half = Backoff { jitter: Jitter::Half, ..down };
            let top = half.delay(attempt, 1.0);
            let got = half.delay(attempt, unit);
            prop_assert!(got <= top.max(half.initial));
            prop_assert!(got >= (top / 2).max(half.initial));
        }
    }
}
