//! Who may call which endpoint.
//!
//! Every endpoint the api serves is a row of [`ENDPOINTS`]: its method, its path and the
//! [`Access`] it needs. The server registers its routes from that table and nothing else
//! (see [`super::configure`]), so an endpoint cannot exist without saying who may call
//! it, and the access test walks the same table.
//!
//! [`authorize`] runs before every handler: it finds the row of the request's route,
//! reads `Authorization: Bearer <secret>` when tokens are on, and either refuses (401
//! `unauthorized` with `WWW-Authenticate: Bearer` for a missing or unknown token, 403
//! `forbidden` naming the scope needed for a known token without it) or hands the
//! handler a [`Caller`]. With no tokens configured (`auth.tokens_file` empty) every
//! caller is an anonymous admin: the node has refused to start on a non-loopback address
//! unless `auth.anonymous` said that is meant.
//!
//! A [`Caller`] also scopes what it sees: with tokens on, an operation, its result and
//! its events belong to the token that submitted it, and only it or an admin may read
//! them ([`Caller::may_see`]).

use std::sync::Arc;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, HttpRequest, Route};

use super::errors::ApiError;
use super::{cluster, dashboard, events, openapi, ops, probes, routes};
use crate::auth::{Scope, Tokens};

/// What calling an endpoint takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone: probes, the dashboard's files, the OpenAPI document.
    Open,
    /// `/metrics`: anyone, unless `auth.protect_metrics` asks for `read`.
    Metrics,
    /// A token with at least this scope.
    Needs(Scope),
}

/// One endpoint: method, path (actix pattern) and who may call it.
pub struct Endpoint {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
    /// Attaches the handler to a route of `method`.
    handler: fn(Route) -> Route,
}

const fn endpoint(
    method: Method,
    path: &'static str,
    access: Access,
    handler: fn(Route) -> Route,
) -> Endpoint {
    Endpoint {
        method,
        path,
        access,
        handler,
    }
}

const READ: Access = Access::Needs(Scope::Read);
const SUBMIT: Access = Access::Needs(Scope::Submit);
const ADMIN: Access = Access::Needs(Scope::Admin);

/// Every endpoint of the api, and the access it needs.
pub static ENDPOINTS: &[Endpoint] = &[
    endpoint(Method::POST, "/v1/ops", SUBMIT, |r| r.to(ops::submit)),
    endpoint(Method::POST, "/v1/ops/batch", SUBMIT, |r| {
        r.to(ops::submit_batch)
    }),
    endpoint(Method::GET, "/v1/ops/{id}", READ, |r| r.to(ops::get_op)),
    endpoint(Method::GET, "/v1/routes", READ, |r| {
        r.to(routes::list_routes)
    }),
    endpoint(Method::GET, "/v1/routes/{type}", READ, |r| {
        r.to(routes::get_route)
    }),
    endpoint(Method::PUT, "/v1/routes/{type}", ADMIN, |r| {
        r.to(routes::put_route)
    }),
    endpoint(Method::DELETE, "/v1/routes/{type}", ADMIN, |r| {
        r.to(routes::delete_route)
    }),
    endpoint(Method::GET, "/v1/health", READ, |r| r.to(probes::health)),
    endpoint(Method::GET, "/v1/metrics", READ, |r| r.to(probes::metrics)),
    endpoint(Method::GET, "/metrics", Access::Metrics, |r| {
        r.to(probes::prometheus_metrics)
    }),
    endpoint(Method::GET, "/healthz", Access::Open, |r| {
        r.to(probes::healthz)
    }),
    endpoint(Method::GET, "/readyz", Access::Open, |r| {
        r.to(probes::readyz)
    }),
    endpoint(Method::GET, "/v1/cluster", READ, |r| {
        r.to(cluster::cluster_status)
    }),
    endpoint(Method::POST, "/v1/cluster/leave", ADMIN, |r| {
        r.to(cluster::cluster_leave)
    }),
    endpoint(Method::POST, "/v1/cluster/join", ADMIN, |r| {
        r.to(cluster::cluster_join)
    }),
    endpoint(Method::POST, "/v1/bench/hello", SUBMIT, |r| {
        r.to(probes::hello)
    }),
    endpoint(Method::GET, "/v1/audit", ADMIN, |r| r.to(routes::audit)),
    endpoint(Method::GET, "/openapi.json", Access::Open, |r| {
        r.to(openapi::openapi_json)
    }),
    endpoint(Method::GET, "/v1/events", READ, |r| r.to(events::events)),
    endpoint(Method::GET, "/v1/failures", READ, |r| {
        r.to(events::failures)
    }),
    endpoint(Method::GET, "/v1/dashboard/config", READ, |r| {
        r.to(dashboard::config)
    }),
    endpoint(Method::GET, "/", Access::Open, |r| r.to(dashboard::index)),
    endpoint(Method::GET, "/dashboard/app.js", Access::Open, |r| {
        r.to(dashboard::app_js)
    }),
    endpoint(Method::GET, "/dashboard/style.css", Access::Open, |r| {
        r.to(dashboard::style_css)
    }),
];

impl Endpoint {
    /// The actix route of this endpoint.
    pub(super) fn route(&self) -> Route {
        (self.handler)(web::method(self.method.clone()))
    }
}

/// The row of `method` on the route pattern `pattern`.
fn endpoint_of(method: &Method, pattern: &str) -> Option<&'static Endpoint> {
    ENDPOINTS
        .iter()
        .find(|e| e.method == *method && e.path == pattern)
}

