//! nginx in front of the fleet: one renderer for the compose file's `nginx/default.conf` and the local
//! launcher's `nginx.conf`, so both layouts route, balance and time out the same way.
//!
//! Routes: `/` round robin over every node, `/app-N/…` pinned to node N (prefix stripped),
//! `= /nginx-health` answered by nginx itself. The numbers below are tied to the node's own settings:
//! see each constant.

use std::fmt::Write as _;
use std::path::Path;

use crate::quote;

mod local;
pub use local::{Nginx, NginxOptions};

/// Nodes in the compose topology (`app-1` … `app-4`): 4 × `POOL_SIZE` 5 = 20 of PostgreSQL's 100 connections.
const COMPOSE_NODES: usize = 4;
/// How many nodes the compose `ha` profile runs on the Patroni cluster.
const COMPOSE_HA_NODES: usize = 2;
/// The port every node listens on in its container (the node's default `PORT`).
const COMPOSE_NODE_PORT: u16 = 3000;

/// Idle connections each nginx worker keeps open to the whole fleet, and to one pinned node: enough for
/// hundreds of clients at once. A connection finished while the cache is full is closed, and the next
/// request opens a new one: with 32, 64 clients through nginx's two workers had one request in nine pay
/// for a new connection to its node.
const KEEPALIVE_FLEET: usize = 256;
const KEEPALIVE_PINNED: usize = 64;
/// How long an idle upstream connection is kept: below actix-web's default keep-alive (5 s), so nginx
/// always closes an idle connection before the node does and never sends a request on a socket the node
/// is closing (a POST lost that way would be a 502, since nginx does not retry non-idempotent requests).
const UPSTREAM_KEEPALIVE_TIMEOUT: &str = "4s";
/// Passive health checks: after this many failed attempts within `fail_timeout`, a node is skipped for
/// `fail_timeout`, then tried again.
const MAX_FAILS: u32 = 2;
const FAIL_TIMEOUT: &str = "5s";
/// Connecting to a node is local (loopback or the compose network): a node that does not accept within
/// this time is down, or stopping (it turns new connections away by leaving them unanswered), and the
/// request goes to the next one, safely: nothing was sent.
const PROXY_CONNECT_TIMEOUT: &str = "1s";
/// Longest wait for a node's answer: above the node's `STATEMENT_TIMEOUT_MS` (60 s) plus its
/// `POOL_WAIT_TIMEOUT_MS` (2 s), so the node's own timeout (and error body) always comes first.
const PROXY_READ_TIMEOUT: &str = "65s";
/// The node's default `BODY_LIMIT_BYTES` (16 MiB; nginx's `m` is MiB): larger bodies get nginx's 413,
/// smaller ones reach the node, which answers with its own JSON errors.
const CLIENT_MAX_BODY_SIZE: &str = "16m";
/// Request bodies up to this size stay in nginx's memory and go to the node in one write; larger ones
/// go through a temp file and are sent in writes of this size. nginx sets `TCP_NODELAY` toward a node
/// only for unbuffered bodies, so with its default (8 KiB) a 68 KB bulk insert left in 8 KiB writes, and
/// Nagle's algorithm held the last one until the node's delayed ACK (40 ms and more on a kept-alive
/// connection; a fresh one ACKs at once). 1 MiB holds a bulk insert of about 15,000 benchmark rows, and
/// keeps nginx's memory per request in flight at 1 MiB. (`proxy_request_buffering off` would also set
/// `TCP_NODELAY`, but would hand a slow client's upload to the node, whose body budget it would hold.)
pub const CLIENT_BODY_BUFFER_SIZE: &str = "1m";
/// How long nginx waits for a client between two reads of its request head or body (nginx's default is
/// 60 s): a client that stops sending holds an nginx connection and its body buffer at most this long,
/// then gets 408. nginx buffers a body before it goes to a node, so a slow client never holds a node's
/// body budget.
pub const CLIENT_TIMEOUT: &str = "10s";

/// The lab endpoints (`/api/hold`, `/api/test-isolation`, round robin or pinned) per client address:
/// each request holds database connections on purpose, so a client gets a short burst and then this
/// rate; beyond it nginx answers 429 itself. The nodes bound them too (`LAB_MAX_CONNECTIONS`).
const LAB_RATE: &str = "5r/s";
const LAB_BURST: u32 = 20;

