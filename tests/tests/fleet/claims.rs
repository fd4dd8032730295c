//! The basic promises, proved through nginx on a real 4-node fleet with Prometheus.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fleet_tests::{
    fleetctl, fleetctl_up, http_worker_threads, node_options, start_fleet, start_postgres, Api,
};
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_proves_the_seeds_claims_through_nginx() {
    // Default settings: 250 requests per node queue for 5 connections, and some may be shed (503).
    let mut fleet = start_fleet(4, 5, &[]);
    let api = Api::new(fleet.url());
    // Four nodes share the machine: each gets its share of the cores as HTTP workers.
    let share = (std::thread::available_parallelism().unwrap().get() / 4).max(1);
    for node in fleet.nodes() {
        assert_eq!(http_worker_threads(node.pid()), share, "{}'s HTTP workers", node.container_id());
    }

    // 1000 concurrent increments spread over the four pinned routes: every 200 a value of its own, and
    // the counter exactly the acknowledged ones (plus at most those whose outcome is unknown, 08007).
    let replies = join_all((0..1000).map(|i| {
        let node = Api::new(format!("{}/app-{}", fleet.url(), i % 4 + 1));
        async move { node.increment("shared").await }
    }))
    .await;
    let shed = |r: &fleet_tests::Reply| {
        r.status == StatusCode::SERVICE_UNAVAILABLE && r.headers.contains_key("retry-after")
    };
    let refused: Vec<_> = replies.iter().filter(|r| r.status != StatusCode::OK && !shed(r)).collect();
    assert!(refused.is_empty(), "only 200 or 503 with Retry-After, got {:?}", refused.first());
    let values = fleet_tests::acknowledged_values(&replies);
    let unknown = replies.iter().filter(|r| r.code() == "08007").count() as i64;
    let stored = api.get("/api/counters/shared").await.body["value"].as_i64().unwrap();
    let acked = values.len() as i64;
    assert!(
        (acked..=acked + unknown).contains(&stored),
        "{acked} acknowledged, {unknown} unknown, {stored} stored"
    );
    if unknown == 0 {
        assert_eq!(values, (1..=stored).collect::<BTreeSet<_>>(), "each value once");
    }
    let containers: BTreeSet<&str> = replies.iter().filter_map(|r| r.body["container"].as_str()).collect();
    assert_eq!(containers, ["app-1", "app-2", "app-3", "app-4"].into(), "each pinned route reached its node");

    // Round robin on /api/*: consecutive requests reach every node.
    let mut seen = BTreeSet::new();
    for _ in 0..8 {
        seen.insert(api.get("/api/pool-stats").await.body["container"].as_str().unwrap().to_owned());
    }
    assert_eq!(seen.len(), 4, "round robin reached {seen:?}");

    // Prometheus scrapes every node directly: up == 1 and request samples for each.
    let prometheus = Api::new(fleet.prometheus_url().expect("Prometheus runs"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let containers_of = |result: &Value| -> BTreeSet<String> {
        let series = result["data"]["result"].as_array().cloned().unwrap_or_default();
        series.iter().filter_map(|s| s["metric"]["container"].as_str().map(str::to_owned)).collect()
    };
    loop {
        let up = prometheus.get("/api/v1/query?query=up%7Bjob%3D%22fleet-app%22%7D%20%3D%3D%201").await.body;
        let requests = prometheus.get("/api/v1/query?query=fleet_http_requests_total").await.body;
        // And PostgreSQL, through its exporter.
        let pg_up =
            prometheus.get("/api/v1/query?query=pg_up%7Bjob%3D%22postgres%22%7D%20%3D%3D%201").await.body;
        let pg_seen = pg_up["data"]["result"].as_array().is_some_and(|series| series.len() == 1);
        if containers_of(&up).len() == 4 && containers_of(&requests).len() == 4 && pg_seen {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw all four nodes and PostgreSQL up: {up} / {requests} / {pg_up}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // nginx rate-limits the lab endpoints per client: a burst of 60 holds gets its own 429s (from
    // "container" nginx, in the API's error shape: no node saw them) beyond the burst it allows, while
    // other routes are not limited.
    let holds = join_all((0..60).map(|_| api.hold(1))).await;
    let by_nginx = holds.iter().filter(|r| {
        r.status == StatusCode::TOO_MANY_REQUESTS
            && r.headers["x-container-id"] == "nginx"
            && r.code() == "lab_busy"
    });
    assert!(
        by_nginx.count() > 0,
        "nginx limited the burst: {:?}",
        holds.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert!(holds.iter().any(|r| r.status == StatusCode::OK), "the first of the burst went through");
    let ordinary = join_all((0..60).map(|_| api.get("/api/pool-stats"))).await;
    assert!(ordinary.iter().all(|r| r.status == StatusCode::OK), "ordinary routes are not rate-limited");

    // One node killed: /api/* keeps answering from the others.
    fleet.node(3).child().kill().unwrap();
    let replies = join_all((0..100).map(|_| api.increment("after-kill"))).await;
    let failures: Vec<_> = replies.iter().filter(|r| r.status != StatusCode::OK).collect();
    assert!(
        failures.is_empty(),
        "{} of 100 failed after a node died, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(replies.iter().all(|r| r.body["container"] != "app-3"));
    fleet.stop().expect("the fleet stops cleanly");
}

/// The 40P01 retries counted by every node of a 4-node fleet.
async fn deadlock_retries(fleet_url: &str) -> f64 {
    let mut total = 0.0;
    for n in 1..=4 {
        let node = Api::new(format!("{fleet_url}/app-{n}"));
        total += node.metric(r#"fleet_db_transaction_retries_total{sqlstate="40P01"}"#).await;
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_opposite_transfers_200_at_once_all_succeed_through_nginx_and_pinned_to_one_node() {
    // The default fleet: 4 nodes × pool 5, every node at its default settings (LOCK_ORDER=request).
    let fleet = start_fleet(4, 5, &[]);
    let value = |api: Api, key: &'static str| async move {
        api.get(&format!("/api/counters/{key}")).await.body["value"].as_i64().unwrap()
    };

    // Round robin: opposite transfers meet across nodes.
    let api = Api::new(fleet.url());
    let sent = fleet_tests::opposite_transfers(std::slice::from_ref(&api), "x", "y", 1000, 200).await;
    let values = (value(api.clone(), "x").await, value(api.clone(), "y").await);
    fleet_tests::assert_transfers_applied_exactly_once(&sent, values);
    let across_nodes = deadlock_retries(&fleet.url()).await;
    assert!(across_nodes > 0.0, "opposite transfers across nodes deadlocked and were retried");
    let containers: BTreeSet<&str> = sent.iter().filter_map(|s| s.reply.body["container"].as_str()).collect();
    assert_eq!(containers.len(), 4, "round robin reached every node: {containers:?}");

    // Pinned: all 1000 through app-2, which meets itself in PostgreSQL.
    let app2 = Api::new(format!("{}/app-2", fleet.url()));
    let before = app2.metric(r#"fleet_db_transaction_retries_total{sqlstate="40P01"}"#).await;
    let sent = fleet_tests::opposite_transfers(std::slice::from_ref(&app2), "p", "q", 1000, 200).await;
    let values = (value(app2.clone(), "p").await, value(app2.clone(), "q").await);
    fleet_tests::assert_transfers_applied_exactly_once(&sent, values);
    assert!(sent.iter().all(|s| s.reply.body["container"] == "app-2"));
    let on_one_node = app2.metric(r#"fleet_db_transaction_retries_total{sqlstate="40P01"}"#).await - before;
    assert!(
        on_one_node > 0.0,
        "one node's opposite transfers met in PostgreSQL, deadlocked and were retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_answers_its_own_errors_as_json_in_the_apis_shape() {
    let mut fleet = start_fleet(2, 2, &[]);
    let expect_json_error = |reply: &fleet_tests::Reply, status: StatusCode, code: &str| {
        assert_eq!(reply.status, status, "{:?}", reply.body);
        assert_eq!(reply.headers["content-type"], "application/json", "{:?}", reply.headers);
        assert_eq!(reply.headers["x-container-id"], "nginx");
        assert_eq!(reply.body["success"], false, "{:?}", reply.body);
        assert_eq!(reply.code(), code, "{:?}", reply.body);
        assert_eq!(reply.body["container"], "nginx");
        assert!(!reply.body["error"].as_str().unwrap_or_default().is_empty(), "{:?}", reply.body);
    };
    // Two bytes over nginx's client_max_body_size (16 MiB), on both kinds of route.
    let oversized = || format!("{{\"data\": [\"{}\"]}}", "x".repeat(16 * 1024 * 1024 - 11));
    for path in ["/api/bulk-insert", "/app-1/api/bulk-insert"] {
        let reply = Api::new(fleet.url()).post_raw(path, oversized()).await;
        expect_json_error(&reply, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    }
    let rows = Api::new(fleet.url()).get("/api/stats").await.body["database"]["total_records"].clone();
    assert_eq!(rows, 0, "a refused body inserted nothing");

    // A dead node pinned through /app-2/: nginx cannot reach it.
    fleet.kill_node(2).unwrap();
    let pinned = Api::new(format!("{}/app-2", fleet.url()));
    for _ in 0..20 {
        let reply = pinned.increment("k").await;
        expect_json_error(&reply, StatusCode::BAD_GATEWAY, "node_unavailable");
    }
    // A node's own errors pass through as they are.
    let reply = Api::new(fleet.url()).get("/api/counters/absent").await;
    assert_eq!((reply.status, reply.body["container"].as_str()), (StatusCode::NOT_FOUND, Some("app-1")));
    assert_eq!(Api::new(fleet.url()).get("/api/counters/k").await.status, StatusCode::NOT_FOUND);
    fleet.stop().unwrap();
}

/// How long the test holds a row lock.
const HOLD: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_held_for_5_s_does_not_slow_other_keys_on_its_own_node_or_the_others() {
    let fleet = start_fleet(4, 5, &[]);
    let nodes: Vec<Api> = (1..=4).map(|n| Api::new(format!("{}/app-{n}", fleet.url()))).collect();
    // 200 increments of 20 other keys, spread over the four nodes, each timed from its own start.
    let others = || {
        join_all((0..200).map(|i| {
            let node = &nodes[i % 4];
            async move {
                let start = Instant::now();
                let reply = node.increment(&format!("free-{}", i % 20)).await;
                (reply, start.elapsed())
            }
        }))
    };
    // Once before the hold: the keys exist, and the clients' connections to nginx are open.
    others().await;
    assert_eq!(nodes[0].increment("held").await.status, StatusCode::OK);

    let (mut client, connection) =
        tokio_postgres::connect(&fleet.database_url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let holder = client.transaction().await.unwrap();
    holder.execute("SELECT value FROM counters WHERE key = 'held' FOR UPDATE", &[]).await.unwrap();
    let held_since = Instant::now();

    // Ten increments of the held key, all on app-1, wait for the lock; meanwhile the other keys go
    // through on every node, app-1 included.
    let blocked: Vec<_> = (0..10)
        .map(|_| {
            let node = nodes[0].clone();
            tokio::spawn(async move { (node.increment("held").await, Instant::now()) })
        })
        .collect();
    let (watcher, connection) =
        tokio_postgres::connect(&fleet.database_url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let waiting = "SELECT count(*) FROM pg_stat_activity \
                   WHERE application_name = 'fleet-app/app-1' AND wait_event_type = 'Lock'";
    while watcher.query_one(waiting, &[]).await.unwrap().get::<_, i64>(0) == 0 {
        assert!(held_since.elapsed() < HOLD, "app-1 never waited for the held row");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let others = others().await;
    let hold_so_far = held_since.elapsed();
    assert!(
        others.iter().all(|(r, _)| r.status == StatusCode::OK),
        "{:?}",
        others.iter().find(|(r, _)| r.status != StatusCode::OK)
    );
    assert!(blocked.iter().all(|b| !b.is_finished()), "the held key's increments must wait for the lock");
    assert!(hold_so_far < HOLD, "the other keys took {hold_so_far:?}, the whole hold");
    // The relation that matters: the lock holds the held key for the whole HOLD, and costs the other
    // keys on the same node nothing comparable. Each took a small fraction of the hold.
    let slowest = |node: &str| {
        let on_node = others.iter().filter(|(r, _)| r.body["container"] == node);
        on_node.map(|(_, took)| *took).max().unwrap()
    };
    for node in ["app-1", "app-2", "app-3", "app-4"] {
        let took = slowest(node);
        eprintln!("slowest other key on {node} while the row was held: {took:?}");
        assert!(took < HOLD / 5, "an increment of a free key on {node} took {took:?} of a {HOLD:?} hold");
    }

    tokio::time::sleep(HOLD.saturating_sub(held_since.elapsed())).await;
    holder.commit().await.unwrap();
    let committed_at = Instant::now();
    let mut values = BTreeSet::new();
    for blocked in blocked {
        let (reply, finished_at) = blocked.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        values.insert(reply.body["value"].as_i64().unwrap());
        assert!(
            finished_at >= committed_at,
            "a held key's increment finished only after the lock was released"
        );
    }
    assert_eq!(values, (2..=11).collect::<BTreeSet<_>>(), "the held key's increments, each value once");
}

/// Sends 200 concurrent 10 ms holds to `api` and returns how long they took, checking they all succeeded.
async fn two_hundred_holds(api: &Api) -> Duration {
    let start = Instant::now();
    let replies = join_all((0..200).map(|_| api.hold(10))).await;
    let elapsed = start.elapsed();
    assert!(
        replies.iter().all(|r| r.status == StatusCode::OK),
        "{:?}",
        replies.iter().find(|r| r.status != StatusCode::OK)
    );
    elapsed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_follows_pool_size() {
    let pg = start_postgres();
    // The experiment measures queueing for connections, so requests may wait as long as it takes, and
    // all 200 holds may queue in the pool (beyond the lab's default share of POOL_SIZE − 1).
    let env = [("POOL_WAIT_TIMEOUT_MS", "60000"), ("LAB_MAX_CONNECTIONS", "200")];
    let mut nodes = Vec::new();
    for pool in [1, 5, 10, 20] {
        let mut opts = node_options(&pg, &format!("pool-{pool}"), &env);
        opts.pool_size = pool;
        nodes.push(fleet_local::Node::spawn(opts).unwrap());
    }
    let apis: Vec<Api> = nodes.iter().map(|n| Api::new(n.url())).collect();
    // Warm every pool so connection set-up is not measured.
    for api in &apis {
        two_hundred_holds(api).await;
    }

    // While pool 1 is saturated, /api/pool-stats shows requests waiting.
    let saturated = tokio::spawn({
        let api = apis[0].clone();
        async move { two_hundred_holds(&api).await }
    });
    let mut max_waiting = 0;
    while !saturated.is_finished() {
        max_waiting =
            max_waiting.max(apis[0].get("/api/pool-stats").await.body["waitingCount"].as_u64().unwrap());
    }
    saturated.await.unwrap();
    assert!(max_waiting > 0, "pool-stats never showed a waiting request while pool 1 was saturated");

    // Best of three per pool size: the least disturbed run on a shared machine.
    let mut took = Vec::new();
    for api in &apis {
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            best = best.min(two_hundred_holds(api).await.as_secs_f64());
        }
        took.push(best);
    }
    let [p1, p5, p10, p20] = took[..] else { unreachable!() };
    eprintln!(
        "200 × 10 ms holds: pool 1 {p1:.3} s, pool 5 {p5:.3} s, pool 10 {p10:.3} s, pool 20 {p20:.3} s"
    );
    assert!(p5 < 0.3 * p1, "pool 5 took {p5:.3} s, pool 1 {p1:.3} s");
    // Each bound is the ideal ratio (0.2, 0.5, 0.5) with room for a busy machine's overhead.
    assert!(p10 < 0.75 * p5, "pool 10 took {p10:.3} s, pool 5 {p5:.3} s");
    assert!(p20 < p10, "pool 20 took {p20:.3} s, pool 10 {p10:.3} s");
}

#[test]
fn fleetctl_up_prints_its_addresses_survives_a_crashed_node_and_down_leaves_nothing_behind() {
    use std::os::unix::fs::MetadataExt;

    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("fleet");
    let (mut up, url) = fleetctl_up(&dir, &["--nodes", "2", "--no-prometheus"]);
    let database = up.wait_for_line("database: postgres://", Duration::from_secs(1)).unwrap();
    assert!(database.contains("postgres://appuser@127.0.0.1:"), "{database}");

    // Quiet: one line per component and the summary, no child's log line, no colour code, no secret.
    let output = up.recent_output();
    let labels =
        ["starting ", "postgres: ", "app-1: ", "app-2: ", "nginx: ", "logs: ", "control: ", "database: "];
    for line in output.lines().take_while(|line| !line.starts_with("fleet ready: ")) {
        assert!(labels.iter().any(|label| line.starts_with(label)), "unexpected line {line:?} in:\n{output}");
    }
    assert!(!output.contains('\x1b'), "{output}");
    let pgpass = std::fs::read_to_string(dir.join("postgres/pgpass")).unwrap();
    let passwords: Vec<&str> = pgpass.lines().map(|line| line.rsplit(':').next().unwrap()).collect();
    assert_eq!(passwords.len(), 3, "the superuser's, the app's, the exporter's: {pgpass}");
    for password in &passwords {
        assert!(password.len() >= 32 && !output.contains(password), "a password was printed:\n{output}");
    }
    assert!(database.contains(&dir.join("postgres/pgpass").display().to_string()), "{database}");
    // Nothing in the fleet directory is open to others; as root, they may enter it (the services'
    // users must), but not list it.
    for path in
        [dir.clone(), dir.join("postgres/pgpass"), dir.join("control.sock"), dir.join("logs/app-1.log")]
    {
        let mode = std::fs::metadata(&path).unwrap().mode();
        let entered = if path == dir && nix::unistd::geteuid().is_root() { 0o001 } else { 0 };
        assert_eq!(mode & 0o007, entered, "{} is mode {:o}", path.display(), mode & 0o777);
    }

    let status: Value = serde_json::from_str(&fleetctl(&dir, &["status", "--json"])).unwrap();
    assert_eq!(status["url"], url.as_str());
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    assert!(
        nodes.iter().all(|n| n["health"]["status"] == "healthy" && n["pool"]["maxSize"] == 5),
        "{status}"
    );
    let table = fleetctl(&dir, &["status"]);
    assert!(table.contains("app-1") && table.contains("healthy"), "{table}");

    // The children's output is in their logs, plain text, without the migration NOTICE.
    let node_log = fleetctl(&dir, &["logs", "app-1"]);
    assert!(node_log.contains("listening on http://127.0.0.1:"), "{node_log}");
    assert!(!node_log.contains('\x1b') && !node_log.contains("NOTICE"), "{node_log}");
    let all = fleetctl(&dir, &["logs"]);
    for prefix in ["[postgres] ", "[app-1] ", "[app-2] "] {
        assert!(all.contains(prefix), "no {prefix:?} line in:\n{all}");
    }

    // A crashed node does not stop the fleet, and does not stop `down` from cleaning up.
    let pids: Vec<i32> = nodes.iter().map(|n| n["pid"].as_i64().unwrap() as i32).collect();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[1]), nix::sys::signal::Signal::SIGKILL).unwrap();
    up.wait_for_line("app-2 has exited", Duration::from_secs(10)).unwrap();

    fleetctl(&dir, &["down"]);
    assert!(!up.is_running(), "fleetctl up exited after down");
    for pid in pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "node PID {pid} is gone");
    }
    let mut left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    left.sort();
    assert_eq!(left, ["logs", "postgres"], "fleetctl left more than its logs and its database");
}
