//! A node's life: start-up on an empty database, the command line, losing the database, SIGTERM, metrics.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleet_app::db::migrations::MIGRATION_LOCK_KEY;
use fleet_local::{bins, Node};
use fleet_tests::{http_worker_threads, node_bin, node_options, sample_value, start_postgres, Api, TestApp};
use futures_util::future::join_all;
use reqwest::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_starting_at_once_on_an_empty_database_all_come_up() {
    let pg = start_postgres();
    // The test holds the migrations' advisory lock while the four nodes start, so all four are seen
    // waiting for it at once: their migrations really overlap.
    let (locker, connection) = tokio_postgres::connect(&pg.admin_url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    locker.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY]).await.unwrap();
    let mut nodes: Vec<Node> =
        (1..=4).map(|i| Node::launch(node_options(&pg, &format!("app-{i}"), &[])).unwrap()).collect();
    let waiting =
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory' AND usename = 'appuser'";
    let deadline = Instant::now() + Duration::from_secs(60);
    while pg.psql(waiting).unwrap() != "4" {
        assert!(Instant::now() < deadline, "the four nodes never all waited to migrate");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    locker.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY]).await.unwrap();
    for node in &mut nodes {
        node.wait_ready().expect("every node comes up");
    }
    for node in &mut nodes {
        assert!(node.child().is_running(), "{} is still up", node.container_id());
    }
    let applied = pg.psql("SELECT count(*) || '/' || max(version) FROM schema_migrations").unwrap();
    let (count, latest) = applied.split_once('/').unwrap();
    assert_eq!(count, latest, "every migration applied exactly once");
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_tables WHERE tablename IN ('counters', 'data')").unwrap(),
        "2"
    );
}

