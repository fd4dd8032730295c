//! Observed transaction vanishes (OTV) and predicate-many-preceders (PMP), with a read predicate and with
//! a write predicate. Every scenario starts from rows `1 => 10, 2 => 20`.

use super::run::Lab;
use super::script::{value, Probe, Script};
use super::session::Op;
use super::{Level, Scenario};
use crate::db::DbError;

const OTV: Probe = Probe {
    name: "OTV",
    phenomenon: "observed transaction vanishes",
    anomaly_if: "T3 reads T2's 18 for row 2, then T1's 11 for row 1, which T2 overwrote",
    in_reads: false,
};

/// T1 writes both rows and commits; T2 overwrites both; T3 watches.
pub(super) async fn otv(lab: &mut Lab, run: i64, level: Level) -> Result<Scenario, DbError> {
    let [c1, c2, c3] = &mut lab.sessions;
    let mut s = Script::new(&lab.observer, run, level);
    let (t1, t2, t3) = (s.begin(c1, "T1").await?, s.begin(c2, "T2").await?, s.begin(c3, "T3").await?);
    s.run(&t1, Op::Update { id: 1, value: 11 }).await?;
    s.run(&t1, Op::Update { id: 2, value: 19 }).await?;
    let t2_write = s.run_may_block(&t2, Op::Update { id: 1, value: 12 }, &t1).await?;
    s.commit(t1).await?;
    s.finish(t2_write).await?;
    s.run(&t3, Op::SelectId(1)).await?;
    s.run(&t2, Op::Update { id: 2, value: 18 }).await?;
    s.run(&t3, Op::SelectId(2)).await?;
    s.commit(t2).await?;
    let row_2 = s.run(&t3, Op::SelectId(2)).await?;
    let row_1 = s.run(&t3, Op::SelectId(1)).await?;
    s.commit(t3).await?;
    let anomaly = value(&row_2, 2) == Some(18) && value(&row_1, 1) == Some(11);
    Ok(s.end(&OTV, anomaly))
}

const PMP_READ: Probe = Probe {
    name: "PMP",
    phenomenon: "predicate-many-preceders (read predicate)",
    anomaly_if: "T1's second predicate read returns row 3, inserted and committed by T2 after T1's first",
    in_reads: true,
};

pub(super) async fn pmp_read(lab: &mut Lab, run: i64, level: Level) -> Result<Scenario, DbError> {
    let [c1, c2, _] = &mut lab.sessions;
    let mut s = Script::new(&lab.observer, run, level);
    let (t1, t2) = (s.begin(c1, "T1").await?, s.begin(c2, "T2").await?);
    s.run(&t1, Op::SelectValue(30)).await?;
    s.run(&t2, Op::Insert { id: 3, value: 30 }).await?;
    s.commit(t2).await?;
    let again = s.run(&t1, Op::SelectMultipleOf(3)).await?;
    s.commit(t1).await?;
    Ok(s.end(&PMP_READ, value(&again, 3).is_some()))
}

const PMP_WRITE: Probe = Probe {
    name: "PMP-write",
    phenomenon: "predicate-many-preceders (write predicate)",
    anomaly_if: "T2's delete of rows with value 20 succeeds, yet T2 then reads a row with value 20",
    in_reads: false,
};

/// The example of PostgreSQL's documentation (13.2.1): T2's delete re-checks only the rows its
/// snapshot matched.
pub(super) async fn pmp_write(lab: &mut Lab, run: i64, level: Level) -> Result<Scenario, DbError> {
    let [c1, c2, _] = &mut lab.sessions;
    let mut s = Script::new(&lab.observer, run, level);
    let (t1, t2) = (s.begin(c1, "T1").await?, s.begin(c2, "T2").await?);
    s.run(&t1, Op::AddToAll(10)).await?;
    let delete = s.run_may_block(&t2, Op::DeleteValue(20), &t1).await?;
    s.commit(t1).await?;
    let deleted = s.finish(delete).await?.is_some();
    let survivors = s.run(&t2, Op::SelectValue(20)).await?;
    s.commit(t2).await?;
    let anomaly = deleted && survivors.is_some_and(|read| !read.is_empty_read());
    Ok(s.end(&PMP_WRITE, anomaly))
}
