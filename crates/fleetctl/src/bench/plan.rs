//! What a `fleetctl bench` run measures and in which order: workloads, fleet shapes (nodes × pool), and
//! the steps (one fleet each) that the run walks through.

use std::fmt;

use anyhow::{bail, ensure};
use serde::{Deserialize, Serialize};

/// One kind of load, driven through nginx.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// `GET /health/live`: the node answers without touching the database. The HTTP ceiling: what
    /// nginx, a node and the load driver do per request with no database work at all.
    Http,
    /// `POST /api/increment` on one key: every request wants the same row lock.
    Hot,
    /// `POST /api/increment` on a key drawn uniformly from 1000 per request.
    Keys,
    /// `GET /api/counters/{key}` on a key drawn uniformly from 1000 per request.
    Reads,
    /// `POST /api/bulk-insert` of `--bulk-rows` rows per request.
    Bulk,
    /// 60 % increments over the 1000 keys, 30 % counter reads, 10 % bulk inserts of a tenth of `--bulk-rows`.
    Mixed,
    /// `POST /api/transfer` of 1 between the two counters of one pair, each request in a random
    /// direction: opposite lock orders on the same two rows (40P01 with the default `LOCK_ORDER`).
    Pair,
    /// `POST /api/transfer` of 1 within one of 1000 pairs drawn per request, in a random direction.
    Pairs,
}

impl Workload {
    pub const ALL: [Workload; 8] = [
        Workload::Http,
        Workload::Hot,
        Workload::Keys,
        Workload::Reads,
        Workload::Bulk,
        Workload::Mixed,
        Workload::Pair,
        Workload::Pairs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Http => "http",
            Workload::Hot => "hot",
            Workload::Keys => "keys",
            Workload::Reads => "reads",
            Workload::Bulk => "bulk",
            Workload::Mixed => "mixed",
            Workload::Pair => "pair",
            Workload::Pairs => "pairs",
        }
    }

    /// What the table calls it.
    pub fn title(self) -> &'static str {
        match self {
            Workload::Http => "HTTP ceiling: GET /health/live (no database)",
            Workload::Hot => "increment, one hot key",
            Workload::Keys => "increment, 1000 keys",
            Workload::Reads => "read a counter, 1000 keys",
            Workload::Bulk => "bulk insert",
            Workload::Mixed => "mixed (60 % increment, 30 % read, 10 % bulk)",
            Workload::Pair => "transfer, one hot pair, opposite directions",
            Workload::Pairs => "transfer, 1000 pairs",
        }
    }

    /// Whether it sends transfers (whose answers carry `attempts`).
    pub fn transfers(self) -> bool {
        matches!(self, Workload::Pair | Workload::Pairs)
    }

    /// Whether it reads counters that must exist (a 404 would count as an error).
    pub fn reads_counters(self) -> bool {
        matches!(self, Workload::Reads | Workload::Mixed)
    }

    /// Whether its throughput is counted in rows (bulk) rather than requests.
    pub fn counts_rows(self) -> bool {
        self == Workload::Bulk
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A fleet's shape: how many nodes, each with how big a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Shape {
    pub nodes: u32,
    pub pool_size: u32,
}

impl Shape {
    /// `1 node × pool 5`, `4 nodes × pool 5`.
    pub fn describe(&self) -> String {
        let plural = if self.nodes == 1 { "" } else { "s" };
        format!("{} node{plural} × pool {}", self.nodes, self.pool_size)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} × {}", self.nodes, self.pool_size)
    }
}

/// Parses `NODESxPOOL`, e.g. `4x5`.
pub fn parse_shape(s: &str) -> Result<Shape, String> {
    let (nodes, pool) =
        s.split_once(['x', 'X', '×']).ok_or_else(|| format!("{s:?} is not NODESxPOOL, e.g. 4x5"))?;
    let number =
        |part: &str| part.trim().parse::<u32>().map_err(|_| format!("{s:?} is not NODESxPOOL, e.g. 4x5"));
    Ok(Shape { nodes: number(nodes)?, pool_size: number(pool)? })
}

/// Which of the database's own ceilings to measure at the main shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Ceiling {
    /// pgbench, one transaction per increment, on the hot key.
    Hot,
    /// pgbench, the same transaction, on a key drawn from 1000.
    Keys,
    /// psql `\copy` into `data`.
    Copy,
    /// pgbench, the `SELECT` a counter read runs, on a key drawn from 1000.
    Reads,
    /// pgbench, the transfer a node runs, on the hot pair, with both rows locked in key order.
    Pair,
    /// pgbench, the same, on a pair drawn from 1000.
    Pairs,
}

impl Ceiling {
    /// The ceiling a workload is compared with.
    pub fn of(workload: Workload) -> Option<Ceiling> {
        match workload {
            Workload::Hot => Some(Ceiling::Hot),
            Workload::Keys => Some(Ceiling::Keys),
            Workload::Reads => Some(Ceiling::Reads),
            Workload::Bulk => Some(Ceiling::Copy),
            Workload::Http | Workload::Mixed => None,
            Workload::Pair => Some(Ceiling::Pair),
            Workload::Pairs => Some(Ceiling::Pairs),
        }
    }
}