/// Who may reach the lab endpoints (`/api/hold`, `/api/test-isolation`) and the operator's
/// (`/metrics`, `/api/pool-stats`) through nginx, by default: loopback and the private ranges, where the
/// operator, Prometheus and the compose networks are. Anyone else gets 403 `forbidden` from nginx. A
/// local fleet takes another list from `fleetctl up --operator-networks`, the compose image from
/// `FLEET_OPERATOR_NETWORKS` (both comma-separated). nginx judges the address that connects to it: behind
/// another proxy, that is the proxy's, unless that proxy is trusted (see [`trusted_proxies_conf`]).
pub const OPERATOR_NETWORKS: &[&str] =
    &["127.0.0.0/8", "::1", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"];
/// Where the compose site config finds the operator's networks, relative to nginx's config directory:
/// the image's default (`deploy/nginx/operator-networks.conf`, rendered by [`operator_networks_conf`]),
/// which `FLEET_OPERATOR_NETWORKS` replaces when set (`deploy/nginx/networks.sh`).
pub const OPERATOR_NETWORKS_FILE: &str = "operator-networks.conf";
/// Where the compose site config finds the proxies it trusts, relative to nginx's config directory: the
/// image's default, none (`deploy/nginx/trusted-proxies.conf`, rendered by [`trusted_proxies_conf`]),
/// which `FLEET_TRUSTED_PROXIES` replaces when set (`deploy/nginx/networks.sh`).
pub const TRUSTED_PROXIES_FILE: &str = "trusted-proxies.conf";

/// The errors nginx answers itself (a body too large, a node down or too slow, a request nginx cannot
/// parse), each in the API's error shape: status, `code`, message. A node's own errors pass through
/// untouched (no `proxy_intercept_errors`).
pub const NGINX_ERRORS: &[(u16, &str, &str)] = &[
    (400, "invalid_request", "the request is malformed"),
    // A lab or operator endpoint, asked from outside the operator's networks (see OPERATOR_NETWORKS).
    (403, "forbidden", "this endpoint is served only to the networks of the operator"),
    (404, "not_found", "no such route"),
    (405, "method_not_allowed", "method not allowed"),
    (408, "request_timeout", "the request took too long to arrive"),
    // The limit is CLIENT_MAX_BODY_SIZE.
    (413, "payload_too_large", "the request body is larger than 16 MiB"),
    (414, "uri_too_long", "the request URI is too long"),
    // nginx's own rate limit of the lab endpoints (see LAB_RATE).
    (429, "lab_busy", "too many lab requests from this client; retry later"),
    (431, "headers_too_large", "the request headers are too large"),
    (494, "headers_too_large", "the request headers are too large"),
    (500, "internal", "internal error"),
    (502, "node_unavailable", "no node answered: the node is down or restarting; retry"),
    (503, "node_unavailable", "no node is available; retry"),
    (504, "gateway_timeout", "the node did not answer in time"),
];

/// One backend node as nginx and Prometheus see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The node's name, its `CONTAINER_ID` (`app-1`): names its pinned route `/app-1/`, its nginx
    /// upstream `app_1` and its Prometheus label `container="app-1"`. Letters, digits, `-` and `_` only.
    pub name: String,
    /// Where it listens, `host:port`: `127.0.0.1:41234` locally, `app-1:3000` in compose.
    pub address: String,
}

/// The compose topology: app-1..app-4 at app-N:3000.
pub fn compose_upstreams() -> Vec<Upstream> {
    (1..=COMPOSE_NODES)
        .map(|i| Upstream { name: format!("app-{i}"), address: format!("app-{i}:{COMPOSE_NODE_PORT}") })
        .collect()
}

/// The compose `ha` profile's nodes: ha-app-1 and ha-app-2 at ha-app-N:3000, on the Patroni cluster.
pub fn compose_ha_upstreams() -> Vec<Upstream> {
    (1..=COMPOSE_HA_NODES)
        .map(|i| Upstream { name: format!("ha-app-{i}"), address: format!("ha-app-{i}:{COMPOSE_NODE_PORT}") })
        .collect()
}

