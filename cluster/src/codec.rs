//! The wire format: what every frame on a cluster link carries, and the one `encode` /
//! `decode` pair for it.
//!
//! A link carries length-prefixed frames. The prefix is a `u32`, little-endian, counting
//! the bytes of the body that follows (the prefix itself excluded). The body is one byte
//! naming the variant, then the variant's fields:
//!
//! | tag | frame                 | fields (wincode, bincode layout: little-endian, `u64` lengths) |
//! |-----|-----------------------|-----------------------------------------------------------------|
//! | 0   | `Challenge`           | `nonce: [u8; 32]`                                               |
//! | 1   | `Hello`               | [`Hello`]                                                       |
//! | 2   | `Welcome`             | [`Welcome`]                                                     |
//! | 3   | `Refused`             | `reason: String`                                                |
//! | 4   | `DialerNonce`         | `nonce: [u8; 32], lane: u16`                                    |
//! | 16  | `Message::OpBatch`    | a varint count, then that many [`WireOp`] (see below)           |
//! | 17  | `Message::ReplyBatch` | `seq: u64`, then a varint count and that many [`WireReply`]     |
//! | 18  | `Message::Request`    | `id: u64`, then the [`Rpc`] as postcard, to the end of the body |
//! | 19  | `Message::Response`   | `id: u64`, then the [`RpcReply`] as postcard, to the end        |
//! | 20  | `Message::Ping`       | `seq: u64, load: u64`, a `u64` count of overloaded types and    |
//! |     |                       | the types, a `u64` count of [`OpenBreaker`]s and the breakers   |
//! | 21  | `Message::Pong`       | the same as `Ping`                                              |
//! | 22  | `Message::ReplyAck`   | `u64` count, then that many `seq: u64`                          |
//!
//! opmesh's own frames derive wincode, but for the records of the two that carry the
//! traffic: operations and their outcomes are written and read by hand (the `ops`
//! module: varint lengths, a flags byte for absent fields, payloads shared rather than
//! copied). openraft's RPC types implement only serde, so they travel as postcard inside
//! the frame.
//!
//! The envelope is versioned by the handshake: a dialer's `Hello` names the
//! [`PROTOCOL_VERSION`] it speaks and a link opens only when both sides speak the same one.
//! Tags 0–3 and the layout of `Challenge`, `Hello` and `Refused` never change, so a node of
//! any version can refuse another with a reason it understands. A change to any other
//! frame raises the version.
//!
//! Frames 0–4 are the handshake and travel bare. Once a link is open, messages travel
//! inside authenticated records: a `u32` LE length, the frames a writer coalesced (each
//! with its own prefix, as above) and a keyed BLAKE3 tag (see the transport's `record`
//! module).
//!
//! Decoding never panics and never trusts a declared length: a sequence of records may not
//! declare more records than the rest of the body could hold and byte strings are checked
//! against the body before they are allocated, so a frame never makes `decode` reserve
//! more than a small multiple of its own size.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use opmesh_actors::OpType;

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use wincode::config::DefaultConfig;
use wincode::context;
use wincode::{SchemaRead, SchemaReadContext, SchemaWrite};

use crate::types::{CommandResult, Member, NodeRecord, RaftId, Request, TypeConfig};

/// The version of the frames below. A dialer whose `Hello` names another is refused.
///
/// 3: the handshake proves both ends (`DialerNonce`, `Welcome` with the acceptor's proof)
/// and messages travel in authenticated records; Raft writes, joins and leaves carry who
/// asked for them (the audit trail), and a forwarded operation its submitter.
/// 4: reply batches carry a sequence number and are acknowledged (`ReplyAck`);
/// heartbeats carry the sender's overloaded types.
/// 5: heartbeats carry the sender's open circuit breakers.
/// 6: records are authenticated with keyed BLAKE3 instead of HMAC-SHA256.
/// 7: a node opens several connections to a peer (lanes): `DialerNonce` names the lane,
/// and the proofs and the link key cover it.
/// 8: operations and replies in their compact hand-written layout (varints, flags).
/// 9: a record's tag covers its frames first, then its sequence number and length.
pub const PROTOCOL_VERSION: u16 = 9;