/// The methods the endpoints at `path` allow, for a 405's `Allow`; empty when no endpoint
/// has that path.
pub(super) fn allowed_methods(path: &str) -> Vec<&'static str> {
    // A literal path (`/v1/ops/batch`) is its own resource, whatever pattern
    // (`/v1/ops/{id}`) it also matches.
    let literal = ENDPOINTS.iter().any(|e| e.path == path);
    let mut methods: Vec<&'static str> = ENDPOINTS
        .iter()
        .filter(|e| {
            if literal {
                e.path == path
            } else {
                actix_web::dev::ResourceDef::new(e.path).is_match(path)
            }
        })
        .map(|e| e.method.as_str())
        .collect();
    methods.dedup();
    methods
}

/// Who is calling: the token's name (`None` without tokens) and its scope.
#[derive(Clone, Debug)]
pub struct Caller {
    pub name: Option<Arc<str>>,
    pub scope: Scope,
}

impl Caller {
    /// Whether this caller may see an operation submitted by `owner`: its submitter or
    /// an admin. Without tokens every operation's owner is `None`, as is every caller's
    /// name, so everyone sees everything.
    pub fn may_see(&self, owner: Option<&str>) -> bool {
        self.scope == Scope::Admin || owner == self.name.as_deref()
    }

    /// Who the audit trail says made a change: the token's name, or `anonymous` on a
    /// node without tokens.
    pub fn by(&self) -> &str {
        self.name.as_deref().unwrap_or("anonymous")
    }

    /// The caller of `req`, as [`authorize`] found it (an anonymous admin where it did
    /// not run, as in tests that call a handler directly).
    pub fn of(req: &HttpRequest) -> Caller {
        req.extensions().get::<Caller>().cloned().unwrap_or(Caller {
            name: None,
            scope: Scope::Admin,
        })
    }
}

/// The api's access settings, shared by its workers.
pub struct Guard {
    /// `None`: no tokens, the api is open.
    pub tokens: Option<Arc<Tokens>>,
    pub protect_metrics: bool,
}

impl Guard {
    /// Who `req` comes from, or why it may not call an endpoint needing `access`.
    fn check(&self, access: Access, headers: &header::HeaderMap) -> Result<Caller, ApiError> {
        let anonymous = Caller {
            name: None,
            scope: Scope::Admin,
        };
        let Some(tokens) = &self.tokens else {
            return Ok(anonymous);
        };
        let needed = match access {
            Access::Open => return Ok(anonymous_reader()),
            Access::Metrics if !self.protect_metrics => return Ok(anonymous_reader()),
            Access::Metrics => Scope::Read,
            Access::Needs(scope) => scope,
        };
        let secret = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .ok_or_else(|| unauthorized("this endpoint needs `Authorization: Bearer <token>`"))?;
        let holder = tokens
            .verify(secret.as_bytes())
            .ok_or_else(|| unauthorized("unknown token"))?;
        if holder.scope < needed {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "token `{}` has scope {}; this endpoint needs scope {needed}",
                    holder.name, holder.scope
                ),
            ));
        }
        Ok(Caller {
            name: Some(holder.name),
            scope: holder.scope,
        })
    }
}

/// A caller of an open endpoint when tokens are on: it sees nothing owned.
fn anonymous_reader() -> Caller {
    Caller {
        name: None,
        scope: Scope::Read,
    }
}

/// The secret of a `Bearer` credential (the scheme is case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, secret) = value.split_once(' ')?;
    let secret = secret.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !secret.is_empty()).then_some(secret)
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
        .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
}

/// The middleware: finds the endpoint, checks the caller, and hands the handler a
/// [`Caller`] in the request's extensions. Requests that match no endpoint go on to the
/// 404/405 answer unchecked (they reach no handler).
pub(super) async fn authorize(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let endpoint = req
        .match_pattern()
        .and_then(|p| endpoint_of(req.method(), &p));
    if let Some(e) = endpoint {
        let guard = req
            .app_data::<web::Data<Guard>>()
            .expect("the api registers its Guard");
        match guard.check(e.access, req.headers()) {
            Ok(caller) => {
                req.extensions_mut().insert(caller);
            }
            Err(refusal) => {
                return Ok(req.error_response(refusal).map_into_right_body());
            }
        }
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_left_body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_is_listed_once() {
        for (i, e) in ENDPOINTS.iter().enumerate() {
            assert!(
                !ENDPOINTS[..i]
                    .iter()
                    .any(|o| o.method == e.method && o.path == e.path),
                "{} {} twice",
                e.method,
                e.path
            );
        }
    }

    #[test]
    fn bearer_takes_the_secret_of_a_bearer_credential_only() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearer"), None);
    }

    #[test]
    fn allowed_methods_lists_the_methods_of_a_path() {
        assert_eq!(allowed_methods("/v1/routes/echo"), ["GET", "PUT", "DELETE"]);
        assert_eq!(allowed_methods("/v1/ops"), ["POST"]);
        assert_eq!(allowed_methods("/v1/ops/batch"), ["POST"]);
        assert_eq!(allowed_methods("/v1/ops/0b0e"), ["GET"]);
        assert!(allowed_methods("/v1/nothing").is_empty());
    }

    #[test]
    fn an_owner_and_an_admin_see_an_operation_nobody_else_does() {
        let caller = |name: Option<&str>, scope| Caller {
            name: name.map(Into::into),
            scope,
        };
        assert!(caller(Some("a"), Scope::Read).may_see(Some("a")));
        assert!(!caller(Some("b"), Scope::Submit).may_see(Some("a")));
        assert!(caller(Some("root"), Scope::Admin).may_see(Some("a")));
        assert!(!caller(None, Scope::Read).may_see(Some("a")));
        // Without tokens: no owners, no names.
        assert!(caller(None, Scope::Admin).may_see(None));
    }
}
