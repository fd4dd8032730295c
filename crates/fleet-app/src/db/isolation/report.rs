//! What a run reports: scenarios, their steps with the values each read returned, and outcomes.

use serde::Serialize;

/// Whether a scenario's anomaly happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Observed {
    Possible,
    Prevented,
}

/// What stood in the anomaly's way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Mechanism {
    /// A statement waited for another transaction's row lock.
    Lock,
    /// A transaction was aborted with SQLSTATE 40001.
    SerializationFailure,
    /// Neither: every read saw only what its snapshot allowed.
    Snapshot,
}

/// A scratch row as a read returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LabRow {
    pub id: i32,
    pub value: i32,
}

impl From<&tokio_postgres::Row> for LabRow {
    fn from(row: &tokio_postgres::Row) -> Self {
        LabRow { id: row.get(0), value: row.get(1) }
    }
}

/// An error PostgreSQL raised in a step, as it phrased it.
#[derive(Debug, Clone, Serialize)]
pub struct PgError {
    pub sqlstate: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepOutcome {
    Ok,
    Failed,
    /// Not run: its transaction had already failed.
    Skipped,
}

/// One statement of one transaction, in the order the script issued it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// `T1`, `T2`, `T3`, or `after` for a read of the committed state once every transaction ended.
    pub tx: &'static str,
    pub statement: String,
    pub outcome: StepOutcome,
    /// The statement waited for `blockedBy`'s lock before it completed.
    pub blocked: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocked_by: Option<&'static str>,
    /// `pg_stat_activity`'s `wait_event_type:wait_event` while it was blocked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait_event: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<Vec<LabRow>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows_affected: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<PgError>,
    /// The statement is a read.
    #[serde(skip)]
    pub(super) read: bool,
}

/// One anomaly probed at one level.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Scenario {
    /// The Hermitage/Adya name: `G0`, `G1a`, … `G2`.
    pub name: &'static str,
    pub phenomenon: &'static str,
    /// What in the steps counts as the anomaly.
    pub anomaly_if: &'static str,
    pub observed: Observed,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prevented_by: Vec<Mechanism>,
    /// The first error a step raised (a serialization failure, when any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<PgError>,
    pub steps: Vec<Step>,
}
