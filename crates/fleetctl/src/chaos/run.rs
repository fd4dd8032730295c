//! `fleetctl chaos run`: careful clients increment fresh counters through nginx, plain clients (one
//! attempt, no idempotency key, like vegeta) increment counters of their own and read the careful ones,
//! while faults are injected through the fleet's control channel on a schedule; then every counter is
//! checked and a report printed, reads and writes apart.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use clap::Args;

use super::client::RetryPolicy;
use super::control;
use super::fault::Fault;
use super::report::{self, FaultRecord, LoadSummary, Report};
use super::verify::verify;
use super::workload::{Workload, WorkloadOptions};
use crate::state::FleetState;

/// How often progress is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Args)]
pub struct RunArgs {
    /// How long the load runs (30s, 500ms, 2m); faults are spread over it.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: Duration,
    /// Careful writers (idempotency keys, retries) sending at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Plain writers (one attempt, no idempotency key) beside them, on counters of their own.
    #[arg(long, default_value_t = 4)]
    plain_writers: usize,
    /// Plain readers (`GET /api/counters/{key}`, one attempt) of the careful writers' counters.
    #[arg(long, default_value_t = 4)]
    readers: usize,
    /// Requests per second of all clients together, each client keeping an even share (default: each
    /// sends its next as soon as its last ends).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
    /// The faults, comma-separated (`kill-primary,switchover`, `lag-replica pg-2 3`), spread evenly
    /// over the run. Default: on one PostgreSQL a node crash, a database restart, a node stop and a
    /// database pause; on a Patroni cluster kill-primary, then switchover.
    #[arg(long, value_delimiter = ',', value_parser = parse_fault)]
    faults: Vec<Fault>,
    /// Fresh counters incremented (named chaos-<run>-<i>).
    #[arg(long, default_value_t = 20)]
    keys: usize,
    /// No faults: the same load and check on a quiet fleet.
    #[arg(long)]
    no_faults: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(dir: &Path, args: RunArgs) -> anyhow::Result<()> {
    ensure!(args.concurrency > 0 && args.keys > 0, "--concurrency and --keys must be at least 1");
    let state = FleetState::read(dir)?;
    let socket = control::socket_path(dir);
    ensure!(
        socket.exists(),
        "{} has no control channel ({} not found): is its `fleetctl up` running?",
        dir.display(),
        socket.display()
    );
    let live = live_nodes(&state);
    ensure!(!live.is_empty(), "no node of the fleet at {} answers /health/live", state.url);
    let faults = match (args.no_faults, args.faults.is_empty(), state.members.is_empty()) {
        (true, _, _) => Vec::new(),
        (false, false, _) => spread(&args.faults, args.duration),
        (false, true, true) => schedule(&live, args.duration),
        (false, true, false) => spread(&[Fault::KillPrimary, Fault::Switchover], args.duration),
    };
    let clients = args.concurrency + args.plain_writers + args.readers;
    // Each client's share of the rate: one request per `pace`.
    let pace = args.rate.map(|rate| Duration::from_secs_f64(clients as f64 / rate));
    let options = WorkloadOptions {
        pace,
        ..WorkloadOptions::careful(&state.url, "chaos", args.keys, args.concurrency)
    };
    let plain_options = (args.plain_writers > 0).then(|| WorkloadOptions {
        policy: RetryPolicy::plain(),
        pace,
        ..WorkloadOptions::careful(&state.url, "chaos-plain", args.keys, args.plain_writers)
    });
    let read_options = (args.readers > 0).then(|| WorkloadOptions {
        pace,
        ..WorkloadOptions::plain_reads(&state.url, &options.keys, args.readers)
    });
    eprintln!(
        "chaos run: {:.1} s of increments by {} careful and {} plain clients on {} fresh counters each ({}-…), \
         {} plain readers, {} through {}",
        args.duration.as_secs_f64(),
        args.concurrency,
        args.plain_writers,
        args.keys,
        options.keys[0].rsplit_once('-').map_or("", |(prefix, _)| prefix),
        args.readers,
        args.rate.map_or("as fast as they can".to_owned(), |rate| format!("{rate} requests/s")),
        state.url,
    );
    for (at, fault) in &faults {
        eprintln!("  at {:>5.1} s: {fault}", at.as_secs_f64());
    }

    let workload = Workload::start(options)?;
    let plain = plain_options.map(Workload::start).transpose()?;
    let readers = read_options.map(Workload::start).transpose()?;
    let injector = {
        let dir: PathBuf = dir.to_owned();
        let start = Instant::now();
        thread::Builder::new().name("chaos-faults".into()).spawn(move || inject(&dir, faults, start))?
    };
    while workload.elapsed() < args.duration {
        thread::sleep(PROGRESS_EVERY.min(args.duration.saturating_sub(workload.elapsed())));
        let tally = workload.tally();
        eprintln!(
            "[{:>5.1} s] {} requests, {} acknowledged, {} retries; failures: {}",
            workload.elapsed().as_secs_f64(),
            tally.requests,
            tally.acknowledged,
            tally.retries,
            report::failures(&tally)
        );
        for (name, load) in [("plain writes", &plain), ("plain reads", &readers)] {
            if let Some(tally) = load.as_ref().map(Workload::tally) {
                eprintln!(
                    "          {name}: {} requests, {} succeeded; failures: {}",
                    tally.requests,
                    tally.acknowledged,
                    report::failures(&tally)
                );
            }
        }
    }
    let faults = injector.join().map_err(|_| anyhow::anyhow!("the fault injector panicked"))?;
    eprintln!("stopping the load; increments in flight may retry for a while …");
    let reads = readers.map(Workload::stop);
    let plain = plain.map(Workload::stop);
    let run = workload.stop();
    let verdict = verify(&state.url, &run).context("cannot read the counters back")?;
    let plain_verdict = plain
        .as_ref()
        .map(|run| verify(&state.url, run))
        .transpose()
        .context("cannot read the counters back")?;
    let summary = |name: &str, run: &super::workload::Run| {
        LoadSummary::new(name, run.options.concurrency, &run.samples, run.started, run.elapsed)
    };
    let loads = std::iter::once(summary("careful writes", &run))
        .chain(plain.as_ref().map(|run| summary("plain writes", run)))
        .chain(reads.as_ref().map(|run| summary("plain reads", run)))
        .collect();
    let report = Report {
        url: state.url.clone(),
        duration_s: run.elapsed.as_secs_f64(),
        concurrency: args.concurrency,
        keys: args.keys,
        tally: run.tally,
        faults,
        verdict,
        plain_verdict,
        loads,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    report.verdict.judge()?;
    report.plain_verdict.as_ref().map_or(Ok(()), |verdict| verdict.judge().context("plain writers"))
}

/// `faults` at even intervals over `duration` (the i-th of n at i/(n+1) of it).
fn spread(faults: &[Fault], duration: Duration) -> Vec<(Duration, Fault)> {
    let n = faults.len() as f64 + 1.0;
    faults.iter().enumerate().map(|(i, fault)| (duration.mul_f64((i as f64 + 1.0) / n), *fault)).collect()
}

fn parse_fault(s: &str) -> Result<Fault, String> {
    s.parse()
}

/// A positive number of requests per second.
fn parse_rate(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r > 0.0)
        .ok_or_else(|| format!("{s:?} is not a positive number of requests per second"))
}

/// The faults of a run over `duration` on the live nodes `live` (numbers, ascending): a crash of the last
/// node, a database restart, a graceful stop of the next-to-last, a database pause of up to 2 s. The first
/// live node is never touched, so the fleet still serves at the end.
fn schedule(live: &[usize], duration: Duration) -> Vec<(Duration, Fault)> {
    let mut victims = live.iter().skip(1).rev().copied();
    let pause = (duration / 10).clamp(Duration::from_millis(500), Duration::from_secs(2));
    let faults = [
        (0.15, victims.next().map(|n| Fault::KillNode { n })),
        (0.35, Some(Fault::RestartDb)),
        (0.55, victims.next().map(|n| Fault::StopNode { n })),
        (0.75, Some(Fault::PauseDb { seconds: pause })),
    ];
    faults.into_iter().filter_map(|(at, fault)| Some((duration.mul_f64(at), fault?))).collect()
}

/// Sends each fault at its time (from `start`) and records the fleet's answer.
fn inject(dir: &Path, faults: Vec<(Duration, Fault)>, start: Instant) -> Vec<FaultRecord> {
    let mut records = Vec::new();
    for (at, fault) in faults {
        thread::sleep((start + at).saturating_duration_since(Instant::now()));
        let at_s = start.elapsed().as_secs_f64();
        let (ok, result) = match control::send(dir, &fault) {
            Ok(what) => (true, what),
            Err(error) => (false, format!("{error:#}")),
        };
        eprintln!("[{at_s:>5.1} s] {fault}: {}{result}", if ok { "" } else { "FAILED: " });
        records.push(FaultRecord { at_s, command: fault.to_string(), ok, result });
    }
    records
}

/// The numbers (app-N) of the nodes that answer `/health/live`.
fn live_nodes(state: &FleetState) -> Vec<usize> {
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(2)).build();
    let live = |url: &str| agent.get(&format!("{url}/health/live")).call().is_ok();
    state.nodes.iter().enumerate().filter(|(_, node)| live(&node.url)).map(|(i, _)| i + 1).collect()
}

