//! Start and stop a private local fleet: a PostgreSQL cluster, fleet-app nodes, nginx, Prometheus and
//! PostgreSQL's exporter, as child processes on loopback. Used by `fleetctl up` and by the integration tests.

pub mod bins;
pub mod etcd;
pub mod exporter;
pub mod fleet;
pub mod nginx;
pub mod node;
pub mod patroni;
pub mod postgres;
pub mod process;
mod proctree;
pub mod prometheus;

pub use bins::{etcd_bin, exporter_bin, nginx_bin, patroni_bin, postgres_bin, prometheus_bin};
pub use node::{Node, NodeOptions};
pub use patroni::{MemberStatus, PatroniCluster, PatroniOptions};
pub use postgres::{Postgres, PostgresOptions, DEADLOCK_TIMEOUT};
pub use process::Child;

/// A port on 127.0.0.1 that was free a moment ago (the OS picks it; a race with another process
/// taking it first is possible, and callers that bind it report a clear error).
pub fn free_port() -> anyhow::Result<u16> {
    use anyhow::Context;
    let listener =
        std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).context("cannot find a free port")?;
    Ok(listener.local_addr().context("cannot read the free port")?.port())
}
