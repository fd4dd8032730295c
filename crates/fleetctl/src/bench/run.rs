//! Walking the plan: a fleet per step, the load points and ceilings on it, the consistency checks, and
//! the outputs at the end.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use fleet_local::fleet::{Fleet, FleetOptions};

use super::ceiling;
use super::db::Db;
use super::goals;
use super::load::{self, Load};
use super::plan::{self, Ceiling, Step, Workload};
use super::progress::{mm_ss, Progress};
use super::report::{self, ms, thousands};
use super::requests::{key, Requests, KEY_COUNT};
use super::results::{Ceilings, Check, Latency, Machine, Point, Probe, Results, Route, Settings, Transfers};
use super::rss::Sampler;
use super::BenchArgs;

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let ceilings = args.ceilings.clone().unwrap_or_else(|| plan::default_ceilings(&args.workloads));
    let no_sweep: &[Workload] = &[];
    let steps = plan::plan(&plan::Request {
        workloads: &args.workloads,
        swept: if args.no_sweeps { no_sweep } else { &args.sweep },
        ceilings: &ceilings,
        main: args.at,
        nodes: &args.nodes,
        pool_sizes: &args.pool_size,
        grid: args.grid,
        baseline_env: &args.baseline_env,
    })?;
    let node_bin = crate::up::node_bin()?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    // The first Ctrl-C stops the load and then the fleet cleanly; a second one exits at once (the
    // fleet's processes die with us).
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&stop))?;
        signal_hook::flag::register(signal, Arc::clone(&stop))?;
    }

    let started_unix_s = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let load_before = load_average();
    let mut progress = Progress::new(
        &steps,
        Duration::from_secs(args.warmup + args.duration),
        args.window(),
        (args.probes().len() * 2, probe_warmup(args) + Duration::from_secs(args.probe_duration)),
    );
    eprintln!(
        "bench: {} measurements on {} fleets, about {} (the log below says where it is)",
        progress.total(),
        steps.len(),
        mm_ss(progress.planned().as_secs_f64())
    );
    let mut out = Outcome::default();
    for step in &steps {
        let env_note = if step.env.is_empty() { String::new() } else { " (baseline environment)".to_owned() };
        progress.fleet(&format!("{}{env_note}", step.shape.describe()));
        let mut opts = FleetOptions::new(node_bin.clone());
        opts.nodes = step.shape.nodes;
        opts.pool_size = step.shape.pool_size;
        opts.port = 0;
        opts.prometheus = false;
        opts.quiet = true;
        opts.durable = true;
        // The fleet stops nginx before its nodes, so nodes have no balancer to drain for: no drain delay.
        let no_drain = ("SHUTDOWN_DRAIN_MS".to_owned(), "0".to_owned());
        opts.node_env = std::iter::once(no_drain)
            .chain(args.env.iter().cloned())
            .chain(step.env.iter().cloned())
            .collect();
        let fleet = Fleet::start(opts).context("cannot start the fleet")?;
        let result = run_step(args, step, &fleet, &stop, &mut progress, &mut out);
        let stopped = fleet.stop();
        progress.fleet_done();
        result?;
        stopped.context("cannot stop the fleet")?;
    }

    let ceilings = out.ceilings;
    let goals = goals::judge(&out.points, &out.probes, &ceilings);
    let results = Results {
        command: command_line(),
        started_unix_s,
        elapsed_s: progress.elapsed().as_secs_f64(),
        machine: Machine {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            load_before,
            load_after: load_average(),
            postgres_version: out.postgres_version,
            fsync: out.fsync,
        },
        settings: Settings {
            duration_s: args.duration,
            warmup_s: args.warmup,
            connections: args.connections,
            probe_duration_s: args.probe_duration,
            bulk_rows: args.bulk_rows,
            pgbench_clients: args.pgbench_clients,
            main: args.at,
            node_env: args.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            baseline_env: args.baseline_env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        },
        points: out.points,
        probes: out.probes,
        ceilings,
        goals,
    };
    write(&args.out, &results)?;
    for g in &results.goals {
        let verdict = match g.met {
            Some(true) => "met",
            Some(false) => "NOT met",
            None => "not measured",
        };
        eprintln!("bench goal: {} — {verdict}", g.goal);
    }
    println!("results: {}", args.out.join("results.md").display());
    Ok(())
}

/// What the steps gather.
#[derive(Debug, Default)]
struct Outcome {
    points: Vec<Point>,
    probes: Vec<Probe>,
    ceilings: Ceilings,
    postgres_version: String,
    fsync: String,
}

