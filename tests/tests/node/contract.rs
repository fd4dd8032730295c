//! Promises of the README that no other test keeps: headers on every answer, curl's default body type,
//! the health body, JSON logs, the hold's bounds, the drain's length, SIGINT, the healthcheck while
//! draining, and `fleetctl up` refusing a fleet too big for PostgreSQL.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleet_local::Node;
use fleet_tests::{fleetctl_bin, node_bin, node_options, start_postgres, Api, TestApp};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_names_its_node_in_a_header_and_the_body() {
    let app = TestApp::spawn(&[]);
    let answers = [
        app.api.increment("h").await,
        app.api.get("/api/pool-stats").await,
        app.api.get("/health").await,
        app.api.get("/no/such/route").await,
        app.api.post("/api/increment", &json!({"key": ""})).await,
    ];
    let statuses: Vec<u16> = answers.iter().map(|r| r.status.as_u16()).collect();
    assert_eq!(statuses, [200, 200, 200, 404, 400]);
    for answer in &answers {
        assert_eq!(answer.headers["x-container-id"], "app-1", "{:?}", answer.body);
        assert_eq!(answer.body["container"], "app-1", "{:?}", answer.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_as_curl_sends_it_by_default_is_read_as_json() {
    let app = TestApp::spawn(&[]);
    // `curl -d '{"key": "form"}'` says `Content-Type: application/x-www-form-urlencoded`.
    for n in 1..=2 {
        let response = app
            .api
            .http
            .post(format!("{}/api/increment", app.api.url))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(r#"{"key": "form"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["value"], n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_the_database_time_and_the_pool() {
    let app = TestApp::spawn(&[]);
    let health = app.api.get("/health").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.body["status"], "healthy");
    let db_time = health.body["dbTime"].as_str().unwrap_or_else(|| panic!("no dbTime: {:?}", health.body));
    let year: i32 = app.sql("SELECT extract(year FROM now())::int").parse().unwrap();
    assert!(db_time.starts_with(&year.to_string()), "dbTime is the database's clock: {db_time}");
    let pool = &health.body["poolStats"];
    for field in ["total", "idle", "waiting"] {
        assert!(pool[field].is_u64(), "poolStats.{field}: {pool}");
    }
    assert!(pool["total"].as_u64() >= Some(1), "the health check used a pooled connection: {pool}");

    let mut app = app;
    app.pg.stop().unwrap();
    let sick = app.api.get("/health").await;
    assert_eq!(sick.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(sick.body["status"], "unhealthy");
    assert_eq!(sick.body["container"], "app-1");
    assert!(sick.body["error"].is_string(), "{:?}", sick.body);
}

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let pg = start_postgres();
    let mut node = Node::spawn(node_options(&pg, "app-1", &[("LOG_FORMAT", "json")])).unwrap();
    let output = node.child().recent_output();
    let lines: Vec<&str> = output.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let entry: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(entry["timestamp"].is_string() && entry["level"].is_string(), "{line}");
    }
    assert!(
        lines.iter().any(|l| l.contains("listening on http://127.0.0.1:")),
        "the start-up line is among them: {output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_takes_1_to_10000_ms_and_holds_that_long() {
    let app = TestApp::spawn(&[]);
    for ms in [0, 10_001] {
        let reply = app.api.hold(ms).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{ms} ms: {:?}", reply.body);
        assert!(reply.body["error"].as_str().unwrap().contains("1 to 10000"), "{:?}", reply.body);
    }
    for ms in [1, 10_000] {
        let start = Instant::now();
        let reply = app.api.hold(ms).await;
        assert_eq!(reply.status, StatusCode::OK, "{ms} ms: {:?}", reply.body);
        assert!(start.elapsed() >= Duration::from_millis(ms), "{ms} ms held for {:?}", start.elapsed());
    }
}

/// `fleet-app healthcheck` against the node on `port`.
fn healthcheck(port: u16) -> bool {
    let status = Command::new(node_bin())
        .arg("healthcheck")
        .env_clear()
        .env("PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run the healthcheck");
    status.success()
}

fn signal(node: &Node, signal: Signal) {
    kill(Pid::from_raw(node.pid() as i32), signal).expect("signal the node");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_the_healthcheck_fail_for_the_whole_drain_then_the_listener_closes() {
    let pg = start_postgres();
    let mut node = Node::spawn(node_options(&pg, "app-1", &[("SHUTDOWN_DRAIN_MS", "2000")])).unwrap();
    let api = Api::new(node.url());
    assert!(healthcheck(node.port()));
    let sigterm = Instant::now();
    signal(&node, Signal::SIGTERM);
    let mut answers = 0;
    let closed = loop {
        match api.http.get(format!("{}/health/ready", api.url)).send().await {
            Ok(response) => {
                let ready = response.status();
                if answers > 0 || ready == StatusCode::SERVICE_UNAVAILABLE {
                    assert_eq!(ready, StatusCode::SERVICE_UNAVAILABLE, "readiness after SIGTERM");
                    answers += 1;
                }
                if answers == 1 {
                    assert!(!healthcheck(node.port()), "the healthcheck fails while the node drains");
                }
            }
            Err(_) => break sigterm.elapsed(),
        }
        assert!(sigterm.elapsed() < Duration::from_secs(30), "the listener never closed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(answers > 0, "readiness answered 503 during the drain");
    assert!(
        closed >= Duration::from_millis(2000),
        "the listener closed {closed:?} after SIGTERM, before the drain ended"
    );
    let status = tokio::task::spawn_blocking(move || node.child().terminate(Duration::from_secs(30)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_at_once_without_the_drain() {
    let pg = start_postgres();
    let mut node = Node::spawn(node_options(&pg, "app-1", &[("SHUTDOWN_DRAIN_MS", "60000")])).unwrap();
    signal(&node, Signal::SIGINT);
    // SIGINT sent again would also skip a drain: send it once, then wait for the exit itself.
    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while node.child().is_running() {
            assert!(Instant::now() < deadline, "a node still running 30 s after SIGINT is draining for 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        node.child().terminate(Duration::from_secs(1))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn fleetctl_up_refuses_a_fleet_whose_pools_exceed_max_connections() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(fleetctl_bin())
        .env("FLEET_APP_BIN", node_bin())
        .args(["up", "--nodes", "20", "--pool-size", "5", "--port", "0", "--dir"])
        .arg(dir.path().join("fleet"))
        .stdin(Stdio::null())
        .output()
        .expect("run fleetctl up");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("20 nodes × pool 5 = 100 connections"), "{stderr}");
    assert!(stderr.contains("max_connections"), "{stderr}");
    assert!(!dir.path().join("fleet").exists(), "nothing was started or written: {stderr}");
}
