//! Start and stop a private local fleet: a PostgreSQL cluster, fleet-app nodes (and later nginx and
//! Prometheus), as child processes on loopback. Used by `fleetctl up` and by the integration tests.

pub mod bins;
pub mod node;
pub mod postgres;
pub mod process;

pub use bins::{nginx_bin, postgres_bin, prometheus_bin};
pub use node::{Node, NodeOptions};
pub use postgres::{Postgres, PostgresOptions};
pub use process::Child;
