//! `Proxy`: a TCP forwarder on loopback that can stop forwarding without closing either side, the way a
//! network that drops packets looks to both ends (SIGSTOP on the server does not: its kernel still
//! acknowledges). While frozen, bytes already read wait in the proxy and nothing more is read, so the
//! peers' writes fill their socket buffers; connections opened meanwhile are accepted and forward nothing.
//! It can also cut one connection just after the client sent a given message (a COMMIT), before the
//! server's answer comes back: the way a connection lost at the worst moment looks to the client.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};

/// A running proxy; dropping it closes every connection it forwards.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    frozen: watch::Sender<bool>,
    cut: Arc<Mutex<Option<Cut>>>,
    accept: AbortHandle,
}

/// An armed cut: the connection carrying the `nth` client message containing `pattern` (from 1, counted
/// from when it was armed) is closed on both sides right after that message reached the server.
#[derive(Debug)]
struct Cut {
    pattern: Vec<u8>,
    nth: usize,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards each connection to `target`. Must be called on
    /// a Tokio runtime, which runs the proxy's tasks.
    pub async fn start(target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (frozen, watching) = watch::channel(false);
        let cut: Arc<Mutex<Option<Cut>>> = Arc::default();
        let armed = Arc::clone(&cut);
        let accept = tokio::spawn(async move {
            // Owned here, so aborting this task aborts every connection's task too.
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let frozen = watching.clone();
                let armed = Arc::clone(&armed);
                connections.spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else { return };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let to_server = forward(client_read, server_write, frozen.clone(), Some(&armed));
                    let to_client = forward(server_read, client_write, frozen, None);
                    tokio::pin!(to_server, to_client);
                    // Cut: return at once, dropping (closing) both sockets before the server answers.
                    tokio::select! {
                        cut = &mut to_server => if cut == Ended::Drained { to_client.await; },
                        _ = &mut to_client => { to_server.await; }
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Proxy { addr, frozen, cut, accept: accept.abort_handle() })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops forwarding in both directions; every connection stays open.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Forwards again, starting with whatever was held back.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// Arms a cut: the `nth` (from 1) message from a client that contains `pattern`, counted from now,
    /// reaches the server, and then its connection is closed on both sides before anything the server
    /// answers is passed back. Fires once; [`Proxy::has_cut`] says whether it has.
    pub fn cut_after(&self, pattern: &[u8], nth: usize) {
        assert!(nth >= 1 && !pattern.is_empty(), "cut after the nth (from 1) message with a pattern");
        *lock(&self.cut) = Some(Cut { pattern: pattern.to_vec(), nth });
    }

    /// Whether the armed cut has fired.
    pub fn has_cut(&self) -> bool {
        lock(&self.cut).is_none()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn lock(cut: &Mutex<Option<Cut>>) -> std::sync::MutexGuard<'_, Option<Cut>> {
    cut.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How a direction of a connection ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// End of stream or an error: `to` was shut down for writing.
    Drained,
    /// The armed cut fired on what it just forwarded.
    Cut,
}

/// Copies `from` to `to` while not frozen; on end of stream or an error, shuts `to`'s writing down.
/// With `cut`, each read is checked against the armed cut (see [`Proxy::cut_after`]); reads are whole
/// messages here, since a PostgreSQL client writes each of its small messages at once.
async fn forward(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
    cut: Option<&Mutex<Option<Cut>>>,
) -> Ended {
    let mut buf = vec![0; 16 * 1024];
    loop {
        if frozen.wait_for(|frozen| !frozen).await.is_err() {
            break;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            // Frozen while waiting to read: stop reading (and hold nothing back).
            _ = frozen.wait_for(|frozen| *frozen) => continue,
        };
        let fires = cut.is_some_and(|cut| fires(cut, &buf[..n]));
        if frozen.wait_for(|frozen| !frozen).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        if fires {
            return Ended::Cut;
        }
    }
    let _ = to.shutdown().await;
    Ended::Drained
}

/// Whether `bytes` is the armed cut's message: counts it, and disarms the cut when it fires.
fn fires(cut: &Mutex<Option<Cut>>, bytes: &[u8]) -> bool {
    let mut armed = lock(cut);
    let Some(plan) = armed.as_mut() else { return false };
    if !bytes.windows(plan.pattern.len()).any(|window| window == plan.pattern) {
        return false;
    }
    plan.nth -= 1;
    if plan.nth > 0 {
        return false;
    }
    *armed = None;
    true
}
