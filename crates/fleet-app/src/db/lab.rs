//! Lab probes: holding a connection on purpose.

use std::time::Duration;

use super::{Db, DbError};

impl Db {
    /// Holds one pooled connection in `pg_sleep` for `duration`.
    pub async fn hold(&self, duration: Duration) -> Result<(), DbError> {
        self.observed_taking(duration, async {
            let client = self.client().await?;
            let sleep = client.prepare_cached("SELECT pg_sleep($1)").await?;
            client.execute(&sleep, &[&duration.as_secs_f64()]).await?;
            Ok(())
        })
        .await
    }
}
