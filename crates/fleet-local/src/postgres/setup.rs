//! What a cluster needs before its server starts: options, server settings, a port, a directory.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use nix::unistd::User;

/// `sun_path` is 108 bytes on Linux, NUL included.
const MAX_SOCKET_PATH: usize = 107;

/// How to create and run a [`Postgres`].
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// The cluster directory; `None` = a fresh temporary directory, removed on drop. A directory that
    /// already holds a cluster (`data/PG_VERSION`) is started as it is, without initdb.
    pub dir: Option<PathBuf>,
    /// The TCP port on 127.0.0.1; `None` = a free port.
    pub port: Option<u16>,
    /// `max_connections` (default 100).
    pub max_connections: u32,
    /// `false` turns off fsync, synchronous_commit and full_page_writes: fast, but a machine crash
    /// can corrupt the cluster. Tests want `false`.
    pub durable: bool,
    /// More `name = value` server settings, applied last (so they override the ones above).
    pub extra_settings: Vec<(String, String)>,
    /// The server's log file; `None` = `server.log` in the cluster directory.
    pub log_file: Option<PathBuf>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            dir: None,
            port: None,
            max_connections: 100,
            durable: false,
            extra_settings: Vec::new(),
            log_file: None,
        }
    }
}

/// How long a lock wait lasts before PostgreSQL checks for a deadlock (its default is 1 s; 1 ms is its
/// smallest). Opposite transfers deadlock by design (`LOCK_ORDER=request`): on one hot pair, 4 nodes send
/// up to 8 transactions in opposite orders, and a deadlock stalls both rows, and every request queued for
/// them, until the check runs. Measured with `fleetctl bench --workloads pair` (4 × 5, against pgbench's
/// key-ordered transfer on the same pair): 5 ms gave 0.19× the ceiling (138 deadlocks/s), 1 ms 0.48–0.81×.
/// The check is cheap at this scale (a node sends at most two transactions per counter, so a few dozen
/// waiters at most, checked in microseconds), and only a wait on a busy row lasts 1 ms: the hot-key
/// increment benchmark stayed at 4.3× its ceiling. The same value is in docker-compose.yml's postgres
/// `command:`.
pub const DEADLOCK_TIMEOUT: &str = "1ms";

/// Logging settings of every cluster the launcher creates (plain or Patroni's). Opposite transfers
/// deadlock by design, hundreds of times a second under load: PostgreSQL logs each deadlock (which
/// sessions, which locks) but, with this, not the statement of each error, which the client already got.
pub(crate) const LOG_SETTINGS: &[(&str, &str)] = &[("log_min_error_statement", "panic")];

/// The server settings passed as `-c name=value`.
pub(super) fn settings(opts: &PostgresOptions, dir: &Path) -> Vec<(String, String)> {
    // The socket path is `<dir>/.s.PGSQL.<port>`; a longer one would stop the server from starting.
    let socket_dirs = if dir.as_os_str().len() + "/.s.PGSQL.65535".len() <= MAX_SOCKET_PATH {
        format!("\"{}\"", dir.display())
    } else {
        tracing::warn!(dir = %dir.display(), "path too long for a Unix socket; PostgreSQL listens on TCP only");
        String::new()
    };
    let mut settings = vec![
        ("listen_addresses", "127.0.0.1".to_owned()),
        ("unix_socket_directories", socket_dirs),
        ("max_connections", opts.max_connections.to_string()),
        ("deadlock_timeout", DEADLOCK_TIMEOUT.to_owned()),
        ("logging_collector", "off".to_owned()),
        ("log_destination", "stderr".to_owned()),
    ];
    settings.extend(LOG_SETTINGS.iter().map(|(name, value)| (*name, (*value).to_owned())));
    if !opts.durable {
        for name in ["fsync", "synchronous_commit", "full_page_writes"] {
            settings.push((name, "off".to_owned()));
        }
    }
    let mut settings: Vec<(String, String)> = settings.into_iter().map(|(n, v)| (n.to_owned(), v)).collect();
    settings.extend(opts.extra_settings.iter().cloned());
    settings
}

/// Gives `dir` to `user` (the server writes there) after checking that `user` can reach it.
pub(crate) fn hand_over(dir: &Path, user: &User) -> anyhow::Result<()> {
    check_reachable(dir, user)?;
    if fs::metadata(dir).map(|m| m.uid()).ok() != Some(user.uid.as_raw()) {
        std::os::unix::fs::chown(dir, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .with_context(|| format!("cannot give {} to the `{}` user", dir.display(), user.name))?;
    }
    Ok(())
}

/// Fails, naming the directory in the way, unless `user` may enter every ancestor of `dir`.
pub fn check_reachable(dir: &Path, user: &User) -> anyhow::Result<()> {
    for ancestor in dir.ancestors().skip(1) {
        let meta =
            fs::metadata(ancestor).with_context(|| format!("cannot inspect {}", ancestor.display()))?;
        let mode = meta.permissions().mode();
        let searchable = (meta.uid() == user.uid.as_raw() && mode & 0o100 != 0)
            || (meta.gid() == user.gid.as_raw() && mode & 0o010 != 0)
            || mode & 0o001 != 0;
        if !searchable {
            bail!(
                "the `{}` user cannot reach {}: {} (mode {:o}) does not let it in; \
                 use a directory under /tmp or `chmod o+x {}`",
                user.name,
                dir.display(),
                ancestor.display(),
                mode & 0o7777,
                ancestor.display()
            );
        }
    }
    Ok(())
}
