//! The isolation lab: the Hermitage interleavings run for real must reproduce PostgreSQL's documented
//! isolation table, whatever else runs at the same time, and each scenario's steps must show the values
//! its anomaly predicts.

use std::time::{Duration, Instant};

use fleet_local::Node;
use fleet_tests::isolation::{documented, matrix};
use fleet_tests::{node_options, Api, Reply, TestApp};
use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

const CONCURRENT_UPDATE: &str = "could not serialize access due to concurrent update";
const READ_WRITE_DEPENDENCIES: &str = "could not serialize access due to read/write dependencies";

/// Runs the lab. A 200 also means no step waited out the lab's lock or statement timeout (that is an
/// error answer), so every blocked step was seen blocked, and released, as it happened.
async fn run_lab(api: &Api, body: Value) -> Reply {
    api.post("/api/test-isolation", &body).await
}

fn scenario<'a>(level: &'a Value, name: &str) -> &'a Value {
    let scenarios = level["scenarios"].as_array().expect("scenarios");
    scenarios.iter().find(|s| s["name"] == name).unwrap_or_else(|| panic!("no scenario {name}"))
}

/// What each read of `tx` returned, as `[(id, value)…]` per read, in order.
fn reads(scenario: &Value, tx: &str) -> Vec<Vec<(i64, i64)>> {
    let steps = scenario["steps"].as_array().expect("steps");
    steps
        .iter()
        .filter(|step| step["tx"] == tx && step["rows"].is_array())
        .map(|step| {
            let rows = step["rows"].as_array().unwrap();
            rows.iter().map(|row| (row["id"].as_i64().unwrap(), row["value"].as_i64().unwrap())).collect()
        })
        .collect()
}

fn final_rows(scenario: &Value) -> Vec<(i64, i64)> {
    reads(scenario, "after").pop().unwrap_or_else(|| panic!("no final read in {scenario}"))
}

/// The message of the serialization failure a scenario hit, or "" when none.
fn failure(scenario: &Value) -> &str {
    if scenario["error"]["sqlstate"] == "40001" {
        scenario["error"]["message"].as_str().unwrap_or_default()
    } else {
        ""
    }
}

/// The step of `tx` whose statement starts with `prefix`.
fn step<'a>(scenario: &'a Value, tx: &str, prefix: &str) -> &'a Value {
    let steps = scenario["steps"].as_array().expect("steps");
    steps
        .iter()
        .find(|s| s["tx"] == tx && s["statement"].as_str().is_some_and(|st| st.starts_with(prefix)))
        .unwrap_or_else(|| panic!("no {tx} step {prefix:?} in {scenario}"))
}

