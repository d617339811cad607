//! Partitions of the fleet's records by client key, for several collectors sharing the work
//! (docs/fleet.md, "Several collectors"): every record of a client lands in one partition,
//! merged by one collector at a time, so that client's fleet totals are whole there.
//!
//! The function is fixed and not secret (FNV-1a of `<kind>\0<key>`, mixed by MurmurHash3's
//! finalizer, modulo the number of partitions): agents and collectors
//! must compute the same partition without sharing anything, and it must never change for a
//! given `partitions` (records of one client merged by two partitions would be counted
//! apart). A test pins it with known values.
//!
//! [`split`] cuts one batch's records into the messages of each partition: a summary's rows
//! go to their partitions (every partition gets the summary, rows or not), its `rest` and
//! sketch to partition 0 with `elsewhere` (what the sketch covers but partition 0 does not
//! carry), an alert to the partition of its key.

use std::collections::BTreeMap;

use super::{Payload, ShipRecord, Summary};
use crate::model::aggregate::Counts;

/// Most partitions a fleet may have: each is a stream and a lease; beyond this the fixed
/// costs (streams, consumers, per-period empty summaries) outgrow any gain.
pub const MAX_PARTITIONS: u32 = 64;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a (64 bits) of `kind`, a zero byte and `key`: the zero keeps `("ab", "c")` and
/// `("a", "bc")` apart.
fn fnv1a(kind: &str, key: &str) -> u64 {
    kind.bytes()
        .chain(std::iter::once(0))
        .chain(key.bytes())
        .fold(FNV_OFFSET, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(FNV_PRIME)
        })
}

/// The partition (0..partitions) of the client `key` of kind `kind` (`address`, `group`,
/// `identity`, `forwarded`, or `ring` for an agent's ring alert). 0 and 1 partitions: 0.
pub fn partition_of(kind: &str, key: &str, partitions: u32) -> u32 {
    if partitions <= 1 {
        return 0;
    }
    // The remainder is below `partitions`, a u32: the conversion cannot fail.
    u32::try_from(fmix64(fnv1a(kind, key)) % u64::from(partitions)).unwrap_or(0)
}

/// MurmurHash3's 64-bit finalizer: FNV-1a alone mixes the last bytes poorly (its low bits
/// depend only on the low bits of each byte, its high bits barely on the last ones), and
/// keys differ mostly in their last bytes (addresses in a network).
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The batch's first and last positions, on every partition's message.
pub const POSITIONS_HEADER: &str = "Sensor-Positions";

/// The subject an agent publishes partition `p` on: `<prefix>.<agent>` unpartitioned (as
/// before partitions existed), else `<prefix>.p<N>.<agent>`. The partition comes before the
/// agent so that one filter, `<prefix>.p<N>.>`, holds every agent (names may have dots).
pub fn partition_subject(prefix: &str, agent: &str, partitions: u32, p: u32) -> String {
    if partitions <= 1 {
        format!("{prefix}.{agent}")
    } else {
        format!("{prefix}.p{p}.{agent}")
    }
}

/// The stream of partition `p`: `<stream>` unpartitioned, else `<stream>-p<N>`.
pub fn partition_stream(stream: &str, partitions: u32, p: u32) -> String {
    if partitions <= 1 {
        stream.to_owned()
    } else {
        format!("{stream}-p{p}")
    }
}

/// The partition and agent a subject names: `<prefix>.<agent>` unpartitioned,
/// `<prefix>.p<N>.<agent>` (N below `partitions`) else. `None`: not such a subject, or not
/// a valid agent name (the collector refuses the message).
pub fn parse_subject<'s>(
    prefix: &str,
    partitions: u32,
    subject: &'s str,
) -> Option<(u32, &'s str)> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let (p, agent) = if partitions <= 1 {
        (0, rest)
    } else {
        let (token, agent) = rest.split_once('.')?;
        let p: u32 = token.strip_prefix('p')?.parse().ok()?;
        // Only the canonical spelling (`p7`, not `p07`) and only partitions that exist.
        if p >= partitions || format!("p{p}") != token {
            return None;
        }
        (p, agent)
    };
    super::valid_name(agent).then_some((p, agent))
}

