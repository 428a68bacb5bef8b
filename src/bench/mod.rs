//! `opmesh bench`: the load generator. It drives either an embedded node through the
//! library API (`--in-process`) or a running node over HTTP (`--target`), then reports
//! throughput, latency percentiles and, in process, memory.
//!
//! A run is a warm-up phase (discarded) and a measured phase of `--ops` operations, each
//! run by a few driver tasks (see [`driver`](self::driver)) that keep `--concurrency`
//! requests in flight between them. Closed loop by default: a request is issued as soon
//! as the previous one in its slot finished, and latency is measured from its send. With
//! `--rate`, open loop: requests fall due on a fixed arrival schedule, still never more
//! than `--concurrency` at once, and latency is measured from each operation's intended
//! start (its slot in the schedule), so that neither a stalled generator, nor its timer
//! (a pacer thread that wakes the drivers every 50 µs), nor the in-flight cap hides the
//! wait it causes (no coordinated omission). The time from send to answer (`service_*`)
//! and how late each operation was sent (`send_lag_*`) are reported beside it, and
//! requests held back by the cap are counted in `delayed_ops`.
//!
//! Latencies are recorded in microseconds in per-driver HDR histograms (1 µs to 1 hour,
//! 3 significant digits) merged at the end. With `--batch`, every operation of a batch is
//! recorded with the latency of its request, and `--concurrency` caps requests in flight.
//!
//! Only succeeded operations count: `ops`, `ops_per_sec` and the percentiles leave
//! failures out (a fast refusal must not raise throughput or lower a percentile). A
//! refused submission, a non-2xx answer, a transport error and any status but
//! `succeeded` count in `errors`, with the first few distinct reasons and how many failed
//! for each (`error_samples`). The run goes on; at the end `opmesh bench` prints the
//! report and exits non-zero when more than `--max-error-ratio` (default 0: any) of the
//! operations failed. If the first 100 requests all fail (nothing listening, an unknown
//! type), or every request of a shorter run fails, the run stops early with an error that
//! quotes the first failure. An in-process run against an unknown type therefore fails,
//! naming the type.
//!
//! `--remote` runs two embedded nodes joined over loopback links, the type pinned to the
//! second: every operation's `executed_by` must name the second node, or it counts as a
//! failure and the run fails however many were allowed to. With `--otlp-endpoint`, both
//! nodes export their spans there (each as its own `service.instance.id`).
//!
//! In process, memory is the process's resident set (see [`rss`](self::rss)): read once
//! when the node has started and before any load (idle); then the kernel's high-water
//! mark (`VmHWM`) is reset to it, and read after the run (peak), so warm-up and run are
//! covered without sampling and start-up is not. Where the mark cannot be reset the peak
//! is the lifetime one, and the report says so (`rss_peak_source`). The difference
//! includes the bench's own state per slot (about 100 bytes), not only the engine's.
//!
//! What a run reports, and the `--json` keys that are a contract, live in `report`; the
//! targets a driver loads (an embedded node, a node over HTTP) in `targets`.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use opmesh_actors::shard::ShardThreads;
use opmesh_actors::{Json, Node, OpType};
use opmesh_cluster::{Cluster, ClusterConfig};
use rustls::pki_types::CertificateDer;

use self::driver::{
    drive, new_histogram, Arrivals, ErrorSamples, Load, Pace, Pacer, PhaseShared, EARLY_FAILURES,
};
use self::report::{group, report};
use self::targets::{http_client, Http, InProcess, Route};

pub use self::driver::ErrorSample;
pub use self::report::{render_json, render_text, BenchReport, REPORT_KEYS};
pub use self::rss::PeakSource;

