//! The deployment files, checked with the real tools since no Docker engine runs here: the rendered nginx
//! and Prometheus configs against their committed copies, `nginx -t` and `promtool` on every rendering,
//! Patroni's `--validate-config` on the `ha` profile's member config, `docker-compose.yml` against the
//! compose-spec schema and against itself (the `ha` profile's members, nodes and URLs included), and the
//! dashboard's and the rules' queries against what a live node exports. Plus one run of the local nginx
//! config in front of real nodes.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fleet_local::exporter::{Exporter, ExporterOptions};
use fleet_local::nginx::{self, compose_ha_upstreams, compose_upstreams, Upstream};
use fleet_local::{free_port, nginx_bin, prometheus, prometheus_bin, Child, Component, Log, Node};
use fleet_tests::{node_options, start_postgres, test_log, Api, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// How often the compose Prometheus scrapes (and evaluates rules).
const COMPOSE_SCRAPE_INTERVAL: &str = "5s";
/// Where docker-compose.yml mounts the rules, as the compose Prometheus config names them.
const COMPOSE_RULES: &str = "/etc/prometheus/rules.yml";

// ---- golden copies: the compose files are the renderers' output ----

#[test]
fn nginx_default_conf_is_the_rendering_of_the_compose_topology() {
    golden("nginx/default.conf", &nginx::site_config("80", &compose_upstreams()));
}

#[test]
fn nginx_ha_conf_is_the_rendering_of_the_ha_profiles_nodes() {
    golden("nginx/ha.conf", &nginx::site_config("80", &compose_ha_upstreams()));
}

#[test]
fn the_compose_nginx_images_operator_networks_are_the_default_ones() {
    let default: Vec<String> = nginx::OPERATOR_NETWORKS.iter().map(|n| n.to_string()).collect();
    golden("deploy/nginx/operator-networks.conf", &nginx::operator_networks_conf(&default));
}

#[test]
fn the_compose_nginx_images_trusted_proxies_are_none() {
    golden("deploy/nginx/trusted-proxies.conf", &nginx::trusted_proxies_conf(&[]));
}

#[test]
fn the_compose_nginx_renders_its_operator_networks_and_trusted_proxies_as_the_local_fleet_does() {
    let script = repo().join("deploy/nginx/networks.sh");
    let render = |include: &str, variable: &str, networks: &str| {
        let out = Command::new("sh").arg(&script).arg(include).env(variable, networks).output().unwrap();
        (out.status.success(), String::from_utf8(out.stdout).unwrap())
    };
    let networks = ["10.1.0.0/16", "192.0.2.7", "2001:db8::/32"].map(str::to_owned);
    let rendered = [
        ("operator-networks", "FLEET_OPERATOR_NETWORKS", nginx::operator_networks_conf(&networks)),
        ("trusted-proxies", "FLEET_TRUSTED_PROXIES", nginx::trusted_proxies_conf(&networks)),
    ];
    for (include, variable, conf) in rendered {
        assert_eq!(render(include, variable, &networks.join(",")), (true, conf), "{include}");
        for bad in ["10.0.0.0/8;deny", "10.0.0.0/8 1; }", "localhost", "1.2.3.4/8/8"] {
            assert!(!render(include, variable, bad).0, "{include}: {bad} was taken");
        }
    }
}

#[test]
fn the_compose_prometheus_finds_every_node_member_and_the_exporter_under_the_local_jobs() {
    // By name in Docker's DNS, with the local config's job names and labels (rules and dashboards select
    // on them): every node of both profiles, every Patroni member, the exporter.
    let config = yaml("deploy/prometheus/prometheus.yml");
    let compose = compose();
    let services = compose["services"].as_object().unwrap();
    let job = |name: &str| {
        let jobs = config["scrape_configs"].as_array().unwrap();
        let job = jobs.iter().find(|j| j["job_name"] == json!(name));
        job.unwrap_or_else(|| panic!("no job {name}")).clone()
    };
    let names = |job: &Value| -> (Vec<String>, Value) {
        let sd = &job["dns_sd_configs"][0];
        let names = sd["names"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_owned()).collect();
        (names, sd["port"].clone())
    };
    let label = |job: &Value| job["relabel_configs"][0]["target_label"].clone();

    let nodes = job(prometheus::NODE_JOB);
    let expected: Vec<String> =
        compose_upstreams().into_iter().chain(compose_ha_upstreams()).map(|n| n.name).collect();
    assert_eq!(names(&nodes), (expected, json!(3000)));
    assert_eq!(label(&nodes), json!("container"));

    let patroni = job(prometheus::PATRONI_JOB);
    let api_port = port_of(&yaml("deploy/patroni/patroni.yml")["restapi"]["listen"]);
    assert_eq!(names(&patroni), (patroni_members(services), json!(api_port.parse::<u16>().unwrap())));
    assert_eq!(label(&patroni), json!("member"));

    let exporter = job(prometheus::POSTGRES_JOB);
    assert_eq!(names(&exporter), (vec!["postgres-exporter".to_owned()], json!(9187)));
    assert_eq!(services["postgres-exporter"]["expose"], json!(["9187"]));
    assert_eq!(config["global"]["scrape_interval"], json!(COMPOSE_SCRAPE_INTERVAL));
}

#[test]
fn the_compose_exporter_queries_are_the_local_fleets() {
    golden("deploy/postgres-exporter/queries.yaml", fleet_local::exporter::QUERIES);
}

/// Asserts that the committed file `path` is `rendered`; with `UPDATE_GOLDEN=1`, writes it instead.
fn golden(path: &str, rendered: &str) {
    let file = repo().join(path);
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        fs::write(&file, rendered).unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
        return;
    }
    let committed = fs::read_to_string(&file).unwrap_or_default();
    if committed != rendered {
        let line = committed.lines().zip(rendered.lines()).position(|(a, b)| a != b);
        let line = line.unwrap_or(committed.lines().count().min(rendered.lines().count()));
        panic!(
            "{path} differs from its rendering from line {}:\n  committed: {:?}\n  rendered:  {:?}\n\
             Run `UPDATE_GOLDEN=1 cargo test -p fleet-tests --test fleet -- deploy::` to rewrite it, then review the diff.",
            line + 1,
            committed.lines().nth(line),
            rendered.lines().nth(line),
        );
    }
}

