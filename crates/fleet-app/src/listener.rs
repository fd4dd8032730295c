//! The node's listening socket, built so that a stopping node turns new connections away without
//! resetting any the kernel has already accepted for it (Linux).
//!
//! Closing a listening socket resets every connection still in its accept queue. A proxy has usually
//! sent its request down such a connection already (nginx writes the moment its connect completes), so
//! it sees a reset after sending and, the request being a POST, answers 502 rather than resend it: a
//! request lost, although no node ever read it. So the node listens with two sockets in one
//! `SO_REUSEPORT` group, and a one-instruction classic BPF program on the group picks which of them
//! each new connection (each SYN) goes to:
//!
//! - `serving`, the socket actix accepts from: every new connection while the node runs;
//! - `sink`, with a backlog of 0 and its accept queue kept full by one connection of the node's own
//!   that is never accepted, so the kernel drops every SYN sent to it: every new connection once the
//!   node stops accepting ([`Sink::turn_away`]).
//!
//! A dropped SYN is a connect that times out, which a proxy retries on another node with nothing sent
//! (nginx: `proxy_next_upstream timeout`, counted against the node by `max_fails`). Handshakes already
//! under way belong to `serving` and complete there, and actix accepts them before `serving` closes.
//! When the process exits `sink` closes too, and connects are refused.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};

use anyhow::Context;
use nix::libc;
use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage};

/// The group members, in the order they started listening (the index the BPF program returns).
const SINK: u32 = 0;
const SERVING: u32 = 1;

/// Turns the node's new connections away once it stops accepting; see the module's documentation.
/// Dropping it closes the sink: connects are refused from then on.
#[derive(Debug)]
pub struct Sink {
    sink: TcpListener,
    /// The connection that keeps the sink's accept queue full.
    _occupant: TcpStream,
}

impl Sink {
    /// From now on every new connection goes to the sink, whose kernel drops it (the client's connect
    /// times out); connections already accepted or being set up stay with `serving`.
    pub fn turn_away(&self) -> io::Result<()> {
        route_new_connections_to(&self.sink, SINK)
    }
}

/// Binds `address` (`host:port`; port 0 picks a free one): the socket actix serves from, and the
/// [`Sink`] on the same port.
pub fn bind(address: &str) -> anyhow::Result<(TcpListener, Sink)> {
    let addr = address
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {address}"))?
        .next()
        .with_context(|| format!("{address} resolves to no address"))?;
    // SO_REUSEPORT alone would join the group of a process already listening there: a plain listener
    // claims the port first (port 0: picks one), refusing one in use as any server does, then hands it on.
    let addr = TcpListener::bind(addr)
        .and_then(|claim| claim.local_addr())
        .with_context(|| format!("cannot listen on {address}"))?;
    let sink = reuse_port_listener(addr, 0).with_context(|| format!("cannot listen on {address}"))?;
    // Alone in the group, the sink gets this connection; it stays in its queue, which is then full.
    let occupant = TcpStream::connect(reachable(addr)).context("cannot connect to the node's own sink")?;
    let serving =
        reuse_port_listener(addr, libc::SOMAXCONN).with_context(|| format!("cannot listen on {address}"))?;
    route_new_connections_to(&serving, SERVING)?;
    Ok((serving, Sink { sink, _occupant: occupant }))
}

/// A listening TCP socket on `addr` in the port's `SO_REUSEPORT` group, with `backlog`.
fn reuse_port_listener(addr: SocketAddr, backlog: i32) -> nix::Result<TcpListener> {
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    // As std's listeners do: a restarted node can bind while old connections are in TIME_WAIT.
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::setsockopt(&fd, sockopt::ReusePort, &true)?;
    socket::bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrStorage::from(addr))?;
    socket::listen(&fd, Backlog::new(backlog)?)?;
    Ok(TcpListener::from(fd))
}

/// Where to connect to reach a socket bound to `addr` (loopback for an unspecified address).
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    }
}

/// Attaches to the group of `member` the program `ret #index`: every new connection goes to the
/// member at `index`.
fn route_new_connections_to(member: &TcpListener, index: u32) -> io::Result<()> {
    let mut program =
        [libc::sock_filter { code: (libc::BPF_RET | libc::BPF_K) as u16, jt: 0, jf: 0, k: index }];
    let program = libc::sock_fprog { len: 1, filter: program.as_mut_ptr() };
    socket::setsockopt(member, sockopt::AttachReusePortCbpf, &program).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn new_connections_reach_the_serving_socket_until_they_are_turned_away() {
        let (serving, sink) = bind("127.0.0.1:0").unwrap();
        let addr = serving.local_addr().unwrap();
        let before = TcpStream::connect(addr).unwrap();
        let (accepted, _) = serving.accept().unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), before.local_addr().unwrap());

        sink.turn_away().unwrap();
        let turned_away = TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(turned_away.is_err(), "a connection after turn_away was not dropped: {turned_away:?}");
        serving.set_nonblocking(true).unwrap();
        assert!(serving.accept().is_err(), "nothing new reached the serving socket");

        drop(serving);
        drop(sink);
        let refused = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::ConnectionRefused, "{refused}");
    }

    #[test]
    fn a_port_another_node_listens_on_is_refused() {
        let (serving, _sink) = bind("127.0.0.1:0").unwrap();
        let taken = serving.local_addr().unwrap().to_string();
        let error = bind(&taken).unwrap_err();
        assert!(format!("{error:#}").contains(&format!("cannot listen on {taken}")), "{error:#}");
    }
}
