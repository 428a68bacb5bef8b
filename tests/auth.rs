//! API tokens against the real binary: every endpoint of the api's own table answers each
//! kind of caller as its access says, a tokens file edited while the node runs takes
//! effect, operations belong to the token that submitted them, an idempotency key reused
//! with another payload is refused, the CLI and the bench send `--token`, and a node that would serve
//! anyone on a public address refuses to start.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{cli, client, wait_until, Server};
use opmesh::api::auth::{Access, ENDPOINTS};
use opmesh::auth::Scope;
use serde_json::{json, Value};

const ADMIN: &str = "admin-secret-000000";
const SUBMIT: &str = "submit-secret-00000";
const READ: &str = "read-secret-0000000";
const OTHER: &str = "other-secret-000000";

fn token(name: &str, secret: &str, scope: &str) -> String {
    format!("[[token]]\nname = \"{name}\"\nsecret = \"{secret}\"\nscopes = [\"{scope}\"]\n\n")
}

fn tokens_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("tokens.toml");
    let text = [
        token("deployer", ADMIN, "admin"),
        token("app", SUBMIT, "submit"),
        token("viewer", READ, "read"),
        token("other-app", OTHER, "submit"),
    ]
    .concat();
    std::fs::write(&path, text).unwrap();
    path
}

fn start(path: &Path) -> Server {
    Server::start(&[], &[("OPMESH_AUTH__TOKENS_FILE", path.to_str().unwrap())])
}

