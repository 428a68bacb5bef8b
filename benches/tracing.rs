//! What tracing costs: the in-process bench untraced, with every operation traced, and
//! with 1 % traced, exporting over OTLP/gRPC to a live receiver that decodes every
//! request (it runs in this process, on the same cores, as a collector beside the node
//! would). The three runs alternate, `--rounds` times, starting each round with a
//! different one (so no setting always runs after another's leftovers), and each round
//! prints the throughput of the traced runs as a share of the untraced one. The bench
//! uses the binary's allocator. The receiver runs on a runtime of its own, so each run
//! also tells the CPU time per operation of opmesh (the rest of the process: node,
//! load generator, span exporter) apart from the receiver's (decoding the spans). A
//! second receiver ("skim") takes the same requests but only counts their spans: runs
//! against it show what tracing costs opmesh itself.
//!
//! Every traced run accounts for its spans: **sent** (the spans the node handed to its
//! trace pipeline), **received** (counted by the receiver itself), **dropped** (the
//! exporter's own count: queue full or export failed) and **unaccounted** (sent −
//! received − dropped: spans nobody can say what became of; negative if the receiver
//! got spans whose export was counted as failed). The pipeline is flushed before the
//! counts are read, and spans it still held then are reported as pending.
//!
//! A closed loop at 100 % runs as fast as it can and drops (and counts) the spans the
//! receiver cannot take in time; so each round also looks for the highest open-loop
//! rate, from 90 % of the untraced throughput down in steps of 10 %, at which no span
//! was lost: the receiver counted every span that was sent (the exporter's drop counter
//! alone is not trusted for this).
//!
//! `cargo bench --bench tracing -- [--rounds N] [--ops N] [--concurrency N] [--exporters N]
//! [--only SETTING]` (`--exporters`: the node's exporter threads, `telemetry.exporters`;
//! 0, the default: one per 4 cores and at least 2; `--only`: run just the closed loop of
//! one setting, `untraced`, `100`, `1` or `skim`, say under a profiler)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opmesh::bench::{run_report, BenchArgs, BenchReport};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Spans received, by either receiver.
#[derive(Clone, Default)]
struct Counting(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Counting {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// The second receiver: takes the same gRPC requests but only walks the protobuf to
/// count the spans, without building them. What it costs is close to nothing, so a run
/// against it shows opmesh's own cost of tracing (recording, encoding, sending).
#[derive(Clone)]
struct Skim(Counting);

impl tonic::server::NamedService for Skim {
    const NAME: &'static str = "opentelemetry.proto.collector.trace.v1.TraceService";
}

impl<B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for Skim
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let counted = self.0.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(RawBytes);
            Ok(grpc.unary(SkimExport(counted), req).await)
        })
    }
}

struct SkimExport(Counting);

impl tonic::server::UnaryService<bytes::Bytes> for SkimExport {
    type Response = bytes::Bytes;
    type Future = tonic::codegen::BoxFuture<tonic::Response<bytes::Bytes>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<bytes::Bytes>) -> Self::Future {
        let spans = count_spans(&request.into_inner())
            .ok_or_else(|| tonic::Status::invalid_argument("not an ExportTraceServiceRequest"));
        let counted = self.0.clone();
        Box::pin(async move {
            counted.0.fetch_add(spans?, Ordering::Relaxed);
            // An empty ExportTraceServiceResponse: everything accepted.
            Ok(tonic::Response::new(bytes::Bytes::new()))
        })
    }
}

/// A message's bytes in and out, as they are.
#[derive(Clone, Copy, Default)]
struct RawBytes;

