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
    collections::{BTreeMap, HashMap},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use serde::{Deserialize, Serialize};

use crate::model::{aggregate::Counts, keys::By};

/// Rows of the sketch (independent hash functions).
pub const ROWS: usize = 4;
/// Cells per row.
pub const WIDTH: usize = 1024;
/// Cells of a sketch in all: indices are `row * WIDTH + column`.
pub const CELLS: u32 = (ROWS * WIDTH) as u32;
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

/// Header on the hot cells' messages of a collector that takes early parts of periods
/// ([`super::early`]); agents of an earlier version ignore it.
pub const PARTS_HEADER: &str = "Sensor-Parts";
/// How long an answer saying the collector takes early parts holds (HTTPS answers come with
/// every batch; the hot cells every `HOT_PUBLISH_SECS`, three of which may be missed).
pub const PARTS_TTL_SECS: u64 = 3 * HOT_PUBLISH_SECS;

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

/// The hot cells per key kind, hottest first, as the collector names them back.
pub type HotCells = BTreeMap<String, Vec<u32>>;

/// What the collector says on the NATS hot subject: the hot cells per sketch key (agents
/// sharing an identity secret share a key; each agent takes its own).
pub type HotByKey = BTreeMap<String, HotCells>;

/// The agent's copy of the collector's hot cells, set from each answer, shared between the
/// shipping sink (which receives them) and the summaries (which use them). Also whether the
/// collector reads sketches at all: until one says so, summaries carry none (a collector of
/// an earlier version refuses fields it does not know).
#[derive(Debug, Default)]
pub struct Hot {
    state: Mutex<HotState>,
    supported: AtomicBool,
    /// Until when the collector is known to take early parts of periods ([`super::early`]):
    /// renewed by its answers and hot-cell messages, so a collector rolled back to an earlier
    /// version (or an older partition holder) is not sent parts for long. On the monotonic
    /// clock: the agent's own runs sped up in evaluations (`time_scale`).
    parts_until: Mutex<Option<std::time::Instant>>,
    /// This agent's sketch key: which cells of the NATS hot subject are its.
    key: Mutex<String>,
}

#[derive(Debug, Default)]
struct HotState {
    /// Per kind: cell -> its place in the collector's hottest-first list.
    cells: HashMap<By, HashMap<u32, u32>>,
    until_s: u64,
}

impl Hot {
    /// The collector reads sketches (said by its answers, or by publishing hot cells).
    pub fn set_supported(&self) {
        self.supported.store(true, Ordering::Relaxed);
    }

    pub fn supported(&self) -> bool {
        self.supported.load(Ordering::Relaxed)
    }

    /// The collector said it takes early parts (its answers, or a header on the hot cells it
    /// publishes), or did not (an answer without it): for the next `PARTS_TTL_SECS`.
    pub fn set_takes_parts(&self, takes: bool) {
        if let Ok(mut until) = self.parts_until.lock() {
            *until = takes.then(|| {
                std::time::Instant::now() + std::time::Duration::from_secs(PARTS_TTL_SECS)
            });
        }
    }

    pub fn takes_parts(&self) -> bool {
        self.parts_until
            .lock()
            .is_ok_and(|u| u.is_some_and(|u| std::time::Instant::now() < u))
    }

    pub fn set_key(&self, key: &str) {
        if let Ok(mut k) = self.key.lock() {
            key.clone_into(&mut k);
        }
    }

    /// Takes this agent's cells from what the collector publishes over NATS.
    pub fn set_from(&self, all: &HotByKey, now_s: u64) {
        self.set_supported();
        let key = self.key.lock().map(|k| k.clone()).unwrap_or_default();
        self.set(all.get(&key).unwrap_or(&HotCells::new()), now_s);
    }

    /// Replaces the hot cells with the collector's latest answer (kinds and indices it does
    /// not know are ignored).
    pub fn set(&self, hot: &HotCells, now_s: u64) {
        let cells = hot
            .iter()
            .filter_map(|(kind, v)| {
                let by = By::parse(kind)?;
                let mut places = HashMap::new();
                for (pos, &i) in v.iter().filter(|&&i| i < CELLS).enumerate() {
                    places.entry(i).or_insert(pos as u32);
                }
                Some((by, places))
            })
            .collect();
        if let Ok(mut s) = self.state.lock() {
            *s = HotState {
                cells,
                until_s: now_s + HOT_TTL_SECS,
            };
        }
    }

    /// The hot cells in force at `now_s` (none once they expired).
    pub fn current(&self, now_s: u64) -> HashMap<By, HashMap<u32, u32>> {
        match self.state.lock() {
            Ok(s) if now_s < s.until_s => s.cells.clone(),
            _ => HashMap::new(),
        }
    }
}

