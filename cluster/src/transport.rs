//! Links between nodes: length-prefixed [`codec`] frames over TCP.
//!
//! Each node dials each peer it knows and sends only on that outbound connection; it only
//! reads from the connections others dialed to it. Two connections per pair of nodes, one
//! per direction: no arbitration of who dials whom, and a writer never shares its socket
//! with a reader.
//!
//! An operation forwarded to another node is [`Transport::send`]: the message joins the
//! peer's outbox and the caller goes on. The peer's writer task takes everything waiting,
//! encodes it into one reused buffer and writes it with one `write_all`, so under load one
//! system call carries many frames. On the peer, the reader of the connection decodes the
//! frames and hands each message to [`Inbound::on_message`].
//!
//! A connection opens with a handshake: the acceptor sends a random nonce
//! ([`Frame::Challenge`]); the dialer answers [`Hello`] with its name, its address and an
//! HMAC-SHA256 proof over the nonce and those fields under the cluster's secret; the
//! acceptor checks the protocol version, the cluster id and the proof, and answers
//! `Welcome` or `Refused { reason }` and closes. A connection that sends anything else, a
//! frame over the limit or bytes that do not decode is closed with a logged reason; the
//! node keeps serving everything else.
//!
//! A writer whose connection fails redials with exponential backoff and jitter. While a
//! link is down, `send` refuses at once ([`SendError::NotConnected`]) and whatever was
//! waiting when it dropped is discarded and counted: the layers above retry or fail over,
//! which they must do anyway for a node that is gone.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use dashmap::DashMap;
use hmac::{KeyInit, Mac};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::codec::{self, CodecError, Frame, Hello, Message, LEN_PREFIX, PROTOCOL_VERSION};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The largest frame accepted before a connection has proven it holds the secret.
const HANDSHAKE_MAX_FRAME: usize = 64 * 1024;

/// How much a reader asks the socket for at a time.
const READ_CHUNK: usize = 64 * 1024;

/// How a node's transport listens, dials and batches.
#[derive(Clone)]
pub struct TransportConfig {
    /// This node's name, as peers know it.
    pub node: String,
    /// Connections from another cluster are refused.
    pub cluster_id: String,
    /// The shared secret a dialer proves it holds.
    pub secret: Vec<u8>,
    /// Where to listen; port 0 takes any free port (see [`Transport::local_addr`]).
    pub listen: SocketAddr,
    /// The address peers dial to reach this node; empty: the address bound.
    pub advertise: String,
    /// The largest frame body sent or accepted. Default 16 MiB; at most `u32::MAX`.
    pub max_frame: usize,
    /// A writer writes once this much is encoded, without waiting for more. Default 64 KiB.
    pub flush_bytes: usize,
    /// Zero (the default): a writer writes as soon as it runs. More: it waits this long
    /// after the first message to coalesce more into the same write.
    pub linger: Duration,
    /// Backoff between connection attempts to a peer: from `reconnect_min` (default
    /// 50 ms), doubling, up to `reconnect_max` (default 2 s), with jitter.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Bound on connecting plus the handshake, both ways. Default 2 s.
    pub handshake_timeout: Duration,
}

impl TransportConfig {
    /// A configuration with the defaults named on each field.
    pub fn new(
        node: impl Into<String>,
        cluster_id: impl Into<String>,
        secret: impl Into<Vec<u8>>,
        listen: SocketAddr,
        advertise: impl Into<String>,
    ) -> TransportConfig {
        TransportConfig {
            node: node.into(),
            cluster_id: cluster_id.into(),
            secret: secret.into(),
            listen,
            advertise: advertise.into(),
            max_frame: 16 * 1024 * 1024,
            flush_bytes: 64 * 1024,
            linger: Duration::ZERO,
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(2),
        }
    }

    fn validate(&self) -> io::Result<()> {
        let invalid = |msg: String| Err(io::Error::new(io::ErrorKind::InvalidInput, msg));
        if self.max_frame == 0 || self.max_frame > u32::MAX as usize {
            return invalid(format!(
                "max_frame must be 1..={} bytes, got {}",
                u32::MAX,
                self.max_frame
            ));
        }
        if self.flush_bytes == 0 {
            return invalid("flush_bytes must be at least 1".into());
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            return invalid(format!(
                "reconnect_min must be above zero and at most reconnect_max ({:?}), got {:?}",
                self.reconnect_max, self.reconnect_min
            ));
        }
        if self.handshake_timeout.is_zero() {
            return invalid("handshake_timeout must be above zero".into());
        }
        Ok(())
    }
}

impl fmt::Debug for TransportConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportConfig")
            .field("node", &self.node)
            .field("cluster_id", &self.cluster_id)
            .field("secret", &"(hidden)")
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field("max_frame", &self.max_frame)
            .field("flush_bytes", &self.flush_bytes)
            .field("linger", &self.linger)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

/// Where a transport delivers what arrives.
pub trait Inbound: Send + Sync + 'static {
    /// A message from the node named `from`. Called on the connection's reader task, in
    /// the order the peer sent them: it must not block (hand the message to an actor).
    fn on_message(&self, from: &str, msg: Message);

    /// The outbound link to `peer` connected (`up`) or was lost.
    fn on_link(&self, peer: &str, up: bool) {
        let _ = (peer, up);
    }
}

/// Why [`Transport::send`] refused a message. The message is not sent; the caller retries
/// or fails over at its level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No link to that peer: it was never added, or it was removed.
    #[error("no link to that peer")]
    UnknownPeer,
    /// The link exists but is down; the writer is redialing.
    #[error("the link to that peer is down")]
    NotConnected,
}

