//! The inbound side of links: accept connections, run the acceptor's handshake, then
//! read frames and hand each message to [`Inbound::on_message`](super::Inbound), in the
//! order the peer sent them.
//!
//! A length prefix is checked against the limit before anything is allocated for the
//! body; a frame over the limit, one that does not decode or a handshake frame after
//! `Welcome` closes the connection with a logged reason. A node that dials in and is not
//! a peer yet (a node joining through this seed) is added as one, so answers can flow
//! back on this node's own outbound link.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn, Instrument};

use super::handshake::{accept, Refusal};
use super::{Peer, Shared};
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
    use super::super::testing::*;
    use super::*;
    use crate::codec::{Message, WireOp, PROTOCOL_VERSION};

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
}