/// When every cell of `place` is hot: how hot the client is, as the place of its coolest
/// cell in the collector's hottest-first list (lower: hotter).
pub fn heat_rank(hot: Option<&HashMap<u32, u32>>, place: &Place) -> Option<u32> {
    let hot = hot?;
    place
        .cells
        .iter()
        .map(|c| hot.get(c).copied())
        .try_fold(0, |worst, p| p.map(|p| worst.max(p)))
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
/// Period start -> key kind -> cells.
type Periods = BTreeMap<u64, HashMap<By, Sums>>;

/// Sketch keys (fleets of agents with different identity secrets) summed apart, at most.
pub const MAX_SKETCH_KEYS: usize = 8;

/// The collector's sum of the agents' sketches over the last minute, per sketch key.
#[derive(Debug, Clone, Default)]
pub struct FleetSketch {
    config: SketchConfig,
    keys: BTreeMap<String, Periods>,
    /// The last answers and the second they were computed in (at most once a second).
    cached: Option<(u64, HotByKey)>,
    /// Sketches not added: too late, too far ahead, or of a sketch key past the bound.
    pub ignored: u64,
}

/// Per row, the median requests and bytes of its cells (empty cells count as 0).
fn row_medians(cells: &Sums) -> [(u64, u64); ROWS] {
    let mut rows: [(Vec<u64>, Vec<u64>); ROWS] = Default::default();
    for (i, (r, b)) in cells {
        if let Some(row) = rows.get_mut(*i as usize / WIDTH) {
            row.0.push(*r);
            row.1.push(*b);
        }
    }
    let median = |mut v: Vec<u64>| -> u64 {
        // Fewer than half the cells hold anything: the median is an empty cell.
        if v.len() <= WIDTH / 2 {
            return 0;
        }
        let missing = WIDTH - v.len();
        let k = WIDTH / 2 - missing;
        *v.select_nth_unstable(k).1
    };
    let mut out = [(0, 0); ROWS];
    for (o, (r, b)) in out.iter_mut().zip(rows) {
        *o = (median(r), median(b));
    }
    out
}

/// The first period start of the window at `now_s`: the last six complete periods.
fn window_start(now_s: u64) -> u64 {
    (now_s / super::PERIOD_SECS * super::PERIOD_SECS).saturating_sub(WINDOW_SECS)
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
    /// ingest), under the agents' sketch key. Only periods of the window are kept, and ones
    /// at most `MAX_AHEAD_SECS` in the collector's future (agents' clocks differ a little; a
    /// hostile agent's far-future periods would otherwise pile up).
    pub fn add(
        &mut self,
        key: &str,
        start_s: u64,
        sketch: &BTreeMap<String, Vec<Cell>>,
        now_s: u64,
    ) {
        if !self.enabled() || sketch.is_empty() {
            return;
        }
        if start_s < window_start(now_s)
            || start_s > now_s + MAX_AHEAD_SECS
            || (!self.keys.contains_key(key) && self.keys.len() >= MAX_SKETCH_KEYS)
        {
            self.ignored += 1;
            return;
        }
        let period = self
            .keys
            .entry(key.to_owned())
            .or_default()
            .entry(start_s)
            .or_default();
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

    /// The hot cells of every sketch key over the window, hottest first.
    pub fn hot_all(&mut self, now_s: u64) -> HotByKey {
        if !self.enabled() {
            return HotByKey::new();
        }
        if let Some((at, hot)) = &self.cached
            && *at == now_s
        {
            return hot.clone();
        }
        let oldest = window_start(now_s);
        let (rq, bq) = (
            self.config.hot_requests_per_minute,
            self.config.hot_bytes_per_minute,
        );
        // How far past its threshold a cell is, above its row's median (the larger of the
        // two measures): every cell of a row holds some 1/WIDTH of all clients, and on a
        // busy fleet that floor alone passes a threshold; what stands above it is the
        // cell's own heavy client (count-mean-min).
        let heat = |r: u64, b: u64, floor: (u64, u64)| -> f64 {
            let f = |v: u64, floor: u64, t: u64| {
                if t == 0 {
                    0.0
                } else {
                    v.saturating_sub(floor) as f64 / t as f64
                }
            };
            f(r, floor.0, rq).max(f(b, floor.1, bq))
        };
        let mut all = HotByKey::new();
        self.keys.retain(|_, periods| {
            *periods = periods.split_off(&oldest);
            !periods.is_empty()
        });
        for (key, periods) in &self.keys {
            let mut sums: HashMap<By, Sums> = HashMap::new();
            for kinds in periods.range(..=now_s).map(|(_, k)| k) {
                for (by, cells) in kinds {
                    let t = sums.entry(*by).or_default();
                    for (i, (r, b)) in cells {
                        let e = t.entry(*i).or_default();
                        e.0 = e.0.saturating_add(*r);
                        e.1 = e.1.saturating_add(*b);
                    }
                }
            }
            let mut out = HotCells::new();
            for (by, cells) in sums {
                let floors = row_medians(&cells);
                let mut hot: Vec<(f64, u32)> = cells
                    .into_iter()
                    .map(|(i, (r, b))| (heat(r, b, floors[i as usize / WIDTH]), i))
                    .filter(|(h, _)| *h >= 1.0)
                    .collect();
                if hot.is_empty() {
                    continue;
                }
                hot.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                out.insert(
                    by.name().to_owned(),
                    hot.into_iter().map(|(_, i)| i).collect(),
                );
            }
            if !out.is_empty() {
                all.insert(key.clone(), out);
            }
        }
        self.cached = Some((now_s, all.clone()));
        all
    }

    /// The hot cells of one sketch key.
    pub fn hot(&mut self, key: &str, now_s: u64) -> HotCells {
        self.hot_all(now_s).remove(key).unwrap_or_default()
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
        let now = 1_000_005;
        for agent in 0..3u64 {
            let mut b = Builder::default();
            b.add(&thin, &counts(20, 2000));
            if agent == 0 {
                b.add(&quiet, &counts(10, 1000));
            }
            let sketch = BTreeMap::from([("address".to_owned(), b.finish())]);
            fleet.add("k1", now - 25, &sketch, now);
        }
        let hot = fleet.hot("k1", now);
        assert!(
            fleet.hot("k2", now).is_empty(),
            "another sketch key has its own cells"
        );
        let agent = Hot::default();
        agent.set(&hot, now);
        let cur = agent.current(now);
        assert_eq!(heat_rank(cur.get(&By::Address), &thin), Some(3), "{hot:?}");
        assert_eq!(heat_rank(cur.get(&By::Address), &quiet), None, "{hot:?}");
        assert_eq!(heat_rank(cur.get(&By::Identity), &thin), None);
        // Forgotten once the collector stops naming them, and once the period ages out.
        assert!(agent.current(now + HOT_TTL_SECS).is_empty());
        assert!(fleet.hot("k1", now + WINDOW_SECS + 20).is_empty());
        // Too old, far-future (a hostile agent's clock) and past the key bound: not kept.
        let mut b = Builder::default();
        b.add(&thin, &counts(1000, 0));
        let sketch = BTreeMap::from([("address".to_owned(), b.finish())]);
        for ahead in 1..100 {
            fleet.add("k1", now + MAX_AHEAD_SECS + 10 * ahead, &sketch, now);
        }
        fleet.add("k1", now - WINDOW_SECS - 10, &sketch, now);
        for k in 0..MAX_SKETCH_KEYS + 5 {
            fleet.add(&format!("x{k}"), now - 5, &sketch, now);
        }
        assert_eq!(fleet.keys.len(), MAX_SKETCH_KEYS);
        assert!(fleet.keys.values().all(|p| p.len() == 1));
        assert_eq!(fleet.ignored, 99 + 1 + 5);
    }

    /// On a busy fleet every cell holds thousands of requests a minute (far past the
    /// threshold); what stands above its row's median is the thin client's.
    #[test]
    fn a_thin_client_stands_out_of_a_busy_fleets_floor() {
        let mut fleet = FleetSketch::new(SketchConfig {
            hot_requests_per_minute: 150,
            hot_bytes_per_minute: 0,
        });
        let now = 2_000_005;
        let thin = place([7, 8, 9, 10]);
        let mut b = Builder::default();
        for col in 0..WIDTH as u32 {
            // 1000 requests in every cell of every row: the floor.
            b.add(&place([col; ROWS]), &counts(1000, 0));
        }
        b.add(&thin, &counts(400, 0));
        let sketch = BTreeMap::from([("identity".to_owned(), b.finish())]);
        fleet.add("k", now - 15, &sketch, now);
        let hot = fleet.hot("k", now);
        let agent = Hot::default();
        agent.set(&hot, now);
        let cur = agent.current(now);
        assert_eq!(
            hot["identity"].len(),
            ROWS,
            "only the thin client's cells: {hot:?}"
        );
        assert_eq!(heat_rank(cur.get(&By::Identity), &thin), Some(3));
        assert_eq!(
            heat_rank(cur.get(&By::Identity), &place([1, 2, 3, 4])),
            None
        );
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
        assert_eq!(cur[&By::Address].len(), CELLS as usize);
        assert!(cur[&By::Address].keys().all(|&i| i < CELLS));
    }
}
