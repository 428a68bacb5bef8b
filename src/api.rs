//! The HTTP api (actix-web): turns requests into operations for the [`Node`] and answers
//! in the shapes other tools code against (see DESIGN.md, "What a user sees").
//!
//! Every handler validates its input and answers bad input with
//! `{"error": "<code>", "message": "<names the field>"}` and the right status; nothing a
//! client sends can panic the node. Every answer about an operation carries its id, in
//! the body and in the `x-opmesh-op-id` header, and its trace context in `traceparent`.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer, ResponseError};
use futures::StreamExt;
use opmesh_actors::{
    Json, Node, OpId, OpOutcome, OpStatus, Operation, Route, RouteError, Strategy, SubmitError,
    Ticket, TraceContext,
};
use opmesh_cluster::Cluster;

use crate::dashboard::{self, Dashboard};
use crate::events_api::{self, Live};
use crate::telemetry::Telemetry;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{OpenApi, ToSchema};

/// How the HTTP server runs.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    pub addr: SocketAddr,
    pub workers: usize,
    /// Largest request body accepted (a batch included).
    pub max_body_bytes: usize,
    pub keep_alive: Duration,
    /// How long in-flight operations get to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// The trace pipeline's counters and the dashboard's Jaeger link.
    pub telemetry: Telemetry,
}

/// Most operations one batch request may carry.
pub const MAX_BATCH: usize = 100_000;

const OP_ID_HEADER: &str = "x-opmesh-op-id";

// ---------------------------------------------------------------------------------------
// Shapes

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
    fn from_outcome(o: &OpOutcome) -> Self {
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

    fn queued(id: OpId, trace_id: Option<String>) -> Self {
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

/// A refused request: a machine-readable code and a message naming what was wrong.
#[derive(Serialize, ToSchema, Debug)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
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
struct TypedBatch {
    ops: Vec<OpRequest>,
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
    fn of(r: &Route) -> Self {
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

// ---------------------------------------------------------------------------------------
// Errors

/// Every way a request is refused, with its status and code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<Duration>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    fn body(&self) -> ErrorBody {
        ErrorBody {
            error: self.code.to_owned(),
            message: self.message.clone(),
        }
    }

    fn from_json(e: serde_path_to_error::Error<serde_json::Error>, what: &str) -> Self {
        use serde_json::error::Category;
        let path = e.path().to_string();
        let e = e.into_inner();
        let what = if path.is_empty() || path == "." {
            what.to_owned()
        } else {
            format!("{what}: field `{path}`")
        };
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_json",
                format!("{what} is not valid JSON: {e}"),
            ),
            Category::Data => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_field",
                format!("{what}: {e}"),
            ),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }
    fn error_response(&self) -> HttpResponse {
        let mut r = HttpResponse::build(self.status);
        if let Some(d) = self.retry_after {
            r.insert_header((header::RETRY_AFTER, d.as_secs().max(1).to_string()));
        }
        r.json(self.body())
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        let msg = e.to_string();
        match e {
            SubmitError::Invalid { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", msg)
            }
            SubmitError::PayloadTooLarge { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("field `payload`: {msg}"),
            ),
            SubmitError::DeadlineInPast => ApiError::new(
                StatusCode::BAD_REQUEST,
                "deadline_in_past",
                "field `deadline_ms`: the deadline has already passed",
            ),
            SubmitError::NoRoute { .. } => ApiError::new(StatusCode::NOT_FOUND, "no_route", msg),
            SubmitError::Overloaded { retry_after, .. } => ApiError {
                retry_after: Some(retry_after),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", msg)
            },
            SubmitError::ShuttingDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", msg)
            }
        }
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        let msg = e.to_string();
        match e {
            RouteError::Invalid { .. } => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", msg)
            }
            RouteError::UnknownNode(_) => {
                ApiError::new(StatusCode::BAD_REQUEST, "unknown_node", msg)
            }
            RouteError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", msg),
            RouteError::Unavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", msg)
            }
            RouteError::NoQuorum { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_quorum", msg)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Request → operation

/// Parses JSON, naming the field at fault in the error.
fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = serde_path_to_error::deserialize(&mut de).map_err(|e| ApiError::from_json(e, what))?;
    de.end().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("{what} is not valid JSON: {e}"),
        )
    })?;
    Ok(v)
}

