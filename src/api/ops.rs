//! Operations: `POST /v1/ops`, `POST /v1/ops/batch` and `GET /v1/ops/{id}`. A request
//! becomes an [`Operation`] here (checks that need no node state; the rest — sizes, type
//! name, handler — happen in `Node::enqueue`); every answer about an operation carries
//! its id in the body and in the `x-opmesh-op-id` header, and its trace context in
//! `traceparent`. With the journal on (`engine.journal`), an operation answered 202 (a
//! submission or batch without `?wait=true`) is answered only once the journal holds it
//! (503 `journal_write_failed` when it cannot); waited submissions are not journaled.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use opmesh_actors::cache::KEY_REUSED;
use opmesh_actors::{Json, OpId, OpOutcome, Operation, SubmitError, TraceContext, TypeNames};

use super::answer::{Answer, BatchWriter};
use super::auth::Caller;
use super::errors::{parse, read_body, ApiError, ErrorBody};
use super::model::{BatchAnswer, BatchRequest, OpAnswer, OpRequest, TypedBatch, WaitQuery};
use super::AppState;
use crate::journal::Receipt;
use crate::telemetry::Telemetry;

const OP_ID_HEADER: &str = "x-opmesh-op-id";

/// The OpenAPI description of the client header.
const CLIENT_DOC: &str = "who the client is for `limits.client_rate_per_sec` when the api \
    has no tokens (with tokens, the token's name): 1 to 64 characters from A-Z a-z 0-9 _ . - @; \
    without it, the client's IP address";
/// The OpenAPI description of a 429.
const TOO_MANY_DOC: &str = "over a rate limit (`rate_limited`: `limits.rate_per_sec`, the \
    client's `limits.client_rate_per_sec`, or the type's `types.<type>.rate_per_sec`; the \
    message names which), or overloaded (`overloaded`: the type's queue is full, \
    `limits.max_in_flight`, or the node the operation would go to is over `flow.high` for \
    the type, or this node's link to it is, naming it); retry after `Retry-After` seconds";

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
/// the rest (sizes, type name, handler) in `Node::enqueue`. With `body` (the request body
/// `r` was read from) the payload is a slice of it, not a copy: for requests that wait
/// for their answers. One answered at once copies: its operations may outlive the request
/// by much, and a body can share its buffer with others the connection read.
fn to_operation(
    r: OpRequest<'_>,
    body: Option<&web::Bytes>,
    parent: Option<TraceContext>,
    caller: &Caller,
    now: Instant,
    types: &mut TypeNames,
) -> Result<Operation, ApiError> {
    let payload = match r.payload {
        Some(raw) => Json::from_trusted(shared_or_copied(body, raw.get().as_bytes())),
        None => Json::null(),
    };
    let mut op = Operation::new(types.name(&r.op_type), payload);
    op.trace_context = parent;
    op.key = r.key.map(Cow::into_owned);
    op.idempotency_key = r.idempotency_key.map(Cow::into_owned);
    op.owner = caller.name.clone();
    op.priority = r.priority.unwrap_or(0);
    if let Some(ms) = r.deadline_ms {
        if ms <= 0 {
            return Err(ApiError::deadline_in_past());
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

/// `part` as bytes that share `body`'s buffer when it lies inside it, else a copy.
fn shared_or_copied(body: Option<&web::Bytes>, part: &[u8]) -> web::Bytes {
    let inside = |b: &&web::Bytes| {
        let (start, at) = (b.as_ptr() as usize, part.as_ptr() as usize);
        at >= start && at + part.len() <= start + b.len()
    };
    match body.filter(inside) {
        Some(b) => b.slice_ref(part),
        None => web::Bytes::copy_from_slice(part),
    }
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

/// An operation refused because its idempotency key was used before with another
/// payload (the Cache decides it where the key's results are kept).
fn key_reused(o: &OpOutcome) -> Option<ApiError> {
    (o.error.as_deref() == Some(KEY_REUSED)).then(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_key_reused",
            "field `idempotency_key`: this key was used with a different payload; use a new \
             key for a new operation",
        )
    })
}

/// Refuses operations on a node of a cluster that has no routing table yet (started with
/// `--join` and not admitted, or bootstrapping): it could only accept them and fail each
/// for want of a node.
fn check_joined(st: &AppState) -> Result<(), ApiError> {
    if st.cluster.is_some() && st.node.routes().nodes.is_empty() {
        return Err(ApiError::joining());
    }
    Ok(())
}

/// Submit one operation.
#[utoipa::path(post, path = "/v1/ops", request_body = OpRequest,
    params(("wait" = Option<bool>, Query, description = "answer with the result when it is done"),
        ("x-opmesh-client" = Option<String>, Header, description = CLIENT_DOC)),
    responses(
        (status = 202, description = "accepted", body = OpAnswer),
        (status = 200, description = "finished (with ?wait=true)", body = OpAnswer),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, description = "unknown type (`no_route`)", body = ErrorBody),
        (status = 409, description = "idempotency key used with another payload (with ?wait=true)", body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 429, description = TOO_MANY_DOC, body = ErrorBody,
            headers(("Retry-After" = u64, description = "seconds to wait before trying again"))),
        (status = 503, description = "the type's circuit breaker is open here, or on every node that could take it (`circuit_open`, naming the type, the node, and when it lets operations through again, also in `Retry-After`), the node is shutting down (`shutting_down`), the node has not joined its cluster yet (`joining`, also with `Retry-After`), or the journal could not write it (`journal_write_failed`: nothing was started)",
            headers(("Retry-After" = u64, description = "seconds to wait before trying again (`circuit_open`, `joining`)")), body = ErrorBody),
        (status = 504, description = "`deadline_ms` ran out before the node admitted the operation (`deadline_exceeded`): nothing was started", body = ErrorBody)))]
