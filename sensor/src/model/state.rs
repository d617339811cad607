//! Durable agent state: per-client aggregates and connection bookkeeping, written atomically
//! so a restarted agent (crash, kill -9, upgrade) continues where the last one left off.

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
};

/// Bumped when the snapshot format changes incompatibly.
pub const SNAPSHOT_VERSION: u32 = 2;
const FILE_NAME: &str = "state.json";

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
    let mut out = std::io::BufWriter::with_capacity(WRITE_BUFFER, file);
    serde_json::to_writer(&mut out, snapshot)
        .with_context(|| format!("writing the state snapshot to {}", tmp.display()))?;
    let file = out
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", tmp.display()))?;
    Ok(Written { file, tmp })
}

/// Puts a written snapshot in place durably (fsync, rename, directory fsync).
pub fn commit(dir: &Path, written: Written) -> anyhow::Result<()> {
    written
        .file
        .sync_data()
        .with_context(|| format!("syncing {}", written.tmp.display()))?;
    drop(written.file);
    install(dir, &written.tmp)
}

pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Writes an encoded snapshot atomically (temporary file, fsync, rename).
pub fn save(dir: &Path, encoded: &[u8]) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating state dir {}", dir.display()))?;
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    let mut file = fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(encoded)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.flush()?;
    file.sync_data()?;
    install(dir, &tmp)
}

/// Renames a synced temporary file over the snapshot, then syncs the directory.
fn install(dir: &Path, tmp: &Path) -> anyhow::Result<()> {
    fs::rename(tmp, path(dir)).with_context(|| format!("replacing {}", path(dir).display()))?;
    // The rename is durable only once the directory entry is: without this, a power loss
    // after the rename can bring back the previous snapshot, whose tombstones the agent has
    // already expired (connections counted twice).
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing state dir {}", dir.display()))?;
    Ok(())
}

/// Loads the snapshot, if there is a usable one; explains in the log why not otherwise.
pub fn load(dir: &Path) -> Option<Snapshot> {
    let p = path(dir);
    let text = match fs::read(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            log::warn!(
                "cannot read saved state {}: {e}; starting from zero",
                p.display()
            );
            return None;
        }
    };
    match serde_json::from_slice::<Snapshot>(&text) {
        Ok(s) if s.version == SNAPSHOT_VERSION => Some(s),
        Ok(s) => {
            log::warn!(
                "saved state {} has format {} (this agent writes {SNAPSHOT_VERSION}); starting from zero",
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

pub fn remove(dir: &Path) {
    let _ = fs::remove_file(path(dir));
}
