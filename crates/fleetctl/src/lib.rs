//! `fleetctl`: run a local pgfleet (`up`), inspect it (`status`, `logs`, `top`), stop it (`down`), probe
//! it (`lab`), and break it on purpose (`chaos`).
//! The library holds the whole command line, so the test suite can build it as a binary of its own.

mod bench;
pub mod chaos;
mod lab;
mod logs;
mod state;
mod status;
mod top;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The whole command line: every subcommand and option (`clap::CommandFactory` lists them).
#[derive(Debug, Parser)]
#[command(version, about = "Run, inspect and stop a local pgfleet: PostgreSQL, N nodes, nginx, Prometheus")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a fleet and run it until Ctrl-C or SIGTERM.
    Up(up::UpArgs),
    /// Show every node's health and pool of a running fleet.
    Status {
        /// The fleet's directory (as given to `up`).
        #[arg(long, default_value = ".fleet")]
        dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the fleet's logs (a node's, or every component's prefixed with its name).
    Logs(logs::LogsArgs),
    /// Watch the database: sessions by node and state, lock waits and who blocks them, every pool.
    Top(top::TopArgs),
    /// Stop a fleet started elsewhere (by its `fleetctl up`'s PID, recorded in the directory).
    Down {
        #[arg(long, default_value = ".fleet")]
        dir: PathBuf,
    },
    /// Benchmark private fleets against the database's own ceiling; write results and plots.
    Bench(Box<bench::BenchArgs>),
    /// Break a running fleet on purpose (kill or stop a node, restart or pause the database), or run a
    /// load through such faults and check that no acknowledged increment was lost or doubled.
    Chaos(chaos::ChaosArgs),
    /// Run a lab experiment against a fleet or node.
    Lab {
        #[command(subcommand)]
        experiment: Lab,
    },
}

#[derive(Debug, Subcommand)]
enum Lab {
    /// Run the isolation lab at all four levels and print the matrix (levels × phenomena).
    Isolation {
        /// The fleet (nginx) or a node.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
    },
}

/// Runs the command line; errors are printed and turn into a non-zero exit code.
pub fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Up(args) => up::run(args),
        Command::Status { dir, json } => status::status(&dir, json),
        Command::Down { dir } => status::down(&dir),
        Command::Logs(args) => logs::run(args),
        Command::Top(args) => top::run(args),
        Command::Bench(args) => bench::run(*args),
        Command::Chaos(args) => chaos::run(args),
        Command::Lab { experiment: Lab::Isolation { url } } => lab::print_isolation(&url),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleetctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
