//! Child processes that die with us: output kept in a log file and/or forwarded with a `[name] ` prefix,
//! stopped by PID, never by name.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// How many output lines a [`Child`] remembers for error messages and [`Child::wait_for_line`].
const RECENT_LINES: usize = 200;
/// How often a waiting loop checks whether a process has exited.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The size a child's log file may reach before it is emptied (and says so): a Patroni member's log
/// carries its PostgreSQL's, which reports every deadlock, hundreds a second under load by design.
const LOG_MAX_BYTES: u64 = 64 << 20;
/// How long [`Drop`] lets a child stop on SIGTERM before it sends SIGKILL.
const DROP_GRACE: Duration = Duration::from_secs(2);

/// A child process with its stdout and stderr forwarded line by line, each line prefixed `[name] `,
/// to our stderr (one thread per stream) unless `quiet`; the last [`RECENT_LINES`] lines are kept
/// for error messages.
///
/// The process gets SIGKILL when the *thread* that spawned it exits (`PR_SET_PDEATHSIG`), so nothing
/// outlives a crashed test. Spawn long-lived children from a thread that lives as long as they should
/// (the main thread, a test's own thread), never from a pooled thread such as tokio's `spawn_blocking`.
pub struct Child {
    name: String,
    process: std::process::Child,
    output: Arc<Output>,
    status: Option<ExitStatus>,
}

/// The lines a child printed, shared with the threads that read its pipes.
#[derive(Debug, Default)]
struct Output {
    state: Mutex<OutputState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct OutputState {
    lines: VecDeque<String>,
    /// Lines printed since the start (more than `lines` holds once old ones are dropped).
    total: usize,
    /// Streams that reached end of file (2 = the process closed both, normally because it exited).
    closed_streams: usize,
}

impl Output {
    fn lock(&self) -> MutexGuard<'_, OutputState> {
        // A reader thread cannot panic while holding the lock, but never let poisoning stop a shutdown.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl std::fmt::Debug for Child {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Child")
            .field("name", &self.name)
            .field("pid", &self.process.id())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl Child {
    /// Spawns `cmd` with piped stdout/stderr, forwarding each line as `[name] line` to our stderr
    /// unless `quiet` (lines are remembered either way).
    pub fn spawn(name: &str, cmd: Command, quiet: bool) -> anyhow::Result<Child> {
        Child::start(name, cmd, quiet, None)
    }

    /// [`Child::spawn`], also appending every line the child prints to the file `log` (created 0600).
    pub fn spawn_logged(name: &str, cmd: Command, quiet: bool, log: &Path) -> anyhow::Result<Child> {
        let file = crate::files::open_append(log)?;
        Child::start(name, cmd, quiet, Some(Arc::new(file)))
    }

    fn start(name: &str, mut cmd: Command, quiet: bool, log: Option<Arc<File>>) -> anyhow::Result<Child> {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        // Only the program: the arguments and environment may hold secrets (a database URL).
        let mut process = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({})", Path::new(cmd.get_program()).display()))?;
        let output = Arc::new(Output::default());
        if let Some(stdout) = process.stdout.take() {
            forward(name, stdout, quiet, log.clone(), Arc::clone(&output))?;
        }
        if let Some(stderr) = process.stderr.take() {
            forward(name, stderr, quiet, log, Arc::clone(&output))?;
        }
        tracing::debug!(child.name = name, child.pid = process.id(), "started child");
        Ok(Child { name: name.to_owned(), process, output, status: None })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// The name its output lines are prefixed with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the process is still running (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        self.try_status().is_none()
    }

    /// The last lines (up to 200) the process printed, stdout and stderr interleaved.
    pub fn recent_output(&self) -> String {
        let state = self.output.lock();
        Vec::from(state.lines.clone()).join("\n")
    }

    /// Sends SIGTERM, waits up to `grace`, then sends SIGKILL; returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        self.stop(Signal::SIGTERM, grace)
    }

    /// Sends `signal`, waits up to `grace`, then sends SIGKILL; returns the exit status.
    pub fn stop(&mut self, signal: Signal, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_status() {
            return Ok(status);
        }
        if let Some(status) = signal_and_wait(&mut self.process, signal, grace)? {
            self.status = Some(status);
            return Ok(status);
        }
        tracing::warn!(child.name = %self.name, grace_ms = grace.as_millis(), "child ignored {signal}; killing it");
        self.kill()?;
        self.status.with_context(|| format!("{} has no exit status after SIGKILL", self.name))
    }

