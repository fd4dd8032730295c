//! The compose stack for real, on this machine's Docker engine: the images the repository's Dockerfiles
//! build, started by docker-compose.yml from empty volumes, and used only through what it publishes
//! (nginx, Prometheus on loopback). The basic promises at a user's load, what an operator does to a
//! running stack (stop, kill, restart, scale, down), and the `ha` profile surviving its leader's death.
//! Without a Docker engine these tests fail under CI and say they did not run elsewhere.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fleet_tests::compose::{build_images, docker, engine_or_skip, one_at_a_time, whole, Stack};
use fleet_tests::load::{acknowledged, failures, summary, Load};
use fleet_tests::{
    acknowledged_values, assert_transfers_applied_exactly_once, isolation, opposite_transfers, Api,
};
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The default profile's services a test starts: everything but the opt-in profiles.
const DEFAULT_SERVICES: [&str; 8] =
    ["postgres", "app-1", "app-2", "app-3", "app-4", "nginx", "postgres-exporter", "prometheus"];

#[test]
fn compose_needs_only_the_default_profiles_secrets_and_names_a_missing_one() {
    if !engine_or_skip("compose config") {
        return;
    }
    // The two secrets of the default profile are enough, for the default profile and for `ha` (whose own
    // secrets its containers check when they start).
    let stack = Stack::new("config")
        .without_secret("REPLICATION_PASSWORD")
        .without_secret("PATRONI_API_PASSWORD")
        .without_secret("ETCD_ROOT_PASSWORD")
        .without_secret("GRAFANA_ADMIN_PASSWORD");
    stack.run(&["config", "-q"]);
    stack.run(&["--profile", "ha", "--profile", "dashboards", "config", "-q"]);
    // Either of them missing: refused, naming it.
    for secret in ["POSTGRES_SUPERUSER_PASSWORD", "APP_DB_PASSWORD"] {
        let out = Stack::new("config").without_secret(secret).compose(&["config", "-q"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(&format!("set {secret}")), "{secret}: {stderr}");
    }
}

#[test]
fn a_profiles_container_refuses_to_start_without_its_secret_and_names_it() {
    if !engine_or_skip("ha secrets") {
        return;
    }
    build_images();
    // A Patroni member started without the replication password exits at once, naming the variable.
    let out = std::process::Command::new("docker")
        .args(["run", "--rm", "-e", "PATRONI_SUPERUSER_PASSWORD=x", "-e", "APP_DB_PASSWORD=x"])
        .args(["-e", "PATRONI_RESTAPI_PASSWORD=x", "pgfleet/patroni:latest"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("set REPLICATION_PASSWORD"), "{stderr}");
    // And etcd without its root user's password.
    let out =
        std::process::Command::new("docker").args(["run", "--rm", "pgfleet/etcd:latest"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("set ETCD_ROOT_PASSWORD"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_stack_comes_up_from_empty_volumes_and_keeps_its_promises_through_nginx() {
    if !engine_or_skip("default stack") {
        return;
    }
    let _one = one_at_a_time().await;
    tokio::task::block_in_place(build_images);
    let stack = Stack::new("default");
    let took = tokio::task::block_in_place(|| stack.up(&[], &DEFAULT_SERVICES));
    eprintln!("default profile: up to healthy in {:.1} s from empty volumes", took.as_secs_f64());
    let api = Api::new(stack.url());

    // 1000 concurrent increments over the four pinned routes and round robin: every one succeeds, and
    // the values handed out are exactly 1..=1000.
    let replies = join_all((0..1000).map(|i| {
        let route = if i % 5 == 4 { String::new() } else { format!("/app-{}", i % 5 + 1) };
        let api = Api::new(format!("{}{route}", stack.url()));
        async move { api.increment("compose-shared").await }
    }))
    .await;
    let failed: Vec<_> = replies.iter().filter(|r| r.status != StatusCode::OK).collect();
    assert!(failed.is_empty(), "{} of 1000 increments failed, first: {:?}", failed.len(), failed.first());
    assert_eq!(acknowledged_values(&replies), (1..=1000).collect::<BTreeSet<i64>>());
    let containers: BTreeSet<&str> = replies.iter().filter_map(|r| r.body["container"].as_str()).collect();
    assert_eq!(containers, ["app-1", "app-2", "app-3", "app-4"].into());

    // Hundreds of opposite transfers at once: all succeed, deadlocks were met (40P01) and retried.
    let nodes: Vec<Api> = (1..=4).map(|n| Api::new(format!("{}/app-{n}", stack.url()))).collect();
    let sent = opposite_transfers(&nodes, "compose-a", "compose-b", 400, 200).await;
    let value = |key: &'static str| {
        let api = api.clone();
        async move { api.get(&format!("/api/counters/{key}")).await.body["value"].as_i64().unwrap() }
    };
    assert_transfers_applied_exactly_once(&sent, (value("compose-a").await, value("compose-b").await));
    let mut deadlocks = 0.0;
    for node in &nodes {
        deadlocks += node.metric(r#"fleet_db_transaction_retries_total{sqlstate="40P01"}"#).await;
    }
    assert!(deadlocks > 0.0, "no deadlock was met and retried by any node");

    // A 100,000-row bulk insert (the default BULK_MAX_ROWS) through nginx: every row, in order.
    let rows: Vec<String> = (0..100_000).map(|i| format!("row-{i}")).collect();
    let bulk = api.bulk_insert(&rows).await;
    assert_eq!(bulk.status, StatusCode::OK, "{:?}", bulk.body);
    let ids = bulk.body["ids"].as_array().unwrap();
    assert_eq!((ids.len(), bulk.body["count"].clone()), (100_000, json!(100_000)));
    assert!(ids.windows(2).all(|w| w[0].as_i64() < w[1].as_i64()), "ids in input order");

    // The isolation lab reports PostgreSQL's documented table.
    let lab = api.post("/api/test-isolation", &json!({})).await;
    assert_eq!(lab.status, StatusCode::OK, "{:?}", lab.body);
    assert_eq!(isolation::matrix(&lab.body), isolation::documented());

    // Prometheus scrapes every node, the exporter and itself, all up; the exporter reports PostgreSQL.
    let prometheus = Api::new(stack.prometheus_url());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let targets = prometheus.get("/api/v1/targets?state=active").await.body;
        let up = targets_up(&targets);
        let pg_up = prometheus.get("/api/v1/query?query=pg_up%20%3D%3D%201").await.body;
        let pg_seen = pg_up["data"]["result"].as_array().is_some_and(|r| r.len() == 1);
        let expected = ["fleet-app app-1", "fleet-app app-2", "fleet-app app-3", "fleet-app app-4"];
        let expected: BTreeSet<String> =
            expected.iter().map(|s| s.to_string()).chain(["postgres".into(), "prometheus".into()]).collect();
        if up == (expected.clone(), 0) && pg_seen {
            break;
        }
        assert!(Instant::now() < deadline, "targets up (and down): {up:?}, pg_up {pg_up}; want {expected:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // `down` keeps the data, `down -v` removes every container, network and volume of the project.
    tokio::task::block_in_place(|| {
        stack.run(&["down", "-t", "30"]);
        stack.up(&[], &DEFAULT_SERVICES);
    });
    assert_eq!(value("compose-shared").await, 1000, "the counter survived down and up");
    tokio::task::block_in_place(|| stack.down()).unwrap();
    assert_eq!(stack.leftovers(), Vec::<String>::new(), "down -v left these behind");
}

/// Prometheus's active targets: those up, as `job container` (or `job member`, or `job`), and how
/// many are not up.
fn targets_up(targets: &Value) -> (BTreeSet<String>, usize) {
    let active = targets["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
    let name = |t: &Value| {
        let labels = &t["labels"];
        let job = labels["job"].as_str().unwrap_or_default();
        match labels["container"].as_str().or(labels["member"].as_str()) {
            Some(who) => format!("{job} {who}"),
            None => job.to_owned(),
        }
    };
    let up = active.iter().filter(|t| t["health"] == "up").map(name).collect();
    (up, active.iter().filter(|t| t["health"] != "up").count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_stops_kills_restarts_and_scales_and_clients_see_what_they_were_promised() {
    if !engine_or_skip("operations") {
        return;
    }
    let _one = one_at_a_time().await;
    tokio::task::block_in_place(build_images);
    let stack = Stack::new("ops");
    tokio::task::block_in_place(|| stack.up(&[], &DEFAULT_SERVICES));
    let api = Api::new(stack.url());

    // `docker compose stop app-2` drains it: a plain client (no retries) sees no failure, before,
    // during or after.
    let load = Load::start(&api, "stop", false).await;
    let before = load.answered();
    tokio::task::block_in_place(|| stack.run(&["stop", "app-2"]));
    let during = load.answered() - before;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (writes, reads) = load.stop().await;
    assert!(during > 0, "the load ran while app-2 stopped");
    let all: Vec<_> = writes.values().flatten().chain(&reads).cloned().collect();
    assert_eq!(failures(&all), Default::default(), "of {} requests while app-2 stopped", all.len());
    tokio::task::block_in_place(|| {
        stack.run(&["start", "app-2"]);
        stack.wait_healthy(Duration::from_secs(120)).unwrap();
    });

    // `docker kill` of a node, and then a restart of the database, under a careful client (idempotency
    // keys, retried until 200): nothing lost, nothing applied twice.
    let kill_app_3: [&[&str]; 2] = [&["kill"], &["start", "app-3"]];
    let restart_postgres: [&[&str]; 2] = [&["restart", "-t", "30", "postgres"], &[]];
    for (fault, [break_it, recover]) in [("kill app-3", kill_app_3), ("restart postgres", restart_postgres)] {
        let load = Load::start(&api, &fault.replace(' ', "-"), true).await;
        let before = load.answered();
        tokio::task::block_in_place(|| {
            match break_it {
                ["kill"] => drop(docker(&["kill", &stack.container("app-3")])),
                compose => drop(stack.run(compose)),
            }
            if !recover.is_empty() {
                stack.run(recover);
            }
            stack.wait_healthy(Duration::from_secs(120)).unwrap();
        });
        // The load outlasts the fault: it ran until the stack was whole again, and goes on 2 s more.
        let during = load.answered() - before;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let seen = load.stop().await;
        assert!(during > 0, "{fault}: the load ran during the fault");
        for (key, acked) in acknowledged(&seen.0) {
            let stored = api.get(&format!("/api/counters/{key}")).await.body["value"].as_i64().unwrap_or(0);
            assert_eq!(stored, acked, "{fault}: {key} holds one increment per acknowledged key");
        }
        eprintln!("{fault}, careful client: {}", summary(&seen));
    }

    // A second app-4: nginx and Prometheus find it by name, with no restart. Shown by stopping the first:
    // the pinned route /app-4 still answers, from the new container.
    tokio::task::block_in_place(|| {
        stack.run(&["up", "-d", "--no-build", "--no-deps", "--scale", "app-4=2", "app-4"])
    });
    tokio::task::block_in_place(|| stack.wait_healthy(Duration::from_secs(120))).unwrap();
    let app4 = stack.containers_of("app-4");
    assert_eq!(app4.len(), 2, "{app4:?}");
    let pinned = Api::new(format!("{}/app-4", stack.url()));
    let prometheus = Api::new(stack.prometheus_url());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (up, _) = targets_up(&prometheus.get("/api/v1/targets?state=active").await.body);
        let query =
            prometheus.get("/api/v1/query?query=count(up%7Bcontainer%3D%22app-4%22%7D%20%3D%3D%201)").await;
        let scraped = query.body["data"]["result"][0]["value"][1] == "2";
        if scraped {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus never scraped both app-4s: {up:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // nginx reloads within its 2 s check once the new address resolves.
    tokio::time::sleep(Duration::from_secs(5)).await;
    tokio::task::block_in_place(|| docker(&["stop", "-t", "40", &app4[0]]));
    let replies = join_all((0..50).map(|_| pinned.get("/api/pool-stats"))).await;
    let failed: Vec<_> = replies.iter().filter(|r| r.status != StatusCode::OK).collect();
    assert!(
        failed.is_empty(),
        "/app-4 with the first app-4 stopped: {} failed, first {:?}",
        failed.len(),
        failed.first()
    );
}

/// `etcdctl get --prefix /` in etcd's container, without credentials, is refused.
fn etcd_refuses_whoever_has_no_credentials(stack: &Stack) {
    let get = std::process::Command::new("docker")
        .args(["exec", &stack.container("etcd"), "etcdctl", "get", "--prefix", "/"])
        .output()
        .unwrap();
    let refusal = String::from_utf8_lossy(&get.stderr);
    assert!(!get.status.success() && refusal.contains("user name is empty"), "etcdctl get: {refusal}");
    assert!(get.stdout.is_empty(), "etcdctl get without credentials printed keys");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_answers_only_its_root_user_from_its_first_start_and_after_a_restart() {
    if !engine_or_skip("etcd authentication") {
        return;
    }
    let _one = one_at_a_time().await;
    tokio::task::block_in_place(|| {
        build_images();
        let stack = Stack::new("etcd");
        stack.up(&["ha"], &["etcd"]);
        for start in ["first start", "restart"] {
            etcd_refuses_whoever_has_no_credentials(&stack);
            // As root with the secret, which etcdctl takes from the environment (not the command line).
            let put = r#"ETCDCTL_USER="root:$ROOT_PASSWORD" exec etcdctl put /pgfleet-test "$0""#;
            let put = docker(&["exec", &stack.container("etcd"), "sh", "-c", put, start]);
            assert_eq!(put.trim(), "OK", "{start}: root writes");
            if start == "first start" {
                stack.run(&["--profile", "ha", "restart", "-t", "10", "etcd"]);
                stack.wait_healthy(Duration::from_secs(60)).unwrap();
            }
        }
        stack.down().unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ha_profile_bootstraps_three_members_and_survives_its_leaders_death_under_a_careful_client() {
    if !engine_or_skip("ha profile") {
        return;
    }
    let _one = one_at_a_time().await;
    tokio::task::block_in_place(build_images);
    let stack = Stack::new("ha");
    let took = tokio::task::block_in_place(|| stack.up(&["ha"], &["ha-nginx", "prometheus"]));
    eprintln!("ha profile: up to healthy in {:.1} s from empty volumes", took.as_secs_f64());

    // One leader and a synchronous standby, every member running or streaming.
    let members = tokio::task::block_in_place(|| stack.wait_whole(Duration::from_secs(120))).unwrap();
    let leader = members.iter().find(|m| m.role == "leader").unwrap().name.clone();
    eprintln!("ha profile: {members:?}");

    // etcd answers only its user root, whose password Patroni has: a stranger on the back network (here
    // a member's container, without credentials) can neither read Patroni's keys nor delete its leader
    // key, through etcd's HTTP gateway or with etcdctl in etcd's own container.
    let (everything, leader_key) =
        (r#"{"key": "Lw==", "range_end": "MA=="}"#, r#"{"key": "L3NlcnZpY2UvcGdmbGVldC9sZWFkZXI="}"#);
    for (call, body) in [("range", everything), ("deleterange", leader_key)] {
        let url = format!("http://etcd:2379/v3/kv/{call}");
        let answer = tokio::task::block_in_place(|| {
            docker(&["exec", &stack.container("pg-1"), "curl", "-sS", "--max-time", "3", "-d", body, &url])
        });
        assert!(answer.contains("user name is empty"), "{call} without credentials: {answer}");
    }
    tokio::task::block_in_place(|| etcd_refuses_whoever_has_no_credentials(&stack));
    assert!(whole(&tokio::task::block_in_place(|| stack.patroni_members(&leader))), "the leader still leads");

    // Prometheus scrapes every member and both HA nodes.
    let prometheus = Api::new(stack.prometheus_url());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (up, _) = targets_up(&prometheus.get("/api/v1/targets?state=active").await.body);
        let want =
            ["patroni pg-1", "patroni pg-2", "patroni pg-3", "fleet-app ha-app-1", "fleet-app ha-app-2"];
        if want.iter().all(|w| up.contains(*w)) {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus targets up: {up:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // `docker kill` of the leader under a careful client: a new leader, writes again, nothing lost or
    // applied twice; the load goes on until writes succeed again, and 2 s more.
    let api = Api::new(stack.ha_url());
    let load = Load::start(&api, "ha-careful", true).await;
    let killed = Instant::now();
    let before = load.answered();
    tokio::task::block_in_place(|| docker(&["kill", &stack.container(&leader)]));
    let survivor = members.iter().find(|m| m.name != leader).unwrap().name.clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    let new_leader = loop {
        let now = tokio::task::block_in_place(|| stack.patroni_members(&survivor));
        if let Some(m) = now.iter().find(|m| m.role == "leader" && m.name != leader && m.state == "running") {
            break m.name.clone();
        }
        assert!(Instant::now() < deadline, "no new leader after {leader} was killed: {now:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!(
        "ha profile: {new_leader} leads {:.1} s after {leader} was killed",
        killed.elapsed().as_secs_f64()
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while api.increment("ha-after-failover").await.status != StatusCode::OK {
        assert!(Instant::now() < deadline, "the nodes never wrote to the new leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("ha profile: writes again {:.1} s after the kill", killed.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = load.answered() - before;
    let (writes, reads) = load.stop().await;
    assert!(during > 0, "the load ran through the failover");
    for (key, acked) in acknowledged(&writes) {
        // On the leader itself: a replica may not have replayed the last writes yet.
        let stored = tokio::task::block_in_place(|| {
            stack.psql(
                &new_leader,
                &format!("SELECT coalesce((SELECT value FROM counters WHERE key = '{key}'), 0)"),
            )
        });
        assert_eq!(stored, acked.to_string(), "{key}: one increment per acknowledged key");
    }
    eprintln!("ha kill-leader, careful client: {}", summary(&(writes, reads)));

    // The killed member rejoins as a replica when started again.
    tokio::task::block_in_place(|| stack.run(&["--profile", "ha", "start", &leader]));
    let members = tokio::task::block_in_place(|| stack.wait_whole(Duration::from_secs(180))).unwrap();
    let back = members.iter().find(|m| m.name == leader).unwrap();
    assert!(back.role != "leader" && back.state == "streaming", "{leader} rejoins as a replica: {members:?}");
    tokio::task::block_in_place(|| stack.down()).unwrap();
    assert_eq!(stack.leftovers(), Vec::<String>::new(), "down -v left these behind");
}