/// Each scenario's steps hold the values the anomaly catalogue predicts at this level.
fn assert_steps_follow_the_catalogue(level: &Value) {
    let name = level["level"].as_str().unwrap();
    let snapshot = matches!(name, "REPEATABLE READ" | "SERIALIZABLE");
    let ctx = |s: &str| format!("{s} at {name}");

    let g0 = scenario(level, "G0");
    let t2_write = step(g0, "T2", "update test set value = 12");
    assert_eq!(t2_write["blocked"], true, "{}: T2 must wait for T1's row lock", ctx("G0"));
    assert_eq!(t2_write["blockedBy"], "T1", "{}", ctx("G0"));
    assert!(
        t2_write["waitEvent"].as_str().unwrap_or_default().starts_with("Lock:"),
        "{}: {t2_write}",
        ctx("G0")
    );
    if snapshot {
        assert_eq!(failure(g0), CONCURRENT_UPDATE, "{}", ctx("G0"));
        assert_eq!(final_rows(g0), [(1, 11), (2, 21)], "{}: T1's writes survive", ctx("G0"));
    } else {
        assert_eq!(final_rows(g0), [(1, 12), (2, 22)], "{}: T2 wrote last, both rows", ctx("G0"));
    }

    let clean = vec![(1, 10), (2, 20)];
    assert_eq!(reads(scenario(level, "G1a"), "T2"), [clean.clone(), clean.clone()], "{}", ctx("G1a"));
    let g1b = reads(scenario(level, "G1b"), "T2");
    let second = if snapshot { clean.clone() } else { vec![(1, 11), (2, 20)] };
    assert_eq!(g1b, [clean.clone(), second], "{}: never 101", ctx("G1b"));
    let g1c = scenario(level, "G1c");
    assert_eq!(
        (reads(g1c, "T1"), reads(g1c, "T2")),
        (vec![vec![(2, 20)]], vec![vec![(1, 10)]]),
        "{}: {g1c}",
        ctx("G1c")
    );

    let otv = scenario(level, "OTV");
    let t3: Vec<i64> = reads(otv, "T3").iter().map(|read| read[0].1).collect();
    assert_eq!(t3, if snapshot { [11, 19, 19, 11] } else { [11, 19, 18, 12] }, "{}", ctx("OTV"));

    let pmp = reads(scenario(level, "PMP"), "T1");
    assert_eq!(pmp, [vec![], if snapshot { vec![] } else { vec![(3, 30)] }], "{}", ctx("PMP"));
    let pmp_write = scenario(level, "PMP-write");
    assert_eq!(step(pmp_write, "T2", "delete")["blocked"], true, "{}", ctx("PMP-write"));
    if snapshot {
        assert_eq!(failure(pmp_write), CONCURRENT_UPDATE, "{}", ctx("PMP-write"));
    } else {
        assert_eq!(step(pmp_write, "T2", "delete")["rowsAffected"], 0, "{}", ctx("PMP-write"));
        assert_eq!(
            reads(pmp_write, "T2"),
            [vec![(1, 20)]],
            "{}: the 20 it meant to delete",
            ctx("PMP-write")
        );
    }

    let p4 = scenario(level, "P4");
    assert_eq!(reads(p4, "T1")[0], [(1, 10)], "{}", ctx("P4"));
    assert_eq!(reads(p4, "T2")[0], [(1, 10)], "{}", ctx("P4"));
    assert_eq!(final_rows(p4)[0], (1, 11), "{}: one increment of two is visible", ctx("P4"));
    assert_eq!(failure(p4), if snapshot { CONCURRENT_UPDATE } else { "" }, "{}", ctx("P4"));

    let skew = reads(scenario(level, "G-single"), "T1");
    assert_eq!(skew, [vec![(1, 10)], vec![(2, if snapshot { 20 } else { 18 })]], "{}", ctx("G-single"));

    let prevented_by = |name: &str| scenario(level, name)["preventedBy"].clone();
    let lock_then_abort = json!(["lock", "serializationFailure"]);
    for name in ["G1a", "G1b", "G1c", "PMP", "G-single"] {
        let by = prevented_by(name);
        assert!(by.is_null() || by[0] == "snapshot", "{}: {by}", ctx(name));
    }
    assert_eq!(
        prevented_by("G0"),
        if snapshot { lock_then_abort.clone() } else { json!(["lock"]) },
        "{}",
        ctx("G0")
    );
    if snapshot {
        assert_eq!(prevented_by("P4"), lock_then_abort, "{}", ctx("P4"));
    }

    for name in ["G2-item", "G2"] {
        let s = scenario(level, name);
        if level["level"] == "SERIALIZABLE" {
            assert!(failure(s).starts_with(READ_WRITE_DEPENDENCIES), "{}: {s}", ctx(name));
        } else {
            assert_eq!(failure(s), "", "{}", ctx(name));
            let expected: &[(i64, i64)] =
                if name == "G2" { &[(1, 10), (2, 20), (3, 30), (4, 42)] } else { &[(1, 11), (2, 21)] };
            assert_eq!(final_rows(s), expected, "{}: both transactions committed", ctx(name));
        }
    }
}

