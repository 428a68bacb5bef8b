//! The Scheduler actor: bounded per-type queues, priority first, handed to the Executor
//! in batches, never more operations of a type running at once than its running slots
//! allow (its own, or its share of the shared ones: see [`crate::type_limits`]), and never
//! more than `max_concurrent` on the node. Each [shard](crate::shard) has one, queueing
//! the operations of its shard; they all take running slots from the same counts, so a
//! type's limit holds across shards.
//!
//! [`Queues`] is the pure core: it orders waiting operations (priority, then arrival),
//! drops expired ones, and decides when a type's queue is flushed (`batch_size` waiting,
//! or the oldest has waited `batch_flush`), all with time passed in; how many of a type
//! may start is asked of a function passed in too. The actor owns it, takes the
//! [running slots](crate::slots::RunningSlots) in that function (a type without one
//! waits, and its Scheduler is woken when one comes back, while other types go on), gives
//! each started operation's queue slot back, and arms a timer when a queue waits for its
//! flush.

use std::cmp::Reverse;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::events::{now_ms, Event, EventKind};
use crate::executor::ExecutorMsg;
use crate::job::Job;
use crate::op::{OpStatus, OpType, TypeMap};
use crate::shared::NodeShared;
use crate::slots::{QueueSlot, Started};
use crate::trace::Stamp;

/// What the pure queue needs to know of an item.
pub trait Queued {
    fn priority(&self) -> i32;
    fn deadline(&self) -> Instant;
}

impl<T: Queued> Queued for Box<T> {
    fn priority(&self) -> i32 {
        (**self).priority()
    }
    fn deadline(&self) -> Instant {
        (**self).deadline()
    }
}

impl Queued for Job {
    fn priority(&self) -> i32 {
        self.op.priority
    }
    fn deadline(&self) -> Instant {
        self.deadline
    }
}

/// The waiting items of one type: highest priority first, FIFO within a priority.
struct TypeQueue<T> {
    /// The queue's own copy of the type name: cloning it never touches the reference
    /// count of an operation's name, which other cores may be counting too.
    name: OpType,
    by_priority: BTreeMap<Reverse<i32>, VecDeque<(Instant, T)>>,
    len: usize,
}

impl<T: Queued> TypeQueue<T> {
    fn new(name: &str) -> Self {
        TypeQueue {
            name: name.into(),
            by_priority: BTreeMap::new(),
            len: 0,
        }
    }

    fn push(&mut self, item: T, now: Instant) {
        self.by_priority
            .entry(Reverse(item.priority()))
            .or_default()
            .push_back((now, item));
        self.len += 1;
    }

    fn oldest(&self) -> Option<Instant> {
        self.by_priority
            .values()
            .filter_map(|q| q.front().map(|(t, _)| *t))
            .min()
    }

    /// The item [`pop`](Self::pop) would take.
    fn peek(&self) -> Option<&T> {
        self.by_priority
            .first_key_value()
            .and_then(|(_, q)| q.front().map(|(_, i)| i))
    }

    fn pop(&mut self) -> Option<T> {
        let mut entry = self.by_priority.first_entry()?;
        let (_, item) = entry.get_mut().pop_front()?;
        if entry.get().is_empty() {
            entry.remove();
        }
        self.len -= 1;
        Some(item)
    }

    /// Removes every item whose deadline is at or before `now`.
    fn drain_expired(&mut self, now: Instant, out: &mut Vec<T>) {
        for q in self.by_priority.values_mut() {
            if q.iter().any(|(_, i)| i.deadline() <= now) {
                let (gone, keep): (VecDeque<_>, VecDeque<_>) =
                    q.drain(..).partition(|(_, i)| i.deadline() <= now);
                *q = keep;
                self.len -= gone.len();
                out.extend(gone.into_iter().map(|(_, i)| i));
            }
        }
        self.by_priority.retain(|_, q| !q.is_empty());
    }
}

