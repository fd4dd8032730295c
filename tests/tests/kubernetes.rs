//! `deploy/k8s`, validated offline (no cluster runs here): every overlay built with `kubectl kustomize`
//! (the pinned kubectl `scripts/python-tools` installs), its built-in kinds checked by
//! `kubernetes-validate --strict` for the Kubernetes version docs/kubernetes.md names, its CloudNativePG
//! and Prometheus Operator resources against their CRDs' `openAPIV3Schema` (`tests/fixtures/crds`) with
//! unknown fields rejected, and the manifests cross-checked against the node's code: probe paths, port,
//! environment names, pool arithmetic, drain and grace.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use fleet_app::config::Config;
use fleet_app::db::tls::SslMode;
use fleet_app::routes::routes;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_postgres::config::Host;

/// The Kubernetes version the manifests target (docs/kubernetes.md).
const KUBERNETES_VERSION: &str = "1.34";
const OVERLAYS: [&str; 2] = ["dev", "prod"];
/// API groups whose kinds come from the operators' CRDs, not from Kubernetes itself.
const CRD_GROUPS: [&str; 2] = ["postgresql.cnpg.io", "monitoring.coreos.com"];
/// PostgreSQL's default `superuser_reserved_connections`, part of `max_connections`.
const SUPERUSER_RESERVED: u64 = 3;

// ---- the tools: kustomize, kubernetes-validate, the CRD schemas ----

#[test]
fn every_overlay_builds_with_every_resource_the_fleet_needs() {
    for overlay in OVERLAYS {
        let kinds: BTreeSet<String> = build(overlay).iter().map(|r| str_at(r, "/kind").to_owned()).collect();
        for kind in [
            "Namespace",
            "ConfigMap",
            "Cluster",
            "Deployment",
            "Service",
            "Ingress",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "PodMonitor",
            "NetworkPolicy",
        ] {
            assert!(kinds.contains(kind), "overlay {overlay} has no {kind}: {kinds:?}");
        }
    }
}

#[test]
fn every_built_in_kind_passes_kubernetes_validate_strict() {
    let dir = tempfile::tempdir().unwrap();
    for overlay in OVERLAYS {
        let resources = build(overlay);
        let report = kubernetes_validate(dir.path(), &resources).expect("every built-in kind validates");
        for resource in resources.iter().filter(|r| !is_custom(r)) {
            let id = format!(
                "{}/{}",
                str_at(resource, "/kind").to_lowercase(),
                str_at(resource, "/metadata/name")
            );
            let passed = format!("passed for resource {id} against version {KUBERNETES_VERSION}");
            assert!(report.contains(&passed), "overlay {overlay}: {id} was not validated:\n{report}");
        }
        // Only the operators' kinds may lack a schema (the CRD test checks those).
        for line in report.lines().filter(|l| l.starts_with("WARN")) {
            assert!(CRD_GROUPS.iter().any(|g| line.contains(g)), "overlay {overlay}: {line}");
        }
    }

    // The check is strict: a misspelt probe field is refused, naming it.
    let mut broken = build("prod");
    let deployment = broken.iter_mut().find(|r| r["kind"] == "Deployment").unwrap();
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = json!(5);
    let report = kubernetes_validate(dir.path(), &broken).expect_err("a misspelt field fails");
    assert!(report.contains("ERROR") && report.contains("periodSecond"), "{report}");
}

