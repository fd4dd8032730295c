//! A fleet-app node process: spawned with its environment (as the service user when we are root), ready
//! once `/health/ready` answers 200; [`Node::launch`] and [`Node::wait_ready`] apart, so that several
//! nodes start at the same instant.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::Signal;
use secrecy::{ExposeSecret, SecretString};

use crate::component::{Component, Log};
use crate::process::Child;
use crate::users::{run_as, service_user};

/// How long a node may take to listen and become ready (migrations included).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node gets to finish its in-flight requests on SIGINT before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(35);
/// What the node prints once bound, followed by its address: `fleet-app listening on http://127.0.0.1:43567`.
const LISTENING: &str = "listening on http://";

/// glibc's allocator, left to itself, raises its mmap threshold after freeing a large block, so later
/// multi-megabyte request bodies come from the heap and stay resident once freed; a fixed threshold
/// returns them to the system (deploy/Dockerfile sets the same).
const MALLOC_MMAP_THRESHOLD: (&str, &str) = ("MALLOC_MMAP_THRESHOLD_", "131072");

/// How to run a node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The `fleet-app` binary.
    pub bin: PathBuf,
    /// `CONTAINER_ID`, also the prefix of its output lines (`app-1`).
    pub container_id: String,
    /// `DATABASE_URL` (it holds a password).
    pub database_url: SecretString,
    /// `POOL_SIZE`: database connections this node may open.
    pub pool_size: u32,
    /// `PORT` on 127.0.0.1; 0 = an ephemeral port, read back from the node's log.
    pub port: u16,
    /// More environment variables, applied last (they override the ones above); a value may hold a
    /// password (`DATABASE_READ_URL`).
    pub env: Vec<(String, SecretString)>,
    /// Keep the node's output out of our stderr (it is still quoted in errors).
    pub quiet: bool,
    /// Append the node's output to this file too.
    pub log_file: Option<PathBuf>,
}

/// A running node; dropping it stops the process (SIGTERM, then SIGKILL).
#[derive(Debug)]
pub struct Node {
    container_id: String,
    port: u16,
    child: Child,
}

impl Node {
    /// Spawns `bin serve` and waits until it is ready (see [`Node::launch`] and [`Node::wait_ready`]).
    pub fn spawn(opts: NodeOptions) -> anyhow::Result<Node> {
        let mut node = Node::launch(opts)?;
        node.wait_ready()?;
        Ok(node)
    }

    /// Spawns `bin serve` without waiting: several nodes launched back to back start at the same instant.
    pub fn launch(opts: NodeOptions) -> anyhow::Result<Node> {
        let mut cmd = Command::new(&opts.bin);
        cmd.arg("serve")
            .env("CONTAINER_ID", &opts.container_id)
            .env("DATABASE_URL", opts.database_url.expose_secret())
            .env("POOL_SIZE", opts.pool_size.to_string())
            .env("PORT", opts.port.to_string())
            .env("HOST", "127.0.0.1")
            .env("LOG_FORMAT", "text")
            .env(MALLOC_MMAP_THRESHOLD.0, MALLOC_MMAP_THRESHOLD.1);
        // Colour codes only where they are shown as colours: our terminal, and no file.
        if opts.quiet || opts.log_file.is_some() || !std::io::stderr().is_terminal() {
            cmd.env("NO_COLOR", "1");
        }
        cmd.envs(opts.env.iter().map(|(name, value)| (name, value.expose_secret())));
        run_as(&mut cmd, service_user()?.as_ref());
        let log = Log { quiet: opts.quiet, file: opts.log_file };
        let child = log
            .spawn(&opts.container_id, cmd)
            .with_context(|| format!("cannot start node {}", opts.container_id))?;
        Ok(Node { container_id: opts.container_id, port: 0, child })
    }

    /// Waits for the "listening on http://HOST:PORT" line, then polls `GET /health/ready` until it
    /// answers 200, failing early (with the node's recent output) if the process exits.
    pub fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let line = self.child.wait_for_line(LISTENING, READY_TIMEOUT)?;
        self.port = parse_listening_port(&line)
            .with_context(|| format!("cannot read the port from {}'s line {line:?}", self.container_id))?;
        self.child.wait_for_http(&format!("{}/health/ready", self.url()), deadline)?;
        tracing::info!(node = %self.container_id, url = %self.url(), "node ready");
        Ok(())
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address())
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Its `CONTAINER_ID`.
    pub fn container_id(&self) -> &str {
        &self.container_id
    }

    /// The process, to stop, kill or inspect it.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Component for Node {
    fn processes(&mut self) -> Vec<&mut Child> {
        vec![&mut self.child]
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGINT: the node stops at once, after its in-flight requests (no drain: it is out of nginx's
    /// round robin already, or nginx has stopped). An exit with an error is logged, not returned.
    fn stop(&mut self) -> anyhow::Result<()> {
        let status = self.child.stop(Signal::SIGINT, STOP_GRACE)?;
        if !status.success() && status.code().is_some() {
            tracing::warn!(node = %self.container_id, %status, "node exited with an error");
        }
        Ok(())
    }
}

/// The port in a line like `… listening on http://127.0.0.1:43567 …`: the address runs from
/// "http://" to the first character that is not `[0-9A-Za-z.:]`, the port after its last `:`.
fn parse_listening_port(line: &str) -> Option<u16> {
    let start = line.find(LISTENING)? + LISTENING.len();
    let rest = &line[start..];
    let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == ':')).unwrap_or(rest.len());
    let (_host, port) = rest[..end].rsplit_once(':')?;
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_read_from_a_plain_line() {
        let line = "fleet-app listening on http://127.0.0.1:43567";
        assert_eq!(parse_listening_port(line), Some(43567));
    }

    #[test]
    fn the_address_ends_at_punctuation_quotes_or_colour_codes() {
        let cases = [
            "2025-01-01T00:00:00Z  INFO fleet_app: fleet-app listening on http://127.0.0.1:8081, workers=2",
            "INFO listening on http://localhost:8081\u{1b}[0m",
            "msg=\"listening on http://127.0.0.1:8081\" pool=5",
            "listening on http://127.0.0.1:8081/",
        ];
        for line in cases {
            assert_eq!(parse_listening_port(line), Some(8081), "{line}");
        }
    }

    #[test]
    fn a_line_without_a_port_gives_none() {
        assert_eq!(parse_listening_port("listening on http://127.0.0.1"), None);
        assert_eq!(parse_listening_port("listening on http://127.0.0.1:99999"), None);
        assert_eq!(parse_listening_port("started"), None);
    }

    #[test]
    fn debug_output_hides_the_database_password() {
        let opts = NodeOptions {
            bin: PathBuf::from("fleet-app"),
            container_id: "app-1".to_owned(),
            database_url: "postgres://appuser:apppass@127.0.0.1:5432/appdb".into(),
            pool_size: 5,
            port: 0,
            env: vec![("DB_SECRET".to_owned(), "hunter2".into())],
            quiet: true,
            log_file: None,
        };
        let debug = format!("{opts:?}");
        assert!(!debug.contains("apppass") && !debug.contains("hunter2"), "{debug}");
    }
}
