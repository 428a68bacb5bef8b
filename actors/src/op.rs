//! The operation model: what a client submits ([`Operation`]), what it gets back
//! ([`OpOutcome`]), and the checks an operation passes before the engine accepts it.
//!
//! Everything here is plain data. The api turns a request into an `Operation`; the
//! engine validates it against [`Limits`] at the door, so every later stage may rely on
//! a well-formed operation.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The name of an operation type (`"echo"`, `"resize"`). Cheap to clone.
pub type OpType = Arc<str>;

/// A map keyed by operation type names: hashed with foldhash (seeded per process), not
/// SipHash. Every operation looks its type up in a few of these (the handler registry,
/// the Scheduler's queues), and SipHash over the name was 2-5 % of a node's CPU. Only
/// registered (or routed) types are ever inserted, never names a client chose, so the
/// maps stay small and a chosen name cannot flood them.
pub type TypeMap<V> = std::collections::HashMap<OpType, V, foldhash::fast::RandomState>;

/// The id of a node in the cluster. Cheap to clone.
pub type NodeId = Arc<str>;

/// Names operations' types while a batch of them is read: an operation of the same type
/// as the one before shares its name instead of allocating one (a batch usually holds
/// one type, or runs of one).
#[derive(Default)]
pub struct TypeNames(Option<OpType>);

impl TypeNames {
    /// `name` as an [`OpType`]: the previous one's, when it is the same.
    pub fn name(&mut self, name: &str) -> OpType {
        match &self.0 {
            Some(t) if **t == *name => t.clone(),
            _ => self.0.insert(OpType::from(name)).clone(),
        }
    }
}

/// A unique operation id, shown as a UUID-formatted string.
///
/// Ids are random version-4 UUIDs drawn from the thread's cryptographically secure
/// generator (122 random bits), so an id cannot be guessed from another one: knowing an
/// operation's id is what lets a client read its result.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpId(pub u128);

impl OpId {
    /// A fresh random id (a UUID of version 4, variant RFC 4122).
    pub fn new() -> Self {
        use rand::Rng;
        let bits: u128 = rand::rng().random();
        // Version 4 in bits 76..80, variant 0b10 in bits 62..64.
        OpId((bits & !(0xF << 76) & !(0b11 << 62)) | (0x4 << 76) | (0b10 << 62))
    }
}

impl Default for OpId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        uuid::Uuid::from_u128(self.0).hyphenated().fmt(f)
    }
}

impl fmt::Debug for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for OpId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(|u| OpId(u.as_u128()))
    }
}

impl Serialize for OpId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for OpId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A JSON document held as its encoded text: payloads and results travel through the
/// engine without being parsed again. Always valid JSON.
#[derive(Clone, PartialEq, Eq)]
pub struct Json(Bytes);

impl Json {
    /// JSON `null`.
    pub fn null() -> Self {
        Json(Bytes::from_static(b"null"))
    }

    /// Encodes a serializable value.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        serde_json::to_vec(value).map(|v| Json(Bytes::from(v)))
    }

    /// Checks that `bytes` hold one JSON document and wraps them.
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Result<Self, serde_json::Error> {
        let bytes = bytes.into();
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)?;
        Ok(Json(bytes))
    }

    /// Wraps bytes the caller knows to be valid JSON (for example a `RawValue`'s text).
    pub fn from_trusted(bytes: impl Into<Bytes>) -> Self {
        Json(bytes.into())
    }

    /// Decodes the document into a typed value.
    pub fn decode<'a, T: Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.0)
    }

    /// The encoded text.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The encoded text, shared (no copy).
    pub fn to_bytes(&self) -> Bytes {
        self.0.clone()
    }

    /// The encoded text, given up.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// A copy in an allocation of its own. What a store that keeps results for long
    /// holds: a document read off a cluster link may be part of a larger shared buffer
    /// (a batch's block of small payloads), which a stored slice would keep alive.
    pub fn detached(&self) -> Json {
        Json(Bytes::copy_from_slice(&self.0))
    }

    /// The encoded text as a `str` (valid JSON is valid UTF-8).
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("null")
    }

    /// The size of the encoded text in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the encoded text is empty (never true for a valid document).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Json {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match serde_json::from_str::<&serde_json::value::RawValue>(self.as_str()) {
            Ok(raw) => raw.serialize(s),
            Err(e) => Err(serde::ser::Error::custom(e)),
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        Ok(Json(Bytes::from(String::from(Box::<str>::from(raw)))))
    }
}

