//! The compose stack on this machine's Docker engine, for the container tests: one compose project per
//! test (its own containers, networks and volumes, random secrets, nginx and Prometheus on free loopback
//! ports), brought up from the repository's docker-compose.yml and Dockerfiles, and taken down with its
//! volumes when dropped, even when the test fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The secrets docker-compose.yml reads, every profile's.
pub const SECRETS: [&str; 6] = [
    "POSTGRES_SUPERUSER_PASSWORD",
    "APP_DB_PASSWORD",
    "REPLICATION_PASSWORD",
    "PATRONI_API_PASSWORD",
    "ETCD_ROOT_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD",
];

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// The compose command this machine has: `docker compose` (v2) or `docker-compose` (v1). None when no
/// Docker engine answers: the container tests then fail under CI, and say they did not run elsewhere.
pub fn compose_program() -> Option<Vec<String>> {
    static PROGRAM: OnceLock<Option<Vec<String>>> = OnceLock::new();
    PROGRAM
        .get_or_init(|| {
            let ok = |program: &str, args: &[&str]| {
                Command::new(program).args(args).output().is_ok_and(|o| o.status.success())
            };
            if !ok("docker", &["info"]) {
                return None;
            }
            if ok("docker", &["compose", "version"]) {
                Some(vec!["docker".into(), "compose".into()])
            } else if ok("docker-compose", &["version"]) {
                Some(vec!["docker-compose".into()])
            } else {
                None
            }
        })
        .clone()
}

/// The Docker engine and compose, or why a container test cannot run: a panic under CI (`CI` set), a
/// note on stderr elsewhere.
pub fn engine_or_skip(test: &str) -> bool {
    if compose_program().is_some() {
        return true;
    }
    let why = "no Docker engine with compose answers (`docker info`, `docker compose version`)";
    assert!(std::env::var_os("CI").is_none(), "{test}: {why}");
    eprintln!("{test}: NOT RUN: {why}");
    false
}

/// One container test at a time: each runs a whole stack on a 2-core machine, and faults on one must
/// not be measured on another.
pub async fn one_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Builds every image of the stack once per test run, from the base images the Dockerfiles start
/// from (made by scripts/docker-base-images where the engine cannot pull them).
pub fn build_images() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let started = Instant::now();
        let base = Command::new(repo().join("scripts/docker-base-images")).status();
        if !base.is_ok_and(|s| s.success()) {
            return Err("scripts/docker-base-images failed".into());
        }
        let stack = Stack::new("build");
        let out = stack.compose(&["--profile", "ha", "build"]).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("compose build: {}", tail(&out)));
        }
        eprintln!("images built in {:.0} s", started.elapsed().as_secs_f64());
        Ok(())
    });
    if let Err(e) = built {
        panic!("{e}");
    }
}

/// A compose project of the repository's docker-compose.yml.
#[derive(Debug)]
pub struct Stack {
    pub project: String,
    secrets: Vec<(String, String)>,
    pub http_port: u16,
    pub ha_http_port: u16,
    pub prometheus_port: u16,
    env_file: tempfile::NamedTempFile,
}

impl Stack {
    /// A project `pgfleet-test-<name>-<pid>` with random secrets and free ports; nothing runs yet.
    pub fn new(name: &str) -> Stack {
        let port = || fleet_local::free_port().expect("a free port");
        Stack {
            project: format!("pgfleet-test-{name}-{}", std::process::id()),
            secrets: SECRETS.iter().map(|s| (s.to_string(), random_hex())).collect(),
            http_port: port(),
            ha_http_port: port(),
            prometheus_port: port(),
            // Empty: a developer's .env beside docker-compose.yml must not leak into the tests.
            env_file: tempfile::NamedTempFile::new().expect("an empty env file"),
        }
    }

    /// The secrets, without `name` (to see what compose does when one is missing).
    pub fn without_secret(mut self, name: &str) -> Stack {
        self.secrets.retain(|(n, _)| n != name);
        self
    }

