//! What the transport's tests share: an [`Inbound`] that records, transports on
//! loopback, waiting with a deadline, a hand-driven dialer ([`Raw`]) that sends what a
//! transport never would, and a [`Proxy`] that forwards a link and tampers with it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hmac::Mac;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::handshake::{acceptor_proof, dialer_proof, link_key, read_frame, Transcript};
use super::record::Sealer;
use super::{Inbound, Transport};
use crate::codec::{self, Frame, Hello, Message, Welcome, WireOp, LEN_PREFIX, PROTOCOL_VERSION};
use crate::config::ClusterConfig;
use crate::secret::Secret;

pub const SECRET: &[u8] = b"cluster secret";
pub const WAIT: Duration = Duration::from_secs(10);

/// Records what a transport delivers.
#[derive(Default)]
pub struct Collect {
    pub messages: Mutex<Vec<(String, Message)>>,
    pub links: Mutex<Vec<(String, bool)>>,
    /// The thread each message was handed over on, in order.
    pub threads: Mutex<Vec<Option<String>>>,
}

impl Inbound for Collect {
    fn on_message(&self, from: &str, msg: Message) {
        let thread = std::thread::current().name().map(str::to_owned);
        self.messages.lock().push((from.to_string(), msg));
        self.threads.lock().push(thread);
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

/// A transport whose links run on `runtimes` (one lane per runtime).
pub async fn start_on(
    node: &str,
    runtimes: Vec<tokio::runtime::Handle>,
) -> (Transport, Arc<Collect>) {
    let mut c = config(node);
    c.link_runtimes = runtimes;
    start_with(c).await
}

/// A current-thread runtime on a thread named `name`, running until the returned sender
/// is dropped.
pub fn runtime_thread(name: &str) -> (tokio::runtime::Handle, tokio::sync::oneshot::Sender<()>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            tx.send(rt.handle().clone()).unwrap();
            rt.block_on(async {
                let _ = stopped.await;
            });
        })
        .unwrap();
    (rx.recv().unwrap(), stop)
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
    Message::Ping {
        seq,
        load: 0,
        overloaded: vec![],
        open_breakers: vec![],
    }
}

