//! How the api refuses a request: [`ApiError`] (a status, a machine-readable code and a
//! message that names the field at fault), the engine's and the routing table's errors
//! mapped onto it, and the two readers every handler uses, [`read_body`] (with the size
//! limit) and [`parse`] (JSON, naming the field at fault).

use std::time::Duration;

use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse, ResponseError};
use futures::StreamExt;
use opmesh_actors::{RouteError, SubmitError};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A refused request: a machine-readable code and a message naming what was wrong.
#[derive(Serialize, ToSchema, Debug)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}

/// Every way a request is refused, with its status and code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<Duration>,
    /// One more header of the answer (`WWW-Authenticate` of a 401, `Allow` of a 405).
    header: Option<Box<(header::HeaderName, header::HeaderValue)>>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
            header: None,
        }
    }

    /// A node of a cluster that has not been admitted yet (it has no routing table) is
    /// asked for an operation: retry, here or on another node.
    pub(crate) fn joining() -> Self {
        ApiError {
            retry_after: Some(Duration::from_secs(1)),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "joining",
                "this node has not joined its cluster yet (GET /readyz answers 503): retry, or \
                 submit to another node",
            )
        }
    }

    pub(crate) fn with_header(
        mut self,
        name: header::HeaderName,
        value: header::HeaderValue,
    ) -> Self {
        self.header = Some(Box::new((name, value)));
        self
    }

    /// Answers with `Retry-After`: `d` in whole seconds, rounded up.
    pub(crate) fn with_retry_after(mut self, d: Duration) -> Self {
        self.retry_after = Some(d);
        self
    }

    pub(crate) fn body(&self) -> ErrorBody {
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
            // Whole seconds, rounded up: a client that waits that long finds the wait over.
            let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
            r.insert_header((header::RETRY_AFTER, secs.max(1).to_string()));
        }
        if let Some(h) = &self.header {
            r.insert_header((h.0.clone(), h.1.clone()));
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
            SubmitError::Overloaded { retry_after, .. }
            | SubmitError::OwnerOverloaded { retry_after, .. } => ApiError {
                retry_after: Some(retry_after),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", msg)
            },
            SubmitError::ShuttingDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", msg)
            }
            SubmitError::RateLimited { retry_after, .. } => ApiError {
                retry_after: Some(retry_after),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", msg)
            },
            SubmitError::CircuitOpen { retry_after, .. }
            | SubmitError::OwnerCircuitOpen { retry_after, .. } => ApiError {
                retry_after: Some(retry_after),
                ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "circuit_open", msg)
            },
        }
    }
}

impl From<crate::journal::JournalError> for ApiError {
    /// The journal could not take operations answered 202: none of them was accepted.
    fn from(e: crate::journal::JournalError) -> Self {
        use crate::journal::JournalError;
        match e {
            JournalError::Closed => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                SubmitError::ShuttingDown.to_string(),
            ),
            other => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "journal_write_failed",
                format!(
                    "not accepted: the journal (engine.journal) could not write it, so it \
                     would not survive a restart; nothing was started: {other}"
                ),
            ),
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
            // Well formed, but the cluster has no such node (now): a conflict with its
            // state, not a malformed request.
            RouteError::UnknownNode(_) => ApiError::new(StatusCode::CONFLICT, "unknown_node", msg),
            RouteError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "not_found", msg),
            // The same code as a submission of a type nothing routes.
            RouteError::NoRoute { .. } => ApiError::new(StatusCode::NOT_FOUND, "no_route", msg),
            // Well formed, but the table is full now: a conflict with its state.
            RouteError::TooManyRoutes { .. } => {
                ApiError::new(StatusCode::CONFLICT, "too_many_routes", msg)
            }
            RouteError::Unavailable(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", msg)
            }
            RouteError::NoQuorum { .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_quorum", msg)
            }
        }
    }
}

/// Parses JSON, naming the field at fault in the error.
pub(crate) fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, ApiError> {
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

pub(crate) async fn read_body(
    mut body: web::Payload,
    limit: usize,
) -> Result<web::Bytes, ApiError> {
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
