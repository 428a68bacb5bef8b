//! Bounds a node keeps under what clients send it: finished results kept for
//! `GET /v1/ops/{id}` stay within `engine.result_store_bytes`, evicted oldest first, a
//! result over `engine.max_stored_result_bytes` is kept as "too large to store", and the
//! results of idempotency keys stay within `cache.max_bytes`.

mod common;

use std::time::Duration;

use common::{client, get_json, wait_until, Server};
use serde_json::{json, Value};

/// The process's resident memory, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kb * 1024
}

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_results_stay_within_the_result_store_budget() {
    const STORE: u64 = 16 * MIB;
    const CACHE: u64 = 8 * MIB;
    const BUDGET: u64 = STORE + CACHE;
    let s = Server::start(
        &[],
        &[
            ("OPMESH_ENGINE__RESULT_STORE_BYTES", &STORE.to_string()),
            ("OPMESH_CACHE__MAX_BYTES", &CACHE.to_string()),
            (
                "OPMESH_ENGINE__MAX_STORED_RESULT_BYTES",
                &(2 * MIB).to_string(),
            ),
            ("OPMESH_ENGINE__MAX_PAYLOAD_BYTES", &(4 * MIB).to_string()),
        ],
    );
    let idle = rss(s.pid());
    // 400 echo operations of 900 KB, one after another, each waited for, each with an
    // idempotency key of its own: 360 MB of results asked to be kept, twice.
    let payload = Value::String("x".repeat(900 * 1024));
    let c = client();
    let mut ids = Vec::new();
    let mut peak = 0;
    for i in 0..400 {
        let body = json!({"type": "echo", "payload": payload, "idempotency_key": format!("k-{i}")});
        let r = c
            .post(s.url("/v1/ops?wait=true"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["status"], "succeeded");
        ids.push(v["id"].as_str().unwrap().to_owned());
        peak = peak.max(rss(s.pid()));
    }
    let m = get_json(&s.url("/v1/metrics")).await;
    let held = m["resultStoreBytes"]
        .as_u64()
        .expect("resultStoreBytes in /v1/metrics");
    assert!(
        held <= STORE,
        "the store holds {held} bytes, over its budget {STORE}"
    );
    let cached = m["cacheStats"]["bytes"].as_u64().expect("cacheStats.bytes");
    assert!(
        cached <= CACHE,
        "the cache holds {cached} bytes, over its budget {CACHE}"
    );
    assert!(cached > CACHE / 2, "the cache is used: {cached} bytes");
    // The newest are readable, the oldest evicted (404), none a panic.
    let get = |id: &str| c.get(s.url(&format!("/v1/ops/{id}"))).send();
    let newest = get(ids.last().unwrap()).await.unwrap();
    assert_eq!(newest.status(), 200);
    assert!(
        newest.json::<Value>().await.unwrap()["result"] == payload,
        "the newest result"
    );
    let oldest = get(&ids[0]).await.unwrap();
    assert_eq!(oldest.status(), 404);
    // Resident memory follows the budget: under it plus 64 MiB above idle, at the peak and
    // once the last answers are gone.
    let bound = idle + BUDGET + 64 * MIB;
    wait_until(
        "resident memory back within the budget",
        Duration::from_secs(10),
        || async { rss(s.pid()) <= bound },
    )
    .await;
    eprintln!(
        "idle {} MiB, peak {} MiB, after {} MiB; store {} of {} MiB, cache {} of {} MiB",
        idle / MIB,
        peak / MIB,
        rss(s.pid()) / MIB,
        held / MIB,
        STORE / MIB,
        cached / MIB,
        CACHE / MIB
    );
    assert!(
        peak <= bound + 32 * MIB,
        "peak {} MiB over idle {} MiB",
        peak / MIB,
        idle / MIB
    );

    // A result over the cap: the submitter that waits gets it; the record keeps the
    // status and says why the result is gone.
    let big = Value::String("y".repeat(3 * 1024 * 1024));
    let r = c
        .post(s.url("/v1/ops?wait=true"))
        .json(&json!({"type": "echo", "payload": big}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["result"] == big,
        "the waiting submitter gets the whole result"
    );
    let kept: Value = get(v["id"].as_str().unwrap())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(kept["status"], "succeeded");
    assert!(kept["result"].is_null());
    let e = kept["error"].as_str().unwrap();
    assert!(
        e.starts_with("result too large to store") && e.contains("max_stored_result_bytes"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_or_a_batch_over_its_limit_is_refused_naming_the_limit() {
    let s = Server::start(
        &[],
        &[
            ("OPMESH_ENGINE__MAX_DEADLINE_MS", "60000"),
            ("OPMESH_HTTP__MAX_BATCH_OPS", "10"),
        ],
    );
    let c = client();
    let post = |path: &'static str, body: Value| {
        let r = c.post(s.url(path)).json(&body).send();
        async move {
            let r = r.await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, v) = post(
        "/v1/ops?wait=true",
        json!({"type": "echo", "deadline_ms": 60000}),
    )
    .await;
    assert_eq!((status, &v["status"]), (200, &json!("succeeded")), "{v}");
    let (status, v) = post("/v1/ops", json!({"type": "echo", "deadline_ms": 60001})).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"], "invalid_field");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("deadline_ms") && msg.contains("engine.max_deadline_ms"),
        "{msg}"
    );

    let ops = |n: usize| json!({"ops": (0..n).map(|i| json!({"type": "echo", "payload": i})).collect::<Vec<_>>()});
    let (status, _) = post("/v1/ops/batch?wait=true", ops(10)).await;
    assert_eq!(status, 200);
    let (status, v) = post("/v1/ops/batch", ops(11)).await;
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["error"], "batch_too_large");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("http.max_batch_ops"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_past_max_subscribers_are_refused_until_one_ends() {
    let s = Server::start(&[], &[("OPMESH_EVENTS__MAX_SUBSCRIBERS", "2")]);
    let c = client();
    let open = || c.get(s.url("/v1/events")).send();
    let first = open().await.unwrap();
    let second = open().await.unwrap();
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = open().await.unwrap();
    assert_eq!(third.status(), 503);
    let v: Value = third.json().await.unwrap();
    assert_eq!(v["error"], "too_many_subscribers");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("events.max_subscribers"),
        "{v}"
    );
    // One client goes away: its place is free again.
    drop(first);
    wait_until(
        "a place for another stream",
        Duration::from_secs(10),
        || async { open().await.unwrap().status() == 200 },
    )
    .await;
    drop(second);
}
