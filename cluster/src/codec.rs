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
//! | 2   | `Welcome`             | —                                                               |
//! | 3   | `Refused`             | `reason: String`                                                |
//! | 16  | `Message::OpBatch`    | `u64` count, then that many [`WireOp`]                          |
//! | 17  | `Message::ReplyBatch` | `u64` count, then that many [`WireReply`]                       |
//! | 18  | `Message::Request`    | `id: u64`, then the [`Rpc`] as postcard, to the end of the body |
//! | 19  | `Message::Response`   | `id: u64`, then the [`RpcReply`] as postcard, to the end        |
//! | 20  | `Message::Ping`       | `seq: u64, load: u64`                                           |
//! | 21  | `Message::Pong`       | `seq: u64, load: u64`                                           |
//!
//! opmesh's own frames derive wincode; openraft's RPC types implement only serde, so they
//! travel as postcard inside the frame.
//!
//! The envelope is versioned by the handshake: a dialer's `Hello` names the
//! [`PROTOCOL_VERSION`] it speaks and a link opens only when both sides speak the same one.
//! Tags 0–3 and the layout of `Challenge`, `Hello` and `Refused` never change, so a node of
//! any version can refuse another with a reason it understands. A change to any other
//! frame raises the version.
//!
//! Decoding never panics and never trusts a declared length: a sequence of records may not
//! declare more records than the rest of the body could hold, byte strings are checked
//! against the body before they are allocated, and metadata lists are capped, so a frame
//! never makes `decode` reserve more than a small multiple of its own size.

use std::fmt;

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use wincode::config::DefaultConfig;
use wincode::containers;
use wincode::len::BincodeLen;
use wincode::{SchemaRead, SchemaWrite};

use crate::types::{Command, CommandResult, Member, NodeRecord, RaftId, TypeConfig};

/// The version of the frames below. A dialer whose `Hello` names another is refused.
pub const PROTOCOL_VERSION: u16 = 1;

/// Bytes of the length prefix in front of every frame body.
pub const LEN_PREFIX: usize = 4;

/// What links carry once the handshake is done.
#[derive(Debug, Clone)]
pub enum Message {
    /// Operations forwarded to the node that owns them.
    OpBatch(Vec<WireOp>),
    /// Their outcomes, back to the node they came from.
    ReplyBatch(Vec<WireReply>),
    /// A request that expects one [`Message::Response`] with the same `id`.
    Request {
        id: u64,
        body: Rpc,
    },
    Response {
        id: u64,
        body: RpcReply,
    },
    /// Heartbeats; `load` is the number of operations in flight on the sender.
    Ping {
        seq: u64,
        load: u64,
    },
    Pong {
        seq: u64,
        load: u64,
    },
}

/// One operation, as forwarded to its owner.
#[derive(Debug, Clone, PartialEq, SchemaWrite, SchemaRead)]
pub struct WireOp {
    pub id: u128,
    pub op_type: String,
    pub key: Option<String>,
    pub idempotency_key: Option<String>,
    /// The operation's JSON payload, as bytes.
    #[wincode(with = "containers::Vec<u8, Unbounded>")]
    pub payload: Vec<u8>,
    #[wincode(with = "containers::Vec<(String, String), MetadataLen>")]
    pub metadata: Vec<(String, String)>,
    pub priority: i32,
    /// Time left until the deadline when the frame was sent; `None`: no deadline.
    pub remaining_us: Option<u64>,
    /// The sender's span, so the owner's span is its child.
    pub trace: Option<WireTrace>,
}

/// A span context carried across nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, SchemaWrite, SchemaRead)]
pub struct WireTrace {
    pub trace_id: u128,
    pub span_id: u64,
    pub flags: u8,
}

/// The outcome of one [`WireOp`], back to the node it came from.
#[derive(Debug, Clone, PartialEq, SchemaWrite, SchemaRead)]
pub struct WireReply {
    pub id: u128,
    pub status: u8,
    #[wincode(with = "Option<containers::Vec<u8, Unbounded>>")]
    pub result: Option<Vec<u8>>,
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
    /// A write for the leader to replicate.
    ClientWrite(Command),
    /// A node asks to join.
    Join(NodeRecord),
    /// A node leaves.
    Leave {
        name: String,
    },
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
    /// HMAC-SHA256 over the challenge's nonce and the fields above (see the transport).
    pub proof: [u8; 32],
}

