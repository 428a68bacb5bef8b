//! Live events and recent failures of the real binary, through real HTTP: the frames of
//! `GET /v1/events` for known work, a slow client told what it missed while operations
//! go on, bad queries refused, the stream ending cleanly on shutdown, and
//! `GET /v1/failures`.

mod common;

use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{client, get_json, run_op, wait_until, Server};
use futures::{Stream, StreamExt};
use serde_json::{json, Value};

/// One server-sent event.
#[derive(Debug)]
struct Frame {
    event: String,
    id: Option<u64>,
    data: Value,
}

/// Reads frames off an event-stream response.
struct SseReader {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buf: String,
    /// Comment lines seen (`: keep-alive`, the greeting).
    comments: Vec<String>,
}

enum Read {
    Frame(Frame),
    /// A block of comments only (the greeting, `: keep-alive`).
    Comment,
    /// The server ended the stream.
    End,
    /// Nothing before the deadline.
    Timeout,
}

impl SseReader {
    async fn open(s: &Server, query: &str) -> SseReader {
        let r = client_without_timeout()
            .get(s.url(&format!("/v1/events{query}")))
            .header("accept-encoding", "gzip")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        assert_ne!(
            r.headers()
                .get("content-encoding")
                .map(|v| v.to_str().unwrap()),
            Some("gzip"),
            "the stream is never compressed"
        );
        let mut reader = SseReader {
            body: Box::pin(r.bytes_stream()),
            buf: String::new(),
            comments: Vec::new(),
        };
        // The greeting arrives at once: from here on, the client is subscribed.
        let until = Instant::now() + Duration::from_secs(10);
        while reader.comments.is_empty() {
            match reader.next(until).await {
                Read::Timeout | Read::End => panic!("no greeting on the event stream"),
                Read::Frame(f) => panic!("an event before the greeting: {f:?}"),
                Read::Comment => {}
            }
        }
        reader
    }

    /// The next block, reading until `until`.
    async fn next(&mut self, until: Instant) -> Read {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                return match self.parse(&block) {
                    Some(f) => Read::Frame(f),
                    None => Read::Comment,
                };
            }
            let left = until.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.body.next()).await {
                Err(_) => return Read::Timeout,
                Ok(None) => return Read::End,
                Ok(Some(chunk)) => self
                    .buf
                    .push_str(std::str::from_utf8(&chunk.expect("the stream reads")).unwrap()),
            }
        }
    }

    fn parse(&mut self, block: &str) -> Option<Frame> {
        let (mut event, mut id, mut data) = (None, None, None);
        for line in block.lines() {
            if let Some(c) = line.strip_prefix(':') {
                self.comments.push(c.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("event: ") {
                event = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.parse().expect("ids are numbers"));
            } else if let Some(v) = line.strip_prefix("data: ") {
                assert!(data.is_none(), "one data line per frame: {block:?}");
                data = Some(serde_json::from_str(v).expect("data is JSON"));
            } else if !line.is_empty() && !line.starts_with("retry: ") {
                panic!("unexpected line {line:?} in {block:?}");
            }
        }
        Some(Frame {
            event: event?,
            id,
            data: data.expect("every event has data"),
        })
    }

    /// Reads frames until `done` says it has seen enough; fails with what it saw when the
    /// deadline passes first.
    async fn read_until(&mut self, deadline: Duration, mut done: impl FnMut(&Frame) -> bool) {
        let until = Instant::now() + deadline;
        let mut seen = Vec::new();
        loop {
            match self.next(until).await {
                Read::Frame(f) => {
                    if done(&f) {
                        return;
                    }
                    seen.push(format!("{} {}", f.event, f.data));
                }
                Read::Comment => {}
                Read::End => panic!("the stream ended; saw {seen:#?}"),
                Read::Timeout => panic!("timed out after {deadline:?}; saw {seen:#?}"),
            }
        }
    }
}

/// A stream is open as long as the test wants: no whole-request timeout.
fn client_without_timeout() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn submit(s: &Server, body: Value) -> Value {
    run_op(&s.base, &body).await
}