#[test]
fn every_custom_resource_matches_its_crd_schema_with_unknown_fields_rejected() {
    let schemas = crd_schemas();
    for overlay in OVERLAYS {
        for resource in build(overlay).iter().filter(|r| is_custom(r)) {
            assert_eq!(crd_errors(&schemas, resource), Vec::<String>::new(), "overlay {overlay}");
        }
    }

    // Strict: a misspelt field anywhere (spec, deep inside, metadata) is refused, naming it.
    let prod = build("prod");
    let cluster = find(&prod, "Cluster", "pgfleet-db");
    let monitor = find(&prod, "PodMonitor", "fleet-app");
    for (resource, pointer, field) in [
        (cluster, "/spec", "instance"),
        (cluster, "/spec/postgresql/synchronous", "dataDurabilty"),
        (monitor, "/spec/podMetricsEndpoints/0", "prot"),
        (monitor, "/metadata", "label"),
    ] {
        let mut broken = resource.clone();
        broken.pointer_mut(pointer).unwrap()[field] = json!(1);
        let errors = crd_errors(&schemas, &broken);
        assert!(
            errors.iter().any(|e| e.starts_with(pointer) && e.contains(field)),
            "{pointer} {field}: {errors:?}"
        );
    }
    // And a wrong value: an unknown durability.
    let mut broken = cluster.clone();
    broken["spec"]["postgresql"]["synchronous"]["dataDurability"] = json!("sometimes");
    assert!(!crd_errors(&schemas, &broken).is_empty());
}

/// `kubectl kustomize deploy/k8s/overlays/<overlay>`, as resources.
fn build(overlay: &str) -> Vec<Value> {
    let dir = repo().join("deploy/k8s/overlays").join(overlay);
    let kubectl = repo().join("target/pytools/bin/kubectl");
    assert!(kubectl.is_file(), "{} is missing: install it with `scripts/python-tools`", kubectl.display());
    let output = Command::new(kubectl).arg("kustomize").arg(&dir).output().expect("kubectl runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kubectl kustomize {} failed: {stderr}", dir.display());
    let text = String::from_utf8(output.stdout).expect("UTF-8 manifests");
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("overlay {overlay}: {e}")))
        .collect()
}

/// Runs `kubernetes-validate --strict` on `resources`: its report, as `Err` when it exits non-zero.
fn kubernetes_validate(dir: &Path, resources: &[Value]) -> Result<String, String> {
    let bin = repo().join("target/pytools/bin/kubernetes-validate");
    assert!(bin.is_file(), "{} is missing: install it with `scripts/python-tools`", bin.display());
    let file = dir.join("resources.json");
    // JSON is YAML: one document per line.
    fs::write(&file, resources.iter().map(|r| format!("---\n{r}\n")).collect::<String>()).unwrap();
    let output = Command::new(bin)
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(&file)
        .output()
        .expect("kubernetes-validate runs");
    let report =
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        Ok(report)
    } else {
        Err(report)
    }
}

fn is_custom(resource: &Value) -> bool {
    CRD_GROUPS.iter().any(|group| str_at(resource, "/apiVersion").starts_with(&format!("{group}/")))
}

/// The schema of every `apiVersion`/`kind` the CRDs in `tests/fixtures/crds` define, made strict.
fn crd_schemas() -> BTreeMap<(String, String), jsonschema::Validator> {
    let dir = repo().join("tests/fixtures/crds");
    let mut schemas = BTreeMap::new();
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let crd: Value = serde_norway::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        for version in crd["spec"]["versions"].as_array().expect("CRD versions") {
            let mut schema = version["schema"]["openAPIV3Schema"].clone();
            strict(&mut schema);
            schema["properties"]["metadata"] = object_metadata();
            let validator = jsonschema::draft4::new(&schema)
                .unwrap_or_else(|e| panic!("{}: the schema compiles: {e}", path.display()));
            let api_version = format!("{}/{}", str_at(&crd, "/spec/group"), str_at(version, "/name"));
            schemas.insert((api_version, str_at(&crd, "/spec/names/kind").to_owned()), validator);
        }
    }
    for kind in [("postgresql.cnpg.io/v1", "Cluster"), ("monitoring.coreos.com/v1", "PodMonitor")] {
        let key = (kind.0.to_owned(), kind.1.to_owned());
        assert!(schemas.contains_key(&key), "{}: no {key:?} in {:?}", dir.display(), schemas.keys());
    }
    schemas
}

