//! Counters that every core adds to at once without sharing a cache line.
//!
//! One atomic counted by every thread is one cache line moved between cores on every
//! add: with the hot path sharded, such a line would be the node's bottleneck. A
//! [`Counter`] keeps one cell per *stripe*, on a line of its own, and a reader sums the
//! stripes (a few loads per stripe, done when metrics are scraped).
//!
//! A thread *owns* a stripe while it lives (it claims a free one when it first counts
//! and gives it back when it ends): it alone adds to that stripe's cells, so an add is
//! a plain load and store, not a locked read-modify-write (about ten times cheaper, and
//! it does not stall the loads behind it; completing an operation adds to a dozen
//! cells). A quarter of the stripes are never owned: when every other stripe is, a
//! thread takes one of those in turn and adds to it atomically, as every thread did
//! before (so a process with more counting threads than stripes degrades to that, not
//! to one shared line).
//!
//! A reference count is such a counter too: every operation holds its node and its
//! type, and an `Arc` cloned by every core is a line moved on every clone and drop. A
//! [`StripedArc`] hands each thread a clone of its own stripe's anchor instead.

use std::cell::Cell as StdCell;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// How many stripes each counter has: four per core (a process has more threads than
/// cores: runtime workers, HTTP workers, blocking threads), a power of two from 16 to
/// 256.
pub(crate) fn stripes() -> usize {
    static STRIPES: OnceLock<usize> = OnceLock::new();
    *STRIPES.get_or_init(|| {
        (std::thread::available_parallelism().map_or(1, |n| n.get()) * 4)
            .next_power_of_two()
            .clamp(16, 256)
    })
}

/// A thread's stripe, and whether the thread owns it (see the module's docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Place {
    pub(crate) index: usize,
    pub(crate) owned: bool,
}

/// How many stripes, from 0, are never owned: a quarter.
fn shared_stripes() -> usize {
    stripes() / 4
}

/// A shared stripe, the next in turn: where a thread counts when every other stripe is
/// owned.
fn shared() -> Place {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    Place {
        index: NEXT.fetch_add(1, Ordering::Relaxed) % shared_stripes(),
        owned: false,
    }
}

/// Where a thread counts once its claim is gone, while it ends.
const ENDING: Place = Place {
    index: 0,
    owned: false,
};

/// Which stripes a thread owns now (the shared ones never are).
fn owners() -> &'static [AtomicBool] {
    static OWNERS: OnceLock<Box<[AtomicBool]>> = OnceLock::new();
    OWNERS.get_or_init(|| (0..stripes()).map(|_| AtomicBool::new(false)).collect())
}

/// A thread's claim on its stripe, given back when the thread ends.
struct Claim(StdCell<Option<Place>>);

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(Place { index, owned: true }) = self.0.get() {
            // Release: the next owner's first load sees this thread's last store.
            owners()[index].store(false, Ordering::Release);
        }
    }
}

/// Claims a free stripe, the search starting at a different one for each thread, or
/// takes a shared one.
fn claim() -> Place {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let owners = owners();
    let (first, ownable) = (shared_stripes(), owners.len() - shared_stripes());
    let start = NEXT.fetch_add(1, Ordering::Relaxed);
    (0..ownable)
        .map(|i| first + (start + i) % ownable)
        .find(|&i| {
            owners[i]
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        })
        .map_or_else(shared, |index| Place { index, owned: true })
}

/// The calling thread's place: its own stripe, claimed when it first counts, or a
/// shared one.
pub(crate) fn place() -> Place {
    thread_local! {
        static CLAIM: Claim = const { Claim(StdCell::new(None)) };
    }
    CLAIM
        .try_with(|c| {
            c.0.get().unwrap_or_else(|| {
                let p = claim();
                c.0.set(Some(p));
                p
            })
        })
        // The thread is ending and its claim is gone: count atomically.
        .unwrap_or(ENDING)
}

/// The calling thread's stripe, below [`stripes`].
pub(crate) fn stripe() -> usize {
    place().index
}

