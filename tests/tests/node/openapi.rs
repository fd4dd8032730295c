//! The API's contract, `crates/fleet-app/openapi.json` (served at `GET /openapi.json`, copied to
//! `docs/openapi.json`): a valid OpenAPI 3.1 document, describing exactly the node's route table, and
//! checked against a live node by Schemathesis with every check it has. Refused requests change no data.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleet_app::routes::{routes, IDEMPOTENCY_KEY, OPENAPI};
use fleet_tests::TestApp;
use serde_json::{json, Value};

/// A run that takes longer than this has hung; it is killed and the test fails.
const RUN_DEADLINE: Duration = Duration::from_secs(600);
/// Every check `schemathesis run --checks` names except `max_response_time`, a speed threshold, which
/// has no place in this suite (`--checks all` would include it, with a 10 s limit).
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
    response_headers_conformance,response_schema_conformance,negative_data_rejection,\
    positive_data_acceptance,missing_required_header,unsupported_method,allow_header_conformance,\
    use_after_free,ensure_resource_availability,ignored_auth,object_level_authorization";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

fn document() -> Value {
    serde_json::from_str(OPENAPI).expect("openapi.json is JSON")
}

fn fixture(name: &str) -> Value {
    let path = repo().join("tests/fixtures").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("a JSON fixture")
}

#[test]
fn the_committed_copy_is_the_served_document() {
    let copy = std::fs::read_to_string(repo().join("docs/openapi.json")).expect("docs/openapi.json");
    assert!(
        copy == OPENAPI,
        "docs/openapi.json differs from crates/fleet-app/openapi.json (the source): copy it over"
    );
}

/// Every (method, path) the document describes; `lab` only those marked `x-lab-endpoint` when false.
fn documented(doc: &Value, lab: bool) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            let item = item.as_object().expect("a path item");
            item.iter().map(move |(method, op)| (method, op, path))
        })
        .filter(|(_, op, _)| lab || op["x-lab-endpoint"] != json!(true))
        .map(|(method, _, path)| (method.to_uppercase(), path.clone()))
        .collect()
}

fn served(lab: bool) -> BTreeSet<(String, String)> {
    routes(lab).map(|e| (e.method.to_string(), e.path.to_owned())).collect()
}

#[test]
fn the_document_describes_exactly_the_route_table() {
    let doc = document();
    for lab in [true, false] {
        assert_eq!(
            documented(&doc, lab),
            served(lab),
            "documented vs served routes with LAB_ENDPOINTS={lab}"
        );
    }
    assert!(served(false).contains(&("GET".to_owned(), "/openapi.json".to_owned())));
    assert!(served(true).len() > served(false).len(), "the lab endpoints are in the table");
}

#[test]
fn the_document_is_valid_openapi_3_1() {
    let validator = jsonschema::validator_for(&fixture("openapi-3.1-schema.json"))
        .expect("the OpenAPI 3.1 meta-schema compiles");
    let errors = |doc: &Value| -> Vec<String> {
        validator.iter_errors(doc).map(|e| format!("{}: {e}", e.instance_path())).collect()
    };
    let doc = document();
    assert_eq!(errors(&doc), Vec::<String>::new());
    // The meta-schema is enforced: a misspelt field and a status that is not one are refused.
    let mut broken = doc.clone();
    broken["paths"]["/health"]["get"]["responses"]["2OO"] = json!({"description": "typo"});
    broken["info"]["titel"] = json!("typo");
    assert_eq!(errors(&broken).len(), 2, "{:?}", errors(&broken));

    // Every Schema Object is a valid JSON Schema (draft 2020-12, OpenAPI 3.1's dialect)...
    let mut schemas = Vec::new();
    collect_schemas(&doc, &mut schemas);
    assert!(schemas.len() > 20, "found the schemas: {}", schemas.len());
    for schema in &schemas {
        let result = jsonschema::draft202012::meta::validate(schema);
        assert!(result.is_ok(), "{schema}: {result:?}");
    }
    assert!(!jsonschema::draft202012::meta::is_valid(&json!({"type": "integr"})));
    // ...and every `$ref` points at something in the document.
    let mut refs = BTreeSet::new();
    collect_refs(&doc, &mut refs);
    let dangling: Vec<&String> =
        refs.iter().filter(|r| r.strip_prefix('#').and_then(|p| doc.pointer(p)).is_none()).collect();
    assert!(dangling.is_empty(), "dangling $refs: {dangling:?}");
    assert!(refs.len() > 20, "found the references: {}", refs.len());
}

/// The value of every `schema` field, and of every entry of `components.schemas`.
fn collect_schemas<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                if key == "schema" {
                    out.push(inner);
                }
                collect_schemas(inner, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|inner| collect_schemas(inner, out)),
        _ => {}
    }
    if let Some(components) = value.pointer("/components/schemas").and_then(Value::as_object) {
        out.extend(components.values());
    }
}

