//! `opmesh bench`: the load generator. It drives either an embedded node through the
//! library API (`--in-process`) or a running node over HTTP (`--target`), then reports
//! throughput, latency percentiles and, in process, memory.
//!
//! A run is a warm-up phase (discarded) and a measured phase of `--ops` operations, each
//! run by a few driver tasks (see [`driver`](self::driver)) that keep `--concurrency`
//! requests in flight between them. Closed loop by default: a request is issued as soon
//! as the previous one in its slot finished. With `--rate`, open loop: requests are issued
//! at a fixed arrival rate, still never more than `--concurrency` at once; tokio's timer
//! ticks every millisecond, so arrivals are released in per-millisecond steps, and
//! latency is measured from the moment a request is issued (a request held back by the
//! in-flight cap is counted in `delayed_ops`, its wait is not in the latency).
//!
//! Latencies are recorded in microseconds in per-driver HDR histograms (1 µs to 1 hour,
//! 3 significant digits) merged at the end. With `--batch`, every operation of a batch is
//! recorded with the latency of its request, and `--concurrency` caps requests in flight.
//!
//! Errors: a refused submission, a non-2xx answer, a transport error and any status but
//! `succeeded` count as errors and the run goes on; but if the first 100 requests all
//! fail (nothing listening, an unknown type), or every request of a shorter run fails,
//! the run stops with an error that quotes the first failure. An in-process run against
//! an unknown type therefore fails, naming the type.
//!
//! In process, memory is the process's resident set: read once when the node has started
//! and before any load (idle), and every 10 ms during warm-up and the run (peak). The
//! difference includes the bench's own state per slot (about 100 bytes), not only the
//! engine's.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use opmesh_actors::{Json, Node, OpType};
use opmesh_cluster::{Cluster, ClusterConfig};
use serde::Serialize;

use self::driver::{drive, new_histogram, Arrivals, Load, PhaseShared, EARLY_FAILURES};
use self::targets::{http_client, Http, InProcess, Route};

mod driver;
mod inflight;
mod rss;
mod targets;

/// How often the in-process memory sampler reads the RSS.
const RSS_EVERY: Duration = Duration::from_millis(10);

/// How often the progress bar is updated (with the rate over that interval).
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// How long the embedded node may take to finish its work after a run.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Flags of `opmesh bench`. Their names are a contract: scripts and CI call them.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Drive an embedded node (built-in handlers) through the library API.
    #[arg(long)]
    pub in_process: bool,

    /// Drive a running node over HTTP with keep-alive, e.g. http://127.0.0.1:8080.
    #[arg(long, value_name = "URL")]
    pub target: Option<String>,

    /// Operations to measure.
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    pub ops: u64,

    /// Requests in flight at most.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub concurrency: usize,

    /// Operation type.
    #[arg(long = "type", value_name = "TYPE", default_value = "echo")]
    pub op_type: String,

    /// Payload size: a JSON string whose encoded size is N bytes.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub payload_bytes: usize,

    /// Explicit JSON payload (overrides --payload-bytes), e.g. '{"ms":2000}' for sleep.
    #[arg(long, value_name = "JSON")]
    pub payload: Option<String>,

    /// Open loop: start operations at this rate (per second) regardless of completions,
    /// still capped by --concurrency in flight.
    #[arg(long, value_name = "OPS_PER_SEC")]
    pub rate: Option<f64>,

    /// HTTP only: post batches of N operations to /v1/ops/batch?wait=true.
    #[arg(long, value_name = "N")]
    pub batch: Option<usize>,

    /// HTTP only: first run the same load against the server's plain hello route
    /// (POST /v1/bench/hello, no engine) and report it beside the real run.
    #[arg(long)]
    pub baseline: bool,

    /// Operations run before measuring [default: --ops / 10, at most 10000].
    #[arg(long, value_name = "N")]
    pub warmup: Option<u64>,

    /// Print one JSON object on the last line of stdout, and no progress bar.
    #[arg(long)]
    pub json: bool,

    /// With --in-process: run two embedded nodes joined over loopback cluster links, the
    /// type pinned to the second, and submit to the first (every operation crosses a link
    /// and back).
    #[arg(long, requires = "in_process")]
    pub remote: bool,

    /// With --in-process: export every operation's spans over OTLP (gRPC) to this
    /// receiver, e.g. http://127.0.0.1:4317, as `opmesh serve` would.
    #[arg(long, value_name = "URL", requires = "in_process")]
    pub otlp_endpoint: Option<String>,

    /// With --otlp-endpoint: the share of operations traced, 0.0..=1.0.
    #[arg(
        long,
        value_name = "RATIO",
        default_value_t = 1.0,
        requires = "otlp_endpoint"
    )]
    pub sampling: f64,
}

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

