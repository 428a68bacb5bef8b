//! Bounds a node keeps under what clients send it: finished results kept for
//! `GET /v1/ops/{id}` stay within `engine.result_store_bytes`, evicted oldest first, a
//! result over `engine.max_stored_result_bytes` is kept as "too large to store", and the
//! results of idempotency keys stay within `cache.max_bytes`; submissions pass the rate
//! limits (global, per client) and the in-flight cap of `[limits]`; `sleep` exists only
//! with `handlers.builtin_sleep`; routes are bounded by `cluster.max_routes` and only
//! for served types.
//!
//! The rate-limit tests use 1 operation per second with a small burst: a burst is used
//! up in one batch and the next request, milliseconds later, finds nothing refilled.

mod common;

use std::time::Duration;

use common::{client, get_json, get_text, wait_until, Server};
use reqwest::Response;
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

/// `(status, Retry-After in seconds, body)` of an answer.
async fn answer(r: Response) -> (u16, Option<u64>, Value) {
    let status = r.status().as_u16();
    let after = r.headers().get("retry-after").map(|v| {
        v.to_str()
            .unwrap()
            .parse()
            .expect("Retry-After is whole seconds")
    });
    (status, after, r.json().await.unwrap())
}

fn echo_ops(n: usize) -> Value {
    json!({"ops": (0..n).map(|i| json!({"type": "echo", "payload": i})).collect::<Vec<_>>()})
}

