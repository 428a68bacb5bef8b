//! The Cache actor: completed results by idempotency key (LRU + TTL), and single-flight
//! for keys in flight.
//!
//! Only operations with an idempotency key come here (the Router sends them). A fresh
//! completed result answers at once (`cached: true`); an operation whose key is already
//! running joins that run; the rest are marked in flight and go on to the Scheduler.
//! When a keyed operation completes, its [`Reply`](crate::job::Reply) tells the Cache,
//! which stores a success and answers every operation that joined.
//!
//! Each [shard](crate::shard) has a Cache, holding the keys that map to its shard (every
//! repeat of a key goes there) with its share of `cache.capacity`; their counters are the
//! node's, shared.
//!
//! [`ResultCache`] is the pure core (time passed in); [`Cache`] owns it and the mailbox.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lru::LruCache;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::Serialize;

use crate::job::Job;
use crate::op::{Json, OpOutcome, OpStatus, OpType};
use crate::scheduler::SchedulerMsg;
use crate::shared::NodeShared;
use crate::trace::{CacheVerdict, Stamp};

/// A result's identity: the operation type, who submitted it and its idempotency key.
/// With API tokens on, two clients' equal keys are two keys.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub op_type: OpType,
    pub owner: Option<Arc<str>>,
    pub key: Box<str>,
}

impl CacheKey {
    /// The key of `op`, when it has an idempotency key.
    pub fn of(op: &crate::op::Operation) -> Option<CacheKey> {
        Some(CacheKey {
            op_type: op.op_type.clone(),
            owner: op.owner.clone(),
            key: op.idempotency_key.as_deref()?.into(),
        })
    }
}

/// What a repeat of an idempotency key must match: a hash of the payload's bytes. A key
/// sent again with another payload is a client's mistake, refused rather than answered
/// with the first payload's result.
pub fn fingerprint(payload: &[u8]) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(payload)
}

/// What a stored result takes: its key, its result and error, and a fixed part.
fn entry_bytes(key: &CacheKey, o: &OpOutcome) -> usize {
    64 + key.key.len()
        + o.result.as_ref().map_or(0, Json::len)
        + o.error.as_ref().map_or(0, String::len)
}

/// The error of an operation refused because its idempotency key was used before with
/// another payload; the api answers it with 409 `idempotency_key_reused`.
pub const KEY_REUSED: &str =
    "idempotency_key_reused: this idempotency key was used with a different payload";

/// Counters of the cache, readable while it runs.
#[derive(Default)]
pub struct CacheCounters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub joined: AtomicU64,
    pub evictions: AtomicU64,
    pub expirations: AtomicU64,
    pub size: AtomicUsize,
    /// Bytes of the stored keys and results, all shards together.
    pub bytes: AtomicUsize,
}

/// A snapshot of the cache counters.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CacheStats {
    /// Answered without running: a stored result, or joined a run in flight.
    pub hits: u64,
    pub misses: u64,
    /// Of the hits, how many joined a run in flight.
    pub joined: u64,
    /// Results pushed out by newer ones (LRU).
    pub evictions: u64,
    /// Results found too old (TTL) and dropped.
    pub expirations: u64,
    pub size: usize,
    /// Bytes of the stored keys and results (at most `cache.max_bytes`).
    pub bytes: usize,
    pub hit_rate: f64,
}

impl CacheCounters {
    pub fn snapshot(&self) -> CacheStats {
        let hits = self.hits.load(Ordering::Relaxed);
        let misses = self.misses.load(Ordering::Relaxed);
        CacheStats {
            hits,
            misses,
            joined: self.joined.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            expirations: self.expirations.load(Ordering::Relaxed),
            size: self.size.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            hit_rate: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
        }
    }
}

/// What the cache decided for one keyed operation.
#[derive(Debug, PartialEq)]
pub enum Lookup<W> {
    /// A fresh stored result; the waiter is handed back to be answered with it.
    Hit(W, OpOutcome),
    /// Joined the run in flight; the waiter is kept until it completes.
    Joined,
    /// Nothing known: the caller runs it; the key is now in flight.
    Miss(W),
    /// The key is known (stored or in flight) with another payload: the waiter is handed
    /// back to be refused.
    Reused(W),
}

/// LRU + TTL store of successful results, plus the waiters of keys in flight. Generic
/// over the waiter so it is tested without actors.
pub struct ResultCache<W> {
    /// The bytes of the stored keys and results, at most `max_bytes`.
    bytes: usize,
    max_bytes: usize,
    /// Stored results, with the payload fingerprint and when they were stored.
    done: LruCache<CacheKey, (OpOutcome, u64, Instant)>,
    /// Keys running now, with the payload fingerprint and the waiters that joined.
    in_flight: HashMap<CacheKey, (u64, Vec<W>)>,
    ttl: Duration,
    counters: Arc<CacheCounters>,
}

