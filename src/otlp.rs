//! OTLP trace requests written straight from the engine's span records, and the two
//! ways they travel (gRPC, http/protobuf).
//!
//! Going through OpenTelemetry's `SpanData` and opentelemetry-otlp costs about 4 µs a
//! span (each span's attributes are allocated, cloned into the protocol's types, grouped
//! by resource and encoded); at five spans an operation that is more than the operation
//! itself. [`SpanEncoder`] writes the protobuf of `ExportTraceServiceRequest` (the
//! OTLP trace data model, `opentelemetry/proto/trace/v1/trace.proto`) directly from
//! [`OpSpans`], with no allocation per span: the resource and scope are encoded once,
//! each span is appended to one buffer. `tracing` spans (rare) still go through
//! opentelemetry-otlp's exporter.

use bytes::{BufMut, Bytes};
use opentelemetry::Value;
use opentelemetry_sdk::Resource;
use opmesh_actors::trace::{OpSpans, SpanRecord, Stage};
use opmesh_actors::OpStatus;
// The protobuf wire primitives (varints, field keys) are prost's.
use prost::encoding::WireType::{self, LengthDelimited, SixtyFourBit, ThirtyTwoBit, Varint};
use prost::encoding::{encode_varint, encoded_len_varint, key_len};

/// `Span.SpanKind`.
const KIND_INTERNAL: u64 = 1;
const KIND_SERVER: u64 = 2;
const KIND_CLIENT: u64 = 3;
/// `Status.StatusCode.STATUS_CODE_ERROR`.
const STATUS_ERROR: u64 = 2;
/// `SpanFlags`: the W3C flags (sampled), and whether the parent's remoteness is known
/// and true.
const FLAG_SAMPLED: u32 = 0x01;
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

/// A varint, the one-byte case (every key and most lengths here) inline.
#[inline]
fn varint(buf: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        buf.push(v as u8);
    } else {
        encode_varint(v, buf);
    }
}

/// A field's key.
#[inline]
fn put_key(buf: &mut Vec<u8>, field: u32, wire: WireType) {
    varint(buf, u64::from(field << 3 | wire as u32));
}

fn put_bytes(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(buf, field, LengthDelimited);
    varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

fn bytes_len(field: u32, len: usize) -> usize {
    key_len(field) + encoded_len_varint(len as u64) + len
}

fn put_fixed64(buf: &mut Vec<u8>, field: u32, v: u64) {
    put_key(buf, field, SixtyFourBit);
    buf.extend_from_slice(&v.to_le_bytes());
}

/// An attribute value as OTLP's `AnyValue` carries it.
#[derive(Clone, Copy)]
enum Attr<'a> {
    Str(&'a str),
    Int(i64),
    Bool(bool),
    Double(f64),
}

impl Attr<'_> {
    /// Length of the `AnyValue` message.
    fn len(self) -> usize {
        match self {
            Attr::Str(s) => bytes_len(1, s.len()),
            Attr::Bool(_) => 2,
            Attr::Int(i) => 1 + encoded_len_varint(i as u64),
            Attr::Double(_) => 9,
        }
    }

    fn put(self, buf: &mut Vec<u8>) {
        match self {
            Attr::Str(s) => put_bytes(buf, 1, s.as_bytes()),
            Attr::Bool(b) => {
                put_key(buf, 2, Varint);
                buf.push(u8::from(b));
            }
            Attr::Int(i) => {
                put_key(buf, 3, Varint);
                varint(buf, i as u64);
            }
            Attr::Double(d) => put_fixed64(buf, 4, d.to_bits()),
        }
    }
}

/// Appends a `KeyValue` as field `field` of the message being written.
fn put_attr(buf: &mut Vec<u8>, field: u32, key: &str, value: Attr<'_>) {
    let any = value.len();
    let kv = bytes_len(1, key.len()) + bytes_len(2, any);
    put_key(buf, field, LengthDelimited);
    varint(buf, kv as u64);
    put_bytes(buf, 1, key.as_bytes());
    put_key(buf, 2, LengthDelimited);
    varint(buf, any as u64);
    value.put(buf);
}

