//! The goals a benchmark run is judged by: each a ratio to a ceiling measured in the same run (or a count,
//! or a size) and its target, judged from the run's points, probes and ceilings.

use serde::{Deserialize, Serialize};

use super::plan::{Role, Workload};
use super::results::{nginx_over_direct, Ceilings, Point, Probe, Route};

/// The `keys` throughput of the seed, the Node.js service pgfleet replaces (not part of this repository),
/// on its reference machine (4 nodes × pool 5, 64 connections), and pgbench's rate for the same
/// transaction measured beside it there. The "3× the seed" goal scales the seed's figure by how this
/// run's pgbench compares with that one: the seed's share of the database's ceiling, which survives a
/// faster or slower machine, as the goal's other ratios do.
pub const SEED_KEYS_RPS: f64 = 1470.0;
pub const SEED_PGBENCH_KEYS_TPS: f64 = 6900.0;
/// A workload whose p50 through nginx is more than this many times its p50 straight to a node is
/// flagged: nginx adds a hop, not a wait.
pub const NGINX_P50_LIMIT: f64 = 1.5;
/// The most resident memory a node may use under load.
pub const NODE_RSS_LIMIT_BYTES: u64 = 30 * 1024 * 1024;

/// One of the goals a run is judged by.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Goal {
    pub goal: String,
    /// What was measured, in `unit`; `None` when the run did not measure it.
    pub measured: Option<f64>,
    pub unit: Unit,
    /// `>=` or `<=`.
    pub comparison: String,
    pub target: f64,
    pub met: Option<bool>,
    /// What the figure is measured against.
    pub basis: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Ratio,
    Count,
    Bytes,
}

fn goal(name: &str, measured: Option<f64>, unit: Unit, at_least: bool, target: f64, basis: String) -> Goal {
    let met = measured.map(|m| if at_least { m >= target } else { m <= target });
    let comparison = if at_least { ">=" } else { "<=" }.to_owned();
    Goal { goal: name.to_owned(), measured, unit, comparison, target, met, basis }
}

