//! Circuit breakers: a type whose handler keeps failing is refused at the door for a
//! while, instead of being run (and retried) at full rate into a dependency that is down.
//!
//! [`Breaker`] is the pure state machine, with the time passed in:
//!
//! - **closed**: operations are admitted. A failure is remembered; `failures` of them
//!   within `window` open the breaker.
//! - **open**: submissions are refused at once (503 `circuit_open`), until `open_for`
//!   has passed since it opened.
//! - **half-open**: the first admission after that lets `half_open_calls` trial
//!   operations through (the others are refused). As many successes close it; one
//!   failure opens it again for `open_for`. Trials that never report (expired in the
//!   queue, lost with a node) do not hold it half-open forever: after `open_for` without
//!   a verdict, a new round of trials is let through.
//!
//! What counts as a failure is the Executor's to say (see `executor.rs`): the handler
//! failed with a retryable error and its retries ran out, or its deadline passed while
//! it ran, or it panicked. A refusal at the door, a result from the cache, an operation
//! that expired before it ran and a non-retryable error (the operation was wrong, not the
//! dependency) say nothing about the handler's health and are not counted.
//!
//! [`TypeBreaker`] is what the engine holds: the machine behind a lock, and a mirror of
//! its state that the hot path reads with one atomic load. While the breaker is closed,
//! admitting an operation and recording a success take no lock; only failures, and every
//! call while it is open or half-open, do. Several types may share one breaker (webhook
//! types that POST to one target): they then open and close together.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use crate::op::OpType;

/// When a breaker opens and how it recovers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Failures within `window` that open the breaker (at least 1).
    pub failures: u32,
    /// How far back failures count.
    pub window: Duration,
    /// How long the breaker stays open before it lets trial operations through.
    pub open_for: Duration,
    /// Trial operations let through while half-open; as many successes close it.
    pub half_open_calls: u32,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            failures: 5,
            window: Duration::from_secs(60),
            open_for: Duration::from_secs(30),
            half_open_calls: 3,
        }
    }
}

/// A breaker's state, as metrics show it: `opmesh_breaker_state` is 0, 1 or 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// What [`Breaker::admit`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Admit,
    /// Refused; the breaker lets operations through again in about `retry_after`.
    Refuse {
        retry_after: Duration,
    },
}

/// A change of state, for the caller to publish (`breaker:opened`, `breaker:closed`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Opened after `failures` failures; it lets trials through from `until`.
    Opened { failures: u32, until: Instant },
    /// Open long enough: trial operations go through.
    HalfOpened,
    /// The trials succeeded.
    Closed,
}

#[derive(Clone, Debug, PartialEq)]
enum State {
    /// The times of recent failures, oldest first, at most `policy.failures` of them.
    Closed {
        failures: VecDeque<Instant>,
    },
    Open {
        until: Instant,
        failures: u32,
    },
    /// A round of trials started at `since`: `admitted` let through, `succeeded` of them
    /// reported success.
    HalfOpen {
        since: Instant,
        admitted: u32,
        succeeded: u32,
    },
}

/// The breaker's state machine. Pure: every method takes the time.
#[derive(Clone, Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    state: State,
}

