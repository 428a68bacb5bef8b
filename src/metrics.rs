//! `GET /metrics`: the node's figures in the Prometheus / OpenMetrics text format.
//!
//! Nothing here is on an operation's path. The engine already counts with atomics as
//! operations go (per type, per node, per cache, per link); a scrape reads them through
//! one [`Collector`] and encodes them with prometheus-client's OpenMetrics encoder. So a
//! scrape costs a few thousand atomic loads, and a node that is never scraped pays nothing.
//!
//! The metric names are a contract: `observability/grafana-dashboard.json` and
//! `observability/prometheus-alerts.yml` query them, and `tests/metrics.rs` checks that
//! every name those files use is exposed. Per-node figures carry no `node` label (the
//! scrape target's `instance` label tells the nodes apart); only `opmesh_node_up` names
//! nodes, one series per node of the registry.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use opmesh_actors::metrics::BucketSnapshot;
use opmesh_actors::{ChildKind, Node};
use opmesh_cluster::Cluster;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::journal::{JournalStats, RECOVERED_OUTCOMES};
use crate::telemetry::Telemetry;

/// The content type of what [`render`] returns (OpenMetrics text 1.0.0; Prometheus
/// scrapes it as it is).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long a scrape waits for the Raft core to tell its commit index.
const RAFT_ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// The node's metrics as OpenMetrics text, read now.
pub async fn render(
    node: &Node,
    cluster: Option<&Cluster>,
    telemetry: &Telemetry,
    http: Option<&crate::api::traffic::HttpMetrics>,
    limits: Option<&crate::api::limits::AdmissionStats>,
    journal: Option<&Arc<JournalStats>>,
) -> String {
    let cluster = match cluster {
        Some(c) => Some(ClusterSource {
            committed: tokio::time::timeout(RAFT_ASK_TIMEOUT, c.committed_index())
                .await
                .ok()
                .flatten(),
            cluster: c.clone(),
        }),
        None => None,
    };
    let mut registry = Registry::default();
    registry.register_collector(Box::new(OpmeshCollector {
        node: node.clone(),
        cluster,
        telemetry: telemetry.clone(),
        http: http.map(|h| (h.requests(), h.durations())),
        limits: limits.cloned().unwrap_or_default(),
        journal: journal.cloned(),
    }));
    let mut out = String::with_capacity(32 * 1024);
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("encoding into a String does not fail");
    out
}

/// Reads the figures of one node when scraped.
struct OpmeshCollector {
    node: Node,
    cluster: Option<ClusterSource>,
    telemetry: Telemetry,
    /// The api's requests by route and status, and durations by route, read before
    /// encoding.
    http: Option<HttpFigures>,
    /// What the api's limits refused (all zero without an api, or with no limit on).
    limits: crate::api::limits::AdmissionStats,
    /// The journal's counters, when `engine.journal` is on.
    journal: Option<Arc<JournalStats>>,
}

type HttpFigures = (
    Vec<(crate::api::traffic::Endpoint, String, u64)>,
    Vec<(crate::api::traffic::Endpoint, BucketSnapshot)>,
);

struct ClusterSource {
    cluster: Cluster,
    /// Asked of the Raft core before encoding (the encoder is synchronous).
    committed: Option<u64>,
}

impl fmt::Debug for OpmeshCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpmeshCollector")
            .field("node", &self.node.id())
            .field("clustered", &self.cluster.is_some())
            .finish()
    }
}

/// The outcomes `opmesh_ops_total` counts.
const OUTCOMES: [&str; 3] = ["succeeded", "failed", "expired"];
/// What a registry node's status may be (see `opmesh_cluster::types::NodeStatus`).
const NODE_STATUSES: [&str; 3] = ["up", "down", "leaving"];

/// Writes metric families. Each method writes one family: its HELP and TYPE lines, then
/// its samples. Counter names are given whole (`…_total`), as they are exposed.
struct Out<'a> {
    enc: DescriptorEncoder<'a>,
}

type Labels<'a, const N: usize> = [(&'static str, &'a str); N];

