//! The faults a running fleet can be asked to inject into itself, defined once. Each variant is a
//! `fleetctl chaos` subcommand (its name, arguments and help come from here) and a line on the fleet's
//! control socket (`kill-node 2`, `pause-db 2.5`, `lag-replica pg-2 5`), which the same definition
//! parses: a fault is written as its subcommand is typed. What a fault does is
//! [`Injector::apply`](super::injector::Injector::apply).

use std::error::Error as _;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand};

/// Longest pause a fault accepts.
const MAX_PAUSE: Duration = Duration::from_secs(600);

/// A fault the fleet injects into itself.
#[derive(Debug, Clone, Copy, PartialEq, Subcommand)]
pub enum Fault {
    /// SIGKILL node N, as a crash would: its in-flight requests fail; it stays dead.
    KillNode {
        #[arg(value_parser = parse_node)]
        n: usize,
    },
    /// SIGTERM node N, as an orchestrator would: it drains and exits.
    StopNode {
        #[arg(value_parser = parse_node)]
        n: usize,
    },
    /// Restart PostgreSQL (fast shutdown, which ends every session, then start).
    RestartDb,
    /// Freeze PostgreSQL's every process (SIGSTOP) for SECONDS, then thaw it (SIGCONT).
    PauseDb {
        #[arg(value_parser = parse_seconds)]
        seconds: Duration,
    },
    /// On a Patroni cluster: SIGKILL the leader's Patroni and PostgreSQL; returns once another member
    /// leads and the killed one has rejoined.
    KillPrimary,
    /// On a Patroni cluster: a planned switchover (Patroni's REST API); returns once the cluster is whole.
    Switchover,
    /// On a Patroni cluster: restart each replica, switch over, restart the old leader; returns once the
    /// cluster is whole again.
    RollingRestartDb,
    /// On a Patroni cluster: pause WAL replay on replica MEMBER (pg-2, or 2) for SECONDS, then resume it.
    LagReplica {
        #[arg(value_parser = parse_member)]
        member: usize,
        #[arg(value_parser = parse_seconds)]
        seconds: Duration,
    },
    /// On a Patroni cluster: stop replica MEMBER's WAL receiver (SIGSTOP) for SECONDS, then resume it: its
    /// link to the primary goes silent, no WAL and no error, as in a partition before any timeout fires.
    /// (On the synchronous standby, writes wait meanwhile.)
    SilenceReplica {
        #[arg(value_parser = parse_member)]
        member: usize,
        #[arg(value_parser = parse_seconds)]
        seconds: Duration,
    },
}

/// A fault's line: its subcommand's words.
#[derive(Debug, Parser)]
#[command(no_binary_name = true, disable_help_flag = true, disable_help_subcommand = true)]
struct Line {
    #[command(subcommand)]
    fault: Fault,
}

impl FromStr for Fault {
    type Err = String;

    /// The line form: the fault's name and its arguments, separated by white space. The arguments are
    /// values only (`pause-db -1` is a bad number of seconds, not an option).
    fn from_str(line: &str) -> Result<Fault, String> {
        let mut words = line.split_whitespace();
        let argv = words.next().into_iter().chain(["--"]).chain(words);
        match Line::try_parse_from(argv) {
            Ok(parsed) => Ok(parsed.fault),
            // A value its parser refused: that parser's reason.
            Err(error) if error.kind() == ErrorKind::ValueValidation => {
                Err(error.source().map_or_else(|| error.to_string(), ToString::to_string))
            }
            Err(_) => Err(format!("unknown command {line:?}; commands: {}", usage())),
        }
    }
}

impl fmt::Display for Fault {
    /// The line [`Fault::from_str`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::KillNode { n } => write!(f, "kill-node {n}"),
            Fault::StopNode { n } => write!(f, "stop-node {n}"),
            Fault::RestartDb => f.write_str("restart-db"),
            Fault::PauseDb { seconds } => write!(f, "pause-db {}", seconds.as_secs_f64()),
            Fault::KillPrimary => f.write_str("kill-primary"),
            Fault::Switchover => f.write_str("switchover"),
            Fault::RollingRestartDb => f.write_str("rolling-restart-db"),
            Fault::LagReplica { member, seconds } => {
                write!(f, "lag-replica pg-{member} {}", seconds.as_secs_f64())
            }
            Fault::SilenceReplica { member, seconds } => {
                write!(f, "silence-replica pg-{member} {}", seconds.as_secs_f64())
            }
        }
    }
}

