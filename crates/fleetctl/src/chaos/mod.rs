//! `fleetctl chaos`: break a running fleet on purpose and prove nothing acknowledged was lost or doubled.
//!
//! - `fleetctl chaos --dir D <fault> …`, one subcommand per `Fault` (kill or stop a node, restart or
//!   pause the database; on a fleet started with `--replicas N`, the cluster's faults), asks the fleet's
//!   own `fleetctl up` (the only process allowed to signal its children) through its control socket.
//! - `fleetctl chaos --dir D run` drives careful clients (idempotency keys, retries) through nginx while it
//!   injects those faults, then checks every acknowledged increment is in the database exactly once.
//!
//! The careful client, the load and the check are public so the test suite drives the same code.

mod client;
pub(crate) mod control;
mod fault;
pub(crate) mod injector;
mod report;
mod run;
mod verify;
mod workload;

use std::path::PathBuf;

use clap::{Args, Subcommand};

pub use client::{CarefulClient, Failure, Increment, Outcome, RetryPolicy, Stats, Tally};
use fault::Fault;
pub use verify::{verify, KeyCheck, Verdict};
pub use workload::{Run, Workload, WorkloadOptions};

#[derive(Debug, Args)]
pub struct ChaosArgs {
    /// The fleet's directory (as given to `up`).
    #[arg(long, default_value = ".fleet", global = true)]
    dir: PathBuf,
    #[command(subcommand)]
    command: ChaosCommand,
}

#[derive(Debug, Subcommand)]
enum ChaosCommand {
    #[command(flatten)]
    Fault(Fault),
    /// Load the fleet with careful clients while injecting faults; check and report.
    Run(run::RunArgs),
}

pub fn run(args: ChaosArgs) -> anyhow::Result<()> {
    match args.command {
        ChaosCommand::Fault(fault) => {
            println!("{}", control::send(&args.dir, &fault)?);
            Ok(())
        }
        ChaosCommand::Run(run_args) => run::run(&args.dir, run_args),
    }
}
