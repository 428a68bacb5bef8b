//! Slots: how many operations of a type may wait, and how many may run on the node.
//!
//! At the door, an operation takes a `QueueSlot` of its type (one atomic add; a full
//! queue refuses it with `SubmitError::Overloaded`, a 429). Its
//! [`Reply`](crate::job::Reply) holds the slot until the Scheduler hands the operation to
//! the Executor, or until it completes first (answered from the cache, expired in the
//! queue, forwarded and answered by its owner, dropped with an actor that stopped): the
//! slot is given back on the way out whichever way that is, and only once.
//!
//! Running slots belong to the Scheduler: it alone takes them, up to `max_concurrent`,
//! wrapping each batch it starts in a [`Started`] that carries them to the Executor. Each
//! operation then holds a `RunningSlot` while its handler runs and gives it back as it
//! finishes, waking the Scheduler if it waits for one. A batch lost on the way (the
//! Executor stopped) gives its slots back too. [`RunningSlots`] counts them; readers
//! (`/v1/metrics`, `/metrics`) see the count through `Node::running`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::counter::Anchor;
use crate::handler::TypeEntry;
use crate::job::Job;
use crate::shared::NodeShared;

/// One slot of a type's queue, taken at admission and given back once: by
/// [`release`](Self::release) / [`release_all`](Self::release_all) when the operation
/// leaves the queue, or on drop. It also keeps the type's entry (its counters) for the
/// operation's whole life.
pub(crate) struct QueueSlot {
    entry: Anchor<TypeEntry>,
    held: bool,
}

impl QueueSlot {
    /// Takes a slot of `entry`'s queue, unless `capacity` are taken already.
    pub(crate) fn try_take(entry: Anchor<TypeEntry>, capacity: usize) -> Option<QueueSlot> {
        // Built only once the reservation holds: a slot dropped unreserved would give
        // back one it never took.
        if entry.try_reserve(capacity) {
            Some(QueueSlot { entry, held: true })
        } else {
            None
        }
    }

    /// The type of the operation that holds the slot.
    pub(crate) fn entry(&self) -> &Arc<TypeEntry> {
        &self.entry.0
    }

    /// Whether the slot is still taken.
    #[cfg(test)]
    fn is_held(&self) -> bool {
        self.held
    }

    /// Gives the slot back, if still taken.
    pub(crate) fn release(&mut self) {
        if std::mem::replace(&mut self.held, false) {
            self.entry.release(1);
        }
    }

    /// Gives back every slot of `slots` still taken, with one atomic operation per run of
    /// slots of the same type (a batch is all of one type: one in all).
    pub(crate) fn release_all<'a>(slots: impl IntoIterator<Item = &'a mut QueueSlot>) {
        let mut pending: Option<(&'a TypeEntry, usize)> = None;
        for slot in slots {
            if !std::mem::replace(&mut slot.held, false) {
                continue;
            }
            let slot: &'a QueueSlot = slot;
            let entry: &'a TypeEntry = &slot.entry.0;
            match &mut pending {
                Some((e, n)) if std::ptr::eq(*e, entry) => *n += 1,
                _ => {
                    if let Some((e, n)) = pending.replace((entry, 1)) {
                        e.release(n);
                    }
                }
            }
        }
        if let Some((e, n)) = pending {
            e.release(n);
        }
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.release();
    }
}

/// The node's running operations: taken by the Schedulers (one per shard), given back by
/// each operation as its handler finishes.
pub struct RunningSlots {
    running: AtomicUsize,
    /// Per shard: its Scheduler waits for a slot, and the next one given back wakes it.
    wanted: Box<[AtomicBool]>,
    /// How many of `wanted` are set: the hot path reads this one counter only.
    waiting: AtomicUsize,
}

