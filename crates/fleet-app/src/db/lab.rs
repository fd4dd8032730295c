//! Lab probes (holding a connection on purpose) and the lab's share of the node's connections.
//!
//! `/api/hold` takes a pooled connection and `/api/test-isolation` opens four of its own: left alone,
//! anyone who can reach a node could keep its pool full for the cost of a few requests a second. So both
//! draw from one budget, `LAB_MAX_CONNECTIONS` (default `POOL_SIZE − 1`): a request that does not fit at
//! once is refused (429 `lab_busy`), never queued, and holds never take the pool's last connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::isolation::LabError;
use super::Primary;

/// The connections the lab endpoints may use at once.
#[derive(Debug, Clone)]
pub(super) struct LabBudget {
    connections: Arc<Semaphore>,
}

impl LabBudget {
    pub(super) fn new(max_connections: usize) -> Self {
        LabBudget { connections: Arc::new(Semaphore::new(max_connections.min(Semaphore::MAX_PERMITS))) }
    }

    /// `n` connections of the budget, now or never (then `LabError::Busy`); given back when dropped.
    pub(super) fn take(&self, n: u32) -> Result<OwnedSemaphorePermit, LabError> {
        Arc::clone(&self.connections).try_acquire_many_owned(n).map_err(|_| LabError::Busy)
    }
}

impl Primary {
    /// Holds one pooled connection in `pg_sleep` for `duration`, if the lab's budget has room.
    pub async fn hold(&self, duration: Duration) -> Result<(), LabError> {
        let _share = self.lab.take(1)?;
        self.observed_taking(duration, async {
            let client = self.client().await?;
            let sleep = client.prepare_cached("SELECT pg_sleep($1)").await?;
            client.execute(&sleep, &[&duration.as_secs_f64()]).await?;
            Ok(())
        })
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_refuses_what_does_not_fit_at_once_and_takes_back_what_is_returned() {
        let budget = LabBudget::new(4);
        let hold = budget.take(1).unwrap();
        assert!(budget.take(4).is_err(), "an isolation run needs all four");
        drop(hold);
        let run = budget.take(4).unwrap();
        assert!(budget.take(1).is_err());
        drop(run);
        assert!(LabBudget::new(0).take(1).is_err(), "a budget of 0 turns the lab away");
    }
}
