//! Counters: increment under a row lock, transfer between two rows, read one.

use std::collections::HashMap;

use deadpool_postgres::{GenericClient, Object};
use serde::Serialize;

use super::{DbError, Once, Primary, Read, Replica, Retried, Store, Token, Written};
use crate::config::LockOrder;

/// A counter's value after a write.
#[derive(Debug, Clone, Serialize)]
pub struct Counter {
    pub key: String,
    pub value: i64,
}

/// Both counters after a transfer.
#[derive(Debug, Serialize)]
pub struct Transfer {
    pub from: Counter,
    pub to: Counter,
}

/// Takes the row lock on `key` with `SELECT … FOR UPDATE` and returns its value, creating the row at 0
/// first if it is missing. Creation is race-free: `ON CONFLICT DO NOTHING` waits for a concurrent creator
/// and never raises 23505, and the second `SELECT … FOR UPDATE` (a new READ COMMITTED snapshot) then
/// sees whichever row won.
async fn lock_counter(tx: &impl GenericClient, key: &str) -> Result<i64, DbError> {
    let select = tx.prepare_cached("SELECT value FROM counters WHERE key = $1 FOR UPDATE").await?;
    if let Some(row) = tx.query_opt(&select, &[&key]).await? {
        return Ok(row.get(0));
    }
    let insert = tx
        .prepare_cached("INSERT INTO counters (key, value) VALUES ($1, 0) ON CONFLICT (key) DO NOTHING")
        .await?;
    tx.execute(&insert, &[&key]).await?;
    Ok(tx.query_one(&select, &[&key]).await?.get(0))
}

/// Adds `delta` to the locked counter `key` and returns the new value.
async fn add(tx: &impl GenericClient, key: &str, delta: i64) -> Result<i64, DbError> {
    let update = tx
        .prepare_cached(
            "UPDATE counters SET value = value + $2, last_modified = now() WHERE key = $1 RETURNING value",
        )
        .await?;
    Ok(tx.query_one(&update, &[&key, &delta]).await?.get(0))
}

/// Takes the lock on `key` (creating it if missing) and adds `n`; returns the new value.
async fn increment_in(tx: &impl GenericClient, key: &str, n: i64) -> Result<i64, DbError> {
    lock_counter(tx, key).await?;
    add(tx, key, n).await
}

