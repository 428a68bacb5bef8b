//! Membership decisions, as pure functions: who the leader marks down or up again, which
//! learners may vote, what the next voter set is, and how a node that asks to join is
//! (re)admitted.
//!
//! The leader's duties ([`crate::cluster`]) read what they need (the replicated registry,
//! the last `Pong` heard from each node, Raft's membership and replication metrics, the
//! clock), call these functions, and do the I/O the answer asks for (a Raft write, a
//! membership change). Nothing here reads a clock, a lock or the network, so the tests
//! below drive it with plain `Instant` arithmetic and property tests, the way
//! `opmesh_actors::routing::pick` and `Queues::dispatch` are tested.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use opmesh_actors::NodeId;

use crate::config::Voters;
use crate::types::{NodeRecord, NodeStatus, RaftId};

/// A change of a node's status that the leader should write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub node: NodeId,
    pub status: NodeStatus,
    /// How long the leader has not heard from the node (for the log).
    pub silent: Duration,
}

/// The failure detector: for every node of the registry but `me`, whether the leader
/// should mark it down (up, and silent for more than `down_after`) or up again (down,
/// and heard from within `down_after`, after this leadership began).
///
/// `last_heard` is the time of the last `Pong` from a node (`None` before the first).
/// Every node pings every other, so a new leader already knows when it last heard from
/// each: a node that died with the old leader is marked down `down_after` after its last
/// answer, not after the election. A node never heard from counts as heard at
/// `leading_since`, so it gets `down_after` from the start of this leadership. Nodes that
/// are leaving are left alone.
pub fn verdicts<'a>(
    me: &str,
    nodes: impl IntoIterator<Item = &'a NodeRecord>,
    last_heard: impl Fn(&NodeId) -> Option<Instant>,
    leading_since: Instant,
    now: Instant,
    down_after: Duration,
) -> Vec<Verdict> {
    nodes
        .into_iter()
        .filter(|n| n.name.as_ref() != me)
        .filter_map(|n| {
            let heard = last_heard(&n.name).unwrap_or(leading_since);
            let silent = now.saturating_duration_since(heard);
            let status = match n.status {
                NodeStatus::Up if silent > down_after => NodeStatus::Down,
                NodeStatus::Down if silent < down_after && heard > leading_since => NodeStatus::Up,
                _ => return None,
            };
            Some(Verdict {
                node: n.name.clone(),
                status,
                silent,
            })
        })
        .collect()
}

/// How far behind the leader's last log entry a learner may be and still count as caught
/// up (as far as the leader has replicated to it).
pub const CATCH_UP_SLACK: u64 = 16;

/// Whether a learner whose log matches the leader's up to `matched` has caught up with a
/// leader whose last entry is `last_log` (`None`: nothing, or nothing yet).
pub fn caught_up(matched: Option<u64>, last_log: Option<u64>) -> bool {
    matched >= last_log.map(|l| l.saturating_sub(CATCH_UP_SLACK))
}

/// The learners that may become voters, in the order given: up in the registry and
/// caught up with the log (`matched` is how far the leader has replicated to each).
pub fn ready_learners(
    learners: impl IntoIterator<Item = RaftId>,
    is_up: impl Fn(RaftId) -> bool,
    matched: impl Fn(RaftId) -> Option<u64>,
    last_log: Option<u64>,
) -> Vec<RaftId> {
    learners
        .into_iter()
        .filter(|l| is_up(*l) && caught_up(matched(*l), last_log))
        .collect()
}

/// How many voters to aim for: the configured count, no more than there are members,
/// at least one, and odd (an even count is rounded down).
pub fn voter_target(wanted: Voters, members: usize) -> usize {
    let target = wanted.get().min(members).max(1);
    if target % 2 == 0 {
        target - 1
    } else {
        target
    }
}

