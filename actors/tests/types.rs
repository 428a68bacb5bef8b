//! Per-type limits on a real engine: a slow type holds only its own running slots (or
//! its share of the shared ones), whatever the shard; each type's queue, deadline cap and
//! rate limit refuse at the door; a failing type's breaker opens, refuses at once, lets
//! trials through after `open_for` and closes when they succeed, with events.

mod common;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::wait_for;
use opmesh_actors::events::{Event, EventKind, Kinds, Received};
use opmesh_actors::{
    BatchPolicy, BreakerPolicy, BreakerSetting, BreakerState, EngineConfig, HandlerError, Json,
    Node, OpStatus, Operation, RateLimit, RetryPolicy, StartError, SubmitError, TypeSettings,
};

async fn echo(op: Operation) -> Result<Json, HandlerError> {
    Ok(op.payload)
}

fn config(max_concurrent: usize, shards: usize, types: &[(&str, TypeSettings)]) -> EngineConfig {
    EngineConfig {
        shards,
        batch: BatchPolicy {
            batch_size: 16,
            batch_flush: Duration::ZERO,
            max_concurrent,
        },
        types: types
            .iter()
            .map(|(t, s)| (t.to_string(), s.clone()))
            .collect::<BTreeMap<_, _>>(),
        ..EngineConfig::default()
    }
}