/// The http-level site config: a `map`, one upstream `fleet` over all nodes, one upstream `app_N` per node,
/// and one server block listening on `listen` (`"80"`, `"127.0.0.1:8080"`). This one function renders both
/// the compose file's `nginx/default.conf` (mounted at `/etc/nginx/conf.d/default.conf` in the official
/// nginx image, inside its `http {}`) and the `http {}` of [`local_config`].
///
/// - `location /`: round robin over all nodes; a node that refuses or does not accept the connection
///   (`proxy_next_upstream error timeout`) is skipped and the request goes to the next one. nginx never
///   resends a POST once it reached a node, so retries cannot double an increment.
/// - `location /app-N/`: node N only, with `/app-N` cut from the raw request URI, so
///   `/app-2/api/increment` reaches node 2 as `/api/increment` and percent-escapes (`%2F` in a counter
///   key) and the query string arrive unchanged.
/// - `location = /nginx-health`: `200 ok` from nginx itself (its readiness probe).
/// - The lab and operator endpoints, round robin or pinned, answer 403 to a client outside the operator's
///   networks, which the compose config reads from [`OPERATOR_NETWORKS_FILE`]. The client is the address
///   that connects, or the one a trusted proxy forwards ([`TRUSTED_PROXIES_FILE`]).
///
/// Upstreams keep idle connections (`keepalive`, HTTP/1.1, `Connection ""`) for less than the nodes'
/// own keep-alive; nodes see the client in `X-Forwarded-For` and the original `Host`.
///
/// # Panics
/// If a node's name is empty or has characters other than ASCII letters, digits, `-` and `_`
/// (names come from code, never from users).
pub fn site_config(listen: &str, nodes: &[Upstream]) -> String {
    let operators = format!("    include {OPERATOR_NETWORKS_FILE};\n");
    site(listen, nodes, &[], &operators, &format!("    include {TRUSTED_PROXIES_FILE};\n"))
}

/// [`site_config`], with the nodes named in `out_of_rotation` marked `down` in the round-robin upstream
/// (their pinned routes stay): how a local fleet takes a node out before stopping it; `operators`, the
/// body of the `geo` block that lists the operator's networks; and `trusted`, the server's directives
/// that take the client's address from the proxies it trusts.
fn site(
    listen: &str,
    nodes: &[Upstream],
    out_of_rotation: &[String],
    operators: &str,
    trusted: &str,
) -> String {
    for node in nodes {
        assert!(
            !node.name.is_empty() && node.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)),
            "node name {:?} must be ASCII letters, digits, `-` and `_`",
            node.name
        );
    }
    let mut out = String::from(SITE_HEADER);
    out.push_str(LAB_LIMIT_HEADER);
    let _ = writeln!(out, "limit_req_zone $fleet_lab_client zone=fleet_lab:1m rate={LAB_RATE};");
    out.push_str(OPERATOR_HEADER);
    out.push_str(operators);
    out.push_str(OPERATOR_MAP);
    out.push_str(
        "\n# Round robin over every node. A node that fails max_fails times within fail_timeout is\n",
    );
    out.push_str("# skipped for fail_timeout (passive health checks).\n");
    out.push_str("upstream fleet {\n");
    for node in nodes {
        let down = if out_of_rotation.contains(&node.name) { " down" } else { "" };
        let _ = writeln!(
            out,
            "    server {} max_fails={MAX_FAILS} fail_timeout={FAIL_TIMEOUT}{down};",
            node.address
        );
    }
    let _ = writeln!(out, "    keepalive {KEEPALIVE_FLEET};");
    let _ = writeln!(out, "    keepalive_timeout {UPSTREAM_KEEPALIVE_TIMEOUT};\n}}");
    for node in nodes {
        let _ = writeln!(out, "\n# {} only (a single server is never marked down: no max_fails).", node.name);
        let _ = writeln!(out, "upstream {} {{\n    server {};", upstream_name(node), node.address);
        let _ = writeln!(out, "    keepalive {KEEPALIVE_PINNED};");
        let _ = writeln!(out, "    keepalive_timeout {UPSTREAM_KEEPALIVE_TIMEOUT};\n}}");
    }
    let _ = writeln!(out, "\nserver {{\n    listen {listen};");
    out.push_str("    server_tokens off;\n");
    out.push_str(trusted);
    let _ = writeln!(out, "    client_max_body_size {CLIENT_MAX_BODY_SIZE};");
    let _ = writeln!(out, "    client_body_buffer_size {CLIENT_BODY_BUFFER_SIZE};");
    let _ = writeln!(out, "    client_header_timeout {CLIENT_TIMEOUT};");
    let _ = writeln!(out, "    client_body_timeout {CLIENT_TIMEOUT};\n");
    out.push_str(PROXY_HEADERS);
    let _ = writeln!(out, "    proxy_connect_timeout {PROXY_CONNECT_TIMEOUT};");
    let _ = writeln!(out, "    proxy_read_timeout {PROXY_READ_TIMEOUT};");
    out.push_str("    proxy_next_upstream error timeout;\n");
    let _ = writeln!(
        out,
        "\n    # The lab endpoints only (others have no $fleet_lab_client): see limit_req_zone."
    );
    let _ = writeln!(out, "    limit_req zone=fleet_lab burst={LAB_BURST} nodelay;");
    out.push_str("    limit_req_status 429;\n");
    out.push_str(
        "\n    # The lab and operator endpoints, from outside the operator's networks: see $fleet_refused.\n",
    );
    out.push_str("    if ($fleet_refused) {\n        return 403;\n    }\n");
    out.push_str(SITE_LOCATIONS);
    for node in nodes {
        let _ = writeln!(out, "\n    location /{}/ {{", node.name);
        let _ = writeln!(out, "        proxy_pass http://{}$fleet_pinned_uri;\n    }}", upstream_name(node));
    }
    error_pages(&mut out);
    out.push_str("}\n");
    out
}