async fn send(
    s: &Server,
    method: &str,
    path: &str,
    secret: Option<&str>,
    body: Option<Value>,
) -> reqwest::Response {
    let mut req = client().request(method.parse().unwrap(), s.url(path));
    if let Some(secret) = secret {
        req = req.bearer_auth(secret);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    req.send().await.unwrap()
}

/// A concrete request for an endpoint's pattern.
fn concrete(path: &str) -> String {
    path.replace("{id}", &uuid::Uuid::new_v4().to_string())
        .replace("{type}", "echo")
}

fn body_for(method: &str, path: &str) -> Option<Value> {
    match (method, path) {
        ("POST", "/v1/ops") => Some(json!({"type": "echo", "payload": 1})),
        ("POST", "/v1/ops/batch") => Some(json!({"ops": [{"type": "echo"}]})),
        ("PUT", _) => Some(json!({"strategy": "round_robin"})),
        ("POST", "/v1/cluster/join") => Some(json!({"seed": "127.0.0.1:1"})),
        ("POST", "/v1/bench/hello") => Some(json!({})),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_each_caller_as_its_access_says() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&tokens_file(dir.path()));
    let callers: [(&str, Option<&str>, Option<Scope>); 5] = [
        ("no token", None, None),
        ("wrong token", Some("not-a-token-at-all"), None),
        ("read", Some(READ), Some(Scope::Read)),
        ("submit", Some(SUBMIT), Some(Scope::Submit)),
        ("admin", Some(ADMIN), Some(Scope::Admin)),
    ];
    for e in ENDPOINTS {
        // Leaving the cluster would stop the node under test: a lone node refuses it
        // anyway (409), which is all the access check needs.
        let method = e.method.as_str();
        for (who, secret, scope) in &callers {
            let path = concrete(e.path);
            let r = send(&s, method, &path, *secret, body_for(method, e.path)).await;
            let status = r.status().as_u16();
            let what = format!("{method} {} as {who}: {status}", e.path);
            let needed = match e.access {
                Access::Open | Access::Metrics => None,
                Access::Needs(scope) => Some(scope),
            };
            match (needed, scope) {
                (None, _) => assert!(status != 401 && status != 403, "{what}"),
                (Some(_), None) => {
                    assert_eq!(status, 401, "{what}");
                    assert_eq!(r.headers()["www-authenticate"], "Bearer", "{what}");
                    let body: Value = r.json().await.unwrap();
                    assert_eq!(body["error"], "unauthorized", "{what}");
                }
                (Some(needed), Some(has)) if has < &needed => {
                    assert_eq!(status, 403, "{what}");
                    let body: Value = r.json().await.unwrap();
                    assert_eq!(body["error"], "forbidden", "{what}");
                    let msg = body["message"].as_str().unwrap();
                    assert!(
                        msg.contains(&format!("needs scope {needed}")),
                        "{what}: {msg}"
                    );
                }
                (Some(_), Some(_)) => assert!(status != 401 && status != 403, "{what}"),
            }
        }
    }
    // A method an endpoint does not allow: 405 with Allow, whoever asks.
    let r = send(&s, "PATCH", "/v1/routes/echo", Some(ADMIN), None).await;
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, PUT, DELETE");
    let r = send(&s, "GET", "/v1/nothing-here", None, None).await;
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_open_unless_protected() {
    let dir = tempfile::tempdir().unwrap();
    let path = tokens_file(dir.path());
    let open = start(&path);
    assert_eq!(
        send(&open, "GET", "/metrics", None, None).await.status(),
        200
    );
    let s = Server::start(
        &[],
        &[
            ("OPMESH_AUTH__TOKENS_FILE", path.to_str().unwrap()),
            ("OPMESH_AUTH__PROTECT_METRICS", "true"),
        ],
    );
    assert_eq!(send(&s, "GET", "/metrics", None, None).await.status(), 401);
    assert_eq!(
        send(&s, "GET", "/metrics", Some(READ), None).await.status(),
        200
    );
    assert_eq!(send(&s, "GET", "/healthz", None, None).await.status(), 200);
    assert_eq!(send(&s, "GET", "/readyz", None, None).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tokens_file_edited_while_running_takes_effect() {
    let dir = tempfile::tempdir().unwrap();
    let path = tokens_file(dir.path());
    let s = start(&path);
    const NEW: &str = "added-later-secret-1";
    assert_eq!(
        send(&s, "GET", "/v1/routes", Some(NEW), None)
            .await
            .status(),
        401
    );
    // Replace the file the way a Secret update does: write aside, rename over.
    let aside = dir.path().join("tokens.new");
    std::fs::write(
        &aside,
        [
            token("deployer", ADMIN, "admin"),
            token("late", NEW, "read"),
        ]
        .concat(),
    )
    .unwrap();
    std::fs::rename(&aside, &path).unwrap();
    wait_until("the added token works", Duration::from_secs(15), || async {
        send(&s, "GET", "/v1/routes", Some(NEW), None)
            .await
            .status()
            == 200
    })
    .await;
    // The tokens left out of the new file are revoked.
    assert_eq!(
        send(&s, "GET", "/v1/routes", Some(READ), None)
            .await
            .status(),
        401
    );
    // A file that does not parse keeps the tokens the node has.
    std::fs::write(&path, "[[token]]\nname = \"broken\"\n").unwrap();
    tokio::time::sleep(opmesh::auth::RELOAD_EVERY * 2).await;
    assert_eq!(
        send(&s, "GET", "/v1/routes", Some(NEW), None)
            .await
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_belongs_to_its_token_and_a_reused_key_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&tokens_file(dir.path()));
    // Random ids, nothing shared between two.
    let submit = |secret: &'static str, body: Value| {
        let s = &s;
        async move { send(s, "POST", "/v1/ops", Some(secret), Some(body)).await }
    };
    let r = submit(SUBMIT, json!({"type": "echo", "payload": {"mine": true}})).await;
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 4);
    let path = format!("/v1/ops/{id}");
    wait_until(
        "the owner reads the result",
        Duration::from_secs(10),
        || async {
            let r = send(&s, "GET", &path, Some(SUBMIT), None).await;
            r.status() == 200 && r.json::<Value>().await.unwrap()["status"] == "succeeded"
        },
    )
    .await;
    // Another token, even one that may read, gets what an unknown id gets.
    for other in [OTHER, READ] {
        let r = send(&s, "GET", &path, Some(other), None).await;
        assert_eq!(r.status(), 404);
        assert_eq!(r.json::<Value>().await.unwrap()["error"], "not_found");
    }
    assert_eq!(
        send(&s, "GET", &path, Some(ADMIN), None).await.status(),
        200
    );

    // Failures: a token sees its own, an admin all.
    let r = submit(SUBMIT, json!({"type": "sleep", "payload": "not an object"})).await;
    let failed = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let listed = |secret: &'static str| {
        let s = &s;
        let failed = failed.clone();
        async move {
            let v: Value = send(s, "GET", "/v1/failures", Some(secret), None)
                .await
                .json()
                .await
                .unwrap();
            v["failures"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["id"] == failed.as_str())
        }
    };
    wait_until(
        "the failure is listed for its owner",
        Duration::from_secs(10),
        || listed(SUBMIT),
    )
    .await;
    assert!(listed(ADMIN).await);
    assert!(
        !listed(OTHER).await,
        "another token sees no failure of this one"
    );

    // Idempotency keys: the same key with another payload is refused; another token's
    // equal key is its own.
    let keyed = |n: u32| json!({"type": "echo", "payload": n, "idempotency_key": "order-7"});
    let wait = |secret: &'static str, body: Value| {
        let s = &s;
        async move { send(s, "POST", "/v1/ops?wait=true", Some(secret), Some(body)).await }
    };
    let r = wait(SUBMIT, keyed(1)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["result"], 1);
    let r = wait(SUBMIT, keyed(1)).await;
    assert_eq!(
        r.json::<Value>().await.unwrap()["cached"],
        true,
        "a true repeat is answered from the cache"
    );
    let r = wait(SUBMIT, keyed(2)).await;
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "idempotency_key_reused");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("idempotency_key"),
        "{body}"
    );
    let r = wait(OTHER, keyed(2)).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        (v["result"].clone(), v["cached"].clone()),
        (json!(2), json!(false))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&tokens_file(dir.path()));
    let (code, _, err) = cli(&["routes", "list", "--target", &s.base]);
    assert_ne!(code, 0);
    assert!(err.contains("401") && err.contains("unauthorized"), "{err}");
    let (code, out, err) = cli(&["routes", "list", "--target", &s.base, "--token", READ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("echo") || out.contains("no routes") || !out.is_empty(),
        "{out}"
    );
    let (code, _, err) = cli(&[
        "routes",
        "set",
        "echo",
        "--strategy",
        "round_robin",
        "--target",
        &s.base,
        "--token",
        READ,
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("403") && err.contains("needs scope admin"),
        "{err}"
    );
    // OPMESH_TOKEN, the way scripts pass it without showing it in the process list.
    let out = std::process::Command::new(common::BIN)
        .args([
            "submit", "echo", "5", "--wait", "--json", "--target", &s.base,
        ])
        .env("OPMESH_TOKEN", SUBMIT)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["result"], 5);
    // The bench sends it with every request, batched or not; without it every request
    // is refused, and the run fails naming why.
    for batch in [None, Some("10")] {
        let mut argv = vec![
            "bench",
            "--target",
            &s.base,
            "--ops",
            "100",
            "--concurrency",
            "4",
            "--warmup",
            "0",
            "--json",
        ];
        argv.extend(batch.map(|b| ["--batch", b]).into_iter().flatten());
        let (code, _, err) = cli(&argv);
        assert_ne!(code, 0);
        assert!(err.contains("HTTP 401"), "{err}");
        argv.extend(["--token", SUBMIT]);
        let (code, out, err) = cli(&argv);
        assert_eq!(code, 0, "{err}");
        let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        assert_eq!(
            (v["ops"].as_u64(), v["errors"].as_u64()),
            (Some(100), Some(0)),
            "{v}"
        );
    }
}

