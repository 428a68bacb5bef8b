//! The handlers the `opmesh` binary ships: `echo` (returns the payload), `sleep`
//! (`{"ms": N}`, for tests and benchmarks), `resize` (fits image dimensions in a box: a
//! small CPU-only type for demos of routing) and `http` (POSTs the payload to a URL, for
//! webhooks), registered on a [`NodeBuilder`] from the configuration (`handlers.builtin`
//! chooses the built-in ones).
//!
//! A webhook's URL may carry credentials (`https://user:pass@host/hook?token=…`): it is
//! used as configured, but every error (and so the operation's error, `/v1/failures`,
//! the events and the trace) shows it through [`redact_url`]. Each target has its own
//! client: https with the system's roots plus its `ca_file`, no redirects unless
//! `follow_redirects`, and its answer read as it arrives up to `max_response_bytes`.

use std::sync::Arc;
use std::time::Duration;

use opmesh_actors::{HandlerError, Json, NodeBuilder, Operation, RetryPolicy};
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

/// The most a `sleep` operation may ask for.
pub const MAX_SLEEP_MS: u64 = 3_600_000;

/// A type served by POSTing the payload to `url`.
#[derive(Clone)]
pub struct HttpTarget {
    pub op_type: String,
    /// As configured: it may hold credentials (`user:pass@`, `?token=`), so it is shown
    /// only through [`redact_url`] (`Debug` too).
    pub url: String,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// CA certificates the target's certificate may chain to, beside the system's roots
    /// (the target's `ca_file`).
    pub trust: Vec<CertificateDer<'static>>,
    /// The most bytes of an answer read; a longer answer fails the attempt.
    pub max_response_bytes: usize,
    /// Whether a 3xx answer is followed (up to 10 times) or fails the operation.
    pub follow_redirects: bool,
}

impl std::fmt::Debug for HttpTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTarget")
            .field("op_type", &self.op_type)
            .field("url", &redact_url(&self.url))
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .field(
                "trust",
                &format_args!("{} CA certificates", self.trust.len()),
            )
            .field("max_response_bytes", &self.max_response_bytes)
            .field("follow_redirects", &self.follow_redirects)
            .finish()
    }
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
    for t in http {
        let hook = Arc::new(Webhook::new(t));
        builder = builder.handler_with_retry(
            &t.op_type,
            move |op: Operation| post(hook.clone(), op),
            t.retry.clone(),
        );
    }
    builder
}

/// `url` as errors, events and logs may show it: without its userinfo (`user:pass@`),
/// query string and fragment, which may hold credentials (`?token=…`).
pub fn redact_url(url: &str) -> String {
    if let Some(mut u) = reqwest::Url::parse(url).ok().filter(reqwest::Url::has_host) {
        // Both only fail on URLs without a host, which have no userinfo.
        let _ = u.set_username("");
        let _ = u.set_password(None);
        u.set_query(None);
        u.set_fragment(None);
        return u.to_string();
    }
    // Not a URL reqwest could call; still never show what may be a secret.
    let url = &url[..url.find(['?', '#']).unwrap_or(url.len())];
    let start = url.find("://").map_or(0, |i| i + 3);
    let authority_end = url[start..].find('/').map_or(url.len(), |i| start + i);
    match url[start..authority_end].rfind('@') {
        Some(at) => format!("{}{}", &url[..start], &url[start + at + 1..]),
        None => url.to_owned(),
    }
}

/// Redirects followed at most, with `follow_redirects = true`.
const MAX_REDIRECTS: usize = 10;

/// One `[[handlers.http]]` target, ready to call.
struct Webhook {
    client: reqwest::Client,
    url: String,
    /// `url` as errors show it ([`redact_url`]).
    shown: String,
    timeout: Duration,
    max_response_bytes: usize,
    follow_redirects: bool,
}

impl Webhook {
    fn new(t: &HttpTarget) -> Webhook {
        let redirects = if t.follow_redirects {
            reqwest::redirect::Policy::limited(MAX_REDIRECTS)
        } else {
            reqwest::redirect::Policy::none()
        };
        let builder = reqwest::Client::builder().redirect(redirects);
        let client = crate::tls::trust(builder, &t.trust)
            .and_then(reqwest::ClientBuilder::build)
            .expect(
                "a webhook client builds: its CA certificates were checked with the configuration",
            );
        Webhook {
            client,
            url: t.url.clone(),
            shown: redact_url(&t.url),
            timeout: t.timeout,
            max_response_bytes: t.max_response_bytes,
            follow_redirects: t.follow_redirects,
        }
    }
}

