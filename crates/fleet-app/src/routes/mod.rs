//! The route table, shared state, and what every route has in common: the database access the table
//! grants (`access`), the JSON body extractor, the body every response carries, 404/405 answers and the
//! request metrics middleware.

mod access;
mod body;
mod consistency;
mod counters;
mod data;
mod header;
mod health;
mod idempotency;
mod isolation;
mod lab;
mod rows;
mod stats;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{HttpServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, HttpResponse};
use serde_json::Value;

pub use access::{Access, OnPrimary, OnReplica, SERVED_BY};
pub use body::{BodyBudget, JsonBody};
pub use consistency::{LSN, MIN_LSN};
pub use idempotency::HEADER as IDEMPOTENCY_KEY;

use crate::config::{Config, IncrementMode};
use crate::db::{self, Store};
use crate::errors::{self, ApiError};
use crate::metrics::Metrics;

/// What every handler can reach; built once and shared by all workers. Handlers reach the database
/// through the handle their row of the route table grants ([`OnPrimary`], [`OnReplica`]).
#[derive(Debug)]
pub struct AppState {
    primary: db::Primary,
    replica: db::Replica,
    pub metrics: Metrics,
    pub bulk_max_rows: usize,
    pub bulk_max_row_bytes: usize,
    pub body_limit_bytes: usize,
    /// `BODY_READ_TIMEOUT_MS`: how long a body may take to arrive, and may wait for the budget.
    pub body_read_timeout: Duration,
    /// Shared by every request with a large body.
    pub body_budget: BodyBudget,
    pub started: Instant,
    /// Set on SIGTERM: readiness answers 503 from then on.
    pub draining: Arc<AtomicBool>,
}

impl AppState {
    pub fn new(config: &Config, db: Store, metrics: Metrics) -> Self {
        AppState {
            primary: db.primary(config.increment_mode == IncrementMode::Coalesce),
            replica: db.replica(),
            metrics,
            bulk_max_rows: config.bulk_max_rows,
            bulk_max_row_bytes: config.bulk_max_row_bytes,
            body_limit_bytes: config.body_limit_bytes,
            body_read_timeout: config.body_read_timeout(),
            body_budget: BodyBudget::new(config.body_limit_bytes),
            started: Instant::now(),
            draining: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The database itself, for what is not a query: pool statistics, closing the pool.
    pub fn db(&self) -> &Store {
        &self.primary
    }
}

/// One route of the table: `method path`, served by `handler` (`lab`: only with `LAB_ENDPOINTS=true`),
/// which may use the database as `access` says, and no other way (see [`Access`]).
#[derive(Debug)]
pub struct Endpoint {
    pub method: Method,
    pub path: &'static str,
    pub lab: bool,
    pub access: Access,
    handler: Handler,
}

/// Adds the handler to a route already guarded by the endpoint's method.
type Handler = fn(actix_web::Route) -> actix_web::Route;

/// Every route the node serves: `configure` registers these, and the OpenAPI document (`OPENAPI`)
/// describes exactly these (a test checks both ways). A new endpoint is a row here and its handler.
pub static ROUTES: &[Endpoint] = &[
    post("/api/increment", |r| r.to(counters::increment)),
    post("/api/transfer", |r| r.to(counters::transfer)),
    get("/api/counters/{key}", Access::Replica, |r| r.to(counters::get_counter)),
    post("/api/bulk-insert", |r| r.to(data::bulk_insert)),
    get("/api/pool-stats", Access::None, |r| r.to(stats::pool_stats)),
    get("/api/stats", Access::Replica, |r| r.to(stats::stats)),
    get("/metrics", Access::None, |r| r.to(stats::metrics)),
    get("/health", Access::Primary, |r| r.to(health::health)),
    get("/health/live", Access::None, |r| r.to(health::live)),
    get("/health/ready", Access::Primary, |r| r.to(health::ready)),
    get("/openapi.json", Access::None, |r| r.to(openapi)),
    lab_post("/api/hold", |r| r.to(lab::hold)),
    lab_post("/api/test-isolation", |r| r.to(isolation::test_isolation)),
];

const fn get(path: &'static str, access: Access, handler: Handler) -> Endpoint {
    Endpoint { method: Method::GET, path, lab: false, access, handler }
}

/// Every write goes to the primary.
const fn post(path: &'static str, handler: Handler) -> Endpoint {
    Endpoint { method: Method::POST, path, lab: false, access: Access::Primary, handler }
}

const fn lab_post(path: &'static str, handler: Handler) -> Endpoint {
    Endpoint { method: Method::POST, path, lab: true, access: Access::Primary, handler }
}

/// The OpenAPI 3.1 document of this API, served at `GET /openapi.json` (`docs/openapi.json` is a copy).
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// The routes served with `LAB_ENDPOINTS=lab`.
pub fn routes(lab: bool) -> impl Iterator<Item = &'static Endpoint> {
    ROUTES.iter().filter(move |endpoint| lab || !endpoint.lab)
}

/// Registers every route of `routes(lab)`.
pub fn configure(lab: bool) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        for endpoint in routes(lab) {
            cfg.service(endpoint.resource());
        }
    }
}

impl Endpoint {
    /// `path` served by this route alone; any other method gets the JSON 405 with `Allow`. Its handler
    /// may take the database handle `access` grants, and its successful responses say who served them.
    fn resource(&'static self) -> impl HttpServiceFactory {
        let route = (self.handler)(web::method(self.method.clone()));
        let (allow, access) = (self.method.as_str(), self.access);
        web::resource(self.path)
            .app_data(access)
            .route(route)
            .default_service(web::to(move || method_not_allowed(allow)))
            .wrap(from_fn(move |req, next: Next<_>| access::stamp_served_by(access, req, next)))
    }
}

