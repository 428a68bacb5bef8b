//! Several nodes as tasks of one process, on loopback: the cluster's logic end to end
//! (joining, route replication, remote execution, re-routing when an owner stops,
//! failure detection, leaving, refusing writes without a quorum, rotating the secret,
//! refusing nodes without it and messages that name another node than their link's).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::raft::VoteRequest;
use openraft::Vote;
use opmesh_actors::{
    BreakerPolicy, EngineConfig, HandlerError, Json, Node, OpStatus, Operation, RetryPolicy, Route,
    RouteError, Strategy, SubmitError,
};
use opmesh_cluster::codec::{Message, Rpc, WireOp, WireReply};
use opmesh_cluster::transport::{Inbound, SendError, Transport};
use opmesh_cluster::types::{raft_id, NodeRecord, NodeStatus};
use opmesh_cluster::{Cluster, ClusterConfig, Secret};

const SECRET: &[u8] = b"in-process-test-secret";

/// How many times the `counted` handler ran each operation id (ids are random, so tests
/// running beside each other do not meet).
static CALLS: std::sync::LazyLock<parking_lot::Mutex<HashMap<u128, u32>>> =
    std::sync::LazyLock::new(Default::default);

/// Whether the `flaky` handler fails (only the breaker test uses it).
static FLAKY_FAILS: AtomicBool = AtomicBool::new(false);

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
    member_with(name, join, |_| {}).await
}

/// A member whose configuration `tune` changes last.
async fn member_with(
    name: &str,
    join: Option<&str>,
    tune: impl FnOnce(&mut ClusterConfig),
) -> Member {
    member_engine(name, join, tune, EngineConfig::default()).await
}

