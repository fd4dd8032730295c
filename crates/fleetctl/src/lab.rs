//! `fleetctl lab isolation`: runs the isolation lab (`POST /api/test-isolation`, all four levels) on a
//! fleet or one node and prints what PostgreSQL did: phenomena × levels, then the scenarios, each cell
//! `possible` or `prevented (how)`.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

/// A run takes about a second; a loaded fleet queues calls per node (at most 10 s) before running them.
const TIMEOUT: Duration = Duration::from_secs(60);

/// The response's phenomena, in print order, with their labels.
const PHENOMENA: [(&str, &str); 5] = [
    ("dirtyRead", "dirty read"),
    ("nonRepeatableRead", "non-repeatable read"),
    ("phantomRead", "phantom read"),
    ("lostUpdate", "lost update"),
    ("writeSkew", "write skew"),
];

const LEGEND: &str = "lock: waited for the other transaction's row lock · 40001: aborted with a \
                      serialization failure · snapshot: its reads never showed the anomaly";

/// Runs the lab against `url` (nginx or a node, e.g. `http://127.0.0.1:8080`) and prints the matrix.
pub fn print_isolation(url: &str) -> anyhow::Result<()> {
    let body = run_lab(url)?;
    print!("{}", render(&body)?);
    Ok(())
}

fn run_lab(url: &str) -> anyhow::Result<Value> {
    let endpoint = format!("{}/api/test-isolation", url.trim_end_matches('/'));
    let agent = ureq::AgentBuilder::new().timeout(TIMEOUT).build();
    let request = agent.post(&endpoint).set("Content-Type", "application/json");
    let (status, text) = match request.send_string("{}") {
        Ok(response) => (response.status(), response.into_string()?),
        Err(ureq::Error::Status(status, response)) => (status, response.into_string()?),
        Err(e) => return Err(e).with_context(|| format!("cannot reach {endpoint}")),
    };
    let body: Value = serde_json::from_str(&text)
        .with_context(|| format!("{endpoint} answered {status} with something other than JSON"))?;
    if status != 200 {
        let error = body["error"].as_str().unwrap_or("no message");
        bail!("{endpoint} answered {status}: {error} ({})", body["code"].as_str().unwrap_or("no code"));
    }
    Ok(body)
}

/// The report as text: the phenomena table, the scenario table, and what the cells mean.
fn render(body: &Value) -> anyhow::Result<String> {
    let Some(levels) = body["levels"].as_array().filter(|levels| !levels.is_empty()) else {
        bail!("the answer holds no levels: {body}");
    };
    let header: Vec<String> = levels.iter().map(|level| text(&level["level"]).to_owned()).collect();

    let phenomena: Vec<(String, Vec<String>)> = PHENOMENA
        .iter()
        .map(|(key, label)| {
            let cells = levels.iter().map(|level| {
                let phenomenon =
                    level["phenomena"].as_array().and_then(|all| all.iter().find(|p| p["name"] == *key));
                phenomenon.map_or_else(|| text(&level[key]).to_owned(), cell)
            });
            (label.to_string(), cells.collect())
        })
        .collect();

    let first = levels[0]["scenarios"].as_array().map(Vec::as_slice).unwrap_or_default();
    let scenarios: Vec<(String, Vec<String>)> = first
        .iter()
        .map(|scenario| {
            let name = text(&scenario["name"]);
            let cells = levels.iter().map(|level| {
                let all = level["scenarios"].as_array().map(Vec::as_slice).unwrap_or_default();
                all.iter().find(|s| text(&s["name"]) == name).map_or_else(|| "-".to_owned(), cell)
            });
            (format!("{name} {}", text(&scenario["phenomenon"])), cells.collect())
        })
        .collect();

    let mut out = String::new();
    let duration = body["duration"].as_f64().map_or_else(|| "?".to_owned(), |ms| format!("{ms:.0} ms"));
    writeln!(
        out,
        "isolation lab on {} ({duration}): what PostgreSQL did at each level\n",
        text(&body["container"])
    )?;
    table(&mut out, "phenomenon", &header, &phenomena)?;
    writeln!(out)?;
    table(&mut out, "scenario", &header, &scenarios)?;
    writeln!(out)?;
    for level in levels.iter().filter(|level| level["effectiveLevel"] != level["level"]) {
        writeln!(
            out,
            "{} runs as {} in PostgreSQL (the server reports \"{}\").",
            text(&level["level"]),
            text(&level["effectiveLevel"]),
            text(&level["serverLevel"])
        )?;
    }
    writeln!(out, "{LEGEND}")?;
    Ok(out)
}