/// What a link has done, for metrics and the admin API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LinkStats {
    pub peer: String,
    pub addr: String,
    /// The outbound link is up: `send` queues.
    pub connected: bool,
    /// Frames and bytes written on the outbound link.
    pub frames_sent: u64,
    pub bytes_sent: u64,
    /// Frames and bytes read from connections the peer dialed to this node.
    pub frames_received: u64,
    pub bytes_received: u64,
    /// Times the link came up again after it was lost.
    pub reconnects: u64,
    /// Messages discarded: waiting when the link went down, or too large to send.
    pub dropped: u64,
    /// The last reason a connection attempt failed or a link was lost.
    pub last_error: Option<String>,
}

/// The links of one node. Cheap to clone; the last clone dropped stops everything, as
/// [`Transport::shutdown`] does without waiting.
#[derive(Clone)]
pub struct Transport {
    handle: Arc<Handle>,
}

/// Stops the tasks when the last [`Transport`] clone goes (the tasks hold `Shared`, not
/// this).
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

struct Shared {
    config: TransportConfig,
    inbound: Arc<dyn Inbound>,
    local_addr: SocketAddr,
    peers: DashMap<String, Arc<Peer>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    runtime: tokio::runtime::Handle,
}

/// One peer: its outbox, its writer's controls, its counters.
struct Peer {
    name: String,
    addr: Mutex<String>,
    outbox: Mutex<Outbox>,
    /// A message joined an empty outbox.
    wake: Notify,
    /// The address changed: drop the connection and dial the new one.
    redial: Notify,
    /// Stops the writer (the peer was removed, or the transport shuts down).
    stop: CancellationToken,
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    frames_received: AtomicU64,
    bytes_received: AtomicU64,
    reconnects: AtomicU64,
    dropped: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// Whether the link is up and what waits for the writer, under one lock: a message is
/// queued only while the link is up, and the writer empties the queue when it marks the
/// link down, so nothing waits on a dead link.
#[derive(Default)]
struct Outbox {
    connected: bool,
    queue: Vec<Message>,
}

impl Transport {
    /// Binds `config.listen` and starts accepting connections. Peers are dialed as they
    /// are added.
    pub async fn start(
        mut config: TransportConfig,
        inbound: Arc<dyn Inbound>,
    ) -> io::Result<Transport> {
        config.validate()?;
        let listener = TcpListener::bind(config.listen).await?;
        let local_addr = listener.local_addr()?;
        if config.advertise.is_empty() {
            config.advertise = local_addr.to_string();
        }
        let shared = Arc::new(Shared {
            config,
            inbound,
            local_addr,
            peers: DashMap::default(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            runtime: tokio::runtime::Handle::current(),
        });
        info!(node = %shared.config.node, listen = %local_addr, "cluster transport listening");
        let span = tracing::info_span!("cluster_accept", node = %shared.config.node);
        shared.spawn(accept_loop(Arc::clone(&shared), listener).instrument(span));
        Ok(Transport {
            handle: Arc::new(Handle { shared }),
        })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// The address bound (the real port when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.shared().local_addr
    }

    /// Ensures an outbound link to `name` at `addr`: starts its writer if there is none,
    /// or moves it to `addr` if the address changed (the link is down, and `send`
    /// refuses, until the new address answers). Callable from any thread.
    pub fn add_peer(&self, name: &str, addr: &str) {
        self.shared().add_peer(name, addr);
    }

    /// Stops the writer of `name` and closes its outbound link; waiting messages are
    /// dropped. Connections the peer dialed to this node stay until it closes them.
    pub fn remove_peer(&self, name: &str) {
        if let Some((_, peer)) = self.shared().peers.remove(name) {
            peer.stop.cancel();
        }
    }

    /// Queues `msg` for `peer`'s writer. Never blocks and never waits for the network:
    /// `Ok` means queued on a link that was up, not delivered.
    pub fn send(&self, peer: &str, msg: Message) -> Result<(), SendError> {
        let peer = self
            .shared()
            .peers
            .get(peer)
            .ok_or(SendError::UnknownPeer)?;
        let mut outbox = peer.outbox.lock();
        if !outbox.connected {
            return Err(SendError::NotConnected);
        }
        let was_empty = outbox.queue.is_empty();
        outbox.queue.push(msg);
        drop(outbox);
        // The writer takes the whole queue each time, so one wake per non-empty queue.
        if was_empty {
            peer.wake.notify_one();
        }
        Ok(())
    }

    /// Whether the outbound link to `peer` is up.
    pub fn is_connected(&self, peer: &str) -> bool {
        self.shared()
            .peers
            .get(peer)
            .is_some_and(|p| p.outbox.lock().connected)
    }

    /// Every peer's link, sorted by name.
    pub fn links(&self) -> Vec<LinkStats> {
        let mut links: Vec<LinkStats> = self
            .shared()
            .peers
            .iter()
            .map(|p| p.value().stats())
            .collect();
        links.sort_by(|a, b| a.peer.cmp(&b.peer));
        links
    }

    /// Stops accepting, closes every connection and waits for the tasks to end. The
    /// listening port is free when this returns.
    pub async fn shutdown(&self) {
        let shared = self.shared();
        shared.shutdown.cancel();
        shared.tasks.close();
        shared.tasks.wait().await;
    }
}

impl Shared {
    fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn_on(task, &self.runtime);
    }

    /// The peer named `name`, added at `addr` if it is not one yet (an existing peer keeps
    /// the address it was given).
    fn ensure_peer(self: &Arc<Self>, name: &str, addr: &str) -> Arc<Peer> {
        match self.peers.get(name) {
            Some(peer) => Arc::clone(peer.value()),
            None => self.add_peer(name, addr),
        }
    }

