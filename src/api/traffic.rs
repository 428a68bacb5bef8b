//! What the api serves, counted: requests by endpoint and status, and how long each
//! endpoint took to answer (`opmesh_http_requests_total{route,status}` and
//! `opmesh_http_request_duration_seconds{route}` in `GET /metrics`).
//!
//! [`measure`] runs around every request (outside the token check, so refusals count
//! too). The labels are the endpoint's method and pattern from [`ENDPOINTS`]
//! (`/v1/ops/{id}`, never a concrete id, so the label set stays as small as the table),
//! or `unmatched` (any method) for a request no endpoint takes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::web;
use dashmap::DashMap;
use opmesh_actors::metrics::{BucketSnapshot, Buckets, LATENCY_BOUNDS_NS};

use super::auth::ENDPOINTS;

/// The route label of requests no endpoint takes.
pub const UNMATCHED: &str = "unmatched";

/// Requests and their durations, per endpoint of [`ENDPOINTS`] (plus one for unmatched
/// requests, last).
pub struct HttpMetrics {
    /// `(endpoint index, status)` → requests.
    requests: DashMap<(usize, u16), AtomicU64>,
    /// Per endpoint index: time to answer, in nanoseconds.
    durations: Box<[Buckets]>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics {
            requests: DashMap::new(),
            durations: (0..=ENDPOINTS.len())
                .map(|_| Buckets::new(LATENCY_BOUNDS_NS))
                .collect(),
        }
    }
}

impl HttpMetrics {
    fn record(&self, endpoint: usize, status: u16, nanos: u64) {
        match self.requests.get(&(endpoint, status)) {
            Some(n) => {
                n.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                self.requests
                    .entry((endpoint, status))
                    .or_default()
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        self.durations[endpoint].record(nanos);
    }

    /// `((method, route), status, requests)`, by endpoint then status.
    pub fn requests(&self) -> Vec<(Endpoint, String, u64)> {
        let mut v: Vec<(usize, u16, u64)> = self
            .requests
            .iter()
            .map(|e| (e.key().0, e.key().1, e.value().load(Ordering::Relaxed)))
            .collect();
        v.sort_unstable();
        v.into_iter()
            .map(|(i, status, n)| (route(i), status.to_string(), n))
            .collect()
    }

    /// `((method, route), durations in nanoseconds)` of the endpoints that answered
    /// something.
    pub fn durations(&self) -> Vec<(Endpoint, BucketSnapshot)> {
        self.durations
            .iter()
            .enumerate()
            .map(|(i, b)| (route(i), b.snapshot()))
            .filter(|(_, s)| s.count > 0)
            .collect()
    }
}

/// An endpoint's labels: its method and its route pattern.
pub type Endpoint = (&'static str, &'static str);

/// The labels of endpoint index `i`.
fn route(i: usize) -> Endpoint {
    ENDPOINTS
        .get(i)
        .map_or(("any", UNMATCHED), |e| (e.method.as_str(), e.path))
}

/// The middleware: times the request and counts its answer under its endpoint.
pub(super) async fn measure(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let endpoint = req
        .match_pattern()
        .and_then(|p| {
            ENDPOINTS
                .iter()
                .position(|e| e.method == *req.method() && e.path == p)
        })
        .unwrap_or(ENDPOINTS.len());
    let metrics = req.app_data::<web::Data<HttpMetrics>>().cloned();
    let res = next.call(req).await;
    if let Some(m) = metrics {
        let status = match &res {
            Ok(r) => r.status().as_u16(),
            Err(e) => e.as_response_error().status_code().as_u16(),
        };
        m.record(endpoint, status, started.elapsed().as_nanos() as u64);
    }
    res
}
