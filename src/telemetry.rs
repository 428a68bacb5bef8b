//! Telemetry set up once, at the edge: the OTLP trace pipeline the engine's spans go
//! to, the counters that tell how it fares, and the settings the dashboard needs.
//!
//! The engine does not build OpenTelemetry spans while an operation runs: it hands each
//! finished operation's spans to [`Telemetry::tracing`]'s sink as one plain record. A
//! bounded queue takes the record, or counts its spans dropped when full, so a slow or
//! unreachable receiver never slows operations. An exporter thread turns records into
//! OpenTelemetry `SpanData` and exports them in batches with opentelemetry-otlp (gRPC or
//! http/protobuf). `tracing` spans (route writes, cluster changes) reach the same queue
//! through tracing-opentelemetry and an SDK tracer whose span processor is this queue.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    SdkTracerProvider, SpanData, SpanEvents, SpanExporter as _, SpanLinks, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use opmesh_actors::trace::{OpSpans, SpanRecord, Stage};
use opmesh_actors::{OpStatus, Sampler, SpanSink, Tracing};
use serde::Serialize;

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
    /// Operations whose spans may wait for export; beyond, spans are dropped (counted).
    pub queue_ops: usize,
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
    /// Spans the receiver accepted.
    pub spans_exported: AtomicU64,
    /// Spans dropped: the export queue was full, or their export failed.
    pub spans_dropped: AtomicU64,
    /// Export requests that failed (receiver unreachable, refused, timed out).
    pub export_failures: AtomicU64,
    /// `traceparent` headers that were malformed (ignored: a new trace started).
    pub traceparent_invalid: AtomicU64,
}

/// A point-in-time copy of [`TelemetryCounters`].
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct TelemetryStats {
    pub spans_exported: u64,
    pub spans_dropped: u64,
    pub export_failures: u64,
    pub traceparent_invalid: u64,
}

/// What the exporter thread receives.
enum Item {
    Op(OpSpans),
    Span(Box<SpanData>),
    /// Export everything received so far, then answer.
    Flush(SyncSender<()>),
}

