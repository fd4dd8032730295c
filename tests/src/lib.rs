//! Helpers for the integration suite: a private PostgreSQL plus real `fleet-app` processes, and a client
//! with one method per endpoint. Child output shows only with `TEST_LOG=1`.

use std::path::PathBuf;
use std::time::Duration;

pub mod cluster;
pub mod commands;
pub mod compose;
pub mod ha;
pub mod history;
pub mod isolation;
pub mod load;
pub mod processes;
pub mod proxy;

pub use cluster::TestPostgres;
pub use commands::{fleetctl, fleetctl_bin, fleetctl_output, fleetctl_up};

use anyhow::Context;
use fleet_local::fleet::{Fleet, FleetOptions};
use fleet_local::{Node, NodeOptions, Postgres, PostgresOptions};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// A binary of this package, built from the workspace's current source (see `src/bin/`). Cargo builds a
/// package's binaries before its integration tests and puts them one level above the test executables.
pub(crate) fn built_bin(name: &str) -> PathBuf {
    let test_exe = std::env::current_exe().expect("the test executable's path");
    let bin = test_exe.parent().and_then(|deps| deps.parent()).map(|dir| dir.join(name));
    match bin {
        Some(bin) if bin.is_file() => bin,
        _ => panic!("{name} is not built next to {}; run the suite with `cargo test`", test_exe.display()),
    }
}

/// The node (`fleet-app`'s command line).
pub fn node_bin() -> PathBuf {
    built_bin("fleet-node")
}

/// A fleet of `nodes` nodes with pool `pool_size` behind nginx on a free port, with Prometheus.
pub fn start_fleet(nodes: u32, pool_size: u32, env: &[(&str, &str)]) -> Fleet {
    let mut opts = FleetOptions::new(node_bin());
    opts.nodes = nodes;
    opts.pool_size = pool_size;
    opts.port = 0;
    opts.quiet = !test_log();
    opts.durable = false;
    opts.node_env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Fleet::start(opts).expect("start a fleet")
}

/// The IPv4 loopback TCP sockets of the machine in `state` (`/proc/net/tcp`'s hex code: `01` established,
/// `06` TIME_WAIT), as (local port, remote port).
pub fn loopback_sockets(state: &str) -> Vec<(u16, u16)> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    let port =
        |address: &str| address.strip_prefix("0100007F:").and_then(|p| u16::from_str_radix(p, 16).ok());
    // Columns: slot, local address, remote address, state, …
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            (columns.get(3) == Some(&state)).then_some(())?;
            Some((port(columns.get(1)?)?, port(columns.get(2)?)?))
        })
        .collect()
}

/// How many threads of process `pid` serve HTTP (actix names them `actix-rt|system:N`).
pub fn http_worker_threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("read the node's threads")
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm")).is_ok_and(|c| c.starts_with("actix-rt|system"))
        })
        .count()
}

/// A `/proc/<pid>/status` field in bytes (`VmHWM`: peak resident set; `VmRSS`: resident now).
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read the process's status");
    let line = status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).expect(field);
    let kib: u64 = line.trim().trim_end_matches("kB").trim().parse().expect("a size in kB");
    kib * 1024
}

/// Whether child processes' output is shown (`TEST_LOG=1`).
pub fn test_log() -> bool {
    std::env::var_os("TEST_LOG").is_some_and(|v| !v.is_empty() && v != "0")
}

/// A private PostgreSQL for one test, copied from a template (see [`cluster`]); removed when dropped.
pub fn start_postgres() -> TestPostgres {
    TestPostgres::start(PostgresOptions::default()).expect("start a private PostgreSQL")
}

/// Options for a node called `id` on `pg`, with extra environment `env`.
pub fn node_options(pg: &Postgres, id: &str, env: &[(&str, &str)]) -> NodeOptions {
    node_options_on(pg.url(), id, env)
}

/// Options for a node called `id` on the database at `database_url`, pool 5, with extra environment `env`.
pub fn node_options_on(database_url: String, id: &str, env: &[(&str, &str)]) -> NodeOptions {
    NodeOptions {
        bin: node_bin(),
        container_id: id.to_owned(),
        database_url: database_url.into(),
        pool_size: 5,
        port: 0,
        env: env.iter().map(|(k, v)| (k.to_string(), (*v).into())).collect(),
        quiet: !test_log(),
        log_file: None,
    }
}

/// One HTTP response, body parsed as JSON (`Value::Null` when it is not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    /// The error `code` of an error body.
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or_default()
    }
}

/// The values the 200s among `replies` (increments) carry, asserting that none was handed out twice.
pub fn acknowledged_values<'a>(
    replies: impl IntoIterator<Item = &'a Reply>,
) -> std::collections::BTreeSet<i64> {
    let values: Vec<i64> = replies
        .into_iter()
        .filter(|r| r.status == StatusCode::OK)
        .map(|r| r.body["value"].as_i64().expect("a 200 carries the counter's value"))
        .collect();
    let distinct: std::collections::BTreeSet<i64> = values.iter().copied().collect();
    assert_eq!(distinct.len(), values.len(), "a value was handed out twice: {values:?}");
    distinct
}

