//! Node configuration, read from the environment with envy and checked at start-up.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `CONTAINER_ID` | the hostname | this node's name in every response and in `data.container_id` (1–50 chars) |
//! | `HOST` | `0.0.0.0` | address to listen on |
//! | `PORT` | `3000` | port to listen on (`0` picks a free one; the log line says which) |
//! | `DATABASE_URL` | unset | `postgres://user:password@host:port/db`; when set, the `POSTGRES_*` variables are ignored. TLS as libpq does it (see `db::tls`): `?sslmode=verify-full&sslrootcert=/path/ca.crt` checks the server's certificate and name; `sslmode` is `disable`, `prefer` (the default: TLS when the server offers it, and then the certificate unchecked unless `sslrootcert` is given), `require`, `verify-ca` or `verify-full`. A certificate refused, or a server that refuses the node (`pg_hba.conf`), stops the start-up at once |
//! | `POSTGRES_HOST` / `POSTGRES_PORT` / `POSTGRES_DB` / `POSTGRES_USER` / `POSTGRES_PASSWORD` | `localhost` / `5432` / `appdb` / `appuser` / unset | the database, piece by piece |
//! | `DATABASE_READ_URL` | unset | where reads go (`GET /api/counters/{key}`, `GET /api/stats`): a replica, or several as a libpq multi-host URL (`postgres://u:p@h1:5432,h2:5432/db?target_session_attrs=read-only&load_balance_hosts=random`), or CloudNativePG's `-ro` Service. Unset: everything reads from `DATABASE_URL`'s server. A replica that is down, lags, or has not replayed a read's `X-Fleet-Min-Lsn` is skipped for the primary (see `db::read`) |
//! | `READ_POOL_SIZE` | `POOL_SIZE` | connections in this node's read pool (with `DATABASE_READ_URL`) |
//! | `READ_MAX_LAG_MS` | `1000` | bounded staleness: a replica serves a read only if it has replayed a position the primary held at most this long before the read began (so the read sees every write acknowledged this long before), and its WAL receiver runs; the node reads the primary's position at most every quarter of this while reads come |
//! | `READ_WAIT_MS` | `100` | how long a read with `X-Fleet-Min-Lsn` waits for its replica to replay that token before it reads from the primary (a token the primary has not reached is refused at once) |
//! | `POOL_SIZE` | `5` | connections in this node's pool. Size the fleet so that `nodes × POOL_SIZE ≤ max_connections − headroom`: with PostgreSQL's default 100 and 10 kept for admins, 4 nodes × 5 = 20 leaves room for 18 nodes. |
//! | `POOL_WAIT_TIMEOUT_MS` | `2000` | how long a request waits for (or to open) a connection before 503 |
//! | `STATEMENT_TIMEOUT_MS` | `DB_ATTEMPT_TIMEOUT_MS` | `statement_timeout` set on every connection; at most `DB_ATTEMPT_TIMEOUT_MS`, so PostgreSQL ends a statement by itself before the node gives up on it |
//! | `DB_ATTEMPT_TIMEOUT_MS` | `30000` | the client-side deadline of one database attempt (a transaction, or a query) once it has its connection: a request whose database stops answering (a stalled server, a blackholed network) gets 503 within `POOL_WAIT_TIMEOUT_MS` + this, the connection is closed, never reused, and what it ran is cancelled on the server. Also the connections' TCP user timeout (unacknowledged data for longer closes the connection); TCP keepalives probe idle connections after 10 s, every 2 s, 3 times |
//! | `IDLE_IN_TRANSACTION_TIMEOUT_MS` | `5000` | `idle_in_transaction_session_timeout` on every connection: PostgreSQL ends a session whose open transaction waits this long for the node's next statement (a node cut off mid-transaction), which frees its row locks. The node sends a transaction's statements back to back, so only a lost node ever reaches it |
//! | `BULK_MAX_ROWS` | `100000` | most rows one `/api/bulk-insert` takes (more: 413) |
//! | `BULK_MAX_ROW_BYTES` | `65536` (64 KiB) | longest row (in bytes of UTF-8) one `/api/bulk-insert` takes (longer: 413); rows are checked while the body is parsed |
//! | `BODY_LIMIT_BYTES` | `16777216` (16 MiB) | largest `/api/bulk-insert` body (more: 413): `BULK_MAX_ROWS` rows of up to 160 bytes each (the benchmark's rows are 64), and what a node holds per request in flight. The other routes take a few small fields and at most 64 KiB (or this, if lower). Bodies above 64 KiB share a budget of 4 × this per node (see `routes::body::BodyBudget`), so memory stays bounded however many arrive at once |
//! | `BODY_READ_TIMEOUT_MS` | `20000` | how long a request body may take to arrive once the node reads it (later: 408 `request_timeout`; a 16 MiB body needs 7 Mbit/s), and how long a large body waits for its share of the body budget (longer: 503 `body_budget_busy`). A share is held by a body being read for at most this long, so clients that trickle their bodies cannot keep other bodies waiting for longer |
//! | `RETRY_MAX_ATTEMPTS` | `0` (no limit) | most attempts for a transaction that hits a deadlock (40P01) or serialization failure (40001); `0`: as many as fit before `RETRY_DEADLINE_MS`, which is what bounds a request's wait (set a count only to see 409 sooner in experiments) |
//! | `INCREMENT_MODE` | `coalesce` | `coalesce`: concurrent increments share transactions (see `db::coalesce`); `transaction`: one transaction per request |
//! | `RETRY_DEADLINE_MS` | `10000` | a write's deadline: waiting for a busy counter (without a connection) and its attempts share it; no attempt starts after it (the last error is the answer) |
//! | `IDEMPOTENCY_TTL_S` | `86400` | how long an idempotency key and its stored response are kept |
//! | `LOCK_ORDER` | `request` | `request`: `/api/transfer` locks rows in request order (opposite transfers can deadlock); `sorted`: in key order (never deadlocks) |
//! | `LAB_ENDPOINTS` | `true` | serve `/api/hold` and `/api/test-isolation` |
//! | `LAB_MAX_CONNECTIONS` | `POOL_SIZE − 1` | connections the lab endpoints may use at once, pooled (a hold: 1) or their own (an isolation run: 4); beyond it they answer 429 `lab_busy`. Below `POOL_SIZE`, ordinary traffic always keeps a pooled connection; a larger value gives that up (the pool-size experiments do, to queue holds in the pool) |
//! | `SHUTDOWN_DRAIN_MS` | `0` | after SIGTERM, how long readiness answers 503 while new connections are still served (responses say `Connection: close`), before new connections are turned away (`listener`): set it above the probe period of a balancer that follows readiness; nginx needs none (it sends a turned-away request to the next node) |
//! | `HTTP_WORKERS` | `0` | threads serving HTTP; `0`: one per CPU core. A request's database connections and coalescing runners run on its worker's thread, so fewer workers hand off fewer requests between threads; a local fleet (`fleetctl up`) gives each node its share of the machine's cores |
//! | `LOG_FORMAT` | `json` | `json` or `text` |
//! | `NO_COLOR` | unset | any non-empty value: `text` logs without colour codes (the local fleet sets it; read by the log subscriber) |
//! | `RUST_LOG` | `info` | log filter |

