//! The records of the two frames that carry the traffic, `OpBatch` and `ReplyBatch`,
//! written and read by hand: lengths and small numbers as varints, absent fields as
//! cleared bits of one flags byte. Payloads and results are shared with the operation
//! ([`Bytes`]) when written; read back, small ones are packed into shared blocks (see
//! [`Blocks`]), and a batch's operations of one type share one type name.
//!
//! Layout (see the table in the module above for where they sit in a frame):
//!
//! ```text
//! WireOp    id: 16 bytes LE | flags: u8 | priority: zigzag varint | op_type: str |
//!           payload: bytes | key: str ?KEY | idempotency_key: str ?IDEMPOTENCY_KEY |
//!           metadata: varint count ≥ 1, then count × (str, str) ?METADATA |
//!           remaining_us: varint ?REMAINING | trace: trace_id 16 LE, span_id 8 LE,
//!           flags u8 ?TRACE | owner: str ?OWNER
//! WireReply id: 16 bytes LE | flags: u8 | status: u8 | attempts: varint |
//!           result: bytes ?RESULT | error: str ?ERROR        (CACHED: a flag only)
//! str, bytes: varint length, then the bytes (a `str` is UTF-8)
//! varint:     LEB128, 7 bits a byte, low bits first, at most 10 bytes
//! ```
//!
//! A field marked `?F` is present when bit `F` of the flags is set; a set bit this
//! version does not know is malformed.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use opmesh_actors::TypeNames;

use super::{CodecError, OpFields, ReplyFields, WireOp, WireReply, WireTrace};

/// The bits of a [`WireOp`]'s flags.
mod op_flag {
    pub const KEY: u8 = 1;
    pub const IDEMPOTENCY_KEY: u8 = 1 << 1;
    pub const METADATA: u8 = 1 << 2;
    pub const REMAINING: u8 = 1 << 3;
    pub const TRACE: u8 = 1 << 4;
    pub const OWNER: u8 = 1 << 5;
    pub const ALL: u8 = (1 << 6) - 1;
}

/// The bits of a [`WireReply`]'s flags.
mod reply_flag {
    pub const RESULT: u8 = 1;
    pub const ERROR: u8 = 1 << 1;
    pub const CACHED: u8 = 1 << 2;
    pub const ALL: u8 = (1 << 3) - 1;
}

/// The fewest bytes a [`WireOp`] takes (every optional field absent, the type name and
/// payload empty): a count larger than the rest of the body divided by this is a lie.
pub(super) const MIN_WIRE_OP: usize = 16 + 1 + 1 + 1 + 1;
/// The same for a [`WireReply`].
pub(super) const MIN_WIRE_REPLY: usize = 16 + 1 + 1 + 1;

pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn zigzag(v: i32) -> u64 {
    u64::from(((v << 1) ^ (v >> 31)) as u32)
}

fn unzigzag(v: u32) -> i32 {
    ((v >> 1) as i32) ^ -((v & 1) as i32)
}

/// A count, then the operations.
pub(super) fn put_ops<'a>(out: &mut Vec<u8>, ops: impl ExactSizeIterator<Item = OpFields<'a>>) {
    put_varint(out, ops.len() as u64);
    for op in ops {
        put_op(out, &op);
    }
}

fn put_op(out: &mut Vec<u8>, op: &OpFields<'_>) {
    let mut flags = 0;
    for (present, bit) in [
        (op.key.is_some(), op_flag::KEY),
        (op.idempotency_key.is_some(), op_flag::IDEMPOTENCY_KEY),
        (!op.metadata.is_empty(), op_flag::METADATA),
        (op.remaining_us.is_some(), op_flag::REMAINING),
        (op.trace.is_some(), op_flag::TRACE),
        (op.owner.is_some(), op_flag::OWNER),
    ] {
        if present {
            flags |= bit;
        }
    }
    out.extend_from_slice(&op.id.to_le_bytes());
    out.push(flags);
    put_varint(out, zigzag(op.priority));
    put_bytes(out, op.op_type.as_bytes());
    put_bytes(out, op.payload);
    if let Some(key) = &op.key {
        put_bytes(out, key.as_bytes());
    }
    if let Some(key) = &op.idempotency_key {
        put_bytes(out, key.as_bytes());
    }
    if !op.metadata.is_empty() {
        put_varint(out, op.metadata.len() as u64);
        for (k, v) in op.metadata {
            put_bytes(out, k.as_bytes());
            put_bytes(out, v.as_bytes());
        }
    }
    if let Some(us) = op.remaining_us {
        put_varint(out, us);
    }
    if let Some(t) = op.trace {
        out.extend_from_slice(&t.trace_id.to_le_bytes());
        out.extend_from_slice(&t.span_id.to_le_bytes());
        out.push(t.flags);
    }
    if let Some(owner) = op.owner {
        put_bytes(out, owner.as_bytes());
    }
}