/// The voter set the leader should change to, or `None` to keep `current`.
///
/// - The first voter (by id) that is down or leaving is replaced by the first `ready`
///   learner (see [`ready_learners`]); one per change, so a change never takes away more
///   than one voter: the next voter down is replaced by the next change.
/// - While there are fewer voters than `target`, ready learners are promoted.
/// - A set of even size is never proposed: the change waits until it can be odd.
///
/// A voter with no record in the registry (`status` gives `None`) is left alone, and the
/// set never shrinks.
pub fn next_voters(
    current: &BTreeSet<RaftId>,
    status: impl Fn(RaftId) -> Option<NodeStatus>,
    ready: &[RaftId],
    target: usize,
) -> Option<BTreeSet<RaftId>> {
    let mut next = current.clone();
    let mut learners = ready.iter().copied();
    let mut take = |next: &BTreeSet<RaftId>| learners.find(|l| !next.contains(l));
    let gone = current.iter().copied().find(|v| {
        matches!(
            status(*v),
            Some(NodeStatus::Down) | Some(NodeStatus::Leaving)
        )
    });
    if let Some(v) = gone {
        if let Some(l) = take(&next) {
            next.remove(&v);
            next.insert(l);
        }
    }
    while next.len() < target {
        match take(&next) {
            Some(l) => {
                next.insert(l);
            }
            None => break,
        }
    }
    (next != *current && next.len() % 2 == 1).then_some(next)
}

/// The voters once `leaving` is removed: the others, with the first ready learner other
/// than `leaving` promoted in its place when there is one (so the count holds).
pub fn voters_without(
    current: &BTreeSet<RaftId>,
    leaving: RaftId,
    ready: &[RaftId],
) -> BTreeSet<RaftId> {
    let mut rest: BTreeSet<RaftId> = current.iter().copied().filter(|v| *v != leaving).collect();
    if let Some(l) = ready.iter().copied().find(|l| *l != leaving) {
        rest.insert(l);
    }
    rest
}

/// How the leader admits a node that asks to join ([`readmission`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readmission {
    /// The voters to change to first, without the node: a voter that comes back may have
    /// lost its log (restarted without its data dir), so until it has caught up it must
    /// not count towards a quorum, or an entry committed with its old acknowledgement
    /// could be lost. It rejoins as a learner; the voter upkeep promotes it again.
    pub demote_to: Option<BTreeSet<RaftId>>,
    pub step: Admission,
}

/// What Raft's membership needs for an admitted node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Unknown to Raft: added as a learner.
    AddLearner,
    /// Known, on other addresses (a restart elsewhere): its addresses updated.
    UpdateAddresses,
    /// Known as it is: nothing to change.
    Nothing,
}

