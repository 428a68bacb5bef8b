//! Links between nodes: [`codec`](crate::codec) frames over TCP, in authenticated
//! records once a mutual handshake has opened the link.
//!
//! Each node dials each peer it knows and sends only on those outbound connections; it
//! only reads from the connections others dialed to it. Connections go one way: no
//! arbitration of who dials whom, and a writer never shares its socket with a reader.
//!
//! A node opens `cluster.lanes` connections to each peer (by default one per link
//! runtime: one per api worker in the binary), each with its own outbox and writer on
//! runtime `lane` (the peer's reader of that lane too), so that one peer's traffic is not
//! bound to one core in each direction. Operations go on the lane of the shard that
//! forwards them (the same key, the same shard, the same lane: their order holds), replies
//! on the lane of the thread that sends them, and everything else on lane 0: the
//! cluster's own messages (Raft, heartbeats), and the acknowledgements of replies, which
//! must not overtake the operations an origin sends again after a break (they go on lane
//! 0 too: an owner that read the acknowledgement first would forget the operation and run
//! the repeat). With the shards and the links on
//! the same workers, an operation forwarded from shard `i` travels on lane `i`, is read,
//! run and answered on the peer's worker `i` and its reply read back on worker `i` here:
//! no thread hands it to another. The link to a peer is up when all its lanes are.
//!
//! An operation forwarded to another node is [`Transport::send`]: the message joins the
//! peer's outbox and the caller goes on. The peer's writer task takes everything waiting,
//! encodes it into one reused buffer as one record and writes it with one `write_all`, so
//! under load one system call and one MAC carry many frames. On the peer, the reader of
//! the connection checks the record's tag, decodes its frames and hands each message to
//! [`Inbound::on_message`].
//!
//! A connection opens with a handshake in which both ends prove they hold the cluster's
//! secret (or, during a rotation, the previous one) over both ends' random nonces and
//! names: the acceptor sends `Challenge`, the dialer `Hello` and its own nonce, the
//! acceptor `Welcome` with its name and proof (or `Refused` and closes), and the dialer,
//! having checked that proof and that the acceptor is the node it meant to dial, sends an
//! empty first record that proves it derived the same link key. From then on every
//! record carries an HMAC tag under that key and an implicit sequence number: a record
//! altered, replayed, reordered or dropped on the way closes the link. A connection that
//! sends anything else, a frame over the limit or bytes that do not decode is closed with
//! a logged reason; the node keeps serving everything else. At most
//! `max_pending_handshakes` connections may be in the handshake at once, each for at
//! most `handshake_timeout`, and refusals are logged at most once per address per ten
//! seconds.
//!
//! The outbox is bounded: operations and replies waiting there (queued, or taken by
//! the writer and not yet written) may take at most `cluster.link_buffer_bytes`, and
//! `send` refuses more ([`SendError::Full`]) until the writer catches up; the cluster's
//! own small messages (heartbeats, Raft, acknowledgements) always queue. What the link
//! holds is in [`LinkStats::queued_bytes`], which the cluster holds against its
//! watermarks (see [`crate::flow`]).
//!
//! A writer whose connection fails redials with exponential backoff and jitter. While a
//! link is down, `send` refuses at once ([`SendError::NotConnected`]) and whatever was
//! waiting when it dropped is discarded and counted: the layers above retry or fail over,
//! which they must do anyway for a node that is gone.
//!
//! The parts, in the order a connection meets them:
//!
//! - this module: the [`Transport`] handle (peers, `send`, link stats, shutdown) and the
//!   state its tasks share;
//! - `handshake`: dialing and accepting, `Challenge`/`Hello`/`DialerNonce`/`Welcome`/
//!   `Refused`, the proofs and the link key;
//! - `record`: sealing and opening the authenticated records links carry after it;
//! - `writer`: the per-peer writer task that coalesces the outbox into few records and
//!   redials with backoff;
//! - `reader`: accepting connections (within the limit on pending handshakes), reading
//!   records and handing messages to [`Inbound`];
//! - `refusals`: how often a refused connection is logged.
//!
//! Its settings are the link fields of [`ClusterConfig`].

mod handshake;
mod reader;
mod record;
mod refusals;
mod writer;