impl tonic::codec::Codec for RawBytes {
    type Encode = bytes::Bytes;
    type Decode = bytes::Bytes;
    type Encoder = RawBytes;
    type Decoder = RawBytes;
    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }
    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put(dst, item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = bytes::Bytes;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<bytes::Bytes>, tonic::Status> {
        use bytes::Buf;
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// The length-delimited fields `field` of a protobuf message, walked without decoding
/// them (`None`: not protobuf).
fn fields(mut msg: &[u8], field: u64) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !msg.is_empty() {
        let key = prost::encoding::decode_varint(&mut msg).ok()?;
        match key & 7 {
            0 => {
                prost::encoding::decode_varint(&mut msg).ok()?;
            }
            1 => msg = msg.get(8..)?,
            5 => msg = msg.get(4..)?,
            2 => {
                let len = usize::try_from(prost::encoding::decode_varint(&mut msg).ok()?).ok()?;
                let (body, rest) = (msg.get(..len)?, msg.get(len..)?);
                if key >> 3 == field {
                    out.push(body);
                }
                msg = rest;
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Spans in an ExportTraceServiceRequest: resource_spans (1) → scope_spans (2) → spans (2).
fn count_spans(request: &[u8]) -> Option<u64> {
    let mut n = 0;
    for resource in fields(request, 1)? {
        for scope in fields(resource, 2)? {
            n += fields(scope, 2)?.len() as u64;
        }
    }
    Some(n)
}

/// The value after `name` on the command line.
fn arg_text(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

fn args(ops: u64, concurrency: usize, traces: Option<(&str, f64)>, rate: Option<f64>) -> BenchArgs {
    BenchArgs {
        in_process: true,
        target: None,
        token: None,
        cacert: None,
        ops,
        concurrency,
        op_type: "echo".into(),
        payload_bytes: 64,
        payload: None,
        rate,
        batch: None,
        no_wait: false,
        baseline: false,
        warmup: None,
        json: true,
        remote: false,
        shard_threads: false,
        client_threads: None,
        otlp_endpoint: traces.map(|(e, _)| e.to_string()),
        sampling: traces.map_or(1.0, |(_, r)| r),
        exporters: arg("--exporters", 0) as usize,
        max_error_ratio: 0.0,
    }
}

/// CPU seconds (user + system) from a `/proc/.../stat` line: fields 14 and 15, in
/// clock ticks of 1/100 s (Linux's USER_HZ).
fn cpu_seconds(stat_path: &str) -> f64 {
    let text = std::fs::read_to_string(stat_path).unwrap_or_default();
    // The command name may hold spaces: count fields after its closing parenthesis.
    let rest = text.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // After ")": state is field 3, so utime (14) and stime (15) are at 11 and 12.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// CPU seconds of this process's threads named `name`.
fn threads_cpu(name: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .map(|t| cpu_seconds(&t.path().join("stat").to_string_lossy()))
        .sum()
}

/// The thread name of the receiver's runtime.
const RECEIVER: &str = "otlp-receiver";

/// The receivers, on a runtime of their own (two workers, as a collector process beside
/// the node would have), so their CPU time can be told apart: one decodes every request
/// (opentelemetry-proto's generated server), the other only counts spans ([`Skim`]).
/// Returns their endpoints.
fn start_receivers(decoded: Counting, skimmed: Counting) -> (String, String) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(RECEIVER.into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name(RECEIVER)
                .enable_all()
                .build()
                .expect("receiver runtime");
            rt.block_on(async move {
                let decode = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let skim = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send((
                    format!("http://{}", decode.local_addr().unwrap()),
                    format!("http://{}", skim.local_addr().unwrap()),
                ))
                .unwrap();
                tokio::spawn(
                    tonic::transport::Server::builder()
                        .add_service(Skim(skimmed))
                        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(skim)),
                );
                tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(decoded))
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(decode))
                    .await
                    .unwrap();
            });
        })
        .expect("receiver thread");
    rx.recv().expect("the receivers started")
}

/// One run's figures.
struct Run {
    report: BenchReport,
    /// Spans the receiver counted during the run.
    received: u64,
    /// CPU seconds of the whole process, and of the receiver's thread, during the run.
    cpu: f64,
    receiver_cpu: f64,
}

/// What a run traces, and to which receiver.
#[derive(Clone, Copy)]
struct Setting {
    label: &'static str,
    /// What `--only` calls it.
    name: &'static str,
    /// Sampling ratio; `None`: untraced.
    ratio: Option<f64>,
    /// Whether the receiver only counts spans ([`Skim`]) instead of decoding them.
    skim: bool,
}

const SETTINGS: [Setting; 4] = [
    Setting {
        label: "untraced",
        name: "untraced",
        ratio: None,
        skim: false,
    },
    Setting {
        label: "100 %",
        name: "100",
        ratio: Some(1.0),
        skim: false,
    },
    Setting {
        label: "1 %",
        name: "1",
        ratio: Some(0.01),
        skim: false,
    },
    Setting {
        label: "100 % skim",
        name: "skim",
        ratio: Some(1.0),
        skim: true,
    },
];

struct Receivers {
    decoded: (String, Counting),
    skimmed: (String, Counting),
}

impl Receivers {
    fn pick(&self, skim: bool) -> &(String, Counting) {
        if skim {
            &self.skimmed
        } else {
            &self.decoded
        }
    }
}

impl Run {
    /// Spans sent: handed by the node to its trace pipeline.
    fn sent(&self) -> u64 {
        self.report
            .trace_export
            .as_ref()
            .map_or(0, |t| t.spans_recorded)
    }

    /// Sent − received − dropped: spans that neither arrived nor were counted dropped.
    fn unaccounted(&self) -> i128 {
        let dropped = self
            .report
            .trace_export
            .as_ref()
            .map_or(0, |t| t.spans_dropped);
        i128::from(self.sent()) - i128::from(self.received) - i128::from(dropped)
    }

    /// Whether every span that was sent arrived at the receiver, by its own count.
    fn none_lost(&self) -> bool {
        self.report.trace_export.is_some() && self.received == self.sent()
    }
}

fn show(label: &str, run: &Run, base: Option<f64>) {
    let r = &run.report;
    let share = base.map_or(String::new(), |b| {
        format!(" · {:.0} % of untraced", 100.0 * r.ops_per_sec / b)
    });
    let export = r.trace_export.as_ref().map_or(String::new(), |t| {
        format!(
            " · spans sent {} received {} dropped {} unaccounted {}{}",
            run.sent(),
            run.received,
            t.spans_dropped,
            run.unaccounted(),
            if t.spans_pending > 0 {
                format!(" (still pending at shutdown {})", t.spans_pending)
            } else {
                String::new()
            }
        )
    });
    let per_op = 1e6 / r.ops as f64;
    println!(
        "  {label:<14} {:>9.0} ops/s  p50 {:>5} µs  p99 {:>6} µs · cpu µs/op opmesh {:.2} receiver {:.2}{share}{export}",
        r.ops_per_sec,
        r.p50_us,
        r.p99_us,
        (run.cpu - run.receiver_cpu) * per_op,
        run.receiver_cpu * per_op,
    );
}

fn main() {
    let rounds = arg("--rounds", 3);
    let ops = arg("--ops", 1_000_000);
    let concurrency = arg("--concurrency", 1024) as usize;
    let only = arg_text("--only").map(|name| {
        SETTINGS
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("--only {name}: not one of untraced, 100, 1, skim"))
    });
    let (decoded, skimmed) = (Counting::default(), Counting::default());
    let (decode_at, skim_at) = start_receivers(decoded.clone(), skimmed.clone());
    let receivers = Receivers {
        decoded: (decode_at, decoded),
        skimmed: (skim_at, skimmed),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        println!("tracing cost · {ops} echo ops · OTLP/gRPC to receivers on their own runtime (2 threads) in this process");
        println!("  receiver: decodes every request; skim: only counts the spans (opmesh's own cost)");
        println!("  cpu µs/op: opmesh = the process but the receivers' threads");
        println!("  spans: sent = handed to the pipeline, received = counted by the receiver, dropped = the exporter's count, unaccounted = sent - received - dropped");
        if let Some(i) = only {
            let (endpoint, counted) = receivers.pick(SETTINGS[i].skim);
            let traces = SETTINGS[i].ratio.map(|ratio| (endpoint.as_str(), ratio));
            for round in 1..=rounds {
                let run = measure(counted, &args(ops, concurrency, traces, None)).await;
                show(&format!("{} ({round})", SETTINGS[i].label), &run, None);
            }
            return;
        }
        for round in 1..=rounds {
            println!("round {round} · closed loop, {concurrency} in flight");
            let mut results: [Option<Run>; SETTINGS.len()] = Default::default();
            for k in 0..SETTINGS.len() {
                let i = (k + round as usize - 1) % SETTINGS.len();
                let (endpoint, counted) = receivers.pick(SETTINGS[i].skim);
                let traces = SETTINGS[i].ratio.map(|ratio| (endpoint.as_str(), ratio));
                results[i] = Some(measure(counted, &args(ops, concurrency, traces, None)).await);
            }
            let base = results[0].as_ref().map_or(0.0, |r| r.report.ops_per_sec);
            for (setting, run) in SETTINGS.iter().zip(&results) {
                let run = run.as_ref().expect("every setting ran");
                show(setting.label, run, setting.ratio.map(|_| base));
            }
            // A closed loop at 100 % runs as fast as it can and drops the spans the
            // receiver cannot take. The figure that counts is the highest arrival rate
            // at which every span of every operation arrived: tried from 90 % of the
            // untraced throughput down, in steps of 10 %.
            for skim in [false, true] {
                let (endpoint, counted) = receivers.pick(skim);
                let to = if skim { "skim" } else { "receiver" };
                println!("  100 % to the {to}, open loop: the highest rate with every span delivered");
                let mut sustained = None;
                for tenths in (1..=9).rev() {
                    let rate = base * f64::from(tenths) / 10.0;
                    let traces = Some((endpoint.as_str(), 1.0));
                    let run = measure(counted, &args(ops, 4096, traces, Some(rate))).await;
                    let kept_up = run.report.ops_per_sec >= 0.97 * rate;
                    show(&format!("rate {tenths}0 %"), &run, Some(base));
                    if run.none_lost() && kept_up {
                        sustained = Some((tenths, run.report.ops_per_sec));
                        break;
                    }
                }
                match sustained {
                    Some((tenths, r)) => println!(
                        "  100 % to the {to} sustained: {r:.0} ops/s with no span lost = {tenths}0 % of untraced"
                    ),
                    None => println!("  100 % to the {to}: spans were lost even at 10 % of untraced"),
                }
            }
        }
    });
}

/// Runs the in-process bench once, with the CPU time it took.
async fn measure(received: &Counting, args: &BenchArgs) -> Run {
    let before = received.0.load(Ordering::Relaxed);
    let (cpu0, receiver0) = (cpu_seconds("/proc/self/stat"), threads_cpu(RECEIVER));
    let report = run_report(args).await.expect("the bench ran");
    if let Err(e) = report.check() {
        panic!("the run does not count: {e:#}");
    }
    Run {
        report,
        received: received.0.load(Ordering::Relaxed) - before,
        cpu: cpu_seconds("/proc/self/stat") - cpu0,
        receiver_cpu: threads_cpu(RECEIVER) - receiver0,
    }
}
