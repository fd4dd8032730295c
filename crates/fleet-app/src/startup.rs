//! `Application`: migrate, bind, serve, and stop gracefully on SIGTERM or Ctrl-C.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::dev::Server;
use actix_web::middleware::{from_fn, DefaultHeaders, Next};
use actix_web::{web, App, HttpServer};
use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio_postgres::error::SqlState;

use crate::config::Config;
use crate::db::{migrations, tls, Store};
use crate::errors;
use crate::listener::{self, Sink};
use crate::metrics::Metrics;
use crate::routes::{self, AppState};

/// How long start-up keeps trying to reach the database before giving up.
const STARTUP_DB_WAIT: Duration = Duration::from_secs(30);
/// How long open connections get to finish their requests and close once new ones are turned away
/// (then the rest are closed), or on SIGINT how long in-flight requests get after the listener closes.
const SHUTDOWN_TIMEOUT_S: u64 = 30;
/// Once new connections are turned away, how long before the node counts the open ones: the
/// connections whose handshake was under way (one round trip) arrive and are accepted meanwhile.
const HANDSHAKES_SETTLE: Duration = Duration::from_millis(100);

/// A migrated, bound, not yet running node.
#[expect(missing_debug_implementations, reason = "actix's Server is not Debug")]
pub struct Application {
    server: Server,
    port: u16,
    state: web::Data<AppState>,
    drain: Duration,
    sink: Sink,
    connections: OpenCount,
    requests: OpenCount,
}

impl Application {
    /// Applies pending migrations (waiting up to 30 s for the database), then binds `HOST:PORT`.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        errors::set_container_id(&config.container_id);
        migrate(&config).await?;
        let metrics = Metrics::new()?;
        let db = Store::new(&config, metrics.clone())?;
        db.spawn_idempotency_cleanup(Duration::from_secs(config.idempotency_ttl_s));
        let state = web::Data::new(AppState::new(&config, db, metrics));
        let (listener, sink) = listener::bind(&config.listen_address())?;
        let port = listener.local_addr()?.port();
        let (container_id, lab) = (config.container_id.clone(), config.lab_endpoints);
        let app_state = state.clone();
        let (connections, requests) = (OpenCount::default(), OpenCount::default());
        let (counted, in_flight) = (connections.clone(), requests.clone());
        let server = HttpServer::new(move || {
            let in_flight = in_flight.clone();
            App::new()
                .app_data(app_state.clone())
                .wrap(from_fn(move |req, next: Next<_>| {
                    let open = in_flight.open();
                    async move {
                        let res = next.call(req).await;
                        drop(open);
                        res
                    }
                }))
                .wrap(from_fn(routes::close_when_draining))
                .wrap(from_fn(routes::record_metrics))
                .wrap(DefaultHeaders::new().add(("X-Container-Id", container_id.as_str())))
                .configure(routes::configure(lab))
                .default_service(web::to(routes::not_found))
        })
        .disable_signals()
        .on_connect(move |_, data| {
            data.insert(counted.open());
        })
        // Every answer is written as soon as it is ready: without TCP_NODELAY, Nagle's algorithm holds
        // the last part of an answer written in more than one piece (a large bulk insert's ids) until
        // nginx's delayed ACK, 40 ms later. The database connections set it too (tokio-postgres does).
        .tcp_nodelay(true)
        // A client that closes its connection has left: drop its request at once (a coalesced increment
        // not yet in a transaction then takes no value, and a write waiting at a row gate gives up its
        // place) rather than finish work nobody will read. HTTP clients do not half-close.
        .h1_allow_half_closed(false)
        .shutdown_timeout(SHUTDOWN_TIMEOUT_S);
        let server = match config.http_workers {
            0 => server,
            workers => server.workers(workers),
        };
        let server = server.listen(listener)?.run();
        tracing::info!(
            "fleet-app listening on http://{}:{port} (container {}, pool {})",
            config.host,
            config.container_id,
            config.pool_size
        );
        let drain = Duration::from_millis(config.shutdown_drain_ms);
        Ok(Application { server, port, state, drain, sink, connections, requests })
    }

    /// The port actually bound (useful with `PORT=0`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Serves until SIGTERM or SIGINT. On SIGTERM readiness turns 503 and responses ask clients to close
    /// their connections (`Connection: close`) for `SHUTDOWN_DRAIN_MS`, while new connections are still
    /// served. Then new connections are turned away without a reset (see `listener`), each open one
    /// finishes its requests and closes (for at most `SHUTDOWN_TIMEOUT_S`), the listener closes, and the
    /// pool closes. SIGINT does the same at once: no drain, and it does not wait for open connections
    /// (their requests in flight still get `SHUTDOWN_TIMEOUT_S` to finish). No HTTP worker stops while a
    /// request is in flight on any of them.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let draining = self.state.draining.clone();
        let (drain, sink, connections, requests) = (self.drain, self.sink, self.connections, self.requests);
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::spawn(async move {
            let interrupted = tokio::select! {
                _ = term.recv() => false,
                _ = int.recv() => true,
            };
            let drain = if interrupted { Duration::ZERO } else { drain };
            tracing::info!(drain_ms = drain.as_millis() as u64, "stopping: draining");
            draining.store(true, Ordering::Relaxed);
            let interrupted = interrupted
                || tokio::select! {
                    _ = tokio::time::sleep(drain) => false,
                    _ = int.recv() => true,
                };
            if let Err(e) = sink.turn_away() {
                tracing::warn!(error = %e, "cannot turn new connections away; closing the listener as it is");
            }
            tokio::time::sleep(HANDSHAKES_SETTLE).await;
            // Closing a connection its client may be sending a request on would lose that request: each
            // closes by itself, after its response (which says `Connection: close`) or its keep-alive.
            // Those still open after SHUTDOWN_TIMEOUT_S are closed at once.
            let closed = interrupted
                || tokio::select! {
                    closed = connections.none_within(Duration::from_secs(SHUTDOWN_TIMEOUT_S), "connections") => closed,
                    _ = int.recv() => true,
                };
            // A worker stops as soon as it has no connection of its own, ending the database connections
            // and coalescing runners it started, which requests on other workers may be using: none may
            // stop while a request is in flight.
            let graceful =
                closed && requests.none_within(Duration::from_secs(SHUTDOWN_TIMEOUT_S), "requests").await;
            handle.stop(graceful).await;
            drop(sink);
        });
        self.server.await?;
        self.state.db().close();
        tracing::info!("stopped");
        Ok(())
    }
}

