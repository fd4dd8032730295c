//! Faults under load, through nginx on real fleets: a node stopped (SIGTERM) or killed (SIGKILL), PostgreSQL
//! restarted or frozen, while clients increment counters; and the `fleetctl chaos` command line that does
//! the same to a running `fleetctl up`. The load is fleetctl's own careful client (`fleetctl::chaos`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Output;
use std::thread;
use std::time::{Duration, Instant};

use fleet_local::fleet::Fleet;
use fleet_tests::{fleetctl_output, fleetctl_up, start_fleet, TestApp};
use fleetctl::chaos::{
    verify, Failure, Increment, Outcome, RetryPolicy, Run, Verdict, Workload, WorkloadOptions,
};
use serde_json::Value;

/// Longest wait for the load to make progress after a fault: the fleet must recover within it.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until the load has had `more` increments acknowledged since the call.
fn wait_for_acks(load: &Workload, more: u64, what: &str) {
    let target = load.tally().acknowledged + more;
    let deadline = Instant::now() + PROGRESS_TIMEOUT;
    while load.tally().acknowledged < target {
        assert!(
            Instant::now() < deadline,
            "no progress {what} within {PROGRESS_TIMEOUT:?}: {:?}",
            load.tally()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until node `n`, sent SIGTERM, has exited: at most 30 s.
fn wait_for_exit(fleet: &mut Fleet, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while fleet.node(n).child().is_running() {
        assert!(Instant::now() < deadline, "app-{n} did not exit within 30 s of SIGTERM");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Stops the load, checks every counter, and prints what happened (shown with `--nocapture`).
fn finish(load: Workload, url: &str) -> (Run, Verdict) {
    let run = load.stop();
    let verdict = verify(url, &run).expect("read the counters back");
    eprintln!(
        "{:.1} s, {:?}; lost {}, duplicated {}, unresolved {}",
        run.elapsed.as_secs_f64(),
        run.tally,
        verdict.lost,
        verdict.duplicated,
        verdict.unresolved
    );
    (run, verdict)
}

#[test]
fn a_node_stopped_with_sigterm_under_load_fails_no_request_through_nginx() {
    // The drain outlasts nginx's keep-alive toward the nodes (4 s), so no idle connection to the node is
    // left in nginx's cache when its listener closes.
    let mut fleet = start_fleet(3, 5, &[("SHUTDOWN_DRAIN_MS", "5000")]);
    let mut options = WorkloadOptions::careful(&fleet.url(), "sigterm", 10, 8);
    // No retries, so any request the stop fails shows. A connection per request: taking app-2 out of
    // rotation reloads nginx, whose old workers close their idle client connections, and a request sent
    // down one at that instant breaks on the client's side of nginx, whatever the node does.
    options.policy = RetryPolicy { keep_alive: false, ..RetryPolicy::no_retries() };
    let load = Workload::start(options).unwrap();
    wait_for_acks(&load, 300, "before the stop");

    fleet.stop_node(2).unwrap();
    wait_for_exit(&mut fleet, 2);
    wait_for_acks(&load, 300, "after app-2 exited");
    let (run, verdict) = finish(load, &fleet.url());

    assert!(run.tally.failures.is_empty(), "requests failed while app-2 stopped: {:?}", run.tally);
    assert!(verdict.exactly_once() && verdict.unresolved == 0, "{verdict:?}");
    let status = fleet.node(2).child().terminate(Duration::ZERO).unwrap();
    assert_eq!(status.code(), Some(0), "app-2 drained and exited cleanly");
    fleet.stop().unwrap();
}

#[test]
fn a_bare_sigterm_under_load_through_nginx_loses_no_request() {
    // What `docker compose stop app-2` does: SIGTERM to the node and nothing else, so nginx keeps app-2 in
    // its round robin (the compose site: passive health checks only). Plain clients, 200 at once on
    // keep-alive connections, no key, no retry: a request the stop loses shows as nginx's 502 or 504 or
    // a broken connection. What the contract allows besides 200: a node's own 503 (shed under load,
    // nothing applied; or 08007, outcome unknown), which the verdict holds to exactly that.
    let mut fleet = start_fleet(3, 5, &[("SHUTDOWN_DRAIN_MS", "0")]);
    let mut options = WorkloadOptions::careful(&fleet.url(), "bare", 20, 200);
    options.policy = RetryPolicy::plain();
    let load = Workload::start(options).unwrap();
    wait_for_acks(&load, 1000, "before the stop");

    let pid = nix::unistd::Pid::from_raw(fleet.node(2).pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    wait_for_exit(&mut fleet, 2);
    wait_for_acks(&load, 1000, "after app-2 exited");
    let (run, verdict) = finish(load, &fleet.url());

    let allowed = |failure: &Failure| matches!(failure, Failure::Status(503) | Failure::CommitUnknown);
    let lost: Vec<_> = run.tally.failures.keys().filter(|failure| !allowed(failure)).collect();
    assert!(lost.is_empty(), "requests lost while app-2 stopped: {:?}", run.tally);
    assert_eq!((verdict.lost, verdict.duplicated), (0, 0), "{verdict:?}");
    let status = fleet.node(2).child().terminate(Duration::ZERO).unwrap();
    assert_eq!(status.code(), Some(0), "app-2 drained and exited cleanly");
    fleet.stop().unwrap();
}

/// Asks PostgreSQL at `port` whether it speaks SSL (an 8-byte SSLRequest): any running server answers one
/// byte at once. Returns whether it answered within `wait`.
fn postgres_answers(port: u16, wait: Duration) -> bool {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(wait)).unwrap();
    stream.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).unwrap();
    let mut answer = [0u8; 1];
    std::io::Read::read(&mut stream, &mut answer).is_ok_and(|n| n == 1)
}

#[test]
fn a_paused_database_answers_nothing_until_it_is_resumed() {
    let mut pg = fleet_tests::start_postgres();
    assert!(postgres_answers(pg.port(), Duration::from_secs(10)));
    pg.pause().unwrap();
    assert!(pg.is_paused() && pg.pause().is_err(), "a second pause is refused");
    assert!(!postgres_answers(pg.port(), Duration::from_millis(500)), "a frozen server answers nothing");
    pg.resume().unwrap();
    assert!(postgres_answers(pg.port(), Duration::from_secs(10)), "it answers again once resumed");
    assert_eq!(pg.psql("SELECT 1").unwrap(), "1");
    pg.pause().unwrap();
    pg.stop().expect("a paused server is resumed to stop it");
}

/// Under `load`: SIGKILL to app-3, a restart of PostgreSQL, then 2 s of it frozen; after each, the load
/// must make progress again.
fn kill_restart_and_pause(fleet: &mut Fleet, load: &Workload) {
    fleet.kill_node(3).unwrap();
    wait_for_acks(load, 300, "after app-3 was killed");
    fleet.restart_db().unwrap();
    wait_for_acks(load, 300, "after PostgreSQL restarted");
    fleet.pause_db(Duration::from_secs(2)).unwrap();
    wait_for_acks(load, 300, "after PostgreSQL was paused for 2 s");
}

#[test]
fn a_killed_node_a_restarted_and_a_paused_database_lose_and_double_no_acknowledged_increment() {
    let mut fleet = start_fleet(3, 5, &[]);
    let load = Workload::start(WorkloadOptions::careful(&fleet.url(), "faults", 20, 16)).unwrap();
    wait_for_acks(&load, 300, "before any fault");

    kill_restart_and_pause(&mut fleet, &load);
    let (run, verdict) = finish(load, &fleet.url());

    assert_eq!((verdict.lost, verdict.duplicated), (0, 0), "{verdict:?}");
    assert_eq!(
        (verdict.unresolved, verdict.rejected),
        (0, 0),
        "every increment was acknowledged: {verdict:?}"
    );
    assert!(run.tally.retries > 0, "the faults were felt and retried through: {:?}", run.tally);
    assert_eq!(fleet.exited_components(), ["app-3"], "only the killed node is down");
    fleet.stop().unwrap();
}

#[test]
fn a_database_that_dies_is_reported_among_the_exited_components() {
    let mut fleet = start_fleet(1, 2, &[]);
    assert!(fleet.exited_components().is_empty(), "{:?}", fleet.exited_components());
    let postmaster = fleet.postgres().unwrap().pid().expect("PostgreSQL runs");
    let postmaster = nix::unistd::Pid::from_raw(i32::try_from(postmaster).unwrap());
    nix::sys::signal::kill(postmaster, nix::sys::signal::Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleet.exited_components().is_empty() {
        assert!(Instant::now() < deadline, "the killed postmaster was never reported");
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(fleet.exited_components(), ["postgres"], "only the database is down");
    fleet.stop().expect("a fleet whose database died still stops");
}

#[test]
fn plain_clients_on_the_coalesced_path_through_faults_are_told_the_truth() {
    // No idempotency key and no retry, as most clients: every increment is coalesced, so this is the
    // default path under the same faults. Every 200 must be in the database, and the database may hold
    // nothing beyond the 200s and the answers that said the outcome is unknown (08007, or no answer).
    let mut fleet = start_fleet(3, 5, &[]);
    let mut options = WorkloadOptions::careful(&fleet.url(), "plain", 20, 32);
    options.policy = RetryPolicy::plain();
    let load = Workload::start(options).unwrap();
    wait_for_acks(&load, 300, "before any fault");

    kill_restart_and_pause(&mut fleet, &load);
    let (run, verdict) = finish(load, &fleet.url());

    assert_eq!((verdict.lost, verdict.duplicated), (0, 0), "{verdict:?}");
    assert_eq!(run.tally.retries, 0, "a plain client never retries");
    assert!(run.tally.failed_requests() > 0, "the faults were felt: {:?}", run.tally);
    fleet.stop().unwrap();
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn fleetctl_chaos_breaks_a_running_fleet_through_its_control_socket_and_chaos_run_reports_exactly_once() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    let (mut up, _) = fleetctl_up(dir, &["--nodes", "3", "--no-prometheus"]);
    let socket = dir.join("control.sock");
    assert!(up.wait_for_line("control: ", Duration::ZERO).unwrap().contains("control.sock"));

    let killed = fleetctl_output(dir, &["chaos", "kill-node", "2"]);
    assert!(killed.status.success(), "{}", stderr(&killed));
    assert!(stdout(&killed).contains("killed app-2"), "{}", stdout(&killed));
    up.wait_for_line("app-2 has exited", Duration::from_secs(10)).unwrap();

    // Bad commands: clear errors, and nothing happens.
    let again = fleetctl_output(dir, &["chaos", "kill-node", "2"]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("app-2 is not running"), "{}", stderr(&again));
    let missing = fleetctl_output(dir, &["chaos", "stop-node", "9"]);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains("there is no node app-9"), "{}", stderr(&missing));
    let negative = fleetctl_output(dir, &["chaos", "pause-db", "-3"]);
    assert_eq!(negative.status.code(), Some(2), "a usage error");
    let mut raw = UnixStream::connect(&socket).unwrap();
    raw.write_all(b"explode now\n").unwrap();
    let mut answer = String::new();
    BufReader::new(raw).read_line(&mut answer).unwrap();
    assert!(answer.starts_with("error unknown command \"explode now\""), "{answer}");
    let elsewhere = tempfile::tempdir().unwrap();
    let nowhere = fleetctl_output(elsewhere.path(), &["chaos", "restart-db"]);
    assert!(!nowhere.status.success());
    assert!(stderr(&nowhere).contains("no fleet is listening"), "{}", stderr(&nowhere));

    let chaos = fleetctl_output(dir, &["chaos", "run", "--duration", "8s", "--concurrency", "8", "--json"]);
    assert!(chaos.status.success(), "{}", stderr(&chaos));
    let report: Value = serde_json::from_str(&stdout(&chaos)).expect("a JSON report");
    let verdict = &report["verdict"];
    assert_eq!((&verdict["lost"], &verdict["duplicated"]), (&0.into(), &0.into()), "{report:#}");
    assert_eq!(verdict["unresolved"], 0, "{report:#}");
    assert!(report["tally"]["acknowledged"].as_u64().unwrap() > 0, "{report:#}");
    let faults: Vec<&str> =
        report["faults"].as_array().unwrap().iter().map(|f| f["command"].as_str().unwrap()).collect();
    assert_eq!(
        faults,
        ["kill-node 3", "restart-db", "pause-db 0.8"],
        "app-1 is spared, app-2 was dead already"
    );
    assert!(report["faults"].as_array().unwrap().iter().all(|f| f["ok"] == true), "{report:#}");

    let down = fleetctl_output(dir, &["down"]);
    assert!(down.status.success(), "{}", stderr(&down));
    assert!(!up.is_running());
    assert!(!socket.exists(), "the control socket is removed on stop");
}

#[test]
fn the_verdict_catches_an_acknowledged_increment_lost_and_one_applied_unacknowledged() {
    let app = TestApp::spawn(&[]);
    let load = Workload::start(WorkloadOptions::careful(&app.api.url, "verdict", 2, 4)).unwrap();
    wait_for_acks(&load, 100, "on a quiet node");
    let (mut run, verdict) = finish(load, &app.api.url);
    verdict.judge().expect("a run without faults is exactly once");

    // The record of a run claims an acknowledgement the database does not hold: lost.
    let key = run.options.keys[0].clone();
    let top = app.sql_i64(&format!("SELECT value FROM counters WHERE key = '{key}'"));
    let forged = Increment {
        key: key.clone(),
        outcome: Outcome::Acked { value: top + 1, replayed: false },
        attempts: 1,
    };
    run.increments.push(forged);
    let lost = verify(&app.api.url, &run).unwrap();
    assert_eq!((lost.lost, lost.duplicated), (1, 0));
    let error = lost.judge().unwrap_err().to_string();
    assert!(error.contains("1 acknowledged increments lost"), "{error}");
    run.increments.pop();

    // The database holds an increment nobody was told about: applied twice, as far as clients know.
    app.sql(&format!("UPDATE counters SET value = value + 1 WHERE key = '{key}'"));
    let doubled = verify(&app.api.url, &run).unwrap();
    assert_eq!((doubled.lost, doubled.duplicated), (0, 1));
    assert!(doubled.judge().unwrap_err().to_string().contains("1 duplicated"));
}
