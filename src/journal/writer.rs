//! The journal's writer thread: group commit.
//!
//! It blocks on its queue; when something arrives it takes everything else queued too
//! (up to [`MAX_GROUP_OPS`] appended operations) and writes the appends in one redb
//! transaction, fsync'd before it returns. Then it starts the appended operations, hands
//! their tickets to the watcher and wakes the requests, which answer 202. While one
//! commit runs, the next group gathers, so under load one fsync carries many requests.
//! Removals never cost a commit of their own while operations arrive: they ride on the
//! next append's commit, or, when nothing is appended, wait at most [`SYNC_AFTER`] (see
//! [`next_step`], the decision, kept pure).

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opmesh_actors::job::Job;
use opmesh_actors::{Node, OpId, Ticket};
use tokio::sync::{mpsc, oneshot};

use super::{refuse_jobs, JournalError, JournalStats, JournalStore, Watch};

/// How long removals wait, at most, for an append's commit to ride on.
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

/// One transaction's worth of work, gathered.
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

/// What the writer does next.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Commit what is gathered.
    Commit,
    /// Wait for more, at most this long (`None`: until something arrives).
    Wait(Option<Duration>),
}

/// Removals waiting for a commit at most; past it they commit on their own.
const MAX_PENDING_REMOVES: usize = 65_536;

/// The writer's decision, from what it has gathered: appends and a close commit at once
/// (requests wait on them); removals alone wait to ride on the next commit, for at most
/// [`SYNC_AFTER`] from the first of them (`removes_since`), or until there are
/// [`MAX_PENDING_REMOVES`].
fn next_step(
    appends: usize,
    close: bool,
    removes: usize,
    removes_since: Option<Instant>,
    now: Instant,
) -> Step {
    if appends > 0 || close || removes >= MAX_PENDING_REMOVES {
        return Step::Commit;
    }
    match removes_since {
        Some(since) if removes > 0 => {
            let due = since + SYNC_AFTER;
            if now >= due {
                Step::Commit
            } else {
                Step::Wait(Some(due - now))
            }
        }
        _ => Step::Wait(None),
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
    let mut group = Group::default();
    let mut removes: Vec<OpId> = Vec::new();
    let mut removes_since: Option<Instant> = None;
    let mut last_logged: Option<Instant> = None;
    let mut failures_unlogged = 0u64;
    loop {
        let step = next_step(
            group.appends.len(),
            group.close.is_some(),
            removes.len(),
            removes_since,
            Instant::now(),
        );
        if let Step::Wait(timeout) = step {
            let first = match timeout {
                None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(t) => rx.recv_timeout(t),
            };
            match first {
                Ok(w) => group.add(w, &mut removes),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            }
            // Everything else queued joins the same commit.
            while group.ops < MAX_GROUP_OPS && group.close.is_none() {
                match rx.try_recv() {
                    Ok(w) => group.add(w, &mut removes),
                    Err(_) => break,
                }
            }
            if !removes.is_empty() && removes_since.is_none() {
                removes_since = Some(Instant::now());
            }
            continue;
        }
        let mut batch = std::mem::take(&mut group);
        let records: Vec<(OpId, Vec<u8>)> = batch
            .appends
            .iter_mut()
            .flat_map(|a| std::mem::take(&mut a.records))
            .collect();
        let started = Instant::now();
        match store.commit(&records, &removes) {
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
                removes_since = None;
                let watch = watch.upgrade();
                for a in batch.appends {
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
                // The removals are tried again with the next commit, at the latest after
                // SYNC_AFTER.
                removes_since = Some(Instant::now());
                for a in batch.appends {
                    a.refuse(e.clone());
                }
            }
        }
        if let Some(done) = batch.close {
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
    // Every sender is gone: write the last removals (what was gathered but not committed
    // is refused).
    for a in group.appends {
        a.refuse(JournalError::Closed);
    }
    if !removes.is_empty() {
        if let Err(e) = store.commit(&[], &removes) {
            tracing::warn!(path = %store.path().display(), "journal: the last removals were not written: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_and_a_close_commit_at_once_removals_wait_to_ride_along() {
        let t0 = Instant::now();
        assert_eq!(next_step(0, false, 0, None, t0), Step::Wait(None));
        assert_eq!(next_step(3, false, 0, None, t0), Step::Commit);
        assert_eq!(next_step(0, true, 0, None, t0), Step::Commit);
        // Removals alone wait, at most SYNC_AFTER from the first of them.
        let later = t0 + Duration::from_millis(100);
        assert_eq!(
            next_step(5, false, 7, Some(t0), later),
            Step::Commit,
            "they ride on the appends' commit"
        );
        assert_eq!(
            next_step(0, false, 7, Some(t0), later),
            Step::Wait(Some(SYNC_AFTER - Duration::from_millis(100)))
        );
        assert_eq!(
            next_step(0, false, 7, Some(t0), t0 + SYNC_AFTER),
            Step::Commit
        );
        assert_eq!(
            next_step(0, false, MAX_PENDING_REMOVES, Some(t0), t0),
            Step::Commit,
            "too many wait no longer"
        );
    }
}
