//! The single-node engine end to end through its library API: handlers, retries,
//! deadlines, the result cache, back-pressure, priorities, supervision and shutdown.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opmesh_actors::job::Job;
use opmesh_actors::router::Forwarder;
use opmesh_actors::routing::{LocalRoutes, NodeView};
use opmesh_actors::{
    BatchPolicy, ChildKind, EngineConfig, HandlerError, Json, Node, NodeId, OpId, OpOutcome,
    OpStatus, Operation, RetryPolicy, Route, RouteError, RoutingTable, Strategy, SubmitError,
};

mod common;
use common::wait_for;

fn json(v: serde_json::Value) -> Json {
    Json::encode(&v).unwrap()
}

async fn echo(op: Operation) -> Result<Json, HandlerError> {
    Ok(op.payload)
}

async fn sleepy(op: Operation) -> Result<Json, HandlerError> {
    let ms: u64 = op.payload.decode().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(op.payload)
}

/// A handler that answers its payload once `gate` gives it a permit.
fn gated(
    gate: &Arc<tokio::sync::Semaphore>,
) -> impl Fn(Operation) -> futures::future::BoxFuture<'static, Result<Json, HandlerError>>
       + Send
       + Sync
       + 'static {
    let gate = gate.clone();
    move |op: Operation| {
        let g = gate.clone();
        Box::pin(async move {
            g.acquire().await.unwrap().forget();
            Ok(op.payload)
        })
    }
}