/// Every error of `resource` against its CRD's schema (`<path>: <error>`); panics when no CRD defines it.
fn crd_errors(schemas: &BTreeMap<(String, String), jsonschema::Validator>, resource: &Value) -> Vec<String> {
    let key = (str_at(resource, "/apiVersion").to_owned(), str_at(resource, "/kind").to_owned());
    let validator = schemas.get(&key).unwrap_or_else(|| panic!("no CRD schema for {key:?}"));
    validator.iter_errors(resource).map(|e| format!("{}: {e}", e.instance_path())).collect()
}

/// Makes a CRD schema reject unknown fields, as the API server's field validation does: every object
/// schema that lists `properties` and neither preserves unknown fields nor says otherwise gets
/// `additionalProperties: false`.
fn strict(schema: &mut Value) {
    let Some(map) = schema.as_object_mut() else { return };
    let open = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if map.contains_key("properties") && !open {
        map.entry("additionalProperties").or_insert(Value::Bool(false));
    }
    if let Some(Value::Object(properties)) = map.get_mut("properties") {
        properties.values_mut().for_each(strict);
    }
    for key in ["items", "additionalProperties", "not"] {
        map.get_mut(key).into_iter().for_each(strict);
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(schemas)) = map.get_mut(key) {
            schemas.iter_mut().for_each(strict);
        }
    }
}

/// The `metadata` a CRD schema leaves open: the fields these manifests may set, nothing else.
fn object_metadata() -> Value {
    let strings = json!({"type": "object", "additionalProperties": {"type": "string"}});
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "namespace": {"type": "string"},
            "labels": strings,
            "annotations": strings,
        },
    })
}

// ---- cross-checks against the node's code ----

#[test]
fn probes_port_and_scrape_path_are_the_nodes() {
    let served: BTreeSet<&str> = routes(false).filter(|r| r.method == "GET").map(|r| r.path).collect();
    for overlay in OVERLAYS {
        let resources = build(overlay);
        let container = node_container(&resources);
        for (probe, path) in [
            ("startupProbe", "/health/live"),
            ("livenessProbe", "/health/live"),
            ("readinessProbe", "/health/ready"),
        ] {
            assert_eq!(str_at(&container[probe], "/httpGet/path"), path, "{overlay}: {probe}");
            assert!(served.contains(path), "{path} is not a route: {served:?}");
            assert_eq!(str_at(&container[probe], "/httpGet/port"), "http", "{overlay}: {probe}");
        }
        let port = &container["ports"][0];
        assert_eq!(port["name"], "http");
        assert_eq!(port["containerPort"].to_string(), settings(&resources)["PORT"], "{overlay}: PORT");

        let service = find(&resources, "Service", "fleet-app");
        assert_eq!(str_at(service, "/spec/ports/0/targetPort"), "http");
        let monitor = find(&resources, "PodMonitor", "fleet-app");
        assert_eq!(str_at(monitor, "/spec/podMetricsEndpoints/0/port"), "http");
        let metrics = str_at(monitor, "/spec/podMetricsEndpoints/0/path");
        assert!(served.contains(metrics), "{metrics} is not a route");
        // The database's exporter, on CloudNativePG's port name, for this cluster's instances.
        let db_monitor = find(&resources, "PodMonitor", "pgfleet-db");
        assert_eq!(str_at(db_monitor, "/spec/selector/matchLabels/cnpg.io~1cluster"), "pgfleet-db");
        assert_eq!(str_at(db_monitor, "/spec/podMetricsEndpoints/0/port"), "metrics");
        for ingress in resources.iter().filter(|r| r["kind"] == "Ingress") {
            for path in ingress["spec"]["rules"][0]["http"]["paths"].as_array().unwrap() {
                assert_eq!(str_at(path, "/backend/service/name"), str_at(service, "/metadata/name"));
                assert_eq!(str_at(path, "/backend/service/port/name"), str_at(service, "/spec/ports/0/name"));
            }
        }
    }
}

