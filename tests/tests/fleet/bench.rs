//! `fleetctl bench` for real but tiny: three workload points (the HTTP ceiling, mixed and bulk, 2 s each)
//! on a 1-node fleet, each with its two 1-connection probes (through nginx and straight to the node), and
//! one ceiling (pgbench on 1000 keys, 2 s). The outputs must exist and parse, and every count must add up:
//! statuses, error codes, and what the database holds against what the answers claim, rows included. No
//! speed is asserted.

use std::path::Path;
use std::process::Command;

use fleet_tests::{fleetctl_bin, node_bin};
use serde_json::Value;

/// A sum over the warm-up, measured and tail counts of a point: `field` is a number or a map of numbers.
fn total(point: &Value, field: &str, key: Option<&str>) -> u64 {
    ["warmup", "measured", "tail"]
        .iter()
        .map(|phase| {
            let value = &point[phase][field];
            match key {
                Some(key) => value[key].as_u64().unwrap_or(0),
                None => value.as_u64().unwrap_or_else(|| panic!("{phase}.{field} is not a number: {value}")),
            }
        })
        .sum()
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The answers of a point or probe by status, over its three phases.
fn answers(point: &Value) -> u64 {
    ["warmup", "measured", "tail"]
        .iter()
        .flat_map(|phase| point[phase]["status"].as_object().unwrap().values())
        .map(|n| n.as_u64().unwrap())
        .sum()
}

#[test]
fn a_tiny_bench_run_writes_results_whose_counts_match_the_database() {
    let out = tempfile::tempdir().unwrap();
    // Mixed inserts a tenth of --bulk-rows (20 rows) per bulk insert, which the node takes; bulk sends
    // 200 rows to nodes that take at most 100: every one of those is a 413, which must be counted, and
    // must insert nothing.
    let run = Command::new(fleetctl_bin())
        .args(["bench", "--workloads", "http,mixed,bulk", "--at", "1x2", "--no-sweeps", "--ceilings", "keys"])
        .args(["--duration", "2", "--warmup", "1", "--connections", "8", "--pgbench-clients", "4"])
        .args(["--probe-connections", "1", "--probe-duration", "1"])
        .args(["--bulk-rows", "200", "--env", "BULK_MAX_ROWS=100", "--out"])
        .arg(out.path())
        .env("FLEET_APP_BIN", node_bin())
        .output()
        .expect("run fleetctl bench");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "fleetctl bench failed:\n{stderr}");
    assert!(stderr.contains("[1/10]") && stderr.contains("left"), "no progress on stderr:\n{stderr}");

    let results: Value =
        serde_json::from_str(&read(out.path(), "results.json")).expect("results.json is JSON");
    let points = results["points"].as_array().expect("points");
    let names: Vec<&str> = points.iter().map(|p| p["workload"].as_str().unwrap()).collect();
    assert_eq!(names, ["http", "mixed", "bulk"], "{points:?}");
    let [http, mixed, bulk] = [&points[0], &points[1], &points[2]];
    assert_eq!((mixed["shape"]["nodes"].as_u64(), mixed["shape"]["pool_size"].as_u64()), (Some(1), Some(2)));

    // The HTTP ceiling touches no database and has nothing to fail.
    assert_eq!(total(http, "status", Some("200")), answers(http), "{http}");
    assert_eq!(
        (http["check"]["increments_ok"].as_u64(), http["check"]["rows_delta"].as_i64()),
        (Some(0), Some(0))
    );

    // Mixed: real increments and real bulk inserts, each counted by the database too.
    assert_eq!(total(mixed, "status", Some("200")), answers(mixed), "only 200 was expected: {mixed}");
    assert_eq!(total(mixed, "transport_errors", None), 0);
    let check = &mixed["check"];
    assert!(check["rows_ok"].as_u64().unwrap() > 0, "no bulk insert succeeded: {check}");
    assert_eq!(check["rows_ok"].as_i64(), check["rows_delta"].as_i64(), "rows claimed ≠ rows added: {check}");
    assert!(check["increments_ok"].as_u64().unwrap() > 0, "{check}");
    assert_eq!(check["increments_ok"].as_i64(), check["counter_delta"].as_i64(), "{check}");

    // Bulk: every request over the limit, answered 413, and not a row written.
    let rejected = total(bulk, "status", Some("413"));
    assert!(rejected > 0 && rejected == answers(bulk), "{bulk}");
    assert_eq!(total(bulk, "error_codes", Some("payload_too_large")), rejected, "{bulk}");
    assert_eq!((bulk["check"]["rows_ok"].as_i64(), bulk["check"]["rows_delta"].as_i64()), (Some(0), Some(0)));

    let measured: u64 =
        mixed["measured"]["status"].as_object().unwrap().values().map(|n| n.as_u64().unwrap()).sum();
    let rate = mixed["requests_per_s"].as_f64().unwrap();
    assert!((rate * 2.0 - measured as f64).abs() < 0.5, "{rate} req/s over 2 s is not {measured} answers");
    let latency = &mixed["latency_ms"];
    let [p50, p99, max] = ["p50", "p99", "max"].map(|p| latency[p].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{latency}");

    // Two probes per workload, one connection each, through nginx and straight to the node, each
    // checked against the database like the points.
    let probes = results["probes"].as_array().expect("probes");
    let routes: Vec<(&str, &str)> =
        probes.iter().map(|p| (p["workload"].as_str().unwrap(), p["route"].as_str().unwrap())).collect();
    let expected = ["http", "mixed", "bulk"].into_iter().flat_map(|w| [(w, "nginx"), (w, "direct")]);
    assert_eq!(routes, expected.collect::<Vec<_>>(), "{probes:?}");
    for probe in probes {
        assert_eq!(probe["connections"], 1, "{probe}");
        assert!(probe["latency_ms"]["p50"].as_f64().unwrap() > 0.0, "{probe}");
        let check = &probe["check"];
        assert_eq!(check["rows_ok"].as_i64(), check["rows_delta"].as_i64(), "{probe}");
        assert_eq!(check["increments_ok"].as_i64(), check["counter_delta"].as_i64(), "{probe}");
    }
    let mixed_probe = &probes[2]["check"];
    assert!(mixed_probe["rows_ok"].as_u64().unwrap() > 0, "the mixed probe inserted no rows: {mixed_probe}");

    let pgbench = &results["ceilings"]["keys"];
    assert!(
        pgbench["transactions"].as_u64().unwrap() > 0 && pgbench["tps"].as_f64().unwrap() > 0.0,
        "{pgbench}"
    );
    assert_eq!(pgbench["failed"], 0, "{pgbench}");
    assert_eq!(pgbench["transactions"].as_i64(), pgbench["counter_delta"].as_i64(), "{pgbench}");

    let goal = |prefix: &str| {
        let goals = results["goals"].as_array().unwrap();
        goals.iter().find(|g| g["goal"].as_str().unwrap().starts_with(prefix)).cloned().unwrap()
    };
    assert_eq!(goal("zero non-2xx")["measured"].as_f64(), Some(rejected as f64));
    assert_eq!(goal("zero non-2xx")["met"], false);
    assert_eq!(goal("the database holds")["met"], true);
    assert!(goal("p50 through nginx")["measured"].as_f64().unwrap() > 0.0);

    let md = read(out.path(), "results.md");
    assert!(
        md.contains("| bulk insert") && md.contains(&format!("{rejected} (payload_too_large: {rejected})")),
        "{md}"
    );
    assert!(md.contains("## Latency without parallelism") && md.contains("| mixed | 1 |"), "{md}");
    let svg = read(out.path(), "latency.svg");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
    assert_eq!(svg.matches("data-bar=").count(), 12, "p50, p90, p99, p99.9 of three workloads: {svg}");
    assert!(!out.path().join("throughput-vs-pool.svg").exists(), "no sweep, no sweep plot");
}
