//! Process trees read from `/proc/<pid>/stat` (state and parent PID): freezing a server's whole tree with
//! SIGSTOP and thawing it with SIGCONT, killing a whole tree, and listing a process's descendants.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a process may take to act on SIGSTOP.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a killed tree's root may take to go.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Scans for descendants after the root stopped; a stopped root forks nothing, so the second finds none.
const MAX_SCANS: usize = 5;

/// Stops `root`, waits until it is stopped (so it forks nothing more), then stops every descendant and
/// waits for each. Returns the descendants, deepest last. On error, whatever was stopped is continued.
pub(crate) fn stop_tree(root: Pid) -> anyhow::Result<Vec<Pid>> {
    kill(root, Signal::SIGSTOP).with_context(|| format!("cannot send SIGSTOP to the postmaster ({root})"))?;
    let mut descendants = Vec::new();
    let stopped = stop_descendants(root, &mut descendants);
    if let Err(error) = stopped {
        continue_tree(root, &descendants);
        return Err(error);
    }
    Ok(descendants)
}

fn stop_descendants(root: Pid, stopped: &mut Vec<Pid>) -> anyhow::Result<()> {
    wait_until_stopped(root)?;
    for _ in 0..MAX_SCANS {
        let new: Vec<Pid> = descendants(root)?.into_iter().filter(|pid| !stopped.contains(pid)).collect();
        if new.is_empty() {
            return Ok(());
        }
        for pid in new {
            match kill(pid, Signal::SIGSTOP) {
                // It exited between the scan and the signal: nothing to stop.
                Err(Errno::ESRCH) => continue,
                result => result.with_context(|| format!("cannot send SIGSTOP to PID {pid}"))?,
            }
            stopped.push(pid);
            wait_until_stopped(pid)?;
        }
    }
    bail!("the postmaster's children kept changing while it was stopped")
}

/// SIGCONT to the descendants first, then to `root`: while `root` is stopped it reaps none of them, so
/// none of their PIDs can have been reused by another process. Errors are logged: a process that has
/// gone needs no thawing.
pub(crate) fn continue_tree(root: Pid, descendants: &[Pid]) {
    for &pid in descendants.iter().chain([&root]) {
        if let Err(error) = kill(pid, Signal::SIGCONT) {
            if error != Errno::ESRCH {
                tracing::warn!(%pid, %error, "cannot send SIGCONT");
            }
        }
    }
}

/// SIGKILL to `root` and every descendant (a postmaster's backends and helpers); waits until `root` is
/// gone. `root` is not our child (Patroni detaches its postmaster), so it is waited for, not reaped.
pub(crate) fn kill_tree(root: Pid) {
    let descendants = descendants(root).unwrap_or_default();
    for pid in std::iter::once(root).chain(descendants) {
        let _ = kill(pid, Signal::SIGKILL);
    }
    let deadline = Instant::now() + KILL_TIMEOUT;
    while kill(root, None).is_ok() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `pid` is stopped (`T`), or has exited.
pub(crate) fn wait_until_stopped(pid: Pid) -> anyhow::Result<()> {
    let deadline = Instant::now() + STOP_TIMEOUT;
    loop {
        match stat(pid) {
            None | Some(('T' | 't' | 'Z' | 'X', _)) => return Ok(()),
            Some(_) if Instant::now() >= deadline => {
                bail!("PID {pid} did not stop within {STOP_TIMEOUT:?} of SIGSTOP")
            }
            Some(_) => thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// Whether `pid` has finished exiting: gone, or a zombie its parent can reap. A process that is still
/// closing its files has no command line any more but is not yet waitable, so `/proc/<pid>/cmdline`
/// cannot tell this.
pub fn has_exited(pid: Pid) -> bool {
    matches!(stat(pid), None | Some(('Z' | 'X', _)))
}

/// Every process whose chain of parents reaches `root`, `root` excluded.
pub fn descendants(root: Pid) -> anyhow::Result<Vec<Pid>> {
    let mut children: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for entry in fs::read_dir("/proc").context("cannot list /proc")? {
        let Some(pid) = entry?.file_name().to_str().and_then(|name| name.parse::<i32>().ok()) else {
            continue;
        };
        if let Some((_, ppid)) = stat(Pid::from_raw(pid)) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut found = BTreeSet::new();
    let mut queue = vec![root.as_raw()];
    while let Some(parent) = queue.pop() {
        for &child in children.get(&parent).into_iter().flatten() {
            if found.insert(child) {
                queue.push(child);
            }
        }
    }
    Ok(found.into_iter().map(Pid::from_raw).collect())
}

/// A process's state letter and parent PID from `/proc/<pid>/stat`; `None` once it has gone.
/// The line is `pid (comm) state ppid …`, and `comm` may hold spaces and parentheses: fields are
/// read after its last `)`.
fn stat(pid: Pid) -> Option<(char, i32)> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(text: &str) -> Option<(char, i32)> {
    let mut fields = text.get(text.rfind(')')? + 1..)?.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;

    #[test]
    fn a_process_tree_is_stopped_whole_and_continued_whole() {
        // sh with two sleeping children (`sleep` twice keeps sh from exec'ing the last one).
        let mut sh = Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let root = Pid::from_raw(sh.id() as i32);
        let deadline = Instant::now() + Duration::from_secs(5);
        while descendants(root).unwrap().len() < 2 {
            assert!(Instant::now() < deadline, "sh never started its two children");
            thread::sleep(Duration::from_millis(10));
        }

        let stopped = stop_tree(root).unwrap();
        assert_eq!(stopped.len(), 2);
        for pid in stopped.iter().chain([&root]) {
            assert!(matches!(stat(*pid), Some(('T', _))), "{pid} is stopped: {:?}", stat(*pid));
        }
        continue_tree(root, &stopped);
        for pid in stopped.iter().chain([&root]) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(stat(*pid), Some(('T', _))) {
                assert!(Instant::now() < deadline, "{pid} was never continued");
                thread::sleep(Duration::from_millis(1));
            }
        }
        for pid in stopped {
            let _ = kill(pid, Signal::SIGKILL);
        }
        sh.kill().unwrap();
        sh.wait().unwrap();
    }

    #[test]
    fn stat_is_read_after_a_command_name_with_spaces_and_parentheses() {
        assert_eq!(parse_stat("4242 (postgres: a (b) c) T 4200 4200 0"), Some(('T', 4200)));
        let (_, ppid) = stat(Pid::this()).expect("our own stat");
        assert_eq!(ppid, nix::unistd::getppid().as_raw());
    }
}
