//! The Router actor: picks the owner node of each accepted operation and passes it on.
//!
//! Each [shard](crate::shard) has a Router. Submissions land in its shard's [`Intake`], a
//! mailbox that coalesces: the first operation after a drain sends one `Drain` message,
//! and the Router takes everything that arrived by then in one go. Under load, one
//! message carries hundreds of operations, which is how four actor hops cost a fraction
//! of one each.
//!
//! Each operation's owner comes from [`routing::pick`](crate::routing::pick) on the current routing-table
//! snapshot. Local ones go to the Cache (those with an idempotency key) or straight to
//! the Scheduler of the same shard; remote ones go to the [`Forwarder`], which the
//! cluster layer provides.

use std::sync::Arc;

use parking_lot::Mutex;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::cache::CacheMsg;
use crate::job::Job;
use crate::op::{NodeId, OpStatus};
use crate::routing::{affinity, pick};
use crate::scheduler::SchedulerMsg;
use crate::shard::split;
use crate::shared::NodeShared;
use crate::trace::Stamp;

/// Sends operations owned by other nodes to them. Implemented by the cluster layer; a
/// single node has none, and every operation is local.
pub trait Forwarder: Send + Sync + 'static {
    /// Hands `jobs` to `node`. The forwarder owns them from here on and must complete
    /// each one (with the remote outcome, or failed with a reason).
    fn forward(&self, node: &NodeId, jobs: Vec<Box<Job>>);
}

/// The Router's coalescing mailbox.
#[derive(Default)]
pub struct Intake {
    inner: Mutex<IntakeInner>,
}

#[derive(Default)]
struct IntakeInner {
    jobs: Vec<Box<Job>>,
    /// A `Drain` is on its way; no need to send another.
    scheduled: bool,
}

impl Intake {
    /// Adds jobs; returns whether the caller must send the Router a `Drain`.
    pub(crate) fn push(&self, jobs: impl IntoIterator<Item = Box<Job>>) -> bool {
        let mut g = self.inner.lock();
        g.jobs.extend(jobs);
        !std::mem::replace(&mut g.scheduled, true)
    }

    /// Takes every waiting job, leaving `spare` (empty, with capacity) in its place, so
    /// the intake does not grow a new buffer from nothing after every drain.
    pub(crate) fn take(&self, spare: Vec<Box<Job>>) -> Vec<Box<Job>> {
        let mut g = self.inner.lock();
        g.scheduled = false;
        std::mem::replace(&mut g.jobs, spare)
    }

    pub(crate) fn len(&self) -> usize {
        self.inner.lock().jobs.len()
    }
}

/// Messages of the [`Router`] actor.
pub enum RouterMsg {
    /// Operations wait in the intake.
    Drain,
}

pub struct Router;

pub struct RouterArgs {
    pub(crate) shared: Arc<NodeShared>,
    pub(crate) shard: usize,
}

pub struct RouterState {
    shared: Arc<NodeShared>,
    shard: usize,
    rr: u64,
    /// The buffer of the previous drain, handed back to the intake on the next one.
    spare: Vec<Box<Job>>,
}

impl Actor for Router {
    type Msg = RouterMsg;
    type State = RouterState;
    type Arguments = RouterArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<RouterMsg>,
        args: RouterArgs,
    ) -> Result<RouterState, ActorProcessingErr> {
        Ok(RouterState {
            shared: args.shared,
            shard: args.shard,
            rr: 0,
            spare: Vec::new(),
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<RouterMsg>,
        state: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        // After a restart, a `Drain` may have been lost with the old mailbox.
        if state.shared.shards().get(state.shard).intake.len() > 0 {
            myself.cast(RouterMsg::Drain)?;
        }
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<RouterMsg>,
        msg: RouterMsg,
        state: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RouterMsg::Drain => {
                // Let the submitters that are ready run first, so one drain takes all they
                // add: without this, tokio runs a woken task next and each drain would
                // carry a single operation.
                tokio::task::yield_now().await;
                route(state)
            }
        }
        Ok(())
    }
}

/// Operations that run on this node, split by where they go next. [`push`](Self::push)
/// is the one place that decides it.
pub(crate) struct LocalBatches {
    to_cache: Vec<Box<Job>>,
    to_scheduler: Vec<Box<Job>>,
}

impl LocalBatches {
    /// Room for `n` operations without an idempotency key (the common case).
    pub(crate) fn with_capacity(n: usize) -> Self {
        LocalBatches {
            to_cache: Vec::new(),
            to_scheduler: Vec::with_capacity(n),
        }
    }

