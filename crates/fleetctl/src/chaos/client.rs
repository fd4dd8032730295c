//! The careful client: each logical increment gets a fresh `Idempotency-Key` and is sent, with that same
//! key, until the fleet acknowledges it or the deadline passes. Retried: 5xx, 409 (the first attempt is
//! still running), 408 (the request arrived too slowly), 429, connection errors and timeouts, after a
//! jittered exponential backoff that honours `Retry-After`. Any other 4xx is final: retrying a request the fleet refuses cannot help.
//!
//! The same client with [`RetryPolicy::plain`] is what most clients are: no key, one attempt, so every
//! increment takes the default (coalesced) path. Its failures are then judged by the API's contract: an
//! error answer changed nothing, except 08007 (the COMMIT's outcome is unknown) and a broken or missing
//! answer (the node may have committed and died before answering), which may or may not have applied.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::bail;
use hyper::header::{CONTENT_TYPE, RETRY_AFTER};
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};

// The API's own headers. fleetctl reaches the API over HTTP only (it does not link the node's crate),
// so these are its one statement of them; the standard ones come from `hyper::header`.
/// The request header that makes a write idempotent.
pub const IDEMPOTENCY_KEY: &str = "Idempotency-Key";
/// The response header of a replayed (stored) response.
pub const REPLAYED: &str = "Idempotent-Replayed";

/// How hard the client tries.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts per logical increment, the first included; 1 never retries.
    pub max_attempts: u32,
    /// The first retry waits between half this and this; each later one twice as long, up to `max_backoff`.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// How long one attempt may take, connecting included.
    pub request_timeout: Duration,
    /// Send each increment with a fresh `Idempotency-Key` (so a retry is safe).
    pub idempotency_keys: bool,
    /// Keep connections to the fleet open between requests. Off, every request opens its own: none
    /// can be caught idle by nginx closing it (as its old workers do on a reload).
    pub keep_alive: bool,
}

impl RetryPolicy {
    /// Retries until the deadline: 25 ms doubling up to 1 s, 10 s per attempt.
    pub fn careful() -> Self {
        RetryPolicy {
            max_attempts: u32::MAX,
            base_backoff: Duration::from_millis(25),
            max_backoff: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            idempotency_keys: true,
            keep_alive: true,
        }
    }

    /// One attempt per increment: every failure shows.
    pub fn no_retries() -> Self {
        RetryPolicy { max_attempts: 1, ..RetryPolicy::careful() }
    }

    /// A plain client: one attempt, no idempotency key.
    pub fn plain() -> Self {
        RetryPolicy { idempotency_keys: false, ..RetryPolicy::no_retries() }
    }

    /// The wait before retry number `retry` (1 = the first), at least `retry_after`.
    fn backoff(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let exponent = retry.saturating_sub(1).min(20);
        let ceiling = self.base_backoff.saturating_mul(1 << exponent).min(self.max_backoff);
        let jittered = ceiling.mul_f64(rand::rng().random_range(0.5..=1.0));
        jittered.max(retry_after.unwrap_or_default().min(self.max_backoff))
    }
}

/// Why one attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Failure {
    /// An HTTP error status.
    Status(u16),
    /// 503 with code 08007: the connection broke during COMMIT, so the write may have committed.
    CommitUnknown,
    /// The connection could not be opened.
    Connect,
    /// The connection broke before a whole response arrived.
    Connection,
    /// No (whole) response within the request timeout.
    Timeout,
    /// A 2xx whose body is not the expected JSON.
    BadBody,
}

impl Failure {
    /// Whether sending the same request again may succeed.
    pub fn is_retryable(self) -> bool {
        match self {
            // 408: the request did not arrive in time (nginx's client timeouts), so nothing was applied.
            Failure::Status(status) => status >= 500 || matches!(status, 408 | 409 | 429),
            Failure::CommitUnknown
            | Failure::Connect
            | Failure::Connection
            | Failure::Timeout
            | Failure::BadBody => true,
        }
    }