struct AppState {
    node: Node,
    cluster: Option<Cluster>,
    max_body_bytes: usize,
    shutdown_grace: Duration,
    /// Fired when the node has left its cluster (`POST /v1/cluster/leave`): the process
    /// then shuts down.
    left: Arc<tokio::sync::Notify>,
    telemetry: Telemetry,
}

async fn read_body(mut body: web::Payload, limit: usize) -> Result<web::Bytes, ApiError> {
    let mut buf = web::BytesMut::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("reading the request body: {e}"),
            )
        })?;
        if buf.len() + chunk.len() > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body is over the limit of {limit} bytes (http.max_body_bytes)"),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// The caller's trace context: the parent of the operation's `op.submit` span. A
/// malformed `traceparent` is ignored (the operation starts a new trace) and counted.
fn trace_parent(req: &HttpRequest, telemetry: &Telemetry) -> Option<TraceContext> {
    let v = req.headers().get("traceparent")?;
    let parsed = v.to_str().ok().and_then(TraceContext::parse);
    if parsed.is_none() {
        telemetry.note_invalid_traceparent();
    }
    parsed
}

fn metadata_value(k: &str, v: serde_json::Value) -> Result<String, ApiError> {
    match v {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        serde_json::Value::Bool(b) => Ok(b.to_string()),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            format!("field `metadata.{k}` must be a string, number or boolean"),
        )),
    }
}

/// Builds an [`Operation`] from a request; checks that need no node state happen here,
/// the rest (sizes, type name, handler) in `Node::enqueue`.
fn to_operation(
    r: OpRequest,
    parent: Option<TraceContext>,
    now: Instant,
) -> Result<Operation, ApiError> {
    let payload = match r.payload {
        Some(raw) => Json::from_trusted(web::Bytes::from(String::from(Box::<str>::from(raw)))),
        None => Json::null(),
    };
    let mut op = Operation::new(r.op_type, payload);
    op.trace_context = parent;
    op.key = r.key;
    op.idempotency_key = r.idempotency_key;
    op.priority = r.priority.unwrap_or(0);
    if let Some(ms) = r.deadline_ms {
        if ms <= 0 {
            return Err(SubmitError::DeadlineInPast.into());
        }
        op.deadline = Some(now + Duration::from_millis(ms as u64));
    }
    if let Some(meta) = r.metadata {
        for (k, v) in meta {
            let v = metadata_value(&k, v)?;
            op.metadata.insert(k, v);
        }
    }
    Ok(op)
}

fn with_op_headers(mut r: HttpResponse, id: &str, trace: Option<&TraceContext>) -> HttpResponse {
    if let Ok(v) = HeaderValue::from_str(id) {
        r.headers_mut()
            .insert(header::HeaderName::from_static(OP_ID_HEADER), v);
    }
    if let Some(t) = trace {
        if let Ok(v) = HeaderValue::from_str(&t.traceparent()) {
            r.headers_mut()
                .insert(header::HeaderName::from_static("traceparent"), v);
        }
    }
    r
}

// ---------------------------------------------------------------------------------------
// Handlers

