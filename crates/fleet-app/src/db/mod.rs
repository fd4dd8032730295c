//! The database layer: the pool, checkouts, retries and error accounting. SQL lives in the submodules.

mod coalesce;
mod counters;
mod data;
pub mod isolation;
mod lab;
pub mod migrations;
mod stats;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, Status, Timeouts,
};
use rand::Rng;
use tokio_postgres::NoTls;

use crate::config::{Config, LockOrder};
use crate::metrics::Metrics;

pub use coalesce::Coalescer;
pub use counters::{Counter, Transfer};
pub use stats::{DatabaseStats, Health};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("pool: {0}")]
    Pool(#[from] PoolError),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// One failure shared by every request of a coalesced batch.
    #[error("{0}")]
    Shared(Arc<DbError>),
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
            DbError::BatchLost => None,
        }
    }

    /// The connection broke or the server is going away: the query never completed.
    pub fn is_connection_error(&self) -> bool {
        match self {
            DbError::Postgres(e) => {
                e.is_closed()
                    || matches!(e.code().map(|c| c.code()), Some(code) if code.starts_with("08") || code.starts_with("57P"))
                    || (e.code().is_none()
                        && std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()))
            }
            DbError::Pool(_) => true,
            DbError::Shared(inner) => inner.is_connection_error(),
            DbError::BatchLost => false,
        }
    }

    fn is_retryable(&self) -> bool {
        matches!(self.sqlstate(), Some("40001" | "40P01"))
    }
}

/// The pool and the settings every query needs.
#[derive(Debug, Clone)]
pub struct Db {
    pool: Pool,
    metrics: Metrics,
    container_id: String,
    retry_max_attempts: u32,
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
    async fn client(&self) -> Result<Object, DbError> {
        let start = Instant::now();
        let client = self.pool.get().await;
        self.metrics.pool_wait.observe(start.elapsed().as_secs_f64());
        Ok(client?)
    }

    /// Runs `work`, counting its error (if any) in `fleet_db_errors_total`.
    async fn observed<T>(&self, work: impl Future<Output = Result<T, DbError>>) -> Result<T, DbError> {
        let result = work.await;
        if let Err(err) = &result {
            if let Some(sqlstate) = err.sqlstate() {
                self.metrics.db_errors.with_label_values(&[sqlstate]).inc();
            }
        }
        result
    }

    /// Runs the transaction `attempt` until it succeeds, fails with an error that is not a deadlock (40P01)
    /// or serialization failure (40001), or has been tried `RETRY_MAX_ATTEMPTS` times. Between attempts it
    /// sleeps a random time up to an exponentially growing bound (full jitter).
    async fn retrying<T, F, Fut>(&self, mut attempt: F) -> Result<Retried<T>, DbError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, DbError>>,
    {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.observed(attempt()).await {
                Ok(value) => return Ok(Retried { value, attempts }),
                Err(err) if err.is_retryable() && attempts < self.retry_max_attempts => {
                    let sqlstate = err.sqlstate().unwrap_or_default();
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
