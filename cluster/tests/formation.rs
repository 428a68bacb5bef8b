//! A node with no state that may bootstrap when no seed has a cluster (a StatefulSet's
//! ordinal 0): it joins the cluster a seed belongs to, bootstraps when every seed is up
//! and empty or, after its wait, when a majority is (one seed cannot be reached), and
//! never when no seed answers. Nodes are tasks of one process on loopback.

use std::time::{Duration, Instant};

use opmesh_actors::{Node, Operation};
use opmesh_cluster::{Cluster, ClusterConfig, SeedBootstrap};

const SECRET: &[u8] = b"formation-test-secret";

fn config(name: &str, port: u16, join: Vec<String>, bootstrap: SeedBootstrap) -> ClusterConfig {
    let mut cfg = ClusterConfig::new(name, SECRET);
    cfg.listen = ([127, 0, 0, 1], port).into();
    cfg.join = join;
    cfg.bootstrap = bootstrap;
    cfg.heartbeat = Duration::from_millis(50);
    cfg.down_after = Duration::from_millis(400);
    cfg.election_timeout = Duration::from_millis(150);
    cfg.serves = vec!["echo".into()];
    cfg
}

async fn start(cfg: ClusterConfig) -> (Cluster, Node) {
    let name = cfg.node.clone();
    let cluster = Cluster::start(cfg).await.expect("cluster starts");
    let builder = Node::builder()
        .node_id(name.as_str())
        .handler("echo", |op: Operation| async move { Ok(op.payload) });
    let node = cluster.start_node(builder).await.expect("node starts");
    (cluster, node)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until every one of `members` sees exactly `n` nodes up and the same leader.
async fn one_cluster(members: &[&Cluster], n: usize) {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let views: Vec<_> = members.iter().map(|c| c.status()).collect();
        let agreed = views.iter().all(|s| {
            s.nodes.iter().filter(|n| n.status == "up").count() == n
                && s.leader.is_some()
                && s.leader == views[0].leader
        });
        if agreed {
            return;
        }
        assert!(
            Instant::now() < until,
            "no single cluster of {n}: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const WAIT_LONG: SeedBootstrap = SeedBootstrap::WhenNoSeedHasACluster {
    wait: Duration::from_secs(600),
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_may_bootstrap_joins_the_cluster_its_seed_belongs_to() {
    let (a, _an) = start(config("a", 0, vec![], SeedBootstrap::Never)).await;
    one_cluster(&[&a], 1).await;
    let seed = a.cluster_addr().to_owned();
    // It would wait ten minutes for an unreachable seed: joining is what ends its wait.
    let (z, _zn) = start(config("z", 0, vec![seed], WAIT_LONG)).await;
    one_cluster(&[&a, &z], 2).await;
    for c in [a, z] {
        c.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_seed_up_and_empty_means_the_first_bootstraps_and_the_others_join() {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let mut members = Vec::new();
    for (i, name) in ["n0", "n1", "n2"].into_iter().enumerate() {
        let seeds = (0..3).filter(|j| *j != i).map(addr).collect();
        let bootstrap = if i == 0 {
            WAIT_LONG
        } else {
            SeedBootstrap::Never
        };
        members.push(start(config(name, ports[i], seeds, bootstrap)).await);
    }
    let clusters: Vec<&Cluster> = members.iter().map(|(c, _)| c).collect();
    one_cluster(&clusters, 3).await;
    for (c, _) in members {
        c.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_seed_unreachable_it_bootstraps_after_its_wait_when_a_majority_is_empty() {
    // Three seeds' worth: z, an empty node that only joins, and one that never answers
    // (a pod not scheduled yet). z and the empty one are two of three.
    let nobody = format!("127.0.0.1:{}", free_port());
    let ports = [free_port(), free_port()];
    let z_addr = format!("127.0.0.1:{}", ports[0]);
    let y_addr = format!("127.0.0.1:{}", ports[1]);
    let wait = Duration::from_millis(500);
    let t0 = Instant::now();
    let bootstrap = SeedBootstrap::WhenNoSeedHasACluster { wait };
    let (y, _yn) = start(config(
        "y",
        ports[1],
        vec![z_addr, nobody.clone()],
        SeedBootstrap::Never,
    ))
    .await;
    let (z, _zn) = start(config("z", ports[0], vec![y_addr, nobody], bootstrap)).await;
    one_cluster(&[&z, &y], 2).await;
    assert!(
        t0.elapsed() >= wait,
        "bootstrapped before its wait: {:?}",
        t0.elapsed()
    );
    for c in [z, y] {
        c.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_from_every_seed_it_never_bootstraps() {
    // Restarted empty while the others run but cannot be reached (a partition): starting
    // a cluster of its own would split the set in two. It keeps asking instead.
    let nobody = [free_port(), free_port()].map(|p| format!("127.0.0.1:{p}"));
    let wait = Duration::from_millis(100);
    let bootstrap = SeedBootstrap::WhenNoSeedHasACluster { wait };
    let (z, _zn) = start(config("z", 0, nobody.to_vec(), bootstrap)).await;
    // Ten times its wait, checked all along: never a leader, never a member.
    let until = Instant::now() + wait * 10;
    while Instant::now() < until {
        let s = z.status();
        assert!(s.leader.is_none(), "bootstrapped alone: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    z.shutdown().await;
}
