//! The database layer: the pool, checkouts, retries and error accounting. SQL lives in the submodules.

mod coalesce;
mod counters;
mod data;
mod deadline;
pub mod idempotency;
pub mod isolation;
mod lab;
pub mod migrations;
mod stats;
mod transact;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{
    Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime, Status, Timeouts,
};
use rand::Rng;
use tokio_postgres::NoTls;

use crate::config::{Config, LockOrder};
use crate::metrics::Metrics;
use deadline::Conn;

pub use coalesce::Coalescer;
pub use counters::{Counter, Transfer};
pub use idempotency::{IdempotencyKey, StoredResponse};
pub use stats::{DatabaseStats, Health};
pub use transact::{Once, Written};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("pool: {0}")]
    Pool(#[from] PoolError),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// One failure shared by every request of a coalesced batch.
    #[error("{0}")]
    Shared(Arc<DbError>),
    /// The connection broke after COMMIT was sent: the transaction may or may not have committed.
    #[error("connection lost during COMMIT: {0}")]
    CommitUnknown(tokio_postgres::Error),
    /// The idempotency key was first used with another request body.
    #[error("idempotency key reused with a different request")]
    IdempotencyKeyReused,
    /// The request that first used the idempotency key is still running.
    #[error("idempotency key in use by a request still running")]
    IdempotencyKeyInUse,
    /// An attempt ran past its deadline (see [`deadline`]) before sending COMMIT: nothing committed.
    #[error("the database did not answer within the attempt's deadline")]
    AttemptTimedOut,
    /// An attempt ran past its deadline after sending COMMIT: the outcome is unknown.
    #[error("the database did not answer COMMIT within the attempt's deadline")]
    CommitTimedOut,
    /// A coalesced batch ended without answering (its task died): a bug, never expected.
    #[error("the coalesced batch ended without an answer")]
    BatchLost,
}

impl DbError {
    /// The SQLSTATE, `08006` (connection failure) for a lost connection, or `None`.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            DbError::Postgres(e) => match e.code() {
                Some(code) => Some(code.code()),
                None if self.is_connection_error() => Some("08006"),
                None => None,
            },
            DbError::Pool(PoolError::Backend(e)) => e.code().map(|c| c.code()).or(Some("08006")),
            DbError::Pool(_) => None,
            DbError::Shared(inner) => inner.sqlstate(),
            DbError::CommitUnknown(_) | DbError::CommitTimedOut => Some("08007"),
            DbError::AttemptTimedOut
            | DbError::BatchLost
            | DbError::IdempotencyKeyReused
            | DbError::IdempotencyKeyInUse => None,
        }
    }

    /// The connection broke or the server is going away: the query never completed.
    pub fn is_connection_error(&self) -> bool {
        match self {
            DbError::Postgres(e) => err_is_connection(e),
            DbError::Pool(_) => true,
            DbError::Shared(inner) => inner.is_connection_error(),
            DbError::CommitUnknown(_) | DbError::AttemptTimedOut | DbError::CommitTimedOut => true,
            DbError::BatchLost | DbError::IdempotencyKeyReused | DbError::IdempotencyKeyInUse => false,
        }
    }

    /// An error from sending COMMIT: a lost connection there leaves the outcome unknown.
    pub(super) fn at_commit(err: tokio_postgres::Error) -> DbError {
        let err = DbError::Postgres(err);
        match err {
            DbError::Postgres(e) if err_is_connection(&e) => DbError::CommitUnknown(e),
            err => err,
        }
    }

    /// Safe to run again: PostgreSQL aborted the transaction (deadlock, serialization failure), or the
    /// connection broke before COMMIT was sent (so nothing committed). Never after a lost COMMIT, and never
    /// a pool timeout or a passed attempt deadline: that wait is already as long as a client is promised
    /// to wait.
    fn is_retryable(&self) -> bool {
        match self {
            DbError::CommitUnknown(_)
            | DbError::Pool(PoolError::Timeout(_))
            | DbError::AttemptTimedOut
            | DbError::CommitTimedOut => false,
            DbError::Shared(inner) => inner.is_retryable(),
            _ => matches!(self.sqlstate(), Some("40001" | "40P01")) || self.is_connection_error(),
        }
    }
}

/// The connection broke, or the server is going away (08xxx, 57P0x): the statement never completed.
fn err_is_connection(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || matches!(e.code().map(|c| c.code()), Some(code) if code.starts_with("08") || code.starts_with("57P"))
        || (e.code().is_none() && std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()))
}

