//! One-shot views that read the agent's local API.

pub mod top;

use std::fmt::Write as _;

use crate::{
    agent::api,
    agent::identity::{Identities, load_secret, secret_path},
    cli::{AlertsArgs, ClientsArgs, ConnsArgs, IdentityArgs},
    config::Config,
    model::aggregate::Window,
    model::conntable::ConnRow,
    model::keys::By,
    model::report::{ClientRow, Query},
    stdout::{outln, print_out},
};

pub fn conns(args: &ConnsArgs) -> anyhow::Result<()> {
    let body = api::get(&args.socket, "/v1/conns")?;
    if args.json {
        return outln!("{body}");
    }
    let rows: Vec<ConnRow> = serde_json::from_str(&body)?;
    let mut out = String::new();
    writeln!(
        out,
        "{:<46} {:<46} {:>12} {:>12} {:>9} {:>9} {:>8} {:<6} {:<24}",
        "LOCAL",
        "REMOTE",
        "BYTES_IN",
        "BYTES_OUT",
        "PKTS_IN",
        "PKTS_OUT",
        "REQS",
        "STATE",
        "LAST_SEEN"
    )?;
    for r in rows {
        writeln!(
            out,
            "{:<46} {:<46} {:>12} {:>12} {:>9} {:>9} {:>8} {:<6} {:<24}",
            r.local,
            r.remote,
            r.bytes_in,
            r.bytes_out,
            r.packets_in,
            r.packets_out,
            r.requests,
            r.state,
            r.last_seen
        )?;
    }
    print_out(&out)
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Where a view reads from: the local agent, or a collector's fleet-wide view.
pub enum Source {
    Agent(std::path::PathBuf),
    Collector {
        client: crate::net::client::HttpClient,
        token: String,
        label: String,
    },
}

impl Source {
    pub fn new(socket: &std::path::Path, remote: &crate::cli::RemoteArgs) -> anyhow::Result<Self> {
        let Some(url) = &remote.collector else {
            return Ok(Self::Agent(socket.to_owned()));
        };
        let token_file = remote
            .token_file
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--collector needs --token-file (a reader token)"))?;
        let parsed =
            crate::net::client::parse_url(url).map_err(|e| anyhow::anyhow!("--collector: {e}"))?;
        anyhow::ensure!(
            crate::net::client::may_carry_token(&parsed),
            "--collector {url}: the reader token would travel in clear; use https://"
        );
        let token = crate::net::secrets::read_secret(token_file, "collector reader token")?;
        let identity = match (&remote.client_cert, &remote.client_key) {
            (Some(cert_file), Some(key_file)) => Some(crate::net::tls::ClientIdentity {
                cert_file,
                key_file,
            }),
            _ => None,
        };
        let tls = crate::net::client::TlsOptions {
            ca_file: remote.ca_file.as_deref(),
            server_name: None,
            identity,
        };
        let client =
            crate::net::client::HttpClient::new(url, tls, std::time::Duration::from_secs(10))
                .map_err(|e| anyhow::anyhow!("--collector {url}: {e}"))?;
        Ok(Self::Collector {
            client,
            token,
            label: url.trim_end_matches('/').to_owned(),
        })
    }

    /// What the view shows as its source.
    pub fn label(&self) -> String {
        match self {
            Self::Agent(p) => p.display().to_string(),
            Self::Collector { label, .. } => label.clone(),
        }
    }

    /// GETs an API path (same paths and JSON from the agent and the collector).
    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        let (client, token, label) = match self {
            Self::Agent(socket) => return api::get(socket, path),
            Self::Collector {
                client,
                token,
                label,
            } => (client, token, label),
        };
        let base = client.url().path().trim_end_matches('/');
        let full = format!("{base}{path}");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let r = runtime
            .block_on(client.get(
                &full,
                &[("Authorization", crate::net::secrets::bearer_header(token))],
            ))
            .map_err(|e| anyhow::anyhow!("collector {label}: {e}"))?;
        if r.status != 200 {
            anyhow::bail!("collector {label} answered {}: {}", r.status, r.body.trim());
        }
        Ok(r.body)
    }
}

