//! `/api/pool-stats`, `/api/stats`, `/metrics`.

use actix_web::{web, HttpResponse};
use serde_json::json;

use super::{with_container, AppState, OnReplica};
use crate::db::STATS_MAX_AGE;
use crate::errors::ApiError;

pub async fn pool_stats(state: web::Data<AppState>) -> HttpResponse {
    let pool = state.db().status();
    HttpResponse::Ok().json(with_container(json!({
        "maxSize": pool.max_size,
        "totalCount": pool.size,
        "idleCount": pool.available,
        "waitingCount": pool.waiting,
    })))
}

pub async fn stats(state: web::Data<AppState>, db: OnReplica) -> Result<HttpResponse, ApiError> {
    let (database, age) = db.read(async |replica| replica.stats().await).await?;
    let pool = state.db().status();
    Ok(HttpResponse::Ok().json(with_container(json!({
        "database": database,
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
    }))))
}

pub async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let text = state.metrics.render(state.db().status()).map_err(|e| {
        tracing::error!(error = %e, "rendering metrics failed");
        ApiError::Internal
    })?;
    Ok(HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(text))
}
