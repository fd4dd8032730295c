//! Requests that arrive together share a transaction or a query: increments ([`increments`], with
//! `INCREMENT_MODE=coalesce`) and counter reads ([`reads`]). What both share is here: a queue of requests
//! by key, taken a batch at a time by one runner task.
//!
//! A runner runs on the thread of the request that started it. Requests on other workers wait for it
//! too, which is safe because no worker stops while a request is in flight (see `startup`).

mod increments;
mod reads;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use super::DbError;

pub use increments::Coalescer;
pub(super) use reads::ReadQueue;

/// Requests waiting for a runner's next batch, by key, and whether a runner is taking them.
#[derive(Debug)]
struct Queue<R> {
    waiting: HashMap<String, Vec<R>>,
    running: bool,
}

impl<R> Default for Queue<R> {
    fn default() -> Self {
        Queue { waiting: HashMap::new(), running: false }
    }
}

impl<T> Queue<oneshot::Sender<T>> {
    /// Queues `reply` for `key`; true when no runner is taking batches, so the caller starts one.
    fn join(&mut self, key: &str, reply: oneshot::Sender<T>) -> bool {
        self.waiting.entry(key.to_owned()).or_default().push(reply);
        !std::mem::replace(&mut self.running, true)
    }

    /// The next batch: every request queued so far whose client still waits (one that went away was
    /// dropped: it takes no value). `None` when there is none, and the runner stops.
    fn next(&mut self) -> Option<HashMap<String, Vec<oneshot::Sender<T>>>> {
        let batch = still_waiting(std::mem::take(&mut self.waiting));
        self.running = !batch.is_empty();
        self.running.then_some(batch)
    }

    /// Forgets the runner and drops the requests waiting for it.
    fn abandon(&mut self) {
        self.running = false;
        self.waiting.clear();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A runner's answer to one request.
async fn answered<T>(answer: oneshot::Receiver<Result<T, Arc<DbError>>>) -> Result<T, DbError> {
    match answer.await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(DbError::Shared(err)),
        Err(_) => Err(DbError::BatchLost),
    }
}

/// What a runner's task does if it ends without finishing (it panicked: a bug): clear its mark and drop
/// the requests waiting for it (they answer 500), so the node keeps serving: the next request starts a
/// new runner.
struct Unfinished<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> Unfinished<F> {
    fn finished(&mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for Unfinished<F> {
    fn drop(&mut self) {
        if let Some(clean_up) = self.0.take() {
            clean_up();
        }
    }
}

/// The batch without the requests whose client went away (their handler was dropped).
fn still_waiting<T>(
    batch: HashMap<String, Vec<oneshot::Sender<T>>>,
) -> HashMap<String, Vec<oneshot::Sender<T>>> {
    batch
        .into_iter()
        .filter_map(|(key, mut replies)| {
            replies.retain(|reply| !reply.is_closed());
            (!replies.is_empty()).then_some((key, replies))
        })
        .collect()
}
