//! The state machine: the [`ClusterState`] every node routes by, how each [`Command`] changes
//! it, and its snapshots.
//!
//! [`apply_command`] is the decision, a plain function of the state and the command. The
//! [`StateMachineStore`] is openraft's [`RaftStateMachine`] around it: it keeps the state, the
//! last applied log id and the last membership in memory, publishes the state to readers
//! through an [`ArcSwap`] once per applied batch, and keeps snapshots in the `snapshot` table
//! of redb (`"meta"`: the [`SnapshotMeta`], postcard; `"data"`: the state, JSON). The state
//! itself is not written on apply; a restart starts from the stored snapshot and openraft
//! re-applies the committed entries after it.

use std::io::Cursor;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, StorageError, StorageIOError};
use opmesh_actors::routing::{validate_route, NodeView, RouteError, RoutingTable};
use opmesh_actors::NodeId;
use redb::Database;
use tokio::sync::watch;

use super::{blocking, decode_state, encode_state, load_snapshot, save_snapshot};
use crate::types::{
    AuditEntry, ClusterState, Command, CommandResult, Entry, LogId, NodeStatus, RaftId, Request,
    SnapshotData, SnapshotMeta, StoredMembership, TypeConfig,
};

/// Why a command was refused. Its text is what the caller reads in
/// [`CommandResult::error`].
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("unknown node `{0}`")]
    UnknownNode(NodeId),
    #[error("node `{name}` has Raft id {raft_id}, which node `{holder}` already has")]
    RaftIdTaken {
        name: NodeId,
        raft_id: RaftId,
        holder: NodeId,
    },
}

/// The routing table of a cluster state: its routes and, per registered node, a view that is
/// healthy when the node is up. Load is 0: the replicated state does not carry it.
pub fn routing_table(state: &ClusterState) -> RoutingTable {
    RoutingTable {
        version: state.version,
        routes: state.routes.clone(),
        nodes: state
            .nodes
            .values()
            .map(|n| NodeView {
                id: n.name.clone(),
                healthy: n.status == NodeStatus::Up,
                serves: n.serves.clone(),
                load: 0,
                overloaded: Vec::new(),
                congested: false,
                open_breakers: Vec::new(),
            })
            .collect(),
    }
}

/// Applies one command to `state`.
///
/// A change raises `state.version` by one. A command that would change nothing (a route set
/// to what it already is, a node rejoining with the same record, a status set to the one it
/// has) succeeds without raising it. A refused command leaves `state` exactly as it was; the
/// result says why.
///
/// - `SetRoute` is refused if its node list names a node the registry does not know, or a
///   node twice (the same check as a single node's route API).
/// - `RemoveRoute` is refused if the type has no route.
/// - `NodeJoined` inserts or replaces the node's record, always as up. It is refused if
///   another name already holds the record's Raft id.
/// - `SetStatus` is refused for an unknown node.
/// - `NodeLeft` is refused for an unknown node. Otherwise the node leaves the registry and
///   every route's node list; a route whose list this empties is removed, since an empty list
///   would silently mean "every node that serves the type", which its author never chose. A
///   route that had an empty list to begin with is kept.
pub fn apply_command(state: &mut ClusterState, cmd: Command) -> CommandResult {
    match decide(state, cmd) {
        Ok(changed) => {
            if changed {
                state.version += 1;
            }
            CommandResult {
                version: state.version,
                error: None,
            }
        }
        Err(refusal) => CommandResult {
            version: state.version,
            error: Some(refusal.to_string()),
        },
    }
}

/// Applies a [`Request`]: its command, and when that changed the state, an entry in the
/// audit trail with who asked and when, keeping the newest `audit_limit` entries.
/// Refused commands and commands that changed nothing leave no entry.
pub fn apply_request(state: &mut ClusterState, req: Request, audit_limit: usize) -> CommandResult {
    let (action, subject, detail) = describe(&req.command);
    let before = state.version;
    let result = apply_command(state, req.command);
    if state.version != before && audit_limit > 0 {
        let audit = Arc::make_mut(&mut state.audit);
        while audit.len() >= audit_limit {
            audit.pop_front();
        }
        audit.push_back(AuditEntry {
            at_ms: req.at_ms,
            by: req.by,
            action: action.into(),
            subject,
            detail,
            version: state.version,
        });
    }
    result
}

