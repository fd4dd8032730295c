//! The isolation lab: the Hermitage anomaly catalogue run for real at each isolation level, on dedicated
//! connections and scratch rows private to the call; what PostgreSQL did is reported, never looked up.
//!
//! Submodules: `session` (connections, statements), `run` (one call: seed, run, clean up), `script`
//! (steps, blocking, outcomes), `report` (what the response holds) and the scenarios: `basics` (G0, G1a–c), `predicates` (OTV, PMP) and
//! `skew` (P4, G-single, G2-item, G2).

mod basics;
mod predicates;
mod report;
mod run;
mod script;
mod session;
mod skew;

use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};
use tokio_postgres::IsolationLevel;

use super::tls::Target;
use super::{DbError, Primary};
use run::Lab;

pub use report::{LabRow, Mechanism, Observed, PgError, Scenario, Step, StepOutcome};

/// The dedicated connections one run opens (three scenario sessions and the observer), all counted in
/// the lab's budget (`LAB_MAX_CONNECTIONS`): with the default `POOL_SIZE − 1` = 4, one run at a time,
/// and a node uses at most `POOL_SIZE + 4` connections (4 nodes: 4 × (5 + 4) = 36 of PostgreSQL's 100).
const CONNECTIONS: u32 = 4;
/// The whole run, all four levels; each step is also bounded by the sessions' lock and statement timeouts.
const RUN_DEADLINE: Duration = Duration::from_secs(30);

/// An SQL isolation level, by its standard name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    ReadUncommitted,
    ReadCommitted,
    RepeatableRead,
    Serializable,
}

impl Level {
    pub const ALL: [Level; 4] =
        [Level::ReadUncommitted, Level::ReadCommitted, Level::RepeatableRead, Level::Serializable];

    pub fn name(self) -> &'static str {
        match self {
            Level::ReadUncommitted => "READ UNCOMMITTED",
            Level::ReadCommitted => "READ COMMITTED",
            Level::RepeatableRead => "REPEATABLE READ",
            Level::Serializable => "SERIALIZABLE",
        }
    }

    /// One of the four names, case-insensitive, words separated by `_` or a space.
    pub fn parse(text: &str) -> Option<Level> {
        let name = text.trim().to_ascii_uppercase().replace('_', " ");
        Level::ALL.into_iter().find(|level| level.name() == name)
    }

    /// The level PostgreSQL implements for this one: its documentation (13.2) says READ UNCOMMITTED
    /// behaves as READ COMMITTED, although `transaction_isolation` still reports `read uncommitted`.
    pub fn effective(self) -> Level {
        match self {
            Level::ReadUncommitted => Level::ReadCommitted,
            level => level,
        }
    }

    fn isolation_level(self) -> IsolationLevel {
        match self {
            Level::ReadUncommitted => IsolationLevel::ReadUncommitted,
            Level::ReadCommitted => IsolationLevel::ReadCommitted,
            Level::RepeatableRead => IsolationLevel::RepeatableRead,
            Level::Serializable => IsolationLevel::Serializable,
        }
    }
}

impl Serialize for Level {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// A phenomenon of the response (`dirtyRead` …), derived from the scenarios that probe it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Phenomenon {
    pub name: &'static str,
    pub observed: Observed,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prevented_by: Vec<Mechanism>,
    pub scenarios: Vec<&'static str>,
}

/// What one level did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LevelReport {
    /// The level every transaction was started with.
    pub level: Level,
    /// What PostgreSQL documents it to run as.
    pub effective_level: Level,
    /// `current_setting('transaction_isolation')` in a transaction started at `level`.
    pub server_level: String,
    pub dirty_read: Observed,
    pub non_repeatable_read: Observed,
    pub phantom_read: Observed,
    pub lost_update: Observed,
    pub write_skew: Observed,
    pub phenomena: Vec<Phenomenon>,
    pub scenarios: Vec<Scenario>,
}

/// Each response phenomenon and the scenarios whose anomaly is an instance of it.
const PHENOMENA: [(&str, &[&str]); 5] = [
    ("dirtyRead", &["G1a", "G1b", "G1c"]),
    ("nonRepeatableRead", &["G-single"]),
    ("phantomRead", &["PMP", "PMP-write"]),
    ("lostUpdate", &["P4"]),
    ("writeSkew", &["G2-item", "G2"]),
];

