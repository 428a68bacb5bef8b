//! The Executor actor: runs batches of operations through their handlers. Each
//! [shard](crate::shard) has one, fed by its Scheduler.
//!
//! Each batch runs in a task of its own, its operations concurrently, so a slow handler
//! never holds the mailbox. Each operation's handler is polled once as its batch starts:
//! one that is done at once (most are) completes there, without a deadline timer or a
//! future of its own; the others go on concurrently. Every operation runs under its deadline with its type's
//! retry policy: [`RetryPolicy::decide`](crate::RetryPolicy::decide) says whether to run
//! again and how long to wait first (backoff with jitter, retryable errors only), the
//! Executor only waits. Blocking handlers go to the blocking pool; a handler that panics
//! fails its operation, not the node. A finished operation gives its running slot back at
//! once, waking the Scheduler if it waits for one, and tells its type's circuit breaker
//! how it went (see [`crate::breaker`] for what counts as a failure).

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::handler::{
    GiveUpReason, HandlerError, HandlerFuture, HandlerKind, HandlerResult, RetryDecision,
};
use crate::job::{Handoff, Job};
use crate::op::{Json, OpOutcome, OpStatus, TraceContext};
use crate::shared::NodeShared;
use crate::slots::{RunningSlot, SlotReturns, Started};
use crate::trace;

/// Messages of the [`Executor`] actor.
pub enum ExecutorMsg {
    /// A batch the Scheduler started, with its running slots.
    Run(Started),
}

pub struct Executor;

/// Operations one task runs where the runtime has several threads; a larger batch is
/// split over several tasks there (on a runtime of one thread it is one task).
const TASK_CHUNK: usize = 32;

pub struct ExecutorArgs {
    pub(crate) shared: Arc<NodeShared>,
}

pub struct ExecutorState {
    shared: Arc<NodeShared>,
}

impl Actor for Executor {
    type Msg = ExecutorMsg;
    type State = ExecutorState;
    type Arguments = ExecutorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ExecutorMsg>,
        args: ExecutorArgs,
    ) -> Result<ExecutorState, ActorProcessingErr> {
        Ok(ExecutorState {
            shared: args.shared,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ExecutorMsg>,
        msg: ExecutorMsg,
        state: &mut ExecutorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ExecutorMsg::Run(mut batch) => {
                // A batch runs as several tasks so every worker thread can take a share:
                // on a runtime of one thread (the HTTP server's workers) it is one task,
                // as there is nobody to share with.
                let share = shares_tasks();
                while share && batch.len() > TASK_CHUNK {
                    let rest = batch.split_off(TASK_CHUNK);
                    tokio::spawn(run_batch(state.shared.clone(), batch));
                    batch = rest;
                }
                tokio::spawn(run_batch(state.shared.clone(), batch));
            }
        }
        Ok(())
    }
}

/// Whether the runtime this runs on has more than one worker thread to run tasks on.
fn shares_tasks() -> bool {
    tokio::runtime::Handle::current().runtime_flavor()
        != tokio::runtime::RuntimeFlavor::CurrentThread
}

async fn run_batch(shared: Arc<NodeShared>, batch: Started) {
    // A batch is of one type: its slots go back to that type.
    let Some(entry) = batch.first().map(|j| j.reply.slot.anchor().clone()) else {
        return;
    };
    // Declared first, dropped last: it gives back whatever the operations below left.
    let returns = SlotReturns::new(&shared, entry);
    let n = batch.len();
    let mut started = batch.run(&returns);
    // Each operation's handler is called and polled once here: one that is done at once
    // (most are: echo, a lookup) completes without a place in the set below, a timer or
    // a state machine of its own; the others go on there. The clock is read once per
    // operation: when one ends (or its first poll returns), which is when the next starts.
    // Those that end at once are handed to their waiters together, once all started.
    let mut clock = Instant::now();
    let mut handoff = Handoff::with_capacity(n);
    let mut running: FuturesUnordered<_> = std::future::poll_fn(|cx| {
        Poll::Ready(
            started
                .by_ref()
                .filter_map(|(job, slot)| {
                    start_one(&shared, job, slot, cx, &mut clock, &mut handoff)
                })
                .map(|(job, slot, first)| run_one(&shared, job, slot, first))
                .collect(),
        )
    })
    .await;
    drop(handoff);
    // Runs the operations; whenever the task is about to wait, the running slots of
    // those that finished go back to the node at once.
    let all_done = std::future::poll_fn(|cx| loop {
        match running.poll_next_unpin(cx) {
            Poll::Ready(Some(())) => continue,
            Poll::Ready(None) => return Poll::Ready(()),
            Poll::Pending => {
                returns.flush();
                return Poll::Pending;
            }
        }
    });
    tokio::select! {
        biased;
        _ = all_done => {}
        // The shutdown grace period is over: dropping the operations still running fails
        // each with the reason (a dropped `Reply` does that). One wait per task, not one
        // per operation.
        _ = shared.stopped().cancelled() => {}
    }
}