/// Submit one operation.
#[utoipa::path(post, path = "/v1/ops", request_body = OpRequest,
    params(("wait" = Option<bool>, Query, description = "answer with the result when it is done")),
    responses(
        (status = 202, description = "accepted", body = OpAnswer),
        (status = 200, description = "finished (with ?wait=true)", body = OpAnswer),
        (status = 400, body = ErrorBody), (status = 404, description = "unknown type", body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn submit(
    st: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<WaitQuery>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let bytes = read_body(body, st.max_body_bytes).await?;
    let r: OpRequest = parse(&bytes, "request body")?;
    let parent = trace_parent(&req, &st.telemetry);
    let op = to_operation(r, parent, Instant::now())?;
    let ticket = st.node.enqueue_tracked(op)?;
    let id = ticket.id.to_string();
    let trace = ticket.trace;
    let resp = if q.wait {
        let outcome = ticket.await;
        HttpResponse::Ok().json(OpAnswer::from_outcome(&outcome))
    } else {
        HttpResponse::Accepted().json(OpAnswer::queued(ticket.id, trace.map(|t| t.trace_id_hex())))
    };
    Ok(with_op_headers(resp, &id, trace.as_ref()))
}

/// Submit many operations; answers are in the same order.
#[utoipa::path(post, path = "/v1/ops/batch", request_body = BatchRequest,
    params(("wait" = Option<bool>, Query, description = "answer with the results when all are done")),
    responses((status = 200, body = BatchAnswer), (status = 202, body = BatchAnswer),
        (status = 400, body = ErrorBody), (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn submit_batch(
    st: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<WaitQuery>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let bytes = read_body(body, st.max_body_bytes).await?;
    if !st.node.is_accepting() {
        return Err(SubmitError::ShuttingDown.into());
    }
    let parent = trace_parent(&req, &st.telemetry);
    let now = Instant::now();
    // Each entry keeps its place: the index of its operation, or why it was refused.
    let mut slots: Vec<Result<usize, ErrorBody>> = Vec::new();
    let mut ops = Vec::new();
    let mut add = |parsed: Result<Operation, ApiError>| match parsed {
        Ok(op) => {
            slots.push(Ok(ops.len()));
            ops.push(op);
        }
        Err(e) => slots.push(Err(e.body())),
    };
    // Fast path: every entry is well formed, parsed in one pass. Otherwise parse entry by
    // entry so each refusal names its own field.
    if let Ok(b) = serde_json::from_slice::<TypedBatch>(&bytes) {
        check_batch_len(b.ops.len())?;
        for r in b.ops {
            add(to_operation(r, parent, now));
        }
    } else {
        let b: BatchRequest = parse(&bytes, "request body")?;
        check_batch_len(b.ops.len())?;
        for (i, raw) in b.ops.iter().enumerate() {
            add(
                parse::<OpRequest>(raw.get().as_bytes(), &format!("ops[{i}]"))
                    .and_then(|r| to_operation(r, parent, now)),
            );
        }
    }
    // A waited batch gets its results in the answer; only a batch that does not wait is
    // kept for `GET /v1/ops/{id}` (tracking costs about a tenth of a batch's time).
    let mut tickets: Vec<Option<Result<Ticket, SubmitError>>> = st
        .node
        .enqueue_batch(ops, !q.wait)
        .into_iter()
        .map(Some)
        .collect();
    let mut results = Vec::with_capacity(slots.len());
    let mut pending: Vec<(usize, Ticket)> = Vec::new();
    for (pos, slot) in slots.into_iter().enumerate() {
        results.push(match slot {
            Err(body) => BatchItem::Refused(body),
            Ok(i) => match tickets[i].take().expect("each ticket is used once") {
                Err(e) => BatchItem::Refused(ApiError::from(e).body()),
                Ok(t) => {
                    let queued = OpAnswer::queued(t.id, t.trace.map(|c| c.trace_id_hex()));
                    if q.wait {
                        pending.push((pos, t));
                    }
                    BatchItem::Answer(queued)
                }
            },
        });
    }
    for (pos, t) in pending {
        results[pos] = BatchItem::Answer(OpAnswer::from_outcome(&t.await));
    }
    let status = if q.wait {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok(HttpResponse::build(status).json(BatchAnswer { results }))
}

fn check_batch_len(n: usize) -> Result<(), ApiError> {
    if n > MAX_BATCH {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("field `ops` has {n} operations, over the limit of {MAX_BATCH}"),
        ));
    }
    Ok(())
}

/// The status of an operation, and its result once it finished.
#[utoipa::path(get, path = "/v1/ops/{id}", params(("id" = String, Path, description = "operation id")),
    responses((status = 200, body = OpAnswer), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_op(st: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    let op_id: OpId = id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            format!("`{id}` is not an operation id (a UUID)"),
        )
    })?;
    let t = st.node.status(&op_id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no operation `{op_id}` (unknown, or finished longer ago than the retention period)"),
        )
    })?;
    let mut answer = match t.outcome() {
        Some(o) => OpAnswer::from_outcome(o),
        None => OpAnswer {
            status: t.status().as_str(),
            ..OpAnswer::queued(op_id, t.trace_id.map(|id| format!("{id:032x}")))
        },
    };
    answer.op_type = Some(t.op_type.to_string());
    Ok(with_op_headers(
        HttpResponse::Ok().json(answer),
        &op_id.to_string(),
        None,
    ))
}