impl Out<'_> {
    fn counter(&mut self, name: &str, help: &str, v: u64) -> fmt::Result {
        self.counters::<0>(name, help, [([], v)])
    }

    fn counters<'l, const N: usize>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels<'l, N>, u64)>,
    ) -> fmt::Result {
        // The encoder adds `_total` to a counter's samples; the family name has none.
        let family = name.strip_suffix("_total").unwrap_or(name);
        let mut m = self
            .enc
            .encode_descriptor(family, help, None, MetricType::Counter)?;
        for (labels, v) in samples {
            if N == 0 {
                m.encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            } else {
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }
        Ok(())
    }

    fn gauge(&mut self, name: &str, help: &str, v: impl EncodeGaugeValue) -> fmt::Result {
        self.gauges::<0, _>(name, help, [([], v)])
    }

    fn gauges<'l, const N: usize, V: EncodeGaugeValue>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels<'l, N>, V)>,
    ) -> fmt::Result {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in samples {
            if N == 0 {
                m.encode_gauge(&v)?;
            } else {
                m.encode_family(&labels)?.encode_gauge(&v)?;
            }
        }
        Ok(())
    }

    /// A histogram family; the recorded values divided by `divisor` are in the exposed
    /// unit (1e9: ns → s).
    fn histograms<'l, const N: usize>(
        &mut self,
        name: &str,
        unit: Option<&Unit>,
        help: &str,
        divisor: f64,
        samples: impl IntoIterator<Item = (Labels<'l, N>, BucketSnapshot)>,
    ) -> fmt::Result {
        let mut m = self
            .enc
            .encode_descriptor(name, help, unit, MetricType::Histogram)?;
        for (labels, snap) in samples {
            let (sum, count, buckets) = histogram(&snap, divisor);
            if N == 0 {
                m.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            } else {
                m.encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        Ok(())
    }
}

/// A [`BucketSnapshot`] as the encoder takes it: `(sum, count, [(upper bound, count in
/// this bucket)])`, the bounds and sum divided by `divisor` (a division, not a
/// multiplication by the inverse, so 30 s is 30, not 30.000000000000004), ending with
/// `+Inf`. The encoder adds the buckets up again: the exposed buckets are the snapshot's
/// cumulative counts.
fn histogram(s: &BucketSnapshot, divisor: f64) -> (f64, u64, Vec<(f64, u64)>) {
    let mut buckets = Vec::with_capacity(s.cumulative.len() + 1);
    let mut prev = 0;
    for &(bound, cum) in &s.cumulative {
        buckets.push((bound as f64 / divisor, cum.saturating_sub(prev)));
        prev = cum;
    }
    buckets.push((f64::INFINITY, s.count.saturating_sub(prev)));
    (s.sum as f64 / divisor, s.count, buckets)
}

fn flag(b: bool) -> u64 {
    u64::from(b)
}

impl Collector for OpmeshCollector {
    fn encode(&self, enc: DescriptorEncoder) -> fmt::Result {
        let mut out = Out { enc };
        self.encode_engine(&mut out)?;
        self.encode_telemetry(&mut out)?;
        if let Some(c) = &self.cluster {
            encode_cluster(c, &mut out)?;
        }
        if let Some(j) = &self.journal {
            encode_journal(j, &mut out)?;
        }
        // Families with no series yet (nothing served) are left out.
        if let Some((requests, durations)) = self.http.as_ref().filter(|(r, _)| !r.is_empty()) {
            out.counters(
                "opmesh_http_requests_total",
                "HTTP requests answered, by endpoint (method and route pattern; route \
                 unmatched for a request no endpoint takes) and status.",
                requests.iter().map(|((method, route), status, n)| {
                    (
                        [
                            ("method", *method),
                            ("route", *route),
                            ("status", status.as_str()),
                        ],
                        *n,
                    )
                }),
            )?;
            out.histograms(
                "opmesh_http_request_duration",
                Some(&Unit::Seconds),
                "Time to answer an HTTP request (to the response's head for a stream), by \
                 endpoint.",
                1e9,
                durations.iter().map(|((method, route), s)| {
                    ([("method", *method), ("route", *route)], s.clone())
                }),
            )?;
        }
        encode_limits(&self.limits, &mut out)?;
        if let Some(p) = Process::read() {
            encode_process(&p, &mut out)?;
        }
        Ok(())
    }
}

/// The journal of accepted operations (`engine.journal`), when it is on.
fn encode_journal(j: &JournalStats, out: &mut Out) -> fmt::Result {
    let f = j.figures();
    out.gauge(
        "opmesh_journal_entries",
        "Operations in the journal: answered 202 and their result not yet recorded (a \
         restart from the data dir runs them again).",
        f.entries,
    )?;
    out.counter(
        "opmesh_journal_appended_total",
        "Operations written to the journal before their 202.",
        f.appended,
    )?;
    out.counter(
        "opmesh_journal_removed_total",
        "Operations removed from the journal once their result was recorded (or, after a \
         restart, their end decided).",
        f.removed,
    )?;
    out.counter(
        "opmesh_journal_commits_total",
        "Journal transactions committed, each fsync'd: the appends of many requests together \
         (group commit) with the removals gathered meanwhile, or removals alone after 500 ms \
         without appends.",
        f.commits,
    )?;
    out.counter(
        "opmesh_journal_write_failures_total",
        "Journal commits that failed; the operations they carried were refused (503 \
         journal_write_failed), none started.",
        f.write_failures,
    )?;
    let r = &f.recovered;
    out.counters(
        "opmesh_journal_recovered_total",
        "Operations found in the journal at start, by what became of them: resubmitted \
         (run again with their ids), expired (deadline passed while the node was down), \
         refused (the node as it is now refused them; failed with the reason).",
        [r.resubmitted, r.expired, r.refused]
            .into_iter()
            .zip(RECOVERED_OUTCOMES)
            .map(|(v, outcome)| ([("outcome", outcome)], v)),
    )?;
    let (commit_ns, commit_ops) = j.commit_histograms();
    out.histograms(
        "opmesh_journal_commit_duration",
        Some(&Unit::Seconds),
        "Time to commit one journal transaction, its fsync included.",
        1e9,
        [([], commit_ns)],
    )?;
    out.histograms::<0>(
        "opmesh_journal_commit_ops",
        None,
        "Operations appended per journal commit that appended (the group commit's size).",
        1.0,
        [([], commit_ops)],
    )
}

/// The process's own figures, from `/proc/self` (Linux; elsewhere none are exposed).
#[derive(Debug, Default, PartialEq)]
struct Process {
    resident_bytes: u64,
    cpu_seconds: f64,
    threads: u64,
    open_fds: u64,
}

/// Clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`: 100 on every Linux ABI).
const USER_HZ: f64 = 100.0;

impl Process {
    fn read() -> Option<Process> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let mut p = Process::parse(&status, &stat)?;
        p.open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
        Some(p)
    }

    /// Resident memory (read as the bench reads it) and threads from `status`, user and
    /// system CPU time from `stat`.
    fn parse(status: &str, stat: &str) -> Option<Process> {
        let threads = status
            .lines()
            .find_map(|l| l.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse::<u64>().ok());
        // After the command name, which may hold spaces and parentheses: state is
        // field 3, utime and stime fields 14 and 15.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<u64>().ok());
        Some(Process {
            resident_bytes: crate::bench::rss::parse_status(status)?.rss,
            cpu_seconds: (ticks(14)? + ticks(15)?) as f64 / USER_HZ,
            threads: threads?,
            open_fds: 0,
        })
    }
}

