//! `type = "ecs-file"` and `type = "ocsf-file"`: the path and its rotation.

use std::path::PathBuf;

use serde::Deserialize;

use crate::sinks::configure::{Invalid, positive};

pub const DEFAULT_MAX_FILE_BYTES: u64 = 100 * 1024 * 1024;
pub const DEFAULT_KEEP_FILES: usize = 5;

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub name: Option<String>,
    /// Absolute path of the JSON lines file.
    pub path: PathBuf,
    pub max_file_bytes: Option<u64>,
    pub keep_files: Option<usize>,
}

impl FileConfig {
    /// Checks what serde cannot (ranges, formats, keys that go together).
    pub fn validate(&self) -> Result<(), Invalid> {
        positive("max_file_bytes", self.max_file_bytes)?;
        if let Some(n) = self.keep_files
            && !(1..=1000).contains(&n)
        {
            return Err(("keep_files", "must be 1..=1000".into()));
        }
        if !self.path.is_absolute() {
            return Err(("path", "must be an absolute path".into()));
        }
        Ok(())
    }
}
