//! Live events over HTTP: `GET /v1/events` streams the engine's [`EventBus`] as
//! server-sent events, `GET /v1/failures` answers the node's most recent failed or
//! expired operations.
//!
//! [`Live`] is what the api server runs beside its workers: one task that publishes
//! `metrics:collected` about every second while somebody watches that kind (and builds
//! nothing otherwise), and one that keeps the last [`MAX_FAILURES`] `operation:failure`
//! events in a ring (its subscription makes only failures build events). Both stop, and
//! every open event stream ends cleanly, when [`Live::shutdown`] is called as the server
//! stops.
//!
//! A stream never slows operations down: each client has its own bounded buffer
//! (`?buffer=N`); when it overflows, the client misses events and is told how many in an
//! `events:dropped` frame.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header::{self, ContentEncoding};
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use bytes::{Bytes, BytesMut};
use futures::Stream;
use opmesh_actors::events::{Event, EventBus, EventKind, Kinds, Received, Subscription};
use opmesh_actors::Node;
use opmesh_cluster::Cluster;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::api::auth::Caller;
use crate::api::ApiError;

/// How often `metrics:collected` is published while somebody watches it.
pub const METRICS_EVERY: Duration = Duration::from_secs(1);
/// How long an idle stream waits before it sends a `: keep-alive` comment (proxies and
/// load balancers close connections that stay silent longer than about a minute).
pub const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);
/// A client's buffer when it asks for none: unread events it may fall behind by.
pub const DEFAULT_BUFFER: usize = 1024;
/// The largest `?buffer=` a client may ask for.
pub const MAX_BUFFER: usize = 65_536;
/// Event streams open at once unless `events.max_subscribers` says otherwise.
pub const DEFAULT_MAX_SUBSCRIBERS: usize = 256;
/// How many recent failures the node keeps for `GET /v1/failures`.
pub const MAX_FAILURES: usize = 100;
/// Failure events the recorder may fall behind by before it misses some.
const FAILURE_BUFFER: usize = 4096;
/// The most bytes of frames written to a client in one chunk.
const MAX_CHUNK: usize = 64 * 1024;
/// The client reconnects this long after the stream ends (the SSE `retry:` field).
const RETRY_MS: u64 = 2000;

// ---------------------------------------------------------------------------------------
// The server's live side

/// The background side of the live endpoints. Cheap to clone.
#[derive(Clone)]
pub struct Live {
    node: Node,
    failures: Arc<FailureLog>,
    stop: CancellationToken,
    /// Event streams open now, and how many may be (`events.max_subscribers`).
    streams: Arc<std::sync::atomic::AtomicUsize>,
    max_streams: usize,
}

/// A stream's place among the open ones, given back when the stream ends.
struct StreamSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Live {
    /// Starts the metrics publisher and the failure recorder for `node`. Must be called
    /// inside a tokio runtime.
    pub fn start(node: Node, cluster: Option<Cluster>) -> Live {
        Self::with_max_streams(node, cluster, DEFAULT_MAX_SUBSCRIBERS)
    }

    /// [`start`](Self::start), allowing at most `max_streams` open event streams.
    pub fn with_max_streams(node: Node, cluster: Option<Cluster>, max_streams: usize) -> Live {
        let stop = CancellationToken::new();
        let failures = Arc::new(FailureLog::default());
        tokio::spawn(publish_metrics(node.clone(), cluster, stop.clone()));
        let sub = node
            .events()
            .subscribe(Kinds::of([EventKind::OperationFailure]), FAILURE_BUFFER);
        tokio::spawn(record_failures(sub, failures.clone(), stop.clone()));
        Live {
            node,
            failures,
            stop,
            streams: Arc::default(),
            max_streams,
        }
    }

    /// A place for one more event stream, or `None` when `max_streams` are open.
    fn open_stream(&self) -> Option<StreamSlot> {
        use std::sync::atomic::Ordering;
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_streams).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamSlot(self.streams.clone()))
    }

    /// Stops the background tasks and ends every open event stream (each client gets the
    /// end of its response, not a reset connection).
    pub fn shutdown(&self) {
        self.stop.cancel();
    }
}

