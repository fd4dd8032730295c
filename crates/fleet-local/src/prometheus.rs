//! Prometheus's configuration: one renderer for the compose file's `deploy/prometheus/prometheus.yml`
//! and the local launcher's, both scraping every node directly (never through nginx, which would show
//! one random node per scrape).

use std::fmt::Write as _;

use crate::nginx::Upstream;

/// The job every node is scraped under; dashboards and rules select `job="fleet-app"`.
const NODE_JOB: &str = "fleet-app";
/// The job PostgreSQL's exporter is scraped under.
const POSTGRES_JOB: &str = "postgres";
/// Prometheus's own address in the compose file (its default listen port).
pub const COMPOSE_SELF_ADDRESS: &str = "localhost:9090";
/// PostgreSQL's exporter in the compose file (its service and default port).
pub const COMPOSE_EXPORTER_ADDRESS: &str = "postgres-exporter:9187";

/// prometheus.yml scraping every node's `/metrics` directly (job `fleet-app`, one target per node, label
/// `container="app-N"`), PostgreSQL's exporter (job `postgres` at `exporter`), plus Prometheus itself
/// (job `prometheus` at `self_address`), loading
/// `rule_files`. `scrape_interval` (a Prometheus duration, `"5s"`) is also the rule evaluation interval;
/// the scrape timeout follows Prometheus's default, capped at the interval.
///
/// One renderer for both compose (`deploy/prometheus/prometheus.yml`: targets `app-N:3000`, rules at
/// `/etc/prometheus/rules.yml`) and a local fleet (loopback targets, temp paths).
pub fn config(
    nodes: &[Upstream],
    scrape_interval: &str,
    rule_files: &[&str],
    self_address: &str,
    exporter: &str,
) -> String {
    let mut out = String::new();
    out.push_str(HEADER);
    out.push_str("global:\n");
    let _ = writeln!(out, "  scrape_interval: {scrape_interval}");
    let _ = writeln!(out, "  evaluation_interval: {scrape_interval}");
    out.push('\n');
    if rule_files.is_empty() {
        out.push_str("rule_files: []\n");
    } else {
        out.push_str("rule_files:\n");
        for file in rule_files {
            let _ = writeln!(out, "  - {}", quote(file));
        }
    }
    out.push('\n');
    out.push_str("scrape_configs:\n");
    out.push_str("  - job_name: prometheus\n");
    out.push_str("    static_configs:\n");
    let _ = writeln!(out, "      - targets: [{}]", quote(self_address));
    out.push('\n');
    let _ = writeln!(out, "  - job_name: {POSTGRES_JOB}");
    out.push_str("    static_configs:\n");
    let _ = writeln!(out, "      - targets: [{}]", quote(exporter));
    out.push('\n');
    let _ = writeln!(out, "  - job_name: {NODE_JOB}");
    out.push_str("    metrics_path: /metrics\n");
    out.push_str(if nodes.is_empty() { "    static_configs: []\n" } else { "    static_configs:\n" });
    for node in nodes {
        let _ = writeln!(out, "      - targets: [{}]", quote(&node.address));
        out.push_str("        labels:\n");
        let _ = writeln!(out, "          container: {}", quote(&node.name));
    }
    out
}

const HEADER: &str = "# Scrapes every fleet node directly. Rendered by fleet_local::prometheus::config: edit that,
# not this file (the compose copy is refreshed with `UPDATE_GOLDEN=1 cargo test -p fleet-tests --test deploy`).
";

/// A double-quoted YAML string.
fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_node_is_its_own_target_labelled_with_its_name() {
        let nodes = [
            Upstream { name: "app-1".into(), address: "127.0.0.1:41001".into() },
            Upstream { name: "app-2".into(), address: "127.0.0.1:41002".into() },
        ];
        let yml = config(&nodes, "1s", &["/tmp/a dir/rules.yml"], "127.0.0.1:9999", "127.0.0.1:9187");
        assert!(
            yml.contains(
                "  - job_name: postgres\n    static_configs:\n      - targets: [\"127.0.0.1:9187\"]\n"
            ),
            "{yml}"
        );
        assert!(yml.contains("  scrape_interval: 1s\n"), "{yml}");
        assert!(yml.contains("  - \"/tmp/a dir/rules.yml\"\n"), "{yml}");
        for (i, node) in nodes.iter().enumerate() {
            let target = format!(
                "      - targets: [\"{}\"]\n        labels:\n          container: \"app-{}\"\n",
                node.address,
                i + 1
            );
            assert!(yml.contains(&target), "{yml}");
        }
    }
}
