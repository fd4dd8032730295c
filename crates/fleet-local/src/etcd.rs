//! A one-member etcd on loopback: the store Patroni keeps its leader lock and cluster state in. It runs
//! as the service user, listens on 127.0.0.1 only (clients and peers), and serves only its `root` user
//! (etcd's v3 authentication), whose password the caller keeps: no other local user can read or change
//! who leads the cluster.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Value};

use crate::bins::etcd_bin;
use crate::component::{spawn_ready, Component, Log};
use crate::files::{hand_over_tree, private_dir};
use crate::users::service_user;
use crate::{free_port, Child};

/// etcd's user with every right (its `root` role); Patroni connects as it.
pub const ROOT_USER: &str = "root";

/// A running etcd, stopped (SIGTERM) when dropped. Its data lives in the directory it was given.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    client_port: u16,
}

/// How to start etcd.
#[derive(Debug)]
pub struct EtcdOptions<'a> {
    /// Its data goes to `<dir>/etcd` (the service user's).
    pub dir: &'a Path,
    /// [`ROOT_USER`]'s password (a kept etcd has authentication on already, with that password).
    pub password: &'a SecretString,
    pub log: Log,
}

impl Etcd {
    /// Starts etcd with clients on a free 127.0.0.1 port, waits until it is healthy, and turns its
    /// authentication on.
    pub fn start(opts: EtcdOptions<'_>) -> anyhow::Result<Etcd> {
        let user = service_user()?;
        let data_dir = opts.dir.join("etcd");
        if let Some(user) = &user {
            // A cluster kept from before etcd ran as the service user has root's files there.
            hand_over_tree(&data_dir, user)?;
        }
        private_dir(&data_dir, user.as_ref())?;
        let (client_port, peer_port) = (free_port()?, free_port()?);
        let client = format!("http://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(etcd_bin()?);
        cmd.arg("--name=etcd")
            .arg(format!("--data-dir={}", data_dir.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=etcd={peer}"))
            .args(["--log-level=warn", "--logger=zap"])
            // Debian's etcd 3.4 serves the v3 API's JSON gateway (which Patroni's etcd3 store uses) by default.
            .current_dir(opts.dir);
        let child = spawn_ready("etcd", cmd, &opts.log, &format!("{client}/health"))
            .context("etcd did not become healthy")?;
        let etcd = Etcd { child, client_port };
        etcd.require_authentication(opts.password.expose_secret())?;
        Ok(etcd)
    }

    /// Creates [`ROOT_USER`] with `password` and the `root` role, then turns authentication on; does
    /// nothing if that password already opens it.
    fn require_authentication(&self, password: &str) -> anyhow::Result<()> {
        let login = json!({"name": ROOT_USER, "password": password});
        if self.call("auth/authenticate", &login).is_ok() {
            return Ok(());
        }
        self.call("auth/user/add", &login)?;
        self.call("auth/role/add", &json!({"name": "root"}))?;
        self.call("auth/user/grant", &json!({"user": ROOT_USER, "role": "root"}))?;
        self.call("auth/enable", &json!({}))?;
        Ok(())
    }

    /// POSTs `body` to the v3 API's `path` (`auth/enable`); its error names the path, never the body.
    fn call(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let url = format!("http://{}/v3/{path}", self.address());
        match ureq::post(&url).timeout(Duration::from_secs(10)).send_json(body) {
            Ok(response) => response.into_json().with_context(|| format!("etcd's {path} answered no JSON")),
            Err(ureq::Error::Status(status, response)) => {
                let answer = response.into_string().unwrap_or_default();
                bail!("etcd refused {path} ({status}): {answer}")
            }
            Err(error) => Err(error).with_context(|| format!("cannot reach etcd's {path}")),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }
}

impl Component for Etcd {
    fn processes(&mut self) -> Vec<&mut Child> {
        vec![&mut self.child]
    }

    /// `host:port` for clients.
    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }
}
