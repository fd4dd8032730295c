//! The launcher as a root process among hostile local accounts: it writes nothing through a link the
//! `postgres` user plants, runs every service but the database as an unprivileged user, keeps etcd to
//! the cluster, signals only its own `fleetctl`, and keeps deadlocks' statements out of the server log.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fleet_local::fleet::FleetOptions;
use fleet_local::{Child, Component, PatroniCluster, PatroniOptions, Postgres, PostgresOptions};
use fleet_tests::processes::{descendants, uid};
use fleet_tests::{fleetctl_output, node_bin, start_fleet, test_log};
use nix::unistd::User;

/// The `postgres` account, when we are root (the only case where one user can plant links for another).
fn postgres_account() -> Option<User> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: only a launcher running as root hands directories to `postgres`");
        return None;
    }
    Some(User::from_name("postgres").unwrap().expect("the postgres user"))
}

/// Plants the symlink `link -> target` as `user`, replacing what is there, as a hostile account would.
fn plant_link(user: &User, target: &Path, link: &Path) {
    let status = Command::new("ln")
        .arg("-sfn")
        .arg(target)
        .arg(link)
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .status()
        .unwrap();
    assert!(status.success(), "cannot plant {} as {}", link.display(), user.name);
}

/// A root-owned file (mode 0644) only a link could make the launcher touch; returns its path.
fn bait(dir: &Path) -> std::path::PathBuf {
    let target = dir.join("target");
    fs::write(&target, "untouched\n").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
    target
}

/// Fails unless `target` is as [`bait`] left it.
fn assert_untouched(target: &Path) {
    let meta = fs::metadata(target).unwrap();
    assert_eq!(fs::read_to_string(target).unwrap(), "untouched\n", "{} was written", target.display());
    assert_eq!(
        (meta.uid(), meta.mode() & 0o7777),
        (0, 0o644),
        "{} was chowned or chmodded",
        target.display()
    );
}

#[test]
fn a_server_log_link_planted_by_postgres_does_not_make_root_write_through_it() {
    let Some(postgres) = postgres_account() else { return };
    let temp = tempfile::tempdir().unwrap();
    let target = bait(temp.path());
    let dir = temp.path().join("pg");
    let opts = PostgresOptions { dir: Some(dir.clone()), ..PostgresOptions::default() };
    drop(Postgres::start(opts.clone()).unwrap());
    plant_link(&postgres, &target, &dir.join("server.log"));

    let pg = Postgres::start(opts).expect("the cluster starts again");
    assert_eq!(pg.psql("SELECT 1").unwrap(), "1");
    assert_untouched(&target);
    assert!(fs::symlink_metadata(pg.log_file()).unwrap().is_file(), "the log is a file of its own again");
}

#[test]
fn a_patroni_config_link_planted_by_postgres_does_not_make_root_write_through_it() {
    let Some(postgres) = postgres_account() else { return };
    let temp = tempfile::tempdir().unwrap();
    let target = bait(temp.path());
    // pg-1 as an earlier start left it: the postgres user's (a one-member cluster cannot start: its
    // synchronous mode is strict).
    let dir = temp.path().join("ha");
    fs::create_dir_all(dir.join("pg-1")).unwrap();
    std::os::unix::fs::chown(dir.join("pg-1"), Some(postgres.uid.as_raw()), Some(postgres.gid.as_raw()))
        .unwrap();
    plant_link(&postgres, &target, &dir.join("pg-1/patroni.yml"));

    let opts = PatroniOptions {
        dir: Some(dir.clone()),
        members: 2,
        quiet: !test_log(),
        ..PatroniOptions::default()
    };
    let cluster = PatroniCluster::start(opts).expect("the cluster starts");
    assert_eq!(cluster.psql(&cluster.leader().unwrap(), "SELECT 1").unwrap(), "1");
    assert_untouched(&target);
}

/// Fails unless every process in `components` (and each of nginx's workers) runs as a user other than root.
fn assert_unprivileged(components: &[(String, u32)]) {
    for (name, pid) in components {
        assert_ne!(uid(*pid), 0, "{name} (PID {pid}) runs as root");
        if name == "nginx" {
            let workers = descendants(*pid);
            assert!(!workers.is_empty(), "nginx has no workers");
            for worker in workers {
                assert_ne!(uid(worker), 0, "an nginx worker (PID {worker}) runs as root");
            }
        }
    }
}

#[test]
fn no_service_of_a_fleet_runs_as_root_and_the_exporter_is_no_superuser() {
    if postgres_account().is_none() {
        return;
    }
    let mut fleet = start_fleet(2, 2, &[]);
    let components = fleet.component_pids();
    let names: Vec<&str> = components.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["nginx", "prometheus", "postgres-exporter", "app-1", "app-2", "postgres"]);
    assert_unprivileged(&components);

    let pg = fleet.postgres().unwrap();
    let sessions = "SELECT string_agg(r.rolname || ' ' || r.rolsuper, ',') FROM pg_stat_activity a \
                    JOIN pg_roles r ON r.oid = a.usesysid WHERE a.application_name = 'postgres-exporter'";
    let deadline = Instant::now() + Duration::from_secs(30);
    let exporter = loop {
        let found = pg.psql(sessions).unwrap();
        if !found.is_empty() || Instant::now() > deadline {
            break found;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!exporter.is_empty(), "the exporter never connected");
    assert!(exporter.split(',').all(|session| session.ends_with(" false")), "{exporter}");
    fleet.stop().unwrap();
}

