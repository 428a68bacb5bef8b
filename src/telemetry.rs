//! Telemetry set up once, at the edge: the OTLP trace pipeline the engine's spans go
//! to, the counters that tell how it fares, and the settings the dashboard needs.
//!
//! The engine does not build OpenTelemetry spans while an operation runs: it lends each
//! finished operation's spans to [`Telemetry::tracing`]'s sink as one plain record, and
//! the sink encodes them at once, on the thread that finished the operation, into that
//! thread's OTLP request ([`crate::otlp`]: protobuf straight from the record, no
//! allocation per operation or span). Threads take encoders ("stripes") in turn as they
//! first record, so the threads that finish operations encode in parallel and share
//! nothing but a stripe's uncontended lock. A request that reaches `telemetry.batch_spans`
//! spans is handed to the stripe's exporter thread, and each exporter also sweeps its
//! stripes' partial requests every `telemetry.export_interval_ms`, so no span waits
//! longer than that. At most `telemetry.queue_ops` operations' spans wait in handed-over
//! requests (queued or being sent); beyond, a request is dropped and its spans counted,
//! so a slow or unreachable receiver never slows operations. Every span handed to the
//! pipeline is counted ([`TelemetryStats::spans_recorded`]), so that each one is
//! accounted for as exported, dropped, or still pending (in a stripe, queued, or in a
//! request not yet answered): a span is never counted in none of them. Exporter threads
//! (`telemetry.exporters`: by default one per 4 cores, at least 2) send the requests
//! over gRPC or http/protobuf, a few in flight each, each on its own connection.
//! `tracing` spans (route writes, cluster changes) reach the first exporter's queue
//! through tracing-opentelemetry and an SDK tracer whose span processor is that queue,
//! and are exported with opentelemetry-otlp.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::KeyValue;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor};
use opentelemetry_sdk::Resource;
use opmesh_actors::counter::Counter;
use opmesh_actors::trace::OpSpans;

use crate::otlp::{Chunk, SpanEncoder};
use opmesh_actors::{Sampler, SpanSink, Tracing};
use serde::Serialize;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// How spans travel to the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP over gRPC (port 4317 by convention).
    Grpc,
    /// OTLP over HTTP with protobuf bodies (port 4318, path `/v1/traces`).
    HttpProtobuf,
}

impl Protocol {
    pub fn parse(s: &str) -> Option<Protocol> {
        match s {
            "grpc" => Some(Protocol::Grpc),
            "http/protobuf" | "http" => Some(Protocol::HttpProtobuf),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// Where and how traces are exported. Validated by the config layer.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceSettings {
    /// The receiver: `http://host:4317` for gRPC; for http/protobuf the base URL
    /// (`/v1/traces` is appended unless the URL already ends with it).
    pub endpoint: String,
    pub protocol: Protocol,
    pub service_name: String,
    /// Share of new traces sampled (parent-based: a caller's decision wins). Failed
    /// operations are exported whatever the ratio.
    pub sampling_ratio: f64,
    /// Operations whose spans may wait for export in encoded requests (queued or being
    /// sent); beyond, a request is dropped and its spans counted.
    pub queue_ops: usize,
    /// Exporter threads, each with its own queue and connection; 0: one per 4 cores, at
    /// least 2 and at most 8.
    pub exporters: usize,
    /// Most spans in one export request.
    pub batch_spans: usize,
    /// Longest a span waits before its batch is sent.
    pub export_interval: Duration,
    /// An export that takes longer fails (its spans are counted dropped).
    pub export_timeout: Duration,
}

/// Telemetry settings of the binary.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TelemetrySettings {
    /// `None`: traces are not exported (operations still get trace ids).
    pub traces: Option<TraceSettings>,
    /// Where the dashboard links an operation's trace: `{url}/trace/{trace id}`.
    pub jaeger_ui_url: Option<String>,
}

/// Counters of the telemetry pipeline and of trace input, read by `/metrics`.
#[derive(Debug, Default)]
pub struct TelemetryCounters {
    /// Spans handed to the pipeline (queued, or dropped because the queue was full).
    /// Counted on the path of every traced operation, so striped by thread.
    spans_recorded: Counter,
    /// Spans the receiver accepted.
    pub spans_exported: AtomicU64,
    /// Spans dropped: the export queue was full, or their export failed.
    pub spans_dropped: AtomicU64,
    /// Export requests that failed (receiver unreachable, refused, timed out).
    pub export_failures: AtomicU64,
    /// `traceparent` headers that were malformed (ignored: a new trace started).
    pub traceparent_invalid: AtomicU64,
}

impl TelemetryCounters {
    /// Spans handed to the pipeline so far.
    pub fn spans_recorded(&self) -> u64 {
        self.spans_recorded.get()
    }