    /// Sends SIGKILL and waits for the process to exit.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if self.try_status().is_some() {
            return Ok(());
        }
        // `std::process::Child::kill` sends SIGKILL to this PID only, and only while it is unreaped.
        self.process.kill().with_context(|| format!("cannot kill {}", self.name))?;
        let status = self.process.wait().with_context(|| format!("cannot wait for {}", self.name))?;
        self.status = Some(status);
        Ok(())
    }

    /// Returns the first line containing `needle`, whether already printed (among the recent lines) or
    /// printed within `timeout`; fails with the recent output if the process closes its output
    /// (exits) or time runs out first.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.output.lock();
        // Number (in the whole output) of the first line not yet checked.
        let mut next: usize = 0;
        loop {
            let first = state.total - state.lines.len();
            let skip = next.saturating_sub(first);
            if let Some(line) = state.lines.iter().skip(skip).find(|l| l.contains(needle)) {
                return Ok(line.clone());
            }
            next = state.total;
            let now = Instant::now();
            let failure = if state.closed_streams == 2 {
                "exited before printing"
            } else if now >= deadline {
                "timed out waiting for"
            } else {
                state = self
                    .output
                    .changed
                    .wait_timeout(state, deadline - now)
                    .map(|(guard, _)| guard)
                    .unwrap_or_else(|poisoned| poisoned.into_inner().0);
                continue;
            };
            drop(state);
            bail!(
                "{} {failure} {needle:?} (waited up to {timeout:?}); its last output:\n{}",
                self.name,
                self.recent_output()
            );
        }
    }

    /// Polls `url` until it answers 200, failing early with the recent output if the process exits, or
    /// with the last answer once `deadline` passes.
    pub fn wait_for_http(&mut self, url: &str, deadline: Instant) -> anyhow::Result<()> {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(1))
            .timeout(Duration::from_secs(2))
            .build();
        loop {
            if !self.is_running() {
                bail!(
                    "{} exited before {url} answered; its last output:\n{}",
                    self.name,
                    self.recent_output()
                );
            }
            let last = match agent.get(url).call() {
                Ok(response) if response.status() == 200 => return Ok(()),
                Ok(response) => format!("status {}", response.status()),
                Err(error) => error.to_string(),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{url} did not answer 200 in time (last: {last}); {}'s last output:\n{}",
                    self.name,
                    self.recent_output()
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            match self.process.try_wait() {
                Ok(status) => self.status = status,
                Err(error) => {
                    tracing::warn!(child.name = %self.name, %error, "cannot check whether child exited")
                }
            }
        }
        self.status
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Err(error) = self.terminate(DROP_GRACE) {
            tracing::warn!(child.name = %self.name, error = %format!("{error:#}"), "cannot stop child");
        }
    }
}

/// Starts a thread copying `stream` line by line into `output`, into `log` if any, and to our stderr
/// unless `quiet`.
fn forward(
    name: &str,
    stream: impl Read + Send + 'static,
    quiet: bool,
    log: Option<Arc<File>>,
    output: Arc<Output>,
) -> anyhow::Result<()> {
    let prefix = format!("[{name}] ");
    thread::Builder::new()
        .name(format!("{name}-output"))
        .spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            // Invalid UTF-8 is replaced, not fatal: a child's output is for humans.
            while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                buf.clear();
                if !quiet {
                    eprintln!("{prefix}{line}");
                }
                if let Some(file) = log.as_deref() {
                    append_capped(file, &line);
                }
                let mut state = output.lock();
                if state.lines.len() == RECENT_LINES {
                    state.lines.pop_front();
                }
                state.lines.push_back(line);
                state.total += 1;
                drop(state);
                output.changed.notify_all();
            }
            output.lock().closed_streams += 1;
            output.changed.notify_all();
        })
        .with_context(|| format!("cannot start the output thread for {name}"))?;
    Ok(())
}

/// Appends `line` to `log`, emptying the file first (with a line saying so) once it has reached
/// [`LOG_MAX_BYTES`]. One write per line: with O_APPEND, two streams' lines never interleave mid-line.
fn append_capped(mut log: &File, line: &str) {
    if log.metadata().is_ok_and(|meta| meta.len() >= LOG_MAX_BYTES) && log.set_len(0).is_ok() {
        let _ =
            log.write_all(format!("(this log reached {LOG_MAX_BYTES} bytes and was emptied)\n").as_bytes());
    }
    let _ = log.write_all(format!("{line}\n").as_bytes());
}

/// Makes the process spawned from `cmd` receive SIGKILL when the thread that spawned it exits, and puts it
/// in a process group of its own, so that a terminal's Ctrl-C reaches only us and we stop children in order.
///
/// std runs `pre_exec` hooks after it has applied `Command::uid/gid`, so the setting survives the
/// switch to the `postgres` user (changing credentials clears it).
pub(crate) fn die_with_parent(cmd: &mut Command) {
    cmd.process_group(0);
    #[expect(
        unsafe_code,
        reason = "pre_exec runs between fork and exec; prctl(PR_SET_PDEATHSIG) is async-signal-safe and allocates nothing"
    )]
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe and touches no shared state.
    unsafe {
        cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from));
    }
}

