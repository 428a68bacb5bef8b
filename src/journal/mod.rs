//! The journal of accepted operations (`engine.journal = true`): an operation the api
//! answers 202 for is on disk before the answer, and a node that restarts from its data
//! dir runs again what it had accepted and not finished.
//!
//! Where it sits on an operation's path: the api admits the operations of a request
//! ([`Node::admit_batch`]: checked, queue slot taken, tracked, not started), hands them to
//! [`Journal::accept`], which encodes each as an [`Entry`] and queues the group for the
//! writer thread. The writer takes everything queued since its last commit, writes it in
//! one redb transaction (fsync'd: group commit, so many requests share one fsync), then
//! starts the operations ([`Node::dispatch`]) and wakes the requests, which answer 202.
//! A write that fails starts nothing: the operations fail with the reason and the
//! requests answer 503 `journal_write_failed`. A watcher task holds each started
//! operation's [`Ticket`]; when the outcome is recorded (readable at `GET /v1/ops/{id}`)
//! it queues the id for removal, and the writer removes ids in groups too, with the next
//! append's commit (or on their own after [`writer::SYNC_AFTER`] without one): removals
//! cost no fsync of their own under load.
//!
//! At start ([`Journal::open`]), before the api serves, every entry left is read back and
//! submitted again with its id, key, idempotency key, owner and what was left of its
//! deadline, tracked like any 202 operation; one whose deadline passed while the node was
//! down ends `expired`, and one the node now refuses (its type gone, say) ends `failed`,
//! each with the reason, readable at `GET /v1/ops/{id}` and removed from the journal.
//!
//! What it guarantees: an operation answered 202 runs at least once, across crashes of
//! the node that accepted it, while its deadline lasts. Not exactly once: one that ran
//! but whose removal was not yet durable when the process died runs again after the
//! restart, with the same id and idempotency key (the built-in HTTP handler sends that
//! key as `Idempotency-Key`), and so does one still running at the end of a shutdown's
//! grace period (the journal is closed before the engine stops, so their entries stay).
//! Operations submitted with `?wait=true` are not journaled: the client holds the
//! connection and learns of a crash from it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use opmesh_actors::job::Job;
use opmesh_actors::metrics::{BucketSnapshot, Buckets, BATCH_BOUNDS, LATENCY_BOUNDS_NS};
use opmesh_actors::{
    Node, OpId, OpOutcome, OpStatus, Operation, SubmitError, Ticket, TraceContext,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

pub use self::entry::{unix_ms, Entry, EntryError, Revived};
pub use self::store::{JournalStore, FILE, FORMAT};
use self::writer::{Append, Write};

pub mod entry;
pub mod store;
mod writer;

/// The journal's settings: on, and where its file is (`<data dir>/journal.redb`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalConfig {
    pub path: PathBuf,
}

/// Why the journal could not open, read or write.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// Not a journal, damaged, not writable, or open in another process.
    #[error("cannot open the journal `{}`: {reason}", path.display())]
    Open { path: PathBuf, reason: String },
    #[error(
        "the journal `{}` has layout version {found}; this build reads version {expected} \
         (move the file away to start without it: the operations in it are then not run \
         again)", path.display()
    )]
    Format {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("cannot read the journal `{}`: {reason}", path.display())]
    Read { path: PathBuf, reason: String },
    #[error(
        "the journal `{}` holds operation {id}, which cannot be read: {error} (move the \
         file away to start without it: the operations in it are then not run again)",
        path.display()
    )]
    Entry {
        path: PathBuf,
        id: OpId,
        error: EntryError,
    },
    /// A write failed; the operations of that group were not accepted.
    #[error("cannot write to the journal: {0}")]
    Write(String),
    /// The node is stopping and the journal no longer takes operations.
    #[error("the journal is closed: the node is stopping")]
    Closed,
}

/// What an accepted operation's answer needs: its id and trace context.
#[derive(Clone, Copy, Debug)]
pub struct Receipt {
    pub id: OpId,
    /// The operation's `op.submit` span, when it is traced.
    pub trace: Option<TraceContext>,
}