/// Runs the bench as `opmesh bench` does: a progress bar on stderr when it is a terminal
/// (and not `--json`), then the report on stdout.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let progress = !args.json && std::io::stderr().is_terminal();
    let report = execute(&args, progress).await?;
    if args.json {
        println!("{}", render_json(&report)?);
    } else {
        print!("{}", render_text(&report));
    }
    Ok(())
}

/// Runs the bench and returns its report, printing nothing.
pub async fn run_report(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    execute(args, false).await
}

/// A JSON document of exactly `n` bytes: `0` for one byte, else a string of `x`.
pub fn payload_of_size(n: usize) -> anyhow::Result<Json> {
    match n {
        0 => bail!(
            "--payload-bytes must be at least 1 (the smallest JSON document, `0`, is one byte)"
        ),
        1 => Ok(Json::from_trusted(&b"0"[..])),
        _ => {
            let mut text = Vec::with_capacity(n);
            text.push(b'"');
            text.resize(n - 1, b'x');
            text.push(b'"');
            Ok(Json::from_trusted(text))
        }
    }
}

/// The report as the one line `--json` prints.
pub fn render_json(report: &BenchReport) -> anyhow::Result<String> {
    Ok(serde_json::to_string(report)?)
}

enum Mode {
    InProcess,
    /// The target, its path ending in `/`.
    Http(reqwest::Url),
}

/// Validated arguments.
struct Plan {
    mode: Mode,
    ops: u64,
    concurrency: usize,
    op_type: String,
    payload: Json,
    rate: Option<f64>,
    batch: Option<u32>,
    baseline: bool,
    warmup: u64,
    remote: bool,
    /// `--otlp-endpoint` and `--sampling`.
    traces: Option<(String, f64)>,
}

impl BenchArgs {
    fn plan(&self) -> anyhow::Result<Plan> {
        let mode = match (self.in_process, &self.target) {
            (false, None) => bail!(
                "choose what to drive: --in-process (an embedded node) or --target http://HOST:PORT (a running node)"
            ),
            (true, Some(_)) => {
                bail!("--in-process and --target exclude each other: pass exactly one")
            }
            (true, None) => Mode::InProcess,
            (false, Some(t)) => Mode::Http(parse_target(t)?),
        };
        let http = matches!(mode, Mode::Http(_));
        if self.batch.is_some() && !http {
            bail!("--batch needs --target: it posts batches to /v1/ops/batch");
        }
        if self.baseline && !http {
            bail!("--baseline needs --target: it measures the server's plain hello route");
        }
        let batch = match self.batch {
            None => None,
            Some(n) if n >= 1 && n <= u32::MAX as usize => Some(n as u32),
            Some(n) => bail!("--batch must be at least 1, got {n}"),
        };
        if self.ops == 0 {
            bail!("--ops must be at least 1");
        }
        if self.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        if let Some(r) = self.rate {
            if !(r.is_finite() && r > 0.0) {
                bail!("--rate must be a positive number of operations per second, got {r}");
            }
        }
        let payload = match &self.payload {
            Some(text) => Json::from_bytes(text.clone().into_bytes())
                .map_err(|e| anyhow!("--payload is not valid JSON: {e}"))?,
            None => payload_of_size(self.payload_bytes)?,
        };
        Ok(Plan {
            mode,
            ops: self.ops,
            concurrency: self.concurrency,
            op_type: self.op_type.clone(),
            payload,
            rate: self.rate,
            batch,
            baseline: self.baseline,
            warmup: self.warmup.unwrap_or((self.ops / 10).min(10_000)),
            remote: self.remote,
            traces: match &self.otlp_endpoint {
                None => None,
                Some(url) => {
                    if !(0.0..=1.0).contains(&self.sampling) {
                        bail!("--sampling must be from 0.0 to 1.0, got {}", self.sampling);
                    }
                    Some((url.clone(), self.sampling))
                }
            },
        })
    }
}