/// Whether something listens on `port` on any address but 127.0.0.1 (IPv4 or IPv6), from `/proc/net`.
fn listens_beyond_loopback(port: u16) -> bool {
    let suffix = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        fs::read_to_string(table).unwrap_or_default().lines().skip(1).any(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            columns[3] == "0A" && columns[1].ends_with(&suffix) && columns[1] != format!("0100007F{suffix}")
        })
    })
}

#[test]
fn an_ha_fleet_runs_etcd_unprivileged_refuses_anonymous_etcd_clients_and_keeps_patroni_to_loopback() {
    if postgres_account().is_none() {
        return;
    }
    let mut opts = FleetOptions::new(node_bin());
    (opts.nodes, opts.pool_size, opts.port, opts.replicas) = (1, 2, 0, 1);
    (opts.quiet, opts.durable) = (!test_log(), false);
    let mut fleet = fleet_local::fleet::Fleet::start(opts).expect("start an HA fleet");
    let components = fleet.component_pids();
    let cluster = fleet.cluster().unwrap();
    let etcd = cluster.etcd().expect("etcd runs");
    let names: Vec<&str> = components.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names[names.len() - 3..], ["pg-1", "pg-2", "etcd"], "the cluster's processes come last");
    assert!(components.contains(&("etcd".to_owned(), etcd.pid())));
    assert_unprivileged(&components);

    let anonymous = ureq::post(&format!("http://{}/v3/kv/range", etcd.address()))
        .send_json(serde_json::json!({"key": "AA==", "range_end": "AA=="}));
    assert!(anonymous.is_err(), "etcd served an anonymous client: {:?}", anonymous.map(|r| r.into_string()));
    for name in cluster.member_names() {
        let api = cluster.api_url(&name).unwrap();
        let port: u16 = api.rsplit(':').next().unwrap().parse().unwrap();
        assert!(!listens_beyond_loopback(port), "{name}'s REST API listens beyond loopback");
    }
    assert!(!listens_beyond_loopback(etcd.address().rsplit(':').next().unwrap().parse().unwrap()));
    assert_eq!(cluster.psql(&cluster.leader().unwrap(), "SELECT 1").unwrap(), "1", "the cluster works");
    fleet.stop().unwrap();
}

#[test]
fn down_signals_no_process_that_does_not_run_this_fleet() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("fleet");
    fs::create_dir(&dir).unwrap();
    // One stranger, and one that calls itself fleetctl (as any process may).
    for script in ["exec sleep 60", "exec -a fleetctl sleep 60"] {
        let mut cmd = Command::new("bash");
        cmd.args(["-c", script]);
        let mut stranger = Child::spawn("stranger", cmd, true).unwrap();
        let pid = stranger.pid();
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::read(format!("/proc/{pid}/cmdline")).unwrap().starts_with(b"bash") {
            assert!(Instant::now() < deadline, "bash never ran its script");
            std::thread::sleep(Duration::from_millis(10));
        }
        let state = serde_json::json!({"pid": pid, "url": "http://127.0.0.1:1", "prometheus": null,
            "nodes": [], "database_port": 1, "password_file": "/nonexistent"});
        fs::write(dir.join("fleet.json"), state.to_string()).unwrap();
        let down = fleetctl_output(&dir, &["down"]);
        std::thread::sleep(Duration::from_millis(200));
        assert!(stranger.is_running(), "`fleetctl down` signalled {script:?}");
        assert!(!down.status.success(), "{script:?}: {}", String::from_utf8_lossy(&down.stderr));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_deadlocks_writes_none_of_their_statements_to_the_server_log() {
    let pg = fleet_tests::start_postgres();
    pg.psql("CREATE TABLE pair (id int PRIMARY KEY); INSERT INTO pair VALUES (1), (2)").unwrap();
    let connect = || async {
        let (client, connection) =
            tokio_postgres::connect(&pg.admin_url(), tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    };
    let (mut one, mut two) = (connect().await, connect().await);
    let lock = "SELECT 1 /* deadlock-burst */ FROM pair WHERE id = $1 FOR UPDATE";
    let mut deadlocks = 0;
    for _ in 0..20 {
        let (a, b) = (one.transaction().await.unwrap(), two.transaction().await.unwrap());
        a.execute(lock, &[&1]).await.unwrap();
        b.execute(lock, &[&2]).await.unwrap();
        let (first, second) = tokio::join!(a.execute(lock, &[&2]), b.execute(lock, &[&1]));
        deadlocks += usize::from(first.is_err()) + usize::from(second.is_err());
    }
    assert_eq!(deadlocks, 20, "every round deadlocks once");
    let log = fs::read_to_string(pg.log_file()).unwrap();
    assert!(log.contains("deadlock detected"), "the deadlocks are logged:\n{log}");
    // Each deadlock's report names the sessions' statements (its DETAIL); no error repeats its own.
    let repeated = log.lines().filter(|line| line.contains("STATEMENT:") && line.contains("deadlock-burst"));
    assert_eq!(repeated.count(), 0, "a deadlocked statement was logged again:\n{log}");
}
