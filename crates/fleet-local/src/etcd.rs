//! A one-member etcd on loopback: the store Patroni keeps its leader lock and cluster state in.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::bins::etcd_bin;
use crate::{free_port, Child};

/// How long etcd may take to answer `/health`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running etcd, stopped (SIGTERM) when dropped. Its data lives in the directory it was given.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    client_port: u16,
}

impl Etcd {
    /// Starts etcd with its data in `dir/etcd`, clients on a free 127.0.0.1 port, and waits until it is
    /// healthy. Its output also goes to `<logs>/etcd.log`, if given.
    pub fn start(dir: &Path, quiet: bool, logs: Option<&Path>) -> anyhow::Result<Etcd> {
        let (client_port, peer_port) = (free_port()?, free_port()?);
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(etcd_bin()?);
        cmd.arg("--name=etcd")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=etcd={peer}"))
            .args(["--log-level=warn", "--logger=zap"])
            // Debian's etcd 3.4 serves the v3 API's JSON gateway (which Patroni's etcd3 store uses) by default.
            .current_dir(dir);
        let mut child = match logs {
            Some(logs) => Child::spawn_logged("etcd", cmd, quiet, &logs.join("etcd.log"))?,
            None => Child::spawn("etcd", cmd, quiet)?,
        };
        child
            .wait_for_http(&format!("{client}/health"), Instant::now() + READY_TIMEOUT)
            .context("etcd did not become healthy")?;
        Ok(Etcd { child, client_port })
    }

    /// `host:port` for clients.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }
}
