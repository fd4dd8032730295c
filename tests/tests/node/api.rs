//! The write endpoints under concurrency: no lost updates, race-free creation, atomic bulk inserts,
//! deadlocks detected and survived; and counter reads that share queries yet see every acknowledged write.

use std::collections::{BTreeMap, BTreeSet};

use fleet_local::Node;
use fleet_tests::{node_options, Api, Reply, TestApp};
use futures_util::future::join_all;
use reqwest::StatusCode;

/// A request shed at default settings: 503 with `Retry-After` (the pool queue was too long, or the
/// COMMIT outcome is unknown: 08007). Right under a thousand requests at once on a loaded machine.
fn shed(reply: &Reply) -> bool {
    reply.status == StatusCode::SERVICE_UNAVAILABLE && reply.headers.contains_key("retry-after")
}

/// Every reply is a 200 or shed (see [`shed`]).
fn assert_ok_or_shed(replies: &[Reply]) {
    let refused: Vec<_> = replies.iter().filter(|r| r.status != StatusCode::OK && !shed(r)).collect();
    assert!(refused.is_empty(), "only 200 or 503 with Retry-After, got {:?}", refused.first());
}

/// The replies to the increments of one counter that held `start` before them and holds `stored` now:
/// every 200 carries its own value in `start + 1..=stored`, and the counter grew by exactly the
/// acknowledged increments plus at most those whose outcome was unknown (08007). With no 08007, the
/// values are exactly `start + 1..=stored`. Returns the acknowledged values.
fn assert_counter_holds_the_acknowledged(replies: &[&Reply], start: i64, stored: i64) -> BTreeSet<i64> {
    let distinct = fleet_tests::acknowledged_values(replies.iter().copied());
    let acked = distinct.len() as i64;
    let unknown = replies.iter().filter(|r| r.code() == "08007").count() as i64;
    assert!(
        (start + acked..=start + acked + unknown).contains(&stored),
        "from {start}: {acked} acknowledged, {unknown} unknown, {stored} in the database"
    );
    if unknown == 0 {
        assert_eq!(distinct, (start + 1..=stored).collect(), "each value from {start} exactly once");
    }
    assert!(distinct.iter().all(|v| (start + 1..=stored).contains(v)), "a value the counter never reached");
    distinct
}

/// The replies grouped by counter: `keys[i]` is the key the i-th request incremented.
fn by_key<'a>(keys: &[&'a str], replies: &'a [Reply]) -> BTreeMap<&'a str, Vec<&'a Reply>> {
    let mut grouped: BTreeMap<&str, Vec<&Reply>> = BTreeMap::new();
    for (key, reply) in keys.iter().zip(replies) {
        grouped.entry(key).or_default().push(reply);
    }
    grouped
}

/// How many of `replies` were shed, printed so a run shows how close to the pool's limit it came.
fn report_shed(what: &str, replies: &[Reply]) {
    let shed = replies.iter().filter(|r| shed(r)).count();
    if shed > 0 {
        eprintln!("{what}: {shed} of {} shed with 503", replies.len());
    }
}

