//! The shapes other tools code against: request and answer bodies of the api (see
//! DESIGN.md, "What a user sees"). Extend them, never rename a field.

use std::collections::BTreeMap;

use opmesh_actors::{Json, OpId, OpOutcome, OpStatus, Route};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use super::errors::ErrorBody;

/// An operation to run. Only `type` is required.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpRequest {
    /// The operation type, e.g. `echo`.
    #[serde(rename = "type")]
    pub op_type: String,
    /// Any JSON; handed to the handler as is.
    #[schema(value_type = Object)]
    pub payload: Option<Box<RawValue>>,
    /// Routing key (consistent hashing keeps one key on one node).
    pub key: Option<String>,
    /// Operations with the same type and idempotency key run once.
    pub idempotency_key: Option<String>,
    /// Higher runs first within its type's queue.
    pub priority: Option<i32>,
    /// Milliseconds from now after which the operation is no longer worth running.
    pub deadline_ms: Option<i64>,
    /// String-to-scalar map carried with the operation (numbers and booleans are kept as
    /// their text).
    #[schema(value_type = Object)]
    pub metadata: Option<BTreeMap<String, serde_json::Value>>,
}

/// Many operations at once.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    #[schema(value_type = Vec<OpRequest>)]
    pub ops: Vec<Box<RawValue>>,
}

/// The state or outcome of one operation.
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

impl OpAnswer {
    pub(crate) fn from_outcome(o: &OpOutcome) -> Self {
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

    pub(crate) fn queued(id: OpId, trace_id: Option<String>) -> Self {
        OpAnswer {
            id: id.to_string(),
            status: OpStatus::Queued.as_str(),
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
/// [`OpAnswer`] or, for a refused operation, an [`ErrorBody`].
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
pub(super) struct TypedBatch {
    pub(super) ops: Vec<OpRequest>,
}

/// A route as `PUT /v1/routes/{type}` takes it.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteRequest {
    /// round_robin | least_loaded | consistent_hash | pinned
    pub strategy: String,
    /// Node ids; empty or absent: every node that serves the type.
    #[serde(default)]
    pub nodes: Option<Vec<String>>,
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