/// The routing table.
#[utoipa::path(get, path = "/v1/routes", responses((status = 200, body = RoutesAnswer)))]
async fn list_routes(st: web::Data<AppState>) -> HttpResponse {
    let t = st.node.routes();
    HttpResponse::Ok().json(RoutesAnswer {
        routes: t
            .routes
            .iter()
            .map(|(k, r)| (k.to_string(), RouteView::of(r)))
            .collect(),
        version: t.version,
    })
}

/// The route of one type.
#[utoipa::path(get, path = "/v1/routes/{type}", params(("type" = String, Path)),
    responses((status = 200, body = RouteAnswer), (status = 404, body = ErrorBody)))]
async fn get_route(
    st: web::Data<AppState>,
    ty: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let t = st.node.routes();
    let r = t
        .routes
        .get(ty.as_str())
        .ok_or_else(|| ApiError::from(RouteError::NotFound(ty.to_string())))?;
    Ok(HttpResponse::Ok().json(RouteAnswer {
        op_type: ty.to_string(),
        route: RouteView::of(r),
        version: t.version,
    }))
}

/// Sets the route of one type.
#[utoipa::path(put, path = "/v1/routes/{type}", params(("type" = String, Path)), request_body = RouteRequest,
    responses((status = 200, body = RouteAnswer), (status = 400, body = ErrorBody)))]
async fn put_route(
    st: web::Data<AppState>,
    ty: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let bytes = read_body(body, st.max_body_bytes).await?;
    let r: RouteRequest = parse(&bytes, "request body")?;
    let strategy = Strategy::parse(&r.strategy).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            format!(
                "field `strategy` is `{}`; allowed: round_robin, least_loaded, consistent_hash, pinned",
                r.strategy
            ),
        )
    })?;
    let route = Route {
        strategy,
        nodes: r
            .nodes
            .unwrap_or_default()
            .into_iter()
            .map(Into::into)
            .collect(),
    };
    let version = st.node.set_route(&ty, route.clone()).await?;
    Ok(HttpResponse::Ok().json(RouteAnswer {
        op_type: ty.to_string(),
        route: RouteView::of(&route),
        version,
    }))
}

/// Removes the route of one type (it goes back to every node that serves it).
#[utoipa::path(delete, path = "/v1/routes/{type}", params(("type" = String, Path)),
    responses((status = 200, description = "removed; answers the new version"), (status = 404, body = ErrorBody)))]
async fn delete_route(
    st: web::Data<AppState>,
    ty: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let version = st.node.remove_route(&ty).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "type": ty.as_str(), "version": version })))
}