/// nginx's own errors as JSON in the API's shape (`"container": "nginx"`, header `X-Container-Id`):
/// one `error_page` per status and one named location answering it.
fn error_pages(out: &mut String) {
    out.push_str(
        "\n    # nginx's own errors, in the API's error shape; the nodes' errors pass through as they are.\n",
    );
    for (status, _, _) in NGINX_ERRORS {
        let _ = writeln!(out, "    error_page {status} @error_{status};");
    }
    for (status, code, message) in NGINX_ERRORS {
        let _ = writeln!(out, "\n    location @error_{status} {{");
        // No MIME types: the original URI's extension must not pick the Content-Type.
        out.push_str("        types { }\n        default_type application/json;\n");
        out.push_str("        add_header X-Container-Id nginx always;\n");
        let body =
            format!(r#"{{"success": false, "error": "{message}", "code": "{code}", "container": "nginx"}}"#);
        let _ = writeln!(out, "        return {status} '{body}';\n    }}");
    }
}

/// The start of [`site_config`]: what it is, and the map that strips `/app-N` from the raw URI.
const SITE_HEADER: &str = r#"# The fleet behind nginx. Rendered by fleet_local::nginx::site_config: edit that, not this file
# (the compose copy is refreshed with `UPDATE_GOLDEN=1 cargo test -p fleet-tests --test fleet -- deploy::`).

# What a pinned route passes on: the raw request URI without its first segment (/app-N), so escapes
# such as %2F and the query string reach the node exactly as the client sent them.
map $request_uri $fleet_pinned_uri {
    default $request_uri;
    ~^/+[^/]+(/.*)$ $1;
}
"#;

/// Which requests the lab rate limit counts: the lab endpoints, keyed by client address (an empty key is
/// not counted).
const LAB_LIMIT_HEADER: &str = r#"
# The lab endpoints hold database connections on purpose: rate-limited per client address.
map $uri $fleet_lab_client {
    default "";
    ~^(/app-[^/]+)?/api/(hold|test-isolation)$ $binary_remote_addr;
}
"#;

/// Who is on the operator's networks (`$fleet_operator` 1): the `geo` block [`site`] completes with them.
const OPERATOR_HEADER: &str = r#"
# Clients on the operator's networks ($fleet_operator 1): only they reach the lab and operator endpoints.
geo $fleet_operator {
    default 0;
"#;

/// The lab and operator endpoints, round robin or pinned, asked from elsewhere: `$fleet_refused` 1.
/// `$uri` is the path decoded and normalised (`/api/%68old`, `//metrics`), as the nodes route it.
const OPERATOR_MAP: &str = r#"}

# The lab and operator endpoints, asked from outside the operator's networks: answered 403.
map "$fleet_operator:$uri" $fleet_refused {
    default 0;
    "~^0:(/app-[^/]+)?/(api/(hold|test-isolation|pool-stats)|metrics)$" 1;
}
"#;

/// The networks of [`OPERATOR_NETWORKS_FILE`], one `<network> 1;` line each (a `geo` block's body).
///
/// # Panics
/// If one is not an address or a CIDR range (see [`check_network`]).
pub fn operator_networks_conf(networks: &[String]) -> String {
    let mut out = String::from(
        "# The operator's networks, for the site config's geo block: one address or CIDR range a line.\n",
    );
    out.push_str(&geo_lines(networks, ""));
    out
}

/// `<indent><network> 1;` for each of `networks`.
fn geo_lines(networks: &[String], indent: &str) -> String {
    network_lines(networks, |network| format!("{indent}{network} 1;\n"))
}

/// The proxies nginx believes about the client's address ([`TRUSTED_PROXIES_FILE`]), one
/// `set_real_ip_from` line each: a request that comes from one of them is judged (operator's networks,
/// lab rate limit) by the address its `X-Forwarded-For` names, the last one not itself a trusted proxy.
/// None (the default): `X-Forwarded-For` changes nothing, so a client cannot forge its address.
///
/// # Panics
/// If one is not an address or a CIDR range (see [`check_network`]).
pub fn trusted_proxies_conf(proxies: &[String]) -> String {
    let mut out = String::from(
        "# The proxies trusted to name the client in X-Forwarded-For: one address or CIDR range a line.\n",
    );
    out.push_str(&real_ip_lines(proxies, ""));
    out
}

/// `<indent>set_real_ip_from <proxy>;` for each of `proxies`, then the header and its recursive reading.
fn real_ip_lines(proxies: &[String], indent: &str) -> String {
    let mut out = network_lines(proxies, |proxy| format!("{indent}set_real_ip_from {proxy};\n"));
    if !proxies.is_empty() {
        let _ = write!(out, "{indent}real_ip_header X-Forwarded-For;\n{indent}real_ip_recursive on;\n");
    }
    out
}

/// `line(network)` for each of `networks`, each checked first.
fn network_lines(networks: &[String], line: impl Fn(&str) -> String) -> String {
    let mut out = String::new();
    for network in networks {
        if let Err(why) = check_network(network) {
            panic!("{why}");
        }
        out.push_str(&line(network));
    }
    out
}

/// An IPv4 or IPv6 address, alone or as a CIDR range (`10.0.0.0/8`, `::1`, `fc00::/7`): what nginx's `geo`
/// takes, and nothing that could break its config.
pub fn check_network(network: &str) -> Result<(), String> {
    let (address, prefix) = match network.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (network, None),
    };
    let bits = match address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => 32,
        Ok(std::net::IpAddr::V6(_)) => 128,
        Err(_) => return Err(format!("{network:?} is not an IP address or CIDR range")),
    };
    match prefix.map(str::parse::<u8>) {
        None => Ok(()),
        Some(Ok(prefix)) if prefix <= bits => Ok(()),
        Some(_) => Err(format!("{network:?}: the prefix length must be 0 to {bits}")),
    }
}