/// Adds `n` to the calling thread's cell of a striped value: a plain load and store when
/// the thread owns the cell's stripe (it alone writes it), an atomic add otherwise.
pub(crate) fn add_at(cell: &AtomicU64, place: Place, n: u64) {
    if place.owned {
        cell.store(
            cell.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    } else {
        cell.fetch_add(n, Ordering::Relaxed);
    }
}

/// A value on a cache line of its own (128 bytes: adjacent-line prefetching pulls lines
/// in pairs on x86).
#[repr(align(128))]
#[derive(Default, Debug)]
pub struct Padded<T>(pub T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// A reference to a [`StripedArc`]'s value: it keeps the value alive, and cloning or
/// dropping it counts on the anchor of one stripe. Derefs to the `Arc<T>`.
pub type Anchor<T> = Arc<Padded<Arc<T>>>;

/// An `Arc<T>` with one anchor per stripe, each an allocation on lines of its own: a
/// thread takes its references from its stripe's anchor ([`anchor`](Self::anchor)), so
/// two cores rarely count references on the same line.
pub struct StripedArc<T> {
    anchors: Box<[Anchor<T>]>,
}

impl<T> Clone for StripedArc<T> {
    fn clone(&self) -> Self {
        StripedArc {
            anchors: self.anchors.clone(),
        }
    }
}

impl<T> std::ops::Deref for StripedArc<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.get()
    }
}

impl<T> StripedArc<T> {
    pub fn new(value: Arc<T>) -> Self {
        StripedArc {
            anchors: (0..stripes())
                .map(|_| Arc::new(Padded(value.clone())))
                .collect(),
        }
    }

    /// The value, for reading (no reference taken).
    pub fn get(&self) -> &Arc<T> {
        &self.anchors[0].0
    }

    /// A reference for the calling thread, counted on its stripe's anchor.
    pub fn anchor(&self) -> Anchor<T> {
        self.anchors[stripe()].clone()
    }
}

/// A monotonic counter, striped by thread.
pub struct Counter {
    cells: Box<[Padded<AtomicU64>]>,
}

impl Default for Counter {
    fn default() -> Self {
        Counter {
            cells: (0..stripes()).map(|_| Padded::default()).collect(),
        }
    }
}

impl Counter {
    pub fn add(&self, n: u64) {
        let p = place();
        add_at(&self.cells[p.index].0, p, n);
    }

    pub fn inc(&self) {
        self.add(1)
    }

    /// The sum of every stripe. Adds that race with the read may or may not be in it.
    pub fn get(&self) -> u64 {
        self.cells
            .iter()
            .fold(0u64, |a, c| a.wrapping_add(c.0.load(Ordering::Relaxed)))
    }
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Counter({})", self.get())
    }
}

/// A value that goes up and down, striped by thread: one thread's stripe may go below
/// zero (what one thread adds another takes away), the sum never does.
pub(crate) struct Gauge {
    cells: Box<[Padded<AtomicI64>]>,
}

impl Default for Gauge {
    fn default() -> Self {
        Gauge {
            cells: (0..stripes()).map(|_| Padded::default()).collect(),
        }
    }
}

impl Gauge {
    pub(crate) fn add(&self, n: i64, order: Ordering) {
        self.cells[stripe()].0.fetch_add(n, order);
    }

