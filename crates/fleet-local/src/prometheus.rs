//! Prometheus, scraping every node directly (never through nginx, which would show one random node per
//! scrape): its configuration, which the compose file's `deploy/prometheus/prometheus.yml` shares (it
//! finds its targets by name instead, under the same jobs and labels; a test keeps them equal), and the
//! local fleet's Prometheus process.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::component::{spawn_ready, Component, Log};
use crate::files::write_new;
use crate::nginx::Upstream;
use crate::users::service_user;
use crate::{free_port, prometheus_bin, quote, Child};

/// How long Prometheus gets to stop on SIGTERM (it writes its head block) before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often a local fleet's Prometheus scrapes and evaluates.
const SCRAPE_INTERVAL: &str = "1s";

/// The job every node is scraped under; dashboards and rules select `job="fleet-app"`.
pub const NODE_JOB: &str = "fleet-app";
/// The job every Patroni is scraped under (its REST API's `/metrics`).
pub const PATRONI_JOB: &str = "patroni";
/// The job PostgreSQL's exporter is scraped under.
pub const POSTGRES_JOB: &str = "postgres";

/// What Prometheus scrapes besides itself.
#[derive(Debug, Clone, Copy)]
pub struct Targets<'a> {
    /// Every node (job `fleet-app`, label `container="app-N"`).
    pub nodes: &'a [Upstream],
    /// PostgreSQL's exporter (job `postgres`), if there is one.
    pub exporter: Option<&'a str>,
    /// Every Patroni's REST API (job `patroni`, its `/metrics`, label `member="pg-N"`).
    pub patroni: &'a [Upstream],
}

/// prometheus.yml scraping every node's `/metrics` directly (job `fleet-app`, one target per node, label
/// `container="app-N"`), PostgreSQL's exporter (job `postgres`), every Patroni (job `patroni`), plus
/// Prometheus itself (job `prometheus` at `self_address`), loading
/// `rule_files`. `scrape_interval` (a Prometheus duration, `"5s"`) is also the rule evaluation interval;
/// the scrape timeout follows Prometheus's default, capped at the interval.
///
/// One renderer for both compose (`deploy/prometheus/prometheus.yml`: targets `app-N:3000`, rules at
/// `/etc/prometheus/rules.yml`) and a local fleet (loopback targets, temp paths).
pub fn config(
    targets: &Targets<'_>,
    scrape_interval: &str,
    rule_files: &[&str],
    self_address: &str,
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
    if let Some(exporter) = targets.exporter {
        let _ = writeln!(out, "  - job_name: {POSTGRES_JOB}");
        out.push_str("    static_configs:\n");
        let _ = writeln!(out, "      - targets: [{}]", quote(exporter));
        out.push('\n');
    }
    if !targets.patroni.is_empty() {
        job(&mut out, PATRONI_JOB, "member", targets.patroni);
        out.push('\n');
    }
    job(&mut out, NODE_JOB, "container", targets.nodes);
    out
}

/// A job scraping `/metrics` of each target, labelled `label: <its name>`.
fn job(out: &mut String, name: &str, label: &str, targets: &[Upstream]) {
    let _ = writeln!(out, "  - job_name: {name}");
    out.push_str("    metrics_path: /metrics\n");
    out.push_str(if targets.is_empty() { "    static_configs: []\n" } else { "    static_configs:\n" });
    for target in targets {
        let _ = writeln!(out, "      - targets: [{}]", quote(&target.address));
        out.push_str("        labels:\n");
        let _ = writeln!(out, "          {label}: {}", quote(&target.name));
    }
}

const HEADER: &str = "# Scrapes every fleet node directly. Rendered by fleet_local::prometheus::config.
";

/// How to start a local fleet's Prometheus.
#[derive(Debug)]
pub struct PrometheusOptions<'a> {
    /// Where its config and data go: a directory of the service user's.
    pub dir: PathBuf,
    pub targets: Targets<'a>,
    pub log: Log,
}

/// A running Prometheus, stopped when dropped.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    port: u16,
}

impl Prometheus {
    /// Starts Prometheus as the service user on a free loopback port, scraping `targets` every second;
    /// returns once it is ready.
    pub fn start(opts: PrometheusOptions<'_>) -> anyhow::Result<Prometheus> {
        let user = service_user()?;
        let conf = opts.dir.join("prometheus.yml");
        let port = free_port()?;
        let text = config(&opts.targets, SCRAPE_INTERVAL, &[], &format!("127.0.0.1:{port}"));
        write_new(&conf, text.as_bytes(), 0o600, user.as_ref())?;
        let mut cmd = Command::new(prometheus_bin("prometheus")?);
        cmd.arg(format!("--config.file={}", conf.display()))
            .arg(format!("--storage.tsdb.path={}", opts.dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"));
        let child = spawn_ready("prometheus", cmd, &opts.log, &format!("http://127.0.0.1:{port}/-/ready"))?;
        Ok(Prometheus { child, port })
    }
}

impl Component for Prometheus {
    fn processes(&mut self) -> Vec<&mut Child> {
        vec![&mut self.child]
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        self.child.terminate(STOP_GRACE)?;
        Ok(())
    }
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
        let targets = Targets { nodes: &nodes, exporter: Some("127.0.0.1:9187"), patroni: &[] };
        let yml = config(&targets, "1s", &["/tmp/a dir/rules.yml"], "127.0.0.1:9999");
        assert!(!yml.contains("patroni"), "{yml}");
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

    #[test]
    fn a_cluster_scrapes_every_patroni_and_no_exporter() {
        let nodes = [Upstream { name: "app-1".into(), address: "127.0.0.1:41001".into() }];
        let patroni = [
            Upstream { name: "pg-1".into(), address: "127.0.0.1:42001".into() },
            Upstream { name: "pg-2".into(), address: "127.0.0.1:42002".into() },
        ];
        let yml = config(&Targets { nodes: &nodes, exporter: None, patroni: &patroni }, "1s", &[], "x:1");
        assert!(!yml.contains("job_name: postgres"), "{yml}");
        assert!(
            yml.contains("  - job_name: patroni\n    metrics_path: /metrics\n    static_configs:\n      - targets: [\"127.0.0.1:42001\"]\n        labels:\n          member: \"pg-1\"\n"),
            "{yml}"
        );
        assert!(yml.contains("member: \"pg-2\""), "{yml}");
        assert!(yml.contains("container: \"app-1\""), "{yml}");
    }
}
