//! The lab's dedicated connections (never the pool's: a run holds four at once, and concurrent runs
//! could deadlock a pool of 5) and the statements they run.

use tokio_postgres::{Client, Config, Statement, Transaction};

use super::report::LabRow;
use super::script::Done;
use super::Level;
use crate::db::tls::Target;
use crate::db::DbError;

/// A step waits at most this long for a row lock: blocking is detected and released in milliseconds,
/// so only a broken interleaving ever reaches it (and the call answers 503 instead of hanging).
const LOCK_TIMEOUT_MS: u64 = 3_000;
/// Bounds every lab statement, whatever the node's `STATEMENT_TIMEOUT_MS`.
const STATEMENT_TIMEOUT_MS: u64 = 5_000;
/// A transaction left open by a vanished run is ended by the server.
const IDLE_IN_TRANSACTION_TIMEOUT_MS: u64 = 10_000;
/// Arbitrary but fixed: the advisory lock that keeps SERIALIZABLE scenarios of concurrent runs (from any
/// node) from overlapping, so that their predicate locks never meet (see docs/isolation.md).
const SERIALIZABLE_LOCK_KEY: i64 = 0x0069_736f_6c61_6221; // "isolab!" in ASCII

/// The node's connection config with the lab's timeouts appended and its own application name.
pub(super) fn lab_config(node: &Config) -> Config {
    let mut pg = node.clone();
    let timeouts = format!(
        "-c lock_timeout={LOCK_TIMEOUT_MS} -c statement_timeout={STATEMENT_TIMEOUT_MS} \
         -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT_MS}"
    );
    let options = match node.get_options() {
        Some(options) => format!("{options} {timeouts}"),
        None => timeouts,
    };
    let name = format!("{}/isolation-lab", node.get_application_name().unwrap_or("fleet-app"));
    pg.options(options).application_name(name);
    pg
}

/// One statement of a scenario, on the call's scratch rows (`run_id = $1`), values as parameters.
#[derive(Debug, Clone, Copy)]
pub(super) enum Op {
    SelectAll,
    SelectId(i32),
    SelectValue(i32),
    SelectMultipleOf(i32),
    Update { id: i32, value: i32 },
    AddToAll(i32),
    DeleteValue(i32),
    Insert { id: i32, value: i32 },
}

impl Op {
    /// The statement as the Hermitage test file writes it, on its table `test`.
    pub(super) fn statement(self) -> String {
        match self {
            Op::SelectAll => "select * from test".to_owned(),
            Op::SelectId(id) => format!("select * from test where id = {id}"),
            Op::SelectValue(value) => format!("select * from test where value = {value}"),
            Op::SelectMultipleOf(m) => format!("select * from test where value % {m} = 0"),
            Op::Update { id, value } => format!("update test set value = {value} where id = {id}"),
            Op::AddToAll(delta) => format!("update test set value = value + {delta}"),
            Op::DeleteValue(value) => format!("delete from test where value = {value}"),
            Op::Insert { id, value } => format!("insert into test (id, value) values ({id}, {value})"),
        }
    }

    pub(super) fn is_read(self) -> bool {
        matches!(self, Op::SelectAll | Op::SelectId(_) | Op::SelectValue(_) | Op::SelectMultipleOf(_))
    }

    pub(super) async fn execute(
        self,
        tx: &Transaction<'_>,
        st: &Statements,
        run: i64,
    ) -> Result<Done, tokio_postgres::Error> {
        let rows = |rows: Vec<tokio_postgres::Row>| Done::Rows(rows.iter().map(LabRow::from).collect());
        Ok(match self {
            Op::SelectAll => rows(tx.query(&st.select_all, &[&run]).await?),
            Op::SelectId(id) => rows(tx.query(&st.select_id, &[&run, &id]).await?),
            Op::SelectValue(value) => rows(tx.query(&st.select_value, &[&run, &value]).await?),
            Op::SelectMultipleOf(m) => rows(tx.query(&st.select_multiple_of, &[&run, &m]).await?),
            Op::Update { id, value } => Done::Affected(tx.execute(&st.update, &[&run, &id, &value]).await?),
            Op::AddToAll(delta) => Done::Affected(tx.execute(&st.add_to_all, &[&run, &delta]).await?),
            Op::DeleteValue(value) => Done::Affected(tx.execute(&st.delete_value, &[&run, &value]).await?),
            Op::Insert { id, value } => Done::Affected(tx.execute(&st.insert, &[&run, &id, &value]).await?),
        })
    }
}

/// The scenarios' statements, prepared once per connection and shared by every scenario of the call.
#[derive(Debug)]
pub(super) struct Statements {
    select_all: Statement,
    select_id: Statement,
    select_value: Statement,
    select_multiple_of: Statement,
    update: Statement,
    add_to_all: Statement,
    delete_value: Statement,
    insert: Statement,
}

/// Every read of the scratch rows; the observer's final read too.
const SELECT_ALL: &str = "SELECT id, value FROM isolation_lab WHERE run_id = $1 ORDER BY id";