/// The snapshot `metrics:collected` carries: the node's figures as `GET /v1/metrics`
/// answers them, and the cluster as `GET /v1/cluster` does, when the node runs in one.
fn collect_metrics(node: &Node, cluster: Option<&Cluster>) -> serde_json::Value {
    let mut v = serde_json::to_value(node.stats()).unwrap_or_default();
    if let (Some(c), serde_json::Value::Object(m)) = (cluster, &mut v) {
        m.insert(
            "cluster".into(),
            serde_json::to_value(c.status()).unwrap_or_default(),
        );
    }
    v
}

async fn publish_metrics(node: Node, cluster: Option<Cluster>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(METRICS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        node.events().publish(EventKind::MetricsCollected, || {
            Event::MetricsCollected(collect_metrics(&node, cluster.as_ref()))
        });
    }
}

// ---------------------------------------------------------------------------------------
// Recent failures

/// A failed or expired operation, as `GET /v1/failures` lists it.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Failure {
    pub id: String,
    #[serde(rename = "type")]
    pub op_type: String,
    /// failed | expired
    pub status: &'static str,
    pub error: Option<String>,
    /// The node that saw it finish (the one answering).
    pub node: String,
    /// The node whose handler ran it, if one did.
    pub executed_by: Option<String>,
    pub trace_id: Option<String>,
    /// When it finished, in milliseconds since the Unix epoch.
    pub timestamp: u64,
    /// Accepted → finished, in microseconds.
    pub duration_us: u64,
    /// How many times the handler ran.
    pub attempts: u32,
    /// Who submitted it: with tokens on, only they and admins see it.
    #[serde(skip)]
    owner: Option<Arc<str>>,
}

impl Failure {
    fn of(e: &Event) -> Option<Failure> {
        match e {
            Event::OperationFinished {
                id,
                node,
                op_type,
                status,
                error,
                attempts,
                executed_by,
                duration_us,
                trace_id,
                timestamp,
                owner,
                ..
            } => Some(Failure {
                id: id.to_string(),
                op_type: op_type.to_string(),
                status: status.as_str(),
                error: error.clone(),
                node: node.to_string(),
                executed_by: executed_by.as_ref().map(|n| n.to_string()),
                trace_id: trace_id.clone(),
                timestamp: *timestamp,
                duration_us: *duration_us,
                attempts: *attempts,
                owner: owner.clone(),
            }),
            _ => None,
        }
    }
}

/// The last [`MAX_FAILURES`] failures, oldest first.
#[derive(Default)]
struct FailureLog {
    ring: Mutex<VecDeque<Failure>>,
    /// Failures the recorder missed because it fell behind a storm of them.
    missed: std::sync::atomic::AtomicU64,
}

impl FailureLog {
    fn push(&self, f: Failure) {
        let mut ring = self.ring.lock();
        if ring.len() == MAX_FAILURES {
            ring.pop_front();
        }
        ring.push_back(f);
    }

    /// The newest `limit` failures `caller` may see.
    fn recent(&self, limit: usize, caller: &Caller) -> Vec<Failure> {
        self.ring
            .lock()
            .iter()
            .rev()
            .filter(|f| caller.may_see(f.owner.as_deref()))
            .take(limit)
            .cloned()
            .collect()
    }

    fn missed(&self) -> u64 {
        self.missed.load(std::sync::atomic::Ordering::Relaxed)
    }
}

