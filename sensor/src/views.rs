//! One-shot views that read the agent's local API.

use crate::{
    aggregate::Window,
    api,
    cli::{ClientsArgs, ConnsArgs},
    conntable::ConnRow,
    report::{By, ClientRow, Query},
};

pub fn conns(args: &ConnsArgs) -> anyhow::Result<()> {
    let body = api::get(&args.socket, "/v1/conns")?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let rows: Vec<ConnRow> = serde_json::from_str(&body)?;
    println!(
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
    );
    for r in rows {
        println!(
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
        );
    }
    Ok(())
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

pub fn clients(args: &ClientsArgs) -> anyhow::Result<()> {
    let query = Query {
        by: By::parse(&args.by).ok_or_else(|| anyhow::anyhow!("--by: address or group"))?,
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
    let body = api::get(
        &args.socket,
        &format!("/v1/clients?{}", query.to_query_string()),
    )?;
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let rows: Vec<ClientRow> = serde_json::from_str(&body)?;
    let scope = query.window.map_or("total", Window::name);
    println!(
        "{:<40} {:>10} {:>12} {:>12} {:>7} {:>5} {:>5} {:>9} {:>8}  ({scope})",
        "CLIENT", "REQUESTS", "BYTES_IN", "BYTES_OUT", "CONNS", "OPEN", "PEAK", "OUT/IN", "CV"
    );
    for r in rows {
        let (req, bin, bout, conns) = match query.window.and_then(|w| r.windows.get(w.name())) {
            Some(w) => (w.requests, w.bytes_in, w.bytes_out, w.connections),
            None => (r.requests, r.bytes_in, r.bytes_out, r.connections),
        };
        println!(
            "{:<40} {:>10} {:>12} {:>12} {:>7} {:>5} {:>5} {:>9} {:>8}",
            r.client,
            req,
            human_bytes(bin),
            human_bytes(bout),
            conns,
            r.open_connections,
            r.peak_open_connections,
            r.out_in_ratio.map_or("-".into(), |x| format!("{x:.1}")),
            r.interval_cv.map_or("-".into(), |x| format!("{x:.2}")),
        );
    }
    Ok(())
}
