//! Idempotency keys: a write carrying one happens once, whichever node sees the repeats.

use std::time::{Duration, Instant};

use fleet_local::Node;
use fleet_tests::{node_options, Api, Reply, TestApp};
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn post_once(api: &Api, path: &str, key: &str, body: &Value) -> Reply {
    let response = api
        .http
        .post(format!("{}{path}", api.url))
        .header("Idempotency-Key", key)
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
    assert_eq!(again.body["ids"], first.body["ids"]);
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
