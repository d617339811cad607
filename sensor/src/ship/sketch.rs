//! Finding thin clients: a client below the `top_clients` cut on every host (and not in the
//! keyed sample) reaches the fleet only folded into `rest`, so fleet rules never see it, even
//! when its total over the fleet is far past them. Each summary therefore carries a
//! count-min sketch of every client's period counts (requests and bytes), per key kind; the
//! collector adds the sketches of the last minute over all agents and names back the cells
//! whose sum passes its `[sketch]` thresholds ("hot"); an agent then names in its summaries
//! every client whose cells are all hot, whatever its rank. From then on the fleet has the
//! client's exact counts from every host (up to the sample's row bound).
//!
//! Cells are chosen by HMAC under a subkey of the fleet's identity secret (the same subkey
//! as the sample), so a client cannot aim its traffic at another client's cells, and the
//! collector never learns which key a cell belongs to. Count-min only overestimates: a
//! client whose fleet total passes the thresholds always has all its cells hot; a quiet
//! client sharing all four of its cells with hot ones is named too (harmless: its exact
//! counts are shipped). Approximation named in docs/fleet.md: the counts a client made before
//! its cells turned hot stay in `rest`.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use crate::model::{aggregate::Counts, keys::By};

/// Rows of the sketch (independent hash functions).
pub const ROWS: usize = 4;
/// Cells per row.
pub const WIDTH: usize = 1024;
/// Cells of a sketch in all: indices are `row * WIDTH + column`.
pub const CELLS: u32 = (ROWS * WIDTH) as u32;
/// Hot cells named back per key kind, at most (the hottest first).
pub const MAX_HOT: usize = 1024;
/// An agent forgets the hot cells this long after the collector last named them (a
/// collector away must not keep agents naming clients it no longer asks for).
pub const HOT_TTL_SECS: u64 = 60;
/// Seconds of summaries the collector adds up: fleet rules' shortest window.
pub const WINDOW_SECS: u64 = 60;
/// Periods starting further ahead of the collector's clock are not added.
pub const MAX_AHEAD_SECS: u64 = 30;

/// Over JetStream the collector publishes the hot cells (core NATS, every few seconds) on
/// this subject: outside the stream's `<subject_prefix>.>`, so they are never taken for an
/// agent's batch.
pub fn hot_subject(subject_prefix: &str) -> String {
    format!("{subject_prefix}-hot")
}

/// How often the collector publishes the hot cells over NATS.
pub const HOT_PUBLISH_SECS: u64 = 5;

/// One cell on the wire: `[index, requests, bytes]` (bytes in and out).
pub type Cell = (u32, u64, u64);

/// Where a client falls: its rank in the keyed sample (0..10 000) and its cell in each row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub rank: u32,
    pub cells: [u32; ROWS],
}

impl Place {
    /// From the client's HMAC: 8 bytes for the rank, 2 per row for the columns (WIDTH
    /// divides 2^16, so columns are uniform).
    pub fn from_mac(mac: &[u8; 32]) -> Self {
        let mut rank = [0u8; 8];
        rank.copy_from_slice(&mac[..8]);
        let mut cells = [0u32; ROWS];
        for (row, cell) in cells.iter_mut().enumerate() {
            let col = u16::from_le_bytes([mac[8 + 2 * row], mac[9 + 2 * row]]) as usize % WIDTH;
            *cell = (row * WIDTH + col) as u32;
        }
        Self {
            rank: (u64::from_le_bytes(rank) % 10_000) as u32,
            cells,
        }
    }
}

/// One key kind's sketch of one period, as the agent builds it.
#[derive(Debug, Default)]
pub struct Builder(HashMap<u32, (u64, u64)>);

impl Builder {
    pub fn add(&mut self, place: &Place, c: &Counts) {
        for cell in place.cells {
            let e = self.0.entry(cell).or_default();
            e.0 = e.0.saturating_add(c.requests);
            e.1 = e.1.saturating_add(c.bytes_in.saturating_add(c.bytes_out));
        }
    }

    /// The nonzero cells, by index.
    pub fn finish(self) -> Vec<Cell> {
        let mut v: Vec<Cell> = self
            .0
            .into_iter()
            .filter(|(_, (r, b))| *r > 0 || *b > 0)
            .map(|(i, (r, b))| (i, r, b))
            .collect();
        v.sort_unstable();
        v
    }
}

/// The hot cells per key kind, as the collector names them back (wire format of its answer).
pub type HotCells = BTreeMap<String, Vec<u32>>;