/// W3C trace context carried with an operation, so spans on every node join one trace.
/// Plain numbers: copying it costs nothing, and the `traceparent` text is made on demand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    pub span_id: u64,
    pub flags: u8,
}

impl TraceContext {
    /// Parses and checks a `traceparent` header value
    /// (`00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`); `None` when malformed.
    pub fn parse(traceparent: &str) -> Option<Self> {
        let parts: Vec<&str> = traceparent.trim().split('-').collect();
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if parts.len() != 4
            || !hex(parts[0], 2)
            || parts[0].eq_ignore_ascii_case("ff")
            || !hex(parts[1], 32)
            || !hex(parts[2], 16)
            || !hex(parts[3], 2)
        {
            return None;
        }
        let ctx = TraceContext {
            trace_id: u128::from_str_radix(parts[1], 16).ok()?,
            span_id: u64::from_str_radix(parts[2], 16).ok()?,
            flags: u8::from_str_radix(parts[3], 16).ok()?,
        };
        (ctx.trace_id != 0 && ctx.span_id != 0).then_some(ctx)
    }

    /// The 32-hex-digit trace id.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

/// One unit of work: a type, an optional key, a JSON payload, and how to run it.
#[derive(Clone, Debug)]
pub struct Operation {
    pub id: OpId,
    pub op_type: OpType,
    /// Routing key: operations with the same key go to the same node under
    /// consistent hashing, which gives cache affinity.
    pub key: Option<String>,
    pub payload: Json,
    pub metadata: BTreeMap<String, String>,
    /// Higher runs first within a type's queue.
    pub priority: i32,
    /// When the operation stops being worth running. `None`: the node's default.
    pub deadline: Option<Instant>,
    /// Operations with the same type and idempotency key run once; later ones get the
    /// cached result, and ones that arrive while it runs join it.
    pub idempotency_key: Option<String>,
    pub trace_context: Option<TraceContext>,
    /// Who submitted it (the API token's name), when the node checks tokens: only they
    /// (or an admin) may read it, and their idempotency keys are theirs alone.
    pub owner: Option<Arc<str>>,
}

impl Operation {
    /// A new operation of `op_type` with `payload`, a fresh id and default settings.
    pub fn new(op_type: impl Into<OpType>, payload: Json) -> Self {
        Operation {
            id: OpId::new(),
            op_type: op_type.into(),
            key: None,
            payload,
            metadata: BTreeMap::new(),
            priority: 0,
            deadline: None,
            idempotency_key: None,
            trace_context: None,
            owner: None,
        }
    }

    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    pub fn with_priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the deadline `timeout` from now.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.deadline = Some(Instant::now() + timeout);
        self
    }

    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    pub fn with_trace_context(mut self, ctx: TraceContext) -> Self {
        self.trace_context = Some(ctx);
        self
    }

    pub fn with_owner(mut self, owner: impl Into<Arc<str>>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// The key a handler applies this operation's side effect once by: its idempotency
    /// key (`<owner>/<key>` when it has an owner, since with API tokens on two tokens'
    /// equal keys are two keys), else its id. The same on every attempt, re-run and
    /// retry, and on whichever node runs it: the built-in HTTP handler sends it as
    /// `Idempotency-Key`, so a receiver can apply each effect once.
    pub fn effect_key(&self) -> String {
        match (&self.idempotency_key, &self.owner) {
            (Some(k), Some(owner)) => format!("{owner}/{k}"),
            (Some(k), None) => k.clone(),
            (None, _) => self.id.to_string(),
        }
    }
}

/// Where an operation is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum OpStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Expired,
}

impl OpStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OpStatus::Queued => "queued",
            OpStatus::Running => "running",
            OpStatus::Succeeded => "succeeded",
            OpStatus::Failed => "failed",
            OpStatus::Expired => "expired",
        }
    }

    pub fn to_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(v: u8) -> Self {
        match v {
            0 => OpStatus::Queued,
            1 => OpStatus::Running,
            2 => OpStatus::Succeeded,
            3 => OpStatus::Failed,
            _ => OpStatus::Expired,
        }
    }

    /// Whether the operation has finished (succeeded, failed or expired).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            OpStatus::Succeeded | OpStatus::Failed | OpStatus::Expired
        )
    }
}

