//! The journal of accepted operations (`engine.journal = true`) with the real binary: an
//! origin killed with `kill -9` after accepting 500 operations, restarted from its data
//! dir, answers every accepted id with a terminal status; a clean stop leaves nothing to
//! run again; and the journal without a data dir refuses to start.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{client, follow_ops, get_json, get_text, is_terminal, wait_until, Server, BIN};
use serde_json::{json, Value};

/// Every operation sleeps this long: longer than the submissions take, so none has
/// finished when the node is killed.
const SLEEP_MS: u64 = 5_000;

const JOURNAL_ON: &[(&str, &str)] = &[("OPMESH_ENGINE__JOURNAL", "true")];

fn start(data_dir: &std::path::Path) -> Server {
    Server::start(&["--data-dir", data_dir.to_str().unwrap()], JOURNAL_ON)
}

async fn journal_figures(s: &Server) -> Value {
    let m = get_json(&s.url("/v1/metrics")).await;
    assert!(
        m["journal"].is_object(),
        "/v1/metrics has a journal section"
    );
    m["journal"].clone()
}

/// Submits `n` sleeping operations, half one per request and half in batches of 25, all
/// answered 202; returns their ids.
async fn submit_accepted(s: &Server, n: usize) -> Vec<String> {
    let http = client();
    let op = |i: usize| {
        let mut op = json!({"type": "sleep", "payload": {"ms": SLEEP_MS}});
        if i % 2 == 0 {
            op["idempotency_key"] = json!(format!("order-{i}"));
        }
        op
    };
    let singles = (0..n / 2).map(|i| {
        let req = http.post(s.url("/v1/ops")).json(&op(i));
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 202, "a single submission is accepted");
            let v: Value = r.json().await.unwrap();
            vec![v["id"].as_str().unwrap().to_owned()]
        }
    });
    let batches = (n / 2..n).step_by(25).map(|start| {
        let ops: Vec<Value> = (start..(start + 25).min(n)).map(op).collect();
        let req = http
            .post(s.url("/v1/ops/batch"))
            .json(&json!({ "ops": ops }));
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 202, "a batch is accepted");
            let v: Value = r.json().await.unwrap();
            v["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| {
                    assert_eq!(a["status"], "queued", "{a}");
                    a["id"].as_str().unwrap().to_owned()
                })
                .collect::<Vec<_>>()
        }
    });
    let (a, b) = tokio::join!(
        futures::future::join_all(singles),
        futures::future::join_all(batches)
    );
    let ids: Vec<String> = a.into_iter().chain(b).flatten().collect();
    assert_eq!(ids.len(), n);
    ids
}

/// Reads every id until it is terminal (or `within` passes); returns the statuses, each
/// id once.
async fn follow(s: &Server, ids: &[String], within: Duration) -> BTreeMap<String, String> {
    let answers = follow_ops(s, ids, within).await;
    ids.iter()
        .map(|id| {
            let v = answers.get(id);
            let status = v.and_then(|v| v["status"].as_str());
            let Some(status) = status else {
                panic!("operation {id} is readable after the restart: {v:?}");
            };
            assert!(
                v.is_some_and(is_terminal),
                "operation {id} still {status} {within:?} after the restart"
            );
            (id.clone(), status.to_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_killed_after_accepting_500_operations_runs_every_one_after_its_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = start(dir.path());
    let t0 = Instant::now();
    let ids = submit_accepted(&s, 500).await;
    let took = t0.elapsed();
    // The premise: every accepted operation is still in the journal when the node dies.
    let before = journal_figures(&s).await;
    assert!(
        took < Duration::from_millis(SLEEP_MS - 1_000),
        "500 submissions took {took:?}: too slow for this test, whose operations sleep \
         {SLEEP_MS} ms"
    );
    assert_eq!(before["entries"], 500, "{before}");
    assert_eq!(before["appended"], 500, "{before}");

    s.child.kill().unwrap(); // SIGKILL: no drain, no close.
    s.child.wait().unwrap();

    let s = start(dir.path());
    let after = journal_figures(&s).await;
    assert_eq!(
        after["recovered"],
        json!({"resubmitted": 500, "expired": 0, "refused": 0}),
        "{after}"
    );
    let statuses = follow(&s, &ids, Duration::from_secs(60)).await;
    let not_ok: Vec<_> = statuses
        .iter()
        .filter(|(_, st)| *st != "succeeded")
        .collect();
    assert!(
        not_ok.is_empty(),
        "{} of 500 did not succeed, first: {:?}",
        not_ok.len(),
        not_ok.first()
    );
    wait_until("the journal is empty", Duration::from_secs(10), || async {
        journal_figures(&s).await["entries"] == 0
    })
    .await;
    let prom = get_text(&s.url("/metrics")).await;
    assert!(
        prom.lines().any(|l| l == "opmesh_journal_entries 0"),
        "/metrics shows the empty journal"
    );
    assert!(
        prom.lines()
            .any(|l| l == "opmesh_journal_recovered_total{outcome=\"resubmitted\"} 500"),
        "/metrics counts the recovered operations"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_leaves_nothing_to_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = start(dir.path());
    let http = client();
    let mut ids = Vec::new();
    for i in 0..20 {
        let r = http
            .post(s.url("/v1/ops"))
            .json(&json!({"type": "sleep", "payload": {"ms": 10 * i}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        ids.push(
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    // Waited submissions are not journaled.
    let r = http
        .post(s.url("/v1/ops?wait=true"))
        .json(&json!({"type": "echo", "payload": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(journal_figures(&s).await["appended"], 20);
    s.signal("TERM");
    assert_eq!(
        s.wait_exit(Duration::from_secs(30)),
        Some(0),
        "a clean drain"
    );

    let s = start(dir.path());
    let after = journal_figures(&s).await;
    assert_eq!(after["entries"], 0, "{after}");
    assert_eq!(
        after["recovered"],
        json!({"resubmitted": 0, "expired": 0, "refused": 0}),
        "{after}"
    );
}

#[test]
fn the_journal_without_a_data_dir_refuses_to_start_naming_both_keys() {
    let out = Command::new(BIN)
        .args(["serve", "--http-addr", "127.0.0.1:0"])
        .env("OPMESH_ENGINE__JOURNAL", "true")
        .env("RUST_LOG", "warn")
        .output()
        .expect("the opmesh binary runs");
    assert_eq!(out.status.code(), Some(2), "a configuration error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`cluster.data_dir` must be set because `engine.journal` is set")
            && err.contains("--data-dir"),
        "{err}"
    );
}
