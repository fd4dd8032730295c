//! Steady load from careful clients: `concurrency` threads, each sending logical increments of a random
//! key from a set, one after the other, until stopped. Every increment's outcome is kept for the check.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::Rng;

use super::client::{CarefulClient, Increment, RetryPolicy, Stats, Tally};

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
                let (client, shared, keys) = (client.clone(), Arc::clone(&shared), options.keys.clone());
                thread::Builder::new()
                    .name(format!("chaos-client-{i}"))
                    .spawn(move || client_loop(&client, &shared, &keys))
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
            elapsed: self.started.elapsed(),
        }
    }
}

fn client_loop(client: &CarefulClient, shared: &Shared, keys: &[String]) -> Vec<Increment> {
    let deadline = || *shared.deadline.lock().unwrap_or_else(|p| p.into_inner());
    let mut done = Vec::new();
    while !shared.stopping.load(Ordering::Relaxed) {
        let key = &keys[rand::rng().random_range(0..keys.len())];
        done.push(client.increment(key, &shared.stats, deadline));
    }
    done
}