/// How an operation's first run went when its handler was first polled.
enum First {
    /// Not run yet (a blocking handler, or none): [`run_one`] starts it.
    NotStarted,
    /// Its handler's future, polled once and not done.
    Running(HandlerFuture),
    /// It ended at once, with this result or panic.
    Ended(Result<HandlerResult, Box<dyn Any + Send>>),
}

/// Marks `job` running since `clock`, calls its (async) handler and polls it once: an
/// operation that succeeds at once is completed here (`None`); any other goes on in
/// [`run_one`] with how its first run started. `clock` is then when this one's first
/// run ended: the next operation's start.
fn start_one<'a>(
    shared: &NodeShared,
    mut job: Box<Job>,
    slot: RunningSlot<'a>,
    cx: &mut Context<'_>,
    clock: &mut Instant,
    handoff: &mut Handoff,
) -> Option<(Box<Job>, RunningSlot<'a>, First)> {
    job.reply.mark_running(&job.op.op_type, *clock);
    let first = match &job.reply.entry().handler {
        HandlerKind::Async(h) => {
            // The call and its first poll run as the operation (one context switch of
            // the thread's current operation for both).
            let (call, polled) = trace::in_context(job.reply.execute_context(), || {
                let mut call = h.call(job.op.clone());
                let polled = std::panic::catch_unwind(AssertUnwindSafe(|| call.as_mut().poll(cx)));
                (call, polled)
            });
            match polled {
                Ok(Poll::Pending) => First::Running(call),
                Ok(Poll::Ready(r)) => First::Ended(Ok(r)),
                Err(panic) => First::Ended(Err(panic)),
            }
        }
        HandlerKind::Blocking(_) | HandlerKind::Remote => First::NotStarted,
    };
    if !matches!(first, First::NotStarted) {
        *clock = Instant::now();
    }
    match first {
        First::Ended(Ok(Ok(result))) => {
            let outcome = (OpStatus::Succeeded, Some(result), None, Some(true));
            finish(shared, job, slot, outcome, 1, Vec::new(), *clock, handoff);
            None
        }
        first => Some((job, slot, first)),
    }
}

/// What one run of a handler came to: its result or panic, or the deadline passed first.
type Ran = Result<Result<HandlerResult, Box<dyn Any + Send>>, tokio::time::error::Elapsed>;

/// Runs one operation to its end and completes it, giving its running slot back as soon as
/// the handler is done (a dropped future gives it back too). `first` is how its first run
/// started ([`start_one`]).
///
/// The job stays in its box while the handler runs (the future holds a pointer, not the
/// job): 10,000 sleeping operations take a third less memory that way. For the same
/// reason the common case, a first run that succeeds, is all this future holds while it
/// waits: retries and failures go on in a future of their own ([`run_attempts`]), boxed
/// when needed, so their state does not make every waiting operation larger.
async fn run_one(shared: &NodeShared, job: Box<Job>, slot: RunningSlot<'_>, first: First) {
    let ran = match first {
        First::Running(call) => {
            match run_call(call, job.reply.execute_context(), job.deadline).await {
                Ok(Ok(Ok(result))) => {
                    let outcome = (OpStatus::Succeeded, Some(result), None, Some(true));
                    let now = Instant::now();
                    return finish(
                        shared,
                        job,
                        slot,
                        outcome,
                        1,
                        vec![],
                        now,
                        &mut Handoff::default(),
                    );
                }
                ran => Some(ran),
            }
        }
        First::Ended(ended) => Some(Ok(ended)),
        First::NotStarted => None,
    };
    Box::pin(run_attempts(shared, job, slot, ran)).await
}

