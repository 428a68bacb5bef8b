//! The routing table and the pure logic that picks an operation's owner node.
//!
//! The Router reads an immutable [`RoutingTable`] snapshot, swapped atomically when the
//! table changes (directly on a single node; through Raft in a cluster), so a lookup
//! never waits for a message. [`pick`] is a plain function of the table, the operation's
//! key and a round-robin counter; consistent hashing uses the
//! [stable hash](crate::hash) every node computes alike.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures::future::BoxFuture;
use futures::FutureExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::hash::{mix, stable_hash};
use crate::op::{NodeId, OpType};

/// How the owner of an operation type is chosen among the candidate nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    RoundRobin,
    LeastLoaded,
    /// Rendezvous hashing on the operation key: the same key lands on the same node while
    /// it is healthy, and removing a node moves only the keys it owned.
    ConsistentHash,
    /// The first healthy node of the route's list; the next one takes over when it fails.
    Pinned,
}

impl Strategy {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "round_robin" => Some(Strategy::RoundRobin),
            "least_loaded" => Some(Strategy::LeastLoaded),
            "consistent_hash" => Some(Strategy::ConsistentHash),
            "pinned" => Some(Strategy::Pinned),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round_robin",
            Strategy::LeastLoaded => "least_loaded",
            Strategy::ConsistentHash => "consistent_hash",
            Strategy::Pinned => "pinned",
        }
    }
}

/// An explicit route for one type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub strategy: Strategy,
    /// The nodes that may run the type, in preference order for `Pinned`. Empty: every
    /// healthy node that serves the type.
    #[serde(default)]
    pub nodes: Vec<NodeId>,
}

/// What the routing table knows of one node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: NodeId,
    pub healthy: bool,
    /// The operation types this node has handlers for.
    pub serves: Vec<OpType>,
    /// Operations in flight on the node, as last reported; used by `LeastLoaded`.
    pub load: u64,
    /// The types whose queue on the node is over its high watermark (`flow.high`), as
    /// last reported, until it is under the low one: new operations of those types go
    /// to another node of the route, or are refused at the door (429) when there is none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overloaded: Vec<OpType>,
    /// The link from this node to it holds more than `flow.high` of
    /// `cluster.link_buffer_bytes` unsent, until it is under `flow.low`: the node is
    /// treated as overloaded with every type.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub congested: bool,
    /// The types whose circuit breaker on the node is open, and until when, as last
    /// reported: new operations of those types go to another node of the route, or are
    /// refused at the door (503 `circuit_open`) when there is none.
    #[serde(skip)]
    pub open_breakers: Vec<(OpType, Instant)>,
}

impl NodeView {
    pub fn serves(&self, op_type: &str) -> bool {
        self.serves.iter().any(|t| &**t == op_type)
    }

    /// Whether the node reported its queue of `op_type` over the high watermark, or the
    /// link to it is congested.
    pub fn overloaded_for(&self, op_type: &str) -> bool {
        self.congested || self.overloaded.iter().any(|t| &**t == op_type)
    }

    /// How long the node's circuit breaker of `op_type` stays open after `now`, if it
    /// reported it open.
    pub fn breaker_open_for(&self, op_type: &str, now: Instant) -> Option<Duration> {
        self.open_breakers
            .iter()
            .find(|(t, until)| &**t == op_type && *until > now)
            .map(|(_, until)| *until - now)
    }

    /// Whether the node refuses something: an overloaded type, a congested link or an
    /// open breaker (most tables have no such node, and skip the checks per type).
    fn under_pressure(&self) -> bool {
        self.congested || !self.overloaded.is_empty() || !self.open_breakers.is_empty()
    }
}

/// One immutable version of the routing state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutingTable {
    /// Increases with every change.
    pub version: u64,
    pub routes: BTreeMap<OpType, Route>,
    pub nodes: Vec<NodeView>,
}

/// Why a pick found no node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    #[error("no node serves operation type `{0}`")]
    NoNodeServes(String),
    #[error("every node routed for operation type `{0}` is down")]
    NoHealthyNode(String),
}

/// The rendezvous weight of `node` for a key whose hash is `key_hash`.
fn rendezvous_score(key_hash: u64, node: &str) -> u64 {
    mix(key_hash ^ stable_hash(node.as_bytes()).rotate_left(17))
}

