//! What the agent shipped of the current period ahead of its end (an early part, see
//! `ship::early`): saved in the state directory before the part is spooled, so that an agent
//! restarted (or killed) between the parts of a period ships the rest, not the whole period
//! (which the collector would refuse as overlapping the early parts). Its own small
//! file, not the periodic snapshot: that one is seconds old when the agent is killed. Here,
//! below `ship`, so the saved state does not import upward.

use std::{collections::HashMap, fs, path::Path};

use anyhow::Context as _;

use serde::{Deserialize, Serialize};

use super::{aggregate::Counts, keys::By};

/// The file in the agent's state directory.
pub const FILE_NAME: &str = "early.json";

/// What the early parts of a period carried, summed per client: the rest of the period ships
/// its clients less these counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Early {
    /// The period's start (unix s).
    pub start_s: u64,
    /// Seconds of the period the early parts cover, from its start (1..=9).
    pub period_s: u64,
    pub rows: Vec<EarlyRow>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyRow {
    /// The key kind's name (as on the wire).
    pub by: String,
    pub key: String,
    pub counts: Counts,
}

impl Early {
    /// Adds a part's rows to the period's.
    pub fn add(&mut self, rows: Vec<EarlyRow>) {
        let mut at: HashMap<(String, String), usize> = self
            .rows
            .iter()
            .enumerate()
            .map(|(i, r)| ((r.by.clone(), r.key.clone()), i))
            .collect();
        for row in rows {
            match at.get(&(row.by.clone(), row.key.clone())) {
                Some(&i) => self.rows[i].counts += row.counts,
                None => {
                    at.insert((row.by.clone(), row.key.clone()), self.rows.len());
                    self.rows.push(row);
                }
            }
        }
    }

    /// Counts per (kind, key) the early parts carried.
    pub fn shipped(&self) -> HashMap<(By, &str), Counts> {
        self.rows
            .iter()
            .filter_map(|r| Some(((By::parse(&r.by)?, r.key.as_str()), r.counts)))
            .collect()
    }
}

/// Writes `early` durably (temporary file, synced, renamed, directory synced): done before
/// the part is spooled, so a crash in between loses at most that part's counts, never
/// the whole period.
pub fn save(dir: &Path, early: &Early) -> anyhow::Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating state dir {}", dir.display()))?;
    let tmp = dir.join(format!("{FILE_NAME}.tmp"));
    let body = serde_json::to_vec(early).context("encoding the early part")?;
    let file = fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::io::Write::write_all(&mut &file, &body)
        .and_then(|()| file.sync_data())
        .with_context(|| format!("writing {}", tmp.display()))?;
    super::state::install(dir, &tmp, FILE_NAME)
}

/// Removes the record (its part could not be spooled, and no earlier part of the period
/// was).
pub fn remove(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join(FILE_NAME);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// What the last early part carried, if the file is there and reads (a damaged one is
/// logged and ignored: the rest of its period is then shipped whole, and refused).
pub fn load(dir: &Path) -> Option<Early> {
    let path = dir.join(FILE_NAME);
    let body = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            log::warn!("cannot read {}: {e}", path.display());
            return None;
        }
    };
    serde_json::from_slice(&body)
        .map_err(|e| log::warn!("ignoring {}: {e}", path.display()))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_early_part_reads_back() {
        let dir = std::env::temp_dir().join(format!("sensor-early-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(load(&dir), None);
        let early = Early {
            start_s: 1_800_000_000,
            period_s: 3,
            rows: vec![EarlyRow {
                by: "address".into(),
                key: "10.0.0.9".into(),
                counts: Counts {
                    requests: 40,
                    bytes_out: 9,
                    ..Counts::default()
                },
            }],
        };
        save(&dir, &early).expect("save");
        assert_eq!(load(&dir), Some(early.clone()));
        assert_eq!(
            early
                .shipped()
                .get(&(By::Address, "10.0.0.9"))
                .map(|c| c.requests),
            Some(40)
        );
        assert!(!dir.join(format!("{FILE_NAME}.tmp")).exists());
        fs::write(dir.join(FILE_NAME), b"{").expect("damaged");
        assert_eq!(load(&dir), None, "a damaged file is ignored");
        let _ = fs::remove_dir_all(&dir);
    }
}