fn run_step(
    args: &BenchArgs,
    step: &Step,
    fleet: &Fleet,
    stop: &AtomicBool,
    progress: &mut Progress,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let db = Db::from_url(&fleet.database_url())?;
    if out.postgres_version.is_empty() {
        out.postgres_version = db.server_version()?;
        out.fsync = db.fsync()?;
    }
    let address = |url: String| -> anyhow::Result<SocketAddr> {
        url.trim_start_matches("http://").parse().with_context(|| format!("the address of {url}"))
    };
    let addr = address(fleet.url())?;
    let first_node = address(fleet.nodes().first().context("a fleet without nodes")?.url())?;
    let pids: Vec<u32> = fleet.nodes().iter().map(|n| n.pid()).collect();
    let mut pending: Vec<Ceiling> = step.ceilings.clone();
    for &workload in &step.workloads {
        if workload.reads_counters() {
            // Its reads want rows to find (a 404 would count as an error).
            db.ensure_counters(&(1..=KEY_COUNT).map(key).collect::<Vec<_>>())?;
        }
        progress.begin(&format!(
            "{workload} on {}: {} s warm-up + {} s, {} connections",
            step.shape.describe(),
            args.warmup,
            args.duration,
            args.connections
        ));
        let deadlocks_before = deadlocks_retried(fleet)?;
        let requests = Requests::new(workload, args.bulk_rows);
        let sampler = Sampler::start(pids.clone());
        let (outcome, check) = checked_load(
            &db,
            &Load {
                addr,
                connections: args.connections,
                warmup: Duration::from_secs(args.warmup),
                duration: args.window(),
                requests: &requests,
                prefix: "",
                stop,
            },
        )?;
        let node_rss_bytes = sampler.finish();
        let deadlocks = deadlocks_retried(fleet)? - deadlocks_before;
        let window = outcome.window.as_secs_f64();
        let transfers = workload.transfers().then(|| Transfers {
            transfers_per_s: outcome.measured.transfers_ok as f64 / window,
            deadlocks_per_s: deadlocks / outcome.wall.as_secs_f64().max(1e-9),
            attempts_p50: outcome.attempts.value_at_quantile(0.50),
            attempts_p99: outcome.attempts.value_at_quantile(0.99),
        });
        let point = Point {
            workload,
            shape: step.shape,
            role: step.role,
            requests_per_s: outcome.measured.answers() as f64 / window,
            rows_per_s: rows_per_s(workload, &outcome),
            latency_ms: Latency::of(&outcome.latency_us),
            warmup: outcome.warmup,
            measured: outcome.measured,
            tail: outcome.tail,
            node_rss_bytes,
            driver_cpu_cores: outcome.driver_cpu.as_secs_f64() / outcome.wall.as_secs_f64().max(1e-9),
            check,
            transfers,
        };
        progress.end(false, &summary(&point));
        out.points.push(point);
        if step.role == plan::Role::Main {
            for &connections in args.probes() {
                // Through nginx's route pinned to the first node, and to that node itself: the same
                // node does the same work, so the difference is nginx's alone.
                for (route, to, prefix) in
                    [(Route::Nginx, addr, FIRST_NODE_ROUTE), (Route::Direct, first_node, "")]
                {
                    let probe = Load {
                        addr: to,
                        connections,
                        warmup: probe_warmup(args),
                        duration: Duration::from_secs(args.probe_duration),
                        requests: &requests,
                        prefix,
                        stop,
                    };
                    out.probes.push(run_probe(&db, workload, route, &probe, progress)?);
                }
            }
        }
        if let Some(c) = plan::Ceiling::of(workload).filter(|c| pending.contains(c)) {
            pending.retain(|&p| p != c);
            ceiling::measure(args, c, &db, progress, &mut out.ceilings)?;
        }
    }
    for c in pending {
        ceiling::measure(args, c, &db, progress, &mut out.ceilings)?;
    }
    Ok(())
}

/// nginx's route pinned to the fleet's first node (`/app-N/…` reaches node N only).
const FIRST_NODE_ROUTE: &str = "/app-1";

/// The probes' warm-up: at most 1 s.
fn probe_warmup(args: &BenchArgs) -> Duration {
    Duration::from_secs(args.warmup.min(1))
}

/// Runs `load`, checking what the database gained meanwhile against what the answers claim.
fn checked_load(db: &Db, load: &Load) -> anyhow::Result<(load::Outcome, Check)> {
    let before = db.snapshot()?;
    let outcome = load::run(load)?;
    if load.stop.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    let after = db.snapshot()?;
    let total = outcome.total();
    let check = Check {
        increments_ok: total.increments_ok,
        counter_delta: after.counter_sum - before.counter_sum,
        rows_ok: total.rows_ok,
        rows_delta: after.rows - before.rows,
    };
    Ok((outcome, check))
}

