//! What tracing costs: the in-process bench untraced, with every operation traced, and
//! with 1 % traced, exporting over OTLP/gRPC to a live receiver that decodes every
//! request (it runs in this process, on the same cores, as a collector beside the node
//! would). The three runs alternate, `--rounds` times, starting each round with a
//! different one (so no setting always runs after another's leftovers), and each round
//! prints the throughput of the traced runs as a share of the untraced one. The bench
//! uses the binary's allocator. The receiver runs on a thread of its own, so each run
//! also tells the CPU time per operation of opmesh (the rest of the process: node,
//! load generator, span exporter) apart from the receiver's (decoding the spans).
//!
//! A closed loop at 100 % runs as fast as it can and drops (and counts) the spans the
//! receiver cannot take in time; so each round also looks for the highest open-loop
//! rate, from 90 % of the untraced throughput down in steps of 10 %, at which every
//! span of every operation reached the receiver.
//!
//! `cargo bench --bench tracing -- [--rounds N] [--ops N] [--concurrency N]`

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
        ops,
        concurrency,
        op_type: "echo".into(),
        payload_bytes: 64,
        payload: None,
        rate,
        batch: None,
        baseline: false,
        warmup: None,
        json: true,
        remote: false,
        otlp_endpoint: traces.map(|(e, _)| e.to_string()),
        sampling: traces.map_or(1.0, |(_, r)| r),
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

/// The receiver, on a runtime of its own (two workers, as a collector process beside
/// the node would have), so its CPU time can be told apart. Returns its endpoint.
fn start_receiver(received: Counting) -> String {
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
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(format!("http://{}", listener.local_addr().unwrap()))
                    .unwrap();
                tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(received))
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                    .await
                    .unwrap();
            });
        })
        .expect("receiver thread");
    rx.recv().expect("the receiver started")
}

/// One run's figures.
struct Run {
    report: BenchReport,
    received: u64,
    /// CPU seconds of the whole process, and of the receiver's thread, during the run.
    cpu: f64,
    receiver_cpu: f64,
}

fn main() {
    let rounds = arg("--rounds", 3);
    let ops = arg("--ops", 1_000_000);
    let concurrency = arg("--concurrency", 1024) as usize;
    let received = Counting::default();
    let endpoint = start_receiver(received.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        println!("tracing cost · {ops} echo ops · concurrency {concurrency} · receiver {endpoint} (own runtime)");
        println!("  cpu µs/op: opmesh = the whole process but the receiver's thread; receiver = decoding the spans");
        let show = |label: &str, run: &Run, base: Option<f64>| {
            let r = &run.report;
            let share = base.map_or(String::new(), |b| {
                format!(" · {:.0} % of untraced", 100.0 * r.ops_per_sec / b)
            });
            let export = r.trace_export.as_ref().map_or(String::new(), |t| {
                format!(
                    " · spans exported {} dropped {} · received {}",
                    t.spans_exported, t.spans_dropped, run.received
                )
            });
            let per_op = 1e6 / r.ops as f64;
            println!(
                "  {label:<10} {:>10.0} ops/s  p50 {:>5} µs  p99 {:>6} µs · cpu µs/op opmesh {:.2} receiver {:.2}{share}{export}",
                r.ops_per_sec,
                r.p50_us,
                r.p99_us,
                (run.cpu - run.receiver_cpu) * per_op,
                run.receiver_cpu * per_op,
            );
        };
        let settings: [Option<f64>; 3] = [None, Some(1.0), Some(0.01)];
        for round in 1..=rounds {
            println!("round {round} · closed loop, {concurrency} in flight");
            let mut results: [Option<Run>; 3] = [None, None, None];
            for k in 0..settings.len() {
                let i = (k + round as usize - 1) % settings.len();
                let traces = settings[i].map(|ratio| (endpoint.as_str(), ratio));
                let run = measure(&received, &args(ops, concurrency, traces, None)).await;
                results[i] = Some(run);
            }
            let base = results[0].as_ref().map_or(0.0, |r| r.report.ops_per_sec);
            for (i, result) in results.iter().enumerate() {
                let run = result.as_ref().expect("every setting ran");
                let label = match settings[i] {
                    None => "untraced",
                    Some(1.0) => "100 %",
                    Some(_) => "1 %",
                };
                show(label, run, settings[i].map(|_| base));
            }
            // A closed loop at 100 % runs as fast as it can and drops the spans the
            // receiver cannot take. The figure that counts is the highest arrival rate
            // at which every span of every operation arrived: tried from 90 % of the
            // untraced throughput down, in steps of 10 %.
            println!("  100 %, open loop: the highest rate with every span delivered");
            let mut sustained = None;
            for tenths in (1..=9).rev() {
                let rate = base * f64::from(tenths) / 10.0;
                let traces = Some((endpoint.as_str(), 1.0));
                let run = measure(&received, &args(ops, 4096, traces, Some(rate))).await;
                let dropped = run.report.trace_export.as_ref().map_or(0, |t| t.spans_dropped);
                let kept_up = run.report.ops_per_sec >= 0.97 * rate;
                show(&format!("rate {tenths}0 %"), &run, Some(base));
                if dropped == 0 && kept_up {
                    sustained = Some((tenths, run.report.ops_per_sec));
                    break;
                }
            }
            match sustained {
                Some((tenths, r)) => println!(
                    "  100 % sustained: {r:.0} ops/s with no span lost = {tenths}0 % of untraced"
                ),
                None => println!("  100 % sustained: spans were lost even at 10 % of untraced"),
            }
        }
    });
}

/// Runs the in-process bench once, with the CPU time it took.
async fn measure(received: &Counting, args: &BenchArgs) -> Run {
    let before = received.0.load(Ordering::Relaxed);
    let (cpu0, receiver0) = (cpu_seconds("/proc/self/stat"), threads_cpu(RECEIVER));
    let report = run_report(args).await.expect("the bench ran");
    Run {
        report,
        received: received.0.load(Ordering::Relaxed) - before,
        cpu: cpu_seconds("/proc/self/stat") - cpu0,
        receiver_cpu: threads_cpu(RECEIVER) - receiver0,
    }
}
