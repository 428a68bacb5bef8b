//! What a run reports: the [`BenchReport`] built from the measured phase, printed by
//! `--json` as one line whose [`REPORT_KEYS`] are a contract other tools read, or as an
//! aligned table for a reader.

use serde::Serialize;

use super::driver::ErrorSample;
use super::rss::PeakSource;
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
///
/// `ops`, `ops_per_sec` and the percentiles count succeeded operations only; failed ones
/// are in `errors`, with the first few distinct reasons in `error_samples`. In an open
/// loop (`--rate`) the percentiles are measured from each operation's intended start (its
/// slot in the arrival schedule), and the `service_*` figures from when it was sent.
#[derive(Serialize, Debug, Clone)]
pub struct BenchReport {
    /// Operations of the measured phase that succeeded.
    pub ops: u64,
    /// Operations of the measured phase that failed (refused, failed, expired, a non-2xx
    /// answer, a transport error, or run on the wrong node under `--remote`).
    pub errors: u64,
    pub seconds: f64,
    /// Succeeded operations per second.
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// What the percentiles are measured from: `intended_start` (open loop: the
    /// operation's slot in the arrival schedule) or `sent` (closed loop).
    pub latency_from: &'static str,
    /// Open loop: the percentiles of the time from send to answer (service time), which
    /// leave out any wait before the send; the gap to the corrected ones above is the
    /// generator's lag and the in-flight cap's queue.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_p50_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_p95_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_p99_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_p999_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_max_us: Option<u64>,
    /// Open loop: how late operations were sent after their intended start (the
    /// generator's own delay, or a wait for a free slot under `--concurrency`). Roughly,
    /// corrected latency = send lag + service time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_lag_p50_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_lag_p99_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_lag_p999_us: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_lag_max_us: Option<u64>,
    /// `errors` over all operations of the measured phase (succeeded and failed).
    pub error_ratio: f64,
    /// `--max-error-ratio`: a run with a higher `error_ratio` exits non-zero.
    pub max_error_ratio: f64,
    /// The first few distinct reasons operations failed for, with how many failed for
    /// each (failures for later reasons are counted in `errors` only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub error_samples: Vec<ErrorSample>,
    /// `in-process`, `in-process-remote` or `http`.
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
    /// `--no-wait`: operations counted when accepted (202), not when finished.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub accepted_only: bool,
    /// The requested arrival rate of an open-loop run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Open loop: operations that were due while `concurrency` were in flight, so were
    /// sent late (their wait is in the corrected latency, not in the service time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delayed_ops: Option<u64>,
    pub warmup_ops: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// `--remote`: the node every operation must have run on (its `executed_by`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executed_by: Option<&'static str>,
    /// `--remote`: operations that succeeded on another node (counted in `errors`; any
    /// fails the run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executed_elsewhere: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_idle_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_peak_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_delta_bytes: Option<u64>,
    /// Where `rss_peak_bytes` comes from: `vmhwm_reset` (the kernel's high-water mark,
    /// reset when idle was read) or `vmhwm_lifetime` (it could not be reset: the peak
    /// since the process started).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_peak_source: Option<PeakSource>,
    /// The same load against `POST /v1/bench/hello` (`--baseline`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<Box<BenchReport>>,
    /// `--otlp-endpoint`: the sampling ratio, and the trace pipeline's counters after
    /// the run (flushed), warmup included; summed over both nodes under `--remote`.
    /// `--shard-threads`: the embedded node's shards ran on threads of their own, and the
    /// drivers on them.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub shard_threads: bool,
    /// `--client-threads`: the HTTP load came from that many threads of its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_threads: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_export: Option<crate::telemetry::TelemetryStats>,
}

impl BenchReport {
    /// Whether the run may pass: under `--remote`, every operation ran on the other
    /// node; and at most `max_error_ratio` of the operations failed (the baseline's
    /// too). The error names the share and the first reasons.
    pub fn check(&self) -> anyhow::Result<()> {
        if let (Some(n), Some(node)) = (self.executed_elsewhere, self.executed_by) {
            if n > 0 {
                anyhow::bail!(
                    "--remote: {} of {} operations ran on another node than {node}, where the type is pinned; the run did not measure the link",
                    group(n),
                    group(self.ops + self.errors)
                );
            }
        }
        if let Some(b) = &self.baseline {
            b.check().map_err(|e| e.context("the --baseline run"))?;
        }
        if self.error_ratio > self.max_error_ratio {
            let reasons = self
                .error_samples
                .iter()
                .map(|s| format!("{} × {}", group(s.count), s.reason))
                .collect::<Vec<_>>()
                .join("; ");
            anyhow::bail!(
                "{} of {} operations failed ({:.4} of them), more than --max-error-ratio {} allows; first reasons: {reasons}",
                group(self.errors),
                group(self.ops + self.errors),
                self.error_ratio,
                self.max_error_ratio
            );
        }
        Ok(())
    }
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
    let [p50, p95, p99, p999, max] = percentiles(&r.hist);
    let service = r.service.as_ref().map(percentiles);
    let service_at = |i: usize| service.map(|s| s[i]);
    let lag = r.lag.as_ref().map(percentiles);
    let lag_at = |i: usize| lag.map(|s| s[i]);
    let all = r.ops + r.errors;
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
        latency_from: if plan.rate.is_some() {
            "intended_start"
        } else {
            "sent"
        },
        service_p50_us: service_at(0),
        service_p95_us: service_at(1),
        service_p99_us: service_at(2),
        service_p999_us: service_at(3),
        service_max_us: service_at(4),
        send_lag_p50_us: lag_at(0),
        send_lag_p99_us: lag_at(2),
        send_lag_p999_us: lag_at(3),
        send_lag_max_us: lag_at(4),
        error_ratio: if all > 0 {
            r.errors as f64 / all as f64
        } else {
            0.0
        },
        max_error_ratio: plan.max_error_ratio,
        error_samples: r.error_samples.samples.clone(),
        mode,
        target,
        op_type: plan.op_type.clone(),
        payload_bytes: plan.payload.len(),
        concurrency: plan.concurrency,
        requests: r.requests,
        batch: plan.batch,
        accepted_only: false,
        rate: plan.rate,
        delayed_ops: plan
            .rate
            .map(|_| (r.delayed_requests * u64::from(plan.per_request())).min(all)),
        warmup_ops: plan.warmup,
        first_error: r.first_error.clone(),
        executed_by: None,
        executed_elsewhere: None,
        rss_idle_bytes: None,
        rss_peak_bytes: None,
        rss_delta_bytes: None,
        rss_peak_source: None,
        baseline: None,
        shard_threads: false,
        client_threads: None,
        sampling: None,
        trace_export: None,
    }
}

