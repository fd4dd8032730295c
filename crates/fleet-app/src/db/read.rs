//! Reads on replicas (`DATABASE_READ_URL`), falling back to the primary.
//!
//! A read goes to a pooled connection of the read pool (a replica chosen by the URL: libpq's
//! `load_balance_hosts=random`, or a Kubernetes `-ro` Service). In the same round trip, before the read
//! itself, it asks that server where it stands: whether it is in recovery, the timeline and LSN it has
//! replayed, and whether a WAL receiver runs. The read's snapshot is taken after that answer (the
//! statements run in order), so the data it sees is at least as new as the position it reported.
//!
//! **Bounded staleness.** A replica's staleness is not judged by what it says of itself (a replica whose
//! link to the primary went silent has replayed all it received, and looks current forever), but against
//! the primary: the node keeps *marks*, positions (timeline and LSN) it read from the primary with
//! `pg_current_wal_lsn()`, each with the instant (the node's monotonic clock) before it asked. Every write
//! acknowledged before that instant is at or before the mark. A replica may serve a read that the node
//! began at `t` only if it has replayed, on the mark's timeline, a mark taken at or after
//! `t − READ_MAX_LAG_MS`: then the read sees every write acknowledged `READ_MAX_LAG_MS` before it began
//! (slack 0 on the node's clock). Marks are refreshed, at most one query at a time, once the newest is
//! older than a quarter of `READ_MAX_LAG_MS`, concurrently with the replica's own query, so an idle
//! primary costs one tiny read-only query (no WAL) per quarter of the setting while reads come, and a
//! busy one the same. A replica with no WAL receiver (not streaming) serves nothing.
//!
//! Then:
//! - stale (no recent enough mark replayed, or no WAL receiver): the answer is dropped and the primary
//!   serves the read;
//! - behind the read's `X-Fleet-Min-Lsn` token (see `db::token`) on the token's timeline, or on an
//!   earlier timeline that may yet switch to it: the same server is asked again every few milliseconds,
//!   up to `READ_WAIT_MS`, then the primary serves the read; on a later timeline than the token's: the
//!   primary serves it at once;
//! - a token the primary has not reached (a later timeline, or a later LSN on its own) is refused, never
//!   waited for ([`DbError::FutureToken`]), after one fresh look at the primary's position;
//! - unreachable (no connection could be opened, or one broke): the primary serves the read, and for
//!   [`REPLICAS_RETRY_AFTER`] after a failed connect every read goes straight to the primary, so a
//!   blackholed replica costs one connect timeout, not one per read. A read pool that is merely busy (every
//!   connection checked out) is not a failed connect: that read goes to the primary, the next ones try the
//!   replicas again.
//!
//! A server of the read pool that is not in recovery (a replica promoted by a failover, or a read URL that
//! names the primary) is current by definition, and its answers say `primary`.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use deadpool_postgres::{Object, Pool, PoolError, TimeoutType};

use super::deadline::Conn;
use super::tls::Tls;
use super::token::{Position, Token, PRIMARY_POSITION};
use super::{DbError, Store};

/// How long reads skip the replicas after a connection to them could not be opened.
pub const REPLICAS_RETRY_AFTER: Duration = Duration::from_secs(1);

/// How often a read waiting for its replica to replay `X-Fleet-Min-Lsn` asks again.
const CATCH_UP_POLL: Duration = Duration::from_millis(2);

/// Marks kept at most: enough for `READ_MAX_LAG_MS` at one per quarter of it, and then some.
const MARKS_KEPT: usize = 16;

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
pub(super) struct ReadPool {
    pub(super) pool: Pool,
    tls: Tls,
    max_lag: Duration,
    wait: Duration,
    /// Until when (milliseconds since `epoch`) reads skip the replicas; 0: they don't.
    skip_until_ms: Arc<AtomicU64>,
    epoch: Instant,
    marks: Arc<Mutex<Marks>>,
}

/// A position the primary held at `at` (taken before it was asked): every write acknowledged before
/// `at` is at or before it.
#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    position: Position,
}

/// The primary's recent positions, oldest first, and whether one is being asked for.
#[derive(Debug, Default)]
struct Marks {
    seen: VecDeque<Mark>,
    /// When the last refresh began; `None` before the first.
    asked: Option<Instant>,
    refreshing: bool,
}

/// Where a server of the read pool stands.
struct Standing {
    in_recovery: bool,
    /// `None`: unknown, which serves no read.
    position: Option<Position>,
    /// A WAL receiver runs (a standby that streams, or tries to).
    receiving: bool,
    member: String,
}

