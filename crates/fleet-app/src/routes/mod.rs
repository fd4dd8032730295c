//! The route table, shared state, and what every route has in common: the JSON body extractor,
//! 404/405 answers and the request metrics middleware.

mod body;
mod counters;
mod data;
mod health;
mod isolation;
mod lab;
mod once;
mod rows;
mod stats;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse};

pub use body::{BodyBudget, JsonBody};

use crate::config::Config;
use crate::config::IncrementMode;
use crate::db::{Coalescer, Db};
use crate::errors::ApiError;
use crate::metrics::Metrics;

/// What every handler can reach; built once and shared by all workers.
#[derive(Debug)]
pub struct AppState {
    pub db: Db,
    /// Set when `INCREMENT_MODE=coalesce`.
    pub coalescer: Option<Coalescer>,
    pub metrics: Metrics,
    pub container_id: String,
    pub bulk_max_rows: usize,
    pub bulk_max_row_bytes: usize,
    pub body_limit_bytes: usize,
    /// Shared by every request with a large body.
    pub body_budget: BodyBudget,
    pub started: Instant,
    /// Set on SIGTERM: readiness answers 503 from then on.
    pub draining: Arc<AtomicBool>,
}

impl AppState {
    pub fn new(config: &Config, db: Db, metrics: Metrics) -> Self {
        AppState {
            coalescer: (config.increment_mode == IncrementMode::Coalesce).then(|| Coalescer::new(db.clone())),
            db,
            metrics,
            container_id: config.container_id.clone(),
            bulk_max_rows: config.bulk_max_rows,
            bulk_max_row_bytes: config.bulk_max_row_bytes,
            body_limit_bytes: config.body_limit_bytes,
            body_budget: BodyBudget::new(config.body_limit_bytes),
            started: Instant::now(),
            draining: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Registers every route. `lab` adds `/api/hold` and `/api/test-isolation`.
pub fn configure(lab: bool) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.service(only("/api/increment", web::post().to(counters::increment)))
            .service(only("/api/transfer", web::post().to(counters::transfer)))
            .service(only("/api/counters/{key}", web::get().to(counters::get_counter)))
            .service(only("/api/bulk-insert", web::post().to(data::bulk_insert)))
            .service(only("/api/pool-stats", web::get().to(stats::pool_stats)))
            .service(only("/api/stats", web::get().to(stats::stats)))
            .service(only("/metrics", web::get().to(stats::metrics)))
            .service(only("/health", web::get().to(health::health)))
            .service(only("/health/live", web::get().to(health::live)))
            .service(only("/health/ready", web::get().to(health::ready)));
        if lab {
            cfg.service(only("/api/hold", web::post().to(lab::hold)));
            cfg.service(only("/api/test-isolation", web::post().to(isolation::test_isolation)));
        }
    }
}

/// `path` served by `route` alone; any other method gets the JSON 405.
fn only(path: &str, route: actix_web::Route) -> actix_web::Resource {
    web::resource(path).route(route).default_service(web::to(method_not_allowed))
}

/// The app's default service: any path no route matches.
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such route".to_owned()))
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
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

/// Milliseconds since `start`, to the microsecond: the `duration` of every write response.
fn millis_since(start: Instant) -> f64 {
    (start.elapsed().as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// Checks a string field: `max_chars` at most (when given), never empty when bounded, and no NUL
/// (PostgreSQL text cannot hold one).
fn check_text(field: &str, value: &str, max_chars: Option<usize>) -> Result<(), ApiError> {
    if value.contains('\0') {
        return Err(ApiError::InvalidRequest(format!("{field} must not contain NUL characters")));
    }
    if let Some(max) = max_chars {
        let len = value.chars().count();
        if len == 0 || len > max {
            return Err(ApiError::InvalidRequest(format!(
                "{field} must be 1 to {max} characters, got {len}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_for_length_and_nul() {
        assert!(check_text("key", "k", Some(255)).is_ok());
        assert!(check_text("key", &"é".repeat(255), Some(255)).is_ok());
        assert!(check_text("key", &"k".repeat(256), Some(255)).is_err());
        assert!(check_text("key", "", Some(255)).is_err());
        assert!(check_text("key", "a\0b", Some(255)).is_err());
        assert!(check_text("data[0]", "", None).is_ok());
        assert!(check_text("data[0]", "\0", None).is_err());
    }
}
