//! The requests each workload sends, built once before the load starts so the driver only clones
//! reference-counted bodies; and the keys and rows the database's ceilings use, so both sides touch the
//! same rows.

use bytes::Bytes;
use rand::Rng;
use serde_json::json;

use super::plan::Workload;

/// How many distinct counters `keys` (and `mixed`) spread over.
pub const KEY_COUNT: u32 = 1000;
/// The one counter of `hot`.
pub const HOT_KEY: &str = "bench-hot";
/// Every counter a benchmark touches starts with this (the consistency checks sum over them).
pub const KEY_PREFIX: &str = "bench-";

/// The `keys` set's counters are this followed by 1 … 1000.
pub const KEY_STEM: &str = "bench-k";

/// How many pairs `pairs` spreads over; pair 0 is `pair`'s hot pair.
pub const PAIR_COUNT: u32 = 1000;
/// Pair `i`'s counters are this followed by `i`, then `a` or `b`.
pub const PAIR_STEM: &str = "bench-t";

/// The two counters of pair `i` (0 is the hot pair, 1 … 1000 the `pairs` set), in key order.
pub fn pair(i: u32) -> [String; 2] {
    [format!("{PAIR_STEM}{i}a"), format!("{PAIR_STEM}{i}b")]
}

/// Counter `i` of the `keys` set (1-based, like pgbench's `random(1, 1000)`).
pub fn key(i: u32) -> String {
    format!("{KEY_STEM}{i}")
}

/// Row `i` of a bulk insert: 64 bytes of text, the same for the HTTP side and the COPY ceiling.
pub fn row(i: usize) -> String {
    format!("bench row {i:08} {}", "x".repeat(45))
}

/// What a request does, for counting what the database should hold afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Increment,
    Read,
    /// A bulk insert of this many rows.
    Insert(u64),
    /// A transfer: the counters' sum stays the same.
    Transfer,
}

/// One request to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub kind: Kind,
    pub method: hyper::Method,
    pub path: Bytes,
    pub body: Bytes,
}

/// The requests of one workload.
#[derive(Debug)]
pub struct Requests {
    workload: Workload,
    live: Outgoing,
    hot: Outgoing,
    increments: Vec<Outgoing>,
    reads: Vec<Outgoing>,
    bulk: Outgoing,
    small_bulk: Outgoing,
    /// Pair `i`'s transfers, a→b and b→a (pair 0: the hot pair; built only for the transfer workloads).
    transfers: Vec<[Outgoing; 2]>,
}

impl Requests {
    /// `bulk_rows` rows per `bulk` request; `mixed` inserts a tenth of that (at least 1).
    pub fn new(workload: Workload, bulk_rows: usize) -> Requests {
        let post = |path: &'static str, body: serde_json::Value, kind| Outgoing {
            kind,
            method: hyper::Method::POST,
            path: Bytes::from_static(path.as_bytes()),
            body: Bytes::from(body.to_string()),
        };
        let bulk = |rows: usize| {
            let data: Vec<String> = (0..rows).map(row).collect();
            post("/api/bulk-insert", json!({ "data": data }), Kind::Insert(rows as u64))
        };
        let get = |path: String| Outgoing {
            kind: Kind::Read,
            method: hyper::Method::GET,
            path: Bytes::from(path),
            body: Bytes::new(),
        };
        Requests {
            workload,
            live: get("/health/live".to_owned()),
            hot: post("/api/increment", json!({ "key": HOT_KEY }), Kind::Increment),
            increments: (1..=KEY_COUNT)
                .map(|i| post("/api/increment", json!({ "key": key(i) }), Kind::Increment))
                .collect(),
            reads: (1..=KEY_COUNT).map(|i| get(format!("/api/counters/{}", key(i)))).collect(),
            bulk: bulk(bulk_rows),
            small_bulk: bulk((bulk_rows / 10).max(1)),
            transfers: match workload.transfers() {
                true => (0..=PAIR_COUNT)
                    .map(|i| {
                        let [a, b] = pair(i);
                        let transfer = |from: &str, to: &str| {
                            let body = json!({ "from": from, "to": to, "amount": 1 });
                            post("/api/transfer", body, Kind::Transfer)
                        };
                        [transfer(&a, &b), transfer(&b, &a)]
                    })
                    .collect(),
                false => Vec::new(),
            },
        }
    }

    /// The next request, drawn with `rng`.
    pub fn next(&self, rng: &mut impl Rng) -> &Outgoing {
        match self.workload {
            Workload::Http => &self.live,
            Workload::Hot => &self.hot,
            Workload::Keys => &self.increments[any_key(rng)],
            Workload::Reads => &self.reads[any_key(rng)],
            Workload::Bulk => &self.bulk,
            Workload::Mixed => match rng.random_range(0..10u8) {
                0..6 => &self.increments[any_key(rng)],
                6..9 => &self.reads[any_key(rng)],
                _ => &self.small_bulk,
            },
            Workload::Pair => &self.transfers[0][rng.random_range(0..2)],
            Workload::Pairs => {
                &self.transfers[rng.random_range(1..=PAIR_COUNT as usize)][rng.random_range(0..2)]
            }
        }
    }
}

/// A key index drawn uniformly.
fn any_key(rng: &mut impl Rng) -> usize {
    rng.random_range(0..KEY_COUNT as usize)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    #[test]
    fn mixed_draws_increments_reads_and_small_bulk_inserts_in_about_six_three_one() {
        let requests = Requests::new(Workload::Mixed, 1000);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut counts = [0u32; 3];
        for _ in 0..10_000 {
            match requests.next(&mut rng).kind {
                Kind::Increment => counts[0] += 1,
                Kind::Read => counts[1] += 1,
                Kind::Insert(rows) => {
                    assert_eq!(rows, 100);
                    counts[2] += 1;
                }
                Kind::Transfer => unreachable!("mixed sends no transfers"),
            }
        }
        assert!((5700..6300).contains(&counts[0]), "{counts:?}");
        assert!((2700..3300).contains(&counts[1]), "{counts:?}");
        assert!((800..1200).contains(&counts[2]), "{counts:?}");
    }

    #[test]
    fn every_row_is_64_bytes_of_plain_text_that_copy_takes_as_is() {
        assert!((0..2000).map(row).all(|r| r.len() == 64 && !r.contains(['\t', '\\', '\n'])));
    }
}