/// One statement, so one snapshot-free answer: whether the server is a standby, the timeline and LSN it
/// has replayed (the primary's current ones on a primary), whether a WAL receiver runs, and its name.
/// A standby's timeline is the one its WAL receiver streams (`received_tli`: every record it holds up to
/// what it received is on that timeline's history), visible to roles with `pg_read_all_stats`; otherwise
/// that of its last restartpoint (`pg_control_checkpoint()`), which can only be older than the one it
/// replays, so it errs towards the primary.
const STANDING: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END, \
     CASE WHEN pg_is_in_recovery() \
          THEN COALESCE((SELECT received_tli FROM pg_stat_wal_receiver), (pg_control_checkpoint()).timeline_id) \
          ELSE ('x' || left(pg_walfile_name(pg_current_wal_lsn()), 8))::bit(32)::int END, \
     EXISTS (SELECT 1 FROM pg_stat_wal_receiver), \
     COALESCE(host(inet_server_addr()), 'local') || ':' || current_setting('port')";

/// Clears `Marks::refreshing` when the refresh ends, however it ends (a read given up drops it).
struct Refreshing<'a>(&'a Mutex<Marks>);

impl Drop for Refreshing<'_> {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).refreshing = false;
    }
}

impl ReadPool {
    pub(super) fn new(pool: Pool, tls: Tls, max_lag: Duration, wait: Duration) -> Self {
        ReadPool {
            tls,
            pool,
            max_lag,
            wait,
            skip_until_ms: Default::default(),
            epoch: Instant::now(),
            marks: Default::default(),
        }
    }

    fn skipped(&self) -> bool {
        self.epoch.elapsed().as_millis() < u128::from(self.skip_until_ms.load(Ordering::Relaxed))
    }

    fn skip_for(&self, period: Duration) {
        let until = (self.epoch.elapsed() + period).as_millis() as u64;
        self.skip_until_ms.store(until, Ordering::Relaxed);
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How often marks are refreshed while reads come.
    fn refresh_every(&self) -> Duration {
        self.max_lag / 4
    }

    /// Claims the next refresh if one is due (the newest mark, and the last attempt, older than
    /// [`ReadPool::refresh_every`]) and none runs.
    fn claim_refresh(&self, now: Instant) -> Option<Refreshing<'_>> {
        let mut marks = self.marks();
        let recent = |at: Option<Instant>| {
            at.is_some_and(|at| now.saturating_duration_since(at) < self.refresh_every())
        };
        if marks.refreshing || recent(marks.asked) || recent(marks.seen.back().map(|m| m.at)) {
            return None;
        }
        marks.refreshing = true;
        marks.asked = Some(now);
        Some(Refreshing(&self.marks))
    }

    fn record(&self, mark: Mark) {
        let mut marks = self.marks();
        if marks.seen.back().is_some_and(|newest| newest.at > mark.at) {
            return;
        }
        marks.seen.push_back(mark);
        let horizon = mark.at.checked_sub(self.max_lag);
        while marks.seen.len() > MARKS_KEPT || marks.seen.front().is_some_and(|m| Some(m.at) < horizon) {
            marks.seen.pop_front();
        }
    }

    /// Whether a server at `position` has every write acknowledged `READ_MAX_LAG_MS` before `began`:
    /// it has replayed a mark taken since then, on that mark's timeline.
    fn fresh(&self, position: &Position, began: Instant) -> bool {
        let marks = self.marks();
        let newest_covered = marks.seen.iter().rev().find(|m| position.covers(&m.position));
        newest_covered.is_some_and(|m| began.saturating_duration_since(m.at) <= self.max_lag)
    }

    /// The newest mark's position.
    fn newest(&self) -> Option<Position> {
        self.marks().seen.back().map(|m| m.position)
    }
}

/// Why a replica did not serve a read.
enum Refusal {
    /// Not shown to have replayed a recent enough mark, or not streaming.
    Stale,
    /// Has not replayed the read's token within `READ_WAIT_MS`, or is on another history.
    Behind,
}