#[test]
fn every_environment_name_the_nodes_get_is_a_setting_of_the_node() {
    let known = config_variables();
    assert!(known.contains("DATABASE_URL") && known.contains("POOL_SIZE"), "{known:?}");
    for overlay in OVERLAYS {
        let resources = build(overlay);
        let container = node_container(&resources);
        let settings = settings(&resources);
        for secret in ["DATABASE_URL", "DATABASE_READ_URL", "POSTGRES_PASSWORD"] {
            assert!(!settings.contains_key(secret), "{overlay}: {secret} is not for a ConfigMap");
        }
        let mut names: Vec<String> = settings.into_keys().collect();
        names.extend(container["env"].as_array().unwrap().iter().map(|e| str_at(e, "/name").to_owned()));
        for name in names {
            assert!(
                known.contains(&name),
                "overlay {overlay}: {name} is not in config.rs's table: {known:?}"
            );
        }
    }
}

#[test]
fn the_nodes_write_to_the_primary_and_read_from_the_replicas_of_the_app_database() {
    for overlay in OVERLAYS {
        let resources = build(overlay);
        let cluster = find(&resources, "Cluster", "pgfleet-db");
        let name = str_at(cluster, "/metadata/name");
        let database = str_at(cluster, "/spec/bootstrap/initdb/database");
        let owner = str_at(cluster, "/spec/bootstrap/initdb/owner");
        // The operator's secret `<cluster>-app`, as it fills it: the owner, its password, and a URI
        // naming the -rw Service (which the nodes do not use: it says nothing of TLS).
        let password = "Zq3x9K0aWb7RtY2m";
        let secret = BTreeMap::from([
            ("username", owner.to_owned()),
            ("password", password.to_owned()),
            ("uri", format!("postgresql://{owner}:{password}@{name}-rw.pgfleet:5432/{database}")),
        ]);
        let env = environment(&resources, &format!("{name}-app"), &secret);
        let config: Config =
            envy::from_iter(env).unwrap_or_else(|e| panic!("{overlay}: the node refuses its settings: {e}"));

        // Writes go to the primary, reads to the replicas' Service (any instance's with no replica),
        // both as the owner in its database, as the node itself parses the URLs, over TLS checked
        // against the operator's CA for the Service's name.
        let write = config.pg_config().unwrap();
        let read = config.pg_read_config().unwrap().expect("DATABASE_READ_URL is set");
        let instances = cluster["spec"]["instances"].as_u64().unwrap();
        let replicas = if instances > 1 { format!("{name}-ro") } else { format!("{name}-r") };
        let ca = operator_ca_file(&resources, name);
        for ((pg, tls), host) in [(&write, format!("{name}-rw")), (&read, replicas)] {
            assert_eq!(pg.get_hosts(), [Host::Tcp(host)], "{overlay}");
            assert_eq!(tls.mode, SslMode::VerifyFull, "{overlay}");
            assert_eq!(tls.root_cert.as_ref(), Some(&ca), "{overlay}");
            assert_eq!(pg.get_ports(), [5432]);
            assert_eq!(pg.get_dbname(), Some(database));
            assert_eq!(pg.get_user(), Some(owner));
            assert_eq!(pg.get_password(), Some(password.as_bytes()));
        }
        // The app's database and role, as locally: not a superuser, no superuser secret.
        assert_eq!(database, fleet_local::postgres::APP_DATABASE);
        assert_eq!(owner, fleet_local::postgres::APP_USER);
        assert_eq!(cluster["spec"]["enableSuperuserAccess"], false);
        assert_eq!(
            str_at(cluster, "/spec/postgresql/parameters/deadlock_timeout"),
            fleet_local::DEADLOCK_TIMEOUT
        );
    }
}

