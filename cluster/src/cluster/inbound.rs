//! What a node does with each message that arrives on a link ([`Inbound`]): operations
//! forwarded here are run and their outcomes sent back, replies complete what this node
//! forwarded, Raft RPCs, remote writes (join, leave, a write for the leader) and probes
//! (does this node belong to a cluster?) are answered, and pings are answered with this
//! node's load while pongs are noted for the failure detector.
//!
//! A message that names its sender must name the node its link proved it is (the
//! `from` of [`Inbound::on_message`]): a vote request names its candidate, entries and
//! snapshots their leader, a `Leave` the node leaving, a `Join` the joiner (which a
//! member may forward for another node), an answer must come from the node asked
//! ([`Calls::answer`](crate::network::Calls::answer)). One that names another node is
//! logged, counted ([`Cluster::messages_refused`](super::Cluster::messages_refused)) and
//! dropped: [`impersonation`] decides.
//!
//! It runs on the transport's reader tasks, so nothing here waits: work that waits (an
//! RPC answer, a write through Raft) is spawned.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use openraft::Vote;
use opmesh_actors::job::Job;
use opmesh_actors::routing::affinity;
use opmesh_actors::{NodeId, OpId, OpOutcome, OpStatus, OpType, OutcomeSink};

use super::{Inner, LINK_BACK_WAIT};
use crate::codec::{
    EncodedReplies, Message, OpenBreaker, Rpc, RpcReply, WireOp, WireReply, WriteRefused,
};
use crate::flow::{breakers_from_wire, breakers_to_wire, same_breakers};
use crate::remote::{from_wire, refused_reply, reply_to_wire, ReplyCollector, REFUSED_OVERLOADED};
use crate::replies::{Admit, Batch};
use crate::transport::Inbound;
use crate::types::{raft_id, RaftId};

/// What one node heard last from another.
#[derive(Clone)]
pub(super) struct Heard {
    /// The last answer (`Pong`); `None` before the first.
    pub(super) at: Option<Instant>,
    pub(super) load: u64,
    /// The types it is overloaded with (see [`crate::flow`]).
    pub(super) overloaded: Vec<OpType>,
    /// The types whose circuit breaker there is open, and until when.
    pub(super) open_breakers: Vec<(OpType, Instant)>,
}

/// Frames arriving on links, handed to the cluster (once it is built, while it runs).
#[derive(Default)]
pub(super) struct InboundAdapter(OnceLock<Weak<Inner>>);

impl InboundAdapter {
    /// Starts handing frames to `inner` (before, they are dropped).
    pub(super) fn attach(&self, inner: &Arc<Inner>) {
        let _ = self.0.set(Arc::downgrade(inner));
    }

    fn inner(&self) -> Option<Arc<Inner>> {
        self.0.get().and_then(Weak::upgrade)
    }
}

impl Inbound for InboundAdapter {
    fn on_message(&self, from: &str, msg: Message) {
        if let Some(inner) = self.inner() {
            inner.on_message(from, msg);
        }
    }

    fn on_link(&self, peer: &str, up: bool) {
        if let Some(inner) = self.inner() {
            inner.on_link(peer, up);
        }
    }
}