/// The records of each partition's message, by partition (an empty one: no message). With
/// one partition the records are returned as they are.
///
/// Every record keeps its id and position, so each partition sees a subsequence of the
/// agent's positions; summaries keep their period in every partition.
pub fn split(records: &[ShipRecord], partitions: u32) -> Vec<Vec<ShipRecord>> {
    let n = partitions.max(1) as usize;
    if n == 1 {
        return vec![records.to_vec()];
    }
    let mut out: Vec<Vec<ShipRecord>> = vec![Vec::new(); n];
    for rec in records {
        match &rec.payload {
            Payload::Alert { alert, .. } => {
                let p = partition_of(&alert.key_kind, &alert.key, partitions) as usize;
                out[p].push(rec.clone());
            }
            Payload::Summary(s) => {
                for (p, part) in split_summary(s, partitions).into_iter().enumerate() {
                    out[p].push(ShipRecord {
                        id: rec.id.clone(),
                        seq: rec.seq,
                        payload: Payload::Summary(part),
                    });
                }
            }
        }
    }
    out
}

/// Why a record does not belong in partition `p`'s message (None: it does), as [`split`]
/// builds them. The collector refuses such a message: keys must stay disjoint across
/// partitions (the fleet view's top is exact only then), and the remainder, the sketch
/// and its `elsewhere` sums travel with partition 0 only.
pub fn misplaced(rec: &ShipRecord, partitions: u32, p: u32) -> Option<String> {
    if partitions <= 1 {
        return None;
    }
    match &rec.payload {
        Payload::Alert { alert, .. } => {
            let want = partition_of(&alert.key_kind, &alert.key, partitions);
            (want != p).then(|| {
                format!(
                    "alert on {} `{}` belongs to partition {want}",
                    alert.key_kind, alert.key
                )
            })
        }
        Payload::Summary(s) => {
            if let Some(c) = s
                .clients
                .iter()
                .find(|c| partition_of(&c.by, &c.key, partitions) != p)
            {
                return Some(format!(
                    "row {} `{}` belongs to partition {}",
                    c.by,
                    c.key,
                    partition_of(&c.by, &c.key, partitions)
                ));
            }
            (p != 0 && !(s.rest.is_empty() && s.sketch.is_empty() && s.elsewhere.is_empty()))
                .then(|| "a remainder or sketch outside partition 0".to_owned())
        }
    }
}