    fn record(&self, spans: u64) {
        self.spans_recorded.add(spans);
    }
}

/// This thread's number, taken in turn by the threads that record spans as they first
/// do: which encoder stripe (and so which exporter) they use. A sequence of its own (not
/// the engine's counter stripes), so that the few threads that finish operations take
/// consecutive numbers, hence different stripes and exporters.
fn thread_number() -> usize {
    use std::cell::Cell;
    use std::sync::atomic::AtomicUsize;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static NUMBER: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    NUMBER.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        s.get()
    })
}

/// How many exporter threads `requested` means: itself, or with 0 one per 4 cores, at
/// least 2 and at most 8. Two even on two cores: a receiver decodes each connection's
/// requests on its own, and two exporters kept every span at 30-40 % of the untraced rate
/// there, against 20 % with one (BENCHMARKS.md, "Tracing").
pub fn exporter_count(requested: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 4).clamp(2, 8)
}

/// A point-in-time copy of [`TelemetryCounters`].
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct TelemetryStats {
    pub spans_exported: u64,
    pub spans_dropped: u64,
    pub export_failures: u64,
    pub traceparent_invalid: u64,
    /// Spans handed to the pipeline: each is exported, dropped or pending.
    pub spans_recorded: u64,
    /// Spans recorded but neither exported nor dropped yet: queued, being encoded, or in
    /// an export request not yet answered. Read after [`Telemetry::shutdown`]: the spans
    /// it could not flush in time.
    pub spans_pending: u64,
    /// Exporter threads running (0: traces are not exported).
    pub exporters: usize,
}

/// What an exporter thread receives.
enum Item {
    /// A full request of operation spans, encoded by the thread that finished them.
    Chunk(Chunk),
    /// A `tracing` span (first exporter only).
    Span(Box<SpanData>),
    /// Sweep the stripes, export everything received so far, then answer.
    Flush(SyncSender<()>),
}

struct Pipeline {
    /// One queue per exporter thread.
    queues: Arc<[UnboundedSender<Item>]>,
    encoders: Arc<Encoders>,
    sampler: Sampler,
    provider: SdkTracerProvider,
}

/// The engine's span encoders, one per stripe, and the bound on what waits for export.
struct Encoders {
    stripes: Box<[Stripe]>,
    /// Spans in a full request.
    batch_spans: usize,
    /// Most operations whose spans may wait in handed-over requests.
    queue_ops: u64,
    /// Operations (and `tracing` spans) in requests handed over and not yet answered.
    waiting: AtomicU64,
}

impl std::fmt::Debug for Encoders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoders")
            .field("stripes", &self.stripes.len())
            .field("waiting", &self.waiting)
            .finish()
    }
}

/// One encoder, on a cache line of its own.
#[repr(align(128))]
struct Stripe(parking_lot::Mutex<SpanEncoder>);

