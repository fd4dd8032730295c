//! A whole local fleet: a private PostgreSQL (or a Patroni cluster of a primary and N replicas), N
//! `fleet-app` nodes, nginx in front and Prometheus scraping every node (and every Patroni) directly, all
//! on loopback, all stopped in order by [`Fleet::stop`] or on drop.
//! The fleet is an ordered list of components, each of one shape (see [`crate::component`]): they start
//! in that order and stop in the reverse one.
//! Its fault methods break it on purpose, as a crash or an operator would: [`Fleet::kill_node`],
//! [`Fleet::stop_node`], [`Fleet::restart_db`], [`Fleet::pause_db`].
//!
//! Layout of the fleet directory (private: see [`prepare_dir`]): `logs/<component>.log` (every child's
//! output, started afresh by each start), `postgres/` or `patroni/` (the database, when kept), `nginx/` and
//! `prometheus/` (configs and data, the exporter's too, removed on stop).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};

mod database;
mod dir;
mod external;
pub use database::Database;
use dir::fleet_dir;
pub use dir::prepare_dir;
pub use external::{DatabaseUrl, ExternalDatabase};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::exporter::{Exporter, ExporterOptions};
use crate::files::fresh_dir;
use crate::nginx::{self, Nginx, NginxOptions, Upstream};
use crate::prometheus::{Prometheus, PrometheusOptions, Targets};
use crate::users::service_user;
use crate::{free_port, Component, Log, Node, NodeOptions, PatroniCluster, Postgres};

/// Connections kept free for admins, migrations and the isolation lab's dedicated connections.
pub const ADMIN_HEADROOM: u32 = 10;
/// PostgreSQL's `max_connections` in a local fleet (PostgreSQL's default).
pub const MAX_CONNECTIONS: u32 = 100;
/// How long the fleet may take to answer through nginx once every node is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Each node's `SHUTDOWN_DRAIN_MS` unless the options say otherwise: above nginx's keep-alive timeout
/// toward the nodes (4 s), so a SIGTERM'd node has left nginx's connection cache before its listener closes.
const NODE_DRAIN_MS: &str = "5000";
/// Each node's `HTTP_WORKERS`: its share of the machine's cores, at least one. The nodes of a local fleet
/// share one machine, where more threads than cores only hand requests from thread to thread (a
/// request's database connection and coalescing runner live on the thread that started them).
fn http_workers(nodes: u32) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / nodes.max(1) as usize).max(1)
}

/// How to start a fleet.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// The `fleet-app` binary.
    pub node_bin: PathBuf,
    pub nodes: u32,
    pub pool_size: u32,
    /// nginx's port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// Where configs and logs go; `None` = a temp dir, removed on stop. A given directory (not a link)
    /// is created private (0700) or must already be ours and writable by us only; nginx's and Prometheus's files
    /// there are removed on stop, the logs (and a kept database) stay.
    pub dir: Option<PathBuf>,
    /// Keep the database in `<dir>/postgres` across starts (needs `dir`); otherwise it is a throwaway
    /// cluster in a temp dir. If the `postgres` user cannot reach `dir` (we are root and an ancestor
    /// is closed to it), the database is a throwaway one and [`Fleet::warnings`] says why.
    pub keep_database: bool,
    /// More environment for every node (e.g. `SHUTDOWN_DRAIN_MS`).
    pub node_env: Vec<(String, String)>,
    /// Start Prometheus, and PostgreSQL's exporter for it to scrape.
    pub prometheus: bool,
    /// Keep children's output off our stderr (it is still quoted in errors).
    pub quiet: bool,
    /// fsync on (a fleet for benchmarks wants real durability costs; tests do not).
    pub durable: bool,
    /// Replicas beside the primary: 0 = one PostgreSQL; N > 0 = a Patroni cluster of N + 1 members
    /// (kept in `<dir>/patroni`), the nodes getting its write and read URLs.
    pub replicas: u32,
    /// A PostgreSQL the user already has: the fleet starts none (`keep_database`, `durable` and
    /// `replicas` do not apply), and no exporter (it would need a monitoring role the database may not
    /// have). The nodes migrate it as the URL's role.
    pub database_url: Option<DatabaseUrl>,
    /// The networks nginx admits to the lab and operator endpoints (CIDR or single addresses); others
    /// get 403. Default: [`nginx::OPERATOR_NETWORKS`].
    pub operator_networks: Vec<String>,
    /// Proxies whose `X-Forwarded-For` nginx believes (see [`nginx::trusted_proxies_conf`]). Default: none.
    pub trusted_proxies: Vec<String>,
}

