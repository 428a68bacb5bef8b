//! Throughput of one link over loopback: two transports in one process, one sending
//! operation batches as fast as the other takes them. Prints batches, operations and
//! bytes per second; run with `cargo bench -p opmesh-cluster --bench link`.
//!
//! The sender keeps at most `WINDOW` batches in flight (sent, not yet delivered), as a
//! forwarder bounded by its operations in flight would. Each send builds its batch (a
//! clone of 64 small operations), as a forwarder does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opmesh_cluster::codec::{Message, WireOp, WireTrace};
use opmesh_cluster::transport::{Inbound, Transport};
use opmesh_cluster::ClusterConfig;
use tokio::sync::Notify;

const WINDOW: u64 = 512;

#[derive(Default)]
struct Count {
    batches: AtomicU64,
    ops: AtomicU64,
    /// A batch arrived: the sender, waiting on a full window, may go on.
    progress: Notify,
}

impl Inbound for Count {
    fn on_message(&self, _from: &str, msg: Message) {
        if let Message::OpBatch(ops) = msg {
            self.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
            self.batches.fetch_add(1, Ordering::Release);
            self.progress.notify_one();
        }
    }
}

fn small_op(id: u128) -> WireOp {
    WireOp {
        id,
        op_type: "echo".into(),
        key: Some(format!("key-{id}")),
        idempotency_key: None,
        payload: bytes::Bytes::from_static(br#"{"n":42}"#),
        metadata: Default::default(),
        priority: 0,
        remaining_us: Some(30_000_000),
        trace: Some(WireTrace {
            trace_id: id,
            span_id: 1,
            flags: 1,
        }),
        owner: None,
    }
}

fn config(node: &str) -> ClusterConfig {
    let mut c = ClusterConfig::new(node, b"secret");
    c.cluster_id = "bench".into();
    c
}

async fn run(ops_per_batch: usize, batches: u64) {
    let count = Arc::new(Count::default());
    let a = Transport::start(&config("a"), Arc::new(Count::default()))
        .await
        .unwrap();
    let b = Transport::start(&config("b"), Arc::clone(&count) as Arc<dyn Inbound>)
        .await
        .unwrap();
    a.add_peer("b", &b.local_addr().to_string());
    assert!(
        a.wait_connected("b", Duration::from_secs(10)).await,
        "no link"
    );
    let template: Vec<WireOp> = (0..ops_per_batch as u128).map(small_op).collect();
    let start = Instant::now();
    for sent in 0..batches {
        while sent - count.batches.load(Ordering::Acquire) >= WINDOW {
            count.progress.notified().await;
        }
        a.send("b", Message::OpBatch(template.clone())).unwrap();
    }
    while count.batches.load(Ordering::Acquire) < batches {
        count.progress.notified().await;
    }
    let secs = start.elapsed().as_secs_f64();
    let link = &a.links()[0];
    println!(
        "OpBatch of {ops_per_batch:>3}: {:>10.0} batches/s {:>11.0} ops/s {:>7.1} MB/s ({} batches, {:.2} s)",
        batches as f64 / secs,
        count.ops.load(Ordering::Relaxed) as f64 / secs,
        link.bytes_sent as f64 / secs / 1e6,
        batches,
        secs,
    );
    a.shutdown().await;
    b.shutdown().await;
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        run(64, 5_000).await; // warm-up
        run(64, 100_000).await;
        run(1, 1_000_000).await;
    });
}