    /// Whether the write may have been applied all the same: the answer says the outcome is unknown, or
    /// there was no whole answer from the node (nginx's 502 and 504 included). Any other error answer
    /// changed nothing, and a refused connection sent nothing.
    pub fn may_have_applied(self) -> bool {
        match self {
            Failure::Status(status) => matches!(status, 502 | 504),
            Failure::CommitUnknown | Failure::Connection | Failure::Timeout | Failure::BadBody => true,
            Failure::Connect => false,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Status(status) => write!(f, "http {status}"),
            Failure::CommitUnknown => f.write_str("http 503 08007"),
            Failure::Connect => f.write_str("connect error"),
            Failure::Connection => f.write_str("connection error"),
            Failure::Timeout => f.write_str("timeout"),
            Failure::BadBody => f.write_str("bad response"),
        }
    }
}

impl Serialize for Failure {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// How one logical increment ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// Acknowledged with the counter's new value; `replayed` when the answer was the stored one.
    Acked { value: i64, replayed: bool },
    /// Refused with a 4xx that retrying cannot change: not applied.
    Rejected(Failure),
    /// No acknowledgement before the deadline (or the attempts ran out): applied or not, nobody knows.
    Unresolved(Failure),
}

/// One logical increment: its counter, its outcome, and how many requests it took.
#[derive(Debug, Clone)]
pub struct Increment {
    pub key: String,
    pub outcome: Outcome,
    pub attempts: u32,
}

/// One HTTP request: when it was sent, how long it took, and its HTTP status or why it failed.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub sent: Instant,
    pub took: Duration,
    pub result: Result<u16, Failure>,
}

/// What the client did, counted across threads, with every request's [`Sample`].
#[derive(Debug, Default)]
pub struct Stats {
    requests: AtomicU64,
    retries: AtomicU64,
    acked: AtomicU64,
    replayed: AtomicU64,
    failures: Mutex<BTreeMap<Failure, u64>>,
    samples: Mutex<Vec<Sample>>,
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    /// HTTP requests sent.
    pub requests: u64,
    /// Requests that were a retry of an earlier attempt.
    pub retries: u64,
    /// Logical increments acknowledged (by a first answer or a replay).
    pub acknowledged: u64,
    /// Acknowledgements that were replays of a stored response.
    pub replayed: u64,
    /// Failed attempts by kind.
    pub failures: BTreeMap<Failure, u64>,
}

impl Tally {
    pub fn failed_requests(&self) -> u64 {
        self.failures.values().sum()
    }
}

impl Stats {
    pub fn tally(&self) -> Tally {
        Tally {
            requests: self.requests.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            acknowledged: self.acked.load(Ordering::Relaxed),
            replayed: self.replayed.load(Ordering::Relaxed),
            failures: self.failures.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    /// Every request so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn sampled(&self, sent: Instant, result: Result<u16, Failure>) {
        let sample = Sample { sent, took: sent.elapsed(), result };
        self.samples.lock().unwrap_or_else(|p| p.into_inner()).push(sample);
    }

    fn failed(&self, failure: Failure) {
        *self.failures.lock().unwrap_or_else(|p| p.into_inner()).entry(failure).or_default() += 1;
    }
}

/// The careful client, for the fleet (nginx) or one node. Cheap to clone: clones share connections.
#[derive(Debug, Clone)]
pub struct CarefulClient {
    agent: ureq::Agent,
    url: String,
    policy: RetryPolicy,
}

impl CarefulClient {
    pub fn new(url: &str, policy: RetryPolicy) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(policy.request_timeout.min(Duration::from_secs(2)))
            .timeout(policy.request_timeout)
            .max_idle_connections(if policy.keep_alive { 100 } else { 0 })
            .max_idle_connections_per_host(if policy.keep_alive { 256 } else { 0 })
            .build();
        CarefulClient { agent, url: url.trim_end_matches('/').to_owned(), policy }
    }