/// The agent's copy of the collector's hot cells, set from each answer, shared between the
/// shipping sink (which receives them) and the summaries (which use them).
#[derive(Debug, Default)]
pub struct Hot(Mutex<HotState>);

#[derive(Debug, Default)]
struct HotState {
    cells: HashMap<By, HashSet<u32>>,
    until_s: u64,
}

impl Hot {
    /// Replaces the hot cells with the collector's latest answer (kinds and indices it does
    /// not know are ignored; at most MAX_HOT per kind are taken).
    pub fn set(&self, hot: &HotCells, now_s: u64) {
        let cells = hot
            .iter()
            .filter_map(|(kind, v)| {
                let by = By::parse(kind)?;
                let set: HashSet<u32> = v
                    .iter()
                    .copied()
                    .filter(|&i| i < CELLS)
                    .take(MAX_HOT)
                    .collect();
                Some((by, set))
            })
            .collect();
        if let Ok(mut s) = self.0.lock() {
            *s = HotState {
                cells,
                until_s: now_s + HOT_TTL_SECS,
            };
        }
    }

    /// The hot cells in force at `now_s` (none once they expired).
    pub fn current(&self, now_s: u64) -> HashMap<By, HashSet<u32>> {
        match self.0.lock() {
            Ok(s) if now_s < s.until_s => s.cells.clone(),
            _ => HashMap::new(),
        }
    }
}

/// Whether every cell of `place` is hot.
pub fn all_hot(hot: Option<&HashSet<u32>>, place: &Place) -> bool {
    hot.is_some_and(|h| place.cells.iter().all(|c| h.contains(c)))
}

/// `[sketch]` of the collector: what makes a cell hot (0 turns a measure off; both 0 turns
/// naming back off).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SketchConfig {
    /// Requests a minute over the fleet.
    pub hot_requests_per_minute: u64,
    /// Bytes (in and out) a minute over the fleet.
    pub hot_bytes_per_minute: u64,
}

impl Default for SketchConfig {
    fn default() -> Self {
        // Half the default fleet rules' thresholds (300 requests, 50 MB out a minute): a
        // client is named before its volume crosses them.
        Self {
            hot_requests_per_minute: 150,
            hot_bytes_per_minute: 25_000_000,
        }
    }
}

/// Cell -> (requests, bytes) of one key kind.
type Sums = HashMap<u32, (u64, u64)>;

/// The collector's sum of the agents' sketches over the last minute.
#[derive(Debug, Clone, Default)]
pub struct FleetSketch {
    config: SketchConfig,
    /// Period start -> key kind -> cell -> (requests, bytes).
    periods: BTreeMap<u64, HashMap<By, Sums>>,
    /// The last answer and the second it was computed in (recomputed at most once a second).
    cached: Option<(u64, HotCells)>,
}

