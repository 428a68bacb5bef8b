//! Opening a link: both ends prove they hold the cluster's secret, over both ends'
//! nonces and names, and derive the key that authenticates everything the dialer sends
//! after (see [`record`](super::record)).
//!
//! 1. The acceptor sends `Challenge { nonce }`: 32 fresh random bytes.
//! 2. The dialer answers `Hello` (its protocol version, cluster id, name, address and
//!    [`dialer_proof`]) and, in the same write, `DialerNonce`: 32 fresh random bytes of
//!    its own and the lane, which of its connections to this peer this one is
//!    (`Hello`'s layout never changes, so a node of another version can still refuse it
//!    by its version).
//! 3. The acceptor checks the version, the cluster id and the proof, under its current
//!    secret and then its previous one, and answers `Welcome` with its name and
//!    [`acceptor_proof`] under the secret that matched; or `Refused` and closes.
//! 4. The dialer checks the acceptor's proof under the secret it used and, when it dialed
//!    a peer it knows by name, that the acceptor is that peer. Only then does it send
//!    anything else: record 0, empty, sealed under [`link_key`] (a MAC under a key
//!    derived from both nonces and both names). The acceptor's handshake ends when that
//!    record checks out; until then it hands nothing on and dials nothing back.
//!
//! Each proof and the key are HMAC-SHA256 under the secret over a label naming their
//! role, then the version, both nonces and every name, so a proof from one connection
//! or one role is worth nothing on another: a relay that hands one member's challenge
//! to another member it lured into dialing gets a `Hello` the first member accepts, but
//! the lured dialer refuses the `Welcome` of a node it did not mean to dial, and without
//! the secret the relay can neither finish the handshake nor seal a record of its own.
//! A dialer the acceptor refuses learns why only when the reason says nothing about this
//! node: a wrong cluster id, a wrong proof or a bad record 0 is answered
//! [`AUTH_REFUSED`] and logged in full here.
//!
//! A dialer refused with [`AUTH_REFUSED`] under its current secret tries again at once
//! with its previous one, when it has one: during a rotation, a node that has the new
//! secret still reaches a node that has only the old one.
//!
//! Until the handshake is done frames are capped at [`HANDSHAKE_MAX_FRAME`], so a
//! stranger cannot make a node allocate much, and the whole of it is bounded by
//! `handshake_timeout`. The [`writer`](super::writer) calls [`dial`] before it writes;
//! the [`reader`](super::reader) calls [`accept`] on each connection it accepts.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use hmac::{KeyInit, Mac};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use super::reader::next_body;
use super::record::{LinkKey, Opener, RecordError, Sealer};
use super::Shared;
use crate::codec::{self, CodecError, Frame, Hello, Welcome, PROTOCOL_VERSION};
use crate::secret::Secret;

pub(super) type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// The largest frame accepted before a connection has proven it holds the secret.
pub(super) const HANDSHAKE_MAX_FRAME: usize = 64 * 1024;

/// What a dialer that failed to prove itself is told, whatever the detail (logged on
/// the acceptor only): it says nothing of this node's cluster.
pub(super) const AUTH_REFUSED: &str =
    "authentication failed: another cluster, or not the cluster's secret";

const DIALER_PROOF: &[u8] = b"opmesh link: dialer proof";
const ACCEPTOR_PROOF: &[u8] = b"opmesh link: acceptor proof";
const LINK_KEY: &[u8] = b"opmesh link: key for the dialer's records";

/// What the proofs and the key are computed over: the dialer's `Hello` (version,
/// cluster id, name, address; not its proof), both nonces and the lane.
#[derive(Clone, Copy)]
pub(super) struct Transcript<'a> {
    pub(super) hello: &'a Hello,
    pub(super) acceptor_nonce: &'a [u8; 32],
    pub(super) dialer_nonce: &'a [u8; 32],
    pub(super) lane: u16,
}