/// Bytes of the length prefix in front of every frame body.
pub const LEN_PREFIX: usize = 4;

/// What links carry once the handshake is done.
#[derive(Debug, Clone)]
pub enum Message {
    /// Operations forwarded to the node that owns them.
    OpBatch(Vec<WireOp>),
    /// The same, encoded by the sender where it holds them (the origin's outbox): sent
    /// as an `OpBatch` frame, read back as [`Message::OpBatch`], never decoded as this.
    EncodedOps(EncodedOps),
    /// Their outcomes, back to the node they came from: batch `seq` of the sender's
    /// replies to that node, kept by the sender until acknowledged.
    ReplyBatch {
        seq: u64,
        replies: Arc<Vec<WireReply>>,
    },
    /// The same, encoded by the sender as the outcomes completed (the owner's reply
    /// collector) and kept so until acknowledged: sent as a `ReplyBatch` frame, read back
    /// as [`Message::ReplyBatch`], never decoded as this.
    EncodedReplies {
        seq: u64,
        replies: Arc<EncodedReplies>,
    },
    /// The reply batches with these sequence numbers arrived.
    ReplyAck {
        seqs: Vec<u64>,
    },
    /// A request that expects one [`Message::Response`] with the same `id`.
    Request {
        id: u64,
        body: Rpc,
    },
    Response {
        id: u64,
        body: RpcReply,
    },
    /// Heartbeats; `load` is the number of operations in flight on the sender,
    /// `overloaded` the types whose queue there is over its high watermark,
    /// `open_breakers` the types whose circuit breaker there is open.
    Ping {
        seq: u64,
        load: u64,
        overloaded: Vec<String>,
        open_breakers: Vec<OpenBreaker>,
    },
    Pong {
        seq: u64,
        load: u64,
        overloaded: Vec<String>,
        open_breakers: Vec<OpenBreaker>,
    },
}

impl Message {
    /// About the bytes it takes, queued or encoded: its variable parts and a fixed part
    /// for the rest. What a link's outbox counts against `cluster.link_buffer_bytes`.
    pub fn size_hint(&self) -> usize {
        match self {
            Message::OpBatch(ops) => 16 + ops.iter().map(WireOp::size_hint).sum::<usize>(),
            Message::EncodedOps(ops) => 16 + ops.body.len(),
            Message::ReplyBatch { replies, .. } => {
                16 + replies.iter().map(WireReply::size_hint).sum::<usize>()
            }
            Message::EncodedReplies { replies, .. } => 16 + replies.records.len(),
            Message::ReplyAck { seqs } => 16 + 8 * seqs.len(),
            // Raft's messages are small but for entries and snapshots, which carry
            // routes and registry changes: kilobytes, not what fills a link.
            Message::Request { .. } | Message::Response { .. } => 256,
            Message::Ping {
                overloaded,
                open_breakers,
                ..
            }
            | Message::Pong {
                overloaded,
                open_breakers,
                ..
            } => {
                32 + overloaded.iter().map(|t| 8 + t.len()).sum::<usize>()
                    + open_breakers
                        .iter()
                        .map(|b| 16 + b.op_type.len())
                        .sum::<usize>()
            }
        }
    }

    /// Whether it carries operations or their outcomes (what a full link refuses: see
    /// `Transport::send`), rather than the cluster's own upkeep.
    pub fn is_bulk(&self) -> bool {
        matches!(
            self,
            Message::OpBatch(_)
                | Message::EncodedOps(_)
                | Message::ReplyBatch { .. }
                | Message::EncodedReplies { .. }
        )
    }
}

impl WireOp {
    /// Its fields, lent to the encoder.
    pub fn fields(&self) -> OpFields<'_> {
        OpFields {
            id: self.id,
            op_type: &self.op_type,
            key: self.key.as_deref(),
            idempotency_key: self.idempotency_key.as_deref(),
            payload: &self.payload,
            metadata: &self.metadata,
            priority: self.priority,
            remaining_us: self.remaining_us,
            trace: self.trace,
            owner: self.owner.as_deref(),
        }
    }

    /// About the bytes it takes: its strings, payload and metadata and a fixed part.
    pub fn size_hint(&self) -> usize {
        96 + self.op_type.len()
            + self.key.as_ref().map_or(0, String::len)
            + self.idempotency_key.as_ref().map_or(0, String::len)
            + self.payload.len()
            + self
                .metadata
                .iter()
                .map(|(k, v)| 16 + k.len() + v.len())
                .sum::<usize>()
            + self.owner.as_ref().map_or(0, |o| o.len())
    }
}

