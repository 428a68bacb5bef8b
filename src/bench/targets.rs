//! What the bench drives: an embedded [`Node`] through the library API ([`InProcess`]),
//! or a running node's HTTP api, http or https ([`Http`]: single operations, batches, or
//! the plain hello route used as a baseline).
//!
//! Everything a request needs that does not change (the operation type, the payload, the
//! encoded request body) is built once and cloned cheaply per request.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use opmesh_actors::{Json, Node, OpOutcome, OpType, Operation, Ticket};
use parking_lot::Mutex;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;
use tokio::net::TcpStream;

use super::driver::{Done, Load};

/// Drives an embedded node: one `Node::enqueue` per request, its ticket awaited in a slot.
pub(crate) struct InProcess {
    pub node: Node,
    pub op_type: OpType,
    pub payload: Json,
    /// The node every operation must run on (its outcome's `executed_by`), if the run
    /// requires one (`--remote`): a success elsewhere counts as a failure.
    pub owner: Option<&'static str>,
}

/// A request to the embedded node: waiting for its outcome, or refused at the door.
pub(crate) enum InProcessFut {
    Waiting {
        ticket: Ticket,
        owner: Option<&'static str>,
    },
    Refused(Option<String>),
}

impl Future for InProcessFut {
    type Output = Done;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Done> {
        match self.get_mut() {
            InProcessFut::Waiting { ticket, owner } => Pin::new(ticket)
                .poll(cx)
                .map(|outcome| judge_outcome(outcome, *owner)),
            InProcessFut::Refused(why) => Poll::Ready(Done::failed(
                1,
                format!("refused: {}", why.take().unwrap_or_default()),
            )),
        }
    }
}

/// Reads an operation's outcome: a success counts only on `owner`, when there is one.
pub(crate) fn judge_outcome(outcome: OpOutcome, owner: Option<&'static str>) -> Done {
    if !outcome.is_success() {
        let why = outcome.error.unwrap_or_default();
        return Done::failed(1, format!("operation {}: {why}", outcome.status.as_str()));
    }
    match (owner, outcome.executed_by.as_deref()) {
        (Some(want), ran) if ran != Some(want) => {
            let mut done = Done::failed(
                1,
                format!(
                    "ran on {}, not on {want} where the type is pinned",
                    ran.unwrap_or("no node")
                ),
            );
            done.elsewhere = 1;
            done
        }
        _ => Done::ok(1),
    }
}

impl Load for InProcess {
    type Fut = InProcessFut;

    fn runtimes(&self) -> &[tokio::runtime::Handle] {
        self.node.shard_runtimes()
    }

    fn issue(&self, _ops: u32) -> InProcessFut {
        // Each operation brings its own type name and payload, as a caller building one
        // (or the HTTP api parsing one) does: clones of one shared `Arc` and `Bytes`
        // would make every core count references on the same two cache lines, a cost of
        // this generator, not of the engine.
        let op = Operation::new(
            &*self.op_type,
            Json::from_trusted(self.payload.as_bytes().to_vec()),
        );
        match self.node.enqueue(op) {
            Ok(ticket) => InProcessFut::Waiting {
                ticket,
                owner: self.owner,
            },
            Err(e) => InProcessFut::Refused(Some(e.to_string())),
        }
    }
}

/// How long one HTTP request may take before it counts as failed. Generous: the engine's
/// default deadline is 30 s, and a run must end by itself even if the server hangs.
pub(crate) const HTTP_TIMEOUT: Duration = Duration::from_secs(120);

/// Which route an [`Http`] load posts to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// `POST /v1/ops?wait=true`, one operation per request; without `?wait=true`
    /// (`--no-wait`) the 202 counts.
    Single { wait: bool },
    /// `POST /v1/ops/batch?wait=true`, up to `--batch` operations per request; without
    /// `?wait=true` the 202 counts.
    Batch { wait: bool },
    /// `POST /v1/bench/hello`: answered without the engine, the same bodies as the real
    /// run (single or batch), for a baseline.
    Hello { batch: bool },
}

