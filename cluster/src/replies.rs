//! The owner's side of replies: what a node that runs operations for another node (their
//! origin) keeps so that each outcome reaches the origin once, and each operation runs
//! once, across link breaks.
//!
//! Every batch of outcomes sent back carries a sequence number and stays in the origin's
//! [`Ledger`] until the origin acknowledges that number (`ReplyAck`). A batch not
//! acknowledged within a while is sent again (the reply or its acknowledgement was lost
//! with a link): the origin completes what it still waits for, ignores the rest and
//! acknowledges either way. The ledger also knows every operation of that origin that is
//! running here or answered and not yet acknowledged, so an operation the origin sends
//! again (it re-sends what still waits when its link comes back) is not run twice: one
//! still running is left to finish, one answered gets its batch again.
//!
//! The batches held are bounded in bytes (`cluster.reply_buffer_bytes` per origin); past
//! it the oldest are dropped and counted. The ids of their operations are remembered (a
//! bounded number of them), so a repeat is not run again blindly: an operation with an
//! idempotency key runs again and is answered from the idempotency cache, one without
//! fails with a reason that says its reply was dropped.
//!
//! Everything here is a plain struct driven by its caller, with time as an input.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::codec::EncodedReplies;

/// Most ids of operations whose reply was dropped that a ledger remembers.
const MAX_DROPPED_IDS: usize = 100_000;

/// Hashes an operation id by folding its two halves: ids are random (UUIDv4) and come
/// from authenticated nodes (or this one), so SipHash's defence against chosen keys buys
/// nothing on maps touched for every forwarded operation (the ledger here, the origin's
/// [`Outbox`](crate::remote::Outbox)).
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0 ^ u64::from_le_bytes(word)).rotate_left(29);
        }
    }

    fn write_u128(&mut self, id: u128) {
        self.0 = (id as u64) ^ ((id >> 64) as u64);
    }
}

/// A map keyed by operation id, hashed with [`IdHasher`].
pub(crate) type Ids<V> = HashMap<u128, V, BuildHasherDefault<IdHasher>>;

/// One origin's replies that are not acknowledged yet, and its operations here.
#[derive(Debug, Default)]
pub struct Ledger {
    next_seq: u64,
    unacked: BTreeMap<u64, Pending>,
    /// The bytes of `unacked`.
    bytes: usize,
    ops: Ids<OpState>,
    /// Ids whose reply was dropped, oldest first (at most [`MAX_DROPPED_IDS`]).
    dropped_ids: VecDeque<u128>,
}

#[derive(Debug)]
struct Pending {
    replies: Arc<EncodedReplies>,
    bytes: usize,
    sent: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpState {
    Running,
    /// Answered in the batch with this sequence number, not acknowledged yet.
    Answered(u64),
    /// Answered, but the batch was dropped before the origin acknowledged it.
    Dropped,
}

/// What to do with an operation an origin sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// New here: run it.
    Run,
    /// Already running here: its reply will come; nothing to do.
    Running,
    /// Answered in batch `seq`, not acknowledged: send that batch again.
    Answered(u64),
    /// Answered, but its reply was dropped (the ledger was full).
    Dropped,
}

/// A batch to send to the origin.
#[derive(Debug, Clone)]
pub struct Batch {
    pub seq: u64,
    pub replies: Arc<EncodedReplies>,
}

impl Ledger {
    /// Decides what to do with operation `id` the origin sent. A new one (or a dropped
    /// one that `rerun_dropped` says to run again) is noted as running.
    pub fn admit(&mut self, id: u128, rerun_dropped: bool) -> Admit {
        // One lookup per operation (the map holds every operation running or answered
        // and not acknowledged: a probe is a likely cache miss).
        match self.ops.entry(id) {
            Entry::Vacant(v) => {
                v.insert(OpState::Running);
                Admit::Run
            }
            Entry::Occupied(mut o) => match *o.get() {
                OpState::Running => Admit::Running,
                OpState::Answered(seq) => Admit::Answered(seq),
                OpState::Dropped if rerun_dropped => {
                    o.insert(OpState::Running);
                    Admit::Run
                }
                OpState::Dropped => Admit::Dropped,
            },
        }
    }

