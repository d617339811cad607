//! Another kernel for the end-to-end tests: Debian bookworm's own linux-image 6.1 (the
//! `cloud-amd64` flavour) booted under qemu with TCG (no KVM here), from an initramfs the test
//! builds: static busybox, the agent, nginx, curl and bpftool with their shared libraries, and
//! an `/init` shell script. No disk, no network device, no kernel modules.
//!
//! The kernel package is fetched with `apt-get download` and unpacked into a cache, never
//! installed on the host (`cargo xtask setup` does it once; the tests find it there).
//!
//! The guest reports to the test on a second serial port (`/dev/ttyS1`; the kernel's console
//! is ttyS0), in sections framed by `@@BEGIN name@@` and `@@END name rc=N@@`, so kernel
//! messages never land inside what the test parses.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::systemd::FileLock;

/// The metapackage whose dependency names the current bookworm 6.1 cloud kernel.
pub const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";

/// Where unpacked kernels are kept: `$HOME/.cache/sensor-kernels/<package>/`.
pub fn kernel_cache() -> PathBuf {
    std::env::var_os("HOME")
        .map_or_else(|| PathBuf::from("/root"), PathBuf::from)
        .join(".cache/sensor-kernels")
}

/// An unpacked kernel package: what qemu boots and the configuration it was built with.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// `linux-image-6.1.0-57-cloud-amd64`
    pub package: String,
    /// The Debian package version, `6.1.192-3`.
    pub version: String,
    /// `uname -r` in the guest, `6.1.0-57-cloud-amd64`.
    pub release: String,
    pub vmlinuz: PathBuf,
    pub config: PathBuf,
}

impl Kernel {
    /// `CONFIG_<key>`'s value in the kernel's own config (`y`, `m`, a number), if set.
    pub fn config_value(&self, key: &str) -> Option<String> {
        let text = fs::read_to_string(&self.config).ok()?;
        let prefix = format!("{key}=");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
    }

    fn from_stamp(dir: &Path, stamp: &str) -> Option<Self> {
        let mut f = stamp.split_whitespace();
        let (package, version, release) = (f.next()?, f.next()?, f.next()?);
        let kernel = Self {
            package: package.to_owned(),
            version: version.to_owned(),
            release: release.to_owned(),
            vmlinuz: dir.join(format!("vmlinuz-{release}")),
            config: dir.join(format!("config-{release}")),
        };
        (kernel.vmlinuz.is_file() && kernel.config.is_file()).then_some(kernel)
    }
}

/// The versioned package the metapackage depends on, from apt's lists (updated once if they
/// do not know it yet).
fn resolve_kernel_package() -> anyhow::Result<String> {
    let lookup = || -> Option<String> {
        let out = Command::new("apt-cache")
            .args(["depends", KERNEL_METAPACKAGE])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let name = l
                .trim()
                .trim_start_matches('|')
                .strip_prefix("Depends:")?
                .trim();
            (name.starts_with("linux-image-6.1.") && name.ends_with("-cloud-amd64"))
                .then(|| name.to_owned())
        })
    };
    if let Some(name) = lookup() {
        return Ok(name);
    }
    apt_update()?;
    lookup().with_context(|| {
        format!("apt-cache depends {KERNEL_METAPACKAGE} names no linux-image-6.1.*-cloud-amd64")
    })
}

