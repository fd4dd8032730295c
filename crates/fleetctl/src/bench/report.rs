//! `results.md`: the run's main table (every workload at the main shape beside the database's ceiling),
//! the goals, the sweeps and the plots, for people and for the README.

use std::fmt::Write as _;

use super::goals::{Goal, Unit, NGINX_P50_LIMIT};
use super::plan::{Role, Workload};
use super::results::{nginx_over_direct, Point, Probe, Results, Route, Settings, Transfers};

/// The report; `plots` are the `(file, caption)` of the figures written next to it.
pub fn markdown(r: &Results, plots: &[(&str, &str)]) -> String {
    let mut md = String::new();
    let s = &r.settings;
    let m = &r.machine;
    let _ = writeln!(md, "# pgfleet benchmark\n");
    let _ = writeln!(
        md,
        "`{}` — {} UTC, {:.0} s in all. Each point: {} s warm-up, then {} s measured with {} HTTP/1.1 \
         keep-alive connections through nginx (closed loop). PostgreSQL {} with fsync {}, on {} CPUs; load \
         average {} when it started ({} at the end, the run's own processes included). Ceilings on the same PostgreSQL, right after their workload: pgbench \
         ({} clients, `-M prepared`) and psql `\\copy`.\n",
        r.command,
        utc(r.started_unix_s),
        r.elapsed_s,
        s.warmup_s,
        s.duration_s,
        s.connections,
        m.postgres_version,
        m.fsync,
        m.cpus,
        load(m.load_before),
        load(m.load_after),
        s.pgbench_clients,
    );
    if !s.node_env.is_empty() {
        let _ = writeln!(md, "Node environment: `{}`.\n", s.node_env.join(" "));
    }
    let _ = writeln!(md, "## {}\n", s.main.describe());
    md.push_str(
        "| workload | nodes × pool | throughput | × HTTP | p50 | p99 | non-2xx | ceiling | ratio | goal | met? |\n",
    );
    md.push_str("|---|---|--:|--:|--:|--:|--:|---|--:|---|---|\n");
    let http = r
        .points
        .iter()
        .find(|p| p.workload == Workload::Http && p.role == Role::Main)
        .map(|p| p.requests_per_s)
        .filter(|h| *h > 0.0);
    for point in r.points.iter().filter(|p| p.role != Role::Sweep) {
        let (ceiling, mut goal) = ceiling_of(r, point.workload);
        if point.role == Role::Baseline {
            goal = None;
        }
        let ratio = ceiling_value(r, point.workload)
            .map_or("—".into(), |c| format!("{:.2}×", point.throughput() / c));
        let (target, met) = match goal {
            Some(g) => (format!("≥ {}×", g.target), met_text(g)),
            None => ("—".into(), "—".into()),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {ceiling} | {ratio} | {target} | {met} |",
            title(point, &r.settings),
            point.shape,
            throughput(point),
            http.map_or("—".into(), |h| format!("{:.2}×", point.requests_per_s / h)),
            ms(point.latency_ms.p50),
            ms(point.latency_ms.p99),
            failures(point),
        );
    }
    md.push_str(
        "\n× HTTP: requests per second as a fraction of the HTTP ceiling's (`GET /health/live` through \
         nginx, no database) in the same run.\n",
    );
    probes(&mut md, r);
    transfers(&mut md, r);
    md.push_str("\n## Goals\n\n| goal | measured | target | met? | against |\n|---|--:|--:|---|---|\n");
    for g in &r.goals {
        let figure = |v: f64| match g.unit {
            Unit::Ratio => format!("{v:.2}×"),
            Unit::Count => format!("{v:.0}"),
            Unit::Bytes => format!("{:.1} MB", v / 1048576.0),
        };
        let measured = g.measured.map_or("not measured".into(), figure);
        let target = format!("{} {}", if g.comparison == ">=" { "≥" } else { "≤" }, figure(g.target));
        let _ = writeln!(md, "| {} | {measured} | {target} | {} | {} |", g.goal, met_text(g), g.basis);
    }
    let elsewhere: Vec<&Point> = r.points.iter().filter(|p| p.role != Role::Main).collect();
    if let Some(worst) = elsewhere.iter().max_by_key(|p| p.node_rss_max()) {
        let failures: u64 = elsewhere.iter().map(|p| p.failures()).sum();
        let _ = writeln!(
            md,
            "\nAway from the main shape: {failures} non-2xx in all; the largest node RSS was {:.1} MB ({} on {}).",
            worst.node_rss_max() as f64 / 1048576.0,
            worst.workload,
            worst.shape
        );
    }
    sweep(&mut md, r, "Pool-size sweep", |p| p.shape.nodes == s.main.nodes);
    sweep(&mut md, r, "Node-count sweep", |p| p.shape.pool_size == s.main.pool_size);
    if !plots.is_empty() {
        md.push_str("\n## Plots\n\n");
    }
    for (file, caption) in plots {
        let _ = writeln!(md, "![{caption}]({file})\n");
    }
    md.push_str("Raw figures, every status and error code, and the consistency checks: `results.json`.\n");
    md
}

