//! The cluster over HTTP: `GET /v1/cluster` (what this node sees: members, roles, the
//! leader, links, load), `POST /v1/cluster/leave` and `POST /v1/cluster/join`. A node
//! without a cluster port shows itself alone and refuses join and leave with 409.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use utoipa::ToSchema;

use super::errors::{parse, ApiError, ErrorBody};
use super::AppState;

/// The cluster as this node sees it: nodes, roles, the leader, term, last applied index,
/// links and per-node load. A node without a cluster port shows itself alone.
#[utoipa::path(get, path = "/v1/cluster", responses((status = 200, description = "cluster status")))]
pub(super) async fn cluster_status(st: web::Data<AppState>) -> HttpResponse {
    match &st.cluster {
        Some(c) => HttpResponse::Ok().json(c.status()),
        None => {
            let s = st.node.stats();
            HttpResponse::Ok().json(serde_json::json!({
                "cluster_id": null,
                "node": s.node_id,
                "leader": s.node_id,
                "term": 0,
                "last_applied_index": null,
                "version": st.node.routes().version,
                "raft_state": "single",
                "nodes": [{
                    "id": s.node_id,
                    "http_addr": null,
                    "cluster_addr": null,
                    "status": if s.is_accepting { "up" } else { "leaving" },
                    "role": "voter",
                    "serves": st.node.handler_types(),
                    "load": s.in_flight_operations,
                    "overloaded": [],
                    "open_breakers": [],
                    "congested": false,
                    "link": "self",
                }],
                "forwarded_waiting": 0,
                "replies_unacknowledged": 0,
                "replies_unacknowledged_bytes": 0,
                "links": [],
            }))
        }
    }
}

fn no_cluster() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "not_clustered",
        "this node runs alone (no cluster.addr / --cluster-addr)",
    )
}

/// Hands off and leaves the cluster: routes move away from this node, its operations
/// finish (up to the shutdown grace period), it leaves the registry and the Raft group,
/// and then the process shuts down.
#[utoipa::path(post, path = "/v1/cluster/leave", responses((status = 200, description = "left; the node shuts down"), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn cluster_leave(
    st: web::Data<AppState>,
    req: actix_web::HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let c = st.cluster.as_ref().ok_or_else(no_cluster)?;
    let by = super::auth::Caller::of(&req);
    c.leave_as(st.shutdown_grace, by.by()).await.map_err(|m| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "leave_failed",
            m.to_string(),
        )
    })?;
    st.left.notify_one();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "node": c.name(), "left": true })))
}

/// Where to join.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct JoinRequest {
    /// A cluster address of any member (host:port).
    seed: String,
}

/// Joins this node to the cluster a seed belongs to. Only a node that belongs to no
/// cluster yet (started with `--join` and still waiting) can; a node that bootstrapped
/// its own cluster holds a log that cannot merge into another one.
#[utoipa::path(post, path = "/v1/cluster/join", request_body = JoinRequest, responses((status = 200, description = "joined"), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn cluster_join(
    st: web::Data<AppState>,
    http: actix_web::HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let c = st.cluster.as_ref().ok_or_else(no_cluster)?;
    let req: JoinRequest = parse(&body, "join request")?;
    let by = super::auth::Caller::of(&http);
    c.join_as(&req.seed, by.by()).await.map_err(|e| match e {
        opmesh_cluster::JoinError::AlreadyMember { .. } => {
            ApiError::new(StatusCode::CONFLICT, "already_member", e.to_string())
        }
        opmesh_cluster::JoinError::Failed { .. } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "join_failed",
            e.to_string(),
        ),
    })?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "node": c.name(), "joined": req.seed })))
}