impl WireReply {
    /// About the bytes it takes: its result, its error and a fixed part for the rest.
    pub fn size_hint(&self) -> usize {
        64 + self.result.as_ref().map_or(0, Bytes::len) + self.error.as_ref().map_or(0, String::len)
    }

    /// Its fields, lent to the encoder.
    pub fn fields(&self) -> ReplyFields<'_> {
        ReplyFields {
            id: self.id,
            status: self.status,
            result: self.result.as_deref(),
            error: self.error.as_deref(),
            cached: self.cached,
            attempts: self.attempts,
        }
    }
}

/// What a [`WireReply`] carries, borrowed from wherever it lives: what the encoder
/// reads.
#[derive(Debug, Clone, Copy)]
pub struct ReplyFields<'a> {
    pub id: u128,
    pub status: u8,
    pub result: Option<&'a [u8]>,
    pub error: Option<&'a str>,
    pub cached: bool,
    pub attempts: u32,
}

/// Replies encoded one by one as their operations complete, where the sender gathers
/// them: the records of a `ReplyBatch` frame (its count and sequence number are written
/// when it is sent), and their ids (what the sender's ledger walks when the batch is
/// acknowledged or dropped). Kept so, not as wire values, until acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncodedReplies {
    records: Vec<u8>,
    ids: Vec<u128>,
}

impl EncodedReplies {
    /// Room for `replies` replies of `bytes` bytes in all.
    pub fn with_capacity(replies: usize, bytes: usize) -> EncodedReplies {
        EncodedReplies {
            records: Vec::with_capacity(bytes),
            ids: Vec::with_capacity(replies),
        }
    }

    /// Encodes one more reply.
    pub fn push(&mut self, reply: &ReplyFields<'_>) {
        ops::put_reply(&mut self.records, reply);
        self.ids.push(reply.id);
    }

    /// The replies' ids, in order.
    pub fn ids(&self) -> &[u128] {
        &self.ids
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The bytes of its records: what it takes in a frame, less a few of the header.
    pub fn bytes(&self) -> usize {
        self.records.len()
    }
}

impl<'a> FromIterator<ReplyFields<'a>> for EncodedReplies {
    fn from_iter<I: IntoIterator<Item = ReplyFields<'a>>>(replies: I) -> Self {
        let mut encoded = EncodedReplies::default();
        for r in replies {
            encoded.push(&r);
        }
        encoded
    }
}

/// A type whose circuit breaker is open on the node that sends the heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, SchemaWrite, SchemaRead)]
pub struct OpenBreaker {
    pub op_type: String,
    /// How long it stays open from when the heartbeat was sent, in milliseconds.
    pub open_ms: u64,
}

/// Bytes of the smallest [`OpenBreaker`]: an empty type name's length and `open_ms`.
const MIN_OPEN_BREAKER: usize = 16;

/// One operation, as forwarded to its owner. Its type name, payload and owner are shared
/// with the operation it was made from (and, read back, a batch's operations of one type
/// share one name).
#[derive(Debug, Clone, PartialEq)]
pub struct WireOp {
    pub id: u128,
    pub op_type: OpType,
    pub key: Option<String>,
    pub idempotency_key: Option<String>,
    /// The operation's JSON payload, as bytes.
    pub payload: Bytes,
    pub metadata: BTreeMap<String, String>,
    pub priority: i32,
    /// Time left until the deadline when the frame was sent; `None`: no deadline.
    pub remaining_us: Option<u64>,
    /// The sender's span, so the owner's span is its child.
    pub trace: Option<WireTrace>,
    /// Who submitted it (the API token's name), when the origin checks tokens.
    pub owner: Option<Arc<str>>,
}

