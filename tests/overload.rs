//! Bounded under overload, per operation type, against the real binary: a slow type
//! holding all its running slots does not hold up `echo` (with the default share and
//! with a `[types.<type>]` table); a webhook whose target answers 500 opens its circuit
//! breaker after five failures (503 `circuit_open` at once, with Retry-After, shared with
//! the other type that calls the same target, in the metrics and the event stream) and a
//! healthy target closes it again through the half-open trials; and a type's rate limit
//! (429 `rate_limited`), queue capacity (429 `overloaded`) and deadline cap (400
//! `invalid_field`).

mod common;

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpResponse, HttpServer};
use common::{client, get_json, get_text, retry_after, run_op, wait_until, Server};
use futures::StreamExt;
use serde_json::{json, Value};

/// A config file for `serve --config`, removed when dropped.
fn config_file(toml: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(toml.as_bytes()).unwrap();
    f
}

fn start_with(toml: &str, env: &[(&str, &str)]) -> (Server, tempfile::NamedTempFile) {
    let file = config_file(toml);
    let path = file.path().to_str().unwrap().to_owned();
    (Server::start(&["--config", &path], env), file)
}

async fn post(s: &Server, path: &str, body: &Value) -> reqwest::Response {
    client().post(s.url(path)).json(body).send().await.unwrap()
}

/// The p99 (the largest but one of 100) of `n` echo round trips, in microseconds.
async fn echo_p99(s: &Server, n: usize) -> u64 {
    let mut us = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = Instant::now();
        let v = run_op(&s.base, &json!({"type": "echo", "payload": i})).await;
        us.push(t0.elapsed().as_micros() as u64);
        assert_eq!(v["status"], "succeeded", "{v}");
    }
    us.sort_unstable();
    us[(n * 99 / 100).min(n - 1)]
}

