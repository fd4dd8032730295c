//! A scenario's script: its transactions, the steps they ran with what each returned, and how a step
//! that waits for another transaction's lock is recognised (from the lock manager, never by a sleep).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::Transaction;

use super::report::{LabRow, Mechanism, Observed, PgError, Scenario, Step, StepOutcome};
use super::session::{Observer, Op, Session, Statements};
use super::Level;
use crate::db::DbError;

/// How long the observer first waits between two looks at a session that may be blocked; doubled up to
/// `MAX_POLL`. A session that never blocks finishes its statement first and ends the polling.
const FIRST_POLL: Duration = Duration::from_millis(1);
const MAX_POLL: Duration = Duration::from_millis(16);

/// What a scenario probes: its name, its phenomenon, and what in the steps counts as the anomaly.
#[derive(Debug)]
pub(super) struct Probe {
    pub(super) name: &'static str,
    pub(super) phenomenon: &'static str,
    pub(super) anomaly_if: &'static str,
    /// The anomaly would show in what reads return: when every read completed without it, the snapshot
    /// prevented it, whatever else happened (a 40001 at commit, say).
    pub(super) in_reads: bool,
}

/// What a statement returned.
#[derive(Debug, Clone)]
pub(super) enum Done {
    Rows(Vec<LabRow>),
    Affected(u64),
    /// A commit.
    Ended,
}

impl Done {
    /// The value a read returned for row `id`.
    pub(super) fn value(&self, id: i32) -> Option<i32> {
        match self {
            Done::Rows(rows) => rows.iter().find(|row| row.id == id).map(|row| row.value),
            Done::Affected(_) | Done::Ended => None,
        }
    }

    pub(super) fn is_empty_read(&self) -> bool {
        matches!(self, Done::Rows(rows) if rows.is_empty())
    }
}

/// The value row `id` had in a read that ran (`None` if it was skipped, failed, or lacked the row).
pub(super) fn value(done: &Option<Done>, id: i32) -> Option<i32> {
    done.as_ref().and_then(|done| done.value(id))
}

/// A transaction of the script, on its own session.
pub(super) struct Tx<'c> {
    name: &'static str,
    pid: i32,
    tx: Transaction<'c>,
    statements: &'c Statements,
}

type Running<'t> = Pin<Box<dyn Future<Output = Result<Done, tokio_postgres::Error>> + 't>>;

/// A statement that may still be waiting for a lock; [`Script::finish`] awaits it.
pub(super) enum Pending<'t> {
    Finished(Option<Done>),
    Blocked { step: usize, running: Running<'t> },
}

impl Pending<'_> {
    pub(super) fn was_blocked(&self) -> bool {
        matches!(self, Pending::Blocked { .. })
    }
}

/// The steps of one scenario at one level, on the scratch rows of `run`.
pub(super) struct Script<'o> {
    observer: &'o Observer,
    run: i64,
    level: Level,
    steps: Vec<Step>,
    failed: Vec<&'static str>,
}

impl<'o> Script<'o> {
    pub(super) fn new(observer: &'o Observer, run: i64, level: Level) -> Self {
        Script { observer, run, level, steps: Vec::new(), failed: Vec::new() }
    }