async fn record_failures(sub: Subscription, log: Arc<FailureLog>, stop: CancellationToken) {
    loop {
        let r = tokio::select! {
            _ = stop.cancelled() => return,
            r = sub.next() => r,
        };
        match r {
            Received::Event(e) => {
                if let Some(f) = Failure::of(&e) {
                    log.push(f);
                }
            }
            Received::Dropped(n) => {
                log.missed
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct FailuresQuery {
    limit: Option<String>,
}

/// The answer of `GET /v1/failures`.
#[derive(Serialize, ToSchema)]
pub struct FailuresAnswer {
    /// Newest first.
    pub failures: Vec<Failure>,
    /// Failures not kept because the recorder fell behind (a storm of them).
    pub missed: u64,
}

/// The node's most recent failed or expired operations, newest first (at most 100 are
/// kept). With tokens on, a caller sees the ones it submitted (an admin sees all).
#[utoipa::path(get, path = "/v1/failures",
    params(("limit" = Option<usize>, Query, description = "at most this many (1..=100, default 100)")),
    responses((status = 200, body = FailuresAnswer), (status = 400, body = crate::api::ErrorBody)))]
pub(crate) async fn failures(
    live: web::Data<Live>,
    req: actix_web::HttpRequest,
    q: web::Query<FailuresQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = match &q.limit {
        None => MAX_FAILURES,
        Some(s) => parse_in_range("limit", s, 1, MAX_FAILURES)?,
    };
    Ok(HttpResponse::Ok().json(FailuresAnswer {
        failures: live.failures.recent(limit, &Caller::of(&req)),
        missed: live.failures.missed(),
    }))
}

// ---------------------------------------------------------------------------------------
// The event stream

#[derive(Deserialize)]
pub(crate) struct EventsQuery {
    types: Option<String>,
    buffer: Option<String>,
}

fn invalid(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", message)
}

fn parse_in_range(field: &str, s: &str, min: usize, max: usize) -> Result<usize, ApiError> {
    s.parse::<usize>()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| {
            invalid(format!(
                "query `{field}` is `{s}`; allowed: an integer from {min} to {max}"
            ))
        })
}

/// Parses `types=a,b`: every name must be an event kind.
fn parse_kinds(s: &str) -> Result<Kinds, ApiError> {
    let allowed = || {
        EventKind::ALL
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut kinds = Vec::new();
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let k = EventKind::from_name(name).ok_or_else(|| {
            invalid(format!(
                "query `types` names `{name}`, which is no event type; allowed: {}",
                allowed()
            ))
        })?;
        kinds.push(k);
    }
    if kinds.is_empty() {
        return Err(invalid(format!(
            "query `types` names no event type; allowed: {}",
            allowed()
        )));
    }
    Ok(Kinds::of(kinds))
}

/// Live events as server-sent events.
///
/// Each event is one frame, `event: <type>`, `id: <n>` (counting the events sent to this
/// client) and `data: <JSON>`. A client that fell behind by more than its buffer gets an
/// `events:dropped` frame, `data: {"dropped": n}`: the events it missed since the
/// previous such frame. An idle stream sends a `: keep-alive` comment every 15 s, and
/// ends when the server shuts down.
#[utoipa::path(get, path = "/v1/events",
    params(
        ("types" = Option<String>, Query, description = "comma-separated event types to receive (default all): batch:scheduled, operation:started, operation:success, operation:failure, metrics:collected, breaker:opened, breaker:closed"),
        ("buffer" = Option<usize>, Query, description = "events this client may fall behind by before it misses some (1..=65536, default 1024)")),
    responses(
        (status = 200, description = "a stream of events", content_type = "text/event-stream", body = String),
        (status = 400, body = crate::api::ErrorBody),
        (status = 503, description = "events.max_subscribers streams are open (`too_many_subscribers`)", body = crate::api::ErrorBody)))]
pub(crate) async fn events(
    live: web::Data<Live>,
    req: actix_web::HttpRequest,
    q: web::Query<EventsQuery>,
) -> Result<HttpResponse, ApiError> {
    let kinds = match &q.types {
        None => Kinds::ALL,
        Some(s) => parse_kinds(s)?,
    };
    let buffer = match &q.buffer {
        None => DEFAULT_BUFFER,
        Some(s) => parse_in_range("buffer", s, 1, MAX_BUFFER)?,
    };
    let slot = live.open_stream().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_subscribers",
            format!(
                "{} event streams are open, the most this node serves \
                 (events.max_subscribers); try again later",
                live.max_streams
            ),
        )
    })?;
    let mut stream = EventStream::new(live.node.events(), kinds, buffer, live.stop.clone());
    stream.caller = Caller::of(&req);
    stream.slot = Some(slot);
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        // The stream is never compressed (a compressor would hold frames back) nor
        // buffered by a proxy that honours this header (nginx).
        .insert_header(ContentEncoding::Identity)
        .insert_header(("x-accel-buffering", "no"))
        .streaming(stream.into_stream()))
}

