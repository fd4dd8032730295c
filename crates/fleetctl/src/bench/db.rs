//! Talking to the fleet's PostgreSQL as the application's user, through `psql` and `pgbench` from the
//! same installation as the server. The connection goes in `PG*` environment variables taken from the
//! database URL, so the password is never on a command line, in an error or in the output.

use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context};
use fleet_local::postgres_bin;
use secrecy::{ExposeSecret, SecretString};

use super::requests::KEY_PREFIX;

/// Where and as whom to connect (from `postgres://user:password@host:port/database`).
#[derive(Debug, Clone)]
pub struct Db {
    pub user: String,
    password: SecretString,
    pub host: String,
    pub port: u16,
    pub database: String,
}

impl Db {
    /// Reads a `postgres://` URL (no percent-escapes: the fleet's own credentials never need them).
    pub fn from_url(url: &str) -> anyhow::Result<Db> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .context("the database URL does not start with postgres://")?;
        let (credentials, location) = rest.rsplit_once('@').context("the database URL names no user")?;
        let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
        let (address, database) = location.split_once('/').context("the database URL names no database")?;
        let (host, port) = address.rsplit_once(':').unwrap_or((address, "5432"));
        Ok(Db {
            user: user.to_owned(),
            password: password.into(),
            host: host.to_owned(),
            port: port.parse().context("the database URL's port is not a number")?,
            database: database.split('?').next().unwrap_or(database).to_owned(),
        })
    }

    /// A PostgreSQL client program (`psql`, `pgbench`) set up to connect here.
    pub fn command(&self, program: &str) -> anyhow::Result<Command> {
        let mut cmd = Command::new(postgres_bin(program)?);
        cmd.env("PGHOST", &self.host)
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", &self.user)
            .env("PGPASSWORD", self.password.expose_secret())
            .env("PGDATABASE", &self.database)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null());
        Ok(cmd)
    }

    /// Runs `sql` with psql (unaligned, tuples only) and returns its output, trimmed.
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let output =
            self.command("psql")?.args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]).output();
        let output = checked(output.context("cannot run psql")?, "psql")?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// What the benchmark's consistency checks compare: the sum of every benchmark counter and the
    /// number of rows in `data`.
    pub fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let sums = self.psql(&format!(
            "SELECT coalesce(sum(value), 0), (SELECT count(*) FROM data) FROM counters WHERE key LIKE '{KEY_PREFIX}%'"
        ))?;
        let (counters, rows) =
            sums.split_once('|').with_context(|| format!("unexpected psql output {sums:?}"))?;
        Ok(Snapshot { counter_sum: counters.parse()?, rows: rows.parse()? })
    }

    /// The server's version, e.g. `15.18`.
    pub fn server_version(&self) -> anyhow::Result<String> {
        let version = self.psql("SHOW server_version")?;
        Ok(version.split_whitespace().next().unwrap_or_default().to_owned())
    }

    /// The server's `fsync` setting (`on` for a durable fleet).
    pub fn fsync(&self) -> anyhow::Result<String> {
        self.psql("SHOW fsync")
    }

    /// Makes sure `keys` exist (at 0 if new), so a pgbench transaction or a counter read finds its row.
    pub fn ensure_counters(&self, keys: &[String]) -> anyhow::Result<()> {
        let list = keys.iter().map(|k| format!("('{k}')")).collect::<Vec<_>>().join(",");
        self.psql(&format!("INSERT INTO counters (key) VALUES {list} ON CONFLICT (key) DO NOTHING"))?;
        Ok(())
    }
}

/// The database's side of the consistency checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub counter_sum: i64,
    pub rows: i64,
}

/// `output` if the program succeeded, else an error quoting its stderr.
pub fn checked(output: Output, program: &str) -> anyhow::Result<Output> {
    if !output.status.success() {
        bail!("{program} failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_url_is_split_and_its_password_never_shown() {
        let db = Db::from_url("postgres://appuser:s3cret@127.0.0.1:54321/appdb").unwrap();
        assert_eq!(
            (db.user.as_str(), db.host.as_str(), db.port, db.database.as_str()),
            ("appuser", "127.0.0.1", 54321, "appdb")
        );
        assert_eq!(db.password.expose_secret(), "s3cret");
        assert!(!format!("{db:?}").contains("s3cret"));
    }
}
