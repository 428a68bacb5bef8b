//! Raft's network over opmesh's links: each Raft RPC is a `Request` frame with an id and
//! its answer a `Response` frame with the same id, on the same links as operations.

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
    waiting: DashMap<u64, oneshot::Sender<RpcReply>>,
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
        self.waiting.insert(id, tx);
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

    /// An answer arrived; the caller may have given up on it already.
    pub fn answer(&self, id: u64, reply: RpcReply) {
        if let Some((_, tx)) = self.waiting.remove(&id) {
            let _ = tx.send(reply);
        }
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
