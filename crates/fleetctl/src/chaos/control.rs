//! The control channel of a running `fleetctl up`: a Unix socket `<dir>/control.sock` that takes one
//! line per connection, a [`Fault`] as its subcommand is typed (`kill-node 2`, `pause-db 2.5`,
//! `lag-replica pg-2 5`), and answers one line, `ok <what happened>` or `error <why>`. Only the process
//! that started the fleet signals its children, so `fleetctl chaos` asks it through here instead of
//! signalling PIDs itself: [`send`] is the client, [`ControlServer`] the fleet's side.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::fault::Fault;

/// The socket's name in the fleet's directory.
const SOCKET_NAME: &str = "control.sock";
/// Longest command line read (commands are a few bytes).
const MAX_LINE: u64 = 256;
/// How long the fleet waits for a client to send its line: the fleet's loop waits meanwhile.
const READ_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a client waits for the answer: a restart of PostgreSQL may take a while (crash recovery),
/// a rolling restart of a cluster longer (each member in turn, each waited for).
const REPLY_TIMEOUT: Duration = Duration::from_secs(900);

/// Where the control socket of the fleet run from `dir` lives.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(SOCKET_NAME)
}

/// Sends `fault` to the fleet run from `dir` and returns what it did (the text after `ok `); its
/// `error …` answer becomes an error.
pub fn send(dir: &Path, fault: &Fault) -> anyhow::Result<String> {
    let path = socket_path(dir);
    let mut stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "no fleet is listening at {} (is `fleetctl up --dir {}` running?)",
            path.display(),
            dir.display()
        )
    })?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    writeln!(stream, "{fault}").context("cannot send the command")?;
    let mut reply = String::new();
    BufReader::new(stream.take(64 * 1024))
        .read_line(&mut reply)
        .with_context(|| format!("no answer to {fault:?} from the fleet"))?;
    let reply = reply.trim_end();
    match reply.split_once(' ') {
        Some(("ok", what)) => Ok(what.to_owned()),
        Some(("error", why)) => bail!("the fleet refused `{fault}`: {why}"),
        _ if reply.is_empty() => bail!("the fleet closed the connection without answering `{fault}`"),
        _ => bail!("unexpected answer to `{fault}`: {reply:?}"),
    }
}

/// The fleet's side: a non-blocking listener polled from `fleetctl up`'s loop; the socket is removed
/// on drop.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlServer {
    /// Listens on `<dir>/control.sock`, readable and writable by our user only, from its first moment:
    /// the socket is bound inside a fresh directory only we can enter, made 0600 there, and only then
    /// renamed into place (a socket bound in `dir` directly would be open to others, per the umask,
    /// until a chmod). A socket left behind by a fleet that crashed is replaced; one that still
    /// answers is another fleet's, and an error.
    pub fn bind(dir: &Path) -> anyhow::Result<ControlServer> {
        let path = socket_path(dir);
        if path.exists() && UnixStream::connect(&path).is_ok() {
            bail!("another fleet is listening at {}", path.display());
        }
        let private = tempfile::Builder::new()
            .prefix(".control-")
            .tempdir_in(dir)
            .with_context(|| format!("cannot create a private directory in {}", dir.display()))?;
        let staged = private.path().join(SOCKET_NAME);
        let listener =
            UnixListener::bind(&staged).with_context(|| format!("cannot listen at {}", staged.display()))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, &path)
            .with_context(|| format!("cannot move the socket to {}", path.display()))?;
        listener.set_nonblocking(true)?;
        Ok(ControlServer { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers every client waiting now, one after the other, with `handle`'s result; returns at once
    /// when none waits. A client that sends nothing is dropped after [`READ_TIMEOUT`].
    pub fn serve(&self, mut handle: impl FnMut(Fault) -> anyhow::Result<String>) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(error) => {
                    eprintln!("fleetctl: control channel: {error}");
                    return;
                }
            };
            if let Err(error) = answer(stream, &mut handle) {
                eprintln!("fleetctl: control channel: {error:#}");
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn answer(
    stream: UnixStream,
    handle: &mut impl FnMut(Fault) -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take(MAX_LINE)).read_line(&mut line).context("cannot read a command")?;
    let reply = match line.trim().parse::<Fault>() {
        Ok(fault) => {
            let started = Instant::now();
            let result = handle(fault);
            let took = started.elapsed().as_secs_f64();
            match result {
                Ok(what) => {
                    eprintln!("fleetctl: chaos: {fault}: {what} ({took:.1} s)");
                    format!("ok {what}")
                }
                Err(error) => format!("error {}", one_line(&format!("{error:#}"))),
            }
        }
        Err(why) => format!("error {why}"),
    };
    writeln!(&stream, "{reply}").context("cannot answer")?;
    Ok(())
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_the_fleets_answer_and_the_socket_goes_with_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let server = ControlServer::bind(dir.path()).unwrap();
        let client = std::thread::spawn({
            let dir = dir.path().to_owned();
            move || (send(&dir, &Fault::KillNode { n: 2 }), send(&dir, &Fault::RestartDb))
        });
        let mut seen = Vec::new();
        while seen.len() < 2 {
            server.serve(|fault| {
                seen.push(fault);
                match fault {
                    Fault::KillNode { .. } => Ok("killed it".to_owned()),
                    _ => bail!("no database\nhere"),
                }
            });
            std::thread::sleep(Duration::from_millis(10));
        }
        let (killed, restarted) = client.join().unwrap();
        assert_eq!(killed.unwrap(), "killed it");
        let refused = format!("{:#}", restarted.unwrap_err());
        assert!(refused.contains("refused `restart-db`: no database here"), "{refused}");
        assert_eq!(seen, [Fault::KillNode { n: 2 }, Fault::RestartDb]);

        let path = server.path().to_owned();
        drop(server);
        assert!(!path.exists());
        let gone = format!("{:#}", send(dir.path(), &Fault::RestartDb).unwrap_err());
        assert!(gone.contains("no fleet is listening"), "{gone}");
    }

    #[test]
    fn a_stale_socket_is_replaced_but_a_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let first = ControlServer::bind(dir.path()).unwrap();
        assert!(ControlServer::bind(dir.path()).unwrap_err().to_string().contains("another fleet"));
        drop(first);
        // A socket file whose listener is gone (a crashed fleet).
        let stale = UnixListener::bind(socket_path(dir.path())).unwrap();
        drop(stale);
        assert!(ControlServer::bind(dir.path()).is_ok());
    }

    #[test]
    fn the_socket_is_ours_only_and_was_never_bound_where_others_could_reach_it() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        // A directory anyone may enter: a socket bound here directly would be 0777 & !umask at first.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let server = ControlServer::bind(dir.path()).unwrap();
        let meta = std::fs::metadata(server.path()).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o777, 0o600);
        // The private directory it was bound in is gone, and nothing else was left behind.
        let entries: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(entries, [SOCKET_NAME]);
        // It still answers from its new place.
        let client = std::thread::spawn({
            let dir = dir.path().to_owned();
            move || send(&dir, &Fault::RestartDb)
        });
        let mut answered = false;
        while !answered {
            server.serve(|_| {
                answered = true;
                Ok("restarted".to_owned())
            });
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(client.join().unwrap().unwrap(), "restarted");
    }
}
