//! Idempotency keys: a write carrying one happens once, whichever node sees the repeats.

use std::time::{Duration, Instant};

use fleet_app::db::idempotency::{CLEANUP_BATCH_KEYS, CLEANUP_LOCK_KEY};
use fleet_app::routes::IDEMPOTENCY_KEY;
use fleet_local::Node;
use fleet_tests::{node_options, Api, Reply, TestApp};
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn post_once(api: &Api, path: &str, key: &str, body: &Value) -> Reply {
    let response = api
        .http
        .post(format!("{}{path}", api.url))
        .header(IDEMPOTENCY_KEY, key)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    Reply { status, headers, body }
}

fn replayed(reply: &Reply) -> bool {
    reply.headers.get("idempotent-replayed").is_some_and(|v| v == "true")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_write_on_any_node_returns_the_first_response_and_writes_once() {
    let app = TestApp::spawn(&[]);
    let other = Node::spawn(node_options(&app.pg, "app-2", &[])).unwrap();
    let other = Api::new(other.url());

    let first = post_once(&app.api, "/api/increment", "inc-1", &json!({"key": "k"})).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    assert!(!replayed(&first));
    for api in [&app.api, &other] {
        let again = post_once(api, "/api/increment", "inc-1", &json!({"key": "k"})).await;
        assert_eq!(again.status, StatusCode::OK);
        assert!(replayed(&again), "a repeat is marked as a replay");
        assert_eq!(again.body, first.body, "a repeat returns exactly the stored response");
    }
    assert_eq!(app.sql_i64("SELECT value FROM counters WHERE key = 'k'"), 1);

    let transfer = json!({"from": "a", "to": "b", "amount": 5});
    let first = post_once(&app.api, "/api/transfer", "tr-1", &transfer).await;
    let again = post_once(&other, "/api/transfer", "tr-1", &transfer).await;
    assert_eq!((first.status, again.status), (StatusCode::OK, StatusCode::OK));
    assert!(!replayed(&first) && replayed(&again), "a repeated transfer is marked as a replay");
    assert_eq!(again.body, first.body);
    assert_eq!(
        app.sql(
            "SELECT string_agg(key || '=' || value, ',' ORDER BY key) FROM counters WHERE key IN ('a', 'b')"
        ),
        "a=-5,b=5"
    );

    let rows = json!({"data": ["x", "y", "z"]});
    let first = post_once(&app.api, "/api/bulk-insert", "bulk-1", &rows).await;
    let again = post_once(&other, "/api/bulk-insert", "bulk-1", &rows).await;
    assert!(!replayed(&first) && replayed(&again), "a repeated bulk insert is marked as a replay");
    assert_eq!(again.body, first.body);
    assert_eq!(app.sql_i64("SELECT count(*) FROM data"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_repeats_wait_for_the_first_and_write_once() {
    let app = TestApp::spawn(&[]);
    let body = json!({"key": "c"});
    let replies = join_all((0..20).map(|_| post_once(&app.api, "/api/increment", "same", &body))).await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK), "{replies:?}");
    assert!(replies.iter().all(|r| r.body["value"] == 1), "every repeat saw the one increment");
    assert_eq!(replies.iter().filter(|r| !replayed(r)).count(), 1, "exactly one request wrote");
    assert_eq!(app.sql_i64("SELECT value FROM counters WHERE key = 'c'"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_with_another_body_is_rejected_and_bad_keys_are_400() {
    let app = TestApp::spawn(&[]);
    assert_eq!(
        post_once(&app.api, "/api/increment", "k1", &json!({"key": "a"})).await.status,
        StatusCode::OK
    );
    let reused = post_once(&app.api, "/api/increment", "k1", &json!({"key": "b"})).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY, "{:?}", reused.body);
    assert_eq!(reused.code(), "idempotency_key_reused");
    let reused =
        post_once(&app.api, "/api/transfer", "k1", &json!({"from": "a", "to": "b", "amount": 1})).await;
    assert_eq!(reused.code(), "idempotency_key_reused", "a key belongs to one endpoint");
    for bad in [String::new(), "k".repeat(256), "has space".to_owned()] {
        let reply = post_once(&app.api, "/api/increment", &bad, &json!({"key": "a"})).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{bad:?}");
        assert_eq!(reply.code(), "invalid_request");
    }
    assert_eq!(app.sql("SELECT string_agg(key || '=' || value, ',' ORDER BY key) FROM counters"), "a=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_expire_after_their_ttl_and_are_cleaned_up() {
    let app = TestApp::spawn(&[("IDEMPOTENCY_TTL_S", "1")]);
    assert_eq!(
        post_once(&app.api, "/api/increment", "short", &json!({"key": "e"})).await.status,
        StatusCode::OK
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while app.sql_i64("SELECT count(*) FROM idempotency_keys") > 0 {
        assert!(Instant::now() < deadline, "the expired key was never deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reply = post_once(&app.api, "/api/increment", "short", &json!({"key": "e"})).await;
    assert!(!replayed(&reply), "an expired key is a new key");
    assert_eq!(reply.body["value"], 2);
}

/// Takes the row lock on counter `key` (created if missing) in a transaction of the test's own, as
/// another client would; the lock is held until the returned client commits or is dropped.
async fn lock_counter(app: &TestApp, key: &str) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(&app.pg.admin_url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!(
            "INSERT INTO counters (key, value) VALUES ('{key}', 0) ON CONFLICT DO NOTHING; \
             BEGIN; SELECT value FROM counters WHERE key = '{key}' FOR UPDATE"
        ))
        .await
        .unwrap();
    client
}

/// Waits until `n` sessions of the application wait for a lock.
async fn until_lock_waiters(app: &TestApp, n: i64) {
    let waiting =
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND usename = 'appuser'";
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.sql_i64(waiting) < n {
        assert!(Instant::now() < deadline, "never saw {n} sessions waiting for a lock");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_while_the_first_request_runs_get_409_at_once_and_leave_the_pool_to_others() {
    let app = TestApp::spawn(&[]);
    // The first bulk insert claims its key, then waits for the table (as a slow insert would). A bulk
    // insert locks no counter, so its repeats wait at no gate of the node: each takes a connection.
    let (locker, connection) =
        tokio_postgres::connect(&app.pg.admin_url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    locker.batch_execute("BEGIN; LOCK TABLE data IN SHARE MODE").await.unwrap();
    let rows = json!({"data": ["once"]});
    let first = tokio::spawn({
        let (api, rows) = (app.api.clone(), rows.clone());
        async move { post_once(&api, "/api/bulk-insert", "busy", &rows).await }
    });
    until_lock_waiters(&app, 1).await;

    // Twice the pool's size of repeats, and requests of other keys among them.
    let start = Instant::now();
    let repeats = join_all((0..10).map(|_| post_once(&app.api, "/api/bulk-insert", "busy", &rows)));
    let others = join_all((0..10).map(|i| {
        let api = app.api.clone();
        async move {
            let reply = post_once(&api, "/api/increment", &format!("other-{i}"), &json!({"key": "o"})).await;
            (reply, start.elapsed())
        }
    }));
    let (repeats, others) = tokio::join!(repeats, others);
    for reply in &repeats {
        assert_eq!(reply.status, StatusCode::CONFLICT, "{:?}", reply.body);
        assert_eq!(reply.code(), "idempotency_key_in_use");
    }
    assert!(start.elapsed() < Duration::from_secs(2), "the repeats took {:?}", start.elapsed());
    for (reply, took) in &others {
        assert_eq!(reply.status, StatusCode::OK, "another key was refused: {:?}", reply.body);
        assert!(*took < Duration::from_secs(2), "another key waited {took:?}");
    }
    assert!(!first.is_finished(), "the first request still waits for the table");

    locker.batch_execute("COMMIT").await.unwrap();
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let later = post_once(&app.api, "/api/bulk-insert", "busy", &rows).await;
    assert!(replayed(&later), "once the first is done, a repeat replays it");
    assert_eq!(later.body, first.body);
    assert_eq!(app.sql_i64("SELECT count(*) FROM data"), 1, "inserted once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_on_another_node_while_the_first_runs_gets_409_in_use_and_writes_nothing() {
    let app = TestApp::spawn(&[]);
    let other = Node::spawn(node_options(&app.pg, "app-2", &[])).unwrap();
    let other = Api::new(other.url());
    let locker = lock_counter(&app, "held").await;
    let body = json!({"key": "held"});
    let first = tokio::spawn({
        let (api, body) = (app.api.clone(), body.clone());
        async move { post_once(&api, "/api/increment", "in-use", &body).await }
    });
    until_lock_waiters(&app, 1).await;
    let asked = Instant::now();
    let repeat = post_once(&other, "/api/increment", "in-use", &body).await;
    assert_eq!(repeat.status, StatusCode::CONFLICT, "{:?}", repeat.body);
    assert!(asked.elapsed() < Duration::from_secs(1), "the repeat waited {:?}", asked.elapsed());
    assert_eq!(repeat.code(), "idempotency_key_in_use");
    assert!(!first.is_finished(), "the first request still waits for the row");
    locker.batch_execute("COMMIT").await.unwrap();
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let later = post_once(&other, "/api/increment", "in-use", &body).await;
    assert!(replayed(&later), "once the first is done, a repeat replays it");
    assert_eq!(later.body, first.body);
    assert_eq!(app.sql_i64("SELECT value FROM counters WHERE key = 'held'"), 1, "incremented once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_deletes_only_keys_older_than_the_ttl() {
    // A 10 s TTL: the node's cleanup runs every 10 s, first at start-up (before any key exists).
    let app = TestApp::spawn(&[("IDEMPOTENCY_TTL_S", "10")]);
    for key in ["old", "young"] {
        let reply = post_once(&app.api, "/api/increment", key, &json!({"key": key})).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    app.sql("UPDATE idempotency_keys SET created_at = now() - interval '1 hour' WHERE key = 'old'");
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.sql_i64("SELECT count(*) FROM idempotency_keys WHERE key = 'old'") > 0 {
        assert!(Instant::now() < deadline, "the expired key was never deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Cleanup runs a TTL apart, the first at start-up (before any key), so the run that deleted `old`
    // came less than a TTL after `young` was stored: it must have kept it.
    let young = app.sql_i64("SELECT count(*) FROM idempotency_keys WHERE key = 'young'");
    assert_eq!(young, 1, "a key younger than the TTL survives the cleanup");
    let again = post_once(&app.api, "/api/increment", "young", &json!({"key": "young"})).await;
    assert!(replayed(&again), "and still replays");
}

/// Records, in table `deletions`, how many keys each statement that deletes idempotency keys deleted.
fn record_deletions(app: &TestApp) {
    app.sql(
        "CREATE TABLE deletions (keys BIGINT NOT NULL); GRANT INSERT ON deletions TO appuser; \
         CREATE FUNCTION record_deletion() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN INSERT INTO deletions SELECT count(*) FROM gone; RETURN NULL; END $$; \
         CREATE TRIGGER record_deletion AFTER DELETE ON idempotency_keys REFERENCING OLD TABLE AS gone \
         FOR EACH STATEMENT EXECUTE FUNCTION record_deletion()",
    );
}

/// Stores `n` keys that expired a day ago, named `<prefix>-1` … `<prefix>-n`.
fn store_expired_keys(app: &TestApp, prefix: &str, n: usize) {
    app.sql(&format!(
        "INSERT INTO idempotency_keys (key, fingerprint, status, response, created_at) \
         SELECT '{prefix}-' || i, '\\x00', 200, 'null', now() - interval '1 day' FROM generate_series(1, {n}) i"
    ));
}

async fn until_no_key_left(app: &TestApp, prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let left = format!("SELECT count(*) FROM idempotency_keys WHERE key LIKE '{prefix}-%'");
    while app.sql_i64(&left) > 0 {
        assert!(Instant::now() < deadline, "expired keys were never deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_keys_are_deleted_in_short_batches() {
    let app = TestApp::spawn(&[("IDEMPOTENCY_TTL_S", "1")]);
    record_deletions(&app);
    store_expired_keys(&app, "old", 2 * CLEANUP_BATCH_KEYS + CLEANUP_BATCH_KEYS / 2);
    until_no_key_left(&app, "old").await;
    let batches = app.sql_i64("SELECT count(*) FROM deletions WHERE keys > 0");
    let largest = app.sql_i64("SELECT max(keys) FROM deletions");
    assert!(batches >= 3, "{batches} statements deleted them all");
    assert!(largest <= CLEANUP_BATCH_KEYS as i64, "one statement deleted {largest} keys");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cleanup_runs_on_one_node_at_a_time() {
    // A cleanup every second (the TTL), while the test holds the lock a node's cleanup holds as it runs.
    let app = TestApp::spawn(&[("IDEMPOTENCY_TTL_S", "1")]);
    let (other, connection) =
        tokio_postgres::connect(&app.pg.admin_url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    other.execute("SELECT pg_advisory_lock($1)", &[&CLEANUP_LOCK_KEY]).await.unwrap();
    store_expired_keys(&app, "meanwhile", 10);
    // Three of the node's cleanups come and go.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let left = app.sql_i64("SELECT count(*) FROM idempotency_keys WHERE key LIKE 'meanwhile-%'");
    assert_eq!(left, 10, "the node cleaned up while another cleanup ran");
    other.execute("SELECT pg_advisory_unlock($1)", &[&CLEANUP_LOCK_KEY]).await.unwrap();
    until_no_key_left(&app, "meanwhile").await;
}