/// Every call removes its scratch rows and closes its connections.
async fn assert_lab_left_nothing_behind(app_sql: impl Fn(&str) -> String) {
    assert_eq!(app_sql("SELECT count(*) FROM isolation_lab"), "0", "scratch rows left behind");
    let open = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '%/isolation-lab'";
    let deadline = Instant::now() + Duration::from_secs(5);
    while app_sql(open) != "0" {
        assert!(Instant::now() < deadline, "the lab's connections are still open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_matrix_is_postgresqls_documented_table_three_runs_in_a_row() {
    let app = TestApp::spawn(&[]);
    for run in 1..=3 {
        let reply = run_lab(&app.api, json!({})).await;
        assert_eq!(reply.status, StatusCode::OK, "run {run}: {:?}", reply.body);
        assert_eq!(matrix(&reply.body), documented(), "run {run}");
        for level in reply.body["levels"].as_array().unwrap() {
            assert_steps_follow_the_catalogue(level);
        }
    }
    assert_lab_left_nothing_behind(|q| app.sql(q)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_uncommitted_is_accepted_by_postgresql_and_behaves_as_read_committed() {
    let app = TestApp::spawn(&[]);
    let reply = run_lab(&app.api, json!({ "level": "read_uncommitted" })).await;

    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.body["level"], "READ UNCOMMITTED");
    assert_eq!(reply.body["serverLevel"], "read uncommitted", "the level was really requested");
    assert_eq!(reply.body["effectiveLevel"], "READ COMMITTED");
    assert_eq!(reply.body["dirtyRead"], "prevented");
    assert_eq!(reply.body["scenarios"].as_array().map(Vec::len), Some(11));
    assert!(reply.body.get("levels").is_none(), "one level is reported flat");
    let g1b = scenario(&reply.body, "G1b");
    assert_eq!(g1b["preventedBy"], json!(["snapshot"]));
    assert_eq!(reads(g1b, "T2")[1], [(1, 11), (2, 20)], "reads the new committed value, never 101");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_running_the_lab_at_once_all_see_the_documented_table() {
    let app = TestApp::spawn(&[]);
    let others: Vec<Node> = (2..=4)
        .map(|i| Node::spawn(node_options(&app.pg, &format!("app-{i}"), &[])).expect("start a node"))
        .collect();
    let apis: Vec<Api> =
        std::iter::once(app.api.clone()).chain(others.iter().map(|node| Api::new(node.url()))).collect();

    for round in 1..=2 {
        let replies = join_all(apis.iter().map(|api| run_lab(api, json!({})))).await;
        for (node, reply) in replies.iter().enumerate() {
            let node = node + 1;
            assert_eq!(reply.status, StatusCode::OK, "round {round}, app-{node}: {:?}", reply.body);
            assert_eq!(reply.body["container"], format!("app-{node}"));
            assert_eq!(matrix(&reply.body), documented(), "round {round}, app-{node}");
            for level in reply.body["levels"].as_array().unwrap() {
                assert_steps_follow_the_catalogue(level);
            }
        }
    }
    assert_lab_left_nothing_behind(|q| app.sql(q)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn levels_are_checked_against_the_four_names_and_never_reach_sql() {
    let app = TestApp::spawn(&[]);
    let bad = [
        json!("SNAPSHOT"),
        json!("read committed; drop table counters"),
        json!("READ  COMMITTED"),
        json!(""),
    ];
    for level in bad {
        let reply = run_lab(&app.api, json!({ "level": level })).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{level}: {:?}", reply.body);
        assert_eq!(reply.code(), "invalid_request", "{level}");
        let message = reply.body["error"].as_str().unwrap_or_default();
        for (name, _) in documented() {
            assert!(message.contains(&name), "{level}: {message}");
        }
    }
    let reply = run_lab(&app.api, json!({ "level": 42 })).await;
    assert_eq!((reply.status, reply.code()), (StatusCode::BAD_REQUEST, "invalid_request"));
    assert_eq!(app.sql("SELECT count(*) FROM counters"), "0", "the counters table is intact");

    for spelling in ["serializable", "Repeatable_Read", "READ COMMITTED"] {
        let reply = run_lab(&app.api, json!({ "level": spelling })).await;
        assert_eq!(reply.status, StatusCode::OK, "{spelling}: {:?}", reply.body);
        assert_eq!(
            reply.body["level"].as_str().unwrap().replace(' ', "_"),
            spelling.to_uppercase().replace(' ', "_")
        );
    }

    let no_body = app.api.http.post(format!("{}/api/test-isolation", app.api.url)).send().await.unwrap();
    assert_eq!(no_body.status(), StatusCode::OK, "no body means all four levels");
    let body: Value = no_body.json().await.unwrap();
    assert_eq!(body["levels"].as_array().map(Vec::len), Some(4));

    let no_lab =
        Node::spawn(node_options(&app.pg, "app-2", &[("LAB_ENDPOINTS", "false")])).expect("start a node");
    let reply = Api::new(no_lab.url()).post("/api/test-isolation", &json!({})).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "LAB_ENDPOINTS=false removes the lab");
}

#[test]
fn fleetctl_lab_isolation_prints_the_matrix_as_observed() {
    let app = TestApp::spawn(&[]);
    let out = std::process::Command::new(fleet_tests::fleetctl_bin())
        .args(["lab", "isolation", "--url", &app.node.url()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let row =
        |name: &str| text.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name}: {text}"));
    assert!(row("phenomenon").contains("SERIALIZABLE"));
    // Write skew: possible up to REPEATABLE READ, prevented by SERIALIZABLE (PostgreSQL's table).
    let skew = row("write skew");
    assert_eq!(skew.matches("possible").count(), 3, "{skew}");
    assert!(skew.contains("prevented (40001)"), "{skew}");

    let bad = std::process::Command::new(fleet_tests::fleetctl_bin())
        .args(["lab", "isolation", "--url", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!bad.status.success(), "no fleet at the URL is an error");
}
