//! `fleetctl up`: start a fleet, print one line per component and the summary, run until Ctrl-C or
//! SIGTERM, stop it cleanly. Children's output goes to `<dir>/logs/` (`fleetctl logs`), or with
//! `--verbose` also to stderr, each line prefixed with its component. The database is kept in
//! `<dir>/postgres` across runs (`--fresh` starts over); with `--replicas N` it is a Patroni cluster of
//! N + 1 members kept in `<dir>/patroni`; with `--database-url` the fleet runs on a PostgreSQL the user
//! already has, and starts none. Meanwhile it serves the fleet's control socket, through which
//! `fleetctl chaos` injects faults.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::builder::TypedValueParser;
use clap::error::ErrorKind;
use clap::Args;
use fleet_local::fleet::{Database, DatabaseUrl, Fleet, FleetOptions};

use crate::chaos::control::ControlServer;
use crate::chaos::injector::Injector;
use crate::state::{self, FleetState, MemberState, NodeState};

/// `--dir`'s default, relative to the working directory.
pub const DEFAULT_DIR: &str = ".fleet";

#[derive(Debug, Args)]
pub struct UpArgs {
    /// How many nodes (app-1 … app-N).
    #[arg(long, default_value_t = 4)]
    nodes: u32,
    /// Each node's connection pool size.
    #[arg(long, default_value_t = 5)]
    pool_size: u32,
    /// Replicas beside the primary: 0 runs one PostgreSQL; N > 0 a Patroni cluster (etcd, synchronous
    /// replication) of N + 1 members, the nodes writing to its primary and reading from its replicas.
    #[arg(long, default_value_t = 0)]
    replicas: u32,
    /// nginx's port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The fleet's private directory: the kept database, logs, configs and fleet.json.
    #[arg(long, default_value = DEFAULT_DIR)]
    dir: PathBuf,
    /// Start with an empty database (the kept one is deleted).
    #[arg(long)]
    fresh: bool,
    /// Run on a PostgreSQL you already have instead of starting one: postgres://USER:PASSWORD@HOST:PORT/DB.
    /// The nodes create their tables in it as USER (who needs CREATE on its schema). No exporter is
    /// started. The environment keeps the password out of `ps`, which shows every command line.
    #[arg(long, env = "FLEET_DATABASE_URL", hide_env_values = true, value_name = "URL",
          value_parser = DatabaseUrlParser, conflicts_with_all = ["replicas", "fresh"])]
    database_url: Option<DatabaseUrl>,
    /// Also print every child's output, each line prefixed with its name (`[app-2] …`).
    #[arg(long)]
    verbose: bool,
    /// Do not start Prometheus (nor PostgreSQL's exporter).
    #[arg(long)]
    no_prometheus: bool,
    /// Extra environment for every node, as NAME=VALUE (repeatable), e.g. --env LOCK_ORDER=sorted.
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Who nginx admits to the lab and operator endpoints (/api/hold, /api/test-isolation, /metrics,
    /// /api/pool-stats): comma-separated addresses or CIDR ranges; anyone else gets 403. Default:
    /// loopback and the private ranges.
    #[arg(long, env = "FLEET_OPERATOR_NETWORKS", value_delimiter = ',',
          value_parser = parse_network, default_values = fleet_local::nginx::OPERATOR_NETWORKS)]
    operator_networks: Vec<String>,
    /// Proxies in front of nginx whose X-Forwarded-For it believes: a request from one of them is judged
    /// (operator's networks, lab rate limit) by the client that header names. Comma-separated addresses
    /// or CIDR ranges. Default: none, so that a client cannot forge its address.
    #[arg(long, env = "FLEET_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_network)]
    trusted_proxies: Vec<String>,
}

/// `--database-url`'s parser: its errors never quote the URL (clap's own would, password and all).
#[derive(Debug, Clone)]
struct DatabaseUrlParser;

impl TypedValueParser for DatabaseUrlParser {
    type Value = DatabaseUrl;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<DatabaseUrl, clap::Error> {
        let parsed = match value.to_str() {
            Some(url) => DatabaseUrl::parse(url),
            None => Err("the database URL is not UTF-8".to_owned()),
        };
        parsed.map_err(|why| {
            clap::Error::raw(ErrorKind::ValueValidation, format!("--database-url: {why}\n")).with_cmd(cmd)
        })
    }
}

