//! `[[outputs]]` entries: one serde variant per sink type (`type = "..."`), each sink's own
//! typed config with its own validation, and the errors located by output and key.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use super::{
    error::SinkError, fanout::Running, file::FileConfig, hec::HecConfig, spool::Spool,
    syslog::SyslogConfig, webhook::WebhookConfig,
};
use crate::formats::Record;

/// One `[[outputs]]` entry as written: `type` picks the sink, the other keys are its own.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "type")]
pub enum SinkConfig {
    #[serde(rename = "syslog")]
    Syslog(SyslogConfig),
    #[serde(rename = "ecs-file")]
    EcsFile(FileConfig),
    #[serde(rename = "ocsf-file")]
    OcsfFile(FileConfig),
    #[serde(rename = "hec")]
    Hec(HecConfig),
    #[serde(rename = "webhook")]
    Webhook(WebhookConfig),
}

impl SinkConfig {
    /// Each variant's `type` and config: the one place a new sink is registered.
    fn parts(&self) -> (&'static str, &dyn Configure) {
        match self {
            Self::Syslog(c) => ("syslog", c),
            Self::EcsFile(c) => ("ecs-file", c),
            Self::OcsfFile(c) => ("ocsf-file", c),
            Self::Hec(c) => ("hec", c),
            Self::Webhook(c) => ("webhook", c),
        }
    }

    /// Its `type`.
    pub fn kind(&self) -> &'static str {
        self.parts().0
    }

    /// The name it is known by: `name`, else `<type>-<n>` (1-based among all outputs).
    pub fn display_name(&self, index: usize) -> String {
        let (kind, c) = self.parts();
        c.name()
            .map_or_else(|| format!("{kind}-{}", index + 1), str::to_owned)
    }

    fn validate(&self, index: usize) -> Result<(), ConfigError> {
        let c = self.parts().1;
        let err = |(key, message): Invalid| ConfigError {
            index,
            key: key.to_owned(),
            message,
        };
        if let Some(name) = c.name()
            && !valid_name(name)
        {
            return Err(err((
                "name",
                "names are letters, digits, -, _ and .".into(),
            )));
        }
        c.validate().map_err(err)
    }

    pub(super) fn start(&self, ctx: &Context<'_>) -> Result<Running, SinkError> {
        self.parts().1.start(ctx)
    }
}

/// A validation error of one sink's config: the key at fault and why.
pub type Invalid = (&'static str, String);

/// What every sink's config provides (implemented in each sink's `config.rs`).
pub trait Configure {
    /// `name`, when written.
    fn name(&self) -> Option<&str>;
    /// Checks what serde cannot (ranges, formats, keys that go together).
    fn validate(&self) -> Result<(), Invalid>;
    /// Builds the sink, opens its spool and starts its task.
    fn start(&self, ctx: &Context<'_>) -> Result<Running, SinkError>;
}

/// Where a sink starts: its name and type, and the agent's state directory (for spools).
pub struct Context<'a> {
    pub name: &'a str,
    pub kind: &'static str,
    pub state_dir: &'a Path,
}

// --- what network sinks share -----------------------------------------------------------------

pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_RETRY_MAX_SECS: u64 = 60;
pub const DEFAULT_TIMEOUT_SECS: u64 = 10;

/// The spool and retry keys of a network sink (syslog, hec, webhook), as its config has them.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeliveryKeys<'a> {
    pub spool_dir: Option<&'a Path>,
    pub spool_max_bytes: Option<u64>,
    pub retry_max_secs: Option<u64>,
    pub timeout_secs: Option<u64>,
}

impl DeliveryKeys<'_> {
    pub fn validate(&self) -> Result<(), Invalid> {
        positive("spool_max_bytes", self.spool_max_bytes)?;
        positive("retry_max_secs", self.retry_max_secs)?;
        positive("timeout_secs", self.timeout_secs)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS))
    }

    pub fn retry_max(&self) -> Duration {
        Duration::from_secs(self.retry_max_secs.unwrap_or(DEFAULT_RETRY_MAX_SECS))
    }

    /// Opens the sink's disk spool (`spool_dir`, else `<state dir>/spool/<name>`).
    pub fn spool(&self, ctx: &Context<'_>) -> Result<Spool<Record>, SinkError> {
        let dir = self.spool_dir.map_or_else(
            || ctx.state_dir.join("spool").join(ctx.name),
            Path::to_path_buf,
        );
        Spool::open(
            &dir,
            self.spool_max_bytes.unwrap_or(DEFAULT_SPOOL_MAX_BYTES),
        )
    }
}

/// `Some(0)` is refused: "must be at least 1".
pub fn positive(key: &'static str, v: Option<u64>) -> Result<(), Invalid> {
    match v {
        Some(0) => Err((key, "must be at least 1".into())),
        _ => Ok(()),
    }
}

