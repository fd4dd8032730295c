//! Prometheus metrics: one `Metrics` owns its registry; pool gauges are read from the pool at scrape time.

use deadpool_postgres::Status;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

const NAMESPACE: &str = "fleet";

/// Buckets of the batch-size histograms.
const BATCH_SIZES: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// Every metric a node exports, each named `fleet_…` and described by its help text below.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    pool_max_connections: IntGauge,
    pool_connections: IntGaugeVec,
    pool_waiting_requests: IntGauge,
    pub pool_wait: Histogram,
    pub db_errors: IntCounterVec,
    pub transaction_retries: IntCounterVec,
    pub increments: IntCounter,
    pub increment_batch_size: Histogram,
    pub bulk_insert_rows: IntCounter,
    pub reads: IntCounterVec,
    pub read_batch_size: Histogram,
    pub read_fallbacks: IntCounterVec,
}

impl Metrics {
    pub fn new() -> anyhow::Result<Self> {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace(NAMESPACE);
        let hist = |name: &str, help: &str| HistogramOpts::new(name, help).namespace(NAMESPACE);
        let metrics = Metrics {
            http_requests: IntCounterVec::new(
                opts("http_requests_total", "HTTP requests served, by route pattern, method and status."),
                &["route", "method", "status"],
            )?,
            http_request_duration: HistogramVec::new(
                hist("http_request_duration_seconds", "HTTP request latency, by route pattern and method."),
                &["route", "method"],
            )?,
            pool_max_connections: IntGauge::with_opts(opts(
                "db_pool_max_connections",
                "Most connections this node's pool may open.",
            ))?,
            pool_connections: IntGaugeVec::new(
                opts("db_pool_connections", "Open pooled connections, by state."),
                &["state"],
            )?,
            pool_waiting_requests: IntGauge::with_opts(opts(
                "db_pool_waiting_requests",
                "Requests waiting for a pooled connection.",
            ))?,
            pool_wait: Histogram::with_opts(
                hist("db_pool_wait_seconds", "Time spent waiting for a pooled connection.").buckets(vec![
                    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            )?,
            db_errors: IntCounterVec::new(
                opts("db_errors_total", "Database errors, by SQLSTATE (08006 for a lost connection)."),
                &["sqlstate"],
            )?,
            transaction_retries: IntCounterVec::new(
                opts(
                    "db_transaction_retries_total",
                    "Transactions retried, by the SQLSTATE that aborted them.",
                ),
                &["sqlstate"],
            )?,
            increments: IntCounter::with_opts(opts("increments_total", "Counter increments committed."))?,
            increment_batch_size: Histogram::with_opts(
                hist("increment_batch_size", "Increments committed per counter transaction (coalescing).")
                    .buckets(BATCH_SIZES.to_vec()),
            )?,
            bulk_insert_rows: IntCounter::with_opts(opts(
                "bulk_insert_rows_total",
                "Rows committed by bulk inserts.",
            ))?,
            reads: IntCounterVec::new(
                opts(
                    "db_reads_total",
                    "Database reads of counters (a batch of them counts once) and statistics, by who served them \
                     (primary, replica).",
                ),
                &["served_by"],
            )?,
            read_batch_size: Histogram::with_opts(
                hist("read_batch_size", "Counter reads answered per database read (coalescing).")
                    .buckets(BATCH_SIZES.to_vec()),
            )?,
            read_fallbacks: IntCounterVec::new(
                opts(
                    "db_read_fallbacks_total",
                    "Reads a replica could not serve (lagging: not shown current within READ_MAX_LAG_MS; \
                     behind the read's token; busy: every read connection in use; unavailable), served by \
                     the primary instead.",
                ),
                &["reason"],
            )?,
            registry,
        };
        // Export the SQLSTATEs the node handles by name from the first scrape on, at 0.
        for sqlstate in ["40001", "40P01"] {
            metrics.transaction_retries.with_label_values(&[sqlstate]);
        }
        for sqlstate in ["40001", "40P01", "23505", "08006", "57014"] {
            metrics.db_errors.with_label_values(&[sqlstate]);
        }
        for served_by in ["primary", "replica"] {
            metrics.reads.with_label_values(&[served_by]);
        }
        for reason in ["lagging", "behind", "busy", "unavailable"] {
            metrics.read_fallbacks.with_label_values(&[reason]);
        }
        let build_info = IntGaugeVec::new(opts("build_info", "Always 1; the node's version."), &["version"])?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let r = &metrics.registry;
        r.register(Box::new(metrics.http_requests.clone()))?;
        r.register(Box::new(metrics.http_request_duration.clone()))?;
        r.register(Box::new(metrics.pool_max_connections.clone()))?;
        r.register(Box::new(metrics.pool_connections.clone()))?;
        r.register(Box::new(metrics.pool_waiting_requests.clone()))?;
        r.register(Box::new(metrics.pool_wait.clone()))?;
        r.register(Box::new(metrics.db_errors.clone()))?;
        r.register(Box::new(metrics.transaction_retries.clone()))?;
        r.register(Box::new(metrics.increments.clone()))?;
        r.register(Box::new(metrics.increment_batch_size.clone()))?;
        r.register(Box::new(metrics.read_batch_size.clone()))?;
        r.register(Box::new(metrics.bulk_insert_rows.clone()))?;
        r.register(Box::new(metrics.reads.clone()))?;
        r.register(Box::new(metrics.read_fallbacks.clone()))?;
        r.register(Box::new(build_info))?;
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(metrics)
    }

    /// The text exposition of every metric, with the pool gauges set from `pool` first.
    pub fn render(&self, pool: Status) -> anyhow::Result<String> {
        self.pool_max_connections.set(pool.max_size as i64);
        self.pool_connections.with_label_values(&["idle"]).set(pool.available as i64);
        self.pool_connections
            .with_label_values(&["in_use"])
            .set(pool.size.saturating_sub(pool.available) as i64);
        self.pool_waiting_requests.set(pool.waiting as i64);
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        Ok(String::from_utf8(out)?)
    }
}
