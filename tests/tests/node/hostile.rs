//! Hostile clients: bodies built to exhaust a node's memory or to arrive forever, a network that stops
//! forwarding, and strangers at the lab and operator endpoints.

use std::time::{Duration, Instant};

use bytes::Bytes;

use fleet_app::routes::IDEMPOTENCY_KEY;
use fleet_local::fleet::{Fleet, FleetOptions};
use fleet_local::{Node, Postgres};
use fleet_tests::proxy::Proxy;
use fleet_tests::{node_options, proc_status_bytes, start_postgres, Api, Reply, TestApp};
use futures_util::future::join_all;
use reqwest::StatusCode;
use secrecy::ExposeSecret;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{Client, NoTls};

/// The node's defaults (see `fleet_app::config`): a test of what a user gets out of the box.
const BODY_LIMIT_BYTES: usize = 16 * 1024 * 1024;
const BULK_MAX_ROWS: usize = 100_000;
/// How many maximum-size bodies a node holds at once, by design (its body budget, `routes::body`).
const MAX_SIZE_BODIES_AT_ONCE: u64 = 4;
/// What a `String` costs in a `Vec<String>`, its text aside.
const STRING_BYTES: usize = 24;
/// What a stored row costs beside its text: its `String` and the allocator's header, its id, and the
/// id's JSON in the response and in the stored idempotent response.
const ROW_BYTES: usize = 64;
/// Allowance for the allocator's fragmentation and the HTTP machinery of the connections.
const SLACK_BYTES: u64 = 32 * 1024 * 1024;

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
async fn maximum_size_bodies_however_many_at_once_keep_the_nodes_memory_bounded() {
    // Eight inserts of 100,000 rows take seconds each on a pool of 5: the last ones wait for longer than
    // the default POOL_WAIT_TIMEOUT_MS, which is not what this test is about.
    let app = TestApp::spawn(&[("POOL_WAIT_TIMEOUT_MS", "60000")]);
    let pid = app.node.pid();
    let baseline = proc_status_bytes(pid, "VmHWM");

    // 32 bodies of tiny rows at once: each is refused once BULK_MAX_ROWS is passed, so a body in flight
    // costs its bytes and at most BULK_MAX_ROWS + 1 empty strings, and at most four are in flight.
    let body = Bytes::from(tiny_rows_body());
    let replies = join_all((0..32).map(|_| app.api.post_raw("/api/bulk-insert", body.clone()))).await;
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{:?}", reply.body);
        assert_eq!(reply.code(), "payload_too_large");
        let message = reply.body["error"].as_str().unwrap();
        assert!(message.contains("BULK_MAX_ROWS") && message.contains("100000"), "{message}");
    }
    let tiny_peak = proc_status_bytes(pid, "VmHWM");
    let per_body = (BODY_LIMIT_BYTES + (BULK_MAX_ROWS + 1) * STRING_BYTES) as u64;
    let bound = baseline + MAX_SIZE_BODIES_AT_ONCE * per_body + SLACK_BYTES;
    eprintln!("32 bodies of tiny rows: VmHWM {baseline} → {tiny_peak} bytes (bound {bound})");
    assert!(tiny_peak < bound, "peak RSS {tiny_peak} B passed {bound} B");
    assert_eq!(app.sql_i64("SELECT count(*) FROM data"), 0);

    // Eight bodies of real rows at once, each with its own Idempotency-Key: every one inserted. A body in
    // flight costs its bytes, then its rows (a copy of the body's text at most) and their ids; the key's
    // fingerprint is hashed from the rows without another copy.
    let body = Bytes::from(real_rows_body());
    let post = |i: usize| {
        let request = app.api.http.post(format!("{}/api/bulk-insert", app.api.url));
        request.header(IDEMPOTENCY_KEY, format!("bulk-{i}")).body(body.clone()).send()
    };
    let replies = join_all((0..8).map(post)).await;
    for reply in replies {
        let reply = reply.expect("a response");
        let status = reply.status();
        let reply: serde_json::Value = reply.json().await.unwrap();
        assert_eq!((status, &reply["count"]), (StatusCode::OK, &json!(BULK_MAX_ROWS)), "{}", reply["error"]);
    }
    let real_peak = proc_status_bytes(pid, "VmHWM");
    assert_eq!(app.sql_i64("SELECT count(*) FROM idempotency_keys"), 8);
    let per_body = (2 * BODY_LIMIT_BYTES + BULK_MAX_ROWS * ROW_BYTES) as u64;
    let bound = baseline + MAX_SIZE_BODIES_AT_ONCE * per_body + SLACK_BYTES;
    eprintln!("8 bodies of real rows: VmHWM {baseline} → {real_peak} bytes (bound {bound})");
    assert!(real_peak < bound, "peak RSS {real_peak} B passed {bound} B");
    assert_eq!(app.sql_i64("SELECT count(*) FROM data"), 8 * BULK_MAX_ROWS as i64);
}

