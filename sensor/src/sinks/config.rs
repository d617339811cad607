//! `[[outputs]]` entries: one serde variant per sink type (`type = "..."`), each sink's own
//! typed config with its own validation, and the errors located by output and key.

use serde::Deserialize;

use super::{
    configure::{Configure, Invalid},
    error::SinkError,
    file::FileConfig,
    hec::HecConfig,
    running::{Context, Running},
    syslog::SyslogConfig,
    webhook::WebhookConfig,
};

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

/// Validates every output, that names are unique, and that no two spools share a directory
/// (`taken`: spool directories of others, the collector shipping's): two writers of one spool
/// journal corrupt each other's records.
pub fn validate(
    outputs: &[SinkConfig],
    state_dir: &std::path::Path,
    taken: &[std::path::PathBuf],
) -> Result<(), ConfigError> {
    let mut names = std::collections::HashSet::new();
    let mut spools: std::collections::HashSet<std::path::PathBuf> = taken.iter().cloned().collect();
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
        if let Some(written) = o.parts().1.disk_spool() {
            let dir = written.map_or_else(
                || state_dir.join("spool").join(&name),
                std::path::Path::to_path_buf,
            );
            if !spools.insert(normalized(&dir)) {
                return Err(ConfigError {
                    index: i,
                    key: if written.is_some() {
                        "spool_dir"
                    } else {
                        "name"
                    }
                    .into(),
                    message: format!(
                        "spool directory {} is already another spool's (each output needs its own)",
                        dir.display()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// `dir` without `.` and `..` components and trailing slashes, so that spellings of one
/// directory compare equal; an existing directory by its canonical path (symlinks resolved).
fn normalized(dir: &std::path::Path) -> std::path::PathBuf {
    if let Ok(real) = std::fs::canonicalize(dir) {
        return real;
    }
    let mut out = std::path::PathBuf::new();
    for c in dir.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
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