impl Route {
    /// The path it posts to, below the target.
    pub(crate) fn path(self) -> &'static str {
        match self {
            Route::Single { wait: true } => "v1/ops?wait=true",
            Route::Single { wait: false } => "v1/ops",
            Route::Batch { wait: true } => "v1/ops/batch?wait=true",
            Route::Batch { wait: false } => "v1/ops/batch",
            Route::Hello { .. } => "v1/bench/hello",
        }
    }

    /// The status a good answer gives each operation: `succeeded`, or `queued` when the
    /// 202 is what counts.
    fn good(self) -> &'static str {
        match self {
            Route::Single { wait: false } | Route::Batch { wait: false } => "queued",
            _ => "succeeded",
        }
    }
}

/// Drives a running node over HTTP/1.1 with keep-alive.
pub(crate) struct Http {
    /// One per thread of `runtimes`: a request takes its thread's.
    clients: Vec<Client>,
    /// The client's own threads (`--client-threads`), where the drivers run.
    runtimes: Vec<tokio::runtime::Handle>,
    url: reqwest::Url,
    /// `url`'s path and query: what a request line names.
    path: hyper::Uri,
    route: Route,
    /// `{"type":…,"payload":…}`, the one operation every request carries.
    op: Bytes,
    /// The body of a full request: `op` itself, or a batch of `batch` of them.
    body: Bytes,
    batch: u32,
}

/// How the requests of one client thread reach the target.
#[derive(Clone)]
pub(crate) enum Client {
    /// An http:// target: HTTP/1.1 over connections of the thread's own ([`Conns`]).
    Plain(Arc<Conns>),
    /// An https:// target: reqwest (rustls; the system's roots and `--cacert`), which
    /// pools the thread's connections.
    Tls(reqwest::Client),
}

