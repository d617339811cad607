//! Durable agent state: per-client aggregates and connection bookkeeping, written atomically
//! so a restarted agent (crash, kill -9, upgrade) continues where the last one left off.
//!
//! Format 4 is MessagePack (`state.msgpack`); format 2 was the same fields as JSON
//! (`state.json`), which an upgraded agent still reads once and then removes. The snapshot
//! is rewritten every few seconds from every client's and connection's record: as JSON,
//! formatting numbers and writing field names was the largest single part of the agent's work
//! under load (callgrind, BENCHMARKS.md). Formats 3 and 4 write numbers in binary and structs
//! as arrays of their fields in declaration order, without names. Format 4 differs from 3 only
//! in a client's windows, a connection's record and the tombstones: each one `bin` of varints
//! instead of an array of values (the hour of a busy client's windows, 66 buckets, through
//! serde one value at a time, made a snapshot of 10 000 such clients cost ~60 ms of CPU:
//! `model::aggregate::encode_rings`, `model::conntable::encode_stats`, `SavedTombstones`). An
//! agent reads formats 3 and 4 (and 2); an older agent refuses format 4 (logged, from zero).
//!
//! Positional, so for a struct saved here: a new field goes last, with `#[serde(default)]`
//! (older snapshots end before it); `skip_serializing_if` only on a struct's last field, or
//! on the human-readable form alone (`Counts` leaves zeros out of JSON, not out of formats 3 and 4).
//! `Counts` is a fixed tuple of five: another counter needs a new format. A snapshot with
//! fields an agent does not know is unreadable to it (a downgrade past a field starts from
//! zero, logged). `tests::format_4_reads_back_every_field_exactly` saves and reads every part;
//! `tests::a_format_3_file_still_reads` reads the earlier windows.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::{
    model::aggregate::Aggregator,
    model::conntable::{ConnState, SavedConns},
    pace::Paced,
};

/// Bumped when the snapshot format changes incompatibly.
pub const SNAPSHOT_VERSION: u32 = 4;
/// Earlier formats of `state.msgpack` this agent still reads (their windows decode too).
const READABLE_VERSIONS: [u32; 2] = [3, SNAPSHOT_VERSION];
const FILE_NAME: &str = "state.msgpack";
/// Format 2: the same fields, as JSON.
const LEGACY_VERSION: u32 = 2;
const LEGACY_FILE_NAME: &str = "state.json";
/// Every file the agent may leave in its state directory (for uninstall and `--fresh`).
pub const FILE_NAMES: [&str; 6] = [
    "state.msgpack",
    "state.msgpack.tmp",
    "state.json",
    "state.json.tmp",
    "early.json",
    "early.json.tmp",
];

#[derive(Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    /// /proc/sys/kernel/random/boot_id: socket cookies and CLOCK_BOOTTIME are per boot.
    pub boot_id: String,
    /// Which pinned kernel state the connection bookkeeping refers to.
    pub instance: String,
    pub saved_unix_ms: u64,
    pub agg: Aggregator,
    pub conns: ConnState,
    #[serde(default)]
    pub detector: crate::detect::DetectorState,
    /// Start (unix s) of the last summary period shipped to the collector.
    #[serde(default)]
    pub shipped_through: u64,
}

/// What the agent writes: the same fields as `Snapshot`, borrowing the aggregates so that
/// saving does not copy them (at 10 000 clients the copy was ~30 MB per snapshot).
#[derive(Serialize)]
pub struct SnapshotRef<'a> {
    pub version: u32,
    pub boot_id: &'a str,
    pub instance: &'a str,
    pub saved_unix_ms: u64,
    pub agg: &'a Aggregator,
    pub conns: SavedConns<'a>,
    pub detector: &'a crate::detect::DetectorState,
    pub shipped_through: u64,
}

/// A snapshot written to the temporary file, not yet in place (`commit`).
pub struct Written {
    file: fs::File,
    tmp: PathBuf,
}