impl Store {
    /// Runs `read` on a replica usable for it (see the module docs), else on the primary. `min`: the read
    /// must see every write acknowledged with an `X-Fleet-Lsn` up to it.
    pub(super) async fn read<T>(
        &self,
        min: Option<Token>,
        read: impl AsyncFn(&Object) -> Result<T, DbError>,
    ) -> Result<Read<T>, DbError> {
        if let Some(replicas) = self.replicas.as_ref().filter(|r| !r.skipped()) {
            match self.within_deadline(Duration::ZERO, self.on_replica(replicas, min, &read)).await {
                Ok(Ok(done)) => {
                    self.metrics.reads.with_label_values(&["replica"]).inc();
                    return Ok(done);
                }
                Ok(Err(Refusal::Stale)) => self.metrics.read_fallbacks.with_label_values(&["lagging"]).inc(),
                Ok(Err(Refusal::Behind)) => self.metrics.read_fallbacks.with_label_values(&["behind"]).inc(),
                Err(DbError::FutureToken) => return Err(DbError::FutureToken),
                Err(DbError::Pool(PoolError::Timeout(TimeoutType::Wait))) => {
                    // Every read connection is busy: the replicas answer, they are only in demand.
                    self.metrics.read_fallbacks.with_label_values(&["busy"]).inc();
                }
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

    /// Refuses `token` if the primary has not reached it: judged by the newest mark, and if that is
    /// behind the token, by one fresh look at the primary (a write another node just acknowledged is
    /// past the node's marks). If the primary cannot be asked, the token is given the benefit of the
    /// doubt: the read's waits are bounded anyway.
    async fn refuse_future(&self, replicas: &ReadPool, token: &Token) -> Result<(), DbError> {
        if replicas.newest().is_some_and(|newest| !newest.precedes(token)) {
            return Ok(());
        }
        match self.within_deadline(Duration::ZERO, self.primary_position()).await {
            Ok(Some(mark)) => {
                replicas.record(mark);
                match mark.position.precedes(token) {
                    true => Err(DbError::FutureToken),
                    false => Ok(()),
                }
            }
            Ok(None) => Ok(()),
            Err(err) => {
                tracing::debug!(error = %err, "the primary's position could not be read to judge a token");
                Ok(())
            }
        }
    }

    /// The primary's position now, as a mark (`None` if PostgreSQL named none, which it does not).
    async fn primary_position(&self) -> Result<Option<Mark>, DbError> {
        let at = Instant::now();
        let client = self.client().await?;
        let query = client.prepare_cached(PRIMARY_POSITION).await?;
        let row = client.query_one(&query, &[]).await?;
        // The statement fails on a standby, so a position is always the primary's.
        Ok(Position::from_parts(row.try_get(1)?, row.try_get(0)?).map(|position| Mark { at, position }))
    }

    /// Refreshes the marks if due (see [`ReadPool::claim_refresh`]); bounded by `READ_MAX_LAG_MS`, past
    /// which the mark could make no read fresh anyway.
    async fn refresh_marks(&self, replicas: &ReadPool) {
        let Some(_refreshing) = replicas.claim_refresh(Instant::now()) else { return };
        match tokio::time::timeout(replicas.max_lag, self.primary_position()).await {
            Ok(Ok(Some(mark))) => replicas.record(mark),
            Ok(Ok(None)) => {}
            Ok(Err(err)) => tracing::debug!(error = %err, "reading the primary's position failed"),
            Err(_) => tracing::debug!("reading the primary's position took longer than READ_MAX_LAG_MS"),
        }
    }

    /// The read on one replica connection, or why that replica may not serve it.
    async fn on_replica<T>(
        &self,
        replicas: &ReadPool,
        min: Option<Token>,
        read: &impl AsyncFn(&Object) -> Result<T, DbError>,
    ) -> Result<Result<Read<T>, Refusal>, DbError> {
        let client = Conn::new(replicas.pool.get().await?, &replicas.tls);
        let standing_query = client.prepare_cached(STANDING).await?;
        let wait_until = Instant::now() + replicas.wait;
        let mut judged_future = false;
        loop {
            let began = Instant::now();
            // Sent in this order, so the read's snapshot is taken after the standing was read; the
            // primary's position, when due, is asked meanwhile.
            let (_, answer) = tokio::join!(self.refresh_marks(replicas), async {
                tokio::try_join!(
                    async { Ok::<_, DbError>(client.query_one(&standing_query, &[]).await?) },
                    read(&client)
                )
            });
            let (row, value) = answer?;
            let standing = Standing {
                in_recovery: row.get(0),
                position: Position::from_parts(row.get(2), row.get(1)),
                receiving: row.get(3),
                member: row.get(4),
            };
            let Some(position) = standing.position else { return Ok(Err(Refusal::Stale)) };
            // A token the server has not replayed may be bogus: it is refused now if the primary has not
            // reached it either, never waited for (nor passed on to the primary).
            if let Some(token) = min.filter(|token| !judged_future && !position.covers(token)) {
                judged_future = true;
                self.refuse_future(replicas, &token).await?;
            }
            if standing.in_recovery && !(standing.receiving && replicas.fresh(&position, began)) {
                return Ok(Err(Refusal::Stale));
            }
            let Some(token) = min else { return Ok(Ok(Read { value, served_by: standing.served_by() })) };
            if position.covers(&token) {
                return Ok(Ok(Read { value, served_by: standing.served_by() }));
            }
            // On a later timeline than the token's, replaying more will not help.
            if position.timeline > token.timeline || Instant::now() + CATCH_UP_POLL > wait_until {
                return Ok(Err(Refusal::Behind));
            }
            tokio::time::sleep(CATCH_UP_POLL).await;
        }
    }
}

impl Standing {
    fn served_by(self) -> ServedBy {
        match self.in_recovery {
            true => ServedBy::Replica(self.member),
            false => ServedBy::Primary,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::tls::TlsSettings;
    use tokio_postgres::types::PgLsn;

    fn replicas(max_lag_ms: u64) -> ReadPool {
        let config = tokio_postgres::Config::new();
        let tls = TlsSettings::default().connector().unwrap();
        let manager = deadpool_postgres::Manager::new(config, tls.0.clone());
        let pool = Pool::builder(manager).max_size(1).build().unwrap();
        ReadPool::new(pool, tls, Duration::from_millis(max_lag_ms), Duration::from_millis(100))
    }

    fn at(timeline: u32, lsn: u64) -> Position {
        Position { timeline, lsn: PgLsn::from(lsn) }
    }

    #[test]
    fn a_replica_is_fresh_only_if_it_replayed_a_mark_taken_within_the_max_lag() {
        let r = replicas(1000);
        let t0 = Instant::now();
        r.record(Mark { at: t0, position: at(1, 100) });
        r.record(Mark { at: t0 + Duration::from_millis(600), position: at(1, 200) });
        // Replayed the first mark: fresh for reads begun up to 1 s after it.
        assert!(r.fresh(&at(1, 150), t0 + Duration::from_millis(1000)));
        assert!(!r.fresh(&at(1, 150), t0 + Duration::from_millis(1001)));
        // Replayed the second: fresh until 1.6 s.
        assert!(r.fresh(&at(1, 200), t0 + Duration::from_millis(1600)));
        // Nothing replayed that the primary held since, or another timeline: stale.
        assert!(!r.fresh(&at(1, 99), t0));
        assert!(!r.fresh(&at(2, 500), t0), "a position on another timeline proves nothing");
    }

    #[test]
    fn a_silent_link_makes_a_replica_stale_however_idle_its_primary() {
        let r = replicas(1000);
        let t0 = Instant::now();
        // The primary is idle: every mark names the same position, which the replica has.
        for n in 0..10 {
            r.record(Mark { at: t0 + Duration::from_millis(250 * n), position: at(1, 100) });
        }
        assert!(r.fresh(&at(1, 100), t0 + Duration::from_millis(2500)), "idle primary, current replica");
        // A write lands; the replica hears nothing more.
        r.record(Mark { at: t0 + Duration::from_millis(2500), position: at(1, 300) });
        assert!(r.fresh(&at(1, 100), t0 + Duration::from_millis(3250)));
        assert!(!r.fresh(&at(1, 100), t0 + Duration::from_millis(3251)));
    }

    #[test]
    fn marks_are_kept_for_the_max_lag_and_refreshed_once_at_a_time() {
        let r = replicas(1000);
        let t0 = Instant::now();
        for n in 0..100 {
            r.record(Mark { at: t0 + Duration::from_millis(10 * n), position: at(1, n) });
        }
        assert!(r.marks().seen.len() <= MARKS_KEPT);
        let claim = r.claim_refresh(t0 + Duration::from_secs(5));
        assert!(claim.is_some());
        assert!(r.claim_refresh(t0 + Duration::from_secs(6)).is_none(), "one refresh at a time");
        drop(claim);
        assert!(r.claim_refresh(t0 + Duration::from_secs(6)).is_some());
    }

    #[test]
    fn served_by_names_the_role_and_the_member() {
        assert_eq!(ServedBy::Primary.to_string(), "primary");
        assert_eq!(ServedBy::Replica("10.0.0.7:5432".into()).to_string(), "replica:10.0.0.7:5432");
    }
}
