//! How a node with no state decides between joining a cluster and bootstrapping one, as
//! a pure function: [`decide`].
//!
//! A node started with seeds and no state normally only joins, retrying until a seed
//! admits it. A node allowed to bootstrap when no seed has a cluster
//! ([`SeedBootstrap::WhenNoSeedHasACluster`], the first pod of a StatefulSet) first asks
//! every seed whether it belongs to one (`Rpc::Probe`), again and again, and acts on the
//! answers: one seed in a cluster is enough to join it, which is how such a node restarted
//! with an empty volume finds the others instead of starting a second cluster; it
//! bootstraps only when every seed said it has none (a cold start: every pod is up and
//! empty), or, once the wait is over, when none said it has one and enough said they have
//! none that, with this node, they are a majority of the seed set (some pods cannot be
//! reached: not scheduled yet, or their names do not resolve yet). Without that majority
//! it never bootstraps: a node cut off from the others (a partition), or restarted empty
//! while they run but cannot answer, keeps asking instead of starting a second cluster.
//!
//! The duty that runs this ([`crate::cluster`]) does the asking and the waiting; nothing
//! here reads a clock or the network.

use std::time::Duration;

/// What a node with no state and a list of seeds may do besides joining.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeedBootstrap {
    /// Only join: retry the seeds until one admits this node (`--join`).
    #[default]
    Never,
    /// Ask the seeds first, and bootstrap a new cluster when none of them belongs to one:
    /// each answered that it has none, or, after `wait`, none answered that it has one
    /// and a majority (this node included) answered that they have none.
    WhenNoSeedHasACluster { wait: Duration },
}

/// One seed's answer to "do you belong to a cluster?".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeedAnswer {
    /// Its Raft group is initialized: a member (or a node that holds a cluster's state).
    InCluster,
    /// It answered, and it belongs to no cluster yet.
    NoCluster,
    /// It could not be asked: its name does not resolve, nothing listens, no answer.
    Unreachable,
}

/// What the node does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Formation {
    /// A cluster exists: join it through the seeds (and never bootstrap afterwards).
    Join,
    /// No seed belongs to a cluster: start one.
    Bootstrap,
    /// Not known yet: ask the seeds again after a backoff.
    AskAgain,
}

/// The decision after the latest round of answers (one per seed), `asked_for` after the
/// first round was sent, for a node that may bootstrap after `wait`.
pub fn decide(answers: &[SeedAnswer], asked_for: Duration, wait: Duration) -> Formation {
    let empty = answers
        .iter()
        .filter(|a| **a == SeedAnswer::NoCluster)
        .count();
    // This node and the seeds that answered "no cluster", out of itself and every seed.
    let majority = 2 * (empty + 1) > answers.len() + 1;
    if answers.contains(&SeedAnswer::InCluster) {
        Formation::Join
    } else if empty == answers.len() || (asked_for >= wait && majority) {
        Formation::Bootstrap
    } else {
        Formation::AskAgain
    }
}

#[cfg(test)]
mod tests {
    use super::SeedAnswer::{InCluster, NoCluster, Unreachable};
    use super::*;

    const WAIT: Duration = Duration::from_secs(30);
    const SOON: Duration = Duration::from_millis(100);

    #[test]
    fn one_seed_in_a_cluster_means_join_whatever_the_others_say_or_the_time() {
        for answers in [
            vec![InCluster],
            vec![NoCluster, InCluster],
            vec![Unreachable, Unreachable, InCluster],
        ] {
            for asked_for in [Duration::ZERO, WAIT, WAIT * 10] {
                assert_eq!(decide(&answers, asked_for, WAIT), Formation::Join);
            }
        }
    }

    #[test]
    fn every_seed_up_and_empty_means_bootstrap_at_once() {
        assert_eq!(
            decide(&[NoCluster, NoCluster], Duration::ZERO, WAIT),
            Formation::Bootstrap
        );
        // No seed at all (a set of one): nobody to wait for.
        assert_eq!(decide(&[], Duration::ZERO, WAIT), Formation::Bootstrap);
    }

    #[test]
    fn an_unreachable_seed_is_waited_for_until_the_wait_is_over() {
        // Two of three (this node and one empty seed), three of five: a majority.
        for answers in [
            vec![NoCluster, Unreachable],
            vec![NoCluster, NoCluster, Unreachable, Unreachable],
        ] {
            assert_eq!(decide(&answers, SOON, WAIT), Formation::AskAgain);
            assert_eq!(
                decide(&answers, WAIT - SOON, WAIT),
                Formation::AskAgain,
                "{answers:?}"
            );
            assert_eq!(decide(&answers, WAIT, WAIT), Formation::Bootstrap);
        }
    }

    #[test]
    fn without_a_majority_that_answered_it_never_bootstraps() {
        // Cut off from every seed (a partition, or restarted empty while the others
        // cannot answer), or hearing from too few: ask again, however long it takes.
        for answers in [
            vec![Unreachable],
            vec![Unreachable, Unreachable],
            vec![NoCluster, Unreachable, Unreachable, Unreachable],
        ] {
            for asked_for in [WAIT, WAIT * 100] {
                assert_eq!(
                    decide(&answers, asked_for, WAIT),
                    Formation::AskAgain,
                    "{answers:?}"
                );
            }
        }
    }
}