/// Appends field `field` holding the message `f` writes, with `room` bytes kept for its
/// length, which is known only after: a message whose length takes other than `room`
/// bytes moves (one under 128 bytes takes 1, one under 16 KiB 2).
fn put_message(buf: &mut Vec<u8>, field: u32, room: usize, f: impl FnOnce(&mut Vec<u8>)) {
    put_key(buf, field, LengthDelimited);
    let at = buf.len();
    buf.resize(at + room, 0);
    f(buf);
    let len = (buf.len() - at - room) as u64;
    let mut prefix = [0u8; 10];
    let n = {
        let mut p = &mut prefix[..];
        encode_varint(len, &mut p);
        10 - p.len()
    };
    if n < room {
        buf.copy_within(at + room.., at + n);
        buf.truncate(buf.len() - (room - n));
    } else if n > room {
        buf.splice(at..at, std::iter::repeat_n(0, n - room));
    }
    buf[at..at + n].copy_from_slice(&prefix[..n]);
}

/// One `ExportTraceServiceRequest`, encoded, with what it holds.
pub(crate) struct Chunk {
    pub body: Bytes,
    pub spans: u64,
    /// The operations whose spans it holds.
    pub ops: u64,
}

/// Builds `ExportTraceServiceRequest`s from operation span records.
#[derive(Clone)]
pub(crate) struct SpanEncoder {
    /// The `Resource` message, encoded once.
    resource: Vec<u8>,
    /// The `InstrumentationScope` message, encoded once.
    scope: Vec<u8>,
    /// `ScopeSpans.spans` fields written so far.
    spans: Vec<u8>,
    count: usize,
    ops: u64,
}

impl SpanEncoder {
    pub(crate) fn new(resource: &Resource, scope_name: &str, scope_version: &str) -> Self {
        let mut r = Vec::new();
        for (key, value) in resource.iter() {
            let text;
            let attr = match value {
                Value::Bool(b) => Attr::Bool(*b),
                Value::I64(i) => Attr::Int(*i),
                Value::F64(d) => Attr::Double(*d),
                other => {
                    text = other.as_str();
                    Attr::Str(&text)
                }
            };
            put_attr(&mut r, 1, key.as_str(), attr);
        }
        let mut scope = Vec::new();
        put_bytes(&mut scope, 1, scope_name.as_bytes());
        put_bytes(&mut scope, 2, scope_version.as_bytes());
        SpanEncoder {
            resource: r,
            scope,
            spans: Vec::new(),
            count: 0,
            ops: 0,
        }
    }

    /// Spans waiting in the request being built.
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends the spans of one operation.
    pub(crate) fn push(&mut self, rec: &OpSpans<'_>) {
        let mut id = uuid::Uuid::encode_buffer();
        let op_id = uuid::Uuid::from_u128(rec.op_id.0)
            .hyphenated()
            .encode_lower(&mut id);
        let failed = rec.status != OpStatus::Succeeded;
        let last = rec.spans.len().saturating_sub(1);
        for (i, s) in rec.spans.iter().enumerate() {
            let error = failed && (s.stage == Stage::Submit || i == last);
            // `op.submit` and `op.execute` carry the operation's attributes: over 127
            // bytes; the other spans are under.
            let room = if matches!(s.stage, Stage::Submit | Stage::Execute) {
                2
            } else {
                1
            };
            put_message(&mut self.spans, 2, room, |body| {
                encode_span(body, rec, s, op_id, error);
            });
            self.count += 1;
        }
        self.ops += 1;
    }

