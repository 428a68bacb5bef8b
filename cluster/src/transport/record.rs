//! Authenticated records: how everything a dialer sends after the handshake travels.
//!
//! A writer coalesces the messages waiting for a peer into one write, and that write is
//! one record: a `u32` LE length (of what follows it), the frames (each with its own
//! length prefix, as the [`codec`](crate::codec) lays them out), then a 32-byte tag:
//! BLAKE3 in keyed mode (a MAC, as HMAC-SHA256 is, several times faster on the records
//! of a busy link) under the link's key over the record's frames, then its sequence
//! number and its length (each fixed-size, little-endian). The frames come first so that
//! they lie on BLAKE3's 1 KiB chunks and all but the last are hashed several at a time
//! (with the 12 bytes first, a record of 8-16 KB took a third longer). The key is derived in the [`handshake`](super::handshake) from the
//! secret, both nonces and both names, so it is new on every connection; the sequence
//! number counts records from 0 on each connection and is never sent. A reader checks
//! the tag before it decodes anything in the record: a record altered on the way,
//! replayed, reordered, dropped or spliced in from another connection fails, and the
//! link is closed.
//!
//! Record 0 is empty: the dialer's proof, at the end of the handshake, that it derived
//! the same key (it covers both names, which the dialer's `Hello` cannot: the dialer
//! learns the acceptor's name from its `Welcome`).
//!
//! One tag per write rather than per message keeps the cost per message small: under
//! load one record carries hundreds of messages. Records are authenticated, not
//! encrypted: whoever sees the traffic can read it, and cannot change it.

use crate::codec::LEN_PREFIX;
use crate::config::ClusterConfig;

/// Bytes of a record's tag.
pub(super) const TAG_LEN: usize = 32;

/// The largest record body (frames and tag, its length prefix excluded) a reader with
/// this `max_frame` accepts: a writer flushes before `flush_bytes`
/// ([`ClusterConfig::MAX_FLUSH_BYTES`] at most) is passed, plus the frame that passed it.
pub(super) fn max_record(max_frame: usize) -> usize {
    ClusterConfig::MAX_FLUSH_BYTES + LEN_PREFIX + max_frame + TAG_LEN
}

/// Why a record was not accepted. Either closes the link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum RecordError {
    #[error("record {seq} has {len} bytes, fewer than its tag")]
    Short { seq: u64, len: usize },
    #[error(
        "record {seq} failed authentication: altered, replayed, reordered or not sent on this link"
    )]
    BadTag { seq: u64 },
}

/// The key of one direction of one link, keyed once.
#[derive(Clone)]
pub(super) struct LinkKey(blake3::Hasher);

impl LinkKey {
    pub(super) fn new(key: &[u8; 32]) -> LinkKey {
        LinkKey(blake3::Hasher::new_keyed(key))
    }

    /// The tag of record `seq` of `len` bytes holding `frames`.
    fn tag(&self, frames: &[u8], seq: u64, len: usize) -> blake3::Hash {
        let len = u32::try_from(len).expect("a record fits its u32 length (checked by the config)");
        let mut mac = self.0.clone();
        mac.update(frames);
        mac.update(&seq.to_le_bytes());
        mac.update(&len.to_le_bytes());
        mac.finalize()
    }
}

/// The writing end: seals records in sequence.
pub(super) struct Sealer {
    key: LinkKey,
    seq: u64,
}

impl Sealer {
    pub(super) fn new(key: LinkKey) -> Sealer {
        Sealer { key, seq: 0 }
    }

    /// Starts a record in the empty `buf`: room for its length. Frames are then
    /// appended with [`codec::encode`](crate::codec::encode).
    pub(super) fn begin(buf: &mut Vec<u8>) {
        debug_assert!(buf.is_empty(), "one record per buffer");
        buf.extend_from_slice(&[0; LEN_PREFIX]);
    }

    /// Whether the record begun in `buf` holds no frame yet.
    pub(super) fn is_empty(buf: &[u8]) -> bool {
        buf.len() <= LEN_PREFIX
    }

    /// Closes the record begun in `buf`: writes its length and appends its tag. `buf`
    /// then holds the whole record, ready to write.
    pub(super) fn seal(&mut self, buf: &mut Vec<u8>) {
        let len = buf.len() - LEN_PREFIX + TAG_LEN;
        let tag = self.key.tag(&buf[LEN_PREFIX..], self.seq, len);
        buf[..LEN_PREFIX].copy_from_slice(&(len as u32).to_le_bytes());
        buf.extend_from_slice(tag.as_bytes());
        self.seq += 1;
    }
}

/// The reading end: opens records in sequence.
pub(super) struct Opener {
    key: LinkKey,
    seq: u64,
}

impl Opener {
    pub(super) fn new(key: LinkKey) -> Opener {
        Opener { key, seq: 0 }
    }