/// The pool and the settings every query needs.
#[derive(Debug, Clone)]
pub struct Db {
    pool: Pool,
    metrics: Metrics,
    container_id: String,
    retry_max_attempts: u32,
    retry_deadline: Duration,
    /// `POOL_WAIT_TIMEOUT_MS` and `DB_ATTEMPT_TIMEOUT_MS`: together, one attempt's deadline.
    pool_wait: Duration,
    attempt_timeout: Duration,
    lock_order: LockOrder,
    isolation: isolation::IsolationLab,
}

/// A value and the number of attempts it took.
#[derive(Debug)]
pub struct Retried<T> {
    pub value: T,
    pub attempts: u32,
}

impl Db {
    /// Builds the pool; no connection is opened until the first checkout.
    pub fn new(config: &Config, metrics: Metrics) -> anyhow::Result<Self> {
        let manager = Manager::from_config(
            config.pg_config()?,
            NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let wait = Some(config.pool_wait_timeout());
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(Runtime::Tokio1)
            .timeouts(Timeouts { wait, create: wait, recycle: wait })
            .build()?;
        Ok(Db {
            pool,
            metrics,
            container_id: config.container_id.clone(),
            retry_max_attempts: config.retry_max_attempts,
            retry_deadline: Duration::from_millis(config.retry_deadline_ms),
            pool_wait: config.pool_wait_timeout(),
            attempt_timeout: config.db_attempt_timeout(),
            lock_order: config.lock_order,
            isolation: isolation::IsolationLab::new(config.pg_config()?),
        })
    }

    pub fn status(&self) -> Status {
        self.pool.status()
    }

    pub fn close(&self) {
        self.pool.close();
    }

    /// A pooled connection; the wait is recorded in `fleet_db_pool_wait_seconds`.
    async fn client(&self) -> Result<Conn, DbError> {
        let start = Instant::now();
        let client = self.pool.get().await;
        self.metrics.pool_wait.observe(start.elapsed().as_secs_f64());
        Ok(Conn::new(client?))
    }

    /// Runs `work` as one attempt within its deadline (see [`deadline`]), counting its error (if any)
    /// in `fleet_db_errors_total`.
    async fn observed<T>(&self, work: impl Future<Output = Result<T, DbError>>) -> Result<T, DbError> {
        self.observed_taking(Duration::ZERO, work).await
    }

    /// [`Db::observed`] for work that takes `extra` by design (a lab hold).
    async fn observed_taking<T>(
        &self,
        extra: Duration,
        work: impl Future<Output = Result<T, DbError>>,
    ) -> Result<T, DbError> {
        let result = self.within_deadline(extra, work).await;
        if let Err(err) = &result {
            if let Some(sqlstate) = err.sqlstate() {
                self.metrics.db_errors.with_label_values(&[sqlstate]).inc();
            }
        }
        result
    }

    /// Runs `attempt` (given its number, from 1) until it succeeds, fails with an error that is not safe
    /// to retry (see `DbError::is_retryable`), has been tried `RETRY_MAX_ATTEMPTS` times, or has run past
    /// `RETRY_DEADLINE_MS`. Between attempts it sleeps a random time up to an exponentially growing bound
    /// (full jitter). Every retry is counted in `fleet_db_transaction_retries_total{sqlstate}`.
    async fn retrying<T>(
        &self,
        mut attempt: impl AsyncFnMut(u32) -> Result<T, DbError>,
    ) -> Result<Retried<T>, DbError> {
        let start = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.observed(attempt(attempts)).await {
                Ok(value) => return Ok(Retried { value, attempts }),
                Err(err)
                    if err.is_retryable()
                        && attempts < self.retry_max_attempts
                        && start.elapsed() < self.retry_deadline =>
                {
                    let sqlstate = err.sqlstate().unwrap_or("none");
                    self.metrics.transaction_retries.with_label_values(&[sqlstate]).inc();
                    tracing::debug!(db.sqlstate = sqlstate, retry.attempt = attempts, "retrying transaction");
                    tokio::time::sleep(backoff(attempts)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// Full-jitter backoff: uniform in [0, min(5 ms × 2^attempt, 500 ms)].
fn backoff(attempt: u32) -> Duration {
    let cap_ms = (5u64 << attempt.min(10)).min(500);
    Duration::from_micros(rand::rng().random_range(0..=cap_ms * 1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 1..20 {
            let cap = Duration::from_millis((5u64 << attempt.min(10)).min(500));
            assert!(backoff(attempt) <= cap);
        }
        assert!((0..100).map(|_| backoff(12)).any(|d| d > Duration::from_millis(250)));
    }
}
