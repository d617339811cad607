//! What the fleet tests share (tests/tests/collector.rs over HTTPS, tests/tests/nats.rs over
//! JetStream): ground truth summed over hosts, fleet rows, and the traffic of the thin-client
//! test (a client below every host's `top_clients` cut, found by the summaries' sketch).

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{ClientTruth, Nginx, SMALL, Transfer, curl, op, per_client};

/// Ground truth per client address summed over hosts, from each host's nginx.
pub fn fleet_truth(parts: &[(&Nginx, &[Transfer])]) -> ClientTruth {
    let mut sum = ClientTruth::new();
    for (nginx, transfers) in parts {
        let truth = nginx.truth(transfers);
        for (client, t) in per_client(&truth, transfers, str::to_owned) {
            let e = sum.entry(client).or_default();
            e.0 += t.0;
            e.1 += t.1;
            e.2 += t.2;
            e.3 += t.3;
        }
    }
    sum
}

/// (bytes in, bytes out, requests, connections) of a client in a fleet view.
pub type Row = (u64, u64, u64, u64);

/// `client`'s [`Row`] in a fleet view's rows.
pub fn fleet_row(rows: &[Value], client: &str) -> Option<Row> {
    let r = rows.iter().find(|r| r["client"] == client)?;
    let n = |k: &str| r[k].as_u64().unwrap_or(u64::MAX);
    Some((
        n("bytes_in"),
        n("bytes_out"),
        n("requests"),
        n("connections"),
    ))
}

/// `n` requests for the small file from `source` to nginx on `port` (one connection).
pub fn requests_to(port: u16, source: &str, n: usize) -> Vec<Transfer> {
    let url = format!("http://127.0.0.1:{port}/{}", SMALL.0);
    let ops: Vec<Vec<String>> = (0..n)
        .map(|_| op(&["--interface", source, url.as_str()]))
        .collect();
    curl(Command::new("curl"), &ops)
}

/// The thin-client traffic, on every host at once, once a second: 6 requests from each of
/// two heavy clients (each host's top two with `top_clients = 2`), 2 from the thin one (about
/// 120 a minute per host, 360 over three hosts: past a hot threshold of 150 only summed
/// over the fleet) and 1 every other round from a quiet one (about 90 a minute over three
/// hosts: below it).
pub struct ThinTraffic(Traffic);

/// Traffic in the background, one driver thread per nginx port: `round(port, n)` every
/// `every` (round n = 0, 1, ...) until stopped.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    drivers: Vec<JoinHandle<Vec<Transfer>>>,
}

impl Traffic {
    pub fn start<F>(ports: &[u16], every: Duration, round: F) -> Self
    where
        F: Fn(u16, u64) -> Vec<Transfer> + Clone + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let drivers = ports
            .iter()
            .map(|&port| {
                let stop = stop.clone();
                let round = round.clone();
                std::thread::spawn(move || {
                    let mut all = Vec::new();
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let started = Instant::now();
                        all.extend(round(port, n));
                        n += 1;
                        std::thread::sleep(every.saturating_sub(started.elapsed()));
                    }
                    all
                })
            })
            .collect();
        Self { stop, drivers }
    }

    /// Stops after the current round; each port's transfers, in `start`'s order.
    pub fn stop(self) -> Vec<Vec<Transfer>> {
        self.stop.store(true, Ordering::SeqCst);
        self.drivers
            .into_iter()
            .map(|d| d.join().expect("traffic driver"))
            .collect()
    }
}

impl ThinTraffic {
    pub const THIN: &str = "127.0.0.77";
    pub const QUIET: &str = "127.0.0.88";
    pub const HEAVY: [&str; 2] = ["127.0.0.101", "127.0.0.102"];
    /// The agents' own request rule (a minute): every client here stays below it on each
    /// host, as a thin client does. A client that crossed it would be named through the
    /// agent's early part of its period, not found by the sketch.
    pub const HOST_FLOOD: u32 = 1000;
    /// The collector's `[sketch]` thresholds and the fleet rule the thin client crosses.
    pub const COLLECTOR: &str = "[sketch]\nhot_requests_per_minute = 150\nhot_bytes_per_minute = 0\n\n\
         [[detect.rules]]\nid = \"fleet-flood\"\nname = \"Request flood over several hosts\"\n\
         keys = [\"address\"]\nseverity = \"high\"\n\
         when = [{ metric = \"requests\", window = \"1m\", op = \">\", value = 100 }]\n";

