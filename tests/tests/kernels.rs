//! The agent on another kernel: Debian bookworm's own linux-image 6.1 (`cloud-amd64`), booted
//! under qemu with TCG. Inside, the real agent watches a real nginx while curl drives
//! keep-alive GETs and a POST from several source addresses; its per-connection counts must
//! equal nginx's and curl's own accounts exactly, nothing may be lost, and after SIGTERM
//! nothing may be attached to the cgroup or pinned in bpffs.
//!
//! `sensor doctor` runs first: it must find that the agent can run, and the first phase (the
//! agent on `auto`) must take the path the doctor predicts. A second phase repeats the traffic
//! with `sensor run --live-read map` (the read path without the iterator program).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Instant,
};

use sensor_tests::{
    guest::{self, Boot, BootOptions, Initramfs, Section, shell_quote},
    *,
};

const PORT: u16 = 8000;
const POLL_MS: u64 = 200;
const SOCKET: &str = "/run/sensor.sock";
const PIN_DIR: &str = "/sys/fs/bpf/sensor";
const CGROUP: &str = "/sys/fs/cgroup";
/// Replies nginx serves from files, and the POST body curl sends.
const REPLY: (&str, usize) = ("reply.bin", 300_000);
const HEAD: (&str, usize) = ("head.txt", 1_234);
const POST_BODY: (&str, usize) = ("/srv/post.bin", 100_000);
/// What the agent attaches to its cgroup, by name.
const PROGRAMS: [&str; 3] = ["sensor_egress", "sensor_ingress", "sensor_sockops"];
/// What the agent needs of a kernel, as the kernel package's own config must say.
const KERNEL_CONFIG: [&str; 6] = [
    "CONFIG_BPF_SYSCALL",
    "CONFIG_BPF_JIT",
    "CONFIG_CGROUP_BPF",
    "CONFIG_CGROUPS",
    "CONFIG_DEBUG_INFO_BTF",
    "CONFIG_BPF_EVENTS",
];

/// One run of the agent in the guest with its own client addresses (`{net}.2` ...).
struct Phase {
    name: &'static str,
    extra: &'static [&'static str],
    net: &'static str,
}

const PHASE1: Phase = Phase {
    name: "p1",
    extra: &[],
    net: "127.0.0",
};
const PHASE2: Phase = Phase {
    name: "p2",
    extra: &["--live-read", "map"],
    net: "127.0.1",
};

impl Phase {
    /// Each client is one curl process: its operations share one keep-alive connection.
    fn clients(&self) -> Vec<(String, Vec<Vec<String>>)> {
        let url = |path: &str| format!("http://127.0.0.1:{PORT}/{path}");
        let get = |src: &str, path: &str| op(&["--interface", src, &url(path)]);
        let post = |src: &str| {
            op(&[
                "--interface",
                src,
                "--data-binary",
                &format!("@{}", POST_BODY.0),
                &url("post"),
            ])
        };
        let (a, b, c) = (
            format!("{}.2", self.net),
            format!("{}.3", self.net),
            format!("{}.4", self.net),
        );
        vec![
            (
                "a".into(),
                vec![
                    get(&a, REPLY.0),
                    get(&a, HEAD.0),
                    get(&a, REPLY.0),
                    get(&a, HEAD.0),
                ],
            ),
            ("b".into(), vec![post(&b), get(&b, HEAD.0), post(&b)]),
            ("c".into(), vec![get(&c, REPLY.0)]),
        ]
    }

