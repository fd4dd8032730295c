//! `/api/bulk-insert`.

use std::time::Instant;

use actix_web::HttpResponse;
use serde::Serialize;
use serde_json::json;

use super::body::off_worker;
use super::header::Optional;
use super::idempotency::{respond, IdempotencyKeyHeader};
use super::rows::BulkRows;
use super::{success, OnPrimary};
use crate::db::{IdempotencyKey, Once};
use crate::errors::ApiError;

/// What an idempotency key's fingerprint is taken of: the body as `{"data": [...]}`, serialised
/// straight into the hash (no copy of the rows).
#[derive(Serialize)]
struct Fingerprinted<'a> {
    data: &'a [String],
}

/// Rows are counted, measured and checked for NUL while the body is parsed (see [`BulkRows`]).
pub async fn bulk_insert(
    db: OnPrimary,
    Optional(idempotency_key): Optional<IdempotencyKeyHeader>,
    BulkRows { rows, share: _held_until_answered }: BulkRows,
) -> Result<HttpResponse, ApiError> {
    let start = Instant::now();
    if rows.is_empty() {
        return Err(ApiError::InvalidRequest("data must hold at least one string".to_owned()));
    }
    let render = |ids: &Vec<i64>, _attempts: u32| success(start, json!({ "count": ids.len(), "ids": ids }));
    let (rows, key) = match idempotency_key {
        None => (rows, None),
        // Hashing megabytes takes a while: off the worker, like the parse (see `BulkRows`).
        Some(k) => {
            off_worker(move || {
                let key = IdempotencyKey::new(&k, "/api/bulk-insert", &Fingerprinted { data: &rows });
                (rows, Some(key))
            })
            .await?
        }
    };
    let once = key.as_ref().map(|key| Once { key, render: &render });
    Ok(respond(db.bulk_insert(&rows, once.as_ref()).await?, render))
}