impl Inner {
    fn on_message(self: &Arc<Self>, from: &str, msg: Message) {
        match msg {
            Message::OpBatch(ops) => self.run_forwarded(from, ops),
            // Sent, never read: they arrive as an `OpBatch` and a `ReplyBatch`.
            Message::EncodedOps(_) | Message::EncodedReplies { .. } => {}
            Message::ReplyBatch { seq, replies } => {
                let replies = Arc::try_unwrap(replies).unwrap_or_else(|r| (*r).clone());
                let peer = NodeId::from(from);
                let refused = self.outbox.complete(&peer, replies);
                if !refused.is_empty() {
                    self.route_refused(&peer, refused);
                }
                // Acknowledged whether or not anything here waited for it (a repeat, or
                // replies to this node's previous run): the sender can forget the batch.
                // A lost acknowledgement only makes the sender send the batch again. On
                // lane 0, behind any repeat of these operations (see `on_link`).
                let _ = self
                    .transport()
                    .send(from, Message::ReplyAck { seqs: vec![seq] });
            }
            Message::ReplyAck { seqs } => {
                if let Some(ledger) = self.ledgers.get(from) {
                    let mut ledger = ledger.lock();
                    for seq in seqs {
                        ledger.acked(seq);
                    }
                }
            }
            Message::Request { id, body } => {
                if let Some(claim) = impersonation(from, &body, || self.is_member(from)) {
                    self.refuse(from, &claim);
                    return;
                }
                let inner = self.clone();
                let from = from.to_owned();
                tokio::spawn(async move {
                    let reply = inner.answer(body).await;
                    // A node that just said hello (a joiner) may not have a link back yet.
                    let t = inner.transport();
                    t.wait_connected(&from, LINK_BACK_WAIT).await;
                    let _ = t.send(&from, Message::Response { id, body: reply });
                });
            }
            Message::Response { id, body } => {
                let identity = |link: &str| self.transport().peer_identity(link);
                if let Err(wrong) = self.calls.answer(from, id, body, identity) {
                    self.refuse(from, &wrong.to_string());
                }
            }
            Message::Ping {
                seq,
                load,
                overloaded,
                open_breakers,
            } => {
                let now = self.heard(from, load, overloaded, open_breakers, false);
                let _ = self.transport().send(
                    from,
                    Message::Pong {
                        seq,
                        load: self.in_flight(),
                        overloaded: self.overloaded.load().to_vec(),
                        open_breakers: breakers_to_wire(&self.open_breakers.lock(), now),
                    },
                );
            }
            Message::Pong {
                load,
                overloaded,
                open_breakers,
                ..
            } => {
                self.heard(from, load, overloaded, open_breakers, true);
            }
        }
    }

    /// Operations `peer` refused because its queue of their type was full: `peer` is
    /// noted overloaded with the type (until its next heartbeat says otherwise) and each
    /// goes to another node of its route, or fails naming `peer` when there is none (or
    /// when its idempotency key belongs to `peer`).
    fn route_refused(&self, peer: &NodeId, refused: Vec<(Box<Job>, String)>) {
        if let Some(mut h) = self.heard.get_mut(peer) {
            for (job, _) in &refused {
                if !h.overloaded.contains(&job.op.op_type) {
                    h.overloaded.push(job.op.op_type.clone());
                }
            }
        }
        self.publish(&self.state.load_full());
        self.route_again(peer, refused);
    }

    /// Operations `peer` cannot take (the routing table already says so): each goes to
    /// another node of its route, or fails with its reason when there is none.
    pub(super) fn route_again(&self, peer: &NodeId, refused: Vec<(Box<Job>, String)>) {
        let table = self.table.load();
        let mut again = Vec::new();
        for (job, why) in refused {
            let op = &job.op;
            let placed = op
                .idempotency_key
                .as_deref()
                .map(|k| affinity(op.owner.as_deref(), k));
            if table.overloaded_owner(&op.op_type, placed).is_some() {
                let Job { reply, .. } = *job;
                reply.fail(
                    OpStatus::Failed,
                    format!("overloaded: {why}; no other node of the route can take it"),
                );
            } else {
                again.push(job);
            }
        }
        if !again.is_empty() {
            tracing::debug!(node = %peer, count = again.len(), "node cannot take them: routing operations again");
            if let Some(node) = self.node.get() {
                node.reroute(again);
            }
        }
    }