/// The end of an operation: what it returned or why it did not.
#[derive(Clone, Debug, PartialEq)]
pub struct OpOutcome {
    pub id: OpId,
    pub status: OpStatus,
    pub result: Option<Json>,
    pub error: Option<String>,
    /// Answered from the result cache (or by joining an identical operation in flight).
    pub cached: bool,
    pub executed_by: Option<NodeId>,
    /// How many times the handler ran (0 when answered from the cache or expired early).
    pub attempts: u32,
    /// The operation's trace, when it is traced.
    pub trace_id: Option<TraceId>,
}

/// A W3C trace id, shown as 32 lowercase hex digits. Kept as a number so that an
/// operation's answer costs no formatting until someone reads it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub u128);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl OpOutcome {
    /// An outcome of `status` with nothing else set (no result, error or runner).
    pub fn new(id: OpId, status: OpStatus) -> Self {
        OpOutcome {
            id,
            status,
            result: None,
            error: None,
            cached: false,
            executed_by: None,
            attempts: 0,
            trace_id: None,
        }
    }

    /// A failed (or expired) outcome with its reason.
    pub fn failure(id: OpId, status: OpStatus, reason: impl Into<String>) -> Self {
        OpOutcome {
            error: Some(reason.into()),
            ..OpOutcome::new(id, status)
        }
    }

    pub fn is_success(&self) -> bool {
        self.status == OpStatus::Succeeded
    }
}

/// Size bounds every operation is checked against before it is accepted.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_type_len: usize,
    pub max_payload_bytes: usize,
    pub max_metadata_entries: usize,
    pub max_metadata_bytes: usize,
    pub max_key_len: usize,
    /// Used when an operation has no deadline of its own.
    pub default_deadline: Duration,
    /// The latest deadline an operation may ask for, from when it is accepted: what
    /// one operation may hold a slot and its memory for.
    pub max_deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_type_len: 128,
            max_payload_bytes: 1 << 20,
            max_metadata_entries: 32,
            max_metadata_bytes: 8 << 10,
            max_key_len: 512,
            default_deadline: Duration::from_secs(30),
            max_deadline: Duration::from_secs(3600),
        }
    }
}

/// Why an operation was not accepted. Every variant names what was wrong.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("field `{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("payload is {size} bytes, over the limit of {limit} bytes")]
    PayloadTooLarge { size: usize, limit: usize },
    #[error("deadline has already passed")]
    DeadlineInPast,
    #[error("no handler and no route for operation type `{op_type}`")]
    NoRoute { op_type: String },
    #[error(
        "queue for type `{op_type}` is full ({capacity} operations); retry after {retry_after:?}"
    )]
    Overloaded {
        op_type: String,
        capacity: usize,
        retry_after: Duration,
    },
    /// The node the operation would go to reported its queue of the type over the high
    /// watermark (`flow.high`), or this node's link to it is congested, and no other
    /// healthy node of the route can take it.
    #[error(
        "node `{node}` is overloaded with operations of type `{op_type}` ({why}) and no \
         other node of the route can take them; retry after {retry_after:?}"
    )]
    OwnerOverloaded {
        op_type: String,
        node: String,
        /// What is over its watermark: the owner's queue or the link to it.
        why: &'static str,
        retry_after: Duration,
    },
    #[error("node is shutting down and accepts no new operations")]
    ShuttingDown,
    #[error(
        "operation type `{op_type}` is over its rate limit of {per_sec} per second, burst \
         {burst} (types.{op_type}.rate_per_sec, types.{op_type}.burst); retry after \
         {retry_after:?}"
    )]
    RateLimited {
        op_type: String,
        per_sec: u32,
        burst: u32,
        retry_after: Duration,
    },
    #[error(
        "the circuit breaker of operation type `{op_type}`{} is open: its handler kept \
         failing; it lets operations through again in {:?}",
        breaker.as_deref().map(|b| format!(" (shared: `{b}`)")).unwrap_or_default(),
        whole_ms(*retry_after)
    )]
    CircuitOpen {
        op_type: String,
        /// The breaker's name when it is not the type's own (types sharing a target).
        breaker: Option<String>,
        retry_after: Duration,
    },
    /// The node the operation would go to reported its circuit breaker of the type open,
    /// and no other healthy node of the route has it closed.
    #[error(
        "the circuit breaker of operation type `{op_type}` on node `{node}` is open (its \
         handler there kept failing) and no other node of the route can take it; it lets \
         operations through again in {:?}",
        whole_ms(*retry_after)
    )]
    OwnerCircuitOpen {
        op_type: String,
        node: String,
        retry_after: Duration,
    },
}