impl FleetSketch {
    pub fn new(config: SketchConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    fn enabled(&self) -> bool {
        self.config.hot_requests_per_minute > 0 || self.config.hot_bytes_per_minute > 0
    }

    /// Adds one agent's sketch of the period starting at `start_s` (cells validated by
    /// ingest). Only periods of the window are kept: older ones, and ones more than
    /// `MAX_AHEAD_SECS` in the collector's future (agents' clocks differ a little; a hostile
    /// agent's far-future periods would otherwise pile up, 4096 cells each).
    pub fn add(&mut self, start_s: u64, sketch: &BTreeMap<String, Vec<Cell>>, now_s: u64) {
        if !self.enabled()
            || start_s + WINDOW_SECS + super::PERIOD_SECS <= now_s
            || start_s > now_s + MAX_AHEAD_SECS
        {
            return;
        }
        let period = self.periods.entry(start_s).or_default();
        for (kind, cells) in sketch {
            let Some(by) = By::parse(kind) else { continue };
            let table = period.entry(by).or_default();
            for &(i, r, b) in cells {
                let e = table.entry(i).or_default();
                e.0 = e.0.saturating_add(r);
                e.1 = e.1.saturating_add(b);
            }
        }
        // The cached answer stays for the rest of its second: every batch asks, and summing
        // the window's cells per answer would cost the collector more than the merge.
    }

    /// The hot cells per key kind over the periods of the last minute, hottest first.
    pub fn hot(&mut self, now_s: u64) -> HotCells {
        if !self.enabled() {
            return HotCells::new();
        }
        if let Some((at, hot)) = &self.cached
            && *at == now_s
        {
            return hot.clone();
        }
        let oldest = now_s.saturating_sub(WINDOW_SECS + super::PERIOD_SECS);
        self.periods = self.periods.split_off(&oldest);
        let mut sums: HashMap<By, Sums> = HashMap::new();
        for kinds in self.periods.values() {
            for (by, cells) in kinds {
                let t = sums.entry(*by).or_default();
                for (i, (r, b)) in cells {
                    let e = t.entry(*i).or_default();
                    e.0 = e.0.saturating_add(*r);
                    e.1 = e.1.saturating_add(*b);
                }
            }
        }
        let (rq, bq) = (
            self.config.hot_requests_per_minute,
            self.config.hot_bytes_per_minute,
        );
        // How far past its threshold a cell is (the larger of the two measures).
        let heat = |r: u64, b: u64| -> f64 {
            let f = |v: u64, t: u64| if t == 0 { 0.0 } else { v as f64 / t as f64 };
            f(r, rq).max(f(b, bq))
        };
        let mut out = HotCells::new();
        for (by, cells) in sums {
            let mut hot: Vec<(f64, u32)> = cells
                .into_iter()
                .map(|(i, (r, b))| (heat(r, b), i))
                .filter(|(h, _)| *h >= 1.0)
                .collect();
            if hot.is_empty() {
                continue;
            }
            hot.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            hot.truncate(MAX_HOT);
            out.insert(
                by.name().to_owned(),
                hot.into_iter().map(|(_, i)| i).collect(),
            );
        }
        self.cached = Some((now_s, out.clone()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: u64, bytes: u64) -> Counts {
        Counts {
            requests,
            bytes_out: bytes,
            ..Counts::default()
        }
    }

    #[test]
    fn places_spread_over_every_row_within_bounds() {
        let mut mac = [0u8; 32];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = (i * 37 + 11) as u8;
        }
        let p = Place::from_mac(&mac);
        for (row, c) in p.cells.iter().enumerate() {
            assert_eq!(*c as usize / WIDTH, row);
        }
        assert!(p.rank < 10_000);
        mac = [0xff; 32];
        let p = Place::from_mac(&mac);
        assert!(p.cells.iter().all(|&c| c < CELLS));
    }

    fn place(cols: [u32; ROWS]) -> Place {
        let mut cells = cols;
        for (row, c) in cells.iter_mut().enumerate() {
            *c += (row * WIDTH) as u32;
        }
        Place { rank: 0, cells }
    }

    /// A client with 60 requests a minute over three agents (20 each, each quiet locally)
    /// turns its cells hot at a threshold of 50; one with 10 in all does not.
    #[test]
    fn the_fleet_sum_names_a_thin_client_and_not_a_quiet_one() {
        let thin = place([1, 2, 3, 4]);
        let quiet = place([9, 10, 11, 12]);
        let mut fleet = FleetSketch::new(SketchConfig {
            hot_requests_per_minute: 50,
            hot_bytes_per_minute: 0,
        });
        let now = 1_000_000;
        for agent in 0..3u64 {
            let mut b = Builder::default();
            b.add(&thin, &counts(20, 2000));
            if agent == 0 {
                b.add(&quiet, &counts(10, 1000));
            }
            let sketch = BTreeMap::from([("address".to_owned(), b.finish())]);
            fleet.add(now - 20, &sketch, now);
        }
        let hot = fleet.hot(now);
        let agent = Hot::default();
        agent.set(&hot, now);
        let cur = agent.current(now);
        assert!(all_hot(cur.get(&By::Address), &thin), "{hot:?}");
        assert!(!all_hot(cur.get(&By::Address), &quiet), "{hot:?}");
        assert!(!all_hot(cur.get(&By::Identity), &thin));
        // Forgotten once the collector stops naming them, and once the period ages out.
        assert!(agent.current(now + HOT_TTL_SECS).is_empty());
        assert!(fleet.hot(now + WINDOW_SECS + 20).is_empty());
        // Far-future periods (a hostile agent's clock) are not kept.
        let mut b = Builder::default();
        b.add(&thin, &counts(1000, 0));
        let sketch = BTreeMap::from([("address".to_owned(), b.finish())]);
        for ahead in 1..100 {
            fleet.add(now + MAX_AHEAD_SECS + 10 * ahead, &sketch, now);
        }
        assert!(fleet.periods.is_empty());
    }

    #[test]
    fn hostile_answers_are_bounded() {
        let hot = HotCells::from([
            ("address".to_owned(), (0..CELLS + 100).rev().collect()),
            ("nonsense".to_owned(), vec![1]),
        ]);
        let agent = Hot::default();
        agent.set(&hot, 0);
        let cur = agent.current(0);
        assert_eq!(cur.len(), 1);
        assert_eq!(cur[&By::Address].len(), MAX_HOT);
        assert!(cur[&By::Address].iter().all(|&i| i < CELLS));
    }
}