/// Builds one client thread's HTTP client for `base`; an https target's certificate may
/// chain to the system's roots or to `trust` (`--cacert`); `token` goes with every
/// request.
pub(crate) fn http_client(
    base: &reqwest::Url,
    concurrency: usize,
    trust: &[CertificateDer<'static>],
    token: Option<&crate::config::Secret>,
) -> anyhow::Result<Client> {
    let headers = token.map(crate::cli::bearer_header).transpose()?;
    if base.scheme() == "http" {
        let auth = headers.and_then(|h| h.get(reqwest::header::AUTHORIZATION).cloned());
        return Ok(Client::Plain(Arc::new(Conns::new(base, auth)?)));
    }
    let mut builder = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .tcp_nodelay(true)
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(HTTP_TIMEOUT);
    if let Some(headers) = headers {
        builder = builder.default_headers(headers);
    }
    Ok(Client::Tls(crate::tls::trust(builder, trust)?.build()?))
}

/// How long connecting to the target may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One client thread's connections to a plain-HTTP target, each carrying one request at
/// a time (HTTP/1.1 with keep-alive, no pipelining, as wrk): a request takes an idle one
/// or opens another, and gives it back once its answer is read to the end. Through
/// hyper's connection API, each connection's task on the thread that uses it: what
/// reqwest adds over hyper (its pool, a redirect layer, the URL it parses again for every
/// answer) cost the bench's client about a tenth of its CPU.
pub(crate) struct Conns {
    /// `host:port`, resolved at each connect.
    addr: String,
    /// The `Host` header.
    host: hyper::header::HeaderValue,
    /// `Authorization: Bearer …`, with `--token`.
    auth: Option<hyper::header::HeaderValue>,
    idle: Mutex<Vec<http1::SendRequest<Full<Bytes>>>>,
}

impl Conns {
    fn new(base: &reqwest::Url, auth: Option<hyper::header::HeaderValue>) -> anyhow::Result<Conns> {
        let host = base
            .host_str()
            .ok_or_else(|| anyhow::anyhow!("the target `{base}` names no host"))?;
        let port = base
            .port_or_known_default()
            .ok_or_else(|| anyhow::anyhow!("the target `{base}` names no port"))?;
        let authority = match base.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_owned(),
        };
        Ok(Conns {
            addr: format!("{host}:{port}"),
            host: hyper::header::HeaderValue::from_str(&authority)?,
            auth,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// Posts `body` to `path`: the answer's status and body.
    async fn post(&self, path: &hyper::Uri, body: Bytes) -> Result<(StatusCode, Bytes), String> {
        use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
        let mut conn = self.ready().await?;
        let mut req = hyper::Request::new(Full::new(body));
        *req.method_mut() = hyper::Method::POST;
        *req.uri_mut() = path.clone();
        let headers = req.headers_mut();
        headers.insert(HOST, self.host.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(auth) = &self.auth {
            headers.insert(AUTHORIZATION, auth.clone());
        }
        let resp = conn.send_request(req).await.map_err(|e| chain(&e))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {}", chain(&e)))?
            .to_bytes();
        // Read to its end: the connection can carry the next request.
        self.idle.lock().push(conn);
        Ok((status, body))
    }

    /// An idle connection that takes a request (one the server closed is dropped), or a
    /// new one.
    async fn ready(&self) -> Result<http1::SendRequest<Full<Bytes>>, String> {
        loop {
            let idle = self.idle.lock().pop();
            let Some(mut conn) = idle else {
                return self.connect().await;
            };
            if conn.ready().await.is_ok() {
                return Ok(conn);
            }
        }
    }

    async fn connect(&self) -> Result<http1::SendRequest<Full<Bytes>>, String> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| {
                format!(
                    "connecting to {}: no answer within {} s",
                    self.addr,
                    CONNECT_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| format!("connecting to {}: {e}", self.addr))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("connecting to {}: {e}", self.addr))?;
        let (conn, task) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("connecting to {}: {}", self.addr, chain(&e)))?;
        // Its task runs on this client thread, beside the drivers that use it; it ends
        // when the connection closes or its last handle is dropped.
        tokio::spawn(async move {
            let _ = task.await;
        });
        Ok(conn)
    }
}

impl Http {
    /// `base` is the target without a trailing slash (`http://host:port`).
    pub(crate) fn new(
        clients: Vec<Client>,
        runtimes: &[tokio::runtime::Handle],
        base: &reqwest::Url,
        route: Route,
        op_type: &str,
        payload: &Json,
        batch: u32,
    ) -> anyhow::Result<Self> {
        let url = base.join(route.path())?;
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_owned(),
        }
        .parse()?;
        let op = Bytes::from(format!(
            r#"{{"type":{},"payload":{}}}"#,
            serde_json::to_string(op_type)?,
            payload.as_str()
        ));
        let batched = matches!(route, Route::Batch { .. } | Route::Hello { batch: true });
        let body = if batched {
            batch_body(&op, batch)
        } else {
            op.clone()
        };
        Ok(Http {
            clients,
            runtimes: runtimes.to_vec(),
            url,
            path,
            route,
            op,
            body,
            batch: if batched { batch } else { 1 },
        })
    }
}

fn batch_body(op: &[u8], n: u32) -> Bytes {
    let mut body = Vec::with_capacity(10 + (op.len() + 1) * n as usize);
    body.extend_from_slice(br#"{"ops":["#);
    for i in 0..n {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(op);
    }
    body.extend_from_slice(b"]}");
    Bytes::from(body)
}

/// The part of an operation answer the bench reads.
#[derive(Deserialize)]
struct Answer<'a> {
    /// Absent from a batch's refused entry (`{"error", "message"}`).
    #[serde(default, borrow)]
    status: Cow<'a, str>,
    #[serde(default, borrow)]
    error: Option<Cow<'a, str>>,
}

/// A batch answer, its entries kept as written: most are read no further than
/// [`opens_with_status`] needs.
#[derive(Deserialize)]
struct BatchAnswer<'a> {
    #[serde(borrow)]
    results: Vec<&'a serde_json::value::RawValue>,
}

/// Whether `entry` is an answer as the api writes it (`Answer::write`) for an operation
/// whose status is `good`: it opens with the operation's id (36 characters, nothing
/// escaped) and then its status. Reading only that much saves most of what the bench
/// client spent on a batch answer. Any other answer (another status, a refusal, other
/// writers' key order or spacing) is read in full.
fn opens_with_status(entry: &[u8], good: &str) -> bool {
    id_opening(entry).is_some_and(|n| {
        entry[n..]
            .strip_prefix(b"\"")
            .and_then(|r| r.strip_prefix(good.as_bytes()))
            .is_some_and(|r| r.first() == Some(&b'"'))
    })
}