#[tokio::test]
async fn operations_publish_their_events_and_metrics_come_every_second() {
    let s = Server::start(&["--node-id", "ev-1"], &[]);
    let mut stream = SseReader::open(&s, "").await;
    let ok = submit(&s, json!({"type": "echo", "payload": {"n": 1}})).await;
    assert_eq!(ok["status"], "succeeded");
    let bad = submit(&s, json!({"type": "resize", "payload": {"width": -1}})).await;
    assert_eq!(bad["status"], "failed");
    let (ok_id, bad_id) = (ok["id"].as_str().unwrap(), bad["id"].as_str().unwrap());

    let mut want = vec![
        ("operation:started", ok_id),
        ("operation:success", ok_id),
        ("operation:started", bad_id),
        ("operation:failure", bad_id),
        ("batch:scheduled", "echo"),
        ("batch:scheduled", "resize"),
    ];
    let mut metrics = Vec::new();
    let mut last_id = 0;
    stream
        .read_until(Duration::from_secs(20), |f| {
            let id = f.id.expect("events carry an id");
            assert!(id > last_id, "ids grow: {id} after {last_id}");
            last_id = id;
            match f.event.as_str() {
                "metrics:collected" => {
                    assert_eq!(f.data["nodeId"], "ev-1", "{}", f.data);
                    assert!(f.data["completedOperations"].is_u64(), "{}", f.data);
                    metrics.push(Instant::now());
                }
                "batch:scheduled" => {
                    assert!(f.data["size"].as_u64().unwrap() >= 1, "{}", f.data);
                    want.retain(|w| *w != ("batch:scheduled", f.data["type"].as_str().unwrap()));
                }
                e => {
                    let id = f.data["id"].as_str().unwrap();
                    if e == "operation:failure" && id == bad_id {
                        assert_eq!(f.data["status"], "failed");
                        assert_eq!(f.data["type"], "resize");
                        assert_eq!(f.data["node"], "ev-1");
                        assert_eq!(f.data["trace_id"], bad["trace_id"]);
                        let err = f.data["error"].as_str().unwrap();
                        assert!(err.contains("resize expects"), "{err}");
                    }
                    if e == "operation:success" {
                        assert_eq!(f.data["executed_by"], "ev-1");
                        assert!(f.data["duration_us"].is_u64());
                    }
                    want.retain(|w| *w != (e, id));
                }
            }
            want.is_empty() && metrics.len() >= 3
        })
        .await;
    // About one a second (the first may come at once).
    let gap = metrics[2] - metrics[1];
    assert!(
        gap > Duration::from_millis(500) && gap < Duration::from_secs(3),
        "{gap:?}"
    );
}

#[tokio::test]
async fn only_the_asked_types_come() {
    let s = Server::start(&[], &[]);
    let mut stream = SseReader::open(&s, "?types=operation:failure").await;
    submit(&s, json!({"type": "echo"})).await;
    let bad = submit(&s, json!({"type": "resize", "payload": {"width": -1}})).await;
    stream
        .read_until(Duration::from_secs(10), |f| {
            assert_eq!(f.event, "operation:failure", "{f:?}");
            f.data["id"] == bad["id"]
        })
        .await;
}

