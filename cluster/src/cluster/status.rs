//! What `GET /v1/cluster` shows: this node's view of the cluster (the leader, the Raft
//! progress, every registered node with its role, load and link) read from the applied
//! state, Raft's metrics, the last heartbeats and the transport's link stats.

use std::collections::BTreeSet;
use std::time::Instant;

use serde::Serialize;

use super::Inner;
use crate::transport::LinkStats;
use crate::types::RaftId;

/// The answer of `GET /v1/cluster`.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterStatus {
    pub cluster_id: String,
    /// The node that answered.
    pub node: String,
    pub leader: Option<String>,
    pub term: u64,
    pub last_applied_index: Option<u64>,
    pub last_log_index: Option<u64>,
    /// The routing table's version.
    pub version: u64,
    /// This node's Raft state: leader, follower, candidate or learner.
    pub raft_state: String,
    pub nodes: Vec<NodeStatusView>,
    /// Operations this node forwarded and waits to hear about.
    pub forwarded_waiting: usize,
    /// Replies to operations other nodes forwarded here, sent and not acknowledged yet
    /// (sent again until they are), and their bytes.
    pub replies_unacknowledged: usize,
    pub replies_unacknowledged_bytes: usize,
    pub links: Vec<LinkStats>,
}

/// One node in `GET /v1/cluster`.
#[derive(Clone, Debug, Serialize)]
pub struct NodeStatusView {
    pub id: String,
    pub http_addr: String,
    pub cluster_addr: String,
    /// up, down or leaving.
    pub status: String,
    /// voter, learner, or none (registered, not yet a Raft member).
    pub role: String,
    pub serves: Vec<String>,
    /// Operations in flight there, as last heard.
    pub load: u64,
    /// The types whose queue there is over the high watermark (`flow.high`), as last
    /// heard: new operations of those types go elsewhere or are refused with 429.
    pub overloaded: Vec<String>,
    /// The types whose circuit breaker there is open, as last heard: new operations of
    /// those types go elsewhere or are refused with 503 `circuit_open`.
    pub open_breakers: Vec<String>,
    /// This node's link to it holds more than `flow.high` of `cluster.link_buffer_bytes`
    /// unsent (until under `flow.low`): new operations go to other nodes of their route.
    pub congested: bool,
    /// self, connected or disconnected: this node's link to it.
    pub link: String,
    /// Milliseconds since this node last heard from it.
    pub last_heard_ms: Option<u64>,
}

impl Inner {
    pub(super) fn status(&self) -> ClusterStatus {
        let m = self.raft().metrics().borrow().clone();
        let state = self.state.load_full();
        let mem = m.membership_config.membership();
        let voters: BTreeSet<RaftId> = mem.voter_ids().collect();
        let leader = m
            .current_leader
            .and_then(|id| mem.get_node(&id).map(|n| n.name.clone()));
        let t = self.transport();
        let now = Instant::now();
        let nodes = state
            .nodes
            .values()
            .map(|n| {
                let is_me = n.name == self.me.name;
                let heard = self.heard.get(&n.name).map(|h| h.clone());
                NodeStatusView {
                    id: n.name.to_string(),
                    http_addr: n.http_addr.clone(),
                    cluster_addr: n.cluster_addr.clone(),
                    status: n.status.as_str().into(),
                    role: if voters.contains(&n.raft_id) {
                        "voter"
                    } else if mem.get_node(&n.raft_id).is_some() {
                        "learner"
                    } else {
                        "none"
                    }
                    .into(),
                    serves: n.serves.iter().map(|s| s.to_string()).collect(),
                    load: if is_me {
                        self.in_flight()
                    } else {
                        heard.as_ref().map_or(0, |h| h.load)
                    },
                    overloaded: if is_me {
                        self.overloaded.load().to_vec()
                    } else {
                        heard.as_ref().map_or_else(Vec::new, |h| {
                            h.overloaded.iter().map(|t| t.to_string()).collect()
                        })
                    },
                    open_breakers: if is_me {
                        self.open_breakers
                            .lock()
                            .iter()
                            .map(|(t, _)| t.to_string())
                            .collect()
                    } else {
                        heard.as_ref().map_or_else(Vec::new, |h| {
                            h.open_breakers.iter().map(|(t, _)| t.to_string()).collect()
                        })
                    },
                    congested: self.congested.load().iter().any(|p| **p == *n.name),
                    link: if is_me {
                        "self"
                    } else if t.is_connected(&n.name) {
                        "connected"
                    } else {
                        "disconnected"
                    }
                    .into(),
                    last_heard_ms: if is_me {
                        Some(0)
                    } else {
                        heard
                            .and_then(|h| h.at)
                            .map(|at| now.saturating_duration_since(at).as_millis() as u64)
                    },
                }
            })
            .collect();
        let (replies_unacknowledged, replies_unacknowledged_bytes) = self
            .ledgers
            .iter()
            .map(|l| l.lock().held())
            .fold((0, 0), |(n, b), (n2, b2)| (n + n2, b + b2));
        ClusterStatus {
            cluster_id: self.cfg.cluster_id.clone(),
            node: self.me.name.to_string(),
            leader,
            term: m.current_term,
            last_applied_index: m.last_applied.map(|l| l.index),
            last_log_index: m.last_log_index,
            version: state.version,
            raft_state: format!("{:?}", m.state).to_lowercase(),
            nodes,
            forwarded_waiting: self.outbox.len(),
            replies_unacknowledged,
            replies_unacknowledged_bytes,
            links: t.links(),
        }
    }
}
