//! The bench's own tests: its flags and their checks, then whole runs, in process and
//! against a fake HTTP server. The helpers here (`parse`, `assert_report_shape`) serve
//! the report's tests too.

use super::*;
use clap::Parser;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

/// Runs an in-process bench alone among the tests that reset the process's memory
/// high-water mark (see `rss::tests::RESETS`).
pub(super) async fn run_alone(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    let _alone = super::rss::tests::RESETS.lock().await;
    run_report(args).await
}

pub(super) fn parse(argv: &[&str]) -> BenchArgs {
    Cli::try_parse_from(std::iter::once("bench").chain(argv.iter().copied()))
        .expect("flags parse")
        .args
}

const EXTRAS: [&str; 35] = [
    "latency_from",
    "service_p50_us",
    "service_p95_us",
    "service_p99_us",
    "service_p999_us",
    "service_max_us",
    "send_lag_p50_us",
    "send_lag_p99_us",
    "send_lag_p999_us",
    "send_lag_max_us",
    "error_ratio",
    "max_error_ratio",
    "error_samples",
    "mode",
    "target",
    "type",
    "payload_bytes",
    "concurrency",
    "requests",
    "batch",
    "accepted_only",
    "rate",
    "delayed_ops",
    "warmup_ops",
    "first_error",
    "executed_by",
    "executed_elsewhere",
    "rss_idle_bytes",
    "rss_peak_bytes",
    "rss_delta_bytes",
    "rss_peak_source",
    "baseline",
    "sampling",
    "trace_export",
    "client_threads",
];

pub(super) fn assert_report_shape(v: &serde_json::Value) {
    let obj = v.as_object().expect("the report is a JSON object");
    for k in REPORT_KEYS {
        assert!(
            obj.get(k).is_some_and(|x| x.is_number()),
            "`{k}` is missing or not a number in {v}"
        );
    }
    for k in obj.keys() {
        assert!(
            REPORT_KEYS.contains(&k.as_str()) || EXTRAS.contains(&k.as_str()),
            "undocumented key `{k}`"
        );
    }
}

fn assert_ordered(r: &BenchReport) {
    assert!(r.p50_us >= 1, "{r:?}");
    assert!(r.p50_us <= r.p95_us, "{r:?}");
    assert!(r.p95_us <= r.p99_us, "{r:?}");
    assert!(r.p99_us <= r.p999_us, "{r:?}");
    assert!(r.p999_us <= r.max_us, "{r:?}");
}

#[test]
fn payload_of_n_bytes_is_json_of_exactly_n_bytes() {
    for n in [1, 2, 3, 10, 64, 1000, 65_536] {
        let p = payload_of_size(n).unwrap();
        assert_eq!(p.len(), n);
        serde_json::from_slice::<serde_json::Value>(p.as_bytes())
            .unwrap_or_else(|e| panic!("{n} bytes: {e}"));
    }
    assert!(payload_of_size(0).is_err());
    let args = parse(&["--in-process", "--payload-bytes", "100"]);
    assert_eq!(args.plan().unwrap().payload.len(), 100);
}