    /// Takes `replies` (outcomes of operations of this origin) as the next batch, kept
    /// until acknowledged, and answers it with how many older replies were dropped to stay
    /// within `budget` bytes. The batch itself is always returned to be sent once, even
    /// when it alone is over the budget (it is then not kept).
    pub fn answered(
        &mut self,
        replies: EncodedReplies,
        now: Instant,
        budget: usize,
    ) -> (Batch, usize) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let bytes = replies.bytes();
        for &id in replies.ids() {
            self.ops.insert(id, OpState::Answered(seq));
        }
        let replies = Arc::new(replies);
        self.unacked.insert(
            seq,
            Pending {
                replies: replies.clone(),
                bytes,
                sent: now,
            },
        );
        self.bytes += bytes;
        let mut dropped = 0;
        while self.bytes > budget {
            let Some((_, oldest)) = self.unacked.pop_first() else {
                break;
            };
            self.bytes -= oldest.bytes;
            dropped += oldest.replies.len();
            for &id in oldest.replies.ids() {
                self.ops.insert(id, OpState::Dropped);
                self.dropped_ids.push_back(id);
            }
        }
        while self.dropped_ids.len() > MAX_DROPPED_IDS {
            if let Some(id) = self.dropped_ids.pop_front() {
                if self.ops.get(&id) == Some(&OpState::Dropped) {
                    self.ops.remove(&id);
                }
            }
        }
        (Batch { seq, replies }, dropped)
    }

    /// The origin acknowledged batch `seq`: forget it and its operations.
    pub fn acked(&mut self, seq: u64) {
        let Some(p) = self.unacked.remove(&seq) else {
            return;
        };
        self.bytes -= p.bytes;
        for &id in p.replies.ids() {
            if let Entry::Occupied(o) = self.ops.entry(id) {
                if *o.get() == OpState::Answered(seq) {
                    o.remove();
                }
            }
        }
    }

    /// Batch `seq` again, if it is still held (to send it again now).
    pub fn batch(&mut self, seq: u64, now: Instant) -> Option<Batch> {
        let p = self.unacked.get_mut(&seq)?;
        p.sent = now;
        Some(Batch {
            seq,
            replies: p.replies.clone(),
        })
    }

    /// The batches sent more than `after` ago and not acknowledged since, oldest first,
    /// noted as sent again now. `Duration::ZERO`: every batch held (a link came back).
    pub fn due(&mut self, now: Instant, after: Duration) -> Vec<Batch> {
        self.unacked
            .iter_mut()
            .filter(|(_, p)| now.saturating_duration_since(p.sent) >= after)
            .map(|(seq, p)| {
                p.sent = now;
                Batch {
                    seq: *seq,
                    replies: p.replies.clone(),
                }
            })
            .collect()
    }

    /// Replies and bytes held, not acknowledged.
    pub fn held(&self) -> (usize, usize) {
        let replies = self.unacked.values().map(|p| p.replies.len()).sum();
        (replies, self.bytes)
    }

    /// Whether the ledger can be forgotten once its origin is no longer a member: it
    /// holds no batch sent within `keep` and runs nothing for it.
    pub fn is_stale(&self, now: Instant, keep: Duration) -> bool {
        let recent = self
            .unacked
            .values()
            .any(|p| now.saturating_duration_since(p.sent) < keep);
        !recent && !self.ops.values().any(|s| *s == OpState::Running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::codec::WireReply;

    fn wire(id: u128, result: usize) -> WireReply {
        WireReply {
            id,
            status: 2,
            result: Some(vec![b'x'; result].into()),
            error: None,
            cached: false,
            attempts: 1,
        }
    }

    /// A batch of `replies` (id, result bytes).
    fn batch(replies: &[(u128, usize)]) -> EncodedReplies {
        let wires: Vec<WireReply> = replies.iter().map(|&(id, n)| wire(id, n)).collect();
        wires.iter().map(WireReply::fields).collect()
    }

    /// The bytes one reply with `result` bytes of result takes.
    fn size(result: usize) -> usize {
        batch(&[(0, result)]).bytes()
    }

    const BIG: usize = usize::MAX;

    #[test]
    fn an_operation_runs_once_while_it_runs_or_waits_for_its_acknowledgement() {
        let mut l = Ledger::default();
        let t = Instant::now();
        assert_eq!(l.admit(1, false), Admit::Run);
        assert_eq!(
            l.admit(1, false),
            Admit::Running,
            "sent again while running"
        );
        let (b, dropped) = l.answered(batch(&[(1, 10)]), t, BIG);
        assert_eq!((b.seq, dropped), (0, 0));
        assert_eq!(
            l.admit(1, false),
            Admit::Answered(0),
            "sent again before the ack"
        );
        let again = l.batch(0, t).expect("still held");
        assert_eq!(again.replies.ids()[0], 1);
        l.acked(0);
        assert_eq!(l.held(), (0, 0));
        assert!(l.is_stale(t, Duration::from_secs(60)));
        // Acknowledged: the origin has its outcome and no longer asks; a later send of
        // the same id is a new operation as far as the ledger knows.
        assert_eq!(l.admit(1, false), Admit::Run);
    }

    #[test]
    fn unacknowledged_batches_are_due_again_after_the_wait_and_all_of_them_when_asked() {
        let mut l = Ledger::default();
        let t = Instant::now();
        for id in 0..3 {
            l.admit(id, false);
        }
        l.answered(batch(&[(0, 1), (1, 1)]), t, BIG);
        l.answered(batch(&[(2, 1)]), t + Duration::from_secs(1), BIG);
        let wait = Duration::from_secs(2);
        assert!(l.due(t + Duration::from_millis(1500), wait).is_empty());
        let due = l.due(t + Duration::from_secs(2), wait);
        assert_eq!(due.iter().map(|b| b.seq).collect::<Vec<_>>(), [0]);
        // Sent again just now: not due again until the wait passed once more.
        assert_eq!(
            l.due(t + Duration::from_secs(3), wait)
                .iter()
                .map(|b| b.seq)
                .collect::<Vec<_>>(),
            [1]
        );
        l.acked(1);
        let all = l.due(t + Duration::from_secs(3), Duration::ZERO);
        assert_eq!(all.iter().map(|b| b.seq).collect::<Vec<_>>(), [0]);
        assert_eq!(l.held(), (2, 2 * size(1)));
    }

    #[test]
    fn past_the_budget_the_oldest_batches_go_and_their_operations_are_not_run_blindly() {
        let mut l = Ledger::default();
        let t = Instant::now();
        let one = size(100);
        for id in 0..4 {
            l.admit(id, false);
        }
        let budget = 2 * one + one / 2;
        assert_eq!(l.answered(batch(&[(0, 100)]), t, budget).1, 0);
        assert_eq!(l.answered(batch(&[(1, 100)]), t, budget).1, 0);
        let (b, dropped) = l.answered(batch(&[(2, 100)]), t, budget);
        assert_eq!((b.seq, dropped), (2, 1));
        assert_eq!(l.held(), (2, 2 * one));
        assert_eq!(l.admit(0, false), Admit::Dropped);
        assert_eq!(
            l.admit(0, true),
            Admit::Run,
            "a keyed one runs again (the cache answers)"
        );
        assert_eq!(l.admit(1, false), Admit::Answered(1));
        // A batch alone over the budget is sent once and not kept.
        let (b, dropped) = l.answered(batch(&[(3, 10 * budget)]), t, budget);
        assert_eq!(b.replies.len(), 1);
        assert_eq!(dropped, 3, "the two older ones and itself");
        assert_eq!(l.held(), (0, 0));
    }

    #[test]
    fn acknowledgements_of_unknown_or_repeated_batches_change_nothing() {
        let mut l = Ledger::default();
        let t = Instant::now();
        l.admit(7, false);
        l.answered(batch(&[(7, 3)]), t, BIG);
        l.acked(41);
        assert_eq!(l.held().0, 1);
        l.acked(0);
        l.acked(0);
        assert_eq!(l.held(), (0, 0));
        assert!(l.batch(0, t).is_none());
    }

    #[test]
    fn an_operation_answered_in_a_newer_batch_is_not_forgotten_with_an_older_ack() {
        let mut l = Ledger::default();
        let t = Instant::now();
        l.admit(1, false);
        l.answered(batch(&[(1, 1)]), t, BIG);
        // Answered again (a re-run after a dropped reply, say) in a later batch.
        l.answered(batch(&[(1, 1)]), t, BIG);
        l.acked(0);
        assert_eq!(l.admit(1, false), Admit::Answered(1));
    }
}