#[cfg(test)]
mod testing;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, Instrument};

use self::refusals::RefusalLog;
use crate::codec::Message;
use crate::config::{ClusterConfig, LinkConfigError};

/// Where a transport delivers what arrives.
pub trait Inbound: Send + Sync + 'static {
    /// A message from the node named `from`: the name it proved in the handshake, which
    /// the layers above check any name a message claims against. Called on the
    /// connection's reader task, in the order the peer sent them: it must not block (hand
    /// the message to an actor).
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
    /// Operations or replies when the link's outbox holds `cluster.link_buffer_bytes`
    /// unsent already (the peer or the network does not keep up).
    #[error("the link to that peer holds {queued} bytes unsent, the most cluster.link_buffer_bytes allows")]
    Full { queued: usize },
}

/// What a link has done, for metrics and the admin API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LinkStats {
    pub peer: String,
    pub addr: String,
    /// The outbound link is up (every lane): `send` queues.
    pub connected: bool,
    /// The connections this node keeps to the peer (`cluster.lanes`), and how many are up.
    pub lanes: usize,
    pub lanes_up: usize,
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
    /// Bytes of operations and replies queued and not yet written (estimated:
    /// [`Message::size_hint`]), at most `cluster.link_buffer_bytes` but for one batch
    /// larger than that alone.
    pub queued_bytes: u64,
    /// Operation and reply batches refused because the outbox was full
    /// ([`SendError::Full`]).
    pub refused_full: u64,
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
    config: ClusterConfig,
    /// The address peers dial: `config.advertise`, or the address bound when it is empty.
    advertise: String,
    inbound: Arc<dyn Inbound>,
    local_addr: SocketAddr,
    peers: DashMap<String, Arc<Peer>>,
    /// Some outbound link came up (see [`Transport::wait_connected`]).
    link_up: Notify,
    /// One permit per inbound connection in the handshake.
    pending: Arc<Semaphore>,
    /// When a refused connection was last logged, per address.
    refusals: Mutex<RefusalLog>,
    /// Inbound connections refused, logged or not.
    handshakes_refused: AtomicU64,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    runtime: tokio::runtime::Handle,
}

