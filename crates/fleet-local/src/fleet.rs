//! A whole local fleet: a private PostgreSQL (or a Patroni cluster of a primary and N replicas), N
//! `fleet-app` nodes, nginx in front and Prometheus scraping every node (and every Patroni) directly, all
//! on loopback, all stopped in order by [`Fleet::stop`] or on drop.
//! Its fault methods break it on purpose, as a crash or an operator would: [`Fleet::kill_node`],
//! [`Fleet::stop_node`], [`Fleet::restart_db`], [`Fleet::pause_db`].
//!
//! Layout of the fleet directory (private: see [`prepare_dir`]): `logs/<component>.log` (every child's
//! output, started afresh by each start), `postgres/` or `patroni/` (the database, when kept), `nginx/` and
//! `prometheus/` (configs and data, removed on stop).

use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};

mod database;
pub use database::Database;
use nix::sys::signal::{self, Signal};
use nix::unistd::{Pid, User};
use tempfile::TempDir;

use crate::files::{fresh_dir, write_new};
use crate::nginx::{self, Upstream};
use crate::postgres::{check_reachable, postgres_user};
use crate::users::{run_as, service_user};
use crate::{
    exporter, free_port, nginx_bin, proctree, prometheus, prometheus_bin, Child, Node, NodeOptions,
    PatroniCluster, PatroniOptions, Postgres, PostgresOptions, DEADLOCK_TIMEOUT,
};

/// Connections kept free for admins, migrations and the isolation lab's dedicated connections.
pub const ADMIN_HEADROOM: u32 = 10;
/// PostgreSQL's `max_connections` in a local fleet (the seed's setting).
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

/// How long nginx may take to start new workers after a reload.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a node gets to drain on SIGTERM before it is killed.
const NODE_GRACE: Duration = Duration::from_secs(35);

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

/// A running fleet. Fields drop in order: nginx, Prometheus, the exporter, nodes, then the database and
/// the temp dir.
#[derive(Debug)]
pub struct Fleet {
    nginx: Child,
    prometheus: Option<(Child, u16)>,
    exporter: Option<(Child, u16)>,
    nodes: Vec<Node>,
    db: Database,
    dir: PathBuf,
    port: u16,
    upstreams: Vec<Upstream>,
    /// Who nginx admits to the lab and operator endpoints, and which proxies it believes about the client.
    operator_networks: Vec<String>,
    trusted_proxies: Vec<String>,
    /// Nodes taken out of nginx's round robin (before they were stopped).
    out_of_rotation: Vec<String>,
    /// What the user should know about how the fleet started (a database that could not be kept).
    warnings: Vec<String>,
    /// Who nginx, Prometheus, the exporter and the nodes run as (see [`crate::users`]).
    service_user: Option<User>,
    _temp_dir: Option<TempDir>,
}

