//! The database's own ceiling on the same PostgreSQL: pgbench running the transaction a node runs per
//! increment, and psql `\copy` of the rows a bulk insert sends.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::db::{checked, Db};
use super::plan::Ceiling;
use super::progress::Progress;
use super::report::{ms, thousands};
use super::requests::{key, pair, row, HOT_KEY, KEY_COUNT, KEY_STEM, PAIR_COUNT, PAIR_STEM};
use super::results::Ceilings;
use super::BenchArgs;

/// Rows per psql `\copy` of the COPY ceiling.
const COPY_ROWS: usize = 100_000;

/// One pgbench run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pgbench {
    pub clients: u32,
    pub seconds: u64,
    /// Transactions per second, without connection set-up (pgbench's own figure).
    pub tps: f64,
    pub transactions: u64,
    /// Failed transactions (pgbench 15 and later report them; 0 when not reported).
    pub failed: u64,
    pub latency_avg_ms: Option<f64>,
    /// The benchmark counters' sum grew by this much while pgbench ran (must equal `transactions` for
    /// increments, 0 for transfers).
    pub counter_delta: i64,
}

/// Repeated psql `\copy` of one file of rows into `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Copy {
    pub rows: u64,
    pub seconds: f64,
    pub rows_per_s: f64,
    /// `data` grew by this many rows (must equal `rows`).
    pub table_delta: i64,
}

/// Measures one ceiling, with progress, into `ceilings`.
pub fn measure(
    args: &BenchArgs,
    which: Ceiling,
    db: &Db,
    progress: &mut Progress,
    ceilings: &mut Ceilings,
) -> anyhow::Result<()> {
    let clients = args.pgbench_clients;
    let what = match which {
        Ceiling::Hot => {
            format!("ceiling: pgbench, one transaction per increment on {HOT_KEY}, {clients} clients")
        }
        Ceiling::Keys => {
            format!("ceiling: pgbench, one transaction per increment on 1000 keys, {clients} clients")
        }
        Ceiling::Copy => format!("ceiling: psql \\copy of {COPY_ROWS} rows at a time"),
        Ceiling::Reads => format!("ceiling: pgbench, a counter read on 1000 keys, {clients} clients"),
        Ceiling::Pair => {
            format!("ceiling: pgbench, the transfer in key order on one pair, {clients} clients")
        }
        Ceiling::Pairs => {
            format!("ceiling: pgbench, the transfer in key order on 1000 pairs, {clients} clients")
        }
    };
    progress.begin(&format!("{what}, {} s", args.duration));
    let summary = match which {
        Ceiling::Hot | Ceiling::Keys | Ceiling::Reads | Ceiling::Pair | Ceiling::Pairs => {
            let result = pgbench(db, which, clients, args.duration)?;
            let summary = format!(
                "{} tps, {} transactions, {} failed, latency avg {}",
                thousands(result.tps),
                result.transactions,
                result.failed,
                result.latency_avg_ms.map_or("?".into(), ms)
            );
            match which {
                Ceiling::Hot => ceilings.hot = Some(result),
                Ceiling::Keys => ceilings.keys = Some(result),
                Ceiling::Reads => ceilings.reads = Some(result),
                Ceiling::Pair => ceilings.pair = Some(result),
                _ => ceilings.pairs = Some(result),
            }
            summary
        }
        Ceiling::Copy => {
            let result = copy(db, COPY_ROWS, args.duration)?;
            let summary = format!(
                "{} rows/s ({} rows in {:.1} s)",
                thousands(result.rows_per_s),
                result.rows,
                result.seconds
            );
            ceilings.copy = Some(result);
            summary
        }
    };
    progress.end(true, &summary);
    Ok(())
}

/// The increment transaction a node runs, on counter `key_expr` (SQL), as a pgbench script.
pub fn increment_script(hot: bool) -> String {
    let (set, key_expr) = match hot {
        true => (String::new(), format!("'{HOT_KEY}'")),
        false => (format!("\\set k random(1, {KEY_COUNT})\n"), format!("'{KEY_STEM}' || :k")),
    };
    format!(
        "{set}BEGIN;\n\
         SELECT value FROM counters WHERE key = {key_expr} FOR UPDATE;\n\
         UPDATE counters SET value = value + 1, last_modified = now() WHERE key = {key_expr} RETURNING value;\n\
         COMMIT;\n"
    )
}