fn collect_refs(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(target)) = map.get("$ref") {
                out.insert(target.clone());
            }
            map.values().for_each(|inner| collect_refs(inner, out));
        }
        Value::Array(items) => items.iter().for_each(|inner| collect_refs(inner, out)),
        _ => {}
    }
}

/// The venv `scripts/python-tools` installs Schemathesis into.
fn schemathesis_bin() -> PathBuf {
    let bin = repo().join("target/pytools/bin/schemathesis");
    assert!(
        bin.is_file(),
        "{} is missing: install it with `scripts/python-tools` (a venv with the pinned Schemathesis)",
        bin.display()
    );
    bin
}

/// What the tables hold, read as the superuser.
#[derive(Debug, PartialEq, Eq)]
struct Tables {
    /// Every counter and its value.
    counters: BTreeMap<String, i64>,
    data_rows: i64,
    idempotency_keys: i64,
}

impl Tables {
    fn read(app: &TestApp) -> Tables {
        let counters = app.sql("SELECT coalesce(json_object_agg(key, value), '{}') FROM counters");
        let counters: BTreeMap<String, i64> = serde_json::from_str(&counters).expect("counters as JSON");
        Tables {
            counters,
            data_rows: app.sql_i64("SELECT count(*) FROM data"),
            idempotency_keys: app.sql_i64("SELECT count(*) FROM idempotency_keys"),
        }
    }
}

/// Runs Schemathesis against `app`'s `/openapi.json` with `extra` options (and the settings of
/// `tests/schemathesis.toml`, the hooks of `tests/schemathesis_hooks.py`); fails the test (with its
/// report) unless every check passed. Returns the HTTP archive of every request it sent.
fn schemathesis(app: &TestApp, dir: &Path, name: &str, extra: &[&str]) -> Value {
    let har = dir.join(format!("{name}.har"));
    let log = dir.join(format!("{name}.log"));
    let mut child = Command::new(schemathesis_bin())
        .arg("--config-file")
        .arg(repo().join("tests/schemathesis.toml"))
        .arg("run")
        .arg(format!("{}/openapi.json", app.api.url))
        .args(["--checks", CHECKS, "--no-color"])
        .args(["--report", "har", "--report-har-path"])
        .arg(&har)
        .args(extra)
        .env("SCHEMATHESIS_HOOKS", repo().join("tests/schemathesis_hooks.py"))
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).expect("create the log"))
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start schemathesis");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for schemathesis") {
            break Some(status);
        }
        if start.elapsed() > RUN_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!("schemathesis {name}: {:?} in {:.0?}", status, start.elapsed());
    match status {
        Some(status) if status.success() => {}
        Some(status) => panic!("schemathesis {name} failed ({status}):\n{log}"),
        None => panic!("schemathesis {name} did not end within {RUN_DEADLINE:?}:\n{log}"),
    }
    let summary = log.find("SUMMARY").map_or(log.as_str(), |at| &log[at..]);
    eprintln!("{summary}");
    assert!(log.contains("Test cases:"), "schemathesis {name} ran:\n{log}");
    let har = std::fs::read_to_string(&har).expect("the HAR report");
    serde_json::from_str(&har).expect("the HAR report is JSON")
}

/// One exchange of a HAR report, as far as the accounting needs it.
#[derive(Debug)]
struct Exchange {
    method: String,
    path: String,
    status: u64,
    /// The request's `Content-Type`, `""` when none.
    content_type: String,
    keyed: bool,
    replayed: bool,
    body: Value,
}

fn read_har(har: &Value) -> Vec<Exchange> {
    let header = |headers: &Value, name: &str| {
        let mut all = headers.as_array().into_iter().flatten();
        let found = all.find(|h| h["name"].as_str().is_some_and(|n| n.eq_ignore_ascii_case(name)))?;
        Some(found["value"].as_str().unwrap_or_default().to_owned())
    };
    let entries = har["log"]["entries"].as_array().expect("HAR entries");
    entries
        .iter()
        .map(|entry| {
            let (request, response) = (&entry["request"], &entry["response"]);
            let url = request["url"].as_str().expect("a request URL");
            let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
            let path = after_scheme.find('/').map_or("/", |i| &after_scheme[i..]);
            Exchange {
                method: request["method"].as_str().unwrap_or_default().to_owned(),
                path: path.split('?').next().unwrap_or_default().to_owned(),
                status: response["status"].as_u64().unwrap_or_default(),
                content_type: header(&request["headers"], "Content-Type").unwrap_or_default(),
                keyed: header(&request["headers"], IDEMPOTENCY_KEY).is_some(),
                replayed: header(&response["headers"], "Idempotent-Replayed").is_some(),
                body: response["content"]["text"]
                    .as_str()
                    .and_then(|t| serde_json::from_str(t).ok())
                    .unwrap_or_default(),
            }
        })
        .collect()
}

