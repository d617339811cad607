//! JSON lines files for log shippers (Filebeat, Fluent Bit, Vector), rotated by size:
//! `type = "ecs-file"` (Elastic Common Schema) and `type = "ocsf-file"` (OCSF findings).
//!
//! - [`config`]: the path and rotation, and their validation.
//! - [`sink`]: the rotating file and the sink writing one rendered line per event.

pub mod config;
pub mod sink;

pub use config::FileConfig;

use config::{DEFAULT_KEEP_FILES, DEFAULT_MAX_FILE_BYTES};
use sink::{FileSink, RotatingFile};

use crate::{
    formats::{Format, ecs::Ecs, ocsf::Ocsf},
    sinks::{
        configure::{Configure, DEFAULT_RETRY_MAX_SECS, Invalid},
        error::SinkError,
        running::{Context, Running, alerts},
        spool::Spool,
    },
};

/// File sinks keep undelivered lines in memory only (the file is the durable copy).
const MEMORY_SPOOL_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Lines written per attempt.
const BATCH: usize = 256;

impl Configure for FileConfig {
    fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    fn validate(&self) -> Result<(), Invalid> {
        FileConfig::validate(self)
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
            std::time::Duration::from_secs(DEFAULT_RETRY_MAX_SECS),
            false,
            alerts,
        ))
    }
}