/// A handler that counts how many of it run at once and waits at `gate` until the test
/// opens it.
fn gated(
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::Semaphore>,
) -> impl Fn(Operation) -> futures::future::BoxFuture<'static, Result<Json, HandlerError>>
       + Send
       + Sync
       + 'static {
    move |_op| {
        let (r, p, g) = (running.clone(), peak.clone(), gate.clone());
        Box::pin(async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            let _pass = g.acquire().await.unwrap();
            r.fetch_sub(1, Ordering::SeqCst);
            Ok(Json::null())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_type_on_its_share_does_not_starve_the_others() {
    let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    // Eight slots, no tables: each type may hold half of them, on any shard.
    let node = Node::builder()
        .config(config(8, 4, &[]))
        .handler("slow", gated(running.clone(), peak.clone(), gate.clone()))
        .handler("echo", echo)
        .start()
        .await
        .unwrap();
    let slow: Vec<_> = (0..100)
        .map(|i| {
            node.enqueue(Operation::new("slow", Json::null()).with_key(format!("k{i}")))
                .unwrap()
        })
        .collect();
    wait_for(
        "the slow type on its four slots",
        Duration::from_secs(5),
        || running.load(Ordering::SeqCst) == 4,
    )
    .await;
    let stats = node.stats();
    assert_eq!(stats.per_type["slow"].running, 4);
    assert_eq!(stats.per_type["slow"].max_concurrent, 4);
    assert!(!stats.per_type["slow"].own_slots);
    assert_eq!((stats.slots.shared, stats.slots.per_type), (8, 4));
    // Echo runs at once, many times over, while 96 slow operations wait.
    let t0 = Instant::now();
    for i in 0..200 {
        let o = node
            .submit(Operation::new("echo", Json::encode(&i).unwrap()).with_key(format!("e{i}")))
            .await
            .unwrap();
        assert_eq!(o.status, OpStatus::Succeeded);
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "echo took {:?}",
        t0.elapsed()
    );
    assert_eq!(running.load(Ordering::SeqCst), 4, "still four slow ones");
    gate.add_permits(1000);
    for t in slow {
        assert_eq!(t.await.status, OpStatus::Succeeded);
    }
    assert_eq!(peak.load(Ordering::SeqCst), 4, "never more than its share");
    wait_for("every slot back", Duration::from_secs(5), || {
        node.running() == 0
    })
    .await;
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_type_keeps_its_own_slots_across_shards() {
    let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let own = TypeSettings {
        max_concurrent: Some(3),
        ..TypeSettings::default()
    };
    // Ten slots: three are the hook's alone, seven are shared (one type may hold four).
    let node = Node::builder()
        .config(config(10, 4, &[("hook", own)]))
        .handler("hook", gated(running.clone(), peak.clone(), gate.clone()))
        .handler("echo", echo)
        .start()
        .await
        .unwrap();
    let hooks: Vec<_> = (0..40)
        .map(|i| {
            node.enqueue(Operation::new("hook", Json::null()).with_key(format!("k{i}")))
                .unwrap()
        })
        .collect();
    wait_for("three hooks running", Duration::from_secs(5), || {
        running.load(Ordering::SeqCst) == 3
    })
    .await;
    let s = node.stats();
    assert_eq!((s.slots.shared, s.slots.per_type), (7, 4));
    assert_eq!(s.per_type["hook"].max_concurrent, 3);
    assert!(s.per_type["hook"].own_slots);
    assert_eq!(s.slots.shared_running, 0, "the hook's slots are its own");
    assert_eq!(
        node.submit(Operation::new("echo", Json::null()))
            .await
            .unwrap()
            .status,
        OpStatus::Succeeded
    );
    gate.add_permits(1000);
    for t in hooks {
        assert_eq!(t.await.status, OpStatus::Succeeded);
    }
    assert_eq!(peak.load(Ordering::SeqCst), 3);
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn own_slots_must_fit_in_max_concurrent() {
    let t = |n| TypeSettings {
        max_concurrent: Some(n),
        ..TypeSettings::default()
    };
    let err = Node::builder()
        .config(config(10, 1, &[("a", t(6)), ("b", t(5))]))
        .handler("a", echo)
        .start()
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(&err, StartError::Config(m) if m.contains("11") && m.contains("(10)")),
        "{err}"
    );
    // All ten taken by `a`: `echo`, without slots of its own, would never run.
    let err = Node::builder()
        .config(config(10, 1, &[("a", t(10))]))
        .handler("a", echo)
        .handler("echo", echo)
        .start()
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(&err, StartError::Config(m) if m.contains("`echo`")),
        "{err}"
    );
}

#[tokio::test]
async fn a_type_refuses_past_its_queue_and_deadline_caps() {
    let settings = TypeSettings {
        max_concurrent: Some(1),
        queue_capacity: Some(2),
        max_deadline: Some(Duration::from_secs(5)),
        ..TypeSettings::default()
    };
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let counts = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let node = Node::builder()
        .config(config(16, 1, &[("t", settings)]))
        .handler("t", gated(counts.0.clone(), counts.1.clone(), gate.clone()))
        .handler("echo", echo)
        .start()
        .await
        .unwrap();
    let over = Operation::new("t", Json::null()).with_timeout(Duration::from_secs(6));
    match node.enqueue(over) {
        Err(SubmitError::Invalid { field, reason }) => {
            assert_eq!(field, "deadline_ms");
            assert!(
                reason.contains("5000 ms") && reason.contains("types.t.max_deadline_ms"),
                "{reason}"
            );
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("accepted"),
    }
    // Other types keep the node's cap.
    assert!(node
        .enqueue(Operation::new("echo", Json::null()).with_timeout(Duration::from_secs(60)))
        .is_ok());
    // One runs, two wait, the fourth is refused.
    let first = node.enqueue(Operation::new("t", Json::null())).unwrap();
    wait_for("the first one running", Duration::from_secs(5), || {
        counts.0.load(Ordering::SeqCst) == 1
    })
    .await;
    let waiting: Vec<_> = (0..2)
        .map(|_| node.enqueue(Operation::new("t", Json::null())).unwrap())
        .collect();
    match node.enqueue(Operation::new("t", Json::null())) {
        Err(SubmitError::Overloaded { capacity, .. }) => assert_eq!(capacity, 2),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("accepted past the type's queue"),
    }
    assert!(node.enqueue(Operation::new("echo", Json::null())).is_ok());
    gate.add_permits(10);
    assert!(first.await.is_success());
    for t in waiting {
        assert!(t.await.is_success());
    }
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_type_over_its_rate_is_refused_with_the_wait() {
    let rate = TypeSettings {
        rate: Some(RateLimit {
            per_sec: NonZeroU32::new(10).unwrap(),
            burst: NonZeroU32::new(5).unwrap(),
        }),
        ..TypeSettings::default()
    };
    let node = Node::builder()
        .config(config(16, 1, &[("t", rate)]))
        .handler("t", echo)
        .handler("echo", echo)
        .start()
        .await
        .unwrap();
    let mut accepted = 0;
    let mut refused = None;
    for _ in 0..20 {
        match node.enqueue(Operation::new("t", Json::null())) {
            Ok(_) => accepted += 1,
            Err(e) => refused = Some(e),
        }
    }
    // The burst, perhaps one more if a tenth of a second passed.
    assert!((5..=6).contains(&accepted), "{accepted} accepted");
    match refused {
        Some(SubmitError::RateLimited {
            op_type,
            per_sec,
            burst,
            retry_after,
        }) => {
            assert_eq!((op_type.as_str(), per_sec, burst), ("t", 10, 5));
            assert!(retry_after <= Duration::from_millis(100), "{retry_after:?}");
        }
        other => panic!("{other:?}"),
    }
    // Other types are not limited.
    for _ in 0..20 {
        assert!(node.enqueue(Operation::new("echo", Json::null())).is_ok());
    }
    // Forwarded operations were admitted under the origin's rate.
    struct Count(AtomicUsize);
    impl opmesh_actors::OutcomeSink for Count {
        fn deliver(&self, o: opmesh_actors::OpOutcome) {
            assert_eq!(o.status, opmesh_actors::OpStatus::Succeeded, "{o:?}");
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    let done = Arc::new(Count(AtomicUsize::new(0)));
    let sink: Arc<dyn opmesh_actors::OutcomeSink> = done.clone();
    for _ in 0..10 {
        assert!(node
            .enqueue_forwarded([Operation::new("t", Json::null())].into_iter(), &sink)
            .remove(0)
            .is_ok());
    }
    wait_for(
        "the sink heard every outcome",
        Duration::from_secs(10),
        || done.0.load(Ordering::SeqCst) == 10,
    )
    .await;
    node.shutdown(Duration::from_secs(1)).await;
}

fn breaker(open_ms: u64) -> BreakerPolicy {
    BreakerPolicy {
        failures: 5,
        window: Duration::from_secs(60),
        open_for: Duration::from_millis(open_ms),
        half_open_calls: 3,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_type_opens_its_breaker_then_trials_close_it() {
    let healthy = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    // Healthy runs wait here until the test lets them answer.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (h, c, g) = (healthy.clone(), calls.clone(), gate.clone());
    let settings = TypeSettings {
        breaker: BreakerSetting::Enabled(breaker(300)),
        ..TypeSettings::default()
    };
    let node = Node::builder()
        .config(config(16, 2, &[("hook", settings)]))
        .handler_with_retry(
            "hook",
            move |_op: Operation| {
                let (h, c, g) = (h.clone(), c.clone(), g.clone());
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    if h.load(Ordering::SeqCst) {
                        let _pass = g.acquire().await.unwrap();
                        Ok(Json::null())
                    } else {
                        Err(HandlerError::retryable("down"))
                    }
                }
            },
            RetryPolicy {
                max_attempts: 2,
                initial_backoff: Duration::from_millis(1),
                ..RetryPolicy::default()
            },
        )
        .handler("bad", |_op: Operation| async {
            Err(HandlerError::fatal("bad payload"))
        })
        .start()
        .await
        .unwrap();
    let events = node.events().subscribe(
        Kinds::of([EventKind::BreakerOpened, EventKind::BreakerClosed]),
        16,
    );
    // Non-retryable failures say nothing about the handler's health.
    for _ in 0..10 {
        let o = node
            .submit(Operation::new("bad", Json::null()))
            .await
            .unwrap();
        assert_eq!(o.status, OpStatus::Failed);
    }
    assert!(node.enqueue(Operation::new("bad", Json::null())).is_ok());
    // Five failures (each after its retry) open the hook's breaker.
    for _ in 0..5 {
        let o = node
            .submit(Operation::new("hook", Json::null()))
            .await
            .unwrap();
        assert_eq!((o.status, o.attempts), (OpStatus::Failed, 2));
    }
    assert_eq!(calls.load(Ordering::SeqCst), 10);
    let t0 = Instant::now();
    match node.enqueue(Operation::new("hook", Json::null())) {
        Err(SubmitError::CircuitOpen {
            op_type,
            breaker,
            retry_after,
        }) => {
            assert_eq!((op_type.as_str(), breaker), ("hook", None));
            assert!(retry_after <= Duration::from_millis(300), "{retry_after:?}");
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("accepted while open"),
    }
    assert!(t0.elapsed() < Duration::from_millis(10), "refused at once");
    assert_eq!(calls.load(Ordering::SeqCst), 10, "nothing ran");
    let b = &node.stats().breakers;
    let hook = b.iter().find(|b| b.name == "hook").unwrap();
    assert_eq!((hook.state, hook.failures), (BreakerState::Open, 5));
    assert_eq!(
        node.stats().per_type["hook"].breaker,
        Some(BreakerState::Open)
    );
    match tokio::time::timeout(Duration::from_secs(5), events.next()).await {
        Ok(Received::Event(e)) => match &*e {
            Event::Breaker {
                breaker,
                types,
                state,
                failures,
                retry_at,
                ..
            } => {
                assert_eq!(breaker, "hook");
                assert_eq!(types.iter().map(|t| &**t).collect::<Vec<_>>(), ["hook"]);
                assert_eq!((*state, *failures), (BreakerState::Open, Some(5)));
                assert!(retry_at.is_some());
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }

    // Healthy again: after open_for, three trials go through and close it.
    healthy.store(true, Ordering::SeqCst);
    let mut trials = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while trials.is_empty() {
        assert!(Instant::now() < deadline, "still open");
        match node.enqueue(Operation::new("hook", Json::null())) {
            Ok(t) => trials.push(t),
            Err(SubmitError::CircuitOpen { retry_after, .. }) => {
                tokio::time::sleep(retry_after.min(Duration::from_millis(50))).await
            }
            Err(other) => panic!("{other}"),
        }
    }
    trials.push(node.enqueue(Operation::new("hook", Json::null())).unwrap());
    trials.push(node.enqueue(Operation::new("hook", Json::null())).unwrap());
    assert!(
        matches!(
            node.enqueue(Operation::new("hook", Json::null())),
            Err(SubmitError::CircuitOpen { .. })
        ),
        "three trials at most while half-open"
    );
    gate.add_permits(100);
    for t in trials {
        assert!(t.await.is_success());
    }
    match tokio::time::timeout(Duration::from_secs(5), events.next()).await {
        Ok(Received::Event(e)) => {
            assert_eq!(e.kind(), EventKind::BreakerClosed);
            assert!(matches!(&*e, Event::Breaker { breaker, .. } if breaker == "hook"));
        }
        other => panic!("{other:?}"),
    }
    assert!(node
        .submit(Operation::new("hook", Json::null()))
        .await
        .unwrap()
        .is_success());
    assert_eq!(
        node.stats().per_type["hook"].breaker,
        Some(BreakerState::Closed)
    );
    node.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn types_of_one_group_share_their_breaker() {
    let group = TypeSettings {
        breaker: BreakerSetting::Enabled(breaker(60_000)),
        breaker_group: Some("http://target/hook".into()),
        ..TypeSettings::default()
    };
    let down = |_op: Operation| async { Err(HandlerError::retryable("down")) };
    let mut c = config(16, 1, &[("a", group.clone()), ("b", group)]);
    c.retry.max_attempts = 1;
    let node = Node::builder()
        .config(c)
        .handler("a", down)
        .handler("b", down)
        .handler("echo", echo)
        .start()
        .await
        .unwrap();
    for i in 0..5 {
        let t = if i % 2 == 0 { "a" } else { "b" };
        assert_eq!(
            node.submit(Operation::new(t, Json::null()))
                .await
                .unwrap()
                .status,
            OpStatus::Failed
        );
    }
    for t in ["a", "b"] {
        match node.enqueue(Operation::new(t, Json::null())) {
            Err(e @ SubmitError::CircuitOpen { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("`{t}`")) && msg.contains("http://target/hook"),
                    "{msg}"
                );
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("{t} accepted"),
        }
    }
    let stats = node.stats();
    let shared: Vec<_> = stats
        .breakers
        .iter()
        .filter(|b| b.types.len() == 2)
        .collect();
    assert_eq!(shared.len(), 1);
    assert_eq!(shared[0].name, "http://target/hook");
    assert_eq!(shared[0].state, BreakerState::Open);
    // Echo has a breaker of its own (the node's default), closed.
    assert_eq!(stats.per_type["echo"].breaker, Some(BreakerState::Closed));
    assert!(node
        .submit(Operation::new("echo", Json::null()))
        .await
        .is_ok());
    node.shutdown(Duration::from_secs(1)).await;
}
