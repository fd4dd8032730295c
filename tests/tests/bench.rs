//! `fleetctl bench` for real but tiny: one workload point (mixed, 2 s) on a 1-node fleet and one ceiling
//! (pgbench on 1000 keys, 2 s). The outputs must exist and parse, and every count must add up: statuses,
//! error codes, and what the database holds against what the answers claim. No speed is asserted.

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

#[test]
fn a_tiny_bench_run_writes_results_whose_counts_match_the_database() {
    let out = tempfile::tempdir().unwrap();
    // Mixed sends bulk inserts of a tenth of --bulk-rows (20) to nodes that take at most 10: every one
    // of them is a 413, which must be counted, and must insert nothing.
    let run = Command::new(fleetctl_bin())
        .args(["bench", "--workloads", "mixed", "--at", "1x2", "--no-sweeps", "--ceilings", "keys"])
        .args(["--duration", "2", "--warmup", "1", "--connections", "8", "--pgbench-clients", "4"])
        .args(["--bulk-rows", "200", "--env", "BULK_MAX_ROWS=10", "--out"])
        .arg(out.path())
        .env("FLEET_APP_BIN", node_bin())
        .output()
        .expect("run fleetctl bench");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "fleetctl bench failed:\n{stderr}");
    assert!(stderr.contains("[1/2]") && stderr.contains("left"), "no progress on stderr:\n{stderr}");

    let results: Value =
        serde_json::from_str(&read(out.path(), "results.json")).expect("results.json is JSON");
    let points = results["points"].as_array().expect("points");
    assert_eq!(points.len(), 1, "{points:?}");
    let point = &points[0];
    assert_eq!(point["workload"], "mixed");
    assert_eq!((point["shape"]["nodes"].as_u64(), point["shape"]["pool_size"].as_u64()), (Some(1), Some(2)));

    let ok = total(point, "status", Some("200"));
    let rejected = total(point, "status", Some("413"));
    let answers: u64 = ["warmup", "measured", "tail"]
        .iter()
        .flat_map(|phase| point[phase]["status"].as_object().unwrap().values())
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert!(ok > 0 && rejected > 0, "200: {ok}, 413: {rejected}");
    assert_eq!(answers, ok + rejected, "only 200 and 413 were expected: {point}");
    assert_eq!(total(point, "error_codes", Some("payload_too_large")), rejected, "{point}");
    assert_eq!(total(point, "transport_errors", None), 0);

    let check = &point["check"];
    assert_eq!(check["rows_ok"], 0, "{check}");
    assert_eq!(check["rows_delta"], 0, "a rejected bulk insert wrote rows: {check}");
    assert!(check["increments_ok"].as_u64().unwrap() > 0, "{check}");
    assert_eq!(check["increments_ok"].as_i64(), check["counter_delta"].as_i64(), "{check}");

    let measured: u64 =
        point["measured"]["status"].as_object().unwrap().values().map(|n| n.as_u64().unwrap()).sum();
    let rate = point["requests_per_s"].as_f64().unwrap();
    assert!((rate * 2.0 - measured as f64).abs() < 0.5, "{rate} req/s over 2 s is not {measured} answers");
    let latency = &point["latency_ms"];
    let [p50, p99, max] = ["p50", "p99", "max"].map(|p| latency[p].as_f64().unwrap());
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{latency}");

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

    let md = read(out.path(), "results.md");
    assert!(
        md.contains("| mixed") && md.contains(&format!("{rejected} (payload_too_large: {rejected})")),
        "{md}"
    );
    let svg = read(out.path(), "latency.svg");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{svg}");
    assert_eq!(svg.matches("data-bar=").count(), 4, "p50, p90, p99, p99.9: {svg}");
    assert!(!out.path().join("throughput-vs-pool.svg").exists(), "no sweep, no sweep plot");
}