/// Node health and headline figures.
#[utoipa::path(get, path = "/v1/health", responses((status = 200, description = "node health")))]
async fn health(st: web::Data<AppState>) -> HttpResponse {
    let s = st.node.stats();
    HttpResponse::Ok().json(serde_json::json!({
        "status": if s.is_accepting { "ok" } else { "draining" },
        "nodeId": s.node_id,
        "isRunning": s.is_running,
        "isAccepting": s.is_accepting,
        "activeOperations": s.active_operations,
        "queuedOperations": s.queued_operations,
        "completedOperations": s.completed_operations,
        "totalProcessed": s.total_processed,
        "cacheStats": s.cache_stats,
        "handlers": st.node.handler_types(),
        "uptimeSeconds": s.uptime_seconds,
        "timestamp": s.timestamp,
    }))
}

/// Node metrics as JSON.
#[utoipa::path(get, path = "/v1/metrics", responses((status = 200, description = "node metrics")))]
async fn metrics(st: web::Data<AppState>) -> HttpResponse {
    #[derive(Serialize)]
    struct Answer {
        #[serde(flatten)]
        node: opmesh_actors::NodeStats,
        /// The trace pipeline: spans exported and dropped, malformed `traceparent`s.
        telemetry: crate::telemetry::TelemetryStats,
    }
    HttpResponse::Ok().json(Answer {
        node: st.node.stats(),
        telemetry: st.telemetry.stats(),
    })
}

/// Node metrics in the Prometheus / OpenMetrics text format (see `observability/`).
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "OpenMetrics text")))]
async fn prometheus_metrics(st: web::Data<AppState>) -> HttpResponse {
    let body = crate::metrics::render(&st.node, st.cluster.as_ref(), &st.telemetry).await;
    HttpResponse::Ok()
        .content_type(crate::metrics::CONTENT_TYPE)
        .body(body)
}

/// Liveness: the process serves requests.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "alive")))]
async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: the node accepts operations (503 while draining).
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "ready"), (status = 503, description = "draining")))]
async fn readyz(st: web::Data<AppState>) -> HttpResponse {
    if !st.node.is_accepting() {
        HttpResponse::ServiceUnavailable().json(serde_json::json!({ "status": "draining" }))
    } else if st.cluster.as_ref().is_some_and(|c| !c.is_ready()) {
        HttpResponse::ServiceUnavailable().json(serde_json::json!({ "status": "joining" }))
    } else {
        HttpResponse::Ok().json(serde_json::json!({ "status": "ready" }))
    }
}

/// The cluster as this node sees it: nodes, roles, the leader, term, last applied index,
/// links and per-node load. A node without a cluster port shows itself alone.
#[utoipa::path(get, path = "/v1/cluster", responses((status = 200, description = "cluster status")))]
async fn cluster_status(st: web::Data<AppState>) -> HttpResponse {
    match &st.cluster {
        Some(c) => HttpResponse::Ok().json(c.status()),
        None => {
            let s = st.node.stats();
            HttpResponse::Ok().json(serde_json::json!({
                "cluster_id": null,
                "node": s.node_id,
                "leader": s.node_id,
                "term": 0,
                "last_applied_index": null,
                "version": st.node.routes().version,
                "raft_state": "single",
                "nodes": [{
                    "id": s.node_id,
                    "http_addr": null,
                    "cluster_addr": null,
                    "status": if s.is_accepting { "up" } else { "leaving" },
                    "role": "voter",
                    "serves": st.node.handler_types(),
                    "load": s.in_flight_operations,
                    "link": "self",
                }],
                "forwarded_waiting": 0,
                "links": [],
            }))
        }
    }
}

fn no_cluster() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "not_clustered",
        "this node runs alone (no cluster.addr / --cluster-addr)",
    )
}

/// Hands off and leaves the cluster: routes move away from this node, its operations
/// finish (up to the shutdown grace period), it leaves the registry and the Raft group,
/// and then the process shuts down.
#[utoipa::path(post, path = "/v1/cluster/leave", responses((status = 200, description = "left; the node shuts down"), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn cluster_leave(st: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let c = st.cluster.as_ref().ok_or_else(no_cluster)?;
    c.leave(st.shutdown_grace).await.map_err(|m| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "leave_failed",
            m.to_string(),
        )
    })?;
    st.left.notify_one();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "node": c.name(), "left": true })))
}