    /// An operation with an idempotency key goes to the Cache (it answers it, joins it to
    /// a run in flight, or admits it); the others go straight to the Scheduler.
    pub(crate) fn push(&mut self, job: Box<Job>) {
        if job.op.idempotency_key.is_some() {
            self.to_cache.push(job);
        } else {
            self.to_scheduler.push(job);
        }
    }

    fn jobs_mut(&mut self) -> impl Iterator<Item = &mut Box<Job>> {
        self.to_cache.iter_mut().chain(self.to_scheduler.iter_mut())
    }

    /// Hands both batches on to the actors of `shard` (nothing is sent for an empty one).
    pub(crate) fn send(self, shared: &NodeShared, shard: usize) {
        if !self.to_cache.is_empty() {
            shared.send_cache(shard, CacheMsg::Admit(self.to_cache));
        }
        if !self.to_scheduler.is_empty() {
            shared.send_scheduler(shard, SchedulerMsg::Enqueue(self.to_scheduler));
        }
    }
}

/// Hands jobs that run on this node on, to the Cache or the Scheduler of their shards.
pub(crate) fn dispatch_local(shared: &NodeShared, jobs: Vec<Box<Job>>) {
    split(shared.shards().len(), jobs, |shard, jobs| {
        shared.shards().get(shard).took(jobs.len());
        let mut local = LocalBatches::with_capacity(jobs.len());
        for job in jobs {
            local.push(job);
        }
        local.send(shared, shard);
    });
}

fn route(state: &mut RouterState) {
    let shared = &state.shared;
    let shard = shared.shards().get(state.shard);
    let mut jobs = shard.intake.take(std::mem::take(&mut state.spare));
    if jobs.is_empty() {
        state.spare = jobs;
        return;
    }
    shard.took(jobs.len());
    let table = shared.routes().snapshot();
    let routed = Stamp::now();
    let mut local = LocalBatches::with_capacity(jobs.len());
    let mut remote: Vec<(NodeId, Vec<Box<Job>>)> = Vec::new();
    for mut job in jobs.drain(..) {
        job.reply.stamps.routed = routed;
        let op = &job.op;
        let placed = op
            .idempotency_key
            .as_deref()
            .map(|k| affinity(op.owner.as_deref(), k));
        match pick(
            &table,
            &op.op_type,
            op.key.as_deref(),
            placed,
            &mut state.rr,
        ) {
            Ok(node) if node == shared.node_id() => {
                job.reply.target = None;
                local.push(job);
            }
            Ok(node) => {
                // Only spans name it: an untraced operation takes no reference to the
                // name (whose count every forwarding thread would share).
                job.reply.target = job.reply.is_traced().then(|| node.clone());
                match remote.iter_mut().find(|(n, _)| n == node) {
                    Some((_, v)) => v.push(job),
                    None => remote.push((node.clone(), vec![job])),
                }
            }
            Err(e) => job.reply.fail(OpStatus::Failed, e.to_string()),
        }
    }
    state.spare = jobs;
    let routed_end = Stamp::now();
    for j in local.jobs_mut() {
        j.reply.stamps.routed_end = routed_end;
    }
    local.send(shared, state.shard);
    for (node, jobs) in remote {
        match shared.forwarder() {
            Some(f) => f.forward(&node, jobs),
            None => {
                for job in jobs {
                    job.reply.fail(
                        OpStatus::Failed,
                        format!(
                            "operation routed to node `{node}`, but this node has no cluster links"
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Json, Node, Operation};

    #[tokio::test]
    async fn keyed_operations_go_to_the_cache_the_others_to_the_scheduler() {
        let node = Node::builder()
            .handler("t", |op: Operation| async move { Ok(op.payload) })
            .start()
            .await
            .unwrap();
        let plain = || Operation::new("t", Json::null());
        let mut local = LocalBatches::with_capacity(3);
        local.push(node.admit_for_test(plain()));
        local.push(node.admit_for_test(plain().with_idempotency_key("k")));
        local.push(node.admit_for_test(plain().with_key("routing key only")));
        assert_eq!(local.to_cache.len(), 1);
        assert!(local.to_cache[0].op.idempotency_key.is_some());
        assert_eq!(local.to_scheduler.len(), 2);
        assert_eq!(local.jobs_mut().count(), 3);
        node.shutdown(std::time::Duration::from_secs(1)).await;
    }
}
