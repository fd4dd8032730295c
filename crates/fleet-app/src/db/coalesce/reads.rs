//! Coalesced counter reads: read batches.
//!
//! Counter reads without `X-Fleet-Min-Lsn` share queries: every read queued while the node's
//! previous read batch ran shares one query (`key = ANY($1)`). A batch's query is sent after each of its
//! requests arrived, so each still sees every write acknowledged before it arrived.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::{answered, lock, Queue, Unfinished};
use crate::db::counters::select_counters;
use crate::db::{DbError, Read, Store};

/// A counter's value (`None`: no such counter) and who served it, or the batch's error.
type ReadReply = oneshot::Sender<Result<Read<Option<i64>>, Arc<DbError>>>;

/// The requests waiting for the node's next batch of counter reads.
#[derive(Debug, Clone, Default)]
pub(in crate::db) struct ReadQueue(Arc<Mutex<Queue<ReadReply>>>);

impl Store {
    /// Counter `key`'s value (`None`: no such counter) from the node's next batch of counter reads.
    pub(in crate::db) async fn coalesced_read(&self, key: &str) -> Result<Read<Option<i64>>, DbError> {
        let (reply, read) = oneshot::channel();
        if lock(&self.reads.0).join(key, reply) {
            actix_web::rt::spawn(self.clone().run_reads());
        }
        answered(read).await
    }

    /// Runs one read batch after another, each taking every read queued so far, until none is left.
    async fn run_reads(self) {
        let mut guard = Unfinished(Some(|| lock(&self.reads.0).abandon()));
        loop {
            let next = lock(&self.reads.0).next();
            let Some(batch) = next else { break };
            let keys: Vec<&str> = batch.keys().map(String::as_str).collect();
            let read = self.read(None, async |client| select_counters(client, &keys).await).await;
            self.metrics.read_batch_size.observe(batch.values().map(Vec::len).sum::<usize>() as f64);
            match read {
                Ok(read) => {
                    for (key, replies) in batch {
                        let value = read.value.get(&key).copied();
                        for reply in replies {
                            let _ = reply.send(Ok(Read { value, served_by: read.served_by.clone() }));
                        }
                    }
                }
                Err(err) => {
                    let err = Arc::new(err);
                    for reply in batch.into_values().flatten() {
                        let _ = reply.send(Err(Arc::clone(&err)));
                    }
                }
            }
        }
        guard.finished();
    }
}