/// What recovery found in the journal at start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Submitted again with their ids.
    pub resubmitted: u64,
    /// Their deadline passed while the node was down: ended `expired`.
    pub expired: u64,
    /// Refused by the node as it is now (type gone, limits lowered, queue full): ended
    /// `failed` with the reason.
    pub refused: u64,
}

impl Recovered {
    pub fn total(&self) -> u64 {
        self.resubmitted + self.expired + self.refused
    }
}

/// The journal's counters, written by the writer and recovery, read when scraped.
pub struct JournalStats {
    entries: AtomicU64,
    appended: AtomicU64,
    removed: AtomicU64,
    commits: AtomicU64,
    write_failures: AtomicU64,
    recovered: [AtomicU64; 3],
    /// Time per commit, in nanoseconds.
    commit_ns: Buckets,
    /// Operations appended per commit.
    commit_ops: Buckets,
}

impl Default for JournalStats {
    fn default() -> Self {
        JournalStats {
            entries: AtomicU64::new(0),
            appended: AtomicU64::new(0),
            removed: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
            recovered: Default::default(),
            commit_ns: Buckets::new(LATENCY_BOUNDS_NS),
            commit_ops: Buckets::new(BATCH_BOUNDS),
        }
    }
}

/// The journal's figures, for `/v1/metrics` (`"journal"`).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct JournalFigures {
    /// Operations in the journal: accepted, their result not yet recorded.
    pub entries: u64,
    pub appended: u64,
    pub removed: u64,
    /// Transactions committed, each fsync'd: the appends of many requests together with
    /// the removals gathered meanwhile, or removals alone when nothing is appended.
    pub commits: u64,
    /// Commits that failed; their operations were refused with 503.
    pub write_failures: u64,
    /// Found at start, by what became of them.
    pub recovered: RecoveredFigures,
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct RecoveredFigures {
    pub resubmitted: u64,
    pub expired: u64,
    pub refused: u64,
}

/// What [`JournalStats::recovered`] counts, in its order; the label of
/// `opmesh_journal_recovered_total`.
pub const RECOVERED_OUTCOMES: [&str; 3] = ["resubmitted", "expired", "refused"];

impl JournalStats {
    pub fn figures(&self) -> JournalFigures {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        JournalFigures {
            entries: get(&self.entries),
            appended: get(&self.appended),
            removed: get(&self.removed),
            commits: get(&self.commits),
            write_failures: get(&self.write_failures),
            recovered: RecoveredFigures {
                resubmitted: get(&self.recovered[0]),
                expired: get(&self.recovered[1]),
                refused: get(&self.recovered[2]),
            },
        }
    }

    /// Commit durations (ns) and operations appended per commit that appended.
    pub fn commit_histograms(&self) -> (BucketSnapshot, BucketSnapshot) {
        (self.commit_ns.snapshot(), self.commit_ops.snapshot())
    }
}

/// What the watcher task receives.
enum Watch {
    /// Operations started: remove each from the journal once its outcome is recorded.
    Tickets(Vec<Ticket>),
    /// Queue the removals of what has finished, close the writer, then answer.
    Close(oneshot::Sender<()>),
}

/// The journal of a running node. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    inner: Arc<Inner>,
}

