//! A local fleet's nginx: its config file, its process (the service user's) and its reload when a node
//! is taken out of the round robin.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use nix::sys::signal::{self, Signal};
use nix::unistd::{Pid, User};

use super::{local_config, Upstream};
use crate::component::{spawn_ready, Component, Log};
use crate::files::write_new;
use crate::users::service_user;
use crate::{nginx_bin, proctree, Child};

/// How long nginx may take to start new workers after a reload.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);

/// How to start a local fleet's nginx.
#[derive(Debug, Clone)]
pub struct NginxOptions {
    /// Where its config, pid file and temp files go: a directory of the service user's.
    pub dir: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// The nodes it balances over.
    pub upstreams: Vec<Upstream>,
    /// Who it admits to the lab and operator endpoints (see [`super::OPERATOR_NETWORKS`]).
    pub operator_networks: Vec<String>,
    /// Which proxies it believes about the client (see [`super::trusted_proxies_conf`]).
    pub trusted_proxies: Vec<String>,
    pub log: Log,
}

/// A running nginx, stopped when dropped.
#[derive(Debug)]
pub struct Nginx {
    opts: NginxOptions,
    /// Who it runs as (see [`crate::users`]).
    user: Option<User>,
    /// Nodes taken out of its round robin.
    out_of_rotation: Vec<String>,
    child: Child,
}

impl Nginx {
    /// Starts nginx as the service user; returns once it answers its `/nginx-health`.
    pub fn start(opts: NginxOptions) -> anyhow::Result<Nginx> {
        let user = service_user()?;
        let conf = write_config(&opts, user.as_ref(), &[])?;
        let mut cmd = Command::new(nginx_bin()?);
        cmd.arg("-c").arg(&conf).arg("-p").arg(&opts.dir);
        let health = format!("http://127.0.0.1:{}/nginx-health", opts.port);
        let child = spawn_ready("nginx", cmd, &opts.log, &health)?;
        Ok(Nginx { opts, user, out_of_rotation: Vec::new(), child })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.address())
    }

    /// Waits until `path` (`/app-1/health/ready`) answers 200 through nginx, failing early if nginx exits.
    pub fn wait_for_path(&mut self, path: &str, deadline: Instant) -> anyhow::Result<()> {
        let url = format!("{}{path}", self.url());
        self.child.wait_for_http(&url, deadline)
    }

    /// Marks node `name` down in the round robin and reloads; returns once the new workers run, so no
    /// new request is sent to that node (its pinned route `/app-N/` stays).
    pub fn take_out_of_rotation(&mut self, name: &str) -> anyhow::Result<()> {
        self.out_of_rotation.push(name.to_owned());
        write_config(&self.opts, self.user.as_ref(), &self.out_of_rotation)?;
        let master = Pid::from_raw(i32::try_from(self.child.pid()).context("PID out of range")?);
        let old_workers = proctree::descendants(master)?;
        signal::kill(master, Signal::SIGHUP).context("cannot ask nginx to reload")?;
        let deadline = Instant::now() + RELOAD_TIMEOUT;
        while proctree::descendants(master)?.iter().all(|pid| old_workers.contains(pid)) {
            ensure!(
                self.child.is_running() && Instant::now() < deadline,
                "nginx did not start new workers after a reload; its last output:\n{}",
                self.child.recent_output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Component for Nginx {
    fn processes(&mut self) -> Vec<&mut Child> {
        vec![&mut self.child]
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.opts.port)
    }
}

/// Writes `<dir>/nginx.conf` (readable by `user`, who runs nginx) with the nodes named in
/// `out_of_rotation` out of the round robin; returns its path.
fn write_config(
    opts: &NginxOptions,
    user: Option<&User>,
    out_of_rotation: &[String],
) -> anyhow::Result<PathBuf> {
    let conf = opts.dir.join("nginx.conf");
    let listen = format!("127.0.0.1:{}", opts.port);
    let text = local_config(
        &opts.dir,
        &listen,
        &opts.upstreams,
        out_of_rotation,
        &opts.operator_networks,
        &opts.trusted_proxies,
    );
    write_new(&conf, text.as_bytes(), 0o600, user)?;
    Ok(conf)
}
