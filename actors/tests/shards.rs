//! A node whose hot path runs in several shards: the work spreads, and what a one-shard
//! node promises still holds across them (order within a key, one run per idempotency
//! key, node-wide limits, supervision of every shard).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opmesh_actors::{
    BatchPolicy, ChildKind, EngineConfig, HandlerError, Json, Node, OpStatus, Operation,
    SubmitError,
};

mod common;
use common::wait_for;
use parking_lot::Mutex;

fn sharded(shards: usize) -> EngineConfig {
    EngineConfig {
        shards,
        ..EngineConfig::default()
    }
}

async fn echo(op: Operation) -> Result<Json, HandlerError> {
    Ok(op.payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_node_has_a_shard_per_worker_and_keys_spread_over_them() {
    let node = Node::builder().handler("echo", echo).start().await.unwrap();
    assert_eq!(node.shards(), 2, "one per runtime worker");
    node.shutdown(Duration::from_secs(1)).await;

    let node = Node::builder()
        .config(sharded(4))
        .handler("echo", echo)
        .start()
        .await
        .unwrap();
    assert_eq!(node.shards(), 4);
    let tickets: Vec<_> = (0..400)
        .map(|i| {
            node.enqueue(Operation::new("echo", Json::null()).with_key(format!("k{i}")))
                .unwrap()
        })
        .collect();
    for t in tickets {
        assert_eq!(t.await.status, OpStatus::Succeeded);
    }
    let took = node.stats().shard_operations;
    assert_eq!(took.len(), 4);
    assert_eq!(took.iter().sum::<u64>(), 400);
    for (i, n) in took.iter().enumerate() {
        assert!(
            *n >= 50,
            "shard {i} took {n} of 400 keyed operations: {took:?}"
        );
    }
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operations_with_one_key_run_in_the_order_they_were_submitted() {
    let seen: Arc<Mutex<HashMap<String, Vec<u64>>>> = Arc::default();
    let s = seen.clone();
    let node = Node::builder()
        .config(EngineConfig {
            shards: 4,
            // One at a time per batch turn, so the order of runs is the order of queues.
            batch: BatchPolicy {
                batch_size: 1,
                batch_flush: Duration::ZERO,
                max_concurrent: 1,
            },
            ..EngineConfig::default()
        })
        .handler("log", move |op: Operation| {
            let s = s.clone();
            async move {
                let n: u64 = op.payload.decode().unwrap();
                s.lock()
                    .entry(op.key.as_deref().unwrap_or("").to_string())
                    .or_default()
                    .push(n);
                Ok(Json::null())
            }
        })
        .start()
        .await
        .unwrap();
    // Four submitters at once, each with its own keys, from the runtime's threads.
    let submitters: Vec<_> = (0..4)
        .map(|w| {
            let node = node.clone();
            tokio::spawn(async move {
                let mut tickets = Vec::new();
                for n in 0..100u64 {
                    let key = format!("w{w}-k{}", n % 5);
                    let op = Operation::new("log", Json::encode(&n).unwrap()).with_key(key);
                    tickets.push(node.enqueue(op).unwrap());
                    if n % 10 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                for t in tickets {
                    assert_eq!(t.await.status, OpStatus::Succeeded);
                }
            })
        })
        .collect();
    for s in submitters {
        s.await.unwrap();
    }
    let seen = std::mem::take(&mut *seen.lock());
    assert_eq!(seen.len(), 20);
    for (key, runs) in seen.iter() {
        assert_eq!(runs.len(), 20, "{key}");
        assert!(
            runs.windows(2).all(|w| w[0] < w[1]),
            "{key} ran out of order: {runs:?}"
        );
    }
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idempotency_key_runs_once_whichever_thread_submits_it() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let node = Node::builder()
        .config(sharded(4))
        .handler("once", move |_op: Operation| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(Json::encode(&"done").unwrap())
            }
        })
        .start()
        .await
        .unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let node = node.clone();
            tokio::spawn(async move {
                // Different routing keys: the idempotency key decides the shard.
                let op = Operation::new("once", Json::null())
                    .with_key(format!("r{i}"))
                    .with_idempotency_key("the-key");
                node.submit(op).await.unwrap()
            })
        })
        .collect();
    for t in tasks {
        let o = t.await.unwrap();
        assert_eq!(o.status, OpStatus::Succeeded);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "one run for 16 submissions");
    let c = node.cache_stats();
    assert_eq!((c.misses, c.hits), (1, 15));
    assert_eq!(c.size, 1);
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_wide_limits_hold_across_shards() {
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    // Handlers wait at the gate until the test opens it.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (r, p, g) = (running.clone(), peak.clone(), gate.clone());
    let node = Node::builder()
        .config(EngineConfig {
            shards: 4,
            batch: BatchPolicy {
                batch_size: 8,
                batch_flush: Duration::ZERO,
                max_concurrent: 3,
            },
            queue_capacity: 50,
            // One type: it may take every slot.
            type_share_percent: 100,
            ..EngineConfig::default()
        })
        .handler("slow", move |_op: Operation| {
            let (r, p, g) = (r.clone(), p.clone(), g.clone());
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                let _pass = g.acquire().await.unwrap();
                r.fetch_sub(1, Ordering::SeqCst);
                Ok(Json::null())
            }
        })
        .start()
        .await
        .unwrap();
    // The queue capacity is the type's, not a shard's: keys over every shard, and once
    // 50 wait, the next is refused whichever shard it belongs to.
    let mut tickets = Vec::new();
    let mut refused = 0;
    for i in 0..200 {
        match node.enqueue(Operation::new("slow", Json::null()).with_key(format!("k{i}"))) {
            Ok(t) => tickets.push(t),
            Err(SubmitError::Overloaded { capacity, .. }) => {
                assert_eq!(capacity, 50);
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // 50 wait; at most 3 left the queue to run (none can finish before the gate opens).
    assert!(
        (50..=53).contains(&tickets.len()),
        "{} accepted, {refused} refused",
        tickets.len()
    );
    wait_for("three handlers at the gate", Duration::from_secs(5), || {
        running.load(Ordering::SeqCst) == 3
    })
    .await;
    assert_eq!(node.running(), 3);
    gate.add_permits(1000);
    for t in tickets {
        assert_eq!(t.await.status, OpStatus::Succeeded);
    }
    assert_eq!(
        peak.load(Ordering::SeqCst),
        3,
        "max_concurrent is the node's"
    );
    // An executor task gives its finished operations' slots back when it next waits:
    // just after the last answer, not necessarily before it.
    wait_for("every slot back", Duration::from_secs(5), || {
        node.running() == 0
    })
    .await;
    node.shutdown(Duration::from_secs(1)).await;
}

/// Kills the actor of `kind` in `shard` and waits until its supervisor restarted it.
async fn kill_and_see_restarted(node: &Node, shard: usize, kind: ChildKind) {
    let before = node.metrics().actor_restarts_of(kind);
    node.kill_shard_actor(shard, kind);
    wait_for("the restart", Duration::from_secs(5), || {
        node.metrics().actor_restarts_of(kind) == before + 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_that_dies_in_one_shard_is_restarted_and_the_others_go_on() {
    let node = Node::builder()
        .config(sharded(3))
        .handler("echo", echo)
        .start()
        .await
        .unwrap();
    for kind in ChildKind::ALL {
        kill_and_see_restarted(&node, 2, kind).await;
        // Every shard works afterwards: keys over all three.
        let tickets: Vec<_> = (0..60)
            .map(|i| {
                node.enqueue(Operation::new("echo", Json::null()).with_key(format!("{i}")))
                    .unwrap()
            })
            .collect();
        for t in tickets {
            let o = tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("no operation hangs");
            assert_eq!(o.status, OpStatus::Succeeded, "{kind:?}: {o:?}");
        }
    }
    assert_eq!(node.stats().actor_restarts, 4);
    // A shard that does not exist: nothing happens.
    node.kill_shard_actor(7, ChildKind::Router);
    node.shutdown(Duration::from_secs(1)).await;
}

/// The name of the thread an operation ran on, as its result.
async fn where_it_ran(_op: Operation) -> Result<Json, HandlerError> {
    let name = std::thread::current().name().unwrap_or("").to_string();
    Ok(Json::encode(&name).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_shard_threads_each_shard_runs_on_its_own_thread_and_stops_with_the_node() {
    let config = EngineConfig {
        shards: 2,
        shard_threads: true,
        ..EngineConfig::default()
    };
    let node = Node::builder()
        .config(config)
        .handler("where", where_it_ran)
        .start()
        .await
        .unwrap();
    let runtimes = node.shard_runtimes().to_vec();
    assert_eq!(runtimes.len(), 2);
    // Submitted from a shard's own thread, an operation runs there (its home shard).
    for (i, rt) in runtimes.iter().enumerate() {
        let n = node.clone();
        let ran = rt
            .spawn(async move {
                let mut names = Vec::new();
                for _ in 0..20 {
                    let o = n
                        .enqueue(Operation::new("where", Json::null()))
                        .unwrap()
                        .await;
                    assert_eq!(o.status, OpStatus::Succeeded, "{o:?}");
                    names.push(o.result.unwrap().decode::<String>().unwrap());
                }
                names
            })
            .await
            .unwrap();
        assert!(
            ran.iter().all(|n| *n == format!("opmesh-shard-{i}")),
            "shard {i}: {ran:?}"
        );
    }
    // Keyed operations from the test's own threads reach both shards' threads.
    let mut seen = std::collections::HashSet::new();
    for i in 0..40 {
        let o = node
            .enqueue(Operation::new("where", Json::null()).with_key(format!("k{i}")))
            .unwrap()
            .await;
        seen.insert(o.result.unwrap().decode::<String>().unwrap());
    }
    let want: std::collections::HashSet<String> =
        ["opmesh-shard-0".to_string(), "opmesh-shard-1".to_string()].into();
    assert_eq!(seen, want);
    // An actor killed on a shard's thread is restarted there.
    for kind in ChildKind::ALL {
        kill_and_see_restarted(&node, 1, kind).await;
        let n = node.clone();
        let ran = runtimes[1]
            .spawn(async move {
                n.enqueue(Operation::new("where", Json::null()))
                    .unwrap()
                    .await
            })
            .await
            .unwrap();
        assert_eq!(
            ran.result.unwrap().decode::<String>().unwrap(),
            "opmesh-shard-1",
            "after {kind:?} restarted"
        );
    }
    node.shutdown(Duration::from_secs(1)).await;
    drop(node);
    // With the last handle gone, each shard's runtime stops (its thread is told at once
    // and stops soon after): a task spawned there is then refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for rt in runtimes {
        loop {
            if rt.spawn(async {}).await.is_err() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "a shard's runtime still runs tasks 10 s after the node was dropped"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Every outcome carries the node's name; cloned from one `Arc` on every core it would be
/// a cache line moved between them on each operation. It comes from a copy of the
/// thread's stripe instead: the same name, never the node's own reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_carry_the_node_name_without_sharing_its_reference() {
    let node = Node::builder()
        .node_id("n1")
        .config(EngineConfig {
            shards: 2,
            shard_threads: true,
            ..EngineConfig::default()
        })
        .handler("echo", echo)
        .start()
        .await
        .unwrap();
    for i in 0..40 {
        let o = node
            .enqueue(Operation::new("echo", Json::null()).with_key(format!("k{i}")))
            .unwrap()
            .await;
        let ran = o.executed_by.expect("a local outcome names its node");
        assert_eq!(&*ran, "n1");
        assert!(!Arc::ptr_eq(&ran, node.id()), "operation {i}");
    }
    node.shutdown(Duration::from_secs(1)).await;
}