/// p50, p95, p99, p99.9 and max of `h`, all 0 when it is empty.
fn percentiles(h: &hdrhistogram::Histogram<u64>) -> [u64; 5] {
    if h.is_empty() {
        return [0; 5];
    }
    [
        h.value_at_quantile(0.50),
        h.value_at_quantile(0.95),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
    ]
}

/// The human report: a header line, then one aligned column per measured load.
pub fn render_text(report: &BenchReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let load = match report.rate {
        Some(r) => format!(
            "open loop at {} ops/s · latency from each operation's intended start",
            group(r.round() as u64)
        ),
        None => "closed loop".to_owned(),
    };
    let target = report
        .target
        .as_deref()
        .map_or(String::new(), |t| format!(" {t}"));
    let mut batch = report
        .batch
        .map_or(String::new(), |b| format!(" · batch {b}"));
    if report.accepted_only {
        batch.push_str(" · counted when accepted (202)");
    }
    if report.shard_threads {
        batch.push_str(" · shards on threads of their own");
    }
    if let Some(n) = report.client_threads {
        let _ = write!(
            batch,
            " · client on {n} thread{}",
            if n == 1 { "" } else { "s" }
        );
    }
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
        ("ops ok", |r| group(r.ops)),
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
    if let (Some(p50), Some(p99), Some(p999), Some(max)) = (
        report.service_p50_us,
        report.service_p99_us,
        report.service_p999_us,
        report.service_max_us,
    ) {
        let _ = writeln!(
            out,
            "  service   p50 {} · p99 {} · p99.9 {} · max {} µs  (from the send, leaving out any wait before it)",
            group(p50),
            group(p99),
            group(p999),
            group(max)
        );
    }
    if let (Some(p50), Some(p99), Some(p999), Some(max)) = (
        report.send_lag_p50_us,
        report.send_lag_p99_us,
        report.send_lag_p999_us,
        report.send_lag_max_us,
    ) {
        let _ = writeln!(
            out,
            "  send lag  p50 {} · p99 {} · p99.9 {} · max {} µs  (how late after the intended start)",
            group(p50),
            group(p99),
            group(p999),
            group(max)
        );
    }
    if let (Some(r), Some(t)) = (report.sampling, &report.trace_export) {
        let _ = writeln!(
            out,
            "  traces: sampling {r} · spans recorded {} · exported {} · dropped {} · pending at shutdown {} · failed exports {}",
            group(t.spans_recorded),
            group(t.spans_exported),
            group(t.spans_dropped),
            group(t.spans_pending),
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
    if let (Some(node), Some(elsewhere)) = (report.executed_by, report.executed_elsewhere) {
        let _ = writeln!(
            out,
            "  remote    {} ops ran on {node} · {} elsewhere",
            group(report.ops),
            group(elsewhere)
        );
    }
    if let (Some(idle), Some(peak)) = (report.rss_idle_bytes, report.rss_peak_bytes) {
        let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
        let source = report
            .rss_peak_source
            .map_or(String::new(), |s| format!(" ({})", s.describe()));
        let _ = writeln!(
            out,
            "  memory    idle {:.1} MB · peak {:.1} MB{source} · +{:.1} MB over idle",
            mb(idle),
            mb(peak),
            mb(peak.saturating_sub(idle))
        );
    }
    if report.errors > 0 {
        let _ = writeln!(
            out,
            "  errors    {} of {} operations ({:.4}; --max-error-ratio {})",
            group(report.errors),
            group(report.ops + report.errors),
            report.error_ratio,
            report.max_error_ratio
        );
        let mut listed = 0;
        for e in &report.error_samples {
            listed += e.count;
            let _ = writeln!(out, "    {:>10} × {}", group(e.count), e.reason);
        }
        if listed < report.errors {
            let _ = writeln!(
                out,
                "    {:>10} × other reasons",
                group(report.errors - listed)
            );
        }
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
        let r = crate::bench::tests::run_alone(&args).await.unwrap();
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