/// One fleet and what runs on it, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub shape: Shape,
    pub workloads: Vec<Workload>,
    /// Measured right after the workload they belong to, on the same PostgreSQL.
    pub ceilings: Vec<Ceiling>,
    /// Extra node environment (the baseline step's), on top of `--env`.
    pub env: Vec<(String, String)>,
    /// `main`, `sweep` or `baseline`.
    pub role: Role,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Main,
    Sweep,
    Baseline,
}

/// What the command line asked for.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub workloads: &'a [Workload],
    pub swept: &'a [Workload],
    pub ceilings: &'a [Ceiling],
    pub main: Shape,
    pub nodes: &'a [u32],
    pub pool_sizes: &'a [u32],
    /// Every nodes × pool combination, rather than two lines through `main`.
    pub grid: bool,
    pub baseline_env: &'a [(String, String)],
}

/// The steps: the main shape first (every workload, the ceilings), then the sweeps' other shapes (the
/// swept workloads only), then the baseline if asked for: the increment workloads at the main shape
/// on nodes with other settings (e.g. one transaction per increment), beside the same ceilings.
pub fn plan(req: &Request) -> anyhow::Result<Vec<Step>> {
    ensure!(!req.workloads.is_empty(), "no workloads to run");
    let mut shapes: Vec<Shape> = match req.grid {
        true => req
            .nodes
            .iter()
            .flat_map(|&n| req.pool_sizes.iter().map(move |&p| Shape { nodes: n, pool_size: p }))
            .collect(),
        false => {
            let pools = req.pool_sizes.iter().map(|&p| Shape { nodes: req.main.nodes, pool_size: p });
            let nodes = req.nodes.iter().map(|&n| Shape { nodes: n, pool_size: req.main.pool_size });
            pools.chain(nodes).collect()
        }
    };
    shapes.sort();
    shapes.dedup();
    shapes.retain(|&s| s != req.main);
    for shape in std::iter::once(&req.main).chain(&shapes) {
        if let Err(e) = fleet_local::fleet::check_capacity(shape.nodes, shape.pool_size) {
            bail!("cannot run {shape}: {e}");
        }
    }
    let main_ceilings: Vec<Ceiling> = req.ceilings.to_vec();
    let mut steps = vec![Step {
        shape: req.main,
        workloads: req.workloads.to_vec(),
        ceilings: main_ceilings,
        env: Vec::new(),
        role: Role::Main,
    }];
    let swept: Vec<Workload> = req.workloads.iter().copied().filter(|w| req.swept.contains(w)).collect();
    if !swept.is_empty() {
        steps.extend(shapes.into_iter().map(|shape| Step {
            shape,
            workloads: swept.clone(),
            ceilings: Vec::new(),
            env: Vec::new(),
            role: Role::Sweep,
        }));
    }
    let compared: Vec<Workload> =
        req.workloads.iter().copied().filter(|w| matches!(w, Workload::Hot | Workload::Keys)).collect();
    if !req.baseline_env.is_empty() && !compared.is_empty() {
        steps.push(Step {
            shape: req.main,
            workloads: compared,
            ceilings: Vec::new(),
            env: req.baseline_env.to_vec(),
            role: Role::Baseline,
        });
    }
    Ok(steps)
}

/// The ceilings that match `workloads` (the default of `--ceilings`).
pub fn default_ceilings(workloads: &[Workload]) -> Vec<Ceiling> {
    workloads.iter().filter_map(|&w| Ceiling::of(w)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(workloads: &'a [Workload], swept: &'a [Workload], grid: bool) -> Request<'a> {
        Request {
            workloads,
            swept,
            ceilings: &[Ceiling::Keys],
            main: Shape { nodes: 4, pool_size: 5 },
            nodes: &[1, 2, 4],
            pool_sizes: &[1, 5, 10, 20],
            grid,
            baseline_env: &[],
        }
    }

    #[test]
    fn two_sweeps_pass_through_the_main_shape_which_runs_first_with_every_workload_and_the_ceilings() {
        let steps = plan(&request(&Workload::ALL, &[Workload::Keys], false)).unwrap();
        let shapes: Vec<String> = steps.iter().map(|s| s.shape.to_string()).collect();
        assert_eq!(shapes, ["4 × 5", "1 × 5", "2 × 5", "4 × 1", "4 × 10", "4 × 20"]);
        assert_eq!(steps[0].workloads, Workload::ALL);
        assert_eq!(steps[0].ceilings, [Ceiling::Keys]);
        assert!(steps[1..].iter().all(|s| s.workloads == [Workload::Keys] && s.ceilings.is_empty()));
    }

    #[test]
    fn a_grid_runs_every_combination_once() {
        let steps = plan(&request(&[Workload::Hot], &[Workload::Hot], true)).unwrap();
        assert_eq!(steps.len(), 12);
    }

    #[test]
    fn a_shape_over_max_connections_is_refused_before_anything_starts() {
        let mut req = request(&[Workload::Hot], &[Workload::Hot], false);
        req.pool_sizes = &[5, 30];
        let err = plan(&req).unwrap_err().to_string();
        assert!(err.contains("4 × 30"), "{err}");
    }

    #[test]
    fn shapes_are_read_as_nodes_x_pool() {
        assert_eq!(parse_shape("4x5"), Ok(Shape { nodes: 4, pool_size: 5 }));
        assert!(parse_shape("45").is_err());
    }
}
