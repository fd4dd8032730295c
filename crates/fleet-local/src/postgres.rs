//! A private PostgreSQL cluster on loopback: initdb, start, fast stop, start again, pause and resume, psql.
//!
//! Layout of the cluster directory: `data/` (PGDATA), `pgpass` (the cluster's passwords, random per
//! cluster, in libpq's password-file format, mode 0600), `server.log` (the server's stderr, appended on
//! every start, unless the options name another file) and the Unix socket `.s.PGSQL.<port>`. TCP
//! listens on 127.0.0.1 only and requires passwords (scram-sha-256); the socket (inside a directory
//! only its owner can enter) trusts.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use nix::sys::signal::Signal;
use nix::unistd::{Pid, User};
use secrecy::{ExposeSecret, SecretString};
use tempfile::TempDir;

use crate::bins::postgres_bin;
use crate::files::{open_append, open_read, write_new};
use crate::process::{die_with_parent, signal_and_wait, wait_timeout};

mod credentials;
mod setup;

pub(crate) use crate::users::postgres_user;
use crate::users::run_as;
use crate::{free_port, proctree, Child, Component};
use credentials::Credentials;
pub(crate) use credentials::{random_password, read_password_file, write_password_file};
pub(crate) use setup::hand_over;
use setup::settings;
pub(crate) use setup::LOG_SETTINGS;
pub use setup::{check_reachable, PostgresOptions, DEADLOCK_TIMEOUT};

/// The superuser created by initdb.
pub const ADMIN_USER: &str = "postgres";
/// The application's role, owner of [`APP_DATABASE`].
pub const APP_USER: &str = "appuser";
/// The exporter's role: it may log in and read every statistic (`pg_monitor`), nothing more.
pub const MONITOR_USER: &str = "exporter";
/// The application's database.
pub const APP_DATABASE: &str = "appdb";
/// The server's name among a fleet's components.
const NAME: &str = "postgres";

/// How long a start may take before it is an error (crash recovery after a kill included).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before the postmaster is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an immediate shutdown (on drop) may take before the postmaster is killed.
const DROP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often readiness is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How many free ports to try when another process takes the one we picked before the server binds it.
const BIND_ATTEMPTS: usize = 3;
/// Lines of `server.log` quoted in error messages.
const LOG_TAIL_LINES: usize = 30;

/// A running (or stopped) private PostgreSQL cluster, owned by this process: dropping it shuts the
/// server down (immediate mode) and removes the temporary directory, if it made one.
#[derive(Debug)]
pub struct Postgres {
    dir: PathBuf,
    data_dir: PathBuf,
    port: u16,
    /// `-c name=value` settings (everything but the port).
    settings: Vec<(String, String)>,
    /// The user the server runs as when we are root (PostgreSQL refuses to run as root).
    run_as: Option<User>,
    /// The superuser's and the application role's passwords (also in `<dir>/pgpass`).
    credentials: Credentials,
    /// Where the server's output goes.
    log_file: PathBuf,
    postmaster: Option<std::process::Child>,
    /// While paused ([`Postgres::pause`]): the postmaster's descendants that got SIGSTOP.
    paused: Option<Vec<Pid>>,
    /// Removed on drop, after the server has stopped.
    temp_dir: Option<TempDir>,
}

impl Postgres {
    /// Creates the cluster (initdb, unless `dir` already holds one), starts it on 127.0.0.1, waits
    /// until it accepts connections, and makes sure role [`APP_USER`] and database [`APP_DATABASE`] exist.
    pub fn start(opts: PostgresOptions) -> anyhow::Result<Postgres> {
        let run_as = postgres_user()?;
        let (dir, temp_dir) = cluster_dir(opts.dir.as_deref(), "pgfleet-pg-")?;
        if let Some(user) = &run_as {
            hand_over(&dir, user)?;
        }
        let data_dir = dir.join("data");
        let initialised = data_dir.join("PG_VERSION").exists();
        let credentials = match initialised {
            true => Credentials::read(&dir)?,
            false => Credentials::create(&dir)?,
        };
        let mut postgres = Postgres {
            data_dir,
            settings: settings(&opts, &dir),
            log_file: opts.log_file.clone().unwrap_or_else(|| dir.join("server.log")),
            dir,
            port: 0,
            run_as,
            credentials,
            postmaster: None,
            paused: None,
            temp_dir,
        };
        if !initialised {
            postgres.initdb(opts.durable)?;
        }
        postgres.start_on(opts.port)?;
        postgres.create_app_database()?;
        tracing::info!(port = postgres.port, dir = %postgres.dir.display(), "PostgreSQL ready");
        Ok(postgres)
    }

