//! The inbound side of links: accept connections, run the acceptor's handshake, then
//! read records, check each one's tag and hand the messages in it to
//! [`Inbound::on_message`](super::Inbound), in the order the peer sent them.
//!
//! At most `max_pending_handshakes` connections may be in the handshake at once; one
//! more is refused at once, before anything is read from it, and refusals are logged at
//! most once per address per ten seconds (see [`refusals`](super::refusals)). A length
//! prefix is checked against the limit before anything is allocated for the body; a
//! record whose tag does not check out, a frame over the limit, one that does not
//! decode or a handshake frame after the handshake closes the connection with a logged
//! reason, and nothing in or after that record is delivered. A node that dials in and is
//! not a peer yet (a node joining through this seed) is added as one once its handshake
//! is done, so answers can flow back on this node's own outbound link.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, info, warn, Instrument};

use super::handshake::{accept, Accepted, Refusal};
use super::record::{max_record, Opener};
use super::{Lane, Shared};
use crate::codec::{self, CodecError, Frame, LEN_PREFIX};

/// How much a reader asks the socket for at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Splits the next complete frame body off `rbuf`, if it holds one, and reserves room
/// for the rest of a partial one (only after its length passed the limit).
pub(super) fn next_body(rbuf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, CodecError> {
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

pub(super) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, remote)) => match Arc::clone(&shared.pending).try_acquire_owned() {
                Ok(permit) => {
                    let span = tracing::info_span!("cluster_inbound", remote = %remote);
                    shared
                        .spawn(serve(Arc::clone(&shared), stream, remote, permit).instrument(span));
                }
                Err(_) => {
                    let busy = Refusal::Busy(shared.config.max_pending_handshakes);
                    refuse_now(&stream, &busy);
                    shared.log_refusal(remote, &busy);
                }
            },
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

/// Tells a connection it is refused without waiting on it: the frame goes into the
/// socket's buffer if it fits (it is small), and the connection closes when dropped.
fn refuse_now(stream: &TcpStream, refusal: &Refusal) {
    let mut out = Vec::new();
    if let Some(reason) = refusal.public_reason() {
        if codec::encode(&Frame::Refused { reason }, &mut out).is_ok() {
            let _ = stream.try_write(&out);
        }
    }
}

impl Shared {
    /// Counts a refused connection and logs it, unless one from the same address was
    /// logged less than ten seconds ago.
    fn log_refusal(&self, remote: SocketAddr, reason: &Refusal) {
        self.handshakes_refused.fetch_add(1, Ordering::Relaxed);
        match self.refusals.lock().note(remote.ip(), Instant::now()) {
            Some(suppressed) => warn!(
                remote = %remote,
                reason = %reason,
                suppressed,
                "refused a cluster connection (suppressed: refusals from this address not logged since the last line)"
            ),
            None => debug!(remote = %remote, reason = %reason, "refused a cluster connection"),
        }
    }
}

/// One connection another node dialed: the handshake (holding one of the pending
/// handshakes' permits), then its messages, until it closes.
async fn serve(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    remote: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    let config = &shared.config;
    let _ = stream.set_nodelay(true);
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let handshake = tokio::select! {
        _ = shared.shutdown.cancelled() => return,
        r = tokio::time::timeout(config.handshake_timeout, accept(&shared, &mut stream, &mut rbuf)) => {
            r.unwrap_or(Err(Refusal::Timeout(config.handshake_timeout)))
        }
    };
    let Accepted {
        hello,
        lane,
        opener,
    } = match handshake {
        Ok(accepted) => accepted,
        Err(refusal) => {
            shared.log_refusal(remote, &refusal);
            if let Some(reason) = refusal.public_reason() {
                let mut out = Vec::new();
                if codec::encode(&Frame::Refused { reason }, &mut out).is_ok() {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(200), stream.write_all(&out))
                            .await;
                }
            }
            return;
        }
    };
    drop(permit);
    // A node that dialed this one but is not a peer yet (a node joining through this
    // seed): dial back, so answers can flow.
    let peer = shared.ensure_peer(&hello.node, &hello.cluster_addr);
    info!(peer = %hello.node, remote = %remote, lane, "inbound link open");
    let lane = usize::from(lane);
    let end = match shared.link_runtime(&hello.node, lane) {
        None => {
            read_messages(
                &shared,
                &hello.node,
                peer.lane(lane),
                &mut stream,
                &mut rbuf,
                opener,
            )
            .await
        }
        // The peer's links have a runtime of their own: its messages are read, and
        // handled, there. The socket moves to that runtime's reactor.
        Some(rt) => match stream.into_std() {
            Err(e) => Err(e.to_string()),
            Ok(std) => {
                let tasks = shared.tasks.clone();
                let (on, from) = (Arc::clone(&shared), hello.node.clone());
                let read = async move {
                    let mut stream = TcpStream::from_std(std).map_err(|e| e.to_string())?;
                    let lane = peer.lane(lane);
                    read_messages(&on, &from, lane, &mut stream, &mut rbuf, opener).await
                };
                let task = tasks.spawn_on(read.in_current_span(), rt);
                task.await.unwrap_or_else(|e| Err(e.to_string()))
            }
        },
    };
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