/// The nodes that may run a type: the route's list (in its order) or every node that
/// serves the type. Iterated without allocating; picks run once per operation.
enum Candidates<'a, 's> {
    Listed(&'a RoutingTable, std::slice::Iter<'a, NodeId>),
    Serving(&'s str, std::slice::Iter<'a, NodeView>),
}

impl<'a> Iterator for Candidates<'a, '_> {
    type Item = &'a NodeView;
    fn next(&mut self) -> Option<&'a NodeView> {
        match self {
            Candidates::Listed(t, ids) => {
                for id in ids.by_ref() {
                    if let Some(n) = t.nodes.iter().find(|n| n.id == *id) {
                        return Some(n);
                    }
                }
                None
            }
            Candidates::Serving(op_type, nodes) => nodes.by_ref().find(|n| n.serves(op_type)),
        }
    }
}

impl RoutingTable {
    /// Whether operations of `op_type` have somewhere to go: a route, or a node that
    /// serves the type.
    pub fn routes_type(&self, op_type: &str) -> bool {
        self.routes.contains_key(op_type) || self.nodes.iter().any(|n| n.serves(op_type))
    }

    /// The overloaded node an operation of `op_type` would have to go to, when every
    /// healthy node of its route is overloaded for the type, or (for an operation placed
    /// by its idempotency key, `affinity`) the node its key belongs to is: the door then
    /// refuses it with 429 rather than accepting what the owner would refuse.
    pub fn overloaded_owner(&self, op_type: &str, affinity: Option<u64>) -> Option<&NodeView> {
        if !self
            .nodes
            .iter()
            .any(|n| n.congested || !n.overloaded.is_empty())
        {
            return None;
        }
        self.refusing_owner(op_type, affinity, |n| n.overloaded_for(op_type))
    }

    /// The node whose open circuit breaker of `op_type` an operation would meet, and how
    /// long it stays open, when every healthy node of the route has it open or (for an
    /// operation placed by its idempotency key) the key's node has: the door then refuses
    /// it with 503 `circuit_open` at once, as that node would.
    pub fn open_breaker(
        &self,
        op_type: &str,
        affinity: Option<u64>,
        now: Instant,
    ) -> Option<(&NodeId, Duration)> {
        if self.nodes.iter().all(|n| n.open_breakers.is_empty()) {
            return None;
        }
        let open = |n: &NodeView| n.breaker_open_for(op_type, now);
        let n = self.refusing_owner(op_type, affinity, |n| open(n).is_some())?;
        Some((&n.id, open(n)?))
    }

    /// The node that would refuse an operation of `op_type` (`refuses`), when every
    /// healthy node of its route would, or, for an operation placed by its key
    /// (`affinity`), the key's node would.
    fn refusing_owner(
        &self,
        op_type: &str,
        affinity: Option<u64>,
        refuses: impl Fn(&NodeView) -> bool,
    ) -> Option<&NodeView> {
        let route = self.routes.get(op_type);
        let healthy = || self.candidates(op_type, route).filter(|n| n.healthy);
        let owner = match affinity {
            Some(_) if route.is_some_and(|r| r.strategy == Strategy::Pinned) => healthy().next()?,
            Some(kh) => rendezvous(healthy(), kh)?,
            None if healthy().all(&refuses) => healthy().next()?,
            None => return None,
        };
        refuses(owner).then_some(owner)
    }

    fn candidates<'a, 's>(
        &'a self,
        op_type: &'s str,
        route: Option<&'a Route>,
    ) -> Candidates<'a, 's> {
        match route {
            Some(r) if !r.nodes.is_empty() => Candidates::Listed(self, r.nodes.iter()),
            _ => Candidates::Serving(op_type, self.nodes.iter()),
        }
    }
}

/// The hash an operation with an idempotency key is placed by ([`pick`]'s `affinity`):
/// of the key, and of its owner when it has one (two owners' equal keys are two keys).
pub fn affinity(owner: Option<&str>, idempotency_key: &str) -> u64 {
    let k = stable_hash(idempotency_key.as_bytes());
    match owner {
        Some(o) => mix(k ^ stable_hash(o.as_bytes()).rotate_left(29)),
        None => k,
    }
}

