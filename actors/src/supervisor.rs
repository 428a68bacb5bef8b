//! The node supervisor: starts the Router, Cache, Scheduler and Executor of every
//! [shard](crate::shard) linked to it, and restarts any of them that fails (in its shard;
//! the other shards go on).
//!
//! Callers never hold a child's `ActorRef` directly: they send through
//! `NodeShared`, which reads the current ref from a swap cell,
//! so a restarted child is reached without anyone noticing. What the failed child held
//! (queued operations) is completed as failed, with the reason, by the dropped
//! [`Reply`](crate::job::Reply)s.

use std::sync::Arc;

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::cache::{Cache, CacheArgs};
use crate::executor::{Executor, ExecutorArgs};
use crate::router::{Router, RouterArgs};
use crate::scheduler::{Scheduler, SchedulerArgs};
use crate::shared::NodeShared;

/// The engine's child actors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChildKind {
    Router,
    Cache,
    Scheduler,
    Executor,
}

impl ChildKind {
    /// The actor's name in logs and metrics: `router`, `cache`, `scheduler`, `executor`.
    pub fn name(self) -> &'static str {
        match self {
            ChildKind::Router => "router",
            ChildKind::Cache => "cache",
            ChildKind::Scheduler => "scheduler",
            ChildKind::Executor => "executor",
        }
    }

    /// A dense index (0..4), for per-kind counters.
    pub(crate) fn index(self) -> usize {
        match self {
            ChildKind::Router => 0,
            ChildKind::Cache => 1,
            ChildKind::Scheduler => 2,
            ChildKind::Executor => 3,
        }
    }

    pub const ALL: [ChildKind; 4] = [
        ChildKind::Executor,
        ChildKind::Scheduler,
        ChildKind::Cache,
        ChildKind::Router,
    ];
}

pub(crate) struct NodeSupervisor;

/// A supervised actor: its id, its kind and its shard.
struct Child {
    id: ActorId,
    kind: ChildKind,
    shard: usize,
}

pub(crate) struct SupervisorState {
    shared: Arc<NodeShared>,
    children: Vec<Child>,
}

/// Starts the child `kind` of `shard`, on the shard's own thread when it has one
/// (`engine.shard_threads`: the actor's task, and what it spawns, live on that runtime).
async fn spawn_child(
    kind: ChildKind,
    shard: usize,
    shared: &Arc<NodeShared>,
    sup: ActorCell,
) -> Result<Child, ActorProcessingErr> {
    let Some(rt) = shared.shards().runtime(shard) else {
        return spawn_child_here(kind, shard, shared, sup).await;
    };
    let shared = shared.clone();
    rt.spawn(async move { spawn_child_here(kind, shard, &shared, sup).await })
        .await
        .map_err(|e| format!("the thread of shard {shard} is gone: {e}"))?
}

async fn spawn_child_here(
    kind: ChildKind,
    shard: usize,
    shared: &Arc<NodeShared>,
    sup: ActorCell,
) -> Result<Child, ActorProcessingErr> {
    let s = shared.clone();
    let id = match kind {
        ChildKind::Router => {
            let args = RouterArgs { shared: s, shard };
            let (r, _) = Actor::spawn_linked(None, Router, args, sup).await?;
            let id = r.get_id();
            shared.install_router(shard, r);
            id
        }
        ChildKind::Cache => {
            let args = CacheArgs { shared: s, shard };
            let (r, _) = Actor::spawn_linked(None, Cache, args, sup).await?;
            let id = r.get_id();
            shared.install_cache(shard, r);
            id
        }
        ChildKind::Scheduler => {
            let args = SchedulerArgs { shared: s, shard };
            let (r, _) = Actor::spawn_linked(None, Scheduler, args, sup).await?;
            let id = r.get_id();
            shared.install_scheduler(shard, r);
            id
        }
        ChildKind::Executor => {
            let args = ExecutorArgs { shared: s };
            let (r, _) = Actor::spawn_linked(None, Executor, args, sup).await?;
            let id = r.get_id();
            shared.install_executor(shard, r);
            id
        }
    };
    Ok(Child { id, kind, shard })
}

impl Actor for NodeSupervisor {
    type Msg = ();
    type State = SupervisorState;
    type Arguments = Arc<NodeShared>;

    async fn pre_start(
        &self,
        myself: ActorRef<()>,
        shared: Arc<NodeShared>,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let mut children = Vec::new();
        for shard in 0..shared.shards().len() {
            for kind in ChildKind::ALL {
                children.push(spawn_child(kind, shard, &shared, myself.get_cell()).await?);
            }
        }
        Ok(SupervisorState { shared, children })
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, cause) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        if state.shared.is_stopping() {
            return Ok(());
        }
        let id = cell.get_id();
        let Some(pos) = state.children.iter().position(|c| c.id == id) else {
            return Ok(());
        };
        let (kind, shard) = (state.children[pos].kind, state.children[pos].shard);
        state.shared.metrics().actor_restarted(kind);
        tracing::error!(actor = ?kind, shard, cause = %cause, "engine actor stopped; restarting it");
        state.children[pos] = spawn_child(kind, shard, &state.shared, myself.get_cell()).await?;
        Ok(())
    }
}