/// `30s`, `500ms`, `2m`, or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    let split = text.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        _ => f64::NAN,
    };
    number
        .trim()
        .parse::<f64>()
        .ok()
        .and_then(|n| Duration::try_from_secs_f64(n * scale).ok())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{s:?} is not a duration like 30s, 500ms or 2m"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_with_their_units() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("8"), Ok(Duration::from_secs(8)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "0s", "-1s", "soon", "3h", "1.5.2s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_schedule_spares_the_first_live_node() {
        let secs = |d: Duration| d.as_secs_f64();
        let four = schedule(&[1, 2, 3, 4], Duration::from_secs(30));
        let faults: Vec<Fault> = four.iter().map(|(_, f)| *f).collect();
        assert_eq!(
            faults,
            [
                Fault::KillNode { n: 4 },
                Fault::RestartDb,
                Fault::StopNode { n: 3 },
                Fault::PauseDb { seconds: Duration::from_secs(2) }
            ]
        );
        assert!(four.windows(2).all(|w| w[0].0 < w[1].0) && secs(four[3].0) < 30.0);

        let two: Vec<Fault> = schedule(&[1, 2], Duration::from_secs(8)).into_iter().map(|(_, f)| f).collect();
        assert_eq!(
            two,
            [
                Fault::KillNode { n: 2 },
                Fault::RestartDb,
                Fault::PauseDb { seconds: Duration::from_millis(800) }
            ]
        );
        // app-2 died earlier: app-3 goes instead, and app-1 stays.
        let gap: Vec<Fault> = schedule(&[1, 3], Duration::from_secs(8)).into_iter().map(|(_, f)| f).collect();
        assert_eq!(gap[0], Fault::KillNode { n: 3 });
        let one: Vec<Fault> = schedule(&[2], Duration::from_secs(8)).into_iter().map(|(_, f)| f).collect();
        assert_eq!(one, [Fault::RestartDb, Fault::PauseDb { seconds: Duration::from_millis(800) }]);
    }

    #[test]
    fn given_faults_are_spread_evenly() {
        let faults = spread(
            &[Fault::KillPrimary, Fault::Switchover, Fault::RollingRestartDb],
            Duration::from_secs(40),
        );
        let at: Vec<u64> = faults.iter().map(|(at, _)| at.as_secs()).collect();
        assert_eq!(at, [10, 20, 30]);
        assert_eq!(faults[2].1, Fault::RollingRestartDb);
        assert_eq!(
            parse_fault("lag-replica pg-2 3"),
            Ok(Fault::LagReplica { member: 2, seconds: Duration::from_secs(3) })
        );
        assert!(parse_rate("0").is_err() && parse_rate("fast").is_err() && parse_rate("50") == Ok(50.0));
    }
}