/// The api's limits (`[limits]`): always exposed, zero while a limit is off, so alerts
/// and dashboards find the series.
fn encode_limits(l: &crate::api::limits::AdmissionStats, out: &mut Out) -> fmt::Result {
    out.counters(
        "opmesh_rate_limited_total",
        "Submissions refused by a rate limit of the api (429 rate_limited, or 413 for a \
         batch over the burst), by limit: global (limits.rate_per_sec) or client \
         (limits.client_rate_per_sec).",
        [
            ([("limit", "global")], l.rate_limited_global),
            ([("limit", "client")], l.rate_limited_client),
        ],
    )?;
    out.counter(
        "opmesh_in_flight_refused_total",
        "Submissions refused because the node had limits.max_in_flight operations in \
         flight (429 overloaded, or 413 for a batch over the cap).",
        l.in_flight_refused,
    )?;
    out.gauge(
        "opmesh_rate_limit_clients",
        "Clients whose rate allowance is tracked apart now (at most limits.max_clients).",
        l.clients_tracked,
    )
}

fn encode_process(p: &Process, out: &mut Out) -> fmt::Result {
    out.gauge(
        "process_resident_memory_bytes",
        "Resident memory of the process, in bytes.",
        p.resident_bytes,
    )?;
    let mut m = out.enc.encode_descriptor(
        "process_cpu_seconds",
        "CPU time the process used, user and system, in seconds.",
        None,
        MetricType::Counter,
    )?;
    m.encode_counter::<NoLabelSet, _, f64>(&p.cpu_seconds, None)?;
    out.gauge("process_threads", "Threads of the process.", p.threads)?;
    out.gauge(
        "process_open_fds",
        "File descriptors the process has open (connections included).",
        p.open_fds,
    )
}

