//! Telemetry set up once, at the edge: the OTLP trace pipeline the engine's spans go
//! to, the counters that tell how it fares, and the settings the dashboard needs.
//!
//! The engine hands each finished operation's spans to [`Telemetry::tracing`]'s sink as
//! one record; a bounded queue takes it (or counts it dropped when full, so an exporter
//! that is slow or unreachable never slows operations), and an exporter thread turns
//! records into OpenTelemetry spans and exports them in batches with opentelemetry-otlp.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use opmesh_actors::trace::OpSpans;
use opmesh_actors::{Sampler, SpanSink, Tracing};
use serde::Serialize;

/// A sink for when traces are not exported: operations still get trace ids.
struct Discard;

impl SpanSink for Discard {
    fn record(&self, _spans: OpSpans) {}
}

/// Counters of the telemetry pipeline and of trace input, read by `/metrics`.
#[derive(Default)]
pub struct TelemetryCounters {
    /// Spans handed to the exporter and accepted by the receiver.
    pub spans_exported: AtomicU64,
    /// Spans dropped: the export queue was full, or an export failed.
    pub spans_dropped: AtomicU64,
    /// Export calls that failed (receiver unreachable, refused, timed out).
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

struct Inner {
    counters: TelemetryCounters,
    /// Where the dashboard links an operation's trace: `{url}/trace/{trace id}`.
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
            .field("stats", &self.stats())
            .field("jaeger_ui_url", &self.inner.jaeger_ui_url)
            .finish()
    }
}

impl Telemetry {
    /// Telemetry that exports nothing (counters still count).
    pub fn disabled() -> Self {
        Telemetry {
            inner: Arc::new(Inner {
                counters: TelemetryCounters::default(),
                jaeger_ui_url: None,
            }),
        }
    }

    /// The same telemetry, with the dashboard linking traces to `url` (for tests that
    /// run the api in process; the binary takes it from the configuration).
    #[doc(hidden)]
    pub fn with_jaeger_ui_url(self, url: impl Into<String>) -> Self {
        let stats = self.stats();
        let counters = TelemetryCounters::default();
        counters
            .spans_exported
            .store(stats.spans_exported, Ordering::Relaxed);
        counters
            .spans_dropped
            .store(stats.spans_dropped, Ordering::Relaxed);
        counters
            .export_failures
            .store(stats.export_failures, Ordering::Relaxed);
        counters
            .traceparent_invalid
            .store(stats.traceparent_invalid, Ordering::Relaxed);
        Telemetry {
            inner: Arc::new(Inner {
                counters,
                jaeger_ui_url: Some(url.into()),
            }),
        }
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
        Tracing {
            sampler: Sampler::ratio(0.0),
            sink: Arc::new(Discard),
        }
    }

    /// The Jaeger UI base URL operations link to, when configured.
    pub fn jaeger_ui_url(&self) -> Option<&str> {
        self.inner.jaeger_ui_url.as_deref()
    }
}
