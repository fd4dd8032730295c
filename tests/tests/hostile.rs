//! Hostile clients: bodies built to exhaust a node's memory, and a network that stops forwarding.

use fleet_tests::TestApp;
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::json;

/// The node's defaults (see `fleet_app::config`): a test of what a user gets out of the box.
const BODY_LIMIT_BYTES: usize = 16 * 1024 * 1024;
const BULK_MAX_ROWS: usize = 100_000;
/// How many maximum-size bodies are sent at once.
const CONCURRENT_BODIES: usize = 8;
/// What a `String` costs in a `Vec<String>`, its text aside.
const STRING_BYTES: usize = 24;
/// Allowance for the allocator's fragmentation and the HTTP machinery of eight connections.
const SLACK_BYTES: u64 = 32 * 1024 * 1024;

/// A `/proc/<pid>/status` field in bytes (`VmHWM`: peak resident set; `VmRSS`: resident now).
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read the node's status");
    let line = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).expect(field);
    let kib: u64 = line.trim().trim_end_matches("kB").trim().parse().expect("a size in kB");
    kib * 1024
}

/// A body of exactly `BODY_LIMIT_BYTES`: `{"data":["","",…,""]}`, millions of empty rows.
fn tiny_rows_body() -> String {
    let (open, close) = (r#"{"data":["#, r#"""]}"#);
    let rows = (BODY_LIMIT_BYTES - open.len() - close.len()) / 3;
    let mut body = String::with_capacity(BODY_LIMIT_BYTES);
    body.push_str(open);
    body.push_str(&r#""","#.repeat(rows));
    body.push_str(close);
    body.push_str(&" ".repeat(BODY_LIMIT_BYTES - body.len()));
    assert_eq!(body.len(), BODY_LIMIT_BYTES);
    body
}

/// A body of at most `BODY_LIMIT_BYTES` holding `BULK_MAX_ROWS` rows of equal length, as long as fit.
fn real_rows_body() -> String {
    let overhead = r#"{"data":[]}"#.len();
    let row_len = (BODY_LIMIT_BYTES - overhead) / BULK_MAX_ROWS - 3;
    let rows: Vec<String> = (0..BULK_MAX_ROWS).map(|i| format!("{i:0>row_len$}")).collect();
    let body = json!({ "data": rows }).to_string();
    assert!(body.len() <= BODY_LIMIT_BYTES && body.len() > BODY_LIMIT_BYTES - BULK_MAX_ROWS * 3);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_maximum_size_bodies_at_once_keep_the_nodes_memory_bounded() {
    // Eight inserts of 100,000 rows take seconds each on a pool of 5: the last ones wait for longer than
    // the default POOL_WAIT_TIMEOUT_MS, which is not what this test is about.
    let app = TestApp::spawn(&[("POOL_WAIT_TIMEOUT_MS", "60000")]);
    let pid = app.node.pid();
    let baseline = proc_status_bytes(pid, "VmHWM");

    // Tiny rows: refused once BULK_MAX_ROWS is passed, so each request holds its body and at most
    // BULK_MAX_ROWS + 1 empty strings.
    let body = tiny_rows_body();
    let replies =
        join_all((0..CONCURRENT_BODIES).map(|_| app.api.post_raw("/api/bulk-insert", body.clone()))).await;
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{:?}", reply.body);
        assert_eq!(reply.code(), "payload_too_large");
        let message = reply.body["error"].as_str().unwrap();
        assert!(message.contains("BULK_MAX_ROWS") && message.contains("100000"), "{message}");
    }
    let tiny_peak = proc_status_bytes(pid, "VmHWM");
    let per_request = (BODY_LIMIT_BYTES + (BULK_MAX_ROWS + 1) * STRING_BYTES) as u64;
    let bound = baseline + CONCURRENT_BODIES as u64 * per_request + SLACK_BYTES;
    eprintln!("tiny rows: VmHWM {baseline} → {tiny_peak} bytes (bound {bound})");
    assert!(tiny_peak < bound, "peak RSS {tiny_peak} B passed {bound} B");
    assert_eq!(app.sql_i64("SELECT count(*) FROM data"), 0);

    // Real rows: every one inserted; each request holds its body, then its rows (a copy of the body's
    // text at most), never both after parsing.
    let body = real_rows_body();
    let replies =
        join_all((0..CONCURRENT_BODIES).map(|_| app.api.post_raw("/api/bulk-insert", body.clone()))).await;
    let durations: Vec<&serde_json::Value> = replies.iter().map(|r| &r.body["duration"]).collect();
    eprintln!("real rows: durations {durations:?} ms");
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body["error"]);
        assert_eq!(reply.body["count"], BULK_MAX_ROWS);
    }
    let real_peak = proc_status_bytes(pid, "VmHWM");
    let per_request = (2 * BODY_LIMIT_BYTES + BULK_MAX_ROWS * STRING_BYTES) as u64;
    let bound = baseline + CONCURRENT_BODIES as u64 * per_request + SLACK_BYTES;
    eprintln!("real rows: VmHWM {baseline} → {real_peak} bytes (bound {bound})");
    assert!(real_peak < bound, "peak RSS {real_peak} B passed {bound} B");
    assert_eq!(app.sql_i64("SELECT count(*) FROM data"), (CONCURRENT_BODIES * BULK_MAX_ROWS) as i64);
}
