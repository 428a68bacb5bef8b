//! The dashboard at `/`: a page, a script and a style sheet built into the binary (no
//! build step, no CDN: it works offline), and `GET /v1/dashboard/config`, what the page
//! needs to know beyond the public api (this node's id, where traces are viewed).
//!
//! The page reads the same api everyone else does: `/v1/cluster`, `/v1/routes`,
//! `/v1/metrics`, `/v1/failures`, and the `metrics:collected` and `operation:failure`
//! events of `/v1/events`.

use actix_web::http::header;
use actix_web::{web, HttpResponse};
use serde::Serialize;
use utoipa::ToSchema;

use crate::telemetry::Telemetry;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// What the dashboard handlers read.
#[derive(Clone)]
pub struct Dashboard {
    pub node: String,
    pub telemetry: Telemetry,
}

fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        // The files change only with the binary; a reload after an upgrade revalidates.
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("x-content-type-options", "nosniff"))
        .body(body)
}

pub(crate) async fn index() -> HttpResponse {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

pub(crate) async fn app_js() -> HttpResponse {
    asset("text/javascript; charset=utf-8", APP_JS)
}

pub(crate) async fn style_css() -> HttpResponse {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

/// What `GET /v1/dashboard/config` answers.
#[derive(Serialize, ToSchema)]
pub struct DashboardConfig {
    /// The node serving the dashboard.
    pub node: String,
    /// The Jaeger UI an operation's trace is linked to (`{url}/trace/{trace_id}`), when
    /// configured (`telemetry.jaeger_ui_url`).
    pub jaeger_ui_url: Option<String>,
}

/// The dashboard's settings.
#[utoipa::path(get, path = "/v1/dashboard/config",
    responses((status = 200, body = DashboardConfig)))]
pub(crate) async fn config(d: web::Data<Dashboard>) -> HttpResponse {
    HttpResponse::Ok().json(DashboardConfig {
        node: d.node.clone(),
        jaeger_ui_url: d
            .telemetry
            .jaeger_ui_url()
            .map(|u| u.trim_end_matches('/').to_owned()),
    })
}
