//! `fleet.json`: what a running `fleetctl up` tells `status`, `top`, `logs` and `down` in other shells.
//! It holds no secret: the database's passwords stay in their own 0600 file, named here.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The running fleet, as recorded in `<dir>/fleet.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct FleetState {
    /// The PID of the `fleetctl up` that owns the fleet.
    pub pid: u32,
    pub url: String,
    pub prometheus: Option<String>,
    pub nodes: Vec<NodeState>,
    /// PostgreSQL's TCP port on 127.0.0.1 (a cluster's primary's when the fleet started); none when the
    /// fleet runs on a database it did not start.
    pub database_port: Option<u16>,
    /// The database the fleet did not start (`up --database-url`), without its password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// The libpq password file holding the superuser's and the application's passwords (or the
    /// external database's URL's).
    pub password_file: PathBuf,
    /// The Patroni cluster's members; none when the fleet runs on one PostgreSQL.
    #[serde(default)]
    pub members: Vec<MemberState>,
}

/// One member of the fleet's Patroni cluster.
#[derive(Debug, Serialize, Deserialize)]
pub struct MemberState {
    pub name: String,
    /// Its PostgreSQL's TCP port on 127.0.0.1.
    pub port: u16,
    /// Its Patroni's REST API, `http://127.0.0.1:PORT`.
    pub api: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub url: String,
    pub pid: u32,
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join("fleet.json")
}

impl FleetState {
    /// Writes `<dir>/fleet.json`, readable by us only.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let json = serde_json::to_vec_pretty(self)?;
        fleet_local::files::write_new(&path(dir), &json, 0o600, None).context("cannot write fleet.json")
    }

    pub fn read(dir: &Path) -> anyhow::Result<Self> {
        let path = path(dir);
        let text = fs::read(&path).with_context(|| {
            format!("no fleet is running from {} ({} not found)", dir.display(), path.display())
        })?;
        serde_json::from_slice(&text).with_context(|| format!("{} is not a fleet state file", path.display()))
    }
}