/// A count, then the replies.
pub(super) fn put_replies(out: &mut Vec<u8>, replies: &[WireReply]) {
    put_varint(out, replies.len() as u64);
    for r in replies {
        put_reply(out, &r.fields());
    }
}

/// One reply's record (no count: see [`put_replies`], or the records an
/// [`EncodedReplies`](super::EncodedReplies) gathers one by one).
pub(super) fn put_reply(out: &mut Vec<u8>, r: &ReplyFields<'_>) {
    let mut flags = 0;
    if r.result.is_some() {
        flags |= reply_flag::RESULT;
    }
    if r.error.is_some() {
        flags |= reply_flag::ERROR;
    }
    if r.cached {
        flags |= reply_flag::CACHED;
    }
    out.extend_from_slice(&r.id.to_le_bytes());
    out.push(flags);
    out.push(r.status);
    put_varint(out, u64::from(r.attempts));
    if let Some(result) = r.result {
        put_bytes(out, result);
    }
    if let Some(error) = r.error {
        put_bytes(out, error.as_bytes());
    }
}

/// Reads a count and that many operations; a run of operations of one type shares its
/// name.
pub(super) fn read_ops(rest: &mut &[u8]) -> Result<Vec<WireOp>, CodecError> {
    let count = read_count(rest, MIN_WIRE_OP)?;
    let mut types = TypeNames::default();
    let mut ops = Vec::with_capacity(count);
    let mut blocks = Blocks::default();
    for _ in 0..count {
        ops.push(read_op(rest, &mut types, &mut blocks)?);
    }
    Ok(ops)
}

fn read_op(
    rest: &mut &[u8],
    types: &mut TypeNames,
    blocks: &mut Blocks,
) -> Result<WireOp, CodecError> {
    let id = u128::from_le_bytes(read_array(rest)?);
    let flags = read_u8(rest)?;
    if flags & !op_flag::ALL != 0 {
        return Err(malformed(format!("unknown operation flags {flags:#04x}")));
    }
    let has = |bit| flags & bit != 0;
    let priority = unzigzag(read_u32(rest, "priority")?);
    let op_type = types.name(read_str(rest, "op_type")?);
    let payload = blocks.copy(read_bytes(rest)?);
    let key = has(op_flag::KEY)
        .then(|| read_str(rest, "key").map(str::to_owned))
        .transpose()?;
    let idempotency_key = has(op_flag::IDEMPOTENCY_KEY)
        .then(|| read_str(rest, "idempotency_key").map(str::to_owned))
        .transpose()?;
    let mut metadata = BTreeMap::new();
    if has(op_flag::METADATA) {
        // Every pair takes at least its two lengths.
        let count = read_count(rest, 2)?;
        for _ in 0..count {
            let k = read_str(rest, "metadata")?.to_owned();
            let v = read_str(rest, "metadata")?.to_owned();
            metadata.insert(k, v);
        }
    }
    let remaining_us = has(op_flag::REMAINING)
        .then(|| read_varint(rest))
        .transpose()?;
    let trace = has(op_flag::TRACE)
        .then(|| -> Result<WireTrace, CodecError> {
            Ok(WireTrace {
                trace_id: u128::from_le_bytes(read_array(rest)?),
                span_id: u64::from_le_bytes(read_array(rest)?),
                flags: read_u8(rest)?,
            })
        })
        .transpose()?;
    let owner = has(op_flag::OWNER)
        .then(|| read_str(rest, "owner").map(Arc::<str>::from))
        .transpose()?;
    Ok(WireOp {
        id,
        op_type,
        key,
        idempotency_key,
        payload,
        metadata,
        priority,
        remaining_us,
        trace,
        owner,
    })
}