/// Everything a link carries: the handshake, then messages.
#[derive(Debug, Clone)]
pub enum Frame {
    /// First frame from the acceptor of a connection.
    Challenge {
        nonce: [u8; 32],
    },
    /// The dialer's answer.
    Hello(Hello),
    /// The acceptor took the `Hello`: messages follow.
    Welcome,
    /// The acceptor did not; it closes the connection after this frame.
    Refused {
        reason: String,
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
        tag::WELCOME => Frame::Welcome,
        tag::REFUSED => Frame::Refused {
            reason: read(&mut rest)?,
        },
        tag::OP_BATCH => Frame::Message(Message::OpBatch(read_records(&mut rest, MIN_WIRE_OP)?)),
        tag::REPLY_BATCH => Frame::Message(Message::ReplyBatch(read_records(
            &mut rest,
            MIN_WIRE_REPLY,
        )?)),
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
        }),
        tag::PONG => Frame::Message(Message::Pong {
            seq: read(&mut rest)?,
            load: read(&mut rest)?,
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
    pub const OP_BATCH: u8 = 16;
    pub const REPLY_BATCH: u8 = 17;
    pub const REQUEST: u8 = 18;
    pub const RESPONSE: u8 = 19;
    pub const PING: u8 = 20;
    pub const PONG: u8 = 21;
}

/// Byte strings are read only after the body is checked to hold them, so they need no
/// preallocation cap of their own beyond the frame limit.
type Unbounded = BincodeLen<{ wincode::config::PREALLOCATION_SIZE_LIMIT_DISABLED }>;

/// Metadata pairs are preallocated before they are read; the cap (in bytes of
/// `(String, String)`, 48 each) bounds what a lying count can reserve: 1365 pairs.
type MetadataLen = BincodeLen<{ 64 * 1024 }>;

/// The fewest bytes a [`WireOp`] encodes to (every string and list empty, every option
/// `None`): a count larger than the rest of the body divided by this is a lie.
const MIN_WIRE_OP: usize = 16 + 8 + 1 + 1 + 8 + 8 + 4 + 1 + 1;
/// The same for a [`WireReply`].
const MIN_WIRE_REPLY: usize = 16 + 1 + 1 + 1 + 1 + 4;

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
            Frame::Welcome => {
                out.push(tag::WELCOME);
                Ok(())
            }
            Frame::Refused { reason } => {
                out.push(tag::REFUSED);
                write(out, reason)
            }
            Frame::Message(msg) => msg.encode_body(out),
        }
    }
}

