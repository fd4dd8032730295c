//! The accounts a launcher running as root hands its children to: `postgres` runs the database (it
//! refuses to run as root), [`SERVICE_USER`] everything else (nginx, the nodes, Prometheus, the
//! exporter, etcd), so that none of them holds root's rights. Run by another user, the launcher runs
//! everything as that user.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use anyhow::{ensure, Context};
use nix::unistd::User;

use crate::postgres::ADMIN_USER;

/// The unprivileged system user of every service but the database (created if missing).
pub const SERVICE_USER: &str = "pgfleet";

/// The user PostgreSQL must run as: `None` (ourselves) unless we are root, who must hand it to
/// `postgres` (PostgreSQL refuses to run as root).
pub(crate) fn postgres_user() -> anyhow::Result<Option<User>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = User::from_name(ADMIN_USER)
        .context("cannot look up the `postgres` user")?
        .context("running as root, PostgreSQL must run as the `postgres` user, which does not exist (install the Debian package `postgresql`)")?;
    Ok(Some(user))
}

/// The user the other services run as: `None` (ourselves) unless we are root; then [`SERVICE_USER`],
/// created as a system user (no home, no shell) if it does not exist yet, as `scripts/bootstrap` does.
pub(crate) fn service_user() -> anyhow::Result<Option<User>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let lookup = || User::from_name(SERVICE_USER).context("cannot look up the service user");
    if let Some(user) = lookup()? {
        return Ok(Some(user));
    }
    // Another launcher may create it at the same moment: whoever wins, the user is there after.
    let created = Command::new("useradd")
        .args(["--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent"])
        .args(["--shell", "/usr/sbin/nologin", SERVICE_USER])
        .stdin(Stdio::null())
        .output();
    let user = lookup()?;
    ensure!(
        user.is_some(),
        "the fleet's services run as the system user `{SERVICE_USER}`, which does not exist and could not be \
         created ({}); create it with `useradd --system {SERVICE_USER}`",
        match created {
            Ok(output) => String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            Err(error) => error.to_string(),
        }
    );
    Ok(user)
}

/// Makes `cmd` run as `user` (its user and group, no supplementary groups), if given.
pub(crate) fn run_as(cmd: &mut Command, user: Option<&User>) {
    if let Some(user) = user {
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
}