/// A member with `engine` settings.
async fn member_engine(
    name: &str,
    join: Option<&str>,
    tune: impl FnOnce(&mut ClusterConfig),
    engine: EngineConfig,
) -> Member {
    let mut cfg = ClusterConfig::new(name, SECRET);
    cfg.join = join.map(str::to_owned).into_iter().collect();
    cfg.heartbeat = Duration::from_millis(50);
    cfg.down_after = Duration::from_millis(400);
    cfg.election_timeout = Duration::from_millis(150);
    cfg.write_timeout = Duration::from_secs(2);
    cfg.serves = vec!["echo".into(), "slow".into()];
    tune(&mut cfg);
    let cluster = Cluster::start(cfg).await.expect("cluster starts");
    let builder = Node::builder()
        .node_id(name)
        .config(engine)
        .handler("echo", |op: Operation| async move { Ok(op.payload) })
        .handler("slow", |op: Operation| async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok::<_, HandlerError>(op.payload)
        })
        .handler("flaky", |op: Operation| async move {
            if FLAKY_FAILS.load(Ordering::SeqCst) {
                Err(HandlerError::retryable("the dependency is down"))
            } else {
                Ok(op.payload)
            }
        })
        .handler("counted", |op: Operation| async move {
            *CALLS.lock().entry(op.id.0).or_default() += 1;
            tokio::time::sleep(Duration::from_millis(300)).await;
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
    // The node that wrote it routes by it as soon as the write returns.
    let here = m[2].node.routes();
    assert!(
        here.version >= v && here.routes.contains_key("echo"),
        "{here:?}"
    );
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

/// Every member sees all of them up, a leader, and its links to the others up.
async fn all_linked(m: &[Member]) {
    for x in m {
        wait_for("everyone up and linked", Duration::from_secs(20), || {
            let s = x.cluster.status();
            let peers_up = s
                .links
                .iter()
                .filter(|l| l.connected && m.iter().any(|o| o.cluster.name() == l.peer))
                .count();
            up_count(x) == m.len() && s.leader.is_some() && peers_up == m.len() - 1
        })
        .await;
    }
}

/// An operation submitted on each member runs on the next one.
async fn each_runs_on_the_next(m: &[Member]) {
    for (i, from) in m.iter().enumerate() {
        let owner = m[(i + 1) % m.len()].cluster.name().to_owned();
        let v = from
            .node
            .set_route("echo", pinned(&[&owner]))
            .await
            .unwrap();
        wait_for("the route here", Duration::from_secs(5), || {
            from.node.routes().version >= v
        })
        .await;
        let o = from
            .node
            .submit(Operation::new("echo", Json::encode(&i).unwrap()))
            .await
            .unwrap();
        assert_eq!(o.status, OpStatus::Succeeded, "{o:?}");
        assert_eq!(o.executed_by.as_deref(), Some(owner.as_str()));
    }
}

/// Restarts member `i` (in memory, on the same address, joining the next member) with
/// the secrets `current` and `previous`.
async fn restart(m: &mut [Member], i: usize, current: &[u8], previous: Option<&[u8]>) {
    let name = m[i].cluster.name().to_owned();
    let addr = m[i].cluster.cluster_addr().to_owned();
    let seed = m[(i + 1) % m.len()].cluster.cluster_addr().to_owned();
    m[i].stop().await;
    m[i] = member_with(&name, Some(&seed), |c| {
        c.listen = addr.parse().unwrap();
        c.secret = Secret::from(current);
        c.previous_secret = previous.map(Secret::from);
    })
    .await;
    all_linked(m).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_secret_rotation_keeps_the_cluster_connected() {
    const NEW: &[u8] = b"the-next-in-process-secret";
    let mut m = three().await;
    all_linked(&m).await;
    // One at a time: the new secret, the old one still accepted (and dialed with when a
    // peer refuses the new one).
    for i in 0..3 {
        restart(&mut m, i, NEW, Some(SECRET)).await;
    }
    each_runs_on_the_next(&m).await;
    // Then the old one retired, one at a time.
    for i in 0..3 {
        restart(&mut m, i, NEW, None).await;
    }
    each_runs_on_the_next(&m).await;

    // A node left with the old secret only cannot join.
    let refused_before: u64 = m.iter().map(|x| x.cluster.handshakes_refused()).sum();
    let seed = m[0].cluster.cluster_addr().to_owned();
    let stale = member("stale", Some(&seed)).await;
    wait_for("the stale node refused", Duration::from_secs(10), || {
        m.iter()
            .map(|x| x.cluster.handshakes_refused())
            .sum::<u64>()
            >= refused_before + 2
    })
    .await;
    for x in &m {
        assert_eq!(x.cluster.status().nodes.len(), 3);
        assert!(x.cluster.status().links.iter().all(|l| l.peer != "stale"));
    }
    assert!(!stale.cluster.is_ready());
    stale.stop().await;
    for x in &m {
        x.stop().await;
    }
}

/// What a bare transport standing in for a node does with what arrives: nothing.
#[derive(Default)]
struct Quiet;

impl Inbound for Quiet {
    fn on_message(&self, _from: &str, _msg: Message) {}
}

/// A bare transport named `name` with `secret`, dialing the member `to`.
async fn impostor(name: &str, secret: &[u8], to: &Member) -> Transport {
    let mut cfg = ClusterConfig::new(name, secret);
    cfg.handshake_timeout = Duration::from_millis(500);
    let t = Transport::start(&cfg, Arc::new(Quiet)).await.unwrap();
    t.add_peer(to.cluster.name(), to.cluster.cluster_addr());
    t
}

fn leader_of(m: &[Member]) -> &Member {
    let name = m[0].cluster.status().leader.unwrap();
    m.iter().find(|x| x.cluster.name() == name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leave_vote_or_join_naming_another_node_is_dropped() {
    let m = three().await;
    let leader = leader_of(&m);
    let victim = m
        .iter()
        .find(|x| x.cluster.name() != leader.cluster.name())
        .unwrap();
    let victim_name = victim.cluster.name().to_owned();
    let term = leader.cluster.status().term;

    // A node that holds the secret, linked as `x`, speaks for the victim.
    let x = impostor("x", SECRET, leader).await;
    assert!(
        x.wait_connected(leader.cluster.name(), Duration::from_secs(10))
            .await
    );
    let send = |id, body| x.send(leader.cluster.name(), Message::Request { id, body });
    send(
        1,
        Rpc::Leave {
            name: victim_name.clone(),
            by: "x".into(),
        },
    )
    .unwrap();
    send(
        2,
        Rpc::Vote(VoteRequest {
            vote: Vote::new(term + 10, raft_id(&victim_name)),
            last_log_id: None,
        }),
    )
    .unwrap();
    send(
        3,
        Rpc::Join {
            record: NodeRecord {
                name: victim_name.as_str().into(),
                raft_id: raft_id(&victim_name),
                cluster_addr: "127.0.0.1:1".into(),
                http_addr: String::new(),
                serves: vec![],
                status: NodeStatus::Up,
            },
            by: "x".into(),
        },
    )
    .unwrap();
    wait_for("three messages dropped", Duration::from_secs(5), || {
        leader.cluster.messages_refused() == 3
    })
    .await;
    // Nothing happened: the victim is still a member, the term did not move.
    for x in &m {
        assert_eq!(up_count(x), 3);
    }
    let status = leader.cluster.status();
    assert_eq!(status.term, term);
    assert_eq!(status.leader.as_deref(), Some(leader.cluster.name()));
    x.shutdown().await;

    // A node without the secret gets no link at all: nothing it sends arrives.
    let refused = leader.cluster.handshakes_refused();
    let wrong = impostor("wrong", b"not-the-cluster-secret", leader).await;
    wait_for("the wrong secret refused", Duration::from_secs(10), || {
        leader.cluster.handshakes_refused() > refused
    })
    .await;
    let vote = Rpc::Vote(VoteRequest {
        vote: Vote::new(term + 10, raft_id("wrong")),
        last_log_id: None,
    });
    assert_eq!(
        wrong.send(
            leader.cluster.name(),
            Message::Request { id: 1, body: vote }
        ),
        Err(SendError::NotConnected)
    );
    wrong.shutdown().await;
    for x in &m {
        x.stop().await;
    }
}

/// What arrives at a bare transport, kept for the test to read.
#[derive(Default)]
struct Recorder(parking_lot::Mutex<Vec<Message>>);

impl Inbound for Recorder {
    fn on_message(&self, _from: &str, msg: Message) {
        self.0.lock().push(msg);
    }
}

impl Recorder {
    /// The (seq, ids) of every reply batch received so far.
    fn batches(&self) -> Vec<(u64, Vec<u128>)> {
        self.0
            .lock()
            .iter()
            .filter_map(|m| match m {
                Message::ReplyBatch { seq, replies } => {
                    Some((*seq, replies.iter().map(|r| r.id).collect()))
                }
                _ => None,
            })
            .collect()
    }

    /// The last reply received for `id`.
    fn reply(&self, id: u128) -> Option<WireReply> {
        self.0.lock().iter().rev().find_map(|m| match m {
            Message::ReplyBatch { replies, .. } => replies.iter().find(|r| r.id == id).cloned(),
            _ => None,
        })
    }
}

fn counted_op(id: u128, payload: &[u8], idempotency_key: Option<&str>) -> WireOp {
    WireOp {
        id,
        op_type: "counted".into(),
        key: None,
        idempotency_key: idempotency_key.map(str::to_owned),
        payload: bytes::Bytes::copy_from_slice(payload),
        metadata: Default::default(),
        priority: 0,
        remaining_us: Some(10_000_000),
        trace: None,
        owner: None,
    }
}

fn calls(id: u128) -> u32 {
    CALLS.lock().get(&id).copied().unwrap_or(0)
}

/// An origin's view of the owner: operations sent again (its link came back) are not run
/// again, unacknowledged reply batches come again until acknowledged, and a reply the
/// owner had to drop (its buffer full) is not a reason to run the operation twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_runs_each_forwarded_operation_once_and_sends_replies_until_acknowledged() {
    let a = member("a", None).await;
    let seed = a.cluster.cluster_addr().to_owned();
    // A small buffer: ten small replies fit, one of 2 KiB does not.
    let b = member_with("b", Some(&seed), |c| c.reply_buffer_bytes = 2048).await;
    wait_for("b joined", Duration::from_secs(30), || up_count(&a) == 2).await;

    // `x` plays an origin: it holds the secret, so b runs what it sends and answers it.
    let recorder = Arc::new(Recorder::default());
    let mut cfg = ClusterConfig::new("x", SECRET);
    cfg.handshake_timeout = Duration::from_millis(500);
    let x = Transport::start(&cfg, recorder.clone()).await.unwrap();
    x.add_peer(b.cluster.name(), b.cluster.cluster_addr());
    assert!(x.wait_connected("b", Duration::from_secs(30)).await);

    let ids: Vec<u128> = (0..10).map(|_| rand::random()).collect();
    let ops: Vec<WireOp> = ids.iter().map(|id| counted_op(*id, b"1", None)).collect();
    x.send("b", Message::OpBatch(ops.clone())).unwrap();
    // Sent again while they run (the origin's link came back): not run again.
    x.send("b", Message::OpBatch(ops.clone())).unwrap();
    let answered = |rec: &Recorder| {
        let got: std::collections::BTreeSet<u128> =
            rec.batches().into_iter().flat_map(|(_, ids)| ids).collect();
        ids.iter().all(|id| got.contains(id))
    };
    wait_for("every reply", Duration::from_secs(30), || {
        answered(&recorder)
    })
    .await;
    assert!(ids.iter().all(|id| calls(*id) == 1));
    assert!(ids
        .iter()
        .all(|id| recorder.reply(*id).unwrap().status == OpStatus::Succeeded.to_u8()));
    let held = b.cluster.status().replies_unacknowledged;
    assert_eq!(held, 10, "kept until acknowledged");

    // Not acknowledged: b sends the same batches again by itself, and again when asked.
    let seqs: std::collections::BTreeSet<u64> =
        recorder.batches().into_iter().map(|(s, _)| s).collect();
    let first = recorder.batches().len();
    wait_for("the batches again", Duration::from_secs(30), || {
        recorder.batches().len() >= first + seqs.len()
    })
    .await;
    x.send("b", Message::OpBatch(ops[..1].to_vec())).unwrap();
    let before = recorder.batches().len();
    wait_for(
        "the batch of the one asked again",
        Duration::from_secs(30),
        || {
            recorder.batches()[before..]
                .iter()
                .any(|(_, got)| got.contains(&ids[0]))
        },
    )
    .await;
    assert!(recorder.batches().iter().all(|(seq, _)| seqs.contains(seq)));
    assert!(ids.iter().all(|id| calls(*id) == 1), "nothing ran twice");

    // Acknowledged: forgotten.
    x.send(
        "b",
        Message::ReplyAck {
            seqs: seqs.iter().copied().collect(),
        },
    )
    .unwrap();
    wait_for("nothing held", Duration::from_secs(30), || {
        b.cluster.status().replies_unacknowledged == 0
    })
    .await;

    // A reply over the buffer is sent once and dropped; asked again, the operation is
    // not run again: without a key it fails saying why, with one the cache answers.
    let dropped = b.cluster.replies_dropped();
    let big = format!("\"{}\"", "y".repeat(4096));
    let (plain, keyed): (u128, u128) = (rand::random(), rand::random());
    let key = format!("key-{keyed}");
    let pair = vec![
        counted_op(plain, big.as_bytes(), None),
        counted_op(keyed, big.as_bytes(), Some(&key)),
    ];
    x.send("b", Message::OpBatch(pair.clone())).unwrap();
    wait_for("both dropped", Duration::from_secs(30), || {
        b.cluster.replies_dropped() >= dropped + 2
    })
    .await;
    assert_eq!((calls(plain), calls(keyed)), (1, 1));
    x.send("b", Message::OpBatch(pair)).unwrap();
    wait_for("both answered again", Duration::from_secs(30), || {
        let n = |id| {
            recorder
                .batches()
                .iter()
                .filter(|(_, ids)| ids.contains(&id))
                .count()
        };
        n(plain) >= 2 && n(keyed) >= 2
    })
    .await;
    let r = recorder.reply(plain).unwrap();
    assert_eq!(r.status, OpStatus::Failed.to_u8());
    assert!(
        r.error.as_deref().unwrap().contains("dropped its reply"),
        "{:?}",
        r.error
    );
    let r = recorder.reply(keyed).unwrap();
    assert_eq!((r.status, r.cached), (OpStatus::Succeeded.to_u8(), true));
    assert_eq!((calls(plain), calls(keyed)), (1, 1), "nothing ran twice");

    x.shutdown().await;
    b.stop().await;
    a.stop().await;
}

/// Back-pressure: an owner whose queue of a type passes the high watermark tells the
/// others; an operation it refuses for a full queue goes to another node of the route or
/// fails naming it, and while it stays over the watermark the origin's door refuses the
/// type (429) unless another node can take it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_owner_pushes_back_on_the_nodes_that_send_it_work() {
    let a = member("a", None).await;
    let seed = a.cluster.cluster_addr().to_owned();
    let mut small = EngineConfig {
        queue_capacity: 10,
        shards: 1,
        ..EngineConfig::default()
    };
    small.batch.max_concurrent = 1;
    let b = member_engine("b", Some(&seed), |_| {}, small).await;
    wait_for("b joined", Duration::from_secs(30), || up_count(&a) == 2).await;
    let v = a.node.set_route("slow", pinned(&["b"])).await.unwrap();
    wait_for("the route on a", Duration::from_secs(30), || {
        a.node.routes().version >= v
    })
    .await;

    // 30 at once for b, which queues 10 (one runs at a time, 200 ms each): the ones it
    // refuses have nowhere else to go and fail naming it.
    // One batch: all pass a's door before any reaches b.
    let ops: Vec<_> = a
        .node
        .enqueue_batch(
            (0..30)
                .map(|i| Operation::new("slow", Json::encode(&i).unwrap()))
                .collect(),
            false,
        )
        .into_iter()
        .map(|t| t.expect("accepted at a's door: b has not said it is overloaded yet"))
        .collect();
    // b says so in its heartbeats: a's door refuses the type now.
    wait_for(
        "a refuses slow at its door",
        Duration::from_secs(30),
        || {
            matches!(
                a.node.enqueue(Operation::new("slow", Json::null())),
                Err(SubmitError::OwnerOverloaded { ref node, .. }) if node == "b"
            )
        },
    )
    .await;
    let outcomes = futures::future::join_all(ops).await;
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|o| o.status == OpStatus::Failed)
        .collect();
    assert!(!failed.is_empty(), "b refused some");
    for o in &failed {
        let e = o.error.as_deref().unwrap();
        assert!(
            e.starts_with("overloaded: node `b` refused the operation"),
            "{e}"
        );
    }
    assert!(outcomes
        .iter()
        .all(|o| o.status == OpStatus::Succeeded || o.status == OpStatus::Failed));
    // Drained, b says so and a accepts the type again.
    wait_for("a accepts slow again", Duration::from_secs(30), || {
        a.node
            .routes()
            .nodes
            .iter()
            .all(|n| n.overloaded.is_empty())
    })
    .await;
    a.node
        .submit(Operation::new("slow", Json::null()))
        .await
        .expect("accepted again");

    // With a second node on the route, what b refuses runs on a, and nothing fails.
    let v = a.node.set_route("slow", pinned(&["b", "a"])).await.unwrap();
    wait_for("the new route on a", Duration::from_secs(30), || {
        a.node.routes().version >= v
    })
    .await;
    let outcomes = futures::future::join_all((0..30).map(|i| {
        a.node
            .submit(Operation::new("slow", Json::encode(&i).unwrap()))
    }))
    .await;
    let by_a = outcomes
        .iter()
        .filter(|o| {
            let o = o.as_ref().unwrap();
            assert_eq!(o.status, OpStatus::Succeeded, "{o:?}");
            o.executed_by.as_deref() == Some("a")
        })
        .count();
    assert!(by_a > 0, "a took what b could not queue");
    b.stop().await;
    a.stop().await;
}

/// Fails three `flaky` operations through `a`, each on b: b's breaker (3 failures) opens.
async fn open_bs_breaker(a: &Member) {
    FLAKY_FAILS.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let o = a
            .node
            .submit(Operation::new("flaky", Json::null()))
            .await
            .expect("accepted");
        assert_eq!(
            (o.status, o.executed_by.as_deref()),
            (OpStatus::Failed, Some("b"))
        );
    }
}

/// An owner's open circuit breaker travels in its heartbeats: the origin refuses the type
/// at its door at once (503 `circuit_open` naming the owner and when it lets operations
/// through again) instead of forwarding what the owner would refuse; once the breaker's
/// time is up the origin forwards again, the owner's trial closes it; and with another
/// node on the route, operations go there while the owner's breaker is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owners_open_breaker_is_refused_at_the_origins_door() {
    let engine = EngineConfig {
        breaker: Some(BreakerPolicy {
            failures: 3,
            window: Duration::from_secs(30),
            open_for: Duration::from_millis(1500),
            half_open_calls: 1,
        }),
        retry: RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        },
        ..EngineConfig::default()
    };
    let a = member_engine("a", None, |_| {}, engine.clone()).await;
    let seed = a.cluster.cluster_addr().to_owned();
    let b = member_engine("b", Some(&seed), |c| c.serves.push("flaky".into()), engine).await;
    wait_for("b joined", Duration::from_secs(30), || up_count(&a) == 2).await;
    let v = a.node.set_route("flaky", pinned(&["b"])).await.unwrap();
    wait_for("the route on a", Duration::from_secs(30), || {
        a.node.routes().version >= v
    })
    .await;
    let flaky = || Operation::new("flaky", Json::null());

    open_bs_breaker(&a).await;
    // b's breaker is open; its next heartbeat tells a.
    wait_for(
        "a refuses flaky at its door",
        Duration::from_secs(10),
        || match a.node.enqueue(flaky()) {
            Err(SubmitError::OwnerCircuitOpen {
                node, retry_after, ..
            }) => {
                assert_eq!(node, "b");
                assert!(
                    retry_after <= Duration::from_millis(1500),
                    "{retry_after:?}"
                );
                true
            }
            _ => false,
        },
    )
    .await;
    let Err(e) = a.node.enqueue(flaky()) else {
        panic!("accepted while b's breaker is open");
    };
    let msg = e.to_string();
    assert!(
        msg.contains("circuit breaker of operation type `flaky` on node `b` is open"),
        "{msg}"
    );
    assert!(e.retry_after().is_some());
    let b_seen = |m: &Member| {
        m.cluster
            .status()
            .nodes
            .into_iter()
            .find(|n| n.id == "b")
            .unwrap()
            .open_breakers
    };
    assert_eq!(b_seen(&a), ["flaky"]);
    assert_eq!(b_seen(&b), ["flaky"], "b shows its own");

    // The dependency recovers; when b's breaker's time is up, a forwards again and b's
    // trial closes it.
    FLAKY_FAILS.store(false, Ordering::SeqCst);
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        match a.node.submit(flaky()).await {
            Ok(o) if o.status == OpStatus::Succeeded => break,
            _ => {}
        }
        assert!(Instant::now() < until, "a never forwarded flaky again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for(
        "b's breaker closed, as a hears",
        Duration::from_secs(10),
        || b_seen(&a).is_empty(),
    )
    .await;

    // With a on the route too, what b's open breaker would refuse runs on a.
    let v = a
        .node
        .set_route("flaky", pinned(&["b", "a"]))
        .await
        .unwrap();
    wait_for("the new route on a", Duration::from_secs(30), || {
        a.node.routes().version >= v
    })
    .await;
    open_bs_breaker(&a).await;
    FLAKY_FAILS.store(false, Ordering::SeqCst);
    wait_for(
        "a hears b's breaker opened",
        Duration::from_secs(10),
        || b_seen(&a) == ["flaky"],
    )
    .await;
    let o = a
        .node
        .submit(flaky())
        .await
        .expect("accepted: a can run it");
    assert_eq!(
        (o.status, o.executed_by.as_deref()),
        (OpStatus::Succeeded, Some("a"))
    );
    b.stop().await;
    a.stop().await;
}