impl Encode for Message {
    fn encode_body(&self, out: &mut Vec<u8>) -> Result<(), CodecError> {
        match self {
            Message::OpBatch(ops) => {
                out.push(tag::OP_BATCH);
                write_records(out, ops)
            }
            Message::ReplyBatch(replies) => {
                out.push(tag::REPLY_BATCH);
                write_records(out, replies)
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
            Message::Ping { seq, load } => {
                out.push(tag::PING);
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&load.to_le_bytes());
                Ok(())
            }
            Message::Pong { seq, load } => {
                out.push(tag::PONG);
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&load.to_le_bytes());
                Ok(())
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
    let mut records = Vec::with_capacity(count as usize);
    for _ in 0..count {
        records.push(read(rest)?);
    }
    Ok(records)
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    use openraft::testing::log_id;
    use openraft::{Entry, EntryPayload, Membership, SnapshotMeta, StoredMembership, Vote};
    use opmesh_actors::{Route, Strategy as RouteStrategy};
    use proptest::prelude::*;

    use super::*;
    use crate::types::{raft_id, NodeStatus};

    fn op(id: u128) -> WireOp {
        WireOp {
            id,
            op_type: "resize".into(),
            key: Some(format!("img-{id}")),
            idempotency_key: None,
            payload: br#"{"w":64}"#.to_vec(),
            metadata: vec![("tenant".into(), "a".into())],
            priority: -3,
            remaining_us: Some(250_000),
            trace: Some(WireTrace {
                trace_id: u128::MAX - id,
                span_id: 7,
                flags: 1,
            }),
        }
    }

    fn bare_op() -> WireOp {
        WireOp {
            id: 0,
            op_type: String::new(),
            key: None,
            idempotency_key: None,
            payload: Vec::new(),
            metadata: Vec::new(),
            priority: 0,
            remaining_us: None,
            trace: None,
        }
    }

    fn reply(id: u128) -> WireReply {
        WireReply {
            id,
            status: 2,
            result: Some(b"{}".to_vec()),
            error: Some("late".into()),
            cached: true,
            attempts: 3,
        }
    }

    fn member(name: &str) -> Member {
        Member {
            name: name.into(),
            cluster_addr: format!("{name}:7000"),
            http_addr: format!("{name}:8080"),
        }
    }

    fn record(name: &str) -> NodeRecord {
        NodeRecord {
            name: Arc::from(name),
            raft_id: raft_id(name),
            cluster_addr: format!("{name}:7000"),
            http_addr: format!("{name}:8080"),
            serves: vec![Arc::from("resize"), Arc::from("echo")],
            status: NodeStatus::Up,
        }
    }

    fn membership() -> Membership<RaftId, Member> {
        let ids: BTreeSet<RaftId> = ["a", "b"].iter().map(|n| raft_id(n)).collect();
        let nodes: BTreeMap<RaftId, Member> = ["a", "b", "c"]
            .iter()
            .map(|n| (raft_id(n), member(n)))
            .collect();
        Membership::new(vec![ids], nodes)
    }

    fn every_command() -> Vec<Command> {
        vec![
            Command::SetRoute {
                op_type: Arc::from("resize"),
                route: Route {
                    strategy: RouteStrategy::ConsistentHash,
                    nodes: vec![Arc::from("a"), Arc::from("b")],
                },
            },
            Command::RemoveRoute {
                op_type: Arc::from("resize"),
            },
            Command::NodeJoined(record("c")),
            Command::SetStatus {
                name: Arc::from("b"),
                status: NodeStatus::Leaving,
            },
            Command::NodeLeft {
                name: Arc::from("b"),
            },
        ]
    }

    fn append_entries() -> AppendEntriesRequest<TypeConfig> {
        let leader = raft_id("a");
        let mut entries = vec![Entry::<TypeConfig> {
            log_id: log_id(2, leader, 10),
            payload: EntryPayload::Blank,
        }];
        for (i, cmd) in every_command().into_iter().enumerate() {
            entries.push(Entry {
                log_id: log_id(2, leader, 11 + i as u64),
                payload: EntryPayload::Normal(cmd),
            });
        }
        entries.push(Entry {
            log_id: log_id(2, leader, 20),
            payload: EntryPayload::Membership(membership()),
        });
        AppendEntriesRequest {
            vote: Vote::new_committed(2, leader),
            prev_log_id: Some(log_id(1, leader, 9)),
            entries,
            leader_commit: Some(log_id(2, leader, 10)),
        }
    }

    fn install_snapshot() -> InstallSnapshotRequest<TypeConfig> {
        let leader = raft_id("a");
        InstallSnapshotRequest {
            vote: Vote::new_committed(3, leader),
            meta: SnapshotMeta {
                last_log_id: Some(log_id(3, leader, 40)),
                last_membership: StoredMembership::new(Some(log_id(2, leader, 20)), membership()),
                snapshot_id: "3-40-1".into(),
            },
            offset: 4096,
            data: (0..=255u8).cycle().take(10_000).collect(),
            done: false,
        }
    }

    fn every_message() -> Vec<Message> {
        let mut msgs = vec![
            Message::OpBatch(vec![]),
            Message::OpBatch(vec![op(1)]),
            Message::OpBatch((0..256).map(op).chain([bare_op()]).collect()),
            Message::ReplyBatch(vec![]),
            Message::ReplyBatch((0..3).map(reply).collect()),
            Message::Ping { seq: 1, load: 0 },
            Message::Pong {
                seq: u64::MAX,
                load: 12,
            },
        ];
        let rpcs = [
            Rpc::AppendEntries(append_entries()),
            Rpc::AppendEntries(AppendEntriesRequest {
                vote: Vote::new(1, 1),
                prev_log_id: None,
                entries: vec![],
                leader_commit: None,
            }),
            Rpc::Vote(VoteRequest::new(
                Vote::new(4, raft_id("b")),
                Some(log_id(3, 1, 41)),
            )),
            Rpc::InstallSnapshot(install_snapshot()),
            Rpc::Join(record("d")),
            Rpc::Leave { name: "b".into() },
        ]
        .into_iter()
        .chain(every_command().into_iter().map(Rpc::ClientWrite));
        msgs.extend(
            rpcs.enumerate()
                .map(|(i, body)| Message::Request { id: i as u64, body }),
        );
        let refused = WriteRefused {
            message: "not the leader".into(),
            leader: Some(member("a")),
        };
        let replies = [
            RpcReply::AppendEntries(AppendEntriesResponse::Success),
            RpcReply::AppendEntries(AppendEntriesResponse::PartialSuccess(Some(log_id(2, 1, 3)))),
            RpcReply::AppendEntries(AppendEntriesResponse::Conflict),
            RpcReply::AppendEntries(AppendEntriesResponse::HigherVote(Vote::new(9, 2))),
            RpcReply::Vote(VoteResponse::new(Vote::new(4, 2), None, true)),
            RpcReply::InstallSnapshot(Ok(InstallSnapshotResponse {
                vote: Vote::new_committed(3, 1),
            })),
            RpcReply::InstallSnapshot(Err("no space".into())),
            RpcReply::Written(Ok(CommandResult {
                version: 7,
                error: None,
            })),
            RpcReply::Written(Err(refused.clone())),
            RpcReply::Joined(Ok(())),
            RpcReply::Joined(Err(WriteRefused {
                message: "id collides".into(),
                leader: None,
            })),
            RpcReply::Left(Ok(())),
            RpcReply::Left(Err(refused)),
            RpcReply::Error("unknown request".into()),
        ];
        msgs.extend(
            replies
                .into_iter()
                .enumerate()
                .map(|(i, body)| Message::Response {
                    id: 1000 + i as u64,
                    body,
                }),
        );
        msgs
    }

    fn every_frame() -> Vec<Frame> {
        let mut frames = vec![
            Frame::Challenge { nonce: [9; 32] },
            Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                cluster_id: "prod".into(),
                node: "a".into(),
                cluster_addr: "10.0.0.1:7000".into(),
                proof: [3; 32],
            }),
            Frame::Welcome,
            Frame::Refused {
                reason: "wrong secret".into(),
            },
        ];
        frames.extend(every_message().into_iter().map(Frame::Message));
        frames
    }

