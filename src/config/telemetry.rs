//! `[telemetry]`: whether spans are exported over OTLP, where to and how, and the
//! Jaeger UI the dashboard links traces to, as [`TelemetrySettings`].

use std::time::Duration;

use serde::Deserialize;

use super::check::{is_http_url, Check};
use super::error::ConfigError;
use crate::telemetry::{Protocol, TelemetrySettings, TraceSettings};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    traces: bool,
    endpoint: String,
    protocol: String,
    service_name: String,
    sampling_ratio: f64,
    queue_ops: u64,
    exporters: u64,
    batch_spans: u64,
    export_interval_ms: u64,
    export_timeout_ms: u64,
    jaeger_ui_url: String,
}

impl RawTelemetry {
    pub(super) fn validate(self, check: &Check<'_>) -> Result<TelemetrySettings, ConfigError> {
        let jaeger_ui_url = match self.jaeger_ui_url.trim() {
            "" => None,
            url if is_http_url(url) => Some(url.trim_end_matches('/').to_string()),
            url => {
                return Err(check.invalid(
                    "telemetry.jaeger_ui_url",
                    url,
                    "empty or an http:// or https:// URL, such as http://127.0.0.1:16686",
                ))
            }
        };
        if !is_http_url(&self.endpoint) {
            return Err(check.invalid(
                "telemetry.endpoint",
                &self.endpoint,
                "an http:// or https:// URL, such as http://127.0.0.1:4317",
            ));
        }
        let protocol = Protocol::parse(self.protocol.trim()).ok_or_else(|| {
            check.invalid(
                "telemetry.protocol",
                &self.protocol,
                "grpc or http/protobuf",
            )
        })?;
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(check.invalid(
                "telemetry.sampling_ratio",
                self.sampling_ratio,
                "0.0..=1.0",
            ));
        }
        let name = self.service_name.trim();
        if name.is_empty() || name.len() > 255 {
            return Err(check.invalid(
                "telemetry.service_name",
                &self.service_name,
                "1 to 255 characters",
            ));
        }
        let traces = TraceSettings {
            endpoint: self.endpoint.trim_end_matches('/').to_string(),
            protocol,
            service_name: name.to_string(),
            sampling_ratio: self.sampling_ratio,
            queue_ops: check.range("telemetry.queue_ops", self.queue_ops, 1..=10_000_000)? as usize,
            exporters: check.range("telemetry.exporters", self.exporters, 0..=64)? as usize,
            batch_spans: check.range("telemetry.batch_spans", self.batch_spans, 1..=100_000)?
                as usize,
            export_interval: Duration::from_millis(check.range(
                "telemetry.export_interval_ms",
                self.export_interval_ms,
                1..=60_000,
            )?),
            export_timeout: Duration::from_millis(check.range(
                "telemetry.export_timeout_ms",
                self.export_timeout_ms,
                100..=600_000,
            )?),
        };
        Ok(TelemetrySettings {
            traces: self.traces.then_some(traces),
            jaeger_ui_url,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testutil::{load_err, load_ok, user_file, with_file, EnvGuard};

    #[test]
    fn exporters_are_a_count_or_zero_for_one_per_four_cores() {
        let _env = EnvGuard::new();
        let f = user_file("[telemetry]\ntraces = true\n");
        let t = load_ok(&with_file(&f)).telemetry.traces.unwrap();
        assert_eq!(t.exporters, 0);
        assert!((2..=8).contains(&crate::telemetry::exporter_count(t.exporters)));
        let f = user_file("[telemetry]\ntraces = true\nexporters = 3\n");
        let t = load_ok(&with_file(&f)).telemetry.traces.unwrap();
        assert_eq!(crate::telemetry::exporter_count(t.exporters), 3);
        let f = user_file("[telemetry]\nexporters = 65\n");
        let msg = load_err(&with_file(&f)).to_string();
        assert!(
            msg.contains("`telemetry.exporters`: 65 (allowed: 0..=64)"),
            "{msg}"
        );
    }
}