/// Deletes the database kept in `dir` (after checking that `dir` is a fleet directory of ours).
fn forget_database(dir: &std::path::Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let dir = fleet_local::fleet::prepare_dir(dir)?;
    for database in [dir.join("postgres"), dir.join("patroni")] {
        if database.exists() {
            std::fs::remove_dir_all(&database)
                .with_context(|| format!("cannot delete {}", database.display()))?;
            eprintln!("fleetctl: --fresh: deleted the kept database {}", database.display());
        }
    }
    Ok(())
}

/// One line per component, then the logs, the control socket and the database (without its password);
/// `fleet ready: …` follows once fleet.json is written.
fn print_summary(fleet: &Fleet, state: &FleetState, dir: &std::path::Path, control: &std::path::Path) {
    let database_dir = fleet.database_dir();
    let kept = match database_dir.starts_with(fleet.dir()) {
        true => format!("data kept in {} (--fresh starts over)", database_dir.display()),
        false => "a throwaway cluster".to_owned(),
    };
    match (state.database_port, state.members.is_empty()) {
        (None, _) => {
            println!("postgres: yours (--database-url); fleetctl started none and leaves it running")
        }
        (Some(port), true) => println!("postgres: 127.0.0.1:{port}, {kept}"),
        (Some(_), false) => {
            println!("patroni: {} members, {kept}", state.members.len());
            for member in &state.members {
                println!("{}: 127.0.0.1:{} (Patroni {})", member.name, member.port, member.api);
            }
        }
    }
    for node in &state.nodes {
        println!("{}: {} (pid {})", node.name, node.url, node.pid);
    }
    println!("nginx: {}", fleet.url());
    if let Some(url) = fleet.prometheus_url() {
        println!("prometheus: {url}");
    }
    match fleet.exporter_url() {
        Some(url) => println!("postgres-exporter: {url}/metrics"),
        None if state.database_port.is_none() && state.prometheus.is_some() => println!(
            "postgres-exporter: not started (it would need a role with pg_monitor in your database; \
             Prometheus scrapes the nodes only)"
        ),
        None => {}
    }
    println!(
        "logs: {} (fleetctl logs [NODE] [--follow] --dir {})",
        fleet.logs_dir().display(),
        dir.display()
    );
    println!("control: {} (fleetctl chaos --dir {})", control.display(), dir.display());
    println!(
        "database: {} (passwords in {}: PGPASSFILE={} psql '{}')",
        fleet.database_display_url(),
        state.password_file.display(),
        state.password_file.display(),
        fleet.database_display_url()
    );
}

/// The single PostgreSQL's port, or the primary's when the fleet starts; none for an external database.
fn database_port(fleet: &Fleet) -> anyhow::Result<Option<u16>> {
    match fleet.database() {
        Database::Single(pg) => Ok(Some(pg.port())),
        Database::Cluster(cluster) => cluster.port(&cluster.leader()?).map(Some),
        Database::External(_) => Ok(None),
    }
}

/// The Patroni cluster's members, where their PostgreSQL and REST API listen (none for one PostgreSQL).
fn members(fleet: &Fleet) -> anyhow::Result<Vec<MemberState>> {
    let Database::Cluster(cluster) = fleet.database() else {
        return Ok(Vec::new());
    };
    cluster
        .member_names()
        .into_iter()
        .map(|name| Ok(MemberState { port: cluster.port(&name)?, api: cluster.api_url(&name)?, name }))
        .collect()
}

pub(crate) fn parse_env(s: &str) -> Result<(String, String), String> {
    let (name, value) = s.split_once('=').ok_or_else(|| format!("{s:?} is not NAME=VALUE"))?;
    Ok((name.to_owned(), value.to_owned()))
}