impl Encoders {
    fn new(template: &SpanEncoder, batch_spans: usize, queue_ops: usize) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Encoders {
            stripes: (0..(4 * cores).clamp(8, 256))
                .map(|_| Stripe(parking_lot::Mutex::new(template.clone())))
                .collect(),
            batch_spans,
            queue_ops: queue_ops as u64,
            waiting: AtomicU64::new(0),
        }
    }

    /// Takes room for `ops` more waiting operations: refused when the queue would pass
    /// `queue_ops`, unless nothing waits (so a request larger than the bound still goes).
    fn admit(&self, ops: u64) -> bool {
        let before = self.waiting.fetch_add(ops, Ordering::Relaxed);
        if before > 0 && before + ops > self.queue_ops {
            self.waiting.fetch_sub(ops, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Gives back the room of `ops` operations whose request was answered.
    fn release(&self, ops: u64) {
        self.waiting.fetch_sub(ops, Ordering::Relaxed);
    }

    /// Stripe `i`'s request so far, if it holds any span.
    fn take(&self, i: usize) -> Option<Chunk> {
        let mut encoder = self.stripes[i].0.lock();
        (!encoder.is_empty()).then(|| encoder.finish())
    }
}

struct Inner {
    counters: Arc<TelemetryCounters>,
    pipeline: Option<Pipeline>,
    jaeger_ui_url: Option<String>,
}

/// The node's telemetry handle. Cheap to clone.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("exporting", &self.inner.pipeline.is_some())
            .field("stats", &self.stats())
            .field("jaeger_ui_url", &self.inner.jaeger_ui_url)
            .finish()
    }
}

/// Why telemetry did not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP exporter for {endpoint}: {reason}")]
    Exporter { endpoint: String, reason: String },
    #[error("cannot start the trace exporter thread: {0}")]
    Thread(std::io::Error),
}

impl Telemetry {
    /// Telemetry that exports nothing (counters still count).
    pub fn disabled() -> Self {
        Telemetry {
            inner: Arc::new(Inner {
                counters: Arc::default(),
                pipeline: None,
                jaeger_ui_url: None,
            }),
        }
    }

    /// Starts the trace pipeline of `settings` (if any) for the node `node_id`.
    pub fn start(settings: &TelemetrySettings, node_id: &str) -> Result<Self, TelemetryError> {
        let counters = Arc::new(TelemetryCounters::default());
        let pipeline = match &settings.traces {
            None => None,
            Some(t) => Some(start_pipeline(t, node_id, counters.clone())?),
        };
        Ok(Telemetry {
            inner: Arc::new(Inner {
                counters,
                pipeline,
                jaeger_ui_url: settings.jaeger_ui_url.clone(),
            }),
        })
    }

    pub fn counters(&self) -> &TelemetryCounters {
        &self.inner.counters
    }

    pub fn stats(&self) -> TelemetryStats {
        let c = &self.inner.counters;
        let spans_exported = c.spans_exported.load(Ordering::Acquire);
        let spans_dropped = c.spans_dropped.load(Ordering::Acquire);
        // Read last: a span is recorded before it can be exported or dropped, so the
        // difference is never short of what is pending.
        let spans_recorded = c.spans_recorded();
        TelemetryStats {
            spans_exported,
            spans_dropped,
            export_failures: c.export_failures.load(Ordering::Relaxed),
            traceparent_invalid: c.traceparent_invalid.load(Ordering::Relaxed),
            spans_recorded,
            spans_pending: spans_recorded.saturating_sub(spans_exported + spans_dropped),
            exporters: self.inner.pipeline.as_ref().map_or(0, |p| p.queues.len()),
        }
    }

