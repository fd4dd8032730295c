//! Work a node gives up on does not go on without it: a transaction past its attempt's deadline is
//! cancelled on the server, not left to run until `statement_timeout`.

use std::time::{Duration, Instant};

use fleet_tests::TestApp;
use reqwest::StatusCode;

/// Takes the row lock on counter `key` in a transaction of the test's own; held until the returned
/// client commits or is dropped.
async fn lock_counter(app: &TestApp, key: &str) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(&app.pg.admin_url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!("BEGIN; SELECT value FROM counters WHERE key = '{key}' FOR UPDATE"))
        .await
        .unwrap();
    client
}

/// Sessions of node `app-1` running a statement that waits for a row lock.
const WAITING: &str = "SELECT count(*) FROM pg_stat_activity \
    WHERE application_name = 'fleet-app/app-1' AND state = 'active' AND wait_event_type = 'Lock'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_abandoned_at_its_deadline_is_cancelled_on_the_server() {
    // Each statement may run 4 s (as long as an attempt), but a transaction of two statements can
    // outlast the attempt's deadline (0.2 s of pool wait + 4 s): its second statement must then stop
    // when the node gives up on it, not 4 s after it began.
    let app = TestApp::spawn(&[
        ("POOL_WAIT_TIMEOUT_MS", "200"),
        ("DB_ATTEMPT_TIMEOUT_MS", "4000"),
        ("STATEMENT_TIMEOUT_MS", "4000"),
    ]);
    assert_eq!(app.api.transfer("a", "b", 1).await.status, StatusCode::OK);
    let (holds_a, holds_b) = (lock_counter(&app, "a").await, lock_counter(&app, "b").await);
    let transfer = tokio::spawn({
        let api = app.api.clone();
        async move { api.transfer("a", "b", 5).await }
    });
    let start = Instant::now();
    while app.sql_i64(WAITING) == 0 {
        assert!(start.elapsed() < Duration::from_secs(3), "the transfer never waited for a");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Late in the attempt, a is granted; the transfer then waits for b, in a statement that would run
    // until well after the deadline.
    tokio::time::sleep(Duration::from_millis(3500).saturating_sub(start.elapsed())).await;
    holds_a.batch_execute("COMMIT").await.unwrap();

    let reply = transfer.await.unwrap();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", reply.body);
    let answered = Instant::now();
    while app.sql_i64(WAITING) > 0 {
        assert!(answered.elapsed() < Duration::from_secs(1), "the abandoned statement still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its transaction is gone too: the row it had locked is free at once.
    holds_a
        .batch_execute("SET lock_timeout = '500ms'; BEGIN; SELECT value FROM counters WHERE key = 'a' FOR UPDATE; COMMIT")
        .await
        .expect("a is free again");
    drop(holds_b);
    let values = "SELECT string_agg(key || '=' || value, ',' ORDER BY key) FROM counters";
    assert_eq!(app.sql(values), "a=-1,b=1", "the abandoned transfer moved nothing");
}