/// How long a submission refused while trials run is told to wait: the trials usually
/// answer well before a new round would start.
const HALF_OPEN_RETRY: Duration = Duration::from_secs(1);

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Self {
        Breaker {
            policy,
            state: State::Closed {
                failures: VecDeque::new(),
            },
        }
    }

    pub fn policy(&self) -> &BreakerPolicy {
        &self.policy
    }

    /// The state at `now` (an open breaker whose time is up reads as half-open: the next
    /// submission goes through).
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { until, .. } if now < until => BreakerState::Open,
            State::Open { .. } | State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// While open: when trials may start.
    pub fn open_until(&self) -> Option<Instant> {
        match self.state {
            State::Open { until, .. } => Some(until),
            _ => None,
        }
    }

    /// Failures counted now: those within the window while closed, those that opened it
    /// while open, none while half-open.
    pub fn failures(&self, now: Instant) -> u32 {
        match &self.state {
            State::Closed { failures } => failures
                .iter()
                .filter(|t| now.saturating_duration_since(**t) < self.policy.window)
                .count() as u32,
            State::Open { failures, .. } => *failures,
            State::HalfOpen { .. } => 0,
        }
    }

    /// Whether an operation submitted at `now` may go in.
    pub fn admit(&mut self, now: Instant) -> (Admission, Option<Transition>) {
        let calls = self.policy.half_open_calls;
        match &mut self.state {
            State::Closed { .. } => (Admission::Admit, None),
            State::Open { until, .. } if now < *until => (
                Admission::Refuse {
                    retry_after: *until - now,
                },
                None,
            ),
            State::Open { .. } => {
                self.state = State::HalfOpen {
                    since: now,
                    admitted: 1,
                    succeeded: 0,
                };
                (Admission::Admit, Some(Transition::HalfOpened))
            }
            State::HalfOpen {
                since,
                admitted,
                succeeded,
            } => {
                if *admitted < calls {
                    *admitted += 1;
                    (Admission::Admit, None)
                } else if now >= *since + self.policy.open_for {
                    // The round's trials never all answered: start another.
                    *since = now;
                    *admitted = 1;
                    *succeeded = 0;
                    (Admission::Admit, None)
                } else {
                    let round_ends = *since + self.policy.open_for - now;
                    (
                        Admission::Refuse {
                            retry_after: round_ends.min(HALF_OPEN_RETRY),
                        },
                        None,
                    )
                }
            }
        }
    }

    /// An operation of the breaker's type(s) ran and ended at `now`, `ok` or failed (a
    /// failure as the module docs define it).
    pub fn record(&mut self, now: Instant, ok: bool) -> Option<Transition> {
        let p = &self.policy;
        match &mut self.state {
            State::Closed { .. } if ok => None,
            State::Closed { failures } => {
                failures.push_back(now);
                while failures.len() > p.failures as usize
                    || failures
                        .front()
                        .is_some_and(|t| now.saturating_duration_since(*t) >= p.window)
                {
                    failures.pop_front();
                }
                if failures.len() >= p.failures as usize {
                    Some(self.open(now, p.failures))
                } else {
                    None
                }
            }
            // Operations admitted before it opened: they say nothing new.
            State::Open { .. } => None,
            State::HalfOpen { succeeded, .. } if ok => {
                *succeeded += 1;
                if *succeeded >= p.half_open_calls {
                    self.state = State::Closed {
                        failures: VecDeque::new(),
                    };
                    Some(Transition::Closed)
                } else {
                    None
                }
            }
            State::HalfOpen { .. } => Some(self.open(now, 1)),
        }
    }

    fn open(&mut self, now: Instant, failures: u32) -> Transition {
        let until = now + self.policy.open_for;
        self.state = State::Open { until, failures };
        Transition::Opened { failures, until }
    }
}

const CLOSED: u8 = 0;
/// Open or half-open: ask the machine.
const GUARDED: u8 = 1;

/// A breaker as the engine holds it: shared by the type(s) it guards.
pub struct TypeBreaker {
    /// The type it guards, or the target its types share (a webhook URL).
    pub name: String,
    /// The types it guards, sorted.
    pub types: Vec<OpType>,
    machine: Mutex<Breaker>,
    /// [`CLOSED`] while the machine is closed: the hot path reads only this.
    mirror: AtomicU8,
}

/// A point-in-time view of a breaker, as `/v1/metrics` shows it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BreakerStats {
    pub name: String,
    pub types: Vec<String>,
    pub state: BreakerState,
    /// Failures counted now (within the window while closed; those that opened it while
    /// open).
    pub failures: u32,
    /// While open: milliseconds until trial operations go through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_in_ms: Option<u64>,
    pub policy_failures: u32,
    pub window_secs: f64,
    pub open_secs: f64,
    pub half_open_calls: u32,
}

impl TypeBreaker {
    pub(crate) fn new(name: String, mut types: Vec<OpType>, policy: BreakerPolicy) -> Self {
        types.sort();
        TypeBreaker {
            name,
            types,
            machine: Mutex::new(Breaker::new(policy)),
            mirror: AtomicU8::new(CLOSED),
        }
    }

    /// Whether it is closed now (one atomic load: the hot path asks this first).
    #[inline]
    pub(crate) fn is_closed(&self) -> bool {
        self.mirror.load(Ordering::Acquire) == CLOSED
    }

    /// Whether an operation may go in at `now`; the transition, if this made one.
    #[inline]
    pub(crate) fn admit(&self, now: Instant) -> (Admission, Option<Transition>) {
        if self.mirror.load(Ordering::Acquire) == CLOSED {
            return (Admission::Admit, None);
        }
        self.locked(|m| m.admit(now))
    }

    /// Records how an operation that ran ended; the transition, if this made one.
    #[inline]
    pub(crate) fn record(&self, now: Instant, ok: bool) -> Option<Transition> {
        if ok && self.mirror.load(Ordering::Acquire) == CLOSED {
            return None;
        }
        self.locked(|m| m.record(now, ok))
    }

    #[cold]
    fn locked<R>(&self, f: impl FnOnce(&mut Breaker) -> R) -> R {
        let mut m = self.machine.lock();
        let r = f(&mut m);
        let closed = matches!(m.state, State::Closed { .. });
        self.mirror
            .store(if closed { CLOSED } else { GUARDED }, Ordering::Release);
        r
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        self.machine.lock().state(now)
    }