fn parse_network(s: &str) -> Result<String, String> {
    fleet_local::nginx::check_network(s).map(|()| s.to_owned())
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
                !crate::status::runs_fleet(running.pid, &args.dir),
                "a fleet is already running from {} (fleetctl PID {}); stop it with `fleetctl down --dir {}`",
                args.dir.display(),
                running.pid,
                args.dir.display()
            );
        }
    }
    if args.fresh {
        forget_database(&args.dir)?;
    }
    match (&args.database_url, args.replicas) {
        (Some(url), _) => {
            eprintln!("starting {} nodes × pool {} on {} …", args.nodes, args.pool_size, url.display_url())
        }
        (None, 0) => eprintln!("starting {} nodes × pool {} …", args.nodes, args.pool_size),
        (None, n) => eprintln!(
            "starting a Patroni cluster of {} members, then {} nodes × pool {} …",
            n + 1,
            args.nodes,
            args.pool_size
        ),
    }
    let mut opts = FleetOptions::new(node_bin()?);
    opts.nodes = args.nodes;
    opts.pool_size = args.pool_size;
    opts.replicas = args.replicas;
    opts.database_url = args.database_url;
    opts.port = args.port;
    opts.dir = Some(args.dir.clone());
    opts.keep_database = true;
    opts.prometheus = !args.no_prometheus;
    opts.quiet = !args.verbose;
    opts.node_env = args.env;
    opts.operator_networks = args.operator_networks;
    opts.trusted_proxies = args.trusted_proxies;
    let mut fleet = Fleet::start(opts)?;
    for warning in fleet.warnings() {
        eprintln!("fleetctl: {warning}");
    }
    // Bound before "fleet ready", so whoever waits for that line can send faults at once.
    let control = ControlServer::bind(fleet.dir())?;
    let state = FleetState {
        pid: std::process::id(),
        url: fleet.url(),
        prometheus: fleet.prometheus_url(),
        nodes: fleet
            .nodes()
            .iter()
            .map(|n| NodeState { name: n.container_id().to_owned(), url: n.url(), pid: n.pid() })
            .collect(),
        database_port: database_port(&fleet)?,
        database_url: match fleet.database() {
            Database::External(_) => Some(fleet.database_display_url()),
            _ => None,
        },
        password_file: fleet.password_file(),
        members: members(&fleet)?,
    };
    print_summary(&fleet, &state, &args.dir, control.path());
    state.write(fleet.dir())?;
    println!("fleet ready: {}", fleet.url());

    let mut injector = Injector::default();
    let mut reported = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        control.serve(|fault| injector.apply(&mut fleet, fault));
        if let Err(error) = injector.tick(&mut fleet) {
            eprintln!("fleetctl: cannot resume the database: {error:#}");
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
    if let Err(error) = injector.resume_all(&mut fleet) {
        eprintln!("fleetctl: cannot resume the database: {error:#}");
    }
    let dir = fleet.dir().to_owned();
    let result = fleet.stop();
    let _ = std::fs::remove_file(state::path(&dir));
    result?;
    eprintln!("fleet stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Up {
        #[command(flatten)]
        args: UpArgs,
    }

    #[test]
    fn operator_networks_default_to_loopback_and_the_private_ranges_and_are_checked() {
        // FLEET_OPERATOR_NETWORKS would take the default's place: the suite never sets it.
        let networks = |args: &[&str]| Up::try_parse_from(args).map(|up| up.args.operator_networks);
        let default = networks(&["up"]).unwrap();
        assert_eq!(default, fleet_local::nginx::OPERATOR_NETWORKS);
        let listed = networks(&["up", "--operator-networks", "10.0.0.0/8,::1"]).unwrap();
        assert_eq!(listed, ["10.0.0.0/8", "::1"]);
        assert!(networks(&["up", "--operator-networks", "10.0.0.0/8,everyone"]).is_err());
    }

    #[test]
    fn no_proxy_is_trusted_unless_listed_and_each_is_checked() {
        // FLEET_TRUSTED_PROXIES would take the default's place: the suite never sets it.
        let proxies = |args: &[&str]| Up::try_parse_from(args).map(|up| up.args.trusted_proxies);
        assert_eq!(proxies(&["up"]).unwrap(), Vec::<String>::new());
        assert_eq!(
            proxies(&["up", "--trusted-proxies", "127.0.0.1,fc00::/7"]).unwrap(),
            ["127.0.0.1", "fc00::/7"]
        );
        assert!(proxies(&["up", "--trusted-proxies", "balancer"]).is_err());
    }
}
