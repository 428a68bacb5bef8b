//! The node supervisor: starts the Router, Cache, Scheduler and Executor linked to it,
//! and restarts any of them that fails.
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

pub(crate) struct SupervisorState {
    shared: Arc<NodeShared>,
    children: Vec<(ActorId, ChildKind)>,
}

async fn spawn_child(
    kind: ChildKind,
    shared: &Arc<NodeShared>,
    sup: ActorCell,
) -> Result<ActorId, ActorProcessingErr> {
    let s = shared.clone();
    let id = match kind {
        ChildKind::Router => {
            let (r, _) = Actor::spawn_linked(None, Router, RouterArgs { shared: s }, sup).await?;
            let id = r.get_id();
            shared.install_router(r);
            id
        }
        ChildKind::Cache => {
            let (r, _) = Actor::spawn_linked(None, Cache, CacheArgs { shared: s }, sup).await?;
            let id = r.get_id();
            shared.install_cache(r);
            id
        }
        ChildKind::Scheduler => {
            let (r, _) =
                Actor::spawn_linked(None, Scheduler, SchedulerArgs { shared: s }, sup).await?;
            let id = r.get_id();
            shared.install_scheduler(r);
            id
        }
        ChildKind::Executor => {
            let (r, _) =
                Actor::spawn_linked(None, Executor, ExecutorArgs { shared: s }, sup).await?;
            let id = r.get_id();
            shared.install_executor(r);
            id
        }
    };
    Ok(id)
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
        for kind in ChildKind::ALL {
            children.push((spawn_child(kind, &shared, myself.get_cell()).await?, kind));
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
        let Some(pos) = state.children.iter().position(|(c, _)| *c == id) else {
            return Ok(());
        };
        let kind = state.children[pos].1;
        state.shared.metrics().actor_restarted(kind);
        tracing::error!(actor = ?kind, cause = %cause, "engine actor stopped; restarting it");
        let new_id = spawn_child(kind, &state.shared, myself.get_cell()).await?;
        state.children[pos].0 = new_id;
        Ok(())
    }
}
