//! The handlers the `opmesh` binary ships: `echo` (returns the payload), `sleep`
//! (`{"ms": N}`, for tests and benchmarks), `resize` (fits image dimensions in a box: a
//! small CPU-only type for demos of routing) and `http` (POSTs the payload to a URL, for
//! webhooks), registered on a [`NodeBuilder`] from the configuration (`handlers.builtin`
//! chooses the built-in ones).

use std::time::Duration;

use opmesh_actors::{HandlerError, Json, NodeBuilder, Operation, RetryPolicy};
use serde::Deserialize;

/// The most a `sleep` operation may ask for.
pub const MAX_SLEEP_MS: u64 = 3_600_000;

/// A type served by POSTing the payload to `url`.
#[derive(Clone, Debug)]
pub struct HttpTarget {
    pub op_type: String,
    pub url: String,
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

/// `echo`: answers with the payload it was given.
pub async fn echo(op: Operation) -> Result<Json, HandlerError> {
    Ok(op.payload)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepArgs {
    ms: u64,
}

/// `sleep`: waits `{"ms": N}` milliseconds, then answers `{"slept_ms": N}`.
///
/// The payload is read before the returned future is made, so the future holds only the
/// duration while it waits (a few bytes per sleeping operation, not the whole operation).
pub fn sleep(op: Operation) -> impl std::future::Future<Output = Result<Json, HandlerError>> {
    let ms = op
        .payload
        .decode::<SleepArgs>()
        .map_err(|e| HandlerError::fatal(format!("sleep expects {{\"ms\": N}}: {e}")))
        .and_then(|a| {
            if a.ms > MAX_SLEEP_MS {
                Err(HandlerError::fatal(format!(
                    "sleep `ms` is {}, over the limit of {MAX_SLEEP_MS}",
                    a.ms
                )))
            } else {
                Ok(a.ms)
            }
        });
    drop(op);
    async move {
        let ms = ms?;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Json::encode(&serde_json::json!({ "slept_ms": ms }))
            .map_err(|e| HandlerError::fatal(e.to_string()))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResizeArgs {
    width: u32,
    height: u32,
    /// The box to fit in: the longest side becomes at most this.
    max: u32,
}

/// `resize`: `{"width": W, "height": H, "max": M}` → the dimensions that fit in an M×M
/// box, keeping the aspect ratio (never enlarging): `{"width": w, "height": h}`.
pub async fn resize(op: Operation) -> Result<Json, HandlerError> {
    let a: ResizeArgs = op.payload.decode().map_err(|e| {
        HandlerError::fatal(format!(
            "resize expects {{\"width\": W, \"height\": H, \"max\": M}}: {e}"
        ))
    })?;
    if a.width == 0 || a.height == 0 || a.max == 0 {
        return Err(HandlerError::fatal(
            "resize: `width`, `height` and `max` must be at least 1",
        ));
    }
    let longest = a.width.max(a.height);
    let (w, h) = if longest <= a.max {
        (a.width, a.height)
    } else {
        let scale = a.max as f64 / longest as f64;
        (
            ((a.width as f64 * scale).round() as u32).max(1),
            ((a.height as f64 * scale).round() as u32).max(1),
        )
    };
    Json::encode(&serde_json::json!({ "width": w, "height": h }))
        .map_err(|e| HandlerError::fatal(e.to_string()))
}

/// A handler built into the binary, which `handlers.builtin` turns on or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    Echo,
    Sleep,
    Resize,
}

impl Builtin {
    /// Every built-in handler, in the order they are listed.
    pub const ALL: [Builtin; 3] = [Builtin::Echo, Builtin::Sleep, Builtin::Resize];

    /// The operation type it serves.
    pub const fn name(self) -> &'static str {
        match self {
            Builtin::Echo => "echo",
            Builtin::Sleep => "sleep",
            Builtin::Resize => "resize",
        }
    }

    /// The built-in handler of the type `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Builtin> {
        Builtin::ALL.into_iter().find(|b| b.name() == name)
    }
}

/// Registers every built-in handler (`echo`, `sleep`, `resize`) and every configured
/// `http` target on `builder`.
pub fn register_builtins(builder: NodeBuilder, http: &[HttpTarget]) -> NodeBuilder {
    register(builder, &Builtin::ALL, http)
}

/// Registers the built-in handlers `builtin` and every configured `http` target on
/// `builder`.
pub fn register(mut builder: NodeBuilder, builtin: &[Builtin], http: &[HttpTarget]) -> NodeBuilder {
    for b in builtin {
        builder = match b {
            Builtin::Echo => builder.handler("echo", echo),
            Builtin::Sleep => builder.handler("sleep", sleep),
            Builtin::Resize => builder.handler("resize", resize),
        };
    }
    if !http.is_empty() {
        let client = reqwest::Client::builder()
            .build()
            .expect("an HTTP client with default settings builds");
        for t in http {
            let client = client.clone();
            let url = t.url.clone();
            let timeout = t.timeout;
            builder = builder.handler_with_retry(
                &t.op_type,
                move |op: Operation| post(client.clone(), url.clone(), timeout, op),
                t.retry.clone(),
            );
        }
    }
    builder
}

/// POSTs the payload as JSON; a 2xx answer's body (JSON, or text wrapped as a JSON
/// string) is the result. Timeouts, connection errors and 5xx are retryable; 4xx is not.
/// The request carries the operation's `traceparent` (its `op.execute` span), so the
/// target's own spans join the operation's trace.
async fn post(
    client: reqwest::Client,
    url: String,
    timeout: Duration,
    op: Operation,
) -> Result<Json, HandlerError> {
    let mut req = client
        .post(&url)
        .timeout(timeout)
        .header("content-type", "application/json")
        .header("x-opmesh-op-id", op.id.to_string())
        .header("x-opmesh-op-type", &*op.op_type);
    if let Some(t) = opmesh_actors::trace::current() {
        req = req.header("traceparent", t.traceparent());
    }
    let resp = req
        .body(op.payload.as_bytes().to_vec())
        .send()
        .await
        .map_err(|e| {
            if e.is_timeout() {
                HandlerError::retryable(format!("POST {url} timed out after {timeout:?}"))
            } else {
                HandlerError::retryable(format!("POST {url} failed: {e}"))
            }
        })?;
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .map_err(|e| HandlerError::retryable(format!("reading the answer of {url}: {e}")))?;
    if status.is_server_error() {
        return Err(HandlerError::retryable(format!(
            "POST {url} answered {status}"
        )));
    }
    if !status.is_success() {
        return Err(HandlerError::fatal(format!("POST {url} answered {status}")));
    }
    if body.is_empty() {
        return Ok(Json::null());
    }
    Json::from_bytes(body.clone()).or_else(|_| {
        Json::encode(&String::from_utf8_lossy(&body))
            .map_err(|e| HandlerError::fatal(e.to_string()))
    })
}