    /// The application's URL, password included: `postgres://appuser:PASSWORD@127.0.0.1:PORT/appdb`.
    /// A secret: for printing, see [`Postgres::display_url`].
    pub fn url(&self) -> String {
        format!(
            "postgres://{APP_USER}:{}@127.0.0.1:{}/{APP_DATABASE}",
            self.credentials.app.expose_secret(),
            self.port
        )
    }

    /// The application's URL without its password: `postgres://appuser@127.0.0.1:PORT/appdb`.
    pub fn display_url(&self) -> String {
        format!("postgres://{APP_USER}@127.0.0.1:{}/{APP_DATABASE}", self.port)
    }

    /// The superuser's URL, to the application's database, password included (a secret).
    pub fn admin_url(&self) -> String {
        format!(
            "postgres://{ADMIN_USER}:{}@127.0.0.1:{}/{APP_DATABASE}",
            self.credentials.admin.expose_secret(),
            self.port
        )
    }

    /// The exporter's URL ([`MONITOR_USER`]), to the application's database, password included (a secret).
    pub fn monitor_url(&self) -> String {
        format!(
            "postgres://{MONITOR_USER}:{}@127.0.0.1:{}/{APP_DATABASE}",
            self.credentials.monitor.expose_secret(),
            self.port
        )
    }

    /// The file holding the cluster's passwords, in libpq's format (`PGPASSFILE=<it> psql …`), mode 0600.
    pub fn password_file(&self) -> PathBuf {
        credentials::path(&self.dir)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster directory (see the module's header).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The data directory (PGDATA).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's log file (its stderr, appended on every start).
    pub fn log_file(&self) -> PathBuf {
        self.log_file.clone()
    }

    /// The postmaster's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.postmaster.as_ref().map(std::process::Child::id)
    }

    /// Stops the server with a fast shutdown (SIGINT: sessions are ended, data kept); the port can be
    /// used again by [`Postgres::start_again`]. Does nothing if it is not running.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        // A stopped process would only act on SIGINT once continued.
        self.resume()?;
        let Some(postmaster) = self.postmaster.as_mut() else {
            return Ok(());
        };
        let stopped = signal_and_wait(postmaster, Signal::SIGINT, STOP_TIMEOUT)?;
        if stopped.is_none() {
            postmaster.kill().context("cannot kill the postmaster")?;
            postmaster.wait().context("cannot wait for the postmaster")?;
        }
        self.postmaster = None;
        if stopped.is_none() {
            bail!(
                "PostgreSQL did not finish a fast shutdown within {STOP_TIMEOUT:?}, so it was killed; server log:\n{}",
                self.log_tail(0)
            );
        }
        tracing::info!(port = self.port, "PostgreSQL stopped");
        Ok(())
    }