    /// The request holding every span pushed since the last call; the encoder is then
    /// empty.
    pub(crate) fn finish(&mut self) -> Chunk {
        let scope_spans = bytes_len(1, self.scope.len()) + self.spans.len();
        let resource_spans = bytes_len(1, self.resource.len()) + bytes_len(2, scope_spans);
        let mut out = Vec::with_capacity(bytes_len(1, resource_spans));
        put_key(&mut out, 1, LengthDelimited);
        varint(&mut out, resource_spans as u64);
        put_bytes(&mut out, 1, &self.resource);
        put_key(&mut out, 2, LengthDelimited);
        varint(&mut out, scope_spans as u64);
        put_bytes(&mut out, 1, &self.scope);
        out.put_slice(&self.spans);
        self.spans.clear();
        let chunk = Chunk {
            body: Bytes::from(out),
            spans: self.count as u64,
            ops: self.ops,
        };
        self.count = 0;
        self.ops = 0;
        chunk
    }
}

/// One `Span` message: the fields opmesh sets, in field order.
fn encode_span(buf: &mut Vec<u8>, rec: &OpSpans<'_>, s: &SpanRecord, op_id: &str, error: bool) {
    put_bytes(buf, 1, &rec.trace_id.to_be_bytes());
    put_bytes(buf, 2, &s.span_id.to_be_bytes());
    if s.parent_span_id != 0 {
        put_bytes(buf, 4, &s.parent_span_id.to_be_bytes());
    }
    put_bytes(buf, 5, s.stage.span_name().as_bytes());
    let kind = match s.stage {
        Stage::Submit => KIND_SERVER,
        Stage::Route if rec.target.is_some() => KIND_CLIENT,
        _ => KIND_INTERNAL,
    };
    put_key(buf, 6, Varint);
    varint(buf, kind);
    put_fixed64(buf, 7, s.start.unix_nanos());
    put_fixed64(buf, 8, s.end.unix_nanos());
    // Operation-wide attributes sit on the operation's two main spans (`op.submit` on
    // the node it was submitted to, `op.execute` on the one that ran it): a search by
    // `op.id` finds the trace, and the receiver does not store them five times. Which
    // node a span ran on is the resource's `service.instance.id`.
    match s.stage {
        Stage::Submit | Stage::Execute => {
            put_attr(buf, 9, "op.id", Attr::Str(op_id));
            put_attr(buf, 9, "op.type", Attr::Str(rec.op_type));
            put_attr(buf, 9, "op.outcome", Attr::Str(rec.status.as_str()));
            if s.stage == Stage::Execute {
                put_attr(buf, 9, "op.attempts", Attr::Int(i64::from(rec.attempts)));
            }
        }
        Stage::Route => {
            let target = rec.target.unwrap_or(rec.node);
            put_attr(buf, 9, "opmesh.node.target", Attr::Str(target));
        }
        Stage::Cache => {
            if let Some(v) = rec.cache {
                put_attr(buf, 9, "op.cache.result", Attr::Str(v.as_str()));
            }
        }
        Stage::Queue => {}
    }
    if s.stage == Stage::Execute {
        for e in rec.events {
            put_message(buf, 11, 1, |b| {
                put_fixed64(b, 1, e.at.unix_nanos());
                put_bytes(b, 2, e.name.as_bytes());
                put_attr(b, 3, "op.attempt", Attr::Int(i64::from(e.attempt)));
                put_attr(b, 3, "error.message", Attr::Str(&e.message));
            });
        }
    }
    if error {
        let message = rec.error.unwrap_or(rec.status.as_str());
        put_message(buf, 15, 1, |b| {
            put_bytes(b, 2, message.as_bytes());
            put_key(b, 3, Varint);
            varint(b, STATUS_ERROR);
        });
    }
    // Exported spans are marked sampled: a failed operation kept despite sampling is
    // still a span the receiver should show.
    let mut flags = FLAG_SAMPLED | FLAG_HAS_IS_REMOTE;
    if s.parent_is_remote {
        flags |= FLAG_IS_REMOTE;
    }
    put_key(buf, 16, ThirtyTwoBit);
    buf.extend_from_slice(&flags.to_le_bytes());
}

