//! The one shape of a fleet's processes (nginx, Prometheus, the exporter, etcd, a node): each has its
//! module with an options struct and a `start(options)` that returns once it is ready, and implements
//! [`Component`]: its process, its address, how it stops. Its output goes where its [`Log`] says.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::users::{run_as, service_user};
use crate::Child;

/// How long a component may take to answer once started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a component gets to stop on SIGTERM before it is killed, unless it says otherwise.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running process of a fleet.
pub trait Component {
    /// Its process, to wait on, stop, kill or inspect it (its name is the component's: `nginx`, `app-1`).
    fn process(&mut self) -> &mut Child;

    /// Where it listens: `127.0.0.1:PORT`.
    fn address(&self) -> String;

    /// Stops it and waits until it has exited: SIGTERM, then SIGKILL after a grace period.
    fn stop(&mut self) -> anyhow::Result<()> {
        self.process().terminate(STOP_GRACE)?;
        Ok(())
    }

    /// Whether its process has exited, on its own or stopped.
    fn has_exited(&mut self) -> bool {
        !self.process().is_running()
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
