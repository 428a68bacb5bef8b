//! Back-pressure across nodes: which of this node's operation types it tells the others
//! it is overloaded with.
//!
//! A type's queue over the high watermark (`flow.high`, a fraction of its capacity) turns
//! the type overloaded; it stays so until the queue is under the low watermark
//! (`flow.low`), so the signal does not flap around one level. Every heartbeat (`Ping`
//! and `Pong`) carries the overloaded types; the other nodes then send new operations
//! of those types to another node of the route, or refuse them at their door with 429
//! when there is none (see `RoutingTable::overloaded_owner` in the engine).
//!
//! Heartbeats also carry the types whose circuit breaker is open on the sender, and for
//! how long ([`OpenBreaker`]): the others send new operations of those types to another
//! node of the route, or refuse them at their door with 503 `circuit_open` when there is
//! none (`RoutingTable::open_breaker`), instead of forwarding what the owner would refuse.
//!
//! A plain struct and plain functions: the caller reads the queues and breakers and hands
//! them their levels.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use opmesh_actors::OpType;

use crate::codec::OpenBreaker;

/// Open breakers (type, open until) as a heartbeat sent at `now` carries them.
pub fn breakers_to_wire(open: &[(OpType, Instant)], now: Instant) -> Vec<OpenBreaker> {
    open.iter()
        .filter(|(_, until)| *until > now)
        .map(|(t, until)| OpenBreaker {
            op_type: t.to_string(),
            // Rounded up: never reads as closed before it is.
            open_ms: (*until - now).as_nanos().div_ceil(1_000_000) as u64,
        })
        .collect()
}

/// Open breakers from a heartbeat received at `now` (the time on the link, a fraction of
/// a heartbeat, counts as open).
pub fn breakers_from_wire(open: Vec<OpenBreaker>, now: Instant) -> Vec<(OpType, Instant)> {
    open.into_iter()
        .map(|b| {
            // A lying or broken peer cannot make `now + open_ms` overflow.
            let until = now
                .checked_add(Duration::from_millis(b.open_ms.min(86_400_000)))
                .unwrap_or(now);
            (OpType::from(b.op_type), until)
        })
        .collect()
}

/// Whether two lists of open breakers say the same: the same types, open until within
/// `slack` of each other (heartbeats of one open breaker differ by their time on the link).
pub fn same_breakers(a: &[(OpType, Instant)], b: &[(OpType, Instant)], slack: Duration) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((ta, ua), (tb, ub))| {
            ta == tb && ua.max(ub).saturating_duration_since(*ua.min(ub)) <= slack
        })
}

/// The watermarks and the queues over them.
#[derive(Debug, Clone)]
pub struct Flow {
    high: f64,
    low: f64,
    /// What the queues are: types' queues or links' outboxes (for the logs).
    links: bool,
    overloaded: BTreeSet<String>,
}

impl Flow {
    /// The queues of this node's types. `high` and `low` are fractions of a queue's
    /// capacity, `0 <= low < high <= 1`.
    pub fn new(high: f64, low: f64) -> Flow {
        Flow {
            high,
            low,
            links: false,
            overloaded: BTreeSet::new(),
        }
    }

    /// The outboxes of this node's links, by peer, against `cluster.link_buffer_bytes`:
    /// a peer over `high` is congested (this node sends it no new operations while
    /// another node of their route can take them) until its link is under `low`.
    pub fn links(high: f64, low: f64) -> Flow {
        Flow {
            links: true,
            ..Flow::new(high, low)
        }
    }

    /// Marks `name` over its high watermark now (its queue was found full between two
    /// updates); it stays so until an update finds it under the low one. Answers the
    /// names over the high watermark.
    pub fn mark(&mut self, name: &str) -> Vec<String> {
        if self.overloaded.insert(name.to_owned()) {
            tracing::warn!(name, "{} full", if self.links { "link" } else { "queue" });
        }
        self.overloaded.iter().cloned().collect()
    }