fn parse_target(t: &str) -> anyhow::Result<reqwest::Url> {
    let mut url = reqwest::Url::parse(t)
        .map_err(|e| anyhow!("--target `{t}` is not a URL ({e}); expected http://HOST:PORT"))?;
    if url.scheme() != "http" {
        bail!("--target `{t}`: only plain http:// is supported");
    }
    if url.host_str().is_none_or(str::is_empty) {
        bail!("--target `{t}` has no host; expected http://HOST:PORT");
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    url.set_query(None);
    Ok(url)
}

impl Plan {
    fn per_request(&self) -> u32 {
        self.batch.unwrap_or(1)
    }

    /// Driver tasks: one per core, so completions are handled where they land.
    fn drivers(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        cores.min(self.concurrency).max(1)
    }

    fn arrivals(&self) -> Arrivals {
        match self.rate {
            None => Arrivals::Closed,
            Some(r) => Arrivals::Open {
                per_sec: r / f64::from(self.per_request()) / self.drivers() as f64,
            },
        }
    }
}

/// What one phase (warm-up, baseline or run) measured.
struct PhaseResult {
    hist: hdrhistogram::Histogram<u64>,
    ops: u64,
    errors: u64,
    requests: u64,
    delayed_requests: u64,
    seconds: f64,
    first_error: Option<String>,
}

/// Runs `ops` operations of `load` as `plan` says; fails if the first requests all did.
async fn phase<L: Load>(
    load: &Arc<L>,
    plan: &Plan,
    ops: u64,
    label: &'static str,
    what: &str,
    progress: bool,
) -> anyhow::Result<PhaseResult> {
    let shared = Arc::new(PhaseShared::new(ops, plan.per_request()));
    let bar = progress.then(|| progress_bar(label, ops));
    let ticker = bar.clone().map(|bar| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(PROGRESS_EVERY);
            let (mut last_at, mut last) = (Instant::now(), 0);
            loop {
                every.tick().await;
                let (now, done) = (Instant::now(), shared.finished.load(Ordering::Relaxed));
                let rate = (done - last) as f64 / now.duration_since(last_at).as_secs_f64();
                bar.set_message(format!("{} ops/s", group(rate as u64)));
                bar.set_position(done);
                (last_at, last) = (now, done);
            }
        })
    });
    let drivers = plan.drivers();
    let arrivals = plan.arrivals();
    let start = Instant::now();
    let tasks: Vec<_> = (0..drivers)
        .map(|i| {
            let slots = plan.concurrency / drivers + usize::from(i < plan.concurrency % drivers);
            tokio::spawn(drive(load.clone(), shared.clone(), slots, arrivals))
        })
        .collect();
    let mut result = PhaseResult {
        hist: new_histogram(),
        ops: 0,
        errors: 0,
        requests: 0,
        delayed_requests: 0,
        seconds: 0.0,
        first_error: None,
    };
    let outs = futures::future::join_all(tasks).await;
    result.seconds = start.elapsed().as_secs_f64();
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    for out in outs {
        let out = out.context("a bench driver task failed")?;
        result
            .hist
            .add(&out.hist)
            .expect("histograms share their bounds");
        result.ops += out.ops;
        result.errors += out.errors;
        result.requests += out.requests;
        result.delayed_requests += out.delayed_requests;
    }
    result.first_error = shared.first_error().cloned();
    let first = result.first_error.as_deref().unwrap_or("no error recorded");
    if shared.aborted() {
        bail!("{label}: the first {EARLY_FAILURES} requests to {what} all failed, so the bench stopped; first error: {first}");
    }
    if !shared.any_success() && result.errors > 0 {
        bail!(
            "{label}: all {} requests to {what} failed; first error: {first}",
            result.requests
        );
    }
    Ok(result)
}

fn progress_bar(label: &'static str, len: u64) -> ProgressBar {
    let style = ProgressStyle::with_template(
        "{prefix:>8} [{wide_bar}] {human_pos}/{human_len} ops  {msg:>15}  {elapsed}",
    )
    .expect("static template is valid")
    .progress_chars("=> ");
    ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr())
        .with_style(style)
        .with_prefix(label)
}

async fn execute(args: &BenchArgs, progress: bool) -> anyhow::Result<BenchReport> {
    let plan = args.plan()?;
    match &plan.mode {
        Mode::InProcess => in_process(&plan, progress).await,
        Mode::Http(base) => http(&plan, base, progress).await,
    }
}

