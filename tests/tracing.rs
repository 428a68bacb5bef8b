//! Traces, received for real: an OTLP receiver runs in the test process (the
//! collector's generated tonic server for gRPC, an actix route for http/protobuf) and
//! real `opmesh` processes export to it.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{client, free_port, get_json, wait_until, Server};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use parking_lot::Mutex;
use serde_json::{json, Value};

const SECRET: &str = "a-test-secret-of-enough-length";

/// One span as received, with its resource's attributes.
#[derive(Clone, Debug)]
struct Got {
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: HashMap<String, String>,
    resource: HashMap<String, String>,
    error: Option<String>,
    events: Vec<String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => s.clone(),
                Some(AnyValue::IntValue(i)) => i.to_string(),
                Some(AnyValue::BoolValue(b)) => b.to_string(),
                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Got>>>);

impl Received {
    fn add(&self, req: ExportTraceServiceRequest) {
        let mut all = self.0.lock();
        for rs in req.resource_spans {
            let resource = rs
                .resource
                .as_ref()
                .map(|r| attrs(&r.attributes))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let error = s
                        .status
                        .as_ref()
                        .filter(|st| st.code == 2)
                        .map(|st| st.message.clone());
                    all.push(Got {
                        name: s.name.clone(),
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent: hex(&s.parent_span_id),
                        attrs: attrs(&s.attributes),
                        resource: resource.clone(),
                        error,
                        events: s.events.iter().map(|e| e.name.clone()).collect(),
                    });
                }
            }
        }
    }

    fn of_trace(&self, trace_id: &str) -> Vec<Got> {
        self.0
            .lock()
            .iter()
            .filter(|g| g.trace_id == trace_id)
            .cloned()
            .collect()
    }

    fn len(&self) -> usize {
        self.0.lock().len()
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts a gRPC OTLP receiver on a free loopback port.
async fn grpc_receiver() -> (Received, SocketAddr) {
    let received = Received::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = TraceServiceServer::new(received.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (received, addr)
}

/// Starts an http/protobuf OTLP receiver (`POST /v1/traces`) on a free loopback port,
/// taking requests that carry `x-receiver-key: key 1`, with a `POST /hook` that answers
/// `{}` and keeps the `traceparent` it was sent.
fn http_receiver() -> (Received, Arc<Mutex<Vec<String>>>, SocketAddr) {
    use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
    use prost::Message;
    let received = Received::default();
    let hooks = Arc::new(Mutex::new(Vec::new()));
    let r = received.clone();
    let h = hooks.clone();
    let server = HttpServer::new(move || {
        let r = r.clone();
        let h = h.clone();
        App::new()
            .route(
                "/hook",
                web::post().to(move |req: HttpRequest| {
                    let h = h.clone();
                    async move {
                        let tp = req
                            .headers()
                            .get("traceparent")
                            .map(|v| v.to_str().unwrap_or("").to_string());
                        h.lock().push(tp.unwrap_or_default());
                        HttpResponse::Ok().json(json!({}))
                    }
                }),
            )
            .route(
                "/v1/traces",
                web::post().to(move |req: HttpRequest, body: web::Bytes| {
                    let r = r.clone();
                    async move {
                        // The key OTEL_EXPORTER_OTLP_HEADERS gives the test's nodes.
                        if req
                            .headers()
                            .get("x-receiver-key")
                            .and_then(|v| v.to_str().ok())
                            != Some("key 1")
                        {
                            return HttpResponse::Unauthorized().body("x-receiver-key");
                        }
                        match ExportTraceServiceRequest::decode(body) {
                            Ok(req) => {
                                r.add(req);
                                HttpResponse::Ok()
                                    .content_type("application/x-protobuf")
                                    .body(ExportTraceServiceResponse::default().encode_to_vec())
                            }
                            Err(e) => HttpResponse::BadRequest().body(e.to_string()),
                        }
                    }
                }),
            )
    })
    .workers(1)
    .disable_signals()
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.addrs()[0];
    tokio::spawn(server.run());
    (received, hooks, addr)
}

/// Trace export settings for a node: fast batches to `endpoint`.
fn otel_env(endpoint: &str, extra: &[(&'static str, &'static str)]) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
            endpoint.to_string(),
        ),
        ("OPMESH_TELEMETRY__EXPORT_INTERVAL_MS".into(), "50".into()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

fn start(args: &[String], env: &[(String, String)]) -> Server {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Server::start(&args, &env)
}

async fn post(s: &Server, path: &str, body: Value, traceparent: Option<&str>) -> (Value, String) {
    let mut req = client().post(s.url(path)).json(&body);
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let r = req.send().await.unwrap();
    let tp = r
        .headers()
        .get("traceparent")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (r.json().await.unwrap(), tp)
}

async fn wait_for_spans(received: &Received, trace_id: &str, names: &[&str]) -> Vec<Got> {
    wait_until(
        &format!("spans {names:?} of trace {trace_id}"),
        Duration::from_secs(20),
        || async {
            let got = received.of_trace(trace_id);
            names.iter().all(|n| got.iter().any(|g| g.name == *n))
        },
    )
    .await;
    received.of_trace(trace_id)
}

fn one<'a>(spans: &'a [Got], name: &str) -> &'a Got {
    let found: Vec<&Got> = spans.iter().filter(|g| g.name == name).collect();
    assert_eq!(found.len(), 1, "one {name} span: {spans:#?}");
    found[0]
}

