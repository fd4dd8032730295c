//! The Patroni cluster the high-availability fleet runs on, against real etcd, Patroni and PostgreSQL:
//! one leader with synchronous replication, failover that keeps every acknowledged write, switchover,
//! and a replica made to lag.

use std::time::{Duration, Instant};

use fleet_local::{PatroniCluster, PatroniOptions};
use fleet_tests::test_log;

fn start_cluster() -> PatroniCluster {
    PatroniCluster::start(PatroniOptions { quiet: !test_log(), ..PatroniOptions::default() })
        .expect("start a 3-member Patroni cluster")
}

/// Runs `sql` through `url` (a libpq-style URL, multi-host allowed) with tokio-postgres, as the nodes
/// connect; returns the first column of every row, as text.
fn query(url: &str, sql: &str) -> Result<Vec<String>, tokio_postgres::Error> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let rows = client.simple_query(sql).await?;
        Ok(rows
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => {
                    Some(row.get(0).unwrap_or_default().to_owned())
                }
                _ => None,
            })
            .collect())
    })
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

#[test]
fn a_killed_primary_is_replaced_and_every_acknowledged_write_survives() {
    let mut cluster = start_cluster();
    let url = cluster.url();
    query(&url, "CREATE TABLE acked (n int PRIMARY KEY)").unwrap();
    for n in 1..=200 {
        query(&url, &format!("INSERT INTO acked VALUES ({n})")).unwrap();
    }
    let old = cluster.leader().unwrap();
    let killed = Instant::now();
    cluster.kill_member(&old).unwrap();
    let new = cluster.wait_for_primary(Some(&old)).unwrap();
    eprintln!("{new} leads {:.1} s after {old} was killed", killed.elapsed().as_secs_f64());
    // Synchronous replication: every insert that returned was on the new leader before it returned.
    assert_eq!(query(&url, "SELECT count(*) FROM acked").unwrap(), ["200"]);
    query(&url, "INSERT INTO acked VALUES (201)").unwrap();

    cluster.start_member(&old).unwrap();
    cluster.wait_until_whole().unwrap();
    let members = cluster.status().unwrap();
    let rejoined = members.iter().find(|m| m.name == old).unwrap();
    assert!(rejoined.is_streaming_replica(), "{old} rejoins as a replica: {members:?}");
    eventually(&format!("{old} has every row"), || {
        cluster.psql(&old, "SELECT count(*) FROM acked").is_ok_and(|n| n == "201")
    });
}

#[test]
fn a_switchover_hands_the_primary_to_the_synchronous_standby() {
    let mut cluster = start_cluster();
    let members = cluster.status().unwrap();
    // With synchronous replication, only the synchronous standby is sure to have every commit.
    let candidate = members.iter().find(|m| m.role == "sync_standby").unwrap().name.clone();
    let new = cluster.switchover(Some(&candidate)).unwrap();
    assert_eq!(new, candidate);
    cluster.wait_until_whole().unwrap();
    let port = cluster.port(&new).unwrap();
    let primary_port = query(&cluster.url(), "SELECT inet_server_port()").unwrap();
    assert_eq!(primary_port, [port.to_string()], "the write URL follows the switchover");
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
