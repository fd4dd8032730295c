//! A whole local fleet: a private PostgreSQL, N `fleet-app` nodes, nginx in front and Prometheus
//! scraping every node directly, all on loopback, all stopped in order by [`Fleet::stop`] or on drop.
//! Its fault methods break it on purpose, as a crash or an operator would: [`Fleet::kill_node`],
//! [`Fleet::stop_node`], [`Fleet::restart_db`], [`Fleet::pause_db`].

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::nginx::{self, Upstream};
use crate::{
    free_port, nginx_bin, proctree, prometheus, prometheus_bin, Child, Node, NodeOptions, Postgres,
    PostgresOptions,
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
    /// Where configs and logs go; `None` = a temp dir. Whatever the fleet writes there is removed on stop.
    pub dir: Option<PathBuf>,
    /// More environment for every node (e.g. `SHUTDOWN_DRAIN_MS`).
    pub node_env: Vec<(String, String)>,
    /// Start Prometheus too.
    pub prometheus: bool,
    /// Keep children's output off our stderr (it is still quoted in errors).
    pub quiet: bool,
    /// fsync on (a fleet for benchmarks wants real durability costs; tests do not).
    pub durable: bool,
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
            node_env: Vec::new(),
            prometheus: true,
            quiet: false,
            durable: true,
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

/// A running fleet. Fields drop in order: nginx, Prometheus, nodes, then PostgreSQL and the temp dir.
#[derive(Debug)]
pub struct Fleet {
    nginx: Child,
    prometheus: Option<(Child, u16)>,
    nodes: Vec<Node>,
    pg: Postgres,
    dir: PathBuf,
    port: u16,
    upstreams: Vec<Upstream>,
    /// Nodes taken out of nginx's round robin (before they were stopped).
    out_of_rotation: Vec<String>,
    _temp_dir: Option<TempDir>,
}

impl Fleet {
    /// Starts PostgreSQL, launches every node at once, waits until each is ready, starts nginx and
    /// Prometheus, and returns once every node answers through nginx.
    pub fn start(opts: FleetOptions) -> anyhow::Result<Fleet> {
        check_capacity(opts.nodes, opts.pool_size)?;
        let (dir, temp_dir) = match &opts.dir {
            Some(dir) => {
                fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
                (dir.canonicalize()?, None)
            }
            None => {
                let temp = tempfile::Builder::new().prefix("pgfleet-").tempdir()?;
                (temp.path().to_owned(), Some(temp))
            }
        };
        let pg = Postgres::start(PostgresOptions {
            max_connections: MAX_CONNECTIONS,
            durable: opts.durable,
            ..PostgresOptions::default()
        })?;
        let mut nodes = (1..=opts.nodes)
            .map(|i| {
                Node::launch(NodeOptions {
                    bin: opts.node_bin.clone(),
                    container_id: format!("app-{i}"),
                    database_url: pg.url(),
                    pool_size: opts.pool_size,
                    port: 0,
                    env: [("SHUTDOWN_DRAIN_MS".to_owned(), NODE_DRAIN_MS.to_owned())]
                        .into_iter()
                        .chain(opts.node_env.iter().cloned())
                        .collect(),
                    quiet: opts.quiet,
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
        let nginx = start_nginx(&dir.join("nginx"), port, &upstreams, opts.quiet)?;
        let prometheus = match opts.prometheus {
            true => Some(start_prometheus(&dir.join("prometheus"), &upstreams, opts.quiet)?),
            false => None,
        };
        let mut fleet = Fleet {
            nginx,
            prometheus,
            nodes,
            pg,
            dir,
            port,
            upstreams,
            out_of_rotation: Vec::new(),
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

    /// The application's database URL.
    pub fn database_url(&self) -> String {
        self.pg.url()
    }

    pub fn postgres(&mut self) -> &mut Postgres {
        &mut self.pg
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

    /// The components that have exited (`app-2`, `nginx`, `prometheus`).
    pub fn exited_components(&mut self) -> Vec<String> {
        let nodes = self.nodes.iter_mut().map(Node::child);
        let others = std::iter::once(&mut self.nginx).chain(self.prometheus.as_mut().map(|(c, _)| c));
        nodes
            .chain(others)
            .filter_map(|child| (!child.is_running()).then(|| child.name().to_owned()))
            .collect()
    }

    /// Stops nginx, Prometheus, the nodes (SIGTERM: they drain), then PostgreSQL, and removes what the fleet wrote.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.nginx.terminate(Duration::from_secs(5))?;
        if let Some((prometheus, _)) = &mut self.prometheus {
            prometheus.terminate(Duration::from_secs(10))?;
        }
        // nginx is gone, so no drain delay is needed: SIGINT stops a node at once, after in-flight requests.
        for node in &mut self.nodes {
            let status = node.child().stop(nix::sys::signal::Signal::SIGINT, NODE_GRACE)?;
            if !status.success() && status.code().is_some() {
                tracing::warn!(node = node.container_id(), %status, "node exited with an error");
            }
        }
        self.pg.stop()?;
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
    /// at once. The node drains (readiness 503 for `SHUTDOWN_DRAIN_MS`, then it stops accepting and
    /// finishes what it has) and exits; [`Fleet::exited_components`] reports it then. Without the first
    /// step, requests that nginx sends on a connection the node accepted just as it closed its listener
    /// would fail, and nginx never resends a POST.
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
        write_nginx_config(&dir, self.port, &self.upstreams, &self.out_of_rotation)?;
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
        self.pg.stop()?;
        self.pg.start_again()
    }

    /// Fault injection: freezes PostgreSQL's whole process tree for `duration` (see [`Postgres::pause`]),
    /// then thaws it; blocks all that time.
    pub fn pause_db(&mut self, duration: Duration) -> anyhow::Result<()> {
        self.pg.pause()?;
        std::thread::sleep(duration);
        self.pg.resume()
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

/// Writes `dir/nginx.conf` for a fleet on `port`; returns its path.
fn write_nginx_config(
    dir: &Path,
    port: u16,
    upstreams: &[Upstream],
    out_of_rotation: &[String],
) -> anyhow::Result<PathBuf> {
    let conf = dir.join("nginx.conf");
    let text = nginx::local_config(dir, &format!("127.0.0.1:{port}"), upstreams, out_of_rotation);
    fs::write(&conf, text).with_context(|| format!("cannot write {}", conf.display()))?;
    Ok(conf)
}

fn start_nginx(dir: &Path, port: u16, upstreams: &[Upstream], quiet: bool) -> anyhow::Result<Child> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let conf = write_nginx_config(dir, port, upstreams, &[])?;
    let mut cmd = Command::new(nginx_bin()?);
    cmd.arg("-c").arg(&conf).arg("-p").arg(dir);
    let mut child = Child::spawn("nginx", cmd, quiet)?;
    child.wait_for_http(&format!("http://127.0.0.1:{port}/nginx-health"), Instant::now() + READY_TIMEOUT)?;
    Ok(child)
}

fn start_prometheus(dir: &Path, upstreams: &[Upstream], quiet: bool) -> anyhow::Result<(Child, u16)> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let conf = dir.join("prometheus.yml");
    let port = free_port()?;
    fs::write(&conf, prometheus::config(upstreams, "1s", &[], &format!("127.0.0.1:{port}")))?;
    let mut cmd = Command::new(prometheus_bin("prometheus")?);
    cmd.arg(format!("--config.file={}", conf.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let mut child = Child::spawn("prometheus", cmd, quiet)?;
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
}