impl Written {
    /// Bytes written.
    pub fn len(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
}

/// Buffer between the encoder and the temporary file.
const WRITE_BUFFER: usize = 256 * 1024;

/// Encodes the snapshot straight into the state directory's temporary file, through a small
/// buffer: at 10 000 clients the encoded state is megabytes, and building it in memory first
/// cost the agent that much resident memory and page faults at every snapshot. The file is
/// not synced nor renamed yet (`commit`), so a failure here leaves the previous snapshot.
pub fn write_tmp(dir: &Path, snapshot: &SnapshotRef<'_>) -> anyhow::Result<Written> {
    fs::create_dir_all(dir).with_context(|| format!("creating state dir {}", dir.display()))?;
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    let file = fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    // Paced: the encoding runs under the state lock for tens of milliseconds on a large table,
    // in one burst the scheduler would preempt only at a tick.
    let mut out = Paced::new(std::io::BufWriter::with_capacity(WRITE_BUFFER, file));
    encode(&mut out, snapshot)
        .with_context(|| format!("writing the state snapshot to {}", tmp.display()))?;
    let file = out
        .into_inner()
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", tmp.display()))?;
    Ok(Written { file, tmp })
}

/// The snapshot as format 4: MessagePack, structs as arrays (see the module's notes),
/// not human-readable (addresses as their bytes).
fn encode<W: std::io::Write, T: Serialize + ?Sized>(
    out: &mut W,
    value: &T,
) -> Result<(), rmp_serde::encode::Error> {
    value.serialize(&mut rmp_serde::Serializer::new(out))
}

fn decode<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

/// Puts a written snapshot in place durably (fsync, rename, directory fsync).
pub fn commit(dir: &Path, written: Written) -> anyhow::Result<()> {
    written
        .file
        .sync_data()
        .with_context(|| format!("syncing {}", written.tmp.display()))?;
    drop(written.file);
    install(dir, &written.tmp, FILE_NAME)
}

/// Removes the format 2 snapshot `load` found, once a format 4 one is durably in place: it is
/// stale from then on, and an older agent started later must not take it for the current
/// state (it would count again what this one has already counted and let go of). Only a file
/// that read as an agent's snapshot is removed (a collector configured with the same
/// directory keeps its own `state.json`). A failure is only logged: the snapshot is saved.
pub fn retire_legacy(dir: &Path) {
    let legacy = dir.join(LEGACY_FILE_NAME);
    match fs::remove_file(&legacy) {
        Ok(()) => {
            if let Err(e) = sync_dir(dir) {
                log::warn!("{e:#}");
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => log::warn!(
            "cannot remove the earlier agent's stale state {}: {e}; an older agent started later would count from it",
            legacy.display()
        ),
    }
}

pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Writes an encoded file atomically as `name` in `dir` (temporary file, fsync, rename): the
/// collector's snapshot.
pub fn save(dir: &Path, name: &str, encoded: &[u8]) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating state dir {}", dir.display()))?;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(encoded)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.flush()?;
    file.sync_data()?;
    install(dir, &tmp, name)
}

/// Renames a synced temporary file over `name`, then syncs the directory.
pub(super) fn install(dir: &Path, tmp: &Path, name: &str) -> anyhow::Result<()> {
    let path = dir.join(name);
    fs::rename(tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
    // The rename is durable only once the directory entry is: without this, a power loss
    // after the rename can bring back the previous snapshot, whose tombstones the agent has
    // already expired (connections counted twice).
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing state dir {}", dir.display()))
}

/// A snapshot as `load` found it.
pub struct Loaded {
    pub snapshot: Snapshot,
    /// A format 2 agent snapshot is in the directory (used or stale): `retire_legacy` once a
    /// format 4 snapshot is saved.
    pub legacy: bool,
}

/// Loads the snapshot, if there is a usable one; explains in the log why not otherwise.
/// Reads formats 3 and 4 (`state.msgpack`) and format 2 (`state.json`, an agent before this
/// format); when both are there (an older agent ran in between, or this one stopped between
/// saving and retiring the old file) the one saved last.
pub fn load(dir: &Path) -> Option<Loaded> {
    let current = read(&dir.join(FILE_NAME)).and_then(|bytes| {
        checked(
            dir.join(FILE_NAME),
            decode::<Snapshot>(&bytes),
            &READABLE_VERSIONS,
        )
    });
    let legacy = read(&dir.join(LEGACY_FILE_NAME)).and_then(|bytes| {
        checked(
            dir.join(LEGACY_FILE_NAME),
            serde_json::from_slice::<Snapshot>(&bytes),
            &[LEGACY_VERSION],
        )
    });
    let found_legacy = legacy.is_some();
    let snapshot = match (current, legacy) {
        (Some(c), Some(l)) if l.saved_unix_ms > c.saved_unix_ms => {
            log::info!(
                "{} is newer than {} (an older agent ran in between): continuing from it",
                LEGACY_FILE_NAME,
                FILE_NAME
            );
            l
        }
        (Some(c), _) => c,
        (None, l) => l?,
    };
    Some(Loaded {
        snapshot,
        legacy: found_legacy,
    })
}

/// The file's bytes; `None` if there is no such file, or (logged) it cannot be read.
fn read(p: &Path) -> Option<Vec<u8>> {
    match fs::read(p) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            log::warn!(
                "cannot read saved state {}: {e}; starting from zero",
                p.display()
            );
            None
        }
    }
}

/// The decoded snapshot if it has a version its encoding goes with; logged otherwise.
fn checked<E: std::fmt::Display>(
    p: PathBuf,
    decoded: Result<Snapshot, E>,
    versions: &[u32],
) -> Option<Snapshot> {
    match decoded {
        Ok(s) if versions.contains(&s.version) => Some(s),
        Ok(s) => {
            log::warn!(
                "saved state {} has format {} (this agent reads {versions:?} there); starting from zero",
                p.display(),
                s.version
            );
            None
        }
        Err(e) => {
            log::warn!(
                "saved state {} is unreadable ({e}); starting from zero",
                p.display()
            );
            None
        }
    }
}

/// Discards the saved state (`--fresh`), in either format, and temporary files left by a crash.
pub fn remove(dir: &Path) {
    for name in FILE_NAMES {
        let _ = fs::remove_file(dir.join(name));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::{Value, json};

    use super::*;
    use crate::model::conntable::ConnTable;

    /// A state directory of its own per test.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let d =
                std::env::temp_dir().join(format!("sensor-state-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).expect("dir");
            Self(d)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn stats(cookie: u64, closed: u8) -> Value {
        json!({
            "local_addr": [0,0,0,0,0,0,0,0,0,0,255,255,127,0,0,1],
            "remote_addr": [0,0,0,0,0,0,0,0,0,0,255,255,127,0,0,2],
            "local_port": 8000, "remote_port": 40000 + cookie, "family": 2, "proto": 1,
            "closed": closed, "bytes_in": 1u64 << 33, "bytes_out": 7, "packets_in": 3,
            "packets_out": 4, "requests": 2, "first_seen_ns": 5, "last_seen_ns": 6,
            "in_seq_base": u32::MAX, "out_seq_base": 1, "events_out": 9,
            "exchange_flags": 1, "_pad": 0
        })
    }

    /// Every part a snapshot holds, with values in each: the scenario's per-client tables
    /// (compact and full records, identities, forwarded clients, IPv6), live and closed
    /// connections, tombstones and exchanges, and alert lifecycle state.
    fn owned() -> Snapshot {
        let conns: ConnState = serde_json::from_value(json!({
            "live": [[11, stats(11, 0)], [12, stats(12, 1)]],
            "tombstones": [[13, 1_800_000_000_000u64]],
            "exchanges": [[11, {
                "keys": {"identity": "k-00aa", "forwarded": "2001:db8::7"},
                "attributed": {"bytes_in": 1, "bytes_out": 2, "events_out": 3},
                "identities": ["k-00aa", "ops"],
                "forwarded": ["198.51.100.4"]
            }]]
        }))
        .expect("conns");
        // Alerts opened and held (a rule every scenario client matches over the hour),
        // resolved and suppressed (one over the last minute), a learned baseline.
        let agg = crate::model::compat::scenario();
        let mut detector = crate::detect::Detector::without_rules();
        let rule = |id: &str, window: &str| {
            let text = format!(
                "id = \"{id}\"\nname = \"{id}\"\nkeys = [\"address\", \"identity\"]\n\
                 when = [{{ metric = \"requests\", window = \"{window}\", op = \">\", value = 0 }}]"
            );
            crate::detect::Rule::from_config(&toml::from_str(&text).expect("toml")).expect("rule")
        };
        detector.settings.rules = vec![rule("hour", "1h"), rule("minute", "1m")];
        detector.settings.suppress_ms = 600_000;
        let at = |s: u64| crate::model::aggregate::Now {
            unix_ms: 1_800_000_000_000 + s * 1000,
        };
        assert!(!detector.evaluate(&agg, at(100)).is_empty(), "alerts open");
        detector.evaluate(&agg, at(170));
        detector.evaluate(&agg, at(500));
        let st = serde_json::to_value(&detector.state).expect("json");
        assert!(
            st["alerts"]
                .as_object()
                .expect("alerts")
                .values()
                .any(|a| a["state"] == "resolved" && a["resolved_at"].is_string()),
            "a resolved alert"
        );
        assert!(
            st["alerts"]
                .as_object()
                .expect("alerts")
                .values()
                .any(|a| a["state"] == "open")
        );
        assert!(!st["suppressed_until"].as_object().expect("map").is_empty());
        assert!(
            !st["baseline"]["minutes"]
                .as_array()
                .expect("minutes")
                .is_empty()
        );
        let detector = detector.state;
        Snapshot {
            version: SNAPSHOT_VERSION,
            boot_id: "boot".into(),
            instance: "inst".into(),
            saved_unix_ms: 1_800_000_002_000,
            agg,
            conns,
            detector,
            shipped_through: 1_799_999_990,
        }
    }

    /// Writes `s` as the agent does (straight from its live tables).
    fn write(dir: &Path, s: &Snapshot) {
        let mut table = ConnTable::new(Duration::from_secs(120), 1000);
        table.restore(&s.conns);
        let written = write_tmp(
            dir,
            &SnapshotRef {
                version: s.version,
                boot_id: &s.boot_id,
                instance: &s.instance,
                saved_unix_ms: s.saved_unix_ms,
                agg: &s.agg,
                conns: table.saved(),
                detector: &s.detector,
                shipped_through: s.shipped_through,
            },
        )
        .expect("write");
        commit(dir, written).expect("commit");
    }

    /// The snapshot as JSON, its connections by cookie (the table holds them unordered).
    fn value(s: &Snapshot) -> Value {
        let mut v = serde_json::to_value(s).expect("to json");
        for part in ["live", "tombstones", "exchanges"] {
            if let Some(a) = v["conns"][part].as_array_mut() {
                a.sort_by_key(|e| e[0].as_u64());
            }
        }
        v
    }

    /// Field by field (a readable failure); floats to within a few units in the last place,
    /// as JSON reads them back.
    fn assert_close(got: &Snapshot, expected: &Snapshot) {
        crate::model::compat::assert_same("snapshot", &value(got), &value(expected));
    }

    /// Exactly: MessagePack keeps every float's bits.
    fn assert_exact(got: &Snapshot, expected: &Snapshot) {
        assert_close(got, expected);
        assert!(
            value(got) == value(expected),
            "floats differ in their last bits"
        );
    }

    fn write_legacy(dir: &Path, s: &Snapshot) {
        let mut s = serde_json::to_value(s).expect("json");
        s["version"] = json!(LEGACY_VERSION);
        fs::write(dir.join(LEGACY_FILE_NAME), s.to_string()).expect("legacy file");
    }

    #[test]
    fn format_4_reads_back_every_field_exactly() {
        let dir = Dir::new("roundtrip");
        let s = owned();
        write(&dir.0, &s);
        let bytes = fs::read(dir.0.join(FILE_NAME)).expect("file");
        // A MessagePack array (the snapshot's fields in order), not JSON text.
        assert!(
            matches!(bytes[0], 0x90..=0x9f | 0xdc | 0xdd),
            "{:#x}",
            bytes[0]
        );
        let loaded = load(&dir.0).expect("loads");
        assert!(!loaded.legacy);
        assert_exact(&loaded.snapshot, &s);
        assert!(!dir.0.join(format!("{FILE_NAME}.tmp")).exists());
    }

    #[test]
    fn a_format_3_file_still_reads() {
        let dir = Dir::new("format3");
        let mut s = owned();
        s.version = 3;
        crate::model::aggregate::with_format_3(|| write(&dir.0, &s));
        let format_3 = fs::read(dir.0.join(FILE_NAME)).expect("file");
        let loaded = load(&dir.0).expect("format 3 loads");
        assert_exact(&loaded.snapshot, &s);
        // The same state as format 4 is smaller: the windows were most of it.
        s.version = SNAPSHOT_VERSION;
        write(&dir.0, &s);
        let format_4 = fs::read(dir.0.join(FILE_NAME)).expect("file");
        assert!(
            format_4.len() < format_3.len(),
            "{} {}",
            format_4.len(),
            format_3.len()
        );
        assert_exact(&load(&dir.0).expect("loads").snapshot, &s);
    }

    #[test]
    fn a_format_2_file_is_read_once_then_retired() {
        let dir = Dir::new("upgrade");
        let s = owned();
        write_legacy(&dir.0, &s);
        let loaded = load(&dir.0).expect("format 2 loads");
        assert!(loaded.legacy);
        let mut next = loaded.snapshot;
        assert_eq!(next.version, LEGACY_VERSION);
        next.version = SNAPSHOT_VERSION;
        assert_close(&next, &s);
        next.saved_unix_ms += 5_000;
        write(&dir.0, &next);
        retire_legacy(&dir.0);
        // An older agent started after this one finds no stale state to count again.
        assert!(!dir.0.join(LEGACY_FILE_NAME).exists());
        let loaded = load(&dir.0).expect("loads");
        assert!(!loaded.legacy);
        assert_exact(&loaded.snapshot, &next);
    }

    #[test]
    fn of_both_formats_the_snapshot_saved_last_is_used() {
        // Saved, then stopped before retiring the old file: format 3 is newer.
        let dir = Dir::new("both");
        let mut old = owned();
        old.shipped_through = 1;
        write_legacy(&dir.0, &old);
        let s = owned();
        write(&dir.0, &s);
        let loaded = load(&dir.0).expect("loads");
        assert!(
            loaded.legacy,
            "the stale file is retired after the next save"
        );
        assert_eq!(loaded.snapshot.shipped_through, s.shipped_through);
        // Downgraded, then upgraded again: the older agent's format 2 snapshot is newer.
        let mut newer = owned();
        newer.saved_unix_ms = s.saved_unix_ms + 60_000;
        newer.shipped_through = 7;
        write_legacy(&dir.0, &newer);
        let loaded = load(&dir.0).expect("loads");
        assert!(loaded.legacy);
        assert_eq!(loaded.snapshot.version, LEGACY_VERSION);
        assert_eq!(loaded.snapshot.shipped_through, 7);
    }

    #[test]
    fn a_state_json_that_is_not_an_agent_snapshot_is_left_alone() {
        // A collector configured with the agent's directory keeps its own state.json.
        let dir = Dir::new("collector");
        let collector = json!({"version": 1, "saved_unix_ms": 5, "fleet": {}, "detector": {}});
        fs::write(dir.0.join(LEGACY_FILE_NAME), collector.to_string()).expect("file");
        let s = owned();
        write(&dir.0, &s);
        let loaded = load(&dir.0).expect("loads");
        assert!(!loaded.legacy, "not retired");
        assert_exact(&loaded.snapshot, &s);
        assert!(dir.0.join(LEGACY_FILE_NAME).exists());
    }

    #[test]
    fn a_failed_retirement_is_only_logged() {
        let dir = Dir::new("retire");
        // Not removable as a file.
        fs::create_dir(dir.0.join(LEGACY_FILE_NAME)).expect("dir");
        retire_legacy(&dir.0);
        assert!(dir.0.join(LEGACY_FILE_NAME).is_dir());
    }

    #[test]
    fn a_hostile_length_prefix_allocates_nothing_for_it() {
        // MessagePack states a map's length up front: a file claiming 2^32 - 1 clients (and
        // holding none) must be refused for what it holds, not make the agent reserve room
        // for what it claims (an allocation failure aborts the process).
        let dir = Dir::new("hostile");
        let mut bytes = vec![0x98, 0x03, 0xa1, b'b', 0xa1, b'i', 0x00];
        // agg: [addresses: [clients: map32 of u32::MAX entries ...
        bytes.extend([0x94, 0x92, 0xdf, 0xff, 0xff, 0xff, 0xff]);
        fs::write(dir.0.join(FILE_NAME), &bytes).expect("file");
        assert!(load(&dir.0).is_none());
    }

    #[test]
    fn unusable_state_starts_from_zero() {
        let dir = Dir::new("unusable");
        // Torn or foreign bytes.
        fs::write(dir.0.join(FILE_NAME), b"\x98\x03\xa4boot").expect("file");
        assert!(load(&dir.0).is_none());
        fs::write(dir.0.join(FILE_NAME), b"{\"version\":3}").expect("file");
        assert!(load(&dir.0).is_none());
        // A version this encoding does not go with.
        let mut s = owned();
        s.version = 5;
        let mut bytes = Vec::new();
        encode(&mut bytes, &s).expect("encode");
        fs::write(dir.0.join(FILE_NAME), &bytes).expect("file");
        assert!(load(&dir.0).is_none());
        fs::remove_file(dir.0.join(FILE_NAME)).expect("rm");
        s.version = SNAPSHOT_VERSION;
        fs::write(
            dir.0.join(LEGACY_FILE_NAME),
            serde_json::to_vec(&s).expect("json"),
        )
        .expect("legacy file");
        assert!(
            load(&dir.0).is_none(),
            "format 4 fields in JSON are not format 2"
        );
        for name in [
            FILE_NAME,
            LEGACY_FILE_NAME,
            crate::model::shipped::FILE_NAME,
        ] {
            assert!(FILE_NAMES.contains(&name));
            assert!(FILE_NAMES.contains(&format!("{name}.tmp").as_str()));
        }
        // --fresh removes either, and temporary files a crash left.
        for name in FILE_NAMES {
            fs::write(dir.0.join(name), b"x").expect("file");
        }
        remove(&dir.0);
        for name in FILE_NAMES {
            assert!(!dir.0.join(name).exists(), "{name}");
        }
        assert!(load(&dir.0).is_none());
    }
}
