//! The database layer: the pool, checkouts, retries and error accounting. SQL lives in the submodules.

mod coalesce;
mod counters;
mod data;
mod deadline;
mod gate;
pub mod idempotency;
pub mod isolation;
mod lab;
pub mod migrations;
mod read;
mod stats;
pub mod tls;
mod token;
mod transact;

use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{
    Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime, Status, Timeouts,
};
use rand::Rng;

use crate::config::{Config, LockOrder};
use crate::metrics::Metrics;
use deadline::Conn;

use coalesce::Coalescer;
pub use counters::{Counter, Transfer};
pub use idempotency::{IdempotencyKey, StoredResponse};
pub use read::{Read, ServedBy};
pub use stats::{DatabaseStats, Health, STATS_MAX_AGE, STATS_QUERY};
pub use token::{parse_token, Position, Token};
pub use tokio_postgres::types::PgLsn;
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
    /// A coalesced batch ended without answering (its task died): whether it committed is unknown.
    #[error("the coalesced batch ended without an answer")]
    BatchLost,
    /// The request's deadline (`RETRY_DEADLINE_MS`) passed while it waited for its rows' gates.
    #[error("the request's deadline passed while it waited for a busy counter")]
    DeadlinePassed,
    /// A read's `X-Fleet-Min-Lsn` names a position the primary has not reached (see `db::token`).
    #[error("the read's token names a position the primary has not reached")]
    FutureToken,
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
            DbError::CommitUnknown(_) | DbError::CommitTimedOut | DbError::BatchLost => Some("08007"),
            DbError::AttemptTimedOut
            | DbError::IdempotencyKeyReused
            | DbError::IdempotencyKeyInUse
            | DbError::DeadlinePassed
            | DbError::FutureToken => None,
        }
    }

    /// The connection broke or the server is going away: the query never completed.
    pub fn is_connection_error(&self) -> bool {
        match self {
            DbError::Postgres(e) => err_is_connection(e),
            DbError::Pool(_) => true,
            DbError::Shared(inner) => inner.is_connection_error(),
            DbError::CommitUnknown(_) | DbError::AttemptTimedOut | DbError::CommitTimedOut => true,
            DbError::BatchLost
            | DbError::IdempotencyKeyReused
            | DbError::IdempotencyKeyInUse
            | DbError::DeadlinePassed
            | DbError::FutureToken => false,
        }
    }

    /// An error from sending COMMIT. Only an answer from the server with a SQLSTATE (say 40001, or a
    /// deferred constraint) says the transaction rolled back; any other error (no SQLSTATE: a lost or
    /// timed-out connection, a protocol error) or a connection-class one (08xxx, 57P0x) leaves the
    /// outcome unknown.
    pub(super) fn at_commit(err: tokio_postgres::Error) -> DbError {
        if err.code().is_none() || err_is_connection(&err) {
            DbError::CommitUnknown(err)
        } else {
            DbError::Postgres(err)
        }
    }

    /// An error tied to one row's data (class 22, data exception: a counter past i64; class 23,
    /// integrity): the only kind that may be one key's fault in a many-key batch.
    pub(super) fn is_row_error(&self) -> bool {
        matches!(self.sqlstate(), Some(code) if code.starts_with("22") || code.starts_with("23"))
    }

    /// Safe to run again: PostgreSQL aborted the transaction (deadlock, serialization failure), or the
    /// connection broke (or could not be opened) before COMMIT was sent, so nothing committed. Never after
    /// a lost COMMIT, and never a pool timeout, a closed pool (the node is stopping) or a passed attempt
    /// deadline: that wait is already as long as a client is promised to wait.
    fn is_retryable(&self) -> bool {
        match self {
            DbError::Pool(PoolError::Backend(_)) => true,
            DbError::CommitUnknown(_)
            | DbError::Pool(_)
            | DbError::AttemptTimedOut
            | DbError::CommitTimedOut => false,
            DbError::Shared(inner) => inner.is_retryable(),
            _ => matches!(self.sqlstate(), Some("40001" | "40P01")) || self.is_server_gone(),
        }
    }

    /// The connection broke, or its server is going away or is no longer the primary (25006: a
    /// read-only transaction, on a primary demoted by a failover): its pool's idle connections are
    /// likely to the same server, and new ones find the current one through the URL. Not an attempt
    /// that ran past its deadline: a slow server or network is not a gone one (that connection alone
    /// is closed, see `deadline`).
    fn is_server_gone(&self) -> bool {
        match self {
            DbError::AttemptTimedOut | DbError::CommitTimedOut => false,
            DbError::Shared(inner) => inner.is_server_gone(),
            _ => self.is_connection_error() || self.sqlstate() == Some("25006"),
        }
    }
}

