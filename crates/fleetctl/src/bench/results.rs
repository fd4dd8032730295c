//! What a run found, as written to `results.json`: the points, the probes, the ceilings and the goals.

use serde::{Deserialize, Serialize};

use super::ceiling::{Copy, Pgbench};
use super::goals::Goal;
use super::load::Counts;
use super::plan::{Role, Shape, Workload};
use super::report::thousands;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// How the run was started (`fleetctl bench …`).
    pub command: String,
    pub started_unix_s: u64,
    pub elapsed_s: f64,
    pub machine: Machine,
    pub settings: Settings,
    pub points: Vec<Point>,
    /// Every workload at the main shape again at a few connections, through nginx and straight to a
    /// node (runs before this field existed have none).
    #[serde(default)]
    pub probes: Vec<Probe>,
    pub ceilings: Ceilings,
    pub goals: Vec<Goal>,
}

/// Which way a probe's requests went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Through nginx, on its route pinned to the first node (`/app-1/…`).
    Nginx,
    /// Straight to the first node, no balancer.
    Direct,
}

/// One workload at the main shape at few connections, so a stall cannot hide behind parallelism.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Probe {
    pub workload: Workload,
    pub connections: usize,
    pub route: Route,
    pub requests_per_s: f64,
    /// Rows of 2xx bulk inserts per second (bulk and mixed).
    pub rows_per_s: Option<f64>,
    pub latency_ms: Latency,
    /// Non-2xx answers and unanswered requests, warm-up and tail included.
    pub failures: u64,
    pub check: Check,
}

impl Probe {
    /// rows/s for bulk, requests/s otherwise (as [`Point::throughput`]).
    pub fn throughput(&self) -> f64 {
        match self.workload.counts_rows() {
            true => self.rows_per_s.unwrap_or(0.0),
            false => self.requests_per_s,
        }
    }
}

/// p50 through nginx over p50 straight to a node, for the same workload and connections.
pub fn nginx_over_direct(probes: &[Probe], workload: Workload, connections: usize) -> Option<f64> {
    let p50 = |route| {
        probes
            .iter()
            .find(|p| p.workload == workload && p.connections == connections && p.route == route)
            .map(|p| p.latency_ms.p50)
    };
    Some(p50(Route::Nginx)? / p50(Route::Direct).filter(|d| *d > 0.0)?)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    /// 1, 5 and 15 minute load averages when the run started and when it ended.
    pub load_before: [f64; 3],
    pub load_after: [f64; 3],
    pub postgres_version: String,
    pub fsync: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub duration_s: u64,
    pub warmup_s: u64,
    pub connections: usize,
    /// Seconds measured per probe (0 in runs from before the probes).
    #[serde(default)]
    pub probe_duration_s: u64,
    pub bulk_rows: usize,
    pub pgbench_clients: u32,
    pub main: Shape,
    pub node_env: Vec<String>,
    pub baseline_env: Vec<String>,
}

/// One workload on one fleet shape.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    pub workload: Workload,
    pub shape: Shape,
    pub role: Role,
    /// Answers per second in the measured window (every status).
    pub requests_per_s: f64,
    /// Rows of 2xx bulk inserts per second in the window (bulk and mixed).
    pub rows_per_s: Option<f64>,
    pub latency_ms: Latency,
    pub warmup: Counts,
    pub measured: Counts,
    pub tail: Counts,
    /// Peak resident memory of each node while the point ran.
    pub node_rss_bytes: Vec<u64>,
    /// The load driver's CPU use in cores (its CPU time over its wall time): what it took from the
    /// machine the fleet runs on.
    pub driver_cpu_cores: f64,
    /// What the answers claim against what the database holds afterwards.
    pub check: Check,
    /// The transfer workloads' own figures.
    #[serde(default)]
    pub transfers: Option<Transfers>,
}

/// What a transfer workload's measured window saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Transfers {
    /// 2xx transfers per second.
    pub transfers_per_s: f64,
    /// Deadlocks the nodes detected and retried per second (`fleet_db_transaction_retries_total
    /// {sqlstate="40P01"}` over every node, before and after the load, warm-up and tail included).
    pub deadlocks_per_s: f64,
    /// Attempts per 2xx transfer (its answer's `attempts`), median and 99th percentile.
    pub attempts_p50: u64,
    pub attempts_p99: u64,
}

impl Point {
    /// The figure a workload is judged by: rows/s for bulk, requests/s otherwise.
    pub fn throughput(&self) -> f64 {
        match self.workload.counts_rows() {
            true => self.rows_per_s.unwrap_or(0.0),
            false => self.requests_per_s,
        }
    }

    /// Non-2xx answers and unanswered requests over warm-up, window and tail.
    pub fn failures(&self) -> u64 {
        self.warmup.failures() + self.measured.failures() + self.tail.failures()
    }

    pub fn node_rss_max(&self) -> u64 {
        self.node_rss_bytes.iter().copied().max().unwrap_or(0)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    pub fn of(histogram: &hdrhistogram::Histogram<u64>) -> Latency {
        let ms = |us: u64| us as f64 / 1000.0;
        if histogram.is_empty() {
            return Latency::default();
        }
        Latency {
            p50: ms(histogram.value_at_quantile(0.50)),
            p90: ms(histogram.value_at_quantile(0.90)),
            p99: ms(histogram.value_at_quantile(0.99)),
            p999: ms(histogram.value_at_quantile(0.999)),
            max: ms(histogram.max()),
            mean: histogram.mean() / 1000.0,
        }
    }
}

/// 2xx increments and the growth of the benchmark counters' sum; 2xx bulk rows and the growth of `data`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub increments_ok: u64,
    pub counter_delta: i64,
    pub rows_ok: u64,
    pub rows_delta: i64,
}

impl Check {
    pub fn holds(&self) -> bool {
        self.increments_ok as i64 == self.counter_delta && self.rows_ok as i64 == self.rows_delta
    }
}

impl Ceilings {
    /// The ceiling `workload` is compared with, in its throughput's unit, and how the report names it.
    pub fn of(&self, workload: Workload) -> Option<(f64, String)> {
        let tps = |p: &Pgbench| (p.tps, format!("pgbench {} tps", thousands(p.tps)));
        match workload {
            Workload::Hot => self.hot.as_ref().map(tps),
            Workload::Keys => self.keys.as_ref().map(tps),
            Workload::Reads => self.reads.as_ref().map(tps),
            Workload::Bulk => {
                self.copy.as_ref().map(|c| (c.rows_per_s, format!("COPY {} rows/s", thousands(c.rows_per_s))))
            }
            Workload::Http | Workload::Mixed => None,
            Workload::Pair | Workload::Pairs => self
                .transfers(workload)
                .map(|p| (p.tps, format!("pgbench {} tps (key order)", thousands(p.tps)))),
        }
    }

    /// The pgbench ceiling of a transfer workload.
    pub fn transfers(&self, workload: Workload) -> Option<&Pgbench> {
        match workload {
            Workload::Pair => self.pair.as_ref(),
            Workload::Pairs => self.pairs.as_ref(),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ceilings {
    pub hot: Option<Pgbench>,
    pub keys: Option<Pgbench>,
    pub copy: Option<Copy>,
    /// pgbench on the counter read (`counter_delta` must be 0).
    #[serde(default)]
    pub reads: Option<Pgbench>,
    /// The transfer ceilings (transfers keep the counters' sum: `counter_delta` must be 0).
    #[serde(default)]
    pub pair: Option<Pgbench>,
    #[serde(default)]
    pub pairs: Option<Pgbench>,
}
