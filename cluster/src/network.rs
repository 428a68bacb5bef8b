//! Raft's network over opmesh's links: each Raft RPC is a `Request` frame with an id and
//! its answer a `Response` frame with the same id, on the same links as operations. An
//! answer is taken only from the node the request went to.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Weak;
use std::time::Duration;

use dashmap::DashMap;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use tokio::sync::oneshot;

use crate::codec::{Message, Rpc, RpcReply};
use crate::transport::Transport;
use crate::types::{Member, RaftId, TypeConfig};

/// Why an RPC got no answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("no link to node `{0}`")]
    NotConnected(String),
    #[error("node `{peer}` did not answer within {after:?}")]
    Timeout { peer: String, after: Duration },
    #[error("the link to node `{0}` closed before it answered")]
    Closed(String),
}

/// Requests waiting for their answer, by id.
#[derive(Default)]
pub struct Calls {
    next: AtomicU64,
    waiting: DashMap<u64, Waiting>,
}

/// A request sent: the link it went on, and who waits for its answer.
struct Waiting {
    peer: String,
    tx: oneshot::Sender<RpcReply>,
}

/// An answer from a node other than the one the request went to: dropped, and the call
/// goes on waiting for the right one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an answer to request {id} from node `{from}`, which was sent to node `{asked}`")]
pub struct WrongResponder {
    pub id: u64,
    pub from: String,
    pub asked: String,
}

impl Calls {
    /// Sends `body` to `peer` and waits up to `timeout` for the answer.
    pub async fn call(
        &self,
        transport: &Transport,
        peer: &str,
        body: Rpc,
        timeout: Duration,
    ) -> Result<RpcReply, CallError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.waiting.insert(
            id,
            Waiting {
                peer: peer.to_owned(),
                tx,
            },
        );
        if transport.send(peer, Message::Request { id, body }).is_err() {
            self.waiting.remove(&id);
            return Err(CallError::NotConnected(peer.to_owned()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(CallError::Closed(peer.to_owned())),
            Err(_) => {
                self.waiting.remove(&id);
                Err(CallError::Timeout {
                    peer: peer.to_owned(),
                    after: timeout,
                })
            }
        }
    }

    /// An answer arrived from the node `from` (the name its link proved); the caller may
    /// have given up on it already. `identity` tells the name the node at the other end
    /// of a link proved (for a seed, whose link is named by its address).
    pub fn answer(
        &self,
        from: &str,
        id: u64,
        reply: RpcReply,
        identity: impl FnOnce(&str) -> Option<String>,
    ) -> Result<(), WrongResponder> {
        let Some(asked) = self.waiting.get(&id).map(|w| w.peer.clone()) else {
            return Ok(());
        };
        let asked = identity(&asked).unwrap_or(asked);
        if asked != from {
            return Err(WrongResponder {
                id,
                from: from.to_owned(),
                asked,
            });
        }
        if let Some((_, w)) = self.waiting.remove(&id) {
            let _ = w.tx.send(reply);
        }
        Ok(())
    }
}

/// What the Raft network needs of the cluster: the links and the calls in flight.
pub trait Links: Send + Sync + 'static {
    fn transport(&self) -> Option<&Transport>;
    fn calls(&self) -> &Calls;
}

/// Builds one [`PeerClient`] per Raft peer.
pub struct Network<L: Links> {
    pub links: Weak<L>,
}

impl<L: Links> RaftNetworkFactory<TypeConfig> for Network<L> {
    type Network = PeerClient<L>;

    async fn new_client(&mut self, _target: RaftId, node: &Member) -> PeerClient<L> {
        if let Some(l) = self.links.upgrade() {
            if let Some(t) = l.transport() {
                t.add_peer(&node.name, &node.cluster_addr);
            }
        }
        PeerClient {
            links: self.links.clone(),
            peer: node.name.clone(),
        }
    }
}

/// Raft's client for one peer.
pub struct PeerClient<L: Links> {
    links: Weak<L>,
    peer: String,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<RaftId, Member, RaftError<RaftId, E>>;

fn unreachable<E: std::error::Error>(e: &CallError) -> RPCError<RaftId, Member, E> {
    match e {
        CallError::NotConnected(_) => RPCError::Unreachable(Unreachable::new(e)),
        _ => RPCError::Network(NetworkError::new(e)),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Remote(String);

impl<L: Links> PeerClient<L> {
    async fn call(&self, body: Rpc, timeout: Duration) -> Result<RpcReply, CallError> {
        let links = self
            .links
            .upgrade()
            .ok_or_else(|| CallError::Closed(self.peer.clone()))?;
        let transport = links
            .transport()
            .ok_or_else(|| CallError::NotConnected(self.peer.clone()))?;
        links
            .calls()
            .call(transport, &self.peer, body, timeout)
            .await
    }
}

fn unexpected<E: std::error::Error>(reply: RpcReply) -> RPCError<RaftId, Member, E> {
    let what = match reply {
        RpcReply::Error(e) => e,
        other => format!("unexpected answer {other:?}"),
    };
    RPCError::Network(NetworkError::new(&Remote(what)))
}

impl<L: Links> RaftNetwork<TypeConfig> for PeerClient<L> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<RaftId>, RpcErr> {
        match self.call(Rpc::AppendEntries(rpc), option.hard_ttl()).await {
            Ok(RpcReply::AppendEntries(r)) => Ok(r),
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(unreachable(&e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<RaftId>, RpcErr<InstallSnapshotError>> {
        match self
            .call(Rpc::InstallSnapshot(rpc), option.hard_ttl())
            .await
        {
            Ok(RpcReply::InstallSnapshot(Ok(r))) => Ok(r),
            Ok(RpcReply::InstallSnapshot(Err(e))) => {
                Err(RPCError::Network(NetworkError::new(&Remote(e))))
            }
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(unreachable(&e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<RaftId>,
        option: RPCOption,
    ) -> Result<VoteResponse<RaftId>, RpcErr> {
        match self.call(Rpc::Vote(rpc), option.hard_ttl()).await {
            Ok(RpcReply::Vote(r)) => Ok(r),
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(unreachable(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_counts_only_from_the_node_asked() {
        let calls = Calls::default();
        let (tx, mut rx) = oneshot::channel();
        calls.waiting.insert(
            7,
            Waiting {
                peer: "b".into(),
                tx,
            },
        );
        let reply = || RpcReply::Probed { member: true };
        let named = |link: &str| Some(link.to_owned());
        assert_eq!(
            calls.answer("c", 7, reply(), named),
            Err(WrongResponder {
                id: 7,
                from: "c".into(),
                asked: "b".into()
            })
        );
        assert!(rx.try_recv().is_err(), "still waiting");
        assert_eq!(calls.answer("b", 7, reply(), named), Ok(()));
        assert_eq!(rx.try_recv().unwrap(), reply());
        // Late or unknown: ignored.
        assert_eq!(calls.answer("c", 7, reply(), named), Ok(()));

        // A seed's link is named by its address; the answer comes from the name it proved.
        let (tx, mut rx) = oneshot::channel();
        calls.waiting.insert(
            8,
            Waiting {
                peer: "seed@10.0.0.1:7071".into(),
                tx,
            },
        );
        let proved = |_: &str| Some("s".to_owned());
        assert!(calls.answer("t", 8, reply(), proved).is_err());
        assert_eq!(calls.answer("s", 8, reply(), proved), Ok(()));
        assert_eq!(rx.try_recv().unwrap(), reply());
    }
}