    /// One frame as encoded, without its prefix, checking the prefix on the way.
    fn body_of<T: Encode + ?Sized>(frame: &T) -> Vec<u8> {
        let mut out = vec![0xAA];
        let len = encode(frame, &mut out).unwrap();
        assert_eq!(out[0], 0xAA, "encode appends");
        assert_eq!(out.len(), 1 + LEN_PREFIX + len);
        let prefix: [u8; 4] = out[1..5].try_into().unwrap();
        assert_eq!(body_len(prefix, usize::MAX).unwrap(), len);
        out.split_off(1 + LEN_PREFIX)
    }

    // Debug output compares every field, including openraft types that are not
    // `PartialEq`.
    fn same(a: &Frame, b: &Frame) -> bool {
        format!("{a:?}") == format!("{b:?}")
    }

    #[test]
    fn every_frame_round_trips() {
        for frame in every_frame() {
            let body = body_of(&frame);
            let back = decode(&body).unwrap_or_else(|e| panic!("{frame:?}: {e}"));
            assert!(same(&frame, &back), "{frame:?}\n!=\n{back:?}");
        }
    }

    #[test]
    fn a_message_encodes_as_its_frame() {
        for msg in every_message() {
            assert_eq!(body_of(&msg), body_of(&Frame::Message(msg.clone())));
        }
    }

    #[test]
    fn raft_types_survive_postcard_field_by_field() {
        let req = append_entries();
        let Frame::Message(Message::Request {
            body: Rpc::AppendEntries(back),
            ..
        }) = decode(&body_of(&Message::Request {
            id: 5,
            body: Rpc::AppendEntries(req.clone()),
        }))
        .unwrap()
        else {
            panic!("not an AppendEntries request");
        };
        assert_eq!(back.vote, req.vote);
        assert_eq!(back.prev_log_id, req.prev_log_id);
        assert_eq!(back.leader_commit, req.leader_commit);
        assert_eq!(back.entries, req.entries);
        let memberships = back
            .entries
            .iter()
            .filter(|e| matches!(e.payload, EntryPayload::Membership(_)))
            .count();
        assert_eq!(memberships, 1);

        let snap = install_snapshot();
        let Frame::Message(Message::Request {
            body: Rpc::InstallSnapshot(back),
            ..
        }) = decode(&body_of(&Message::Request {
            id: 6,
            body: Rpc::InstallSnapshot(snap.clone()),
        }))
        .unwrap()
        else {
            panic!("not an InstallSnapshot request");
        };
        assert_eq!(back, snap);

        let vote = VoteRequest::new(Vote::new(4, 2), Some(log_id(3, 1, 41)));
        let Frame::Message(Message::Request {
            body: Rpc::Vote(back),
            ..
        }) = decode(&body_of(&Message::Request {
            id: 7,
            body: Rpc::Vote(vote.clone()),
        }))
        .unwrap()
        else {
            panic!("not a Vote request");
        };
        assert_eq!(back, vote);
    }