    /// Checks the next record, `body` being what follows its length prefix, and returns
    /// its frames. The tag is compared in constant time.
    pub(super) fn open<'a>(&mut self, body: &'a [u8]) -> Result<&'a [u8], RecordError> {
        let seq = self.seq;
        let Some(end) = body.len().checked_sub(TAG_LEN) else {
            return Err(RecordError::Short {
                seq,
                len: body.len(),
            });
        };
        let (frames, tag) = body.split_at(end);
        let tag: [u8; TAG_LEN] = tag.try_into().expect("split at TAG_LEN from the end");
        // `Hash`'s equality is constant time.
        if self.key.tag(frames, seq, body.len()) != blake3::Hash::from_bytes(tag) {
            return Err(RecordError::BadTag { seq });
        }
        self.seq += 1;
        Ok(frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{self, Frame, Message};

    fn key(byte: u8) -> LinkKey {
        LinkKey::new(&[byte; 32])
    }

    /// A sealed record holding pings `seqs`.
    fn record(sealer: &mut Sealer, seqs: &[u64]) -> Vec<u8> {
        let mut buf = Vec::new();
        Sealer::begin(&mut buf);
        for &seq in seqs {
            codec::encode(
                &Message::Ping {
                    seq,
                    load: 0,
                    overloaded: vec![],
                    open_breakers: vec![],
                },
                &mut buf,
            )
            .unwrap();
        }
        sealer.seal(&mut buf);
        buf
    }

    /// The body a reader splits off: what follows the length prefix, checked against it.
    fn body(record: &[u8]) -> &[u8] {
        let len = u32::from_le_bytes(record[..4].try_into().unwrap()) as usize;
        assert_eq!(len, record.len() - 4);
        &record[4..]
    }

    fn pings(mut frames: &[u8]) -> Vec<u64> {
        let mut out = Vec::new();
        while !frames.is_empty() {
            let len = codec::body_len(frames[..4].try_into().unwrap(), 1024).unwrap();
            match codec::decode(&frames[4..4 + len]).unwrap() {
                Frame::Message(Message::Ping { seq, .. }) => out.push(seq),
                other => panic!("{other:?}"),
            }
            frames = &frames[4 + len..];
        }
        out
    }

    #[test]
    fn records_open_in_order_with_their_frames() {
        let (mut sealer, mut opener) = (Sealer::new(key(1)), Opener::new(key(1)));
        let empty = record(&mut sealer, &[]);
        assert_eq!(empty.len(), 4 + TAG_LEN);
        assert_eq!(opener.open(body(&empty)), Ok(&[][..]));
        for batch in [&[1, 2, 3][..], &[4], &[5, 6]] {
            let r = record(&mut sealer, batch);
            assert_eq!(pings(opener.open(body(&r)).unwrap()), batch);
        }
    }

    /// The tag as the protocol states it: keyed BLAKE3 over the frames, the sequence
    /// number (u64 LE) and the record's length (u32 LE, tag included).
    #[test]
    fn the_tag_covers_the_frames_then_the_sequence_number_and_length() {
        let mut sealer = Sealer::new(key(3));
        let _ = record(&mut sealer, &[]);
        let r = record(&mut sealer, &[7, 8]);
        let (frames, tag) = r[4..].split_at(r.len() - 4 - TAG_LEN);
        let mut expect = blake3::Hasher::new_keyed(&[3; 32]);
        expect.update(frames);
        expect.update(&1u64.to_le_bytes());
        expect.update(&((r.len() - 4) as u32).to_le_bytes());
        assert_eq!(expect.finalize().as_bytes(), tag);
    }

    #[test]
    fn any_flipped_bit_fails() {
        let mut sealer = Sealer::new(key(1));
        let r = record(&mut sealer, &[1, 2]);
        for at in 4..r.len() {
            for bit in [0x01, 0x80] {
                let mut bad = r.clone();
                bad[at] ^= bit;
                let mut opener = Opener::new(key(1));
                assert_eq!(
                    opener.open(body_unchecked(&bad)),
                    Err(RecordError::BadTag { seq: 0 }),
                    "byte {at}"
                );
            }
        }
    }

    fn body_unchecked(record: &[u8]) -> &[u8] {
        &record[4..]
    }

    #[test]
    fn a_replayed_reordered_or_dropped_record_fails() {
        let mut sealer = Sealer::new(key(1));
        let r0 = record(&mut sealer, &[1]);
        let r1 = record(&mut sealer, &[2]);
        let r2 = record(&mut sealer, &[3]);

        let mut replay = Opener::new(key(1));
        replay.open(body(&r0)).unwrap();
        assert_eq!(replay.open(body(&r0)), Err(RecordError::BadTag { seq: 1 }));

        let mut reorder = Opener::new(key(1));
        assert_eq!(reorder.open(body(&r1)), Err(RecordError::BadTag { seq: 0 }));

        let mut dropped = Opener::new(key(1));
        dropped.open(body(&r0)).unwrap();
        assert_eq!(dropped.open(body(&r2)), Err(RecordError::BadTag { seq: 1 }));
    }

    #[test]
    fn another_key_a_truncated_or_short_record_fails() {
        let mut sealer = Sealer::new(key(1));
        let r = record(&mut sealer, &[1]);
        assert_eq!(
            Opener::new(key(2)).open(body(&r)),
            Err(RecordError::BadTag { seq: 0 })
        );
        // A record cut short (its frames moved into the tag's place) or shorter than a tag.
        assert_eq!(
            Opener::new(key(1)).open(&r[4..r.len() - 1]),
            Err(RecordError::BadTag { seq: 0 })
        );
        assert_eq!(
            Opener::new(key(1)).open(&[0; TAG_LEN - 1]),
            Err(RecordError::Short {
                seq: 0,
                len: TAG_LEN - 1
            })
        );
    }
}