    /// Drops a message that names another node than its link's.
    fn refuse(&self, from: &str, claim: &str) {
        self.messages_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            node = from,
            "dropped {claim}: it names another node than the one this link proved it is"
        );
    }

    /// Whether `name` is in the Raft group (a voter or a learner). No one is while this
    /// node's Raft has not started.
    fn is_member(&self, name: &str) -> bool {
        let Some(raft) = self.raft.get() else {
            return false;
        };
        let m = raft.metrics();
        let m = m.borrow();
        m.membership_config
            .membership()
            .get_node(&raft_id(name))
            .is_some()
    }

    /// Notes a peer's heartbeat (its load, overloaded types and open breakers) and
    /// answers when it arrived. Only a `Pong` (`answered`) counts as hearing from it: it
    /// proves the links both ways work, where a `Ping` that arrives proves only one.
    fn heard(
        &self,
        from: &str,
        load: u64,
        overloaded: Vec<String>,
        open_breakers: Vec<OpenBreaker>,
        answered: bool,
    ) -> Instant {
        let now = Instant::now();
        let overloaded: Vec<OpType> = overloaded.into_iter().map(Into::into).collect();
        let open_breakers = breakers_from_wire(open_breakers, now);
        let mut h = self.heard.entry(from.into()).or_insert(Heard {
            at: None,
            load,
            overloaded: Vec::new(),
            open_breakers: Vec::new(),
        });
        h.load = load;
        if answered {
            h.at = Some(now);
        }
        // Two heartbeats of one open breaker differ by their time on the link.
        let slack = self.cfg.heartbeat;
        let breakers_changed = !same_breakers(&h.open_breakers, &open_breakers, slack);
        if h.overloaded != overloaded || breakers_changed {
            h.overloaded = overloaded;
            h.open_breakers = open_breakers;
            drop(h);
            // Routes see it now, not at the next heartbeat.
            self.publish(&self.state.load_full());
        }
        now
    }

    fn on_link(&self, peer: &str, up: bool) {
        if !up {
            return;
        }
        let peer: NodeId = peer.into();
        let count = self.outbox.send_waiting(&peer, |ops| {
            let _ = self
                .transport()
                .try_send_on(&peer, 0, Message::EncodedOps(ops));
        });
        if count > 0 {
            tracing::info!(node = %peer, count, "link is back: sent waiting operations again");
        }
        self.send_again(&peer, Duration::ZERO);
    }

    /// Sends `peer` again the reply batches it has not acknowledged for `after`.
    pub(super) fn send_again(&self, peer: &NodeId, after: Duration) {
        let Some(ledger) = self.ledgers.get(peer) else {
            return;
        };
        if !self.transport().is_connected(peer) {
            return;
        }
        let due = ledger.lock().due(Instant::now(), after);
        drop(ledger);
        for Batch { seq, replies } in due {
            if self
                .transport()
                .send(peer, Message::EncodedReplies { seq, replies })
                .is_err()
            {
                return;
            }
        }
    }

    /// Runs operations another node forwarded here and sends their outcomes back. An
    /// operation already running here for that node is not run again, one answered and
    /// not yet acknowledged gets its batch again, one whose reply was dropped runs again
    /// only when it has an idempotency key (the cache answers it), else fails saying so.
    fn run_forwarded(self: &Arc<Self>, from: &str, ops: Vec<WireOp>) {
        let peer: NodeId = from.into();
        let me = self.me.name.clone();
        let Some(node) = self.node.get() else {
            // Starting: the cluster is up before the engine is attached. Not a refusal
            // for good: the origin routes them to another node of the route, or fails
            // them naming this one when there is none.
            let replies: Vec<WireReply> = ops
                .iter()
                .map(|o| {
                    let mut r = reply_to_wire(OpOutcome::failure(
                        OpId(o.id),
                        OpStatus::Failed,
                        format!("node `{me}` is starting and runs no operations yet"),
                    ));
                    r.status = REFUSED_OVERLOADED;
                    r
                })
                .collect();
            self.send_replies(&peer, replies.iter().map(WireReply::fields).collect());
            return;
        };
        let now = Instant::now();
        let mut fresh = ops;
        let mut refusals = Vec::new();
        let mut again = Vec::new();
        {
            let ledger = self.ledgers.entry(peer.clone()).or_default();
            let mut ledger = ledger.lock();
            // Kept in place, not moved to a list of their own: each is a few hundred bytes.
            fresh.retain(
                |op| match ledger.admit(op.id, op.idempotency_key.is_some()) {
                    Admit::Run => true,
                    Admit::Running => false,
                    Admit::Answered(seq) => {
                        again.extend(ledger.batch(seq, now));
                        false
                    }
                    Admit::Dropped => {
                        refusals.push(reply_to_wire(OpOutcome::failure(
                            OpId(op.id),
                            OpStatus::Failed,
                            format!(
                                "node `{me}` ran the operation but dropped its reply: its \
                                 buffer of unacknowledged replies to `{peer}` \
                                 (cluster.reply_buffer_bytes) was full"
                            ),
                        )));
                        false
                    }
                },
            );
        }
        again.sort_by_key(|b| b.seq);
        again.dedup_by_key(|b| b.seq);
        for Batch { seq, replies } in again {
            let _ = self
                .transport()
                .send(&peer, Message::EncodedReplies { seq, replies });
        }
        let ids: Vec<u128> = fresh.iter().map(|o| o.id).collect();
        let ops = fresh.into_iter().map(move |w| from_wire(w, now));
        let inner = self.clone();
        let to = peer.clone();
        let sink: Arc<dyn OutcomeSink> =
            ReplyCollector::new(move |batch| inner.send_replies(&to, batch));
        for (id, r) in ids.into_iter().zip(node.enqueue_forwarded(ops, &sink)) {
            if let Err(e) = r {
                refusals.push(refused_reply(id, &me, &e));
            }
        }
        if !refusals.is_empty() {
            self.send_replies(&peer, refusals.iter().map(WireReply::fields).collect());
        }
    }

    /// Sends `replies` to `peer` as its next batch, kept until acknowledged (sent again
    /// when the link comes back or it stays unacknowledged, see [`Inner::send_again`]).
    fn send_replies(&self, peer: &NodeId, replies: EncodedReplies) {
        let (batch, dropped) = {
            let ledger = self.ledgers.entry(peer.clone()).or_default();
            let mut ledger = ledger.lock();
            let r = ledger.answered(replies, Instant::now(), self.cfg.reply_buffer_bytes);
            if r.1 > 0 {
                let (_, held) = ledger.held();
                tracing::warn!(node = %peer, count = r.1, held,
                    limit = self.cfg.reply_buffer_bytes,
                    "buffer of unacknowledged replies full (cluster.reply_buffer_bytes): \
                     dropped the oldest; their operations are not run again");
            }
            r
        };
        if dropped > 0 {
            self.replies_dropped
                .fetch_add(dropped as u64, Ordering::Relaxed);
        }
        let Batch { seq, replies } = batch;
        // Not connected: the batch waits in the ledger.
        let _ = self
            .transport()
            .send(peer, Message::EncodedReplies { seq, replies });
    }

    async fn answer(&self, body: Rpc) -> RpcReply {
        let Some(raft) = self.started_raft().await else {
            return RpcReply::Error(format!("node `{}` is still starting", self.me.name));
        };
        match body {
            Rpc::AppendEntries(r) => match raft.append_entries(r).await {
                Ok(r) => RpcReply::AppendEntries(r),
                Err(e) => RpcReply::Error(e.to_string()),
            },
            Rpc::Vote(r) => match raft.vote(r).await {
                Ok(r) => RpcReply::Vote(r),
                Err(e) => RpcReply::Error(e.to_string()),
            },
            Rpc::InstallSnapshot(r) => {
                RpcReply::InstallSnapshot(raft.install_snapshot(r).await.map_err(|e| e.to_string()))
            }
            Rpc::ClientWrite(req) => RpcReply::Written(self.submit(req).await),
            Rpc::Join { record, by } => match self
                .to_leader(Rpc::Join {
                    record: record.clone(),
                    by: by.clone(),
                })
                .await
            {
                None => {
                    let r = self.admit(record, &by).await;
                    if r.is_ok() {
                        self.balance_voters().await;
                    }
                    RpcReply::Joined(r)
                }
                Some(Ok(reply)) => reply,
                Some(Err(e)) => RpcReply::Joined(Err(e)),
            },
            // Not forwarded: the leader takes a Leave only from the node leaving, which
            // asks the leader named here again.
            Rpc::Leave { name, by } => match self.leader() {
                (Some(id), _) if id == self.me.raft_id => {
                    RpcReply::Left(self.remove(&name, &by).await)
                }
                (_, leader) => RpcReply::Left(Err(WriteRefused {
                    message: format!("node `{}` is not the leader", self.me.name),
                    leader,
                })),
            },
            // A Raft that cannot say (it stopped) answers "member": the asker then joins,
            // never bootstraps a second cluster beside this one.
            Rpc::Probe => RpcReply::Probed {
                member: raft.is_initialized().await.unwrap_or(true),
            },
        }
    }
}