/// Sends `sig` to `child` (if it has not exited) and waits up to `timeout` for it to exit.
/// Returns `None` if it is still running after `timeout`.
///
/// The PID cannot have been reused: an unreaped child keeps it.
pub(crate) fn signal_and_wait(
    child: &mut std::process::Child,
    sig: Signal,
    timeout: Duration,
) -> anyhow::Result<Option<ExitStatus>> {
    if let Some(status) = child.try_wait().context("cannot check a child's status")? {
        return Ok(Some(status));
    }
    let pid = Pid::from_raw(i32::try_from(child.id()).context("PID out of range")?);
    signal::kill(pid, sig).with_context(|| format!("cannot send {sig} to PID {pid}"))?;
    wait_timeout(child, timeout)
}

/// Waits up to `timeout` for `child` to exit; `None` if it is still running.
pub(crate) fn wait_timeout(
    child: &mut std::process::Child,
    timeout: Duration,
) -> anyhow::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().context("cannot check a child's status")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[test]
    fn a_line_printed_before_the_wait_is_found() {
        let child = Child::spawn("echo", sh("echo hello; echo ready now; exec sleep 5"), true).unwrap();
        let line = child.wait_for_line("ready", Duration::from_secs(5)).unwrap();
        assert_eq!(line, "ready now");
        assert!(child.recent_output().contains("hello"));
    }

    #[test]
    fn waiting_for_a_line_fails_with_the_output_when_the_process_exits() {
        let child = Child::spawn("fails", sh("echo boom >&2; exit 3"), true).unwrap();
        let error = child.wait_for_line("never", Duration::from_secs(5)).unwrap_err();
        let message = format!("{error:#}");
        assert!(message.contains("exited before printing"), "{message}");
        assert!(message.contains("boom"), "{message}");
    }

    #[test]
    fn waiting_for_a_line_times_out() {
        let child = Child::spawn("sleeper", sh("sleep 5"), true).unwrap();
        let error = child.wait_for_line("never", Duration::from_millis(100)).unwrap_err();
        assert!(format!("{error:#}").contains("timed out"));
    }

    #[test]
    fn a_child_that_cannot_start_is_named_without_its_environment() {
        let mut cmd = Command::new("/nonexistent/fleet-app");
        cmd.env("DATABASE_URL", "postgres://appuser:hunter2@127.0.0.1/appdb").arg("--password=hunter3");
        let message = format!("{:#}", Child::spawn("app-1", cmd, true).unwrap_err());
        assert!(message.contains("cannot start app-1 (/nonexistent/fleet-app)"), "{message}");
        assert!(!message.contains("hunter2") && !message.contains("hunter3"), "{message}");
    }

    #[test]
    fn a_logged_child_writes_every_line_to_its_private_log_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("echo.log");
        let child = Child::spawn_logged("echo", sh("echo one; echo two >&2; echo done"), true, &log).unwrap();
        child.wait_for_line("done", Duration::from_secs(5)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&log).unwrap().lines().count() < 3 && Instant::now() < deadline {
            thread::sleep(POLL_INTERVAL);
        }
        let text = std::fs::read_to_string(&log).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines.sort_unstable();
        assert_eq!(lines, ["done", "one", "two"]);
        assert_eq!(std::fs::metadata(&log).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_childs_log_is_emptied_once_it_reaches_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("chatty.log");
        // 100 KB lines, 1.5 times the cap in all.
        let bytes = LOG_MAX_BYTES * 3 / 2;
        let script = format!("head -c {bytes} /dev/zero | tr '\\0' x | fold -w 100000; echo done");
        let child = Child::spawn_logged("chatty", sh(&script), true, &log).unwrap();
        child.wait_for_line("done", Duration::from_secs(60)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log).unwrap().ends_with("done\n") && Instant::now() < deadline {
            thread::sleep(POLL_INTERVAL);
        }
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.starts_with("(this log reached") && text.ends_with("done\n"), "{}", &text[..80]);
        assert!((text.len() as u64) < LOG_MAX_BYTES, "{} bytes", text.len());
    }

    #[test]
    fn terminate_kills_a_process_that_ignores_sigterm() {
        let mut child =
            Child::spawn("stubborn", sh("trap '' TERM; echo armed; while :; do sleep 0.1; done"), true)
                .unwrap();
        child.wait_for_line("armed", Duration::from_secs(5)).unwrap();
        let status = child.terminate(Duration::from_millis(200)).unwrap();
        assert!(!status.success());
        assert!(!child.is_running());
    }
}