mod driver;
mod inflight;
mod report;
pub(crate) mod rss;
mod targets;
#[cfg(test)]
mod tests;

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

    /// Drive a running node over HTTP with keep-alive, e.g. http://127.0.0.1:8080 or
    /// https://opmesh.example.com:7070.
    #[arg(long, value_name = "URL")]
    pub target: Option<String>,

    /// The API token to send with --target, when the node checks tokens (prefer
    /// OPMESH_TOKEN: flags show in the process list).
    #[arg(
        long,
        env = "OPMESH_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<crate::config::Secret>,

    /// With an https --target: a PEM file of CA certificates to trust beside the
    /// system's (the CA that signed the node's certificate).
    #[arg(long, env = "OPMESH_CACERT", value_name = "PEM")]
    pub cacert: Option<std::path::PathBuf>,

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

    /// HTTP only: post without `?wait=true`. An operation counts when it is answered
    /// 202 (accepted: status `queued`), and its latency is the time to that answer; it
    /// runs after. Measures the accepting path (the journal's, with `engine.journal`).
    #[arg(long)]
    pub no_wait: bool,

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

    /// With --in-process: run each shard's actors on a thread of their own
    /// (`engine.shard_threads`), and the bench's drivers on those threads; with --remote,
    /// each node's links on them too (as `opmesh serve` runs both on its api's workers).
    #[arg(long, requires = "in_process")]
    pub shard_threads: bool,

    /// With --otlp-endpoint: the share of operations traced, 0.0..=1.0.
    #[arg(
        long,
        value_name = "RATIO",
        default_value_t = 1.0,
        requires = "otlp_endpoint"
    )]
    pub sampling: f64,

    /// With --otlp-endpoint: exporter threads of each node's trace pipeline
    /// (`telemetry.exporters`; 0: one per 4 cores and at least 2, as `opmesh serve`).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        requires = "otlp_endpoint"
    )]
    pub exporters: usize,

    /// HTTP only: generate the load from N threads of its own, each with its own event
    /// loop, HTTP client and connections (as wrk does), the drivers spread over them:
    /// no request or answer crosses threads on the client's side [default: one per
    /// core, at most --concurrency].
    #[arg(long, value_name = "N")]
    pub client_threads: Option<usize>,

    /// The share of operations that may fail, 0.0..=1.0: above it the bench exits
    /// non-zero after its report, naming the share and the first reasons.
    #[arg(long, value_name = "RATIO", default_value_t = 0.0)]
    pub max_error_ratio: f64,
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
    report.check()
}

/// Runs the bench and returns its report, printing nothing. The report's
/// [`check`](BenchReport::check) tells whether the run passes (`opmesh bench` exits
/// non-zero when it does not).
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