impl<W> ResultCache<W> {
    /// `counters` may be shared by several caches (one per shard): each adds its own
    /// size to `size`, and takes it back when dropped.
    pub fn new(capacity: NonZeroUsize, ttl: Duration, counters: Arc<CacheCounters>) -> Self {
        Self::with_max_bytes(capacity, usize::MAX, ttl, counters)
    }

    /// A cache that also keeps its stored keys and results within `max_bytes`, the least
    /// recently used going first.
    pub fn with_max_bytes(
        capacity: NonZeroUsize,
        max_bytes: usize,
        ttl: Duration,
        counters: Arc<CacheCounters>,
    ) -> Self {
        ResultCache {
            bytes: 0,
            max_bytes,
            done: LruCache::new(capacity),
            in_flight: HashMap::new(),
            ttl,
            counters,
        }
    }

    /// Looks `key` up for `waiter`, whose payload has fingerprint `print`, at time `now`.
    pub fn lookup(&mut self, key: CacheKey, print: u64, waiter: W, now: Instant) -> Lookup<W> {
        if let Some((outcome, stored, at)) = self.done.get(&key) {
            if now.duration_since(*at) < self.ttl {
                if *stored != print {
                    return Lookup::Reused(waiter);
                }
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                return Lookup::Hit(waiter, outcome.clone());
            }
            // Too old: dropped, and looked up as if it never was.
            if let Some((outcome, _, _)) = self.done.pop(&key) {
                self.take_bytes(entry_bytes(&key, &outcome));
            }
            self.counters.expirations.fetch_add(1, Ordering::Relaxed);
            self.counters.size.fetch_sub(1, Ordering::Relaxed);
        }
        let c = &self.counters;
        if let Some((running, waiters)) = self.in_flight.get_mut(&key) {
            if *running != print {
                return Lookup::Reused(waiter);
            }
            waiters.push(waiter);
            c.hits.fetch_add(1, Ordering::Relaxed);
            c.joined.fetch_add(1, Ordering::Relaxed);
            return Lookup::Joined;
        }
        c.misses.fetch_add(1, Ordering::Relaxed);
        self.in_flight.insert(key, (print, Vec::new()));
        Lookup::Miss(waiter)
    }

    /// Records the outcome of the run for `key`; returns the waiters that joined it.
    /// Only successes are stored: a failed run is not an answer to reuse.
    pub fn complete(&mut self, key: CacheKey, outcome: &OpOutcome, now: Instant) -> Vec<W> {
        let Some((print, waiters)) = self.in_flight.remove(&key) else {
            return Vec::new();
        };
        // A result larger than the whole budget is not stored: it would push out all
        // the others and then itself.
        let size = entry_bytes(&key, outcome);
        if outcome.status == OpStatus::Succeeded && size <= self.max_bytes {
            self.add_bytes(size);
            // Kept for long: its result a copy of its own, not a slice that holds a
            // larger buffer.
            let kept = OpOutcome {
                result: outcome.result.as_ref().map(Json::detached),
                ..outcome.clone()
            };
            match self.done.push(key.clone(), (kept, print, now)) {
                // Replaced the same key's older result: the size stays.
                Some((old_key, (old, _, _))) if old_key == key => {
                    self.take_bytes(entry_bytes(&old_key, &old));
                }
                Some((old_key, (old, _, _))) => {
                    self.take_bytes(entry_bytes(&old_key, &old));
                    self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    self.counters.size.fetch_add(1, Ordering::Relaxed);
                }
            }
            while self.bytes > self.max_bytes {
                let Some((old_key, (old, _, _))) = self.done.pop_lru() else {
                    break;
                };
                self.take_bytes(entry_bytes(&old_key, &old));
                self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                self.counters.size.fetch_sub(1, Ordering::Relaxed);
            }
        }
        waiters
    }

