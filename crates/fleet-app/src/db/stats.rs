//! Health probes and the seed's statistics.

use serde::Serialize;

use super::{Db, DbError};

/// What `/api/stats` reports about the database.
#[derive(Debug, Serialize)]
pub struct DatabaseStats {
    pub total_records: i64,
    pub total_counters: i64,
    pub max_counter_value: i64,
    pub container_records: i64,
}

/// The database's answer to a health probe.
#[derive(Debug)]
pub struct Health {
    pub db_time: String,
}

impl Db {
    /// One round trip: the database's clock.
    pub async fn health(&self) -> Result<Health, DbError> {
        self.observed(async {
            let client = self.client().await?;
            let row = client.query_one("SELECT now()::text", &[]).await?;
            Ok(Health { db_time: row.get(0) })
        })
        .await
    }

    pub async fn stats(&self) -> Result<DatabaseStats, DbError> {
        self.observed(async {
            let client = self.client().await?;
            let select = client
                .prepare_cached(
                    "SELECT (SELECT count(*) FROM data), (SELECT count(*) FROM counters), \
                     (SELECT COALESCE(max(value), 0) FROM counters), \
                     (SELECT count(*) FROM data WHERE container_id = $1)",
                )
                .await?;
            let row = client.query_one(&select, &[&self.container_id]).await?;
            Ok(DatabaseStats {
                total_records: row.get(0),
                total_counters: row.get(1),
                max_counter_value: row.get(2),
                container_records: row.get(3),
            })
        })
        .await
    }
}
