//! Shards: the engine's hot path, several times over, so a node uses its cores.
//!
//! A node runs `engine.shards` copies of its Router, Cache, Scheduler and Executor (one
//! per runtime worker by default), all under the one supervisor. Each [`Shard`] has its
//! own intake and actors and owns a partition of the work, chosen at the door by
//! [`ShardOf`] and kept to the end:
//!
//! - an operation with an idempotency key goes to the shard of that key (type and key
//!   hashed), so its Cache sees every repeat of the key (single-flight holds);
//! - one with a routing key goes to the shard of that key, so operations with one key
//!   keep their order (priority, then FIFO, as on a one-shard node);
//! - the rest go to the submitting thread's home shard: threads take home shards in
//!   turn, so submitters spread over the shards without sharing a lock or a mailbox,
//!   and a single hot type spreads too.
//!
//! With `engine.shard_threads`, each shard's actors run on a thread of their own (a
//! current-thread runtime, [`ShardThreads`]), and that thread's home is its shard: an
//! operation submitted there is admitted, routed, scheduled, run and answered without
//! leaving the thread. Otherwise the actors are tasks of the caller's runtime, which its
//! scheduler moves between worker threads as it likes.
//!
//! What stays node-wide: the queue capacity of each type (one count at the door), the
//! running slots (each type's count, and the count of the slots the types without their
//! own share, which every Scheduler takes from: see [`crate::type_limits`]), each type's
//! rate limiter and circuit breaker, and the counters, summed when read.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwapOption;
use ractor::{ActorCell, ActorRef};

use crate::cache::CacheMsg;
use crate::counter::Padded;
use crate::executor::ExecutorMsg;
use crate::hash::{mix, stable_hash};
use crate::job::Job;
use crate::op::{OpType, Operation};
use crate::router::{Intake, RouterMsg};
use crate::scheduler::SchedulerMsg;
#[cfg(feature = "test-util")]
use crate::supervisor::ChildKind;

/// The current ref of each actor of a shard, swapped when the supervisor restarts one.
#[derive(Default)]
pub(crate) struct Refs {
    pub(crate) router: ArcSwapOption<ActorRef<RouterMsg>>,
    pub(crate) cache: ArcSwapOption<ActorRef<CacheMsg>>,
    pub(crate) scheduler: ArcSwapOption<ActorRef<SchedulerMsg>>,
    pub(crate) executor: ArcSwapOption<ActorRef<ExecutorMsg>>,
}

impl Refs {
    /// The actor of `kind`, if it runs.
    #[cfg(feature = "test-util")]
    pub(crate) fn cell(&self, kind: ChildKind) -> Option<ActorCell> {
        match kind {
            ChildKind::Router => self.router.load().as_ref().map(|a| a.get_cell()),
            ChildKind::Cache => self.cache.load().as_ref().map(|a| a.get_cell()),
            ChildKind::Scheduler => self.scheduler.load().as_ref().map(|a| a.get_cell()),
            ChildKind::Executor => self.executor.load().as_ref().map(|a| a.get_cell()),
        }
    }

    /// Forgets every actor; returns those that ran.
    pub(crate) fn take(&self) -> impl Iterator<Item = ActorCell> {
        [
            self.router.swap(None).map(|a| a.get_cell()),
            self.cache.swap(None).map(|a| a.get_cell()),
            self.scheduler.swap(None).map(|a| a.get_cell()),
            self.executor.swap(None).map(|a| a.get_cell()),
        ]
        .into_iter()
        .flatten()
    }
}

/// One copy of the hot path: an intake and the four actors that serve it.
#[derive(Default)]
pub(crate) struct Shard {
    pub(crate) intake: Intake,
    pub(crate) refs: Refs,
    /// Operations this shard took (routed by its Router, or forwarded here), on a line of
    /// its own: how evenly the work spreads.
    pub(crate) took: Padded<AtomicU64>,
}

