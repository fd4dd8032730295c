//! A pgfleet node: the v1 HTTP API (counters, bulk inserts, statistics, health probes and the isolation
//! lab; `routes::ROUTES` lists every endpoint) on a shared PostgreSQL.

pub mod cli;
pub mod config;
pub mod db;
pub mod errors;
pub mod listener;
pub mod metrics;
pub mod routes;
pub mod startup;
pub mod telemetry;
