//! `/health` (liveness and the database's clock, for load balancers that probe one path), `/health/live`
//! (never touches the database), `/health/ready`.

use std::sync::atomic::Ordering;

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::{with_container, AppState, OnPrimary};
use crate::errors::ApiError;

pub async fn health(db: OnPrimary) -> HttpResponse {
    match db.health().await {
        Ok(health) => {
            let pool = db.status();
            HttpResponse::Ok().json(with_container(json!({
                "status": "healthy",
                "dbTime": health.db_time,
                "poolStats": {"total": pool.size, "idle": pool.available, "waiting": pool.waiting},
            })))
        }
        Err(err) => unhealthy(&ApiError::from(err)),
    }
}

pub async fn live() -> HttpResponse {
    HttpResponse::Ok().json(with_container(json!({"status": "alive"})))
}

/// 200 while the database answers and the node is not draining.
pub async fn ready(state: web::Data<AppState>, db: OnPrimary) -> HttpResponse {
    if state.draining.load(Ordering::Relaxed) {
        return unhealthy(&ApiError::Draining);
    }
    match db.health().await {
        Ok(_) => HttpResponse::Ok().json(with_container(json!({"status": "ready"}))),
        Err(err) => unhealthy(&ApiError::from(err)),
    }
}

fn unhealthy(err: &ApiError) -> HttpResponse {
    HttpResponse::ServiceUnavailable()
        .insert_header((actix_web::http::header::RETRY_AFTER, crate::errors::RETRY_AFTER_S))
        .json(with_container(json!({"status": "unhealthy", "error": err.to_string()})))
}
