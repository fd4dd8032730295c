//! `/api/pool-stats`, `/api/stats`, `/metrics`.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::served::served_by;
use super::AppState;
use crate::db::STATS_MAX_AGE;
use crate::errors::ApiError;

pub async fn pool_stats(state: web::Data<AppState>) -> HttpResponse {
    let pool = state.db.status();
    HttpResponse::Ok().json(json!({
        "container": state.container_id,
        "maxSize": pool.max_size,
        "totalCount": pool.size,
        "idleCount": pool.available,
        "waitingCount": pool.waiting,
    }))
}

pub async fn stats(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let (database, age) = state.db.stats().await?;
    let pool = state.db.status();
    let mut response = HttpResponse::Ok();
    served_by(&mut response, &database.served_by);
    Ok(response.json(json!({
        "container": state.container_id,
        "database": database.value,
        // The counts are a snapshot: taken at most `STATS_MAX_AGE` ago, shared by every caller meanwhile.
        "databaseSource": "snapshot",
        "databaseAgeMs": age.as_millis() as u64,
        "databaseMaxAgeMs": STATS_MAX_AGE.as_millis() as u64,
        "pool": {
            "maxSize": pool.max_size,
            "totalCount": pool.size,
            "idleCount": pool.available,
            "waitingCount": pool.waiting,
        },
        "uptime": state.started.elapsed().as_secs_f64(),
    })))
}

pub async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let text = state.metrics.render(state.db.status()).map_err(|e| {
        tracing::error!(error = %e, "rendering metrics failed");
        ApiError::Internal
    })?;
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(text))
}