/// The length of `{"id":"<36 characters, nothing escaped>","status":` when `entry` opens
/// so (the api's layout): what follows is the status's string.
fn id_opening(entry: &[u8]) -> Option<usize> {
    const OPEN: &[u8] = br#"{"id":""#;
    const STATUS: &[u8] = br#"","status":"#;
    let rest = entry.strip_prefix(OPEN)?;
    let (id, rest) = rest.split_at_checked(36)?;
    // Nothing escaped in the id, so the quote after it ends it: what follows is the
    // object's own `status`. (Checked without a branch per byte: ids are random.)
    let plain = id
        .iter()
        .fold(true, |ok, &c| ok & (c != b'"') & (c != b'\\'));
    (plain && rest.starts_with(STATUS)).then_some(OPEN.len() + 36 + STATUS.len())
}

impl Answer<'_> {
    /// Why the operation counts as failed, unless its status is `good`.
    fn failure(&self, good: &str) -> Option<String> {
        (self.status != good).then(|| match &self.error {
            Some(e) if self.status.is_empty() => format!("refused: {e}"),
            Some(e) => format!("operation {}: {e}", self.status),
            None => format!("operation {}", self.status),
        })
    }
}

/// Why the operation `answer` reports counts as failed, unless its status is `good`.
fn failure_of(answer: &[u8], good: &str) -> Option<String> {
    if opens_with_status(answer, good) {
        return None;
    }
    match serde_json::from_slice::<Answer<'_>>(answer) {
        Ok(a) => a.failure(good),
        Err(e) => Some(format!("unreadable answer: {e}: {}", snippet(answer))),
    }
}

/// A batch answer's entries. The body is checked to be UTF-8 once, up front (with it
/// known to be text, the parser does not check each string again); a body that is not
/// is parsed as bytes, for the parser to say where. An answer laid out as the api writes
/// it is split into its entries without a parser ([`split_results`]).
fn batch_answer(body: &[u8]) -> serde_json::Result<Vec<&[u8]>> {
    let text = match std::str::from_utf8(body) {
        Ok(text) => text,
        Err(_) => return serde_json::from_slice::<BatchAnswer<'_>>(body).map(entries),
    };
    match split_results(text.as_bytes()) {
        Some(entries) => Ok(entries),
        None => serde_json::from_str::<BatchAnswer<'_>>(text).map(entries),
    }
}

fn entries(b: BatchAnswer<'_>) -> Vec<&[u8]> {
    b.results.into_iter().map(|r| r.get().as_bytes()).collect()
}

/// The entries of `{"results":[…]}` written as the api writes it (no space outside
/// strings), each an object: found by the brackets outside strings, strings skipped to
/// their closing quote (`memchr` for the quote or an escape). Outside strings only what
/// JSON allows there is taken (brackets, separators, numbers, `true`, `false`, `null`).
/// `None` for anything else, which the parser then reads (and names what is wrong). Each
/// entry is then judged on its own ([`failure_of`]).
fn split_results(body: &[u8]) -> Option<Vec<&[u8]>> {
    let rest = body.strip_prefix(br#"{"results":["#)?;
    let mut entries = Vec::new();
    let mut i = 0;
    if rest.first() != Some(&b']') {
        loop {
            let start = i;
            if rest.get(i) != Some(&b'{') {
                return None;
            }
            let mut depth = 0usize;
            // An entry that opens as the api writes it: its id and the `status` key are
            // known to be plain, skipped without a look at each byte.
            if let Some(n) = id_opening(&rest[i..]) {
                depth = 1;
                i += n;
            }
            loop {
                match *rest.get(i)? {
                    b'"' => {
                        i = end_of_string(rest, i + 1)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            i += 1;
                            break;
                        }
                    }
                    b':' | b',' | b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E' => {}
                    b't' | b'r' | b'u' | b'f' | b'a' | b'l' | b's' | b'n' => {}
                    _ => return None,
                }
                i += 1;
            }
            entries.push(&rest[start..i]);
            match rest.get(i)? {
                b',' => i += 1,
                b']' => break,
                _ => return None,
            }
        }
    }
    (&rest[i..] == b"]}").then_some(entries)
}