    /// Until when it stays open, if it is open at `now` (closed or half-open: `None`).
    pub fn open_until(&self, now: Instant) -> Option<Instant> {
        if self.is_closed() {
            return None;
        }
        self.machine.lock().open_until().filter(|u| *u > now)
    }

    pub fn stats(&self, now: Instant) -> BreakerStats {
        let m = self.machine.lock();
        let p = m.policy();
        BreakerStats {
            name: self.name.clone(),
            types: self.types.iter().map(|t| t.to_string()).collect(),
            state: m.state(now),
            failures: m.failures(now),
            retry_in_ms: m
                .open_until()
                .filter(|u| *u > now)
                .map(|u| (u - now).as_millis() as u64),
            policy_failures: p.failures,
            window_secs: p.window.as_secs_f64(),
            open_secs: p.open_for.as_secs_f64(),
            half_open_calls: p.half_open_calls,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            failures: 5,
            window: Duration::from_secs(60),
            open_for: Duration::from_secs(30),
            half_open_calls: 3,
        }
    }

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn five_failures_within_the_window_open_it() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        for i in 0..4 {
            assert_eq!(b.record(secs(t0, i), false), None);
            assert_eq!(b.admit(secs(t0, i)).0, Admission::Admit);
        }
        // Successes in between change nothing: the count is of failures in the window.
        assert_eq!(b.record(secs(t0, 4), true), None);
        assert_eq!(b.failures(secs(t0, 4)), 4);
        assert_eq!(
            b.record(secs(t0, 5), false),
            Some(Transition::Opened {
                failures: 5,
                until: secs(t0, 35)
            })
        );
        assert_eq!(b.state(secs(t0, 5)), BreakerState::Open);
        assert_eq!(
            b.admit(secs(t0, 10)),
            (
                Admission::Refuse {
                    retry_after: Duration::from_secs(25)
                },
                None
            )
        );
    }

    #[test]
    fn failures_older_than_the_window_do_not_count() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        for i in 0..4 {
            b.record(secs(t0, i), false);
        }
        // The first four are over a minute old by the fifth: still closed.
        assert_eq!(b.record(secs(t0, 64), false), None);
        assert_eq!(b.state(secs(t0, 64)), BreakerState::Closed);
        assert_eq!(b.failures(secs(t0, 64)), 1);
        for i in 65..68 {
            assert_eq!(b.record(secs(t0, i), false), None);
        }
        assert!(matches!(
            b.record(secs(t0, 68), false),
            Some(Transition::Opened { failures: 5, .. })
        ));
    }

    #[test]
    fn after_open_for_trials_go_through_and_close_it() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        for _ in 0..5 {
            b.record(t0, false);
        }
        let t = secs(t0, 30);
        assert_eq!(b.state(t), BreakerState::HalfOpen, "its time is up");
        assert_eq!(b.admit(t), (Admission::Admit, Some(Transition::HalfOpened)));
        assert_eq!(b.admit(t).0, Admission::Admit);
        assert_eq!(b.admit(t).0, Admission::Admit);
        assert_eq!(
            b.admit(t).0,
            Admission::Refuse {
                retry_after: HALF_OPEN_RETRY
            },
            "three trials at most"
        );
        assert_eq!(b.record(t, true), None);
        assert_eq!(b.record(t, true), None);
        assert_eq!(b.record(t, true), Some(Transition::Closed));
        assert_eq!(b.state(t), BreakerState::Closed);
        assert_eq!(b.failures(t), 0, "a closed breaker starts afresh");
        assert_eq!(b.admit(t).0, Admission::Admit);
    }

    #[test]
    fn a_failed_trial_opens_it_again() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        for _ in 0..5 {
            b.record(t0, false);
        }
        let t = secs(t0, 31);
        assert_eq!(b.admit(t).0, Admission::Admit);
        assert_eq!(b.record(t, true), None);
        assert_eq!(
            b.record(t, false),
            Some(Transition::Opened {
                failures: 1,
                until: secs(t0, 61)
            })
        );
        assert_eq!(b.state(t), BreakerState::Open);
        assert!(matches!(b.admit(secs(t0, 60)).0, Admission::Refuse { .. }));
        assert_eq!(b.admit(secs(t0, 61)).0, Admission::Admit);
    }

    #[test]
    fn trials_that_never_answer_do_not_hold_it_half_open() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        for _ in 0..5 {
            b.record(t0, false);
        }
        let t = secs(t0, 30);
        for _ in 0..3 {
            assert_eq!(b.admit(t).0, Admission::Admit);
        }
        assert!(matches!(b.admit(secs(t0, 59)).0, Admission::Refuse { .. }));
        // No verdict for open_for: a new round.
        assert_eq!(b.admit(secs(t0, 60)).0, Admission::Admit);
        assert_eq!(b.admit(secs(t0, 60)).0, Admission::Admit);
        assert_eq!(b.admit(secs(t0, 60)).0, Admission::Admit);
        assert!(matches!(b.admit(secs(t0, 60)).0, Admission::Refuse { .. }));
    }

    #[test]
    fn outcomes_of_operations_admitted_before_it_opened_are_ignored() {
        let t0 = Instant::now();
        let mut b = Breaker::new(policy());
        for _ in 0..5 {
            b.record(t0, false);
        }
        assert_eq!(b.record(secs(t0, 1), true), None);
        assert_eq!(b.record(secs(t0, 1), false), None);
        assert_eq!(b.open_until(), Some(secs(t0, 30)), "not pushed back");
    }

    #[test]
    fn the_shared_breaker_takes_no_lock_while_closed() {
        let b = TypeBreaker::new("t".into(), vec!["t".into()], policy());
        let t0 = Instant::now();
        let guard = b.machine.lock();
        // Would deadlock if either took the lock.
        assert_eq!(b.admit(t0), (Admission::Admit, None));
        assert_eq!(b.record(t0, true), None);
        drop(guard);
        for _ in 0..5 {
            b.record(t0, false);
        }
        assert_eq!(b.state(t0), BreakerState::Open);
        assert!(matches!(b.admit(t0).0, Admission::Refuse { .. }));
        let s = b.stats(t0);
        assert_eq!((s.state, s.failures), (BreakerState::Open, 5));
        assert_eq!(s.retry_in_ms, Some(30_000));
    }

    /// What the test below does at each step.
    #[derive(Clone, Debug)]
    enum Step {
        Wait(u64),
        Admit,
        Ok,
        Fail,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u64..40_000).prop_map(Step::Wait),
            Just(Step::Admit),
            Just(Step::Ok),
            Just(Step::Fail),
        ]
    }

    proptest! {
        #[test]
        fn it_keeps_its_promises(
            failures in 1u32..6,
            half_open_calls in 1u32..4,
            steps in proptest::collection::vec(step(), 0..200),
        ) {
            let p = BreakerPolicy {
                failures,
                window: Duration::from_secs(10),
                open_for: Duration::from_secs(5),
                half_open_calls,
            };
            let t0 = Instant::now();
            let mut now = t0;
            let mut b = Breaker::new(p.clone());
            // The half-open round as the tests see it: when it started, trials let through.
            let mut round = (t0, 0u32);
            for s in steps {
                let before = b.state(now);
                match s {
                    Step::Wait(ms) => now += Duration::from_millis(ms),
                    Step::Admit => {
                        let (a, t) = b.admit(now);
                        match before {
                            BreakerState::Closed => prop_assert_eq!(a, Admission::Admit),
                            BreakerState::Open => {
                                let waits = matches!(a, Admission::Refuse { retry_after } if retry_after <= p.open_for);
                                prop_assert!(waits, "an open breaker refuses, for at most open_for");
                            }
                            BreakerState::HalfOpen if t == Some(Transition::HalfOpened) => {
                                prop_assert_eq!(a, Admission::Admit);
                                round = (now, 1);
                            }
                            BreakerState::HalfOpen => match a {
                                Admission::Admit if round.1 < half_open_calls => round.1 += 1,
                                Admission::Admit => {
                                    prop_assert!(now >= round.0 + p.open_for, "a new round only after open_for");
                                    round = (now, 1);
                                }
                                Admission::Refuse { retry_after } => {
                                    prop_assert!(round.1 >= half_open_calls, "refused with trials left");
                                    prop_assert!(retry_after <= HALF_OPEN_RETRY);
                                }
                            },
                        }
                    }
                    Step::Ok | Step::Fail => {
                        let ok = matches!(s, Step::Ok);
                        let t = b.record(now, ok);
                        match t {
                            Some(Transition::Opened { until, .. }) => {
                                prop_assert!(!ok, "only a failure opens it");
                                prop_assert_eq!(until, now + p.open_for);
                            }
                            Some(Transition::Closed) => {
                                prop_assert!(ok && before == BreakerState::HalfOpen);
                            }
                            Some(Transition::HalfOpened) => prop_assert!(false, "only admit half-opens"),
                            None => {}
                        }
                        if before == BreakerState::Open {
                            prop_assert!(t.is_none(), "an open breaker ignores outcomes");
                        }
                    }
                }
                // Never more failures remembered than it takes to open.
                prop_assert!(b.failures(now) <= p.failures);
            }
        }
    }
}