/// The goals, judged from the main shape's points and probes and the ceilings measured beside them.
pub fn judge(points: &[Point], probes: &[Probe], ceilings: &Ceilings) -> Vec<Goal> {
    let main = |w: Workload| points.iter().find(|p| p.workload == w && p.role == Role::Main);
    let ratio = |w, ceiling: Option<f64>| Some(main(w)?.throughput() / ceiling.filter(|c| *c > 0.0)?);
    let hot_tps = ceilings.hot.as_ref().map(|c| c.tps);
    let keys_tps = ceilings.keys.as_ref().map(|c| c.tps);
    let copy_rate = ceilings.copy.as_ref().map(|c| c.rows_per_s);
    let pair_tps = ceilings.pair.as_ref().map(|c| c.tps);
    // Fractions of the HTTP ceiling are in requests per second, whatever the workload counts.
    let http = main(Workload::Http).map(|p| p.requests_per_s).filter(|r| *r > 0.0);
    let of_http = |w| Some(main(w)?.requests_per_s / http?);
    let bulk_at = |connections| {
        let probe = probes.iter().find(|p| {
            p.workload == Workload::Bulk && p.connections == connections && p.route == Route::Nginx
        })?;
        Some(probe.throughput() / copy_rate.filter(|c| *c > 0.0)?)
    };
    // The database workloads: `GET /health/live` does no work behind which nginx's hop could hide, so
    // its probes measure that hop itself (flagged in the probe table, not a stall).
    let worst_nginx = probes
        .iter()
        .filter(|p| p.workload != Workload::Http)
        .filter_map(|p| nginx_over_direct(probes, p.workload, p.connections))
        .max_by(f64::total_cmp);
    let (seed_rps, seed_basis) = match keys_tps {
        Some(tps) => (
            SEED_KEYS_RPS * tps / SEED_PGBENCH_KEYS_TPS,
            format!(
                "the seed's {SEED_KEYS_RPS:.0} req/s beside pgbench's {SEED_PGBENCH_KEYS_TPS:.0} tps (measured together), \
                 scaled by this run's pgbench{}",
                ratio(Workload::Keys, Some(SEED_KEYS_RPS)).map_or(String::new(), |r| format!("; unscaled {r:.2}×"))
            ),
        ),
        None => (SEED_KEYS_RPS, format!("the seed's {SEED_KEYS_RPS:.0} req/s as measured then, unscaled")),
    };
    // These two are judged at the main shape only; the sweeps report theirs beside.
    let at_main: Vec<&Point> = points.iter().filter(|p| p.role == Role::Main).collect();
    let failures: u64 = at_main.iter().map(|p| p.failures()).sum();
    let rss = at_main.iter().map(|p| p.node_rss_max()).max();
    let mismatches = points.iter().filter(|p| !p.check.holds()).count()
        + ceilings
            .hot
            .iter()
            .chain(&ceilings.keys)
            .filter(|c| c.transactions as i64 != c.counter_delta)
            .count()
        + ceilings.copy.iter().filter(|c| c.rows as i64 != c.table_delta).count()
        + probes.iter().filter(|p| !p.check.holds()).count()
        + ceilings
            .reads
            .iter()
            .chain(&ceilings.pair)
            .chain(&ceilings.pairs)
            .filter(|c| c.counter_delta != 0)
            .count();
    vec![
        goal(
            "one hot key ≥ 2× the database's one-transaction-per-increment ceiling",
            ratio(Workload::Hot, hot_tps),
            Unit::Ratio,
            true,
            2.0,
            "pgbench, hot key".into(),
        ),
        goal(
            "1000 keys ≥ 0.7× pgbench's rate for the same transaction",
            ratio(Workload::Keys, keys_tps),
            Unit::Ratio,
            true,
            0.7,
            "pgbench, 1000 keys".into(),
        ),
        goal(
            "1000 keys ≥ 3× the seed",
            ratio(Workload::Keys, Some(seed_rps)),
            Unit::Ratio,
            true,
            3.0,
            seed_basis,
        ),
        goal(
            "bulk insert ≥ 0.8× raw COPY rows/s",
            ratio(Workload::Bulk, copy_rate),
            Unit::Ratio,
            true,
            0.8,
            "psql \\copy".into(),
        ),
        goal(
            "bulk insert at 8 connections ≥ 0.8× raw COPY rows/s",
            bulk_at(8),
            Unit::Ratio,
            true,
            0.8,
            "psql \\copy; the 8-connection probe through nginx".into(),
        ),
        goal(
            "counter reads ≥ 0.35× the HTTP ceiling",
            of_http(Workload::Reads),
            Unit::Ratio,
            true,
            0.35,
            "GET /health/live through nginx, requests/s".into(),
        ),
        goal(
            "hot-key increments ≥ 0.25× the HTTP ceiling",
            of_http(Workload::Hot),
            Unit::Ratio,
            true,
            0.25,
            "GET /health/live through nginx, requests/s".into(),
        ),
        goal(
            "p50 through nginx ≤ 1.5× straight to a node, every database workload",
            worst_nginx,
            Unit::Ratio,
            false,
            NGINX_P50_LIMIT,
            "the worst database workload and connection count of the probes (the HTTP ceiling's own \
             probes time nginx's hop alone)"
                .into(),
        ),
        goal(
            "opposite transfers on one pair ≥ 0.5× pgbench's transfer with rows locked in key order",
            ratio(Workload::Pair, pair_tps),
            Unit::Ratio,
            true,
            0.5,
            "pgbench, the hot pair, key order".into(),
        ),
        goal(
            "zero non-2xx responses in every workload",
            (!at_main.is_empty()).then_some(failures as f64),
            Unit::Count,
            false,
            0.0,
            "every workload at the main shape, warm-up included".into(),
        ),
        goal(
            "a node's resident memory under load ≤ 30 MB",
            rss.map(|b| b as f64),
            Unit::Bytes,
            false,
            NODE_RSS_LIMIT_BYTES as f64,
            "peak VmRSS of any node at the main shape".into(),
        ),
        goal(
            "the database holds exactly what the answers claim",
            Some(mismatches as f64),
            Unit::Count,
            false,
            0.0,
            "points, probes and ceilings whose 2xx increments ≠ counter growth (reads, transfers: ≠ 0) or 2xx rows ≠ new rows"
                .into(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::ceiling::Pgbench;
    use crate::bench::load::Counts;
    use crate::bench::plan::Shape;
    use crate::bench::results::{Check, Latency};

    fn point(workload: Workload, role: Role, requests_per_s: f64) -> Point {
        Point {
            workload,
            shape: Shape { nodes: 4, pool_size: 5 },
            role,
            requests_per_s,
            rows_per_s: None,
            latency_ms: Latency::default(),
            warmup: Counts::default(),
            measured: Counts::default(),
            tail: Counts::default(),
            node_rss_bytes: vec![12 << 20, 31 << 20],
            driver_cpu_cores: 0.1,
            check: Check::default(),
            transfers: None,
        }
    }

    fn pgbench(tps: f64) -> Pgbench {
        Pgbench {
            clients: 20,
            seconds: 10,
            tps,
            transactions: 0,
            failed: 0,
            latency_avg_ms: None,
            counter_delta: 0,
        }
    }

    #[test]
    fn goals_are_ratios_to_the_ceilings_measured_beside_the_main_shape() {
        let mut failing = point(Workload::Keys, Role::Sweep, 100.0);
        failing.tail.status.insert(503, 2);
        let points =
            [point(Workload::Hot, Role::Main, 3400.0), point(Workload::Keys, Role::Main, 4830.0), failing];
        let ceilings =
            Ceilings { hot: Some(pgbench(1700.0)), keys: Some(pgbench(3450.0)), ..Ceilings::default() };
        let goals = judge(&points, &[], &ceilings);
        let find = |prefix: &str| goals.iter().find(|g| g.goal.starts_with(prefix)).unwrap();
        assert_eq!((find("one hot key").measured, find("one hot key").met), (Some(2.0), Some(true)));
        assert_eq!(find("1000 keys ≥ 0.7").measured, Some(1.4));
        // The seed did 1470 beside 6900 tps; beside 3450 tps that is 735, and 4830 is 6.57× that.
        let seed = find("1000 keys ≥ 3×").measured.unwrap();
        assert!((seed - 4830.0 / 735.0).abs() < 1e-9, "{seed}");
        assert_eq!((find("bulk insert").measured, find("bulk insert").met), (None, None));
        assert_eq!(find("zero non-2xx").met, Some(true), "the 503s were in a sweep, reported there");
        assert_eq!(find("a node's resident").met, Some(false), "31 MB is over 30 MB");
    }
}
