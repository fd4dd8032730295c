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
    let wrong = postgres.url().replace("apppass", "wrong");
    let output = Command::new(postgres_bin("psql").unwrap())
        .args(["-X", "-A", "-t", "-w", "-d", &wrong, "-c", "select 1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("password authentication failed"));
}

/// Runs `sql` with psql as the application role, authenticating with the password in `url`.
fn psql_as_app(url: &str, sql: &str) -> String {
    let output = Command::new(postgres_bin("psql").unwrap())
        .args(["-X", "-A", "-t", "-w", "-d", url, "-c", sql])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}