/// Every fault's line with its arguments' names (`kill-node N, …, lag-replica MEMBER SECONDS`).
fn usage() -> String {
    let lines: Vec<String> = Line::command()
        .get_subcommands()
        .map(|fault| {
            let args = fault.get_positionals().map(|arg| arg.get_id().as_str().to_uppercase());
            std::iter::once(fault.get_name().to_owned()).chain(args).collect::<Vec<_>>().join(" ")
        })
        .collect();
    lines.join(", ")
}

/// A node's number, counting from 1.
fn parse_node(n: &str) -> Result<usize, String> {
    n.parse().ok().filter(|&n| n >= 1).ok_or_else(|| format!("{n:?} is not a node number (1, 2, …)"))
}

/// A pause's length: seconds, above 0 and up to [`MAX_PAUSE`].
fn parse_seconds(seconds: &str) -> Result<Duration, String> {
    seconds
        .parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .filter(|d| !d.is_zero() && *d <= MAX_PAUSE)
        .ok_or_else(|| {
            format!("{seconds:?} is not a number of seconds between 0 and {}", MAX_PAUSE.as_secs())
        })
}

/// A cluster member, `pg-N` or `N` (counting from 1); its number.
fn parse_member(member: &str) -> Result<usize, String> {
    member
        .strip_prefix("pg-")
        .unwrap_or(member)
        .parse()
        .ok()
        .filter(|&n| n >= 1)
        .ok_or_else(|| format!("{member:?} is not a cluster member (pg-1, pg-2, …)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fault_reads_back_from_its_line() {
        for fault in [
            Fault::KillNode { n: 2 },
            Fault::StopNode { n: 13 },
            Fault::RestartDb,
            Fault::PauseDb { seconds: Duration::from_millis(2500) },
            Fault::KillPrimary,
            Fault::Switchover,
            Fault::RollingRestartDb,
            Fault::LagReplica { member: 2, seconds: Duration::from_secs(5) },
            Fault::SilenceReplica { member: 3, seconds: Duration::from_millis(1500) },
        ] {
            assert_eq!(fault.to_string().parse::<Fault>(), Ok(fault));
        }
        assert_eq!(" pause-db   3 ".parse::<Fault>(), Ok(Fault::PauseDb { seconds: Duration::from_secs(3) }));
        assert_eq!(
            "lag-replica 3 1".parse::<Fault>(),
            Ok(Fault::LagReplica { member: 3, seconds: Duration::from_secs(1) })
        );
    }

    #[test]
    fn a_bad_line_is_refused_with_the_reason_and_the_commands() {
        let unknown = "explode".parse::<Fault>().unwrap_err();
        assert!(
            unknown.contains("unknown command \"explode\"") && unknown.contains("restart-db"),
            "{unknown}"
        );
        assert!("kill-node 0".parse::<Fault>().unwrap_err().contains("not a node number"));
        assert!("kill-node".parse::<Fault>().unwrap_err().contains("unknown command"));
        assert!("restart-db now".parse::<Fault>().is_err());
        for bad in ["lag-replica pg-0 1", "lag-replica app-1 1", "lag-replica pg-2"] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
        assert!("lag-replica x 1".parse::<Fault>().unwrap_err().contains("not a cluster member"));
        for bad in ["pause-db 0", "pause-db -1", "pause-db 601", "pause-db NaN", "pause-db soon"] {
            assert!(bad.parse::<Fault>().unwrap_err().contains("number of seconds"), "{bad}");
        }
    }

    #[test]
    fn the_commands_are_listed_with_their_arguments() {
        assert_eq!(
            usage(),
            "kill-node N, stop-node N, restart-db, pause-db SECONDS, kill-primary, switchover, \
             rolling-restart-db, lag-replica MEMBER SECONDS, silence-replica MEMBER SECONDS"
        );
    }
}