    /// The sum of every stripe, each read with `order`. Exact when nothing is added
    /// meanwhile; while values only go down (a draining node), never above the truth
    /// at the end of the read.
    pub(crate) fn get(&self, order: Ordering) -> i64 {
        self.cells
            .iter()
            .fold(0i64, |a, c| a.wrapping_add(c.0.load(order)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn adds_from_many_threads_are_all_counted() {
        let c = Arc::new(Counter::default());
        let g = Arc::new(Gauge::default());
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (c, g) = (c.clone(), g.clone());
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        c.inc();
                        // Half the threads add what the other half take away.
                        g.add(if i % 2 == 0 { 1 } else { -1 }, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.get(), 80_000);
        assert_eq!(g.get(Ordering::SeqCst), 0);
        c.add(5);
        assert_eq!(c.get(), 80_005);
    }

    #[test]
    fn anchors_keep_the_value_alive_and_count_apart() {
        let value = Arc::new(7u32);
        let striped = StripedArc::new(value.clone());
        assert_eq!(Arc::strong_count(&value), 1 + stripes());
        let a = striped.anchor();
        assert_eq!(***a, 7);
        assert!(Arc::ptr_eq(&a.0, &value));
        assert!(Arc::ptr_eq(striped.get(), &value));
        // The anchor's own count moved, not the value's.
        assert_eq!(Arc::strong_count(&value), 1 + stripes());
        drop(striped);
        assert_eq!(***a, 7, "a reference outlives the striped handle");
        drop(a);
        assert_eq!(Arc::strong_count(&value), 1);
        assert_eq!(std::mem::align_of::<Padded<Arc<u32>>>(), 128);
    }

    #[test]
    fn a_thread_keeps_its_stripe() {
        let s = stripe();
        assert!(s < stripes());
        assert_eq!(stripe(), s);
        assert!(stripes().is_power_of_two());
    }

    /// The two tests that claim many stripes, one at a time: each would take the
    /// other's.
    static MANY_STRIPES: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Threads alive at once own different stripes, and a thread that ends gives its
    /// stripe back: threads that run one after another, more of them than there are
    /// stripes, each own one (without the give-back, the later ones would all share).
    #[test]
    fn threads_own_stripes_of_their_own_and_give_them_back() {
        let _one = MANY_STRIPES.lock().unwrap_or_else(|e| e.into_inner());
        let barrier = Arc::new(std::sync::Barrier::new(4));
        let live: Vec<Place> = (0..4)
            .map(|_| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let p = place();
                    barrier.wait();
                    p
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let owned: Vec<usize> = live.iter().filter(|p| p.owned).map(|p| p.index).collect();
        let distinct: std::collections::HashSet<_> = owned.iter().collect();
        assert_eq!(distinct.len(), owned.len(), "{live:?}");
        assert!(
            owned.iter().all(|&i| i >= shared_stripes()),
            "the shared stripes are never owned: {live:?}"
        );
        for i in 0..2 * stripes() {
            let p = std::thread::spawn(place).join().unwrap();
            assert!(p.owned && p.index >= shared_stripes(), "thread {i}: {p:?}");
        }
    }

    /// More threads than stripes count at once: those without a stripe of their own
    /// take the shared stripes in turn and add to them atomically, and no add is lost.
    #[test]
    fn with_every_stripe_owned_the_rest_share_and_nothing_is_lost() {
        let _one = MANY_STRIPES.lock().unwrap_or_else(|e| e.into_inner());
        let n = stripes() + 8;
        let c = Arc::new(Counter::default());
        let b = Arc::new(crate::metrics::Buckets::new(&[10]));
        let barrier = Arc::new(std::sync::Barrier::new(n));
        let places: Vec<Place> = (0..n)
            .map(|_| {
                let (c, b, barrier) = (c.clone(), b.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let p = place();
                    // Every thread holds its place until all have one.
                    barrier.wait();
                    for i in 0..20_000u64 {
                        c.inc();
                        b.record(i % 20);
                    }
                    p
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let shared: std::collections::HashSet<usize> = places
            .iter()
            .filter(|p| !p.owned)
            .map(|p| p.index)
            .collect();
        assert!(
            shared.len() > 1 && shared.iter().all(|&i| i < shared_stripes()),
            "the threads without a stripe share several: {places:?}"
        );
        assert_eq!(c.get(), 20_000 * n as u64);
        let snap = b.snapshot();
        assert_eq!(snap.count, 20_000 * n as u64);
        assert_eq!(snap.cumulative, vec![(10, 11_000 * n as u64)]);
        assert_eq!(snap.sum, (0..20).sum::<u64>() * 1_000 * n as u64);
    }
}