/// Where to join.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct JoinRequest {
    /// A cluster address of any member (host:port).
    seed: String,
}

/// Joins this node to the cluster a seed belongs to. Only a node that belongs to no
/// cluster yet (started with `--join` and still waiting) can; a node that bootstrapped
/// its own cluster holds a log that cannot merge into another one.
#[utoipa::path(post, path = "/v1/cluster/join", request_body = JoinRequest, responses((status = 200, description = "joined"), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn cluster_join(st: web::Data<AppState>, body: web::Bytes) -> Result<HttpResponse, ApiError> {
    let c = st.cluster.as_ref().ok_or_else(no_cluster)?;
    let req: JoinRequest = parse(&body, "join request")?;
    c.join(&req.seed).await.map_err(|e| match e {
        opmesh_cluster::JoinError::AlreadyMember { .. } => {
            ApiError::new(StatusCode::CONFLICT, "already_member", e.to_string())
        }
        opmesh_cluster::JoinError::Failed { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "join_failed",
            e.to_string(),
        ),
    })?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "node": c.name(), "joined": req.seed })))
}

/// A plain route that does no work, to compare the engine's cost with actix-web's own.
#[utoipa::path(post, path = "/v1/bench/hello", responses((status = 200, description = "hello")))]
async fn hello(st: web::Data<AppState>, body: web::Payload) -> Result<HttpResponse, ApiError> {
    // The body is read, as the real routes do: an unread body makes actix close the
    // connection after the answer, and the baseline would measure reconnects.
    read_body(body, st.max_body_bytes).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "hello": "world" })))
}

async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    let status = StatusCode::NOT_FOUND;
    HttpResponse::build(status).json(ErrorBody {
        error: "not_found".into(),
        message: format!("no endpoint {} {}", req.method(), req.path()),
    })
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "opmesh",
        description = "Run operations across an opmesh cluster."
    ),
    paths(
        submit,
        submit_batch,
        get_op,
        list_routes,
        get_route,
        put_route,
        delete_route,
        health,
        metrics,
        prometheus_metrics,
        healthz,
        readyz,
        cluster_status,
        cluster_leave,
        cluster_join,
        hello,
        crate::events_api::events,
        crate::events_api::failures,
        crate::dashboard::config
    ),
    components(schemas(
        OpRequest,
        BatchRequest,
        OpAnswer,
        BatchAnswer,
        ErrorBody,
        RouteRequest,
        RouteView,
        RoutesAnswer,
        RouteAnswer,
        JoinRequest,
        crate::events_api::Failure,
        crate::events_api::FailuresAnswer,
        crate::dashboard::DashboardConfig
    ))
)]
pub struct ApiDoc;

/// The OpenAPI document of this api.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// Adds opmesh's routes to an actix-web service config.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/ops", web::post().to(submit))
        .route("/v1/ops/batch", web::post().to(submit_batch))
        .route("/v1/ops/{id}", web::get().to(get_op))
        .route("/v1/routes", web::get().to(list_routes))
        .route("/v1/routes/{type}", web::get().to(get_route))
        .route("/v1/routes/{type}", web::put().to(put_route))
        .route("/v1/routes/{type}", web::delete().to(delete_route))
        .route("/v1/health", web::get().to(health))
        .route("/v1/metrics", web::get().to(metrics))
        .route("/metrics", web::get().to(prometheus_metrics))
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/v1/cluster", web::get().to(cluster_status))
        .route("/v1/cluster/leave", web::post().to(cluster_leave))
        .route("/v1/cluster/join", web::post().to(cluster_join))
        .route("/v1/bench/hello", web::post().to(hello))
        .route("/openapi.json", web::get().to(openapi_json))
        .route("/v1/events", web::get().to(events_api::events))
        .route("/v1/failures", web::get().to(events_api::failures))
        .route("/v1/dashboard/config", web::get().to(dashboard::config))
        .route("/", web::get().to(dashboard::index))
        .route("/dashboard/app.js", web::get().to(dashboard::app_js))
        .route("/dashboard/style.css", web::get().to(dashboard::style_css));
}