/// Batching knobs.
#[derive(Clone, Debug)]
pub struct BatchPolicy {
    pub batch_size: usize,
    /// How long the oldest waiting item may wait for its batch to fill. Zero: flush as
    /// soon as the mailbox is drained (lowest latency; batches still form under load).
    pub batch_flush: Duration,
    /// Operations running at once on the node at most, all types (shared out between
    /// types: see [`crate::type_limits`]).
    pub max_concurrent: usize,
}

/// What [`Queues::dispatch`] decided.
pub struct Dispatch<T> {
    /// Batches to run, each of one type.
    pub batches: Vec<(OpType, Vec<T>)>,
    /// Items whose deadline passed while they waited.
    pub expired: Vec<T>,
    /// When to look again for a queue that waits for its flush, if any.
    pub wake_at: Option<Instant>,
    /// Whether work of some type waits only for running slots.
    pub blocked_on_slots: bool,
}

/// All per-type queues of a node, served round robin across types.
pub struct Queues<T> {
    /// Each type's queue, in the order the types first came (never removed).
    queues: Vec<TypeQueue<T>>,
    /// Where each type's queue is in `queues`.
    index: TypeMap<usize>,
    /// The type of the last push and where its queue is. Operations come in runs of one
    /// type whose name is one shared `Arc` (a batch's, see `TypeNames`): comparing the
    /// pointer finds the queue without hashing and comparing the name for each.
    last: Option<(OpType, usize)>,
    /// Queues with waiting items, in service order.
    ready: VecDeque<usize>,
    policy: BatchPolicy,
}

impl<T: Queued> Queues<T> {
    pub fn new(policy: BatchPolicy) -> Self {
        Queues {
            queues: Vec::new(),
            index: TypeMap::default(),
            last: None,
            ready: VecDeque::new(),
            policy,
        }
    }

    pub fn push(&mut self, op_type: &OpType, item: T, now: Instant) {
        self.queue_of(op_type).push(item, now);
    }

    /// The queue of `op_type`, made on first use, marked ready: the caller adds an item.
    fn queue_of(&mut self, op_type: &OpType) -> &mut TypeQueue<T> {
        let i = match &self.last {
            Some((last, i)) if Arc::ptr_eq(last, op_type) => *i,
            _ => {
                let i = match self.index.get(&**op_type) {
                    Some(&i) => i,
                    None => {
                        self.queues.push(TypeQueue::new(op_type));
                        self.index.insert(op_type.clone(), self.queues.len() - 1);
                        self.queues.len() - 1
                    }
                };
                self.last = Some((op_type.clone(), i));
                i
            }
        };
        let q = &mut self.queues[i];
        if q.len == 0 {
            self.ready.push_back(i);
        }
        q
    }