/// How many of something the node has open (HTTP connections, requests in flight): each holds an
/// [`Open`] guard, dropped when it is gone.
#[derive(Debug, Clone, Default)]
struct OpenCount(Arc<AtomicUsize>);

/// One counted thing, counted in its [`OpenCount`] while it lives.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl OpenCount {
    fn open(&self) -> Open {
        self.0.fetch_add(1, Ordering::Relaxed);
        Open(Arc::clone(&self.0))
    }

    /// Waits until none is open (true), for at most `within` (false).
    async fn none_within(&self, within: Duration, what: &str) -> bool {
        let deadline = Instant::now() + within;
        while self.0.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let open = self.0.load(Ordering::Relaxed);
        if open > 0 {
            tracing::warn!(open, "{what} still open; closing them");
        }
        open == 0
    }
}

/// Applies pending migrations over a dedicated connection, retrying while the database is unreachable;
/// a server that refuses the node (its certificate, or `pg_hba.conf`) fails at once.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    let target = config.target()?;
    let deadline = Instant::now() + STARTUP_DB_WAIT;
    let mut client = loop {
        match target.connect().await {
            Ok(client) => break client,
            Err(e) if Instant::now() < deadline && !refused(&e) => {
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

/// Refused in a way waiting does not mend: the TLS handshake failed (a certificate not from
/// `sslrootcert`'s CA, or for another name), or `pg_hba.conf` has no entry for the node (28000; such as a
/// connection without TLS to a server that accepts TLS only).
fn refused(e: &tokio_postgres::Error) -> bool {
    tls::is_tls_error(e) || e.code() == Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
}