#[test]
fn the_command_line_migrates_checks_health_and_names_a_bad_setting() {
    let app = TestApp::spawn(&[]);
    let run = |args: &[&str], env: &[(&str, String)]| {
        let mut cmd = Command::new(node_bin());
        cmd.args(args).env_clear().envs(env.iter().map(|(k, v)| (k, v))).stdin(Stdio::null());
        cmd.output().expect("run the node binary")
    };
    let healthy = run(&["healthcheck"], &[("PORT", app.node.port().to_string())]);
    assert!(healthy.status.success(), "{healthy:?}");

    let unused_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nobody = run(&["healthcheck"], &[("PORT", unused_port.to_string())]);
    assert!(!nobody.status.success(), "healthcheck of a port with no node must fail");

    let migrate = run(&["migrate"], &[("DATABASE_URL", app.pg.url()), ("LOG_FORMAT", "text".into())]);
    assert!(migrate.status.success(), "{migrate:?}");

    let bad = run(&["serve"], &[("POOL_SIZE", "lots".into())]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("POOL_SIZE"), "the error names the variable: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_database_gives_fast_503s_and_the_node_recovers_by_itself() {
    // A write whose database is gone keeps trying (a failover may bring a new primary) until its deadline.
    let mut app = TestApp::spawn(&[("POOL_WAIT_TIMEOUT_MS", "1000"), ("RETRY_DEADLINE_MS", "1000")]);
    assert_eq!(app.api.increment("k").await.status, StatusCode::OK);

    app.pg.stop().expect("stop PostgreSQL");
    for _ in 0..3 {
        let start = Instant::now();
        let reply = app.api.increment("k").await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", reply.body);
        assert!(["database_unavailable", "pool_timeout"].contains(&reply.code()), "{:?}", reply.body);
        assert!(reply.headers.contains_key("retry-after"));
        let took = start.elapsed();
        assert!(
            took < Duration::from_millis(1000 + 1000 + 2000),
            "past the deadline and the pool wait: {took:?}"
        );
    }
    assert_eq!(app.api.get("/health/ready").await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app.api.get("/health").await.body["status"], "unhealthy");
    assert_eq!(app.api.get("/health/live").await.status, StatusCode::OK, "the node itself stays up");

    app.pg.start_again().expect("restart PostgreSQL");
    let deadline = Instant::now() + Duration::from_secs(30);
    let value = loop {
        let reply = app.api.increment("k").await;
        if reply.status == StatusCode::OK {
            break reply.body["value"].as_i64().unwrap();
        }
        assert!(Instant::now() < deadline, "no recovery within 30 s: {:?}", reply.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(value, 2, "the increment before the outage survived and the one after it counted once");
    assert!(app.node.child().is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_readiness_off_lets_requests_finish_and_exits_zero() {
    let pg = start_postgres();
    let node = Node::spawn(node_options(&pg, "app-1", &[("SHUTDOWN_DRAIN_MS", "1500")])).unwrap();
    let api = Api::new(node.url());
    let in_flight = tokio::spawn({
        let api = api.clone();
        async move { api.hold(3000).await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pool = api.get("/api/pool-stats").await.body;
        if pool["totalCount"].as_u64() > pool["idleCount"].as_u64() {
            break;
        }
        assert!(Instant::now() < deadline, "the hold never took a connection");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut node = node;
    let stopping = tokio::task::spawn_blocking(move || {
        let status = node.child().terminate(Duration::from_secs(20));
        (status, node.child().recent_output())
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let draining = loop {
        let ready = api.get("/health/ready").await;
        if ready.status == StatusCode::SERVICE_UNAVAILABLE {
            break ready;
        }
        assert!(Instant::now() < deadline, "readiness never turned 503 after SIGTERM");
    };
    assert_eq!(
        draining.headers["connection"], "close",
        "a draining node asks clients to reconnect elsewhere"
    );
    assert_eq!(
        api.get("/api/pool-stats").await.status,
        StatusCode::OK,
        "requests are still served while draining"
    );
    let held = in_flight.await.unwrap();
    assert_eq!(held.status, StatusCode::OK, "the in-flight request finished: {:?}", held.body);
    let (status, output) = stopping.await.unwrap();
    let status = status.expect("the node exits");
    assert_eq!(status.code(), Some(0), "{status:?}; the node's output:\n{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_name_every_documented_family() {
    let app = TestApp::spawn(&[]);
    app.api.increment("m").await;
    app.api.get("/api/counters/m").await;
    app.api.bulk_insert(&["x".to_owned()]).await;
    app.api.get("/nowhere").await;
    let text = app.api.metrics_text().await;

    let mut promtool = Command::new(bins::prometheus_bin("promtool").unwrap())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    for family in [
        "fleet_http_requests_total",
        "fleet_http_request_duration_seconds",
        "fleet_db_pool_max_connections",
        "fleet_db_pool_connections",
        "fleet_db_pool_waiting_requests",
        "fleet_db_pool_wait_seconds",
        "fleet_db_errors_total",
        "fleet_db_transaction_retries_total",
        "fleet_increments_total",
        "fleet_increment_batch_size",
        "fleet_read_batch_size",
        "fleet_db_reads_total",
        "fleet_bulk_insert_rows_total",
        "fleet_build_info",
        "process_resident_memory_bytes",
    ] {
        assert!(text.contains(&format!("# TYPE {family} ")), "{family} missing");
    }
    assert_eq!(fleet_tests::sample_value(&text, "fleet_increments_total"), 1.0);
    assert_eq!(fleet_tests::sample_value(&text, "fleet_bulk_insert_rows_total"), 1.0);
    assert_eq!(fleet_tests::sample_value(&text, "fleet_read_batch_size_sum"), 1.0);
    assert_eq!(fleet_tests::sample_value(&text, "fleet_db_pool_max_connections"), 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_pool_sheds_load_with_503_pool_timeout_instead_of_queueing_forever() {
    // The hold may take the only connection: LAB_MAX_CONNECTIONS=1 gives up the one the lab leaves.
    let app =
        TestApp::spawn(&[("POOL_SIZE", "1"), ("POOL_WAIT_TIMEOUT_MS", "300"), ("LAB_MAX_CONNECTIONS", "1")]);
    let holding = tokio::spawn({
        let api = app.api.clone();
        async move { api.hold(3000).await }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.api.get("/api/pool-stats").await.body["idleCount"] != 0 {
        assert!(Instant::now() < deadline, "the hold never took the only connection");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let shed = app.api.increment("k").await;
    assert_eq!(shed.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", shed.body);
    assert_eq!(shed.code(), "pool_timeout");
    assert_eq!(shed.headers["retry-after"], "1");
    assert_eq!(holding.await.unwrap().status, StatusCode::OK);
    assert_eq!(app.api.increment("k").await.body["value"], 1, "the shed request changed nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_carries_the_statement_timeout() {
    let app = TestApp::spawn(&[("STATEMENT_TIMEOUT_MS", "200")]);
    let reply = app.api.hold(2000).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", reply.body);
    assert_eq!(reply.code(), "57014");
    assert_eq!(app.api.hold(50).await.status, StatusCode::OK, "the connection is usable afterwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_under_load_are_retried_unless_commit_was_in_flight() {
    // 400 requests queue for 5 connections; let them wait (this test is about lost connections).
    let app = TestApp::spawn(&[("INCREMENT_MODE", "transaction"), ("POOL_WAIT_TIMEOUT_MS", "30000")]);
    let load = tokio::spawn({
        let api = app.api.clone();
        let keys: Vec<String> = (0..400).map(|i| format!("k{}", i % 10)).collect();
        async move { join_all(keys.iter().map(|key| api.increment(key))).await }
    });
    // Terminate every pooled backend a few times while the increments run.
    let mut killed = 0;
    for _ in 0..5 {
        if load.is_finished() {
            break;
        }
        let out = app.sql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'fleet-app/app-1'",
        );
        killed += out.parse::<i32>().unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let replies = load.await.unwrap();
    assert!(killed > 0, "no backend was terminated");

    // A connection lost before COMMIT is retried; one lost during COMMIT leaves the outcome unknown,
    // and only that may fail (503, SQLSTATE 08007), never silently.
    let ok = replies.iter().filter(|r| r.status == StatusCode::OK).count() as i64;
    let unknown = replies.iter().filter(|r| r.code() == "08007").count() as i64;
    assert_eq!(
        ok + unknown,
        400,
        "{:?}",
        replies.iter().find(|r| r.status != StatusCode::OK && r.code() != "08007")
    );
    let counted = app.sql_i64("SELECT sum(value) FROM counters");
    assert!(
        (ok..=ok + unknown).contains(&counted),
        "{counted} counted for {ok} acknowledged + {unknown} unknown"
    );
    let metrics = app.api.metrics_text().await;
    let retried = ["57P01", "08006"]
        .iter()
        .map(|code| {
            sample_value(&metrics, &format!("fleet_db_transaction_retries_total{{sqlstate=\"{code}\"}}"))
        })
        .sum::<f64>();
    assert!(retried > 0.0, "a connection lost before COMMIT was retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_workers_sets_the_threads_serving_http_and_0_is_one_per_core() {
    let cores = std::thread::available_parallelism().unwrap().get();
    for (setting, threads) in [("3", 3), ("0", cores)] {
        let app = TestApp::spawn(&[("HTTP_WORKERS", setting)]);
        assert_eq!(app.api.get("/health/live").await.status, StatusCode::OK);
        assert_eq!(http_worker_threads(app.node.pid()), threads, "HTTP_WORKERS={setting}");
    }
}
