//! Reads on replicas (`DATABASE_READ_URL`), falling back to the primary.
//!
//! A read goes to a pooled connection of the read pool (a replica chosen by the URL: libpq's
//! `load_balance_hosts=random`, or a Kubernetes `-ro` Service). In the same round trip, before the read
//! itself, it asks that server where it stands: whether it is in recovery, the WAL it has replayed, and
//! how far behind it is. The read's snapshot is taken after that answer (the statements run in order),
//! so the data it sees is at least as new as the replayed LSN it reported. Then:
//!
//! - lagging more than `READ_MAX_LAG_MS` (WAL received but not replayed, measured by the age of the last
//!   replayed commit): the answer is dropped and the primary serves the read;
//! - behind the read's `X-Fleet-Min-Lsn`: the same server is asked again every few milliseconds, up to
//!   `READ_WAIT_MS`, then the primary serves the read;
//! - unreachable (no connection, or one that broke): the primary serves the read, and for
//!   [`REPLICAS_RETRY_AFTER`] after a failed connect every read goes straight to the primary, so a
//!   blackholed replica costs one connect timeout, not one per read.
//!
//! A server of the read pool that is not in recovery (a replica promoted by a failover, or a read URL that
//! names the primary) is current by definition, and its answers say `primary`.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use deadpool_postgres::{Object, Pool};
use tokio_postgres::types::PgLsn;

use super::deadline::Conn;
use super::{Db, DbError};

/// How long reads skip the replicas after a connection to them could not be opened.
pub const REPLICAS_RETRY_AFTER: Duration = Duration::from_secs(1);

/// How often a read waiting for its replica to replay `X-Fleet-Min-Lsn` asks again.
const CATCH_UP_POLL: Duration = Duration::from_millis(2);

/// Which server answered a read (or wrote): the `X-Fleet-Served-By` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServedBy {
    Primary,
    /// A replica, named `address:port` as the server sees itself.
    Replica(String),
}

impl fmt::Display for ServedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServedBy::Primary => f.write_str("primary"),
            ServedBy::Replica(member) => write!(f, "replica:{member}"),
        }
    }
}

/// What a read found, and who served it.
#[derive(Debug, Clone)]
pub struct Read<T> {
    pub value: T,
    pub served_by: ServedBy,
}

/// The read pool and its rules.
#[derive(Debug, Clone)]
pub(super) struct Replicas {
    pub(super) pool: Pool,
    max_lag: Duration,
    wait: Duration,
    /// Until when (milliseconds since `epoch`) reads skip the replicas; 0: they don't.
    skip_until_ms: std::sync::Arc<AtomicU64>,
    epoch: Instant,
}

/// Where a server of the read pool stands.
struct Standing {
    in_recovery: bool,
    /// `None`: unknown, which serves no read that names a minimum.
    replayed: Option<PgLsn>,
    /// `None`: unknown (nothing replayed yet), which counts as lagging.
    lag_ms: Option<i64>,
    member: String,
}

/// One statement, so one snapshot-free answer: the LSN a replica has replayed (the primary's current one
/// on a primary), and its lag: 0 when it has replayed all it received, else the age of the last
/// replayed commit.
const STANDING: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, \
     CASE WHEN NOT pg_is_in_recovery() OR pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0::bigint \
          ELSE (extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()) * 1000)::bigint END, \
     COALESCE(host(inet_server_addr()), 'local') || ':' || current_setting('port')";

impl Replicas {
    pub(super) fn new(pool: Pool, max_lag: Duration, wait: Duration) -> Self {
        Replicas { pool, max_lag, wait, skip_until_ms: Default::default(), epoch: Instant::now() }
    }

    fn skipped(&self) -> bool {
        self.epoch.elapsed().as_millis() < u128::from(self.skip_until_ms.load(Ordering::Relaxed))
    }

    fn skip_for(&self, period: Duration) {
        let until = (self.epoch.elapsed() + period).as_millis() as u64;
        self.skip_until_ms.store(until, Ordering::Relaxed);
    }
}

