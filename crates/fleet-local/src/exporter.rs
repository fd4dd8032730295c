//! PostgreSQL's metrics for Prometheus: the Debian package `prometheus-postgres-exporter`, run as the
//! service user and connected as the cluster's [`crate::postgres::MONITOR_USER`] (`pg_monitor`'s rights, no superuser), with the fleet's own queries ([`QUERIES`]) beside its defaults
//! (`pg_up`, `pg_stat_activity_count{state}`, `pg_stat_database_deadlocks`, `pg_stat_database_xact_*` …).

use std::path::Path;
use std::process::Command;

use crate::component::{spawn_ready, Component, Log};
use crate::files::write_new;
use crate::users::service_user;
use crate::{exporter_bin, free_port, Child, Postgres};

/// The fleet's queries (`--extend.query-path`): lock waits, which the defaults do not show. Also the
/// compose file's `deploy/postgres-exporter/queries.yaml` (a golden test keeps it equal).
pub const QUERIES: &str = r#"# PostgreSQL exporter queries beyond its defaults. The text of fleet_local::exporter::QUERIES: edit
# that, not this file (refreshed with `UPDATE_GOLDEN=1 cargo test -p fleet-tests --test fleet -- deploy::`).
pg_lock_waits:
  query: |
    SELECT count(*) AS waiting,
           COALESCE(EXTRACT(EPOCH FROM max(now() - waitstart)), 0) AS longest_wait_seconds
    FROM pg_locks WHERE NOT granted
  metrics:
    - waiting:
        usage: GAUGE
        description: Lock requests waiting for another session's lock
    - longest_wait_seconds:
        usage: GAUGE
        description: How long the longest-waiting lock request has waited
"#;

/// How to start the exporter.
#[derive(Debug)]
pub struct ExporterOptions<'a> {
    /// The server it reads, as [`crate::postgres::MONITOR_USER`].
    pub postgres: &'a Postgres,
    /// Where its queries file goes: a directory of the service user's.
    pub dir: &'a Path,
    pub log: Log,
}

/// A running exporter, stopped when dropped.
#[derive(Debug)]
pub struct Exporter {
    child: Child,
    port: u16,
}

impl Exporter {
    /// Starts the exporter as the service user on a free loopback port; returns once its `/metrics`
    /// answers.
    pub fn start(opts: ExporterOptions<'_>) -> anyhow::Result<Exporter> {
        let user = service_user()?;
        let queries = opts.dir.join("postgres-exporter-queries.yaml");
        write_new(&queries, QUERIES.as_bytes(), 0o600, user.as_ref())?;
        let port = free_port()?;
        let mut cmd = Command::new(exporter_bin()?);
        cmd.arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg(format!("--extend.query-path={}", queries.display()))
            // The connection string holds a password: the environment (readable by its user and root
            // only), never the command line.
            .env(
                "DATA_SOURCE_NAME",
                format!("{}?sslmode=disable&application_name=postgres-exporter", opts.postgres.monitor_url()),
            );
        let ready = format!("http://127.0.0.1:{port}/metrics");
        let child = spawn_ready("postgres-exporter", cmd, &opts.log, &ready)?;
        Ok(Exporter { child, port })
    }
}

impl Component for Exporter {
    fn processes(&mut self) -> Vec<&mut Child> {
        vec![&mut self.child]
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}
