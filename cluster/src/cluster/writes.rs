//! Changes to the replicated state and to the Raft group, and how they reach the leader.
//!
//! [`Inner::write`] commits a command here when this node leads and forwards it to the
//! leader otherwise, failing within the write timeout with a reason (and the leader, when
//! one is known) instead of hanging. On the leader, [`Inner::admit`] adds a joining node
//! (as a learner that must catch up, then to the registry) and [`Inner::remove`] takes a
//! leaving one out; [`Inner::leave`] is a node's own hand-off; [`Inner::join_via`] asks a
//! seed to admit this node and [`Inner::probe`] whether a seed belongs to a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use openraft::error::{ClientWriteError, RaftError};
use openraft::ChangeMembers;
use opmesh_actors::routing::RouteResult;
use opmesh_actors::{NodeId, RouteError};

use super::{Inner, JoinFailure, LeaveError, LINK_BACK_WAIT};
use crate::codec::{Rpc, RpcReply, WriteRefused};
use crate::formation::SeedAnswer;
use crate::membership::{self, Admission};
use crate::types::{
    raft_id, Command, CommandResult, Member, NodeRecord, NodeStatus, RaftId, Request,
};

/// How long joining waits for the link to a seed before asking it anyway.
const SEED_LINK_WAIT: Duration = Duration::from_secs(2);
/// How long a probe waits for the link to a seed, then for its answer.
const PROBE_WAIT: Duration = Duration::from_secs(1);
/// How many times a leaving node asks again the leader a former leader named.
const LEAVE_REDIRECTS: usize = 2;

fn refused(message: impl Into<String>, leader: Option<Member>) -> WriteRefused {
    WriteRefused {
        message: message.into(),
        leader,
    }
}

impl Inner {
    /// Who this node is in the audit trail, for the changes it makes by itself.
    pub(super) fn by_me(&self) -> String {
        format!("node:{}", self.me.name)
    }

    /// Commits `cmd` as this node's own change (see [`Inner::submit`]).
    pub(super) async fn write(&self, cmd: Command) -> Result<CommandResult, WriteRefused> {
        self.submit(Request::new(cmd, self.by_me())).await
    }

