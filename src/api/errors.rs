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

    /// A `deadline_ms` that is not in the future (not at least 1).
    pub(crate) fn deadline_in_past() -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "deadline_in_past",
            "field `deadline_ms`: the deadline has already passed",
        )
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
            // The api refuses a `deadline_ms` that is not in the future itself
            // ([`ApiError::deadline_in_past`]), so a deadline the node finds passed ran
            // out between the request being read and the node admitting it.
            SubmitError::DeadlineInPast => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "deadline_exceeded",
                "field `deadline_ms`: the deadline passed before the node admitted the operation",
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

/// Reads the whole request body, at most `limit` bytes. A body that arrives as one chunk
/// (most of them) is that chunk, not a copy.
pub(crate) async fn read_body(
    mut body: web::Payload,
    limit: usize,
) -> Result<web::Bytes, ApiError> {
    let mut first = web::Bytes::new();
    let mut joined: Option<web::BytesMut> = None;
    let mut len = 0;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("reading the request body: {e}"),
            )
        })?;
        len += chunk.len();
        if len > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body is over the limit of {limit} bytes (http.max_body_bytes)"),
            ));
        }
        match &mut joined {
            Some(buf) => buf.extend_from_slice(&chunk),
            None if first.is_empty() => first = chunk,
            None => {
                let mut buf = web::BytesMut::with_capacity(2 * len);
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&chunk);
                joined = Some(buf);
            }
        }
    }
    Ok(joined.map_or(first, web::BytesMut::freeze))
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use actix_web::error::PayloadError;
    use actix_web::FromRequest;
    use futures::Stream;

    use super::*;

    /// A request body that arrives as `chunks`.
    async fn body_of(chunks: &[&'static [u8]]) -> web::Payload {
        let items: Vec<Result<web::Bytes, PayloadError>> = chunks
            .iter()
            .map(|c| Ok(web::Bytes::from_static(c)))
            .collect();
        let stream: Pin<Box<dyn Stream<Item = Result<web::Bytes, PayloadError>>>> =
            Box::pin(futures::stream::iter(items));
        let mut payload = actix_web::dev::Payload::from(stream);
        let req = actix_web::test::TestRequest::default().to_http_request();
        web::Payload::from_request(&req, &mut payload)
            .await
            .unwrap()
    }

    #[test]
    fn a_deadline_not_in_the_future_is_bad_input_one_that_ran_out_before_admission_is_not() {
        let bad = ApiError::deadline_in_past();
        assert_eq!(
            (bad.status, bad.code),
            (StatusCode::BAD_REQUEST, "deadline_in_past")
        );
        // The api only hands the node deadlines in the future: one the node finds passed
        // ran out on the way, which the client could not have known (schemathesis found
        // a 1 ms deadline refused as bad input on a busy node).
        let late = ApiError::from(SubmitError::DeadlineInPast);
        assert_eq!(
            (late.status, late.code),
            (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded")
        );
        assert!(late.message.contains("deadline_ms"), "{}", late.message);
    }

    #[actix_web::test]
    async fn a_body_is_read_whole_in_one_chunk_or_many_and_refused_over_the_limit() {
        static ONE: &[u8] = br#"{"type":"echo"}"#;
        let read = read_body(body_of(&[ONE]).await, 100).await.unwrap();
        assert_eq!(&read[..], ONE);
        assert_eq!(read.as_ptr(), ONE.as_ptr(), "one chunk is kept, not copied");

        let read = read_body(body_of(&[b"{\"ty", b"", b"pe\":", b"\"echo\"}"]).await, 100)
            .await
            .unwrap();
        assert_eq!(&read[..], ONE);
        assert!(read_body(body_of(&[]).await, 100).await.unwrap().is_empty());

        let two: [&'static [u8]; 2] = [b"{\"type\":", b"\"echo\"}"];
        for chunks in [&[ONE][..], &two[..]] {
            let err = read_body(body_of(chunks).await, ONE.len() - 1)
                .await
                .unwrap_err();
            assert_eq!(err.status_code(), StatusCode::PAYLOAD_TOO_LARGE);
            assert!(err.body().message.contains("http.max_body_bytes"));
        }
        assert!(read_body(body_of(&[ONE]).await, ONE.len()).await.is_ok());
    }
}
