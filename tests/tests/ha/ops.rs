//! The high-availability fleet as an operator runs it, through `fleetctl` against real etcd, Patroni,
//! PostgreSQL, nginx, Prometheus and nodes: `fleetctl up --replicas 2` serves and shows its members, each
//! database fault of `fleetctl chaos` does what it says (seen in Patroni's own status, not assumed) and
//! leaves the cluster whole, a chaos run through a primary's death loses and duplicates nothing, the next
//! `up` finds the data even after an `up` killed outright left its postmasters running, and a clean
//! shutdown leaves no Patroni, postmaster or etcd behind.
//!
//! One cluster, started twice (the second time from its kept data), so the file stays within a few minutes.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fleet_tests::processes::{descendants, processes_naming};
use fleet_tests::{fleetctl, fleetctl_output, fleetctl_up, Api};
use serde_json::Value;

/// How long the cluster may take to reach a state a fault leads to.
const SETTLE: Duration = Duration::from_secs(120);

/// Every member as `fleetctl status --json` shows it (Patroni's `/cluster`).
fn members(dir: &Path) -> Vec<Value> {
    let status: Value = serde_json::from_str(&fleetctl(dir, &["status", "--json"])).expect("status is JSON");
    status["members"].as_array().cloned().unwrap_or_default()
}

fn leader(members: &[Value]) -> Option<String> {
    let leader = members.iter().find(|m| m["role"] == "leader" && m["state"] == "running")?;
    Some(leader["name"].as_str()?.to_owned())
}

/// One leader, every other member streaming, one of them the synchronous standby.
fn whole(members: &[Value]) -> bool {
    let streaming = members.iter().filter(|m| m["state"] == "streaming").count();
    let sync = members.iter().any(|m| m["role"] == "sync_standby" && m["state"] == "streaming");
    leader(members).is_some() && streaming + 1 == members.len() && sync
}

/// The leader's timeline.
fn timeline(members: &[Value]) -> u64 {
    members.iter().find(|m| m["role"] == "leader").and_then(|m| m["timeline"].as_u64()).unwrap_or(0)
}

