//! Counters that every core adds to at once without sharing a cache line.
//!
//! One atomic counted by every thread is one cache line moved between cores on every
//! add: with the hot path sharded, such a line would be the node's bottleneck. A
//! [`Counter`] keeps one cell per *stripe*, on a line of its own; a thread always adds
//! to the same stripe (threads take stripes in turn), and a reader sums the stripes.
//! Adding costs what an uncontended atomic add costs; reading costs a few loads per
//! stripe, done when metrics are scraped.
//!
//! A reference count is such a counter too: every operation holds its node and its
//! type, and an `Arc` cloned by every core is a line moved on every clone and drop. A
//! [`StripedArc`] hands each thread a clone of its own stripe's anchor instead.

use std::cell::Cell as StdCell;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// How many stripes each counter has: four per core (threads take stripes in turn, and
/// a process has more threads than cores: runtime workers, HTTP workers, blocking
/// threads), a power of two from 8 to 256.
pub(crate) fn stripes() -> usize {
    static STRIPES: OnceLock<usize> = OnceLock::new();
    *STRIPES.get_or_init(|| {
        (std::thread::available_parallelism().map_or(1, |n| n.get()) * 4)
            .next_power_of_two()
            .clamp(8, 256)
    })
}

/// The calling thread's stripe, below [`stripes`]: threads take stripes in turn as they
/// first count.
pub(crate) fn stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static STRIPE: StdCell<usize> = const { StdCell::new(usize::MAX) };
    }
    STRIPE.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT.fetch_add(1, Ordering::Relaxed) & (stripes() - 1));
        }
        s.get()
    })
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
        self.cells[stripe()].0.fetch_add(n, Ordering::Relaxed);
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
}