    /// Items waiting, all types.
    pub fn len(&self) -> usize {
        self.queues.iter().map(|q| q.len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.ready.is_empty()
    }

    /// Takes the batches to run now. `take(first, n)` is asked how many of the `n`
    /// items of a batch may start, `first` being the item the batch starts with (it
    /// stands for its type); it takes that many running slots, and a type it answers 0
    /// for waits for slots while the others go on.
    pub fn dispatch(
        &mut self,
        now: Instant,
        mut take: impl FnMut(&T, usize) -> usize,
    ) -> Dispatch<T> {
        let p = &self.policy;
        let mut out = Dispatch {
            batches: Vec::new(),
            expired: Vec::new(),
            wake_at: None,
            blocked_on_slots: false,
        };
        let mut waiting = VecDeque::new();
        while let Some(t) = self.ready.pop_front() {
            let q = &mut self.queues[t];
            q.drain_expired(now, &mut out.expired);
            if q.len == 0 {
                continue;
            }
            let flush_at = q.oldest().map(|o| o + p.batch_flush);
            let full = q.len >= p.batch_size;
            if !full && p.batch_flush > Duration::ZERO && flush_at.is_some_and(|f| f > now) {
                out.wake_at = min_opt(out.wake_at, flush_at);
                waiting.push_back(t);
                continue;
            }
            let first = q.peek().expect("len counted");
            let n = take(first, q.len.min(p.batch_size));
            if n == 0 {
                out.blocked_on_slots = true;
                waiting.push_back(t);
                continue;
            }
            let mut batch = Vec::with_capacity(n);
            for _ in 0..n {
                batch.push(q.pop().expect("len counted"));
            }
            let more = q.len > 0;
            out.batches.push((q.name.clone(), batch));
            if more {
                // Served; goes behind the other types that wait.
                self.ready.push_back(t);
            }
        }
        self.ready = waiting;
        // A blocked queue still needs its expired items swept.
        if out.blocked_on_slots {
            let next_deadline = self
                .queues
                .iter()
                .flat_map(|q| q.by_priority.values())
                .flat_map(|q| q.iter().map(|(_, i)| i.deadline()))
                .min();
            out.wake_at = min_opt(out.wake_at, next_deadline);
        }
        out
    }
}

fn min_opt(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// Messages of the [`Scheduler`] actor.
pub enum SchedulerMsg {
    /// Operations to queue (from the Router or the Cache).
    Enqueue(Vec<Box<Job>>),
    /// Executors finished operations while work waited for a slot.
    SlotsFreed,
    /// A flush or deadline timer fired.
    Tick,
}

pub struct Scheduler;

pub struct SchedulerArgs {
    pub(crate) shared: Arc<NodeShared>,
    pub(crate) shard: usize,
}

pub struct SchedulerState {
    shared: Arc<NodeShared>,
    shard: usize,
    queues: Queues<Box<Job>>,
    timer_at: Option<Instant>,
}

impl Scheduler {
    fn run(&self, myself: &ActorRef<SchedulerMsg>, state: &mut SchedulerState) {
        let shared = &state.shared;
        let shard = state.shard;
        let metrics = shared.metrics();
        let now = Instant::now();
        // The Schedulers of all shards take from the same counts: each batch takes its
        // slots (atomically) as it is formed, and a type with none left waits, to be
        // woken when one comes back.
        let d = state.queues.dispatch(now, |first, n| {
            shared.take_running(first.reply.entry(), n, shard)
        });
        for job in d.expired {
            job.reply.fail(
                OpStatus::Expired,
                "deadline passed while the operation waited in the queue",
            );
        }
        for (_, mut batch) in d.batches {
            // Out of the queue: its slots go back; it holds running slots now.
            QueueSlot::release_all(batch.iter_mut().map(|j| &mut j.reply.slot));
            let batch = Started::taken(batch);
            metrics.batches.fetch_add(1, Ordering::Relaxed);
            metrics.batch_sizes.record(batch.len() as u64);
            if let Some(first) = batch.first() {
                shared
                    .events()
                    .publish(EventKind::BatchScheduled, || Event::BatchScheduled {
                        node: shared.node_id().clone(),
                        op_type: first.op.op_type.clone(),
                        size: batch.len(),
                        timestamp: now_ms(),
                    });
            }
            shared.send_executor(shard, ExecutorMsg::Run(batch));
        }
        if let Some(at) = d.wake_at {
            if state.timer_at.is_none_or(|t| at < t || t <= now) {
                state.timer_at = Some(at);
                let delay = at.saturating_duration_since(now);
                myself.send_after(delay, || SchedulerMsg::Tick);
            }
        }
    }
}

impl Actor for Scheduler {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = SchedulerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<SchedulerMsg>,
        args: SchedulerArgs,
    ) -> Result<SchedulerState, ActorProcessingErr> {
        Ok(SchedulerState {
            queues: Queues::new(args.shared.config().batch.clone()),
            shared: args.shared,
            shard: args.shard,
            timer_at: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SchedulerMsg>,
        msg: SchedulerMsg,
        state: &mut SchedulerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SchedulerMsg::Enqueue(jobs) => {
                let now = Instant::now();
                let queued = Stamp::from_instant(now);
                for mut job in jobs {
                    job.reply.stamps.queued = queued;
                    state.queues.queue_of(&job.op.op_type).push(job, now);
                }
            }
            SchedulerMsg::SlotsFreed => {}
            SchedulerMsg::Tick => {
                if state.timer_at.is_some_and(|t| t <= Instant::now()) {
                    state.timer_at = None;
                }
            }
        }
        self.run(&myself, state);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, PartialEq)]
    struct Item {
        id: u32,
        prio: i32,
        deadline: Instant,
    }

    impl Queued for Item {
        fn priority(&self) -> i32 {
            self.prio
        }
        fn deadline(&self) -> Instant {
            self.deadline
        }
    }

    fn policy(batch: usize, flush_ms: u64, max: usize) -> BatchPolicy {
        BatchPolicy {
            batch_size: batch,
            batch_flush: Duration::from_millis(flush_ms),
            max_concurrent: max,
        }
    }

    fn item(id: u32, prio: i32, t0: Instant) -> Item {
        Item {
            id,
            prio,
            deadline: t0 + Duration::from_secs(60),
        }
    }

    /// Grants every slot asked for.
    fn all(_: &Item, n: usize) -> usize {
        n
    }

    /// Grants up to `left` slots in all.
    fn budget(mut left: usize) -> impl FnMut(&Item, usize) -> usize {
        move |_, n| {
            let g = n.min(left);
            left -= g;
            g
        }
    }

    fn ids(d: &Dispatch<Item>) -> Vec<Vec<u32>> {
        d.batches
            .iter()
            .map(|(_, b)| b.iter().map(|i| i.id).collect())
            .collect()
    }

    #[test]
    fn priority_first_then_fifo() {
        let t0 = Instant::now();
        let mut q = Queues::new(policy(10, 0, 100));
        let t: OpType = "a".into();
        for (id, prio) in [(1, 0), (2, 5), (3, 0), (4, 5), (5, -1)] {
            q.push(&t, item(id, prio, t0), t0);
        }
        let d = q.dispatch(t0, all);
        assert_eq!(ids(&d), vec![vec![2, 4, 1, 3, 5]]);
        assert!(q.is_empty());
    }

    #[test]
    fn one_name_is_one_queue_whichever_arc_carries_it() {
        let t0 = Instant::now();
        let mut q = Queues::new(policy(10, 0, 100));
        let (a1, a2, b): (OpType, OpType, OpType) = ("a".into(), "a".into(), "b".into());
        q.push(&a1, item(1, 0, t0), t0);
        q.push(&a2, item(2, 0, t0), t0);
        q.push(&b, item(3, 0, t0), t0);
        q.push(&a1, item(4, 0, t0), t0);
        assert_eq!(q.len(), 4);
        let d = q.dispatch(t0, all);
        assert_eq!(ids(&d), vec![vec![1, 2, 4], vec![3]]);
        assert_eq!(d.batches[0].0.as_ref(), "a");
        assert!(q.is_empty());
    }

    #[test]
    fn batches_are_bounded_and_types_take_turns() {
        let t0 = Instant::now();
        let mut q = Queues::new(policy(2, 0, 100));
        let (a, b): (OpType, OpType) = ("a".into(), "b".into());
        for id in 0..5 {
            q.push(&a, item(id, 0, t0), t0);
        }
        q.push(&b, item(10, 0, t0), t0);
        let d = q.dispatch(t0, all);
        assert_eq!(ids(&d), vec![vec![0, 1], vec![10], vec![2, 3], vec![4]]);
    }

    #[test]
    fn running_slots_block_and_it_is_reported() {
        let t0 = Instant::now();
        let mut q = Queues::new(policy(10, 0, 3));
        let a: OpType = "a".into();
        for id in 0..5 {
            q.push(&a, item(id, 0, t0), t0);
        }
        let d = q.dispatch(t0, budget(2));
        assert_eq!(ids(&d), vec![vec![0, 1]]);
        assert!(d.blocked_on_slots, "three still wait for a slot");
        let d = q.dispatch(t0, budget(0));
        assert!(d.batches.is_empty());
        assert!(d.blocked_on_slots);
        assert!(
            d.wake_at.is_some(),
            "a blocked queue still sweeps deadlines"
        );
        let d = q.dispatch(t0, all);
        assert_eq!(ids(&d), vec![vec![2, 3, 4]]);
    }

    #[test]
    fn a_type_without_slots_waits_while_the_others_run() {
        let t0 = Instant::now();
        let mut q = Queues::new(policy(10, 0, 100));
        let (slow, echo): (OpType, OpType) = ("slow".into(), "echo".into());
        for id in 0..3 {
            q.push(&slow, item(id, 0, t0), t0);
        }
        for id in 10..13 {
            q.push(&echo, item(id, 0, t0), t0);
        }
        // Slow's slots are all taken; echo's are free.
        let mut asked = Vec::new();
        let d = q.dispatch(t0, |first: &Item, n| {
            asked.push((first.id, n));
            if first.id < 10 {
                0
            } else {
                n
            }
        });
        assert_eq!(
            asked,
            vec![(0, 3), (10, 3)],
            "asked with each type's first item"
        );
        assert_eq!(ids(&d), vec![vec![10, 11, 12]]);
        assert!(d.blocked_on_slots);
        assert_eq!(q.len(), 3);
        let d = q.dispatch(t0, all);
        assert_eq!(ids(&d), vec![vec![0, 1, 2]], "it goes once it has slots");
    }

    #[test]
    fn flush_waits_for_a_full_batch_or_the_timer() {
        let t0 = Instant::now();
        let mut q = Queues::new(policy(3, 5, 100));
        let a: OpType = "a".into();
        q.push(&a, item(1, 0, t0), t0);
        let d = q.dispatch(t0, all);
        assert!(d.batches.is_empty());
        assert_eq!(d.wake_at, Some(t0 + Duration::from_millis(5)));
        let d = q.dispatch(t0 + Duration::from_millis(5), all);
        assert_eq!(ids(&d), vec![vec![1]]);
        for id in 2..5 {
            q.push(&a, item(id, 0, t0), t0);
        }
        let d = q.dispatch(t0, all);
        assert_eq!(ids(&d), vec![vec![2, 3, 4]], "a full batch goes at once");
    }

    #[test]
    fn expired_items_are_returned_not_run() {
        let t0 = Instant::now();
        let mut q = Queues::new(policy(10, 0, 100));
        let a: OpType = "a".into();
        q.push(
            &a,
            Item {
                id: 1,
                prio: 0,
                deadline: t0 + Duration::from_millis(1),
            },
            t0,
        );
        q.push(&a, item(2, 0, t0), t0);
        let d = q.dispatch(t0 + Duration::from_millis(2), all);
        assert_eq!(d.expired.iter().map(|i| i.id).collect::<Vec<_>>(), vec![1]);
        assert_eq!(ids(&d), vec![vec![2]]);
    }

    proptest! {
        #[test]
        fn nothing_lost_nothing_duplicated_and_bounds_hold(
            items in proptest::collection::vec((0u8..3, -2i32..3, 0u64..50), 0..200),
            batch in 1usize..16,
            max in 1usize..32,
            steps in 1usize..40,
        ) {
            let t0 = Instant::now();
            let mut q = Queues::new(policy(batch, 0, max));
            let types: Vec<OpType> = vec!["a".into(), "b".into(), "c".into()];
            for (i, (ty, prio, dl)) in items.iter().enumerate() {
                let it = Item { id: i as u32, prio: *prio, deadline: t0 + Duration::from_millis(*dl + 10) };
                q.push(&types[*ty as usize], it, t0);
            }
            let mut seen = std::collections::HashSet::new();
            let mut now = t0;
            for _ in 0..steps {
                now += Duration::from_millis(5);
                let d = q.dispatch(now, budget(max));
                let total: usize = d.batches.iter().map(|(_, b)| b.len()).sum();
                prop_assert!(total <= max);
                for (_, b) in &d.batches {
                    prop_assert!(b.len() <= batch && !b.is_empty());
                    for w in b.windows(2) {
                        prop_assert!(w[0].prio >= w[1].prio);
                    }
                    for i in b {
                        prop_assert!(i.deadline > now);
                        prop_assert!(seen.insert(i.id));
                    }
                }
                for i in d.expired {
                    prop_assert!(i.deadline <= now);
                    prop_assert!(seen.insert(i.id));
                }
            }
            prop_assert_eq!(seen.len() + q.len(), items.len());
        }
    }
}
