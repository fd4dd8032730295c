//! A PostgreSQL cluster run by Patroni on loopback: one etcd, N members (pg-1 … pg-N), each a Patroni
//! process that starts, stops, promotes and demotes its own PostgreSQL, with synchronous replication
//! (`synchronous_mode`), so an acknowledged write survives losing the primary.
//!
//! Layout of the cluster directory: `etcd/` (the store, the service user's), `pgpass` (every password
//! of the cluster, etcd's too, in libpq's password-file format, 0600), and per member `pg-N/` with `patroni.yml` (0600: it holds the
//! passwords), `data/` (PGDATA), Patroni's own `pgpass` and the Unix socket. A directory that already
//! holds a cluster is started again with its data and passwords (every member at once: any of them may
//! have been the last leader). Patroni and PostgreSQL run as the `postgres` user when we are root.
//! Patroni detaches its postmaster (it survives Patroni's death, by design): every stop here ends both,
//! and dropping the cluster does too.

mod config;

use std::fs;
use std::io::Read;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{Pid, User};
use serde_json::Value;
use tempfile::TempDir;

use config::{ClusterPlan, MemberPlace};
pub use config::{Secrets, LOOP_WAIT_S, REPLICATION_TIMEOUT_S, REST_API_USER, RETRY_TIMEOUT_S, TTL_S};

use crate::bins::{patroni_bin, postgres_bin};
use crate::etcd::{Etcd, EtcdOptions};
use crate::files::{open_read, private_dir, write_new};
use crate::postgres::{
    cluster_dir, create_app_database, hand_over, postgres_user, run_psql, ADMIN_USER, APP_DATABASE, APP_USER,
};
use crate::users::run_as;
use crate::{free_port, proctree, Child, Component, Log};

/// Patroni's cluster name (its key prefix in etcd).
const SCOPE: &str = "pgfleet";
/// How long a new cluster may take to have a leader and every replica streaming.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long Patroni gets to stop its PostgreSQL on SIGTERM before both are killed.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// The cluster's password file, in the cluster directory.
const PASSWORD_FILE: &str = "pgpass";
/// How long Patroni's `POST /switchover` may take: it answers once the switchover is done (the leader
/// demoted, the candidate promoted), which takes far longer than other calls on a busy machine.
const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the cluster's state is polled while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How to create a [`PatroniCluster`].
#[derive(Debug, Clone)]
pub struct PatroniOptions {
    /// The cluster directory; `None` = a fresh temporary directory, removed on drop.
    pub dir: Option<PathBuf>,
    /// Members (1 = a primary alone; 3 = a primary and two replicas).
    pub members: usize,
    pub max_connections: u32,
    /// `false`: fsync and full_page_writes off (tests).
    pub durable: bool,
    /// More PostgreSQL parameters for every member.
    pub parameters: Vec<(String, String)>,
    /// Hide the children's output (it is still kept for error messages).
    pub quiet: bool,
    /// Also append each child's output to `<logs>/<name>.log` (`pg-1.log` …, `etcd.log`).
    pub logs: Option<PathBuf>,
}

impl Default for PatroniOptions {
    fn default() -> Self {
        PatroniOptions {
            dir: None,
            members: 3,
            max_connections: 100,
            durable: false,
            parameters: Vec::new(),
            quiet: true,
            logs: None,
        }
    }
}

/// One member as Patroni's REST API reports it (`GET /cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub name: String,
    /// `leader`, `sync_standby`, `replica` (Patroni's words).
    pub role: String,
    /// `running`, `streaming`, `starting`, `stopped` …
    pub state: String,
    pub timeline: Option<u64>,
    /// Bytes of WAL the member is behind the leader (`None` for the leader, or when unknown).
    pub lag_bytes: Option<u64>,
    pub port: u16,
}

impl MemberStatus {
    pub fn is_leader(&self) -> bool {
        self.role == "leader" && self.state == "running"
    }

    /// A replica that streams WAL from the leader.
    pub fn is_streaming_replica(&self) -> bool {
        matches!(self.role.as_str(), "replica" | "sync_standby") && self.state == "streaming"
    }
}

