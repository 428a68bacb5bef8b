//! [`InFlight`]: a fixed set of slots, each holding at most one in-flight request, all
//! polled by the one task that owns the set.
//!
//! This is how one bench driver task keeps thousands of requests in flight without a task
//! or an allocation per request: every slot gets its own waker once, at construction; a
//! waker sets the slot's bit in a shared bitmap and wakes the owning task, which then
//! polls only the slots whose bits are set. `FuturesUnordered` does the same job but
//! allocates a node per pushed future.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;

/// Which slots were woken since the owner last looked, and the owner's waker.
struct ReadySet {
    bits: Box<[AtomicU64]>,
    owner: AtomicWaker,
}

impl ReadySet {
    /// Sets slot `idx`'s bit; returns whether it was clear before.
    fn mark(&self, idx: usize) -> bool {
        let bit = 1u64 << (idx % 64);
        self.bits[idx / 64].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }
}

struct SlotWaker {
    set: Arc<ReadySet>,
    idx: usize,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // A bit that was already set has a wake-up on its way (or is about to be seen by
        // the owner's scan): waking again would only cost a reschedule.
        if self.set.mark(self.idx) {
            self.set.owner.wake();
        }
    }
}

/// A fixed number of slots of in-flight futures.
pub(crate) struct InFlight<F> {
    slots: Vec<Option<F>>,
    wakers: Vec<Waker>,
    set: Arc<ReadySet>,
    /// Empty slots, to be handed out by [`take_free`](Self::take_free).
    free: Vec<usize>,
    active: usize,
    /// The bitmap word the next scan starts at.
    cursor: usize,
}

impl<F: Future + Unpin> InFlight<F> {
    pub(crate) fn new(capacity: usize) -> Self {
        let set = Arc::new(ReadySet {
            bits: (0..capacity.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            owner: AtomicWaker::new(),
        });
        let wakers = (0..capacity)
            .map(|idx| {
                Waker::from(Arc::new(SlotWaker {
                    set: set.clone(),
                    idx,
                }))
            })
            .collect();
        InFlight {
            slots: (0..capacity).map(|_| None).collect(),
            wakers,
            set,
            free: (0..capacity).rev().collect(),
            active: 0,
            cursor: 0,
        }
    }

    /// Futures in flight.
    pub(crate) fn active(&self) -> usize {
        self.active
    }

    /// Empty slots.
    pub(crate) fn free_len(&self) -> usize {
        self.free.len()
    }

    /// An empty slot, now reserved for the caller's next [`put`](Self::put).
    pub(crate) fn take_free(&mut self) -> Option<usize> {
        self.free.pop()
    }

    /// Returns a slot from [`take_free`](Self::take_free) unused.
    pub(crate) fn put_back_free(&mut self, idx: usize) {
        self.free.push(idx);
    }

    /// Puts `fut` into the empty slot `idx`; the next [`poll_ready`](Self::poll_ready)
    /// polls it.
    pub(crate) fn put(&mut self, idx: usize, fut: F) {
        debug_assert!(self.slots[idx].is_none(), "slot {idx} is occupied");
        self.slots[idx] = Some(fut);
        self.active += 1;
        self.set.mark(idx);
    }

    /// Polls, once each, the futures that were woken or put since the last call. For each
    /// one that finished, `on_done(slot, output)` may return the slot's next future, which
    /// is polled at once; otherwise the slot becomes free.
    ///
    /// The owner's waker is registered first, so a wake-up that lands after a slot was
    /// looked at schedules another call; the caller returns `Pending` when it has nothing
    /// else to do. When the task's cooperative budget (tokio's) runs out, the scan stops,
    /// the task is woken to go on where it stopped, and `false` is returned.
    pub(crate) fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
        mut on_done: impl FnMut(usize, F::Output) -> Option<F>,
    ) -> bool {
        self.set.owner.register(cx.waker());
        let words = self.set.bits.len();
        // Each scan starts one word further than the last, and a scan cut short by the
        // budget is resumed where it stopped: no slot is served first every time.
        let start = self.cursor;
        self.cursor = if start + 1 < words { start + 1 } else { 0 };
        for w in (start..words).chain(0..start) {
            let mut bits = self.set.bits[w].swap(0, Ordering::AcqRel);
            while bits != 0 {
                if !tokio::task::coop::has_budget_remaining() {
                    // Polling now would only fail and wake the slot again.
                    self.set.bits[w].fetch_or(bits, Ordering::AcqRel);
                    self.cursor = w;
                    cx.waker().wake_by_ref();
                    return false;
                }
                let idx = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let mut slot_cx = Context::from_waker(&self.wakers[idx]);
                while let Some(fut) = self.slots[idx].as_mut() {
                    let Poll::Ready(out) = Pin::new(fut).poll(&mut slot_cx) else {
                        break;
                    };
                    match on_done(idx, out) {
                        Some(next) => self.slots[idx] = Some(next),
                        None => {
                            self.slots[idx] = None;
                            self.active -= 1;
                            self.free.push(idx);
                        }
                    }
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    #[tokio::test]
    async fn every_woken_slot_is_reported_and_refilled() {
        let mut set: InFlight<oneshot::Receiver<u32>> = InFlight::new(130);
        let mut senders = Vec::new();
        for _ in 0..130 {
            let (tx, rx) = oneshot::channel();
            let idx = set.take_free().unwrap();
            set.put(idx, rx);
            senders.push(tx);
        }
        assert!(set.take_free().is_none());
        let mut seen = Vec::new();
        let mut refills = Vec::new();
        std::future::poll_fn(|cx| {
            set.poll_ready(cx, |_, _| None);
            Poll::Ready(())
        })
        .await;
        assert_eq!(set.active(), 130);
        // Complete them out of order, from another task.
        let sender_task = tokio::spawn(async move {
            for (i, tx) in senders.into_iter().enumerate().rev() {
                tx.send(i as u32).unwrap();
                tokio::task::yield_now().await;
            }
        });
        std::future::poll_fn(|cx| {
            set.poll_ready(cx, |idx, out| {
                seen.push(out.unwrap());
                if idx == 7 && refills.is_empty() {
                    let (tx, rx) = oneshot::channel();
                    tx.send(1000).unwrap();
                    refills.push(());
                    return Some(rx);
                }
                None
            });
            if set.active() == 0 {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        sender_task.await.unwrap();
        seen.sort_unstable();
        let mut want: Vec<u32> = (0..130).collect();
        want.push(1000);
        assert_eq!(seen, want);
        assert_eq!(set.free.len(), 130);
    }
}