pub(super) async fn submit(
    st: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<WaitQuery>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    check_joined(&st)?;
    let caller = Caller::of(&req);
    st.admission.check(&req, &caller, 1, &st.node)?;
    let bytes = read_body(body, st.max_body_bytes).await?;
    let r: OpRequest<'_> = parse(&bytes, "request body")?;
    let parent = trace_parent(&req, &st.telemetry);
    let share = q.wait.then_some(&bytes);
    let op = to_operation(
        r,
        share,
        parent,
        &caller,
        Instant::now(),
        &mut TypeNames::default(),
    )?;
    if let (false, Some(journal)) = (q.wait, &st.journal) {
        // Answered 202 only once the journal holds it.
        let receipt = journal.accept_one(op).await??;
        let id = receipt.id.to_string();
        let resp = Answer::queued(receipt.id, receipt.trace.map(|t| t.trace_id))
            .respond(StatusCode::ACCEPTED);
        return Ok(with_op_headers(resp, &id, receipt.trace.as_ref()));
    }
    let ticket = st.node.enqueue_tracked(op)?;
    let id = ticket.id.to_string();
    let trace = ticket.trace;
    let resp = if q.wait {
        let outcome = ticket.await;
        if let Some(e) = key_reused(&outcome) {
            return Err(e);
        }
        Answer::outcome(&outcome).respond(StatusCode::OK)
    } else {
        Answer::queued(ticket.id, trace.map(|t| t.trace_id)).respond(StatusCode::ACCEPTED)
    };
    Ok(with_op_headers(resp, &id, trace.as_ref()))
}

/// Submit many operations; answers are in the same order. The api's limits count a batch
/// as its number of operations.
#[utoipa::path(post, path = "/v1/ops/batch", request_body = BatchRequest,
    params(("wait" = Option<bool>, Query, description = "answer with the results when all are done"),
        ("x-opmesh-client" = Option<String>, Header, description = CLIENT_DOC)),
    responses((status = 200, description = "finished (with ?wait=true); an operation refused on its own has an error body in its place (`overloaded`, `rate_limited`, `circuit_open`, ...)", body = BatchAnswer),
        (status = 202, description = "accepted; an operation refused on its own has an error body in its place (`overloaded`, `rate_limited`, `circuit_open`, ...)", body = BatchAnswer),
        (status = 400, body = ErrorBody),
        (status = 413, description = "more operations than `http.max_batch_ops`, a rate limit's burst or `limits.max_in_flight` allow at once (`batch_too_large`): it can never pass", body = ErrorBody),
        (status = 429, description = TOO_MANY_DOC, body = ErrorBody,
            headers(("Retry-After" = u64, description = "seconds to wait before trying again"))),
        (status = 503, description = "draining (shutting_down), not joined its cluster yet (joining, with Retry-After), or the journal could not write the batch (journal_write_failed: none was started)",
            headers(("Retry-After" = u64, description = "seconds to wait before trying again (`joining`)")), body = ErrorBody)))]