/// The index just past the closing quote of the string whose text starts at `from`.
/// Most strings of an answer are short (keys, a status, a node's name): their first
/// bytes are looked at one by one, and only a longer string goes to the vector search,
/// which takes longer to start than a short string takes to read.
fn end_of_string(bytes: &[u8], mut from: usize) -> Option<usize> {
    const SHORT: usize = 16;
    loop {
        let rest = bytes.get(from..)?;
        let near = &rest[..rest.len().min(SHORT)];
        let at = from
            + match near.iter().position(|&c| c == b'"' || c == b'\\') {
                Some(p) => p,
                None => near.len() + memchr::memchr2(b'"', b'\\', &rest[near.len()..])?,
            };
        if bytes[at] == b'"' {
            return Some(at + 1);
        }
        // An escape: the next character is taken as it is.
        from = at + 2;
    }
}

/// Reads a 2xx answer to a request of `ops` operations.
fn judge(route: Route, ops: u32, body: &[u8]) -> Done {
    let good = route.good();
    match route {
        Route::Hello { .. } => Done::ok(ops),
        Route::Single { .. } => match failure_of(body, good) {
            None => Done::ok(ops),
            Some(e) => Done::failed(ops, e),
        },
        Route::Batch { .. } => match batch_answer(body) {
            Ok(results) if results.len() == ops as usize => {
                let mut done = Done::ok(0);
                for entry in results {
                    match failure_of(entry, good) {
                        None => done.ok += 1,
                        Some(e) => {
                            done.failed += 1;
                            done.error.get_or_insert(e);
                        }
                    }
                }
                done
            }
            Ok(results) => Done::failed(
                ops,
                format!("batch of {ops} answered with {} results", results.len()),
            ),
            Err(e) => Done::failed(ops, format!("unreadable answer: {e}: {}", snippet(body))),
        },
    }
}

fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(&body[..body.len().min(200)]);
    s.trim().to_owned()
}

/// An error with its causes: reqwest's own message rarely says what went wrong.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

impl Load for Http {
    type Fut = Pin<Box<dyn Future<Output = Done> + Send>>;

    fn runtimes(&self) -> &[tokio::runtime::Handle] {
        &self.runtimes
    }

    fn issue(&self, ops: u32) -> Self::Fut {
        let body = if ops == self.batch {
            self.body.clone()
        } else {
            // The last, short batch of a run.
            batch_body(&self.op, ops)
        };
        // A client thread is the home of its number ([`ShardThreads::start_named`]).
        let client = &self.clients[opmesh_actors::shard::home_index() % self.clients.len()];
        let route = self.route;
        match client {
            Client::Plain(conns) => {
                let (conns, path) = (Arc::clone(conns), self.path.clone());
                Box::pin(async move {
                    match tokio::time::timeout(HTTP_TIMEOUT, conns.post(&path, body)).await {
                        Ok(Ok((status, body))) => answered(route, ops, status, &body),
                        Ok(Err(e)) => Done::failed(ops, e),
                        Err(_) => Done::failed(
                            ops,
                            format!("no answer within {} s", HTTP_TIMEOUT.as_secs()),
                        ),
                    }
                })
            }
            Client::Tls(client) => {
                let req = client
                    .post(self.url.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body);
                Box::pin(async move {
                    let resp = match req.send().await {
                        Ok(r) => r,
                        Err(e) => return Done::failed(ops, chain(&e)),
                    };
                    let status = resp.status();
                    match resp.bytes().await {
                        Ok(body) => answered(route, ops, status, &body),
                        Err(e) => Done::failed(ops, format!("reading the answer: {}", chain(&e))),
                    }
                })
            }
        }
    }
}