    /// `compose -p <project> -f docker-compose.yml <args>`, with this stack's secrets and ports only.
    pub fn compose(&self, args: &[&str]) -> Command {
        let program = compose_program().expect("a Docker engine with compose");
        let mut cmd = Command::new(&program[0]);
        cmd.args(&program[1..])
            .arg("--env-file")
            .arg(self.env_file.path())
            .args(["-p", &self.project, "-f"])
            .arg(repo().join("docker-compose.yml"))
            .args(args)
            .current_dir(repo());
        for name in SECRETS {
            cmd.env_remove(name);
        }
        cmd.envs(self.secrets.iter().map(|(k, v)| (k, v)));
        cmd.env("FLEET_HTTP_PORT", self.http_port.to_string())
            .env("FLEET_HA_HTTP_PORT", self.ha_http_port.to_string())
            .env("PROMETHEUS_PORT", self.prometheus_port.to_string());
        cmd
    }

    /// Runs `compose <args>`, failing with its output unless it succeeds; returns its standard output.
    pub fn run(&self, args: &[&str]) -> String {
        let out = self.compose(args).output().expect("run compose");
        assert!(out.status.success(), "compose {args:?} failed: {}", tail(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `up -d` of `services` (and what they depend on) with `profiles`, then waits until every container
    /// of the project is healthy; returns how long that took.
    pub fn up(&self, profiles: &[&str], services: &[&str]) -> Duration {
        let started = Instant::now();
        let mut args: Vec<&str> = profiles.iter().flat_map(|p| ["--profile", p]).collect();
        args.extend(["up", "-d", "--no-build"]);
        args.extend(services);
        self.run(&args);
        self.wait_healthy(Duration::from_secs(300)).unwrap_or_else(|e| panic!("{e:#}"));
        started.elapsed()
    }

    /// Waits until every container of the project reports healthy; fails naming any that exited, with
    /// the end of its log.
    pub fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let containers = self.containers();
            let exited = containers.iter().find(|(_, status)| status.starts_with("Exited"));
            if let Some((name, status)) = exited {
                bail!("{name} {status}:\n{}", self.logs(name));
            }
            if !containers.is_empty() && containers.iter().all(|(_, status)| status.contains("(healthy)")) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not healthy after {timeout:?}: {containers:?}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Every container of the project (running or not): name and `docker ps` status.
    pub fn containers(&self) -> Vec<(String, String)> {
        let filter = format!("label=com.docker.compose.project={}", self.project);
        let out = docker(&["ps", "-a", "--filter", &filter, "--format", "{{.Names}}\t{{.Status}}"]);
        out.lines().filter_map(|l| l.split_once('\t')).map(|(n, s)| (n.to_owned(), s.to_owned())).collect()
    }

    /// The container of `service` (its first, when scaled).
    pub fn container(&self, service: &str) -> String {
        self.containers_of(service).into_iter().next().unwrap_or_else(|| panic!("no container of {service}"))
    }

    /// Every container of `service`, oldest first.
    pub fn containers_of(&self, service: &str) -> Vec<String> {
        let project = format!("label=com.docker.compose.project={}", self.project);
        let service = format!("label=com.docker.compose.service={service}");
        let out = docker(&["ps", "-a", "--filter", &project, "--filter", &service, "--format", "{{.Names}}"]);
        let mut names: Vec<String> = out.lines().map(str::to_owned).collect();
        names.reverse();
        names
    }

    /// The last lines of a container's log.
    pub fn logs(&self, container: &str) -> String {
        let out = Command::new("docker").args(["logs", "--tail", "40", container]).output();
        out.map(|o| tail(&o)).unwrap_or_default()
    }

    /// nginx's published address: `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The `ha` profile's nginx.
    pub fn ha_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ha_http_port)
    }

    /// Prometheus, on loopback.
    pub fn prometheus_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.prometheus_port)
    }

    /// Patroni's members as `via` (a member's service) sees them: (name, role, state).
    pub fn patroni_members(&self, via: &str) -> Vec<Member> {
        let out = Command::new("docker")
            .args([
                "exec",
                &self.container(via),
                "curl",
                "-fsS",
                "--max-time",
                "3",
                "http://127.0.0.1:8008/cluster",
            ])
            .output();
        let cluster: serde_json::Value =
            out.ok().and_then(|o| serde_json::from_slice(&o.stdout).ok()).unwrap_or_default();
        let members = cluster["members"].as_array().cloned().unwrap_or_default();
        let field = |m: &serde_json::Value, f: &str| m[f].as_str().unwrap_or_default().to_owned();
        members
            .iter()
            .map(|m| Member { name: field(m, "name"), role: field(m, "role"), state: field(m, "state") })
            .collect()
    }

    /// Waits until some member sees the cluster [`whole`]. Returns the members.
    pub fn wait_whole(&self, timeout: Duration) -> anyhow::Result<Vec<Member>> {
        let deadline = Instant::now() + timeout;
        loop {
            for via in ["pg-1", "pg-2", "pg-3"] {
                let members = self.patroni_members(via);
                if whole(&members) {
                    return Ok(members);
                }
            }
            if Instant::now() > deadline {
                bail!("the cluster is not whole after {timeout:?}: {:?}", self.patroni_members("pg-1"));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `psql -Atc <sql>` on `member`'s database `appdb` as the superuser, over its Unix socket.
    pub fn psql(&self, member: &str, sql: &str) -> String {
        docker(&["exec", &self.container(member), "psql", "-U", "postgres", "-d", "appdb", "-Atc", sql])
            .trim()
            .to_owned()
    }

    /// What of the project is left on the engine: containers, volumes, networks.
    pub fn leftovers(&self) -> Vec<String> {
        let filter = format!("label=com.docker.compose.project={}", self.project);
        let mut left = Vec::new();
        for (kind, args) in [
            ("container", vec!["ps", "-a", "-q"]),
            ("volume", vec!["volume", "ls", "-q"]),
            ("network", vec!["network", "ls", "-q"]),
        ] {
            let mut args = args;
            args.extend(["--filter", &filter]);
            left.extend(docker(&args).lines().map(|id| format!("{kind} {id}")));
        }
        left
    }

    /// `down -v`: removes the project's containers, networks and volumes.
    pub fn down(&self) -> anyhow::Result<()> {
        let out = self.compose(&["--profile", "ha", "down", "-v", "--remove-orphans", "-t", "5"]).output()?;
        if !out.status.success() {
            bail!("compose down: {}", tail(&out));
        }
        Ok(())
    }
}

/// A Patroni member as `/cluster` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// `leader`, `sync_standby` or `replica`.
    pub role: String,
    /// `running`, `streaming`, `stopped`, …
    pub state: String,
}

/// One leader running, a synchronous standby, and every replica streaming from the leader.
pub fn whole(members: &[Member]) -> bool {
    let leaders: Vec<&Member> = members.iter().filter(|m| m.role == "leader").collect();
    members.len() == 3
        && leaders.len() == 1
        && leaders[0].state == "running"
        && members.iter().any(|m| m.role == "sync_standby")
        && members.iter().filter(|m| m.role != "leader").all(|m| m.state == "streaming")
}

impl Drop for Stack {
    fn drop(&mut self) {
        if compose_program().is_some() && !self.leftovers().is_empty() {
            if let Err(e) = self.down() {
                eprintln!("{}: {e:#}", self.project);
            }
        }
    }
}

/// Runs `docker <args>`, failing with its output unless it succeeds; returns its standard output.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().with_context(|| format!("docker {args:?}")).unwrap();
    assert!(out.status.success(), "docker {args:?}: {}", tail(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A command's output for a failure message: its last lines of stderr and stdout.
fn tail(out: &Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// 32 random hex digits (the compose URLs carry the app's password unescaped: hex only).
fn random_hex() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).expect("/dev/urandom");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
