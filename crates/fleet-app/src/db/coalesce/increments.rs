//! Coalesced increments (`INCREMENT_MODE=coalesce`): write batches.
//!
//! One transaction per increment caps a node at the database's transaction rate, and a hot key at the
//! rate one row lock can be passed on. So increments that arrive together share transactions, in two
//! steps:
//!
//! 1. **Free counters, many keys at once.** Every increment queued while the node's previous batch ran
//!    goes into one transaction that locks the counters it can get at once (`SELECT … FOR UPDATE SKIP
//!    LOCKED`: it never waits for a lock, so it cannot deadlock or be held up by a busy key) and adds, to
//!    each, the number of increments queued for it.
//! 2. **The rest, one key at a time.** A counter that is missing, or locked by another transaction (and
//!    a batch of one key, which gains nothing from skipping a lock), goes to a transaction of its own
//!    that creates it if needed and waits for its row lock. Increments of that key arriving meanwhile
//!    join its next one (not a batch), so at most one such transaction per key waits on a node, and a
//!    hot key is passed from node to node with many increments at a time.
//!
//! While the counter exists, either transaction is a single statement (see `Store::write_alone`).
//!
//! Each request gets its own value: a transaction that adds n to a counter now at v hands out v − n + 1 …
//! v. A failed transaction applies none of its increments. When a many-key batch fails with an error tied
//! to one row (a counter past i64: SQLSTATE class 22 or 23), its keys are retried one key at a time, so
//! that failure reaches only the requests of its own key; any other failure (a pool timeout, a lost
//! connection, a sent statement left unanswered: 08007) is every request's answer at once, so no
//! request waits twice.
//!
//! A request whose client went away before its transaction started is dropped from it and takes no
//! value, so the callers who stayed see no gap.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::{answered, lock, Queue, Unfinished};
use crate::db::{Counter, DbError, Store, Token};

/// A request's own value and its transaction's LSN, or the transaction's error.
type Reply = oneshot::Sender<Result<(i64, Option<Token>), Arc<DbError>>>;

/// Batches concurrent increments into shared transactions.
#[derive(Debug, Clone)]
pub struct Coalescer {
    db: Store,
    state: Arc<Mutex<State>>,
}

#[derive(Debug, Default)]
struct State {
    /// Requests for the next many-key batch.
    queued: Queue<Reply>,
    /// Keys with a transaction of their own running, and the requests waiting for the next one.
    contended: HashMap<String, Vec<Reply>>,
}

impl Coalescer {
    pub fn new(db: Store) -> Self {
        Coalescer { db, state: Arc::default() }
    }

    /// Adds 1 to `key` in the node's next shared transaction; returns this request's own new value and
    /// the transaction's LSN.
    pub async fn increment(&self, key: &str) -> Result<(Counter, Option<Token>), DbError> {
        let (reply, value) = oneshot::channel();
        let start = {
            let mut state = lock(&self.state);
            // A key already waiting for its own transaction is busy: join that one rather than a batch
            // that would only find its row locked.
            match state.contended.get_mut(key) {
                Some(waiting) => {
                    waiting.push(reply);
                    false
                }
                None => state.queued.join(key, reply),
            }
        };
        if start {
            // Batches run in their own task, so a client that hangs up cannot cancel other requests'
            // transaction halfway.
            actix_web::rt::spawn(self.clone().run_batches());
        }
        let (value, lsn) = answered(value).await?;
        Ok((Counter { key: key.to_owned(), value }, lsn))
    }

    /// Runs one many-key batch after another, each taking every request queued so far, until none is left.
    async fn run_batches(self) {
        let mut guard = Unfinished(Some(|| lock(&self.state).queued.abandon()));
        loop {
            let next = lock(&self.state).queued.next();
            let Some(batch) = next else { break };
            // One key alone waits for its row lock in a transaction of its own at once: skipping a
            // locked row would only send it there after a round trip.
            if batch.len() == 1 {
                batch.into_iter().for_each(|(key, replies)| self.contend(key, replies));
                continue;
            }
            let (keys, counts): (Vec<String>, Vec<i64>) =
                batch.iter().map(|(key, replies)| (key.clone(), replies.len() as i64)).unzip();
            match self.db.add_to_free_counters(&keys, &counts).await {
                Ok((values, lsn)) => {
                    for (key, replies) in batch {
                        match values.get(&key) {
                            Some(&value) => answer(replies, Ok((value, lsn))),
                            None => self.contend(key, replies),
                        }
                    }
                }
                Err(err) if err.is_row_error() && batch.len() > 1 => {
                    tracing::debug!(error = %err, "many-key batch failed on a row; retrying its keys one by one");
                    batch.into_iter().for_each(|(key, replies)| self.contend(key, replies));
                }
                Err(err) => {
                    let err = Arc::new(err);
                    batch.into_values().for_each(|replies| answer(replies, Err(Arc::clone(&err))));
                }
            }
        }
        guard.finished();
    }

    /// Queues `replies` for `key`'s own next transaction, starting its runner if none runs.
    fn contend(&self, key: String, replies: Vec<Reply>) {
        let mut state = lock(&self.state);
        if let Some(waiting) = state.contended.get_mut(&key) {
            waiting.extend(replies);
            return;
        }
        state.contended.insert(key.clone(), replies);
        actix_web::rt::spawn(self.clone().run_key(key));
    }

    /// Runs one transaction after another for `key`, each taking every request queued for it so far.
    async fn run_key(self, key: String) {
        let mut guard = Unfinished(Some(|| drop(lock(&self.state).contended.remove(&key))));
        loop {
            let replies = {
                let mut state = lock(&self.state);
                let mut waiting = state.contended.get_mut(&key).map(std::mem::take).unwrap_or_default();
                waiting.retain(|reply| !reply.is_closed());
                if waiting.is_empty() {
                    state.contended.remove(&key);
                    break;
                }
                waiting
            };
            let result = self.db.add_to_counter(&key, replies.len() as i64).await.map_err(Arc::new);
            answer(replies, result);
        }
        guard.finished();
    }
}

/// Hands each request its own value: the counter's new value `v` after adding `replies.len()` is shared
/// out as v − n + 1 … v; or the same error to all.
fn answer(replies: Vec<Reply>, result: Result<(i64, Option<Token>), Arc<DbError>>) {
    match result {
        Ok((new_value, lsn)) => {
            let first = new_value - replies.len() as i64 + 1;
            // An inclusive range: `first..` would overflow computing the successor of i64::MAX.
            for (reply, value) in replies.into_iter().zip(first..=new_value) {
                let _ = reply.send(Ok((value, lsn)));
            }
        }
        Err(err) => {
            for reply in replies {
                let _ = reply.send(Err(Arc::clone(&err)));
            }
        }
    }
}