/// Reads a count and that many replies.
pub(super) fn read_replies(rest: &mut &[u8]) -> Result<Vec<WireReply>, CodecError> {
    let count = read_count(rest, MIN_WIRE_REPLY)?;
    let mut blocks = Blocks::default();
    let mut replies = Vec::with_capacity(count);
    for _ in 0..count {
        let id = u128::from_le_bytes(read_array(rest)?);
        let flags = read_u8(rest)?;
        if flags & !reply_flag::ALL != 0 {
            return Err(malformed(format!("unknown reply flags {flags:#04x}")));
        }
        let status = read_u8(rest)?;
        let attempts = read_u32(rest, "attempts")?;
        let result = (flags & reply_flag::RESULT != 0)
            .then(|| read_bytes(rest).map(|r| blocks.copy(r)))
            .transpose()?;
        let error = (flags & reply_flag::ERROR != 0)
            .then(|| read_str(rest, "error").map(str::to_owned))
            .transpose()?;
        replies.push(WireReply {
            id,
            status,
            result,
            error,
            cached: flags & reply_flag::CACHED != 0,
            attempts,
        });
    }
    Ok(replies)
}

/// Where a batch's payloads (or results) are copied as they are read: small ones packed
/// together into shared blocks of [`BLOCK`] bytes, a larger one into an allocation of its
/// own. One allocation serves dozens of small payloads, and cloning one (a handler's
/// copy of its operation) only counts a reference. A block stays alive while any of its
/// payloads does: an operation that runs long keeps at most [`BLOCK`] bytes of its batch,
/// and what stores results for long copies them out first (`Json::detached`).
#[derive(Default)]
struct Blocks(BytesMut);

/// The size of a block of small payloads.
const BLOCK: usize = 4096;
/// The largest payload packed into a block.
const SMALL: usize = 1024;

impl Blocks {
    fn copy(&mut self, bytes: &[u8]) -> Bytes {
        if bytes.len() > SMALL {
            return Bytes::copy_from_slice(bytes);
        }
        // What is left of the block after the payloads split off it.
        if self.0.capacity() < bytes.len() {
            self.0 = BytesMut::with_capacity(BLOCK);
        }
        self.0.extend_from_slice(bytes);
        self.0.split().freeze()
    }
}

fn malformed(what: String) -> CodecError {
    CodecError::Malformed(what)
}

fn read_u8(rest: &mut &[u8]) -> Result<u8, CodecError> {
    let (&b, tail) = rest.split_first().ok_or(CodecError::Truncated)?;
    *rest = tail;
    Ok(b)
}

fn read_array<const N: usize>(rest: &mut &[u8]) -> Result<[u8; N], CodecError> {
    let (head, tail) = rest.split_first_chunk::<N>().ok_or(CodecError::Truncated)?;
    *rest = tail;
    Ok(*head)
}

pub(super) fn read_varint(rest: &mut &[u8]) -> Result<u64, CodecError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let b = read_u8(rest)?;
        // The tenth byte holds bit 63 only.
        if shift == 63 && b > 1 {
            return Err(malformed("a varint overflows 64 bits".into()));
        }
        value |= u64::from(b & 0x7F) << shift;
        if b < 0x80 {
            return Ok(value);
        }
    }
    unreachable!("the tenth byte either ends the varint or is refused")
}

fn read_u32(rest: &mut &[u8], field: &str) -> Result<u32, CodecError> {
    let v = read_varint(rest)?;
    u32::try_from(v).map_err(|_| malformed(format!("{field} {v} does not fit 32 bits")))
}

/// A count of records of at least `min_size` bytes each, refused when the rest of the
/// body could not hold them (before anything is reserved for them).
fn read_count(rest: &mut &[u8], min_size: usize) -> Result<usize, CodecError> {
    let count = read_varint(rest)?;
    if count > (rest.len() / min_size) as u64 {
        return Err(CodecError::Truncated);
    }
    Ok(count as usize)
}

fn read_bytes<'a>(rest: &mut &'a [u8]) -> Result<&'a [u8], CodecError> {
    let len = read_varint(rest)?;
    if len > rest.len() as u64 {
        return Err(CodecError::Truncated);
    }
    let (bytes, tail) = rest.split_at(len as usize);
    *rest = tail;
    Ok(bytes)
}

fn read_str<'a>(rest: &mut &'a [u8], field: &str) -> Result<&'a str, CodecError> {
    std::str::from_utf8(read_bytes(rest)?)
        .map_err(|e| malformed(format!("{field} is not UTF-8: {e}")))
}