/// The values of those of `keys` that are counters.
pub(super) async fn select_counters(client: &Object, keys: &[&str]) -> Result<HashMap<String, i64>, DbError> {
    let select = client.prepare_cached("SELECT key, value FROM counters WHERE key = ANY($1)").await?;
    let rows = client.query(&select, &[&keys]).await?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

impl Store {
    /// Adds `n` increments to counter `key` in one transaction that holds the row lock; returns the new
    /// value and the commit's LSN. All or nothing: a failure applies none of them. While the counter
    /// exists, that transaction is one statement (see [`Store::write_alone`]), so the lock is held only
    /// while PostgreSQL runs and commits it; the first increment of a new key creates it.
    pub(super) async fn add_to_counter(&self, key: &str, n: i64) -> Result<(i64, Option<Token>), DbError> {
        let (rows, lsn) = self
            .write_alone(
                "WITH locked AS (SELECT key FROM counters WHERE key = $1 FOR UPDATE) \
                 UPDATE counters AS c SET value = c.value + $2, last_modified = now() \
                 FROM locked WHERE c.key = locked.key RETURNING c.value",
                &[&key, &n],
            )
            .await?;
        let done = match rows.first() {
            Some(row) => (row.get(0), lsn),
            None => self.transact_plain(async |tx| increment_in(tx, key, n).await).await?,
        };
        self.record_increments(n);
        Ok(done)
    }

    /// Adds `counts[i]` to counter `keys[i]` for every counter that exists and is not locked by another
    /// transaction, in one statement (see [`Store::write_alone`]) that takes their row locks with `SELECT …
    /// FOR UPDATE SKIP LOCKED` (so it never waits for a lock and cannot deadlock). Returns the new values
    /// of the counters it updated (the others are untouched), and the commit's LSN.
    pub(super) async fn add_to_free_counters(
        &self,
        keys: &[String],
        counts: &[i64],
    ) -> Result<(HashMap<String, i64>, Option<Token>), DbError> {
        let (rows, lsn) = self
            .write_alone(
                "WITH free AS (SELECT key FROM counters WHERE key = ANY($1) FOR UPDATE SKIP LOCKED) \
                 UPDATE counters AS c SET value = c.value + d.n, last_modified = now() \
                 FROM unnest($1::text[], $2::bigint[]) AS d(key, n) JOIN free ON free.key = d.key \
                 WHERE c.key = d.key RETURNING c.key, c.value",
                &[&keys, &counts],
            )
            .await?;
        let updated: HashMap<String, i64> = rows.iter().map(|row| (row.get(0), row.get(1))).collect();
        let added: i64 =
            keys.iter().zip(counts).filter(|(key, _)| updated.contains_key(*key)).map(|(_, n)| n).sum();
        self.record_increments(added);
        Ok((updated, lsn))
    }

    /// Counts `n` increments committed by one transaction (none: nothing to count).
    fn record_increments(&self, n: i64) {
        if n > 0 {
            self.metrics.increments.inc_by(n.unsigned_abs());
            self.metrics.increment_batch_size.observe(n as f64);
        }
    }
}

impl Primary {
    /// Adds 1 to counter `key` (created at 0 if absent) under the row lock: in the node's next shared
    /// transaction when increments coalesce and there is no `once`, else in a transaction of its own
    /// (with `once`, where the idempotency key is claimed: at most once per key).
    #[tracing::instrument(skip_all, fields(counter.key = %key))]
    pub async fn increment(
        &self,
        key: &str,
        once: Option<&Once<'_, Counter>>,
    ) -> Result<Retried<Written<Counter>>, DbError> {
        if let (None, Some(coalescer)) = (once, &self.coalescer) {
            let (value, lsn) = coalescer.increment(key).await?;
            return Ok(Retried { value: Written::Fresh { value, stored: None }, attempts: 1, lsn });
        }
        let done = self
            .transact_locking(once, &[key], async |tx| {
                Ok(Counter { key: key.to_owned(), value: increment_in(tx, key, 1).await? })
            })
            .await?;
        if let Written::Fresh { .. } = done.value {
            self.record_increments(1);
        }
        Ok(done)
    }

    /// Moves `amount` from one counter to another in one transaction, locking both rows in request order
    /// (or key order with `LOCK_ORDER=sorted`); deadlocks are retried until `RETRY_DEADLINE_MS`. Only
    /// [`gate::ROW_WAITERS_PER_NODE`](super::gate::ROW_WAITERS_PER_NODE) of a node's requests on the same
    /// counter hold a connection at once; the others wait without one. With `once`, at most once per key.
    #[tracing::instrument(skip_all, fields(transfer.from = %from, transfer.to = %to, transfer.amount = amount))]
    pub async fn transfer(
        &self,
        from: &str,
        to: &str,
        amount: i64,
        once: Option<&Once<'_, Transfer>>,
    ) -> Result<Retried<Written<Transfer>>, DbError> {
        let lock_order = match self.lock_order {
            LockOrder::Sorted if to < from => [to, from],
            _ => [from, to],
        };
        self.transact_locking(once, &lock_order, async |tx| {
            for key in lock_order {
                lock_counter(tx, key).await?;
            }
            // Both updates sent at once (tokio-postgres pipelines the queries of one connection polled
            // together; PostgreSQL runs them in order): the rows stay locked a round trip less. The locks
            // are not pipelined: a round trip between them is the window in which opposite transfers meet.
            // Both answers are awaited and the first statement's error wins: once it fails, the second
            // only reports the aborted transaction (25P02), and `try_join!` would return whichever it
            // polled first.
            let (from_value, to_value) = tokio::join!(add(tx, from, -amount), add(tx, to, amount));
            let (from_value, to_value) = (from_value?, to_value?);
            Ok(Transfer {
                from: Counter { key: from.to_owned(), value: from_value },
                to: Counter { key: to.to_owned(), value: to_value },
            })
        })
        .await
    }
}

impl Replica {
    /// The counter's value (`None` if it does not exist), read from a replica that has replayed
    /// `min_lsn` when one can serve it (see `db::read`), else from the primary. A read without `min_lsn`
    /// shares a query with the node's other reads of the moment (see `db::coalesce::reads`).
    pub async fn counter(&self, key: &str, min_lsn: Option<Token>) -> Result<Read<Option<Counter>>, DbError> {
        let read = match min_lsn {
            None => self.coalesced_read(key).await?,
            Some(_) => {
                let read = self.read(min_lsn, async |client| select_counters(client, &[key]).await).await?;
                Read { value: read.value.get(key).copied(), served_by: read.served_by }
            }
        };
        let value = read.value.map(|value| Counter { key: key.to_owned(), value });
        Ok(Read { value, served_by: read.served_by })
    }
}
