//! One-shot views that read the agent's local API.

use crate::{api, cli::ConnsArgs, conntable::ConnRow};

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
