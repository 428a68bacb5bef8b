//! A cluster of real `opmesh` processes on 127.0.0.1: routes replicated by Raft,
//! operations run on their owner, and the faults a cluster must survive: the owner killed
//! under load (waiting requests), a node restarted with its data dir, garbage on the
//! cluster port, a node leaving, and an ignored soak. What happens to accepted operations
//! under faults (owner, leader, origin killed, partitions, link cuts, bounded shutdown,
//! chaos) is in `tests/delivery.rs`.
//!
//! Every wait is on a condition with a deadline.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{
    get, route_on, sees_up, set_route, start, submit_wait, three_nodes, three_nodes_with, try_get,
    NodeSpec, ADMIN_TOKEN,
};
use common::{client, wait_until, Server};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_set_on_one_node_is_seen_by_all_and_operations_run_on_the_owner() {
    let (s, _) = three_nodes(None).await;
    let c = get(&s[0], "/v1/cluster").await;
    let roles: Vec<&str> = c["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["role"].as_str().unwrap())
        .collect();
    assert_eq!(roles.iter().filter(|r| **r == "voter").count(), 3, "{c}");
    assert!(c["term"].as_u64().unwrap() >= 1);
    assert!(c["last_applied_index"].as_u64().is_some());

    // Written on node-3 (a follower or the leader: either way it reaches the leader).
    let r = set_route(&s[2], "echo", "pinned", &["node-2"]).await;
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    for n in &s {
        wait_until(
            "the route on every node",
            Duration::from_secs(5),
            || async {
                route_on(n, "echo").await == Some(("pinned".into(), vec!["node-2".into()]))
            },
        )
        .await;
    }
    // Submitted to node-1, run by node-2.
    for _ in 0..20 {
        let (code, v) = submit_wait(&s[0], json!({"type": "echo", "payload": {"x": 1}})).await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["status"], "succeeded", "{v}");
        assert_eq!(v["executed_by"], "node-2", "{v}");
        assert_eq!(v["result"], json!({"x": 1}));
    }
    // A batch too.
    let r = client()
        .post(s[2].url("/v1/ops/batch?wait=true"))
        .json(&json!({"ops": (0..100).map(|i| json!({"type": "echo", "payload": i})).collect::<Vec<_>>()}))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 100);
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["executed_by"], "node-2", "{r}");
        assert_eq!(r["result"], json!(i));
    }
    // The CLI against any node.
    let (code, out, err) = common::cli(&["cluster", "status", "--target", &s[1].base]);
    assert_eq!(code, 0, "{err}");
    for n in ["node-1", "node-2", "node-3"] {
        assert!(out.contains(n), "{out}");
    }
    assert!(out.starts_with("leader node-"), "{out}");
    let (code, out, _) = common::cli(&["routes", "list", "--target", &s[2].base]);
    assert_eq!(code, 0);
    assert!(out.contains("echo") && out.contains("node-2"), "{out}");
    let (code, _, err) = common::cli(&["cluster", "join", "127.0.0.1:1", "--target", &s[0].base]);
    assert_ne!(code, 0);
    assert!(err.contains("already_member"), "{err}");
    // A route naming an unknown node is refused, naming it.
    let r = set_route(&s[0], "echo", "pinned", &["node-9"]).await;
    assert_eq!(r.status(), 409);
    assert!(r.text().await.unwrap().contains("node-9"));
    // An idempotency key has one owner in the cluster whatever the strategy: repeats sent
    // to any node, round robin over two owners, are answered by the first run.
    let r = set_route(&s[0], "echo", "round_robin", &["node-2", "node-3"]).await;
    assert_eq!(r.status(), 200);
    for n in &s {
        wait_until(
            "the round robin route everywhere",
            Duration::from_secs(5),
            || async {
                route_on(n, "echo")
                    .await
                    .is_some_and(|(strategy, _)| strategy == "round_robin")
            },
        )
        .await;
    }
    let mut ran_on = std::collections::BTreeSet::new();
    let mut first_id = None;
    for i in 0..12 {
        let body = json!({"type": "echo", "payload": {"order": 7}, "idempotency_key": "order-7"});
        let (code, v) = submit_wait(&s[i % 3], body).await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["status"], "succeeded", "{v}");
        ran_on.insert(v["executed_by"].as_str().unwrap().to_owned());
        match &first_id {
            None => {
                assert_eq!(v["cached"], false, "{v}");
                first_id = Some(v["id"].clone());
            }
            Some(_) => {
                // The first run's result is stored when its completion reaches the cache,
                // just after its answer: a repeat joins or reads it, never runs again.
                assert_eq!(v["cached"], true, "run again: {v}");
            }
        }
    }
    assert_eq!(ran_on.len(), 1, "one owner for the key: {ran_on:?}");
}

