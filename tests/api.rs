//! The HTTP api of a single node, through real HTTP on 127.0.0.1 against the real binary:
//! submitting, reading back, the cache, routes, health and metrics, and every bad input.

mod common;

use std::time::Duration;

use common::{client, retry_after, wait_until, Server};
use serde_json::{json, Value};

async fn post(s: &Server, path: &str, body: &Value) -> (u16, Value, reqwest::header::HeaderMap) {
    let r = client().post(s.url(path)).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.json().await.unwrap(), headers)
}

async fn get(s: &Server, path: &str) -> (u16, Value) {
    let r = client().get(s.url(path)).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn assert_error(body: &Value, code: &str, names: &str) {
    assert_eq!(body["error"], code, "{body}");
    let msg = body["message"].as_str().unwrap_or_default();
    assert!(msg.contains(names), "message {msg:?} should name {names:?}");
}

#[tokio::test]
async fn submit_and_wait_returns_the_result_with_id_and_trace() {
    let s = Server::start(&["--node-id", "api-1"], &[]);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = client()
        .post(s.url("/v1/ops?wait=true"))
        .header("traceparent", tp)
        .json(&json!({"type": "echo", "payload": {"hello": [1, 2, 3]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let header_id = r.headers()["x-opmesh-op-id"].to_str().unwrap().to_owned();
    assert!(r.headers()["traceparent"]
        .to_str()
        .unwrap()
        .contains("4bf92f3577b34da6a3ce929d0e0e4736"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["result"], json!({"hello": [1, 2, 3]}));
    assert_eq!(v["id"], header_id);
    assert_eq!(v["executed_by"], "api-1");
    assert_eq!(v["cached"], false);
    assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
}

#[tokio::test]
async fn submit_without_wait_is_accepted_then_readable() {
    let s = Server::start(&[], &[]);
    let (status, v, h) = post(
        &s,
        "/v1/ops",
        &json!({"type": "sleep", "payload": {"ms": 200}}),
    )
    .await;
    assert_eq!(status, 202);
    assert_eq!(v["status"], "queued");
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(h["x-opmesh-op-id"].to_str().unwrap(), id);
    assert_eq!(v["trace_id"].as_str().unwrap().len(), 32);
    let path = format!("/v1/ops/{id}");
    wait_until("the operation to run", Duration::from_secs(10), || async {
        get(&s, &path).await.1["status"] == "running"
    })
    .await;
    assert_eq!(
        get(&s, &path).await.1["trace_id"],
        v["trace_id"],
        "a running operation shows its trace"
    );
    wait_until(
        "the operation to finish",
        Duration::from_secs(10),
        || async { get(&s, &path).await.1["status"] == "succeeded" },
    )
    .await;
    let (status, v) = get(&s, &path).await;
    assert_eq!(status, 200);
    assert_eq!(v["result"], json!({"slept_ms": 200}));
    assert_eq!(v["type"], "sleep");
    assert_eq!(v["id"], id);
}

#[tokio::test]
async fn a_repeated_idempotency_key_is_answered_from_the_cache() {
    let s = Server::start(&[], &[]);
    let body = json!({"type": "echo", "payload": "first", "idempotency_key": "order-7"});
    let (_, a, _) = post(&s, "/v1/ops?wait=true", &body).await;
    assert_eq!(a["cached"], false);
    let again = body.clone();
    // The first result is stored when its completion reaches the cache: wait for it.
    wait_until(
        "the cache to hold the result",
        Duration::from_secs(5),
        || async { get(&s, "/v1/metrics").await.1["cacheStats"]["size"] == 1 },
    )
    .await;
    let (_, b, _) = post(&s, "/v1/ops?wait=true", &again).await;
    assert_eq!(b["cached"], true);
    assert_eq!(b["result"], "first");
    assert_ne!(a["id"], b["id"]);
    let (_, m) = get(&s, "/v1/metrics").await;
    assert_eq!(m["cacheStats"]["hits"], 1);
    assert_eq!(m["cacheStats"]["misses"], 1);
    // The key with another payload is a mistake, not a repeat: refused, never answered
    // with the first payload's result.
    let other = json!({"type": "echo", "payload": "second", "idempotency_key": "order-7"});
    let (status, c, _) = post(&s, "/v1/ops?wait=true", &other).await;
    assert_eq!(status, 409, "{c}");
    assert_eq!(c["error"], "idempotency_key_reused");
    assert_eq!(m["cacheHitRate"], 0.5);
}

#[tokio::test]
async fn batches_answer_in_order_with_per_item_errors() {
    let s = Server::start(&[], &[]);
    let body = json!({"ops": [
        {"type": "echo", "payload": 1},
        {"type": ""},
        {"type": "nope"},
        {"type": "echo", "payload": 4, "bogus": true},
        {"type": "echo", "payload": 5},
    ]});
    let (status, v, _) = post(&s, "/v1/ops/batch?wait=true", &body).await;
    assert_eq!(status, 200);
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 5);
    assert_eq!(
        (r[0]["status"].clone(), r[0]["result"].clone()),
        (json!("succeeded"), json!(1))
    );
    assert_error(&r[1], "invalid_field", "type");
    assert_error(&r[2], "no_route", "nope");
    assert_error(&r[3], "invalid_field", "bogus");
    assert_eq!(r[4]["result"], 5);
    // Without wait: all queued, then readable.
    let (status, v, _) = post(
        &s,
        "/v1/ops/batch",
        &json!({"ops": [{"type": "echo", "payload": 9}]}),
    )
    .await;
    assert_eq!(status, 202);
    let id = v["results"][0]["id"].as_str().unwrap().to_owned();
    wait_until("the batch op to finish", Duration::from_secs(5), || async {
        get(&s, &format!("/v1/ops/{id}")).await.1["result"] == 9
    })
    .await;
}

/// A batch whose entries all read well but some cannot be submitted (a deadline already
/// passed, a type no node serves): each answer stays in its entry's place, waited or not.
#[tokio::test]
async fn a_well_formed_batch_answers_each_entry_in_its_place() {
    let s = Server::start(&[], &[]);
    let body = json!({"ops": [
        {"type": "echo", "payload": 1},
        {"type": "echo", "payload": 2, "deadline_ms": 0},
        {"type": "nope"},
        {"type": "echo", "payload": 4},
        {"type": "echo", "payload": 5, "deadline_ms": -3},
        {"type": "echo", "payload": 6},
    ]});
    let (status, v, _) = post(&s, "/v1/ops/batch?wait=true", &body).await;
    assert_eq!(status, 200);
    let r = v["results"].as_array().unwrap();
    assert_eq!(r.len(), 6, "{v}");
    assert_eq!(r[0]["result"], 1);
    assert_error(&r[1], "deadline_in_past", "deadline_ms");
    assert_error(&r[2], "no_route", "nope");
    assert_eq!(r[3]["result"], 4);
    assert_error(&r[4], "deadline_in_past", "deadline_ms");
    assert_eq!(r[5]["result"], 6);
    let (status, v, _) = post(&s, "/v1/ops/batch", &body).await;
    assert_eq!(status, 202);
    let r = v["results"].as_array().unwrap();
    let statuses: Vec<&str> = r
        .iter()
        .map(|e| e["status"].as_str().or(e["error"].as_str()).unwrap())
        .collect();
    assert_eq!(
        statuses,
        [
            "queued",
            "deadline_in_past",
            "no_route",
            "queued",
            "deadline_in_past",
            "queued"
        ]
    );
    let id = r[5]["id"].as_str().unwrap().to_owned();
    wait_until(
        "the last entry to finish",
        Duration::from_secs(5),
        || async { get(&s, &format!("/v1/ops/{id}")).await.1["result"] == 6 },
    )
    .await;
}

#[tokio::test]
async fn routes_can_be_set_read_and_deleted() {
    let s = Server::start(&["--node-id", "n1"], &[]);
    let (status, v) = get(&s, "/v1/routes").await;
    assert_eq!(status, 200);
    assert_eq!(v, json!({"routes": {}, "version": 1}));
    let r = client()
        .put(s.url("/v1/routes/echo"))
        .json(&json!({"strategy": "pinned", "nodes": ["n1"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["version"], 2);
    let (_, v) = get(&s, "/v1/routes").await;
    assert_eq!(
        v["routes"]["echo"],
        json!({"strategy": "pinned", "nodes": ["n1"]})
    );
    let (_, v) = get(&s, "/v1/routes/echo").await;
    assert_eq!(v["route"]["strategy"], "pinned");
    // Still runs, on the pinned node.
    let (_, v, _) = post(&s, "/v1/ops?wait=true", &json!({"type": "echo"})).await;
    assert_eq!(v["executed_by"], "n1");
    // An empty node list means every node that serves the type.
    let r = client()
        .put(s.url("/v1/routes/sleep"))
        .json(&json!({"strategy": "consistent_hash"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client()
        .delete(s.url("/v1/routes/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (status, v) = get(&s, "/v1/routes/echo").await;
    assert_eq!(status, 404);
    assert_error(&v, "not_found", "echo");
    let (_, v) = get(&s, "/v1/routes").await;
    assert_eq!(v["version"], 4);
    assert!(v["routes"].get("echo").is_none());
}

#[tokio::test]
async fn bad_routes_are_refused_naming_the_field() {
    let s = Server::start(&[], &[]);
    let put = |path: &'static str, body: Value| {
        let c = client();
        let url = s.url(path);
        async move {
            let r = c.put(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (st, v) = put("/v1/routes/echo", json!({"strategy": "fastest"})).await;
    assert_eq!(st, 400);
    assert_error(&v, "invalid_field", "strategy");
    let (st, v) = put(
        "/v1/routes/echo",
        json!({"strategy": "pinned", "nodes": ["ghost"]}),
    )
    .await;
    assert_eq!(st, 409);
    assert_error(&v, "unknown_node", "ghost");
    let (st, v) = put("/v1/routes/echo", json!({"strategy": "pinned", "extra": 1})).await;
    assert_eq!(st, 400);
    assert_error(&v, "invalid_field", "extra");
    let (st, v) = put("/v1/routes/bad%20type", json!({"strategy": "pinned"})).await;
    assert_eq!(st, 400);
    assert_error(&v, "invalid_field", "type");
    let r = client()
        .delete(s.url("/v1/routes/never-set"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// The fields of seed 000's getHealth; getMetrics has these and more.
const HEALTH_FIELDS: [&str; 8] = [
    "nodeId",
    "isRunning",
    "activeOperations",
    "queuedOperations",
    "completedOperations",
    "totalProcessed",
    "cacheStats",
    "timestamp",
];

#[tokio::test]
async fn health_metrics_and_probes_carry_the_documented_fields() {
    let s = Server::start(&["--node-id", "m1"], &[]);
    for i in 0..20 {
        post(
            &s,
            "/v1/ops?wait=true",
            &json!({"type": "echo", "payload": i}),
        )
        .await;
    }
    post(
        &s,
        "/v1/ops?wait=true",
        &json!({"type": "sleep", "payload": {"ms": "x"}}),
    )
    .await;
    let (status, h) = get(&s, "/v1/health").await;
    assert_eq!(status, 200);
    for k in HEALTH_FIELDS {
        assert!(h.get(k).is_some(), "health lacks {k}: {h}");
    }
    assert_eq!(h["nodeId"], "m1");
    assert_eq!(h["isRunning"], true);
    let (status, m) = get(&s, "/v1/metrics").await;
    assert_eq!(status, 200);
    for k in HEALTH_FIELDS.iter().chain(&[
        "totalOperations",
        "successRate",
        "throughput",
        "cacheHitRate",
        "latency",
        "perType",
    ]) {
        assert!(m.get(k).is_some(), "metrics lack {k}: {m}");
    }
    assert_eq!(m["totalOperations"], 21);
    assert_eq!(m["completedOperations"], 21);
    assert_eq!(m["failedOperations"], 1);
    let rate = m["successRate"].as_f64().unwrap();
    assert!((rate - 20.0 / 21.0).abs() < 1e-9, "{rate}");
    for p in ["p50_us", "p95_us", "p99_us"] {
        assert!(m["latency"][p].as_u64().unwrap() > 0);
        assert!(m["perType"]["echo"]["latency"][p].as_u64().unwrap() > 0);
    }
    assert_eq!(m["perType"]["echo"]["succeeded"], 20);
    assert_eq!(m["perType"]["sleep"]["failed"], 1);
    assert!(m["throughput"].as_f64().unwrap() > 0.0);
    assert_eq!(get(&s, "/healthz").await.0, 200);
    assert_eq!(get(&s, "/readyz").await.0, 200);
}

#[tokio::test]
async fn openapi_and_dashboard_are_served() {
    let s = Server::start(&[], &[]);
    let (status, doc) = get(&s, "/openapi.json").await;
    assert_eq!(status, 200);
    for p in [
        "/v1/ops",
        "/v1/ops/batch",
        "/v1/ops/{id}",
        "/v1/routes",
        "/v1/routes/{type}",
        "/v1/health",
        "/v1/metrics",
        "/healthz",
        "/readyz",
    ] {
        assert!(doc["paths"].get(p).is_some(), "openapi lacks {p}");
    }
    assert!(doc["components"]["schemas"].get("OpRequest").is_some());
    let r = client().get(s.url("/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(r.text().await.unwrap().contains("/dashboard/app.js"));
    let r = client()
        .get(s.url("/dashboard/app.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    assert!(r.text().await.unwrap().contains("/v1/metrics"));
}

#[tokio::test]
async fn bad_input_gets_a_json_error_naming_what_was_wrong() {
    let s = Server::start(&[], &[]);
    let c = client();
    let raw = |body: &'static str| {
        let c = c.clone();
        let url = s.url("/v1/ops");
        async move {
            let r = c
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (st, v) = raw("{\"type\": ").await;
    assert_eq!(st, 400);
    assert_error(&v, "bad_json", "JSON");
    let (st, v) = raw("[1,2]").await;
    assert_eq!(st, 400);
    assert_eq!(v["error"], "invalid_field");
    let (st, v) = raw("{\"payload\": 1}").await;
    assert_eq!(st, 400);
    assert_error(&v, "invalid_field", "type");
    let (st, v) = raw("{\"type\": \"echo\", \"colour\": 1}").await;
    assert_eq!(st, 400);
    assert_error(&v, "invalid_field", "colour");

    let (st, v, _) = post(&s, "/v1/ops", &json!({"type": ""})).await;
    assert_eq!(st, 400);
    assert_error(&v, "invalid_field", "type");
    let (st, v, _) = post(&s, "/v1/ops", &json!({"type": "x".repeat(200)})).await;
    assert_eq!(st, 400);
    assert_error(&v, "invalid_field", "type");
    let (st, v, _) = post(
        &s,
        "/v1/ops",
        &json!({"type": "echo", "payload": "x".repeat(1_100_000)}),
    )
    .await;
    assert_eq!(st, 413);
    assert_error(&v, "payload_too_large", "payload");
    let (st, v, _) = post(&s, "/v1/ops", &json!({"type": "echo", "deadline_ms": -5})).await;
    assert_eq!(st, 400);
    assert_error(&v, "deadline_in_past", "deadline_ms");
    let (st, v, _) = post(&s, "/v1/ops", &json!({"type": "thumbnail"})).await;
    assert_eq!(st, 404);
    assert_error(&v, "no_route", "thumbnail");
    let (st, v, _) = post(
        &s,
        "/v1/ops",
        &json!({"type": "echo", "metadata": {"a": {"nested": 1}}}),
    )
    .await;
    assert_eq!(st, 400);
    assert_error(&v, "invalid_field", "metadata.a");
    let (st, v, _) = post(&s, "/v1/ops", &json!({"type": "echo", "priority": "high"})).await;
    assert_eq!(st, 400);
    assert_error(&v, "invalid_field", "priority");
    let (st, v) = get(&s, "/v1/ops/3f1e2d4c-0000-0000-0000-000000000000").await;
    assert_eq!(st, 404);
    assert_error(&v, "not_found", "3f1e2d4c");
    let (st, v) = get(&s, "/v1/ops/not-an-id").await;
    assert_eq!(st, 400);
    assert_error(&v, "invalid_field", "not-an-id");
    let (st, v) = get(&s, "/v1/nothing-here").await;
    assert_eq!(st, 404);
    assert_error(&v, "not_found", "/v1/nothing-here");
    let (st, v, _) = post(&s, "/v1/ops?wait=maybe", &json!({"type": "echo"})).await;
    assert_eq!(st, 400);
    assert_error(&v, "invalid_field", "query");
    let (st, v, _) = post(&s, "/v1/ops/batch", &json!({"ops": "no"})).await;
    assert_eq!(st, 400);
    assert_error(&v, "invalid_field", "ops");
    let many: Vec<Value> = (0..100_001).map(|_| json!({"type": "echo"})).collect();
    let (st, v, _) = post(&s, "/v1/ops/batch", &json!({ "ops": many })).await;
    assert_eq!(st, 413);
    assert_error(&v, "batch_too_large", "ops");
    // Garbage bytes, then the node still serves.
    let r = c
        .post(s.url("/v1/ops"))
        .body(vec![0xff, 0x00, 0x13, 0x37])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // A batch that is JSON but not text (a byte that is not UTF-8 inside a string).
    let r = c
        .post(s.url("/v1/ops/batch?wait=true"))
        .body(b"{\"ops\":[{\"type\":\"echo\",\"payload\":\"\xff\"}]}".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["message"].as_str().unwrap().contains("request body"),
        "{v}"
    );
    let (st, v, _) = post(
        &s,
        "/v1/ops?wait=true",
        &json!({"type": "echo", "payload": 1}),
    )
    .await;
    assert_eq!((st, v["status"].clone()), (200, json!("succeeded")));
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let s = Server::start(
        &[],
        &[
            ("OPMESH_ENGINE__MAX_CONCURRENT", "1"),
            ("OPMESH_ENGINE__QUEUE_CAPACITY", "2"),
        ],
    );
    let (st, _, _) = post(
        &s,
        "/v1/ops",
        &json!({"type": "sleep", "payload": {"ms": 1000}}),
    )
    .await;
    assert_eq!(st, 202);
    wait_until("the first op to run", Duration::from_secs(5), || async {
        get(&s, "/v1/metrics").await.1["activeOperations"] == 1
    })
    .await;
    for _ in 0..2 {
        let (st, _, _) = post(
            &s,
            "/v1/ops",
            &json!({"type": "sleep", "payload": {"ms": 1}}),
        )
        .await;
        assert_eq!(st, 202);
    }
    let r = client()
        .post(s.url("/v1/ops"))
        .json(&json!({"type": "sleep", "payload": {"ms": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(retry_after(&r) >= 1);
    let v: Value = r.json().await.unwrap();
    assert_error(&v, "overloaded", "sleep");
}