struct Member {
    name: String,
    dir: PathBuf,
    pg_port: u16,
    api_port: u16,
    patroni: Option<Child>,
    /// The startup process [`PatroniCluster::pause_replay`] stopped.
    replay_paused: Option<Pid>,
    /// The WAL receiver [`PatroniCluster::silence_receiver`] stopped.
    receiver_silenced: Option<Pid>,
}

impl std::fmt::Debug for Member {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Member")
            .field("name", &self.name)
            .field("pg_port", &self.pg_port)
            .field("api_port", &self.api_port)
            .field("running", &self.patroni.is_some())
            .finish()
    }
}

impl Member {
    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The postmaster's PID from `postmaster.pid`, if that process still runs and is this member's
    /// (its command line names the data directory: a PID reused by another process is not). The file
    /// is the postgres user's: read only if it is a regular file, never through a link.
    fn postmaster(&self) -> Option<Pid> {
        let mut text = String::new();
        open_read(&self.data_dir().join("postmaster.pid")).ok()?.read_to_string(&mut text).ok()?;
        let pid = Pid::from_raw(text.lines().next()?.trim().parse().ok()?);
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let data_dir = self.data_dir();
        String::from_utf8_lossy(&cmdline).contains(data_dir.to_str()?).then_some(pid)
    }
}

/// A running Patroni cluster, owned by this process: dropping it stops every member and etcd, and
/// removes the temporary directory, if it made one.
#[derive(Debug)]
pub struct PatroniCluster {
    members: Vec<Member>,
    secrets: Secrets,
    run_as: Option<User>,
    quiet: bool,
    http: ureq::Agent,
    etcd: Option<Etcd>,
    logs: Option<PathBuf>,
    dir: PathBuf,
    temp_dir: Option<TempDir>,
}

