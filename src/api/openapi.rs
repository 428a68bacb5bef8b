//! The OpenAPI document of the api, served at `/openapi.json`: every route and every
//! shape, from the handlers' own `#[utoipa::path]` annotations, then [`document`] adds
//! what those cannot say: who may call each endpoint (from the same table the server
//! checks, [`super::auth::ENDPOINTS`]), the constraints of parameters and fields the
//! server enforces (id formats, ranges, patterns), and the links a client (or a stateful
//! tester) follows from one answer to the next request.

use actix_web::HttpResponse;
use serde_json::{json, Value};
use utoipa::OpenApi;

use super::auth::{Access, ENDPOINTS};

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

/// The OpenAPI document of this api, as the annotations give it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document `/openapi.json` serves: [`openapi`] with access, constraints and links.
pub fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the document serializes");
    secure(&mut doc);
    constrain(&mut doc);
    link(&mut doc);
    doc
}

/// The operation object of `method` on `path`, if the document has it.
fn operation<'a>(doc: &'a mut Value, method: &str, path: &str) -> Option<&'a mut Value> {
    doc.pointer_mut(&format!(
        "/paths/{}/{}",
        path.replace('~', "~0").replace('/', "~1"),
        method
    ))
}

/// Who may call what: a bearer scheme, each endpoint's need from the access table, and
/// its 401 and 403 answers.
fn secure(doc: &mut Value) {
    doc["components"]["securitySchemes"]["bearer"] = json!({
        "type": "http",
        "scheme": "bearer",
        "description": "An API token's secret (auth.tokens_file). Scopes: read ⊂ submit ⊂ admin. \
            A node without tokens (loopback, or auth.anonymous) needs none."
    });
    let refusal = |what: &str| {
        json!({
            "description": what,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        })
    };
    for e in ENDPOINTS {
        let method = e.method.as_str().to_ascii_lowercase();
        let Some(op) = operation(doc, &method, e.path) else {
            continue;
        };
        match e.access {
            Access::Open => op["security"] = json!([]),
            Access::Metrics => {
                op["security"] = json!([{}, {"bearer": []}]);
            }
            Access::Needs(scope) => {
                op["security"] = json!([{"bearer": []}]);
                let note = format!("Needs a token with scope `{scope}`.");
                let d = op["description"]
                    .as_str()
                    .map_or(note.clone(), |d| format!("{d}\n\n{note}"));
                op["description"] = Value::String(d);
                op["responses"]["401"] = refusal("no token, or an unknown one");
                op["responses"]["403"] = refusal("the token lacks the scope");
            }
        }
    }
}

/// The constraints the server checks that the annotations do not state.
fn constrain(doc: &mut Value) {
    let set_param = |doc: &mut Value, method: &str, path: &str, name: &str, schema: Value| {
        if let Some(params) =
            operation(doc, method, path).and_then(|o| o["parameters"].as_array_mut())
        {
            for p in params.iter_mut().filter(|p| p["name"] == name) {
                p["schema"] = schema.clone();
            }
        }
    };
    let type_name = json!({"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[A-Za-z0-9_.:-]+$"});
    set_param(
        doc,
        "get",
        "/v1/ops/{id}",
        "id",
        json!({"type": "string", "format": "uuid"}),
    );
    for m in ["get", "put", "delete"] {
        set_param(doc, m, "/v1/routes/{type}", "type", type_name.clone());
    }
    set_param(
        doc,
        "get",
        "/v1/failures",
        "limit",
        json!({"type": "integer", "minimum": 1, "maximum": super::events::MAX_FAILURES}),
    );
    set_param(
        doc,
        "get",
        "/v1/audit",
        "limit",
        json!({"type": "integer", "minimum": 1, "maximum": super::routes::MAX_AUDIT_LIMIT}),
    );
    set_param(
        doc,
        "get",
        "/v1/events",
        "buffer",
        json!({"type": "integer", "minimum": 1, "maximum": super::events::MAX_BUFFER}),
    );
    for (m, p) in [("post", "/v1/ops"), ("post", "/v1/ops/batch")] {
        set_param(doc, m, p, "wait", json!({"type": "boolean"}));
    }
    let schemas = &mut doc["components"]["schemas"];
    // Any JSON value, null included: what a handler takes and answers.
    schemas["OpRequest"]["properties"]["payload"] =
        json!({"description": "Any JSON (at most 1 MiB); handed to the handler as is."});
    schemas["OpAnswer"]["properties"]["result"] =
        json!({"description": "What the handler answered (any JSON), once it succeeded."});
    schemas["OpRequest"]["required"] = json!(["type"]);
    // The batch's per-item contract: the batch is taken as a whole and each entry that is
    // not an operation is refused in its own place of the answer.
    schemas["BatchRequest"]["properties"]["ops"]["items"] = json!({
        "description": "An operation as POST /v1/ops takes it (OpRequest). An entry that is not one is refused in its own place of the answer, naming its field; the others run."
    });
    schemas["OpRequest"]["properties"]["metadata"] = json!({
        "type": ["object", "null"],
        "maxProperties": 32,
        "additionalProperties": {"type": ["string", "number", "boolean"]},
        "description": "String-to-scalar map carried with the operation (numbers and booleans are kept as their text): at most 32 entries and 8 KiB of keys and values."
    });
    schemas["RouteRequest"]["properties"]["nodes"] = json!({
        "type": ["array", "null"],
        "uniqueItems": true,
        "items": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9_.-]+$"},
        "description": "Node ids, each once, each a node of the cluster; empty or absent: every node that serves the type."
    });
}

/// Where an answer leads: a submitted operation to its status, a route set to the route.
fn link(doc: &mut Value) {
    let links = [
        (
            "post",
            "/v1/ops",
            "202",
            "GetOperation",
            "get_op",
            json!({"id": "$response.body#/id"}),
        ),
        (
            "post",
            "/v1/ops",
            "200",
            "GetOperation",
            "get_op",
            json!({"id": "$response.body#/id"}),
        ),
        (
            "put",
            "/v1/routes/{type}",
            "200",
            "GetRoute",
            "get_route",
            json!({"type": "$request.path.type"}),
        ),
        (
            "put",
            "/v1/routes/{type}",
            "200",
            "DeleteRoute",
            "delete_route",
            json!({"type": "$request.path.type"}),
        ),
    ];
    for (method, path, status, name, target, parameters) in links {
        if let Some(r) = operation(doc, method, path).map(|o| &mut o["responses"][status]) {
            if r.is_object() {
                r["links"][name] = json!({"operationId": target, "parameters": parameters});
            }
        }
    }
}

pub(super) async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(document())
}