/// POSTs `body` to `path` on `s` with `headers`.
async fn post(s: &Server, path: &str, headers: &[(&str, &str)], body: &Value) -> Response {
    let mut req = client().post(s.url(path)).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

/// Asserts a 429 `rate_limited` whose message names `names`, with a Retry-After of 1 or 2
/// seconds (a wait of at most 1 s at 1/s, rounded up, stretched by the jitter).
fn assert_rate_limited((status, after, v): &(u16, Option<u64>, Value), names: &[&str]) {
    assert_eq!(*status, 429, "{v}");
    assert_eq!(v["error"], "rate_limited", "{v}");
    let msg = v["message"].as_str().unwrap();
    for n in names {
        assert!(msg.contains(n), "{msg} names {n}");
    }
    assert!(matches!(after, Some(1..=2)), "Retry-After {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_global_rate_a_submission_gets_429_naming_the_limit() {
    let s = Server::start(
        &[],
        &[
            ("OPMESH_LIMITS__RATE_PER_SEC", "1"),
            ("OPMESH_LIMITS__BURST", "5"),
        ],
    );
    // More than the burst at once can never pass.
    let (status, after, v) = answer(post(&s, "/v1/ops/batch", &[], &echo_ops(6)).await).await;
    assert_eq!((status, after), (413, None), "{v}");
    assert_eq!(v["error"], "batch_too_large");
    assert!(
        v["message"].as_str().unwrap().contains("limits.burst = 5"),
        "{v}"
    );
    // A batch counts as its operations: five use up the burst, whoever sends the next.
    let r = post(&s, "/v1/ops/batch", &[], &echo_ops(5)).await;
    assert_eq!(r.status(), 202);
    let refused = answer(
        post(
            &s,
            "/v1/ops",
            &[("x-opmesh-client", "another")],
            &json!({"type": "echo"}),
        )
        .await,
    )
    .await;
    assert_rate_limited(
        &refused,
        &["the node's rate limit", "limits.rate_per_sec = 1/s"],
    );
    // After the wait it was told, a submission passes again.
    tokio::time::sleep(Duration::from_secs(refused.1.unwrap())).await;
    let r = post(&s, "/v1/ops", &[], &json!({"type": "echo"})).await;
    assert_eq!(r.status(), 202);

    let m = get_json(&s.url("/v1/metrics")).await;
    assert_eq!(m["limits"]["rateLimitedGlobal"], 2, "{}", m["limits"]);
    assert_eq!(m["limits"]["rateLimitedClient"], 0);
    let text = get_text(&s.url("/metrics")).await;
    assert!(
        text.contains("opmesh_rate_limited_total{limit=\"global\"} 2\n"),
        "opmesh_rate_limited_total in /metrics"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_named_by_header_are_limited_apart() {
    let s = Server::start(
        &[],
        &[
            ("OPMESH_LIMITS__CLIENT_RATE_PER_SEC", "1"),
            ("OPMESH_LIMITS__CLIENT_BURST", "3"),
        ],
    );
    let a = [("x-opmesh-client", "app-a")];
    let b = [("x-opmesh-client", "app-b")];
    assert_eq!(
        post(&s, "/v1/ops/batch", &a, &echo_ops(3)).await.status(),
        202
    );
    let refused = answer(post(&s, "/v1/ops", &a, &json!({"type": "echo"})).await).await;
    assert_rate_limited(
        &refused,
        &["client `app-a`", "limits.client_rate_per_sec = 1/s"],
    );
    // Another name, and no name (the peer's address), each have their own allowance.
    assert_eq!(
        post(&s, "/v1/ops/batch", &b, &echo_ops(3)).await.status(),
        202
    );
    assert_eq!(
        post(&s, "/v1/ops/batch", &[], &echo_ops(3)).await.status(),
        202
    );
    let refused = answer(post(&s, "/v1/ops", &[], &json!({"type": "echo"})).await).await;
    assert_rate_limited(&refused, &["client `127.0.0.1`"]);
    // A name that is not one is refused, naming the header.
    let (status, _, v) = answer(
        post(
            &s,
            "/v1/ops",
            &[("x-opmesh-client", "a b")],
            &json!({"type": "echo"}),
        )
        .await,
    )
    .await;
    assert_eq!((status, &v["error"]), (400, &json!("invalid_field")), "{v}");
    assert!(v["message"].as_str().unwrap().contains("x-opmesh-client"));

    let m = get_json(&s.url("/v1/metrics")).await;
    assert_eq!(m["limits"]["rateLimitedClient"], 2, "{}", m["limits"]);
    assert_eq!(m["limits"]["clientsTracked"], 3, "{}", m["limits"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_tokens_are_limited_by_token_name() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    std::fs::write(
        &tokens,
        "[[token]]\nname = \"alice\"\nsecret = \"alice-secret-000000\"\nscopes = [\"submit\"]\n\n\
         [[token]]\nname = \"bob\"\nsecret = \"bob-secret-00000000\"\nscopes = [\"submit\"]\n",
    )
    .unwrap();
    let s = Server::start(
        &[],
        &[
            ("OPMESH_AUTH__TOKENS_FILE", tokens.to_str().unwrap()),
            ("OPMESH_LIMITS__CLIENT_RATE_PER_SEC", "1"),
            ("OPMESH_LIMITS__CLIENT_BURST", "2"),
        ],
    );
    let alice = "Bearer alice-secret-000000";
    let bob = "Bearer bob-secret-00000000";
    // With tokens the token is the client: a header naming another does not change it.
    let as_alice = [("authorization", alice), ("x-opmesh-client", "bob")];
    assert_eq!(
        post(&s, "/v1/ops/batch", &as_alice, &echo_ops(2))
            .await
            .status(),
        202
    );
    let refused = answer(post(&s, "/v1/ops", &as_alice, &json!({"type": "echo"})).await).await;
    assert_rate_limited(&refused, &["client `alice`"]);
    let as_bob = [("authorization", bob)];
    assert_eq!(
        post(&s, "/v1/ops/batch", &as_bob, &echo_ops(2))
            .await
            .status(),
        202
    );
    let (status, _, v) = answer(post(&s, "/v1/ops/batch", &as_bob, &echo_ops(3)).await).await;
    assert_eq!(
        (status, &v["error"]),
        (413, &json!("batch_too_large")),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("limits.client_burst = 2"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_in_flight_new_submissions_are_refused_as_overloaded() {
    let s = Server::start(&[], &[("OPMESH_LIMITS__MAX_IN_FLIGHT", "2")]);
    let long = json!({"ops": [
        {"type": "sleep", "payload": {"ms": 60000}},
        {"type": "sleep", "payload": {"ms": 60000}},
    ]});
    assert_eq!(post(&s, "/v1/ops/batch", &[], &long).await.status(), 202);
    let (status, after, v) = answer(post(&s, "/v1/ops", &[], &json!({"type": "echo"})).await).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["error"], "overloaded");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_in_flight"),
        "{v}"
    );
    // engine.overload_retry_after_ms (1 s), stretched by the jitter.
    assert!(matches!(after, Some(1..=2)), "Retry-After {after:?}");
    let (status, _, v) = answer(post(&s, "/v1/ops/batch", &[], &echo_ops(3)).await).await;
    assert_eq!(
        (status, &v["error"]),
        (413, &json!("batch_too_large")),
        "{v}"
    );
    let m = get_json(&s.url("/v1/metrics")).await;
    assert_eq!(m["limits"]["inFlightRefused"], 2, "{}", m["limits"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_builtin_sleep_sleep_is_an_unknown_type() {
    let s = Server::start(&[], &[("OPMESH_HANDLERS__BUILTIN_SLEEP", "false")]);
    let (status, _, v) = answer(
        post(
            &s,
            "/v1/ops",
            &[],
            &json!({"type": "sleep", "payload": {"ms": 1}}),
        )
        .await,
    )
    .await;
    assert_eq!((status, &v["error"]), (404, &json!("no_route")), "{v}");
    let health = get_json(&s.url("/v1/health")).await;
    assert_eq!(health["handlers"], json!(["echo", "resize"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_are_at_most_max_routes_and_only_for_served_types() {
    let s = Server::start(&[], &[("OPMESH_CLUSTER__MAX_ROUTES", "1")]);
    let c = client();
    let put = |ty: &str| {
        c.put(s.url(&format!("/v1/routes/{ty}")))
            .json(&json!({"strategy": "round_robin"}))
            .send()
    };
    let (status, _, v) = answer(put("thumbnail").await.unwrap()).await;
    assert_eq!((status, &v["error"]), (404, &json!("no_route")), "{v}");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("`thumbnail`") && msg.ends_with("served types: echo, resize, sleep"),
        "{msg}"
    );
    assert_eq!(put("echo").await.unwrap().status(), 200);
    let (status, _, v) = answer(put("sleep").await.unwrap()).await;
    assert_eq!(
        (status, &v["error"]),
        (409, &json!("too_many_routes")),
        "{v}"
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("cluster.max_routes"),
        "{v}"
    );
    // Replacing the route there is is fine; removing it makes room.
    assert_eq!(put("echo").await.unwrap().status(), 200);
    let r = c.delete(s.url("/v1/routes/echo")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(put("sleep").await.unwrap().status(), 200);
}
