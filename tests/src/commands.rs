//! `fleetctl`'s command line as the tests run it: `up` as a child, other commands to completion.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::{built_bin, node_bin, test_log};

/// `fleetctl`'s command line.
pub fn fleetctl_bin() -> PathBuf {
    built_bin("test-fleetctl")
}

/// `fleetctl up --port 0 --dir <dir> <args>` as a child, once it has printed `fleet ready: <url>`;
/// returns it and that URL.
pub fn fleetctl_up(dir: &Path, args: &[&str]) -> (fleet_local::Child, String) {
    let mut up = Command::new(fleetctl_bin());
    up.args(["up", "--port", "0", "--dir"]).arg(dir).args(args).env("FLEET_APP_BIN", node_bin());
    let up = fleet_local::Child::spawn("fleetctl", up, !test_log()).expect("start fleetctl up");
    let ready = up.wait_for_line("fleet ready: http://127.0.0.1:", Duration::from_secs(90)).unwrap();
    let url = ready.trim_start_matches("fleet ready: ").trim().to_owned();
    (up, url)
}

/// Runs `fleetctl <args> --dir <dir>` to completion, whatever its exit status.
pub fn fleetctl_output(dir: &Path, args: &[&str]) -> Output {
    Command::new(fleetctl_bin()).args(args).arg("--dir").arg(dir).output().expect("run fleetctl")
}

/// Runs `fleetctl <args> --dir <dir>`, asserting it succeeds; returns its standard output.
pub fn fleetctl(dir: &Path, args: &[&str]) -> String {
    let out = fleetctl_output(dir, args);
    assert!(out.status.success(), "fleetctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}