#[test]
fn a_public_address_without_tokens_refuses_to_start() {
    let (code, _, err) = cli(&["serve", "--http-addr", "0.0.0.0:0"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("auth.tokens_file") && err.contains("auth.anonymous"),
        "{err}"
    );
    // Saying so explicitly is accepted (checked without binding).
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--http-addr", "0.0.0.0:0", "--check-config"])
        .env("OPMESH_AUTH__ANONYMOUS", "true")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("auth: none (anonymous"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_changes_are_audited_with_the_tokens_name() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&tokens_file(dir.path()));
    let r = send(
        &s,
        "PUT",
        "/v1/routes/echo",
        Some(ADMIN),
        Some(json!({"strategy": "least_loaded"})),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        send(&s, "DELETE", "/v1/routes/echo", Some(ADMIN), None)
            .await
            .status(),
        200
    );
    let v: Value = send(&s, "GET", "/v1/audit?limit=10", Some(ADMIN), None)
        .await
        .json()
        .await
        .unwrap();
    let entries: Vec<(String, String, String)> = v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap().to_owned();
            (s("by"), s("action"), s("detail"))
        })
        .collect();
    assert_eq!(
        entries,
        [
            ("deployer".into(), "route.remove".into(), String::new()),
            (
                "deployer".into(),
                "route.set".into(),
                "least_loaded []".into()
            ),
        ]
    );
    let r = send(&s, "GET", "/v1/audit?limit=0", Some(ADMIN), None).await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("1..=10000"));
}
