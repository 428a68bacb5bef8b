//! The background duties of a node in a cluster, each a loop run under a supervisor.
//!
//! - [`Duty::Heartbeats`]: every heartbeat, ping every other node (the `Ping` carries
//!   this node's load).
//! - [`Duty::LeaderDuties`]: while this node leads, register it, mark nodes down or up
//!   again ([`membership::verdicts`]) and keep the wanted number of voters
//!   ([`membership::next_voters`]), so every node agrees who is healthy.
//! - [`Duty::WatchState`]: on every applied change (and every heartbeat, for fresh
//!   loads), swap the routing table in, keep links to every registered node, route again
//!   what waits on a node no longer up, and expire what waited too long.
//! - [`Duty::BootstrapOrJoin`]: once, at start: bootstrap a cluster of one or join the
//!   seeds (retrying until it has); a node that may bootstrap when no seed has a cluster
//!   asks them first ([`formation::decide`]).
//! - counting leader changes, for [`Cluster::leader_changes`](super::Cluster).
//!
//! [`supervise`] runs each: a duty that panics, or that returns while the cluster is not
//! stopping, is logged with its cause, counted (`Cluster::duty_restarts`) and started
//! again after a short backoff; once the cluster stops, nothing restarts. The decisions
//! live in [`crate::membership`]; these loops read the clock, the state and Raft's
//! metrics, call it, and write what it decided.

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;
use opmesh_actors::handler::HandlerKind;
use opmesh_actors::{Backoff, Jitter, NodeId, OpType};
use tokio_util::sync::CancellationToken;

use super::Inner;
use crate::codec::{Message, OpenBreaker};
use crate::flow::{breakers_to_wire, same_breakers, Flow};
use crate::formation::{self, Formation, SeedBootstrap};
use crate::membership;
use crate::store::routing_table;
use crate::types::{ClusterState, Command, Member, NodeStatus, RaftId};

/// The first wait before a duty is restarted; it doubles with each restart in a row.
const RESTART_MIN: Duration = Duration::from_millis(100);
/// The longest wait before a duty is restarted.
const RESTART_MAX: Duration = Duration::from_secs(5);
/// A node joining through its seeds retries from this wait, doubling, up to the next.
const JOIN_RETRY_MIN: Duration = Duration::from_millis(100);
const JOIN_RETRY_MAX: Duration = Duration::from_secs(2);
/// A duty that ran this long before it failed starts again after [`RESTART_MIN`].
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// The supervised loops of a cluster node (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Duty {
    WatchState,
    Heartbeats,
    LeaderDuties,
    BootstrapOrJoin,
}

impl Duty {
    fn name(self) -> &'static str {
        match self {
            Duty::WatchState => "watch_state",
            Duty::Heartbeats => "heartbeats",
            Duty::LeaderDuties => "leader_duties",
            Duty::BootstrapOrJoin => "bootstrap_or_join",
        }
    }

    /// Whether the duty is done once it returns (only a panic restarts it), rather than
    /// a loop that runs until the cluster stops.
    fn ends(self) -> Ends {
        match self {
            Duty::BootstrapOrJoin => Ends::WhenDone,
            _ => Ends::AtStop,
        }
    }
}

/// When a supervised duty's end is expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ends {
    /// Only when the cluster stops: returning before is a failure.
    AtStop,
    /// Whenever it returns: only a panic is a failure.
    WhenDone,
}

/// Starts `duty` of `inner` under a supervisor.
pub(super) fn start(inner: &Arc<Inner>, duty: Duty) {
    let stop = inner.stop.clone();
    let restarts = inner.duty_restarts.clone();
    let inner = inner.clone();
    tokio::spawn(supervise(
        duty.name(),
        duty.ends(),
        stop,
        restarts,
        move || {
            let inner = inner.clone();
            async move {
                match duty {
                    Duty::WatchState => inner.watch_state().await,
                    Duty::Heartbeats => inner.heartbeats().await,
                    Duty::LeaderDuties => inner.leader_duties().await,
                    Duty::BootstrapOrJoin => inner.bootstrap_or_join().await,
                }
            }
        },
    ));
}