/// Reads an answer of `status` to a request of `ops` operations.
fn answered(route: Route, ops: u32, status: StatusCode, body: &[u8]) -> Done {
    if !status.is_success() {
        return Done::failed(ops, format!("HTTP {status}: {}", snippet(body)));
    }
    judge(route, ops, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_judged_by_status() {
        let ok = judge(
            Route::Single { wait: true },
            1,
            br#"{"id":"x","status":"succeeded","result":1}"#,
        );
        assert_eq!((ok.ok, ok.failed), (1, 0));
        let bad = judge(
            Route::Single { wait: true },
            1,
            br#"{"id":"x","status":"failed","error":"boom"}"#,
        );
        assert_eq!((bad.ok, bad.failed), (0, 1));
        assert_eq!(bad.error.as_deref(), Some("operation failed: boom"));
        let garbage = judge(Route::Single { wait: true }, 1, b"<html>");
        assert_eq!(garbage.failed, 1);
        let batch = judge(
            Route::Batch { wait: true },
            3,
            br#"{"results":[{"status":"succeeded"},{"status":"expired"},{"status":"succeeded"}]}"#,
        );
        assert_eq!((batch.ok, batch.failed), (2, 1));
        let short = judge(
            Route::Batch { wait: true },
            3,
            br#"{"results":[{"status":"succeeded"}]}"#,
        );
        assert_eq!((short.ok, short.failed), (0, 3));
        let hello = judge(Route::Hello { batch: true }, 5, br#"{"hello":"world"}"#);
        assert_eq!((hello.ok, hello.failed), (5, 0));
    }

    /// Entries as the api writes them are judged from their opening; any other is read
    /// in full, and judged the same way.
    #[test]
    fn batch_entries_are_judged_by_their_status_however_written() {
        let id = "0b0d8f0e-5e7c-4d4e-9a43-2f6c1f0e9a11";
        let entries = [
            // As the api writes them: the status right after the id.
            format!(r#"{{"id":"{id}","status":"succeeded","result":{{"status":"failed"}}}}"#),
            format!(r#"{{"id":"{id}","status":"failed","result":null,"error":"boom"}}"#),
            format!(r#"{{"id":"{id}","status":"succeededx","result":null}}"#),
            // Written otherwise: other key order, spacing, an id with an escape in it.
            r#"{"status":"succeeded","id":"x"}"#.to_owned(),
            format!(r#"{{ "id": "{id}", "status": "expired" }}"#),
            r#"{"id":"an-id-with-an-escaped-quote-\"-in-it","status":"failed","error":"e2"}"#
                .to_owned(),
            r#"{"error":"overloaded","message":"full"}"#.to_owned(),
        ];
        let expect = [true, false, false, true, false, false, false];
        for (e, ok) in entries.iter().zip(expect) {
            let body = format!(r#"{{"results":[{e}]}}"#);
            let done = judge(Route::Batch { wait: true }, 1, body.as_bytes());
            assert_eq!((done.ok, done.failed), (ok as u32, !ok as u32), "{e}");
        }
        assert!(opens_with_status(entries[0].as_bytes(), "succeeded"));
        assert!(
            !opens_with_status(entries[3].as_bytes(), "succeeded"),
            "read in full"
        );
        // An id with an escape in it: read in full, and judged by its status all the same.
        let escaped = r#"{"id":"thirty-four-characters-of-an-id-xx\"","status":"succeeded"}"#;
        assert!(!opens_with_status(escaped.as_bytes(), "succeeded"));
        let body = format!(r#"{{"results":[{escaped}]}}"#);
        let done = judge(Route::Batch { wait: true }, 1, body.as_bytes());
        assert_eq!((done.ok, done.failed), (1, 0));
        let all = format!(r#"{{"results":[{}]}}"#, entries.join(","));
        let done = judge(Route::Batch { wait: true }, 7, all.as_bytes());
        assert_eq!((done.ok, done.failed), (2, 5));
        assert_eq!(done.error.as_deref(), Some("operation failed: boom"));
    }

    /// Any JSON value as a compact string: what the api writes inside an entry.
    fn any_json() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            // Quotes, escapes, brackets and commas inside strings, and any character.
            "[\\\\\"{}\\[\\],:a-z\u{0}-\u{1f}é😀]{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                proptest::collection::btree_map("[a-z\"\\\\]{0,6}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// The entries found without a parser are the parser's, for any entries.
        #[test]
        fn an_answer_as_the_api_writes_it_splits_as_the_parser_reads_it(
            entries in proptest::collection::vec(
                proptest::collection::btree_map("[a-z\"]{0,6}", any_json(), 0..5), 0..6),
        ) {
            let entries: Vec<String> = entries
                .into_iter()
                .map(|m| serde_json::Value::Object(m.into_iter().collect()).to_string())
                .collect();
            let body = format!(r#"{{"results":[{}]}}"#, entries.join(","));
            let split = split_results(body.as_bytes()).expect("the api's layout");
            let parsed = entries_of(&body);
            proptest::prop_assert_eq!(split, parsed);
        }
    }

    proptest::proptest! {
        /// Entries that open as the api writes them (an id of 36 characters, then the
        /// status), whose opening the splitter skips, split as the parser reads them,
        /// whatever the status and the rest hold; so do ids that only look like one.
        #[test]
        fn entries_that_open_with_an_id_split_as_the_parser_reads_them(
            entries in proptest::collection::vec(
                (
                    "[a-f0-9-]{36}|[a-z\"\\\\]{30,40}",
                    any_json(),
                    proptest::collection::btree_map("[a-z\"]{0,6}", any_json(), 0..3),
                ),
                0..6,
            ),
        ) {
            let entries: Vec<String> = entries
                .into_iter()
                .map(|(id, status, rest)| {
                    let mut e = format!(
                        r#"{{"id":{},"status":{status}"#,
                        serde_json::Value::from(id)
                    );
                    for (k, v) in rest {
                        e.push_str(&format!(",{}:{v}", serde_json::Value::from(k)));
                    }
                    e.push('}');
                    e
                })
                .collect();
            let body = format!(r#"{{"results":[{}]}}"#, entries.join(","));
            let split = split_results(body.as_bytes()).expect("the api's layout");
            proptest::prop_assert_eq!(split, entries_of(&body));
        }
    }

    fn entries_of(body: &str) -> Vec<&[u8]> {
        entries(serde_json::from_str::<BatchAnswer<'_>>(body).unwrap())
    }

    /// What is not laid out as the api writes it is left to the parser: spaces, another
    /// key, a truncated or extended body, an entry that is not an object, a bare word.
    #[test]
    fn other_layouts_are_left_to_the_parser() {
        for body in [
            r#"{ "results":[{"a":1}]}"#,
            r#"{"results":[{"a":1} ]}"#,
            r#"{"results":[{"a": 1}]}"#,
            r#"{"results":[{"a":1}]} "#,
            r#"{"results":[{"a":1}],"more":2}"#,
            r#"{"results":[{"a":1}"#,
            r#"{"results":[{"a":"1}]}"#,
            r#"{"results":[1,2]}"#,
            r#"{"results":[{"a":1},]}"#,
            r#"{"results":[{"a":1}{"b":2}]}"#,
            r#"{"results":[{"a":yes}]}"#,
            r#"{"others":[]}"#,
        ] {
            assert_eq!(split_results(body.as_bytes()), None, "{body}");
        }
        assert_eq!(split_results(br#"{"results":[]}"#), Some(vec![]));
        // Judged all the same, by the parser.
        let done = judge(
            Route::Batch { wait: true },
            2,
            br#"{ "results": [{"status":"succeeded"}, {"status":"failed"}] }"#,
        );
        assert_eq!((done.ok, done.failed), (1, 1));
        let done = judge(Route::Batch { wait: true }, 1, br#"{"results":[{"a":1}"#);
        assert!(done.error.unwrap().starts_with("unreadable answer"));
    }

    #[test]
    fn a_batch_answer_that_is_not_text_is_unreadable() {
        let done = judge(Route::Batch { wait: true }, 1, b"{\"results\":[\"\xff\"]}");
        assert_eq!((done.ok, done.failed), (0, 1));
        let error = done.error.unwrap();
        assert!(error.starts_with("unreadable answer"), "{error}");
    }

    #[test]
    fn without_wait_an_accepted_operation_counts() {
        let accepted = br#"{"id":"x","status":"queued"}"#;
        let ok = judge(Route::Single { wait: false }, 1, accepted);
        assert_eq!((ok.ok, ok.failed), (1, 0));
        // Waiting, `queued` is not an end.
        let bad = judge(Route::Single { wait: true }, 1, accepted);
        assert_eq!((bad.ok, bad.failed), (0, 1));
        let batch = judge(
            Route::Batch { wait: false },
            2,
            br#"{"results":[{"status":"queued"},{"error":"overloaded","message":"full"}]}"#,
        );
        assert_eq!((batch.ok, batch.failed), (1, 1));
        assert_eq!(batch.error.as_deref(), Some("refused: overloaded"));
        assert_eq!(Route::Batch { wait: false }.path(), "v1/ops/batch");
        assert_eq!(Route::Single { wait: false }.path(), "v1/ops");
    }

    #[test]
    fn batch_bodies_are_valid_json() {
        let body = batch_body(br#"{"type":"echo","payload":"x"}"#, 3);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["ops"].as_array().unwrap().len(), 3);
        assert_eq!(v["ops"][2]["type"], "echo");
    }
}
