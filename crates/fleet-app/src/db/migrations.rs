//! Versioned schema migrations, applied at start-up under a transaction-scoped advisory lock, so any
//! number of nodes starting at the same instant apply each migration exactly once and never race on
//! `CREATE TABLE`.

use tokio_postgres::Client;

/// Arbitrary but fixed: the advisory lock key that serialises migrations across the fleet.
pub const MIGRATION_LOCK_KEY: i64 = 0x0070_6766_6c65_6574; // "pgfleet" in ASCII

/// Each migration's version and SQL, in order. Never edit one that has shipped: add a new one.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE counters (
         key VARCHAR(255) PRIMARY KEY,
         value BIGINT NOT NULL DEFAULT 0,
         last_modified TIMESTAMPTZ NOT NULL DEFAULT now()
     );
     CREATE TABLE data (
         id BIGSERIAL PRIMARY KEY,
         content TEXT NOT NULL,
         container_id VARCHAR(50),
         created_at TIMESTAMPTZ NOT NULL DEFAULT now()
     );
     CREATE INDEX data_created_at_idx ON data (created_at);",
    ),
    (
        2,
        // The isolation lab's scratch rows: each scenario's under its own random run_id, deleted at the
        // end of the call (rows older than an hour are purged by the next call).
        "CREATE TABLE isolation_lab (
             run_id BIGINT NOT NULL,
             id INTEGER NOT NULL,
             value INTEGER NOT NULL,
             created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
             PRIMARY KEY (run_id, id)
         );",
    ),
    (
        3,
        // Idempotency keys: the first completed response of a write, stored in the write's transaction.
        "CREATE TABLE idempotency_keys (
             key VARCHAR(255) PRIMARY KEY,
             fingerprint BYTEA NOT NULL,
             status SMALLINT NOT NULL,
             response JSONB NOT NULL,
             created_at TIMESTAMPTZ NOT NULL DEFAULT now()
         );
         CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);",
    ),
    (
        4,
        // `/api/stats` counts a node's rows: by this index (an index-only scan), not a scan of `data`.
        "CREATE INDEX data_container_id_idx ON data (container_id);",
    ),
];

/// Applies every pending migration; returns the versions it applied.
pub async fn run(client: &mut Client) -> Result<Vec<i32>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY]).await?;
    // Every start after the first would log `NOTICE: relation "schema_migrations" already exists`.
    tx.batch_execute("SET LOCAL client_min_messages = warning").await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let current: i32 =
        tx.query_one("SELECT COALESCE(max(version), 0) FROM schema_migrations", &[]).await?.get(0);
    let mut applied = Vec::new();
    for &(version, sql) in MIGRATIONS.iter().filter(|(version, _)| *version > current) {
        tx.batch_execute(sql).await?;
        tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[&version]).await?;
        applied.push(version);
    }
    tx.commit().await?;
    Ok(applied)
}
