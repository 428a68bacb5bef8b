//! Slots: how many operations of a type may wait, and how many may run.
//!
//! At the door, an operation takes a `QueueSlot` of its type (one atomic add; a full
//! queue refuses it with `SubmitError::Overloaded`, a 429). Its
//! [`Reply`](crate::job::Reply) holds the slot until the Scheduler hands the operation to
//! the Executor, or until it completes first (answered from the cache, expired in the
//! queue, forwarded and answered by its owner, dropped with an actor that stopped): the
//! slot is given back on the way out whichever way that is, and only once.
//!
//! Running slots belong to the Schedulers: they alone take them, wrapping each batch
//! they start in a [`Started`] that carries them to the Executor. Each type has its
//! [`RunningSlots`]: its own (`types.<type>.max_concurrent`), or its share of the slots
//! the types without their own share, which it then takes from the node's shared
//! [`RunningSlots`] too (see [`crate::type_limits`]). Each operation then holds a
//! `RunningSlot` while its handler runs and gives it back as it finishes, waking the
//! Schedulers that wait for one. A batch lost on the way (the Executor stopped) gives its
//! slots back too. Readers (`/v1/metrics`, `/metrics`) see the counts through
//! `Node::running` and each type's entry.

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

    /// The type's entry as the slot holds it (a reference counted on the stripe of the
    /// thread that admitted the operation).
    pub(crate) fn anchor(&self) -> &Anchor<TypeEntry> {
        &self.entry
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

/// Running slots of one kind, up to a maximum: a type's, or the node's shared ones.
/// Taken by the Schedulers (one per shard), given back by each operation as its handler
/// finishes. On cache lines of its own (128 bytes, as [`Padded`](crate::counter::Padded)):
/// its counts change with every batch, and the fields beside it (a type's settings, the
/// node's) are read on every submission.
#[repr(align(128))]
pub struct RunningSlots {
    running: AtomicUsize,
    max: usize,
    /// Per shard: its Scheduler waits for a slot, and the next one given back wakes it.
    wanted: Box<[AtomicBool]>,
    /// How many of `wanted` are set: the hot path reads this one counter only.
    waiting: AtomicUsize,
}

impl RunningSlots {
    /// `max` slots, for a node of `shards` Schedulers.
    pub(crate) fn new(shards: usize, max: usize) -> Self {
        RunningSlots {
            running: AtomicUsize::new(0),
            max,
            wanted: (0..shards.max(1)).map(|_| AtomicBool::new(false)).collect(),
            waiting: AtomicUsize::new(0),
        }
    }

    /// Slots taken now: operations whose handler runs (or that are on their way to the
    /// Executor).
    pub fn count(&self) -> usize {
        self.running.load(Ordering::Acquire)
    }

    /// The most that may be taken at once.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Takes up to `want` slots without ever letting more than the maximum be taken;
    /// returns how many it took. Schedulers of several shards take from the one count at
    /// once: the check and the take are one atomic step.
    pub(crate) fn try_take(&self, want: usize) -> usize {
        let mut now = self.running.load(Ordering::Acquire);
        loop {
            let n = want.min(self.max.saturating_sub(now));
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
    /// back wakes it. Returns whether fewer than the maximum are taken now (a slot was
    /// given back before the flag was seen: the Scheduler looks again at once).
    pub(crate) fn want(&self, shard: usize) -> bool {
        // SeqCst with `give_back`: either it sees the flag, or this sees its slot.
        if !self.wanted[shard].swap(true, Ordering::SeqCst) {
            self.waiting.fetch_add(1, Ordering::SeqCst);
        }
        self.running.load(Ordering::SeqCst) < self.max
    }

    /// Takes up to `n` slots for the Scheduler of `shard`; when there are none, asks to
    /// be woken by the next one given back (and takes again if one came back meanwhile).
    fn take_or_wait(&self, n: usize, shard: usize) -> usize {
        loop {
            let got = self.try_take(n);
            if got > 0 || !self.want(shard) {
                return got;
            }
        }
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

/// Takes up to `n` running slots of a type for the Scheduler of `shard`: from `own` (the
/// type's), and from `shared` too when the type has no slots of its own. Returns how many
/// it took; with none, the Scheduler is woken when one it lacked is given back. `wake`
/// wakes the Schedulers that wait for the type's slots, when some taken from `own` go back
/// because `shared` had fewer.
pub(crate) fn take_running(
    own: &RunningSlots,
    shared: Option<&RunningSlots>,
    n: usize,
    shard: usize,
    wake: impl FnMut(usize),
) -> usize {
    let got = own.take_or_wait(n, shard);
    let Some(shared) = shared.filter(|_| got > 0) else {
        return got;
    };
    let granted = shared.take_or_wait(got, shard);
    if granted < got {
        own.give_back(got - granted, wake);
    }
    granted
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
            first
                .reply
                .shared
                .running_slots_freed(first.reply.entry(), self.jobs.len());
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
            self.returns
                .shared
                .running_slots_freed(&self.returns.entry, left);
        }
    }
}

/// Running slots given back by the operations of one Executor task (all of one type: a
/// batch is), handed back together: by [`flush`](Self::flush) (the task calls it
/// whenever it waits) or on drop. One atomic operation on each running count per wake-up
/// of the task, instead of one per operation.
pub(crate) struct SlotReturns<'a> {
    shared: &'a NodeShared,
    /// The type of the task's operations.
    entry: Anchor<TypeEntry>,
    /// Only this task counts here (atomic only so the task's future may be `Send`).
    pending: AtomicUsize,
}

impl<'a> SlotReturns<'a> {
    /// For a task running operations of `entry`'s type.
    pub(crate) fn new(shared: &'a NodeShared, entry: Anchor<TypeEntry>) -> Self {
        SlotReturns {
            shared,
            entry,
            pending: AtomicUsize::new(0),
        }
    }

    /// Gives the slots collected so far back.
    pub(crate) fn flush(&self) {
        let n = self.pending.swap(0, Ordering::Relaxed);
        if n > 0 {
            self.shared.running_slots_freed(&self.entry, n);
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
    use std::sync::atomic::{AtomicUsize, Ordering};

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

    /// With room for many, a thread leases slots from the shared count in blocks; the
    /// limit stays exact: a full queue is refused only when `capacity` operations hold a
    /// slot, whichever threads leased the rest.
    #[test]
    fn leased_slots_keep_the_limit_exact_within_a_thread_and_across_threads() {
        const CAP: usize = 1000;
        let e = entry("t");
        let mut held: Vec<QueueSlot> = (0..CAP)
            .map(|i| QueueSlot::try_take(e.anchor(), CAP).unwrap_or_else(|| panic!("slot {i}")))
            .collect();
        assert!(
            QueueSlot::try_take(e.anchor(), CAP).is_none(),
            "full at {CAP}"
        );
        assert_eq!(e.queued(), CAP);
        held.truncate(CAP - 7);
        assert_eq!(e.queued(), CAP - 7);
        for _ in 0..7 {
            held.push(QueueSlot::try_take(e.anchor(), CAP).expect("a released slot is free again"));
        }
        assert!(QueueSlot::try_take(e.anchor(), CAP).is_none());
        drop(held);
        assert_eq!(e.queued(), 0);

        // Four threads taking and giving back at once: never more than CAP held; every
        // slot comes back.
        let now_held = AtomicUsize::new(0);
        let refused = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (e, now_held, refused) = (&e, &now_held, &refused);
                s.spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..20_000usize {
                        if (i + t) % 5 == 4 {
                            now_held.fetch_sub(mine.len(), Ordering::SeqCst);
                            mine.clear();
                        } else if let Some(slot) = QueueSlot::try_take(e.anchor(), CAP) {
                            let n = now_held.fetch_add(1, Ordering::SeqCst) + 1;
                            assert!(n <= CAP, "{n} slots held, capacity {CAP}");
                            mine.push(slot);
                        } else {
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    now_held.fetch_sub(mine.len(), Ordering::SeqCst);
                });
            }
        });
        assert_eq!(e.queued(), 0);
        // What the threads leased and did not use still counts as free: one thread
        // alone takes all CAP again, and no more.
        let all: Vec<QueueSlot> = (0..CAP)
            .map(|i| QueueSlot::try_take(e.anchor(), CAP).unwrap_or_else(|| panic!("slot {i}")))
            .collect();
        assert!(QueueSlot::try_take(e.anchor(), CAP).is_none());
        drop(all);
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
        let r = RunningSlots::new(1, 8);
        assert_eq!(r.try_take(5), 5);
        assert_eq!(r.try_take(5), 3, "only what is left");
        assert_eq!(r.try_take(1), 0);
        r.give_back(2, |_| {});
        assert_eq!(r.try_take(0), 0);
        assert_eq!(r.try_take(9), 2);
        assert_eq!(r.count(), 8);
        // Several takers at once never pass the maximum together.
        let r = std::sync::Arc::new(RunningSlots::new(1, 100));
        let takers: Vec<_> = (0..4)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || (0..1000).map(|_| r.try_take(3)).sum::<usize>())
            })
            .collect();
        let taken: usize = takers.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(taken, 100);
        assert_eq!(r.count(), 100);
    }

    #[test]
    fn running_slots_wake_each_waiting_scheduler_once() {
        let r = RunningSlots::new(3, 3);
        let woken = |r: &RunningSlots, n| {
            let mut v = Vec::new();
            r.give_back(n, |s| v.push(s));
            v
        };
        assert_eq!(r.try_take(4), 3);
        assert_eq!(r.count(), 3);
        assert!(!r.want(2), "three run, three allowed");
        assert!(!r.want(0));
        assert!(!r.want(0), "asking twice counts once");
        assert_eq!(woken(&r, 1), vec![0, 2], "the first slot back wakes both");
        assert_eq!(woken(&r, 1), Vec::<usize>::new(), "once");
        assert_eq!(r.waiting.load(Ordering::SeqCst), 0);
        assert_eq!(r.count(), 1);
        assert!(r.want(1));
    }

    fn woke(f: impl FnOnce(&mut dyn FnMut(usize))) -> Vec<usize> {
        let mut v = Vec::new();
        f(&mut |s| v.push(s));
        v
    }

    #[test]
    fn a_type_without_its_own_slots_takes_from_its_share_and_the_shared_ones() {
        let (a, b) = (RunningSlots::new(2, 3), RunningSlots::new(2, 3));
        let shared = RunningSlots::new(2, 4);
        let take = |own: &RunningSlots, n, shard| {
            let mut none = |_| {};
            take_running(own, Some(&shared), n, shard, &mut none)
        };
        assert_eq!(take(&a, 10, 0), 3, "a's share");
        assert_eq!(take(&a, 1, 0), 0);
        assert_eq!(take(&b, 10, 1), 1, "what a left of the shared slots");
        assert_eq!((a.count(), b.count(), shared.count()), (3, 1, 4));
        // Both wait now: a on its share, b on the shared slots.
        assert_eq!(take(&b, 1, 1), 0);
        assert_eq!(b.count(), 1, "the slot it took of its share went back");
        assert_eq!(
            woke(|w| a.give_back(1, w)),
            vec![0],
            "a's own slot back wakes a's scheduler"
        );
        assert_eq!(woke(|w| shared.give_back(1, w)), vec![1], "and b's");
        assert_eq!(take(&b, 10, 1), 1);
        assert_eq!((a.count(), b.count(), shared.count()), (2, 2, 4));
        // A type with slots of its own never touches the shared ones.
        let own = RunningSlots::new(2, 5);
        let mut none = |_| {};
        assert_eq!(take_running(&own, None, 10, 0, &mut none), 5);
        assert_eq!(shared.count(), 4);
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
        let entry = jobs[0].reply.slot.anchor().clone();
        let take = |n| shared.take_running(&entry, n, 0);
        // Lost on the way to the Executor.
        assert_eq!(take(2), 2);
        let lost = Started::taken(jobs.drain(..2).collect());
        assert_eq!(node.running(), 2);
        drop(lost);
        assert_eq!(node.running(), 0);
        // Split, then partly run: each slot is given back once.
        assert_eq!(take(4), 4);
        let mut batch = Started::taken(jobs);
        let rest = batch.split_off(2);
        assert_eq!((batch.len(), rest.len(), node.running()), (2, 2, 4));
        drop(rest);
        assert_eq!(node.running(), 2);
        let returns = SlotReturns::new(&shared, entry.clone());
        let mut each = batch.run(&returns);
        let (_job, slot) = each.next().unwrap();
        assert_eq!(node.running(), 2);
        drop(each);
        assert_eq!(node.running(), 1, "the one not yet taken out went back");
        drop(slot);
        assert_eq!(
            node.running(),
            1,
            "a finished one waits for its task's flush"
        );
        returns.flush();
        assert_eq!(node.running(), 0);
        // Whatever was not flushed goes back when the task ends.
        assert_eq!(take(1), 1);
        let (_job, slot) = Started::taken(vec![
            node.admit_for_test(crate::Operation::new("t", crate::Json::null()))
        ])
        .run(&returns)
        .next()
        .unwrap();
        assert_eq!(node.running(), 1);
        assert_eq!(entry.running(), 1, "the type's own count follows");
        drop(slot);
        drop(returns);
        assert_eq!(node.running(), 0);
        assert_eq!(entry.running(), 0);
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
