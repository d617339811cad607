//! `sensor install` / `sensor uninstall`: the agent as a systemd service, from a source build.
//!
//! Install copies the running binary to /usr/local/bin/sensor, writes the unit to
//! /etc/systemd/system/sensor.service, the commented default configuration to
//! /etc/sensor/sensor.toml and a per-deployment secret to /etc/sensor/identity.key (both only
//! when absent: an existing configuration is never overwritten), and creates /var/lib/sensor
//! (0700, root). Uninstall stops and disables the service and removes the unit and the binary;
//! `--purge` also removes the configuration, the secret and the saved state. The Debian package
//! installs the same files under /usr/bin and /lib/systemd/system (packaging/deb).

use std::{
    fs,
    io::{ErrorKind, Read as _, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use crate::{
    cli::{InstallArgs, UninstallArgs},
    config::{Config, State, installed_config},
    stdout::{noteln, outln},
};

/// The unit as the Debian package ships it (binary in /usr/bin).
pub const UNIT: &str = include_str!("../../../packaging/sensor.service");
pub const UNIT_NAME: &str = "sensor.service";
const PACKAGE_BIN: &str = "/usr/bin/sensor";

pub const BIN_PATH: &str = "/usr/local/bin/sensor";
pub const UNIT_PATH: &str = "/etc/systemd/system/sensor.service";
/// Where the Debian package puts its unit (and merged-/usr systems show it twice).
const PACKAGE_UNIT_PATHS: [&str; 2] = [
    "/lib/systemd/system/sensor.service",
    "/usr/lib/systemd/system/sensor.service",
];
pub const CONFIG_DIR: &str = "/etc/sensor";
pub const CONFIG_PATH: &str = "/etc/sensor/sensor.toml";
pub const STATE_DIR: &str = "/var/lib/sensor";
const RELOAD_HELPER: &str = "/bin/kill";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{0} needs root")]
    NotRoot(&'static str),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`systemctl {args}` failed ({status}): {stderr}")]
    Systemctl {
        args: String,
        status: String,
        stderr: String,
    },
    #[error(
        "the Debian package `sensor` provides the service ({0}); manage it with apt/dpkg \
         (`apt remove sensor`, `apt purge sensor`) instead"
    )]
    PackageInstalled(String),
    #[error("--now needs a running systemd (no /run/systemd/system); the files are installed")]
    NoSystemd,
    #[error("the embedded unit has no `ExecStart={PACKAGE_BIN} ` line to rewrite")]
    BadTemplate,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The unit for a binary at `bin`.
pub fn render_unit(bin: &Path) -> Result<String, InstallError> {
    let from = format!("ExecStart={PACKAGE_BIN} ");
    if !UNIT.contains(&from) {
        return Err(InstallError::BadTemplate);
    }
    Ok(UNIT.replace(&from, &format!("ExecStart={} ", bin.display())))
}

/// Absolute paths, under an optional staging root.
struct Layout {
    root: Option<PathBuf>,
}

impl Layout {
    fn path(&self, absolute: &str) -> PathBuf {
        match &self.root {
            Some(root) => root.join(absolute.trim_start_matches('/')),
            None => PathBuf::from(absolute),
        }
    }

    fn live(&self) -> bool {
        self.root.is_none()
    }
}

fn require_root(what: &'static str) -> Result<(), InstallError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(InstallError::NotRoot(what));
    }
    Ok(())
}