/// Rows of 2xx bulk inserts per second of the window, for the workloads that insert rows.
fn rows_per_s(workload: Workload, outcome: &load::Outcome) -> Option<f64> {
    matches!(workload, Workload::Bulk | Workload::Mixed)
        .then(|| outcome.measured.rows_ok as f64 / outcome.window.as_secs_f64())
}

/// One probe: `workload` at few connections through nginx or straight to a node.
fn run_probe(
    db: &Db,
    workload: Workload,
    route: Route,
    load: &Load,
    progress: &mut Progress,
) -> anyhow::Result<Probe> {
    let way = match route {
        Route::Nginx => "through nginx to app-1",
        Route::Direct => "straight to app-1",
    };
    progress.begin(&format!(
        "probe: {workload}, {} connections {way}, {} s",
        load.connections,
        load.duration.as_secs()
    ));
    let (outcome, check) = checked_load(db, load)?;
    let probe = Probe {
        workload,
        connections: load.connections,
        route,
        requests_per_s: outcome.measured.answers() as f64 / outcome.window.as_secs_f64(),
        rows_per_s: rows_per_s(workload, &outcome),
        latency_ms: Latency::of(&outcome.latency_us),
        failures: outcome.total().failures(),
        check,
    };
    let agrees = if check.holds() { "database agrees" } else { "DATABASE DISAGREES (see results.json)" };
    progress.end_probe(&format!(
        "{} req/s, p50 {}, p99 {}, non-2xx {}, {agrees}",
        thousands(probe.requests_per_s),
        ms(probe.latency_ms.p50),
        ms(probe.latency_ms.p99),
        probe.failures
    ));
    Ok(probe)
}

/// The deadlocks every node of `fleet` has detected and retried so far
/// (`fleet_db_transaction_retries_total{sqlstate="40P01"}`, read from each node directly).
fn deadlocks_retried(fleet: &Fleet) -> anyhow::Result<f64> {
    const SAMPLE: &str = r#"fleet_db_transaction_retries_total{sqlstate="40P01"} "#;
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
    let mut total = 0.0;
    for node in fleet.nodes() {
        let url = format!("{}/metrics", node.url());
        let text = agent.get(&url).call().with_context(|| format!("GET {url}"))?.into_string()?;
        total += text.lines().find_map(|l| l.strip_prefix(SAMPLE)?.trim().parse::<f64>().ok()).unwrap_or(0.0);
    }
    Ok(total)
}

fn summary(p: &Point) -> String {
    let throughput = match p.rows_per_s {
        Some(rows) => format!("{} req/s, {} rows/s", thousands(p.requests_per_s), thousands(rows)),
        None => format!("{} req/s", thousands(p.requests_per_s)),
    };
    let check = if p.check.holds() { "database agrees" } else { "DATABASE DISAGREES (see results.json)" };
    let transfers = p.transfers.as_ref().map_or(String::new(), |t| {
        format!(
            ", {} transfers/s, {} 40P01/s, attempts p50 {} p99 {}",
            thousands(t.transfers_per_s),
            thousands(t.deadlocks_per_s),
            t.attempts_p50,
            t.attempts_p99
        )
    });
    format!(
        "{throughput}{transfers}, p50 {}, p99 {}, non-2xx {}, node RSS ≤ {:.1} MB, driver {:.2} cores, {check}",
        ms(p.latency_ms.p50),
        ms(p.latency_ms.p99),
        p.failures(),
        p.node_rss_max() as f64 / 1048576.0,
        p.driver_cpu_cores
    )
}

/// Judges the goals and writes results.json, results.md and the plots again from `dir/results.json`
/// (after a change to the report).
pub fn render_again(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join("results.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut results: Results =
        serde_json::from_str(&text).with_context(|| format!("{} is not a bench result", path.display()))?;
    results.goals = goals::judge(&results.points, &results.probes, &results.ceilings);
    write(dir, &results)?;
    println!("results: {}", dir.join("results.md").display());
    Ok(())
}

fn write(dir: &Path, results: &Results) -> anyhow::Result<()> {
    let put = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    let plots = super::plots::figures(results);
    put("results.json", serde_json::to_string_pretty(results)? + "\n")?;
    put(
        "results.md",
        report::markdown(results, &plots.iter().map(|p| (p.file, p.caption)).collect::<Vec<_>>()),
    )?;
    for stale in super::plots::FILES.iter().filter(|f| !plots.iter().any(|p| p.file == **f)) {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    for plot in plots {
        put(plot.file, plot.svg)?;
    }
    Ok(())
}

/// `fleetctl bench` and its arguments as given (argv[0], a path on this machine, left out).
fn command_line() -> String {
    std::iter::once("fleetctl".to_owned()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" ")
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut fields = text.split_whitespace().map(|f| f.parse().unwrap_or(0.0));
    [(); 3].map(|()| fields.next().unwrap_or(0.0))
}
