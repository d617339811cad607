//! The agent as a systemd service: install/uninstall, sd_notify and the watchdog, SIGHUP
//! reloads, `check-config`, `status` and `doctor`. See docs/systemd.md.

pub mod check;
pub mod doctor;
pub mod install;
pub mod notify;
pub mod reload;
pub mod status;

/// Exit status for an invalid configuration (sysexits.h EX_CONFIG); the unit's
/// `RestartPreventExitStatus=78` keeps systemd from restarting into the same error.
pub const EXIT_CONFIG: i32 = 78;

/// Ends the process with [`EXIT_CONFIG`] when `result` failed on the configuration.
pub fn exit_on_config_error<T>(result: anyhow::Result<T>) -> anyhow::Result<T> {
    if let Err(e) = &result
        && e.chain().any(|c| c.is::<crate::config::ConfigError>())
    {
        eprintln!("Error: {e:#}");
        std::process::exit(EXIT_CONFIG);
    }
    result
}
