//! The one error type every handler returns, and how each error becomes an HTTP response.
//!
//! Body: `{"success": false, "error": "<message>", "code": "<code>", "container": "<id>"}`. `code` is a
//! PostgreSQL SQLSTATE for database errors that reach the client, or a snake_case app code. Internals are
//! logged once, here, and never sent.

use std::sync::OnceLock;

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use deadpool_postgres::{PoolError, TimeoutType};
use serde_json::json;

use crate::db::isolation::LabError;
use crate::db::DbError;

static CONTAINER_ID: OnceLock<String> = OnceLock::new();

/// Names this process in every response body (`"container"`); set once at start-up.
pub fn set_container_id(id: &str) {
    let _ = CONTAINER_ID.set(id.to_owned());
}

pub fn container_id() -> &'static str {
    CONTAINER_ID.get().map_or("unknown", String::as_str)
}

/// Seconds a client should wait before retrying a 503 or a 429.
pub const RETRY_AFTER_S: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the body is not JSON.
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    /// 400: JSON of the wrong shape or values out of range.
    #[error("{0}")]
    InvalidRequest(String),
    /// 400: an `X-Fleet-Min-Lsn` that is no token.
    #[error("{0}")]
    InvalidToken(String),
    /// 400: an `X-Fleet-Min-Lsn` naming a position the primary has not reached: no write of this
    /// cluster gave it out (yet). Refused at once, never waited for.
    #[error(
        "X-Fleet-Min-Lsn names a timeline or WAL position the primary has not reached; send a token that a \
         write's X-Fleet-Lsn gave"
    )]
    FutureToken,
    /// 404
    #[error("{0}")]
    NotFound(String),
    /// 405
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 408: the body did not arrive within `BODY_READ_TIMEOUT_MS` (the connection is closed).
    #[error("the request body did not arrive within {ms} ms")]
    BodyTimeout { ms: u64 },
    /// 413
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 409: a deadlock, serialization failure or unique violation that survived every retry.
    #[error("{message}")]
    Conflict { sqlstate: String, message: String },
    /// 422: a value PostgreSQL cannot hold (a counter past i64).
    #[error("{0}")]
    OutOfRange(String),
    /// 503: no pooled connection became free in time.
    #[error("no database connection became available in time")]
    PoolTimeout,
    /// 503: the database cannot be reached or is shutting down.
    #[error("the database is unavailable")]
    DatabaseUnavailable,
    /// 503: the connection broke after COMMIT was sent.
    #[error(
        "the database connection was lost while committing: the write may or may not have happened; \
         retry with the same Idempotency-Key to find out safely"
    )]
    CommitUnknown,
    /// 409: the request that first used this idempotency key is still running.
    #[error("a request with this Idempotency-Key is still running; retry later")]
    IdempotencyKeyInUse,
    /// 422: this idempotency key was first used with a different request.
    #[error("this Idempotency-Key was already used with a different request body")]
    IdempotencyKeyReused,
    /// 503: the statement ran past `statement_timeout`.
    #[error("the database did not answer in time")]
    StatementTimeout,
    /// 429: the lab endpoints already use their share of the node's connections.
    #[error("{0}")]
    LabBusy(String),
    /// 503: the request's deadline (`RETRY_DEADLINE_MS`) passed while it waited for a busy counter.
    #[error("the request's deadline passed while it waited for a busy counter; retry later")]
    DeadlineExceeded,
    /// 503: the node's budget for large bodies stayed full for `BODY_READ_TIMEOUT_MS`; the body was not read.
    #[error("this node is reading as many large request bodies as it holds at once; retry later")]
    BodyBudgetBusy,
    /// 503: the node is shutting down.
    #[error("this node is shutting down")]
    Draining,
    /// 500: details are in the log only.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn code(&self) -> &str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidRequest(_) => "invalid_request",
            ApiError::InvalidToken(_) => "invalid_token",
            ApiError::FutureToken => "future_token",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::BodyTimeout { .. } => "request_timeout",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::Conflict { sqlstate, .. } => sqlstate,
            ApiError::OutOfRange(_) => "22003",
            ApiError::PoolTimeout => "pool_timeout",
            ApiError::DatabaseUnavailable | ApiError::Draining => "database_unavailable",
            ApiError::StatementTimeout => "57014",
            ApiError::CommitUnknown => "08007",
            ApiError::IdempotencyKeyInUse => "idempotency_key_in_use",
            ApiError::IdempotencyKeyReused => "idempotency_key_reused",
            ApiError::LabBusy(_) => "lab_busy",
            ApiError::DeadlineExceeded => "deadline_exceeded",
            ApiError::BodyBudgetBusy => "body_budget_busy",
            ApiError::Internal => "internal",
        }
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_)
            | ApiError::InvalidRequest(_)
            | ApiError::InvalidToken(_)
            | ApiError::FutureToken => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Conflict { .. } | ApiError::IdempotencyKeyInUse => StatusCode::CONFLICT,
            ApiError::IdempotencyKeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::OutOfRange(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PoolTimeout
            | ApiError::DatabaseUnavailable
            | ApiError::StatementTimeout
            | ApiError::CommitUnknown
            | ApiError::DeadlineExceeded
            | ApiError::BodyBudgetBusy
            | ApiError::Draining => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::LabBusy(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let mut response = HttpResponse::build(status);
        if matches!(status, StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS) {
            response.insert_header((header::RETRY_AFTER, RETRY_AFTER_S));
        }
        // The rest of a late body may still come: the connection cannot carry another request.
        if matches!(self, ApiError::BodyTimeout { .. }) {
            response.force_close();
        }
        response.json(json!({
            "success": false,
            "error": self.to_string(),
            "code": self.code(),
            "container": container_id(),
        }))
    }
}