impl Shard {
    pub(crate) fn took(&self, n: usize) {
        self.took.0.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// How many shards `requested` means: itself, or with 0 the runtime's worker threads
/// (the machine's cores when called outside a runtime).
pub fn shard_count(requested: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(h) => h.metrics().num_workers().max(1),
        Err(_) => std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

/// Picks the shard of each operation (see the module docs). The same operation always
/// maps to the same shard when it has a key; without one, to the calling thread's home.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ShardOf {
    n: usize,
    home: usize,
}

impl ShardOf {
    /// For `n` shards, on the calling thread.
    pub(crate) fn here(n: usize) -> Self {
        ShardOf {
            n,
            home: if n == 1 { 0 } else { home_index() % n },
        }
    }

    pub(crate) fn op(&self, op: &Operation) -> usize {
        if self.n == 1 {
            return 0;
        }
        match op.idempotency_key.as_deref().or(op.key.as_deref()) {
            Some(key) => self.key(&op.op_type, key),
            None => self.home,
        }
    }

    /// The shard of `key` for `op_type`.
    pub(crate) fn key(&self, op_type: &OpType, key: &str) -> usize {
        key_shard(self.n, op_type, key)
    }
}

/// The shard of `key` for `op_type` among `n`: where every operation with that key goes,
/// and where the Cache holds it when it is an idempotency key.
pub(crate) fn key_shard(n: usize, op_type: &str, key: &str) -> usize {
    if n == 1 {
        return 0;
    }
    let h = mix(stable_hash(op_type.as_bytes()) ^ stable_hash(key.as_bytes()).rotate_left(1));
    (h % n as u64) as usize
}

/// Splits `jobs` by the shard each was given at the door, calling `each` once per shard
/// that gets any, in shard order. One shard (the common case of a single operation, or
/// of a thread's own operations without keys) costs no extra buffer.
pub(crate) fn split(
    shards: usize,
    jobs: Vec<Box<Job>>,
    mut each: impl FnMut(usize, Vec<Box<Job>>),
) {
    let Some(first) = jobs.first() else { return };
    let s0 = first.shard;
    if jobs.iter().all(|j| j.shard == s0) {
        each(s0, jobs);
        return;
    }
    let mut groups: Vec<Vec<Box<Job>>> = (0..shards).map(|_| Vec::new()).collect();
    for job in jobs {
        groups[job.shard].push(job);
    }
    for (s, g) in groups.into_iter().enumerate() {
        if !g.is_empty() {
            each(s, g);
        }
    }
}

thread_local! {
    /// The calling thread's number for [`home_index`] (`usize::MAX`: none taken yet).
    static HOME: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// This thread's number, taken in turn by threads as they first submit: the home shard
/// is this number modulo the shard count, so consecutive submitting threads (runtime
/// workers, HTTP workers) get consecutive shards. A shard's own thread has its shard's
/// number ([`make_home`]); a cluster link sends a thread's replies on the lane of this
/// number, so that they stay on the thread that ran the operations.
pub fn home_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    HOME.with(|h| {
        if h.get() == usize::MAX {
            h.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        h.get()
    })
}

/// Makes shard `i` (modulo the shard count) the calling thread's home: an operation it
/// submits without a key goes to that shard. For threads that run a shard's actors on a
/// runtime the node was given ([`NodeBuilder::shard_runtimes`](crate::NodeBuilder::shard_runtimes)),
/// so that what they submit stays on them.
pub fn make_home(i: usize) {
    HOME.with(|h| h.set(i));
}

/// The threads of a node's shards (`engine.shard_threads`): one per shard, each running
/// a current-thread runtime on which the supervisor spawns that shard's actors (and the
/// Executor its batches), with the shard as the thread's home. Dropped with the last
/// [`Node`](crate::Node) handle: each runtime then stops, dropping what still runs on it,
/// and its thread ends. An embedder that wants the threads before the node (to run a
/// cluster's links on them too, [`NodeBuilder::shard_runtimes`](crate::NodeBuilder::shard_runtimes))
/// starts them itself and keeps them until the node has shut down.
pub struct ShardThreads {
    handles: Vec<tokio::runtime::Handle>,
    /// Dropping one ends its thread's runtime.
    _stops: Vec<tokio::sync::oneshot::Sender<()>>,
}

/// How long a stopping shard runtime waits for its blocking tasks (handlers run with
/// `spawn_blocking`) before it leaves them.
const SHARD_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl ShardThreads {
    /// Starts `n` threads, `opmesh-shard-<i>`, and waits until each runtime runs.
    pub fn start(n: usize) -> std::io::Result<Self> {
        Self::start_named(n, "opmesh-shard")
    }

    /// [`start`](Self::start), the threads named `<name>-<i>`: for other work that wants
    /// one event loop per thread, each thread the home of its number (a load generator's
    /// connections, say).
    pub fn start_named(n: usize, name: &str) -> std::io::Result<Self> {
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        for i in 0..n {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let (ready, handle) = std::sync::mpsc::sync_channel(1);
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    make_home(i);
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready.send(Ok(rt.handle().clone()));
                    rt.block_on(async {
                        let _ = stopped.await;
                    });
                    rt.shutdown_timeout(SHARD_STOP_WAIT);
                })?;
            let handle = handle.recv().map_err(|_| {
                std::io::Error::other(format!("thread {name}-{i} stopped before its runtime ran"))
            })??;
            handles.push(handle);
            stops.push(stop);
        }
        Ok(ShardThreads {
            handles,
            _stops: stops,
        })
    }

    /// Each thread's runtime, in shard order.
    pub fn handles(&self) -> &[tokio::runtime::Handle] {
        &self.handles
    }
}

/// The shards of a node.
pub(crate) struct Shards {
    shards: Box<[Shard]>,
    /// Each shard's runtime, when the shards have threads of their own.
    runtimes: Vec<tokio::runtime::Handle>,
}

impl Shards {
    /// `n` shards (at least one); their actors run on `runtimes` (one per shard) or, when
    /// empty, on the runtime that starts them.
    pub(crate) fn new(n: usize, runtimes: Vec<tokio::runtime::Handle>) -> Self {
        Shards {
            shards: (0..n.max(1)).map(|_| Shard::default()).collect(),
            runtimes,
        }
    }

