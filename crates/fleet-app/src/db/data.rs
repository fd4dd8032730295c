//! Bulk inserts into `data`.

use super::{Db, DbError};

impl Db {
    /// Inserts one row per string, atomically, in a single statement whatever the count (one array
    /// parameter, so no bind-parameter limit). Returns the new ids in input order: rows are inserted in
    /// input order (`ORDER BY ord`) and the id sequence only grows, so sorting the ids restores that order.
    #[tracing::instrument(skip_all, fields(bulk.rows = rows.len()))]
    pub async fn bulk_insert(&self, rows: &[String]) -> Result<Vec<i64>, DbError> {
        let mut ids: Vec<i64> = self
            .observed(async {
                let client = self.client().await?;
                let insert = client
                    .prepare_cached(
                        "INSERT INTO data (content, container_id) \
                         SELECT t.content, $2 FROM unnest($1::text[]) WITH ORDINALITY AS t(content, ord) \
                         ORDER BY t.ord RETURNING id",
                    )
                    .await?;
                let result = client.query(&insert, &[&rows, &self.container_id]).await?;
                Ok(result.iter().map(|row| row.get(0)).collect())
            })
            .await?;
        ids.sort_unstable();
        self.metrics.bulk_insert_rows.inc_by(ids.len() as u64);
        Ok(ids)
    }
}
