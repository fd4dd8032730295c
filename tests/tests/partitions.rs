//! Network partitions on the compose `ha` profile (real etcd, Patroni, PostgreSQL, nodes and nginx in
//! containers): packets dropped both ways between named parties by `scripts/partition`, while a plain
//! client (each request once) and a careful one (idempotency keys, retries) keep writing and reading
//! through nginx. Every operation is recorded with its start, end and outcome, and the history is checked
//! after each fault: no acknowledged increment lost, none applied twice, no plain read older than what
//! was acknowledged `READ_MAX_LAG_MS` before it began, every read with a write's token sees that write,
//! and no write is acknowledged while the primary has no standby to confirm it. One cluster serves every
//! fault, healed between them. `PARTITIONS=sync-standby,etcd` runs only the faults named.

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleet_tests::compose::{build_images, engine_or_skip, one_at_a_time, repo, Stack};
use fleet_tests::history::{
    check_increments, check_staleness, check_tokens, run_load, window, History, Outcome,
};
use fleet_tests::Api;

/// The nodes' `READ_MAX_LAG_MS` (the default, which docker-compose.yml keeps). The staleness check allows
/// no slack beyond it: an increment is acknowledged to the node before the client sees it, and a read
/// begins at the node after the client sent it.
const READ_MAX_LAG: Duration = Duration::from_millis(1000);

/// A fault of `scripts/partition`, and how long it is held.
struct Fault {
    args: &'static [&'static str],
    hold: Duration,
    /// Whether it leaves the primary without any standby: then no write may be acknowledged
    /// (`synchronous_mode_strict`) from shortly after it begins until it heals.
    alone: bool,
}

/// Writes already past COMMIT when a fault begins may still be acknowledged this long after.
const IN_FLIGHT: Duration = Duration::from_secs(2);

