//! What the api admits (`[limits]`): submissions (`POST /v1/ops`, `POST /v1/ops/batch`,
//! a batch counted as its number of operations) pass the in-flight cap, the client's
//! rate limit and the global rate limit, in that order, before any is accepted.
//!
//! Over a rate limit: 429 `rate_limited` naming the limit (`limits.rate_per_sec`, or the
//! client and `limits.client_rate_per_sec`), with `Retry-After` in whole seconds, rounded
//! up and jittered ([`retry_after_secs`]). Over the in-flight cap: 429 `overloaded`
//! naming `limits.max_in_flight`. A batch larger than a burst (or than the cap) could
//! never pass: 413 `batch_too_large` naming the limit, so a client does not retry it.
//!
//! The client's own limit is checked before the global one, so a client over its limit
//! uses none of the allowance others share. The client is the token's name when the api
//! has tokens, else the `x-opmesh-client` header, else the peer's IP address.
//!
//! With every limit off (the default) [`Admission::check`] reads one bool.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::HttpRequest;
use opmesh_actors::ratelimit::{retry_after_secs, KeyedLimiter, Limiter, Rate, Refusal};
use opmesh_actors::Node;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::auth::Caller;
use super::errors::ApiError;
use crate::config::{is_token_name, LimitsConfig};

/// The header that names the client when the api has no tokens.
pub const CLIENT_HEADER: &str = "x-opmesh-client";

/// How often the clients whose allowance is full again are forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The api's limits and what they refused.
pub struct Admission {
    /// No limit is on: nothing to check.
    off: bool,
    global: Option<Limiter>,
    per_client: Option<KeyedLimiter<Arc<str>>>,
    max_in_flight: Option<NonZeroUsize>,
    /// What a submission refused by the in-flight cap is told to wait.
    overload_retry_after: Duration,
    refused: Refused,
}

#[derive(Default)]
struct Refused {
    global: AtomicU64,
    client: AtomicU64,
    in_flight: AtomicU64,
}

/// Submissions each limit refused (429 or 413), and the clients tracked now: for
/// `/v1/metrics` (`limits`) and `/metrics`.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionStats {
    /// By `limits.rate_per_sec`.
    pub rate_limited_global: u64,
    /// By `limits.client_rate_per_sec`.
    pub rate_limited_client: u64,
    /// By `limits.max_in_flight`.
    pub in_flight_refused: u64,
    /// Clients whose allowance is tracked apart now (at most `limits.max_clients`).
    pub clients_tracked: usize,
}

/// Which limit refused, as the error names it.
enum Which<'a> {
    Global(Rate),
    Client(&'a str, Rate),
}

impl Admission {
    /// The limits `cfg` turns on; `overload_retry_after` is `engine.overload_retry_after_ms`.
    pub fn new(cfg: &LimitsConfig, overload_retry_after: Duration) -> Self {
        Admission {
            off: cfg.global.is_none() && cfg.per_client.is_none() && cfg.max_in_flight.is_none(),
            global: cfg.global.map(Limiter::new),
            per_client: cfg
                .per_client
                .map(|r| KeyedLimiter::new(r, cfg.max_clients)),
            max_in_flight: cfg.max_in_flight,
            overload_retry_after,
            refused: Refused::default(),
        }
    }

    /// Whether `n` operations submitted by `req` (from `caller`) may go on to the node.
    /// Counts them against the limits when they may.
    pub fn check(
        &self,
        req: &HttpRequest,
        caller: &Caller,
        n: usize,
        node: &Node,
    ) -> Result<(), ApiError> {
        if self.off || n == 0 {
            return Ok(());
        }
        if let Some(max) = self.max_in_flight {
            self.check_in_flight(max.get(), node.in_flight(), n, node.id())?;
        }
        if let Some(l) = &self.per_client {
            let client = client_of(req, caller)?;
            l.check_n(&client, n)
                .map_err(|r| self.refusal(r, n, Which::Client(&client, l.rate())))?;
        }
        if let Some(l) = &self.global {
            l.check_n(n)
                .map_err(|r| self.refusal(r, n, Which::Global(l.rate())))?;
        }
        Ok(())
    }