/// The connection broke, or the server is going away (08xxx, 57P0x): the statement never completed.
fn err_is_connection(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || matches!(e.code().map(|c| c.code()), Some(code) if code.starts_with("08") || code.starts_with("57P"))
        || (e.code().is_none() && std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()))
}

/// The node's database: its pools and the settings every query needs. Endpoints reach it through
/// [`Primary`] and [`Replica`], which say where their queries go.
#[derive(Debug, Clone)]
pub struct Store {
    pool: Pool,
    /// The pool's TLS connector, for its connections' cancel requests.
    tls: tls::Tls,
    /// `DATABASE_READ_URL`'s pool, when set.
    replicas: Option<read::ReadPool>,
    metrics: Metrics,
    container_id: String,
    /// 0: no limit but the deadline.
    retry_max_attempts: u32,
    retry_deadline: Duration,
    /// `POOL_WAIT_TIMEOUT_MS` and `DB_ATTEMPT_TIMEOUT_MS`: together, one attempt's deadline.
    pool_wait: Duration,
    attempt_timeout: Duration,
    lock_order: LockOrder,
    gates: gate::RowGates,
    isolation: isolation::IsolationLab,
    lab: lab::LabBudget,
    stats: stats::StatsSnapshot,
    reads: coalesce::ReadQueue,
}

/// The database as an endpoint that writes, locks rows, or must see the primary (the lab, health) may use
/// it: every query goes to `DATABASE_URL`'s server. Increments share transactions when
/// `INCREMENT_MODE=coalesce` (see [`Coalescer`]).
#[derive(Debug, Clone)]
pub struct Primary {
    db: Store,
    coalescer: Option<Coalescer>,
}

/// The database as a read endpoint may use it: on a replica when one can serve the read (see `read`),
/// else on the primary; every answer says who served it ([`Read`]).
#[derive(Debug, Clone)]
pub struct Replica(Store);

impl Deref for Primary {
    type Target = Store;

    fn deref(&self) -> &Store {
        &self.db
    }
}

impl Deref for Replica {
    type Target = Store;

    fn deref(&self) -> &Store {
        &self.0
    }
}

/// A value and the number of attempts it took.
#[derive(Debug)]
pub struct Retried<T> {
    pub value: T,
    pub attempts: u32,
    /// A write's `X-Fleet-Lsn`: the primary's timeline and WAL position read after the successful attempt
    /// (at or after its commit); `None` if that could not be read.
    pub lsn: Option<Token>,
}

impl Store {
    /// Builds the pool; no connection is opened until the first checkout.
    pub fn new(config: &Config, metrics: Metrics) -> anyhow::Result<Self> {
        let pool = |target: &tls::Target, size: usize| {
            // A connection's I/O task runs on the runtime of the task that opened it, an HTTP worker's
            // or the main one's: a request that gets a connection its own worker opened sends and reads
            // its queries without a thread hand-off (2 per query otherwise). No worker stops while a
            // request is in flight (see `startup`), so no request loses a connection with it.
            let fast = ManagerConfig { recycling_method: RecyclingMethod::Fast };
            let manager = Manager::from_config(target.pg.clone(), target.tls.0.clone(), fast);
            let wait = Some(config.pool_wait_timeout());
            Pool::builder(manager)
                .max_size(size)
                .runtime(Runtime::Tokio1)
                .timeouts(Timeouts { wait, create: wait, recycle: wait })
                .build()
        };
        let replicas = match config.read_target()? {
            Some(target) => Some(read::ReadPool::new(
                pool(&target, config.read_pool_size())?,
                target.tls,
                config.read_max_lag(),
                config.read_wait(),
            )),
            None => None,
        };
        let target = config.target()?;
        Ok(Store {
            pool: pool(&target, config.pool_size)?,
            tls: target.tls.clone(),
            replicas,
            metrics,
            container_id: config.container_id.clone(),
            retry_max_attempts: config.retry_max_attempts,
            retry_deadline: Duration::from_millis(config.retry_deadline_ms),
            pool_wait: config.pool_wait_timeout(),
            attempt_timeout: config.db_attempt_timeout(),
            lock_order: config.lock_order,
            gates: gate::RowGates::default(),
            isolation: isolation::IsolationLab::new(target),
            lab: lab::LabBudget::new(config.lab_max_connections()),
            stats: stats::StatsSnapshot::default(),
            reads: coalesce::ReadQueue::default(),
        })
    }

