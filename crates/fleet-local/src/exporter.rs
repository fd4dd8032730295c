//! PostgreSQL's metrics for Prometheus: the Debian package `prometheus-postgres-exporter`, connected as
//! the cluster's superuser, with the fleet's own queries ([`QUERIES`]) beside its defaults
//! (`pg_up`, `pg_stat_activity_count{state}`, `pg_stat_database_deadlocks`, `pg_stat_database_xact_*` …).

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::files::write_new;
use crate::{exporter_bin, free_port, Child, Postgres};

/// How long the exporter may take to answer its `/metrics`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The fleet's queries (`--extend.query-path`): lock waits, which the defaults do not show. Also the
/// compose file's `deploy/postgres-exporter/queries.yaml` (a golden test keeps it equal).
pub const QUERIES: &str = r#"# PostgreSQL exporter queries beyond its defaults. The text of fleet_local::exporter::QUERIES: edit
# that, not this file (refreshed with `UPDATE_GOLDEN=1 cargo test -p fleet-tests --test deploy`).
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

/// Starts the exporter on a free loopback port against `pg` (its queries file in `dir`, its output in
/// `logs/postgres-exporter.log`) and returns it with its port once its `/metrics` answers.
pub fn start(pg: &Postgres, dir: &Path, logs: &Path, quiet: bool) -> anyhow::Result<(Child, u16)> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let queries = dir.join("postgres-exporter-queries.yaml");
    write_new(&queries, QUERIES.as_bytes(), 0o600, None)?;
    let port = free_port()?;
    let mut cmd = Command::new(exporter_bin()?);
    cmd.arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg(format!("--extend.query-path={}", queries.display()))
        // The connection string holds the superuser's password: the environment (readable by us
        // only), never the command line.
        .env(
            "DATA_SOURCE_NAME",
            format!("{}?sslmode=disable&application_name=postgres-exporter", pg.admin_url()),
        );
    let mut child =
        Child::spawn_logged("postgres-exporter", cmd, quiet, &logs.join("postgres-exporter.log"))?;
    child.wait_for_http(&format!("http://127.0.0.1:{port}/metrics"), Instant::now() + READY_TIMEOUT)?;
    Ok((child, port))
}