    #[test]
    fn the_layout_is_as_documented() {
        let body = body_of(&Message::Ping { seq: 1, load: 2 });
        let mut expected = vec![tag::PING];
        expected.extend_from_slice(&1u64.to_le_bytes());
        expected.extend_from_slice(&2u64.to_le_bytes());
        assert_eq!(body, expected);

        // A batch is a wincode `Vec`: what bincode-compatible readers expect.
        let ops = vec![op(1), op(2)];
        let body = body_of(&Message::OpBatch(ops.clone()));
        assert_eq!(body[0], tag::OP_BATCH);
        assert_eq!(&body[1..], wincode::serialize(&ops).unwrap().as_slice());

        assert_eq!(
            wincode::serialized_size(&bare_op()).unwrap(),
            MIN_WIRE_OP as u64
        );
        let bare_reply = WireReply {
            id: 0,
            status: 0,
            result: None,
            error: None,
            cached: false,
            attempts: 0,
        };
        assert_eq!(
            wincode::serialized_size(&bare_reply).unwrap(),
            MIN_WIRE_REPLY as u64
        );
    }

    #[test]
    fn bad_bodies_are_named() {
        assert!(matches!(decode(&[]), Err(CodecError::Truncated)));
        assert!(matches!(decode(&[200]), Err(CodecError::UnknownTag(200))));
        assert!(matches!(
            decode(&[tag::PING, 1, 2]),
            Err(CodecError::Truncated)
        ));

        let mut body = body_of(&Message::Ping { seq: 1, load: 2 });
        body.push(0);
        assert!(matches!(decode(&body), Err(CodecError::TrailingBytes(1))));

        let mut body = body_of(&Message::Request {
            id: 1,
            body: Rpc::Leave { name: "b".into() },
        });
        body.extend_from_slice(&[1, 2]);
        assert!(matches!(decode(&body), Err(CodecError::TrailingBytes(2))));

        // `Rpc` has six variants: 9 is none of them.
        let mut body = vec![tag::REQUEST];
        body.extend_from_slice(&1u64.to_le_bytes());
        body.push(9);
        assert!(matches!(decode(&body), Err(CodecError::Payload(_))));

        let mut body = body_of(&Frame::Refused {
            reason: "é".into()
        });
        let last = body.len() - 1;
        body[last] = 0xFF;
        assert!(matches!(decode(&body), Err(CodecError::Malformed(_))));

        assert!(matches!(
            body_len(17u32.to_le_bytes(), 16),
            Err(CodecError::TooLarge { len: 17, max: 16 })
        ));
        assert_eq!(body_len(16u32.to_le_bytes(), 16).unwrap(), 16);
    }