/// A [`WireOp`]'s fields, borrowed from wherever the operation is kept: what is encoded.
#[derive(Debug, Clone, Copy)]
pub struct OpFields<'a> {
    pub id: u128,
    pub op_type: &'a str,
    pub key: Option<&'a str>,
    pub idempotency_key: Option<&'a str>,
    pub payload: &'a [u8],
    pub metadata: &'a BTreeMap<String, String>,
    pub priority: i32,
    pub remaining_us: Option<u64>,
    pub trace: Option<WireTrace>,
    pub owner: Option<&'a str>,
}

/// Operations encoded once, where the sender holds them: an `OpBatch` frame's body,
/// and the operations' ids (what a refused batch hands back).
#[derive(Debug, Clone)]
pub struct EncodedOps {
    body: Vec<u8>,
    ids: Vec<u128>,
}

impl EncodedOps {
    /// Encodes `ops` as the body of an `OpBatch` frame.
    pub fn new<'a>(ops: impl ExactSizeIterator<Item = OpFields<'a>>) -> EncodedOps {
        let mut body = Vec::with_capacity(16 + 96 * ops.len());
        body.push(tag::OP_BATCH);
        let mut ids = Vec::with_capacity(ops.len());
        ops::put_ops(&mut body, ops.inspect(|op| ids.push(op.id)));
        EncodedOps { body, ids }
    }

    /// The operations' ids, in order.
    pub fn ids(&self) -> &[u128] {
        &self.ids
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// A span context carried across nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireTrace {
    pub trace_id: u128,
    pub span_id: u64,
    pub flags: u8,
}

/// The outcome of one [`WireOp`], back to the node it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct WireReply {
    pub id: u128,
    pub status: u8,
    /// The result's JSON, as bytes (shared with the outcome it was made from).
    pub result: Option<Bytes>,
    pub error: Option<String>,
    /// Answered from the idempotency cache.
    pub cached: bool,
    pub attempts: u32,
}

/// A request between nodes: Raft's RPCs and writes to the replicated state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Rpc {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<RaftId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A write for the leader to replicate, with who asked for it.
    ClientWrite(Request),
    /// A node asks to join; `by` asked it to (see [`AuditEntry::by`](crate::types::AuditEntry)).
    Join {
        record: NodeRecord,
        by: String,
    },
    /// A node leaves; `by` asked it to.
    Leave {
        name: String,
        by: String,
    },
    /// A node with no cluster yet asks whether the receiver belongs to one, before it
    /// decides to bootstrap (see [`crate::formation`]).
    Probe,
}

/// The answer to an [`Rpc`], variant for variant; `Error` when the receiver could not
/// handle the request at all.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum RpcReply {
    AppendEntries(AppendEntriesResponse<RaftId>),
    Vote(VoteResponse<RaftId>),
    InstallSnapshot(Result<InstallSnapshotResponse<RaftId>, String>),
    Written(Result<CommandResult, WriteRefused>),
    Joined(Result<(), WriteRefused>),
    Left(Result<(), WriteRefused>),
    /// Whether the receiver belongs to a cluster (its Raft group is initialized).
    Probed {
        member: bool,
    },
    Error(String),
}

// openraft's response types are not `Clone`; they are small values, copied field by field.
impl Clone for RpcReply {
    fn clone(&self) -> Self {
        match self {
            RpcReply::AppendEntries(r) => RpcReply::AppendEntries(match r {
                AppendEntriesResponse::Success => AppendEntriesResponse::Success,
                AppendEntriesResponse::PartialSuccess(log_id) => {
                    AppendEntriesResponse::PartialSuccess(*log_id)
                }
                AppendEntriesResponse::Conflict => AppendEntriesResponse::Conflict,
                AppendEntriesResponse::HigherVote(vote) => AppendEntriesResponse::HigherVote(*vote),
            }),
            RpcReply::Vote(r) => RpcReply::Vote(r.clone()),
            RpcReply::InstallSnapshot(r) => RpcReply::InstallSnapshot(match r {
                Ok(r) => Ok(InstallSnapshotResponse { vote: r.vote }),
                Err(e) => Err(e.clone()),
            }),
            RpcReply::Written(r) => RpcReply::Written(r.clone()),
            RpcReply::Joined(r) => RpcReply::Joined(r.clone()),
            RpcReply::Left(r) => RpcReply::Left(r.clone()),
            RpcReply::Probed { member } => RpcReply::Probed { member: *member },
            RpcReply::Error(e) => RpcReply::Error(e.clone()),
        }
    }
}