/// Where the node container finds the CA of cluster `cluster`'s server certificates: the operator's
/// secret `<cluster>-ca`, mounted read-only, its certificate only (never its key).
fn operator_ca_file(resources: &[Value], cluster: &str) -> PathBuf {
    let pod = &find(resources, "Deployment", "fleet-app")["spec"]["template"]["spec"];
    let volumes = pod["volumes"].as_array().expect("the pod has volumes");
    let volume = volumes
        .iter()
        .find(|v| v["secret"]["secretName"] == format!("{cluster}-ca"))
        .expect("the operator's CA is mounted");
    assert_eq!(
        volume["secret"]["items"],
        json!([{"key": "ca.crt", "path": "ca.crt"}]),
        "the CA's key stays out"
    );
    let mounts = node_container(resources)["volumeMounts"].as_array().unwrap();
    let mount = mounts.iter().find(|m| m["name"] == volume["name"]).expect("the CA's volume is mounted");
    assert_eq!(mount["readOnly"], true);
    Path::new(str_at(mount, "/mountPath")).join("ca.crt")
}

/// The node container's environment as the kubelet builds it: the ConfigMap's settings, then `env` in
/// order, secrets read from `secret` (the only one it may name), and each `$(NAME)` replaced by the
/// variable defined before it (the kubelet leaves any other reference as it is, which fails here).
fn environment(
    resources: &[Value],
    secret_name: &str,
    secret: &BTreeMap<&str, String>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = settings(resources).into_iter().collect();
    for entry in node_container(resources)["env"].as_array().unwrap() {
        let name = str_at(entry, "/name").to_owned();
        let value = if let Some(template) = entry["value"].as_str() {
            let mut parts = template.split("$(");
            let mut value = parts.next().unwrap().to_owned();
            for part in parts {
                let (reference, rest) = part.split_once(')').expect("$(NAME)");
                let defined = env.iter().find(|(n, _)| n == reference);
                value += &defined.unwrap_or_else(|| panic!("{name} uses {reference} before it is defined")).1;
                value += rest;
            }
            value
        } else if let Some(key) = entry["valueFrom"]["secretKeyRef"].as_object() {
            assert_eq!(key["name"], secret_name, "{name}");
            secret[key["key"].as_str().unwrap()].clone()
        } else {
            assert_eq!(str_at(entry, "/valueFrom/fieldRef/fieldPath"), "metadata.name", "{name}");
            "fleet-app-5d9c8b7f6d-x2k4z".to_owned()
        };
        env.push((name, value));
    }
    env
}

#[test]
fn the_most_nodes_the_autoscaler_starts_fit_the_databases_max_connections() {
    for overlay in OVERLAYS {
        let resources = build(overlay);
        let (needed, max_connections) = connections(&resources);
        assert!(
            needed <= max_connections,
            "overlay {overlay}: {needed} connections > max_connections {max_connections}"
        );
    }
    // The sum can fail: prod with 20 nodes does not fit.
    let mut prod = build("prod");
    prod.iter_mut().find(|r| r["kind"] == "HorizontalPodAutoscaler").unwrap()["spec"]["maxReplicas"] =
        json!(20);
    let (needed, max_connections) = connections(&prod);
    assert!(needed > max_connections, "{needed} ≤ {max_connections}");
}