    /// The guest's shell lines for this phase.
    fn script(&self) -> String {
        let p = self.name;
        let extra: Vec<String> = self.extra.iter().map(|a| shell_quote(a)).collect();
        let mut s = format!(
            "echo \"guest: phase {p} at $(uptime_s) s\"\nif report {p}.start start_agent {p} {}; then\n",
            extra.join(" ")
        );
        s += &format!("    report {p}.attached bpftool -j cgroup show {CGROUP}\n");
        s += &format!("    report {p}.progs bpftool -j prog show\n");
        let clients = self.clients();
        for (name, ops) in &clients {
            s += &format!("    report {p}.curl.{name} {}\n", curl_line(ops));
        }
        s += &format!(
            "    report {p}.wait-closed wait_closed {n}\n    report {p}.conns sensor conns --json --socket {SOCKET}\n    \
             report {p}.health curl -sS --unix-socket {SOCKET} http://sensor/v1/health\n    \
             report {p}.status sensor status --socket {SOCKET}\nfi\n\
             report {p}.stop stop_agent\nreport {p}.detached wait_detached\n\
             report {p}.cgroup-after bpftool -j cgroup show {CGROUP}\n\
             report {p}.tree-after bpftool -j cgroup tree {CGROUP}\n\
             report {p}.progs-after bpftool -j prog show\n\
             report {p}.pinned-after find /sys/fs/bpf -mindepth 1 ! -type d\n\
             report {p}.dirs-after find /sys/fs/bpf -mindepth 1 -type d\n\
             report {p}.nginx-log cat /var/log/nginx/gt.log\n\
             report {p}.agent-log cat /tmp/agent-{p}.log\n",
            n = clients.len()
        );
        s
    }
}