/// A PEM CA file, when given, must name something.
pub fn ca_file_set(ca_file: Option<&PathBuf>) -> Result<(), Invalid> {
    match ca_file {
        Some(f) if f.as_os_str().is_empty() => Err(("ca_file", "must not be empty".into())),
        _ => Ok(()),
    }
}

// --- the list -----------------------------------------------------------------------------------

/// A validation error: the output (0-based index among `[[outputs]]`), the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("outputs[{index}]: {message}")]
pub struct ConfigError {
    pub index: usize,
    pub key: String,
    pub message: String,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.')
}

/// Validates every output and that names are unique.
pub fn validate(outputs: &[SinkConfig]) -> Result<(), ConfigError> {
    let mut names = std::collections::HashSet::new();
    for (i, o) in outputs.iter().enumerate() {
        o.validate(i)?;
        let name = o.display_name(i);
        if !names.insert(name.clone()) {
            return Err(ConfigError {
                index: i,
                key: "name".into(),
                message: format!("output name `{name}` is used twice"),
            });
        }
    }
    Ok(())
}

fn is_header(line: &str) -> bool {
    line.trim() == "[[outputs]]"
}

/// 1-based line of `key` inside the `index`-th `[[outputs]]` table of `text`, or of the
/// table's header when the key is not written there.
pub fn locate(text: &str, index: usize, key: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    let headers: Vec<usize> = (0..lines.len()).filter(|&i| is_header(lines[i])).collect();
    let Some(&start) = headers.get(index) else {
        return 1;
    };
    (start + 1..table_end(&lines, start))
        .find(|&i| {
            lines[i]
                .trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .unwrap_or(start)
        + 1
}

/// The line after the table whose header is at `start` (0-based).
fn table_end(lines: &[&str], start: usize) -> usize {
    (start + 1..lines.len())
        .find(|&i| lines[i].trim_start().starts_with('['))
        .unwrap_or(lines.len())
}

/// The output and key a deserialization error inside an `[[outputs]]` table is about, as a
/// [`ConfigError`]; `None` for errors elsewhere (the caller locates those).
///
/// serde reads an internally tagged table whole before it picks the variant, so toml can
/// only point at the outputs, not at the key: the output is the first whose table fails with
/// the same error, and the key comes from the message (an unknown or missing field), or is
/// the one key whose removal changes the error (an invalid value; `type` last).
pub fn deserialize_error(text: &str, e: &toml::de::Error) -> Option<ConfigError> {
    let doc: toml::Table = toml::from_str(text).ok()?;
    let outputs = doc.get("outputs")?.as_array()?;
    let message = e.message().trim().to_owned();
    let index = outputs.iter().position(|o| {
        o.as_table().and_then(|t| error_of(t.clone())).as_deref() == Some(&message)
    })?;
    let table = outputs[index].as_table()?;
    let quoted = |prefix: &str| {
        let rest = message.split_once(prefix)?.1;
        Some(rest.split_once('`')?.0.to_owned())
    };
    let key = quoted("unknown field `")
        .or_else(|| quoted("missing field `"))
        .or_else(|| culprit(table, &message))?;
    Some(ConfigError {
        index,
        key,
        message,
    })
}

/// The message of deserializing `table` as a sink's config, if that fails.
fn error_of(table: toml::Table) -> Option<String> {
    toml::Value::Table(table)
        .try_into::<SinkConfig>()
        .err()
        .map(|e| e.message().trim().to_owned())
}

/// The key of `table` whose removal changes the error `message` (`type` is tried last: its
/// removal always does).
fn culprit(table: &toml::Table, message: &str) -> Option<String> {
    let changes = |k: &String| {
        let mut without = table.clone();
        without.remove(k.as_str());
        error_of(without).as_deref() != Some(message)
    };
    table
        .keys()
        .filter(|k| k.as_str() != "type")
        .find(|k| changes(k))
        .or_else(|| table.keys().find(|k| k.as_str() == "type"))
        .cloned()
}

/// An HTTP sink's `url`, and its TLS keys that only apply to https URLs.
pub fn http_url(
    url: &str,
    ca_file: Option<&PathBuf>,
    server_name: Option<&String>,
) -> Result<(), Invalid> {
    let parsed = crate::net::client::parse_url(url).map_err(|e| ("url", e.to_string()))?;
    if parsed.scheme() != "https" {
        if ca_file.is_some() {
            return Err(("ca_file", "only applies to https URLs".into()));
        }
        if server_name.is_some() {
            return Err(("server_name", "only applies to https URLs".into()));
        }
    }
    ca_file_set(ca_file)
}
