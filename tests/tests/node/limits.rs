//! No client can starve a node: the lab endpoints' share of the pool, `/api/stats` without a scan per
//! call, and coalesced increments that stay truthful when their clients leave, the pool runs dry or the
//! node is stopped mid-load.

use std::time::{Duration, Instant};

use fleet_app::db::STATS_QUERY;
use fleet_local::Node;
use fleet_tests::{node_options, start_postgres, Api, Reply, TestApp};
use futures_util::future::join_all;
use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::json;

/// Polls `sql` (one integer) on `app`'s database until it is at least `at_least`.
async fn wait_for_sql(pg: &fleet_local::Postgres, sql: &str, at_least: i64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let value: i64 = pg.psql(sql).unwrap().parse().unwrap();
        if value >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: still {value} after 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sessions of node `app-1` that wait for a lock.
const LOCK_WAITERS: &str = "SELECT count(*) FROM pg_stat_activity \
    WHERE application_name = 'fleet-app/app-1' AND wait_event_type = 'Lock'";

/// A transaction of the test's own holding the row lock of counter `key` until it is committed.
async fn lock_row(pg: &fleet_local::Postgres, key: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.batch_execute("BEGIN").await.unwrap();
    client.execute("SELECT value FROM counters WHERE key = $1 FOR UPDATE", &[&key]).await.unwrap();
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_concurrent_holds_get_429_beyond_the_lab_share_at_once_and_ordinary_requests_keep_succeeding() {
    let app = TestApp::spawn(&[]);
    // Pool 5, so the lab may use 4 connections (LAB_MAX_CONNECTIONS defaults to POOL_SIZE − 1).
    let holds: Vec<_> = (0..40)
        .map(|_| {
            let api = app.api.clone();
            tokio::spawn(async move { (api.hold(6000).await, Instant::now()) })
        })
        .collect();
    wait_for_sql(
        &app.pg,
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' AND state = 'active'",
        4,
        "holds running",
    )
    .await;

    // While four holds run, the node serves everything else, and the lab is full.
    let keys: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    let ordinary = join_all((0..200).map(|i| app.api.increment(&keys[i % 10]))).await;
    let transfers = join_all((1..=20).map(|i| app.api.transfer("t1", "t2", i))).await;
    let isolation = app.api.post("/api/test-isolation", &json!({"level": "SERIALIZABLE"})).await;
    let served_at = Instant::now();
    assert!(ordinary.iter().chain(&transfers).all(|r| r.status == StatusCode::OK), "{ordinary:?}");
    assert_eq!(isolation.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", isolation.body);
    assert_eq!(isolation.code(), "lab_busy");

    let mut done = Vec::new();
    for hold in holds {
        done.push(hold.await.unwrap());
    }
    let (held, refused): (Vec<&(Reply, Instant)>, Vec<_>) =
        done.iter().partition(|(reply, _)| reply.status == StatusCode::OK);
    assert_eq!(held.len(), 4, "the lab's share is 4 connections");
    for (reply, _) in &refused {
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{:?}", reply.body);
        assert_eq!(reply.code(), "lab_busy");
        assert_eq!(reply.headers["retry-after"], "1");
    }
    let first_hold_done = held.iter().map(|(_, at)| *at).min().unwrap();
    assert!(
        refused.iter().all(|(_, at)| *at < first_hold_done),
        "the excess was refused at once, not queued"
    );
    assert!(served_at < first_hold_done, "ordinary requests finished while the holds ran");
    assert_eq!(app.sql_i64("SELECT sum(value) FROM counters WHERE key LIKE 'k%'"), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_are_a_snapshot_shared_by_every_caller_and_say_how_old_they_are() {
    let app = TestApp::spawn(&[]);
    app.sql("INSERT INTO data (content, container_id) SELECT 'row', 'app-1' FROM generate_series(1, 1000)");
    let first = app.api.get("/api/stats").await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    assert_eq!(first.body["databaseSource"], "snapshot");
    assert_eq!(first.body["database"]["total_records"], 1000);
    let max_age = first.body["databaseMaxAgeMs"].as_u64().unwrap();

    // One more row, then 200 calls at once: at most one of them counts (a checkout of the pool).
    app.sql("INSERT INTO data (content, container_id) VALUES ('one more', 'app-1')");
    let checkouts = app.api.metric("fleet_db_pool_wait_seconds_count").await;
    let replies = join_all((0..200).map(|_| app.api.get("/api/stats"))).await;
    let counted = app.api.metric("fleet_db_pool_wait_seconds_count").await - checkouts;
    assert!(counted <= 1.0, "200 calls counted the tables {counted} times");
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        assert!(reply.body["databaseAgeMs"].as_u64().unwrap() <= max_age, "{:?}", reply.body);
        let total = reply.body["database"]["total_records"].as_i64().unwrap();
        assert!(total == 1000 || total == 1001, "{total}");
    }

    // Once the snapshot is older than its maximum age, the next call counts again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = app.api.get("/api/stats").await.body;
        if stats["database"]["total_records"] == 1001 {
            assert_eq!(stats["database"]["container_records"], 1001);
            break;
        }
        assert!(Instant::now() < deadline, "the snapshot was never refreshed: {stats}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_scan_each_table_at_most_once_and_find_a_nodes_rows_by_index() {
    let app = TestApp::spawn(&[]);
    app.sql(
        "INSERT INTO data (content, container_id) \
         SELECT 'row ' || i, 'app-' || (i % 8 + 1) FROM generate_series(1, 40000) i",
    );
    app.sql("VACUUM ANALYZE data");
    let plan =
        app.sql(&format!("PREPARE stats(text) AS {STATS_QUERY}; EXPLAIN (COSTS OFF) EXECUTE stats('app-1')"));
    assert!(plan.contains("data_container_id_idx"), "a node's rows are not found by index:\n{plan}");
    let scans = |table: &str| plan.lines().filter(|l| l.contains(&format!(" on {table}"))).count();
    assert_eq!(scans("counters"), 1, "counters scanned more than once:\n{plan}");
    // Besides the node's rows by their index (a bitmap scan's heap reads are a line of their own).
    let whole_data = plan
        .lines()
        .filter(|l| l.contains(" on data") && !l.contains("data_container_id_idx"))
        .filter(|l| !l.contains("Bitmap Heap Scan"))
        .count();
    assert_eq!(whole_data, 1, "data counted more than once:\n{plan}");
    let stats = app.api.get("/api/stats").await.body;
    assert_eq!(
        (&stats["database"]["total_records"], &stats["database"]["container_records"]),
        (&json!(40000), &json!(5000))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_stats_count_is_shared_by_the_callers_that_come_right_after() {
    let app = TestApp::spawn(&[]);
    app.sql("REVOKE SELECT ON data FROM appuser");
    let checkouts = app.api.metric("fleet_db_pool_wait_seconds_count").await;
    let replies = join_all((0..50).map(|_| app.api.get("/api/stats"))).await;
    let counted = app.api.metric("fleet_db_pool_wait_seconds_count").await - checkouts;
    assert!(replies.iter().all(|r| r.status.is_server_error()), "{:?}", replies.iter().map(|r| r.status));
    assert!(counted <= 1.0, "50 calls tried to count {counted} times");

    // Briefly: once the database can answer again, the next calls count again.
    app.sql("GRANT SELECT ON data TO appuser");
    let deadline = Instant::now() + Duration::from_secs(5);
    while app.api.get("/api/stats").await.status != StatusCode::OK {
        assert!(Instant::now() < deadline, "the failure was kept too long");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalesced_increment_whose_client_left_before_its_transaction_takes_no_value() {
    let app = TestApp::spawn(&[]);
    assert_eq!(app.api.increment("gap").await.body["value"], 1);
    let holder = lock_row(&app.pg, "gap").await;

    // The first increment waits for the row in its key's own transaction; the rest queue for the next.
    let first = tokio::spawn({
        let api = app.api.clone();
        async move { api.increment("gap").await }
    });
    wait_for_sql(&app.pg, LOCK_WAITERS, 1, "the first increment waits for the row").await;
    let stayer = tokio::spawn({
        let api = app.api.clone();
        async move { api.increment("gap").await }
    });
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(300)).build().unwrap();
    let left =
        join_all((0..5).map(|_| {
            impatient.post(format!("{}/api/increment", app.api.url)).body(r#"{"key": "gap"}"#).send()
        }))
        .await;
    assert!(left.iter().all(|r| r.as_ref().is_err_and(|e| e.is_timeout())), "the impatient clients left");
    drop(impatient);
    // Give the node a moment to see the closed connections (nothing to observe: they are just gone).
    tokio::time::sleep(Duration::from_millis(500)).await;
    holder.batch_execute("COMMIT").await.unwrap();

    assert_eq!(first.await.unwrap().body["value"], 2);
    let stayer = stayer.await.unwrap();
    assert_eq!(stayer.status, StatusCode::OK, "{:?}", stayer.body);
    assert_eq!(stayer.body["value"], 3, "the caller who stayed sees no gap");
    assert_eq!(app.sql_i64("SELECT value FROM counters WHERE key = 'gap'"), 3, "the leavers took nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_many_key_batch_that_finds_the_pool_empty_is_not_retried_key_by_key() {
    // One connection, held by the lab on purpose (LAB_MAX_CONNECTIONS=1 gives up the reserved one).
    let app =
        TestApp::spawn(&[("POOL_SIZE", "1"), ("LAB_MAX_CONNECTIONS", "1"), ("POOL_WAIT_TIMEOUT_MS", "1000")]);
    let keys: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
    app.sql("INSERT INTO counters (key, value) SELECT 'k' || i, 0 FROM generate_series(0, 49) AS i");
    let hold = tokio::spawn({
        let api = app.api.clone();
        async move { api.hold(8000).await }
    });
    wait_for_sql(
        &app.pg,
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' AND state = 'active'",
        1,
        "the hold runs",
    )
    .await;

    let checkouts = app.api.metric("fleet_db_pool_wait_seconds_count").await;
    let replies = join_all(keys.iter().map(|key| app.api.increment(key))).await;
    let waited = app.api.metric("fleet_db_pool_wait_seconds_count").await - checkouts;
    assert!(
        replies.iter().all(|r| r.code() == "pool_timeout"),
        "{:?}",
        replies.iter().find(|r| r.code() != "pool_timeout")
    );
    // A handful of batches each waited once; split key by key, each of the 50 keys would wait again.
    assert!(waited < keys.len() as f64, "50 increments waited for the pool {waited} times");
    assert!(!hold.is_finished(), "every increment was answered while the connection was held");
    assert_eq!(hold.await.unwrap().status, StatusCode::OK);
    assert_eq!(app.sql_i64("SELECT sum(value) FROM counters"), 0, "the shed increments changed nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_a_coalesced_increment_waits_for_a_runner_started_on_an_idle_worker_answers_it() {
    stop_while_a_runner_started_on_an_idle_worker_is_awaited(Signal::SIGTERM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_while_a_coalesced_increment_waits_for_a_runner_started_on_an_idle_worker_answers_it() {
    stop_while_a_runner_started_on_an_idle_worker_is_awaited(Signal::SIGINT).await;
}

/// A runner, and the database connection it opened, live on the worker of the request that started
/// them; that worker's client leaves, so it has no connection of its own when `signal` arrives, while a
/// request on the other worker still waits for the runner.
async fn stop_while_a_runner_started_on_an_idle_worker_is_awaited(signal: Signal) {
    // One connection, so batches wait for it (LAB_MAX_CONNECTIONS=1 lets a hold take it).
    let pg = start_postgres();
    let env = [("POOL_SIZE", "1"), ("LAB_MAX_CONNECTIONS", "1"), ("POOL_WAIT_TIMEOUT_MS", "20000")];
    let mut node = Node::spawn(node_options(&pg, "app-1", &env)).unwrap();
    let url = node.url();
    // Every client below is its own connection, closed when it is dropped. The node hands connections
    // to its two workers in turn, so the hold, client 1 and client 2 land on alternate workers.
    let setup = Api::new(&url);
    assert_eq!(setup.increment("s").await.status, StatusCode::OK);
    assert_eq!(setup.increment("x").await.status, StatusCode::OK);
    drop(setup);
    let holder = lock_row(&pg, "s").await;
    let hold = tokio::spawn({
        let api = Api::new(&url);
        async move { api.hold(1500).await }
    });
    wait_for_sql(&pg, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'", 1, "hold")
        .await;

    // Client 1's increment starts the batch runner on its worker, which waits for the connection;
    // client 2's (on the other worker) queues for the runner's next batch meanwhile.
    let first = tokio::spawn({
        let api = Api::new(&url);
        async move { api.increment("x").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = tokio::spawn({
        let api = Api::new(&url);
        async move { api.increment("s").await }
    });
    assert_eq!(hold.await.unwrap().status, StatusCode::OK);
    // Client 1 is answered and gone; the runner goes on to client 2's key, locked by the test.
    assert_eq!(first.await.unwrap().body["value"], 2);
    wait_for_sql(&pg, LOCK_WAITERS, 1, "client 2's increment waits for the row").await;

    let pid = node.pid();
    let stopping = tokio::task::spawn_blocking(move || node.child().stop(signal, Duration::from_secs(20)));
    // Let client 1's idle worker stop (nothing to observe from outside while the other waits).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "the node waits for client 2");
    holder.batch_execute("COMMIT").await.unwrap();

    let second = second.await.unwrap();
    assert_eq!(second.status, StatusCode::OK, "{:?}", second.body);
    assert_eq!(second.body["value"], 2);
    assert!(stopping.await.unwrap().unwrap().success(), "the node exits 0");
    assert_eq!(pg.psql("SELECT value FROM counters WHERE key = 's'").unwrap(), "2");
}
