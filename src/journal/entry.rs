//! One journal entry: what a restarted node needs to run an accepted operation again —
//! its type, keys, payload, metadata, priority, owner, trace context and its deadline as
//! wall-clock time (an [`Instant`] means nothing to the next process). The operation's
//! id is the entry's key in the table, not part of the value.
//!
//! A value is one version byte ([`ENTRY_VERSION`]) and the entry in wincode, the encoder
//! opmesh's own frames use (bincode's layout). [`Entry::revive`] is the pure decision
//! recovery makes for each entry: run it again, or end it `expired` because its deadline
//! passed while the node was down.

use std::time::{Duration, Instant};

use opmesh_actors::{Json, OpId, Operation, TraceContext};
use wincode::containers;
use wincode::len::BincodeLen;
use wincode::{SchemaRead, SchemaWrite};

/// The layout of an entry's value this build writes and reads (its first byte).
pub const ENTRY_VERSION: u8 = 1;

/// Payloads are at most `engine.max_payload_bytes` (64 MiB at most): a length over this
/// cap is a damaged value, refused before anything is reserved for it.
type PayloadLen = BincodeLen<{ 65 << 20 }>;
/// Metadata pairs reserved before they are read, in bytes of `(String, String)` (48
/// each): 1365 pairs, over `engine.max_metadata_entries` (1024 at most).
type MetadataLen = BincodeLen<{ 64 * 1024 }>;

/// An accepted operation as the journal keeps it.
#[derive(Debug, Clone, PartialEq, SchemaWrite, SchemaRead)]
pub struct Entry {
    pub op_type: String,
    pub key: Option<String>,
    pub idempotency_key: Option<String>,
    /// The JSON payload's text.
    #[wincode(with = "containers::Vec<u8, PayloadLen>")]
    pub payload: Vec<u8>,
    #[wincode(with = "containers::Vec<(String, String), MetadataLen>")]
    pub metadata: Vec<(String, String)>,
    pub priority: i32,
    /// The effective deadline (the operation's own or the node's default when it was
    /// accepted), in milliseconds since the Unix epoch.
    pub deadline_unix_ms: u64,
    /// The caller's trace context, so a re-run joins the same trace.
    pub trace: Option<EntryTrace>,
    /// Who submitted it (the API token's name), when the node checks tokens.
    pub owner: Option<String>,
}

/// A W3C trace context, as plain numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, SchemaWrite, SchemaRead)]
pub struct EntryTrace {
    pub trace_id: u128,
    pub span_id: u64,
    pub flags: u8,
}

/// Why a stored value could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("the value is empty")]
    Empty,
    #[error("entry layout version {found}; this build reads version {ENTRY_VERSION}")]
    Version { found: u8 },
    #[error("cannot encode it: {0}")]
    Encode(String),
    #[error("cannot decode it: {0}")]
    Decode(String),
    #[error("its payload is not JSON: {0}")]
    Payload(String),
}

/// What recovery does with an entry.
#[derive(Debug)]
pub enum Revived {
    /// Run it again: the operation with its id and the time left until its deadline.
    Run(Operation),
    /// Its deadline passed while the node was down: it ends `expired`, not run.
    Expired(Operation),
}

impl Entry {
    /// The entry of `op`, accepted with the effective `deadline`; `now` and
    /// `now_unix_ms` are the same moment on the two clocks.
    pub fn of(op: &Operation, deadline: Instant, now: Instant, now_unix_ms: u64) -> Entry {
        let left = deadline.saturating_duration_since(now);
        Entry {
            op_type: op.op_type.to_string(),
            key: op.key.clone(),
            idempotency_key: op.idempotency_key.clone(),
            payload: op.payload.as_bytes().to_vec(),
            metadata: op
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            priority: op.priority,
            deadline_unix_ms: now_unix_ms.saturating_add(left.as_millis() as u64),
            trace: op.trace_context.map(|t| EntryTrace {
                trace_id: t.trace_id,
                span_id: t.span_id,
                flags: t.flags,
            }),
            owner: op.owner.as_deref().map(str::to_owned),
        }
    }

    /// The stored value: the version byte, then the entry.
    pub fn encode(&self) -> Result<Vec<u8>, EntryError> {
        let size = wincode::serialized_size(self).map_err(|e| EntryError::Encode(e.to_string()))?;
        let mut out = Vec::with_capacity(1 + size as usize);
        out.push(ENTRY_VERSION);
        wincode::serialize_into(&mut out, self).map_err(|e| EntryError::Encode(e.to_string()))?;
        Ok(out)
    }

    /// Reads a stored value; anything but a whole entry of this version is an error.
    pub fn decode(value: &[u8]) -> Result<Entry, EntryError> {
        let (&version, body) = value.split_first().ok_or(EntryError::Empty)?;
        if version != ENTRY_VERSION {
            return Err(EntryError::Version { found: version });
        }
        wincode::deserialize_exact(body).map_err(|e| EntryError::Decode(e.to_string()))
    }

