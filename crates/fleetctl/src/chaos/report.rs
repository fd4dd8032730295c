//! What `fleetctl chaos run` prints: the load, its failures by kind, the faults with their times, and
//! the verdict (lost, duplicated), as text or JSON.

use std::fmt::Write as _;

use serde::Serialize;

use super::client::Tally;
use super::verify::Verdict;

/// One injected fault.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    /// Seconds since the load started, when it was sent.
    pub at_s: f64,
    /// The command, e.g. `kill-node 3`.
    pub command: String,
    pub ok: bool,
    /// The fleet's answer, or the error.
    pub result: String,
}

/// A whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub url: String,
    /// From the start of the load to the last increment's end.
    pub duration_s: f64,
    pub concurrency: usize,
    pub keys: usize,
    pub tally: Tally,
    pub faults: Vec<FaultRecord>,
    pub verdict: Verdict,
}

impl Report {
    pub fn text(&self) -> String {
        let (tally, verdict) = (&self.tally, &self.verdict);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "chaos run against {}: {:.1} s, {} clients, {} counters",
            self.url, self.duration_s, self.concurrency, self.keys
        );
        let rows = [
            ("requests sent", tally.requests.to_string()),
            ("acknowledged", format!("{} ({} as replays)", tally.acknowledged, tally.replayed)),
            ("retries", tally.retries.to_string()),
            ("failures", failures(tally)),
            ("rejected", verdict.rejected.to_string()),
            ("unresolved", verdict.unresolved.to_string()),
        ];
        for (name, value) in rows {
            let _ = writeln!(out, "  {name:<14} {value}");
        }
        let _ = writeln!(out, "faults");
        if self.faults.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for fault in &self.faults {
            let status = if fault.ok { "" } else { "FAILED: " };
            let _ = writeln!(out, "  {:>6.1} s  {:<14} {status}{}", fault.at_s, fault.command, fault.result);
        }
        let _ = writeln!(out, "lost: {}", verdict.lost);
        let _ = writeln!(out, "duplicated: {}", verdict.duplicated);
        for key in verdict.keys.iter().filter(|k| k.lost > 0 || k.duplicated > 0) {
            let _ = writeln!(
                out,
                "  {}: value {}, {} acknowledged, {} unresolved: {} lost, {} duplicated",
                key.key, key.value, key.acknowledged, key.unresolved, key.lost, key.duplicated
            );
        }
        out
    }
}

/// `http 502: 3, timeout: 1`, or `none`.
pub fn failures(tally: &Tally) -> String {
    if tally.failures.is_empty() {
        return "none".to_owned();
    }
    tally.failures.iter().map(|(kind, n)| format!("{kind}: {n}")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::client::Failure;

    #[test]
    fn the_text_report_lists_failures_faults_and_the_verdict() {
        let mut tally =
            Tally { requests: 120, retries: 20, acknowledged: 100, replayed: 3, ..Tally::default() };
        tally.failures.insert(Failure::Status(502), 4);
        tally.failures.insert(Failure::Timeout, 1);
        let report = Report {
            url: "http://127.0.0.1:8080".to_owned(),
            duration_s: 8.04,
            concurrency: 16,
            keys: 20,
            tally,
            faults: vec![
                FaultRecord {
                    at_s: 1.2,
                    command: "kill-node 3".into(),
                    ok: true,
                    result: "killed app-3".into(),
                },
                FaultRecord { at_s: 2.8, command: "restart-db".into(), ok: false, result: "refused".into() },
            ],
            verdict: Verdict {
                acknowledged: 100,
                unresolved: 0,
                rejected: 0,
                lost: 0,
                duplicated: 0,
                keys: vec![],
            },
        };
        let text = report.text();
        for line in [
            "chaos run against http://127.0.0.1:8080: 8.0 s, 16 clients, 20 counters",
            "acknowledged   100 (3 as replays)",
            "failures       http 502: 4, timeout: 1",
            "1.2 s  kill-node 3    killed app-3",
            "2.8 s  restart-db     FAILED: refused",
            "\nlost: 0\nduplicated: 0\n",
        ] {
            assert!(text.contains(line), "{line:?} in:\n{text}");
        }
    }
}
