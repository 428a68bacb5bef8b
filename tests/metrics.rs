//! `GET /metrics` against the real binary on 127.0.0.1: known work in, exact counts out;
//! a two-node cluster's Raft, link and registry figures; and the shipped Grafana
//! dashboard and Prometheus alert rules, checked against what a live cluster exposes so
//! that they never query a metric that does not exist.
//!
//! Every wait is on a condition with a deadline.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{client, free_port, try_get_json, wait_until, Server};
use serde_json::{json, Value};

const SECRET: &str = "a-test-secret-of-enough-length";

// ---------------------------------------------------------------------------------------
// The exposition, parsed

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed scrape.
#[derive(Debug)]
struct Scrape {
    /// Family name → type (counter, gauge, histogram...).
    types: BTreeMap<String, String>,
    /// Family name → help text.
    help: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

/// Parses the OpenMetrics / Prometheus text format (what the tests need of it: HELP,
/// TYPE, samples with quoted, escaped label values, `# EOF`).
fn parse(text: &str) -> Scrape {
    let mut s = Scrape {
        types: BTreeMap::new(),
        help: BTreeMap::new(),
        samples: Vec::new(),
    };
    let mut eof = false;
    for line in text.lines() {
        assert!(!eof, "nothing may follow # EOF: {line:?}");
        if line.is_empty() {
            continue;
        }
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("# TYPE name type");
            s.types.insert(name.into(), ty.into());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            s.help.insert(name.into(), help.into());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        s.samples.push(parse_sample(line));
    }
    assert!(eof, "an OpenMetrics exposition ends with # EOF");
    s
}

fn parse_sample(line: &str) -> Sample {
    let name_end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("no value: {line:?}"));
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            r = r.trim_start_matches(',');
            if let Some(after) = r.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = r
                .split_once("=\"")
                .unwrap_or_else(|| panic!("key=\"value\": {line:?}"));
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break i + 1,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => panic!("dangling escape: {line:?}"),
                    },
                    Some((_, c)) => value.push(c),
                    None => panic!("open label value: {line:?}"),
                }
            };
            assert!(
                labels.insert(key.to_string(), value).is_none(),
                "label {key} twice: {line:?}"
            );
            r = &after[end..];
        }
    }
    let value = rest
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("no value: {line:?}"));
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or_else(|e| panic!("value {v:?}: {e}")),
    };
    Sample {
        name,
        labels,
        value,
    }
}