/// A TCP proxy in front of `to`: what the dialer writes is forwarded unless `paused`
/// (then the dialer's writes back up into its outbox); answers always flow.
async fn stalling_proxy(to: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        paused: Option<Arc<AtomicBool>>,
    ) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            while paused.as_ref().is_some_and(|p| p.load(Ordering::SeqCst)) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let paused = Arc::new(AtomicBool::new(false));
    let p = paused.clone();
    tokio::spawn(async move {
        while let Ok((dialer, _)) = listener.accept().await {
            let Ok(target) = tokio::net::TcpStream::connect(to).await else {
                continue;
            };
            let (dr, dw) = dialer.into_split();
            let (tr, tw) = target.into_split();
            tokio::spawn(pipe(dr, tw, Some(p.clone())));
            tokio::spawn(pipe(tr, dw, None));
        }
    });
    (addr, paused)
}

/// A link that does not keep up is bounded: its outbox holds at most
/// `cluster.link_buffer_bytes`; operations past it go elsewhere or fail naming the link
/// (never lost); over `flow.high` of it the link is congested and the origin's door
/// refuses the type (429) while no other node can take it, until the link drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_congested_link_pushes_back_at_the_origins_door() {
    let b_listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (via_proxy, paused) = stalling_proxy(b_listen).await;
    // Silence on the stalled link must not make either node mark the other down.
    let patient = |c: &mut ClusterConfig| c.down_after = Duration::from_secs(60);
    let a = member_with("a", None, |c| {
        patient(c);
        c.link_buffer_bytes = ClusterConfig::MIN_LINK_BUFFER;
    })
    .await;
    let seed = a.cluster.cluster_addr().to_owned();
    let b = member_with("b", Some(&seed), |c| {
        patient(c);
        c.listen = b_listen;
        c.advertise = via_proxy.to_string();
    })
    .await;
    wait_for("b joined", Duration::from_secs(30), || up_count(&a) == 2).await;
    let v = a.node.set_route("echo", pinned(&["b"])).await.unwrap();
    wait_for("the route on a", Duration::from_secs(30), || {
        a.node.routes().version >= v
    })
    .await;
    let big = Json::encode(&"x".repeat(256 * 1024)).unwrap();
    let o = a
        .node
        .submit(Operation::new("echo", big.clone()))
        .await
        .unwrap();
    assert_eq!(
        (o.status, o.executed_by.as_deref()),
        (OpStatus::Succeeded, Some("b"))
    );

    paused.store(true, Ordering::SeqCst);
    let mut accepted = Vec::new();
    let until = Instant::now() + Duration::from_secs(30);
    let why = loop {
        assert!(
            Instant::now() < until && accepted.len() < 1000,
            "a's door never refused echo ({} accepted)",
            accepted.len()
        );
        match a.node.enqueue(Operation::new("echo", big.clone())) {
            Ok(t) => accepted.push(t),
            Err(SubmitError::OwnerOverloaded { node, why, .. }) => {
                assert_eq!(node, "b");
                break why;
            }
            Err(e) => panic!("{e}"),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert!(why.contains("link"), "{why}");
    let status = a.cluster.status();
    assert!(status.nodes.iter().any(|n| n.id == "b" && n.congested));
    let link = status.links.iter().find(|l| l.peer == "b").unwrap().clone();
    assert!(
        link.queued_bytes as usize <= ClusterConfig::MIN_LINK_BUFFER + 512 * 1024,
        "bounded: {}",
        link.queued_bytes
    );

    paused.store(false, Ordering::SeqCst);
    wait_for("a accepts echo again", Duration::from_secs(30), || {
        a.node.routes().nodes.iter().all(|n| !n.congested)
    })
    .await;
    let o = a
        .node
        .submit(Operation::new("echo", big.clone()))
        .await
        .unwrap();
    assert_eq!(o.status, OpStatus::Succeeded, "{:?}", o.error);
    // Every accepted operation ended: run on b, or refused naming the full link.
    let outcomes = futures::future::join_all(accepted).await;
    let (mut ran, mut refused) = (0, 0);
    for o in &outcomes {
        match o.status {
            OpStatus::Succeeded => ran += 1,
            _ => {
                let e = o.error.as_deref().unwrap_or_default();
                assert!(e.contains("the link to node `b` holds"), "{e}");
                refused += 1;
            }
        }
    }
    // Whether the link was found full before a heartbeat found it congested is a race;
    // what was refused for it is what failed.
    assert!(ran > 0, "ran {ran}");
    assert_eq!(refused > 0, link.refused_full > 0, "{refused} vs {link:?}");
    b.stop().await;
    a.stop().await;
}

/// A node whose cluster is up but whose engine is not attached yet (it is starting) does
/// not refuse forwarded operations as if it were shutting down: it says it is starting,
/// in a reply the origin routes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_node_sends_forwarded_operations_back_to_be_routed_again() {
    let mut cfg = ClusterConfig::new("s", SECRET);
    cfg.heartbeat = Duration::from_millis(50);
    cfg.election_timeout = Duration::from_millis(150);
    let starting = Cluster::start(cfg).await.expect("cluster starts");
    let recorder = Arc::new(Recorder::default());
    let mut cfg = ClusterConfig::new("x", SECRET);
    cfg.handshake_timeout = Duration::from_millis(500);
    let x = Transport::start(&cfg, recorder.clone()).await.unwrap();
    x.add_peer("s", starting.cluster_addr());
    assert!(x.wait_connected("s", Duration::from_secs(10)).await);
    let id: u128 = rand::random();
    x.send("s", Message::OpBatch(vec![counted_op(id, b"1", None)]))
        .unwrap();
    wait_for("its answer", Duration::from_secs(30), || {
        recorder.reply(id).is_some()
    })
    .await;
    let r = recorder.reply(id).unwrap();
    assert_eq!(r.status, opmesh_cluster::remote::REFUSED_OVERLOADED);
    assert!(
        r.error.as_deref().unwrap().contains("is starting"),
        "{:?}",
        r.error
    );
    assert_eq!(calls(id), 0);
    x.shutdown().await;
    starting.shutdown().await;
}

