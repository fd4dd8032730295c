//! What the isolation lab must report on PostgreSQL, and the matrix of what it did report.

use serde_json::Value;

/// The phenomena the lab reports, in its order.
pub const PHENOMENA: [&str; 5] = ["dirtyRead", "nonRepeatableRead", "phantomRead", "lostUpdate", "writeSkew"];

/// PostgreSQL's documentation, chapter 13.2: table 13.1 for dirty, non-repeatable and phantom reads and
/// for serialization anomalies (here: write skew); the text of 13.2.1–13.2.2 for lost updates (READ
/// COMMITTED lets a read-modify-write lose one; REPEATABLE READ aborts it with 40001).
const DOCUMENTED: [(&str, [&str; 5]); 4] = [
    ("READ UNCOMMITTED", ["prevented", "possible", "possible", "possible", "possible"]),
    ("READ COMMITTED", ["prevented", "possible", "possible", "possible", "possible"]),
    ("REPEATABLE READ", ["prevented", "prevented", "prevented", "prevented", "possible"]),
    ("SERIALIZABLE", ["prevented", "prevented", "prevented", "prevented", "prevented"]),
];

/// `level → [dirtyRead, nonRepeatableRead, …]` of an all-levels reply.
pub fn matrix(body: &Value) -> Vec<(String, Vec<String>)> {
    let levels = body["levels"].as_array().unwrap_or_else(|| panic!("no levels in {body}"));
    levels
        .iter()
        .map(|level| {
            let observed = PHENOMENA.iter().map(|p| level[p].as_str().unwrap_or("missing").to_owned());
            (level["level"].as_str().unwrap_or_default().to_owned(), observed.collect())
        })
        .collect()
}

/// PostgreSQL's documented table, as [`matrix`] lays it out.
pub fn documented() -> Vec<(String, Vec<String>)> {
    DOCUMENTED
        .iter()
        .map(|(level, observed)| (level.to_string(), observed.iter().map(|o| o.to_string()).collect()))
        .collect()
}