    /// The handle of the endpoints that use the primary; increments coalesce when `coalesce`.
    pub fn primary(&self, coalesce: bool) -> Primary {
        Primary { db: self.clone(), coalescer: coalesce.then(|| Coalescer::new(self.clone())) }
    }

    /// The handle of the endpoints whose reads a replica may serve.
    pub fn replica(&self) -> Replica {
        Replica(self.clone())
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
        Ok(Conn::new(client?, &self.tls))
    }

    /// Runs `work` as one attempt within its deadline (see [`deadline`]), counting its error (if any)
    /// in `fleet_db_errors_total`.
    async fn observed<T>(&self, work: impl Future<Output = Result<T, DbError>>) -> Result<T, DbError> {
        self.observed_taking(Duration::ZERO, work).await
    }

    /// [`Store::observed`] for work that takes `extra` by design (a lab hold).
    async fn observed_taking<T>(
        &self,
        extra: Duration,
        work: impl Future<Output = Result<T, DbError>>,
    ) -> Result<T, DbError> {
        let result = self.within_deadline(extra, work).await;
        if let Err(err) = &result {
            self.count_error(&self.pool, err);
        }
        result
    }

    /// Counts `err` in `fleet_db_errors_total`; when its server is gone (see
    /// `DbError::is_server_gone`), closes `pool`'s idle connections, so none is handed out again.
    fn count_error(&self, pool: &Pool, err: &DbError) {
        if let Some(sqlstate) = err.sqlstate() {
            self.metrics.db_errors.with_label_values(&[sqlstate]).inc();
        }
        if err.is_server_gone() {
            let closed = pool.retain(|_, _| false).removed.len();
            if closed > 0 {
                tracing::info!(closed, error = %err, "closed idle connections to a server that is gone");
            }
        }
    }

    /// When a request that starts now must have started its last attempt (`RETRY_DEADLINE_MS`).
    fn deadline(&self) -> Instant {
        Instant::now() + self.retry_deadline
    }

    /// Runs `attempt` (given its number, from 1) until it succeeds, fails with an error that is not safe
    /// to retry (see `DbError::is_retryable`), or fails after `deadline` (then it is the answer). A
    /// deadlock or serialization failure (with `RETRY_MAX_ATTEMPTS` set, at most that many attempts) and
    /// a server that is gone before COMMIT was sent (a restart, a failover: new connections find the
    /// current primary through the URL) are retried as long as the deadline allows. Between attempts it
    /// sleeps a random time up to an exponentially growing bound (full jitter), never past the deadline.
    /// Every retry is counted in `fleet_db_transaction_retries_total{sqlstate}`.
    async fn retrying<T>(
        &self,
        deadline: Instant,
        mut attempt: impl AsyncFnMut(u32) -> Result<(T, Option<Token>), DbError>,
    ) -> Result<Retried<T>, DbError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let result = self.observed(attempt(attempts)).await;
            let again = match &result {
                Ok(_) => false,
                Err(err) if matches!(err.sqlstate(), Some("40001" | "40P01")) => {
                    self.retry_max_attempts == 0 || attempts < self.retry_max_attempts
                }
                Err(err) => err.is_retryable(),
            };
            match result {
                Ok((value, lsn)) => return Ok(Retried { value, attempts, lsn }),
                Err(err) if again && Instant::now() < deadline => {
                    let sqlstate = err.sqlstate().unwrap_or("none");
                    self.metrics.transaction_retries.with_label_values(&[sqlstate]).inc();
                    tracing::debug!(db.sqlstate = sqlstate, retry.attempt = attempts, "retrying transaction");
                    tokio::time::sleep(
                        backoff(attempts).min(deadline.saturating_duration_since(Instant::now())),
                    )
                    .await;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// The longest pause between two attempts. Short: a retried transfer keeps its place at its rows' gates
/// while it sleeps, so a long pause would stall the requests queued behind it.
const BACKOFF_CAP_MS: u64 = 100;

/// Full-jitter backoff: uniform in [0, min(5 ms × 2^attempt, `BACKOFF_CAP_MS`)].
fn backoff(attempt: u32) -> Duration {
    let cap_ms = (5u64 << attempt.min(10)).min(BACKOFF_CAP_MS);
    Duration::from_micros(rand::rng().random_range(0..=cap_ms * 1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 1..20 {
            let cap = Duration::from_millis((5u64 << attempt.min(10)).min(BACKOFF_CAP_MS));
            assert!(backoff(attempt) <= cap);
        }
        assert!((0..100).map(|_| backoff(12)).any(|d| d > Duration::from_millis(BACKOFF_CAP_MS / 2)));
    }
}
