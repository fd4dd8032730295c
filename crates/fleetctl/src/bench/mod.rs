//! `fleetctl bench`: workloads driven through nginx against private, durable fleets, with the database's
//! own ceiling (pgbench, COPY) measured on the same PostgreSQL in the same run, so that every figure is a
//! ratio that survives a noisy machine. Writes `results.json`, `results.md` and SVG plots.
//!
//! One fleet per nodes × pool shape: the main shape runs every workload, each followed by its ceiling;
//! the sweeps' other shapes run the swept workloads. Each point is checked against the database: the
//! benchmark counters must have grown by exactly the 2xx increments, `data` by exactly the 2xx rows.

mod ceiling;
mod db;
mod goals;
mod load;
mod marks;
mod plan;
mod plots;
mod progress;
mod report;
mod requests;
mod results;
mod rss;
mod run;
mod svg;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::ensure;
use clap::Args;

use plan::{parse_shape, Ceiling, Shape, Workload};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Workloads, all run at the main shape (--at).
    #[arg(long, value_delimiter = ',', default_value = "http,hot,keys,reads,bulk,mixed,pair,pairs")]
    workloads: Vec<Workload>,
    /// Node counts of the node sweep (at the main pool size).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    nodes: Vec<u32>,
    /// Pool sizes of the pool sweep (at the main node count).
    #[arg(long = "pool-size", value_delimiter = ',', default_value = "1,5,10,20")]
    pool_size: Vec<u32>,
    /// The main shape, NODESxPOOL: every workload and the database's ceilings run there, and both sweeps
    /// pass through it.
    #[arg(long, default_value = "4x5", value_parser = parse_shape)]
    at: Shape,
    /// Workloads swept over --nodes and --pool-size (the others run at the main shape only).
    #[arg(long, value_delimiter = ',', default_value = "hot,keys,bulk")]
    sweep: Vec<Workload>,
    /// No sweeps: the main shape only.
    #[arg(long, conflicts_with = "grid")]
    no_sweeps: bool,
    /// Every --nodes × --pool-size combination instead of two sweeps through the main shape.
    #[arg(long)]
    grid: bool,
    /// Ceilings to measure at the main shape (default: those of the workloads: hot → pgbench on the hot
    /// key, keys → pgbench on 1000 keys, reads → pgbench's counter read, bulk → psql \copy, pair and
    /// pairs → pgbench's transfer in key order).
    #[arg(long, value_delimiter = ',')]
    ceilings: Option<Vec<Ceiling>>,
    /// Seconds measured per point (and per ceiling).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of load before each point's measured window (its errors still count).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// HTTP connections through nginx.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Connection counts of the probes: after each workload at the main shape, the same workload at
    /// each of these through nginx and straight to the first node, for latency without parallelism.
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    probe_connections: Vec<usize>,
    /// Seconds measured per probe (after a warm-up of at most 1 s).
    #[arg(long, default_value_t = 3)]
    probe_duration: u64,
    /// No probes.
    #[arg(long)]
    no_probes: bool,
    /// Rows per bulk-insert request (mixed sends a tenth as many).
    #[arg(long, default_value_t = 1000)]
    bulk_rows: usize,
    /// pgbench clients for the increment ceilings.
    #[arg(long, default_value_t = 20)]
    pgbench_clients: u32,
    /// Environment for every node, NAME=VALUE (repeatable), e.g. --env INCREMENT_MODE=…
    #[arg(long = "env", value_parser = crate::up::parse_env)]
    env: Vec<(String, String)>,
    /// Also run the increment workloads (hot, keys) at the main shape on nodes with this environment
    /// (repeatable), reported beside the others, e.g. INCREMENT_MODE=transaction.
    #[arg(long = "baseline-env", value_parser = crate::up::parse_env)]
    baseline_env: Vec<(String, String)>,
    /// Where results.json, results.md and the plots go.
    #[arg(long, default_value = "bench/latest")]
    out: PathBuf,
    /// Run nothing: write results.md and the plots again from the results.json in --out.
    #[arg(long)]
    render_only: bool,
}

impl BenchArgs {
    fn window(&self) -> Duration {
        Duration::from_secs(self.duration)
    }

    /// The probes' connection counts (none with --no-probes).
    fn probes(&self) -> &[usize] {
        if self.no_probes {
            &[]
        } else {
            &self.probe_connections
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        ensure!(self.duration >= 1, "--duration must be at least 1 second");
        ensure!(self.connections >= 1, "--connections must be at least 1");
        ensure!(self.probe_connections.iter().all(|&c| c >= 1), "--probe-connections must be at least 1");
        ensure!(self.probe_duration >= 1, "--probe-duration must be at least 1 second");
        ensure!(self.bulk_rows >= 1, "--bulk-rows must be at least 1");
        ensure!(self.pgbench_clients >= 1, "--pgbench-clients must be at least 1");
        Ok(())
    }
}

/// Runs the benchmark and writes its results.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    args.check()?;
    match args.render_only {
        true => run::render_again(&args.out),
        false => run::run(&args),
    }
}
