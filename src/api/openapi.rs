//! The OpenAPI document of the api, served at `/openapi.json`: every route and every
//! shape, from the handlers' own `#[utoipa::path]` annotations.

use actix_web::HttpResponse;
use utoipa::OpenApi;

use super::cluster::JoinRequest;
use super::errors::ErrorBody;
use super::model::{
    BatchAnswer, BatchRequest, OpAnswer, OpRequest, RouteAnswer, RouteRequest, RouteView,
    RoutesAnswer,
};
use super::{cluster, dashboard, events, ops, probes, routes};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "opmesh",
        description = "Run operations across an opmesh cluster."
    ),
    paths(
        ops::submit,
        ops::submit_batch,
        ops::get_op,
        routes::list_routes,
        routes::get_route,
        routes::put_route,
        routes::delete_route,
        probes::health,
        probes::metrics,
        probes::prometheus_metrics,
        probes::healthz,
        probes::readyz,
        cluster::cluster_status,
        cluster::cluster_leave,
        cluster::cluster_join,
        probes::hello,
        routes::audit,
        events::events,
        events::failures,
        dashboard::config
    ),
    components(schemas(
        OpRequest,
        BatchRequest,
        OpAnswer,
        BatchAnswer,
        ErrorBody,
        RouteRequest,
        RouteView,
        RoutesAnswer,
        RouteAnswer,
        JoinRequest,
        routes::AuditView,
        routes::AuditAnswer,
        events::Failure,
        events::FailuresAnswer,
        dashboard::DashboardConfig
    ))
)]
pub struct ApiDoc;

/// The OpenAPI document of this api.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

pub(super) async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}
