//! A real PostgreSQL cluster: start, query, stop, start again, and nothing left behind after drop.

use std::path::Path;
use std::process::Command;

use fleet_local::{postgres_bin, Postgres, PostgresOptions};

#[test]
fn a_cluster_starts_stops_starts_again_and_leaves_nothing_behind() {
    let mut postgres = Postgres::start(PostgresOptions::default()).unwrap();
    assert_eq!(postgres.psql("select 1").unwrap(), "1");
    assert!(postgres.url().ends_with(&format!("@127.0.0.1:{}/appdb", postgres.port())));
    assert_eq!(psql_as_app(&postgres.url(), "select current_user"), "appuser");

    let port = postgres.port();
    postgres.psql("create table kept (n int); insert into kept values (42)").unwrap();
    postgres.stop().unwrap();
    assert_eq!(postgres.pid(), None);
    postgres.start_again().unwrap();
    assert_eq!(postgres.port(), port);
    assert_eq!(postgres.psql("select n from kept").unwrap(), "42");

    let pid = postgres.pid().unwrap();
    let cluster_dir = postgres.data_dir().parent().unwrap().to_owned();
    drop(postgres);
    assert!(!cluster_dir.exists(), "{} is still there", cluster_dir.display());
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "postmaster {pid} is still running");
}

#[test]
fn the_app_role_needs_its_password_over_tcp() {
    let postgres = Postgres::start(PostgresOptions::default()).unwrap();
    // The right URL with another password (the real one is random per cluster).
    let wrong = postgres.display_url().replace("appuser@", "appuser:wrong@");
    assert_ne!(wrong, postgres.url());
    let output = Command::new(postgres_bin("psql").unwrap())
        .args(["-X", "-A", "-t", "-w", "-d", &wrong, "-c", "select 1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("password authentication failed"));
}

#[test]
fn the_app_role_is_no_superuser_and_owns_only_its_database() {
    let postgres = Postgres::start(PostgresOptions::default()).unwrap();
    let url = postgres.url();
    let role = "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls \
                FROM pg_roles WHERE rolname = current_user";
    assert_eq!(psql_as_app(&url, role), "f|f|f|f|f");
    for (sql, refusal) in [
        ("CREATE ROLE intruder LOGIN", "permission denied to create role"),
        ("SELECT rolpassword FROM pg_authid", "permission denied for table pg_authid"),
        ("CREATE DATABASE other", "permission denied to create database"),
        ("ALTER ROLE appuser SUPERUSER", "must be superuser"),
    ] {
        let stderr = psql_as_app_fails(&url, sql);
        assert!(stderr.contains(refusal), "{sql}: {stderr}");
    }
    // It owns its database (so it can migrate its own tables) and nothing else.
    let owned = "SELECT string_agg(datname, ',') FROM pg_database WHERE datdba = \
                 (SELECT oid FROM pg_roles WHERE rolname = current_user)";
    assert_eq!(psql_as_app(&url, owned), "appdb");
    psql_as_app(&url, "CREATE TABLE mine (n int)");
    let tables = "SELECT string_agg(tablename || ':' || tableowner, ',') FROM pg_tables \
                  WHERE schemaname NOT IN ('pg_catalog', 'information_schema')";
    assert_eq!(psql_as_app(&url, tables), "mine:appuser");
}

/// Runs `sql` with psql as the application role, authenticating with the password in `url`.
fn psql_as_app(url: &str, sql: &str) -> String {
    let output = psql(url, sql);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Runs `sql` as [`psql_as_app`] does, asserting that it fails; returns psql's error output.
fn psql_as_app_fails(url: &str, sql: &str) -> String {
    let output = psql(url, sql);
    assert!(!output.status.success(), "{sql} succeeded");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn psql(url: &str, sql: &str) -> std::process::Output {
    let psql = postgres_bin("psql").unwrap();
    Command::new(psql)
        .args(["-X", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql])
        .output()
        .unwrap()
}
