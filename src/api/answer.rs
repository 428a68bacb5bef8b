//! Answers about operations, written straight into the response body: the same bytes as
//! an [`OpAnswer`](super::model::OpAnswer) or a [`BatchAnswer`](super::model::BatchAnswer)
//! serialized by serde, without building either. Built that way, every answer of a batch
//! was a struct of owned strings (its id and trace id formatted, `executed_by` copied, the
//! result re-parsed when written) and every string was escaped: about a sixth of a node's
//! CPU when it takes HTTP batches. Here ids are written as hex from their numbers, the
//! result is copied as the JSON text it already is, and only text that can hold a
//! character JSON escapes (an error message, a node id) goes through serde's escaping.
//! The model's types stay the documented shape; the tests hold these bytes to theirs.

use actix_web::http::header::ContentType;
use actix_web::http::StatusCode;
use actix_web::HttpResponse;
use opmesh_actors::{Json, OpId, OpOutcome, OpStatus};

use super::errors::ErrorBody;

/// One operation's answer, borrowed from what it is made of.
pub(crate) struct Answer<'a> {
    id: OpId,
    status: OpStatus,
    result: Option<&'a Json>,
    error: Option<&'a str>,
    cached: bool,
    executed_by: Option<&'a str>,
    trace_id: Option<u128>,
    attempts: u32,
    op_type: Option<&'a str>,
}

impl<'a> Answer<'a> {
    /// An operation that ended (or was answered from the cache).
    pub(crate) fn outcome(o: &'a OpOutcome) -> Self {
        Answer {
            id: o.id,
            status: o.status,
            result: o.result.as_ref(),
            error: o.error.as_deref(),
            cached: o.cached,
            executed_by: o.executed_by.as_deref(),
            trace_id: o.trace_id.map(|t| t.0),
            attempts: o.attempts,
            op_type: None,
        }
    }

    /// An operation accepted and not yet ended, in `status` (queued or running).
    pub(crate) fn pending(id: OpId, status: OpStatus, trace_id: Option<u128>) -> Self {
        Answer {
            id,
            status,
            result: None,
            error: None,
            cached: false,
            executed_by: None,
            trace_id,
            attempts: 0,
            op_type: None,
        }
    }

    /// An operation just accepted.
    pub(crate) fn queued(id: OpId, trace_id: Option<u128>) -> Self {
        Self::pending(id, OpStatus::Queued, trace_id)
    }

    /// With the operation's type (`GET /v1/ops/{id}` names it).
    pub(crate) fn with_type(self, op_type: &'a str) -> Self {
        Answer {
            op_type: Some(op_type),
            ..self
        }
    }

    /// Appends the answer's JSON to `out`.
    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"id\":\"");
        uuid(out, self.id.0);
        out.extend_from_slice(b"\",\"status\":\"");
        out.extend_from_slice(self.status.as_str().as_bytes());
        out.extend_from_slice(b"\",\"result\":");
        match self.result {
            // Valid JSON by construction: a `Json` is checked where it is made (a handler's
            // result, a request's payload), or came over an authenticated link from a
            // node that did.
            Some(r) => out.extend_from_slice(r.as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"error\":");
        opt_string(out, self.error);
        out.extend_from_slice(if self.cached {
            b",\"cached\":true,\"executed_by\":"
        } else {
            b",\"cached\":false,\"executed_by\":"
        });
        opt_string(out, self.executed_by);
        out.extend_from_slice(b",\"trace_id\":");
        match self.trace_id {
            Some(t) => {
                out.push(b'"');
                out.extend_from_slice(&hex(t));
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"attempts\":");
        out.extend_from_slice(itoa::Buffer::new().format(self.attempts).as_bytes());
        if let Some(t) = self.op_type {
            out.extend_from_slice(b",\"type\":");
            string(out, t);
        }
        out.push(b'}');
    }

    /// The answer as a response with `status`.
    pub(crate) fn respond(&self, status: StatusCode) -> HttpResponse {
        let mut body = Vec::with_capacity(ANSWER_BYTES + self.result.map_or(0, Json::len));
        self.write(&mut body);
        json_response(status, body)
    }
}

