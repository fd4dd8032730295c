//! A history of every operation a load sent (its start, end, outcome and value, who served it) and a
//! checker of what the fleet promises on it, in the manner of Jepsen's checkers for this simple data:
//! counters that only grow by one per acknowledged increment.
//!
//! - Increments: no acknowledged one lost, none applied twice; the acknowledged values of a key are
//!   distinct; the final value lies between the acknowledged count and that plus the unknown outcomes.
//! - Bounded staleness: a read returns at least every increment acknowledged `bound` before it began.
//! - Read-your-writes: a read with the token an acknowledged increment answered (`X-Fleet-Min-Lsn`)
//!   returns at least that increment's value.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_app::routes::{IDEMPOTENCY_KEY, LSN, MIN_LSN, SERVED_BY};
use reqwest::StatusCode;
use serde_json::json;

use crate::Api;

/// What became of an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// 200, with the counter's value.
    Ok(i64),
    /// A read of a counter that does not exist yet (404).
    Absent,
    /// Refused before it could change anything (a 4xx, or a 503 the node names: the pool, a deadline
    /// before COMMIT, no primary).
    Failed(String),
    /// It may or may not have been applied: 08007 (COMMIT's outcome unknown), nginx's 502/504 after it
    /// sent a POST on, or no answer at all.
    Unknown(String),
}

/// One operation of a history.
#[derive(Debug, Clone)]
pub struct Op {
    pub write: bool,
    pub key: String,
    /// Since the history began.
    pub start: Duration,
    pub end: Duration,
    pub outcome: Outcome,
    /// `X-Fleet-Served-By`.
    pub served_by: Option<String>,
    /// A read with a token: the value the increment that answered the token acknowledged.
    pub owed: Option<i64>,
}

/// Every operation of a run, recorded as it completes.
#[derive(Debug, Clone)]
pub struct History {
    began: Instant,
    ops: Arc<Mutex<Vec<Op>>>,
}

impl Default for History {
    fn default() -> Self {
        History { began: Instant::now(), ops: Arc::default() }
    }
}