/// A command as the audit trail shows it: action, subject and detail.
fn describe(cmd: &Command) -> (&'static str, String, String) {
    match cmd {
        Command::SetRoute { op_type, route } => (
            "route.set",
            op_type.to_string(),
            AuditEntry::route_detail(route),
        ),
        Command::RemoveRoute { op_type } => ("route.remove", op_type.to_string(), String::new()),
        Command::NodeJoined(r) => (
            "node.joined",
            r.name.to_string(),
            format!("cluster {}, http {}", r.cluster_addr, r.http_addr),
        ),
        Command::SetStatus { name, status } => {
            ("node.status", name.to_string(), status.as_str().into())
        }
        Command::NodeLeft { name } => ("node.left", name.to_string(), String::new()),
    }
}

/// Checks, then changes: every refusal returns before the first write. Returns whether the
/// state changed.
fn decide(state: &mut ClusterState, cmd: Command) -> Result<bool, Refusal> {
    match cmd {
        Command::SetRoute { op_type, route } => {
            let view = RoutingTable {
                nodes: routing_table(state).nodes,
                ..RoutingTable::default()
            };
            validate_route(&view, &route)?;
            if state.routes.get(&op_type) == Some(&route) {
                return Ok(false);
            }
            state.routes.insert(op_type, route);
            Ok(true)
        }
        Command::RemoveRoute { op_type } => match state.routes.remove(&op_type) {
            Some(_) => Ok(true),
            None => Err(RouteError::NotFound(op_type.to_string()).into()),
        },
        Command::NodeJoined(mut record) => {
            if let Some(holder) = state
                .nodes
                .values()
                .find(|n| n.raft_id == record.raft_id && n.name != record.name)
            {
                return Err(Refusal::RaftIdTaken {
                    name: record.name,
                    raft_id: record.raft_id,
                    holder: holder.name.clone(),
                });
            }
            record.status = NodeStatus::Up;
            if state.nodes.get(&record.name) == Some(&record) {
                return Ok(false);
            }
            state.nodes.insert(record.name.clone(), record);
            Ok(true)
        }
        Command::SetStatus { name, status } => {
            let Some(node) = state.nodes.get_mut(&name) else {
                return Err(Refusal::UnknownNode(name));
            };
            if node.status == status {
                return Ok(false);
            }
            node.status = status;
            Ok(true)
        }
        Command::NodeLeft { name } => {
            if state.nodes.remove(&name).is_none() {
                return Err(Refusal::UnknownNode(name));
            }
            state.routes.retain(|_, route| {
                if !route.nodes.contains(&name) {
                    return true;
                }
                route.nodes.retain(|n| *n != name);
                !route.nodes.is_empty()
            });
            Ok(true)
        }
    }
}

/// The replicated state machine of one node.
///
/// Take [`state`](Self::state) and [`version_watch`](Self::version_watch) before handing the
/// store to openraft: they are how the rest of the node reads what Raft applied.
pub struct StateMachineStore {
    db: Arc<Database>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    state: ClusterState,
    published: Arc<ArcSwap<ClusterState>>,
    version: watch::Sender<u64>,
    /// The most audit entries the state keeps (`cluster.audit_entries`).
    audit_limit: usize,
}

impl StateMachineStore {
    /// A state machine starting from `restored` (a stored snapshot's meta and state), or
    /// empty.
    pub(super) fn new(
        db: Arc<Database>,
        restored: Option<(SnapshotMeta, ClusterState)>,
        audit_limit: usize,
    ) -> Self {
        let (last_applied, membership, state) = match restored {
            Some((meta, state)) => (meta.last_log_id, meta.last_membership, state),
            None => (None, StoredMembership::default(), ClusterState::default()),
        };
        let (version, _) = watch::channel(state.version);
        StateMachineStore {
            db,
            last_applied,
            membership,
            published: Arc::new(ArcSwap::from_pointee(state.clone())),
            state,
            version,
            audit_limit,
        }
    }

    /// Keeps at most `limit` audit entries from now on (`cluster.audit_entries`).
    pub fn with_audit_limit(mut self, limit: usize) -> Self {
        self.audit_limit = limit;
        self
    }

    /// The applied state, swapped as a whole after each applied batch and each installed
    /// snapshot. A reader loads it without waiting and always sees one consistent version.
    pub fn state(&self) -> Arc<ArcSwap<ClusterState>> {
        Arc::clone(&self.published)
    }

