//! Command line: `sensor run` (the agent) and the read-only views.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Config;

/// Where `check-config` looks without an argument: the installed configuration.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/sensor/sensor.toml";

#[derive(Debug, Parser)]
#[command(
    name = "sensor",
    version,
    about = "eBPF traffic sensor for AI inference hosts"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: load and attach the kernel programs, count, serve the local API.
    Run(RunArgs),
    /// Run the collector: receive agents' batches over HTTPS, merge clients across hosts, run
    /// fleet rules, forward alerts to SIEMs, serve the fleet view (see docs/collector.md).
    Collector(CollectorArgs),
    /// List live and recently closed connections to the watched ports.
    Conns(ConnsArgs),
    /// Per-client counters (one-shot table or JSON).
    Clients(ClientsArgs),
    // systemd service (sensor/src/service).
    /// Install as a systemd service: binary, unit, default config, secret, state directory.
    Install(InstallArgs),
    /// Stop, disable and remove the service; --purge also removes config and state.
    Uninstall(UninstallArgs),
    /// Validate a configuration file; prints every error with file, line and key.
    CheckConfig(CheckConfigArgs),
    /// Is the agent running: attach point, ports, uptime, counts and loss.
    Status(StatusArgs),
    /// What this kernel allows: kernel release, BTF, cgroup v2, capabilities, each probed BPF
    /// feature and program, and the live-read path a start would use. Exits non-zero when the
    /// agent cannot run here.
    Doctor(DoctorArgs),
    /// Open and recent extraction alerts.
    Alerts(AlertsArgs),
    /// Print the identity an API key maps to (the key is read from standard input and never
    /// echoed), for naming known keys in `[identity.names]`.
    Identity(IdentityArgs),
    /// Live full-screen view of the per-client counters (keys: see the footer, q quits).
    Top(TopArgs),
    /// Benchmark helper (`cargo xtask bench`): fills the per-client aggregation with synthetic
    /// clients, prints one JSON line, then waits for stdin to close so the caller can read this
    /// process's memory.
    #[command(hide = true)]
    BenchAggregate(BenchAggregateArgs),
    /// Benchmark helper (`cargo xtask bench`): synthetic agents sending summaries to a running
    /// collector as fast as it accepts them; prints one JSON line.
    #[command(hide = true)]
    BenchCollector(BenchCollectorArgs),
}

#[derive(Debug, clap::Args)]
pub struct TopArgs {
    /// The agent's local API socket.
    #[arg(long, value_name = "PATH", default_value = "/run/sensor/sensor.sock")]
    pub socket: PathBuf,
    /// Refresh interval in milliseconds.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(100..)
    )]
    pub interval_ms: u64,
    /// Group clients by address, address group, API identity or forwarded client (cycle with
    /// `g`).
    #[arg(
        long,
        default_value = "address",
        value_parser = ["address", "group", "identity", "forwarded"]
    )]
    pub by: String,
    /// Show and sort by this window's counters: 1m, 10m or 1h (cycle with `w`); default: totals.
    #[arg(long, value_parser = ["1m", "10m", "1h"])]
    pub window: Option<String>,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// Where the views read from: the local agent's socket, or a collector's fleet view.
#[derive(Debug, Clone, clap::Args)]
pub struct RemoteArgs {
    /// Read the fleet-wide view from a collector (its base URL, e.g.
    /// https://collector.example.net:9443) instead of the local agent.
    #[arg(long, value_name = "URL")]
    pub collector: Option<String>,
    /// File holding a reader token of the collector (required with --collector).
    #[arg(long, value_name = "FILE", requires = "collector")]
    pub token_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) that signed the collector's certificate; default: the system's.
    #[arg(long, value_name = "FILE", requires = "collector")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for a collector that requires mutual TLS.
    #[arg(long, value_name = "FILE", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct AlertsArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Under each alert, its score's signals with their points, and a ring's members, what
    /// they share and their combined volume.
    #[arg(long)]
    pub explain: bool,
    /// The agent's local API socket.
    #[arg(long, value_name = "PATH", default_value = "/run/sensor/sensor.sock")]
    pub socket: PathBuf,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, clap::Args)]
