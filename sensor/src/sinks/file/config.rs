//! `type = "ecs-file"` and `type = "ocsf-file"`: the path and its rotation.

use std::path::PathBuf;

use serde::Deserialize;

use super::sink::{FileSink, RotatingFile};
use crate::{
    formats::{Format, ecs::Ecs, ocsf::Ocsf},
    sinks::{
        config::{Configure, Context, Invalid, positive},
        error::SinkError,
        fanout::{Running, alerts},
        spool::Spool,
    },
};

pub const DEFAULT_MAX_FILE_BYTES: u64 = 100 * 1024 * 1024;
pub const DEFAULT_KEEP_FILES: usize = 5;
/// File sinks keep undelivered lines in memory only (the file is the durable copy).
const MEMORY_SPOOL_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Lines written per attempt.
const BATCH: usize = 256;

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub name: Option<String>,
    /// Absolute path of the JSON lines file.
    pub path: PathBuf,
    pub max_file_bytes: Option<u64>,
    pub keep_files: Option<usize>,
}

impl Configure for FileConfig {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn validate(&self) -> Result<(), Invalid> {
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

    fn start(&self, ctx: &Context<'_>) -> Result<Running, SinkError> {
        // The variant picks the rendering: `ecs-file` or `ocsf-file`.
        let format: Box<dyn Format> = if ctx.kind == "ocsf-file" {
            Box::new(Ocsf)
        } else {
            Box::new(Ecs)
        };
        let mut file = RotatingFile::new(
            &self.path,
            self.max_file_bytes.unwrap_or(DEFAULT_MAX_FILE_BYTES),
            self.keep_files.unwrap_or(DEFAULT_KEEP_FILES),
        );
        // Fail at start on an unwritable path.
        file.open()?;
        Ok(Running::spawn(
            ctx,
            FileSink::new(file, format, BATCH),
            Spool::memory(MEMORY_SPOOL_MAX_BYTES),
            std::time::Duration::from_secs(crate::sinks::config::DEFAULT_RETRY_MAX_SECS),
            false,
            alerts,
        ))
    }
}