/// curl with the same per-operation options as the host harness's `curl()`.
fn curl_line(ops: &[Vec<String>]) -> String {
    std::iter::once("curl".to_owned())
        .chain(curl_args(ops))
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The guest's helpers (after `guest::INIT_PRELUDE`): start, wait for and stop the agent.
const HELPERS: &str = r#"
AGENT_FLAGS="--fresh --ports @PORT@ --cgroup @CGROUP@ --socket @SOCKET@ --state-dir /var/lib/sensor --pin-dir @PIN_DIR@ --poll-interval-ms @POLL_MS@"
now_s() { cut -d. -f1 /proc/uptime; }
# alive PID: running and not a zombie (PID 1 reaps its children only in `wait`).
alive() {
    st=$(cut -d' ' -f3 /proc/$1/stat 2>/dev/null)
    [ -n "$st" ] && [ "$st" != Z ]
}
# start_agent PHASE [FLAG...]: the agent in the background, waited for until its API answers.
start_agent() {
    phase=$1
    shift
    rm -rf @SOCKET@ /var/lib/sensor
    t0=$(uptime_s)
    RUST_LOG=info sensor run $AGENT_FLAGS "$@" >/dev/null 2>/tmp/agent-$phase.log &
    AGENT=$!
    # Verification under TCG is some 50x slower than on hardware: 6.1 walks ~683k
    # instructions of sensor_ingress, 73-94 s here (on hardware, about a second).
    deadline=$(($(now_s) + 300))
    while alive $AGENT; do
        # Probing only once the socket exists leaves the one CPU to the verifier meanwhile.
        if [ -S @SOCKET@ ] && sensor conns --json --socket @SOCKET@ >/dev/null 2>&1; then
            echo "agent pid $AGENT (sensor run $AGENT_FLAGS $*) started at ${t0} s, API up at $(uptime_s) s"
            return 0
        fi
        if [ "$(now_s)" -ge $deadline ]; then
            echo "agent API not up 300 s after start"
            return 1
        fi
        sleep 0.1
    done
    echo "agent exited during start-up:"
    cat /tmp/agent-$phase.log
    return 1
}
# wait_closed N: until the agent lists exactly N connections, all closed (bounded).
wait_closed() {
    deadline=$(($(now_s) + 60))
    while :; do
        sensor conns --json --socket @SOCKET@ >/tmp/conns.json 2>&1
        closed=$(grep -o '"state": *"closed"' /tmp/conns.json | wc -l)
        listed=$(grep -o '"cookie"' /tmp/conns.json | wc -l)
        if [ "$closed" -eq "$1" ] && [ "$listed" -eq "$1" ]; then
            echo "$closed connections closed at $(uptime_s) s"
            return 0
        fi
        if [ "$(now_s)" -ge $deadline ]; then
            echo "after 60 s: $closed closed of $listed listed (want $1)"
            return 1
        fi
        sleep 0.2
    done
}
# stop_agent: SIGTERM, as an operator stopping the service, then its exit status.
stop_agent() {
    [ -n "$AGENT" ] || { echo "no agent was started"; return 1; }
    kill -TERM $AGENT
    deadline=$(($(now_s) + 60))
    while alive $AGENT; do
        if [ "$(now_s)" -ge $deadline ]; then
            echo "agent still running 60 s after SIGTERM"
            kill -KILL $AGENT
            wait $AGENT
            AGENT=
            return 1
        fi
        sleep 0.1
    done
    wait $AGENT
    rc=$?
    AGENT=
    echo "agent exited with status $rc"
    return $rc
}
# Detached programs are freed asynchronously: wait (bounded) until none is loaded.
wait_detached() {
    deadline=$(($(now_s) + 30))
    while bpftool prog show | grep -q 'name sensor_'; do
        if [ "$(now_s)" -ge $deadline ]; then
            echo "sensor programs still loaded 30 s after the agent stopped:"
            bpftool prog show
            return 1
        fi
        sleep 0.2
    done
    echo "no sensor program loaded"
}
start_nginx() {
    nginx -c /etc/nginx/guest.conf || return 1
    # Listening, seen in the kernel's socket table: no request before the agent runs.
    deadline=$(($(now_s) + 60))
    until grep -q ':@PORT_HEX@ 00000000:0000 0A' /proc/net/tcp; do
        if [ "$(now_s)" -ge $deadline ]; then echo "nginx not listening after 60 s"; return 1; fi
        sleep 0.1
    done
    echo "nginx listening on 127.0.0.1:@PORT@"
}
kernel_info() {
    echo "release $(uname -r)"
    echo "bpf_jit_enable $(cat /proc/sys/net/core/bpf_jit_enable)"
    ls /sys/kernel/btf/vmlinux
    echo "cpus $(nproc)"
}
"#;

fn init_script() -> String {
    let helpers = HELPERS
        .replace("@PORT_HEX@", &format!("{PORT:04X}"))
        .replace("@PORT@", &PORT.to_string())
        .replace("@CGROUP@", CGROUP)
        .replace("@SOCKET@", SOCKET)
        .replace("@PIN_DIR@", PIN_DIR)
        .replace("@POLL_MS@", &POLL_MS.to_string());
    let mut s = format!("{}{helpers}", guest::INIT_PRELUDE);
    s += "report kernel kernel_info\nreport nginx start_nginx\n";
    s += &format!("report doctor sensor doctor --json --cgroup {CGROUP}\n");
    s += &PHASE1.script();
    s += &PHASE2.script();
    s += "finish\n";
    s
}

fn nginx_conf() -> String {
    let (reply, head) = (REPLY.0, HEAD.0);
    // The mirror reads the whole POST body before the reply, so $request_length counts it (a
    // body nginx discards is not counted); the static handler refuses POST with 405, which
    // error_page turns into a 200 with a fixed reply.
    format!(
        "user root;\nworker_processes 1;\nerror_log /var/log/nginx/error.log;\npid /run/nginx.pid;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  log_format gt '$remote_addr $remote_port $request_length $bytes_sent';\n\
         access_log /var/log/nginx/gt.log gt;\n  client_body_temp_path /var/lib/nginx/body;\n\
         proxy_temp_path /var/lib/nginx/proxy;\n  fastcgi_temp_path /var/lib/nginx/fastcgi;\n\
         uwsgi_temp_path /var/lib/nginx/uwsgi;\n  scgi_temp_path /var/lib/nginx/scgi;\n\
         keepalive_requests 1000;\n  keepalive_timeout 300s;\n\
         server {{\n    listen 127.0.0.1:{PORT};\n    root /srv/www;\n    client_max_body_size 10m;\n\
         location = /{reply} {{ }}\n    location = /{head} {{ }}\n\
         location = /post {{ mirror /sink; mirror_request_body on; error_page 405 =200 /posted.txt; }}\n\
         location = /sink {{ internal; return 204; }}\n  }}\n}}\n"
    )
}

/// Deterministic, incompressible-enough content, as the host harness's.
fn content(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn build_initramfs(dir: &TempDir) -> std::path::PathBuf {
    let mut fs = Initramfs::new(&dir.path.join("root")).expect("initramfs tree");
    fs.busybox().expect("busybox");
    fs.program(&sensor_bin(), "/usr/bin/sensor")
        .expect("the agent");
    for (host, guest) in [
        ("/usr/sbin/nginx", "/usr/sbin/nginx"),
        ("/usr/bin/curl", "/usr/bin/curl"),
        ("/usr/sbin/bpftool", "/usr/sbin/bpftool"),
    ] {
        fs.program(std::path::Path::new(host), guest)
            .unwrap_or_else(|e| panic!("{host}: {e:#} (cargo xtask setup installs it)"));
    }
    fs.file("/etc/nginx/guest.conf", nginx_conf().as_bytes(), 0o644)
        .expect("nginx.conf");
    for d in ["/var/lib/nginx", "/var/log/nginx"] {
        std::fs::create_dir_all(fs.path(d)).expect("nginx dirs");
    }
    for (name, size) in [REPLY, HEAD] {
        fs.file(&format!("/srv/www/{name}"), &content(size), 0o644)
            .expect("reply file");
    }
    fs.file("/srv/www/post", b"the POST location\n", 0o644)
        .expect("post");
    fs.file("/srv/www/posted.txt", b"received\n", 0o644)
        .expect("posted.txt");
    let body: Vec<u8> = (0..POST_BODY.1).map(|i| (i * 13 + i / 97) as u8).collect();
    fs.file(POST_BODY.0, &body, 0o644).expect("post body");
    fs.file("/init", init_script().as_bytes(), 0o755)
        .expect("/init");
    let archive = dir.path.join("initramfs.cpio");
    let size = fs.pack(&archive).expect("cpio");
    eprintln!(
        "initramfs: {:.1} MiB ({})",
        size as f64 / 1048576.0,
        sensor_bin().display()
    );
    // The staged tree is not needed once packed.
    let _ = std::fs::remove_dir_all(&fs.root);
    archive
}

/// Prints everything the guest said when a check fails (panics unwind through it).
struct DumpOnPanic<'a>(&'a Boot);

impl Drop for DumpOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.0.dump());
        }
    }
}