impl Fleet {
    /// Starts the database, launches every node at once, waits until each is ready, starts nginx and
    /// Prometheus, and returns once every node answers through nginx.
    pub fn start(opts: FleetOptions) -> anyhow::Result<Fleet> {
        check_capacity(opts.nodes, opts.pool_size)?;
        for network in opts.operator_networks.iter().chain(&opts.trusted_proxies) {
            nginx::check_network(network).map_err(anyhow::Error::msg)?;
        }
        let keep_database = opts.keep_database && opts.dir.is_some();
        let (dir, temp_dir) = match &opts.dir {
            Some(dir) => (prepare_dir(dir)?, None),
            None => {
                let temp = tempfile::Builder::new().prefix("pgfleet-").tempdir()?;
                (temp.path().to_owned(), Some(temp))
            }
        };
        let logs = dir.join(LOGS);
        fresh_dir(&logs, None)?;
        let service_user = service_user()?;
        let mut warnings = Vec::new();
        let kept_dir = dir.join(if opts.replicas > 0 { "patroni" } else { "postgres" });
        let database_dir = match (keep_database, postgres_user()?) {
            (false, _) => None,
            (true, None) => Some(kept_dir),
            (true, Some(user)) => match check_reachable(&kept_dir, &user) {
                Ok(()) => Some(kept_dir),
                Err(why) => {
                    warnings.push(format!("the database is not kept, it goes when the fleet stops: {why:#}"));
                    None
                }
            },
        };
        let db = match opts.replicas {
            0 => Database::Single(Postgres::start(PostgresOptions {
                dir: database_dir,
                max_connections: MAX_CONNECTIONS,
                durable: opts.durable,
                log_file: Some(logs.join("postgres.log")),
                ..PostgresOptions::default()
            })?),
            replicas => Database::Cluster(PatroniCluster::start(PatroniOptions {
                dir: database_dir,
                members: replicas as usize + 1,
                max_connections: MAX_CONNECTIONS,
                durable: opts.durable,
                parameters: vec![("deadlock_timeout".to_owned(), DEADLOCK_TIMEOUT.to_owned())],
                quiet: opts.quiet,
                logs: Some(logs.clone()),
            })?),
        };
        let read_url = db.read_url().map(|url| ("DATABASE_READ_URL".to_owned(), url));
        let mut nodes = (1..=opts.nodes)
            .map(|i| {
                Node::launch(NodeOptions {
                    bin: opts.node_bin.clone(),
                    container_id: format!("app-{i}"),
                    database_url: db.url(),
                    pool_size: opts.pool_size,
                    port: 0,
                    env: [
                        ("SHUTDOWN_DRAIN_MS".to_owned(), NODE_DRAIN_MS.to_owned()),
                        ("HTTP_WORKERS".to_owned(), http_workers(opts.nodes).to_string()),
                    ]
                    .into_iter()
                    .chain(read_url.clone())
                    .chain(opts.node_env.iter().cloned())
                    .collect(),
                    quiet: opts.quiet,
                    log_file: Some(logs.join(format!("app-{i}.log"))),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        for node in &mut nodes {
            node.wait_ready()?;
        }
        let upstreams: Vec<Upstream> = nodes
            .iter()
            .map(|n| Upstream {
                name: n.container_id().to_owned(),
                address: format!("127.0.0.1:{}", n.port()),
            })
            .collect();
        let port = if opts.port == 0 { free_port()? } else { opts.port };
        let site = Site {
            port,
            upstreams: &upstreams,
            operator_networks: &opts.operator_networks,
            trusted_proxies: &opts.trusted_proxies,
        };
        let nginx = start_nginx(&dir.join("nginx"), service_user.as_ref(), &site, &logs, opts.quiet)?;
        let (prometheus, exporter) = match opts.prometheus {
            true => {
                let prometheus_dir = dir.join("prometheus");
                fresh_dir(&prometheus_dir, service_user.as_ref())?;
                // PostgreSQL's exporter speaks to one server; a cluster's members are seen through
                // their Patroni's `/metrics` instead.
                let exporter = match &db {
                    Database::Single(pg) => Some(exporter::start(pg, &prometheus_dir, &logs, opts.quiet)?),
                    Database::Cluster(_) => None,
                };
                let exporter_address = exporter.as_ref().map(|(_, port)| format!("127.0.0.1:{port}"));
                let patroni = match &db {
                    Database::Single(_) => Vec::new(),
                    Database::Cluster(cluster) => cluster
                        .member_names()
                        .into_iter()
                        .map(|name| {
                            let address = cluster.api_url(&name)?.trim_start_matches("http://").to_owned();
                            Ok(Upstream { name, address })
                        })
                        .collect::<anyhow::Result<_>>()?,
                };
                let targets = prometheus::Targets {
                    nodes: &upstreams,
                    exporter: exporter_address.as_deref(),
                    patroni: &patroni,
                };
                let prometheus =
                    start_prometheus(&prometheus_dir, service_user.as_ref(), &targets, &logs, opts.quiet)?;
                (Some(prometheus), exporter)
            }
            false => (None, None),
        };
        let mut fleet = Fleet {
            nginx,
            prometheus,
            exporter,
            nodes,
            db,
            dir,
            port,
            upstreams,
            operator_networks: opts.operator_networks,
            trusted_proxies: opts.trusted_proxies,
            out_of_rotation: Vec::new(),
            warnings,
            service_user,
            _temp_dir: temp_dir,
        };
        fleet.wait_through_nginx()?;
        Ok(fleet)
    }

    /// nginx's address: `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Prometheus's address, if it runs.
    pub fn prometheus_url(&self) -> Option<String> {
        self.prometheus.as_ref().map(|(_, port)| format!("http://127.0.0.1:{port}"))
    }

    /// PostgreSQL's exporter (its `/metrics`), if it runs (with Prometheus).
    pub fn exporter_url(&self) -> Option<String> {
        self.exporter.as_ref().map(|(_, port)| format!("http://127.0.0.1:{port}"))
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

    /// Every component's name and PID: nginx (its master), Prometheus, the exporter, the nodes.
    pub fn component_pids(&self) -> Vec<(String, u32)> {
        let others = std::iter::once(&self.nginx)
            .chain(self.prometheus.as_ref().map(|(c, _)| c))
            .chain(self.exporter.as_ref().map(|(c, _)| c));
        let nodes = self.nodes.iter().map(|n| (n.container_id().to_owned(), n.pid()));
        others.map(|c| (c.name().to_owned(), c.pid())).chain(nodes).collect()
    }

    /// The components that have exited (`app-2`, `nginx`, `prometheus`, `postgres-exporter`).
    pub fn exited_components(&mut self) -> Vec<String> {
        let nodes = self.nodes.iter_mut().map(Node::child);
        let others = std::iter::once(&mut self.nginx)
            .chain(self.prometheus.as_mut().map(|(c, _)| c))
            .chain(self.exporter.as_mut().map(|(c, _)| c));
        nodes
            .chain(others)
            .filter_map(|child| (!child.is_running()).then(|| child.name().to_owned()))
            .collect()
    }

    /// Stops nginx, Prometheus, the exporter, the nodes (SIGINT: they finish in-flight requests), then
    /// the database (a fast shutdown: a kept database is consistent; a cluster's every Patroni and
    /// postmaster, then etcd), and removes nginx's and Prometheus's
    /// files; the logs and a kept database stay.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.nginx.terminate(Duration::from_secs(5))?;
        if let Some((prometheus, _)) = &mut self.prometheus {
            prometheus.terminate(Duration::from_secs(10))?;
        }
        if let Some((exporter, _)) = &mut self.exporter {
            exporter.terminate(Duration::from_secs(5))?;
        }
        // nginx is gone, so no drain delay is needed: SIGINT stops a node at once, after in-flight requests.
        for node in &mut self.nodes {
            let status = node.child().stop(nix::sys::signal::Signal::SIGINT, NODE_GRACE)?;
            if !status.success() && status.code().is_some() {
                tracing::warn!(node = node.container_id(), %status, "node exited with an error");
            }
        }
        self.db.stop()?;
        if self._temp_dir.is_none() {
            for sub in ["nginx", "prometheus"] {
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
        self.take_out_of_rotation(&name)?;
        let node = self.running_node(n)?;
        // An unreaped child keeps its PID, so this PID is still the node's even if it exited just now.
        let pid = Pid::from_raw(i32::try_from(node.pid()).context("PID out of range")?);
        signal::kill(pid, Signal::SIGTERM)
            .with_context(|| format!("cannot send SIGTERM to {}", node.container_id()))
    }

    /// Marks `name` down in nginx's round robin and reloads nginx; returns once the new workers run, so
    /// no new request is sent to that node (its pinned route `/app-N/` stays).
    fn take_out_of_rotation(&mut self, name: &str) -> anyhow::Result<()> {
        self.out_of_rotation.push(name.to_owned());
        let dir = self.dir.join("nginx");
        let site = Site {
            port: self.port,
            upstreams: &self.upstreams,
            operator_networks: &self.operator_networks,
            trusted_proxies: &self.trusted_proxies,
        };
        write_nginx_config(&dir, self.service_user.as_ref(), &site, &self.out_of_rotation)?;
        let master = Pid::from_raw(i32::try_from(self.nginx.pid()).context("PID out of range")?);
        let old_workers = proctree::descendants(master)?;
        signal::kill(master, Signal::SIGHUP).context("cannot ask nginx to reload")?;
        let deadline = Instant::now() + RELOAD_TIMEOUT;
        while proctree::descendants(master)?.iter().all(|pid| old_workers.contains(pid)) {
            ensure!(
                self.nginx.is_running() && Instant::now() < deadline,
                "nginx did not start new workers after a reload; its last output:\n{}",
                self.nginx.recent_output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
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
            self.nginx.wait_for_http(&format!("{}/app-{i}/health/ready", self.url()), deadline)?;
        }
        Ok(())
    }
}

/// The fleet directory's subdirectory for logs.
const LOGS: &str = "logs";

/// Makes `dir` the fleet's private directory and returns its canonical path: a symbolic link is refused
/// (before anything is changed); created mode 0700 if missing; an existing one must be owned by us and
/// writable by nobody else (a directory another user could write to could be swapped under us) and is
/// then closed to others (0700). When we are root, the `postgres` user must reach `dir/postgres` and
/// the service user `dir/nginx` and `dir/prometheus`: others may enter (0711), but list nothing, and
/// every entry is private to its owner.
pub fn prepare_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    ensure!(
        !fs::symlink_metadata(dir).is_ok_and(|meta| meta.file_type().is_symlink()),
        "refusing the fleet directory {}: it is a symbolic link; name the directory itself",
        dir.display()
    );
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let dir = dir.canonicalize().with_context(|| format!("cannot resolve {}", dir.display()))?;
    let meta = fs::metadata(&dir).with_context(|| format!("cannot inspect {}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    ensure!(meta.is_dir(), "{} is not a directory", dir.display());
    ensure!(
        meta.uid() == me,
        "refusing the fleet directory {}: it belongs to user {}, not to us (user {me}); use a directory of our own",
        dir.display(),
        meta.uid()
    );
    ensure!(
        meta.mode() & 0o022 == 0,
        "refusing the fleet directory {}: others can write to it (mode {:o}); use a private directory          (or `chmod go-w {}`)",
        dir.display(),
        meta.mode() & 0o7777,
        dir.display()
    );
    fs::set_permissions(&dir, fs::Permissions::from_mode(fleet_dir_mode()))
        .with_context(|| format!("cannot make {} private", dir.display()))?;
    Ok(dir)
}

/// The fleet directory's mode (see [`prepare_dir`]): 0711 when we are root, else 0700.
fn fleet_dir_mode() -> u32 {
    if nix::unistd::geteuid().is_root() {
        0o711
    } else {
        0o700
    }
}

/// Where nginx listens and what it serves.
struct Site<'a> {
    port: u16,
    upstreams: &'a [Upstream],
    operator_networks: &'a [String],
    trusted_proxies: &'a [String],
}

/// Writes `dir/nginx.conf` (readable by `user`, who runs nginx) for `site`, with the nodes named in
/// `out_of_rotation` out of the round robin; returns its path.
fn write_nginx_config(
    dir: &Path,
    user: Option<&User>,
    site: &Site<'_>,
    out_of_rotation: &[String],
) -> anyhow::Result<PathBuf> {
    let conf = dir.join("nginx.conf");
    let listen = format!("127.0.0.1:{}", site.port);
    let text = nginx::local_config(
        dir,
        &listen,
        site.upstreams,
        out_of_rotation,
        site.operator_networks,
        site.trusted_proxies,
    );
    write_new(&conf, text.as_bytes(), 0o600, user)?;
    Ok(conf)
}

/// Starts nginx as `user` with its config, pid file and temp files in `dir` (emptied first, `user`'s).
fn start_nginx(
    dir: &Path,
    user: Option<&User>,
    site: &Site<'_>,
    logs: &Path,
    quiet: bool,
) -> anyhow::Result<Child> {
    fresh_dir(dir, user)?;
    let conf = write_nginx_config(dir, user, site, &[])?;
    let mut cmd = Command::new(nginx_bin()?);
    cmd.arg("-c").arg(&conf).arg("-p").arg(dir);
    run_as(&mut cmd, user);
    let mut child = Child::spawn_logged("nginx", cmd, quiet, &logs.join("nginx.log"))?;
    let health = format!("http://127.0.0.1:{}/nginx-health", site.port);
    child.wait_for_http(&health, Instant::now() + READY_TIMEOUT)?;
    Ok(child)
}

/// Starts Prometheus as `user` with its config and data in `dir` (`user`'s).
fn start_prometheus(
    dir: &Path,
    user: Option<&User>,
    targets: &prometheus::Targets<'_>,
    logs: &Path,
    quiet: bool,
) -> anyhow::Result<(Child, u16)> {
    let conf = dir.join("prometheus.yml");
    let port = free_port()?;
    let text = prometheus::config(targets, "1s", &[], &format!("127.0.0.1:{port}"));
    write_new(&conf, text.as_bytes(), 0o600, user)?;
    let mut cmd = Command::new(prometheus_bin("prometheus")?);
    cmd.arg(format!("--config.file={}", conf.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    run_as(&mut cmd, user);
    let mut child = Child::spawn_logged("prometheus", cmd, quiet, &logs.join("prometheus.log"))?;
    child.wait_for_http(&format!("http://127.0.0.1:{port}/-/ready"), Instant::now() + READY_TIMEOUT)?;
    Ok((child, port))
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

    #[test]
    fn a_new_fleet_directory_is_private() {
        let parent = tempfile::tempdir().unwrap();
        let dir = prepare_dir(&parent.path().join("a/.fleet")).unwrap();
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, fleet_dir_mode());
    }

    #[test]
    fn a_fleet_directory_others_can_write_to_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o777, 0o1777, 0o770] {
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).unwrap();
            let error = prepare_dir(dir.path()).unwrap_err().to_string();
            assert!(error.contains("others can write to it"), "{mode:o}: {error}");
        }
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        prepare_dir(dir.path()).unwrap();
        assert_eq!(
            fs::metadata(dir.path()).unwrap().mode() & 0o777,
            fleet_dir_mode(),
            "an open one is closed"
        );
    }

    #[test]
    fn a_fleet_directory_given_as_a_link_is_refused_and_its_target_left_alone() {
        let temp = tempfile::tempdir().unwrap();
        let target = temp.path().join("target");
        fs::DirBuilder::new().mode(0o755).create(&target).unwrap();
        std::os::unix::fs::symlink(&target, temp.path().join("fleet")).unwrap();
        let error = prepare_dir(&temp.path().join("fleet")).unwrap_err().to_string();
        assert!(error.contains("symbolic link"), "{error}");
        assert_eq!(fs::metadata(&target).unwrap().mode() & 0o777, 0o755);
    }

    #[test]
    fn a_fleet_directory_owned_by_another_user_is_refused() {
        let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("a `nobody` user");
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: only root can hand a directory to another user");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(nobody.uid.as_raw()), None).unwrap();
        let error = prepare_dir(dir.path()).unwrap_err().to_string();
        assert!(error.contains("belongs to user"), "{error}");
    }
}
