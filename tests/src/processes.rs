//! What the tests read about processes from `/proc`: who runs them, what they descend from, what their
//! command lines name.

use std::path::Path;

use nix::unistd::Pid;

/// Every process whose chain of parents reaches `pid`, `pid` excluded.
pub fn descendants(pid: u32) -> Vec<u32> {
    let root = Pid::from_raw(i32::try_from(pid).expect("a PID"));
    let found = fleet_local::descendants(root).expect("walk the process tree");
    found.into_iter().map(|pid| u32::try_from(pid.as_raw()).expect("a PID")).collect()
}

/// The real user id of process `pid`.
pub fn uid(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read the process's status");
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:")).expect("a Uid line");
    line.split_whitespace().next().and_then(|uid| uid.parse().ok()).expect("a user id")
}

/// The command line of every process that names `path` in it (arguments joined by spaces).
pub fn processes_naming(path: &Path) -> Vec<String> {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .expect("list /proc")
        .filter_map(|entry| {
            let cmdline = std::fs::read(entry.ok()?.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&needle).then_some(cmdline)
        })
        .collect()
}
