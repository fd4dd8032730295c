//! Lab endpoints (`LAB_ENDPOINTS=false` removes them): `/api/hold`.

use std::time::{Duration, Instant};

use actix_web::HttpResponse;
use serde::Deserialize;
use serde_json::json;

use super::{success, JsonBody, OnPrimary};
use crate::errors::ApiError;

/// Longest hold, in milliseconds.
const MAX_HOLD_MS: u64 = 10_000;

#[derive(Debug, Deserialize)]
pub struct HoldRequest {
    #[serde(deserialize_with = "super::whole_number")]
    ms: u64,
}

pub async fn hold(db: OnPrimary, JsonBody(req): JsonBody<HoldRequest>) -> Result<HttpResponse, ApiError> {
    let start = Instant::now();
    if !(1..=MAX_HOLD_MS).contains(&req.ms) {
        return Err(ApiError::InvalidRequest(format!("ms must be 1 to {MAX_HOLD_MS}, got {}", req.ms)));
    }
    db.hold(Duration::from_millis(req.ms)).await?;
    Ok(HttpResponse::Ok().json(success(start, json!({ "ms": req.ms }))))
}