impl OpmeshCollector {
    fn encode_engine(&self, out: &mut Out) -> fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let node = &self.node;
        let m = node.metrics();
        let types = node.type_entries();
        let names: Vec<&str> = types.iter().map(|t| &*t.name).collect();

        out.counters(
            "opmesh_ops_total",
            "Operations finished, by type and outcome (succeeded, failed, expired). Counted \
             by the node that accepted the operation, from a client or from a peer: an \
             operation forwarded to its owner counts on the origin and on the owner.",
            types.iter().zip(&names).flat_map(|(t, name)| {
                let tm = &t.metrics;
                [tm.succeeded.get(), tm.failed.get(), tm.expired.get()]
                    .into_iter()
                    .zip(OUTCOMES)
                    .map(move |(v, outcome)| ([("type", *name), ("outcome", outcome)], v))
            }),
        )?;
        out.counter(
            "opmesh_ops_rejected_total",
            "Submissions refused before they were accepted: invalid input, unknown type or \
             no route, a full queue (429), or the node shutting down.",
            m.rejected.get(),
        )?;
        out.histograms(
            "opmesh_op_duration",
            Some(&Unit::Seconds),
            "Operation latency by type and stage: queue = waiting in the scheduler's queue, \
             execute = handler runs (retries and backoff included), total = accepted to \
             finished. On the origin of a forwarded operation only total is recorded.",
            1e9,
            types.iter().zip(&names).flat_map(|(t, name)| {
                let st = &t.metrics.stages;
                [
                    ("queue", st.queue.snapshot()),
                    ("execute", st.execute.snapshot()),
                    ("total", st.total.snapshot()),
                ]
                .into_iter()
                .map(move |(stage, snap)| ([("type", *name), ("stage", stage)], snap))
            }),
        )?;
        out.gauges(
            "opmesh_queue_depth",
            "Operations of a type accepted and not yet handed to an executor (at most \
             opmesh_queue_capacity; a submission beyond it is refused with 429).",
            types
                .iter()
                .zip(&names)
                .map(|(t, name)| ([("type", *name)], t.queued())),
        )?;
        out.gauges(
            "opmesh_queue_capacity",
            "Operations of a type allowed to wait before submissions are refused \
             (types.<type>.queue_capacity, else engine.queue_capacity).",
            types
                .iter()
                .zip(&names)
                .map(|(t, name)| ([("type", *name)], t.queue_capacity())),
        )?;
        out.gauges(
            "opmesh_type_ops_running",
            "Operations of a type whose handler runs now.",
            types
                .iter()
                .zip(&names)
                .map(|(t, name)| ([("type", *name)], t.running())),
        )?;
        out.gauges(
            "opmesh_type_max_concurrent",
            "Operations of a type that may run at once: its own slots \
             (types.<type>.max_concurrent), or its share of the slots the types without \
             their own share (engine.type_share_percent).",
            types
                .iter()
                .zip(&names)
                .map(|(t, name)| ([("type", *name)], t.max_concurrent())),
        )?;
        let now = std::time::Instant::now();
        out.gauges(
            "opmesh_breaker_state",
            "State of a type's circuit breaker: 0 closed (operations run), 1 open \
             (submissions refused with 503 circuit_open), 2 half-open (trial operations \
             go through). Types whose webhooks share a target share a breaker. Types \
             without a breaker have no series.",
            types.iter().zip(&names).filter_map(|(t, name)| {
                t.breaker()
                    .map(|b| ([("type", *name)], b.state(now) as u8 as u64))
            }),
        )?;
        out.gauge(
            "opmesh_ops_in_flight",
            "Operations accepted and not yet finished: queued, running, or being answered.",
            m.in_flight(),
        )?;
        out.gauge(
            "opmesh_result_store_bytes",
            "Bytes of results and errors of finished operations kept for GET /v1/ops/{id} \
             (at most engine.result_store_bytes; the oldest go first).",
            node.result_store_bytes(),
        )?;
        out.gauge(
            "opmesh_result_store_budget_bytes",
            "engine.result_store_bytes: the most opmesh_result_store_bytes may be.",
            node.config().result_store_bytes,
        )?;
        out.gauge(
            "opmesh_ops_running",
            "Operations whose handler runs now.",
            node.running(),
        )?;
        out.counters(
            "opmesh_op_retries_total",
            "Handler runs repeated after a retryable error, by type.",
            types
                .iter()
                .zip(&names)
                .map(|(t, name)| ([("type", *name)], t.metrics.retries.get())),
        )?;

