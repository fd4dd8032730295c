//! Start and stop a private local fleet: a PostgreSQL cluster, fleet-app nodes, nginx, Prometheus and
//! PostgreSQL's exporter, as child processes on loopback. Used by `fleetctl up` and by the integration tests.

pub mod bins;
pub mod component;
pub mod etcd;
pub mod exporter;
pub mod files;
pub mod fleet;
pub mod nginx;
pub mod node;
pub mod patroni;
pub mod postgres;
pub mod process;
mod proctree;
pub mod prometheus;
pub mod users;

pub use bins::{etcd_bin, exporter_bin, nginx_bin, patroni_bin, postgres_bin, prometheus_bin};
pub use component::{Component, Log};
pub use node::{Node, NodeOptions};
pub use patroni::{MemberStatus, PatroniCluster, PatroniOptions};
pub use postgres::{Postgres, PostgresOptions, DEADLOCK_TIMEOUT};
pub use process::Child;
pub use proctree::{descendants, has_exited};

/// The lowest port a local fleet picks: above the well-known and most registered services' ports.
const LOWEST_PORT: u16 = 10_000;
/// Where the kernel's ephemeral range starts when `/proc` does not say (Linux's default).
const DEFAULT_EPHEMERAL_LOW: u16 = 32_768;

/// A port on 127.0.0.1 that was free a moment ago, picked at random *below* the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`). The kernel hands ports of that range to outgoing connections, so a
/// port picked there (as `bind(0)` does) can be taken by any client socket before the server meant to
/// listen on it starts, and a Patroni member starts many seconds after its ports are chosen. Below the
/// range only another listener can take it; callers that bind it report a clear error if one did.
pub fn free_port() -> anyhow::Result<u16> {
    use std::hash::{BuildHasher, Hasher};
    let high = ephemeral_low().unwrap_or(DEFAULT_EPHEMERAL_LOW).max(LOWEST_PORT + 1000);
    let random = std::collections::hash_map::RandomState::new();
    for attempt in 0u64..1000 {
        let mut hasher = random.build_hasher();
        hasher.write_u64(attempt);
        let port = LOWEST_PORT + (hasher.finish() % u64::from(high - LOWEST_PORT)) as u16;
        if std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port on 127.0.0.1 between {LOWEST_PORT} and {high}")
}

/// `text` double-quoted, backslashes and quotes escaped: a string as nginx's config and YAML (Prometheus's)
/// both read it, whatever it holds (paths may hold spaces).
pub(crate) fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The first port of the kernel's ephemeral range.
fn ephemeral_low() -> Option<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    range.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_bindable_and_outside_the_ephemeral_range() {
        let low = ephemeral_low().unwrap_or(DEFAULT_EPHEMERAL_LOW);
        let ports: std::collections::BTreeSet<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        assert!(ports.len() > 40, "picked at random: {ports:?}");
        for port in ports {
            assert!((LOWEST_PORT..low).contains(&port), "{port}");
            std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }
}