pub struct IdentityArgs {
    /// Configuration file whose identity secret to use (default: the embedded default's).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// State directory holding a generated secret (replaces the configured one).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ClientsArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Sort column (descending): bytes_out, bytes_in, requests, connections, open_connections,
    /// peak_open_connections, active_seconds, out_in_ratio, interval_mean_ms, interval_cv,
    /// last_seen, first_seen, client.
    #[arg(long, default_value = "bytes_out")]
    pub sort: String,
    /// Show at most N clients.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Sort and show this window's counters: 1m, 10m or 1h.
    #[arg(long)]
    pub window: Option<String>,
    /// Group clients by address (default), address group, API identity (keyed hash of the
    /// credential) or forwarded client (behind a trusted proxy).
    #[arg(long, default_value = "address")]
    pub by: String,
    /// Only clients whose address or group contains this text.
    #[arg(long)]
    pub filter: Option<String>,
    /// The agent's local API socket.
    #[arg(long, value_name = "PATH", default_value = "/run/sensor/sensor.sock")]
    pub socket: PathBuf,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Configuration file (TOML); without it the embedded defaults apply.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// cgroup v2 to watch (absolute, or relative to the cgroup v2 mount); default: the root.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Watched local ports, comma separated (replaces the configured list).
    #[arg(long, value_name = "LIST", value_parser = crate::config::parse_ports)]
    // Spelled `std::vec::Vec` so clap takes the whole list from one value parser call
    // instead of treating it as a repeated argument.
    pub ports: Option<std::vec::Vec<u16>>,
    /// Local API socket (replaces the configured path).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Live-connection poll interval in milliseconds (replaces the configured value).
    #[arg(long, value_name = "MS")]
    pub poll_interval_ms: Option<u64>,
    /// Directory for the saved state (replaces the configured one).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// bpffs directory for pinned maps and links (replaces the configured one).
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Start from zero: discard pinned kernel state and saved per-client state.
    #[arg(long)]
    pub fresh: bool,
    /// How live connections are read from the kernel (replaces `[capture] live_read`): the
    /// BPF iterator where it loads (auto), or force the iterator or the map.
    #[arg(long, value_name = "PATH")]
    pub live_read: Option<crate::config::LiveRead>,
}

