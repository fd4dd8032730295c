//! Steady load from careful (or plain) clients: `concurrency` threads, each sending logical increments of
//! a random key from a set, one after the other (or at a steady pace), until stopped. Every increment's
//! outcome is kept for the check. The same threads can send plain reads of those keys instead.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::Rng;

use super::client::{CarefulClient, Increment, RetryPolicy, Sample, Stats, Tally};

/// How far away the deadline of an increment is while the load runs: in effect, none.
const NO_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// What load to send.
#[derive(Debug, Clone)]
pub struct WorkloadOptions {
    /// The fleet (nginx) or a node.
    pub url: String,
    /// The counters incremented, each pick at random. Use names no earlier run used.
    pub keys: Vec<String>,
    /// Clients sending at once.
    pub concurrency: usize,
    pub policy: RetryPolicy,
    /// How long increments still unacknowledged at [`Workload::stop`] may keep retrying.
    pub settle: Duration,
    /// Each client starts one request (or logical increment) per `pace`, if given; else the next as soon
    /// as the last ends.
    pub pace: Option<Duration>,
    /// Read the counters (`GET /api/counters/{key}`, once each) instead of incrementing them.
    pub reads: bool,
}

impl WorkloadOptions {
    /// Careful clients on `keys` fresh counters named `<prefix>-<random>-<i>`, settling for up to 60 s.
    pub fn careful(url: &str, prefix: &str, keys: usize, concurrency: usize) -> Self {
        let run = format!("{:08x}", rand::random::<u32>());
        WorkloadOptions {
            url: url.to_owned(),
            keys: (1..=keys).map(|i| format!("{prefix}-{run}-{i}")).collect(),
            concurrency,
            policy: RetryPolicy::careful(),
            settle: Duration::from_secs(60),
            pace: None,
            reads: false,
        }
    }

    /// Plain readers (one attempt each) of `keys`.
    pub fn plain_reads(url: &str, keys: &[String], concurrency: usize) -> Self {
        WorkloadOptions {
            url: url.to_owned(),
            keys: keys.to_vec(),
            concurrency,
            policy: RetryPolicy::plain(),
            settle: Duration::ZERO,
            pace: None,
            reads: true,
        }
    }
}

/// A running load; [`Workload::stop`] ends it and returns every increment.
#[derive(Debug)]
pub struct Workload {
    options: WorkloadOptions,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<Vec<Increment>>>,
    started: Instant,
}

#[derive(Debug)]
struct Shared {
    stopping: AtomicBool,
    /// The deadline of every increment in flight; moved from "none" to "settle from now" by `stop`.
    deadline: Mutex<Instant>,
    stats: Stats,
}

/// Everything a stopped load did.
#[derive(Debug)]
pub struct Run {
    pub options: WorkloadOptions,
    pub increments: Vec<Increment>,
    pub tally: Tally,
    /// Every request.
    pub samples: Vec<Sample>,
    pub started: Instant,
    /// From start to the last increment's end.
    pub elapsed: Duration,
}

impl Workload {
    pub fn start(options: WorkloadOptions) -> anyhow::Result<Workload> {
        anyhow::ensure!(!options.keys.is_empty() && options.concurrency > 0, "a load needs keys and clients");
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            deadline: Mutex::new(Instant::now() + NO_DEADLINE),
            stats: Stats::default(),
        });
        let client = CarefulClient::new(&options.url, options.policy);
        let threads = (0..options.concurrency)
            .map(|i| {
                let (client, shared, options) = (client.clone(), Arc::clone(&shared), options.clone());
                thread::Builder::new()
                    .name(format!("chaos-client-{i}"))
                    .spawn(move || client_loop(&client, &shared, &options))
                    .context("cannot start a client thread")
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Workload { options, shared, threads, started: Instant::now() })
    }

    /// What the clients did so far.
    pub fn tally(&self) -> Tally {
        self.shared.stats.tally()
    }

    /// Time since the start.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops sending new increments, lets those in flight retry for up to `settle`, and returns them all.
    pub fn stop(self) -> Run {
        *self.shared.deadline.lock().unwrap_or_else(|p| p.into_inner()) =
            Instant::now() + self.options.settle;
        self.shared.stopping.store(true, Ordering::Relaxed);
        let increments = self
            .threads
            .into_iter()
            .flat_map(|thread| thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect();
        Run {
            options: self.options,
            increments,
            tally: self.shared.stats.tally(),
            samples: self.shared.stats.samples(),
            started: self.started,
            elapsed: self.started.elapsed(),
        }
    }
}

fn client_loop(client: &CarefulClient, shared: &Shared, options: &WorkloadOptions) -> Vec<Increment> {
    let deadline = || *shared.deadline.lock().unwrap_or_else(|p| p.into_inner());
    let keys = &options.keys;
    let mut done = Vec::new();
    // Paced clients start at random points of their first period, so they do not send in lockstep.
    let mut next = Instant::now() + options.pace.map_or(Duration::ZERO, |p| p.mul_f64(rand::random()));
    while !shared.stopping.load(Ordering::Relaxed) {
        if let Some(pace) = options.pace {
            thread::sleep(next.saturating_duration_since(Instant::now()));
            next = (next + pace).max(Instant::now());
            if shared.stopping.load(Ordering::Relaxed) {
                break;
            }
        }
        let key = &keys[rand::rng().random_range(0..keys.len())];
        match options.reads {
            true => {
                client.read(key, &shared.stats);
            }
            false => done.push(client.increment(key, &shared.stats, deadline)),
        }
    }
    done
}