/// The probes: each workload at few connections through nginx and straight to a node, p50 beside p50.
fn probes(md: &mut String, r: &Results) {
    let mut nginx: Vec<&Probe> = r.probes.iter().filter(|p| p.route == Route::Nginx).collect();
    if nginx.is_empty() {
        return;
    }
    nginx.sort_by_key(|p| (p.connections, p.workload));
    let _ = writeln!(
        md,
        "\n## Latency without parallelism\n\nEach workload again for {} s at a few connections, through nginx's \
         route pinned to app-1 (`/app-1/…`) and straight to app-1, so the same node does the same work and the \
         difference is nginx's; **flagged** where the p50 through nginx is over {NGINX_P50_LIMIT}× the direct one.\n",
        r.settings.probe_duration_s
    );
    md.push_str("| workload | connections | throughput (nginx) | p50 nginx | p99 nginx | p50 direct | p99 direct | nginx ÷ direct (p50) | nginx − direct (p50) | non-2xx |\n");
    md.push_str("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for p in nginx {
        let direct = r
            .probes
            .iter()
            .find(|d| d.route == Route::Direct && d.workload == p.workload && d.connections == p.connections);
        let (d50, d99) =
            direct.map_or(("—".into(), "—".into()), |d| (ms(d.latency_ms.p50), ms(d.latency_ms.p99)));
        // What nginx adds: a hop (tenths of a millisecond), or a stall (tens).
        let added =
            direct.map_or("—".into(), |d| format!("{:+.2} ms", p.latency_ms.p50 - d.latency_ms.p50));
        let ratio = nginx_over_direct(&r.probes, p.workload, p.connections).map_or("—".into(), |x| match x
            > NGINX_P50_LIMIT
        {
            true => format!("**{x:.2}× flagged**"),
            false => format!("{x:.2}×"),
        });
        let unit = if p.workload.counts_rows() { "rows/s" } else { "req/s" };
        let failures = p.failures + direct.map_or(0, |d| d.failures);
        let _ = writeln!(
            md,
            "| {} | {} | {} {unit} | {} | {} | {d50} | {d99} | {ratio} | {added} | {failures} |",
            p.workload.name(),
            p.connections,
            thousands(p.throughput()),
            ms(p.latency_ms.p50),
            ms(p.latency_ms.p99),
        );
    }
}

/// The transfer workloads' own figures: deadlocks the nodes retried, and attempts per transfer.
fn transfers(md: &mut String, r: &Results) {
    let points: Vec<(&Point, &Transfers)> =
        r.points.iter().filter_map(|p| Some((p, p.transfers.as_ref()?))).collect();
    if points.is_empty() {
        return;
    }
    md.push_str("\n## Transfers\n\n");
    md.push_str("| workload | nodes × pool | transfers/s | 40P01/s (retried) | attempts p50 | attempts p99 | non-2xx |\n");
    md.push_str("|---|---|--:|--:|--:|--:|--:|\n");
    for (p, t) in points {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} |",
            p.workload.title(),
            p.shape,
            thousands(t.transfers_per_s),
            thousands(t.deadlocks_per_s),
            t.attempts_p50,
            t.attempts_p99,
            failures(p)
        );
    }
}

