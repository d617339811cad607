//! Time per head of `parse_head_with` + `HeadScan` on the bench's request heads (a developer's
//! check, not a test): `cargo run --release -p sensor-http --example head_speed`.
use std::time::Instant;

use sensor_http::{CredentialPolicy, ForwardedHeader, HeadScan, parse_head_with};

fn main() {
    let heads: [&[u8]; 3] = [
        b"GET /reply.json?c=1234 HTTP/1.1\r\nHost: bench\r\nUser-Agent: sensor-bench\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer sk-live-0123456789abcdef\r\nContent-Type: application/json\r\nContent-Length: 1234\r\nUser-Agent: OpenAI/Python 1.40.0\r\nAccept: application/json\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:18080\r\n\r\n",
    ];
    let policy = CredentialPolicy::default();
    for head in heads {
        let rounds = 2_000_000u32;
        let t = Instant::now();
        let mut n = 0usize;
        for _ in 0..rounds {
            let h = std::hint::black_box(head);
            let mut scan = HeadScan::new(&policy, ForwardedHeader::default());
            if let Ok(parsed) = parse_head_with(h, |k, v| scan.field(k, v)) {
                let (cred, list) = scan.finish(&parsed);
                n += usize::from(matches!(cred, sensor_http::Credential::One(_)))
                    + list.map_or(0, |l| l.len());
            }
        }
        let ns = t.elapsed().as_nanos() as f64 / f64::from(rounds);
        println!("{:4} bytes: {ns:.1} ns per head ({n})", head.len());
    }
}
