//! The writer of one lane of a peer: dial, handshake, then write what the lane's outbox
//! holds, until the peer is removed or the transport stops.
//!
//! [`Transport::send`](super::Transport::send) only queues; this task takes the whole
//! queue at once, encodes it into one reused buffer as one [`record`](super::record),
//! seals it and writes it with one `write_all` (at `flush_bytes`, or when the queue is
//! empty), so one system call and one MAC carry many frames under load. A lost
//! connection discards what waited (counted as dropped) and redials with exponential
//! backoff and jitter (the engine's [`Backoff`], jittered in the upper half); a new
//! address for the peer redials at once. Each dial checks that the node answering is
//! the peer (see [`handshake`](super::handshake)).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use opmesh_actors::{Backoff, Jitter};

use super::handshake::{dial, Dialed};
use super::record::Sealer;
use super::{Lane, Peer, Shared};
use crate::codec::{self, Message};

/// While a peer stays unreachable, how often it is logged again (with the failed
/// attempts since), beside the line when it goes and the one when it comes back.
const STILL_DOWN_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Why a link ended.
enum LinkEnd {
    /// The writer was told to stop.
    Stopped,
    /// The peer has a new address: dial it now.
    Moved,
    Lost(String),
}

/// The writer of lane `index` of a peer: dial, handshake, then write what is queued,
/// until stopped. The link is up, for the layers above, while every lane is.
pub(super) async fn run_link(shared: Arc<Shared>, peer: Arc<Peer>, index: usize) {
    let lane = &peer.lanes[index];
    let config = &shared.config;
    let mut backoff =
        Backoff::doubling(config.reconnect_min, config.reconnect_max, Jitter::Half).series();
    let mut ever_up = false;
    // The failure last logged as a warning, when, and the failed attempts since: a peer
    // that stays down is warned about once per distinct error and then once every
    // STILL_DOWN_EVERY, not at every retry.
    let mut warned: Option<String> = None;
    let mut warned_at = tokio::time::Instant::now();
    let mut failed_since_warned: u64 = 0;
    // Reused across connections: the encode buffer and the batch taken from the outbox.
    let mut buf = Vec::with_capacity(config.flush_bytes + 4096);
    let mut batch: Vec<Message> = Vec::new();
    loop {
        let addr = peer.addr.lock().clone();
        let attempt = tokio::select! {
            _ = peer.stop.cancelled() => break,
            r = dial(&shared, &addr, peer.expect.as_deref(), index as u16) => r,
        };
        let error = match attempt {
            Ok(Dialed {
                mut stream,
                mut sealer,
                acceptor,
            }) => {
                if ever_up {
                    peer.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                ever_up = true;
                warned = None;
                backoff.reset();
                *peer.identity.lock() = Some(acceptor);
                lane.outbox.lock().connected = true;
                let all_up = peer.lanes_open.fetch_add(1, Ordering::AcqRel) + 1 == peer.lanes.len();
                shared.link_up.notify_waiters();
                if all_up {
                    info!(addr = %addr, lanes = peer.lanes.len(), "link up");
                    shared.inbound.on_link(&peer.name, true);
                }
                let end = pump(
                    &shared,
                    &peer,
                    lane,
                    &mut stream,
                    &mut sealer,
                    &mut buf,
                    &mut batch,
                )
                .await;
                peer.count_dropped(lane.disconnect());
                if peer.lanes_open.fetch_sub(1, Ordering::AcqRel) == peer.lanes.len() {
                    shared.inbound.on_link(&peer.name, false);
                }
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
            Err(e) => Some(e.to_string()),
        };
        if let Some(error) = error {
            peer.record_error(&error);
            if warned.as_deref() != Some(error.as_str()) {
                warn!(addr = %addr, error = %error, "cannot reach peer; retrying with backoff");
                warned = Some(error);
                warned_at = tokio::time::Instant::now();
                failed_since_warned = 0;
            } else if warned_at.elapsed() >= STILL_DOWN_EVERY {
                failed_since_warned += 1;
                warn!(addr = %addr, error = %error, attempts = failed_since_warned,
                    since_secs = warned_at.elapsed().as_secs(), "still cannot reach peer");
                warned_at = tokio::time::Instant::now();
                failed_since_warned = 0;
            } else {
                failed_since_warned += 1;
                debug!(addr = %addr, error = %error, "cannot reach peer");
            }
        }
        let wait = backoff.next_wait(rand::random::<f64>());
        tokio::select! {
            _ = peer.stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
            _ = lane.redial.notified() => {}
        }
    }
    peer.count_dropped(lane.disconnect());
    debug!("link writer stopped");
}

/// Writes what the outbox holds, coalesced into sealed records, until the link fails or
/// the writer is stopped.
async fn pump(
    shared: &Shared,
    peer: &Peer,
    lane: &Lane,
    stream: &mut TcpStream,
    sealer: &mut Sealer,
    buf: &mut Vec<u8>,
    batch: &mut Vec<Message>,
) -> LinkEnd {
    let config = &shared.config;
    buf.clear();
    Sealer::begin(buf);
    let (mut rd, mut wr) = stream.split();
    // The acceptor never writes after Welcome: a read that returns is the connection
    // closing, noticed even while nothing is sent.
    let mut probe = [0u8; 64];
    loop {
        tokio::select! {
            biased;
            _ = peer.stop.cancelled() => return LinkEnd::Stopped,
            _ = lane.redial.notified() => return LinkEnd::Moved,
            r = rd.read(&mut probe) => return LinkEnd::Lost(match r {
                Ok(0) => "closed by peer".into(),
                Ok(_) => "peer wrote on a send-only link".into(),
                Err(e) => e.to_string(),
            }),
            _ = lane.wake.notified() => {}
        }
        if !config.linger.is_zero() {
            tokio::select! {
                _ = peer.stop.cancelled() => return LinkEnd::Stopped,
                _ = tokio::time::sleep(config.linger) => {}
            }
        }
        // Until the outbox stays empty: what arrives during a write goes in the next one.
        loop {
            {
                let mut outbox = lane.outbox.lock();
                std::mem::swap(&mut outbox.queue, batch);
                // What the last batch took is written (or was dropped).
                outbox.writing = std::mem::take(&mut outbox.queued);
            }
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
                    if Sealer::is_empty(buf) {
                        // Everything in it was dropped.
                        continue;
                    }
                    sealer.seal(buf);
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
                    lane.frames_sent.fetch_add(pending, Ordering::Relaxed);
                    lane.bytes_sent
                        .fetch_add(buf.len() as u64, Ordering::Relaxed);
                    pending = 0;
                    buf.clear();
                    Sealer::begin(buf);
                }
            }
        }
        // One oversized batch should not pin its buffer for the life of the link.
        if buf.capacity() > 4 * config.flush_bytes.max(64 * 1024) {
            buf.shrink_to(config.flush_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64};

    use super::super::testing::*;
    use super::super::{Inbound, SendError, Transport};
    use super::*;

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
        let b = Transport::start(&config("b"), Arc::clone(&b_in) as Arc<dyn Inbound>)
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
        // Every frame is as long as this one (with its prefix).
        let mut one = Vec::new();
        codec::encode(&Message::OpBatch(vec![small_op(0)]), &mut one).unwrap();
        assert!(
            stats.bytes_sent >= N * one.len() as u64,
            "every frame's bytes went out"
        );
        a.shutdown().await;
        b.shutdown().await;
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
}