/// One client's stream: its subscription and where it is.
struct EventStream {
    sub: Subscription,
    stop: CancellationToken,
    keep_alive: tokio::time::Interval,
    /// The id of the last event sent to this client.
    seq: u64,
    opened: bool,
    /// Whose stream it is: events of operations it may not see are left out.
    caller: Caller,
    /// Its place among the open streams, given back when it ends.
    slot: Option<StreamSlot>,
}

impl EventStream {
    fn new(bus: &Arc<EventBus>, kinds: Kinds, buffer: usize, stop: CancellationToken) -> Self {
        let mut keep_alive = tokio::time::interval_at(
            tokio::time::Instant::now() + KEEP_ALIVE_EVERY,
            KEEP_ALIVE_EVERY,
        );
        keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        EventStream {
            sub: bus.subscribe(kinds, buffer),
            stop,
            keep_alive,
            seq: 0,
            opened: false,
            caller: Caller {
                name: None,
                scope: crate::auth::Scope::Admin,
            },
            slot: None,
        }
    }

    fn into_stream(self) -> impl Stream<Item = Result<Bytes, Infallible>> + 'static {
        futures::stream::unfold(self, |mut s| async move {
            let chunk = s.next_chunk().await?;
            Some((Ok(chunk), s))
        })
    }

    /// The next bytes to send: as many waiting frames as fit in one chunk, a keep-alive
    /// comment, or `None` when the server stops.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if !self.opened {
            // Sent at once, so the client knows the stream is open before any event.
            self.opened = true;
            return Some(Bytes::from(format!(
                "retry: {RETRY_MS}\n: opmesh events\n\n"
            )));
        }
        if self.stop.is_cancelled() {
            return None;
        }
        let first = tokio::select! {
            biased;
            _ = self.stop.cancelled() => return None,
            r = self.sub.next() => r,
            _ = self.keep_alive.tick() => return Some(Bytes::from_static(b": keep-alive\n\n")),
        };
        let mut buf = BytesMut::with_capacity(1024);
        self.write(first, &mut buf);
        while buf.len() < MAX_CHUNK {
            match self.sub.try_next() {
                Some(r) => self.write(r, &mut buf),
                None => break,
            }
        }
        self.keep_alive.reset();
        Some(buf.freeze())
    }

    fn write(&mut self, r: Received, buf: &mut BytesMut) {
        match r {
            Received::Event(e) if !self.caller.may_see(e.owner()) => {}
            Received::Event(e) => {
                self.seq += 1;
                write_frame(buf, e.kind().name(), Some(self.seq), &*e);
            }
            Received::Dropped(n) => {
                write_frame(
                    buf,
                    "events:dropped",
                    None,
                    &serde_json::json!({ "dropped": n }),
                );
            }
        }
    }
}

/// Appends one SSE frame. The data is compact JSON: one line (newlines inside strings are
/// escaped), so it needs a single `data:` field.
fn write_frame(buf: &mut BytesMut, event: &str, id: Option<u64>, data: &impl Serialize) {
    let _ = writeln!(buf, "event: {event}");
    if let Some(id) = id {
        let _ = writeln!(buf, "id: {id}");
    }
    buf.extend_from_slice(b"data: ");
    if serde_json::to_writer(BufWriter(buf), data).is_err() {
        buf.extend_from_slice(b"null");
    }
    buf.extend_from_slice(b"\n\n");
}

/// `io::Write` into a `BytesMut`.
struct BufWriter<'a>(&'a mut BytesMut);

