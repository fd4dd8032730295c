//! Row gates: waiting for a busy counter without holding a pooled connection.
//!
//! A transaction that waits for a row lock holds its pooled connection the whole time. Two hundred
//! transfers of one pair on one node would hold all its connections waiting for the same two rows, and
//! every other request would time out in the pool queue. So before it takes a connection, a request
//! passes the node's gate of each counter it will lock: at most [`ROW_WAITERS_PER_NODE`] requests of a
//! node hold (or wait for) a connection for the same counter; the rest wait here, in arrival order,
//! holding nothing but their place in the queue.
//!
//! Two per counter, not one: with one, a node would never send two transactions on one row to the
//! database, and opposite transfers from one node would never meet there (so `LOCK_ORDER=request` would
//! show no deadlock). With two, they still meet, PostgreSQL detects the cycle (40P01) and one is retried,
//! and a node's other traffic keeps `POOL_SIZE − 2 × hot pairs` connections. Gates are taken in key order,
//! so the gates themselves can never deadlock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How many of a node's requests may hold or wait for a connection on one counter at once.
pub const ROW_WAITERS_PER_NODE: usize = 2;

/// The node's gates, one per counter key that a request is passing or waiting at.
#[derive(Debug, Clone, Default)]
pub struct RowGates {
    gates: Arc<Mutex<HashMap<String, Gate>>>,
}

#[derive(Debug)]
struct Gate {
    permits: Arc<Semaphore>,
    /// Requests passing or waiting: the gate goes when the last one leaves.
    users: usize,
}

/// A request's passes through the gates of its keys; dropping it lets the next request through.
#[derive(Debug)]
pub struct Passes {
    gates: RowGates,
    held: Vec<(String, Option<OwnedSemaphorePermit>)>,
}

impl RowGates {
    /// Waits (holding no connection) until this request may lock every one of `keys`. Gates are taken
    /// in key order, so two requests can never wait for each other's gates.
    pub async fn pass(&self, keys: &[&str]) -> Passes {
        let mut keys: Vec<&str> = keys.to_vec();
        keys.sort_unstable();
        keys.dedup();
        let mut passes = Passes { gates: self.clone(), held: Vec::with_capacity(keys.len()) };
        for key in keys {
            let permits = {
                let mut gates = self.lock();
                let gate = gates.entry(key.to_owned()).or_insert_with(|| Gate {
                    permits: Arc::new(Semaphore::new(ROW_WAITERS_PER_NODE)),
                    users: 0,
                });
                gate.users += 1;
                Arc::clone(&gate.permits)
            };
            // Counted before waiting, so a cancelled wait still lets `Drop` remove an unused gate.
            passes.held.push((key.to_owned(), None));
            let permit = permits.acquire_owned().await.expect("row gates are never closed");
            passes.held.last_mut().expect("just pushed").1 = Some(permit);
        }
        passes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Gate>> {
        self.gates.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many keys have a gate (someone passing or waiting): the map never outgrows the requests.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

impl Drop for Passes {
    fn drop(&mut self) {
        let mut gates = self.gates.lock();
        for (key, permit) in self.held.drain(..) {
            drop(permit);
            if let Some(gate) = gates.get_mut(&key) {
                gate.users -= 1;
                if gate.users == 0 {
                    gates.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_third_request_on_a_key_waits_and_gates_go_when_unused() {
        let gates = RowGates::default();
        let first = gates.pass(&["b", "a"]).await;
        let second = gates.pass(&["a", "b"]).await;
        let third = tokio::spawn({
            let gates = gates.clone();
            async move { gates.pass(&["a"]).await }
        });
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "two requests already hold a's gate");
        drop(first);
        let third = third.await.unwrap();
        drop((second, third));
        assert_eq!(gates.len(), 0, "no gate is kept once nobody uses it");
    }

    #[tokio::test]
    async fn a_cancelled_wait_leaves_no_gate_behind() {
        let gates = RowGates::default();
        let held = [gates.pass(&["k"]).await, gates.pass(&["k"]).await];
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(10), gates.pass(&["k"])).await;
        assert!(waiting.is_err(), "the gate is full");
        drop(held);
        assert_eq!(gates.len(), 0);
    }
}
