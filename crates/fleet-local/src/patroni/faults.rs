//! What is done to a running cluster on purpose, by `fleetctl chaos` and the HA tests: a member killed
//! as its machine would die, a planned switchover, a rolling restart, a replica's WAL replay paused or its
//! WAL receiver silenced or ended.

use std::fs;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use secrecy::ExposeSecret;

use super::{PatroniCluster, REST_API_USER};
use crate::proctree::{self, kill_tree};

/// How long Patroni's `POST /switchover` may take: it answers once the switchover is done (the leader
/// demoted, the candidate promoted), which takes far longer than other calls on a busy machine.
const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(120);

impl PatroniCluster {
    /// SIGKILL to member `name`'s Patroni and to its PostgreSQL's whole process tree, as when its
    /// machine dies: no shutdown, no handing over. It stays down until [`PatroniCluster::start_member`].
    pub fn kill_member(&mut self, name: &str) -> anyhow::Result<()> {
        self.resume_replay(name)?;
        self.resume_receiver(name)?;
        let n = self.index(name)?;
        let member = &mut self.members[n];
        if let Some(mut patroni) = member.patroni.take() {
            patroni.kill()?;
        }
        if let Some(postmaster) = member.postmaster() {
            kill_tree(postmaster);
        }
        tracing::info!(member = name, "member killed");
        Ok(())
    }

    /// A planned switchover through Patroni's REST API: the leader hands over to `candidate` (or to a
    /// synchronous standby Patroni picks); returns once the new leader runs.
    pub fn switchover(&mut self, candidate: Option<&str>) -> anyhow::Result<String> {
        let leader = self.leader()?;
        let api_port = self.members[self.index(&leader)?].api_port;
        let mut body = serde_json::json!({ "leader": leader });
        if let Some(candidate) = candidate {
            body["candidate"] = candidate.into();
        }
        let auth = basic_auth(REST_API_USER, self.secrets.rest_api.expose_secret());
        self.http
            .post(&format!("http://127.0.0.1:{api_port}/switchover"))
            .timeout(SWITCHOVER_TIMEOUT)
            .set("Authorization", &auth)
            .send_json(body)
            .map_err(|e| match e {
                ureq::Error::Status(code, response) => {
                    anyhow::anyhow!(
                        "switchover refused ({code}): {}",
                        response.into_string().unwrap_or_default()
                    )
                }
                other => anyhow::Error::new(other),
            })?;
        let new = self.wait_for_primary(Some(&leader))?;
        if let Some(candidate) = candidate {
            ensure!(new == candidate, "{new} leads after a switchover to {candidate}");
        }
        Ok(new)
    }

    /// SIGKILL to the leader ([`PatroniCluster::kill_member`]); waits until another member accepts
    /// writes, then starts the killed one again and waits until the cluster is whole (it rejoins as a
    /// replica, rewound if it diverged). Returns the killed leader, the new one, and how long the
    /// takeover took.
    pub fn kill_leader(&mut self) -> anyhow::Result<(String, String, Duration)> {
        let old = self.leader()?;
        let killed = Instant::now();
        self.kill_member(&old)?;
        let new = self.wait_for_primary(Some(&old))?;
        let took = killed.elapsed();
        self.start_member(&old)?;
        self.wait_until_whole()?;
        Ok((old, new, took))
    }

    /// What an operator's rolling update does: each replica stopped and started again (waiting until
    /// the cluster is whole after each), a switchover, then the old leader restarted. Returns the old
    /// leader and the new one once the cluster is whole again.
    pub fn rolling_restart(&mut self) -> anyhow::Result<(String, String)> {
        self.wait_until_whole()?;
        let leader = self.leader()?;
        for name in self.member_names().into_iter().filter(|name| *name != leader) {
            self.restart_member(&name)?;
        }
        let new = self.switchover(None)?;
        self.restart_member(&leader)?;
        Ok((leader, new))
    }

