//! `fleetctl status` and `fleetctl down`: talk to a fleet started by another `fleetctl up`. On a Patroni
//! cluster, status also shows each member: role, state, timeline and replication lag.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use fleet_local::patroni::parse_cluster;
use fleet_local::MemberStatus;

use crate::state::FleetState;
use crate::up::DEFAULT_DIR;

/// Whether `pid` is a live `fleetctl up` running the fleet in `dir`: the same program as ours (its
/// `/proc/<pid>/exe`, even if rebuilt since), run as `up` with a `--dir` naming the same directory once
/// resolved from its working directory. A stale or forged fleet.json never makes us signal another process.
pub fn runs_fleet(pid: u32, dir: &Path) -> bool {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let (Ok(exe), Ok(ours), Ok(cmdline)) =
        (std::fs::read_link(proc.join("exe")), std::env::current_exe(), std::fs::read(proc.join("cmdline")))
    else {
        return false;
    };
    let exe = exe.to_string_lossy();
    if exe.strip_suffix(" (deleted)").unwrap_or(&exe) != ours.to_string_lossy() {
        return false;
    }
    let args: Vec<&OsStr> = cmdline.split(|&b| b == 0).map(OsStr::from_bytes).collect();
    let their_dir = match args.iter().position(|&arg| arg == "--dir") {
        Some(i) => args.get(i + 1).copied(),
        None => args.iter().find_map(|arg| arg.as_bytes().strip_prefix(b"--dir=").map(OsStr::from_bytes)),
    };
    let their_dir = proc.join("cwd").join(their_dir.unwrap_or(OsStr::new(DEFAULT_DIR)));
    args.get(1).is_some_and(|&command| command == "up")
        && their_dir.canonicalize().ok().is_some_and(|theirs| dir.canonicalize().is_ok_and(|d| d == theirs))
}

pub fn down(dir: &Path) -> anyhow::Result<()> {
    let state = FleetState::read(dir)?;
    if !runs_fleet(state.pid, dir) {
        bail!(
            "the fleet recorded in {} (fleetctl PID {}) is not running: that PID is not `fleetctl up --dir {}`",
            dir.display(),
            state.pid,
            dir.display()
        );
    }
    let pid = Pid::from_raw(i32::try_from(state.pid)?);
    kill(pid, Signal::SIGTERM).with_context(|| format!("cannot signal fleetctl PID {pid}"))?;
    eprintln!("sent SIGTERM to fleetctl (PID {pid}); waiting for the fleet to stop …");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !fleet_local::has_exited(pid) {
        if Instant::now() > deadline {
            bail!("fleetctl PID {pid} is still running after 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("fleet stopped");
    Ok(())
}

/// An HTTP client for a fleet's nodes.
pub(crate) fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout(Duration::from_secs(3)).build()
}

/// `url`'s JSON body, whatever its status; `{"status": "unreachable", …}` when there is no answer.
pub(crate) fn fetch(agent: &ureq::Agent, url: &str) -> Value {
    match agent.get(url).call() {
        Ok(response) => response.into_json().unwrap_or(Value::Null),
        Err(ureq::Error::Status(_, response)) => response.into_json().unwrap_or(Value::Null),
        Err(e) => json!({ "status": "unreachable", "error": e.to_string() }),
    }
}

/// A node's pool as shown in tables: max, idle, busy and waiting (`-` where unknown).
pub(crate) fn pool_figures(pool: &Value) -> [String; 4] {
    let (max, total, idle) =
        (pool["maxSize"].as_u64(), pool["totalCount"].as_u64(), pool["idleCount"].as_u64());
    let busy = total.zip(idle).map(|(t, i)| t.saturating_sub(i));
    let show = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    [show(max), show(idle), show(busy), show(pool["waitingCount"].as_u64())]
}

pub fn status(dir: &Path, as_json: bool) -> anyhow::Result<()> {
    let state = FleetState::read(dir)?;
    let agent = agent();
    let fetch = |url: String| fetch(&agent, &url);
    let nodes: Vec<Value> = state
        .nodes
        .iter()
        .map(|node| {
            let health = fetch(format!("{}/health", node.url));
            let pool = fetch(format!("{}/api/pool-stats", node.url));
            json!({ "name": node.name, "url": node.url, "pid": node.pid, "health": health, "pool": pool })
        })
        .collect();
    let members = cluster_members(&agent, &state);
    if as_json {
        let members: Option<Vec<Value>> = members.as_ref().map(|m| {
            m.iter()
                .map(|m| {
                    json!({ "name": m.name, "role": m.role, "state": m.state, "timeline": m.timeline,
                            "lag_bytes": m.lag_bytes, "port": m.port })
                })
                .collect()
        });
        let out =
            json!({ "url": state.url, "prometheus": state.prometheus, "nodes": nodes, "members": members });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("fleet: {}  (fleetctl PID {})", state.url, state.pid);
    println!(
        "{:<8} {:<24} {:>7}  {:<10} {:>5} {:>5} {:>5} {:>7}",
        "NODE", "URL", "PID", "HEALTH", "POOL", "IDLE", "BUSY", "WAITING"
    );
    for node in &nodes {
        let [max, idle, busy, waiting] = pool_figures(&node["pool"]);
        println!(
            "{:<8} {:<24} {:>7}  {:<10} {:>5} {:>5} {:>5} {:>7}",
            node["name"].as_str().unwrap_or("?"),
            node["url"].as_str().unwrap_or("?"),
            node["pid"].as_u64().map_or("-".to_owned(), |v| v.to_string()),
            node["health"]["status"].as_str().unwrap_or("unknown"),
            max,
            idle,
            busy,
            waiting,
        );
    }
    if let Some(members) = members {
        println!();
        if members.is_empty() {
            println!("no member's Patroni REST API answers");
        }
        println!("{:<8} {:<14} {:<10} {:>8} {:>12}", "MEMBER", "ROLE", "STATE", "TIMELINE", "LAG (BYTES)");
        let show = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        for m in members {
            println!(
                "{:<8} {:<14} {:<10} {:>8} {:>12}",
                m.name,
                m.role,
                m.state,
                show(m.timeline),
                show(m.lag_bytes)
            );
        }
    }
    Ok(())
}

/// The Patroni cluster's members as the first member's REST API that answers reports them; `None` for a
/// fleet on one PostgreSQL, or an empty list when no member answers.
fn cluster_members(agent: &ureq::Agent, state: &FleetState) -> Option<Vec<MemberStatus>> {
    if state.members.is_empty() {
        return None;
    }
    let answer = state.members.iter().find_map(|member| {
        let body: Value = agent.get(&format!("{}/cluster", member.api)).call().ok()?.into_json().ok()?;
        parse_cluster(&body).ok()
    });
    Some(answer.unwrap_or_default())
}
