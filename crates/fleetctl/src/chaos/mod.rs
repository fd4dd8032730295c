//! `fleetctl chaos`: break a running fleet on purpose and prove nothing acknowledged was lost or doubled.
//!
//! - `fleetctl chaos --dir D kill-node N | stop-node N | restart-db | pause-db SECONDS`, and on a fleet
//!   started with `--replicas N` `kill-primary | switchover | rolling-restart-db | lag-replica M SECONDS |
//!   silence-replica M SECONDS`, asks the fleet's own `fleetctl up` (the only process allowed to signal its children) through its
//!   control socket.
//! - `fleetctl chaos --dir D run` drives careful clients (idempotency keys, retries) through nginx while it
//!   injects those faults, then checks every acknowledged increment is in the database exactly once.
//!
//! The careful client, the load and the check are public so the test suite drives the same code.

mod client;
pub(crate) mod control;
mod report;
mod run;
mod verify;
mod workload;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

pub use client::{CarefulClient, Failure, Increment, Outcome, RetryPolicy, Stats, Tally};
use control::Fault;
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
    /// SIGKILL node N, as a crash would: its in-flight requests fail; it stays dead.
    KillNode { n: usize },
    /// SIGTERM node N, as an orchestrator would: it drains and exits.
    StopNode { n: usize },
    /// Restart PostgreSQL (fast shutdown, which ends every session, then start).
    RestartDb,
    /// Freeze PostgreSQL's every process (SIGSTOP) for SECONDS, then thaw it (SIGCONT).
    PauseDb {
        #[arg(value_parser = control::parse_seconds)]
        seconds: Duration,
    },
    /// On a Patroni cluster: SIGKILL the leader's Patroni and PostgreSQL; returns once another member
    /// leads and the killed one has rejoined.
    KillPrimary,
    /// On a Patroni cluster: a planned switchover (Patroni's REST API); returns once the cluster is whole.
    Switchover,
    /// On a Patroni cluster: restart each replica, switch over, restart the old leader; returns once the
    /// cluster is whole again.
    RollingRestartDb,
    /// On a Patroni cluster: pause WAL replay on replica MEMBER (pg-2, or 2) for SECONDS, then resume it.
    LagReplica {
        #[arg(value_parser = control::parse_member)]
        member: usize,
        #[arg(value_parser = control::parse_seconds)]
        seconds: Duration,
    },
    /// On a Patroni cluster: stop replica MEMBER's WAL receiver (SIGSTOP) for SECONDS, then resume it: its
    /// link to the primary goes silent, no WAL and no error, as in a partition before any timeout fires.
    /// (On the synchronous standby, writes wait meanwhile.)
    SilenceReplica {
        #[arg(value_parser = control::parse_member)]
        member: usize,
        #[arg(value_parser = control::parse_seconds)]
        seconds: Duration,
    },
    /// Load the fleet with careful clients while injecting faults; check and report.
    Run(run::RunArgs),
}

pub fn run(args: ChaosArgs) -> anyhow::Result<()> {
    let fault = match args.command {
        ChaosCommand::KillNode { n } => Fault::KillNode(n),
        ChaosCommand::StopNode { n } => Fault::StopNode(n),
        ChaosCommand::RestartDb => Fault::RestartDb,
        ChaosCommand::PauseDb { seconds } => Fault::PauseDb(seconds),
        ChaosCommand::KillPrimary => Fault::KillPrimary,
        ChaosCommand::Switchover => Fault::Switchover,
        ChaosCommand::RollingRestartDb => Fault::RollingRestartDb,
        ChaosCommand::LagReplica { member, seconds } => Fault::LagReplica(member, seconds),
        ChaosCommand::SilenceReplica { member, seconds } => Fault::SilenceReplica(member, seconds),
        ChaosCommand::Run(run_args) => return run::run(&args.dir, run_args),
    };
    println!("{}", control::send(&args.dir, &fault)?);
    Ok(())
}
