//! `sensor bench-aggregate --keys N` (hidden): the per-client aggregation holding N distinct
//! clients, for `cargo xtask bench` to measure the memory of this process from outside.
//!
//! Every synthetic client goes through the agent's own aggregation path, as one short HTTP
//! connection does: opened with its counters, one request event, closed. The table bound is
//! N unless `--max-clients` sets it (then the lightest clients are folded as in the agent). No
//! packet is sent.

use std::{
    io::Read as _,
    net::{IpAddr, Ipv4Addr},
    time::Instant,
};

use anyhow::Context as _;

use crate::{
    cli::BenchAggregateArgs,
    model::aggregate::{Aggregator, Counts, Delta, Now},
};

/// Synthetic clients are numbered into 127.0.0.0/8 (16M addresses): never sent to, only keys.
const MAX_KEYS: usize = (1 << 24) - 2;

pub fn run(args: &BenchAggregateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.keys <= MAX_KEYS,
        "--keys: at most {MAX_KEYS} synthetic clients"
    );
    let started = Instant::now();
    let max_clients = args.max_clients.unwrap_or(args.keys).max(1);
    let mut agg = Aggregator::new(max_clients, 24, 56);
    let now = Now::system();
    let base = u32::from(Ipv4Addr::new(127, 0, 0, 1));
    for i in 0..args.keys {
        let ip = IpAddr::V4(Ipv4Addr::from(base + i as u32));
        let open = Delta {
            counts: Counts {
                requests: 1,
                bytes_in: 120,
                bytes_out: 1_500,
                connections: 0,
                events_out: 0,
            },
            opened: true,
            closed: false,
        };
        agg.apply(ip, &open, now);
        agg.request(ip, 1_000_000_000 + i as u64, now);
        agg.apply(
            ip,
            &Delta {
                closed: true,
                ..Default::default()
            },
            now,
        );
    }
    let fill_ms = started.elapsed().as_millis();
    let report = serde_json::json!({
        "keys": args.keys,
        "max_clients": max_clients,
        "tracked_addresses": agg.addresses.clients.len(),
        "tracked_groups": agg.groups.clients.len(),
        "folded_addresses": agg.addresses.folded.clients,
        "fill_ms": fill_ms,
    });
    crate::stdout::outln!("{report}")?;
    // Hold the state until the caller has measured us and closes our stdin.
    let mut sink = Vec::new();
    std::io::stdin()
        .read_to_end(&mut sink)
        .context("waiting for stdin to close")?;
    // Keep `agg` alive (and observable) until here.
    std::hint::black_box(&agg);
    Ok(())
}