#[test]
fn compose_postgres_runs_with_the_local_launchers_deadlock_timeout() {
    let setting = format!("\"deadlock_timeout={}\"", fleet_local::DEADLOCK_TIMEOUT);
    assert!(
        read("docker-compose.yml").contains(&setting),
        "docker-compose.yml's postgres command sets {setting}"
    );
}

// ---- nginx -t ----

#[test]
fn nginx_accepts_the_compose_config() {
    nginx_accepts_compose_file("nginx/default.conf", &compose_upstreams());
}

#[test]
fn nginx_accepts_the_compose_ha_config() {
    nginx_accepts_compose_file("nginx/ha.conf", &compose_ha_upstreams());
}

/// `nginx -t` on the committed compose site config `path` for `upstreams`.
fn nginx_accepts_compose_file(path: &str, upstreams: &[Upstream]) {
    // `nginx -t` resolves every upstream host name, and app-1..app-4 only resolve on the compose
    // network. So the committed file is tested with one change, each `server app-N:3000` pointed at
    // 127.0.0.1:3000 (counted below), inside a main config laid out like the official image's
    // (`http { include conf.d/default.conf; }`, temp paths moved into the test's directory).
    let committed = read(path);
    let mut conf = committed.clone();
    for node in upstreams {
        let server = format!("server {}", node.address);
        assert_eq!(conf.matches(&server).count(), 2, "{} is in `fleet` and in its own upstream", node.name);
        conf = conf.replace(&server, "server 127.0.0.1:3000");
    }
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("conf.d")).unwrap();
    fs::write(dir.path().join("conf.d/default.conf"), conf).unwrap();
    // Included from nginx's config directory, where the image puts them.
    for file in [nginx::OPERATOR_NETWORKS_FILE, nginx::TRUSTED_PROXIES_FILE] {
        fs::write(dir.path().join(file), read(&format!("deploy/nginx/{file}"))).unwrap();
    }
    let main = format!(
        "pid nginx.pid;\nerror_log stderr;\nevents {{}}\nhttp {{\n{}    include conf.d/default.conf;\n}}\n",
        ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
            .map(|t| format!("    {t}_temp_path {t}_temp;\n"))
            .concat()
    );
    fs::write(dir.path().join("nginx.conf"), main).unwrap();
    nginx_t(dir.path());
    // And with the trusted proxies the entrypoint renders from FLEET_TRUSTED_PROXIES.
    let rendered = Command::new("sh")
        .arg(repo().join("deploy/nginx/networks.sh"))
        .arg("trusted-proxies")
        .env("FLEET_TRUSTED_PROXIES", "10.0.0.0/8,fc00::/7")
        .output()
        .unwrap();
    assert!(rendered.status.success(), "{}", String::from_utf8_lossy(&rendered.stderr));
    fs::write(dir.path().join(nginx::TRUSTED_PROXIES_FILE), rendered.stdout).unwrap();
    nginx_t(dir.path());
}

#[test]
fn the_compose_nginx_has_the_local_fleets_worker_limits() {
    let main = read("deploy/nginx/nginx.conf");
    assert!(main.contains(nginx::WORKER_LIMITS), "{main}");
    assert!(main.contains("include /etc/nginx/conf.d/*.conf;"), "{main}");
}

#[test]
fn nginx_accepts_the_local_config() {
    let dir = tempfile::tempdir().unwrap();
    let operators: Vec<String> = nginx::OPERATOR_NETWORKS.iter().map(|n| n.to_string()).collect();
    // With trusted proxies: nginx has the real IP module and takes its directives where they are.
    let proxies = ["127.0.0.1".to_owned(), "fc00::/7".to_owned()];
    let conf = nginx::local_config(
        dir.path(),
        "127.0.0.1:8080",
        &loopback_nodes(4),
        &["app-2".to_owned()],
        &operators,
        &proxies,
    );
    fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    nginx_t(dir.path());
}

/// `nginx -t -c <dir>/nginx.conf -p <dir>` succeeds.
fn nginx_t(dir: &Path) {
    let mut cmd = Command::new(nginx_bin().unwrap());
    cmd.arg("-t").arg("-c").arg(dir.join("nginx.conf")).arg("-p").arg(dir);
    let output = run(&mut cmd);
    assert!(output.contains("test is successful"), "{output}");
}

// ---- promtool ----

#[test]
fn promtool_accepts_the_compose_prometheus_config_and_its_rules() {
    // The committed config names the rules by their path in the container; the check points that
    // one path at the repository's file (the only change) so that promtool loads and checks them too.
    let committed = read("deploy/prometheus/prometheus.yml");
    let rules = repo().join("deploy/prometheus/rules.yml");
    assert_eq!(committed.matches(COMPOSE_RULES).count(), 1, "{committed}");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    fs::write(&config, committed.replace(COMPOSE_RULES, rules.to_str().unwrap())).unwrap();
    let output = promtool(&["check", "config"], &config);
    assert!(output.contains("SUCCESS: 1 rule files found"), "{output}");

    let output = promtool(&["check", "rules"], &rules);
    assert!(output.contains("SUCCESS"), "{output}");
    let output = promtool(&["test", "rules"], &repo().join("deploy/prometheus/rules.test.yml"));
    assert!(output.contains("SUCCESS"), "{output}");
}

