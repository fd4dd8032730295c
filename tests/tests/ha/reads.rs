//! What a read on the high-availability fleet promises, against real etcd, Patroni and PostgreSQL:
//! bounded staleness when a replica's link to its primary goes silent (no error, no WAL), tokens that name
//! their timeline, and bogus or future tokens refused at once without starving other reads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_app::routes::MIN_LSN;
use fleet_tests::ha::{lsn, member_read_url, node_on, read_counter, served_by, start_cluster};
use fleet_tests::history::{check_staleness, run_load, History, Outcome};
use fleet_tests::Api;
use futures_util::future::join_all;
use reqwest::StatusCode;

/// `READ_MAX_LAG_MS` of the nodes these tests start.
const MAX_LAG: Duration = Duration::from_millis(1000);

/// The timeline a token (`<timeline>/<LSN>`) names.
fn timeline_of(token: &str) -> u64 {
    let (timeline, lsn) = token.split_once('/').unwrap_or_else(|| panic!("{token} names no timeline"));
    assert!(lsn.contains('/'), "{token}: <timeline>/<LSN>");
    timeline.parse().unwrap_or_else(|_| panic!("{token} names no timeline"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_link_goes_silent_serves_no_read_staler_than_read_max_lag_ms() {
    let mut cluster = tokio::task::block_in_place(start_cluster);
    // The asynchronous replica: silencing the synchronous standby would stop the writes too.
    let members = cluster.status().unwrap();
    let replica = members.iter().find(|m| m.role == "replica").expect("an async replica").name.clone();
    let node = node_on(
        &cluster,
        &member_read_url(&cluster, &replica),
        &[("READ_MAX_LAG_MS", &MAX_LAG.as_millis().to_string())],
    );
    let api = Api::new(node.url());
    assert_eq!(api.increment("silent").await.status, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(30);
    while served_by(&cluster, &read_counter(&api, "silent", None).await) != Some(format!("replica:{replica}"))
    {
        assert!(Instant::now() < deadline, "the replica never served a plain read before the fault");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A plain writer and reader on the counter, from before the fault until after it is healed.
    let history = History::default();
    let stop = Arc::new(AtomicBool::new(false));
    let load =
        tokio::spawn(run_load(history.clone(), api.clone(), vec!["silent".to_owned()], false, stop.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio::task::block_in_place(|| cluster.silence_receiver(&replica)).unwrap();
    let silenced = history.now();
    tokio::time::sleep(MAX_LAG * 4).await;
    tokio::task::block_in_place(|| cluster.resume_receiver(&replica)).unwrap();
    let healed = history.now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let ops = history.ops();

    // Every operation succeeded, and the load outlasted the fault.
    let failed: Vec<_> = ops.iter().filter(|op| !matches!(op.outcome, Outcome::Ok(_))).collect();
    assert!(failed.is_empty(), "{} operations failed, first: {:?}", failed.len(), failed.first());
    let writes_between = |from, to| ops.iter().any(|op| op.write && op.end > from && op.end < to);
    assert!(writes_between(silenced + MAX_LAG * 2, healed), "writes went on");
    assert!(writes_between(healed + Duration::from_secs(1), history.now()), "the load outlasted the fault");
    assert!(
        ops.iter().any(|op| !op.write && op.start > healed + Duration::from_secs(1)),
        "reads outlasted it"
    );
    // Bounded staleness: every read saw every write acknowledged READ_MAX_LAG_MS before it was sent.
    let stale = check_staleness(&ops, MAX_LAG);
    assert!(stale.is_empty(), "{} stale reads, first: {}", stale.len(), stale[0]);
    let replica_address = format!("replica:127.0.0.1:{}", cluster.port(&replica).unwrap());
    let reads_during = ops.iter().filter(|op| !op.write && op.start > silenced && op.start < healed);
    let by = |who: &str| reads_during.clone().filter(|op| op.served_by.as_deref() == Some(who)).count();
    let last_by_replica = reads_during
        .clone()
        .filter(|op| op.served_by.as_deref() == Some(replica_address.as_str()))
        .map(|op| op.start - silenced)
        .max();
    eprintln!(
        "silenced replica: {} operations over {:.1} s; while silent, {} reads by the replica (the last {} ms \
         after the link went silent) and {} by the primary",
        ops.len(),
        (history.now() - silenced).as_secs_f64(),
        by(&replica_address),
        last_by_replica.map_or("-".to_owned(), |d| d.as_millis().to_string()),
        by("primary")
    );
    let primary_late = reads_during
        .clone()
        .any(|op| op.start > silenced + MAX_LAG * 2 && op.served_by.as_deref() == Some("primary"));
    assert!(primary_late, "the primary served reads while the replica heard nothing");
    assert!(api.metric(r#"fleet_db_read_fallbacks_total{reason="lagging"}"#).await > 0.0);

    // Healed, the replica serves plain reads again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while served_by(&cluster, &read_counter(&api, "silent", None).await) != Some(format!("replica:{replica}"))
    {
        assert!(Instant::now() < deadline, "the replica never served reads again once healed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_a_wal_receiver_serves_no_read_even_when_nothing_was_written() {
    let mut cluster = tokio::task::block_in_place(start_cluster);
    let members = cluster.status().unwrap();
    let replica = members.iter().find(|m| m.role == "replica").expect("an async replica").name.clone();
    let node = node_on(&cluster, &member_read_url(&cluster, &replica), &[]);
    let api = Api::new(node.url());
    let written = api.increment("receiver").await;
    assert_eq!(written.status, StatusCode::OK);
    let on_replica = format!("replica:{replica}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while served_by(&cluster, &read_counter(&api, "receiver", None).await).as_ref() != Some(&on_replica) {
        assert!(Instant::now() < deadline, "the replica never served a plain read");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // No WAL receiver, and none restarted (replay, whose process would start one, is paused); nothing is
    // written meanwhile, so the replica has every write but can no longer hear of new ones.
    tokio::task::block_in_place(|| cluster.pause_replay(&replica)).unwrap();
    tokio::task::block_in_place(|| cluster.end_receiver(&replica)).unwrap();
    let receivers = "SELECT count(*) FROM pg_stat_wal_receiver";
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::task::block_in_place(|| cluster.psql(&replica, receivers)).unwrap() != "0" {
        assert!(Instant::now() < deadline, "the WAL receiver did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..20 {
        let read = read_counter(&api, "receiver", None).await;
        assert_eq!(read.status, StatusCode::OK, "{:?}", read.body);
        assert_eq!(read.body["value"], written.body["value"]);
        assert_eq!(served_by(&cluster, &read).as_deref(), Some("primary"), "a replica that hears nothing");
    }

    // Replay resumed, it starts a WAL receiver again, and the replica serves again.
    tokio::task::block_in_place(|| cluster.resume_replay(&replica)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while served_by(&cluster, &read_counter(&api, "receiver", None).await).as_ref() != Some(&on_replica) {
        assert!(Instant::now() < deadline, "the replica never served reads again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_token_is_refused_without_a_wait_and_starves_no_plain_read() {
    let cluster = tokio::task::block_in_place(start_cluster);
    // Two read connections, and a wait long enough that reads waiting on bogus tokens would empty the
    // read pool for longer than a checkout may wait (POOL_WAIT_TIMEOUT_MS, 2 s).
    let node = node_on(&cluster, &cluster.read_url(), &[("READ_POOL_SIZE", "2"), ("READ_WAIT_MS", "1000")]);
    let api = Api::new(node.url());
    let written = api.increment("future").await;
    assert_eq!(written.status, StatusCode::OK);
    let token = lsn(&written);
    let timeline = timeline_of(&token);
    let leader_timeline = cluster.status().unwrap().into_iter().find(|m| m.is_leader()).unwrap().timeline;
    assert_eq!(Some(timeline), leader_timeline, "{token} names the primary's timeline");
    let read = read_counter(&api, "future", Some(&token)).await;
    assert_eq!(read.status, StatusCode::OK, "{:?}", read.body);
    assert_eq!(read.body["value"], written.body["value"], "a real token sees its write");

    let behind_before = api.metric(r#"fleet_db_read_fallbacks_total{reason="behind"}"#).await;
    let ahead_lsn = format!("{timeline}/FFFFFFFF/FFFFFFFF");
    let ahead_timeline = format!("{}/0/0", timeline + 1);
    for future in [&ahead_lsn, &ahead_timeline] {
        let reply = read_counter(&api, "future", Some(future)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{future}: {:?}", reply.body);
        assert_eq!(reply.code(), "future_token", "{future}");
    }
    for malformed in ["FFFFFFFF/FFFFFFFF", "0/0/1", "not-a-token"] {
        let reply = read_counter(&api, "future", Some(malformed)).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{malformed}: {:?}", reply.body);
        assert_eq!(reply.code(), "invalid_token", "{malformed}");
        assert!(reply.body["error"].as_str().unwrap().contains(MIN_LSN), "{:?}", reply.body);
    }

    // Twenty bogus tokens at once, with plain reads alongside: none waits, none empties the read pool.
    let (bogus, plain) = futures_util::join!(
        join_all((0..20).map(|_| read_counter(&api, "future", Some(&ahead_lsn)))),
        join_all((0..20).map(|_| read_counter(&api, "future", None))),
    );
    assert!(bogus.iter().all(|r| r.status == StatusCode::BAD_REQUEST), "every bogus token is refused");
    for reply in &plain {
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    }
    let behind_after = api.metric(r#"fleet_db_read_fallbacks_total{reason="behind"}"#).await;
    assert_eq!(behind_after, behind_before, "no read waited for a bogus token to be replayed");
    assert_eq!(
        api.metric(r#"fleet_db_read_fallbacks_total{reason="unavailable"}"#).await,
        0.0,
        "a read pool busy with bogus tokens is not taken for unreachable replicas"
    );
    let read = read_counter(&api, "future", None).await;
    assert!(served_by(&cluster, &read).is_some_and(|s| s.starts_with("replica:")), "{read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_name_their_timeline_and_one_from_before_a_switchover_is_served_by_the_primary() {
    let mut cluster = tokio::task::block_in_place(start_cluster);
    let node = node_on(&cluster, &cluster.read_url(), &[]);
    let api = Api::new(node.url());
    let before = api.increment("timeline").await;
    assert_eq!(before.status, StatusCode::OK);
    let old_token = lsn(&before);

    let sync = cluster.status().unwrap().into_iter().find(|m| m.role == "sync_standby").unwrap().name;
    let new = tokio::task::block_in_place(|| cluster.switchover(Some(&sync))).unwrap();
    tokio::task::block_in_place(|| cluster.wait_until_whole()).unwrap();
    let leader_timeline =
        cluster.status().unwrap().into_iter().find(|m| m.name == new).and_then(|m| m.timeline).unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let reply = api.increment("timeline").await;
        if reply.status == StatusCode::OK {
            break reply;
        }
        assert!(Instant::now() < deadline, "no write after the switchover: {:?}", reply.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let new_token = lsn(&after);
    assert_eq!(timeline_of(&new_token), leader_timeline, "{new_token}: the new primary's timeline");
    assert!(timeline_of(&old_token) < leader_timeline, "{old_token} names the old timeline");

    // A token of the old timeline: no replica (all on the new one) can prove it holds that history past
    // the fork, so the primary serves it, at once.
    let read = read_counter(&api, "timeline", Some(&old_token)).await;
    assert_eq!(read.status, StatusCode::OK, "{:?}", read.body);
    assert_eq!(served_by(&cluster, &read).as_deref(), Some("primary"), "{old_token}");
    assert_eq!(read.body["value"], after.body["value"]);
    // A token of the new timeline: a replica streaming it serves it once replayed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let read = read_counter(&api, "timeline", Some(&new_token)).await;
        assert_eq!(read.body["value"], after.body["value"], "a read with a token sees its write");
        if served_by(&cluster, &read).is_some_and(|s| s.starts_with("replica:")) {
            break;
        }
        assert!(Instant::now() < deadline, "no replica on the new timeline served its token");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