fn section<'a>(sections: &'a BTreeMap<String, Section>, name: &str) -> &'a Section {
    sections
        .get(name)
        .unwrap_or_else(|| panic!("the guest reported no section {name}"))
}

/// A section whose command succeeded; its output.
fn ok<'a>(sections: &'a BTreeMap<String, Section>, name: &str) -> &'a str {
    let s = section(sections, name);
    assert_eq!(s.rc, Some(0), "{name} failed in the guest:\n{}", s.body);
    &s.body
}

/// Names of the programs in bpftool JSON (`cgroup show` is a list of programs; `cgroup tree`
/// a list of cgroups each with `programs`; `prog show` a list of programs).
fn program_names(json: &str) -> Vec<String> {
    // `bpftool -j cgroup show` prints nothing at all for a cgroup without programs.
    if json.trim().is_empty() {
        return Vec::new();
    }
    let v: serde_json::Value =
        serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("bpftool JSON ({e}): {json}"));
    let mut names = Vec::new();
    for item in v.as_array().map(Vec::as_slice).unwrap_or_default() {
        if let Some(progs) = item["programs"].as_array() {
            names.extend(
                progs
                    .iter()
                    .map(|p| p["name"].as_str().unwrap_or("?").to_owned()),
            );
        } else if item.get("id").is_some() {
            names.push(item["name"].as_str().unwrap_or("?").to_owned());
        }
    }
    names.sort();
    names
}