impl Transcript<'_> {
    /// HMAC-SHA256 under `key` over `label`, the version and the lane (`u16` LE each),
    /// the acceptor's then the dialer's nonce, then the cluster id, the dialer's name and
    /// address and, when given, the acceptor's name. Variable fields go as a `u64` LE
    /// length and their bytes, so no two different splits give the same input.
    fn mac(&self, key: &[u8], label: &[u8], acceptor: Option<&str>) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
        let h = self.hello;
        let version = h.version.to_le_bytes();
        let lane = self.lane.to_le_bytes();
        let fields: [&[u8]; 7] = [
            label,
            &version,
            &lane,
            self.acceptor_nonce,
            self.dialer_nonce,
            h.cluster_id.as_bytes(),
            h.node.as_bytes(),
        ];
        for bytes in fields
            .into_iter()
            .chain([h.cluster_addr.as_bytes()])
            .chain(acceptor.map(str::as_bytes))
        {
            mac.update(&(bytes.len() as u64).to_le_bytes());
            mac.update(bytes);
        }
        mac
    }
}

/// The dialer's proof, sent in its `Hello`: it cannot cover the acceptor's name, which
/// the dialer learns later; record 0 does.
pub(super) fn dialer_proof(secret: &Secret, t: &Transcript<'_>) -> HmacSha256 {
    t.mac(secret.expose(), DIALER_PROOF, None)
}

/// The acceptor's proof, sent in its `Welcome`: over everything the dialer's covers and
/// the acceptor's own name.
pub(super) fn acceptor_proof(secret: &Secret, t: &Transcript<'_>, acceptor: &str) -> HmacSha256 {
    t.mac(secret.expose(), ACCEPTOR_PROOF, Some(acceptor))
}

/// The key of the dialer's records, derived like HKDF: a pseudo-random key extracted
/// from the secret and everything both ends said, then expanded once under the label.
pub(super) fn link_key(secret: &Secret, t: &Transcript<'_>, acceptor: &str) -> LinkKey {
    let prk = t.mac(secret.expose(), LINK_KEY, Some(acceptor)).finalize();
    let mut expand =
        HmacSha256::new_from_slice(&prk.into_bytes()).expect("HMAC takes a key of any length");
    expand.update(LINK_KEY);
    expand.update(&[1]);
    LinkKey::new(&expand.finalize().into_bytes().into())
}

fn tag(mac: HmacSha256) -> [u8; 32] {
    mac.finalize().into_bytes().into()
}

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
    #[error("the acceptor's proof is wrong: it does not hold the secret this node dialed with")]
    AcceptorProof,
    #[error("dialed node `{expected}`, but the node that answered proved it is `{got}`")]
    WrongPeer { expected: String, got: String },
    #[error("connecting and the handshake took over {0:?}")]
    Timeout(Duration),
}

/// A link the dialer opened: the stream, ready for records, and who answered.
pub(super) struct Dialed {
    pub(super) stream: TcpStream,
    /// Seals the dialer's records; record 0 is sent already.
    pub(super) sealer: Sealer,
    /// The name the acceptor proved.
    pub(super) acceptor: String,
}

/// Connects to `addr` and runs the dialer's side of the handshake under the current
/// secret and, if the peer refuses it as [`AUTH_REFUSED`], under the previous one; each
/// attempt within `handshake_timeout`. `expect`: the name of the node meant, when known
/// (a seed is dialed by address only). `lane`: which of this node's connections to the
/// peer this one is.
pub(super) async fn dial(
    shared: &Shared,
    addr: &str,
    expect: Option<&str>,
    lane: u16,
) -> Result<Dialed, DialError> {
    let config = &shared.config;
    let attempt = |secret| {
        let timeout = config.handshake_timeout;
        async move {
            tokio::time::timeout(timeout, dial_with(shared, addr, expect, lane, secret))
                .await
                .unwrap_or(Err(DialError::Timeout(timeout)))
        }
    };
    match (attempt(&config.secret).await, &config.previous_secret) {
        (Err(DialError::Refused(reason)), Some(previous)) if reason == AUTH_REFUSED => {
            debug!(
                addr,
                "the current secret was refused: dialing with the previous one"
            );
            attempt(previous).await
        }
        (result, _) => result,
    }
}