impl SubmitError {
    /// How long the submitter should wait before trying again, when the refusal is one
    /// that passes (a full queue, a rate limit, an open breaker).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SubmitError::Overloaded { retry_after, .. }
            | SubmitError::OwnerOverloaded { retry_after, .. }
            | SubmitError::RateLimited { retry_after, .. }
            | SubmitError::CircuitOpen { retry_after, .. }
            | SubmitError::OwnerCircuitOpen { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// `d` rounded up to whole milliseconds, for messages.
fn whole_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_nanos().div_ceil(1_000_000) as u64)
}

/// Whether `name` is a valid operation type name: 1 to `max` characters from
/// `[A-Za-z0-9_.:/-]`.
pub fn validate_type_name(name: &str, max: usize) -> Result<(), SubmitError> {
    if name.is_empty() {
        return Err(SubmitError::Invalid {
            field: "type",
            reason: "must not be empty".into(),
        });
    }
    if name.len() > max {
        return Err(SubmitError::Invalid {
            field: "type",
            reason: format!(
                "is {} characters, longer than the limit of {max}",
                name.len()
            ),
        });
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '/')))
    {
        return Err(SubmitError::Invalid {
            field: "type",
            reason: format!("contains {c:?}; allowed are letters, digits and _ - . : /"),
        });
    }
    Ok(())
}

