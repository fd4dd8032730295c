//! `/api/increment`, `/api/transfer`, `/api/counters/{key}`.

use std::time::Instant;

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::consistency::MinLsn;
use super::once::{respond, IdempotencyHeader};
use super::{check_text, success, with_container, JsonBody, OnPrimary, OnReplica};
use crate::db::{Counter, IdempotencyKey, Once, Transfer};
use crate::errors::ApiError;

/// Longest counter key, in characters (`counters.key VARCHAR(255)`).
const MAX_KEY_CHARS: usize = 255;

#[derive(Debug, Deserialize)]
pub struct IncrementRequest {
    key: String,
}

pub async fn increment(
    db: OnPrimary,
    IdempotencyHeader(idempotency_key): IdempotencyHeader,
    JsonBody(req): JsonBody<IncrementRequest>,
) -> Result<HttpResponse, ApiError> {
    let start = Instant::now();
    check_text("key", &req.key, Some(MAX_KEY_CHARS))?;
    let render = |counter: &Counter, _attempts: u32| {
        success(start, json!({ "key": counter.key, "value": counter.value }))
    };
    let key = idempotency_key.map(|k| IdempotencyKey::new(&k, "/api/increment", &json!({ "key": req.key })));
    let once = key.as_ref().map(|key| Once { key, render: &render });
    Ok(respond(db.increment(&req.key, once.as_ref()).await?, render))
}

#[derive(Debug, Deserialize)]
pub struct TransferRequest {
    from: String,
    to: String,
    #[serde(deserialize_with = "super::whole_number")]
    amount: i64,
}

pub async fn transfer(
    db: OnPrimary,
    IdempotencyHeader(idempotency_key): IdempotencyHeader,
    JsonBody(req): JsonBody<TransferRequest>,
) -> Result<HttpResponse, ApiError> {
    let start = Instant::now();
    check_text("from", &req.from, Some(MAX_KEY_CHARS))?;
    check_text("to", &req.to, Some(MAX_KEY_CHARS))?;
    if req.from == req.to {
        return Err(ApiError::InvalidRequest("from and to must be different counters".to_owned()));
    }
    if req.amount <= 0 {
        return Err(ApiError::InvalidRequest(format!("amount must be positive, got {}", req.amount)));
    }
    let render = |done: &Transfer, attempts: u32| {
        success(
            start,
            json!({ "from": done.from, "to": done.to, "amount": req.amount, "attempts": attempts }),
        )
    };
    let body = json!({ "from": req.from, "to": req.to, "amount": req.amount });
    let key = idempotency_key.map(|k| IdempotencyKey::new(&k, "/api/transfer", &body));
    let once = key.as_ref().map(|key| Once { key, render: &render });
    Ok(respond(db.transfer(&req.from, &req.to, req.amount, once.as_ref()).await?, render))
}

pub async fn get_counter(
    db: OnReplica,
    key: web::Path<String>,
    MinLsn(min_lsn): MinLsn,
) -> Result<HttpResponse, ApiError> {
    check_text("key", &key, Some(MAX_KEY_CHARS))?;
    let counter = db.read(async |replica| replica.counter(&key, min_lsn).await).await?;
    let counter = counter.ok_or_else(|| ApiError::NotFound("no such counter".to_owned()))?;
    Ok(HttpResponse::Ok().json(with_container(json!({ "key": counter.key, "value": counter.value }))))
}