/// About what an answer without its result takes, to size buffers.
const ANSWER_BYTES: usize = 200;

/// A batch answer (`{"results":[...]}`) written entry by entry, in order.
pub(crate) struct BatchWriter {
    out: Vec<u8>,
    empty: bool,
}

impl BatchWriter {
    /// For a batch of `n` entries.
    pub(crate) fn new(n: usize) -> Self {
        let mut out = Vec::with_capacity(16 + n * ANSWER_BYTES);
        out.extend_from_slice(b"{\"results\":[");
        BatchWriter { out, empty: true }
    }

    fn next(&mut self) -> &mut Vec<u8> {
        if !std::mem::take(&mut self.empty) {
            self.out.push(b',');
        }
        &mut self.out
    }

    /// The next entry: an operation's answer.
    pub(crate) fn answer(&mut self, a: &Answer<'_>) {
        a.write(self.next());
    }

    /// The next entry: an operation refused on its own.
    pub(crate) fn refused(&mut self, e: &ErrorBody) {
        let out = self.next();
        out.extend_from_slice(b"{\"error\":");
        string(out, &e.error);
        out.extend_from_slice(b",\"message\":");
        string(out, &e.message);
        out.push(b'}');
    }

    /// The whole answer as a response with `status`.
    pub(crate) fn respond(mut self, status: StatusCode) -> HttpResponse {
        self.out.extend_from_slice(b"]}");
        json_response(status, self.out)
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> HttpResponse {
    HttpResponse::build(status)
        .content_type(ContentType::json())
        .body(body)
}

fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// `s` as a JSON string. Text with nothing JSON escapes (a control character, `"` or
/// `\`) is copied as is, as serde_json would write it; the rest goes through serde_json.
fn string(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(out, s).expect("writing a string into a Vec cannot fail");
    }
}

/// `v`'s 32 lowercase hex digits, most significant first: a byte at a time, its two
/// digits from a table (a nibble at a time was a hundred-odd 128-bit shifts per answer).
fn hex(v: u128) -> [u8; 32] {
    const PAIRS: [[u8; 2]; 256] = {
        let digits = b"0123456789abcdef";
        let mut t = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [digits[i >> 4], digits[i & 0xf]];
            i += 1;
        }
        t
    };
    let mut out = [0u8; 32];
    for (pair, byte) in out.chunks_exact_mut(2).zip(v.to_be_bytes()) {
        pair.copy_from_slice(&PAIRS[byte as usize]);
    }
    out
}

