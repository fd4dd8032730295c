//! A pgfleet node: the v1 HTTP API (see DESIGN.md) on a shared PostgreSQL.

pub mod cli;
pub mod config;
pub mod db;
pub mod errors;
pub mod listener;
pub mod metrics;
pub mod routes;
pub mod startup;
pub mod telemetry;