    /// The runtime of shard `i`'s own thread, if the shards have threads.
    pub(crate) fn runtime(&self, i: usize) -> Option<&tokio::runtime::Handle> {
        self.runtimes.get(i)
    }

    pub(crate) fn runtimes(&self) -> &[tokio::runtime::Handle] {
        &self.runtimes
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.len()
    }

    pub(crate) fn get(&self, i: usize) -> &Shard {
        &self.shards[i]
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &Shard> {
        self.shards.iter()
    }

    /// Operations each shard took so far, in shard order.
    pub(crate) fn took(&self) -> Vec<u64> {
        self.shards
            .iter()
            .map(|s| s.took.0.load(Ordering::Relaxed))
            .collect()
    }

    /// The picker for the calling thread.
    pub(crate) fn of(&self) -> ShardOf {
        ShardOf::here(self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Json;

    fn op(key: Option<&str>, idem: Option<&str>) -> Operation {
        let mut op = Operation::new("t", Json::null());
        if let Some(k) = key {
            op = op.with_key(k);
        }
        if let Some(k) = idem {
            op = op.with_idempotency_key(k);
        }
        op
    }

    #[test]
    fn keyed_operations_map_to_one_shard_from_any_thread() {
        let a = ShardOf { n: 8, home: 0 };
        let b = ShardOf { n: 8, home: 5 };
        for i in 0..100 {
            let k = format!("k{i}");
            assert_eq!(a.op(&op(Some(&k), None)), b.op(&op(Some(&k), None)));
            // The idempotency key decides, whatever the routing key.
            assert_eq!(
                a.op(&op(Some("x"), Some(&k))),
                b.op(&op(Some("y"), Some(&k)))
            );
            assert_eq!(a.op(&op(None, Some(&k))), a.key(&"t".into(), &k));
        }
        // Unkeyed ones stay home.
        assert_eq!(a.op(&op(None, None)), 0);
        assert_eq!(b.op(&op(None, None)), 5);
    }

    #[test]
    fn keys_spread_over_every_shard() {
        let s = ShardOf { n: 8, home: 0 };
        let mut seen = [0usize; 8];
        for i in 0..8000 {
            seen[s.key(&"t".into(), &format!("key-{i}"))] += 1;
        }
        for (i, n) in seen.iter().enumerate() {
            assert!((700..1300).contains(n), "shard {i}: {n} of 8000");
        }
    }

    #[test]
    fn one_shard_takes_everything() {
        let s = ShardOf::here(1);
        assert_eq!(s.op(&op(Some("a"), Some("b"))), 0);
        assert_eq!(s.op(&op(None, None)), 0);
    }
}