#[test]
fn promtool_accepts_a_local_prometheus_config() {
    let dir = tempfile::tempdir().unwrap();
    let rules = repo().join("deploy/prometheus/rules.yml");
    for rule_files in [vec![rules.to_str().unwrap()], vec![]] {
        let config = dir.path().join("prometheus.yml");
        fs::write(
            &config,
            prometheus::config(
                &prometheus::Targets {
                    nodes: &loopback_nodes(3),
                    exporter: Some("127.0.0.1:9187"),
                    patroni: &[],
                },
                "1s",
                &rule_files,
                "127.0.0.1:9090",
            ),
        )
        .unwrap();
        let output = promtool(&["check", "config"], &config);
        assert!(rule_files.is_empty() || output.contains("SUCCESS: 1 rule files found"), "{output}");
    }
}

fn promtool(args: &[&str], file: &Path) -> String {
    run(Command::new(prometheus_bin("promtool").unwrap()).args(args).arg(file))
}

// ---- docker-compose.yml ----

#[test]
fn docker_compose_yml_follows_the_compose_spec_schema() {
    let schema: Value = serde_json::from_str(&read("tests/fixtures/compose-spec.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).expect("the compose-spec schema compiles");
    let errors = |compose: &Value| -> Vec<String> {
        validator.iter_errors(compose).map(|e| format!("{}: {e}", e.instance_path())).collect()
    };
    let compose = compose();
    assert_eq!(errors(&compose), Vec::<String>::new());

    // The schema really is enforced: a misspelt key and an unknown condition are refused.
    let mut broken = compose.clone();
    broken["services"]["postgres"]["healthcheck"]["intervall"] = json!("2s");
    broken["services"]["nginx"]["depends_on"]["app-1"]["condition"] = json!("service_ready");
    let errors = errors(&broken);
    for (path, word) in
        [("/services/postgres/healthcheck:", "intervall"), ("/services/nginx/depends_on:", "service_ready")]
    {
        assert!(errors.iter().any(|e| e.starts_with(path) && e.contains(word)), "{path} {word}: {errors:?}");
    }
}

#[test]
fn every_service_port_volume_and_file_docker_compose_yml_names_exists() {
    let compose = compose();
    let services = compose["services"].as_object().expect("services");
    let declared_volumes = compose["volumes"].as_object().cloned().unwrap_or_default();

    for (name, service) in services {
        if let Some(build) = service.get("build") {
            assert!(repo().join(build["context"].as_str().unwrap()).is_dir(), "{name}'s build context");
            assert!(dockerfile(build).is_file(), "{name}'s Dockerfile");
        }
        for (source, _target) in mounts(service) {
            if source.starts_with('.') {
                assert!(
                    repo().join(&source).exists(),
                    "{name} mounts {source}, which is not in the repository"
                );
            } else {
                assert!(declared_volumes.contains_key(&source), "{name} uses volume {source}, not declared");
            }
        }
        for (dependency, condition) in depends_on(service) {
            let target = services.get(&dependency);
            let target =
                target.unwrap_or_else(|| panic!("{name} depends on {dependency}, which is no service"));
            let expected = if has_healthcheck(target) { "service_healthy" } else { "service_started" };
            assert_eq!(
                condition, expected,
                "{name} → {dependency}: wait for health when there is a healthcheck"
            );
        }
    }

    // Every node nginx and Prometheus are configured with is a service listening on 3000 with its
    // CONTAINER_ID, and every service built from the node image is one of them.
    let nodes = compose_upstreams();
    for node in &nodes {
        let service = services.get(&node.name).unwrap_or_else(|| panic!("no service {}", node.name));
        let (host, port) = node.address.split_once(':').unwrap();
        assert_eq!(host, node.name, "compose services are reached by their name");
        assert_eq!(service["expose"], json!([port]), "{}", node.name);
        assert_eq!(service["environment"]["PORT"], json!(port), "{}", node.name);
        assert_eq!(service["environment"]["CONTAINER_ID"], json!(node.name));
    }
    let from_node_image: BTreeSet<&str> = services
        .iter()
        .filter(|(_, s)| s.get("build").is_some_and(|b| dockerfile(b) == repo().join("deploy/Dockerfile")))
        .map(|(n, _)| n.as_str())
        .collect();
    let ha_nodes = compose_ha_upstreams();
    let expected: BTreeSet<&str> = nodes.iter().chain(&ha_nodes).map(|n| n.name.as_str()).collect();
    assert_eq!(from_node_image, expected, "the nodes and the ha profile's nodes");
    let pulled: Vec<&str> =
        services.iter().filter(|(_, s)| s.get("build").is_none()).map(|(n, _)| n.as_str()).collect();
    assert_eq!(pulled, ["grafana"], "every image but Grafana's is built here");

    // nginx publishes 80 (or FLEET_HTTP_PORT), where the rendered config listens; each config is
    // mounted where it is read.
    assert_eq!(services["nginx"]["ports"], json!(["${FLEET_HTTP_PORT:-80}:80"]));
    let mounted = |service: &str, source: &str| {
        let found = mounts(&services[service]).into_iter().find(|(s, _)| s == source);
        found.unwrap_or_else(|| panic!("{service} does not mount {source}")).1
    };
    assert_eq!(mounted("nginx", "./nginx/default.conf"), "/etc/nginx/conf.d/default.conf");
    assert_eq!(mounted("prometheus", "./deploy/prometheus/prometheus.yml"), "/etc/prometheus/prometheus.yml");
    assert_eq!(mounted("prometheus", "./deploy/prometheus/rules.yml"), COMPOSE_RULES);
    assert_eq!(mounted("grafana", "./deploy/grafana/provisioning"), "/etc/grafana/provisioning");
    let provider = yaml("deploy/grafana/provisioning/dashboards/pgfleet.yml");
    assert_eq!(
        mounted("grafana", "./deploy/grafana/dashboards"),
        provider["providers"][0]["options"]["path"]
    );
}

/// The services built from deploy/patroni/Dockerfile.
fn patroni_members(services: &serde_json::Map<String, Value>) -> Vec<String> {
    let patroni = repo().join("deploy/patroni/Dockerfile");
    let built_from = |s: &Value| s.get("build").is_some_and(|b| dockerfile(b) == patroni);
    services.iter().filter(|(_, s)| built_from(s)).map(|(n, _)| n.clone()).collect()
}

#[test]
fn the_ha_profile_runs_its_nodes_on_three_patroni_members_through_the_two_urls() {
    let compose = compose();
    let services = compose["services"].as_object().unwrap();
    let members = patroni_members(services);
    assert_eq!(members, ["pg-1", "pg-2", "pg-3"]);
    let config = yaml("deploy/patroni/patroni.yml");
    let (api_port, pg_port) =
        (port_of(&config["restapi"]["listen"]), port_of(&config["postgresql"]["listen"]));

    // Each member names itself and the addresses it is reached at; the store is the etcd service, as
    // its user root.
    let etcd = &services["etcd"];
    for name in &members {
        let member = &services[name.as_str()];
        let env = &member["environment"];
        let (etcd_host, etcd_port) = env["PATRONI_ETCD3_HOSTS"].as_str().unwrap().split_once(':').unwrap();
        assert_eq!((etcd_host, etcd["expose"].clone()), ("etcd", json!([etcd_port])), "{name}");
        assert_eq!(env["PATRONI_ETCD3_USERNAME"], "root", "{name}");
        assert_eq!(env["PATRONI_ETCD3_PASSWORD"], etcd["environment"]["ROOT_PASSWORD"], "{name}");
        assert_eq!(env["PATRONI_NAME"], json!(name));
        assert_eq!(env["PATRONI_RESTAPI_CONNECT_ADDRESS"], json!(format!("{name}:{api_port}")));
        assert_eq!(env["PATRONI_POSTGRESQL_CONNECT_ADDRESS"], json!(format!("{name}:{pg_port}")));
        assert_eq!(member["expose"], json!([pg_port, api_port]), "{name}");
        assert!(depends_on(member).contains(&("etcd".to_owned(), "service_healthy".to_owned())), "{name}");
        for secret in [
            "PATRONI_SUPERUSER_PASSWORD",
            "PATRONI_REPLICATION_PASSWORD",
            "PATRONI_RESTAPI_PASSWORD",
            "PATRONI_ETCD3_PASSWORD",
        ] {
            assert!(
                env[secret].as_str().is_some_and(|v| v.starts_with("${")),
                "{name}'s {secret} comes from outside"
            );
        }
        let data = mounts(member).into_iter().find(|(_, target)| {
            config["postgresql"]["data_dir"].as_str().unwrap().starts_with(target.as_str())
        });
        assert!(data.is_some_and(|(source, _)| !source.starts_with('.')), "{name} keeps PGDATA in a volume");
    }

    // The local cluster's timings and synchronous replication; the app role from the postgres image's script.
    let dcs = &config["bootstrap"]["dcs"];
    let timings = [dcs["ttl"].clone(), dcs["loop_wait"].clone(), dcs["retry_timeout"].clone()];
    use fleet_local::patroni::{LOOP_WAIT_S, REPLICATION_TIMEOUT_S, RETRY_TIMEOUT_S, TTL_S};
    assert_eq!(timings, [json!(TTL_S), json!(LOOP_WAIT_S), json!(RETRY_TIMEOUT_S)]);
    for mode in ["synchronous_mode", "synchronous_mode_strict", "failsafe_mode"] {
        assert_eq!(dcs[mode], json!(true), "{mode}");
    }
    for timeout in ["wal_sender_timeout", "wal_receiver_timeout"] {
        assert_eq!(dcs["postgresql"]["parameters"][timeout], json!(format!("{REPLICATION_TIMEOUT_S}s")));
    }
    let image = read("deploy/patroni/Dockerfile");
    let post_bootstrap = config["bootstrap"]["post_bootstrap"].as_str().unwrap();
    assert!(image.contains(&format!("COPY postgres/create-app-role.sh {post_bootstrap}")), "{image}");
    assert!(image.contains(&format!("http://127.0.0.1:{api_port}/health")), "the healthcheck asks Patroni");
    let member_env = &services["pg-1"]["environment"];
    assert_eq!(member_env["APP_DB_USER"], json!("appuser"));
    assert_eq!(member_env["APP_DB_NAME"], json!("appdb"));

    // Every ha node writes through every member (read-write) and reads through every member (read-only,
    // load-balanced), behind an nginx of its own; all of it only with the profile.
    let hosts = members.iter().map(|m| format!("{m}:{pg_port}")).collect::<Vec<_>>().join(",");
    for node in compose_ha_upstreams() {
        let service = &services[node.name.as_str()];
        let env = &service["environment"];
        assert_eq!(env["CONTAINER_ID"], json!(node.name));
        assert_eq!(service["expose"], json!([node.address.split_once(':').unwrap().1]));
        let url = |name: &str| env[name].as_str().unwrap().split_once('@').unwrap().1.to_owned();
        assert_eq!(url("DATABASE_URL"), format!("{hosts}/appdb?target_session_attrs=read-write"));
        assert_eq!(
            url("DATABASE_READ_URL"),
            format!("{hosts}/appdb?target_session_attrs=read-only&load_balance_hosts=random")
        );
        for member in &members {
            assert!(
                depends_on(service).contains(&(member.clone(), "service_healthy".to_owned())),
                "{}",
                node.name
            );
        }
    }
    let nginx = &services["ha-nginx"];
    let conf = mounts(nginx).into_iter().find(|(source, _)| source == "./nginx/ha.conf");
    assert_eq!(conf.map(|(_, target)| target).as_deref(), Some("/etc/nginx/conf.d/default.conf"));
    for (name, service) in services {
        let in_ha = members.contains(name)
            || compose_ha_upstreams().iter().any(|n| &n.name == name)
            || ["etcd", "ha-nginx"].contains(&name.as_str());
        let profiles = match name.as_str() {
            _ if in_ha => json!(["ha"]),
            "grafana" => json!(["dashboards"]),
            _ => Value::Null,
        };
        assert_eq!(service["profiles"], profiles, "{name}");
    }
}

#[test]
fn patroni_accepts_the_compose_member_config_with_a_members_environment() {
    // Patroni's own validator, on the committed file with pg-1's environment from docker-compose.yml (its
    // secrets replaced by placeholders). It connects to etcd's address, which only exists on the compose
    // network, so that one address is pointed at a listener of the test's; and it looks for the server
    // tools on PATH, where the image has them.
    let config = repo().join("deploy/patroni/patroni.yml");
    let etcd = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let compose = compose();
    let env = compose["services"]["pg-1"]["environment"].as_object().unwrap().clone();
    let bin_dir = fs::canonicalize(fleet_local::postgres_bin("postgres").unwrap()).unwrap();
    let path =
        format!("{}:{}", bin_dir.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let mut cmd = Command::new(fleet_local::patroni_bin().unwrap());
    cmd.arg("--validate-config").arg(&config).env("PATH", path);
    for (name, value) in env {
        let value = value.as_str().unwrap();
        cmd.env(name, if value.starts_with("${") { "placeholder" } else { value });
    }
    cmd.env("PATRONI_ETCD3_HOSTS", etcd.local_addr().unwrap().to_string());
    run(&mut cmd);

    // The validator really checks: a member without a name is refused.
    let unnamed = cmd.env_remove("PATRONI_NAME").output().unwrap();
    assert!(!unnamed.status.success(), "{}", String::from_utf8_lossy(&unnamed.stderr));
}

/// The port of a `host:port` listen address.
fn port_of(listen: &Value) -> String {
    listen.as_str().unwrap().rsplit_once(':').unwrap().1.to_owned()
}

#[test]
fn the_node_image_is_built_in_stages_and_runs_unprivileged_with_a_healthcheck() {
    let dockerfile = read("deploy/Dockerfile");
    let instructions: Vec<&str> =
        dockerfile.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
    let stages: Vec<usize> =
        (0..instructions.len()).filter(|&i| instructions[i].starts_with("FROM ")).collect();
    assert!(stages.len() >= 2, "a builder stage and a runtime stage");
    let runtime = &instructions[*stages.last().unwrap()..];
    let user =
        runtime.iter().rev().find_map(|l| l.strip_prefix("USER ")).expect("a USER in the runtime stage");
    assert!(!["root", "0"].contains(&user.split(':').next().unwrap()), "runs as {user}");
    assert!(runtime.contains(&"EXPOSE 3000"));
    let healthcheck = runtime.iter().find(|l| l.starts_with("HEALTHCHECK ")).expect("a HEALTHCHECK");
    assert!(healthcheck.ends_with(r#"CMD ["fleet-app", "healthcheck"]"#), "{healthcheck}");

    // The build context keeps every workspace member's manifest (cargo needs them all to load the
    // workspace) and the node's crate.
    let ignore = read(".dockerignore");
    let members = ["crates/fleet-app", "crates/fleet-local", "crates/fleetctl", "tests"];
    let manifests = members.map(|m| format!("!{m}/Cargo.toml"));
    let kept = ["!Cargo.toml", "!Cargo.lock", "!crates/fleet-app/"].map(str::to_owned);
    for kept in manifests.iter().chain(&kept) {
        assert!(ignore.lines().any(|l| l == kept), ".dockerignore must keep {kept}");
    }
}

#[test]
fn every_image_is_built_from_debian_bookworm_with_one_postgresql_major() {
    // The same server binaries as the local runtime: Debian's packages on debian:bookworm-slim (the node's
    // build stage on the Rust image of the same release), PostgreSQL 15 wherever a server runs.
    let compose = compose();
    let mut dockerfiles: BTreeSet<PathBuf> = BTreeSet::new();
    for service in compose["services"].as_object().unwrap().values() {
        dockerfiles.extend(service.get("build").map(dockerfile));
    }
    assert!(dockerfiles.len() >= 7, "{dockerfiles:?}");
    for path in &dockerfiles {
        let text = fs::read_to_string(path).unwrap();
        assert!(!text.starts_with("# syntax="), "{}: a syntax line pulls a frontend image", path.display());
        assert!(!text.contains("--mount="), "{}: RUN --mount needs BuildKit", path.display());
        for from in text.lines().filter_map(|l| l.strip_prefix("FROM ")) {
            let image = from.split_whitespace().next().unwrap();
            assert!(
                [
                    "debian:bookworm-slim",
                    "debian:${DEBIAN_RELEASE}-slim",
                    "rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE}"
                ]
                .contains(&image),
                "{}: FROM {image}",
                path.display()
            );
        }
        if text.contains("postgresql-") {
            assert!(text.contains("postgresql-15 "), "{}: PostgreSQL 15 as everywhere", path.display());
        }
    }
    let node = read("deploy/Dockerfile");
    assert!(node.contains("ARG DEBIAN_RELEASE=bookworm"), "{node}");
}

#[test]
fn compose_requires_its_secrets_and_publishes_only_nginx() {
    // Every secret is required, never defaulted. The default profile's are required by compose
    // (`${NAME:?message}`); another profile's (`${NAME:-}`, empty) by the container that uses it, which
    // names it and exits, so that a profile not asked for needs nothing. Plain settings
    // (`${LAB_ENDPOINTS:-true}`) may have a default.
    let text = read("docker-compose.yml");
    let uses: Vec<&str> = text.split("${").skip(1).map(|rest| rest.split('}').next().unwrap()).collect();
    let secret = |name: &str| ["PASSWORD", "SECRET", "TOKEN"].iter().any(|s| name.contains(s));
    assert!(uses.iter().any(|v| secret(v)), "compose takes its passwords from the environment");
    let checked_by_containers =
        [read("deploy/patroni/entrypoint.sh"), read("deploy/etcd/entrypoint.sh"), text.clone()].concat();
    for variable in &uses {
        let name = variable.split([':', '-', '?']).next().unwrap();
        assert!(name.chars().all(|c| c.is_ascii_uppercase() || c == '_'), "{variable}");
        if !secret(name) {
            continue;
        }
        match variable.split_once(":?") {
            Some((_, message)) => assert!(!message.is_empty(), "{variable}"),
            None => {
                assert_eq!(variable, &format!("{name}:-"), "the secret ${{{variable}}} has a default");
                let refusal = format!("set {name},");
                assert!(
                    checked_by_containers.contains(&refusal),
                    "no container refuses to run without {name}"
                );
            }
        }
    }
    for weak in ["apppass", "admin/admin"] {
        assert!(!text.contains(weak), "docker-compose.yml holds {weak:?}");
    }

    // Only nginx listens beyond the host; Prometheus has no lifecycle API (no remote shutdown or reload).
    let compose = compose();
    for (name, service) in compose["services"].as_object().unwrap() {
        for port in service["ports"].as_array().into_iter().flatten() {
            let port = port.as_str().expect("short port syntax");
            assert!(
                name == "nginx" || port.starts_with("127.0.0.1:"),
                "{name} publishes {port} to every interface"
            );
        }
    }
    let prometheus = read("deploy/prometheus/Dockerfile");
    assert!(!prometheus.contains("--web.enable-lifecycle"), "{prometheus}");
}

#[test]
fn in_compose_the_app_connects_as_its_own_role_created_by_the_init_script() {
    let compose = compose();
    let postgres = &compose["services"]["postgres"];
    let (db, node) = (&postgres["environment"], &compose["services"]["app-1"]["environment"]);
    assert_ne!(node["POSTGRES_USER"], json!("postgres"), "the app must not connect as the superuser");
    assert_ne!(db["POSTGRES_PASSWORD"], node["POSTGRES_PASSWORD"], "the superuser's password is its own");
    assert_eq!(db["APP_DB_USER"], node["POSTGRES_USER"]);
    assert_eq!(db["APP_DB_PASSWORD"], node["POSTGRES_PASSWORD"]);
    assert_eq!(db["APP_DB_NAME"], node["POSTGRES_DB"]);
    // The image makes the role with the cluster, by the script the test below runs.
    let image = read("deploy/postgres/Dockerfile");
    assert!(image.contains("COPY postgres/create-app-role.sh"), "{image}");
    let entrypoint = read("deploy/postgres/entrypoint.sh");
    assert!(entrypoint.contains("POSTGRES_USER=postgres create-app-role.sh"), "{entrypoint}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_init_script_creates_an_unprivileged_role_that_migrates_its_own_database() {
    let pg = start_postgres();
    // As the image runs it: psql on the server's Unix socket as the superuser. The password has quotes
    // and a psql variable in it, to show that nothing is spliced into SQL text.
    let (user, password, database) = ("fleet_app", r#"it's "quoted" :app_user"#, "fleet db");
    let socket_dir = pg.data_dir().parent().unwrap().to_owned();
    // psql through a wrapper that writes down its arguments: every local user can read a process's
    // arguments (/proc/<pid>/cmdline), so the password must be in none of them.
    let wrapper = tempfile::tempdir().unwrap();
    let arguments = wrapper.path().join("arguments");
    let psql = fleet_local::postgres_bin("psql").unwrap();
    let record = format!("printf '%s\\n' \"$@\" >>'{}'", arguments.display());
    fs::write(
        wrapper.path().join("psql"),
        format!("#!/bin/sh\n{record}\nexec '{}' \"$@\"\n", psql.display()),
    )
    .unwrap();
    fs::set_permissions(wrapper.path().join("psql"), fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", wrapper.path().display(), std::env::var("PATH").unwrap_or_default());
    let mut script = Command::new("sh");
    script
        .arg(repo().join("deploy/postgres/create-app-role.sh"))
        .env("PATH", path)
        .env("PGHOST", &socket_dir);
    script.env("PGPORT", pg.port().to_string()).env("POSTGRES_USER", fleet_local::postgres::ADMIN_USER);
    script.env("APP_DB_USER", user).env("APP_DB_PASSWORD", password).env("APP_DB_NAME", database);
    run(&mut script);
    let arguments = fs::read_to_string(arguments).unwrap();
    assert!(arguments.contains("--no-psqlrc"), "the script ran psql through the wrapper");
    assert!(!arguments.contains(password), "the app role's password was in psql's arguments");

    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(pg.port()).user(user).password(password).dbname(database);
    let (app, connection) = config.connect(tokio_postgres::NoTls).await.expect("the app role logs in");
    tokio::spawn(connection);
    let role = app
        .query_one(
            "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((role.get(0), role.get(1), role.get(2)), (false, false, false));
    for sql in ["CREATE ROLE intruder", "SELECT rolpassword FROM pg_authid", "CREATE DATABASE other"] {
        let err = app.batch_execute(sql).await.expect_err(sql);
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {err}"
        );
    }

    // The node migrates as that role; every table is the role's own.
    let migrate = Command::new(fleet_tests::node_bin())
        .arg("migrate")
        .env_clear()
        .envs([("POSTGRES_HOST", "127.0.0.1"), ("POSTGRES_USER", user), ("POSTGRES_PASSWORD", password)])
        .envs([("POSTGRES_DB", database), ("LOG_FORMAT", "text")])
        .env("POSTGRES_PORT", pg.port().to_string())
        .output()
        .unwrap();
    assert!(migrate.status.success(), "{}", String::from_utf8_lossy(&migrate.stderr));
    let owners = "SELECT count(*), count(*) FILTER (WHERE tableowner = current_user) FROM pg_tables \
                  WHERE schemaname = 'public'";
    let row = app.query_one(owners, &[]).await.unwrap();
    let (tables, owned): (i64, i64) = (row.get(0), row.get(1));
    assert!(tables >= 2 && owned == tables, "{owned} of {tables} tables are the app role's");

    // Other roles may not connect to its database.
    pg.psql("CREATE ROLE bystander LOGIN PASSWORD 'bystander'").unwrap();
    let mut other = config.clone();
    other.user("bystander").password("bystander");
    let err = other.connect(tokio_postgres::NoTls).await.map(drop).expect_err("bystander connects");
    assert_eq!(err.code(), Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE), "{err:?}");
}

/// docker-compose.yml as JSON, with YAML merge keys (`<<: *node`) applied as Compose applies them.
fn compose() -> Value {
    let mut compose: serde_norway::Value = serde_norway::from_str(&read("docker-compose.yml")).unwrap();
    // Twice: an anchor may itself merge another (`x-ha-node` is `x-node` and more).
    compose.apply_merge().expect("merge keys");
    compose.apply_merge().expect("nested merge keys");
    serde_json::to_value(compose).unwrap()
}

/// `(source, target)` of each volume of `service`, short (`src:dst[:mode]`) or long syntax.
fn mounts(service: &Value) -> Vec<(String, String)> {
    let volumes = service["volumes"].as_array().cloned().unwrap_or_default();
    let mount = |v: &Value| match v {
        Value::String(s) => {
            let mut parts = s.split(':');
            (
                parts.next().unwrap().to_owned(),
                parts.next().expect("short syntax is source:target").to_owned(),
            )
        }
        _ => (v["source"].as_str().unwrap().to_owned(), v["target"].as_str().unwrap().to_owned()),
    };
    volumes.iter().map(mount).collect()
}

/// `(dependency, condition)` for each `depends_on` entry; the list form means `service_started`.
fn depends_on(service: &Value) -> Vec<(String, String)> {
    match &service["depends_on"] {
        Value::Array(names) => {
            names.iter().map(|n| (n.as_str().unwrap().to_owned(), "service_started".to_owned())).collect()
        }
        Value::Object(map) => {
            map.iter().map(|(n, d)| (n.clone(), d["condition"].as_str().unwrap().to_owned())).collect()
        }
        _ => Vec::new(),
    }
}

/// Whether the service has a healthcheck: its own, or its image's `HEALTHCHECK` when built here.
fn has_healthcheck(service: &Value) -> bool {
    match service.get("healthcheck") {
        Some(check) => check["disable"] != json!(true) && check["test"] != json!(["NONE"]),
        None => service.get("build").is_some_and(|build| {
            let dockerfile = fs::read_to_string(dockerfile(build)).unwrap();
            dockerfile.lines().any(|l| l.starts_with("HEALTHCHECK ") && !l.ends_with("NONE"))
        }),
    }
}

/// The Dockerfile of a service's `build` (relative to its context).
fn dockerfile(build: &Value) -> PathBuf {
    repo().join(build["context"].as_str().unwrap()).join(build["dockerfile"].as_str().unwrap())
}

// ---- Grafana and the rules query what the nodes export ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_rules_query_only_metrics_a_node_exports() {
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/dashboards/pgfleet.json")).unwrap();
    let datasource =
        yaml("deploy/grafana/provisioning/datasources/prometheus.yml")["datasources"][0]["uid"].clone();
    let mut dashboard_queries = Vec::new();
    collect_queries(&dashboard, &datasource, &mut dashboard_queries);
    let rules = yaml("deploy/prometheus/rules.yml");
    let rule_list = rules["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap());
    let recorded: BTreeSet<&str> = rule_list.clone().filter_map(|r| r["record"].as_str()).collect();
    let rule_queries: Vec<String> = rule_list.map(|r| r["expr"].as_str().unwrap().to_owned()).collect();

    let app = TestApp::spawn(&[]);
    assert_eq!(app.api.increment("k").await.status, StatusCode::OK);
    let mut exported = exported_metrics(&app.api.metrics_text().await);
    // And what PostgreSQL's exporter exports, the fleet's own queries included.
    let dir = tempfile::tempdir().unwrap();
    let log = Log { quiet: !test_log(), file: Some(dir.path().join("postgres-exporter.log")) };
    let exporter = Exporter::start(ExporterOptions { postgres: &app.pg, dir: dir.path(), log }).unwrap();
    let from_postgres =
        exported_metrics(&Api::new(format!("http://{}", exporter.address())).metrics_text().await);
    assert!(from_postgres.contains(&("pg_up".to_owned(), "gauge".to_owned())), "{from_postgres:?}");
    exported.extend(from_postgres);

    let used =
        |queries: &[String]| -> BTreeSet<String> { queries.iter().flat_map(|q| metric_names(q)).collect() };
    let (dashboard_metrics, rule_metrics) = (used(&dashboard_queries), used(&rule_queries));
    for name in dashboard_metrics.iter().chain(&rule_metrics) {
        if name.contains(':') {
            assert!(recorded.contains(name.as_str()), "{name} is queried but no rule records it");
            continue;
        }
        let histogram = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| name.strip_suffix(suffix));
        let known = exported.iter().any(|(n, kind)| {
            n == name || (histogram == Some(n.as_str()) && ["histogram", "summary"].contains(&kind.as_str()))
        });
        assert!(known, "{name} is queried, but neither a node nor the exporter exports it: {exported:?}");
    }
    // The dashboard shows request rate, latency percentiles, errors and pool usage; the database's
    // connections by state, lock waits, deadlocks and transaction rate.
    for metric in [
        "fleet_http_requests_total",
        "fleet_http_request_duration_seconds_bucket",
        "fleet_db_pool_connections",
        "pg_stat_activity_count",
        "pg_lock_waits_waiting",
        "pg_stat_database_deadlocks",
        "pg_stat_database_xact_commit",
    ] {
        assert!(dashboard_metrics.contains(metric), "the dashboard does not show {metric}");
    }
}

/// Every PromQL query in a Grafana dashboard (`expr`, template variable queries), asserting that each
/// panel, target and variable uses the provisioned datasource.
fn collect_queries(value: &Value, datasource: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(ds) = map.get("datasource") {
                assert_eq!(&ds["uid"], datasource, "a panel or query uses another datasource: {ds}");
            }
            for (key, item) in map {
                match (key.as_str(), item) {
                    ("expr" | "query", Value::String(query)) => out.push(query.clone()),
                    _ => collect_queries(item, datasource, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_queries(item, datasource, out)),
        _ => {}
    }
}

/// The `fleet_*`, `process_*` and `pg_*` metric names in a PromQL query (and recording-rule names,
/// which hold a `:`), ignoring quoted label values.
fn metric_names(query: &str) -> Vec<String> {
    let mut unquoted = String::new();
    let mut quote = None;
    for c in query.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None => unquoted.push(c),
        }
    }
    unquoted
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|token| {
            let recorded = token.contains(':') && token.starts_with(|c: char| c.is_ascii_alphabetic());
            recorded || ["fleet_", "process_", "pg_"].iter().any(|prefix| token.starts_with(prefix))
        })
        .map(str::to_owned)
        .collect()
}

/// `(name, type)` of every metric family in a Prometheus text exposition.
fn exported_metrics(text: &str) -> BTreeSet<(String, String)> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.trim().to_owned()))
        .collect()
}

// ---- the local nginx config in front of real nodes ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_nginx_balances_pins_passes_escapes_and_skips_a_stopped_node() {
    let pg = start_postgres();
    let mut nodes: Vec<Node> =
        (1..=2).map(|i| Node::spawn(node_options(&pg, &format!("app-{i}"), &[])).expect("a node")).collect();
    let upstreams: Vec<Upstream> = nodes
        .iter()
        .map(|n| Upstream { name: n.container_id().to_owned(), address: format!("127.0.0.1:{}", n.port()) })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let conf = dir.path().join("nginx.conf");
    let listen = format!("127.0.0.1:{port}");
    fs::write(&conf, nginx::local_config(dir.path(), &listen, &upstreams, &[], &[], &[])).unwrap();
    let mut cmd = Command::new(nginx_bin().unwrap());
    cmd.arg("-c").arg(&conf).arg("-p").arg(dir.path());
    let mut nginx = Child::spawn("nginx", cmd, !test_log()).expect("start nginx");
    let url = format!("http://127.0.0.1:{port}");
    nginx.wait_for_http(&format!("{url}/nginx-health"), Instant::now() + Duration::from_secs(10)).unwrap();
    let balancer = Api::new(&url);

    // `/` alternates between the nodes; `/app-2/` reaches app-2 only, without its prefix.
    let mut seen = BTreeSet::new();
    for _ in 0..4 {
        seen.insert(balancer.get("/health/live").await.body["container"].to_string());
    }
    assert_eq!(seen.len(), 2, "round robin reached {seen:?}");
    let pinned = Api::new(format!("{url}/app-2"));
    for _ in 0..3 {
        assert_eq!(pinned.get("/health/live").await.body["container"], "app-2");
    }

    // A key with `/` and `?` in it, escaped in the path, reads the same through the pinned route as
    // from the node itself.
    let key = "a/b?c d";
    assert_eq!(balancer.increment(key).await.status, StatusCode::OK);
    let path = "/api/counters/a%2Fb%3Fc%20d";
    let direct = Api::new(nodes[1].url()).get(path).await;
    assert_eq!((direct.status, &direct.body["key"]), (StatusCode::OK, &json!(key)));
    let through = pinned.get(path).await;
    assert_eq!((through.status, &through.body), (direct.status, &direct.body));

    // A body above nginx's default 1 MiB limit reaches the node.
    let rows: Vec<String> = (0..200).map(|i| format!("{i:0>10000}")).collect();
    let bulk = pinned.bulk_insert(&rows).await;
    assert_eq!(bulk.status, StatusCode::OK, "{:?}", bulk.body);

    // With app-1 stopped, every request on `/` is answered by app-2: refused connections go to the
    // next node.
    nodes[0].child().terminate(Duration::from_secs(5)).unwrap();
    for _ in 0..6 {
        let reply = balancer.get("/health/live").await;
        assert_eq!((reply.status, &reply.body["container"]), (StatusCode::OK, &json!("app-2")));
    }
    assert_eq!(Api::new(format!("{url}/app-1")).get("/health/live").await.status, StatusCode::BAD_GATEWAY);
}

// ---- helpers ----

/// The repository root (this package is its `tests/` directory).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the repository root").to_owned()
}

fn read(path: &str) -> String {
    fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}

fn yaml(path: &str) -> Value {
    let value: serde_norway::Value =
        serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::to_value(value).unwrap()
}

/// `n` nodes app-1..app-n on loopback ports.
fn loopback_nodes(n: u16) -> Vec<Upstream> {
    (1..=n)
        .map(|i| Upstream { name: format!("app-{i}"), address: format!("127.0.0.1:{}", 41000 + i) })
        .collect()
}

/// Runs `cmd`, asserting that it succeeds; returns its stdout and stderr.
fn run(cmd: &mut Command) -> String {
    let output = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{cmd:?} failed ({}):\n{text}", output.status);
    text
}
