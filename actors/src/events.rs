//! Live events: what the node does, as it does it, for whoever watches
//! (`GET /v1/events`, the dashboard, a library user).
//!
//! Publishing costs one atomic load when nobody watches that kind of event: the event is
//! not even built. Each subscriber has its own bounded buffer; when it is full, the
//! subscriber misses events and is told how many on its next read. A slow watcher never
//! slows operations down, and never makes another watcher miss anything.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use tokio::sync::Notify;

use crate::breaker::BreakerState;
use crate::op::{NodeId, OpId, OpStatus, OpType};

/// The kinds of event, as `GET /v1/events` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EventKind {
    BatchScheduled = 1,
    OperationStarted = 2,
    OperationSuccess = 4,
    OperationFailure = 8,
    MetricsCollected = 16,
    BreakerOpened = 32,
    BreakerClosed = 64,
}

impl EventKind {
    pub const ALL: [EventKind; 7] = [
        EventKind::BatchScheduled,
        EventKind::OperationStarted,
        EventKind::OperationSuccess,
        EventKind::OperationFailure,
        EventKind::MetricsCollected,
        EventKind::BreakerOpened,
        EventKind::BreakerClosed,
    ];

    /// The event's name on the wire (the SSE `event:` field).
    pub fn name(self) -> &'static str {
        match self {
            EventKind::BatchScheduled => "batch:scheduled",
            EventKind::OperationStarted => "operation:started",
            EventKind::OperationSuccess => "operation:success",
            EventKind::OperationFailure => "operation:failure",
            EventKind::MetricsCollected => "metrics:collected",
            EventKind::BreakerOpened => "breaker:opened",
            EventKind::BreakerClosed => "breaker:closed",
        }
    }

    pub fn from_name(name: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.name() == name)
    }

    fn bit(self) -> u8 {
        self as u8
    }
}

/// A set of event kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kinds(u8);

impl Kinds {
    pub const ALL: Kinds = Kinds(127);

    pub fn of(kinds: impl IntoIterator<Item = EventKind>) -> Kinds {
        Kinds(kinds.into_iter().fold(0, |m, k| m | k.bit()))
    }

    pub fn contains(self, k: EventKind) -> bool {
        self.0 & k.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// One event. Serializes as the SSE `data:` of its kind.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum Event {
    /// The Scheduler handed a batch to the Executor.
    BatchScheduled {
        node: NodeId,
        #[serde(rename = "type")]
        op_type: OpType,
        size: usize,
        timestamp: u64,
    },
    /// An operation's handler started.
    OperationStarted {
        id: OpId,
        node: NodeId,
        #[serde(rename = "type")]
        op_type: OpType,
        #[serde(skip_serializing_if = "Option::is_none")]
        trace_id: Option<String>,
        timestamp: u64,
        /// Who submitted it: with API tokens on, only they and admins see the event.
        #[serde(skip)]
        owner: Option<Arc<str>>,
    },
    /// An operation finished: succeeded (`operation:success`), or failed or expired
    /// (`operation:failure`).
    OperationFinished {
        id: OpId,
        node: NodeId,
        #[serde(rename = "type")]
        op_type: OpType,
        status: OpStatus,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        cached: bool,
        attempts: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        executed_by: Option<NodeId>,
        duration_us: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        trace_id: Option<String>,
        timestamp: u64,
        /// Who submitted it: with API tokens on, only they and admins see the event.
        #[serde(skip)]
        owner: Option<Arc<str>>,
    },
    /// A periodic snapshot of the node's figures (whatever the publisher collected).
    MetricsCollected(serde_json::Value),
    /// A circuit breaker opened (`breaker:opened`: submissions of its types are refused
    /// until `retry_at`) or closed again (`breaker:closed`).
    Breaker {
        node: NodeId,
        /// The type it guards, or the target its types share (a webhook URL).
        breaker: String,
        /// The types it guards.
        types: Vec<OpType>,
        state: BreakerState,
        /// Failures that opened it.
        #[serde(skip_serializing_if = "Option::is_none")]
        failures: Option<u32>,
        /// When it lets trial operations through, in milliseconds since the Unix epoch.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_at: Option<u64>,
        timestamp: u64,
    },
}

impl Event {
    /// Who submitted the operation an event is about (`None` for node-wide events, and
    /// for operations submitted without a token).
    pub fn owner(&self) -> Option<&str> {
        match self {
            Event::OperationStarted { owner, .. } | Event::OperationFinished { owner, .. } => {
                owner.as_deref()
            }
            _ => None,
        }
    }

    pub fn kind(&self) -> EventKind {
        match self {
            Event::BatchScheduled { .. } => EventKind::BatchScheduled,
            Event::OperationStarted { .. } => EventKind::OperationStarted,
            Event::OperationFinished { status, .. } if *status == OpStatus::Succeeded => {
                EventKind::OperationSuccess
            }
            Event::OperationFinished { .. } => EventKind::OperationFailure,
            Event::MetricsCollected(_) => EventKind::MetricsCollected,
            Event::Breaker { state, .. } if *state == BreakerState::Closed => {
                EventKind::BreakerClosed
            }
            Event::Breaker { .. } => EventKind::BreakerOpened,
        }
    }
}

/// Milliseconds since the Unix epoch, as events carry it.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Subscriber {
    kinds: Kinds,
    capacity: usize,
    queue: Mutex<VecDeque<Arc<Event>>>,
    /// Events missed since the subscriber last read.
    dropped: AtomicU64,
    notify: Notify,
}

