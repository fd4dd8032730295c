//! Bulk inserts at once and under faults: every request gets exactly its own rows, in its order, on both
//! sides of the UNNEST/COPY switch (5,000 rows), and a backend killed during a COPY leaves no row of it.

use std::time::{Duration, Instant};

use fleet_tests::{Reply, TestApp};
use futures_util::future::join_all;
use reqwest::StatusCode;

/// `size` rows for request `n`, each naming its request and position.
fn rows(n: usize, size: usize) -> Vec<String> {
    (0..size).map(|i| format!("r{n}-{i}")).collect()
}

/// Asserts that the table holds exactly `rows` for request `n`, each under the id the reply gave it.
fn assert_stored_as_answered(app: &TestApp, n: usize, rows: &[String], reply: &Reply) {
    let ids: Vec<i64> = reply.body["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    assert_eq!(ids.len(), rows.len(), "request {n}: one id per row");
    let stored = app.sql(&format!(
        "SELECT string_agg(id || '=' || content, ',' ORDER BY id) FROM data WHERE content LIKE 'r{n}-%'"
    ));
    let expected: Vec<String> = ids.iter().zip(rows).map(|(id, row)| format!("{id}={row}")).collect();
    assert_eq!(
        stored,
        expected.join(","),
        "request {n} ({} rows): its rows under its ids, in order",
        rows.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_inserts_of_every_size_at_once_each_get_exactly_their_rows_in_order() {
    let app = TestApp::spawn(&[]);
    // Both sides of the switch from UNNEST to COPY at 5,000 rows, the maximum, and many small ones.
    let sizes = [1, 4_999, 5_000, 5_001, 20_000, 100_000].into_iter().chain([1_000; 16]).collect::<Vec<_>>();
    let requests: Vec<Vec<String>> = sizes.iter().enumerate().map(|(n, &size)| rows(n, size)).collect();
    let replies = join_all(requests.iter().map(|rows| app.api.bulk_insert(rows))).await;
    for (n, (rows, reply)) in requests.iter().zip(&replies).enumerate() {
        assert_eq!(reply.status, StatusCode::OK, "request {n} of {} rows: {:?}", rows.len(), reply.body);
        assert_eq!(reply.body["count"], rows.len());
        assert_stored_as_answered(&app, n, rows, reply);
    }
    let total: usize = sizes.iter().sum();
    assert_eq!(app.sql_i64("SELECT count(*) FROM data") as usize, total, "no row more, none less");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_during_a_copy_leaves_no_row_of_that_attempt() {
    let app = TestApp::spawn(&[]);
    let copying = "SELECT pid FROM pg_stat_activity WHERE usename = 'appuser' AND query LIKE 'COPY %' \
                   AND state = 'active' LIMIT 1";
    let mut killed = 0;
    for n in 0..5 {
        let rows = rows(n, 100_000);
        let request = tokio::spawn({
            let (api, rows) = (app.api.clone(), rows.clone());
            async move { api.bulk_insert(&rows).await }
        });
        // Terminate the backend while it is in the COPY; a request over before one was seen kills none.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !request.is_finished() && Instant::now() < deadline {
            let pid = app.sql(copying);
            if !pid.is_empty() && app.sql(&format!("SELECT pg_terminate_backend({pid})")) == "t" {
                killed += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let reply = request.await.unwrap();
        let stored = app.sql_i64(&format!("SELECT count(*) FROM data WHERE content LIKE 'r{n}-%'"));
        if reply.status == StatusCode::OK {
            // Killed before COMMIT, so retried on a new connection: all rows once, under the answered ids.
            assert_stored_as_answered(&app, n, &rows, &reply);
        } else {
            assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", reply.body);
            assert_eq!(stored, 0, "a failed bulk insert leaves no row: {:?}", reply.body);
        }
    }
    assert!(killed > 0, "no COPY was ever seen running, so none was killed");
    // The node sees the kill as the server's FATAL 57P01, or, when it was still sending COPY data, as the
    // connection breaking under it (08006).
    let mut seen = 0.0;
    for series in ["fleet_db_transaction_retries_total", "fleet_db_errors_total"] {
        for sqlstate in ["57P01", "08006"] {
            seen += app.api.metric(&format!(r#"{series}{{sqlstate="{sqlstate}"}}"#)).await;
        }
    }
    assert!(seen > 0.0, "the killed COPYs were seen by the node");
}
