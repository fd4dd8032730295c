//! Per-attempt deadlines. One database attempt (a transaction, or a query, with its checkout) ends by
//! `POOL_WAIT_TIMEOUT_MS + DB_ATTEMPT_TIMEOUT_MS` whatever the network does: past it, the attempt is
//! abandoned with [`DbError::AttemptTimedOut`] and the connection it held is closed, never handed to
//! another request, since whatever it waits for (a blackholed network, a stalled server) would stall
//! that request too. What it was running is cancelled on the server (a cancel request over a new
//! connection, as `pg_cancel_backend` does), so a statement waiting for a lock or still working stops
//! at once rather than at `statement_timeout`, and its transaction's locks are freed; if the cancel
//! cannot get through either, PostgreSQL still ends the statement at `statement_timeout` and the open
//! transaction at `idle_in_transaction_session_timeout`.

use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Object;

use super::tls::Tls;
use super::{DbError, Store};

/// How long a cancel request may take (a new connection to a server that may be stalled).
const CANCEL_TIMEOUT: Duration = Duration::from_secs(10);

tokio::task_local! {
    /// Set when the attempt running in this task was abandoned at its deadline.
    static ABANDONED: Arc<AtomicBool>;
}

impl Store {
    /// Runs `work` as one attempt, abandoning it at its deadline: `extra` is time the work needs by
    /// design (a lab hold's sleep), on top of the pool wait and `DB_ATTEMPT_TIMEOUT_MS`.
    pub(super) async fn within_deadline<T>(
        &self,
        extra: Duration,
        work: impl Future<Output = Result<T, DbError>>,
    ) -> Result<T, DbError> {
        let deadline = Instant::now() + self.pool_wait + self.attempt_timeout + extra;
        let abandoned = Arc::new(AtomicBool::new(false));
        let mut attempt =
            Box::pin(tokio::time::timeout_at(deadline.into(), ABANDONED.scope(Arc::clone(&abandoned), work)));
        let result = attempt.as_mut().await;
        if result.is_err() {
            abandoned.store(true, Ordering::Relaxed);
        }
        // Dropping the attempt drops its connection, which sees the mark.
        drop(attempt);
        result.unwrap_or(Err(DbError::AttemptTimedOut))
    }
}

/// A pooled connection checked out by an attempt. When its attempt was abandoned, it is closed instead
/// of going back to the pool, and what it ran is cancelled.
#[derive(Debug)]
pub(super) struct Conn {
    object: Option<Object>,
    abandoned: Option<Arc<AtomicBool>>,
    /// The connection's TLS connector, for the cancel request.
    tls: Tls,
}

impl Conn {
    pub(super) fn new(object: Object, tls: &Tls) -> Self {
        Conn { object: Some(object), abandoned: ABANDONED.try_with(Arc::clone).ok(), tls: tls.clone() }
    }

    /// Closes the connection rather than return it to the pool.
    pub(super) fn close(mut self) {
        if let Some(object) = self.object.take() {
            drop(Object::take(object));
        }
    }
}

impl Deref for Conn {
    type Target = Object;

    fn deref(&self) -> &Object {
        self.object.as_ref().expect("a connection until dropped")
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Object {
        self.object.as_mut().expect("a connection until dropped")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let abandoned = self.abandoned.as_ref().is_some_and(|a| a.load(Ordering::Relaxed));
        if let (true, Some(object)) = (abandoned, self.object.take()) {
            let cancel = object.cancel_token();
            // Detached from the pool: dropping the client closes the connection.
            drop(Object::take(object));
            tracing::warn!("closed a database connection whose attempt ran past its deadline");
            let (tls, Ok(runtime)) = (self.tls.0.clone(), tokio::runtime::Handle::try_current()) else {
                return;
            };
            runtime.spawn(async move {
                match tokio::time::timeout(CANCEL_TIMEOUT, cancel.cancel_query(tls)).await {
                    Ok(Ok(())) => tracing::debug!("cancelled the abandoned attempt's statement"),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot cancel the abandoned attempt's statement")
                    }
                    Err(_) => tracing::warn!("cancelling the abandoned attempt's statement timed out"),
                }
            });
        }
    }
}