/// `v` as a hyphenated lowercase UUID (8-4-4-4-12), as an [`OpId`] displays.
fn uuid(out: &mut Vec<u8>, v: u128) {
    let d: [u8; 32] = hex(v);
    for (i, group) in [&d[..8], &d[8..12], &d[12..16], &d[16..20], &d[20..]]
        .into_iter()
        .enumerate()
    {
        if i > 0 {
            out.push(b'-');
        }
        out.extend_from_slice(group);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::model::{BatchAnswer, BatchItem, OpAnswer};
    use opmesh_actors::TraceId;

    fn outcome(status: OpStatus) -> OpOutcome {
        OpOutcome::new(OpId::new(), status)
    }

    /// Outcomes with every field set and unset, and text that JSON must escape.
    fn outcomes() -> Vec<OpOutcome> {
        let ok = OpOutcome {
            result: Some(Json::encode(&serde_json::json!({"a": [1, "x\"y"], "é": null})).unwrap()),
            executed_by: Some("node-2".into()),
            attempts: 1,
            trace_id: Some(TraceId(0x0123_4567_89ab_cdef_0011_2233_4455_6677)),
            ..outcome(OpStatus::Succeeded)
        };
        let failed = OpOutcome {
            error: Some("handler said \"no\"\n\tat C:\\path \u{1} — ünïcode".into()),
            executed_by: Some("n\"odd\\".into()),
            attempts: 3,
            ..outcome(OpStatus::Failed)
        };
        let cached = OpOutcome {
            result: Some(Json::encode(&serde_json::json!("s")).unwrap()),
            cached: true,
            trace_id: Some(TraceId(1)),
            ..outcome(OpStatus::Succeeded)
        };
        let mut zero = outcome(OpStatus::Expired);
        zero.id = OpId(0);
        let mut max = outcome(OpStatus::Expired);
        max.id = OpId(u128::MAX);
        max.trace_id = Some(TraceId(u128::MAX));
        max.attempts = u32::MAX;
        vec![ok, failed, cached, zero, max]
    }

    fn written(a: &Answer<'_>) -> String {
        let mut out = Vec::new();
        a.write(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn ids_are_written_as_their_display_writes_them() {
        for v in [
            0,
            1,
            u128::MAX,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
            1 << 127,
            0xf0,
        ] {
            assert_eq!(hex(v), format!("{v:032x}").as_bytes(), "{v:#x}");
            let mut out = Vec::new();
            uuid(&mut out, v);
            assert_eq!(out, OpId(v).to_string().as_bytes(), "{v:#x}");
        }
    }

    #[test]
    fn an_answer_is_written_as_serde_writes_the_model() {
        for o in outcomes() {
            let want = serde_json::to_string(&OpAnswer::from_outcome(&o)).unwrap();
            assert_eq!(written(&Answer::outcome(&o)), want);
            let mut typed = OpAnswer::from_outcome(&o);
            typed.op_type = Some("a.b/c:d".into());
            assert_eq!(
                written(&Answer::outcome(&o).with_type("a.b/c:d")),
                serde_json::to_string(&typed).unwrap()
            );
            let trace = o.trace_id.map(|t| t.0);
            let queued = OpAnswer::queued(o.id, trace.map(|t| format!("{t:032x}")));
            assert_eq!(
                written(&Answer::queued(o.id, trace)),
                serde_json::to_string(&queued).unwrap()
            );
            let running = OpAnswer {
                status: OpStatus::Running.as_str(),
                ..OpAnswer::queued(o.id, None)
            };
            assert_eq!(
                written(&Answer::pending(o.id, OpStatus::Running, None)),
                serde_json::to_string(&running).unwrap()
            );
        }
    }

    #[test]
    fn a_batch_is_written_as_serde_writes_the_model() {
        let os = outcomes();
        let refused = ErrorBody {
            error: "overloaded".into(),
            message: "type `x`'s queue holds 8 \"operations\"\n".into(),
        };
        let mut w = BatchWriter::new(os.len() + 1);
        let mut items = Vec::new();
        for (i, o) in os.iter().enumerate() {
            if i == 2 {
                w.refused(&refused);
                items.push(BatchItem::Refused(ErrorBody {
                    error: refused.error.clone(),
                    message: refused.message.clone(),
                }));
            }
            w.answer(&Answer::outcome(o));
            items.push(BatchItem::Answer(OpAnswer::from_outcome(o)));
        }
        let want = serde_json::to_vec(&BatchAnswer { results: items }).unwrap();
        let got = w.respond(StatusCode::OK);
        assert_eq!(got.status(), StatusCode::OK);
        assert_eq!(
            got.headers().get("content-type").unwrap(),
            "application/json"
        );
        let body = actix_web::body::to_bytes(got.into_body());
        let body = futures::executor::block_on(body).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&body),
            String::from_utf8_lossy(&want)
        );

        let empty = futures::executor::block_on(actix_web::body::to_bytes(
            BatchWriter::new(0)
                .respond(StatusCode::ACCEPTED)
                .into_body(),
        ))
        .unwrap();
        assert_eq!(&empty[..], br#"{"results":[]}"#);
    }
}
