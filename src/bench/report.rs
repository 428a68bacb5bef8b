//! What a run reports: the [`BenchReport`] built from the measured phase, printed by
//! `--json` as one line whose [`REPORT_KEYS`] are a contract other tools read, or as an
//! aligned table for a reader.

use serde::Serialize;

use super::{PhaseResult, Plan};

/// The keys every `--json` report has, each a number: a contract other tools read.
pub const REPORT_KEYS: [&str; 9] = [
    "ops",
    "errors",
    "seconds",
    "ops_per_sec",
    "p50_us",
    "p95_us",
    "p99_us",
    "p999_us",
    "max_us",
];

/// What a run measured. `--json` prints it; the first nine fields are the contract.
#[derive(Serialize, Debug, Clone)]
pub struct BenchReport {
    /// Operations finished in the measured phase, errors included.
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// `in-process` or `http`.
    pub mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(rename = "type")]
    pub op_type: String,
    pub payload_bytes: usize,
    pub concurrency: usize,
    /// Requests made (HTTP batches count once).
    pub requests: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<u32>,
    /// The requested arrival rate of an open-loop run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Open loop: operations that were due while `concurrency` were in flight, so started
    /// late (their wait is not in the latency).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delayed_ops: Option<u64>,
    pub warmup_ops: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_idle_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_peak_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_delta_bytes: Option<u64>,
    /// The same load against `POST /v1/bench/hello` (`--baseline`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Box<BenchReport>>,
    /// `--otlp-endpoint`: the sampling ratio, and the trace pipeline's counters after
    /// the run (flushed), warmup included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_export: Option<crate::telemetry::TelemetryStats>,
}

/// The report as the one line `--json` prints.
pub fn render_json(report: &BenchReport) -> anyhow::Result<String> {
    Ok(serde_json::to_string(report)?)
}

/// The report of one measured phase run under `plan`; the caller fills in what only it
/// knows (memory, the baseline, the trace counters).
pub(super) fn report(
    plan: &Plan,
    mode: &'static str,
    target: Option<String>,
    r: &PhaseResult,
) -> BenchReport {
    let h = &r.hist;
    let (p50, p95, p99, p999, max) = if h.is_empty() {
        (0, 0, 0, 0, 0)
    } else {
        (
            h.value_at_quantile(0.50),
            h.value_at_quantile(0.95),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max(),
        )
    };
    BenchReport {
        ops: r.ops,
        errors: r.errors,
        seconds: r.seconds,
        ops_per_sec: if r.seconds > 0.0 {
            r.ops as f64 / r.seconds
        } else {
            0.0
        },
        p50_us: p50,
        p95_us: p95,
        p99_us: p99,
        p999_us: p999,
        max_us: max,
        mode,
        target,
        op_type: plan.op_type.clone(),
        payload_bytes: plan.payload.len(),
        concurrency: plan.concurrency,
        requests: r.requests,
        batch: plan.batch,
        rate: plan.rate,
        delayed_ops: plan
            .rate
            .map(|_| (r.delayed_requests * u64::from(plan.per_request())).min(r.ops)),
        warmup_ops: plan.warmup,
        first_error: r.first_error.clone(),
        rss_idle_bytes: None,
        rss_peak_bytes: None,
        rss_delta_bytes: None,
        baseline: None,
        sampling: None,
        trace_export: None,
    }
}

/// The human report: a header line, then one aligned column per measured load.
pub fn render_text(report: &BenchReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let load = match report.rate {
        Some(r) => format!("open loop at {} ops/s", group(r.round() as u64)),
        None => "closed loop".to_owned(),
    };
    let target = report
        .target
        .as_deref()
        .map_or(String::new(), |t| format!(" {t}"));
    let batch = report
        .batch
        .map_or(String::new(), |b| format!(" · batch {b}"));
    let _ = writeln!(
        out,
        "opmesh bench · {}{target} · type {} · payload {} B · concurrency {}{batch} · {load}",
        report.mode, report.op_type, report.payload_bytes, report.concurrency
    );
    let mut columns: Vec<(&str, &BenchReport)> = Vec::new();
    if let Some(b) = &report.baseline {
        columns.push(("hello", b));
    }
    columns.push(("engine", report));
    type Cell = fn(&BenchReport) -> String;
    let rows: [(&str, Cell); 9] = [
        ("ops", |r| group(r.ops)),
        ("errors", |r| group(r.errors)),
        ("seconds", |r| format!("{:.3}", r.seconds)),
        ("ops/s", |r| group(r.ops_per_sec.round() as u64)),
        ("p50 µs", |r| group(r.p50_us)),
        ("p95 µs", |r| group(r.p95_us)),
        ("p99 µs", |r| group(r.p99_us)),
        ("p99.9 µs", |r| group(r.p999_us)),
        ("max µs", |r| group(r.max_us)),
    ];
    let _ = write!(out, "  {:<10}", "");
    for (name, _) in &columns {
        let _ = write!(out, "{name:>14}");
    }
    out.push('\n');
    for (label, value) in rows {
        let _ = write!(out, "  {label:<10}");
        for (_, r) in &columns {
            let _ = write!(out, "{:>14}", value(r));
        }
        out.push('\n');
    }
    if let (Some(r), Some(t)) = (report.sampling, &report.trace_export) {
        let _ = writeln!(
            out,
            "  traces: sampling {r} · spans exported {} · dropped {} · failed exports {}",
            group(t.spans_exported),
            group(t.spans_dropped),
            group(t.export_failures)
        );
    }
    if let Some(d) = report.delayed_ops {
        let _ = writeln!(
            out,
            "  delayed   {:>14}  (due while --concurrency were in flight)",
            group(d)
        );
    }
    if let (Some(idle), Some(peak)) = (report.rss_idle_bytes, report.rss_peak_bytes) {
        let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
        let _ = writeln!(
            out,
            "  memory    idle {:.1} MB · peak {:.1} MB · +{:.1} MB over idle",
            mb(idle),
            mb(peak),
            mb(peak.saturating_sub(idle))
        );
    }
    if let Some(e) = &report.first_error {
        let _ = writeln!(out, "  first error: {e}");
    }
    out
}

/// `1234567` as `1,234,567`.
pub(super) fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::run_report;
    use crate::bench::tests::{assert_report_shape, parse};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_json_report_has_the_contract_keys_as_numbers() {
        let args = parse(&[
            "--in-process",
            "--ops",
            "500",
            "--concurrency",
            "8",
            "--json",
        ]);
        let r = run_report(&args).await.unwrap();
        let line = render_json(&r).unwrap();
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_report_shape(&v);
        assert_eq!(v["ops"], 500);
        // The text report names every figure.
        let text = render_text(&r);
        for label in ["ops/s", "p50 µs", "p99.9 µs", "max µs", "memory"] {
            assert!(text.contains(label), "{label} missing in\n{text}");
        }
    }
}