        let c = node.cache_stats();
        out.counter(
            "opmesh_cache_hits_total",
            "Operations with an idempotency key answered without running: a stored result, \
             or joined to a run of the same key in flight.",
            c.hits,
        )?;
        out.counter(
            "opmesh_cache_misses_total",
            "Operations with an idempotency key that found no stored result and no run in \
             flight, and so ran.",
            c.misses,
        )?;
        out.counter(
            "opmesh_cache_joined_total",
            "Cache hits that joined a run of the same key in flight (a part of \
             opmesh_cache_hits_total).",
            c.joined,
        )?;
        out.counter(
            "opmesh_cache_evictions_total",
            "Results pushed out of the cache by newer ones (LRU).",
            c.evictions,
        )?;
        out.counter(
            "opmesh_cache_expirations_total",
            "Results found older than the cache TTL and dropped.",
            c.expirations,
        )?;
        out.gauge(
            "opmesh_cache_entries",
            "Results held in the cache now.",
            c.size,
        )?;
        out.gauge(
            "opmesh_cache_bytes",
            "Bytes of the keys and results held in the cache now (at most cache.max_bytes).",
            c.bytes,
        )?;
        out.gauge(
            "opmesh_cache_budget_bytes",
            "cache.max_bytes: the most opmesh_cache_bytes may be.",
            node.config().cache.max_bytes,
        )?;

        out.histograms::<0>(
            "opmesh_batch_size",
            None,
            "Operations per batch the scheduler handed to the executor.",
            1.0,
            [([], m.batch_sizes.snapshot())],
        )?;
        out.counter(
            "opmesh_batches_total",
            "Batches the scheduler handed to the executor.",
            m.batches.load(Relaxed),
        )?;
        let took = node.shard_operations();
        let shard_names: Vec<String> = (0..took.len()).map(|i| i.to_string()).collect();
        out.counters(
            "opmesh_shard_operations_total",
            "Operations each shard of the engine's hot path took (routed by its router, or \
             forwarded to it by a peer), by shard (0 to engine.shards - 1): how evenly the \
             work spreads over the cores.",
            shard_names
                .iter()
                .zip(&took)
                .map(|(name, n)| ([("shard", name.as_str())], *n)),
        )?;
        out.counters(
            "opmesh_actor_restarts_total",
            "Engine actors the node supervisor restarted after they failed or stopped, by \
             actor (router, cache, scheduler, executor).",
            [
                ChildKind::Router,
                ChildKind::Cache,
                ChildKind::Scheduler,
                ChildKind::Executor,
            ]
            .map(|k| ([("actor", k.name())], m.actor_restarts_of(k))),
        )?;

