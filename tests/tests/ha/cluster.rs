//! The Patroni cluster the high-availability fleet runs on, against real etcd, Patroni and PostgreSQL,
//! and a node on it: one leader with synchronous replication; reads on replicas as the route table says,
//! read-your-writes with `X-Fleet-Min-Lsn`, a lagging replica skipped, and fallback to the primary;
//! failover that keeps every acknowledged write (exactly once for a careful client); a switchover under
//! load that fails no read and no write but those whose COMMIT was in flight.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fleet_app::routes::{routes, Access, LSN, MIN_LSN, SERVED_BY};
use fleet_local::PatroniCluster;
use fleet_tests::ha::{
    lsn, member_read_url, node_on, query, query_async, read_counter, served_by, start_cluster,
};
use fleet_tests::load::{failures, summary, Load};
use fleet_tests::Api;
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Write-then-read pairs on fresh keys `{prefix}-{n}`, 20 at once: how many read their own write (and of
/// those, how many on a replica), with the write's LSN as `X-Fleet-Min-Lsn` when `token`.
async fn write_then_read(
    cluster: &PatroniCluster,
    api: &Api,
    prefix: &str,
    pairs: usize,
    token: bool,
) -> (usize, usize) {
    let (mut fresh, mut on_replica) = (0, 0);
    for chunk in (0..pairs).collect::<Vec<_>>().chunks(20) {
        let replies = join_all(chunk.iter().map(|n| async move {
            let key = format!("{prefix}-{n}");
            let written = api.increment(&key).await;
            assert_eq!(written.status, StatusCode::OK, "{:?}", written.body);
            let min_lsn = token.then(|| lsn(&written));
            (written.body["value"].clone(), read_counter(api, &key, min_lsn.as_deref()).await)
        }))
        .await;
        for (value, read) in replies {
            assert!([StatusCode::OK, StatusCode::NOT_FOUND].contains(&read.status), "{read:?}");
            if read.body["value"] == value {
                fresh += 1;
                on_replica += served_by(cluster, &read).is_some_and(|s| s.starts_with("replica:")) as usize;
            }
        }
    }
    (fresh, on_replica)
}

/// Polls `check` every 100 ms until it returns true, for up to a minute.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn three_members_elect_one_leader_and_replicate_synchronously() {
    let cluster = start_cluster();
    let members = cluster.status().unwrap();
    assert_eq!(members.len(), 3, "{members:?}");
    assert_eq!(members.iter().filter(|m| m.is_leader()).count(), 1, "{members:?}");
    assert_eq!(members.iter().filter(|m| m.is_streaming_replica()).count(), 2, "{members:?}");
    let sync: Vec<_> = members.iter().filter(|m| m.role == "sync_standby").collect();
    assert_eq!(sync.len(), 1, "one synchronous standby: {members:?}");
    let leader = cluster.leader().unwrap();
    let standby_names = cluster.psql(&leader, "SHOW synchronous_standby_names").unwrap();
    assert!(standby_names.contains(&sync[0].name), "the leader waits for {}: {standby_names}", sync[0].name);

    // The write URL reaches the leader, the read URL a replica, whichever order the hosts are in.
    assert_eq!(query(&cluster.url(), "SELECT pg_is_in_recovery()").unwrap(), ["f"]);
    for _ in 0..5 {
        assert_eq!(query(&cluster.read_url(), "SELECT pg_is_in_recovery()").unwrap(), ["t"]);
    }
    query(&cluster.url(), "CREATE TABLE t (n int); INSERT INTO t SELECT generate_series(1, 100)").unwrap();
    for member in cluster.member_names() {
        eventually(&format!("{member} has the rows"), || {
            cluster.psql(&member, "SELECT count(*) FROM t").is_ok_and(|n| n == "100")
        });
    }
    // The application's role can write through the URL, and is no superuser.
    assert_eq!(
        query(&cluster.url(), "SELECT rolsuper FROM pg_roles WHERE rolname = current_user").unwrap(),
        ["f"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_is_replaced_and_a_careful_client_s_writes_land_exactly_once() {
    let mut cluster = tokio::task::block_in_place(start_cluster);
    let url = cluster.url();
    query_async(&url, "CREATE TABLE acked (n int PRIMARY KEY)").await.unwrap();
    for n in 1..=200 {
        query_async(&url, &format!("INSERT INTO acked VALUES ({n})")).await.unwrap();
    }
    let mut node = node_on(&cluster, &cluster.read_url(), &[]);
    let api = Api::new(node.url());
    let running = Load::start(&api, "careful", true).await;

    let old = cluster.leader().unwrap();
    let killed = Instant::now();
    tokio::task::block_in_place(|| cluster.kill_member(&old)).unwrap();
    let new = tokio::task::block_in_place(|| cluster.wait_for_primary(Some(&old))).unwrap();
    eprintln!("{new} leads {:.1} s after {old} was killed", killed.elapsed().as_secs_f64());
    // The node finds the new primary by itself: writes succeed again, with no restart.
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.increment("after-failover").await.status != StatusCode::OK {
        assert!(Instant::now() < deadline, "the node never wrote to the new primary");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("the node writes again {:.1} s after the kill", killed.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (writes, reads) = running.stop().await;
    assert!(node.child().is_running(), "the node was not restarted");

    // Synchronous replication: every insert that returned was on the new leader before it returned.
    assert_eq!(query_async(&url, "SELECT count(*) FROM acked").await.unwrap(), ["200"]);
    // Exactly once: each key holds one increment per idempotency key, however often it was retried.
    for (key, seen) in &writes {
        let ok = seen.iter().filter(|s| s.status == StatusCode::OK).count();
        let stored =
            query_async(&url, &format!("SELECT value FROM counters WHERE key = '{key}'")).await.unwrap();
        assert_eq!(stored, [ok.to_string()], "{key}: {} answers, {ok} writes acknowledged", seen.len());
    }
    eprintln!("kill-primary, careful client: {}", summary(&(writes, reads)));

    tokio::task::block_in_place(|| cluster.start_member(&old)).unwrap();
    tokio::task::block_in_place(|| cluster.wait_until_whole()).unwrap();
    let members = cluster.status().unwrap();
    let rejoined = members.iter().find(|m| m.name == old).unwrap();
    assert!(rejoined.is_streaming_replica(), "{old} rejoins as a replica: {members:?}");
    eventually(&format!("{old} has every row"), || {
        cluster.psql(&old, "SELECT count(*) FROM acked").is_ok_and(|n| n == "200")
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_under_load_fails_no_read_and_no_write_but_those_whose_commit_was_in_flight() {
    let mut cluster = tokio::task::block_in_place(start_cluster);
    let node = node_on(&cluster, &cluster.read_url(), &[]);
    let api = Api::new(node.url());
    let running = Load::start(&api, "switch", false).await;

    let members = cluster.status().unwrap();
    // With synchronous replication, only the synchronous standby is sure to have every commit.
    let candidate = members.iter().find(|m| m.role == "sync_standby").unwrap().name.clone();
    let switched = Instant::now();
    let new = tokio::task::block_in_place(|| cluster.switchover(Some(&candidate))).unwrap();
    assert_eq!(new, candidate);
    tokio::task::block_in_place(|| cluster.wait_until_whole()).unwrap();
    eprintln!("switchover to {new}: whole again after {:.1} s", switched.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (writes, reads) = running.stop().await;

    let port = cluster.port(&new).unwrap();
    let primary_port = query_async(&cluster.url(), "SELECT inet_server_port()").await.unwrap();
    assert_eq!(primary_port, [port.to_string()], "the write URL follows the switchover");
    assert_eq!(failures(&reads), HashMap::new(), "no read failed, of {}", reads.len());
    let mut acknowledged = 0;
    for (key, seen) in &writes {
        let failed = failures(seen);
        let unknown = failed.get("503 08007").copied().unwrap_or(0);
        assert_eq!(
            failed.len(),
            (unknown > 0) as usize,
            "{key}: only a COMMIT in flight may fail: {failed:?}"
        );
        let ok = seen.iter().filter(|s| s.status == StatusCode::OK).count();
        let stored: usize =
            query_async(&cluster.url(), &format!("SELECT value FROM counters WHERE key = '{key}'"))
                .await
                .unwrap()[0]
                .parse()
                .unwrap();
        assert!(
            (ok..=ok + unknown).contains(&stored),
            "{key}: {stored} stored, {ok} acknowledged, {unknown} unknown"
        );
        acknowledged += ok;
    }
    eprintln!("switchover under load: {acknowledged} writes and {} reads acknowledged", reads.len());
    assert!(acknowledged > 0);
}

#[test]
fn a_replica_whose_replay_is_paused_falls_behind_and_catches_up() {
    let mut cluster = start_cluster();
    let leader = cluster.leader().unwrap();
    let replica = cluster.member_names().into_iter().find(|m| *m != leader).unwrap();
    query(&cluster.url(), "CREATE TABLE t (n int)").unwrap();
    eventually("the table is on the replica", || cluster.psql(&replica, "SELECT count(*) FROM t").is_ok());
    cluster.pause_replay(&replica).unwrap();
    query(&cluster.url(), "INSERT INTO t SELECT generate_series(1, 1000)").unwrap();
    let written = cluster.psql(&leader, "SELECT pg_current_wal_lsn()").unwrap();
    let received = format!("SELECT pg_last_wal_receive_lsn() >= '{written}'::pg_lsn");
    eventually("the replica has received the insert", || cluster.psql(&replica, &received).unwrap() == "t");
    let replayed = format!("SELECT pg_last_wal_replay_lsn() >= '{written}'::pg_lsn");
    assert_eq!(cluster.psql(&replica, &replayed).unwrap(), "f", "a paused replica has not replayed it");
    assert_eq!(cluster.psql(&replica, "SELECT count(*) FROM t").unwrap(), "0");
    let members = cluster.status().unwrap();
    assert!(members.iter().find(|m| m.name == replica).unwrap().is_streaming_replica(), "{members:?}");

    cluster.resume_replay(&replica).unwrap();
    eventually("the replica catches up", || {
        cluster.psql(&replica, "SELECT count(*) FROM t").unwrap() == "1000"
    });
}

/// A request for every route of the table, so each is tried against where it says it reads.
fn sample_request(path: &str) -> (reqwest::Method, String, Option<Value>) {
    let post = |body: Value| (reqwest::Method::POST, path.to_owned(), Some(body));
    match path {
        "/api/increment" => post(json!({"key": "routed"})),
        "/api/transfer" => post(json!({"from": "routed", "to": "routed-2", "amount": 1})),
        "/api/bulk-insert" => post(json!({"data": ["routed"]})),
        "/api/hold" => post(json!({"ms": 1})),
        "/api/test-isolation" => post(json!({"level": "read committed"})),
        "/api/counters/{key}" => (reqwest::Method::GET, "/api/counters/routed".to_owned(), None),
        _ if !path.contains('{') => (reqwest::Method::GET, path.to_owned(), None),
        _ => panic!("no sample request for {path}: add one"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_where_the_route_table_says_see_their_own_writes_and_fall_back_to_the_primary() {
    let mut cluster = tokio::task::block_in_place(start_cluster);
    let leader = cluster.leader().unwrap();
    let node = node_on(&cluster, &cluster.read_url(), &[]);
    let api = Api::new(node.url());
    assert_eq!(api.increment("routed").await.status, StatusCode::OK);

    // Every route, as the table says: a replica for reads, the primary for writes, the lab and health.
    for endpoint in routes(true) {
        let (method, path, body) = sample_request(endpoint.path);
        let mut request = api.http.request(method.clone(), format!("{}{path}", api.url));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{method} {path}");
        let header = response.headers().get(SERVED_BY).map(|v| v.to_str().unwrap().to_owned());
        match endpoint.access {
            Access::None => assert_eq!(header, None, "{method} {path} touches no database"),
            Access::Primary => assert_eq!(header.as_deref(), Some("primary"), "{method} {path}"),
            Access::Replica => {
                let port =
                    header.as_deref().and_then(|h| h.rsplit_once(':')).map(|(_, port)| port.to_owned());
                assert!(
                    header.as_deref().is_some_and(|h| h.starts_with("replica:127.0.0.1:")),
                    "{method} {path}: {header:?}"
                );
                assert_ne!(
                    port,
                    Some(cluster.port(&leader).unwrap().to_string()),
                    "{method} {path} not on the leader"
                );
            }
        }
        if method == reqwest::Method::POST && !endpoint.lab {
            assert!(response.headers().contains_key(LSN), "{method} {path} gives its LSN");
        }
    }

    // Read-your-writes: with the token every read sees its write; without it, some may not.
    let (fresh, on_replica) = write_then_read(&cluster, &api, "token", 1000, true).await;
    assert_eq!(fresh, 1000, "every read with its write's LSN sees the write");
    assert!(on_replica > 0, "reads with a token are served by a caught-up replica, not only the primary");
    let (fresh_without, _) = write_then_read(&cluster, &api, "plain", 1000, false).await;
    eprintln!(
        "write-then-read, 1000 pairs, 20 at once: with X-Fleet-Min-Lsn {fresh} fresh ({on_replica} on a \
         replica); without it {fresh_without} fresh, {} stale",
        1000 - fresh_without
    );
    let bad = api.get_with("/api/counters/routed", &[(MIN_LSN, "not-an-lsn")]).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{:?}", bad.body);
    assert!(bad.body["error"].as_str().unwrap().contains(MIN_LSN), "{:?}", bad.body);

    // No replica left: reads fall back to the primary and still succeed.
    let replicas: Vec<String> = cluster.member_names().into_iter().filter(|m| *m != leader).collect();
    for replica in &replicas {
        tokio::task::block_in_place(|| cluster.stop_member(replica)).unwrap();
    }
    for _ in 0..20 {
        let read = read_counter(&api, "routed", None).await;
        assert_eq!(read.status, StatusCode::OK, "{:?}", read.body);
        assert_eq!(served_by(&cluster, &read).as_deref(), Some("primary"));
    }
    assert!(api.metric(r#"fleet_db_read_fallbacks_total{reason="unavailable"}"#).await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_serves_no_read_and_reads_with_a_token_go_to_the_primary_meanwhile() {
    let mut cluster = tokio::task::block_in_place(start_cluster);
    let leader = cluster.leader().unwrap();
    let replica = cluster.member_names().into_iter().find(|m| *m != leader).unwrap();
    // A node whose only replica is the one made to lag.
    let node = node_on(&cluster, &member_read_url(&cluster, &replica), &[("READ_MAX_LAG_MS", "300")]);
    let api = Api::new(node.url());
    let written = api.increment("lag").await;
    let read = read_counter(&api, "lag", Some(&lsn(&written))).await;
    assert_eq!(served_by(&cluster, &read), Some(format!("replica:{replica}")), "{read:?}");

    tokio::task::block_in_place(|| cluster.pause_replay(&replica)).unwrap();
    // Writes go on, so the replica receives WAL it does not replay, and its lag grows past 300 ms.
    let mut last = written;
    let paused = Instant::now();
    while paused.elapsed() < Duration::from_millis(1000) {
        last = api.increment("lag").await;
        assert_eq!(last.status, StatusCode::OK, "{:?}", last.body);
    }
    let value = last.body["value"].clone();
    for _ in 0..50 {
        let read = read_counter(&api, "lag", None).await;
        assert_eq!(
            served_by(&cluster, &read).as_deref(),
            Some("primary"),
            "a lagging replica serves no read"
        );
        assert_eq!(read.body["value"], value);
        let read = read_counter(&api, "lag", Some(&lsn(&last))).await;
        assert_eq!(read.body["value"], value, "a read with a token sees its write");
    }
    assert!(api.metric(r#"fleet_db_read_fallbacks_total{reason="lagging"}"#).await > 0.0);

    tokio::task::block_in_place(|| cluster.resume_replay(&replica)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let read = read_counter(&api, "lag", Some(&lsn(&last))).await;
        assert_eq!(read.body["value"], value);
        if served_by(&cluster, &read) == Some(format!("replica:{replica}")) {
            break;
        }
        assert!(Instant::now() < deadline, "the replica never served reads again after catching up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
