//! Probes and figures: `GET /healthz` (alive), `GET /readyz` (ready: accepting and, in a
//! cluster, a member), `GET /v1/health` and `GET /v1/metrics` (JSON), `GET /metrics`
//! (OpenMetrics, see `observability/`), and `POST /v1/bench/hello`, the baseline route
//! the HTTP bench compares the engine's cost with.

use actix_web::{web, HttpResponse};
use serde::Serialize;

use super::errors::{read_body, ApiError};
use super::AppState;

/// Node health and headline figures.
#[utoipa::path(get, path = "/v1/health", responses((status = 200, description = "node health")))]
pub(super) async fn health(st: web::Data<AppState>) -> HttpResponse {
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
pub(super) async fn metrics(st: web::Data<AppState>) -> HttpResponse {
    #[derive(Serialize)]
    struct Answer {
        #[serde(flatten)]
        node: opmesh_actors::NodeStats,
        /// The trace pipeline: spans exported and dropped, malformed `traceparent`s.
        telemetry: crate::telemetry::TelemetryStats,
        /// Submissions the api's limits refused, by limit (`[limits]`).
        limits: super::limits::AdmissionStats,
        /// The journal of accepted operations, when `engine.journal` is on.
        #[serde(skip_serializing_if = "Option::is_none")]
        journal: Option<crate::journal::JournalFigures>,
    }
    HttpResponse::Ok().json(Answer {
        node: st.node.stats(),
        telemetry: st.telemetry.stats(),
        limits: st.admission.stats(),
        journal: st.journal.as_ref().map(|j| j.stats().figures()),
    })
}

/// Node metrics in the Prometheus / OpenMetrics text format (see `observability/`).
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "OpenMetrics text")))]
pub(super) async fn prometheus_metrics(st: web::Data<AppState>) -> HttpResponse {
    let body = crate::metrics::render(
        &st.node,
        st.cluster.as_ref(),
        &st.telemetry,
        Some(&st.traffic),
        Some(&st.admission.stats()),
        st.journal.as_ref().map(|j| j.stats()),
    )
    .await;
    HttpResponse::Ok()
        .content_type(crate::metrics::CONTENT_TYPE)
        .body(body)
}

/// Liveness: the process serves requests.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "alive")))]
pub(super) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: the node accepts operations (503 while draining).
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "ready"), (status = 503, description = "draining")))]
pub(super) async fn readyz(st: web::Data<AppState>) -> HttpResponse {
    if !st.node.is_accepting() {
        HttpResponse::ServiceUnavailable().json(serde_json::json!({ "status": "draining" }))
    } else if st.cluster.as_ref().is_some_and(|c| !c.is_ready()) {
        HttpResponse::ServiceUnavailable().json(serde_json::json!({ "status": "joining" }))
    } else {
        HttpResponse::Ok().json(serde_json::json!({ "status": "ready" }))
    }
}

/// A plain route that does no work, to compare the engine's cost with actix-web's own.
#[utoipa::path(post, path = "/v1/bench/hello", responses((status = 200, description = "hello")))]
pub(super) async fn hello(
    st: web::Data<AppState>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    // The body is read, as the real routes do: an unread body makes actix close the
    // connection after the answer, and the baseline would measure reconnects.
    read_body(body, st.max_body_bytes).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "hello": "world" })))
}
