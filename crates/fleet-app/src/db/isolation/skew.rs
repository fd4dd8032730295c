//! Lost update (P4), read skew (G-single), write skew (G2-item) and anti-dependency cycles (G2). Every
//! scenario starts from rows `1 => 10, 2 => 20`.

use super::run::Lab;
use super::script::{value, Probe, Script};
use super::session::Op;
use super::{Level, Scenario};
use crate::db::DbError;

const P4: Probe = Probe {
    name: "P4",
    phenomenon: "lost update",
    anomaly_if: "both read-modify-write increments of row 1 commit, yet it ends at 11, not 12",
    in_reads: false,
};

/// Client-side read-modify-write: each transaction reads row 1 and writes back what it read plus one.
pub(super) async fn p4(lab: &mut Lab, run: i64, level: Level) -> Result<Scenario, DbError> {
    let [c1, c2, _] = &mut lab.sessions;
    let mut s = Script::new(&lab.observer, run, level);
    let (t1, t2) = (s.begin(c1, "T1").await?, s.begin(c2, "T2").await?);
    let t1_read = value(&s.run(&t1, Op::SelectId(1)).await?, 1).unwrap_or_default();
    let t2_read = value(&s.run(&t2, Op::SelectId(1)).await?, 1).unwrap_or_default();
    s.run(&t1, Op::Update { id: 1, value: t1_read + 1 }).await?;
    let t2_write = s.run_may_block(&t2, Op::Update { id: 1, value: t2_read + 1 }, &t1).await?;
    let t1_committed = s.commit(t1).await?;
    s.finish(t2_write).await?;
    let t2_committed = s.commit(t2).await?;
    let rows = s.read_after().await?;
    let last = rows.iter().find(|row| row.id == 1).map(|row| row.value);
    Ok(s.end(&P4, t1_committed && t2_committed && last != Some(12)))
}

const G_SINGLE: Probe = Probe {
    name: "G-single",
    phenomenon: "read skew",
    anomaly_if: "T1 reads row 1 before T2 and row 2 after it: the two values do not sum to 30",
    in_reads: true,
};

/// T2 moves 2 from row 2 to row 1 (the sum stays 30) while T1 reads the rows one by one.
pub(super) async fn g_single(lab: &mut Lab, run: i64, level: Level) -> Result<Scenario, DbError> {
    let [c1, c2, _] = &mut lab.sessions;
    let mut s = Script::new(&lab.observer, run, level);
    let (t1, t2) = (s.begin(c1, "T1").await?, s.begin(c2, "T2").await?);
    let row_1 = s.run(&t1, Op::SelectId(1)).await?;
    s.run(&t2, Op::SelectId(1)).await?;
    s.run(&t2, Op::SelectId(2)).await?;
    s.run(&t2, Op::Update { id: 1, value: 12 }).await?;
    s.run(&t2, Op::Update { id: 2, value: 18 }).await?;
    s.commit(t2).await?;
    let row_2 = s.run(&t1, Op::SelectId(2)).await?;
    s.commit(t1).await?;
    let anomaly = matches!((value(&row_1, 1), value(&row_2, 2)), (Some(a), Some(b)) if a + b != 30);
    Ok(s.end(&G_SINGLE, anomaly))
}

const G2_ITEM: Probe = Probe {
    name: "G2-item",
    phenomenon: "write skew",
    anomaly_if: "T1 and T2 both commit, each having read the row the other then changed",
    in_reads: false,
};

pub(super) async fn g2_item(lab: &mut Lab, run: i64, level: Level) -> Result<Scenario, DbError> {
    let [c1, c2, _] = &mut lab.sessions;
    let mut s = Script::new(&lab.observer, run, level);
    let (t1, t2) = (s.begin(c1, "T1").await?, s.begin(c2, "T2").await?);
    let t1_read = s.run(&t1, Op::SelectAll).await?;
    let t2_read = s.run(&t2, Op::SelectAll).await?;
    s.run(&t1, Op::Update { id: 1, value: 11 }).await?;
    s.run(&t2, Op::Update { id: 2, value: 21 }).await?;
    let t1_committed = s.commit(t1).await?;
    let t2_committed = s.commit(t2).await?;
    s.read_after().await?;
    let read_stale = value(&t1_read, 2) == Some(20) && value(&t2_read, 1) == Some(10);
    Ok(s.end(&G2_ITEM, t1_committed && t2_committed && read_stale))
}

const G2: Probe = Probe {
    name: "G2",
    phenomenon: "anti-dependency cycle",
    anomaly_if: "T1 and T2 both commit an insert that the other's predicate read (value % 3 = 0) missed",
    in_reads: false,
};

pub(super) async fn g2(lab: &mut Lab, run: i64, level: Level) -> Result<Scenario, DbError> {
    let [c1, c2, _] = &mut lab.sessions;
    let mut s = Script::new(&lab.observer, run, level);
    let (t1, t2) = (s.begin(c1, "T1").await?, s.begin(c2, "T2").await?);
    let t1_read = s.run(&t1, Op::SelectMultipleOf(3)).await?;
    let t2_read = s.run(&t2, Op::SelectMultipleOf(3)).await?;
    s.run(&t1, Op::Insert { id: 3, value: 30 }).await?;
    s.run(&t2, Op::Insert { id: 4, value: 42 }).await?;
    let t1_committed = s.commit(t1).await?;
    let t2_committed = s.commit(t2).await?;
    s.read_after().await?;
    let both_missed = [t1_read, t2_read].iter().all(|read| read.as_ref().is_some_and(|r| r.is_empty_read()));
    Ok(s.end(&G2, t1_committed && t2_committed && both_missed))
}
