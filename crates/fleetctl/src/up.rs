//! `fleetctl up`: start a fleet, print its addresses, run until Ctrl-C or SIGTERM, stop it cleanly.
//! Meanwhile it serves the fleet's control socket, through which `fleetctl chaos` injects faults.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use fleet_local::fleet::{Fleet, FleetOptions};

use crate::chaos::control::{ControlServer, Injector};
use crate::state::{self, FleetState, NodeState};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// How many nodes (app-1 … app-N).
    #[arg(long, default_value_t = 4)]
    nodes: u32,
    /// Each node's connection pool size.
    #[arg(long, default_value_t = 5)]
    pool_size: u32,
    /// nginx's port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Where configs, logs and fleet.json go (removed again on stop).
    #[arg(long, default_value = ".fleet")]
    dir: PathBuf,
    /// Do not start Prometheus.
    #[arg(long)]
    no_prometheus: bool,
    /// Extra environment for every node, as NAME=VALUE (repeatable), e.g. --env LOCK_ORDER=sorted.
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
}

pub(crate) fn parse_env(s: &str) -> Result<(String, String), String> {
    let (name, value) = s.split_once('=').ok_or_else(|| format!("{s:?} is not NAME=VALUE"))?;
    Ok((name.to_owned(), value.to_owned()))
}

/// The `fleet-app` binary: `FLEET_APP_BIN`, else next to this executable, else on PATH.
pub(crate) fn node_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("FLEET_APP_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let sibling = std::env::current_exe()?.with_file_name("fleet-app");
    if sibling.is_file() {
        return Ok(sibling);
    }
    std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join("fleet-app")).find(|p| p.is_file()))
        .context("fleet-app not found next to fleetctl or on PATH: build it (`cargo build --release -p fleet-app`) or set FLEET_APP_BIN")
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }
    if state::path(&args.dir).exists() {
        if let Ok(running) = FleetState::read(&args.dir) {
            anyhow::ensure!(
                !crate::status::is_fleetctl(running.pid),
                "a fleet is already running from {} (fleetctl PID {}); stop it with `fleetctl down --dir {}`",
                args.dir.display(),
                running.pid,
                args.dir.display()
            );
        }
    }
    eprintln!("starting {} nodes × pool {} …", args.nodes, args.pool_size);
    let mut opts = FleetOptions::new(node_bin()?);
    opts.nodes = args.nodes;
    opts.pool_size = args.pool_size;
    opts.port = args.port;
    opts.dir = Some(args.dir.clone());
    opts.prometheus = !args.no_prometheus;
    opts.node_env = args.env;
    let mut fleet = Fleet::start(opts)?;

    let nodes: Vec<NodeState> = fleet
        .nodes()
        .iter()
        .map(|n| NodeState { name: n.container_id().to_owned(), url: n.url(), pid: n.pid() })
        .collect();
    for node in &nodes {
        println!("{}: {} (pid {})", node.name, node.url, node.pid);
    }
    if let Some(url) = fleet.prometheus_url() {
        println!("prometheus: {url}");
    }
    println!("nginx: {}", fleet.url());
    // Bound before "fleet ready", so whoever waits for that line can send faults at once.
    let control = ControlServer::bind(fleet.dir())?;
    println!("control: {} (fleetctl chaos --dir {})", control.path().display(), args.dir.display());
    println!("database: {}", fleet.database_url());
    let state =
        FleetState { pid: std::process::id(), url: fleet.url(), prometheus: fleet.prometheus_url(), nodes };
    state.write(fleet.dir())?;
    println!("fleet ready: {}", fleet.url());

    let mut injector = Injector::default();
    let mut reported = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        control.serve(|fault| injector.apply(&mut fleet, fault));
        if let Err(error) = injector.tick(&mut fleet) {
            eprintln!("fleetctl: cannot resume PostgreSQL: {error:#}");
        }
        for name in fleet.exited_components() {
            if !reported.contains(&name) {
                eprintln!("fleetctl: {name} has exited; the rest of the fleet keeps running");
                reported.push(name);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(control);
    eprintln!("stopping the fleet …");
    // Nodes drain faster against a database that answers.
    if let Err(error) = fleet.postgres().resume() {
        eprintln!("fleetctl: cannot resume PostgreSQL: {error:#}");
    }
    let dir = fleet.dir().to_owned();
    let result = fleet.stop();
    let _ = std::fs::remove_file(state::path(&dir));
    result?;
    eprintln!("fleet stopped");
    Ok(())
}