#[test]
fn flags_have_their_documented_defaults() {
    let a = parse(&["--in-process"]);
    assert_eq!(
        (a.ops, a.concurrency, a.op_type.as_str(), a.payload_bytes),
        (200_000, 256, "echo", 64)
    );
    assert!(a.rate.is_none() && a.batch.is_none() && !a.baseline && !a.json);
    let plan = a.plan().unwrap();
    assert_eq!(plan.warmup, 10_000);
    assert_eq!(
        parse(&["--in-process", "--ops", "500"])
            .plan()
            .unwrap()
            .warmup,
        50
    );
    let a = parse(&[
        "--target",
        "http://127.0.0.1:9/",
        "--ops",
        "7",
        "--concurrency",
        "3",
        "--type",
        "sleep",
        "--payload",
        r#"{"ms":5}"#,
        "--rate",
        "100",
        "--batch",
        "4",
        "--baseline",
        "--warmup",
        "0",
        "--json",
    ]);
    let plan = a.plan().unwrap();
    assert_eq!(
        (plan.ops, plan.concurrency, plan.batch, plan.warmup),
        (7, 3, Some(4), 0)
    );
    assert_eq!(plan.payload.as_str(), r#"{"ms":5}"#);
    assert!(a.json && plan.baseline && plan.rate == Some(100.0));
}

#[test]
fn invalid_arguments_are_clear_errors() {
    let err = |argv: &[&str]| parse(argv).plan().err().expect("an error").to_string();
    assert!(err(&[]).contains("--in-process"), "{}", err(&[]));
    assert!(err(&[]).contains("--target"));
    let both = err(&["--in-process", "--target", "http://127.0.0.1:8080"]);
    assert!(both.contains("exactly one"), "{both}");
    let batch = err(&["--in-process", "--batch", "10"]);
    assert!(batch.contains("--batch needs --target"), "{batch}");
    assert!(err(&["--in-process", "--baseline"]).contains("--baseline needs --target"));
    assert!(err(&["--target", "http://h:1", "--batch", "0"]).contains("--batch"));
    let json = err(&["--in-process", "--payload", "{nope"]);
    assert!(json.contains("--payload is not valid JSON"), "{json}");
    let ftp = err(&["--target", "ftp://h:1"]);
    assert!(
        ftp.contains("http://HOST:PORT or https://HOST:PORT"),
        "{ftp}"
    );
    let cacert = err(&["--target", "https://h:1", "--cacert", "/nonexistent/ca.pem"]);
    assert!(
        cacert.contains("--cacert") && cacert.contains("/nonexistent/ca.pem"),
        "{cacert}"
    );
    assert!(err(&["--target", "not a url"]).contains("not a URL"));
    assert!(
        err(&["--in-process", "--client-threads", "2"]).contains("--client-threads needs --target")
    );
    assert!(err(&["--target", "http://h:1", "--client-threads", "0"])
        .contains("--client-threads must be at least 1"));
    assert!(err(&["--in-process", "--ops", "0"]).contains("--ops"));
    assert!(err(&["--in-process", "--concurrency", "0"]).contains("--concurrency"));
    assert!(err(&["--in-process", "--rate", "0"]).contains("--rate"));
    assert!(err(&["--in-process", "--rate", "NaN"]).contains("--rate"));
    assert!(err(&["--in-process", "--payload-bytes", "0"]).contains("--payload-bytes"));
    for ratio in ["1.5", "-0.1", "NaN"] {
        let e = err(&["--in-process", &format!("--max-error-ratio={ratio}")]);
        assert!(
            e.contains("--max-error-ratio must be from 0.0 to 1.0"),
            "{e}"
        );
    }
}

#[test]
fn targets_are_normalised() {
    assert_eq!(
        parse_target("http://127.0.0.1:8080").unwrap().as_str(),
        "http://127.0.0.1:8080/"
    );
    assert_eq!(
        parse_target("http://h:1/api?x=1").unwrap().as_str(),
        "http://h:1/api/"
    );
    assert_eq!(
        parse_target("https://h:7070").unwrap().as_str(),
        "https://h:7070/"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_echo_run_counts_every_op() {
    let args = parse(&[
        "--in-process",
        "--ops",
        "3000",
        "--concurrency",
        "64",
        "--json",
    ]);
    let r = run_alone(&args).await.unwrap();
    assert_eq!(r.ops, 3000);
    assert_eq!(r.errors, 0);
    assert_eq!(r.requests, 3000);
    assert_eq!(r.warmup_ops, 300);
    assert!(r.seconds > 0.0 && r.ops_per_sec > 0.0);
    assert_ordered(&r);
    assert_eq!(r.mode, "in-process");
    let (idle, peak) = (r.rss_idle_bytes.unwrap(), r.rss_peak_bytes.unwrap());
    assert!(idle > 0 && peak >= idle);
    assert_eq!(r.rss_delta_bytes, Some(peak - idle));
    // Where the kernel lets the mark be reset (Linux 4.0 and later), it was.
    assert!(r.rss_peak_source.is_some(), "{r:?}");
    #[cfg(target_os = "linux")]
    assert_eq!(r.rss_peak_source, Some(PeakSource::VmhwmReset));
    assert!(r.first_error.is_none());
    assert!(r.error_samples.is_empty() && r.error_ratio == 0.0);
    assert_eq!(r.latency_from, "sent");
    assert!(r.service_p50_us.is_none());
    r.check().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_type_fails_the_run_naming_the_type() {
    let args = parse(&["--in-process", "--type", "no-such-type", "--ops", "1000"]);
    let e = run_alone(&args).await.unwrap_err().to_string();
    assert!(e.contains("first 100 requests"), "{e}");
    assert!(e.contains("no-such-type"), "{e}");
    // A run shorter than 100 requests fails too when every request failed.
    let args = parse(&[
        "--in-process",
        "--type",
        "no-such-type",
        "--ops",
        "5",
        "--warmup",
        "0",
    ]);
    let e = run_alone(&args).await.unwrap_err().to_string();
    assert!(e.contains("all 5 requests"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_handler_is_quoted() {
    // `sleep` with a bad payload fails in its handler, after being accepted.
    let args = parse(&[
        "--in-process",
        "--type",
        "sleep",
        "--payload",
        r#"{"ms":"soon"}"#,
        "--ops",
        "50",
        "--warmup",
        "0",
    ]);
    let e = run_alone(&args).await.unwrap_err().to_string();
    assert!(e.contains("sleep expects"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_many_slots_as_ops_put_every_op_in_flight_at_once() {
    let args = parse(&[
        "--in-process",
        "--type",
        "sleep",
        "--payload",
        r#"{"ms":300}"#,
        "--ops",
        "400",
        "--concurrency",
        "400",
        "--warmup",
        "0",
    ]);
    let r = run_alone(&args).await.unwrap();
    assert_eq!((r.ops, r.errors), (400, 0));
    // One wave of 300 ms, not two: no driver held back operations it had no slot for.
    assert!(r.seconds < 0.55, "{r:?}");
    assert!(r.p50_us >= 300_000, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_keeps_to_the_rate() {
    let args = parse(&[
        "--in-process",
        "--ops",
        "2000",
        "--rate",
        "20000",
        "--concurrency",
        "64",
        "--warmup",
        "0",
    ]);
    let r = run_alone(&args).await.unwrap();
    assert_eq!((r.ops, r.errors), (2000, 0));
    // The last operation is not due before (2000 - drivers) / 20000 s.
    assert!(r.seconds >= 0.095, "{r:?}");
    assert!(r.ops_per_sec <= 21_000.0, "{r:?}");
    assert!(r.delayed_ops.is_some());
    assert_ordered(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_counts_ops_held_back_by_the_cap() {
    let args = parse(&[
        "--in-process",
        "--type",
        "sleep",
        "--payload",
        r#"{"ms":20}"#,
        "--ops",
        "200",
        "--rate",
        "5000",
        "--concurrency",
        "4",
        "--warmup",
        "0",
    ]);
    let r = run_alone(&args).await.unwrap();
    assert_eq!((r.ops, r.errors), (200, 0));
    // At most 4 in flight for 20 ms each: 200 ops take about a second, not 40 ms.
    assert!(r.seconds >= 0.9, "{r:?}");
    assert!(r.delayed_ops.unwrap() > 100, "{r:?}");
}

/// A minimal HTTP/1.1 server with keep-alive speaking the api's shapes: type `fail`
/// always fails, `flaky` fails every third time, `boom` answers 500.
struct FakeServer {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    ops: Arc<AtomicU64>,
    hello: Arc<AtomicU64>,
    batches: Arc<AtomicU64>,
}

impl FakeServer {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = FakeServer {
            addr: listener.local_addr().unwrap(),
            connections: Default::default(),
            ops: Default::default(),
            hello: Default::default(),
            batches: Default::default(),
        };
        let (conns, ops, hello, batches) = (
            server.connections.clone(),
            server.ops.clone(),
            server.hello.clone(),
            server.batches.clone(),
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                conns.fetch_add(1, Ordering::Relaxed);
                stream.set_nodelay(true).unwrap();
                let (ops, hello, batches) = (ops.clone(), hello.clone(), batches.clone());
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut r = BufReader::new(r);
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                        let mut len = 0usize;
                        loop {
                            let mut h = String::new();
                            r.read_line(&mut h).await.unwrap();
                            if h == "\r\n" {
                                break;
                            }
                            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                len = v.trim().parse().unwrap();
                            }
                        }
                        let mut body = vec![0; len];
                        r.read_exact(&mut body).await.unwrap();
                        let (code, answer) = match path.as_str() {
                            "/v1/bench/hello" => {
                                hello.fetch_add(1, Ordering::Relaxed);
                                ("200 OK", r#"{"hello":"world"}"#.to_owned())
                            }
                            "/v1/ops?wait=true" => {
                                let op: serde_json::Value = serde_json::from_slice(&body).unwrap();
                                let n = ops.fetch_add(1, Ordering::Relaxed);
                                match answer(&op, n) {
                                    Some(a) => ("200 OK", a),
                                    None => ("500 Internal Server Error", "{}".to_owned()),
                                }
                            }
                            "/v1/ops/batch?wait=true" => {
                                batches.fetch_add(1, Ordering::Relaxed);
                                let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
                                let results: Vec<String> = req["ops"]
                                    .as_array()
                                    .unwrap()
                                    .iter()
                                    .map(|op| {
                                        answer(op, ops.fetch_add(1, Ordering::Relaxed)).unwrap()
                                    })
                                    .collect();
                                (
                                    "200 OK",
                                    format!(r#"{{"results":[{}]}}"#, results.join(",")),
                                )
                            }
                            _ => ("404 Not Found", r#"{"error":"not_found"}"#.to_owned()),
                        };
                        // One write: head and body in one segment, as a real server
                        // sends them (two small writes would wait on Nagle).
                        let reply = format!(
                            "HTTP/1.1 {code}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                            answer.len()
                        );
                        if w.write_all(reply.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        server
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn answer(op: &serde_json::Value, n: u64) -> Option<String> {
    let fail = match op["type"].as_str().unwrap() {
        "boom" => return None,
        "fail" => true,
        "flaky" => n % 3 == 2,
        _ => false,
    };
    Some(if fail {
        format!(r#"{{"id":"{n}","status":"failed","error":"asked to fail"}}"#)
    } else {
        format!(
            r#"{{"id":"{n}","status":"succeeded","result":{}}}"#,
            op["payload"]
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_run_uses_keep_alive_and_counts_every_op() {
    let server = FakeServer::start().await;
    let url = server.url();
    let args = parse(&[
        "--target",
        &url,
        "--ops",
        "2000",
        "--concurrency",
        "16",
        "--warmup",
        "100",
    ]);
    let r = run_report(&args).await.unwrap();
    assert_eq!((r.ops, r.errors, r.requests), (2000, 0, 2000));
    assert_eq!(r.mode, "http");
    assert_eq!(r.target.as_deref(), Some(url.as_str()));
    assert!(r.rss_idle_bytes.is_none());
    assert_ordered(&r);
    assert_eq!(server.ops.load(Ordering::Relaxed), 2100);
    let conns = server.connections.load(Ordering::Relaxed);
    // reqwest's pool may open a few more connections than requests in flight (a request
    // issued just before the last one's connection went back to the pool); without
    // keep-alive there would be one per request.
    assert!(
        conns <= 64,
        "{conns} connections for 16 in flight: no keep-alive?"
    );
}

/// With `--client-threads`, the load comes from that many threads of the client's own
/// (that they carry it is checked on a bench process alone, in `tests/bench.rs`): every
/// operation counted, the report says how many threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_load_from_threads_of_its_own() {
    let server = FakeServer::start().await;
    let args = parse(&[
        "--target",
        &server.url(),
        "--ops",
        "20000",
        "--batch",
        "10",
        "--concurrency",
        "6",
        "--warmup",
        "0",
        "--client-threads",
        "3",
        "--json",
    ]);
    let r = run_report(&args).await.unwrap();
    assert_eq!((r.ops, r.errors, r.requests), (20_000, 0, 2_000));
    assert_eq!(r.client_threads, Some(3));
    // One pool per thread: each of the three opened its own connections.
    assert!(server.connections.load(Ordering::Relaxed) >= 3);
    let v = serde_json::to_value(&r).unwrap();
    assert_report_shape(&v);
    assert!(render_text(&r).contains("client on 3 threads"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_batches_and_baseline() {
    let server = FakeServer::start().await;
    let args = parse(&[
        "--target",
        &server.url(),
        "--ops",
        "1000",
        "--batch",
        "64",
        "--concurrency",
        "4",
        "--warmup",
        "0",
        "--baseline",
    ]);
    let r = run_report(&args).await.unwrap();
    assert_eq!(
        (r.ops, r.errors, r.requests, r.batch),
        (1000, 0, 16, Some(64))
    );
    assert_eq!(server.ops.load(Ordering::Relaxed), 1000);
    assert_eq!(server.batches.load(Ordering::Relaxed), 16);
    let b = r.baseline.as_deref().expect("a baseline");
    assert_eq!((b.ops, b.errors, b.requests), (1000, 0, 16));
    assert_eq!(server.hello.load(Ordering::Relaxed), 16);
    assert_ordered(&r);
    assert_ordered(b);
    let v = serde_json::to_value(&r).unwrap();
    assert_report_shape(&v);
    assert_report_shape(&v["baseline"]);
    let text = render_text(&r);
    assert!(text.contains("hello") && text.contains("engine"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_failures_are_counted_apart_and_checked_against_the_ratio() {
    let server = FakeServer::start().await;
    let url = server.url();
    let argv = [
        "--target",
        &url,
        "--type",
        "flaky",
        "--ops",
        "300",
        "--concurrency",
        "1",
        "--warmup",
        "0",
    ];
    let r = run_report(&parse(&argv)).await.unwrap();
    // Only the 200 that succeeded count as operations; the 100 failures are errors.
    assert_eq!((r.ops, r.errors, r.requests), (200, 100, 300));
    assert_eq!(
        r.first_error.as_deref(),
        Some("operation failed: asked to fail")
    );
    assert_eq!(
        r.error_samples,
        vec![ErrorSample {
            reason: "operation failed: asked to fail".into(),
            count: 100
        }]
    );
    assert!((r.error_ratio - 1.0 / 3.0).abs() < 1e-9, "{r:?}");
    // By default no failure is allowed: the check names the share and the reason.
    let e = r.check().unwrap_err().to_string();
    assert!(e.contains("100 of 300 operations failed"), "{e}");
    assert!(e.contains("--max-error-ratio 0"), "{e}");
    assert!(e.contains("asked to fail"), "{e}");
    let text = render_text(&r);
    assert!(
        text.contains("100 × operation failed: asked to fail"),
        "{text}"
    );
    // A third failed: allowed at 0.34, not at 0.33.
    for (ratio, passes) in [("0.34", true), ("0.33", false)] {
        let mut argv = argv.to_vec();
        argv.extend(["--max-error-ratio", ratio]);
        let r = run_report(&parse(&argv)).await.unwrap();
        assert_eq!(r.check().is_ok(), passes, "{ratio}: {r:?}");
    }
    let boom = parse(&[
        "--target",
        &server.url(),
        "--type",
        "boom",
        "--ops",
        "300",
        "--warmup",
        "0",
    ]);
    let e = run_report(&boom).await.unwrap_err().to_string();
    assert!(e.contains("first 100") && e.contains("HTTP 500"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listening_stops_the_run_clearly() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let args = parse(&["--target", &url, "--ops", "100000", "--warmup", "0"]);
    let started = Instant::now();
    let e = run_report(&args).await.unwrap_err().to_string();
    assert!(e.contains("first 100 requests"), "{e}");
    assert!(e.contains(&url), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn the_open_loop_schedule_is_pure() {
    let pace = driver::Pace::new(1000.0);
    // The first request is due at once, then one every millisecond.
    assert_eq!(pace.due_by(Duration::ZERO), 1);
    assert_eq!(pace.due_by(Duration::from_micros(999)), 1);
    assert_eq!(pace.due_by(Duration::from_millis(1)), 2);
    // However long the driver was away, everything due meanwhile is due now.
    assert_eq!(pace.due_by(Duration::from_millis(50)), 51);
    assert_eq!(pace.intended(0), Duration::ZERO);
    assert_eq!(pace.intended(50), Duration::from_millis(50));
    for k in [0, 1, 7, 999, 123_456] {
        // Request k is due at its intended start, not before.
        assert!(pace.due_by(pace.intended(k)) > k, "{k}");
    }
}

#[test]
fn error_samples_keep_the_first_distinct_reasons() {
    let mut a = driver::ErrorSamples::default();
    a.add("x", 2);
    a.add("y", 1);
    a.add("x", 3);
    let mut b = driver::ErrorSamples::default();
    for (i, r) in ["y", "p", "q", "r", "s", "t"].iter().enumerate() {
        b.add(r, i as u64 + 1);
    }
    a.merge(b);
    let kept: Vec<(&str, u64)> = a
        .samples
        .iter()
        .map(|s| (s.reason.as_str(), s.count))
        .collect();
    assert_eq!(
        kept,
        [("x", 5), ("y", 2), ("p", 2), ("q", 3), ("r", 4)],
        "{a:?}"
    );
    assert_eq!(a.others, 5 + 6);
}

/// The report of one measured phase (no warm-up) of `load`, run as the flags `argv` say.
async fn measure_load<L: Load>(load: L, argv: &[&str]) -> BenchReport {
    let mut all = vec!["--in-process", "--warmup", "0"];
    all.extend_from_slice(argv);
    let plan = parse(&all).plan().unwrap();
    let result = phase(
        &Arc::new(load),
        &plan,
        plan.ops,
        "run",
        "a test load",
        false,
    )
    .await
    .unwrap();
    report(&plan, "in-process", None, &result)
}

/// Answers every request at once, but blocks its driver's thread for 50 ms the first
/// time it issues one: a generator that stalled.
#[derive(Default)]
struct Stalling {
    stalled: AtomicBool,
}

impl Load for Stalling {
    type Fut = std::future::Ready<driver::Done>;

    fn issue(&self, ops: u32) -> Self::Fut {
        if !self.stalled.swap(true, Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::future::ready(driver::Done::ok(ops))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_generator_is_charged_its_own_delay() {
    // One driver (one slot), 1000/s: request k is due k ms after the start. The first
    // issue stalls 50 ms, so requests 1..49 go out at least 50 ms after the start, each
    // at least (50 - k) ms after it was due.
    let argv = ["--rate", "1000", "--ops", "60", "--concurrency", "1"];
    let r = measure_load(Stalling::default(), &argv).await;
    assert_eq!((r.ops, r.errors), (60, 0));
    assert_eq!(r.latency_from, "intended_start");
    // Request 1 waited at least 49 ms; of 60, the 31 largest waits are all >= 19 ms.
    assert!(r.max_us >= 49_000, "{r:?}");
    assert!(r.p50_us >= 19_000, "{r:?}");
    // Measured from the send, the same run looks fast: that is what it would hide.
    let service = r
        .service_p50_us
        .expect("an open loop reports the service time");
    assert!(service <= r.p50_us, "{r:?}");
    // The stall shows as send lag: request 1 went out at least 49 ms late.
    assert!(r.send_lag_max_us.unwrap() >= 49_000, "{r:?}");
    assert!(r.send_lag_p50_us.unwrap() >= 19_000, "{r:?}");
    let v = serde_json::to_value(&r).unwrap();
    assert_report_shape(&v);
    assert!(v["service_p99_us"].is_number(), "{v}");
}

/// Every third request succeeds after 20 ms; the others fail at once.
#[derive(Default)]
struct SlowSuccesses {
    n: AtomicU64,
}

impl Load for SlowSuccesses {
    type Fut = std::pin::Pin<Box<dyn std::future::Future<Output = driver::Done> + Send>>;

    fn issue(&self, ops: u32) -> Self::Fut {
        let n = self.n.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            if n % 3 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                driver::Done::ok(ops)
            } else {
                driver::Done::failed(ops, format!("refused: number {}", n % 3))
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_count_as_errors_not_as_operations_or_latency() {
    let r = measure_load(
        SlowSuccesses::default(),
        &["--ops", "90", "--concurrency", "3"],
    )
    .await;
    assert_eq!((r.ops, r.errors, r.requests), (30, 60, 90));
    assert_eq!(r.latency_from, "sent");
    // Only the slow successes are in the histogram: 60 instant failures would have
    // put the median near zero.
    assert!(r.p50_us >= 20_000, "{r:?}");
    assert!(r.ops_per_sec <= 30.0 / r.seconds + 1e-9, "{r:?}");
    let reasons: Vec<(&str, u64)> = r
        .error_samples
        .iter()
        .map(|s| (s.reason.as_str(), s.count))
        .collect();
    let mut sorted = reasons.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        [("refused: number 1", 30), ("refused: number 2", 30)],
        "{r:?}"
    );
    let e = r.check().unwrap_err().to_string();
    assert!(e.contains("60 of 90 operations failed"), "{e}");
    assert!(e.contains("refused: number"), "{e}");
}

#[test]
fn a_success_on_another_node_than_required_is_a_failure() {
    use opmesh_actors::{OpId, OpOutcome, OpStatus};
    let outcome = |by: Option<&str>| {
        let mut o = OpOutcome::new(OpId::new(), OpStatus::Succeeded);
        o.executed_by = by.map(Into::into);
        o
    };
    let here = targets::judge_outcome(outcome(Some("bench-a")), Some("bench-b"));
    assert_eq!((here.ok, here.failed, here.elsewhere), (0, 1, 1));
    assert_eq!(
        here.error.as_deref(),
        Some("ran on bench-a, not on bench-b where the type is pinned")
    );
    let nowhere = targets::judge_outcome(outcome(None), Some("bench-b"));
    assert_eq!((nowhere.ok, nowhere.elsewhere), (0, 1));
    let there = targets::judge_outcome(outcome(Some("bench-b")), Some("bench-b"));
    assert_eq!((there.ok, there.failed), (1, 0));
    let any = targets::judge_outcome(outcome(Some("bench-a")), None);
    assert_eq!((any.ok, any.failed), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_run_proves_where_its_operations_ran() {
    let args = parse(&[
        "--in-process",
        "--remote",
        "--ops",
        "300",
        "--concurrency",
        "16",
        "--warmup",
        "0",
    ]);
    let r = run_alone(&args).await.unwrap();
    assert_eq!((r.ops, r.errors), (300, 0), "{r:?}");
    assert_eq!(r.mode, "in-process-remote");
    assert_eq!(
        (r.executed_by, r.executed_elsewhere),
        (Some("bench-b"), Some(0))
    );
    r.check().unwrap();
    // With each node's shards and links on threads of their own, the same.
    let mut threaded = args.clone();
    threaded.shard_threads = true;
    let t = run_alone(&threaded).await.unwrap();
    assert_eq!((t.ops, t.errors, t.shard_threads), (300, 0, true), "{t:?}");
    assert_eq!(
        (t.executed_by, t.executed_elsewhere),
        (Some("bench-b"), Some(0))
    );
    // Had some run on the first node, the run fails, however many errors it allows.
    let mut wrong = r.clone();
    wrong.executed_elsewhere = Some(3);
    wrong.errors = 3;
    wrong.error_ratio = 0.01;
    wrong.max_error_ratio = 1.0;
    let e = wrong.check().unwrap_err().to_string();
    assert!(
        e.contains("--remote: 3 of 303 operations ran on another node than bench-b"),
        "{e}"
    );
}

/// An OTLP receiver that counts spans per `service.instance.id`.
#[derive(Clone, Default)]
struct SpansByNode(Arc<parking_lot::Mutex<std::collections::HashMap<String, u64>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for SpansByNode
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        for rs in request.into_inner().resource_spans {
            let node = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.instance.id")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            let n: usize = rs.scope_spans.iter().map(|s| s.spans.len()).sum();
            *self.0.lock().entry(node).or_default() += n as u64;
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_run_exports_both_nodes_spans_to_the_endpoint() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let received = SpansByNode::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(received.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let args = parse(&[
        "--in-process",
        "--remote",
        "--ops",
        "200",
        "--concurrency",
        "8",
        "--warmup",
        "0",
        "--otlp-endpoint",
        &endpoint,
    ]);
    let r = run_alone(&args).await.unwrap();
    assert_eq!((r.ops, r.errors), (200, 0), "{r:?}");
    let t = r.trace_export.clone().expect("trace counters");
    let by_node = received.0.lock().clone();
    // Both nodes traced, and what they handed over is exactly what arrived.
    assert!(
        by_node.get("bench-a").is_some_and(|n| *n >= 200),
        "{by_node:?}"
    );
    assert!(
        by_node.get("bench-b").is_some_and(|n| *n >= 200),
        "{by_node:?}"
    );
    let total: u64 = by_node.values().sum();
    assert_eq!(
        (
            t.spans_recorded,
            t.spans_exported,
            t.spans_dropped,
            t.spans_pending
        ),
        (total, total, 0, 0),
        "{t:?} {by_node:?}"
    );
    let v = serde_json::to_value(&r).unwrap();
    assert_report_shape(&v);
}