/// Checks one phase against ground truth and the clean stop; returns a one-line summary.
fn check_phase(s: &BTreeMap<String, Section>, phase: &Phase, live_read: &str) -> String {
    let p = phase.name;
    eprintln!("[{p}] {}", ok(s, &format!("{p}.start")).trim());
    assert_eq!(
        program_names(ok(s, &format!("{p}.attached"))),
        PROGRAMS,
        "{p}: programs attached to {CGROUP} while the agent runs"
    );

    // What the 6.1 verifier made of each program (informational).
    let progs: serde_json::Value =
        serde_json::from_str(ok(s, &format!("{p}.progs"))).expect("bpftool prog show JSON");
    for prog in progs.as_array().into_iter().flatten() {
        eprintln!(
            "[{p}] loaded: {} ({}): {} bytes translated, {} bytes JIT-compiled",
            prog["name"].as_str().unwrap_or("?"),
            prog["type"].as_str().unwrap_or("?"),
            prog["bytes_xlated"],
            prog["bytes_jited"]
        );
    }

    let mut transfers = Vec::new();
    for (name, ops) in phase.clients() {
        let t = parse_transfers(ok(s, &format!("{p}.curl.{name}")));
        assert_eq!(t.len(), ops.len(), "{p}: curl {name} transfers");
        let conns: BTreeSet<&str> = t.iter().map(|t| t.client.as_str()).collect();
        assert_eq!(conns.len(), 1, "{p}: curl {name} used one connection");
        transfers.extend(t);
    }
    let records = guest::nginx_records(ok(s, &format!("{p}.nginx-log")));
    let truth = ground_truth(&transfers, &records);
    eprintln!("[{p}] {}", ok(s, &format!("{p}.wait-closed")).trim());

    let conns: Vec<Conn> = serde_json::from_str(ok(s, &format!("{p}.conns")))
        .unwrap_or_else(|e| panic!("{p}: sensor conns --json: {e}"));
    assert_eq!(
        conns.len(),
        truth.len(),
        "{p}: one connection per client: {conns:?}"
    );
    for c in &conns {
        assert_eq!(c.state, "closed", "{p}: {c:?}");
        assert_eq!(c.local, format!("127.0.0.1:{PORT}"), "{p}: {c:?}");
        assert_eq!(c.protocol, "http1", "{p}: {c:?}");
    }
    let seen = sensor_per_connection(&conns);
    eprintln!(
        "[{p}] client connection      bytes in (truth/sensor)  bytes out (truth/sensor)  requests"
    );
    for (conn, t) in &truth {
        let v = seen.get(conn).copied().unwrap_or_default();
        eprintln!(
            "[{p}] {conn:<22} {:>9} / {:<9}      {:>9} / {:<9}       {} / {}   diff ({}, {}, {})",
            t.0,
            v.0,
            t.1,
            v.1,
            t.2,
            v.2,
            v.0 as i128 - t.0 as i128,
            v.1 as i128 - t.1 as i128,
            v.2 as i128 - t.2 as i128
        );
    }
    assert_eq!(
        truth, seen,
        "{p}: ground truth (bytes in, bytes out, requests) per client connection vs sensor"
    );

    let health: serde_json::Value = serde_json::from_str(ok(s, &format!("{p}.health")))
        .unwrap_or_else(|e| panic!("{p}: /v1/health: {e}"));
    assert_eq!(health["status"], "ok", "{p}: {health}");
    assert_eq!(health["cgroup"], CGROUP, "{p}: {health}");
    assert_eq!(health["ports"], serde_json::json!([PORT]), "{p}: {health}");
    let loss = health["loss"].as_object().expect("loss counters");
    assert!(!loss.is_empty(), "{p}: no loss counters in {health}");
    for (name, value) in loss {
        assert_eq!(value, 0, "{p}: loss counter {name}");
    }
    assert_eq!(health["live_read"], live_read, "{p}: {health}");
    eprintln!(
        "[{p}] health: live_read {} ({}); loss {}",
        health["live_read"],
        health["live_read_reason"],
        serde_json::Value::Object(loss.clone())
    );
    eprintln!(
        "[{p}] sensor status:\n{}",
        ok(s, &format!("{p}.status")).trim_end()
    );

    // The clean stop: exit 0, nothing attached anywhere, no program left, nothing pinned.
    eprintln!("[{p}] {}", ok(s, &format!("{p}.stop")).trim());
    eprintln!("[{p}] {}", ok(s, &format!("{p}.detached")).trim());
    assert_eq!(
        program_names(ok(s, &format!("{p}.cgroup-after"))),
        Vec::<String>::new(),
        "{p}: attached to {CGROUP} after the stop"
    );
    assert_eq!(
        program_names(ok(s, &format!("{p}.tree-after"))),
        Vec::<String>::new(),
        "{p}: attached anywhere in the cgroup tree after the stop"
    );
    let left: Vec<String> = program_names(ok(s, &format!("{p}.progs-after")))
        .into_iter()
        .filter(|n| n.starts_with("sensor_"))
        .collect();
    assert_eq!(
        left,
        Vec::<String>::new(),
        "{p}: programs loaded after the stop"
    );
    assert_eq!(
        ok(s, &format!("{p}.pinned-after")).trim(),
        "",
        "{p}: pinned in bpffs after the stop"
    );
    let dirs = ok(s, &format!("{p}.dirs-after"));
    let dirs: Vec<&str> = dirs.lines().collect();
    assert!(
        dirs.iter().all(|d| *d == PIN_DIR),
        "{p}: directories left in bpffs after the stop: {dirs:?}"
    );
    format!(
        "{p}: {} connections, {} requests exact; loss 0; clean stop (pin dir {})",
        truth.len(),
        transfers.len(),
        if dirs.is_empty() {
            "removed"
        } else {
            "left empty"
        }
    )
}