    /// Counts a malformed `traceparent` header.
    pub fn note_invalid_traceparent(&self) {
        self.inner
            .counters
            .traceparent_invalid
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The engine's tracing settings: every operation gets a trace id; sampled ones
    /// (and failed ones) leave their spans with this pipeline.
    pub fn tracing(&self) -> Tracing {
        match &self.inner.pipeline {
            Some(p) => Tracing {
                sampler: p.sampler,
                sink: Arc::new(QueueSink {
                    encoders: p.encoders.clone(),
                    queues: p.queues.clone(),
                    counters: self.inner.counters.clone(),
                }),
            },
            None => Tracing {
                sampler: Sampler::ratio(0.0),
                sink: Arc::new(Discard),
            },
        }
    }

    /// A `tracing` layer that exports `tracing` spans through this pipeline, for
    /// spans outside the operation path (route writes, cluster changes).
    pub fn otel_layer(&self) -> Option<crate::logging::OtelLayer> {
        let p = self.inner.pipeline.as_ref()?;
        Some(Box::new(
            tracing_opentelemetry::layer().with_tracer(p.provider.tracer("opmesh")),
        ))
    }

    /// The Jaeger UI base URL operations link to, when configured.
    pub fn jaeger_ui_url(&self) -> Option<&str> {
        self.inner.jaeger_ui_url.as_deref()
    }

    /// Exports what is queued, waiting at most `timeout`. Returns whether every
    /// exporter finished.
    pub fn flush(&self, timeout: Duration) -> bool {
        let Some(p) = &self.inner.pipeline else {
            return true;
        };
        let (done_tx, done_rx) = mpsc::sync_channel(p.queues.len());
        let deadline = Instant::now() + timeout;
        for queue in p.queues.iter() {
            if queue.send(Item::Flush(done_tx.clone())).is_err() {
                return false;
            }
        }
        p.queues.iter().all(|_| {
            done_rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .is_ok()
        })
    }

    /// Flushes (within `timeout`) and stops the exporter. Returns the counters then: their
    /// `spans_pending` are the spans the flush could not export in time (logged too).
    pub fn shutdown(&self, timeout: Duration) -> TelemetryStats {
        let Some(p) = &self.inner.pipeline else {
            return self.stats();
        };
        let flushed = self.flush(timeout);
        let _ = p.provider.shutdown_with_timeout(Duration::from_millis(100));
        let stats = self.stats();
        if !flushed || stats.spans_pending > 0 {
            tracing::warn!(
                ?timeout,
                pending = stats.spans_pending,
                "trace export did not finish before shutdown: spans still pending were not exported"
            );
        }
        stats
    }
}

/// A sink for when traces are not exported: operations still get trace ids.
struct Discard;

impl SpanSink for Discard {
    fn record(&self, _spans: &OpSpans<'_>) {}
}

/// The engine's sink: encodes each finished operation's spans into the calling thread's
/// stripe, and hands a full request to that stripe's exporter.
struct QueueSink {
    encoders: Arc<Encoders>,
    queues: Arc<[UnboundedSender<Item>]>,
    counters: Arc<TelemetryCounters>,
}

impl SpanSink for QueueSink {
    fn record(&self, spans: &OpSpans<'_>) {
        self.counters.record(spans.spans.len() as u64);
        let e = &self.encoders;
        let i = thread_number() % e.stripes.len();
        let full = {
            let mut encoder = e.stripes[i].0.lock();
            encoder.push(spans);
            (encoder.len() >= e.batch_spans).then(|| encoder.finish())
        };
        let Some(chunk) = full else {
            return;
        };
        let (spans, ops) = (chunk.spans, chunk.ops);
        if e.admit(ops) {
            if self.queues[i % self.queues.len()]
                .send(Item::Chunk(chunk))
                .is_ok()
            {
                return;
            }
            e.release(ops);
        }
        self.counters
            .spans_dropped
            .fetch_add(spans, Ordering::Release);
    }
}

/// The SDK side: `tracing` spans (through tracing-opentelemetry) join the same queue.
#[derive(Debug)]
struct QueueProcessor {
    tx: UnboundedSender<Item>,
    encoders: Arc<Encoders>,
    counters: Arc<TelemetryCounters>,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        self.counters.record(1);
        if self.encoders.admit(1) {
            if self.tx.send(Item::Span(Box::new(span))).is_ok() {
                return;
            }
            self.encoders.release(1);
        }
        self.counters.spans_dropped.fetch_add(1, Ordering::Release);
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

impl std::fmt::Debug for QueueSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueueSink")
    }
}

/// The resource every span carries: `service.name`, `service.instance.id` (the node
/// id), the version, and the Kubernetes pod and namespace when the pod's env says.
/// `OTEL_RESOURCE_ATTRIBUTES` adds more.
fn resource(service_name: &str, node_id: &str) -> Resource {
    let mut attrs = vec![
        KeyValue::new("service.instance.id", node_id.to_string()),
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
    ];
    let env = |names: &[&str]| names.iter().find_map(|n| std::env::var(n).ok());
    if let Some(pod) = env(&["POD_NAME", "K8S_POD_NAME"]) {
        attrs.push(KeyValue::new("k8s.pod.name", pod));
    }
    if let Some(ns) = env(&["POD_NAMESPACE", "K8S_NAMESPACE", "K8S_NAMESPACE_NAME"]) {
        attrs.push(KeyValue::new("k8s.namespace.name", ns));
    }
    Resource::builder()
        .with_service_name(service_name.to_string())
        .with_attributes(attrs)
        .build()
}

fn start_pipeline(
    t: &TraceSettings,
    node_id: &str,
    counters: Arc<TelemetryCounters>,
) -> Result<Pipeline, TelemetryError> {
    let n = exporter_count(t.exporters);
    let resource = resource(&t.service_name, node_id);
    let template = SpanEncoder::new(&resource, "opmesh", env!("CARGO_PKG_VERSION"));
    let encoders = Arc::new(Encoders::new(&template, t.batch_spans, t.queue_ops));
    let queues: Arc<[_]> = (0..n)
        .map(|i| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Item>();
            let exporter = ExporterPlace {
                index: i,
                of: n,
                encoders: encoders.clone(),
                counters: counters.clone(),
            };
            start_exporter(exporter, t, &resource, rx)?;
            Ok(tx)
        })
        .collect::<Result<_, TelemetryError>>()?;
    let ratio = t.sampling_ratio;
    // The first exporter also takes the SDK's `tracing` spans.
    let provider = SdkTracerProvider::builder()
        .with_span_processor(QueueProcessor {
            tx: queues[0].clone(),
            encoders: encoders.clone(),
            counters,
        })
        .with_sampler(opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
            opentelemetry_sdk::trace::Sampler::TraceIdRatioBased(ratio),
        )))
        .with_resource(resource)
        .build();
    Ok(Pipeline {
        queues,
        encoders,
        sampler: Sampler::ratio(ratio),
        provider,
    })
}

