//! A real systemd for the service tests: a minimal Debian bookworm tree (debootstrap, cached),
//! booted with `systemd-nspawn -b` on a throwaway overlay, in a cgroup and a bpffs directory
//! of the test's own, with a private network.
//!
//! The host may lack systemd (and here uses a hybrid cgroup layout): the container gets the
//! unified hierarchy (`SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`), nspawn is told not to register
//! with machined and to stay in the caller's cgroup (`--register=no --keep-unit`), and commands
//! run inside through `nsenter` into the container's init. Cleanup kills the nspawn process
//! (machinectl is not used), then everything left in the test's cgroup.

use std::{
    fs,
    io::Write as _,
    os::unix::io::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{TempDir, cgroup2_root, wait_for};

/// Bump when the tree's contents change: a new key builds a new cached tree.
pub const ROOTFS_VERSION: &str = "v1";
pub const ROOTFS_SUITE: &str = "bookworm";
pub const ROOTFS_MIRROR: &str = "http://deb.debian.org/debian";
/// systemd and what the tests drive inside: nginx as the watched server, curl as its client,
/// procps for the unit's `ExecReload=/bin/kill`.
pub const ROOTFS_PACKAGES: &str = "systemd,systemd-sysv,dbus,curl,nginx-light,iproute2,procps";
pub const CACHE_DIR: &str = "/var/cache/sensor-test";

const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The cached tree for the current key.
pub fn rootfs_path() -> PathBuf {
    Path::new(CACHE_DIR).join(format!("{ROOTFS_SUITE}-rootfs-{ROOTFS_VERSION}"))
}

fn rootfs_spec() -> String {
    format!("{ROOTFS_SUITE} {ROOTFS_VERSION} minbase {ROOTFS_PACKAGES} {ROOTFS_MIRROR}\n")
}

/// Written next to the tree once it is complete (outside it: the tests look for traces).
fn stamp_path() -> PathBuf {
    rootfs_path().with_extension("stamp")
}

/// Holds an exclusive flock on a file while alive.
pub(crate) struct FileLock(fs::File);

impl FileLock {
    pub(crate) fn acquire(path: &Path) -> anyhow::Result<Self> {
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock {}", path.display()))?;
        // SAFETY: flock on a valid, open descriptor.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!(
                "flock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Self(file))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // SAFETY: unlocking our own descriptor.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// The cached bookworm tree, built with debootstrap when missing (a minute or two; under a
/// lock, so parallel tests and `cargo xtask setup` build it once).
pub fn ensure_rootfs() -> anyhow::Result<PathBuf> {
    let dir = rootfs_path();
    let stamp = stamp_path();
    if fs::read_to_string(&stamp).ok().as_deref() == Some(rootfs_spec().as_str()) {
        return Ok(dir);
    }
    fs::create_dir_all(CACHE_DIR).with_context(|| format!("creating {CACHE_DIR}"))?;
    let _lock = FileLock::acquire(&Path::new(CACHE_DIR).join("rootfs.lock"))?;
    if fs::read_to_string(&stamp).ok().as_deref() == Some(rootfs_spec().as_str()) {
        return Ok(dir);
    }
    let partial = dir.with_extension("partial");
    let _ = fs::remove_file(&stamp);
    for stale in [&partial, &dir] {
        if stale.exists() {
            fs::remove_dir_all(stale).with_context(|| format!("removing {}", stale.display()))?;
        }
    }
    let started = Instant::now();
    eprintln!(
        "building the {ROOTFS_SUITE} test tree in {} (debootstrap, once)",
        dir.display()
    );
    let status = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={ROOTFS_PACKAGES}"),
            ROOTFS_SUITE,
        ])
        .arg(&partial)
        .arg(ROOTFS_MIRROR)
        .stdout(Stdio::null())
        .status()
        .context("running debootstrap (Debian package debootstrap)")?;
    if !status.success() {
        let _ = fs::remove_dir_all(&partial);
        bail!("debootstrap failed ({status})");
    }
    fs::write(partial.join("etc/hostname"), "sensor-test\n")?;
    // Downloaded packages are not needed in the tree.
    let archives = partial.join("var/cache/apt/archives");
    if let Ok(entries) = fs::read_dir(&archives) {
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "deb") {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    fs::rename(&partial, &dir)
        .with_context(|| format!("{} -> {}", partial.display(), dir.display()))?;
    fs::write(&stamp, rootfs_spec())?;
    eprintln!("built {} in {:.0?}", dir.display(), started.elapsed());
    Ok(dir)
}

/// An overlay of the cached tree: the container's root, writable, discarded afterwards.
pub struct Overlay {
    pub root: PathBuf,
    mounted: bool,
    _dir: TempDir,
}

impl Overlay {
    pub fn new(name: &str) -> Self {
        let lower = ensure_rootfs().expect("the cached Debian tree");
        let dir = TempDir::new(name);
        let (upper, work, root) = (
            dir.path.join("upper"),
            dir.path.join("work"),
            dir.path.join("root"),
        );
        for d in [&upper, &work, &root] {
            fs::create_dir_all(d).expect("overlay dirs");
        }
        crate::run_ok(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!(
                    "lowerdir={},upperdir={},workdir={}",
                    lower.display(),
                    upper.display(),
                    work.display()
                ))
                .arg(&root),
        );
        Self {
            root,
            mounted: true,
            _dir: dir,
        }
    }

    /// A path inside the tree, as the host sees it.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    fn unmount(&mut self) {
        if !self.mounted {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = Command::new("umount")
                .arg(&self.root)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                break;
            }
            if Instant::now() >= deadline {
                let _ = Command::new("umount").arg("-l").arg(&self.root).status();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.mounted = false;
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// The output of a command run inside the container.
pub struct Run {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Self {
        Self {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn ok(&self) -> bool {
        self.status.success()
    }
}

/// A booted Debian with systemd as PID 1.
pub struct Container {
    pub name: String,
    pub overlay: Overlay,
    nspawn: Child,
    leader: i32,
    /// The test's own cgroup (v2); the container's root cgroup is `payload` below it.
    cgroup: PathBuf,
    /// The test's own directory on the host bpffs, the container's /sys/fs/bpf.
    pub bpffs: PathBuf,
    log: PathBuf,
    _dir: TempDir,
}

static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Container {
    pub fn boot(name: &str) -> Self {
        let name = format!(
            "sensor-test-{name}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let overlay = Overlay::new(&name);
        let dir = TempDir::new(&format!("{name}-log"));
        let log = dir.path.join("nspawn.log");
        let cgroup = cgroup2_root().join(&name);
        fs::create_dir(&cgroup).expect("the container's cgroup");
        let bpffs = Path::new("/sys/fs/bpf").join(&name);
        fs::create_dir(&bpffs).expect("the container's bpffs directory");
        let out = fs::File::create(&log).expect("nspawn log");
        let err = out.try_clone().expect("nspawn log");
        // Join the cgroup first, then become nspawn (which stays there: --keep-unit).
        let script = format!(
            "echo $$ > '{}/cgroup.procs' && exec systemd-nspawn \"$@\"",
            cgroup.display()
        );
        let nspawn = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg("--quiet")
            .arg(format!("--directory={}", overlay.root.display()))
            .args([
                "--boot",
                "--register=no",
                "--keep-unit",
                "--private-network",
            ])
            .arg(format!("--machine={name}"))
            // bpf(2) is outside nspawn's default seccomp allow list; the agent needs these
            // capabilities (CAP_NET_ADMIN comes with --private-network, CAP_SYS_ADMIN is
            // nspawn's default and what systemd inside needs for service sandboxing).
            .arg("--system-call-filter=bpf")
            .arg("--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN")
            .arg(format!("--bind={}:/sys/fs/bpf", bpffs.display()))
            .arg("--console=read-only")
            .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| {
                let _ = fs::remove_dir(&cgroup);
                let _ = fs::remove_dir(&bpffs);
                panic!("spawning systemd-nspawn: {e}")
            });
        let nspawn_pid = nspawn.id() as i32;
        let mut container = Self {
            name,
            overlay,
            nspawn,
            leader: 0,
            cgroup,
            bpffs,
            log,
            _dir: dir,
        };
        wait_for("the container to boot", Duration::from_secs(90), || {
            if let Ok(Some(status)) = container.nspawn.try_wait() {
                panic!("systemd-nspawn exited ({status}): {}", container.log());
            }
            // nspawn forks helpers while it sets up; the leader is its child that became
            // systemd, in a PID namespace of its own.
            container.leader = container_init(nspawn_pid).ok_or("no init yet")?;
            let run = container.sh("timeout 30 systemctl is-system-running --wait");
            match run.stdout.trim() {
                "running" | "degraded" => Ok(()),
                other => Err(format!("{other} {}", run.stderr.trim())),
            }
        });
        container
    }

    /// Runs `script` with /bin/sh inside the container (a clean environment, as root).
    pub fn sh(&self, script: &str) -> Run {
        let out = Command::new("nsenter")
            .arg("-t")
            .arg(self.leader.to_string())
            .args(["-m", "-u", "-i", "-n", "-p", "-C", "--"])
            .args(["/usr/bin/env", "-i", PATH, "LANG=C.UTF-8", "/bin/sh", "-c"])
            .arg(script)
            .stdin(Stdio::null())
            .output()
            .expect("nsenter");
        Run::from(out)
    }

    /// Like `sh`, but panics with the output unless the script succeeds; returns stdout.
    pub fn sh_ok(&self, script: &str) -> String {
        let run = self.sh(script);
        assert!(
            run.ok(),
            "in the container: `{script}` failed ({}):\n{}\n{}",
            run.status,
            run.stdout,
            run.stderr
        );
        run.stdout
    }

    /// Writes a file into the container's tree.
    pub fn write(&self, inside: &str, contents: &[u8], mode: u32) {
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.overlay.path(inside);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).expect("dir in container");
        }
        let mut f = fs::File::create(&path).expect("file in container");
        f.write_all(contents).expect("write in container");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// The container's root cgroup, as the host sees it.
    pub fn host_cgroup(&self) -> PathBuf {
        self.cgroup.join("payload")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The child of nspawn (`parent`) that runs systemd in its own PID namespace, from /proc.
fn container_init(parent: i32) -> Option<i32> {
    let own_pidns = fs::read_link("/proc/self/ns/pid").ok()?;
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let stat = fs::read_to_string(e.path().join("stat")).ok()?;
        // "pid (comm) state ppid ...": the command name may contain spaces.
        let (head, rest) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1;
        let ppid: i32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        let pidns = fs::read_link(e.path().join("ns/pid")).ok()?;
        (ppid == parent && comm == "systemd" && pidns != own_pidns).then_some(pid)
    })
}

/// Removes a cgroup tree bottom-up, retrying while its processes exit.
fn remove_cgroup_tree(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while path.exists() && Instant::now() < deadline {
        let mut dirs = Vec::new();
        collect_dirs(path, &mut dirs);
        // Deepest first.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in &dirs {
            let _ = fs::remove_dir(d);
        }
        if path.exists() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn collect_dirs(path: &Path, out: &mut Vec<PathBuf>) {
    out.push(path.to_path_buf());
    if let Ok(entries) = fs::read_dir(path) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM asks nspawn to power the container off (systemd shuts down in order).
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !matches!(self.nspawn.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        // Whatever is left in the test's cgroup (the container's processes) goes too.
        let _ = fs::write(self.cgroup.join("cgroup.kill"), "1");
        remove_cgroup_tree(&self.cgroup);
        // nspawn mirrors the cgroup into the named v1 hierarchy on hybrid hosts.
        let v1 = Path::new("/sys/fs/cgroup/systemd").join(&self.name);
        if v1.exists() {
            remove_cgroup_tree(&v1);
        }
        self.overlay.unmount();
        // Pins left behind: removing a link pin detaches its program.
        let _ = fs::remove_dir_all(&self.bpffs);
    }
}

/// The .deb under test: `$SENSOR_DEB`, or built once with `cargo xtask deb` (release build).
pub fn deb_package() -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    if let Some(deb) = std::env::var_os("SENSOR_DEB") {
        return PathBuf::from(deb);
    }
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(deb) = built.as_ref() {
        return deb.clone();
    }
    eprintln!("SENSOR_DEB not set: building the package with `cargo xtask deb`");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["run", "--quiet", "--package", "xtask", "--", "deb"])
        .current_dir(&workspace)
        .stderr(Stdio::inherit())
        .output()
        .expect("cargo xtask deb");
    assert!(out.status.success(), "cargo xtask deb failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = PathBuf::from(stdout.lines().last().expect("a .deb path").trim());
    assert!(deb.exists(), "{} missing", deb.display());
    *built = Some(deb.clone());
    deb
}

/// Runs `command` in the tree with `systemd-nspawn` but without booting it: no systemd runs
/// (no /run/systemd/system), as in a chroot, a build container or an image being prepared.
pub fn run_without_systemd(overlay: &Overlay, command: &[&str]) -> Run {
    let name = format!(
        "sensor-test-nosd-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let cgroup = cgroup2_root().join(&name);
    fs::create_dir(&cgroup).expect("a cgroup for nspawn");
    let script = format!(
        "echo $$ > '{}/cgroup.procs' && exec systemd-nspawn \"$@\"",
        cgroup.display()
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg("--quiet")
        .arg(format!("--directory={}", overlay.root.display()))
        .args([
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--pipe",
        ])
        .arg(format!("--machine={name}"))
        .arg("--setenv=DEBIAN_FRONTEND=noninteractive")
        .arg("--")
        .args(command)
        .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
        .stdin(Stdio::null())
        .output();
    let _ = fs::write(cgroup.join("cgroup.kill"), "1");
    remove_cgroup_tree(&cgroup);
    let v1 = Path::new("/sys/fs/cgroup/systemd").join(&name);
    if v1.exists() {
        remove_cgroup_tree(&v1);
    }
    Run::from(out.expect("spawning systemd-nspawn"))
}