/// Runs `cmd`; its standard output, or an error with its standard error.
fn checked(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn apt_update() -> anyhow::Result<()> {
    let status = Command::new("apt-get")
        .args(["update", "-q"])
        .stdout(Stdio::null())
        .status()
        .context("running apt-get update")?;
    if !status.success() {
        bail!("apt-get update failed ({status})");
    }
    Ok(())
}

/// The bookworm 6.1 cloud kernel, downloaded and unpacked once (under a lock, so parallel
/// tests and `cargo xtask setup` fetch it once); later calls only ask apt-cache for its name.
pub fn ensure_kernel() -> anyhow::Result<Kernel> {
    let package = resolve_kernel_package()?;
    let cache = kernel_cache();
    let dir = cache.join(&package);
    // Package names have dots: with_extension would cut them.
    let stamp = cache.join(format!("{package}.stamp"));
    let cached = || {
        fs::read_to_string(&stamp)
            .ok()
            .and_then(|s| Kernel::from_stamp(&dir, &s))
    };
    if let Some(kernel) = cached() {
        return Ok(kernel);
    }
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let _lock = FileLock::acquire(&cache.join("kernels.lock"))?;
    if let Some(kernel) = cached() {
        return Ok(kernel);
    }
    let partial = cache.join(format!("{package}.partial"));
    for stale in [&partial, &dir] {
        if stale.exists() {
            fs::remove_dir_all(stale).with_context(|| format!("removing {}", stale.display()))?;
        }
    }
    fs::create_dir_all(&partial)?;
    let started = Instant::now();
    eprintln!("fetching {package} into {} (once)", dir.display());
    // Not installed: downloaded and unpacked. Downloading as root into a root-owned directory
    // is what apt's sandbox user could not do.
    let download = || {
        Command::new("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root", &package])
            .current_dir(&partial)
            .stdout(Stdio::null())
            .status()
            .context("running apt-get download")
    };
    if !download()?.success() {
        // Lists older than the archive name a version that is gone: refresh and retry once.
        apt_update()?;
        let status = download()?;
        if !status.success() {
            bail!("apt-get download {package} failed ({status})");
        }
    }
    let deb = fs::read_dir(&partial)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    let version = checked(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version"))?
        .trim()
        .to_owned();
    let tree = partial.join("tree");
    checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    // Only boot/ is kept: the guest loads no modules.
    let boot = tree.join("boot");
    let release = fs::read_dir(&boot)
        .with_context(|| format!("{} has no boot/", deb.display()))?
        .flatten()
        .find_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_owned)
        })
        .context("no boot/vmlinuz-* in the package")?;
    for file in [format!("vmlinuz-{release}"), format!("config-{release}")] {
        fs::rename(boot.join(&file), partial.join(&file))
            .with_context(|| format!("moving {file}"))?;
    }
    fs::remove_dir_all(&tree)?;
    fs::remove_file(&deb)?;
    fs::rename(&partial, &dir)
        .with_context(|| format!("{} -> {}", partial.display(), dir.display()))?;
    fs::write(&stamp, format!("{package} {version} {release}\n"))?;
    // Kernels an older metapackage named are not booted any more.
    for entry in fs::read_dir(&cache)?.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("linux-image-")
            && !name.starts_with(&format!("{package}."))
            && name != package
        {
            let _ = fs::remove_dir_all(&path);
            let _ = fs::remove_file(&path);
        }
    }
    eprintln!("unpacked {package} {version} in {:.0?}", started.elapsed());
    cached().context("the unpacked kernel is incomplete")
}

/// The root file system the guest boots into, staged in a directory, then packed as a newc
/// cpio archive. The layout is merged-/usr like bookworm's (`/bin`, `/sbin`, `/lib`,
/// `/lib64` link into `/usr`), so host paths from `ldd` work unchanged inside.
pub struct Initramfs {
    pub root: PathBuf,
    copied: BTreeSet<PathBuf>,
}

