//! TLS to PostgreSQL: `sslmode` and `sslrootcert` in `DATABASE_URL`, as libpq reads them, against a
//! server that accepts TLS connections only, with a certificate from a CA made here.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fleet_local::{Node, Postgres, PostgresOptions};
use fleet_tests::{node_options, Api, TestPostgres};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use reqwest::StatusCode;
use serde_json::json;

/// A CA and a server certificate it signed for `127.0.0.1` (and no other name), plus a CA that signed
/// nothing of the server's, in a directory the `postgres` user may read.
struct Certificates {
    dir: tempfile::TempDir,
}

impl Certificates {
    fn new() -> Certificates {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let ca = ca("pgfleet test CA");
        let key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(["127.0.0.1".to_owned()]).unwrap().signed_by(&key, &ca).unwrap();
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).unwrap();
        write("ca.crt", ca.pem());
        write("other-ca.crt", self::ca("another CA").pem());
        write("server.crt", server.pem());
        write("server.key", key.serialize_pem());
        // PostgreSQL reads its key only if no one else may: 0600, owned by the user it runs as.
        let key_file = dir.path().join("server.key");
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        if let Some(user) = nix::unistd::User::from_name("postgres").unwrap().filter(|_| is_root()) {
            std::os::unix::fs::chown(&key_file, Some(user.uid.as_raw()), Some(user.gid.as_raw())).unwrap();
        }
        write("pg_hba.conf", "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n".to_owned());
        Certificates { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A private PostgreSQL with `ssl = on` whose `pg_hba.conf` accepts TCP connections over TLS only.
fn tls_only_postgres(certs: &Certificates) -> TestPostgres {
    let path = |name: &str| certs.path(name).display().to_string();
    let settings = [
        ("ssl", "on".to_owned()),
        ("ssl_cert_file", path("server.crt")),
        ("ssl_key_file", path("server.key")),
        ("hba_file", path("pg_hba.conf")),
    ];
    let extra_settings = settings.into_iter().map(|(name, value)| (name.to_owned(), value)).collect();
    TestPostgres::start(PostgresOptions { extra_settings, ..PostgresOptions::default() }).unwrap()
}

/// `pg`'s application URL with `host` for its host and `query` appended.
fn url(pg: &Postgres, host: &str, query: &str) -> String {
    let url = pg.url().replace("@127.0.0.1:", &format!("@{host}:"));
    if query.is_empty() {
        url
    } else {
        format!("{url}?{query}")
    }
}

/// Starts a node on `database_url` (with `env`); returns the node, or its error and how long it took.
fn spawn(pg: &Postgres, database_url: String, env: &[(&str, &str)]) -> Result<Node, (String, Duration)> {
    let mut opts = node_options(pg, "app-1", env);
    opts.database_url = database_url.into();
    let start = Instant::now();
    Node::spawn(opts).map_err(|e| (format!("{e:#}"), start.elapsed()))
}

/// Whether every session of the node's is encrypted right now, and how many there are: `t/6`.
fn node_sessions_over_tls(pg: &Postgres) -> String {
    pg.psql(
        "SELECT bool_and(s.ssl) || '/' || count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.application_name LIKE 'fleet-app/%'",
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_speaks_tls_to_a_server_that_requires_it_and_verifies_it_as_libpq_would() {
    let certs = Certificates::new();
    let pg = tls_only_postgres(&certs);
    let ca = format!("sslrootcert={}", certs.path("ca.crt").display());
    let other_ca = format!("sslrootcert={}", certs.path("other-ca.crt").display());

    // verify-full with the server's CA: every pool (writes, reads, the isolation lab's connections) works.
    let full = url(&pg, "127.0.0.1", &format!("sslmode=verify-full&{ca}"));
    let node = spawn(&pg, full.clone(), &[("DATABASE_READ_URL", &full)]).expect("verify-full, right CA");
    let api = Api::new(node.url());
    assert_eq!(api.increment("tls").await.status, StatusCode::OK);
    assert_eq!(api.get("/api/counters/tls").await.body["value"], 1);
    let isolation = api.post("/api/test-isolation", &json!({"level": "READ COMMITTED"})).await;
    assert_eq!(isolation.status, StatusCode::OK, "{:?}", isolation.body);
    let sessions = node_sessions_over_tls(&pg);
    assert!(sessions.starts_with("true/"), "every session of the node is encrypted: {sessions}");
    drop(node);

    // No sslmode is libpq's `prefer`: TLS when the server offers it; `require` encrypts without checking
    // the certificate (no sslrootcert); `verify-ca` checks the chain but not the name.
    for (host, query) in [("127.0.0.1", String::new()), ("127.0.0.1", "sslmode=require".to_owned())]
        .into_iter()
        .chain([("localhost", format!("sslmode=verify-ca&{ca}"))])
    {
        let node = spawn(&pg, url(&pg, host, &query), &[]).unwrap_or_else(|e| panic!("{query:?}: {e:?}"));
        assert_eq!(Api::new(node.url()).increment("tls").await.status, StatusCode::OK, "{query:?}");
    }

    // Refused at start-up, at once, saying why: a certificate for another name (verify-full), from
    // another CA (require with an sslrootcert verifies the chain, as libpq does), and no TLS at all.
    for (host, query, why) in [
        ("localhost", format!("sslmode=verify-full&{ca}"), "certificate"),
        ("127.0.0.1", format!("sslmode=verify-full&{other_ca}"), "certificate"),
        ("127.0.0.1", format!("sslmode=require&{other_ca}"), "certificate"),
        ("127.0.0.1", "sslmode=disable".to_owned(), "no encryption"),
    ] {
        let (error, took) = spawn(&pg, url(&pg, host, &query), &[]).expect_err(&query);
        assert!(error.contains(why), "{query}: {error}");
        assert!(took < Duration::from_secs(10), "{query}: refused after {took:?}, not at once");
    }
}