/// How to admit node `id`, which asks to join on `asked` (its addresses), when Raft knows
/// it as `known` (or not at all) and the voters are `voters`. A sole voter is not demoted
/// (there would be no quorum left to do it).
pub fn readmission<M: PartialEq>(
    id: RaftId,
    known: Option<&M>,
    asked: &M,
    voters: &BTreeSet<RaftId>,
) -> Readmission {
    let demote_to = (known.is_some() && voters.contains(&id) && voters.len() > 1)
        .then(|| voters.iter().copied().filter(|v| *v != id).collect());
    let step = match known {
        None => Admission::AddLearner,
        Some(m) if m != asked => Admission::UpdateAddresses,
        Some(_) => Admission::Nothing,
    };
    Readmission { demote_to, step }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    const DOWN_AFTER: Duration = Duration::from_millis(1000);

    fn node(name: &str, status: NodeStatus) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            raft_id: crate::types::raft_id(name),
            cluster_addr: String::new(),
            http_addr: String::new(),
            serves: vec![],
            status,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The verdicts at `now` (ms after `t0`), leading since `since`, with `heard` giving
    /// each node's last answer in ms after `t0`.
    fn verdicts_at(
        nodes: &[NodeRecord],
        heard: &[(&str, u64)],
        since: u64,
        now: u64,
    ) -> Vec<(String, NodeStatus)> {
        let t0 = Instant::now();
        let heard: BTreeMap<NodeId, Instant> = heard
            .iter()
            .map(|(n, at)| (NodeId::from(*n), t0 + ms(*at)))
            .collect();
        verdicts(
            "me",
            nodes,
            |n| heard.get(n).copied(),
            t0 + ms(since),
            t0 + ms(now),
            DOWN_AFTER,
        )
        .into_iter()
        .map(|v| (v.node.to_string(), v.status))
        .collect()
    }

    #[test]
    fn a_silent_node_is_marked_down_after_down_after() {
        let nodes = [node("me", NodeStatus::Up), node("b", NodeStatus::Up)];
        // Heard at 0: still up at 1000 (not *over* down_after), down at 1001.
        assert!(verdicts_at(&nodes, &[("b", 0)], 0, 1000).is_empty());
        assert_eq!(
            verdicts_at(&nodes, &[("b", 0)], 0, 1001),
            [("b".to_string(), NodeStatus::Down)]
        );
        // Heard before this leadership: counted from then, not from the election.
        assert_eq!(
            verdicts_at(&nodes, &[("b", 0)], 900, 1001),
            [("b".to_string(), NodeStatus::Down)]
        );
    }

    #[test]
    fn a_node_never_heard_from_gets_down_after_from_the_start_of_the_leadership() {
        let nodes = [node("b", NodeStatus::Up)];
        assert!(verdicts_at(&nodes, &[], 500, 1500).is_empty());
        assert_eq!(
            verdicts_at(&nodes, &[], 500, 1501),
            [("b".to_string(), NodeStatus::Down)]
        );
    }

    #[test]
    fn a_down_node_comes_back_up_only_when_heard_during_this_leadership() {
        let nodes = [node("b", NodeStatus::Down)];
        assert_eq!(
            verdicts_at(&nodes, &[("b", 1200)], 1000, 1300),
            [("b".to_string(), NodeStatus::Up)]
        );
        // Heard before this leader took over: stays down.
        assert!(verdicts_at(&nodes, &[("b", 900)], 1000, 1300).is_empty());
        // Never heard: stays down.
        assert!(verdicts_at(&nodes, &[], 1000, 1300).is_empty());
        // Heard, but too long ago.
        assert!(verdicts_at(&nodes, &[("b", 1200)], 1000, 2200).is_empty());
    }

    #[test]
    fn leaving_nodes_and_this_node_are_left_alone() {
        let nodes = [node("me", NodeStatus::Down), node("c", NodeStatus::Leaving)];
        assert!(verdicts_at(&nodes, &[], 0, 10_000).is_empty());
    }

    #[test]
    fn a_learner_is_caught_up_within_the_slack() {
        assert!(caught_up(Some(84), Some(100)));
        assert!(!caught_up(Some(83), Some(100)));
        assert!(!caught_up(None, Some(100)));
        assert!(caught_up(None, None));
        let ready = ready_learners([1, 2, 3, 4], |l| l != 2, |l| Some(l * 40), Some(100));
        assert_eq!(ready, [3, 4]);
    }

    #[test]
    fn the_target_is_odd_and_no_more_than_the_members() {
        assert_eq!(voter_target(Voters::Three, 1), 1);
        assert_eq!(voter_target(Voters::Three, 2), 1);
        assert_eq!(voter_target(Voters::Three, 7), 3);
        assert_eq!(voter_target(Voters::Five, 4), 3);
        assert_eq!(voter_target(Voters::Five, 9), 5);
        assert_eq!(voter_target(Voters::One, 9), 1);
        assert_eq!(voter_target(Voters::One, 0), 1);
    }

    fn set(ids: &[RaftId]) -> BTreeSet<RaftId> {
        ids.iter().copied().collect()
    }

    fn statuses(down: &[RaftId], leaving: &[RaftId]) -> impl Fn(RaftId) -> Option<NodeStatus> {
        let (down, leaving) = (set(down), set(leaving));
        move |id| {
            Some(if down.contains(&id) {
                NodeStatus::Down
            } else if leaving.contains(&id) {
                NodeStatus::Leaving
            } else {
                NodeStatus::Up
            })
        }
    }

    #[test]
    fn learners_are_promoted_up_to_the_target_in_odd_steps() {
        // One voter, two ready learners, three wanted: both promoted at once.
        assert_eq!(
            next_voters(&set(&[1]), statuses(&[], &[]), &[2, 3], 3),
            Some(set(&[1, 2, 3]))
        );
        // One ready learner: two voters would be even, so wait for the second.
        assert_eq!(next_voters(&set(&[1]), statuses(&[], &[]), &[2], 3), None);
        // Already there.
        assert_eq!(
            next_voters(&set(&[1, 2, 3]), statuses(&[], &[]), &[4], 3),
            None
        );
    }

    #[test]
    fn a_down_or_leaving_voter_is_replaced_by_a_ready_learner() {
        assert_eq!(
            next_voters(&set(&[1, 2, 3]), statuses(&[2], &[]), &[4], 3),
            Some(set(&[1, 3, 4]))
        );
        assert_eq!(
            next_voters(&set(&[1, 2, 3]), statuses(&[], &[3]), &[4, 5], 3),
            Some(set(&[1, 2, 4]))
        );
        // No ready learner: the voter stays.
        assert_eq!(
            next_voters(&set(&[1, 2, 3]), statuses(&[2], &[]), &[], 3),
            None
        );
        // A voter the registry does not know is left alone.
        assert_eq!(
            next_voters(
                &set(&[1, 2, 3]),
                |id| (id != 2).then_some(NodeStatus::Up),
                &[4],
                3
            ),
            None
        );
    }

    #[test]
    fn two_voters_down_are_replaced_one_change_at_a_time() {
        let current = set(&[1, 2, 3, 4, 5]);
        let status = statuses(&[2, 4], &[]);
        let first = next_voters(&current, &status, &[6, 7], 5).unwrap();
        assert_eq!(first, set(&[1, 3, 4, 5, 6]));
        // Once the first change is made, 6 is a voter and no longer a learner.
        let second = next_voters(&first, &status, &[7], 5).unwrap();
        assert_eq!(second, set(&[1, 3, 5, 6, 7]));
        assert_eq!(next_voters(&second, &status, &[], 5), None);
    }

    #[test]
    fn a_removed_voter_is_replaced_when_a_learner_can_be() {
        assert_eq!(voters_without(&set(&[1, 2, 3]), 2, &[4]), set(&[1, 3, 4]));
        assert_eq!(
            voters_without(&set(&[1, 2, 3]), 2, &[2, 5]),
            set(&[1, 3, 5])
        );
        assert_eq!(voters_without(&set(&[1, 2, 3]), 2, &[]), set(&[1, 3]));
    }

    fn status_strategy() -> impl Strategy<Value = Option<NodeStatus>> {
        prop_oneof![
            4 => Just(Some(NodeStatus::Up)),
            2 => Just(Some(NodeStatus::Down)),
            1 => Just(Some(NodeStatus::Leaving)),
            1 => Just(None),
        ]
    }

    /// Voters, their statuses, the ready learners (never voters, in a random order) and
    /// the wanted count.
    fn voter_inputs() -> impl Strategy<
        Value = (
            BTreeSet<RaftId>,
            Vec<Option<NodeStatus>>,
            Vec<RaftId>,
            usize,
        ),
    > {
        (
            proptest::collection::btree_set(0u64..12, 1..=5),
            proptest::collection::vec(status_strategy(), 12),
            proptest::collection::vec(0u64..12, 0..6),
            prop_oneof![Just(Voters::One), Just(Voters::Three), Just(Voters::Five)],
            1usize..12,
        )
            .prop_map(|(voters, statuses, learners, wanted, members)| {
                let mut seen = BTreeSet::new();
                let ready: Vec<RaftId> = learners
                    .into_iter()
                    .filter(|l| !voters.contains(l) && seen.insert(*l))
                    .collect();
                let members = members.max(voters.len() + ready.len());
                (voters, statuses, ready, voter_target(wanted, members))
            })
    }

    proptest! {
        #[test]
        fn voter_changes_are_safe_and_deterministic(
            (current, statuses, ready, target) in voter_inputs()
        ) {
            let status = |id: RaftId| statuses[id as usize];
            let next = next_voters(&current, status, &ready, target);
            prop_assert_eq!(&next, &next_voters(&current, status, &ready, target));
            let Some(next) = next else { return Ok(()) };
            prop_assert_ne!(&next, &current);
            prop_assert!(next.len() % 2 == 1, "an odd set: {:?}", next);
            let removed: Vec<RaftId> = current.difference(&next).copied().collect();
            prop_assert!(removed.len() <= 1, "never two voters removed at once: {:?}", removed);
            prop_assert!(
                next.len() > current.len() / 2,
                "never below a majority of the current set: {:?} -> {:?}", current, next
            );
            prop_assert!(next.len() >= current.len(), "never shrinks");
            for added in next.difference(&current) {
                prop_assert!(ready.contains(added), "only ready learners join: {}", added);
            }
            for v in &removed {
                prop_assert!(
                    matches!(status(*v), Some(NodeStatus::Down) | Some(NodeStatus::Leaving)),
                    "only a down or leaving voter is replaced"
                );
            }
        }

        #[test]
        fn verdicts_are_deterministic_and_never_mark_a_recent_node_down(
            heard in proptest::collection::vec(proptest::option::of(0u64..5_000), 4),
            statuses in proptest::collection::vec(
                prop_oneof![Just(NodeStatus::Up), Just(NodeStatus::Down), Just(NodeStatus::Leaving)], 4),
            since in 0u64..5_000,
            now in 0u64..10_000,
        ) {
            let names = ["me", "b", "c", "d"];
            let nodes: Vec<NodeRecord> =
                names.iter().zip(&statuses).map(|(n, s)| node(n, *s)).collect();
            let t0 = Instant::now();
            let last = |n: &NodeId| {
                let i = names.iter().position(|x| *x == n.as_ref()).unwrap();
                heard[i].map(|at| t0 + ms(at))
            };
            let run = || verdicts("me", &nodes, last, t0 + ms(since), t0 + ms(now), DOWN_AFTER);
            let got = run();
            prop_assert_eq!(&got, &run());
            for v in &got {
                prop_assert!(v.node.as_ref() != "me");
                let rec = nodes.iter().find(|n| n.name == v.node).unwrap();
                let heard_at = last(&v.node).unwrap_or(t0 + ms(since));
                match v.status {
                    NodeStatus::Down => {
                        prop_assert_eq!(rec.status, NodeStatus::Up);
                        prop_assert!((t0 + ms(now)).saturating_duration_since(heard_at) > DOWN_AFTER);
                    }
                    NodeStatus::Up => {
                        prop_assert_eq!(rec.status, NodeStatus::Down);
                        prop_assert!(heard_at > t0 + ms(since));
                    }
                    NodeStatus::Leaving => prop_assert!(false, "never proposes leaving"),
                }
            }
        }
    }

    #[test]
    fn a_node_that_asks_to_join_is_added_demoted_or_updated() {
        let voters: BTreeSet<RaftId> = [1, 2, 3].into();
        // A fresh node: a learner, nobody demoted.
        assert_eq!(
            readmission(9, None, &"a:1", &voters),
            Readmission {
                demote_to: None,
                step: Admission::AddLearner
            }
        );
        // A voter of three comes back (maybe without its log): demoted first.
        assert_eq!(
            readmission(2, Some(&"b:1"), &"b:1", &voters),
            Readmission {
                demote_to: Some([1, 3].into()),
                step: Admission::Nothing
            }
        );
        // The same on new addresses: demoted, and its addresses updated.
        assert_eq!(
            readmission(2, Some(&"b:1"), &"b:2", &voters).step,
            Admission::UpdateAddresses
        );
        // A sole voter is not demoted (no quorum would be left to do it).
        assert_eq!(
            readmission(1, Some(&"a:1"), &"a:1", &[1].into()).demote_to,
            None
        );
        // A learner that comes back stays a learner.
        assert_eq!(
            readmission(4, Some(&"d:1"), &"d:1", &voters),
            Readmission {
                demote_to: None,
                step: Admission::Nothing
            }
        );
    }
}
