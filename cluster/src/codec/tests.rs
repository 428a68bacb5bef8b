//! The codec's tests: round trips of every frame (by hand and by proptest), the exact
//! bytes of the layout the module doc promises, and decoding that refuses what it must.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;

use openraft::testing::log_id;
use openraft::{Entry, EntryPayload, Membership, SnapshotMeta, StoredMembership, Vote};
use opmesh_actors::{Route, Strategy as RouteStrategy};
use proptest::prelude::*;

use super::*;
use crate::types::Command;
use crate::types::{raft_id, NodeStatus};

fn op(id: u128) -> WireOp {
    WireOp {
        id,
        op_type: "resize".into(),
        key: Some(format!("img-{id}")),
        idempotency_key: None,
        payload: Bytes::from_static(br#"{"w":64}"#),
        metadata: BTreeMap::from([("tenant".into(), "a".into())]),
        priority: -3,
        remaining_us: Some(250_000),
        trace: Some(WireTrace {
            trace_id: u128::MAX - id,
            span_id: 7,
            flags: 1,
        }),
        owner: Some("deployer".into()),
    }
}

fn bare_op() -> WireOp {
    WireOp {
        id: 0,
        op_type: "".into(),
        key: None,
        idempotency_key: None,
        payload: Bytes::new(),
        metadata: BTreeMap::new(),
        priority: 0,
        remaining_us: None,
        trace: None,
        owner: None,
    }
}

/// `ops` as one batch, encoded and decoded.
fn read_back(ops: &[WireOp]) -> Vec<WireOp> {
    let Frame::Message(Message::OpBatch(back)) =
        decode(&body_of(&Message::OpBatch(ops.to_vec()))).unwrap()
    else {
        panic!("not an operation batch");
    };
    back
}

fn reply(id: u128) -> WireReply {
    WireReply {
        id,
        status: 2,
        result: Some(Bytes::from_static(b"{}")),
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
            payload: EntryPayload::Normal(Request::new(cmd, "node:a")),
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
        Message::ReplyBatch {
            seq: 0,
            replies: Arc::new(vec![]),
        },
        Message::ReplyBatch {
            seq: u64::MAX,
            replies: Arc::new((0..3).map(reply).collect()),
        },
        Message::ReplyAck { seqs: vec![] },
        Message::ReplyAck {
            seqs: vec![0, 7, u64::MAX],
        },
        Message::Ping {
            seq: 1,
            load: 0,
            overloaded: vec![],
            open_breakers: vec![],
        },
        Message::Pong {
            seq: u64::MAX,
            load: 12,
            overloaded: vec!["resize".into(), "echo".into()],
            open_breakers: vec![
                OpenBreaker {
                    op_type: "hook".into(),
                    open_ms: 29_500,
                },
                OpenBreaker {
                    op_type: String::new(),
                    open_ms: u64::MAX,
                },
            ],
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
        Rpc::Join {
            record: record("d"),
            by: "deployer".into(),
        },
        Rpc::Leave {
            name: "b".into(),
            by: "node:b".into(),
        },
        Rpc::Probe,
    ]
    .into_iter()
    .chain(
        every_command()
            .into_iter()
            .map(|c| Rpc::ClientWrite(Request::new(c, "deployer"))),
    );
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
        RpcReply::Probed { member: true },
        RpcReply::Probed { member: false },
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
        Frame::Welcome(Welcome {
            node: "b".into(),
            proof: [4; 32],
        }),
        Frame::Refused {
            reason: "wrong secret".into(),
        },
        Frame::DialerNonce {
            nonce: [5; 32],
            lane: 3,
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

/// Operations encoded where they are held are the same frame as the batch of their wire
/// values, read back as one, and keep their ids for a refused send.
#[test]
fn encoded_operations_are_an_op_batch_frame() {
    for ops in [
        vec![],
        vec![op(1)],
        (0..256).map(op).chain([bare_op()]).collect::<Vec<_>>(),
    ] {
        let encoded = EncodedOps::new(ops.iter().map(WireOp::fields));
        let ids: Vec<u128> = ops.iter().map(|o| o.id).collect();
        assert_eq!(encoded.ids(), ids.as_slice());
        assert_eq!(encoded.len(), ops.len());
        let body = body_of(&Message::EncodedOps(encoded));
        assert_eq!(body, body_of(&Message::OpBatch(ops.clone())));
        let Frame::Message(Message::OpBatch(back)) = decode(&body).unwrap() else {
            panic!("not read back as an operation batch");
        };
        assert_eq!(back, ops);
    }
}

/// Replies encoded one by one as they complete are the same frame as the batch of
/// their wire values, read back as one, and keep their ids for the ledger.
#[test]
fn encoded_replies_are_a_reply_batch_frame() {
    let bare = WireReply {
        id: 9,
        status: 1,
        result: None,
        error: None,
        cached: false,
        attempts: 0,
    };
    for replies in [
        vec![],
        vec![reply(1)],
        (0..256).map(reply).chain([bare]).collect::<Vec<_>>(),
    ] {
        let encoded: EncodedReplies = replies.iter().map(WireReply::fields).collect();
        let ids: Vec<u128> = replies.iter().map(|r| r.id).collect();
        assert_eq!(encoded.ids(), ids.as_slice());
        assert_eq!(
            (encoded.len(), encoded.is_empty()),
            (replies.len(), replies.is_empty())
        );
        let seq = 77;
        let body = body_of(&Message::EncodedReplies {
            seq,
            replies: Arc::new(encoded.clone()),
        });
        let as_wire = body_of(&Message::ReplyBatch {
            seq,
            replies: Arc::new(replies.clone()),
        });
        assert_eq!(body, as_wire);
        // The header is the tag, the sequence number and a varint count (one or two
        // bytes here): the rest is the records, which is what the ledger counts.
        let count_len = if replies.len() < 128 { 1 } else { 2 };
        assert_eq!(encoded.bytes(), body.len() - 1 - 8 - count_len);
        let Frame::Message(Message::ReplyBatch {
            seq: s,
            replies: back,
        }) = decode(&body).unwrap()
        else {
            panic!("not read back as a reply batch");
        };
        assert_eq!((s, &*back), (seq, &replies));
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
    let body = body_of(&Message::Ping {
        seq: 1,
        load: 2,
        overloaded: vec!["ab".into()],
        open_breakers: vec![],
    });
    let mut expected = vec![tag::PING];
    expected.extend_from_slice(&1u64.to_le_bytes());
    expected.extend_from_slice(&2u64.to_le_bytes());
    expected.extend_from_slice(&1u64.to_le_bytes());
    expected.extend_from_slice(&2u64.to_le_bytes());
    expected.extend_from_slice(b"ab");
    expected.extend_from_slice(&0u64.to_le_bytes());
    assert_eq!(body, expected);

    // Operations: every field, then none but the required ones.
    let body = body_of(&Message::OpBatch(vec![op(300), bare_op()]));
    let mut expected = vec![tag::OP_BATCH, 2];
    expected.extend_from_slice(&300u128.to_le_bytes());
    expected.push(0b11_1101); // key, metadata, remaining, trace, owner
    expected.push(5); // priority -3, zigzag
    expected.extend_from_slice(b"\x06resize\x08{\"w\":64}\x07img-300");
    expected.extend_from_slice(b"\x01\x06tenant\x01a");
    expected.extend_from_slice(&[0x90, 0xA1, 0x0F]); // 250,000
    expected.extend_from_slice(&(u128::MAX - 300).to_le_bytes());
    expected.extend_from_slice(&7u64.to_le_bytes());
    expected.push(1);
    expected.extend_from_slice(b"\x08deployer");
    expected.extend_from_slice(&0u128.to_le_bytes());
    expected.extend_from_slice(&[0, 0, 0, 0]);
    assert_eq!(body, expected);
    assert_eq!(
        body_of(&Message::OpBatch(vec![bare_op()])).len(),
        2 + ops::MIN_WIRE_OP
    );

    let mut bare = reply(1);
    bare.result = None;
    bare.error = None;
    bare.cached = false;
    let body = body_of(&Message::ReplyBatch {
        seq: 9,
        replies: Arc::new(vec![reply(1), bare]),
    });
    let mut expected = vec![tag::REPLY_BATCH];
    expected.extend_from_slice(&9u64.to_le_bytes());
    expected.push(2);
    expected.extend_from_slice(&1u128.to_le_bytes());
    expected.extend_from_slice(&[0b111, 2, 3]); // result, error, cached; status; attempts
    expected.extend_from_slice(b"\x02{}\x04late");
    expected.extend_from_slice(&1u128.to_le_bytes());
    expected.extend_from_slice(&[0, 2, 3]);
    assert_eq!(body, expected);
    assert_eq!(body.len(), 1 + 8 + 1 + 16 + 3 + 3 + 5 + ops::MIN_WIRE_REPLY);
}

/// Varints at every width: the shortest form, and back.
#[test]
fn varints_round_trip_at_every_width() {
    for shift in 0..64 {
        for v in [1u64 << shift, (1u64 << shift) - 1, u64::MAX >> shift] {
            let mut out = Vec::new();
            ops::put_varint(&mut out, v);
            assert_eq!(
                out.len(),
                (64 - v.leading_zeros() as usize).div_ceil(7).max(1)
            );
            let mut rest = out.as_slice();
            assert_eq!(ops::read_varint(&mut rest).unwrap(), v);
            assert!(rest.is_empty());
        }
    }
    // Eleven bytes, or a tenth byte with more than bit 63.
    let mut rest: &[u8] = &[0xFF; 11];
    assert!(matches!(
        ops::read_varint(&mut rest),
        Err(CodecError::Malformed(_))
    ));
    let mut rest: &[u8] = &[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02];
    assert!(matches!(
        ops::read_varint(&mut rest),
        Err(CodecError::Malformed(_))
    ));
    let mut rest: &[u8] = &[0x80, 0x80];
    assert!(matches!(
        ops::read_varint(&mut rest),
        Err(CodecError::Truncated)
    ));
}

/// A batch read back shares one name per run of a type, and its operations keep their
/// own types.
#[test]
fn a_batch_read_back_shares_the_name_of_a_type() {
    let ops: Vec<WireOp> = [(1, "a"), (2, "a"), (3, "b"), (4, "a"), (5, "a")]
        .into_iter()
        .map(|(id, t)| WireOp {
            op_type: t.into(),
            ..op(id)
        })
        .collect();
    let back = read_back(&ops);
    assert_eq!(back, ops);
    assert!(Arc::ptr_eq(&back[0].op_type, &back[1].op_type));
    assert!(Arc::ptr_eq(&back[3].op_type, &back[4].op_type));
    assert!(!Arc::ptr_eq(&back[1].op_type, &back[3].op_type));
}

#[test]
fn bad_bodies_are_named() {
    assert!(matches!(decode(&[]), Err(CodecError::Truncated)));
    assert!(matches!(decode(&[200]), Err(CodecError::UnknownTag(200))));
    assert!(matches!(
        decode(&[tag::PING, 1, 2]),
        Err(CodecError::Truncated)
    ));

    let mut body = body_of(&Message::Ping {
        seq: 1,
        load: 2,
        overloaded: vec![],
        open_breakers: vec![],
    });
    body.push(0);
    assert!(matches!(decode(&body), Err(CodecError::TrailingBytes(1))));

    let mut body = body_of(&Message::Request {
        id: 1,
        body: Rpc::Leave {
            name: "b".into(),
            by: "node:b".into(),
        },
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
    for count in [1u64, 1 << 20, 1 << 40, u64::MAX] {
        let mut body = vec![tag::REPLY_ACK];
        body.extend_from_slice(&count.to_le_bytes());
        body.extend_from_slice(&[0; 7]);
        assert!(
            matches!(decode(&body), Err(CodecError::Truncated)),
            "{count}"
        );
    }

    // Varint counts of batches claiming more records than the body holds.
    for tag in [tag::OP_BATCH, tag::REPLY_BATCH] {
        for count in [4u64, 1 << 20, 1 << 40, u64::MAX] {
            let mut body = vec![tag];
            if tag == tag::REPLY_BATCH {
                body.extend_from_slice(&9u64.to_le_bytes()); // its seq
            }
            ops::put_varint(&mut body, count);
            body.extend_from_slice(&[0; 64]);
            assert!(
                matches!(decode(&body), Err(CodecError::Truncated)),
                "{tag} {count}"
            );
        }
    }

    // An operation's type name, payload, key or metadata claims 2^60 bytes (or pairs).
    let long = |len: u64| {
        let mut v = Vec::new();
        ops::put_varint(&mut v, len);
        v
    };
    let head = |flags: u8| {
        let mut body = vec![tag::OP_BATCH, 1];
        body.extend_from_slice(&[0; 16]);
        body.extend_from_slice(&[flags, 0]);
        body
    };
    let huge = long(1 << 60);
    let cases = [
        [head(0), huge.clone()].concat(),
        [head(0), vec![0], huge.clone()].concat(),
        [head(1), vec![0, 0], huge.clone()].concat(),
        [head(4), vec![0, 0], huge.clone()].concat(),
    ];
    for mut body in cases {
        body.extend_from_slice(&[0; 40]);
        assert!(
            matches!(decode(&body), Err(CodecError::Truncated)),
            "{body:?}"
        );
    }

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

/// Fields the layout does not allow: flags this version does not know, names that are
/// not UTF-8, numbers past 32 bits.
#[test]
fn malformed_records_are_named() {
    let body = body_of(&Message::OpBatch(vec![bare_op()]));
    let flags = 2 + 16;
    let mut bad = body.clone();
    bad[flags] = 0x40;
    let err = decode(&bad).unwrap_err().to_string();
    assert!(err.contains("unknown operation flags 0x40"), "{err}");

    let typed = body_of(&Message::OpBatch(vec![WireOp {
        op_type: "é".into(),
        ..bare_op()
    }]));
    let mut bad = typed.clone();
    bad[flags + 3] = 0xFF;
    let err = decode(&bad).unwrap_err().to_string();
    assert!(err.contains("op_type is not UTF-8"), "{err}");

    let mut bad = body[..flags + 1].to_vec();
    ops::put_varint(&mut bad, 1 << 33);
    bad.extend_from_slice(&[0, 0]);
    let err = decode(&bad).unwrap_err().to_string();
    assert!(
        err.contains("priority 8589934592 does not fit 32 bits"),
        "{err}"
    );

    let mut bare = reply(1);
    bare.result = None;
    bare.error = None;
    bare.cached = false;
    let mut bad = body_of(&Message::ReplyBatch {
        seq: 1,
        replies: Arc::new(vec![bare]),
    });
    bad[1 + 8 + 1 + 16] = 0x08;
    let err = decode(&bad).unwrap_err().to_string();
    assert!(err.contains("unknown reply flags 0x08"), "{err}");
}

/// Small payloads read back are packed into shared blocks, one after the other, a new
/// block when one is full; a large one gets an allocation of its own. Results too.
#[test]
fn small_payloads_share_blocks_and_large_ones_do_not() {
    let sizes = [10, 20, 1000, 1000, 1000, 1000, 100, 2000, 30];
    let ops: Vec<WireOp> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| WireOp {
            payload: vec![b'a' + i as u8; n].into(),
            ..op(i as u128)
        })
        .collect();
    let back = read_back(&ops);
    assert_eq!(back, ops);
    let at = |i: usize| back[i].payload.as_ptr() as usize;
    let follows = |i: usize| at(i) == at(i - 1) + sizes[i - 1];
    // 4,030 bytes fill the first block; 100 more would pass 4,096 and start the next.
    assert!((1..=5).all(follows));
    assert!(!follows(6), "a block holds 4096 bytes at most");
    // 2,000 bytes: copied alone; the 30 after it goes on in the second block.
    assert!(!follows(7));
    assert_eq!(at(8), at(6) + 100);

    let replies: Vec<WireReply> = [5, 5, 3000]
        .iter()
        .map(|&n| WireReply {
            result: Some(vec![b'r'; n].into()),
            ..reply(n as u128)
        })
        .collect();
    let Frame::Message(Message::ReplyBatch { replies: back, .. }) =
        decode(&body_of(&Message::ReplyBatch {
            seq: 1,
            replies: Arc::new(replies.clone()),
        }))
        .unwrap()
    else {
        panic!("not a reply batch");
    };
    assert_eq!(*back, replies);
    let at = |i: usize| back[i].result.as_ref().unwrap().as_ptr() as usize;
    assert_eq!(at(1), at(0) + 5);
    assert_ne!(at(2), at(1) + 5);
}

/// Every priority survives the zigzag varint.
#[test]
fn priorities_round_trip_at_the_extremes() {
    let ops: Vec<WireOp> = [i32::MIN, -1, 0, 1, i32::MAX]
        .into_iter()
        .map(|priority| WireOp {
            priority,
            ..bare_op()
        })
        .collect();
    let back = read_back(&ops);
    assert_eq!(back, ops);
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
        proptest::collection::vec(any::<u8>(), 1..16).prop_map(|bytes| Mutation::Extend { bytes }),
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

fn any_op() -> impl Strategy<Value = WireOp> {
    let text = || proptest::option::of(".{0,12}");
    (
        (any::<u128>(), ".{0,16}", text(), text()),
        (
            proptest::collection::vec(any::<u8>(), 0..200),
            proptest::collection::btree_map(".{0,8}", ".{0,8}", 0..4),
        ),
        (
            any::<i32>(),
            proptest::option::of(any::<u64>()),
            proptest::option::of((any::<u128>(), any::<u64>(), any::<u8>())),
            text(),
        ),
    )
        .prop_map(
            |(
                (id, op_type, key, idempotency_key),
                (payload, metadata),
                (priority, remaining_us, trace, owner),
            )| {
                WireOp {
                    id,
                    op_type: op_type.as_str().into(),
                    key,
                    idempotency_key,
                    payload: payload.into(),
                    metadata,
                    priority,
                    remaining_us,
                    trace: trace.map(|(trace_id, span_id, flags)| WireTrace {
                        trace_id,
                        span_id,
                        flags,
                    }),
                    owner: owner.map(|o| o.as_str().into()),
                }
            },
        )
}

fn any_reply() -> impl Strategy<Value = WireReply> {
    (
        any::<u128>(),
        any::<u8>(),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
        proptest::option::of(".{0,20}"),
        any::<bool>(),
        any::<u32>(),
    )
        .prop_map(|(id, status, result, error, cached, attempts)| WireReply {
            id,
            status,
            result: result.map(Bytes::from),
            error,
            cached,
            attempts,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn any_operations_and_replies_round_trip(
        ops in proptest::collection::vec(any_op(), 0..8),
        replies in proptest::collection::vec(any_reply(), 0..8),
        seq in any::<u64>(),
    ) {
        let back = read_back(&ops);
        prop_assert_eq!(back, ops);
        let replies = Arc::new(replies);
        let Frame::Message(Message::ReplyBatch { seq: s, replies: r }) =
            decode(&body_of(&Message::ReplyBatch { seq, replies: replies.clone() })).unwrap()
        else {
            panic!("not a reply batch");
        };
        prop_assert_eq!(s, seq);
        prop_assert_eq!(r, replies);
    }

    #[test]
    fn random_bytes_decode_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn random_bytes_behind_every_tag_decode_or_fail(
        tag in prop_oneof![0..5u8, 16..22u8],
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