struct Pipeline {
    tx: SyncSender<Item>,
    sampler: Sampler,
    provider: SdkTracerProvider,
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
        TelemetryStats {
            spans_exported: c.spans_exported.load(Ordering::Relaxed),
            spans_dropped: c.spans_dropped.load(Ordering::Relaxed),
            export_failures: c.export_failures.load(Ordering::Relaxed),
            traceparent_invalid: c.traceparent_invalid.load(Ordering::Relaxed),
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
                    tx: p.tx.clone(),
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

    /// Exports what is queued, waiting at most `timeout`. Returns whether it finished.
    pub fn flush(&self, timeout: Duration) -> bool {
        let Some(p) = &self.inner.pipeline else {
            return true;
        };
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let deadline = Instant::now() + timeout;
        // The queue may be full: keep offering the flush until the deadline.
        let mut item = Item::Flush(done_tx);
        loop {
            match p.tx.try_send(item) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    item = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
        done_rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }

    /// Flushes (within `timeout`) and stops the exporter.
    pub fn shutdown(&self, timeout: Duration) {
        let Some(p) = &self.inner.pipeline else {
            return;
        };
        if !self.flush(timeout) {
            tracing::warn!(?timeout, "trace export did not finish before shutdown");
        }
        let _ = p.provider.shutdown_with_timeout(Duration::from_millis(100));
    }
}

/// A sink for when traces are not exported: operations still get trace ids.
struct Discard;

impl SpanSink for Discard {
    fn record(&self, _spans: OpSpans) {}
}

/// The engine's sink: one non-blocking queue push per finished operation.
struct QueueSink {
    tx: SyncSender<Item>,
    counters: Arc<TelemetryCounters>,
}

impl SpanSink for QueueSink {
    fn record(&self, spans: OpSpans) {
        let n = spans.spans.len() as u64;
        if self.tx.try_send(Item::Op(spans)).is_err() {
            self.counters.spans_dropped.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// The SDK side: `tracing` spans (through tracing-opentelemetry) join the same queue.
#[derive(Debug)]
struct QueueProcessor {
    tx: SyncSender<Item>,
    counters: Arc<TelemetryCounters>,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(Item::Span(Box::new(span))).is_err() {
            self.counters.spans_dropped.fetch_add(1, Ordering::Relaxed);
        }
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
    let (tx, rx) = mpsc::sync_channel::<Item>(t.queue_ops.max(1));
    let resource = resource(&t.service_name, node_id);
    let settings = t.clone();
    let thread_counters = counters.clone();
    // The exporter is built on its thread (tonic needs the runtime it runs on); the
    // thread reports whether that worked before anything is queued.
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let thread_resource = resource.clone();
    // Detached: when the last sender is dropped it exports what is left and ends;
    // `Telemetry::shutdown` flushes before the process exits.
    std::thread::Builder::new()
        .name("opmesh-otlp".into())
        .spawn(move || {
            export_loop(settings, thread_resource, rx, thread_counters, ready_tx);
        })
        .map_err(TelemetryError::Thread)?;
    match ready_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => {
            return Err(TelemetryError::Exporter {
                endpoint: t.endpoint.clone(),
                reason,
            })
        }
        Err(_) => {
            return Err(TelemetryError::Exporter {
                endpoint: t.endpoint.clone(),
                reason: "the exporter thread stopped".into(),
            })
        }
    }
    let ratio = t.sampling_ratio;
    let provider = SdkTracerProvider::builder()
        .with_span_processor(QueueProcessor {
            tx: tx.clone(),
            counters,
        })
        .with_sampler(opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
            opentelemetry_sdk::trace::Sampler::TraceIdRatioBased(ratio),
        )))
        .with_resource(resource)
        .build();
    Ok(Pipeline {
        tx,
        sampler: Sampler::ratio(ratio),
        provider,
    })
}

/// The OTLP exporter of `t`'s protocol. Must run inside the tokio runtime it will
/// export on.
fn build_exporter(t: &TraceSettings) -> Result<opentelemetry_otlp::SpanExporter, String> {
    use opentelemetry_otlp::WithExportConfig;
    match t.protocol {
        Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(t.endpoint.clone())
            .with_timeout(t.export_timeout)
            .build(),
        Protocol::HttpProtobuf => {
            let endpoint = if t.endpoint.ends_with("/v1/traces") {
                t.endpoint.clone()
            } else {
                format!("{}/v1/traces", t.endpoint.trim_end_matches('/'))
            };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(endpoint)
                .with_timeout(t.export_timeout)
                .build()
        }
    }
    .map_err(|e| e.to_string())
}

fn export_loop(
    t: TraceSettings,
    resource: Resource,
    rx: mpsc::Receiver<Item>,
    counters: Arc<TelemetryCounters>,
    ready: SyncSender<Result<(), String>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot start its runtime: {e}")));
            return;
        }
    };
    let exporter = rt.block_on(async { build_exporter(&t) });
    let mut exporter = match exporter {
        Ok(e) => e,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    exporter.set_resource(&resource);
    let _ = ready.send(Ok(()));
    let scope = InstrumentationScope::builder("opmesh")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let mut batch: Vec<SpanData> = Vec::with_capacity(t.batch_spans);
    let mut last_warning: Option<Instant> = None;
    let mut export = |batch: &mut Vec<SpanData>| {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let spans = std::mem::replace(batch, Vec::with_capacity(t.batch_spans));
        let result = rt.block_on(async {
            tokio::time::timeout(t.export_timeout, exporter.export(spans)).await
        });
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {:?}", t.export_timeout)),
        };
        match error {
            None => {
                counters.spans_exported.fetch_add(n, Ordering::Relaxed);
            }
            Some(e) => {
                counters.export_failures.fetch_add(1, Ordering::Relaxed);
                counters.spans_dropped.fetch_add(n, Ordering::Relaxed);
                // One warning a minute: an unreachable receiver must not flood the log.
                if last_warning.is_none_or(|w| w.elapsed() >= Duration::from_secs(60)) {
                    last_warning = Some(Instant::now());
                    tracing::warn!(endpoint = %t.endpoint, "cannot export traces ({n} spans dropped): {e}");
                }
            }
        }
    };
    loop {
        let until = Instant::now() + t.export_interval;
        let mut disconnected = false;
        while batch.len() < t.batch_spans {
            match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                Ok(Item::Op(rec)) => push_op_spans(&mut batch, &rec, &scope),
                Ok(Item::Span(s)) => batch.push(*s),
                Ok(Item::Flush(done)) => {
                    // Everything queued before the flush is in `batch` or the queue.
                    while let Ok(item) = rx.try_recv() {
                        match item {
                            Item::Op(rec) => push_op_spans(&mut batch, &rec, &scope),
                            Item::Span(s) => batch.push(*s),
                            Item::Flush(other) => {
                                let _ = other.try_send(());
                            }
                        }
                        if batch.len() >= t.batch_spans {
                            export(&mut batch);
                        }
                    }
                    export(&mut batch);
                    let _ = done.try_send(());
                }
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            }
        }
        export(&mut batch);
        if disconnected {
            let _ = exporter.shutdown();
            return;
        }
    }
}