/// An error and its causes, without the request's URL (reqwest's own message names it
/// in full, credentials included, and rarely says what went wrong).
fn causes(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// POSTs the payload as JSON; a 2xx answer's body (JSON, or text wrapped as a JSON
/// string) is the result. Timeouts, connection errors and 5xx are retryable; 4xx, a 3xx
/// that is not followed and an answer over `max_response_bytes` are not. The request
/// carries `Idempotency-Key` (the operation's [`effect_key`](Operation::effect_key):
/// the same on every attempt and re-run, so the target can apply the effect once; bytes
/// a header cannot hold are percent-encoded) and the operation's `traceparent` (its
/// `op.execute` span), so the target's own spans join the operation's trace. Errors show
/// the URL through [`redact_url`].
async fn post(hook: Arc<Webhook>, op: Operation) -> Result<Json, HandlerError> {
    let (url, timeout) = (&hook.shown, hook.timeout);
    let failed = |e: reqwest::Error| {
        if e.is_timeout() {
            HandlerError::retryable(format!("POST {url} timed out after {timeout:?}"))
        } else {
            HandlerError::retryable(format!("POST {url} failed: {}", causes(e)))
        }
    };
    let mut req = hook
        .client
        .post(&hook.url)
        .timeout(timeout)
        .header("content-type", "application/json")
        .header("idempotency-key", header_safe(&op.effect_key()))
        .header("x-opmesh-op-id", op.id.to_string())
        .header("x-opmesh-op-type", &*op.op_type);
    if let Some(t) = opmesh_actors::trace::current() {
        req = req.header("traceparent", t.traceparent());
    }
    let resp = req
        .body(op.payload.as_bytes().to_vec())
        .send()
        .await
        .map_err(failed)?;
    let status = resp.status();
    if status.is_redirection() && !hook.follow_redirects {
        return Err(HandlerError::fatal(format!(
            "POST {url} answered {status}: redirects are not followed \
             (follow_redirects = false)"
        )));
    }
    if status.is_server_error() {
        return Err(HandlerError::retryable(format!(
            "POST {url} answered {status}"
        )));
    }
    if !status.is_success() {
        return Err(HandlerError::fatal(format!("POST {url} answered {status}")));
    }
    let body = read_capped(resp, hook.max_response_bytes, url, failed).await?;
    if body.is_empty() {
        return Ok(Json::null());
    }
    Json::from_bytes(body.clone()).or_else(|_| {
        Json::encode(&String::from_utf8_lossy(&body))
            .map_err(|e| HandlerError::fatal(e.to_string()))
    })
}

/// `s` as a header value: visible ASCII and spaces kept, every other byte (controls,
/// UTF-8 beyond ASCII, `%` itself) percent-encoded.
fn header_safe(s: &str) -> String {
    const UNSAFE: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');
    percent_encoding::utf8_percent_encode(s, UNSAFE).to_string()
}

/// Reads an answer's body as it arrives, up to `cap` bytes: a longer one (by its
/// `Content-Length`, or once more than `cap` bytes have come) fails without reading the
/// rest.
async fn read_capped(
    mut resp: reqwest::Response,
    cap: usize,
    url: &str,
    failed: impl Fn(reqwest::Error) -> HandlerError,
) -> Result<bytes::Bytes, HandlerError> {
    let too_large = || {
        HandlerError::fatal(format!(
            "POST {url}: the answer is larger than max_response_bytes ({cap} bytes)"
        ))
    };
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(too_large());
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(&failed)? {
        if body.len() + chunk.len() > cap {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

#[cfg(test)]
mod tests {
    use super::{header_safe, redact_url};

    #[test]
    fn header_safe_keeps_visible_ascii_and_encodes_the_rest() {
        assert_eq!(header_safe("order-7 a/b:c"), "order-7 a/b:c");
        assert_eq!(header_safe("ä\n%"), "%C3%A4%0A%25");
        for s in ["ä\n%", "\u{7f}x", "日本"] {
            assert!(actix_web::http::header::HeaderValue::from_str(&header_safe(s)).is_ok());
        }
    }

    #[test]
    fn redact_url_drops_userinfo_query_and_fragment() {
        for (url, shown) in [
            (
                "https://user:pass@hooks.example.com:8443/in?token=secret#frag",
                "https://hooks.example.com:8443/in",
            ),
            (
                "http://alice@127.0.0.1:9000/a/b",
                "http://127.0.0.1:9000/a/b",
            ),
            ("http://[::1]:80/x?a=1&b=2", "http://[::1]/x"),
            (
                "https://hooks.example.com/in",
                "https://hooks.example.com/in",
            ),
            ("http://h", "http://h/"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn redact_url_hides_secrets_of_what_does_not_parse() {
        for (url, shown) in [
            ("http://u:p@bad host/x?token=s", "http://bad host/x"),
            ("http://u:p@[zz/x", "http://[zz/x"),
            ("no scheme?token=s", "no scheme"),
            ("user:pw@host:notaport/path#x", "host:notaport/path"),
        ] {
            let got = redact_url(url);
            assert_eq!(got, shown, "{url}");
            assert!(!got.contains("token") && !got.contains(":p@"), "{got}");
        }
    }
}