/// Starts counting the leader changes named in `inner`'s Raft metrics, under a
/// supervisor. The duty holds only what it reads and writes, so it keeps nothing else of
/// the cluster alive.
pub(super) fn count_leader_changes(inner: &Arc<Inner>) {
    let metrics = inner.raft().metrics();
    let changes = inner.leader_changes.clone();
    let stop = inner.stop.clone();
    let run = {
        let stop = stop.clone();
        move || count_changes(metrics.clone(), changes.clone(), stop.clone())
    };
    tokio::spawn(supervise(
        "leader_changes",
        Ends::AtStop,
        stop,
        inner.duty_restarts.clone(),
        run,
    ));
}

/// Runs the duty `run` makes, again after a backoff each time it fails, until the
/// cluster stops (`stop`) or, for [`Ends::WhenDone`], until it returns. A failure (a
/// panic, or a return before `stop` for [`Ends::AtStop`]) is logged with its cause and
/// counted in `restarts`.
pub(super) async fn supervise<F, Fut>(
    name: &'static str,
    ends: Ends,
    stop: CancellationToken,
    restarts: Arc<AtomicU64>,
    mut run: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = Backoff::doubling(RESTART_MIN, RESTART_MAX, Jitter::Down(0.0)).series();
    loop {
        let started = tokio::time::Instant::now();
        let cause = match tokio::spawn(run()).await {
            Ok(()) if stop.is_cancelled() || ends == Ends::WhenDone => return,
            Ok(()) => "it returned while the cluster runs".to_string(),
            Err(e) if e.is_panic() => format!("it panicked: {}", panic_message(&*e.into_panic())),
            // Cancelled: the runtime is shutting down.
            Err(_) => return,
        };
        if stop.is_cancelled() {
            return;
        }
        if started.elapsed() >= HEALTHY_RUN {
            backoff.reset();
        }
        let wait = backoff.next_wait(0.0);
        restarts.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            duty = name,
            cause = %cause,
            restart_in_ms = wait.as_millis() as u64,
            "a cluster duty failed: restarting it"
        );
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The message a panic carried, when it is text.
fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&'static str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Counts changes of the leader named in a node's Raft metrics into `changes`, until the
/// cluster stops. Once Raft has stopped there is nothing to count: it waits for the stop.
async fn count_changes(
    mut metrics: tokio::sync::watch::Receiver<openraft::RaftMetrics<RaftId, Member>>,
    changes: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let mut last: Option<RaftId> = None;
    loop {
        let leader = metrics.borrow_and_update().current_leader;
        if leader.is_some() && leader != last {
            last = leader;
            changes.fetch_add(1, Ordering::Relaxed);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            r = metrics.changed() => if r.is_err() {
                stop.cancelled().await;
                return;
            },
        }
    }
}

impl Inner {
    async fn bootstrap_or_join(self: Arc<Self>) {
        let initialized = self.raft().is_initialized().await.unwrap_or(false);
        if !initialized && self.cfg.join.is_empty() {
            self.bootstrap().await;
            return;
        }
        if self.cfg.join.is_empty() {
            tracing::info!(node = %self.me.name, "rejoining with the state in the data dir");
            return;
        }
        if let (false, SeedBootstrap::WhenNoSeedHasACluster { wait }) =
            (initialized, self.cfg.bootstrap)
        {
            match self.ask_seeds(wait).await {
                Some(Formation::Join) => {}
                Some(Formation::Bootstrap) => {
                    self.bootstrap().await;
                    return;
                }
                // Stopped while asking.
                _ => return,
            }
        }
        let mut backoff =
            Backoff::doubling(JOIN_RETRY_MIN, JOIN_RETRY_MAX, Jitter::Down(0.0)).series();
        loop {
            for seed in &self.cfg.join {
                match self.join_via(seed, &self.by_me()).await {
                    Ok(()) => {
                        tracing::info!(node = %self.me.name, %seed, "joined the cluster");
                        return;
                    }
                    Err(e) => tracing::warn!(%seed, "join failed, will retry: {e}"),
                }
                if self.stop.is_cancelled() {
                    return;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_wait(0.0)) => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    /// Starts a cluster of this node alone; the leader duties register it once it leads.
    async fn bootstrap(&self) {
        let mut members = BTreeMap::new();
        members.insert(self.me.raft_id, Self::member(&self.me));
        match self.raft().initialize(members).await {
            Ok(()) => tracing::info!(node = %self.me.name, "bootstrapped a new cluster"),
            Err(e) => tracing::warn!("bootstrap refused: {e}"),
        }
    }

    /// Asks every seed, round after round with a backoff, whether it belongs to a
    /// cluster, until [`formation::decide`] says to join or to bootstrap; `None` when the
    /// cluster stops first.
    async fn ask_seeds(&self, wait: Duration) -> Option<Formation> {
        let started = Instant::now();
        let mut backoff =
            Backoff::doubling(JOIN_RETRY_MIN, JOIN_RETRY_MAX, Jitter::Down(0.0)).series();
        loop {
            let answers =
                futures::future::join_all(self.cfg.join.iter().map(|s| self.probe(s))).await;
            let decision = formation::decide(&answers, started.elapsed(), wait);
            match decision {
                Formation::Join => {
                    tracing::info!(node = %self.me.name, "a seed belongs to a cluster: joining it");
                    return Some(decision);
                }
                Formation::Bootstrap => {
                    tracing::info!(node = %self.me.name, ?answers, "no seed belongs to a cluster: bootstrapping one");
                    return Some(decision);
                }
                Formation::AskAgain => {
                    tracing::info!(node = %self.me.name, ?answers, "asking the seeds again before bootstrapping")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_wait(0.0)) => {}
                _ = self.stop.cancelled() => return None,
            }
        }
    }

    /// The learners that may become voters: up in the registry and caught up with the
    /// log, as far as this node (the leader) has replicated to them; none when this node
    /// does not lead.
    pub(super) fn up_learners(&self) -> Vec<RaftId> {
        let state = self.state.load();
        let m = self.raft().metrics();
        let m = m.borrow();
        let Some(replication) = m.replication.as_ref() else {
            return Vec::new();
        };
        let up: BTreeSet<RaftId> = state
            .nodes
            .values()
            .filter(|n| n.status == NodeStatus::Up)
            .map(|n| n.raft_id)
            .collect();
        membership::ready_learners(
            m.membership_config.membership().learner_ids(),
            |l| up.contains(&l),
            |l| replication.get(&l).copied().flatten().map(|l| l.index),
            m.last_log_index,
        )
    }

    /// On the leader: promotes up, caught-up learners while there are fewer voters than
    /// wanted, and replaces a voter that is down or leaving by such a learner (one per
    /// change; see [`membership::next_voters`]).
    pub(super) async fn balance_voters(&self) {
        let state = self.state.load_full();
        let (voters, members) = {
            let m = self.raft().metrics();
            let m = m.borrow();
            let mem = m.membership_config.membership();
            let voters: BTreeSet<RaftId> = mem.voter_ids().collect();
            (voters, mem.nodes().count())
        };
        let target = membership::voter_target(self.cfg.voters, members);
        let status = |id: RaftId| {
            state
                .nodes
                .values()
                .find(|n| n.raft_id == id)
                .map(|n| n.status)
        };
        let ready = self.up_learners();
        if let Some(next) = membership::next_voters(&voters, status, &ready, target) {
            tracing::info!(?voters, ?next, "changing the voters");
            if let Err(e) = self.raft().change_membership(next, true).await {
                tracing::warn!("voter change failed: {e}");
            }
        }
    }

    /// Rebuilds the routing table on every applied change (and with fresh loads every
    /// heartbeat), keeps links to every registered node, and routes again what waits on
    /// a node that is no longer up.
    async fn watch_state(self: Arc<Self>) {
        let mut versions = self.versions.clone();
        let mut tick = tokio::time::interval(self.cfg.heartbeat);
        let mut seen_version = u64::MAX;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                // Raft has stopped: nothing will change any more.
                r = versions.changed() => if r.is_err() {
                    self.stop.cancelled().await;
                    return;
                },
                _ = tick.tick() => {}
            }
            let state = self.state.load_full();
            self.publish(&state);
            if state.version != seen_version {
                seen_version = state.version;
                let t = self.transport();
                for n in state.nodes.values() {
                    if n.name != self.me.name {
                        t.add_peer(&n.name, &n.cluster_addr);
                    }
                }
            }
            for peer in self.outbox.peers() {
                let up = state
                    .nodes
                    .get(&peer)
                    .is_some_and(|n| n.status == NodeStatus::Up);
                if !up {
                    let jobs = self.outbox.take(&peer);
                    if !jobs.is_empty() {
                        tracing::warn!(node = %peer, count = jobs.len(), "node is not up: routing its operations again");
                        if let Some(node) = self.node.get() {
                            node.reroute(jobs);
                        }
                    }
                }
            }
            self.outbox.expire(Instant::now());
            self.resend_unacknowledged(&state);
        }
    }

    /// Sends again the reply batches a node has not acknowledged for a while (the batch
    /// or its acknowledgement was lost with a link), and forgets the ledger of a node
    /// that is no longer a member once it runs nothing there and no batch to it was sent
    /// for a minute.
    fn resend_unacknowledged(&self, state: &ClusterState) {
        let now = Instant::now();
        self.ledgers.retain(|peer, ledger| {
            state.nodes.contains_key(peer)
                || !ledger.get_mut().is_stale(now, Duration::from_secs(60))
        });
        let after = (self.cfg.heartbeat * 4).max(Duration::from_secs(1));
        let peers: Vec<NodeId> = self.ledgers.iter().map(|e| e.key().clone()).collect();
        for peer in peers {
            self.send_again(&peer, after);
        }
    }

    /// The types this node is overloaded with now (its queues against the watermarks),
    /// kept for the `Pong`s and the routing table until the next heartbeat.
    fn update_flow(&self) -> Vec<String> {
        let Some(node) = self.node.get() else {
            return Vec::new();
        };
        let entries = node.type_entries();
        let levels = entries
            .iter()
            .filter(|e| !matches!(e.handler, HandlerKind::Remote))
            .map(|e| (&*e.name, e.queued(), e.queue_capacity()));
        let now = self.flow.lock().update(levels);
        if **self.overloaded.load() != now {
            self.overloaded.store(Arc::new(now.clone()));
            self.publish(&self.state.load_full());
        }
        now
    }

    /// The peers whose link is congested now (its outbox against the watermarks), kept
    /// for the routing table until the next heartbeat.
    fn update_links(&self) {
        let capacity = self.cfg.link_buffer_bytes;
        let links = self.transport().links();
        let levels = links
            .iter()
            .map(|l| (&*l.peer, l.queued_bytes as usize, capacity));
        let mut flow = self.link_flow.lock();
        let now = flow.update(levels);
        self.set_congested(now, flow);
    }

    /// Keeps `now` as the congested peers (under the lock of the flow that found them,
    /// so an older list never replaces a newer one) and publishes a change.
    fn set_congested(&self, now: Vec<String>, flow: parking_lot::MutexGuard<'_, Flow>) {
        if **self.congested.load() == now {
            return;
        }
        self.congested.store(Arc::new(now));
        drop(flow);
        self.publish(&self.state.load_full());
    }

    /// The link to `peer` refused operations (full): it is congested from now until an
    /// update finds it under the low watermark.
    pub(super) fn link_full(&self, peer: &NodeId) {
        let mut flow = self.link_flow.lock();
        let now = flow.mark(peer);
        self.set_congested(now, flow);
    }

    /// This node's open circuit breakers now, kept for the `Pong`s and the routing table
    /// until the next heartbeat; their wire form.
    fn update_breakers(&self, now: Instant) -> Vec<OpenBreaker> {
        let Some(node) = self.node.get() else {
            return Vec::new();
        };
        let mut open: Vec<(OpType, Instant)> = node
            .breakers()
            .iter()
            .filter_map(|b| Some((b, b.open_until(now)?)))
            .flat_map(|(b, until)| b.types.iter().map(move |t| (t.clone(), until)))
            .collect();
        open.sort();
        let wire = breakers_to_wire(&open, now);
        let changed = {
            let mut mine = self.open_breakers.lock();
            let changed = !same_breakers(&mine, &open, Duration::ZERO);
            *mine = open;
            changed
        };
        if changed {
            self.publish(&self.state.load_full());
        }
        wire
    }

    /// Swaps in the routing table for `state`.
    pub(super) fn publish(&self, state: &ClusterState) {
        let mut table = routing_table(state);
        for n in &mut table.nodes {
            if n.id == self.me.name {
                n.load = self.in_flight();
                n.overloaded = self
                    .overloaded
                    .load()
                    .iter()
                    .map(|t| t.as_str().into())
                    .collect();
                n.open_breakers = self.open_breakers.lock().clone();
            } else if let Some(h) = self.heard.get(&n.id) {
                n.load = h.load;
                n.overloaded = h.overloaded.clone();
                n.open_breakers = h.open_breakers.clone();
            }
            n.congested = self.congested.load().iter().any(|p| **p == *n.id);
        }
        self.table.store(Arc::new(table));
    }

    async fn heartbeats(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.cfg.heartbeat);
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            seq += 1;
            let load = self.in_flight();
            let overloaded = self.update_flow();
            let open_breakers = self.update_breakers(Instant::now());
            self.update_links();
            let state = self.state.load();
            for n in state.nodes.keys() {
                if *n != self.me.name {
                    let _ = self.transport().send(
                        n,
                        Message::Ping {
                            seq,
                            load,
                            overloaded: overloaded.clone(),
                            open_breakers: open_breakers.clone(),
                        },
                    );
                }
            }
        }
    }

    /// The leader's failure detector, registration of itself and voter upkeep.
    async fn leader_duties(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.cfg.heartbeat);
        let mut leading_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let leads = {
                let m = self.raft().metrics();
                let m = m.borrow();
                m.state == ServerState::Leader && m.current_leader == Some(self.me.raft_id)
            };
            if !leads {
                leading_since = None;
                continue;
            }
            let since = *leading_since.get_or_insert_with(Instant::now);
            let state = self.state.load_full();
            let now = Instant::now();
            match state.nodes.get(self.me.name.as_ref()) {
                None if !self.leaving.load(Ordering::Acquire) => {
                    if let Err(e) = self.write(Command::NodeJoined(self.me.clone())).await {
                        tracing::warn!("cannot register this node: {}", e.message);
                    }
                }
                Some(r) if r.status == NodeStatus::Down => {
                    let _ = self
                        .write(Command::SetStatus {
                            name: self.me.name.clone(),
                            status: NodeStatus::Up,
                        })
                        .await;
                }
                _ => {}
            }
            let verdicts = membership::verdicts(
                self.me.name.as_ref(),
                state.nodes.values(),
                |name| self.heard.get(name).and_then(|h| h.at),
                since,
                now,
                self.cfg.down_after,
            );
            for v in verdicts {
                tracing::warn!(node = %v.node, status = v.status.as_str(), silent_ms = v.silent.as_millis() as u64, "marking node");
                if let Err(e) = self
                    .write(Command::SetStatus {
                        name: v.node.clone(),
                        status: v.status,
                    })
                    .await
                {
                    tracing::warn!("cannot mark node `{}`: {}", v.node, e.message);
                }
            }
            self.balance_voters().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs of a duty, and a way to end the test's supervisor.
    struct Probe {
        stop: CancellationToken,
        restarts: Arc<AtomicU64>,
        runs: Arc<AtomicU64>,
    }

    impl Probe {
        fn new() -> Probe {
            Probe {
                stop: CancellationToken::new(),
                restarts: Arc::default(),
                runs: Arc::default(),
            }
        }

        /// Supervises a duty that does `first` on its first run and then waits for the
        /// stop.
        fn supervise(&self, ends: Ends, first: fn()) -> tokio::task::JoinHandle<()> {
            let (runs, stop) = (self.runs.clone(), self.stop.clone());
            tokio::spawn(supervise(
                "test",
                ends,
                self.stop.clone(),
                self.restarts.clone(),
                move || {
                    let n = runs.fetch_add(1, Ordering::SeqCst);
                    let stop = stop.clone();
                    async move {
                        if n == 0 {
                            first();
                            return;
                        }
                        stop.cancelled().await;
                    }
                },
            ))
        }

        /// Waits (in paused time, so at once) until the duty has run `n` times.
        async fn runs(&self, n: u64) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while self.runs.load(Ordering::SeqCst) < n {
                assert!(tokio::time::Instant::now() < deadline, "{n} runs");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }

        fn restarts(&self) -> u64 {
            self.restarts.load(Ordering::SeqCst)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_duty_is_counted_and_restarted_after_a_backoff() {
        let p = Probe::new();
        let t0 = tokio::time::Instant::now();
        let sup = p.supervise(Ends::AtStop, || panic!("the duty broke"));
        p.runs(2).await;
        assert_eq!(p.restarts(), 1);
        assert!(t0.elapsed() >= RESTART_MIN, "{:?}", t0.elapsed());
        // Running again and healthy: nothing more is counted, and the stop ends it.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(p.runs.load(Ordering::SeqCst), 2);
        p.stop.cancel();
        tokio::time::timeout(Duration::from_secs(1), sup)
            .await
            .expect("the supervisor ends at the stop")
            .unwrap();
        assert_eq!(p.restarts(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_that_returns_while_the_cluster_runs_is_restarted() {
        let p = Probe::new();
        let sup = p.supervise(Ends::AtStop, || {});
        p.runs(2).await;
        assert_eq!(p.restarts(), 1);
        p.stop.cancel();
        sup.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_duty_that_is_done_is_not_restarted_unless_it_panicked() {
        let p = Probe::new();
        p.supervise(Ends::WhenDone, || {}).await.unwrap();
        assert_eq!((p.runs.load(Ordering::SeqCst), p.restarts()), (1, 0));

        let p = Probe::new();
        let sup = p.supervise(Ends::WhenDone, || panic!("half way"));
        p.runs(2).await;
        assert_eq!(p.restarts(), 1);
        p.stop.cancel();
        sup.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_restarts_once_the_cluster_stops() {
        let p = Probe::new();
        p.stop.cancel();
        p.supervise(Ends::AtStop, || panic!("while stopping"))
            .await
            .unwrap();
        assert_eq!((p.runs.load(Ordering::SeqCst), p.restarts()), (1, 0));
    }

    #[test]
    fn a_panic_message_is_read_from_str_or_string() {
        let s: Box<dyn Any + Send> = Box::new("static");
        assert_eq!(panic_message(&*s), "static");
        let s: Box<dyn Any + Send> = Box::new(String::from("owned"));
        assert_eq!(panic_message(&*s), "owned");
        let s: Box<dyn Any + Send> = Box::new(7);
        assert_eq!(panic_message(&*s), "(no message)");
    }
}