    /// One logical increment of `key` under a fresh idempotency key, retried until acknowledged, refused,
    /// out of attempts, or past `deadline()` (read before every retry, so a caller may move it).
    pub fn increment(&self, key: &str, stats: &Stats, deadline: impl Fn() -> Instant) -> Increment {
        let idempotency_key = format!("{:032x}", rand::random::<u128>());
        let body = json!({ "key": key }).to_string();
        let mut attempts = 0;
        let outcome = loop {
            attempts += 1;
            stats.requests.fetch_add(1, Ordering::Relaxed);
            if attempts > 1 {
                stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            let mut request = self
                .agent
                .post(&format!("{}/api/increment", self.url))
                .set(CONTENT_TYPE.as_str(), "application/json");
            if self.policy.idempotency_keys {
                request = request.set(IDEMPOTENCY_KEY, &idempotency_key);
            }
            let sent = Instant::now();
            let answer = acknowledgement(request.send_string(&body));
            stats.sampled(sent, answer.as_ref().map(|a| a.2).map_err(|e| e.0));
            let (failure, retry_after) = match answer {
                Ok((value, replayed, _)) => {
                    stats.acked.fetch_add(1, Ordering::Relaxed);
                    if replayed {
                        stats.replayed.fetch_add(1, Ordering::Relaxed);
                    }
                    break Outcome::Acked { value, replayed };
                }
                Err(failed) => failed,
            };
            stats.failed(failure);
            if !self.policy.idempotency_keys && attempts >= self.policy.max_attempts {
                break if failure.may_have_applied() {
                    Outcome::Unresolved(failure)
                } else {
                    Outcome::Rejected(failure)
                };
            }
            if !failure.is_retryable() {
                break Outcome::Rejected(failure);
            }
            let wait = self.policy.backoff(attempts, retry_after);
            if attempts >= self.policy.max_attempts || Instant::now() + wait >= deadline() {
                break Outcome::Unresolved(failure);
            }
            std::thread::sleep(wait);
        };
        Increment { key: key.to_owned(), outcome, attempts }
    }

    /// One plain read of counter `key` (`GET /api/counters/{key}`), no retry: a 200 with a value, or a
    /// 404 (no such counter yet), succeeds. Returns whether it did.
    pub fn read(&self, key: &str, stats: &Stats) -> bool {
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let sent = Instant::now();
        let result = match self.agent.get(&format!("{}/api/counters/{key}", self.url)).call() {
            Ok(response) => {
                let status = response.status();
                match response.into_json::<Value>().ok().and_then(|b| b["value"].as_i64()) {
                    Some(_) => Ok(status),
                    None => Err(Failure::BadBody),
                }
            }
            Err(ureq::Error::Status(404, _)) => Ok(404),
            Err(error) => Err(classify(&error).0),
        };
        stats.sampled(sent, result);
        match result {
            Ok(_) => stats.acked.fetch_add(1, Ordering::Relaxed),
            Err(failure) => {
                stats.failed(failure);
                0
            }
        };
        result.is_ok()
    }

    /// The value of counter `key` (0 if it does not exist), retrying what is retryable until `deadline`.
    pub fn counter(&self, key: &str, deadline: Instant) -> anyhow::Result<i64> {
        let url = format!("{}/api/counters/{key}", self.url);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let failure = match self.agent.get(&url).call() {
                Ok(response) => match response.into_json::<Value>().ok().and_then(|b| b["value"].as_i64()) {
                    Some(value) => return Ok(value),
                    None => Failure::BadBody,
                },
                Err(ureq::Error::Status(404, _)) => return Ok(0),
                Err(error) => classify(&error).0,
            };
            let wait = self.policy.backoff(attempts, None);
            if !failure.is_retryable() || Instant::now() + wait >= deadline {
                bail!("cannot read counter {key:?}: {failure} (after {attempts} attempts)");
            }
            std::thread::sleep(wait);
        }
    }
}

/// The new value, whether it was replayed, and the HTTP status, from an increment's answer.
fn acknowledgement(
    result: Result<ureq::Response, ureq::Error>,
) -> Result<(i64, bool, u16), (Failure, Option<Duration>)> {
    let response = match result {
        Err(ureq::Error::Status(503, response)) => {
            let retry_after = retry_after(&response);
            let code = response.into_json::<Value>().ok().and_then(|b| b["code"].as_str().map(str::to_owned));
            let failure =
                if code.as_deref() == Some("08007") { Failure::CommitUnknown } else { Failure::Status(503) };
            return Err((failure, retry_after));
        }
        result => result.map_err(|error| classify(&error))?,
    };
    let replayed = response.header(REPLAYED).is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let status = response.status();
    let body: Value = response.into_json().map_err(|_| (Failure::BadBody, None))?;
    let value = body["value"].as_i64().ok_or((Failure::BadBody, None))?;
    Ok((value, replayed, status))
}