// ---- bodies that take forever to arrive ----

/// The tests' `BODY_READ_TIMEOUT_MS`: short, so that the tests are.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// A client that declares a body of `declared` bytes for `path` and sends it a byte every 100 ms; returns
/// the status line of the node's answer and how long that took.
async fn trickle(port: u16, path: &str, declared: usize) -> (String, Duration) {
    let start = Instant::now();
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect to the node");
    let (mut read, mut write) = stream.into_split();
    let head = format!("POST {path} HTTP/1.1\r\nHost: node\r\nContent-Length: {declared}\r\n\r\n{{");
    write.write_all(head.as_bytes()).await.expect("send the head");
    let sender = tokio::spawn(async move {
        while write.write_all(b" ").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut answer = Vec::new();
    let mut buf = [0; 1024];
    let deadline = start + Duration::from_secs(60);
    while !answer.windows(2).any(|w| w == b"\r\n") {
        let read = tokio::time::timeout_at(deadline.into(), read.read(&mut buf)).await;
        match read.expect("the node answers within 60 s").expect("read the answer") {
            0 => break,
            n => answer.extend_from_slice(&buf[..n]),
        }
    }
    sender.abort();
    let answer = String::from_utf8_lossy(&answer);
    (answer.lines().next().unwrap_or_default().to_owned(), start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_ends_a_request_whose_head_or_body_stops_arriving_within_its_client_timeout() {
    let fleet = fleet_admitting(None, &[]);
    let port: u16 = fleet.url().rsplit(':').next().and_then(|p| p.parse().ok()).expect("nginx's port");
    let timeout =
        Duration::from_secs(fleet_local::nginx::CLIENT_TIMEOUT.trim_end_matches('s').parse().unwrap());
    for head in [
        // A body declared and never sent beyond its first byte.
        "POST /api/bulk-insert HTTP/1.1\r\nHost: fleet\r\nContent-Length: 1000\r\n\r\n{".to_owned(),
        // A head that never ends.
        "GET /health HTTP/1.1\r\nHost: fleet\r\n".to_owned(),
    ] {
        let start = Instant::now();
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect to nginx");
        stream.write_all(head.as_bytes()).await.expect("send the head");
        let mut answer = Vec::new();
        let read = tokio::time::timeout(timeout * 3, stream.read_to_end(&mut answer)).await;
        let took = start.elapsed();
        assert!(read.is_ok(), "nginx still held a silent request after {took:?}: {head:?}");
        assert!(took < timeout + Duration::from_secs(5), "nginx waited {took:?} for {head:?}");
        let answer = String::from_utf8_lossy(&answer);
        let status = answer.lines().next().unwrap_or_default();
        assert!(status.is_empty() || status.contains(" 408 "), "nginx answered {status:?} to {head:?}");
    }
    assert_eq!(Api::new(fleet.url()).get("/health").await.status, StatusCode::OK, "nginx still serves");
    fleet.stop().unwrap();
}

/// Rows enough for a body above 64 KiB, which draws on the node's body budget.
fn rows_of(bytes: usize) -> Vec<String> {
    (0..bytes / 100).map(|i| format!("{i:0>97}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_trickle_maximum_size_bodies_hold_the_body_budget_only_until_their_deadline() {
    let app = TestApp::spawn(&[("BODY_READ_TIMEOUT_MS", &BODY_READ_TIMEOUT.as_millis().to_string())]);
    let port = app.node.port();
    // Four clients declare a maximum-size body each, the node's whole body budget, and trickle it.
    let tricklers: Vec<_> =
        (0..4).map(|_| tokio::spawn(trickle(port, "/api/bulk-insert", BODY_LIMIT_BYTES))).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while accepted_connections(port) < 4 {
        assert!(Instant::now() < deadline, "the node never had the four connections");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Their heads are parsed and their shares reserved within a moment of their connections.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A normal bulk insert waits for the budget until the tricklers' deadline cuts them off, no longer.
    let start = Instant::now();
    let bound = 2 * BODY_READ_TIMEOUT + SCHEDULING_SLACK;
    let insert = tokio::time::timeout(bound, app.api.bulk_insert(&rows_of(200_000))).await;
    let took = start.elapsed();
    let reply = insert.unwrap_or_else(|_| panic!("the bulk insert was still blocked after {bound:?}"));
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert!(took > BODY_READ_TIMEOUT / 2, "it waited for the budget the tricklers held: {took:?}");
    for trickler in tricklers {
        let (status, after) = trickler.await.unwrap();
        assert!(status.starts_with("HTTP/1.1 408"), "a trickler got {status:?}");
        assert!(after < BODY_READ_TIMEOUT + SCHEDULING_SLACK, "a trickler was cut off after {after:?}");
    }
    assert_eq!(app.sql_i64("SELECT count(*) FROM data"), 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_body_waits_for_the_body_budget_at_most_body_read_timeout_then_gets_503() {
    let timeout = BODY_READ_TIMEOUT.as_millis().to_string();
    let app = TestApp::spawn(&[("BODY_READ_TIMEOUT_MS", &timeout), ("BODY_LIMIT_BYTES", "1048576")]);
    // Four bulk inserts of about 1 MB hold the whole budget (4 MiB) while a lock on `data` holds them.
    let admin = connect(&app.pg.admin_url()).await;
    admin.batch_execute("BEGIN; LOCK TABLE data").await.unwrap();
    let inserts: Vec<_> = (0..4)
        .map(|_| {
            let api = app.api.clone();
            tokio::spawn(async move { api.bulk_insert(&rows_of(1_000_000)).await })
        })
        .collect();
    let waiting = "SELECT count(*) FROM pg_stat_activity \
                   WHERE application_name = 'fleet-app/app-1' AND wait_event_type = 'Lock'";
    // Watched from another session: the locking one's transaction would see one snapshot of the statistics.
    let watch = connect(&app.pg.admin_url()).await;
    assert_eq!(poll(&watch, waiting, Duration::from_secs(30), |n| n == 4).await, 4, "the inserts wait");

    let start = Instant::now();
    let bound = BODY_READ_TIMEOUT + SCHEDULING_SLACK;
    let fifth = tokio::time::timeout(bound, app.api.bulk_insert(&rows_of(1_000_000))).await;
    let reply = fifth.unwrap_or_else(|_| panic!("the fifth insert still waited after {bound:?}"));
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", reply.body);
    assert_eq!(reply.code(), "body_budget_busy");
    assert!(reply.headers.contains_key("retry-after"));
    assert!(start.elapsed() >= BODY_READ_TIMEOUT, "it waited its turn first: {:?}", start.elapsed());

    admin.batch_execute("COMMIT").await.unwrap();
    for insert in inserts {
        assert_eq!(insert.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(app.sql_i64("SELECT count(*) FROM data"), 4 * 10_000);
}

// ---- a network that stops forwarding ----

const POOL_WAIT_TIMEOUT_MS: u64 = 1000;
const DB_ATTEMPT_TIMEOUT_MS: u64 = 2000;
const IDLE_IN_TRANSACTION_TIMEOUT_MS: u64 = 2000;
/// What a request may take beyond its promise: scheduling on a loaded two-core machine.
const SCHEDULING_SLACK: Duration = Duration::from_secs(3);

/// A request answers by the attempt's deadline (`POOL_WAIT_TIMEOUT_MS + DB_ATTEMPT_TIMEOUT_MS`).
fn promised() -> Duration {
    Duration::from_millis(POOL_WAIT_TIMEOUT_MS + DB_ATTEMPT_TIMEOUT_MS) + SCHEDULING_SLACK
}

async fn connect(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("a direct connection");
    tokio::spawn(connection);
    client
}

/// Polls `query` (one bigint) on `db` until `done` holds, for at most `within`; returns the last value.
async fn poll(db: &Client, query: &str, within: Duration, done: impl Fn(i64) -> bool) -> i64 {
    let deadline = Instant::now() + within;
    loop {
        let value: i64 = db.query_one(query, &[]).await.expect(query).get(0);
        if done(value) || Instant::now() > deadline {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node whose every database connection goes through `proxy`, with the short timeouts above.
async fn node_behind(pg: &Postgres, proxy: &Proxy) -> Node {
    let timeouts = [
        ("POOL_WAIT_TIMEOUT_MS", POOL_WAIT_TIMEOUT_MS.to_string()),
        ("DB_ATTEMPT_TIMEOUT_MS", DB_ATTEMPT_TIMEOUT_MS.to_string()),
        ("IDLE_IN_TRANSACTION_TIMEOUT_MS", IDLE_IN_TRANSACTION_TIMEOUT_MS.to_string()),
    ];
    let env: Vec<(&str, &str)> = timeouts.iter().map(|(k, v)| (*k, v.as_str())).collect();
    node_behind_with(pg, proxy, &env).await
}

/// A node whose every database connection goes through `proxy`, with extra environment `env`.
async fn node_behind_with(pg: &Postgres, proxy: &Proxy, env: &[(&str, &str)]) -> Node {
    let mut opts = node_options(pg, "app-1", env);
    let direct = format!("@127.0.0.1:{}/", pg.port());
    opts.database_url =
        opts.database_url.expose_secret().replace(&direct, &format!("@{}/", proxy.addr())).into();
    assert!(opts.database_url.expose_secret().contains(&proxy.addr().to_string()));
    // Blocking while it starts, on a thread of its own: the proxy's tasks need the runtime meanwhile.
    tokio::task::spawn_blocking(move || Node::spawn(opts)).await.unwrap().expect("a node behind the proxy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_that_stops_mid_transaction_gets_503_in_time_and_postgres_frees_the_locks() {
    let pg = start_postgres();
    let proxy = Proxy::start(([127, 0, 0, 1], pg.port()).into()).await.unwrap();
    let node = node_behind(&pg, &proxy).await;
    let api = Api::new(node.url());
    let admin = connect(&pg.admin_url()).await;
    assert_eq!(api.transfer("a", "b", 1).await.status, StatusCode::OK);

    // A direct session holds b's row lock, so a transfer a → b stops inside its transaction, holding a's.
    admin.batch_execute("BEGIN; SELECT value FROM counters WHERE key = 'b' FOR UPDATE").await.unwrap();
    let transfer = tokio::spawn({
        let api = api.clone();
        async move {
            let start = Instant::now();
            (api.transfer("a", "b", 5).await, start.elapsed())
        }
    });
    let waiting = "SELECT coalesce(max(pid), 0)::bigint FROM pg_stat_activity \
                   WHERE application_name = 'fleet-app/app-1' AND wait_event_type = 'Lock'";
    let backend = poll(&admin, waiting, Duration::from_secs(30), |pid| pid != 0).await;
    assert_ne!(backend, 0, "the node's transfer never waited for b's lock");
    let pooled = api.get("/api/pool-stats").await.body["totalCount"].as_i64().unwrap();

    // The network stops; then the lock is granted: the backend answers into the void and waits, idle
    // in its transaction, holding both rows.
    proxy.freeze();
    admin.batch_execute("COMMIT").await.unwrap();
    let (reply, took) = transfer.await.unwrap();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", reply.body);
    assert_eq!(reply.code(), "database_unavailable", "COMMIT was never sent: {:?}", reply.body);
    assert!(reply.headers.contains_key("retry-after"));
    assert!(took < promised(), "the transfer answered after {took:?}");
    let after = api.get("/api/pool-stats").await.body["totalCount"].as_i64().unwrap();
    assert_eq!(after, pooled - 1, "the timed-out connection left the pool");

    // Requests that draw a pooled connection still on the frozen network answer in time as well; the
    // coalescer moves on.
    for path in ["/api/increment", "/api/counters/a"] {
        let start = Instant::now();
        let reply = if path == "/api/increment" { api.increment("c").await } else { api.get(path).await };
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {:?}", reply.body);
        assert!(start.elapsed() < promised(), "{path} answered after {:?}", start.elapsed());
    }

    // PostgreSQL ends the stranded session by itself and frees its row locks.
    let alive = format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {backend}");
    let within = Duration::from_millis(IDLE_IN_TRANSACTION_TIMEOUT_MS) + SCHEDULING_SLACK;
    assert_eq!(poll(&admin, &alive, within, |n| n == 0).await, 0, "backend {backend} still runs");
    let locks = format!("SELECT count(*) FROM pg_locks WHERE pid = {backend}");
    assert_eq!(admin.query_one(&locks, &[]).await.unwrap().get::<_, i64>(0), 0);
    let free = "BEGIN; SET LOCAL lock_timeout = '1s'; \
                SELECT value FROM counters WHERE key IN ('a', 'b') FOR UPDATE; COMMIT";
    admin.batch_execute(free).await.expect("both rows are free");
    let values = "SELECT string_agg(key || '=' || value, ',' ORDER BY key) FROM counters";
    assert_eq!(admin.query_one(values, &[]).await.unwrap().get::<_, String>(0), "a=-1,b=1");

    // The network comes back: the node serves again without a restart.
    proxy.thaw();
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.increment("c").await.status != StatusCode::OK {
        assert!(Instant::now() < deadline, "the node does not serve again");
    }
    let replies = join_all((0..50).map(|_| api.increment("c"))).await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK), "{:?}", replies.iter().map(|r| r.status));
    let c = api.get("/api/counters/c").await;
    assert_eq!(c.body["value"], 51, "every acknowledged increment applied once, none of the refused ones");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_outlasts_the_attempt_deadline_is_an_unknown_outcome_08007() {
    commit_outlasting_the_attempt_deadline("transaction").await;
}

/// A coalesced batch is one statement, which commits as it completes: sent, it is as good as a COMMIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalesced_batch_that_outlasts_the_attempt_deadline_is_an_unknown_outcome_08007() {
    commit_outlasting_the_attempt_deadline("coalesce").await;
}

async fn commit_outlasting_the_attempt_deadline(increment_mode: &str) {
    let app = TestApp::spawn(&[
        ("INCREMENT_MODE", increment_mode),
        ("POOL_WAIT_TIMEOUT_MS", "1000"),
        ("DB_ATTEMPT_TIMEOUT_MS", "1000"),
    ]);
    assert_eq!(app.api.increment("k").await.status, StatusCode::OK);
    // A deferred trigger makes COMMIT itself take 4 s: the node has sent it when its deadline passes.
    app.sql(
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN PERFORM pg_sleep(4); RETURN NULL; END $$; \
         CREATE CONSTRAINT TRIGGER slow_commit AFTER UPDATE ON counters \
         DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
    );
    let pooled = app.api.get("/api/pool-stats").await.body["totalCount"].as_i64().unwrap();
    let reply = app.api.increment("k").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", reply.body);
    assert_eq!(reply.code(), "08007", "COMMIT was sent: the outcome is unknown, {:?}", reply.body);
    let after = app.api.get("/api/pool-stats").await.body["totalCount"].as_i64().unwrap();
    assert_eq!(after, pooled - 1, "the connection of the abandoned attempt left the pool");

    // The node cancelled the COMMIT it gave up on (deferred triggers run after statement_timeout is
    // off): here it rolled back, which the client could not know either. 08007 told it to find out, not
    // to assume.
    let admin = connect(&app.pg.admin_url()).await;
    let sleeping = "SELECT count(*) FROM pg_stat_activity \
                    WHERE application_name = 'fleet-app/app-1' AND wait_event = 'PgSleep'";
    assert_eq!(poll(&admin, sleeping, Duration::from_secs(1), |n| n == 0).await, 0, "the COMMIT still runs");
    let value = "SELECT value FROM counters WHERE key = 'k'";
    assert_eq!(admin.query_one(value, &[]).await.unwrap().get::<_, i64>(0), 1, "the cancelled COMMIT undone");
}

/// How many TCP connections to 127.0.0.1:`port` the server side has accepted and holds open.
fn accepted_connections(port: u16) -> usize {
    fleet_tests::loopback_sockets("01").iter().filter(|(local, _)| *local == port).count()
}

/// The counter of the lost-batch test: a coalesced batch is one statement (it commits as it completes),
/// and the only message of its connection that names this key is that statement's.
const LOST_KEY: &str = "lost-batch-key";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalesced_batch_whose_answer_is_lost_answers_every_caller_08007_and_applied_all_or_none() {
    let pg = start_postgres();
    let proxy = Proxy::start(([127, 0, 0, 1], pg.port()).into()).await.unwrap();
    // Default settings: INCREMENT_MODE=coalesce.
    let node = node_behind_with(&pg, &proxy, &[]).await;
    let api = Api::new(node.url());
    let admin = connect(&pg.admin_url()).await;
    assert_eq!(api.increment(LOST_KEY).await.body["value"], 1, "the counter exists");

    // A table lock (SKIP LOCKED skips locked rows, not a locked table) holds the node's next batch, of
    // one increment, while 200 more queue behind it for the batch after.
    admin.batch_execute("BEGIN; LOCK TABLE counters IN EXCLUSIVE MODE").await.unwrap();
    // From now on, the first message that names the key is the first batch's statement (it may wait for
    // the lock in its Parse, before it is sent), and the second is the next batch's: that one reaches
    // PostgreSQL, and then its connection is cut before the answer comes back.
    proxy.cut_after(LOST_KEY.as_bytes(), 2);
    let first = tokio::spawn({
        let api = api.clone();
        async move { api.increment(LOST_KEY).await }
    });
    let waiting = "SELECT count(*) FROM pg_stat_activity \
                   WHERE application_name = 'fleet-app/app-1' AND wait_event_type = 'Lock'";
    assert_eq!(poll(&admin, waiting, Duration::from_secs(30), |n| n > 0).await, 1, "the batch waits");
    let queued: Vec<_> = (0..200)
        .map(|_| {
            let api = api.clone();
            tokio::spawn(async move { api.increment(LOST_KEY).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while accepted_connections(node.port()) < 201 {
        assert!(Instant::now() < deadline, "the node never had the 200 requests' connections");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The first batch commits; the second's is cut. More increments arrive meanwhile, for the batches
    // after it.
    admin.batch_execute("COMMIT").await.unwrap();
    let later = join_all((0..100).map(|_| api.increment(LOST_KEY)));
    let first = first.await.unwrap();
    assert_eq!((first.status, first.body["value"].as_i64()), (StatusCode::OK, Some(2)), "{:?}", first.body);
    let mut replies = later.await;
    for queued in queued {
        replies.push(queued.await.unwrap());
    }
    assert!(proxy.has_cut(), "the second batch's statement was cut");

    // Every caller of the cut batch gets 08007 (not 200, not 500); everyone else 200.
    let lost = |r: &Reply| {
        r.status == StatusCode::SERVICE_UNAVAILABLE
            && r.code() == "08007"
            && r.headers.contains_key("retry-after")
    };
    let others: Vec<&Reply> = replies.iter().filter(|r| r.status != StatusCode::OK && !lost(r)).collect();
    assert!(others.is_empty(), "only 200 or 08007, got {:?}", others.first());
    let unknown = replies.iter().filter(|r| lost(r)).count() as i64;
    assert!(unknown >= 2, "a whole batch shared the lost answer: {unknown} answered 08007");
    let acked = fleet_tests::acknowledged_values(&replies);

    // "May have applied": the batch committed whole or not at all. So the values nobody was answered
    // are either none, or exactly the lost batch's: one run of consecutive values, one per 08007.
    let stored: i64 =
        admin.query_one("SELECT value FROM counters WHERE key = $1", &[&LOST_KEY]).await.unwrap().get(0);
    let missing: Vec<i64> = (3..=stored).filter(|v| !acked.contains(v)).collect();
    let applied = !missing.is_empty();
    eprintln!("{unknown} answered 08007, {} 200; the lost batch applied: {applied}", acked.len());
    if applied {
        assert_eq!(missing.len() as i64, unknown, "the batch's values are the 08007s' and only theirs");
        assert_eq!(missing.last().unwrap() - missing[0] + 1, unknown, "the lost batch's values: {missing:?}");
    }
    assert_eq!(stored, 2 + acked.len() as i64 + if applied { unknown } else { 0 });
    assert!(acked.iter().all(|v| (3..=stored).contains(v)), "a value the counter never reached");

    // The cut connection left the pool; the node serves on.
    let next = api.increment(LOST_KEY).await;
    assert_eq!((next.status, next.body["value"].as_i64()), (StatusCode::OK, Some(stored + 1)));
}

// ---- strangers at the lab and operator endpoints ----

/// The endpoints nginx serves only to the operator's networks, round robin and pinned; the last one
/// spelled with an escape, as a stranger might try.
const OPERATOR_ONLY: [(&str, &str); 9] = [
    ("POST", "/api/hold"),
    ("POST", "/api/test-isolation"),
    ("GET", "/api/pool-stats"),
    ("GET", "/metrics"),
    ("POST", "/app-1/api/hold"),
    ("POST", "/app-1/api/test-isolation"),
    ("GET", "/app-1/api/pool-stats"),
    ("GET", "/app-1/metrics"),
    ("POST", "/api/%68old"),
];

/// A one-node fleet whose nginx admits `networks` (its default when `None`) to those endpoints, and
/// believes the `X-Forwarded-For` of `proxies`.
fn fleet_admitting(networks: Option<&[&str]>, proxies: &[&str]) -> Fleet {
    let mut opts = FleetOptions::new(fleet_tests::node_bin());
    (opts.nodes, opts.port, opts.prometheus, opts.durable) = (1, 0, false, false);
    opts.quiet = !fleet_tests::test_log();
    if let Some(networks) = networks {
        opts.operator_networks = networks.iter().map(|n| n.to_string()).collect();
    }
    opts.trusted_proxies = proxies.iter().map(|n| n.to_string()).collect();
    Fleet::start(opts).expect("start a fleet")
}

/// `method path` through nginx, from a client that says it forwards for `forwarded_for` (if any).
async fn call(api: &Api, method: &str, path: &str, forwarded_for: Option<&str>) -> Reply {
    let headers: Vec<(&str, &str)> = forwarded_for.map(|f| ("x-forwarded-for", f)).into_iter().collect();
    match method {
        "GET" => api.get_with(path, &headers).await,
        _ => api.post_with(path, &json!({ "ms": 1, "level": "SERIALIZABLE" }), &headers).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_and_operator_endpoints_answer_403_through_nginx_outside_the_operators_networks() {
    // Loopback is not among this fleet's operator networks: the test's client is a stranger.
    let fleet = fleet_admitting(Some(&["10.0.0.0/8", "fc00::/7"]), &[]);
    let api = Api::new(fleet.url());
    for (method, path) in OPERATOR_ONLY {
        let reply = call(&api, method, path, None).await;
        assert_eq!((reply.status, reply.code()), (StatusCode::FORBIDDEN, "forbidden"), "{method} {path}");
        assert_eq!(reply.body["container"], "nginx", "{method} {path}");
        assert_eq!(reply.headers["x-container-id"], "nginx", "{method} {path}");
        // No proxy is trusted (the default): a stranger's forged X-Forwarded-For changes nothing.
        let forged = call(&api, method, path, Some("10.0.0.1")).await;
        assert_eq!(forged.status, StatusCode::FORBIDDEN, "{method} {path} with a forged X-Forwarded-For");
    }
    // Everything else is served as before.
    assert_eq!(api.increment("k").await.status, StatusCode::OK);
    assert_eq!(api.get("/app-1/api/counters/k").await.status, StatusCode::OK);
    assert_eq!(api.get("/health").await.status, StatusCode::OK);
    fleet.stop().unwrap();

    // By default the operator's networks are loopback and the private ranges: the test's client is in.
    let fleet = fleet_admitting(None, &[]);
    let api = Api::new(fleet.url());
    for (method, path) in OPERATOR_ONLY {
        assert_eq!(call(&api, method, path, None).await.status, StatusCode::OK, "{method} {path}");
    }
    fleet.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_client_it_forwards_for_is_the_one_judged() {
    // The test plays a load balancer on loopback, trusted; the operator's network is 10.0.0.0/8 only.
    let fleet = fleet_admitting(Some(&["10.0.0.0/8"]), &["127.0.0.1"]);
    let api = Api::new(fleet.url());
    for (method, path) in OPERATOR_ONLY {
        let stranger = call(&api, method, path, Some("203.0.113.7")).await;
        assert_eq!(
            (stranger.status, stranger.code()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{method} {path}"
        );
        // What a client wrote before the balancer's own entry is the client's to forge: the last
        // address not a trusted proxy's counts.
        let forged = call(&api, method, path, Some("10.0.0.1, 203.0.113.7")).await;
        assert_eq!(forged.status, StatusCode::FORBIDDEN, "{method} {path}, forged behind the balancer");
        let operator = call(&api, method, path, Some("10.0.0.1")).await;
        assert_eq!(operator.status, StatusCode::OK, "{method} {path} for an operator: {:?}", operator.body);
    }
    // The balancer itself, without the header, is no operator.
    assert_eq!(call(&api, "GET", "/metrics", None).await.status, StatusCode::FORBIDDEN);
    fleet.stop().unwrap();
}
