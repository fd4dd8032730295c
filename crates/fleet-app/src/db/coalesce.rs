//! Coalesced increments (`INCREMENT_MODE=coalesce`).
//!
//! A row lock serialises every transaction on a counter, so one transaction per increment caps a hot key
//! at the database's transaction rate. Here the increments of one key that arrive while a transaction on
//! that key is running wait for it to finish, then go together into the next one, which adds n under the
//! same `SELECT … FOR UPDATE` and hands each waiting request its own value (new − n + 1 … new). The
//! contract holds: n successful calls return each of their values once, and a failed transaction applies
//! none of its increments and fails every request in it. At most one transaction per key runs per node;
//! different keys run side by side, as many as the pool allows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::oneshot;

use super::{Counter, Db, DbError};

type Reply = oneshot::Sender<Result<i64, Arc<DbError>>>;

/// Batches concurrent increments of the same key into one transaction.
#[derive(Debug, Clone)]
pub struct Coalescer {
    db: Db,
    /// A key is present while a batch for it runs; its list holds the requests waiting for the next one.
    waiting: Arc<Mutex<HashMap<String, Vec<Reply>>>>,
}

impl Coalescer {
    pub fn new(db: Db) -> Self {
        Coalescer { db, waiting: Arc::default() }
    }

    /// Adds 1 to `key`, in the next transaction on `key`; returns this request's own new value.
    #[tracing::instrument(skip_all, fields(counter.key = %key))]
    pub async fn increment(&self, key: &str) -> Result<Counter, DbError> {
        let (reply, value) = oneshot::channel();
        let lead = {
            let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
            match waiting.get_mut(key) {
                Some(queue) => {
                    queue.push(reply);
                    false
                }
                None => {
                    waiting.insert(key.to_owned(), vec![reply]);
                    true
                }
            }
        };
        if lead {
            // The batches run in their own task (on this worker's thread), so a client that hangs up
            // cannot cancel other requests' transaction halfway.
            actix_web::rt::spawn(self.clone().run_batches(key.to_owned()));
        }
        match value.await {
            Ok(Ok(value)) => Ok(Counter { key: key.to_owned(), value }),
            Ok(Err(err)) => Err(DbError::Shared(err)),
            Err(_) => Err(DbError::BatchLost),
        }
    }

    /// Runs one transaction after another for `key`, each taking every request queued so far, until none
    /// is left.
    async fn run_batches(self, key: String) {
        loop {
            let batch = {
                let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
                let queue = waiting.get_mut(&key).map(std::mem::take).unwrap_or_default();
                if queue.is_empty() {
                    waiting.remove(&key);
                    return;
                }
                queue
            };
            let n = batch.len() as i64;
            match self.db.add_to_counter(&key, n).await {
                Ok(new_value) => {
                    for (reply, value) in batch.into_iter().zip(new_value - n + 1..) {
                        let _ = reply.send(Ok(value));
                    }
                }
                Err(err) => {
                    let err = Arc::new(err);
                    for reply in batch {
                        let _ = reply.send(Err(Arc::clone(&err)));
                    }
                }
            }
        }
    }
}
