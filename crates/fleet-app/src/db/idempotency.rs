//! Idempotency keys: a write carrying one is done once. Its response is stored in the write's own
//! transaction, so a committed write always has its response, and a repeat (on any node) gets that
//! response instead of writing again.
//!
//! Claiming a key is `INSERT … ON CONFLICT DO NOTHING`: while the first request's transaction is open,
//! PostgreSQL makes a repeat wait for it, then the repeat sees the stored response, or claims the key
//! itself if the first rolled back. The wait holds a pooled connection, so it is short
//! ([`CLAIM_LOCK_TIMEOUT`]): a repeat that comes while the first still runs gets 409
//! `idempotency_key_in_use` at once, and any number of repeats cannot hold the pool.
//!
//! Keys older than `IDEMPOTENCY_TTL_S` are deleted once a minute (or once per TTL, if that is shorter),
//! by one node at a time ([`CLEANUP_LOCK_KEY`]), in statements of at most [`CLEANUP_BATCH_KEYS`] keys,
//! so no statement holds many row locks or runs long whatever the backlog.

use std::time::Duration;

use deadpool_postgres::{GenericClient, Object};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_postgres::types::ToSql;

use super::{DbError, Store};

/// Longest idempotency key, in characters (`idempotency_keys.key VARCHAR(255)`).
pub const MAX_KEY_CHARS: usize = 255;
/// How long a repeat waits for the transaction of the request that holds its key: enough for an ordinary
/// write to commit (milliseconds), then 409.
const CLAIM_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '100ms'";
/// How often each node deletes expired keys (more often when the TTL is shorter).
const CLEANUP_INTERVAL: Duration = Duration::from_secs(60);
/// Most expired keys one statement of the cleanup deletes.
pub const CLEANUP_BATCH_KEYS: usize = 1000;
/// Arbitrary but fixed: the advisory lock a node holds while it deletes expired keys.
pub const CLEANUP_LOCK_KEY: i64 = 0x0069_6465_6d67_6321; // "idemgc!" in ASCII

/// A client's idempotency key and the fingerprint of the request it was sent with.
#[derive(Debug, Clone)]
pub struct IdempotencyKey {
    key: String,
    fingerprint: Vec<u8>,
}

impl IdempotencyKey {
    /// `key` (1–255 visible ASCII characters, checked by the caller) for the request `route` + `body`,
    /// where `body` is the request re-serialised, so spacing and field order do not matter. The JSON is
    /// written straight into the hash: a large body is never copied for its fingerprint.
    pub fn new(key: &str, route: &str, body: &impl Serialize) -> Self {
        let mut hash = Sha256::new();
        hash.update(route.as_bytes());
        hash.update([0]);
        serde_json::to_writer(&mut hash, body).expect("serialising a request into a hash cannot fail");
        IdempotencyKey { key: key.to_owned(), fingerprint: hash.finalize().to_vec() }
    }

    pub fn key(&self) -> &str {
        &self.key
    }
}

/// A response stored under an idempotency key.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    pub status: u16,
    pub body: Value,
}

/// Claims `idem` inside `tx`: `None` if this transaction now owns the key, or the response stored by the
/// transaction that completed it first. Fails with `IdempotencyKeyReused` if that one had another body.
pub(super) async fn claim(
    tx: &impl GenericClient,
    idem: &IdempotencyKey,
) -> Result<Option<StoredResponse>, DbError> {
    let insert = tx
        .prepare_cached(
            "INSERT INTO idempotency_keys (key, fingerprint, status, response) VALUES ($1, $2, 0, 'null') \
             ON CONFLICT (key) DO NOTHING",
        )
        .await?;
    // Sent together (one round trip); the transaction's later statements wait for locks as before.
    let params: [&(dyn ToSql + Sync); 2] = [&idem.key, &idem.fingerprint];
    let (bounded, claimed, reset) = tokio::join!(
        tx.batch_execute(CLAIM_LOCK_TIMEOUT),
        tx.execute(&insert, &params),
        tx.batch_execute("SET LOCAL lock_timeout TO DEFAULT"),
    );
    bounded?;
    let claimed = claimed.map_err(|e| {
        // Waiting for the first request's transaction ran past lock_timeout or statement_timeout.
        match e.code().map(|c| c.code()) {
            Some("57014" | "55P03") => DbError::IdempotencyKeyInUse,
            _ => DbError::Postgres(e),
        }
    })?;
    reset?;
    if claimed == 1 {
        return Ok(None);
    }
    let select = tx
        .prepare_cached("SELECT fingerprint, status, response FROM idempotency_keys WHERE key = $1")
        .await?;
    let row = tx.query_one(&select, &[&idem.key]).await?;
    if row.get::<_, Vec<u8>>(0) != idem.fingerprint {
        return Err(DbError::IdempotencyKeyReused);
    }
    let status: i16 = row.get(1);
    Ok(Some(StoredResponse { status: status as u16, body: row.get(2) }))
}

