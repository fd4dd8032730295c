//! What the tests of the high-availability fleet share: a Patroni cluster, nodes on it, and how to read
//! who served a reply and the write's token.

use fleet_app::routes::{LSN, MIN_LSN, SERVED_BY};
use fleet_local::{Node, PatroniCluster, PatroniOptions};

use crate::{node_options_on, test_log, Api, Reply};

/// A 3-member Patroni cluster (one leader, a synchronous standby, an asynchronous replica).
pub fn start_cluster() -> PatroniCluster {
    PatroniCluster::start(PatroniOptions { quiet: !test_log(), ..PatroniOptions::default() })
        .expect("start a 3-member Patroni cluster")
}

/// Runs `sql` through `url` (a libpq-style URL, multi-host allowed) with tokio-postgres, as the nodes
/// connect; returns the first column of every row, as text.
pub fn query(url: &str, sql: &str) -> Result<Vec<String>, tokio_postgres::Error> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    runtime.block_on(query_async(url, sql))
}

/// [`query`] from async code.
pub async fn query_async(url: &str, sql: &str) -> Result<Vec<String>, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let rows = client.simple_query(sql).await?;
    Ok(rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row.get(0).unwrap_or_default().to_owned()),
            _ => None,
        })
        .collect())
}

/// A node on `cluster`: writes through its read-write URL, reads through `read_url`, `env` last.
pub fn node_on(cluster: &PatroniCluster, read_url: &str, env: &[(&str, &str)]) -> Node {
    let all: Vec<(&str, &str)> =
        [("DATABASE_READ_URL", read_url)].into_iter().chain(env.iter().copied()).collect();
    Node::spawn(node_options_on(cluster.url(), "app-1", &all)).expect("start a node on the cluster")
}

/// `cluster`'s read URL narrowed to one member: `postgres://u:p@<that host>/db?…`.
pub fn member_read_url(cluster: &PatroniCluster, member: &str) -> String {
    let url = cluster.read_url();
    let (scheme_and_user, rest) = url.split_once('@').unwrap();
    let (_, path) = rest.split_once('/').unwrap();
    format!("{scheme_and_user}@127.0.0.1:{}/{path}", cluster.port(member).unwrap())
}

/// Who served `reply` (its `X-Fleet-Served-By`), with a replica's `address:port` turned into its member.
pub fn served_by(cluster: &PatroniCluster, reply: &Reply) -> Option<String> {
    let header = reply.headers.get(SERVED_BY)?.to_str().unwrap().to_owned();
    let Some(address) = header.strip_prefix("replica:") else { return Some(header) };
    let member = cluster
        .member_names()
        .into_iter()
        .find(|m| address == format!("127.0.0.1:{}", cluster.port(m).unwrap()));
    Some(format!("replica:{}", member.unwrap_or_else(|| panic!("{header} names no member"))))
}

/// `GET /api/counters/{key}`, with `X-Fleet-Min-Lsn: min_lsn` when given.
pub async fn read_counter(api: &Api, key: &str, min_lsn: Option<&str>) -> Reply {
    let headers: Vec<(&str, &str)> = min_lsn.map(|lsn| (MIN_LSN, lsn)).into_iter().collect();
    api.get_with(&format!("/api/counters/{key}"), &headers).await
}

/// The `X-Fleet-Lsn` of a write's reply.
pub fn lsn(reply: &Reply) -> String {
    let lsn = reply.headers.get(LSN).unwrap_or_else(|| panic!("a write without X-Fleet-Lsn: {reply:?}"));
    lsn.to_str().unwrap().to_owned()
}