pub fn clients(args: &ClientsArgs) -> anyhow::Result<()> {
    let source = Source::new(&args.socket, &args.remote)?;
    let query = Query {
        by: By::parse(&args.by)
            .ok_or_else(|| anyhow::anyhow!("--by: address, group, identity or forwarded"))?,
        sort: args.sort.clone(),
        window: match &args.window {
            Some(w) => {
                Some(Window::parse(w).ok_or_else(|| anyhow::anyhow!("--window: 1m, 10m or 1h"))?)
            }
            None => None,
        },
        limit: args.limit,
        filter: args.filter.clone(),
    };
    let body = source.get(&format!("/v1/clients?{}", query.to_query_string()))?;
    if args.json {
        return outln!("{body}");
    }
    let rows: Vec<ClientRow> = serde_json::from_str(&body)?;
    let scope = query.window.map_or("total", Window::name);
    // The other dimension worth seeing next to each row.
    let (other, other_of): (&str, fn(&ClientRow) -> Option<&str>) = match query.by {
        By::Identity => ("FORWARDED_FOR", |r| r.forwarded_for.as_deref()),
        _ => ("IDENTITY", |r| r.identity.as_deref()),
    };
    let mut out = String::new();
    writeln!(
        out,
        "{:<40} {:>10} {:>12} {:>12} {:>8} {:>7} {:>5} {:>5} {:>9} {:>8}  {:<20} ({scope})",
        "CLIENT",
        "REQUESTS",
        "BYTES_IN",
        "BYTES_OUT",
        "EVENTS",
        "CONNS",
        "OPEN",
        "PEAK",
        "OUT/IN",
        "CV",
        other
    )?;
    for r in &rows {
        let (req, bin, bout, events, conns) =
            match query.window.and_then(|w| r.windows.get(w.name())) {
                Some(w) => (
                    w.requests,
                    w.bytes_in,
                    w.bytes_out,
                    w.events_out,
                    w.connections,
                ),
                None => (
                    r.requests,
                    r.bytes_in,
                    r.bytes_out,
                    r.events_out,
                    r.connections,
                ),
            };
        writeln!(
            out,
            "{:<40} {:>10} {:>12} {:>12} {:>8} {:>7} {:>5} {:>5} {:>9} {:>8}  {:<20}",
            r.client,
            req,
            human_bytes(bin),
            human_bytes(bout),
            events,
            conns,
            r.open_connections,
            r.peak_open_connections,
            r.out_in_ratio.map_or("-".into(), |x| format!("{x:.1}")),
            r.interval_cv.map_or("-".into(), |x| format!("{x:.2}")),
            other_of(r).unwrap_or("-"),
        )?;
    }
    print_out(&out)
}

/// `sensor identity`: the identity a credential read from stdin maps to, with this
/// deployment's secret, so operators can name known keys in the config without the agent
/// ever showing a key.
pub fn identity(args: &IdentityArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::embedded()?,
    };
    let mut config = config;
    if let Some(dir) = &args.state_dir {
        config.state.dir.clone_from(dir);
    }
    let secret = load_secret(&secret_path(&config), false).map_err(|e| {
        e.context("no identity secret yet: start the agent once, or set [identity] secret_file")
    })?;
    let ids = Identities::new(&secret, &config);
    let mut key = String::new();
    std::io::stdin().read_line(&mut key)?;
    let key = key.trim_end_matches(['\r', '\n']);
    anyhow::ensure!(!key.is_empty(), "expected the API key on standard input");
    outln!("{}", ids.identity_of(key.as_bytes()))
}

pub fn alerts(args: &AlertsArgs) -> anyhow::Result<()> {
    let body = Source::new(&args.socket, &args.remote)?.get("/v1/alerts")?;
    if args.json {
        return outln!("{body}");
    }
    let alerts: Vec<crate::detect::Alert> = serde_json::from_str(&body)?;
    if alerts.is_empty() {
        return outln!("no alerts");
    }
    let mut out = String::new();
    writeln!(
        out,
        "{:<9} {:<9} {:<22} {:<10} {:<40} {:<24} {:>7}  EVIDENCE",
        "STATE", "SEVERITY", "RULE", "KEY_KIND", "KEY", "FIRST_SEEN", "UPDATES"
    )?;
    for a in alerts {
        let state = match a.mode {
            crate::detect::Mode::Log => format!("{}(log)", a.state),
            crate::detect::Mode::Alert => a.state.to_string(),
        };
        let evidence: Vec<String> = a
            .conditions
            .iter()
            .map(|c| {
                format!(
                    "{}{} {:.3} {} {}",
                    c.metric,
                    c.window
                        .as_deref()
                        .map_or(String::new(), |w| format!("[{w}]")),
                    c.value,
                    c.op,
                    c.threshold
                )
            })
            .collect();
        writeln!(
            out,
            "{:<9} {:<9} {:<22} {:<10} {:<40} {:<24} {:>7}  {}",
            state,
            a.severity,
            a.rule_id,
            a.key_kind,
            a.key,
            a.first_seen,
            a.updates,
            evidence.join(", ")
        )?;
        if args.explain
            && let Some(e) = &a.explain
        {
            explain(&mut out, e)?;
        }
    }
    print_out(&out)
}

/// The `--explain` lines under an alert.
fn explain(out: &mut String, e: &crate::detect::Explanation) -> std::fmt::Result {
    if let Some(r) = &e.ring {
        writeln!(
            out,
            "    ring of {} {} keys, {:.0} est. output tokens/min together, heaviest member {:.0}%",
            r.member_count,
            r.member_kind,
            r.tokens_per_minute,
            r.max_member_share * 100.0
        )?;
        writeln!(out, "    shared: {}", r.shared.join("; "))?;
        writeln!(out, "    members: {}", r.members.join(" "))?;
        return Ok(());
    }
    writeln!(out, "    score {:.2}:", e.score)?;
    for p in &e.parts {
        writeln!(out, "      {:<14} {:>+5.2}  {}", p.signal, p.points, p.why)?;
    }
    Ok(())
}