impl Db {
    /// Runs `read` on a replica usable for it (see the module docs), else on the primary. `min_lsn`: the
    /// read must see every write acknowledged with an `X-Fleet-Lsn` up to it.
    pub(super) async fn read<T>(
        &self,
        min_lsn: Option<PgLsn>,
        read: impl AsyncFn(&Object) -> Result<T, DbError>,
    ) -> Result<Read<T>, DbError> {
        if let Some(replicas) = self.replicas.as_ref().filter(|r| !r.skipped()) {
            match self.within_deadline(Duration::ZERO, self.on_replica(replicas, min_lsn, &read)).await {
                Ok(Some(done)) => {
                    self.metrics.reads.with_label_values(&["replica"]).inc();
                    return Ok(done);
                }
                Ok(None) => {}
                Err(err) => {
                    self.count_error(&replicas.pool, &err);
                    if let DbError::Pool(_) = err {
                        replicas.skip_for(REPLICAS_RETRY_AFTER);
                    }
                    tracing::debug!(error = %err, "read on a replica failed; reading from the primary");
                    self.metrics.read_fallbacks.with_label_values(&["unavailable"]).inc();
                }
            }
        }
        // A read is safe to repeat: one whose server went away (a restart, a failover) is retried.
        let done = self
            .retrying(self.deadline(), async |_| {
                let client = self.client().await?;
                Ok((read(&client).await?, None))
            })
            .await?;
        self.metrics.reads.with_label_values(&["primary"]).inc();
        Ok(Read { value: done.value, served_by: ServedBy::Primary })
    }

    /// The read on one replica connection; `None` when that replica may not serve it (counted).
    async fn on_replica<T>(
        &self,
        replicas: &Replicas,
        min_lsn: Option<PgLsn>,
        read: &impl AsyncFn(&Object) -> Result<T, DbError>,
    ) -> Result<Option<Read<T>>, DbError> {
        let client = Conn::new(replicas.pool.get().await?);
        let standing_query = client.prepare_cached(STANDING).await?;
        let wait_until = Instant::now() + replicas.wait;
        loop {
            // Sent in this order, so the read's snapshot is taken after the standing was read.
            let (row, value) = tokio::try_join!(
                async { Ok::<_, DbError>(client.query_one(&standing_query, &[]).await?) },
                read(&client)
            )?;
            let standing = Standing {
                in_recovery: row.get(0),
                replayed: row.get(1),
                lag_ms: row.get(2),
                member: row.get(3),
            };
            let lagging = standing.lag_ms.is_none_or(|lag| lag as u128 > replicas.max_lag.as_millis());
            if standing.in_recovery && lagging {
                self.metrics.read_fallbacks.with_label_values(&["lagging"]).inc();
                return Ok(None);
            }
            if min_lsn.is_none_or(|min| standing.replayed.is_some_and(|replayed| replayed >= min)) {
                let served_by = match standing.in_recovery {
                    true => ServedBy::Replica(standing.member),
                    false => ServedBy::Primary,
                };
                return Ok(Some(Read { value, served_by }));
            }
            if Instant::now() + CATCH_UP_POLL > wait_until {
                self.metrics.read_fallbacks.with_label_values(&["behind"]).inc();
                return Ok(None);
            }
            tokio::time::sleep(CATCH_UP_POLL).await;
        }
    }
}

/// Parses an `X-Fleet-Min-Lsn` value: PostgreSQL's `XXXXXXXX/XXXXXXXX` (1 to 8 hex digits each side).
pub fn parse_lsn(text: &str) -> Option<PgLsn> {
    let (hi, lo) = text.split_once('/')?;
    let hex = |part: &str| (1..=8).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(hi) && hex(lo)).then(|| text.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_parse_as_postgres_writes_them_and_nothing_else() {
        assert_eq!(parse_lsn("0/16B3740").map(u64::from), Some(0x16B3740));
        assert_eq!(parse_lsn("A/0").map(u64::from), Some(0xA_0000_0000));
        assert_eq!(parse_lsn("FFFFFFFF/FFFFFFFF").map(u64::from), Some(u64::MAX));
        assert_eq!(parse_lsn("0/16B3740").unwrap().to_string(), "0/16B3740");
        for bad in ["", "0", "/1", "1/", "0/16B3740/1", "1FFFFFFFF/0", "0/x", "-1/0", " 0/1", "0/+1"] {
            assert_eq!(parse_lsn(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn served_by_names_the_role_and_the_member() {
        assert_eq!(ServedBy::Primary.to_string(), "primary");
        assert_eq!(ServedBy::Replica("10.0.0.7:5432".into()).to_string(), "replica:10.0.0.7:5432");
    }
}