pub(super) async fn submit_batch(
    st: web::Data<AppState>,
    req: HttpRequest,
    q: web::Query<WaitQuery>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let bytes = read_body(body, st.max_body_bytes).await?;
    if !st.node.is_accepting() {
        return Err(SubmitError::ShuttingDown.into());
    }
    check_joined(&st)?;
    let parent = trace_parent(&req, &st.telemetry);
    let caller = Caller::of(&req);
    let now = Instant::now();
    let share = q.wait.then_some(&bytes);
    let mut entries = Entries::default();
    let mut types = TypeNames::default();
    // Fast path: the body is text (checked once, so the parser does not check each string
    // again) and every entry is well formed, parsed in one pass. Otherwise parse entry by
    // entry so each refusal names its own field.
    let typed = std::str::from_utf8(&bytes)
        .ok()
        .and_then(|text| serde_json::from_str::<TypedBatch>(text).ok());
    let mut ops = Vec::new();
    let (accepted, outcomes) = match typed {
        Some(b) => {
            let n = b.ops.len();
            check_batch_len(n, st.max_batch_ops)?;
            st.admission.check(&req, &caller, n, &st.node)?;
            entries.slots.reserve_exact(n);
            let parsed = b.ops.into_iter().filter_map(|r| {
                entries.place(to_operation(r, share, parent, &caller, now, &mut types))
            });
            if q.wait {
                // Each operation goes from its entry straight to the door, not first into
                // a list of its own.
                st.node.enqueue_batch_waited(parsed)
            } else {
                ops.reserve_exact(n);
                ops.extend(parsed);
                return submit_unwaited(&st, entries, ops).await;
            }
        }
        None => {
            let b: BatchRequest = parse(&bytes, "request body")?;
            check_batch_len(b.ops.len(), st.max_batch_ops)?;
            st.admission.check(&req, &caller, b.ops.len(), &st.node)?;
            entries.slots.reserve_exact(b.ops.len());
            ops.reserve_exact(b.ops.len());
            for (i, raw) in b.ops.iter().enumerate() {
                let parsed = parse::<OpRequest<'_>>(raw.get().as_bytes(), &format!("ops[{i}]"))
                    .and_then(|r| to_operation(r, share, parent, &caller, now, &mut types));
                ops.extend(entries.place(parsed));
            }
            if !q.wait {
                return submit_unwaited(&st, entries, ops).await;
            }
            st.node.enqueue_batch_waited(ops)
        }
    };
    // A waited batch gets its results in the answer, and is not tracked for
    // `GET /v1/ops/{id}` (tracking costs about a tenth of a batch's time).
    let Entries { slots, .. } = entries;
    let mut outcomes = outcomes.await;
    let mut answer = BatchWriter::new(slots.len());
    for slot in slots {
        match slot {
            Err(body) => answer.refused(&body),
            Ok(i) => match &accepted[i] {
                Err(e) => answer.refused(&ApiError::from(e.clone()).body()),
                Ok(()) => {
                    let outcome = outcomes[i]
                        .take()
                        .expect("every accepted operation has its outcome");
                    match key_reused(&outcome) {
                        Some(e) => answer.refused(&e.body()),
                        None => answer.answer(&Answer::outcome(&outcome)),
                    }
                }
            },
        }
    }
    Ok(answer.respond(StatusCode::OK))
}

