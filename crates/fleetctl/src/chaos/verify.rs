//! The check after a load: every acknowledged increment is in the database exactly once. For each counter,
//! its final value (read through the API) against what the clients were told: n acknowledgements on a
//! fresh counter must have returned n distinct values, all within 1..=final, and final may exceed n by at
//! most the increments whose outcome stayed unknown. With none unknown: the values are exactly 1..=n.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::client::{CarefulClient, Outcome, RetryPolicy};
use super::workload::Run;

/// How long reading the final values may take, retries included.
const READ_DEADLINE: Duration = Duration::from_secs(60);

/// One counter's check.
#[derive(Debug, Clone, Serialize)]
pub struct KeyCheck {
    pub key: String,
    /// Its value in the database at the end.
    pub value: i64,
    pub acknowledged: u64,
    /// Increments with no acknowledgement: each may or may not have been applied.
    pub unresolved: u64,
    /// Acknowledged increments the database does not hold.
    pub lost: u64,
    /// Increments applied more than once (or one value acknowledged to two increments).
    pub duplicated: u64,
}

/// The whole check.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub acknowledged: u64,
    pub unresolved: u64,
    /// Increments refused with a final 4xx (not applied, never retried).
    pub rejected: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub keys: Vec<KeyCheck>,
}

impl Verdict {
    /// No acknowledged increment lost, none applied twice.
    pub fn exactly_once(&self) -> bool {
        self.lost == 0 && self.duplicated == 0
    }

    /// `Ok` when nothing was lost or duplicated; otherwise the error `fleetctl chaos run` exits with.
    pub fn judge(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.exactly_once(),
            "{} acknowledged increments lost, {} duplicated",
            self.lost,
            self.duplicated
        );
        Ok(())
    }
}

/// Reads every counter of `run` through `url` and checks it against the acknowledgements.
pub fn verify(url: &str, run: &Run) -> anyhow::Result<Verdict> {
    let client = CarefulClient::new(url, RetryPolicy::careful());
    let deadline = Instant::now() + READ_DEADLINE;
    let mut acks: BTreeMap<&str, (Vec<i64>, u64)> =
        run.options.keys.iter().map(|key| (key.as_str(), (Vec::new(), 0))).collect();
    let mut rejected = 0;
    for increment in &run.increments {
        let (values, unresolved) = acks.entry(increment.key.as_str()).or_default();
        match increment.outcome {
            Outcome::Acked { value, .. } => values.push(value),
            Outcome::Unresolved(_) => *unresolved += 1,
            Outcome::Rejected(_) => rejected += 1,
        }
    }
    let keys = acks
        .into_iter()
        .map(|(key, (values, unresolved))| Ok(check(key, client.counter(key, deadline)?, values, unresolved)))
        .collect::<anyhow::Result<Vec<KeyCheck>>>()?;
    Ok(Verdict {
        acknowledged: keys.iter().map(|k| k.acknowledged).sum(),
        unresolved: keys.iter().map(|k| k.unresolved).sum(),
        rejected,
        lost: keys.iter().map(|k| k.lost).sum(),
        duplicated: keys.iter().map(|k| k.duplicated).sum(),
        keys,
    })
}

/// One counter: `value` in the database, the acknowledged `values`, and `unresolved` unknown outcomes.
fn check(key: &str, value: i64, mut values: Vec<i64>, unresolved: u64) -> KeyCheck {
    let acknowledged = values.len() as u64;
    values.sort_unstable();
    values.dedup();
    let distinct = values.len() as u64;
    let value_u64 = u64::try_from(value).unwrap_or(0);
    // Fewer increments in the database than acknowledged, or an acknowledged value it never reached.
    let beyond = values.iter().filter(|&&v| v < 1 || v > value).count() as u64;
    let lost = acknowledged.saturating_sub(value_u64).max(beyond);
    // Two increments told the same value, or more in the database than the acknowledged and unknown.
    let duplicated = (acknowledged - distinct) + value_u64.saturating_sub(acknowledged + unresolved);
    KeyCheck { key: key.to_owned(), value, acknowledged, unresolved, lost, duplicated }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_exactly_one_to_n_are_exactly_once() {
        let k = check("k", 4, vec![3, 1, 4, 2], 0);
        assert_eq!((k.lost, k.duplicated), (0, 0));
    }

    #[test]
    fn an_increment_applied_twice_is_a_duplicate() {
        let k = check("k", 5, vec![1, 2, 3, 4], 0);
        assert_eq!((k.lost, k.duplicated), (0, 1));
        // …unless an increment with no answer may account for it.
        let k = check("k", 5, vec![1, 2, 3, 4], 1);
        assert_eq!((k.lost, k.duplicated), (0, 0));
        // One value told to two increments, the counter one short: a lost update.
        let k = check("k", 2, vec![1, 2, 2], 0);
        assert_eq!((k.lost, k.duplicated), (1, 1));
    }

    #[test]
    fn an_acknowledged_increment_missing_from_the_database_is_lost() {
        let k = check("k", 3, vec![1, 2, 3, 4], 0);
        assert_eq!((k.lost, k.duplicated), (1, 0));
        let k = check("k", 0, vec![1], 3);
        assert_eq!((k.lost, k.duplicated), (1, 0));
        // The right count, but a value the counter never reached.
        let k = check("k", 2, vec![1, 7], 1);
        assert_eq!(k.lost, 1);
    }
}