/// Fills `sleep`'s running slots with `n` operations of a minute (and their queue), and
/// checks that `echo` still runs within its unloaded p99 (doubled, plus slack for a busy
/// machine). Answers the figures of `sleep` in `/v1/metrics`.
async fn echo_is_not_held_up_by_sleep(s: &Server, n: usize, running: u64) -> Value {
    let before = echo_p99(s, 100).await;
    let r = post(
        s,
        "/v1/ops/batch",
        &json!({"ops": (0..n).map(|_| json!({
            "type": "sleep", "payload": {"ms": 60_000}, "deadline_ms": 120_000
        })).collect::<Vec<_>>()}),
    )
    .await;
    assert_eq!(r.status(), 202);
    let metrics = s.url("/v1/metrics");
    wait_until(
        "sleep holding all its running slots",
        Duration::from_secs(10),
        || async { get_json(&metrics).await["perType"]["sleep"]["running"] == running },
    )
    .await;
    let after = echo_p99(s, 100).await;
    eprintln!("echo p99: {before} µs unloaded, {after} µs with sleep on all its slots");
    assert!(
        after <= 2 * before + 20_000,
        "echo p99 went from {before} µs to {after} µs"
    );
    let m = get_json(&metrics).await;
    let sleep = m["perType"]["sleep"].clone();
    assert_eq!(sleep["running"], running, "{sleep}");
    assert_eq!(sleep["queued"], n as u64 - running, "the rest wait");
    assert_eq!(m["perType"]["echo"]["running"], 0);
    sleep
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_type_on_its_default_share_leaves_slots_to_echo() {
    // Sixteen slots and no tables: sleep may hold half of them.
    let s = Server::start(&[], &[("OPMESH_ENGINE__MAX_CONCURRENT", "16")]);
    let sleep = echo_is_not_held_up_by_sleep(&s, 100, 8).await;
    assert_eq!(sleep["maxConcurrent"], 8);
    assert_eq!(sleep["ownSlots"], false);
    let m = get_json(&s.url("/v1/metrics")).await;
    assert_eq!(
        m["slots"],
        json!({"maxConcurrent": 16, "shared": 16, "sharedRunning": 8, "perType": 8})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_type_with_its_own_slots_leaves_the_rest_to_echo() {
    let (s, _file) = start_with(
        "[engine]\nmax_concurrent = 16\n\n[types.sleep]\nmax_concurrent = 3\n",
        &[],
    );
    let sleep = echo_is_not_held_up_by_sleep(&s, 50, 3).await;
    assert_eq!(sleep["maxConcurrent"], 3);
    assert_eq!(sleep["ownSlots"], true);
    let m = get_json(&s.url("/v1/metrics")).await;
    assert_eq!(m["slots"]["shared"], 13, "sleep's three are its own");
    assert_eq!(m["slots"]["sharedRunning"], 0);
    let text = get_text(&s.url("/metrics")).await;
    for line in [
        "opmesh_type_ops_running{type=\"sleep\"} 3",
        "opmesh_type_max_concurrent{type=\"sleep\"} 3",
        "opmesh_type_max_concurrent{type=\"echo\"} 7",
    ] {
        assert!(text.lines().any(|l| l == line), "no `{line}` in /metrics");
    }
}

/// A webhook target the test controls: it answers 500 until made healthy.
struct Target {
    healthy: AtomicBool,
    calls: AtomicUsize,
}

fn start_target(t: Arc<Target>) -> String {
    let data = web::Data::from(t);
    let server = HttpServer::new(move || {
        App::new().app_data(data.clone()).route(
            "/hook",
            web::post().to(|t: web::Data<Target>| async move {
                t.calls.fetch_add(1, Ordering::SeqCst);
                if t.healthy.load(Ordering::SeqCst) {
                    HttpResponse::Ok().json(json!({"ok": true}))
                } else {
                    HttpResponse::InternalServerError().finish()
                }
            }),
        )
    })
    .workers(1)
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.addrs()[0];
    tokio::spawn(server.run());
    format!("http://{addr}")
}

/// Reads `GET /v1/events?types=...` as text until a frame of `event` arrives; answers its
/// data.
async fn next_event(
    body: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    buf: &mut String,
    event: &str,
) -> Value {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            if block.lines().any(|l| l == format!("event: {event}")) {
                let data = block
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .expect("a data line");
                return serde_json::from_str(data).unwrap();
            }
        }
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, body.next()).await {
            Ok(Some(chunk)) => buf.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap()),
            Ok(None) => panic!("the event stream ended before {event}"),
            Err(_) => panic!("no {event} event within 10 s; have {buf:?}"),
        }
    }
}