/// The kind of a failed attempt, and the server's `Retry-After`, if it sent one.
fn classify(error: &ureq::Error) -> (Failure, Option<Duration>) {
    match error {
        ureq::Error::Status(status, response) => (Failure::Status(*status), retry_after(response)),
        ureq::Error::Transport(transport) => {
            let failure = match transport.kind() {
                ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Dns => Failure::Connect,
                _ if is_timeout(transport) => Failure::Timeout,
                _ => Failure::Connection,
            };
            (failure, None)
        }
    }
}

fn retry_after(response: &ureq::Response) -> Option<Duration> {
    response.header(RETRY_AFTER.as_str()).and_then(|s| s.trim().parse().ok()).map(Duration::from_secs)
}

fn is_timeout(transport: &ureq::Transport) -> bool {
    let io = std::error::Error::source(transport).and_then(|e| e.downcast_ref::<std::io::Error>());
    io.is_some_and(|e| matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_ceiling_with_jitter_and_honours_retry_after() {
        let policy = RetryPolicy::careful();
        for _ in 0..100 {
            let first = policy.backoff(1, None);
            assert!(
                first >= Duration::from_micros(12_500) && first <= Duration::from_millis(25),
                "{first:?}"
            );
            let third = policy.backoff(3, None);
            assert!(third >= Duration::from_millis(50) && third <= Duration::from_millis(100), "{third:?}");
            let late = policy.backoff(40, None);
            assert!(late >= Duration::from_millis(500) && late <= Duration::from_secs(1), "{late:?}");
            assert!(policy.backoff(1, Some(Duration::from_secs(1))) >= Duration::from_secs(1));
            assert!(policy.backoff(1, Some(Duration::from_secs(60))) <= Duration::from_secs(1));
        }
    }

    #[test]
    fn only_what_may_succeed_next_time_is_retried() {
        for status in [500, 502, 503, 504, 408, 409, 429] {
            assert!(Failure::Status(status).is_retryable(), "{status}");
        }
        for status in [400, 404, 413, 422] {
            assert!(!Failure::Status(status).is_retryable(), "{status}");
        }
        assert!(Failure::Connect.is_retryable() && Failure::Timeout.is_retryable());
    }

    #[test]
    fn only_an_unknown_outcome_or_a_missing_answer_may_have_applied() {
        for failure in [Failure::CommitUnknown, Failure::Status(502), Failure::Status(504), Failure::Timeout]
        {
            assert!(failure.may_have_applied(), "{failure}");
        }
        for failure in [Failure::Status(503), Failure::Status(500), Failure::Status(409), Failure::Connect] {
            assert!(!failure.may_have_applied(), "{failure}");
        }
    }

    #[test]
    fn a_refused_connection_is_a_connect_error_and_ends_unresolved_at_the_deadline() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client = CarefulClient::new(&format!("http://127.0.0.1:{port}"), RetryPolicy::careful());
        let stats = Stats::default();
        let deadline = Instant::now() + Duration::from_millis(300);
        let increment = client.increment("k", &stats, || deadline);
        assert_eq!(increment.outcome, Outcome::Unresolved(Failure::Connect));
        assert!(increment.attempts > 1, "it retried");
        let tally = stats.tally();
        assert_eq!(tally.requests, u64::from(increment.attempts));
        assert_eq!(tally.retries, tally.requests - 1);
        assert_eq!(tally.failures[&Failure::Connect], tally.requests);
        let samples = stats.samples();
        assert_eq!(samples.len() as u64, tally.requests, "every attempt is sampled");
        assert!(samples.iter().all(|s| s.result == Err(Failure::Connect)));
    }

    #[test]
    fn a_plain_read_of_nothing_listening_fails_once_and_is_sampled() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let client = CarefulClient::new(&format!("http://127.0.0.1:{port}"), RetryPolicy::plain());
        let stats = Stats::default();
        assert!(!client.read("k", &stats));
        let tally = stats.tally();
        assert_eq!((tally.requests, tally.acknowledged, tally.failures[&Failure::Connect]), (1, 0, 1));
        assert_eq!(stats.samples().len(), 1);
    }
}