/// Turns one operation's record into OpenTelemetry spans.
fn push_op_spans(out: &mut Vec<SpanData>, rec: &OpSpans, scope: &InstrumentationScope) {
    let op_id = rec.op_id.to_string();
    let failed = rec.status != OpStatus::Succeeded;
    let last = rec.spans.len().saturating_sub(1);
    for (i, s) in rec.spans.iter().enumerate() {
        let mut attributes = vec![
            KeyValue::new("op.id", op_id.clone()),
            KeyValue::new("op.type", rec.op_type.to_string()),
            KeyValue::new("opmesh.node.id", rec.node.to_string()),
        ];
        let mut kind = SpanKind::Internal;
        match s.stage {
            Stage::Submit => {
                kind = SpanKind::Server;
                attributes.push(KeyValue::new("op.outcome", rec.status.as_str()));
                attributes.push(KeyValue::new("op.attempts", i64::from(rec.attempts)));
            }
            Stage::Route => {
                let target = rec.target.as_ref().unwrap_or(&rec.node);
                attributes.push(KeyValue::new("opmesh.node.target", target.to_string()));
                if rec.target.is_some() {
                    kind = SpanKind::Client;
                }
            }
            Stage::Cache => {
                if let Some(v) = rec.cache {
                    attributes.push(KeyValue::new("op.cache.result", v.as_str()));
                }
            }
            Stage::Queue => {}
            Stage::Execute => {
                attributes.push(KeyValue::new("op.outcome", rec.status.as_str()));
                attributes.push(KeyValue::new("op.attempts", i64::from(rec.attempts)));
            }
        }
        let status = if failed && (s.stage == Stage::Submit || i == last) {
            Status::Error {
                description: Cow::Owned(
                    rec.error
                        .clone()
                        .unwrap_or_else(|| rec.status.as_str().to_string()),
                ),
            }
        } else {
            Status::Unset
        };
        let events = if s.stage == Stage::Execute && !rec.events.is_empty() {
            rec.events
                .iter()
                .map(|e| {
                    opentelemetry::trace::Event::new(
                        e.name,
                        e.at.to_system(),
                        vec![
                            KeyValue::new("op.attempt", i64::from(e.attempt)),
                            KeyValue::new("error.message", e.message.clone()),
                        ],
                        0,
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        out.push(span_data(rec, s, kind, attributes, status, events, scope));
    }
}

fn span_data(
    rec: &OpSpans,
    s: &SpanRecord,
    kind: SpanKind,
    attributes: Vec<KeyValue>,
    status: Status,
    events: Vec<opentelemetry::trace::Event>,
    scope: &InstrumentationScope,
) -> SpanData {
    let mut span_events = SpanEvents::default();
    span_events.events = events;
    // Exported spans are marked sampled: a failed operation kept despite sampling is
    // still a span the receiver should show.
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(rec.trace_id),
            SpanId::from(s.span_id),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::from(s.parent_span_id),
        parent_span_is_remote: s.parent_is_remote,
        span_kind: kind,
        name: Cow::Borrowed(s.stage.span_name()),
        start_time: s.start.to_system(),
        end_time: s.end.to_system(),
        attributes,
        dropped_attributes_count: 0,
        events: span_events,
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope.clone(),
    }
}
