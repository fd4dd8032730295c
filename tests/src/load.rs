//! A background load of increments and reads, by a plain client (each request once) or a careful one
//! (an `Idempotency-Key` per increment, retried until it answers 200): what fault tests run while they
//! break something, to count what clients saw and check that every acknowledged write landed once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleet_app::routes::IDEMPOTENCY_KEY;
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::json;

use crate::Api;

/// What a client saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub status: StatusCode,
    pub code: String,
}

/// What the clients of a [`Load`] saw: every write's answer by key, and every read's.
pub type Seens = (HashMap<String, Vec<Seen>>, Vec<Seen>);

/// Increments and reads on 8 counters `{prefix}-{n}`, running in the background.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
    running: tokio::task::JoinHandle<Seens>,
}

impl Load {
    /// Starts it, and lets it run for 2 s before the fault.
    pub async fn start(api: &Api, prefix: &str, careful: bool) -> Load {
        let keys = (0..8).map(|n| format!("{prefix}-{n}")).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let running = tokio::spawn(load(api.clone(), keys, careful, stop.clone(), answered.clone()));
        tokio::time::sleep(Duration::from_secs(2)).await;
        Load { stop, answered, running }
    }

    /// How many requests have been answered so far: a test reads it before and after a fault to show
    /// that the load outlasted it.
    pub fn answered(&self) -> usize {
        self.answered.load(Ordering::Relaxed)
    }

    /// Stops it, and says what its clients saw.
    pub async fn stop(self) -> Seens {
        self.stop.store(true, Ordering::Relaxed);
        self.running.await.unwrap()
    }
}

/// Increments on `keys` (one loop each, one request at a time) and reads of them, until `stop`:
/// every write's answer by key (`Idempotency-Key`s retried until 200 when `careful`), every read's.
async fn load(
    api: Api,
    keys: Vec<String>,
    careful: bool,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicUsize>,
) -> Seens {
    let writers = keys.iter().cloned().map(|key| {
        let (api, stop, answered) = (api.clone(), stop.clone(), answered.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let idempotency_key = format!("{key}-{n}");
                let headers: Vec<(&str, &str)> =
                    careful.then_some((IDEMPOTENCY_KEY, idempotency_key.as_str())).into_iter().collect();
                loop {
                    let reply = api.post_with("/api/increment", &json!({"key": key}), &headers).await;
                    answered.fetch_add(1, Ordering::Relaxed);
                    seen.push(Seen { status: reply.status, code: reply.code().to_owned() });
                    if !careful || reply.status == StatusCode::OK {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            (key, seen)
        })
    });
    let readers = keys.iter().cloned().map(|key| {
        let (api, stop, answered) = (api.clone(), stop.clone(), answered.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let reply = api.get(&format!("/api/counters/{key}")).await;
                answered.fetch_add(1, Ordering::Relaxed);
                seen.push(Seen { status: reply.status, code: reply.code().to_owned() });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen
        })
    });
    let (writes, reads) = futures_util::join!(join_all(writers), join_all(readers));
    (writes.into_iter().map(|w| w.unwrap()).collect(), reads.into_iter().flat_map(|r| r.unwrap()).collect())
}

/// The answers that were neither 200 nor 404, counted by `status code`.
pub fn failures(seen: &[Seen]) -> HashMap<String, usize> {
    let mut failed = HashMap::new();
    for s in seen.iter().filter(|s| s.status != StatusCode::OK && s.status != StatusCode::NOT_FOUND) {
        *failed.entry(format!("{} {}", s.status.as_u16(), s.code)).or_default() += 1;
    }
    failed
}

/// What went wrong for a load's clients, for a test's log: the failed writes (retried, for a careful
/// client) and reads, by status and code.
pub fn summary((writes, reads): &Seens) -> String {
    let writes: Vec<Seen> = writes.values().flatten().cloned().collect();
    format!("writes failed {:?}; reads failed {:?} of {}", failures(&writes), failures(reads), reads.len())
}

/// How many increments of each key were acknowledged (answered 200).
pub fn acknowledged(writes: &HashMap<String, Vec<Seen>>) -> HashMap<String, i64> {
    let ok = |seen: &Vec<Seen>| seen.iter().filter(|s| s.status == StatusCode::OK).count() as i64;
    writes.iter().map(|(key, seen)| (key.clone(), ok(seen))).collect()
}