impl Scrape {
    /// The samples named `name` whose labels include `labels`.
    fn find<'a>(&'a self, name: &'a str, labels: &'a [(&str, &str)]) -> Vec<&'a Sample> {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The one sample named `name` with `labels`; fails if there is none or several.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.find(name, labels).as_slice() {
            [s] => s.value,
            [] => panic!("no sample {name}{labels:?}"),
            more => panic!("{} samples {name}{labels:?}: {more:?}", more.len()),
        }
    }

    fn try_value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        match self.find(name, labels).as_slice() {
            [s] => Some(s.value),
            _ => None,
        }
    }

    /// The metric names a query may use: sample names, with a histogram's
    /// `_bucket`/`_sum`/`_count` folded into its family name.
    fn exposed(&self) -> BTreeSet<String> {
        self.samples
            .iter()
            .map(|s| strip_histogram_suffix(&s.name).to_string())
            .collect()
    }

    /// Checks what every scrape must satisfy: each family has a HELP text and a TYPE;
    /// each histogram's buckets are cumulative and end at +Inf with the count; no
    /// per-node figure carries a `node` label.
    fn check_well_formed(&self) {
        for (family, ty) in &self.types {
            let help = self.help.get(family).map(String::as_str).unwrap_or("");
            assert!(
                help.len() > 10,
                "{family} ({ty}) has no real HELP text: {help:?}"
            );
        }
        for s in &self.samples {
            let family = self.family_of(&s.name);
            assert!(
                self.types.contains_key(family),
                "sample {} has no # TYPE (family {family})",
                s.name
            );
            if s.name != "opmesh_node_up" {
                assert!(
                    !s.labels.contains_key("node"),
                    "only opmesh_node_up names nodes: {s:?}"
                );
            }
        }
        for (family, ty) in &self.types {
            if ty != "histogram" {
                continue;
            }
            let bucket = format!("{family}_bucket");
            // Labels but `le` → (le, cumulative count) per bucket.
            let mut series: BTreeMap<Vec<(String, String)>, Buckets> = BTreeMap::new();
            for s in self.samples.iter().filter(|s| s.name == bucket) {
                let le: f64 = match s.labels["le"].as_str() {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().expect("le is a number"),
                };
                let key = s
                    .labels
                    .iter()
                    .filter(|(k, _)| *k != "le")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                series.entry(key).or_default().push((le, s.value));
            }
            assert!(!series.is_empty(), "histogram {family} has no buckets");
            for (key, buckets) in series {
                let labels: Vec<(&str, &str)> =
                    key.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                for w in buckets.windows(2) {
                    assert!(w[0].0 < w[1].0, "{family}{labels:?}: bounds ascend");
                    assert!(
                        w[0].1 <= w[1].1,
                        "{family}{labels:?}: bucket counts are cumulative: {buckets:?}"
                    );
                }
                let (last_le, last) = *buckets.last().unwrap();
                assert_eq!(last_le, f64::INFINITY, "{family}{labels:?} ends at +Inf");
                let count = self.value(&format!("{family}_count"), &labels);
                assert_eq!(last, count, "{family}{labels:?}: +Inf bucket = _count");
                let sum = self.value(&format!("{family}_sum"), &labels);
                assert!(
                    sum >= 0.0 && (count > 0.0 || sum == 0.0),
                    "{family}{labels:?}"
                );
            }
        }
    }

    /// The family a sample belongs to (`x_total` → `x` for counters, histogram parts).
    fn family_of<'a>(&self, sample: &'a str) -> &'a str {
        for suffix in ["_total", "_bucket", "_sum", "_count"] {
            if let Some(f) = sample.strip_suffix(suffix) {
                if self.types.contains_key(f) {
                    return f;
                }
            }
        }
        sample
    }
}

/// A histogram series' buckets: `(le, cumulative count)`.
type Buckets = Vec<(f64, f64)>;

fn strip_histogram_suffix(name: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(f) = name.strip_suffix(suffix) {
            return f;
        }
    }
    name
}

async fn scrape_text(s: &Server) -> (String, String) {
    let r = client().get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    (ct, r.text().await.unwrap())
}

async fn scrape(s: &Server) -> Scrape {
    let (_, text) = scrape_text(s).await;
    let parsed = parse(&text);
    parsed.check_well_formed();
    parsed
}

// ---------------------------------------------------------------------------------------
// Requests