/// Resolves the effective configuration: file (or embedded default), then flags.
pub fn effective_config(args: &RunArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::embedded()?,
    };
    if let Some(cgroup) = &args.cgroup {
        config.capture.cgroup = cgroup.display().to_string();
    }
    if let Some(ports) = &args.ports {
        config.capture.ports.clone_from(ports);
    }
    if let Some(socket) = &args.socket {
        config.api.socket.clone_from(socket);
    }
    if let Some(ms) = args.poll_interval_ms {
        anyhow::ensure!(ms > 0, "--poll-interval-ms must be at least 1");
        config.capture.poll_interval_ms = ms;
    }
    if let Some(dir) = &args.state_dir {
        config.state.dir.clone_from(dir);
    }
    if let Some(dir) = &args.pin_dir {
        config.state.bpf_pin_dir.clone_from(dir);
    }
    if let Some(path) = args.live_read {
        config.capture.live_read = path;
    }
    Ok(config)
}

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Configuration file (TOML) whose `[capture]` cgroup and live_read are checked.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// cgroup v2 to check (replaces the configured one).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,
    /// Live-read path to check (replaces `[capture] live_read`).
    #[arg(long, value_name = "PATH")]
    pub live_read: Option<crate::config::LiveRead>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ConnsArgs {
    /// Print a JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The agent's local API socket.
    #[arg(long, value_name = "PATH", default_value = "/run/sensor/sensor.sock")]
    pub socket: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct BenchAggregateArgs {
    /// Distinct client addresses to aggregate.
    #[arg(long, value_name = "N")]
    pub keys: usize,
    /// The table bound (`[clients] max_clients`); default: N, so every client stays exact.
    #[arg(long, value_name = "M")]
    pub max_clients: Option<usize>,
    /// Minutes of history per client: one request every 10 s over the last M minutes (60:
    /// every window full, as for a client active for an hour). 0: a single request.
    #[arg(long, value_name = "M", default_value_t = 0)]
    pub history_minutes: u64,
    /// Writes this many snapshots of the state (the agent's own encoder, into a temporary
    /// directory) and reports their median CPU time and size.
    #[arg(long, value_name = "R", default_value_t = 0)]
    pub snapshots: usize,
}

/// Command line of `sensor collector`.
#[derive(Debug, clap::Args)]
pub struct CollectorArgs {
    /// Configuration file (TOML); without it the embedded defaults apply.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Check the configuration, certificates and tokens, then exit.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchCollectorArgs {
    /// The collector's ingest URL (HTTPS: each agent sends batches for `--seconds`).
    #[arg(
        long,
        required_unless_present = "nats_url",
        conflicts_with = "nats_url"
    )]
    pub url: Option<String>,
    /// The CA of the collector's (HTTPS) or the NATS servers' (JetStream) certificate.
    #[arg(long)]
    pub ca_file: std::path::PathBuf,
    /// Agent tokens, one per line (`<name> <token>`): one synthetic agent each (HTTPS).
    #[arg(long, required_unless_present = "nats_url")]
    pub tokens_file: Option<std::path::PathBuf>,
    /// Publish into JetStream instead, as agents with `[ship] transport = "nats"` do (the
    /// agents' own sink): the NATS servers. Each of `--agents` synthetic agents publishes
    /// `--batches` batches, each once JetStream acknowledged the one before, then ends.
    #[arg(long, requires = "credentials_file")]
    pub nats_url: Option<String>,
    /// The agents' NATS credentials (`<user>:<password>` or an nkey seed), all agents alike.
    #[arg(long)]
    pub credentials_file: Option<std::path::PathBuf>,
    /// `[ship] partitions` (1: unpartitioned).
    #[arg(long, default_value_t = 1)]
    pub partitions: u32,
    /// `[ship] stream`.
    #[arg(long, default_value = "SENSOR")]
    pub stream: String,
    /// `[ship] subject_prefix`.
    #[arg(long, default_value = "sensor.ship")]
    pub subject_prefix: String,
    /// Synthetic agents (JetStream; named bench-1, bench-2 ...).
    #[arg(long, default_value_t = 16)]
    pub agents: usize,
    /// Batches per synthetic agent (JetStream).
    #[arg(long, default_value_t = 8)]
    pub batches: u64,
    /// Summaries per batch.
    #[arg(long, default_value_t = 20)]
    pub records: usize,
    /// Client rows per summary.
    #[arg(long, default_value_t = 200)]
    pub rows: usize,
    /// Distinct client addresses the rows are drawn from.
    #[arg(long, default_value_t = 20_000)]
    pub clients: usize,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
}

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// Enable the service: start it at boot.
    #[arg(long)]
    pub enable: bool,
    /// Start the service now (restart it when it runs: an upgrade).
    #[arg(long)]
    pub now: bool,
    /// Stage the files under DIR instead of / and run no systemctl (packaging, inspection).
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// Also remove the configuration, the identity secret and the saved state.
    #[arg(long)]
    pub purge: bool,
    /// Remove what `install --root DIR` staged under DIR; runs no systemctl.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    /// The configuration file to check.
    #[arg(value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    pub file: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The agent's local API socket.
    #[arg(long, value_name = "PATH", default_value = "/run/sensor/sensor.sock")]
    pub socket: PathBuf,
    /// Print JSON: the health document plus `socket` and `uptime_secs`.
    #[arg(long)]
    pub json: bool,
}