#[tokio::test]
async fn one_operation_across_two_nodes_is_one_trace() {
    let (received, addr) = grpc_receiver().await;
    let endpoint = format!("http://{addr}");
    let ports = [free_port(), free_port()];
    let mut nodes = Vec::new();
    for (i, name) in ["node-1", "node-2"].iter().enumerate() {
        let mut args = vec![
            "--node-id".to_string(),
            name.to_string(),
            "--cluster-addr".into(),
            format!("127.0.0.1:{}", ports[i]),
            "--ephemeral".into(),
        ];
        if i > 0 {
            args.extend(["--join".into(), format!("127.0.0.1:{}", ports[0])]);
        }
        let mut env = otel_env(&endpoint, &[]);
        env.push(("OPMESH_CLUSTER_SECRET".into(), SECRET.into()));
        nodes.push(start(&args, &env));
    }
    let c = client();
    for s in &nodes {
        wait_until("two nodes up", Duration::from_secs(20), || async {
            let Ok(r) = c.get(s.url("/v1/cluster")).send().await else {
                return false;
            };
            let v: Value = r.json().await.unwrap_or_default();
            v["nodes"]
                .as_array()
                .is_some_and(|a| a.iter().filter(|n| n["status"] == "up").count() == 2)
        })
        .await;
    }
    let r = c
        .put(nodes[0].url("/v1/routes/echo"))
        .json(&json!({"strategy": "pinned", "nodes": ["node-2"]}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text().await);

    // The caller's own span is the parent of the operation's first span.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let parent = format!("00-{caller_trace}-{caller_span}-01");
    let (answer, tp) = post(
        &nodes[0],
        "/v1/ops?wait=true",
        json!({"type": "echo", "payload": {"n": 1}}),
        Some(&parent),
    )
    .await;
    assert_eq!(answer["status"], "succeeded", "{answer}");
    assert_eq!(answer["executed_by"], "node-2", "{answer}");
    assert_eq!(answer["trace_id"], caller_trace);
    let op_id = answer["id"].as_str().unwrap().to_string();

    let spans = wait_for_spans(
        &received,
        caller_trace,
        &["op.submit", "op.route", "op.queue", "op.execute"],
    )
    .await;
    let submit = one(&spans, "op.submit");
    let route = one(&spans, "op.route");
    let queue = one(&spans, "op.queue");
    let exec = one(&spans, "op.execute");
    // Where each ran.
    assert_eq!(submit.resource["service.instance.id"], "node-1");
    assert_eq!(route.resource["service.instance.id"], "node-1");
    assert_eq!(queue.resource["service.instance.id"], "node-2");
    assert_eq!(exec.resource["service.instance.id"], "node-2");
    assert_eq!(submit.resource["service.name"], "opmesh");
    // The chain of parents: caller → submit → route (node-1) → queue, execute (node-2).
    assert_eq!(submit.parent, caller_span);
    assert_eq!(route.parent, submit.span_id);
    assert_eq!(queue.parent, route.span_id);
    assert_eq!(exec.parent, route.span_id);
    // The answer's traceparent names the operation's submit span.
    assert_eq!(tp, format!("00-{caller_trace}-{}-01", submit.span_id));
    // The operation's attributes on its two main spans, one on each node.
    for s in [submit, exec] {
        assert_eq!(s.attrs["op.id"], op_id, "{s:?}");
        assert_eq!(s.attrs["op.type"], "echo", "{s:?}");
        assert_eq!(s.attrs["op.outcome"], "succeeded", "{s:?}");
    }
    for s in [submit, route, queue, exec] {
        assert!(s.error.is_none(), "{s:?}");
    }
    assert_eq!(route.attrs["opmesh.node.target"], "node-2");
    assert_eq!(exec.attrs["op.attempts"], "1");
}

/// The names of the process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

#[tokio::test]
async fn several_exporters_deliver_every_span_and_account_for_each() {
    let (received, addr) = grpc_receiver().await;
    // Requests of 64 spans: the threads that finish operations hand full ones to their
    // exporter, and the exporters sweep up what is left in the encoders.
    let env = otel_env(
        &format!("http://{addr}"),
        &[
            ("OPMESH_TELEMETRY__EXPORTERS", "3"),
            ("OPMESH_TELEMETRY__BATCH_SPANS", "64"),
        ],
    );
    let s = start(&[], &env);
    let mut exporters: Vec<String> = thread_names(s.pid())
        .into_iter()
        .filter(|n| n.starts_with("opmesh-otlp"))
        .collect();
    exporters.sort();
    assert_eq!(
        exporters,
        ["opmesh-otlp-0", "opmesh-otlp-1", "opmesh-otlp-2"]
    );
    // Batches at once, so that the operations finish on every worker thread.
    let batches = (0..8).map(|b| {
        let ops: Vec<Value> = (0..250)
            .map(|i| json!({"type": "echo", "payload": b * 1000 + i}))
            .collect();
        post(&s, "/v1/ops/batch?wait=true", json!({"ops": ops}), None)
    });
    let mut traces = std::collections::HashSet::new();
    for (answer, _) in futures::future::join_all(batches).await {
        for r in answer["results"].as_array().unwrap() {
            assert_eq!(r["status"], "succeeded", "{r}");
            traces.insert(r["trace_id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(traces.len(), 2000);
    // Three spans per local operation, each received once, and counted exported once
    // its request is answered.
    wait_until(
        "every span received and counted",
        Duration::from_secs(30),
        || async {
            let m: Value = get_json(&s.url("/v1/metrics")).await;
            received.len() >= 2000 * 3 && m["telemetry"]["spans_pending"] == 0
        },
    )
    .await;
    let m: Value = get_json(&s.url("/v1/metrics")).await;
    let t = &m["telemetry"];
    assert_eq!(t["exporters"], 3, "{t}");
    assert_eq!(t["spans_recorded"], 6000, "{t}");
    assert_eq!(t["spans_exported"], 6000, "{t}");
    assert_eq!(t["spans_dropped"], 0, "{t}");
    assert_eq!(received.len(), 6000);
    let spans = received.0.lock();
    let got: std::collections::HashSet<&str> = spans.iter().map(|g| g.trace_id.as_str()).collect();
    assert_eq!(got.len(), 2000);
    assert!(got.iter().all(|t| traces.contains(*t)));
}

#[tokio::test]
async fn failures_are_exported_at_sampling_ratio_zero() {
    let (received, addr) = grpc_receiver().await;
    let env = otel_env(
        &format!("http://{addr}"),
        &[
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0"),
        ],
    );
    let s = start(&[], &env);
    // A success first: sampled out, it must never arrive.
    let (ok, tp) = post(&s, "/v1/ops?wait=true", json!({"type": "echo"}), None).await;
    assert_eq!(ok["status"], "succeeded");
    assert!(tp.ends_with("-00"), "not sampled: {tp}");
    let (failed, _) = post(
        &s,
        "/v1/ops?wait=true",
        json!({"type": "resize", "payload": {"width": -1}}),
        None,
    )
    .await;
    assert_eq!(failed["status"], "failed", "{failed}");
    let trace_id = failed["trace_id"].as_str().unwrap();
    let spans = wait_for_spans(&received, trace_id, &["op.submit", "op.execute"]).await;
    let exec = one(&spans, "op.execute");
    let error = exec
        .error
        .as_deref()
        .expect("op.execute has an error status");
    assert_eq!(Some(error), failed["error"].as_str());
    assert!(one(&spans, "op.submit").error.is_some());
    // Spans go out in the order operations finished: the success would be here by now.
    assert!(received
        .of_trace(ok["trace_id"].as_str().unwrap())
        .is_empty());
}

#[tokio::test]
async fn http_protobuf_export_cache_verdicts_retries_and_propagation() {
    let (received, hooks, addr) = http_receiver();
    let env = otel_env(
        &format!("http://{addr}"),
        &[
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "X-Receiver-Key=key%201"),
        ],
    );
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        format!(
            "[[handlers.http]]\ntype = \"hook\"\nurl = \"http://{addr}/hook\"\ntimeout_ms = 5000\n\n\
             [[handlers.http]]\ntype = \"dead\"\nurl = \"http://127.0.0.1:{}/\"\ntimeout_ms = 5000\n\
             max_attempts = 3\ninitial_backoff_ms = 1\nmax_backoff_ms = 5\n",
            free_port()
        ),
    )
    .unwrap();
    let s = start(
        &["--config".into(), config.path().display().to_string()],
        &env,
    );
    let (answer, _) = post(
        &s,
        "/v1/ops?wait=true",
        json!({"type": "echo", "idempotency_key": "k-1"}),
        None,
    )
    .await;
    assert_eq!(answer["status"], "succeeded");
    let trace_id = answer["trace_id"].as_str().unwrap();
    let spans = wait_for_spans(
        &received,
        trace_id,
        &["op.submit", "op.cache", "op.queue", "op.execute"],
    )
    .await;
    // A local route is no span of its own: its time rides on op.submit.
    assert!(
        spans.iter().all(|s| s.name != "op.route"),
        "a local operation has no op.route span: {:?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    assert_eq!(one(&spans, "op.cache").attrs["op.cache.result"], "miss");
    // The same key again: answered by the cache, no execution.
    let (again, _) = post(
        &s,
        "/v1/ops?wait=true",
        json!({"type": "echo", "idempotency_key": "k-1"}),
        None,
    )
    .await;
    assert_eq!(again["cached"], true);
    let spans = wait_for_spans(
        &received,
        again["trace_id"].as_str().unwrap(),
        &["op.submit", "op.cache"],
    )
    .await;
    assert_eq!(one(&spans, "op.cache").attrs["op.cache.result"], "hit");
    assert!(spans.iter().all(|g| g.name != "op.execute"));

    // An HTTP handler passes the operation's context on: the target's parent is
    // op.execute.
    let (hooked, _) = post(&s, "/v1/ops?wait=true", json!({"type": "hook"}), None).await;
    assert_eq!(hooked["status"], "succeeded", "{hooked}");
    let trace_id = hooked["trace_id"].as_str().unwrap();
    let spans = wait_for_spans(&received, trace_id, &["op.execute"]).await;
    let exec = one(&spans, "op.execute");
    assert_eq!(
        hooks.lock().last().cloned().unwrap_or_default(),
        format!("00-{trace_id}-{}-01", exec.span_id)
    );

    // Retries are events on op.execute; the failure is its status.
    let (dead, _) = post(&s, "/v1/ops?wait=true", json!({"type": "dead"}), None).await;
    assert_eq!(dead["status"], "failed", "{dead}");
    assert_eq!(dead["attempts"], 3);
    let spans = wait_for_spans(
        &received,
        dead["trace_id"].as_str().unwrap(),
        &["op.execute"],
    )
    .await;
    let exec = one(&spans, "op.execute");
    assert_eq!(exec.events, vec!["retry", "retry"], "{exec:?}");
    assert!(
        exec.error
            .as_deref()
            .is_some_and(|e| e.contains("after 3 attempts")),
        "{exec:?}"
    );
}

#[tokio::test]
async fn an_unreachable_receiver_never_fails_operations_and_drops_are_counted() {
    // Nothing listens there; the queue holds 10 operations' spans.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let env = otel_env(
        &dead,
        &[
            ("OPMESH_TELEMETRY__QUEUE_OPS", "10"),
            ("OPMESH_TELEMETRY__EXPORT_TIMEOUT_MS", "500"),
        ],
    );
    let s = start(&[], &env);
    let ops: Vec<Value> = (0..2000)
        .map(|i| json!({"type": "echo", "payload": i}))
        .collect();
    let (answer, _) = post(&s, "/v1/ops/batch?wait=true", json!({"ops": ops}), None).await;
    let results = answer["results"].as_array().unwrap();
    assert_eq!(results.len(), 2000);
    assert!(results.iter().all(|r| r["status"] == "succeeded"));
    wait_until("dropped spans counted", Duration::from_secs(20), || async {
        let m: Value = get_json(&s.url("/v1/metrics")).await;
        m["telemetry"]["spans_dropped"].as_u64().unwrap_or(0) >= 2000 * 3
            && m["telemetry"]["export_failures"].as_u64().unwrap_or(0) >= 1
            && m["telemetry"]["spans_exported"] == 0
    })
    .await;
}

#[tokio::test]
async fn a_malformed_traceparent_starts_a_new_trace_and_is_counted() {
    let (received, addr) = grpc_receiver().await;
    let s = start(&[], &otel_env(&format!("http://{addr}"), &[]));
    let (answer, tp) = post(
        &s,
        "/v1/ops?wait=true",
        json!({"type": "echo"}),
        Some("00-not-a-trace-01"),
    )
    .await;
    assert_eq!(answer["status"], "succeeded");
    let trace_id = answer["trace_id"].as_str().unwrap();
    assert_eq!(trace_id.len(), 32);
    assert!(tp.starts_with(&format!("00-{trace_id}-")), "{tp}");
    let spans = wait_for_spans(&received, trace_id, &["op.submit"]).await;
    assert_eq!(one(&spans, "op.submit").parent, "", "a root span");
    let m: Value = get_json(&s.url("/v1/metrics")).await;
    assert_eq!(m["telemetry"]["traceparent_invalid"], 1);
    // op.submit, op.queue and op.execute (a local route is part of op.submit).
    assert!(received.len() >= 3);
}
