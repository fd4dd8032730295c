//! `fleetctl status` and `fleetctl down`: talk to a fleet started by another `fleetctl up`. On a Patroni
//! cluster, status also shows each member: role, state, timeline and replication lag.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use fleet_local::patroni::parse_cluster;
use fleet_local::MemberStatus;

use crate::state::FleetState;

/// Whether `pid` is a live `fleetctl` process (so a stale fleet.json never makes us signal a stranger).
pub fn is_fleetctl(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| {
            let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
            String::from_utf8_lossy(argv0).ends_with("fleetctl")
        })
        .unwrap_or(false)
}

pub fn down(dir: &Path) -> anyhow::Result<()> {
    let state = FleetState::read(dir)?;
    if !is_fleetctl(state.pid) {
        bail!("the fleet recorded in {} (fleetctl PID {}) is not running", dir.display(), state.pid);
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