async fn openapi() -> HttpResponse {
    HttpResponse::Ok().content_type("application/json").body(OPENAPI)
}

/// The app's default service: any path no route matches.
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such route".to_owned()))
}

/// 405, naming the one method the path serves in `Allow`.
async fn method_not_allowed(allow: &'static str) -> HttpResponse {
    let mut response = actix_web::ResponseError::error_response(&ApiError::MethodNotAllowed);
    response
        .headers_mut()
        .insert(actix_web::http::header::ALLOW, actix_web::http::header::HeaderValue::from_static(allow));
    response
}

/// Counts and times every request by route pattern (`unmatched` for unknown paths), method and status.
pub async fn record_metrics(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let start = Instant::now();
    // One Arc clone, not a copy of every metric handle.
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let method = bounded_method(req.method());
    let res = next.call(req).await?;
    if let Some(state) = state {
        let metrics = &state.metrics;
        let route = res.request().match_pattern().unwrap_or_else(|| "unmatched".to_owned());
        let status = res.status();
        metrics.http_requests.with_label_values(&[route.as_str(), method, status.as_str()]).inc();
        metrics
            .http_request_duration
            .with_label_values(&[route.as_str(), method])
            .observe(start.elapsed().as_secs_f64());
        tracing::debug!(http.route = %route, http.method = method, http.status = status.as_u16(), "request");
    }
    Ok(res)
}

/// While the node drains (after SIGTERM), asks every client to close its connection (`Connection:
/// close`), so a load balancer drops its idle keep-alive connections to this node before the listener
/// closes, and never sends a request down one that is being shut.
pub async fn close_when_draining(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let draining = req.app_data::<web::Data<AppState>>().map(|state| Arc::clone(&state.draining));
    let mut res = next.call(req).await?;
    if draining.is_some_and(|d| d.load(std::sync::atomic::Ordering::Relaxed)) {
        res.response_mut().head_mut().set_connection_type(actix_web::http::ConnectionType::Close);
    }
    Ok(res)
}

/// Keeps the `method` label bounded: any method outside HTTP's standard set is `other`.
fn bounded_method(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// A response body: `fields` (a JSON object) and `container`, this node's name, which every body carries.
fn with_container(mut fields: Value) -> Value {
    fields["container"] = errors::container_id().into();
    fields
}

/// The body of a successful write or lab run: `"success": true`, `fields`, `duration` (milliseconds
/// since `start`, to the microsecond) and `container`.
fn success(start: Instant, mut fields: Value) -> Value {
    fields["success"] = true.into();
    fields["duration"] = ((start.elapsed().as_secs_f64() * 1_000_000.0).round() / 1000.0).into();
    with_container(fields)
}

/// Reads a JSON number that is a whole number into an integer type: `10`, and also `10.0` or `1e1`, which
/// JSON Schema counts as integers too. Fractions, and numbers out of `T`'s range or past 2^53 written as
/// floats (where a float cannot be exact), are refused; so is anything but a number, without quoting it.
fn whole_number<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64> + TryFrom<u64>,
{
    use serde::de::Error;
    let number = deserializer.deserialize_any(NumberVisitor)?;
    let exact = |f: f64| f.fract() == 0.0 && f.abs() <= 2f64.powi(53);
    let value = match (number.as_u64(), number.as_i64(), number.as_f64()) {
        (Some(n), _, _) => T::try_from(n).ok(),
        (None, Some(n), _) => T::try_from(n).ok(),
        (None, None, Some(f)) if exact(f) => T::try_from(f as i64).ok(),
        _ => None,
    };
    value.ok_or_else(|| D::Error::custom(format!("expected a whole number in range, got {number}")))
}

/// A JSON number. serde's own visitors quote a string they refuse, whole: this one only says it was one.
struct NumberVisitor;

impl serde::de::Visitor<'_> for NumberVisitor {
    type Value = serde_json::Number;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a whole number")
    }

    fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
        Ok(n.into())
    }

    fn visit_i64<E>(self, n: i64) -> Result<Self::Value, E> {
        Ok(n.into())
    }

    fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Self::Value, E> {
        serde_json::Number::from_f64(n)
            .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Float(n), &self))
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Err(E::invalid_type(serde::de::Unexpected::Other("string"), &self))
    }
}

/// Refuses a string field holding NUL, which PostgreSQL text cannot hold.
fn no_nul(field: &str, value: &str) -> Result<(), ApiError> {
    match value.contains('\0') {
        true => Err(ApiError::InvalidRequest(format!("{field} must not contain NUL characters"))),
        false => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_with_nul_is_refused() {
        assert!(no_nul("data[0]", "").is_ok());
        assert!(no_nul("data[0]", "\0").is_err());
    }

    #[derive(Debug, serde::Deserialize)]
    struct Whole {
        #[serde(deserialize_with = "whole_number")]
        n: u16,
    }

    #[test]
    fn whole_numbers_are_read_whatever_their_notation() {
        let n = |json: &str| serde_json::from_str::<Whole>(json).map(|w| w.n).map_err(|e| e.to_string());
        assert_eq!(n(r#"{"n": 10}"#), Ok(10));
        assert_eq!(n(r#"{"n": 10.0}"#), Ok(10));
        assert_eq!(n(r#"{"n": 1e1}"#), Ok(10));
        for refused in ["1.5", "-1", "65536", "1e300", "\"10\"", "null"] {
            assert!(n(&format!(r#"{{"n": {refused}}}"#)).is_err(), "{refused}");
        }
        let string = n(r#"{"n": "a long string"}"#).unwrap_err();
        assert!(string.starts_with("invalid type: string, expected a whole number"), "{string}");
    }
}