/// Checks records as they arrive and hands their messages on, in order.
async fn read_messages(
    shared: &Shared,
    from: &str,
    lane: &Lane,
    stream: &mut TcpStream,
    rbuf: &mut BytesMut,
    mut opener: Opener,
) -> Result<(), String> {
    let max_frame = shared.config.max_frame;
    let max_record = max_record(max_frame);
    loop {
        while let Some(record) = next_body(rbuf, max_record).map_err(|e| e.to_string())? {
            let frames = opener.open(&record).map_err(|e| e.to_string())?;
            deliver(shared, from, lane, frames, max_frame)?;
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
            Ok(0) => return Err("closed in the middle of a record".into()),
            Ok(n) => {
                lane.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Decodes the frames of one authenticated record and hands each message on. A frame
/// never spans two records.
fn deliver(
    shared: &Shared,
    from: &str,
    lane: &Lane,
    mut frames: &[u8],
    max_frame: usize,
) -> Result<(), String> {
    while let Some(prefix) = frames.first_chunk::<LEN_PREFIX>() {
        let len = codec::body_len(*prefix, max_frame).map_err(|e| e.to_string())?;
        let Some(body) = frames.get(LEN_PREFIX..LEN_PREFIX + len) else {
            return Err("a frame runs past the end of its record".into());
        };
        match codec::decode(body) {
            Ok(Frame::Message(msg)) => {
                lane.frames_received.fetch_add(1, Ordering::Relaxed);
                shared.inbound.on_message(from, msg);
            }
            Ok(_) => return Err("handshake frame after the handshake".into()),
            Err(e) => return Err(e.to_string()),
        }
        frames = &frames[LEN_PREFIX + len..];
    }
    if !frames.is_empty() {
        return Err("a frame's length prefix runs past the end of its record".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::codec::{Message, WireOp};

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

        // After it: a record over what a writer can coalesce.
        let mut raw = Raw::open(a.local_addr(), "b").await;
        raw.write(&(max_record(1024) as u32 + 1).to_le_bytes())
            .await;
        raw.expect_closed().await;

        // A frame over the link's max_frame, inside a record that checks out.
        let mut raw = Raw::open(a.local_addr(), "b").await;
        let mut frame = 1025u32.to_le_bytes().to_vec();
        frame.extend_from_slice(&[0; 1025]);
        raw.send_sealed(&frame).await;
        raw.expect_closed().await;

        // A sender does not send what its peer would refuse.
        let mut small = config("c");
        small.max_frame = 1024;
        let (c, _) = start_with(small).await;
        c.add_peer("a", &a.local_addr().to_string());
        until("c's link", || c.is_connected("a")).await;
        let big = WireOp {
            payload: vec![b'x'; 2000].into(),
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

    /// a's link to b through a proxy that tampers with the first connection; returns
    /// once a's first ping went through (unit 3, the first record after record 0).
    async fn tampered_link(tamper: Tamper) -> (Transport, Transport, Arc<Collect>) {
        let (a, _) = start("a").await;
        let (b, b_in) = start("b").await;
        let proxy = Proxy::start(b.local_addr(), Some(tamper)).await;
        a.add_peer("b", &proxy.addr.to_string());
        until("a's link", || a.is_connected("b")).await;
        a.send("b", ping(1)).unwrap();
        until("the first ping", || !b_in.pings_from("a").is_empty()).await;
        (a, b, b_in)
    }

    /// The link is lost and comes back (the proxy lets the next connection be).
    async fn relinked(a: &Transport) {
        until("a's link back", || {
            a.links()[0].reconnects == 1 && a.is_connected("b")
        })
        .await;
    }

    use super::super::Transport;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flipped_byte_closes_the_link_and_nothing_after_it_is_delivered() {
        let (a, b, b_in) = tampered_link(Tamper::Flip(4)).await;
        a.send("b", ping(2)).unwrap();
        // The link may already be closed by b over the flipped record: then ping 3 is
        // refused here rather than dropped there.
        match a.send("b", ping(3)) {
            Ok(()) | Err(super::super::SendError::NotConnected) => {}
            Err(e) => panic!("{e}"),
        }
        relinked(&a).await;
        a.send("b", ping(4)).unwrap();
        until("the ping on the new link", || {
            b_in.pings_from("a").last() == Some(&4)
        })
        .await;
        assert_eq!(b_in.pings_from("a"), [1, 4]);
        for t in [a, b] {
            t.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replayed_record_closes_the_link() {
        let (a, b, b_in) = tampered_link(Tamper::Replay(3)).await;
        relinked(&a).await;
        a.send("b", ping(2)).unwrap();
        until("the ping on the new link", || {
            b_in.pings_from("a").last() == Some(&2)
        })
        .await;
        assert_eq!(b_in.pings_from("a"), [1, 2], "the replay was not delivered");
        for t in [a, b] {
            t.shutdown().await;
        }
    }
}
