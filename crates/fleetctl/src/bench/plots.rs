//! The report's three figures: throughput against pool size, against node count (one panel per swept
//! workload, the database's ceiling as a dashed line), and the latency percentiles at the main shape.

use std::collections::BTreeSet;

use super::plan::{Role, Shape, Workload};
use super::results::{Point, Results};
use super::svg::{Chart, Figure, LegendEntry, Panel, Series, CEILING_COLOR, COLORS};

/// A figure to write: its file name, what it shows, and the SVG.
#[derive(Debug)]
pub struct Plot {
    pub file: &'static str,
    pub caption: &'static str,
    pub svg: String,
}

/// Every figure's file name (a run that has nothing to show for one removes an older copy).
pub const FILES: [&str; 3] = ["throughput-vs-pool.svg", "throughput-vs-nodes.svg", "latency.svg"];

/// Every figure that has something to show (a sweep needs two points of one workload).
pub fn figures(r: &Results) -> Vec<Plot> {
    let by_pool = sweep(r, "pool size (connections per node)", |s| s.nodes, |s| s.pool_size, "nodes");
    let by_nodes = sweep(r, "node count", |s| s.pool_size, |s| s.nodes, "pool");
    [
        (FILES[0], "Throughput against pool size", by_pool),
        (FILES[1], "Throughput against node count", by_nodes),
        (FILES[2], "Latency percentiles", latency(r)),
    ]
    .into_iter()
    .filter(|(_, _, figure)| !figure.panels.is_empty())
    .map(|(file, caption, figure)| Plot { file, caption, svg: figure.render() })
    .collect()
}

/// One panel per workload with more than one point along `x`; one series per value of `line`.
fn sweep(
    r: &Results,
    x_label: &str,
    line: fn(&Shape) -> u32,
    x: fn(&Shape) -> u32,
    line_name: &str,
) -> Figure {
    let points: Vec<&Point> = r.points.iter().filter(|p| p.role != Role::Baseline).collect();
    let lines: BTreeSet<u32> = points.iter().map(|p| line(&p.shape)).collect();
    let color = |value: u32| COLORS[lines.iter().position(|&v| v == value).unwrap_or(0) % COLORS.len()];
    let mut legend: Vec<LegendEntry> = Vec::new();
    let mut panels = Vec::new();
    for workload in Workload::ALL {
        let mut series = Vec::new();
        let mut x_ticks = BTreeSet::new();
        for &value in &lines {
            let mut along: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.workload == workload && line(&p.shape) == value)
                .map(|p| (f64::from(x(&p.shape)), p.throughput()))
                .collect();
            if along.len() < 2 {
                continue;
            }
            along.sort_by(|a, b| a.0.total_cmp(&b.0));
            x_ticks.extend(along.iter().map(|p| p.0 as u32));
            let name = match line_name {
                "nodes" => format!("{value} nodes"),
                _ => format!("pool {value}"),
            };
            if !legend.iter().any(|e| e.label == name) {
                legend.push(LegendEntry { label: name.clone(), color: color(value).into(), dashed: false });
            }
            series.push(Series {
                name,
                color: color(value).into(),
                dashed: false,
                points: along,
                end_label: None,
            });
        }
        if series.is_empty() {
            continue;
        }
        let right = x_ticks.iter().copied().max().map_or(1.0, f64::from);
        if let Some((value, label)) = r.ceilings.of(workload) {
            series.push(Series {
                name: "ceiling".into(),
                color: CEILING_COLOR.into(),
                dashed: true,
                points: vec![(0.0, value), (right * 1.08, value)],
                end_label: Some(label),
            });
        }
        panels.push(Panel {
            title: panel_title(workload, r.settings.bulk_rows),
            x_label: x_label.into(),
            y_label: unit(workload).into(),
            chart: Chart::Lines { series, x_ticks: x_ticks.into_iter().map(f64::from).collect() },
        });
    }
    if panels
        .iter()
        .any(|p| matches!(&p.chart, Chart::Lines { series, .. } if series.iter().any(|s| s.dashed)))
    {
        legend.push(LegendEntry {
            label: "PostgreSQL's own ceiling, same database (pgbench / psql \\copy)".into(),
            color: CEILING_COLOR.into(),
            dashed: true,
        });
    }
    let title =
        format!("Throughput against {x_label} — {} connections through nginx", r.settings.connections);
    Figure { title, panels, legend }
}

fn latency(r: &Results) -> Figure {
    let main = r.settings.main;
    let panels = r
        .points
        .iter()
        .filter(|p| p.role == Role::Main)
        .enumerate()
        .map(|(i, p)| {
            let l = &p.latency_ms;
            Panel {
                title: panel_title(p.workload, r.settings.bulk_rows),
                x_label: "percentile".into(),
                y_label: "latency (ms)".into(),
                chart: Chart::Bars {
                    labels: ["p50", "p90", "p99", "p99.9"].map(String::from).to_vec(),
                    values: vec![l.p50, l.p90, l.p99, l.p999],
                    color: COLORS[i % COLORS.len()].into(),
                },
            }
        })
        .collect();
    let title = format!(
        "Latency per request at {}, {} connections (send to last byte, through nginx)",
        main.describe(),
        r.settings.connections
    );
    Figure { title, panels, legend: Vec::new() }
}

fn panel_title(workload: Workload, bulk_rows: usize) -> String {
    match workload {
        Workload::Bulk => format!("bulk insert, {bulk_rows} rows/request"),
        Workload::Mixed => "mixed".into(),
        w => w.title().into(),
    }
}

fn unit(workload: Workload) -> &'static str {
    match workload.counts_rows() {
        true => "rows inserted per second",
        false => "requests per second",
    }
}