        let events = node.events();
        out.counter(
            "opmesh_events_dropped_total",
            "Live events (GET /v1/events) a subscriber missed because its buffer was full.",
            events.dropped_total(),
        )?;
        out.gauge(
            "opmesh_event_subscribers",
            "Live event subscribers connected now.",
            events.subscribers(),
        )?;
        out.gauge(
            "opmesh_uptime_seconds",
            "Seconds since the engine started.",
            node.uptime().as_secs_f64(),
        )?;
        out.gauges(
            "opmesh_build_info",
            "Always 1; the version label tells which opmesh build runs.",
            [([("version", env!("CARGO_PKG_VERSION"))], 1u64)],
        )
    }

    fn encode_telemetry(&self, out: &mut Out) -> fmt::Result {
        let t = self.telemetry.stats();
        out.counter(
            "opmesh_trace_spans_exported_total",
            "Spans the OTLP exporter sent and the receiver accepted.",
            t.spans_exported,
        )?;
        out.counter(
            "opmesh_trace_spans_dropped_total",
            "Spans dropped: the export queue was full, or an export failed.",
            t.spans_dropped,
        )?;
        out.counter(
            "opmesh_trace_export_failures_total",
            "OTLP export calls that failed (receiver unreachable, refused, timed out).",
            t.export_failures,
        )?;
        out.counter(
            "opmesh_traceparent_invalid_total",
            "Requests whose traceparent header was malformed (ignored: the operation \
             started a new trace).",
            t.traceparent_invalid,
        )
    }
}

