//! The docs say what the code does, and keep saying it: every variable the node's config reads is in
//! `docs/configuration.md` with its real default (and nothing else is), every `fleetctl` subcommand and
//! option the docs use exists, every repository path they name is committed, every error code the node or
//! nginx can answer is in `docs/api.md`, and the README's results table holds `bench/latest`'s figures.
//! Plain files and the code's own tables: no server runs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;
use fleet_app::config::Config;
use fleet_app::errors::ApiError;
use serde::de::{self, Deserialize, Visitor};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The README, the contributor files and every page under `docs/`: (path, text).
fn pages() -> Vec<(String, String)> {
    let mut paths: Vec<String> = ["README.md", "CONTRIBUTING.md", "SECURITY.md"].map(String::from).to_vec();
    let mut docs: Vec<String> = std::fs::read_dir(repo().join("docs"))
        .expect("docs/")
        .map(|entry| entry.expect("a docs/ entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    docs.sort();
    paths.extend(docs);
    paths.into_iter().map(|path| (path.clone(), read(&path))).collect()
}

/// The rows of the first Markdown table in `text` whose header row starts with `header`, each as its
/// cells keyed by the header's names.
fn table(text: &str, header: &str) -> Vec<BTreeMap<String, String>> {
    let cells = |line: &str| -> Vec<String> {
        line.trim().trim_matches('|').split('|').map(|cell| cell.trim().to_owned()).collect()
    };
    let mut lines = text.lines().skip_while(|line| !line.starts_with(header));
    let names = cells(lines.next().unwrap_or_else(|| panic!("no table headed `{header}`")));
    lines
        .skip(1)
        .take_while(|line| line.starts_with('|'))
        .map(|line| names.iter().cloned().zip(cells(line)).collect())
        .collect()
}

/// The text of every backtick span in `cell`.
fn code_spans(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

// ---------------------------------------------------------------------------------------------------
// Configuration

/// What serde tells a deserializer about a struct: the names of its fields, renames applied. envy reads
/// each as the variable of the same name in upper case.
#[derive(Debug)]
enum Probe {
    Fields(&'static [&'static str]),
    Other(String),
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Fields(fields) => write!(f, "fields {fields:?}"),
            Probe::Other(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Probe {}

impl de::Error for Probe {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Probe::Other(msg.to_string())
    }
}

struct FieldNames;

impl<'de> de::Deserializer<'de> for FieldNames {
    type Error = Probe;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Probe> {
        Err(Probe::Other("not a struct".to_owned()))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Probe> {
        Err(Probe::Fields(fields))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

/// Every variable `Config` reads from the environment.
fn config_variables() -> BTreeSet<String> {
    match Config::deserialize(FieldNames) {
        Err(Probe::Fields(fields)) => fields.iter().map(|field| field.to_uppercase()).collect(),
        other => panic!("Config is not a struct of named fields: {other:?}"),
    }
}

/// Variables the node's libraries read, with the default the node gives each (`None`: unset), and the
/// code of `crates/fleet-app/src/telemetry.rs` that hands them to the library.
const LIBRARY_VARIABLES: &[(&str, Option<&str>, &str)] = &[
    (
        "RUST_LOG",
        Some("info"),
        r#"EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))"#,
    ),
    // tracing-subscriber's `fmt()` writes no colour codes while `NO_COLOR` is set.
    ("NO_COLOR", None, "tracing_subscriber::fmt()"),
];

/// The node's configuration read from exactly `vars`.
fn config(vars: &[(&str, &str)]) -> Config {
    let vars = vars.iter().map(|(name, value)| (name.to_string(), value.to_string()));
    envy::from_iter(vars).unwrap_or_else(|e| panic!("{e}"))
}

/// The value a setting whose default is another setting's takes, as the node resolves it.
fn resolved(config: &Config, name: &str) -> Option<u64> {
    match name {
        "READ_POOL_SIZE" => Some(config.read_pool_size() as u64),
        "STATEMENT_TIMEOUT_MS" => Some(config.statement_timeout_ms()),
        "LAB_MAX_CONNECTIONS" => Some(config.lab_max_connections() as u64),
        _ => None,
    }
}

/// `docs/configuration.md`'s table of the node's variables: name → (default cell, unit cell).
fn documented_variables() -> BTreeMap<String, (String, String)> {
    table(&read("docs/configuration.md"), "| variable | default | unit |")
        .into_iter()
        .map(|row| {
            let name = code_spans(&row["variable"]).first().map(|name| name.to_string());
            let name = name.unwrap_or_else(|| panic!("a row without a `VARIABLE`: {row:?}"));
            (name, (row["default"].clone(), row["unit"].clone()))
        })
        .collect()
}

#[test]
fn every_variable_the_node_reads_is_documented_and_nothing_else() {
    let mut read_by_node = config_variables();
    read_by_node.extend(LIBRARY_VARIABLES.iter().map(|(name, _, _)| name.to_string()));
    let documented: BTreeSet<String> = documented_variables().into_keys().collect();
    let missing: Vec<_> = read_by_node.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&read_by_node).collect();
    assert!(missing.is_empty(), "read by the node, missing from docs/configuration.md: {missing:?}");
    assert!(unknown.is_empty(), "in docs/configuration.md, read by no code: {unknown:?}");
}

#[test]
fn every_documented_default_and_unit_is_the_real_one() {
    let documented = documented_variables();
    let defaults = config(&[]);
    let base = format!("{defaults:?}");
    let telemetry = read("crates/fleet-app/src/telemetry.rs");
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("the hostname");
    // A literal default: the value documented for each variable, for the variables that refer to it.
    let literal = |name: &str| -> Option<String> {
        let (default, _) = documented.get(name)?;
        default.starts_with('`').then(|| code_spans(default)[0].to_owned())
    };
    for (name, (default, unit)) in &documented {
        let want_unit = [("_MS", "ms"), ("_S", "s"), ("_BYTES", "bytes")]
            .iter()
            .find(|(suffix, _)| name.ends_with(suffix))
            .map(|(_, unit)| *unit);
        if let Some(want) = want_unit {
            assert_eq!(unit, want, "{name}'s unit");
        }
        if let Some((_, library_default, line)) = LIBRARY_VARIABLES.iter().find(|(n, _, _)| n == name) {
            assert!(telemetry.contains(line), "telemetry.rs no longer has `{line}`");
            assert_eq!(literal(name).as_deref(), *library_default, "{name}'s default: {default}");
            continue;
        }
        let spans = code_spans(default);
        if default == "unset" {
            let field = format!("{}: None", name.to_lowercase());
            assert!(base.contains(&field), "{name} is documented unset, but is not `None`: {base}");
        } else if default == "the hostname" {
            assert_eq!(defaults.container_id, hostname.trim(), "{name}'s default");
        } else if let Some(other) = spans.first().filter(|span| documented.contains_key(**span)) {
            // Another variable's value, maybe less a constant: `POOL_SIZE` − 1.
            let value: u64 = literal(other).and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                panic!("{name}'s default refers to {other}, which has no numeric default")
            });
            let minus: u64 = default.rsplit_once('−').map_or(0, |(_, n)| n.trim().parse().expect("− n"));
            let real = resolved(&defaults, name)
                .unwrap_or_else(|| panic!("{name}: a default that refers to {other} is not resolved here"));
            assert_eq!(real, value - minus, "{name}'s default, documented as {default}");
        } else {
            let value =
                spans.first().unwrap_or_else(|| panic!("{name}'s default is not `a value`: {default}"));
            let set = format!("{:?}", config(&[(name, value)]));
            assert_eq!(set, base, "{name}={value} is not the default (documented as {default})");
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// fleetctl

/// Each command line the docs show, as its words: code blocks' lines and inline code spans that start
/// a command (`fleetctl …`, `target/release/fleetctl …`, `scripts/up …`, `just up …`, `just bench …`),
/// up to a comment, a pipe or the next command.
fn fleetctl_lines(text: &str) -> Vec<Vec<String>> {
    let mut segments = Vec::new();
    let mut in_block = false;
    // Prose between code blocks, whose spans may wrap across lines.
    let mut prose = String::new();
    for line in text.lines().chain(["```"]) {
        if line.trim_start().starts_with("```") {
            segments.extend(code_spans(&prose).into_iter().map(str::to_owned));
            prose.clear();
            in_block = !in_block;
        } else if in_block {
            segments.push(line.to_owned());
        } else {
            prose.push_str(line);
            prose.push('\n');
        }
    }
    let mut commands = Vec::new();
    for segment in segments {
        let words: Vec<&str> = segment.split_whitespace().collect();
        for (i, word) in words.iter().enumerate() {
            let start = match (*word, words.get(i + 1)) {
                (w, _) if w == "fleetctl" || w.ends_with("/fleetctl") => Vec::new(),
                ("scripts/up", _) | ("just", Some(&"up")) => vec!["up".to_owned()],
                ("just", Some(&"bench")) => vec!["bench".to_owned()],
                _ => continue,
            };
            let skip = if *word == "just" { 2 } else { 1 };
            let rest = words[i + skip..]
                .iter()
                .take_while(|w| !w.starts_with('#') && !["|", ";", "&&", "||", ">"].contains(w))
                .take_while(|w| !w.ends_with("fleetctl") && **w != "scripts/up")
                .map(|w| w.trim_matches(['[', ']', '(', ')', ',', '`']).to_owned());
            commands.push(start.into_iter().chain(rest).collect());
        }
    }
    commands
}

/// What is wrong with `words` as a `fleetctl` command line: subcommands that do not exist, options that
/// none of the commands named has.
fn check_command(root: &clap::Command, words: &[String]) -> Vec<String> {
    let mut path = vec![root];
    let mut problems = Vec::new();
    for word in words {
        let current = *path.last().expect("the root");
        if let Some(long) = word.strip_prefix("--") {
            let long = long.split('=').next().expect("a name");
            let known = path.iter().any(|cmd| cmd.get_arguments().any(|arg| arg.get_long() == Some(long)));
            if !known && !long.is_empty() {
                problems.push(format!("`--{long}` is no option of `{}`", current.get_name()));
            }
        } else if let Some(sub) = current.find_subcommand(word) {
            path.push(sub);
        } else if path.len() == 1 && !word.starts_with(['<', '-', '…', '$']) && !word.is_empty() {
            problems.push(format!("`{word}` is no subcommand of fleetctl"));
            break;
        }
    }
    problems
}

#[test]
fn every_fleetctl_subcommand_and_option_in_the_docs_exists() {
    let mut root = fleetctl::Cli::command();
    root.build();
    let mut problems = Vec::new();
    let mut seen = 0;
    for (path, text) in pages() {
        for words in fleetctl_lines(&text) {
            seen += 1;
            for problem in check_command(&root, &words) {
                problems.push(format!("{path}: `fleetctl {}`: {problem}", words.join(" ")));
            }
        }
    }
    assert!(seen > 20, "only {seen} fleetctl command lines found: is the parser still finding them?");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------------
// Paths

/// Every committed file, by its path from the repository's root.
fn committed_files() -> BTreeSet<String> {
    let out = Command::new("git").args(["ls-files"]).current_dir(repo()).output().expect("git ls-files");
    assert!(out.status.success(), "git ls-files: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8 paths").lines().map(str::to_owned).collect()
}

/// `path` without `./`, `a/../` and a trailing `/`.
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    parts.join("/")
}

/// The repository paths a page names: words that start with a committed top-level directory
/// (`scripts/up`, `crates/…`), and the targets of its relative links.
fn named_paths(page: &str, text: &str, top: &BTreeSet<String>) -> BTreeSet<String> {
    let dir = Path::new(page).parent().and_then(Path::to_str).unwrap_or("");
    let mut paths = BTreeSet::new();
    for (_, target) in text.match_indices("](").map(|(i, _)| ((), &text[i + 2..])) {
        let target = target.split([')', ' ']).next().unwrap_or("");
        let target = target.split('#').next().unwrap_or("");
        if !target.is_empty() && !target.contains("://") && !target.starts_with("mailto:") {
            paths.insert(normalize(&format!("{dir}/{target}")));
        }
    }
    let separators =
        |c: char| c.is_whitespace() || matches!(c, '`' | '(' | ')' | '[' | ']' | '"' | '\'' | '=');
    for word in text.split(separators) {
        let word = word.split('#').next().unwrap_or("");
        let word = word.trim_end_matches(['.', ',', ';', ':', '\'', '’']);
        let word = word.strip_suffix("'s").unwrap_or(word);
        let first = word.split('/').next().unwrap_or("");
        if word.contains('/')
            && top.contains(first)
            && !word.contains(['*', '…', '<', '{', '$'])
            && !word.contains("/-")
        {
            paths.insert(normalize(word));
        }
    }
    paths
}

#[test]
fn every_path_the_docs_name_is_committed() {
    let files = committed_files();
    let dirs: BTreeSet<String> = files
        .iter()
        .flat_map(|file| file.match_indices('/').map(|(i, _)| file[..i].to_owned()).collect::<Vec<_>>())
        .collect();
    let top: BTreeSet<String> = dirs.iter().filter(|dir| !dir.contains('/')).cloned().collect();
    let mut missing = Vec::new();
    let mut seen = 0;
    for (page, text) in pages() {
        for path in named_paths(&page, &text, &top) {
            seen += 1;
            if !files.contains(&path) && !dirs.contains(&path) {
                missing.push(format!("{page}: `{path}`"));
            }
        }
    }
    assert!(seen > 50, "only {seen} paths found: is the parser still finding them?");
    assert!(missing.is_empty(), "named in the docs, not in the repository:\n{}", missing.join("\n"));
}

// ---------------------------------------------------------------------------------------------------
// Error codes

/// One of each error the node answers with. The `match` has no wildcard: a new variant does not compile
/// until it is listed here, and so documented.
fn every_api_error() -> Vec<ApiError> {
    let errors = vec![
        ApiError::InvalidJson(String::new()),
        ApiError::InvalidRequest(String::new()),
        ApiError::InvalidToken(String::new()),
        ApiError::FutureToken,
        ApiError::NotFound(String::new()),
        ApiError::MethodNotAllowed,
        ApiError::BodyTimeout { ms: 0 },
        ApiError::PayloadTooLarge(String::new()),
        ApiError::OutOfRange(String::new()),
        ApiError::PoolTimeout,
        ApiError::DatabaseUnavailable,
        ApiError::CommitUnknown,
        ApiError::IdempotencyKeyInUse,
        ApiError::IdempotencyKeyReused,
        ApiError::StatementTimeout,
        ApiError::LabBusy(String::new()),
        ApiError::DeadlineExceeded,
        ApiError::BodyBudgetBusy,
        ApiError::Draining,
        ApiError::Internal,
    ];
    for error in &errors {
        match error {
            ApiError::InvalidJson(_)
            | ApiError::InvalidRequest(_)
            | ApiError::InvalidToken(_)
            | ApiError::FutureToken
            | ApiError::NotFound(_)
            | ApiError::MethodNotAllowed
            | ApiError::BodyTimeout { .. }
            | ApiError::PayloadTooLarge(_)
            | ApiError::Conflict { .. }
            | ApiError::OutOfRange(_)
            | ApiError::PoolTimeout
            | ApiError::DatabaseUnavailable
            | ApiError::CommitUnknown
            | ApiError::IdempotencyKeyInUse
            | ApiError::IdempotencyKeyReused
            | ApiError::StatementTimeout
            | ApiError::LabBusy(_)
            | ApiError::DeadlineExceeded
            | ApiError::BodyBudgetBusy
            | ApiError::Draining
            | ApiError::Internal => {}
        }
    }
    errors
}

/// The SQLSTATEs `errors.rs` names (a `Conflict` carries the one the database gave: 40P01, 40001, 23505).
fn sqlstates() -> BTreeSet<String> {
    read("crates/fleet-app/src/errors.rs")
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()))
        .filter(|s| s.bytes().any(|b| b.is_ascii_digit()))
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_error_code_the_node_or_nginx_answers_is_in_the_api_docs() {
    let api = read("docs/api.md");
    let mut codes: BTreeSet<String> = every_api_error().iter().map(|e| e.code().to_owned()).collect();
    codes.extend(sqlstates());
    codes.extend(fleet_local::nginx::NGINX_ERRORS.iter().map(|(_, code, _)| code.to_string()));
    assert!(codes.contains("40P01") && codes.contains("uri_too_long"), "{codes:?}");
    let missing: Vec<_> = codes.iter().filter(|code| !api.contains(&format!("`{code}`"))).collect();
    assert!(missing.is_empty(), "error codes missing from docs/api.md: {missing:?}");
}

// ---------------------------------------------------------------------------------------------------
// The README's results

/// The first number in `cell` as written (commas removed), with how many decimals it shows.
fn number(cell: &str) -> Option<(String, usize)> {
    let start = cell.find(|c: char| c.is_ascii_digit())?;
    let written: String = cell[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',' || *c == '.')
        .filter(|c| *c != ',')
        .collect();
    let written = written.trim_end_matches('.').to_owned();
    let decimals = written.split_once('.').map_or(0, |(_, d)| d.len());
    Some((written, decimals))
}

/// Whether `cell`'s number is `value` rounded as the cell rounds it.
fn shows(cell: &str, value: f64) -> bool {
    number(cell).is_some_and(|(written, decimals)| format!("{value:.decimals$}") == written)
}

#[test]
fn the_readmes_results_table_holds_the_figures_of_bench_latest() {
    let results: Value = serde_json::from_str(&read("bench/latest/results.json")).expect("results.json");
    let rows = table(&read("README.md"), "| workload | throughput |");
    assert!(rows.len() >= 4, "the README's results table has {} rows", rows.len());
    for row in rows {
        let workload = code_spans(&row["workload"]).first().copied().expect("a row names its `workload`");
        let point = results["points"]
            .as_array()
            .expect("points")
            .iter()
            .find(|p| p["workload"] == workload && p["role"] == "main")
            .unwrap_or_else(|| panic!("bench/latest has no main point of `{workload}`"));
        let throughput = &row["throughput"];
        let rate = match throughput.ends_with("rows/s") {
            true => point["rows_per_s"].as_f64(),
            false => point["requests_per_s"].as_f64(),
        };
        let rate = rate.expect("a throughput");
        assert!(shows(throughput, rate), "{workload}: throughput {throughput}, bench/latest {rate}");
        for percentile in ["p50", "p99"] {
            let value = point["latency_ms"][percentile].as_f64().expect("a latency");
            let cell = &row[percentile];
            assert!(shows(cell, value), "{workload}: {percentile} {cell}, bench/latest {value} ms");
        }
        let ceiling_name = if workload == "bulk" { "copy" } else { workload };
        let ceiling = &results["ceilings"][ceiling_name];
        let (cell, ratio) = (&row["database alone"], &row["ratio"]);
        if ceiling.is_null() {
            assert!(
                !cell.contains(char::is_numeric),
                "{workload}: bench/latest has no ceiling, README {cell}"
            );
            continue;
        }
        let ceiling = ceiling["tps"].as_f64().or(ceiling["rows_per_s"].as_f64()).expect("a ceiling");
        assert!(shows(cell, ceiling), "{workload}: ceiling {cell}, bench/latest {ceiling}");
        assert!(shows(ratio, rate / ceiling), "{workload}: ratio {ratio}, bench/latest {}", rate / ceiling);
    }
}

#[test]
fn the_readme_is_short() {
    let readme = read("README.md");
    assert!(readme.lines().count() <= 150, "README.md has {} lines", readme.lines().count());
    let long: Vec<_> = readme.lines().filter(|line| line.chars().count() > 110).collect();
    assert!(long.is_empty(), "README.md lines over 110 characters: {long:#?}");
}
