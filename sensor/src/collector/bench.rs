//! `sensor bench-collector` (hidden): drives a running collector with synthetic agents for
//! `cargo xtask bench`, through the real path (TLS, bearer token, gzip, validation, journal,
//! merge). Prints one JSON line: batches, summary rows and records sent, all acknowledged.
//!
//! Each synthetic agent is one task sending batches of `--records` summaries of `--rows`
//! client rows each, one after the other as a real agent does (a new connection per batch).
//! Periods start at the present and advance 10 s per summary: the collector clamps them to
//! its clock, so every row takes the full merge path (totals and every window).

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    cli::BenchCollectorArgs,
    model::aggregate::{Counts, Now},
    net::{
        client::{HttpClient, TlsOptions},
        secrets,
    },
    ship::{Batch, ClientDelta, PERIOD_SECS, ShipRecord, Summary, WIRE_VERSION, encode},
};

struct Sent {
    batches: u64,
    records: u64,
    rows: u64,
    bytes: u64,
}

fn batch(
    agent: &str,
    stream: &str,
    seq: &mut u64,
    start_s: &mut u64,
    a: &BenchCollectorArgs,
) -> Batch {
    let records = (0..a.records)
        .map(|_| {
            *seq += 1;
            *start_s += PERIOD_SECS;
            let clients = (0..a.rows)
                .map(|i| {
                    let n = ((*seq as usize * 7919 + i * 104_729) % a.clients.max(1)) as u32;
                    ClientDelta {
                        by: "address".into(),
                        key: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 1)) + n).to_string(),
                        counts: Counts {
                            requests: 3,
                            bytes_in: 1_500,
                            bytes_out: 60_000,
                            connections: 1,
                            events_out: 40,
                        },
                        open_connections: 1,
                        identity: None,
                        forwarded: None,
                    }
                })
                .collect();
            ShipRecord {
                seq: *seq,
                ..ShipRecord::summary(
                    agent,
                    Summary {
                        start_s: *start_s,
                        period_s: PERIOD_SECS,
                        clients,
                        rest: Default::default(),
                        sketch: Default::default(),
                        sketch_key: String::new(),
                        elsewhere: Default::default(),
                    },
                )
            }
        })
        .collect();
    Batch {
        version: WIRE_VERSION,
        agent: agent.to_owned(),
        stream: stream.to_owned(),
        records,
    }
}

async fn agent(
    name: String,
    token: String,
    a: std::sync::Arc<BenchCollectorArgs>,
) -> anyhow::Result<Sent> {
    let tls = TlsOptions {
        ca_file: Some(&a.ca_file),
        ..TlsOptions::default()
    };
    let client = HttpClient::new(&a.url, tls, Duration::from_secs(30))?;
    let stream = hex::encode(Now::system().unix_ms.to_be_bytes());
    let (mut seq, mut start_s) = (0u64, Now::system().secs() / PERIOD_SECS * PERIOD_SECS);
    let mut sent = Sent {
        batches: 0,
        records: 0,
        rows: 0,
        bytes: 0,
    };
    let deadline = Instant::now() + Duration::from_secs(a.seconds);
    while Instant::now() < deadline {
        let body = encode(&batch(&name, &stream, &mut seq, &mut start_s, &a))?;
        let headers = [
            ("Authorization", secrets::bearer_header(&token)),
            ("Content-Encoding", "gzip".to_owned()),
        ];
        let r = client.post(&headers, &body).await?;
        anyhow::ensure!(
            r.status == 200,
            "collector answered {}: {}",
            r.status,
            r.body
        );
        sent.batches += 1;
        sent.records += a.records as u64;
        sent.rows += (a.records * a.rows) as u64;
        sent.bytes += body.len() as u64;
    }
    Ok(sent)
}

pub fn run(args: &BenchCollectorArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.tokens_file)
        .with_context(|| format!("reading {}", args.tokens_file.display()))?;
    let agents: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(n, t)| (n.to_owned(), t.trim().to_owned()))
        .collect();
    anyhow::ensure!(!agents.is_empty(), "no agent tokens");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let shared = std::sync::Arc::new(args.clone());
    let results = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for (name, token) in agents {
            tasks.spawn(agent(name, token, shared.clone()));
        }
        tasks.join_all().await
    });
    let elapsed = started.elapsed().as_secs_f64();
    let (mut batches, mut records, mut rows, mut bytes) = (0, 0, 0, 0);
    for r in results {
        let s = r?;
        batches += s.batches;
        records += s.records;
        rows += s.rows;
        bytes += s.bytes;
    }
    crate::stdout::outln!(
        "{}",
        serde_json::json!({
            "seconds": elapsed,
            "batches": batches,
            "records": records,
            "rows": rows,
            "compressed_bytes": bytes,
        })
    )
}