impl std::io::Write for BufWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_an_unknown_one_is_named() {
        let k = parse_kinds("operation:failure, metrics:collected").unwrap();
        assert!(k.contains(EventKind::OperationFailure));
        assert!(k.contains(EventKind::MetricsCollected));
        assert!(!k.contains(EventKind::BatchScheduled));
        let e = parse_kinds("operation:failure,op:done")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`op:done`"), "{e}");
        assert!(e.contains("batch:scheduled"), "{e}");
        assert!(parse_kinds(" , ").is_err());
    }

    #[test]
    fn buffer_must_be_in_range() {
        assert_eq!(parse_in_range("buffer", "1", 1, MAX_BUFFER).unwrap(), 1);
        for bad in ["0", "65537", "-1", "x", ""] {
            let e = parse_in_range("buffer", bad, 1, MAX_BUFFER)
                .unwrap_err()
                .to_string();
            assert!(e.contains("`buffer`") && e.contains("65536"), "{e}");
        }
    }

    #[test]
    fn a_frame_is_one_event_with_one_data_line() {
        let mut buf = BytesMut::new();
        write_frame(
            &mut buf,
            "operation:failure",
            Some(7),
            &serde_json::json!({"error": "line one\nline two"}),
        );
        assert_eq!(
            &buf[..],
            b"event: operation:failure\nid: 7\ndata: {\"error\":\"line one\\nline two\"}\n\n"
        );
    }

    #[test]
    fn the_failure_log_keeps_the_newest() {
        let log = FailureLog::default();
        for i in 0..(MAX_FAILURES + 5) {
            log.push(Failure {
                id: i.to_string(),
                op_type: "t".into(),
                status: "failed",
                error: None,
                node: "n".into(),
                executed_by: None,
                trace_id: None,
                timestamp: i as u64,
                duration_us: 0,
                attempts: 1,
                owner: Some(if i % 2 == 0 { "even" } else { "odd" }.into()),
            });
        }
        let caller = |name: &str, scope| Caller {
            name: Some(name.into()),
            scope,
        };
        let admin = caller("root", crate::auth::Scope::Admin);
        let r = log.recent(3, &admin);
        let ids: Vec<&str> = r.iter().map(|f| f.id.as_str()).collect();
        assert_eq!(ids, ["104", "103", "102"]);
        assert_eq!(log.recent(1000, &admin).len(), MAX_FAILURES);
        // A token sees its own failures only.
        let r = log.recent(3, &caller("odd", crate::auth::Scope::Submit));
        let ids: Vec<&str> = r.iter().map(|f| f.id.as_str()).collect();
        assert_eq!(ids, ["103", "101", "99"]);
    }

    #[tokio::test]
    async fn a_slow_client_is_told_what_it_missed_and_the_stream_ends_on_stop() {
        let bus = Arc::new(EventBus::default());
        let stop = CancellationToken::new();
        let mut s = EventStream::new(&bus, Kinds::ALL, 2, stop.clone());
        let hello = s.next_chunk().await.unwrap();
        assert!(hello.starts_with(b"retry: "));
        for size in 0..5 {
            bus.publish(EventKind::BatchScheduled, || Event::BatchScheduled {
                node: "n".into(),
                op_type: "t".into(),
                size,
                timestamp: 0,
            });
        }
        let chunk = String::from_utf8(s.next_chunk().await.unwrap().to_vec()).unwrap();
        assert!(
            chunk.starts_with("event: events:dropped\ndata: {\"dropped\":3}\n\n"),
            "{chunk}"
        );
        assert!(
            chunk.contains(
                "event: batch:scheduled\nid: 1\ndata: {\"node\":\"n\",\"type\":\"t\",\"size\":0,"
            ),
            "{chunk}"
        );
        assert!(chunk.contains("id: 2\n"), "{chunk}");
        assert!(!chunk.contains("id: 3\n"), "{chunk}");
        stop.cancel();
        assert!(s.next_chunk().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_sends_keep_alive_comments() {
        let bus = Arc::new(EventBus::default());
        let mut s = EventStream::new(&bus, Kinds::ALL, 8, CancellationToken::new());
        s.next_chunk().await.unwrap();
        let t0 = tokio::time::Instant::now();
        let chunk = s.next_chunk().await.unwrap();
        assert_eq!(&chunk[..], b": keep-alive\n\n");
        assert_eq!(t0.elapsed(), KEEP_ALIVE_EVERY);
    }
}
