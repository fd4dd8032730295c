//! The cluster's state as Patroni's REST API reports it (`GET /cluster`), and waiting on it: for a
//! leader that accepts writes, or for the cluster to be whole.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use super::PatroniCluster;

/// How long a new cluster may take to have a leader and every replica streaming.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How often the cluster's state is polled while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// One member as Patroni's REST API reports it (`GET /cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub name: String,
    /// `leader`, `sync_standby`, `replica` (Patroni's words).
    pub role: String,
    /// `running`, `streaming`, `starting`, `stopped` …
    pub state: String,
    pub timeline: Option<u64>,
    /// Bytes of WAL the member is behind the leader (`None` for the leader, or when unknown).
    pub lag_bytes: Option<u64>,
    pub port: u16,
}

impl MemberStatus {
    pub fn is_leader(&self) -> bool {
        self.role == "leader" && self.state == "running"
    }

    /// A replica that streams WAL from the leader.
    pub fn is_streaming_replica(&self) -> bool {
        matches!(self.role.as_str(), "replica" | "sync_standby") && self.state == "streaming"
    }
}

impl PatroniCluster {
    /// The members as Patroni reports them, asked of the first member whose REST API answers.
    pub fn status(&self) -> anyhow::Result<Vec<MemberStatus>> {
        let mut last_error = None;
        for member in self.members.iter().filter(|m| m.patroni.is_some()) {
            match self.http.get(&format!("http://127.0.0.1:{}/cluster", member.api_port)).call() {
                Ok(response) => {
                    let body: Value = response.into_json().context("Patroni's /cluster is not JSON")?;
                    return parse_cluster(&body);
                }
                Err(error) => last_error = Some(error),
            }
        }
        match last_error {
            Some(error) => Err(error).context("no member's REST API answers"),
            None => bail!("no member is running"),
        }
    }

    /// Waits until a member other than `not` (if given) leads and its PostgreSQL accepts writes
    /// (Patroni reports the new leader a moment before its promotion ends); returns its name.
    pub fn wait_for_primary(&mut self, not: Option<&str>) -> anyhow::Result<String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.wait_until("a member leads", |members| {
                members.iter().any(|m| m.is_leader() && Some(m.name.as_str()) != not)
            })?;
            if let Ok(leader) = self.leader() {
                if Some(leader.as_str()) != not
                    && self.psql_on(&leader, "postgres", "SELECT pg_is_in_recovery()").is_ok_and(|r| r == "f")
                {
                    return Ok(leader);
                }
            }
            if Instant::now() >= deadline {
                bail!("no member accepted writes within {READY_TIMEOUT:?}");
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// The current leader's name.
    pub fn leader(&self) -> anyhow::Result<String> {
        let members = self.status()?;
        members.iter().find(|m| m.is_leader()).map(|m| m.name.clone()).context("the cluster has no leader")
    }

    /// Waits until `done` holds for the members Patroni reports, failing with their last state after
    /// [`READY_TIMEOUT`] (or early, with its output, when a member's Patroni exits).
    pub fn wait_until(&mut self, what: &str, done: impl Fn(&[MemberStatus]) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let last = self.status();
            if let Ok(members) = &last {
                if done(members) {
                    return Ok(());
                }
            }
            for member in &mut self.members {
                if let Some(child) = member.patroni.as_mut() {
                    if !child.is_running() {
                        bail!(
                            "{}'s Patroni exited; its last output:\n{}",
                            member.name,
                            child.recent_output()
                        );
                    }
                }
            }
            if Instant::now() >= deadline {
                let outputs: Vec<String> = self
                    .members
                    .iter()
                    .filter_map(|m| Some(format!("--- {}:\n{}", m.name, m.patroni.as_ref()?.recent_output())))
                    .collect();
                bail!(
                    "timed out after {READY_TIMEOUT:?} waiting until {what}; members: {last:?}\n{}",
                    outputs.join("\n")
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits until every running member is up: one leader, the others streaming, one of them the
    /// synchronous standby (with more than one member).
    pub fn wait_until_whole(&mut self) -> anyhow::Result<()> {
        let running = self.members.iter().filter(|m| m.patroni.is_some()).count();
        self.wait_until("the cluster is whole", |members| {
            let leaders = members.iter().filter(|m| m.is_leader()).count();
            let replicas = members.iter().filter(|m| m.is_streaming_replica()).count();
            let sync = members.iter().any(|m| m.role == "sync_standby" && m.state == "streaming");
            leaders == 1 && replicas + 1 == running && (running == 1 || sync)
        })
    }
}

/// The members of Patroni's `GET /cluster` answer.
pub fn parse_cluster(body: &Value) -> anyhow::Result<Vec<MemberStatus>> {
    let members = body["members"].as_array().context("Patroni's /cluster has no members")?;
    members
        .iter()
        .map(|m| {
            Ok(MemberStatus {
                name: m["name"].as_str().context("a member without a name")?.to_owned(),
                role: m["role"].as_str().unwrap_or_default().to_owned(),
                state: m["state"].as_str().unwrap_or_default().to_owned(),
                timeline: m["timeline"].as_u64(),
                lag_bytes: m["lag"].as_u64(),
                port: m["port"].as_u64().and_then(|p| u16::try_from(p).ok()).unwrap_or_default(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_answers_are_parsed() {
        let body = serde_json::json!({"members": [
            {"name": "pg-1", "role": "leader", "state": "running", "port": 5433, "timeline": 2},
            {"name": "pg-2", "role": "sync_standby", "state": "streaming", "port": 5434, "timeline": 2, "lag": 0},
            {"name": "pg-3", "role": "replica", "state": "stopped", "port": 5435, "lag": "unknown"},
        ]});
        let members = parse_cluster(&body).unwrap();
        assert!(members[0].is_leader());
        assert!(members[1].is_streaming_replica());
        assert_eq!(members[1].lag_bytes, Some(0));
        assert!(!members[2].is_streaming_replica());
        assert_eq!(members[2].lag_bytes, None);
        assert_eq!(members[2].timeline, None);
    }
}