async fn dial_with(
    shared: &Shared,
    addr: &str,
    expect: Option<&str>,
    lane: u16,
    secret: &Secret,
) -> Result<Dialed, DialError> {
    let config = &shared.config;
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut rbuf = BytesMut::with_capacity(256);
    let acceptor_nonce = match read_frame(&mut stream, &mut rbuf, HANDSHAKE_MAX_FRAME).await? {
        Some(Frame::Challenge { nonce }) => nonce,
        Some(Frame::Refused { reason }) => return Err(DialError::Refused(reason)),
        Some(_) => return Err(DialError::Protocol("expected a Challenge")),
        None => return Err(DialError::Closed),
    };
    let dialer_nonce: [u8; 32] = rand::random();
    let mut hello = Hello {
        version: PROTOCOL_VERSION,
        cluster_id: config.cluster_id.clone(),
        node: config.node.clone(),
        cluster_addr: shared.advertise.clone(),
        proof: [0; 32],
    };
    hello.proof = tag(dialer_proof(
        secret,
        &Transcript {
            hello: &hello,
            acceptor_nonce: &acceptor_nonce,
            dialer_nonce: &dialer_nonce,
            lane,
        },
    ));
    let mut out = Vec::with_capacity(256);
    codec::encode(&Frame::Hello(hello.clone()), &mut out)?;
    codec::encode(
        &Frame::DialerNonce {
            nonce: dialer_nonce,
            lane,
        },
        &mut out,
    )?;
    stream.write_all(&out).await?;
    let welcome = match read_frame(&mut stream, &mut rbuf, HANDSHAKE_MAX_FRAME).await? {
        Some(Frame::Welcome(welcome)) => welcome,
        Some(Frame::Refused { reason }) => return Err(DialError::Refused(reason)),
        Some(_) => return Err(DialError::Protocol("expected Welcome or Refused")),
        None => return Err(DialError::Closed),
    };
    let t = Transcript {
        hello: &hello,
        acceptor_nonce: &acceptor_nonce,
        dialer_nonce: &dialer_nonce,
        lane,
    };
    if acceptor_proof(secret, &t, &welcome.node)
        .verify_slice(&welcome.proof)
        .is_err()
    {
        return Err(DialError::AcceptorProof);
    }
    if let Some(expected) = expect.filter(|e| *e != welcome.node) {
        return Err(DialError::WrongPeer {
            expected: expected.to_owned(),
            got: welcome.node,
        });
    }
    if !rbuf.is_empty() {
        return Err(DialError::Protocol("data after Welcome"));
    }
    let mut sealer = Sealer::new(link_key(secret, &t, &welcome.node));
    out.clear();
    Sealer::begin(&mut out);
    sealer.seal(&mut out);
    stream.write_all(&out).await?;
    Ok(Dialed {
        stream,
        sealer,
        acceptor: welcome.node,
    })
}

/// Reads one frame, buffering in `rbuf` what arrives beyond it. `None`: the connection
/// closed cleanly before a frame began.
pub(super) async fn read_frame(
    stream: &mut TcpStream,
    rbuf: &mut BytesMut,
    max: usize,
) -> Result<Option<Frame>, DialError> {
    match read_body(stream, rbuf, max).await? {
        Some(body) => Ok(Some(codec::decode(&body)?)),
        None => Ok(None),
    }
}

