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
//! A plain struct: its caller reads the queues and hands it their levels.

use std::collections::BTreeSet;

/// The watermarks and the types over them.
#[derive(Debug, Clone)]
pub struct Flow {
    high: f64,
    low: f64,
    overloaded: BTreeSet<String>,
}

impl Flow {
    /// `high` and `low` are fractions of a queue's capacity, `0 <= low < high <= 1`.
    pub fn new(high: f64, low: f64) -> Flow {
        Flow {
            high,
            low,
            overloaded: BTreeSet::new(),
        }
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
        let changed = now != self.overloaded;
        if changed {
            for t in now.difference(&self.overloaded) {
                tracing::warn!(op_type = %t, high = self.high,
                    "queue over its high watermark (flow.high): other nodes send this type elsewhere or refuse it");
            }
            for t in self.overloaded.difference(&now) {
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
        assert!(
            level(&mut f, 50).is_empty(),
            "between the marks: stays clear"
        );
        assert_eq!(level(&mut f, 100), ["a"]);
        // A type whose queue is gone (its handler removed) is no longer reported.
        assert!(f.update([("b", 0, 100)]).is_empty());
    }

    #[test]
    fn a_zero_capacity_does_not_divide_by_zero() {
        let mut f = Flow::new(0.8, 0.2);
        assert_eq!(f.update([("a", 1, 0)]), ["a"]);
        assert!(f.update([("a", 0, 0)]).is_empty());
    }
}