impl Statements {
    async fn prepare(client: &Client) -> Result<Self, tokio_postgres::Error> {
        let (select_all, select_id, select_value, select_multiple_of) = tokio::try_join!(
            client.prepare(SELECT_ALL),
            client.prepare("SELECT id, value FROM isolation_lab WHERE run_id = $1 AND id = $2"),
            client
                .prepare("SELECT id, value FROM isolation_lab WHERE run_id = $1 AND value = $2 ORDER BY id"),
            client.prepare(
                "SELECT id, value FROM isolation_lab WHERE run_id = $1 AND value % $2 = 0 ORDER BY id"
            ),
        )?;
        let (update, add_to_all, delete_value, insert) = tokio::try_join!(
            client.prepare("UPDATE isolation_lab SET value = $3 WHERE run_id = $1 AND id = $2"),
            client.prepare("UPDATE isolation_lab SET value = value + $2 WHERE run_id = $1"),
            client.prepare("DELETE FROM isolation_lab WHERE run_id = $1 AND value = $2"),
            client.prepare("INSERT INTO isolation_lab (run_id, id, value) VALUES ($1, $2, $3)"),
        )?;
        Ok(Statements {
            select_all,
            select_id,
            select_value,
            select_multiple_of,
            update,
            add_to_all,
            delete_value,
            insert,
        })
    }
}

/// A connection that runs a scenario's transactions (T1, T2, T3).
#[derive(Debug)]
pub(super) struct Session {
    pub(super) client: Client,
    /// Its backend's pid, to look it up in `pg_stat_activity` and `pg_blocking_pids`.
    pub(super) pid: i32,
    pub(super) statements: Statements,
}

impl Session {
    pub(super) async fn open(lab: &Target) -> Result<Self, DbError> {
        let client = lab.connect().await?;
        let pid = client.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
        let statements = Statements::prepare(&client).await?;
        Ok(Session { client, pid, statements })
    }
}

/// The connection outside every scenario transaction: it seeds and cleans up the scratch rows, reads the
/// final state, and watches the sessions in `pg_stat_activity`. It never opens a transaction of its own
/// while a scenario runs, so each poll sees fresh activity data.
#[derive(Debug)]
pub(super) struct Observer {
    client: Client,
    seed: Statement,
    rows: Statement,
    waiting: Statement,
}

impl Observer {
    pub(super) async fn open(lab: &Target) -> Result<Self, DbError> {
        let client = lab.connect().await?;
        let (seed, rows, waiting) = tokio::try_join!(
            client.prepare("INSERT INTO isolation_lab (run_id, id, value) VALUES ($1, 1, 10), ($1, 2, 20)"),
            client.prepare(SELECT_ALL),
            client.prepare(
                "SELECT wait_event_type || ':' || wait_event FROM pg_stat_activity \
                 WHERE pid = $1::int4 AND wait_event_type = 'Lock' \
                   AND $2::int4 = ANY(pg_blocking_pids($1::int4))",
            ),
        )?;
        Ok(Observer { client, seed, rows, waiting })
    }

    /// The scratch rows of `run`, as they are committed now.
    pub(super) async fn rows(&self, run: i64) -> Result<Vec<LabRow>, DbError> {
        Ok(self.client.query(&self.rows, &[&run]).await?.iter().map(LabRow::from).collect())
    }

    /// Inserts the scratch rows `1 => 10, 2 => 20` of `run`.
    pub(super) async fn seed(&self, run: i64) -> Result<(), DbError> {
        self.client.execute(&self.seed, &[&run]).await?;
        Ok(())
    }

    /// Deletes scratch rows a crashed node left behind.
    pub(super) async fn purge_stale(&self) -> Result<(), DbError> {
        let stale = "DELETE FROM isolation_lab WHERE created_at < now() - interval '1 hour'";
        self.client.execute(stale, &[]).await?;
        Ok(())
    }

    pub(super) async fn delete(&self, runs: &[i64]) -> Result<u64, DbError> {
        Ok(self.client.execute("DELETE FROM isolation_lab WHERE run_id = ANY($1)", &[&runs]).await?)
    }

    /// Waits for the fleet-wide session lock that a SERIALIZABLE scenario holds while it runs.
    pub(super) async fn lock_serializable(&self) -> Result<(), DbError> {
        self.client.execute("SELECT pg_advisory_lock($1)", &[&SERIALIZABLE_LOCK_KEY]).await?;
        Ok(())
    }

    pub(super) async fn unlock_serializable(&self) -> Result<(), DbError> {
        self.client.execute("SELECT pg_advisory_unlock($1)", &[&SERIALIZABLE_LOCK_KEY]).await?;
        Ok(())
    }

    /// What PostgreSQL reports as the isolation of a transaction started at `level`.
    pub(super) async fn server_level(&mut self, level: Level) -> Result<String, DbError> {
        let tx = self.client.build_transaction().isolation_level(level.isolation_level()).start().await?;
        let reported = tx.query_one("SELECT current_setting('transaction_isolation')", &[]).await?.get(0);
        tx.commit().await?;
        Ok(reported)
    }

    /// `pid`'s wait event once it waits for a lock (`pg_stat_activity`) that `holder` holds (the lock
    /// manager, `pg_blocking_pids`); `None` until both say so.
    pub(super) async fn blocked_by(&self, pid: i32, holder: i32) -> Result<Option<String>, DbError> {
        let row = self.client.query_opt(&self.waiting, &[&pid, &holder]).await?;
        Ok(row.map(|row| row.get(0)))
    }
}