enum Mode {
    InProcess,
    /// The target, its path ending in `/`, and the CA certificates of `--cacert`.
    Http(reqwest::Url, Vec<CertificateDer<'static>>),
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
    /// `--no-wait`: operations count when accepted (202), not when finished.
    wait: bool,
    warmup: u64,
    remote: bool,
    /// `--shard-threads`.
    shard_threads: bool,
    /// `--client-threads` (HTTP only; else one per core: see [`Plan::drivers`]).
    client_threads: Option<usize>,
    /// `--otlp-endpoint`, `--sampling` and `--exporters`.
    traces: Option<(String, f64, usize)>,
    max_error_ratio: f64,
    /// `--token`, sent with every HTTP request.
    token: Option<crate::config::Secret>,
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
            (false, Some(t)) => {
                let trust = match &self.cacert {
                    None => Vec::new(),
                    Some(path) => crate::tls::read_ca_file(path).map_err(|e| anyhow!("--cacert: {e}"))?,
                };
                Mode::Http(parse_target(t)?, trust)
            }
        };
        let http = matches!(mode, Mode::Http(..));
        if self.batch.is_some() && !http {
            bail!("--batch needs --target: it posts batches to /v1/ops/batch");
        }
        if self.no_wait && !http {
            bail!("--no-wait needs --target: it posts without ?wait=true and counts 202 answers");
        }
        if self.baseline && !http {
            bail!("--baseline needs --target: it measures the server's plain hello route");
        }
        match self.client_threads {
            Some(_) if !http => {
                bail!("--client-threads needs --target: it sets the HTTP client's threads")
            }
            Some(0) => bail!("--client-threads must be at least 1, got 0"),
            _ => {}
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
        if !(0.0..=1.0).contains(&self.max_error_ratio) {
            bail!(
                "--max-error-ratio must be from 0.0 to 1.0 (the share of operations that may fail), got {}",
                self.max_error_ratio
            );
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
            wait: !self.no_wait,
            warmup: self.warmup.unwrap_or((self.ops / 10).min(10_000)),
            remote: self.remote,
            shard_threads: self.shard_threads,
            client_threads: self.client_threads,
            token: self.token.clone(),
            traces: match &self.otlp_endpoint {
                None => None,
                Some(url) => {
                    if !(0.0..=1.0).contains(&self.sampling) {
                        bail!("--sampling must be from 0.0 to 1.0, got {}", self.sampling);
                    }
                    Some((url.clone(), self.sampling, self.exporters))
                }
            },
            max_error_ratio: self.max_error_ratio,
        })
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

fn parse_target(t: &str) -> anyhow::Result<reqwest::Url> {
    let mut url = reqwest::Url::parse(t)
        .map_err(|e| anyhow!("--target `{t}` is not a URL ({e}); expected http://HOST:PORT"))?;
    if !matches!(url.scheme(), "http" | "https") {
        bail!("--target `{t}`: expected http://HOST:PORT or https://HOST:PORT");
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

    /// Driver tasks: one per core (or per client thread), so completions are handled
    /// where they land.
    fn drivers(&self) -> usize {
        self.client_threads
            .unwrap_or_else(cores)
            .min(self.concurrency)
            .max(1)
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
    /// Succeeded operations' latency (from the intended start in an open loop).
    hist: hdrhistogram::Histogram<u64>,
    /// Open loop: succeeded operations' latency from the send.
    service: Option<hdrhistogram::Histogram<u64>>,
    /// Open loop: how late succeeded operations were sent.
    lag: Option<hdrhistogram::Histogram<u64>>,
    /// Succeeded operations.
    ops: u64,
    errors: u64,
    error_samples: ErrorSamples,
    /// Of `errors`: operations that ran on another node than required.
    elsewhere: u64,
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
    let pacer = match arrivals {
        Arrivals::Closed => None,
        Arrivals::Open { .. } => {
            Some(Pacer::start(drivers).context("starting the open-loop pacer thread")?)
        }
    };
    let start = Instant::now();
    let tasks: Vec<_> = (0..drivers)
        .map(|i| {
            let slots = plan.concurrency / drivers + usize::from(i < plan.concurrency % drivers);
            let open = match (arrivals, &pacer) {
                (Arrivals::Open { per_sec }, Some(p)) => Some((Pace::new(per_sec), p.slot(i))),
                _ => None,
            };
            let driver = drive(load.clone(), shared.clone(), slots, open);
            match load.runtimes() {
                [] => tokio::spawn(driver),
                rts => rts[i % rts.len()].spawn(driver),
            }
        })
        .collect();
    let mut result = PhaseResult {
        hist: new_histogram(),
        service: None,
        lag: None,
        ops: 0,
        errors: 0,
        error_samples: ErrorSamples::default(),
        elsewhere: 0,
        requests: 0,
        delayed_requests: 0,
        seconds: 0.0,
        first_error: None,
    };
    let outs = futures::future::join_all(tasks).await;
    result.seconds = start.elapsed().as_secs_f64();
    drop(pacer);
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
        merge(&mut result.service, out.service);
        merge(&mut result.lag, out.lag);
        result.ops += out.ops;
        result.errors += out.errors;
        result.error_samples.merge(out.error_samples);
        result.elsewhere += out.elsewhere;
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

/// Adds a driver's optional histogram to the phase's.
fn merge(
    all: &mut Option<hdrhistogram::Histogram<u64>>,
    one: Option<hdrhistogram::Histogram<u64>>,
) {
    match (all.as_mut(), one) {
        (Some(all), Some(h)) => all.add(&h).expect("histograms share their bounds"),
        (None, h) => *all = h,
        (Some(_), None) => {}
    }
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
        Mode::Http(base, trust) => http(&plan, base, trust, progress).await,
    }
}

/// The names of the two embedded nodes of a `--remote` run: operations are submitted to
/// the first and must run on the second.
const REMOTE_NODES: [&str; 2] = ["bench-a", "bench-b"];

/// Two embedded nodes joined over loopback links, `op_type` pinned to the second, each
/// with its own trace pipeline when there is one (`telemetry`, in [`REMOTE_NODES`]
/// order). With `shard_threads` each node's shards and its links run on threads of their
/// own, as `opmesh serve` runs both on its api's workers. Returns the first (where
/// operations are submitted), both for shutdown, and the threads (kept until the nodes
/// have shut down).
async fn remote_pair(
    op_type: &str,
    shard_threads: bool,
    telemetry: &[crate::telemetry::Telemetry],
) -> anyhow::Result<(Node, Vec<(Cluster, Node)>, Vec<ShardThreads>)> {
    let mut pair = Vec::new();
    let mut threads = Vec::new();
    let mut seed: Option<String> = None;
    for (i, name) in REMOTE_NODES.into_iter().enumerate() {
        let mut builder = crate::handlers::register_builtins(Node::builder().node_id(name), &[])
            .config(engine_config(shard_threads));
        if let Some(t) = telemetry.get(i) {
            builder = builder.tracing(t.tracing());
        }
        let mut cfg = ClusterConfig::new(name, b"opmesh-bench-loopback-secret");
        if shard_threads {
            let own = ShardThreads::start(opmesh_actors::shard::shard_count(0))
                .context("starting the shards' threads")?;
            builder = builder.shard_runtimes(own.handles().to_vec());
            cfg.link_runtimes = own.handles().to_vec();
            threads.push(own);
        }
        cfg.join = seed.iter().cloned().collect();
        // Both serve every built-in type, as `opmesh serve` does; the route pins the
        // bench's type to the second.
        cfg.serves = builder.handler_types();
        let cluster = Cluster::start(cfg)
            .await
            .context("starting a cluster node")?;
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
            nodes: vec![REMOTE_NODES[1].into()],
        },
    )
    .await
    .map_err(|e| anyhow!("pinning {op_type} to the second node: {e}"))?;
    Ok((a, pair, threads))
}

/// The trace pipeline of a bench run: `opmesh serve`'s defaults.
fn bench_trace_settings(
    endpoint: &str,
    ratio: f64,
    exporters: usize,
) -> crate::telemetry::TraceSettings {
    crate::telemetry::TraceSettings {
        endpoint: endpoint.to_string(),
        protocol: crate::telemetry::Protocol::Grpc,
        service_name: "opmesh-bench".into(),
        sampling_ratio: ratio,
        queue_ops: 65_536,
        exporters,
        batch_spans: 4_096,
        export_interval: Duration::from_millis(500),
        export_timeout: Duration::from_secs(10),
    }
}

/// The trace pipelines of an in-process run: none, or one per embedded node.
fn start_telemetry(plan: &Plan) -> anyhow::Result<Vec<crate::telemetry::Telemetry>> {
    let Some((endpoint, ratio, exporters)) = &plan.traces else {
        return Ok(Vec::new());
    };
    let nodes: &[&str] = if plan.remote {
        &REMOTE_NODES
    } else {
        &["node-1"]
    };
    let settings = crate::telemetry::TelemetrySettings {
        traces: Some(bench_trace_settings(endpoint, *ratio, *exporters)),
        jaeger_ui_url: None,
    };
    nodes
        .iter()
        .map(|node| {
            crate::telemetry::Telemetry::start(&settings, node)
                .context("starting the trace exporter")
        })
        .collect()
}

/// Flushes and stops the trace pipelines; their counters then, summed.
async fn finish_telemetry(
    telemetry: Vec<crate::telemetry::Telemetry>,
) -> anyhow::Result<crate::telemetry::TelemetryStats> {
    tokio::task::spawn_blocking(move || {
        let mut sum = crate::telemetry::TelemetryStats::default();
        for t in telemetry {
            let s = t.shutdown(Duration::from_secs(30));
            sum.spans_exported += s.spans_exported;
            sum.spans_dropped += s.spans_dropped;
            sum.export_failures += s.export_failures;
            sum.traceparent_invalid += s.traceparent_invalid;
            sum.spans_recorded += s.spans_recorded;
            sum.spans_pending += s.spans_pending;
        }
        sum
    })
    .await
    .context("flushing the trace exporters")
}

/// The engine of an embedded node: the defaults, with `--shard-threads`.
fn engine_config(shard_threads: bool) -> opmesh_actors::EngineConfig {
    opmesh_actors::EngineConfig {
        shard_threads,
        ..Default::default()
    }
}

async fn in_process(plan: &Plan, progress: bool) -> anyhow::Result<BenchReport> {
    let telemetry = start_telemetry(plan)?;
    let (node, pair, threads) = if plan.remote {
        remote_pair(&plan.op_type, plan.shard_threads, &telemetry).await?
    } else {
        let mut builder = crate::handlers::register_builtins(Node::builder(), &[])
            .config(engine_config(plan.shard_threads));
        if let Some(t) = telemetry.first() {
            builder = builder.tracing(t.tracing());
        }
        let node = builder
            .start()
            .await
            .context("starting the embedded node")?;
        (node, Vec::new(), Vec::new())
    };
    let owner = plan.remote.then_some(REMOTE_NODES[1]);
    let load = Arc::new(InProcess {
        node: node.clone(),
        op_type: OpType::from(plan.op_type.as_str()),
        payload: plan.payload.clone(),
        owner,
    });
    let peak_source = rss::read().map(|_| {
        if rss::reset_peak() {
            PeakSource::VmhwmReset
        } else {
            PeakSource::VmhwmLifetime
        }
    });
    // Idle is read after the reset: the mark only grows from there, so the peak is never
    // below it (read before, memory other threads freed meanwhile could put the reset
    // mark under the idle reading).
    let idle = peak_source.and(rss::read().map(|m| m.rss));
    let what = "the embedded node";
    let measured = async {
        if plan.warmup > 0 {
            phase(&load, plan, plan.warmup, "warmup", what, progress).await?;
        }
        phase(&load, plan, plan.ops, "run", what, progress).await
    }
    .await;
    // The peak since the reset is at least every resident size seen since, the idle one
    // included: the kernel's counters are per-CPU and read approximately, so a mark read
    // after memory was given back can come out a few pages under the earlier idle reading.
    let peak = rss::peak().map(|p| idle.map_or(p, |i| p.max(i)));
    drop(load);
    node.shutdown(SHUTDOWN_GRACE).await;
    for (c, n) in &pair {
        n.shutdown(SHUTDOWN_GRACE).await;
        c.shutdown().await;
    }
    drop(pair);
    drop(threads);
    let mode = if plan.remote {
        "in-process-remote"
    } else {
        "in-process"
    };
    let measured = measured?;
    let mut report = report(plan, mode, None, &measured);
    report.shard_threads = plan.shard_threads;
    if !telemetry.is_empty() {
        report.sampling = plan.traces.as_ref().map(|(_, r, _)| *r);
        report.trace_export = Some(finish_telemetry(telemetry).await?);
    }
    if let Some(node) = owner {
        report.executed_by = Some(node);
        report.executed_elsewhere = Some(measured.elsewhere);
    }
    report.rss_idle_bytes = idle;
    report.rss_peak_bytes = peak;
    report.rss_peak_source = peak_source;
    report.rss_delta_bytes = idle.zip(peak).map(|(i, p)| p.saturating_sub(i));
    Ok(report)
}

async fn http(
    plan: &Plan,
    base: &reqwest::Url,
    trust: &[CertificateDer<'static>],
    progress: bool,
) -> anyhow::Result<BenchReport> {
    // The client's threads (as many as the drivers), one HTTP client each, so each
    // thread's connections stay its own.
    let threads =
        opmesh_actors::shard::ShardThreads::start_named(plan.drivers(), "opmesh-bench-client")
            .context("starting the client's threads")?;
    let runtimes = threads.handles();
    let clients = (0..runtimes.len())
        .map(|_| http_client(base, plan.concurrency, trust, plan.token.as_ref()))
        .collect::<anyhow::Result<Vec<_>>>()
        .context("building the HTTP client")?;
    let batch = plan.per_request();
    let target = base.as_str().trim_end_matches('/').to_owned();
    let measure = |route: Route, label: &'static str| {
        let clients = clients.clone();
        async move {
            let load = Arc::new(Http::new(
                clients,
                runtimes,
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
        Route::Batch { wait: plan.wait }
    } else {
        Route::Single { wait: plan.wait }
    };
    let measured = measure(route, "run").await?;
    let mut report = report(plan, "http", Some(target), &measured);
    report.baseline = baseline;
    report.accepted_only = !plan.wait;
    report.client_threads = Some(runtimes.len());
    Ok(report)
}

fn load_description(base: &reqwest::Url, route: Route) -> String {
    format!("{base}{}", route.path())
}