/// What the fleet may open at its largest (`maxReplicas` × the connections of one node, plus the
/// headroom for admins and superusers), and the database's `max_connections`. A node opens
/// `POOL_SIZE` to the primary and `READ_POOL_SIZE` to a replica (all of them may land on one
/// instance, which may become the primary), and, with the lab on, `LAB_MAX_CONNECTIONS` of its own.
fn connections(resources: &[Value]) -> (u64, u64) {
    let settings = settings(resources);
    let number = |name: &str| -> u64 {
        settings.get(name).unwrap_or_else(|| panic!("the ConfigMap sets {name}")).parse().unwrap()
    };
    let pool = number("POOL_SIZE");
    let lab = match settings.get("LAB_ENDPOINTS").map(String::as_str) {
        Some("false") => 0,
        _ => settings.get("LAB_MAX_CONNECTIONS").map_or(pool - 1, |n| n.parse().unwrap()),
    };
    let per_node = pool + number("READ_POOL_SIZE") + lab;
    let hpa = resources.iter().find(|r| r["kind"] == "HorizontalPodAutoscaler").unwrap();
    let (min, max) =
        (hpa["spec"]["minReplicas"].as_u64().unwrap(), hpa["spec"]["maxReplicas"].as_u64().unwrap());
    assert!(min >= 1 && min <= max, "{min}..{max}");
    let headroom = u64::from(fleet_local::fleet::ADMIN_HEADROOM) + SUPERUSER_RESERVED;
    let max_connections =
        str_at(find(resources, "Cluster", "pgfleet-db"), "/spec/postgresql/parameters/max_connections");
    (max * per_node + headroom, max_connections.parse().unwrap())
}

#[test]
fn the_grace_period_outlasts_the_pre_stop_the_drain_and_the_last_requests() {
    let startup = read("crates/fleet-app/src/startup.rs");
    let shutdown_s = rust_const(&startup, "SHUTDOWN_TIMEOUT_S");
    let db_wait_s = rust_const(&startup, "STARTUP_DB_WAIT");
    for overlay in OVERLAYS {
        let resources = build(overlay);
        let pod = &find(&resources, "Deployment", "fleet-app")["spec"]["template"]["spec"];
        let container = node_container(&resources);
        let grace_ms = pod["terminationGracePeriodSeconds"].as_u64().unwrap() * 1000;
        let pre_stop_ms = container["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64().unwrap() * 1000;
        let drain_ms: u64 = settings(&resources)["SHUTDOWN_DRAIN_MS"].parse().unwrap();
        assert!(drain_ms > 0 && pre_stop_ms > 0, "{overlay}: a preStop sleep and a drain");
        let needed_ms = pre_stop_ms + drain_ms + shutdown_s * 1000;
        assert!(
            grace_ms > needed_ms,
            "{overlay}: grace {grace_ms} ms ≤ preStop + drain + {shutdown_s} s = {needed_ms} ms"
        );

        // The startup probe outlasts the node's wait for the database before it listens.
        let probe = &container["startupProbe"];
        let startup_s =
            probe["periodSeconds"].as_u64().unwrap() * probe["failureThreshold"].as_u64().unwrap();
        assert!(startup_s > db_wait_s, "{overlay}: startup probe {startup_s} s ≤ {db_wait_s} s");
    }
}

/// The value of `const NAME: … = <n>` (or `Duration::from_secs(<n>)`) in `source`.
fn rust_const(source: &str, name: &str) -> u64 {
    let line = source
        .lines()
        .find(|l| l.starts_with(&format!("const {name}:")))
        .unwrap_or_else(|| panic!("no {name}"));
    let digits: String = line.split('=').nth(1).unwrap().chars().filter(char::is_ascii_digit).collect();
    digits.parse().unwrap_or_else(|_| panic!("{line}"))
}

// ---- the shape: hardening, sizes, routes, policies ----

#[test]
fn the_nodes_run_unprivileged_on_a_read_only_root_with_requests_and_limits() {
    let dockerfile = read("deploy/Dockerfile");
    for overlay in OVERLAYS {
        let resources = build(overlay);
        let pod = &find(&resources, "Deployment", "fleet-app")["spec"]["template"]["spec"];
        let user =
            format!("USER {}:{}", pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]);
        assert!(dockerfile.contains(&user), "deploy/Dockerfile runs as {user}");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
        assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
        assert_eq!(pod["automountServiceAccountToken"], false);
        let container = node_container(&resources);
        let security = &container["securityContext"];
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
        for (kind, resource) in
            [("requests", "cpu"), ("requests", "memory"), ("limits", "cpu"), ("limits", "memory")]
        {
            assert!(container["resources"][kind][resource].is_string(), "{overlay}: {kind}.{resource}");
        }
        assert!(
            dockerfile.contains(&format!("-t {} .", str_at(container, "/image").split(':').next().unwrap()))
        );
    }
}