async fn submit(s: &Server, body: Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = client().post(s.url("/v1/ops?wait=true")).json(&body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

// ---------------------------------------------------------------------------------------
// One node

#[tokio::test]
async fn a_scrape_counts_exactly_the_work_done() {
    let s = Server::start(
        &["--node-id", "metrics-1"],
        &[("OPMESH_ENGINE__QUEUE_CAPACITY", "777")],
    );
    const ECHO: usize = 7;
    const RESIZE_BAD: usize = 3;
    for i in 0..ECHO {
        let (code, v) = submit(&s, json!({"type": "echo", "payload": i}), &[]).await;
        assert_eq!(
            (code, v["status"].as_str()),
            (200, Some("succeeded")),
            "{v}"
        );
    }
    for _ in 0..RESIZE_BAD {
        let (code, v) = submit(&s, json!({"type": "resize", "payload": {"width": -1}}), &[]).await;
        assert_eq!((code, v["status"].as_str()), (200, Some("failed")), "{v}");
    }
    // Runs longer than its deadline: expires.
    let (_, v) = submit(
        &s,
        json!({"type": "sleep", "payload": {"ms": 2000}, "deadline_ms": 100}),
        &[],
    )
    .await;
    assert_eq!(v["status"], "expired", "{v}");
    // The same idempotency key twice: one run, one cache hit (both succeed).
    for cached in [false, true] {
        let (_, v) = submit(
            &s,
            json!({"type": "echo", "payload": "k", "idempotency_key": "metrics-key"}),
            &[],
        )
        .await;
        assert_eq!(v["status"], "succeeded", "{v}");
        assert_eq!(v["cached"], cached, "{v}");
    }
    // Refused by the node (no such type): not accepted, counted as rejected.
    for _ in 0..2 {
        let (code, v) = submit(&s, json!({"type": "no-such-type"}), &[]).await;
        assert_eq!(code, 404, "{v}");
    }
    // A malformed traceparent is ignored (the operation runs) and counted.
    let (code, v) = submit(
        &s,
        json!({"type": "echo", "payload": "tp"}),
        &[("traceparent", "00-not-a-trace-context")],
    )
    .await;
    assert_eq!(
        (code, v["status"].as_str()),
        (200, Some("succeeded")),
        "{v}"
    );

    let echo_ok = (ECHO + 2 + 1) as f64; // plain, the keyed pair, the traceparent one
    let echo_ran = echo_ok - 1.0; // the cache hit did not run

    // The engine counts an operation finished just after it answers: wait for the
    // figures to settle rather than assume they did.
    wait_until("nothing in flight", Duration::from_secs(10), || async {
        let m = scrape(&s).await;
        m.value("opmesh_ops_in_flight", &[]) == 0.0 && m.value("opmesh_ops_running", &[]) == 0.0
    })
    .await;

    let (ct, text) = scrape_text(&s).await;
    assert_eq!(
        ct, "application/openmetrics-text; version=1.0.0; charset=utf-8",
        "the content type says what the body is"
    );
    let m = parse(&text);
    m.check_well_formed();

    // The process's own figures, as the kernel tells them.
    let rss = m.value("process_resident_memory_bytes", &[]);
    assert!(rss > 4e6 && rss < 4e9, "resident memory {rss}");
    assert!(m.value("process_cpu_seconds_total", &[]) > 0.0);
    assert!(m.value("process_threads", &[]) >= 2.0);
    assert!(m.value("process_open_fds", &[]) >= 3.0);
    assert_eq!(m.types["process_cpu_seconds"], "counter");

    let ops = |ty: &str, outcome: &str| {
        m.value("opmesh_ops_total", &[("type", ty), ("outcome", outcome)])
    };
    assert_eq!(ops("echo", "succeeded"), echo_ok);
    assert_eq!(ops("echo", "failed"), 0.0);
    assert_eq!(ops("echo", "expired"), 0.0);
    assert_eq!(ops("resize", "failed"), RESIZE_BAD as f64);
    assert_eq!(ops("resize", "succeeded"), 0.0);
    assert_eq!(ops("sleep", "expired"), 1.0);
    assert_eq!(ops("sleep", "succeeded"), 0.0);
    assert_eq!(m.value("opmesh_ops_rejected_total", &[]), 2.0);

    // Latency: one `total` observation per finished operation, one `execute` per run.
    let count = |ty: &str, stage: &str| {
        m.value(
            "opmesh_op_duration_seconds_count",
            &[("type", ty), ("stage", stage)],
        )
    };
    assert_eq!(count("echo", "total"), echo_ok);
    assert_eq!(count("echo", "execute"), echo_ran);
    assert_eq!(count("echo", "queue"), echo_ran);
    assert_eq!(count("resize", "total"), RESIZE_BAD as f64);
    assert_eq!(count("sleep", "total"), 1.0);
    // In seconds: the expired sleep lasted its 100 ms deadline, not 100 million.
    let slept = m.value(
        "opmesh_op_duration_seconds_sum",
        &[("type", "sleep"), ("stage", "total")],
    );
    assert!((0.09..5.0).contains(&slept), "sleep total {slept} s");
    assert_eq!(
        m.value(
            "opmesh_op_duration_seconds_bucket",
            &[("type", "sleep"), ("stage", "total"), ("le", "0.05")],
        ),
        0.0,
        "the 100 ms operation is not under 50 ms"
    );

    // Batches: every run went through exactly one batch.
    let batches = m.value("opmesh_batches_total", &[]);
    assert!(batches >= 1.0);
    assert_eq!(m.value("opmesh_batch_size_count", &[]), batches);
    assert_eq!(
        m.value("opmesh_batch_size_sum", &[]),
        echo_ran + RESIZE_BAD as f64 + 1.0,
        "operations handed to the executor"
    );
    // Shards: every operation accepted went through one shard of the hot path.
    let shards = m.find("opmesh_shard_operations_total", &[]);
    assert!(!shards.is_empty(), "one sample per shard");
    assert!(shards
        .iter()
        .all(|s| s.labels["shard"].parse::<usize>().is_ok()));
    assert_eq!(
        shards.iter().map(|s| s.value).sum::<f64>(),
        echo_ok + RESIZE_BAD as f64 + 1.0,
        "operations the shards took"
    );

    assert_eq!(m.value("opmesh_cache_hits_total", &[]), 1.0);
    assert_eq!(m.value("opmesh_cache_misses_total", &[]), 1.0);
    assert_eq!(m.value("opmesh_cache_joined_total", &[]), 0.0);
    assert_eq!(m.value("opmesh_cache_entries", &[]), 1.0);
    assert_eq!(m.value("opmesh_cache_evictions_total", &[]), 0.0);
    assert_eq!(m.value("opmesh_cache_expirations_total", &[]), 0.0);

    assert_eq!(m.value("opmesh_traceparent_invalid_total", &[]), 1.0);
    for name in [
        "opmesh_trace_spans_exported_total",
        "opmesh_trace_spans_dropped_total",
        "opmesh_trace_export_failures_total",
    ] {
        assert!(m.value(name, &[]) >= 0.0);
    }

    for ty in ["echo", "resize", "sleep"] {
        assert_eq!(m.value("opmesh_queue_depth", &[("type", ty)]), 0.0);
        assert_eq!(m.value("opmesh_op_retries_total", &[("type", ty)]), 0.0);
    }
    for ty in ["echo", "resize", "sleep"] {
        assert_eq!(m.value("opmesh_queue_capacity", &[("type", ty)]), 777.0);
        assert_eq!(m.value("opmesh_type_ops_running", &[("type", ty)]), 0.0);
        // No tables: each type may hold half of the node's 16384 slots.
        assert_eq!(
            m.value("opmesh_type_max_concurrent", &[("type", ty)]),
            8192.0
        );
        assert_eq!(m.value("opmesh_breaker_state", &[("type", ty)]), 0.0);
    }
    for actor in ["router", "cache", "scheduler", "executor"] {
        assert_eq!(
            m.value("opmesh_actor_restarts_total", &[("actor", actor)]),
            0.0
        );
    }
    // The server's own recent-failures log (GET /v1/failures) watches failures.
    assert_eq!(m.value("opmesh_event_subscribers", &[]), 1.0);
    assert_eq!(m.value("opmesh_events_dropped_total", &[]), 0.0);
    assert!(m.value("opmesh_uptime_seconds", &[]) > 0.0);
    assert_eq!(
        m.value(
            "opmesh_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    // A lone node has no cluster figures.
    assert!(
        !m.samples
            .iter()
            .any(|s| s.name.starts_with("opmesh_raft") || s.name.starts_with("opmesh_link")),
        "{text}"
    );
    // Counters only go up: a second scrape after more work shows more, never less.
    submit(&s, json!({"type": "echo", "payload": 0}), &[]).await;
    wait_until("the next echo counted", Duration::from_secs(10), || async {
        scrape(&s).await.value(
            "opmesh_ops_total",
            &[("type", "echo"), ("outcome", "succeeded")],
        ) == echo_ok + 1.0
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Two nodes

fn start_node(name: &str, port: u16, join: Option<&str>) -> Server {
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec!["--node-id", name, "--cluster-addr", &addr, "--ephemeral"];
    if let Some(j) = join {
        args.extend(["--join", j]);
    }
    Server::start(&args, &[("OPMESH_CLUSTER_SECRET", SECRET)])
}

/// node-1 bootstraps, node-2 joins; returns once both see two nodes up and a leader.
async fn two_nodes() -> [Server; 2] {
    let p1 = free_port();
    let seed = format!("127.0.0.1:{p1}");
    let a = start_node("node-1", p1, None);
    let b = start_node("node-2", free_port(), Some(&seed));
    for s in [&a, &b] {
        wait_until(
            "two nodes up with a leader",
            Duration::from_secs(20),
            || async {
                try_get_json(&s.url("/v1/cluster")).await.is_some_and(|c| {
                    c["leader"].is_string()
                        && c["nodes"]
                            .as_array()
                            .is_some_and(|n| n.len() == 2 && n.iter().all(|x| x["status"] == "up"))
                })
            },
        )
        .await;
    }
    [a, b]
}

/// Pins `echo` to node-2 and runs `n` echo operations submitted to node-1.
async fn forward_echoes(s: &[Server; 2], n: usize) {
    let r = client()
        .put(s[0].url("/v1/routes/echo"))
        .json(&json!({"strategy": "pinned", "nodes": ["node-2"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    wait_until("the route on node-1", Duration::from_secs(10), || async {
        client()
            .get(s[0].url("/v1/routes/echo"))
            .send()
            .await
            .ok()
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    })
    .await;
    for i in 0..n {
        let (code, v) = submit(&s[0], json!({"type": "echo", "payload": i}), &[]).await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["executed_by"], "node-2", "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_node_cluster_exposes_raft_link_and_registry_figures() {
    let s = two_nodes().await;
    const N: usize = 10;
    forward_echoes(&s, N).await;

    // Leadership settles: exactly one node says it leads, and both agree on the term.
    wait_until("one leader, one term", Duration::from_secs(10), || async {
        let (a, b) = (scrape(&s[0]).await, scrape(&s[1]).await);
        let leaders = a.value("opmesh_raft_is_leader", &[]) + b.value("opmesh_raft_is_leader", &[]);
        leaders == 1.0 && a.value("opmesh_raft_term", &[]) == b.value("opmesh_raft_term", &[])
    })
    .await;
    // Every committed entry gets applied.
    wait_until("no apply lag", Duration::from_secs(10), || async {
        let (a, b) = (scrape(&s[0]).await, scrape(&s[1]).await);
        a.try_value("opmesh_raft_apply_lag", &[]) == Some(0.0)
            && b.try_value("opmesh_raft_apply_lag", &[]) == Some(0.0)
    })
    .await;
    wait_until(
        "both forwarding counts settle",
        Duration::from_secs(10),
        || async {
            let a = scrape(&s[0]).await;
            let b = scrape(&s[1]).await;
            a.value("opmesh_ops_in_flight", &[]) == 0.0
                && b.value("opmesh_ops_in_flight", &[]) == 0.0
        },
    )
    .await;

    let (a, b) = (scrape(&s[0]).await, scrape(&s[1]).await);
    for (m, me, peer) in [(&a, "node-1", "node-2"), (&b, "node-2", "node-1")] {
        assert!(m.value("opmesh_raft_term", &[]) >= 1.0, "{me}");
        let commit = m.value("opmesh_raft_commit_index", &[]);
        let applied = m.value("opmesh_raft_last_applied_index", &[]);
        assert!(applied >= 1.0, "{me}: entries applied");
        assert_eq!(commit, applied, "{me}: no lag, so commit = applied");
        assert!(m.value("opmesh_raft_last_log_index", &[]) >= commit, "{me}");
        assert!(
            m.value("opmesh_raft_leader_changes_total", &[]) >= 1.0,
            "{me}: it has seen a leader"
        );
        assert_eq!(
            m.value("opmesh_cluster_duty_restarts_total", &[]),
            0.0,
            "{me}: no cluster duty failed"
        );
        assert_eq!(
            m.value("opmesh_cluster_messages_refused_total", &[]),
            0.0,
            "{me}: honest nodes name only themselves"
        );
        // The registry, as every node sees it.
        for n in ["node-1", "node-2"] {
            assert_eq!(
                m.value("opmesh_node_up", &[("node", n)]),
                1.0,
                "{me} sees {n}"
            );
        }
        assert_eq!(m.find("opmesh_node_up", &[]).len(), 2, "{me}");
        assert_eq!(m.value("opmesh_cluster_nodes", &[("status", "up")]), 2.0);
        assert_eq!(m.value("opmesh_cluster_nodes", &[("status", "down")]), 0.0);
        assert_eq!(
            m.value("opmesh_cluster_nodes", &[("status", "leaving")]),
            0.0
        );
        // Its link to the other node.
        assert_eq!(m.value("opmesh_link_up", &[("peer", peer)]), 1.0, "{me}");
        // One connection per api worker, every one up.
        let lanes_up = m.value("opmesh_link_lanes_up", &[("peer", peer)]);
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(lanes_up, workers as f64, "{me}: lanes up");
        for dir in ["sent", "received"] {
            let d = [("peer", peer), ("direction", dir)];
            assert!(m.value("opmesh_link_bytes_total", &d) > 0.0, "{me} {dir}");
            assert!(m.value("opmesh_link_frames_total", &d) > 0.0, "{me} {dir}");
        }
        assert!(m.value("opmesh_link_reconnects_total", &[("peer", peer)]) >= 0.0);
    }
    let leaders = a.value("opmesh_raft_is_leader", &[]) + b.value("opmesh_raft_is_leader", &[]);
    assert_eq!(leaders, 1.0);

    // Forwarded work: node-1 (the origin) and node-2 (the owner) each count the N
    // operations; only node-2 ran them.
    let echo = [("type", "echo"), ("outcome", "succeeded")];
    assert_eq!(a.value("opmesh_ops_total", &echo), N as f64);
    assert_eq!(b.value("opmesh_ops_total", &echo), N as f64);
    let execute = [("type", "echo"), ("stage", "execute")];
    let total = [("type", "echo"), ("stage", "total")];
    assert_eq!(a.value("opmesh_op_duration_seconds_count", &execute), 0.0);
    assert_eq!(
        a.value("opmesh_op_duration_seconds_count", &total),
        N as f64
    );
    assert_eq!(
        b.value("opmesh_op_duration_seconds_count", &execute),
        N as f64
    );
}

// ---------------------------------------------------------------------------------------
// The dashboard and the alert rules

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/observability/grafana-dashboard.json"
);
const ALERTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/observability/prometheus-alerts.yml"
);
const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/observability/README.md");

/// Every `opmesh_[a-z_]+` identifier in a PromQL expression (not inside a longer word).
fn metric_names(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(at) = expr[i..].find("opmesh_") {
        let start = i + at;
        let before_ok = start == 0 || {
            let c = b[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_' || c == b':')
        };
        let mut end = start + "opmesh_".len();
        while end < b.len() && (b[end].is_ascii_lowercase() || b[end] == b'_') {
            end += 1;
        }
        if before_ok {
            out.push(expr[start..end].to_string());
        }
        i = end;
    }
    out
}

/// The dashboard's queries (panel targets and variable queries), checked for structure.
fn dashboard_exprs() -> Vec<String> {
    let d: Value = serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap())
        .expect("the dashboard is JSON");
    let schema = d["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");
    assert!(d["title"].is_string() && d["uid"].is_string());
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no `{name}` variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    let type_query = var("type")["query"]["query"]
        .as_str()
        .or(var("type")["query"].as_str())
        .expect("the type variable has a query");
    assert_eq!(type_query, "label_values(opmesh_ops_total, type)");

    let mut exprs = Vec::new();
    for v in vars {
        if v["type"] == "query" {
            let q = v["query"]["query"].as_str().or(v["query"].as_str());
            exprs.push(q.expect("a query variable has a query").to_string());
            assert_eq!(v["datasource"]["uid"], "${datasource}", "{v}");
        }
    }
    let panels = d["panels"].as_array().expect("panels");
    let mut queried = 0;
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "panel ids are unique"
        );
        if p["type"] == "row" {
            continue; // a row groups panels; it queries nothing
        }
        let title = p["title"].as_str().expect("a panel has a title");
        assert_eq!(p["datasource"]["type"], "prometheus", "{title}");
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        assert!(p["gridPos"]["w"].as_u64().is_some(), "{title}: gridPos");
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("{title}: targets"));
        assert!(!targets.is_empty(), "{title}: no targets");
        for t in targets {
            let e = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{title}: target without expr"));
            assert!(e.contains("opmesh_"), "{title}: {e}");
            assert!(t["refId"].is_string(), "{title}: refId");
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            exprs.push(e.to_string());
        }
        queried += 1;
    }
    assert!(queried >= 15, "{queried} panels");
    exprs
}

/// The alert rules' expressions, checked for structure; also returns the alert names.
fn alert_exprs() -> (Vec<String>, BTreeSet<String>) {
    let text = std::fs::read_to_string(ALERTS).unwrap();
    let doc: Value = serde_norway::from_str(&text).expect("the rule file is YAML");
    let groups = doc["groups"].as_array().expect("groups");
    assert!(!groups.is_empty());
    let mut exprs = Vec::new();
    let mut names = BTreeSet::new();
    for g in groups {
        assert!(g["name"].is_string(), "a group has a name");
        let rules = g["rules"].as_array().expect("rules");
        assert!(!rules.is_empty());
        for r in rules {
            let alert = r["alert"]
                .as_str()
                .unwrap_or_else(|| panic!("alert name: {r}"));
            let expr = r["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{alert}: expr"));
            let for_ = r["for"].as_str().unwrap_or_else(|| panic!("{alert}: for"));
            assert!(
                for_.ends_with(['s', 'm', 'h']) && for_[..for_.len() - 1].parse::<u32>().is_ok(),
                "{alert}: for {for_:?}"
            );
            let sev = r["labels"]["severity"]
                .as_str()
                .unwrap_or_else(|| panic!("{alert}: severity"));
            assert!(["page", "ticket"].contains(&sev), "{alert}: severity {sev}");
            for a in ["summary", "description"] {
                let t = r["annotations"][a]
                    .as_str()
                    .unwrap_or_else(|| panic!("{alert}: {a}"));
                assert!(t.len() > 10, "{alert}: {a}");
            }
            assert!(names.insert(alert.to_string()), "{alert} twice");
            exprs.push(expr.to_string());
        }
    }
    (exprs, names)
}

#[test]
fn the_exposition_parser_reads_labels_escapes_and_infinity() {
    let m = parse(concat!(
        "# HELP x_total a help text here\n",
        "# TYPE x counter\n",
        "x_total{a=\"1\",b=\"q\\\"uote\\\\,}\"} 3\n",
        "y +Inf\n",
        "# EOF\n"
    ));
    assert_eq!(m.value("x_total", &[("a", "1"), ("b", "q\"uote\\,}")]), 3.0);
    assert_eq!(m.value("y", &[]), f64::INFINITY);
    assert_eq!(m.family_of("x_total"), "x");
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(opmesh_op_duration_seconds_bucket{x=\"opmesh_no\"}[5m]))) / xopmesh_y + opmesh_ops_total"
        ),
        vec![
            "opmesh_op_duration_seconds_bucket",
            "opmesh_no",
            "opmesh_ops_total"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_query_only_metrics_a_cluster_exposes() {
    let dash = dashboard_exprs();
    let (alerts, alert_names) = alert_exprs();
    for a in [
        "OpmeshErrorBudgetBurnFast",
        "OpmeshErrorBudgetBurnSlow",
        "OpmeshLatencyP99OverSLO",
        "OpmeshQueueSaturated",
        "OpmeshNodeDown",
        "OpmeshTraceSpansDropped",
        "OpmeshActorRestarts",
        "OpmeshClusterDutyRestarts",
        "OpmeshCircuitBreakerOpen",
    ] {
        assert!(alert_names.contains(a), "no alert {a}");
    }
    let used_by = |exprs: &[String]| -> BTreeSet<String> {
        exprs
            .iter()
            .flat_map(|e| metric_names(e))
            .map(|n| strip_histogram_suffix(&n).to_string())
            .collect()
    };
    let dash_used = used_by(&dash);
    let alert_used = used_by(&alerts);
    // What the brief for each asked of it.
    for m in [
        "opmesh_ops_total",
        "opmesh_op_duration_seconds",
        "opmesh_queue_depth",
        "opmesh_queue_capacity",
        "opmesh_ops_in_flight",
        "opmesh_ops_running",
        "opmesh_cache_hits_total",
        "opmesh_batch_size",
        "opmesh_raft_term",
        "opmesh_raft_leader_changes_total",
        "opmesh_raft_apply_lag",
        "opmesh_link_bytes_total",
        "opmesh_link_reconnects_total",
        "opmesh_node_up",
        "opmesh_actor_restarts_total",
        "opmesh_trace_spans_dropped_total",
    ] {
        assert!(dash_used.contains(m), "the dashboard shows no {m}");
    }
    for m in [
        "opmesh_ops_total",
        "opmesh_op_duration_seconds",
        "opmesh_queue_depth",
        "opmesh_queue_capacity",
        "opmesh_node_up",
        "opmesh_trace_spans_dropped_total",
        "opmesh_actor_restarts_total",
        "opmesh_breaker_state",
    ] {
        assert!(alert_used.contains(m), "no alert uses {m}");
    }

    // A live cluster of two, after forwarded work, exposes every one of them.
    let s = two_nodes().await;
    forward_echoes(&s, 3).await;
    let until = Instant::now() + Duration::from_secs(10);
    let exposed: BTreeSet<String> = loop {
        let (a, b) = (scrape(&s[0]).await, scrape(&s[1]).await);
        let complete = [&a, &b].iter().all(|m| {
            m.try_value("opmesh_raft_commit_index", &[]).is_some()
                && !m.find("opmesh_link_bytes_total", &[]).is_empty()
        });
        if complete {
            break a.exposed().union(&b.exposed()).cloned().collect();
        }
        assert!(
            Instant::now() < until,
            "both nodes expose raft and link figures within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for (what, used) in [("dashboard", &dash_used), ("alert rules", &alert_used)] {
        let missing: Vec<_> = used.difference(&exposed).collect();
        assert!(
            missing.is_empty(),
            "the {what} query metrics no node exposes: {missing:?}\nexposed: {exposed:?}"
        );
    }
    // And the README lists every metric a node exposes.
    let readme = std::fs::read_to_string(README).unwrap();
    let undocumented: Vec<_> = exposed
        .iter()
        .filter(|m| !readme.contains(&format!("`{m}`")) && !readme.contains(&format!("`{m}{{")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "observability/README.md does not list {undocumented:?}"
    );
}

#[tokio::test]
async fn http_requests_are_counted_by_route_and_status_and_timed() {
    let s = Server::start(&[], &[]);
    let before = scrape(&s).await;
    let count = |m: &Scrape, route: &str, status: &str| {
        m.find(
            "opmesh_http_requests_total",
            &[("route", route), ("status", status)],
        )
        .iter()
        .map(|s| s.value)
        .sum::<f64>()
    };
    for i in 0..3 {
        let (code, _) = submit(&s, json!({"type": "echo", "payload": i}), &[]).await;
        assert_eq!(code, 200);
    }
    let r = client()
        .post(s.url("/v1/ops"))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let id = uuid::Uuid::new_v4();
    let r = client()
        .get(s.url(&format!("/v1/ops/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = client()
        .get(s.url("/no/such/endpoint"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let after = scrape(&s).await;
    let delta =
        |route: &str, status: &str| count(&after, route, status) - count(&before, route, status);
    assert_eq!(delta("/v1/ops", "200"), 3.0);
    assert_eq!(delta("/v1/ops", "400"), 1.0);
    // The pattern, never the concrete id: one series for every id.
    assert_eq!(delta("/v1/ops/{id}", "404"), 1.0);
    assert_eq!(delta("unmatched", "404"), 1.0);
    assert!(after
        .find(
            "opmesh_http_requests_total",
            &[("route", &format!("/v1/ops/{id}"))]
        )
        .is_empty());
    let timed = |m: &Scrape| {
        m.try_value(
            "opmesh_http_request_duration_seconds_count",
            &[("method", "POST"), ("route", "/v1/ops")],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(timed(&after) - timed(&before), 4.0);
}
