//! A member's Patroni configuration (YAML), and the cluster's secrets.

use std::fmt::Write as _;
use std::path::Path;

use secrecy::{ExposeSecret, SecretString};

use crate::etcd::ROOT_USER;
use crate::postgres::{
    random_password, read_password_file, write_password_file, ADMIN_USER, APP_USER, LOG_SETTINGS,
};

/// The user of Patroni's REST API (not a PostgreSQL role).
pub const REST_API_USER: &str = "patroni";
/// PostgreSQL's replication role.
const REPLICATION_USER: &str = "replicator";

/// Patroni's leader lock lives this long (s) without renewal before a replica may take over: its
/// minimum (20), so a killed primary is replaced fast.
pub const TTL_S: u32 = 20;
/// How often each member's Patroni runs its loop (s): its minimum, so a switchover or a new leader is
/// seen within a second.
pub const LOOP_WAIT_S: u32 = 1;
/// How long Patroni retries the store and PostgreSQL before it gives up on them (s); Patroni requires
/// `loop_wait + 2 × retry_timeout ≤ ttl`.
pub const RETRY_TIMEOUT_S: u32 = 5;
const _: () = assert!(LOOP_WAIT_S + 2 * RETRY_TIMEOUT_S <= TTL_S, "Patroni refuses these timings");
/// How long (s) a primary waits on a silent replica before it ends the replication connection
/// (`wal_sender_timeout`), and a replica on a silent primary (`wal_receiver_timeout`). PostgreSQL's
/// default is 60 s, CloudNativePG's 5 s. It bounds how long a silent synchronous standby stalls every
/// COMMIT: Patroni picks another standby only once the primary has let the silent one go.
pub const REPLICATION_TIMEOUT_S: u32 = 5;

/// The cluster's credentials, random per cluster.
#[derive(Debug, Clone)]
pub struct Secrets {
    pub superuser: SecretString,
    pub replication: SecretString,
    pub app: SecretString,
    /// For Patroni's REST API endpoints that change the cluster (switchover, restart …).
    pub rest_api: SecretString,
    /// etcd's [`ROOT_USER`]'s: Patroni's only way into its store.
    pub etcd: SecretString,
}

impl Secrets {
    pub fn random() -> anyhow::Result<Secrets> {
        Ok(Secrets {
            superuser: random_password()?,
            replication: random_password()?,
            app: random_password()?,
            rest_api: random_password()?,
            etcd: random_password()?,
        })
    }

    /// Writes every password to `path`, a libpq password file (0600): psql reads the superuser's and
    /// the application's from it, and a kept cluster finds them all again ([`Secrets::read`]).
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        write_password_file(
            path,
            &[
                (ADMIN_USER, &self.superuser),
                (APP_USER, &self.app),
                (REPLICATION_USER, &self.replication),
                (REST_API_USER, &self.rest_api),
                (ROOT_USER, &self.etcd),
            ],
        )
    }

    /// The passwords [`Secrets::write`] kept in `path`; a new etcd password if the file has none (a
    /// cluster kept from before etcd required one).
    pub fn read(path: &Path) -> anyhow::Result<Secrets> {
        let file = read_password_file(path)?;
        Ok(Secrets {
            superuser: file.get(ADMIN_USER)?,
            replication: file.get(REPLICATION_USER)?,
            app: file.get(APP_USER)?,
            rest_api: file.get(REST_API_USER)?,
            etcd: file.get(ROOT_USER).or_else(|_| random_password())?,
        })
    }
}

/// Where one member runs.
#[derive(Debug, Clone)]
pub struct MemberPlace<'a> {
    pub name: &'a str,
    pub dir: &'a Path,
    pub pg_port: u16,
    pub api_port: u16,
}

/// What every member's configuration shares.
#[derive(Debug, Clone)]
pub struct ClusterPlan<'a> {
    pub scope: &'a str,
    pub etcd: &'a str,
    pub bin_dir: &'a Path,
    pub max_connections: u32,
    /// `false`: fsync, synchronous_commit's local flush and full_page_writes off (tests).
    pub durable: bool,
    /// More PostgreSQL parameters, applied last.
    pub parameters: &'a [(String, String)],
    pub secrets: &'a Secrets,
}

