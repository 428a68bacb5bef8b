//! Microbenchmarks of the engine's pure cores: the routing pick, the result cache, the
//! scheduler's queues and the rate limiters. Prints nanoseconds per operation; run with
//! `cargo bench --bench micro`.

use std::hint::black_box;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opmesh::cache::{CacheCounters, CacheKey, Lookup, ResultCache};
use opmesh::ratelimit::{KeyedLimiter, Limiter, Rate};
use opmesh::routing::{pick, NodeView, Route, RoutingTable, Strategy};
use opmesh::scheduler::{BatchPolicy, Queued, Queues};
use opmesh::{OpId, OpOutcome, OpStatus, OpType};

fn measure(name: &str, n: u64, mut f: impl FnMut(u64)) {
    // Warm up, then time.
    for i in 0..n / 10 {
        f(i);
    }
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    println!("{name:<44} {ns:>8.1} ns/op");
}

fn table(n: usize, strategy: Option<Strategy>) -> RoutingTable {
    let mut t = RoutingTable {
        version: 1,
        routes: Default::default(),
        nodes: (0..n)
            .map(|i| NodeView {
                id: format!("node-{i}").into(),
                healthy: true,
                serves: vec!["echo".into()],
                load: i as u64,
                overloaded: Vec::new(),
                congested: false,
                open_breakers: Vec::new(),
            })
            .collect(),
    };
    if let Some(s) = strategy {
        t.routes.insert(
            "echo".into(),
            Route {
                strategy: s,
                nodes: vec![],
            },
        );
    }
    t
}

struct Item(Instant);

impl Queued for Item {
    fn priority(&self) -> i32 {
        0
    }
    fn deadline(&self) -> Instant {
        self.0
    }
}

fn main() {
    let keys: Vec<String> = (0..1024).map(|i| format!("user-{i}")).collect();
    for (label, s) in [
        ("round_robin", Strategy::RoundRobin),
        ("least_loaded", Strategy::LeastLoaded),
        ("consistent_hash", Strategy::ConsistentHash),
        ("pinned", Strategy::Pinned),
    ] {
        for nodes in [1, 5] {
            let t = table(nodes, Some(s));
            let mut rr = 0;
            measure(
                &format!("routing pick {label}, {nodes} node(s)"),
                2_000_000,
                |i| {
                    black_box(
                        pick(&t, "echo", Some(&keys[(i & 1023) as usize]), None, &mut rr).ok(),
                    );
                },
            );
        }
    }

    let counters = Arc::new(CacheCounters::default());
    let mut cache: ResultCache<u64> = ResultCache::new(
        NonZeroUsize::new(100_000).unwrap(),
        Duration::from_secs(300),
        counters,
    );
    let now = Instant::now();
    let ty: OpType = "echo".into();
    let outcome = OpOutcome::new(OpId::new(), OpStatus::Succeeded);
    let key = |k: &str| CacheKey {
        op_type: ty.clone(),
        owner: None,
        key: k.into(),
    };
    for k in &keys {
        if let Lookup::Miss(_) = cache.lookup(key(k), 0, 0, now) {
            cache.complete(key(k), &outcome, now);
        }
    }
    measure("cache lookup, hit", 2_000_000, |i| {
        let key = key(&keys[(i & 1023) as usize]);
        black_box(matches!(cache.lookup(key, 0, i, now), Lookup::Hit(..)));
    });

    let mut q: Queues<Item> = Queues::new(BatchPolicy {
        batch_size: 256,
        batch_flush: Duration::ZERO,
        max_concurrent: 1 << 20,
    });
    let far = now + Duration::from_secs(3600);
    measure(
        "scheduler push + dispatch (batches of 256)",
        2_000_000,
        |i| {
            q.push(&ty, Item(far), now);
            if i % 256 == 255 {
                black_box(q.dispatch(now, |_, n| n).batches.len());
            }
        },
    );

    // A limit high enough that every check passes: what an admitted submission pays.
    let high = Rate::new(10_000_000, 10_000_000).unwrap();
    let global = Limiter::new(high);
    measure("rate limit check, one limiter", 2_000_000, |_| {
        black_box(global.check_n(1).is_ok());
    });
    let per_client: KeyedLimiter<Arc<str>> = KeyedLimiter::new(high, 100_000);
    let clients: Vec<Arc<str>> = keys.iter().map(|k| Arc::from(k.as_str())).collect();
    measure(
        "rate limit check, per client (1024 clients)",
        2_000_000,
        |i| {
            black_box(per_client.check_n(&clients[(i & 1023) as usize], 1).is_ok());
        },
    );
}
