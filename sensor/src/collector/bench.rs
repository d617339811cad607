//! `sensor bench-collector` (hidden): drives a running collector with synthetic agents for
//! `cargo xtask bench`, through the real path (TLS, bearer token, gzip, validation, journal,
//! merge). Prints one JSON line: batches, summary rows and records sent, all acknowledged.
//!
//! With `--nats-url` it publishes into JetStream instead, through the agents' own sink
//! ([`JetStreamSink`]: the same encoder, `partition::split`, subjects, streams, message ids
//! and headers as an agent with `[ship] transport = "nats"`), a fixed number of batches per
//! agent, each once every message of the one before is acknowledged. Its JSON line adds the
//! messages and rows of each partition, which the collectors' counters are checked against.
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
    ship::partition,
    ship::{Batch, ClientDelta, PERIOD_SECS, ShipRecord, Summary, WIRE_VERSION, encode},
    sinks::{
        nats::{config::NatsKeys, sink::JetStreamSink},
        sink::Sink as _,
    },
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
    let url = a.url.as_deref().context("--url")?;
    let client = HttpClient::new(url, tls, Duration::from_secs(30))?;
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
    if args.nats_url.is_some() {
        return run_nats(args);
    }
    let tokens_file = args.tokens_file.as_deref().context("--tokens-file")?;
    let text = std::fs::read_to_string(tokens_file)
        .with_context(|| format!("reading {}", tokens_file.display()))?;
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

/// What one synthetic agent published into JetStream: totals, and (messages, rows) of
/// each partition.
struct Published {
    sent: Sent,
    partitions: Vec<(u64, u64)>,
}

/// One synthetic agent publishing `--batches` batches through the agents' JetStream sink.
async fn nats_agent(
    name: String,
    a: std::sync::Arc<BenchCollectorArgs>,
) -> anyhow::Result<Published> {
    let empty = std::path::Path::new("");
    let url = a.nats_url.as_deref().context("--nats-url")?;
    let credentials_file = a
        .credentials_file
        .as_deref()
        .context("--credentials-file")?;
    let keys = NatsKeys {
        url,
        credentials_file,
        ca_file: &a.ca_file,
        client_cert_file: empty,
        client_key_file: empty,
        token_file: empty,
        server_name: "",
        stream: &a.stream,
        subject_prefix: &a.subject_prefix,
        partitions: a.partitions,
        batch_max_records: a.records.max(1),
        timeout_secs: 30,
    };
    crate::sinks::nats::config::validate(&keys).map_err(|(k, e)| anyhow::anyhow!("{k}: {e}"))?;
    let spool_stream = hex::encode(Now::system().unix_ms.to_be_bytes());
    let mut sink = JetStreamSink::new(&keys, &name, spool_stream.clone(), Default::default())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (mut seq, mut start_s) = (0u64, Now::system().secs() / PERIOD_SECS * PERIOD_SECS);
    let mut out = Published {
        sent: Sent {
            batches: 0,
            records: 0,
            rows: 0,
            bytes: 0,
        },
        partitions: vec![(0, 0); a.partitions.max(1) as usize],
    };
    for _ in 0..a.batches {
        let records = batch(&name, &spool_stream, &mut seq, &mut start_s, &a).records;
        let mut rest = &records[..];
        // As the agent's engine does: what is not delivered is delivered again (a batch cut
        // to the server's max_payload leaves its tail for the next message).
        let mut attempts = 0;
        while !rest.is_empty() {
            match sink.deliver(rest).await {
                Ok(d) => {
                    let done = &rest[..d.sent.min(rest.len())];
                    out.sent.batches += 1;
                    out.sent.records += done.len() as u64;
                    for (p, part) in partition::split(done, a.partitions).iter().enumerate() {
                        if part.is_empty() {
                            continue;
                        }
                        let rows: usize = part
                            .iter()
                            .map(|r| match &r.payload {
                                crate::ship::Payload::Summary(s) => s.clients.len(),
                                crate::ship::Payload::Alert { .. } => 0,
                            })
                            .sum();
                        out.partitions[p].0 += 1;
                        out.partitions[p].1 += rows as u64;
                        out.sent.rows += rows as u64;
                        out.sent.bytes += encode(&Batch {
                            version: WIRE_VERSION,
                            agent: name.clone(),
                            stream: spool_stream.clone(),
                            records: part.clone(),
                        })?
                        .len() as u64;
                    }
                    rest = &rest[done.len()..];
                }
                Err(f) => {
                    attempts += 1;
                    anyhow::ensure!(
                        attempts < 5,
                        "{name}: JetStream refused a batch: {}",
                        f.error
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
    Ok(out)
}

fn run_nats(args: &BenchCollectorArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.agents >= 1, "--agents must be at least 1");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let shared = std::sync::Arc::new(args.clone());
    let results = runtime.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 1..=args.agents {
            tasks.spawn(nats_agent(format!("bench-{i}"), shared.clone()));
        }
        tasks.join_all().await
    });
    let elapsed = started.elapsed().as_secs_f64();
    let (mut batches, mut records, mut rows, mut bytes) = (0, 0, 0, 0);
    let mut partitions = vec![(0u64, 0u64); args.partitions.max(1) as usize];
    for r in results {
        let p = r?;
        batches += p.sent.batches;
        records += p.sent.records;
        rows += p.sent.rows;
        bytes += p.sent.bytes;
        for (total, (m, r)) in partitions.iter_mut().zip(p.partitions) {
            total.0 += m;
            total.1 += r;
        }
    }
    let messages: u64 = partitions.iter().map(|p| p.0).sum();
    crate::stdout::outln!(
        "{}",
        serde_json::json!({
            "seconds": elapsed,
            "batches": batches,
            "records": records,
            "rows": rows,
            "compressed_bytes": bytes,
            "messages": messages,
            "partitions": partitions
                .iter()
                .map(|(m, r)| serde_json::json!({"messages": m, "rows": r}))
                .collect::<Vec<_>>(),
        })
    )
}
