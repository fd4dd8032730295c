//! What each [`Fault`] does to the fleet this process owns, and the undoing of the timed ones (a paused
//! database, a replica's paused replay or silenced WAL receiver) from the owner's loop.

use std::time::Instant;

use anyhow::ensure;
use fleet_local::fleet::Fleet;

use super::fault::Fault;

/// Applies faults to the fleet this process owns; a paused database (or a replica's paused replay) is
/// thawed by [`Injector::tick`], which the owner calls from its loop, so the loop keeps serving meanwhile.
#[derive(Debug, Default)]
pub struct Injector {
    resume_at: Option<Instant>,
    /// The member whose replay `lag-replica` paused, and when to resume it.
    replay_resume_at: Option<(String, Instant)>,
    /// The member whose WAL receiver `silence-replica` stopped, and when to resume it.
    receiver_resume_at: Option<(String, Instant)>,
}

impl Injector {
    pub fn apply(&mut self, fleet: &mut Fleet, fault: Fault) -> anyhow::Result<String> {
        match fault {
            Fault::KillNode { n } => {
                fleet.kill_node(n)?;
                Ok(format!("killed app-{n} (SIGKILL)"))
            }
            Fault::StopNode { n } => {
                fleet.stop_node(n)?;
                Ok(format!("sent SIGTERM to app-{n}: it drains, then exits"))
            }
            Fault::RestartDb => {
                let started = Instant::now();
                fleet.postgres()?;
                self.resume_at = None;
                fleet.restart_db()?;
                Ok(format!("restarted PostgreSQL in {:.1} s", started.elapsed().as_secs_f64()))
            }
            Fault::PauseDb { seconds } => {
                fleet.postgres()?.pause()?;
                self.resume_at = Some(Instant::now() + seconds);
                Ok(format!("paused PostgreSQL for {} s", seconds.as_secs_f64()))
            }
            Fault::KillPrimary => {
                let started = Instant::now();
                let (old, new, took) = fleet.cluster()?.kill_leader()?;
                Ok(format!(
                    "killed leader {old} (SIGKILL to Patroni and PostgreSQL); {new} accepted writes after {:.1} s; \
                     {old} rejoined, the cluster was whole after {:.1} s",
                    took.as_secs_f64(),
                    started.elapsed().as_secs_f64()
                ))
            }
            Fault::Switchover => {
                let started = Instant::now();
                let cluster = fleet.cluster()?;
                let old = cluster.leader()?;
                let new = cluster.switchover(None)?;
                let took = started.elapsed();
                cluster.wait_until_whole()?;
                Ok(format!(
                    "switched over from {old} to {new} in {:.1} s; the cluster was whole after {:.1} s",
                    took.as_secs_f64(),
                    started.elapsed().as_secs_f64()
                ))
            }
            Fault::RollingRestartDb => {
                let started = Instant::now();
                let (old, new) = fleet.cluster()?.rolling_restart()?;
                Ok(format!(
                    "restarted every member, switching over from {old} to {new}; the cluster was whole after {:.1} s",
                    started.elapsed().as_secs_f64()
                ))
            }
            Fault::LagReplica { member, seconds } => {
                ensure!(self.replay_resume_at.is_none(), "a replica's replay is paused already");
                let member = replica(fleet, member)?;
                fleet.cluster()?.pause_replay(&member)?;
                self.replay_resume_at = Some((member.clone(), Instant::now() + seconds));
                Ok(format!("paused {member}'s WAL replay for {} s", seconds.as_secs_f64()))
            }
            Fault::SilenceReplica { member, seconds } => {
                ensure!(self.receiver_resume_at.is_none(), "a replica's WAL receiver is silenced already");
                let member = replica(fleet, member)?;
                fleet.cluster()?.silence_receiver(&member)?;
                self.receiver_resume_at = Some((member.clone(), Instant::now() + seconds));
                Ok(format!("silenced {member}'s WAL receiver for {} s", seconds.as_secs_f64()))
            }
        }
    }

    /// Thaws the database, or resumes a replica's replay, once its pause is over.
    pub fn tick(&mut self, fleet: &mut Fleet) -> anyhow::Result<()> {
        if self.resume_at.is_some_and(|at| Instant::now() >= at) {
            self.resume_at = None;
            fleet.postgres()?.resume()?;
            eprintln!("fleetctl: chaos: resumed PostgreSQL");
        }
        if self.replay_resume_at.as_ref().is_some_and(|(_, at)| Instant::now() >= *at) {
            if let Some((member, _)) = self.replay_resume_at.take() {
                fleet.cluster()?.resume_replay(&member)?;
                eprintln!("fleetctl: chaos: resumed {member}'s WAL replay");
            }
        }
        if self.receiver_resume_at.as_ref().is_some_and(|(_, at)| Instant::now() >= *at) {
            if let Some((member, _)) = self.receiver_resume_at.take() {
                fleet.cluster()?.resume_receiver(&member)?;
                eprintln!("fleetctl: chaos: resumed {member}'s WAL receiver");
            }
        }
        Ok(())
    }

    /// Ends every pause now (before the fleet stops).
    pub fn resume_all(&mut self, fleet: &mut Fleet) -> anyhow::Result<()> {
        if self.resume_at.take().is_some() {
            fleet.postgres()?.resume()?;
        }
        if let Some((member, _)) = self.replay_resume_at.take() {
            fleet.cluster()?.resume_replay(&member)?;
        }
        if let Some((member, _)) = self.receiver_resume_at.take() {
            fleet.cluster()?.resume_receiver(&member)?;
        }
        Ok(())
    }
}

/// Cluster member `pg-<n>`'s name, if it is not the leader.
fn replica(fleet: &mut Fleet, n: usize) -> anyhow::Result<String> {
    let member = format!("pg-{n}");
    ensure!(fleet.cluster()?.leader()? != member, "{member} is the leader, not a replica");
    Ok(member)
}