/// A node of `max_concurrent` running slots, all of which one type may take (these tests
/// are about the node's total, not the share between types: see `types.rs`).
fn small(max_concurrent: usize, queue_capacity: usize) -> EngineConfig {
    EngineConfig {
        batch: BatchPolicy {
            batch_size: 16,
            batch_flush: Duration::ZERO,
            max_concurrent,
        },
        queue_capacity,
        type_share_percent: 100,
        ..EngineConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_runs_and_reports_who_ran_it() {
    let node = Node::builder()
        .node_id("n1")
        .handler("echo", echo)
        .start()
        .await
        .unwrap();
    let o = node
        .submit(Operation::new("echo", json(serde_json::json!({"a": 1}))))
        .await
        .unwrap();
    assert_eq!(o.status, OpStatus::Succeeded);
    assert_eq!(o.result.unwrap().as_str(), r#"{"a":1}"#);
    assert_eq!(o.executed_by.as_deref(), Some("n1"));
    assert_eq!(o.attempts, 1);
    assert!(!o.cached);
    let s = node.stats();
    assert_eq!(
        (
            s.total_operations,
            s.completed_operations,
            s.succeeded_operations
        ),
        (1, 1, 1)
    );
    assert_eq!(s.per_type["echo"].succeeded, 1);
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_operations_all_complete() {
    let node = Node::builder().handler("echo", echo).start().await.unwrap();
    let mut tickets = Vec::new();
    for i in 0..20_000 {
        tickets.push(
            node.enqueue(Operation::new("echo", json(i.into())))
                .unwrap(),
        );
    }
    for (i, t) in tickets.into_iter().enumerate() {
        let o = t.await;
        assert_eq!(o.status, OpStatus::Succeeded);
        assert_eq!(o.result.unwrap().as_str(), i.to_string());
    }
    let s = node.stats();
    assert_eq!(s.completed_operations, 20_000);
    assert!(
        s.batches < 20_000,
        "operations should travel in batches, got {}",
        s.batches
    );
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_errors_are_retried_with_backoff_and_fatal_ones_are_not() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let flaky = move |op: Operation| {
        let c = c.clone();
        async move {
            let n = c.fetch_add(1, Ordering::SeqCst);
            if op.payload.as_str() == "\"fatal\"" {
                return Err(HandlerError::fatal("bad input"));
            }
            if n < 2 {
                Err(HandlerError::retryable(format!("try {n} failed")))
            } else {
                Ok(Json::null())
            }
        }
    };
    let retry = RetryPolicy {
        max_attempts: 4,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        multiplier: 2.0,
        jitter: 0.0,
    };
    let node = Node::builder()
        .handler_with_retry("flaky", flaky, retry)
        .start()
        .await
        .unwrap();
    let t0 = Instant::now();
    let o = node
        .submit(Operation::new("flaky", Json::null()))
        .await
        .unwrap();
    assert_eq!(o.status, OpStatus::Succeeded, "{o:?}");
    assert_eq!(o.attempts, 3);
    // Two backoffs: 20 ms then 40 ms.
    assert!(
        t0.elapsed() >= Duration::from_millis(60),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(node.stats().per_type["flaky"].retries, 2);

    let before = calls.load(Ordering::SeqCst);
    let o = node
        .submit(Operation::new("flaky", json("fatal".into())))
        .await
        .unwrap();
    assert_eq!(o.status, OpStatus::Failed);
    assert_eq!(o.error.as_deref(), Some("bad input"));
    assert_eq!(calls.load(Ordering::SeqCst), before + 1);
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_max_attempts_and_name_the_count() {
    let node = Node::builder()
        .handler_with_retry(
            "down",
            |_op: Operation| async { Err::<Json, _>(HandlerError::retryable("dependency down")) },
            RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(2),
                multiplier: 2.0,
                jitter: 0.5,
            },
        )
        .start()
        .await
        .unwrap();
    let o = node
        .submit(Operation::new("down", Json::null()))
        .await
        .unwrap();
    assert_eq!(o.status, OpStatus::Failed);
    assert_eq!(o.attempts, 3);
    assert!(o.error.unwrap().contains("after 3 attempts"));
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_expire_running_operations_and_refuse_past_ones() {
    let node = Node::builder()
        .handler("sleep", sleepy)
        .start()
        .await
        .unwrap();
    let o = node
        .submit(Operation::new("sleep", json(2000.into())).with_timeout(Duration::from_millis(50)))
        .await
        .unwrap();
    assert_eq!(o.status, OpStatus::Expired);
    assert!(o.error.unwrap().contains("deadline"));
    let mut op = Operation::new("sleep", json(0.into()));
    op.deadline = Some(Instant::now() - Duration::from_millis(1));
    assert_eq!(
        node.submit(op).await.unwrap_err(),
        SubmitError::DeadlineInPast
    );
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_operations_expire_with_a_reason() {
    // One slot, held by a long operation: the next one waits in the queue past its deadline.
    let node = Node::builder()
        .config(small(1, 100))
        .handler("sleep", sleepy)
        .start()
        .await
        .unwrap();
    let long = node
        .enqueue(Operation::new("sleep", json(400.into())))
        .unwrap();
    wait_for("the long operation to run", Duration::from_secs(5), || {
        node.stats().active_operations == 1
    })
    .await;
    let o = node
        .submit(Operation::new("sleep", json(0.into())).with_timeout(Duration::from_millis(50)))
        .await
        .unwrap();
    assert_eq!(o.status, OpStatus::Expired);
    assert!(o.error.unwrap().contains("waited in the queue"));
    assert_eq!(long.await.status, OpStatus::Succeeded);
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_its_operation_not_the_node() {
    let node = Node::builder()
        .handler("boom", |_op: Operation| async { panic!("kaboom") })
        .handler("echo", echo)
        .start()
        .await
        .unwrap();
    let o = node
        .submit(Operation::new("boom", Json::null()))
        .await
        .unwrap();
    assert_eq!(o.status, OpStatus::Failed);
    assert!(o.error.unwrap().contains("kaboom"));
    let o = node
        .submit(Operation::new("echo", Json::null()))
        .await
        .unwrap();
    assert_eq!(o.status, OpStatus::Succeeded);
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn blocking_handlers_do_not_block_async_ones() {
    let node = Node::builder()
        .blocking_handler("cpu", |op: Operation| {
            std::thread::sleep(Duration::from_millis(300));
            Ok(op.payload)
        })
        .handler("echo", echo)
        .start()
        .await
        .unwrap();
    let slow = node.enqueue(Operation::new("cpu", Json::null())).unwrap();
    let t0 = Instant::now();
    let fast = node
        .submit(Operation::new("echo", Json::null()))
        .await
        .unwrap();
    assert_eq!(fast.status, OpStatus::Succeeded);
    assert!(
        t0.elapsed() < Duration::from_millis(250),
        "echo waited for the blocking handler"
    );
    assert_eq!(slow.await.status, OpStatus::Succeeded);
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_answers_from_cache_and_joins_in_flight() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let counted = move |op: Operation| {
        let r = r.clone();
        async move {
            r.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(op.payload)
        }
    };
    let node = Node::builder()
        .handler("work", counted)
        .start()
        .await
        .unwrap();
    // Ten at once with one key: one run, everyone gets its result.
    let tickets: Vec<_> = (0..10)
        .map(|_| {
            node.enqueue(Operation::new("work", json(7.into())).with_idempotency_key("k"))
                .unwrap()
        })
        .collect();
    let mut results = Vec::new();
    let mut cached = 0;
    for t in tickets {
        let id = t.id;
        let o = t.await;
        assert_eq!(o.status, OpStatus::Succeeded);
        assert_eq!(o.id, id, "each caller gets its own operation id");
        cached += o.cached as usize;
        results.push(o.result.unwrap());
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(cached, 9);
    assert!(results.iter().all(|r| *r == results[0]));
    // Later: answered from the stored result.
    let o = node
        .submit(Operation::new("work", json(7.into())).with_idempotency_key("k"))
        .await
        .unwrap();
    assert!(o.cached);
    assert_eq!(o.attempts, 0);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // The key with another payload is refused, not answered with the stored result.
    let o = node
        .submit(Operation::new("work", json(99.into())).with_idempotency_key("k"))
        .await
        .unwrap();
    assert_eq!(o.status, OpStatus::Failed);
    assert_eq!(o.error.as_deref(), Some(opmesh_actors::cache::KEY_REUSED));
    assert!(!o.cached);
    // Another owner's equal key is a key of its own: it runs.
    let o = node
        .submit(
            Operation::new("work", json(99.into()))
                .with_idempotency_key("k")
                .with_owner("other-app"),
        )
        .await
        .unwrap();
    assert_eq!((o.status, o.cached), (OpStatus::Succeeded, false));
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    // Another key runs.
    node.submit(Operation::new("work", json(1.into())).with_idempotency_key("other"))
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    // The cache stores a result when its completion message arrives, just after the answer.
    wait_for("the three results stored", Duration::from_secs(5), || {
        node.cache_stats().size == 3
    })
    .await;
    let c = node.cache_stats();
    assert_eq!((c.hits, c.misses, c.joined, c.size), (10, 3, 9, 3));
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_not_cached() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let node = Node::builder()
        .handler_with_retry(
            "fails",
            move |_op: Operation| {
                r.fetch_add(1, Ordering::SeqCst);
                async { Err::<Json, _>(HandlerError::fatal("no")) }
            },
            RetryPolicy::default(),
        )
        .start()
        .await
        .unwrap();
    for _ in 0..2 {
        let o = node
            .submit(Operation::new("fails", Json::null()).with_idempotency_key("k"))
            .await
            .unwrap();
        assert_eq!(o.status, OpStatus::Failed);
        assert!(!o.cached);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_pushes_back_and_frees_up() {
    let node = Node::builder()
        .config(small(1, 3))
        .handler("sleep", sleepy)
        .start()
        .await
        .unwrap();
    let running = node
        .enqueue(Operation::new("sleep", json(300.into())))
        .unwrap();
    wait_for("the first to run", Duration::from_secs(5), || {
        node.stats().active_operations == 1
    })
    .await;
    let queued: Vec<_> = (0..3)
        .map(|_| {
            node.enqueue(Operation::new("sleep", json(0.into())))
                .unwrap()
        })
        .collect();
    match node.enqueue(Operation::new("sleep", json(0.into()))) {
        Err(SubmitError::Overloaded {
            op_type,
            capacity,
            retry_after,
        }) => {
            assert_eq!((op_type.as_str(), capacity), ("sleep", 3));
            assert!(retry_after > Duration::ZERO);
        }
        other => panic!("expected Overloaded, got {:?}", other.map(|t| t.id)),
    }
    assert_eq!(running.await.status, OpStatus::Succeeded);
    for t in queued {
        assert_eq!(t.await.status, OpStatus::Succeeded);
    }
    // Room again.
    let o = node
        .submit(Operation::new("sleep", json(0.into())))
        .await
        .unwrap();
    assert_eq!(o.status, OpStatus::Succeeded);
    assert_eq!(node.stats().rejected_operations, 1);
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_types_and_bad_operations_are_refused() {
    let node = Node::builder().handler("echo", echo).start().await.unwrap();
    assert_eq!(
        node.submit(Operation::new("nope", Json::null()))
            .await
            .unwrap_err(),
        SubmitError::NoRoute {
            op_type: "nope".into()
        }
    );
    assert!(matches!(
        node.submit(Operation::new("", Json::null()))
            .await
            .unwrap_err(),
        SubmitError::Invalid { field: "type", .. }
    ));
    let big = Json::encode(&"x".repeat(2 << 20)).unwrap();
    assert!(matches!(
        node.submit(Operation::new("echo", big)).await.unwrap_err(),
        SubmitError::PayloadTooLarge { .. }
    ));
    let answers = node.enqueue_batch(
        vec![
            Operation::new("echo", json(1.into())),
            Operation::new("nope", Json::null()),
            Operation::new("echo", json(3.into())),
        ],
        false,
    );
    assert!(answers[1].is_err());
    let mut oks = Vec::new();
    for a in answers.into_iter().flatten() {
        oks.push(a.await.result.unwrap().as_str().to_owned());
    }
    assert_eq!(oks, ["1", "3"]);
    node.shutdown(Duration::from_secs(1)).await;
}

/// A batch waited for as one: its future ends once every accepted operation has, not
/// before, with each outcome in the batch's place and `None` where one was refused; a
/// batch with nothing accepted is answered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waited_batch_ends_when_its_last_accepted_operation_does() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let node = Node::builder()
        .handler("echo", echo)
        .handler("gated", gated(&gate))
        .start()
        .await
        .unwrap();
    let (accepted, outcomes) = node.enqueue_batch_waited(vec![
        Operation::new("echo", json(1.into())),
        Operation::new("nope", Json::null()),
        Operation::new("gated", json(2.into())),
        Operation::new("echo", json(3.into())),
    ]);
    assert!(accepted[0].is_ok() && accepted[2].is_ok() && accepted[3].is_ok());
    assert!(matches!(accepted[1], Err(SubmitError::NoRoute { .. })));
    let mut outcomes = Box::pin(outcomes);
    // Both echoes end; the gated operation cannot, so neither can the batch.
    wait_for("both echoes", Duration::from_secs(10), || {
        node.metrics().succeeded.get() == 2
    })
    .await;
    assert!(futures::poll!(outcomes.as_mut()).is_pending());
    gate.add_permits(1);
    let got = tokio::time::timeout(Duration::from_secs(10), outcomes)
        .await
        .expect("the batch ends once its last operation has");
    let results: Vec<Option<String>> = got
        .iter()
        .map(|o| {
            o.as_ref().map(|o| {
                assert_eq!(o.status, OpStatus::Succeeded, "{o:?}");
                o.result.as_ref().unwrap().as_str().to_owned()
            })
        })
        .collect();
    assert_eq!(
        results,
        [Some("1".into()), None, Some("2".into()), Some("3".into())]
    );

    let (accepted, outcomes) =
        node.enqueue_batch_waited(vec![Operation::new("nope", Json::null())]);
    assert!(accepted[0].is_err());
    assert_eq!(outcomes.await, [None]);
    node.shutdown(Duration::from_secs(1)).await;
}

/// The door of a batch looks a type up once for a run of it, but every operation still
/// takes a slot of its own type's queue: with room for one each, the first of each type
/// passes, whatever the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_batch_each_operation_takes_its_own_types_slot() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let node = Node::builder()
        .config(EngineConfig {
            shards: 1,
            ..small(1, 1)
        })
        .handler("echo", echo)
        .handler("gated", gated(&gate))
        .start()
        .await
        .unwrap();
    // One gated operation holds the only running slot; the next waits in its queue.
    let first = node
        .enqueue(Operation::new("gated", json(0.into())))
        .unwrap();
    wait_for("the first runs", Duration::from_secs(10), || {
        node.stats().active_operations == 1
    })
    .await;
    let answers = node.enqueue_batch(
        ["gated", "echo", "nope", "gated", "echo", "echo"]
            .into_iter()
            .map(|t| Operation::new(t, Json::null()))
            .collect(),
        false,
    );
    let refusals: Vec<&str> = answers
        .iter()
        .map(|a| match a {
            Ok(_) => "ok",
            Err(SubmitError::Overloaded { op_type, .. }) if op_type == "gated" => "gated full",
            Err(SubmitError::Overloaded { op_type, .. }) if op_type == "echo" => "echo full",
            Err(SubmitError::NoRoute { .. }) => "no route",
            Err(e) => panic!("{e:?}"),
        })
        .collect();
    assert_eq!(
        refusals,
        [
            "ok",
            "ok",
            "no route",
            "gated full",
            "echo full",
            "echo full"
        ]
    );
    gate.add_permits(2);
    assert!(first.await.is_success());
    for a in answers.into_iter().flatten() {
        assert!(a.await.is_success());
    }
    node.shutdown(Duration::from_secs(1)).await;
}

/// Operations forwarded here that end together reach their sink together (one lock of
/// the sink per group), each once, and the node counts them finished only once their
/// sink has them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_that_end_together_reach_their_sink_together() {
    #[derive(Default)]
    struct Groups(parking_lot::Mutex<Vec<Vec<OpId>>>);
    impl opmesh_actors::OutcomeSink for Groups {
        fn deliver(&self, o: OpOutcome) {
            self.deliver_all(vec![o]);
        }
        fn deliver_all(&self, outcomes: Vec<OpOutcome>) {
            for o in &outcomes {
                assert_eq!(o.status, OpStatus::Succeeded, "{o:?}");
            }
            self.0.lock().push(outcomes.iter().map(|o| o.id).collect());
        }
    }
    let node = Node::builder()
        .config(EngineConfig {
            shards: 1,
            ..small(64, 100)
        })
        .handler("echo", echo)
        .start()
        .await
        .unwrap();
    let groups = Arc::new(Groups::default());
    let sink: Arc<dyn opmesh_actors::OutcomeSink> = groups.clone();
    let ops: Vec<Operation> = (0..20)
        .map(|i| Operation::new("echo", json(i.into())))
        .collect();
    let mut ids: Vec<OpId> = ops.iter().map(|o| o.id).collect();
    let accepted = node.enqueue_forwarded(ops.into_iter(), &sink);
    assert!(accepted.iter().all(Result::is_ok));
    wait_for("every outcome delivered", Duration::from_secs(10), || {
        groups.0.lock().iter().map(Vec::len).sum::<usize>() == 20
    })
    .await;
    wait_for("none in flight", Duration::from_secs(10), || {
        node.in_flight() == 0
    })
    .await;
    let groups = groups.0.lock().clone();
    assert!(groups.iter().any(|g| g.len() > 1), "{groups:?}");
    let mut got: Vec<OpId> = groups.concat();
    got.sort();
    ids.sort();
    assert_eq!(got, ids, "each once");
    node.shutdown(Duration::from_secs(1)).await;
}

fn any_node() -> Route {
    Route {
        strategy: Strategy::RoundRobin,
        nodes: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_are_only_for_served_types_and_at_most_max_routes() {
    let node = Node::builder()
        .config(EngineConfig {
            max_routes: 1,
            ..EngineConfig::default()
        })
        .handler("echo", echo)
        .handler("sleepy", sleepy)
        .start()
        .await
        .unwrap();
    assert_eq!(
        node.set_route("nope", any_node()).await,
        Err(RouteError::NoRoute {
            op_type: "nope".into(),
            served: vec!["echo".into(), "sleepy".into()],
        })
    );
    node.set_route("echo", any_node()).await.unwrap();
    // Replacing the one route is fine; a second one is past max_routes.
    node.set_route("echo", any_node()).await.unwrap();
    assert_eq!(
        node.set_route("sleepy", any_node()).await,
        Err(RouteError::TooManyRoutes {
            op_type: "sleepy".into(),
            max: 1
        })
    );
    node.remove_route("echo").await.unwrap();
    node.set_route("sleepy", any_node()).await.unwrap();
    node.shutdown(Duration::from_secs(1)).await;
}

/// Forwards nothing: the jobs it is handed fail (on drop) with a reason.
struct Nowhere;

impl Forwarder for Nowhere {
    fn forward(&self, _: &NodeId, jobs: Vec<Box<Job>>) {
        drop(jobs);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_type_loses_its_metrics_entry_once_nothing_routes_it() {
    let view = |id: &str, serves: &[&str]| NodeView {
        id: id.into(),
        healthy: true,
        serves: serves.iter().map(|&t| t.into()).collect(),
        load: 0,
        overloaded: Vec::new(),
        congested: false,
        open_breakers: Vec::new(),
    };
    // `ghost` has a route (from before routes needed a serving node) that nothing serves;
    // `hook` is served by the peer.
    let table = RoutingTable {
        version: 1,
        routes: [(
            "ghost".into(),
            Route {
                strategy: Strategy::Pinned,
                nodes: vec!["peer".into()],
            },
        )]
        .into(),
        nodes: vec![view("node-1", &["echo"]), view("peer", &["hook"])],
    };
    let node = Node::builder()
        .handler("echo", echo)
        .route_store(Arc::new(LocalRoutes::new(table)))
        .forwarder(Arc::new(Nowhere))
        .start()
        .await
        .unwrap();
    for t in ["ghost", "hook"] {
        let o = node.submit(Operation::new(t, Json::null())).await.unwrap();
        assert_eq!(o.status, OpStatus::Failed, "{t}: forwarded nowhere");
    }
    let types = || {
        node.type_entries()
            .iter()
            .map(|e| e.name.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(types(), ["echo", "ghost", "hook"]);
    node.remove_route("ghost").await.unwrap();
    assert_eq!(types(), ["echo", "hook"]);
    assert!(!node.stats().per_type.contains_key("ghost"));
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_runs_first() {
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let o2 = order.clone();
    let record = move |op: Operation| {
        let o = o2.clone();
        async move {
            o.lock().push(op.priority);
            tokio::time::sleep(Duration::from_millis(if op.priority == 100 {
                200
            } else {
                1
            }))
            .await;
            Ok(Json::null())
        }
    };
    let node = Node::builder()
        .config(small(1, 100))
        .handler("p", record)
        .start()
        .await
        .unwrap();
    // A blocker holds the only slot while the others queue up.
    let blocker = node
        .enqueue(Operation::new("p", Json::null()).with_priority(100))
        .unwrap();
    wait_for("the blocker to run", Duration::from_secs(5), || {
        node.stats().active_operations == 1
    })
    .await;
    let ts: Vec<_> = [1, 5, -3, 5, 9]
        .iter()
        .map(|p| {
            node.enqueue(Operation::new("p", Json::null()).with_priority(*p))
                .unwrap()
        })
        .collect();
    blocker.await;
    for t in ts {
        t.await;
    }
    assert_eq!(*order.lock(), vec![100, 9, 5, 5, 1, -3]);
    node.shutdown(Duration::from_secs(1)).await;
}

/// The Executor reads the clock once per operation: the end of one that finished in its
/// first poll is when the next starts. Each operation's `execute` stage is its own run,
/// and what waited behind a slow one in its batch counts as `queue`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_batch_each_operation_is_timed_from_its_own_start() {
    const SLOW_MS: u64 = 60;
    // Busy in its first poll (no await), so both run in one pass over the batch.
    let burn = |op: Operation| async move {
        let ms: u64 = op.payload.decode().unwrap_or(0);
        std::thread::sleep(Duration::from_millis(ms));
        Ok(Json::null())
    };
    let node = Node::builder()
        .config(EngineConfig {
            batch: BatchPolicy {
                batch_size: 16,
                // Both wait for one batch rather than going one by one.
                batch_flush: Duration::from_millis(50),
                max_concurrent: 16,
            },
            shards: 1,
            ..EngineConfig::default()
        })
        .handler("burn", burn)
        .start()
        .await
        .unwrap();
    let ops = vec![
        Operation::new("burn", json(serde_json::json!(SLOW_MS))),
        Operation::new("burn", json(serde_json::json!(0))),
    ];
    for t in node.enqueue_batch(ops, false) {
        assert_eq!(t.unwrap().await.status, OpStatus::Succeeded);
    }
    let entry = node
        .type_entries()
        .into_iter()
        .find(|e| &*e.name == "burn")
        .unwrap();
    let stages = &entry.metrics.stages;
    let (execute, queue) = (stages.execute.snapshot(), stages.queue.snapshot());
    assert_eq!((execute.count, queue.count), (2, 2));
    let ms = |ns: u64| ns as f64 / 1e6;
    // The fast one is not timed from the start of the slow one: the two runs together
    // take about SLOW_MS, not twice that.
    assert!(
        ms(execute.sum) >= SLOW_MS as f64 && ms(execute.sum) < 1.5 * SLOW_MS as f64,
        "execute stage sum {} ms",
        ms(execute.sum)
    );
    // The fast one waited for the slow one to run.
    assert!(
        ms(queue.sum) >= SLOW_MS as f64,
        "queue stage sum {} ms",
        ms(queue.sum)
    );
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_is_never_exceeded() {
    let now = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (n2, p2) = (now.clone(), peak.clone());
    let h = move |_op: Operation| {
        let (n, p) = (n2.clone(), p2.clone());
        async move {
            let c = n.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(c, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(2)).await;
            n.fetch_sub(1, Ordering::SeqCst);
            Ok(Json::null())
        }
    };
    let node = Node::builder()
        .config(small(4, 10_000))
        .handler("h", h)
        .start()
        .await
        .unwrap();
    let ts: Vec<_> = (0..200)
        .map(|_| node.enqueue(Operation::new("h", Json::null())).unwrap())
        .collect();
    for t in ts {
        assert_eq!(t.await.status, OpStatus::Succeeded);
    }
    assert_eq!(peak.load(Ordering::SeqCst), 4);
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracked_operations_show_their_progress() {
    let node = Node::builder()
        .handler("sleep", sleepy)
        .start()
        .await
        .unwrap();
    let t = node
        .enqueue_tracked(Operation::new("sleep", json(200.into())))
        .unwrap();
    let id = t.id;
    wait_for("running", Duration::from_secs(5), || {
        node.status(&id).unwrap().status() == OpStatus::Running
    })
    .await;
    assert!(node.status(&id).unwrap().outcome().is_none());
    t.await;
    let rec = node.status(&id).unwrap();
    assert_eq!(rec.status(), OpStatus::Succeeded);
    assert_eq!(
        rec.outcome().unwrap().result.as_ref().unwrap().as_str(),
        "200"
    );
    assert!(node.status(&opmesh_actors::OpId::new()).is_none());
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_actors_are_restarted_and_counted() {
    let node = Node::builder()
        .handler("echo", echo)
        .handler("sleep", sleepy)
        .start()
        .await
        .unwrap();
    for kind in [
        ChildKind::Router,
        ChildKind::Scheduler,
        ChildKind::Cache,
        ChildKind::Executor,
    ] {
        // Work held by the actor when it dies completes (failed with a reason) or runs.
        let held: Vec<_> = (0..50)
            .map(|i| {
                node.enqueue(
                    Operation::new("sleep", json(20.into()))
                        .with_idempotency_key(format!("{kind:?}{i}")),
                )
                .unwrap()
            })
            .collect();
        let before = node.stats().actor_restarts;
        let before_kind = node.metrics().actor_restarts_of(kind);
        node.kill_actor(kind);
        wait_for("the restart", Duration::from_secs(5), || {
            node.stats().actor_restarts == before + 1
        })
        .await;
        assert_eq!(
            node.metrics().actor_restarts_of(kind),
            before_kind + 1,
            "{kind:?}: the restart is counted for its kind"
        );
        for t in held {
            let o = tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("no operation hangs");
            assert!(
                o.status == OpStatus::Succeeded
                    || o.error.as_deref().is_some_and(|e| e.contains("lost")),
                "{kind:?}: {o:?}"
            );
        }
        // And the node works afterwards.
        let mut ok = false;
        for _ in 0..100 {
            if node
                .submit(Operation::new("echo", Json::null()))
                .await
                .unwrap()
                .is_success()
            {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(ok, "{kind:?}: node works after the restart");
    }
    assert_eq!(node.stats().actor_restarts, 4);
    for kind in ChildKind::ALL {
        assert_eq!(node.metrics().actor_restarts_of(kind), 1, "{kind:?}");
    }
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_then_fails_what_is_left_with_a_reason() {
    let node = Node::builder()
        .handler("sleep", sleepy)
        .start()
        .await
        .unwrap();
    let short = node
        .enqueue(Operation::new("sleep", json(100.into())))
        .unwrap();
    let long = node
        .enqueue(Operation::new("sleep", json(5000.into())))
        .unwrap();
    let n2 = node.clone();
    let stop = tokio::spawn(async move { n2.shutdown(Duration::from_millis(400)).await });
    wait_for("draining", Duration::from_secs(5), || !node.is_accepting()).await;
    assert_eq!(
        node.submit(Operation::new("sleep", json(0.into())))
            .await
            .unwrap_err(),
        SubmitError::ShuttingDown
    );
    assert_eq!(short.await.status, OpStatus::Succeeded);
    let o = long.await;
    assert_eq!(o.status, OpStatus::Failed);
    assert!(o.error.unwrap().contains("shut down"), "reason given");
    assert_eq!(
        stop.await.unwrap(),
        1,
        "one operation was left at the end of the grace period"
    );
}

/// A batch's future can be shared between threads, as any future of the engine's.
#[test]
fn a_batch_future_is_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<opmesh_actors::BatchOutcomes>();
    send_sync::<opmesh_actors::Ticket>();
}