/// HTTP/1.1 with keep-alive toward the nodes, and who the client was.
const PROXY_HEADERS: &str = r#"    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    proxy_set_header X-Real-IP $remote_addr;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Forwarded-Host $host;
"#;

/// nginx's own health answer and the round-robin route; the pinned routes follow.
const SITE_LOCATIONS: &str = r#"
    location = /nginx-health {
        access_log off;
        default_type text/plain;
        return 200 "ok\n";
    }

    location / {
        proxy_pass http://fleet;
    }
"#;

/// A complete `nginx.conf` for a local run, to start as `nginx -c <dir>/nginx.conf -p <dir>`:
/// `daemon off;` (the launcher supervises it), the pid file and every `*_temp_path` inside `dir`, errors
/// to stderr, no access log, and `http { <site_config(listen, nodes)> }`.
///
/// It runs as any user who owns `dir`: nothing outside `dir` is written (nginx may still print a harmless
/// alert about its compiled-in error log before it reads this file). A launcher running as root starts
/// it as the unprivileged service user (see [`crate::users`]), master and workers alike.
///
/// Only `operator_networks` reach the lab and operator endpoints (see [`OPERATOR_NETWORKS`]); a request
/// from one of `trusted_proxies` is judged by the client its `X-Forwarded-For` names (see
/// [`trusted_proxies_conf`]).
///
/// # Panics
/// As [`site_config`], and if an operator network or a trusted proxy is not an address or a CIDR range.
pub fn local_config(
    dir: &Path,
    listen: &str,
    nodes: &[Upstream],
    out_of_rotation: &[String],
    operator_networks: &[String],
    trusted_proxies: &[String],
) -> String {
    let path = |name: &str| quote(&dir.join(name).to_string_lossy());
    let mut out = String::new();
    out.push_str("# A local fleet's nginx. Rendered by fleet_local::nginx::local_config.\n");
    let _ = writeln!(out, "# Run: nginx -c {} -p {}", path("nginx.conf"), quote(&dir.to_string_lossy()));
    out.push_str("daemon off;\n");
    out.push_str("worker_processes auto;\n");
    let _ = writeln!(out, "pid {};", path("nginx.pid"));
    out.push_str("error_log stderr warn;\n\n");
    out.push_str(WORKER_LIMITS);
    out.push('\n');
    out.push_str("http {\n");
    out.push_str("    access_log off;\n");
    out.push_str("    default_type application/octet-stream;\n");
    for temp in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        let _ = writeln!(out, "    {temp}_temp_path {};", path(&format!("{temp}_temp")));
    }
    out.push('\n');
    let operators = geo_lines(operator_networks, "    ");
    let trusted = real_ip_lines(trusted_proxies, "    ");
    for line in site(listen, nodes, out_of_rotation, &operators, &trusted).lines() {
        match line {
            "" => out.push('\n'),
            _ => {
                let _ = writeln!(out, "    {line}");
            }
        }
    }
    out.push_str("}\n");
    out
}

