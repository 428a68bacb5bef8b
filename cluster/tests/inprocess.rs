//! Several nodes as tasks of one process, on loopback: the cluster's logic end to end
//! (joining, route replication, remote execution, re-routing when an owner stops,
//! failure detection, leaving, refusing writes without a quorum).

use std::time::{Duration, Instant};

use opmesh_actors::{HandlerError, Json, Node, OpStatus, Operation, Route, RouteError, Strategy};
use opmesh_cluster::{Cluster, ClusterConfig};

const SECRET: &[u8] = b"in-process-test-secret";

struct Member {
    cluster: Cluster,
    node: Node,
}

impl Member {
    async fn stop(&self) {
        self.cluster.shutdown().await;
        self.node.shutdown(Duration::ZERO).await;
    }
}

async fn member(name: &str, join: Option<&str>) -> Member {
    let mut cfg = ClusterConfig::new(name, SECRET);
    cfg.join = join.map(str::to_owned).into_iter().collect();
    cfg.heartbeat = Duration::from_millis(50);
    cfg.down_after = Duration::from_millis(400);
    cfg.election_timeout = Duration::from_millis(150);
    cfg.write_timeout = Duration::from_secs(2);
    cfg.serves = vec!["echo".into(), "slow".into()];
    let cluster = Cluster::start(cfg).await.expect("cluster starts");
    let builder = Node::builder()
        .node_id(name)
        .handler("echo", |op: Operation| async move { Ok(op.payload) })
        .handler("slow", |op: Operation| async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok::<_, HandlerError>(op.payload)
        });
    let node = cluster.start_node(builder).await.expect("node starts");
    Member { cluster, node }
}

async fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn up_count(m: &Member) -> usize {
    m.cluster
        .status()
        .nodes
        .iter()
        .filter(|n| n.status == "up")
        .count()
}

async fn three() -> Vec<Member> {
    let a = member("a", None).await;
    let seed = a.cluster.cluster_addr().to_owned();
    let b = member("b", Some(&seed)).await;
    let c = member("c", Some(&seed)).await;
    let all = vec![a, b, c];
    for m in &all {
        wait_for("three up", Duration::from_secs(15), || {
            up_count(m) == 3 && m.cluster.status().leader.is_some()
        })
        .await;
    }
    all
}

fn pinned(nodes: &[&str]) -> Route {
    Route {
        strategy: Strategy::Pinned,
        nodes: nodes.iter().map(|n| (*n).into()).collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_replicate_and_operations_run_on_their_owner() {
    let m = three().await;
    let status = m[0].cluster.status();
    assert_eq!(
        status.nodes.iter().filter(|n| n.role == "voter").count(),
        3,
        "{status:?}"
    );
    let v = m[2].node.set_route("echo", pinned(&["b"])).await.unwrap();
    for x in &m {
        wait_for("route everywhere", Duration::from_secs(5), || {
            x.node.routes().version >= v && x.node.routes().routes.contains_key("echo")
        })
        .await;
    }
    let outcomes = futures::future::join_all((0..500).map(|i| {
        m[0].node
            .submit(Operation::new("echo", Json::encode(&i).unwrap()))
    }))
    .await;
    for (i, o) in outcomes.into_iter().enumerate() {
        let o = o.unwrap();
        assert_eq!(o.status, OpStatus::Succeeded, "{o:?}");
        assert_eq!(o.executed_by.as_deref(), Some("b"));
        assert_eq!(o.result.unwrap().decode::<usize>().unwrap(), i);
    }
    // Keys spread over the nodes by consistent hashing, the same key always to one node.
    let v = m[0]
        .node
        .set_route(
            "echo",
            Route {
                strategy: Strategy::ConsistentHash,
                nodes: vec![],
            },
        )
        .await
        .unwrap();
    for x in &m {
        wait_for("the new route everywhere", Duration::from_secs(5), || {
            x.node.routes().version >= v
        })
        .await;
    }
    let mut owners = std::collections::BTreeMap::new();
    for k in 0..60 {
        for from in &m {
            let o = from
                .node
                .submit(Operation::new("echo", Json::null()).with_key(format!("k{k}")))
                .await
                .unwrap();
            let by = o.executed_by.unwrap().to_string();
            assert_eq!(owners.entry(k).or_insert_with(|| by.clone()), &by);
        }
    }
    let distinct: std::collections::BTreeSet<_> = owners.values().collect();
    assert_eq!(distinct.len(), 3, "{owners:?}");
    for x in &m {
        x.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_owner_stops_its_operations_are_routed_again_and_complete() {
    let m = three().await;
    m[0].node
        .set_route("slow", pinned(&["b", "c"]))
        .await
        .unwrap();
    wait_for("route on a", Duration::from_secs(5), || {
        m[0].node.routes().routes.contains_key("slow")
    })
    .await;
    let tickets: Vec<_> = (0..100)
        .map(|i| {
            m[0].node
                .enqueue(Operation::new("slow", Json::encode(&i).unwrap()))
                .unwrap()
        })
        .collect();
    wait_for("b running them", Duration::from_secs(5), || {
        m[1].node.stats().active_operations > 0
    })
    .await;
    m[1].stop().await;
    let outcomes = futures::future::join_all(tickets).await;
    for o in &outcomes {
        assert_eq!(o.status, OpStatus::Succeeded, "{o:?}");
    }
    assert!(outcomes
        .iter()
        .any(|o| o.executed_by.as_deref() == Some("c")));
    wait_for("b marked down", Duration::from_secs(5), || {
        m[0].cluster
            .status()
            .nodes
            .iter()
            .any(|n| n.id == "b" && n.status == "down")
    })
    .await;
    m[0].stop().await;
    m[2].stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_leaves_cleanly_and_without_a_quorum_writes_fail_clearly() {
    let m = three().await;
    m[2].cluster.leave(Duration::from_secs(2)).await.unwrap();
    for x in &m[..2] {
        wait_for("c gone", Duration::from_secs(5), || {
            x.cluster.status().nodes.len() == 2
        })
        .await;
    }
    m[2].stop().await;
    // Two voters left: stopping one leaves the other without a quorum.
    let leader = m[0].cluster.status().leader.unwrap();
    let (gone, left) = if leader == "a" {
        (&m[0], &m[1])
    } else {
        (&m[1], &m[0])
    };
    gone.stop().await;
    let t = Instant::now();
    let e = left
        .node
        .set_route("echo", pinned(&["a"]))
        .await
        .unwrap_err();
    assert!(matches!(e, RouteError::NoQuorum { .. }), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    left.stop().await;
}