/// Runs `job`'s handler until it succeeds, fails for good or its deadline passes, retrying
/// as its type's policy says, and completes it. `first`: how its first run went, when it
/// already ran.
async fn run_attempts(
    shared: &NodeShared,
    job: Box<Job>,
    slot: RunningSlot<'_>,
    mut first: Option<Ran>,
) {
    let entry = &**job.reply.entry();
    let ctx = job.reply.execute_context();
    let (op, deadline) = (&job.op, job.deadline);
    let mut attempts = 0u32;
    let mut retries = Vec::new();
    let outcome = loop {
        attempts += 1;
        let call = match first.take() {
            Some(ran) => ran,
            None => match &entry.handler {
                HandlerKind::Async(h) => {
                    let call = trace::in_context(ctx, || h.call(op.clone()));
                    run_call(call, ctx, deadline).await
                }
                HandlerKind::Blocking(f) => {
                    let f = f.clone();
                    let o = op.clone();
                    let task = tokio::task::spawn_blocking(move || trace::in_context(ctx, || f(o)));
                    tokio::time::timeout_at(deadline.into(), task)
                        .await
                        .map(|r| r.map_err(|e| e.into_panic()))
                }
                HandlerKind::Remote => {
                    break (
                        OpStatus::Failed,
                        None,
                        Some(format!(
                            "node `{}` has no handler for operation type `{}`",
                            shared.node_id(),
                            op.op_type
                        )),
                        None,
                    )
                }
            },
        };
        let err = match call {
            Ok(Ok(Ok(result))) => break (OpStatus::Succeeded, Some(result), None, Some(true)),
            Ok(Ok(Err(e))) => e,
            Ok(Err(panic)) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                trace::in_context(
                    ctx,
                    || tracing::error!(op.id = %op.id, op.type = %op.op_type, "handler panicked: {what}"),
                );
                break (
                    OpStatus::Failed,
                    None,
                    Some(format!("handler panicked: {what}")),
                    Some(false),
                );
            }
            Err(_) => {
                break (
                    OpStatus::Expired,
                    None,
                    Some(format!(
                        "deadline passed while the handler ran (attempt {attempts})"
                    )),
                    Some(false),
                )
            }
        };
        let time_left = deadline.saturating_duration_since(Instant::now());
        let unit = rand::random::<f64>();
        let wait = match entry.retry.decide(attempts, err.retryable, time_left, unit) {
            RetryDecision::Retry { after } => after,
            RetryDecision::GiveUp {
                reason: GiveUpReason::NoTimeLeft,
            } => {
                break (
                    OpStatus::Failed,
                    None,
                    Some(format!(
                        "{} (attempt {attempts}; no time left before the deadline to retry)",
                        err.message
                    )),
                    Some(false),
                )
            }
            RetryDecision::GiveUp {
                reason: GiveUpReason::OutOfAttempts,
            } => {
                break (
                    OpStatus::Failed,
                    None,
                    Some(final_error(&err, attempts)),
                    Some(false),
                )
            }
            // The operation was wrong, not the handler's dependency: not the breaker's
            // business.
            RetryDecision::GiveUp {
                reason: GiveUpReason::NotRetryable,
            } => {
                break (
                    OpStatus::Failed,
                    None,
                    Some(final_error(&err, attempts)),
                    None,
                )
            }
        };
        entry.metrics.retries.inc();
        if ctx.is_some() {
            retries.push((attempts, trace::Stamp::now(), err.message.clone()));
        }
        trace::in_context(
            ctx,
            || tracing::debug!(op.id = %op.id, attempt = attempts, ?wait, "retrying: {}", err.message),
        );
        tokio::time::sleep(wait).await;
    };
    finish(
        shared,
        job,
        slot,
        outcome,
        attempts,
        retries,
        Instant::now(),
        &mut Handoff::default(),
    );
}

/// A handler's future run to its end in the operation's trace context, a panic caught,
/// unless `deadline` passes first. (A plain function, not an `async fn`, so the future is
/// no larger than what it runs.)
fn run_call(
    call: HandlerFuture,
    ctx: Option<TraceContext>,
    deadline: Instant,
) -> impl Future<Output = Ran> {
    let fut = trace::InContext::new(ctx, AssertUnwindSafe(call).catch_unwind());
    tokio::time::timeout_at(deadline.into(), fut)
}

/// What an operation's runs came to: its status, result, error, and whether it counts
/// for (`Some(true)`) or against (`Some(false)`) its type's breaker.
type Ending = (OpStatus, Option<Json>, Option<String>, Option<bool>);

/// Completes `job` with `outcome` after `attempts` runs, ended at `now`: gives its running
/// slot back, tells its breaker, records its retries and answers its waiter (through
/// `handoff`).
#[allow(clippy::too_many_arguments)]
fn finish(
    shared: &NodeShared,
    job: Box<Job>,
    slot: RunningSlot<'_>,
    outcome: Ending,
    attempts: u32,
    retries: Vec<(u32, trace::Stamp, String)>,
    now: Instant,
    handoff: &mut Handoff,
) {
    drop(slot);
    let (status, result, error, healthy) = outcome;
    if let Some(ok) = healthy {
        shared.breaker_record(job.reply.entry(), ok);
    }
    let Job { op, mut reply, .. } = *job;
    for (attempt, at, message) in retries {
        reply.retrying(attempt, at, message);
    }
    reply.finish_into(
        OpOutcome {
            id: op.id,
            status,
            result,
            error,
            cached: false,
            executed_by: Some(shared.node_name()),
            attempts,
            trace_id: None,
        },
        now,
        handoff,
    );
}

fn final_error(err: &HandlerError, attempts: u32) -> String {
    if attempts > 1 {
        format!("{} (after {attempts} attempts)", err.message)
    } else {
        err.message.clone()
    }
}
