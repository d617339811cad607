//! `sensor check-config [FILE]`: every error of a configuration file, each with its file, line
//! and key, without starting anything.
//!
//! The parser stops at the first error, so after each located error the offending line is
//! commented out (line numbers stay the same) and the text parsed again; the key then takes
//! its default, which is valid. This ends at the first error that is not a single-line
//! `key = value` (a syntax error, a multi-line value), which is reported last.

use crate::{
    cli::CheckConfigArgs,
    config::{Config, ConfigError},
};

/// All errors in `text`, by line (empty: the configuration is valid).
pub fn check_text(text: &str, file: &str) -> Vec<ConfigError> {
    let mut errors = collect(text, file);
    errors.sort_by_key(|e| e.line);
    errors
}

fn collect(text: &str, file: &str) -> Vec<ConfigError> {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut errors = Vec::new();
    loop {
        let current = lines.join("\n");
        let Err(e) = Config::parse(&current, file) else {
            return errors;
        };
        let maskable = e.line >= 1
            && lines.get(e.line - 1).is_some_and(|l| {
                e.key.as_deref().is_some_and(|key| assigns(l, key))
                    // Without the line the rest must still be well-formed TOML.
                    && {
                        let mut probe = lines.clone();
                        probe[e.line - 1] = format!("# {}", probe[e.line - 1]);
                        probe.join("\n").parse::<toml::Table>().is_ok()
                    }
            });
        let line = e.line;
        errors.push(e);
        if !maskable || errors.len() > lines.len() {
            return errors;
        }
        lines[line - 1] = format!("# {}", lines[line - 1]);
    }
}

/// Whether `line` is `key = ...` (possibly quoted, possibly indented, possibly dotted) for the
/// key at dotted `path` (`capture.ports`, `outputs[1].protocol`).
fn assigns(line: &str, path: &str) -> bool {
    line.split_once('=').is_some_and(|(k, _)| {
        let k = k.trim().trim_matches('"');
        !k.is_empty() && (path == k || path.ends_with(&format!(".{k}")))
    })
}

pub fn check_config(args: &CheckConfigArgs) -> anyhow::Result<()> {
    let file = args.file.display().to_string();
    let text = std::fs::read_to_string(&args.file)
        .map_err(|e| anyhow::anyhow!("cannot read config {file}: {e}"))?;
    let errors = check_text(&text, &file);
    if errors.is_empty() {
        return crate::stdout::outln!("{file}: OK");
    }
    for e in &errors {
        eprintln!("{e}");
    }
    anyhow::bail!(
        "{file}: {} error{}",
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_text_has_no_errors() {
        assert!(check_text(crate::config::DEFAULT_CONFIG, "d.toml").is_empty());
        assert!(check_text("", "e.toml").is_empty());
    }

    #[test]
    fn every_error_is_reported_with_line_and_key() {
        let text = "[capture]\nports = [0]\npoll_interval_ms = \"soon\"\n\n[api]\nsockett = \"/x\"\n\
                    [clients]\ngroup_prefix_v4 = 40\n";
        let errors = check_text(text, "/etc/sensor/sensor.toml");
        let found: Vec<(usize, Option<&str>)> =
            errors.iter().map(|e| (e.line, e.key.as_deref())).collect();
        assert_eq!(
            found,
            [
                (2, Some("capture.ports")),
                (3, Some("capture.poll_interval_ms")),
                (6, Some("api.sockett")),
                (8, Some("clients.group_prefix_v4")),
            ]
        );
        assert!(
            errors[1]
                .to_string()
                .starts_with("/etc/sensor/sensor.toml:3: capture.poll_interval_ms: ")
        );
    }

    /// `top_clients` is in `[metrics]` (valid) and `[ship]` (invalid): one error, at ship's
    /// line, and the valid line is left alone.
    #[test]
    fn a_key_in_two_tables_is_reported_once_in_its_table() {
        let text = "[metrics]\ntop_clients = 20\n\n[ship]\nurl = \"https://c:1/v1/ingest\"\n\
                    token_file = \"/t\"\ntop_clients = 0\n";
        let errors = check_text(text, "s.toml");
        let found: Vec<(usize, Option<&str>)> =
            errors.iter().map(|e| (e.line, e.key.as_deref())).collect();
        assert_eq!(found, [(7, Some("ship.top_clients"))]);
    }

    /// Values that overflow once in milliseconds, and spools that two writers would share.
    #[test]
    fn overflowing_durations_and_shared_spools_are_errors() {
        let text = "[detect]\nresolve_after_secs = 9223372036854775807\nsuppress_secs = 31622401\n\
                    [connections]\nclosed_retention_secs = 18446744073709551615\n\
                    [ship]\nurl = \"https://c:9443/v1/ingest\"\ntoken_file = \"/t\"\n\
                    [[outputs]]\ntype = \"webhook\"\nurl = \"https://w/\"\n\
                    spool_dir = \"/var/lib/sensor/spool/collector\"\n";
        let errors = check_text(text, "s.toml");
        let found: Vec<(usize, Option<&str>)> =
            errors.iter().map(|e| (e.line, e.key.as_deref())).collect();
        assert_eq!(
            found,
            [
                (2, Some("detect.resolve_after_secs")),
                (3, Some("detect.suppress_secs")),
                (5, Some("connections.closed_retention_secs")),
                (12, Some("outputs[0].spool_dir")),
            ],
            "{errors:?}"
        );
        assert!(errors[0].message.contains("more than a year"), "{errors:?}");
        assert!(errors[3].message.contains("another spool"), "{errors:?}");
        let year = crate::sinks::configure::MAX_DURATION_SECS;
        assert!(check_text(&format!("[detect]\nsuppress_secs = {year}\n"), "s.toml").is_empty());
    }

    #[test]
    fn syntax_errors_are_reported_too() {
        let text = "[capture]\npoll_interval_ms = \"soon\"\nports = [80,\n";
        let errors = check_text(text, "s.toml");
        let found: Vec<(usize, Option<&str>)> =
            errors.iter().map(|e| (e.line, e.key.as_deref())).collect();
        assert_eq!(
            found,
            [
                (2, Some("capture.poll_interval_ms")),
                (3, Some("capture.ports"))
            ]
        );
        assert!(errors[1].message.contains("invalid array"), "{errors:?}");
    }
}
