//! Write transactions: retried on deadlocks, serialization failures and lost connections (never after
//! COMMIT was sent), and done once per idempotency key.

use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::{Object, Transaction};
use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::idempotency::{self, IdempotencyKey, StoredResponse};
use super::token::PRIMARY_POSITION;
use super::{DbError, Position, Retried, Store, Token};

/// What a write transaction produced.
#[derive(Debug)]
pub enum Written<T> {
    /// This request wrote. With an idempotency key, `stored` is the response stored under it: answer
    /// exactly that, so the first answer and every replay are the same.
    Fresh { value: T, stored: Option<Value> },
    /// An earlier request with the same idempotency key wrote; this is its response.
    Replayed(StoredResponse),
}

/// An idempotency key and how to render the response stored under it (from the write's result and the
/// attempt number).
pub struct Once<'a, T> {
    pub key: &'a IdempotencyKey,
    pub render: &'a (dyn Fn(&T, u32) -> Value + Sync),
}

impl<T> std::fmt::Debug for Once<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Once").field("key", &self.key.key()).finish_non_exhaustive()
    }
}

impl Store {
    /// [`Store::transact`] without an idempotency key: the write's own result, and its LSN.
    pub(super) async fn transact_plain<T>(
        &self,
        write: impl AsyncFn(&Transaction<'_>) -> Result<T, DbError>,
    ) -> Result<(T, Option<Token>), DbError> {
        let done = self.transact(None, write).await?;
        match done.value {
            Written::Fresh { value, .. } => Ok((value, done.lsn)),
            Written::Replayed(_) => unreachable!("no idempotency key, so nothing to replay"),
        }
    }

    /// [`Store::transact_locking`] for a write that locks no counter.
    pub(super) async fn transact<T>(
        &self,
        once: Option<&Once<'_, T>>,
        write: impl AsyncFn(&Transaction<'_>) -> Result<T, DbError>,
    ) -> Result<Retried<Written<T>>, DbError> {
        self.transact_locking(once, &[], write).await
    }

    /// Runs `write` in a transaction (see [`Store::retrying`]), after passing the node's gates of the
    /// counters it will lock (`counters`; see `db::gate`), so a busy counter is waited for without a
    /// pooled connection. Waiting and every attempt share one deadline, `RETRY_DEADLINE_MS`. With
    /// `once`, the transaction first claims the idempotency key, and stores the rendered response before
    /// it commits; a key already completed gives back its stored response and writes nothing.
    pub(super) async fn transact_locking<T>(
        &self,
        once: Option<&Once<'_, T>>,
        counters: &[&str],
        write: impl AsyncFn(&Transaction<'_>) -> Result<T, DbError>,
    ) -> Result<Retried<Written<T>>, DbError> {
        let deadline = self.deadline();
        let _passes = tokio::time::timeout_at(deadline.into(), self.gates.pass(counters))
            .await
            .map_err(|_| DbError::DeadlinePassed)?;
        // Whether the current attempt sent COMMIT: if its deadline passes after that, the outcome is unknown.
        let commit_sent = AtomicBool::new(false);
        let done = self
            .retrying(deadline, async |attempt| {
                commit_sent.store(false, Ordering::Relaxed);
                let mut client = self.client().await?;
                let tx = client.transaction().await?;
                if let Some(once) = once {
                    if let Some(stored) = idempotency::claim(&tx, once.key).await? {
                        idempotency::await_replication(&tx, once.key).await?;
                        commit_sent.store(true, Ordering::Relaxed);
                        tx.commit().await.map_err(DbError::at_commit)?;
                        return Ok((Written::Replayed(stored), wal_position(&client).await));
                    }
                }
                let value = write(&tx).await?;
                let stored = match once {
                    Some(once) => {
                        let body = (once.render)(&value, attempt);
                        let response = StoredResponse { status: 200, body: body.clone() };
                        idempotency::store(&tx, once.key, &response).await?;
                        Some(body)
                    }
                    None => None,
                };
                commit_sent.store(true, Ordering::Relaxed);
                tx.commit().await.map_err(DbError::at_commit)?;
                Ok((Written::Fresh { value, stored }, wal_position(&client).await))
            })
            .await;
        done.map_err(unknown_once(&commit_sent))
    }

    /// `statement` as a transaction of its own (sent outside BEGIN, PostgreSQL commits it as it
    /// completes), retried like [`Store::transact`], with the WAL position asked in the same round trip: a
    /// write that is one statement takes one round trip instead of four (BEGIN, the statement, COMMIT,
    /// the position), and holds its row locks only while PostgreSQL runs and commits it. Once the
    /// statement is sent, a lost connection or a passed deadline leaves its outcome unknown, as a lost
    /// COMMIT does.
    pub(super) async fn write_alone(
        &self,
        statement: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<(Vec<Row>, Option<Token>), DbError> {
        let sent = AtomicBool::new(false);
        let done = self
            .retrying(self.deadline(), async |_| {
                sent.store(false, Ordering::Relaxed);
                let client = self.client().await?;
                let statement = client.prepare_cached(statement).await?;
                sent.store(true, Ordering::Relaxed);
                // Polled together, so sent together; the position is read after the statement committed.
                let (rows, lsn) = tokio::join!(client.query(&statement, params), wal_position(&client));
                Ok((rows.map_err(DbError::at_commit)?, lsn))
            })
            .await
            .map_err(unknown_once(&sent))?;
        Ok((done.value, done.lsn))
    }
}

/// An attempt that ran past its deadline after `sent` was set (its COMMIT, or its lone statement, had
/// gone out) has an unknown outcome.
fn unknown_once(sent: &AtomicBool) -> impl Fn(DbError) -> DbError + '_ {
    move |err| match err {
        DbError::AttemptTimedOut if sent.load(Ordering::Relaxed) => DbError::CommitTimedOut,
        err => err,
    }
}

/// The primary's position now (its timeline and WAL position): after a COMMIT on this connection, at or
/// after its commit record, so a replica on that timeline that has replayed it sees the write
/// (`X-Fleet-Lsn`). `None` if the query failed: the write is done either way.
async fn wal_position(client: &Object) -> Option<Token> {
    let query = async {
        let select = client.prepare_cached(PRIMARY_POSITION).await?;
        let row = client.query_one(&select, &[]).await?;
        Ok::<_, tokio_postgres::Error>(Position::from_parts(row.try_get(1)?, row.try_get(0)?))
    };
    query.await.inspect_err(|e| tracing::debug!(error = %e, "reading the WAL position failed")).ok().flatten()
}
