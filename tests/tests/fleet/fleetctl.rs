//! `fleetctl` as a user runs it, across restarts: `top` shows who waits on whom, the database outlives
//! `fleetctl up` and `--fresh` starts over.

use std::path::Path;
use std::time::{Duration, Instant};

use fleet_tests::{fleetctl, fleetctl_up, Api};
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