    /// The operation `id` again, deciding at `now` (`now_unix_ms` on the wall clock)
    /// whether it may still run: a deadline at or before now ends it expired.
    pub fn revive(self, id: OpId, now: Instant, now_unix_ms: u64) -> Result<Revived, EntryError> {
        let payload =
            Json::from_bytes(self.payload).map_err(|e| EntryError::Payload(e.to_string()))?;
        let mut op = Operation::new(self.op_type, payload);
        op.id = id;
        op.key = self.key;
        op.idempotency_key = self.idempotency_key;
        op.metadata = self.metadata.into_iter().collect();
        op.priority = self.priority;
        op.trace_context = self.trace.map(|t| TraceContext {
            trace_id: t.trace_id,
            span_id: t.span_id,
            flags: t.flags,
        });
        op.owner = self.owner.map(Into::into);
        if self.deadline_unix_ms <= now_unix_ms {
            return Ok(Revived::Expired(op));
        }
        op.deadline = Some(now + Duration::from_millis(self.deadline_unix_ms - now_unix_ms));
        Ok(Revived::Run(op))
    }
}

/// Milliseconds since the Unix epoch, now (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_op() -> Operation {
        Operation::new("resize", Json::from_bytes(&br#"{"w":640}"#[..]).unwrap())
            .with_key("img-7")
            .with_idempotency_key("order-9")
            .with_priority(-3)
            .with_metadata("tenant", "acme")
            .with_metadata("n", "2")
            .with_trace_context(TraceContext {
                trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
                span_id: 0x00f067aa0ba902b7,
                flags: 1,
            })
            .with_owner("deployer")
    }

    #[test]
    fn an_entry_round_trips_and_revives_with_its_id_and_the_time_left() {
        let op = full_op();
        let now = Instant::now();
        let e = Entry::of(&op, now + Duration::from_secs(30), now, 1_000_000);
        assert_eq!(e.deadline_unix_ms, 1_030_000);
        let value = e.encode().unwrap();
        assert_eq!(value[0], ENTRY_VERSION);
        let back = Entry::decode(&value).unwrap();
        assert_eq!(back, e);

        // Ten seconds later, after a restart: twenty seconds left.
        let later = Instant::now();
        let Revived::Run(r) = back.revive(op.id, later, 1_010_000).unwrap() else {
            panic!("the deadline has not passed");
        };
        assert_eq!(r.id, op.id);
        assert_eq!(r.deadline, Some(later + Duration::from_secs(20)));
        assert_eq!(
            (&r.op_type, &r.key, &r.idempotency_key, r.priority),
            (&op.op_type, &op.key, &op.idempotency_key, op.priority)
        );
        assert_eq!(r.payload, op.payload);
        assert_eq!(r.metadata, op.metadata);
        assert_eq!(r.trace_context, op.trace_context);
        assert_eq!(r.owner, op.owner);
    }

    #[test]
    fn a_deadline_that_passed_while_the_node_was_down_expires_the_operation() {
        let op = Operation::new("echo", Json::null());
        let now = Instant::now();
        let e = Entry::of(&op, now + Duration::from_millis(500), now, 1_000_000);
        for at in [1_000_500, 2_000_000] {
            match e.clone().revive(op.id, Instant::now(), at).unwrap() {
                Revived::Expired(r) => assert_eq!(r.id, op.id),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn damaged_values_are_refused_with_the_reason() {
        let op = full_op();
        let now = Instant::now();
        let value = Entry::of(&op, now, now, 1).encode().unwrap();
        assert_eq!(Entry::decode(&[]), Err(EntryError::Empty));
        let mut other = value.clone();
        other[0] = 9;
        assert_eq!(
            Entry::decode(&other).unwrap_err().to_string(),
            "entry layout version 9; this build reads version 1"
        );
        assert!(matches!(
            Entry::decode(&value[..value.len() - 1]),
            Err(EntryError::Decode(_))
        ));
        let mut longer = value.clone();
        longer.push(0);
        assert!(matches!(Entry::decode(&longer), Err(EntryError::Decode(_))));
        // A payload length claiming 2^60 bytes: refused, nothing reserved.
        let mut lying = value;
        let at = 1 + 8 + "resize".len() + 1 + 8 + "img-7".len() + 1 + 8 + "order-9".len();
        lying[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        assert!(matches!(Entry::decode(&lying), Err(EntryError::Decode(_))));
    }

    #[test]
    fn a_payload_that_is_not_json_is_refused_on_revival() {
        let op = Operation::new("echo", Json::null());
        let now = Instant::now();
        let mut e = Entry::of(&op, now, now, 1);
        e.payload = b"{not json".to_vec();
        assert!(matches!(
            e.revive(op.id, now, 0),
            Err(EntryError::Payload(_))
        ));
    }
}
