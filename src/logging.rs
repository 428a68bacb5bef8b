//! Log lines: `tracing` events written to stderr as JSON (`LOG_FORMAT=json`) or as one
//! readable line each (`LOG_FORMAT=pretty`, the default), at the level `RUST_LOG` or
//! `LOG_LEVEL` sets. A line written while an operation's handler runs carries that
//! operation's `trace_id` and `span_id` (its `op.execute` span); a line inside an
//! exported `tracing` span carries that span's ids. Logs and traces meet on the id.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// One readable line per event.
    Pretty,
}

impl LogFormat {
    /// `LOG_FORMAT`: `json`, or `pretty`/`text` (also when unset or unknown).
    pub fn from_env() -> LogFormat {
        match std::env::var("LOG_FORMAT") {
            Ok(f) if f.trim().eq_ignore_ascii_case("json") => LogFormat::Json,
            _ => LogFormat::Pretty,
        }
    }
}

/// The trace export of `tracing` spans, as [`crate::telemetry::Telemetry::otel_layer`]
/// builds it.
pub type OtelLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

/// The level filter: `RUST_LOG`, else `LOG_LEVEL`, else [`DEFAULT_FILTER`].
fn filter() -> EnvFilter {
    let spec = std::env::var("RUST_LOG")
        .or_else(|_| std::env::var("LOG_LEVEL"))
        .unwrap_or_else(|_| DEFAULT_FILTER.into());
    EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Info, openraft at error (its routine warnings are not the operator's concern unless
/// asked for), and nothing of openraft's replication: it logs an ERROR twice a second
/// for each peer it cannot reach, which the links already say once when the peer goes,
/// every 30 s while it stays away and once when it comes back.
pub const DEFAULT_FILTER: &str = "info,openraft=error,openraft::replication=off";

/// Installs the global subscriber: the log layer, and `otel` (the trace export of
/// `tracing` spans) when given. Call once.
pub fn init(otel: Option<OtelLayer>) {
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .event_format(Lines {
            format: LogFormat::from_env(),
        })
        .with_filter(filter());
    // Only opmesh's own spans at info and above are exported: not the per-message
    // spans of the Raft library, and never anything below info.
    let otel = otel.map(|l| {
        l.with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target("opmesh", tracing::Level::INFO)
                .with_target("openraft", tracing::level_filters::LevelFilter::OFF),
        )
    });
    let _ = tracing_subscriber::registry()
        .with(otel)
        .with(lines)
        .try_init();
}

/// The formatter of both formats.
struct Lines {
    format: LogFormat,
}

/// The trace and span ids a line belongs to: the operation whose handler runs on this
/// thread, else the innermost exported `tracing` span.
fn ids<S, N>(ctx: &FmtContext<'_, S, N>) -> Option<(String, String)>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    if let Some(t) = opmesh_actors::trace::current() {
        return Some((
            format!("{:032x}", t.trace_id),
            format!("{:016x}", t.span_id),
        ));
    }
    let span = ctx.lookup_current()?;
    let cx = tracing::dispatcher::get_default(|d| {
        tracing_opentelemetry::get_otel_context(&span.id(), d)
    })?;
    use opentelemetry::trace::TraceContextExt;
    let sc = cx.span().span_context().clone();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

impl<S, N> FormatEvent<S, N> for Lines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let ids = ids(ctx);
        match self.format {
            LogFormat::Pretty => {
                SystemTime.format_time(&mut w)?;
                write!(w, " {:>5} {}: ", meta.level(), meta.target())?;
                if let Some(scope) = ctx.event_scope() {
                    for span in scope.from_root() {
                        write!(w, "{}: ", span.name())?;
                    }
                }
                ctx.format_fields(w.by_ref(), event)?;
                if let Some((trace_id, span_id)) = ids {
                    write!(w, " trace_id={trace_id} span_id={span_id}")?;
                }
                writeln!(w)
            }
            LogFormat::Json => {
                let mut obj = Map::new();
                let mut ts = String::new();
                SystemTime.format_time(&mut Writer::new(&mut ts))?;
                obj.insert("timestamp".into(), Value::String(ts));
                obj.insert("level".into(), Value::String(meta.level().to_string()));
                obj.insert("target".into(), Value::String(meta.target().to_string()));
                let mut fields = JsonFields(Map::new());
                event.record(&mut fields);
                if let Some(m) = fields.0.remove("message") {
                    obj.insert("message".into(), m);
                }
                if !fields.0.is_empty() {
                    obj.insert("fields".into(), Value::Object(fields.0));
                }
                if let Some(scope) = ctx.event_scope() {
                    let spans: Vec<Value> = scope
                        .from_root()
                        .map(|s| Value::String(s.name().to_string()))
                        .collect();
                    if !spans.is_empty() {
                        obj.insert("spans".into(), Value::Array(spans));
                    }
                }
                if let Some((trace_id, span_id)) = ids {
                    obj.insert("trace_id".into(), Value::String(trace_id));
                    obj.insert("span_id".into(), Value::String(span_id));
                }
                writeln!(w, "{}", Value::Object(obj))
            }
        }
    }
}

/// Collects an event's fields as JSON values.
struct JsonFields(Map<String, Value>);

impl Visit for JsonFields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(value.into()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opmesh_actors::trace::in_context;
    use opmesh_actors::TraceContext;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(format: LogFormat, f: impl FnOnce()) -> Vec<String> {
        let buf = Buf::default();
        let out = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .event_format(Lines { format })
            .finish();
        tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    const CTX: TraceContext = TraceContext {
        trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
        span_id: 0x00f067aa0ba902b7,
        flags: 1,
    };

    #[test]
    fn json_lines_inside_an_operation_carry_its_ids() {
        let out = lines(LogFormat::Json, || {
            in_context(Some(CTX), || tracing::info!(attempt = 2, "inside"));
            tracing::warn!("outside");
        });
        assert_eq!(out.len(), 2, "{out:?}");
        let inside: Value = serde_json::from_str(&out[0]).unwrap();
        assert_eq!(inside["message"], "inside");
        assert_eq!(inside["level"], "INFO");
        assert_eq!(inside["fields"]["attempt"], 2);
        assert_eq!(inside["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(inside["span_id"], "00f067aa0ba902b7");
        let outside: Value = serde_json::from_str(&out[1]).unwrap();
        assert_eq!(outside["message"], "outside");
        assert!(outside.get("trace_id").is_none(), "{outside}");
    }

    #[test]
    fn pretty_lines_end_with_the_ids() {
        let out = lines(LogFormat::Pretty, || {
            in_context(Some(CTX), || tracing::info!("inside"));
        });
        assert_eq!(out.len(), 1);
        assert!(out[0].contains(" INFO "), "{}", out[0]);
        assert!(
            out[0].ends_with(
                "inside trace_id=4bf92f3577b34da6a3ce929d0e0e4736 span_id=00f067aa0ba902b7"
            ),
            "{}",
            out[0]
        );
    }
}