fn encode_cluster(c: &ClusterSource, out: &mut Out) -> fmt::Result {
    let cluster = &c.cluster;
    let raft = cluster.raft().metrics().borrow().clone();
    let status = cluster.status();
    let applied = raft.last_applied.map(|l| l.index);

    out.gauge(
        "opmesh_raft_term",
        "The Raft term this node is in.",
        raft.current_term,
    )?;
    if let Some(committed) = c.committed {
        out.gauge(
            "opmesh_raft_commit_index",
            "Index of the last Raft log entry this node knows is committed (openraft's \
             RaftState.committed; absent while nothing is committed or Raft does not \
             answer within 1 s).",
            committed,
        )?;
    }
    if let Some(last) = raft.last_log_index {
        out.gauge(
            "opmesh_raft_last_log_index",
            "Index of the last entry in this node's Raft log (committed or not).",
            last,
        )?;
    }
    out.gauge(
        "opmesh_raft_last_applied_index",
        "Index of the last Raft log entry applied to this node's state machine (the \
         routing table and node registry); 0 before the first.",
        applied.unwrap_or(0),
    )?;
    // Committed, or else logged: a node that cannot tell what is committed still shows
    // what it holds and has not applied.
    let ahead = c.committed.or(raft.last_log_index);
    out.gauge(
        "opmesh_raft_apply_lag",
        "Raft entries committed but not yet applied here (opmesh_raft_commit_index - \
         opmesh_raft_last_applied_index; the last log index stands in for the commit \
         index when Raft did not tell it).",
        ahead.unwrap_or(0).saturating_sub(applied.unwrap_or(0)),
    )?;
    out.gauge(
        "opmesh_raft_is_leader",
        "1 if this node is the Raft leader, else 0.",
        flag(status.raft_state == "leader"),
    )?;
    out.counter(
        "opmesh_raft_leader_changes_total",
        "Times the Raft leader this node knows of changed (the first leader it learned \
         of included).",
        cluster.leader_changes(),
    )?;
    out.counter(
        "opmesh_cluster_duty_restarts_total",
        "Times a cluster background duty (heartbeats, failure detection, voter balancing, \
         the applied-state watcher) failed and was restarted.",
        cluster.duty_restarts(),
    )?;
    out.counter(
        "opmesh_cluster_handshakes_refused_total",
        "Connections to the cluster port refused: a failed or unfinished handshake (a \
         wrong secret, another cluster, a timeout) or one beyond \
         cluster.max_pending_handshakes.",
        cluster.handshakes_refused(),
    )?;
    out.counter(
        "opmesh_cluster_replies_dropped_total",
        "Replies to operations other nodes forwarded here that were dropped because that \
         node's buffer of unacknowledged replies (cluster.reply_buffer_bytes) was full.",
        cluster.replies_dropped(),
    )?;
    out.gauge(
        "opmesh_cluster_forwarded_waiting",
        "Operations this node forwarded to their owner and waits to hear about.",
        status.forwarded_waiting as u64,
    )?;
    out.gauge(
        "opmesh_cluster_replies_unacknowledged",
        "Replies to operations other nodes forwarded here, sent and not acknowledged yet \
         (sent again until they are).",
        status.replies_unacknowledged as u64,
    )?;
    out.gauge(
        "opmesh_cluster_replies_unacknowledged_bytes",
        "The bytes of those replies (at most cluster.reply_buffer_bytes per node).",
        status.replies_unacknowledged_bytes as u64,
    )?;
    out.counter(
        "opmesh_cluster_messages_refused_total",
        "Messages from other nodes dropped because they name another node than the one \
         their link proved it is (a vote, entries, a Leave or Join, an answer).",
        cluster.messages_refused(),
    )?;

    let links = &status.links;
    out.counters(
        "opmesh_link_bytes_total",
        "Bytes on this node's links to a peer: sent on the link it dials, received on \
         the connections the peer dialed.",
        links.iter().flat_map(|l| {
            [
                (
                    [("peer", l.peer.as_str()), ("direction", "sent")],
                    l.bytes_sent,
                ),
                (
                    [("peer", l.peer.as_str()), ("direction", "received")],
                    l.bytes_received,
                ),
            ]
        }),
    )?;
    out.counters(
        "opmesh_link_frames_total",
        "Frames on this node's links to a peer: sent on the link it dials, received on \
         the connections the peer dialed.",
        links.iter().flat_map(|l| {
            [
                (
                    [("peer", l.peer.as_str()), ("direction", "sent")],
                    l.frames_sent,
                ),
                (
                    [("peer", l.peer.as_str()), ("direction", "received")],
                    l.frames_received,
                ),
            ]
        }),
    )?;
    out.counters(
        "opmesh_link_reconnects_total",
        "Times the link to a peer came up again after it was lost.",
        links
            .iter()
            .map(|l| ([("peer", l.peer.as_str())], l.reconnects)),
    )?;
    out.counters(
        "opmesh_link_dropped_total",
        "Messages for a peer discarded: waiting when its link went down, or too large \
         to send.",
        links
            .iter()
            .map(|l| ([("peer", l.peer.as_str())], l.dropped)),
    )?;
    out.gauges(
        "opmesh_link_queued_bytes",
        "Bytes of operations and replies queued for a peer and not yet written (at most \
         cluster.link_buffer_bytes; over flow.high of it the link is congested).",
        links
            .iter()
            .map(|l| ([("peer", l.peer.as_str())], l.queued_bytes)),
    )?;
    out.counters(
        "opmesh_link_refused_full_total",
        "Batches of operations or replies for a peer refused because its link held \
         cluster.link_buffer_bytes unsent (operations went to another node or failed \
         naming the link; replies are sent again).",
        links
            .iter()
            .map(|l| ([("peer", l.peer.as_str())], l.refused_full)),
    )?;
    out.gauges(
        "opmesh_link_up",
        "1 if the link this node dials to the peer is connected, else 0.",
        links
            .iter()
            .map(|l| ([("peer", l.peer.as_str())], flag(l.connected))),
    )?;
    out.gauges(
        "opmesh_link_lanes_up",
        "Connections (lanes, cluster.lanes) this node dials to the peer that are connected; \
         the link is up when all are.",
        links
            .iter()
            .map(|l| ([("peer", l.peer.as_str())], l.lanes_up as i64)),
    )?;

    let count = |s: &str| status.nodes.iter().filter(|n| n.status == s).count();
    out.gauges(
        "opmesh_cluster_nodes",
        "Nodes in the replicated registry, by status (up, down, leaving).",
        NODE_STATUSES.map(|s| ([("status", s)], count(s))),
    )?;
    out.gauges(
        "opmesh_node_up",
        "1 if the replicated registry marks the node up, 0 if down or leaving; one series \
         per registered node, the same on every node.",
        status
            .nodes
            .iter()
            .map(|n| ([("node", n.id.as_str())], flag(n.status == "up"))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use opmesh_actors::{HandlerError, Json, Operation};

    #[test]
    fn process_figures_are_read_from_status_and_stat() {
        let status = "Name:\topmesh\nVmHWM:\t   40960 kB\nVmRSS:\t   20480 kB\nThreads:\t17\n";
        // A command name with a space and a parenthesis, then fields 3.. with utime 250
        // and stime 50 ticks at 14 and 15.
        let stat = "4242 (op mesh) ) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 17 0";
        let p = Process::parse(status, stat).unwrap();
        assert_eq!(
            p,
            Process {
                resident_bytes: 20480 * 1024,
                cpu_seconds: 3.0,
                threads: 17,
                open_fds: 0,
            }
        );
        assert_eq!(Process::parse("nothing", stat), None);
    }

    #[tokio::test]
    async fn a_scrape_reads_the_engine_counters() {
        let node = Node::builder()
            .handler("echo", |op: Operation| async move { Ok(op.payload) })
            .handler("boom", |_op: Operation| async move {
                Err::<Json, _>(HandlerError::fatal("no"))
            })
            .start()
            .await
            .unwrap();
        for _ in 0..3 {
            assert!(node
                .submit(Operation::new("echo", Json::null()))
                .await
                .unwrap()
                .is_success());
        }
        let failed = node
            .submit(Operation::new("boom", Json::null()))
            .await
            .unwrap();
        assert!(!failed.is_success());
        assert!(node.enqueue(Operation::new("nope", Json::null())).is_err());
        let text = render(&node, None, &Telemetry::disabled(), None, None, None).await;
        let build = format!(
            "opmesh_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        for line in [
            "opmesh_ops_total{type=\"echo\",outcome=\"succeeded\"} 3",
            "opmesh_ops_total{type=\"boom\",outcome=\"failed\"} 1",
            "opmesh_ops_rejected_total 1",
            "opmesh_op_duration_seconds_count{type=\"echo\",stage=\"total\"} 3",
            "opmesh_op_duration_seconds_bucket{le=\"+Inf\",type=\"echo\",stage=\"total\"} 3",
            "opmesh_actor_restarts_total{actor=\"executor\"} 0",
            &build,
            "# TYPE opmesh_op_duration_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in:\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"));
        assert!(!text.contains("opmesh_raft"), "no cluster, no raft metrics");
        node.shutdown(Duration::from_secs(1)).await;
    }

    #[test]
    fn histogram_buckets_are_per_bucket_scaled_and_end_at_inf() {
        let s = BucketSnapshot {
            cumulative: vec![(1_000, 2), (10_000, 2), (100_000, 5)],
            count: 6,
            sum: 250_000,
        };
        let (sum, count, buckets) = histogram(&s, 1e9);
        assert_eq!(count, 6);
        assert_eq!(sum, 250e-6);
        assert_eq!(buckets.len(), 4);
        assert_eq!(
            buckets.iter().map(|b| b.1).collect::<Vec<_>>(),
            vec![2, 0, 3, 1]
        );
        assert_eq!(buckets[0].0, 1e-6);
        assert_eq!(buckets[2].0, 1e-4);
        assert_eq!(buckets[3].0, f64::INFINITY);
    }
}