#[tokio::test]
async fn a_slow_client_is_told_what_it_missed_and_operations_go_on() {
    let s = Server::start(&[], &[]);
    // A client that falls behind by more than one event misses some.
    let mut slow = SseReader::open(&s, "?types=operation:started,operation:success&buffer=1").await;
    let ops: Vec<Value> = (0..5000)
        .map(|i| json!({"type": "echo", "payload": i}))
        .collect();
    for _ in 0..4 {
        let r = client()
            .post(s.url("/v1/ops/batch?wait=true"))
            .json(&json!({ "ops": ops }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        let results = v["results"].as_array().unwrap();
        assert_eq!(results.len(), ops.len());
        assert!(
            results.iter().all(|r| r["status"] == "succeeded"),
            "every operation succeeds however slow the watcher"
        );
    }
    let mut dropped = 0;
    slow.read_until(Duration::from_secs(20), |f| {
        if f.event == "events:dropped" {
            assert!(f.id.is_none());
            dropped = f.data["dropped"].as_u64().expect("a count");
            assert!(dropped > 0, "{f:?}");
            true
        } else {
            false
        }
    })
    .await;
    eprintln!("the slow client missed {dropped} events (first report)");
}

#[tokio::test]
async fn bad_queries_are_refused_naming_the_field() {
    let s = Server::start(&[], &[]);
    for (query, names) in [
        ("types=operation:failure,operation:done", "operation:done"),
        ("types=", "types"),
        ("buffer=0", "buffer"),
        ("buffer=65537", "buffer"),
        ("buffer=lots", "lots"),
    ] {
        let r = client()
            .get(s.url(&format!("/v1/events?{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{query}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], "invalid_field", "{v}");
        let msg = v["message"].as_str().unwrap();
        assert!(msg.contains(names), "{query}: {msg}");
        if query.starts_with("types") {
            assert!(
                msg.contains("metrics:collected"),
                "lists the allowed ones: {msg}"
            );
        }
    }
    let r = client()
        .get(s.url("/v1/failures?limit=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn the_stream_ends_cleanly_when_the_server_shuts_down() {
    let mut s = Server::start(&[], &[]);
    let mut stream = SseReader::open(&s, "").await;
    s.signal("TERM");
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match stream.next(until).await {
            Read::End => break,
            Read::Frame(_) | Read::Comment => continue,
            Read::Timeout => panic!("the stream did not end after SIGTERM"),
        }
    }
    assert_eq!(s.wait_exit(Duration::from_secs(10)), Some(0));
}

#[tokio::test]
async fn recent_failures_list_the_failed_operation_with_its_error_and_trace() {
    let s = Server::start(&["--node-id", "fail-1"], &[]);
    let bad = submit(&s, json!({"type": "resize", "payload": {"width": -1}})).await;
    assert_eq!(bad["status"], "failed");
    let trace_id = bad["trace_id"].as_str().expect("a trace id").to_owned();
    submit(&s, json!({"type": "echo"})).await;
    let id = bad["id"].as_str().unwrap();
    let listed = |v: Value| {
        v["failures"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["id"] == id)
            .cloned()
    };
    let failures = s.url("/v1/failures");
    wait_until(
        "the failure listed in /v1/failures",
        Duration::from_secs(10),
        || async { listed(get_json(&failures).await).is_some() },
    )
    .await;
    let found = listed(get_json(&failures).await).expect("still listed");
    assert_eq!(found["type"], "resize");
    assert_eq!(found["status"], "failed");
    assert_eq!(found["node"], "fail-1");
    assert_eq!(found["trace_id"], trace_id.as_str());
    assert!(found["error"].as_str().unwrap().contains("resize expects"));
    assert!(found["timestamp"].as_u64().unwrap() > 0);
    assert!(found["duration_us"].is_u64());

    // Newest first, and ?limit= takes the newest.
    let later = submit(&s, json!({"type": "sleep", "payload": {"ms": "soon"}})).await;
    assert_eq!(later["status"], "failed");
    wait_until("the second failure", Duration::from_secs(10), || async {
        let v: Value = get_json(&s.url("/v1/failures?limit=1")).await;
        let list = v["failures"].as_array().unwrap();
        assert!(list.len() <= 1);
        list.first().is_some_and(|f| f["id"] == later["id"])
    })
    .await;
}

#[tokio::test]
async fn the_live_endpoints_are_in_the_openapi_document() {
    let s = Server::start(&[], &[]);
    let v: Value = get_json(&s.url("/openapi.json")).await;
    let paths = &v["paths"];
    for p in ["/v1/events", "/v1/failures", "/v1/dashboard/config"] {
        assert!(paths[p]["get"].is_object(), "{p} is documented");
    }
    assert!(
        paths["/v1/events"]["get"]["responses"]["200"]["content"]["text/event-stream"].is_object()
    );
}