/// One peer: its lanes, their writers' controls, its counters.
struct Peer {
    name: String,
    /// The name the acceptor must prove when dialed: `name`, or `None` for a seed known
    /// only by its address.
    expect: Option<String>,
    /// The name the acceptor proved on the last connection that opened.
    identity: Mutex<Option<String>>,
    addr: Mutex<String>,
    lanes: Box<[Lane]>,
    /// How many lanes' writers have their connection open: the layers above are told
    /// the link is up when this reaches the lane count, down when it leaves it.
    lanes_open: AtomicUsize,
    /// Stops the writers (the peer was removed, or the transport shuts down).
    stop: CancellationToken,
    reconnects: AtomicU64,
    dropped: AtomicU64,
    refused_full: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// One connection to a peer: its outbox, its writer's controls and the counters its
/// writer (and the reader of the peer's connection of the same lane) keep. On lines of its
/// own: each lane is written from its own thread.
#[repr(align(128))]
struct Lane {
    outbox: Mutex<Outbox>,
    /// A message joined an empty outbox.
    wake: Notify,
    /// The address changed: drop the connection and dial the new one.
    redial: Notify,
    frames_sent: AtomicU64,
    bytes_sent: AtomicU64,
    frames_received: AtomicU64,
    bytes_received: AtomicU64,
}

/// Whether the link is up and what waits for the writer, under one lock: a message is
/// queued only while the link is up, and the writer empties the queue when it marks the
/// link down, so nothing waits on a dead link.
#[derive(Default)]
struct Outbox {
    connected: bool,
    queue: Vec<Message>,
    /// The [`Message::size_hint`]s of the operations and replies queued (the cluster's
    /// own messages, small and never refused, are not counted).
    queued: usize,
    /// Those of what the writer took from the queue and is still writing.
    writing: usize,
}

impl Outbox {
    /// Bytes accepted and not yet written.
    fn unsent(&self) -> usize {
        self.queued + self.writing
    }
}

/// Why [`Transport::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A link setting is out of its range.
    #[error(transparent)]
    Config(#[from] LinkConfigError),
    /// The cluster port could not be bound.
    #[error("{0}")]
    Listen(#[from] std::io::Error),
}

impl Transport {
    /// Checks the link settings of `config`, binds `config.listen` and starts accepting
    /// connections. Peers are dialed as they are added.
    pub async fn start(
        config: &ClusterConfig,
        inbound: Arc<dyn Inbound>,
    ) -> Result<Transport, TransportError> {
        config.validate_links()?;
        let listener = TcpListener::bind(config.listen).await?;
        let local_addr = listener.local_addr()?;
        let advertise = if config.advertise.is_empty() {
            local_addr.to_string()
        } else {
            config.advertise.clone()
        };
        let shared = Arc::new(Shared {
            config: config.clone(),
            advertise,
            inbound,
            local_addr,
            peers: DashMap::default(),
            link_up: Notify::new(),
            pending: Arc::new(Semaphore::new(config.max_pending_handshakes)),
            refusals: Mutex::default(),
            handshakes_refused: AtomicU64::new(0),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            runtime: tokio::runtime::Handle::current(),
        });
        info!(node = %shared.config.node, listen = %local_addr, "cluster transport listening");
        let span = tracing::info_span!("cluster_accept", node = %shared.config.node);
        shared.spawn(reader::accept_loop(Arc::clone(&shared), listener).instrument(span));
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
        self.shared().add_peer(name, addr, true);
    }

    /// Like [`add_peer`](Self::add_peer), for a node known only by its address (a seed):
    /// the link opens to whichever node there proves it holds the secret, whatever its
    /// name ([`peer_identity`](Self::peer_identity) tells it). `label` names the link
    /// here and must not be a node's name.
    pub fn add_seed(&self, label: &str, addr: &str) {
        self.shared().add_peer(label, addr, false);
    }

    /// The name the node at the other end of the link `peer` proved in its last
    /// handshake: `peer` itself for a peer added by name, the seed's name for a seed.
    /// `None` before the link first opened.
    pub fn peer_identity(&self, peer: &str) -> Option<String> {
        let peer = self.shared().peers.get(peer)?;
        let identity = peer.identity.lock().clone();
        identity
    }

    /// Inbound connections refused since the transport started: a failed or timed-out
    /// handshake, or one beyond `max_pending_handshakes`.
    pub fn handshakes_refused(&self) -> u64 {
        self.shared().handshakes_refused.load(Ordering::Relaxed)
    }

    /// Stops the writer of `name` and closes its outbound link; waiting messages are
    /// dropped. Connections the peer dialed to this node stay until it closes them.
    pub fn remove_peer(&self, name: &str) {
        if let Some((_, peer)) = self.shared().peers.remove(name) {
            peer.stop.cancel();
        }
    }

    /// Queues `msg` for `peer`'s writer. Never blocks and never waits for the network:
    /// `Ok` means queued on a link that was up, not delivered. Operations and replies
    /// ([`Message::is_bulk`]) are refused with [`SendError::Full`] when the lane's outbox
    /// holds its share of `cluster.link_buffer_bytes` with them (one larger than that
    /// alone still goes when nothing else waits); the cluster's own messages always queue.
    ///
    /// Operations and replies go on the lane of the calling thread (its home, see
    /// [`opmesh_actors::shard::home_index`]), the rest on lane 0.
    pub fn send(&self, peer: &str, msg: Message) -> Result<(), SendError> {
        self.try_send(peer, msg).map_err(|refused| refused.0)
    }

    /// [`send`](Self::send), handing a refused message back (boxed: refusals are rare,
    /// messages large).
    pub fn try_send(&self, peer: &str, msg: Message) -> Result<(), Box<(SendError, Message)>> {
        let lane = if msg.is_bulk() {
            opmesh_actors::shard::home_index()
        } else {
            0
        };
        self.try_send_on(peer, lane, msg)
    }

    /// [`try_send`](Self::try_send) on lane `lane` modulo the peer's lanes: the caller
    /// keeps what must stay in order on one lane (operations forwarded by one shard).
    pub fn try_send_on(
        &self,
        peer: &str,
        lane: usize,
        msg: Message,
    ) -> Result<(), Box<(SendError, Message)>> {
        let Some(peer) = self.shared().peers.get(peer) else {
            return Err(Box::new((SendError::UnknownPeer, msg)));
        };
        let lanes = peer.lanes.len();
        let lane = &peer.lanes[lane % lanes];
        let size = msg.size_hint();
        let mut outbox = lane.outbox.lock();
        if !outbox.connected {
            return Err(Box::new((SendError::NotConnected, msg)));
        }
        if msg.is_bulk() {
            let unsent = outbox.unsent();
            if unsent > 0 && unsent + size > self.shared().config.link_buffer_bytes / lanes {
                drop(outbox);
                peer.refused_full.fetch_add(1, Ordering::Relaxed);
                return Err(Box::new((SendError::Full { queued: unsent }, msg)));
            }
            outbox.queued += size;
        }
        let was_empty = outbox.queue.is_empty();
        outbox.queue.push(msg);
        drop(outbox);
        // The writer takes the whole queue each time, so one wake per non-empty queue.
        if was_empty {
            lane.wake.notify_one();
        }
        Ok(())
    }

    /// Whether the outbound link to `peer` is up (all its lanes).
    pub fn is_connected(&self, peer: &str) -> bool {
        self.shared().peers.get(peer).is_some_and(|p| p.is_up())
    }

    /// Waits until the outbound link to `peer` is up, for at most `timeout`; returns
    /// whether it is. A peer not added yet may be added while this waits.
    pub async fn wait_connected(&self, peer: &str, timeout: Duration) -> bool {
        let up = || self.is_connected(peer).then_some(());
        crate::notified::until(&self.shared().link_up, timeout, up)
            .await
            .is_some()
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

    /// The runtime lane `lane` of `peer` runs on (its writer here, its reader on the
    /// peer), when the links have runtimes of their own ([`ClusterConfig::link_runtimes`]):
    /// runtime `lane` with several lanes, else one chosen by the peer's name.
    fn link_runtime(&self, peer: &str, lane: usize) -> Option<&tokio::runtime::Handle> {
        let runtimes = &self.config.link_runtimes;
        if runtimes.is_empty() {
            return None;
        }
        let i = match self.config.lane_count() {
            1 => (opmesh_actors::stable_hash(peer.as_bytes()) % runtimes.len() as u64) as usize,
            _ => lane % runtimes.len(),
        };
        Some(&runtimes[i])
    }

    /// The peer named `name`, added at `addr` if it is not one yet (an existing peer keeps
    /// the address it was given).
    fn ensure_peer(self: &Arc<Self>, name: &str, addr: &str) -> Arc<Peer> {
        match self.peers.get(name) {
            Some(peer) => Arc::clone(peer.value()),
            None => self.add_peer(name, addr, true),
        }
    }

    /// `named`: the acceptor must prove it is `name` (a seed's label is no node's name).
    fn add_peer(self: &Arc<Self>, name: &str, addr: &str, named: bool) -> Arc<Peer> {
        if let Some(peer) = self.peers.get(name) {
            let mut current = peer.addr.lock();
            if *current != addr {
                info!(peer = name, from = %*current, to = addr, "peer address changed");
                *current = addr.to_string();
                // Nothing more goes to the old address: `send` refuses until the links to
                // the new one are up.
                for lane in peer.lanes.iter() {
                    peer.count_dropped(lane.disconnect());
                    lane.redial.notify_one();
                }
            }
            return Arc::clone(peer.value());
        }
        let entry = self.peers.entry(name.to_string()).or_insert_with(|| {
            let expect = named.then(|| name.to_string());
            let lanes = self.config.lane_count();
            let peer = Arc::new(Peer::new(
                name,
                expect,
                addr,
                lanes,
                self.shutdown.child_token(),
            ));
            for lane in 0..lanes {
                let span = tracing::info_span!("cluster_link", node = %self.config.node, peer = name, lane);
                let link =
                    writer::run_link(Arc::clone(self), Arc::clone(&peer), lane).instrument(span);
                match self.link_runtime(name, lane) {
                    Some(rt) => {
                        self.tasks.spawn_on(link, rt);
                    }
                    None => self.spawn(link),
                }
            }
            peer
        });
        Arc::clone(entry.value())
    }
}

impl Peer {
    fn new(
        name: &str,
        expect: Option<String>,
        addr: &str,
        lanes: usize,
        stop: CancellationToken,
    ) -> Peer {
        Peer {
            name: name.to_string(),
            expect,
            identity: Mutex::new(None),
            addr: Mutex::new(addr.to_string()),
            lanes: (0..lanes.max(1)).map(|_| Lane::default()).collect(),
            lanes_open: AtomicUsize::new(0),
            stop,
            reconnects: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            refused_full: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// Every lane is connected (and not told to move to a new address since).
    fn is_up(&self) -> bool {
        self.lanes.iter().all(|l| l.outbox.lock().connected)
    }

    /// The lane a peer's connection says it is, modulo this node's lanes (the peer may
    /// be set up with more).
    fn lane(&self, lane: usize) -> &Lane {
        &self.lanes[lane % self.lanes.len()]
    }

    fn stats(&self) -> LinkStats {
        let sum = |f: fn(&Lane) -> &AtomicU64| {
            self.lanes
                .iter()
                .map(|l| f(l).load(Ordering::Relaxed))
                .sum()
        };
        let (mut unsent, mut lanes_up) = (0, 0);
        for lane in self.lanes.iter() {
            let outbox = lane.outbox.lock();
            unsent += outbox.unsent();
            lanes_up += usize::from(outbox.connected);
        }
        LinkStats {
            peer: self.name.clone(),
            addr: self.addr.lock().clone(),
            connected: lanes_up == self.lanes.len(),
            lanes: self.lanes.len(),
            lanes_up,
            queued_bytes: unsent as u64,
            refused_full: self.refused_full.load(Ordering::Relaxed),
            frames_sent: sum(|l| &l.frames_sent),
            bytes_sent: sum(|l| &l.bytes_sent),
            frames_received: sum(|l| &l.frames_received),
            bytes_received: sum(|l| &l.bytes_received),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            last_error: self.last_error.lock().clone(),
        }
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

impl Default for Lane {
    fn default() -> Lane {
        Lane {
            outbox: Mutex::new(Outbox::default()),
            wake: Notify::new(),
            redial: Notify::new(),
            frames_sent: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            frames_received: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
        }
    }
}

impl Lane {
    /// Marks the lane down and discards what waits; returns how many messages that was.
    fn disconnect(&self) -> u64 {
        let mut outbox = self.outbox.lock();
        outbox.connected = false;
        let n = outbox.queue.len() as u64;
        outbox.queue.clear();
        outbox.queued = 0;
        outbox.writing = 0;
        n
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::net::TcpStream;

    use super::testing::*;
    use super::*;
    use crate::codec::WireReply;

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
            Message::ReplyBatch {
                seq: 3,
                replies: std::sync::Arc::new(vec![WireReply {
                    id: 5,
                    status: 0,
                    result: Some(bytes::Bytes::from_static(b"{}")),
                    error: None,
                    cached: false,
                    attempts: 1,
                }]),
            },
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
            assert!(
                matches!(&got[0].1, Message::ReplyBatch { seq: 3, replies } if replies[0].id == 5)
            );
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

    /// A link's outbox holds at most `link_buffer_bytes` of operations and replies:
    /// past it they are refused (`Full`) and counted, the cluster's own messages still
    /// queue, and once the writer catches up the link takes batches again.
    #[tokio::test(flavor = "current_thread")]
    async fn a_full_link_refuses_batches_until_the_writer_catches_up() {
        let mut cfg = config("a");
        cfg.link_buffer_bytes = ClusterConfig::MIN_LINK_BUFFER;
        let (a, _) = start_with(cfg).await;
        let (b, b_in) = start("b").await;
        a.add_peer("b", &b.local_addr().to_string());
        assert!(a.wait_connected("b", WAIT).await);
        // One thread, no await: the writer cannot run while these are sent.
        let batch = || Message::OpBatch((0..16).map(small_op).collect());
        let size = batch().size_hint();
        let (mut sent, mut full) = (0usize, 0usize);
        for _ in 0..(4 * ClusterConfig::MIN_LINK_BUFFER / size) {
            match a.send("b", batch()) {
                Ok(()) => sent += 1,
                Err(SendError::Full { queued }) => {
                    assert!(queued + size > ClusterConfig::MIN_LINK_BUFFER);
                    full += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(sent, ClusterConfig::MIN_LINK_BUFFER / size);
        assert!(full > 0);
        let stats = &a.links()[0];
        assert_eq!(stats.queued_bytes as usize, sent * size);
        assert_eq!(stats.refused_full as usize, full);
        a.send("b", ping(1)).expect("upkeep queues on a full link");
        until("b got what was accepted", || b_in.count() == sent + 1).await;
        until("the outbox drained", || a.links()[0].queued_bytes == 0).await;
        a.send("b", batch()).expect("room again");
        until("the last batch", || b_in.count() == sent + 2).await;
        a.shutdown().await;
        b.shutdown().await;
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
        shutdown_frees_the_port_and_dropping_the_last_handle_stops_the_tasks_with(Vec::new).await;
        // The same with the links on runtimes of their own.
        let (rt, _stop) = runtime_thread("links");
        shutdown_frees_the_port_and_dropping_the_last_handle_stops_the_tasks_with(|| {
            vec![rt.clone()]
        })
        .await;
    }

    /// Links on runtimes of their own (the binary's api workers): what a peer sends is
    /// handed over on one of them, both ways, and the links still come up, carry messages
    /// and stop. `a` has one runtime, so one lane; `b` has two, so two lanes to `a` (see
    /// the next test) and reads `a`'s one lane on its runtime 0.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn links_on_runtimes_of_their_own_deliver_there() {
        let (rt_a, _stop_a) = runtime_thread("links-a");
        let (rt_b1, _stop_b1) = runtime_thread("links-b1");
        let (rt_b2, _stop_b2) = runtime_thread("links-b2");
        let (a, a_in) = start_on("a", vec![rt_a]).await;
        let (b, b_in) = start_on("b", vec![rt_b1, rt_b2]).await;
        a.add_peer("b", &b.local_addr().to_string());
        until("a's link to b", || a.is_connected("b")).await;
        until("b's link to a", || b.is_connected("a")).await;
        for seq in 0..100 {
            a.send("b", ping(seq)).unwrap();
            b.send("a", ping(seq)).unwrap();
        }
        until("a hundred pings each way", || {
            a_in.count() == 100 && b_in.count() == 100
        })
        .await;
        assert_eq!(a_in.pings_from("b"), (0..100).collect::<Vec<_>>());
        assert_eq!(b_in.pings_from("a"), (0..100).collect::<Vec<_>>());
        assert!(a_in
            .threads
            .lock()
            .iter()
            .all(|t| t.as_deref() == Some("links-a")));
        // a's one lane is read on b's runtime 0.
        let on = b_in.threads.lock().clone();
        assert!(
            on.iter().all(|t| t.as_deref() == Some("links-b1")),
            "{on:?}"
        );
        bounded("shutdown", a.shutdown()).await;
        bounded("shutdown", b.shutdown()).await;
    }

    /// With several link runtimes a node opens one connection (lane) per runtime to each
    /// peer: lane `i` is written on runtime `i` here and read on runtime `i` there, in
    /// order; operations go on the lane the caller names, replies on the lane of the
    /// sending thread's home, the rest (acknowledgements too) on lane 0. The link is
    /// reported up once, when every lane is, and down once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_lane_is_a_connection_of_its_own_read_on_its_own_runtime() {
        let (ra0, _sa0) = runtime_thread("lanes-a0");
        let (ra1, _sa1) = runtime_thread("lanes-a1");
        let (rb0, _sb0) = runtime_thread("lanes-b0");
        let (rb1, _sb1) = runtime_thread("lanes-b1");
        let (a, a_in) = start_on("a", vec![ra0.clone(), ra1.clone()]).await;
        let (b, b_in) = start_on("b", vec![rb0, rb1]).await;
        a.add_peer("b", &b.local_addr().to_string());
        until("a's links to b", || a.is_connected("b")).await;
        let stats = &a.links()[0];
        assert_eq!((stats.lanes, stats.lanes_up, stats.connected), (2, 2, true));
        assert_eq!(*a_in.links.lock(), [("b".to_string(), true)]);

        let op = |id| Message::OpBatch(vec![small_op(id)]);
        for (lane, id) in [(1, 10), (0, 0), (1, 11), (0, 1), (3, 12)] {
            a.try_send_on("b", lane, op(id)).map_err(|e| e.0).unwrap();
        }
        // Replies and acknowledgements from a thread whose home is 1: lane 1.
        let from_home = |rt: &tokio::runtime::Handle, home: usize, msg: Message| {
            let a = a.clone();
            rt.spawn(async move {
                opmesh_actors::shard::make_home(home);
                a.send("b", msg)
            })
        };
        let reply = |seq| Message::ReplyBatch {
            seq,
            replies: Arc::new(Vec::new()),
        };
        from_home(&ra1, 1, reply(21)).await.unwrap().unwrap();
        from_home(&ra0, 0, reply(20)).await.unwrap().unwrap();
        // Acknowledgements and the cluster's own messages: lane 0, whatever the thread.
        from_home(&ra1, 1, Message::ReplyAck { seqs: vec![40] })
            .await
            .unwrap()
            .unwrap();
        from_home(&ra1, 1, ping(30)).await.unwrap().unwrap();
        until("everything sent", || b_in.count() == 9).await;
        let mut by_thread: std::collections::BTreeMap<String, Vec<u128>> = Default::default();
        for ((_, msg), thread) in b_in.messages.lock().iter().zip(b_in.threads.lock().iter()) {
            let id = match msg {
                Message::OpBatch(ops) => ops[0].id,
                Message::ReplyBatch { seq, .. } => u128::from(*seq),
                Message::ReplyAck { seqs } => u128::from(seqs[0]),
                Message::Ping { seq, .. } => u128::from(*seq),
                other => panic!("{other:?}"),
            };
            by_thread
                .entry(thread.clone().unwrap())
                .or_default()
                .push(id);
        }
        // Each lane in the order it was sent (the reply sent from home 1 as lane 1's, the
        // one from home 0 as lane 0's).
        let lane0 = &by_thread["lanes-b0"];
        let lane1 = &by_thread["lanes-b1"];
        assert_eq!(lane1, &[10, 11, 12, 21], "{by_thread:?}");
        assert_eq!(lane0, &[0, 1, 20, 40, 30], "{by_thread:?}");
        until("a's send counters", || a.links()[0].frames_sent == 9).await;

        // b gone: both lanes drop, the link is reported down once.
        bounded("shutdown", b.shutdown()).await;
        until("the link down", || !a.is_connected("b")).await;
        until("both lanes down", || a.links()[0].lanes_up == 0).await;
        assert_eq!(
            *a_in.links.lock(),
            [("b".to_string(), true), ("b".to_string(), false)]
        );
        bounded("shutdown", a.shutdown()).await;
    }

    async fn shutdown_frees_the_port_and_dropping_the_last_handle_stops_the_tasks_with(
        link_runtimes: impl Fn() -> Vec<tokio::runtime::Handle>,
    ) {
        let start = |node: &'static str| start_on(node, link_runtimes());
        let (a, _) = start("a").await;
        let (c, _) = start("c").await;
        // With a link up both ways, so its tasks are among those that must stop.
        a.add_peer("c", &c.local_addr().to_string());
        until("c's link to a", || c.is_connected("a")).await;
        let addr = a.local_addr();
        bounded("shutdown", a.shutdown()).await;
        assert!(TcpStream::connect(addr).await.is_err());
        bounded("shutdown", c.shutdown()).await;

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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_for_a_link_ends_when_it_is_up_or_at_the_deadline() {
        let (a, _) = start("a").await;
        let (b, _) = start("b").await;
        let t = Instant::now();
        assert!(!a.wait_connected("b", Duration::from_millis(50)).await);
        assert!(t.elapsed() >= Duration::from_millis(50));
        // Added while someone waits: the wait ends when the link is up.
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.wait_connected("b", WAIT).await })
        };
        a.add_peer("b", &b.local_addr().to_string());
        assert!(bounded("the wait", waiter).await.unwrap());
        assert!(a.is_connected("b"));
        assert!(a.wait_connected("b", Duration::ZERO).await);
        for t in [a, b] {
            t.shutdown().await;
        }
    }
}