    /// Starts transaction `name` at the script's level on `session`.
    pub(super) async fn begin<'c>(
        &self,
        session: &'c mut Session,
        name: &'static str,
    ) -> Result<Tx<'c>, DbError> {
        let Session { client, pid, statements } = session;
        let tx = client.build_transaction().isolation_level(self.level.isolation_level()).start().await?;
        Ok(Tx { name, pid: *pid, tx, statements })
    }

    /// Runs `op` in `tx`. `None` when it was skipped or failed with a serialization failure (recorded).
    pub(super) async fn run(&mut self, tx: &Tx<'_>, op: Op) -> Result<Option<Done>, DbError> {
        let step = self.push(tx.name, op.statement(), op.is_read());
        if self.skip_if_failed(step) {
            return Ok(None);
        }
        let done = op.execute(&tx.tx, tx.statements, self.run).await;
        self.settle(step, done)
    }

    /// Issues `op` in `tx`, which may have to wait for `holder`'s lock. Returns as soon as the statement
    /// completed or PostgreSQL shows it blocked by `holder` (`pg_blocking_pids`), whichever comes first.
    pub(super) async fn run_may_block<'t>(
        &mut self,
        tx: &'t Tx<'_>,
        op: Op,
        holder: &Tx<'_>,
    ) -> Result<Pending<'t>, DbError> {
        let step = self.push(tx.name, op.statement(), op.is_read());
        if self.skip_if_failed(step) {
            return Ok(Pending::Finished(None));
        }
        let mut running: Running<'t> = Box::pin(op.execute(&tx.tx, tx.statements, self.run));
        tokio::select! {
            done = &mut running => Ok(Pending::Finished(self.settle(step, done)?)),
            wait_event = blocked(self.observer, tx.pid, holder.pid) => {
                let record = &mut self.steps[step];
                record.blocked = true;
                record.blocked_by = Some(holder.name);
                record.wait_event = Some(wait_event?);
                Ok(Pending::Blocked { step, running })
            }
        }
    }

    /// Waits for a statement [`Script::run_may_block`] left running and records its result.
    pub(super) async fn finish(&mut self, pending: Pending<'_>) -> Result<Option<Done>, DbError> {
        match pending {
            Pending::Finished(done) => Ok(done),
            Pending::Blocked { step, running } => {
                let done = running.await;
                self.settle(step, done)
            }
        }
    }

    /// Commits `tx`; rolls it back instead if it failed. Whether it committed.
    pub(super) async fn commit(&mut self, tx: Tx<'_>) -> Result<bool, DbError> {
        if self.failed.contains(&tx.name) {
            self.rollback(tx).await?;
            return Ok(false);
        }
        let step = self.push(tx.name, "commit".to_owned(), false);
        let committed = tx.tx.commit().await.map(|()| Done::Ended);
        Ok(self.settle(step, committed)?.is_some())
    }

    pub(super) async fn rollback(&mut self, tx: Tx<'_>) -> Result<(), DbError> {
        self.push(tx.name, "rollback".to_owned(), false);
        Ok(tx.tx.rollback().await?)
    }

    /// Reads the committed rows once every transaction has ended (step `after`).
    pub(super) async fn read_after(&mut self) -> Result<Vec<LabRow>, DbError> {
        let step = self.push("after", Op::SelectAll.statement(), true);
        let rows = self.observer.rows(self.run).await?;
        self.steps[step].rows = Some(rows.clone());
        Ok(rows)
    }

    /// The scenario's report: the anomaly happened or not, and if not, what prevented it.
    pub(super) fn end(self, probe: &Probe, anomaly: bool) -> Scenario {
        let mut prevented_by = Vec::new();
        if !anomaly {
            let reads_completed = self.steps.iter().all(|step| !step.read || step.outcome == StepOutcome::Ok);
            if probe.in_reads && reads_completed {
                prevented_by.push(Mechanism::Snapshot);
            }
            if self.steps.iter().any(|step| step.blocked) {
                prevented_by.push(Mechanism::Lock);
            }
            if self.steps.iter().any(|step| step.error.as_ref().is_some_and(|e| e.sqlstate == "40001")) {
                prevented_by.push(Mechanism::SerializationFailure);
            }
            if prevented_by.is_empty() {
                prevented_by.push(Mechanism::Snapshot);
            }
        }
        Scenario {
            name: probe.name,
            phenomenon: probe.phenomenon,
            anomaly_if: probe.anomaly_if,
            observed: if anomaly { Observed::Possible } else { Observed::Prevented },
            prevented_by,
            error: self.steps.iter().find_map(|step| step.error.clone()),
            steps: self.steps,
        }
    }

    fn push(&mut self, tx: &'static str, statement: String, read: bool) -> usize {
        self.steps.push(Step {
            tx,
            statement,
            read,
            outcome: StepOutcome::Ok,
            blocked: false,
            blocked_by: None,
            wait_event: None,
            rows: None,
            rows_affected: None,
            error: None,
        });
        self.steps.len() - 1
    }

    /// Marks `step` skipped when a serialization failure already ended its transaction.
    fn skip_if_failed(&mut self, step: usize) -> bool {
        let record = &mut self.steps[step];
        let failed = self.failed.contains(&record.tx);
        if failed {
            record.outcome = StepOutcome::Skipped;
        }
        failed
    }

    /// Records a step's result. A serialization failure (40001) ends its transaction and is part of the
    /// observation; any other error ends the run.
    fn settle(
        &mut self,
        step: usize,
        done: Result<Done, tokio_postgres::Error>,
    ) -> Result<Option<Done>, DbError> {
        let record = &mut self.steps[step];
        match done {
            Ok(done) => {
                match &done {
                    Done::Rows(rows) => record.rows = Some(rows.clone()),
                    Done::Affected(n) => record.rows_affected = Some(*n),
                    Done::Ended => {}
                }
                Ok(Some(done))
            }
            Err(e) => match e.as_db_error().filter(|db| *db.code() == SqlState::T_R_SERIALIZATION_FAILURE) {
                Some(db) => {
                    record.outcome = StepOutcome::Failed;
                    record.error = Some(PgError {
                        sqlstate: db.code().code().to_owned(),
                        message: db.message().to_owned(),
                        detail: db.detail().map(str::to_owned),
                    });
                    self.failed.push(record.tx);
                    Ok(None)
                }
                None => Err(e.into()),
            },
        }
    }
}

/// Polls until `holder` blocks `pid`; returns the wait event PostgreSQL reports for it.
async fn blocked(observer: &Observer, pid: i32, holder: i32) -> Result<String, DbError> {
    let mut pause = FIRST_POLL;
    loop {
        if let Some(wait_event) = observer.blocked_by(pid, holder).await? {
            return Ok(wait_event);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_POLL);
    }
}