/// Polls `fleetctl status` until `done` holds for the members; returns them.
fn wait_for_members(dir: &Path, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = members(dir);
        if done(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}: {now:#?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `sql` through psql as the superuser: to member `member`'s port, or (`None`) to the `database:` URL
/// `fleetctl up` printed, passwords from the fleet's password file.
fn psql(dir: &Path, target: Psql<'_>, sql: &str) -> String {
    let mut cmd = Command::new(fleet_local::postgres_bin("psql").unwrap());
    cmd.env("PGPASSFILE", dir.join("patroni/pgpass")).args(["-X", "-A", "-t", "-c", sql]);
    match target {
        Psql::Url(url) => cmd.arg(url),
        Psql::Member(member) => {
            let state: Value =
                serde_json::from_slice(&std::fs::read(dir.join("fleet.json")).unwrap()).unwrap();
            let port = state["members"].as_array().unwrap().iter().find(|m| m["name"] == member).unwrap()
                ["port"]
                .to_string();
            cmd.args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", "-d", "appdb"])
        }
    };
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "psql {sql:?}: {}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

#[derive(Clone, Copy)]
enum Psql<'a> {
    Url(&'a str),
    Member(&'a str),
}

#[test]
fn a_fleet_on_three_members_serves_survives_every_database_fault_and_keeps_its_data() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("fleet");
    let (mut up, url) = fleetctl_up(&dir, &["--replicas", "2", "--nodes", "2"]);
    let api = Api::new(&url);

    // Three members: one leader, two streaming replicas, one of them synchronous.
    let start = members(&dir);
    assert_eq!(start.len(), 3, "{start:#?}");
    assert!(whole(&start), "{start:#?}");
    let table = fleetctl(&dir, &["status"]);
    for header in ["MEMBER", "ROLE", "STATE", "TIMELINE", "LAG"] {
        assert!(table.contains(header), "{table}");
    }
    assert_eq!(runtime.block_on(api.increment("ha-ops")).body["value"], 1);

    // The `database:` line reaches the primary with psql, with no password in it.
    let line = up.wait_for_line("database: ", Duration::from_secs(1)).unwrap();
    let database = line.trim_start_matches("database: ").split(' ').next().unwrap().to_owned();
    assert!(database.contains("target_session_attrs=read-write") && !database.contains(":@"), "{line}");
    let passwords = std::fs::read_to_string(dir.join("patroni/pgpass")).unwrap();
    for password in passwords.lines().filter_map(|l| l.rsplit(':').next()) {
        assert!(!up.recent_output().contains(password), "a password was printed");
    }
    assert_eq!(psql(&dir, Psql::Url(&database), "SELECT pg_is_in_recovery()"), "f");

    // Prometheus scrapes every Patroni's /metrics.
    let prometheus = up.wait_for_line("prometheus: ", Duration::from_secs(1)).unwrap();
    let targets_url = format!("{}/api/v1/targets", prometheus.trim_start_matches("prometheus: ").trim());
    let deadline = Instant::now() + SETTLE;
    loop {
        let targets: Value =
            runtime.block_on(async { reqwest::get(&targets_url).await.unwrap().json().await.unwrap() });
        let patroni: Vec<&Value> = targets["data"]["activeTargets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["labels"]["job"] == "patroni")
            .collect();
        if patroni.len() == 3 && patroni.iter().all(|t| t["health"] == "up") {
            break;
        }
        assert!(Instant::now() < deadline, "Patroni's targets never all up: {patroni:#?}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // switchover: another member leads, the old leader follows it.
    let before = leader(&start).unwrap();
    let out = fleetctl_output(&dir, &["chaos", "switchover"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let after = wait_for_members(&dir, "the cluster is whole after the switchover", whole);
    let new = leader(&after).unwrap();
    assert_ne!(new, before, "{after:#?}");
    assert!(timeline(&after) > timeline(&start), "{after:#?}");
    assert_eq!(psql(&dir, Psql::Url(&database), "SELECT pg_is_in_recovery()"), "f", "the URL follows");

    // lag-replica: the replica shows an old value while its replay is paused, the new one after.
    let replica = after.iter().find(|m| m["role"] == "replica").unwrap()["name"].as_str().unwrap().to_owned();
    let refused = fleetctl_output(&dir, &["chaos", "lag-replica", &new, "3"]);
    assert!(!refused.status.success() && text(&refused.stderr).contains("is the leader"), "{refused:?}");
    let out = fleetctl_output(&dir, &["chaos", "lag-replica", &replica, "10"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(runtime.block_on(api.increment("ha-ops")).body["value"], 2);
    let on_replica = || psql(&dir, Psql::Member(&replica), "SELECT value FROM counters WHERE key = 'ha-ops'");
    assert_eq!(on_replica(), "1", "{replica} replays nothing while paused");
    let deadline = Instant::now() + SETTLE;
    while on_replica() != "2" {
        assert!(Instant::now() < deadline, "{replica} never caught up after its pause");
        std::thread::sleep(Duration::from_millis(200));
    }

    // rolling-restart-db: every member's PostgreSQL restarted, a new leader, the cluster whole.
    let started_at = |members: &[Value]| -> Vec<String> {
        let names = members.iter().map(|m| m["name"].as_str().unwrap().to_owned());
        names.map(|name| psql(&dir, Psql::Member(&name), "SELECT pg_postmaster_start_time()")).collect()
    };
    let starts = started_at(&after);
    let out = fleetctl_output(&dir, &["chaos", "rolling-restart-db"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rolled = members(&dir);
    assert!(whole(&rolled), "whole when the command returns: {rolled:#?}");
    assert_ne!(leader(&rolled).unwrap(), new, "{rolled:#?}");
    for (before, now) in starts.iter().zip(started_at(&rolled)) {
        assert_ne!(*before, now, "every member restarted");
    }

    // A chaos run with kill-primary under careful clients: nothing lost or duplicated.
    let killed = leader(&rolled).unwrap();
    let args = [
        "chaos",
        "run",
        "--duration",
        "12s",
        "--concurrency",
        "8",
        "--plain-writers",
        "2",
        "--readers",
        "2",
        "--faults",
        "kill-primary",
        "--json",
    ];
    let out = fleetctl_output(&dir, &args);
    assert!(out.status.success(), "{}\n{}", text(&out.stdout), text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(
        (&report["verdict"]["lost"], &report["verdict"]["duplicated"]),
        (&0.into(), &0.into()),
        "{report:#}"
    );
    assert_eq!(
        report["verdict"]["unresolved"], 0,
        "the careful clients resolved every increment: {report:#}"
    );
    assert_eq!(
        (&report["plain_verdict"]["lost"], &report["plain_verdict"]["duplicated"]),
        (&0.into(), &0.into())
    );
    assert!(report["verdict"]["acknowledged"].as_u64().unwrap() > 0, "{report:#}");
    let fault = &report["faults"][0];
    assert_eq!((&fault["command"], &fault["ok"]), (&"kill-primary".into(), &true.into()), "{report:#}");
    let loads: Vec<&str> =
        report["loads"].as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(loads, ["careful writes", "plain writes", "plain reads"]);
    let survived = wait_for_members(&dir, "the cluster is whole after kill-primary", whole);
    assert_ne!(leader(&survived).unwrap(), killed, "{survived:#?}");
    assert!(timeline(&survived) > timeline(&rolled), "a failover starts a timeline: {survived:#?}");
    let value = runtime.block_on(api.get("/api/counters/ha-ops")).body["value"].clone();
    assert_eq!(value, 2);

    // `up` killed outright takes its Patroni along, but not the postmasters Patroni detached.
    let cluster_dir = dir.canonicalize().unwrap().join("patroni");
    let postmasters = |processes: Vec<String>| processes.into_iter().filter(|p| p.contains(" -D ")).count();
    assert_eq!(postmasters(processes_naming(&cluster_dir)), 3, "{:#?}", processes_naming(&cluster_dir));
    // nginx's workers outlive their master too; they are this test's to end (by PID), not `up`'s.
    let nginx_workers: Vec<u32> = descendants(up.pid())
        .into_iter()
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"nginx: worker"))
        })
        .collect();
    assert!(!nginx_workers.is_empty(), "up runs nginx");
    up.kill().unwrap();
    assert_eq!(postmasters(processes_naming(&cluster_dir)), 3, "{:#?}", processes_naming(&cluster_dir));
    for pid in nginx_workers {
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
    }

    // The next `up` stops those before its members start, and starts the same cluster from its data,
    // with the same passwords.
    let (up, url) = fleetctl_up(&dir, &["--replicas", "2", "--nodes", "1", "--no-prometheus"]);
    assert_eq!(runtime.block_on(Api::new(&url).get("/api/counters/ha-ops")).body["value"], 2);
    assert_eq!(std::fs::read_to_string(dir.join("patroni/pgpass")).unwrap(), passwords);
    wait_for_members(&dir, "the kept cluster is whole", whole);

    // A clean stop leaves no Patroni, postmaster or etcd running.
    assert!(processes_naming(&cluster_dir).len() >= 7, "{:#?}", processes_naming(&cluster_dir));
    fleetctl(&dir, &["down"]);
    drop(up);
    assert_eq!(processes_naming(&cluster_dir), Vec::<String>::new());
}
