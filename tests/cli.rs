//! The command line against a running node: submit, get, routes, health, metrics, and
//! the configuration errors `serve` stops on.

mod common;

use common::{cli, Server};
use serde_json::Value;

fn json_of(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn submit_get_and_wait_through_the_cli() {
    let s = Server::start(&["--node-id", "cli-1"], &[]);
    let (code, out, err) = cli(&[
        "submit",
        "echo",
        r#"{"n": 7}"#,
        "--wait",
        "--json",
        "--target",
        &s.base,
    ]);
    assert_eq!(code, 0, "{err}");
    let v = json_of(&out);
    assert_eq!(v["status"], "succeeded");
    assert_eq!(v["result"]["n"], 7);
    assert_eq!(v["executed_by"], "cli-1");
    let id = v["id"].as_str().unwrap();
    let (code, out, _) = cli(&["get", id, "--json", "--target", &s.base]);
    assert_eq!(code, 0);
    assert_eq!(json_of(&out)["result"]["n"], 7);
    // Human output names the fields.
    let (code, out, _) = cli(&["submit", "echo", "1", "--wait", "--target", &s.base]);
    assert_eq!(code, 0);
    assert!(out.contains("status:      succeeded"), "{out}");
    // An idempotency key repeats from the cache.
    for expect_cached in [false, true] {
        let (_, out, _) = cli(&[
            "submit",
            "echo",
            "2",
            "--wait",
            "--json",
            "--idempotency-key",
            "k1",
            "--target",
            &s.base,
        ]);
        let v = json_of(&out);
        if expect_cached {
            // The stored result may still be on its way to the cache: then it joins.
            assert!(v["cached"] == true || v["attempts"] == 1, "{v}");
        }
    }
}

#[test]
fn routes_through_the_cli() {
    let s = Server::start(&["--node-id", "cli-2"], &[]);
    let (code, out, err) = cli(&[
        "routes",
        "set",
        "echo",
        "--strategy",
        "pinned",
        "--nodes",
        "cli-2",
        "--json",
        "--target",
        &s.base,
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_of(&out)["route"]["nodes"][0], "cli-2");
    let (code, out, _) = cli(&["routes", "list", "--json", "--target", &s.base]);
    assert_eq!(code, 0);
    let v = json_of(&out);
    assert_eq!(v["routes"]["echo"]["strategy"], "pinned");
    let (_, out, _) = cli(&["routes", "list", "--target", &s.base]);
    assert!(out.contains("echo") && out.contains("pinned"), "{out}");
    let (code, _, err) = cli(&[
        "routes",
        "set",
        "echo",
        "--strategy",
        "bogus",
        "--target",
        &s.base,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("strategy"), "{err}");
    let (code, _, _) = cli(&["routes", "delete", "echo", "--target", &s.base]);
    assert_eq!(code, 0);
    let (code, _, err) = cli(&["routes", "get", "echo", "--target", &s.base]);
    assert_ne!(code, 0);
    assert!(err.contains("404"), "{err}");
}

#[test]
fn health_and_metrics_through_the_cli() {
    let s = Server::start(&["--node-id", "cli-3"], &[]);
    cli(&["submit", "echo", "1", "--wait", "--target", &s.base]);
    let (code, out, _) = cli(&["health", "--json", "--target", &s.base]);
    assert_eq!(code, 0);
    assert_eq!(json_of(&out)["nodeId"], "cli-3");
    let (code, out, _) = cli(&["metrics", "--json", "--target", &s.base]);
    assert_eq!(code, 0);
    assert_eq!(json_of(&out)["completedOperations"], 1);
    let (code, out, _) = cli(&["metrics", "--target", &s.base]);
    assert_eq!(code, 0);
    assert!(out.contains("echo"), "{out}");
}

#[test]
fn client_errors_are_clear() {
    let (code, _, err) = cli(&[
        "submit",
        "echo",
        "{not json",
        "--target",
        "http://127.0.0.1:9",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("PAYLOAD is not valid JSON"), "{err}");
    let (code, _, err) = cli(&["health", "--target", "http://127.0.0.1:9"]);
    assert_ne!(code, 0);
    assert!(err.contains("could not reach the node"), "{err}");
}

#[test]
fn serve_stops_on_invalid_configuration_naming_the_key() {
    let out = std::process::Command::new(common::BIN)
        .args(["serve", "--http-addr", "127.0.0.1:0"])
        .env("OPMESH_ENGINE__MAX_CONCURRENT", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("engine.max_concurrent") && err.contains("allowed"),
        "{err}"
    );
    let (code, _, err) = cli(&["serve", "--profile", "fastest"]);
    assert_eq!(code, 2);
    assert!(err.contains("read-heavy"), "{err}");
    let (code, _, err) = cli(&["serve", "--http-addr", "not-an-address"]);
    assert_eq!(code, 2);
    assert!(err.contains("http.addr"), "{err}");
}

#[test]
fn every_profile_starts() {
    for p in opmesh::config::PROFILES {
        let s = Server::start(&["--profile", p], &[]);
        let (code, out, _) = cli(&[
            "submit", "echo", "1", "--wait", "--json", "--target", &s.base,
        ]);
        assert_eq!(code, 0, "profile {p}");
        assert_eq!(json_of(&out)["status"], "succeeded", "profile {p}");
    }
}
