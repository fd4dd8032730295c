//! What `fleetctl chaos run` prints: the load, its failures by kind, each client kind's requests (success
//! ratio, status codes, latency, the longest window without a success), the faults with their times,
//! and the verdict (lost, duplicated), as text or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::client::{Sample, Tally};
use super::verify::Verdict;

/// What one kind of client (careful writes, plain writes, plain reads) saw, request by request.
#[derive(Debug, Clone, Serialize)]
pub struct LoadSummary {
    pub name: String,
    pub clients: usize,
    pub requests: u64,
    pub succeeded: u64,
    /// `succeeded / requests` (1 for no request).
    pub success_ratio: f64,
    /// Requests by HTTP status (`200`, `404`) or failure (`http 503 08007`, `timeout` …).
    pub statuses: BTreeMap<String, u64>,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    /// The longest time (s) from the load's start, or from one success's end, to the next success's end
    /// (or the load's end).
    pub longest_without_success_s: f64,
}

impl LoadSummary {
    /// Sums up `samples` of a load that ran from `started` for `elapsed`.
    pub fn new(name: &str, clients: usize, samples: &[Sample], started: Instant, elapsed: Duration) -> Self {
        let mut statuses = BTreeMap::new();
        for sample in samples {
            let status = match sample.result {
                Ok(status) => status.to_string(),
                Err(failure) => failure.to_string(),
            };
            *statuses.entry(status).or_default() += 1;
        }
        let mut latencies: Vec<f64> = samples.iter().map(|s| s.took.as_secs_f64() * 1000.0).collect();
        latencies.sort_by(f64::total_cmp);
        let mut successes: Vec<f64> = samples
            .iter()
            .filter(|s| s.result.is_ok())
            .map(|s| (s.sent + s.took).saturating_duration_since(started).as_secs_f64())
            .collect();
        successes.sort_by(f64::total_cmp);
        let ends = std::iter::once(0.0).chain(successes.iter().copied()).chain([elapsed.as_secs_f64()]);
        let longest = ends.clone().zip(ends.skip(1)).map(|(a, b)| b - a).fold(0.0, f64::max);
        let requests = samples.len() as u64;
        let succeeded = successes.len() as u64;
        LoadSummary {
            name: name.to_owned(),
            clients,
            requests,
            succeeded,
            success_ratio: if requests == 0 { 1.0 } else { succeeded as f64 / requests as f64 },
            statuses,
            latency_p50_ms: percentile(&latencies, 0.50),
            latency_p99_ms: percentile(&latencies, 0.99),
            latency_max_ms: latencies.last().copied().unwrap_or(0.0),
            longest_without_success_s: longest,
        }
    }

    fn text(&self) -> String {
        let statuses: Vec<String> = self.statuses.iter().map(|(s, n)| format!("{s}: {n}")).collect();
        format!(
            "  {:<15} {} clients, {} requests, {:.3}% succeeded; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; \
             longest without a success {:.2} s\n  {:<15} {}\n",
            self.name,
            self.clients,
            self.requests,
            100.0 * self.success_ratio,
            self.latency_p50_ms,
            self.latency_p99_ms,
            self.latency_max_ms,
            self.longest_without_success_s,
            "",
            statuses.join(", ")
        )
    }
}

/// The `q` quantile of sorted `values` (nearest rank), 0 for none.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n => sorted[((q * n as f64).ceil() as usize).clamp(1, n) - 1],
    }
}

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
    /// The careful writers' tally.
    pub tally: Tally,
    pub faults: Vec<FaultRecord>,
    /// The careful writers' increments, checked.
    pub verdict: Verdict,
    /// The plain writers' increments (on counters of their own), checked; none without plain writers.
    pub plain_verdict: Option<Verdict>,
    /// Careful writes, plain writes and plain reads, each summed up.
    pub loads: Vec<LoadSummary>,
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
        let _ = writeln!(out, "requests");
        for load in &self.loads {
            out.push_str(&load.text());
        }
        let _ = writeln!(out, "faults");
        if self.faults.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for fault in &self.faults {
            let status = if fault.ok { "" } else { "FAILED: " };
            let _ = writeln!(out, "  {:>6.1} s  {:<14} {status}{}", fault.at_s, fault.command, fault.result);
        }
        let plain = self.plain_verdict.as_ref();
        let (lost, duplicated) = (
            verdict.lost + plain.map_or(0, |v| v.lost),
            verdict.duplicated + plain.map_or(0, |v| v.duplicated),
        );
        let _ = writeln!(out, "lost: {lost}");
        let _ = writeln!(out, "duplicated: {duplicated}");
        let keys = verdict.keys.iter().chain(plain.into_iter().flat_map(|v| v.keys.iter()));
        for key in keys.filter(|k| k.lost > 0 || k.duplicated > 0) {
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
            plain_verdict: None,
            loads: vec![],
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

    #[test]
    fn a_load_summary_counts_statuses_percentiles_and_the_longest_gap_between_successes() {
        let start = Instant::now();
        let at = |s: f64, ms: u64, result| Sample {
            sent: start + Duration::from_secs_f64(s),
            took: Duration::from_millis(ms),
            result,
        };
        let samples = [
            at(0.0, 100, Ok(200)),
            at(1.0, 2000, Err(Failure::CommitUnknown)),
            at(1.0, 10, Err(Failure::Status(503))),
            at(4.0, 100, Ok(200)),
            at(5.0, 50, Ok(404)),
        ];
        let summary = LoadSummary::new("plain reads", 2, &samples, start, Duration::from_secs(6));
        assert_eq!((summary.requests, summary.succeeded), (5, 3));
        assert!((summary.success_ratio - 0.6).abs() < 1e-9);
        let statuses: Vec<(&str, u64)> = summary.statuses.iter().map(|(s, n)| (s.as_str(), *n)).collect();
        assert_eq!(statuses, [("200", 2), ("404", 1), ("http 503", 1), ("http 503 08007", 1)]);
        assert_eq!((summary.latency_p50_ms, summary.latency_max_ms), (100.0, 2000.0));
        assert_eq!(summary.latency_p99_ms, 2000.0);
        // From the first success's end (0.1 s) to the next's (4.1 s).
        assert!((summary.longest_without_success_s - 4.0).abs() < 1e-6, "{summary:?}");
        let none = LoadSummary::new("none", 1, &[], start, Duration::from_secs(3));
        assert_eq!((none.requests, none.longest_without_success_s), (0, 3.0));
    }
}