/// Which exporter a thread is, and what it shares with the sink.
struct ExporterPlace {
    /// This exporter's number, of `of`: it sweeps stripes `index`, `index + of`, …
    index: usize,
    of: usize,
    encoders: Arc<Encoders>,
    counters: Arc<TelemetryCounters>,
}

/// Starts exporter thread `i` on `rx`; answers once its exporter is built (tonic needs
/// the runtime it runs on) or why it could not be. Detached: when the last sender is
/// dropped it exports what is left and ends; `Telemetry::shutdown` flushes before the
/// process exits.
fn start_exporter(
    place: ExporterPlace,
    t: &TraceSettings,
    resource: &Resource,
    rx: UnboundedReceiver<Item>,
) -> Result<(), TelemetryError> {
    let i = place.index;
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let settings = t.clone();
    let resource = resource.clone();
    std::thread::Builder::new()
        .name(format!("opmesh-otlp-{i}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("cannot start its runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                match Exporter::new(settings, &resource, place) {
                    Ok(exporter) => {
                        let _ = ready_tx.send(Ok(()));
                        exporter.run(rx).await;
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        })
        .map_err(TelemetryError::Thread)?;
    let reason = match ready_rx.recv() {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(reason)) => reason,
        Err(_) => "the exporter thread stopped".into(),
    };
    Err(TelemetryError::Exporter {
        endpoint: t.endpoint.clone(),
        reason,
    })
}

/// The `/v1/traces` URL of an http/protobuf endpoint.
fn http_traces_url(endpoint: &str) -> String {
    if endpoint.ends_with("/v1/traces") {
        endpoint.to_string()
    } else {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    }
}

/// opentelemetry-otlp's exporter, for `tracing` spans. Must be built inside the tokio
/// runtime it will export on.
fn sdk_exporter(t: &TraceSettings) -> Result<opentelemetry_otlp::SpanExporter, String> {
    use opentelemetry_otlp::WithExportConfig;
    match t.protocol {
        Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(t.endpoint.clone())
            .with_timeout(t.export_timeout)
            .build(),
        Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(http_traces_url(&t.endpoint))
            .with_timeout(t.export_timeout)
            .build(),
    }
    .map_err(|e| e.to_string())
}

/// Export requests an exporter has outstanding at once.
const IN_FLIGHT: usize = 4;

/// An exporter thread's state: the requests the engine's threads encoded are sent as
/// they arrive, with up to [`IN_FLIGHT`] outstanding; every export interval (and on a
/// flush) the exporter sweeps its stripes' partial requests. `tracing` spans (first
/// exporter only) go through opentelemetry-otlp's exporter.
struct Exporter {
    t: TraceSettings,
    place: ExporterPlace,
    sender: crate::otlp::Sender,
    /// The first exporter's: where `tracing` spans go.
    sdk: Option<opentelemetry_otlp::SpanExporter>,
    sdk_batch: Vec<SpanData>,
    in_flight: tokio::task::JoinSet<Result<(), String>>,
    /// Spans and operations of each export request in flight, so that a request whose
    /// task failed is still counted (dropped) and its room in the queue given back.
    in_flight_spans: std::collections::HashMap<tokio::task::Id, (u64, u64)>,
    last_warning: Option<Instant>,
}

impl Exporter {
    fn new(
        t: TraceSettings,
        resource: &Resource,
        place: ExporterPlace,
    ) -> Result<Exporter, String> {
        let headers = crate::otlp::env_headers();
        let sender = match t.protocol {
            Protocol::Grpc => crate::otlp::Sender::grpc(&t.endpoint, t.export_timeout, headers)?,
            Protocol::HttpProtobuf => {
                crate::otlp::Sender::http(http_traces_url(&t.endpoint), t.export_timeout, headers)?
            }
        };
        let sdk = if place.index == 0 {
            let mut sdk = sdk_exporter(&t)?;
            sdk.set_resource(resource);
            Some(sdk)
        } else {
            None
        };
        Ok(Exporter {
            sender,
            sdk,
            sdk_batch: Vec::new(),
            in_flight: tokio::task::JoinSet::new(),
            in_flight_spans: std::collections::HashMap::new(),
            last_warning: None,
            t,
            place,
        })
    }

    async fn run(mut self, mut rx: UnboundedReceiver<Item>) {
        let mut sweep = tokio::time::interval(self.t.export_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                item = rx.recv() => match item {
                    None => {
                        self.send_all().await;
                        self.settle_all().await;
                        if let Some(sdk) = &mut self.sdk {
                            let _ = sdk.shutdown();
                        }
                        return;
                    }
                    Some(Item::Chunk(chunk)) => self.send_chunk(chunk).await,
                    Some(Item::Span(s)) => {
                        self.sdk_batch.push(*s);
                        if self.sdk_batch.len() >= self.t.batch_spans {
                            self.send_sdk().await;
                        }
                    }
                    Some(Item::Flush(done)) => {
                        self.send_all().await;
                        self.settle_all().await;
                        let _ = done.try_send(());
                    }
                },
                _ = sweep.tick() => self.send_all().await,
                Some(done) = self.in_flight.join_next_with_id(), if !self.in_flight.is_empty() => {
                    self.settle(done);
                }
            }
        }
    }

    /// Sends this exporter's stripes' partial requests and the `tracing` spans waiting.
    async fn send_all(&mut self) {
        let (index, of) = (self.place.index, self.place.of);
        for i in (index..self.place.encoders.stripes.len()).step_by(of) {
            let Some(chunk) = self.place.encoders.take(i) else {
                continue;
            };
            if self.place.encoders.admit(chunk.ops) {
                self.send_chunk(chunk).await;
            } else {
                self.place
                    .counters
                    .spans_dropped
                    .fetch_add(chunk.spans, Ordering::Release);
            }
        }
        self.send_sdk().await;
    }

    /// Sends one request (its room in the queue already taken), once fewer than
    /// [`IN_FLIGHT`] requests are outstanding.
    async fn send_chunk(&mut self, chunk: Chunk) {
        while self.in_flight.len() >= IN_FLIGHT {
            if let Some(done) = self.in_flight.join_next_with_id().await {
                self.settle(done);
            }
        }
        let sender = self.sender.clone();
        let timeout = self.t.export_timeout;
        let body = chunk.body;
        let task = self.in_flight.spawn(async move {
            match tokio::time::timeout(timeout, sender.send(body)).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {timeout:?}")),
            }
        });
        self.in_flight_spans
            .insert(task.id(), (chunk.spans, chunk.ops));
    }

    async fn send_sdk(&mut self) {
        if self.sdk_batch.is_empty() {
            return;
        }
        let spans = std::mem::take(&mut self.sdk_batch);
        let n = spans.len() as u64;
        // Their room in the queue, taken when they were queued.
        self.place.encoders.release(n);
        let Some(sdk) = &mut self.sdk else {
            // Only the first exporter's queue takes them.
            self.account(n, Err("this exporter takes no `tracing` spans".into()));
            return;
        };
        let result = match tokio::time::timeout(self.t.export_timeout, sdk.export(spans)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.t.export_timeout)),
        };
        self.account(n, result);
    }

    async fn settle_all(&mut self) {
        while let Some(done) = self.in_flight.join_next_with_id().await {
            self.settle(done);
        }
    }

    fn settle(
        &mut self,
        done: Result<(tokio::task::Id, Result<(), String>), tokio::task::JoinError>,
    ) {
        let (id, result) = match done {
            Ok((id, result)) => (id, result),
            Err(e) => (e.id(), Err(format!("the export task failed: {e}"))),
        };
        let (n, ops) = self.in_flight_spans.remove(&id).unwrap_or((0, 0));
        self.place.encoders.release(ops);
        self.account(n, result);
    }

    fn account(&mut self, n: u64, result: Result<(), String>) {
        match result {
            Ok(()) => {
                self.place
                    .counters
                    .spans_exported
                    .fetch_add(n, Ordering::Release);
            }
            Err(e) => {
                self.place
                    .counters
                    .export_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.place
                    .counters
                    .spans_dropped
                    .fetch_add(n, Ordering::Release);
                // One warning a minute: an unreachable receiver must not flood the log.
                if self
                    .last_warning
                    .is_none_or(|w| w.elapsed() >= Duration::from_secs(60))
                {
                    self.last_warning = Some(Instant::now());
                    tracing::warn!(endpoint = %self.t.endpoint, "cannot export traces ({n} spans dropped): {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opmesh_actors::OpStatus;

    #[test]
    fn every_recorded_span_is_exported_dropped_or_pending() {
        // Nothing listens on port 1: every export fails. A queue of 4 operations fills
        // at once, so spans are dropped both at the door and after a failed export.
        let settings = TelemetrySettings {
            traces: Some(TraceSettings {
                endpoint: "http://127.0.0.1:1".into(),
                protocol: Protocol::Grpc,
                service_name: "opmesh-test".into(),
                sampling_ratio: 1.0,
                queue_ops: 4,
                exporters: 1,
                batch_spans: 8,
                export_interval: Duration::from_millis(10),
                export_timeout: Duration::from_secs(2),
            }),
            jaeger_ui_url: None,
        };
        let t = Telemetry::start(&settings, "node-a").unwrap();
        let sink = t.tracing().sink;
        let spans = crate::otlp::tests::four_spans();
        for _ in 0..100 {
            sink.record(&crate::otlp::tests::record(
                OpStatus::Succeeded,
                &spans,
                &[],
            ));
        }
        assert_eq!(t.stats().spans_recorded, 400);
        let s = t.shutdown(Duration::from_secs(10));
        // Flushed: nothing is left pending, and nothing reached a receiver.
        assert_eq!(
            (
                s.spans_recorded,
                s.spans_exported,
                s.spans_dropped,
                s.spans_pending
            ),
            (400, 0, 400, 0),
            "{s:?}"
        );
    }
}