/// 1000 concurrent increments of one key on a node in `mode`, at default settings: a request may be shed
/// (503) when the pool queue is too long, but every 200 carries its own value, and the counter holds
/// exactly the acknowledged increments (plus at most those whose COMMIT outcome was unknown: 08007).
/// With none shed, the values are exactly 1..1000. Returns how many transactions committed them (the
/// batch-size histogram's count) and how many increments they committed.
async fn thousand_concurrent_increments(mode: &str) -> (f64, f64) {
    let app = TestApp::spawn(&[("INCREMENT_MODE", mode)]);
    let replies = join_all((0..1000).map(|_| app.api.increment("hot"))).await;

    assert_ok_or_shed(&replies);
    let stored = app.sql_i64("SELECT value FROM counters WHERE key = 'hot'");
    assert_counter_holds_the_acknowledged(&replies.iter().collect::<Vec<_>>(), 0, stored);
    report_shed(mode, &replies);
    assert_eq!(app.api.metric("fleet_increments_total").await, stored as f64);
    (app.api.metric("fleet_increment_batch_size_count").await, stored as f64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_increments_of_one_key_return_each_value_once_in_fewer_transactions() {
    let (transactions, increments) = thousand_concurrent_increments("coalesce").await;
    // Increments arriving together share transactions: many per transaction, not one or two.
    assert!(
        transactions <= increments / 4.0,
        "coalescing committed {increments} increments in {transactions} transactions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_increments_with_one_transaction_each_return_each_value_once() {
    let (transactions, increments) = thousand_concurrent_increments("transaction").await;
    assert_eq!(transactions, increments, "one transaction per increment");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalesced_batch_that_fails_applies_none_of_its_increments_and_fails_only_that_keys_requests() {
    let app = TestApp::spawn(&[]);
    let start = i64::MAX - 10;
    app.sql(&format!("INSERT INTO counters (key, value) VALUES ('edge', {start})"));
    app.sql("INSERT INTO counters (key, value) SELECT 'other-' || i, 0 FROM generate_series(0, 4) AS i");
    // 50 increments of `edge` cannot all fit below i64::MAX: some batch must fail with 22003. The 50
    // of other keys, interleaved, share those many-key batches, and must not fail with them.
    let other_keys: Vec<String> = (0..5).map(|i| format!("other-{i}")).collect();
    let requests: Vec<&str> =
        (0..100).map(|i| if i % 2 == 0 { "edge" } else { other_keys[i % 5].as_str() }).collect();
    let replies = join_all(requests.iter().map(|key| app.api.increment(key))).await;

    let overflowed = |r: &Reply| r.status == StatusCode::UNPROCESSABLE_ENTITY && r.code() == "22003";
    let grouped = by_key(&requests, &replies);
    let edge = &grouped["edge"];
    assert!(edge.iter().all(|r| r.status == StatusCode::OK || overflowed(r) || shed(r)), "{edge:?}");
    assert!(edge.iter().any(|r| overflowed(r)), "some increments overflowed");
    // No batch half-applied: the counter is exactly its start plus the acknowledged increments.
    let stored = app.sql_i64("SELECT value FROM counters WHERE key = 'edge'");
    assert_counter_holds_the_acknowledged(edge, start, stored);
    for key in &other_keys {
        let replies = &grouped[key.as_str()];
        assert!(replies.iter().all(|r| r.status == StatusCode::OK || shed(r)), "{key}: {replies:?}");
        let stored = app.sql_i64(&format!("SELECT value FROM counters WHERE key = '{key}'"));
        assert_counter_holds_the_acknowledged(replies, 0, stored);
    }
    report_shed("overflowing batches", &replies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_that_overflows_either_counter_is_refused_with_22003_and_moves_nothing() {
    let app = TestApp::spawn(&[]);
    app.sql("INSERT INTO counters (key, value) VALUES ('low', -9223372036854775807), ('high', 9223372036854775807)");
    app.sql("INSERT INTO counters (key, value) VALUES ('mid', 0)");
    // The two updates are pipelined: when the first overflows, the second only reports the aborted
    // transaction. Whichever answer is looked at first, the client is told about the overflow. Many
    // times, because which one a join polls first varies.
    for _ in 0..40 {
        for (from, to) in [("low", "mid"), ("mid", "high")] {
            let reply = app.api.transfer(from, to, 2).await;
            assert_eq!(
                (reply.status, reply.code()),
                (StatusCode::UNPROCESSABLE_ENTITY, "22003"),
                "{from}->{to}: {reply:?}"
            );
        }
    }
    let values = "SELECT string_agg(key || '=' || value, ',' ORDER BY key) FROM counters";
    assert_eq!(app.sql(values), "high=9223372036854775807,low=-9223372036854775807,mid=0", "nothing moved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_touches_of_fresh_keys_from_four_nodes_never_fail() {
    // One transaction per increment, from four nodes on the same fresh keys: many transactions race to
    // create each row (coalescing would create a key in one transaction per node, hiding the race).
    let env = [("INCREMENT_MODE", "transaction")];
    let app = TestApp::spawn(&env);
    let others: Vec<Node> =
        (2..=4).map(|i| Node::spawn(node_options(&app.pg, &format!("app-{i}"), &env)).unwrap()).collect();
    let apis: Vec<Api> =
        std::iter::once(app.api.clone()).chain(others.iter().map(|node| Api::new(node.url()))).collect();
    let keys: Vec<String> = (0..20).map(|i| format!("fresh-{i}")).collect();
    let requests: Vec<(&Api, &str)> = keys
        .iter()
        .flat_map(|key| apis.iter().flat_map(move |api| (0..15).map(move |_| (api, key.as_str()))))
        .collect();
    let replies = join_all(requests.iter().map(|(api, key)| api.increment(key))).await;

    // At default settings some may be shed (503), but no creation race reaches a client.
    assert_ok_or_shed(&replies);
    let keys_sent: Vec<&str> = requests.iter().map(|(_, key)| *key).collect();
    for (key, replies) in by_key(&keys_sent, &replies) {
        let stored = app.sql_i64(&format!("SELECT value FROM counters WHERE key = '{key}'"));
        assert_counter_holds_the_acknowledged(&replies, 0, stored);
    }
    report_shed("first touches", &replies);
    assert_eq!(app.sql_i64("SELECT count(*) FROM counters"), 20, "one row per key");
    for api in &apis {
        assert_eq!(api.metric(r#"fleet_db_errors_total{sqlstate="23505"}"#).await, 0.0, "{}", api.url);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_inserts_small_and_large_store_every_row_with_its_id_in_input_order() {
    let app = TestApp::spawn(&[]);
    // 4,000 rows take the UNNEST path, 100,000 the binary COPY path.
    for (batch, size) in [(0, 4_000), (1, 100_000)] {
        let rows: Vec<String> = (0..size).map(|i| format!("b{batch}-row-{i}")).collect();
        let reply = app.api.bulk_insert(&rows).await;

        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        assert_eq!(reply.body["count"], size);
        let ids: Vec<i64> =
            reply.body["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(ids.len(), size);
        // Row i of the request must be the row whose id is ids[i].
        let stored = app.sql(&format!(
            "SELECT string_agg(id::text || '=' || content, ',' ORDER BY id) FROM data WHERE content LIKE 'b{batch}-%'"
        ));
        let expected: Vec<String> = ids.iter().zip(&rows).map(|(id, row)| format!("{id}={row}")).collect();
        assert_eq!(stored, expected.join(","), "batch of {size}");
    }
    assert_eq!(app.sql_i64("SELECT count(*) FROM data WHERE container_id = 'app-1'"), 104_000);
}

/// The two counters' values, read from the database.
fn pair_values(app: &TestApp, a: &str, b: &str) -> (i64, i64) {
    let value = |key: &str| app.sql_i64(&format!("SELECT value FROM counters WHERE key = '{key}'"));
    (value(a), value(b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_opposite_transfers_200_at_once_on_one_pair_all_succeed_and_deadlocks_are_retried() {
    // Default settings: pool 5, POOL_WAIT_TIMEOUT_MS 2000, LOCK_ORDER=request. 200 transfers of one pair
    // wait at the node's row gates without a connection, two at a time reach PostgreSQL in opposite
    // orders, deadlock there, and the victim is retried.
    let app = TestApp::spawn(&[]);
    let start = std::time::Instant::now();
    let sent = fleet_tests::opposite_transfers(std::slice::from_ref(&app.api), "a", "b", 1000, 200).await;
    let took = start.elapsed();

    fleet_tests::assert_transfers_applied_exactly_once(&sent, pair_values(&app, "a", "b"));
    let retried = app.api.metric(r#"fleet_db_transaction_retries_total{sqlstate="40P01"}"#).await;
    eprintln!("1000 opposite transfers, 200 at once, one node: {took:?}, {retried} deadlocks retried");
    assert!(retried > 0.0, "opposite lock orders met in PostgreSQL: 40P01 occurred and was retried");
    let attempts: u64 = sent.iter().map(|s| s.reply.body["attempts"].as_u64().unwrap()).sum();
    assert_eq!(
        attempts - sent.len() as u64,
        retried as u64,
        "every retry is counted, and reported in attempts"
    );
    assert_eq!(app.api.metric(r#"fleet_db_errors_total{sqlstate="40P01"}"#).await, retried);
    // Ordinary traffic on other keys kept its connections meanwhile (the gates hold two per counter).
    assert_eq!(app.api.increment("other").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sorted_lock_order_never_deadlocks() {
    let app = TestApp::spawn(&[("LOCK_ORDER", "sorted")]);
    let sent = fleet_tests::opposite_transfers(std::slice::from_ref(&app.api), "a", "b", 400, 200).await;

    fleet_tests::assert_transfers_applied_exactly_once(&sent, pair_values(&app, "a", "b"));
    assert!(sent.iter().all(|s| s.reply.body["attempts"] == 1), "no transfer needed a second attempt");
    assert_eq!(app.api.metric(r#"fleet_db_errors_total{sqlstate="40P01"}"#).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_of_many_keys_share_transactions_and_each_value_is_handed_out_once() {
    let app = TestApp::spawn(&[]);
    let keys: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
    app.sql("INSERT INTO counters (key, value) SELECT 'k' || i, 100 FROM generate_series(0, 49) AS i");
    let requests: Vec<&str> = keys.iter().flat_map(|key| (0..20).map(move |_| key.as_str())).collect();
    let replies = join_all(requests.iter().map(|key| app.api.increment(key))).await;

    assert_ok_or_shed(&replies);
    for (key, replies) in by_key(&requests, &replies) {
        let stored = app.sql_i64(&format!("SELECT value FROM counters WHERE key = '{key}'"));
        assert_counter_holds_the_acknowledged(&replies, 100, stored);
    }
    report_shed("many keys", &replies);
    // Increments arriving together: transactions carry many each, not one or two.
    let committed = app.sql_i64("SELECT sum(value) - 50 * 100 FROM counters") as f64;
    assert!(committed > 0.0, "no increment was committed");
    let transactions = app.api.metric("fleet_increment_batch_size_count").await;
    assert!(transactions <= committed / 4.0, "{committed} increments took {transactions} transactions");
}

/// Reads that arrive together share a query (`db::coalesce`): a thousand at once over 100 counters and
/// 10 that do not exist each get their own counter's value, or 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_reads_share_queries_and_each_gets_its_own_counter() {
    let app = TestApp::spawn(&[]);
    app.sql("INSERT INTO counters (key, value) SELECT 'r' || i, 7 * i FROM generate_series(0, 99) AS i");
    let keys: Vec<usize> = (0..1000).map(|i| i * 37 % 110).collect();
    let paths: Vec<String> = keys.iter().map(|i| format!("/api/counters/r{i}")).collect();
    let replies = join_all(paths.iter().map(|path| app.api.get(path))).await;

    for (i, reply) in keys.iter().zip(&replies) {
        match i {
            0..100 => assert_eq!(
                (reply.status, reply.body["key"].as_str(), reply.body["value"].as_i64()),
                (StatusCode::OK, Some(format!("r{i}").as_str()), Some(7 * *i as i64)),
                "{:?}",
                reply.body
            ),
            _ => assert_eq!((reply.status, reply.code()), (StatusCode::NOT_FOUND, "not_found"), "r{i}"),
        }
    }
    let answered = app.api.metric("fleet_read_batch_size_sum").await;
    let queries = app.api.metric("fleet_read_batch_size_count").await;
    eprintln!("1000 reads in {queries} queries");
    assert_eq!(answered, 1000.0, "every read answered by a batch");
    assert!(queries < 1000.0, "reads that arrived together shared queries");
}

/// A shared read query is sent only after each of its reads arrived: 50 clients, each incrementing its
/// own counter and then reading it back, 20 times, all at once, always read the value their increment
/// was just answered with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_an_answered_increment_sees_it_while_reads_share_queries() {
    let app = TestApp::spawn(&[]);
    let clients = (0..50).map(|c| {
        let api = app.api.clone();
        async move {
            let key = format!("own-{c}");
            for _ in 0..20 {
                let written = api.increment(&key).await;
                assert_eq!(written.status, StatusCode::OK, "{:?}", written.body);
                let read = api.get(&format!("/api/counters/{key}")).await;
                assert_eq!(read.body["value"], written.body["value"], "{key}: {:?}", read.body);
            }
        }
    });
    join_all(clients).await;
    assert_eq!(app.sql_i64("SELECT sum(value) FROM counters"), 50 * 20);
    let queries = app.api.metric("fleet_read_batch_size_count").await;
    eprintln!("1000 reads after writes in {queries} queries");
    assert!(queries < 1000.0, "some reads shared a query, so the check covered shared ones");
}