struct Inner {
    node: Node,
    writes: std::sync::mpsc::Sender<Write>,
    watch: mpsc::UnboundedSender<Watch>,
    stats: Arc<JournalStats>,
    path: PathBuf,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl Journal {
    /// Opens the journal at `cfg.path` for `node` and submits again what it holds (see
    /// the module doc); call it once the node runs and before the api serves. Must be
    /// called inside a tokio runtime. Blocks while it reads the file.
    pub fn open(cfg: &JournalConfig, node: Node) -> Result<(Journal, Recovered), JournalError> {
        Journal::start(JournalStore::open(&cfg.path)?, node)
    }

    /// [`open`](Self::open) on a store already open.
    fn start(store: JournalStore, node: Node) -> Result<(Journal, Recovered), JournalError> {
        let path = store.path().to_owned();
        let mut entries = Vec::new();
        for (id, value) in store.entries()? {
            let entry = Entry::decode(&value).map_err(|error| JournalError::Entry {
                path: path.clone(),
                id,
                error,
            })?;
            entries.push((id, entry));
        }
        let stats = Arc::new(JournalStats::default());
        stats.entries.store(entries.len() as u64, Ordering::Relaxed);
        let (writes, rx) = std::sync::mpsc::channel();
        let (watch, watch_rx) = mpsc::unbounded_channel();
        let weak_watch = watch.downgrade();
        {
            let node = node.clone();
            let stats = stats.clone();
            std::thread::Builder::new()
                .name("opmesh-journal".into())
                .spawn(move || writer::run(store, rx, node, weak_watch, stats))
                .map_err(|e| JournalError::Open {
                    path: path.clone(),
                    reason: format!("cannot start its writer thread: {e}"),
                })?;
        }
        tokio::spawn(watch_outcomes(watch_rx, writes.clone()));
        let journal = Journal {
            inner: Arc::new(Inner {
                node,
                writes,
                watch,
                stats,
                path,
            }),
        };
        let recovered = journal.recover(entries)?;
        Ok((journal, recovered))
    }

    /// Submits the entries found at start again (see the module doc).
    fn recover(&self, entries: Vec<(OpId, Entry)>) -> Result<Recovered, JournalError> {
        let node = &self.inner.node;
        let now = Instant::now();
        let now_ms = unix_ms();
        let mut done = Recovered::default();
        let mut finished = Vec::new();
        let mut runs = Vec::new();
        for (id, entry) in entries {
            let revived = entry
                .revive(id, now, now_ms)
                .map_err(|error| JournalError::Entry {
                    path: self.inner.path.clone(),
                    id,
                    error,
                })?;
            match revived {
                Revived::Run(op) => runs.push(op),
                Revived::Expired(op) => {
                    node.record_outcome(
                        &op,
                        OpOutcome::failure(
                            id,
                            OpStatus::Expired,
                            "deadline passed while the node was down (accepted before a \
                             restart, recovered from the journal)",
                        ),
                    );
                    done.expired += 1;
                    finished.push(id);
                }
            }
        }
        // Kept to record a refusal: admitting consumes the operation.
        let heads: Vec<Operation> = runs
            .iter()
            .map(|op| Operation {
                payload: opmesh_actors::Json::null(),
                ..op.clone()
            })
            .collect();
        let mut jobs = Vec::new();
        let mut tickets = Vec::new();
        for (head, admitted) in heads.iter().zip(node.admit_batch(runs, true)) {
            match admitted {
                Ok((job, ticket)) => {
                    jobs.push(job);
                    tickets.push(ticket);
                    done.resubmitted += 1;
                }
                Err(e) => {
                    node.record_outcome(
                        head,
                        OpOutcome::failure(
                            head.id,
                            OpStatus::Failed,
                            format!(
                                "accepted before a restart and recovered from the journal, \
                                 but refused now: {e}"
                            ),
                        ),
                    );
                    done.refused += 1;
                    finished.push(head.id);
                }
            }
        }
        node.dispatch(jobs);
        if !tickets.is_empty() {
            let _ = self.inner.watch.send(Watch::Tickets(tickets));
        }
        if !finished.is_empty() {
            let _ = self.inner.writes.send(Write::Remove(finished));
        }
        let stats = &self.inner.stats;
        for (counter, n) in
            stats
                .recovered
                .iter()
                .zip([done.resubmitted, done.expired, done.refused])
        {
            counter.fetch_add(n, Ordering::Relaxed);
        }
        Ok(done)
    }

    /// Accepts `ops` as [`Node::enqueue_batch`] does, and journals the accepted ones
    /// before starting them: each answer is a [`Receipt`] or why that operation was
    /// refused, in order. `Err` when the write failed (or the journal is closed): then
    /// none of them was accepted, and none runs.
    pub async fn accept(
        &self,
        ops: Vec<Operation>,
    ) -> Result<Vec<Result<Receipt, SubmitError>>, JournalError> {
        let now = Instant::now();
        let now_ms = unix_ms();
        let mut answers = Vec::with_capacity(ops.len());
        let mut append = Append::default();
        for admitted in self.inner.node.admit_batch(ops, true) {
            let (job, ticket) = match admitted {
                Ok(a) => a,
                Err(e) => {
                    answers.push(Err(e));
                    continue;
                }
            };
            match Entry::of(&job.op, job.deadline, now, now_ms).encode() {
                Ok(value) => append.records.push((job.op.id, value)),
                Err(e) => {
                    let e = JournalError::Write(format!("operation {}: {e}", job.op.id));
                    append.jobs.push(job);
                    append.refuse(e.clone());
                    return Err(e);
                }
            }
            answers.push(Ok(Receipt {
                id: ticket.id,
                trace: ticket.trace,
            }));
            append.jobs.push(job);
            append.tickets.push(ticket);
        }
        if append.jobs.is_empty() {
            return Ok(answers);
        }
        let (done, written) = oneshot::channel();
        append.done = Some(done);
        if let Err(std::sync::mpsc::SendError(w)) = self.inner.writes.send(Write::Append(append)) {
            if let Write::Append(a) = w {
                a.refuse(JournalError::Closed);
            }
            return Err(JournalError::Closed);
        }
        written.await.unwrap_or(Err(JournalError::Closed))?;
        Ok(answers)
    }

    /// Accepts one operation (see [`accept`](Self::accept)).
    pub async fn accept_one(
        &self,
        op: Operation,
    ) -> Result<Result<Receipt, SubmitError>, JournalError> {
        let mut answers = self.accept(vec![op]).await?;
        Ok(answers.pop().expect("one answer per operation"))
    }

    /// Stops the journal: queues the removals of the operations that finished, commits
    /// them durably and stops the writer. Operations still running keep their entries
    /// (a restart runs them again). Call it after the drain, before the engine stops.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.watch.send(Watch::Close(tx)).is_err() {
            // The watcher is gone: close the writer directly.
            let (tx, rx) = oneshot::channel();
            if self.inner.writes.send(Write::Close(tx)).is_ok() {
                let _ = rx.await;
            }
            return;
        }
        let _ = rx.await;
    }

    /// The journal's counters, live.
    pub fn stats(&self) -> &Arc<JournalStats> {
        &self.inner.stats
    }

    /// Where the journal's file is.
    pub fn path(&self) -> &std::path::Path {
        &self.inner.path
    }
}

