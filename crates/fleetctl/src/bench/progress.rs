//! Progress on stderr: which measurement of how many, time elapsed, and an estimate of the time left
//! (the plan's own estimate, scaled by how the run has kept to it so far).

use std::time::{Duration, Instant};

use super::plan::{Role, Step};

/// What starting and stopping a fleet is expected to take (initdb included).
const FLEET_OVERHEAD: Duration = Duration::from_secs(6);
/// What a ceiling adds to its measuring time (seeding, snapshots, psql start-ups).
const CEILING_OVERHEAD: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct Progress {
    start: Instant,
    total: usize,
    done: usize,
    /// Planned seconds of everything, and of what is finished.
    planned: f64,
    planned_done: f64,
    point_s: f64,
    ceiling_s: f64,
    probe_s: f64,
}

impl Progress {
    /// `probes`: how many probes follow each workload at the main shape, and what each takes.
    pub fn new(steps: &[Step], point: Duration, ceiling: Duration, probes: (usize, Duration)) -> Progress {
        let point_s = point.as_secs_f64() + 0.5;
        let ceiling_s = (ceiling + CEILING_OVERHEAD).as_secs_f64();
        let probe_s = probes.1.as_secs_f64() + 0.5;
        let probes_of = |s: &Step| if s.role == Role::Main { s.workloads.len() * probes.0 } else { 0 };
        let total = steps.iter().map(|s| s.workloads.len() + s.ceilings.len() + probes_of(s)).sum();
        let planned = steps
            .iter()
            .map(|s| {
                FLEET_OVERHEAD.as_secs_f64()
                    + s.workloads.len() as f64 * point_s
                    + s.ceilings.len() as f64 * ceiling_s
                    + probes_of(s) as f64 * probe_s
            })
            .sum();
        let planned_done = 0.0;
        Progress { start: Instant::now(), total, done: 0, planned, planned_done, point_s, ceiling_s, probe_s }
    }

    /// How many measurements the run makes.
    pub fn total(&self) -> usize {
        self.total
    }

    /// The whole run's planned duration.
    pub fn planned(&self) -> Duration {
        Duration::from_secs_f64(self.planned)
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// A fleet is starting.
    pub fn fleet(&mut self, what: &str) {
        eprintln!("bench {} starting {what} …", self.clock());
    }

    /// A fleet was stopped: its overhead is done.
    pub fn fleet_done(&mut self) {
        self.planned_done += FLEET_OVERHEAD.as_secs_f64();
    }

    /// A measurement begins.
    pub fn begin(&self, what: &str) {
        eprintln!("bench [{}/{}] {} {what}", self.done + 1, self.total, self.clock());
    }

    /// A measurement ended with `summary`; `ceiling` says which kind it was.
    pub fn end(&mut self, ceiling: bool, summary: &str) {
        self.ended(if ceiling { self.ceiling_s } else { self.point_s }, summary);
    }

    /// A probe ended with `summary`.
    pub fn end_probe(&mut self, summary: &str) {
        self.ended(self.probe_s, summary);
    }

    fn ended(&mut self, planned_s: f64, summary: &str) {
        self.done += 1;
        self.planned_done += planned_s;
        eprintln!("bench {:>w$} {summary}", "", w = digits(self.total) * 2 + 2);
    }

    /// `0:42 elapsed, ~3:10 left`.
    fn clock(&self) -> String {
        let elapsed = self.start.elapsed().as_secs_f64();
        let pace = if self.planned_done > 0.0 { elapsed / self.planned_done } else { 1.0 };
        let left = (self.planned - self.planned_done).max(0.0) * pace;
        format!("{} elapsed, ~{} left —", mm_ss(elapsed), mm_ss(left))
    }
}

fn digits(n: usize) -> usize {
    n.to_string().len()
}

/// `m:ss`.
pub fn mm_ss(seconds: f64) -> String {
    let s = seconds.round() as u64;
    format!("{}:{:02}", s / 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::plan::{Ceiling, Role, Shape, Workload};

    #[test]
    fn the_plan_counts_every_point_and_ceiling_and_their_time() {
        let step = |workloads: Vec<Workload>, ceilings: Vec<Ceiling>, role| Step {
            shape: Shape { nodes: 4, pool_size: 5 },
            workloads,
            ceilings,
            env: Vec::new(),
            role,
        };
        let steps = [
            step(Workload::ALL.to_vec(), vec![Ceiling::Hot, Ceiling::Copy], Role::Main),
            step(vec![Workload::Keys], vec![], Role::Sweep),
        ];
        // Two probes after each of the main shape's 8 workloads, none in the sweep.
        let probes = (2, Duration::from_secs(4));
        let progress = Progress::new(&steps, Duration::from_secs(12), Duration::from_secs(10), probes);
        assert_eq!(progress.total, 9 + 2 + 16);
        let planned = 2.0 * 6.0 + 9.0 * 12.5 + 2.0 * 12.0 + 16.0 * 4.5;
        assert_eq!(progress.planned(), Duration::from_secs_f64(planned));
        assert_eq!(mm_ss(61.4), "1:01");
    }
}
