//! Write transactions: retried on deadlocks, serialization failures and lost connections (never after
//! COMMIT was sent), and done once per idempotency key.

use std::sync::atomic::{AtomicBool, Ordering};

use deadpool_postgres::Transaction;
use serde_json::Value;

use super::idempotency::{self, IdempotencyKey, StoredResponse};
use super::{Db, DbError, Retried};

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

impl Db {
    /// [`Db::transact`] without an idempotency key: the write's own result.
    pub(super) async fn transact_plain<T>(
        &self,
        write: impl AsyncFn(&Transaction<'_>) -> Result<T, DbError>,
    ) -> Result<T, DbError> {
        match self.transact(None, write).await?.value {
            Written::Fresh { value, .. } => Ok(value),
            Written::Replayed(_) => unreachable!("no idempotency key, so nothing to replay"),
        }
    }

    /// Runs `write` in a transaction (see [`Db::retrying`]). With `once`, the transaction first claims the
    /// idempotency key, and stores the rendered response before it commits; a key already completed gives
    /// back its stored response and writes nothing.
    pub(super) async fn transact<T>(
        &self,
        once: Option<&Once<'_, T>>,
        write: impl AsyncFn(&Transaction<'_>) -> Result<T, DbError>,
    ) -> Result<Retried<Written<T>>, DbError> {
        // Whether the current attempt sent COMMIT: if its deadline passes after that, the outcome is unknown.
        let commit_sent = AtomicBool::new(false);
        let done = self
            .retrying(async |attempt| {
                commit_sent.store(false, Ordering::Relaxed);
                let mut client = self.client().await?;
                let tx = client.transaction().await?;
                if let Some(once) = once {
                    if let Some(stored) = idempotency::claim(&tx, once.key).await? {
                        return Ok(Written::Replayed(stored));
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
                Ok(Written::Fresh { value, stored })
            })
            .await;
        done.map_err(|err| match err {
            DbError::AttemptTimedOut if commit_sent.load(Ordering::Relaxed) => DbError::CommitTimedOut,
            err => err,
        })
    }
}