/// An HTTP client for one node (or nginx) with one method per endpoint.
#[derive(Debug, Clone)]
pub struct Api {
    pub url: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(url: impl Into<String>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            // A node closes a connection idle for 5 s (actix's keep-alive); a request sent down one at that
            // moment is lost (IncompleteMessage). Idle ones are dropped well before, as nginx does (4 s).
            .pool_idle_timeout(Duration::from_secs(3))
            .build()
            .expect("build an HTTP client");
        Api { url: url.into(), http }
    }

    /// POSTs `body` verbatim (the node parses any body as JSON).
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> Reply {
        let response = self.http.post(format!("{}{path}", self.url)).body(body).send().await;
        reply(response.unwrap_or_else(|e| panic!("POST {path}: {e:?}"))).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.post_raw(path, body.to_string()).await
    }

    /// POST with request headers.
    pub async fn post_with(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
        let mut request = self.http.post(format!("{}{path}", self.url)).body(body.to_string());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        reply(request.send().await.unwrap_or_else(|e| panic!("POST {path}: {e}"))).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.get_with(path, &[]).await
    }

    /// GET with request headers.
    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut request = self.http.get(format!("{}{path}", self.url));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        reply(request.send().await.unwrap_or_else(|e| panic!("GET {path}: {e}"))).await
    }

    pub async fn increment(&self, key: &str) -> Reply {
        self.post("/api/increment", &json!({ "key": key })).await
    }

    pub async fn transfer(&self, from: &str, to: &str, amount: i64) -> Reply {
        self.post("/api/transfer", &json!({ "from": from, "to": to, "amount": amount })).await
    }

    pub async fn bulk_insert(&self, rows: &[String]) -> Reply {
        self.post("/api/bulk-insert", &json!({ "data": rows })).await
    }

    pub async fn hold(&self, ms: u64) -> Reply {
        self.post("/api/hold", &json!({ "ms": ms })).await
    }

    /// The `/metrics` text.
    pub async fn metrics_text(&self) -> String {
        let response = self.http.get(format!("{}/metrics", self.url)).send().await.expect("GET /metrics");
        response.text().await.expect("read /metrics")
    }

    /// The value of one sample, e.g. `fleet_db_transaction_retries_total{sqlstate="40P01"}`; 0 if absent.
    pub async fn metric(&self, sample: &str) -> f64 {
        sample_value(&self.metrics_text().await, sample)
    }
}

async fn reply(response: reqwest::Response) -> Reply {
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("read the body");
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply { status, headers, body }
}

/// The value of `sample` in Prometheus text `text`; 0 if absent.
pub fn sample_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A private PostgreSQL and one node on it. Drops the node first, then the database.
#[derive(Debug)]
pub struct TestApp {
    pub node: Node,
    pub pg: TestPostgres,
    pub api: Api,
}

impl TestApp {
    /// A fresh database and a node `app-1` with pool 5 and the extra environment `env`.
    pub fn spawn(env: &[(&str, &str)]) -> TestApp {
        let pg = start_postgres();
        let node = Node::spawn(node_options(&pg, "app-1", env)).expect("start a node");
        let api = Api::new(node.url());
        TestApp { node, pg, api }
    }

    /// A query result from the database as the superuser, through psql (`|`-separated columns).
    pub fn sql(&self, query: &str) -> String {
        self.pg.psql(query).with_context(|| format!("psql: {query}")).unwrap()
    }

    /// One integer from the database.
    pub fn sql_i64(&self, query: &str) -> i64 {
        let out = self.sql(query);
        out.parse().unwrap_or_else(|_| panic!("{query} returned {out:?}, not an integer"))
    }
}

/// One acknowledged transfer between two counters: how much it moved into the first counter (negative:
/// out of it), and the answer.
#[derive(Debug)]
pub struct Sent {
    pub into_first: i64,
    pub reply: Reply,
}

/// `total` transfers between counters `a` and `b`, alternating directions, `concurrency` in flight at
/// once, the i-th sent through `apis[i % apis.len()]` with amount i + 1: every amount is distinct, so a
/// transfer lost or applied twice changes the totals in a way no other mix of transfers can undo.
pub async fn opposite_transfers(apis: &[Api], a: &str, b: &str, total: i64, concurrency: usize) -> Vec<Sent> {
    use futures_util::StreamExt;
    futures_util::stream::iter(0..total)
        .map(|i| {
            let api = &apis[i as usize % apis.len()];
            let amount = i + 1;
            let (from, to, into_first) = if i % 2 == 0 { (a, b, -amount) } else { (b, a, amount) };
            async move { Sent { into_first, reply: api.transfer(from, to, amount).await } }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await
}

/// Every transfer answered 200, and the two counters hold exactly the net of them: `a` what moved into
/// it, `b` the opposite. `values` are the counters' values read back from the database.
pub fn assert_transfers_applied_exactly_once(sent: &[Sent], values: (i64, i64)) {
    let failed: Vec<&Sent> = sent.iter().filter(|s| s.reply.status != StatusCode::OK).collect();
    assert!(
        failed.is_empty(),
        "{} of {} transfers failed, first: {:?}",
        failed.len(),
        sent.len(),
        failed.first()
    );
    let net: i64 = sent.iter().map(|s| s.into_first).sum();
    assert_eq!(values, (net, -net), "each counter holds exactly the net of the acknowledged transfers");
}
