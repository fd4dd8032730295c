//! `/health` (the seed's probe), `/health/live` (never touches the database), `/health/ready`.

use std::sync::atomic::Ordering;

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::served::from_primary;
use super::AppState;
use crate::errors::ApiError;

pub async fn health(state: web::Data<AppState>) -> HttpResponse {
    match state.db.health().await {
        Ok(health) => {
            let pool = state.db.status();
            HttpResponse::Ok().insert_header(from_primary()).json(json!({
                "status": "healthy",
                "container": state.container_id,
                "dbTime": health.db_time,
                "poolStats": {"total": pool.size, "idle": pool.available, "waiting": pool.waiting},
            }))
        }
        Err(err) => unhealthy(&state, &ApiError::from(err)),
    }
}

pub async fn live(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "alive", "container": state.container_id}))
}

/// 200 while the database answers and the node is not draining.
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    if state.draining.load(Ordering::Relaxed) {
        return unhealthy(&state, &ApiError::Draining);
    }
    match state.db.health().await {
        Ok(_) => HttpResponse::Ok()
            .insert_header(from_primary())
            .json(json!({"status": "ready", "container": state.container_id})),
        Err(err) => unhealthy(&state, &ApiError::from(err)),
    }
}

fn unhealthy(state: &AppState, err: &ApiError) -> HttpResponse {
    HttpResponse::ServiceUnavailable()
        .insert_header((actix_web::http::header::RETRY_AFTER, crate::errors::RETRY_AFTER_S))
        .json(json!({"status": "unhealthy", "error": err.to_string(), "container": state.container_id}))
}