impl RunningSlots {
    /// For a node of `shards` Schedulers.
    pub(crate) fn new(shards: usize) -> Self {
        RunningSlots {
            running: AtomicUsize::new(0),
            wanted: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Operations whose handler runs now (or that are on their way to the Executor).
    pub fn count(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// Takes up to `want` slots without ever letting more than `max` run; returns how
    /// many it took. Schedulers of several shards take from the one count at once: the
    /// check and the take are one atomic step.
    pub(crate) fn try_take(&self, want: usize, max: usize) -> usize {
        let mut now = self.running.load(Ordering::Acquire);
        loop {
            let n = want.min(max.saturating_sub(now));
            if n == 0 {
                return 0;
            }
            match self.running.compare_exchange_weak(
                now,
                now + n,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return n,
                Err(current) => now = current,
            }
        }
    }

    /// The Scheduler of `shard` has work that waits only for a slot: the next slot given
    /// back wakes it. Returns whether fewer than `max` run now (a slot was given back
    /// before the flag was seen: the Scheduler looks again at once).
    pub(crate) fn want(&self, shard: usize, max: usize) -> bool {
        // SeqCst with `give_back`: either it sees the flag, or this sees its slot.
        if !self.wanted[shard].swap(true, Ordering::SeqCst) {
            self.waiting.fetch_add(1, Ordering::SeqCst);
        }
        self.running.load(Ordering::SeqCst) < max
    }

    /// Gives back `n` slots and calls `wake` with each shard whose Scheduler waits for
    /// one. The flags are only read, not written, while nobody waits.
    pub(crate) fn give_back(&self, n: usize, mut wake: impl FnMut(usize)) {
        self.running.fetch_sub(n, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) == 0 {
            return;
        }
        for (shard, flag) in self.wanted.iter().enumerate() {
            if flag.load(Ordering::SeqCst) && flag.swap(false, Ordering::SeqCst) {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                wake(shard);
            }
        }
    }
}

/// A batch the Scheduler started: each of its operations holds a running slot. The
/// Executor turns it into one `RunningSlot` per operation (`run`); a batch
/// dropped before that (its message lost with a stopped Executor) gives its slots back.
pub struct Started {
    jobs: Vec<Box<Job>>,
}

impl Started {
    /// `jobs`, each holding a running slot the Scheduler has taken already
    /// ([`RunningSlots::try_take`]). Only the Scheduler calls this.
    pub(crate) fn taken(jobs: Vec<Box<Job>>) -> Started {
        Started { jobs }
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    pub fn first(&self) -> Option<&Job> {
        self.jobs.first().map(|j| &**j)
    }

    /// Splits off the operations from `at` on, with their slots.
    pub(crate) fn split_off(&mut self, at: usize) -> Started {
        Started {
            jobs: self.jobs.split_off(at),
        }
    }

    /// Each operation with its running slot, which goes back through `returns`.
    /// Operations the iterator did not yield when it is dropped give their slots back.
    pub(crate) fn run<'a>(mut self, returns: &'a SlotReturns<'a>) -> StartedIter<'a> {
        StartedIter {
            jobs: std::mem::take(&mut self.jobs).into_iter(),
            returns,
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(first) = self.jobs.first() {
            first.reply.shared.running_slots_freed(self.jobs.len());
        }
    }
}

/// The operations of a [`Started`] batch, each with its [`RunningSlot`].
pub(crate) struct StartedIter<'a> {
    jobs: std::vec::IntoIter<Box<Job>>,
    returns: &'a SlotReturns<'a>,
}

impl<'a> Iterator for StartedIter<'a> {
    type Item = (Box<Job>, RunningSlot<'a>);
    fn next(&mut self) -> Option<Self::Item> {
        let job = self.jobs.next()?;
        Some((
            job,
            RunningSlot {
                returns: self.returns,
            },
        ))
    }
}

impl Drop for StartedIter<'_> {
    fn drop(&mut self) {
        let left = self.jobs.len();
        if left > 0 {
            self.returns.shared.running_slots_freed(left);
        }
    }
}

/// Running slots given back by the operations of one Executor task, handed to the node
/// together: by [`flush`](Self::flush) (the task calls it whenever it waits) or on drop.
/// One atomic operation on the node's running count per wake-up of the task, instead of
/// one per operation.
pub(crate) struct SlotReturns<'a> {
    shared: &'a NodeShared,
    /// Only this task counts here (atomic only so the task's future may be `Send`).
    pending: AtomicUsize,
}

impl<'a> SlotReturns<'a> {
    pub(crate) fn new(shared: &'a NodeShared) -> Self {
        SlotReturns {
            shared,
            pending: AtomicUsize::new(0),
        }
    }

    /// Gives the slots collected so far back to the node.
    pub(crate) fn flush(&self) {
        let n = self.pending.swap(0, Ordering::Relaxed);
        if n > 0 {
            self.shared.running_slots_freed(n);
        }
    }
}

impl Drop for SlotReturns<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}

/// One running slot, held while an operation's handler runs; given back on drop (the
/// handler finished, or the node abandoned it at the end of the grace period) to its
/// task's [`SlotReturns`].
pub(crate) struct RunningSlot<'a> {
    returns: &'a SlotReturns<'a>,
}

impl Drop for RunningSlot<'_> {
    fn drop(&mut self) {
        self.returns.pending.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counter::StripedArc;
    use crate::handler::{HandlerKind, RetryPolicy};
    use proptest::prelude::*;

    fn entry(name: &str) -> StripedArc<TypeEntry> {
        StripedArc::new(Arc::new(TypeEntry::new(
            name.into(),
            HandlerKind::Remote,
            RetryPolicy::default(),
        )))
    }

    #[test]
    fn a_queue_slot_is_given_back_once_whichever_way_it_goes() {
        let e = entry("t");
        let mut a = QueueSlot::try_take(e.anchor(), 3).unwrap();
        let b = QueueSlot::try_take(e.anchor(), 3).unwrap();
        let c = QueueSlot::try_take(e.anchor(), 3).unwrap();
        assert!(QueueSlot::try_take(e.anchor(), 3).is_none(), "full");
        assert_eq!(e.queued(), 3);
        a.release();
        a.release();
        assert!(!a.is_held());
        assert_eq!(e.queued(), 2);
        drop(a);
        assert_eq!(e.queued(), 2, "released, then dropped: counted once");
        drop(b);
        assert_eq!(e.queued(), 1, "dropped while held");
        let mut c = [c];
        QueueSlot::release_all(c.iter_mut());
        QueueSlot::release_all(c.iter_mut());
        assert_eq!(e.queued(), 0);
        drop(c);
        assert_eq!(e.queued(), 0);
    }

    #[test]
    fn release_all_counts_each_type_apart() {
        let (x, y) = (entry("x"), entry("y"));
        let mut slots: Vec<QueueSlot> = [&x, &x, &y, &x, &y]
            .into_iter()
            .map(|e| QueueSlot::try_take(e.anchor(), 10).unwrap())
            .collect();
        slots[1].release();
        assert_eq!((x.queued(), y.queued()), (2, 2));
        QueueSlot::release_all(slots.iter_mut());
        assert_eq!((x.queued(), y.queued()), (0, 0));
        drop(slots);
        assert_eq!((x.queued(), y.queued()), (0, 0));
    }

    #[test]
    fn slots_are_never_taken_beyond_the_maximum() {
        let r = RunningSlots::new(1);
        assert_eq!(r.try_take(5, 8), 5);
        assert_eq!(r.try_take(5, 8), 3, "only what is left");
        assert_eq!(r.try_take(1, 8), 0);
        r.give_back(2, |_| {});
        assert_eq!(r.try_take(0, 8), 0);
        assert_eq!(r.try_take(9, 8), 2);
        assert_eq!(r.count(), 8);
        // Several takers at once never pass the maximum together.
        let r = std::sync::Arc::new(RunningSlots::new(1));
        let takers: Vec<_> = (0..4)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || (0..1000).map(|_| r.try_take(3, 100)).sum::<usize>())
            })
            .collect();
        let taken: usize = takers.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(taken, 100);
        assert_eq!(r.count(), 100);
    }

    #[test]
    fn running_slots_wake_each_waiting_scheduler_once() {
        let r = RunningSlots::new(3);
        let woken = |r: &RunningSlots, n| {
            let mut v = Vec::new();
            r.give_back(n, |s| v.push(s));
            v
        };
        assert_eq!(r.try_take(4, 100), 4);
        assert_eq!(r.count(), 4);
        assert_eq!(woken(&r, 1), Vec::<usize>::new(), "nobody waits");
        assert!(!r.want(2, 3), "three run, three allowed");
        assert!(!r.want(0, 3));
        assert!(!r.want(0, 3), "asking twice counts once");
        assert_eq!(woken(&r, 1), vec![0, 2], "the first slot back wakes both");
        assert_eq!(woken(&r, 1), Vec::<usize>::new(), "once");
        assert_eq!(r.waiting.load(Ordering::SeqCst), 0);
        assert_eq!(r.count(), 1);
        assert!(r.want(1, 2));
    }

    async fn node_with_jobs(n: usize) -> (crate::Node, Vec<Box<Job>>) {
        let node = crate::Node::builder()
            .handler("t", |op: crate::Operation| async move { Ok(op.payload) })
            .start()
            .await
            .unwrap();
        let jobs = (0..n)
            .map(|_| node.admit_for_test(crate::Operation::new("t", crate::Json::null())))
            .collect();
        (node, jobs)
    }

    #[tokio::test]
    async fn a_started_batch_gives_its_running_slots_back_however_it_ends() {
        let (node, mut jobs) = node_with_jobs(6).await;
        let shared = node.shared().clone();
        let running = shared.running();
        // Lost on the way to the Executor.
        assert_eq!(running.try_take(2, 10), 2);
        let lost = Started::taken(jobs.drain(..2).collect());
        assert_eq!(running.count(), 2);
        drop(lost);
        assert_eq!(running.count(), 0);
        // Split, then partly run: each slot is given back once.
        assert_eq!(running.try_take(4, 10), 4);
        let mut batch = Started::taken(jobs);
        let rest = batch.split_off(2);
        assert_eq!((batch.len(), rest.len(), running.count()), (2, 2, 4));
        drop(rest);
        assert_eq!(running.count(), 2);
        let returns = SlotReturns::new(&shared);
        let mut each = batch.run(&returns);
        let (_job, slot) = each.next().unwrap();
        assert_eq!(running.count(), 2);
        drop(each);
        assert_eq!(running.count(), 1, "the one not yet taken out went back");
        drop(slot);
        assert_eq!(
            running.count(),
            1,
            "a finished one waits for its task's flush"
        );
        returns.flush();
        assert_eq!(running.count(), 0);
        // Whatever was not flushed goes back when the task ends.
        assert_eq!(running.try_take(1, 10), 1);
        let (_job, slot) = Started::taken(vec![
            node.admit_for_test(crate::Operation::new("t", crate::Json::null()))
        ])
        .run(&returns)
        .next()
        .unwrap();
        assert_eq!(running.count(), 1);
        drop(slot);
        drop(returns);
        assert_eq!(running.count(), 0);
        node.shutdown(std::time::Duration::from_secs(1)).await;
        assert_eq!(node.running(), 0);
    }

    /// What a random sequence of admissions, releases and drops does to one type.
    #[derive(Debug, Clone)]
    enum Step {
        Admit,
        Release(usize),
        ReleaseAll,
        Drop(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => Just(Step::Admit),
            2 => any::<usize>().prop_map(Step::Release),
            1 => Just(Step::ReleaseAll),
            2 => any::<usize>().prop_map(Step::Drop),
        ]
    }

    proptest! {
        #[test]
        fn queue_slots_never_exceed_capacity_nor_leak(
            cap in 0usize..8,
            steps in proptest::collection::vec(step(), 0..100),
        ) {
            let e = entry("t");
            let mut slots: Vec<QueueSlot> = Vec::new();
            for s in steps {
                match s {
                    Step::Admit => {
                        let before = e.queued();
                        match QueueSlot::try_take(e.anchor(), cap) {
                            Some(slot) => slots.push(slot),
                            None => prop_assert_eq!(before, cap),
                        }
                    }
                    Step::Release(i) if !slots.is_empty() => {
                        let n = slots.len();
                        slots[i % n].release()
                    }
                    Step::ReleaseAll => QueueSlot::release_all(slots.iter_mut()),
                    Step::Drop(i) if !slots.is_empty() => {
                        let n = slots.len();
                        slots.swap_remove(i % n);
                    }
                    _ => {}
                }
                prop_assert!(e.queued() <= cap);
                let held = slots.iter().filter(|s| s.is_held()).count();
                prop_assert_eq!(e.queued(), held);
            }
            drop(slots);
            prop_assert_eq!(e.queued(), 0);
        }
    }
}