/// What `rpc` claims of its sender when that is not `from`, the node its link proved it
/// is: `None` when it claims nothing or the truth. Raft's requests name their candidate
/// or leader by Raft id; a `Leave` names the node leaving; a `Join` names the joiner,
/// which a seed that is a member (`from_is_member`, asked only then) forwards to the
/// leader on the joiner's behalf.
pub(super) fn impersonation(
    from: &str,
    rpc: &Rpc,
    from_is_member: impl FnOnce() -> bool,
) -> Option<String> {
    let other = |vote: &Vote<RaftId>| {
        vote.leader_id()
            .voted_for()
            .filter(|id| *id != raft_id(from))
    };
    match rpc {
        Rpc::Vote(r) => other(&r.vote).map(|id| format!("a vote request for Raft node {id}")),
        Rpc::AppendEntries(r) => other(&r.vote).map(|id| format!("entries from Raft leader {id}")),
        Rpc::InstallSnapshot(r) => {
            other(&r.vote).map(|id| format!("a snapshot from Raft leader {id}"))
        }
        Rpc::Leave { name, .. } if name != from => Some(format!("a Leave for node `{name}`")),
        Rpc::Join { record: rec, .. } if &*rec.name != from && !from_is_member() => {
            Some(format!("a Join for node `{}` from a non-member", rec.name))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
    use openraft::{SnapshotMeta, StoredMembership};

    use super::*;
    use crate::types::{NodeRecord, NodeStatus};

    fn vote(name: &str) -> Vote<RaftId> {
        Vote::new(3, raft_id(name))
    }

    fn every_claim(name: &str) -> Vec<Rpc> {
        vec![
            Rpc::Vote(VoteRequest {
                vote: vote(name),
                last_log_id: None,
            }),
            Rpc::AppendEntries(AppendEntriesRequest {
                vote: vote(name),
                prev_log_id: None,
                entries: vec![],
                leader_commit: None,
            }),
            Rpc::InstallSnapshot(InstallSnapshotRequest {
                vote: vote(name),
                meta: SnapshotMeta {
                    last_log_id: None,
                    last_membership: StoredMembership::default(),
                    snapshot_id: "s".into(),
                },
                offset: 0,
                data: vec![],
                done: true,
            }),
            Rpc::Leave {
                name: name.into(),
                by: "deployer".into(),
            },
            Rpc::Join {
                record: NodeRecord {
                    name: name.into(),
                    raft_id: raft_id(name),
                    cluster_addr: "127.0.0.1:1".into(),
                    http_addr: String::new(),
                    serves: vec![],
                    status: NodeStatus::Up,
                },
                by: format!("node:{name}"),
            },
        ]
    }

    #[test]
    fn a_request_that_names_another_sender_is_an_impersonation() {
        let never = || -> bool { panic!("membership is asked only for a Join") };
        for rpc in every_claim("b") {
            assert_eq!(impersonation("b", &rpc, || false), None, "{rpc:?}");
            let claim = match &rpc {
                Rpc::Join { .. } => impersonation("c", &rpc, || false),
                other => impersonation("c", other, never),
            };
            assert!(claim.is_some(), "{rpc:?}");
        }
        let claims: Vec<String> = every_claim("b")
            .iter()
            .filter_map(|r| impersonation("c", r, || false))
            .collect();
        let b = raft_id("b");
        assert_eq!(
            claims,
            [
                format!("a vote request for Raft node {b}"),
                format!("entries from Raft leader {b}"),
                format!("a snapshot from Raft leader {b}"),
                "a Leave for node `b`".to_owned(),
                "a Join for node `b` from a non-member".to_owned(),
            ]
        );
        // A member forwards a joiner's Join to the leader.
        let join = every_claim("b").pop().unwrap();
        assert_eq!(impersonation("c", &join, || true), None);
        // Requests that name no sender.
        for rpc in [
            Rpc::Probe,
            Rpc::ClientWrite(crate::types::Request::new(
                crate::types::Command::RemoveRoute {
                    op_type: "echo".into(),
                },
                "deployer",
            )),
        ] {
            assert_eq!(impersonation("c", &rpc, never), None);
        }
    }
}
