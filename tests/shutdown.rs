//! Graceful shutdown of the real binary: on SIGTERM or SIGINT the node stops being ready,
//! refuses new work with 503, finishes what it accepted, and exits 0.

mod common;

use std::time::Duration;

use common::{client, get_json, wait_until, Server};
use serde_json::{json, Value};

async fn drain_on(sig: &str) {
    drain(sig, &[]).await
}

/// Drains on `sig` with `env` added to the node's environment.
async fn drain(sig: &str, env: &[(&str, &str)]) {
    let mut env = env.to_vec();
    env.push(("OPMESH_SHUTDOWN__GRACE_SECS", "20"));
    let mut s = Server::start(&[], &env);
    let c = client();
    // Accepted work: one waiting request and ten fire-and-forget ones.
    let waiting = tokio::spawn({
        let c = c.clone();
        let url = s.url("/v1/ops?wait=true");
        async move {
            let r = c
                .post(url)
                .json(&json!({"type": "sleep", "payload": {"ms": 1200}}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    });
    for _ in 0..10 {
        let r = c
            .post(s.url("/v1/ops"))
            .json(&json!({"type": "sleep", "payload": {"ms": 800}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    wait_until("all eleven in flight", Duration::from_secs(5), || async {
        get_json(&s.url("/v1/metrics")).await["inFlightOperations"] == 11
    })
    .await;
    s.signal(sig);
    wait_until("readyz to turn 503", Duration::from_secs(5), || async {
        c.get(s.url("/readyz"))
            .send()
            .await
            .map(|r| r.status() == 503)
            .unwrap_or(false)
    })
    .await;
    // Liveness stays true while draining; new work is refused.
    assert_eq!(c.get(s.url("/healthz")).send().await.unwrap().status(), 200);
    let r = c
        .post(s.url("/v1/ops"))
        .json(&json!({"type": "echo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "shutting_down");
    // The accepted, waiting request completes.
    let (status, v) = waiting.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(s.wait_exit(Duration::from_secs(20)), Some(0));
}

#[tokio::test]
async fn sigterm_drains_accepted_operations_and_exits_zero() {
    drain_on("TERM").await;
}

/// By default the shards run on the api's workers, one shard each; with
/// `engine.shard_threads` off they are tasks of the runtime, one per core. Either way the
/// node drains and exits 0.
#[tokio::test]
async fn the_shards_are_the_api_workers_unless_shard_threads_is_off() {
    let cores = std::thread::available_parallelism().unwrap().get();
    for (threads, shards) in [("true", 3), ("false", cores)] {
        let mut s = Server::start(
            &[],
            &[
                ("OPMESH_HTTP__WORKERS", "3"),
                ("OPMESH_ENGINE__SHARD_THREADS", threads),
            ],
        );
        let m = get_json(&s.url("/v1/metrics")).await;
        let took = m["shardOperations"].as_array().unwrap();
        assert_eq!(took.len(), shards, "shard_threads = {threads}: {m}");
        s.signal("TERM");
        assert_eq!(s.wait_exit(Duration::from_secs(20)), Some(0));
    }
    drain("TERM", &[("OPMESH_ENGINE__SHARD_THREADS", "false")]).await;
}

#[tokio::test]
async fn ctrl_c_drains_too() {
    drain_on("INT").await;
}

#[tokio::test]
async fn operations_left_after_the_grace_period_fail_and_the_exit_code_says_so() {
    let mut s = Server::start(&[], &[("OPMESH_SHUTDOWN__GRACE_SECS", "1")]);
    let c = client();
    let r = c
        .post(s.url("/v1/ops"))
        .json(&json!({"type": "sleep", "payload": {"ms": 60000}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    s.signal("TERM");
    assert_eq!(s.wait_exit(Duration::from_secs(15)), Some(1));
}