/// A write the receiver would not take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteRefused {
    pub message: String,
    /// Who to ask instead, when known (the receiver is not the leader).
    pub leader: Option<Member>,
}

impl fmt::Display for WriteRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.leader {
            Some(leader) => write!(f, "{} (leader: {leader})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// A dialer's answer to a [`Frame::Challenge`]: who it is, and proof that it holds the
/// cluster's secret.
#[derive(Debug, Clone, PartialEq, Eq, SchemaWrite, SchemaRead)]
pub struct Hello {
    pub version: u16,
    pub cluster_id: String,
    /// The dialer's node name.
    pub node: String,
    /// Where the dialer's own cluster port listens, so the acceptor can dial back.
    pub cluster_addr: String,
    /// HMAC-SHA256 over both nonces and the fields above (see the transport's handshake).
    /// The dialer's nonce follows in [`Frame::DialerNonce`]: this layout never changes.
    pub proof: [u8; 32],
}

/// The acceptor's answer to a `Hello` it took: who it is, and proof that it holds the
/// cluster's secret too.
#[derive(Debug, Clone, PartialEq, Eq, SchemaWrite, SchemaRead)]
pub struct Welcome {
    /// The acceptor's node name.
    pub node: String,
    /// HMAC-SHA256 over both nonces, both names and the dialer's fields (see the
    /// transport's handshake).
    pub proof: [u8; 32],
}

/// Everything a link carries: the handshake, then messages.
#[derive(Debug, Clone)]
pub enum Frame {
    /// First frame from the acceptor of a connection.
    Challenge {
        nonce: [u8; 32],
    },
    /// The dialer's answer, followed at once by [`Frame::DialerNonce`].
    Hello(Hello),
    /// The acceptor took the `Hello`: it proves itself, and the dialer's records follow.
    Welcome(Welcome),
    /// The acceptor did not; it closes the connection after this frame.
    Refused {
        reason: String,
    },
    /// The dialer's own random nonce, right after its `Hello` (whose layout is fixed),
    /// and which of its connections to the acceptor (lanes) this one is.
    DialerNonce {
        nonce: [u8; 32],
        lane: u16,
    },
    Message(Message),
}

/// What was wrong with a frame.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("unknown frame tag {0}")]
    UnknownTag(u8),
    #[error("truncated frame: a field runs past the end of the body")]
    Truncated,
    #[error("{0} trailing bytes after the frame's content")]
    TrailingBytes(usize),
    #[error("bad postcard payload: {0}")]
    Payload(#[from] postcard::Error),
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    /// A field holds a value its type does not allow (invalid UTF-8, a bool or option
    /// byte other than 0 or 1, a list longer than its cap).
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// A value could not be written (a list longer than its cap).
    #[error("cannot encode: {0}")]
    Encode(String),
}

/// Frames and messages both encode; [`encode`] takes either.
pub trait Encode: sealed::Sealed {
    #[doc(hidden)]
    fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), CodecError>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Frame {}
    impl Sealed for super::Message {}
}

/// Appends one frame (length prefix and body) to `out` and returns the body's length.
/// On error `out` is left as it was.
///
/// The caller checks the returned length against the link's limit: a receiver closes a
/// link that carries a frame over its limit.
pub fn encode<T: Encode + ?Sized>(frame: &T, out: &mut Vec<u8>) -> Result<usize, CodecError> {
    let start = out.len();
    out.extend_from_slice(&[0; LEN_PREFIX]);
    let result = frame.encode_body(out).and_then(|()| {
        let len = out.len() - start - LEN_PREFIX;
        let prefix = u32::try_from(len).map_err(|_| CodecError::TooLarge {
            len,
            max: u32::MAX as usize,
        })?;
        out[start..start + LEN_PREFIX].copy_from_slice(&prefix.to_le_bytes());
        Ok(len)
    });
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// The body length a length prefix announces, refused if it is over `max`.
pub fn body_len(prefix: [u8; LEN_PREFIX], max: usize) -> Result<usize, CodecError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > max {
        return Err(CodecError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes one frame body (without its length prefix). Returns an error, never panics, on
/// any input.
pub fn decode(body: &[u8]) -> Result<Frame, CodecError> {
    let (&tag, mut rest) = body.split_first().ok_or(CodecError::Truncated)?;
    let frame = match tag {
        tag::CHALLENGE => Frame::Challenge {
            nonce: read(&mut rest)?,
        },
        tag::HELLO => Frame::Hello(read(&mut rest)?),
        tag::WELCOME => Frame::Welcome(read(&mut rest)?),
        tag::REFUSED => Frame::Refused {
            reason: read(&mut rest)?,
        },
        tag::DIALER_NONCE => Frame::DialerNonce {
            nonce: read(&mut rest)?,
            lane: read(&mut rest)?,
        },
        tag::OP_BATCH => Frame::Message(Message::OpBatch(ops::read_ops(&mut rest)?)),
        tag::REPLY_BATCH => {
            let seq = read(&mut rest)?;
            let replies = Arc::new(ops::read_replies(&mut rest)?);
            Frame::Message(Message::ReplyBatch { seq, replies })
        }
        tag::REPLY_ACK => Frame::Message(Message::ReplyAck {
            seqs: read_records(&mut rest, 8)?,
        }),
        tag::REQUEST => {
            let id = read(&mut rest)?;
            let body = postcard_exact(std::mem::take(&mut rest))?;
            Frame::Message(Message::Request { id, body })
        }
        tag::RESPONSE => {
            let id = read(&mut rest)?;
            let body = postcard_exact(std::mem::take(&mut rest))?;
            Frame::Message(Message::Response { id, body })
        }
        tag::PING => Frame::Message(Message::Ping {
            seq: read(&mut rest)?,
            load: read(&mut rest)?,
            overloaded: read_records(&mut rest, 8)?,
            open_breakers: read_records(&mut rest, MIN_OPEN_BREAKER)?,
        }),
        tag::PONG => Frame::Message(Message::Pong {
            seq: read(&mut rest)?,
            load: read(&mut rest)?,
            overloaded: read_records(&mut rest, 8)?,
            open_breakers: read_records(&mut rest, MIN_OPEN_BREAKER)?,
        }),
        other => return Err(CodecError::UnknownTag(other)),
    };
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes(rest.len()));
    }
    Ok(frame)
}

mod tag {
    pub const CHALLENGE: u8 = 0;
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const REFUSED: u8 = 3;
    pub const DIALER_NONCE: u8 = 4;
    pub const OP_BATCH: u8 = 16;
    pub const REPLY_BATCH: u8 = 17;
    pub const REQUEST: u8 = 18;
    pub const RESPONSE: u8 = 19;
    pub const PING: u8 = 20;
    pub const PONG: u8 = 21;
    pub const REPLY_ACK: u8 = 22;
}

impl Encode for Frame {
    fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), CodecError> {
        match self {
            Frame::Challenge { nonce } => {
                out.push(tag::CHALLENGE);
                out.extend_from_slice(nonce);
                Ok(())
            }
            Frame::Hello(hello) => {
                out.push(tag::HELLO);
                write(out, hello)
            }
            Frame::Welcome(welcome) => {
                out.push(tag::WELCOME);
                write(out, welcome)
            }
            Frame::Refused { reason } => {
                out.push(tag::REFUSED);
                write(out, reason)
            }
            Frame::DialerNonce { nonce, lane } => {
                out.push(tag::DIALER_NONCE);
                out.extend_from_slice(nonce);
                out.extend_from_slice(&lane.to_le_bytes());
                Ok(())
            }
            Frame::Message(msg) => msg.encode_body(out),
        }
    }
}

impl Encode for Message {
    fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), CodecError> {
        match self {
            Message::OpBatch(batch) => {
                out.push(tag::OP_BATCH);
                ops::put_ops(out, batch.iter().map(WireOp::fields));
                Ok(())
            }
            Message::EncodedOps(ops) => {
                out.extend_from_slice(&ops.body);
                Ok(())
            }
            Message::ReplyBatch { seq, replies } => {
                out.push(tag::REPLY_BATCH);
                out.extend_from_slice(&seq.to_le_bytes());
                ops::put_replies(out, replies);
                Ok(())
            }
            Message::EncodedReplies { seq, replies } => {
                out.push(tag::REPLY_BATCH);
                out.extend_from_slice(&seq.to_le_bytes());
                ops::put_varint(out, replies.ids.len() as u64);
                out.extend_from_slice(&replies.records);
                Ok(())
            }
            Message::ReplyAck { seqs } => {
                out.push(tag::REPLY_ACK);
                write_records(out, seqs)
            }
            Message::Request { id, body } => {
                out.push(tag::REQUEST);
                out.extend_from_slice(&id.to_le_bytes());
                postcard_into(out, body)
            }
            Message::Response { id, body } => {
                out.push(tag::RESPONSE);
                out.extend_from_slice(&id.to_le_bytes());
                postcard_into(out, body)
            }
            Message::Ping {
                seq,
                load,
                overloaded,
                open_breakers,
            }
            | Message::Pong {
                seq,
                load,
                overloaded,
                open_breakers,
            } => {
                out.push(if matches!(self, Message::Ping { .. }) {
                    tag::PING
                } else {
                    tag::PONG
                });
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&load.to_le_bytes());
                write_records(out, overloaded)?;
                write_records(out, open_breakers)
            }
        }
    }
}

