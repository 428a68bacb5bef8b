//! Opening a link: the dialer proves it holds the cluster's secret before the acceptor
//! reads anything else from it.
//!
//! The acceptor sends `Challenge { nonce }`; the dialer answers `Hello` with its protocol
//! version, cluster id, name, address and [`proof`] (HMAC-SHA256 under the secret over
//! the nonce and those fields); the acceptor checks each and answers `Welcome`, or
//! `Refused { reason }` and closes. Until then frames are capped at
//! [`HANDSHAKE_MAX_FRAME`], so a stranger cannot make a node allocate much.
//!
//! The [`writer`](super::writer) calls [`dial`] before it writes; the
//! [`reader`](super::reader) calls [`accept`] on each connection it accepts.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use hmac::{KeyInit, Mac};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::reader::next_body;
use super::Shared;
use crate::codec::{self, CodecError, Frame, Hello, PROTOCOL_VERSION};

pub(super) type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The largest frame accepted before a connection has proven it holds the secret.
pub(super) const HANDSHAKE_MAX_FRAME: usize = 64 * 1024;

/// Why dialing a peer failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum DialError {
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
pub(super) async fn dial(shared: &Shared, addr: &str) -> Result<TcpStream, DialError> {
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
        cluster_addr: shared.advertise.clone(),
        proof: [0; 32],
    };
    hello.proof = proof(config.secret.expose(), &nonce, &hello)
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
pub(super) fn proof(secret: &[u8], nonce: &[u8; 32], hello: &Hello) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(nonce);
    mac.update(&hello.version.to_le_bytes());
    for field in [&hello.cluster_id, &hello.node, &hello.cluster_addr] {
        mac.update(&(field.len() as u64).to_le_bytes());
        mac.update(field.as_bytes());
    }
    mac
}

/// Reads one frame, buffering in `rbuf` what arrives beyond it. `None`: the connection
/// closed cleanly before a frame began.
pub(super) async fn read_frame(
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

/// Why an inbound connection was refused or closed.
#[derive(Debug, thiserror::Error)]
pub(super) enum Refusal {
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

/// The acceptor's side of the handshake: challenge, check the Hello, welcome.
pub(super) async fn accept(
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
    if proof(config.secret.expose(), &nonce, &hello)
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

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use crate::secret::Secret;
    use crate::transport::SendError;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_secret_is_refused_and_the_acceptor_keeps_serving() {
        let (a, a_in) = start("a").await;
        let mut wrong = config("intruder");
        wrong.secret = Secret::from(b"guess");
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
        assert!(
            reason.contains(&format!("protocol version {}", PROTOCOL_VERSION + 1)),
            "{reason}"
        );

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