use std::time::Duration;

use anyhow::{bail, Context};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::db::tls::{self, Target, TlsSettings};

/// An idle connection is probed after this long without traffic …
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// … then every this long, …
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// … and closed after this many unanswered probes (a dead peer is noticed within 16 s).
const KEEPALIVE_RETRIES: u32 = 3;

/// Every setting of a node. Secrets are redacted in `Debug`.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(default = "default_container_id")]
    pub container_id: String,
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    pub database_url: Option<SecretString>,
    #[serde(default = "default_postgres_host")]
    pub postgres_host: String,
    #[serde(default = "default_postgres_port")]
    pub postgres_port: u16,
    #[serde(default = "default_postgres_db")]
    pub postgres_db: String,
    #[serde(default = "default_postgres_user")]
    pub postgres_user: String,
    pub postgres_password: Option<SecretString>,
    pub database_read_url: Option<SecretString>,
    /// Unset: `POOL_SIZE`; see [`Config::read_pool_size`].
    #[serde(rename = "read_pool_size")]
    pub read_pool_size_setting: Option<usize>,
    #[serde(default = "default_read_max_lag_ms")]
    pub read_max_lag_ms: u64,
    #[serde(default = "default_read_wait_ms")]
    pub read_wait_ms: u64,
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    #[serde(default = "default_pool_wait_timeout_ms")]
    pub pool_wait_timeout_ms: u64,
    /// Unset: `DB_ATTEMPT_TIMEOUT_MS`; see [`Config::statement_timeout_ms`].
    #[serde(rename = "statement_timeout_ms")]
    pub statement_timeout_setting: Option<u64>,
    #[serde(default = "default_db_attempt_timeout_ms")]
    pub db_attempt_timeout_ms: u64,
    #[serde(default = "default_idle_in_transaction_timeout_ms")]
    pub idle_in_transaction_timeout_ms: u64,
    #[serde(default = "default_bulk_max_rows")]
    pub bulk_max_rows: usize,
    #[serde(default = "default_bulk_max_row_bytes")]
    pub bulk_max_row_bytes: usize,
    #[serde(default = "default_body_limit_bytes")]
    pub body_limit_bytes: usize,
    #[serde(default = "default_body_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
    #[serde(default = "default_retry_max_attempts")]
    pub retry_max_attempts: u32,
    #[serde(default = "default_retry_deadline_ms")]
    pub retry_deadline_ms: u64,
    #[serde(default = "default_idempotency_ttl_s")]
    pub idempotency_ttl_s: u64,
    #[serde(default)]
    pub increment_mode: IncrementMode,
    #[serde(default)]
    pub lock_order: LockOrder,
    #[serde(default = "default_true")]
    pub lab_endpoints: bool,
    /// Unset: `POOL_SIZE − 1`; see [`Config::lab_max_connections`].
    #[serde(rename = "lab_max_connections")]
    pub lab_max_connections_setting: Option<usize>,
    #[serde(default)]
    pub shutdown_drain_ms: u64,
    /// 0: one per CPU core (actix's default).
    #[serde(default)]
    pub http_workers: usize,
    #[serde(default)]
    pub log_format: LogFormat,
}

