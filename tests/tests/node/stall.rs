//! No hop holds a request or an answer back until the other side's delayed ACK (the 40 ms stall: Nagle's
//! algorithm on a socket that sends a message in several writes, on a kept-alive connection). Checked on
//! what the processes do, never on timing: the node's own sockets (to nginx and to PostgreSQL) have
//! `TCP_NODELAY`, read from the running node; and nginx, which keeps Nagle on toward a node for a buffered
//! body, sends the benchmark's bulk insert from memory in one write rather than from a temp file in 8 KiB
//! pieces (nginx logs every body it buffers to a file). And nginx keeps its connections to the nodes
//! under hundreds of clients, so no request pays for a new one.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use fleet_local::nginx::CLIENT_BODY_BUFFER_SIZE;
use fleet_tests::{loopback_sockets, start_fleet, Api, TestApp};
use futures_util::future::join_all;
use rustix::process::{pidfd_getfd, pidfd_open, Pid, PidfdFlags, PidfdGetfdFlags};
use serde_json::json;

/// One TCP socket of another process, as that process has it.
#[derive(Debug)]
struct Socket {
    peer: Option<SocketAddr>,
    nodelay: bool,
}

/// Every TCP socket process `pid` holds, each duplicated into this process (`pidfd_getfd`) to read its
/// addresses and its `TCP_NODELAY`.
fn tcp_sockets(pid: u32) -> Vec<Socket> {
    let pidfd = pidfd_open(Pid::from_raw(pid as i32).unwrap(), PidfdFlags::empty()).unwrap();
    let mut sockets = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let is_socket =
            std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        // A socket closed since the listing is simply gone.
        let Ok(dup) = pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()) else { continue };
        if !is_socket {
            continue;
        }
        let stream = TcpStream::from(dup);
        // A Unix socket has no IP address.
        if stream.local_addr().is_err() {
            continue;
        }
        sockets.push(Socket { peer: stream.peer_addr().ok(), nodelay: stream.nodelay().unwrap() });
    }
    sockets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_connections_to_its_clients_and_to_postgresql_send_without_nagle() {
    let app = TestApp::spawn(&[]);
    // Open the pool's connections, then hold a kept-alive client connection of our own.
    assert_eq!(app.api.increment("stall").await.status, 200);
    let mut client = TcpStream::connect(("127.0.0.1", app.node.port())).unwrap();
    client.write_all(b"GET /health/live HTTP/1.1\r\nHost: node\r\n\r\n").unwrap();
    let mut head = [0u8; 12];
    client.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");

    let sockets = tcp_sockets(app.node.pid());
    let ours = client.local_addr().unwrap();
    let accepted: Vec<&Socket> = sockets.iter().filter(|s| s.peer == Some(ours)).collect();
    assert_eq!(accepted.len(), 1, "the node's end of our connection among {sockets:?}");
    assert!(accepted[0].nodelay, "the node's accepted connection has Nagle on: {:?}", accepted[0]);
    let database: Vec<&Socket> =
        sockets.iter().filter(|s| s.peer.is_some_and(|p| p.port() == app.pg.port())).collect();
    assert!(!database.is_empty(), "no database connection among {sockets:?}");
    assert!(database.iter().all(|s| s.nodelay), "a database connection has Nagle on: {database:?}");
}

/// `n` rows of the benchmark's kind (64 bytes each), as a bulk-insert body.
fn bulk_body(n: usize) -> String {
    let rows: Vec<String> = (0..n).map(|i| format!("stall row {i:08} {}", "x".repeat(45))).collect();
    json!({ "data": rows }).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_sends_a_bulk_insert_body_to_a_node_from_memory_in_one_write() {
    let fleet = start_fleet(1, 2, &[]);
    let api = Api::new(fleet.url());
    let buffer: usize = CLIENT_BODY_BUFFER_SIZE.trim_end_matches('m').parse::<usize>().unwrap() << 20;
    // The benchmark's request (1000 rows), and the largest bulk insert nginx holds in memory.
    let in_memory = [bulk_body(1000), bulk_body(buffer / 68)];
    assert!(in_memory.iter().all(|b| b.len() <= buffer), "{} > {buffer}", in_memory[1].len());
    for body in &in_memory {
        for path in ["/api/bulk-insert", "/app-1/api/bulk-insert"] {
            let reply = api.post_raw(path, body.clone()).await;
            assert_eq!(reply.status, 200, "{path}: {:?}", reply.body);
        }
    }
    // A body over 1.25 × the buffer (nginx's own margin) does go through a temp file, and nginx says so:
    // the check below can see it.
    let larger = bulk_body(buffer * 3 / 2 / 64);
    assert_eq!(api.post_raw("/api/bulk-insert", larger).await.status, 200);

    const BUFFERED: &str = "a client request body is buffered to a temporary file";
    let log = fleet.logs_dir().join("nginx.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(BUFFERED) || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        text.matches(BUFFERED).count(),
        1,
        "only the body over {CLIENT_BODY_BUFFER_SIZE} may go through a temp file (in writes nginx leaves to Nagle):\n{text}"
    );
    fleet.stop().unwrap();
}

/// Connections to the nodes that nginx has closed (it closes first, so its side waits in TIME_WAIT).
fn closed_by_nginx(node_ports: &[u16]) -> usize {
    loopback_sockets("06").iter().filter(|(_, remote)| node_ports.contains(remote)).count()
}

/// A connection nginx closes because its cache of idle ones is full costs the next request a new one (a
/// handshake, and an accept on the node): with room for 32 per worker, 64 clients made one request in
/// nine pay for it. 256 clients at once, 10 requests each, must find nginx's connections all kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_keeps_its_connections_to_the_nodes_under_hundreds_of_clients() {
    let fleet = start_fleet(4, 2, &[]);
    let ports: Vec<u16> = fleet.nodes().iter().map(|node| node.port()).collect();
    let api = Api::new(fleet.url());
    let before = closed_by_nginx(&ports);
    join_all((0..256).map(|_| async {
        for _ in 0..10 {
            let reply = api.get("/health/live").await;
            assert_eq!(reply.status, 200, "{:?}", reply.body);
        }
    }))
    .await;
    let closed = closed_by_nginx(&ports) - before;
    assert_eq!(closed, 0, "nginx closed {closed} connections to the nodes under 256 clients");
    fleet.stop().unwrap();
}