pub fn small_op(id: u128) -> WireOp {
    WireOp {
        id,
        op_type: "echo".into(),
        key: None,
        idempotency_key: None,
        payload: bytes::Bytes::from_static(b"{}"),
        metadata: Default::default(),
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
    /// The acceptor's challenge.
    pub nonce: [u8; 32],
    /// What the last [`Raw::send_hello`] sent, to check the `Welcome` against.
    sent: Option<(Hello, [u8; 32], Secret)>,
    sealer: Option<Sealer>,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let mut raw = Raw::connect_only(addr).await;
        let Some(Frame::Challenge { nonce }) = raw.next().await else {
            panic!("no challenge");
        };
        raw.nonce = nonce;
        raw
    }

    /// Connects and reads nothing.
    pub async fn connect_only(addr: SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            rbuf: BytesMut::new(),
            nonce: [0; 32],
            sent: None,
            sealer: None,
        }
    }

    /// A `Hello` to the challenge, proven with `secret`, and the dialer nonce after it.
    pub async fn send_hello(&mut self, node: &str, version: u16, cluster_id: &str, secret: &[u8]) {
        let dialer_nonce: [u8; 32] = rand::random();
        let hello = signed_hello(
            node,
            version,
            cluster_id,
            secret,
            &self.nonce,
            &dialer_nonce,
        );
        self.send(&Frame::Hello(hello.clone())).await;
        self.send(&Frame::DialerNonce {
            nonce: dialer_nonce,
            lane: 0,
        })
        .await;
        self.sent = Some((hello, dialer_nonce, Secret::from(secret)));
    }

    /// Reads the `Welcome`, checks its proof and sends record 0: the link is open.
    pub async fn finish(&mut self) -> Welcome {
        let Some(Frame::Welcome(welcome)) = self.next().await else {
            panic!("expected Welcome");
        };
        let (hello, dialer_nonce, secret) = self.sent.take().expect("a Hello was sent");
        let t = Transcript {
            hello: &hello,
            acceptor_nonce: &self.nonce,
            dialer_nonce: &dialer_nonce,
            lane: 0,
        };
        acceptor_proof(&secret, &t, &welcome.node)
            .verify_slice(&welcome.proof)
            .expect("the acceptor's proof");
        self.sealer = Some(Sealer::new(link_key(&secret, &t, &welcome.node)));
        self.send_record(&[]).await;
        welcome
    }

    /// The whole handshake as `node`, with the test secret.
    pub async fn open(addr: SocketAddr, node: &str) -> Raw {
        let mut raw = Raw::connect(addr).await;
        raw.send_hello(node, PROTOCOL_VERSION, "test", SECRET).await;
        raw.finish().await;
        raw
    }

    /// One sealed record holding `messages`.
    pub async fn send_record(&mut self, messages: &[Message]) {
        let mut buf = Vec::new();
        Sealer::begin(&mut buf);
        for m in messages {
            codec::encode(m, &mut buf).unwrap();
        }
        self.sealer
            .as_mut()
            .expect("the handshake is done")
            .seal(&mut buf);
        self.write(&buf).await;
    }

    /// One sealed record holding these bytes as they are.
    pub async fn send_sealed(&mut self, bytes: &[u8]) {
        let mut buf = Vec::new();
        Sealer::begin(&mut buf);
        buf.extend_from_slice(bytes);
        self.sealer.as_mut().unwrap().seal(&mut buf);
        self.write(&buf).await;
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

/// A `Hello` from `node` proven with `secret` over both nonces.
pub fn signed_hello(
    node: &str,
    version: u16,
    cluster_id: &str,
    secret: &[u8],
    acceptor_nonce: &[u8; 32],
    dialer_nonce: &[u8; 32],
) -> Hello {
    let mut hello = Hello {
        version,
        cluster_id: cluster_id.into(),
        node: node.into(),
        cluster_addr: "127.0.0.1:1".into(),
        proof: [0; 32],
    };
    let t = Transcript {
        hello: &hello,
        acceptor_nonce,
        dialer_nonce,
        lane: 0,
    };
    let proof = dialer_proof(&Secret::from(secret), &t)
        .finalize()
        .into_bytes()
        .into();
    hello.proof = proof;
    hello
}

/// What a [`Proxy`] does to the dialer's side of the first connection it forwards.
/// Units are the length-prefixed pieces the dialer sends: 0 `Hello`, 1 `DialerNonce`,
/// 2 record 0, then one per record.
#[derive(Clone, Copy, Debug)]
pub enum Tamper {
    /// Flips the last byte of unit `n` (inside its tag, or its frames if it has none).
    Flip(usize),
    /// Sends unit `n` twice.
    Replay(usize),
}

/// Forwards connections to `target` both ways, tampering with the first one.
pub struct Proxy {
    pub addr: SocketAddr,
}

impl Proxy {
    pub async fn start(target: SocketAddr, tamper: Option<Tamper>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let mut tamper = tamper;
            while let Ok((dialer, _)) = listener.accept().await {
                let Ok(acceptor) = TcpStream::connect(target).await else {
                    continue;
                };
                tokio::spawn(forward(dialer, acceptor, tamper.take()));
            }
        });
        Proxy { addr }
    }
}

async fn forward(dialer: TcpStream, acceptor: TcpStream, tamper: Option<Tamper>) {
    let (mut dr, mut dw) = dialer.into_split();
    let (mut ar, mut aw) = acceptor.into_split();
    let back = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut ar, &mut dw).await;
    });
    let mut buf = BytesMut::new();
    let mut unit = 0;
    'read: while dr.read_buf(&mut buf).await.is_ok_and(|n| n > 0) {
        while let Some(prefix) = buf.first_chunk::<LEN_PREFIX>() {
            let len = LEN_PREFIX + u32::from_le_bytes(*prefix) as usize;
            if buf.len() < len {
                break;
            }
            let mut piece = buf.split_to(len).to_vec();
            let copies = match tamper {
                Some(Tamper::Flip(n)) if n == unit => {
                    *piece.last_mut().unwrap() ^= 0x01;
                    1
                }
                Some(Tamper::Replay(n)) if n == unit => 2,
                _ => 1,
            };
            for _ in 0..copies {
                if aw.write_all(&piece).await.is_err() {
                    break 'read;
                }
            }
            unit += 1;
        }
    }
    drop(aw);
    let _ = back.await;
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