/// How `/api/increment` uses transactions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IncrementMode {
    /// Concurrent increments on this node share transactions (see `db::coalesce`).
    #[default]
    Coalesce,
    /// One transaction per request.
    Transaction,
}

/// The order in which `/api/transfer` locks its two rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockOrder {
    /// `from` then `to`: opposite transfers can deadlock (40P01), and are retried.
    #[default]
    Request,
    /// The smaller key first: no deadlocks.
    Sorted,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

impl Config {
    /// Reads the environment; an unparsable or out-of-range value is an error naming its variable.
    pub fn from_env() -> anyhow::Result<Self> {
        let config: Config = envy::from_env().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let id_len = self.container_id.chars().count();
        if id_len == 0 || id_len > 50 {
            bail!("CONTAINER_ID must be 1 to 50 characters, got {id_len}");
        }
        let positive = [
            ("POOL_SIZE", self.pool_size as u64),
            ("POOL_WAIT_TIMEOUT_MS", self.pool_wait_timeout_ms),
            ("DB_ATTEMPT_TIMEOUT_MS", self.db_attempt_timeout_ms),
            ("STATEMENT_TIMEOUT_MS", self.statement_timeout_ms()),
            ("IDLE_IN_TRANSACTION_TIMEOUT_MS", self.idle_in_transaction_timeout_ms),
            ("BULK_MAX_ROWS", self.bulk_max_rows as u64),
            ("BULK_MAX_ROW_BYTES", self.bulk_max_row_bytes as u64),
            ("BODY_LIMIT_BYTES", self.body_limit_bytes as u64),
            ("BODY_READ_TIMEOUT_MS", self.body_read_timeout_ms),
            ("RETRY_DEADLINE_MS", self.retry_deadline_ms),
            ("IDEMPOTENCY_TTL_S", self.idempotency_ttl_s),
            ("READ_POOL_SIZE", self.read_pool_size() as u64),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, value)| *value == 0) {
            bail!("{name} must be at least 1");
        }
        if self.statement_timeout_ms() > self.db_attempt_timeout_ms {
            bail!(
                "STATEMENT_TIMEOUT_MS ({}) must not exceed DB_ATTEMPT_TIMEOUT_MS ({}): a statement would run \
                 on after the node gave up on it",
                self.statement_timeout_ms(),
                self.db_attempt_timeout_ms
            );
        }
        self.pg_config()?;
        self.pg_read_config().map(drop)
    }

    /// The connection settings for PostgreSQL (`statement_timeout`, `idle_in_transaction_session_timeout`
    /// and `application_name` set for the session, TCP keepalives and user timeout on the socket), and
    /// its TLS settings.
    pub fn pg_config(&self) -> anyhow::Result<(tokio_postgres::Config, TlsSettings)> {
        let (pg, tls) = match &self.database_url {
            Some(url) => parse_url("DATABASE_URL", url)?,
            None => {
                let mut pg = tokio_postgres::Config::new();
                pg.host(&self.postgres_host)
                    .port(self.postgres_port)
                    .dbname(&self.postgres_db)
                    .user(&self.postgres_user);
                if let Some(password) = &self.postgres_password {
                    pg.password(password.expose_secret());
                }
                (pg, TlsSettings::default())
            }
        };
        Ok((self.session(pg), tls))
    }

    /// [`Config::pg_config`] for `DATABASE_READ_URL`, when set.
    pub fn pg_read_config(&self) -> anyhow::Result<Option<(tokio_postgres::Config, TlsSettings)>> {
        let Some(url) = &self.database_read_url else { return Ok(None) };
        let (pg, tls) = parse_url("DATABASE_READ_URL", url)?;
        Ok(Some((self.session(pg), tls)))
    }

    /// Where the node writes: [`Config::pg_config`] with its TLS connector (which reads `sslrootcert`).
    pub fn target(&self) -> anyhow::Result<Target> {
        target("DATABASE_URL", self.pg_config()?)
    }

    /// Where the node reads, when `DATABASE_READ_URL` is set.
    pub fn read_target(&self) -> anyhow::Result<Option<Target>> {
        self.pg_read_config()?.map(|pg| target("DATABASE_READ_URL", pg)).transpose()
    }

    /// `pg` with this node's session settings and socket deadlines.
    fn session(&self, mut pg: tokio_postgres::Config) -> tokio_postgres::Config {
        pg.application_name(format!("fleet-app/{}", self.container_id))
            .options(format!(
                "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
                self.statement_timeout_ms(),
                self.idle_in_transaction_timeout_ms
            ))
            .connect_timeout(self.pool_wait_timeout())
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_RETRIES)
            .tcp_user_timeout(self.db_attempt_timeout());
        pg
    }

    /// `STATEMENT_TIMEOUT_MS`, or `DB_ATTEMPT_TIMEOUT_MS` when unset.
    pub fn statement_timeout_ms(&self) -> u64 {
        self.statement_timeout_setting.unwrap_or(self.db_attempt_timeout_ms)
    }

    /// `READ_POOL_SIZE`, or `POOL_SIZE` when unset.
    pub fn read_pool_size(&self) -> usize {
        self.read_pool_size_setting.unwrap_or(self.pool_size)
    }

    /// `READ_MAX_LAG_MS`.
    pub fn read_max_lag(&self) -> Duration {
        Duration::from_millis(self.read_max_lag_ms)
    }

    /// `READ_WAIT_MS`.
    pub fn read_wait(&self) -> Duration {
        Duration::from_millis(self.read_wait_ms)
    }

    /// `LAB_MAX_CONNECTIONS`, or `POOL_SIZE − 1` when unset.
    pub fn lab_max_connections(&self) -> usize {
        self.lab_max_connections_setting.unwrap_or(self.pool_size - 1)
    }

    pub fn pool_wait_timeout(&self) -> Duration {
        Duration::from_millis(self.pool_wait_timeout_ms)
    }

    /// `BODY_READ_TIMEOUT_MS`.
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms)
    }

    /// `DB_ATTEMPT_TIMEOUT_MS`.
    pub fn db_attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.db_attempt_timeout_ms)
    }

    /// `host:port` to bind.
    pub fn listen_address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// A connection URL or key=value string, and its TLS settings; the error names the variable, never its