    /// Takes the level of every queue (type, operations queued, capacity) and answers
    /// the types overloaded now. A type not listed is no longer overloaded.
    pub fn update<'a>(
        &mut self,
        queues: impl IntoIterator<Item = (&'a str, usize, usize)>,
    ) -> Vec<String> {
        let mut now = BTreeSet::new();
        for (op_type, queued, capacity) in queues {
            let fill = queued as f64 / capacity.max(1) as f64;
            let was = self.overloaded.contains(op_type);
            if fill >= self.high || (was && fill > self.low) {
                now.insert(op_type.to_owned());
            }
        }
        for t in now.difference(&self.overloaded) {
            if self.links {
                tracing::warn!(peer = %t, high = self.high,
                    "link over its high watermark (flow.high of cluster.link_buffer_bytes unsent): new operations go to other nodes or are refused");
            } else {
                tracing::warn!(op_type = %t, high = self.high,
                    "queue over its high watermark (flow.high): other nodes send this type elsewhere or refuse it");
            }
        }
        for t in self.overloaded.difference(&now) {
            if self.links {
                tracing::info!(peer = %t, low = self.low, "link back under its low watermark (flow.low)");
            } else {
                tracing::info!(op_type = %t, low = self.low, "queue back under its low watermark (flow.low)");
            }
        }
        self.overloaded = now;
        self.overloaded.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_type_is_overloaded_from_the_high_watermark_until_under_the_low_one() {
        let mut f = Flow::new(0.8, 0.2);
        let level = |f: &mut Flow, q| f.update([("a", q, 100), ("b", 0, 100)]);
        assert!(level(&mut f, 79).is_empty());
        assert_eq!(level(&mut f, 80), ["a"]);
        assert_eq!(level(&mut f, 50), ["a"], "between the marks: stays");
        assert_eq!(level(&mut f, 21), ["a"]);
        assert!(level(&mut f, 20).is_empty(), "at the low mark: cleared");
        assert_eq!(f.mark("a"), ["a"], "found full between updates");
        assert_eq!(level(&mut f, 50), ["a"], "between the marks: stays");
        assert!(level(&mut f, 20).is_empty());
        assert!(
            level(&mut f, 50).is_empty(),
            "between the marks: stays clear"
        );
        assert_eq!(level(&mut f, 100), ["a"]);
        // A type whose queue is gone (its handler removed) is no longer reported.
        assert!(f.update([("b", 0, 100)]).is_empty());
    }

    #[test]
    fn open_breakers_cross_a_heartbeat_with_their_remaining_time() {
        let t0 = Instant::now();
        let open = vec![
            (OpType::from("hook"), t0 + Duration::from_millis(1500)),
            (OpType::from("gone"), t0 - Duration::from_millis(1)),
        ];
        let wire = breakers_to_wire(&open, t0);
        assert_eq!(
            wire,
            [OpenBreaker {
                op_type: "hook".into(),
                open_ms: 1500
            }],
            "a breaker whose time is up is not sent"
        );
        let t1 = t0 + Duration::from_millis(3);
        let back = breakers_from_wire(wire, t1);
        assert_eq!(&*back[0].0, "hook");
        assert_eq!(back[0].1, t1 + Duration::from_millis(1500));
        let mine = &open[..1];
        assert!(same_breakers(&back, mine, Duration::from_millis(5)));
        assert!(!same_breakers(&back, mine, Duration::from_millis(1)));
        assert!(!same_breakers(&back, &[], Duration::from_secs(1)));
        // A huge remaining time is capped at a day, not an overflow.
        let far = breakers_from_wire(
            vec![OpenBreaker {
                op_type: "x".into(),
                open_ms: u64::MAX,
            }],
            t0,
        );
        assert_eq!(far[0].1, t0 + Duration::from_secs(86_400));
    }

    #[test]
    fn a_zero_capacity_does_not_divide_by_zero() {
        let mut f = Flow::new(0.8, 0.2);
        assert_eq!(f.update([("a", 1, 0)]), ["a"]);
        assert!(f.update([("a", 0, 0)]).is_empty());
    }
}
