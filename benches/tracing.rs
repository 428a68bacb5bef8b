//! What tracing costs: the in-process bench untraced, with every operation traced, and
//! with 1 % traced, exporting over OTLP/gRPC to a live receiver that decodes every
//! request (it runs in this process, on the same cores, as a collector beside the node
//! would). The three runs alternate, `--rounds` times, and each round prints the
//! throughput of the traced runs as a share of the untraced one.
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

fn args(ops: u64, concurrency: usize, traces: Option<(&str, f64)>) -> BenchArgs {
    BenchArgs {
        in_process: true,
        target: None,
        ops,
        concurrency,
        op_type: "echo".into(),
        payload_bytes: 64,
        payload: None,
        rate: None,
        batch: None,
        baseline: false,
        warmup: None,
        json: true,
        remote: false,
        otlp_endpoint: traces.map(|(e, _)| e.to_string()),
        sampling: traces.map_or(1.0, |(_, r)| r),
    }
}

fn main() {
    let rounds = arg("--rounds", 3);
    let ops = arg("--ops", 1_000_000);
    let concurrency = arg("--concurrency", 1024) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let received = Counting::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(received.clone()))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        println!("tracing cost · {ops} echo ops · concurrency {concurrency} · receiver {endpoint}");
        let show = |label: &str, r: &BenchReport, base: Option<f64>, spans: u64| {
            let share = base.map_or(String::new(), |b| {
                format!(" · {:.0} % of untraced", 100.0 * r.ops_per_sec / b)
            });
            let export = r.trace_export.as_ref().map_or(String::new(), |t| {
                format!(
                    " · spans exported {} dropped {} · received {spans}",
                    t.spans_exported, t.spans_dropped
                )
            });
            println!(
                "  {label:<10} {:>10.0} ops/s  p50 {:>5} µs  p99 {:>6} µs{share}{export}",
                r.ops_per_sec, r.p50_us, r.p99_us
            );
        };
        for round in 1..=rounds {
            println!("round {round}");
            let off = run_report(&args(ops, concurrency, None)).await.unwrap();
            show("untraced", &off, None, 0);
            for ratio in [1.0, 0.01] {
                let before = received.0.load(Ordering::Relaxed);
                let r = run_report(&args(ops, concurrency, Some((&endpoint, ratio))))
                    .await
                    .unwrap();
                let spans = received.0.load(Ordering::Relaxed) - before;
                let label = if ratio == 1.0 { "100 %" } else { "1 %" };
                show(label, &r, Some(off.ops_per_sec), spans);
            }
        }
    });
}
