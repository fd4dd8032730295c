//! Health probes, and the database statistics `/api/stats` reports (rows and counters counted).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{DbError, Primary, Read, Replica, Store};

/// How old the statistics `/api/stats` answers with may be. Counting `data` scans the whole table, so a
/// node counts at most once per this period, whatever the request rate; callers in between get the
/// last count and its age.
pub const STATS_MAX_AGE: Duration = Duration::from_secs(5);
/// How long a failed count is the answer: callers meanwhile get its error at once, rather than each
/// count again (one at a time, each waiting for the last to fail) while the database cannot answer.
const STATS_FAILURE_MAX_AGE: Duration = Duration::from_secs(1);

/// Everything `/api/stats` reports about the database, for the node `$1`: one count of all of `data`,
/// the node's rows by index (`data_container_id_idx`), and one pass over `counters`.
pub const STATS_QUERY: &str = "SELECT (SELECT count(*) FROM data), c.total, c.max_value, \
     (SELECT count(*) FROM data WHERE container_id = $1) \
     FROM (SELECT count(*) AS total, COALESCE(max(value), 0) AS max_value FROM counters) c";

/// The last count (or its failure) and when it was taken. One refresh at a time: callers that find it
/// stale while another refreshes wait for that one (holding no connection) instead of counting again.
pub(super) type StatsSnapshot = Arc<tokio::sync::Mutex<Option<(Instant, Counted)>>>;

type Counted = Result<Read<DatabaseStats>, Arc<DbError>>;

/// What `/api/stats` reports about the database.
#[derive(Debug, Clone, Serialize)]
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

impl Primary {
    /// One round trip: the database's clock.
    pub async fn health(&self) -> Result<Health, DbError> {
        self.observed(async {
            let client = self.client().await?;
            let row = client.query_one("SELECT now()::text", &[]).await?;
            Ok(Health { db_time: row.get(0) })
        })
        .await
    }
}

impl Replica {
    /// The database's statistics as counted at most [`STATS_MAX_AGE`] ago (on a replica when one can
    /// serve it), and how long ago.
    pub async fn stats(&self) -> Result<Read<(DatabaseStats, Duration)>, DbError> {
        let mut snapshot = self.stats.lock().await;
        let max_age = |counted: &Counted| if counted.is_ok() { STATS_MAX_AGE } else { STATS_FAILURE_MAX_AGE };
        if snapshot.as_ref().is_none_or(|(taken, counted)| taken.elapsed() >= max_age(counted)) {
            *snapshot = Some((Instant::now(), self.count_stats().await.map_err(Arc::new)));
        }
        match snapshot.as_ref().expect("counted just now if not before") {
            (taken, Ok(stats)) => {
                Ok(Read { value: (stats.value.clone(), taken.elapsed()), served_by: stats.served_by.clone() })
            }
            (_, Err(err)) => Err(DbError::Shared(Arc::clone(err))),
        }
    }
}

impl Store {
    /// Counts everything `/api/stats` reports: a scan of `data`.
    async fn count_stats(&self) -> Result<Read<DatabaseStats>, DbError> {
        self.read(None, async |client| {
            let select = client.prepare_cached(STATS_QUERY).await?;
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
