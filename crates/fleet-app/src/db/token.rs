//! Read-your-writes tokens: a position in the cluster's history, `<timeline>/<LSN>`.
//!
//! A write answers `X-Fleet-Lsn: 3/0/16B3740`: the primary's timeline (decimal, as PostgreSQL's
//! `pg_control_checkpoint()` and Patroni name it) and its WAL position after the commit (PostgreSQL's
//! `XXXXXXXX/XXXXXXXX`). An LSN alone does not name a write: after a failover, a replica that received
//! WAL from the old primary past the promotion point has replayed positions the new timeline reuses for
//! other records. So a token is satisfied only by a server on the same timeline that has replayed its LSN
//! (see [`Position::covers`]); a read whose token names an older timeline goes to the primary, which holds
//! every acknowledged write (synchronous replication).
//!
//! The bare LSN that nodes used to answer is not accepted: tokens live for the seconds between a write and
//! the reads that follow it, and a bare LSN cannot be checked against a timeline.

use std::fmt;

use tokio_postgres::types::PgLsn;

/// A server's position, or a token naming one: a timeline and an LSN on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub timeline: u32,
    pub lsn: PgLsn,
}

/// An `X-Fleet-Lsn` / `X-Fleet-Min-Lsn` value.
pub type Token = Position;

/// The primary's position: its current WAL position and the timeline it writes (the first 8 hex digits
/// of the WAL file name: `pg_walfile_name` uses the insert timeline). One snapshot-free statement, for
/// any role (`pg_walfile_name` fails in recovery, so it cannot name a standby's position by mistake).
pub(super) const PRIMARY_POSITION: &str =
    "SELECT now.lsn, ('x' || left(pg_walfile_name(now.lsn), 8))::bit(32)::int \
     FROM (SELECT pg_current_wal_lsn() AS lsn) AS now";

impl Position {
    /// From a row's `pg_lsn` and `int4` timeline; `None` if either is unknown.
    pub(super) fn from_parts(timeline: Option<i32>, lsn: Option<PgLsn>) -> Option<Position> {
        Some(Position { timeline: u32::try_from(timeline?).ok().filter(|t| *t > 0)?, lsn: lsn? })
    }

    /// Whether a server at `self` has every record up to `token`: same timeline, replayed that far.
    pub fn covers(&self, token: &Token) -> bool {
        self.timeline == token.timeline && self.lsn >= token.lsn
    }

    /// Whether `token` names a position the primary at `self` has not reached: a later timeline, or a
    /// later LSN on its own. No write of this cluster handed such a token out (yet).
    pub fn precedes(&self, token: &Token) -> bool {
        token.timeline > self.timeline || (token.timeline == self.timeline && token.lsn > self.lsn)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.timeline, self.lsn)
    }
}

/// Parses a token: `<timeline>/<hi>/<lo>`, the timeline 1 to 4294967295 in decimal without sign or
/// leading zero, `hi` and `lo` 1 to 8 hex digits (PostgreSQL's LSN notation).
pub fn parse_token(text: &str) -> Option<Token> {
    let (timeline, lsn) = text.split_once('/')?;
    let decimal = (1..=10).contains(&timeline.len())
        && timeline.bytes().all(|b| b.is_ascii_digit())
        && !timeline.starts_with('0');
    let timeline: u32 = decimal.then(|| timeline.parse().ok()).flatten()?;
    Some(Position { timeline, lsn: parse_lsn(lsn)? })
}

/// PostgreSQL's `XXXXXXXX/XXXXXXXX` (1 to 8 hex digits each side).
fn parse_lsn(text: &str) -> Option<PgLsn> {
    let (hi, lo) = text.split_once('/')?;
    let hex = |part: &str| (1..=8).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(hi) && hex(lo)).then(|| text.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(timeline: u32, lsn: u64) -> Position {
        Position { timeline, lsn: PgLsn::from(lsn) }
    }

    #[test]
    fn tokens_parse_as_writes_give_them_and_nothing_else() {
        assert_eq!(parse_token("1/0/16B3740"), Some(at(1, 0x16B3740)));
        assert_eq!(parse_token("12/A/0"), Some(at(12, 0xA_0000_0000)));
        assert_eq!(parse_token("4294967295/FFFFFFFF/FFFFFFFF"), Some(at(u32::MAX, u64::MAX)));
        assert_eq!(at(3, 0x16B3740).to_string(), "3/0/16B3740");
        assert_eq!(parse_token(&at(3, 0x16B3740).to_string()), Some(at(3, 0x16B3740)));
        for bad in [
            "",
            "0/16B3740",
            "FFFFFFFF/FFFFFFFF",
            "0/0/1",
            "01/0/1",
            "4294967296/0/1",
            "-1/0/1",
            "+1/0/1",
            "1/0/16B3740/1",
            "1//1",
            "1/0/",
            "1/1FFFFFFFF/0",
            "1/0/x",
            " 1/0/1",
            "1/0/+1",
            "a/0/1",
        ] {
            assert_eq!(parse_token(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_token_is_covered_only_on_its_own_timeline_and_refused_when_ahead_of_the_primary() {
        let replica = at(2, 100);
        assert!(replica.covers(&at(2, 100)));
        assert!(!replica.covers(&at(2, 101)), "not replayed yet");
        assert!(!replica.covers(&at(3, 50)), "a later timeline: another history past the fork");
        assert!(!replica.covers(&at(1, 50)), "an earlier timeline: the primary judges it");
        let primary = at(2, 100);
        assert!(!primary.precedes(&at(2, 100)));
        assert!(!primary.precedes(&at(1, u64::MAX)), "an old timeline is history, not the future");
        assert!(primary.precedes(&at(2, 101)));
        assert!(primary.precedes(&at(3, 0)));
    }

    #[test]
    fn a_position_needs_a_timeline_and_an_lsn() {
        assert_eq!(Position::from_parts(Some(2), Some(PgLsn::from(7))), Some(at(2, 7)));
        assert_eq!(Position::from_parts(None, Some(PgLsn::from(7))), None);
        assert_eq!(Position::from_parts(Some(0), Some(PgLsn::from(7))), None);
        assert_eq!(Position::from_parts(Some(-1), Some(PgLsn::from(7))), None);
        assert_eq!(Position::from_parts(Some(2), None), None);
    }
}