/// What the fresh tables must hold if only the writes answered 2xx (and not replayed) changed them:
/// the counters those answers name, their values summing to the number of increments (transfers keep
/// the sum), the bulk inserts' rows, and one stored response per such write with an `Idempotency-Key`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Expected {
    counter_keys: BTreeSet<String>,
    /// In i128: transfers of up to i64::MAX take single counters to either end of i64.
    counter_sum: i128,
    data_rows: i64,
    idempotency_keys: i64,
}

fn expected_from(exchanges: &[Exchange]) -> Expected {
    let mut expected = Expected::default();
    let fresh_writes = exchanges.iter().filter(|e| {
        e.method == "POST" && (200..300).contains(&e.status) && !e.replayed && e.path != "/api/hold"
    });
    for exchange in fresh_writes {
        let key = |pointer: &str| exchange.body.pointer(pointer).and_then(Value::as_str).map(str::to_owned);
        match exchange.path.as_str() {
            "/api/increment" => {
                expected.counter_keys.extend(key("/key"));
                expected.counter_sum += 1;
            }
            "/api/transfer" => {
                expected.counter_keys.extend(key("/from/key").into_iter().chain(key("/to/key")))
            }
            "/api/bulk-insert" => expected.data_rows += exchange.body["count"].as_i64().expect("count"),
            _ => continue,
        }
        expected.idempotency_keys += i64::from(exchange.keyed);
    }
    expected
}

fn actual(tables: &Tables) -> Expected {
    Expected {
        counter_keys: tables.counters.keys().cloned().collect(),
        counter_sum: tables.counters.values().map(|&v| i128::from(v)).sum(),
        data_rows: tables.data_rows,
        idempotency_keys: tables.idempotency_keys,
    }
}

#[test]
fn schemathesis_finds_no_fault_and_refused_requests_change_no_data() {
    let bin = schemathesis_bin();
    // Room in the lab's share for Schemathesis's 4 workers at once (an isolation run alone takes 4
    // connections): 429 `lab_busy` is tested under load in limits.rs; here every lab call should run.
    let mut app = TestApp::spawn(&[("LAB_MAX_CONNECTIONS", "20")]);
    let dir = tempfile::tempdir().expect("a temp dir");
    let version = Command::new(&bin).arg("--version").output().expect("schemathesis --version");
    eprintln!("{}", String::from_utf8_lossy(&version.stdout).trim());

    let served = tokio::runtime::Runtime::new().unwrap().block_on(app.api.get("/openapi.json"));
    assert_eq!((served.status.as_u16(), &served.body), (200, &document()), "the node serves the document");

    // Every phase, valid and invalid data: nothing but what the 2xx writes did is in the tables.
    let har = schemathesis(&app, dir.path(), "all", &[]);
    let exchanges = read_har(&har);
    let mut statuses = BTreeMap::<u64, u32>::new();
    exchanges.iter().for_each(|e| *statuses.entry(e.status).or_default() += 1);
    eprintln!("{} requests; statuses: {statuses:?}", exchanges.len());
    for status in [200, 400, 405] {
        assert!(statuses.contains_key(&status), "Schemathesis reached {status}: {statuses:?}");
    }
    let writes = |path: &str| exchanges.iter().filter(|e| e.path == path && e.status == 200).count();
    for path in ["/api/increment", "/api/transfer", "/api/bulk-insert", "/api/hold", "/api/test-isolation"] {
        assert!(writes(path) > 0, "Schemathesis got a 200 from {path}");
    }
    let tables = Tables::read(&app);
    assert_eq!(actual(&tables), expected_from(&exchanges), "the tables hold exactly what the 2xx writes did");
    assert!(!tables.counters.is_empty() && tables.data_rows > 0, "the run wrote: {tables:?}");

    // Invalid data only: every write is refused, and the tables stay as they were. Schemathesis also sends
    // valid bodies under undocumented media types (`application/xml` …), which the node reads as JSON,
    // as the document says: those are the only writes it may accept.
    let negative = ["--mode", "negative", "--include-method", "POST", "--phases", "coverage,fuzzing"];
    let har = schemathesis(&app, dir.path(), "negative", &negative);
    let negative = read_har(&har);
    let documented_type = |e: &Exchange| {
        let media = e.content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        media == "application/json" || media == "text/plain"
    };
    let accepted: Vec<&Exchange> = negative
        .iter()
        .filter(|e| e.method == "POST" && (200..300).contains(&e.status) && documented_type(e))
        .collect();
    eprintln!("{} requests of invalid data, {} accepted", negative.len(), accepted.len());
    assert!(negative.len() > 100, "the negative run sent requests: {}", negative.len());
    // The isolation lab's body is optional, so a request without one is valid even here.
    let writes: Vec<&&Exchange> = accepted.iter().filter(|e| e.path != "/api/test-isolation").collect();
    assert!(writes.is_empty(), "invalid writes were accepted: {writes:#?}");
    let both: Vec<Exchange> = exchanges.into_iter().chain(negative).collect();
    assert_eq!(
        actual(&Tables::read(&app)),
        expected_from(&both),
        "only the accepted writes changed the tables"
    );
    assert!(app.node.child().is_running(), "the node survived");
}