/// The gRPC method OTLP trace requests are sent to.
const GRPC_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// A request already encoded: sent as is; the answer is not read (an
/// `ExportTraceServiceResponse` only reports partial rejections).
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = ();
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<()>, tonic::Status> {
        use bytes::Buf;
        let n = src.remaining();
        src.advance(n);
        Ok(Some(()))
    }
}

/// Sends encoded requests to the receiver.
#[derive(Clone)]
pub(crate) enum Sender {
    Grpc {
        client: tonic::client::Grpc<tonic::transport::Channel>,
        headers: Vec<(String, String)>,
    },
    Http {
        client: reqwest::Client,
        url: String,
        headers: Vec<(String, String)>,
    },
}

impl Sender {
    /// A gRPC sender to `endpoint` (`http://host:port`). Must be called inside a tokio
    /// runtime; connects on first use.
    pub(crate) fn grpc(
        endpoint: &str,
        timeout: std::time::Duration,
        headers: Vec<(String, String)>,
    ) -> Result<Sender, String> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
            .map_err(|e| format!("not a gRPC endpoint URL: {e}"))?
            .timeout(timeout)
            .connect_lazy();
        Ok(Sender::Grpc {
            client: tonic::client::Grpc::new(channel),
            headers,
        })
    }

    /// An http/protobuf sender posting to `url` (the full `/v1/traces` URL).
    pub(crate) fn http(
        url: String,
        timeout: std::time::Duration,
        headers: Vec<(String, String)>,
    ) -> Result<Sender, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Sender::Http {
            client,
            url,
            headers,
        })
    }

    /// Sends one request; `Err` says why it was not accepted.
    pub(crate) async fn send(&self, body: Bytes) -> Result<(), String> {
        match self {
            Sender::Grpc { client, headers } => {
                let mut client = client.clone();
                client
                    .ready()
                    .await
                    .map_err(|e| format!("receiver not reachable: {e}"))?;
                let mut request = tonic::Request::new(body);
                for (k, v) in headers {
                    if let (Ok(k), Ok(v)) = (
                        tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
                        tonic::metadata::MetadataValue::try_from(v.as_str()),
                    ) {
                        request.metadata_mut().insert(k, v);
                    }
                }
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(GRPC_EXPORT);
                client
                    .unary::<_, (), _>(request, path, RawCodec)
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("receiver answered {:?}: {}", s.code(), s.message()))
            }
            Sender::Http {
                client,
                url,
                headers,
            } => {
                let mut request = client
                    .post(url)
                    .header("content-type", "application/x-protobuf")
                    .body(body);
                for (k, v) in headers {
                    request = request.header(k, v);
                }
                let response = request.send().await.map_err(|e| e.to_string())?;
                let status = response.status();
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("receiver answered HTTP {status}"))
                }
            }
        }
    }
}

/// `OTEL_EXPORTER_OTLP_TRACES_HEADERS` (or `OTEL_EXPORTER_OTLP_HEADERS`):
/// `key1=value1,key2=value2`, values URL-decoded. Malformed pairs are skipped.
pub(crate) fn env_headers() -> Vec<(String, String)> {
    let text = std::env::var("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_HEADERS"))
        .unwrap_or_default();
    parse_headers(&text)
}