/// Makes the transaction replaying `idem`'s stored response wait at COMMIT for the synchronous standby,
/// as a fresh write does. The transaction that stored it may have been cancelled while its COMMIT waited
/// for the standby (an abandoned attempt, `statement_timeout`): it is then committed on the primary
/// alone, visible here but not yet replicated. A no-op update of the key's row gives this transaction a
/// commit record after that one, and synchronous replication confirms every record up to its own.
pub(super) async fn await_replication(tx: &impl GenericClient, idem: &IdempotencyKey) -> Result<(), DbError> {
    let touch = tx.prepare_cached("UPDATE idempotency_keys SET status = status WHERE key = $1").await?;
    tx.execute(&touch, &[&idem.key]).await?;
    Ok(())
}

/// Stores the response of the write that claimed `idem`, in the same transaction.
pub(super) async fn store(
    tx: &impl GenericClient,
    idem: &IdempotencyKey,
    response: &StoredResponse,
) -> Result<(), DbError> {
    let update =
        tx.prepare_cached("UPDATE idempotency_keys SET status = $2, response = $3 WHERE key = $1").await?;
    tx.execute(&update, &[&idem.key, &(response.status as i16), &response.body]).await?;
    Ok(())
}

impl Store {
    /// Deletes expired idempotency keys once a minute (or once per `ttl` if shorter), while the node runs.
    pub fn spawn_idempotency_cleanup(&self, ttl: Duration) {
        let db = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(CLEANUP_INTERVAL.min(ttl));
            loop {
                every.tick().await;
                match db.delete_expired_keys(ttl).await {
                    Ok(None) => tracing::debug!("another node is deleting expired idempotency keys"),
                    Ok(Some(0)) => {}
                    Ok(Some(deleted)) => {
                        tracing::info!(idempotency.deleted = deleted, "expired idempotency keys deleted")
                    }
                    Err(e) => tracing::warn!(error = %e, "idempotency key cleanup failed; will retry"),
                }
            }
        });
    }

    /// Deletes the expired keys unless another node is at it (`None`); returns how many.
    async fn delete_expired_keys(&self, ttl: Duration) -> Result<Option<u64>, DbError> {
        self.observed(async {
            let client = self.client().await?;
            let deleted = delete_in_batches(&client, ttl).await;
            // Closed whatever happened, which ends the session's lock. (And opened on the main thread,
            // this connection would keep its I/O there: every request that used it later would cross
            // threads twice per query.)
            client.close();
            deleted
        })
        .await
    }
}

/// Under the cleanup's session lock, if no other session holds it: deletes expired keys, a batch per
/// statement (each its own transaction), until a batch comes back short.
async fn delete_in_batches(client: &Object, ttl: Duration) -> Result<Option<u64>, DbError> {
    let lock = client.prepare_cached("SELECT pg_try_advisory_lock($1)").await?;
    if !client.query_one(&lock, &[&CLEANUP_LOCK_KEY]).await?.get::<_, bool>(0) {
        return Ok(None);
    }
    let delete = client
        .prepare_cached(
            "DELETE FROM idempotency_keys WHERE key IN (SELECT key FROM idempotency_keys \
             WHERE created_at < now() - make_interval(secs => $1) LIMIT $2)",
        )
        .await?;
    let (ttl, batch) = (ttl.as_secs_f64(), CLEANUP_BATCH_KEYS as i64);
    let mut deleted = 0;
    loop {
        let n = client.execute(&delete, &[&ttl, &batch]).await?;
        deleted += n;
        if n < CLEANUP_BATCH_KEYS as u64 {
            return Ok(Some(deleted));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_fingerprint_depends_on_route_and_body_only() {
        let a = IdempotencyKey::new("k", "/api/increment", &json!({"key": "x"}));
        let b = IdempotencyKey::new("other", "/api/increment", &json!({"key": "x"}));
        let c = IdempotencyKey::new("k", "/api/increment", &json!({"key": "y"}));
        let d = IdempotencyKey::new("k", "/api/transfer", &json!({"key": "x"}));
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_ne!(a.fingerprint, c.fingerprint);
        assert_ne!(a.fingerprint, d.fingerprint);
    }

    #[test]
    fn a_struct_and_the_same_json_value_have_one_fingerprint() {
        #[derive(Serialize)]
        struct Body<'a> {
            data: &'a [&'a str],
        }
        let value = IdempotencyKey::new("k", "/api/bulk-insert", &json!({"data": ["a", "b"]}));
        let typed = IdempotencyKey::new("k", "/api/bulk-insert", &Body { data: &["a", "b"] });
        assert_eq!(value.fingerprint, typed.fingerprint);
    }
}