/// Reads one length-prefixed body (a frame's or a record's). `None`: the connection
/// closed cleanly before one began.
pub(super) async fn read_body(
    stream: &mut TcpStream,
    rbuf: &mut BytesMut,
    max: usize,
) -> Result<Option<BytesMut>, DialError> {
    loop {
        if let Some(body) = next_body(rbuf, max)? {
            return Ok(Some(body));
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

/// Why an inbound connection was refused or closed. The dialer is told
/// [`Refusal::public_reason`]; the log gets this.
#[derive(Debug, thiserror::Error)]
pub(super) enum Refusal {
    #[error("protocol version {0}, this node speaks {PROTOCOL_VERSION}")]
    Version(u16),
    #[error("cluster id `{theirs}`, this node is in `{ours}`")]
    Cluster { theirs: String, ours: String },
    #[error("the dialer calls itself `{0}`, this node's own name")]
    OwnName(String),
    #[error("bad proof from `{0}`: not the cluster's secret (nor the previous one)")]
    Proof(String),
    #[error("the dialer sent this node's own nonce back")]
    Reflected,
    #[error("`{node}` did not finish the handshake: {error}")]
    Finish { node: String, error: RecordError },
    #[error("`{0}` sent data in its first record, which must be empty")]
    FinishNotEmpty(String),
    #[error("expected Hello")]
    NotHello,
    #[error("expected the dialer's nonce after its Hello")]
    NoNonce,
    #[error("bad frame: {0}")]
    Codec(#[from] CodecError),
    #[error("connection closed during the handshake")]
    Closed,
    #[error("the handshake did not finish within {0:?}")]
    Timeout(Duration),
    #[error("too many connections in the handshake (at most {0})")]
    Busy(usize),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl Refusal {
    /// What the dialer is told, `None` when nothing can be sent. A dialer that has not
    /// proven itself learns nothing of this node's cluster: a wrong cluster id, proof or
    /// record 0 all read [`AUTH_REFUSED`].
    pub(super) fn public_reason(&self) -> Option<String> {
        match self {
            Refusal::Closed | Refusal::Io(_) => None,
            Refusal::Cluster { .. }
            | Refusal::Proof(_)
            | Refusal::Reflected
            | Refusal::Finish { .. }
            | Refusal::FinishNotEmpty(_) => Some(AUTH_REFUSED.to_owned()),
            other => Some(other.to_string()),
        }
    }
}

impl From<DialError> for Refusal {
    fn from(e: DialError) -> Refusal {
        match e {
            DialError::Io(e) => Refusal::Io(e),
            DialError::Codec(e) => Refusal::Codec(e),
            DialError::Closed => Refusal::Closed,
            _ => Refusal::NotHello,
        }
    }
}

/// A link a dialer opened to this node: who it proved it is, which of its lanes this
/// is, and the reader of its records (record 0 read already).
pub(super) struct Accepted {
    pub(super) hello: Hello,
    pub(super) lane: u16,
    pub(super) opener: Opener,
}

/// The acceptor's side of the handshake: challenge, check the `Hello` and the dialer's
/// nonce, welcome with this node's proof, check record 0.
pub(super) async fn accept(
    shared: &Shared,
    stream: &mut TcpStream,
    rbuf: &mut BytesMut,
) -> Result<Accepted, Refusal> {
    let config = &shared.config;
    let acceptor_nonce: [u8; 32] = rand::random();
    let mut out = Vec::with_capacity(128);
    codec::encode(
        &Frame::Challenge {
            nonce: acceptor_nonce,
        },
        &mut out,
    )?;
    stream.write_all(&out).await?;
    let hello = match read_frame(stream, rbuf, HANDSHAKE_MAX_FRAME).await? {
        Some(Frame::Hello(hello)) => hello,
        Some(_) => return Err(Refusal::NotHello),
        None => return Err(Refusal::Closed),
    };
    if hello.version != PROTOCOL_VERSION {
        return Err(Refusal::Version(hello.version));
    }
    let (dialer_nonce, lane) = match read_frame(stream, rbuf, HANDSHAKE_MAX_FRAME).await? {
        Some(Frame::DialerNonce { nonce, lane }) => (nonce, lane),
        Some(_) => return Err(Refusal::NoNonce),
        None => return Err(Refusal::Closed),
    };
    if dialer_nonce == acceptor_nonce {
        return Err(Refusal::Reflected);
    }
    if hello.cluster_id != config.cluster_id {
        return Err(Refusal::Cluster {
            theirs: hello.cluster_id,
            ours: config.cluster_id.clone(),
        });
    }
    let t = Transcript {
        hello: &hello,
        acceptor_nonce: &acceptor_nonce,
        dialer_nonce: &dialer_nonce,
        lane,
    };
    let Some(secret) = config
        .accepted_secrets()
        .find(|s| dialer_proof(s, &t).verify_slice(&hello.proof).is_ok())
    else {
        return Err(Refusal::Proof(hello.node));
    };
    if hello.node == config.node {
        return Err(Refusal::OwnName(hello.node));
    }
    let welcome = Welcome {
        node: config.node.clone(),
        proof: tag(acceptor_proof(secret, &t, &config.node)),
    };
    let mut opener = Opener::new(link_key(secret, &t, &config.node));
    out.clear();
    codec::encode(&Frame::Welcome(welcome), &mut out)?;
    stream.write_all(&out).await?;
    let Some(first) = read_body(stream, rbuf, HANDSHAKE_MAX_FRAME).await? else {
        return Err(Refusal::Closed);
    };
    match opener.open(&first) {
        Ok([]) => Ok(Accepted {
            hello,
            lane,
            opener,
        }),
        Ok(_) => Err(Refusal::FinishNotEmpty(hello.node)),
        Err(error) => Err(Refusal::Finish {
            node: hello.node,
            error,
        }),
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::super::record::{LinkKey, Sealer};
    use super::super::testing::*;
    use super::*;
    use crate::transport::SendError;

    fn with_secrets(node: &str, current: &[u8], previous: Option<&[u8]>) -> crate::ClusterConfig {
        let mut c = config(node);
        c.secret = Secret::from(current);
        c.previous_secret = previous.map(Secret::from);
        c
    }

    /// What one handshake yields: the dialer's proof, the acceptor's, and record 0.
    fn outcome(
        secret: &[u8],
        hello: &Hello,
        nonces: ([u8; 32], [u8; 32]),
        acceptor: &str,
    ) -> ([u8; 32], [u8; 32], Vec<u8>) {
        outcome_on(secret, hello, nonces, 0, acceptor)
    }

    fn outcome_on(
        secret: &[u8],
        hello: &Hello,
        nonces: ([u8; 32], [u8; 32]),
        lane: u16,
        acceptor: &str,
    ) -> ([u8; 32], [u8; 32], Vec<u8>) {
        let secret = Secret::from(secret);
        let t = Transcript {
            hello,
            acceptor_nonce: &nonces.0,
            dialer_nonce: &nonces.1,
            lane,
        };
        let mut record = Vec::new();
        Sealer::begin(&mut record);
        Sealer::new(link_key(&secret, &t, acceptor)).seal(&mut record);
        (
            tag(dialer_proof(&secret, &t)),
            tag(acceptor_proof(&secret, &t, acceptor)),
            record,
        )
    }

    #[test]
    fn the_proofs_and_the_key_bind_both_nonces_both_names_the_lane_and_the_role() {
        let hello = Hello {
            version: 1,
            cluster_id: "ab".into(),
            node: "c".into(),
            cluster_addr: "d:1".into(),
            proof: [0; 32],
        };
        let nonces = ([1; 32], [2; 32]);
        let base = outcome(SECRET, &hello, nonces, "e");
        assert_eq!(base, outcome(SECRET, &hello, nonces, "e"));
        // The role is bound: one side's proof is never the other's.
        assert_ne!(base.0, base.1);
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
        let others = [
            outcome(SECRET, &hello, ([2; 32], [1; 32]), "e"),
            outcome(SECRET, &hello, ([1; 32], [1; 32]), "e"),
            outcome(SECRET, &hello, ([3; 32], [2; 32]), "e"),
            outcome(SECRET, &hello, ([1; 32], [3; 32]), "e"),
            outcome(b"other", &hello, nonces, "e"),
            outcome(SECRET, &moved, nonces, "e"),
            outcome(SECRET, &version, nonces, "e"),
            outcome(SECRET, &addr, nonces, "e"),
            outcome_on(SECRET, &hello, nonces, 1, "e"),
        ];
        for (i, other) in others.iter().enumerate() {
            assert_ne!(other.0, base.0, "dialer's proof, case {i}");
            assert_ne!(other.1, base.1, "acceptor's proof, case {i}");
            assert_ne!(other.2, base.2, "record 0, case {i}");
        }
        // The acceptor's name is in its proof and the key, not in the dialer's proof
        // (the dialer does not know it yet).
        let renamed = outcome(SECRET, &hello, nonces, "f");
        assert_eq!(renamed.0, base.0);
        assert_ne!(renamed.1, base.1);
        assert_ne!(renamed.2, base.2);
        let s = Secret::from(SECRET);
        let t = Transcript {
            hello: &hello,
            acceptor_nonce: &nonces.0,
            dialer_nonce: &nonces.1,
            lane: 0,
        };
        assert!(dialer_proof(&s, &t).verify_slice(&base.0).is_ok());
        assert!(acceptor_proof(&s, &t, "e").verify_slice(&base.1).is_ok());
        assert!(acceptor_proof(&s, &t, "e").verify_slice(&base.0).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_secret_is_refused_and_the_acceptor_keeps_serving() {
        let (a, a_in) = start("a").await;
        let (intruder, _) = start_with(with_secrets("intruder", b"guess", None)).await;
        intruder.add_peer("a", &a.local_addr().to_string());
        until("the refusal", || {
            intruder.links()[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e == format!("refused by peer: {AUTH_REFUSED}"))
        })
        .await;
        assert_eq!(intruder.send("a", ping(1)), Err(SendError::NotConnected));
        assert!(!intruder.is_connected("a"));

        // By hand: a bad proof, then a message anyway.
        let mut raw = Raw::connect(a.local_addr()).await;
        raw.send_hello("intruder", PROTOCOL_VERSION, "test", b"guess")
            .await;
        raw.send(&Frame::Message(ping(2))).await;
        assert_eq!(raw.expect_refused().await, AUTH_REFUSED);

        let (good, _) = start("good").await;
        still_serves(&a, &a_in, &good, "good").await;
        assert_eq!(a_in.count(), 1, "nothing from the intruder");
        // The refused dialer never became a peer.
        assert!(a.links().iter().all(|l| l.peer == "good"));
        assert!(a.handshakes_refused() >= 2);
        for t in [a, intruder, good] {
            t.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_version_cluster_or_name_is_refused_and_the_cluster_id_never_told() {
        let mut secretive = config("a");
        secretive.cluster_id = "hidden-cluster-id".into();
        let (a, a_in) = start_with(secretive).await;
        let mut raw = Raw::connect(a.local_addr()).await;
        raw.send_hello("future", PROTOCOL_VERSION + 1, "hidden-cluster-id", SECRET)
            .await;
        let reason = raw.expect_refused().await;
        assert!(
            reason.contains(&format!("protocol version {}", PROTOCOL_VERSION + 1)),
            "{reason}"
        );

        // Another cluster id, even with the right secret: told nothing of this one's.
        let mut raw = Raw::connect(a.local_addr()).await;
        raw.send_hello("stranger", PROTOCOL_VERSION, "foreign", SECRET)
            .await;
        let reason = raw.expect_refused().await;
        assert_eq!(reason, AUTH_REFUSED);
        assert!(!reason.contains("hidden") && !reason.contains("foreign"));

        // Its own name, proven: a node that holds the secret may be told.
        let mut raw = Raw::connect(a.local_addr()).await;
        raw.send_hello("a", PROTOCOL_VERSION, "hidden-cluster-id", SECRET)
            .await;
        let reason = raw.expect_refused().await;
        assert!(reason.contains("this node's own name"), "{reason}");

        // The Hello without the dialer's nonce after it.
        let mut raw = Raw::connect(a.local_addr()).await;
        let hello = signed_hello(
            "b",
            PROTOCOL_VERSION,
            "hidden-cluster-id",
            SECRET,
            &raw.nonce,
            &[7; 32],
        );
        raw.send(&Frame::Hello(hello)).await;
        raw.send(&Frame::Message(ping(1))).await;
        assert!(raw.expect_refused().await.contains("the dialer's nonce"));

        // The acceptor's own nonce sent back as the dialer's.
        let mut raw = Raw::connect(a.local_addr()).await;
        let nonce = raw.nonce;
        let hello = signed_hello(
            "b",
            PROTOCOL_VERSION,
            "hidden-cluster-id",
            SECRET,
            &nonce,
            &nonce,
        );
        raw.send(&Frame::Hello(hello)).await;
        raw.send(&Frame::DialerNonce { nonce, lane: 0 }).await;
        assert_eq!(raw.expect_refused().await, AUTH_REFUSED);

        // A right Hello is welcomed, the acceptor proves itself, and records are delivered.
        let mut raw = Raw::connect(a.local_addr()).await;
        raw.send_hello("b", PROTOCOL_VERSION, "hidden-cluster-id", SECRET)
            .await;
        assert_eq!(raw.finish().await.node, "a");
        raw.send_record(&[ping(3)]).await;
        until("the ping", || a_in.pings_from("b") == [3]).await;
        a.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_or_a_stalled_handshake_closes_the_connection_and_the_node_keeps_serving() {
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

        // Silence, or a dialer that stops after the Welcome: the timeout bounds the whole
        // handshake.
        let mut quick = config("a2");
        quick.handshake_timeout = Duration::from_millis(100);
        let (a2, a2_in) = start_with(quick).await;
        let mut raw = Raw::connect(a2.local_addr()).await;
        assert!(raw.expect_refused().await.contains("did not finish within"));
        let mut raw = Raw::connect(a2.local_addr()).await;
        raw.send_hello("b", PROTOCOL_VERSION, "test", SECRET).await;
        assert!(matches!(raw.next().await, Some(Frame::Welcome(_))));
        raw.expect_closed().await;
        assert!(a2.links().is_empty(), "no peer for an unfinished handshake");
        assert_eq!(a2_in.count(), 0);

        // A first record that is not the one the key gives.
        let mut raw = Raw::connect(a.local_addr()).await;
        raw.send_hello("b", PROTOCOL_VERSION, "test", SECRET).await;
        assert!(matches!(raw.next().await, Some(Frame::Welcome(_))));
        raw.send(&Frame::Message(ping(1))).await;
        raw.expect_closed().await;

        // After the handshake: a bare frame instead of a record, then a record whose
        // frame does not decode.
        let mut raw = Raw::open(a.local_addr(), "b").await;
        raw.send_record(&[ping(1)]).await;
        raw.send(&Frame::Message(ping(2))).await;
        raw.expect_closed().await;
        let mut raw = Raw::open(a.local_addr(), "b").await;
        raw.send_record(&[ping(3)]).await;
        raw.send_sealed(&[3, 0, 0, 0, 20, 1, 2]).await;
        raw.send_record(&[ping(4)]).await;
        raw.expect_closed().await;
        assert_eq!(a_in.pings_from("b"), [1, 3], "nothing after a bad record");

        let (good, _) = start("good").await;
        still_serves(&a, &a_in, &good, "good").await;
        for t in [a, a2, good] {
            t.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_current_or_the_previous_secret_opens_a_link() {
        // Mid-rotation: B is current, A previous. Dialers with either get in.
        let (mid, mid_in) = start_with(with_secrets("mid", b"B", Some(b"A"))).await;
        let (old, _) = start_with(with_secrets("old", b"A", None)).await;
        let (new, _) = start_with(with_secrets("new", b"B", None)).await;
        let (wrong, _) = start_with(with_secrets("wrong", b"C", Some(b"D"))).await;
        for t in [&old, &new, &wrong] {
            t.add_peer("mid", &mid.local_addr().to_string());
        }
        until("old's link", || old.is_connected("mid")).await;
        until("new's link", || new.is_connected("mid")).await;
        old.send("mid", ping(1)).unwrap();
        new.send("mid", ping(2)).unwrap();
        until("both pings", || {
            mid_in.pings_from("old") == [1] && mid_in.pings_from("new") == [2]
        })
        .await;
        until("wrong's refusal", || {
            wrong.links()[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains(AUTH_REFUSED))
        })
        .await;
        assert!(!wrong.is_connected("mid"));

        // And the other way: mid dials each with B, falling back to A for `old`.
        until("mid's links back", || {
            mid.is_connected("old") && mid.is_connected("new")
        })
        .await;
        assert_eq!(mid.peer_identity("old").as_deref(), Some("old"));

        // Rotated: only B. A node left with only A cannot connect, either way.
        let (done, done_in) = start_with(with_secrets("done", b"B", None)).await;
        let (stale, _) = start_with(with_secrets("stale", b"A", None)).await;
        stale.add_peer("done", &done.local_addr().to_string());
        done.add_peer("stale", &stale.local_addr().to_string());
        until("both refusals", || {
            [(&stale, "done"), (&done, "stale")].iter().all(|(t, _)| {
                t.links()[0]
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains(AUTH_REFUSED))
            })
        })
        .await;
        assert!(!stale.is_connected("done") && !done.is_connected("stale"));
        assert_eq!(done_in.count(), 0);
        for t in [mid, old, new, wrong, done, stale] {
            t.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_lured_to_dial_another_member_refuses_it() {
        // b believes `a` is at an address where a relay forwards to member c: c's
        // challenge reaches b, b's proof reaches c, c's Welcome reaches b.
        let (b, _) = start("b").await;
        let (c, c_in) = start("c").await;
        let relay = Proxy::start(c.local_addr(), None).await;
        b.add_peer("a", &relay.addr.to_string());
        until("b's refusal", || {
            b.links()[0].last_error.as_deref()
                == Some("dialed node `a`, but the node that answered proved it is `c`")
        })
        .await;
        assert!(!b.is_connected("a"));
        // b sent nothing after c's Welcome, so c never finished the handshake: it took
        // nothing and dialed nothing back.
        until("c's refusal", || c.handshakes_refused() >= 1).await;
        assert!(c.links().is_empty());
        assert_eq!(c_in.count(), 0);
        for t in [b, c] {
            t.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_relay_that_forwards_one_members_proof_to_another_gets_nothing_in() {
        let (a, a_in) = start("a").await;
        let (b, _) = start("b").await;
        // The attacker opens a connection to a and takes a's challenge...
        let mut to_a = Raw::connect(a.local_addr()).await;
        // ...and lures b into dialing it as a seed (b knows no name to expect).
        let lure = TcpListener::bind("127.0.0.1:0").await.unwrap();
        b.add_seed("seed", &lure.local_addr().unwrap().to_string());
        let (mut from_b, _) = bounded("b's dial", lure.accept()).await.unwrap();
        let mut out = Vec::new();
        codec::encode(&Frame::Challenge { nonce: to_a.nonce }, &mut out).unwrap();
        from_b.write_all(&out).await.unwrap();
        // b's Hello and nonce, proven over a's challenge, forwarded to a as they are.
        let mut rbuf = BytesMut::new();
        for _ in 0..2 {
            let frame = read_frame(&mut from_b, &mut rbuf, HANDSHAKE_MAX_FRAME)
                .await
                .unwrap()
                .unwrap();
            to_a.send(&frame).await;
        }
        // a takes the proof and welcomes "b", proving itself...
        let Some(Frame::Welcome(welcome)) = to_a.next().await else {
            panic!("a welcomes the relayed Hello");
        };
        assert_eq!(welcome.node, "a");
        // ...but the relay holds no key: its own record, or a bare message, closes the
        // connection before a hands anything on or dials "b" back.
        let mut forged = Vec::new();
        Sealer::begin(&mut forged);
        codec::encode(&ping(666), &mut forged).unwrap();
        Sealer::new(LinkKey::new(&[0; 32])).seal(&mut forged);
        to_a.write(&forged).await;
        to_a.send(&Frame::Message(ping(667))).await;
        to_a.expect_closed().await;
        assert_eq!(a_in.count(), 0);
        assert!(a.links().is_empty(), "a did not take the relay for b");
        for t in [a, b] {
            t.shutdown().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_beyond_the_pending_handshakes_are_refused_at_once() {
        let mut few = config("a");
        few.max_pending_handshakes = 2;
        few.handshake_timeout = Duration::from_secs(5);
        let (a, a_in) = start_with(few).await;
        // Two strangers sit in the handshake.
        let first = Raw::connect(a.local_addr()).await;
        let _second = Raw::connect(a.local_addr()).await;
        let mut third = Raw::connect_only(a.local_addr()).await;
        let reason = third.expect_refused().await;
        assert!(
            reason.contains("too many connections in the handshake"),
            "{reason}"
        );
        until("the refusal counted", || a.handshakes_refused() == 1).await;

        // One leaves: a node that holds the secret gets in.
        drop(first);
        let (good, _) = start("good").await;
        still_serves(&a, &a_in, &good, "good").await;
        for t in [a, good] {
            t.shutdown().await;
        }
    }
}
