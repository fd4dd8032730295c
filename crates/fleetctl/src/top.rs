//! `fleetctl top`: the database while it works, refreshed every second (`--once`: one snapshot). Active
//! sessions by node (`application_name` `fleet-app/<CONTAINER_ID>`) and state, every lock wait with the
//! session blocking it and how long it has waited, and each node's pool (its `/api/pool-stats`).
//! PostgreSQL is asked as its superuser through psql, the password coming from the fleet's password file;
//! a database the fleet did not start (`up --database-url`), as the URL's role.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use fleet_local::postgres::{ADMIN_USER, APP_DATABASE};

use crate::state::FleetState;
use crate::status::{agent, fetch, pool_figures};

/// How often the view is refreshed.
const REFRESH: Duration = Duration::from_secs(1);
/// The node's `application_name` is this followed by its `CONTAINER_ID`.
const NODE_APPLICATION_PREFIX: &str = "fleet-app/";

#[derive(Debug, Args)]
pub struct TopArgs {
    /// The fleet's directory (as given to `up`).
    #[arg(long, default_value = ".fleet")]
    dir: PathBuf,
    /// Print one snapshot and exit.
    #[arg(long)]
    once: bool,
}

/// Client sessions other than ours, by application and state, with the oldest open transaction's age.
const SESSIONS: &str = "SELECT coalesce(nullif(application_name, ''), '-'), coalesce(state, '-'), count(*),
       coalesce(round(extract(epoch FROM max(now() - xact_start)))::text, '-')
FROM pg_stat_activity
WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
GROUP BY 1, 2 ORDER BY 1, 2";

/// Every session waiting for a lock, once per session blocking it, longest wait first.
const LOCK_WAITS: &str = "SELECT coalesce(nullif(w.application_name, ''), '-'), w.pid,
       round(extract(epoch FROM now() - coalesce(l.since, w.state_change))::numeric, 1),
       coalesce(nullif(b.application_name, ''), '-'), b.pid, coalesce(b.state, '-'),
       regexp_replace(left(w.query, 60), '\\s+', ' ', 'g')
FROM pg_stat_activity w
CROSS JOIN LATERAL unnest(pg_blocking_pids(w.pid)) AS blocker(pid)
JOIN pg_stat_activity b ON b.pid = blocker.pid
LEFT JOIN LATERAL (SELECT min(waitstart) AS since FROM pg_locks WHERE pid = w.pid AND NOT granted) l ON true
WHERE w.wait_event_type = 'Lock'
ORDER BY 3 DESC, 2";

pub fn run(args: TopArgs) -> anyhow::Result<()> {
    let state = FleetState::read(&args.dir)?;
    let terminal = std::io::stdout().is_terminal();
    loop {
        let view = snapshot(&state)?;
        let mut out = std::io::stdout().lock();
        if terminal && !args.once {
            // Clear the screen and go home; only where it is a screen.
            write!(out, "\x1b[2J\x1b[H")?;
        }
        writeln!(out, "{view}")?;
        out.flush()?;
        if args.once {
            return Ok(());
        }
        std::thread::sleep(REFRESH);
    }
}

/// The whole view as text.
fn snapshot(state: &FleetState) -> anyhow::Result<String> {
    let database = match (&state.database_url, state.database_port, state.members.is_empty()) {
        (Some(url), _, _) => url.clone(),
        (None, Some(port), true) => format!("127.0.0.1:{port}"),
        _ => format!(
            "the primary of {}",
            state.members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
        ),
    };
    let mut out = format!("fleet {}, database {database}\n\n", state.url);
    out.push_str(&format!("{:<22} {:<30} {:>8} {:>14}\n", "SESSIONS", "STATE", "COUNT", "OLDEST XACT s"));
    for row in query(state, SESSIONS)? {
        let [app, session_state, count, oldest] = &row[..] else { continue };
        out.push_str(&format!("{:<22} {session_state:<30} {count:>8} {oldest:>14}\n", node_name(app)));
    }
    out.push_str(&format!(
        "\n{:<22} {:>8} {:>9}  {:<22} {:>8}  {:<22} {}\n",
        "LOCK WAITS", "PID", "WAITED s", "BLOCKED BY", "PID", "ITS STATE", "WAITING QUERY"
    ));
    let waits = query(state, LOCK_WAITS)?;
    if waits.is_empty() {
        out.push_str("(none)\n");
    }
    for row in waits {
        let [waiter, pid, waited, blocker, blocker_pid, blocker_state, query] = &row[..] else { continue };
        out.push_str(&format!(
            "{:<22} {pid:>8} {waited:>9}  {:<22} {blocker_pid:>8}  {blocker_state:<22} {query}\n",
            node_name(waiter),
            node_name(blocker)
        ));
    }
    out.push_str(&format!("\n{:<22} {:>5} {:>5} {:>5} {:>7}\n", "POOLS", "MAX", "IDLE", "BUSY", "WAITING"));
    let agent = agent();
    for node in &state.nodes {
        let [max, idle, busy, waiting] =
            pool_figures(&fetch(&agent, &format!("{}/api/pool-stats", node.url)));
        out.push_str(&format!("{:<22} {max:>5} {idle:>5} {busy:>5} {waiting:>7}\n", node.name));
    }
    Ok(out)
}

/// `fleet-app/app-1` → `app-1`; any other application name as it is.
fn node_name(application: &str) -> &str {
    application.strip_prefix(NODE_APPLICATION_PREFIX).unwrap_or(application)
}

/// The rows of `sql` (fixed text: nothing from outside goes into it), columns split at tabs.
fn query(state: &FleetState, sql: &str) -> anyhow::Result<Vec<Vec<String>>> {
    let mut psql = Command::new(fleet_local::postgres_bin("psql")?);
    psql.args(["-X", "-A", "-t", "-q", "-F", "\t", "-v", "ON_ERROR_STOP=1"]);
    match &state.database_url {
        Some(url) => psql.args(["-d", url]),
        None => {
            let ports: Vec<String> = match state.members.is_empty() {
                true => state.database_port.iter().map(u16::to_string).collect(),
                false => state.members.iter().map(|m| m.port.to_string()).collect(),
            };
            psql.args(["-U", ADMIN_USER, "-d", APP_DATABASE])
                .env("PGHOST", vec!["127.0.0.1"; ports.len()].join(","))
                .env("PGPORT", ports.join(","))
        }
    };
    let output = psql
        .args(["-c", sql])
        // On a Patroni cluster, whichever member is the primary now.
        .env("PGTARGETSESSIONATTRS", "read-write")
        .env("PGPASSFILE", &state.password_file)
        .env("PGCONNECT_TIMEOUT", "5")
        .env("PGAPPNAME", "fleetctl top")
        .stdin(Stdio::null())
        .output()
        .context("cannot run psql")?;
    if !output.status.success() {
        bail!("cannot query the database: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text.lines().filter(|l| !l.is_empty()).map(|l| l.split('\t').map(str::to_owned).collect()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nodes_application_name_shows_as_its_container_id() {
        assert_eq!(node_name("fleet-app/app-3"), "app-3");
        assert_eq!(node_name("psql"), "psql");
    }
}