/// Starts a batch whose caller does not wait: kept for `GET /v1/ops/{id}`; with the
/// journal on, answered once it holds them.
async fn submit_unwaited(
    st: &AppState,
    entries: Entries,
    ops: Vec<Operation>,
) -> Result<HttpResponse, ApiError> {
    let accepted: Vec<Result<Receipt, SubmitError>> = match &st.journal {
        Some(journal) => journal.accept(ops).await?,
        None => st
            .node
            .enqueue_batch(ops, true)
            .into_iter()
            .map(|t| {
                t.map(|t| Receipt {
                    id: t.id,
                    trace: t.trace,
                })
            })
            .collect(),
    };
    let mut accepted: Vec<Option<Result<Receipt, SubmitError>>> =
        accepted.into_iter().map(Some).collect();
    let mut answer = BatchWriter::new(entries.slots.len());
    for slot in entries.slots {
        match slot {
            Err(body) => answer.refused(&body),
            Ok(i) => match accepted[i].take().expect("each answer is used once") {
                Err(e) => answer.refused(&ApiError::from(e).body()),
                Ok(r) => answer.answer(&Answer::queued(r.id, r.trace.map(|c| c.trace_id))),
            },
        }
    }
    Ok(answer.respond(StatusCode::ACCEPTED))
}

/// A batch's entries as read: each keeps its place, holding the index of its operation
/// among those read, or why it was refused.
#[derive(Default)]
struct Entries {
    slots: Vec<Result<usize, ErrorBody>>,
    /// Operations read so far.
    read: usize,
}

impl Entries {
    /// Places the next entry: its operation, handed back, or why it was refused.
    fn place(&mut self, parsed: Result<Operation, ApiError>) -> Option<Operation> {
        match parsed {
            Ok(op) => {
                self.slots.push(Ok(self.read));
                self.read += 1;
                Some(op)
            }
            Err(e) => {
                self.slots.push(Err(e.body()));
                None
            }
        }
    }
}

fn check_batch_len(n: usize, max: usize) -> Result<(), ApiError> {
    if n > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("field `ops` has {n} operations, over the limit of {max} (http.max_batch_ops)"),
        ));
    }
    Ok(())
}

/// The status of an operation, and its result once it finished.
#[utoipa::path(get, path = "/v1/ops/{id}", params(("id" = String, Path, description = "operation id")),
    responses((status = 200, body = OpAnswer), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody),
        (status = 404, description = "unknown, forgotten, or submitted with another token", body = ErrorBody)))]
pub(super) async fn get_op(
    st: web::Data<AppState>,
    req: HttpRequest,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let op_id: OpId = id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            format!("`{id}` is not an operation id (a UUID)"),
        )
    })?;
    let caller = Caller::of(&req);
    // Another token's operation reads as unknown: its existence is not told either.
    let t = st.node.status(&op_id).filter(|t| caller.may_see(t.owner.as_deref())).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no operation `{op_id}` (unknown, or finished longer ago than the retention period)"),
        )
    })?;
    let answer = match t.outcome() {
        Some(o) => Answer::outcome(o),
        None => Answer::pending(op_id, t.status(), t.trace_id),
    };
    Ok(with_op_headers(
        answer.with_type(&t.op_type).respond(StatusCode::OK),
        &op_id.to_string(),
        None,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_shares_the_body_it_lies_in_and_is_copied_otherwise() {
        let body = web::Bytes::from(br#"{"payload":{"a":1}}"#.to_vec());
        let part = &body[11..18];
        let shared = shared_or_copied(Some(&body), part);
        assert_eq!(&shared[..], br#"{"a":1}"#);
        assert_eq!(shared.as_ptr(), part.as_ptr());
        let copied = shared_or_copied(None, part);
        assert_eq!(&copied[..], br#"{"a":1}"#);
        assert_ne!(copied.as_ptr(), part.as_ptr());
        // Text from elsewhere is copied, never sliced out of a body it is not in.
        let elsewhere = br#"{"a":1}"#.to_vec();
        let copied = shared_or_copied(Some(&body), &elsewhere);
        assert_eq!(&copied[..], &elsewhere[..]);
        assert_ne!(copied.as_ptr(), elsewhere.as_ptr());
        let tail = &body[body.len() - 1..];
        assert_eq!(shared_or_copied(Some(&body), tail).as_ptr(), tail.as_ptr());
    }
}