impl PatroniCluster {
    /// Starts etcd and every member, waits until there is a leader and every other member streams
    /// from it, then creates the application's role and database on the leader.
    pub fn start(opts: PatroniOptions) -> anyhow::Result<PatroniCluster> {
        ensure!(opts.members >= 1, "a cluster needs at least one member");
        let run_as = postgres_user()?;
        let (dir, temp_dir) = cluster_dir(opts.dir.as_deref(), "pgfleet-ha-")?;
        let password_file = dir.join(PASSWORD_FILE);
        let kept = (1..=opts.members).any(|n| dir.join(format!("pg-{n}/data/PG_VERSION")).exists());
        let secrets = match kept {
            true => Secrets::read(&password_file)?,
            false => Secrets::random()?,
        };
        secrets.write(&password_file)?;
        let log = Log { quiet: opts.quiet, file: opts.logs.as_ref().map(|logs| logs.join("etcd.log")) };
        let etcd = Etcd::start(EtcdOptions { dir: &dir, password: &secrets.etcd, log })?;
        // Patroni runs every server tool from one directory (pg_controldata, pg_rewind …): the real one,
        // not a directory of symlinks to a few of them.
        let postgres =
            fs::canonicalize(postgres_bin("postgres")?).context("cannot resolve postgres's path")?;
        let bin_dir = postgres.parent().context("postgres has no directory")?.to_owned();
        let etcd_address = etcd.address();
        let plan = ClusterPlan {
            scope: SCOPE,
            etcd: &etcd_address,
            bin_dir: &bin_dir,
            max_connections: opts.max_connections,
            durable: opts.durable,
            parameters: &opts.parameters,
            secrets: &secrets,
        };
        let mut members = Vec::new();
        for n in 1..=opts.members {
            let name = format!("pg-{n}");
            let member_dir = dir.join(&name);
            private_dir(&member_dir, None)?;
            if let Some(user) = &run_as {
                hand_over(&member_dir, user)?;
            }
            let member = Member {
                name,
                dir: member_dir,
                pg_port: free_port()?,
                api_port: free_port()?,
                patroni: None,
                replay_paused: None,
                receiver_silenced: None,
            };
            let place = MemberPlace {
                name: &member.name,
                dir: &member.dir,
                pg_port: member.pg_port,
                api_port: member.api_port,
            };
            // The member's directory is the postgres user's: written without following a link there.
            let config = config::render(&plan, &place);
            write_new(&member.dir.join("patroni.yml"), config.as_bytes(), 0o600, run_as.as_ref())?;
            // A postmaster left running by a Patroni that was killed with its owner (it detaches its
            // PostgreSQL) would hold the port and the data directory: stop it before Patroni starts.
            if let Some(orphan) = member.postmaster() {
                tracing::warn!(member = %member.name, pid = %orphan, "killing a PostgreSQL left running by an earlier start");
                kill_tree(orphan);
            }
            members.push(member);
        }
        let http = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(1))
            .timeout(Duration::from_secs(5))
            .build();
        let mut cluster = PatroniCluster {
            members,
            secrets,
            run_as,
            quiet: opts.quiet,
            http,
            etcd: Some(etcd),
            logs: opts.logs.clone(),
            dir: dir.clone(),
            temp_dir,
        };
        // A new cluster: the first member bootstraps it; the others then clone it.
        for n in 0..cluster.members.len() {
            cluster.spawn(n)?;
            if n == 0 && !kept {
                cluster.wait_for_primary(None)?;
            }
        }
        cluster.wait_for_primary(None)?;
        cluster.wait_until_whole()?;
        cluster.create_app_database()?;
        tracing::info!(members = cluster.members.len(), dir = %dir.display(), "Patroni cluster ready");
        Ok(cluster)
    }

    fn spawn(&mut self, n: usize) -> anyhow::Result<()> {
        let member = &self.members[n];
        let mut cmd = Command::new(patroni_bin()?);
        cmd.arg(member.dir.join("patroni.yml")).current_dir(&member.dir).env("PYTHONUNBUFFERED", "1");
        if self.run_as.is_some() {
            cmd.env("HOME", &member.dir);
        }
        run_as(&mut cmd, self.run_as.as_ref());
        let child = match &self.logs {
            Some(logs) => Child::spawn_logged(
                &member.name,
                cmd,
                self.quiet,
                &logs.join(format!("{}.log", member.name)),
            )?,
            None => Child::spawn(&member.name, cmd, self.quiet)?,
        };
        self.members[n].patroni = Some(child);
        Ok(())
    }

    fn index(&self, name: &str) -> anyhow::Result<usize> {
        self.members.iter().position(|m| m.name == name).with_context(|| format!("no member called {name}"))
    }

    /// The cluster's etcd, while it runs.
    pub fn etcd(&self) -> Option<&Etcd> {
        self.etcd.as_ref()
    }

    /// Every member's name, in order (pg-1 …).
    pub fn member_names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.name.clone()).collect()
    }

    /// The members as Patroni reports them, asked of the first member whose REST API answers.
    pub fn status(&self) -> anyhow::Result<Vec<MemberStatus>> {
        let mut last_error = None;
        for member in self.members.iter().filter(|m| m.patroni.is_some()) {
            match self.http.get(&format!("http://127.0.0.1:{}/cluster", member.api_port)).call() {
                Ok(response) => {
                    let body: Value = response.into_json().context("Patroni's /cluster is not JSON")?;
                    return parse_cluster(&body);
                }
                Err(error) => last_error = Some(error),
            }
        }
        match last_error {
            Some(error) => Err(error).context("no member's REST API answers"),
            None => bail!("no member is running"),
        }
    }

    /// Waits until a member other than `not` (if given) leads and its PostgreSQL accepts writes
    /// (Patroni reports the new leader a moment before its promotion ends); returns its name.
    pub fn wait_for_primary(&mut self, not: Option<&str>) -> anyhow::Result<String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.wait_until("a member leads", |members| {
                members.iter().any(|m| m.is_leader() && Some(m.name.as_str()) != not)
            })?;
            if let Ok(leader) = self.leader() {
                if Some(leader.as_str()) != not
                    && self.psql_on(&leader, "postgres", "SELECT pg_is_in_recovery()").is_ok_and(|r| r == "f")
                {
                    return Ok(leader);
                }
            }
            if Instant::now() >= deadline {
                bail!("no member accepted writes within {READY_TIMEOUT:?}");
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// The current leader's name.
    pub fn leader(&self) -> anyhow::Result<String> {
        let members = self.status()?;
        members.iter().find(|m| m.is_leader()).map(|m| m.name.clone()).context("the cluster has no leader")
    }

    /// Waits until `done` holds for the members Patroni reports, failing with their last state after
    /// [`READY_TIMEOUT`] (or early, with its output, when a member's Patroni exits).
    pub fn wait_until(&mut self, what: &str, done: impl Fn(&[MemberStatus]) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let last = self.status();
            if let Ok(members) = &last {
                if done(members) {
                    return Ok(());
                }
            }
            for member in &mut self.members {
                if let Some(child) = member.patroni.as_mut() {
                    if !child.is_running() {
                        bail!(
                            "{}'s Patroni exited; its last output:\n{}",
                            member.name,
                            child.recent_output()
                        );
                    }
                }
            }
            if Instant::now() >= deadline {
                let outputs: Vec<String> = self
                    .members
                    .iter()
                    .filter_map(|m| Some(format!("--- {}:\n{}", m.name, m.patroni.as_ref()?.recent_output())))
                    .collect();
                bail!(
                    "timed out after {READY_TIMEOUT:?} waiting until {what}; members: {last:?}\n{}",
                    outputs.join("\n")
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits until every running member is up: one leader, the others streaming, one of them the
    /// synchronous standby (with more than one member).
    pub fn wait_until_whole(&mut self) -> anyhow::Result<()> {
        let running = self.members.iter().filter(|m| m.patroni.is_some()).count();
        self.wait_until("the cluster is whole", |members| {
            let leaders = members.iter().filter(|m| m.is_leader()).count();
            let replicas = members.iter().filter(|m| m.is_streaming_replica()).count();
            let sync = members.iter().any(|m| m.role == "sync_standby" && m.state == "streaming");
            leaders == 1 && replicas + 1 == running && (running == 1 || sync)
        })
    }

    /// The application's URL for writes: every member, `target_session_attrs=read-write` (libpq and
    /// tokio-postgres both try the hosts in turn until one accepts writes: the primary).
    pub fn url(&self) -> String {
        self.app_url("target_session_attrs=read-write")
    }

    /// The application's URL for reads: every member, `target_session_attrs=read-only` (a replica),
    /// hosts tried in random order to spread the load.
    pub fn read_url(&self) -> String {
        self.app_url("target_session_attrs=read-only&load_balance_hosts=random")
    }

    /// [`PatroniCluster::url`] without its password, for printing.
    pub fn url_redacted(&self) -> String {
        self.url().replace(&self.secrets.app, "****")
    }

    /// [`PatroniCluster::url`] with no password at all: psql (libpq) reaches the current primary with it
    /// and takes the password from [`PatroniCluster::password_file`].
    pub fn display_url(&self) -> String {
        self.url().replace(&format!(":{}@", self.secrets.app), "@")
    }

    /// The libpq password file with the superuser's and the application's passwords (mode 0600).
    pub fn password_file(&self) -> PathBuf {
        self.dir.join(PASSWORD_FILE)
    }

    /// The cluster directory.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Member `name`'s Patroni REST API: `http://127.0.0.1:PORT` (its `/metrics` needs no password).
    pub fn api_url(&self, name: &str) -> anyhow::Result<String> {
        Ok(format!("http://127.0.0.1:{}", self.members[self.index(name)?].api_port))
    }

    fn app_url(&self, params: &str) -> String {
        let hosts: Vec<String> = self.members.iter().map(|m| format!("127.0.0.1:{}", m.pg_port)).collect();
        format!("postgres://{APP_USER}:{}@{}/{APP_DATABASE}?{params}", self.secrets.app, hosts.join(","))
    }

    /// A member's PostgreSQL port on 127.0.0.1.
    pub fn port(&self, name: &str) -> anyhow::Result<u16> {
        Ok(self.members[self.index(name)?].pg_port)
    }

    /// The superuser's URL to one member's application database.
    pub fn admin_url(&self, name: &str) -> anyhow::Result<String> {
        Ok(format!(
            "postgres://{ADMIN_USER}:{}@127.0.0.1:{}/{APP_DATABASE}",
            self.secrets.superuser,
            self.port(name)?
        ))
    }

    /// Runs `sql` as the superuser on member `name`'s application database (`psql -X -A -t`); returns its
    /// output, trimmed.
    pub fn psql(&self, name: &str, sql: &str) -> anyhow::Result<String> {
        self.psql_on(name, APP_DATABASE, sql)
    }

    fn psql_on(&self, name: &str, database: &str, sql: &str) -> anyhow::Result<String> {
        run_psql(self.port(name)?, &self.secrets.superuser, database, sql)
            .with_context(|| format!("on {name}"))
    }

    /// Creates the application's role (no superuser) and database on the leader, unless they exist. The
    /// role may read replication statistics (`pg_read_all_stats`): a replica then tells the nodes the
    /// timeline its WAL receiver streams, so after a failover the nodes trust it again at once, not after
    /// its next restartpoint (see the node's `db::read`).
    fn create_app_database(&self) -> anyhow::Result<()> {
        let leader = self.leader()?;
        let psql = |database: &str, sql: &str| self.psql_on(&leader, database, sql);
        create_app_database(&self.secrets.app, psql)?;
        psql("postgres", &format!("GRANT pg_read_all_stats TO {APP_USER}")).map(drop)
    }

    /// SIGKILL to member `name`'s Patroni and to its PostgreSQL's whole process tree, as when its
    /// machine dies: no shutdown, no handing over. It stays down until [`PatroniCluster::start_member`].
    pub fn kill_member(&mut self, name: &str) -> anyhow::Result<()> {
        self.resume_replay(name)?;
        self.resume_receiver(name)?;
        let n = self.index(name)?;
        let member = &mut self.members[n];
        if let Some(mut patroni) = member.patroni.take() {
            patroni.kill()?;
        }
        if let Some(postmaster) = member.postmaster() {
            kill_tree(postmaster);
        }
        tracing::info!(member = name, "member killed");
        Ok(())
    }

    /// Stops member `name` cleanly: SIGTERM to Patroni, which stops its PostgreSQL (a leader hands its
    /// lock back first); both are killed if that takes longer than 30 s.
    pub fn stop_member(&mut self, name: &str) -> anyhow::Result<()> {
        self.resume_replay(name)?;
        self.resume_receiver(name)?;
        let n = self.index(name)?;
        let member = &mut self.members[n];
        if let Some(mut patroni) = member.patroni.take() {
            patroni.terminate(STOP_GRACE)?;
        }
        if let Some(postmaster) = member.postmaster() {
            tracing::warn!(member = name, "PostgreSQL outlived its Patroni; killing it");
            kill_tree(postmaster);
        }
        Ok(())
    }

    /// Starts a stopped or killed member again; it rejoins as a replica (rewound if it diverged).
    pub fn start_member(&mut self, name: &str) -> anyhow::Result<()> {
        let n = self.index(name)?;
        if self.members[n].patroni.is_none() {
            self.spawn(n)?;
        }
        Ok(())
    }

    /// A planned switchover through Patroni's REST API: the leader hands over to `candidate` (or to a
    /// synchronous standby Patroni picks); returns once the new leader runs.
    pub fn switchover(&mut self, candidate: Option<&str>) -> anyhow::Result<String> {
        let leader = self.leader()?;
        let api_port = self.members[self.index(&leader)?].api_port;
        let mut body = serde_json::json!({ "leader": leader });
        if let Some(candidate) = candidate {
            body["candidate"] = candidate.into();
        }
        let auth = format!("Basic {}", base64(&format!("{REST_API_USER}:{}", self.secrets.rest_api)));
        self.http
            .post(&format!("http://127.0.0.1:{api_port}/switchover"))
            .timeout(SWITCHOVER_TIMEOUT)
            .set("Authorization", &auth)
            .send_json(body)
            .map_err(|e| match e {
                ureq::Error::Status(code, response) => {
                    anyhow::anyhow!(
                        "switchover refused ({code}): {}",
                        response.into_string().unwrap_or_default()
                    )
                }
                other => anyhow::Error::new(other),
            })?;
        let new = self.wait_for_primary(Some(&leader))?;
        if let Some(candidate) = candidate {
            ensure!(new == candidate, "{new} leads after a switchover to {candidate}");
        }
        Ok(new)
    }

    /// SIGKILL to the leader ([`PatroniCluster::kill_member`]); waits until another member accepts
    /// writes, then starts the killed one again and waits until the cluster is whole (it rejoins as a
    /// replica, rewound if it diverged). Returns the killed leader, the new one, and how long the
    /// takeover took.
    pub fn kill_leader(&mut self) -> anyhow::Result<(String, String, Duration)> {
        let old = self.leader()?;
        let killed = Instant::now();
        self.kill_member(&old)?;
        let new = self.wait_for_primary(Some(&old))?;
        let took = killed.elapsed();
        self.start_member(&old)?;
        self.wait_until_whole()?;
        Ok((old, new, took))
    }

    /// What an operator's rolling update does: each replica stopped and started again (waiting until
    /// the cluster is whole after each), a switchover, then the old leader restarted. Returns the old
    /// leader and the new one once the cluster is whole again.
    pub fn rolling_restart(&mut self) -> anyhow::Result<(String, String)> {
        self.wait_until_whole()?;
        let leader = self.leader()?;
        for name in self.member_names().into_iter().filter(|name| *name != leader) {
            self.restart_member(&name)?;
        }
        let new = self.switchover(None)?;
        self.restart_member(&leader)?;
        Ok((leader, new))
    }

    /// Stops member `name` cleanly, starts it again and waits until the cluster is whole.
    pub fn restart_member(&mut self, name: &str) -> anyhow::Result<()> {
        self.stop_member(name)?;
        self.start_member(name)?;
        self.wait_until_whole()
    }

    /// Pauses WAL replay on replica `name`: SIGSTOP to its startup (recovery) process, so it keeps
    /// receiving WAL and answering queries while what it shows falls behind, as a replica under heavy
    /// load does. (`pg_wal_replay_pause()` does not last: Patroni resumes paused replay on its next
    /// loop.) Undone by [`PatroniCluster::resume_replay`], which stopping the member calls first.
    pub fn pause_replay(&mut self, name: &str) -> anyhow::Result<()> {
        let n = self.index(name)?;
        ensure!(self.members[n].replay_paused.is_none(), "{name}'s replay is already paused");
        let startup = self.stop_child(name, "startup")?;
        self.members[n].replay_paused = Some(startup);
        tracing::info!(member = name, "WAL replay paused");
        Ok(())
    }

    /// Silences replica `name`'s link to its primary: SIGSTOP to its WAL receiver, so no WAL and no
    /// keepalive reaches it and nothing fails, as in a partition before any timeout fires; it goes on
    /// answering queries with what it has. (The primary ends the replication connection after
    /// `wal_sender_timeout`, [`REPLICATION_TIMEOUT_S`].) Undone by [`PatroniCluster::resume_receiver`],
    /// which stopping the member calls first.
    pub fn silence_receiver(&mut self, name: &str) -> anyhow::Result<()> {
        let n = self.index(name)?;
        ensure!(self.members[n].receiver_silenced.is_none(), "{name}'s WAL receiver is already silenced");
        let receiver = self.stop_child(name, "walreceiver")?;
        self.members[n].receiver_silenced = Some(receiver);
        tracing::info!(member = name, "WAL receiver silenced");
        Ok(())
    }

    /// Resumes the WAL receiver [`PatroniCluster::silence_receiver`] stopped; does nothing if none is.
    pub fn resume_receiver(&mut self, name: &str) -> anyhow::Result<()> {
        let n = self.index(name)?;
        if let Some(receiver) = self.members[n].receiver_silenced.take() {
            let _ = kill(receiver, Signal::SIGCONT);
            tracing::info!(member = name, "WAL receiver resumed");
        }
        Ok(())
    }

    /// Ends replica `name`'s WAL receiver (SIGTERM: it exits cleanly). Its startup process starts another
    /// one unless it is paused ([`PatroniCluster::pause_replay`]): then the replica has none meanwhile.
    pub fn end_receiver(&mut self, name: &str) -> anyhow::Result<()> {
        let receiver = self.child(name, "walreceiver")?;
        kill(receiver, Signal::SIGTERM).with_context(|| format!("cannot end {name}'s WAL receiver"))?;
        tracing::info!(member = name, "WAL receiver ended");
        Ok(())
    }

    /// SIGSTOP to the child of member `name`'s postmaster whose title names `process` (`startup`,
    /// `walreceiver`), once it shows as stopped; its PID.
    fn stop_child(&self, name: &str, process: &str) -> anyhow::Result<Pid> {
        let child = self.child(name, process)?;
        kill(child, Signal::SIGSTOP).with_context(|| format!("cannot stop {name}'s {process} process"))?;
        proctree::wait_until_stopped(child)?;
        Ok(child)
    }

    /// The child of member `name`'s postmaster whose title names `process`.
    fn child(&self, name: &str, process: &str) -> anyhow::Result<Pid> {
        let member = &self.members[self.index(name)?];
        let postmaster =
            member.postmaster().with_context(|| format!("{name}'s PostgreSQL is not running"))?;
        proctree::descendants(postmaster)?
            .into_iter()
            .find(|pid| {
                fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| cmd.contains(process))
            })
            .with_context(|| format!("{name} has no {process} process: it is not a streaming replica"))
    }

    /// Resumes WAL replay paused by [`PatroniCluster::pause_replay`]; does nothing if it is not paused.
    pub fn resume_replay(&mut self, name: &str) -> anyhow::Result<()> {
        let n = self.index(name)?;
        if let Some(startup) = self.members[n].replay_paused.take() {
            let _ = kill(startup, Signal::SIGCONT);
            tracing::info!(member = name, "WAL replay resumed");
        }
        Ok(())
    }
}

impl PatroniCluster {
    /// Stops every member (Patroni and its PostgreSQL, replicas first), then etcd; returns the first
    /// error, after trying them all.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let mut result = Ok(());
        let leader = self.etcd.as_ref().and_then(|_| self.leader().ok());
        let mut names = self.member_names();
        // The leader last, so no replica takes over from it meanwhile.
        names.sort_by_key(|name| Some(name) == leader.as_ref());
        for name in &names {
            if let Err(error) = self.stop_member(name) {
                tracing::warn!(member = %name, error = %format!("{error:#}"), "cannot stop member");
                result = result.and(Err(error));
            }
        }
        drop(self.etcd.take());
        result
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        let _ = self.stop();
        if let Some(temp_dir) = self.temp_dir.take() {
            let path = temp_dir.path().to_owned();
            if let Err(error) = temp_dir.close() {
                tracing::warn!(dir = %path.display(), %error, "cannot remove the cluster's temporary directory");
            }
        }
    }
}

/// SIGKILL to `root` and every descendant (a postmaster's backends and helpers).
fn kill_tree(root: Pid) {
    let descendants = proctree::descendants(root).unwrap_or_default();
    for pid in std::iter::once(root).chain(descendants) {
        let _ = kill(pid, Signal::SIGKILL);
    }
    // The postmaster is not our child (Patroni detached it): wait until it is gone, not reaped.
    let deadline = Instant::now() + Duration::from_secs(10);
    while kill(root, None).is_ok() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
}

/// The members of Patroni's `GET /cluster` answer.
pub fn parse_cluster(body: &Value) -> anyhow::Result<Vec<MemberStatus>> {
    let members = body["members"].as_array().context("Patroni's /cluster has no members")?;
    members
        .iter()
        .map(|m| {
            Ok(MemberStatus {
                name: m["name"].as_str().context("a member without a name")?.to_owned(),
                role: m["role"].as_str().unwrap_or_default().to_owned(),
                state: m["state"].as_str().unwrap_or_default().to_owned(),
                timeline: m["timeline"].as_u64(),
                lag_bytes: m["lag"].as_u64(),
                port: m["port"].as_u64().and_then(|p| u16::try_from(p).ok()).unwrap_or_default(),
            })
        })
        .collect()
}

/// Standard base64 (for a Basic authorization header).
fn base64(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_examples() {
        assert_eq!(base64("f"), "Zg==");
        assert_eq!(base64("fo"), "Zm8=");
        assert_eq!(base64("foo"), "Zm9v");
        assert_eq!(base64("foobar"), "Zm9vYmFy");
    }

    #[test]
    fn cluster_answers_are_parsed() {
        let body = serde_json::json!({"members": [
            {"name": "pg-1", "role": "leader", "state": "running", "port": 5433, "timeline": 2},
            {"name": "pg-2", "role": "sync_standby", "state": "streaming", "port": 5434, "timeline": 2, "lag": 0},
            {"name": "pg-3", "role": "replica", "state": "stopped", "port": 5435, "lag": "unknown"},
        ]});
        let members = parse_cluster(&body).unwrap();
        assert!(members[0].is_leader());
        assert!(members[1].is_streaming_replica());
        assert_eq!(members[1].lag_bytes, Some(0));
        assert!(!members[2].is_streaming_replica());
        assert_eq!(members[2].lag_bytes, None);
        assert_eq!(members[2].timeline, None);
    }
}