    /// Counts and lengths that claim more than the body holds fail before anything that
    /// size is reserved (a reservation of 2^60 bytes would abort the test).
    #[test]
    fn lying_lengths_fail_before_allocating() {
        for tag in [tag::OP_BATCH, tag::REPLY_BATCH] {
            for count in [1u64, 1 << 20, 1 << 40, u64::MAX] {
                let mut body = vec![tag];
                body.extend_from_slice(&count.to_le_bytes());
                body.extend_from_slice(&[0; 20]);
                assert!(
                    matches!(decode(&body), Err(CodecError::Truncated)),
                    "{count}"
                );
            }
        }

        // The first op's `op_type` claims 2^60 bytes: over wincode's preallocation cap for
        // strings (4 MiB), and past the end of the body.
        let mut body = body_of(&Message::OpBatch(vec![bare_op()]));
        body[1 + 8 + 16..1 + 8 + 16 + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(decode(&body), Err(CodecError::Malformed(_))));
        body[1 + 8 + 16..1 + 8 + 16 + 8].copy_from_slice(&(1u64 << 20).to_le_bytes());
        assert!(matches!(decode(&body), Err(CodecError::Truncated)));

        // Its payload claims 2^60 bytes.
        let at = 1 + 8 + 16 + 8 + 1 + 1;
        body[1 + 8 + 16..1 + 8 + 16 + 8].copy_from_slice(&0u64.to_le_bytes());
        body[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(decode(&body), Err(CodecError::Truncated)));

        // Its metadata claims 2^40 pairs: over the metadata cap.
        body[at..at + 8].copy_from_slice(&0u64.to_le_bytes());
        body[at + 8..at + 16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(matches!(decode(&body), Err(CodecError::Malformed(_))));

        // A postcard payload whose entry list claims 2^60 entries.
        let mut body = vec![tag::REQUEST];
        body.extend_from_slice(&1u64.to_le_bytes());
        let mut payload = postcard::to_allocvec(&Rpc::AppendEntries(AppendEntriesRequest {
            vote: Vote::new(1, 1),
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        }))
        .unwrap();
        // The empty entry list is the varint 0 after the vote and the `None`.
        let zero = payload.len() - 2;
        assert_eq!(&payload[zero..], &[0, 0]);
        payload.truncate(zero);
        payload.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10, 0]);
        body.extend_from_slice(&payload);
        assert!(matches!(decode(&body), Err(CodecError::Payload(_))));
    }

    #[test]
    fn a_metadata_list_over_the_cap_does_not_encode() {
        let mut big = bare_op();
        big.metadata = vec![(String::new(), String::new()); 2000];
        let mut out = vec![1, 2, 3];
        assert!(matches!(
            encode(&Message::OpBatch(vec![big]), &mut out),
            Err(CodecError::Encode(_))
        ));
        assert_eq!(
            out,
            [1, 2, 3],
            "a failed encode leaves the buffer as it was"
        );
    }

    fn sample_bodies() -> Vec<Vec<u8>> {
        every_frame().iter().map(body_of).collect()
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        Flip { at: usize, bits: u8 },
        Set { at: usize, byte: u8 },
        Truncate { at: usize },
        Extend { bytes: Vec<u8> },
        Splice { at: usize, bytes: Vec<u8> },
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<usize>(), 1..=255u8).prop_map(|(at, bits)| Mutation::Flip { at, bits }),
            (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
            any::<usize>().prop_map(|at| Mutation::Truncate { at }),
            proptest::collection::vec(any::<u8>(), 1..16)
                .prop_map(|bytes| Mutation::Extend { bytes }),
            (any::<usize>(), proptest::collection::vec(any::<u8>(), 8))
                .prop_map(|(at, bytes)| Mutation::Splice { at, bytes }),
        ]
    }

    fn apply(body: &mut Vec<u8>, m: &Mutation) {
        let n = body.len().max(1);
        match m {
            Mutation::Flip { at, bits } => {
                if let Some(b) = body.get_mut(at % n) {
                    *b ^= bits;
                }
            }
            Mutation::Set { at, byte } => {
                if let Some(b) = body.get_mut(at % n) {
                    *b = *byte;
                }
            }
            Mutation::Truncate { at } => body.truncate(at % n),
            Mutation::Extend { bytes } => body.extend_from_slice(bytes),
            // Eight bytes: a length field's worth, often landing on one.
            Mutation::Splice { at, bytes } => {
                let at = at % n;
                let end = (at + bytes.len()).min(body.len());
                body.splice(at..end, bytes.iter().copied());
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn random_bytes_decode_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn random_bytes_behind_every_tag_decode_or_fail(
            tag in prop_oneof![0..4u8, 16..22u8],
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut body = vec![tag];
            body.extend_from_slice(&bytes);
            let _ = decode(&body);
        }

        #[test]
        fn mutated_frames_decode_or_fail(
            pick in any::<prop::sample::Index>(),
            mutations in proptest::collection::vec(mutation(), 1..4),
        ) {
            let bodies = sample_bodies();
            let mut body = bodies[pick.index(bodies.len())].clone();
            for m in &mutations {
                apply(&mut body, m);
            }
            if let Ok(frame) = decode(&body) {
                // Whatever decodes encodes again to something that decodes the same.
                let again = decode(&body_of(&frame)).unwrap();
                prop_assert!(same(&frame, &again));
            }
        }
    }
}
