//! `/api/increment`, `/api/transfer`, `/api/counters/{key}`.

use std::ops::Deref;
use std::time::Instant;

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::consistency::MinLsn;
use super::header::Optional;
use super::idempotency::{respond, IdempotencyKeyHeader};
use super::{no_nul, success, with_container, JsonBody, OnPrimary, OnReplica};
use crate::db::{Counter, IdempotencyKey, Once, Transfer};
use crate::errors::ApiError;

/// Longest counter key, in characters (`counters.key VARCHAR(255)`).
const MAX_KEY_CHARS: usize = 255;

/// A counter's key: 1 to [`MAX_KEY_CHARS`] characters, without NUL.
#[derive(Debug)]
struct CounterKey(String);

impl CounterKey {
    /// `value`, the request's `field`; a 400 naming the field and the rule it broke.
    fn parse(field: &str, value: String) -> Result<Self, ApiError> {
        no_nul(field, &value)?;
        let len = value.chars().count();
        if len == 0 || len > MAX_KEY_CHARS {
            return Err(ApiError::InvalidRequest(format!(
                "{field} must be 1 to {MAX_KEY_CHARS} characters, got {len}"
            )));
        }
        Ok(CounterKey(value))
    }
}

impl Deref for CounterKey {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Deserialize)]
pub struct IncrementRequest {
    key: String,
}

pub async fn increment(
    db: OnPrimary,
    Optional(idempotency_key): Optional<IdempotencyKeyHeader>,
    JsonBody(req): JsonBody<IncrementRequest>,
) -> Result<HttpResponse, ApiError> {
    let start = Instant::now();
    let key = CounterKey::parse("key", req.key)?;
    let render = |counter: &Counter, _attempts: u32| {
        success(start, json!({ "key": counter.key, "value": counter.value }))
    };
    let idempotency_key =
        idempotency_key.map(|k| IdempotencyKey::new(&k, "/api/increment", &json!({ "key": &*key })));
    let once = idempotency_key.as_ref().map(|key| Once { key, render: &render });
    Ok(respond(db.increment(&key, once.as_ref()).await?, render))
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
    Optional(idempotency_key): Optional<IdempotencyKeyHeader>,
    JsonBody(req): JsonBody<TransferRequest>,
) -> Result<HttpResponse, ApiError> {
    let start = Instant::now();
    let (from, to) = (CounterKey::parse("from", req.from)?, CounterKey::parse("to", req.to)?);
    if from.0 == to.0 {
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
    let body = json!({ "from": &*from, "to": &*to, "amount": req.amount });
    let idempotency_key = idempotency_key.map(|k| IdempotencyKey::new(&k, "/api/transfer", &body));
    let once = idempotency_key.as_ref().map(|key| Once { key, render: &render });
    Ok(respond(db.transfer(&from, &to, req.amount, once.as_ref()).await?, render))
}

pub async fn get_counter(
    db: OnReplica,
    key: web::Path<String>,
    Optional(min_lsn): Optional<MinLsn>,
) -> Result<HttpResponse, ApiError> {
    let key = CounterKey::parse("key", key.into_inner())?;
    let counter = db.read(async |replica| replica.counter(&key, min_lsn).await).await?;
    let counter = counter.ok_or_else(|| ApiError::NotFound("no such counter".to_owned()))?;
    Ok(HttpResponse::Ok().json(with_container(json!({ "key": counter.key, "value": counter.value }))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_for_length_and_nul() {
        let key = |value: &str| CounterKey::parse("key", value.to_owned());
        assert!(key("k").is_ok());
        assert!(key(&"é".repeat(255)).is_ok());
        assert!(key(&"k".repeat(256)).is_err());
        assert!(key("").is_err());
        assert!(key("a\0b").is_err());
    }
}