impl LevelReport {
    fn new(level: Level, server_level: String, scenarios: Vec<Scenario>) -> Self {
        let phenomena: Vec<Phenomenon> =
            PHENOMENA.iter().map(|(name, names)| derive(name, names, &scenarios)).collect();
        let observed =
            |name: &str| phenomena.iter().find(|p| p.name == name).map_or(Observed::Possible, |p| p.observed);
        LevelReport {
            level,
            effective_level: level.effective(),
            server_level,
            dirty_read: observed("dirtyRead"),
            non_repeatable_read: observed("nonRepeatableRead"),
            phantom_read: observed("phantomRead"),
            lost_update: observed("lostUpdate"),
            write_skew: observed("writeSkew"),
            phenomena,
            scenarios,
        }
    }
}

/// Possible when any of its scenarios showed the anomaly; otherwise prevented by every mechanism seen.
fn derive(name: &'static str, names: &[&'static str], scenarios: &[Scenario]) -> Phenomenon {
    let probes: Vec<&Scenario> = scenarios.iter().filter(|s| names.contains(&s.name)).collect();
    let possible = probes.is_empty() || probes.iter().any(|s| s.observed == Observed::Possible);
    let mut prevented_by: Vec<Mechanism> = Vec::new();
    if !possible {
        for mechanism in probes.iter().flat_map(|s| &s.prevented_by) {
            if !prevented_by.contains(mechanism) {
                prevented_by.push(*mechanism);
            }
        }
    }
    Phenomenon {
        name,
        observed: if possible { Observed::Possible } else { Observed::Prevented },
        prevented_by,
        scenarios: names.to_vec(),
    }
}

/// Why a run gave no report.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The lab endpoints already use their share of this node's connections (`LAB_MAX_CONNECTIONS`).
    #[error(
        "the lab endpoints are using their share of this node's connections (LAB_MAX_CONNECTIONS); \
         retry later"
    )]
    Busy,
    /// A step waited past the lab's `lock_timeout`/`statement_timeout`, or the run past its deadline.
    #[error("the isolation run did not finish in time")]
    TimedOut,
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Where the lab opens its own connections (never the pool's).
#[derive(Debug, Clone)]
pub struct IsolationLab {
    target: Target,
}

impl IsolationLab {
    /// `node` is where the node writes; the lab adds its own timeouts and application name.
    pub fn new(node: Target) -> Self {
        IsolationLab { target: Target { pg: session::lab_config(&node.pg), tls: node.tls } }
    }
}

impl Primary {
    /// Runs every scenario at each of `levels`, in order, and reports what PostgreSQL did.
    #[tracing::instrument(skip_all, fields(isolation.levels = levels.len()))]
    pub async fn test_isolation(&self, levels: &[Level]) -> Result<Vec<LevelReport>, LabError> {
        let _share = self.lab.take(CONNECTIONS)?;
        let start = Instant::now();
        let mut lab = self.observed(Lab::open(&self.isolation.target)).await?;
        let opened = start.elapsed();
        let result = tokio::time::timeout(RUN_DEADLINE, self.observed(lab.run(levels))).await;
        let ran = start.elapsed();
        lab.close().await;
        tracing::debug!(
            isolation.connect_ms = opened.as_millis(),
            isolation.run_ms = (ran - opened).as_millis(),
            isolation.close_ms = (start.elapsed() - ran).as_millis(),
            "isolation lab run"
        );
        match result {
            Err(_elapsed) => Err(LabError::TimedOut),
            Ok(Err(err)) if matches!(err.sqlstate(), Some("55P03" | "57014")) => Err(LabError::TimedOut),
            Ok(reports) => Ok(reports?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_in_any_case_with_underscores_or_spaces() {
        assert_eq!(Level::parse("read committed"), Some(Level::ReadCommitted));
        assert_eq!(Level::parse("REPEATABLE_READ"), Some(Level::RepeatableRead));
        assert_eq!(Level::parse("Read_Uncommitted"), Some(Level::ReadUncommitted));
        assert_eq!(Level::parse("serializable"), Some(Level::Serializable));
        assert_eq!(Level::parse("snapshot"), None);
        assert_eq!(Level::parse("READ  COMMITTED"), None);
        assert_eq!(Level::parse("READ COMMITTED; DROP TABLE counters"), None);
    }

    #[test]
    fn read_uncommitted_is_documented_to_run_as_read_committed() {
        assert_eq!(Level::ReadUncommitted.effective(), Level::ReadCommitted);
        assert_eq!(Level::Serializable.effective(), Level::Serializable);
    }
}