/// The YAML of one member. Every value is ours (ports, paths, generated passwords): nothing from a user.
pub fn render(plan: &ClusterPlan<'_>, member: &MemberPlace<'_>) -> String {
    let mut parameters = vec![
        ("max_connections", plan.max_connections.to_string()),
        ("wal_level", "replica".to_owned()),
        ("hot_standby", "on".to_owned()),
        ("wal_log_hints", "on".to_owned()),
        ("max_wal_senders", "10".to_owned()),
        ("max_replication_slots", "10".to_owned()),
        // Replicas report replay progress every second, so lag is seen within one.
        ("wal_receiver_status_interval", "1s".to_owned()),
        ("hot_standby_feedback", "on".to_owned()),
        ("wal_sender_timeout", format!("{REPLICATION_TIMEOUT_S}s")),
        ("wal_receiver_timeout", format!("{REPLICATION_TIMEOUT_S}s")),
    ];
    parameters.extend(LOG_SETTINGS.iter().map(|(name, value)| (*name, (*value).to_owned())));
    if !plan.durable {
        parameters.push(("fsync", "off".to_owned()));
        parameters.push(("full_page_writes", "off".to_owned()));
    }
    let mut params = String::new();
    for (name, value) in parameters
        .iter()
        .map(|(n, v)| (*n, v.as_str()))
        .chain(plan.parameters.iter().map(|(n, v)| (n.as_str(), v.as_str())))
    {
        let _ = writeln!(params, "        {name}: '{value}'");
    }
    let dir = member.dir.display();
    let [superuser, replication, rest_api, etcd_password] =
        [&plan.secrets.superuser, &plan.secrets.replication, &plan.secrets.rest_api, &plan.secrets.etcd]
            .map(ExposeSecret::expose_secret);
    format!(
        r#"scope: {scope}
name: {name}
log:
  level: WARNING
  format: '%(asctime)s %(levelname)s: %(message)s'
restapi:
  listen: 127.0.0.1:{api_port}
  connect_address: 127.0.0.1:{api_port}
  authentication:
    username: {REST_API_USER}
    password: '{rest_api}'
etcd3:
  hosts: {etcd}
  username: {ROOT_USER}
  password: '{etcd_password}'
bootstrap:
  dcs:
    ttl: {TTL_S}
    loop_wait: {LOOP_WAIT_S}
    retry_timeout: {RETRY_TIMEOUT_S}
    maximum_lag_on_failover: 1048576
    synchronous_mode: true
    synchronous_mode_strict: true
    failsafe_mode: true
    postgresql:
      use_pg_rewind: true
      remove_data_directory_on_rewind_failure: true
      remove_data_directory_on_diverged_timelines: true
      parameters:
{params}  initdb:
    - encoding: UTF8
    - locale: C
    - auth-host: scram-sha-256
    - auth-local: trust
  pg_hba:
    - local all all trust
    - host replication {REPLICATION_USER} 127.0.0.1/32 scram-sha-256
    - host all all 127.0.0.1/32 scram-sha-256
postgresql:
  listen: 127.0.0.1:{pg_port}
  connect_address: 127.0.0.1:{pg_port}
  data_dir: {dir}/data
  bin_dir: {bin_dir}
  pgpass: {dir}/pgpass
  basebackup:
    - checkpoint: fast
  authentication:
    superuser:
      username: {ADMIN_USER}
      password: '{superuser}'
    replication:
      username: {REPLICATION_USER}
      password: '{replication}'
  parameters:
    unix_socket_directories: '{dir}'
    logging_collector: 'off'
"#,
        scope = plan.scope,
        name = member.name,
        api_port = member.api_port,
        etcd = plan.etcd,
        pg_port = member.pg_port,
        bin_dir = plan.bin_dir.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_config_names_its_ports_and_synchronous_mode() {
        let secrets = Secrets::random().unwrap();
        let extra = [("deadlock_timeout".to_owned(), "100ms".to_owned())];
        let plan = ClusterPlan {
            scope: "pgfleet",
            etcd: "127.0.0.1:2379",
            bin_dir: Path::new("/usr/lib/postgresql/15/bin"),
            max_connections: 100,
            durable: false,
            parameters: &extra,
            secrets: &secrets,
        };
        let member =
            MemberPlace { name: "pg-2", dir: Path::new("/tmp/x/pg-2"), pg_port: 5433, api_port: 8009 };
        let yaml = render(&plan, &member);
        assert!(yaml.contains("name: pg-2\n"));
        assert!(yaml.contains("listen: 127.0.0.1:5433"));
        assert!(yaml.contains("listen: 127.0.0.1:8009"));
        assert!(yaml.contains("synchronous_mode: true"));
        assert!(yaml.contains("synchronous_mode_strict: true"));
        assert!(yaml.contains("        wal_sender_timeout: '5s'\n"));
        assert!(yaml.contains("        deadlock_timeout: '100ms'\n"));
        assert!(yaml.contains("        fsync: 'off'\n"));
        assert!(yaml.contains("        log_min_error_statement: 'panic'\n"));
        assert!(yaml.contains(secrets.superuser.expose_secret()));
        assert!(yaml.contains(&format!("  username: root\n  password: '{}'\n", secrets.etcd.expose_secret())));
    }
}