    /// Pauses WAL replay on replica `name`: SIGSTOP to its startup (recovery) process, so it keeps
    /// receiving WAL and answering queries while what it shows falls behind, as a replica under heavy
    /// load does. (`pg_wal_replay_pause()` does not last: Patroni resumes paused replay on its next
    /// loop.) Undone by [`PatroniCluster::resume_replay`], which stopping the member calls first.
    pub fn pause_replay(&mut self, name: &str) -> anyhow::Result<()> {
        let n = self.index(name)?;
        ensure!(self.members[n].replay_paused.is_none(), "{name}'s replay is already paused");
        let startup = self.stop_child(name, "startup")?;
        self.members[n].replay_paused = Some(startup);
        tracing::info!(member = name, "WAL replay paused");
        Ok(())
    }

    /// Silences replica `name`'s link to its primary: SIGSTOP to its WAL receiver, so no WAL and no
    /// keepalive reaches it and nothing fails, as in a partition before any timeout fires; it goes on
    /// answering queries with what it has. (The primary ends the replication connection after
    /// `wal_sender_timeout`, [`REPLICATION_TIMEOUT_S`].) Undone by [`PatroniCluster::resume_receiver`],
    /// which stopping the member calls first.
    pub fn silence_receiver(&mut self, name: &str) -> anyhow::Result<()> {
        let n = self.index(name)?;
        ensure!(self.members[n].receiver_silenced.is_none(), "{name}'s WAL receiver is already silenced");
        let receiver = self.stop_child(name, "walreceiver")?;
        self.members[n].receiver_silenced = Some(receiver);
        tracing::info!(member = name, "WAL receiver silenced");
        Ok(())
    }

    /// Resumes the WAL receiver [`PatroniCluster::silence_receiver`] stopped; does nothing if none is.
    pub fn resume_receiver(&mut self, name: &str) -> anyhow::Result<()> {
        let n = self.index(name)?;
        if let Some(receiver) = self.members[n].receiver_silenced.take() {
            let _ = kill(receiver, Signal::SIGCONT);
            tracing::info!(member = name, "WAL receiver resumed");
        }
        Ok(())
    }

    /// Ends replica `name`'s WAL receiver (SIGTERM: it exits cleanly). Its startup process starts another
    /// one unless it is paused ([`PatroniCluster::pause_replay`]): then the replica has none meanwhile.
    pub fn end_receiver(&mut self, name: &str) -> anyhow::Result<()> {
        let receiver = self.child(name, "walreceiver")?;
        kill(receiver, Signal::SIGTERM).with_context(|| format!("cannot end {name}'s WAL receiver"))?;
        tracing::info!(member = name, "WAL receiver ended");
        Ok(())
    }

    /// SIGSTOP to the child of member `name`'s postmaster whose title names `process` (`startup`,
    /// `walreceiver`), once it shows as stopped; its PID.
    fn stop_child(&self, name: &str, process: &str) -> anyhow::Result<Pid> {
        let child = self.child(name, process)?;
        kill(child, Signal::SIGSTOP).with_context(|| format!("cannot stop {name}'s {process} process"))?;
        proctree::wait_until_stopped(child)?;
        Ok(child)
    }

    /// The child of member `name`'s postmaster whose title names `process`.
    fn child(&self, name: &str, process: &str) -> anyhow::Result<Pid> {
        let member = &self.members[self.index(name)?];
        let postmaster =
            member.postmaster().with_context(|| format!("{name}'s PostgreSQL is not running"))?;
        proctree::descendants(postmaster)?
            .into_iter()
            .find(|pid| {
                fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| cmd.contains(process))
            })
            .with_context(|| format!("{name} has no {process} process: it is not a streaming replica"))
    }

    /// Resumes WAL replay paused by [`PatroniCluster::pause_replay`]; does nothing if it is not paused.
    pub fn resume_replay(&mut self, name: &str) -> anyhow::Result<()> {
        let n = self.index(name)?;
        if let Some(startup) = self.members[n].replay_paused.take() {
            let _ = kill(startup, Signal::SIGCONT);
            tracing::info!(member = name, "WAL replay resumed");
        }
        Ok(())
    }
}

/// The `Authorization` header's value for HTTP Basic authentication (RFC 7617).
fn basic_auth(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_matches_the_rfc_example() {
        assert_eq!(basic_auth("Aladdin", "open sesame"), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
    }
}
