//! `fleetctl logs [NODE] [--follow]`: the output of a fleet's components, from `<dir>/logs/<name>.log`
//! (each start begins them afresh; they stay after the fleet stops). Without NODE, every component's,
//! each line prefixed `[name] `.

use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context};
use clap::Args;

/// How often `--follow` looks for new lines.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// A node (`app-2` or `2`) or another component: `postgres`, `nginx`, `prometheus`,
    /// `postgres-exporter`. All of them when left out.
    node: Option<String>,
    /// Keep printing new lines as they come (until Ctrl-C).
    #[arg(long, short)]
    follow: bool,
    /// The fleet's directory (as given to `up`).
    #[arg(long, default_value = ".fleet")]
    dir: PathBuf,
}

/// One component's log and how far it has been printed.
#[derive(Debug)]
struct Log {
    name: String,
    path: PathBuf,
    printed: u64,
}

pub fn run(args: LogsArgs) -> anyhow::Result<()> {
    let dir = args.dir.join("logs");
    let mut logs = find_logs(&dir)?;
    let names = logs.iter().map(|log| log.name.clone()).collect::<Vec<_>>().join(", ");
    if let Some(wanted) = &args.node {
        let wanted = match wanted.parse::<u32>() {
            Ok(n) => format!("app-{n}"),
            Err(_) => wanted.clone(),
        };
        logs.retain(|log| log.name == wanted);
        ensure!(!logs.is_empty(), "no log for {wanted:?} in {}; there are: {names}", dir.display());
    }
    let prefixed = logs.len() > 1;
    let mut out = std::io::stdout().lock();
    loop {
        for log in &mut logs {
            match print_new_lines(log, prefixed, &mut out) {
                Err(error) if error.kind() == ErrorKind::BrokenPipe => return Ok(()),
                result => result.with_context(|| format!("cannot read {}", log.path.display()))?,
            }
        }
        if !args.follow {
            return Ok(());
        }
        std::thread::sleep(FOLLOW_INTERVAL);
    }
}

/// Every `*.log` in `dir`: PostgreSQL first, then the nodes in order, then the rest by name.
fn find_logs(dir: &Path) -> anyhow::Result<Vec<Log>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("no logs in {} (has `fleetctl up --dir` run there?)", dir.display()))?;
    let mut logs: Vec<Log> = entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let path = entry.path();
            let name = path.file_name()?.to_str()?.strip_suffix(".log")?.to_owned();
            Some(Log { name, path, printed: 0 })
        })
        .collect();
    logs.sort_by_key(|log| sort_key(&log.name));
    Ok(logs)
}

fn sort_key(name: &str) -> (u8, u32, String) {
    match (name, name.strip_prefix("app-").and_then(|n| n.parse().ok())) {
        ("postgres", _) => (0, 0, String::new()),
        (_, Some(n)) => (1, n, String::new()),
        _ => (2, 0, name.to_owned()),
    }
}

/// Prints the whole lines added to `log` since the last call. A file that shrank (a new start of the
/// fleet) is printed from its beginning; a missing one is skipped.
fn print_new_lines(log: &mut Log, prefixed: bool, out: &mut impl Write) -> std::io::Result<()> {
    let mut file = match File::open(&log.path) {
        Ok(file) => file,
        Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    if file.metadata()?.len() < log.printed {
        log.printed = 0;
    }
    file.seek(SeekFrom::Start(log.printed))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let Some(end) = bytes.iter().rposition(|&b| b == b'\n') else {
        return Ok(());
    };
    for line in String::from_utf8_lossy(&bytes[..end]).lines() {
        match prefixed {
            true => writeln!(out, "[{}] {line}", log.name)?,
            false => writeln!(out, "{line}")?,
        }
    }
    log.printed += end as u64 + 1;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_lines_are_printed_and_the_rest_waits_for_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app-1.log");
        std::fs::write(&path, "one\ntw").unwrap();
        let mut log = Log { name: "app-1".into(), path: path.clone(), printed: 0 };
        let mut out = Vec::new();
        print_new_lines(&mut log, true, &mut out).unwrap();
        std::fs::write(&path, "one\ntwo\n").unwrap();
        print_new_lines(&mut log, true, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "[app-1] one\n[app-1] two\n");
    }

    #[test]
    fn postgres_comes_first_then_nodes_in_order() {
        let mut names = ["nginx", "app-10", "app-2", "postgres", "prometheus", "app-1"];
        names.sort_by_key(|name| sort_key(name));
        assert_eq!(names, ["postgres", "app-1", "app-2", "app-10", "nginx", "prometheus"]);
    }
}