/// Fans events out to subscribers.
#[derive(Default)]
pub struct EventBus {
    subscribers: RwLock<Vec<Arc<Subscriber>>>,
    /// The union of the subscribers' kinds: what is worth building.
    interest: AtomicU8,
    /// Events missed by any subscriber since start.
    dropped_total: AtomicU64,
}

impl EventBus {
    /// Whether anybody watches `kind`.
    #[inline]
    pub fn wants(&self, kind: EventKind) -> bool {
        self.interest.load(Ordering::Relaxed) & kind.bit() != 0
    }

    /// Publishes the event `make` builds, if anybody watches `kind`.
    #[inline]
    pub fn publish(&self, kind: EventKind, make: impl FnOnce() -> Event) {
        if self.wants(kind) {
            self.publish_now(kind, make());
        }
    }

    #[cold]
    fn publish_now(&self, kind: EventKind, event: Event) {
        let event = Arc::new(event);
        for s in self.subscribers.read().iter() {
            if !s.kinds.contains(kind) {
                continue;
            }
            let mut q = s.queue.lock();
            if q.len() >= s.capacity {
                drop(q);
                s.dropped.fetch_add(1, Ordering::Relaxed);
                self.dropped_total.fetch_add(1, Ordering::Relaxed);
            } else {
                q.push_back(event.clone());
                drop(q);
                s.notify.notify_one();
            }
        }
    }

    /// Watches `kinds`, with room for `capacity` unread events.
    pub fn subscribe(self: &Arc<Self>, kinds: Kinds, capacity: usize) -> Subscription {
        let sub = Arc::new(Subscriber {
            kinds,
            capacity: capacity.max(1),
            queue: Mutex::new(VecDeque::new()),
            dropped: AtomicU64::new(0),
            notify: Notify::new(),
        });
        let mut subs = self.subscribers.write();
        subs.push(sub.clone());
        self.recompute(&subs);
        Subscription {
            bus: self.clone(),
            sub,
        }
    }

    fn recompute(&self, subs: &[Arc<Subscriber>]) {
        let mask = subs.iter().fold(0u8, |m, s| m | s.kinds.0);
        self.interest.store(mask, Ordering::Relaxed);
    }

    /// How many subscribers watch now.
    pub fn subscribers(&self) -> usize {
        self.subscribers.read().len()
    }

    /// Events missed by slow subscribers since start.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }
}

/// What a subscriber reads next.
#[derive(Debug)]
pub enum Received {
    Event(Arc<Event>),
    /// This many events were missed (the buffer was full) since the last read.
    Dropped(u64),
}

/// A subscriber's end. Dropping it unsubscribes.
pub struct Subscription {
    bus: Arc<EventBus>,
    sub: Arc<Subscriber>,
}

impl Subscription {
    /// The next event, or how many were missed before it, without waiting.
    pub fn try_next(&self) -> Option<Received> {
        let missed = self.sub.dropped.swap(0, Ordering::Relaxed);
        if missed > 0 {
            return Some(Received::Dropped(missed));
        }
        self.sub.queue.lock().pop_front().map(Received::Event)
    }

    /// Waits for the next event (or a count of missed ones).
    pub async fn next(&self) -> Received {
        loop {
            let notified = self.sub.notify.notified();
            if let Some(r) = self.try_next() {
                return r;
            }
            notified.await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut subs = self.bus.subscribers.write();
        subs.retain(|s| !Arc::ptr_eq(s, &self.sub));
        self.bus.recompute(&subs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(size: usize) -> Event {
        Event::BatchScheduled {
            node: "n".into(),
            op_type: "t".into(),
            size,
            timestamp: 0,
        }
    }

    #[test]
    fn nothing_is_built_without_a_watcher() {
        let bus = Arc::new(EventBus::default());
        bus.publish(EventKind::BatchScheduled, || unreachable!("nobody watches"));
        let sub = bus.subscribe(Kinds::of([EventKind::OperationFailure]), 4);
        bus.publish(EventKind::BatchScheduled, || unreachable!("not this kind"));
        assert!(bus.wants(EventKind::OperationFailure));
        drop(sub);
        assert!(!bus.wants(EventKind::OperationFailure));
        assert_eq!(bus.subscribers(), 0);
    }

    #[test]
    fn a_full_buffer_drops_and_counts_for_that_subscriber_only() {
        let bus = Arc::new(EventBus::default());
        let slow = bus.subscribe(Kinds::ALL, 2);
        let fast = bus.subscribe(Kinds::ALL, 100);
        for i in 0..5 {
            bus.publish(EventKind::BatchScheduled, || batch(i));
        }
        assert!(matches!(slow.try_next(), Some(Received::Dropped(3))));
        let sizes: Vec<usize> = std::iter::from_fn(|| match slow.try_next() {
            Some(Received::Event(e)) => match &*e {
                Event::BatchScheduled { size, .. } => Some(*size),
                _ => None,
            },
            _ => None,
        })
        .collect();
        assert_eq!(sizes, vec![0, 1]);
        let mut n = 0;
        while let Some(Received::Event(_)) = fast.try_next() {
            n += 1;
        }
        assert_eq!(n, 5);
        assert_eq!(bus.dropped_total(), 3);
    }

    #[tokio::test]
    async fn next_waits_for_an_event() {
        let bus = Arc::new(EventBus::default());
        let sub = bus.subscribe(Kinds::of([EventKind::BatchScheduled]), 8);
        let b = bus.clone();
        tokio::spawn(async move { b.publish(EventKind::BatchScheduled, || batch(7)) });
        match tokio::time::timeout(std::time::Duration::from_secs(5), sub.next()).await {
            Ok(Received::Event(e)) => assert_eq!(e.kind(), EventKind::BatchScheduled),
            other => panic!("{other:?}"),
        }
    }
}