/// The healthy node with the highest rendezvous weight for a key hashed to `kh`.
fn rendezvous<'t>(healthy: impl Iterator<Item = &'t NodeView>, kh: u64) -> Option<&'t NodeView> {
    healthy
        .map(|n| (rendezvous_score(kh, &n.id), n))
        .max_by(|(sa, a), (sb, b)| sa.cmp(sb).then_with(|| a.id.cmp(&b.id)))
        .map(|(_, n)| n)
}

/// Picks the node that runs an operation of `op_type` with routing `key`.
///
/// Only healthy nodes are picked. With no explicit route, operations with a key use
/// consistent hashing (cache affinity) and the others round robin. `rr` is the caller's
/// round-robin counter; it is advanced when used.
///
/// An operation with an idempotency key (`affinity`, see [`affinity`]) goes to the
/// healthy node its key hashes to, whatever the strategy (a pinned route stays pinned):
/// every node sends the same key to the same owner, whose cache runs it once and answers
/// its repeats; when that owner is down the key moves to the next node of its ranking.
///
/// A node that reported its queue of the type over the high watermark (or whose link is
/// congested), or its breaker of the type open, is passed over while another healthy
/// node of the route is not (a keyed operation stays with its owner: see
/// [`RoutingTable::overloaded_owner`] and [`RoutingTable::open_breaker`]).
pub fn pick<'t>(
    table: &'t RoutingTable,
    op_type: &str,
    key: Option<&str>,
    affinity: Option<u64>,
    rr: &mut u64,
) -> Result<&'t NodeId, PickError> {
    let route = table.routes.get(op_type);
    let all_healthy = || table.candidates(op_type, route).filter(|n| n.healthy);
    // Pass over nodes that would refuse the type only when some healthy node would not.
    let now = table
        .nodes
        .iter()
        .any(NodeView::under_pressure)
        .then(Instant::now);
    let refuses = move |n: &NodeView| {
        now.is_some_and(|now| {
            n.overloaded_for(op_type) || n.breaker_open_for(op_type, now).is_some()
        })
    };
    let avoid = now.is_some() && all_healthy().any(|n| !refuses(n));
    let healthy = || all_healthy().filter(move |n| !(avoid && refuses(n)));
    let Some(first) = healthy().next() else {
        return Err(if table.candidates(op_type, route).next().is_none() {
            PickError::NoNodeServes(op_type.to_owned())
        } else {
            PickError::NoHealthyNode(op_type.to_owned())
        });
    };
    let strategy = match (route, key) {
        (Some(r), _) => r.strategy,
        (None, Some(_)) => Strategy::ConsistentHash,
        (None, None) => Strategy::RoundRobin,
    };
    let chosen = match (strategy, key, affinity) {
        // A keyed operation stays with the first healthy node, refusing or not.
        (Strategy::Pinned, _, Some(_)) => all_healthy().next().unwrap_or(first),
        (Strategy::Pinned, _, None) => first,
        (_, _, Some(kh)) => rendezvous(all_healthy(), kh).unwrap_or(first),
        (Strategy::LeastLoaded, _, _) => healthy()
            .min_by(|a, b| a.load.cmp(&b.load).then_with(|| a.id.cmp(&b.id)))
            .unwrap_or(first),
        (Strategy::ConsistentHash, Some(k), None) => {
            rendezvous(healthy(), stable_hash(k.as_bytes())).unwrap_or(first)
        }
        (Strategy::RoundRobin, _, None) | (Strategy::ConsistentHash, None, None) => {
            let count = healthy().count() as u64;
            let i = (*rr % count) as usize;
            *rr = rr.wrapping_add(1);
            healthy().nth(i).unwrap_or(first)
        }
    };
    Ok(&chosen.id)
}

/// Why a route change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("field `{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("unknown node `{0}` in field `nodes`")]
    UnknownNode(String),
    #[error("no route for operation type `{0}`")]
    NotFound(String),
    /// No node serves the type: a route for it would send its operations nowhere.
    /// `served` lists the types some node serves, sorted.
    #[error(
        "no node serves operation type `{op_type}`, so it cannot be routed; served types: {}",
        if served.is_empty() { "none".to_owned() } else { served.join(", ") }
    )]
    NoRoute {
        op_type: String,
        served: Vec<String>,
    },
    /// The table holds `max` routes already, and this one would be a new one.
    #[error(
        "the routing table holds {max} routes, the most cluster.max_routes allows; remove \
         one before adding the route of `{op_type}`"
    )]
    TooManyRoutes { op_type: String, max: usize },
    #[error("route change failed: {0}")]
    Unavailable(String),
    /// This node cannot reach a leader that can commit the change. `leader` is the
    /// leader it tried, when one was known.
    #[error("{message}")]
    NoQuorum {
        message: String,
        leader: Option<String>,
    },
}

