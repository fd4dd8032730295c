//! Bad input gets the contract's 4xx JSON error and changes nothing.

use bytes::Bytes;
use fleet_tests::{proc_status_bytes, Api, Reply, TestApp};
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Asserts the error contract: status, code, `success: false`, a message, and the container.
fn assert_error(reply: &Reply, status: StatusCode, code: &str, case: &str) {
    assert_eq!(reply.status, status, "{case}: {:?}", reply.body);
    assert_eq!(reply.code(), code, "{case}: {:?}", reply.body);
    assert_eq!(reply.body["success"], false, "{case}");
    assert!(!reply.body["error"].as_str().unwrap_or_default().is_empty(), "{case}: no message");
    assert_eq!(reply.body["container"], "app-1", "{case}");
    assert_eq!(reply.headers["x-container-id"], "app-1", "{case}");
}

fn table_counts(app: &TestApp) -> String {
    app.sql("SELECT (SELECT count(*) FROM counters) || '/' || (SELECT count(*) FROM data)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_are_rejected_with_a_clear_400_and_change_nothing() {
    let app = TestApp::spawn(&[]);
    let long_key = "k".repeat(256);
    let cases: Vec<(&str, &str, String, &str)> = vec![
        ("invalid JSON", "/api/increment", r#"{"key": "#.to_owned(), "invalid_json"),
        ("empty body", "/api/increment", String::new(), "invalid_json"),
        ("not JSON at all", "/api/bulk-insert", "hello".to_owned(), "invalid_json"),
        ("missing key", "/api/increment", "{}".to_owned(), "invalid_request"),
        ("key of the wrong type", "/api/increment", r#"{"key": 7}"#.to_owned(), "invalid_request"),
        ("empty key", "/api/increment", r#"{"key": ""}"#.to_owned(), "invalid_request"),
        ("256-char key", "/api/increment", json!({ "key": long_key }).to_string(), "invalid_request"),
        ("NUL in a key", "/api/increment", r#"{"key": "a\u0000b"}"#.to_owned(), "invalid_request"),
        ("data not an array", "/api/bulk-insert", r#"{"data": "x"}"#.to_owned(), "invalid_request"),
        ("empty data", "/api/bulk-insert", r#"{"data": []}"#.to_owned(), "invalid_request"),
        ("a number in data", "/api/bulk-insert", r#"{"data": ["a", 1]}"#.to_owned(), "invalid_request"),
        (
            "NUL in the last row",
            "/api/bulk-insert",
            r#"{"data": ["a", "b", "c\u0000"]}"#.to_owned(),
            "invalid_request",
        ),
        (
            "zero amount",
            "/api/transfer",
            r#"{"from": "a", "to": "b", "amount": 0}"#.to_owned(),
            "invalid_request",
        ),
        (
            "negative amount",
            "/api/transfer",
            r#"{"from": "a", "to": "b", "amount": -5}"#.to_owned(),
            "invalid_request",
        ),
        (
            "fractional amount",
            "/api/transfer",
            r#"{"from": "a", "to": "b", "amount": 1.5}"#.to_owned(),
            "invalid_request",
        ),
        (
            "transfer to itself",
            "/api/transfer",
            r#"{"from": "a", "to": "a", "amount": 1}"#.to_owned(),
            "invalid_request",
        ),
        (
            "NUL in from",
            "/api/transfer",
            r#"{"from": "\u0000", "to": "a", "amount": 1}"#.to_owned(),
            "invalid_request",
        ),
        ("hold of 0 ms", "/api/hold", r#"{"ms": 0}"#.to_owned(), "invalid_request"),
        ("hold too long", "/api/hold", r#"{"ms": 10001}"#.to_owned(), "invalid_request"),
        ("negative hold", "/api/hold", r#"{"ms": -1}"#.to_owned(), "invalid_request"),
    ];
    for (case, path, body, code) in cases {
        let reply = app.api.post_raw(path, body).await;
        assert_error(&reply, StatusCode::BAD_REQUEST, code, case);
    }
    assert_eq!(table_counts(&app), "0/0", "a rejected request changed data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_get_413_naming_the_limit_and_insert_nothing() {
    let app = TestApp::spawn(&[
        ("BULK_MAX_ROWS", "1000"),
        ("BODY_LIMIT_BYTES", "65536"),
        ("BULK_MAX_ROW_BYTES", "4096"),
    ]);
    let rows: Vec<String> = (0..1001).map(|i| i.to_string()).collect();
    let reply = app.api.bulk_insert(&rows).await;
    assert_error(&reply, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "1001 rows");
    assert!(reply.body["error"].as_str().unwrap().contains("1000"), "{:?}", reply.body);

    let reply = app.api.bulk_insert(&["ok".to_owned(), "x".repeat(4097), "ok".to_owned()]).await;
    assert_error(&reply, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "a 4097-byte row");
    let message = reply.body["error"].as_str().unwrap();
    assert!(message.contains("data[1]") && message.contains("4096 (BULK_MAX_ROW_BYTES)"), "{message}");
    assert_eq!(table_counts(&app), "0/0", "no row of a refused body is inserted");
    assert_eq!(app.api.bulk_insert(&["é".repeat(2048)]).await.status, StatusCode::OK, "4096 bytes fit");
    app.sql("TRUNCATE data");

    let big = json!({ "data": ["x".repeat(70_000)] }).to_string();
    let reply = app.api.post_raw("/api/bulk-insert", big).await;
    assert_error(&reply, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "70 kB body");
    assert!(reply.body["error"].as_str().unwrap().contains("65536"), "{:?}", reply.body);

    assert_eq!(table_counts(&app), "0/0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_wrong_methods_get_json_404_and_405() {
    let app = TestApp::spawn(&[("LAB_ENDPOINTS", "false")]);
    assert_error(&app.api.get("/api/nope").await, StatusCode::NOT_FOUND, "not_found", "unknown route");
    assert_error(
        &app.api.get("/api/increment").await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "GET increment",
    );
    assert_error(
        &app.api.post_raw("/health", "").await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "POST health",
    );
    assert_error(
        &app.api.get("/api/counters/missing").await,
        StatusCode::NOT_FOUND,
        "not_found",
        "missing counter",
    );
    assert_error(&app.api.hold(10).await, StatusCode::NOT_FOUND, "not_found", "lab endpoints off");
    let unmatched =
        app.api.metric(r#"fleet_http_requests_total{method="GET",route="unmatched",status="404"}"#).await;
    assert_eq!(unmatched, 1.0, "unknown paths are counted under one bounded label");
}

/// A bad value of 15 MB of DEL (0x7F): JSON leaves the character as it is, Rust's `Debug` writes it as six
/// (`\u{7f}`), and JSON then escapes the backslash.
const HUGE_VALUE_BYTES: usize = 15 * 1024 * 1024;
/// A bad value that fits in the small routes' body limit (64 KiB).
const LONG_VALUE_BYTES: usize = 60_000;
/// The largest error answer a bad value may get.
const MAX_ERROR_BYTES: usize = 1024;
/// What four bodies of the large limit (bulk insert's 16 MiB) cost the node at most, and the allocator's
/// and the connections' slack (see hostile.rs).
const BULK_BODIES_BYTES: u64 = 4 * 16 * 1024 * 1024;
const SLACK_BYTES: u64 = 32 * 1024 * 1024;

/// POSTs `body` to `path`; returns the answer's status, its size in bytes and its JSON.
async fn post_measured(api: &Api, path: &str, body: Bytes) -> (StatusCode, usize, Value) {
    let response = api.http.post(format!("{}{path}", api.url)).body(body).send().await;
    let response = response.unwrap_or_else(|e| panic!("POST {path}: {e:?}"));
    let status = response.status();
    let bytes = response.bytes().await.expect("read the answer");
    (status, bytes.len(), serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Sends each of `cases` (path, body) four times at once; returns every answer, with its case.
async fn four_at_once(
    api: &Api,
    cases: Vec<(&'static str, Value)>,
) -> Vec<(String, StatusCode, usize, Value)> {
    let mut answers = Vec::new();
    for (path, body) in cases {
        let body = Bytes::from(body.to_string());
        let replies = join_all((0..4).map(|_| post_measured(api, path, body.clone()))).await;
        answers.extend(replies.into_iter().map(|(status, size, json)| (path.to_owned(), status, size, json)));
    }
    answers
}

/// Every answer is a small 4xx error with `code`.
fn assert_small_errors(answers: &[(String, StatusCode, usize, Value)], code: &str) {
    let largest = answers.iter().map(|(_, _, size, _)| size).max();
    eprintln!("{} answers `{code}`, the largest {largest:?} bytes", answers.len());
    for (path, status, size, body) in answers {
        assert!(*size < MAX_ERROR_BYTES, "{path}: {status} with a {size}-byte answer");
        assert!(status.is_client_error(), "{path}: {status} {body}");
        assert_eq!(body["code"], code, "{path}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_bad_value_gets_a_small_error_and_costs_the_node_little_memory() {
    let app = TestApp::spawn(&[]);
    let pid = app.node.pid();
    let baseline = proc_status_bytes(pid, "VmHWM");
    let huge = "\u{7f}".repeat(HUGE_VALUE_BYTES);

    // Routes of a few small fields refuse the body by its length, before reading it.
    let small_routes = vec![
        ("/api/increment", json!({ "key": huge })),
        ("/api/transfer", json!({ "from": "a", "to": "b", "amount": huge })),
        ("/api/hold", json!({ "ms": huge })),
        ("/api/test-isolation", json!({ "level": huge })),
    ];
    let answers = four_at_once(&app.api, small_routes).await;
    let small_peak = proc_status_bytes(pid, "VmHWM");
    eprintln!(
        "4 × 4 bodies with a 15 MB bad value to the small routes: VmHWM {baseline} → {small_peak} bytes"
    );
    assert_small_errors(&answers, "payload_too_large");
    assert!(small_peak < baseline + SLACK_BYTES, "peak RSS {small_peak} B, from {baseline} B");

    // Bulk insert reads the body (16 MiB allowed): its error names the field and the rule, not the value.
    let answers = four_at_once(&app.api, vec![("/api/bulk-insert", json!({ "data": huge }))]).await;
    let bulk_peak = proc_status_bytes(pid, "VmHWM");
    eprintln!("4 bulk inserts whose data is a 15 MB string: VmHWM {baseline} → {bulk_peak} bytes");
    assert_small_errors(&answers, "invalid_request");
    let message = answers[0].3["error"].as_str().unwrap();
    assert!(message.starts_with("data: ") && message.contains("expected an array of strings"), "{message}");
    let bound = baseline + BULK_BODIES_BYTES + SLACK_BYTES;
    assert!(bulk_peak < bound, "peak RSS {bulk_peak} B passed {bound} B");

    // A bad value within the small limit: the message names the field and the rule, never the value.
    let long = "\u{7f}".repeat(LONG_VALUE_BYTES);
    let within_the_limit = vec![
        ("/api/transfer", json!({ "from": "a", "to": "b", "amount": long })),
        ("/api/hold", json!({ "ms": long })),
    ];
    let answers = four_at_once(&app.api, within_the_limit).await;
    assert_small_errors(&answers, "invalid_request");
    for (path, _, _, body) in &answers {
        let message = body["error"].as_str().unwrap();
        let field = if path == "/api/hold" { "ms: " } else { "amount: " };
        assert!(message.starts_with(field) && message.contains("a whole number"), "{path}: {message}");
    }
    assert_eq!(table_counts(&app), "0/0");
}