/// With several connections per peer (one per shard thread, as the served binary runs
/// them: `cluster.lanes`), operations with one key forwarded to their owner still run
/// there in the order they were submitted: a key's operations are one shard's, and a
/// shard's go on one lane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_several_lanes_operations_with_one_key_keep_their_order() {
    use opmesh_actors::shard::ShardThreads;
    use opmesh_actors::BatchPolicy;
    let seen: Arc<parking_lot::Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let mut members = Vec::new();
    let mut threads = Vec::new();
    let mut seed: Option<String> = None;
    for name in ["a", "b"] {
        let own = ShardThreads::start(2).unwrap();
        let mut cfg = ClusterConfig::new(name, SECRET);
        cfg.join = seed.iter().cloned().collect();
        cfg.heartbeat = Duration::from_millis(50);
        cfg.election_timeout = Duration::from_millis(150);
        cfg.serves = vec!["log".into()];
        cfg.link_runtimes = own.handles().to_vec();
        let cluster = Cluster::start(cfg).await.expect("cluster starts");
        let s = seen.clone();
        let builder = Node::builder()
            .node_id(name)
            .config(EngineConfig {
                shards: 2,
                shard_threads: true,
                // One at a time, so the order of runs is the order of the queues.
                batch: BatchPolicy {
                    batch_size: 1,
                    batch_flush: Duration::ZERO,
                    max_concurrent: 1,
                },
                ..EngineConfig::default()
            })
            .shard_runtimes(own.handles().to_vec())
            .handler("log", move |op: Operation| {
                let s = s.clone();
                async move {
                    let n: u64 = op.payload.decode().unwrap();
                    s.lock()
                        .entry(op.key.clone().unwrap_or_default())
                        .or_default()
                        .push(n);
                    Ok(Json::null())
                }
            });
        let node = cluster.start_node(builder).await.expect("node starts");
        seed.get_or_insert_with(|| cluster.cluster_addr().to_owned());
        members.push(Member { cluster, node });
        threads.push(own);
    }
    for m in &members {
        wait_for("two up", Duration::from_secs(15), || {
            up_count(m) == 2 && m.cluster.status().leader.is_some()
        })
        .await;
    }
    let (a, b) = (&members[0], &members[1]);
    a.node.set_route("log", pinned(&["b"])).await.unwrap();
    wait_for("the route on a", Duration::from_secs(5), || {
        a.node.routes().routes.contains_key("log")
    })
    .await;
    for m in [a, b] {
        let links = m.cluster.status().links;
        assert!(
            links.iter().all(|l| l.lanes == 2 && l.lanes_up == 2),
            "{links:?}"
        );
    }
    // Four submitters at once, five keys each (over both shards, so both lanes).
    let submitters: Vec<_> = (0..4)
        .map(|w| {
            let node = a.node.clone();
            tokio::spawn(async move {
                let mut tickets = Vec::new();
                for n in 0..100u64 {
                    let op = Operation::new("log", Json::encode(&n).unwrap())
                        .with_key(format!("w{w}-k{}", n % 5));
                    tickets.push(node.enqueue(op).unwrap());
                    if n % 10 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                for t in tickets {
                    let o = t.await;
                    assert_eq!(o.status, OpStatus::Succeeded, "{o:?}");
                    assert_eq!(o.executed_by.as_deref(), Some("b"));
                }
            })
        })
        .collect();
    for s in submitters {
        s.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock());
    assert_eq!(seen.len(), 20);
    for (key, runs) in &seen {
        assert_eq!(runs.len(), 20, "{key}");
        assert!(
            runs.windows(2).all(|w| w[0] < w[1]),
            "{key} ran out of order: {runs:?}"
        );
    }
    for m in &members {
        m.stop().await;
    }
    drop(threads);
}