/// Two embedded nodes joined over loopback links, `op_type` pinned to the second.
/// Returns the first (where operations are submitted) and both for shutdown.
async fn remote_pair(op_type: &str) -> anyhow::Result<(Node, Vec<(Cluster, Node)>)> {
    let mut pair = Vec::new();
    let mut seed: Option<String> = None;
    for name in ["bench-a", "bench-b"] {
        let mut cfg = ClusterConfig::new(name, b"opmesh-bench-loopback-secret");
        cfg.join = seed.iter().cloned().collect();
        let cluster = Cluster::start(cfg)
            .await
            .context("starting a cluster node")?;
        let builder = crate::handlers::register_builtins(Node::builder().node_id(name), &[]);
        let node = cluster
            .start_node(builder)
            .await
            .context("starting an embedded node")?;
        seed.get_or_insert_with(|| cluster.cluster_addr().to_owned());
        pair.push((cluster, node));
    }
    let until = Instant::now() + Duration::from_secs(30);
    while !pair
        .iter()
        .all(|(c, _)| c.is_ready() && c.state().nodes.len() == 2)
    {
        if Instant::now() > until {
            bail!("the two embedded nodes did not form a cluster within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = pair[0].1.clone();
    a.set_route(
        op_type,
        opmesh_actors::Route {
            strategy: opmesh_actors::Strategy::Pinned,
            nodes: vec!["bench-b".into()],
        },
    )
    .await
    .map_err(|e| anyhow!("pinning {op_type} to the second node: {e}"))?;
    Ok((a, pair))
}

/// The trace pipeline of a bench run: `opmesh serve`'s defaults.
fn bench_trace_settings(endpoint: &str, ratio: f64) -> crate::telemetry::TraceSettings {
    crate::telemetry::TraceSettings {
        endpoint: endpoint.to_string(),
        protocol: crate::telemetry::Protocol::Grpc,
        service_name: "opmesh-bench".into(),
        sampling_ratio: ratio,
        queue_ops: 65_536,
        batch_spans: 4_096,
        export_interval: Duration::from_millis(500),
        export_timeout: Duration::from_secs(10),
    }
}

async fn in_process(plan: &Plan, progress: bool) -> anyhow::Result<BenchReport> {
    let telemetry = match &plan.traces {
        None => None,
        Some((endpoint, ratio)) => Some(
            crate::telemetry::Telemetry::start(
                &crate::telemetry::TelemetrySettings {
                    traces: Some(bench_trace_settings(endpoint, *ratio)),
                    jaeger_ui_url: None,
                },
                "node-1",
            )
            .context("starting the trace exporter")?,
        ),
    };
    let (node, pair) = if plan.remote {
        let (a, pair) = remote_pair(&plan.op_type).await?;
        (a, pair)
    } else {
        let mut builder = crate::handlers::register_builtins(Node::builder(), &[]);
        if let Some(t) = &telemetry {
            builder = builder.tracing(t.tracing());
        }
        let node = builder
            .start()
            .await
            .context("starting the embedded node")?;
        (node, Vec::new())
    };
    let load = Arc::new(InProcess {
        node: node.clone(),
        op_type: OpType::from(plan.op_type.as_str()),
        payload: plan.payload.clone(),
    });
    let idle = rss::current_rss();
    let sampler = rss::PeakSampler::start(RSS_EVERY);
    let what = "the embedded node";
    let measured = async {
        if plan.warmup > 0 {
            phase(&load, plan, plan.warmup, "warmup", what, progress).await?;
        }
        phase(&load, plan, plan.ops, "run", what, progress).await
    }
    .await;
    let peak = sampler.map(rss::PeakSampler::finish);
    drop(load);
    node.shutdown(SHUTDOWN_GRACE).await;
    for (c, n) in &pair {
        n.shutdown(SHUTDOWN_GRACE).await;
        c.shutdown().await;
    }
    let mode = if plan.remote {
        "in-process-remote"
    } else {
        "in-process"
    };
    let mut report = report(plan, mode, None, &measured?);
    if let Some(t) = telemetry {
        let stats = tokio::task::spawn_blocking(move || {
            t.shutdown(Duration::from_secs(30));
            t.stats()
        })
        .await?;
        report.sampling = plan.traces.as_ref().map(|(_, r)| *r);
        report.trace_export = Some(stats);
    }
    report.rss_idle_bytes = idle;
    report.rss_peak_bytes = peak;
    report.rss_delta_bytes = idle.zip(peak).map(|(i, p)| p.saturating_sub(i));
    Ok(report)
}

async fn http(plan: &Plan, base: &reqwest::Url, progress: bool) -> anyhow::Result<BenchReport> {
    let client = http_client(plan.concurrency).context("building the HTTP client")?;
    let batch = plan.per_request();
    let target = base.as_str().trim_end_matches('/').to_owned();
    let measure = |route: Route, label: &'static str| {
        let client = client.clone();
        async move {
            let load = Arc::new(Http::new(
                client,
                base,
                route,
                &plan.op_type,
                &plan.payload,
                batch,
            )?);
            let what = load_description(base, route);
            if plan.warmup > 0 {
                phase(&load, plan, plan.warmup, "warmup", &what, progress).await?;
            }
            phase(&load, plan, plan.ops, label, &what, progress).await
        }
    };
    let baseline = if plan.baseline {
        let hello = measure(
            Route::Hello {
                batch: plan.batch.is_some(),
            },
            "baseline",
        )
        .await?;
        Some(Box::new(report(plan, "http", Some(target.clone()), &hello)))
    } else {
        None
    };
    let route = if plan.batch.is_some() {
        Route::Batch
    } else {
        Route::Single
    };
    let measured = measure(route, "run").await?;
    let mut report = report(plan, "http", Some(target), &measured);
    report.baseline = baseline;
    Ok(report)
}

fn load_description(base: &reqwest::Url, route: Route) -> String {
    let path = match route {
        Route::Single => "v1/ops?wait=true",
        Route::Batch => "v1/ops/batch?wait=true",
        Route::Hello { .. } => "v1/bench/hello",
    };
    format!("{base}{path}")
}

fn report(plan: &Plan, mode: &'static str, target: Option<String>, r: &PhaseResult) -> BenchReport {
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
fn group(n: u64) -> String {
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
    use clap::Parser;
    use std::sync::atomic::{AtomicU64, AtomicUsize};
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn parse(argv: &[&str]) -> BenchArgs {
        Cli::try_parse_from(std::iter::once("bench").chain(argv.iter().copied()))
            .expect("flags parse")
            .args
    }

    const EXTRAS: [&str; 15] = [
        "mode",
        "target",
        "type",
        "payload_bytes",
        "concurrency",
        "requests",
        "batch",
        "rate",
        "delayed_ops",
        "warmup_ops",
        "first_error",
        "rss_idle_bytes",
        "rss_peak_bytes",
        "rss_delta_bytes",
        "baseline",
    ];

    fn assert_report_shape(v: &serde_json::Value) {
        let obj = v.as_object().expect("the report is a JSON object");
        for k in REPORT_KEYS {
            assert!(
                obj.get(k).is_some_and(|x| x.is_number()),
                "`{k}` is missing or not a number in {v}"
            );
        }
        for k in obj.keys() {
            assert!(
                REPORT_KEYS.contains(&k.as_str()) || EXTRAS.contains(&k.as_str()),
                "undocumented key `{k}`"
            );
        }
    }

    fn assert_ordered(r: &BenchReport) {
        assert!(r.p50_us >= 1, "{r:?}");
        assert!(r.p50_us <= r.p95_us, "{r:?}");
        assert!(r.p95_us <= r.p99_us, "{r:?}");
        assert!(r.p99_us <= r.p999_us, "{r:?}");
        assert!(r.p999_us <= r.max_us, "{r:?}");
    }

    #[test]
    fn payload_of_n_bytes_is_json_of_exactly_n_bytes() {
        for n in [1, 2, 3, 10, 64, 1000, 65_536] {
            let p = payload_of_size(n).unwrap();
            assert_eq!(p.len(), n);
            serde_json::from_slice::<serde_json::Value>(p.as_bytes())
                .unwrap_or_else(|e| panic!("{n} bytes: {e}"));
        }
        assert!(payload_of_size(0).is_err());
        let args = parse(&["--in-process", "--payload-bytes", "100"]);
        assert_eq!(args.plan().unwrap().payload.len(), 100);
    }

    #[test]
    fn flags_have_their_documented_defaults() {
        let a = parse(&["--in-process"]);
        assert_eq!(
            (a.ops, a.concurrency, a.op_type.as_str(), a.payload_bytes),
            (200_000, 256, "echo", 64)
        );
        assert!(a.rate.is_none() && a.batch.is_none() && !a.baseline && !a.json);
        let plan = a.plan().unwrap();
        assert_eq!(plan.warmup, 10_000);
        assert_eq!(
            parse(&["--in-process", "--ops", "500"])
                .plan()
                .unwrap()
                .warmup,
            50
        );
        let a = parse(&[
            "--target",
            "http://127.0.0.1:9/",
            "--ops",
            "7",
            "--concurrency",
            "3",
            "--type",
            "sleep",
            "--payload",
            r#"{"ms":5}"#,
            "--rate",
            "100",
            "--batch",
            "4",
            "--baseline",
            "--warmup",
            "0",
            "--json",
        ]);
        let plan = a.plan().unwrap();
        assert_eq!(
            (plan.ops, plan.concurrency, plan.batch, plan.warmup),
            (7, 3, Some(4), 0)
        );
        assert_eq!(plan.payload.as_str(), r#"{"ms":5}"#);
        assert!(a.json && plan.baseline && plan.rate == Some(100.0));
    }

    #[test]
    fn invalid_arguments_are_clear_errors() {
        let err = |argv: &[&str]| parse(argv).plan().err().expect("an error").to_string();
        assert!(err(&[]).contains("--in-process"), "{}", err(&[]));
        assert!(err(&[]).contains("--target"));
        let both = err(&["--in-process", "--target", "http://127.0.0.1:8080"]);
        assert!(both.contains("exactly one"), "{both}");
        let batch = err(&["--in-process", "--batch", "10"]);
        assert!(batch.contains("--batch needs --target"), "{batch}");
        assert!(err(&["--in-process", "--baseline"]).contains("--baseline needs --target"));
        assert!(err(&["--target", "http://h:1", "--batch", "0"]).contains("--batch"));
        let json = err(&["--in-process", "--payload", "{nope"]);
        assert!(json.contains("--payload is not valid JSON"), "{json}");
        assert!(err(&["--target", "https://h:1"]).contains("http://"));
        assert!(err(&["--target", "not a url"]).contains("not a URL"));
        assert!(err(&["--in-process", "--ops", "0"]).contains("--ops"));
        assert!(err(&["--in-process", "--concurrency", "0"]).contains("--concurrency"));
        assert!(err(&["--in-process", "--rate", "0"]).contains("--rate"));
        assert!(err(&["--in-process", "--rate", "NaN"]).contains("--rate"));
        assert!(err(&["--in-process", "--payload-bytes", "0"]).contains("--payload-bytes"));
    }

    #[test]
    fn targets_are_normalised() {
        assert_eq!(
            parse_target("http://127.0.0.1:8080").unwrap().as_str(),
            "http://127.0.0.1:8080/"
        );
        assert_eq!(
            parse_target("http://h:1/api?x=1").unwrap().as_str(),
            "http://h:1/api/"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn in_process_echo_run_counts_every_op() {
        let args = parse(&[
            "--in-process",
            "--ops",
            "3000",
            "--concurrency",
            "64",
            "--json",
        ]);
        let r = run_report(&args).await.unwrap();
        assert_eq!(r.ops, 3000);
        assert_eq!(r.errors, 0);
        assert_eq!(r.requests, 3000);
        assert_eq!(r.warmup_ops, 300);
        assert!(r.seconds > 0.0 && r.ops_per_sec > 0.0);
        assert_ordered(&r);
        assert_eq!(r.mode, "in-process");
        let (idle, peak) = (r.rss_idle_bytes.unwrap(), r.rss_peak_bytes.unwrap());
        assert!(idle > 0 && peak >= idle);
        assert_eq!(r.rss_delta_bytes, Some(peak - idle));
        assert!(r.first_error.is_none());
    }

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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unknown_type_fails_the_run_naming_the_type() {
        let args = parse(&["--in-process", "--type", "no-such-type", "--ops", "1000"]);
        let e = run_report(&args).await.unwrap_err().to_string();
        assert!(e.contains("first 100 requests"), "{e}");
        assert!(e.contains("no-such-type"), "{e}");
        // A run shorter than 100 requests fails too when every request failed.
        let args = parse(&[
            "--in-process",
            "--type",
            "no-such-type",
            "--ops",
            "5",
            "--warmup",
            "0",
        ]);
        let e = run_report(&args).await.unwrap_err().to_string();
        assert!(e.contains("all 5 requests"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_handler_is_quoted() {
        // `sleep` with a bad payload fails in its handler, after being accepted.
        let args = parse(&[
            "--in-process",
            "--type",
            "sleep",
            "--payload",
            r#"{"ms":"soon"}"#,
            "--ops",
            "50",
            "--warmup",
            "0",
        ]);
        let e = run_report(&args).await.unwrap_err().to_string();
        assert!(e.contains("sleep expects"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn as_many_slots_as_ops_put_every_op_in_flight_at_once() {
        let args = parse(&[
            "--in-process",
            "--type",
            "sleep",
            "--payload",
            r#"{"ms":300}"#,
            "--ops",
            "400",
            "--concurrency",
            "400",
            "--warmup",
            "0",
        ]);
        let r = run_report(&args).await.unwrap();
        assert_eq!((r.ops, r.errors), (400, 0));
        // One wave of 300 ms, not two: no driver held back operations it had no slot for.
        assert!(r.seconds < 0.55, "{r:?}");
        assert!(r.p50_us >= 300_000, "{r:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_keeps_to_the_rate() {
        let args = parse(&[
            "--in-process",
            "--ops",
            "2000",
            "--rate",
            "20000",
            "--concurrency",
            "64",
            "--warmup",
            "0",
        ]);
        let r = run_report(&args).await.unwrap();
        assert_eq!((r.ops, r.errors), (2000, 0));
        // The last operation is not due before (2000 - drivers) / 20000 s.
        assert!(r.seconds >= 0.095, "{r:?}");
        assert!(r.ops_per_sec <= 21_000.0, "{r:?}");
        assert!(r.delayed_ops.is_some());
        assert_ordered(&r);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_counts_ops_held_back_by_the_cap() {
        let args = parse(&[
            "--in-process",
            "--type",
            "sleep",
            "--payload",
            r#"{"ms":20}"#,
            "--ops",
            "200",
            "--rate",
            "5000",
            "--concurrency",
            "4",
            "--warmup",
            "0",
        ]);
        let r = run_report(&args).await.unwrap();
        assert_eq!((r.ops, r.errors), (200, 0));
        // At most 4 in flight for 20 ms each: 200 ops take about a second, not 40 ms.
        assert!(r.seconds >= 0.9, "{r:?}");
        assert!(r.delayed_ops.unwrap() > 100, "{r:?}");
    }

    /// A minimal HTTP/1.1 server with keep-alive speaking the api's shapes: type `fail`
    /// always fails, `flaky` fails every third time, `boom` answers 500.
    struct FakeServer {
        addr: std::net::SocketAddr,
        connections: Arc<AtomicUsize>,
        ops: Arc<AtomicU64>,
        hello: Arc<AtomicU64>,
        batches: Arc<AtomicU64>,
    }

    impl FakeServer {
        async fn start() -> Self {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let server = FakeServer {
                addr: listener.local_addr().unwrap(),
                connections: Default::default(),
                ops: Default::default(),
                hello: Default::default(),
                batches: Default::default(),
            };
            let (conns, ops, hello, batches) = (
                server.connections.clone(),
                server.ops.clone(),
                server.hello.clone(),
                server.batches.clone(),
            );
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    conns.fetch_add(1, Ordering::Relaxed);
                    stream.set_nodelay(true).unwrap();
                    let (ops, hello, batches) = (ops.clone(), hello.clone(), batches.clone());
                    tokio::spawn(async move {
                        let (r, mut w) = stream.into_split();
                        let mut r = BufReader::new(r);
                        loop {
                            let mut line = String::new();
                            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                            let mut len = 0usize;
                            loop {
                                let mut h = String::new();
                                r.read_line(&mut h).await.unwrap();
                                if h == "\r\n" {
                                    break;
                                }
                                if let Some(v) =
                                    h.to_ascii_lowercase().strip_prefix("content-length:")
                                {
                                    len = v.trim().parse().unwrap();
                                }
                            }
                            let mut body = vec![0; len];
                            r.read_exact(&mut body).await.unwrap();
                            let (code, answer) = match path.as_str() {
                                "/v1/bench/hello" => {
                                    hello.fetch_add(1, Ordering::Relaxed);
                                    ("200 OK", r#"{"hello":"world"}"#.to_owned())
                                }
                                "/v1/ops?wait=true" => {
                                    let op: serde_json::Value =
                                        serde_json::from_slice(&body).unwrap();
                                    let n = ops.fetch_add(1, Ordering::Relaxed);
                                    match answer(&op, n) {
                                        Some(a) => ("200 OK", a),
                                        None => ("500 Internal Server Error", "{}".to_owned()),
                                    }
                                }
                                "/v1/ops/batch?wait=true" => {
                                    batches.fetch_add(1, Ordering::Relaxed);
                                    let req: serde_json::Value =
                                        serde_json::from_slice(&body).unwrap();
                                    let results: Vec<String> = req["ops"]
                                        .as_array()
                                        .unwrap()
                                        .iter()
                                        .map(|op| {
                                            answer(op, ops.fetch_add(1, Ordering::Relaxed)).unwrap()
                                        })
                                        .collect();
                                    (
                                        "200 OK",
                                        format!(r#"{{"results":[{}]}}"#, results.join(",")),
                                    )
                                }
                                _ => ("404 Not Found", r#"{"error":"not_found"}"#.to_owned()),
                            };
                            // One write: head and body in one segment, as a real server
                            // sends them (two small writes would wait on Nagle).
                            let reply = format!(
                                "HTTP/1.1 {code}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                                answer.len()
                            );
                            if w.write_all(reply.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            });
            server
        }

        fn url(&self) -> String {
            format!("http://{}", self.addr)
        }
    }

    fn answer(op: &serde_json::Value, n: u64) -> Option<String> {
        let fail = match op["type"].as_str().unwrap() {
            "boom" => return None,
            "fail" => true,
            "flaky" => n % 3 == 2,
            _ => false,
        };
        Some(if fail {
            format!(r#"{{"id":"{n}","status":"failed","error":"asked to fail"}}"#)
        } else {
            format!(
                r#"{{"id":"{n}","status":"succeeded","result":{}}}"#,
                op["payload"]
            )
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_run_uses_keep_alive_and_counts_every_op() {
        let server = FakeServer::start().await;
        let url = server.url();
        let args = parse(&[
            "--target",
            &url,
            "--ops",
            "2000",
            "--concurrency",
            "16",
            "--warmup",
            "100",
        ]);
        let r = run_report(&args).await.unwrap();
        assert_eq!((r.ops, r.errors, r.requests), (2000, 0, 2000));
        assert_eq!(r.mode, "http");
        assert_eq!(r.target.as_deref(), Some(url.as_str()));
        assert!(r.rss_idle_bytes.is_none());
        assert_ordered(&r);
        assert_eq!(server.ops.load(Ordering::Relaxed), 2100);
        let conns = server.connections.load(Ordering::Relaxed);
        // reqwest's pool may open a few more connections than requests in flight (a request
        // issued just before the last one's connection went back to the pool); without
        // keep-alive there would be one per request.
        assert!(
            conns <= 64,
            "{conns} connections for 16 in flight: no keep-alive?"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_batches_and_baseline() {
        let server = FakeServer::start().await;
        let args = parse(&[
            "--target",
            &server.url(),
            "--ops",
            "1000",
            "--batch",
            "64",
            "--concurrency",
            "4",
            "--warmup",
            "0",
            "--baseline",
        ]);
        let r = run_report(&args).await.unwrap();
        assert_eq!(
            (r.ops, r.errors, r.requests, r.batch),
            (1000, 0, 16, Some(64))
        );
        assert_eq!(server.ops.load(Ordering::Relaxed), 1000);
        assert_eq!(server.batches.load(Ordering::Relaxed), 16);
        let b = r.baseline.as_deref().expect("a baseline");
        assert_eq!((b.ops, b.errors, b.requests), (1000, 0, 16));
        assert_eq!(server.hello.load(Ordering::Relaxed), 16);
        assert_ordered(&r);
        assert_ordered(b);
        let v = serde_json::to_value(&r).unwrap();
        assert_report_shape(&v);
        assert_report_shape(&v["baseline"]);
        let text = render_text(&r);
        assert!(text.contains("hello") && text.contains("engine"), "{text}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_failures_are_counted_not_fatal() {
        let server = FakeServer::start().await;
        let args = parse(&[
            "--target",
            &server.url(),
            "--type",
            "flaky",
            "--ops",
            "300",
            "--concurrency",
            "1",
            "--warmup",
            "0",
        ]);
        let r = run_report(&args).await.unwrap();
        assert_eq!((r.ops, r.errors), (300, 100));
        assert_eq!(
            r.first_error.as_deref(),
            Some("operation failed: asked to fail")
        );
        let boom = parse(&[
            "--target",
            &server.url(),
            "--type",
            "boom",
            "--ops",
            "300",
            "--warmup",
            "0",
        ]);
        let e = run_report(&boom).await.unwrap_err().to_string();
        assert!(e.contains("first 100") && e.contains("HTTP 500"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_listening_stops_the_run_clearly() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let url = format!("http://127.0.0.1:{port}");
        let args = parse(&["--target", &url, "--ops", "100000", "--warmup", "0"]);
        let started = Instant::now();
        let e = run_report(&args).await.unwrap_err().to_string();
        assert!(e.contains("first 100 requests"), "{e}");
        assert!(e.contains(&url), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
