//! The load driver: N keep-alive HTTP/1.1 connections to nginx, each sending its next request as soon as
//! the previous answer is read (closed loop), for a warm-up and then a measured window.
//!
//! Why a driver of our own on hyper rather than wrk or oha: on 2 shared cores the generator's CPU is CPU
//! the nodes, nginx and PostgreSQL do not get, so it has to be lean, and it has to count exactly. hyper's
//! connection-level client (no pool, no redirects, nothing per request beyond the request itself) on one
//! single-threaded tokio runtime never takes more than one core, and requests are built up front and
//! only cloned (reference counts). Side by side on one machine (`keys`, 4 nodes × pool 5, 64
//! connections, 10 s) it drove 3.9k req/s on 0.09 cores where wrk (`-t1`, a Lua body per request) drove
//! 3.6k req/s on 0.07 cores: the same cost, within noise. Unlike wrk's Lua hooks it counts every status,
//! transport error and error `code` per request kind without a script, which the consistency checks (the
//! increments and rows the database must hold) are built on; it reports its own CPU use with every point;
//! and it is part of the build: no Debian package or extra binary on the benchmark machine.
//!
//! Requests are placed by completion time: before the window (warm-up), inside it (counted in throughput
//! and latency), after it (tail: the requests in flight when the window closes, waited for and counted
//! for errors and rows, never for speed). Latency is time from send to the last byte of the body.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{CONNECTION, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use super::requests::{Kind, Requests};

/// Largest latency the histogram holds, in microseconds (larger ones are clamped to it).
const MAX_LATENCY_US: u64 = 120_000_000;
/// Most attempts the histogram holds (larger counts are clamped to it).
const MAX_ATTEMPTS: u64 = 100_000;
/// Pause before reconnecting after a failed connect, so a dead nginx is not hammered.
const RECONNECT_PAUSE: Duration = Duration::from_millis(20);

/// What to drive.
#[derive(Debug)]
pub struct Load<'a> {
    pub addr: SocketAddr,
    pub connections: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub requests: &'a Requests,
    /// Put before every request's path: `/app-1` for nginx's route pinned to node 1; empty for none.
    pub prefix: &'a str,
    /// Set on Ctrl-C: every connection stops after its current request.
    pub stop: &'a AtomicBool,
}

/// What happened in one phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Answers, by HTTP status.
    pub status: BTreeMap<u16, u64>,
    /// Error answers, by the body's `code` (`23505`, `pool_timeout` …; `?` when the body had none).
    pub error_codes: BTreeMap<String, u64>,
    /// Connect, write or read failures: requests that got no answer.
    pub transport_errors: u64,
    /// 2xx increments and the rows of 2xx bulk inserts: what the database must now hold.
    pub increments_ok: u64,
    pub rows_ok: u64,
    /// 2xx transfers, and the attempts they took in all (`attempts` of each answer).
    #[serde(default)]
    pub transfers_ok: u64,
    #[serde(default)]
    pub transfer_attempts: u64,
}

impl Counts {
    pub fn answers(&self) -> u64 {
        self.status.values().sum()
    }

    /// Answers that were not 2xx, plus requests that got no answer.
    pub fn failures(&self) -> u64 {
        let non_2xx: u64 = self.status.iter().filter(|(s, _)| !(200..300).contains(*s)).map(|(_, n)| n).sum();
        non_2xx + self.transport_errors
    }

    pub fn merge(&mut self, other: &Counts) {
        for (status, n) in &other.status {
            *self.status.entry(*status).or_default() += n;
        }
        for (code, n) in &other.error_codes {
            *self.error_codes.entry(code.clone()).or_default() += n;
        }
        self.transport_errors += other.transport_errors;
        self.increments_ok += other.increments_ok;
        self.rows_ok += other.rows_ok;
        self.transfers_ok += other.transfers_ok;
        self.transfer_attempts += other.transfer_attempts;
    }
}

/// Everything one load run saw.
#[derive(Debug)]
pub struct Outcome {
    pub warmup: Counts,
    pub measured: Counts,
    pub tail: Counts,
    /// Latency of the measured window's answers, in microseconds.
    pub latency_us: Histogram<u64>,
    /// Attempts of the measured window's 2xx transfers.
    pub attempts: Histogram<u64>,
    /// The measured window's length.
    pub window: Duration,
    /// CPU time the driver's thread used (user + system) over the whole run, warm-up and tail included.
    pub driver_cpu: Duration,
    /// The whole run's wall time.
    pub wall: Duration,
}

impl Outcome {
    /// All three phases together.
    pub fn total(&self) -> Counts {
        let mut total = self.warmup.clone();
        total.merge(&self.measured);
        total.merge(&self.tail);
        total
    }
}

/// Runs the load on a thread of its own with a single-threaded runtime, and waits for it.
pub fn run(load: &Load) -> anyhow::Result<Outcome> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                let (cpu, start) = (thread_cpu()?, Instant::now());
                let mut outcome = runtime.block_on(drive(load))?;
                outcome.driver_cpu = thread_cpu()?.saturating_sub(cpu);
                outcome.wall = start.elapsed();
                Ok(outcome)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the load driver panicked"))?
    })
}

async fn drive(load: &Load<'_>) -> anyhow::Result<Outcome> {
    let start = Instant::now();
    let window = (start + load.warmup, start + load.warmup + load.duration);
    let host = load.addr.to_string();
    let connections = (0..load.connections).map(|i| connection(load, i as u64, window, &host));
    let results = futures_util::future::join_all(connections).await;
    let mut outcome = Outcome::empty(load.duration)?;
    for result in results {
        let one = result?;
        outcome.warmup.merge(&one.warmup);
        outcome.measured.merge(&one.measured);
        outcome.tail.merge(&one.tail);
        outcome.latency_us.add(&one.latency_us).context("merge latency histograms")?;
        outcome.attempts.add(&one.attempts).context("merge attempt histograms")?;
    }
    Ok(outcome)
}