/// Every node answers the same audit trail: who changed which route (the token's name)
/// and which node joined (the node itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_set_with_a_token_shows_its_name_in_every_nodes_audit_trail() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        format!(
            "[[token]]\nname = \"deployer\"\nsecret = \"{ADMIN_TOKEN}\"\nscopes = [\"admin\"]\n\n\
             [[token]]\nname = \"app\"\nsecret = \"app-secret-000000000\"\nscopes = [\"submit\"]\n"
        ),
    )
    .unwrap();
    let (s, _) = three_nodes_with(None, Some(&tokens), &[]).await;
    let r = client()
        .put(s[2].url("/v1/routes/echo"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"strategy": "pinned", "nodes": ["node-2"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let audit = |n: &Server| {
        let url = n.url("/v1/audit?limit=50");
        async move {
            let r = client()
                .get(url)
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()["entries"]
                .as_array()
                .unwrap()
                .clone()
        }
    };
    for n in &s {
        wait_until(
            "the route change in the node's audit trail",
            Duration::from_secs(5),
            || async {
                audit(n).await.first().is_some_and(|e| {
                    e["by"] == "deployer"
                        && e["action"] == "route.set"
                        && e["subject"] == "echo"
                        && e["detail"] == "pinned [node-2]"
                })
            },
        )
        .await;
        let entries = audit(n).await;
        for joined in ["node-2", "node-3"] {
            assert!(
                entries.iter().any(|e| e["action"] == "node.joined"
                    && e["subject"] == joined
                    && e["by"] == format!("node:{joined}")),
                "{joined} joined, by itself: {entries:?}"
            );
        }
        // Newest first, versions going down, times set.
        let versions: Vec<u64> = entries
            .iter()
            .map(|e| e["version"].as_u64().unwrap())
            .collect();
        assert!(versions.windows(2).all(|w| w[0] > w[1]), "{versions:?}");
        assert!(entries
            .iter()
            .all(|e| e["at_ms"].as_u64().unwrap() > 1_600_000_000_000));
    }
    // Only an admin reads it; the CLI prints it.
    let r = client()
        .get(s[0].url("/v1/audit"))
        .bearer_auth("app-secret-000000000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (code, out, err) = common::cli(&["audit", "--target", &s[1].base, "--token", ADMIN_TOKEN]);
    assert_eq!(code, 0, "{err}");
    let first = out.lines().nth(1).unwrap_or_default();
    assert!(
        first.contains("deployer") && first.contains("route.set") && first.contains("echo"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_owner_under_load_moves_its_types_and_every_request_completes() {
    let (mut s, _) = three_nodes(None).await;
    let r = set_route(&s[0], "sleep", "pinned", &["node-2", "node-3"]).await;
    assert_eq!(r.status(), 200);
    for n in &s {
        wait_until("the route everywhere", Duration::from_secs(5), || async {
            route_on(n, "sleep").await.is_some()
        })
        .await;
    }
    // Load from node-1: operations that take a while on the owner.
    let base = s[0].base.clone();
    let mut load = Vec::new();
    for i in 0..200 {
        let url = format!("{base}/v1/ops?wait=true");
        load.push(tokio::spawn(async move {
            let r = client()
                .post(url)
                .json(&json!({"type": "sleep", "payload": {"ms": 300 + i % 200}}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }));
    }
    // Once node-2 runs some of them, kill it.
    wait_until(
        "node-2 running operations",
        Duration::from_secs(10),
        || async {
            try_get(&s[1], "/v1/metrics")
                .await
                .is_some_and(|m| m["activeOperations"].as_u64().unwrap_or(0) > 0)
        },
    )
    .await;
    let killed = Instant::now();
    s[1].signal("KILL");
    s[1].wait_exit(Duration::from_secs(5));

    let mut by_node = std::collections::BTreeMap::<String, usize>::new();
    for h in load {
        let (code, v) = h.await.unwrap();
        assert_eq!(code, 200, "{v}");
        assert_eq!(
            v["status"], "succeeded",
            "every waiting request completes: {v}"
        );
        *by_node
            .entry(v["executed_by"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert!(
        by_node.get("node-3").copied().unwrap_or(0) > 0,
        "{by_node:?}"
    );
    // node-2 is marked down everywhere, and new work goes to node-3.
    for n in [&s[0], &s[2]] {
        wait_until("node-2 marked down", Duration::from_secs(5), || async {
            try_get(n, "/v1/cluster").await.is_some_and(|c| {
                c["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|x| x["id"] == "node-2" && x["status"] == "down")
            })
        })
        .await;
    }
    let (code, v) = submit_wait(&s[0], json!({"type": "sleep", "payload": {"ms": 1}})).await;
    assert_eq!((code, v["executed_by"].as_str()), (200, Some("node-3")));
    eprintln!(
        "owner killed: all 200 requests done {:?} after the kill",
        killed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_with_its_data_dir_rejoins_with_its_state() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = [
        tmp.path().join("n1"),
        tmp.path().join("n2"),
        tmp.path().join("n3"),
    ];
    let (mut s, ports) = three_nodes(Some(&dirs)).await;
    assert_eq!(
        set_route(&s[0], "echo", "pinned", &["node-1"])
            .await
            .status(),
        200
    );
    wait_until(
        "node-3 has the first route",
        Duration::from_secs(5),
        || async { route_on(&s[2], "echo").await.is_some() },
    )
    .await;
    s[2].signal("KILL");
    s[2].wait_exit(Duration::from_secs(5));
    // A change while it is away.
    assert_eq!(
        set_route(&s[0], "sleep", "round_robin", &[]).await.status(),
        200
    );
    let back = start(&NodeSpec {
        name: "node-3",
        cluster_port: ports[2],
        data_dir: Some(&dirs[2]),
        ..NodeSpec::default()
    });
    wait_until(
        "node-3 has the route set while it was away",
        Duration::from_secs(10),
        || async {
            route_on(&back, "sleep").await.is_some() && route_on(&back, "echo").await.is_some()
        },
    )
    .await;
    for n in [&s[0], &s[1], &back] {
        wait_until("three up again", Duration::from_secs(10), || sees_up(n, 3)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_wrong_secrets_on_the_cluster_port_are_refused_and_a_node_leaves_cleanly() {
    let (mut s, ports) = three_nodes(None).await;
    // Garbage, an oversized length prefix, and a node with the wrong secret.
    for bytes in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        vec![0xff; 64],
        u32::MAX.to_be_bytes().to_vec(),
    ] {
        let mut c = TcpStream::connect(("127.0.0.1", ports[0])).await.unwrap();
        let _ = c.write_all(&bytes).await;
    }
    let wrong = common::Server::start(
        &[
            "--node-id",
            "intruder",
            "--cluster-addr",
            "127.0.0.1:0",
            "--ephemeral",
            "--join",
            &format!("127.0.0.1:{}", ports[0]),
        ],
        &[("OPMESH_CLUSTER_SECRET", "another-secret-of-enough-length")],
    );
    // The cluster still works and never admits the intruder.
    assert_eq!(
        set_route(&s[0], "echo", "round_robin", &[]).await.status(),
        200
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = get(&s[0], "/v1/cluster").await;
    assert!(!c.to_string().contains("intruder"), "{c}");
    let ready = client().get(wrong.url("/readyz")).send().await.unwrap();
    assert_eq!(
        ready.status(),
        503,
        "a node that could not join is not ready"
    );

    // node-3 leaves: it exits, and the others no longer list it.
    let r = client()
        .post(s[2].url("/v1/cluster/leave"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_eq!(s[2].wait_exit(Duration::from_secs(20)), Some(0));
    for n in &s[..2] {
        wait_until("two nodes left", Duration::from_secs(10), || async {
            try_get(n, "/v1/cluster")
                .await
                .is_some_and(|c| c["nodes"].as_array().unwrap().len() == 2)
        })
        .await;
    }
    let (code, _) = submit_wait(&s[0], json!({"type": "echo", "payload": 1})).await;
    assert_eq!(code, 200);

    // SIGTERM hands off and leaves the same way.
    s[1].signal("TERM");
    assert_eq!(s[1].wait_exit(Duration::from_secs(20)), Some(0));
    wait_until("one node left", Duration::from_secs(10), || async {
        try_get(&s[0], "/v1/cluster")
            .await
            .is_some_and(|c| c["nodes"].as_array().unwrap().len() == 1)
    })
    .await;
    let (code, v) = submit_wait(&s[0], json!({"type": "echo", "payload": 2})).await;
    assert_eq!((code, v["executed_by"].as_str()), (200, Some("node-1")));
}

/// Soak: load runs from node-1 while node-2 and node-3 are killed (`kill -9`) and
/// restarted in turn, `OPMESH_SOAK_ROUNDS` times (default 10). Every request must succeed.
/// Run by `scripts/soak`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: run by scripts/soak"]
async fn soak_owners_killed_and_restarted_under_load() {
    let rounds: usize = std::env::var("OPMESH_SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let (mut s, ports) = three_nodes(None).await;
    let seed = format!("127.0.0.1:{}", ports[0]);
    let stop = Arc::new(parking_lot::Mutex::new(false));
    let mut load = Vec::new();
    for w in 0..32 {
        let base = s[0].base.clone();
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let mut done = 0u64;
            while !*stop.lock() {
                let r = client()
                    .post(format!("{base}/v1/ops?wait=true"))
                    .json(&json!({"type": "sleep", "payload": {"ms": 20}, "key": format!("w{w}-{done}")}))
                    .send()
                    .await
                    .unwrap();
                let code = r.status().as_u16();
                let v: Value = r.json().await.unwrap();
                assert_eq!((code, &v["status"]), (200, &json!("succeeded")), "{v}");
                done += 1;
            }
            done
        }));
    }
    for round in 0..rounds {
        let i = 1 + round % 2;
        s[i].signal("KILL");
        s[i].wait_exit(Duration::from_secs(5));
        wait_until(
            "the victim marked down",
            Duration::from_secs(10),
            || async {
                try_get(&s[0], "/v1/cluster").await.is_some_and(|c| {
                    c["nodes"].as_array().unwrap().iter().any(|x| {
                        x["id"] == ["node-1", "node-2", "node-3"][i] && x["status"] == "down"
                    })
                })
            },
        )
        .await;
        s[i] = start(&NodeSpec {
            name: ["node-1", "node-2", "node-3"][i],
            cluster_port: ports[i],
            join: Some(seed.clone()),
            ..NodeSpec::default()
        });
        for n in &s {
            wait_until(
                "three up and voting again",
                Duration::from_secs(20),
                || async {
                    sees_up(n, 3).await
                        && try_get(n, "/v1/cluster").await.is_some_and(|c| {
                            c["nodes"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .filter(|x| x["role"] == "voter")
                                .count()
                                == 3
                        })
                },
            )
            .await;
        }
        eprintln!("soak round {} of {rounds} done", round + 1);
    }
    *stop.lock() = true;
    let mut total = 0;
    for h in load {
        total += h.await.unwrap();
    }
    eprintln!("soak: {total} operations, all succeeded, over {rounds} kills");
    assert!(total > 0);
}