/// `possible`, or `prevented (lock, 40001)` from a scenario's or phenomenon's `observed`/`preventedBy`.
fn cell(observed: &Value) -> String {
    let how: Vec<&str> = observed["preventedBy"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|mechanism| match text(mechanism) {
            "serializationFailure" => "40001",
            other => other,
        })
        .collect();
    match text(&observed["observed"]) {
        "prevented" if !how.is_empty() => format!("prevented ({})", how.join(", ")),
        other => other.to_owned(),
    }
}

fn table(
    out: &mut String,
    title: &str,
    header: &[String],
    rows: &[(String, Vec<String>)],
) -> std::fmt::Result {
    let first = rows.iter().map(|(label, _)| label.len()).chain([title.len()]).max().unwrap_or_default();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .filter_map(|(_, cells)| cells.get(i))
                .map(String::len)
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |out: &mut String, label: &str, cells: &[String]| -> std::fmt::Result {
        let mut line = format!("{label:<first$}");
        for (cell, width) in cells.iter().zip(&widths) {
            write!(line, "  {cell:<width$}")?;
        }
        writeln!(out, "{}", line.trim_end())
    };
    line(out, title, header)?;
    rows.iter().try_for_each(|(label, cells)| line(out, label, cells))
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or("?")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn level(name: &str, effective: &str, dirty: Value, skew: Value) -> Value {
        json!({
            "level": name, "effectiveLevel": effective, "serverLevel": name.to_lowercase(),
            "dirtyRead": dirty["observed"], "writeSkew": skew["observed"],
            "phenomena": [
                { "name": "dirtyRead", "observed": dirty["observed"], "preventedBy": dirty["preventedBy"] },
                { "name": "writeSkew", "observed": skew["observed"], "preventedBy": skew["preventedBy"] },
            ],
            "scenarios": [
                { "name": "G2-item", "phenomenon": "write skew", "observed": skew["observed"],
                  "preventedBy": skew["preventedBy"] },
            ],
        })
    }

    #[test]
    fn the_matrix_shows_each_level_and_how_each_phenomenon_was_prevented() {
        let snapshot = json!({ "observed": "prevented", "preventedBy": ["snapshot"] });
        let body = json!({
            "success": true, "container": "app-2", "duration": 612.4,
            "levels": [
                level("READ UNCOMMITTED", "READ COMMITTED", snapshot.clone(), json!({ "observed": "possible" })),
                level("SERIALIZABLE", "SERIALIZABLE", snapshot,
                      json!({ "observed": "prevented", "preventedBy": ["serializationFailure"] })),
            ],
        });
        let out = render(&body).unwrap();
        let row =
            |label: &str| out.lines().find(|line| line.starts_with(label)).unwrap_or_default().to_owned();

        assert!(out.starts_with("isolation lab on app-2 (612 ms)"), "{out}");
        let skew = row("write skew");
        assert!(skew.contains("possible") && skew.ends_with("prevented (40001)"), "{out}");
        let column = row("phenomenon").find("SERIALIZABLE");
        assert_eq!(column, skew.find("prevented (40001)"), "cells line up under their level:\n{out}");
        assert!(row("dirty read").matches("prevented (snapshot)").count() == 2, "{out}");
        assert!(row("G2-item write skew").ends_with("prevented (40001)"), "{out}");
        assert!(out.contains("READ UNCOMMITTED runs as READ COMMITTED"), "{out}");
    }

    #[test]
    fn an_answer_without_levels_is_an_error() {
        assert!(render(&json!({ "success": false, "error": "boom" })).is_err());
    }
}
