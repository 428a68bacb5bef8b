//! The built-in `http` handler against a real HTTP endpoint in the test process: the
//! payload is POSTed, the answer is the result, 5xx and timeouts are retried, 4xx is not.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix_web::{web, App, HttpResponse, HttpServer};
use common::{client, Server};
use serde_json::{json, Value};

#[derive(Default)]
struct Hits {
    ok: AtomicUsize,
    flaky: AtomicUsize,
    bad: AtomicUsize,
    slow: AtomicUsize,
}

/// Starts the webhook endpoints on a free loopback port; returns its base URL.
fn start_endpoint(hits: Arc<Hits>) -> String {
    let data = web::Data::from(hits);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route(
                "/ok",
                web::post().to(
                    |h: web::Data<Hits>, req: actix_web::HttpRequest, body: web::Bytes| async move {
                        h.ok.fetch_add(1, Ordering::SeqCst);
                        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let id = req
                            .headers()
                            .get("x-opmesh-op-id")
                            .map(|v| v.to_str().unwrap_or("").to_owned());
                        HttpResponse::Ok().json(json!({"got": v, "op_id": id}))
                    },
                ),
            )
            .route(
                "/flaky",
                web::post().to(|h: web::Data<Hits>| async move {
                    // Fails twice, then works.
                    if h.flaky.fetch_add(1, Ordering::SeqCst) < 2 {
                        HttpResponse::ServiceUnavailable().finish()
                    } else {
                        HttpResponse::Ok().body("plain text")
                    }
                }),
            )
            .route(
                "/bad",
                web::post().to(|h: web::Data<Hits>| async move {
                    h.bad.fetch_add(1, Ordering::SeqCst);
                    HttpResponse::BadRequest().finish()
                }),
            )
            .route(
                "/slow",
                web::post().to(|h: web::Data<Hits>| async move {
                    h.slow.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                    HttpResponse::Ok().finish()
                }),
            )
    })
    .workers(1)
    .disable_signals()
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.addrs()[0];
    tokio::spawn(server.run());
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_handler_posts_the_payload_and_retries_what_may_pass() {
    let hits = Arc::new(Hits::default());
    let base = start_endpoint(hits.clone());
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("hooks.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[retry]
initial_backoff_ms = 1
max_backoff_ms = 5

[[handlers.http]]
type = "hook-ok"
url = "{base}/ok"
timeout_ms = 2000

[[handlers.http]]
type = "hook-flaky"
url = "{base}/flaky"
timeout_ms = 2000
max_attempts = 3

[[handlers.http]]
type = "hook-bad"
url = "{base}/bad"
timeout_ms = 2000
max_attempts = 3

[[handlers.http]]
type = "hook-slow"
url = "{base}/slow"
timeout_ms = 100
max_attempts = 2
"#
        ),
    )
    .unwrap();
    let s = Server::start(&["--config", cfg.to_str().unwrap()], &[]);
    let submit = |ty: &'static str, payload: Value| {
        let url = s.url("/v1/ops?wait=true");
        async move {
            let r = client()
                .post(url)
                .json(&json!({"type": ty, "payload": payload}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let v = submit("hook-ok", json!({"order": 7})).await;
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["result"]["got"], json!({"order": 7}));
    assert_eq!(v["result"]["op_id"], v["id"]);
    assert_eq!(hits.ok.load(Ordering::SeqCst), 1);

    let v = submit("hook-flaky", json!(1)).await;
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["attempts"], 3);
    assert_eq!(v["result"], "plain text");

    let v = submit("hook-bad", json!(1)).await;
    assert_eq!(v["status"], "failed");
    assert!(v["error"].as_str().unwrap().contains("400"), "{v}");
    assert_eq!(hits.bad.load(Ordering::SeqCst), 1, "4xx is not retried");

    let v = submit("hook-slow", json!(1)).await;
    assert_eq!(v["status"], "failed");
    assert!(v["error"].as_str().unwrap().contains("timed out"), "{v}");
    assert_eq!(v["attempts"], 2);
    assert_eq!(hits.slow.load(Ordering::SeqCst), 2);
}