/// The `SELECT` a node runs for `GET /api/counters/{key}`, on one of the 1000 keys, as a pgbench script.
pub fn read_script() -> String {
    format!("\\set k random(1, {KEY_COUNT})\nSELECT value FROM counters WHERE key = '{KEY_STEM}' || :k;\n")
}

/// The transfer a node runs (lock both rows, take 1 from one and give it to the other), but with the
/// rows locked in key order, so it never deadlocks: on the hot pair (`hot`), else on one of the 1000
/// pairs; each transaction in a random direction.
pub fn transfer_script(hot: bool) -> String {
    let (set, pair) = match hot {
        true => (String::new(), format!("'{PAIR_STEM}0'")),
        false => (format!("\\set p random(1, {PAIR_COUNT})\n"), format!("'{PAIR_STEM}' || :p")),
    };
    let (a, b) = (format!("{pair} || 'a'"), format!("{pair} || 'b'"));
    format!(
        "{set}\\set d random(0, 1)\n\
         BEGIN;\n\
         SELECT value FROM counters WHERE key = {a} FOR UPDATE;\n\
         SELECT value FROM counters WHERE key = {b} FOR UPDATE;\n\
         UPDATE counters SET value = value - (2 * :d - 1), last_modified = now() WHERE key = {a} RETURNING value;\n\
         UPDATE counters SET value = value + (2 * :d - 1), last_modified = now() WHERE key = {b} RETURNING value;\n\
         COMMIT;\n"
    )
}

