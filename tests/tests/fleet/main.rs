//! Whole fleets as the launcher and `fleetctl` start them (nginx, Prometheus, nodes, PostgreSQL), and
//! the deployment files. One test binary, so its tests share the test threads.

mod bench;
mod chaos;
mod claims;
mod deploy;
mod fleetctl;
mod launcher;
