//! A fleet's database: one PostgreSQL, or a Patroni cluster (a primary and N replicas) whose write and
//! read URLs the nodes get as `DATABASE_URL` and `DATABASE_READ_URL`.

use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::{PatroniCluster, Postgres};

/// The database a fleet runs on.
#[derive(Debug)]
pub enum Database {
    Single(Postgres),
    Cluster(PatroniCluster),
}

impl Database {
    /// The nodes' `DATABASE_URL` (a secret): the server, or every member with
    /// `target_session_attrs=read-write`.
    pub fn url(&self) -> String {
        match self {
            Database::Single(pg) => pg.url(),
            Database::Cluster(cluster) => cluster.url(),
        }
    }

    /// The nodes' `DATABASE_READ_URL` (a secret): every member, read-only, hosts in random order; none
    /// for a single server.
    pub fn read_url(&self) -> Option<String> {
        match self {
            Database::Single(_) => None,
            Database::Cluster(cluster) => Some(cluster.read_url()),
        }
    }

    /// A URL psql can use (the current primary), without a password.
    pub fn display_url(&self) -> String {
        match self {
            Database::Single(pg) => pg.display_url(),
            Database::Cluster(cluster) => cluster.display_url(),
        }
    }

    /// Where the data is.
    pub fn dir(&self) -> &Path {
        match self {
            Database::Single(pg) => pg.dir(),
            Database::Cluster(cluster) => cluster.dir(),
        }
    }

    /// The libpq password file with the superuser's and the application's passwords.
    pub fn password_file(&self) -> PathBuf {
        match self {
            Database::Single(pg) => pg.password_file(),
            Database::Cluster(cluster) => cluster.password_file(),
        }
    }

    /// The single PostgreSQL, or an error saying the fleet runs on a cluster.
    pub fn postgres(&mut self) -> anyhow::Result<&mut Postgres> {
        match self {
            Database::Single(pg) => Ok(pg),
            Database::Cluster(_) => {
                bail!("this fleet runs on a Patroni cluster, not one PostgreSQL (`fleetctl chaos --help` names the faults for a cluster)")
            }
        }
    }

    /// The Patroni cluster, or an error saying the fleet runs on one PostgreSQL.
    pub fn cluster(&mut self) -> anyhow::Result<&mut PatroniCluster> {
        match self {
            Database::Cluster(cluster) => Ok(cluster),
            Database::Single(_) => {
                bail!("this fleet runs on one PostgreSQL (`fleetctl up --replicas N` starts a cluster)")
            }
        }
    }

    /// Stops the database: PostgreSQL's fast shutdown, or every member (Patroni and its postmaster) and etcd.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        match self {
            Database::Single(pg) => pg.stop(),
            Database::Cluster(cluster) => cluster.stop(),
        }
    }
}
