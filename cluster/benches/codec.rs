//! The cost of the wire format: encoding and decoding an operation batch of 1 and of 256
//! small operations, and a heartbeat. Prints nanoseconds per frame; run with
//! `cargo bench -p opmesh-cluster --bench codec`.

use std::hint::black_box;
use std::time::Instant;

use opmesh_cluster::codec::{self, Message, WireOp, WireTrace, LEN_PREFIX};

fn measure(name: &str, n: u64, mut f: impl FnMut()) {
    // Warm up, then time.
    for _ in 0..n / 10 {
        f();
    }
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    println!("{name:<40} {ns:>10.1} ns/frame");
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

fn bench(name: &str, msg: Message, n: u64) {
    // The writer reuses one buffer, as the transport does.
    let mut buf = Vec::with_capacity(64 * 1024);
    measure(&format!("encode {name}"), n, || {
        buf.clear();
        black_box(codec::encode(black_box(&msg), &mut buf).unwrap());
    });
    let len = buf.len();
    buf.clear();
    codec::encode(&msg, &mut buf).unwrap();
    let body = buf[LEN_PREFIX..].to_vec();
    measure(&format!("decode {name} ({len} B)"), n, || {
        black_box(codec::decode(black_box(&body)).unwrap());
    });
}

fn main() {
    bench(
        "OpBatch of 1",
        Message::OpBatch(vec![small_op(1)]),
        2_000_000,
    );
    bench(
        "OpBatch of 256",
        Message::OpBatch((0..256).map(small_op).collect()),
        20_000,
    );
    bench(
        "Ping",
        Message::Ping {
            seq: 1,
            load: 17,
            overloaded: vec![],
            open_breakers: vec![],
        },
        10_000_000,
    );
}