/// CPU time (user + system) of the calling thread so far.
fn thread_cpu() -> anyhow::Result<Duration> {
    use nix::sys::resource::{getrusage, UsageWho};
    let usage = getrusage(UsageWho::RUSAGE_THREAD).context("getrusage")?;
    let micros = |t: nix::sys::time::TimeVal| t.tv_sec() as u64 * 1_000_000 + t.tv_usec() as u64;
    Ok(Duration::from_micros(micros(usage.user_time()) + micros(usage.system_time())))
}

impl Outcome {
    /// Nothing counted yet, for a measuring window of `window`.
    fn empty(window: Duration) -> anyhow::Result<Self> {
        Ok(Outcome {
            warmup: Counts::default(),
            measured: Counts::default(),
            tail: Counts::default(),
            latency_us: new_histogram()?,
            attempts: Histogram::new_with_bounds(1, MAX_ATTEMPTS, 3)
                .context("create an attempts histogram")?,
            window,
            driver_cpu: Duration::ZERO,
            wall: Duration::ZERO,
        })
    }
}

fn new_histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).context("create a latency histogram")
}

/// One connection's closed loop until the window ends. Runs as a future of the shared single-threaded
/// runtime: `join_all` polls them all on one core.
async fn connection(
    load: &Load<'_>,
    seed: u64,
    (measure_from, end): (Instant, Instant),
    host: &str,
) -> anyhow::Result<Outcome> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Outcome::empty(load.duration)?;
    let mut sender: Option<SendRequest<Full<bytes::Bytes>>> = None;
    let phase = |at: Instant| match at {
        at if at < measure_from => Phase::Warmup,
        at if at < end => Phase::Measured,
        _ => Phase::Tail,
    };
    while Instant::now() < end && !load.stop.load(Ordering::Relaxed) {
        if sender.as_ref().is_none_or(SendRequest::is_closed) {
            match connect(load.addr).await {
                Ok(conn) => sender = Some(conn),
                Err(_) => {
                    out.counts(phase(Instant::now())).transport_errors += 1;
                    tokio::time::sleep(RECONNECT_PAUSE).await;
                    continue;
                }
            }
        }
        let conn = sender.as_mut().expect("connected above");
        if conn.ready().await.is_err() {
            // nginx closed the idle connection (keepalive_requests reached): nothing was sent, reconnect.
            sender = None;
            continue;
        }
        let outgoing = load.requests.next(&mut rng);
        let path = std::str::from_utf8(&outgoing.path)?;
        let request = hyper::Request::builder().method(outgoing.method.clone());
        let request = match load.prefix {
            "" => request.uri(path),
            prefix => request.uri(format!("{prefix}{path}")),
        };
        let request = request
            .header(HOST, host)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(outgoing.body.clone()))?;
        let sent = Instant::now();
        let answer = match conn.send_request(request).await {
            Ok(response) => {
                let status = response.status().as_u16();
                let closing = response.headers().get(CONNECTION).is_some_and(|v| v == "close");
                response.into_body().collect().await.map(|body| (status, closing, body.to_bytes()))
            }
            Err(e) => Err(e),
        };
        let done = Instant::now();
        let Ok((status, closing, body)) = answer else {
            out.counts(phase(done)).transport_errors += 1;
            sender = None;
            continue;
        };
        if phase(done) == Phase::Measured {
            out.latency_us.saturating_record(done.duration_since(sent).as_micros() as u64);
        }
        let counts = out.counts(phase(done));
        *counts.status.entry(status).or_default() += 1;
        if (200..300).contains(&status) {
            match outgoing.kind {
                Kind::Increment => counts.increments_ok += 1,
                Kind::Insert(rows) => counts.rows_ok += rows,
                Kind::Transfer => {
                    let attempts = attempts(&body);
                    counts.transfers_ok += 1;
                    counts.transfer_attempts += attempts;
                    if phase(done) == Phase::Measured {
                        out.attempts.saturating_record(attempts);
                    }
                }
                Kind::Read => {}
            }
        } else {
            *counts.error_codes.entry(error_code(&body)).or_default() += 1;
        }
        if closing {
            sender = None;
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Warmup,
    Measured,
    Tail,
}

impl Outcome {
    fn counts(&mut self, phase: Phase) -> &mut Counts {
        match phase {
            Phase::Warmup => &mut self.warmup,
            Phase::Measured => &mut self.measured,
            Phase::Tail => &mut self.tail,
        }
    }
}

async fn connect(addr: SocketAddr) -> anyhow::Result<SendRequest<Full<bytes::Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// The `code` of an error body (`{"success": false, "code": "23505", …}`), `?` if it has none.
pub fn error_code(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["code"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// The `attempts` of a transfer's answer (1 if it has none).
fn attempts(body: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(body).ok().and_then(|v| v["attempts"].as_u64()).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_non_2xx_answers_plus_requests_without_an_answer() {
        let mut counts = Counts::default();
        counts.status.extend([(200, 90), (409, 3), (503, 2)]);
        counts.transport_errors = 1;
        let mut other = Counts::default();
        other.status.insert(200, 10);
        counts.merge(&other);
        assert_eq!(counts.answers(), 105);
        assert_eq!(counts.failures(), 6);
    }

    #[test]
    fn an_error_body_gives_its_code_and_anything_else_a_question_mark() {
        assert_eq!(error_code(br#"{"success":false,"code":"23505","error":"dup"}"#), "23505");
        assert_eq!(error_code(b"<html>502 Bad Gateway</html>"), "?");
    }
}
