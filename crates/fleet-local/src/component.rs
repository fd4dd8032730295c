//! The one shape of a fleet's parts: the database (one PostgreSQL, or a Patroni cluster with its etcd),
//! the nodes, the exporter, Prometheus and nginx. Each has its module with an options struct and a
//! `start(options)` that returns once it is ready, and implements [`Component`]: its processes, its
//! address, how it stops, which of its processes have exited. Its output goes where its [`Log`] says.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::users::{run_as, service_user};
use crate::Child;

/// How long a component may take to answer once started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a component gets to stop on SIGTERM before it is killed, unless it says otherwise.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running part of a fleet, of one process or several.
pub trait Component {
    /// Its processes, to wait on, stop, kill or inspect them (each named: `nginx`, `app-1`, `pg-2`).
    fn processes(&mut self) -> Vec<&mut Child>;

    /// Where it listens: `127.0.0.1:PORT` (several, comma-separated, for a cluster).
    fn address(&self) -> String;

    /// Its processes' names and PIDs.
    fn pids(&mut self) -> Vec<(String, u32)> {
        self.processes().into_iter().map(|process| (process.name().to_owned(), process.pid())).collect()
    }

    /// The names of its processes that have exited, on their own or stopped.
    fn exited(&mut self) -> Vec<String> {
        let mut processes = self.processes();
        processes.retain_mut(|process| !process.is_running());
        processes.into_iter().map(|process| process.name().to_owned()).collect()
    }

    /// Stops it and waits until it has exited: SIGTERM to each process, then SIGKILL after a grace period.
    fn stop(&mut self) -> anyhow::Result<()> {
        for process in self.processes() {
            process.terminate(STOP_GRACE)?;
        }
        Ok(())
    }
}

/// Where a component's output goes.
#[derive(Debug, Clone, Default)]
pub struct Log {
    /// Keep its output off our stderr (it is still quoted in errors).
    pub quiet: bool,
    /// Also append its output to this file.
    pub file: Option<PathBuf>,
}

impl Log {
    /// Spawns `cmd` as the child `name`, its output going here.
    pub fn spawn(&self, name: &str, cmd: Command) -> anyhow::Result<Child> {
        match &self.file {
            Some(file) => Child::spawn_logged(name, cmd, self.quiet, file),
            None => Child::spawn(name, cmd, self.quiet),
        }
    }
}

/// Spawns `cmd` as the child `name`, run by the service user (see [`crate::users`]), its output going
/// to `log`; returns once `ready_url` answers 200.
pub(crate) fn spawn_ready(name: &str, mut cmd: Command, log: &Log, ready_url: &str) -> anyhow::Result<Child> {
    run_as(&mut cmd, service_user()?.as_ref());
    let mut child = log.spawn(name, cmd)?;
    child.wait_for_http(ready_url, Instant::now() + READY_TIMEOUT)?;
    Ok(child)
}
