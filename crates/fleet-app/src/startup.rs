//! `Application`: migrate, bind, serve, and stop gracefully on SIGTERM or Ctrl-C.

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use actix_web::dev::Server;
use actix_web::middleware::{from_fn, DefaultHeaders};
use actix_web::{web, App, HttpServer};
use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::db::{migrations, Db};
use crate::errors;
use crate::metrics::Metrics;
use crate::routes::{self, AppState};

/// How long start-up keeps trying to reach the database before giving up.
const STARTUP_DB_WAIT: Duration = Duration::from_secs(30);
/// How long in-flight requests get to finish after the listener closes.
const SHUTDOWN_TIMEOUT_S: u64 = 30;

/// A migrated, bound, not yet running node.
#[expect(missing_debug_implementations, reason = "actix's Server is not Debug")]
pub struct Application {
    server: Server,
    port: u16,
    state: web::Data<AppState>,
    drain: Duration,
}

impl Application {
    /// Applies pending migrations (waiting up to 30 s for the database), then binds `HOST:PORT`.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        errors::set_container_id(&config.container_id);
        migrate(&config).await?;
        let metrics = Metrics::new()?;
        let db = Db::new(&config, metrics.clone())?;
        db.spawn_idempotency_cleanup(Duration::from_secs(config.idempotency_ttl_s));
        let state = web::Data::new(AppState::new(&config, db, metrics));
        let listener = TcpListener::bind(config.listen_address())
            .with_context(|| format!("cannot listen on {}", config.listen_address()))?;
        let port = listener.local_addr()?.port();
        let (container_id, lab) = (config.container_id.clone(), config.lab_endpoints);
        let app_state = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(app_state.clone())
                .wrap(from_fn(routes::close_when_draining))
                .wrap(from_fn(routes::record_metrics))
                .wrap(DefaultHeaders::new().add(("X-Container-Id", container_id.as_str())))
                .configure(routes::configure(lab))
                .default_service(web::to(routes::not_found))
        })
        .disable_signals()
        // Every answer is written as soon as it is ready: without TCP_NODELAY, Nagle's algorithm holds
        // the last part of an answer written in more than one piece (a large bulk insert's ids) until
        // nginx's delayed ACK, 40 ms later. The database connections set it too (tokio-postgres does).
        .tcp_nodelay(true)
        // A client that closes its connection has left: drop its request at once (a coalesced increment
        // not yet in a transaction then takes no value, and a write waiting at a row gate gives up its
        // place) rather than finish work nobody will read. HTTP clients do not half-close.
        .h1_allow_half_closed(false)
        .shutdown_timeout(SHUTDOWN_TIMEOUT_S)
        .listen(listener)?
        .run();
        tracing::info!(
            "fleet-app listening on http://{}:{port} (container {}, pool {})",
            config.host,
            config.container_id,
            config.pool_size
        );
        Ok(Application { server, port, state, drain: Duration::from_millis(config.shutdown_drain_ms) })
    }

    /// The port actually bound (useful with `PORT=0`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until SIGTERM or SIGINT. On SIGTERM readiness turns 503 and responses ask clients to close
    /// their connections for `SHUTDOWN_DRAIN_MS`; then (at once on SIGINT) the listener closes, in-flight
    /// requests finish, and the pool closes.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let draining = self.state.draining.clone();
        let drain = self.drain;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::spawn(async move {
            let drain = tokio::select! {
                _ = term.recv() => drain,
                _ = int.recv() => Duration::ZERO,
            };
            tracing::info!(drain_ms = drain.as_millis() as u64, "stopping: draining");
            draining.store(true, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(drain) => {}
                _ = int.recv() => tracing::info!("SIGINT: skipping the rest of the drain"),
            }
            handle.stop(true).await;
        });
        self.server.await?;
        self.state.db.close();
        tracing::info!("stopped");
        Ok(())
    }
}

/// Applies pending migrations over a dedicated connection, retrying while the database is unreachable.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let pg = config.pg_config()?;
    let deadline = Instant::now() + STARTUP_DB_WAIT;
    let mut client = loop {
        match pg.connect(tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                break client;
            }
            Err(e) if Instant::now() < deadline => {
                tracing::warn!(error = %e, "waiting for the database");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context("cannot connect to the database"),
        }
    };
    let applied = migrations::run(&mut client).await.context("migrations failed")?;
    tracing::info!(migrations.applied = ?applied, "schema up to date");
    Ok(())
}