/// The most removals sent to the writer in one message.
const REMOVE_GROUP: usize = 4096;

/// Waits for the outcomes of journaled operations and queues their removal, until the
/// journal closes (or every handle is gone).
async fn watch_outcomes(
    mut rx: mpsc::UnboundedReceiver<Watch>,
    writes: std::sync::mpsc::Sender<Write>,
) {
    let mut running: FuturesUnordered<Ticket> = FuturesUnordered::new();
    // Every outcome ready now, up to a group.
    let ready = |first: Option<OpId>, running: &mut FuturesUnordered<Ticket>| {
        let mut ids: Vec<OpId> = first.into_iter().collect();
        while ids.len() < REMOVE_GROUP {
            match running.next().now_or_never() {
                Some(Some(outcome)) => ids.push(outcome.id),
                _ => break,
            }
        }
        ids
    };
    loop {
        tokio::select! {
            Some(outcome) = running.next(), if !running.is_empty() => {
                let ids = ready(Some(outcome.id), &mut running);
                let _ = writes.send(Write::Remove(ids));
            }
            msg = rx.recv() => match msg {
                Some(Watch::Tickets(t)) => running.extend(t),
                Some(Watch::Close(done)) => {
                    loop {
                        let ids = ready(None, &mut running);
                        if ids.is_empty() {
                            break;
                        }
                        let _ = writes.send(Write::Remove(ids));
                    }
                    let (tx, rx) = oneshot::channel();
                    if writes.send(Write::Close(tx)).is_ok() {
                        let _ = rx.await;
                    }
                    let _ = done.send(());
                    return;
                }
                None => return,
            },
        }
    }
}

/// Fails `jobs` that were admitted but not journaled: they never start.
fn refuse_jobs(jobs: Vec<Box<Job>>, e: &JournalError) {
    for job in jobs {
        let Job { reply, .. } = *job;
        reply.fail(OpStatus::Failed, format!("not accepted: {e}"));
    }
}

#[cfg(test)]
mod tests;
