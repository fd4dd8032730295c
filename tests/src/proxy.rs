//! `Proxy`: a TCP forwarder on loopback that can stop forwarding without closing either side, the way a
//! network that drops packets looks to both ends (SIGSTOP on the server does not: its kernel still
//! acknowledges). While frozen, bytes already read wait in the proxy and nothing more is read, so the
//! peers' writes fill their socket buffers; connections opened meanwhile are accepted and forward nothing.

use std::net::SocketAddr;

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
    accept: AbortHandle,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards each connection to `target`. Must be called on
    /// a Tokio runtime, which runs the proxy's tasks.
    pub async fn start(target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (frozen, watching) = watch::channel(false);
        let accept = tokio::spawn(async move {
            // Owned here, so aborting this task aborts every connection's task too.
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let frozen = watching.clone();
                connections.spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else { return };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::join!(
                        forward(client_read, server_write, frozen.clone()),
                        forward(server_read, client_write, frozen),
                    );
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Proxy { addr, frozen, accept: accept.abort_handle() })
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
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to` while not frozen; on end of stream or an error, shuts `to`'s writing down.
async fn forward(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut frozen: watch::Receiver<bool>) {
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
        if frozen.wait_for(|frozen| !frozen).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
