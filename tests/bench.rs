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
    // As is, and with the shards on threads of their own (the drivers on them).
    for shard_threads in [false, true] {
        let mut args = vec![
            "bench",
            "--in-process",
            "--ops",
            "5000",
            "--concurrency",
            "64",
            "--json",
        ];
        if shard_threads {
            args.push("--shard-threads");
        }
        let (code, out, err) = cli(&args);
        assert_eq!(code, 0, "{err}");
        let v = last_json(&out);
        check(&v, 5000);
        assert!(v["rss_peak_bytes"].as_u64().unwrap() >= v["rss_idle_bytes"].as_u64().unwrap());
        assert_eq!(v["rss_peak_source"], "vmhwm_reset", "{v}");
        assert_eq!(v["latency_from"], "sent", "{v}");
        assert_eq!(
            (v["error_ratio"].as_f64(), v["max_error_ratio"].as_f64()),
            (Some(0.0), Some(0.0))
        );
        assert!(v.get("service_p99_us").is_none(), "{v}");
        assert_eq!(v.get("shard_threads").is_some(), shard_threads, "{v}");
    }
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
    let v = last_json(&out);
    check(&v, 2000);
    // Latency from each operation's slot in the schedule, the service time beside it.
    assert_eq!(v["latency_from"], "intended_start", "{v}");
    for k in [
        "service_p50_us",
        "service_p99_us",
        "service_max_us",
        "send_lag_p99_us",
        "delayed_ops",
    ] {
        assert!(v[k].is_number(), "{k} missing in {v}");
    }
}

/// `--client-threads 3`: the bench process runs three threads of its own, each of which
/// carries part of the load (read from `/proc` while it runs: a thread that only waits
/// runs for microseconds), and they are all it uses to send.
#[cfg(target_os = "linux")]
#[test]
fn http_bench_sends_from_threads_of_its_own() {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    let s = Server::start(&[], &[]);
    let mut bench = std::process::Command::new(env!("CARGO_BIN_EXE_opmesh"))
        .args([
            "bench",
            "--target",
            &s.base,
            "--ops",
            "300000",
            "--batch",
            "100",
            "--concurrency",
            "6",
            "--client-threads",
            "3",
            "--json",
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the opmesh binary runs");
    let task = format!("/proc/{}/task", bench.id());
    // Each client thread (names are cut at 15 bytes) and the nanoseconds it has run.
    let threads = || -> BTreeMap<String, u64> {
        let Ok(dir) = std::fs::read_dir(&task) else {
            return BTreeMap::new();
        };
        dir.filter_map(|t| {
            let t = t.ok()?.path();
            let name = std::fs::read_to_string(t.join("comm")).ok()?;
            let ran = std::fs::read_to_string(t.join("schedstat")).ok()?;
            let ran: u64 = ran.split_whitespace().next()?.parse().ok()?;
            let tid = t.file_name()?.to_str()?.to_owned();
            (name.trim() == "opmesh-bench-cl").then_some((tid, ran))
        })
        .collect()
    };
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while bench.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the bench did not end");
        seen.extend(threads());
        std::thread::sleep(Duration::from_millis(2));
    }
    let out = bench.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let v = last_json(&String::from_utf8_lossy(&out.stdout));
    check(&v, 300_000);
    assert_eq!(v["client_threads"], 3, "{v}");
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.values().all(|&ns| ns > 1_000_000),
        "a client thread sat idle: {seen:?}"
    );
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

/// A minimal HTTP/1.1 server with keep-alive that answers `POST /v1/ops?wait=true` as a
/// node would, except that every third operation fails. Its threads end with the test.
fn flaky_server() -> String {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicU64::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let count = count.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut len = 0;
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        if h == "\r\n" {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let n = count.fetch_add(1, Ordering::Relaxed);
                    let answer = if n % 3 == 2 {
                        format!(r#"{{"id":"{n}","status":"failed","error":"asked to fail"}}"#)
                    } else {
                        format!(r#"{{"id":"{n}","status":"succeeded","result":1}}"#)
                    };
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if stream.write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

#[test]
fn failures_are_counted_apart_and_fail_the_run_beyond_the_allowed_ratio() {
    let url = flaky_server();
    let argv = [
        "bench",
        "--target",
        &url,
        "--ops",
        "300",
        "--concurrency",
        "4",
        "--warmup",
        "0",
        "--json",
    ];
    // By default no failure is allowed: the report is printed, then the run fails.
    let (code, out, err) = cli(&argv);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("100 of 300 operations failed"), "{err}");
    assert!(err.contains("--max-error-ratio 0"), "{err}");
    assert!(err.contains("asked to fail"), "{err}");
    let v = last_json(&out);
    assert_eq!(
        (v["ops"].as_u64(), v["errors"].as_u64()),
        (Some(200), Some(100)),
        "{v}"
    );
    assert_eq!(
        v["error_samples"][0]["reason"],
        "operation failed: asked to fail"
    );
    assert_eq!(v["error_samples"][0]["count"], 100);
    let ratio = v["error_ratio"].as_f64().unwrap();
    assert!((ratio - 1.0 / 3.0).abs() < 1e-9, "{v}");
    // Allowed: the same run passes.
    let mut allowed = argv.to_vec();
    allowed.extend(["--max-error-ratio", "0.34"]);
    let (code, out, err) = cli(&allowed);
    assert_eq!(code, 0, "{err}");
    assert_eq!(last_json(&out)["max_error_ratio"], 0.34);
    // The text report lists the reasons beside the count.
    let (code, out, _) = cli(&argv[..argv.len() - 1]);
    assert_ne!(code, 0);
    assert!(
        out.contains("100 × operation failed: asked to fail"),
        "{out}"
    );
}