    /// The agents' `[ship]` keys that put the thin client below every host's cut, and the
    /// fleet's shared identity secret (written into `dir`): it keys the sketch cells, the same
    /// on every host, as deployed.
    pub fn agent_config(dir: &std::path::Path) -> String {
        let secret = dir.join("identity.key");
        std::fs::write(&secret, "fleet-identity-secret-0123456789").expect("secret");
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        format!(
            "top_clients = 2\nsample_percent = 0\n\n[identity]\nsecret_file = \"{}\"\n",
            secret.display()
        )
    }

    pub fn start(ports: &[u16]) -> Self {
        Self(Traffic::start(
            ports,
            Duration::from_secs(1),
            |port, round| {
                let mut all = Vec::new();
                for heavy in Self::HEAVY {
                    all.extend(requests_to(port, heavy, 6));
                }
                all.extend(requests_to(port, Self::THIN, 2));
                if round.is_multiple_of(2) {
                    all.extend(requests_to(port, Self::QUIET, 1));
                }
                all
            },
        ))
    }

    /// Stops after the current round; each host's transfers, in `start`'s order.
    pub fn stop(self) -> Vec<Vec<Transfer>> {
        self.0.stop()
    }

    /// The thin client's fleet row and the fleet alert on it, once both exist.
    pub fn found(rows: &[Value], alerts: &Value) -> Result<(Row, Value), String> {
        let thin = fleet_row(rows, Self::THIN).ok_or("the thin client is not named yet")?;
        alerts
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|a| a["rule_id"] == "fleet-flood" && a["key"] == Self::THIN)
                    .cloned()
            })
            .map(|a| (thin, a))
            .ok_or_else(|| format!("fleet row {thin:?}, no alert yet"))
    }

    /// Checks the fleet view once the last periods are merged: the thin client named with
    /// no more than nginx's count, the quiet one still folded, the heavy ones exact.
    pub fn check_rows(rows: &[Value], truth: &ClientTruth) {
        let thin = fleet_row(rows, Self::THIN).expect("thin row");
        assert!(
            thin.2 <= truth[Self::THIN].2,
            "named counts never exceed the truth: {thin:?} vs {:?}",
            truth[Self::THIN]
        );
        assert!(
            fleet_row(rows, Self::QUIET).is_none(),
            "the quiet client (~90 a minute over the fleet) stays folded: {rows:?}"
        );
        for heavy in Self::HEAVY {
            assert_eq!(
                fleet_row(rows, heavy),
                Some(truth[heavy]),
                "{heavy}: top clients exact"
            );
        }
    }
}

/// The partition of a client key, as agents and collectors compute it (docs/fleet.md,
/// "Partitions": MurmurHash3's 64-bit finalizer of FNV-1a-64 of `kind ++ "\0" ++ key`,
/// modulo `partitions`). Written out again here, not imported: the tests pick client
/// addresses per partition with it, and it is pinned below by the sensor's own vector.
pub fn partition_of(kind: &str, key: &str, partitions: u32) -> u32 {
    if partitions <= 1 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in kind.bytes().chain(std::iter::once(0)).chain(key.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    u32::try_from(h % u64::from(partitions)).expect("below partitions")
}

/// `per` loopback client addresses (127.0.1.x) in each of `partitions` partitions, by
/// partition: traffic from all of them reaches every partition.
pub fn sources_by_partition(partitions: u32, per: usize) -> Vec<Vec<String>> {
    let mut out = vec![Vec::new(); partitions as usize];
    for x in 1..=254u32 {
        let source = format!("127.0.1.{x}");
        let p = partition_of("address", &source, partitions) as usize;
        if out[p].len() < per {
            out[p].push(source);
        }
        if out.iter().all(|s| s.len() == per) {
            return out;
        }
    }
    panic!("127.0.1.0/24 does not give {per} addresses in each of {partitions} partitions");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same values as the sensor's `the_function_is_fnv1a_of_kind_zero_key`.
    #[test]
    fn the_partition_function_is_the_sensors() {
        let keys = [
            ("address", "10.0.0.1"),
            ("address", "10.0.0.2"),
            ("group", "10.0.0.0/24"),
            ("identity", "k-0123456789ab"),
            ("forwarded", "2001:db8::1"),
        ];
        let got: Vec<u32> = keys.iter().map(|(k, v)| partition_of(k, v, 16)).collect();
        assert_eq!(got, [9, 10, 15, 15, 12]);
        assert_eq!(partition_of("address", "10.0.0.1", 1), 0);
    }

    #[test]
    fn sources_cover_every_partition() {
        let s = sources_by_partition(4, 2);
        for (p, sources) in s.iter().enumerate() {
            assert_eq!(sources.len(), 2);
            for a in sources {
                assert_eq!(partition_of("address", a, 4) as usize, p);
            }
        }
    }
}