/// Whether systemd is the running service manager (sd_booted(3)).
fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn systemctl(args: &[&str]) -> Result<(), InstallError> {
    let out = Command::new("systemctl")
        .args(args)
        .output()
        .map_err(io_err(Path::new("systemctl")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(InstallError::Systemctl {
            args: args.join(" "),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Writes `contents` to `path` atomically (temporary file in the same directory, then rename),
/// with `mode`. Replacing a running binary this way never hits "text file busy".
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let name = path
        .file_name()
        .map_or_else(|| "sensor".to_owned(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.sensor-install-{}", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// Creates `path` with `contents` and `mode` unless it exists. Returns whether it was created.
fn create_new(path: &Path, contents: &[u8], mode: u32) -> Result<bool, InstallError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
    {
        Ok(mut f) => {
            f.write_all(contents)
                .and_then(|()| f.set_permissions(fs::Permissions::from_mode(mode)))
                .and_then(|()| f.sync_all())
                .map_err(io_err(path))?;
            Ok(true)
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// A directory with exactly `mode`, owned by root.
fn private_dir(path: &Path, mode: u32) -> Result<(), InstallError> {
    fs::create_dir_all(path).map_err(io_err(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))?;
    std::os::unix::fs::chown(path, Some(0), Some(0)).map_err(io_err(path))
}

/// A fresh per-deployment secret: 32 random bytes as 64 hex digits and a newline.
pub fn new_secret() -> Result<String, InstallError> {
    let urandom = Path::new("/dev/urandom");
    let mut bytes = [0u8; 32];
    fs::File::open(urandom)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io_err(urandom))?;
    let mut hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    hex.push('\n');
    Ok(hex)
}

fn package_unit() -> Option<&'static str> {
    PACKAGE_UNIT_PATHS
        .into_iter()
        .find(|p| Path::new(p).exists())
}

pub fn install(args: &InstallArgs) -> anyhow::Result<()> {
    require_root("sensor install")?;
    let layout = Layout {
        root: args.root.clone(),
    };
    if layout.live() {
        if let Some(unit) = package_unit() {
            return Err(InstallError::PackageInstalled(unit.to_owned()).into());
        }
        if args.now && !systemd_running() {
            return Err(InstallError::NoSystemd.into());
        }
    }

    // The binary: this very executable.
    let bin = layout.path(BIN_PATH);
    let exe = std::env::current_exe().map_err(io_err(Path::new("/proc/self/exe")))?;
    let same = fs::canonicalize(&bin).is_ok_and(|b| fs::canonicalize(&exe).is_ok_and(|e| e == b));
    if same {
        outln!("{} is this binary; kept", bin.display())?;
    } else {
        let bytes = fs::read(&exe).map_err(io_err(&exe))?;
        write_atomic(&bin, &bytes, 0o755)?;
        outln!("installed {}", bin.display())?;
    }

    // The unit: owned by the installer, always rewritten.
    let unit = layout.path(UNIT_PATH);
    write_atomic(&unit, render_unit(Path::new(BIN_PATH))?.as_bytes(), 0o644)?;
    outln!("installed {}", unit.display())?;

    // Configuration and secret: created once, never overwritten.
    let config_dir = layout.path(CONFIG_DIR);
    fs::create_dir_all(&config_dir).map_err(io_err(&config_dir))?;
    let config = layout.path(CONFIG_PATH);
    if create_new(&config, installed_config().as_bytes(), 0o644)? {
        outln!("created {} (the commented defaults)", config.display())?;
    } else {
        outln!("kept existing {}", config.display())?;
        if let Err(e) = Config::load(&config) {
            eprintln!("warning: {e:#} (see `sensor check-config`)");
        }
    }
    let running_config = Config::load(&config).or_else(|_| Config::embedded())?;
    let secret_file = &running_config.identity.secret_file;
    if secret_file.as_os_str().is_empty() {
        outln!("[identity] secret_file is empty: no secret file created here")?;
    } else if !secret_file.is_absolute() {
        eprintln!(
            "warning: [identity] secret_file `{}` is not an absolute path; no secret created",
            secret_file.display()
        );
    } else {
        let key_path = layout.path(&secret_file.display().to_string());
        if create_new(&key_path, new_secret()?.as_bytes(), 0o600)? {
            outln!("created {} (mode 0600)", key_path.display())?;
        } else {
            outln!("kept existing {}", key_path.display())?;
        }
    }

    // State directory (systemd's StateDirectory= keeps it 0700 as well).
    let state = layout.path(STATE_DIR);
    private_dir(&state, 0o700)?;
    outln!("state directory {} (0700, root)", state.display())?;

    if !Path::new(RELOAD_HELPER).exists() {
        eprintln!(
            "warning: {RELOAD_HELPER} is missing (Debian: package procps); `systemctl reload \
             sensor` needs it"
        );
    }
    if !layout.live() {
        return Ok(());
    }
    if systemd_running() {
        systemctl(&["daemon-reload"])?;
    }
    if args.enable {
        systemctl(&["enable", UNIT_NAME])?;
        outln!("enabled {UNIT_NAME}")?;
    }
    if args.now {
        systemctl(&["restart", UNIT_NAME])?;
        outln!("started {UNIT_NAME}")?;
    } else {
        outln!(
            "start it with: systemctl {} sensor",
            if args.enable { "start" } else { "enable --now" }
        )?;
    }
    Ok(())
}

pub fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    require_root("sensor uninstall")?;
    let layout = Layout {
        root: args.root.clone(),
    };
    let unit = layout.path(UNIT_PATH);
    if layout.live()
        && !unit.exists()
        && let Some(package) = package_unit()
    {
        return Err(InstallError::PackageInstalled(package.to_owned()).into());
    }
    // What the configuration says about state and pins (defaults when unreadable).
    let config_path = layout.path(CONFIG_PATH);
    let config = Config::load(&config_path).or_else(|_| Config::embedded())?;

    if layout.live() && unit.exists() {
        // Stopping detaches the programs (the agent removes its pins on SIGTERM).
        let steps: &[&[&str]] = if systemd_running() {
            &[&["stop", UNIT_NAME], &["disable", UNIT_NAME]]
        } else {
            &[&["disable", UNIT_NAME]]
        };
        for args in steps {
            if let Err(e) = systemctl(args) {
                eprintln!("warning: {e}");
            }
        }
    }
    remove_file(&unit)?;
    // Drop-ins made with `systemctl edit sensor`.
    remove_tree(&layout.path("/etc/systemd/system/sensor.service.d"))?;
    if layout.live() && systemd_running() {
        systemctl(&["daemon-reload"])?;
        let _ = systemctl(&["reset-failed", UNIT_NAME]);
    }
    remove_file(&layout.path(BIN_PATH))?;

    // Pinned programs would keep counting without an agent: remove them, then the pin dir.
    if layout.live() {
        remove_pins(&config.state.bpf_pin_dir);
    }

    if args.purge {
        remove_file(&config_path)?;
        // The secret install created, and the configured one if it lives elsewhere.
        remove_file(&layout.path(crate::config::INSTALLED_SECRET))?;
        if config.identity.secret_file.is_absolute() {
            remove_file(&layout.path(&config.identity.secret_file.display().to_string()))?;
        }
        remove_tree(&layout.path(STATE_DIR))?;
        if config.state.dir != State::default().dir {
            // A custom state directory may hold other things: only the agent's files go.
            let dir = layout.path(&config.state.dir.display().to_string());
            for name in crate::model::state::FILE_NAMES {
                remove_file(&dir.join(name))?;
            }
        }
        let config_dir = layout.path(CONFIG_DIR);
        match fs::remove_dir(&config_dir) {
            Ok(()) => outln!("removed {}", config_dir.display())?,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(_) => eprintln!(
                "warning: {} is not empty (files not created by sensor install); kept",
                config_dir.display()
            ),
        }
    } else {
        outln!(
            "kept {}, {} and {} (remove them with --purge)",
            config_path.display(),
            layout
                .path(&config.identity.secret_file.display().to_string())
                .display(),
            layout.path(STATE_DIR).display()
        )?;
    }
    Ok(())
}

fn remove_file(path: &Path) -> Result<(), InstallError> {
    match fs::remove_file(path) {
        Ok(()) => {
            noteln!("removed {}", path.display());
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn remove_tree(path: &Path) -> Result<(), InstallError> {
    match fs::remove_dir_all(path) {
        Ok(()) => {
            noteln!("removed {}", path.display());
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn remove_pins(pin_dir: &Path) {
    let Ok(entries) = fs::read_dir(pin_dir) else {
        return;
    };
    for entry in entries.flatten() {
        noteln!(
            "removing pinned state {} (detaches its programs)",
            entry.path().display()
        );
        crate::kernel::remove_instance(&entry.path());
    }
    if fs::remove_dir(pin_dir).is_ok() {
        noteln!("removed {}", pin_dir.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_points_at_the_installed_binary() {
        let unit = render_unit(Path::new(BIN_PATH)).unwrap();
        assert!(
            unit.contains(
                "\nExecStart=/usr/local/bin/sensor run --config /etc/sensor/sensor.toml\n"
            )
        );
        assert!(!unit.contains("ExecStart=/usr/bin/"));
        // Everything else is the packaged unit.
        let differing: Vec<(&str, &str)> = unit
            .lines()
            .zip(UNIT.lines())
            .filter(|(a, b)| a != b)
            .collect();
        assert_eq!(differing.len(), 1, "{differing:?}");
        assert_eq!(unit.lines().count(), UNIT.lines().count());
    }

    #[test]
    fn unit_has_the_service_contract() {
        for line in [
            "Type=notify",
            "NotifyAccess=main",
            "ExecReload=/bin/kill -HUP $MAINPID",
            "Restart=on-failure",
            "RestartPreventExitStatus=78",
            "WatchdogSec=30s",
            "CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_NET_ADMIN",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ReadWritePaths=/sys/fs/bpf",
            "StateDirectory=sensor",
            "RuntimeDirectory=sensor",
            "LimitMEMLOCK=infinity",
            "SystemCallFilter=bpf",
            "WantedBy=multi-user.target",
        ] {
            assert!(
                UNIT.lines().any(|l| l == line),
                "packaging/sensor.service lacks `{line}`"
            );
        }
        // The paths the unit grants are the defaults the agent uses.
        let defaults = Config::embedded().unwrap();
        assert_eq!(defaults.state.dir, Path::new(STATE_DIR));
        assert!(defaults.state.bpf_pin_dir.starts_with("/sys/fs/bpf"));
        assert!(defaults.api.socket.starts_with("/run/sensor"));
        assert!(UNIT.contains(&format!("--config {CONFIG_PATH}")));
    }

    #[test]
    fn secrets_are_64_hex_digits_and_differ() {
        let (a, b) = (new_secret().unwrap(), new_secret().unwrap());
        assert_eq!(a.len(), 65);
        assert!(a.trim_end().chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn create_new_never_overwrites() {
        let dir = std::env::temp_dir().join(format!("sensor-install-{}", std::process::id()));
        let path = dir.join("etc/sensor/sensor.toml");
        assert!(create_new(&path, b"first", 0o600).unwrap());
        assert!(!create_new(&path, b"second", 0o600).unwrap());
        assert_eq!(fs::read(&path).unwrap(), b"first");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        write_atomic(&dir.join("bin/sensor"), b"x", 0o755).unwrap();
        let mode = fs::metadata(dir.join("bin/sensor"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o755);
        let _ = fs::remove_dir_all(&dir);
    }
}