/// One summary as `partitions` parts: each part the rows of its partition; `rest`, the
/// sketch and its key in part 0, with `elsewhere` when there is a sketch to check.
fn split_summary(s: &Summary, partitions: u32) -> Vec<Summary> {
    let n = partitions.max(1) as usize;
    let mut parts: Vec<Summary> = (0..n)
        .map(|_| Summary {
            start_s: s.start_s,
            period_s: s.period_s,
            clients: Vec::new(),
            rest: BTreeMap::new(),
            sketch: BTreeMap::new(),
            sketch_key: String::new(),
            elsewhere: BTreeMap::new(),
        })
        .collect();
    let mut elsewhere: BTreeMap<String, Counts> = BTreeMap::new();
    for c in &s.clients {
        let p = partition_of(&c.by, &c.key, partitions) as usize;
        if p != 0 {
            *elsewhere.entry(c.by.clone()).or_default() += c.counts;
        }
        parts[p].clients.push(c.clone());
    }
    let first = &mut parts[0];
    first.rest.clone_from(&s.rest);
    first.sketch_key.clone_from(&s.sketch_key);
    if !s.sketch.is_empty() {
        first.sketch.clone_from(&s.sketch);
        // Kinds whose rows all stayed in partition 0 have nothing elsewhere.
        elsewhere.retain(|_, c| !c.is_zero());
        first.elsewhere = elsewhere;
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ship::ClientDelta;

    /// Pinned: agents and collectors of different versions must agree for ever.
    #[test]
    fn every_part_of_a_split_is_in_its_place_and_nothing_else_is() {
        let records: Vec<ShipRecord> = (0..40u64)
            .map(|i| {
                let mut r = ShipRecord::summary(
                    "a",
                    Summary {
                        start_s: 1_800_000_000 + i * 10,
                        period_s: 10,
                        clients: (0..30)
                            .map(|k| ClientDelta {
                                by: "address".into(),
                                key: format!("10.0.{i}.{k}"),
                                counts: Counts {
                                    requests: 1,
                                    ..Counts::default()
                                },
                                open_connections: 0,
                                identity: None,
                                forwarded: None,
                            })
                            .collect(),
                        rest: BTreeMap::from([(
                            "address".into(),
                            Counts {
                                requests: 3,
                                ..Counts::default()
                            },
                        )]),
                        sketch: BTreeMap::new(),
                        sketch_key: String::new(),
                        elsewhere: BTreeMap::new(),
                    },
                );
                r.seq = i + 1;
                r
            })
            .collect();
        for (p, part) in (0..).zip(split(&records, 4)) {
            for rec in &part {
                assert_eq!(misplaced(rec, 4, p), None, "partition {p}");
                // The same record in any other partition's message is refused.
                for other in (0..4).filter(|o| *o != p) {
                    let has_rows =
                        matches!(&rec.payload, Payload::Summary(s) if !s.clients.is_empty());
                    let has_rest =
                        matches!(&rec.payload, Payload::Summary(s) if !s.rest.is_empty());
                    if has_rows || (has_rest && other != 0) {
                        assert!(misplaced(rec, 4, other).is_some(), "{p} in {other}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_function_is_fnv1a_of_kind_zero_key() {
        // FNV-1a 64 of the empty input is its offset basis; of "a", the published value.
        assert_eq!(
            "".bytes().fold(FNV_OFFSET, |h, b| (h ^ u64::from(b))
                .wrapping_mul(FNV_PRIME)),
            0xcbf2_9ce4_8422_2325
        );
        assert_eq!(
            "a".bytes().fold(FNV_OFFSET, |h, b| (h ^ u64::from(b))
                .wrapping_mul(FNV_PRIME)),
            0xaf63_dc4c_8601_ec8c
        );
        // The zero byte between kind and key.
        assert_ne!(fnv1a("ab", "c"), fnv1a("a", "bc"));
        assert_eq!(fmix64(fnv1a("address", "10.0.0.1")), 0x9ac6_356c_d928_7f79);
        assert_eq!(partition_of("address", "10.0.0.1", 1), 0);
        assert_eq!(partition_of("address", "10.0.0.1", 0), 0);
        let pinned: Vec<u32> = [
            ("address", "10.0.0.1"),
            ("address", "10.0.0.2"),
            ("group", "10.0.0.0/24"),
            ("identity", "k-0123456789ab"),
            ("forwarded", "2001:db8::1"),
        ]
        .iter()
        .map(|(kind, key)| partition_of(kind, key, 16))
        .collect();
        let by_hand: Vec<u32> = [
            ("address", "10.0.0.1"),
            ("address", "10.0.0.2"),
            ("group", "10.0.0.0/24"),
            ("identity", "k-0123456789ab"),
            ("forwarded", "2001:db8::1"),
        ]
        .iter()
        .map(|(kind, key)| {
            let mut h = FNV_OFFSET;
            for b in format!("{kind}\0{key}").bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(FNV_PRIME);
            }
            (fmix64(h) % 16) as u32
        })
        .collect();
        assert_eq!(pinned, by_hand);
        assert_eq!(pinned, PINNED_16);
    }

    /// The partitions (of 16) of the keys above: fixed for ever.
    const PINNED_16: [u32; 5] = [9, 10, 15, 15, 12];

    /// Keys spread over the partitions (not all in one).
    #[test]
    fn keys_spread_over_partitions() {
        let mut seen = [0u32; 8];
        for i in 0..8000u32 {
            let [_, _, a, b] = i.to_be_bytes();
            seen[partition_of("address", &format!("10.1.{a}.{b}"), 8) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (900..1100).contains(&n)), "{seen:?}");
    }

    fn row(by: &str, key: &str, requests: u64) -> ClientDelta {
        ClientDelta {
            by: by.into(),
            key: key.into(),
            counts: Counts {
                requests,
                bytes_in: 10 * requests,
                bytes_out: 100 * requests,
                ..Counts::default()
            },
            open_connections: requests % 3,
            identity: None,
            forwarded: None,
        }
    }

    fn summary_record(seq: u64, rows: Vec<ClientDelta>, sketch: bool) -> ShipRecord {
        let rest = BTreeMap::from([(
            "address".to_owned(),
            Counts {
                requests: 7,
                ..Counts::default()
            },
        )]);
        ShipRecord {
            seq,
            ..ShipRecord::summary(
                "host-a",
                Summary {
                    start_s: 1_800_000_000 + 10 * seq,
                    period_s: 10,
                    clients: rows,
                    rest,
                    sketch: if sketch {
                        BTreeMap::from([("address".to_owned(), vec![(0, 1, 2)])])
                    } else {
                        BTreeMap::new()
                    },
                    sketch_key: if sketch { "00ff".into() } else { String::new() },
                    elsewhere: BTreeMap::new(),
                },
            )
        }
    }

    fn alert_record(seq: u64, kind: &str, key: &str) -> ShipRecord {
        let alert = crate::sinks::tests::alert(kind, key);
        let e = crate::detect::AlertEvent {
            event: crate::detect::EventKind::Open,
            alert: alert.into(),
        };
        ShipRecord {
            seq,
            ..ShipRecord::alert("host-a", &e)
        }
    }

    fn rows(n: u64) -> Vec<ClientDelta> {
        (0..n)
            .flat_map(|i| {
                [
                    row("address", &format!("10.0.{}.{}", i / 256, i % 256), i + 1),
                    row("identity", &format!("k-{i:012x}"), 2 * i + 1),
                ]
            })
            .collect()
    }

    /// Every row lands in exactly one partition (its own), the per-kind sums are those of
    /// the whole, `rest` and the sketch stay in partition 0, every partition gets every
    /// summary's period and position, and alerts go to their key's partition.
    #[test]
    fn every_row_lands_in_exactly_one_partition() {
        let records = vec![
            summary_record(1, rows(300), true),
            alert_record(2, "address", "10.0.0.9"),
            summary_record(3, rows(50), false),
            alert_record(4, "identity", "k-00000000002a"),
        ];
        let p = 5;
        let parts = split(&records, p);
        assert_eq!(parts.len(), 5);
        for summary_seq in [1u64, 3] {
            let whole = match &records[if summary_seq == 1 { 0 } else { 2 }].payload {
                Payload::Summary(s) => s.clone(),
                Payload::Alert { .. } => unreachable!("a summary"),
            };
            let mut seen: Vec<(String, String)> = Vec::new();
            let mut sums: BTreeMap<String, Counts> = BTreeMap::new();
            for (i, part) in parts.iter().enumerate() {
                let rec = part
                    .iter()
                    .find(|r| r.seq == summary_seq)
                    .expect("every partition gets every summary");
                assert_eq!(rec.id, format!("host-a:summary:{}", whole.start_s));
                let Payload::Summary(s) = &rec.payload else {
                    panic!("a summary")
                };
                assert_eq!((s.start_s, s.period_s), (whole.start_s, whole.period_s));
                for c in &s.clients {
                    assert_eq!(partition_of(&c.by, &c.key, p) as usize, i, "{c:?}");
                    seen.push((c.by.clone(), c.key.clone()));
                    *sums.entry(c.by.clone()).or_default() += c.counts;
                }
                if i == 0 {
                    assert_eq!(s.rest, whole.rest);
                    assert_eq!(s.sketch, whole.sketch);
                    assert_eq!(s.sketch_key, whole.sketch_key);
                    // What the sketch covers: partition 0's rows plus `elsewhere`.
                    if whole.sketch.is_empty() {
                        assert!(s.elsewhere.is_empty());
                    } else {
                        for (kind, other) in &s.elsewhere {
                            let mut own = Counts::default();
                            for c in s.clients.iter().filter(|c| &c.by == kind) {
                                own += c.counts;
                            }
                            own += *other;
                            let mut all = Counts::default();
                            for c in whole.clients.iter().filter(|c| &c.by == kind) {
                                all += c.counts;
                            }
                            assert_eq!(own, all, "{kind}");
                        }
                    }
                } else {
                    assert!(s.rest.is_empty() && s.sketch.is_empty());
                    assert!(s.sketch_key.is_empty() && s.elsewhere.is_empty());
                }
            }
            let mut want: Vec<(String, String)> = whole
                .clients
                .iter()
                .map(|c| (c.by.clone(), c.key.clone()))
                .collect();
            seen.sort();
            want.sort();
            assert_eq!(seen, want, "each row exactly once");
            let mut want_sums: BTreeMap<String, Counts> = BTreeMap::new();
            for c in &whole.clients {
                *want_sums.entry(c.by.clone()).or_default() += c.counts;
            }
            assert_eq!(sums, want_sums, "sums preserved");
            assert!(
                parts
                    .iter()
                    .filter(|part| part.iter().any(|r| r.seq == summary_seq
                        && matches!(&r.payload, Payload::Summary(s) if !s.clients.is_empty())))
                    .count()
                    > 1,
                "rows spread over several partitions"
            );
        }
        for (seq, kind, key) in [
            (2, "address", "10.0.0.9"),
            (4, "identity", "k-00000000002a"),
        ] {
            let holders: Vec<usize> = parts
                .iter()
                .enumerate()
                .filter(|(_, part)| part.iter().any(|r| r.seq == seq))
                .map(|(i, _)| i)
                .collect();
            assert_eq!(holders, vec![partition_of(kind, key, p) as usize]);
        }
        // Positions stay increasing within every partition (the collector checks it).
        for part in &parts {
            assert!(part.windows(2).all(|w| w[0].seq < w[1].seq));
        }
        // One partition: unchanged.
        assert_eq!(split(&records, 1), vec![records.clone()]);
    }

    /// What the agent publishes on, the collector reads back; nothing else names an agent.
    #[test]
    fn subjects_name_partition_and_agent() {
        for (partitions, p, agent) in [(1, 0, "host-a"), (8, 7, "host.example.net"), (8, 0, "a")] {
            let subject = partition_subject("sensor.ship", agent, partitions, p);
            assert_eq!(
                parse_subject("sensor.ship", partitions, &subject),
                Some((p, agent)),
                "{subject}"
            );
        }
        assert_eq!(
            partition_subject("sensor.ship", "a", 4, 3),
            "sensor.ship.p3.a"
        );
        assert_eq!(partition_stream("SENSOR", 4, 3), "SENSOR-p3");
        assert_eq!(partition_stream("SENSOR", 1, 0), "SENSOR");
        for bad in [
            "sensor.ship.p8.a",
            "sensor.ship.p07.a",
            "sensor.ship.x1.a",
            "sensor.ship.p1",
            "sensor.shipp1.a",
            "other.p1.a",
            "sensor.ship.p1.a b",
        ] {
            assert_eq!(parse_subject("sensor.ship", 8, bad), None, "{bad}");
        }
        // Unpartitioned, a dotted agent name is the whole rest.
        assert_eq!(
            parse_subject("sensor.ship", 1, "sensor.ship.p1.a"),
            Some((0, "p1.a"))
        );
    }
}