impl Initramfs {
    pub fn new(root: &Path) -> anyhow::Result<Self> {
        for d in [
            "usr/bin",
            "usr/sbin",
            "usr/lib",
            "usr/lib64",
            "dev",
            "proc",
            "sys",
            "run",
            "tmp",
            "etc",
            "root",
            "var/lib",
            "var/log",
        ] {
            fs::create_dir_all(root.join(d))?;
        }
        for top in ["bin", "sbin", "lib", "lib64"] {
            std::os::unix::fs::symlink(format!("usr/{top}"), root.join(top))?;
        }
        // nginx's `user root;` looks the user up (glibc's files backend is built in).
        let mut initramfs = Self {
            root: root.to_path_buf(),
            copied: BTreeSet::new(),
        };
        initramfs.file("/etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)?;
        initramfs.file("/etc/group", b"root:x:0:\n", 0o644)?;
        initramfs.file(
            "/etc/nsswitch.conf",
            b"passwd: files\ngroup: files\n",
            0o644,
        )?;
        Ok(initramfs)
    }

    /// The host path of `guest` inside the staged tree.
    pub fn path(&self, guest: &str) -> PathBuf {
        self.root.join(guest.trim_start_matches('/'))
    }

    /// Writes a file (its directory created), replacing whatever was there.
    pub fn file(&mut self, guest: &str, contents: &[u8], mode: u32) -> anyhow::Result<()> {
        let path = self.path(guest);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let _ = fs::remove_file(&path);
        fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    /// Copies a host file (following links) to `guest`.
    fn copy(&mut self, host: &Path, guest: &str, mode: u32) -> anyhow::Result<()> {
        let path = self.path(guest);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let _ = fs::remove_file(&path);
        fs::copy(host, &path)
            .with_context(|| format!("copying {} to {}", host.display(), path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        Ok(())
    }

    /// Static busybox as `/bin/busybox` and a link for each of its applets (the shell and
    /// the tools `/init` uses). Programs added later replace applets of the same name.
    pub fn busybox(&mut self) -> anyhow::Result<()> {
        let host = Path::new("/bin/busybox");
        let static_ = Command::new("ldd")
            .arg(host)
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(false);
        if !static_ {
            bail!(
                "{} is not static (apt-get install busybox-static)",
                host.display()
            );
        }
        self.copy(host, "/bin/busybox", 0o755)?;
        let list = checked(Command::new(host).arg("--list-full"))?;
        for applet in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let link = self.path(applet);
            if link.symlink_metadata().is_ok() {
                continue; // /bin and /usr/bin are one directory here
            }
            if let Some(dir) = link.parent() {
                fs::create_dir_all(dir)?;
            }
            std::os::unix::fs::symlink("/bin/busybox", &link)?;
        }
        Ok(())
    }

    /// A host program at `guest` with every shared library `ldd` names for it (and the
    /// dynamic loader), at the same paths as on the host.
    pub fn program(&mut self, host: &Path, guest: &str) -> anyhow::Result<()> {
        self.copy(host, guest, 0o755)?;
        let out = Command::new("ldd")
            .arg(host)
            .output()
            .with_context(|| format!("ldd {}", host.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("ldd {} failed: {text}", host.display());
        }
        for line in text.lines() {
            if line.contains("not found") {
                bail!("{}: {line}", host.display());
            }
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no file.
            let lib = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next(),
                None => line
                    .split_whitespace()
                    .next()
                    .filter(|p| p.starts_with('/')),
            };
            let Some(lib) = lib.filter(|p| p.starts_with('/')) else {
                continue;
            };
            let lib = PathBuf::from(lib);
            if self.copied.insert(lib.clone()) {
                let guest = lib.to_str().context("library path")?.to_owned();
                self.copy(&lib, &guest, 0o755)?;
            }
        }
        Ok(())
    }

    /// Packs the tree as an uncompressed newc archive (the kernel unpacks it faster than it
    /// would inflate gzip under emulation); returns its size in bytes.
    pub fn pack(&self, out: &Path) -> anyhow::Result<u64> {
        let archive =
            fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        let status = Command::new("sh")
            .arg("-c")
            .arg("find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0")
            .current_dir(&self.root)
            .stdout(archive)
            .status()
            .context("running find | cpio (apt-get install cpio)")?;
        if !status.success() {
            bail!("packing the initramfs failed ({status})");
        }
        Ok(fs::metadata(out)?.len())
    }
}

/// The start of every guest `/init`: mounts, loopback, the report channel on ttyS1, and
/// shell functions `report NAME CMD...` (runs CMD, sends its output and exit code to the test
/// as a section) and `finish` (drains the channel and powers off).
pub const INIT_PRELUDE: &str = r#"#!/bin/sh
# PID 1 of the test guest. Without a /dev/console in the archive the kernel started us with
# no standard descriptors: take them from devtmpfs first.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
ip link set lo up
# The test reads ttyS1 only; the console (ttyS0) also carries kernel messages.
stty -F /dev/ttyS1 raw -echo
exec 3>/dev/ttyS1
report() {
    name=$1
    shift
    "$@" >/tmp/report.out 2>&1
    rc=$?
    echo "@@BEGIN $name@@" >&3
    cat /tmp/report.out >&3
    # The end marker must start a line of its own.
    if [ -s /tmp/report.out ] && [ -n "$(tail -c 1 /tmp/report.out)" ]; then echo >&3; fi
    echo "@@END $name rc=$rc@@" >&3
    echo "guest: $name rc=$rc"
    return $rc
}
uptime_s() { cut -d' ' -f1 /proc/uptime; }
finish() {
    echo "@@DONE@@" >&3
    # Closing a tty waits until its output has drained: nothing is cut off by the power-off.
    exec 3>&-
    poweroff -f
}
"#;

/// How to boot the guest.
#[derive(Debug, Clone)]
pub struct BootOptions {
    pub memory_mib: u32,
    pub cpus: u32,
    pub timeout: Duration,
    pub cmdline: String,
}

impl Default for BootOptions {
    fn default() -> Self {
        Self {
            memory_mib: 1024,
            cpus: 1,
            // Two agent starts under TCG verify ~683k instructions each on 6.1 (270-343 s
            // for the whole run on a quiet 2-CPU machine): room for a busy one.
            timeout: Duration::from_secs(900),
            cmdline: "console=ttyS0 panic=-1 quiet".into(),
        }
    }
}

/// A running qemu; killed on drop, so nothing outlives a failed test.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a boot left: qemu's exit (None when it was killed at the deadline), the console, the
/// report channel and qemu's own messages.
#[derive(Debug)]
pub struct Boot {
    pub status: Option<ExitStatus>,
    pub elapsed: Duration,
    pub console: String,
    pub report: String,
    pub qemu_log: String,
}

impl Boot {
    /// Sections of the report channel by name.
    pub fn sections(&self) -> BTreeMap<String, Section> {
        sections(&self.report)
    }

    /// The guest finished its script and drained its report (`finish` ran).
    pub fn finished(&self) -> bool {
        self.report
            .lines()
            .any(|l| l.trim_end_matches('\r') == "@@DONE@@")
    }

    /// Everything useful when something went wrong.
    pub fn dump(&self) -> String {
        format!(
            "qemu: {:?} after {:.1?}\n--- qemu ---\n{}\n--- console (ttyS0) ---\n{}\n--- report (ttyS1) ---\n{}",
            self.status, self.elapsed, self.qemu_log, self.console, self.report
        )
    }
}

/// Boots `kernel` with `initrd` under TCG (no KVM needed), the console on ttyS0 and the report
/// channel on ttyS1 written to files in `dir`; waits for the guest to power off, or kills it
/// at the deadline.
pub fn boot(kernel: &Kernel, initrd: &Path, dir: &Path, opts: &BootOptions) -> Boot {
    let console = dir.join("console.log");
    let report = dir.join("report.log");
    let qemu_log = dir.join("qemu.log");
    let log = fs::File::create(&qemu_log).expect("qemu log");
    let started = Instant::now();
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .args(["-m", &opts.memory_mib.to_string()])
        .args(["-smp", &opts.cpus.to_string()])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", &opts.cmdline])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", report.display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("qemu log"))
        .stderr(log)
        .spawn()
        .expect("qemu-system-x86_64 (apt-get install qemu-system-x86, or cargo xtask setup)");
    let mut qemu = Qemu(child);
    let status = loop {
        if let Some(status) = qemu.0.try_wait().expect("waiting for qemu") {
            break Some(status);
        }
        if started.elapsed() >= opts.timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(qemu);
    let read = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
    Boot {
        status,
        elapsed: started.elapsed(),
        console: read(&console),
        report: read(&report).replace('\r', ""),
        qemu_log: read(&qemu_log),
    }
}

/// One section of the report: a command's output and exit code.
#[derive(Debug, Clone, Default)]
pub struct Section {
    pub body: String,
    pub rc: Option<i32>,
}

/// Splits the report channel into sections; a section the guest started but never ended
/// (it died in the middle) is kept with `rc: None`.
pub fn sections(report: &str) -> BTreeMap<String, Section> {
    let mut out = BTreeMap::new();
    let mut open: Option<(String, String)> = None;
    for line in report.lines() {
        if let Some(name) = line
            .strip_prefix("@@BEGIN ")
            .and_then(|r| r.strip_suffix("@@"))
        {
            if let Some((n, body)) = open.take() {
                out.insert(n, Section { body, rc: None });
            }
            open = Some((name.to_owned(), String::new()));
        } else if let Some(rest) = line
            .strip_prefix("@@END ")
            .and_then(|r| r.strip_suffix("@@"))
        {
            let (name, rc) = rest.rsplit_once(" rc=").unwrap_or((rest, ""));
            if let Some((n, body)) = open.take() {
                debug_assert_eq!(n, name);
                out.insert(
                    n,
                    Section {
                        body,
                        rc: rc.parse().ok(),
                    },
                );
            }
        } else if let Some((_, body)) = open.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    if let Some((n, body)) = open {
        out.insert(n, Section { body, rc: None });
    }
    out
}

/// Quotes `s` for the guest's shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// nginx's ground-truth log lines (`$remote_addr $remote_port $request_length $bytes_sent`),
/// as `Nginx::records` reads them on the host.
pub fn nginx_records(log: &str) -> Vec<crate::NginxRecord> {
    log.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 4 {
                return None;
            }
            Some(crate::NginxRecord {
                remote: crate::join_host_port(f[0], f[1]),
                request_length: f[2].parse().ok()?,
                bytes_sent: f[3].parse().ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_split_on_markers() {
        let s = sections(
            "noise\n@@BEGIN a@@\nx\ny\n@@END a rc=0@@\n@@BEGIN b c@@\n@@END b c rc=3@@\n@@BEGIN d@@\nz\n",
        );
        assert_eq!(s["a"].body, "x\ny\n");
        assert_eq!(s["a"].rc, Some(0));
        assert_eq!(s["b c"].body, "");
        assert_eq!(s["b c"].rc, Some(3));
        assert_eq!(s["d"].body, "z\n");
        assert_eq!(s["d"].rc, None);
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("127.0.0.1:8000/a"), "127.0.0.1:8000/a");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("%{x}\\n"), r"'%{x}\n'");
    }
}