impl FleetOptions {
    /// The design's defaults: 4 nodes, pool 5, port 8080, Prometheus on.
    pub fn new(node_bin: PathBuf) -> Self {
        FleetOptions {
            node_bin,
            nodes: 4,
            pool_size: 5,
            port: 8080,
            dir: None,
            keep_database: false,
            node_env: Vec::new(),
            prometheus: true,
            quiet: false,
            durable: true,
            replicas: 0,
            database_url: None,
            operator_networks: nginx::OPERATOR_NETWORKS.iter().map(|n| n.to_string()).collect(),
            trusted_proxies: Vec::new(),
        }
    }
}

/// Refuses a fleet whose pools do not fit under PostgreSQL's `max_connections` with headroom.
pub fn check_capacity(nodes: u32, pool_size: u32) -> anyhow::Result<()> {
    ensure!(nodes >= 1, "a fleet needs at least 1 node");
    ensure!(pool_size >= 1, "the pool size must be at least 1");
    let wanted = u64::from(nodes) * u64::from(pool_size);
    let room = MAX_CONNECTIONS - ADMIN_HEADROOM;
    ensure!(
        wanted <= u64::from(room),
        "{nodes} nodes × pool {pool_size} = {wanted} connections, but PostgreSQL's max_connections is \
         {MAX_CONNECTIONS} with {ADMIN_HEADROOM} kept for admins: at most {room}; use fewer nodes or a smaller pool"
    );
    Ok(())
}

/// A running fleet. Its components drop in stop order: nginx, Prometheus, the exporter, the nodes, the
/// database; then the temp dir.
#[derive(Debug)]
pub struct Fleet {
    nginx: Nginx,
    prometheus: Option<Prometheus>,
    exporter: Option<Exporter>,
    nodes: Vec<Node>,
    db: Database,
    dir: PathBuf,
    /// What the user should know about how the fleet started (a database that could not be kept).
    warnings: Vec<String>,
    _temp_dir: Option<TempDir>,
}

impl Fleet {
    /// Starts the database, then the components in order: every node at once (each waited for until
    /// ready), the exporter and Prometheus, nginx; returns once every node answers through nginx.
    pub fn start(opts: FleetOptions) -> anyhow::Result<Fleet> {
        check_capacity(opts.nodes, opts.pool_size)?;
        for network in opts.operator_networks.iter().chain(&opts.trusted_proxies) {
            nginx::check_network(network).map_err(anyhow::Error::msg)?;
        }
        let (dir, temp_dir) = fleet_dir(opts.dir.as_deref())?;
        fresh_dir(&dir.join(LOGS), None)?;
        for sub in COMPONENT_DIRS {
            fresh_dir(&dir.join(sub), service_user()?.as_ref())?;
        }
        let log =
            |name: &str| Log { quiet: opts.quiet, file: Some(dir.join(LOGS).join(format!("{name}.log"))) };
        let mut warnings = Vec::new();
        let db = Database::start(&opts, &dir, &mut warnings)?;
        let nodes = start_nodes(&opts, &db, log)?;
        let monitoring = dir.join("prometheus");
        // PostgreSQL's exporter speaks to one server; a cluster's members are seen through their
        // Patroni's `/metrics` instead.
        let exporter = match &db {
            Database::Single(postgres) if opts.prometheus => Some(Exporter::start(ExporterOptions {
                postgres,
                dir: &monitoring,
                log: log("postgres-exporter"),
            })?),
            _ => None,
        };
        let prometheus = match opts.prometheus {
            true => Some(Prometheus::start(PrometheusOptions {
                dir: monitoring,
                targets: Targets {
                    nodes: &upstreams(&nodes),
                    exporter: exporter.as_ref().map(Exporter::address).as_deref(),
                    patroni: &patroni_targets(&db)?,
                },
                log: log("prometheus"),
            })?),
            false => None,
        };
        let nginx = Nginx::start(NginxOptions {
            dir: dir.join("nginx"),
            port: if opts.port == 0 { free_port()? } else { opts.port },
            upstreams: upstreams(&nodes),
            operator_networks: opts.operator_networks,
            trusted_proxies: opts.trusted_proxies,
            log: log("nginx"),
        })?;
        let mut fleet = Fleet { nginx, prometheus, exporter, nodes, db, dir, warnings, _temp_dir: temp_dir };
        fleet.wait_through_nginx()?;
        Ok(fleet)
    }