    /// Starts the stopped cluster again on the same port and waits until it accepts connections.
    /// Does nothing if it is running.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.postmaster.is_some() {
            return Ok(());
        }
        self.start_on(Some(self.port))
    }

    /// Freezes the server without ending a session: SIGSTOP to the postmaster, then (once it is stopped
    /// and can fork no more) to every one of its descendants: backends, checkpointer, WAL writer … Clients
    /// keep their connections and new ones are accepted by the kernel, but nothing answers, as when the
    /// database's machine stalls. Returns once every process is stopped. Undone by [`Postgres::resume`],
    /// which [`Postgres::stop`] and drop call first.
    pub fn pause(&mut self) -> anyhow::Result<()> {
        ensure!(self.paused.is_none(), "PostgreSQL is already paused");
        let postmaster = self.postmaster_pid()?;
        let descendants = proctree::stop_tree(postmaster)?;
        tracing::info!(port = self.port, processes = descendants.len() + 1, "PostgreSQL paused");
        self.paused = Some(descendants);
        Ok(())
    }

    /// Thaws a server frozen by [`Postgres::pause`] (SIGCONT to each process it stopped); statements
    /// carry on where they were. Does nothing if it is not paused.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let Some(descendants) = self.paused.take() else {
            return Ok(());
        };
        proctree::continue_tree(self.postmaster_pid()?, &descendants);
        tracing::info!(port = self.port, "PostgreSQL resumed");
        Ok(())
    }

    /// Whether [`Postgres::pause`] froze the server and it has not been resumed.
    pub fn is_paused(&self) -> bool {
        self.paused.is_some()
    }

    fn postmaster_pid(&self) -> anyhow::Result<Pid> {
        let pid = self.pid().context("PostgreSQL is not running")?;
        Ok(Pid::from_raw(i32::try_from(pid).context("PID out of range")?))
    }

    /// Runs `sql` as the superuser on [`APP_DATABASE`] with `psql -X -A -t -v ON_ERROR_STOP=1` and
    /// returns its standard output, trimmed (e.g. `"1"` for `select 1`).
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        self.psql_on(APP_DATABASE, sql)
    }

    fn psql_on(&self, database: &str, sql: &str) -> anyhow::Result<String> {
        run_psql(self.port, &self.credentials.admin, database, sql)
    }

    /// A command for a PostgreSQL server binary, run as `postgres` when we are root, in the cluster dir
    /// (the `postgres` user may not be allowed into our working directory).
    fn command(&self, name: &str) -> anyhow::Result<Command> {
        let mut cmd = Command::new(postgres_bin(name)?);
        cmd.current_dir(&self.dir).stdin(Stdio::null());
        run_as(&mut cmd, self.run_as.as_ref());
        Ok(cmd)
    }

    fn initdb(&self, durable: bool) -> anyhow::Result<()> {
        // initdb reads the superuser's password from a file; it lives only as long as initdb runs.
        let password_file = self.dir.join("initdb-password");
        write_new(
            &password_file,
            self.credentials.admin.expose_secret().as_bytes(),
            0o600,
            self.run_as.as_ref(),
        )
        .context("cannot write initdb's password file")?;
        let mut cmd = self.command("initdb")?;
        cmd.arg("-D").arg(&self.data_dir).args(["-U", ADMIN_USER]).arg("--pwfile").arg(&password_file);
        cmd.args(["--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C"]);
        if !durable {
            cmd.arg("--no-sync");
        }
        let output = cmd.output().context("cannot run initdb");
        let _ = fs::remove_file(&password_file);
        let output = output?;
        if !output.status.success() {
            bail!(
                "initdb failed ({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Starts the postmaster on `port`, or on a free port (retrying if another process wins the race
    /// for it), and waits until it accepts connections.
    fn start_on(&mut self, port: Option<u16>) -> anyhow::Result<()> {
        let attempts = if port.is_some() { 1 } else { BIND_ATTEMPTS };
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.port = match port {
                Some(port) => port,
                None => free_port()?,
            };
            let log_start = fs::metadata(self.log_file()).map_or(0, |m| m.len());
            self.spawn_postmaster()?;
            let Err(error) = self.wait_until_ready(log_start) else {
                return Ok(());
            };
            let lost_port = self.postmaster.is_none() && self.log_tail(log_start).contains("could not bind");
            if !lost_port || attempt == attempts {
                return Err(error);
            }
            tracing::warn!(port = self.port, "another process took PostgreSQL's port; trying another");
        }
    }

    fn spawn_postmaster(&mut self) -> anyhow::Result<()> {
        let log = open_append(&self.log_file)?;
        let mut cmd = self.command("postgres")?;
        cmd.arg("-D").arg(&self.data_dir).arg("-p").arg(self.port.to_string());
        for (name, value) in &self.settings {
            cmd.arg("-c").arg(format!("{name}={value}"));
        }
        cmd.stdout(log.try_clone().context("cannot share PostgreSQL's log file")?).stderr(log);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().context("cannot start postgres")?;
        self.postmaster = Some(child);
        Ok(())
    }

    /// Polls `pg_isready` until the server accepts connections, failing early if it exits.
    fn wait_until_ready(&mut self, log_start: u64) -> anyhow::Result<()> {
        let pg_isready = postgres_bin("pg_isready")?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let postmaster = self.postmaster.as_mut().context("PostgreSQL is not running")?;
            if let Some(status) = postmaster.try_wait().context("cannot check on the postmaster")? {
                self.postmaster = None;
                bail!(
                    "PostgreSQL exited ({status}) while starting; server log:\n{}",
                    self.log_tail(log_start)
                );
            }
            let ready = Command::new(&pg_isready)
                .args(["-q", "-t", "1", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .args(["-U", ADMIN_USER, "-d", "postgres"])
                .stdin(Stdio::null())
                .status()
                .context("cannot run pg_isready")?
                .success();
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "PostgreSQL did not accept connections on 127.0.0.1:{} within {READY_TIMEOUT:?}; server log:\n{}",
                    self.port,
                    self.log_tail(log_start)
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Creates [`APP_USER`] and [`APP_DATABASE`] unless they exist (a reused dir has them already), and
    /// makes [`MONITOR_USER`] a login with `pg_monitor`'s rights and its password from the credentials.
    fn create_app_database(&self) -> anyhow::Result<()> {
        create_app_database(&self.credentials.app, |database, sql| self.psql_on(database, sql))?;
        // The password is hex digits (see `credentials`), so it needs no quoting.
        self.psql_on(
            "postgres",
            &format!(
                "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{MONITOR_USER}') THEN \
                 CREATE ROLE {MONITOR_USER}; END IF; END $$; \
                 ALTER ROLE {MONITOR_USER} LOGIN PASSWORD '{}' NOSUPERUSER NOCREATEDB NOCREATEROLE; \
                 GRANT pg_monitor TO {MONITOR_USER};",
                self.credentials.monitor.expose_secret()
            ),
        )?;
        Ok(())
    }

    /// The last lines the server wrote to its log since byte `since`.
    fn log_tail(&self, since: u64) -> String {
        let mut text = String::new();
        let read = open_read(&self.log_file()).and_then(|mut file| {
            file.seek(SeekFrom::Start(since))?;
            Ok(file.read_to_string(&mut text)?)
        });
        if let Err(error) = read {
            return format!("(cannot read {}: {error})", self.log_file().display());
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

/// The postmaster is no [`Child`] (its output goes straight to the server log), so its name and state
/// are told here.
impl Component for Postgres {
    fn processes(&mut self) -> Vec<&mut Child> {
        Vec::new()
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn pids(&mut self) -> Vec<(String, u32)> {
        self.pid().map(|pid| (NAME.to_owned(), pid)).into_iter().collect()
    }

    /// `postgres` once the postmaster has exited: crashed, killed or stopped. A postmaster found gone is
    /// forgotten (its PID is free for another process), so [`Postgres::start_again`] can start it.
    fn exited(&mut self) -> Vec<String> {
        if self.postmaster.as_mut().is_some_and(|postmaster| !matches!(postmaster.try_wait(), Ok(None))) {
            self.postmaster = None;
        }
        match self.postmaster {
            Some(_) => Vec::new(),
            None => vec![NAME.to_owned()],
        }
    }

    /// A fast shutdown ([`Postgres::stop`]).
    fn stop(&mut self) -> anyhow::Result<()> {
        Postgres::stop(self)
    }
}

/// Runs `sql` as the superuser on 127.0.0.1:`port`, database `database`, with
/// `psql -X -A -t -q -v ON_ERROR_STOP=1`; returns its standard output, trimmed. The SQL goes through psql's standard input, never its command line, which any local user can
/// read in `/proc` (a `CREATE ROLE … PASSWORD`).
pub(crate) fn run_psql(
    port: u16,
    admin_password: &SecretString,
    database: &str,
    sql: &str,
) -> anyhow::Result<String> {
    let mut psql = Command::new(postgres_bin("psql")?)
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
        .args(["-p", &port.to_string(), "-U", ADMIN_USER, "-d", database])
        .env("PGPASSWORD", admin_password.expose_secret())
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run psql")?;
    let mut stdin = psql.stdin.take().context("psql's standard input")?;
    // psql reads all of it before it answers, so the write cannot block on a full output pipe.
    let written = stdin.write_all(sql.as_bytes());
    drop(stdin);
    let output = psql.wait_with_output().context("cannot run psql")?;
    written.context("cannot send SQL to psql")?;
    if !output.status.success() {
        bail!(
            "psql failed ({}) running {:?}: {}",
            output.status,
            without_passwords(sql),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// `sql` with every `PASSWORD '…'` literal replaced by `<redacted>`, for error messages.
fn without_passwords(sql: &str) -> String {
    match sql.split_once("PASSWORD '") {
        Some((head, rest)) => {
            let tail = rest.split_once('\'').map_or("", |(_, tail)| tail);
            format!("{head}PASSWORD '<redacted>'{}", without_passwords(tail))
        }
        None => sql.to_owned(),
    }
}

/// Creates [`APP_USER`] (password `app_password`) and [`APP_DATABASE`] through `psql(database, sql)`,
/// unless they exist. The role is no superuser and cannot create roles or databases; it owns its
/// database, so the tables it migrates are its own and nothing outside that database is.
pub(crate) fn create_app_database(
    app_password: &SecretString,
    psql: impl Fn(&str, &str) -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    // The password is hex digits (see `credentials`), so it needs no quoting.
    psql(
        "postgres",
        &format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_USER}') THEN \
             CREATE ROLE {APP_USER} LOGIN PASSWORD '{}' NOSUPERUSER NOCREATEDB NOCREATEROLE; \
             END IF; END $$",
            app_password.expose_secret()
        ),
    )?;
    let exists =
        psql("postgres", &format!("SELECT count(*) FROM pg_database WHERE datname = '{APP_DATABASE}'"))?;
    if exists == "0" {
        psql("postgres", &format!("CREATE DATABASE {APP_DATABASE} OWNER {APP_USER}"))?;
    }
    Ok(())
}

/// A cluster's directory: `dir`, created if missing and resolved, or a fresh temporary one named
/// `prefix…`, removed when the returned `TempDir` drops.
pub(crate) fn cluster_dir(dir: Option<&Path>, prefix: &str) -> anyhow::Result<(PathBuf, Option<TempDir>)> {
    match dir {
        Some(dir) => {
            fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            Ok((dir.canonicalize().with_context(|| format!("cannot resolve {}", dir.display()))?, None))
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix(prefix)
                .tempdir()
                .context("cannot create a temporary directory for a database cluster")?;
            Ok((temp.path().to_owned(), Some(temp)))
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Err(error) = self.resume() {
            tracing::warn!(error = %format!("{error:#}"), "cannot resume the paused PostgreSQL before stopping it");
        }
        if let Some(postmaster) = self.postmaster.as_mut() {
            // SIGQUIT = immediate shutdown: no checkpoint, the next start recovers. Fine for a cluster we discard.
            if !matches!(signal_and_wait(postmaster, Signal::SIGQUIT, DROP_TIMEOUT), Ok(Some(_))) {
                let _ = postmaster.kill();
                if let Err(error) = wait_timeout(postmaster, DROP_TIMEOUT) {
                    tracing::warn!(error = %format!("{error:#}"), "cannot wait for the postmaster");
                }
            }
        }
        if let Some(temp_dir) = self.temp_dir.take() {
            let path = temp_dir.path().to_owned();
            if let Err(error) = temp_dir.close() {
                tracing::warn!(dir = %path.display(), %error, "cannot remove PostgreSQL's temporary directory");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_sql_is_quoted_without_its_passwords() {
        let sql = "CREATE ROLE a PASSWORD 'secret1'; ALTER ROLE b LOGIN PASSWORD 'secret2' NOSUPERUSER";
        let shown = without_passwords(sql);
        assert_eq!(
            shown,
            "CREATE ROLE a PASSWORD '<redacted>'; ALTER ROLE b LOGIN PASSWORD '<redacted>' NOSUPERUSER"
        );
    }
}
