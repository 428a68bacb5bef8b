//! The journal's writer thread: group commit.
//!
//! It blocks on its queue; when something arrives it takes everything else queued too
//! (up to [`MAX_GROUP_OPS`] appended operations) and writes it all in one redb
//! transaction: fsync'd when it appends (requests wait on it to answer 202), without an
//! fsync when it only removes. Then it starts the appended operations, hands their
//! tickets to the watcher and wakes the requests. While one commit runs, the next group
//! gathers, so under load one fsync carries many requests. Removals committed without an
//! fsync are made durable by the next durable commit, or by an empty one after
//! [`SYNC_AFTER`] without anything to write.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opmesh_actors::job::Job;
use opmesh_actors::{Node, OpId, Ticket};
use tokio::sync::{mpsc, oneshot};

use super::{refuse_jobs, JournalError, JournalStats, JournalStore, Watch};

/// How long removals committed without an fsync wait, at most, for a durable commit.
pub const SYNC_AFTER: Duration = Duration::from_millis(500);

/// The most operations appended in one commit; more wait for the next.
pub const MAX_GROUP_OPS: usize = 65_536;

/// How often a failing journal logs, at most.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// What the writer receives.
pub(super) enum Write {
    /// Operations admitted by one request: write them, then start them.
    Append(Append),
    /// Operations whose outcome is recorded: remove them.
    Remove(Vec<OpId>),
    /// Commit what is pending durably, answer, and stop.
    Close(oneshot::Sender<()>),
}

/// One request's admitted operations, their encoded entries and who waits.
#[derive(Default)]
pub(super) struct Append {
    pub records: Vec<(OpId, Vec<u8>)>,
    pub jobs: Vec<Box<Job>>,
    pub tickets: Vec<Ticket>,
    pub done: Option<oneshot::Sender<Result<(), JournalError>>>,
}

impl Append {
    /// Not journaled: the operations fail with the reason, unstarted, and the request
    /// learns why.
    pub fn refuse(self, e: JournalError) {
        refuse_jobs(self.jobs, &e);
        if let Some(done) = self.done {
            let _ = done.send(Err(e));
        }
    }
}

/// One transaction's worth of work.
#[derive(Default)]
struct Group {
    appends: Vec<Append>,
    ops: usize,
    close: Option<oneshot::Sender<()>>,
}

impl Group {
    fn add(&mut self, w: Write, removes: &mut Vec<OpId>) {
        match w {
            Write::Append(a) => {
                self.ops += a.records.len();
                self.appends.push(a);
            }
            Write::Remove(ids) => removes.extend(ids),
            Write::Close(done) => self.close = Some(done),
        }
    }
}

/// The writer's loop; returns when the journal is closed or every sender is gone.
pub(super) fn run(
    store: JournalStore,
    rx: Receiver<Write>,
    node: Node,
    watch: mpsc::WeakUnboundedSender<Watch>,
    stats: Arc<JournalStats>,
) {
    let mut removes: Vec<OpId> = Vec::new();
    // A commit without an fsync waits for a durable one.
    let mut unsynced = false;
    let mut last_logged: Option<Instant> = None;
    let mut failures_unlogged = 0u64;
    loop {
        let first = if unsynced {
            match rx.recv_timeout(SYNC_AFTER) {
                Ok(w) => Some(w),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(w) => Some(w),
                Err(_) => break,
            }
        };
        let mut group = Group::default();
        let quiet = first.is_none();
        if let Some(w) = first {
            group.add(w, &mut removes);
            while group.ops < MAX_GROUP_OPS && group.close.is_none() {
                match rx.try_recv() {
                    Ok(w) => group.add(w, &mut removes),
                    Err(_) => break,
                }
            }
        }
        let durable = !group.appends.is_empty() || group.close.is_some() || quiet;
        let records: Vec<(OpId, Vec<u8>)> = group
            .appends
            .iter_mut()
            .flat_map(|a| std::mem::take(&mut a.records))
            .collect();
        let started = Instant::now();
        match store.commit(&records, &removes, durable) {
            Ok(removed) => {
                let appended = records.len() as u64;
                stats.commits.fetch_add(1, Ordering::Relaxed);
                stats.appended.fetch_add(appended, Ordering::Relaxed);
                stats.removed.fetch_add(removed, Ordering::Relaxed);
                // Appended before removed: the gauge never dips below zero.
                stats.entries.fetch_add(appended, Ordering::Relaxed);
                stats.entries.fetch_sub(removed, Ordering::Relaxed);
                stats.commit_ns.record(started.elapsed().as_nanos() as u64);
                if appended > 0 {
                    stats.commit_ops.record(appended);
                }
                removes.clear();
                unsynced = !durable;
                let watch = watch.upgrade();
                for a in group.appends {
                    node.dispatch(a.jobs);
                    // Without a watcher (the journal is closing) their entries stay: a
                    // restart runs them again.
                    if let Some(w) = &watch {
                        let _ = w.send(Watch::Tickets(a.tickets));
                    }
                    if let Some(done) = a.done {
                        let _ = done.send(Ok(()));
                    }
                }
            }
            Err(e) => {
                stats.write_failures.fetch_add(1, Ordering::Relaxed);
                failures_unlogged += 1;
                if last_logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                    tracing::error!(
                        path = %store.path().display(),
                        failures = failures_unlogged,
                        "{e}: submissions that need the journal are refused (503 \
                         journal_write_failed) until a write succeeds"
                    );
                    last_logged = Some(Instant::now());
                    failures_unlogged = 0;
                }
                // The removals are tried again with the next commit.
                for a in group.appends {
                    a.refuse(e.clone());
                }
            }
        }
        if let Some(done) = group.close {
            // Whatever came after the close is refused, not left to be dropped.
            while let Ok(w) = rx.try_recv() {
                if let Write::Append(a) = w {
                    a.refuse(JournalError::Closed);
                }
            }
            // The file is released before the close is answered: it may be opened again
            // at once.
            drop(store);
            let _ = done.send(());
            return;
        }
    }
    // Every sender is gone: make the last removals durable.
    if !removes.is_empty() || unsynced {
        if let Err(e) = store.commit(&[], &removes, true) {
            tracing::warn!(path = %store.path().display(), "journal: the last removals were not written: {e}");
        }
    }
}
