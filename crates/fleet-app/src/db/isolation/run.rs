//! One call's run: its connections, a fresh set of scratch rows per scenario, the catalogue at each
//! level, and the clean-up.

use crate::db::tls::Target;

use super::session::{Observer, Session};
use super::{basics, predicates, skew, Level, LevelReport, Scenario};
use crate::db::DbError;

/// The connections of one call and the scratch rows it created.
#[derive(Debug)]
pub(super) struct Lab {
    pub(super) sessions: [Session; 3],
    pub(super) observer: Observer,
    runs: Vec<i64>,
}

impl Lab {
    /// Opens the call's four connections and removes scratch rows that a crashed node left behind.
    pub(super) async fn open(lab: &Target) -> Result<Self, DbError> {
        let (t1, t2, t3, observer) = tokio::try_join!(
            Session::open(lab),
            Session::open(lab),
            Session::open(lab),
            Observer::open(lab)
        )?;
        observer.purge_stale().await?;
        Ok(Lab { sessions: [t1, t2, t3], observer, runs: Vec::new() })
    }

    /// Runs the whole catalogue at each level.
    pub(super) async fn run(&mut self, levels: &[Level]) -> Result<Vec<LevelReport>, DbError> {
        let mut reports = Vec::with_capacity(levels.len());
        for &level in levels {
            let server_level = self.observer.server_level(level).await?;
            let mut scenarios = Vec::with_capacity(CATALOGUE.len());
            for &entry in &CATALOGUE {
                scenarios.push(self.scenario(entry, level).await?);
            }
            reports.push(LevelReport::new(level, server_level, scenarios));
        }
        Ok(reports)
    }

    /// Seeds fresh rows under a new random run id and runs one scenario on them. SERIALIZABLE scenarios
    /// hold a fleet-wide advisory lock (the observer's session lock, also released if the connection
    /// drops), so no two calls' serializable transactions are ever concurrent: their predicate locks,
    /// which may cover a whole page or table, cannot meet.
    async fn scenario(&mut self, entry: Entry, level: Level) -> Result<Scenario, DbError> {
        let run = rand::random::<i64>();
        self.runs.push(run);
        self.observer.seed(run).await?;
        let exclusive = level == Level::Serializable;
        if exclusive {
            self.observer.lock_serializable().await?;
        }
        let scenario = entry.run(self, run, level).await;
        if exclusive {
            self.observer.unlock_serializable().await?;
        }
        scenario
    }

    /// Closes the scenario connections (ending any transaction a failed run left open, with its locks),
    /// then deletes this call's scratch rows; a failure here is logged, and the rows purged an hour later.
    pub(super) async fn close(self) {
        let Lab { sessions, observer, runs } = self;
        drop(sessions);
        if let Err(e) = observer.delete(&runs).await {
            tracing::warn!(error = %e, "could not delete the isolation lab's scratch rows");
        }
    }
}

/// The catalogue, in the order of the Hermitage test file.
#[derive(Debug, Clone, Copy)]
enum Entry {
    G0,
    G1a,
    G1b,
    G1c,
    Otv,
    PmpRead,
    PmpWrite,
    P4,
    GSingle,
    G2Item,
    G2,
}

const CATALOGUE: [Entry; 11] = [
    Entry::G0,
    Entry::G1a,
    Entry::G1b,
    Entry::G1c,
    Entry::Otv,
    Entry::PmpRead,
    Entry::PmpWrite,
    Entry::P4,
    Entry::GSingle,
    Entry::G2Item,
    Entry::G2,
];

impl Entry {
    async fn run(self, lab: &mut Lab, run: i64, level: Level) -> Result<Scenario, DbError> {
        match self {
            Entry::G0 => basics::g0(lab, run, level).await,
            Entry::G1a => basics::g1a(lab, run, level).await,
            Entry::G1b => basics::g1b(lab, run, level).await,
            Entry::G1c => basics::g1c(lab, run, level).await,
            Entry::Otv => predicates::otv(lab, run, level).await,
            Entry::PmpRead => predicates::pmp_read(lab, run, level).await,
            Entry::PmpWrite => predicates::pmp_write(lab, run, level).await,
            Entry::P4 => skew::p4(lab, run, level).await,
            Entry::GSingle => skew::g_single(lab, run, level).await,
            Entry::G2Item => skew::g2_item(lab, run, level).await,
            Entry::G2 => skew::g2(lab, run, level).await,
        }
    }
}
