//! `fleetctl` as a user runs it, across restarts: `top` shows who waits on whom, the database outlives
//! `fleetctl up` and `--fresh` starts over; `--database-url` runs the fleet on a PostgreSQL of the user's.

use std::path::Path;
use std::time::{Duration, Instant};

use fleet_tests::{fleetctl, fleetctl_bin, fleetctl_up, start_postgres, Api};
use reqwest::StatusCode;

/// The application's URL with its password, from the fleet's password file and the port `up` printed,
/// and `application_name` set to `name`.
fn database_url(up: &fleet_local::Child, dir: &Path, name: &str) -> String {
    let line = up.wait_for_line("database: postgres://appuser@127.0.0.1:", Duration::from_secs(1)).unwrap();
    let port = line.split("127.0.0.1:").nth(1).unwrap().split('/').next().unwrap();
    let pgpass = std::fs::read_to_string(dir.join("postgres/pgpass")).unwrap();
    let password = pgpass.lines().find_map(|l| l.strip_prefix("*:*:*:appuser:")).unwrap();
    format!("postgres://appuser:{password}@127.0.0.1:{port}/appdb?application_name={name}")
}

/// `fleetctl top --once` until a lock wait appears; returns its line and the whole view.
async fn lock_wait_in_top(dir: &Path) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dir = dir.to_owned();
        let view = tokio::task::spawn_blocking(move || fleetctl(&dir, &["top", "--once"])).await.unwrap();
        let waits = view.split("LOCK WAITS").nth(1).unwrap_or_default().split("POOLS").next().unwrap();
        if let Some(line) = waits.lines().skip(1).find(|l| !l.trim().is_empty() && *l != "(none)") {
            return (line.to_owned(), view);
        }
        assert!(Instant::now() < deadline, "top never showed the lock wait:\n{view}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_a_nodes_lock_wait_and_its_blocker_and_the_data_outlives_fleetctl_up() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("fleet");
    let (up, url) = fleetctl_up(&dir, &["--nodes", "2", "--no-prometheus"]);
    let api = Api::new(&url);
    assert_eq!(api.increment("held").await.body["value"], 1);

    // A client holds the row; app-1's increment of it waits for the lock.
    let (mut client, connection) =
        tokio_postgres::connect(&database_url(&up, &dir, "holder"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let holder = client.transaction().await.unwrap();
    holder.execute("SELECT value FROM counters WHERE key = 'held' FOR UPDATE", &[]).await.unwrap();
    let blocked = tokio::spawn({
        let node = Api::new(format!("{url}/app-1"));
        async move { node.increment("held").await }
    });
    let (line, view) = lock_wait_in_top(&dir).await;
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.first(), Some(&"app-1"), "the waiter is app-1: {line}\n{view}");
    assert!(line.contains("holder") && line.contains("idle in transaction"), "{line}\n{view}");
    let waited: f64 = words[2].parse().unwrap_or_else(|_| panic!("no wait time in {line:?}"));
    assert!(waited >= 0.0, "{line}");
    for node in ["app-1", "app-2"] {
        let pool = view.lines().skip_while(|l| !l.starts_with("POOLS")).find(|l| l.starts_with(node));
        assert_eq!(pool.map(|l| l.split_whitespace().nth(1)), Some(Some("5")), "{node}'s pool:\n{view}");
    }
    assert!(view.lines().any(|l| l.starts_with("app-1") && l.contains("active")), "{view}");
    holder.commit().await.unwrap();
    assert_eq!(blocked.await.unwrap().body["value"], 2);
    drop(client);
    fleetctl(&dir, &["down"]);
    drop(up);

    // The next `up` finds the data, with the same passwords.
    let pgpass = std::fs::read(dir.join("postgres/pgpass")).unwrap();
    let (up, url) = fleetctl_up(&dir, &["--nodes", "2", "--no-prometheus"]);
    assert_eq!(Api::new(&url).get("/api/counters/held").await.body["value"], 2);
    assert_eq!(std::fs::read(dir.join("postgres/pgpass")).unwrap(), pgpass);
    // Migrations found the schema in place, quietly.
    let logs = fleetctl(&dir, &["logs"]);
    assert!(logs.contains("schema up to date") && !logs.contains("NOTICE"), "{logs}");
    fleetctl(&dir, &["down"]);
    drop(up);

    // --fresh starts over, with new passwords; --verbose shows the children's output, prefixed.
    let (up, url) = fleetctl_up(&dir, &["--nodes", "2", "--no-prometheus", "--fresh", "--verbose"]);
    assert_eq!(Api::new(&url).get("/api/counters/held").await.status, StatusCode::NOT_FOUND);
    let output = up.recent_output();
    assert!(output.contains("[app-2] ") && !output.contains('\x1b'), "{output}");
    assert_ne!(std::fs::read(dir.join("postgres/pgpass")).unwrap(), pgpass);
    fleetctl(&dir, &["down"]);
    drop(up);
}

/// A password that shows only where it is given.
const THEIR_PASSWORD: &str = "Tr0ub4dor-their-own";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_a_database_url_runs_on_that_database_as_its_role_and_never_prints_the_password() {
    // The user's PostgreSQL, with a role and a database of theirs.
    let pg = start_postgres();
    pg.psql(&format!("CREATE ROLE shop LOGIN PASSWORD '{THEIR_PASSWORD}'")).unwrap();
    pg.psql("CREATE DATABASE shopdb OWNER shop").unwrap();
    let url = format!("postgres://shop:{THEIR_PASSWORD}@127.0.0.1:{}/shopdb", pg.port());
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("fleet");
    let (up, fleet_url) = fleetctl_up(&dir, &["--nodes", "2", "--database-url", &url]);
    let api = Api::new(&fleet_url);
    for value in 1..=3 {
        assert_eq!(api.increment("theirs").await.body["value"], value);
    }

    // The increments are in their database, in tables the nodes made as their role; the private
    // PostgreSQL's own application database was never touched.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let row = client.query_one("SELECT value FROM counters WHERE key = 'theirs'", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 3);
    let owner = client.query_one("SELECT tableowner::text FROM pg_tables WHERE tablename = 'counters'", &[]);
    assert_eq!(owner.await.unwrap().get::<_, String>(0), "shop");
    assert_eq!(pg.psql("SELECT to_regclass('counters') IS NULL").unwrap(), "t");

    // status and top work on such a fleet, top connected as the URL's role.
    let status = fleetctl(&dir, &["status"]);
    assert!(status.lines().any(|l| l.starts_with("app-2") && l.contains("healthy")), "{status}");
    let shown = format!("postgres://shop@127.0.0.1:{}/shopdb", pg.port());
    let top = fleetctl(&dir, &["top", "--once"]);
    assert!(top.contains(&format!("database {shown}")), "{top}");
    assert!(top.lines().any(|l| l.starts_with("app-1") && l.contains("idle")), "{top}");

    let logs = fleetctl(&dir, &["logs"]);
    fleetctl(&dir, &["down"]);
    let output = up.recent_output();
    drop(up);
    assert!(output.contains(&format!("database: {shown} ")), "{output}");
    assert!(output.contains("postgres-exporter: not started"), "{output}");
    for (what, text) in [("up", &output), ("logs", &logs), ("status", &status), ("top", &top)] {
        assert!(!text.contains(THEIR_PASSWORD), "{what} printed the password:\n{text}");
    }
    // Their database outlives the fleet; the fleet's copy of the password does not.
    assert!(!dir.join("external").exists());
    let after = client.query_one("SELECT value FROM counters WHERE key = 'theirs'", &[]).await.unwrap();
    assert_eq!(after.get::<_, i64>(0), 3);
}

#[test]
fn a_database_url_is_refused_with_replicas_or_fresh_and_a_bad_one_without_being_quoted() {
    let temp = tempfile::tempdir().unwrap();
    let good = format!("postgres://shop:{THEIR_PASSWORD}@127.0.0.1:1/shopdb");
    let bad = format!("postgres://shop:{THEIR_PASSWORD}@127.0.0.1:1/shopdb?password=again");
    for (args, expected) in [
        (vec!["--database-url", &good, "--replicas", "1"], "cannot be used with"),
        (vec!["--database-url", &good, "--fresh"], "cannot be used with"),
        (vec!["--database-url", &bad], "not as ?password="),
        (vec!["--database-url", "mysql://shop@127.0.0.1/shopdb"], "must start with postgres://"),
    ] {
        let out = std::process::Command::new(fleetctl_bin())
            .args(["up", "--port", "0", "--dir"])
            .arg(temp.path().join("fleet"))
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "a usage error for {args:?}: {stderr}");
        assert!(stderr.contains(expected) && !stderr.contains(THEIR_PASSWORD), "{args:?}: {stderr}");
    }
    assert!(!temp.path().join("fleet").exists(), "nothing started");
}