/// pgbench on one ceiling's transaction and counters for `seconds`.
pub fn pgbench(db: &Db, which: Ceiling, clients: u32, seconds: u64) -> anyhow::Result<Pgbench> {
    let (script_text, keys): (String, Vec<String>) = match which {
        Ceiling::Hot => (increment_script(true), vec![HOT_KEY.to_owned()]),
        Ceiling::Keys => (increment_script(false), (1..=KEY_COUNT).map(key).collect()),
        Ceiling::Reads => (read_script(), (1..=KEY_COUNT).map(key).collect()),
        Ceiling::Pair => (transfer_script(true), pair(0).to_vec()),
        Ceiling::Pairs => (transfer_script(false), (1..=PAIR_COUNT).flat_map(pair).collect()),
        Ceiling::Copy => anyhow::bail!("COPY is not a pgbench ceiling"),
    };
    db.ensure_counters(&keys)?;
    let mut script = tempfile::Builder::new().prefix("bench-").suffix(".sql").tempfile()?;
    script.write_all(script_text.as_bytes())?;
    let before = db.snapshot()?;
    let threads = clients.min(std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
    let output = db
        .command("pgbench")?
        .args(["-n", "-M", "prepared", "-c", &clients.to_string(), "-j", &threads.to_string()])
        .args(["-T", &seconds.to_string(), "-f"])
        .arg(script.path())
        .output()
        .context("cannot run pgbench")?;
    let output = checked(output, "pgbench")?;
    let after = db.snapshot()?;
    let mut result = parse_pgbench(&String::from_utf8_lossy(&output.stdout))?;
    result.clients = clients;
    result.seconds = seconds;
    result.counter_delta = after.counter_sum - before.counter_sum;
    Ok(result)
}

/// The figures of pgbench's summary.
pub fn parse_pgbench(out: &str) -> anyhow::Result<Pgbench> {
    let after = |prefix: &str| out.lines().find_map(|l| l.trim().strip_prefix(prefix).map(str::trim));
    let number = |text: &str| text.split_whitespace().next().and_then(|n| n.parse::<f64>().ok());
    let tps = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tps = "))
        // "without initial connection time" (14+) or "excluding connections establishing" (older).
        .find(|l| l.contains("without") || l.contains("excluding"))
        .and_then(number)
        .with_context(|| format!("no tps in pgbench's output:\n{out}"))?;
    let transactions = after("number of transactions actually processed:")
        .and_then(|t| t.split('/').next())
        .and_then(number)
        .with_context(|| format!("no transaction count in pgbench's output:\n{out}"))?;
    Ok(Pgbench {
        clients: 0,
        seconds: 0,
        tps,
        transactions: transactions as u64,
        failed: after("number of failed transactions:").and_then(number).unwrap_or(0.0) as u64,
        latency_avg_ms: after("latency average =").and_then(number),
        counter_delta: 0,
    })
}

/// psql `\copy` of `rows_per_copy` rows, again and again for `seconds`: rows per second of wall time,
/// psql's start-up included (it is a small part of a copy of 100 000 rows).
pub fn copy(db: &Db, rows_per_copy: usize, seconds: u64) -> anyhow::Result<Copy> {
    let mut file = tempfile::Builder::new().prefix("bench-").suffix(".tsv").tempfile()?;
    {
        let mut out = std::io::BufWriter::new(file.as_file_mut());
        for i in 0..rows_per_copy {
            writeln!(out, "{}\tcopy", row(i))?;
        }
        out.flush()?;
    }
    let command = format!("\\copy data (content, container_id) FROM '{}'", file.path().display());
    let before = db.snapshot()?;
    let start = Instant::now();
    let mut rows = 0;
    while rows == 0 || start.elapsed() < Duration::from_secs(seconds) {
        let output = db.command("psql")?.args(["-X", "-v", "ON_ERROR_STOP=1", "-c", &command]).output();
        let output = checked(output.context("cannot run psql")?, "psql \\copy")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        rows += parse_copy(&stdout).with_context(|| format!("no COPY count in psql's output {stdout:?}"))?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = db.snapshot()?;
    Ok(Copy {
        rows,
        seconds: elapsed,
        rows_per_s: rows as f64 / elapsed,
        table_delta: after.rows - before.rows,
    })
}

/// The count of psql's `COPY 100000`.
fn parse_copy(out: &str) -> Option<u64> {
    out.lines().find_map(|l| l.trim().strip_prefix("COPY ")?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PGBENCH_15: &str = "\
pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: bench-x.sql
scaling factor: 1
query mode: prepared
number of clients: 20
number of threads: 2
maximum number of tries: 1
duration: 10 s
number of transactions actually processed: 68917
number of failed transactions: 0 (0.000%)
latency average = 2.901 ms
initial connection time = 21.496 ms
tps = 6894.374529 (without initial connection time)
";

    #[test]
    fn pgbench_summary_gives_tps_without_connection_time_transactions_and_failures() {
        let result = parse_pgbench(PGBENCH_15).unwrap();
        assert_eq!(result.tps, 6894.374529);
        assert_eq!(result.transactions, 68917);
        assert_eq!(result.failed, 0);
        assert_eq!(result.latency_avg_ms, Some(2.901));
    }

    #[test]
    fn older_pgbench_output_and_a_broken_one_are_told_apart() {
        let old = "number of transactions actually processed: 500/500\n\
                   tps = 1700.5 (including connections establishing)\n\
                   tps = 1712.25 (excluding connections establishing)\n";
        let result = parse_pgbench(old).unwrap();
        assert_eq!((result.tps, result.transactions), (1712.25, 500));
        assert!(parse_pgbench("pgbench: error: connection refused").is_err());
    }

    #[test]
    fn the_scripts_lock_then_update_the_same_counter_in_one_transaction() {
        let keys = increment_script(false);
        assert!(keys.starts_with("\\set k random(1, 1000)\nBEGIN;"), "{keys}");
        assert!(keys.contains("WHERE key = 'bench-k' || :k FOR UPDATE"), "{keys}");
        assert!(increment_script(true).contains("WHERE key = 'bench-hot' FOR UPDATE"));
        assert_eq!(
            read_script(),
            "\\set k random(1, 1000)\nSELECT value FROM counters WHERE key = 'bench-k' || :k;\n"
        );
    }

    #[test]
    fn the_transfer_ceiling_locks_both_rows_in_key_order_before_it_moves_one() {
        let pairs = transfer_script(false);
        assert!(pairs.starts_with("\\set p random(1, 1000)\n\\set d random(0, 1)\nBEGIN;"), "{pairs}");
        let a = pairs.find("'bench-t' || :p || 'a' FOR UPDATE").unwrap();
        let b = pairs.find("'bench-t' || :p || 'b' FOR UPDATE").unwrap();
        let update = pairs.find("UPDATE counters").unwrap();
        assert!(a < b && b < update, "{pairs}");
        assert!(transfer_script(true).contains("WHERE key = 'bench-t0' || 'a' FOR UPDATE"));
    }

    #[test]
    fn psql_copy_reports_its_row_count() {
        assert_eq!(parse_copy("COPY 100000\n"), Some(100_000));
        assert_eq!(parse_copy(""), None);
    }
}