async fn breaker_state(s: &Server, ty: &str) -> Option<String> {
    let text = get_text(&s.url("/metrics")).await;
    let prefix = format!("opmesh_breaker_state{{type=\"{ty}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_opens_its_breaker_and_a_healthy_one_closes_it() {
    let target = Arc::new(Target {
        healthy: AtomicBool::new(false),
        calls: AtomicUsize::new(0),
    });
    let base = start_target(target.clone());
    // Two types call the one target: they share its breaker.
    let (s, _file) = start_with(
        &format!(
            r#"
[[handlers.http]]
type = "hook"
url = "{base}/hook"
timeout_ms = 2000
max_attempts = 2
initial_backoff_ms = 1
max_backoff_ms = 5

[[handlers.http]]
type = "hook-b"
url = "{base}/hook"
timeout_ms = 2000

[breaker]
open_secs = 1
"#
        ),
        &[],
    );
    let r = client()
        .get(s.url("/v1/events?types=breaker:opened,breaker:closed"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut events = Box::pin(r.bytes_stream());
    let mut buf = String::new();

    // Five failures, each after its retry.
    for _ in 0..5 {
        let v = run_op(&s.base, &json!({"type": "hook", "payload": {"n": 1}})).await;
        assert_eq!(v["status"], "failed", "{v}");
        assert_eq!(v["attempts"], 2, "{v}");
    }
    assert_eq!(target.calls.load(Ordering::SeqCst), 10);

    // Refused at once, both types, naming the type and when it tries again.
    let c = client();
    let mut took = Vec::new();
    for ty in ["hook", "hook-b", "hook", "hook-b", "hook"] {
        let t0 = Instant::now();
        let r = c
            .post(s.url("/v1/ops"))
            .json(&json!({"type": ty, "payload": 1}))
            .send()
            .await
            .unwrap();
        took.push(t0.elapsed());
        assert_eq!(r.status(), 503, "{ty}");
        let retry = retry_after(&r);
        assert_eq!(retry, 1, "Retry-After: open_secs, rounded up");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "circuit_open", "{v}");
        let msg = v["message"].as_str().unwrap();
        assert!(
            msg.contains(&format!("`{ty}`"))
                && msg.contains(&format!("{base}/hook"))
                && msg.contains("through again in"),
            "{msg}"
        );
    }
    assert_eq!(target.calls.load(Ordering::SeqCst), 10, "nothing called");
    let fastest = took.iter().min().unwrap();
    eprintln!("circuit_open answers took {took:?}");
    assert!(*fastest < Duration::from_millis(10), "{took:?}");

    let opened = next_event(&mut events, &mut buf, "breaker:opened").await;
    assert_eq!(opened["breaker"], format!("{base}/hook"));
    assert_eq!(opened["types"], json!(["hook", "hook-b"]));
    assert_eq!(
        (opened["state"].as_str(), opened["failures"].as_u64()),
        (Some("open"), Some(5))
    );
    assert!(opened["retry_at"].as_u64().is_some(), "{opened}");
    let m = get_json(&s.url("/v1/metrics")).await;
    assert_eq!(m["perType"]["hook"]["breaker"], "open");
    assert_eq!(m["perType"]["hook-b"]["breaker"], "open");
    let b = m["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == format!("{base}/hook"))
        .cloned()
        .expect("the target's breaker in /v1/metrics");
    assert_eq!(
        (b["failures"].as_u64(), b["policyFailures"].as_u64()),
        (Some(5), Some(5))
    );
    assert_eq!(breaker_state(&s, "hook").await.as_deref(), Some("1"));
    assert_eq!(breaker_state(&s, "hook-b").await.as_deref(), Some("1"));
    assert_eq!(breaker_state(&s, "echo").await.as_deref(), Some("0"));

    // Healthy again: after open_secs, three trials go through and close it.
    target.healthy.store(true, Ordering::SeqCst);
    let mut trials = 0;
    let until = Instant::now() + Duration::from_secs(10);
    while trials < 3 {
        assert!(Instant::now() < until, "{trials} trials in 10 s");
        let r = post(
            &s,
            "/v1/ops?wait=true",
            &json!({"type": "hook", "payload": 2}),
        )
        .await;
        match r.status().as_u16() {
            200 => {
                let v: Value = r.json().await.unwrap();
                assert_eq!(v["status"], "succeeded", "{v}");
                trials += 1;
            }
            503 => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("{other}: {}", r.text().await.unwrap()),
        }
    }
    let closed = next_event(&mut events, &mut buf, "breaker:closed").await;
    assert_eq!(closed["breaker"], format!("{base}/hook"));
    assert_eq!(closed["state"], "closed");
    assert_eq!(breaker_state(&s, "hook-b").await.as_deref(), Some("0"));
    let v = run_op(&s.base, &json!({"type": "hook-b", "payload": 3})).await;
    assert_eq!(v["status"], "succeeded", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_over_its_rate_gets_429_rate_limited() {
    let (s, _file) = start_with("[types.echo]\nrate_per_sec = 100\nburst = 10\n", &[]);
    // 500 at once: the burst goes in (and what a hundred a second adds meanwhile).
    let t0 = Instant::now();
    let r = post(
        &s,
        "/v1/ops/batch",
        &json!({"ops": (0..500).map(|i| json!({"type": "echo", "payload": i})).collect::<Vec<_>>()}),
    )
    .await;
    let took = t0.elapsed();
    assert_eq!(r.status(), 202);
    let v: Value = r.json().await.unwrap();
    let results = v["results"].as_array().unwrap();
    let admitted = results.iter().filter(|r| r["status"] == "queued").count();
    let limited: Vec<_> = results
        .iter()
        .filter(|r| r["error"] == "rate_limited")
        .collect();
    let most = 10 + (took.as_secs_f64() * 100.0).ceil() as usize;
    assert!(
        (10..=most).contains(&admitted),
        "{admitted} admitted of 500 in {took:?}"
    );
    assert_eq!(admitted + limited.len(), 500);
    let msg = limited[0]["message"].as_str().unwrap();
    assert!(
        msg.contains("`echo`") && msg.contains("types.echo.rate_per_sec") && msg.contains("100"),
        "{msg}"
    );
    // One at a time: 429 with Retry-After; other types are not limited.
    let mut refused = None;
    for _ in 0..50 {
        let r = post(&s, "/v1/ops", &json!({"type": "echo"})).await;
        if r.status() == 429 {
            refused = Some(r);
            break;
        }
    }
    let r = refused.expect("a 429 among 50 quick submissions");
    assert!(retry_after(&r) >= 1);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "rate_limited");
    for _ in 0..30 {
        let r = post(
            &s,
            "/v1/ops",
            &json!({"type": "resize", "payload": {"width": 2, "height": 2, "max": 1}}),
        )
        .await;
        assert_eq!(r.status(), 202);
    }
    // A second later, a second's worth goes in again.
    wait_until(
        "the rate to admit echo again",
        Duration::from_secs(5),
        || async { post(&s, "/v1/ops", &json!({"type": "echo"})).await.status() == 202 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_type_refuses_past_its_queue_and_its_deadline_cap() {
    let (s, _file) = start_with(
        "[types.sleep]\nmax_concurrent = 1\nqueue_capacity = 2\nmax_deadline_ms = 5000\n",
        &[],
    );
    // Over the type's deadline cap, under the node's: 400 naming both.
    let r = post(
        &s,
        "/v1/ops",
        &json!({"type": "sleep", "payload": {"ms": 1}, "deadline_ms": 5001}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "invalid_field");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("deadline_ms")
            && msg.contains("5000 ms")
            && msg.contains("types.sleep.max_deadline_ms"),
        "{msg}"
    );
    let r = post(
        &s,
        "/v1/ops",
        &json!({"type": "echo", "deadline_ms": 60000}),
    )
    .await;
    assert_eq!(r.status(), 202, "echo keeps the node's cap");

    // One runs, two wait, the fourth is refused: 429 overloaded naming the type.
    let r = post(
        &s,
        "/v1/ops",
        &json!({"type": "sleep", "payload": {"ms": 4000}}),
    )
    .await;
    assert_eq!(r.status(), 202);
    let metrics = s.url("/v1/metrics");
    wait_until(
        "the first sleep running",
        Duration::from_secs(5),
        || async { get_json(&metrics).await["perType"]["sleep"]["running"] == 1 },
    )
    .await;
    for _ in 0..2 {
        let r = post(
            &s,
            "/v1/ops",
            &json!({"type": "sleep", "payload": {"ms": 1}}),
        )
        .await;
        assert_eq!(r.status(), 202);
    }
    let r = post(
        &s,
        "/v1/ops",
        &json!({"type": "sleep", "payload": {"ms": 1}}),
    )
    .await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "overloaded");
    let msg = v["message"].as_str().unwrap();
    assert!(
        msg.contains("`sleep`") && msg.contains("(2 operations)"),
        "{msg}"
    );
    assert_eq!(
        get_json(&metrics).await["perType"]["sleep"]["queueCapacity"],
        2
    );
    let r = post(&s, "/v1/ops", &json!({"type": "echo"})).await;
    assert_eq!(r.status(), 202, "other types keep the node's capacity");
}