const FAULTS: [Fault; 6] = [
    // Longer than wal_receiver_timeout (5 s): the replica gives up on its primary and retries.
    Fault { args: &["async-replica"], hold: Duration::from_secs(15), alone: false },
    // Longer than wal_sender_timeout (5 s): the primary lets the standby go, Patroni picks the other.
    Fault { args: &["sync-standby"], hold: Duration::from_secs(15), alone: false },
    // Longer than a write's attempt deadline (32 s): abandoned COMMITs, then retries, while no standby hears.
    Fault { args: &["primary-replicas"], hold: Duration::from_secs(40), alone: true },
    Fault { args: &["node-db", "ha-app-1"], hold: Duration::from_secs(15), alone: false },
    // Longer than Patroni's ttl (20 s): the leader key expires.
    Fault { args: &["primary-etcd"], hold: Duration::from_secs(30), alone: false },
    Fault { args: &["etcd"], hold: Duration::from_secs(30), alone: false },
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ha_fleet_keeps_its_promises_when_links_go_silent() {
    if !engine_or_skip("partitions") {
        return;
    }
    let _one = one_at_a_time().await;
    tokio::task::block_in_place(build_images);
    let stack = Stack::new("partitions");
    tokio::task::block_in_place(|| stack.up(&["ha"], &["ha-nginx"]));
    tokio::task::block_in_place(|| stack.wait_whole(Duration::from_secs(120))).unwrap();
    let api = Api::new(stack.ha_url());

    let mut violations = Vec::new();
    let mut table = vec![
        "| fault | longest write gap | longest read gap | write p50 / p99 | read p50 / p99 |".to_owned(),
    ];
    let only = std::env::var("PARTITIONS").unwrap_or_default();
    let chosen = FAULTS.iter().filter(|f| only.is_empty() || only.split(',').any(|n| n == f.args[0]));
    for fault in chosen {
        let name = fault.args[0];
        let history = History::default();
        let stop = Arc::new(AtomicBool::new(false));
        let keys = |client: &str| (0..2).map(|n| format!("{name}-{client}-{n}")).collect::<Vec<_>>();
        let loads = [
            tokio::spawn(run_load(history.clone(), api.clone(), keys("plain"), false, stop.clone())),
            tokio::spawn(run_load(history.clone(), api.clone(), keys("careful"), true, stop.clone())),
        ];
        tokio::time::sleep(Duration::from_secs(3)).await;

        let injected = history.now();
        tokio::task::block_in_place(|| partition(&stack, fault.args));
        tokio::time::sleep(fault.hold).await;
        tokio::task::block_in_place(|| partition(&stack, &["heal"]));
        let healed = history.now();
        let members = tokio::task::block_in_place(|| stack.wait_whole(Duration::from_secs(180)))
            .unwrap_or_else(|e| panic!("after {name}: {e:#}"));
        let whole_again = history.now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        for load in loads {
            load.await.unwrap();
        }

        let ops = history.ops();
        let during = ops.iter().filter(|op| op.start >= injected && op.start <= healed).count();
        assert!(during > 0, "{name}: no request was sent while the fault held");
        let leader = members.iter().find(|m| m.role == "leader").unwrap().name.clone();
        let finals: HashMap<String, i64> = ["plain", "careful"]
            .iter()
            .flat_map(|client| keys(client))
            .map(|key| {
                let sql = format!("SELECT coalesce((SELECT value FROM counters WHERE key = '{key}'), 0)");
                let value = tokio::task::block_in_place(|| stack.psql(&leader, &sql));
                (key, value.parse().unwrap())
            })
            .collect();
        let lone_acks = ops.iter().filter(|op| {
            let during = op.end > injected + IN_FLIGHT && op.end < healed;
            fault.alone && op.write && during && matches!(op.outcome, Outcome::Ok(_))
        });
        let lone_acks = lone_acks.map(|op| {
            format!(
                "{}: acknowledged at {:.3} s while the primary had no standby",
                op.key,
                op.end.as_secs_f64()
            )
        });
        let found: Vec<String> = check_increments(&ops, &finals)
            .into_iter()
            .chain(check_staleness(&ops, READ_MAX_LAG))
            .chain(check_tokens(&ops))
            .chain(lone_acks)
            .map(|v| format!("{name}: {v}"))
            .collect();
        let token_reads: Vec<_> = ops.iter().filter(|op| op.owed.is_some()).collect();
        let refused = token_reads.iter().filter(|op| matches!(op.outcome, Outcome::Failed(_))).count();
        let (write_gap, write_p50, write_p99) = window(&ops, true, injected, whole_again);
        let (read_gap, read_p50, read_p99) = window(&ops, false, injected, whole_again);
        let s = |d: Duration| format!("{:.1} s", d.as_secs_f64());
        let ms = |d: Duration| format!("{} ms", d.as_millis());
        table.push(format!(
            "| {} ({} s) | {} | {} | {} / {} | {} / {} |",
            fault.args.join(" "),
            fault.hold.as_secs(),
            s(write_gap),
            s(read_gap),
            ms(write_p50),
            ms(write_p99),
            ms(read_p50),
            ms(read_p99)
        ));
        eprintln!(
            "{name}: {} operations ({} reads with a token, {refused} refused), {} violations; healed and \
             whole again {:.1} s later: {members:?}",
            ops.len(),
            token_reads.len(),
            found.len(),
            (whole_again - healed).as_secs_f64()
        );
        violations.extend(found);
    }
    eprintln!("{}", table.join("\n"));
    assert!(
        violations.is_empty(),
        "{} violations, first 20:\n{}",
        violations.len(),
        violations[..violations.len().min(20)].join("\n")
    );
}

/// `scripts/partition --project <the stack's> <args>`, asserting it succeeds.
fn partition(stack: &Stack, args: &[&str]) {
    let out = Command::new(repo().join("scripts/partition"))
        .args(["--project", &stack.project])
        .args(args)
        .output()
        .expect("run scripts/partition");
    assert!(out.status.success(), "scripts/partition {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}