fn query_error(e: actix_web::error::QueryPayloadError, _: &HttpRequest) -> actix_web::Error {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_field",
        format!("query string: {e}"),
    )
    .into()
}

fn path_error(e: actix_web::error::PathError, _: &HttpRequest) -> actix_web::Error {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_field",
        format!("path: {e}"),
    )
    .into()
}

/// A bound, running HTTP server.
pub struct Server {
    pub addr: SocketAddr,
    cluster: Option<Cluster>,
    left: Arc<tokio::sync::Notify>,
    handle: actix_web::dev::ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The event streams and their background tasks.
    live: Live,
}

/// Binds the api for `node` and starts serving. The caller decides when to stop (see
/// [`run_until`]).
pub fn start(
    node: Node,
    cluster: Option<Cluster>,
    listener: std::net::TcpListener,
    settings: &ApiSettings,
) -> std::io::Result<Server> {
    let left = Arc::new(tokio::sync::Notify::new());
    let state = web::Data::new(AppState {
        node,
        cluster: cluster.clone(),
        max_body_bytes: settings.max_body_bytes,
        shutdown_grace: settings.shutdown_grace,
        left: left.clone(),
        telemetry: settings.telemetry.clone(),
    });
    let live = web::Data::new(Live::start(state.node.clone(), cluster.clone()));
    let dashboard = web::Data::new(Dashboard {
        node: state.node.id().to_string(),
        telemetry: settings.telemetry.clone(),
    });
    let live_state = live.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(live_state.clone())
            .app_data(dashboard.clone())
            .app_data(web::QueryConfig::default().error_handler(query_error))
            .app_data(web::PathConfig::default().error_handler(path_error))
            .configure(configure)
            .default_service(web::to(not_found))
    })
    .workers(settings.workers.max(1))
    .keep_alive(settings.keep_alive)
    .disable_signals()
    .shutdown_timeout(settings.shutdown_grace.as_secs().max(1))
    .listen(listener)?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| std::io::Error::other("the server bound no address"))?;
    let server = server.run();
    let handle = server.handle();
    let task = tokio::spawn(server);
    Ok(Server {
        addr,
        handle,
        task,
        cluster,
        left,
        live: Live::clone(&live),
    })
}

/// Serves until `signal` completes, then shuts down gracefully: readiness turns false
/// and new submissions are refused (503), accepted operations get `grace` to finish, the
/// HTTP server finishes its open requests, and the engine stops. Returns how many
/// operations were still unfinished when the grace period ended (they fail with a reason).
pub async fn run_until(
    node: Node,
    server: Server,
    grace: Duration,
    signal: impl Future<Output = ()>,
) -> std::io::Result<usize> {
    let left_cluster = tokio::select! {
        _ = signal => false,
        _ = server.left.notified() => true,
    };
    if let (Some(c), false) = (&server.cluster, left_cluster) {
        // A clean exit hands this node's work off first.
        if let Err(e) = c.leave(grace).await {
            tracing::warn!("could not leave the cluster cleanly: {e}");
        }
    }
    tracing::info!(?grace, "shutting down: draining accepted operations");
    node.stop_accepting();
    let drained = node.drain(grace).await;
    if !drained {
        tracing::warn!(
            left = node.in_flight(),
            "grace period over with operations unfinished"
        );
    }
    // Event streams never finish by themselves: end them first, so the graceful stop
    // does not wait its whole timeout for them.
    server.live.shutdown();
    server.handle.stop(true).await;
    let left = node.shutdown(Duration::ZERO).await;
    if let Some(c) = &server.cluster {
        c.shutdown().await;
    }
    match server.task.await {
        Ok(r) => r?,
        Err(e) => return Err(std::io::Error::other(e)),
    }
    tracing::info!(left, "stopped");
    Ok(left)
}
