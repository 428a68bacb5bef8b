//! The background duties of a real node: none fails on a healthy node, and none is
//! restarted (or counted) while the node shuts down.

use std::time::{Duration, Instant};

use opmesh_actors::Node;
use opmesh_cluster::{Cluster, ClusterConfig};

async fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_node_restarts_no_duty_and_shutting_down_counts_none() {
    let mut cfg = ClusterConfig::new("solo", b"duties-test-secret");
    cfg.heartbeat = Duration::from_millis(20);
    cfg.election_timeout = Duration::from_millis(100);
    let cluster = Cluster::start(cfg).await.expect("cluster starts");
    let node = cluster
        .start_node(Node::builder().node_id("solo"))
        .await
        .expect("node starts");
    wait_for("ready", Duration::from_secs(10), || cluster.is_ready()).await;
    // A few heartbeats of every duty.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(cluster.duty_restarts(), 0);
    cluster.shutdown().await;
    node.shutdown(Duration::ZERO).await;
    // The duties see Raft and the links go: they end without being restarted.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cluster.duty_restarts(), 0);
}
