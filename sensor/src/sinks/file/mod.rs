//! JSON lines files for log shippers (Filebeat, Fluent Bit, Vector), rotated by size:
//! `type = "ecs-file"` (Elastic Common Schema) and `type = "ocsf-file"` (OCSF findings).
//!
//! - [`config`]: the path and rotation, and their validation.
//! - [`sink`]: the rotating file and the sink writing one rendered line per event.

pub mod config;
pub mod sink;

pub use config::FileConfig;
