//! `/api/bulk-insert`.

use std::time::Instant;

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::once::{respond, IdempotencyHeader};
use super::{check_text, millis_since, AppState, JsonBody};
use crate::db::{IdempotencyKey, Once};
use crate::errors::ApiError;

#[derive(Debug, Deserialize)]
pub struct BulkInsertRequest {
    data: Vec<String>,
}

pub async fn bulk_insert(
    state: web::Data<AppState>,
    IdempotencyHeader(idempotency_key): IdempotencyHeader,
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
    let render = |ids: &Vec<i64>, _attempts: u32| {
        json!({
            "success": true,
            "count": ids.len(),
            "ids": ids,
            "duration": millis_since(start),
            "container": state.container_id,
        })
    };
    let key =
        idempotency_key.map(|k| IdempotencyKey::new(&k, "/api/bulk-insert", &json!({ "data": req.data })));
    let once = key.as_ref().map(|key| Once { key, render: &render });
    Ok(respond(state.db.bulk_insert(&req.data, once.as_ref()).await?, render))
}