#[test]
fn dev_has_one_instance_and_two_nodes_prod_three_synchronous_instances_and_4_to_16_nodes() {
    for (overlay, instances, replicas) in [("dev", 1, (2, 2)), ("prod", 3, (4, 16))] {
        let resources = build(overlay);
        let cluster = find(&resources, "Cluster", "pgfleet-db");
        assert_eq!(cluster["spec"]["instances"], instances, "{overlay}");
        let synchronous = &cluster["spec"]["postgresql"]["synchronous"];
        if instances > 1 {
            assert_eq!(synchronous["dataDurability"], "required", "{overlay}");
            assert!(synchronous["number"].as_u64().unwrap() < instances, "{overlay}");
        } else {
            assert!(synchronous.is_null(), "{overlay}: no standby to wait for");
        }
        let hpa = find(&resources, "HorizontalPodAutoscaler", "fleet-app");
        assert_eq!(
            (hpa["spec"]["minReplicas"].clone(), hpa["spec"]["maxReplicas"].clone()),
            (json!(replicas.0), json!(replicas.1))
        );
        assert!(
            find(&resources, "Deployment", "fleet-app")["spec"]["replicas"].is_null(),
            "the HPA owns the count"
        );
    }
}

#[test]
fn the_ingress_carries_the_compose_nginx_limits() {
    let nginx = read("nginx/default.conf");
    for overlay in OVERLAYS {
        let resources = build(overlay);
        let body_limit: u64 = settings(&resources)["BODY_LIMIT_BYTES"].parse().unwrap();
        for ingress in resources.iter().filter(|r| r["kind"] == "Ingress") {
            let annotation = |name: &str| {
                str_at(ingress, &format!("/metadata/annotations/nginx.ingress.kubernetes.io~1{name}"))
                    .to_owned()
            };
            let body = annotation("proxy-body-size");
            assert_eq!(body.trim_end_matches('m').parse::<u64>().unwrap() << 20, body_limit, "{overlay}");
            assert!(nginx.contains(&format!("client_max_body_size {body};")));
            assert!(
                nginx.contains(&format!("proxy_connect_timeout {}s;", annotation("proxy-connect-timeout")))
            );
            assert!(nginx.contains(&format!("proxy_read_timeout {}s;", annotation("proxy-read-timeout"))));
            assert!(nginx.contains(&format!("proxy_next_upstream {};", annotation("proxy-next-upstream"))));
        }
        let main = find(&resources, "Ingress", "fleet-app");
        assert_eq!(main["spec"]["rules"][0]["http"]["paths"][0]["path"], "/");
        let lab_on = settings(&resources)["LAB_ENDPOINTS"] == "true";
        let lab =
            resources.iter().find(|r| r["kind"] == "Ingress" && r["metadata"]["name"] == "fleet-app-lab");
        assert_eq!(lab.is_some(), lab_on, "{overlay}: the lab's rate-limited routes exactly when it is on");
        if let Some(lab) = lab {
            let annotations = &lab["metadata"]["annotations"];
            let rps: u64 = str_at(annotations, "/nginx.ingress.kubernetes.io~1limit-rps").parse().unwrap();
            let burst: u64 =
                str_at(annotations, "/nginx.ingress.kubernetes.io~1limit-burst-multiplier").parse().unwrap();
            assert!(
                nginx.contains(&format!("rate={rps}r/s"))
                    && nginx.contains(&format!("burst={}", rps * burst))
            );
            let paths: BTreeSet<&str> = lab["spec"]["rules"][0]["http"]["paths"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| str_at(p, "/path"))
                .collect();
            let lab_routes: BTreeSet<&str> = routes(true).filter(|r| r.lab).map(|r| r.path).collect();
            assert_eq!(paths, lab_routes);
        }
    }
}

