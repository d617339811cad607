//! `sensor doctor`: what this kernel allows the agent, before (or instead of) starting it.

use anyhow::Context as _;

use crate::{cli::DoctorArgs, config::Config, kernel::probe};

/// Exit status when the agent cannot run here (sysexits.h EX_UNAVAILABLE).
const EXIT_UNAVAILABLE: i32 = 69;

pub fn doctor(args: &DoctorArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::embedded()?,
    };
    if let Some(cgroup) = &args.cgroup {
        config.capture.cgroup = cgroup.display().to_string();
    }
    if let Some(path) = args.live_read {
        config.capture.live_read = path;
    }
    let report = probe::doctor(
        std::path::Path::new(&config.capture.cgroup),
        config.capture.live_read,
    );
    let text = if args.json {
        let mut json = serde_json::to_string_pretty(&report).context("encoding the report")?;
        json.push('\n');
        json
    } else {
        report.text()
    };
    crate::stdout::print_out(&text)?;
    if !report.can_run {
        std::process::exit(EXIT_UNAVAILABLE);
    }
    Ok(())
}
