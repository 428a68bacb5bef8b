//! The bench's own tests: its flags and their checks, then whole runs, in process and
//! against a fake HTTP server. The helpers here (`parse`, `assert_report_shape`) serve
//! the report's tests too.

use super::*;
use clap::Parser;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

pub(super) fn parse(argv: &[&str]) -> BenchArgs {
    Cli::try_parse_from(std::iter::once("bench").chain(argv.iter().copied()))
        .expect("flags parse")
        .args
}

const EXTRAS: [&str; 15] = [
    "mode",
    "target",
    "type",
    "payload_bytes",
    "concurrency",
    "requests",
    "batch",
    "rate",
    "delayed_ops",
    "warmup_ops",
    "first_error",
    "rss_idle_bytes",
    "rss_peak_bytes",
    "rss_delta_bytes",
    "baseline",
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
    assert!(err(&["--target", "https://h:1"]).contains("http://"));
    assert!(err(&["--target", "not a url"]).contains("not a URL"));
    assert!(err(&["--in-process", "--ops", "0"]).contains("--ops"));
    assert!(err(&["--in-process", "--concurrency", "0"]).contains("--concurrency"));
    assert!(err(&["--in-process", "--rate", "0"]).contains("--rate"));
    assert!(err(&["--in-process", "--rate", "NaN"]).contains("--rate"));
    assert!(err(&["--in-process", "--payload-bytes", "0"]).contains("--payload-bytes"));
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
    let r = run_report(&args).await.unwrap();
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
    assert!(r.first_error.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_type_fails_the_run_naming_the_type() {
    let args = parse(&["--in-process", "--type", "no-such-type", "--ops", "1000"]);
    let e = run_report(&args).await.unwrap_err().to_string();
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
    let e = run_report(&args).await.unwrap_err().to_string();
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
    let e = run_report(&args).await.unwrap_err().to_string();
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
    let r = run_report(&args).await.unwrap();
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
    let r = run_report(&args).await.unwrap();
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
    let r = run_report(&args).await.unwrap();
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
async fn http_failures_are_counted_not_fatal() {
    let server = FakeServer::start().await;
    let args = parse(&[
        "--target",
        &server.url(),
        "--type",
        "flaky",
        "--ops",
        "300",
        "--concurrency",
        "1",
        "--warmup",
        "0",
    ]);
    let r = run_report(&args).await.unwrap();
    assert_eq!((r.ops, r.errors), (300, 100));
    assert_eq!(
        r.first_error.as_deref(),
        Some("operation failed: asked to fail")
    );
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