impl Limits {
    /// Checks an operation against these limits.
    pub fn check(&self, op: &Operation, now: Instant) -> Result<(), SubmitError> {
        validate_type_name(&op.op_type, self.max_type_len)?;
        if op.payload.len() > self.max_payload_bytes {
            return Err(SubmitError::PayloadTooLarge {
                size: op.payload.len(),
                limit: self.max_payload_bytes,
            });
        }
        for (field, value) in [("key", &op.key), ("idempotency_key", &op.idempotency_key)] {
            if let Some(v) = value {
                if v.is_empty() || v.len() > self.max_key_len {
                    return Err(SubmitError::Invalid {
                        field,
                        reason: format!("must be 1 to {} bytes, got {}", self.max_key_len, v.len()),
                    });
                }
            }
        }
        if op.metadata.len() > self.max_metadata_entries {
            return Err(SubmitError::Invalid {
                field: "metadata",
                reason: format!(
                    "has {} entries, over the limit of {}",
                    op.metadata.len(),
                    self.max_metadata_entries
                ),
            });
        }
        let meta_bytes: usize = op.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        if meta_bytes > self.max_metadata_bytes {
            return Err(SubmitError::Invalid {
                field: "metadata",
                reason: format!(
                    "is {meta_bytes} bytes, over the limit of {}",
                    self.max_metadata_bytes
                ),
            });
        }
        if let Some(d) = op.deadline {
            if d <= now {
                return Err(SubmitError::DeadlineInPast);
            }
            let asked = d.duration_since(now);
            if asked > self.max_deadline {
                return Err(SubmitError::Invalid {
                    field: "deadline_ms",
                    reason: format!(
                        "is {} ms, over the limit of {} ms (engine.max_deadline_ms)",
                        asked.as_millis(),
                        self.max_deadline.as_millis()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Asserts that `json` holds `text` in an allocation of its own, not in `block`.
#[cfg(test)]
pub(crate) fn assert_detached(json: &Json, text: &str, block: &Bytes) {
    assert_eq!(json.as_str(), text);
    let at = json.as_bytes().as_ptr() as usize;
    let span = block.as_ptr() as usize..block.as_ptr() as usize + block.len();
    assert!(
        !span.contains(&at),
        "the stored result points into the block"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_over_the_limit_is_refused_naming_the_field_and_the_limit() {
        let limits = Limits {
            max_deadline: Duration::from_secs(60),
            ..Limits::default()
        };
        let now = Instant::now();
        let op = Operation::new("t", Json::null());
        let within = Operation {
            deadline: Some(now + Duration::from_secs(60)),
            ..op.clone()
        };
        assert_eq!(limits.check(&within, now), Ok(()));
        let over = Operation {
            deadline: Some(now + Duration::from_secs(61)),
            ..op
        };
        match limits.check(&over, now) {
            Err(SubmitError::Invalid { field, reason }) => {
                assert_eq!(field, "deadline_ms");
                assert!(
                    reason.contains("61000 ms") && reason.contains("60000 ms"),
                    "{reason}"
                );
                assert!(reason.contains("engine.max_deadline_ms"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_effect_key_is_the_idempotency_key_scoped_by_owner_else_the_id() {
        let op = Operation::new("t", Json::null());
        assert_eq!(op.effect_key(), op.id.to_string());
        let keyed = op.clone().with_idempotency_key("order-7");
        assert_eq!(keyed.effect_key(), "order-7");
        assert_eq!(keyed.with_owner("app").effect_key(), "app/order-7");
        // An owner alone changes nothing: the id is unique already.
        assert_eq!(op.clone().with_owner("app").effect_key(), op.id.to_string());
    }

    #[test]
    fn op_ids_are_unique_and_round_trip() {
        let a = OpId::new();
        let b = OpId::new();
        assert_ne!(a, b);
        // Random version-4 UUIDs: no shared prefix, no counter to guess the next one by.
        for id in [a, b] {
            let u = uuid::Uuid::from_u128(id.0);
            assert_eq!(u.get_version_num(), 4, "{u}");
            assert_eq!(u.get_variant(), uuid::Variant::RFC4122, "{u}");
        }
        assert_ne!(a.0 >> 64, b.0 >> 64, "the high halves differ too");
        let parsed: OpId = a.to_string().parse().unwrap();
        assert_eq!(a, parsed);
        assert!("not-an-id".parse::<OpId>().is_err());
    }

    #[test]
    fn json_rejects_invalid_text_and_keeps_valid_text() {
        assert!(Json::from_bytes(&b"{\"a\":"[..]).is_err());
        let j = Json::from_bytes(&b"{\"a\":[1,2]}"[..]).unwrap();
        assert_eq!(serde_json::to_string(&j).unwrap(), "{\"a\":[1,2]}");
        let v: serde_json::Value = j.decode().unwrap();
        assert_eq!(v["a"][1], 2);
    }

    #[test]
    fn traceparent_parsing() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ok = TraceContext::parse(tp).unwrap();
        assert_eq!(ok.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ok.traceparent(), tp);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad}");
        }
        let root = TraceContext {
            trace_id: rand::random::<u128>() | 1,
            span_id: rand::random::<u64>() | 1,
            flags: 1,
        };
        assert_eq!(TraceContext::parse(&root.traceparent()), Some(root));
    }

    #[test]
    fn limits_name_the_field() {
        let limits = Limits::default();
        let now = Instant::now();
        let mut op = Operation::new("", Json::null());
        assert!(matches!(
            limits.check(&op, now),
            Err(SubmitError::Invalid { field: "type", .. })
        ));
        op.op_type = "a".repeat(129).into();
        assert!(matches!(
            limits.check(&op, now),
            Err(SubmitError::Invalid { field: "type", .. })
        ));
        op.op_type = "bad type".into();
        assert!(matches!(
            limits.check(&op, now),
            Err(SubmitError::Invalid { field: "type", .. })
        ));
        op.op_type = "echo".into();
        assert!(limits.check(&op, now).is_ok());
        op.payload = Json::encode(&"x".repeat(2 << 20)).unwrap();
        assert!(matches!(
            limits.check(&op, now),
            Err(SubmitError::PayloadTooLarge { .. })
        ));
        op.payload = Json::null();
        op.idempotency_key = Some(String::new());
        assert!(matches!(
            limits.check(&op, now),
            Err(SubmitError::Invalid {
                field: "idempotency_key",
                ..
            })
        ));
        op.idempotency_key = None;
        for i in 0..33 {
            op.metadata.insert(format!("k{i}"), "v".into());
        }
        assert!(matches!(
            limits.check(&op, now),
            Err(SubmitError::Invalid {
                field: "metadata",
                ..
            })
        ));
        op.metadata.clear();
        op.deadline = Some(now);
        assert_eq!(limits.check(&op, now), Err(SubmitError::DeadlineInPast));
    }
}
