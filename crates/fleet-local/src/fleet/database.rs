//! A fleet's database, chosen here from its options: one PostgreSQL, a Patroni cluster (a primary and N
//! replicas) whose write and read URLs the nodes get as `DATABASE_URL` and `DATABASE_READ_URL`, or a
//! PostgreSQL the user already has (see [`ExternalDatabase`]).

use std::path::{Path, PathBuf};

use anyhow::bail;

use super::external::ExternalDatabase;
use super::{FleetOptions, LOGS, MAX_CONNECTIONS};
use crate::postgres::{check_reachable, postgres_user};
use crate::{Component, PatroniCluster, PatroniOptions, Postgres, PostgresOptions, DEADLOCK_TIMEOUT};

/// The database a fleet runs on.
#[derive(Debug)]
pub enum Database {
    Single(Postgres),
    Cluster(PatroniCluster),
    /// Not started by the fleet, nor stopped by it.
    External(ExternalDatabase),
}

/// What a fault that needs the fleet's own database says about an external one.
const NOT_OURS: &str =
    "this fleet runs on a database it did not start (`fleetctl up --database-url`): it does not restart, pause or fail it over";

impl Database {
    /// Starts the fleet's database: one PostgreSQL, or a Patroni cluster when there are replicas (or
    /// none: the user's, when the options name one). It is kept in `<dir>/postgres` (or
    /// `<dir>/patroni`) if the options ask and the `postgres` user can reach it; otherwise it is a
    /// throwaway one, and a warning says why.
    pub(super) fn start(
        opts: &FleetOptions,
        dir: &Path,
        warnings: &mut Vec<String>,
    ) -> anyhow::Result<Database> {
        if let Some(url) = &opts.database_url {
            return Ok(Database::External(ExternalDatabase::open(url.clone(), dir)?));
        }
        let kept_dir = dir.join(if opts.replicas > 0 { "patroni" } else { "postgres" });
        let keep_database = opts.keep_database && opts.dir.is_some();
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
        let logs = dir.join(LOGS);
        Ok(match opts.replicas {
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
                logs: Some(logs),
            })?),
        })
    }

    /// The nodes' `DATABASE_URL` (a secret): the server, or every member with
    /// `target_session_attrs=read-write`.
    pub fn url(&self) -> String {
        match self {
            Database::Single(pg) => pg.url(),
            Database::Cluster(cluster) => cluster.url(),
            Database::External(external) => external.url().expose().to_owned(),
        }
    }

    /// The nodes' `DATABASE_READ_URL` (a secret): every member, read-only, hosts in random order; none
    /// for a single server.
    pub fn read_url(&self) -> Option<String> {
        match self {
            Database::Single(_) | Database::External(_) => None,
            Database::Cluster(cluster) => Some(cluster.read_url()),
        }
    }

    /// A URL psql can use (the current primary), without a password.
    pub fn display_url(&self) -> String {
        match self {
            Database::Single(pg) => pg.display_url(),
            Database::Cluster(cluster) => cluster.display_url(),
            Database::External(external) => external.url().display_url(),
        }
    }

    /// Where the data is (an external database's: where its password file is).
    pub fn dir(&self) -> &Path {
        match self {
            Database::Single(pg) => pg.dir(),
            Database::Cluster(cluster) => cluster.dir(),
            Database::External(external) => external.dir(),
        }
    }

    /// The libpq password file with the superuser's and the application's passwords (an external
    /// database's: its URL's password).
    pub fn password_file(&self) -> PathBuf {
        match self {
            Database::Single(pg) => pg.password_file(),
            Database::Cluster(cluster) => cluster.password_file(),
            Database::External(external) => external.password_file(),
        }
    }

    /// The single PostgreSQL, or an error saying the fleet runs on a cluster.
    pub fn postgres(&mut self) -> anyhow::Result<&mut Postgres> {
        match self {
            Database::Single(pg) => Ok(pg),
            Database::Cluster(_) => {
                bail!("this fleet runs on a Patroni cluster, not one PostgreSQL (`fleetctl chaos --help` names the faults for a cluster)")
            }
            Database::External(_) => bail!(NOT_OURS),
        }
    }

    /// The Patroni cluster, or an error saying the fleet runs on one PostgreSQL.
    pub fn cluster(&mut self) -> anyhow::Result<&mut PatroniCluster> {
        match self {
            Database::Cluster(cluster) => Ok(cluster),
            Database::Single(_) => {
                bail!("this fleet runs on one PostgreSQL (`fleetctl up --replicas N` starts a cluster)")
            }
            Database::External(_) => bail!(NOT_OURS),
        }
    }

    /// The database as one of the fleet's components: stopped by PostgreSQL's fast shutdown, or member by
    /// member (Patroni and its postmaster), then etcd; an external one has no process and is left
    /// running.
    pub fn component(&mut self) -> &mut dyn Component {
        match self {
            Database::Single(pg) => pg,
            Database::Cluster(cluster) => cluster,
            Database::External(external) => external,
        }
    }
}