impl From<DbError> for ApiError {
    fn from(err: DbError) -> Self {
        ApiError::from_db(&err)
    }
}

impl ApiError {
    /// What a client is told about a database error; unexpected ones are logged here, once.
    fn from_db(err: &DbError) -> Self {
        match err {
            DbError::Shared(inner) => ApiError::from_db(inner),
            DbError::Pool(PoolError::Timeout(TimeoutType::Wait)) => ApiError::PoolTimeout,
            DbError::Pool(PoolError::Timeout(_) | PoolError::Backend(_) | PoolError::Closed) => {
                ApiError::DatabaseUnavailable
            }
            DbError::Postgres(pg) => match pg.code().map(|c| c.code()) {
                Some(code @ ("40P01" | "40001" | "23505")) => ApiError::Conflict {
                    sqlstate: code.to_owned(),
                    message: format!("transaction aborted by the database ({code}) after every retry"),
                },
                Some("22003") => ApiError::OutOfRange("value out of range for a 64-bit counter".to_owned()),
                Some("57014") => ApiError::StatementTimeout,
                _ if err.is_connection_error() => ApiError::DatabaseUnavailable,
                sqlstate => {
                    tracing::error!(error = %err, sqlstate, "database error");
                    ApiError::Internal
                }
            },
            DbError::CommitUnknown(_) | DbError::CommitTimedOut => ApiError::CommitUnknown,
            DbError::AttemptTimedOut => ApiError::DatabaseUnavailable,
            // A batch that ended without an answer (its runner died: a bug) may have sent its COMMIT.
            DbError::BatchLost => {
                tracing::error!(error = %err, "coalesced batch lost; its outcome is unknown");
                ApiError::CommitUnknown
            }
            DbError::DeadlinePassed => ApiError::DeadlineExceeded,
            DbError::FutureToken => ApiError::FutureToken,
            DbError::IdempotencyKeyReused => ApiError::IdempotencyKeyReused,
            DbError::IdempotencyKeyInUse => ApiError::IdempotencyKeyInUse,
            DbError::Pool(_) => {
                tracing::error!(error = %err, "database layer error");
                ApiError::Internal
            }
        }
    }
}

impl From<LabError> for ApiError {
    fn from(err: LabError) -> Self {
        match err {
            LabError::Busy => ApiError::LabBusy(err.to_string()),
            LabError::TimedOut => ApiError::StatementTimeout,
            LabError::Db(err) => err.into(),
        }
    }
}