impl History {
    /// How long the history has run.
    pub fn now(&self) -> Duration {
        self.began.elapsed()
    }

    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }

    /// Records an operation that began at `start` and ends now with `answer`; returns the answer.
    fn record(&self, write: bool, key: &str, start: Duration, answer: Answer, owed: Option<i64>) -> Answer {
        let op = Op {
            write,
            key: key.to_owned(),
            start,
            end: self.now(),
            outcome: answer.outcome.clone(),
            served_by: answer.served_by.clone(),
            owed,
        };
        self.ops.lock().unwrap().push(op);
        answer
    }

    /// `POST /api/increment` on `key`, once (`idempotency_key: None`) or, for a careful client, with that
    /// key, retried until it answers 200 or `give_up` passes: one operation from the first send to the
    /// last answer.
    pub async fn increment(
        &self,
        api: &Api,
        key: &str,
        idempotency_key: Option<&str>,
        give_up: Duration,
    ) -> Answer {
        let start = self.now();
        let headers: Vec<(&str, &str)> = idempotency_key.map(|k| (IDEMPOTENCY_KEY, k)).into_iter().collect();
        let body = json!({ "key": key });
        let answer = loop {
            let request = api.http.post(format!("{}/api/increment", api.url)).body(body.to_string());
            let request = headers.iter().fold(request, |r, (name, value)| r.header(*name, *value));
            let answer = answer(request.send().await, true).await;
            let retry = idempotency_key.is_some() && !matches!(answer.outcome, Outcome::Ok(_));
            if !retry || self.now() - start > give_up {
                break answer;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        self.record(true, key, start, answer, None)
    }

    /// `GET /api/counters/{key}`, with `X-Fleet-Min-Lsn: token` if given: the token an increment that
    /// acknowledged `owed` answered.
    pub async fn read(&self, api: &Api, key: &str, token: Option<(&str, i64)>) -> Answer {
        let start = self.now();
        let request = api.http.get(format!("{}/api/counters/{key}", api.url));
        let request = match token {
            Some((token, _)) => request.header(MIN_LSN, token),
            None => request,
        };
        let answer = answer(request.send().await, false).await;
        self.record(false, key, start, answer, token.map(|(_, owed)| owed))
    }
}

/// What an operation's last answer said.
#[derive(Debug, Clone)]
pub struct Answer {
    pub outcome: Outcome,
    /// `X-Fleet-Served-By`.
    pub served_by: Option<String>,
    /// `X-Fleet-Lsn`: a write's read-your-writes token.
    pub token: Option<String>,
}

/// An answer as an outcome, who served it, and a write's token.
async fn answer(response: reqwest::Result<reqwest::Response>, write: bool) -> Answer {
    let response = match response {
        Ok(response) => response,
        Err(e) => {
            return Answer {
                outcome: Outcome::Unknown(format!("no answer: {e}")),
                served_by: None,
                token: None,
            }
        }
    };
    let status = response.status();
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (served_by, token) = (header(SERVED_BY), header(LSN));
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    let code = body["code"].as_str().unwrap_or_default().to_owned();
    let outcome = match status {
        StatusCode::OK => match body["value"].as_i64() {
            Some(value) => Outcome::Ok(value),
            None => Outcome::Unknown(format!("200 without a value: {body}")),
        },
        StatusCode::NOT_FOUND if !write => Outcome::Absent,
        _ if code == "08007" => Outcome::Unknown(code),
        // nginx's own 502/504 (`container: nginx`): it may have sent the request on.
        StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT if write => {
            Outcome::Unknown(format!("{} {code}", status.as_u16()))
        }
        _ => Outcome::Failed(format!("{} {code}", status.as_u16())),
    };
    Answer { outcome, served_by, token }
}

/// A load on `keys` until `stop`: per key, a writer (one increment at a time; careful ones with an
/// idempotency key each, retried up to 60 s, then a read with the token it answered) and a plain reader
/// (every 10 ms).
pub async fn run_load(history: History, api: Api, keys: Vec<String>, careful: bool, stop: Arc<AtomicBool>) {
    let mut tasks = Vec::new();
    for key in keys {
        let writer = (history.clone(), api.clone(), stop.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let (history, api, stop, key) = writer;
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let idempotency_key = careful.then(|| format!("{key}-{n}"));
                let written =
                    history.increment(&api, &key, idempotency_key.as_deref(), Duration::from_secs(60)).await;
                if let (true, Outcome::Ok(value), Some(token)) = (careful, &written.outcome, &written.token) {
                    history.read(&api, &key, Some((token, *value))).await;
                }
            }
        }));
        let reader = (history.clone(), api.clone(), stop.clone(), key);
        tasks.push(tokio::spawn(async move {
            let (history, api, stop, key) = reader;
            while !stop.load(Ordering::Relaxed) {
                history.read(&api, &key, None).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// Every violation of the increment properties, given each key's final value (read from the primary
/// once the history is over).
pub fn check_increments(ops: &[Op], finals: &HashMap<String, i64>) -> Vec<String> {
    let mut violations = Vec::new();
    for (key, writes) in by_key(ops.iter().filter(|op| op.write)) {
        let acked: Vec<i64> = writes.iter().filter_map(|op| ok(op)).collect();
        let unknown = writes.iter().filter(|op| matches!(op.outcome, Outcome::Unknown(_))).count() as i64;
        let mut distinct = acked.clone();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() != acked.len() {
            violations.push(format!("{key}: {} values acknowledged twice", acked.len() - distinct.len()));
        }
        let last = finals.get(key).copied().unwrap_or(0);
        let count = acked.len() as i64;
        if last < count {
            violations.push(format!("{key}: {count} increments acknowledged, only {last} applied (lost)"));
        }
        if last > count + unknown {
            violations.push(format!(
                "{key}: {last} applied, {count} acknowledged and {unknown} unknown (applied twice)"
            ));
        }
        if let Some(highest) = distinct.last().filter(|&&v| v > last) {
            violations
                .push(format!("{key}: value {highest} was acknowledged, the counter ended at {last} (lost)"));
        }
    }
    violations
}

/// Every read with a token that returned less than the write that answered the token acknowledged. A
/// refused read (a 4xx naming the token, a 503) is no violation: it returned nothing.
pub fn check_tokens(ops: &[Op]) -> Vec<String> {
    let mut violations = Vec::new();
    for read in ops.iter().filter(|op| !op.write) {
        let Some(owed) = read.owed else { continue };
        let seen = match read.outcome {
            Outcome::Ok(value) => value,
            Outcome::Absent => 0,
            _ => continue,
        };
        if seen < owed {
            violations.push(format!(
                "{}: a read at {:.3} s with the token of value {owed} returned {seen} (served by {})",
                read.key,
                read.start.as_secs_f64(),
                read.served_by.as_deref().unwrap_or("?")
            ));
        }
    }
    violations
}

/// Every plain read that returned less than what had been acknowledged `bound` before it began.
pub fn check_staleness(ops: &[Op], bound: Duration) -> Vec<String> {
    let mut violations = Vec::new();
    let writes = by_key(ops.iter().filter(|op| op.write));
    for (key, reads) in by_key(ops.iter().filter(|op| !op.write && op.owed.is_none())) {
        let acked: Vec<(Duration, i64)> =
            writes.get(key).into_iter().flatten().filter_map(|op| Some((op.end, ok(op)?))).collect();
        for read in reads {
            let seen = match read.outcome {
                Outcome::Ok(value) => value,
                Outcome::Absent => 0,
                _ => continue,
            };
            let Some(due) = read.start.checked_sub(bound) else { continue };
            let owed = acked.iter().filter(|(end, _)| *end <= due).map(|(_, v)| *v).max().unwrap_or(0);
            if seen < owed {
                violations.push(format!(
                    "{key}: a read at {:.3} s returned {seen}, but {owed} was acknowledged more than {bound:?} before (served by {})",
                    read.start.as_secs_f64(),
                    read.served_by.as_deref().unwrap_or("?")
                ));
            }
        }
    }
    violations
}

/// The longest time without a successful operation of a kind (`write`) between `from` and `to`, and the
/// p50 and p99 latency of the operations that completed in that span.
pub fn window(ops: &[Op], write: bool, from: Duration, to: Duration) -> (Duration, Duration, Duration) {
    let mut in_span: Vec<&Op> =
        ops.iter().filter(|op| op.write == write && op.end >= from && op.start <= to).collect();
    in_span.sort_by_key(|op| op.end);
    let mut last = from;
    let mut gap = Duration::ZERO;
    for op in in_span.iter().filter(|op| matches!(op.outcome, Outcome::Ok(_) | Outcome::Absent)) {
        gap = gap.max(op.end.saturating_sub(last));
        last = op.end;
    }
    gap = gap.max(to.saturating_sub(last));
    let mut latencies: Vec<Duration> = in_span.iter().map(|op| op.end - op.start).collect();
    latencies.sort_unstable();
    let quantile = |q: f64| {
        latencies.get(((latencies.len() as f64 - 1.0) * q).ceil() as usize).copied().unwrap_or_default()
    };
    (gap, quantile(0.5), quantile(0.99))
}

fn ok(op: &Op) -> Option<i64> {
    match op.outcome {
        Outcome::Ok(value) => Some(value),
        _ => None,
    }
}

fn by_key<'a>(ops: impl Iterator<Item = &'a Op>) -> BTreeMap<&'a str, Vec<&'a Op>> {
    let mut map: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        map.entry(op.key.as_str()).or_default().push(op);
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(write: bool, start_ms: u64, end_ms: u64, outcome: Outcome) -> Op {
        let ms = Duration::from_millis;
        Op {
            write,
            key: "k".into(),
            start: ms(start_ms),
            end: ms(end_ms),
            outcome,
            served_by: None,
            owed: None,
        }
    }

    #[test]
    fn the_checker_catches_a_lost_a_doubled_and_a_stale_history() {
        let finals = |n| HashMap::from([("k".to_owned(), n)]);
        let history = [
            op(true, 0, 10, Outcome::Ok(1)),
            op(true, 20, 30, Outcome::Unknown("08007".into())),
            op(true, 40, 50, Outcome::Ok(3)),
        ];
        assert_eq!(check_increments(&history, &finals(3)), Vec::<String>::new());
        assert_eq!(check_increments(&history, &finals(2)).len(), 1, "3 was acknowledged, 2 applied");
        assert_eq!(
            check_increments(&history, &finals(4)).len(),
            1,
            "4 applied of 2 acknowledged and 1 unknown"
        );
        let twice = [op(true, 0, 10, Outcome::Ok(1)), op(true, 20, 30, Outcome::Ok(1))];
        assert!(check_increments(&twice, &finals(2))[0].contains("twice"));

        let reads = [
            op(true, 0, 10, Outcome::Ok(1)),
            op(false, 500, 510, Outcome::Absent),
            op(false, 1500, 1510, Outcome::Absent),
            op(false, 1600, 1610, Outcome::Ok(1)),
        ];
        let stale = check_staleness(&reads, Duration::from_secs(1));
        assert_eq!(stale.len(), 1, "only the read 1.5 s after the write is stale: {stale:?}");

        let with_token = |outcome| Op { owed: Some(3), ..op(false, 60, 70, outcome) };
        let tokens = [with_token(Outcome::Ok(3)), with_token(Outcome::Failed("400 future_token".into()))];
        assert_eq!(check_tokens(&tokens), Vec::<String>::new());
        assert_eq!(check_tokens(&[with_token(Outcome::Ok(2))]).len(), 1, "the token's write is missing");
        assert_eq!(check_tokens(&[with_token(Outcome::Absent)]).len(), 1, "the token's write is missing");
    }

    #[test]
    fn a_window_is_the_longest_time_without_a_success() {
        let history = [
            op(true, 0, 100, Outcome::Ok(1)),
            op(true, 100, 2100, Outcome::Failed("503".into())),
            op(true, 2100, 2200, Outcome::Ok(2)),
        ];
        let (gap, _, p99) = window(&history, true, Duration::ZERO, Duration::from_millis(2300));
        assert_eq!((gap, p99), (Duration::from_millis(2100), Duration::from_millis(2000)));
    }
}