    /// The version of the applied state: changes when the state does, after it is
    /// published through [`state`](Self::state). Wait with `wait_for(|v| *v >= version)`
    /// for a write's [`CommandResult::version`] to be visible here. The channel closes when
    /// the store is dropped (Raft stopped).
    pub fn version_watch(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    fn publish(&self) {
        self.published.store(Arc::new(self.state.clone()));
        self.version.send_replace(self.state.version);
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership), StorageError<RaftId>> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError<RaftId>>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let before = self.state.version;
        let mut results = Vec::new();
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Normal(req) => {
                    let result = apply_request(&mut self.state, req, self.audit_limit);
                    if let Some(error) = &result.error {
                        tracing::debug!(log_id = %entry.log_id, %error, "command refused");
                    }
                    result
                }
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    CommandResult {
                        version: self.state.version,
                        error: None,
                    }
                }
                EntryPayload::Blank => CommandResult {
                    version: self.state.version,
                    error: None,
                },
            };
            results.push(result);
        }
        if self.state.version != before {
            self.publish();
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
            db: Arc::clone(&self.db),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            state: self.published.load_full(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<SnapshotData>, StorageError<RaftId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError<RaftId>> {
        let data = snapshot.into_inner();
        let state = decode_state(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        let stored = meta.clone();
        blocking(&self.db, move |db| save_snapshot(db, &stored, &data))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        tracing::info!(snapshot = %meta, version = state.version, "installed a snapshot");
        self.state = state;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<RaftId>> {
        let stored = blocking(&self.db, load_snapshot)
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(stored.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

/// Builds a snapshot of the state as it was when openraft asked for the builder, while the
/// state machine goes on applying.
pub struct SnapshotBuilder {
    db: Arc<Database>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    state: Arc<ClusterState>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    /// Serializes the state and stores it as the current snapshot (unless a snapshot that
    /// covers more of the log was installed meanwhile).
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<RaftId>> {
        let data =
            encode_state(&self.state).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let built_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let covers = self
            .last_applied
            .map_or_else(|| "empty".to_owned(), |id| id.to_string());
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id: format!("{covers}-{built_at}"),
        };
        let (stored, bytes) = (meta.clone(), data.clone());
        let saved = blocking(&self.db, move |db| save_snapshot(db, &stored, &bytes))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        tracing::info!(snapshot = %meta, version = self.state.version, saved, "built a snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet, HashSet};

    use openraft::{CommittedLeaderId, Membership};
    use opmesh_actors::{Route, Strategy};
    use proptest::prelude::{prop, prop_assert, prop_assert_eq, prop_oneof, proptest};
    use proptest::strategy::Strategy as _;

    use super::*;
    use crate::store::Store;
    use crate::types::{raft_id, Member, NodeRecord};

    fn record(name: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            raft_id: raft_id(name),
            cluster_addr: format!("{name}:7000"),
            http_addr: format!("{name}:8000"),
            serves: vec!["resize".into()],
            status: NodeStatus::Up,
        }
    }

    fn route(strategy: Strategy, nodes: &[&str]) -> Route {
        Route {
            strategy,
            nodes: nodes.iter().map(|n| NodeId::from(*n)).collect(),
        }
    }

    fn set_route(op_type: &str, nodes: &[&str]) -> Command {
        Command::SetRoute {
            op_type: op_type.into(),
            route: route(Strategy::RoundRobin, nodes),
        }
    }

    /// A state with nodes `a`, `b`, `c` joined (version 3).
    fn three_nodes() -> ClusterState {
        let mut state = ClusterState::default();
        for n in ["a", "b", "c"] {
            assert_eq!(
                apply_command(&mut state, Command::NodeJoined(record(n))).error,
                None
            );
        }
        assert_eq!(state.version, 3);
        state
    }

    /// Applies a command that must be refused with `error`, and checks nothing changed.
    fn assert_refused(state: &mut ClusterState, cmd: Command, error: &str) {
        let before = state.clone();
        let result = apply_command(state, cmd);
        assert_eq!(result.error.as_deref(), Some(error));
        assert_eq!(result.version, before.version);
        assert_eq!(*state, before);
    }

    #[test]
    fn committed_changes_are_audited_with_who_and_when_and_the_trail_is_bounded() {
        let mut state = three_nodes();
        let req = |cmd: Command, by: &str, at_ms: u64| Request {
            command: cmd,
            by: by.into(),
            at_ms,
        };
        let r = apply_request(
            &mut state,
            req(set_route("resize", &["b", "a"]), "deployer", 7),
            3,
        );
        assert_eq!(r.error, None);
        let last = state.audit.back().unwrap();
        assert_eq!(
            (
                last.by.as_str(),
                last.action.as_str(),
                last.subject.as_str()
            ),
            ("deployer", "route.set", "resize")
        );
        assert_eq!(
            (last.detail.as_str(), last.at_ms, last.version),
            ("round_robin [b, a]", 7, 4)
        );
        // The same route again changes nothing; a refused command neither: no entry.
        apply_request(&mut state, req(set_route("resize", &["b", "a"]), "x", 8), 3);
        apply_request(&mut state, req(set_route("resize", &["z"]), "x", 9), 3);
        assert_eq!(state.audit.len(), 1);
        for (i, status) in [NodeStatus::Down, NodeStatus::Up, NodeStatus::Down]
            .into_iter()
            .enumerate()
        {
            let cmd = Command::SetStatus {
                name: "c".into(),
                status,
            };
            apply_request(&mut state, req(cmd, "node:a", 10 + i as u64), 3);
        }
        // Three kept, the oldest gone; every node applying the same log keeps the same.
        let kept: Vec<(&str, &str, u64)> = state
            .audit
            .iter()
            .map(|e| (e.action.as_str(), e.detail.as_str(), e.at_ms))
            .collect();
        assert_eq!(
            kept,
            [
                ("node.status", "down", 10),
                ("node.status", "up", 11),
                ("node.status", "down", 12)
            ]
        );
        // A snapshot carries the trail.
        let back = decode_state(&encode_state(&state).unwrap()).unwrap();
        assert_eq!(back.audit, state.audit);
    }

    #[test]
    fn a_joining_node_is_registered_up() {
        let mut state = ClusterState::default();
        let mut down = record("a");
        down.status = NodeStatus::Down;
        let result = apply_command(&mut state, Command::NodeJoined(down));
        assert_eq!(
            result,
            CommandResult {
                version: 1,
                error: None
            }
        );
        assert_eq!(state.nodes["a"], record("a"));
    }

    #[test]
    fn a_rejoin_updates_the_record_and_an_identical_one_changes_nothing() {
        let mut state = three_nodes();
        assert_eq!(
            apply_command(&mut state, Command::NodeJoined(record("a"))).version,
            3
        );
        let mut moved = record("a");
        moved.cluster_addr = "elsewhere:7000".into();
        apply_command(
            &mut state,
            Command::SetStatus {
                name: "a".into(),
                status: NodeStatus::Down,
            },
        );
        let result = apply_command(&mut state, Command::NodeJoined(moved.clone()));
        assert_eq!(result.version, 5);
        assert_eq!(state.nodes["a"], moved);
    }

    #[test]
    fn a_join_with_a_taken_raft_id_is_refused() {
        let mut state = three_nodes();
        let mut impostor = record("d");
        impostor.raft_id = raft_id("a");
        let error = format!(
            "node `d` has Raft id {}, which node `a` already has",
            raft_id("a")
        );
        assert_refused(&mut state, Command::NodeJoined(impostor), &error);
    }

    #[test]
    fn a_route_over_known_nodes_is_set() {
        let mut state = three_nodes();
        let result = apply_command(&mut state, set_route("resize", &["b", "a"]));
        assert_eq!(result.version, 4);
        assert_eq!(
            state.routes["resize"],
            route(Strategy::RoundRobin, &["b", "a"])
        );
        assert_eq!(
            apply_command(&mut state, set_route("resize", &["b", "a"])).version,
            4,
            "setting the same route again changes nothing"
        );
    }

    #[test]
    fn a_route_naming_an_unknown_node_is_refused() {
        let mut state = three_nodes();
        assert_refused(
            &mut state,
            set_route("resize", &["a", "x"]),
            "unknown node `x` in field `nodes`",
        );
    }

    #[test]
    fn a_route_listing_a_node_twice_is_refused() {
        let mut state = three_nodes();
        assert_refused(
            &mut state,
            set_route("resize", &["a", "b", "a"]),
            "field `nodes` is invalid: node `a` is listed twice",
        );
    }

    #[test]
    fn a_route_is_removed_and_a_missing_one_refused() {
        let mut state = three_nodes();
        apply_command(&mut state, set_route("resize", &["a"]));
        let result = apply_command(
            &mut state,
            Command::RemoveRoute {
                op_type: "resize".into(),
            },
        );
        assert_eq!(result.version, 5);
        assert!(state.routes.is_empty());
        assert_refused(
            &mut state,
            Command::RemoveRoute {
                op_type: "resize".into(),
            },
            "no route for operation type `resize`",
        );
    }

    #[test]
    fn a_status_is_set_and_an_unknown_node_refused() {
        let mut state = three_nodes();
        let down = |name: &str| Command::SetStatus {
            name: name.into(),
            status: NodeStatus::Down,
        };
        assert_eq!(apply_command(&mut state, down("b")).version, 4);
        assert_eq!(state.nodes["b"].status, NodeStatus::Down);
        assert_eq!(apply_command(&mut state, down("b")).version, 4);
        assert_refused(&mut state, down("x"), "unknown node `x`");
    }

    #[test]
    fn a_leaving_node_leaves_the_registry_and_every_route() {
        let mut state = three_nodes();
        apply_command(&mut state, set_route("resize", &["a", "b"]));
        apply_command(&mut state, set_route("only-a", &["a"]));
        apply_command(&mut state, set_route("anywhere", &[]));
        apply_command(&mut state, set_route("elsewhere", &["c"]));
        let result = apply_command(&mut state, Command::NodeLeft { name: "a".into() });
        assert_eq!(result.version, 8);
        assert!(!state.nodes.contains_key("a"));
        assert_eq!(state.routes["resize"], route(Strategy::RoundRobin, &["b"]));
        assert!(
            !state.routes.contains_key("only-a"),
            "a route emptied by the leave is dropped"
        );
        assert_eq!(state.routes["anywhere"], route(Strategy::RoundRobin, &[]));
        assert_eq!(
            state.routes["elsewhere"],
            route(Strategy::RoundRobin, &["c"])
        );
        assert_refused(
            &mut state,
            Command::NodeLeft { name: "a".into() },
            "unknown node `a`",
        );
    }

    #[test]
    fn the_routing_table_sees_down_nodes_as_unhealthy() {
        let mut state = three_nodes();
        apply_command(
            &mut state,
            Command::SetStatus {
                name: "c".into(),
                status: NodeStatus::Leaving,
            },
        );
        apply_command(&mut state, set_route("resize", &["c", "a"]));
        let table = routing_table(&state);
        assert_eq!(table.version, state.version);
        assert_eq!(table.routes, state.routes);
        let healthy: Vec<(&str, bool)> = table.nodes.iter().map(|n| (&*n.id, n.healthy)).collect();
        assert_eq!(healthy, [("a", true), ("b", true), ("c", false)]);
    }

    fn arb_command() -> impl proptest::strategy::Strategy<Value = Command> {
        let name = prop::sample::select(vec!["a", "b", "c", "d"]);
        let names = prop::collection::vec(name.clone(), 0..4);
        let status =
            prop::sample::select(vec![NodeStatus::Up, NodeStatus::Down, NodeStatus::Leaving]);
        prop_oneof![
            (name.clone(), prop::bool::ANY).prop_map(|(n, moved)| {
                let mut r = record(n);
                if moved {
                    r.http_addr = format!("{n}:9000");
                }
                Command::NodeJoined(r)
            }),
            (prop::sample::select(vec!["x", "y"]), names).prop_map(|(t, ns)| set_route(t, &ns)),
            prop::sample::select(vec!["x", "y"])
                .prop_map(|t| Command::RemoveRoute { op_type: t.into() }),
            (name.clone(), status).prop_map(|(n, status)| Command::SetStatus {
                name: n.into(),
                status
            }),
            name.prop_map(|n| Command::NodeLeft { name: n.into() }),
        ]
    }

    proptest! {
        /// Whatever the commands: a refusal changes nothing, the version rises by one exactly
        /// when the state changes, and routes only ever list registered nodes, each once.
        #[test]
        fn commands_keep_the_state_consistent(cmds in prop::collection::vec(arb_command(), 0..40)) {
            let mut state = ClusterState::default();
            for cmd in cmds {
                let before = state.clone();
                let result = apply_command(&mut state, cmd);
                prop_assert_eq!(result.version, state.version);
                if result.error.is_some() {
                    prop_assert_eq!(&state, &before);
                } else {
                    let changed = ClusterState { version: before.version, ..state.clone() } != before;
                    prop_assert_eq!(state.version, before.version + u64::from(changed));
                }
                for route in state.routes.values() {
                    let listed: HashSet<&NodeId> = route.nodes.iter().collect();
                    prop_assert_eq!(listed.len(), route.nodes.len());
                    prop_assert!(route.nodes.iter().all(|n| state.nodes.contains_key(n)));
                }
            }
        }
    }

    fn log_id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    fn normal(index: u64, cmd: Command) -> Entry {
        Entry {
            log_id: log_id(index),
            payload: EntryPayload::Normal(Request::new(cmd, "node:a")),
        }
    }

    fn membership_entry(index: u64) -> Entry {
        let voters: BTreeSet<RaftId> = [1, 2].into();
        let nodes: BTreeMap<RaftId, Member> =
            voters.iter().map(|id| (*id, Member::default())).collect();
        Entry {
            log_id: log_id(index),
            payload: EntryPayload::Membership(Membership::new(vec![voters], nodes)),
        }
    }

    #[tokio::test]
    async fn a_batch_is_applied_and_published_once() {
        let (_log, mut sm) = Store::open(None).unwrap();
        let published = sm.state();
        let mut version = sm.version_watch();
        let entries = vec![
            Entry {
                log_id: log_id(1),
                payload: EntryPayload::Blank,
            },
            membership_entry(2),
            normal(3, Command::NodeJoined(record("a"))),
            normal(4, set_route("resize", &["x"])),
            normal(5, set_route("resize", &["a"])),
        ];
        let results = sm.apply(entries).await.unwrap();
        let versions: Vec<u64> = results.iter().map(|r| r.version).collect();
        assert_eq!(versions, [0, 0, 1, 1, 2]);
        assert!(results[3].error.is_some());

        let (applied, membership) = sm.applied_state().await.unwrap();
        assert_eq!(applied, Some(log_id(5)));
        assert_eq!(membership.log_id(), &Some(log_id(2)));
        assert!(version.has_changed().unwrap());
        assert_eq!(*version.borrow_and_update(), 2);
        let state = published.load();
        assert_eq!(state.version, 2);
        assert_eq!(state.routes["resize"], route(Strategy::RoundRobin, &["a"]));

        let refused = sm
            .apply([normal(6, Command::NodeLeft { name: "x".into() })])
            .await
            .unwrap();
        assert!(refused[0].error.is_some());
        assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(6)));
        assert!(
            !version.has_changed().unwrap(),
            "a refused command publishes nothing"
        );
    }

    #[tokio::test]
    async fn a_snapshot_installed_on_a_fresh_store_gives_the_same_state() {
        let (_log, mut leader) = Store::open(None).unwrap();
        leader
            .apply([
                membership_entry(1),
                normal(2, Command::NodeJoined(record("a"))),
                normal(3, Command::NodeJoined(record("b"))),
                normal(4, set_route("resize", &["b", "a"])),
            ])
            .await
            .unwrap();
        let built = leader
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(built.meta.last_log_id, Some(log_id(4)));

        let (_log, mut follower) = Store::open(None).unwrap();
        let published = follower.state();
        let mut version = follower.version_watch();
        let mut receiving = follower.begin_receiving_snapshot().await.unwrap();
        *receiving = *built.snapshot;
        follower
            .install_snapshot(&built.meta, receiving)
            .await
            .unwrap();

        assert_eq!(**published.load(), **leader.state().load());
        assert_eq!(
            follower.applied_state().await.unwrap(),
            leader.applied_state().await.unwrap()
        );
        assert_eq!(*version.borrow_and_update(), 3);
        let current = follower.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, built.meta);
    }

    #[tokio::test]
    async fn an_older_snapshot_does_not_replace_a_newer_one() {
        let (_log, mut sm) = Store::open(None).unwrap();
        sm.apply([normal(1, Command::NodeJoined(record("a")))])
            .await
            .unwrap();
        let mut older = sm.get_snapshot_builder().await;
        sm.apply([normal(2, Command::NodeJoined(record("b")))])
            .await
            .unwrap();
        let newer = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        older.build_snapshot().await.unwrap();
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, newer.meta);
    }
}