fn write<T>(out: &mut Vec<u8>, value: &T) -> Result<(), CodecError>
where
    T: SchemaWrite<DefaultConfig, Src = T>,
{
    wincode::serialize_into(&mut *out, value).map_err(|e| CodecError::Encode(e.to_string()))
}

/// A count, then the records: the layout of a wincode `Vec<T>`.
fn write_records<T>(out: &mut Vec<u8>, records: &[T]) -> Result<(), CodecError>
where
    T: SchemaWrite<DefaultConfig, Src = T>,
{
    out.extend_from_slice(&(records.len() as u64).to_le_bytes());
    records.iter().try_for_each(|r| write(out, r))
}

fn read<'de, T>(rest: &mut &'de [u8]) -> Result<T, CodecError>
where
    T: SchemaRead<'de, DefaultConfig, Dst = T>,
{
    T::get(rest).map_err(read_error)
}

/// Reads a count and that many records, refusing a count the rest of the body cannot
/// hold before reserving room for it.
fn read_records<'de, T>(rest: &mut &'de [u8], min_size: usize) -> Result<Vec<T>, CodecError>
where
    T: SchemaRead<'de, DefaultConfig, Dst = T>,
{
    let count: u64 = read(rest)?;
    if count > (rest.len() / min_size) as u64 {
        return Err(CodecError::Truncated);
    }
    // Each record decoded straight into its place in the list, not built aside and moved
    // there (a forwarded operation is a few hundred bytes).
    <Vec<T> as SchemaReadContext<'de, DefaultConfig, context::Len>>::get_with_context(
        context::Len(count as usize),
        rest,
    )
    .map_err(read_error)
}

fn read_error(e: wincode::ReadError) -> CodecError {
    match e {
        wincode::ReadError::Io(wincode::io::ReadError::ReadSizeLimit(_)) => CodecError::Truncated,
        other => CodecError::Malformed(other.to_string()),
    }
}

fn postcard_into<T: Serialize>(out: &mut Vec<u8>, value: &T) -> Result<(), CodecError> {
    postcard::serialize_with_flavor(value, Append(out))?;
    Ok(())
}

/// A postcard output that appends to a borrowed buffer (the caller's frame buffer, reused).
struct Append<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

fn postcard_exact<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, CodecError> {
    let (value, rest) = postcard::take_from_bytes(bytes)?;
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

mod ops;

#[cfg(test)]
mod tests;
