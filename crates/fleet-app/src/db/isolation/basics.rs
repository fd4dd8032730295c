//! Read Committed's basic requirements: no dirty writes (G0), no aborted (G1a) or intermediate (G1b)
//! reads, no circular information flow (G1c). Every scenario starts from rows `1 => 10, 2 => 20`.

use super::run::Lab;
use super::script::{value, Probe, Script};
use super::session::Op;
use super::{Level, Scenario};
use crate::db::DbError;

const G0: Probe = Probe {
    name: "G0",
    phenomenon: "dirty write",
    anomaly_if: "T2 overwrites row 1 while T1's write to it is uncommitted (its update does not wait for T1)",
    in_reads: false,
};

/// T1 and T2 both write rows 1 and 2; T2's first write must wait for T1 to end.
pub(super) async fn g0(lab: &mut Lab, run: i64, level: Level) -> Result<Scenario, DbError> {
    let [c1, c2, _] = &mut lab.sessions;
    let mut s = Script::new(&lab.observer, run, level);
    let (t1, t2) = (s.begin(c1, "T1").await?, s.begin(c2, "T2").await?);
    s.run(&t1, Op::Update { id: 1, value: 11 }).await?;
    let t2_write = s.run_may_block(&t2, Op::Update { id: 1, value: 12 }, &t1).await?;
    let waited = t2_write.was_blocked();
    s.run(&t1, Op::Update { id: 2, value: 21 }).await?;
    s.commit(t1).await?;
    let overwrote = s.finish(t2_write).await?.is_some();
    s.run(&t2, Op::Update { id: 2, value: 22 }).await?;
    s.commit(t2).await?;
    s.read_after().await?;
    Ok(s.end(&G0, overwrote && !waited))
}

const G1A: Probe = Probe {
    name: "G1a",
    phenomenon: "aborted read",
    anomaly_if: "T2 reads 101, written by T1, which then aborts",
    in_reads: true,
};

pub(super) async fn g1a(lab: &mut Lab, run: i64, level: Level) -> Result<Scenario, DbError> {
    let [c1, c2, _] = &mut lab.sessions;
    let mut s = Script::new(&lab.observer, run, level);
    let (t1, t2) = (s.begin(c1, "T1").await?, s.begin(c2, "T2").await?);
    s.run(&t1, Op::Update { id: 1, value: 101 }).await?;
    let before = s.run(&t2, Op::SelectAll).await?;
    s.rollback(t1).await?;
    let after = s.run(&t2, Op::SelectAll).await?;
    s.commit(t2).await?;
    let anomaly = [before, after].iter().any(|read| value(read, 1) == Some(101));
    Ok(s.end(&G1A, anomaly))
}

const G1B: Probe = Probe {
    name: "G1b",
    phenomenon: "intermediate read",
    anomaly_if: "T2 reads 101, a value T1 overwrote with 11 before committing",
    in_reads: true,
};

pub(super) async fn g1b(lab: &mut Lab, run: i64, level: Level) -> Result<Scenario, DbError> {
    let [c1, c2, _] = &mut lab.sessions;
    let mut s = Script::new(&lab.observer, run, level);
    let (t1, t2) = (s.begin(c1, "T1").await?, s.begin(c2, "T2").await?);
    s.run(&t1, Op::Update { id: 1, value: 101 }).await?;
    let before = s.run(&t2, Op::SelectAll).await?;
    s.run(&t1, Op::Update { id: 1, value: 11 }).await?;
    s.commit(t1).await?;
    let after = s.run(&t2, Op::SelectAll).await?;
    s.commit(t2).await?;
    let anomaly = [before, after].iter().any(|read| value(read, 1) == Some(101));
    Ok(s.end(&G1B, anomaly))
}

const G1C: Probe = Probe {
    name: "G1c",
    phenomenon: "circular information flow",
    anomaly_if: "T1 reads T2's uncommitted 22 and T2 reads T1's uncommitted 11",
    in_reads: true,
};

pub(super) async fn g1c(lab: &mut Lab, run: i64, level: Level) -> Result<Scenario, DbError> {
    let [c1, c2, _] = &mut lab.sessions;
    let mut s = Script::new(&lab.observer, run, level);
    let (t1, t2) = (s.begin(c1, "T1").await?, s.begin(c2, "T2").await?);
    s.run(&t1, Op::Update { id: 1, value: 11 }).await?;
    s.run(&t2, Op::Update { id: 2, value: 22 }).await?;
    let t1_read = s.run(&t1, Op::SelectId(2)).await?;
    let t2_read = s.run(&t2, Op::SelectId(1)).await?;
    s.commit(t1).await?;
    s.commit(t2).await?;
    let anomaly = value(&t1_read, 2) == Some(22) && value(&t2_read, 1) == Some(11);
    Ok(s.end(&G1C, anomaly))
}
