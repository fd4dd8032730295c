//! A PostgreSQL cluster run by Patroni on loopback: one etcd, N members (pg-1 … pg-N), each a Patroni
//! process that starts, stops, promotes and demotes its own PostgreSQL, with synchronous replication
//! (`synchronous_mode`), so an acknowledged write survives losing the primary.
//!
//! Layout of the cluster directory: `etcd/` (the store, the service user's), `pgpass` (every password
//! of the cluster, etcd's too, in libpq's password-file format, 0600), and per member `pg-N/` with
//! `patroni.yml` (0600: it holds the passwords), `data/` (PGDATA), Patroni's own `pgpass` and the Unix socket. A directory that already
//! holds a cluster is started again with its data and passwords (every member at once: any of them may
//! have been the last leader). Patroni and PostgreSQL run as the `postgres` user when we are root.
//! Patroni detaches its postmaster (it survives Patroni's death, by design): every stop here ends both,
//! and dropping the cluster does too.
//!
//! This module starts and stops the cluster and its members; `status` reads Patroni's view of it,
//! `faults` does to it what chaos and the HA tests do, and `config` renders each member's Patroni file.

mod config;
mod faults;
mod status;

use std::fs;
use std::io::Read;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use nix::unistd::{Pid, User};
use secrecy::ExposeSecret;
use tempfile::TempDir;

use config::{ClusterPlan, MemberPlace};
pub use config::{Secrets, LOOP_WAIT_S, REPLICATION_TIMEOUT_S, REST_API_USER, RETRY_TIMEOUT_S, TTL_S};
pub use status::{parse_cluster, MemberStatus};

use crate::bins::{patroni_bin, postgres_bin};
use crate::etcd::{Etcd, EtcdOptions};
use crate::files::{open_read, private_dir, write_new};
use crate::postgres::{
    cluster_dir, create_app_database, hand_over, postgres_user, run_psql, ADMIN_USER, APP_DATABASE, APP_USER,
};
use crate::proctree::kill_tree;
use crate::users::run_as;
use crate::{free_port, Child, Component, Log};

/// Patroni's cluster name (its key prefix in etcd).
const SCOPE: &str = "pgfleet";
/// How long Patroni gets to stop its PostgreSQL on SIGTERM before both are killed.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// The cluster's password file, in the cluster directory.
const PASSWORD_FILE: &str = "pgpass";

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

#[derive(Debug)]
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
        self.url().replace(self.secrets.app.expose_secret(), "****")
    }

    /// [`PatroniCluster::url`] with no password at all: psql (libpq) reaches the current primary with it
    /// and takes the password from [`PatroniCluster::password_file`].
    pub fn display_url(&self) -> String {
        self.url().replace(&format!(":{}@", self.secrets.app.expose_secret()), "@")
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
        let (password, hosts) = (self.secrets.app.expose_secret(), self.address());
        format!("postgres://{APP_USER}:{password}@{hosts}/{APP_DATABASE}?{params}")
    }

    /// A member's PostgreSQL port on 127.0.0.1.
    pub fn port(&self, name: &str) -> anyhow::Result<u16> {
        Ok(self.members[self.index(name)?].pg_port)
    }

    /// The superuser's URL to one member's application database.
    pub fn admin_url(&self, name: &str) -> anyhow::Result<String> {
        Ok(format!(
            "postgres://{ADMIN_USER}:{}@127.0.0.1:{}/{APP_DATABASE}",
            self.secrets.superuser.expose_secret(),
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

    /// Stops member `name` cleanly, starts it again and waits until the cluster is whole.
    pub fn restart_member(&mut self, name: &str) -> anyhow::Result<()> {
        self.stop_member(name)?;
        self.start_member(name)?;
        self.wait_until_whole()
    }

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

/// Every member's Patroni (its PostgreSQL is Patroni's child, which Patroni stops with it) and etcd.
impl Component for PatroniCluster {
    fn processes(&mut self) -> Vec<&mut Child> {
        let members = self.members.iter_mut().filter_map(|member| member.patroni.as_mut());
        members.chain(self.etcd.iter_mut().flat_map(Etcd::processes)).collect()
    }

    /// Every member's PostgreSQL.
    fn address(&self) -> String {
        let hosts: Vec<String> = self.members.iter().map(|m| format!("127.0.0.1:{}", m.pg_port)).collect();
        hosts.join(",")
    }

    /// Every member, replicas first, then etcd ([`PatroniCluster::stop`]).
    fn stop(&mut self) -> anyhow::Result<()> {
        PatroniCluster::stop(self)
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