    /// nginx's address: `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.nginx.url()
    }

    /// Prometheus's address, if it runs.
    pub fn prometheus_url(&self) -> Option<String> {
        self.prometheus.as_ref().map(|prometheus| format!("http://{}", prometheus.address()))
    }

    /// PostgreSQL's exporter (its `/metrics`), if it runs (with Prometheus).
    pub fn exporter_url(&self) -> Option<String> {
        self.exporter.as_ref().map(|exporter| format!("http://{}", exporter.address()))
    }

    /// The application's database URL, password included: a secret, never to print (see
    /// [`Fleet::database_display_url`]).
    pub fn database_url(&self) -> String {
        self.db.url()
    }

    /// The application's database URL without its password.
    pub fn database_display_url(&self) -> String {
        self.db.display_url()
    }

    /// The database's directory: `<dir>/postgres` (or `<dir>/patroni`) when kept, else a temp dir.
    pub fn database_dir(&self) -> &Path {
        self.db.dir()
    }

    /// Where the database's passwords are (a libpq password file, mode 0600).
    pub fn password_file(&self) -> PathBuf {
        self.db.password_file()
    }

    /// Where every component's log is: `<dir>/logs/<name>.log`.
    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join(LOGS)
    }

    /// What the user should know about how the fleet started, one sentence each.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// The fleet's single PostgreSQL, or an error if it runs on a Patroni cluster.
    pub fn postgres(&mut self) -> anyhow::Result<&mut Postgres> {
        self.db.postgres()
    }

    /// The fleet's Patroni cluster, or an error if it runs on one PostgreSQL.
    pub fn cluster(&mut self) -> anyhow::Result<&mut PatroniCluster> {
        self.db.cluster()
    }

    pub fn database(&self) -> &Database {
        &self.db
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `n`, counting from 1 like `app-1`.
    pub fn node(&mut self, n: usize) -> &mut Node {
        &mut self.nodes[n - 1]
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The fleet's components in stop order, the reverse of their start order: nginx first (so no request
    /// reaches a node that is stopping), Prometheus, the exporter, the nodes (`app-1` first), the database.
    fn components(&mut self) -> Vec<&mut dyn Component> {
        let mut components: Vec<&mut dyn Component> = Vec::new();
        components.push(&mut self.nginx);
        components.extend(self.prometheus.as_mut().map(|c| c as &mut dyn Component));
        components.extend(self.exporter.as_mut().map(|c| c as &mut dyn Component));
        components.extend(self.nodes.iter_mut().map(|c| c as &mut dyn Component));
        components.push(self.db.component());
        components
    }

    /// Every component's processes' names and PIDs, in stop order: nginx (its master), Prometheus, the
    /// exporter, the nodes, the database (`postgres`; a cluster's every member's Patroni, then etcd).
    pub fn component_pids(&mut self) -> Vec<(String, u32)> {
        self.components().into_iter().flat_map(|c| c.pids()).collect()
    }

    /// The components' processes that have exited (`nginx`, `prometheus`, `app-2`, `postgres`, `pg-3` …).
    pub fn exited_components(&mut self) -> Vec<String> {
        self.components().into_iter().flat_map(|c| c.exited()).collect()
    }

    /// Stops the components in order (nginx, Prometheus, the exporter, the nodes: SIGINT, they finish
    /// in-flight requests; the database: a fast shutdown, so a kept database is consistent, or a cluster's
    /// every Patroni and postmaster, then etcd), and removes nginx's and Prometheus's files; the logs and
    /// a kept database stay.
    pub fn stop(mut self) -> anyhow::Result<()> {
        for component in self.components() {
            component.stop()?;
        }
        if self._temp_dir.is_none() {
            for sub in COMPONENT_DIRS {
                let path = self.dir.join(sub);
                if path.exists() {
                    fs::remove_dir_all(&path).with_context(|| format!("cannot remove {}", path.display()))?;
                }
            }
        }
        Ok(())
    }

    /// Fault injection: SIGKILL to node `n` (counting from 1), as if it crashed; waits until it has gone.
    /// Its in-flight requests fail; nginx skips it from then on. It stays dead.
    pub fn kill_node(&mut self, n: usize) -> anyhow::Result<()> {
        self.running_node(n)?.child().kill()
    }

    /// Stops node `n` (counting from 1) the way an orchestrator does: first out of nginx's round robin
    /// (config rewritten, nginx reloaded, and waited for until its new workers run), then SIGTERM; returns
    /// at once. The node drains (readiness 503 for `SHUTDOWN_DRAIN_MS`, then it turns new connections
    /// away and finishes what it has) and exits; [`Fleet::exited_components`] reports it then. Without
    /// the first step (a bare SIGTERM, as compose sends) nothing is lost either, but the requests nginx
    /// sends to the node once it turns connections away wait one connect timeout before going elsewhere.
    pub fn stop_node(&mut self, n: usize) -> anyhow::Result<()> {
        let name = self.running_node(n)?.container_id().to_owned();
        self.nginx.take_out_of_rotation(&name)?;
        let node = self.running_node(n)?;
        // An unreaped child keeps its PID, so this PID is still the node's even if it exited just now.
        let pid = Pid::from_raw(i32::try_from(node.pid()).context("PID out of range")?);
        signal::kill(pid, Signal::SIGTERM)
            .with_context(|| format!("cannot send SIGTERM to {}", node.container_id()))
    }

    /// Fault injection: restarts PostgreSQL (fast shutdown, which ends every session, then a start on the
    /// same port), resuming it first if it is paused. Returns once it accepts connections again.
    pub fn restart_db(&mut self) -> anyhow::Result<()> {
        let pg = self.db.postgres()?;
        pg.stop()?;
        pg.start_again()
    }

    /// Fault injection: freezes PostgreSQL's whole process tree for `duration` (see [`Postgres::pause`]),
    /// then thaws it; blocks all that time.
    pub fn pause_db(&mut self, duration: Duration) -> anyhow::Result<()> {
        let pg = self.db.postgres()?;
        pg.pause()?;
        std::thread::sleep(duration);
        pg.resume()
    }

    /// Node `n` (counting from 1), or an error naming the nodes there are or saying it has exited.
    fn running_node(&mut self, n: usize) -> anyhow::Result<&mut Node> {
        let count = self.nodes.len();
        ensure!((1..=count).contains(&n), "there is no node app-{n}: this fleet has app-1 … app-{count}");
        let node = &mut self.nodes[n - 1];
        ensure!(node.child().is_running(), "{} is not running (it has exited)", node.container_id());
        Ok(node)
    }

    /// Waits until every node answers `/app-N/health/ready` through nginx.
    fn wait_through_nginx(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        for i in 1..=self.nodes.len() {
            self.nginx.wait_for_path(&format!("/app-{i}/health/ready"), deadline)?;
        }
        Ok(())
    }
}

/// The fleet directory's subdirectory for logs.
const LOGS: &str = "logs";

/// The fleet directory's subdirectories for nginx's and Prometheus's (and the exporter's) files: emptied
/// on start and the service user's, removed on stop.
const COMPONENT_DIRS: [&str; 2] = ["nginx", "prometheus"];

/// Launches every node at once (`app-1` …, their output going to `log(name)`), then waits until each is
/// ready.
fn start_nodes(opts: &FleetOptions, db: &Database, log: impl Fn(&str) -> Log) -> anyhow::Result<Vec<Node>> {
    let read_url = db.read_url().map(|url| ("DATABASE_READ_URL".to_owned(), url.into()));
    let mut nodes = (1..=opts.nodes)
        .map(|i| {
            let name = format!("app-{i}");
            let log = log(&name);
            Node::launch(NodeOptions {
                bin: opts.node_bin.clone(),
                container_id: name,
                database_url: db.url().into(),
                pool_size: opts.pool_size,
                port: 0,
                env: [
                    ("SHUTDOWN_DRAIN_MS".to_owned(), NODE_DRAIN_MS.into()),
                    ("HTTP_WORKERS".to_owned(), http_workers(opts.nodes).to_string().into()),
                ]
                .into_iter()
                .chain(read_url.clone())
                .chain(opts.node_env.iter().map(|(name, value)| (name.clone(), value.as_str().into())))
                .collect(),
                quiet: log.quiet,
                log_file: log.file,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for node in &mut nodes {
        node.wait_ready()?;
    }
    Ok(nodes)
}

/// The nodes as nginx and Prometheus see them.
fn upstreams(nodes: &[Node]) -> Vec<Upstream> {
    nodes.iter().map(|n| Upstream { name: n.container_id().to_owned(), address: n.address() }).collect()
}

/// Every Patroni's REST API, for Prometheus to scrape; none for a single PostgreSQL.
fn patroni_targets(db: &Database) -> anyhow::Result<Vec<Upstream>> {
    let Database::Cluster(cluster) = db else {
        return Ok(Vec::new());
    };
    let member = |name: String| {
        let address = cluster.api_url(&name)?.trim_start_matches("http://").to_owned();
        Ok(Upstream { name, address })
    };
    cluster.member_names().into_iter().map(member).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_that_does_not_fit_under_max_connections_is_refused_naming_the_numbers() {
        assert!(check_capacity(4, 5).is_ok());
        assert!(check_capacity(18, 5).is_ok());
        let err = check_capacity(10, 10).unwrap_err().to_string();
        assert!(err.contains("10 nodes × pool 10 = 100"), "{err}");
        assert!(err.contains("at most 90"), "{err}");
        assert!(check_capacity(0, 5).is_err());
    }
}
