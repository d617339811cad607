//! What the agent shipped of the current period ahead of its end (an early part, see
//! `ship::early`): saved with the agent's state, so that a restart between the two parts of a
//! period does not ship the early counts twice. Here, below `ship`, so the saved state does
//! not import upward.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{aggregate::Counts, keys::By};

/// What the early part of a period carried: the rest of the period ships its clients less
/// these counts. Kept in the agent's state snapshot, so a restart between the parts does not
/// ship the early counts twice.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Early {
    /// The period's start (unix s).
    pub start_s: u64,
    /// Seconds of the period the early part covers (1..=9).
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
    /// Counts per (kind, key) the early part carried.
    pub fn shipped(&self) -> HashMap<(By, &str), Counts> {
        self.rows
            .iter()
            .filter_map(|r| Some(((By::parse(&r.by)?, r.key.as_str()), r.counts)))
            .collect()
    }
}
