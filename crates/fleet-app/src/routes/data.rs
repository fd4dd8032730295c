//! `/api/bulk-insert`.

use std::time::Instant;

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::{check_text, millis_since, AppState, JsonBody};
use crate::errors::ApiError;

#[derive(Debug, Deserialize)]
pub struct BulkInsertRequest {
    data: Vec<String>,
}

pub async fn bulk_insert(
    state: web::Data<AppState>,
    JsonBody(req): JsonBody<BulkInsertRequest>,
) -> Result<HttpResponse, ApiError> {
    let start = Instant::now();
    let max = state.bulk_max_rows;
    if req.data.is_empty() {
        return Err(ApiError::InvalidRequest("data must hold at least one string".to_owned()));
    }
    if req.data.len() > max {
        return Err(ApiError::PayloadTooLarge(format!(
            "data holds {} rows; at most {max} (BULK_MAX_ROWS) are allowed",
            req.data.len()
        )));
    }
    for (i, content) in req.data.iter().enumerate() {
        check_text(&format!("data[{i}]"), content, None)?;
    }
    let ids = state.db.bulk_insert(&req.data).await?;
    Ok(HttpResponse::Ok().json(json!({
        "success": true,
        "count": ids.len(),
        "ids": ids,
        "duration": millis_since(start),
        "container": state.container_id,
    })))
}