    fn check_in_flight(
        &self,
        max: usize,
        in_flight: usize,
        n: usize,
        node: &str,
    ) -> Result<(), ApiError> {
        if n > max {
            self.refused.in_flight.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "batch_too_large",
                format!(
                    "field `ops` has {n} operations, more than may be in flight at once \
                     (limits.max_in_flight = {max}): it can never pass; send smaller batches"
                ),
            ));
        }
        if in_flight + n > max {
            self.refused.in_flight.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "overloaded",
                format!(
                    "node `{node}` has {in_flight} operations in flight, and {n} more would \
                     pass the limit of {max} (limits.max_in_flight); retry later"
                ),
            )
            .with_retry_after(Duration::from_secs(retry_after_secs(
                self.overload_retry_after,
                rand::random(),
            ))));
        }
        Ok(())
    }

    fn refusal(&self, r: Refusal, n: usize, which: Which<'_>) -> ApiError {
        let (counter, rate, whose, key, burst_key) = match which {
            Which::Global(rate) => (
                &self.refused.global,
                rate,
                "the node's rate limit".to_owned(),
                "limits.rate_per_sec",
                "limits.burst",
            ),
            Which::Client(name, rate) => (
                &self.refused.client,
                rate,
                format!("the rate limit of client `{name}`"),
                "limits.client_rate_per_sec",
                "limits.client_burst",
            ),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match r {
            Refusal::Wait(wait) => {
                let secs = retry_after_secs(wait, rand::random());
                ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!(
                        "over {whose}: {key} = {}/s with a burst of {} ({burst_key}); retry \
                         after {secs} s",
                        rate.per_sec, rate.burst
                    ),
                )
                .with_retry_after(Duration::from_secs(secs))
            }
            Refusal::OverBurst { burst } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "batch_too_large",
                format!(
                    "field `ops` has {n} operations, more than {whose} lets through at once \
                     ({burst_key} = {burst}): it can never pass; send smaller batches"
                ),
            ),
        }
    }

    pub fn stats(&self) -> AdmissionStats {
        AdmissionStats {
            rate_limited_global: self.refused.global.load(Ordering::Relaxed),
            rate_limited_client: self.refused.client.load(Ordering::Relaxed),
            in_flight_refused: self.refused.in_flight.load(Ordering::Relaxed),
            clients_tracked: self.per_client.as_ref().map_or(0, KeyedLimiter::len),
        }
    }

    /// Forgets, every second until `stop`, the clients whose allowance is full again, so
    /// the clients tracked are those seen lately. Returns at once without a client limit.
    pub async fn sweep(self: Arc<Self>, stop: CancellationToken) {
        if self.per_client.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(SWEEP_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    if let Some(l) = &self.per_client {
                        l.sweep();
                    }
                }
            }
        }
    }
}

/// Who the client of `req` is: the token's name, else the `x-opmesh-client` header
/// (refused when it is not a name), else the peer's IP address.
fn client_of(req: &HttpRequest, caller: &Caller) -> Result<Arc<str>, ApiError> {
    if let Some(name) = &caller.name {
        return Ok(name.clone());
    }
    if let Some(v) = req.headers().get(CLIENT_HEADER) {
        return v
            .to_str()
            .ok()
            .filter(|s| is_token_name(s))
            .map(Arc::from)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_field",
                    format!(
                        "header `{CLIENT_HEADER}` must be 1 to 64 characters from A-Z a-z 0-9 \
                         _ . - @"
                    ),
                )
            });
    }
    Ok(req
        .peer_addr()
        .map_or_else(|| Arc::from("unknown"), |a| Arc::from(a.ip().to_string())))
}

