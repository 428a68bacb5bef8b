//! The routing table over HTTP: `GET /v1/routes`, `GET|PUT|DELETE /v1/routes/{type}`.
//! Writes go through the node (to the Raft leader in a cluster) and answer the version
//! they produced; each is recorded with the caller's token name in the audit trail,
//! `GET /v1/audit`.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use opmesh_actors::{Route, RouteError, Strategy};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Caller;
use super::errors::{parse, read_body, ApiError, ErrorBody};
use super::model::{RouteAnswer, RouteRequest, RouteView, RoutesAnswer};
use super::AppState;

/// The routing table.
#[utoipa::path(get, path = "/v1/routes", responses((status = 200, body = RoutesAnswer)))]
pub(super) async fn list_routes(st: web::Data<AppState>) -> HttpResponse {
    let t = st.node.routes();
    HttpResponse::Ok().json(RoutesAnswer {
        routes: t
            .routes
            .iter()
            .map(|(k, r)| (k.to_string(), RouteView::of(r)))
            .collect(),
        version: t.version,
    })
}

/// The route of one type.
#[utoipa::path(get, path = "/v1/routes/{type}", params(("type" = String, Path)),
    responses((status = 200, body = RouteAnswer), (status = 404, body = ErrorBody)))]
pub(super) async fn get_route(
    st: web::Data<AppState>,
    ty: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let t = st.node.routes();
    let r = t
        .routes
        .get(ty.as_str())
        .ok_or_else(|| ApiError::from(RouteError::NotFound(ty.to_string())))?;
    Ok(HttpResponse::Ok().json(RouteAnswer {
        op_type: ty.to_string(),
        route: RouteView::of(r),
        version: t.version,
    }))
}

/// Sets the route of one type.
#[utoipa::path(put, path = "/v1/routes/{type}", params(("type" = String, Path)), request_body = RouteRequest,
    responses((status = 200, body = RouteAnswer), (status = 400, body = ErrorBody),
        (status = 404, description = "no node serves the type (`no_route`; the message lists the served types)", body = ErrorBody),
        (status = 409, description = "names a node the cluster does not have (`unknown_node`), or the table holds `cluster.max_routes` routes and this type has none (`too_many_routes`)", body = ErrorBody),
        (status = 503, description = "the cluster could not commit it in time", body = ErrorBody)))]
pub(super) async fn put_route(
    st: web::Data<AppState>,
    req: HttpRequest,
    ty: web::Path<String>,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let bytes = read_body(body, st.max_body_bytes).await?;
    let r: RouteRequest = parse(&bytes, "request body")?;
    let strategy = Strategy::parse(&r.strategy).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_field",
            format!(
                "field `strategy` is `{}`; allowed: round_robin, least_loaded, consistent_hash, pinned",
                r.strategy
            ),
        )
    })?;
    let route = Route {
        strategy,
        nodes: r
            .nodes
            .unwrap_or_default()
            .into_iter()
            .map(Into::into)
            .collect(),
    };
    let by = Caller::of(&req);
    let version = st.node.set_route_as(&ty, route.clone(), by.by()).await?;
    Ok(HttpResponse::Ok().json(RouteAnswer {
        op_type: ty.to_string(),
        route: RouteView::of(&route),
        version,
    }))
}

/// Removes the route of one type (it goes back to every node that serves it).
#[utoipa::path(delete, path = "/v1/routes/{type}", params(("type" = String, Path)),
    responses((status = 200, description = "removed; answers the new version"), (status = 404, body = ErrorBody)))]
pub(super) async fn delete_route(
    st: web::Data<AppState>,
    req: HttpRequest,
    ty: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let version = st.node.remove_route_as(&ty, Caller::of(&req).by()).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "type": ty.as_str(), "version": version })))
}

/// The most entries `GET /v1/audit` answers at once.
pub const MAX_AUDIT_LIMIT: usize = 10_000;
const DEFAULT_AUDIT_LIMIT: usize = 100;

#[derive(Deserialize)]
pub(super) struct AuditQuery {
    limit: Option<String>,
}

/// One change, as `GET /v1/audit` lists it.
#[derive(Serialize, ToSchema)]
pub struct AuditView {
    /// When it was asked for, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Who: an API token's name, `anonymous` (a node without tokens), or `node:<id>` for a
    /// change a node made by itself.
    pub by: String,
    /// route.set, route.remove, node.joined, node.status or node.left
    pub action: String,
    /// The operation type or node it changed.
    pub subject: String,
    pub detail: String,
    /// The routing table's version after it.
    pub version: u64,
}

/// The answer of `GET /v1/audit`.
#[derive(Serialize, ToSchema)]
pub struct AuditAnswer {
    /// Newest first.
    pub entries: Vec<AuditView>,
}

/// Who changed which route or member, and when: newest first. In a cluster the trail is
/// part of the replicated state, so every node answers the same.
#[utoipa::path(get, path = "/v1/audit",
    params(("limit" = Option<usize>, Query, minimum = 1, maximum = 10000, description = "at most this many (1..=10000, default 100)")),
    responses((status = 200, body = AuditAnswer), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn audit(
    st: web::Data<AppState>,
    q: web::Query<AuditQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = match &q.limit {
        None => DEFAULT_AUDIT_LIMIT,
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_AUDIT_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_field",
                    format!("query `limit` is `{s}`; allowed: 1..={MAX_AUDIT_LIMIT}"),
                )
            })?,
    };
    let entries = st
        .node
        .audit(limit)
        .into_iter()
        .map(|e| AuditView {
            at_ms: e.at_ms,
            by: e.by,
            action: e.action,
            subject: e.subject,
            detail: e.detail,
            version: e.version,
        })
        .collect();
    Ok(HttpResponse::Ok().json(AuditAnswer { entries }))
}