    fn add_peer(self: &Arc<Self>, name: &str, addr: &str) -> Arc<Peer> {
        if let Some(peer) = self.peers.get(name) {
            let mut current = peer.addr.lock();
            if *current != addr {
                info!(peer = name, from = %*current, to = addr, "peer address changed");
                *current = addr.to_string();
                // Nothing more goes to the old address: `send` refuses until the link to
                // the new one is up.
                peer.count_dropped(peer.disconnect());
                peer.redial.notify_one();
            }
            return Arc::clone(peer.value());
        }
        let entry = self.peers.entry(name.to_string()).or_insert_with(|| {
            let peer = Arc::new(Peer::new(name, addr, self.shutdown.child_token()));
            let span = tracing::info_span!("cluster_link", node = %self.config.node, peer = name);
            self.spawn(run_link(Arc::clone(self), Arc::clone(&peer)).instrument(span));
            peer
        });
        Arc::clone(entry.value())
    }
}

impl Peer {
    fn new(name: &str, addr: &str, stop: CancellationToken) -> Peer {
        Peer {
            name: name.to_string(),
            addr: Mutex::new(addr.to_string()),
            outbox: Mutex::new(Outbox::default()),
            wake: Notify::new(),
            redial: Notify::new(),
            stop,
            frames_sent: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            frames_received: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    fn stats(&self) -> LinkStats {
        LinkStats {
            peer: self.name.clone(),
            addr: self.addr.lock().clone(),
            connected: self.outbox.lock().connected,
            frames_sent: self.frames_sent.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            frames_received: self.frames_received.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            last_error: self.last_error.lock().clone(),
        }
    }

    /// Marks the link down and discards what waits; returns how many messages that was.
    fn disconnect(&self) -> u64 {
        let mut outbox = self.outbox.lock();
        outbox.connected = false;
        let n = outbox.queue.len() as u64;
        outbox.queue.clear();
        n
    }

    fn count_dropped(&self, n: u64) {
        if n > 0 {
            self.dropped.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn record_error(&self, error: &str) {
        *self.last_error.lock() = Some(error.to_string());
    }
}

/// Exponential backoff with jitter between `min` and `max`.
#[derive(Debug, Clone)]
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    /// The wait before the next attempt: a uniform pick in `[d/2, d]` (never below
    /// `min`), where `d` doubles from `min` to `max`. `fraction` in `[0, 1]` is the pick;
    /// the jitter keeps nodes that lost the same peer from redialing in lockstep.
    fn next_wait(&mut self, fraction: f64) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.max);
        (d / 2 + (d / 2).mul_f64(fraction.clamp(0.0, 1.0))).max(self.min)
    }
}

/// Why a link ended.
enum LinkEnd {
    /// The writer was told to stop.
    Stopped,
    /// The peer has a new address: dial it now.
    Moved,
    Lost(String),
}

/// The writer of one peer: dial, handshake, then write what is queued, until stopped.
async fn run_link(shared: Arc<Shared>, peer: Arc<Peer>) {
    let config = &shared.config;
    let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    let mut ever_up = false;
    // The failure last logged as a warning: a peer that stays down is warned about once
    // per distinct error, not at every retry.
    let mut warned: Option<String> = None;
    // Reused across connections: the encode buffer and the batch taken from the outbox.
    let mut buf = Vec::with_capacity(config.flush_bytes + 4096);
    let mut batch: Vec<Message> = Vec::new();
    loop {
        let addr = peer.addr.lock().clone();
        let attempt = tokio::select! {
            _ = peer.stop.cancelled() => break,
            r = tokio::time::timeout(config.handshake_timeout, dial(&shared, &addr)) => r,
        };
        let error = match attempt {
            Ok(Ok(mut stream)) => {
                if ever_up {
                    peer.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                ever_up = true;
                warned = None;
                backoff.reset();
                peer.outbox.lock().connected = true;
                info!(addr = %addr, "link up");
                shared.inbound.on_link(&peer.name, true);
                let end = pump(&shared, &peer, &mut stream, &mut buf, &mut batch).await;
                peer.count_dropped(peer.disconnect());
                shared.inbound.on_link(&peer.name, false);
                match end {
                    LinkEnd::Stopped => break,
                    LinkEnd::Moved => continue,
                    LinkEnd::Lost(reason) => {
                        warn!(addr = %addr, reason = %reason, "link lost");
                        peer.record_error(&reason);
                        None
                    }
                }
            }
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!(
                "connecting and the handshake took over {:?}",
                config.handshake_timeout
            )),
        };
        if let Some(error) = error {
            peer.record_error(&error);
            if warned.as_deref() != Some(error.as_str()) {
                warn!(addr = %addr, error = %error, "cannot reach peer; retrying with backoff");
                warned = Some(error);
            } else {
                debug!(addr = %addr, error = %error, "cannot reach peer");
            }
        }
        let wait = backoff.next_wait(rand::random::<f64>());
        tokio::select! {
            _ = peer.stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
            _ = peer.redial.notified() => {}
        }
    }
    peer.count_dropped(peer.disconnect());
    debug!("link writer stopped");
}

/// Why dialing a peer failed.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("peer sent a bad frame during the handshake: {0}")]
    Codec(#[from] CodecError),
    #[error("peer closed the connection during the handshake")]
    Closed,
    #[error("peer broke the handshake: {0}")]
    Protocol(&'static str),
    #[error("refused by peer: {0}")]
    Refused(String),
}

/// Connects to `addr` and proves this node's identity; the stream is ready for messages.
async fn dial(shared: &Shared, addr: &str) -> Result<TcpStream, DialError> {
    let config = &shared.config;
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut rbuf = BytesMut::with_capacity(256);
    let nonce = match read_frame(&mut stream, &mut rbuf, HANDSHAKE_MAX_FRAME).await? {
        Some(Frame::Challenge { nonce }) => nonce,
        Some(Frame::Refused { reason }) => return Err(DialError::Refused(reason)),
        Some(_) => return Err(DialError::Protocol("expected a Challenge")),
        None => return Err(DialError::Closed),
    };
    let mut hello = Hello {
        version: PROTOCOL_VERSION,
        cluster_id: config.cluster_id.clone(),
        node: config.node.clone(),
        cluster_addr: config.advertise.clone(),
        proof: [0; 32],
    };
    hello.proof = proof(&config.secret, &nonce, &hello)
        .finalize()
        .into_bytes()
        .into();
    let mut out = Vec::with_capacity(256);
    codec::encode(&Frame::Hello(hello), &mut out)?;
    stream.write_all(&out).await?;
    match read_frame(&mut stream, &mut rbuf, HANDSHAKE_MAX_FRAME).await? {
        Some(Frame::Welcome) if rbuf.is_empty() => Ok(stream),
        Some(Frame::Welcome) => Err(DialError::Protocol("data after Welcome")),
        Some(Frame::Refused { reason }) => Err(DialError::Refused(reason)),
        Some(_) => Err(DialError::Protocol("expected Welcome or Refused")),
        None => Err(DialError::Closed),
    }
}

/// The MAC a dialer proves it holds the secret with: HMAC-SHA256 under the secret over the
/// acceptor's nonce, the version (`u16` LE), then the cluster id, the node name and its
/// address, each as a `u64` LE length and its bytes (lengths, so no two different field
/// splits give the same input).
fn proof(secret: &[u8], nonce: &[u8; 32], hello: &Hello) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(nonce);
    mac.update(&hello.version.to_le_bytes());
    for field in [&hello.cluster_id, &hello.node, &hello.cluster_addr] {
        mac.update(&(field.len() as u64).to_le_bytes());
        mac.update(field.as_bytes());
    }
    mac
}

/// Writes what the outbox holds, coalesced, until the link fails or the writer is stopped.
async fn pump(
    shared: &Shared,
    peer: &Peer,
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    batch: &mut Vec<Message>,
) -> LinkEnd {
    let config = &shared.config;
    let (mut rd, mut wr) = stream.split();
    // The acceptor never writes after Welcome: a read that returns is the connection
    // closing, noticed even while nothing is sent.
    let mut probe = [0u8; 64];
    loop {
        tokio::select! {
            biased;
            _ = peer.stop.cancelled() => return LinkEnd::Stopped,
            _ = peer.redial.notified() => return LinkEnd::Moved,
            r = rd.read(&mut probe) => return LinkEnd::Lost(match r {
                Ok(0) => "closed by peer".into(),
                Ok(_) => "peer wrote on a send-only link".into(),
                Err(e) => e.to_string(),
            }),
            _ = peer.wake.notified() => {}
        }
        if !config.linger.is_zero() {
            tokio::select! {
                _ = peer.stop.cancelled() => return LinkEnd::Stopped,
                _ = tokio::time::sleep(config.linger) => {}
            }
        }
        // Until the outbox stays empty: what arrives during a write goes in the next one.
        loop {
            std::mem::swap(&mut peer.outbox.lock().queue, batch);
            if batch.is_empty() {
                break;
            }
            let mut pending = 0u64;
            let mut messages = batch.drain(..);
            while let Some(msg) = messages.next() {
                let start = buf.len();
                match codec::encode(&msg, buf) {
                    Ok(len) if len <= config.max_frame => pending += 1,
                    Ok(len) => {
                        buf.truncate(start);
                        peer.count_dropped(1);
                        warn!(
                            len,
                            max = config.max_frame,
                            "message over max_frame dropped"
                        );
                    }
                    Err(e) => {
                        peer.count_dropped(1);
                        warn!(error = %e, "message that does not encode dropped");
                    }
                }
                if buf.len() >= config.flush_bytes || messages.as_slice().is_empty() {
                    let written = tokio::select! {
                        _ = peer.stop.cancelled() => None,
                        r = wr.write_all(buf) => Some(r),
                    };
                    let end = match written {
                        Some(Ok(())) => None,
                        Some(Err(e)) => Some(LinkEnd::Lost(e.to_string())),
                        None => Some(LinkEnd::Stopped),
                    };
                    if let Some(end) = end {
                        peer.count_dropped(pending + messages.len() as u64);
                        buf.clear();
                        return end;
                    }
                    peer.frames_sent.fetch_add(pending, Ordering::Relaxed);
                    peer.bytes_sent
                        .fetch_add(buf.len() as u64, Ordering::Relaxed);
                    pending = 0;
                    buf.clear();
                }
            }
        }
        // One oversized batch should not pin its buffer for the life of the link.
        if buf.capacity() > 4 * config.flush_bytes.max(64 * 1024) {
            buf.shrink_to(config.flush_bytes);
        }
    }
}

/// Reads one frame, buffering in `rbuf` what arrives beyond it. `None`: the connection
/// closed cleanly before a frame began.
async fn read_frame(
    stream: &mut TcpStream,
    rbuf: &mut BytesMut,
    max: usize,
) -> Result<Option<Frame>, DialError> {
    loop {
        if let Some(body) = next_body(rbuf, max)? {
            return Ok(Some(codec::decode(&body)?));
        }
        if stream.read_buf(rbuf).await? == 0 {
            return if rbuf.is_empty() {
                Ok(None)
            } else {
                Err(DialError::Closed)
            };
        }
    }
}

/// Splits the next complete frame body off `rbuf`, if it holds one, and reserves room
/// for the rest of a partial one (only after its length passed the limit).
fn next_body(rbuf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, CodecError> {
    let Some(prefix) = rbuf.first_chunk::<LEN_PREFIX>() else {
        return Ok(None);
    };
    let len = codec::body_len(*prefix, max)?;
    let need = LEN_PREFIX + len;
    if rbuf.len() < need {
        rbuf.reserve(need - rbuf.len());
        return Ok(None);
    }
    rbuf.advance(LEN_PREFIX);
    Ok(Some(rbuf.split_to(len)))
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, remote)) => {
                let span = tracing::info_span!("cluster_inbound", remote = %remote);
                shared.spawn(serve(Arc::clone(&shared), stream, remote).instrument(span));
            }
            Err(e) => {
                // Out of file descriptors and the like: pause rather than spin.
                warn!(error = %e, "accepting a cluster connection failed");
                tokio::select! {
                    _ = shared.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    debug!("stopped accepting");
}

/// Why an inbound connection was refused or closed.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("protocol version {0}, this node speaks {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("cluster id `{theirs}`, this node is in `{ours}`")]
    Cluster { theirs: String, ours: String },
    #[error("the dialer calls itself `{0}`, this node's own name")]
    OwnName(String),
    #[error("bad proof from `{0}`: not the cluster's secret")]
    Proof(String),
    #[error("expected Hello")]
    NotHello,
    #[error("bad frame: {0}")]
    Codec(#[from] CodecError),
    #[error("connection closed during the handshake")]
    Closed,
    #[error("no Hello within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl From<DialError> for Refusal {
    fn from(e: DialError) -> Refusal {
        match e {
            DialError::Io(e) => Refusal::Io(e),
            DialError::Codec(e) => Refusal::Codec(e),
            DialError::Closed => Refusal::Closed,
            DialError::Protocol(_) | DialError::Refused(_) => Refusal::NotHello,
        }
    }
}

/// One connection another node dialed: the handshake, then its messages, until it closes.
async fn serve(shared: Arc<Shared>, mut stream: TcpStream, remote: SocketAddr) {
    let config = &shared.config;
    let _ = stream.set_nodelay(true);
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let handshake = tokio::select! {
        _ = shared.shutdown.cancelled() => return,
        r = tokio::time::timeout(config.handshake_timeout, accept(&shared, &mut stream, &mut rbuf)) => {
            r.unwrap_or(Err(Refusal::Timeout(config.handshake_timeout)))
        }
    };
    let hello = match handshake {
        Ok(hello) => hello,
        Err(refusal) => {
            warn!(remote = %remote, reason = %refusal, "refused a cluster connection");
            if !matches!(refusal, Refusal::Closed | Refusal::Io(_)) {
                let mut out = Vec::new();
                let reason = refusal.to_string();
                if codec::encode(&Frame::Refused { reason }, &mut out).is_ok() {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(200), stream.write_all(&out))
                            .await;
                }
            }
            return;
        }
    };
    // A node that dialed this one but is not a peer yet (a node joining through this
    // seed): dial back, so answers can flow.
    let peer = shared.ensure_peer(&hello.node, &hello.cluster_addr);
    info!(peer = %hello.node, remote = %remote, "inbound link open");
    let end = read_messages(&shared, &hello.node, &peer, &mut stream, &mut rbuf).await;
    match end {
        Ok(()) => info!(peer = %hello.node, remote = %remote, "inbound link closed"),
        Err(reason) => warn!(
            peer = %hello.node,
            remote = %remote,
            reason = %reason,
            "closed an inbound link"
        ),
    }
}

/// The acceptor's side of the handshake: challenge, check the Hello, welcome.
async fn accept(
    shared: &Shared,
    stream: &mut TcpStream,
    rbuf: &mut BytesMut,
) -> Result<Hello, Refusal> {
    let config = &shared.config;
    let nonce: [u8; 32] = rand::random();
    let mut out = Vec::with_capacity(64);
    codec::encode(&Frame::Challenge { nonce }, &mut out)?;
    stream.write_all(&out).await?;
    let hello = match read_frame(stream, rbuf, HANDSHAKE_MAX_FRAME).await? {
        Some(Frame::Hello(hello)) => hello,
        Some(_) => return Err(Refusal::NotHello),
        None => return Err(Refusal::Closed),
    };
    if hello.version != PROTOCOL_VERSION {
        return Err(Refusal::Version(hello.version));
    }
    if hello.node == config.node {
        return Err(Refusal::OwnName(hello.node));
    }
    if hello.cluster_id != config.cluster_id {
        return Err(Refusal::Cluster {
            theirs: hello.cluster_id,
            ours: config.cluster_id.clone(),
        });
    }
    if proof(&config.secret, &nonce, &hello)
        .verify_slice(&hello.proof)
        .is_err()
    {
        return Err(Refusal::Proof(hello.node));
    }
    out.clear();
    codec::encode(&Frame::Welcome, &mut out)?;
    stream.write_all(&out).await?;
    Ok(hello)
}

/// Decodes frames as they arrive and hands each message on, in order.
async fn read_messages(
    shared: &Shared,
    from: &str,
    peer: &Peer,
    stream: &mut TcpStream,
    rbuf: &mut BytesMut,
) -> Result<(), String> {
    let max = shared.config.max_frame;
    loop {
        while let Some(body) = next_body(rbuf, max).map_err(|e| e.to_string())? {
            match codec::decode(&body) {
                Ok(Frame::Message(msg)) => {
                    peer.frames_received.fetch_add(1, Ordering::Relaxed);
                    shared.inbound.on_message(from, msg);
                }
                Ok(_) => return Err("handshake frame after Welcome".into()),
                Err(e) => return Err(e.to_string()),
            }
        }
        if rbuf.capacity() - rbuf.len() < READ_CHUNK / 4 {
            rbuf.reserve(READ_CHUNK);
        }
        let read = tokio::select! {
            _ = shared.shutdown.cancelled() => return Ok(()),
            r = stream.read_buf(rbuf) => r,
        };
        match read {
            Ok(0) if rbuf.is_empty() => return Ok(()),
            Ok(0) => return Err("closed in the middle of a frame".into()),
            Ok(n) => {
                peer.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::atomic::AtomicBool;
    use std::time::Instant;

    use super::*;
    use crate::codec::{WireOp, WireReply};

    const SECRET: &[u8] = b"cluster secret";
    const WAIT: Duration = Duration::from_secs(10);

    /// Records what a transport delivers.
    #[derive(Default)]
    struct Collect {
        messages: Mutex<Vec<(String, Message)>>,
        links: Mutex<Vec<(String, bool)>>,
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
        fn count(&self) -> usize {
            self.messages.lock().len()
        }

        fn pings_from(&self, from: &str) -> Vec<u64> {
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

    fn config(node: &str) -> TransportConfig {
        TransportConfig::new(node, "test", SECRET, "127.0.0.1:0".parse().unwrap(), "")
    }

    async fn start(node: &str) -> (Transport, Arc<Collect>) {
        start_with(config(node)).await
    }

    async fn start_with(config: TransportConfig) -> (Transport, Arc<Collect>) {
        let inbound = Arc::new(Collect::default());
        let t = Transport::start(config, Arc::clone(&inbound) as Arc<dyn Inbound>)
            .await
            .unwrap();
        (t, inbound)
    }

    /// Waits until `cond` holds, failing the test after [`WAIT`].
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Fails the test if `fut` does not finish within [`WAIT`].
    async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
        tokio::time::timeout(WAIT, fut)
            .await
            .unwrap_or_else(|_| panic!("timed out: {what}"))
    }

    fn ping(seq: u64) -> Message {
        Message::Ping { seq, load: 0 }
    }

    fn small_op(id: u128) -> WireOp {
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
        }
    }

    /// A hand-driven dialer, to send what a transport never would.
    struct Raw {
        stream: TcpStream,
        rbuf: BytesMut,
        nonce: [u8; 32],
    }

    impl Raw {
        async fn connect(addr: SocketAddr) -> Raw {
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

        fn hello(&self, node: &str, version: u16, cluster_id: &str, secret: &[u8]) -> Frame {
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

        async fn send(&mut self, frame: &Frame) {
            let mut out = Vec::new();
            codec::encode(frame, &mut out).unwrap();
            self.write(&out).await;
        }

        async fn write(&mut self, bytes: &[u8]) {
            // The acceptor may already have closed; what it read is what matters.
            let _ = self.stream.write_all(bytes).await;
        }

        /// The next frame, `None` once the acceptor closed the connection.
        async fn next(&mut self) -> Option<Frame> {
            bounded(
                "a frame or the close",
                read_frame(&mut self.stream, &mut self.rbuf, 1 << 20),
            )
            .await
            .ok()
            .flatten()
        }

        async fn expect_refused(&mut self) -> String {
            match self.next().await {
                Some(Frame::Refused { reason }) => {
                    assert!(self.next().await.is_none(), "closed after refusing");
                    reason
                }
                other => panic!("expected Refused, got {other:?}"),
            }
        }

        async fn expect_closed(&mut self) {
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
    async fn still_serves(to: &Transport, to_inbound: &Collect, good: &Transport, name: &str) {
        good.add_peer("a", &to.local_addr().to_string());
        until("the good peer's link", || good.is_connected("a")).await;
        good.send("a", ping(77)).unwrap();
        until("the good peer's ping", || {
            to_inbound.pings_from(name) == [77]
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn messages_flow_both_ways_and_the_acceptor_dials_back() {
        let (a, a_in) = start("a").await;
        let (b, b_in) = start("b").await;
        a.add_peer("b", &b.local_addr().to_string());
        until("a's link to b", || a.is_connected("b")).await;
        // b learned a from a's Hello and dialed back.
        until("b's link to a", || b.is_connected("a")).await;
        assert_eq!(b.links()[0].addr, a.local_addr().to_string());

        a.send("b", ping(1)).unwrap();
        a.send("b", Message::OpBatch(vec![small_op(5)])).unwrap();
        b.send(
            "a",
            Message::ReplyBatch(vec![WireReply {
                id: 5,
                status: 0,
                result: Some(b"{}".to_vec()),
                error: None,
                cached: false,
                attempts: 1,
            }]),
        )
        .unwrap();
        until("b's two messages", || b_in.count() == 2).await;
        until("a's reply", || a_in.count() == 1).await;
        {
            let got = b_in.messages.lock();
            assert_eq!(got[0].0, "a");
            assert!(matches!(got[0].1, Message::Ping { seq: 1, .. }));
            assert!(matches!(&got[1].1, Message::OpBatch(ops) if ops[0] == small_op(5)));
            let got = a_in.messages.lock();
            assert_eq!(got[0].0, "b");
            assert!(matches!(&got[0].1, Message::ReplyBatch(r) if r[0].id == 5));
        }
        assert_eq!(*a_in.links.lock(), [("b".to_string(), true)]);
        // Counted once the write returned, which may be after b read the frames.
        until("a's send counters", || a.links()[0].frames_sent == 2).await;
        let stats = &a.links()[0];
        assert_eq!(stats.peer, "b");
        assert!(stats.bytes_sent > 0 && stats.last_error.is_none());
        // Frames b sent to a are counted on a's entry for b.
        until("a's receive counters", || a.links()[0].frames_received == 1).await;
        assert!(a.links()[0].bytes_received > 0);

        a.shutdown().await;
        b.shutdown().await;
    }

    /// Checks order without keeping 100k messages.
    #[derive(Default)]
    struct InOrder {
        next: AtomicU64,
        out_of_order: AtomicBool,
    }

    impl Inbound for InOrder {
        fn on_message(&self, _from: &str, msg: Message) {
            if let Message::OpBatch(ops) = msg {
                for op in ops {
                    let expected = self.next.fetch_add(1, Ordering::Relaxed);
                    if op.id != expected as u128 {
                        self.out_of_order.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hundred_thousand_batches_arrive_in_order() {
        const N: u64 = 100_000;
        let (a, _) = start("a").await;
        let b_in = Arc::new(InOrder::default());
        let b = Transport::start(config("b"), Arc::clone(&b_in) as Arc<dyn Inbound>)
            .await
            .unwrap();
        a.add_peer("b", &b.local_addr().to_string());
        until("a's link to b", || a.is_connected("b")).await;
        for i in 0..N {
            a.send("b", Message::OpBatch(vec![small_op(i as u128)]))
                .unwrap();
        }
        until("all batches", || b_in.next.load(Ordering::Relaxed) == N).await;
        assert!(!b_in.out_of_order.load(Ordering::Relaxed));
        until("a's send counters", || a.links()[0].frames_sent == N).await;
        let stats = &a.links()[0];
        assert_eq!((stats.frames_sent, stats.dropped), (N, 0));
        assert!(stats.bytes_sent >= N * 60, "every frame's bytes went out");
        a.shutdown().await;
        b.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_secret_is_refused_and_the_acceptor_keeps_serving() {
        let (a, a_in) = start("a").await;
        let mut wrong = config("intruder");
        wrong.secret = b"guess".to_vec();
        let (intruder, _) = start_with(wrong).await;
        intruder.add_peer("a", &a.local_addr().to_string());
        until("the refusal", || {
            intruder.links()[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("refused") && e.contains("not the cluster's secret"))
        })
        .await;
        assert_eq!(intruder.send("a", ping(1)), Err(SendError::NotConnected));
        assert!(!intruder.is_connected("a"));

        // By hand: a bad proof, then a message anyway.
        let mut raw = Raw::connect(a.local_addr()).await;
        let hello = raw.hello("intruder", PROTOCOL_VERSION, "test", b"guess");
        raw.send(&hello).await;
        raw.send(&Frame::Message(ping(2))).await;
        assert!(raw
            .expect_refused()
            .await
            .contains("not the cluster's secret"));

        let (good, _) = start("good").await;
        still_serves(&a, &a_in, &good, "good").await;
        assert_eq!(a_in.count(), 1, "nothing from the intruder");
        // The refused dialer never became a peer.
        assert!(a.links().iter().all(|l| l.peer == "good"));
        for t in [a, intruder, good] {
            t.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_version_cluster_or_name_is_refused() {
        let (a, a_in) = start("a").await;
        let mut raw = Raw::connect(a.local_addr()).await;
        let hello = raw.hello("future", PROTOCOL_VERSION + 1, "test", SECRET);
        raw.send(&hello).await;
        let reason = raw.expect_refused().await;
        assert!(reason.contains("protocol version 2"), "{reason}");

        let mut raw = Raw::connect(a.local_addr()).await;
        let hello = raw.hello("a", PROTOCOL_VERSION, "test", SECRET);
        raw.send(&hello).await;
        let reason = raw.expect_refused().await;
        assert!(reason.contains("this node's own name"), "{reason}");

        let mut raw = Raw::connect(a.local_addr()).await;
        let hello = raw.hello("stranger", PROTOCOL_VERSION, "other", SECRET);
        raw.send(&hello).await;
        let reason = raw.expect_refused().await;
        assert!(reason.contains("cluster id `other`"), "{reason}");

        // A right Hello is welcomed and its messages delivered.
        let mut raw = Raw::connect(a.local_addr()).await;
        let hello = raw.hello("b", PROTOCOL_VERSION, "test", SECRET);
        raw.send(&hello).await;
        assert!(matches!(raw.next().await, Some(Frame::Welcome)));
        raw.send(&Frame::Message(ping(3))).await;
        until("the ping", || a_in.pings_from("b") == [3]).await;
        a.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_closes_the_connection_and_the_node_keeps_serving() {
        let (a, a_in) = start("a").await;
        // Before the handshake: bytes that are no Hello.
        let mut raw = Raw::connect(a.local_addr()).await;
        let garbage: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
        raw.write(&garbage).await;
        raw.expect_closed().await;

        // Plausible lengths, nonsense bodies.
        let mut raw = Raw::connect(a.local_addr()).await;
        raw.write(&[5, 0, 0, 0, 99, 1, 2, 3, 4]).await;
        assert!(raw.expect_refused().await.contains("unknown frame tag 99"));

        // Silence: the handshake times out.
        let mut quick = config("a2");
        quick.handshake_timeout = Duration::from_millis(100);
        let (a2, _) = start_with(quick).await;
        let mut raw = Raw::connect(a2.local_addr()).await;
        assert!(raw.expect_refused().await.contains("no Hello within"));

        // After the handshake: a frame that does not decode.
        let mut raw = Raw::connect(a.local_addr()).await;
        let hello = raw.hello("b", PROTOCOL_VERSION, "test", SECRET);
        raw.send(&hello).await;
        assert!(matches!(raw.next().await, Some(Frame::Welcome)));
        raw.send(&Frame::Message(ping(1))).await;
        raw.write(&[3, 0, 0, 0, 20, 1, 2]).await;
        raw.send(&Frame::Message(ping(2))).await;
        raw.expect_closed().await;
        assert_eq!(a_in.pings_from("b"), [1], "nothing after the bad frame");

        let (good, _) = start("good").await;
        still_serves(&a, &a_in, &good, "good").await;
        for t in [a, a2, good] {
            t.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_oversized_length_prefix_closes_the_connection() {
        let mut small = config("a");
        small.max_frame = 1024;
        let (a, a_in) = start_with(small).await;
        // During the handshake.
        let mut raw = Raw::connect(a.local_addr()).await;
        raw.write(&u32::MAX.to_le_bytes()).await;
        let reason = raw.expect_refused().await;
        assert!(reason.contains("exceeds the limit"), "{reason}");

        // After it: over the link's max_frame.
        let mut raw = Raw::connect(a.local_addr()).await;
        let hello = raw.hello("b", PROTOCOL_VERSION, "test", SECRET);
        raw.send(&hello).await;
        assert!(matches!(raw.next().await, Some(Frame::Welcome)));
        raw.write(&1025u32.to_le_bytes()).await;
        raw.expect_closed().await;

        // A sender does not send what its peer would refuse.
        let mut small = config("c");
        small.max_frame = 1024;
        let (c, _) = start_with(small).await;
        c.add_peer("a", &a.local_addr().to_string());
        until("c's link", || c.is_connected("a")).await;
        let big = WireOp {
            payload: vec![b'x'; 2000],
            ..small_op(1)
        };
        c.send("a", Message::OpBatch(vec![big])).unwrap();
        c.send("a", ping(9)).unwrap();
        until("the ping after the dropped batch", || {
            a_in.pings_from("c") == [9]
        })
        .await;
        assert_eq!(c.links()[0].dropped, 1);
        assert!(c.is_connected("a"));
        for t in [a, c] {
            t.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_peer_is_redialed_by_itself() {
        let (a, a_in) = start("a").await;
        let (b, b_in) = start("b").await;
        let b_addr = b.local_addr();
        a.add_peer("b", &b_addr.to_string());
        until("a's link to b", || a.is_connected("b")).await;
        a.send("b", ping(1)).unwrap();
        until("the first ping", || b_in.pings_from("a") == [1]).await;

        bounded("b's shutdown", b.shutdown()).await;
        until("a to notice", || !a.is_connected("b")).await;
        assert_eq!(a.send("b", ping(2)), Err(SendError::NotConnected));

        let mut again = config("b");
        again.listen = b_addr;
        let (b2, b2_in) = start_with(again).await;
        until("a's link to the new b", || a.is_connected("b")).await;
        a.send("b", ping(3)).unwrap();
        until("the ping after the restart", || {
            b2_in.pings_from("a") == [3]
        })
        .await;
        let stats = &a.links()[0];
        assert_eq!(stats.reconnects, 1);
        // "closed by peer", or a refused dial if a redialed before b2 was listening.
        assert!(stats.last_error.is_some());
        let b = ("b".to_string(), true);
        let b_down = ("b".to_string(), false);
        assert_eq!(*a_in.links.lock(), [b.clone(), b_down, b]);
        a.shutdown().await;
        b2.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sending_to_a_down_or_unknown_peer_fails_at_once() {
        let (a, _) = start("a").await;
        // A port nothing listens on.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        a.add_peer("ghost", &closed_addr.to_string());
        let t = Instant::now();
        assert_eq!(a.send("ghost", ping(1)), Err(SendError::NotConnected));
        assert_eq!(a.send("nobody", ping(1)), Err(SendError::UnknownPeer));
        assert!(t.elapsed() < Duration::from_millis(50));
        until("the dial failure", || a.links()[0].last_error.is_some()).await;
        assert!(!a.is_connected("ghost"));
        a.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_removed_or_moved_peer_is_let_go() {
        let (a, a_in) = start("a").await;
        let (b1, b1_in) = start("b").await;
        let (b2, b2_in) = start("b").await;
        a.add_peer("b", &b1.local_addr().to_string());
        until("a's link to b1", || a.is_connected("b")).await;

        // b moved: the link follows the new address.
        a.add_peer("b", &b2.local_addr().to_string());
        assert!(!a.is_connected("b"), "down until the new address answers");
        until("the link to b2", || a.is_connected("b")).await;
        assert_eq!(a.links()[0].addr, b2.local_addr().to_string());
        a.send("b", ping(1)).unwrap();
        until("b2's ping", || b2_in.pings_from("a") == [1]).await;
        assert!(b1_in.pings_from("a").is_empty());

        a.remove_peer("b");
        assert_eq!(a.send("b", ping(2)), Err(SendError::UnknownPeer));
        until("the link down", || {
            a_in.links.lock().last() == Some(&("b".into(), false))
        })
        .await;
        assert!(a.links().is_empty());
        for t in [a, b1, b2] {
            t.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_frees_the_port_and_dropping_the_last_handle_stops_the_tasks() {
        let (a, _) = start("a").await;
        let addr = a.local_addr();
        bounded("shutdown", a.shutdown()).await;
        assert!(TcpStream::connect(addr).await.is_err());

        let (b, _) = start("b").await;
        let addr = b.local_addr();
        let shared = Arc::clone(b.shared());
        drop(b);
        bounded("the tasks to end", async {
            shared.tasks.close();
            shared.tasks.wait().await;
        })
        .await;
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[test]
    fn an_invalid_config_names_the_field() {
        let mut c = config("a");
        c.max_frame = u32::MAX as usize + 1;
        assert!(c.validate().unwrap_err().to_string().contains("max_frame"));
        let mut c = config("a");
        c.reconnect_min = Duration::from_secs(3);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("reconnect_min"));
        assert!(!format!("{:?}", config("a")).contains("cluster secret"));
    }

    #[test]
    fn backoff_doubles_within_its_bounds_with_jitter() {
        let min = Duration::from_millis(50);
        let max = Duration::from_secs(2);
        let mut b = Backoff::new(min, max);
        let full: Vec<_> = (0..8).map(|_| b.next_wait(1.0)).collect();
        let ms: Vec<_> = full.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
        let mut b = Backoff::new(min, max);
        let low: Vec<_> = (0..8).map(|_| b.next_wait(0.0).as_millis()).collect();
        assert_eq!(low, [50, 50, 100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_wait(0.5), min);
    }

    #[test]
    fn the_proof_binds_every_field_and_the_nonce() {
        let hello = Hello {
            version: 1,
            cluster_id: "ab".into(),
            node: "c".into(),
            cluster_addr: "d:1".into(),
            proof: [0; 32],
        };
        let tag = |secret: &[u8], nonce: &[u8; 32], h: &Hello| -> [u8; 32] {
            proof(secret, nonce, h).finalize().into_bytes().into()
        };
        let base = tag(SECRET, &[1; 32], &hello);
        let moved = Hello {
            cluster_id: "a".into(),
            node: "bc".into(),
            ..hello.clone()
        };
        let version = Hello {
            version: 2,
            ..hello.clone()
        };
        let addr = Hello {
            cluster_addr: "d:2".into(),
            ..hello.clone()
        };
        for other in [
            tag(SECRET, &[2; 32], &hello),
            tag(b"other", &[1; 32], &hello),
            tag(SECRET, &[1; 32], &moved),
            tag(SECRET, &[1; 32], &version),
            tag(SECRET, &[1; 32], &addr),
        ] {
            assert_ne!(base, other);
        }
        assert!(proof(SECRET, &[1; 32], &hello).verify_slice(&base).is_ok());
    }
}