/// One committed change of the routing table (or, in a cluster, of the node registry),
/// as the audit trail lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When it was asked for, in milliseconds since the Unix epoch (the asking node's
    /// clock).
    pub at_ms: u64,
    /// Who asked: an API token's name, `anonymous` on a node without tokens, or
    /// `node:<id>` for a change a node made by itself (joining, a peer marked down).
    pub by: String,
    /// `route.set`, `route.remove`, `node.joined`, `node.status` or `node.left`.
    pub action: String,
    /// The operation type or the node it changed.
    pub subject: String,
    /// What it became (`round_robin [a, b]`, `down`), empty when nothing more is to say.
    pub detail: String,
    /// The table's version after it.
    pub version: u64,
}

impl AuditEntry {
    /// The audit trail's view of a route set to `route`.
    pub fn route_detail(route: &Route) -> String {
        format!(
            "{} [{}]",
            route.strategy.as_str(),
            route
                .nodes
                .iter()
                .map(|n| &**n)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// Milliseconds since the Unix epoch, as audit entries carry them.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How many audit entries are kept unless configured otherwise.
pub const DEFAULT_AUDIT_ENTRIES: usize = 10_000;

/// Where the routing table lives and how it changes. On a single node, in memory
/// ([`LocalRoutes`]); in a cluster, replicated by Raft (a write waits for the commit).
/// Every change is recorded in the audit trail with who asked for it (`by`: an API token's
/// name, `anonymous`, or `node:<id>`).
pub trait RouteStore: Send + Sync + 'static {
    /// The current snapshot; cheap, never waits.
    fn snapshot(&self) -> Arc<RoutingTable>;
    /// The current table for a moment (a check at the door): cheaper than
    /// [`snapshot`](Self::snapshot), as it writes no count that every thread shares. Not
    /// to be held across an await or for long.
    fn load(&self) -> arc_swap::Guard<Arc<RoutingTable>>;
    /// Sets the route of `op_type`; resolves to the new table version.
    fn set_route(
        &self,
        op_type: OpType,
        route: Route,
        by: Arc<str>,
    ) -> BoxFuture<'static, RouteResult>;
    /// Removes the route of `op_type`; resolves to the new table version.
    fn remove_route(&self, op_type: OpType, by: Arc<str>) -> BoxFuture<'static, RouteResult>;
    /// The newest `limit` entries of the audit trail, newest first.
    fn audit(&self, limit: usize) -> Vec<AuditEntry>;
}

/// The answer to a route change: the table version that has it, or why it was refused.
pub type RouteResult = Result<u64, RouteError>;

/// The routing table of a node that is alone: changes apply at once, in memory.
pub struct LocalRoutes {
    table: ArcSwap<RoutingTable>,
    /// Held while a change is made; holds the audit trail, oldest first.
    write: Mutex<VecDeque<AuditEntry>>,
    audit_limit: usize,
}

impl LocalRoutes {
    pub fn new(table: RoutingTable) -> Self {
        LocalRoutes {
            table: ArcSwap::from_pointee(table),
            write: Mutex::new(VecDeque::new()),
            audit_limit: DEFAULT_AUDIT_ENTRIES,
        }
    }

    /// Changes the table with `f` and records the change as `action` on `subject` by `by`.
    fn update(
        &self,
        (action, subject, detail): (&str, &OpType, String),
        by: Arc<str>,
        f: impl FnOnce(&mut RoutingTable) -> Result<(), RouteError>,
    ) -> Result<u64, RouteError> {
        let mut audit = self.write.lock();
        let mut next = RoutingTable::clone(&self.table.load());
        f(&mut next)?;
        next.version += 1;
        let v = next.version;
        self.table.store(Arc::new(next));
        if audit.len() >= self.audit_limit {
            audit.pop_front();
        }
        audit.push_back(AuditEntry {
            at_ms: now_ms(),
            by: by.to_string(),
            action: action.into(),
            subject: subject.to_string(),
            detail,
            version: v,
        });
        Ok(v)
    }
}

/// Whether `table` may take a route for `op_type`: some node serves the type, and the
/// route replaces one or the table holds fewer than `max_routes`. The node that takes a
/// route write checks this against its replica of the table (in a cluster, concurrent
/// writes through different nodes may pass the maximum by a few).
pub fn check_route_write(
    table: &RoutingTable,
    op_type: &str,
    max_routes: usize,
) -> Result<(), RouteError> {
    if !table.nodes.iter().any(|n| n.serves(op_type)) {
        let mut served: Vec<String> = table
            .nodes
            .iter()
            .flat_map(|n| n.serves.iter().map(|t| t.to_string()))
            .collect();
        served.sort_unstable();
        served.dedup();
        return Err(RouteError::NoRoute {
            op_type: op_type.to_owned(),
            served,
        });
    }
    if table.routes.len() >= max_routes && !table.routes.contains_key(op_type) {
        return Err(RouteError::TooManyRoutes {
            op_type: op_type.to_owned(),
            max: max_routes,
        });
    }
    Ok(())
}

/// Checks a route against the table's node registry.
pub fn validate_route(table: &RoutingTable, route: &Route) -> Result<(), RouteError> {
    for n in &route.nodes {
        if !table.nodes.iter().any(|v| v.id == *n) {
            return Err(RouteError::UnknownNode(n.to_string()));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for n in &route.nodes {
        if !seen.insert(n) {
            return Err(RouteError::Invalid {
                field: "nodes",
                reason: format!("node `{n}` is listed twice"),
            });
        }
    }
    Ok(())
}

impl RouteStore for LocalRoutes {
    fn snapshot(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    fn load(&self) -> arc_swap::Guard<Arc<RoutingTable>> {
        self.table.load()
    }

    fn set_route(
        &self,
        op_type: OpType,
        route: Route,
        by: Arc<str>,
    ) -> BoxFuture<'static, RouteResult> {
        let what = ("route.set", &op_type, AuditEntry::route_detail(&route));
        let r = self.update(what, by, |t| {
            validate_route(t, &route)?;
            t.routes.insert(op_type.clone(), route);
            Ok(())
        });
        futures::future::ready(r).boxed()
    }

    fn remove_route(&self, op_type: OpType, by: Arc<str>) -> BoxFuture<'static, RouteResult> {
        let r = self.update(("route.remove", &op_type, String::new()), by, |t| {
            match t.routes.remove(&op_type) {
                Some(_) => Ok(()),
                None => Err(RouteError::NotFound(op_type.to_string())),
            }
        });
        futures::future::ready(r).boxed()
    }

    fn audit(&self, limit: usize) -> Vec<AuditEntry> {
        self.write
            .lock()
            .iter()
            .rev()
            .take(limit)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::Strategy;
    use super::*;
    use proptest::prelude::{any, prop_assert, prop_assert_eq, prop_assert_ne, proptest};

    fn node(id: &str, healthy: bool, load: u64) -> NodeView {
        NodeView {
            id: id.into(),
            healthy,
            serves: vec!["echo".into()],
            load,
            overloaded: Vec::new(),
            congested: false,
            open_breakers: Vec::new(),
        }
    }

    fn overloaded(mut n: NodeView) -> NodeView {
        n.overloaded = vec!["echo".into()];
        n
    }

    #[test]
    fn overloaded_nodes_are_passed_over_while_another_can_take_the_type() {
        let mut t = table(vec![
            node("a", true, 0),
            overloaded(node("b", true, 0)),
            node("c", false, 0),
        ]);
        let mut rr = 0;
        for _ in 0..10 {
            assert_eq!(&**pick(&t, "echo", None, None, &mut rr).unwrap(), "a");
        }
        assert_eq!(t.overloaded_owner("echo", None), None);
        // Pinned to b first: a takes it while b is overloaded.
        t.routes.insert(
            "echo".into(),
            Route {
                strategy: Strategy::Pinned,
                nodes: vec!["b".into(), "a".into()],
            },
        );
        assert_eq!(&**pick(&t, "echo", None, None, &mut rr).unwrap(), "a");
        // A keyed operation stays with its owner; the door refuses it while that owner
        // is overloaded, so its repeats still meet its cache.
        let to_b = (0..u64::MAX)
            .find(|kh| {
                &**pick(
                    &table(vec![node("a", true, 0), node("b", true, 0)]),
                    "echo",
                    None,
                    Some(*kh),
                    &mut rr,
                )
                .unwrap()
                    == "b"
            })
            .unwrap();
        assert_eq!(&**pick(&t, "echo", None, Some(to_b), &mut rr).unwrap(), "b");
        assert_eq!(
            t.overloaded_owner("echo", Some(to_b)).map(|n| &*n.id),
            Some("b")
        );
        // Every healthy node overloaded: picks go on as before, and the door refuses.
        t.nodes[0] = overloaded(node("a", true, 0));
        assert_eq!(&**pick(&t, "echo", None, None, &mut rr).unwrap(), "b");
        assert_eq!(t.overloaded_owner("echo", None).map(|n| &*n.id), Some("b"));
        assert_eq!(t.overloaded_owner("other", None), None);
    }

    #[test]
    fn open_breakers_and_congested_links_are_passed_over_until_every_node_refuses() {
        let now = Instant::now();
        let open = |mut n: NodeView, ms| {
            n.open_breakers = vec![("echo".into(), now + Duration::from_millis(ms))];
            n
        };
        let mut t = table(vec![open(node("a", true, 0), 500), node("b", true, 0)]);
        let mut rr = 0;
        for _ in 0..4 {
            assert_eq!(&**pick(&t, "echo", None, None, &mut rr).unwrap(), "b");
        }
        assert_eq!(t.open_breaker("echo", None, now), None, "b can take it");
        // Both open: the door refuses, naming the first and how long it stays open.
        t.nodes[1] = open(node("b", true, 0), 900);
        let (n, left) = t.open_breaker("echo", None, now).unwrap();
        assert_eq!((&**n, left), ("a", Duration::from_millis(500)));
        assert_eq!(t.open_breaker("other", None, now), None);
        // Its time up, a breaker no longer refuses (the owner lets trials through).
        let later = now + Duration::from_millis(600);
        assert_eq!(t.open_breaker("echo", None, later), None);
        assert_eq!(t.nodes[0].breaker_open_for("echo", later), None);
        // A congested link makes its node overloaded with every type.
        let mut t = table(vec![node("a", true, 0), node("b", true, 0)]);
        t.nodes[0].congested = true;
        assert!(t.nodes[0].overloaded_for("anything"));
        for _ in 0..4 {
            assert_eq!(&**pick(&t, "echo", None, None, &mut rr).unwrap(), "b");
        }
        t.nodes[1].congested = true;
        assert_eq!(t.overloaded_owner("echo", None).map(|n| &*n.id), Some("a"));
    }

    fn table(nodes: Vec<NodeView>) -> RoutingTable {
        RoutingTable {
            version: 1,
            routes: BTreeMap::new(),
            nodes,
        }
    }

    #[test]
    fn single_node_picks_itself() {
        let t = table(vec![node("a", true, 0)]);
        let mut rr = 0;
        assert_eq!(&**pick(&t, "echo", None, None, &mut rr).unwrap(), "a");
        assert_eq!(&**pick(&t, "echo", Some("k"), None, &mut rr).unwrap(), "a");
        assert_eq!(
            pick(&t, "nope", None, None, &mut rr),
            Err(PickError::NoNodeServes("nope".into()))
        );
    }

    #[test]
    fn an_idempotency_key_goes_to_one_node_whatever_the_strategy_and_pinned_stays_pinned() {
        let mut t = table(vec![
            node("a", true, 5),
            node("b", true, 0),
            node("c", true, 9),
        ]);
        let keys: Vec<u64> = (0..64)
            .map(|i| affinity(None, &format!("order-{i}")))
            .collect();
        let mut owners = std::collections::HashSet::new();
        for s in [
            Strategy::RoundRobin,
            Strategy::LeastLoaded,
            Strategy::ConsistentHash,
        ] {
            t.routes.insert(
                "echo".into(),
                Route {
                    strategy: s,
                    nodes: vec![],
                },
            );
            for (i, &k) in keys.iter().enumerate() {
                let mut rr = i as u64;
                let first = pick(&t, "echo", None, Some(k), &mut rr).unwrap().clone();
                // Any round-robin position, any routing key, any load: the same node.
                for other in 0..5u64 {
                    let mut rr = other * 7;
                    t.nodes[0].load = other;
                    let again = pick(&t, "echo", Some("rk"), Some(k), &mut rr).unwrap();
                    assert_eq!(*again, first, "{s:?}");
                }
                owners.insert(first);
            }
        }
        assert_eq!(owners.len(), 3, "keys spread over the nodes");
        // Its owner down: the key moves, and every key of the others stays.
        let before: Vec<NodeId> = keys
            .iter()
            .map(|&k| pick(&t, "echo", None, Some(k), &mut 0).unwrap().clone())
            .collect();
        t.nodes[1].healthy = false;
        for (&k, was) in keys.iter().zip(&before) {
            let now = pick(&t, "echo", None, Some(k), &mut 0).unwrap();
            assert_ne!(&**now, "b");
            if &**was != "b" {
                assert_eq!(now, was, "only the down node's keys move");
            }
        }
        // Pinned stays pinned.
        t.routes.insert(
            "echo".into(),
            Route {
                strategy: Strategy::Pinned,
                nodes: vec!["c".into()],
            },
        );
        for &k in &keys {
            assert_eq!(&**pick(&t, "echo", None, Some(k), &mut 0).unwrap(), "c");
        }
        // An owner's key is its own.
        assert_ne!(affinity(Some("app"), "k"), affinity(None, "k"));
        assert_ne!(affinity(Some("app"), "k"), affinity(Some("other"), "k"));
    }

    #[test]
    fn round_robin_cycles_over_healthy_nodes() {
        let t = table(vec![
            node("a", true, 0),
            node("b", false, 0),
            node("c", true, 0),
        ]);
        let mut rr = 0;
        let picks: Vec<String> = (0..4)
            .map(|_| pick(&t, "echo", None, None, &mut rr).unwrap().to_string())
            .collect();
        assert_eq!(picks, ["a", "c", "a", "c"]);
    }

    #[test]
    fn least_loaded_and_pinned() {
        let mut t = table(vec![
            node("a", true, 9),
            node("b", true, 2),
            node("c", true, 5),
        ]);
        t.routes.insert(
            "echo".into(),
            Route {
                strategy: Strategy::LeastLoaded,
                nodes: vec![],
            },
        );
        let mut rr = 0;
        assert_eq!(&**pick(&t, "echo", None, None, &mut rr).unwrap(), "b");
        t.routes.insert(
            "echo".into(),
            Route {
                strategy: Strategy::Pinned,
                nodes: vec!["c".into(), "a".into()],
            },
        );
        assert_eq!(&**pick(&t, "echo", None, None, &mut rr).unwrap(), "c");
        t.nodes[2].healthy = false;
        assert_eq!(&**pick(&t, "echo", None, None, &mut rr).unwrap(), "a");
        t.nodes[0].healthy = false;
        assert_eq!(
            pick(&t, "echo", None, None, &mut rr),
            Err(PickError::NoHealthyNode("echo".into()))
        );
    }

    #[test]
    fn a_route_write_needs_a_serving_node_and_room_in_the_table() {
        let mut a = node("a", true, 0);
        a.serves = vec!["resize".into(), "echo".into()];
        let mut b = node("b", false, 0);
        b.serves = vec!["echo".into(), "webhook".into()];
        let mut t = table(vec![a, b]);
        // Served by a node that is down still counts: it comes back.
        assert_eq!(check_route_write(&t, "webhook", 2), Ok(()));
        let e = check_route_write(&t, "nope", 2).unwrap_err();
        assert_eq!(
            e,
            RouteError::NoRoute {
                op_type: "nope".into(),
                served: vec!["echo".into(), "resize".into(), "webhook".into()],
            }
        );
        assert!(
            e.to_string()
                .ends_with("served types: echo, resize, webhook"),
            "{e}"
        );
        let any = Route {
            strategy: Strategy::RoundRobin,
            nodes: vec![],
        };
        t.routes.insert("echo".into(), any.clone());
        t.routes.insert("resize".into(), any);
        // Full: a new route is refused, one that replaces a route is not.
        assert_eq!(
            check_route_write(&t, "webhook", 2),
            Err(RouteError::TooManyRoutes {
                op_type: "webhook".into(),
                max: 2
            })
        );
        assert_eq!(check_route_write(&t, "echo", 2), Ok(()));
        assert_eq!(check_route_write(&t, "webhook", 3), Ok(()));
        let none = RoutingTable::default();
        assert!(check_route_write(&none, "echo", 5)
            .unwrap_err()
            .to_string()
            .ends_with("served types: none"));
    }

    #[test]
    fn local_routes_version_validate_and_audit() {
        use futures::executor::block_on;
        let r = LocalRoutes::new(table(vec![node("a", true, 0)]));
        let pinned = |n: &str| Route {
            strategy: Strategy::Pinned,
            nodes: vec![n.into()],
        };
        let by = |b: &str| Arc::<str>::from(b);
        assert_eq!(
            block_on(r.set_route("echo".into(), pinned("a"), by("deployer"))),
            Ok(2)
        );
        assert_eq!(r.snapshot().routes["echo"].strategy, Strategy::Pinned);
        assert_eq!(
            block_on(r.set_route("echo".into(), pinned("zz"), by("x"))),
            Err(RouteError::UnknownNode("zz".into()))
        );
        assert_eq!(block_on(r.remove_route("echo".into(), by("ops"))), Ok(3));
        assert_eq!(
            block_on(r.remove_route("echo".into(), by("x"))),
            Err(RouteError::NotFound("echo".into()))
        );
        // Refused changes leave no entry; newest first.
        let audit: Vec<(String, String, String, u64)> = r
            .audit(10)
            .into_iter()
            .map(|e| (e.by, e.action, e.detail, e.version))
            .collect();
        assert_eq!(
            audit,
            [
                ("ops".into(), "route.remove".into(), String::new(), 3),
                (
                    "deployer".into(),
                    "route.set".into(),
                    "pinned [a]".into(),
                    2
                ),
            ]
        );
        assert_eq!(r.audit(1).len(), 1);
    }

    proptest! {
        #[test]
        fn picks_are_always_healthy_candidates(
            health in proptest::collection::vec(any::<bool>(), 1..8),
            key in proptest::option::of("[a-z]{1,8}"),
            strategy in 0usize..4,
            rr0 in any::<u64>(),
        ) {
            let nodes: Vec<NodeView> = health.iter().enumerate()
                .map(|(i, h)| node(&format!("n{i}"), *h, i as u64)).collect();
            let mut t = table(nodes);
            let s = [Strategy::RoundRobin, Strategy::LeastLoaded, Strategy::ConsistentHash, Strategy::Pinned][strategy];
            t.routes.insert("echo".into(), Route { strategy: s, nodes: vec![] });
            let mut rr = rr0;
            match pick(&t, "echo", key.as_deref(), None, &mut rr) {
                Ok(id) => prop_assert!(t.nodes.iter().any(|n| n.id == *id && n.healthy)),
                Err(e) => {
                    prop_assert!(health.iter().all(|h| !h));
                    prop_assert_eq!(e, PickError::NoHealthyNode("echo".into()));
                }
            }
        }

        #[test]
        fn consistent_hash_moves_only_keys_of_the_removed_node(
            n in 2usize..8,
            down in 0usize..8,
            keys in proptest::collection::vec("[a-z0-9]{1,12}", 1..64),
        ) {
            let down = down % n;
            let nodes: Vec<NodeView> = (0..n).map(|i| node(&format!("n{i}"), true, 0)).collect();
            let before = table(nodes.clone());
            let mut after = table(nodes);
            after.nodes[down].healthy = false;
            let mut rr = 0;
            for k in &keys {
                let a = pick(&before, "echo", Some(k), None, &mut rr).unwrap();
                let b = pick(&after, "echo", Some(k), None, &mut rr).unwrap();
                // Stable for the same table.
                prop_assert_eq!(&a, &pick(&before, "echo", Some(k), None, &mut rr).unwrap());
                if **a != *format!("n{down}") {
                    prop_assert_eq!(a, b);
                } else {
                    prop_assert_ne!(b, a);
                }
            }
        }

        #[test]
        fn round_robin_is_even(n in 1usize..6, rounds in 1usize..20) {
            let t = table((0..n).map(|i| node(&format!("n{i}"), true, 0)).collect());
            let mut rr = 0;
            let mut counts = std::collections::HashMap::new();
            for _ in 0..n * rounds {
                *counts.entry(pick(&t, "echo", None, None, &mut rr).unwrap()).or_insert(0usize) += 1;
            }
            prop_assert_eq!(counts.len(), n);
            prop_assert!(counts.values().all(|&c| c == rounds));
        }
    }
}