    /// Commits `req` through the leader: here if this node leads, forwarded otherwise.
    /// Fails with a clear reason within the write timeout instead of hanging.
    pub(super) async fn submit(&self, req: Request) -> Result<CommandResult, WriteRefused> {
        let timeout = self.cfg.write_timeout;
        let no_quorum = || {
            refused(
                format!(
                    "the change was not committed within {timeout:?}: node `{}` cannot reach a quorum of the cluster (if one comes back in time it may still be applied; read the route to know)",
                    self.me.name
                ),
                None,
            )
        };
        let r = tokio::time::timeout(timeout, self.raft().client_write(req.clone())).await;
        match r {
            Ok(Ok(resp)) => Ok(resp.data),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                match f.leader_node {
                    Some(leader) if leader.name != self.cfg.node => {
                        self.transport()
                            .add_peer(&leader.name, &leader.cluster_addr);
                        match self
                            .calls
                            .call(self.transport(), &leader.name, Rpc::ClientWrite(req), timeout)
                            .await
                        {
                            Ok(RpcReply::Written(r)) => r,
                            Ok(other) => Err(refused(
                                format!("leader is {leader}: unexpected answer {other:?}"),
                                Some(leader),
                            )),
                            Err(e) => Err(refused(
                                format!("leader is {leader}, and it cannot be reached from node `{}`: {e}", self.me.name),
                                Some(leader),
                            )),
                        }
                    }
                    _ => Err(refused(
                        format!(
                            "no leader is known to node `{}`: the cluster has no quorum reachable from here",
                            self.me.name
                        ),
                        None,
                    )),
                }
            }
            Ok(Err(e)) => Err(refused(e.to_string(), None)),
            Err(_) => Err(no_quorum()),
        }
    }

    /// Waits (briefly) until this node has applied `version`, so a write is visible here
    /// when it returns.
    async fn applied(&self, version: u64) {
        let mut versions = self.versions.clone();
        let _ = tokio::time::timeout(self.cfg.write_timeout, versions.wait_for(|v| *v >= version))
            .await;
    }

    pub(super) async fn route_write(&self, cmd: Command, by: &str) -> RouteResult {
        match self.submit(Request::new(cmd, by)).await {
            Ok(CommandResult { error: Some(e), .. }) => Err(RouteError::Unavailable(e)),
            Ok(r) => {
                self.applied(r.version).await;
                // The routing table follows the applied state on a task of its own; made
                // here too, so that what this node routes once the write returns follows
                // it (a bench's first operations ran on the old route).
                self.publish(&self.state.load_full());
                Ok(r.version)
            }
            Err(r) => Err(RouteError::NoQuorum {
                message: r.message,
                leader: r.leader.map(|l| l.name),
            }),
        }
    }

    /// Sends `rpc` to the leader and returns its answer; `None` when this node leads.
    pub(super) async fn to_leader(&self, rpc: Rpc) -> Option<Result<RpcReply, WriteRefused>> {
        let (id, node) = self.leader();
        if id == Some(self.me.raft_id) {
            return None;
        }
        let Some(leader) = node else {
            return Some(Err(refused(
                format!("no leader is known to node `{}`", self.me.name),
                None,
            )));
        };
        Some(self.call_leader(leader, rpc).await)
    }

    /// Sends `rpc` to `leader` and returns its answer.
    async fn call_leader(&self, leader: Member, rpc: Rpc) -> Result<RpcReply, WriteRefused> {
        self.transport()
            .add_peer(&leader.name, &leader.cluster_addr);
        self.calls
            .call(
                self.transport(),
                &leader.name,
                rpc,
                self.cfg.write_timeout * 3,
            )
            .await
            .map_err(|e| refused(format!("leader is {leader}: {e}"), Some(leader)))
    }

    /// Asks the node at `seed` to admit this one (it forwards to the leader); `by` asked
    /// for it (the audit trail's who).
    pub(super) async fn join_via(&self, seed: &str, by: &str) -> Result<(), JoinFailure> {
        let peer = format!("seed@{seed}");
        let t = self.transport();
        t.add_seed(&peer, seed);
        t.wait_connected(&peer, SEED_LINK_WAIT).await;
        let r = self
            .calls
            .call(
                t,
                &peer,
                Rpc::Join {
                    record: self.me.clone(),
                    by: by.to_owned(),
                },
                self.cfg.write_timeout * 4,
            )
            .await;
        t.remove_peer(&peer);
        match r {
            Ok(RpcReply::Joined(Ok(()))) => Ok(()),
            Ok(RpcReply::Joined(Err(e))) => Err(JoinFailure::Refused {
                message: e.message,
                leader: e.leader,
            }),
            Ok(other) => Err(JoinFailure::Unexpected(format!("{other:?}"))),
            Err(e) => Err(JoinFailure::Unreachable(e)),
        }
    }

    /// Asks the node at `seed` whether it belongs to a cluster, within about twice
    /// [`PROBE_WAIT`].
    pub(super) async fn probe(&self, seed: &str) -> SeedAnswer {
        let peer = format!("probe@{seed}");
        let t = self.transport();
        t.add_seed(&peer, seed);
        t.wait_connected(&peer, PROBE_WAIT).await;
        let r = self.calls.call(t, &peer, Rpc::Probe, PROBE_WAIT).await;
        t.remove_peer(&peer);
        match r {
            Ok(RpcReply::Probed { member: true }) => SeedAnswer::InCluster,
            Ok(RpcReply::Probed { member: false }) => SeedAnswer::NoCluster,
            Ok(other) => {
                tracing::warn!(%seed, "unexpected answer to a probe: {other:?}");
                SeedAnswer::Unreachable
            }
            Err(e) => {
                tracing::debug!(%seed, "probe failed: {e}");
                SeedAnswer::Unreachable
            }
        }
    }

    /// On the leader: adds `rec` as a learner (waiting until it has caught up) and to
    /// the registry.
    pub(super) async fn admit(&self, rec: NodeRecord, by: &str) -> Result<(), WriteRefused> {
        if rec.raft_id != raft_id(&rec.name) {
            return Err(refused(
                format!("node `{}` sent a wrong Raft id", rec.name),
                None,
            ));
        }
        if let Some(other) = self
            .state
            .load()
            .nodes
            .values()
            .find(|n| n.raft_id == rec.raft_id && n.name != rec.name)
        {
            return Err(refused(
                format!(
                    "node name `{}` collides with node `{}` (same Raft id); choose another --node-id",
                    rec.name, other.name
                ),
                None,
            ));
        }
        let (known, voters) = {
            let m = self.raft().metrics();
            let m = m.borrow();
            let mem = m.membership_config.membership();
            let voters: BTreeSet<RaftId> = mem.voter_ids().collect();
            (mem.get_node(&rec.raft_id).cloned(), voters)
        };
        // The joiner dialed in and this node is dialing back (or, for a join forwarded by
        // another seed, not yet). Raft backs off half a second from a node it cannot
        // reach, so let the link open (briefly) before replicating to the joiner.
        let t = self.transport();
        t.add_peer(&rec.name, &rec.cluster_addr);
        t.wait_connected(&rec.name, LINK_BACK_WAIT).await;
        let member = Self::member(&rec);
        let raft = self.raft();
        let plan = membership::readmission(rec.raft_id, known.as_ref(), &member, &voters);
        let fresh = known.is_none();
        let demoted = plan.demote_to.is_some();
        if let Some(rest) = plan.demote_to {
            tracing::info!(node = %rec.name, "a voter rejoins: demoted to learner until it has caught up");
            if let Err(e) = raft.change_membership(rest, true).await {
                return Err(refused(
                    format!("cannot readmit voter `{}`: {e}", rec.name),
                    None,
                ));
            }
        }
        let change: Option<BoxFuture<'_, _>> = match plan.step {
            Admission::AddLearner => Some(raft.add_learner(rec.raft_id, member, true).boxed()),
            Admission::UpdateAddresses => {
                let mut nodes = BTreeMap::new();
                nodes.insert(rec.raft_id, member);
                Some(
                    raft.change_membership(ChangeMembers::SetNodes(nodes), true)
                        .boxed(),
                )
            }
            Admission::Nothing => None,
        };
        if let Some(change) = change {
            match tokio::time::timeout(self.cfg.write_timeout * 3, change).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return Err(refused(
                        format!("cannot add node `{}`: {e}", rec.name),
                        None,
                    ))
                }
                Err(_) => {
                    return Err(refused(
                        format!("node `{}` did not catch up with the log in time", rec.name),
                        None,
                    ))
                }
            }
        }
        let id = rec.raft_id;
        if fresh {
            // openraft's blocking `add_learner` returns once the learner is within its
            // own lag threshold (thousands of entries), which a learner that has not
            // answered yet meets. Wait (within the write timeout) until it has caught up
            // as the voter upkeep counts it, so it can vote as soon as it is registered.
            self.wait_caught_up(id, self.cfg.write_timeout).await;
        }
        let joined = Request::new(Command::NodeJoined(rec), by);
        if let CommandResult { error: Some(e), .. } = self.submit(joined).await? {
            return Err(refused(e, None));
        }
        if demoted {
            // Give the voter back its vote as soon as it has caught up, so the cluster
            // tolerates a failure again before the join is answered.
            let mut metrics = raft.metrics();
            let until = Instant::now() + self.cfg.write_timeout * 3;
            while Instant::now() < until {
                if self.up_learners().contains(&id) {
                    self.balance_voters().await;
                    break;
                }
                let _ = tokio::time::timeout_at(until.into(), metrics.changed()).await;
            }
        }
        Ok(())
    }

    /// On the leader: waits until the learner `id` has caught up with the log (see
    /// [`membership::caught_up`]), at most `timeout`; returns whether it has.
    async fn wait_caught_up(&self, id: RaftId, timeout: Duration) -> bool {
        let mut metrics = self.raft().metrics();
        let until = tokio::time::Instant::now() + timeout;
        loop {
            {
                let m = metrics.borrow_and_update();
                let Some(replication) = m.replication.as_ref() else {
                    return false;
                };
                let matched = replication.get(&id).copied().flatten().map(|l| l.index);
                if membership::caught_up(matched, m.last_log_index) {
                    return true;
                }
            }
            match tokio::time::timeout_at(until, metrics.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return false,
            }
        }
    }

    /// On the leader: removes `name` from the registry and from the Raft group.
    pub(super) async fn remove(&self, name: &str, by: &str) -> Result<(), WriteRefused> {
        let left = Request::new(Command::NodeLeft { name: name.into() }, by);
        if let CommandResult { error: Some(e), .. } = self.submit(left).await? {
            tracing::warn!(node = name, "registry removal: {e}");
        }
        let id = raft_id(name);
        let voters: BTreeSet<RaftId> = {
            let m = self.raft().metrics();
            let m = m.borrow();
            m.membership_config.membership().voter_ids().collect()
        };
        let raft = self.raft();
        // A membership change needs a quorum too: bounded like any write.
        let timeout = self.cfg.write_timeout;
        let no_quorum = |what: &str| {
            refused(
                format!("cannot remove {what} `{name}`: not committed within {timeout:?} (no quorum reachable?)"),
                None,
            )
        };
        if voters.contains(&id) {
            // Keep the voter count: promote a learner in its place when there is one.
            let rest = membership::voters_without(&voters, id, &self.up_learners());
            tokio::time::timeout(timeout, raft.change_membership(rest, false))
                .await
                .map_err(|_| no_quorum("voter"))?
                .map_err(|e| refused(format!("cannot remove voter `{name}`: {e}"), None))?;
        } else {
            let mut gone = BTreeSet::new();
            gone.insert(id);
            tokio::time::timeout(
                timeout,
                raft.change_membership(ChangeMembers::RemoveNodes(gone), false),
            )
            .await
            .map_err(|_| no_quorum("learner"))?
            .map_err(|e| refused(format!("cannot remove learner `{name}`: {e}"), None))?;
        }
        Ok(())
    }

    pub(super) async fn leave(&self, grace: Duration, by: &str) -> Result<(), LeaveError> {
        if self.leaving.swap(true, Ordering::AcqRel) {
            return Err(LeaveError::AlreadyLeaving);
        }
        let name: NodeId = self.me.name.clone();
        let alone = {
            let m = self.raft().metrics();
            let m = m.borrow();
            let alone = m
                .membership_config
                .membership()
                .nodes()
                .all(|(id, _)| *id == self.me.raft_id);
            alone
        };
        if alone {
            // The last node keeps its cluster (and, with a data dir, its state) to restart.
            tracing::info!(node = %name, "last node of the cluster: not leaving it");
            return Ok(());
        }
        tracing::info!(node = %name, "leaving the cluster: handing off");
        let limit = self.cfg.leave_timeout;
        let cut = |step: &str| WriteRefused {
            message: format!(
                "{step} took longer than cluster.leave_timeout_ms ({limit:?}): the cluster \
                 may have lost its quorum"
            ),
            leader: None,
        };
        let mark = self.submit(Request::new(
            Command::SetStatus {
                name: name.clone(),
                status: NodeStatus::Leaving,
            },
            by,
        ));
        let marked = tokio::time::timeout(limit, mark)
            .await
            .unwrap_or_else(|_| Err(cut("marking this node leaving")));
        if let Err(e) = marked {
            self.leaving.store(false, Ordering::Release);
            return Err(LeaveError::NotMarked {
                message: e.message,
                leader: e.leader,
            });
        }
        // Operations routed here before the change finish; forwarded ones come back. An
        // operation waiting in the outbox is in flight too (its reply completes it), so
        // the engine's drain, woken by the last completion, waits for both.
        if let Some(node) = self.node.get() {
            node.drain(grace).await;
        }
        let removal = self.removal(&name, by);
        let r = tokio::time::timeout(limit, removal)
            .await
            .unwrap_or_else(|_| Err(cut("the removal from the cluster")));
        r.map_err(|e| LeaveError::NotRemoved {
            message: e.message,
            leader: e.leader,
        })?;
        tracing::info!(node = %name, "left the cluster");
        Ok(())
    }

    /// Asks the leader (this node, or the one it knows, following redirects) to remove
    /// this node, named `name`, from the registry and the Raft group.
    async fn removal(&self, name: &NodeId, by: &str) -> Result<(), WriteRefused> {
        let rpc = Rpc::Leave {
            name: name.to_string(),
            by: by.to_owned(),
        };
        let mut answer = self.to_leader(rpc.clone()).await;
        // A node that stopped leading names the leader it knows: ask that one (a Leave is
        // not forwarded, as the leader takes it only from the node leaving).
        for _ in 0..LEAVE_REDIRECTS {
            let Some(Ok(RpcReply::Left(Err(WriteRefused {
                leader: Some(leader),
                ..
            })))) = &answer
            else {
                break;
            };
            answer = if leader.name == self.cfg.node {
                None
            } else {
                Some(self.call_leader(leader.clone(), rpc.clone()).await)
            };
        }
        match answer {
            None => self.remove(name, by).await,
            Some(Ok(RpcReply::Left(r))) => r,
            Some(Ok(other)) => Err(refused(format!("unexpected answer {other:?}"), None)),
            Some(Err(e)) => Err(e),
        }
    }
}