#[test]
fn only_the_nodes_reach_the_database_and_only_the_ingress_and_prometheus_reach_the_nodes() {
    for overlay in OVERLAYS {
        let resources = build(overlay);
        let node_labels =
            &find(&resources, "Deployment", "fleet-app")["spec"]["template"]["metadata"]["labels"];
        let nodes = find(&resources, "NetworkPolicy", "fleet-app");
        assert_eq!(&nodes["spec"]["podSelector"]["matchLabels"], node_labels);
        let from = peers(&nodes["spec"]["ingress"], None);
        let namespaces: BTreeSet<&str> = from
            .iter()
            .map(|p| str_at(p, "/namespaceSelector/matchLabels/kubernetes.io~1metadata.name"))
            .collect();
        assert_eq!(namespaces, BTreeSet::from(["ingress-nginx", "monitoring"]), "{overlay}");

        let db = find(&resources, "NetworkPolicy", "pgfleet-db");
        let instances = &db["spec"]["podSelector"]["matchLabels"];
        assert_eq!(instances["cnpg.io/cluster"], "pgfleet-db");
        let postgres = peers(&db["spec"]["ingress"], Some(5432));
        assert_eq!(
            postgres,
            vec![
                json!({"podSelector": {"matchLabels": node_labels}}),
                json!({"podSelector": {"matchLabels": instances}})
            ]
        );
        for policy in [nodes, db] {
            assert!(policy["spec"]["policyTypes"].as_array().unwrap().contains(&json!("Ingress")));
        }
    }
}

/// The `from` peers of every ingress rule (of those that open `port`, when given).
fn peers(rules: &Value, port: Option<u64>) -> Vec<Value> {
    rules
        .as_array()
        .unwrap()
        .iter()
        .filter(|rule| {
            port.is_none_or(|port| rule["ports"].as_array().unwrap().iter().any(|p| p["port"] == port))
        })
        .flat_map(|rule| rule["from"].as_array().unwrap().clone())
        .collect()
}

#[test]
fn the_kubernetes_page_names_the_kubernetes_version_the_manifests_are_validated_for() {
    let page = read("docs/kubernetes.md");
    assert!(
        page.contains(&format!("Kubernetes {KUBERNETES_VERSION}")),
        "docs/kubernetes.md names Kubernetes {KUBERNETES_VERSION}"
    );
}

// ---- helpers ----

/// Every environment variable in the `//!` table of crates/fleet-app/src/config.rs.
fn config_variables() -> BTreeSet<String> {
    let config = read("crates/fleet-app/src/config.rs");
    let mut names = BTreeSet::new();
    for row in config.lines().filter_map(|l| l.strip_prefix("//! | `")) {
        let first_cell = row.split(" | ").next().unwrap();
        for name in first_cell.split('`').filter(|n| {
            !n.is_empty() && n.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        }) {
            names.insert(name.to_owned());
        }
    }
    names
}

/// The nodes' ConfigMap.
fn settings(resources: &[Value]) -> BTreeMap<String, String> {
    let configmap = node_container(resources)["envFrom"][0]["configMapRef"]["name"].clone();
    let configmap =
        resources.iter().find(|r| r["kind"] == "ConfigMap" && r["metadata"]["name"] == configmap).unwrap();
    serde_json::from_value(configmap["data"].clone()).expect("string settings")
}

fn node_container(resources: &[Value]) -> &Value {
    &find(resources, "Deployment", "fleet-app")["spec"]["template"]["spec"]["containers"][0]
}

fn find<'a>(resources: &'a [Value], kind: &str, name: &str) -> &'a Value {
    resources
        .iter()
        .find(|r| r["kind"] == kind && r["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The string at `pointer` ("" when absent or not a string).
fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or_default()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the repository root").to_owned()
}

fn read(path: &str) -> String {
    fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
}