/// nginx's worker limits, the local fleet's and the compose image's (deploy/nginx/nginx.conf). A client
/// connection and its upstream connection both count: room for thousands of concurrent clients (the
/// load tests open a thousand at once), each worker allowed the descriptors for them.
pub const WORKER_LIMITS: &str = "worker_rlimit_nofile 16384;\nevents {\n    worker_connections 8192;\n}\n";

/// `app-1` → `app_1`: the name of the upstream that holds only this node.
fn upstream_name(node: &Upstream) -> String {
    node.name.replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(i: u16) -> Upstream {
        Upstream { name: format!("app-{i}"), address: format!("127.0.0.1:{}", 40000 + i) }
    }

    #[test]
    fn every_node_gets_a_pinned_route_and_a_place_in_the_round_robin() {
        let conf = site_config("127.0.0.1:8080", &[local(1), local(2)]);
        assert!(conf.contains("listen 127.0.0.1:8080;"), "{conf}");
        for i in 1..=2 {
            assert!(conf.contains(&format!("location /app-{i}/ {{")), "{conf}");
            assert!(conf.contains(&format!("proxy_pass http://app_{i}$fleet_pinned_uri;")), "{conf}");
            assert!(conf.contains(&format!("upstream app_{i} {{\n    server 127.0.0.1:4000{i};")), "{conf}");
            assert!(conf.contains(&format!("    server 127.0.0.1:4000{i} max_fails=")), "{conf}");
        }
    }

    #[test]
    fn the_compose_topology_is_four_nodes_on_port_3000() {
        let names: Vec<_> = compose_upstreams().into_iter().map(|u| (u.name, u.address)).collect();
        let expected: Vec<_> = (1..=4).map(|i| (format!("app-{i}"), format!("app-{i}:3000"))).collect();
        assert_eq!(names, expected);
    }

    #[test]
    fn the_local_config_keeps_every_file_inside_its_directory() {
        let dir = Path::new("/tmp/fleet dir/nginx");
        let conf =
            local_config(dir, "127.0.0.1:8080", &[local(1), local(2)], &["app-2".to_owned()], &[], &[]);
        assert!(
            conf.contains(&format!("server {} max_fails=2 fail_timeout=5s down;", local(2).address)),
            "{conf}"
        );
        for directive in ["pid", "client_body_temp_path", "proxy_temp_path", "fastcgi_temp_path"] {
            let line = conf.lines().find(|l| l.trim_start().starts_with(directive)).unwrap();
            assert!(line.contains("\"/tmp/fleet dir/nginx/"), "{line}");
        }
        assert!(conf.contains("daemon off;") && conf.contains("access_log off;"), "{conf}");
        assert!(conf.contains("    upstream fleet {"), "the site config is inside http {{}}: {conf}");
    }

    #[test]
    fn every_error_nginx_answers_itself_is_json_in_the_apis_shape() {
        let conf = site_config("80", &[local(1)]);
        for (status, code, _) in NGINX_ERRORS {
            assert!(conf.contains(&format!("    error_page {status} @error_{status};\n")), "{conf}");
            let location = conf.split(&format!("location @error_{status} {{")).nth(1).unwrap();
            let body = location.split('\'').nth(1).unwrap();
            let json: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!((json["success"].as_bool(), json["code"].as_str()), (Some(false), Some(*code)));
            assert_eq!(json["container"], "nginx");
        }
        let too_large = NGINX_ERRORS.iter().find(|(status, _, _)| *status == 413).unwrap().2;
        let limit = format!("{} MiB", CLIENT_MAX_BODY_SIZE.trim_end_matches('m'));
        assert!(too_large.ends_with(&limit), "{too_large} names nginx's limit {CLIENT_MAX_BODY_SIZE}");
    }

    fn networks(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn the_lab_and_operator_endpoints_are_refused_outside_the_operators_networks() {
        let dir = Path::new("/tmp/fleet");
        let conf =
            local_config(dir, "127.0.0.1:8080", &[local(1)], &[], &networks(&["10.0.0.0/8", "::1"]), &[]);
        assert!(
            conf.contains(
                "geo $fleet_operator {\n        default 0;\n        10.0.0.0/8 1;\n        ::1 1;\n    }"
            ),
            "{conf}"
        );
        assert!(conf.contains("    if ($fleet_refused) {\n            return 403;\n        }"), "{conf}");
        // Compose reads them from the image's file, which FLEET_OPERATOR_NETWORKS may replace.
        let compose = site_config("80", &[local(1)]);
        assert!(compose.contains("    default 0;\n    include operator-networks.conf;\n}"), "{compose}");
        let file = operator_networks_conf(&networks(OPERATOR_NETWORKS));
        assert!(file.lines().skip(1).eq(OPERATOR_NETWORKS.iter().map(|n| format!("{n} 1;"))), "{file}");
    }

    #[test]
    fn only_trusted_proxies_name_the_client_and_by_default_none_does() {
        let dir = Path::new("/tmp/fleet");
        let trusted = networks(&["127.0.0.1", "10.1.0.0/16"]);
        let conf = local_config(dir, "127.0.0.1:8080", &[local(1)], &[], &[], &trusted);
        let realip = "        set_real_ip_from 127.0.0.1;\n        set_real_ip_from 10.1.0.0/16;\n        \
                      real_ip_header X-Forwarded-For;\n        real_ip_recursive on;\n";
        assert!(conf.contains(&format!("        server_tokens off;\n{realip}")), "{conf}");
        let untrusting = local_config(dir, "127.0.0.1:8080", &[local(1)], &[], &[], &[]);
        assert!(!untrusting.contains("real_ip"), "{untrusting}");
        // Compose reads them from the image's file (none trusted), which FLEET_TRUSTED_PROXIES may replace.
        let compose = site_config("80", &[local(1)]);
        assert!(compose.contains("    server_tokens off;\n    include trusted-proxies.conf;\n"), "{compose}");
        assert_eq!(trusted_proxies_conf(&[]).lines().count(), 1, "a comment only");
    }

    #[test]
    #[should_panic(expected = "is not an IP address")]
    fn a_trusted_proxy_that_is_not_an_address_is_refused() {
        trusted_proxies_conf(&networks(&["127.0.0.1; real_ip_header X-Evil"]));
    }

    #[test]
    fn an_operator_network_is_an_address_or_a_cidr_range() {
        for good in ["127.0.0.1", "10.0.0.0/8", "0.0.0.0/0", "::1", "fc00::/7", "::/0"] {
            assert_eq!(check_network(good), Ok(()), "{good}");
        }
        for bad in ["", "localhost", "10.0.0.0/33", "::/129", "10.0.0.0/", "1.2.3.4 1; }", "10/8"] {
            assert!(check_network(bad).is_err(), "{bad}");
        }
    }

    #[test]
    #[should_panic(expected = "must be ASCII letters")]
    fn a_node_name_that_would_break_the_config_is_refused() {
        site_config("80", &[Upstream { name: "app 1;".into(), address: "127.0.0.1:1".into() }]);
    }
}