#[test]
fn debian_6_1_cloud_kernel_counts_exactly_and_stops_clean() {
    if !privileged("debian_6_1_cloud_kernel_counts_exactly_and_stops_clean") {
        return;
    }
    let started = Instant::now();
    let kernel = guest::ensure_kernel().expect("the bookworm 6.1 cloud kernel (cargo xtask setup)");
    eprintln!(
        "kernel: {} {} ({})",
        kernel.package,
        kernel.version,
        kernel.vmlinuz.display()
    );
    for key in KERNEL_CONFIG {
        let value = kernel.config_value(key);
        eprintln!("  {key}={}", value.as_deref().unwrap_or("(not set)"));
        assert_eq!(value.as_deref(), Some("y"), "{}: {key}", kernel.package);
    }
    let dir = TempDir::new("guest");
    let initrd = build_initramfs(&dir);
    let built = started.elapsed();
    let boot = guest::boot(&kernel, &initrd, &dir.path, &BootOptions::default());
    let _dump = DumpOnPanic(&boot);
    eprintln!(
        "guest ran {:.1?} (qemu {:?}); initramfs built in {built:.1?}",
        boot.elapsed, boot.status
    );
    assert!(
        boot.status.is_some(),
        "the guest did not power off within {:?}",
        BootOptions::default().timeout
    );
    assert!(boot.finished(), "the guest's script did not finish");
    let s = boot.sections();

    let info = ok(&s, "kernel");
    eprintln!("guest kernel: {}", info.trim().replace('\n', "; "));
    assert!(
        info.lines()
            .any(|l| l == format!("release {}", kernel.release)),
        "the guest runs {}: {info}",
        kernel.release
    );
    eprintln!("{}", ok(&s, "nginx").trim());
    // The doctor on this kernel: the agent can run, and the path it predicts for `auto` is
    // the one the agent then takes; the forced map path must work too.
    let doctor: serde_json::Value =
        serde_json::from_str(ok(&s, "doctor")).expect("sensor doctor --json in the guest");
    assert_eq!(doctor["can_run"], true, "{doctor:#}");
    let predicted = doctor["live_read"].as_str().expect("a live-read path");
    for (name, n) in sensor_tests::verifier_headroom(&doctor) {
        eprintln!("{name} on the guest: the verifier processed {n} instructions");
    }
    eprintln!(
        "sensor doctor on {}: live read {predicted} ({})",
        doctor["kernel"], doctor["live_read_reason"]
    );
    let summary = [
        check_phase(&s, &PHASE1, predicted),
        check_phase(&s, &PHASE2, "map"),
    ];
    for line in &summary {
        eprintln!("{line}");
    }
    eprintln!(
        "debian 6.1 cloud kernel test took {:.1?} (guest {:.1?})",
        started.elapsed(),
        boot.elapsed
    );
}
