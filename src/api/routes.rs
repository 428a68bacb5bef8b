//! The routing table over HTTP: `GET /v1/routes`, `GET|PUT|DELETE /v1/routes/{type}`.
//! Writes go through the node (to the Raft leader in a cluster) and answer the version
//! they produced.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use opmesh_actors::{Route, RouteError, Strategy};

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
    responses((status = 200, body = RouteAnswer), (status = 400, body = ErrorBody)))]
pub(super) async fn put_route(
    st: web::Data<AppState>,
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
    let version = st.node.set_route(&ty, route.clone()).await?;
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
    ty: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let version = st.node.remove_route(&ty).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "type": ty.as_str(), "version": version })))
}
