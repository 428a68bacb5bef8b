//! `opmesh bench` as a user runs it: in process and against a running node, ending with
//! exactly one JSON line in the documented shape.

mod common;

use common::{cli, Server};
use serde_json::Value;

fn last_json(out: &str) -> Value {
    let line = out.lines().last().expect("bench printed something");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

fn check(v: &Value, ops: u64) {
    for k in opmesh::bench::REPORT_KEYS {
        assert!(v[k].is_number(), "{k} missing or not a number: {v}");
    }
    assert_eq!(v["ops"], ops);
    assert_eq!(v["errors"], 0);
    let p: Vec<u64> = ["p50_us", "p95_us", "p99_us", "p999_us", "max_us"]
        .iter()
        .map(|k| v[*k].as_u64().unwrap())
        .collect();
    assert!(
        p.windows(2).all(|w| w[0] <= w[1]),
        "percentiles in order: {p:?}"
    );
    assert!(v["ops_per_sec"].as_f64().unwrap() > 0.0);
}

#[test]
fn in_process_bench_reports_one_json_line() {
    let (code, out, err) = cli(&[
        "bench",
        "--in-process",
        "--ops",
        "5000",
        "--concurrency",
        "64",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v = last_json(&out);
    check(&v, 5000);
    assert!(v["rss_peak_bytes"].as_u64().unwrap() >= v["rss_idle_bytes"].as_u64().unwrap());
    // Open loop at a fixed rate.
    let (code, out, err) = cli(&[
        "bench",
        "--in-process",
        "--ops",
        "2000",
        "--rate",
        "20000",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    check(&last_json(&out), 2000);
}

#[test]
fn http_bench_single_batch_and_baseline() {
    let s = Server::start(&[], &[]);
    let (code, out, err) = cli(&[
        "bench",
        "--target",
        &s.base,
        "--ops",
        "400",
        "--concurrency",
        "8",
        "--baseline",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v = last_json(&out);
    check(&v, 400);
    check(&v["baseline"], 400);
    let (code, out, err) = cli(&[
        "bench", "--target", &s.base, "--ops", "2000", "--batch", "100", "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    check(&last_json(&out), 2000);
}

#[test]
fn bench_refuses_bad_arguments_clearly() {
    let (code, _, err) = cli(&["bench", "--ops", "10"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("--in-process") && err.contains("--target"),
        "{err}"
    );
    let (code, _, err) = cli(&["bench", "--in-process", "--batch", "10"]);
    assert_ne!(code, 0);
    assert!(err.contains("--batch"), "{err}");
    let (code, _, err) = cli(&["bench", "--in-process", "--type", "nope", "--ops", "10"]);
    assert_ne!(code, 0);
    assert!(err.contains("nope"), "{err}");
}