/// The sweep's points (role main or sweep, passing `filter`), by workload then shape.
fn sweep(md: &mut String, r: &Results, heading: &str, filter: impl Fn(&Point) -> bool) {
    let mut points: Vec<&Point> = r.points.iter().filter(|p| p.role != Role::Baseline && filter(p)).collect();
    points.sort_by_key(|p| (p.workload, p.shape));
    let swept: Vec<Workload> = points.iter().map(|p| p.workload).collect();
    let multi = |w: Workload| swept.iter().filter(|&&x| x == w).count() > 1;
    points.retain(|p| multi(p.workload));
    if points.is_empty() {
        return;
    }
    let _ = writeln!(md, "\n## {heading}\n");
    md.push_str("| workload | nodes × pool | throughput | p50 | p99 | non-2xx | node RSS (peak) |\n");
    md.push_str("|---|---|--:|--:|--:|--:|--:|\n");
    for p in points {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {:.1} MB |",
            p.workload.name(),
            p.shape,
            throughput(p),
            ms(p.latency_ms.p50),
            ms(p.latency_ms.p99),
            failures(p),
            p.node_rss_max() as f64 / 1048576.0
        );
    }
}

/// The ceiling a workload is compared with, and the goal that compares them.
fn ceiling_of(r: &Results, workload: Workload) -> (String, Option<&Goal>) {
    let goal = |prefix: &str| r.goals.iter().find(|g| g.goal.starts_with(prefix));
    let name = r.ceilings.of(workload).map_or("—".into(), |(_, name)| name);
    let goal = match workload {
        Workload::Hot => goal("one hot key ≥ 2×"),
        Workload::Keys => goal("1000 keys ≥ 0.7"),
        Workload::Bulk => goal("bulk insert ≥"),
        Workload::Pair => goal("opposite transfers"),
        Workload::Http | Workload::Reads | Workload::Mixed | Workload::Pairs => None,
    };
    (name, goal)
}

fn title(point: &Point, s: &Settings) -> String {
    let title = match point.workload {
        Workload::Bulk => format!("bulk insert, {} rows/request", s.bulk_rows),
        w => w.title().to_owned(),
    };
    match point.role {
        Role::Baseline => format!("{title} — baseline nodes (`{}`)", s.baseline_env.join(" ")),
        _ => title,
    }
}

/// The ceiling's figure for `workload`, in its throughput's unit.
fn ceiling_value(r: &Results, workload: Workload) -> Option<f64> {
    r.ceilings.of(workload).map(|(value, _)| value)
}

fn throughput(p: &Point) -> String {
    match p.workload.counts_rows() {
        true => format!("{} rows/s ({} req/s)", thousands(p.throughput()), thousands(p.requests_per_s)),
        false => format!("{} req/s", thousands(p.requests_per_s)),
    }
}

fn failures(p: &Point) -> String {
    let total = p.failures();
    let mut codes = p.warmup.clone();
    codes.merge(&p.measured);
    codes.merge(&p.tail);
    match total {
        0 => "0".into(),
        _ => {
            let detail: Vec<String> = codes.error_codes.iter().map(|(c, n)| format!("{c}: {n}")).collect();
            format!("{total} ({})", detail.join(", "))
        }
    }
}

fn met_text(g: &Goal) -> String {
    match g.met {
        Some(true) => "yes".into(),
        Some(false) => "**no**".into(),
        None => "—".into(),
    }
}

pub fn ms(v: f64) -> String {
    match v {
        v if v >= 100.0 => format!("{v:.0} ms"),
        v if v >= 10.0 => format!("{v:.1} ms"),
        v => format!("{v:.2} ms"),
    }
}

/// `1234567.8` → `1,234,568`.
pub fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn load(l: [f64; 3]) -> String {
    format!("{:.2} / {:.2} / {:.2}", l[0], l[1], l[2])
}

/// `YYYY-MM-DD HH:MM` of a Unix time (days to civil date: Howard Hinnant's algorithm).
pub fn utc(unix_s: u64) -> String {
    let (days, secs) = ((unix_s / 86400) as i64, unix_s % 86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}", secs / 3600, secs % 3600 / 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_with_separators_and_three_digits() {
        assert_eq!(thousands(256_000.4), "256,000");
        assert_eq!(thousands(640.0), "640");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(ms(2.345), "2.35 ms");
        assert_eq!(ms(123.4), "123 ms");
    }

    #[test]
    fn unix_times_become_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00");
        assert_eq!(utc(951_782_400 + 3600 * 13 + 60 * 5), "2000-02-29 13:05");
    }
}
