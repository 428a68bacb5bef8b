//! What the transport's tests share: an [`Inbound`] that records, transports on
//! loopback, waiting with a deadline, and a hand-driven dialer ([`Raw`]) that sends what a
//! transport never would.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hmac::Mac;
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::handshake::{proof, read_frame};
use super::{Inbound, Transport};
use crate::codec::{self, Frame, Hello, Message, WireOp};
use crate::config::ClusterConfig;

pub const SECRET: &[u8] = b"cluster secret";
pub const WAIT: Duration = Duration::from_secs(10);

/// Records what a transport delivers.
#[derive(Default)]
pub struct Collect {
    pub messages: Mutex<Vec<(String, Message)>>,
    pub links: Mutex<Vec<(String, bool)>>,
}

impl Inbound for Collect {
    fn on_message(&self, from: &str, msg: Message) {
        self.messages.lock().push((from.to_string(), msg));
    }

    fn on_link(&self, peer: &str, up: bool) {
        self.links.lock().push((peer.to_string(), up));
    }
}

impl Collect {
    pub fn count(&self) -> usize {
        self.messages.lock().len()
    }

    pub fn pings_from(&self, from: &str) -> Vec<u64> {
        self.messages
            .lock()
            .iter()
            .filter(|(f, _)| f == from)
            .filter_map(|(_, m)| match m {
                Message::Ping { seq, .. } | Message::Pong { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect()
    }
}

/// A node on loopback, any port, in cluster `test`, with the default link settings.
pub fn config(node: &str) -> ClusterConfig {
    let mut c = ClusterConfig::new(node, SECRET);
    c.cluster_id = "test".into();
    c
}

pub async fn start(node: &str) -> (Transport, Arc<Collect>) {
    start_with(config(node)).await
}

pub async fn start_with(config: ClusterConfig) -> (Transport, Arc<Collect>) {
    let inbound = Arc::new(Collect::default());
    let t = Transport::start(&config, Arc::clone(&inbound) as Arc<dyn Inbound>)
        .await
        .unwrap();
    (t, inbound)
}

/// Waits until `cond` holds, failing the test after [`WAIT`].
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Fails the test if `fut` does not finish within [`WAIT`].
pub async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

pub fn ping(seq: u64) -> Message {
    Message::Ping { seq, load: 0 }
}

pub fn small_op(id: u128) -> WireOp {
    WireOp {
        id,
        op_type: "echo".into(),
        key: None,
        idempotency_key: None,
        payload: b"{}".to_vec(),
        metadata: vec![],
        priority: 0,
        remaining_us: None,
        trace: None,
        owner: None,
    }
}

/// A hand-driven dialer, to send what a transport never would.
pub struct Raw {
    stream: TcpStream,
    rbuf: BytesMut,
    nonce: [u8; 32],
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut rbuf = BytesMut::new();
        let Some(Frame::Challenge { nonce }) =
            bounded("challenge", read_frame(&mut stream, &mut rbuf, 1024))
                .await
                .unwrap()
        else {
            panic!("no challenge");
        };
        Raw {
            stream,
            rbuf,
            nonce,
        }
    }

    pub fn hello(&self, node: &str, version: u16, cluster_id: &str, secret: &[u8]) -> Frame {
        let mut hello = Hello {
            version,
            cluster_id: cluster_id.into(),
            node: node.into(),
            cluster_addr: "127.0.0.1:1".into(),
            proof: [0; 32],
        };
        hello.proof = proof(secret, &self.nonce, &hello)
            .finalize()
            .into_bytes()
            .into();
        Frame::Hello(hello)
    }

    pub async fn send(&mut self, frame: &Frame) {
        let mut out = Vec::new();
        codec::encode(frame, &mut out).unwrap();
        self.write(&out).await;
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        // The acceptor may already have closed; what it read is what matters.
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next frame, `None` once the acceptor closed the connection.
    pub async fn next(&mut self) -> Option<Frame> {
        bounded(
            "a frame or the close",
            read_frame(&mut self.stream, &mut self.rbuf, 1 << 20),
        )
        .await
        .ok()
        .flatten()
    }

    pub async fn expect_refused(&mut self) -> String {
        match self.next().await {
            Some(Frame::Refused { reason }) => {
                assert!(self.next().await.is_none(), "closed after refusing");
                reason
            }
            other => panic!("expected Refused, got {other:?}"),
        }
    }

    pub async fn expect_closed(&mut self) {
        loop {
            match self.next().await {
                None => return,
                Some(Frame::Refused { .. }) => continue,
                Some(other) => panic!("expected the connection to close, got {other:?}"),
            }
        }
    }
}

/// `good` still links to `to` and delivers.
pub async fn still_serves(to: &Transport, to_inbound: &Collect, good: &Transport, name: &str) {
    good.add_peer("a", &to.local_addr().to_string());
    until("the good peer's link", || good.is_connected("a")).await;
    good.send("a", ping(77)).unwrap();
    until("the good peer's ping", || {
        to_inbound.pings_from(name) == [77]
    })
    .await;
}
