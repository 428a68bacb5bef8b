//! The shapes other tools code against: request and answer bodies of the api (see
//! DESIGN.md, "What a user sees"). Extend them, never rename a field.

use std::borrow::Cow;
use std::collections::BTreeMap;

use opmesh_actors::{Json, Route};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::errors::ErrorBody;

/// An operation to run. Only `type` is required. The limits below are the defaults of
/// `[engine]` (`max_type_len`, `max_key_bytes`, `max_payload_bytes`,
/// `max_metadata_entries`, `max_metadata_bytes`).
// Read in place from the request body: the payload (and any string without escapes) is
// borrowed from it, not copied.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpRequest<'a> {
    /// The operation type, e.g. `echo`: a type some node has a handler for.
    #[serde(rename = "type", borrow)]
    #[schema(
        value_type = String,
        min_length = 1,
        max_length = 128,
        pattern = "^[A-Za-z0-9_.:/-]+$",
        example = "echo"
    )]
    pub op_type: Cow<'a, str>,
    /// Any JSON (at most 1 MiB); handed to the handler as is.
    #[serde(borrow)]
    #[schema(value_type = Object)]
    pub payload: Option<&'a RawValue>,
    /// Routing key (consistent hashing keeps one key on one node): 1 to 512 bytes.
    #[serde(borrow)]
    #[schema(value_type = Option<String>, min_length = 1, max_length = 512)]
    pub key: Option<Cow<'a, str>>,
    /// Operations with the same type and idempotency key run once: 1 to 512 bytes. With
    /// API tokens on, a key belongs to the token that used it; used again with another
    /// payload it is refused (409 `idempotency_key_reused` with `?wait=true`, else the
    /// operation fails with that error).
    #[serde(borrow)]
    #[schema(value_type = Option<String>, min_length = 1, max_length = 512)]
    pub idempotency_key: Option<Cow<'a, str>>,
    /// Higher runs first within its type's queue.
    #[serde(default, deserialize_with = "integral")]
    pub priority: Option<i32>,
    /// Milliseconds from now after which the operation is no longer worth running: at most
    /// `engine.max_deadline_ms` (one hour by default).
    #[schema(minimum = 1, maximum = 3600000)]
    #[serde(default, deserialize_with = "integral")]
    pub deadline_ms: Option<i64>,
    /// String-to-scalar map carried with the operation (numbers and booleans are kept as
    /// their text): at most 32 entries and 8 KiB of keys and values. (Its exact schema is
    /// set in [`super::openapi`].)
    #[schema(value_type = Object)]
    pub metadata: Option<BTreeMap<String, serde_json::Value>>,
}

/// An integer field that also takes a JSON number with a zero fraction (`120.0`), as JSON
/// Schema counts it an integer; anything else (`1.5`, out of range) is refused naming the
/// field.
fn integral<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64>,
{
    use serde::de::Error;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else {
        return Ok(None);
    };
    let whole = n.as_i64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
            .map(|f| f as i64)
    });
    whole
        .and_then(|i| T::try_from(i).ok())
        .map(Some)
        .ok_or_else(|| D::Error::custom(format!("expected an integer in range, got {n}")))
}

/// Many operations at once (at most 100,000). Each entry is an operation as
/// `POST /v1/ops` takes it; the batch is accepted as a whole and an entry that is not a
/// valid operation is refused in its own place of the answer (an `ErrorBody` naming its
/// field, e.g. `ops[3]: missing field `type``), so the entries' schema is left open here.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest<'a> {
    #[serde(borrow)]
    #[schema(value_type = Vec<Object>, max_items = 100000)]
    pub ops: Vec<&'a RawValue>,
}

/// The state or outcome of one operation. The api writes it with
/// [`Answer`](super::answer::Answer) (the same bytes, without building this struct).
#[derive(Serialize, ToSchema)]
pub struct OpAnswer {
    pub id: String,
    /// queued | running | succeeded | failed | expired
    pub status: &'static str,
    #[schema(value_type = Object)]
    pub result: Option<Json>,
    pub error: Option<String>,
    pub cached: bool,
    pub executed_by: Option<String>,
    pub trace_id: Option<String>,
    /// How many times the handler ran.
    pub attempts: u32,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub op_type: Option<String>,
}

/// The reference the tests hold the api's written answers to.
#[cfg(test)]
impl OpAnswer {
    pub(crate) fn from_outcome(o: &opmesh_actors::OpOutcome) -> Self {
        OpAnswer {
            id: o.id.to_string(),
            status: o.status.as_str(),
            result: o.result.clone(),
            error: o.error.clone(),
            cached: o.cached,
            executed_by: o.executed_by.as_ref().map(|n| n.to_string()),
            trace_id: o.trace_id.map(|t| t.to_string()),
            attempts: o.attempts,
            op_type: None,
        }
    }

    pub(crate) fn queued(id: opmesh_actors::OpId, trace_id: Option<String>) -> Self {
        OpAnswer {
            id: id.to_string(),
            status: opmesh_actors::OpStatus::Queued.as_str(),
            result: None,
            error: None,
            cached: false,
            executed_by: None,
            trace_id,
            attempts: 0,
            op_type: None,
        }
    }
}

/// The answer of a batch: one entry per submitted operation, in order; an entry is an
/// [`OpAnswer`] or, for a refused operation, an [`ErrorBody`]. Written by
/// [`BatchWriter`](super::answer::BatchWriter).
#[derive(Serialize, ToSchema)]
pub struct BatchAnswer {
    #[schema(value_type = Vec<Object>)]
    pub results: Vec<BatchItem>,
}

/// One entry of a [`BatchAnswer`].
#[derive(Serialize)]
#[serde(untagged)]
pub enum BatchItem {
    Answer(OpAnswer),
    Refused(ErrorBody),
}

/// A batch whose entries all parse: the fast path.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TypedBatch<'a> {
    #[serde(borrow)]
    pub(super) ops: Vec<OpRequest<'a>>,
}

/// A route as `PUT /v1/routes/{type}` takes it.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteRequest {
    #[schema(value_type = StrategyName)]
    pub strategy: String,
    /// Node ids (each once, each a node of the cluster); empty or absent: every node that
    /// serves the type.
    #[serde(default)]
    pub nodes: Option<Vec<String>>,
}

/// How a route picks a node.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
pub enum StrategyName {
    RoundRobin,
    LeastLoaded,
    ConsistentHash,
    Pinned,
}

#[derive(Serialize, ToSchema)]
pub struct RouteView {
    pub strategy: &'static str,
    pub nodes: Vec<String>,
}

impl RouteView {
    pub(crate) fn of(r: &Route) -> Self {
        RouteView {
            strategy: r.strategy.as_str(),
            nodes: r.nodes.iter().map(|n| n.to_string()).collect(),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct RoutesAnswer {
    pub routes: BTreeMap<String, RouteView>,
    pub version: u64,
}

#[derive(Serialize, ToSchema)]
pub struct RouteAnswer {
    #[serde(rename = "type")]
    pub op_type: String,
    pub route: RouteView,
    pub version: u64,
}

#[derive(Deserialize)]
pub struct WaitQuery {
    #[serde(default)]
    pub wait: bool,
}
