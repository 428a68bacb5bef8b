//! The built-in `http` handler against a real HTTP endpoint in the test process: the
//! payload is POSTed, the answer is the result, 5xx and timeouts are retried, 4xx is not.
//! Over https: the target's `ca_file` is trusted, answers are cut at
//! `max_response_bytes`, redirects are followed only when asked, and credentials in the
//! URL never show in errors, `/v1/failures` or the event stream.

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
    /// The `Idempotency-Key` of every call to `/flaky`, in order.
    flaky_keys: parking_lot::Mutex<Vec<String>>,
}

fn idempotency_key(req: &actix_web::HttpRequest) -> String {
    req.headers()
        .get("idempotency-key")
        .map_or(String::new(), |v| v.to_str().unwrap_or("").to_owned())
}

/// Starts the webhook endpoints on a free loopback port; returns its base URL.
fn start_endpoint(hits: Arc<Hits>) -> String {
    let data = web::Data::from(hits);
    let server =
        HttpServer::new(move || {
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
                        let key = idempotency_key(&req);
                        HttpResponse::Ok().json(json!({"got": v, "op_id": id, "key": key}))
                    },
                ),
            )
            .route(
                "/flaky",
                web::post().to(|h: web::Data<Hits>, req: actix_web::HttpRequest| async move {
                    h.flaky_keys.lock().push(idempotency_key(&req));
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
    let submit_with = |body: Value| {
        let url = s.url("/v1/ops?wait=true");
        async move {
            let r = client().post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let submit =
        |ty: &'static str, payload: Value| submit_with(json!({"type": ty, "payload": payload}));
    let v = submit("hook-ok", json!({"order": 7})).await;
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["result"]["got"], json!({"order": 7}));
    assert_eq!(v["result"]["op_id"], v["id"]);
    // Without an idempotency key, the operation's id is the key of its effect.
    assert_eq!(v["result"]["key"], v["id"]);
    assert_eq!(hits.ok.load(Ordering::SeqCst), 1);
    let v =
        submit_with(json!({"type": "hook-ok", "payload": 1, "idempotency_key": "order-7 ä"})).await;
    assert_eq!(v["result"]["key"], "order-7 %C3%A4", "{v}");

    let v = submit("hook-flaky", json!(1)).await;
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["attempts"], 3);
    assert_eq!(v["result"], "plain text");
    // Every attempt carries the same key, so the target can apply the effect once.
    let id = v["id"].as_str().unwrap();
    assert_eq!(*hits.flaky_keys.lock(), [id, id, id]);

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

/// Starts the https webhook endpoints, serving `leaf`, on a free loopback port; returns
/// its port.
fn start_tls_endpoint(leaf: &common::tls::Leaf) -> u16 {
    const TEN_MB: usize = 10 << 20;
    let server = HttpServer::new(|| {
        App::new()
            .route(
                "/ok",
                web::post().to(|body: web::Bytes| async move {
                    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    HttpResponse::Ok().json(json!({"got": v}))
                }),
            )
            .route(
                // 10 MB with its length announced.
                "/big",
                web::post().to(|| async { HttpResponse::Ok().body(vec![b'x'; TEN_MB]) }),
            )
            .route(
                // 10 MB in chunks, no length: the handler only finds out by reading.
                "/big-stream",
                web::post().to(|| async {
                    let chunk = web::Bytes::from(vec![b'x'; 64 << 10]);
                    let chunks = futures::stream::iter(
                        std::iter::repeat_n(chunk, TEN_MB / (64 << 10))
                            .map(Ok::<_, std::convert::Infallible>),
                    );
                    HttpResponse::Ok().streaming(chunks)
                }),
            )
            .route(
                "/moved",
                web::post().to(|| async {
                    HttpResponse::TemporaryRedirect()
                        .insert_header(("location", "/ok"))
                        .finish()
                }),
            )
            .route(
                "/reject",
                web::post().to(|| async { HttpResponse::BadRequest().finish() }),
            )
    })
    .workers(1)
    .disable_signals()
    .listen_rustls_0_23(
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        leaf.server_config(),
    )
    .unwrap();
    let port = server.addrs()[0].port();
    tokio::spawn(server.run());
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhooks_trust_their_ca_file_cap_answers_and_follow_no_redirect_unasked() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::tls::Ca::new("hooks ca");
    let port = start_tls_endpoint(&ca.server("hooks"));
    let ca_file = ca.write(dir.path(), "hooks-ca.pem");
    let base = format!("https://localhost:{port}");
    let hook = |ty: &str, path: &str, extra: &str| {
        format!(
            "[[handlers.http]]\ntype = \"{ty}\"\nurl = \"{base}{path}\"\ntimeout_ms = 10000\n\
             max_attempts = 1\nca_file = {ca_file:?}\n{extra}\n"
        )
    };
    let cfg = dir.path().join("hooks.toml");
    std::fs::write(
        &cfg,
        [
            hook("tls-ok", "/ok", ""),
            hook("tls-big", "/big", ""),
            hook(
                "tls-big-stream",
                "/big-stream",
                "max_response_bytes = 65536",
            ),
            hook("tls-moved", "/moved", ""),
            hook("tls-moved-followed", "/moved", "follow_redirects = true"),
            // No ca_file: the system's roots do not know the test CA.
            format!(
                "[[handlers.http]]\ntype = \"tls-untrusted\"\nurl = \"{base}/ok\"\n\
                 timeout_ms = 10000\nmax_attempts = 1\n"
            ),
        ]
        .concat(),
    )
    .unwrap();
    let s = Server::start(&["--config", cfg.to_str().unwrap()], &[]);
    let submit = |ty: &'static str| {
        let url = s.url("/v1/ops?wait=true");
        async move {
            let r = client()
                .post(url)
                .json(&json!({"type": ty, "payload": {"n": 1}}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let error = |v: &Value| v["error"].as_str().unwrap_or_default().to_owned();

    let v = submit("tls-ok").await;
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["result"], json!({"got": {"n": 1}}));

    let v = submit("tls-big").await;
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(
        error(&v),
        format!("POST {base}/big: the answer is larger than max_response_bytes (1048576 bytes)")
    );
    let v = submit("tls-big-stream").await;
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(
        error(&v),
        format!(
            "POST {base}/big-stream: the answer is larger than max_response_bytes (65536 bytes)"
        )
    );

    let v = submit("tls-moved").await;
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(
        error(&v),
        format!(
            "POST {base}/moved answered 307 Temporary Redirect: redirects are not followed \
             (follow_redirects = false)"
        )
    );
    let v = submit("tls-moved-followed").await;
    assert_eq!(v["status"], "succeeded", "{v}");
    assert_eq!(v["result"], json!({"got": {"n": 1}}));

    let v = submit("tls-untrusted").await;
    assert_eq!(v["status"], "failed", "{v}");
    assert!(
        error(&v).starts_with(&format!("POST {base}/ok failed: "))
            && error(&v).contains("invalid peer certificate: UnknownIssuer"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_credentials_in_the_url_are_never_shown() {
    use futures::StreamExt as _;

    let dir = tempfile::tempdir().unwrap();
    let ca = common::tls::Ca::new("hooks ca");
    let port = start_tls_endpoint(&ca.server("hooks"));
    let ca_file = ca.write(dir.path(), "hooks-ca.pem");
    let cfg = dir.path().join("hooks.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[handlers.http]]\ntype = \"secret-hook\"\n\
             url = \"https://alice:hunter2@localhost:{port}/reject?token=s3cr3t#frag\"\n\
             timeout_ms = 10000\nmax_attempts = 1\nca_file = {ca_file:?}\n"
        ),
    )
    .unwrap();
    let s = Server::start(&["--config", cfg.to_str().unwrap()], &[]);

    // Subscribed before the operation runs, so its failure event is in the stream.
    let events = client()
        .get(s.url("/v1/events?types=operation:failure"))
        .timeout(std::time::Duration::from_secs(60))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let mut events = events.bytes_stream();
    // The greeting: from here on this client is subscribed.
    let mut greeting = String::new();
    while !greeting.contains(": opmesh events\n\n") {
        let chunk = events.next().await.expect("the greeting").unwrap();
        greeting.push_str(&String::from_utf8_lossy(&chunk));
    }

    let v = common::run_op(&s.base, &json!({"type": "secret-hook", "payload": 1})).await;
    assert_eq!(v["status"], "failed", "{v}");
    let shown = format!("https://localhost:{port}/reject");
    assert_eq!(
        v["error"],
        format!("POST {shown} answered 400 Bad Request"),
        "the error names the URL without its credentials"
    );
    let id = v["id"].as_str().unwrap().to_owned();
    let leaks = |text: &str| {
        ["alice", "hunter2", "s3cr3t", "token", "frag"]
            .into_iter()
            .filter(|secret| text.contains(secret))
            .collect::<Vec<_>>()
    };

    let got = s.url(&format!("/v1/ops/{id}"));
    let op = common::get_json(&got).await.to_string();
    assert!(op.contains(&shown) && leaks(&op).is_empty(), "{op}");

    let failures = s.url("/v1/failures");
    common::wait_until(
        "the failure is listed",
        std::time::Duration::from_secs(10),
        || async { common::get_json(&failures).await.to_string().contains(&id) },
    )
    .await;
    let listed = common::get_json(&failures).await.to_string();
    assert!(
        listed.contains(&shown) && leaks(&listed).is_empty(),
        "{listed}"
    );

    let mut seen = String::new();
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !seen.contains(&id) {
        let chunk = tokio::time::timeout_at(until, events.next())
            .await
            .unwrap_or_else(|_| panic!("no failure event for {id}; saw {seen}"))
            .expect("the stream goes on")
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains(&shown) && leaks(&seen).is_empty(), "{seen}");
}