    /// Drops the stored results older than the TTL without waiting for a lookup of their
    /// key, so the memory held follows the TTL when no new key arrives. Answers how many
    /// went.
    pub fn sweep(&mut self, now: Instant) -> usize {
        let ttl = self.ttl;
        let old: Vec<CacheKey> = self
            .done
            .iter()
            .filter(|(_, (_, _, at))| now.saturating_duration_since(*at) >= ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &old {
            if let Some((outcome, _, _)) = self.done.pop(k) {
                self.take_bytes(entry_bytes(k, &outcome));
                self.counters.expirations.fetch_add(1, Ordering::Relaxed);
                self.counters.size.fetch_sub(1, Ordering::Relaxed);
            }
        }
        old.len()
    }

    /// The bytes of the stored keys and results.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn add_bytes(&mut self, n: usize) {
        self.bytes += n;
        self.counters.bytes.fetch_add(n, Ordering::Relaxed);
    }

    fn take_bytes(&mut self, n: usize) {
        self.bytes -= n;
        self.counters.bytes.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn len(&self) -> usize {
        self.done.len()
    }

    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }
}

impl<W> Drop for ResultCache<W> {
    fn drop(&mut self) {
        // A restarted Cache starts empty: what this one held is no longer counted.
        self.counters
            .size
            .fetch_sub(self.done.len(), Ordering::Relaxed);
        self.counters.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// Messages of the [`Cache`] actor.
pub enum CacheMsg {
    /// Keyed operations from the Router, in arrival order.
    Admit(Vec<Box<Job>>),
    /// A keyed operation finished.
    Completed { key: CacheKey, outcome: OpOutcome },
    /// Time to drop what outlived the TTL (every [`SWEEP_EVERY`]).
    Sweep,
}

/// How often a Cache drops the results that outlived the TTL.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

pub struct Cache;

pub struct CacheArgs {
    pub(crate) shared: Arc<NodeShared>,
    pub(crate) shard: usize,
}

pub struct CacheState {
    shared: Arc<NodeShared>,
    shard: usize,
    cache: ResultCache<Box<Job>>,
}

fn answer_from_cache(job: Box<Job>, outcome: &OpOutcome) {
    let mut o = outcome.clone();
    // The answer carries this operation's trace id, not the one of the run it reuses.
    o.trace_id = None;
    o.cached = true;
    o.attempts = 0;
    job.reply.finish(o);
}

impl Actor for Cache {
    type Msg = CacheMsg;
    type State = CacheState;
    type Arguments = CacheArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<CacheMsg>,
        args: CacheArgs,
    ) -> Result<CacheState, ActorProcessingErr> {
        // Ends with the actor (a send to a stopped actor fails and stops the timer).
        myself.send_interval(SWEEP_EVERY, || CacheMsg::Sweep);
        let cfg = &args.shared.config().cache;
        // The node's capacity, shared out between the shards' caches.
        let shards = args.shared.shards().len();
        let capacity =
            NonZeroUsize::new(cfg.capacity.get().div_ceil(shards)).unwrap_or(cfg.capacity);
        let cache = ResultCache::with_max_bytes(
            capacity,
            cfg.max_bytes.div_ceil(shards),
            cfg.ttl,
            args.shared.cache_counters().clone(),
        );
        Ok(CacheState {
            shared: args.shared,
            shard: args.shard,
            cache,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<CacheMsg>,
        msg: CacheMsg,
        state: &mut CacheState,
    ) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        match msg {
            CacheMsg::Admit(jobs) => {
                let cache_in = Stamp::from_instant(now);
                let mut misses = Vec::new();
                for mut job in jobs {
                    job.reply.stamps.cache_in = cache_in;
                    let Some(key) = CacheKey::of(&job.op) else {
                        misses.push(job);
                        continue;
                    };
                    let print = fingerprint(job.op.payload.as_bytes());
                    // A joined operation waits with the run it joined; its cache span
                    // lasts until that run's answer.
                    job.reply.cache_verdict = Some(CacheVerdict::Joined);
                    match state.cache.lookup(key.clone(), print, job, now) {
                        Lookup::Hit(mut j, outcome) => {
                            j.reply.cache_verdict = Some(CacheVerdict::Hit);
                            answer_from_cache(j, &outcome)
                        }
                        Lookup::Reused(mut j) => {
                            j.reply.cache_verdict = Some(CacheVerdict::Reused);
                            let id = j.op.id;
                            j.reply
                                .finish(OpOutcome::failure(id, OpStatus::Failed, KEY_REUSED));
                        }
                        Lookup::Joined => {}
                        Lookup::Miss(j) => {
                            job = j;
                            job.reply.cache_key = Some(Box::new(key));
                            job.reply.cache_verdict = Some(CacheVerdict::Miss);
                            misses.push(job);
                        }
                    }
                }
                let cache_out = Stamp::now();
                for j in &mut misses {
                    j.reply.stamps.cache_out = cache_out;
                }
                if !misses.is_empty() {
                    state
                        .shared
                        .send_scheduler(state.shard, SchedulerMsg::Enqueue(misses));
                }
            }
            CacheMsg::Completed { key, outcome } => {
                for job in state.cache.complete(key, &outcome, now) {
                    answer_from_cache(job, &outcome);
                }
            }
            CacheMsg::Sweep => {
                state.cache.sweep(now);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::OpId;

    fn outcome(status: OpStatus) -> OpOutcome {
        OpOutcome::new(OpId::new(), status)
    }

    fn key(k: &str) -> CacheKey {
        CacheKey {
            op_type: "t".into(),
            owner: None,
            key: k.into(),
        }
    }

    fn cache(cap: usize, ttl_ms: u64) -> ResultCache<u32> {
        ResultCache::new(
            NonZeroUsize::new(cap).unwrap(),
            Duration::from_millis(ttl_ms),
            Arc::new(CacheCounters::default()),
        )
    }

    #[test]
    fn miss_then_join_then_hit() {
        let t0 = Instant::now();
        let mut c = cache(10, 1000);
        assert_eq!(c.lookup(key("a"), 0, 1, t0), Lookup::Miss(1));
        assert_eq!(c.lookup(key("a"), 0, 2, t0), Lookup::Joined);
        assert_eq!(c.lookup(key("a"), 0, 3, t0), Lookup::Joined);
        let ok = outcome(OpStatus::Succeeded);
        assert_eq!(c.complete(key("a"), &ok, t0), vec![2, 3]);
        match c.lookup(key("a"), 0, 4, t0 + Duration::from_millis(10)) {
            Lookup::Hit(4, o) => assert_eq!(o.id, ok.id),
            other => panic!("{other:?}"),
        }
        let s = c.counters.snapshot();
        assert_eq!((s.hits, s.misses, s.joined, s.size), (3, 1, 2, 1));
        assert!((s.hit_rate - 0.75).abs() < 1e-9);
    }

    #[test]
    fn a_sweep_drops_what_outlived_the_ttl_without_a_lookup() {
        let mut c = cache(10, 100);
        let t = Instant::now();
        for (k, at) in [("old", t), ("new", t + Duration::from_millis(60))] {
            assert!(matches!(c.lookup(key(k), 1, 0, at), Lookup::Miss(_)));
            c.complete(key(k), &outcome(OpStatus::Succeeded), at);
        }
        let full = c.bytes();
        assert_eq!(c.sweep(t + Duration::from_millis(99)), 0);
        assert_eq!(c.sweep(t + Duration::from_millis(100)), 1);
        assert_eq!(c.len(), 1);
        assert!(c.bytes() < full && c.bytes() > 0);
        assert_eq!(c.sweep(t + Duration::from_millis(160)), 1);
        assert_eq!((c.len(), c.bytes()), (0, 0));
    }

    #[test]
    fn failures_are_not_stored_and_ttl_expires() {
        let t0 = Instant::now();
        let mut c = cache(10, 100);
        assert_eq!(c.lookup(key("a"), 0, 1, t0), Lookup::Miss(1));
        assert!(c
            .complete(key("a"), &outcome(OpStatus::Failed), t0)
            .is_empty());
        assert_eq!(c.lookup(key("a"), 0, 2, t0), Lookup::Miss(2));
        c.complete(key("a"), &outcome(OpStatus::Succeeded), t0);
        assert!(matches!(
            c.lookup(key("a"), 0, 3, t0 + Duration::from_millis(50)),
            Lookup::Hit(3, _)
        ));
        assert_eq!(
            c.lookup(key("a"), 0, 4, t0 + Duration::from_millis(150)),
            Lookup::Miss(4)
        );
        assert_eq!(c.counters.snapshot().expirations, 1);
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let t0 = Instant::now();
        let mut c = cache(2, 10_000);
        for (i, k) in ["a", "b"].iter().enumerate() {
            c.lookup(key(k), 0, i as u32, t0);
            c.complete(key(k), &outcome(OpStatus::Succeeded), t0);
        }
        assert!(matches!(c.lookup(key("a"), 0, 9, t0), Lookup::Hit(..)));
        c.lookup(key("c"), 0, 3, t0);
        c.complete(key("c"), &outcome(OpStatus::Succeeded), t0);
        assert_eq!(c.len(), 2);
        assert_eq!(c.counters.snapshot().evictions, 1);
        assert!(matches!(c.lookup(key("a"), 0, 9, t0), Lookup::Hit(..)));
        assert_eq!(c.lookup(key("b"), 0, 9, t0), Lookup::Miss(9));
    }

    #[test]
    fn a_key_again_with_another_payload_is_refused_and_owners_have_their_own_keys() {
        let t0 = Instant::now();
        let mut c = cache(10, 1000);
        assert_eq!(c.lookup(key("a"), 7, 1, t0), Lookup::Miss(1));
        // In flight: another payload is refused, the same one joins.
        assert_eq!(c.lookup(key("a"), 8, 2, t0), Lookup::Reused(2));
        assert_eq!(c.lookup(key("a"), 7, 3, t0), Lookup::Joined);
        assert_eq!(
            c.complete(key("a"), &outcome(OpStatus::Succeeded), t0),
            vec![3]
        );
        // Stored: the same.
        assert_eq!(c.lookup(key("a"), 8, 4, t0), Lookup::Reused(4));
        assert!(matches!(c.lookup(key("a"), 7, 5, t0), Lookup::Hit(5, _)));
        // Another owner's equal key is another key.
        let theirs = CacheKey {
            owner: Some("other".into()),
            ..key("a")
        };
        assert_eq!(c.lookup(theirs, 8, 6, t0), Lookup::Miss(6));
        assert_ne!(fingerprint(b"{\"a\":1}"), fingerprint(b"{\"a\":2}"));
    }

    #[test]
    fn stored_results_stay_within_the_byte_budget_least_recently_used_first() {
        let t0 = Instant::now();
        let counters = Arc::new(CacheCounters::default());
        let mut c: ResultCache<u32> = ResultCache::with_max_bytes(
            NonZeroUsize::new(100).unwrap(),
            10_000,
            Duration::from_secs(60),
            counters.clone(),
        );
        let big = |n: usize| {
            let mut o = outcome(OpStatus::Succeeded);
            o.result = Some(Json::from_trusted(bytes::Bytes::from(vec![b'1'; n])));
            o
        };
        for k in ["a", "b", "c"] {
            c.lookup(key(k), 0, 0, t0);
            c.complete(key(k), &big(3_000), t0);
        }
        // "a" is used again: "b" is now the least recently used.
        assert!(matches!(c.lookup(key("a"), 0, 1, t0), Lookup::Hit(..)));
        c.lookup(key("d"), 0, 0, t0);
        c.complete(key("d"), &big(3_000), t0);
        assert!(c.bytes() <= 10_000, "{}", c.bytes());
        assert_eq!(c.len(), 3);
        assert_eq!(c.lookup(key("b"), 0, 9, t0), Lookup::Miss(9), "evicted");
        assert!(matches!(c.lookup(key("a"), 0, 9, t0), Lookup::Hit(..)));
        let s = counters.snapshot();
        assert_eq!((s.size, s.evictions), (3, 1));
        // A result larger than the whole budget is not kept, and pushes out nothing.
        c.lookup(key("huge"), 0, 0, t0);
        c.complete(key("huge"), &big(20_000), t0);
        assert!(c.bytes() <= 10_000);
        assert_eq!(c.len(), 3);
        assert_eq!(c.lookup(key("huge"), 0, 9, t0), Lookup::Miss(9));
    }

    /// A result that is a slice of a larger buffer (a forwarded batch's block) is kept
    /// as a copy of its own.
    #[test]
    fn a_stored_result_holds_no_part_of_a_larger_buffer() {
        let t0 = Instant::now();
        let mut c = cache(10, 10_000);
        let block = bytes::Bytes::from(vec![b'7'; 4096]);
        let mut o = outcome(OpStatus::Succeeded);
        o.result = Some(Json::from_trusted(block.slice(100..102)));
        c.lookup(key("a"), 0, 0, t0);
        c.complete(key("a"), &o, t0);
        let Lookup::Hit(_, kept) = c.lookup(key("a"), 0, 1, t0) else {
            panic!("not stored");
        };
        crate::op::assert_detached(&kept.result.unwrap(), "77", &block);
    }

    proptest::proptest! {
        #[test]
        fn size_never_exceeds_capacity(cap in 1usize..16, keys in proptest::collection::vec(0u8..40, 0..200)) {
            let t0 = Instant::now();
            let mut c = cache(cap, 10_000);
            for k in keys {
                let k = key(&k.to_string());
                if let Lookup::Miss(_) = c.lookup(k.clone(), 0, 0, t0) {
                    c.complete(k, &outcome(OpStatus::Succeeded), t0);
                }
                proptest::prop_assert!(c.len() <= cap);
                proptest::prop_assert_eq!(c.counters.snapshot().size, c.len());
            }
        }
    }
}
