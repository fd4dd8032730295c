//! Bulk inserts into `data`: one `INSERT … SELECT unnest($1::text[])` for small batches, binary COPY for
//! large ones, each where it is the faster.
//!
//! Measured with `fleetctl bench --workloads bulk --no-sweeps --bulk-rows N` (release build, 4 nodes × pool 5,
//! against `psql \copy` of the same rows on the same database, in the same run):
//!
//! | rows per request | UNNEST | binary COPY |
//! |--:|--:|--:|
//! | 1,000 | 0.84–0.90× | 0.75× |
//! | 5,000 | 1.09× | 1.00× |
//! | 20,000 | 0.79× | 0.96× |
//! | 50,000 | 0.73× | 0.94× |
//!
//! UNNEST is one statement; COPY costs more round trips (ids drawn first, COPY, end) but streams large
//! batches without building a huge array parameter. Neither has a bind-parameter limit.

use deadpool_postgres::Transaction;
use futures_util::pin_mut;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

use super::{DbError, Once, Primary, Retried, Written};

/// From this many rows on, binary COPY is the faster (see the table above).
const COPY_FROM_ROWS: usize = 5_000;

/// One statement; the ids, sorted, are input order: rows are inserted in input order (`ORDER BY ord`) and
/// the id sequence only grows. They come back as one array, not as one result row per id: a result row
/// costs the node a message to parse and a row to allocate and free, and that was the node's largest
/// cost per bulk insert (node CPU per 1000-row insert: 1.0 ms, now 0.6 ms).
async fn insert_unnest(
    tx: &Transaction<'_>,
    rows: &[String],
    container_id: &str,
) -> Result<Vec<i64>, DbError> {
    let insert = tx
        .prepare_cached(
            "WITH inserted AS (INSERT INTO data (content, container_id) \
             SELECT t.content, $2 FROM unnest($1::text[]) WITH ORDINALITY AS t(content, ord) \
             ORDER BY t.ord RETURNING id) \
             SELECT array_agg(id) FROM inserted",
        )
        .await?;
    // No rows inserted: no ids (array_agg of nothing is NULL).
    let ids: Option<Vec<i64>> = tx.query_one(&insert, &[&rows, &container_id]).await?.get(0);
    let mut ids = ids.unwrap_or_default();
    ids.sort_unstable();
    Ok(ids)
}

impl Primary {
    /// Inserts one row per string in one transaction: all rows or none. Small batches by UNNEST; large
    /// ones by binary COPY, with the ids drawn from the sequence first (they only grow, so sorted they
    /// follow input order). Returns the ids in input order. With `once`, at most once per idempotency key.
    #[tracing::instrument(skip_all, fields(bulk.rows = rows.len()))]
    pub async fn bulk_insert(
        &self,
        rows: &[String],
        once: Option<&Once<'_, Vec<i64>>>,
    ) -> Result<Retried<Written<Vec<i64>>>, DbError> {
        let done = self
            .transact(once, async |tx| {
                if rows.len() < COPY_FROM_ROWS {
                    return insert_unnest(tx, rows, &self.container_id).await;
                }
                // One array, not one result row per id.
                let draw = tx
                    .prepare_cached(
                        "SELECT array_agg(nextval('data_id_seq')) FROM generate_series(1, $1::bigint)",
                    )
                    .await?;
                let mut ids: Vec<i64> = tx.query_one(&draw, &[&(rows.len() as i64)]).await?.get(0);
                ids.sort_unstable();
                let sink =
                    tx.copy_in("COPY data (id, content, container_id) FROM STDIN (FORMAT binary)").await?;
                let writer = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::TEXT, Type::VARCHAR]);
                pin_mut!(writer);
                for (id, content) in ids.iter().zip(rows) {
                    writer.as_mut().write(&[id, content, &self.container_id]).await?;
                }
                writer.finish().await?;
                Ok(ids)
            })
            .await?;
        if let Written::Fresh { value: ids, .. } = &done.value {
            self.metrics.bulk_insert_rows.inc_by(ids.len() as u64);
        }
        Ok(done)
    }
}