/// value (a password).
fn parse_url(name: &str, url: &SecretString) -> anyhow::Result<(tokio_postgres::Config, TlsSettings)> {
    let (url, tls) =
        tls::split_url(url.expose_secret()).with_context(|| format!("{name}: invalid TLS settings"))?;
    let mut pg: tokio_postgres::Config = url
        .parse()
        .map_err(|_| anyhow::anyhow!("{name} is not a valid postgres:// URL or key=value string"))?;
    pg.ssl_mode(tls.pg_mode());
    Ok((pg, tls))
}

/// `pg` with the TLS connector its settings ask for; the error names the variable `name`.
fn target(name: &str, (pg, tls): (tokio_postgres::Config, TlsSettings)) -> anyhow::Result<Target> {
    let tls = tls.connector().with_context(|| format!("{name}: cannot set up TLS"))?;
    Ok(Target { pg, tls })
}

fn default_container_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "fleet-app".to_owned())
}
fn default_host() -> String {
    "0.0.0.0".to_owned()
}
fn default_port() -> u16 {
    3000
}
fn default_postgres_host() -> String {
    "localhost".to_owned()
}
fn default_postgres_port() -> u16 {
    5432
}
fn default_postgres_db() -> String {
    "appdb".to_owned()
}
fn default_postgres_user() -> String {
    "appuser".to_owned()
}
fn default_read_max_lag_ms() -> u64 {
    1000
}
fn default_read_wait_ms() -> u64 {
    100
}
fn default_pool_size() -> usize {
    5
}
fn default_pool_wait_timeout_ms() -> u64 {
    2000
}
/// Half of `STATEMENT_TIMEOUT_MS`, and 4× the longest attempt measured: 100,000-row inserts, five at
/// once on two cores, with a debug build (7.6 s).
fn default_db_attempt_timeout_ms() -> u64 {
    30_000
}
fn default_idle_in_transaction_timeout_ms() -> u64 {
    5_000
}
fn default_bulk_max_rows() -> usize {
    100_000
}
fn default_bulk_max_row_bytes() -> usize {
    64 * 1024
}
/// 100,000 rows (`BULK_MAX_ROWS`) of up to 160 bytes each, quoted and separated (`"…",`).
fn default_body_limit_bytes() -> usize {
    16 * 1024 * 1024
}
/// A 16 MiB body (`BODY_LIMIT_BYTES`) in 20 s needs 7 Mbit/s; nginx reads a client's body itself and
/// sends it to the node at once.
fn default_body_read_timeout_ms() -> u64 {
    20_000
}
fn default_retry_max_attempts() -> u32 {
    0
}
fn default_retry_deadline_ms() -> u64 {
    10_000
}
fn default_idempotency_ttl_s() -> u64 {
    24 * 60 * 60
}
fn default_true() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::tls::SslMode;

    fn parse(vars: &[(&str, &str)]) -> anyhow::Result<Config> {
        let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let config: Config = envy::from_iter(vars).map_err(|e| anyhow::anyhow!("{e}"))?;
        config.validate().map(|()| config)
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = parse(&[("CONTAINER_ID", "app-1")]).unwrap();
        assert_eq!(config.port, 3000);
        assert_eq!(config.pool_size, 5);
        assert_eq!(config.bulk_max_rows, 100_000);
        assert_eq!(config.body_limit_bytes, 16 * 1024 * 1024);
        assert_eq!(config.body_read_timeout(), Duration::from_secs(20));
        assert!(config.body_limit_bytes >= config.bulk_max_rows * (160 + 3), "100,000 rows of 160 bytes fit");
        assert_eq!(config.lock_order, LockOrder::Request);
        assert_eq!(config.increment_mode, IncrementMode::Coalesce);
        assert!(config.lab_endpoints);
        assert_eq!(config.retry_max_attempts, 0, "retries are bounded by the deadline alone");
        assert_eq!(config.lab_max_connections(), 4, "the lab leaves ordinary traffic a connection");
        assert!(config.pg_read_config().unwrap().is_none(), "no read URL: reads go to the primary");
        assert_eq!(config.read_pool_size(), config.pool_size);
    }

    #[test]
    fn a_read_url_gets_the_same_session_settings_and_names_its_variable_when_bad() {
        let url =
            "postgres://u:p@r1:5432,r2:5433/app?target_session_attrs=read-only&load_balance_hosts=random";
        let config = parse(&[("DATABASE_READ_URL", url), ("READ_POOL_SIZE", "3")]).unwrap();
        let (read, _) = config.pg_read_config().unwrap().unwrap();
        assert_eq!(read.get_hosts().len(), 2);
        assert_eq!(read.get_target_session_attrs(), tokio_postgres::config::TargetSessionAttrs::ReadOnly);
        assert!(read.get_options().unwrap().contains("idle_in_transaction_session_timeout"));
        assert_eq!(config.read_pool_size(), 3);
        let err = parse(&[("DATABASE_READ_URL", "postgres://a:secret@h:nope/db")]).unwrap_err().to_string();
        assert!(err.contains("DATABASE_READ_URL") && !err.contains("secret"), "{err}");
        let err = parse(&[("READ_POOL_SIZE", "0")]).unwrap_err().to_string();
        assert!(err.contains("READ_POOL_SIZE"), "{err}");
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let err = parse(&[("POOL_SIZE", "lots")]).unwrap_err().to_string();
        assert!(err.contains("POOL_SIZE"), "{err}");
        let err = parse(&[("POOL_SIZE", "0")]).unwrap_err().to_string();
        assert!(err.contains("POOL_SIZE"), "{err}");
        let err = parse(&[("LOCK_ORDER", "random")]).unwrap_err().to_string();
        assert!(err.contains("random"), "{err}");
        let err = parse(&[("DATABASE_URL", "postgres://a:b@host:notaport/db")]).unwrap_err().to_string();
        assert!(err.contains("DATABASE_URL"), "{err}");
    }

    #[test]
    fn connections_carry_the_server_side_timeouts_and_tcp_deadlines() {
        let config =
            parse(&[("IDLE_IN_TRANSACTION_TIMEOUT_MS", "1234"), ("DB_ATTEMPT_TIMEOUT_MS", "4321")]).unwrap();
        let (pg, _) = config.pg_config().unwrap();
        let options = pg.get_options().unwrap();
        assert!(options.contains("-c statement_timeout=4321"), "{options}");
        assert!(options.contains("-c idle_in_transaction_session_timeout=1234"), "{options}");
        assert_eq!(pg.get_tcp_user_timeout(), Some(&Duration::from_millis(4321)));
        assert!(pg.get_keepalives());
        assert_eq!(pg.get_keepalives_idle(), KEEPALIVE_IDLE);
        let err = parse(&[("DB_ATTEMPT_TIMEOUT_MS", "0")]).unwrap_err().to_string();
        assert!(err.contains("DB_ATTEMPT_TIMEOUT_MS"), "{err}");
    }

    #[test]
    fn statement_timeout_ends_a_statement_before_its_attempts_deadline() {
        let config = parse(&[("DB_ATTEMPT_TIMEOUT_MS", "4321")]).unwrap();
        let options = config.pg_config().unwrap().0.get_options().unwrap().to_owned();
        assert!(options.contains("-c statement_timeout=4321"), "unset, it is the attempt's: {options}");
        let err = parse(&[("STATEMENT_TIMEOUT_MS", "4001"), ("DB_ATTEMPT_TIMEOUT_MS", "4000")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("STATEMENT_TIMEOUT_MS") && err.contains("DB_ATTEMPT_TIMEOUT_MS"), "{err}");
    }

    #[test]
    fn tls_settings_come_from_each_url_and_a_bad_one_names_its_variable() {
        let url = "postgres://u:p@db:5432/app?sslmode=verify-full&sslrootcert=/ca/ca.crt";
        let config = parse(&[("DATABASE_URL", url), ("DATABASE_READ_URL", "postgres://u:p@ro/app")]).unwrap();
        let (pg, tls) = config.pg_config().unwrap();
        assert_eq!((tls.mode, tls.root_cert.as_deref()), (SslMode::VerifyFull, Some("/ca/ca.crt".as_ref())));
        assert_eq!(pg.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        let (read, read_tls) = config.pg_read_config().unwrap().unwrap();
        assert_eq!(
            (read_tls.mode, read.get_ssl_mode()),
            (SslMode::Prefer, tokio_postgres::config::SslMode::Prefer)
        );
        for (name, bad) in [
            ("DATABASE_URL", "postgres://u:secret@db/app?sslmode=verify-full"),
            ("DATABASE_READ_URL", "postgres://u:secret@db/app?sslmode=bogus"),
        ] {
            let err = format!("{:#}", parse(&[(name, bad)]).unwrap_err());
            assert!(err.contains(name) && err.contains("sslmode") && !err.contains("secret"), "{err}");
        }
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let config =
            parse(&[("DATABASE_URL", "postgres://u:hunter2@db/app"), ("POSTGRES_PASSWORD", "hunter3")])
                .unwrap();
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter"), "{debug}");
    }
}
