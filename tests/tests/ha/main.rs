//! The high-availability fleet on a Patroni cluster (real etcd, Patroni and PostgreSQL): the cluster
//! and a node on it, what a read promises, and the cluster as an operator runs it with `fleetctl`. One
//! test binary, so the long operator test runs beside the others.

mod cluster;
mod ops;
mod reads;