#[cfg(test)]
mod tests {
    use actix_web::test::TestRequest;
    use actix_web::ResponseError;

    use super::*;
    use crate::auth::Scope;

    fn anonymous() -> Caller {
        Caller {
            name: None,
            scope: Scope::Admin,
        }
    }

    fn cfg(global: Option<Rate>, per_client: Option<Rate>, in_flight: usize) -> LimitsConfig {
        LimitsConfig {
            global,
            per_client,
            max_in_flight: NonZeroUsize::new(in_flight),
            ..LimitsConfig::off()
        }
    }

    fn message(e: &ApiError) -> String {
        e.body().message
    }

    #[test]
    fn the_client_is_the_token_else_the_header_else_the_peer() {
        let token = Caller {
            name: Some("deployer".into()),
            scope: Scope::Submit,
        };
        let req = TestRequest::default()
            .insert_header((CLIENT_HEADER, "someone-else"))
            .peer_addr("10.1.2.3:5000".parse().unwrap())
            .to_http_request();
        assert_eq!(&*client_of(&req, &token).unwrap(), "deployer");
        assert_eq!(&*client_of(&req, &anonymous()).unwrap(), "someone-else");
        let req = TestRequest::default()
            .peer_addr("10.1.2.3:5000".parse().unwrap())
            .to_http_request();
        assert_eq!(&*client_of(&req, &anonymous()).unwrap(), "10.1.2.3");
        let req = TestRequest::default()
            .insert_header((CLIENT_HEADER, "a b"))
            .to_http_request();
        let e = client_of(&req, &anonymous()).unwrap_err();
        assert_eq!(e.status_code(), 400);
        assert!(message(&e).contains(CLIENT_HEADER), "{}", message(&e));
    }

    #[test]
    fn the_in_flight_cap_refuses_what_would_pass_it() {
        let a = Admission::new(&cfg(None, None, 10), Duration::from_millis(1500));
        assert!(a.check_in_flight(10, 7, 3, "n1").is_ok());
        let e = a.check_in_flight(10, 8, 3, "n1").unwrap_err();
        assert_eq!(e.status_code(), 429);
        assert_eq!(e.body().error, "overloaded");
        assert!(
            message(&e).contains("limits.max_in_flight"),
            "{}",
            message(&e)
        );
        let r = e.error_response();
        let after: u64 = r
            .headers()
            .get("retry-after")
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((2..=3).contains(&after), "{after}");
        let e = a.check_in_flight(10, 0, 11, "n1").unwrap_err();
        assert_eq!(
            (e.status_code().as_u16(), e.body().error.as_str()),
            (413, "batch_too_large")
        );
        assert_eq!(a.stats().in_flight_refused, 2);
    }

    #[test]
    fn refusals_name_the_limit_and_count_under_it() {
        let a = Admission::new(&cfg(None, None, 0), Duration::from_secs(1));
        let rate = Rate::new(2, 5).unwrap();
        let e = a.refusal(
            Refusal::Wait(Duration::from_millis(500)),
            1,
            Which::Client("app", rate),
        );
        assert_eq!(
            (e.status_code().as_u16(), e.body().error.as_str()),
            (429, "rate_limited")
        );
        let m = message(&e);
        assert!(
            m.contains("client `app`") && m.contains("limits.client_rate_per_sec = 2/s"),
            "{m}"
        );
        assert_eq!(
            e.error_response().headers().get("retry-after").unwrap(),
            "1"
        );
        let e = a.refusal(Refusal::OverBurst { burst: 5 }, 6, Which::Global(rate));
        assert_eq!(
            (e.status_code().as_u16(), e.body().error.as_str()),
            (413, "batch_too_large")
        );
        assert!(message(&e).contains("limits.burst = 5"), "{}", message(&e));
        let s = a.stats();
        assert_eq!((s.rate_limited_client, s.rate_limited_global), (1, 1));
    }
}