fn parse_headers(text: &str) -> Vec<(String, String)> {
    text.split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            let k = k.trim();
            (!k.is_empty()).then(|| (k.to_ascii_lowercase(), percent_decode(v.trim())))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use opentelemetry::KeyValue;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
    use opmesh_actors::trace::{span_id, CacheVerdict, SpanEvent, Stamp};
    use opmesh_actors::OpId;
    use prost::Message;

    /// One operation's four spans (submit, route, cache, execute), for tests here and
    /// in `telemetry`.
    pub(crate) fn four_spans() -> Vec<SpanRecord> {
        let base = 0x1234_5678_9abc_def0;
        let t0 = Stamp::now();
        [Stage::Submit, Stage::Route, Stage::Cache, Stage::Execute]
            .iter()
            .enumerate()
            .map(|(i, &stage)| SpanRecord {
                stage,
                span_id: span_id(base, stage),
                parent_span_id: if i == 0 {
                    0xfeed
                } else {
                    span_id(base, Stage::Submit)
                },
                parent_is_remote: i == 0,
                start: t0,
                end: Stamp::now(),
            })
            .collect()
    }

    /// An operation's record holding `spans` and `events`.
    pub(crate) fn record<'a>(
        status: OpStatus,
        spans: &'a [SpanRecord],
        events: &'a [SpanEvent],
    ) -> OpSpans<'a> {
        OpSpans {
            trace_id: 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
            sampled: true,
            op_id: OpId(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
            op_type: "echo",
            node: "node-a",
            target: Some("node-b"),
            status,
            error: (status != OpStatus::Succeeded).then_some("handler said no"),
            cache: Some(CacheVerdict::Miss),
            attempts: 2,
            spans,
            events,
        }
    }

    fn attr(kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str) -> Option<Any> {
        kvs.iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.clone()?.value)
    }

    fn encoder() -> SpanEncoder {
        let resource = Resource::builder()
            .with_service_name("opmesh-test")
            .with_attributes([
                KeyValue::new("service.instance.id", "node-a"),
                KeyValue::new("answer", 42),
                KeyValue::new("flag", true),
                KeyValue::new("ratio", 0.5),
            ])
            .build();
        SpanEncoder::new(&resource, "opmesh", "1.2.3")
    }

    #[test]
    fn requests_decode_as_otlp_with_every_field() {
        let mut enc = encoder();
        let spans = four_spans();
        let events = [SpanEvent {
            at: Stamp::now(),
            name: "retry",
            attempt: 1,
            message: "first try failed".into(),
        }];
        let rec = record(OpStatus::Failed, &spans, &events);
        enc.push(&rec);
        enc.push(&record(OpStatus::Succeeded, &spans, &[]));
        assert_eq!(enc.len(), 8);
        let chunk = enc.finish();
        assert_eq!((chunk.spans, chunk.ops), (8, 2));
        let req = ExportTraceServiceRequest::decode(chunk.body).expect("valid protobuf");
        assert!(enc.is_empty());
        assert_eq!(req.resource_spans.len(), 1);
        let rs = &req.resource_spans[0];
        let res = &rs.resource.as_ref().unwrap().attributes;
        assert_eq!(
            attr(res, "service.name"),
            Some(Any::StringValue("opmesh-test".into()))
        );
        assert_eq!(
            attr(res, "service.instance.id"),
            Some(Any::StringValue("node-a".into()))
        );
        assert_eq!(attr(res, "answer"), Some(Any::IntValue(42)));
        assert_eq!(attr(res, "flag"), Some(Any::BoolValue(true)));
        assert_eq!(attr(res, "ratio"), Some(Any::DoubleValue(0.5)));
        let ss = &rs.scope_spans[0];
        let scope = ss.scope.as_ref().unwrap();
        assert_eq!(
            (scope.name.as_str(), scope.version.as_str()),
            ("opmesh", "1.2.3")
        );
        assert_eq!(ss.spans.len(), 8);

        let failed = &ss.spans[..4];
        let submit = &failed[0];
        assert_eq!(submit.trace_id, rec.trace_id.to_be_bytes());
        assert_eq!(submit.span_id, rec.spans[0].span_id.to_be_bytes());
        assert_eq!(submit.parent_span_id, 0xfeed_u64.to_be_bytes());
        assert_eq!(submit.name, "op.submit");
        assert_eq!(submit.kind, KIND_SERVER as i32);
        assert_eq!(
            submit.flags,
            FLAG_SAMPLED | FLAG_HAS_IS_REMOTE | FLAG_IS_REMOTE
        );
        let start = rec.spans[0].start.to_system();
        let nanos = start
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        assert_eq!(submit.start_time_unix_nano, nanos);
        assert!(submit.end_time_unix_nano >= submit.start_time_unix_nano);
        let id = "01234567-89ab-cdef-0123-456789abcdef";
        assert_eq!(
            attr(&submit.attributes, "op.id"),
            Some(Any::StringValue(id.into()))
        );
        assert_eq!(
            attr(&submit.attributes, "op.type"),
            Some(Any::StringValue("echo".into()))
        );
        assert_eq!(attr(&submit.attributes, "op.attempts"), None);
        assert_eq!(
            attr(&submit.attributes, "op.outcome"),
            Some(Any::StringValue("failed".into()))
        );
        let status = submit.status.as_ref().unwrap();
        assert_eq!(
            (status.code, status.message.as_str()),
            (2, "handler said no")
        );

        let route = &failed[1];
        assert_eq!(route.kind, KIND_CLIENT as i32);
        assert_eq!(route.parent_span_id, rec.spans[0].span_id.to_be_bytes());
        assert_eq!(route.flags, FLAG_SAMPLED | FLAG_HAS_IS_REMOTE);
        assert_eq!(
            attr(&route.attributes, "opmesh.node.target"),
            Some(Any::StringValue("node-b".into()))
        );
        assert!(
            route.status.is_none(),
            "only the root and the last span carry the error"
        );
        assert_eq!(
            attr(&route.attributes, "op.id"),
            None,
            "on submit and execute only"
        );
        let cache = &failed[2];
        assert_eq!(
            attr(&cache.attributes, "op.cache.result"),
            Some(Any::StringValue("miss".into()))
        );
        let execute = &failed[3];
        assert_eq!(execute.status.as_ref().unwrap().code, 2);
        assert_eq!(
            attr(&execute.attributes, "op.id"),
            Some(Any::StringValue(id.into()))
        );
        assert_eq!(
            attr(&execute.attributes, "op.attempts"),
            Some(Any::IntValue(2))
        );
        assert_eq!(execute.events.len(), 1);
        let retry = &execute.events[0];
        assert_eq!(retry.name, "retry");
        assert_eq!(
            attr(&retry.attributes, "op.attempt"),
            Some(Any::IntValue(1))
        );
        assert_eq!(
            attr(&retry.attributes, "error.message"),
            Some(Any::StringValue("first try failed".into()))
        );
        assert!(ss.spans[4..].iter().all(|s| s.status.is_none()));
    }

    #[test]
    fn a_message_of_any_length_gets_its_exact_length() {
        for (n, room) in [0, 1, 127, 128, 300, 16_383, 16_384, 100_000]
            .into_iter()
            .flat_map(|n| [(n, 1), (n, 2), (n, 3)])
        {
            let mut buf = vec![0xaa];
            put_message(&mut buf, 2, room, |b| b.extend(std::iter::repeat_n(7u8, n)));
            let mut rest = &buf[1..];
            let (field, wire) = prost::encoding::decode_key(&mut rest).unwrap();
            assert_eq!((field, wire), (2, LengthDelimited));
            let len = prost::encoding::decode_varint(&mut rest).unwrap();
            assert_eq!(len as usize, n, "length of a {n}-byte message");
            assert_eq!(rest.len(), n, "{n}: nothing before or after the body");
            assert!(rest.iter().all(|&b| b == 7));
            // The shortest encoding of the length, as protobuf writes it.
            assert_eq!(buf.len(), 1 + 1 + encoded_len_varint(n as u64) + n);
        }
    }

    #[test]
    fn an_empty_request_is_still_valid() {
        let req = ExportTraceServiceRequest::decode(encoder().finish().body).unwrap();
        assert!(req.resource_spans[0].scope_spans[0].spans.is_empty());
    }

    #[test]
    fn headers_parse_like_the_otel_variable() {
        assert_eq!(
            parse_headers("Authorization=Bearer%20abc, x-tenant = t1 ,broken,=v"),
            vec![
                ("authorization".to_string(), "Bearer abc".to_string()),
                ("x-tenant".to_string(), "t1".to_string()),
            ]
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert!(parse_headers("").is_empty());
    }
}
